//! One RTCPeerConnection to one remote peer, signaled through the broker with trickle ICE.
//! Every payload is sealed with the share key (the broker sees only ciphertext); candidates that
//! arrive before the remote description are held and applied after it.
//!
//! Paired without the server ([`crate::pairing`]), a connection has no outbox: it gathers all
//! its candidates first and its description travels as a code a person copies.

use super::signaling::Signaling;
use super::ClientError;
use crate::protocol::{ClientMsg, IceServer, PeerId, SignalPayload};
use crate::seal::ShareKey;
use crate::view::NetPath;
use futures::channel::mpsc::{unbounded, UnboundedReceiver};
use gloo_events::EventListener;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    RtcConfiguration, RtcDataChannel, RtcDataChannelEvent, RtcDataChannelInit, RtcIceCandidateInit,
    RtcIceGatheringState, RtcIceServer, RtcOfferOptions, RtcPeerConnection,
    RtcPeerConnectionIceEvent, RtcPeerConnectionState, RtcSdpType, RtcSessionDescriptionInit,
    RtcSignalingState,
};

/// How long a connection paired by hand gathers candidates at most (ms).
const GATHER_MS: u32 = 5_000;

/// What the connection reports, in order.
pub enum LinkEvent {
    /// The remote side opened a data channel (receiver side).
    Channel(RtcDataChannel),
    State(RtcPeerConnectionState),
}

/// Seals payloads for one direction (`me` → `remote`) and hands them to the broker.
#[derive(Clone)]
pub struct Outbox {
    pub signaling: Signaling,
    pub key: ShareKey,
    pub me: PeerId,
    pub remote: PeerId,
}

impl Outbox {
    pub fn send(&self, payload: &SignalPayload) {
        let sealed = serde_json::to_string(payload)
            .map_err(|e| ClientError::BadPayload(e.to_string()))
            .and_then(|plain| Ok(self.key.seal(self.me, self.remote, &plain)?));
        match sealed {
            Ok(payload) => self.signaling.send(ClientMsg::Signal {
                to: self.remote,
                payload,
            }),
            Err(e) => leptos::logging::warn!("cannot seal a signaling payload: {e}"),
        }
    }
}

/// Opens a payload `from` sealed for `me` with the share key. Fails (and nothing else happens)
/// when it was altered, sealed under another key or for another pair of peers.
pub fn open_payload(
    key: &ShareKey,
    from: PeerId,
    me: PeerId,
    sealed: &str,
) -> Result<SignalPayload, ClientError> {
    let plain = key.open(from, me, sealed)?;
    serde_json::from_str(&plain).map_err(|e| ClientError::BadPayload(e.to_string()))
}

fn configuration(ice_servers: &[IceServer]) -> RtcConfiguration {
    let config = RtcConfiguration::new();
    let servers = js_sys::Array::new();
    for s in ice_servers {
        let server = RtcIceServer::new();
        let urls: js_sys::Array = s.urls.iter().map(|u| JsValue::from_str(u)).collect();
        server.set_urls(&urls);
        if let Some(u) = &s.username {
            server.set_username(u);
        }
        if let Some(c) = &s.credential {
            server.set_credential(c);
        }
        servers.push(&server);
    }
    config.set_ice_servers(&servers);
    config
}

pub struct RtcLink {
    pc: RtcPeerConnection,
    /// Shared with the candidate listener; re-addressed when either page's signaling socket
    /// came back under a new peer id while this connection lived on. None when paired by hand.
    outbox: Rc<RefCell<Option<Outbox>>>,
    /// On offer glare (both sides restarting ICE at once) the polite side (the receiver) drops
    /// its own offer and answers; the other ignores the incoming one.
    polite: bool,
    has_remote_description: Cell<bool>,
    pending_candidates: RefCell<Vec<RtcIceCandidateInit>>,
    _listeners: [EventListener; 3],
}

