//! A named network namespace (`/run/netns/<name>`, as `ip netns add` makes it) standing for a node.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, IoContext, Result};

/// Owns a named network namespace with `lo` up; dropping it deletes the namespace.
///
/// While the namespace exists, a `netns` marker file sits in the node's state folder, so that
/// `hack/cluster.sh down` can delete namespaces whose harness crashed before cleaning up.
pub struct Netns {
    name: String,
    file: File,
    marker: PathBuf,
}

impl Netns {
    pub fn create(name: &str, node_dir: &Path) -> Result<Self> {
        let path = Path::new("/run/netns").join(name);
        if path.exists() {
            return Err(Error::Invalid(format!(
                "network namespace {name} already exists (left over? `ip netns delete {name}`)"
            )));
        }
        ip(&["netns", "add", name])?;
        let marker = node_dir.join("netns");
        // From here on, dropping `netns` deletes the namespace again.
        let netns = Self {
            name: name.to_owned(),
            file: File::open(&path).context(|| format!("opening {}", path.display()))?,
            marker,
        };
        std::fs::write(&netns.marker, name)
            .context(|| format!("writing {}", netns.marker.display()))?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Runs `f` on a fresh thread that has entered this namespace, so no other work ever runs there.
    /// Sockets created by `f` stay in this namespace after the thread ends.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let fd = self.file.as_raw_fd();
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns only changes this thread's namespace; `fd` is open for the scope.
                    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(f())
                })
                .join()
                .expect("netns thread panicked")
        })
        .context(|| format!("entering network namespace {}", self.name))
    }
}

impl Drop for Netns {
    /// Kills whatever still runs in the namespace (a process that left its process group, say), as a
    /// node that goes away takes its processes along, then deletes the namespace.
    fn drop(&mut self) {
        if let Ok(output) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            let pids = String::from_utf8_lossy(&output.stdout);
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: kill has no memory effects.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if let Err(e) = ip(&["netns", "delete", &self.name]) {
            tracing::warn!(netns = %self.name, "{e}");
        }
        let _ = std::fs::remove_file(&self.marker);
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context(|| "running ip".to_owned())?;
    if output.status.success() {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    )))
}
