//! The sender's session: one signaling socket, one share, and per receiver one peer connection,
//! one data channel, one task reading its messages and one task sending the files it asks for.
//!
//! A receiver is given a connection only once it proves it holds the link's secret (a sealed
//! `hello`): anyone who merely knows the share id costs this page nothing. Its requests (byte
//! ranges of a file, each with a transfer id) are served one at a time, in order; every block's
//! BLAKE3 hash goes ahead of its bytes, computed as the block passes (and kept, so later receivers
//! and resumed downloads cost no hashing); a receiver's acknowledgements keep the request at most
//! a window ahead of what it has stored, and a `cancel` stops it at the next frame.
//!
//! The signaling socket is reopened when it drops (a node restarting closes it with 4003); the
//! page then takes its share back under its new peer id with the share's claim token, so the link
//! it handed out keeps working. The share (id, secret, token) and the list of files are kept in
//! the tab's session storage too, so a reload of this page keeps the same link; the files
//! themselves must be added again (the page lists them), and receivers resume when they are.

use super::channel::{send_msg, Backpressure, Channel, ChannelEvent};
use super::handles;
use super::rtc::{open_payload, LinkEvent, Outbox, RtcLink};
use super::signaling::{self, Event, Signaling};
use super::{js_message, now_ms, picker, random_hex, window, ClientError};
use crate::pairing::{Endpoint, Offer, Setup};
use crate::protocol::{
    ClaimToken, ClientMsg, ErrorCode, IceServer, PeerId, ServerMsg, ShareId, SignalPayload,
};
use crate::seal::{ShareKey, SECRET_BYTES};
use crate::transfer::blocks::{block_hash, root_hash, BlockHash, Layout};
use crate::transfer::hello;
use crate::transfer::outgoing::{Job, Outgoing};
use crate::transfer::progress::Meter;
use crate::transfer::{frame, query_pairs, FileId, FileMeta, FlowControl, PeerMsg};
use crate::view::{FileRow, ReceiverRow, SenderUi};
use futures::channel::mpsc::{unbounded, UnboundedReceiver, UnboundedSender};
use futures::StreamExt;
use leptos::prelude::*;
use serde::{Deserialize, Serialize};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use wasm_bindgen::JsValue;
use wasm_bindgen_futures::{spawn_local, JsFuture};
use web_sys::RtcPeerConnectionState;

/// Progress on the sender's page is refreshed at most this often (ms). Twice a second: measured
/// with `scripts/bench-transfer` at 1 GiB, redrawing progress ten times a second cost the two
/// browsers ~20 CPU-ms per MB more than the raw page (0.80× its speed), once a second ~1.0×.
const PROGRESS_EVERY_MS: f64 = 500.0;

/// After a backend failure the share is asked for again this much later (ms).
const SHARE_RETRY_MS: u32 = 1_000;

/// Receivers that said hello but whose channel is not open yet, at most: each costs a peer
/// connection, and only a holder of the link can say hello, but a holder may still misbehave.
const MAX_PENDING: usize = 16;

/// A connection that failed is kept this long (ms) in case the receiver's ICE restart revives it.
const FAILED_GRACE_MS: u32 = 15_000;

/// Where the tab keeps its share across reloads.
const SESSION_KEY: &str = "beamdrop.sender";

/// A file offered in this share, with the hashes of the blocks read so far.
struct SharedFile {
    meta: FileMeta,
    file: web_sys::File,
    layout: Layout,
    hashes: RefCell<Vec<Option<BlockHash>>>,
    /// Set when the sender removes it: sends in progress stop.
    removed: Cell<bool>,
}

impl SharedFile {
    /// The file's BLAKE3 hash, reading (not sending) any block not hashed yet.
    async fn root(&self) -> Result<BlockHash, ClientError> {
        for index in 0..self.layout.count() {
            if self.hashes.borrow()[index as usize].is_some() {
                continue;
            }
            let (start, end) = self.layout.range(index);
            let bytes = read_range(&self.file, start, end).await?.to_vec();
            self.hashes.borrow_mut()[index as usize] =
                Some(block_hash(&self.layout, index, &bytes));
        }
        let hashes: Vec<BlockHash> = self.hashes.borrow().iter().flatten().copied().collect();
        root_hash(&self.layout, &hashes)
            .ok_or_else(|| ClientError::Js("block hashes do not cover the file".into()))
    }

    fn known_root(&self) -> Option<BlockHash> {
        let hashes: Option<Vec<BlockHash>> = self.hashes.borrow().iter().copied().collect();
        root_hash(&self.layout, &hashes?)
    }
}

