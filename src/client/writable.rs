//! Straight where the person chose: the storage worker's [`DataStore`] over a
//! `FileSystemWritableFileStream` on a file under a picked folder ("Download all") or a picked
//! file ("Save as…"), so each received byte is written to disk once (not into OPFS first and
//! copied out at the end).
//!
//! The browser writes such a stream to a temporary file beside the target and moves it into
//! place only when the stream is closed: a file has its new content only once it is whole and
//! verified, and a download stopped halfway (cancelled, failed, the page closed) leaves nothing
//! behind in a picked folder (a picked file, which the browser's save dialog made, stays as the
//! dialog left it). The price is resume across a reload of the page: the temporary file goes
//! with the page, so the record of verified blocks is kept in memory only (an OPFS record would
//! vouch for bytes that are gone). A broken connection still resumes: the stream stays open.
//!
//! Writes are asynchronous; the sink's [`Storage`] is not. Each write is queued on the stream
//! (its writes run in order) and counted in [`Pending`], which the worker waits on before taking
//! the next frame once too many bytes are in flight. A write that fails errors the stream, so
//! the file can no longer be closed into place: the next write, or the close, reports it.

use super::save::parent_of;
use super::{js_message, ClientError};
use crate::transfer::incoming::Storage;
use crate::transfer::sink::DataStore;
use crate::transfer::TransferError;
use futures::channel::oneshot;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::{spawn_local, JsFuture};
use web_sys::{
    FileSystemDirectoryHandle, FileSystemFileHandle, FileSystemGetFileOptions,
    FileSystemWritableFileStream, WriteCommandType, WriteParams,
};

/// How many bytes may be queued on the streams before the worker waits for the disk.
pub const MAX_PENDING: u64 = 16 << 20;

/// The bytes written and not yet on disk, across every stream of the worker.
#[derive(Default)]
pub struct Pending {
    bytes: Cell<u64>,
    waiter: RefCell<Option<oneshot::Sender<()>>>,
}

/// A stream's first failed write (its own: an aborted stream's rejections concern no other).
type Failure = Rc<RefCell<Option<String>>>;

impl Pending {
    pub fn bytes(&self) -> u64 {
        self.bytes.get()
    }

    /// Resolves once a queued write has finished (or failed).
    pub async fn settled(&self) {
        let (tx, rx) = oneshot::channel();
        *self.waiter.borrow_mut() = Some(tx);
        let _ = rx.await;
    }

    /// Runs `promise` (a write queued on a stream) to its end, counting `len` bytes meanwhile;
    /// a failure goes to `failed`.
    fn track(self: &Rc<Self>, promise: js_sys::Promise, len: u64, failed: Failure) {
        self.bytes.set(self.bytes.get() + len);
        let pending = self.clone();
        spawn_local(async move {
            let outcome = JsFuture::from(promise).await;
            pending.bytes.set(pending.bytes.get().saturating_sub(len));
            if let Err(e) = outcome {
                failed.borrow_mut().get_or_insert_with(|| js_message(&e));
            }
            if let Some(waiter) = pending.waiter.borrow_mut().take() {
                let _ = waiter.send(());
            }
        });
    }
}

/// Where a file is written straight to.
#[derive(Clone)]
pub enum Place {
    /// At these safe path components (the last one the file name) under a picked folder.
    InFolder(FileSystemDirectoryHandle, Vec<String>),
    /// Into a file picked in the browser's save dialog.
    File(FileSystemFileHandle),
}

impl Place {
    /// The message that tells the storage worker to open `open` (JSON of a `SinkCmd::Open`)
    /// here: `{ open, dir, parts }` or `{ open, file }` (handles travel by structured clone,
    /// which JSON cannot carry).
    pub fn message(&self, open: String) -> Result<JsValue, ClientError> {
        let message = js_sys::Object::new();
        js_sys::Reflect::set(&message, &"open".into(), &open.into())?;
        match self {
            Place::InFolder(dir, parts) => {
                js_sys::Reflect::set(&message, &"dir".into(), dir)?;
                let parts: js_sys::Array = parts.iter().map(|p| JsValue::from_str(p)).collect();
                js_sys::Reflect::set(&message, &"parts".into(), &parts)?;
            }
            Place::File(file) => {
                js_sys::Reflect::set(&message, &"file".into(), file)?;
            }
        }
        Ok(message.into())
    }

