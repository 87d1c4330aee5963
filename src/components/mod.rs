//! Page components. The state they show lives in `crate::view`, written by the client code.

pub mod receive;
pub mod send;

use crate::transfer::progress::{human_duration, Progress};
use leptos::prelude::*;

/// Human-readable byte counts (binary units, one decimal).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// "12.0 MiB of 48.0 MiB · 15.3 MB/s · 3 s left".
pub fn progress_text(p: &Progress) -> String {
    let mut text = format!("{} of {}", human_size(p.done), human_size(p.total));
    if p.speed > 0.0 && p.done < p.total {
        text += &format!(" · {:.1} MB/s", p.speed / 1e6);
        if let Some(eta) = p.eta_secs() {
            text += &format!(" · {} left", human_duration(eta));
        }
    }
    text
}

/// `text` (a link, a pairing code) as a QR code (SVG markup), for a phone in the same room.
pub fn qr_svg(text: &str) -> Option<String> {
    use qrcode::render::svg;
    let code = qrcode::QrCode::new(text.as_bytes()).ok()?;
    Some(
        code.render::<svg::Color>()
            .min_dimensions(176, 176)
            .dark_color(svg::Color("#000000"))
            .light_color(svg::Color("#ffffff"))
            .build(),
    )
}

/// A box to paste a pairing code into (`value` follows what is typed or pasted).
#[component]
pub fn CodeInput(id: &'static str, testid: &'static str, value: RwSignal<String>) -> impl IntoView {
    view! {
        <textarea
            id=id
            rows="4"
            data-testid=testid
            prop:value=move || value.get()
            on:input=move |ev| value.set(event_target_value(&ev))
        ></textarea>
    }
}

/// A progress bar with its text, for one file or one receiver.
#[component]
pub fn ProgressLine(progress: ArcRwSignal<Progress>) -> impl IntoView {
    let bar = progress.clone();
    view! {
        <progress max="1" value=move || bar.get().fraction()></progress>
        <span class="progress-text">{move || progress_text(&progress.get())}</span>
    }
}

/// `true` once this page runs in the browser (effects never run during SSR). Rendered as
/// `data-hydrated` so tests and styles can tell a live page from server-rendered HTML.
pub fn hydrated() -> ReadSignal<bool> {
    let (hydrated, set_hydrated) = signal(false);
    Effect::new(move |_| set_hydrated.set(true));
    hydrated
}

/// The error banner (`data-testid="error"`), shown while `error` holds a message.
#[component]
pub fn ErrorBanner(error: RwSignal<Option<String>>) -> impl IntoView {
    move || {
        error.get().map(|message| {
            view! { <p class="error" role="alert" data-testid="error">{message}</p> }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_a_person_would_write_them() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1024), "1.0 KiB");
        assert_eq!(human_size(48 * 1024 * 1024), "48.0 MiB");
        assert_eq!(human_size(1536 * 1024 * 1024), "1.5 GiB");
    }

    #[test]
    fn progress_reads_with_speed_and_time_left() {
        let p = Progress {
            done: 12 * 1024 * 1024,
            total: 48 * 1024 * 1024,
            speed: 15_300_000.0,
        };
        assert_eq!(
            progress_text(&p),
            "12.0 MiB of 48.0 MiB · 15.3 MB/s · 2 s left"
        );
        let done = Progress {
            done: 5,
            total: 5,
            speed: 1.0,
        };
        assert_eq!(progress_text(&done), "5 B of 5 B");
    }
}
