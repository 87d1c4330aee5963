//! Each test starts its own `redis-server` (see `test_support`).

use super::test_support::{eventually, TestRedis};
use super::*;
use tokio::time::Instant;

fn fast() -> RedisOptions {
    RedisOptions {
        inbox: InboxLimits::new(4, 1 << 20),
        presence_ttl: Duration::from_millis(1200),
        refresh_every: Duration::from_millis(300),
        ..Default::default()
    }
}

async fn node(redis: &TestRedis, opts: RedisOptions) -> RedisBroker {
    RedisBroker::connect(&redis.uri(), opts).await.unwrap()
}

async fn subscribers(redis: &TestRedis, peer: PeerId) -> i64 {
    let (_, n): (String, i64) = cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(peer.topic())
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    n
}

async fn recv(reg: &mut Registration) -> ServerMsg {
    timeout(Duration::from_secs(5), reg.inbox.recv())
        .await
        .expect("a message within 5 s")
        .expect("inbox open")
}

fn signal(n: u128, payload: &str) -> ServerMsg {
    ServerMsg::Signal {
        from: PeerId(Uuid::from_u128(n)),
        payload: payload.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_reaches_only_the_topic_owner_on_any_node() {
    let redis = TestRedis::start();
    let (n1, n2) = (node(&redis, fast()).await, node(&redis, fast()).await);
    let (a, b) = (PeerId::new_random(), PeerId::new_random());
    let mut ra = n1.register(a).await.unwrap();
    let mut rb = n2.register(b).await.unwrap();

    n1.publish(b, signal(1, "to b")).await.unwrap();
    assert_eq!(recv(&mut rb).await, signal(1, "to b"));
    n2.publish(a, signal(2, "to a")).await.unwrap();
    assert_eq!(recv(&mut ra).await, signal(2, "to a"));
    assert!(ra.inbox.try_recv().is_none() && rb.inbox.try_recv().is_none());

    assert_eq!(
        n1.publish(PeerId::new_random(), ServerMsg::Pong).await,
        Err(BrokerError::UnknownPeer)
    );
    // Taken, whether on the same node or another one; and refusing must not unregister `a`.
    for n in [&n1, &n2] {
        assert_eq!(
            n.register(a).await.err(),
            Some(BrokerError::AlreadyRegistered)
        );
    }
    sleep(Duration::from_millis(100)).await;
    assert!(n2.is_registered(a).await.unwrap());
    n2.publish(a, signal(3, "still")).await.unwrap();
    assert_eq!(recv(&mut ra).await, signal(3, "still"));
    assert_eq!((n1.local_peer_count(), n2.local_peer_count()), (1, 1));
    assert_eq!(n1.health().await, Ok(()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_refreshed_while_registered_and_removed_on_drop() {
    let redis = TestRedis::start();
    let (n1, n2) = (node(&redis, fast()).await, node(&redis, fast()).await);
    let peer = PeerId::new_random();
    let reg = n1.register(peer).await.unwrap();
    let mut conn = redis.conn().await;
    let owner: String = cmd("GET")
        .arg(presence_key(peer))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(owner, n1.node_id());

    // Twice the TTL later the key is still there, with a TTL no longer than configured.
    sleep(Duration::from_millis(2400)).await;
    assert!(n2.is_registered(peer).await.unwrap());
    let pttl: i64 = cmd("PTTL")
        .arg(presence_key(peer))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(pttl > 0 && pttl <= 1200, "pttl {pttl}");
    assert_eq!(subscribers(&redis, peer).await, 1);

    drop(reg);
    assert_eq!(n1.local_peer_count(), 0);
    eventually(Duration::from_secs(1), "key deleted on drop", || async {
        !n2.is_registered(peer).await.unwrap()
    })
    .await;
    eventually(
        Duration::from_secs(1),
        "topic unsubscribed on drop",
        || async { subscribers(&redis, peer).await == 0 },
    )
    .await;
    // And nothing re-creates it.
    sleep(Duration::from_millis(700)).await;
    assert!(!n2.is_registered(peer).await.unwrap());
    assert_eq!(
        n2.publish(peer, ServerMsg::Pong).await,
        Err(BrokerError::UnknownPeer)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_ends_when_its_task_panics_or_is_aborted() {
    let redis = TestRedis::start();
    let broker = node(&redis, fast()).await;

    let peer = PeerId::new_random();
    let reg = broker.register(peer).await.unwrap();
    let task = tokio::spawn(async move {
        let _reg = reg;
        panic!("peer task crashed");
    });
    assert!(task.await.unwrap_err().is_panic());
    eventually(
        Duration::from_secs(1),
        "unregistered after a panic",
        || async { !broker.is_registered(peer).await.unwrap() },
    )
    .await;

    let peer = PeerId::new_random();
    let reg = broker.register(peer).await.unwrap();
    let task = tokio::spawn(async move {
        let _reg = reg;
        std::future::pending::<()>().await;
    });
    assert!(broker.is_registered(peer).await.unwrap());
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    eventually(
        Duration::from_secs(1),
        "unregistered after an abort",
        || async { !broker.is_registered(peer).await.unwrap() },
    )
    .await;
    assert_eq!(broker.local_peer_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_live_as_long_as_their_lease_on_every_node() {
    let redis = TestRedis::start();
    let (n1, n2) = (node(&redis, fast()).await, node(&redis, fast()).await);
    let owner = PeerId::new_random();
    let lease = n1.create_share(owner).await.unwrap();
    let share = lease.share.clone();
    assert_eq!(n2.share_owner(&share).await.unwrap(), Some(owner));
    sleep(Duration::from_millis(2400)).await; // twice the TTL: refreshed
    assert_eq!(n2.share_owner(&share).await.unwrap(), Some(owner));
    drop(lease);
    eventually(Duration::from_secs(1), "share withdrawn", || async {
        n2.share_owner(&share).await.unwrap().is_none()
    })
    .await;
    let unknown: ShareId = "0123456789abcdef0123456789abcdef".parse().unwrap();
    assert_eq!(n2.share_owner(&unknown).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_is_reclaimed_on_any_node_with_its_token_only() {
    let redis = TestRedis::start();
    let (n1, n2) = (node(&redis, fast()).await, node(&redis, fast()).await);
    let (old, new, thief) = (
        PeerId::new_random(),
        PeerId::new_random(),
        PeerId::new_random(),
    );
    let lease = n1.create_share(old).await.unwrap();
    let (share, token) = (lease.share.clone(), lease.token.clone());
    let mut conn = redis.conn().await;
    let stored: String = cmd("GET")
        .arg(claim_key(&share))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(stored, hex::encode(claim_digest(&share, &token)));
    assert!(!stored.contains(token.as_str()));

    // Wrong token, another share's token, unknown share: refused, nothing changes.
    let other = n1.create_share(thief).await.unwrap();
    let unknown = ShareId::new_random();
    for (s, t) in [(&share, &other.token), (&unknown, &token)] {
        assert_eq!(
            n2.reclaim_share(s, t, thief).await.err(),
            Some(BrokerError::ClaimRefused)
        );
    }
    assert_eq!(n2.share_owner(&share).await.unwrap(), Some(old));
    assert_eq!(n2.share_owner(&unknown).await.unwrap(), None);
    let unknown_claim: bool = cmd("EXISTS")
        .arg(claim_key(&unknown))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!unknown_claim);

    // Taken over from another node while the old lease still lives: the old refresher
    // stops instead of writing its owner back, and the old lease ending leaves it alone.
    let reclaimed = n2.reclaim_share(&share, &token, new).await.unwrap();
    assert_eq!(reclaimed.share, share);
    assert_eq!(n1.share_owner(&share).await.unwrap(), Some(new));
    sleep(Duration::from_millis(2400)).await; // twice the TTL: refreshed by the new lease only
    assert_eq!(n1.share_owner(&share).await.unwrap(), Some(new));
    drop(lease);
    sleep(Duration::from_millis(300)).await;
    assert_eq!(n1.share_owner(&share).await.unwrap(), Some(new));

    // The new lease ends: withdrawn, but reclaimable (revived under the same id).
    drop(reclaimed);
    eventually(Duration::from_secs(1), "share withdrawn", || async {
        n1.share_owner(&share).await.unwrap().is_none()
    })
    .await;
    let revived = n1.reclaim_share(&share, &token, old).await.unwrap();
    assert_eq!(n2.share_owner(&share).await.unwrap(), Some(old));
    drop((revived, other));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawn_share_is_reclaimable_for_the_window_only() {
    let redis = TestRedis::start();
    let opts = RedisOptions {
        reclaim_window: Duration::from_millis(600),
        ..fast()
    };
    let (n1, n2) = (node(&redis, opts.clone()).await, node(&redis, opts).await);
    let owner = PeerId::new_random();
    let (share, token) = {
        let lease = n1.create_share(owner).await.unwrap();
        (lease.share.clone(), lease.token.clone())
    };
    // Gone, but reclaimable with its token: revived under the same id, then released again.
    eventually(Duration::from_secs(1), "share withdrawn", || async {
        n2.share_owner(&share).await.unwrap().is_none()
    })
    .await;
    let lease = n2.reclaim_share(&share, &token, owner).await.unwrap();
    assert_eq!(n1.share_owner(&share).await.unwrap(), Some(owner));
    drop(lease);
    // The claim lives a TTL plus the window after the last refresh, then nothing is left.
    sleep(Duration::from_millis(1200 + 600 + 300)).await;
    assert_eq!(
        n2.reclaim_share(&share, &token, owner).await.err(),
        Some(BrokerError::ClaimRefused)
    );
    assert_eq!(n2.share_owner(&share).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_inbox_drops_and_tells_the_sender_without_blocking_the_node() {
    let redis = TestRedis::start();
    let (n1, n2) = (node(&redis, fast()).await, node(&redis, fast()).await);
    let (slow, other, origin) = (
        PeerId::new_random(),
        PeerId::new_random(),
        PeerId::new_random(),
    );
    let r_slow = n2.register(slow).await.unwrap();
    let mut r_other = n2.register(other).await.unwrap();
    let mut r_origin = n1.register(origin).await.unwrap();
    let from_origin = |payload: &str| ServerMsg::Signal {
        from: origin,
        payload: payload.into(),
    };
    for _ in 0..10 {
        n1.publish(slow, from_origin("flood")).await.unwrap();
    }
    n1.publish(other, signal(99, "fine")).await.unwrap();
    // The subscriber kept going: the other peer on the same node got its message.
    assert_eq!(recv(&mut r_other).await, signal(99, "fine"));
    let mut got = 0;
    while r_slow.inbox.try_recv().is_some() {
        got += 1;
    }
    assert_eq!(got, 4, "the inbox capacity, in order, the rest dropped");
    // No silent loss: the sender hears about the drop (six times, once per message).
    let busy = ServerMsg::error(ErrorCode::PeerBusy, BrokerError::PeerBusy.to_string());
    assert_eq!(recv(&mut r_origin).await, busy);

    // On the same node the publisher is answered at once.
    let local = PeerId::new_random();
    let _r_local = n1.register(local).await.unwrap();
    for _ in 0..4 {
        n1.publish(local, from_origin("x")).await.unwrap();
    }
    assert_eq!(
        n1.publish(local, from_origin("x")).await,
        Err(BrokerError::PeerBusy)
    );
}

/// A node whose process dies cleans nothing up: its connections close, so its peers are
/// unreachable at once, and their keys expire with the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_is_unreachable_at_once_and_forgotten_after_the_ttl() {
    let redis = TestRedis::start();
    let n1 = node(&redis, fast()).await;
    let (uri, opts) = (redis.uri(), fast());
    let (peer, share, rt) = tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (peer, share) = rt.block_on(async {
            let n2 = RedisBroker::connect(&uri, opts).await.unwrap();
            let peer = PeerId::new_random();
            let reg = n2.register(peer).await.unwrap();
            let lease = n2.create_share(peer).await.unwrap();
            let share = lease.share.clone();
            // Held by a task, as a socket task would hold them.
            tokio::spawn(async move {
                let _held = (n2, reg, lease);
                std::future::pending::<()>().await;
            });
            (peer, share)
        });
        (peer, share, rt)
    })
    .await
    .unwrap();
    assert!(n1.is_registered(peer).await.unwrap());

    let killed = Instant::now();
    tokio::task::spawn_blocking(move || rt.shutdown_background())
        .await
        .unwrap();
    // The dying runtime ran no cleanup: the key is still there, but nobody listens, and
    // publishing says so before the key could have expired (at least TTL - refresh = 900 ms).
    assert!(n1.is_registered(peer).await.unwrap());
    eventually(
        Duration::from_millis(500),
        "publish to a dead node fails",
        || async { n1.publish(peer, ServerMsg::Pong).await == Err(BrokerError::UnknownPeer) },
    )
    .await;
    assert!(n1.is_registered(peer).await.unwrap());
    eventually(Duration::from_secs(3), "presence expires", || async {
        !n1.is_registered(peer).await.unwrap()
    })
    .await;
    eventually(Duration::from_secs(1), "share expires", || async {
        n1.share_owner(&share).await.unwrap().is_none()
    })
    .await;
    assert!(
        killed.elapsed() >= Duration::from_millis(900),
        "expired, not deleted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_resubscribes_and_restores_its_keys_after_redis_restarts() {
    let mut redis = TestRedis::start();
    let opts = RedisOptions {
        ping_every: Duration::from_millis(500),
        ..RedisOptions::default()
    };
    let (n1, n2) = (node(&redis, opts.clone()).await, node(&redis, opts).await);
    let (a, b) = (PeerId::new_random(), PeerId::new_random());
    let mut ra = n1.register(a).await.unwrap();
    let mut rb = n2.register(b).await.unwrap();
    let lease = n1.create_share(a).await.unwrap();

    redis.kill();
    eventually(
        Duration::from_secs(5),
        "health fails without redis",
        || async { n1.health().await.is_err() },
    )
    .await;
    assert!(n2.publish(a, ServerMsg::Pong).await.is_err());
    sleep(Duration::from_millis(500)).await;
    redis.restart(); // empty: no keys, no subscriptions

    let took = eventually(
        Duration::from_secs(5),
        "relaying again both ways",
        || async {
            n1.publish(b, signal(1, "a->b")).await.is_ok()
                && n2.publish(a, signal(2, "b->a")).await.is_ok()
        },
    )
    .await;
    assert_eq!(recv(&mut rb).await, signal(1, "a->b"));
    assert_eq!(recv(&mut ra).await, signal(2, "b->a"));
    assert!(n2.is_registered(a).await.unwrap() && n1.is_registered(b).await.unwrap());
    assert_eq!(n2.share_owner(&lease.share).await.unwrap(), Some(a));
    assert_eq!(n1.health().await, Ok(()));
    assert_eq!(n2.health().await, Ok(()));
    eprintln!("relaying again {took:?} after redis-server restarted");
}

#[tokio::test]
async fn an_unreachable_redis_fails_at_connect() {
    // A socket path nothing listens on (no port that another test could take meanwhile).
    let nowhere = std::env::temp_dir().join(format!("beamdrop-no-redis-{}", std::process::id()));
    let started = Instant::now();
    let uri = format!("redis+unix://{}/redis.sock", nowhere.display());
    let result = RedisBroker::connect(&uri, fast()).await;
    assert!(matches!(result.err(), Some(BrokerError::Backend(_))));
    assert!(started.elapsed() <= Duration::from_secs(3));
}
