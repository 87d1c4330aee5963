//! STUN and TURN in the server binary, so two browsers that cannot reach each other directly
//! (a symmetric NAT, a network without UDP) still connect: relayed through this node.
//!
//! The protocol is the `turn` crate's (webrtc-rs, a port of pion/turn): real relay sockets, a
//! key lookup and a relay-socket factory we plug into. Chosen over `turn-server` (turn-rs),
//! which relays only between its own clients' virtual ports (a relayed browser could not reach
//! a direct one) and has no per-allocation limits. Ours on top: credentials (`credentials.rs`),
//! the per-peer allocation quota (`auth.rs`), the relay guard (`relay.rs`: public addresses
//! only, bytes per second, longest life, counted) and TURN over TCP (`tcp.rs`).

mod auth;
pub mod credentials;
pub mod relay;
mod tcp;

use super::config::TurnConfig;
use super::metrics::Metrics;
use auth::{Admission, Allocations, RestAuth};
use credentials::Issuer;
use relay::{GuardedRelays, Policy};
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use turn::allocation::AllocationInfo;
use turn::server::config::{ConnConfig, ServerConfig};
use turn::server::Server;

#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    #[error(
        "[turn] listen is {0}, a wildcard address: set public_ip to the address browsers reach"
    )]
    NoPublicIp(SocketAddr),
    #[error("[turn] has neither listen nor urls: nothing to hand out")]
    NothingToOffer,
    #[error("[turn] relay_ports {0:?} is not a range of ports")]
    BadPorts([u16; 2]),
    #[error("cannot listen for TURN on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TURN server: {0}")]
    Server(#[from] turn::Error),
}

/// How often the allocation quota is checked against the allocations that exist.
const RECONCILE_EVERY: Duration = Duration::from_secs(10);

