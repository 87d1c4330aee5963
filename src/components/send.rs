//! The sender's page: drop files, get a link, keep the tab open while receivers download.

use super::{human_size, hydrated, ErrorBanner, FileRow};
use leptos::prelude::*;
use leptos::web_sys::{self, FileList, HtmlInputElement};

/// What the sender's page shows; written by the client session, read by the view.
#[derive(Clone, Copy)]
pub struct SenderUi {
    pub link: RwSignal<Option<String>>,
    pub files: RwSignal<Vec<FileRow>>,
    /// Receivers with an open data channel.
    pub peers: RwSignal<usize>,
    pub error: RwSignal<Option<String>>,
}

impl SenderUi {
    fn new() -> Self {
        Self {
            link: RwSignal::new(None),
            files: RwSignal::new(Vec::new()),
            peers: RwSignal::new(0),
            error: RwSignal::new(None),
        }
    }
}

#[component]
pub fn SendPage() -> impl IntoView {
    let ui = SenderUi::new();
    let dragging = RwSignal::new(false);
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
        if let Some(list) = ev.data_transfer().and_then(|dt| dt.files()) {
            add_files(list);
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
                <span class="drop-sub">"or click to choose. They never touch our server."</span>
                <input type="file" multiple data-testid="file-input" on:change=on_change/>
            </label>
            <ErrorBanner error=ui.error/>
            {move || {
                ui.link
                    .get()
                    .filter(|_| !ui.files.with(Vec::is_empty))
                    .map(|link| {
                        view! {
                            <div class="share">
                                <p>"Share this link. Keep this tab open while they download."</p>
                                <a class="share-link" data-testid="share-link" href=link.clone() target="_blank">
                                    {link.clone()}
                                </a>
                                <p class="peers">
                                    "Receivers connected: "
                                    <strong data-testid="peer-count">{move || ui.peers.get()}</strong>
                                </p>
                            </div>
                        }
                    })
            }}
            <ul class="files">
                <For each=move || ui.files.get() key=FileRow::id let:row>
                    <li class="file" data-testid="file-item">
                        <span class="name">{row.display_name()}</span>
                        <span class="size">{human_size(row.meta.size)}</span>
                    </li>
                </For>
            </ul>
        </section>
    }
}
