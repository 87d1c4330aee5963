//! The receiver's pages: `/s/<share>#<secret>` (server-rendered availability, then a live file
//! list) and `/pair` (a pairing code pasted instead of a link, then the same list).

use super::{human_size, hydrated, progress_text, qr_svg, CodeInput, ErrorBanner, ProgressLine};
use crate::transfer::progress::Progress;
use crate::transfer::FileId;
use crate::view::{capitalized, FileRow, FileStatus, Phase, ReceiverUi};
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
                        Ok(available) => view! { <Receiver start=Start::Link(share()) available/> }.into_any(),
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

/// `/pair`: the receiving half of a pairing without the server. The sender's offer code goes in;
/// the answer's code comes out, to hand back; then the files are listed as through a link.
#[component]
pub fn PairPage() -> impl IntoView {
    let code = RwSignal::new(String::new());
    let started = RwSignal::new(None::<String>);
    let error = RwSignal::new(None::<String>);
    let answer = RwSignal::new(None::<String>);
    let hydrated = hydrated();
    let accept = move |_| {
        let text = code.get_untracked();
        match crate::pairing::Offer::from_code(&text) {
            Ok(_) => {
                error.set(None);
                started.set(Some(text));
            }
            Err(e) => error.set(Some(capitalized(&e.to_string()))),
        }
    };
    view! {
        <section class="card" data-hydrated=move || hydrated.get().to_string()>
            <h1>"Receive with a pairing code"</h1>
            {move || match started.get() {
                None => view! {
                    <label for="pair-offer-input">
                        "Paste the code the sender's page shows under “Pair without the server”:"
                    </label>
                    <CodeInput id="pair-offer-input" testid="pair-offer-input" value=code/>
                    <button data-testid="pair-accept" on:click=accept>"Answer it"</button>
                    <ErrorBanner error/>
                }
                .into_any(),
                Some(offer) => view! {
                    {move || {
                        answer
                            .get()
                            .map(|code| {
                                let qr = qr_svg(&code).unwrap_or_default();
                                view! {
                                    <div class="pair-step">
                                        <div class="pair-text">
                                            <label for="pair-answer-code">
                                                "Give this answer to the sender's page (copy it, or let it be scanned):"
                                            </label>
                                            <textarea id="pair-answer-code" readonly rows="4" data-testid="pair-answer-code" prop:value=code></textarea>
                                        </div>
                                        <div class="qr" aria-label="QR code of the answer" inner_html=qr></div>
                                    </div>
                                }
                            })
                    }}
                    <Receiver start=Start::Paired { code: offer, answer } available=true/>
                }
                .into_any(),
            }}
        </section>
    }
}

/// How a receiver's session begins (read only in the browser, where the session runs).
#[derive(Clone)]
#[cfg_attr(not(feature = "hydrate"), allow(dead_code))]
enum Start {
    /// Through the share link `/s/<share>#<secret>`.
    Link(String),
    /// From a pairing code pasted at `/pair`; the answer's code goes to `answer`.
    Paired {
        code: String,
        answer: RwSignal<Option<String>>,
    },
}

/// `available`: whether the server knew the share when it rendered the page.
#[component]
fn Receiver(start: Start, available: bool) -> impl IntoView {
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
                use crate::client::receiver::ReceiverSession;
                let started = match start.clone() {
                    Start::Link(share) => ReceiverSession::start(ui, share),
                    Start::Paired { code, answer } => ReceiverSession::paired(ui, &code, answer),
                };
                session.set_value(Some(started));
            }
        });
        session
    };
    #[cfg(not(feature = "hydrate"))]
    let _ = start;
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
