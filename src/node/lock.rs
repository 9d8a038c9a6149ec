//! Exclusive `flock` locks with a bounded wait: the xtables lock shared with every iptables user
//! of a host, and loopguard's own lock beside its state file.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

/// An exclusive `flock` held until drop.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

/// Takes an exclusive `flock` on `file`, retrying for up to `wait` (every millisecond for the
/// first 50 ms, then twice as long each time up to 20 ms: a lock held for a moment, as an
/// iptables command holds it, costs a moment; a try is a syscall); `None` when another holder
/// kept it that long.
pub fn flock_within(file: File, wait: Duration) -> Option<FileLock> {
    let started = Instant::now();
    let deadline = started.checked_add(wait);
    let mut pause = Duration::from_millis(1);
    loop {
        // LOCK_NB never blocks.
        if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok() {
            return Some(FileLock { _file: file });
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        std::thread::sleep(pause);
        if started.elapsed() >= Duration::from_millis(50) {
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}

/// The xtables lock as iptables takes it (the same file, created when missing): `Some(Some(_))`
/// held, `None` when another holder kept it for `wait`, `Some(None)` when the file cannot be
/// opened (a read-only /run without the host's lock mounted): there is no lock to take then, and
/// iptables itself goes on without one.
pub fn xtables_lock(path: &Path, wait: Duration) -> Option<Option<FileLock>> {
    let file = match std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
    {
        Ok(file) => file,
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "xtables lock not available");
            return Some(None);
        }
    };
    flock_within(file, wait).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_waited_for_then_given_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let open = || File::create(&path).unwrap();
        let holder = flock_within(open(), Duration::ZERO).expect("free lock");
        let started = Instant::now();
        assert!(flock_within(open(), Duration::from_millis(200)).is_none());
        assert!(started.elapsed() >= Duration::from_millis(200));
        drop(holder);
        assert!(flock_within(open(), Duration::ZERO).is_some());
    }
}
