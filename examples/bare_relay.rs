//! The floor for `scripts/bench-broker`'s relay numbers: the least a relay speaking beamdrop's
//! wire protocol can do on this machine. Same transport as the real server (one WebSocket over
//! TCP per peer, tokio, tungstenite, serde_json, TCP_NODELAY), none of its work beyond moving
//! messages: no axum/hyper upgrade, no limits, no introductions check, no metrics, no keep-alive,
//! no clean-up of shares. It exists so the benchmark can report, side by side in one run, how much
//! of the server's CPU per message any relay on this transport pays (the kernel's TCP work, one
//! receive and one send per message) and how much is beamdrop's own.
//!
//! Not a server to deploy: it trusts every client. Loopback only (it refuses other addresses).
//!
//! `cargo run --release --features ssr --example bare_relay -- --listen 127.0.0.1:0`

use beamdrop::protocol::{ClaimToken, ClientMsg, PeerId, ServerMsg, ShareId};
use clap::Parser;
use dashmap::DashMap;
use futures::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
#[command(
    about = "Minimal relay on beamdrop's wire protocol: the benchmark's floor (loopback only)"
)]
struct Cli {
    /// Address to listen on; must be on 127.0.0.0/8.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
}

#[derive(Default)]
struct Tables {
    peers: DashMap<PeerId, mpsc::UnboundedSender<ServerMsg>>,
    shares: DashMap<ShareId, PeerId>,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let cli = Cli::parse();
    if !cli.listen.ip().is_loopback() {
        eprintln!("bare_relay: {} is not a loopback address", cli.listen);
        std::process::exit(2);
    }
    let listener = TcpListener::bind(cli.listen).await?;
    // The same line the real server prints, which the benchmark scripts wait for.
    eprintln!("listening on http://{}", listener.local_addr()?);
    let tables = Arc::new(Tables::default());
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(peer(stream, tables.clone()));
    }
}

async fn peer(stream: TcpStream, tables: Arc<Tables>) {
    if stream.set_nodelay(true).is_err() {
        return;
    }
    // 4 KiB: tungstenite zero-fills its read buffer up to this size before every read, so its
    // 128 KiB default would cost this relay more than all its real work.
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    let me = PeerId::new_random();
    let (tx, mut inbox) = mpsc::unbounded_channel();
    tables.peers.insert(me, tx);
    let welcome = ServerMsg::Welcome {
        you: me,
        ice_servers: Vec::new(),
    };
    let mut out = Some(welcome);
    loop {
        if let Some(msg) = out.take() {
            let Ok(text) = serde_json::to_string(&msg) else {
                break;
            };
            if ws.send(Message::text(text)).await.is_err() {
                break;
            }
        }
        tokio::select! {
            frame = ws.next() => {
                let text = match frame {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(_)) => continue,
                    _ => break,
                };
                let Ok(msg) = serde_json::from_str::<ClientMsg>(&text) else {
                    continue;
                };
                out = handle(&tables, me, msg);
            }
            msg = inbox.recv() => out = msg,
        }
    }
    tables.peers.remove(&me);
}

/// A reply to this peer, if any; everything else goes straight into other peers' inboxes.
fn handle(tables: &Tables, me: PeerId, msg: ClientMsg) -> Option<ServerMsg> {
    let to_peer = |peer: &PeerId, msg: ServerMsg| {
        if let Some(tx) = tables.peers.get(peer) {
            let _ = tx.send(msg);
        }
    };
    match msg {
        ClientMsg::CreateShare => {
            let share = ShareId::new_random();
            tables.shares.insert(share.clone(), me);
            Some(ServerMsg::ShareCreated {
                share,
                token: ClaimToken::new_random(),
            })
        }
        ClientMsg::Join { share } => {
            let sender = *tables.shares.get(&share)?;
            to_peer(
                &sender,
                ServerMsg::PeerJoined {
                    share: share.clone(),
                    peer: me,
                },
            );
            Some(ServerMsg::Joined { share, sender })
        }
        ClientMsg::Signal { to, payload } => {
            to_peer(&to, ServerMsg::Signal { from: me, payload });
            None
        }
        ClientMsg::Ping => Some(ServerMsg::Pong),
        ClientMsg::ReclaimShare { .. } => None,
    }
}