/// One receiver: its connection and channel (the listeners live as long as this does), and
/// what it asked for.
struct Receiver {
    /// The peer id its signaling socket has now: the key it is kept under (its first one),
    /// unless its socket came back under a new id while the connection lived (`moved`).
    via: PeerId,
    link: Rc<RtcLink>,
    channel: Channel,
    row: ReceiverRow,
    open: bool,
    /// The hello this connection answers.
    attempt: u32,
    out: Rc<RefCell<Outgoing>>,
    /// Wakes the receiver's send task (a request, an ack, a cancel).
    wake: UnboundedSender<()>,
}

/// What the tab keeps across a reload of this page.
#[derive(Serialize, Deserialize)]
struct Saved {
    share: ShareId,
    token: ClaimToken,
    secret: String,
    files: Vec<SavedFile>,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SavedFile {
    name: String,
    path: String,
    size: u64,
    modified: u64,
}

impl SavedFile {
    fn of(meta: &FileMeta) -> Self {
        Self {
            name: meta.name.clone(),
            path: meta.path.clone(),
            size: meta.size,
            modified: meta.modified,
        }
    }
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
    /// Files the share had before this page was reloaded, not added again yet.
    missing: Vec<SavedFile>,
    /// Handles of the items dropped into this share (where the browser gives them), kept in
    /// IndexedDB so a reload can read the files again.
    roots: Vec<JsValue>,
    /// Kept handles that need the person's permission before they can be read again.
    waiting_roots: Vec<JsValue>,
    next_file: u32,
    next_receiver: u32,
    receivers: HashMap<PeerId, Receiver>,
    /// Flow-control settings (defaults, or `?chunk=…` overrides for benchmarks).
    flow: FlowControl,
    /// Test hook (`?corrupt_block=N`): the first time block N of any file is sent, one of its
    /// bytes is flipped after hashing, as if damaged on the way.
    corrupt_block: Cell<Option<u32>>,
    /// A pairing without the server waiting for its answer: the receiver it made, and the offer.
    pairing: Option<(PeerId, Offer)>,
}

impl State {
    fn manifest(&self) -> PeerMsg {
        PeerMsg::Manifest {
            files: self
                .files
                .iter()
                .map(|f| FileMeta {
                    hash: f.known_root(),
                    ..f.meta.clone()
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

    /// The share is bound to this page: its key, and the link to hand out.
    fn bind_share(&mut self, share: &ShareId) -> Result<(), ClientError> {
        self.key = Some(ShareKey::derive(&self.secret, share)?);
        let origin = window()?.location().origin()?;
        self.ui
            .link
            .set(Some(format!("{origin}/s/{share}#{}", self.secret)));
        self.share_live = true;
        self.ui.reconnecting.set(false);
        Ok(())
    }

    /// Keeps the share and the file list in the tab's session storage, and the dropped items'
    /// handles in IndexedDB.
    fn save(&self) {
        let Some((share, token)) = &self.share else {
            return;
        };
        if !self.roots.is_empty() {
            let (share, roots) = (share.to_string(), self.roots.clone());
            spawn_local(async move {
                if let Err(e) = handles::save(&share, &roots).await {
                    leptos::logging::warn!("could not keep the dropped files' handles: {e}");
                }
            });
        }
        let saved = Saved {
            share: share.clone(),
            token: token.clone(),
            secret: self.secret.clone(),
            files: self
                .files
                .iter()
                .map(|f| SavedFile::of(&f.meta))
                .chain(self.missing.iter().cloned())
                .collect(),
        };
        let storage = window()
            .ok()
            .and_then(|w| w.session_storage().ok().flatten());
        if let (Some(storage), Ok(text)) = (storage, serde_json::to_string(&saved)) {
            let _ = storage.set_item(SESSION_KEY, &text);
        }
    }

    /// The signaling connection dropped. Receivers whose offer was never answered are dropped:
    /// their answer would go to this page's old peer id, so they cannot connect any more (they
    /// say hello again and get a fresh offer). Connected ones are not touched.
    fn signaling_lost(&mut self) {
        self.signaling = None;
        self.me = None;
        self.share_live = false;
        let stranded: Vec<PeerId> = self
            .receivers
            .iter()
            // A pairing by hand waiting for its answer needs no server.
            .filter(|(_, r)| !r.open && !r.link.has_remote_description() && r.link.signaled())
            .map(|(peer, _)| *peer)
            .collect();
        for peer in stranded {
            self.drop_receiver(peer);
        }
    }

    /// The receiver whose signaling socket is `via` now (its key: the id it first said hello
    /// from). None for a peer no receiver is reached at, such as an id one has moved away from.
    fn key_of(&self, via: PeerId) -> Option<PeerId> {
        self.receivers
            .iter()
            .find(|(_, r)| r.via == via)
            .map(|(key, _)| *key)
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

fn load_saved() -> Option<Saved> {
    let storage = window().ok()?.session_storage().ok()??;
    let text = storage.get_item(SESSION_KEY).ok()??;
    serde_json::from_str(&text).ok()
}

impl SenderSession {
    pub fn start(ui: SenderUi) -> Self {
        let saved = load_saved();
        let secret = match &saved {
            Some(saved) => saved.secret.clone(),
            None => random_hex(SECRET_BYTES).unwrap_or_else(|e| {
                ui.error
                    .set(Some(format!("no secure random numbers here: {e}")));
                String::new()
            }),
        };
        let query = window()
            .and_then(|w| Ok(w.location().search()?))
            .unwrap_or_default();
        let corrupt_block = query_pairs(&query)
            .find(|(k, _)| *k == "corrupt_block")
            .and_then(|(_, v)| v.parse().ok());
        let missing = saved.as_ref().map(|s| s.files.clone()).unwrap_or_default();
        ui.missing
            .set(missing.iter().map(|f| display(&f.path, &f.name)).collect());
        let state = Rc::new(RefCell::new(State {
            ui,
            signaling: None,
            ice_servers: Vec::new(),
            me: None,
            secret,
            share: saved.map(|s| (s.share, s.token)),
            share_live: false,
            key: None,
            files: Vec::new(),
            missing,
            roots: Vec::new(),
            waiting_roots: Vec::new(),
            next_file: 0,
            next_receiver: 1,
            flow: FlowControl::DEFAULT.with_query(&query),
            receivers: HashMap::new(),
            corrupt_block: Cell::new(corrupt_block),
            pairing: None,
        }));
        spawn_local(run_signaling(Rc::downgrade(&state), signaling::connect()));
        if let Some((share, _)) = &state.borrow().share {
            spawn_local(restore(Rc::downgrade(&state), share.to_string()));
        }
        Self { state }
    }

    /// Asks for access to the dropped files kept from before a reload (a click: the browser
    /// prompts once per dropped item) and adds back those the share still offered.
    pub fn restore_files(&self) {
        let waiting = std::mem::take(&mut self.state.borrow_mut().waiting_roots);
        self.state.borrow().ui.restorable.set(0);
        let state = Rc::downgrade(&self.state);
        spawn_local(async move {
            let mut allowed = Vec::new();
            for root in waiting {
                if handles::permission(&root, true).await == "granted" {
                    allowed.push(root);
                }
            }
            add_restored(&state, &allowed).await;
        });
    }

    /// Adds the files of a file input (a chosen folder keeps its relative paths).
    pub fn add_files(&self, list: &web_sys::FileList) {
        add_picked(&self.state, picker::from_file_list(list));
    }

    /// Adds what was dropped, walking dropped folders. Where the browser gives handles for
    /// dropped items, they are kept (see `handles`) so a reload of this page can read the files
    /// again; otherwise the entries API walks the folders.
    pub fn add_dropped(&self, dt: &web_sys::DataTransfer) {
        // All three must be taken now: the browser empties the drop's lists afterwards.
        let with_handles = handles::dropped(dt);
        let entries = picker::dropped_entries(dt);
        let flat = dt.files();
        let state = Rc::downgrade(&self.state);
        spawn_local(async move {
            let mut roots = Vec::new();
            let mut picked = Ok(Vec::new());
            if let Some(promises) = with_handles {
                match handles::walk(promises).await {
                    Ok((files, found)) => {
                        picked = Ok(files);
                        roots = found;
                    }
                    Err(e) => leptos::logging::warn!("dropped items without handles: {e}"),
                }
            }
            if roots.is_empty() {
                picked = if entries.is_empty() {
                    // No entry API (or nothing but plain files): the flat list still works.
                    Ok(flat.map(|l| picker::from_file_list(&l)).unwrap_or_default())
                } else {
                    picker::walk(entries).await
                };
            }
            let Some(state) = state.upgrade() else { return };
            match picked {
                Ok(picked) => {
                    state.borrow_mut().roots.extend(roots);
                    add_picked(&state, picked);
                }
                Err(e) => {
                    let message = format!("could not read the dropped folder: {e}");
                    state.borrow().ui.error.set(Some(message));
                }
            }
        });
    }

    /// "Pair without the server": a connection whose offer (every candidate gathered) is shown
    /// as a code for the receiver to paste at `/pair`. A new pairing replaces one not answered.
    pub fn pair_start(&self) {
        let state = self.state.clone();
        spawn_local(async move {
            let ui = state.borrow().ui;
            ui.pair_error.set(None);
            if let Err(e) = offer_pairing(&state).await {
                ui.pair_error.set(Some(e.to_string()));
            }
        });
    }

    /// The receiver's answer to the pairing's offer, as pasted: connects, or says why not.
    pub fn pair_answer(&self, code: String) {
        let state = self.state.clone();
        spawn_local(async move {
            let ui = state.borrow().ui;
            let opened = {
                let s = state.borrow();
                let Some((peer, offer)) = &s.pairing else {
                    ui.pair_error.set(Some(
                        "Start a pairing first: its offer code is gone.".into(),
                    ));
                    return;
                };
                let link = s.receivers.get(peer).map(|r| r.link.clone());
                offer.open_answer(&code).map(|endpoint| (endpoint, link))
            };
            match opened {
                Err(e) => ui.pair_error.set(Some(e.to_string())),
                Ok((_, None)) => ui.pair_error.set(Some(
                    "That pairing's connection is gone: start again.".into(),
                )),
                Ok((endpoint, Some(link))) => {
                    match link.accept_answer(&endpoint.to_sdp(Setup::Active)).await {
                        Ok(()) => {
                            state.borrow_mut().pairing = None;
                            ui.pair_code.set(None);
                            ui.pair_error.set(None);
                        }
                        Err(e) => ui.pair_error.set(Some(e.to_string())),
                    }
                }
            }
        });
    }

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
        state.save();
    }
}

/// After a reload: reads the dropped items kept for `share` again where the browser still
/// allows it, and offers a button for those that need the person's permission first.
async fn restore(state: Weak<RefCell<State>>, share: String) {
    let roots = match handles::load(&share).await {
        Ok(roots) => roots,
        Err(e) => {
            leptos::logging::warn!("no dropped files kept: {e}");
            return;
        }
    };
    let mut readable = Vec::new();
    let mut waiting = Vec::new();
    for root in roots {
        match handles::permission(&root, false).await.as_str() {
            "granted" => readable.push(root),
            "prompt" => waiting.push(root),
            _ => {}
        }
    }
    if let Some(st) = state.upgrade() {
        let mut s = st.borrow_mut();
        s.roots = readable.iter().chain(&waiting).cloned().collect();
        s.ui.restorable.set(waiting.len());
        s.waiting_roots = waiting;
    }
    add_restored(&state, &readable).await;
}

/// Adds back, from readable dropped items, the files this share offered before the reload.
async fn add_restored(state: &Weak<RefCell<State>>, roots: &[JsValue]) {
    if roots.is_empty() {
        return;
    }
    let picked = match handles::files_under(roots).await {
        Ok(picked) => picked,
        Err(e) => {
            leptos::logging::warn!("could not read the dropped files again: {e}");
            return;
        }
    };
    let Some(state) = state.upgrade() else { return };
    let missing = state.borrow().missing.clone();
    let wanted: Vec<picker::Picked> = picked
        .into_iter()
        .filter(|p| {
            let again = SavedFile {
                name: p.file.name(),
                path: p.path.clone(),
                size: p.file.size() as u64,
                modified: p.file.last_modified().max(0.0) as u64,
            };
            missing.contains(&again)
        })
        .collect();
    if !wanted.is_empty() {
        add_picked(&state, wanted);
    }
}

fn display(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        path.to_owned()
    }
}

/// Adds files to the share; receivers see the new list at once.
fn add_picked(state: &RefCell<State>, picked: Vec<picker::Picked>) {
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
            modified: file.last_modified().max(0.0) as u64,
            hash: None,
        };
        // A file the share had before a reload of this page is back.
        let again = SavedFile::of(&meta);
        state.missing.retain(|m| *m != again);
        let layout = Layout::new(meta.size);
        rows.push(FileRow::new(meta.clone()));
        state.files.push(Rc::new(SharedFile {
            hashes: RefCell::new(vec![None; layout.count() as usize]),
            layout,
            meta,
            file,
            removed: Cell::new(false),
        }));
    }
    let missing: Vec<String> = state
        .missing
        .iter()
        .map(|f| display(&f.path, &f.name))
        .collect();
    state.ui.missing.set(missing);
    state.ui.files.update(|files| files.extend(rows));
    state.broadcast_manifest();
    state.save();
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
        ServerMsg::IceServers { ice_servers } => {
            let mut s = state.borrow_mut();
            for r in s.receivers.values() {
                r.link.set_ice_servers(&ice_servers);
            }
            s.ice_servers = ice_servers;
        }
        ServerMsg::Welcome { you, ice_servers } => {
            let mut s = state.borrow_mut();
            s.me = Some(you);
            s.ice_servers = ice_servers;
            s.request_share();
        }
        ServerMsg::ShareCreated { share, token } => {
            let mut s = state.borrow_mut();
            let replaced = s.share.is_some();
            if let Err(e) = s.bind_share(&share) {
                s.ui.error.set(Some(e.to_string()));
                return;
            }
            s.share = Some((share, token));
            s.save();
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
                if let Err(e) = s.bind_share(&share) {
                    s.ui.error.set(Some(e.to_string()));
                }
            }
        }
        ServerMsg::Signal { from, payload } => on_signal(state, from, &payload).await,
        ServerMsg::PeerLeft { peer } => {
            // A receiver that moved to a new socket is not gone when its old one closes.
            let mut s = state.borrow_mut();
            if let Some(key) = s.key_of(peer) {
                s.drop_receiver(key);
            }
        }
        ServerMsg::Error { code, message } => {
            leptos::logging::warn!("server error {code:?}: {message}");
            let mut s = state.borrow_mut();
            match code {
                // Gone for longer than the server remembers it: a new share (and link).
                ErrorCode::ReclaimRefused if !s.share_live => {
                    s.share = None;
                    s.request_share();
                }
                // No link could be made (this address made too many, or the server holds as
                // many shares as it can): say so, rather than wait for one.
                ErrorCode::TooManyShares if !s.share_live => {
                    s.ui.error
                        .set(Some(format!("Could not make a link: {message}.")));
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
        // A join costs nothing until the receiver proves it holds the link (its hello).
        ServerMsg::PeerJoined { .. } | ServerMsg::Joined { .. } | ServerMsg::Pong => {}
    }
}

/// A sealed payload from a receiver: a hello (connect to it), or signaling for its connection.
async fn on_signal(state: &Rc<RefCell<State>>, from: PeerId, sealed: &str) {
    let opened = {
        let s = state.borrow();
        let (Some(key), Some(me)) = (s.key.as_ref(), s.me) else {
            return;
        };
        open_payload(key, from, me, sealed)
    };
    match opened {
        Ok(SignalPayload::Hello { attempt }) => {
            if let Err(e) = connect_receiver(state, from, attempt).await {
                leptos::logging::warn!("could not connect to a receiver: {e}");
            }
        }
        Ok(SignalPayload::Moved { from: old }) => {
            let link = {
                let mut s = state.borrow_mut();
                let (Some(signaling), Some(me)) = (s.signaling.clone(), s.me) else {
                    return;
                };
                let Some(r) = s.receivers.get_mut(&old).filter(|r| r.via == old) else {
                    return; // not ours (any more): its hello will follow
                };
                r.via = from;
                r.link.readdress(signaling, me, from);
                r.link.clone()
            };
            // The connection lost its path when the receiver's network changed: a new one.
            if let Err(e) = link.restart_ice().await {
                leptos::logging::warn!("ICE restart for a moved receiver failed: {e}");
            }
        }
        Ok(payload) => {
            let link = {
                let s = state.borrow();
                s.key_of(from)
                    .and_then(|key| s.receivers.get(&key))
                    .map(|r| r.link.clone())
            };
            let Some(link) = link else { return };
            if let Err(e) = link.apply(payload).await {
                leptos::logging::warn!("signal from {from} not applied: {e}");
            }
        }
        Err(e) => {
            // Altered in transit or sealed with another key: no connection to that peer, and
            // a sealed word back so its page does not wait for an offer that never comes.
            leptos::logging::warn!("signal from {from} refused: {e}");
            let mut s = state.borrow_mut();
            if let Some(key) = s.key_of(from) {
                s.drop_receiver(key);
            }
            if let (Some(signaling), Some(key), Some(me)) =
                (s.signaling.clone(), s.key.clone(), s.me)
            {
                let outbox = Outbox {
                    signaling,
                    key,
                    me,
                    remote: from,
                };
                outbox.send(&SignalPayload::Rejected);
            }
        }
    }
}

/// A receiver said hello: open a connection and a channel to it and offer. A newer hello from
/// the same receiver (its connection broke) replaces the old connection.
async fn connect_receiver(
    state: &Rc<RefCell<State>>,
    peer: PeerId,
    attempt: u32,
) -> Result<(), ClientError> {
    let (link, link_events) = {
        let mut s = state.borrow_mut();
        let known: Vec<hello::Known> = s
            .receivers
            .iter()
            .map(|(key, r)| hello::Known {
                key: *key,
                via: r.via,
                attempt: r.attempt,
                open: r.open,
            })
            .collect();
        match hello::answer(&known, peer, attempt, MAX_PENDING) {
            hello::Answer::Stale => return Ok(()),
            hello::Answer::Busy { pending } => {
                return Err(ClientError::Js(format!(
                    "{pending} receivers are still connecting; this one waits"
                )))
            }
            hello::Answer::Connect { replace } => {
                for key in replace {
                    s.drop_receiver(key);
                }
            }
        }
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
        RtcLink::new(Some(outbox), false, &s.ice_servers)?
    };
    attach_receiver(state, peer, link, link_events, attempt)
        .offer()
        .await
}

/// A pairing without the server: a receiver's connection with no one on the other end yet,
/// and its offer as a code (on the page) once every candidate is gathered.
async fn offer_pairing(state: &Rc<RefCell<State>>) -> Result<(), ClientError> {
    let (link, events) = {
        let mut s = state.borrow_mut();
        if let Some((old, _)) = s.pairing.take() {
            s.drop_receiver(old);
        }
        s.ui.pair_code.set(None);
        RtcLink::new(None, false, &s.ice_servers)?
    };
    // Kept under an id of its own, as a receiver met through the server is under its peer id.
    let mut id = [0u8; 16];
    getrandom::getrandom(&mut id).map_err(|e| ClientError::Js(e.to_string()))?;
    let peer = PeerId(uuid::Uuid::from_bytes(id));
    let link = attach_receiver(state, peer, link, events, 0);
    let sdp = link.offer_gathered().await?;
    let share = state
        .borrow()
        .share
        .as_ref()
        .map(|(share, _)| share.clone());
    let offer = Offer::new(share.as_ref(), Endpoint::from_sdp(&sdp)?)?;
    let mut s = state.borrow_mut();
    if s.receivers.contains_key(&peer) {
        s.ui.pair_code.set(Some(offer.code()));
        s.pairing = Some((peer, offer));
    }
    Ok(())
}

/// Takes a receiver on `link` into the page: its channel, its row, and the tasks that watch the
/// connection, read its requests and send to it.
fn attach_receiver(
    state: &Rc<RefCell<State>>,
    peer: PeerId,
    link: RtcLink,
    link_events: UnboundedReceiver<LinkEvent>,
    attempt: u32,
) -> Rc<RtcLink> {
    let flow = state.borrow().flow;
    let dc = link.create_channel("files");
    let (channel, events, backpressure) = Channel::new(dc, flow.low_water, flow.high_water, None);
    let link = Rc::new(link);
    let out = Rc::new(RefCell::new(Outgoing::default()));
    let (wake, woken) = unbounded();
    let row = {
        let mut s = state.borrow_mut();
        let n = s.next_receiver;
        s.next_receiver += 1;
        let row = ReceiverRow::new(peer, format!("Receiver {n}"));
        s.ui.receivers.update(|rows| rows.push(row.clone()));
        s.receivers.insert(
            peer,
            Receiver {
                via: peer,
                link: link.clone(),
                channel,
                row: row.clone(),
                open: false,
                attempt,
                out: out.clone(),
                wake,
            },
        );
        row
    };
    spawn_local(watch_link(
        Rc::downgrade(state),
        peer,
        Rc::downgrade(&link),
        link_events,
    ));
    spawn_local(read_receiver(Rc::downgrade(state), peer, events));
    spawn_local(send_to_receiver(
        Rc::downgrade(state),
        peer,
        backpressure,
        out,
        woken,
        row,
    ));
    link
}

/// Drops a receiver whose connection closed, or failed and was not revived.
async fn watch_link(
    state: Weak<RefCell<State>>,
    peer: PeerId,
    link: Weak<RtcLink>,
    mut events: UnboundedReceiver<LinkEvent>,
) {
    while let Some(event) = events.next().await {
        match event {
            LinkEvent::State(RtcPeerConnectionState::Connected) => {
                let Some(l) = link.upgrade() else { return };
                let path = l.path().await;
                if let Some(state) = state.upgrade() {
                    if let Some(r) = state.borrow().receivers.get(&peer) {
                        if Rc::ptr_eq(&r.link, &l) {
                            r.row.path.set(path);
                        }
                    }
                }
            }
            LinkEvent::State(RtcPeerConnectionState::Closed) => {
                if let Some(state) = state.upgrade() {
                    drop_if_current(&state, peer, &link);
                }
                return;
            }
            LinkEvent::State(RtcPeerConnectionState::Failed) => {
                // The receiver may restart ICE on this very connection; give it the time.
                let (state, link) = (state.clone(), link.clone());
                spawn_local(async move {
                    gloo_timers::future::TimeoutFuture::new(FAILED_GRACE_MS).await;
                    let (Some(state), Some(l)) = (state.upgrade(), link.upgrade()) else {
                        return;
                    };
                    if l.state() == RtcPeerConnectionState::Failed {
                        drop_if_current(&state, peer, &link);
                    }
                });
            }
            _ => {}
        }
    }
}

/// Drops `peer` if `link` is still its connection (not one a newer hello replaced it with).
fn drop_if_current(state: &Rc<RefCell<State>>, peer: PeerId, link: &Weak<RtcLink>) {
    let mut s = state.borrow_mut();
    let current = match (s.receivers.get(&peer), link.upgrade()) {
        (Some(r), Some(l)) => Rc::ptr_eq(&r.link, &l),
        _ => false,
    };
    if current {
        s.drop_receiver(peer);
    }
}

/// One receiver's messages: requests, acks and cancels go to its send task.
async fn read_receiver(
    state: Weak<RefCell<State>>,
    peer: PeerId,
    mut events: UnboundedReceiver<ChannelEvent>,
) {
    while let Some(event) = events.next().await {
        let Some(st) = state.upgrade() else { return };
        let mut s = st.borrow_mut();
        let Some(r) = s.receivers.get(&peer) else {
            return;
        };
        let (dc, out, wake) = (r.channel.dc.clone(), r.out.clone(), r.wake.clone());
        match event {
            ChannelEvent::Open => {
                if let Some(r) = s.receivers.get_mut(&peer) {
                    r.open = true;
                    r.row.state.set("connected".into());
                }
                s.update_peer_count();
                let _ = send_msg(&dc, &s.manifest());
            }
            ChannelEvent::Text(text) => match serde_json::from_str::<PeerMsg>(&text) {
                Ok(PeerMsg::Request {
                    transfer,
                    file,
                    ranges,
                }) => {
                    let layout = s.files.iter().find(|f| f.meta.id == file).map(|f| f.layout);
                    let queued = match layout {
                        Some(layout) => out
                            .borrow_mut()
                            .push(transfer, file, &layout, &ranges)
                            .map_err(|e| e.to_string()),
                        None => Err("no longer shared".into()),
                    };
                    match queued {
                        Ok(()) => {
                            let _ = wake.unbounded_send(());
                        }
                        Err(message) => {
                            let _ = send_msg(
                                &dc,
                                &PeerMsg::Refused {
                                    transfer,
                                    file,
                                    message,
                                },
                            );
                        }
                    }
                }
                Ok(PeerMsg::Cancel { transfer }) => {
                    out.borrow_mut().cancel(transfer);
                    let _ = wake.unbounded_send(());
                }
                Ok(PeerMsg::Ack { transfer, stored }) => {
                    out.borrow_mut().ack(transfer, stored);
                    let _ = wake.unbounded_send(());
                }
                Ok(other) => leptos::logging::warn!("unexpected from receiver: {other:?}"),
                Err(e) => leptos::logging::warn!("unreadable message from receiver: {e}"),
            },
            ChannelEvent::Binary(_) => {}
            ChannelEvent::Closed => {
                s.drop_receiver(peer);
                return;
            }
        }
    }
}

/// Why a request stopped before its end.
enum Stop {
    Cancelled,
    Closed,
    Failed(String),
}

impl From<ClientError> for Stop {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::ChannelClosed => Stop::Closed,
            e => Stop::Failed(e.to_string()),
        }
    }
}

/// Serves one receiver's requests, one at a time, until its channel closes.
async fn send_to_receiver(
    state: Weak<RefCell<State>>,
    peer: PeerId,
    mut bp: Backpressure,
    out: Rc<RefCell<Outgoing>>,
    mut woken: UnboundedReceiver<()>,
    row: ReceiverRow,
) {
    let mut buffers = Buffers::default();
    loop {
        let job = loop {
            if let Some(job) = out.borrow_mut().start_next() {
                break job;
            }
            if woken.next().await.is_none() {
                return;
            }
        };
        let (transfer, file) = (job.transfer, job.file);
        let sent = send_job(
            &state,
            peer,
            &mut bp,
            &out,
            &mut woken,
            &row,
            &mut buffers,
            job,
        )
        .await;
        out.borrow_mut().finish_current();
        row.state.set("connected".into());
        match sent {
            Ok(()) | Err(Stop::Cancelled) => {}
            Err(Stop::Closed) => {
                if let Some(st) = state.upgrade() {
                    st.borrow_mut().drop_receiver(peer);
                }
                return;
            }
            Err(Stop::Failed(message)) => {
                let refused = PeerMsg::Refused {
                    transfer,
                    file,
                    message,
                };
                let _ = send_msg(bp.channel(), &refused);
            }
        }
    }
}

/// Bytes sent, shown on the page at the progress rate (and whatever is left when a request ends,
/// however it ends), not once per block.
struct SentCounter {
    ui: SenderUi,
    unpublished: u64,
}

impl SentCounter {
    fn publish(&mut self) {
        if self.unpublished > 0 {
            let n = std::mem::take(&mut self.unpublished);
            self.ui.sent.update(|sent| *sent += n);
        }
    }
}

impl Drop for SentCounter {
    fn drop(&mut self) {
        self.publish();
    }
}

/// Reused between blocks: one block read into WASM memory, one frame being built.
#[derive(Default)]
struct Buffers {
    block: Vec<u8>,
    frame: Vec<u8>,
}

/// Sends one request: per block, its hash, then its bytes in frames; then the file's hash.
#[allow(clippy::too_many_arguments)]
async fn send_job(
    state: &Weak<RefCell<State>>,
    peer: PeerId,
    bp: &mut Backpressure,
    out: &Rc<RefCell<Outgoing>>,
    woken: &mut UnboundedReceiver<()>,
    row: &ReceiverRow,
    buffers: &mut Buffers,
    job: Job,
) -> Result<(), Stop> {
    let (shared, flow, ui) = {
        let st = state.upgrade().ok_or(Stop::Closed)?;
        let s = st.borrow();
        let shared = s.files.iter().find(|f| f.meta.id == job.file).cloned();
        let max_message = s
            .receivers
            .get(&peer)
            .and_then(|r| r.link.max_message_size());
        (shared, s.flow.fitted_to(max_message), s.ui)
    };
    let shared = shared.ok_or_else(|| Stop::Failed("no longer shared".into()))?;
    let transfer = job.transfer;
    let layout = shared.layout;
    let total: u64 = job.blocks.iter().map(|&i| layout.len(i)).sum();
    let mut meter = Meter::new(total);
    let mut last_progress = now_ms();
    row.state.set(format!("sending {}", shared.meta.name));
    row.progress.set(meter.update(last_progress, 0));
    let mut sent = 0u64;
    let mut counted = SentCounter { ui, unpublished: 0 };
    for &index in &job.blocks {
        // The receiver's disk sets the pace: stay within the window of what it has stored.
        while !out.borrow().within_window(transfer, sent, flow.window) {
            if woken.next().await.is_none() {
                return Err(Stop::Closed);
            }
            if out.borrow().is_cancelled(transfer) {
                return Err(Stop::Cancelled);
            }
        }
        if out.borrow().is_cancelled(transfer) {
            return Err(Stop::Cancelled);
        }
        if shared.removed.get() {
            return Err(Stop::Failed("removed by the sender".into()));
        }
        let (start, end) = layout.range(index);
        let len = (end - start) as usize;
        let read = read_range(&shared.file, start, end).await?;
        // One copy per byte into WASM: the hash is taken from it and frames are cut from it.
        buffers.block.resize(len, 0);
        read.copy_to(&mut buffers.block);
        let cached = shared.hashes.borrow()[index as usize];
        let hash = cached.unwrap_or_else(|| block_hash(&layout, index, &buffers.block));
        shared.hashes.borrow_mut()[index as usize] = Some(hash);
        if let Some(st) = state.upgrade() {
            let s = st.borrow();
            if s.corrupt_block.get() == Some(index) {
                s.corrupt_block.set(None);
                buffers.block[len / 2] ^= 0x55;
            }
        }
        send_msg(
            bp.channel(),
            &PeerMsg::Block {
                transfer,
                index,
                hash,
            },
        )?;
        for (offset, n) in frame::chunks(start, end, flow.chunk_size) {
            let rel = (offset - start) as usize;
            buffers.frame.clear();
            buffers
                .frame
                .extend_from_slice(&frame::header(transfer, offset));
            buffers
                .frame
                .extend_from_slice(&buffers.block[rel..rel + n]);
            bp.send(&buffers.frame).await?;
        }
        sent += len as u64;
        counted.unpublished += len as u64;
        let now = now_ms();
        if now - last_progress >= PROGRESS_EVERY_MS {
            last_progress = now;
            row.progress.set(meter.update(now, sent));
            counted.publish();
        }
    }
    row.progress.set(meter.update(now_ms(), total));
    let hash = shared.root().await?;
    send_msg(
        bp.channel(),
        &PeerMsg::End {
            transfer,
            file: job.file,
            size: layout.size,
            hash,
        },
    )?;
    Ok(())
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
