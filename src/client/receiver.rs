//! The receiver's session: join the share, answer the sender's offer, show the live file list,
//! and for each requested file reassemble frames by offset, verify size and SHA-256, then save.
//!
//! Once its data channel is open the receiver needs nothing from the server: if the signaling
//! socket drops then, it is left closed. Before that, it is reopened and the share joined again;
//! the sender may be reconnecting too (a restarting node drops both), so a share that is missing
//! just after a reconnect is asked for again a few times before the page gives up.

use super::channel::{send_msg, Channel, ChannelEvent};
use super::disk::{DiskSink, DISK_THRESHOLD};
use super::rtc::{LinkEvent, Outbox, RtcLink};
use super::save::{save, save_blob};
use super::signaling::{self, Event, Signaling};
use super::{now_ms, random_hex, window, ClientError};
use crate::components::receive::{Phase, ReceiverUi};
use crate::components::{FileRow, FileStatus};
use crate::protocol::{ClientMsg, ErrorCode, IceServer, PeerId, ServerMsg, ShareId};
use crate::seal::{SealError, ShareKey};
use crate::transfer::progress::Meter;
use crate::transfer::reassembly::{verify_digest, Coverage, MemorySink, Reassembly};
use crate::transfer::{frame, FileId, FileMeta, FlowControl, PeerMsg, TransferError};
use futures::channel::mpsc::UnboundedReceiver;
use futures::{Stream, StreamExt};
use leptos::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use wasm_bindgen_futures::spawn_local;
use web_sys::RtcPeerConnectionState;

/// Progress is pushed to the page at most this often (ms) while bytes stream in.
const PROGRESS_EVERY_MS: f64 = 100.0;

/// How often (and how many times) a share the server does not know (yet) is joined again: its
/// sender may be reconnecting (up to ~5 s backoff, plus its reclaim). After a reconnect of ours,
/// and on a page opened while the share was unknown: a link opened in the moment its sender's
/// node restarts still works a few seconds later.
const REJOIN_EVERY_MS: u32 = 1_500;
const REJOIN_TRIES: u32 = 12;

/// Introduced to a sender but no data channel this long after (ms): join again. Harmless while
/// the sender is the same (the server introduces a pair once); if the sender has reconnected
/// under a new peer id (its old one can no longer signal), this reaches the new one.
const STALLED_JOIN_MS: u32 = 10_000;

/// Where a file's bytes go while it arrives.
enum Store {
    /// Small files: a buffer in WASM memory.
    Memory(Reassembly<MemorySink>),
    /// Large files: OPFS, written straight from the message's memory.
    Disk { coverage: Coverage, sink: DiskSink },
}

impl Store {
    fn received(&self) -> u64 {
        match self {
            Store::Memory(r) => r.received(),
            Store::Disk { coverage, .. } => coverage.received(),
        }
    }

    fn is_complete(&self) -> bool {
        match self {
            Store::Memory(r) => r.is_complete(),
            Store::Disk { coverage, .. } => coverage.is_complete(),
        }
    }

    fn write(&mut self, offset: u64, payload: &js_sys::Uint8Array) -> Result<(), ClientError> {
        match self {
            Store::Memory(r) => Ok(r.write(offset, &payload.to_vec())?),
            Store::Disk { coverage, sink } => {
                coverage.accept(offset, payload.length() as u64)?;
                sink.write_at(offset, payload)
            }
        }
    }
}

struct Download {
    row: FileRow,
    store: Store,
    meter: Meter,
    last_progress: f64,
}

struct State {
    ui: ReceiverUi,
    share: ShareId,
    key: ShareKey,
    me: Option<PeerId>,
    signaling: Option<Signaling>,
    ice_servers: Vec<IceServer>,
    sender: Option<PeerId>,
    link: Option<Rc<RtcLink>>,
    channel: Option<Channel>,
    downloads: HashMap<FileId, Download>,
    /// Whether the share was joined once (so a later "no such share" may be a sender on its way
    /// back), and how many more joins such a refusal is worth.
    joined_before: bool,
    rejoins_left: u32,
    /// A delayed join is scheduled.
    rejoin_pending: bool,
    /// Bumped on every join answer, so only the latest stall check acts.
    join_generation: u32,
}

impl State {
    fn row(&self, id: FileId) -> Option<FileRow> {
        self.ui
            .files
            .with_untracked(|rows| rows.iter().find(|r| r.id() == id).cloned())
    }

