//! TURN over TCP (RFC 8656 §3.1): for browsers whose network lets no UDP out. The `turn` crate
//! serves packet connections, so this listener presents every accepted TCP stream as datagrams
//! of one [`Conn`]: `recv_from` yields each whole STUN message or ChannelData message with the
//! stream's address, `send_to` writes to the stream with that address. Only message boundaries
//! are read here (the length fields of the two headers); the messages themselves are the
//! crate's to parse.

use crate::server::limits::ip_key;
use crate::server::metrics::{Metrics, TurnRefusal};
use async_trait::async_trait;
use dashmap::DashMap;
use std::any::Any;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use webrtc_util::Conn;

/// Messages queued towards one TCP client; more are dropped, as UDP would.
const WRITE_QUEUE: usize = 256;
/// Messages read from all clients, waiting for the server's read loop.
const READ_QUEUE: usize = 1024;
/// A client that sends nothing for this long is dropped (browsers refresh every few minutes
/// and send connectivity checks every few seconds while in use).
const IDLE: Duration = Duration::from_secs(15 * 60);

/// Why a stream was cut: its bytes were not STUN or ChannelData.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("neither a STUN message nor ChannelData")]
    Unknown,
}

/// Length of the message starting with `header` (its first 4 bytes) including the header, and
/// how many bytes of padding follow it on the stream.
pub fn frame_len(header: [u8; 4]) -> Result<(usize, usize), FramingError> {
    let length = usize::from(u16::from_be_bytes([header[2], header[3]]));
    match header[0] {
        // STUN: the first two bits are zero; 20-byte header, attributes already 4-aligned.
        0x00..=0x3f => Ok((20 + length, 0)),
        // ChannelData (channel numbers 0x4000–0x7fff): 4-byte header, padded to 4 on streams.
        0x40..=0x7f => Ok((4 + length, (4 - length % 4) % 4)),
        _ => Err(FramingError::Unknown),
    }
}

type Datagram = (Vec<u8>, SocketAddr);

/// The listener as one packet connection.
pub struct TcpMux {
    local: SocketAddr,
    inbox: tokio::sync::Mutex<mpsc::Receiver<Datagram>>,
    writers: Arc<DashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>,
    /// The accept loop, ended with the listener.
    _accept: tokio_util::task::AbortOnDropHandle<()>,
}

/// Connection caps at accept time.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    pub total: usize,
    pub per_ip: usize,
}

