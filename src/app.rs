//! The HTML shell, the root component and the routes.

use crate::components::{
    receive::{PairPage, ReceivePage},
    send::SendPage,
};
use leptos::prelude::*;
use leptos_meta::{provide_meta_context, MetaTags, Stylesheet, Title};
use leptos_router::components::{Route, Router, Routes, A};
use leptos_router::{path, SsrMode};

pub fn shell(options: LeptosOptions) -> impl IntoView {
    view! {
        <!DOCTYPE html>
        <html lang="en">
            <head>
                <meta charset="utf-8"/>
                <meta name="viewport" content="width=device-width, initial-scale=1"/>
                <meta name="color-scheme" content="light dark"/>
                <link rel="icon" href="/favicon.svg" type="image/svg+xml"/>
                <link rel="manifest" href="/manifest.webmanifest"/>
                <AutoReload options=options.clone()/>
                <HydrationScripts options/>
                <MetaTags/>
            </head>
            <body>
                <App/>
            </body>
        </html>
    }
}

#[component]
pub fn App() -> impl IntoView {
    provide_meta_context();
    view! {
        <Stylesheet id="leptos" href="/pkg/beamdrop.css"/>
        <Title text="beamdrop — send files browser to browser"/>
        <Router>
            <header class="top">
                <A href="/" attr:class="brand">"beamdrop"</A>
                <span class="tagline">"files go straight from browser to browser"</span>
            </header>
            <main>
                <Routes fallback=|| view! { <p class="notice">"Page not found."</p> }>
                    <Route path=path!("") view=SendPage/>
                    <Route path=path!("/s/:share") view=ReceivePage ssr=SsrMode::Async/>
                    <Route path=path!("/pair") view=PairPage/>
                </Routes>
            </main>
        </Router>
    }
}
