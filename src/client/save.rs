//! Hands finished files to the person: as a normal download with the original name, into a
//! folder they chose (keeping the sender's tree), or as one ZIP of many files.

use super::{window, ClientError};
use crate::transfer::archive::{Part, ZipBuilder};
use crate::transfer::FileMeta;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    Blob, BlobPropertyBag, FileSystemDirectoryHandle, FileSystemFileHandle,
    FileSystemGetDirectoryOptions, FileSystemGetFileOptions, FileSystemWritableFileStream,
    HtmlAnchorElement, Url,
};

/// Saves a blob (or a disk-backed file) without copying it into memory.
pub fn save_blob(name: &str, blob: &Blob) -> Result<(), ClientError> {
    let url = Url::create_object_url_with_blob(blob)?;
    let document = window()?
        .document()
        .ok_or_else(|| ClientError::Js("no document".into()))?;
    let anchor: HtmlAnchorElement = document
        .create_element("a")?
        .dyn_into()
        .map_err(|_| ClientError::Js("could not create a link element".into()))?;
    anchor.set_href(&url);
    anchor.set_download(name);
    anchor.click();
    // The download has started from the URL; release it once the browser has had time to read it.
    wasm_bindgen_futures::spawn_local(async move {
        gloo_timers::future::TimeoutFuture::new(60_000).await;
        let _ = Url::revoke_object_url(&url);
    });
    Ok(())
}

/// The browser's folder picker, where there is one (Chromium-based browsers): a promise of the
/// folder the person chose. Call it from the click itself (it needs the user's gesture).
pub fn pick_directory() -> Option<js_sys::Promise> {
    let window = window().ok()?;
    let picker = js_sys::Reflect::get(&window, &"showDirectoryPicker".into()).ok()?;
    let picker = picker.dyn_ref::<js_sys::Function>()?;
    let options = js_sys::Object::new();
    let _ = js_sys::Reflect::set(&options, &"mode".into(), &"readwrite".into());
    picker.call1(&window, &options).ok()?.dyn_into().ok()
}

/// The browser's save dialog, where there is one (Chromium-based browsers): a promise of the
/// file the person chose, `name` suggested. Call it from the click itself.
pub fn pick_file(name: &str) -> Option<js_sys::Promise> {
    let window = window().ok()?;
    let picker = js_sys::Reflect::get(&window, &"showSaveFilePicker".into()).ok()?;
    let picker = picker.dyn_ref::<js_sys::Function>()?;
    let options = js_sys::Object::new();
    let _ = js_sys::Reflect::set(&options, &"suggestedName".into(), &name.into());
    picker.call1(&window, &options).ok()?.dyn_into().ok()
}

/// Whether the browser has a save dialog the page can use ("Save as…").
pub fn can_pick_file() -> bool {
    window()
        .ok()
        .and_then(|w| js_sys::Reflect::get(&w, &"showSaveFilePicker".into()).ok())
        .is_some_and(|f| f.is_function())
}

/// The folder that holds `parts` (safe path components, the last one the file name) under
/// `dir`, created on the way where missing, and the file's name.
pub async fn parent_of(
    dir: &FileSystemDirectoryHandle,
    parts: &[String],
) -> Result<(FileSystemDirectoryHandle, String), ClientError> {
    let Some((name, folders)) = parts.split_last() else {
        return Err(ClientError::Js("no file name".into()));
    };
    let create = FileSystemGetDirectoryOptions::new();
    create.set_create(true);
    let mut here = dir.clone();
    for folder in folders {
        here = JsFuture::from(here.get_directory_handle_with_options(folder, &create))
            .await?
            .dyn_into()?;
    }
    Ok((here, name.clone()))
}

/// Writes `blob` to `parts` (safe path components, the last one the file name) under `dir`,
/// creating the folders on the way. The browser streams the blob to disk.
pub async fn save_to_folder(
    dir: &FileSystemDirectoryHandle,
    parts: &[String],
    blob: &Blob,
) -> Result<(), ClientError> {
    let (here, name) = parent_of(dir, parts).await?;
    let file_options = FileSystemGetFileOptions::new();
    file_options.set_create(true);
    let handle: FileSystemFileHandle =
        JsFuture::from(here.get_file_handle_with_options(&name, &file_options))
            .await?
            .dyn_into()?;
    save_to_file(&handle, blob).await
}

/// Writes `blob` into the file `handle` (the browser streams it to disk).
pub async fn save_to_file(handle: &FileSystemFileHandle, blob: &Blob) -> Result<(), ClientError> {
    let writable: FileSystemWritableFileStream =
        JsFuture::from(handle.create_writable()).await?.dyn_into()?;
    if let Err(e) = JsFuture::from(writable.write_with_blob(blob)?).await {
        let _ = JsFuture::from(writable.abort()).await;
        return Err(e.into());
    }
    JsFuture::from(writable.close()).await?;
    Ok(())
}

/// One ZIP of `files` (each: its sender-given path and name, and its bytes as a blob or a
/// disk-backed file), saved as `name`. Built from parts (see `transfer::archive`): the files
/// are read once, in 1 MiB pieces, for their CRC, and never held whole in memory.
pub async fn save_zip(name: &str, files: &[(FileMeta, Blob)]) -> Result<(), ClientError> {
    const PIECE: f64 = 1024.0 * 1024.0;
    let mut zip = ZipBuilder::new();
    let mut piece = Vec::new();
    for (meta, blob) in files {
        let size = blob.size();
        zip.add(&meta.path, &meta.name, size as u64)
            .map_err(|e| ClientError::Js(e.to_string()))?;
        let mut at = 0.0;
        while at < size {
            let end = (at + PIECE).min(size);
            let buf = JsFuture::from(blob.slice_with_f64_and_f64(at, end)?.array_buffer()).await?;
            let bytes = js_sys::Uint8Array::new(&buf);
            piece.resize(bytes.length() as usize, 0);
            bytes.copy_to(&mut piece);
            zip.data(&piece)
                .map_err(|e| ClientError::Js(e.to_string()))?;
            at = end;
        }
    }
    let parts = zip.finish().map_err(|e| ClientError::Js(e.to_string()))?;
    let sequence = js_sys::Array::new();
    for part in parts {
        match part {
            Part::Bytes(bytes) => sequence.push(&js_sys::Uint8Array::from(&bytes[..])),
            Part::File(i) => sequence.push(&files[i].1),
        };
    }
    let options = BlobPropertyBag::new();
    options.set_type("application/zip");
    let archive = Blob::new_with_blob_sequence_and_options(&sequence, &options)?;
    save_blob(name, &archive)
}
