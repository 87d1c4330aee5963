//! The receiver's page `/s/<share>#<secret>`: server-rendered availability, then a live file list.

use super::{human_size, hydrated, progress_text, ErrorBanner, ProgressLine};
use crate::transfer::progress::Progress;
use crate::transfer::FileId;
use crate::view::{FileRow, FileStatus, Phase, ReceiverUi};
use leptos::prelude::*;
use leptos_router::hooks::use_params_map;

/// Whether a share is live right now (asked during SSR, so the first HTML already says so).
#[server]
pub async fn share_available(share: String) -> Result<bool, ServerFnError> {
    crate::server::share_is_live(&share)
        .await
        .map_err(ServerFnError::new)
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
        path: RwSignal::new(None),
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
    // "Save as…" where the browser has a save dialog (known only once hydrated).
    let save_dialog = RwSignal::new(false);
    #[cfg(feature = "hydrate")]
    Effect::new(move |_| save_dialog.set(crate::client::save::can_pick_file()));
    // What the buttons ask of the session (which exists only in the browser).
    #[derive(Clone, Copy)]
    #[cfg_attr(not(feature = "hydrate"), allow(dead_code))]
    enum Action {
        Download(FileId),
        SaveAs(FileId),
        Cancel(FileId),
        DownloadAll,
        Retry,
    }
    let act = move |action: Action| {
        #[cfg(feature = "hydrate")]
        session.with_value(|s| {
            if let Some(s) = s {
                match action {
                    Action::Download(file) => s.request(file),
                    Action::SaveAs(file) => s.save_as(file),
                    Action::Cancel(file) => s.cancel(file),
                    Action::DownloadAll => s.download_all(),
                    Action::Retry => s.retry(),
                }
            }
        });
        #[cfg(not(feature = "hydrate"))]
        let _ = action;
    };
    let connected = move || ui.phase.get() == Phase::Connected;
    let hydrated = hydrated();
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
            {move || {
                ui.path
                    .get()
                    .filter(|_| ui.phase.get() == Phase::Connected)
                    .map(|path| view! { " · " <span class="path" data-testid="path">{path.to_string()}</span> })
            }}
        </p>
        <Show when=move || ui.phase.get().retryable()>
            <button data-testid="retry" on:click=move |_| act(Action::Retry)>"Try again"</button>
        </Show>
        <ErrorBanner error=ui.error/>
        <Show when=move || !ui.files.with(Vec::is_empty)>
            <div class="summary">
                <span data-testid="total-progress">
                    {move || format!("All files: {}", progress_text(&total()))}
                </span>
                <button data-testid="download-all" disabled=move || !connected() on:click=move |_| act(Action::DownloadAll)>
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
                    let busy = move || status.get().busy();
                    let name = row.display_name();
                    view! {
                        <li class="file" data-testid="file-item">
                            <span class="name" data-testid="file-name">{name.clone()}</span>
                            <span class="size">{human_size(row.meta.size)}</span>
                            <ProgressLine progress=row.progress.clone()/>
                            <span class="status" data-testid="file-status">
                                {move || status_text.get().to_string()}
                            </span>
                            <span class="actions">
                            <Show
                                when=busy
                                fallback=move || view! {
                                    <button
                                        data-testid="download"
                                        disabled=move || !connected()
                                        on:click=move |_| act(Action::Download(id))
                                    >
                                        "Download"
                                    </button>
                                    <Show when=move || save_dialog.get()>
                                        <button
                                            class="secondary"
                                            data-testid="save-as"
                                            title="Choose where to save it: written there directly, no copy"
                                            disabled=move || !connected()
                                            on:click=move |_| act(Action::SaveAs(id))
                                        >
                                            "Save as…"
                                        </button>
                                    </Show>
                                }
                            >
                                <button
                                    class="secondary"
                                    data-testid="cancel"
                                    aria-label=format!("Stop downloading {name}")
                                    on:click=move |_| act(Action::Cancel(id))
                                >
                                    "Stop"
                                </button>
                            </Show>
                            </span>
                        </li>
                    }
                }
            </For>
        </ul>
    }
}
