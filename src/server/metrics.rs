//! Broker metrics at `/metrics`, in the OpenMetrics text format (prometheus-client).
//!
//! Every refusal the server makes is counted once in `beamdrop_rejections_total{reason}`, whether
//! it happened before the upgrade (origin, per-IP cap), on a frame (oversize, binary, too deep,
//! bad message, rate limit) or in the broker (unknown peer, no such share, busy inbox).
//!
//! Counters and gauges are atomics; a labelled family takes an uncontended read lock to find
//! its (pre-created) label's counter. Figures sampled at scrape time (inbox bytes, share
//! records, the kernel's listen-queue counters) come from a collector.

use super::broker::BrokerError;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge as GaugeMetric};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::sync::Arc;

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Declares a label enum with its label values, in declaration order.
macro_rules! labels {
    ($(#[$meta:meta])* $name:ident {
        $($(#[$vmeta:meta])* $variant:ident => $label:literal),+ $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn label(self) -> &'static str {
                match self { $($name::$variant => $label),+ }
            }
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(encoder, self.label())
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByReason {
    reason: Rejection,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByCause {
    cause: Disconnect,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByOutcome {
    outcome: JoinOutcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByTurnReason {
    reason: TurnRefusal,
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

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    peers_connected: GaugeMetric,
    http_connections: GaugeMetric,
    shares: GaugeMetric,
    turn_allocations: GaugeMetric,
    connections: Counter,
    messages_received: Counter,
    messages_relayed: Counter,
    shares_created: Counter,
    shares_reclaimed: Counter,
    backend_errors: Counter,
    turn_allocations_made: Counter,
    turn_relayed_bytes: Counter,
    rejections: Family<ByReason, Counter>,
    disconnects: Family<ByCause, Counter>,
    joins: Family<ByOutcome, Counter>,
    turn_refusals: Family<ByTurnReason, Counter>,
    sampled: Arc<Sampled>,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            registry: Registry::default(),
            peers_connected: GaugeMetric::default(),
            http_connections: GaugeMetric::default(),
            shares: GaugeMetric::default(),
            turn_allocations: GaugeMetric::default(),
            connections: Counter::default(),
            messages_received: Counter::default(),
            messages_relayed: Counter::default(),
            shares_created: Counter::default(),
            shares_reclaimed: Counter::default(),
            backend_errors: Counter::default(),
            turn_allocations_made: Counter::default(),
            turn_relayed_bytes: Counter::default(),
            rejections: Family::default(),
            disconnects: Family::default(),
            joins: Family::default(),
            turn_refusals: Family::default(),
            sampled: Arc::new(Sampled::default()),
        };
        m.registered()
    }
}

/// Holds a gauge up by one while it lives: dropped on every exit path, panics and aborts included.
#[derive(Debug)]
pub struct GaugeGuard {
    metrics: Arc<Metrics>,
    gauge: Gauge,
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.metrics.gauge(self.gauge).dec();
    }
}

impl Metrics {
    /// Registers every metric (each label of a family shows from the start, at 0).
    fn registered(mut self) -> Self {
        for r in Rejection::ALL {
            drop(self.rejections.get_or_create(&ByReason { reason: *r }));
        }
        for c in Disconnect::ALL {
            drop(self.disconnects.get_or_create(&ByCause { cause: *c }));
        }
        for o in JoinOutcome::ALL {
            drop(self.joins.get_or_create(&ByOutcome { outcome: *o }));
        }
        for r in TurnRefusal::ALL {
            drop(
                self.turn_refusals
                    .get_or_create(&ByTurnReason { reason: *r }),
            );
        }
        let r = &mut self.registry;
        r.register_collector(Box::new(self.sampled.clone()));
        r.register(
            "beamdrop_peers_connected",
            "Peers with a registered signaling socket on this node",
            self.peers_connected.clone(),
        );
        r.register(
            "beamdrop_http_connections",
            "Accepted TCP connections serving HTTP (WebSockets count in peers_connected)",
            self.http_connections.clone(),
        );
        r.register(
            "beamdrop_shares",
            "Live shares owned by peers on this node",
            self.shares.clone(),
        );
        r.register(
            "beamdrop_connections",
            "WebSocket upgrades accepted",
            self.connections.clone(),
        );
        r.register(
            "beamdrop_messages_received",
            "Text frames received from clients",
            self.messages_received.clone(),
        );
        r.register(
            "beamdrop_messages_relayed",
            "Signals handed to the broker for their target",
            self.messages_relayed.clone(),
        );
        r.register(
            "beamdrop_shares_created",
            "Shares created",
            self.shares_created.clone(),
        );
        r.register(
            "beamdrop_shares_reclaimed",
            "Shares taken back by their sender after a reconnect",
            self.shares_reclaimed.clone(),
        );
        r.register(
            "beamdrop_backend_errors",
            "Broker backend (backplane) failures",
            self.backend_errors.clone(),
        );
        r.register(
            "beamdrop_rejections",
            "Connections, frames and messages refused, by reason",
            self.rejections.clone(),
        );
        r.register(
            "beamdrop_disconnects",
            "Socket sessions ended, by cause",
            self.disconnects.clone(),
        );
        r.register(
            "beamdrop_joins",
            "Share joins, by outcome",
            self.joins.clone(),
        );
        r.register(
            "beamdrop_turn_allocations",
            "Live relay allocations on this node's TURN server",
            self.turn_allocations.clone(),
        );
        r.register(
            "beamdrop_turn_allocations_made",
            "Relay allocations made",
            self.turn_allocations_made.clone(),
        );
        r.register(
            "beamdrop_turn_relayed_bytes",
            "Bytes relayed between browsers and their peers, both directions",
            self.turn_relayed_bytes.clone(),
        );
        r.register(
            "beamdrop_turn_refusals",
            "TURN requests refused and relayed packets dropped, by reason",
            self.turn_refusals.clone(),
        );
        self
    }

    fn gauge(&self, gauge: Gauge) -> &GaugeMetric {
        match gauge {
            Gauge::PeersConnected => &self.peers_connected,
            Gauge::Shares => &self.shares,
            Gauge::TurnAllocations => &self.turn_allocations,
            Gauge::HttpConnections => &self.http_connections,
        }
    }

    /// Raises `gauge` until the returned guard drops.
    pub fn track(self: &Arc<Self>, gauge: Gauge) -> GaugeGuard {
        self.gauge(gauge).inc();
        GaugeGuard {
            metrics: self.clone(),
            gauge,
        }
    }

    pub fn reject(&self, reason: Rejection) {
        self.rejections.get_or_create(&ByReason { reason }).inc();
    }

    pub fn disconnect(&self, cause: Disconnect) {
        self.disconnects.get_or_create(&ByCause { cause }).inc();
    }

    pub fn join(&self, outcome: JoinOutcome) {
        self.joins.get_or_create(&ByOutcome { outcome }).inc();
    }

    pub fn turn_refuse(&self, reason: TurnRefusal) {
        self.turn_refusals
            .get_or_create(&ByTurnReason { reason })
            .inc();
    }

    pub fn turn_refusals(&self, reason: TurnRefusal) -> u64 {
        self.turn_refusals
            .get_or_create(&ByTurnReason { reason })
            .get()
    }

    /// A relay allocation was made.
    pub fn turn_allocation(&self) {
        self.turn_allocations_made.inc();
    }

    /// Bytes relayed (either direction).
    pub fn turn_relayed(&self, bytes: usize) {
        self.turn_relayed_bytes.inc_by(bytes as u64);
    }

    pub fn turn_relayed_bytes(&self) -> u64 {
        self.turn_relayed_bytes.get()
    }

    /// A WebSocket upgrade was accepted.
    pub fn connection(&self) {
        self.connections.inc();
    }

    /// A text frame arrived from a client.
    pub fn message_received(&self) {
        self.messages_received.inc();
    }

    /// A signal was handed to the broker for its target.
    pub fn message_relayed(&self) {
        self.messages_relayed.inc();
    }

    pub fn share_created(&self) {
        self.shares_created.inc();
    }

    /// A sender took its share back after reconnecting.
    pub fn share_reclaimed(&self) {
        self.shares_reclaimed.inc();
    }

    pub fn shares_reclaimed(&self) -> u64 {
        self.shares_reclaimed.get()
    }

    /// Counts backplane failures (`BrokerError::Backend`); other broker errors are rejections.
    pub fn broker_error(&self, e: &BrokerError) {
        if matches!(e, BrokerError::Backend(_)) {
            self.backend_errors.inc();
        }
    }

    pub fn rejections(&self, reason: Rejection) -> u64 {
        self.rejections.get_or_create(&ByReason { reason }).get()
    }

    pub fn disconnects(&self, cause: Disconnect) -> u64 {
        self.disconnects.get_or_create(&ByCause { cause }).get()
    }

    pub fn joins(&self, outcome: JoinOutcome) -> u64 {
        self.joins.get_or_create(&ByOutcome { outcome }).get()
    }

    pub fn gauge_value(&self, gauge: Gauge) -> i64 {
        self.gauge(gauge).get()
    }

    pub fn backend_errors(&self) -> u64 {
        self.backend_errors.get()
    }

    pub fn messages_relayed(&self) -> u64 {
        self.messages_relayed.get()
    }

    /// The OpenMetrics text ([`CONTENT_TYPE`]). `inbox_bytes`: what the broker's inboxes on
    /// this node hold now; `share_records`: the share records it keeps (if it keeps them itself).
    pub fn render(&self, inbox_bytes: usize, share_records: Option<usize>) -> String {
        let sampled = &self.sampled;
        sampled
            .inbox_bytes
            .store(i64::try_from(inbox_bytes).unwrap_or(i64::MAX), Relaxed);
        sampled.share_records.store(
            share_records.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX)),
            Relaxed,
        );
        let mut out = String::with_capacity(8192);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// What is read at scrape time rather than counted: the broker's figures as `render` was given
/// them (two scrapes at once may each show the other's; both are "now"), and the kernel's.
#[derive(Debug, Default)]
struct Sampled {
    inbox_bytes: AtomicI64,
    /// -1: the broker keeps no share records on this node (Redis keeps them).
    share_records: AtomicI64,
}

impl Collector for Sampled {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = |encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64| {
            let metric = ConstGauge::new(value);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
        };
        gauge(
            &mut encoder,
            "beamdrop_inbox_bytes",
            "Bytes of messages waiting in this node's peer inboxes.",
            self.inbox_bytes.load(Relaxed),
        )?;
        let records = self.share_records.load(Relaxed);
        if records >= 0 {
            gauge(
                &mut encoder,
                "beamdrop_share_records",
                "Share records kept on this node: live shares and withdrawn ones still \
                 reclaimable.",
                records,
            )?;
        }
        if let Some((overflows, drops)) = listen_queue_counters() {
            let counter = |encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64| {
                let metric = ConstCounter::new(value);
                metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
            };
            counter(
                &mut encoder,
                "beamdrop_listen_overflows",
                "Connections the kernel turned away because a listen queue was full (TcpExt \
                 ListenOverflows: every listener of this host or network namespace).",
                overflows,
            )?;
            counter(
                &mut encoder,
                "beamdrop_listen_drops",
                "SYNs the kernel dropped at a listener, overflows included (TcpExt ListenDrops, \
                 host or network namespace).",
                drops,
            )?;
        }
        Ok(())
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
    fn every_label_shows_from_the_start() {
        let text = Metrics::default().render(0, None);
        for r in Rejection::ALL {
            let line = format!("beamdrop_rejections_total{{reason=\"{}\"}} 0", r.label());
            assert!(text.lines().any(|l| l == line), "missing {line}");
        }
        for d in Disconnect::ALL {
            let line = format!("beamdrop_disconnects_total{{cause=\"{}\"}} 0", d.label());
            assert!(text.lines().any(|l| l == line), "missing {line}");
        }
        for j in JoinOutcome::ALL {
            let line = format!("beamdrop_joins_total{{outcome=\"{}\"}} 0", j.label());
            assert!(text.lines().any(|l| l == line), "missing {line}");
        }
        for t in TurnRefusal::ALL {
            let line = format!("beamdrop_turn_refusals_total{{reason=\"{}\"}} 0", t.label());
            assert!(text.lines().any(|l| l == line), "missing {line}");
        }
        // Share records only where the broker keeps them.
        assert!(!text.contains("beamdrop_share_records"));
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
            "# TYPE beamdrop_rejections counter",
            "beamdrop_rejections_total{reason=\"bad_message\"} 2",
            "beamdrop_rejections_total{reason=\"ip_cap\"} 1",
            "beamdrop_rejections_total{reason=\"too_deep\"} 0",
            "beamdrop_disconnects_total{cause=\"rate_limited\"} 1",
            "beamdrop_joins_total{outcome=\"no_such_share\"} 1",
            "beamdrop_backend_errors_total 0",
            "# TYPE beamdrop_turn_allocations gauge",
            "beamdrop_turn_allocations 1",
            "beamdrop_turn_allocations_made_total 0",
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
        assert!(text.ends_with("# EOF\n"));
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