    /// Every transfer in flight fails with `why`.
    fn fail_all(&mut self, why: &str) {
        for (_, d) in self.downloads.drain() {
            d.row.status.set(FileStatus::Failed(why.to_owned()));
        }
    }

    /// Joins the share (again) on the current connection, unless connected to the sender.
    fn join(&self) {
        if self.channel.is_some() {
            return;
        }
        if let Some(signaling) = &self.signaling {
            signaling.send(ClientMsg::Join {
                share: self.share.clone(),
            });
        }
    }

    /// Not connected to the sender yet, and not given up on it either.
    fn still_joining(&self) -> bool {
        self.channel.is_none() && self.ui.phase.get_untracked().needs_server()
    }

    /// Forgets a connection attempt to a sender that can no longer be signaled (its offer or our
    /// answer went to a peer id that is gone); nothing was transferring yet.
    fn forget_attempt(&mut self) {
        self.link = None;
        self.sender = None;
    }

    fn lost_sender(&mut self, phase: Phase) {
        self.fail_all("the sender went away");
        self.channel = None;
        self.link = None;
        self.sender = None;
        self.ui.phase.set(phase);
    }
}

pub struct ReceiverSession {
    /// None when the link itself is unusable (the page shows why).
    state: Option<Rc<RefCell<State>>>,
}

/// The share id from the path and the key from the `#secret` the server never saw.
fn share_key(share: &str) -> Result<(ShareId, ShareKey), SealError> {
    let share: ShareId = share.parse().map_err(|_| SealError::BadSecret)?;
    let fragment = window()
        .and_then(|w| Ok(w.location().hash()?))
        .unwrap_or_default();
    let key = ShareKey::derive(fragment.trim_start_matches('#'), &share)?;
    Ok((share, key))
}

impl ReceiverSession {
    pub fn start(ui: ReceiverUi, share: String) -> Self {
        let (share, key) = match share_key(&share) {
            Ok(found) => found,
            Err(e) => {
                ui.phase.set(Phase::Failed("bad link".into()));
                ui.error.set(Some(capitalized(&e.to_string())));
                return Self { state: None };
            }
        };
        let state = Rc::new(RefCell::new(State {
            ui,
            share,
            key,
            me: None,
            signaling: None,
            ice_servers: Vec::new(),
            sender: None,
            link: None,
            channel: None,
            downloads: HashMap::new(),
            joined_before: false,
            rejoins_left: REJOIN_TRIES,
            rejoin_pending: false,
            join_generation: 0,
        }));
        spawn_local(run_signaling(Rc::downgrade(&state), signaling::connect()));
        Self { state: Some(state) }
    }

    /// Asks the sender for one file (large files get a disk sink first).
    pub fn request(&self, file: FileId) {
        let Some(state) = &self.state else { return };
        let Some(row) = state.borrow().row(file) else {
            return;
        };
        let size = row.meta.size;
        row.status.set(FileStatus::Requested);
        if size < DISK_THRESHOLD {
            let store =
                MemorySink::new(size).map(|sink| Store::Memory(Reassembly::new(size, sink)));
            match store {
                Ok(store) => begin(state, row, store),
                Err(e) => row.status.set(FileStatus::Failed(e.to_string())),
            }
            return;
        }
        let state = Rc::downgrade(state);
        spawn_local(async move {
            let name = format!("beamdrop-{}-{file}", random_hex(8).unwrap_or_default());
            let store = match DiskSink::create(&name).await {
                Ok(sink) => Ok(Store::Disk {
                    coverage: Coverage::new(size),
                    sink,
                }),
                Err(e) => {
                    // No OPFS here (private mode, old browser): fall back to memory.
                    leptos::logging::warn!("disk storage unavailable ({e}); receiving in memory");
                    MemorySink::new(size).map(|sink| Store::Memory(Reassembly::new(size, sink)))
                }
            };
            let Some(state) = state.upgrade() else { return };
            match store {
                Ok(store) => begin(&state, row, store),
                Err(e) => row.status.set(FileStatus::Failed(e.to_string())),
            }
        });
    }
}

