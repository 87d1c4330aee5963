//! The receiver's session: join the share, prove the link's secret to the sender (a sealed
//! `hello`), answer its offer, show the live file list, and for each requested file ask for the
//! byte ranges still missing and hand every frame to the storage sink, which checks each block.
//!
//! Downloads are keyed by their resume key (share, path, name, size, modification time), not by
//! the sender's file id, so they survive everything between the two pages:
//! - the connection breaks (ICE fails, the sender's tab sleeps, the network changes): the page
//!   says "paused — reconnecting", tries an ICE restart while the connection object lives, then
//!   says hello again (a new connection) with a bounded backoff, and asks only for what is missing;
//! - this page reloads: partial files are in OPFS with a record of their verified blocks, and a
//!   download found there resumes by itself once the sender's list shows the file;
//! - the sender's page reloads: it takes its share back, the page here joins it again, and
//!   resumes when the same file (path, name, size, time) is offered again; if its bytes turn out
//!   to differ, the file's root hash says so and it is fetched whole.
//!
//! Once connected the receiver needs the server only to reconnect: the signaling socket keeps
//! reopening in the background.

use super::channel::{send_msg, Channel, ChannelEvent};
use super::rtc::{open_payload, LinkEvent, Outbox, RtcLink};
use super::save::{pick_directory, pick_file, save_to_file, save_to_folder, save_zip};
use super::signaling::{self, Event, Signaling};
use super::sink::{has_record, SinkHandle};
use super::writable::Place;
use super::{now_ms, window, ClientError};
use crate::pairing::{Endpoint, Offer, Setup};
use crate::protocol::{ClientMsg, ErrorCode, IceServer, PeerId, ServerMsg, ShareId, SignalPayload};
use crate::reconnect::Backoff;
use crate::seal::{SealError, ShareKey};
use crate::transfer::downloads::{Downloads, Refusal, Step};
use crate::transfer::paths::{safe_name, safe_path};
use crate::transfer::progress::Meter;
use crate::transfer::record::resume_key;
use crate::transfer::sink::{SinkCmd, SinkEvent};
use crate::transfer::{FileMeta, FlowControl, PeerMsg};
use crate::view::{capitalized, FileRow, FileStatus, PauseWhy, Phase, ReceiverUi};
use futures::channel::mpsc::UnboundedReceiver;
use futures::{Stream, StreamExt};
use leptos::prelude::*;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::{Rc, Weak};
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::{spawn_local, JsFuture};
use web_sys::{FileSystemDirectoryHandle, RtcPeerConnectionState};

/// Progress is pushed to the page at most this often (ms) while bytes stream in. Twice a second: measured
/// with `scripts/bench-transfer` at 1 GiB, redrawing progress ten times a second cost the two
/// browsers ~20 CPU-ms per MB more than the raw page (0.80× its speed), once a second ~1.0×.
const PROGRESS_EVERY_MS: f64 = 500.0;

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
/// How many of those a connection whose ICE is still checking gets before joining again (ICE
/// gives up on its own well within that).
const STALLED_JOIN_ROUNDS: u32 = 6;

/// After a broken connection: attempts to reach the sender again, 500 ms doubling to 5 s,
/// jittered, for about three minutes (a sender's page reloading, a laptop waking up).
const RECONNECT: Backoff = Backoff {
    initial_ms: 500,
    max_ms: 5_000,
    max_attempts: 40,
};

/// A hello waits this long (ms) for its connection before another replaces it.
const HELLO_PATIENCE_MS: f64 = 8_000.0;

/// A connection `disconnected` this long (ms) gets an ICE restart.
const DISCONNECTED_GRACE_MS: u32 = 3_000;

/// Requests outstanding and not one frame for this long (ms): the path is dead even if the
/// connection's state says otherwise. Seen when the receiver's network changed under it: its
/// ICE agent kept a pair alive through the relay while the sender's still sent to the old
/// address, so the state stayed `connected` for over a minute with nothing arriving. First an
/// ICE restart; if frames do not come back within [`RESTART_PATIENCE_MS`], a new connection
/// (and the download resumes where it stopped).
const DATA_STALL_MS: f64 = 6_000.0;

/// How long (ms) an ICE restart for a stall gets to bring frames back before the connection is
/// replaced. Long enough for a signaling socket that broke with the path to come back and the
/// sender to hear where we are (`moved`).
const RESTART_PATIENCE_MS: f64 = 12_000.0;

/// The page's part of a download (the decisions about it are in [`Downloads`]).
struct View {
    row: FileRow,
    /// Where the person chose to put it, if they did: it is written straight there.
    place: Option<Place>,
    meter: Meter,
    last_progress: f64,
}

type Download = crate::transfer::downloads::Download<View>;

/// Where "Download all" puts a share that has folders.
enum Target {
    /// Into the folder the person chose, keeping the sender's tree.
    Folder(FileSystemDirectoryHandle),
    /// As one ZIP of that name (no folder picker in this browser).
    Zip(String),
}

/// The files of one "Download all" with folders, until every one is saved.
struct Batch {
    target: Target,
    pending: HashSet<String>,
    /// Finished, waiting to go into the ZIP.
    done: Vec<(String, FileRow)>,
}

enum SinkState {
    None,
    Starting,
    Ready(Rc<SinkHandle>),
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
    sink: SinkState,
    /// The peer id the sender knows this page by, while the signaling socket came back under
    /// another one with the connection still alive: told to the sender (`moved`) once joined.
    moved_from: Option<PeerId>,
    /// The sink every channel's binary listener hands frames to, once it exists.
    frames_to: Rc<RefCell<Option<Rc<SinkHandle>>>>,
    /// When the last frame arrived, or a request was sent with none outstanding (ms, `now_ms`).
    last_frame_at: Rc<Cell<f64>>,
    /// By resume key, with what each needs next.
    downloads: Downloads<View>,
    /// Whether the share was joined once (so a later "no such share" may be a sender on its way
    /// back), and how many more joins such a refusal is worth.
    joined_before: bool,
    rejoins_left: u32,
    /// A delayed join is scheduled.
    rejoin_pending: bool,
    /// Bumped on every join answer, so only the latest stall check acts.
    join_generation: u32,
    /// Hellos sent by this page, and when the last one was.
    hello_attempt: u32,
    hello_at: f64,
    /// Reconnect attempts since the connection broke; bumped per pause so old loops stop.
    reconnect_attempt: u32,
    pause_generation: u32,
    /// The first manifest has been checked for downloads to resume.
    resume_checked: bool,
    /// The server said the sender's socket closed (its tab closed or reloaded).
    sender_left: bool,
    /// Paired by hand (`/pair`): no server to find the sender again through.
    paired: bool,
    batch: Option<Batch>,
}

