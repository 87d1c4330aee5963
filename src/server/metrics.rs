//! Broker metrics: plain atomics (no lock anywhere), rendered as Prometheus text at `/metrics`.
//!
//! Every refusal the server makes is counted once in `beamdrop_rejections_total{reason}`, whether
//! it happened before the upgrade (origin, per-IP cap), on a frame (oversize, binary, too deep,
//! bad message, rate limit) or in the broker (unknown peer, no such share, busy inbox).

use super::broker::BrokerError;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// Declares a label enum with its Prometheus label values, in declaration order.
macro_rules! labels {
    ($(#[$meta:meta])* $name:ident {
        $($(#[$vmeta:meta])* $variant:ident => $label:literal),+ $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub const COUNT: usize = $name::ALL.len();

            pub fn label(self) -> &'static str {
                match self { $($name::$variant => $label),+ }
            }
        }
    };
}

labels! {
    /// Why the server refused a connection, a frame or a message.
    Rejection {
        BadMessage => "bad_message",
        TooDeep => "too_deep",
        RateLimited => "rate_limited",
        UnknownPeer => "unknown_peer",
        NoSuchShare => "no_such_share",
        PeerBusy => "peer_busy",
        TooManyShares => "too_many_shares",
        /// A new share refused: the node keeps `max_share_records`, all of them live.
        ShareRecordsFull => "share_records_full",
        /// A new share refused: its address made `share_creations_per_ip_per_min` already.
        ShareRate => "share_rate",
        /// A share look-up refused: its address made `share_lookups_per_ip_per_min` already.
        LookupRate => "lookup_rate",
        /// A share reclaim with the wrong token, or for a share long gone.
        ReclaimRefused => "reclaim_refused",
        Internal => "internal",
        OversizeFrame => "oversize_frame",
        BinaryFrame => "binary_frame",
        /// A WebSocket protocol violation (unmasked frame, invalid UTF-8 text...).
        BadFrame => "bad_frame",
        Origin => "origin",
        IpCap => "ip_cap",
        /// A TCP connection closed at accept: the node holds `max_connections` already.
        ConnectionCap => "connection_cap",
        /// A TCP connection closed at accept: its address holds `max_http_connections_per_ip`.
        ConnectionIpCap => "connection_ip_cap",
        /// A connection closed for sending its request headers (or TLS handshake) too slowly.
        HeaderTimeout => "header_timeout",
        /// An HTTP connection closed after `header_read_timeout_secs` with no request under way
        /// and no byte either way (never sent one, or an idle keep-alive).
        IdleConnection => "idle_connection",
        /// `/metrics` asked for from elsewhere than loopback without the metrics token.
        MetricsRefused => "metrics_refused",
        IdleTimeout => "idle_timeout",
        RegistrationFailed => "registration_failed",
    }
}

labels! {
    /// How a socket session ended.
    Disconnect {
        /// The client closed, vanished or stopped reading.
        Client => "client",
        IdleTimeout => "idle_timeout",
        BadFrame => "bad_frame",
        RateLimited => "rate_limited",
        /// The client took what it was sent slower than `min_read_bytes_per_sec`.
        SlowReader => "slow_reader",
        Shutdown => "shutdown",
        RegistrationFailed => "registration_failed",
    }
}

labels! {
    /// What became of a `join`.
    JoinOutcome {
        Ok => "ok",
        NoSuchShare => "no_such_share",
        Error => "error",
    }
}

labels! {
    /// What the built-in TURN server refused or dropped.
    TurnRefusal {
        /// A username that is not `<expiry>:<peer id>`.
        BadUsername => "bad_username",
        /// A new allocation with an expired credential.
        Expired => "expired",
        /// A peer over its live allocations.
        AllocationQuota => "allocation_quota",
        /// A packet to or from a loopback, private or link-local address (dropped).
        PrivatePeer => "private_peer",
        /// A packet over its allocation's bytes per second (dropped).
        RateLimited => "rate_limited",
        /// An allocation at its longest life.
        Lifetime => "lifetime",
        /// No free port in `relay_ports`.
        NoRelayPort => "no_relay_port",
        /// A TURN-over-TCP connection over the caps.
        TcpCap => "tcp_cap",
        /// A TCP stream carrying something else than STUN or ChannelData (cut).
        TcpFraming => "tcp_framing",
    }
}

/// Gauges kept up by [`GaugeGuard`]s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gauge {
    PeersConnected,
    Shares,
    /// Live relay allocations on this node's TURN server.
    TurnAllocations,
    /// Accepted TCP connections not (yet) upgraded to a WebSocket.
    HttpConnections,
}

