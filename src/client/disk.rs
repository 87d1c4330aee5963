//! The receiver's disk sink: large files go to the origin-private file system (OPFS), written at
//! each frame's offset straight from the message's memory (never copied into WASM), so memory
//! stays flat whatever the file size. Verified by streaming the finished file through SHA-256.

use super::{window, ClientError};
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::rc::Rc;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::{spawn_local, JsFuture};
use web_sys::{
    File, FileSystemDirectoryHandle, FileSystemFileHandle, FileSystemGetFileOptions,
    FileSystemWritableFileStream, WriteCommandType, WriteParams,
};

/// Files at least this large are received to disk; smaller ones in memory.
pub const DISK_THRESHOLD: u64 = 8 * 1024 * 1024;
/// Bytes read per step when hashing the finished file.
const HASH_BLOCK: f64 = 4.0 * 1024.0 * 1024.0;
/// A finished file stays in OPFS this long after its download started, then is removed.
const KEEP_MS: u32 = 10 * 60 * 1000;

pub struct DiskSink {
    root: FileSystemDirectoryHandle,
    name: String,
    handle: FileSystemFileHandle,
    writable: FileSystemWritableFileStream,
    /// The first write that failed, if any (writes complete asynchronously, in order).
    failed: Rc<RefCell<Option<String>>>,
    /// Set once the file is complete and verified-or-rejected; until then dropping discards it.
    finished: bool,
}

impl DiskSink {
    pub async fn create(name: &str) -> Result<Self, ClientError> {
        let storage = window()?.navigator().storage();
        let root: FileSystemDirectoryHandle = JsFuture::from(storage.get_directory())
            .await?
            .unchecked_into();
        let options = FileSystemGetFileOptions::new();
        options.set_create(true);
        let handle: FileSystemFileHandle =
            JsFuture::from(root.get_file_handle_with_options(name, &options))
                .await?
                .unchecked_into();
        let writable: FileSystemWritableFileStream = JsFuture::from(handle.create_writable())
            .await?
            .unchecked_into();
        Ok(Self {
            root,
            name: name.to_owned(),
            handle,
            writable,
            failed: Rc::default(),
            finished: false,
        })
    }

    /// Queues `data` to be written at `offset`.
    pub fn write_at(&self, offset: u64, data: &js_sys::Uint8Array) -> Result<(), ClientError> {
        if let Some(e) = self.failed.borrow().as_ref() {
            return Err(ClientError::Js(format!("writing to disk failed: {e}")));
        }
        let params = WriteParams::new(WriteCommandType::Write);
        params.set_position(Some(offset as f64));
        params.set_data(data);
        let written = self.writable.write_with_write_params(&params)?;
        let failed = self.failed.clone();
        spawn_local(async move {
            if let Err(e) = JsFuture::from(written).await {
                failed.borrow_mut().get_or_insert(super::js_message(&e));
            }
        });
        Ok(())
    }

    /// Commits the writes and returns the file with its SHA-256, read back in blocks.
    pub async fn finish(mut self) -> Result<(File, [u8; 32], StoredFile), ClientError> {
        self.finished = true;
        let stored = StoredFile {
            root: self.root.clone(),
            name: self.name.clone(),
        };
        match self.read_back().await {
            Ok((file, digest)) => Ok((file, digest, stored)),
            Err(e) => {
                stored.remove().await;
                Err(e)
            }
        }
    }

    async fn read_back(&self) -> Result<(File, [u8; 32]), ClientError> {
        JsFuture::from(self.writable.close()).await?;
        if let Some(e) = self.failed.borrow().as_ref() {
            return Err(ClientError::Js(format!("writing to disk failed: {e}")));
        }
        let file: File = JsFuture::from(self.handle.get_file())
            .await?
            .unchecked_into();
        let size = file.size();
        let mut hasher = Sha256::new();
        let mut offset = 0.0;
        while offset < size {
            let end = (offset + HASH_BLOCK).min(size);
            let block = file.slice_with_f64_and_f64(offset, end)?;
            let buf = JsFuture::from(block.array_buffer()).await?;
            hasher.update(js_sys::Uint8Array::new(&buf).to_vec());
            offset = end;
        }
        Ok((file, hasher.finalize().into()))
    }
}

impl Drop for DiskSink {
    /// An unfinished file (failed, cancelled, sender gone) leaves nothing on disk.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let stored = StoredFile {
            root: self.root.clone(),
            name: self.name.clone(),
        };
        let writable = self.writable.clone();
        spawn_local(async move {
            let _ = JsFuture::from(writable.abort()).await;
            stored.remove().await;
        });
    }
}

/// A finished file in OPFS.
pub struct StoredFile {
    root: FileSystemDirectoryHandle,
    name: String,
}

impl StoredFile {
    /// Removes the file once its download has had time to copy it.
    pub fn remove_later(self) {
        // (A file that failed verification is removed the same way: nothing links to it.)
        spawn_local(async move {
            gloo_timers::future::TimeoutFuture::new(KEEP_MS).await;
            self.remove().await;
        });
    }

    async fn remove(&self) {
        let _ = JsFuture::from(self.root.remove_entry(&self.name)).await;
    }
}
