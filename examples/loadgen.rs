//! Load generator for the `/ws` signaling broker, driven by `scripts/bench-broker`.
//!
//! Subcommands (each prints progress on stderr and appends result rows, JSON lines, to
//! `--results`):
//! - `idle`: connect N peers (each counted once its `welcome` arrives), hold them, report the
//!   connect rate and the server's RSS per connection (VmRSS of `--server-pids`, before and after).
//! - `relay`: pairs of peers introduced through a share (one creates it, one joins); signals are
//!   driven open loop at each target rate for a few seconds; per-message latency comes from a send
//!   timestamp in the payload; loss, errors and server CPU per relayed message per step; the
//!   highest rate with p99 under the target and zero loss, refined by bisection.
//! - `handshake`: with N idle peers held, WebRTC-shaped handshakes through the server (offer A→B,
//!   answer B→A, then two candidates each way: six signals), p50/p99 of the whole exchange.
//! - `report`: the collected rows as Markdown tables.
//!
//! Safety rails: servers must be on 127.0.0.0/8 and client sockets bind to loopback source
//! addresses only; every loop is bounded in count and in time, and a watchdog thread ends the
//! process after `--max-secs` whatever it is doing.
//!
//! `cargo run --release --features ssr --example loadgen -- relay --help`

use beamdrop::protocol::{ClientMsg, PeerId, ServerMsg, SignalPayload};
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::{sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;

/// TCP connect + WebSocket upgrade + `welcome`, per peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Share creation + join, per pair (after both connects).
const PAIR_TIMEOUT: Duration = Duration::from_secs(20);
/// One handshake (six signals) before it counts as failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a step's messages after its senders stop.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

// -------------------------------------------------------------------------------------------------
// Command line
// -------------------------------------------------------------------------------------------------

#[derive(Parser)]
#[command(about = "Load generator for beamdrop's /ws signaling broker (loopback only)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Connect and hold idle peers; connect rate and server RSS per connection.
    Idle(IdleArgs),
    /// Open-loop signal relay between introduced pairs at increasing rates.
    Relay(RelayArgs),
    /// Six-signal WebRTC-style handshakes with idle peers held.
    Handshake(HandshakeArgs),
    /// Print collected result rows as Markdown.
    Report(ReportArgs),
}

#[derive(Args, Clone, Debug)]
struct Common {
    /// Server nodes (ip:port on 127.0.0.0/8), comma-separated; peers are spread over them.
    #[arg(long, value_delimiter = ',', required = true)]
    nodes: Vec<SocketAddr>,
    /// Loopback source addresses for client sockets: a list and/or ranges such as
    /// 127.1.0.1-127.1.0.32 (spreads ephemeral ports and the server's per-IP cap).
    #[arg(long, default_value = "127.0.0.2-127.0.0.33")]
    sources: String,
    /// Server pids: VmRSS and utime+stime are read from /proc/<pid> (one per node).
    #[arg(long, value_delimiter = ',')]
    server_pids: Vec<u32>,
    /// Other pids whose CPU is reported on its own (e.g. redis-server).
    #[arg(long, value_delimiter = ',')]
    aux_pids: Vec<u32>,
    /// Connections being set up at once.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// Hard deadline: the process exits (status 3) after this many seconds, whatever it does.
    #[arg(long, default_value_t = 300)]
    max_secs: u64,
    /// Title of the result table.
    #[arg(long, default_value = "")]
    label: String,
    /// If set, every row this run emits starts with a "server" column holding it (to put runs
    /// against different servers in one table).
    #[arg(long, default_value = "")]
    server_name: String,
    /// Append result rows (JSON lines) to this file.
    #[arg(long)]
    results: Option<PathBuf>,
    /// Clock ticks per second of /proc/<pid>/stat (`getconf CLK_TCK`).
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
    /// Also emit rows of the "Targets" summary table.
    #[arg(long)]
    targets: bool,
}

#[derive(Args, Clone, Debug)]
struct IdleArgs {
    #[command(flatten)]
    common: Common,
    /// Peers to connect and hold.
    #[arg(long)]
    peers: usize,
    /// Wait after the last connect before reading RSS (lets the server settle).
    #[arg(long, default_value_t = 2000)]
    settle_ms: u64,
    /// Once connected, write a JSON summary here, then hold until --release-file exists.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    #[arg(long)]
    release_file: Option<PathBuf>,
    /// Upper bound of the hold.
    #[arg(long, default_value_t = 120)]
    hold_max_secs: u64,
    /// First node index (rotates which node gets peer 0).
    #[arg(long, default_value_t = 0)]
    node_offset: usize,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Placement {
    /// Both peers of a pair on the same node.
    Same,
    /// The two peers of a pair on different nodes.
    Cross,
    /// Even pairs on one node, odd pairs across nodes (latency reported per kind).
    Mixed,
}

#[derive(Args, Clone, Debug)]
struct RelayArgs {
    #[command(flatten)]
    common: Common,
    /// Introduced pairs; both peers of a pair send to each other.
    #[arg(long, default_value_t = 500)]
    pairs: usize,
    #[arg(long, value_enum, default_value_t = Placement::Same)]
    placement: Placement,
    /// Offered rates (messages/s, all pairs together), one step each.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "10000,30000,60000,100000"
    )]
    rates: Vec<u64>,
    /// Seconds per step.
    #[arg(long, default_value_t = 4.0)]
    step_secs: f64,
    /// Unreported warm-up step (at the first rate) before the measured ones.
    #[arg(long, default_value_t = 1.0)]
    warmup_secs: f64,
    /// Bisection steps between the highest passing and the lowest failing rate.
    #[arg(long, default_value_t = 2)]
    refine: usize,
    /// Payload size in bytes (a trickled ICE candidate is ~100-200).
    #[arg(long, default_value_t = 120)]
    payload_bytes: usize,
    /// Sender tasks the pairs' sockets are divided among.
    #[arg(long, default_value_t = 4)]
    senders: usize,
    /// A step passes when p99 is under this (and nothing is lost).
    #[arg(long, default_value_t = 5.0)]
    p99_target_ms: f64,
}

#[derive(Args, Clone, Debug)]
struct HandshakeArgs {
    #[command(flatten)]
    common: Common,
    /// Idle peers held (spread over the nodes) while the handshakes run.
    #[arg(long, default_value_t = 10_000)]
    idle: usize,
    /// Pairs that perform the handshakes (each does its share of them one after another).
    #[arg(long, default_value_t = 100)]
    pairs: usize,
    #[arg(long, value_enum, default_value_t = Placement::Same)]
    placement: Placement,
    /// Handshakes in total.
    #[arg(long, default_value_t = 1000)]
    handshakes: usize,
    /// Handshakes started per second (open loop).
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Seconds of background CPU measured (everyone connected, nothing sent) before the
    /// handshakes, and subtracted from their CPU.
    #[arg(long, default_value_t = 2.0)]
    baseline_secs: f64,
}

#[derive(Args, Clone, Debug)]
struct ReportArgs {
    /// JSON-lines file written by the other subcommands (and the script).
    #[arg(long)]
    results: PathBuf,
}

