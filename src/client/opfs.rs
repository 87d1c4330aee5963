//! Where partial downloads live in the origin-private file system (OPFS), shared by the page and
//! the storage worker: `beamdrop/<share id>/<resume key>.part` (the bytes) and `.rec` (the record
//! of verified blocks).

use super::ClientError;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::{FileSystemDirectoryHandle, FileSystemGetDirectoryOptions, StorageManager};

/// The folder, under the origin's OPFS root, that holds every share's partial files.
const OPFS_DIR: &str = "beamdrop";

pub fn part_name(key: &str) -> String {
    format!("{key}.part")
}

pub fn record_name(key: &str) -> String {
    format!("{key}.rec")
}

/// `beamdrop/<share>` under the OPFS root; created when `create`, else an error if missing.
pub async fn share_dir(
    storage: StorageManager,
    share: &str,
    create: bool,
) -> Result<FileSystemDirectoryHandle, ClientError> {
    let root: FileSystemDirectoryHandle =
        JsFuture::from(storage.get_directory()).await?.dyn_into()?;
    let options = FileSystemGetDirectoryOptions::new();
    options.set_create(create);
    let ours: FileSystemDirectoryHandle =
        JsFuture::from(root.get_directory_handle_with_options(OPFS_DIR, &options))
            .await?
            .dyn_into()?;
    Ok(
        JsFuture::from(ours.get_directory_handle_with_options(share, &options))
            .await?
            .dyn_into()?,
    )
}
