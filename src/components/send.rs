//! The sender's page: drop files, get a link, keep the tab open while receivers download.

use super::{human_size, hydrated, qr_svg, CodeInput, ErrorBanner, ProgressLine};
use crate::transfer::FileId;
use crate::view::{FileRow, SenderUi};
use leptos::prelude::*;
use leptos::web_sys::{self, FileList, HtmlInputElement};

#[component]
pub fn SendPage() -> impl IntoView {
    let ui = SenderUi::new();
    let dragging = RwSignal::new(false);
    let copied = RwSignal::new(false);
    let hydrated = hydrated();

    // The session lives in the browser only: started after hydration, dropped with the page.
    #[cfg(feature = "hydrate")]
    let session = {
        let session = StoredValue::new_local(None::<crate::client::sender::SenderSession>);
        Effect::new(move |_| {
            if session.with_value(Option::is_none) {
                session.set_value(Some(crate::client::sender::SenderSession::start(ui)));
            }
        });
        session
    };
    let add_files = move |list: FileList| {
        #[cfg(feature = "hydrate")]
        session.with_value(|s| {
            if let Some(s) = s {
                s.add_files(&list);
            }
        });
        #[cfg(not(feature = "hydrate"))]
        let _ = list;
    };
    let remove_file = move |file: FileId| {
        #[cfg(feature = "hydrate")]
        session.with_value(|s| {
            if let Some(s) = s {
                s.remove_file(file);
            }
        });
        #[cfg(not(feature = "hydrate"))]
        let _ = file;
    };
    let restore_files = move || {
        #[cfg(feature = "hydrate")]
        session.with_value(|s| {
            if let Some(s) = s {
                s.restore_files();
            }
        });
    };
    let pair_answer = RwSignal::new(String::new());
    let pair = move |answer: Option<String>| {
        #[cfg(feature = "hydrate")]
        session.with_value(|s| {
            if let Some(s) = s {
                match answer {
                    None => s.pair_start(),
                    Some(code) => s.pair_answer(code),
                }
            }
        });
        #[cfg(not(feature = "hydrate"))]
        let _ = answer;
    };
    let copy_link = move |_| {
        let Some(link) = ui.link.get_untracked() else {
            return;
        };
        if let Some(window) = web_sys::window() {
            let _ = window.navigator().clipboard().write_text(&link);
            copied.set(true);
        }
    };

    let on_change = move |ev: web_sys::Event| {
        let input: HtmlInputElement = event_target(&ev);
        if let Some(list) = input.files() {
            add_files(list);
        }
        input.set_value("");
    };
    let on_drop = move |ev: web_sys::DragEvent| {
        ev.prevent_default();
        dragging.set(false);
        #[cfg(feature = "hydrate")]
        if let Some(dt) = ev.data_transfer() {
            session.with_value(|s| {
                if let Some(s) = s {
                    s.add_dropped(&dt);
                }
            });
        }
    };
    let on_dragover = move |ev: web_sys::DragEvent| {
        ev.prevent_default();
        dragging.set(true);
    };

    view! {
        <section class="card" data-hydrated=move || hydrated.get().to_string()>
            <h1>"Send files"</h1>
            <label
                class="drop-zone"
                class:dragging=move || dragging.get()
                data-testid="drop-zone"
                on:dragover=on_dragover
                on:dragleave=move |_| dragging.set(false)
                on:drop=on_drop
            >
                <span class="drop-title">"Drop files here"</span>
                <span class="drop-sub">"or click to choose. They go straight to the receiver, never through our server."</span>
                <input type="file" multiple data-testid="file-input" on:change=on_change/>
            </label>
            <label class="folder-pick">
                "Share a whole folder…"
                <input type="file" prop:webkitdirectory=true data-testid="folder-input" on:change=on_change/>
            </label>
            <ErrorBanner error=ui.error/>
            <Show when=move || !ui.missing.with(Vec::is_empty)>
                <div class="notice" role="status" data-testid="missing-files">
                    <p>
                        "This page was reloaded: the link still works, but the browser did not keep these files. Add them again and receivers carry on where they stopped:"
                    </p>
                    <ul>
                        {move || ui.missing.get().into_iter().map(|name| view! { <li>{name}</li> }).collect_view()}
                    </ul>
                    <Show when=move || { ui.restorable.get() > 0 }>
                        <button data-testid="restore-files" on:click=move |_| restore_files()>
                            "Allow this page to read the dropped files again"
                        </button>
                    </Show>
                </div>
            </Show>
            <Show when=move || ui.reconnecting.get()>
                <p class="notice" role="status" data-testid="server-status">
                    "Reconnecting to the server… Receivers already connected carry on; the link works again for new ones once this is back."
                </p>
            </Show>
            {move || {
                ui.link
                    .get()
                    .filter(|_| !ui.files.with(Vec::is_empty) || !ui.missing.with(Vec::is_empty))
                    .map(|link| {
                        let qr = qr_svg(&link).unwrap_or_default();
                        view! {
                            <div class="share">
                                <div class="share-text">
                                    <p>"Share this link. Keep this tab open while they download."</p>
                                    <a class="share-link" data-testid="share-link" href=link.clone() target="_blank">
                                        {link.clone()}
                                    </a>
                                    <button class="secondary" data-testid="copy-link" on:click=copy_link>
                                        {move || if copied.get() { "Copied" } else { "Copy link" }}
                                    </button>
                                    <p class="peers">
                                        "Receivers connected: "
                                        <strong data-testid="peer-count">{move || ui.peers.get()}</strong>
                                        " · sent "
                                        <strong data-testid="bytes-sent" data-bytes=move || ui.sent.get().to_string()>
                                            {move || human_size(ui.sent.get())}
                                        </strong>
                                    </p>
                                </div>
                                <div class="qr" data-testid="qr" aria-label="QR code of the share link" inner_html=qr></div>
                            </div>
                        }
                    })
            }}
            <Show when=move || !ui.files.with(Vec::is_empty)>
                <div class="pairing">
                    <button
                        class="secondary"
                        data-testid="pair-start"
                        title="For a receiver this server cannot reach, or with no server at all: copy two codes between the devices"
                        on:click=move |_| {
                            pair_answer.set(String::new());
                            pair(None)
                        }
                    >
                        "Pair without the server"
                    </button>
                    {move || {
                        ui.pair_code
                            .get()
                            .map(|code| {
                                let qr = qr_svg(&code).unwrap_or_default();
                                view! {
                                    <div class="pair-step">
                                        <div class="pair-text">
                                            <label for="pair-offer">
                                                "1. On the receiving device open " <code>"/pair"</code>
                                                " on this site (once visited, it opens without the server) and paste this code, or scan it:"
                                            </label>
                                            <textarea id="pair-offer" readonly rows="4" data-testid="pair-offer" prop:value=code></textarea>
                                            <label for="pair-answer">"2. Paste the answer it shows:"</label>
                                            <CodeInput id="pair-answer" testid="pair-answer" value=pair_answer/>
                                            <button data-testid="pair-connect" on:click=move |_| pair(Some(pair_answer.get_untracked()))>
                                                "Connect"
                                            </button>
                                        </div>
                                        <div class="qr" aria-label="QR code of the pairing code" inner_html=qr></div>
                                    </div>
                                }
                            })
                    }}
                    {move || {
                        ui.pair_error
                            .get()
                            .map(|message| view! { <p class="error" role="alert" data-testid="pair-error">{message}</p> })
                    }}
                </div>
            </Show>
            <ul class="files">
                <For each=move || ui.files.get() key=FileRow::id let:row>
                    {
                        let id = row.id();
                        view! {
                            <li class="file" data-testid="file-item">
                                <span class="name">{row.display_name()}</span>
                                <span class="size">{human_size(row.meta.size)}</span>
                                <span class="actions">
                                    <button
                                        class="secondary"
                                        data-testid="remove"
                                        aria-label=format!("Remove {}", row.display_name())
                                        on:click=move |_| remove_file(id)
                                    >
                                        "Remove"
                                    </button>
                                </span>
                            </li>
                        }
                    }
                </For>
            </ul>
            <Show when=move || !ui.receivers.with(Vec::is_empty)>
                <h2>"Receivers"</h2>
                <ul class="receivers">
                    <For each=move || ui.receivers.get() key=|r| r.peer let:r>
                        {
                            let state = r.state.clone();
                            let path = r.path.clone();
                            view! {
                                <li class="receiver" data-testid="receiver">
                                    <span class="name">{r.label.clone()}</span>
                                    <span class="status">
                                        {move || state.get()}
                                        {move || path.get().map(|p| view! { " · " <span class="path" data-testid="path">{p.to_string()}</span> })}
                                    </span>
                                    <ProgressLine progress=r.progress.clone()/>
                                </li>
                            }
                        }
                    </For>
                </ul>
            </Show>
        </section>
    }
}
