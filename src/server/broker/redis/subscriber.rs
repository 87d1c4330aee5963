//! The pub/sub side: one subscriber connection per node, resubscribed after a reconnect.

use super::*;

/// Owns the node's pub/sub connection: delivers messages, watches the connection, and reconnects
/// and re-subscribes when it is lost.
pub(super) async fn subscriber(
    inner: Arc<Inner>,
    client: Client,
    mut first: Option<(PubSubSink, PubSubStream)>,
) {
    let opts = inner.opts.clone();
    let backoff = opts.reconnect_backoff();
    let mut attempt = 0;
    loop {
        let (mut sink, mut stream) = match first.take() {
            Some(connected) => connected,
            None => match reconnect(&inner, &client).await {
                Ok(connected) => connected,
                Err(e) => {
                    inner.sink.send_replace(None);
                    // A node never gives up on Redis: past the cap it keeps trying at it.
                    let wait = backoff
                        .delay_ms(attempt, rand::random())
                        .unwrap_or(backoff.max_ms);
                    tracing::debug!(error = %e, wait_ms = wait, "redis pub/sub reconnect failed");
                    sleep(Duration::from_millis(u64::from(wait))).await;
                    attempt = attempt.saturating_add(1);
                    continue;
                }
            },
        };
        attempt = 0;
        let mut ping = tokio::time::interval(opts.ping_every);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ping.reset();
        loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(msg) => inner.deliver(&msg),
                    None => break,
                },
                _ = ping.tick() => {
                    // In subscribed mode Redis answers a PING with an array; any answer will do.
                    match timeout(opts.op_timeout, sink.ping::<Value>()).await {
                        Ok(Ok(_)) => {}
                        _ => break,
                    }
                }
            }
        }
        inner.sink.send_replace(None);
        tracing::warn!("redis pub/sub connection lost; reconnecting");
    }
}

/// A new pub/sub connection, subscribed to every live local topic; then wakes the command
/// connection and tells every refresh task to re-assert its key.
pub(super) async fn reconnect(
    inner: &Inner,
    client: &Client,
) -> Result<(PubSubSink, PubSubStream), BrokerError> {
    let op_timeout = inner.opts.op_timeout;
    let pubsub = timeout(op_timeout, client.get_async_pubsub())
        .await
        .map_err(|_| BrokerError::Backend("redis: connect timed out".into()))?
        .map_err(backend)?;
    let (mut sink, stream) = pubsub.split();
    // Registrations from now on subscribe through the new connection themselves; the ones before
    // are in `local` already, so `resubscribe` (which reads `local` after this) covers them.
    inner.sink.send_replace(Some(sink.clone()));
    timeout(op_timeout, inner.resubscribe(&mut sink))
        .await
        .map_err(|_| BrokerError::Backend("redis: re-subscribe timed out".into()))?
        .map_err(backend)?;
    // The command connection notices a restart only when a command fails: make that happen now,
    // so that the refreshes below find it reconnected.
    let mut conn = inner.conn.clone();
    for _ in 0..2 {
        let ping = cmd("PING");
        if let Ok(Ok(_)) = timeout(op_timeout, ping.query_async::<Value>(&mut conn)).await {
            break;
        }
    }
    inner.epoch.send_modify(|e| *e += 1);
    tracing::info!("redis pub/sub connection re-established");
    Ok((sink, stream))
}
