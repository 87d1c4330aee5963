//! The receiver's storage worker (a dedicated module Worker, `public/sink-worker.js`, running
//! this crate's WASM): the [`Sink`] of `transfer::sink` over OPFS files opened with synchronous
//! access handles, which exist only in workers. Writing and hashing happen here, off the page's
//! main thread; the page only hands over each frame's buffer (transferred, not copied).
//!
//! Files live in OPFS under `beamdrop/<share id>/<resume key>.part` (the bytes) and `.rec` (the
//! record of verified blocks), so a partial download survives a reload of the page.
//!
//! Messages in: a string is a [`SinkCmd`] (JSON), an `ArrayBuffer` a data frame. Out: strings,
//! each a [`SinkEvent`] (JSON), after a first `"ready"` once the handler is installed.

use super::opfs::{part_name, record_name, share_dir};
use super::{js_message, ClientError};
use crate::transfer::blocks::BLOCK_SIZE;
use crate::transfer::incoming::Storage;
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

/// Flushes and releases a file's handles (others, e.g. the page's `getFile()`, may then read it).
fn release(files: Option<(OpfsData, OpfsRecord)>) {
    if let Some((data, record)) = files {
        let _ = data.handle.flush();
        data.handle.close();
        let _ = record.handle.flush();
        record.handle.close();
    }
}

struct Worker {
    scope: DedicatedWorkerGlobalScope,
    sink: RefCell<Sink<OpfsData, OpfsRecord>>,
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

    fn post_all(&self, events: Vec<SinkEvent>) {
        for event in events {
            if let SinkEvent::Finished { key, .. } = &event {
                // The page reads the file next: its handles must be closed first.
                release(self.sink.borrow_mut().take(key));
            }
            self.post(&event);
        }
    }

    fn on_frame(&self, buf: &js_sys::ArrayBuffer) {
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
        self.post_all(events);
    }

    async fn on_command(self: Rc<Self>, cmd: SinkCmd) {
        match cmd {
            SinkCmd::Open {
                share,
                key,
                name,
                size,
            } => {
                if self.sink.borrow().is_open(&key) {
                    // Asked again (a reconnect): answer with where it stands.
                    let event = self.sink.borrow_mut().status(&key);
                    self.post_all(event.into_iter().collect());
                    return;
                }
                let event = match open_files(&share, &key).await {
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
            SinkCmd::Discard { ref share, ref key } => {
                let (share, key) = (share.clone(), key.clone());
                let (events, released) = self.sink.borrow_mut().command(cmd);
                release(released);
                if let Ok(dir) = share_dir(self.scope.navigator().storage(), &share, false).await {
                    let _ = JsFuture::from(dir.remove_entry(&part_name(&key))).await;
                    let _ = JsFuture::from(dir.remove_entry(&record_name(&key))).await;
                }
                self.post_all(events);
            }
            cmd => {
                let (events, released) = self.sink.borrow_mut().command(cmd);
                release(released);
                self.post_all(events);
            }
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

/// The worker's entry point, called by `public/sink-worker.js` once the WASM is loaded.
#[wasm_bindgen]
pub fn sink_worker() -> Result<(), JsValue> {
    let scope: DedicatedWorkerGlobalScope = js_sys::global().dyn_into()?;
    let worker = Rc::new(Worker {
        scope: scope.clone(),
        sink: RefCell::new(Sink::new(BLOCK_SIZE)),
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
                worker.on_frame(buf);
            } else if let Some(text) = data.as_string() {
                match serde_json::from_str::<SinkCmd>(&text) {
                    Ok(cmd) => worker.clone().on_command(cmd).await,
                    Err(e) => leptos::logging::warn!("sink worker: bad command: {e}"),
                }
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
