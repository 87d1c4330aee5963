//! What the sender dropped, remembered across a reload of its page where the browser allows it:
//! Chromium gives dropped items File System Access handles, which can be kept in IndexedDB and,
//! after a reload, read again once the person allows it (one prompt per dropped item: dropping a
//! folder is one). Elsewhere, and for files chosen with the file input, the page lists the files
//! to add again instead.
//!
//! Per share, the store keeps the handles of the dropped items (files or folders) as dropped;
//! restoring walks them again, and the session keeps only the files its share still offered.

use super::picker::Picked;
use super::{js_message, ClientError};
use idb::{Database, DatabaseEvent, Factory, ObjectStoreParams, TransactionMode};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{DataTransfer, File, FileSystemDirectoryHandle, FileSystemFileHandle};

const DB: &str = "beamdrop";
const STORE: &str = "dropped";

fn idb_error(e: idb::Error) -> ClientError {
    ClientError::Js(format!("IndexedDB: {e}"))
}

/// Calls `obj.method(...args)` for browser methods web-sys keeps behind its unstable flag.
fn call(obj: &JsValue, method: &str, args: &[JsValue]) -> Result<JsValue, ClientError> {
    let f: js_sys::Function = js_sys::Reflect::get(obj, &method.into())?
        .dyn_into()
        .map_err(|_| ClientError::Js(format!("no {method} here")))?;
    let args: js_sys::Array = args.iter().collect();
    Ok(f.apply(obj, &args)?)
}

/// The handles of what is being dropped, where the browser gives them. Must run inside the
/// drop event (the browser empties the list afterwards); the promises resolve later.
pub fn dropped(dt: &DataTransfer) -> Option<Vec<js_sys::Promise>> {
    let items = dt.items();
    let mut promises = Vec::new();
    for item in (0..items.length()).filter_map(|i| items.get(i)) {
        if item.kind() != "file" {
            continue;
        }
        let promise = call(&item, "getAsFileSystemHandle", &[]).ok()?;
        promises.push(promise.dyn_into().ok()?);
    }
    (!promises.is_empty()).then_some(promises)
}

/// Every file under the dropped items, with paths relative to the drop (as the entries walk gives
/// them), and the items' handles to keep.
pub async fn walk(
    promises: Vec<js_sys::Promise>,
) -> Result<(Vec<Picked>, Vec<JsValue>), ClientError> {
    let mut roots = Vec::new();
    for promise in promises {
        let handle = JsFuture::from(promise).await?;
        if !handle.is_null() && !handle.is_undefined() {
            roots.push(handle);
        }
    }
    let files = files_under(&roots).await?;
    Ok((files, roots))
}

/// The files under `roots` (file or folder handles): a loose file has no path, a file in a
/// folder its path from the folder's name down.
pub async fn files_under(roots: &[JsValue]) -> Result<Vec<Picked>, ClientError> {
    let mut out = Vec::new();
    let mut stack: Vec<(JsValue, String)> = roots
        .iter()
        .rev()
        .map(|h| (h.clone(), String::new()))
        .collect();
    while let Some((handle, prefix)) = stack.pop() {
        if let Some(file) = handle.dyn_ref::<FileSystemFileHandle>() {
            let file: File = JsFuture::from(file.get_file()).await?.dyn_into()?;
            let path = if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}{}", file.name())
            };
            out.push(Picked { file, path });
        } else if let Some(dir) = handle.dyn_ref::<FileSystemDirectoryHandle>() {
            let prefix = format!("{prefix}{}/", dir.name());
            let mut children = Vec::new();
            let entries = dir.values();
            loop {
                let next = JsFuture::from(entries.next()?).await?;
                if js_sys::Reflect::get(&next, &"done".into())?.is_truthy() {
                    break;
                }
                children.push(js_sys::Reflect::get(&next, &"value".into())?);
            }
            // Depth first, in the order the folder lists them.
            for child in children.into_iter().rev() {
                stack.push((child, prefix.clone()));
            }
        }
    }
    Ok(out)
}

/// Whether the page may read `handle` now ("granted"), only after asking ("prompt"), or not.
pub async fn permission(handle: &JsValue, ask: bool) -> String {
    let options = js_sys::Object::new();
    let _ = js_sys::Reflect::set(&options, &"mode".into(), &"read".into());
    let method = if ask {
        "requestPermission"
    } else {
        "queryPermission"
    };
    let answer = match call(handle, method, &[options.into()]) {
        Ok(promise) => match promise.dyn_into::<js_sys::Promise>() {
            Ok(promise) => JsFuture::from(promise).await,
            Err(v) => Ok(v),
        },
        Err(e) => Err(JsValue::from_str(&e.to_string())),
    };
    match answer {
        Ok(state) => state.as_string().unwrap_or_default(),
        Err(e) => {
            leptos::logging::warn!("permission for a dropped file: {}", js_message(&e));
            "denied".into()
        }
    }
}

async fn open() -> Result<Database, ClientError> {
    let factory = Factory::new().map_err(idb_error)?;
    let mut request = factory.open(DB, Some(1)).map_err(idb_error)?;
    request.on_upgrade_needed(|event| {
        let created = event
            .database()
            .and_then(|db| db.create_object_store(STORE, ObjectStoreParams::new()));
        if let Err(e) = created {
            leptos::logging::warn!("IndexedDB upgrade: {e}");
        }
    });
    request.await.map_err(idb_error)
}

/// Keeps `roots` (handles) as what share `share` was made of; an empty list forgets the share.
pub async fn save(share: &str, roots: &[JsValue]) -> Result<(), ClientError> {
    let db = open().await?;
    let tx = db
        .transaction(&[STORE], TransactionMode::ReadWrite)
        .map_err(idb_error)?;
    let store = tx.object_store(STORE).map_err(idb_error)?;
    let key = JsValue::from_str(share);
    if roots.is_empty() {
        store
            .delete(key)
            .map_err(idb_error)?
            .await
            .map_err(idb_error)?;
    } else {
        let list: js_sys::Array = roots.iter().collect();
        store
            .put(&list, Some(&key))
            .map_err(idb_error)?
            .await
            .map_err(idb_error)?;
    }
    tx.commit().map_err(idb_error)?.await.map_err(idb_error)?;
    db.close();
    Ok(())
}

/// The handles kept for share `share` (none if nothing was dropped, or no IndexedDB here).
pub async fn load(share: &str) -> Result<Vec<JsValue>, ClientError> {
    let db = open().await?;
    let tx = db
        .transaction(&[STORE], TransactionMode::ReadOnly)
        .map_err(idb_error)?;
    let store = tx.object_store(STORE).map_err(idb_error)?;
    let value = store
        .get(JsValue::from_str(share))
        .map_err(idb_error)?
        .await
        .map_err(idb_error)?;
    db.close();
    Ok(value
        .and_then(|v| v.dyn_into::<js_sys::Array>().ok())
        .map(|a| a.iter().collect())
        .unwrap_or_default())
}
