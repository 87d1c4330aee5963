//! What every test that needs Redis uses, in one file: the broker's unit tests include it as a
//! module, the integration tests (`tests/common`) by path. A private `redis-server` (Debian
//! package `redis-server`, installed by `scripts/setup.sh`) without persistence that listens on a
//! Unix socket in a directory of its own, not on a TCP port: no two tests (or test binaries
//! running at once) can race for an address, and a restart gets the same address back. And
//! [`eventually`], the one way the tests wait for a condition instead of sleeping.
//!
//! Each includer uses a part of it.
#![allow(dead_code)]

use std::future::Future;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// How long `redis-server` may take to answer after it is started.
const STARTUP: Duration = Duration::from_secs(5);

/// A private `redis-server`, killed (and its directory removed) on drop.
pub struct TestRedis {
    dir: PathBuf,
    child: Option<Child>,
}

impl TestRedis {
    pub fn start() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "beamdrop-redis-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a temporary directory for redis-server");
        let mut redis = Self { dir, child: None };
        redis.spawn();
        redis
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("redis.sock")
    }

    /// The broker URI of this server (`redis+unix://…`).
    pub fn uri(&self) -> String {
        format!("redis+unix://{}", self.socket().display())
    }

    fn spawn(&mut self) {
        let socket = self.socket();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&socket)
            .args(["--unixsocketperm", "700", "--dir"])
            .arg(&self.dir)
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (scripts/setup.sh: need_redis)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + STARTUP;
        while std::time::Instant::now() < deadline {
            if self.answers() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server at {} did not come up", socket.display());
    }

    /// Whether the server answers a PING now.
    pub fn answers(&self) -> bool {
        let Ok(mut conn) = UnixStream::connect(self.socket()) else {
            return false;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
        let mut buf = [0u8; 7];
        conn.write_all(b"PING\r\n").is_ok()
            && conn.read_exact(&mut buf).is_ok()
            && &buf == b"+PONG\r\n"
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(self.socket());
    }

    /// Kills the server and starts a new, empty one at the same address.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A fresh connection to it.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.uri())
            .expect("a valid redis URI")
            .get_multiplexed_async_connection()
            .await
            .expect("redis-server accepts a connection")
    }

    pub async fn exists(&self, key: &str) -> bool {
        redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut self.conn().await)
            .await
            .expect("EXISTS answers")
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `check` every 20 ms until it holds and returns how long that took; panics with `what`
/// after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = tokio::time::Instant::now();
    while started.elapsed() < within {
        if check().await {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not within {within:?}: {what}");
}