#[derive(Debug, Default)]
pub struct Metrics {
    peers_connected: AtomicI64,
    http_connections: AtomicI64,
    shares: AtomicI64,
    connections: AtomicU64,
    messages_received: AtomicU64,
    messages_relayed: AtomicU64,
    shares_created: AtomicU64,
    shares_reclaimed: AtomicU64,
    backend_errors: AtomicU64,
    rejections: [AtomicU64; Rejection::COUNT],
    disconnects: [AtomicU64; Disconnect::COUNT],
    joins: [AtomicU64; JoinOutcome::COUNT],
    turn_allocations: AtomicI64,
    turn_allocations_made: AtomicU64,
    turn_relayed_bytes: AtomicU64,
    turn_refusals: [AtomicU64; TurnRefusal::COUNT],
}

/// Holds a gauge up by one while it lives: dropped on every exit path, panics and aborts included.
#[derive(Debug)]
pub struct GaugeGuard {
    metrics: Arc<Metrics>,
    gauge: Gauge,
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.metrics.gauge(self.gauge).fetch_sub(1, Relaxed);
    }
}

impl Metrics {
    fn gauge(&self, gauge: Gauge) -> &AtomicI64 {
        match gauge {
            Gauge::PeersConnected => &self.peers_connected,
            Gauge::Shares => &self.shares,
            Gauge::TurnAllocations => &self.turn_allocations,
            Gauge::HttpConnections => &self.http_connections,
        }
    }

    /// Raises `gauge` until the returned guard drops.
    pub fn track(self: &Arc<Self>, gauge: Gauge) -> GaugeGuard {
        self.gauge(gauge).fetch_add(1, Relaxed);
        GaugeGuard {
            metrics: self.clone(),
            gauge,
        }
    }

    pub fn reject(&self, reason: Rejection) {
        self.rejections[reason as usize].fetch_add(1, Relaxed);
    }

    pub fn disconnect(&self, cause: Disconnect) {
        self.disconnects[cause as usize].fetch_add(1, Relaxed);
    }

    pub fn join(&self, outcome: JoinOutcome) {
        self.joins[outcome as usize].fetch_add(1, Relaxed);
    }

    /// A WebSocket upgrade was accepted.
    pub fn turn_refuse(&self, why: TurnRefusal) {
        self.turn_refusals[why as usize].fetch_add(1, Relaxed);
    }

    pub fn turn_refusals(&self, why: TurnRefusal) -> u64 {
        self.turn_refusals[why as usize].load(Relaxed)
    }

    /// A relay allocation was made.
    pub fn turn_allocation(&self) {
        self.turn_allocations_made.fetch_add(1, Relaxed);
    }

    /// Bytes relayed (either direction).
    pub fn turn_relayed(&self, bytes: usize) {
        self.turn_relayed_bytes.fetch_add(bytes as u64, Relaxed);
    }

    pub fn turn_relayed_bytes(&self) -> u64 {
        self.turn_relayed_bytes.load(Relaxed)
    }

    pub fn connection(&self) {
        self.connections.fetch_add(1, Relaxed);
    }

    /// A text frame arrived from a client.
    pub fn message_received(&self) {
        self.messages_received.fetch_add(1, Relaxed);
    }

    /// A signal was handed to the broker for its target.
    pub fn message_relayed(&self) {
        self.messages_relayed.fetch_add(1, Relaxed);
    }

    pub fn share_created(&self) {
        self.shares_created.fetch_add(1, Relaxed);
    }

    /// A sender took its share back after reconnecting.
    pub fn share_reclaimed(&self) {
        self.shares_reclaimed.fetch_add(1, Relaxed);
    }

    pub fn shares_reclaimed(&self) -> u64 {
        self.shares_reclaimed.load(Relaxed)
    }

    /// Counts backplane failures (`BrokerError::Backend`); other broker errors are rejections.
    pub fn broker_error(&self, e: &BrokerError) {
        if matches!(e, BrokerError::Backend(_)) {
            self.backend_errors.fetch_add(1, Relaxed);
        }
    }

    pub fn rejections(&self, reason: Rejection) -> u64 {
        self.rejections[reason as usize].load(Relaxed)
    }

    pub fn disconnects(&self, cause: Disconnect) -> u64 {
        self.disconnects[cause as usize].load(Relaxed)
    }

    pub fn joins(&self, outcome: JoinOutcome) -> u64 {
        self.joins[outcome as usize].load(Relaxed)
    }

    pub fn gauge_value(&self, gauge: Gauge) -> i64 {
        self.gauge(gauge).load(Relaxed)
    }

    pub fn backend_errors(&self) -> u64 {
        self.backend_errors.load(Relaxed)
    }

    pub fn messages_relayed(&self) -> u64 {
        self.messages_relayed.load(Relaxed)
    }

