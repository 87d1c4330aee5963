//! The native peer end to end, with no browser: `beamdrop send` and `beamdrop receive` (their
//! library halves) through a real server, over real WebRTC on loopback. This is also the fastest
//! whole-protocol test: signaling, sealing, ICE/DTLS/SCTP, the transfer engine on both sides.

mod common;

use beamdrop::cli::receive::{receive, ReceiveOptions};
use beamdrop::cli::send::{collect, share};
use beamdrop::cli::{disk, CliError};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::timeout;

/// Deterministic bytes (xorshift) so a swapped or lost chunk shows.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn tempdir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("beamdrop-cli-{what}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn options(link: &str, dir: &Path) -> ReceiveOptions {
    ReceiveOptions {
        link: link.to_owned(),
        dir: dir.to_path_buf(),
        pick: Vec::new(),
        progress: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_with_subfolders_and_an_empty_file_arrives_verified_in_place() {
    let server = common::server().await;
    let base = format!("http://{}", server.addr);
    let src = tempdir("src");
    let album = src.join("album");
    std::fs::create_dir_all(album.join("2024/summer")).expect("dirs");
    let big = data(5 * 1024 * 1024 + 12_345, 7);
    std::fs::write(album.join("2024/summer/beach.raw"), &big).expect("write");
    std::fs::write(album.join("notes.txt"), b"hello from the terminal").expect("write");
    std::fs::write(album.join("2024/empty"), b"").expect("write");
    let loose = data(70_000, 3);
    std::fs::write(src.join("loose.bin"), &loose).expect("write");

    let files = collect(&[album.clone(), src.join("loose.bin")]).expect("collect");
    assert_eq!(files.len(), 4);
    let shared = share(&base, files).await.expect("share");
    let link = shared.link.clone();
    let serving = tokio::spawn(shared.serve());

    let out = tempdir("out");
    let received = timeout(Duration::from_secs(60), receive(options(&link, &out)))
        .await
        .expect("received in time")
        .expect("received");
    assert!(received.failed.is_empty(), "{:?}", received.failed);
    assert_eq!(received.saved.len(), 4);
    let read = |p: &str| std::fs::read(out.join(p)).expect(p);
    assert_eq!(read("album/2024/summer/beach.raw"), big);
    assert_eq!(read("album/notes.txt"), b"hello from the terminal");
    assert_eq!(read("album/2024/empty"), b"");
    assert_eq!(read("loose.bin"), loose);
    assert!(
        !out.join(disk::PARTIAL_DIR).exists(),
        "no partial files are left behind"
    );

    // --pick takes one file (and a second receive does not overwrite the first).
    let mut picked = options(&link, &out);
    picked.pick = vec!["album/notes.txt".into()];
    let again = timeout(Duration::from_secs(60), receive(picked))
        .await
        .expect("in time")
        .expect("received");
    assert_eq!(again.saved, vec![out.join("album/notes (1).txt")]);

    serving.abort();
    common::stop(server).await;
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_dir_all(&out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receive_cut_short_resumes_without_fetching_again_what_it_verified() {
    let server = common::server().await;
    let base = format!("http://{}", server.addr);
    let src = tempdir("src");
    let size = 48 * 1024 * 1024;
    let bytes = data(size, 11);
    std::fs::write(src.join("big.bin"), &bytes).expect("write");
    let shared = share(&base, collect(&[src.join("big.bin")]).expect("collect"))
        .await
        .expect("share");
    let link = shared.link.clone();
    let sent = shared.sent.clone();
    let serving = tokio::spawn(shared.serve());

    // The first receive is stopped once a third of the file is on disk.
    let out = tempdir("out");
    let first = tokio::spawn(receive(options(&link, &out)));
    let partial = out.join(disk::PARTIAL_DIR);
    let cut = async {
        loop {
            let on_disk: u64 = std::fs::read_dir(&partial)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum();
            if on_disk >= size as u64 / 3 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    timeout(Duration::from_secs(60), cut)
        .await
        .expect("a third arrives in time");
    first.abort();
    let _ = first.await;
    let before = sent.load(Ordering::Relaxed);
    assert!(before < size as u64, "cut before the end ({before} sent)");

    let received = timeout(Duration::from_secs(60), receive(options(&link, &out)))
        .await
        .expect("in time")
        .expect("resumed");
    assert_eq!(received.saved, vec![out.join("big.bin")]);
    assert_eq!(std::fs::read(out.join("big.bin")).expect("read"), bytes);
    let total = sent.load(Ordering::Relaxed);
    assert!(
        total < size as u64 + 8 * 1024 * 1024,
        "resumed, not started over: {total} bytes sent for a {size}-byte file"
    );

    serving.abort();
    common::stop(server).await;
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_dir_all(&out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_with_the_wrong_secret_is_refused_and_writes_nothing() {
    let server = common::server().await;
    let base = format!("http://{}", server.addr);
    let src = tempdir("src");
    std::fs::write(src.join("a.txt"), b"secret stuff").expect("write");
    let shared = share(&base, collect(&[src.join("a.txt")]).expect("collect"))
        .await
        .expect("share");
    let (url, _) = shared.link.split_once('#').expect("a secret");
    let wrong = format!("{url}#{}", "ab".repeat(16));
    let serving = tokio::spawn(shared.serve());

    let out = tempdir("out");
    let outcome = timeout(Duration::from_secs(20), receive(options(&wrong, &out)))
        .await
        .expect("answered in time");
    assert!(
        matches!(outcome, Err(CliError::Link(_)) | Err(CliError::Rejected)),
        "{outcome:?}"
    );
    assert_eq!(
        std::fs::read_dir(&out).expect("out").count(),
        0,
        "nothing written"
    );

    serving.abort();
    common::stop(server).await;
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_dir_all(&out);
}