/// Sends the request once the file has somewhere to go.
fn begin(state: &Rc<RefCell<State>>, row: FileRow, store: Store) {
    let mut s = state.borrow_mut();
    let file = row.id();
    let Some(dc) = s.channel.as_ref().map(|c| c.dc.clone()) else {
        row.status
            .set(FileStatus::Failed("not connected to the sender".into()));
        return;
    };
    if let Err(e) = send_msg(&dc, &PeerMsg::Request { file }) {
        row.status.set(FileStatus::Failed(e.to_string()));
        return;
    }
    let mut meter = Meter::new(row.meta.size);
    row.progress.set(meter.update(now_ms(), 0));
    s.downloads.insert(
        file,
        Download {
            row,
            store,
            meter,
            last_progress: 0.0,
        },
    );
}

impl Drop for ReceiverSession {
    fn drop(&mut self) {
        let Some(state) = &self.state else { return };
        if let Ok(mut s) = state.try_borrow_mut() {
            s.channel = None;
            s.link = None;
            s.signaling = None;
        }
    }
}

async fn run_signaling(state: Weak<RefCell<State>>, mut events: impl Stream<Item = Event> + Unpin) {
    while let Some(event) = events.next().await {
        let Some(state) = state.upgrade() else { return };
        match event {
            Event::Connected(signaling) => state.borrow_mut().signaling = Some(signaling),
            Event::Lost { why, retrying } => {
                let mut s = state.borrow_mut();
                s.signaling = None;
                s.me = None;
                if s.channel.is_some() || !s.ui.phase.get_untracked().needs_server() {
                    // An open data channel keeps working without the server; a page that has
                    // already failed (sender gone, bad link) keeps saying why.
                    return;
                }
                s.forget_attempt();
                if retrying {
                    s.ui.phase.set(Phase::Reconnecting);
                } else {
                    s.ui.phase.set(Phase::ServerLost(why));
                    return;
                }
            }
            Event::Msg(msg) => on_server_msg(&state, msg).await,
        }
    }
}

async fn on_server_msg(state: &Rc<RefCell<State>>, msg: ServerMsg) {
    match msg {
        ServerMsg::Welcome { you, ice_servers } => {
            let mut s = state.borrow_mut();
            s.ice_servers = ice_servers;
            s.me = Some(you);
            if s.channel.is_none() {
                if s.joined_before {
                    // Back after a reconnect: the sender may be on its way back too.
                    s.rejoins_left = REJOIN_TRIES;
                }
                s.join();
                s.ui.phase.set(Phase::WaitingForSender);
            }
        }
        ServerMsg::Joined { sender, .. } => {
            let mut s = state.borrow_mut();
            // Connected already, or past joining: a late answer to an earlier join must not undo
            // a failure (a bad link stays failed, with its message).
            if !s.still_joining() {
                return;
            }
            if s.sender.is_some_and(|old| old != sender) {
                // The sender came back under a new peer id: the attempt with the old one is dead.
                s.forget_attempt();
            }
            s.sender = Some(sender);
            s.joined_before = true;
            // Still joining, so the only message up can be the one the page opened with: the
            // share was not available.
            s.ui.error.set(None);
            s.join_generation = s.join_generation.wrapping_add(1);
            s.ui.phase.set(Phase::ConnectingPeer);
            let (generation, weak) = (s.join_generation, Rc::downgrade(state));
            spawn_local(async move {
                gloo_timers::future::TimeoutFuture::new(STALLED_JOIN_MS).await;
                let Some(state) = weak.upgrade() else { return };
                let s = state.borrow();
                let stalled = s.join_generation == generation
                    && s.channel.is_none()
                    && s.ui.phase.get_untracked() == Phase::ConnectingPeer;
                if stalled {
                    s.join();
                }
            });
        }
        ServerMsg::Signal { from, payload } => {
            if state.borrow().sender != Some(from) {
                return;
            }
            let link = match ensure_link(state, from) {
                Ok(link) => link,
                Err(e) => {
                    state.borrow().ui.phase.set(Phase::Failed(e.to_string()));
                    return;
                }
            };
            match link.apply(&payload).await {
                Ok(()) => {}
                Err(ClientError::Seal(_)) => {
                    // Altered in transit or sealed with another key: refuse the connection.
                    let mut s = state.borrow_mut();
                    s.link = None;
                    s.sender = None;
                    s.channel = None;
                    s.ui.phase.set(Phase::Failed("bad link".into()));
                    s.ui.error
                        .set(Some(capitalized(&SealError::BadSecret.to_string())));
                }
                Err(e) => state.borrow().ui.phase.set(Phase::Failed(e.to_string())),
            }
        }
        ServerMsg::PeerLeft { peer } => {
            let mut s = state.borrow_mut();
            if s.sender == Some(peer) {
                s.lost_sender(Phase::SenderGone);
            }
        }
        ServerMsg::Error { code, message } => {
            let mut s = state.borrow_mut();
            match code {
                ErrorCode::NoSuchShare if s.rejoins_left > 0 && s.still_joining() => {
                    // Its sender is probably reconnecting: ask again shortly (once).
                    s.ui.phase.set(Phase::WaitingForSender);
                    if !s.rejoin_pending {
                        s.rejoins_left -= 1;
                        rejoin_later(&mut s, state);
                    }
                }
                ErrorCode::NoSuchShare => {
                    s.ui.phase.set(Phase::Failed("share unavailable".into()));
                    s.ui.error.set(Some(
                        "This share is not available. The sender may have closed their tab, or the link is wrong."
                            .into(),
                    ));
                }
                // Our answer or candidates went to a sender id that is gone. Either the sender
                // left (its `peer_left` follows) or its socket dropped and it comes back under a
                // new id: a join shortly tells which (a new id answers with a fresh offer).
                ErrorCode::UnknownPeer if s.sender.is_some() && s.still_joining() => {
                    if !s.rejoin_pending {
                        s.rejoins_left = REJOIN_TRIES;
                        rejoin_later(&mut s, state);
                    }
                }
                _ => leptos::logging::warn!("server error {code:?}: {message}"),
            }
        }
        ServerMsg::ShareCreated { .. }
        | ServerMsg::ShareReclaimed { .. }
        | ServerMsg::PeerJoined { .. }
        | ServerMsg::Pong => {}
    }
}

