//! The native peer: `beamdrop send` and `beamdrop receive`, for terminals.
//!
//! It speaks to browsers and to other CLIs through the same server, the same sealed signaling and
//! the same data channel protocol: [`peer`] is the WebRTC connection (str0m), [`signal`] the
//! broker's socket, and the transfer itself is `crate::transfer`'s, as in the browser.

pub mod disk;
pub mod peer;
pub mod receive;
pub mod send;
pub mod signal;

use crate::protocol::{ErrorCode, ShareId};
use crate::seal::SealError;
use clap::{Args, Subcommand};
use std::path::PathBuf;

/// What the `beamdrop` binary does (nothing given: serve).
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (signaling broker and pages): the default.
    Serve,
    /// Share files or folders: print the link (and a QR code), serve every receiver until Ctrl-C.
    Send(SendArgs),
    /// Download a share's files into a folder, verified; run again to resume after a break.
    Receive(ReceiveArgs),
}

#[derive(Debug, Args)]
pub struct SendArgs {
    /// Files and folders to share (folders with everything under them).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// The beamdrop server to share through.
    #[arg(long, env = "BEAMDROP_SERVER", default_value = "http://127.0.0.1:3000")]
    pub server: String,
    /// Print only the link (no QR code).
    #[arg(long)]
    pub no_qr: bool,
}

#[derive(Debug, Args)]
pub struct ReceiveArgs {
    /// The share link, http(s)://host/s/<share>#<secret> (quote it: `#` starts a shell comment).
    pub link: String,
    /// Folder to save into (made if missing).
    #[arg(short = 'o', long = "out", default_value = ".")]
    pub dir: PathBuf,
    /// Download only this file, or this folder's files, by the path the sender shows
    /// (repeatable).
    #[arg(long)]
    pub pick: Vec<String>,
    /// No progress bar.
    #[arg(short, long)]
    pub quiet: bool,
}

/// Runs `beamdrop send`: returns when the server goes away or on Ctrl-C.
pub async fn send(args: SendArgs) -> Result<(), CliError> {
    let files = send::collect(&args.paths)?;
    let total: u64 = files.iter().map(|f| f.meta.size).sum();
    let share = send::share(&args.server, files.clone()).await?;
    println!(
        "Sharing {} file(s), {} bytes. Open this link to receive:",
        files.len(),
        total
    );
    if !args.no_qr {
        if let Some(qr) = qr_text(&share.link) {
            println!("{qr}");
        }
    }
    println!("{}", share.link);
    println!("(Ctrl-C stops sharing)");
    tokio::select! {
        served = share.serve() => served,
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

/// Runs `beamdrop receive`: `Ok(false)` when some file could not be received.
pub async fn receive(args: ReceiveArgs) -> Result<bool, CliError> {
    let received = receive::receive(receive::ReceiveOptions {
        link: args.link,
        dir: args.dir,
        pick: args.pick,
        progress: !args.quiet,
    })
    .await?;
    for path in &received.saved {
        println!("{}", path.display());
    }
    for (file, why) in &received.failed {
        eprintln!("not received: {file}: {why}");
    }
    Ok(received.failed.is_empty())
}

/// What can stop a CLI transfer, each with what a person can do about it.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("not a share link (expected http(s)://host/s/<share>#<secret>): {0}")]
    BadLink(String),
    #[error("{0}")]
    Link(#[from] SealError),
    #[error(transparent)]
    Signal(#[from] signal::SignalError),
    #[error("the server said: {message} ({code:?})")]
    Server { code: ErrorCode, message: String },
    #[error("connection: {0}")]
    Peer(#[from] peer::PeerError),
    #[error("the sender could not open what we sent: something between us altered it")]
    Rejected,
    #[error("the sender left (run again to resume when it is back)")]
    SenderGone,
    #[error("the connection to the sender was lost (run again to resume)")]
    ConnectionLost,
    #[error("no file in the share matches --pick")]
    NothingPicked,
    #[error("{path}: {source}")]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("protocol: {0}")]
    Protocol(String),
}

/// A share link taken apart: where its server is, the share, and the secret after `#`.
#[derive(Debug, PartialEq, Eq)]
pub struct Link {
    pub base: String,
    pub share: ShareId,
    pub secret: String,
}

impl Link {
    pub fn parse(link: &str) -> Result<Self, CliError> {
        let bad = || CliError::BadLink(link.to_owned());
        let (url, secret) = link.trim().split_once('#').ok_or_else(bad)?;
        let (base, share) = url.split_once("/s/").ok_or_else(bad)?;
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(bad());
        }
        let share = ShareId::try_from(share.trim_end_matches('/').to_owned()).map_err(|_| bad())?;
        Ok(Self {
            base: base.to_owned(),
            share,
            secret: secret.to_owned(),
        })
    }
}

/// `text` as a QR code drawn with Unicode half blocks, for a terminal.
pub fn qr_text(text: &str) -> Option<String> {
    let code = qrcode::QrCode::new(text.as_bytes()).ok()?;
    Some(
        code.render::<qrcode::render::unicode::Dense1x2>()
            .dark_color(qrcode::render::unicode::Dense1x2::Light)
            .light_color(qrcode::render::unicode::Dense1x2::Dark)
            .quiet_zone(true)
            .build(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_gives_its_server_share_and_secret() {
        let share = "0123456789abcdef0123456789abcdef";
        let link = Link::parse(&format!("http://127.0.0.1:3000/s/{share}#c0ffee")).expect("link");
        assert_eq!(link.base, "http://127.0.0.1:3000");
        assert_eq!(link.share.as_str(), share);
        assert_eq!(link.secret, "c0ffee");
    }

    #[test]
    fn what_is_not_a_share_link_is_refused_with_a_typed_error() {
        for bad in [
            "",
            "http://host/s/0123456789abcdef0123456789abcdef",
            "http://host/x/0123456789abcdef0123456789abcdef#aa",
            "http://host/s/nothex#aa",
            "ftp://host/s/0123456789abcdef0123456789abcdef#aa",
        ] {
            assert!(
                matches!(Link::parse(bad), Err(CliError::BadLink(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_link_fits_a_terminal_qr_code() {
        let qr = qr_text("http://127.0.0.1:3000/s/0123456789abcdef0123456789abcdef#0123456789abcdef0123456789abcdef")
            .expect("qr");
        assert!(qr.lines().count() > 10);
    }
}