impl RtcLink {
    pub fn new(
        outbox: Option<Outbox>,
        polite: bool,
        ice_servers: &[IceServer],
    ) -> Result<(Self, UnboundedReceiver<LinkEvent>), ClientError> {
        let pc = RtcPeerConnection::new_with_configuration(&configuration(ice_servers))?;

        let (events, rx) = unbounded();
        let outbox = Rc::new(RefCell::new(outbox));
        let on_candidate = {
            let outbox = outbox.clone();
            EventListener::new(&pc, "icecandidate", move |ev| {
                let Some(candidate) = ev
                    .dyn_ref::<RtcPeerConnectionIceEvent>()
                    .and_then(RtcPeerConnectionIceEvent::candidate)
                else {
                    return; // end of candidates
                };
                if let Some(outbox) = &*outbox.borrow() {
                    outbox.send(&SignalPayload::Candidate {
                        candidate: candidate.candidate(),
                        sdp_mid: candidate.sdp_mid(),
                        sdp_m_line_index: candidate.sdp_m_line_index(),
                    });
                }
            })
        };
        let on_state = {
            let events = events.clone();
            let pc2 = pc.clone();
            EventListener::new(&pc, "connectionstatechange", move |_| {
                let _ = events.unbounded_send(LinkEvent::State(pc2.connection_state()));
            })
        };
        let on_channel = EventListener::new(&pc, "datachannel", move |ev| {
            if let Some(ev) = ev.dyn_ref::<RtcDataChannelEvent>() {
                let _ = events.unbounded_send(LinkEvent::Channel(ev.channel()));
            }
        });
        Ok((
            Self {
                pc,
                outbox,
                polite,
                has_remote_description: Cell::new(false),
                pending_candidates: RefCell::new(Vec::new()),
                _listeners: [on_candidate, on_state, on_channel],
            },
            rx,
        ))
    }

    /// Signals for this connection go from now on through `signaling`, as `me`, to `remote`
    /// (a page's socket came back under a new peer id; the connection itself is unchanged).
    pub fn readdress(&self, signaling: Signaling, me: PeerId, remote: PeerId) {
        if let Some(outbox) = &mut *self.outbox.borrow_mut() {
            outbox.signaling = signaling;
            outbox.me = me;
            outbox.remote = remote;
        }
    }

    /// Sends `payload` to the remote peer through the broker.
    fn send(&self, payload: &SignalPayload) -> Result<(), ClientError> {
        match &*self.outbox.borrow() {
            Some(outbox) => {
                outbox.send(payload);
                Ok(())
            }
            None => Err(ClientError::Signaling(
                "paired without the server: nothing can be signaled".into(),
            )),
        }
    }

    /// Fresh ICE servers (TURN credentials) for the next ICE restart on this connection.
    pub fn set_ice_servers(&self, ice_servers: &[IceServer]) {
        if let Err(e) = self
            .pc
            .set_configuration_with_configuration(&configuration(ice_servers))
        {
            leptos::logging::warn!("could not update the ICE servers: {e:?}");
        }
    }

    /// An ordered, reliable channel (sender side; create before the offer).
    pub fn create_channel(&self, label: &str) -> RtcDataChannel {
        let init = RtcDataChannelInit::new();
        init.set_ordered(true);
        self.pc
            .create_data_channel_with_data_channel_dict(label, &init)
    }

    /// Creates the offer, applies it locally and sends it to the remote peer.
    pub async fn offer(&self) -> Result<(), ClientError> {
        let offer = JsFuture::from(self.pc.create_offer()).await?;
        let sdp = sdp_of(&offer)?;
        self.set_local(RtcSdpType::Offer, &sdp).await?;
        self.send(&SignalPayload::Offer { sdp })
    }

