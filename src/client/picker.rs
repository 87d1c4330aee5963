//! Files chosen by the sender: from a file input (with `webkitRelativePath` for a chosen folder)
//! or from a drop, where dropped folders are walked recursively and keep their relative paths.

use super::ClientError;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    DataTransfer, File, FileList, FileSystemDirectoryEntry, FileSystemEntry, FileSystemFileEntry,
};

/// A file and its path relative to the folder it came from ("" for a loose file).
pub struct Picked {
    pub file: File,
    pub path: String,
}

/// Everything in a file input's list.
pub fn from_file_list(list: &FileList) -> Vec<Picked> {
    (0..list.length())
        .filter_map(|i| list.get(i))
        .map(|file| {
            let path = js_sys::Reflect::get(&file, &"webkitRelativePath".into())
                .ok()
                .and_then(|v| v.as_string())
                .unwrap_or_default();
            Picked { file, path }
        })
        .collect()
}

/// The dropped entries. Must run inside the drop event: the browser empties the list afterwards.
pub fn dropped_entries(dt: &DataTransfer) -> Vec<FileSystemEntry> {
    let items = dt.items();
    (0..items.length())
        .filter_map(|i| items.get(i))
        .filter(|item| item.kind() == "file")
        .filter_map(|item| item.webkit_get_as_entry().ok().flatten())
        .collect()
}

/// Every file under the dropped entries, depth first, with paths relative to the drop.
pub async fn walk(entries: Vec<FileSystemEntry>) -> Result<Vec<Picked>, ClientError> {
    let mut out = Vec::new();
    let mut stack = entries;
    stack.reverse();
    while let Some(entry) = stack.pop() {
        if entry.is_directory() {
            let dir: FileSystemDirectoryEntry = entry
                .dyn_into()
                .map_err(|_| ClientError::Js("a dropped folder is not a folder entry".into()))?;
            let reader = dir.create_reader();
            let mut children = Vec::new();
            // readEntries returns the listing in batches; an empty batch ends it.
            loop {
                let batch = JsFuture::from(js_sys::Promise::new(&mut |resolve, reject| {
                    if let Err(e) =
                        reader.read_entries_with_callback_and_callback(&resolve, &reject)
                    {
                        let _ = reject.call1(&wasm_bindgen::JsValue::NULL, &e);
                    }
                }))
                .await?;
                let batch: js_sys::Array = batch.dyn_into()?;
                if batch.length() == 0 {
                    break;
                }
                for child in batch.iter() {
                    children.push(child.dyn_into::<FileSystemEntry>()?);
                }
            }
            children.reverse();
            stack.extend(children);
        } else if entry.is_file() {
            let file_entry: FileSystemFileEntry = entry
                .clone()
                .dyn_into()
                .map_err(|_| ClientError::Js("a dropped file is not a file entry".into()))?;
            let file = JsFuture::from(js_sys::Promise::new(&mut |resolve, reject| {
                file_entry.file_with_callback_and_callback(&resolve, &reject);
            }))
            .await?;
            let file: File = file.dyn_into()?;
            let full = entry.full_path();
            let relative = full.trim_start_matches('/');
            // A loose file's path is just its name: keep paths only for files inside folders.
            let path = if relative.contains('/') {
                relative.to_owned()
            } else {
                String::new()
            };
            out.push(Picked { file, path });
        }
    }
    Ok(out)
}
