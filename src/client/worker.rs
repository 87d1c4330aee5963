//! The receiver's storage worker (a dedicated module Worker, `public/sink-worker.js`, running
//! this crate's WASM): the [`Sink`] of `transfer::sink` over OPFS files opened with synchronous
//! access handles, which exist only in workers. Writing and hashing happen here, off the page's
//! main thread; the page only hands over each frame's buffer (transferred, not copied).
//!
//! Files live in OPFS under `beamdrop/<share id>/<resume key>.part` (the bytes) and `.rec` (the
//! record of verified blocks), so a partial download survives a reload of the page.
//!
//! A file going into a folder or file the person picked goes straight there instead (see
//! [`super::writable`]), unless an earlier attempt left part of it in OPFS to resume from.
//!
//! Messages in: a string is a [`SinkCmd`] (JSON), an `ArrayBuffer` a data frame, an object an
//! `Open` with the place its file goes to (see [`Place::message`]). Out: strings, each a [`SinkEvent`] (JSON), after a first `"ready"` once
//! the handler is installed.

use super::opfs::{part_name, record_name, share_dir};
use super::writable::{DirectData, Pending, Place, MAX_PENDING};
use super::{js_message, ClientError};
use crate::transfer::blocks::BLOCK_SIZE;
use crate::transfer::incoming::Storage;
use crate::transfer::sink::memory::MemoryRecord;
use crate::transfer::sink::{DataStore, RecordStore, Sink, SinkCmd, SinkEvent};
use crate::transfer::TransferError;
use std::cell::RefCell;
use std::rc::Rc;
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::{spawn_local, JsFuture};
use web_sys::{
    DedicatedWorkerGlobalScope, FileSystemDirectoryHandle, FileSystemFileHandle,
    FileSystemGetFileOptions, FileSystemReadWriteOptions, FileSystemSyncAccessHandle, MessageEvent,
};

/// The worker's first message: its handler is installed and OPFS can be written.
pub const READY: &str = "ready";
/// The worker's first message when this browser has no synchronous OPFS access.
pub const UNSUPPORTED: &str = "unsupported";

fn storage_error(e: JsValue) -> TransferError {
    TransferError::Storage(js_message(&e))
}

fn at(offset: u64) -> FileSystemReadWriteOptions {
    let options = FileSystemReadWriteOptions::new();
    options.set_at(offset as f64);
    options
}

/// A file's bytes through a synchronous access handle.
pub struct OpfsData {
    handle: FileSystemSyncAccessHandle,
}

impl Storage for OpfsData {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), TransferError> {
        let written = self
            .handle
            .write_with_u8_array_and_options(data, &at(offset))
            .map_err(storage_error)?;
        if written as usize != data.len() {
            return Err(TransferError::Storage(format!(
                "wrote {written} of {} bytes (disk full?)",
                data.len()
            )));
        }
        Ok(())
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), TransferError> {
        let read = self
            .handle
            .read_with_u8_array_and_options(buf, &at(offset))
            .map_err(storage_error)?;
        if read as usize != buf.len() {
            return Err(TransferError::Storage(format!(
                "read {read} of {} bytes",
                buf.len()
            )));
        }
        Ok(())
    }
}

impl DataStore for OpfsData {
    fn stored_len(&mut self) -> Result<u64, TransferError> {
        Ok(self.handle.get_size().map_err(storage_error)? as u64)
    }

    fn truncate(&mut self, len: u64) -> Result<(), TransferError> {
        self.handle
            .truncate_with_f64(len as f64)
            .map_err(storage_error)
    }
}

/// A record file through a synchronous access handle (appends at its end).
pub struct OpfsRecord {
    handle: FileSystemSyncAccessHandle,
    len: u64,
}

impl RecordStore for OpfsRecord {
    fn read_all(&mut self) -> Result<Vec<u8>, TransferError> {
        let mut buf = vec![0u8; self.len as usize];
        let read = self
            .handle
            .read_with_u8_array_and_options(&mut buf, &at(0))
            .map_err(storage_error)?;
        buf.truncate(read as usize);
        Ok(buf)
    }

