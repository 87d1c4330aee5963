//! Hands finished bytes to the browser as a normal download with the original name.

use super::{window, ClientError};
use wasm_bindgen::JsCast;
use web_sys::{Blob, BlobPropertyBag, HtmlAnchorElement, Url};

/// Saves bytes held in memory.
pub fn save(name: &str, mime: &str, bytes: &[u8]) -> Result<(), ClientError> {
    let parts = js_sys::Array::of1(&js_sys::Uint8Array::from(bytes));
    let options = BlobPropertyBag::new();
    // Never the sender's MIME type: a blob URL on our origin typed text/html or SVG could run
    // script if a browser ever displayed it instead of downloading it.
    let _ = mime;
    options.set_type("application/octet-stream");
    let blob = Blob::new_with_u8_array_sequence_and_options(&parts, &options)?;
    save_blob(name, &blob)
}

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