    /// Reads [`Place::message`] back: the `Open`'s JSON and the place.
    pub fn from_message(message: &JsValue) -> Option<(String, Place)> {
        let field = |name: &str| js_sys::Reflect::get(message, &name.into()).ok();
        let open = field("open")?.as_string()?;
        if let Some(file) = field("file").and_then(|v| v.dyn_into().ok()) {
            return Some((open, Place::File(file)));
        }
        let dir = field("dir")?.dyn_into().ok()?;
        let parts = field("parts")?.dyn_into::<js_sys::Array>().ok()?;
        let parts = parts.iter().map(|p| p.as_string()).collect::<Option<_>>()?;
        Some((open, Place::InFolder(dir, parts)))
    }
}

/// A file being written where the person chose.
pub struct DirectData {
    stream: FileSystemWritableFileStream,
    /// The folder it goes into and its name there, when it was created for this download: it
    /// is removed again if the download stops.
    created: Option<(FileSystemDirectoryHandle, String)>,
    pending: Rc<Pending>,
    failed: Failure,
}

impl DirectData {
    /// Opens `place` for writing, creating the folders on the way. A file already there is
    /// replaced once this one is whole, and left as it was if not.
    pub async fn open(place: &Place, pending: Rc<Pending>) -> Result<Self, ClientError> {
        let (handle, created) = match place {
            Place::File(handle) => (handle.clone(), None),
            Place::InFolder(dir, parts) => {
                let (folder, name) = parent_of(dir, parts).await?;
                let existed = JsFuture::from(folder.get_file_handle(&name)).await.is_ok();
                let options = FileSystemGetFileOptions::new();
                options.set_create(true);
                let handle: FileSystemFileHandle =
                    JsFuture::from(folder.get_file_handle_with_options(&name, &options))
                        .await?
                        .dyn_into()?;
                (handle, (!existed).then_some((folder, name)))
            }
        };
        let stream: FileSystemWritableFileStream =
            JsFuture::from(handle.create_writable()).await?.dyn_into()?;
        Ok(Self {
            stream,
            created,
            pending,
            failed: Failure::default(),
        })
    }

    /// Moves the written file into place (after every queued write).
    pub async fn commit(self) -> Result<(), ClientError> {
        self.check().map_err(|e| ClientError::Js(e.to_string()))?;
        JsFuture::from(self.stream.close()).await?;
        Ok(())
    }

    /// Drops what was written: the file under its name stays as it was, or goes if this
    /// download created it.
    pub async fn abandon(self) {
        let _ = JsFuture::from(self.stream.abort()).await;
        if let Some((folder, name)) = self.created {
            let _ = JsFuture::from(folder.remove_entry(&name)).await;
        }
    }

    fn check(&self) -> Result<(), TransferError> {
        match &*self.failed.borrow() {
            Some(e) => Err(TransferError::Storage(format!("writing the file: {e}"))),
            None => Ok(()),
        }
    }

    fn queue(&self, params: &WriteParams, len: u64) -> Result<(), TransferError> {
        self.check()?;
        let promise = self
            .stream
            .write_with_write_params(params)
            .map_err(|e| TransferError::Storage(js_message(&e)))?;
        self.pending.track(promise, len, self.failed.clone());
        Ok(())
    }
}

impl Storage for DirectData {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), TransferError> {
        let params = WriteParams::new(WriteCommandType::Write);
        params.set_position(Some(offset as f64));
        // A copy the stream owns: the caller's buffer is reused for the next frame.
        params.set_data(&js_sys::Uint8Array::from(data));
        self.queue(&params, data.len() as u64)
    }

    /// Bytes handed to the stream cannot be read back before it is closed. The sink reads only
    /// when a block's frames came out of order, which one ordered channel never does.
    fn read_at(&mut self, _offset: u64, _buf: &mut [u8]) -> Result<(), TransferError> {
        Err(TransferError::Storage(
            "a file written straight into a folder cannot be read back before it is whole".into(),
        ))
    }
}

impl DataStore for DirectData {
    /// Always a fresh file: nothing written through an earlier stream survives it.
    fn stored_len(&mut self) -> Result<u64, TransferError> {
        Ok(0)
    }

    fn truncate(&mut self, len: u64) -> Result<(), TransferError> {
        let params = WriteParams::new(WriteCommandType::Truncate);
        params.set_size(Some(len as f64));
        self.queue(&params, 0)
    }
}