    fn reset(&mut self, header: &[u8]) -> Result<(), TransferError> {
        self.handle.truncate_with_f64(0.0).map_err(storage_error)?;
        self.len = 0;
        self.append(header)
    }

    fn append(&mut self, entry: &[u8]) -> Result<(), TransferError> {
        let written = self
            .handle
            .write_with_u8_array_and_options(entry, &at(self.len))
            .map_err(storage_error)?;
        self.len += written as u64;
        if written as usize != entry.len() {
            return Err(TransferError::Storage(
                "record write failed (disk full?)".into(),
            ));
        }
        Ok(())
    }
}

/// Where the worker keeps a file's bytes: OPFS, or the folder the person picked.
pub enum Data {
    Opfs(OpfsData),
    Direct(DirectData),
}

/// Where the worker keeps a file's record: OPFS next to its bytes, or (for a file written
/// straight into a folder, which does not survive the page) memory.
pub enum Record {
    Opfs(OpfsRecord),
    Memory(MemoryRecord),
}

impl Storage for Data {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), TransferError> {
        match self {
            Data::Opfs(d) => d.write_at(offset, data),
            Data::Direct(d) => d.write_at(offset, data),
        }
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), TransferError> {
        match self {
            Data::Opfs(d) => d.read_at(offset, buf),
            Data::Direct(d) => d.read_at(offset, buf),
        }
    }
}

impl DataStore for Data {
    fn stored_len(&mut self) -> Result<u64, TransferError> {
        match self {
            Data::Opfs(d) => d.stored_len(),
            Data::Direct(d) => d.stored_len(),
        }
    }

    fn truncate(&mut self, len: u64) -> Result<(), TransferError> {
        match self {
            Data::Opfs(d) => d.truncate(len),
            Data::Direct(d) => d.truncate(len),
        }
    }
}

impl RecordStore for Record {
    fn read_all(&mut self) -> Result<Vec<u8>, TransferError> {
        match self {
            Record::Opfs(r) => r.read_all(),
            Record::Memory(r) => r.read_all(),
        }
    }

    fn reset(&mut self, header: &[u8]) -> Result<(), TransferError> {
        match self {
            Record::Opfs(r) => r.reset(header),
            Record::Memory(r) => r.reset(header),
        }
    }

    fn append(&mut self, entry: &[u8]) -> Result<(), TransferError> {
        match self {
            Record::Opfs(r) => r.append(entry),
            Record::Memory(r) => r.append(entry),
        }
    }
}

/// Lets go of a file that is not finished: OPFS handles are flushed and closed (its bytes stay
/// for a later resume), a file going into a folder is dropped.
async fn release(files: Option<(Data, Record)>) {
    match files {
        Some((Data::Opfs(data), record)) => {
            let _ = data.handle.flush();
            data.handle.close();
            if let Record::Opfs(record) = record {
                let _ = record.handle.flush();
                record.handle.close();
            }
        }
        Some((Data::Direct(data), _)) => data.abandon().await,
        None => {}
    }
}

/// A finished file: OPFS handles are closed (the page reads the file next); a file going into
/// a folder is moved into place. Whether it is now in place, or why it could not be.
async fn finish(files: Option<(Data, Record)>) -> Result<bool, ClientError> {
    match files {
        Some((Data::Direct(data), _)) => data.commit().await.map(|()| true),
        other => {
            release(other).await;
            Ok(false)
        }
    }
}

struct Worker {
    scope: DedicatedWorkerGlobalScope,
    sink: RefCell<Sink<Data, Record>>,
    /// Writes queued on files going straight into a folder.
    pending: Rc<Pending>,
    /// Each frame is copied into this buffer once (hashing needs the bytes in WASM memory) and
    /// written to disk from it.
    scratch: RefCell<Vec<u8>>,
}

impl Worker {
    fn post(&self, event: &SinkEvent) {
        if let Ok(text) = serde_json::to_string(event) {
            let _ = self.scope.post_message(&JsValue::from_str(&text));
        }
    }

