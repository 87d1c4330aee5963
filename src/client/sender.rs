//! The sender's session: one signaling socket, one share, and per receiver one peer connection,
//! one data channel and one task that answers its requests, streaming files with backpressure.
//!
//! The signaling socket is reopened when it drops (a node restarting closes it with 4003); the
//! page then takes its share back under its new peer id with the share's claim token, so the link
//! it handed out keeps working. Receivers already connected never notice: their connections do
//! not go through the server.

use super::channel::{send_msg, Backpressure, Channel, ChannelEvent};
use super::rtc::{LinkEvent, Outbox, RtcLink};
use super::signaling::{self, Event, Signaling};
use super::{js_message, now_ms, picker, random_hex, window, ClientError};
use crate::components::send::{ReceiverRow, SenderUi};
use crate::components::FileRow;
use crate::protocol::{ClaimToken, ClientMsg, ErrorCode, IceServer, PeerId, ServerMsg, ShareId};
use crate::seal::{ShareKey, SECRET_BYTES};
use crate::transfer::progress::Meter;
use crate::transfer::{frame, FileId, FileMeta, FlowControl, PeerMsg};
use futures::channel::mpsc::UnboundedReceiver;
use futures::StreamExt;
use leptos::prelude::*;
use sha2::{Digest, Sha256};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use wasm_bindgen_futures::{spawn_local, JsFuture};
use web_sys::RtcPeerConnectionState;

/// Progress on the sender's page is refreshed at most this often (ms).
const PROGRESS_EVERY_MS: f64 = 200.0;

/// After a backend failure the share is asked for again this much later (ms).
const SHARE_RETRY_MS: u32 = 1_000;

/// A file offered in this share. Its SHA-256 is computed during the first send and cached.
struct SharedFile {
    meta: FileMeta,
    file: web_sys::File,
    sha256: RefCell<Option<String>>,
    /// Set when the sender removes it: sends in progress stop.
    removed: Cell<bool>,
}

/// One receiver: its connection and channel (the listeners live as long as this does).
struct Receiver {
    link: Rc<RtcLink>,
    channel: Channel,
    row: ReceiverRow,
    open: bool,
}

struct State {
    ui: SenderUi,
    /// The current signaling connection; `None` while reconnecting.
    signaling: Option<Signaling>,
    ice_servers: Vec<IceServer>,
    /// This page's peer id on the current connection.
    me: Option<PeerId>,
    secret: String,
    /// The share, and the token that takes it back after a reconnect.
    share: Option<(ShareId, ClaimToken)>,
    /// Whether the share is bound to the current connection (receivers can join).
    share_live: bool,
    key: Option<ShareKey>,
    files: Vec<Rc<SharedFile>>,
    next_file: u32,
    next_receiver: u32,
    receivers: HashMap<PeerId, Receiver>,
    /// Flow-control settings (defaults, or `?chunk=…` overrides for benchmarks).
    flow: FlowControl,
}

impl State {
    fn manifest(&self) -> PeerMsg {
        PeerMsg::Manifest {
            files: self
                .files
                .iter()
                .map(|f| {
                    let mut meta = f.meta.clone();
                    meta.sha256 = f.sha256.borrow().clone();
                    meta
                })
                .collect(),
        }
    }

    fn broadcast_manifest(&self) {
        let manifest = self.manifest();
        for r in self.receivers.values().filter(|r| r.open) {
            let _ = send_msg(&r.channel.dc, &manifest);
        }
    }

    fn update_peer_count(&self) {
        self.ui
            .peers
            .set(self.receivers.values().filter(|r| r.open).count());
    }

    /// Asks the server for this page's share: the one it had (same id, by token), else a new one.
    fn request_share(&self) {
        let Some(signaling) = &self.signaling else {
            return;
        };
        signaling.send(match &self.share {
            Some((share, token)) => ClientMsg::ReclaimShare {
                share: share.clone(),
                token: token.clone(),
            },
            None => ClientMsg::CreateShare,
        });
    }

    /// The signaling connection dropped. Receivers whose offer was never answered are dropped:
    /// their answer would go to this page's old peer id, so they cannot connect any more (they
    /// join again and get a fresh offer). Connected ones are not touched.
    fn signaling_lost(&mut self) {
        self.signaling = None;
        self.me = None;
        self.share_live = false;
        let stranded: Vec<PeerId> = self
            .receivers
            .iter()
            .filter(|(_, r)| !r.open && !r.link.has_remote_description())
            .map(|(peer, _)| *peer)
            .collect();
        for peer in stranded {
            self.drop_receiver(peer);
        }
    }

    fn drop_receiver(&mut self, peer: PeerId) {
        if self.receivers.remove(&peer).is_some() {
            self.ui
                .receivers
                .update(|rows| rows.retain(|r| r.peer != peer));
            self.update_peer_count();
        }
    }
}

