//! `beamdrop send FILE…`: creates a share, prints its link, and serves every receiver that
//! says a sealed hello (browsers and CLIs alike) until stopped, with the transfer engine's own
//! sender side ([`Outgoing`], [`crate::transfer::hello`]).

use super::peer::{Peer, PeerEvent};
use super::signal::{self, Signaling};
use super::CliError;
use crate::protocol::{ClientMsg, PeerId, ServerMsg, SignalPayload};
use crate::seal::{ShareKey, SECRET_BYTES};
use crate::transfer::blocks::{block_hash, root_hash, BlockHash, Layout};
use crate::transfer::hello::{self, Answer, Known};
use crate::transfer::outgoing::{Job, Outgoing};
use crate::transfer::{frame, FileId, FileMeta, FlowControl, PeerMsg, TransferId};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

/// Receivers still connecting at once (as the browser's sender allows).
const MAX_PENDING: usize = 8;

/// A file offered, with the hashes of the blocks read so far (shared by every receiver).
pub struct SharedFile {
    pub meta: FileMeta,
    path: PathBuf,
    layout: Layout,
    hashes: Mutex<Vec<Option<BlockHash>>>,
}

impl SharedFile {
    fn read(&self, index: u32, buf: &mut Vec<u8>) -> std::io::Result<()> {
        let (start, end) = self.layout.range(index);
        buf.resize((end - start) as usize, 0);
        File::open(&self.path)?.read_exact_at(buf, start)
    }

    /// The hash of block `index` of `bytes` (remembered).
    fn block(&self, index: u32, bytes: &[u8]) -> BlockHash {
        let mut hashes = self.hashes.lock().unwrap_or_else(|e| e.into_inner());
        *hashes[index as usize].get_or_insert_with(|| block_hash(&self.layout, index, bytes))
    }

    /// The file's hash, reading (not sending) the blocks not hashed yet.
    fn root(&self) -> std::io::Result<BlockHash> {
        let mut buf = Vec::new();
        for index in 0..self.layout.count() {
            let known = self.hashes.lock().unwrap_or_else(|e| e.into_inner())[index as usize];
            if known.is_none() {
                self.read(index, &mut buf)?;
                self.block(index, &buf);
            }
        }
        let hashes: Vec<BlockHash> = self
            .hashes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flatten()
            .copied()
            .collect();
        root_hash(&self.layout, &hashes)
            .ok_or_else(|| std::io::Error::other("block hashes do not cover the file"))
    }
}

/// The files of `paths`: files as they are, folders walked (their files keep their path under
/// the folder's own name, as a browser gives a dropped folder's).
pub fn collect(paths: &[PathBuf]) -> Result<Vec<Arc<SharedFile>>, CliError> {
    let mut found = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|e| CliError::Folder {
            path: path.clone(),
            source: e,
        })?;
        if meta.is_dir() {
            let top = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            walk(path, &top, &mut found)?;
        } else {
            found.push((path.clone(), String::new()));
        }
    }
    found
        .into_iter()
        .enumerate()
        .map(|(i, (path, rel))| shared(FileId(i as u32 + 1), path, rel))
        .collect()
}

fn walk(dir: &Path, rel: &str, found: &mut Vec<(PathBuf, String)>) -> Result<(), CliError> {
    let folder = |e| CliError::Folder {
        path: dir.to_path_buf(),
        source: e,
    };
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(folder)?
        .collect::<Result<_, _>>()
        .map_err(folder)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let kind = entry.file_type().map_err(folder)?;
        let inner = format!("{rel}/{name}");
        if kind.is_dir() {
            walk(&entry.path(), &inner, found)?;
        } else if kind.is_file() {
            found.push((entry.path(), inner));
        }
        // Links are not followed: a share holds what is in the folder.
    }
    Ok(())
}

fn shared(id: FileId, path: PathBuf, rel: String) -> Result<Arc<SharedFile>, CliError> {
    let meta = std::fs::metadata(&path).map_err(|e| CliError::Folder {
        path: path.clone(),
        source: e,
    })?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64);
    let layout = Layout::new(meta.len());
    Ok(Arc::new(SharedFile {
        meta: FileMeta {
            id,
            name,
            path: rel,
            size: meta.len(),
            mime: String::new(),
            modified,
            hash: None,
        },
        path,
        layout,
        hashes: Mutex::new(vec![None; layout.count() as usize]),
    }))
}