    /// The Prometheus text exposition format (version 0.0.4).
    /// `inbox_bytes`: what the broker's inboxes on this node hold now; `share_records`: the
    /// share records it keeps (if it keeps them itself).
    pub fn render(&self, inbox_bytes: usize, share_records: Option<usize>) -> String {
        let mut out = String::with_capacity(4096);
        let mut single = |name: &str, kind: &str, help: &str, value: String| {
            single_into(&mut out, name, kind, help, value)
        };
        single(
            "beamdrop_inbox_bytes",
            "gauge",
            "Bytes of messages waiting in this node's peer inboxes.",
            inbox_bytes.to_string(),
        );
        if let Some((overflows, drops)) = listen_queue_counters() {
            single(
                "beamdrop_listen_overflows_total",
                "counter",
                "Connections the kernel turned away because a listen queue was full (TcpExt \
                 ListenOverflows: every listener of this host or network namespace).",
                overflows.to_string(),
            );
            single(
                "beamdrop_listen_drops_total",
                "counter",
                "SYNs the kernel dropped at a listener, overflows included (TcpExt ListenDrops, \
                 host or network namespace).",
                drops.to_string(),
            );
        }
        if let Some(records) = share_records {
            single(
                "beamdrop_share_records",
                "gauge",
                "Share records kept on this node: live shares and withdrawn ones still reclaimable.",
                records.to_string(),
            );
        }
        single(
            "beamdrop_peers_connected",
            "gauge",
            "Peers with a registered signaling socket on this node.",
            self.peers_connected.load(Relaxed).to_string(),
        );
        single(
            "beamdrop_http_connections",
            "gauge",
            "Accepted TCP connections serving HTTP (WebSockets count in peers_connected).",
            self.http_connections.load(Relaxed).to_string(),
        );
        single(
            "beamdrop_shares",
            "gauge",
            "Live shares owned by peers on this node.",
            self.shares.load(Relaxed).to_string(),
        );
        single(
            "beamdrop_connections_total",
            "counter",
            "WebSocket upgrades accepted.",
            self.connections.load(Relaxed).to_string(),
        );
        single(
            "beamdrop_messages_received_total",
            "counter",
            "Text frames received from clients.",
            self.messages_received.load(Relaxed).to_string(),
        );
        single(
            "beamdrop_messages_relayed_total",
            "counter",
            "Signals handed to the broker for their target.",
            self.messages_relayed.load(Relaxed).to_string(),
        );
        single(
            "beamdrop_shares_created_total",
            "counter",
            "Shares created.",
            self.shares_created.load(Relaxed).to_string(),
        );
        single(
            "beamdrop_shares_reclaimed_total",
            "counter",
            "Shares taken back by their sender after a reconnect.",
            self.shares_reclaimed.load(Relaxed).to_string(),
        );
        single(
            "beamdrop_backend_errors_total",
            "counter",
            "Broker backend (backplane) failures.",
            self.backend_errors.load(Relaxed).to_string(),
        );
        labelled(
            &mut out,
            "beamdrop_rejections_total",
            "Connections, frames and messages refused, by reason.",
            "reason",
            Rejection::ALL
                .iter()
                .map(|r| (r.label(), self.rejections(*r))),
        );
        labelled(
            &mut out,
            "beamdrop_disconnects_total",
            "Socket sessions ended, by cause.",
            "cause",
            Disconnect::ALL
                .iter()
                .map(|d| (d.label(), self.disconnects(*d))),
        );
        labelled(
            &mut out,
            "beamdrop_joins_total",
            "Share joins, by outcome.",
            "outcome",
            JoinOutcome::ALL.iter().map(|j| (j.label(), self.joins(*j))),
        );
        single_into(
            &mut out,
            "beamdrop_turn_allocations",
            "gauge",
            "Live relay allocations on this node's TURN server.",
            self.turn_allocations.load(Relaxed).to_string(),
        );
        single_into(
            &mut out,
            "beamdrop_turn_allocations_total",
            "counter",
            "Relay allocations made.",
            self.turn_allocations_made.load(Relaxed).to_string(),
        );
        single_into(
            &mut out,
            "beamdrop_turn_relayed_bytes_total",
            "counter",
            "Bytes relayed between browsers and their peers, both directions.",
            self.turn_relayed_bytes().to_string(),
        );
        labelled(
            &mut out,
            "beamdrop_turn_refusals_total",
            "TURN requests refused and relayed packets dropped, by reason.",
            "reason",
            TurnRefusal::ALL
                .iter()
                .map(|r| (r.label(), self.turn_refusals(*r))),
        );
        out
    }
}

fn single_into(out: &mut String, name: &str, kind: &str, help: &str, value: String) {
    let _ = write!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
    );
}

fn labelled<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    values: impl Iterator<Item = (&'a str, u64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (value, count) in values {
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {count}");
    }
}

