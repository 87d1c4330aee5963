//! The page's handle on where received bytes go: the storage worker (OPFS, resumable, off the
//! main thread) when the browser has one, else the same [`Sink`] in memory on the page (bounded
//! by [`MemoryStorage::MAX`], lost with the page). Either way the page sends [`SinkCmd`]s and
//! frames and reads [`SinkEvent`]s from one stream.

use super::opfs::{part_name, record_name, share_dir};
use super::save::save_blob;
use super::worker::{READY, UNSUPPORTED};
use super::writable::Place;
use super::{window, ClientError};
use crate::transfer::blocks::BLOCK_SIZE;
use crate::transfer::incoming::MemoryStorage;
use crate::transfer::sink::memory::{MemoryData, MemoryRecord};
use crate::transfer::sink::{Sink, SinkCmd, SinkEvent};
use futures::channel::{mpsc, oneshot};
use futures::FutureExt;
use gloo_events::EventListener;
use std::cell::RefCell;
use std::collections::HashMap;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{Blob, BlobPropertyBag, MessageEvent, WorkerOptions, WorkerType};

/// The worker script (in `public/`): it loads the app's WASM and calls `sink_worker`.
const WORKER_URL: &str = "/sink-worker.js";
/// How long a worker may take to load before the page receives in memory instead.
const WORKER_START_MS: u32 = 15_000;
/// A finished file stays in OPFS this long after it was handed to the browser's download, which
/// copies it from there; then it is removed.
const KEEP_MS: u32 = 10 * 60 * 1000;

pub enum SinkHandle {
    Worker {
        worker: web_sys::Worker,
        _listeners: [EventListener; 2],
    },
    Memory {
        sink: RefCell<Sink<MemoryData, MemoryRecord>>,
        events: mpsc::UnboundedSender<SinkEvent>,
        /// Finished files, until saved.
        done: RefCell<HashMap<String, Vec<u8>>>,
    },
}

impl SinkHandle {
    /// The storage worker if it starts and can write OPFS, else memory.
    pub async fn start() -> (Self, mpsc::UnboundedReceiver<SinkEvent>) {
        let (tx, rx) = mpsc::unbounded();
        match start_worker(tx.clone()).await {
            Ok(handle) => (handle, rx),
            Err(e) => {
                leptos::logging::warn!("no storage worker ({e}); receiving in memory");
                (
                    SinkHandle::Memory {
                        sink: RefCell::new(Sink::new(BLOCK_SIZE)),
                        events: tx,
                        done: RefCell::default(),
                    },
                    rx,
                )
            }
        }
    }

    /// Whether partial files survive a reload (they are on disk).
    pub fn persistent(&self) -> bool {
        matches!(self, SinkHandle::Worker { .. })
    }

    pub fn command(&self, cmd: SinkCmd) {
        match self {
            SinkHandle::Worker { worker, .. } => {
                if let Ok(text) = serde_json::to_string(&cmd) {
                    let _ = worker.post_message(&JsValue::from_str(&text));
                }
            }
            SinkHandle::Memory {
                sink, events, done, ..
            } => {
                let produced = match cmd {
                    SinkCmd::Open {
                        key, name, size, ..
                    } => {
                        let opened = if sink.borrow().is_open(&key) {
                            sink.borrow_mut().status(&key).ok_or_else(|| {
                                crate::transfer::TransferError::Storage("not open".into())
                            })
                        } else {
                            MemoryData::new(size).and_then(|data| {
                                sink.borrow_mut().attach(
                                    &key,
                                    &name,
                                    size,
                                    data,
                                    MemoryRecord::default(),
                                )
                            })
                        };
                        vec![opened.unwrap_or_else(|e| SinkEvent::Failed {
                            key,
                            message: e.to_string(),
                        })]
                    }
                    cmd => sink.borrow_mut().command(cmd).0,
                };
                deliver(sink, done, events, produced);
            }
        }
    }

    /// `open` (a [`SinkCmd::Open`]) with the file written straight to `place` where the worker
    /// can; the memory sink opens it as usual.
    pub fn open_in(&self, open: SinkCmd, place: &Place) {
        let message = serde_json::to_string(&open)
            .map_err(|e| ClientError::Js(e.to_string()))
            .and_then(|text| place.message(text));
        match (self, message) {
            (SinkHandle::Worker { worker, .. }, Ok(message)) => {
                let _ = worker.post_message(&message);
            }
            (_, _) => self.command(open),
        }
    }

    /// One data frame, straight from the channel. The worker gets the buffer itself (moved, not
    /// copied); the memory sink reads it here.
    pub fn frame(&self, buf: &js_sys::ArrayBuffer) {
        match self {
            SinkHandle::Worker { worker, .. } => {
                let _ = worker.post_message_with_transfer(buf, &js_sys::Array::of1(buf));
            }
            SinkHandle::Memory { sink, events, done } => {
                let produced = sink
                    .borrow_mut()
                    .frame(&js_sys::Uint8Array::new(buf).to_vec());
                deliver(sink, done, events, produced);
            }
        }
    }

