//! Keeping keys alive: every local peer's presence, and each share's lease.

use super::*;

/// Peers per pipelined presence refresh. Small enough that a signal queued on the same
/// connection, and other nodes' commands in Redis, wait behind at most this many `SET`s: with
/// 1,000 a refresh round added milliseconds to the handshakes that met it. Measured side by side
/// (bench-broker, 3 nodes, 9k idle peers, 1,000 cross-node handshakes, three runs each): p99 /
/// p99.9 / max 3.57 / 9.57 / 13.72, 3.31 / 7.41 / 8.23, 2.08 / 4.03 / 4.69 ms with 1,000; 1.88 /
/// 2.79 / 4.04, 2.13 / 4.39 / 4.71, 1.85 / 2.85 / 3.82 ms with 100.
const PRESENCE_BATCH: usize = 100;

/// Keeps the `peer_state:<id>` key of every peer registered on this node alive, for the whole node
/// at once: one pipelined batch of `SET … PX ttl` per [`PRESENCE_BATCH`] peers every
/// `refresh_every`, sooner after a failure, and at once after a re-subscription (Redis may have
/// restarted empty). A task and a command per peer cost ~0.5 core at 100k idle peers.
///
/// A peer that leaves while a batch is in flight may see its key set again after its guard
/// deleted it; the key then expires within the TTL, and nothing reaches the peer meanwhile
/// (publishing needs a subscriber).
pub(super) async fn refresh_presence(inner: Arc<Inner>) {
    let mut conn = inner.conn.clone();
    let mut epoch = inner.epoch.subscribe();
    let (every, op_timeout, ttl_ms) = (
        inner.opts.refresh_every,
        inner.opts.op_timeout,
        inner.ttl_ms(),
    );
    let retry = every.min(Duration::from_millis(500));
    epoch.borrow_and_update();
    let mut ok = true;
    loop {
        tokio::select! {
            _ = sleep(if ok { every } else { retry }) => {}
            changed = epoch.changed() => if changed.is_err() { return },
        }
        let peers: Vec<PeerId> = inner
            .local
            .iter()
            .filter(|e| e.keyed)
            .map(|e| *e.key())
            .collect();
        ok = true;
        for batch in peers.chunks(PRESENCE_BATCH) {
            let mut pipe = redis::pipe();
            for peer in batch {
                pipe.cmd("SET")
                    .arg(presence_key(*peer))
                    .arg(&inner.node)
                    .arg("PX")
                    .arg(ttl_ms)
                    .ignore();
            }
            if !matches!(
                timeout(op_timeout, pipe.exec_async(&mut conn)).await,
                Ok(Ok(()))
            ) {
                tracing::debug!(
                    peers = peers.len(),
                    "presence refresh failed; retrying soon"
                );
                ok = false;
                break;
            }
        }
    }
}

/// Keeps a share alive like [`refresh_presence`] does a peer, but only while it is still this owner's: once a
/// reclaim has handed it to another peer, the refresher stops for good. Missing keys are
/// re-created only when Redis may have lost them (the subscriber reconnected, or no refresh
/// succeeded for a whole TTL); missing keys refreshed less than a TTL ago were deleted on
/// purpose (a reclaim took the share and its lease has ended since).
pub(super) fn spawn_share_refresher(inner: &Inner, keys: ShareKeys) -> AbortOnDrop {
    let mut conn = inner.conn.clone();
    let mut epoch = inner.epoch.subscribe();
    let script = inner.share_scripts.refresh.clone();
    let (every, op_timeout, ttl, ttl_ms, claim_ttl_ms) = (
        inner.opts.refresh_every,
        inner.opts.op_timeout,
        inner.opts.presence_ttl,
        inner.ttl_ms(),
        inner.claim_ttl_ms(),
    );
    let retry = every.min(Duration::from_millis(500));
    AbortOnDrop::new(tokio::spawn(async move {
        epoch.borrow_and_update();
        let mut ok = true;
        let mut last_ok = tokio::time::Instant::now();
        loop {
            let mut restore = false;
            tokio::select! {
                _ = sleep(if ok { every } else { retry }) => {}
                changed = epoch.changed() => {
                    if changed.is_err() { return }
                    restore = true;
                }
            }
            restore |= last_ok.elapsed() >= ttl;
            let mut invocation = keys.invocation(&script, ttl_ms, claim_ttl_ms);
            invocation.arg(if restore { "1" } else { "0" });
            match timeout(op_timeout, invocation.invoke_async::<i64>(&mut conn)).await {
                Ok(Ok(1)) => {
                    ok = true;
                    last_ok = tokio::time::Instant::now();
                }
                Ok(Ok(_)) => {
                    tracing::debug!("share reclaimed by another peer; no longer refreshed");
                    return;
                }
                _ => {
                    ok = false;
                    tracing::debug!("share refresh failed; retrying soon");
                }
            }
        }
    }))
}
