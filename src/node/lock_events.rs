//! The xtables lock as a change signal for the legacy backend. The kernel's legacy tables have no
//! change events, and their shape (size, entry count) misses a rule replaced by one of the same
//! size. But every iptables binary opens the lock file (`/run/xtables.lock`) before it touches a
//! table, reads and writes alike, and closes it when done: an inotify watch on that file says
//! "some program just used iptables" for the cost of a few syscalls, and the drift watch then reads
//! the table once.
//!
//! loopguard takes the same lock, on a file it keeps open (`node::lock`), so its own use closes
//! nothing; it counts the few closes it does make (when the file was replaced), before each, and
//! the watch counts closes: every close beyond loopguard's own count is another program's. The count is read after the events are drained, so loopguard's own closes never
//! exceed it. Writers that do not take the lock (a program writing the table directly, or one
//! with another lock file) are not seen here: the shape probe or the periodic re-check find them.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// An inotify watch on the xtables lock file.
pub struct LockEvents {
    fd: OwnedFd,
    path: PathBuf,
    own: fn(&Path) -> u64,
    /// `own` when the watch began: closes before it were never seen.
    own_before: u64,
    /// The file watched (device, inode).
    watched: Option<(u64, u64)>,
    /// Closes of the file seen so far (everyone's).
    closes: u64,
    /// Closes already reported as another program's.
    reported: u64,
}

const MASK: u32 = libc::IN_CLOSE_WRITE | libc::IN_CLOSE_NOWRITE;
/// The watch is gone (the file was deleted or replaced): watch the new file.
const GONE: u32 = libc::IN_IGNORED | libc::IN_DELETE_SELF | libc::IN_MOVE_SELF;
/// The file's links changed. Its deletion shows only as this while a program (loopguard itself:
/// `node::lock` keeps the file open) still holds it: `IN_DELETE_SELF` waits for the last close.
const LINKS: u32 = libc::IN_ATTRIB;

impl LockEvents {
    /// Watches `path`, creating it as iptables does when it is not there yet. `own` counts
    /// loopguard's closes of a file ([`crate::node::lock::own_closes`]).
    pub fn watch(path: &Path, own: fn(&Path) -> u64) -> io::Result<LockEvents> {
        // SAFETY: inotify_init1 takes flags only; the descriptor is owned at once.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut events = LockEvents {
            fd,
            path: path.to_path_buf(),
            own,
            own_before: 0,
            watched: None,
            closes: 0,
            reported: 0,
        };
        events.add_watch()?;
        // After the watch exists: a close of loopguard's before it is never seen, one after it is.
        events.own_before = own(path);
        Ok(events)
    }

    fn add_watch(&mut self) -> io::Result<()> {
        if !self.path.exists() {
            // Closed before the watch exists: not an event, so not counted either.
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&self.path)?;
        }
        let path = CString::new(self.path.as_os_str().as_bytes())
            .map_err(|_| io::Error::other("the lock path holds a NUL byte"))?;
        // SAFETY: a valid descriptor and a NUL-terminated path that outlives the call.
        let wd = unsafe {
            libc::inotify_add_watch(
                self.fd.as_raw_fd(),
                path.as_ptr(),
                MASK | LINKS | libc::IN_DELETE_SELF | libc::IN_MOVE_SELF,
            )
        };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        self.watched = self.names();
        Ok(())
    }

    /// The file `path` names now (device, inode).
    fn names(&self) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()))
    }

    /// Waits up to `timeout` for a close of the file (anyone's); whether one is queued.
    pub fn wait(&self, timeout: Duration) -> bool {
        let mut fd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // Rounded up: a wait cut to 0 ms would spin until the deadline.
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        // SAFETY: one pollfd we own, its count given.
        let ready = unsafe { libc::poll(&mut fd, 1, ms) };
        ready > 0 && fd.revents & libc::POLLIN != 0
    }

    /// Whether another program has used the lock since the last call that said so.
    pub fn foreign_use(&mut self) -> bool {
        let gone = self.drain();
        if gone && let Err(e) = self.add_watch() {
            tracing::debug!(path = %self.path.display(), error = %e, "cannot watch the xtables lock again");
        }
        // Read after draining: loopguard's own closes drained so far never exceed it.
        let own = (self.own)(&self.path) - self.own_before;
        let foreign = self.closes.saturating_sub(own);
        if foreign > self.reported {
            self.reported = foreign;
            return true;
        }
        gone
    }

    /// Counts the queued close events; returns whether the watch went away (or the path names
    /// another file than the one watched).
    fn drain(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        let mut gone = false;
        let mut links = false;
        loop {
            // SAFETY: read into a buffer we own, with its length.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                )
            };
            if n <= 0 {
                return gone || (links && self.names() != self.watched);
            }
            let (closes, went, linked) = count_events(&buf[..n as usize]);
            self.closes += closes;
            gone |= went;
            links |= linked;
        }
    }
}

