//! The receiver's page `/s/<share>#<secret>`: server-rendered availability, then a live file list.

use super::{human_size, hydrated, progress_text, ErrorBanner, FileRow, FileStatus, ProgressLine};
use crate::transfer::progress::Progress;
use crate::transfer::FileId;
use leptos::prelude::*;
use leptos_router::hooks::use_params_map;
use std::fmt;

/// Where the receiver's connection stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    ConnectingServer,
    WaitingForSender,
    ConnectingPeer,
    /// The signaling socket dropped before the peers connected; it is being reopened.
    Reconnecting,
    Connected,
    SenderGone,
    /// ICE failed: no network path between the two browsers.
    Unreachable,
    /// The signaling socket could not be opened or dropped before the peers connected.
    ServerLost(String),
    /// Nothing a retry fixes: a bad link, a share that is gone.
    Failed(String),
}

impl Phase {
    /// Still on the way to the sender, so the server is needed (and reconnected to).
    pub fn needs_server(&self) -> bool {
        matches!(
            self,
            Phase::ConnectingServer
                | Phase::WaitingForSender
                | Phase::ConnectingPeer
                | Phase::Reconnecting
        )
    }

    /// Failures a fresh attempt may fix.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Phase::SenderGone | Phase::Unreachable | Phase::ServerLost(_)
        )
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::ConnectingServer => f.write_str("Connecting…"),
            Phase::WaitingForSender => f.write_str("Waiting for the sender…"),
            Phase::ConnectingPeer => f.write_str("Connecting to the sender…"),
            Phase::Reconnecting => f.write_str("Lost the server for a moment; reconnecting…"),
            Phase::Connected => f.write_str("Connected to the sender"),
            Phase::SenderGone => f.write_str("The sender went away"),
            Phase::Unreachable => f.write_str(
                "Could not connect to the sender (ICE failed): the two devices cannot reach each other",
            ),
            Phase::ServerLost(why) => write!(f, "Lost the connection to the server: {why}"),
            Phase::Failed(why) => write!(f, "Connection failed: {why}"),
        }
    }
}

/// What the receiver's page shows; written by the client session, read by the view.
#[derive(Clone, Copy)]
pub struct ReceiverUi {
    pub phase: RwSignal<Phase>,
    pub files: RwSignal<Vec<FileRow>>,
    pub error: RwSignal<Option<String>>,
}

/// Whether a share is live right now (asked during SSR, so the first HTML already says so).
#[server]
pub async fn share_available(share: String) -> Result<bool, ServerFnError> {
    use crate::protocol::ShareId;
    let state = use_context::<crate::server::AppState>()
        .ok_or_else(|| ServerFnError::new("server state missing"))?;
    let Ok(share) = share.parse::<ShareId>() else {
        return Ok(false);
    };
    state
        .broker
        .share_owner(&share)
        .await
        .map(|owner| owner.is_some())
        .map_err(|e| ServerFnError::new(e.to_string()))
}

#[component]
pub fn ReceivePage() -> impl IntoView {
    let params = use_params_map();
    let share = move || params.read().get("share").unwrap_or_default();
    let available = Resource::new(share, share_available);
    view! {
        <section class="card">
            <h1>"Receive files"</h1>
            <Suspense fallback=|| view! { <p class="notice">"Looking up this share…"</p> }>
                {move || Suspend::new(async move {
                    match available.await {
                        Ok(available) => view! { <Receiver share=share() available/> }.into_any(),
                        Err(e) => view! {
                            <p class="error" role="alert" data-testid="error">{format!("Could not look up this share: {e}")}</p>
                        }.into_any(),
                    }
                })}
            </Suspense>
        </section>
    }
}

/// What the page says when the server did not know the share at render time. The page still
/// joins (and rejoins for a few seconds): a sender whose node is restarting is back moments later.
const UNAVAILABLE: &str = "This share is not available. The sender may have closed their tab, or the link is wrong. This page checks again for a few seconds.";

/// `available`: whether the server knew the share when it rendered the page.
#[component]
fn Receiver(share: String, available: bool) -> impl IntoView {
    let ui = ReceiverUi {
        phase: RwSignal::new(Phase::ConnectingServer),
        files: RwSignal::new(Vec::new()),
        error: RwSignal::new((!available).then(|| UNAVAILABLE.to_string())),
    };

    #[cfg(feature = "hydrate")]
    let session = {
        let session = StoredValue::new_local(None::<crate::client::receiver::ReceiverSession>);
        Effect::new(move |_| {
            if session.with_value(Option::is_none) {
                let started = crate::client::receiver::ReceiverSession::start(ui, share.clone());
                session.set_value(Some(started));
            }
        });
        session
    };
    #[cfg(not(feature = "hydrate"))]
    let _ = share;
    let request = move |file: FileId| {
        #[cfg(feature = "hydrate")]
        session.with_value(|s| {
            if let Some(s) = s {
                s.request(file);
            }
        });
        #[cfg(not(feature = "hydrate"))]
        let _ = file;
    };
    let connected = move || ui.phase.get() == Phase::Connected;
    let hydrated = hydrated();
    let download_all = move |_| {
        let ready: Vec<FileId> = ui.files.with_untracked(|rows| {
            rows.iter()
                .filter(|r| {
                    matches!(
                        r.status.get_untracked(),
                        FileStatus::Ready | FileStatus::Failed(_)
                    )
                })
                .map(FileRow::id)
                .collect()
        });
        for file in ready {
            request(file);
        }
    };
    let retry = move |_| {
        if let Some(window) = leptos::web_sys::window() {
            let _ = window.location().reload();
        }
    };
    let total = move || {
        ui.files.with(|rows| {
            rows.iter().fold(Progress::default(), |acc, r| {
                let p = r.progress.get();
                let moving = r.status.get() == FileStatus::Receiving;
                Progress {
                    done: acc.done + p.done,
                    total: acc.total + r.meta.size,
                    speed: acc.speed + if moving { p.speed } else { 0.0 },
                }
            })
        })
    };

    view! {
        <p class="phase" data-testid="status" data-hydrated=move || hydrated.get().to_string()>
            {move || ui.phase.get().to_string()}
        </p>
        <Show when=move || ui.phase.get().retryable()>
            <button data-testid="retry" on:click=retry>"Try again"</button>
        </Show>
        <ErrorBanner error=ui.error/>
        <Show when=move || !ui.files.with(Vec::is_empty)>
            <div class="summary">
                <span data-testid="total-progress">
                    {move || format!("All files: {}", progress_text(&total()))}
                </span>
                <button data-testid="download-all" disabled=move || !connected() on:click=download_all>
                    "Download all"
                </button>
            </div>
        </Show>
        <ul class="files">
            <For each=move || ui.files.get() key=FileRow::id let:row>
                {
                    let id = row.id();
                    let status = row.status.clone();
                    let status_text = status.clone();
                    let busy = move || {
                        matches!(
                            status.get(),
                            FileStatus::Requested | FileStatus::Receiving | FileStatus::Verifying
                        )
                    };
                    view! {
                        <li class="file" data-testid="file-item">
                            <span class="name">{row.display_name()}</span>
                            <span class="size">{human_size(row.meta.size)}</span>
                            <ProgressLine progress=row.progress.clone()/>
                            <span class="status" data-testid="file-status">
                                {move || status_text.get().to_string()}
                            </span>
                            <button
                                data-testid="download"
                                disabled=move || !connected() || busy()
                                on:click=move |_| request(id)
                            >
                                "Download"
                            </button>
                        </li>
                    }
                }
            </For>
        </ul>
    }
}