    /// Starts an ICE restart from this side (the connection object survived, its network path
    /// did not): a new offer with fresh ICE credentials, which the other side answers.
    pub async fn restart_ice(&self) -> Result<(), ClientError> {
        if self.outbox.borrow().is_none() {
            return Err(ClientError::Signaling(
                "paired without the server: no ICE restart".into(),
            ));
        }
        let options = RtcOfferOptions::new();
        options.set_ice_restart(true);
        let offer = JsFuture::from(self.pc.create_offer_with_rtc_offer_options(&options)).await?;
        let sdp = sdp_of(&offer)?;
        self.set_local(RtcSdpType::Offer, &sdp).await?;
        self.send(&SignalPayload::Offer { sdp })
    }

    /// The offer of a connection paired by hand: its description once every candidate is in.
    pub async fn offer_gathered(&self) -> Result<String, ClientError> {
        let offer = JsFuture::from(self.pc.create_offer()).await?;
        self.set_local(RtcSdpType::Offer, &sdp_of(&offer)?).await?;
        self.gathered().await
    }

    /// The answer to `offer` (a description rebuilt from a pairing code), once every candidate
    /// is in.
    pub async fn answer_gathered(&self, offer: &str) -> Result<String, ClientError> {
        self.set_remote(RtcSdpType::Offer, offer).await?;
        let answer = JsFuture::from(self.pc.create_answer()).await?;
        self.set_local(RtcSdpType::Answer, &sdp_of(&answer)?)
            .await?;
        self.gathered().await
    }

    /// Applies the answer to an offer made by [`RtcLink::offer_gathered`].
    pub async fn accept_answer(&self, answer: &str) -> Result<(), ClientError> {
        self.set_remote(RtcSdpType::Answer, answer).await
    }

    /// The local description once ICE gathering is complete (or after [`GATHER_MS`], with what
    /// was found by then).
    async fn gathered(&self) -> Result<String, ClientError> {
        let mut waited = 0;
        while self.pc.ice_gathering_state() != RtcIceGatheringState::Complete && waited < GATHER_MS
        {
            gloo_timers::future::TimeoutFuture::new(50).await;
            waited += 50;
        }
        self.pc
            .local_description()
            .map(|d| d.sdp())
            .ok_or_else(|| ClientError::Js("no local description".into()))
    }

    /// How this connection's bytes travel now, from the selected candidate pair in
    /// `getStats()`: relayed when either end of it is a TURN relay candidate. `None` before a
    /// pair is selected (or if the browser's stats say nothing usable).
    pub async fn path(&self) -> Option<NetPath> {
        let report = JsFuture::from(self.pc.get_stats()).await.ok()?;
        let mut stats = HashMap::new();
        for entry in js_sys::try_iter(&report).ok()?? {
            let entry: js_sys::Array = entry.ok()?.dyn_into().ok()?;
            if let Some(id) = entry.get(0).as_string() {
                stats.insert(id, entry.get(1));
            }
        }
        let text = |stat: &JsValue, key: &str| {
            js_sys::Reflect::get(stat, &JsValue::from_str(key))
                .ok()
                .and_then(|v| v.as_string())
        };
        let is = |stat: &JsValue, kind: &str| text(stat, "type").as_deref() == Some(kind);
        let selected = stats
            .values()
            .filter(|s| is(s, "transport"))
            .find_map(|t| text(t, "selectedCandidatePairId"))
            .and_then(|id| stats.get(&id))
            .or_else(|| {
                stats.values().find(|s| {
                    is(s, "candidate-pair")
                        && text(s, "state").as_deref() == Some("succeeded")
                        && js_sys::Reflect::get(s, &JsValue::from_str("nominated"))
                            .is_ok_and(|v| v.is_truthy())
                })
            })?;
        let end = |key: &str| {
            text(selected, key)
                .and_then(|id| stats.get(&id))
                .and_then(|c| text(c, "candidateType"))
        };
        let relayed = [end("localCandidateId"), end("remoteCandidateId")]
            .iter()
            .any(|t| t.as_deref() == Some("relay"));
        Some(if relayed {
            NetPath::Relayed
        } else {
            NetPath::Direct
        })
    }

    pub fn state(&self) -> RtcPeerConnectionState {
        self.pc.connection_state()
    }

