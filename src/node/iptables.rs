//! Running the iptables binaries of one backend: read a built-in chain with `-S`, apply a plan
//! with one `*-restore --noflush` transaction, and wait for the xtables lock.

use super::lock::FileLock;
use crate::rules::{Chain, ChainListing, Family, Tables};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// The iptables backend of a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Backend {
    #[serde(rename = "iptables-nft")]
    Nft,
    #[serde(rename = "iptables-legacy")]
    Legacy,
}

impl Backend {
    pub fn suffix(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "iptables-{}", self.suffix())
    }
}

/// The default xtables lock, shared by every iptables user of a host (`XTABLES_LOCKFILE` overrides).
pub fn default_lock_path() -> PathBuf {
    std::env::var_os("XTABLES_LOCKFILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/xtables.lock"))
}

/// The iptables commands of one backend.
#[derive(Clone, Debug)]
pub struct Xtables {
    pub backend: Backend,
    /// How long to wait for the xtables lock.
    pub wait: Duration,
    pub lock_path: PathBuf,
}

impl Xtables {
    pub fn new(backend: Backend, wait: Duration, lock_path: PathBuf) -> Xtables {
        Xtables {
            backend,
            wait,
            lock_path,
        }
    }

    /// For backend detection: errors are expected and ignored by the caller.
    pub fn probe(backend: Backend) -> Xtables {
        Xtables::new(backend, Duration::from_secs(1), default_lock_path())
    }

    /// `ip6tables-nft`, `iptables-legacy-restore`, ...
    pub fn binary(&self, family: Family, tool: &str) -> String {
        format!("{}-{}{}", family.command(), self.backend.suffix(), tool)
    }

    /// Fails with a clear message when a binary this backend needs is not installed.
    pub fn require_binaries(&self, families: &[Family]) -> Result<()> {
        for &family in families {
            for tool in ["", "-restore"] {
                let binary = self.binary(family, tool);
                if find_in_path(&binary).is_none() {
                    return Err(Error::MissingBinary {
                        binary,
                        backend: self.backend.suffix().into(),
                    });
                }
            }
        }
        Ok(())
    }

    fn wait_secs(&self) -> u64 {
        self.wait.as_secs().max(1)
    }

    /// The command that reads one built-in chain of the filter table: `ip6tables-nft -S INPUT`.
    fn list_command(&self, family: Family, chain: Chain) -> Command {
        let mut cmd = Command::new(self.binary(family, ""));
        if self.backend == Backend::Legacy {
            cmd.args(["-w", &self.wait_secs().to_string()]);
        }
        cmd.args(["-t", "filter", "-S", chain.name()]);
        cmd
    }

    /// Reads INPUT and OUTPUT of every family in `families`. With nft the listings run side by
    /// side (each is a short process; together they take the time of one). Legacy listings take
    /// the xtables lock and retry only once a second, so they run one after the other.
    pub fn read(&self, families: &[Family]) -> Result<Tables> {
        let targets: Vec<(Family, Chain)> = families
            .iter()
            .flat_map(|&f| Chain::ALL.map(|c| (f, c)))
            .collect();
        let outputs: Vec<Result<Output>> = if self.backend == Backend::Nft {
            let started: Vec<Result<Running>> = targets
                .iter()
                .map(|&(f, c)| self.spawn(self.list_command(f, c), None))
                .collect();
            // Wait for every process that started before reporting the first error.
            started
                .into_iter()
                .map(|r| r.and_then(|child| self.finish(child)))
                .collect()
        } else {
            targets
                .iter()
                .map(|&(f, c)| self.run(self.list_command(f, c), None))
                .collect()
        };
        let mut tables = Tables::default();
        for ((family, chain), out) in targets.into_iter().zip(outputs) {
            let text = String::from_utf8_lossy(&out?.stdout).into_owned();
            tables.insert(family, chain, ChainListing::parse(chain, &text));
        }
        Ok(tables)
    }

    /// Applies one restore script as a single transaction, without flushing anything.
    pub fn restore(&self, family: Family, script: &str) -> Result<()> {
        let mut cmd = Command::new(self.binary(family, "-restore"));
        cmd.arg("--noflush");
        match self.backend {
            // iptables-legacy takes the xtables lock itself and waits for it.
            Backend::Legacy => {
                cmd.arg(format!("--wait={}", self.wait_secs()));
                self.run(cmd, Some(script))?;
            }
            // iptables-nft ignores the lock; loopguard still honours it, so that it never writes
            // in the middle of another tool's locked update.
            Backend::Nft => {
                let _lock = XtablesLock::acquire(&self.lock_path, self.wait)?;
                self.run(cmd, Some(script))?;
            }
        }
        Ok(())
    }