/// Walks `struct inotify_event`s (wd, mask, cookie, len, then `len` bytes of name): the number of
/// closes, whether the watch went away, and whether the file's links changed.
fn count_events(mut buf: &[u8]) -> (u64, bool, bool) {
    const HEADER: usize = 16;
    let (mut closes, mut gone, mut links) = (0, false, false);
    while buf.len() >= HEADER {
        let mask = u32::from_ne_bytes(buf[4..8].try_into().expect("4 bytes"));
        let len = u32::from_ne_bytes(buf[12..16].try_into().expect("4 bytes")) as usize;
        if mask & MASK != 0 {
            closes += 1;
        }
        gone |= mask & GONE != 0;
        links |= mask & LINKS != 0;
        buf = &buf[(HEADER + len).min(buf.len())..];
    }
    (closes, gone, links)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn close_of(path: &Path) {
        drop(std::fs::File::open(path).unwrap());
    }

    #[test]
    fn only_other_programs_closes_count() {
        static OWN: AtomicU64 = AtomicU64::new(3);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("xtables.lock");
        let mut events = LockEvents::watch(&path, |_| OWN.load(Ordering::SeqCst)).unwrap();
        assert!(path.exists(), "created as iptables does");
        assert!(!events.foreign_use());
        // Closes of loopguard's before the watch (3) hide nothing after it.
        close_of(&path);
        assert!(events.foreign_use(), "another program's close");
        // loopguard's own close: counted before it.
        OWN.fetch_add(1, Ordering::SeqCst);
        close_of(&path);
        assert!(!events.foreign_use(), "loopguard's own close");
        close_of(&path);
        assert!(events.foreign_use(), "another program's close");
        assert!(!events.foreign_use(), "reported once");
        // A close of loopguard's counted but not yet made hides another's until it is made.
        OWN.fetch_add(1, Ordering::SeqCst);
        close_of(&path);
        assert!(!events.foreign_use());
        close_of(&path);
        assert!(events.foreign_use());
    }

    /// loopguard's own use of the lock (`node::lock`, the file kept open) closes nothing: it
    /// wakes no watch, its own or another loopguard's.
    #[test]
    fn taking_the_lock_wakes_no_watch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("xtables.lock");
        let mut events = LockEvents::watch(&path, crate::node::lock::own_closes).unwrap();
        for _ in 0..3 {
            let held = crate::node::lock::xtables_lock(&path, Duration::from_secs(1));
            assert!(matches!(held, Some(Some(_))), "the lock is taken");
        }
        assert!(!events.wait(Duration::from_millis(50)), "no close queued");
        assert!(!events.foreign_use());
        close_of(&path);
        assert!(
            events.foreign_use(),
            "another program's close is still seen"
        );
    }

    /// The lock file deleted and made again while loopguard keeps the old one open: the watch
    /// moves to the new file at once (the old file's deletion event waits for the last close).
    #[test]
    fn a_lock_file_replaced_while_kept_open_is_watched_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("xtables.lock");
        let mut events = LockEvents::watch(&path, crate::node::lock::own_closes).unwrap();
        drop(crate::node::lock::xtables_lock(
            &path,
            Duration::from_secs(1),
        ));
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"").unwrap();
        assert!(events.foreign_use(), "the file was replaced: look again");
        close_of(&path);
        assert!(events.foreign_use(), "the new file is watched");
        assert!(!events.foreign_use());
    }

    #[test]
    fn a_replaced_lock_file_is_watched_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("xtables.lock");
        let mut events = LockEvents::watch(&path, |_| 0).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"").unwrap();
        assert!(events.foreign_use(), "the file was replaced: look again");
        close_of(&path);
        assert!(events.foreign_use(), "the new file is watched");
    }
}
