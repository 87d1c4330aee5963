//! The server's runtime config: `Leptos.toml`, then environment variables, then CLI flags.
//! (Build settings live in Cargo.toml's `[package.metadata.leptos]`; cargo-leptos reads only that.)

use crate::protocol::IceServer;
use clap::Parser;
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP server listens on.
    pub listen: SocketAddr,
    /// Broker backend by URI scheme: `memory://` (in-process, the default) or
    /// `redis://host:port[/db]` / `redis+unix:///path/to/socket` (several nodes sharing one
    /// Redis).
    pub broker: String,
    /// ICE servers handed to browsers; none means host candidates only.
    pub ice_servers: Vec<IceServer>,
    /// Browser origins (`scheme://host[:port]`) allowed to open `/ws` besides the server's own
    /// (an `Origin` equal to the request's `Host`); `"*"` allows any. Requests without an `Origin`
    /// header (non-browser clients) are always allowed.
    pub allowed_origins: Vec<String>,
    pub limits: Limits,
    /// The built-in STUN/TURN server and the short-lived TURN credentials handed to every peer.
    /// Absent: neither (browsers get only `ice_servers`).
    pub turn: Option<TurnConfig>,
    /// HTTPS (and so `wss:`) instead of plain HTTP. Absent: plain HTTP (fine on localhost and
    /// behind a TLS-terminating reverse proxy).
    pub tls: Option<TlsConfig>,
    /// Reverse proxies (addresses or CIDR ranges) whose `X-Forwarded-For` is believed: for a
    /// request from one of them, the client is the rightmost address in that header that is not
    /// itself a trusted proxy. From anyone else the header is ignored (it is the client's to forge).
    #[serde(deserialize_with = "proxies")]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// `/metrics` is for the operator: without a token it answers only requests from a loopback
    /// address that came through no proxy (no `X-Forwarded-For`); with one, also any request
    /// carrying `Authorization: Bearer <token>`. Also `BEAMDROP_METRICS_TOKEN`.
    pub metrics_token: String,
}

/// An address range (`10.0.0.0/8`) or one address (`10.0.0.7`, a range of one).
pub fn parse_net(text: &str) -> Result<ipnet::IpNet, String> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{text:?} is neither an IP address nor a CIDR range"))
}

fn proxies<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ipnet::IpNet>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|text| parse_net(text).map_err(serde::de::Error::custom))
        .collect()
}

/// `[tls]`: a certificate from PEM files, or one made at every start.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// Make a self-signed certificate for this host's names and addresses at start (and print its
    /// fingerprint) instead of reading one: HTTPS on a LAN with no CA at hand.
    pub self_signed: bool,
}

/// `[turn]`: relaying for browsers that cannot reach each other directly.
///
/// Credentials follow the TURN REST convention (`username = <expiry>:<peer id>`, `credential =
/// base64(HMAC-SHA1(secret, username))`), so the same section also drives an external coturn run
/// with `use-auth-secret` and `static-auth-secret = <secret>`: leave `listen` out and list its
/// URLs in `urls`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TurnConfig {
    /// Where the built-in server listens for STUN and TURN, UDP and TCP on the same port
    /// (3478 is the standard one). None: no built-in server, only `urls` are handed out.
    pub listen: Option<SocketAddr>,
    /// The address browsers reach the server at, put in relay candidates and in the URLs handed
    /// out. Needed when `listen` is a wildcard address.
    pub public_ip: Option<IpAddr>,
    pub realm: String,
    /// Relay ports, inclusive: one UDP port per allocation.
    pub relay_ports: [u16; 2],
    /// Shared secret of the credentials (coturn's `static-auth-secret`); every node handing out
    /// credentials for the same TURN servers needs the same one. Empty: a random secret per start
    /// (fine for one node with the built-in server). Also `BEAMDROP_TURN_SECRET`.
    pub secret: String,
    /// ICE server URLs handed out with the credentials. Empty with `listen` set: the built-in
    /// server's `stun:`, `turn:` over UDP and `turn:` over TCP at `public_ip`.
    pub urls: Vec<String>,
    /// How long a credential may start new allocations, in seconds. Allocations made in time
    /// live on (refreshed by the browser) up to `max_allocation_secs`.
    pub credential_ttl_secs: u64,
    /// Live allocations one peer id may hold (a browser makes one per network interface and
    /// transport, and new ones on an ICE restart).
    pub max_allocations_per_peer: usize,
    /// Relayed bytes per second per allocation, each direction; packets over it are dropped
    /// (UDP semantics: the peers' congestion control slows down). 0 = no limit.
    pub max_relay_bytes_per_sec: u64,
    /// Longest life of one allocation, in seconds, however often it is refreshed.
    pub max_allocation_secs: u64,
    /// Relay to and from loopback, private, link-local and other non-public addresses. Off: the
    /// relay must not become a way into the server's own network. Tests on one machine need it.
    pub allow_private_peers: bool,
    /// TURN-over-TCP connections at once, in all and from one client IP.
    pub max_tcp_connections: usize,
    pub max_tcp_connections_per_ip: usize,
}