/// A share made and being served.
pub struct Share {
    pub link: String,
    sig: Signaling,
    key: ShareKey,
    files: Arc<Vec<Arc<SharedFile>>>,
    /// Bytes sent to all receivers.
    pub sent: Arc<AtomicU64>,
}

/// Creates the share on the server at `base` for `files`.
pub async fn share(base: &str, files: Vec<Arc<SharedFile>>) -> Result<Share, CliError> {
    let mut sig = Signaling::connect(base).await?;
    sig.send(&ClientMsg::CreateShare).await?;
    let share = loop {
        match sig.recv().await? {
            ServerMsg::ShareCreated { share, .. } => break share,
            ServerMsg::Error { code, message } => return Err(CliError::Server { code, message }),
            _ => {}
        }
    };
    let secret = hex::encode(rand::random::<[u8; SECRET_BYTES]>());
    let key = ShareKey::derive(&secret, &share)?;
    let origin = base.trim_end_matches('/');
    Ok(Share {
        link: format!("{origin}/s/{}#{secret}", share.as_str()),
        sig,
        key,
        files: Arc::new(files),
        sent: Arc::new(AtomicU64::new(0)),
    })
}

/// A receiver being served: the engine's view of it, where its signals go, and its task.
struct Route {
    known: Known,
    open: Arc<AtomicBool>,
    signals: mpsc::UnboundedSender<SignalPayload>,
    _task: AbortOnDropHandle<()>,
}

impl Share {
    /// Serves receivers until the server goes away (or the caller stops awaiting).
    pub async fn serve(mut self) -> Result<(), CliError> {
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<(PeerId, SignalPayload)>();
        let mut routes: HashMap<PeerId, Route> = HashMap::new();
        loop {
            tokio::select! {
                msg = self.sig.recv() => match msg? {
                    ServerMsg::Signal { from, payload } => {
                        self.signal(from, &payload, &mut routes, &out_tx).await?;
                    }
                    ServerMsg::Error { code, message } => {
                        tracing::warn!(?code, "server: {message}");
                    }
                    _ => {}
                },
                Some((to, payload)) = out_rx.recv() => {
                    self.sig.signal(&self.key, to, &payload).await?;
                }
            }
        }
    }

    async fn signal(
        &mut self,
        from: PeerId,
        payload: &str,
        routes: &mut HashMap<PeerId, Route>,
        out: &mpsc::UnboundedSender<(PeerId, SignalPayload)>,
    ) -> Result<(), CliError> {
        let Some(opened) = signal::open(&self.key, from, self.sig.me, payload) else {
            // Sealed with another key, or altered on the way: say so (sealed with ours).
            self.sig
                .signal(&self.key, from, &SignalPayload::Rejected)
                .await?;
            return Ok(());
        };
        match opened {
            SignalPayload::Hello { attempt } => {
                for r in routes.values_mut() {
                    r.known.open = r.open.load(Ordering::Relaxed);
                }
                let known: Vec<Known> = routes.values().map(|r| r.known).collect();
                match hello::answer(&known, from, attempt, MAX_PENDING) {
                    Answer::Stale | Answer::Busy { .. } => {}
                    Answer::Connect { replace } => {
                        for peer in replace {
                            routes.remove(&peer);
                        }
                        let (tx, rx) = mpsc::unbounded_channel();
                        let open = Arc::new(AtomicBool::new(false));
                        let task = tokio::spawn(serve_receiver(
                            from,
                            self.files.clone(),
                            rx,
                            out.clone(),
                            open.clone(),
                            self.sent.clone(),
                        ));
                        routes.insert(
                            from,
                            Route {
                                known: Known {
                                    key: from,
                                    via: from,
                                    attempt,
                                    open: false,
                                },
                                open,
                                signals: tx,
                                _task: AbortOnDropHandle::new(task),
                            },
                        );
                    }
                }
            }
            other => {
                if let Some(r) = routes.get(&from) {
                    let _ = r.signals.send(other);
                }
            }
        }
        Ok(())
    }
}