    /// A finished file's bytes: the OPFS file itself (disk-backed, never read into memory
    /// here) or, from the memory sink, a blob of them.
    pub async fn file(&self, share: &str, key: &str) -> Result<Blob, ClientError> {
        match self {
            SinkHandle::Worker { .. } => {
                let storage = window()?.navigator().storage();
                let dir = share_dir(storage, share, false).await?;
                let handle: web_sys::FileSystemFileHandle =
                    JsFuture::from(dir.get_file_handle(&part_name(key)))
                        .await?
                        .dyn_into()?;
                let file: web_sys::File = JsFuture::from(handle.get_file()).await?.dyn_into()?;
                Ok(file.into())
            }
            SinkHandle::Memory { done, .. } => {
                let done = done.borrow();
                let bytes = done
                    .get(key)
                    .ok_or_else(|| ClientError::Js("the file is gone from memory".into()))?;
                let parts = js_sys::Array::of1(&js_sys::Uint8Array::from(&bytes[..]));
                let options = BlobPropertyBag::new();
                options.set_type("application/octet-stream");
                Ok(Blob::new_with_u8_array_sequence_and_options(
                    &parts, &options,
                )?)
            }
        }
    }

    /// Forgets a saved file: its record at once (so a reload does not save it again), its bytes
    /// once the browser has had time to copy them wherever they went.
    pub async fn release(&self, share: &str, key: &str) {
        match self {
            SinkHandle::Worker { .. } => {
                let Ok(window) = window() else { return };
                let Ok(dir) = share_dir(window.navigator().storage(), share, false).await else {
                    return;
                };
                let _ = JsFuture::from(dir.remove_entry(&record_name(key))).await;
                let part = part_name(key);
                wasm_bindgen_futures::spawn_local(async move {
                    gloo_timers::future::TimeoutFuture::new(KEEP_MS).await;
                    let _ = JsFuture::from(dir.remove_entry(&part)).await;
                });
            }
            SinkHandle::Memory { done, .. } => {
                done.borrow_mut().remove(key);
            }
        }
    }

    /// Hands a finished file to the browser as a download named `name`, then releases it.
    pub async fn save(&self, share: &str, key: &str, name: &str) -> Result<(), ClientError> {
        let file = self.file(share, key).await?;
        save_blob(name, &file)?;
        self.release(share, key).await;
        Ok(())
    }

    /// The most a file may weigh when it can only be received in memory.
    pub fn memory_limit(&self) -> Option<u64> {
        (!self.persistent()).then_some(MemoryStorage::MAX)
    }
}

impl Drop for SinkHandle {
    fn drop(&mut self) {
        if let SinkHandle::Worker { worker, .. } = self {
            worker.terminate();
        }
    }
}

/// Passes the memory sink's events on; a finished file's bytes are kept until saved.
fn deliver(
    sink: &RefCell<Sink<MemoryData, MemoryRecord>>,
    done: &RefCell<HashMap<String, Vec<u8>>>,
    events: &mpsc::UnboundedSender<SinkEvent>,
    produced: Vec<SinkEvent>,
) {
    for event in produced {
        if let SinkEvent::Finished { key, .. } = &event {
            if let Some((data, _)) = sink.borrow_mut().take(key) {
                done.borrow_mut()
                    .insert(key.clone(), data.storage.into_bytes());
            }
        }
        let _ = events.unbounded_send(event);
    }
}

/// Starts the worker and waits for its first word.
async fn start_worker(events: mpsc::UnboundedSender<SinkEvent>) -> Result<SinkHandle, ClientError> {
    let options = WorkerOptions::new();
    options.set_type(WorkerType::Module);
    let worker = web_sys::Worker::new_with_options(WORKER_URL, &options)?;
    let (ready_tx, ready_rx) = oneshot::channel::<Result<(), String>>();
    let ready_tx = RefCell::new(Some(ready_tx));
    let on_message = EventListener::new(&worker, "message", move |ev| {
        let Some(text) = ev
            .dyn_ref::<MessageEvent>()
            .and_then(|m| m.data().as_string())
        else {
            return;
        };
        if text == READY || text == UNSUPPORTED {
            if let Some(tx) = ready_tx.borrow_mut().take() {
                let _ = tx.send(if text == READY {
                    Ok(())
                } else {
                    Err("this browser cannot write OPFS files from a worker".into())
                });
            }
            return;
        }
        match serde_json::from_str::<SinkEvent>(&text) {
            Ok(event) => {
                let _ = events.unbounded_send(event);
            }
            Err(e) => leptos::logging::warn!("unreadable event from the storage worker: {e}"),
        }
    });
    let (failed_tx, failed_rx) = oneshot::channel::<String>();
    let failed_tx = RefCell::new(Some(failed_tx));
    let on_error = EventListener::new(&worker, "error", move |ev| {
        let message = ev
            .dyn_ref::<web_sys::ErrorEvent>()
            .map(|e| e.message())
            .unwrap_or_else(|| "the storage worker failed".into());
        leptos::logging::warn!("storage worker: {message}");
        if let Some(tx) = failed_tx.borrow_mut().take() {
            let _ = tx.send(message);
        }
    });
    let timeout = gloo_timers::future::TimeoutFuture::new(WORKER_START_MS);
    let outcome = futures::select! {
        ready = ready_rx.fuse() => ready.unwrap_or_else(|_| Err("the storage worker stopped".into())),
        failed = failed_rx.fuse() => Err(failed.unwrap_or_default()),
        _ = timeout.fuse() => Err("the storage worker did not start in time".into()),
    };
    match outcome {
        Ok(()) => Ok(SinkHandle::Worker {
            worker,
            _listeners: [on_message, on_error],
        }),
        Err(e) => {
            worker.terminate();
            Err(ClientError::Js(e))
        }
    }
}

/// Whether an earlier visit left a partial download of `key` (share `share`) on disk.
pub async fn has_record(share: &str, key: &str) -> bool {
    let Ok(window) = window() else { return false };
    let Ok(dir) = share_dir(window.navigator().storage(), share, false).await else {
        return false;
    };
    JsFuture::from(dir.get_file_handle(&record_name(key)))
        .await
        .is_ok()
}