    /// Applies one opened payload from the remote peer (answering an offer, first or ICE
    /// restart). `hello` and `rejected` are the sessions' business, not the connection's.
    pub async fn apply(&self, payload: SignalPayload) -> Result<(), ClientError> {
        match payload {
            SignalPayload::Hello { .. } | SignalPayload::Rejected | SignalPayload::Moved { .. } => {
            }
            SignalPayload::Offer { sdp } => {
                if self.pc.signaling_state() == RtcSignalingState::HaveLocalOffer {
                    if !self.polite {
                        return Ok(()); // ours stands; the other side answers it
                    }
                    let rollback = RtcSessionDescriptionInit::new(RtcSdpType::Rollback);
                    JsFuture::from(self.pc.set_local_description(&rollback)).await?;
                }
                self.set_remote(RtcSdpType::Offer, &sdp).await?;
                let answer = JsFuture::from(self.pc.create_answer()).await?;
                let sdp = sdp_of(&answer)?;
                self.set_local(RtcSdpType::Answer, &sdp).await?;
                self.send(&SignalPayload::Answer { sdp })?;
            }
            SignalPayload::Answer { sdp } => self.set_remote(RtcSdpType::Answer, &sdp).await?,
            SignalPayload::Candidate {
                candidate,
                sdp_mid,
                sdp_m_line_index,
            } => {
                let init = RtcIceCandidateInit::new(&candidate);
                init.set_sdp_mid(sdp_mid.as_deref());
                init.set_sdp_m_line_index(sdp_m_line_index);
                if self.has_remote_description.get() {
                    self.add_candidate(&init).await?;
                } else {
                    self.pending_candidates.borrow_mut().push(init);
                }
            }
        }
        Ok(())
    }

    /// Signaled through the broker (not paired by hand).
    pub fn signaled(&self) -> bool {
        self.outbox.borrow().is_some()
    }

    /// Whether the remote side's description (offer or answer) has been applied.
    pub fn has_remote_description(&self) -> bool {
        self.has_remote_description.get()
    }

    /// The SCTP transport's `maxMessageSize`, once negotiated.
    pub fn max_message_size(&self) -> Option<usize> {
        let sctp = js_sys::Reflect::get(&self.pc, &"sctp".into()).ok()?;
        let max = js_sys::Reflect::get(&sctp, &"maxMessageSize".into())
            .ok()?
            .as_f64()?;
        (max.is_finite() && max > 0.0).then_some(max as usize)
    }

    async fn set_local(&self, kind: RtcSdpType, sdp: &str) -> Result<(), ClientError> {
        let desc = RtcSessionDescriptionInit::new(kind);
        desc.set_sdp(sdp);
        JsFuture::from(self.pc.set_local_description(&desc)).await?;
        Ok(())
    }

    async fn set_remote(&self, kind: RtcSdpType, sdp: &str) -> Result<(), ClientError> {
        let desc = RtcSessionDescriptionInit::new(kind);
        desc.set_sdp(sdp);
        JsFuture::from(self.pc.set_remote_description(&desc)).await?;
        self.has_remote_description.set(true);
        let pending = std::mem::take(&mut *self.pending_candidates.borrow_mut());
        for init in pending {
            self.add_candidate(&init).await?;
        }
        Ok(())
    }

    async fn add_candidate(&self, init: &RtcIceCandidateInit) -> Result<(), ClientError> {
        JsFuture::from(
            self.pc
                .add_ice_candidate_with_opt_rtc_ice_candidate_init(Some(init)),
        )
        .await?;
        Ok(())
    }
}

impl Drop for RtcLink {
    fn drop(&mut self) {
        self.pc.close();
    }
}

fn sdp_of(description: &JsValue) -> Result<String, ClientError> {
    js_sys::Reflect::get(description, &"sdp".into())?
        .as_string()
        .ok_or_else(|| ClientError::Js("session description without sdp".into()))
}
