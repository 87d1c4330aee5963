//! The built-in STUN/TURN server, driven by the `turn` crate's own client over real sockets on
//! 127.0.0.1: a peer's credentials from its `welcome` allocate a relay that carries packets both
//! ways; loopback peers are refused unless allowed; wrong, expired and over-quota credentials are
//! refused and counted; STUN over TCP answers; the same credentials work against coturn.

mod common;

use beamdrop::protocol::{IceServer, PeerId, ServerMsg};
use beamdrop::server::config::{Config, TurnConfig};
use beamdrop::server::turn::credentials::Issuer;
use common::*;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;
use turn::client::{Client, ClientConfig};
use webrtc_util::Conn;

const SECRET: &str = "integration-secret";

fn turn_config(allow_private_peers: bool) -> Config {
    Config {
        turn: Some(TurnConfig {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            relay_ports: [40000, 40999],
            secret: SECRET.into(),
            allow_private_peers,
            max_allocations_per_peer: 2,
            ..TurnConfig::default()
        }),
        ..config()
    }
}

/// This peer's TURN entry from its welcome.
async fn credentials(addr: SocketAddr) -> (PeerId, IceServer) {
    let mut ws = open(addr).await.unwrap();
    match recv(&mut ws).await {
        ServerMsg::Welcome { you, ice_servers } => {
            let turn = ice_servers
                .into_iter()
                .find(IceServer::relays)
                .expect("a TURN entry in the welcome");
            (you, turn)
        }
        other => panic!("expected welcome, got {other:?}"),
    }
}

async fn client(turn_addr: SocketAddr, username: &str, password: &str) -> Client {
    let conn = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let client = Client::new(ClientConfig {
        stun_serv_addr: turn_addr.to_string(),
        turn_serv_addr: turn_addr.to_string(),
        username: username.into(),
        password: password.into(),
        realm: "beamdrop".into(),
        software: String::new(),
        rto_in_ms: 0,
        conn: Arc::new(conn),
        vnet: None,
    })
    .await
    .unwrap();
    client.listen().await.unwrap();
    client
}

