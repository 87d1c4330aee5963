//! One WebRTC connection for the terminal: str0m's sans-IO `Rtc`, driven by our own tokio UDP
//! sockets and timer.
//!
//! Why str0m and not webrtc-rs: the CLI needs one data channel and nothing else. str0m is that
//! (ICE, DTLS, SCTP) as a state machine with no runtime of its own, in pure Rust with the
//! `rust-crypto` backend, so it adds no C code and no second async runtime to the build; webrtc-rs
//! mirrors the browser's whole API (media, interceptors, its own tasks per connection) and brings
//! several times the code. The data channel carries the browser's frames byte for byte, so the
//! transfer engine (`crate::transfer`) and the sealing (`crate::seal`) are shared, not copied.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::net::{IpAddr, SocketAddr};
use std::task::Poll;
use std::time::{Duration, Instant};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcConfig};
use tokio::io::ReadBuf;
use tokio::net::UdpSocket;

/// The data channel's label, as the browser's sender names it.
pub const LABEL: &str = "files";

/// Bytes str0m queues on the channel before `send` says "not now" (the browser's high-water
/// mark), and the level at which it says "writable" again (its low-water mark).
const SEND_QUEUE: usize = 4 * 1024 * 1024;
const LOW_WATER: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    #[error("WebRTC: {0}")]
    Rtc(#[from] str0m::RtcError),
    #[error("the other side's session description is not usable: {0}")]
    Sdp(String),
    #[error("no network address to offer the other side")]
    NoAddress,
}

/// What the connection has to say to its owner.
#[derive(Debug)]
pub enum PeerEvent {
    /// The data channel is open.
    Open,
    Text(String),
    Binary(Vec<u8>),
    /// The channel's queue drained to the low-water mark: send more.
    Writable,
    /// The channel or the connection is gone.
    Closed,
}

/// A UDP socket on one local address (str0m wants to know the address each packet came in on).
struct Socket {
    udp: UdpSocket,
    local: SocketAddr,
}

pub struct Peer {
    rtc: Rtc,
    sockets: Vec<Socket>,
    channel: Option<ChannelId>,
    pending: Option<SdpPendingOffer>,
    events: VecDeque<PeerEvent>,
    buf: Vec<u8>,
    closed: bool,
}

impl Peer {
    /// A connection with a host candidate on every local IPv4 address (loopback included, so two
    /// peers on one machine need no network), one UDP socket each.
    pub async fn new() -> Result<Self, PeerError> {
        let mut rtc = RtcConfig::new()
            .set_crypto_provider(std::sync::Arc::new(str0m::crypto::from_feature_flags()))
            .set_sctp_max_buffered_amount(SEND_QUEUE)
            .build(Instant::now());
        let mut sockets = Vec::new();
        for ip in local_addresses() {
            let udp = UdpSocket::bind(SocketAddr::new(ip, 0)).await?;
            let local = udp.local_addr()?;
            let candidate = Candidate::host(local, "udp")
                .map_err(|e| PeerError::Sdp(format!("host candidate {local}: {e}")))?;
            if rtc.add_local_candidate(candidate).is_some() {
                sockets.push(Socket { udp, local });
            }
        }
        if sockets.is_empty() {
            return Err(PeerError::NoAddress);
        }
        Ok(Self {
            rtc,
            sockets,
            channel: None,
            pending: None,
            events: VecDeque::new(),
            buf: vec![0; 2048],
            closed: false,
        })
    }

    /// The offering side: an offer with the data channel in it (our candidates included).
    pub fn offer(&mut self) -> Result<String, PeerError> {
        let mut api = self.rtc.sdp_api();
        api.add_channel(LABEL.to_owned());
        let (offer, pending) = api
            .apply()
            .ok_or_else(|| PeerError::Sdp("nothing to offer".into()))?;
        self.pending = Some(pending);
        Ok(offer.to_sdp_string())
    }

    /// The offering side: the other side's answer to [`Peer::offer`].
    pub fn accept_answer(&mut self, sdp: &str) -> Result<(), PeerError> {
        let answer = SdpAnswer::from_sdp_string(sdp).map_err(|e| PeerError::Sdp(e.to_string()))?;
        let pending = self
            .pending
            .take()
            .ok_or_else(|| PeerError::Sdp("an answer to no offer".into()))?;
        self.rtc.sdp_api().accept_answer(pending, answer)?;
        Ok(())
    }

    /// The answering side: our answer (our candidates included) to the other side's offer.
    pub fn answer(&mut self, offer: &str) -> Result<String, PeerError> {
        let offer = SdpOffer::from_sdp_string(offer).map_err(|e| PeerError::Sdp(e.to_string()))?;
        Ok(self.rtc.sdp_api().accept_offer(offer)?.to_sdp_string())
    }