    async fn post_all(&self, events: Vec<SinkEvent>) {
        for event in events {
            let event = match event {
                SinkEvent::Finished { key, hash, .. } => {
                    let files = self.sink.borrow_mut().take(&key);
                    match finish(files).await {
                        Ok(in_place) => SinkEvent::Finished {
                            key,
                            hash,
                            in_place,
                        },
                        Err(e) => SinkEvent::Failed {
                            key,
                            message: format!("could not save: {e}"),
                        },
                    }
                }
                event => event,
            };
            self.post(&event);
        }
    }

    async fn on_frame(&self, buf: &js_sys::ArrayBuffer) {
        let bytes = js_sys::Uint8Array::new(buf);
        let len = bytes.length() as usize;
        let events = {
            let mut scratch = self.scratch.borrow_mut();
            if scratch.len() < len {
                scratch.resize(len, 0);
            }
            bytes.copy_to(&mut scratch[..len]);
            self.sink.borrow_mut().frame(&scratch[..len])
        };
        self.post_all(events).await;
        // Backpressure for files going into a folder: the page's frames wait in this worker's
        // queue, and the sender waits for the acknowledgements of stored blocks.
        while self.pending.bytes() > MAX_PENDING {
            self.pending.settled().await;
        }
    }

    /// `Open`, straight into `place` (picked by the person) when given and nothing of the file
    /// waits in OPFS to be resumed.
    async fn on_open(&self, cmd: SinkCmd, place: Option<Place>) {
        let SinkCmd::Open {
            share,
            key,
            name,
            size,
        } = cmd
        else {
            return;
        };
        if self.sink.borrow().is_open(&key) {
            // Asked again (a reconnect): answer with where it stands.
            let event = self.sink.borrow_mut().status(&key);
            self.post_all(event.into_iter().collect()).await;
            return;
        }
        let place = match place {
            Some(place) if !has_partial(&self.scope, &share, &key).await => Some(place),
            _ => None,
        };
        let opened = match place {
            Some(place) => DirectData::open(&place, self.pending.clone())
                .await
                .map(|data| (Data::Direct(data), Record::Memory(MemoryRecord::default()))),
            None => open_files(&share, &key)
                .await
                .map(|(data, record)| (Data::Opfs(data), Record::Opfs(record))),
        };
        let event = match opened {
            Ok((data, record)) => self
                .sink
                .borrow_mut()
                .attach(&key, &name, size, data, record)
                .unwrap_or_else(|e| SinkEvent::Failed {
                    key: key.clone(),
                    message: e.to_string(),
                }),
            Err(e) => SinkEvent::Failed {
                key: key.clone(),
                message: e.to_string(),
            },
        };
        self.post(&event);
    }

    async fn on_command(&self, cmd: SinkCmd) {
        match cmd {
            cmd @ SinkCmd::Open { .. } => self.on_open(cmd, None).await,
            SinkCmd::Discard { ref share, ref key } => {
                let (share, key) = (share.clone(), key.clone());
                let (events, released) = self.sink.borrow_mut().command(cmd);
                release(released).await;
                if let Ok(dir) = share_dir(self.scope.navigator().storage(), &share, false).await {
                    let _ = JsFuture::from(dir.remove_entry(&part_name(&key))).await;
                    let _ = JsFuture::from(dir.remove_entry(&record_name(&key))).await;
                }
                self.post_all(events).await;
            }
            cmd => {
                let (events, released) = self.sink.borrow_mut().command(cmd);
                release(released).await;
                self.post_all(events).await;
            }
        }
    }

    /// An `Open` with the place its file goes straight to (see [`Place::message`]).
    async fn on_open_in(&self, message: &JsValue) {
        let parsed = Place::from_message(message)
            .and_then(|(open, place)| Some((serde_json::from_str::<SinkCmd>(&open).ok()?, place)));
        match parsed {
            Some((cmd, place)) => self.on_open(cmd, Some(place)).await,
            None => leptos::logging::warn!("sink worker: unreadable open message"),
        }
    }
}

/// How long opening a file waits for another worker's access handle on it to go: a reloaded
/// page's new worker can ask before the old page's worker has been torn down.
const BUSY_WAIT_MS: u32 = 10_000;

/// Whether `e` says another access handle (or writable) holds the file.
fn is_busy(e: &JsValue) -> bool {
    js_sys::Reflect::get(e, &"name".into())
        .ok()
        .and_then(|name| name.as_string())
        .is_some_and(|name| name == "NoModificationAllowedError")
}