async fn metric(addr: SocketAddr, line_start: &str) -> u64 {
    let text = http_get(addr, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in /metrics"))
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// A packet out through `relay` to a socket outside, and its answer back in.
async fn relays_both_ways(relay: &impl Conn) {
    let relay_addr = relay.local_addr().unwrap();
    let outside = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let outside_addr = outside.local_addr().unwrap();
    relay
        .send_to(b"through the relay", outside_addr)
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = timeout(Duration::from_secs(5), outside.recv_from(&mut buf))
        .await
        .expect("the packet came out of the relay")
        .unwrap();
    assert_eq!(&buf[..n], b"through the relay");
    assert_eq!(from, relay_addr);
    // Back: the permission made by sending lets the answer in.
    outside.send_to(b"and back", relay_addr).await.unwrap();
    let (n, from) = timeout(Duration::from_secs(5), relay.recv_from(&mut buf))
        .await
        .expect("the answer came back through the relay")
        .unwrap();
    assert_eq!(&buf[..n], b"and back");
    assert_eq!(from, outside_addr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_welcome_credential_relays_both_ways() {
    let server = server_with(turn_config(true)).await;
    let turn_addr = server.turn_addr.unwrap();
    let (peer, entry) = credentials(server.addr).await;
    let port = turn_addr.port();
    assert_eq!(
        entry.urls,
        vec![
            format!("stun:127.0.0.1:{port}"),
            format!("turn:127.0.0.1:{port}?transport=udp"),
            format!("turn:127.0.0.1:{port}?transport=tcp"),
        ]
    );
    let username = entry.username.unwrap();
    assert!(username.ends_with(&format!(":{peer}")), "{username}");

    let c = client(turn_addr, &username, &entry.credential.unwrap()).await;
    let relay = c
        .allocate()
        .await
        .expect("allocation with the welcome's credential");
    let relay_addr = relay.local_addr().unwrap();
    assert_eq!(relay_addr.ip().to_string(), "127.0.0.1");
    assert!((40000..=40999).contains(&relay_addr.port()));
    assert_eq!(metric(server.addr, "beamdrop_turn_allocations ").await, 1);

    relays_both_ways(&relay).await;
    assert_eq!(
        metric(server.addr, "beamdrop_turn_relayed_bytes_total ").await,
        (b"through the relay".len() + b"and back".len()) as u64
    );
    c.close().await.unwrap();
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_peers_are_refused_by_default() {
    let server = server_with(turn_config(false)).await;
    let (_, entry) = credentials(server.addr).await;
    let c = client(
        server.turn_addr.unwrap(),
        &entry.username.unwrap(),
        &entry.credential.unwrap(),
    )
    .await;
    let relay = c.allocate().await.unwrap();
    let outside = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    relay
        .send_to(b"into the server's network", outside.local_addr().unwrap())
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let got = timeout(Duration::from_millis(500), outside.recv_from(&mut buf)).await;
    assert!(got.is_err(), "the relay sent to a loopback address");
    outside
        .send_to(b"knock", relay.local_addr().unwrap())
        .await
        .unwrap();
    let mut deadline = 50;
    while metric(
        server.addr,
        "beamdrop_turn_refusals_total{reason=\"private_peer\"} ",
    )
    .await
        < 2
    {
        deadline -= 1;
        assert!(deadline > 0, "refusals not counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metric(server.addr, "beamdrop_turn_relayed_bytes_total ").await,
        0
    );
    c.close().await.unwrap();
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_expired_and_over_quota_credentials_are_refused() {
    let server = server_with(turn_config(true)).await;
    let turn_addr = server.turn_addr.unwrap();
    let (peer, entry) = credentials(server.addr).await;
    let username = entry.username.unwrap();

    // A wrong password: the integrity check fails.
    let c = client(turn_addr, &username, "not-the-credential").await;
    assert!(c.allocate().await.is_err());
    c.close().await.unwrap();

    // A credential minted with the right secret but expired an hour ago.
    let issuer = Issuer::new(SECRET.as_bytes(), Duration::from_secs(600), vec![]);
    let old = issuer.ice_server(peer, SystemTime::now() - Duration::from_secs(3600));
    let c = client(turn_addr, &old.username.unwrap(), &old.credential.unwrap()).await;
    assert!(c.allocate().await.is_err());
    c.close().await.unwrap();
    assert!(
        metric(
            server.addr,
            "beamdrop_turn_refusals_total{reason=\"expired\"} "
        )
        .await
            >= 1
    );

    // Two allocations per peer (the config): a third client address is refused.
    let password = entry.credential.unwrap();
    let mut live = Vec::new();
    for _ in 0..2 {
        let c = client(turn_addr, &username, &password).await;
        let relay = match c.allocate().await {
            Ok(relay) => relay,
            Err(e) => panic!(
                "within the quota: {e}\n{}",
                http_get(server.addr, "/metrics").await
            ),
        };
        live.push((c, relay));
    }
    let c = client(turn_addr, &username, &password).await;
    assert!(
        c.allocate().await.is_err(),
        "a third allocation for one peer"
    );
    assert!(
        metric(
            server.addr,
            "beamdrop_turn_refusals_total{reason=\"allocation_quota\"} "
        )
        .await
            >= 1
    );
    c.close().await.unwrap();
    for (c, _) in live {
        c.close().await.unwrap();
    }
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stun_answers_over_tcp_and_junk_is_cut() {
    use stun::message::Getter;
    use stun::message::{Message, BINDING_REQUEST, BINDING_SUCCESS};
    use stun::xoraddr::XorMappedAddress;
    let server = server_with(turn_config(true)).await;
    let turn_addr = server.turn_addr.unwrap();
    let mut tcp = TcpStream::connect(turn_addr).await.unwrap();
    let mut request = Message::new();
    request
        .build(&[
            Box::new(stun::agent::TransactionId::new()),
            Box::new(BINDING_REQUEST),
        ])
        .unwrap();
    tcp.write_all(&request.raw).await.unwrap();
    let mut header = [0u8; 20];
    timeout(Duration::from_secs(5), tcp.read_exact(&mut header))
        .await
        .expect("a binding response over TCP")
        .unwrap();
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let mut raw = header.to_vec();
    raw.resize(20 + len, 0);
    tcp.read_exact(&mut raw[20..]).await.unwrap();
    let mut response = Message::new();
    response.raw = raw;
    response.decode().unwrap();
    assert_eq!(response.typ, BINDING_SUCCESS);
    assert_eq!(response.transaction_id, request.transaction_id);
    let mut mapped = XorMappedAddress::default();
    mapped.get_from(&response).unwrap();
    assert_eq!(
        SocketAddr::new(mapped.ip, mapped.port),
        tcp.local_addr().unwrap()
    );

    // Not STUN, not ChannelData: the stream is cut and counted.
    let mut junk = TcpStream::connect(turn_addr).await.unwrap();
    junk.write_all(&[0xff; 64]).await.unwrap();
    let mut buf = [0u8; 8];
    let n = timeout(Duration::from_secs(5), junk.read(&mut buf))
        .await
        .expect("the junk stream was closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(
        metric(
            server.addr,
            "beamdrop_turn_refusals_total{reason=\"tcp_framing\"} "
        )
        .await,
        1
    );
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_turn_section_no_credentials() {
    let server = server().await;
    assert!(server.turn_addr.is_none());
    let mut ws = open(server.addr).await.unwrap();
    match recv(&mut ws).await {
        ServerMsg::Welcome { ice_servers, .. } => assert!(ice_servers.is_empty()),
        other => panic!("expected welcome, got {other:?}"),
    }
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_peer_gets_fresh_credentials_before_its_expire() {
    let mut config = turn_config(true);
    if let Some(turn) = config.turn.as_mut() {
        turn.credential_ttl_secs = 2;
    }
    config.limits.ping_interval_secs = 1;
    config.limits.idle_timeout_secs = 30;
    let server = server_with(config).await;
    let (mut ws, first) = {
        let mut ws = open(server.addr).await.unwrap();
        match recv(&mut ws).await {
            ServerMsg::Welcome { ice_servers, .. } => (ws, ice_servers),
            other => panic!("expected welcome, got {other:?}"),
        }
    };
    let expiry = |servers: &[IceServer]| -> u64 {
        let user = servers[0].username.clone().unwrap();
        user.split_once(':').unwrap().0.parse().unwrap()
    };
    let fresh = loop {
        match timeout(Duration::from_secs(5), recv(&mut ws)).await {
            Ok(ServerMsg::IceServers { ice_servers }) => break ice_servers,
            Ok(_) => continue,
            Err(_) => panic!("no fresh ICE servers within 5 s"),
        }
    };
    assert!(expiry(&fresh) > expiry(&first), "{fresh:?} vs {first:?}");
    assert_eq!(fresh[0].urls, first[0].urls);
    stop(server).await;
}

/// The welcome's credentials against a real coturn run with `use-auth-secret` and the same
/// `static-auth-secret` (no built-in server: `[turn]` lists coturn's URL): a deployment can put
/// coturn nodes behind the same config. A wrong password is refused by coturn too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_credentials_work_against_coturn() {
    let port = {
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let dir = std::env::temp_dir().join(format!("beamdrop-coturn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut coturn = std::process::Command::new("turnserver")
        .args([
            "-c",
            "/dev/null",
            "-n",
            "--no-cli",
            "--no-tls",
            "--no-dtls",
            "--simple-log",
        ])
        .arg("--listening-ip=127.0.0.1")
        .arg(format!("--listening-port={port}"))
        .arg("--relay-ip=127.0.0.1")
        .args([
            "--min-port=41000",
            "--max-port=41999",
            "--allow-loopback-peers",
        ])
        .args([
            "--use-auth-secret",
            &format!("--static-auth-secret={SECRET}"),
        ])
        .arg("--realm=beamdrop")
        .arg(format!("--db={}", dir.join("turndb").display()))
        .arg(format!("--log-file={}", dir.join("turn.log").display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("turnserver (Debian's coturn; scripts/setup.sh installs it) starts");
    let coturn_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let server = server_with(Config {
        turn: Some(TurnConfig {
            listen: None,
            urls: vec![format!("turn:{coturn_addr}?transport=udp")],
            secret: SECRET.into(),
            ..TurnConfig::default()
        }),
        ..config()
    })
    .await;
    assert_eq!(server.turn_addr, None, "no built-in server");
    let (peer, entry) = credentials(server.addr).await;
    assert_eq!(
        entry.urls,
        vec![format!("turn:{coturn_addr}?transport=udp")]
    );
    let (username, password) = (entry.username.unwrap(), entry.credential.unwrap());
    assert!(username.ends_with(&format!(":{peer}")), "{username}");

    // coturn takes a moment to listen.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (c, relay) = loop {
        let c = client(coturn_addr, &username, &password).await;
        match timeout(Duration::from_secs(2), c.allocate()).await {
            Ok(Ok(relay)) => break (c, relay),
            other => {
                let why = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => "no answer".to_string(),
                };
                c.close().await.unwrap();
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "coturn refused the welcome's credential: {why}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    relays_both_ways(&relay).await;
    c.close().await.unwrap();

    let wrong = client(coturn_addr, &username, "d3JvbmcgcGFzc3dvcmQ=").await;
    assert!(
        wrong.allocate().await.is_err(),
        "coturn allocated with a wrong password"
    );
    wrong.close().await.unwrap();
    stop(server).await;
    let _ = coturn.kill();
    let _ = coturn.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