// -------------------------------------------------------------------------------------------------
// Small utilities: clock, /proc, results
// -------------------------------------------------------------------------------------------------

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since this process's epoch: the send timestamp embedded in payloads (sender and
/// receiver are the same process, so they share the clock).
fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

fn watchdog(secs: u64) {
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(secs));
        eprintln!("[loadgen] hard deadline of {secs} s reached: exiting");
        std::process::exit(3);
    });
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// utime + stime of a process (all threads), in clock ticks.
fn cpu_ticks(pid: &str) -> Option<u64> {
    cpu_ticks_split(pid).map(|(user, system)| user + system)
}

/// (utime, stime) of a process (all threads), in clock ticks. stime is the kernel's work on the
/// process's behalf: its syscalls and, on loopback, the TCP receive path its sends run for the
/// other end.
fn cpu_ticks_split(pid: &str) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is index 0 here; utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime, stime))
}

/// (busy, total) jiffies over all CPUs, from /proc/stat.
fn machine_jiffies() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return (0, 0);
    }
    let total: u64 = v.iter().sum();
    let idle = v[3] + v[4];
    (total - idle, total)
}

fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[derive(Clone, Copy)]
struct Snap {
    wall: Instant,
    servers: u64,
    /// The servers' stime alone (included in `servers`).
    servers_sys: u64,
    aux: u64,
    me: u64,
    busy: u64,
    total: u64,
}

/// CPU used between two snapshots, in seconds (and the machine's busy share).
struct Cpu {
    wall: f64,
    servers: f64,
    /// Of `servers`, the time spent in the kernel.
    servers_sys: f64,
    aux: f64,
    me: f64,
    /// Busy share of all CPUs, 0..1.
    machine: f64,
    /// CPU seconds of every process on the machine.
    machine_secs: f64,
}

impl Cpu {
    /// Cores used meanwhile by processes that are neither the servers, nor the aux pids, nor this
    /// load generator: the noise on a shared machine.
    fn others_cores(&self) -> f64 {
        ((self.machine_secs - self.servers - self.aux - self.me) / self.wall.max(1e-9)).max(0.0)
    }
}

impl Common {
    fn snap(&self) -> Snap {
        // (user, system) summed over pids, one read of /proc/<pid>/stat each.
        let sum = |pids: &[u32]| -> (u64, u64) {
            pids.iter()
                .filter_map(|p| cpu_ticks_split(&p.to_string()))
                .fold((0, 0), |(u, s), (user, system)| (u + user, s + system))
        };
        let (busy, total) = machine_jiffies();
        let (servers_user, servers_sys) = sum(&self.server_pids);
        let (aux_user, aux_sys) = sum(&self.aux_pids);
        Snap {
            wall: Instant::now(),
            servers: servers_user + servers_sys,
            servers_sys,
            aux: aux_user + aux_sys,
            me: cpu_ticks("self").unwrap_or(0),
            busy,
            total,
        }
    }

    fn cpu(&self, a: Snap, b: Snap) -> Cpu {
        let t = |x: u64, y: u64| y.saturating_sub(x) as f64 / self.clk_tck as f64;
        let total = b.total.saturating_sub(a.total).max(1) as f64;
        Cpu {
            wall: b.wall.duration_since(a.wall).as_secs_f64(),
            servers: t(a.servers, b.servers),
            servers_sys: t(a.servers_sys, b.servers_sys),
            aux: t(a.aux, b.aux),
            me: t(a.me, b.me),
            machine: b.busy.saturating_sub(a.busy) as f64 / total,
            machine_secs: t(a.busy, b.busy),
        }
    }

    fn servers_rss_kib(&self) -> u64 {
        self.server_pids.iter().filter_map(|p| rss_kib(*p)).sum()
    }

    fn check_servers_alive(&self) -> Result<(), String> {
        for pid in &self.server_pids {
            if rss_kib(*pid).is_none() {
                return Err(format!("server pid {pid} is gone"));
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<Vec<IpAddr>, String> {
        for node in &self.nodes {
            if !node.ip().is_loopback() {
                return Err(format!("{node}: servers must be on 127.0.0.0/8"));
            }
        }
        parse_sources(&self.sources)
    }

    fn title(&self, default: &str) -> String {
        if self.label.is_empty() {
            default.to_owned()
        } else {
            self.label.clone()
        }
    }

    /// One result row: printed on stderr and appended to `--results`.
    fn emit(&self, table: &str, row: &[(&str, String)]) {
        let server = (!self.server_name.is_empty()).then(|| ("server", self.server_name.clone()));
        let row: Vec<&(&str, String)> = server.iter().chain(row).collect();
        let cols: Vec<&str> = row.iter().map(|(c, _)| *c).collect();
        let vals: Vec<&str> = row.iter().map(|(_, v)| v.as_str()).collect();
        let mut line = String::new();
        for (c, v) in row {
            let _ = write!(line, "{c}={v}; ");
        }
        eprintln!("[loadgen] {table}: {line}");
        if let Some(path) = &self.results {
            let json = serde_json::json!({"table": table, "cols": cols, "vals": vals});
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| writeln!(f, "{json}"));
            if let Err(e) = written {
                eprintln!("[loadgen] cannot append to {}: {e}", path.display());
            }
        }
    }

    /// A row of the "Targets" table; `met` is `None` where there is no target to meet.
    fn target(
        &self,
        metric: &str,
        target: &str,
        reference: &str,
        measured: String,
        met: Option<bool>,
    ) {
        if self.targets {
            self.emit(
                "Targets",
                &[
                    ("metric", metric.into()),
                    ("target", target.into()),
                    ("Node.js reference (same machine)", reference.into()),
                    ("measured", measured),
                    (
                        "met",
                        match met {
                            Some(true) => "yes",
                            Some(false) => "**no**",
                            None => "—",
                        }
                        .into(),
                    ),
                ],
            );
        }
    }
}

fn parse_sources(spec: &str) -> Result<Vec<IpAddr>, String> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let a: Ipv4Addr = a.trim().parse().map_err(|e| format!("{part}: {e}"))?;
        let b: Ipv4Addr = b.trim().parse().map_err(|e| format!("{part}: {e}"))?;
        for x in u32::from(a)..=u32::from(b) {
            let ip = Ipv4Addr::from(x);
            if !ip.is_loopback() {
                return Err(format!("{ip}: source addresses must be on 127.0.0.0/8"));
            }
            out.push(IpAddr::V4(ip));
            if out.len() > 65_536 {
                return Err("more than 65536 source addresses".into());
            }
        }
    }
    if out.is_empty() {
        return Err("no source addresses".into());
    }
    Ok(out)
}

