//! An RTCDataChannel as two streams: its events, and "the send queue drained" wake-ups that
//! the one task sending on it awaits for backpressure (no timers, no per-chunk acks).

use super::ClientError;
use crate::transfer::PeerMsg;
use futures::channel::mpsc::{unbounded, UnboundedReceiver};
use futures::StreamExt;
use gloo_events::EventListener;
use wasm_bindgen::JsCast;
use web_sys::{MessageEvent, RtcDataChannel, RtcDataChannelState, RtcDataChannelType};

pub enum ChannelEvent {
    Open,
    Text(String),
    Binary(js_sys::ArrayBuffer),
    Closed,
}

/// Takes binary messages in the channel's own listener.
pub type BinaryHandler = Box<dyn Fn(&js_sys::ArrayBuffer)>;

/// Owns the channel's listeners; dropping it ends the event stream.
pub struct Channel {
    pub dc: RtcDataChannel,
    _listeners: [EventListener; 5],
}

/// Held by the single task that sends bulk data on a channel.
pub struct Backpressure {
    dc: RtcDataChannel,
    drained: UnboundedReceiver<()>,
    high_water: u32,
}

impl Channel {
    /// `on_binary`, when given, takes every binary message right in the channel's listener (no
    /// hop through the event stream: the receiver's per-frame path); otherwise they are events.
    pub fn new(
        dc: RtcDataChannel,
        low_water: u32,
        high_water: u32,
        on_binary: Option<BinaryHandler>,
    ) -> (Self, UnboundedReceiver<ChannelEvent>, Backpressure) {
        dc.set_binary_type(RtcDataChannelType::Arraybuffer);
        dc.set_buffered_amount_low_threshold(low_water);
        let (events, rx) = unbounded();
        let (drained_tx, drained) = unbounded();
        let on_open = {
            let events = events.clone();
            EventListener::new(&dc, "open", move |_| {
                let _ = events.unbounded_send(ChannelEvent::Open);
            })
        };
        let on_message = {
            let events = events.clone();
            EventListener::new(&dc, "message", move |ev| {
                let Some(data) = ev.dyn_ref::<MessageEvent>().map(MessageEvent::data) else {
                    return;
                };
                let event = if let Some(text) = data.as_string() {
                    ChannelEvent::Text(text)
                } else if let Ok(buf) = data.dyn_into::<js_sys::ArrayBuffer>() {
                    if let Some(on_binary) = &on_binary {
                        on_binary(&buf);
                        return;
                    }
                    ChannelEvent::Binary(buf)
                } else {
                    return;
                };
                let _ = events.unbounded_send(event);
            })
        };
        let on_close = {
            let events = events.clone();
            let drained_tx = drained_tx.clone();
            EventListener::new(&dc, "close", move |_| {
                let _ = events.unbounded_send(ChannelEvent::Closed);
                let _ = drained_tx.unbounded_send(());
            })
        };
        let on_error = {
            let drained_tx = drained_tx.clone();
            EventListener::new(&dc, "error", move |_| {
                let _ = events.unbounded_send(ChannelEvent::Closed);
                let _ = drained_tx.unbounded_send(());
            })
        };
        let on_low = EventListener::new(&dc, "bufferedamountlow", move |_| {
            let _ = drained_tx.unbounded_send(());
        });
        let backpressure = Backpressure {
            dc: dc.clone(),
            drained,
            high_water,
        };
        (
            Self {
                dc,
                _listeners: [on_open, on_message, on_close, on_error, on_low],
            },
            rx,
            backpressure,
        )
    }
}

/// Sends one control message as a text frame.
pub fn send_msg(dc: &RtcDataChannel, msg: &PeerMsg) -> Result<(), ClientError> {
    let text = serde_json::to_string(msg).map_err(|e| ClientError::Js(e.to_string()))?;
    dc.send_with_str(&text)?;
    Ok(())
}

impl Backpressure {
    /// Sends one binary frame once the queue is under the high-water mark.
    pub async fn send(&mut self, frame: &[u8]) -> Result<(), ClientError> {
        while self.dc.buffered_amount() > self.high_water {
            if self.dc.ready_state() != RtcDataChannelState::Open {
                return Err(ClientError::ChannelClosed);
            }
            if self.drained.next().await.is_none() {
                return Err(ClientError::ChannelClosed);
            }
        }
        if self.dc.ready_state() != RtcDataChannelState::Open {
            return Err(ClientError::ChannelClosed);
        }
        self.dc.send_with_u8_array(frame)?;
        Ok(())
    }

    pub fn channel(&self) -> &RtcDataChannel {
        &self.dc
    }
}
