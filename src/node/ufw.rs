//! The ufw rule's effects: the host's own `ufw`, run in the host's root (`chroot` into
//! `--host-root` when it is not `/`, which needs CAP_SYS_CHROOT), for `ufw status verbose` (what
//! ComplianceAsCode's check reads) and for adding or deleting one of the four rules of its
//! remediation. loopguard never runs `ufw enable`, `disable`, `reset` or `default`.

use crate::rules::ufw::UfwRule;
use crate::{Error, Result};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where the host's ufw lives, relative to its root.
const UFW: &str = "/usr/sbin/ufw";

/// The host's ufw.
#[derive(Clone, Debug)]
pub struct Ufw {
    root: PathBuf,
}

impl Ufw {
    pub fn new(host_root: &Path) -> Ufw {
        Ufw {
            root: host_root.to_path_buf(),
        }
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let shown = format!("ufw {}", args.join(" "));
        if !self.root.join(UFW.trim_start_matches('/')).exists() {
            return Err(Error::Invalid(format!(
                "{UFW} not found under the host root {}: ufw is installed by its package database but its command is not there",
                self.root.display()
            )));
        }
        let mut command = Command::new(UFW);
        command
            .args(args)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if self.root != Path::new("/") {
            let root = self.root.clone();
            // SAFETY: between fork and exec only chroot(2) and chdir(2) run, both async-signal-safe.
            unsafe {
                command.pre_exec(move || {
                    std::os::unix::fs::chroot(&root)?;
                    std::env::set_current_dir("/")
                });
            }
        }
        let out = command.output().map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => Error::Invalid(format!(
                "running the host's ufw in {} was refused ({e}): chroot needs CAP_SYS_CHROOT (the chart adds it only with agent.ufw.enforce=true)",
                self.root.display()
            )),
            _ => Error::io(format!("running {shown} in {}", self.root.display()), e),
        })?;
        if !out.status.success() {
            return Err(Error::Command {
                command: shown,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ufw status verbose`, as ComplianceAsCode's check reads it.
    pub fn status(&self) -> Result<String> {
        self.run(&["status", "verbose"])
    }

    /// Adds one rule (`ufw allow in on lo`, ...).
    pub fn add(&self, rule: UfwRule) -> Result<()> {
        self.run(rule.args()).map(|_| ())
    }

    /// Deletes one rule (`ufw delete allow in on lo`, ...): ufw deletes its IPv4 and IPv6 forms.
    pub fn delete(&self, rule: UfwRule) -> Result<()> {
        let mut args = vec!["delete"];
        args.extend_from_slice(rule.args());
        self.run(&args).map(|_| ())
    }
}