/// Owned by the page; dropping it closes every connection.
pub struct SenderSession {
    state: Rc<RefCell<State>>,
}

impl SenderSession {
    pub fn start(ui: SenderUi) -> Self {
        let secret = match random_hex(SECRET_BYTES) {
            Ok(secret) => secret,
            Err(e) => {
                ui.error
                    .set(Some(format!("no secure random numbers here: {e}")));
                String::new()
            }
        };
        let state = Rc::new(RefCell::new(State {
            ui,
            signaling: None,
            ice_servers: Vec::new(),
            me: None,
            secret,
            share: None,
            share_live: false,
            key: None,
            files: Vec::new(),
            next_file: 0,
            next_receiver: 1,
            flow: window()
                .and_then(|w| Ok(w.location().search()?))
                .map(|q| FlowControl::DEFAULT.with_query(&q))
                .unwrap_or(FlowControl::DEFAULT),
            receivers: HashMap::new(),
        }));
        spawn_local(run_signaling(Rc::downgrade(&state), signaling::connect()));
        Self { state }
    }

    /// Adds the files of a file input (a chosen folder keeps its relative paths).
    pub fn add_files(&self, list: &web_sys::FileList) {
        add_picked(&self.state, picker::from_file_list(list));
    }

    /// Adds what was dropped, walking dropped folders.
    pub fn add_dropped(&self, dt: &web_sys::DataTransfer) {
        let entries = picker::dropped_entries(dt);
        if entries.is_empty() {
            // No entry API (or nothing but plain files): the flat list still works.
            if let Some(list) = dt.files() {
                self.add_files(&list);
            }
            return;
        }
        let state = Rc::downgrade(&self.state);
        spawn_local(async move {
            let picked = picker::walk(entries).await;
            let Some(state) = state.upgrade() else { return };
            match picked {
                Ok(picked) => add_picked(&state, picked),
                Err(e) => {
                    let message = format!("could not read the dropped folder: {e}");
                    state.borrow().ui.error.set(Some(message));
                }
            }
        });
    }
}

/// Adds files to the share; receivers see the new list at once.
fn add_picked(state: &RefCell<State>, picked: Vec<picker::Picked>) {
    {
        let mut state = state.borrow_mut();
        let mut rows = Vec::new();
        for picker::Picked { file, path } in picked {
            let id = FileId(state.next_file);
            state.next_file += 1;
            let meta = FileMeta {
                id,
                name: file.name(),
                path,
                size: file.size() as u64,
                mime: file.type_(),
                sha256: None,
            };
            rows.push(FileRow::new(meta.clone()));
            state.files.push(Rc::new(SharedFile {
                meta,
                file,
                sha256: RefCell::new(None),
                removed: Cell::new(false),
            }));
        }
        state.ui.files.update(|files| files.extend(rows));
        state.broadcast_manifest();
    }
}

impl SenderSession {
    /// Stops offering a file; receivers see it disappear and transfers of it stop.
    pub fn remove_file(&self, file: FileId) {
        let mut state = self.state.borrow_mut();
        state.files.retain(|f| {
            let keep = f.meta.id != file;
            if !keep {
                f.removed.set(true);
            }
            keep
        });
        state
            .ui
            .files
            .update(|rows| rows.retain(|r| r.id() != file));
        state.broadcast_manifest();
    }
}

impl Drop for SenderSession {
    fn drop(&mut self) {
        if let Ok(mut state) = self.state.try_borrow_mut() {
            state.receivers.clear();
            state.signaling = None;
        }
    }
}