impl Default for TurnConfig {
    fn default() -> Self {
        Self {
            listen: None,
            public_ip: None,
            realm: "beamdrop".into(),
            relay_ports: [49152, 65535],
            secret: String::new(),
            urls: Vec::new(),
            credential_ttl_secs: 600,
            max_allocations_per_peer: 10,
            max_relay_bytes_per_sec: 32 * 1024 * 1024,
            max_allocation_secs: 12 * 3600,
            allow_private_peers: false,
            max_tcp_connections: 4096,
            max_tcp_connections_per_ip: 32,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest WebSocket message accepted from a client, in bytes.
    pub max_frame_bytes: usize,
    /// Messages queued for one peer before publishers get `peer_busy`...
    pub inbox_capacity: usize,
    /// ...and bytes (signals carry up to `max_frame_bytes` each).
    pub inbox_bytes: usize,
    /// The slowest a client may read: a frame it is sent must be taken within
    /// `slow_reader_grace_secs` plus its size at this rate (bytes per second), or the socket is
    /// closed (its inbox would otherwise sit full for every sender).
    pub min_read_bytes_per_sec: usize,
    pub slow_reader_grace_secs: u64,
    /// Shares one connection may own at once.
    pub max_shares_per_peer: usize,
    /// Share records this node keeps (memory broker): live shares, and withdrawn ones their
    /// sender may still take back. At the cap the longest-withdrawn go first; only when all are
    /// live is a new share refused.
    pub max_share_records: usize,
    /// New shares one client address (IPv6: /64) may create per minute (the same at once);
    /// with the reclaim window this bounds the records one address can leave behind. 0 = no
    /// limit.
    pub share_creations_per_ip_per_min: u32,
    /// Share look-ups (the receive page, server-rendered or asked later) one address may make
    /// per minute. 0 = no limit.
    pub share_lookups_per_ip_per_min: u32,
    /// Seconds between server pings.
    pub ping_interval_secs: u64,
    /// Seconds without any frame from the client before the server closes the socket.
    pub idle_timeout_secs: u64,
    /// Deepest JSON nesting (arrays/objects) accepted in a client message; deeper is refused as
    /// `bad_message` before parsing.
    pub max_json_depth: usize,
    /// Token bucket per connection: messages a client may send at once...
    pub rate_limit_burst: u32,
    /// ...and the sustained rate, in messages per second, that refills it. 0 disables the limit.
    pub rate_limit_per_sec: u32,
    /// Rate-limited messages (each answered `rate_limited`) after which the socket is closed with
    /// close code 4005. 0 never closes.
    pub rate_limit_close_after: u32,
    /// Concurrent WebSockets from one client IP (IPv6: one /64); more are refused with HTTP 429.
    /// 0 is unlimited.
    pub max_connections_per_ip: usize,
    /// Seconds a client may take to send a request's headers (or finish a TLS handshake) before
    /// its connection is closed: a client trickling bytes cannot hold a socket for ever.
    pub header_read_timeout_secs: u64,
    /// Connections the kernel queues before they are accepted (capped by `net.core.somaxconn`).
    pub listen_backlog: u32,
    /// Open connections on this node, HTTP and WebSocket together; more are closed as they are
    /// accepted (keep it under the process's open-file limit). 0 is unlimited.
    pub max_connections: usize,
    /// Open TCP connections from one client address (IPv6: one /64), counted at accept, before
    /// any byte is read; trusted proxies are exempt. 0 is unlimited.
    pub max_http_connections_per_ip: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 3000)),
            broker: "memory://".into(),
            ice_servers: Vec::new(),
            allowed_origins: Vec::new(),
            limits: Limits::default(),
            turn: None,
            tls: None,
            trusted_proxies: Vec::new(),
            metrics_token: String::new(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 * 1024,
            inbox_capacity: 256,
            inbox_bytes: 1024 * 1024,
            min_read_bytes_per_sec: 16 * 1024,
            slow_reader_grace_secs: 5,
            max_shares_per_peer: 16,
            max_share_records: 100_000,
            share_creations_per_ip_per_min: 30,
            share_lookups_per_ip_per_min: 120,
            ping_interval_secs: 20,
            idle_timeout_secs: 60,
            max_json_depth: crate::protocol::DEFAULT_MAX_JSON_DEPTH,
            rate_limit_burst: 200,
            rate_limit_per_sec: 50,
            rate_limit_close_after: 100,
            max_connections_per_ip: 64,
            header_read_timeout_secs: 10,
            listen_backlog: 1024,
            max_connections: 16_000,
            max_http_connections_per_ip: 256,
        }
    }
}

