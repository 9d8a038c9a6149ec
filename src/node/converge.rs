//! Telling a repair from a fight (pure: the caller passes the time).
//!
//! A repair that stays is the normal case. When repairs keep being undone (another tool deletes
//! the rules as fast as loopguard puts them back, or a plan that does not reach compliance), every
//! further write only feeds the fight. After more than `limit` writes within `window`, loopguard
//! holds its next write back, for a time that doubles with every further write in the window, up
//! to `cap`; it keeps checking (and reporting `NotConverging`) meanwhile. A quiet window resets it.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// The write history of one node's watch loop.
#[derive(Clone, Debug)]
pub struct Convergence {
    window: Duration,
    limit: usize,
    base: Duration,
    cap: Duration,
    writes: VecDeque<Instant>,
    /// How often each rule had to be inserted again within the window.
    reinserted: BTreeMap<String, usize>,
    level: u32,
    hold_until: Option<Instant>,
}

impl Default for Convergence {
    /// More than 3 writes within 10 s is a fight; back off 1 s, doubling up to 30 s.
    fn default() -> Self {
        Convergence::new(
            Duration::from_secs(10),
            3,
            Duration::from_secs(1),
            Duration::from_secs(30),
        )
    }
}

impl Convergence {
    pub fn new(window: Duration, limit: usize, base: Duration, cap: Duration) -> Convergence {
        Convergence {
            window,
            limit,
            base,
            cap,
            writes: VecDeque::new(),
            reinserted: BTreeMap::new(),
            level: 0,
            hold_until: None,
        }
    }

    /// Whether a pass at `now` may write.
    pub fn may_write(&self, now: Instant) -> bool {
        self.hold_until.is_none_or(|t| now >= t)
    }

    /// When the held-back write is due, while it is still in the future.
    pub fn retry_at(&self, now: Instant) -> Option<Instant> {
        self.hold_until.filter(|&t| t > now)
    }

    /// Records a pass that wrote, inserting `inserted` (rule texts). Returns how long the next
    /// write is held back when this write was one too many.
    pub fn wrote(&mut self, now: Instant, inserted: &[String]) -> Option<Duration> {
        self.forget_before(now);
        self.writes.push_back(now);
        for rule in inserted {
            *self.reinserted.entry(rule.clone()).or_default() += 1;
        }
        if self.writes.len() <= self.limit {
            return None;
        }
        self.level += 1;
        let hold = self
            .base
            .saturating_mul(1u32 << (self.level - 1).min(16))
            .min(self.cap);
        self.hold_until = Some(now + hold);
        Some(hold)
    }

    /// Records a pass that did not write; a window without writes ends a fight.
    pub fn quiet(&mut self, now: Instant) {
        if self
            .writes
            .back()
            .is_none_or(|&last| now.duration_since(last) >= self.window)
        {
            self.writes.clear();
            self.reinserted.clear();
            self.level = 0;
            self.hold_until = None;
        }
    }

    /// True while writes are held back or the window still shows a fight.
    pub fn fighting(&self) -> bool {
        self.level > 0
    }

    /// What kept changing, for the log and the status message.
    pub fn describe(&self, now: Instant) -> String {
        let what: Vec<String> = self
            .reinserted
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(rule, n)| format!("{rule} inserted {n} times"))
            .collect();
        let what = if what.is_empty() {
            format!("{} writes", self.writes.len())
        } else {
            what.join(", ")
        };
        let next = self.retry_at(now).map_or("now".to_string(), |t| {
            format!("in {:.1} s", (t - now).as_secs_f64())
        });
        format!(
            "repairs keep being undone: {what} within {} s (another program keeps changing the chain, \
             or the plan cannot reach compliance); loopguard backs off, next repair {next}",
            self.window.as_secs()
        )
    }

    fn forget_before(&mut self, now: Instant) {
        while self
            .writes
            .front()
            .is_some_and(|&t| now.duration_since(t) >= self.window)
        {
            self.writes.pop_front();
        }
        if self.writes.is_empty() {
            self.reinserted.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DROP: &str = "ipv6 -A INPUT -s ::1/128 -j DROP";

    #[test]
    fn a_repair_now_and_then_is_never_held_back() {
        let mut c = Convergence::default();
        let t0 = Instant::now();
        for i in 0..10 {
            let now = t0 + Duration::from_secs(11 * i);
            assert!(c.may_write(now));
            assert_eq!(c.wrote(now, &[DROP.into()]), None);
            c.quiet(now + Duration::from_secs(1));
        }
        assert!(!c.fighting());
    }

    #[test]
    fn a_fight_backs_off_exponentially_up_to_the_cap_and_ends_when_quiet() {
        let mut c = Convergence::new(
            Duration::from_secs(10),
            3,
            Duration::from_secs(1),
            Duration::from_secs(4),
        );
        let mut now = Instant::now();
        for _ in 0..3 {
            assert_eq!(c.wrote(now, &[DROP.into()]), None);
            now += Duration::from_millis(50);
        }
        let mut holds = Vec::new();
        for _ in 0..4 {
            let hold = c.wrote(now, &[DROP.into()]).expect("held back");
            holds.push(hold.as_secs());
            assert!(!c.may_write(now + hold - Duration::from_millis(1)));
            now += hold;
            assert!(c.may_write(now));
        }
        assert_eq!(holds, vec![1, 2, 4, 4], "doubling, capped");
        assert!(c.fighting());
        assert!(
            c.describe(now).contains("DROP inserted 7 times"),
            "{}",
            c.describe(now)
        );
        c.quiet(now + Duration::from_secs(5));
        assert!(c.fighting(), "not quiet for a whole window yet");
        c.quiet(now + Duration::from_secs(10));
        assert!(!c.fighting());
        assert_eq!(c.wrote(now + Duration::from_secs(10), &[DROP.into()]), None);
    }

    #[test]
    fn the_retry_time_is_only_given_while_it_is_ahead() {
        let mut c = Convergence::new(
            Duration::from_secs(10),
            0,
            Duration::from_secs(2),
            Duration::from_secs(2),
        );
        let now = Instant::now();
        let hold = c.wrote(now, &[]).unwrap();
        assert_eq!(c.retry_at(now), Some(now + hold));
        assert_eq!(c.retry_at(now + hold), None);
    }
}