async fn open_handle(
    dir: &FileSystemDirectoryHandle,
    name: &str,
) -> Result<FileSystemSyncAccessHandle, ClientError> {
    let options = FileSystemGetFileOptions::new();
    options.set_create(true);
    let file = JsFuture::from(dir.get_file_handle_with_options(name, &options)).await?;
    let file: FileSystemFileHandle = file.dyn_into()?;
    let (mut waited, mut pause) = (0, 25);
    loop {
        match JsFuture::from(file.create_sync_access_handle()).await {
            Ok(handle) => return Ok(handle.dyn_into()?),
            Err(e) if is_busy(&e) && waited < BUSY_WAIT_MS => {
                gloo_timers::future::TimeoutFuture::new(pause).await;
                waited += pause;
                pause = (pause * 2).min(500);
            }
            Err(e) if is_busy(&e) => return Err(ClientError::FileBusy),
            Err(e) => return Err(e.into()),
        }
    }
}

async fn open_files(share: &str, key: &str) -> Result<(OpfsData, OpfsRecord), ClientError> {
    let scope: DedicatedWorkerGlobalScope = js_sys::global()
        .dyn_into()
        .map_err(|_| ClientError::Js("not in a worker".into()))?;
    let dir = share_dir(scope.navigator().storage(), share, true).await?;
    let data = open_handle(&dir, &part_name(key)).await?;
    let record = match open_handle(&dir, &record_name(key)).await {
        Ok(record) => record,
        Err(e) => {
            data.close();
            return Err(e);
        }
    };
    let len = record.get_size()? as u64;
    Ok((
        OpfsData { handle: data },
        OpfsRecord {
            handle: record,
            len,
        },
    ))
}

/// Whether an earlier attempt left part of `key` in OPFS (its record is there).
async fn has_partial(scope: &DedicatedWorkerGlobalScope, share: &str, key: &str) -> bool {
    match share_dir(scope.navigator().storage(), share, false).await {
        Ok(dir) => JsFuture::from(dir.get_file_handle(&record_name(key)))
            .await
            .is_ok(),
        Err(_) => false,
    }
}

/// The worker's entry point, called by `public/sink-worker.js` once the WASM is loaded.
#[wasm_bindgen]
pub fn sink_worker() -> Result<(), JsValue> {
    let scope: DedicatedWorkerGlobalScope = js_sys::global().dyn_into()?;
    let worker = Rc::new(Worker {
        scope: scope.clone(),
        sink: RefCell::new(Sink::new(BLOCK_SIZE)),
        pending: Rc::default(),
        scratch: RefCell::new(Vec::new()),
    });
    // Commands that open or delete files wait on the file system; everything after them must
    // not overtake them, so messages are handled strictly in order, one at a time.
    let (queue, mut inbox) = futures::channel::mpsc::unbounded::<JsValue>();
    let handler = Closure::<dyn FnMut(MessageEvent)>::new(move |ev: MessageEvent| {
        let _ = queue.unbounded_send(ev.data());
    });
    scope.set_onmessage(Some(handler.as_ref().unchecked_ref()));
    // The handler lives as long as the worker does: there is exactly one, for its whole life.
    handler.forget();
    spawn_local(async move {
        use futures::StreamExt;
        while let Some(data) = inbox.next().await {
            if let Some(buf) = data.dyn_ref::<js_sys::ArrayBuffer>() {
                worker.on_frame(buf).await;
            } else if let Some(text) = data.as_string() {
                match serde_json::from_str::<SinkCmd>(&text) {
                    Ok(cmd) => worker.on_command(cmd).await,
                    Err(e) => leptos::logging::warn!("sink worker: bad command: {e}"),
                }
            } else if data.is_object() {
                worker.on_open_in(&data).await;
            }
        }
    });
    // Synchronous access handles are what make this worker worth having; without them (an old
    // browser, some private modes) the page receives in memory instead.
    let supported = js_sys::Reflect::has(&scope, &"FileSystemSyncAccessHandle".into())?;
    scope.post_message(&JsValue::from_str(if supported {
        READY
    } else {
        UNSUPPORTED
    }))?;
    Ok(())
}