impl Limits {
    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.ping_interval_secs.max(1))
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs.max(1))
    }
    /// How long a frame of `bytes` may wait for the client to take it (never longer than the
    /// idle timeout: a client that neither reads nor writes is gone either way).
    pub fn send_limit(&self, bytes: usize) -> Duration {
        let floor = self.min_read_bytes_per_sec.max(1) as f64;
        let at_floor = Duration::from_secs(self.slow_reader_grace_secs.max(1))
            + Duration::from_secs_f64(bytes as f64 / floor);
        at_floor.min(self.idle_timeout())
    }
    /// What the broker may hold.
    pub fn broker(&self) -> crate::server::broker::BrokerLimits {
        crate::server::broker::BrokerLimits {
            inbox: crate::server::broker::InboxLimits::new(self.inbox_capacity, self.inbox_bytes),
            max_share_records: self.max_share_records,
        }
    }
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs(self.header_read_timeout_secs.max(1))
    }
}

/// Command line; every flag also reads an environment variable.
#[derive(Debug, Parser)]
#[command(
    version,
    about = "beamdrop: peer-to-peer file sharing (the server, and a peer for terminals)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<crate::cli::Command>,
    /// Runtime config file (missing file = defaults).
    #[arg(long, env = "BEAMDROP_CONFIG", default_value = "Leptos.toml")]
    pub config: PathBuf,
    /// Listen address, e.g. 127.0.0.1:3000 (port 0 picks a free port).
    #[arg(long, env = "BEAMDROP_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Broker URI: memory://, redis://host:port or redis+unix:///path
    #[arg(long, env = "BEAMDROP_BROKER")]
    pub broker: Option<String>,
    /// ICE server URL (repeatable; comma-separated in the env var). Replaces the file's list.
    #[arg(
        long = "ice-server",
        env = "BEAMDROP_ICE_SERVERS",
        value_delimiter = ','
    )]
    pub ice_servers: Vec<String>,
    /// Extra browser origin allowed to open /ws, e.g. https://drop.example.org (repeatable;
    /// comma-separated in the env var). Replaces the file's list.
    #[arg(
        long = "allowed-origin",
        env = "BEAMDROP_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,
    /// Secret of the TURN credentials (see `[turn]` in the config file).
    #[arg(
        long = "turn-secret",
        env = "BEAMDROP_TURN_SECRET",
        hide_env_values = true
    )]
    pub turn_secret: Option<String>,
    /// PEM certificate chain: serve HTTPS (with --tls-key).
    #[arg(long = "tls-cert", env = "BEAMDROP_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long = "tls-key", env = "BEAMDROP_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Serve HTTPS with a certificate made at start for this host's names and addresses; its
    /// SHA-256 fingerprint is printed.
    #[arg(long = "self-signed", env = "BEAMDROP_SELF_SIGNED")]
    pub self_signed: bool,
    /// Reverse proxy address or CIDR range whose X-Forwarded-For is believed (repeatable;
    /// comma-separated in the env var). Replaces the file's list.
    #[arg(
        long = "trusted-proxy",
        env = "BEAMDROP_TRUSTED_PROXIES",
        value_delimiter = ',',
        value_parser = parse_net
    )]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Token that opens /metrics to requests from anywhere (Authorization: Bearer <token>).
    #[arg(
        long = "metrics-token",
        env = "BEAMDROP_METRICS_TOKEN",
        hide_env_values = true
    )]
    pub metrics_token: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
}