/// The credentials every peer gets, and the built-in server if one is configured.
pub struct Turn {
    pub issuer: Issuer,
    /// Where the built-in server listens (UDP and TCP), if it runs.
    pub addr: Option<SocketAddr>,
    /// One per listening socket (UDP, TCP): see `auth.rs` on why the quota needs that.
    servers: Vec<Arc<Server>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Turn {
    /// Starts the built-in server if `listen` is set; either way, ready to issue credentials.
    pub async fn start(config: &TurnConfig, metrics: Arc<Metrics>) -> Result<Self, TurnError> {
        let secret = if config.secret.is_empty() {
            // One node with the built-in server needs no shared secret: make one per start.
            let bytes: [u8; 32] = rand::random();
            bytes.to_vec()
        } else {
            config.secret.as_bytes().to_vec()
        };
        let ttl = Duration::from_secs(config.credential_ttl_secs.max(1));
        let Some(listen) = config.listen else {
            if config.urls.is_empty() {
                return Err(TurnError::NothingToOffer);
            }
            return Ok(Self {
                issuer: Issuer::new(&secret, ttl, config.urls.clone()),
                addr: None,
                servers: Vec::new(),
                tasks: Vec::new(),
            });
        };
        let public_ip = match config.public_ip {
            Some(ip) => ip,
            None if listen.ip().is_unspecified() => return Err(TurnError::NoPublicIp(listen)),
            None => listen.ip(),
        };
        if config.relay_ports[0] == 0 || config.relay_ports[0] > config.relay_ports[1] {
            return Err(TurnError::BadPorts(config.relay_ports));
        }
        let bind = |source| TurnError::Bind {
            addr: listen,
            source,
        };
        let udp = UdpSocket::bind(listen).await.map_err(bind)?;
        // Port 0: the TCP listener takes the port the UDP socket got.
        let udp_addr = udp.local_addr().map_err(bind)?;
        let tcp = TcpListener::bind(udp_addr).await.map_err(bind)?;
        let tcp = tcp::TcpMux::start(
            tcp,
            tcp::Caps {
                total: config.max_tcp_connections,
                per_ip: config.max_tcp_connections_per_ip,
            },
            metrics.clone(),
        )
        .map_err(bind)?;
        let urls = if config.urls.is_empty() {
            default_urls(public_ip, udp_addr.port())
        } else {
            config.urls.clone()
        };
        let issuer = Issuer::new(&secret, ttl, urls);

        let policy = Arc::new(Policy {
            allow_private: config.allow_private_peers,
            bytes_per_sec: u32::try_from(config.max_relay_bytes_per_sec)
                .ok()
                .and_then(NonZeroU32::new),
            max_lifetime: Duration::from_secs(config.max_allocation_secs.max(1)),
            metrics: metrics.clone(),
        });
        let allocations = Arc::new(Allocations::default());
        let (closed_tx, closed_rx) = mpsc::channel(1024);
        let mut servers = Vec::new();
        let conns: [Arc<dyn webrtc_util::Conn + Send + Sync>; 2] = [Arc::new(udp), Arc::new(tcp)];
        for conn in conns {
            let admission = Arc::new(Admission::new(
                allocations.clone(),
                config.max_allocations_per_peer,
                metrics.clone(),
            ));
            let server = Server::new(ServerConfig {
                conn_configs: vec![ConnConfig {
                    conn,
                    relay_addr_generator: Box::new(GuardedRelays {
                        // Relay sockets bind where the listener does (wildcard: every interface).
                        bind_ip: listen.ip(),
                        public_ip,
                        ports: config.relay_ports,
                        policy: policy.clone(),
                        admission: admission.clone(),
                    }),
                }],
                realm: config.realm.clone(),
                auth_handler: Arc::new(RestAuth {
                    issuer: issuer.clone(),
                    admission,
                }),
                channel_bind_timeout: Duration::from_secs(0),
                alloc_close_notify: Some(closed_tx.clone()),
            })
            .await?;
            servers.push(Arc::new(server));
        }
        let tasks = vec![
            tokio::spawn(forget_closed(closed_rx, allocations.clone())),
            tokio::spawn(reconcile(
                servers.iter().map(Arc::downgrade).collect(),
                allocations,
            )),
        ];
        tracing::info!(%udp_addr, %public_ip, "STUN/TURN listening (UDP and TCP)");
        Ok(Self {
            issuer,
            addr: Some(udp_addr),
            servers,
            tasks,
        })
    }

    /// Stops the built-in server: every allocation ends.
    pub async fn close(&self) {
        for task in &self.tasks {
            task.abort();
        }
        for server in &self.servers {
            if let Err(e) = server.close().await {
                tracing::warn!(error = %e, "TURN server did not close cleanly");
            }
        }
    }
}

/// The built-in server's URLs: STUN, TURN over UDP, TURN over TCP.
fn default_urls(ip: IpAddr, port: u16) -> Vec<String> {
    let host = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    vec![
        format!("stun:{host}:{port}"),
        format!("turn:{host}:{port}?transport=udp"),
        format!("turn:{host}:{port}?transport=tcp"),
    ]
}

async fn forget_closed(mut closed: mpsc::Receiver<AllocationInfo>, allocations: Arc<Allocations>) {
    while let Some(info) = closed.recv().await {
        if let Some(peer) = credentials::username_peer(&info.username) {
            allocations.closed(peer, info.five_tuple.src_addr);
        }
    }
}

async fn reconcile(servers: Vec<std::sync::Weak<Server>>, allocations: Arc<Allocations>) {
    'rounds: loop {
        tokio::time::sleep(RECONCILE_EVERY).await;
        let mut live = HashSet::new();
        for server in &servers {
            let Some(server) = server.upgrade() else {
                return;
            };
            let Ok(infos) = server.get_allocations_info(None).await else {
                continue 'rounds;
            };
            live.extend(infos.values().filter_map(|info| {
                credentials::username_peer(&info.username).map(|p| (p, info.five_tuple.src_addr))
            }));
        }
        allocations.reconcile(&live, Instant::now());
    }
}
