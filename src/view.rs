//! The state both pages show, as signals: written by the browser sessions (`client`), read by
//! the components. Neither of those two modules imports the other; both import this one.

use crate::protocol::PeerId;
use crate::transfer::progress::Progress;
use crate::transfer::{paths, FileId, FileMeta};
use leptos::prelude::*;
use std::fmt;

/// Where one file stands, as shown in its `file-status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileStatus {
    Ready,
    Requested,
    /// Part of it arrived earlier (before a reload or a break): this much, in percent.
    Resuming(u32),
    Receiving,
    /// The connection broke; it carries on once the sender is reached again.
    Paused,
    /// Every block arrived and checked; being saved.
    Verifying,
    Verified,
    Failed(String),
}

impl fmt::Display for FileStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileStatus::Ready => f.write_str("ready"),
            FileStatus::Requested => f.write_str("waiting for sender"),
            FileStatus::Resuming(percent) => write!(f, "resuming at {percent} %"),
            FileStatus::Receiving => f.write_str("transferring"),
            FileStatus::Paused => f.write_str("paused — reconnecting"),
            FileStatus::Verifying => f.write_str("verifying"),
            FileStatus::Verified => f.write_str("verified"),
            FileStatus::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

impl FileStatus {
    /// A download of it is under way (started, running, paused or finishing).
    pub fn busy(&self) -> bool {
        matches!(
            self,
            FileStatus::Requested
                | FileStatus::Resuming(_)
                | FileStatus::Receiving
                | FileStatus::Paused
                | FileStatus::Verifying
        )
    }
}

/// One row of a file list. Progress and status are their own signals so a row updates alone.
#[derive(Clone, Debug)]
pub struct FileRow {
    pub meta: FileMeta,
    pub progress: ArcRwSignal<Progress>,
    pub status: ArcRwSignal<FileStatus>,
}

impl FileRow {
    pub fn new(meta: FileMeta) -> Self {
        let progress = Progress {
            total: meta.size,
            ..Progress::default()
        };
        Self {
            meta,
            progress: ArcRwSignal::new(progress),
            status: ArcRwSignal::new(FileStatus::Ready),
        }
    }

    pub fn id(&self) -> FileId {
        self.meta.id
    }

    /// The name shown: the (made safe) path within a dropped folder, else the file name.
    pub fn display_name(&self) -> String {
        paths::display_path(&self.meta.path, &self.meta.name)
    }
}

/// Why a receiver is paused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PauseWhy {
    /// The peer connection broke (network change, the sender's tab asleep, ICE failure).
    ConnectionLost,
    /// The sender's page closed or reloaded.
    SenderLeft,
}

/// Where the receiver's connection stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    ConnectingServer,
    WaitingForSender,
    ConnectingPeer,
    /// The signaling socket dropped before the peers connected; it is being reopened.
    Reconnecting,
    Connected,
    /// The connection to the sender broke after it was made; the page is reconnecting by itself
    /// and downloads carry on where they stopped.
    Paused(PauseWhy),
    /// Reconnecting was given up on (the sender did not come back in minutes).
    SenderGone,
    /// ICE failed: no network path between the two browsers (`relay_offered`: not even through
    /// a TURN relay the server handed out).
    Unreachable {
        relay_offered: bool,
    },
    /// The signaling socket could not be opened or dropped before the peers connected.
    ServerLost(String),
    /// The server kept answering the join with "busy" (the sender's inbox full, our rate
    /// limit, a backend failure) however often it was asked again.
    ServerBusy,
    /// Nothing a retry fixes: a bad link, a share that is gone.
    Failed(String),
}

impl Phase {
    /// Still on the way to the sender (or back to it), so the server is needed.
    pub fn needs_server(&self) -> bool {
        matches!(
            self,
            Phase::ConnectingServer
                | Phase::WaitingForSender
                | Phase::ConnectingPeer
                | Phase::Reconnecting
                | Phase::Paused(_)
        )
    }

    pub fn is_paused(&self) -> bool {
        matches!(self, Phase::Paused(_))
    }

    /// Failures a fresh attempt may fix.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Phase::SenderGone
                | Phase::Unreachable { .. }
                | Phase::ServerLost(_)
                | Phase::ServerBusy
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
            Phase::Paused(PauseWhy::ConnectionLost) => f.write_str("Paused — reconnecting…"),
            Phase::Paused(PauseWhy::SenderLeft) => f.write_str(
                "Paused — the sender went away; waiting for them to come back (what arrived is kept)",
            ),
            Phase::SenderGone => f.write_str("The sender went away"),
            Phase::Unreachable {
                relay_offered: false,
            } => f.write_str(
                "Could not connect to the sender: the two devices cannot reach each other \
                 directly (a strict NAT or firewall is in the way), and this server offers no \
                 relay (TURN) to go through instead",
            ),
            Phase::Unreachable {
                relay_offered: true,
            } => f.write_str(
                "Could not connect to the sender: the two devices cannot reach each other, not \
                 even through the server's relay",
            ),
            Phase::ServerLost(why) => write!(f, "Lost the connection to the server: {why}"),
            Phase::ServerBusy => f.write_str(
                "Could not reach the sender: the server is too busy to pass the request on \
                 right now. Try again in a moment",
            ),
            Phase::Failed(why) => write!(f, "Connection failed: {why}"),
        }
    }
}