    /// The whole of one family's tables, `*-save` (used only to detect the backend).
    pub fn save(&self, family: Family) -> Result<String> {
        let out = self.run(Command::new(self.binary(family, "-save")), None)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Whether `chain` exists in `table` (used only to detect the backend).
    pub fn chain_exists(&self, family: Family, table: &str, chain: &str) -> bool {
        let mut cmd = Command::new(self.binary(family, ""));
        cmd.args(["-t", table, "-S", chain]);
        self.run(cmd, None).is_ok()
    }

    fn run(&self, cmd: Command, stdin: Option<&str>) -> Result<Output> {
        let child = self.spawn(cmd, stdin)?;
        self.finish(child)
    }

    fn spawn(&self, mut cmd: Command, stdin: Option<&str>) -> Result<Running> {
        let command = describe(&cmd);
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::MissingBinary {
                binary: cmd.get_program().to_string_lossy().into_owned(),
                backend: self.backend.suffix().into(),
            },
            _ => Error::io(format!("starting {command}"), e),
        })?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes())
                .map_err(|e| Error::io(format!("writing to {command}"), e))?;
        }
        Ok(Running { command, child })
    }

    fn finish(&self, running: Running) -> Result<Output> {
        let Running { command, child } = running;
        let out = child
            .wait_with_output()
            .map_err(|e| Error::io(format!("waiting for {command}"), e))?;
        if out.status.success() {
            return Ok(out);
        }
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        Err(classify_failure(
            command,
            out.status.to_string(),
            stderr,
            self,
        ))
    }
}

/// A started iptables process.
struct Running {
    command: String,
    child: std::process::Child,
}

fn classify_failure(command: String, status: String, stderr: String, xt: &Xtables) -> Error {
    if stderr.contains("Permission denied") || stderr.contains("must be root") {
        Error::PermissionDenied {
            command,
            detail: stderr,
        }
    } else if stderr.contains("holding the xtables lock") || stderr.contains("Can't lock") {
        Error::LockTimeout {
            path: xt.lock_path.clone(),
            seconds: xt.wait_secs(),
        }
    } else {
        Error::Command {
            command,
            status,
            stderr,
        }
    }
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

fn find_in_path(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
}

/// The xtables lock, held while loopguard writes with the nft backend (released on drop).
struct XtablesLock {
    _lock: Option<FileLock>,
}

impl XtablesLock {
    fn acquire(path: &Path, wait: Duration) -> Result<XtablesLock> {
        match super::lock::xtables_lock(path, wait) {
            Some(lock) => Ok(XtablesLock { _lock: lock }),
            None => Err(Error::LockTimeout {
                path: path.to_path_buf(),
                seconds: wait.as_secs().max(1),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn binaries_are_named_per_family_and_backend() {
        let nft = Xtables::probe(Backend::Nft);
        assert_eq!(nft.binary(Family::Ipv6, ""), "ip6tables-nft");
        let legacy = Xtables::probe(Backend::Legacy);
        assert_eq!(
            legacy.binary(Family::Ipv4, "-restore"),
            "iptables-legacy-restore"
        );
    }

    #[test]
    fn failures_are_classified_for_the_user() {
        let xt = Xtables::new(
            Backend::Legacy,
            Duration::from_secs(3),
            "/run/xtables.lock".into(),
        );
        let lock = classify_failure(
            "ip6tables-legacy-restore".into(),
            "exit status: 4".into(),
            "Another app is currently holding the xtables lock. Stopped waiting after 3s.".into(),
            &xt,
        );
        assert!(
            matches!(lock, Error::LockTimeout { seconds: 3, .. }),
            "{lock}"
        );
        let perm = classify_failure(
            "ip6tables-nft -S INPUT".into(),
            "exit status: 4".into(),
            "ip6tables v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)".into(),
            &xt,
        );
        assert!(matches!(perm, Error::PermissionDenied { .. }));
        assert!(perm.to_string().contains("CAP_NET_ADMIN"));
    }

    #[test]
    fn lock_held_elsewhere_times_out_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("xtables.lock");
        // Another process holds it, as an iptables command would.
        let holder = std::fs::File::create(&path).unwrap();
        // --no-fork: the lock is held by the process killed below, not by a child of it.
        let mut child = std::process::Command::new("flock")
            .args(["--exclusive", "--no-fork"])
            .arg(&path)
            .args(["sleep", "30"])
            .spawn()
            .expect("flock(1)");
        let started = Instant::now();
        while rustix::fs::flock(&holder, rustix::fs::FlockOperation::NonBlockingLockShared).is_ok()
        {
            rustix::fs::flock(&holder, rustix::fs::FlockOperation::Unlock).unwrap();
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "flock(1) took the lock"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let started = Instant::now();
        let err = XtablesLock::acquire(&path, Duration::from_millis(200))
            .err()
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(err.to_string().contains("xtables lock"), "{err}");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(XtablesLock::acquire(&path, Duration::from_millis(200)).is_ok());
    }
}