/// One receiver's connection: offer, then serve its requests in order until it goes.
async fn serve_receiver(
    peer_id: PeerId,
    files: Arc<Vec<Arc<SharedFile>>>,
    mut signals: mpsc::UnboundedReceiver<SignalPayload>,
    out: mpsc::UnboundedSender<(PeerId, SignalPayload)>,
    open: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) {
    if let Err(e) = serve_peer(peer_id, &files, &mut signals, &out, &open, &sent).await {
        tracing::info!(%peer_id, "receiver: {e}");
    }
}

async fn serve_peer(
    peer_id: PeerId,
    files: &[Arc<SharedFile>],
    signals: &mut mpsc::UnboundedReceiver<SignalPayload>,
    out: &mpsc::UnboundedSender<(PeerId, SignalPayload)>,
    open: &AtomicBool,
    sent: &AtomicU64,
) -> Result<(), CliError> {
    let mut peer = Peer::new().await?;
    let sdp = peer.offer()?;
    let _ = out.send((peer_id, SignalPayload::Offer { sdp }));
    let mut serving = Serving {
        files,
        outgoing: Outgoing::default(),
        current: None,
        flow: FlowControl::DEFAULT,
        sent,
    };
    loop {
        tokio::select! {
            signal = signals.recv() => match signal {
                Some(SignalPayload::Answer { sdp }) => peer.accept_answer(&sdp)?,
                Some(SignalPayload::Candidate { candidate, .. }) => {
                    peer.add_remote_candidate(&candidate);
                }
                Some(_) => {}
                // Replaced by a newer connection of the same receiver.
                None => return Ok(()),
            },
            event = peer.next() => match event? {
                PeerEvent::Open => {
                    open.store(true, Ordering::Relaxed);
                    let files = files.iter().map(|f| f.meta.clone()).collect();
                    serving.say(&mut peer, &PeerMsg::Manifest { files })?;
                }
                PeerEvent::Text(text) => serving.text(&mut peer, &text)?,
                PeerEvent::Binary(_) | PeerEvent::Writable => {}
                PeerEvent::Closed => return Ok(()),
            },
        }
        serving.pump(&mut peer)?;
    }
}

/// The request being sent: where it stands.
struct Current {
    job: Job,
    file: Arc<SharedFile>,
    /// Index into `job.blocks` of the block in `block` (or the next to read).
    next: usize,
    block: Vec<u8>,
    /// Bytes of `block` already sent.
    pos: usize,
    /// Bytes of the request sent, against the receiver's window.
    sent: u64,
    /// A control message that found the channel full.
    waiting: Option<String>,
    frame: Vec<u8>,
}

struct Serving<'a> {
    files: &'a [Arc<SharedFile>],
    outgoing: Outgoing,
    current: Option<Current>,
    flow: FlowControl,
    sent: &'a AtomicU64,
}