impl State {
    fn new(ui: ReceiverUi, share: ShareId, key: ShareKey) -> Rc<RefCell<State>> {
        Rc::new(RefCell::new(State {
            ui,
            share,
            key,
            me: None,
            signaling: None,
            ice_servers: Vec::new(),
            sender: None,
            link: None,
            channel: None,
            sink: SinkState::None,
            frames_to: Rc::default(),
            moved_from: None,
            last_frame_at: Rc::default(),
            downloads: Downloads::default(),
            joined_before: false,
            rejoins_left: REJOIN_TRIES,
            rejoin_pending: false,
            join_generation: 0,
            hello_attempt: 0,
            hello_at: f64::NEG_INFINITY,
            reconnect_attempt: 0,
            pause_generation: 0,
            resume_checked: false,
            sender_left: false,
            paired: false,
            batch: None,
        }))
    }

    /// Joins the share (again) on the current connection, unless connected to the sender.
    fn join(&self) {
        if self.channel.is_none() {
            self.send_join();
        }
    }

    fn send_join(&self) {
        if let Some(signaling) = &self.signaling {
            signaling.send(ClientMsg::Join {
                share: self.share.clone(),
            });
        }
    }

    /// Asks the sender (sealed, so only a holder of the link's secret can) to connect to us.
    fn hello(&mut self) {
        let (Some(signaling), Some(me), Some(sender)) =
            (self.signaling.clone(), self.me, self.sender)
        else {
            return;
        };
        self.hello_attempt += 1;
        self.hello_at = now_ms();
        let outbox = Outbox {
            signaling,
            key: self.key.clone(),
            me,
            remote: sender,
        };
        outbox.send(&SignalPayload::Hello {
            attempt: self.hello_attempt,
        });
    }

    /// Not connected to the sender yet, and not given up on it either.
    fn still_joining(&self) -> bool {
        self.channel.is_none() && self.ui.phase.get_untracked().needs_server()
    }

    /// Forgets a connection attempt to a sender that can no longer be signaled.
    fn forget_attempt(&mut self) {
        self.link = None;
        self.sender = None;
    }

    fn sink(&self) -> Option<Rc<SinkHandle>> {
        match &self.sink {
            SinkState::Ready(sink) => Some(sink.clone()),
            _ => None,
        }
    }

    /// The channel to the sender is gone (or replaced): requests in flight are dead, and the
    /// sink drops their frames.
    fn drop_channel(&mut self) {
        self.channel = None;
        let steps = self.downloads.disconnected();
        self.run(steps);
    }

    /// Carries out what the downloads need next.
    fn run(&mut self, steps: Vec<Step>) {
        let Some(sink) = self.sink() else { return };
        for step in steps {
            match step {
                Step::Open { key } => {
                    let Some(d) = self.downloads.get(&key) else {
                        continue;
                    };
                    let open = SinkCmd::Open {
                        share: self.share.to_string(),
                        key,
                        name: d.meta.name.clone(),
                        size: d.meta.size,
                    };
                    match &d.view.place {
                        Some(place) => sink.open_in(open, place),
                        None => sink.command(open),
                    }
                }
                Step::Request {
                    key,
                    transfer,
                    file,
                    ranges,
                    first,
                } => {
                    let Some(channel) = &self.channel else {
                        continue;
                    };
                    sink.command(SinkCmd::Begin { key, transfer });
                    let request = PeerMsg::Request {
                        transfer,
                        file,
                        ranges,
                    };
                    // Not sent: the channel is closing, and its close pauses the download.
                    if let Err(e) = send_msg(&channel.dc, &request) {
                        leptos::logging::warn!("request not sent: {e}");
                    }
                    if first {
                        // Nothing was due until now: the stall clock starts with this request.
                        self.last_frame_at.set(now_ms());
                    }
                }
                Step::Forget { transfer } => sink.command(SinkCmd::Forget { transfer }),
            }
        }
    }

    /// Takes a download off the list (done, failed or stopped); the next waiting one opens.
    fn finish_download(&mut self, key: &str) -> Option<Download> {
        let (d, next) = self.downloads.finish(key)?;
        self.run(next);
        Some(d)
    }

    fn progress(&mut self, key: &str) {
        if let Some(d) = self.downloads.get_mut(key) {
            let verified = d.verified;
            let v = &mut d.view;
            v.row.progress.set(v.meter.update(now_ms(), verified));
        }
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
        let state = State::new(ui, share, key);
        spawn_local(run_signaling(Rc::downgrade(&state), signaling::connect()));
        Self { state: Some(state) }
    }

