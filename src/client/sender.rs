//! The sender's session: one signaling socket, one share, and per receiver one peer connection,
//! one data channel and one task that answers its requests, streaming files with backpressure.

use super::channel::{send_msg, Backpressure, Channel, ChannelEvent};
use super::rtc::{LinkEvent, RtcLink};
use super::signaling::Signaling;
use super::{js_message, random_hex, window, ClientError};
use crate::components::send::SenderUi;
use crate::components::FileRow;
use crate::protocol::{ClientMsg, IceServer, PeerId, ServerMsg, SignalPayload};
use crate::transfer::{frame, FileId, FileMeta, FlowControl, PeerMsg};
use futures::channel::mpsc::UnboundedReceiver;
use futures::StreamExt;
use leptos::prelude::*;
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use wasm_bindgen_futures::{spawn_local, JsFuture};
use web_sys::RtcPeerConnectionState;

/// A file offered in this share. Its SHA-256 is computed during the first send and cached.
struct SharedFile {
    meta: FileMeta,
    file: web_sys::File,
    sha256: RefCell<Option<String>>,
}

/// One receiver: its connection and channel (the listeners live as long as this does).
struct Receiver {
    link: Rc<RtcLink>,
    channel: Channel,
    open: bool,
}

struct State {
    ui: SenderUi,
    signaling: Option<Signaling>,
    ice_servers: Vec<IceServer>,
    secret: String,
    files: Vec<Rc<SharedFile>>,
    next_file: u32,
    receivers: HashMap<PeerId, Receiver>,
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
}

/// Owned by the page; dropping it closes every connection.
pub struct SenderSession {
    state: Rc<RefCell<State>>,
}

impl SenderSession {
    pub fn start(ui: SenderUi) -> Self {
        let secret = random_hex(16).unwrap_or_default();
        let state = Rc::new(RefCell::new(State {
            ui,
            signaling: None,
            ice_servers: Vec::new(),
            secret,
            files: Vec::new(),
            next_file: 0,
            receivers: HashMap::new(),
        }));
        match Signaling::connect() {
            Ok((signaling, incoming)) => {
                state.borrow_mut().signaling = Some(signaling);
                spawn_local(run_signaling(Rc::downgrade(&state), incoming));
            }
            Err(e) => ui.error.set(Some(e.to_string())),
        }
        Self { state }
    }