impl Config {
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// The file (if present), then the CLI/env overrides.
    pub fn load(cli: &Cli) -> Result<Self, ConfigError> {
        let mut config = match std::fs::read_to_string(&cli.config) {
            Ok(text) => Self::from_toml(&text).map_err(|source| ConfigError::Parse {
                path: cli.config.clone(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Config::default(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: cli.config.clone(),
                    source,
                })
            }
        };
        if let Some(listen) = cli.listen {
            config.listen = listen;
        }
        if let Some(broker) = &cli.broker {
            config.broker = broker.clone();
        }
        if !cli.ice_servers.is_empty() {
            config.ice_servers = vec![IceServer {
                urls: cli.ice_servers.clone(),
                ..Default::default()
            }];
        }
        if !cli.allowed_origins.is_empty() {
            config.allowed_origins = cli.allowed_origins.clone();
        }
        if let (Some(turn), Some(secret)) = (config.turn.as_mut(), &cli.turn_secret) {
            turn.secret = secret.clone();
        }
        if cli.tls_cert.is_some() || cli.tls_key.is_some() || cli.self_signed {
            let tls = config.tls.get_or_insert_with(TlsConfig::default);
            if cli.self_signed {
                *tls = TlsConfig {
                    self_signed: true,
                    ..TlsConfig::default()
                };
            } else {
                tls.cert = cli.tls_cert.clone().or(tls.cert.take());
                tls.key = cli.tls_key.clone().or(tls.key.take());
                tls.self_signed = false;
            }
        }
        if !cli.trusted_proxies.is_empty() {
            config.trusted_proxies = cli.trusted_proxies.clone();
        }
        if let Some(token) = &cli.metrics_token {
            config.metrics_token = token.clone();
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_leptos_toml_parses() {
        let text = include_str!("../../Leptos.toml");
        let config = Config::from_toml(text).unwrap();
        assert_eq!(config.broker, "memory://");
        assert!(config.ice_servers.is_empty());
        assert!(config.allowed_origins.is_empty());
        // The shipped file spells out the defaults; keep the two in step.
        assert_eq!(config.limits, Limits::default());
    }

    #[test]
    fn tls_and_trusted_proxies_are_read_and_bad_ranges_refused() {
        let config = Config::from_toml(
            r#"
            trusted_proxies = ["10.0.0.0/8", "127.0.0.1", "::1"]
            [tls]
            self_signed = true
            "#,
        )
        .unwrap();
        let tls = config.tls.unwrap();
        assert!(tls.self_signed && tls.cert.is_none());
        let nets: Vec<String> = config
            .trusted_proxies
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(nets, ["10.0.0.0/8", "127.0.0.1/32", "::1/128"]);
        let bad = Config::from_toml(r#"trusted_proxies = ["10.0.0.0/33"]"#).unwrap_err();
        assert!(bad.to_string().contains("neither an IP address"), "{bad}");
        // From the command line: a flag overrides the file's certificate paths.
        let cli = Cli::parse_from([
            "beamdrop",
            "--config",
            "/nonexistent/beamdrop.toml",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--trusted-proxy",
            "192.168.1.1,fd00::/8",
        ]);
        let config = Config::load(&cli).unwrap();
        let tls = config.tls.unwrap();
        assert_eq!(
            (tls.cert.unwrap(), tls.key.unwrap(), tls.self_signed),
            (PathBuf::from("c.pem"), PathBuf::from("k.pem"), false)
        );
        assert_eq!(config.trusted_proxies.len(), 2);
    }

    #[test]
    fn hostile_client_limits_are_configurable() {
        let config = Config::from_toml(
            r#"
            allowed_origins = ["https://drop.example.org"]
            [limits]
            max_json_depth = 4
            rate_limit_burst = 5
            rate_limit_per_sec = 2
            rate_limit_close_after = 10
            max_connections_per_ip = 3
            "#,
        )
        .unwrap();
        assert_eq!(config.allowed_origins, vec!["https://drop.example.org"]);
        let l = &config.limits;
        assert_eq!(
            (
                l.max_json_depth,
                l.rate_limit_burst,
                l.rate_limit_per_sec,
                l.rate_limit_close_after,
                l.max_connections_per_ip
            ),
            (4, 5, 2, 10, 3)
        );
        // Keys left out keep their defaults.
        assert_eq!(l.max_frame_bytes, Limits::default().max_frame_bytes);
        let d = Limits::default();
        assert_eq!(
            (
                d.max_json_depth,
                d.rate_limit_burst,
                d.rate_limit_per_sec,
                d.rate_limit_close_after,
                d.max_connections_per_ip
            ),
            (16, 200, 50, 100, 64)
        );
    }

    #[test]
    fn the_turn_section_is_optional_and_documented_with_its_defaults() {
        assert_eq!(Config::default().turn, None);
        let config = Config::from_toml(
            r#"
            [turn]
            listen = "0.0.0.0:3478"
            public_ip = "198.18.0.1"
            relay_ports = [50000, 50999]
            "#,
        )
        .unwrap();
        let turn = config.turn.unwrap();
        assert_eq!(turn.listen, Some("0.0.0.0:3478".parse().unwrap()));
        assert_eq!(turn.public_ip, Some("198.18.0.1".parse().unwrap()));
        assert_eq!(turn.relay_ports, [50000, 50999]);
        assert_eq!(turn.credential_ttl_secs, 600);
        assert!(!turn.allow_private_peers);
        // The commented example in the shipped file, uncommented, is the defaults.
        let shipped = include_str!("../../Leptos.toml");
        let section: String = shipped
            .lines()
            .skip_while(|l| !l.starts_with("# [turn]"))
            .take_while(|l| l.starts_with('#'))
            .map(|l| l.trim_start_matches('#').trim_start())
            .filter(|l| !l.starts_with("listen") && !l.starts_with("public_ip"))
            .collect::<Vec<_>>()
            .join("\n");
        let example = Config::from_toml(&section).unwrap().turn.unwrap();
        assert_eq!(example, TurnConfig::default());
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(Config::from_toml("lisen = \"127.0.0.1:1\"").is_err());
    }

    #[test]
    fn flags_override_the_file() {
        let cli = Cli::parse_from([
            "beamdrop",
            "--config",
            "/nonexistent/Leptos.toml",
            "--listen",
            "127.0.0.1:0",
            "--ice-server",
            "stun:127.0.0.1:3478",
            "--allowed-origin",
            "https://a.example,https://b.example",
        ]);
        let config = Config::load(&cli).unwrap();
        assert_eq!(config.listen.port(), 0);
        assert_eq!(config.ice_servers[0].urls, vec!["stun:127.0.0.1:3478"]);
        assert_eq!(
            config.allowed_origins,
            vec!["https://a.example", "https://b.example"]
        );
        assert_eq!(config.limits, Limits::default());
    }
}
