//! `beamdrop receive LINK`: joins the share like a browser would, and downloads its files into a
//! folder with the transfer engine's own receiver ([`Downloads`] decides, [`Sink`] verifies and
//! keeps the resume record).

use super::disk::{self, DiskData, DiskRecord};
use super::peer::{Peer, PeerEvent};
use super::signal::{self, Signaling};
use super::{CliError, Link};
use crate::protocol::{ClientMsg, PeerId, ServerMsg, SignalPayload};
use crate::seal::ShareKey;
use crate::transfer::blocks::BLOCK_SIZE;
use crate::transfer::downloads::{Downloads, Refusal, Step};
use crate::transfer::paths::{display_path, safe_path};
use crate::transfer::record::resume_key;
use crate::transfer::sink::{Sink, SinkCmd, SinkEvent};
use crate::transfer::{FileMeta, PeerMsg};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;

pub struct ReceiveOptions {
    pub link: String,
    pub dir: PathBuf,
    /// Only the files whose path (as the sender shows it) is one of these, or lies in a folder
    /// named so; every file when empty.
    pub pick: Vec<String>,
    pub progress: bool,
}

/// What a receive did.
#[derive(Debug, Default)]
pub struct Received {
    /// Where each verified file went.
    pub saved: Vec<PathBuf>,
    /// Files that could not be received, with why.
    pub failed: Vec<(String, String)>,
}

pub async fn receive(opts: ReceiveOptions) -> Result<Received, CliError> {
    let link = Link::parse(&opts.link)?;
    let key = ShareKey::derive(&link.secret, &link.share)?;
    std::fs::create_dir_all(&opts.dir).map_err(|e| CliError::Folder {
        path: opts.dir.clone(),
        source: e,
    })?;
    let mut sig = Signaling::connect(&link.base).await?;
    sig.send(&ClientMsg::Join {
        share: link.share.clone(),
    })
    .await?;
    let sender = loop {
        match sig.recv().await? {
            ServerMsg::Joined { sender, .. } => break sender,
            ServerMsg::Error { code, message } => return Err(CliError::Server { code, message }),
            _ => {}
        }
    };
    sig.signal(&key, sender, &SignalPayload::Hello { attempt: 1 })
        .await?;
    let mut rx = Receiving::new(&opts, link.share.as_str());
    let mut peer: Option<Peer> = None;
    loop {
        tokio::select! {
            msg = sig.recv(), if !rx.connected => {
                signaled(msg?, &mut sig, &key, sender, &mut peer).await?;
            }
            event = next_event(&mut peer) => {
                match event? {
                    PeerEvent::Open => rx.open(),
                    PeerEvent::Text(text) => rx.text(&text)?,
                    PeerEvent::Binary(bytes) => rx.binary(&bytes),
                    PeerEvent::Writable => {}
                    PeerEvent::Closed => return Err(CliError::ConnectionLost),
                }
                if let Some(p) = peer.as_mut() {
                    rx.flush(p)?;
                }
                if rx.done() {
                    if let Some(p) = peer.as_mut() {
                        p.close().await;
                    }
                    rx.bar.finish_and_clear();
                    return Ok(rx.result);
                }
            }
        }
    }
}

/// One message from the broker while connecting.
async fn signaled(
    msg: ServerMsg,
    sig: &mut Signaling,
    key: &ShareKey,
    sender: PeerId,
    peer: &mut Option<Peer>,
) -> Result<(), CliError> {
    match msg {
        ServerMsg::Signal { from, payload } if from == sender => {
            match signal::open(key, from, sig.me, &payload) {
                Some(SignalPayload::Offer { sdp }) => {
                    let mut p = Peer::new().await?;
                    let answer = p.answer(&sdp)?;
                    sig.signal(key, sender, &SignalPayload::Answer { sdp: answer })
                        .await?;
                    *peer = Some(p);
                }
                Some(SignalPayload::Candidate { candidate, .. }) => {
                    if let Some(p) = peer.as_mut() {
                        p.add_remote_candidate(&candidate);
                    }
                }
                Some(SignalPayload::Rejected) => return Err(CliError::Rejected),
                Some(_) => {}
                None => return Err(CliError::Link(crate::seal::SealError::BadSecret)),
            }
        }
        ServerMsg::PeerLeft { peer: left } if left == sender => return Err(CliError::SenderGone),
        ServerMsg::Error { code, message } => return Err(CliError::Server { code, message }),
        _ => {}
    }
    Ok(())
}

