//! Page components and the small view state they share with the client code.

pub mod receive;
pub mod send;

use crate::transfer::{FileId, FileMeta};
use leptos::prelude::*;
use std::fmt;

/// Where one file stands, as shown in its `file-status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileStatus {
    Ready,
    Requested,
    Receiving,
    Verifying,
    Verified,
    Failed(String),
}

impl fmt::Display for FileStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileStatus::Ready => f.write_str("ready"),
            FileStatus::Requested => f.write_str("waiting for sender"),
            FileStatus::Receiving => f.write_str("transferring"),
            FileStatus::Verifying => f.write_str("verifying"),
            FileStatus::Verified => f.write_str("verified"),
            FileStatus::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

/// One row of a file list. Progress and status are their own signals so a row updates alone.
#[derive(Clone, Debug)]
pub struct FileRow {
    pub meta: FileMeta,
    pub done: ArcRwSignal<u64>,
    pub status: ArcRwSignal<FileStatus>,
}

impl FileRow {
    pub fn new(meta: FileMeta) -> Self {
        Self {
            meta,
            done: ArcRwSignal::new(0),
            status: ArcRwSignal::new(FileStatus::Ready),
        }
    }

    pub fn id(&self) -> FileId {
        self.meta.id
    }

    /// The name shown: path within a dropped folder, else the file name.
    pub fn display_name(&self) -> String {
        if self.meta.path.is_empty() {
            self.meta.name.clone()
        } else {
            self.meta.path.clone()
        }
    }
}

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
    fn statuses_read_as_the_tests_expect() {
        assert_eq!(FileStatus::Verified.to_string(), "verified");
        assert_eq!(
            FileStatus::Failed("integrity".into()).to_string(),
            "failed: integrity"
        );
    }
}