    /// Paired without the server: answers the offer in `code` and puts the answer's code in
    /// `answer` for the person to hand back.
    /// From then on it is a session like a linked one, except that a broken connection cannot
    /// be mended (there is no server to find the sender through): pairing again resumes.
    pub fn paired(ui: ReceiverUi, code: &str, answer: RwSignal<Option<String>>) -> Self {
        let opened = Offer::from_code(code)
            .map_err(ClientError::from)
            .and_then(|offer| {
                let key = ShareKey::for_pairing(&offer.secret)?;
                Ok((offer, key))
            });
        let (offer, key) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                ui.phase.set(Phase::Failed("bad code".into()));
                ui.error.set(Some(capitalized(&e.to_string())));
                return Self { state: None };
            }
        };
        ui.phase.set(Phase::ConnectingPeer);
        let state = State::new(ui, offer.share(), key);
        state.borrow_mut().paired = true;
        let weak = Rc::downgrade(&state);
        spawn_local(async move {
            let answered = answer_pairing(&weak, &offer, answer).await;
            if let (Err(e), Some(state)) = (answered, weak.upgrade()) {
                let s = state.borrow();
                s.ui.phase.set(Phase::Failed("pairing failed".into()));
                s.ui.error.set(Some(capitalized(&e.to_string())));
            }
        });
        Self { state: Some(state) }
    }

    /// Starts (or resumes) downloading one file of the list.
    pub fn request(&self, file: crate::transfer::FileId) {
        let Some(state) = &self.state else { return };
        if let Some(row) = listed(state, file) {
            start_download(state, row, None);
        }
    }

    /// "Save as…": the browser's save dialog (where it has one; call this from the click),
    /// then the file is written straight into the file chosen there.
    pub fn save_as(&self, file: crate::transfer::FileId) {
        let Some(state) = &self.state else { return };
        let Some(row) = listed(state, file) else {
            return;
        };
        match pick_file(&safe_name(&row.meta.name)) {
            Some(picked) => when_picked(state, picked, move |state, handle| {
                start_download(state, row, Some(Place::File(handle)));
            }),
            None => start_download(state, row, None),
        }
    }

    /// "Download all": every file not downloaded yet. A share with folders goes into a folder
    /// the person picks (where the browser has a folder picker; it must be asked during the
    /// click, so call this from one) or else into one ZIP; loose files download one by one.
    pub fn download_all(&self) {
        let Some(state) = &self.state else { return };
        let rows: Vec<FileRow> = state.borrow().ui.files.with_untracked(|rows| {
            rows.iter()
                .filter(|r| {
                    matches!(
                        r.status.get_untracked(),
                        FileStatus::Ready | FileStatus::Failed(_)
                    )
                })
                .cloned()
                .collect()
        });
        let folders = rows
            .iter()
            .any(|r| safe_path(&r.meta.path, &r.meta.name).len() > 1);
        if !folders {
            for row in rows {
                start_download(state, row, None);
            }
            return;
        }
        match pick_directory() {
            Some(picked) => when_picked(state, picked, move |state, dir| {
                start_batch(state, Target::Folder(dir), rows);
            }),
            None => start_batch(state, Target::Zip(zip_name(&rows)), rows),
        }
    }

    /// Stops downloading a file. What arrived stays on disk: downloading it later resumes.
    pub fn cancel(&self, file: crate::transfer::FileId) {
        let Some(state) = &self.state else { return };
        let mut s = state.borrow_mut();
        let share = s.share.to_string();
        let Some(key) = s.ui.files.with_untracked(|rows| {
            rows.iter()
                .find(|r| r.id() == file)
                .map(|r| resume_key(&share, &r.meta))
        }) else {
            return;
        };
        let Some(d) = s.finish_download(&key) else {
            return;
        };
        let sink = s.sink();
        for transfer in d.outstanding() {
            if let Some(channel) = &s.channel {
                let _ = send_msg(&channel.dc, &PeerMsg::Cancel { transfer });
            }
            if let Some(sink) = &sink {
                sink.command(SinkCmd::Forget { transfer });
            }
        }
        if let Some(sink) = &sink {
            sink.command(SinkCmd::Close { key });
        }
        d.view.row.status.set(FileStatus::Ready);
    }

    /// After giving up on the sender: try again (downloads carry on where they stopped).
    pub fn retry(&self) {
        let Some(state) = &self.state else { return };
        let mut s = state.borrow_mut();
        s.ui.error.set(None);
        s.rejoins_left = REJOIN_TRIES;
        pause(&mut s, state);
    }
}

/// The row of file `file` in the list, if it is listed.
fn listed(state: &Rc<RefCell<State>>, file: crate::transfer::FileId) -> Option<FileRow> {
    state
        .borrow()
        .ui
        .files
        .with_untracked(|rows| rows.iter().find(|r| r.id() == file).cloned())
}

/// Waits for a picker's answer (`picked`) and hands the chosen handle to `then`, unless the
/// person cancelled or the page has moved on.
fn when_picked<H: JsCast + 'static>(
    state: &Rc<RefCell<State>>,
    picked: js_sys::Promise,
    then: impl FnOnce(&Rc<RefCell<State>>, H) + 'static,
) {
    let weak = Rc::downgrade(state);
    spawn_local(async move {
        let Ok(handle) = JsFuture::from(picked).await else {
            return;
        };
        let (Some(state), Ok(handle)) = (weak.upgrade(), handle.dyn_into::<H>()) else {
            return;
        };
        then(&state, handle);
    });
}

/// The ZIP's name: the share's one top folder, if it has one.
fn zip_name(rows: &[FileRow]) -> String {
    let tops: HashSet<String> = rows
        .iter()
        .map(|r| safe_path(&r.meta.path, &r.meta.name))
        .filter(|p| p.len() > 1)
        .map(|p| p[0].clone())
        .collect();
    match (tops.len(), tops.into_iter().next()) {
        (1, Some(top)) => format!("{top}.zip"),
        _ => "beamdrop.zip".into(),
    }
}

fn start_batch(state: &Rc<RefCell<State>>, target: Target, rows: Vec<FileRow>) {
    {
        let mut s = state.borrow_mut();
        let share = s.share.to_string();
        let keys = rows.iter().map(|r| resume_key(&share, &r.meta));
        match &mut s.batch {
            Some(batch) => batch.pending.extend(keys),
            None => {
                s.batch = Some(Batch {
                    target,
                    pending: keys.collect(),
                    done: Vec::new(),
                })
            }
        }
    }
    for row in rows {
        start_download(state, row, None);
    }
}

