//! When and how soon the browser reopens its signaling socket (pure, so it is tested natively).
//! The same [`Backoff`] paces the receiver's reconnects to a sender and a server node's Redis
//! pub/sub reconnects (`RedisOptions::reconnect_backoff`): one schedule, one place.
//!
//! A node going away closes every socket at once ([`close_code::RECONNECT`]): the jitter spreads
//! the reconnects, the doubling keeps a down server from being hammered, and the bounds keep a
//! page from waiting long between attempts or retrying forever.

use crate::protocol::close_code;

/// Exponential backoff with "equal jitter": attempt `n` waits between half and all of
/// `initial_ms · 2ⁿ` (capped at `max_ms`), and there are at most `max_attempts` in a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub initial_ms: u32,
    pub max_ms: u32,
    pub max_attempts: u32,
}

impl Backoff {
    /// The signaling socket: 250 ms doubling to 5 s; two to five minutes of failures in a row
    /// before the page gives up and says so.
    pub const SIGNALING: Backoff = Backoff {
        initial_ms: 250,
        max_ms: 5_000,
        max_attempts: 60,
    };

    /// The wait before reconnect attempt `attempt` (0 for the first after a loss), `jitter` in
    /// `[0, 1]` (e.g. `Math.random()`); `None` once `max_attempts` are used up.
    pub fn delay_ms(&self, attempt: u32, jitter: f64) -> Option<u32> {
        if attempt >= self.max_attempts {
            return None;
        }
        let step = u64::from(self.initial_ms)
            .saturating_mul(1u64 << attempt.min(32))
            .min(u64::from(self.max_ms));
        let half = step / 2;
        let jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        Some((half + ((step - half) as f64 * jitter) as u64) as u32)
    }
}

/// Whether a socket closed with `code` is worth reopening. Everything is (the server restarting,
/// an idle timeout after the tab slept, a dropped network, a refused registration, a rate limit)
/// except a frame the server refused as malformed: this client would only send it again.
pub fn reconnects_after(code: u16) -> bool {
    code != close_code::BAD_FRAME
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_from_250ms_to_5s_with_jitter_within_bounds() {
        let b = Backoff::SIGNALING;
        let steps = [250, 500, 1000, 2000, 4000, 5000, 5000];
        for (attempt, step) in steps.into_iter().enumerate() {
            let attempt = attempt as u32;
            assert_eq!(b.delay_ms(attempt, 0.0), Some(step / 2), "{attempt}");
            assert_eq!(b.delay_ms(attempt, 1.0), Some(step), "{attempt}");
            let mid = b.delay_ms(attempt, 0.5).unwrap();
            assert!(mid > step / 2 && mid < step, "{attempt}: {mid}");
        }
        // Far past the cap, and with nonsense jitter, still within [max/2, max].
        assert_eq!(b.delay_ms(40, 0.25), Some(3_125));
        assert_eq!(b.delay_ms(59, f64::NAN), Some(2_500));
        assert_eq!(b.delay_ms(3, 7.0), Some(2_000));
        assert_eq!(b.delay_ms(3, -1.0), Some(1_000));
    }

    #[test]
    fn attempts_are_bounded() {
        let b = Backoff {
            initial_ms: 10,
            max_ms: 100,
            max_attempts: 3,
        };
        assert!(b.delay_ms(2, 0.5).is_some());
        assert_eq!(b.delay_ms(3, 0.5), None);
        // Minutes of attempts for the signaling socket, not hours.
        let total: u64 = (0..Backoff::SIGNALING.max_attempts)
            .map(|n| u64::from(Backoff::SIGNALING.delay_ms(n, 0.0).unwrap()))
            .sum();
        assert!((60_000..=300_000).contains(&total), "{total}");
    }

    #[test]
    fn only_a_refused_frame_is_not_retried() {
        for code in [
            close_code::RECONNECT,
            close_code::IDLE_TIMEOUT,
            close_code::REGISTRATION_FAILED,
            close_code::RATE_LIMITED,
            1000,
            1001,
            1006,
            1011,
        ] {
            assert!(reconnects_after(code), "{code}");
        }
        assert!(!reconnects_after(close_code::BAD_FRAME));
    }
}
