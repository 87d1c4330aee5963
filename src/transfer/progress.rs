//! Honest progress: bytes done, a smoothed speed and the time left, from timestamped byte counts.

/// Smoothing window for the speed, in milliseconds (an exponential moving average).
const WINDOW_MS: f64 = 2_000.0;

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
    /// Bytes per second (smoothed); 0 before two samples.
    pub speed: f64,
}

impl Progress {
    /// Seconds left at the current speed, if it is known.
    pub fn eta_secs(&self) -> Option<f64> {
        (self.speed > 0.0).then(|| self.total.saturating_sub(self.done) as f64 / self.speed)
    }

    pub fn fraction(&self) -> f64 {
        if self.total == 0 {
            1.0
        } else {
            self.done as f64 / self.total as f64
        }
    }
}

/// Feeds [`Progress`] from `(now_ms, bytes_done)` samples.
#[derive(Clone, Debug)]
pub struct Meter {
    total: u64,
    last: Option<(f64, u64)>,
    speed: f64,
}

impl Meter {
    pub fn new(total: u64) -> Self {
        Self {
            total,
            last: None,
            speed: 0.0,
        }
    }

    pub fn update(&mut self, now_ms: f64, done: u64) -> Progress {
        if let Some((then, before)) = self.last {
            let dt = now_ms - then;
            if dt > 0.0 {
                let instant = done.saturating_sub(before) as f64 * 1000.0 / dt;
                let weight = (dt / WINDOW_MS).min(1.0);
                self.speed = if self.speed == 0.0 {
                    instant
                } else {
                    self.speed + weight * (instant - self.speed)
                };
                self.last = Some((now_ms, done));
            }
        } else {
            self.last = Some((now_ms, done));
        }
        Progress {
            done,
            total: self.total,
            speed: self.speed,
        }
    }
}

/// "3 s", "2 min 5 s", "1 h 4 min".
pub fn human_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_rate_gives_its_speed_and_eta() {
        let mut m = Meter::new(10_000_000);
        m.update(0.0, 0);
        let mut p = Progress::default();
        for i in 1..=20 {
            // 1 MB per second, sampled every 100 ms.
            p = m.update(i as f64 * 100.0, i * 100_000);
        }
        assert!((p.speed - 1_000_000.0).abs() < 1.0, "{}", p.speed);
        assert_eq!(p.done, 2_000_000);
        assert!((p.eta_secs().unwrap() - 8.0).abs() < 0.01);
        assert!((p.fraction() - 0.2).abs() < 1e-9);
    }

    #[test]
    fn speed_follows_a_change_smoothly() {
        let mut m = Meter::new(u64::MAX);
        m.update(0.0, 0);
        m.update(1000.0, 1_000_000);
        let p = m.update(2000.0, 1_000_000 + 3_000_000);
        assert!(
            p.speed > 1_000_000.0 && p.speed < 3_000_000.0,
            "{}",
            p.speed
        );
    }

    #[test]
    fn unknown_speed_has_no_eta_and_empty_files_are_complete() {
        let mut m = Meter::new(100);
        assert_eq!(m.update(5.0, 0).eta_secs(), None);
        assert_eq!(m.update(5.0, 10).eta_secs(), None); // no time passed
        assert_eq!(
            Progress {
                done: 0,
                total: 0,
                speed: 0.0
            }
            .fraction(),
            1.0
        );
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(3.4), "3 s");
        assert_eq!(human_duration(125.0), "2 min 5 s");
        assert_eq!(human_duration(3840.0), "1 h 4 min");
    }
}