async fn run_signaling(
    state: Weak<RefCell<State>>,
    mut events: impl futures::Stream<Item = Event> + Unpin,
) {
    while let Some(event) = events.next().await {
        let Some(state) = state.upgrade() else { return };
        match event {
            Event::Connected(signaling) => state.borrow_mut().signaling = Some(signaling),
            Event::Lost { why, retrying } => {
                let mut s = state.borrow_mut();
                s.signaling_lost();
                if retrying {
                    s.ui.reconnecting.set(true);
                } else {
                    s.ui.reconnecting.set(false);
                    s.ui.error.set(Some(format!(
                        "Lost the connection to the server ({why}). Receivers already \
                         connected can finish; reload the page to share again."
                    )));
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
            s.me = Some(you);
            s.ice_servers = ice_servers;
            s.request_share();
        }
        ServerMsg::ShareCreated { share, token } => {
            let mut s = state.borrow_mut();
            match ShareKey::derive(&s.secret, &share) {
                Ok(key) => s.key = Some(key),
                Err(e) => {
                    s.ui.error.set(Some(e.to_string()));
                    return;
                }
            }
            match window().and_then(|w| Ok(w.location().origin()?)) {
                Ok(origin) => {
                    s.ui.link
                        .set(Some(format!("{origin}/s/{share}#{}", s.secret)))
                }
                Err(e) => s.ui.error.set(Some(e.to_string())),
            }
            let replaced = s.share.is_some();
            s.share = Some((share, token));
            s.share_live = true;
            s.ui.reconnecting.set(false);
            if replaced {
                s.ui.error.set(Some(
                    "The server no longer knew your previous link, so this is a new one: \
                     share it again."
                        .into(),
                ));
            }
        }
        ServerMsg::ShareReclaimed { share } => {
            let mut s = state.borrow_mut();
            if s.share.as_ref().map(|(id, _)| id) == Some(&share) {
                s.share_live = true;
                s.ui.reconnecting.set(false);
            }
        }
        ServerMsg::PeerJoined { peer, .. } => {
            if let Err(e) = connect_receiver(state, peer).await {
                state.borrow().ui.error.set(Some(e.to_string()));
            }
        }
        ServerMsg::Signal { from, payload } => {
            let link = state.borrow().receivers.get(&from).map(|r| r.link.clone());
            let Some(link) = link else { return };
            if let Err(e) = link.apply(&payload).await {
                // Altered in transit or sealed with another key: no connection to that peer.
                leptos::logging::warn!("signal from {from} refused: {e}");
                state.borrow_mut().drop_receiver(from);
            }
        }
        ServerMsg::PeerLeft { peer } => state.borrow_mut().drop_receiver(peer),
        ServerMsg::Error { code, message } => {
            leptos::logging::warn!("server error {code:?}: {message}");
            let mut s = state.borrow_mut();
            match code {
                // Gone for longer than the server remembers it: a new share (and link).
                ErrorCode::ReclaimRefused if !s.share_live => {
                    s.share = None;
                    s.request_share();
                }
                // The backend failed while the share was being set up: ask again shortly.
                ErrorCode::Internal if !s.share_live && s.me.is_some() => {
                    let me = s.me;
                    let state = Rc::downgrade(state);
                    spawn_local(async move {
                        gloo_timers::future::TimeoutFuture::new(SHARE_RETRY_MS).await;
                        let Some(state) = state.upgrade() else { return };
                        let s = state.borrow();
                        // Still waiting, on the same connection.
                        if !s.share_live && s.me == me {
                            s.request_share();
                        }
                    });
                }
                _ => {}
            }
        }
        ServerMsg::Joined { .. } | ServerMsg::Pong => {}
    }
}

/// A receiver joined: open a connection and a channel to it and offer.
async fn connect_receiver(state: &Rc<RefCell<State>>, peer: PeerId) -> Result<(), ClientError> {
    let ((link, link_events), flow) = {
        let s = state.borrow();
        let (Some(signaling), Some(key), Some(me)) = (s.signaling.clone(), s.key.clone(), s.me)
        else {
            return Err(ClientError::Signaling("not connected".into()));
        };
        let outbox = Outbox {
            signaling,
            key,
            me,
            remote: peer,
        };
        (RtcLink::new(outbox, &s.ice_servers)?, s.flow)
    };
    let dc = link.create_channel("files");
    let (channel, events, backpressure) = Channel::new(dc, flow.low_water, flow.high_water);
    let link = Rc::new(link);
    {
        let mut s = state.borrow_mut();
        let n = s.next_receiver;
        s.next_receiver += 1;
        let row = ReceiverRow::new(peer, format!("Receiver {n}"));
        s.ui.receivers.update(|rows| rows.push(row.clone()));
        s.receivers.insert(
            peer,
            Receiver {
                link: link.clone(),
                channel,
                row,
                open: false,
            },
        );
    }
    spawn_local(watch_link(Rc::downgrade(state), peer, link_events));
    spawn_local(serve_receiver(
        Rc::downgrade(state),
        peer,
        events,
        backpressure,
    ));
    link.offer().await
}

/// Drops a receiver whose connection failed or closed.
async fn watch_link(
    state: Weak<RefCell<State>>,
    peer: PeerId,
    mut events: UnboundedReceiver<LinkEvent>,
) {
    while let Some(event) = events.next().await {
        if let LinkEvent::State(RtcPeerConnectionState::Failed | RtcPeerConnectionState::Closed) =
            event
        {
            if let Some(state) = state.upgrade() {
                state.borrow_mut().drop_receiver(peer);
            }
            return;
        }
    }
}

/// Answers one receiver's requests, one file at a time, until its channel closes.
async fn serve_receiver(
    state: Weak<RefCell<State>>,
    peer: PeerId,
    mut events: UnboundedReceiver<ChannelEvent>,
    mut backpressure: Backpressure,
) {
    while let Some(event) = events.next().await {
        let Some(st) = state.upgrade() else { return };
        match event {
            ChannelEvent::Open => {
                let mut s = st.borrow_mut();
                if let Some(r) = s.receivers.get_mut(&peer) {
                    r.open = true;
                    r.row.state.set("connected".into());
                }
                s.update_peer_count();
                let _ = send_msg(backpressure.channel(), &s.manifest());
            }
            ChannelEvent::Text(text) => match serde_json::from_str::<PeerMsg>(&text) {
                Ok(PeerMsg::Request { file }) => {
                    let (shared, receiver, flow) = {
                        let s = st.borrow();
                        let shared = s.files.iter().find(|f| f.meta.id == file).cloned();
                        let receiver = s
                            .receivers
                            .get(&peer)
                            .map(|r| (r.row.clone(), r.link.max_message_size()));
                        (shared, receiver, s.flow)
                    };
                    drop(st);
                    let Some((row, max_message)) = receiver else {
                        return;
                    };
                    let Some(shared) = shared else {
                        let msg = PeerMsg::FileError {
                            file,
                            message: "no longer shared".into(),
                        };
                        let _ = send_msg(backpressure.channel(), &msg);
                        continue;
                    };
                    let flow = flow.fitted_to(max_message);
                    row.state.set(format!("sending {}", shared.meta.name));
                    let sent = send_file(&mut backpressure, &shared, flow, &row).await;
                    row.state.set("connected".into());
                    match sent {
                        Ok(()) => {}
                        Err(ClientError::ChannelClosed) => {
                            if let Some(st) = state.upgrade() {
                                st.borrow_mut().drop_receiver(peer);
                            }
                            return;
                        }
                        Err(e) => {
                            let msg = PeerMsg::FileError {
                                file,
                                message: e.to_string(),
                            };
                            let _ = send_msg(backpressure.channel(), &msg);
                        }
                    }
                }
                Ok(other) => leptos::logging::warn!("unexpected from receiver: {other:?}"),
                Err(e) => leptos::logging::warn!("unreadable message from receiver: {e}"),
            },
            ChannelEvent::Binary(_) => {}
            ChannelEvent::Closed => {
                st.borrow_mut().drop_receiver(peer);
                return;
            }
        }
    }
}

/// Streams one file: reads blocks in order, hashes them as they pass, frames them by offset.
async fn send_file(
    out: &mut Backpressure,
    shared: &SharedFile,
    flow: FlowControl,
    row: &ReceiverRow,
) -> Result<(), ClientError> {
    let size = shared.meta.size;
    let mut meter = Meter::new(size);
    let mut last_progress = now_ms();
    row.progress.set(meter.update(last_progress, 0));
    let known = shared.sha256.borrow().clone();
    let mut hasher = known.is_none().then(Sha256::new);
    let mut frame_buf = Vec::with_capacity(frame::HEADER_LEN + flow.chunk_size);
    let mut offset = 0u64;
    while offset < size {
        if shared.removed.get() {
            return Err(ClientError::Js("removed by the sender".into()));
        }
        let now = now_ms();
        if now - last_progress >= PROGRESS_EVERY_MS {
            last_progress = now;
            row.progress.set(meter.update(now, offset));
        }
        let end = (offset + flow.read_block as u64).min(size);
        let block = read_range(&shared.file, offset, end).await?;
        for (rel, len) in frame::chunks(u64::from(block.length()), flow.chunk_size) {
            // One copy per byte into WASM: straight from the read block into the frame.
            frame_buf.resize(frame::HEADER_LEN + len, 0);
            frame_buf[..frame::HEADER_LEN]
                .copy_from_slice(&frame::header(shared.meta.id, offset + rel));
            let payload = &mut frame_buf[frame::HEADER_LEN..];
            block
                .subarray(rel as u32, (rel as usize + len) as u32)
                .copy_to(payload);
            if let Some(h) = hasher.as_mut() {
                h.update(&*payload);
            }
            out.send(&frame_buf).await?;
        }
        offset = end;
    }
    // `hasher` is None exactly when the digest was already known.
    let sha256 = match hasher {
        Some(h) => {
            let digest = hex::encode(h.finalize());
            *shared.sha256.borrow_mut() = Some(digest.clone());
            digest
        }
        None => known.unwrap_or_default(),
    };
    row.progress.set(meter.update(now_ms(), size));
    send_msg(
        out.channel(),
        &PeerMsg::FileEnd {
            file: shared.meta.id,
            size,
            sha256,
        },
    )
}

async fn read_range(
    file: &web_sys::File,
    start: u64,
    end: u64,
) -> Result<js_sys::Uint8Array, ClientError> {
    let blob = file.slice_with_f64_and_f64(start as f64, end as f64)?;
    let buf = JsFuture::from(blob.array_buffer())
        .await
        .map_err(|e| ClientError::Js(format!("cannot read file: {}", js_message(&e))))?;
    Ok(js_sys::Uint8Array::new(&buf))
}