async fn next_event(peer: &mut Option<Peer>) -> Result<PeerEvent, CliError> {
    match peer {
        Some(p) => Ok(p.next().await?),
        None => std::future::pending().await,
    }
}

/// The receiving side of one connection: the engine's decisions, carried out on disk.
struct Receiving {
    dir: PathBuf,
    share: String,
    pick: Vec<String>,
    downloads: Downloads<()>,
    sink: Sink<DiskData, DiskRecord>,
    /// Every file the sender offers now, by resume key.
    offered: HashMap<String, FileMeta>,
    /// The downloads were chosen (from the first list).
    chosen: bool,
    connected: bool,
    /// Control messages waiting for room on the channel.
    outbox: VecDeque<String>,
    bar: ProgressBar,
    /// Verified bytes per download, for the bar.
    verified: HashMap<String, u64>,
    result: Received,
}

impl Receiving {
    fn new(opts: &ReceiveOptions, share: &str) -> Self {
        let bar = if opts.progress {
            ProgressBar::new(0)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message("connecting");
        let mut downloads = Downloads::default();
        // The disk is there from the start.
        let _ = downloads.sink_ready();
        Self {
            dir: opts.dir.clone(),
            share: share.to_owned(),
            pick: opts.pick.clone(),
            downloads,
            sink: Sink::new(BLOCK_SIZE),
            offered: HashMap::new(),
            chosen: false,
            connected: false,
            outbox: VecDeque::new(),
            bar,
            verified: HashMap::new(),
            result: Received::default(),
        }
    }

    fn done(&self) -> bool {
        self.chosen && self.downloads.is_empty()
    }

    fn open(&mut self) {
        self.connected = true;
        self.downloads.connected();
        self.bar.set_message("receiving");
    }

    fn picked(&self, meta: &FileMeta) -> bool {
        let shown = display_path(&meta.path, &meta.name);
        self.pick.is_empty()
            || self.pick.iter().any(|p| {
                let p = p.trim_end_matches('/');
                shown == p || shown.starts_with(&format!("{p}/"))
            })
    }

    fn text(&mut self, text: &str) -> Result<(), CliError> {
        let Ok(msg) = serde_json::from_str::<PeerMsg>(text) else {
            return Ok(()); // a message of a newer sender: not for us
        };
        match msg {
            PeerMsg::Manifest { files } => {
                self.offered = files
                    .into_iter()
                    .map(|m| (resume_key(&self.share, &m), m))
                    .collect();
                let mut steps = Vec::new();
                if !self.chosen {
                    self.chosen = true;
                    let mut chosen: Vec<(String, FileMeta)> = self
                        .offered
                        .iter()
                        .filter(|(_, m)| self.picked(m))
                        .map(|(k, m)| (k.clone(), m.clone()))
                        .collect();
                    if chosen.is_empty() && !self.pick.is_empty() {
                        return Err(CliError::NothingPicked);
                    }
                    chosen.sort_by_key(|(_, m)| m.id);
                    self.bar
                        .set_length(chosen.iter().map(|(_, m)| m.size).sum());
                    for (key, meta) in chosen {
                        steps.extend(self.downloads.add(key, meta, ()));
                    }
                }
                steps.extend(self.downloads.listed(&self.offered));
                self.run(steps);
            }
            PeerMsg::Block {
                transfer,
                index,
                hash,
            } => self.sink_cmd(SinkCmd::Expect {
                transfer,
                index,
                hash,
            }),
            PeerMsg::End {
                transfer,
                size,
                hash,
                ..
            } => {
                self.downloads.ended(transfer);
                self.sink_cmd(SinkCmd::End {
                    transfer,
                    size,
                    hash,
                });
            }
            PeerMsg::Refused {
                transfer, message, ..
            } => match self.downloads.refused(transfer) {
                Refusal::Stale | Refusal::Waiting { .. } => {}
                Refusal::Failed {
                    key,
                    download,
                    next,
                } => {
                    if let Some(files) = self.sink.take(&key) {
                        drop(files);
                    }
                    self.failed(&download.meta, message);
                    self.run(next);
                }
            },
            PeerMsg::Request { .. } | PeerMsg::Cancel { .. } | PeerMsg::Ack { .. } => {}
        }
        Ok(())
    }

    fn binary(&mut self, bytes: &[u8]) {
        let events = self.sink.frame(bytes);
        self.events(events);
    }

    fn sink_cmd(&mut self, cmd: SinkCmd) {
        let (events, _) = self.sink.command(cmd);
        self.events(events);
    }

    fn run(&mut self, steps: Vec<Step>) {
        for step in steps {
            match step {
                Step::Open { key } => {
                    let Some(meta) = self.downloads.get(&key).map(|d| d.meta.clone()) else {
                        continue;
                    };
                    let event = disk::open(&self.dir, &key)
                        .map_err(|e| e.to_string())
                        .and_then(|(data, record)| {
                            self.sink
                                .attach(&key, &meta.name, meta.size, data, record)
                                .map_err(|e| e.to_string())
                        })
                        .unwrap_or_else(|message| SinkEvent::Failed {
                            key: key.clone(),
                            message,
                        });
                    self.events(vec![event]);
                }
                Step::Request {
                    key,
                    transfer,
                    file,
                    ranges,
                    ..
                } => {
                    self.sink_cmd(SinkCmd::Begin { key, transfer });
                    self.say(&PeerMsg::Request {
                        transfer,
                        file,
                        ranges,
                    });
                }
                Step::Forget { transfer } => self.sink_cmd(SinkCmd::Forget { transfer }),
            }
        }
    }

    fn events(&mut self, events: Vec<SinkEvent>) {
        for event in events {
            let steps = match event {
                SinkEvent::Opened {
                    key,
                    verified,
                    missing,
                } => {
                    self.progress(&key, verified);
                    self.downloads.opened(&key, verified, missing)
                }
                SinkEvent::Stored {
                    transfer,
                    key,
                    stored,
                    verified,
                } => {
                    if self.downloads.is_live(transfer) {
                        self.say(&PeerMsg::Ack { transfer, stored });
                    }
                    self.progress(&key, verified);
                    Vec::new()
                }
                SinkEvent::Bad { key, range, .. } => self.downloads.bad_block(&key, range),
                SinkEvent::Incomplete {
                    key,
                    transfer,
                    missing,
                } => self.downloads.incomplete(&key, transfer, missing),
                SinkEvent::Changed { key, transfer } => self.downloads.changed(&key, transfer),
                SinkEvent::Finished { key, .. } => self.finished(&key),
                SinkEvent::Failed { key, message } => {
                    drop(self.sink.take(&key));
                    match self.downloads.finish(&key) {
                        Some((d, next)) => {
                            self.failed(&d.meta, message);
                            next
                        }
                        None => Vec::new(),
                    }
                }
            };
            self.run(steps);
        }
    }

    /// `key` is whole and verified: its file goes to its place under the folder.
    fn finished(&mut self, key: &str) -> Vec<Step> {
        drop(self.sink.take(key));
        let Some((d, next)) = self.downloads.finish(key) else {
            return Vec::new();
        };
        self.progress(key, d.meta.size);
        let segments = safe_path(&d.meta.path, &d.meta.name);
        match disk::finish(&self.dir, key, &segments) {
            Ok(path) => {
                self.bar.println(format!(
                    "verified {}",
                    display_path(&d.meta.path, &d.meta.name)
                ));
                self.result.saved.push(path);
            }
            Err(e) => self.failed(&d.meta, e.to_string()),
        }
        next
    }

    fn failed(&mut self, meta: &FileMeta, why: String) {
        let shown = display_path(&meta.path, &meta.name);
        self.bar.println(format!("failed {shown}: {why}"));
        self.result.failed.push((shown, why));
    }

    fn progress(&mut self, key: &str, verified: u64) {
        self.verified.insert(key.to_owned(), verified);
        let done: u64 = self.verified.values().sum();
        self.bar.set_position(done);
    }

    fn say(&mut self, msg: &PeerMsg) {
        if let Ok(text) = serde_json::to_string(msg) {
            self.outbox.push_back(text);
        }
    }

    /// Sends what is waiting, as far as the channel takes it.
    fn flush(&mut self, peer: &mut Peer) -> Result<(), CliError> {
        while let Some(text) = self.outbox.front() {
            if !peer.send_text(text)? {
                break;
            }
            self.outbox.pop_front();
        }
        Ok(())
    }
}
