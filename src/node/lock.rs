//! Exclusive `flock` locks with a bounded wait: the xtables lock shared with every iptables user
//! of a host, and loopguard's own lock beside its state file.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

/// An exclusive `flock` held until drop.
#[derive(Debug)]
pub struct FileLock {
    held: Held,
}

#[derive(Debug)]
enum Held {
    /// A file of its own: closing it releases the lock.
    File { _file: File },
    /// The xtables lock file kept in `slot`: unlocked on drop, and kept open.
    Kept {
        slot: &'static Slot,
        file: MutexGuard<'static, Option<File>>,
    },
}

impl Drop for FileLock {
    fn drop(&mut self) {
        if let Held::Kept { slot, file } = &mut self.held
            && let Some(open) = file.as_ref()
            && rustix::fs::flock(open, rustix::fs::FlockOperation::Unlock).is_err()
        {
            // Closing the file releases the lock in any case.
            slot.close(file);
        }
    }
}

/// Takes an exclusive `flock` on `file`, retrying for up to `wait` (every millisecond for the
/// first 50 ms, then twice as long each time up to 20 ms: a lock held for a moment, as an
/// iptables command holds it, costs a moment; a try is a syscall); `None` when another holder
/// kept it that long.
pub fn flock_within(file: File, wait: Duration) -> Option<FileLock> {
    flock_until(&file, Instant::now(), wait).then_some(FileLock {
        held: Held::File { _file: file },
    })
}

/// [`flock_within`] on a file that stays open, counting `wait` from `started`.
fn flock_until(file: &File, started: Instant, wait: Duration) -> bool {
    retry_until(started, wait, || {
        // LOCK_NB never blocks.
        rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok()
    })
}

/// Calls `attempt` until it succeeds or `wait` has passed since `started`, pausing as
/// [`flock_within`] says.
fn retry_until(started: Instant, wait: Duration, mut attempt: impl FnMut() -> bool) -> bool {
    let deadline = started.checked_add(wait);
    let mut pause = Duration::from_millis(1);
    loop {
        if attempt() {
            return true;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return false;
        }
        std::thread::sleep(pause);
        if started.elapsed() >= Duration::from_millis(50) {
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}

/// The xtables lock file, opened once per path and kept open: loopguard takes and releases the
/// lock with `flock` alone, so its own use of the lock closes nothing. Programs that watch the
/// file for closes (`node::lock_events`: loopguard's legacy drift watch, which another loopguard
/// runs in another network namespace of the same host, or beside this one during a rolling update)
/// would otherwise wake on every read loopguard makes, and two such watches wake each other
/// without end. One slot per path (one in practice: `/run/xtables.lock` or `XTABLES_LOCKFILE`),
/// each made once and kept for the process's life.
static KEPT: Mutex<Vec<(PathBuf, &'static Slot)>> = Mutex::new(Vec::new());

/// What is kept for one path: the file, if it could be opened, and how many times this process
/// has closed one (counted before each close).
#[derive(Debug, Default)]
struct Slot {
    file: Mutex<Option<File>>,
    closes: AtomicU64,
}

impl Slot {
    /// Closes the file kept here, counted first.
    fn close(&self, kept: &mut Option<File>) {
        if let Some(old) = kept.take() {
            self.closes.fetch_add(1, Ordering::SeqCst);
            drop(old);
        }
    }
}

/// The slot of the file kept for `path`.
fn slot(path: &Path) -> &'static Slot {
    let mut slots = KEPT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, slot)) = slots.iter().find(|(p, _)| p == path) {
        return slot;
    }
    let slot: &'static Slot = Box::leak(Box::default());
    slots.push((path.to_path_buf(), slot));
    slot
}

/// Whether `path` still names `file` (it was not deleted or replaced since it was opened).
fn names(path: &Path, file: &File) -> bool {
    let (Ok(now), Ok(kept)) = (std::fs::metadata(path), file.metadata()) else {
        return false;
    };
    now.dev() == kept.dev() && now.ino() == kept.ino()
}

/// How many times this process has closed the xtables lock file at `path` (counted before each
/// close): the drift watch tells the lock's other users from loopguard by it (see
/// `node::lock_events`).
pub fn own_closes(path: &Path) -> u64 {
    slot(path).closes.load(Ordering::SeqCst)
}

/// The xtables lock as iptables takes it (the same file, created when missing): `Some(Some(_))`
/// held, `None` when another holder kept it for `wait`, `Some(None)` when the file cannot be
/// opened (a read-only /run without the host's lock mounted): there is no lock to take then, and
/// iptables itself goes on without one. The file stays open between uses (see [`KEPT`]); one
/// holder in the process at a time (`flock` does not keep two users of one open file apart).
pub fn xtables_lock(path: &Path, wait: Duration) -> Option<Option<FileLock>> {
    let started = Instant::now();
    let slot = slot(path);
    let mut guard = None;
    retry_until(started, wait, || match slot.file.try_lock() {
        Ok(g) => {
            guard = Some(g);
            true
        }
        Err(TryLockError::Poisoned(p)) => {
            guard = Some(p.into_inner());
            true
        }
        Err(TryLockError::WouldBlock) => false,
    });
    // Set once a try succeeded.
    let mut kept = guard?;
    if !kept.as_ref().is_some_and(|file| names(path, file)) {
        slot.close(&mut kept);
        match std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
        {
            Ok(file) => *kept = Some(file),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "xtables lock not available");
                return Some(None);
            }
        }
    }
    if !flock_until(kept.as_ref().expect("opened above"), started, wait) {
        return None;
    }
    Some(Some(FileLock {
        held: Held::Kept { slot, file: kept },
    }))
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

    /// The kept xtables lock file keeps threads of one process apart too (`flock` alone would
    /// not: they share the open file), and is opened anew when the path names another file.
    #[test]
    fn the_kept_xtables_lock_is_one_holder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("xtables.lock");
        let holder = xtables_lock(&path, Duration::ZERO)
            .expect("free")
            .expect("a file");
        let other = {
            let path = path.clone();
            std::thread::spawn(move || xtables_lock(&path, Duration::from_millis(100)).is_some())
        };
        assert!(
            !other.join().unwrap(),
            "another thread waited, then gave up"
        );
        drop(holder);
        std::fs::remove_file(&path).unwrap();
        let again = xtables_lock(&path, Duration::ZERO)
            .expect("free")
            .expect("a file");
        assert!(path.exists(), "the lock file made again");
        assert_eq!(own_closes(&path), 1, "the replaced file's close counted");
        drop(again);
        let other = {
            let path = path.clone();
            std::thread::spawn(move || xtables_lock(&path, Duration::ZERO).is_some())
        };
        assert!(other.join().unwrap(), "released");
    }
}