/// Joins the share again a little later, on whatever connection is current then, if the page is
/// still on its way to the sender.
fn rejoin_later(s: &mut State, state: &Rc<RefCell<State>>) {
    s.rejoin_pending = true;
    let weak = Rc::downgrade(state);
    spawn_local(async move {
        gloo_timers::future::TimeoutFuture::new(REJOIN_EVERY_MS).await;
        if let Some(state) = weak.upgrade() {
            let mut s = state.borrow_mut();
            s.rejoin_pending = false;
            if s.still_joining() {
                s.join();
            }
        }
    });
}

/// The connection to the sender, created on its first offer.
fn ensure_link(state: &Rc<RefCell<State>>, sender: PeerId) -> Result<Rc<RtcLink>, ClientError> {
    if let Some(link) = state.borrow().link.clone() {
        return Ok(link);
    }
    let (link, events) = {
        let s = state.borrow();
        let (Some(signaling), Some(me)) = (s.signaling.clone(), s.me) else {
            return Err(ClientError::Signaling("not connected".into()));
        };
        let outbox = Outbox {
            signaling,
            key: s.key.clone(),
            me,
            remote: sender,
        };
        RtcLink::new(outbox, &s.ice_servers)?
    };
    let link = Rc::new(link);
    state.borrow_mut().link = Some(link.clone());
    spawn_local(watch_link(Rc::downgrade(state), events));
    Ok(link)
}

async fn watch_link(state: Weak<RefCell<State>>, mut events: UnboundedReceiver<LinkEvent>) {
    while let Some(event) = events.next().await {
        let Some(state) = state.upgrade() else { return };
        match event {
            LinkEvent::Channel(dc) => {
                let flow = FlowControl::DEFAULT;
                let (channel, events, _) = Channel::new(dc, flow.low_water, flow.high_water);
                state.borrow_mut().channel = Some(channel);
                spawn_local(run_channel(Rc::downgrade(&state), events));
            }
            LinkEvent::State(RtcPeerConnectionState::Failed) => {
                state.borrow_mut().lost_sender(Phase::Unreachable);
            }
            LinkEvent::State(_) => {}
        }
    }
}

async fn run_channel(state: Weak<RefCell<State>>, mut events: UnboundedReceiver<ChannelEvent>) {
    while let Some(event) = events.next().await {
        let Some(state) = state.upgrade() else { return };
        let mut s = state.borrow_mut();
        match event {
            ChannelEvent::Open => s.ui.phase.set(Phase::Connected),
            ChannelEvent::Text(text) => match serde_json::from_str::<PeerMsg>(&text) {
                Ok(msg) => on_peer_msg(&mut s, msg),
                Err(e) => leptos::logging::warn!("unreadable message from sender: {e}"),
            },
            ChannelEvent::Binary(buf) => on_frame(&mut s, &buf),
            ChannelEvent::Closed => {
                if s.sender.is_some() {
                    s.lost_sender(Phase::SenderGone);
                }
                return;
            }
        }
    }
}