/// A file of a batch is finished (`Some`) or failed (`None`): save it into the folder, or keep it
/// for the ZIP, which is made and saved once the batch's last file is in.
async fn batch_done(
    state: &Rc<RefCell<State>>,
    sink: Rc<SinkHandle>,
    key: String,
    row: Option<FileRow>,
    in_place: bool,
) {
    let share = state.borrow().share.to_string();
    let (folder, zip) = {
        let mut s = state.borrow_mut();
        let Some(batch) = s.batch.as_mut() else {
            return;
        };
        batch.pending.remove(&key);
        let folder = match &batch.target {
            Target::Folder(dir) => Some(dir.clone()),
            Target::Zip(_) => None,
        };
        if folder.is_none() {
            if let Some(row) = &row {
                batch.done.push((key.clone(), row.clone()));
            }
        }
        let zip = match (&batch.target, batch.pending.is_empty()) {
            (Target::Zip(name), true) => Some((name.clone(), std::mem::take(&mut batch.done))),
            _ => None,
        };
        if batch.pending.is_empty() {
            s.batch = None;
        }
        (folder, zip)
    };
    if let (true, Some(row)) = (in_place, &row) {
        row.status.set(FileStatus::Verified);
    } else if let (Some(dir), Some(row)) = (folder, row) {
        // Not written in place (part of it was in OPFS already): copied into the folder now.
        let saved = match sink.file(&share, &key).await {
            Ok(blob) => {
                save_to_folder(&dir, &safe_path(&row.meta.path, &row.meta.name), &blob).await
            }
            Err(e) => Err(e),
        };
        row.status.set(match saved {
            Ok(()) => FileStatus::Verified,
            Err(e) => FileStatus::Failed(format!("could not save: {e}")),
        });
        sink.release(&share, &key).await;
    }
    if let Some((name, done)) = zip {
        let mut files = Vec::new();
        for (key, row) in &done {
            match sink.file(&share, key).await {
                Ok(blob) => files.push((row.meta.clone(), blob)),
                Err(e) => row
                    .status
                    .set(FileStatus::Failed(format!("could not save: {e}"))),
            }
        }
        let saved = save_zip(&name, &files).await;
        for (key, row) in &done {
            if row.status.get_untracked() == FileStatus::Verifying {
                row.status.set(match &saved {
                    Ok(()) => FileStatus::Verified,
                    Err(e) => FileStatus::Failed(format!("could not save the ZIP: {e}")),
                });
            }
            sink.release(&share, key).await;
        }
    }
}

/// Adds a download for `row` (unless it is running) and opens it in the sink.
fn start_download(state: &Rc<RefCell<State>>, row: FileRow, place: Option<Place>) {
    let mut s = state.borrow_mut();
    let key = resume_key(s.share.as_str(), &row.meta);
    // A file of a "Download all" into a folder goes to its place in the tree, also when it is
    // started again on its own (after a stop or a failure).
    let place = place.or_else(|| match &s.batch {
        Some(Batch {
            target: Target::Folder(dir),
            pending,
            ..
        }) if pending.contains(&key) => Some(Place::InFolder(
            dir.clone(),
            safe_path(&row.meta.path, &row.meta.name),
        )),
        _ => None,
    });
    if s.downloads.contains(&key) {
        return;
    }
    if let Some(limit) = s.sink().and_then(|sink| sink.memory_limit()) {
        if row.meta.size > limit {
            row.status.set(FileStatus::Failed(format!(
                "too large to receive here: this browser gives no disk storage to the page, and \
                 files over {} MiB are refused in memory",
                limit >> 20
            )));
            return;
        }
    }
    // "Resuming at N %" once the sink has said how much is already there.
    row.status.set(FileStatus::Requested);
    let mut meter = Meter::new(row.meta.size);
    row.progress.set(meter.update(now_ms(), 0));
    let meta = row.meta.clone();
    let view = View {
        row,
        place,
        meter,
        last_progress: 0.0,
    };
    let steps = s.downloads.add(key, meta, view);
    s.run(steps);
    match s.sink {
        SinkState::Ready(_) | SinkState::Starting => {}
        SinkState::None => {
            s.sink = SinkState::Starting;
            let weak = Rc::downgrade(state);
            spawn_local(async move {
                let (sink, events) = SinkHandle::start().await;
                let Some(state) = weak.upgrade() else { return };
                let sink = Rc::new(sink);
                {
                    let mut s = state.borrow_mut();
                    *s.frames_to.borrow_mut() = Some(sink.clone());
                    s.sink = SinkState::Ready(sink.clone());
                    if let Some(limit) = sink.memory_limit() {
                        let too_big: Vec<String> = s
                            .downloads
                            .iter()
                            .filter(|(_, d)| d.meta.size > limit)
                            .map(|(k, _)| k.clone())
                            .collect();
                        for key in too_big {
                            if let Some(d) = s.finish_download(&key) {
                                d.view.row.status.set(FileStatus::Failed(format!(
                                    "too large to receive here: no disk storage for the page, \
                                     and files over {} MiB are refused in memory",
                                    limit >> 20
                                )));
                            }
                        }
                    }
                    let steps = s.downloads.sink_ready();
                    s.run(steps);
                }
                run_sink(Rc::downgrade(&state), events).await;
            });
        }
    }
}

impl Drop for ReceiverSession {
    fn drop(&mut self) {
        let Some(state) = &self.state else { return };
        if let Ok(mut s) = state.try_borrow_mut() {
            s.channel = None;
            s.link = None;
            s.signaling = None;
            if let Some(sink) = s.sink() {
                for (key, _) in s.downloads.iter() {
                    sink.command(SinkCmd::Close { key: key.clone() });
                }
            }
            *s.frames_to.borrow_mut() = None;
            s.sink = SinkState::None;
        }
    }
}

/// What the storage sink reports.
async fn run_sink(state: Weak<RefCell<State>>, mut events: UnboundedReceiver<SinkEvent>) {
    while let Some(event) = events.next().await {
        let Some(state) = state.upgrade() else { return };
        let saving = on_sink_event(&mut state.borrow_mut(), event);
        if let Some(saving) = saving {
            saving.run(&state).await;
        }
    }
}

/// A finished (or, in a batch, failed) file to hand to the person, after the page's state is
/// released: saving waits on the browser.
struct Saving {
    sink: Rc<SinkHandle>,
    share: String,
    key: String,
    /// `None`: the file failed (a batch still needs to hear of it).
    row: Option<FileRow>,
    batched: bool,
    /// Already written where the person chose: nothing left to save.
    in_place: bool,
    /// Where the person chose to put it, if they did.
    place: Option<Place>,
}