/// The kernel's listen-queue counters (`ListenOverflows`, `ListenDrops` from `/proc/net/netstat`).
/// Linux counts them per network namespace, not per socket: a node alone in its namespace (a
/// container) sees its own; beside other listeners, theirs too. `None` where there is no such
/// file.
pub fn listen_queue_counters() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    parse_listen_counters(&text)
}

fn parse_listen_counters(netstat: &str) -> Option<(u64, u64)> {
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let pairs: std::collections::HashMap<&str, &str> = names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .collect();
    let get = |name: &str| pairs.get(name)?.parse::<u64>().ok();
    Some((get("ListenOverflows")?, get("ListenDrops")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_enums_index_their_arrays() {
        for (i, r) in Rejection::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        for (i, d) in Disconnect::ALL.iter().enumerate() {
            assert_eq!(*d as usize, i);
        }
        for (i, j) in JoinOutcome::ALL.iter().enumerate() {
            assert_eq!(*j as usize, i);
        }
        for (i, t) in TurnRefusal::ALL.iter().enumerate() {
            assert_eq!(*t as usize, i);
        }
    }

    #[test]
    fn gauges_follow_their_guards() {
        let m = Arc::new(Metrics::default());
        let a = m.track(Gauge::PeersConnected);
        let b = m.track(Gauge::PeersConnected);
        let s = m.track(Gauge::Shares);
        assert_eq!(m.gauge_value(Gauge::PeersConnected), 2);
        assert_eq!(m.gauge_value(Gauge::Shares), 1);
        drop(a);
        drop(s);
        assert_eq!(m.gauge_value(Gauge::PeersConnected), 1);
        assert_eq!(m.gauge_value(Gauge::Shares), 0);
        drop(b);
        assert_eq!(m.gauge_value(Gauge::PeersConnected), 0);
    }

    #[test]
    fn only_backend_errors_count_as_backend_errors() {
        let m = Metrics::default();
        m.broker_error(&BrokerError::UnknownPeer);
        m.broker_error(&BrokerError::PeerBusy);
        assert_eq!(m.backend_errors(), 0);
        m.broker_error(&BrokerError::Backend("connection refused".into()));
        assert_eq!(m.backend_errors(), 1);
    }

    #[test]
    fn renders_prometheus_text() {
        let m = Arc::new(Metrics::default());
        let _peer = m.track(Gauge::PeersConnected);
        m.reject(Rejection::BadMessage);
        m.reject(Rejection::BadMessage);
        m.reject(Rejection::IpCap);
        m.disconnect(Disconnect::RateLimited);
        m.join(JoinOutcome::NoSuchShare);
        m.message_relayed();
        m.share_reclaimed();
        let _relay = m.track(Gauge::TurnAllocations);
        m.turn_relayed(1200);
        m.turn_refuse(TurnRefusal::PrivatePeer);
        let text = m.render(4096, Some(7));
        for line in [
            "# TYPE beamdrop_peers_connected gauge",
            "beamdrop_peers_connected 1",
            "beamdrop_inbox_bytes 4096",
            "beamdrop_share_records 7",
            "beamdrop_shares 0",
            "beamdrop_messages_relayed_total 1",
            "beamdrop_shares_reclaimed_total 1",
            "# TYPE beamdrop_rejections_total counter",
            "beamdrop_rejections_total{reason=\"bad_message\"} 2",
            "beamdrop_rejections_total{reason=\"ip_cap\"} 1",
            "beamdrop_rejections_total{reason=\"too_deep\"} 0",
            "beamdrop_disconnects_total{cause=\"rate_limited\"} 1",
            "beamdrop_joins_total{outcome=\"no_such_share\"} 1",
            "beamdrop_backend_errors_total 0",
            "# TYPE beamdrop_turn_allocations gauge",
            "beamdrop_turn_allocations 1",
            "beamdrop_turn_relayed_bytes_total 1200",
            "beamdrop_turn_refusals_total{reason=\"private_peer\"} 1",
            "beamdrop_turn_refusals_total{reason=\"expired\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // Every sample line is `name[{labels}] value`, and every metric has HELP and TYPE.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = l.rsplit_once(' ').unwrap();
            assert!(name.starts_with("beamdrop_"), "{l}");
            value.parse::<i64>().unwrap();
        }
        assert_eq!(
            text.matches("# HELP ").count(),
            text.matches("# TYPE ").count()
        );
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn listen_queue_counters_are_read_from_netstat() {
        let netstat = "TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPHPHits\n\
                       TcpExt: 0 17 19 5\n\
                       IpExt: InNoRoutes\n\
                       IpExt: 0\n";
        assert_eq!(parse_listen_counters(netstat), Some((17, 19)));
        assert_eq!(parse_listen_counters("IpExt: A\nIpExt: 1\n"), None);
        assert_eq!(
            parse_listen_counters("TcpExt: ListenOverflows\nTcpExt: x\n"),
            None
        );
    }
}