fn on_peer_msg(s: &mut State, msg: PeerMsg) {
    match msg {
        PeerMsg::Manifest { files } => update_list(s, files),
        PeerMsg::FileEnd { file, size, sha256 } => {
            let Some(mut d) = s.downloads.remove(&file) else {
                return;
            };
            d.row.status.set(FileStatus::Verifying);
            d.row
                .progress
                .set(d.meter.update(now_ms(), d.store.received()));
            match d.store {
                Store::Memory(r) => {
                    let outcome =
                        r.finish(size, &sha256)
                            .map_err(ClientError::from)
                            .and_then(|sink| {
                                save(&d.row.meta.name, &d.row.meta.mime, &sink.into_bytes())
                            });
                    d.row.status.set(outcome_status(outcome));
                }
                Store::Disk { coverage, sink } => {
                    if let Err(e) = coverage.check_complete(size) {
                        d.row.status.set(outcome_status(Err(e.into())));
                        return;
                    }
                    let row = d.row;
                    spawn_local(async move {
                        let outcome = match sink.finish().await {
                            Ok((file, digest, stored)) => {
                                let saved = verify_digest(digest, &sha256)
                                    .map_err(ClientError::from)
                                    .and_then(|()| save_blob(&row.meta.name, &file));
                                stored.remove_later();
                                saved
                            }
                            Err(e) => Err(e),
                        };
                        row.status.set(outcome_status(outcome));
                    });
                }
            }
        }
        PeerMsg::FileError { file, message } => {
            if let Some(d) = s.downloads.remove(&file) {
                d.row.status.set(FileStatus::Failed(message));
            }
        }
        PeerMsg::Request { .. } => {}
    }
}

/// Replaces the list with the sender's, keeping rows (and their progress) for files still there.
fn update_list(s: &mut State, files: Vec<FileMeta>) {
    let old: HashMap<FileId, FileRow> =
        s.ui.files
            .with_untracked(|rows| rows.iter().map(|r| (r.id(), r.clone())).collect());
    let rows: Vec<FileRow> = files
        .into_iter()
        .map(|meta| match old.get(&meta.id) {
            Some(row) if row.meta.size == meta.size => row.clone(),
            _ => FileRow::new(meta),
        })
        .collect();
    s.downloads
        .retain(|id, _| rows.iter().any(|r| r.id() == *id));
    s.ui.files.set(rows);
}

/// What a finished transfer shows: verified, or why not.
fn outcome_status(outcome: Result<(), ClientError>) -> FileStatus {
    match outcome {
        Ok(()) => FileStatus::Verified,
        Err(ClientError::Transfer(TransferError::Integrity)) => {
            FileStatus::Failed("integrity".into())
        }
        Err(e) => FileStatus::Failed(e.to_string()),
    }
}

fn on_frame(s: &mut State, buf: &js_sys::ArrayBuffer) {
    let bytes = js_sys::Uint8Array::new(buf);
    let len = bytes.length() as usize;
    let mut header = [0u8; frame::HEADER_LEN];
    if len < frame::HEADER_LEN {
        leptos::logging::warn!("{}", TransferError::ShortFrame(len));
        return;
    }
    bytes
        .subarray(0, frame::HEADER_LEN as u32)
        .copy_to(&mut header);
    let Ok((file, offset)) = frame::decode_header(&header) else {
        return;
    };
    let Some(d) = s.downloads.get_mut(&file) else {
        return;
    };
    let payload = bytes.subarray(frame::HEADER_LEN as u32, len as u32);
    match d.store.write(offset, &payload) {
        Ok(()) => {
            let now = now_ms();
            if d.row.status.get_untracked() == FileStatus::Requested {
                d.row.status.set(FileStatus::Receiving);
            }
            if now - d.last_progress >= PROGRESS_EVERY_MS || d.store.is_complete() {
                d.last_progress = now;
                d.row.progress.set(d.meter.update(now, d.store.received()));
            }
        }
        Err(e) => {
            if let Some(d) = s.downloads.remove(&file) {
                d.row.status.set(FileStatus::Failed(e.to_string()));
            }
        }
    }
}

fn capitalized(message: &str) -> String {
    let mut chars = message.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect::<String>() + ".",
        None => String::new(),
    }
}