impl Saving {
    async fn run(self, state: &Rc<RefCell<State>>) {
        if self.batched {
            return batch_done(state, self.sink, self.key, self.row, self.in_place).await;
        }
        let Some(row) = self.row else { return };
        if self.in_place {
            return row.status.set(FileStatus::Verified);
        }
        let saved = match &self.place {
            // Resumed from OPFS (an earlier attempt left part of it there): copied over now.
            Some(Place::File(handle)) => {
                let saved = match self.sink.file(&self.share, &self.key).await {
                    Ok(blob) => save_to_file(handle, &blob).await,
                    Err(e) => Err(e),
                };
                self.sink.release(&self.share, &self.key).await;
                saved
            }
            _ => {
                let name = safe_name(&row.meta.name);
                self.sink.save(&self.share, &self.key, &name).await
            }
        };
        let status = match saved {
            Ok(()) => FileStatus::Verified,
            Err(e) => FileStatus::Failed(format!("could not save: {e}")),
        };
        row.status.set(status);
    }
}

fn on_sink_event(s: &mut State, event: SinkEvent) -> Option<Saving> {
    match event {
        SinkEvent::Opened {
            key,
            verified,
            missing,
        } => {
            let resuming = verified > 0 && !missing.is_empty();
            let steps = s.downloads.opened(&key, verified, missing);
            let d = s.downloads.get(&key)?;
            if resuming {
                let percent = (verified * 100 / d.meta.size.max(1)) as u32;
                d.view.row.status.set(FileStatus::Resuming(percent));
            }
            s.progress(&key);
            s.run(steps);
        }
        SinkEvent::Stored {
            transfer,
            key,
            stored,
            verified,
        } => {
            // A block of a request still running (not one the page gave up on in a pause).
            let live = s.downloads.is_live(transfer);
            if let (true, Some(channel)) = (live, &s.channel) {
                let _ = send_msg(&channel.dc, &PeerMsg::Ack { transfer, stored });
            }
            let d = s.downloads.get_mut(&key)?;
            d.verified = verified;
            let size = d.meta.size;
            let v = &mut d.view;
            if live && !matches!(v.row.status.get_untracked(), FileStatus::Receiving) {
                v.row.status.set(FileStatus::Receiving);
            }
            let now = now_ms();
            if now - v.last_progress >= PROGRESS_EVERY_MS || verified == size {
                v.last_progress = now;
                v.row.progress.set(v.meter.update(now, verified));
            }
        }
        SinkEvent::Bad { key, range, .. } => {
            leptos::logging::warn!("a block of {key} did not match its hash; asking again");
            let steps = s.downloads.bad_block(&key, range);
            s.run(steps);
        }
        // A request is over once the sink has taken its last frame (the page hears the sender's
        // `end` sooner than the worker gets through the frames before it): only then does a block
        // still missing need asking for again.
        SinkEvent::Incomplete {
            key,
            transfer,
            missing,
        } => {
            let steps = s.downloads.incomplete(&key, transfer, missing);
            s.run(steps);
        }
        SinkEvent::Changed { key, transfer } => {
            if let Some(d) = s.downloads.get(&key) {
                leptos::logging::warn!(
                    "{}: the sender's file changed; fetching it whole",
                    d.meta.name
                );
            }
            let steps = s.downloads.changed(&key, transfer);
            s.progress(&key);
            s.run(steps);
        }
        SinkEvent::Finished { key, in_place, .. } => {
            let d = s.finish_download(&key)?;
            d.view.row.status.set(FileStatus::Verifying);
            d.view
                .row
                .progress
                .set(Meter::new(d.meta.size).update(now_ms(), d.meta.size));
            let sink = s.sink()?;
            let batched = s.batch.as_ref().is_some_and(|b| b.pending.contains(&key));
            return Some(Saving {
                sink,
                share: s.share.to_string(),
                key,
                row: Some(d.view.row),
                batched,
                in_place,
                place: d.view.place,
            });
        }
        SinkEvent::Failed { key, message } => {
            if let Some(d) = s.finish_download(&key) {
                d.view.row.status.set(FileStatus::Failed(message));
            }
            // Its files are released, not deleted: what was verified stays on disk, and trying
            // again (after freeing space, or closing the other tab) resumes from there.
            let sink = s.sink()?;
            sink.command(SinkCmd::Close { key: key.clone() });
            if s.batch.as_ref().is_some_and(|b| b.pending.contains(&key)) {
                return Some(Saving {
                    sink,
                    share: s.share.to_string(),
                    key,
                    row: None,
                    batched: true,
                    in_place: false,
                    place: None,
                });
            }
        }
    }
    None
}