    /// Adds files to the share; receivers see the new list at once.
    pub fn add_files(&self, list: &web_sys::FileList) {
        let mut state = self.state.borrow_mut();
        let mut rows = Vec::new();
        for i in 0..list.length() {
            let Some(file) = list.get(i) else { continue };
            let id = FileId(state.next_file);
            state.next_file += 1;
            let meta = FileMeta {
                id,
                name: file.name(),
                path: String::new(),
                size: file.size() as u64,
                mime: file.type_(),
                sha256: None,
            };
            rows.push(FileRow::new(meta.clone()));
            state.files.push(Rc::new(SharedFile {
                meta,
                file,
                sha256: RefCell::new(None),
            }));
        }
        state.ui.files.update(|files| files.extend(rows));
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
    mut incoming: impl futures::Stream<Item = super::signaling::Incoming> + Unpin,
) {
    while let Some(msg) = incoming.next().await {
        let Some(state) = state.upgrade() else { return };
        let msg = match msg {
            Ok(msg) => msg,
            Err(e) => {
                state.borrow().ui.error.set(Some(e.to_string()));
                return;
            }
        };
        match msg {
            ServerMsg::Welcome { ice_servers, .. } => {
                let mut s = state.borrow_mut();
                s.ice_servers = ice_servers;
                if let Some(sig) = &s.signaling {
                    sig.send(ClientMsg::CreateShare);
                }
            }
            ServerMsg::ShareCreated { share } => {
                let s = state.borrow();
                match window().and_then(|w| Ok(w.location().origin()?)) {
                    Ok(origin) => {
                        s.ui.link
                            .set(Some(format!("{origin}/s/{share}#{}", s.secret)))
                    }
                    Err(e) => s.ui.error.set(Some(e.to_string())),
                }
            }
            ServerMsg::PeerJoined { peer, .. } => {
                if let Err(e) = connect_receiver(&state, peer).await {
                    state.borrow().ui.error.set(Some(e.to_string()));
                }
            }
            ServerMsg::Signal { from, payload } => {
                let link = state.borrow().receivers.get(&from).map(|r| r.link.clone());
                let Some(link) = link else { continue };
                match serde_json::from_str::<SignalPayload>(&payload) {
                    Ok(payload) => {
                        if let Err(e) = link.apply(payload).await {
                            leptos::logging::warn!("signal from {from}: {e}");
                        }
                    }
                    Err(e) => leptos::logging::warn!("unreadable signal from {from}: {e}"),
                }
            }
            ServerMsg::PeerLeft { peer } => {
                let mut s = state.borrow_mut();
                s.receivers.remove(&peer);
                s.update_peer_count();
            }
            ServerMsg::Error { code, message } => {
                leptos::logging::warn!("server error {code:?}: {message}");
            }
            ServerMsg::Joined { .. } | ServerMsg::Pong => {}
        }
    }
}

/// A receiver joined: open a connection and a channel to it and offer.
async fn connect_receiver(state: &Rc<RefCell<State>>, peer: PeerId) -> Result<(), ClientError> {
    let (link, link_events) = {
        let s = state.borrow();
        let signaling = s
            .signaling
            .clone()
            .ok_or_else(|| ClientError::Signaling("not connected".into()))?;
        RtcLink::new(peer, &s.ice_servers, signaling)?
    };
    let flow = FlowControl::DEFAULT;
    let dc = link.create_channel("files");
    let (channel, events, backpressure) = Channel::new(dc, flow.low_water, flow.high_water);
    let link = Rc::new(link);
    state.borrow_mut().receivers.insert(
        peer,
        Receiver {
            link: link.clone(),
            channel,
            open: false,
        },
    );
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
                let mut s = state.borrow_mut();
                s.receivers.remove(&peer);
                s.update_peer_count();
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
                }
                s.update_peer_count();
                let _ = send_msg(backpressure.channel(), &s.manifest());
            }
            ChannelEvent::Text(text) => match serde_json::from_str::<PeerMsg>(&text) {
                Ok(PeerMsg::Request { file }) => {
                    let (shared, max_message) = {
                        let s = st.borrow();
                        let shared = s.files.iter().find(|f| f.meta.id == file).cloned();
                        let max = s
                            .receivers
                            .get(&peer)
                            .and_then(|r| r.link.max_message_size());
                        (shared, max)
                    };
                    drop(st);
                    let Some(shared) = shared else {
                        let msg = PeerMsg::FileError {
                            file,
                            message: "no longer shared".into(),
                        };
                        let _ = send_msg(backpressure.channel(), &msg);
                        continue;
                    };
                    let flow = FlowControl::DEFAULT.fitted_to(max_message);
                    match send_file(&mut backpressure, &shared, flow).await {
                        Ok(()) => {}
                        Err(ClientError::ChannelClosed) => return,
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
                let mut s = st.borrow_mut();
                s.receivers.remove(&peer);
                s.update_peer_count();
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
) -> Result<(), ClientError> {
    let size = shared.meta.size;
    let known = shared.sha256.borrow().clone();
    let mut hasher = known.is_none().then(Sha256::new);
    let mut frame_buf = Vec::with_capacity(frame::HEADER_LEN + flow.chunk_size);
    let mut offset = 0u64;
    while offset < size {
        let end = (offset + flow.read_block as u64).min(size);
        let block = read_range(&shared.file, offset, end).await?;
        if let Some(h) = hasher.as_mut() {
            h.update(&block);
        }
        for (rel, len) in frame::chunks(block.len() as u64, flow.chunk_size) {
            let start = rel as usize;
            frame_buf.clear();
            frame_buf.extend_from_slice(&frame::header(shared.meta.id, offset + rel));
            frame_buf.extend_from_slice(&block[start..start + len]);
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
    send_msg(
        out.channel(),
        &PeerMsg::FileEnd {
            file: shared.meta.id,
            size,
            sha256,
        },
    )
}

async fn read_range(file: &web_sys::File, start: u64, end: u64) -> Result<Vec<u8>, ClientError> {
    let blob = file.slice_with_f64_and_f64(start as f64, end as f64)?;
    let buf = JsFuture::from(blob.array_buffer())
        .await
        .map_err(|e| ClientError::Js(format!("cannot read file: {}", js_message(&e))))?;
    Ok(js_sys::Uint8Array::new(&buf).to_vec())
}