/// What the receiver's page shows.
#[derive(Clone, Copy)]
pub struct ReceiverUi {
    pub phase: RwSignal<Phase>,
    pub files: RwSignal<Vec<FileRow>>,
    pub error: RwSignal<Option<String>>,
    /// How the connection to the sender travels, once it is up.
    pub path: RwSignal<Option<NetPath>>,
}

/// How a peer connection's bytes travel: straight between the two browsers, or through the
/// server's TURN relay (from the selected ICE candidate pair).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetPath {
    Direct,
    Relayed,
}

impl fmt::Display for NetPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NetPath::Direct => "Direct",
            NetPath::Relayed => "Relayed through the server",
        })
    }
}

/// One connected receiver as the sender sees it.
#[derive(Clone, Debug)]
pub struct ReceiverRow {
    pub peer: PeerId,
    pub label: String,
    /// "connecting", "connected", "sending <file>".
    pub state: ArcRwSignal<String>,
    pub progress: ArcRwSignal<Progress>,
    pub path: ArcRwSignal<Option<NetPath>>,
}

impl ReceiverRow {
    pub fn new(peer: PeerId, label: String) -> Self {
        Self {
            peer,
            label,
            state: ArcRwSignal::new("connecting".into()),
            progress: ArcRwSignal::new(Progress::default()),
            path: ArcRwSignal::new(None),
        }
    }
}

/// What the sender's page shows.
#[derive(Clone, Copy)]
pub struct SenderUi {
    pub link: RwSignal<Option<String>>,
    pub files: RwSignal<Vec<FileRow>>,
    pub receivers: RwSignal<Vec<ReceiverRow>>,
    /// Receivers with an open data channel.
    pub peers: RwSignal<usize>,
    /// Bytes of file data sent to all receivers since the page opened.
    pub sent: RwSignal<u64>,
    pub error: RwSignal<Option<String>>,
    /// Files this share offered before the page was reloaded that have not been added again
    /// (the browser gave no lasting access to them): their names, for the page to ask for.
    pub missing: RwSignal<Vec<String>>,
    /// Dropped items kept from before the reload whose files the browser lets the page read
    /// again once the person allows it (a button asks).
    pub restorable: RwSignal<usize>,
    /// The signaling connection dropped and is being reopened: new receivers cannot join until
    /// the share is back (connected ones are unaffected).
    pub reconnecting: RwSignal<bool>,
    /// A pairing without the server under way: the offer's code to hand to the receiver.
    pub pair_code: RwSignal<Option<String>>,
    /// Why the last pairing step failed.
    pub pair_error: RwSignal<Option<String>>,
}

impl SenderUi {
    pub fn new() -> Self {
        Self {
            link: RwSignal::new(None),
            files: RwSignal::new(Vec::new()),
            receivers: RwSignal::new(Vec::new()),
            peers: RwSignal::new(0),
            sent: RwSignal::new(0),
            error: RwSignal::new(None),
            missing: RwSignal::new(Vec::new()),
            restorable: RwSignal::new(0),
            reconnecting: RwSignal::new(false),
            pair_code: RwSignal::new(None),
            pair_error: RwSignal::new(None),
        }
    }
}

impl Default for SenderUi {
    fn default() -> Self {
        Self::new()
    }
}

/// An error's words as a sentence for the page: "this is not a code" → "This is not a code."
pub fn capitalized(message: &str) -> String {
    let mut chars = message.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect::<String>() + ".",
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_as_the_tests_expect() {
        assert_eq!(FileStatus::Verified.to_string(), "verified");
        assert_eq!(
            FileStatus::Failed("integrity".into()).to_string(),
            "failed: integrity"
        );
        assert_eq!(FileStatus::Resuming(63).to_string(), "resuming at 63 %");
        assert_eq!(FileStatus::Paused.to_string(), "paused — reconnecting");
        assert!(FileStatus::Paused.busy() && !FileStatus::Verified.busy());
    }

    #[test]
    fn a_paused_receiver_still_needs_the_server_and_says_why() {
        let p = Phase::Paused(PauseWhy::SenderLeft);
        assert!(p.needs_server() && p.is_paused() && !p.retryable());
        assert!(p.to_string().contains("sender went away"));
        assert!(Phase::Paused(PauseWhy::ConnectionLost)
            .to_string()
            .starts_with("Paused — reconnecting"));
        assert!(Phase::SenderGone.retryable());
    }

    #[test]
    fn hostile_paths_display_safely() {
        let row = FileRow::new(FileMeta {
            id: FileId(1),
            name: "x".into(),
            path: "../../etc/passwd".into(),
            size: 1,
            mime: String::new(),
            modified: 0,
            hash: None,
        });
        assert_eq!(row.display_name(), "etc/passwd");
    }
}