fn ms(ns: u64) -> String {
    format!("{:.2}", ns as f64 / 1e6)
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// -------------------------------------------------------------------------------------------------
// Latency histogram: log-linear buckets (32 per power of two, ~3 % wide), lock-free recording
// -------------------------------------------------------------------------------------------------

const SUB_BITS: u32 = 5;
const SUB: usize = 1 << SUB_BITS;
const LINEAR: usize = 2 * SUB; // values below this get a bucket each
const BUCKETS: usize = LINEAR + (64 - 6) * SUB;

struct Hist {
    buckets: Vec<AtomicU64>,
    max: AtomicU64,
}

impl Hist {
    fn new() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max: AtomicU64::new(0),
        }
    }

    fn index(v: u64) -> usize {
        if v < LINEAR as u64 {
            return v as usize;
        }
        let e = 63 - v.leading_zeros(); // >= 6
        let sub = ((v >> (e - SUB_BITS)) as usize) & (SUB - 1);
        LINEAR + (e as usize - 6) * SUB + sub
    }

    /// A representative value (the middle) of bucket `i`.
    fn value(i: usize) -> u64 {
        if i < LINEAR {
            return i as u64;
        }
        let e = ((i - LINEAR) / SUB + 6) as u32;
        let sub = ((i - LINEAR) % SUB) as u64;
        let width = 1u64 << (e - SUB_BITS);
        (1u64 << e) + sub * width + width / 2
    }

    fn record(&self, v: u64) {
        self.buckets[Self::index(v)].fetch_add(1, Relaxed);
        self.max.fetch_max(v, Relaxed);
    }

    fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    fn quantile(&self, q: f64) -> u64 {
        let n = self.count();
        if n == 0 {
            return 0;
        }
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Relaxed);
            if seen >= rank {
                return Self::value(i).min(self.max.load(Relaxed));
            }
        }
        self.max.load(Relaxed)
    }

    fn max(&self) -> u64 {
        self.max.load(Relaxed)
    }
}

// -------------------------------------------------------------------------------------------------
// Connections
// -------------------------------------------------------------------------------------------------

/// Small client buffers: this process holds up to ~19k sockets.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

static SOCKET_SEQ: AtomicUsize = AtomicUsize::new(0);

/// TCP from the next source address (round robin) + WebSocket upgrade on `/ws`.
async fn open(node: SocketAddr, sources: &[IpAddr]) -> Result<Ws, String> {
    let src = sources[SOCKET_SEQ.fetch_add(1, Relaxed) % sources.len()];
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    socket
        .bind(SocketAddr::new(src, 0))
        .map_err(|e| format!("bind {src}: {e}"))?;
    let tcp = socket
        .connect(node)
        .await
        .map_err(|e| format!("connect {node} from {src}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    // Closing resets instead of leaving TIME_WAIT behind: the next phase reuses the ports.
    let _ = tcp.set_zero_linger();
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        format!("ws://{node}/ws"),
        tcp,
        Some(ws_config()),
    )
    .await
    .map_err(|e| format!("upgrade {node}: {e}"))?;
    Ok(ws)
}

/// The next server message, skipping control frames. Cancel safe.
async fn next_msg(ws: &mut Ws) -> Result<ServerMsg, String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(t.as_str())
                    .map_err(|e| format!("not a ServerMsg: {t}: {e}"))
            }
            Some(Ok(Message::Close(f))) => {
                return Err(match f {
                    Some(f) => format!("closed by the server: {} {}", u16::from(f.code), f.reason),
                    None => "closed by the server".into(),
                })
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("connection ended".into()),
        }
    }
}

async fn send_msg(ws: &mut Ws, msg: &ClientMsg) -> Result<(), String> {
    let text = serde_json::to_string(msg).map_err(|e| e.to_string())?;
    ws.send(Message::text(text))
        .await
        .map_err(|e| e.to_string())
}

/// A connected peer: socket open and `welcome` received.
async fn connect(node: SocketAddr, sources: &[IpAddr]) -> Result<(Ws, PeerId), String> {
    let attempt = async {
        let mut ws = open(node, sources).await?;
        match next_msg(&mut ws).await? {
            ServerMsg::Welcome { you, .. } => Ok((ws, you)),
            other => Err(format!("expected welcome, got {other:?}")),
        }
    };
    timeout(CONNECT_TIMEOUT, attempt)
        .await
        .map_err(|_| format!("no welcome from {node} within {CONNECT_TIMEOUT:?}"))?
}

struct Pair {
    a: Ws,
    a_id: PeerId,
    b: Ws,
    b_id: PeerId,
    /// 0: both on one node, 1: across nodes.
    kind: usize,
}

/// A creates a share on `a_node`, B joins it from `b_node`; both learn of each other.
async fn make_pair(
    a_node: SocketAddr,
    b_node: SocketAddr,
    sources: &[IpAddr],
    kind: usize,
) -> Result<Pair, String> {
    let (mut a, a_id) = connect(a_node, sources).await?;
    let (mut b, b_id) = connect(b_node, sources).await?;
    let introduce = async {
        send_msg(&mut a, &ClientMsg::CreateShare).await?;
        let share = match next_msg(&mut a).await? {
            ServerMsg::ShareCreated { share, .. } => share,
            other => return Err(format!("expected share_created, got {other:?}")),
        };
        send_msg(&mut b, &ClientMsg::Join { share }).await?;
        match next_msg(&mut b).await? {
            ServerMsg::Joined { sender, .. } if sender == a_id => {}
            other => return Err(format!("expected joined, got {other:?}")),
        }
        match next_msg(&mut a).await? {
            ServerMsg::PeerJoined { peer, .. } if peer == b_id => Ok(()),
            other => Err(format!("expected peer_joined, got {other:?}")),
        }
    };
    timeout(PAIR_TIMEOUT, introduce)
        .await
        .map_err(|_| "share/join timed out".to_string())??;
    Ok(Pair {
        a,
        a_id,
        b,
        b_id,
        kind,
    })
}

fn pair_nodes(
    nodes: &[SocketAddr],
    k: usize,
    placement: Placement,
) -> (SocketAddr, SocketAddr, usize) {
    let n = nodes.len();
    let a = nodes[k % n];
    let cross = n > 1
        && match placement {
            Placement::Same => false,
            Placement::Cross => true,
            Placement::Mixed => k % 2 == 1,
        };
    if cross {
        (a, nodes[(k + 1 + (k / n) % (n - 1)) % n], 1)
    } else {
        (a, a, 0)
    }
}