impl TcpMux {
    pub fn start(
        listener: TcpListener,
        caps: Caps,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (to_inbox, inbox) = mpsc::channel(READ_QUEUE);
        let writers: Arc<DashMap<SocketAddr, mpsc::Sender<Vec<u8>>>> = Arc::default();
        let per_ip: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
        let accept = tokio::spawn({
            let writers = writers.clone();
            async move {
                loop {
                    let Ok((stream, addr)) = listener.accept().await else {
                        // EMFILE and the like: let the moment pass.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let Some(slot) = Slot::take(&per_ip, &writers, addr, caps) else {
                        metrics.turn_refuse(TurnRefusal::TcpCap);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let (tx, rx) = mpsc::channel(WRITE_QUEUE);
                    writers.insert(addr, tx);
                    tokio::spawn(serve(
                        stream,
                        addr,
                        rx,
                        to_inbox.clone(),
                        slot,
                        metrics.clone(),
                    ));
                }
            }
        });
        Ok(Self {
            local,
            inbox: tokio::sync::Mutex::new(inbox),
            writers,
            _accept: tokio_util::task::AbortOnDropHandle::new(accept),
        })
    }
}

/// One client's place, given back (writer and per-IP count) when its stream ends.
struct Slot {
    addr: SocketAddr,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    writers: Arc<DashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>,
}

impl Slot {
    fn take(
        per_ip: &Arc<Mutex<HashMap<IpAddr, usize>>>,
        writers: &Arc<DashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>,
        addr: SocketAddr,
        caps: Caps,
    ) -> Option<Self> {
        let mut counts = per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = counts.values().sum();
        let mine = counts.entry(ip_key(addr.ip())).or_default();
        if total >= caps.total || *mine >= caps.per_ip {
            return None;
        }
        *mine += 1;
        Some(Self {
            addr,
            per_ip: per_ip.clone(),
            writers: writers.clone(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.writers.remove(&self.addr);
        let mut counts = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let key = ip_key(self.addr.ip());
        if let Some(n) = counts.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&key);
            }
        }
    }
}

/// Reads whole messages off one stream into the shared inbox and writes what is sent to it.
async fn serve(
    stream: TcpStream,
    addr: SocketAddr,
    mut outbox: mpsc::Receiver<Vec<u8>>,
    inbox: mpsc::Sender<Datagram>,
    _slot: Slot,
    metrics: Arc<Metrics>,
) {
    let (mut reader, mut writer) = stream.into_split();
    let read = async {
        loop {
            let mut header = [0u8; 4];
            match tokio::time::timeout(IDLE, reader.read_exact(&mut header)).await {
                Ok(Ok(_)) => {}
                _ => return,
            }
            let Ok((len, padding)) = frame_len(header) else {
                metrics.turn_refuse(TurnRefusal::TcpFraming);
                return;
            };
            let mut message = vec![0u8; len + padding];
            message[..4].copy_from_slice(&header);
            if reader.read_exact(&mut message[4..]).await.is_err() {
                return;
            }
            message.truncate(len);
            if len >= 20 && header[0] < 0x40 && !stun::message::is_message(&message) {
                metrics.turn_refuse(TurnRefusal::TcpFraming);
                return;
            }
            if inbox.send((message, addr)).await.is_err() {
                return;
            }
        }
    };
    let write = async {
        while let Some(message) = outbox.recv().await {
            if writer.write_all(&message).await.is_err() {
                return;
            }
        }
    };
    // Either side ending ends the client.
    tokio::select! {
        _ = read => {},
        _ = write => {},
    }
}

#[async_trait]
impl Conn for TcpMux {
    async fn connect(&self, _addr: SocketAddr) -> Result<(), webrtc_util::Error> {
        Err(webrtc_util::Error::Other(
            "a listener does not connect".into(),
        ))
    }

    async fn recv(&self, buf: &mut [u8]) -> Result<usize, webrtc_util::Error> {
        self.recv_from(buf).await.map(|(n, _)| n)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> Result<(usize, SocketAddr), webrtc_util::Error> {
        let mut inbox = self.inbox.lock().await;
        let (message, from) = inbox
            .recv()
            .await
            .ok_or_else(|| webrtc_util::Error::Other("TCP listener stopped".into()))?;
        // The crate's buffer holds any STUN message (64 KiB + header); a longer one is cut as
        // a datagram would be, and the crate refuses it.
        let n = message.len().min(buf.len());
        buf[..n].copy_from_slice(&message[..n]);
        Ok((n, from))
    }

    async fn send(&self, _buf: &[u8]) -> Result<usize, webrtc_util::Error> {
        Err(webrtc_util::Error::Other("send to an address".into()))
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> Result<usize, webrtc_util::Error> {
        let Some(writer) = self.writers.get(&target).map(|w| w.clone()) else {
            return Err(webrtc_util::Error::Other(
                "no TCP client at that address".into(),
            ));
        };
        // A full queue drops the message (a slow client must not stall the server's loop).
        let _ = writer.try_send(buf.to_vec());
        Ok(buf.len())
    }

    fn local_addr(&self) -> Result<SocketAddr, webrtc_util::Error> {
        Ok(self.local)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    async fn close(&self) -> Result<(), webrtc_util::Error> {
        // Called when any one allocation on it closes: the listener itself stays.
        Ok(())
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_boundaries_come_from_the_two_headers() {
        // STUN binding request with 8 bytes of attributes.
        assert_eq!(frame_len([0x00, 0x01, 0x00, 0x08]), Ok((28, 0)));
        // ChannelData on 0x4000 with 5 bytes: padded to 8 on a stream.
        assert_eq!(frame_len([0x40, 0x00, 0x00, 0x05]), Ok((9, 3)));
        assert_eq!(frame_len([0x7f, 0xff, 0x00, 0x08]), Ok((12, 0)));
        assert_eq!(
            frame_len([0x80, 0x00, 0x00, 0x00]),
            Err(FramingError::Unknown)
        );
    }
}
