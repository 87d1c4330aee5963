//! The WASM client (feature `hydrate`): signaling socket, RTCPeerConnection, DataChannel, and the
//! sender / receiver sessions that drive the transfer engine. Browser callbacks become channel
//! events at once (gloo `EventListener`s, released on drop); the logic is async Rust.

pub mod channel;
pub mod handles;
pub mod opfs;
pub mod picker;
pub mod receiver;
pub mod rtc;
pub mod save;
pub mod sender;
pub mod signaling;
pub mod sink;
pub mod worker;
pub mod writable;

/// Registers the service worker (`public/sw.js`) that keeps the app shell, so that after one
/// visit the pages open with the server gone and two people can still pair by hand. Browsers
/// allow it only in a secure context (HTTPS, or localhost); elsewhere this does nothing.
pub fn keep_for_offline() {
    let Some(window) = web_sys::window() else {
        return;
    };
    let navigator = window.navigator();
    let has_workers = js_sys::Reflect::has(&navigator, &"serviceWorker".into()).unwrap_or(false);
    if !has_workers || !window.is_secure_context() {
        return;
    }
    let registered = navigator.service_worker().register("/sw.js");
    wasm_bindgen_futures::spawn_local(async move {
        if let Err(e) = wasm_bindgen_futures::JsFuture::from(registered).await {
            leptos::logging::warn!("no offline copy of the app: {}", js_message(&e));
        }
    });
}

use crate::seal::SealError;
use crate::transfer::TransferError;
use wasm_bindgen::{JsCast, JsValue};

/// Everything that can fail in the browser client.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClientError {
    #[error("browser: {0}")]
    Js(String),
    #[error("signaling: {0}")]
    Signaling(String),
    #[error("the data channel closed")]
    ChannelClosed,
    #[error(transparent)]
    Transfer(#[from] TransferError),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error(transparent)]
    Pairing(#[from] crate::pairing::PairingError),
    #[error("unreadable signaling payload: {0}")]
    BadPayload(String),
    #[error(
        "this file is being received in another tab or window of this browser (what arrived \
         here so far is kept)"
    )]
    FileBusy,
}

impl From<JsValue> for ClientError {
    fn from(value: JsValue) -> Self {
        ClientError::Js(js_message(&value))
    }
}

/// A readable message for a thrown JS value.
pub fn js_message(value: &JsValue) -> String {
    if let Some(e) = value.dyn_ref::<js_sys::Error>() {
        return String::from(e.message());
    }
    value.as_string().unwrap_or_else(|| format!("{value:?}"))
}

pub fn window() -> Result<web_sys::Window, ClientError> {
    web_sys::window().ok_or_else(|| ClientError::Js("no window".into()))
}

/// Hex of `n` random bytes from the browser's CSPRNG.
pub fn random_hex(n: usize) -> Result<String, ClientError> {
    let mut bytes = vec![0u8; n];
    window()?
        .crypto()?
        .get_random_values_with_u8_array(&mut bytes)?;
    Ok(hex::encode(bytes))
}

/// Milliseconds on a monotonic clock.
pub fn now_ms() -> f64 {
    web_sys::window()
        .and_then(|w| w.performance())
        .map(|p| p.now())
        .unwrap_or_else(js_sys::Date::now)
}