impl Serving<'_> {
    fn say(&mut self, peer: &mut Peer, msg: &PeerMsg) -> Result<(), CliError> {
        let text = serde_json::to_string(msg).map_err(|e| CliError::Protocol(e.to_string()))?;
        // Control messages are small and few; the queue's limit is for frames.
        if !peer.send_text(&text)? {
            return Err(CliError::Protocol(
                "the channel refused a control message".into(),
            ));
        }
        Ok(())
    }

    fn text(&mut self, peer: &mut Peer, text: &str) -> Result<(), CliError> {
        let Ok(msg) = serde_json::from_str::<PeerMsg>(text) else {
            return Ok(());
        };
        match msg {
            PeerMsg::Request {
                transfer,
                file,
                ranges,
            } => {
                let refusal = match self.files.iter().find(|f| f.meta.id == file) {
                    None => Some("no longer shared".to_owned()),
                    Some(f) => self
                        .outgoing
                        .push(transfer, file, &f.layout, &ranges)
                        .err()
                        .map(|e| e.to_string()),
                };
                if let Some(message) = refusal {
                    self.say(
                        peer,
                        &PeerMsg::Refused {
                            transfer,
                            file,
                            message,
                        },
                    )?;
                }
            }
            PeerMsg::Cancel { transfer } => {
                self.outgoing.cancel(transfer);
            }
            PeerMsg::Ack { transfer, stored } => self.outgoing.ack(transfer, stored),
            _ => {}
        }
        Ok(())
    }

    /// Sends as much as the channel, the receiver's window and the queue allow.
    fn pump(&mut self, peer: &mut Peer) -> Result<(), CliError> {
        loop {
            if self.current.is_none() {
                let Some(job) = self.outgoing.start_next() else {
                    return Ok(());
                };
                let Some(file) = self.files.iter().find(|f| f.meta.id == job.file).cloned() else {
                    self.outgoing.finish_current();
                    continue;
                };
                self.current = Some(Current {
                    job,
                    file,
                    next: 0,
                    block: Vec::new(),
                    pos: 0,
                    sent: 0,
                    waiting: None,
                    frame: Vec::new(),
                });
            }
            let Some(c) = self.current.as_mut() else {
                return Ok(());
            };
            let transfer = c.job.transfer;
            if self.outgoing.is_cancelled(transfer) {
                self.current = None;
                self.outgoing.finish_current();
                continue;
            }
            if let Some(text) = &c.waiting {
                if !peer.send_text(text)? {
                    return Ok(());
                }
                c.waiting = None;
            }
            if c.pos < c.block.len() {
                // Frames of the block in hand.
                let index = c.job.blocks[c.next];
                let (start, _) = c.file.layout.range(index);
                while c.pos < c.block.len() {
                    let n = (c.block.len() - c.pos).min(self.flow.chunk_size);
                    c.frame.clear();
                    c.frame
                        .extend_from_slice(&frame::header(transfer, start + c.pos as u64));
                    c.frame.extend_from_slice(&c.block[c.pos..c.pos + n]);
                    if !peer.send_binary(&c.frame)? {
                        return Ok(());
                    }
                    c.pos += n;
                }
                c.sent += c.block.len() as u64;
                self.sent.fetch_add(c.block.len() as u64, Ordering::Relaxed);
                c.block.clear();
                c.pos = 0;
                c.next += 1;
                continue;
            }
            if c.next == c.job.blocks.len() {
                let end = self.end(transfer)?;
                if let Some(c) = self.current.as_mut() {
                    if !peer.send_text(&end)? {
                        c.waiting = Some(end);
                        c.next = usize::MAX; // ended: only the message is left
                        return Ok(());
                    }
                }
                self.current = None;
                self.outgoing.finish_current();
                continue;
            }
            if c.next == usize::MAX {
                self.current = None;
                self.outgoing.finish_current();
                continue;
            }
            // The receiver's disk sets the pace: stay within the window it acknowledged.
            if !self
                .outgoing
                .within_window(transfer, c.sent, self.flow.window)
            {
                return Ok(());
            }
            let index = c.job.blocks[c.next];
            if let Err(e) = c.file.read(index, &mut c.block) {
                return self.refuse(peer, transfer, format!("cannot read the file: {e}"));
            }
            let hash = c.file.block(index, &c.block);
            let text = serde_json::to_string(&PeerMsg::Block {
                transfer,
                index,
                hash,
            })
            .map_err(|e| CliError::Protocol(e.to_string()))?;
            if !peer.send_text(&text)? {
                c.waiting = Some(text);
                return Ok(());
            }
        }
    }

    /// The `end` of the current request: the file's size and hash.
    fn end(&mut self, transfer: TransferId) -> Result<String, CliError> {
        let Some(c) = self.current.as_ref() else {
            return Err(CliError::Protocol("no request to end".into()));
        };
        let hash = c
            .file
            .root()
            .map_err(|e| CliError::Protocol(e.to_string()))?;
        serde_json::to_string(&PeerMsg::End {
            transfer,
            file: c.job.file,
            size: c.file.layout.size,
            hash,
        })
        .map_err(|e| CliError::Protocol(e.to_string()))
    }

    fn refuse(
        &mut self,
        peer: &mut Peer,
        transfer: TransferId,
        message: String,
    ) -> Result<(), CliError> {
        let file = self.current.as_ref().map_or(FileId(0), |c| c.job.file);
        self.current = None;
        self.outgoing.finish_current();
        self.say(
            peer,
            &PeerMsg::Refused {
                transfer,
                file,
                message,
            },
        )
    }
}