    /// A candidate the other side trickled (`candidate:…`). One we cannot use is skipped.
    pub fn add_remote_candidate(&mut self, candidate: &str) {
        let line = candidate.trim().trim_start_matches("a=");
        if let Ok(c) = Candidate::from_sdp_string(line) {
            self.rtc.add_remote_candidate(c);
        }
    }

    /// Sends a text message; `false` when the queue is full (wait for [`PeerEvent::Writable`]).
    pub fn send_text(&mut self, text: &str) -> Result<bool, PeerError> {
        self.write(false, text.as_bytes())
    }

    /// Sends a binary message; `false` when the queue is full (wait for [`PeerEvent::Writable`]).
    pub fn send_binary(&mut self, bytes: &[u8]) -> Result<bool, PeerError> {
        self.write(true, bytes)
    }

    fn write(&mut self, binary: bool, bytes: &[u8]) -> Result<bool, PeerError> {
        let Some(mut channel) = self.channel.and_then(|id| self.rtc.channel(id)) else {
            return Ok(false);
        };
        Ok(channel.write(binary, bytes)?)
    }

    /// Bytes queued on the channel and not yet sent.
    pub fn buffered(&mut self) -> usize {
        self.channel
            .and_then(|id| self.rtc.channel(id))
            .map_or(0, |mut c| c.buffered_amount())
    }

    /// Closes the connection (the other side sees the channel close).
    pub async fn close(&mut self) {
        self.rtc.disconnect();
        let _ = self.flush().await;
    }

    /// The next event. Cancel-safe: it awaits only socket reads and the timer, and nothing
    /// taken from str0m is held across an await.
    pub async fn next(&mut self) -> Result<PeerEvent, PeerError> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return Ok(event);
            }
            if self.closed {
                return Ok(PeerEvent::Closed);
            }
            let deadline = self.flush().await?;
            if !self.events.is_empty() {
                continue;
            }
            let sleep = tokio::time::sleep_until(deadline.into());
            tokio::select! {
                received = recv(&self.sockets, &mut self.buf) => {
                    let (len, source, destination) = received?;
                    let Ok(contents) = self.buf[..len].try_into() else { continue };
                    let input = Input::Receive(
                        Instant::now(),
                        Receive { proto: Protocol::Udp, source, destination, contents },
                    );
                    if self.rtc.accepts(&input) {
                        self.rtc.handle_input(input)?;
                    }
                }
                _ = sleep => {
                    self.rtc.handle_input(Input::Timeout(Instant::now()))?;
                }
            }
        }
    }

    /// Sends what str0m has to send and keeps what it has to say, until it wants time to pass.
    async fn flush(&mut self) -> Result<Instant, PeerError> {
        loop {
            match self.rtc.poll_output()? {
                Output::Timeout(at) => {
                    // str0m says "far future" when idle; a bound keeps the timer sane.
                    return Ok(at.min(Instant::now() + Duration::from_secs(1)));
                }
                Output::Transmit(t) => {
                    if let Some(s) = self.sockets.iter().find(|s| s.local == t.source) {
                        // A datagram the kernel cannot take is a lost packet, which SCTP repairs.
                        let _ = s.udp.send_to(&t.contents, t.destination).await;
                    }
                }
                Output::Event(event) => self.event(event),
            }
        }
    }

    fn event(&mut self, event: Event) {
        match event {
            Event::ChannelOpen(id, _) => {
                self.channel = Some(id);
                if let Some(mut c) = self.rtc.channel(id) {
                    c.set_buffered_amount_low_threshold(LOW_WATER);
                }
                self.events.push_back(PeerEvent::Open);
            }
            Event::ChannelData(data) if Some(data.id) == self.channel => {
                self.events.push_back(if data.binary {
                    PeerEvent::Binary(data.data)
                } else {
                    PeerEvent::Text(String::from_utf8_lossy(&data.data).into_owned())
                });
            }
            Event::ChannelBufferedAmountLow(id) if Some(id) == self.channel => {
                self.events.push_back(PeerEvent::Writable);
            }
            Event::ChannelClose(id) if Some(id) == self.channel => self.close_now(),
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => self.close_now(),
            _ => {}
        }
    }

    fn close_now(&mut self) {
        if !self.closed {
            self.closed = true;
            self.events.push_back(PeerEvent::Closed);
        }
    }
}

/// The first datagram on any of the sockets: its length, where it came from, where it arrived.
async fn recv(
    sockets: &[Socket],
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr, SocketAddr)> {
    poll_fn(|cx| {
        for s in sockets {
            let mut read = ReadBuf::new(buf);
            if let Poll::Ready(r) = s.udp.poll_recv_from(cx, &mut read) {
                return Poll::Ready(r.map(|source| (read.filled().len(), source, s.local)));
            }
        }
        Poll::Pending
    })
    .await
}

/// Every IPv4 address of this machine's interfaces, loopback first.
fn local_addresses() -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|i| i.ip())
        .filter(IpAddr::is_ipv4)
        .collect();
    ips.sort_by_key(|ip| !ip.is_loopback());
    ips.dedup();
    ips
}
