#![recursion_limit = "256"]
//! beamdrop: one crate, two targets. With `ssr` it is the server (signaling broker + SSR pages);
//! with `hydrate` it is the WASM client that moves files over WebRTC DataChannels.

pub mod app;
pub mod components;
pub mod pairing;
pub mod protocol;
pub mod reconnect;
pub mod seal;
pub mod transfer;
pub mod view;

#[cfg(feature = "ssr")]
pub mod cli;
#[cfg(feature = "hydrate")]
pub mod client;
#[cfg(feature = "ssr")]
pub mod server;

#[cfg(feature = "hydrate")]
#[wasm_bindgen::prelude::wasm_bindgen]
pub fn hydrate() {
    console_error_panic_hook::set_once();
    client::keep_for_offline();
    leptos::mount::hydrate_body(app::App);
}