/// Runs `job(0..n)` on `concurrency` workers until done or `deadline`.
/// Returns the successes, the failure count and the first error.
async fn bounded<T, F, Fut>(
    n: usize,
    concurrency: usize,
    deadline: Instant,
    job: F,
) -> (Vec<T>, usize, Option<String>)
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T, String>> + Send,
{
    struct Shared<T> {
        next: AtomicUsize,
        ok: Mutex<Vec<T>>,
        failed: AtomicUsize,
        first_error: Mutex<Option<String>>,
    }
    let shared = Arc::new(Shared {
        next: AtomicUsize::new(0),
        ok: Mutex::new(Vec::with_capacity(n)),
        failed: AtomicUsize::new(0),
        first_error: Mutex::new(None),
    });
    let job = Arc::new(job);
    let workers: Vec<_> = (0..concurrency.clamp(1, n.max(1)))
        .map(|_| {
            let shared = shared.clone();
            let job = job.clone();
            tokio::spawn(async move {
                loop {
                    let i = shared.next.fetch_add(1, Relaxed);
                    if i >= n || Instant::now() >= deadline {
                        break;
                    }
                    match job(i).await {
                        Ok(t) => shared.ok.lock().unwrap().push(t),
                        Err(e) => {
                            shared.failed.fetch_add(1, Relaxed);
                            let mut first = shared.first_error.lock().unwrap();
                            if first.is_none() {
                                eprintln!("[loadgen] first failure: {e}");
                                *first = Some(e);
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    let not_started = n.saturating_sub(shared.next.load(Relaxed).min(n));
    let ok = std::mem::take(&mut *shared.ok.lock().unwrap());
    let failed = shared.failed.load(Relaxed) + not_started;
    let first = shared.first_error.lock().unwrap().take();
    (ok, failed, first)
}

/// Idle peers: each held by a task that answers the server's pings until `stop`.
struct IdleFleet {
    stop: watch::Sender<bool>,
    closed: Arc<AtomicUsize>,
    connected: usize,
    failed: usize,
    first_error: Option<String>,
    secs: f64,
}

async fn hold(mut ws: Ws, mut stop: watch::Receiver<bool>, closed: Arc<AtomicUsize>) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            frame = ws.next() => match frame {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    closed.fetch_add(1, Relaxed);
                    return;
                }
                Some(Ok(_)) => {}
            },
        }
    }
}

async fn connect_idle(
    common: &Common,
    sources: &Arc<Vec<IpAddr>>,
    peers: usize,
    node_offset: usize,
    deadline: Instant,
) -> IdleFleet {
    let (stop, stop_rx) = watch::channel(false);
    let closed = Arc::new(AtomicUsize::new(0));
    let nodes = Arc::new(common.nodes.clone());
    let started = Instant::now();
    let progress = Arc::new(AtomicUsize::new(0));
    let job = {
        let (sources, closed, progress) = (sources.clone(), closed.clone(), progress.clone());
        move |i: usize| {
            let node = nodes[(i + node_offset) % nodes.len()];
            let (sources, stop_rx, closed, progress) = (
                sources.clone(),
                stop_rx.clone(),
                closed.clone(),
                progress.clone(),
            );
            async move {
                let (ws, _) = connect(node, &sources).await?;
                tokio::spawn(hold(ws, stop_rx, closed));
                let done = progress.fetch_add(1, Relaxed) + 1;
                if done.is_multiple_of(5000) {
                    eprintln!(
                        "[loadgen] {done} peers connected ({:.1} s)",
                        started.elapsed().as_secs_f64()
                    );
                }
                Ok(())
            }
        }
    };
    let (ok, failed, first_error) = bounded(peers, common.concurrency, deadline, job).await;
    IdleFleet {
        stop,
        closed,
        connected: ok.len(),
        failed,
        first_error,
        secs: started.elapsed().as_secs_f64(),
    }
}

async fn setup_pairs(
    common: &Common,
    sources: &Arc<Vec<IpAddr>>,
    pairs: usize,
    placement: Placement,
    deadline: Instant,
) -> Result<Vec<Pair>, String> {
    let nodes = Arc::new(common.nodes.clone());
    let job = {
        let sources = sources.clone();
        move |k: usize| {
            let (a, b, kind) = pair_nodes(&nodes, k, placement);
            let sources = sources.clone();
            async move { make_pair(a, b, &sources, kind).await }
        }
    };
    let (ok, failed, first) = bounded(pairs, common.concurrency.min(64), deadline, job).await;
    if failed > 0 {
        return Err(format!(
            "{failed} of {pairs} pairs failed: {}",
            first.unwrap_or_default()
        ));
    }
    Ok(ok)
}

fn check_fd_budget(sockets: usize) -> Result<(), String> {
    if let Some(limit) = open_files_limit() {
        if sockets as u64 + 64 > limit {
            return Err(format!(
                "{sockets} sockets do not fit this process's open-file limit ({limit}): \
                 raise `ulimit -n` or split the load over more processes"
            ));
        }
    }
    Ok(())
}

// -------------------------------------------------------------------------------------------------
// idle
// -------------------------------------------------------------------------------------------------

async fn idle(args: IdleArgs) -> Result<(), String> {
    let c = &args.common;
    let sources = Arc::new(c.validate()?);
    check_fd_budget(args.peers)?;
    let deadline = Instant::now() + Duration::from_secs(c.max_secs.saturating_sub(5));
    let me_before = rss_kib(std::process::id()).unwrap_or(0);
    let rss_before = c.servers_rss_kib();
    let t0 = c.snap();
    let fleet = connect_idle(c, &sources, args.peers, args.node_offset, deadline).await;
    let t1 = c.snap();
    eprintln!(
        "[loadgen] {} peers connected in {:.1} s ({} failed)",
        fleet.connected, fleet.secs, fleet.failed
    );
    sleep(Duration::from_millis(args.settle_ms)).await;
    let rss_after = c.servers_rss_kib();
    let me_after = rss_kib(std::process::id()).unwrap_or(0);
    if let Some(ready) = &args.ready_file {
        let summary = serde_json::json!({
            "connected": fleet.connected, "failed": fleet.failed, "secs": fleet.secs,
            "first_error": fleet.first_error,
        });
        std::fs::write(ready, summary.to_string()).map_err(|e| e.to_string())?;
        let until = Instant::now() + Duration::from_secs(args.hold_max_secs);
        loop {
            let released = args.release_file.as_ref().is_some_and(|f| f.exists());
            if released || Instant::now() >= until || Instant::now() >= deadline {
                break;
            }
            sleep(Duration::from_millis(100)).await;
        }
    }
    let closed = fleet.closed.load(Relaxed);
    let connected = fleet.connected.max(1) as u64;
    let cpu = c.cpu(t0, t1);
    let mut row = vec![
        ("nodes", c.nodes.len().to_string()),
        ("peers held", thousands(fleet.connected as u64)),
        ("failed", fleet.failed.to_string()),
        ("closed while held", closed.to_string()),
        ("connect time s", format!("{:.1}", fleet.secs)),
        (
            "connect rate peers/s",
            thousands((fleet.connected as f64 / fleet.secs.max(1e-9)) as u64),
        ),
    ];
    let per_conn = if c.server_pids.is_empty() {
        None
    } else {
        let delta = rss_after.saturating_sub(rss_before) * 1024;
        row.push((
            "server RSS before MiB",
            format!("{:.1}", rss_before as f64 / 1024.0),
        ));
        row.push((
            "server RSS after MiB",
            format!("{:.1}", rss_after as f64 / 1024.0),
        ));
        row.push(("server RSS / peer bytes", thousands(delta / connected)));
        row.push((
            "server CPU / connect µs",
            format!("{:.0}", cpu.servers * 1e6 / connected as f64),
        ));
        Some(delta / connected)
    };
    row.push((
        "loadgen RSS / peer bytes",
        thousands(me_after.saturating_sub(me_before) * 1024 / connected),
    ));
    row.push(("machine busy %", format!("{:.0}", cpu.machine * 100.0)));
    if !c.server_pids.is_empty() {
        row.push((
            "other processes' CPU cores",
            format!("{:.2}", cpu.others_cores()),
        ));
    }
    if let Some(e) = &fleet.first_error {
        row.push(("first error", e.chars().take(80).collect()));
    }
    c.emit(&c.title("Idle capacity"), &row);
    if let Some(bytes) = per_conn {
        c.target(
            "server memory per idle connection",
            "≤ 3 kB",
            "8–9 kB",
            format!(
                "{} bytes ({} peers)",
                thousands(bytes),
                thousands(connected)
            ),
            Some(bytes <= 3000 && fleet.failed == 0),
        );
    }
    let _ = fleet.stop.send(true);
    // Let the holders drop their sockets (bounded).
    sleep(Duration::from_millis(300)).await;
    if fleet.failed > 0 || closed > 0 {
        return Err(format!(
            "{} peers failed to connect, {closed} closed while held",
            fleet.failed
        ));
    }
    Ok(())
}

// -------------------------------------------------------------------------------------------------
// relay
// -------------------------------------------------------------------------------------------------

struct StepStats {
    hist: [Hist; 2],
    received: [AtomicU64; 2],
}

struct RelayShared {
    steps: Vec<StepStats>,
    errors: AtomicU64,
    error_codes: Mutex<BTreeMap<String, u64>>,
    other: AtomicU64,
    closed: AtomicUsize,
}

impl RelayShared {
    fn new(steps: usize) -> Self {
        Self {
            steps: (0..steps)
                .map(|_| StepStats {
                    hist: [Hist::new(), Hist::new()],
                    received: [AtomicU64::new(0), AtomicU64::new(0)],
                })
                .collect(),
            errors: AtomicU64::new(0),
            error_codes: Mutex::new(BTreeMap::new()),
            other: AtomicU64::new(0),
            closed: AtomicUsize::new(0),
        }
    }

    fn on_text(&self, text: &str) {
        let now = now_ns();
        // Fast path for `{"type":"signal","from":"…","payload":"<step>.<kind>.<ts>.xxx"}`.
        if text.starts_with("{\"type\":\"signal\"") {
            if let Some(i) = text.find("\"payload\":\"") {
                let mut it = text[i + 11..].split('.');
                let step = it.next().and_then(|s| s.parse::<usize>().ok());
                let kind = it.next().and_then(|s| s.parse::<usize>().ok());
                let ts = it.next().and_then(|s| s.parse::<u64>().ok());
                if let (Some(step), Some(kind), Some(ts)) = (step, kind, ts) {
                    if let Some(st) = self.steps.get(step).filter(|_| kind < 2) {
                        st.received[kind].fetch_add(1, Relaxed);
                        st.hist[kind].record(now.saturating_sub(ts));
                        return;
                    }
                }
            }
        }
        match serde_json::from_str::<ServerMsg>(text) {
            Ok(ServerMsg::Error { code, .. }) => {
                self.errors.fetch_add(1, Relaxed);
                let code = serde_json::to_string(&code).unwrap_or_default();
                *self
                    .error_codes
                    .lock()
                    .unwrap()
                    .entry(code.trim_matches('"').to_owned())
                    .or_default() += 1;
            }
            _ => {
                self.other.fetch_add(1, Relaxed);
            }
        }
    }

    fn received(&self, step: usize) -> u64 {
        self.steps[step]
            .received
            .iter()
            .map(|r| r.load(Relaxed))
            .sum()
    }
}

async fn relay_reader(mut rx: SplitStream<Ws>, shared: Arc<RelayShared>) {
    loop {
        match rx.next().await {
            Some(Ok(Message::Text(t))) => shared.on_text(t.as_str()),
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                shared.closed.fetch_add(1, Relaxed);
                return;
            }
            Some(Ok(_)) => {}
        }
    }
}

struct Sender {
    sink: SplitSink<Ws, Message>,
    /// `{"type":"signal","to":"<peer>","payload":"`
    prefix: String,
    kind: usize,
}

/// One sender task for one step: open loop, `rate` messages/s spread round robin over `senders`,
/// for `dur`. Returns the senders and how many messages went out.
async fn send_step(
    mut senders: Vec<Sender>,
    rate: f64,
    step: usize,
    dur: Duration,
    payload_bytes: usize,
) -> (Vec<Sender>, u64) {
    let pad = "x".repeat(payload_bytes);
    let start = Instant::now();
    let end = start + dur;
    let total = (rate * dur.as_secs_f64()) as u64;
    let mut sent = 0u64;
    let mut next = 0usize;
    let mut dirty = vec![false; senders.len()];
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'step: while sent < total {
        tick.tick().await;
        let now = Instant::now();
        if now >= end {
            break;
        }
        let due = ((now - start).as_secs_f64() * rate) as u64;
        let due = due.min(total);
        while sent < due {
            let s = &mut senders[next];
            dirty[next] = true;
            next = (next + 1) % dirty.len();
            let mut text = String::with_capacity(s.prefix.len() + payload_bytes + 8);
            text.push_str(&s.prefix);
            let _ = write!(text, "{step}.{}.{}.", s.kind, now_ns());
            let used = text.len() - s.prefix.len();
            text.push_str(&pad[..payload_bytes.saturating_sub(used)]);
            text.push_str("\"}");
            if s.sink.feed(Message::text(text)).await.is_err() {
                break 'step;
            }
            sent += 1;
            if sent.is_multiple_of(256) && Instant::now() >= end {
                break;
            }
        }
        for (i, d) in dirty.iter_mut().enumerate() {
            if std::mem::take(d) && senders[i].sink.flush().await.is_err() {
                break 'step;
            }
        }
    }
    for s in &mut senders {
        let _ = s.sink.flush().await;
    }
    (senders, sent)
}

struct StepResult {
    rate: u64,
    pass: bool,
    p99: u64,
    cpu_us: f64,
}

async fn relay(args: RelayArgs) -> Result<(), String> {
    let c = &args.common;
    let sources = Arc::new(c.validate()?);
    check_fd_budget(args.pairs * 2)?;
    if args.rates.is_empty() || args.pairs == 0 {
        return Err("need at least one rate and one pair".into());
    }
    let deadline = Instant::now() + Duration::from_secs(c.max_secs.saturating_sub(5));
    let title = c.title("Relay");
    let pairs = setup_pairs(c, &sources, args.pairs, args.placement, deadline).await?;
    let cross_pairs = pairs.iter().filter(|p| p.kind == 1).count();
    eprintln!(
        "[loadgen] {} pairs introduced ({cross_pairs} across nodes)",
        pairs.len()
    );

    let max_steps = 1 + args.rates.len() + args.refine;
    let shared = Arc::new(RelayShared::new(max_steps + 1));
    let groups_n = args.senders.clamp(1, pairs.len() * 2);
    let mut groups: Vec<Vec<Sender>> = (0..groups_n).map(|_| Vec::new()).collect();
    let mut readers = Vec::new();
    let prefix = |to: PeerId| format!("{{\"type\":\"signal\",\"to\":\"{to}\",\"payload\":\"");
    for (i, p) in pairs.into_iter().enumerate() {
        let (a_tx, a_rx) = p.a.split();
        let (b_tx, b_rx) = p.b.split();
        readers.push(tokio::spawn(relay_reader(a_rx, shared.clone())));
        readers.push(tokio::spawn(relay_reader(b_rx, shared.clone())));
        groups[(2 * i) % groups_n].push(Sender {
            sink: a_tx,
            prefix: prefix(p.b_id),
            kind: p.kind,
        });
        groups[(2 * i + 1) % groups_n].push(Sender {
            sink: b_tx,
            prefix: prefix(p.a_id),
            kind: p.kind,
        });
    }
    groups.retain(|g| !g.is_empty());

    // One step: offered `rate` for `secs`; `None` for the unreported warm-up.
    let mut step_id = 0usize;
    let mut results: Vec<StepResult> = Vec::new();
    let mut plan: Vec<(u64, f64, bool)> = Vec::new();
    if args.warmup_secs > 0.0 {
        plan.push((args.rates[0], args.warmup_secs, false));
    }
    for r in &args.rates {
        plan.push((*r, args.step_secs, true));
    }
    let mut refine_left = args.refine;
    let mut aborted: Option<String> = None;
    loop {
        let (rate, secs, report) = if !plan.is_empty() {
            plan.remove(0)
        } else if refine_left > 0 {
            // Bisect between the best pass and the lowest fail above it.
            let lo = results.iter().filter(|r| r.pass).map(|r| r.rate).max();
            let hi = results
                .iter()
                .filter(|r| !r.pass && lo.is_none_or(|lo| r.rate > lo))
                .map(|r| r.rate)
                .min();
            let (Some(lo), Some(hi)) = (lo, hi) else {
                break;
            };
            let mid = ((lo + hi) / 2 / 1000) * 1000;
            if mid <= lo || mid >= hi {
                break;
            }
            refine_left -= 1;
            (mid, args.step_secs, true)
        } else {
            break;
        };
        if Instant::now() + Duration::from_secs_f64(secs) + DRAIN_TIMEOUT + Duration::from_secs(5)
            > deadline
        {
            aborted = Some("stopped early: --max-secs reached".into());
            break;
        }
        step_id += 1;
        let errors_before = shared.errors.load(Relaxed);
        let t0 = c.snap();
        let per_group = rate as f64 / groups.len() as f64;
        let dur = Duration::from_secs_f64(secs);
        let tasks: Vec<_> = groups
            .drain(..)
            .map(|g| tokio::spawn(send_step(g, per_group, step_id, dur, args.payload_bytes)))
            .collect();
        let mut sent = 0u64;
        for t in tasks {
            match timeout(dur + Duration::from_secs(10), t).await {
                Ok(Ok((g, n))) => {
                    groups.push(g);
                    sent += n;
                }
                _ => aborted = Some("a sender task stalled (socket blocked)".into()),
            }
        }
        let sent_secs = t0.wall.elapsed().as_secs_f64().min(secs).max(1e-9);
        let drain_until = Instant::now() + DRAIN_TIMEOUT;
        while shared.received(step_id) < sent && Instant::now() < drain_until {
            sleep(Duration::from_millis(5)).await;
        }
        let t1 = c.snap();
        let cpu = c.cpu(t0, t1);
        let st = &shared.steps[step_id];
        let received = shared.received(step_id);
        let errors = shared.errors.load(Relaxed) - errors_before;
        let lost = sent.saturating_sub(received);
        let all = Hist::new();
        for h in &st.hist {
            for (i, b) in h.buckets.iter().enumerate() {
                all.buckets[i].fetch_add(b.load(Relaxed), Relaxed);
            }
            all.max.fetch_max(h.max(), Relaxed);
        }
        let (p50, p99, p999) = (all.quantile(0.5), all.quantile(0.99), all.quantile(0.999));
        let achieved = received as f64 / sent_secs;
        let cpu_us = cpu.servers * 1e6 / received.max(1) as f64;
        let mut why = Vec::new();
        if lost > 0 {
            why.push(format!("{lost} lost"));
        }
        if errors > 0 {
            why.push(format!("{errors} errors"));
        }
        if p99 as f64 / 1e6 >= args.p99_target_ms {
            why.push(format!("p99 ≥ {} ms", args.p99_target_ms));
        }
        if (sent as f64) < 0.97 * rate as f64 * secs {
            why.push("offered rate not reached".into());
        }
        let pass = why.is_empty();
        eprintln!(
            "[loadgen] step {step_id}: offered {rate}/s, sent {sent}, received {received}, \
             p50 {} ms, p99 {} ms, server {:.2} cores, {cpu_us:.1} µs/msg{}",
            ms(p50),
            ms(p99),
            cpu.servers / cpu.wall,
            if report { "" } else { " (warm-up)" }
        );
        if report {
            let mut row = vec![
                ("offered msg/s", thousands(rate)),
                ("delivered msg/s", thousands(achieved as u64)),
                ("p50 ms", ms(p50)),
                ("p99 ms", ms(p99)),
                ("p99.9 ms", ms(p999)),
                ("max ms", ms(all.max())),
            ];
            if cross_pairs > 0 && cross_pairs < args.pairs {
                row.push(("p99 same-node ms", ms(st.hist[0].quantile(0.99))));
                row.push(("p99 cross-node ms", ms(st.hist[1].quantile(0.99))));
            }
            row.push(("lost", thousands(lost)));
            row.push(("errors", errors.to_string()));
            row.push(("server CPU cores", format!("{:.2}", cpu.servers / cpu.wall)));
            row.push(("server CPU µs/msg", format!("{cpu_us:.1}")));
            row.push((
                "of which kernel µs/msg",
                format!("{:.1}", cpu.servers_sys * 1e6 / received.max(1) as f64),
            ));
            if !c.aux_pids.is_empty() {
                row.push((
                    "redis CPU µs/msg",
                    format!("{:.1}", cpu.aux * 1e6 / received.max(1) as f64),
                ));
            }
            row.push(("loadgen CPU cores", format!("{:.2}", cpu.me / cpu.wall)));
            row.push(("machine busy %", format!("{:.0}", cpu.machine * 100.0)));
            row.push((
                "other processes' CPU cores",
                format!("{:.2}", cpu.others_cores()),
            ));
            row.push((
                "result",
                if pass {
                    "pass".into()
                } else {
                    format!("fail: {}", why.join(", "))
                },
            ));
            c.emit(&title, &row);
            results.push(StepResult {
                rate,
                pass,
                p99,
                cpu_us,
            });
        }
        let closed = shared.closed.load(Relaxed);
        if closed > 0 {
            aborted = Some(format!("{closed} sockets closed by the server"));
        }
        if let Err(e) = c.check_servers_alive() {
            aborted = Some(e);
        }
        if aborted.is_some() {
            break;
        }
        // Let queues empty before the next step.
        sleep(Duration::from_millis(300)).await;
    }
    let codes = shared.error_codes.lock().unwrap().clone();
    if !codes.is_empty() {
        eprintln!("[loadgen] error codes received: {codes:?}");
    }

    let best = results.iter().filter(|r| r.pass).max_by_key(|r| r.rate);
    let lowest_fail = results
        .iter()
        .filter(|r| !r.pass && best.is_none_or(|b| r.rate > b.rate))
        .map(|r| r.rate)
        .min();
    let max_text = match (best, lowest_fail) {
        (Some(b), Some(f)) => format!("{} msg/s (fails at {})", thousands(b.rate), thousands(f)),
        (Some(b), None) => format!("≥ {} msg/s (highest tested)", thousands(b.rate)),
        (None, _) => format!(
            "< {} msg/s (no step passed)",
            thousands(results.iter().map(|r| r.rate).min().unwrap_or(0))
        ),
    };
    c.emit(
        &format!("{title}: summary"),
        &[
            ("pairs", thousands(args.pairs as u64)),
            ("cross-node pairs", thousands(cross_pairs as u64)),
            ("payload bytes", args.payload_bytes.to_string()),
            ("max rate with p99 < target and no loss", max_text.clone()),
            (
                "server CPU µs/msg (min–max over steps)",
                if results.is_empty() {
                    "-".into()
                } else {
                    format!(
                        "{:.1}–{:.1}",
                        results.iter().map(|r| r.cpu_us).fold(f64::MAX, f64::min),
                        results.iter().map(|r| r.cpu_us).fold(0.0, f64::max)
                    )
                },
            ),
            ("note", aborted.clone().unwrap_or_default()),
        ],
    );
    if c.targets {
        // CPU per message at the reference's load point (30k msg/s), else the best passing step,
        // else the first one.
        let cpu_ref = results
            .iter()
            .find(|r| r.rate == 30_000)
            .or(best)
            .or(results.first());
        if let Some(r) = cpu_ref {
            c.target(
                "server CPU per relayed message",
                "≤ 10 µs",
                "~29 µs",
                format!("{:.1} µs (at {} msg/s)", r.cpu_us, thousands(r.rate)),
                Some(r.cpu_us <= 10.0),
            );
            let per_core = 1e6 / r.cpu_us.max(1e-9);
            c.target(
                "relay rate per core (1 s / CPU per message)",
                "≥ 90,000 msg/s (3× Node.js)",
                "~30,000 msg/s",
                format!("{} msg/s", thousands(per_core as u64)),
                Some(per_core >= 90_000.0),
            );
        }
        let at30 = results.iter().find(|r| r.rate == 30_000);
        c.target(
            "p99 at 30,000 msg/s (zero loss)",
            "< 5 ms",
            "> 50 ms beyond 30k",
            at30.map_or("not measured".into(), |r| {
                format!(
                    "{} ms{}",
                    ms(r.p99),
                    if r.pass { "" } else { " (step failed)" }
                )
            }),
            Some(at30.is_some_and(|r| r.pass)),
        );
        c.target(
            "max relay rate, p99 < 5 ms and zero loss (whole 2-core machine, load generator included)",
            "—",
            "~30,000 msg/s",
            max_text,
            None,
        );
    }
    for r in readers {
        r.abort();
    }
    drop(groups);
    match aborted {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

// -------------------------------------------------------------------------------------------------
// handshake
// -------------------------------------------------------------------------------------------------

fn fake_sdp(token: &str, setup: &str) -> String {
    let fingerprint: Vec<String> = (0..32)
        .map(|i| format!("{:02X}", (i * 37 + 11) % 256))
        .collect();
    format!(
        "v=0\r\no=- {token} 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n\
         a=extmap-allow-mixed\r\na=msid-semantic: WMS\r\n\
         m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\n\
         a=ice-ufrag:{token}\r\na=ice-pwd:8mJ0N1k2l3m4n5o6p7q8r9s0\r\na=ice-options:trickle\r\n\
         a=fingerprint:sha-256 {}\r\na=setup:{setup}\r\na=mid:0\r\na=sctp-port:5000\r\n\
         a=max-message-size:262144\r\n",
        fingerprint.join(":")
    )
}

fn fake_candidate(token: &str, n: u32) -> SignalPayload {
    SignalPayload::Candidate {
        candidate: format!(
            "candidate:{} 1 udp 2122260223 127.0.0.1 {} typ host generation 0 ufrag {token} \
             network-id 1",
            1_000_000 + n,
            50_000 + n
        ),
        sdp_mid: Some("0".into()),
        sdp_m_line_index: Some(0),
    }
}

async fn send_signal(ws: &mut Ws, to: PeerId, payload: &SignalPayload) -> Result<(), String> {
    let payload = serde_json::to_string(payload).map_err(|e| e.to_string())?;
    send_msg(ws, &ClientMsg::Signal { to, payload }).await
}

/// What a received message means for the handshake `token`.
enum Got {
    Offer,
    Answer,
    Candidate,
    Stale,
}

fn classify(msg: ServerMsg, token: &str) -> Result<Got, String> {
    match msg {
        ServerMsg::Signal { payload, .. } => {
            let p: SignalPayload = serde_json::from_str(&payload).map_err(|e| e.to_string())?;
            let (got, text) = match &p {
                SignalPayload::Offer { sdp } => (Got::Offer, sdp),
                SignalPayload::Answer { sdp } => (Got::Answer, sdp),
                SignalPayload::Candidate { candidate, .. } => (Got::Candidate, candidate),
                // The load generator's handshakes are offer, answer and candidates only.
                SignalPayload::Hello { .. }
                | SignalPayload::Rejected
                | SignalPayload::Moved { .. } => return Ok(Got::Stale),
            };
            Ok(if text.contains(token) {
                got
            } else {
                Got::Stale
            })
        }
        ServerMsg::Error { code, message } => Err(format!("server error {code:?}: {message}")),
        _ => Ok(Got::Stale),
    }
}

/// Offer A→B; B answers and sends two candidates; A, on the answer, sends two candidates.
/// Done when A has the answer and two candidates and B the offer and two candidates.
async fn one_handshake(p: &mut Pair, id: usize) -> Result<u64, String> {
    let token = format!("hs{id:08}z");
    let t0 = now_ns();
    let offer = SignalPayload::Offer {
        sdp: fake_sdp(&token, "actpass"),
    };
    send_signal(&mut p.a, p.b_id, &offer).await?;
    let (mut a_got, mut b_got) = (0, 0);
    while a_got < 3 || b_got < 3 {
        tokio::select! {
            m = next_msg(&mut p.a) => match classify(m?, &token)? {
                Got::Answer => {
                    a_got += 1;
                    for n in 0..2 {
                        send_signal(&mut p.a, p.b_id, &fake_candidate(&token, n)).await?;
                    }
                }
                Got::Candidate => a_got += 1,
                Got::Offer => return Err("offer sent to the offerer".into()),
                Got::Stale => {}
            },
            m = next_msg(&mut p.b) => match classify(m?, &token)? {
                Got::Offer => {
                    b_got += 1;
                    let answer = SignalPayload::Answer { sdp: fake_sdp(&token, "active") };
                    send_signal(&mut p.b, p.a_id, &answer).await?;
                    for n in 2..4 {
                        send_signal(&mut p.b, p.a_id, &fake_candidate(&token, n)).await?;
                    }
                }
                Got::Candidate => b_got += 1,
                Got::Answer => return Err("answer sent to the answerer".into()),
                Got::Stale => {}
            },
        }
    }
    Ok(now_ns() - t0)
}

async fn handshake(args: HandshakeArgs) -> Result<(), String> {
    let c = &args.common;
    let sources = Arc::new(c.validate()?);
    check_fd_budget(args.idle + args.pairs * 2)?;
    if args.pairs == 0 || args.handshakes == 0 || args.rate <= 0.0 {
        return Err("need pairs, handshakes and a rate".into());
    }
    let deadline = Instant::now() + Duration::from_secs(c.max_secs.saturating_sub(5));
    let fleet = connect_idle(c, &sources, args.idle, 0, deadline).await;
    eprintln!(
        "[loadgen] {} idle peers held ({} failed) in {:.1} s",
        fleet.connected, fleet.failed, fleet.secs
    );
    let pairs = setup_pairs(c, &sources, args.pairs, args.placement, deadline).await?;
    let cross = pairs.iter().filter(|p| p.kind == 1).count();
    sleep(Duration::from_millis(500)).await;
    // Background CPU with everything connected and nothing happening (pings, presence refreshes),
    // subtracted from the handshakes' CPU below.
    let b0 = c.snap();
    sleep(Duration::from_secs_f64(args.baseline_secs)).await;
    let background = c.cpu(b0, c.snap());
    let (bg_servers, bg_aux) = (
        background.servers / background.wall.max(1e-9),
        background.aux / background.wall.max(1e-9),
    );

    let hist = Arc::new(Hist::new());
    let failed = Arc::new(AtomicUsize::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let n_pairs = pairs.len();
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let t0 = c.snap();
    let tasks: Vec<_> = pairs
        .into_iter()
        .enumerate()
        .map(|(k, mut pair)| {
            let (hist, failed, first_error) = (hist.clone(), failed.clone(), first_error.clone());
            let (total, rate) = (args.handshakes, args.rate);
            tokio::spawn(async move {
                let mut g = k;
                while g < total {
                    let at = start + Duration::from_secs_f64(g as f64 / rate);
                    if at.into_std() > deadline {
                        failed.fetch_add(1, Relaxed);
                        g += n_pairs;
                        continue;
                    }
                    sleep_until(at).await;
                    match timeout(HANDSHAKE_TIMEOUT, one_handshake(&mut pair, g)).await {
                        Ok(Ok(ns)) => hist.record(ns),
                        other => {
                            failed.fetch_add(1, Relaxed);
                            let e = match other {
                                Ok(Err(e)) => e,
                                _ => "timed out".into(),
                            };
                            first_error.lock().unwrap().get_or_insert(e);
                        }
                    }
                    g += n_pairs;
                }
                pair
            })
        })
        .collect();
    let mut pairs_back = Vec::new();
    for t in tasks {
        if let Ok(p) = t.await {
            pairs_back.push(p);
        }
    }
    let t1 = c.snap();
    let cpu = c.cpu(t0, t1);
    let ok = hist.count();
    let failed = failed.load(Relaxed);
    let closed = fleet.closed.load(Relaxed);
    let mut row = vec![
        ("nodes", c.nodes.len().to_string()),
        ("idle peers held", thousands(fleet.connected as u64)),
        ("pairs (cross-node)", format!("{n_pairs} ({cross})")),
        ("handshakes ok", thousands(ok)),
        ("failed", failed.to_string()),
        ("offered /s", format!("{:.0}", args.rate)),
        ("p50 ms", ms(hist.quantile(0.5))),
        ("p99 ms", ms(hist.quantile(0.99))),
        ("p99.9 ms", ms(hist.quantile(0.999))),
        ("max ms", ms(hist.max())),
        ("server background CPU cores", format!("{bg_servers:.2}")),
        (
            "server CPU µs/handshake (net of background)",
            format!(
                "{:.0}",
                (cpu.servers - bg_servers * cpu.wall).max(0.0) * 1e6 / ok.max(1) as f64
            ),
        ),
    ];
    if !c.aux_pids.is_empty() {
        row.push(("redis background CPU cores", format!("{bg_aux:.2}")));
        row.push((
            "redis CPU µs/handshake (net)",
            format!(
                "{:.0}",
                (cpu.aux - bg_aux * cpu.wall).max(0.0) * 1e6 / ok.max(1) as f64
            ),
        ));
    }
    row.push(("machine busy %", format!("{:.0}", cpu.machine * 100.0)));
    row.push((
        "other processes' CPU cores",
        format!("{:.2}", cpu.others_cores()),
    ));
    row.push(("idle closed", closed.to_string()));
    if let Some(e) = first_error.lock().unwrap().clone() {
        row.push(("first error", e.chars().take(80).collect()));
    }
    c.emit(&c.title("Handshakes"), &row);
    let _ = fleet.stop.send(true);
    drop(pairs_back);
    sleep(Duration::from_millis(300)).await;
    if failed > 0 || fleet.failed > 0 || closed > 0 {
        return Err(format!(
            "{failed} handshakes failed, {} idle peers failed to connect, {closed} closed",
            fleet.failed
        ));
    }
    Ok(())
}

// -------------------------------------------------------------------------------------------------
// report
// -------------------------------------------------------------------------------------------------

/// Column names and values of one result row.
type Row = (Vec<String>, Vec<String>);

fn report(args: ReportArgs) -> Result<(), String> {
    let text = std::fs::read_to_string(&args.results)
        .map_err(|e| format!("{}: {e}", args.results.display()))?;
    // Tables in order of first appearance, "Targets" first.
    let mut order: Vec<String> = Vec::new();
    let mut rows: BTreeMap<String, Vec<Row>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("bad result line {line}: {e}"))?;
        let strings = |k: &str| -> Vec<String> {
            v[k].as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| match x {
                            serde_json::Value::String(s) => s.clone(),
                            other => other.to_string(),
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let table = v["table"].as_str().unwrap_or("results").to_owned();
        if !rows.contains_key(&table) {
            order.push(table.clone());
        }
        rows.entry(table)
            .or_default()
            .push((strings("cols"), strings("vals")));
    }
    if let Some(i) = order.iter().position(|t| t == "Targets") {
        let t = order.remove(i);
        order.insert(0, t);
    }
    let cell = |s: &str| s.replace('|', "\\|");
    let mut out = String::new();
    for table in order {
        let _ = writeln!(out, "\n#### {table}\n");
        let mut last_cols: Option<&Vec<String>> = None;
        for (cols, vals) in &rows[&table] {
            if last_cols != Some(cols) {
                if last_cols.is_some() {
                    out.push('\n');
                }
                let _ = writeln!(
                    out,
                    "| {} |",
                    cols.iter().map(|c| cell(c)).collect::<Vec<_>>().join(" | ")
                );
                let _ = writeln!(out, "|{}", "---|".repeat(cols.len()));
                last_cols = Some(cols);
            }
            let _ = writeln!(
                out,
                "| {} |",
                vals.iter().map(|v| cell(v)).collect::<Vec<_>>().join(" | ")
            );
        }
    }
    print!("{out}");
    Ok(())
}

// -------------------------------------------------------------------------------------------------

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    epoch();
    let max_secs = match &cli.cmd {
        Cmd::Idle(a) => Some(a.common.max_secs),
        Cmd::Relay(a) => Some(a.common.max_secs),
        Cmd::Handshake(a) => Some(a.common.max_secs),
        Cmd::Report(_) => None,
    };
    if let Some(secs) = max_secs {
        watchdog(secs);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("[loadgen] runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.cmd {
            Cmd::Idle(a) => idle(a).await,
            Cmd::Relay(a) => relay(a).await,
            Cmd::Handshake(a) => handshake(a).await,
            Cmd::Report(a) => report(a),
        }
    });
    // Held sockets and reader tasks are not awaited: dropping the runtime ends them.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("[loadgen] error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
