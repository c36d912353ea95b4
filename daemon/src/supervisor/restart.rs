//! The restart decision after an engine crash, as plain data: which crashes still count,
//! and whether the next start waits out a backoff or the crashes are a crash loop.
//!
//! Invariants: no I/O and no clock of its own (the caller passes `now`), so the policy is
//! tested without processes; an engine that served for `reset_after` before it crashed
//! starts the history afresh (its crash gets the shortest backoff).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::RestartConfig;

/// What to do after a crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterCrash {
    /// Start again after `delay`; `crashes` is how many count, this one included.
    Restart { delay: Duration, crashes: u32 },
    /// Too many crashes within the window: no more starts until a reload.
    CrashLoop { crashes: u32 },
}

/// The crashes within the crash-loop window, oldest first.
#[derive(Clone, Debug, Default)]
pub struct CrashHistory {
    crashes: VecDeque<Instant>,
}

impl CrashHistory {
    /// Records a crash at `now`. `served_for` is how long the engine had been serving
    /// when it crashed (`None`: it never got to serving).
    pub fn record(
        &mut self,
        now: Instant,
        served_for: Option<Duration>,
        r: &RestartConfig,
    ) -> AfterCrash {
        if served_for.is_some_and(|d| d >= r.reset_after) {
            self.crashes.clear();
        }
        self.crashes.push_back(now);
        self.expire(now, r.crash_loop_window);
        let n = self.crashes.len() as u32;
        if n >= r.crash_loop_restarts {
            AfterCrash::CrashLoop { crashes: n }
        } else {
            let factor = 1u32 << n.saturating_sub(1).min(16);
            let delay = r.backoff_initial.saturating_mul(factor).min(r.backoff_max);
            AfterCrash::Restart { delay, crashes: n }
        }
    }

    /// Forgets the crashes that are `window` or more before `now`.
    pub fn expire(&mut self, now: Instant, window: Duration) {
        while self
            .crashes
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= window)
        {
            self.crashes.pop_front();
        }
    }

    /// When the oldest crash leaves the window (then the count shown in status drops).
    pub fn next_expiry(&self, window: Duration) -> Option<Instant> {
        self.crashes.front().map(|t| *t + window)
    }

    /// Crashes within the window (call [`CrashHistory::expire`] first).
    pub fn count(&self) -> u32 {
        self.crashes.len() as u32
    }

    /// Forgets every crash (a reload starts afresh).
    pub fn clear(&mut self) {
        self.crashes.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartConfig {
        RestartConfig {
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            crash_loop_restarts: 5,
            crash_loop_window: Duration::from_secs(300),
            reset_after: Duration::from_secs(120),
        }
    }

    fn delay(a: AfterCrash) -> Duration {
        match a {
            AfterCrash::Restart { delay, .. } => delay,
            AfterCrash::CrashLoop { crashes } => panic!("crash loop after {crashes} crashes"),
        }
    }

    #[test]
    fn crashes_at_start_back_off_then_are_a_crash_loop() {
        let r = policy();
        let mut h = CrashHistory::default();
        let t0 = Instant::now();
        let delays: Vec<Duration> = (0..4)
            .map(|i| delay(h.record(t0 + Duration::from_secs(i), None, &r)))
            .collect();
        let ms = |v: u64| Duration::from_millis(v);
        assert_eq!(delays, vec![ms(500), ms(1000), ms(2000), ms(4000)]);
        assert_eq!(
            h.record(t0 + Duration::from_secs(5), None, &r),
            AfterCrash::CrashLoop { crashes: 5 }
        );
    }

    #[test]
    fn an_engine_that_served_for_a_healthy_period_starts_afresh() {
        let r = policy();
        let mut h = CrashHistory::default();
        let t0 = Instant::now();
        // Serves three minutes between crashes, all within the five-minute window: each
        // crash gets the first backoff, and there is never a crash loop.
        for i in 0..10u64 {
            let now = t0 + Duration::from_secs(180 * i);
            let served = (i > 0).then_some(Duration::from_secs(175));
            assert_eq!(
                h.record(now, served, &r),
                AfterCrash::Restart {
                    delay: Duration::from_millis(500),
                    crashes: 1
                },
                "crash {i}"
            );
        }
        // Serving for less than reset_after keeps the history.
        let now = t0 + Duration::from_secs(180 * 10);
        assert_eq!(
            h.record(now, Some(Duration::from_secs(60)), &r),
            AfterCrash::Restart {
                delay: Duration::from_millis(1000),
                crashes: 2
            }
        );
    }

    #[test]
    fn crashes_older_than_the_window_do_not_count() {
        let r = policy();
        let mut h = CrashHistory::default();
        let t0 = Instant::now();
        h.record(t0, None, &r);
        h.record(t0 + Duration::from_secs(10), None, &r);
        assert_eq!(
            h.next_expiry(r.crash_loop_window),
            Some(t0 + r.crash_loop_window)
        );
        h.expire(t0 + r.crash_loop_window, r.crash_loop_window);
        assert_eq!(h.count(), 1);
        h.expire(t0 + Duration::from_secs(400), r.crash_loop_window);
        assert_eq!(h.count(), 0);
        assert_eq!(h.next_expiry(r.crash_loop_window), None);
    }
}