async fn run_signaling(state: Weak<RefCell<State>>, mut events: impl Stream<Item = Event> + Unpin) {
    while let Some(event) = events.next().await {
        let Some(state) = state.upgrade() else { return };
        match event {
            Event::Connected(signaling) => state.borrow_mut().signaling = Some(signaling),
            Event::Lost { why, retrying } => {
                let mut s = state.borrow_mut();
                if s.channel.is_some() && s.moved_from.is_none() {
                    // The connection may outlive the socket (a phone changing networks breaks
                    // both; ICE can be restarted once the sender knows where we are now).
                    s.moved_from = s.me;
                }
                s.signaling = None;
                s.me = None;
                if s.channel.is_some() || !s.ui.phase.get_untracked().needs_server() {
                    // An open data channel keeps working without the server; a page that has
                    // already failed (sender gone, bad link) keeps saying why.
                    continue;
                }
                s.forget_attempt();
                if !retrying {
                    s.ui.phase.set(Phase::ServerLost(why));
                } else if !s.ui.phase.get_untracked().is_paused() {
                    s.ui.phase.set(Phase::Reconnecting);
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
            if let Some(link) = &s.link {
                link.set_ice_servers(&ice_servers);
            }
            s.ice_servers = ice_servers;
        }
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
                if !s.ui.phase.get_untracked().is_paused() {
                    s.ui.phase.set(Phase::WaitingForSender);
                }
            } else if s.moved_from.is_some() {
                // Connected still, under a new peer id: joining lets us signal the sender again.
                s.send_join();
            }
        }
        ServerMsg::Joined { sender, .. } => {
            let mut s = state.borrow_mut();
            if s.channel.is_some() {
                // Rejoined after the socket moved: tell the sender where this connection is now
                // (it restarts ICE on it), and signal it from here on.
                let old = s.moved_from.take();
                if let (Some(old), Some(signaling), Some(me), Some(link)) =
                    (old, s.signaling.clone(), s.me, s.link.clone())
                {
                    if s.sender == Some(sender) && old != me {
                        link.readdress(signaling.clone(), me, sender);
                        let outbox = Outbox {
                            signaling,
                            key: s.key.clone(),
                            me,
                            remote: sender,
                        };
                        outbox.send(&SignalPayload::Moved { from: old });
                    }
                }
                return;
            }
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
            s.sender_left = false;
            s.joined_before = true;
            // Still joining, so the only message up can be the one the page opened with: the
            // share was not available.
            s.ui.error.set(None);
            s.join_generation = s.join_generation.wrapping_add(1);
            if !s.ui.phase.get_untracked().is_paused() {
                s.ui.phase.set(Phase::ConnectingPeer);
            }
            s.hello();
            let (generation, weak) = (s.join_generation, Rc::downgrade(state));
            spawn_local(async move {
                // While ICE is still checking candidate pairs it ends by itself, in a channel or
                // in a failure the page explains; joining again would restart it and the page
                // would spin forever where no path exists. So only an attempt that went nowhere
                // (no offer came, or ICE never started) is retried, and one still checking after
                // the last round is retried too, in case its connection is wedged.
                for round in 1..=STALLED_JOIN_ROUNDS {
                    gloo_timers::future::TimeoutFuture::new(STALLED_JOIN_MS).await;
                    let Some(state) = weak.upgrade() else { return };
                    let s = state.borrow();
                    let waiting = s.join_generation == generation
                        && s.channel.is_none()
                        && s.ui.phase.get_untracked() == Phase::ConnectingPeer;
                    if !waiting {
                        return;
                    }
                    let checking = s
                        .link
                        .as_ref()
                        .is_some_and(|link| link.state() == RtcPeerConnectionState::Connecting);
                    if !checking || round == STALLED_JOIN_ROUNDS {
                        s.join();
                        return;
                    }
                }
            });
        }
        ServerMsg::Signal { from, payload } => {
            let (key, me) = {
                let s = state.borrow();
                if s.sender != Some(from) {
                    return;
                }
                (s.key.clone(), s.me)
            };
            let Some(me) = me else { return };
            let opened = match open_payload(&key, from, me, &payload) {
                Ok(SignalPayload::Rejected) => {
                    // Our key is right (we could open this), so something between the pages
                    // altered what we sent.
                    let mut s = state.borrow_mut();
                    s.link = None;
                    s.drop_channel();
                    s.ui.phase.set(Phase::Failed("bad link".into()));
                    s.ui.error
                        .set(Some(capitalized(&SealError::Rejected.to_string())));
                    return;
                }
                Ok(payload) => payload,
                Err(ClientError::Seal(_)) => {
                    // Altered in transit or sealed with another key: refuse the connection.
                    let mut s = state.borrow_mut();
                    s.link = None;
                    s.sender = None;
                    s.drop_channel();
                    s.ui.phase.set(Phase::Failed("bad link".into()));
                    s.ui.error
                        .set(Some(capitalized(&SealError::BadSecret.to_string())));
                    return;
                }
                Err(e) => {
                    leptos::logging::warn!("unreadable signal from the sender: {e}");
                    return;
                }
            };
            if matches!(opened, SignalPayload::Offer { .. }) && state.borrow().channel.is_none() {
                // A fresh offer (the sender answering a hello) replaces any earlier attempt.
                let stale = state
                    .borrow()
                    .link
                    .as_ref()
                    .is_some_and(|l| l.has_remote_description());
                if stale {
                    state.borrow_mut().link = None;
                }
            }
            let link = match ensure_link(state, from) {
                Ok(link) => link,
                Err(e) => {
                    state.borrow().ui.phase.set(Phase::Failed(e.to_string()));
                    return;
                }
            };
            if let Err(e) = link.apply(opened).await {
                leptos::logging::warn!("signal from the sender not applied: {e}");
            }
        }
        ServerMsg::PeerLeft { peer } => {
            let mut s = state.borrow_mut();
            if s.sender == Some(peer) {
                // Its socket closed: its page was closed or reloaded (a node going down does not
                // say this; its peers' direct connections carry on). The direct connection dies
                // with the page, often without a word on the channel: pause now, and find the
                // sender again through the share if it comes back.
                s.sender = None;
                s.sender_left = true;
                if s.ui.phase.get_untracked().is_paused() {
                    s.ui.phase.set(Phase::Paused(PauseWhy::SenderLeft));
                } else if s.channel.is_some() || !s.downloads.is_empty() {
                    pause(&mut s, state);
                }
            }
        }
        ServerMsg::Error { code, message } => {
            let mut s = state.borrow_mut();
            let paused = s.ui.phase.get_untracked().is_paused();
            match code {
                // While paused the reconnect loop keeps joining, within its own bounds.
                ErrorCode::NoSuchShare if paused => {}
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
                // Our hello, answer or candidates went to a sender id that is gone. Either the
                // sender left (its `peer_left` follows) or its socket dropped and it comes back
                // under a new id: a join shortly tells which.
                ErrorCode::UnknownPeer if s.sender.is_some() && s.still_joining() => {
                    s.sender = None;
                    if !paused && !s.rejoin_pending {
                        s.rejoins_left = REJOIN_TRIES;
                        rejoin_later(&mut s, state);
                    }
                }
                // The join (or the hello after it) did not get through: the sender's inbox was
                // full, we were rate limited, or the backend failed. Ask again shortly, within
                // the same bounded budget; then say so, with a way to try again.
                ErrorCode::PeerBusy | ErrorCode::RateLimited | ErrorCode::Internal
                    if !paused && s.still_joining() =>
                {
                    leptos::logging::warn!("server error {code:?} while joining: {message}");
                    if s.rejoins_left == 0 {
                        s.link = None;
                        s.ui.phase.set(Phase::ServerBusy);
                    } else if !s.rejoin_pending {
                        s.rejoins_left -= 1;
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

/// The connection to the sender broke: downloads pause (what they stored stays), and the page
/// works its way back to the sender on its own.
fn pause(s: &mut State, state: &Rc<RefCell<State>>) {
    s.drop_channel();
    s.link = None;
    for (_, d) in s.downloads.iter() {
        d.view.row.status.set(FileStatus::Paused);
    }
    if s.paired {
        s.ui.phase.set(Phase::Failed("the connection broke".into()));
        s.ui.error.set(Some(
            "The connection to the sender broke, and a pairing without the server cannot be \
             mended. Pair again (a new code from the sender) to go on."
                .into(),
        ));
        return;
    }
    s.ui.phase.set(Phase::Paused(if s.sender_left {
        PauseWhy::SenderLeft
    } else {
        PauseWhy::ConnectionLost
    }));
    s.reconnect_attempt = 0;
    s.pause_generation = s.pause_generation.wrapping_add(1);
    s.hello_at = f64::NEG_INFINITY;
    reconnect_step(s, state, s.pause_generation);
}

/// One reconnect attempt, then the next one after a backoff, until connected or out of tries.
fn reconnect_step(s: &mut State, state: &Rc<RefCell<State>>, generation: u32) {
    if s.pause_generation != generation || s.channel.is_some() {
        return;
    }
    if !s.ui.phase.get_untracked().is_paused() {
        return;
    }
    let Some(delay) = RECONNECT.delay_ms(s.reconnect_attempt, js_sys::Math::random()) else {
        s.ui.phase.set(Phase::SenderGone);
        s.ui.error.set(Some(
            "Could not reach the sender again. What arrived is kept: try again when the sender \
             is back."
                .into(),
        ));
        return;
    };
    s.reconnect_attempt += 1;
    let waiting_on_hello = now_ms() - s.hello_at < HELLO_PATIENCE_MS;
    if s.signaling.is_some() && !waiting_on_hello {
        if s.sender.is_some() {
            s.hello();
        } else {
            s.join();
        }
    }
    let weak = Rc::downgrade(state);
    spawn_local(async move {
        gloo_timers::future::TimeoutFuture::new(delay).await;
        if let Some(state) = weak.upgrade() {
            let mut s = state.borrow_mut();
            reconnect_step(&mut s, &state, generation);
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
        RtcLink::new(Some(outbox), true, &s.ice_servers)?
    };
    let link = Rc::new(link);
    state.borrow_mut().link = Some(link.clone());
    spawn_local(watch_link(
        Rc::downgrade(state),
        Rc::downgrade(&link),
        events,
    ));
    Ok(link)
}

/// The connection of a pairing without the server: answers `offer` and shows the answer's code.
async fn answer_pairing(
    state: &Weak<RefCell<State>>,
    offer: &Offer,
    answer: RwSignal<Option<String>>,
) -> Result<(), ClientError> {
    let (link, events) = RtcLink::new(None, true, &[])?;
    let link = Rc::new(link);
    {
        let Some(state) = state.upgrade() else {
            return Ok(());
        };
        state.borrow_mut().link = Some(link.clone());
    }
    spawn_local(watch_link(state.clone(), Rc::downgrade(&link), events));
    let sdp = link
        .answer_gathered(&offer.endpoint.to_sdp(Setup::ActPass))
        .await?;
    let code = offer.answer_code(&Endpoint::from_sdp(&sdp)?)?;
    answer.set(Some(code));
    Ok(())
}

async fn watch_link(
    state: Weak<RefCell<State>>,
    link: Weak<RtcLink>,
    mut events: UnboundedReceiver<LinkEvent>,
) {
    let mut restarted = false;
    while let Some(event) = events.next().await {
        let (Some(state), Some(link)) = (state.upgrade(), link.upgrade()) else {
            return;
        };
        let current = state
            .borrow()
            .link
            .as_ref()
            .is_some_and(|l| Rc::ptr_eq(l, &link));
        if !current {
            return;
        }
        match event {
            LinkEvent::Channel(dc) => {
                let flow = FlowControl::DEFAULT;
                let (frames_to, last_frame_at) = {
                    let s = state.borrow();
                    (s.frames_to.clone(), s.last_frame_at.clone())
                };
                let on_binary = move |buf: &js_sys::ArrayBuffer| {
                    last_frame_at.set(now_ms());
                    if let Some(sink) = frames_to.borrow().as_ref() {
                        sink.frame(buf);
                    }
                };
                let (channel, events, _) = Channel::new(
                    dc,
                    flow.low_water,
                    flow.high_water,
                    Some(Box::new(on_binary)),
                );
                {
                    let mut s = state.borrow_mut();
                    // Nothing is asked for on it until the sender's list arrives: a reloaded
                    // sender gives its files new ids.
                    s.drop_channel();
                    s.channel = Some(channel);
                    s.downloads.connected();
                }
                spawn_local(run_channel(Rc::downgrade(&state), events));
                spawn_local(watch_stall(Rc::downgrade(&state), Rc::downgrade(&link)));
            }
            LinkEvent::State(RtcPeerConnectionState::Connected) => {
                restarted = false;
                let path = state.borrow().ui.path;
                let link = Rc::downgrade(&link);
                spawn_local(async move {
                    if let Some(link) = link.upgrade() {
                        path.set(link.path().await);
                    }
                });
            }
            LinkEvent::State(RtcPeerConnectionState::Disconnected) => {
                // Often back by itself within seconds; if not, restart ICE on this connection.
                let weak_link = Rc::downgrade(&link);
                spawn_local(async move {
                    gloo_timers::future::TimeoutFuture::new(DISCONNECTED_GRACE_MS).await;
                    if let Some(link) = weak_link.upgrade() {
                        if link.state() == RtcPeerConnectionState::Disconnected {
                            if let Err(e) = link.restart_ice().await {
                                leptos::logging::warn!("ICE restart failed: {e}");
                            }
                        }
                    }
                });
            }
            LinkEvent::State(RtcPeerConnectionState::Failed) => {
                if !restarted && state.borrow().channel.is_some() {
                    restarted = true;
                    if link.restart_ice().await.is_ok() {
                        continue;
                    }
                }
                let mut s = state.borrow_mut();
                if s.channel.is_some() || !s.downloads.is_empty() {
                    pause(&mut s, &state);
                } else {
                    s.link = None;
                    let relay_offered = s.ice_servers.iter().any(IceServer::relays);
                    s.ui.phase.set(Phase::Unreachable { relay_offered });
                }
                return;
            }
            LinkEvent::State(RtcPeerConnectionState::Closed) => {
                let mut s = state.borrow_mut();
                pause(&mut s, &state);
                return;
            }
            LinkEvent::State(_) => {}
        }
    }
}

/// Restarts ICE, then replaces the connection, when requests are outstanding and no frame has
/// come for [`DATA_STALL_MS`] (see there). Ends with the connection.
async fn watch_stall(state: Weak<RefCell<State>>, link: Weak<RtcLink>) {
    let mut restarted_at: Option<f64> = None;
    loop {
        gloo_timers::future::TimeoutFuture::new(1_000).await;
        let (Some(state), Some(link)) = (state.upgrade(), link.upgrade()) else {
            return;
        };
        let quiet_ms = {
            let s = state.borrow();
            let current = s.link.as_ref().is_some_and(|l| Rc::ptr_eq(l, &link));
            if !current || s.channel.is_none() {
                return;
            }
            if !s.downloads.in_flight() {
                0.0
            } else {
                now_ms() - s.last_frame_at.get()
            }
        };
        if quiet_ms < DATA_STALL_MS {
            restarted_at = None;
            continue;
        }
        match restarted_at {
            None => {
                leptos::logging::warn!("no data for {quiet_ms:.0} ms: restarting ICE");
                restarted_at = Some(now_ms());
                if let Err(e) = link.restart_ice().await {
                    leptos::logging::warn!("ICE restart failed: {e}");
                }
            }
            Some(at) if now_ms() - at >= RESTART_PATIENCE_MS => {
                leptos::logging::warn!("still no data after an ICE restart: reconnecting");
                let mut s = state.borrow_mut();
                pause(&mut s, &state);
                return;
            }
            Some(_) => {}
        }
    }
}

async fn run_channel(state: Weak<RefCell<State>>, mut events: UnboundedReceiver<ChannelEvent>) {
    while let Some(event) = events.next().await {
        let Some(state) = state.upgrade() else { return };
        let mut s = state.borrow_mut();
        match event {
            // Downloads open once the sender's list arrives (its first message).
            ChannelEvent::Open => {
                s.ui.phase.set(Phase::Connected);
                s.ui.error.set(None);
                s.reconnect_attempt = 0;
            }
            ChannelEvent::Text(text) => match serde_json::from_str::<PeerMsg>(&text) {
                Ok(msg) => on_peer_msg(&mut s, &state, msg),
                Err(e) => leptos::logging::warn!("unreadable message from sender: {e}"),
            },
            // Frames go to the sink straight from the channel's listener.
            ChannelEvent::Binary(_) => {}
            ChannelEvent::Closed => {
                if s.ui.phase.get_untracked() == Phase::Connected {
                    pause(&mut s, &state);
                }
                return;
            }
        }
    }
}

fn on_peer_msg(s: &mut State, state: &Rc<RefCell<State>>, msg: PeerMsg) {
    match msg {
        PeerMsg::Manifest { files } => update_list(s, state, files),
        PeerMsg::Block {
            transfer,
            index,
            hash,
        } => {
            if s.downloads.is_live(transfer) {
                if let Some(sink) = s.sink() {
                    sink.command(SinkCmd::Expect {
                        transfer,
                        index,
                        hash,
                    });
                }
            }
        }
        PeerMsg::End {
            transfer,
            size,
            hash,
            ..
        } => {
            // Still outstanding until the sink has taken the frames before this (its answer).
            if s.downloads.ended(transfer).is_none() {
                return;
            }
            if let Some(sink) = s.sink() {
                sink.command(SinkCmd::End {
                    transfer,
                    size,
                    hash,
                });
            }
        }
        PeerMsg::Refused {
            transfer, message, ..
        } => {
            let (key, failed) = match s.downloads.refused(transfer) {
                Refusal::Stale => return,
                Refusal::Waiting { key } => (key, None),
                Refusal::Failed {
                    key,
                    download,
                    next,
                } => {
                    s.run(next);
                    (key, Some(download))
                }
            };
            if let Some(sink) = s.sink() {
                sink.command(SinkCmd::Forget { transfer });
                sink.command(SinkCmd::Close { key });
            }
            if let Some(d) = failed {
                d.view.row.status.set(FileStatus::Failed(message));
            }
        }
        PeerMsg::Request { .. } | PeerMsg::Cancel { .. } | PeerMsg::Ack { .. } => {}
    }
}

/// Replaces the list with the sender's, keeping rows (and their progress) for files still there.
/// Downloads follow their file by resume key; the first list also starts downloads an earlier
/// visit left unfinished on disk.
fn update_list(s: &mut State, state: &Rc<RefCell<State>>, files: Vec<FileMeta>) {
    let share = s.share.to_string();
    let old: HashMap<String, FileRow> = s.ui.files.with_untracked(|rows| {
        rows.iter()
            .map(|r| (resume_key(&share, &r.meta), r.clone()))
            .collect()
    });
    let mut rows = Vec::with_capacity(files.len());
    let mut offered = HashMap::new();
    for meta in files {
        let key = resume_key(&share, &meta);
        // A file that comes back keeps its row (and its status) from its download.
        let previous = old
            .get(&key)
            .or_else(|| s.downloads.get(&key).map(|d| &d.view.row));
        let row = match previous {
            Some(row) if row.meta.id == meta.id => row.clone(),
            Some(row) => FileRow {
                meta: meta.clone(),
                ..row.clone()
            },
            None => FileRow::new(meta.clone()),
        };
        if let Some(d) = s.downloads.get_mut(&key) {
            d.view.row = row.clone();
        }
        offered.insert(key, meta);
        rows.push(row);
    }
    s.ui.files.set(rows);
    // The connection's first list, or files that came back (the sender re-added them): they
    // pick up where they stopped.
    let steps = s.downloads.listed(&offered);
    s.run(steps);
    if !s.resume_checked {
        s.resume_checked = true;
        let candidates: Vec<(String, FileRow)> = s.ui.files.with_untracked(|rows| {
            rows.iter()
                .map(|r| (resume_key(&share, &r.meta), r.clone()))
                .collect()
        });
        let weak = Rc::downgrade(state);
        spawn_local(async move {
            for (key, row) in candidates {
                if has_record(&share, &key).await {
                    let Some(state) = weak.upgrade() else { return };
                    start_download(&state, row, None);
                }
            }
        });
    }
}
