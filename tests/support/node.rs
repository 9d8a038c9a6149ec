//! One node under test for the node-engine tests: a network namespace, a backend, a host root
//! where the CIS rule applies, a state file, and shims that record (and, when asked, disturb)
//! every `*-restore` process loopguard starts.

#![allow(dead_code)]

use crate::netns::{self, TestNetns};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_loopguard");

/// The shim in front of a `*-restore` binary. It logs each call to `restores.log`; notes in
/// `overlaps.log` when two restores run at once (each holds `restore.active` while it runs);
/// holds each restore for `$LGT_RESTORE_HOLD` seconds when set (to widen that window); swallows it
/// (success, nothing applied) with `$LGT_RESTORE_NOOP` set; and with
/// `$LGT_KILL_AFTER_RESTORE` set, SIGKILLs loopguard right after a successful restore, before it
/// can write down what it did.
fn restore_shim(dir: &Path, real: &Path) -> String {
    let dir = dir.display();
    format!(
        r#"#!/bin/sh
echo "$0 $*" >> {dir}/restores.log
mkdir {dir}/restore.active 2>/dev/null || echo "$$" >> {dir}/overlaps.log
[ -n "$LGT_RESTORE_HOLD" ] && sleep "$LGT_RESTORE_HOLD"
if [ -n "$LGT_RESTORE_NOOP" ]; then cat >/dev/null; rc=0; else {real} "$@"; rc=$?; fi
rmdir {dir}/restore.active 2>/dev/null
[ $rc -eq 0 ] && [ -n "$LGT_KILL_AFTER_RESTORE" ] && kill -9 $PPID
exit $rc
"#,
        real = real.display()
    )
}

/// One node under test: a namespace, a backend, a host root whose dpkg database says "iptables
/// installed, nftables and ufw not" (where the CIS rule applies), a state file, and shims that
/// record every `*-restore` process loopguard starts.
pub struct Node {
    pub ns: TestNetns,
    pub backend: &'static str,
    pub dir: tempfile::TempDir,
}

impl Node {
    pub fn new(tag: &str, backend: &'static str) -> Node {
        let ns = TestNetns::new(tag);
        let dir = tempfile::tempdir().unwrap();
        let dpkg = dir.path().join("host/var/lib/dpkg");
        std::fs::create_dir_all(&dpkg).unwrap();
        std::fs::write(
            dpkg.join("status"),
            "Package: iptables\nStatus: install ok installed\n\nPackage: nftables\nStatus: deinstall ok config-files\n",
        )
        .unwrap();
        let shims = dir.path().join("shims");
        std::fs::create_dir_all(&shims).unwrap();
        for family in ["ip6tables", "iptables"] {
            for b in ["nft", "legacy"] {
                let name = format!("{family}-{b}-restore");
                let real = find_binary(&name);
                let shim = shims.join(&name);
                std::fs::write(&shim, restore_shim(dir.path(), &real)).unwrap();
                make_executable(&shim);
            }
        }
        if backend == "legacy" {
            // A legacy host has its filter tables (the kernel makes them on first use); start there.
            ns.run(&["ip6tables-legacy", "-S"]);
            ns.run(&["iptables-legacy", "-S"]);
        }
        Node { ns, backend, dir }
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir.path().join("state/state.json")
    }

    /// Runs `loopguard node <cmd> --netns NS --backend B --state-file F [--host-root H] ARGS`.
    pub fn loopguard(&self, cmd: &str, args: &[&str]) -> Output {
        self.loopguard_command(cmd, args).output().unwrap()
    }

    pub fn loopguard_command(&self, cmd: &str, args: &[&str]) -> Command {
        self.invoker().command(cmd, args)
    }

    /// What it takes to run loopguard and ip6tables on this node from another thread.
    pub fn invoker(&self) -> Invoker {
        Invoker {
            netns: self.ns.name.clone(),
            backend: Some(self.backend),
            dir: self.dir.path().to_path_buf(),
        }
    }

    /// Runs a node command with `--output json`; returns (exit code, report).
    pub fn json(&self, cmd: &str, args: &[&str]) -> (i32, Value) {
        let mut all = vec!["--output", "json"];
        all.extend(args);
        let out = self.loopguard(cmd, &all);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "{cmd}: no JSON report ({e}); stdout: {stdout}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code().unwrap(), report)
    }

    /// How many times two restores ran at once.
    pub fn overlaps(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("overlaps.log"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// How many times `ip6tables -S CHAIN` of this node lists exactly `-A CHAIN spec`.
    pub fn copies(&self, chain: &str, spec: &str) -> usize {
        let line = format!("-A {chain} {spec}");
        self.chain(chain).iter().filter(|l| **l == line).count()
    }

    pub fn restores(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("restores.log"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    pub fn ip6(&self, args: &str) -> String {
        self.ns.ip6tables(self.backend, args)
    }

    pub fn chain(&self, chain: &str) -> Vec<String> {
        self.ip6(&format!("-S {chain}"))
            .lines()
            .filter(|l| l.starts_with("-A"))
            .map(str::to_string)
            .collect()
    }

    pub fn save(&self) -> String {
        self.ns.save("ip6tables", self.backend)
    }

    /// Runs the seed's own remediation script as users do today, with `ip6tables` pointing at this
    /// backend and `dpkg-query` answering like a host where the rule applies.
    pub fn run_seed_script(&self) {
        let out = netns::seed_script(
            &self.ns.name,
            self.backend,
            &self.dir.path().join("seed-bin"),
        )
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "seed script: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "seed script said: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn scanner_passes(&self) -> bool {
        netns::scanner_passes(&self.ns.name, self.backend)
    }
}

pub fn find_binary(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} not found: install iptables (apt-get install iptables)");
}

pub fn make_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

pub fn states(report: &Value) -> Vec<(String, String)> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["rule"].as_str().unwrap().to_string(),
                f["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

pub fn changes(report: &Value) -> usize {
    report["changes"].as_array().expect("changes").len()
}

/// Runs loopguard and ip6tables on one node; cheap to clone into threads.
#[derive(Clone, Debug)]
pub struct Invoker {
    pub netns: String,
    /// `--backend` for loopguard (`None`: detect, as the chart runs it).
    pub backend: Option<&'static str>,
    pub dir: PathBuf,
}

impl Invoker {
    /// `loopguard node <cmd> --netns NS [--backend B] --state-file F [--host-root H] ARGS`, with
    /// the restore shims first in PATH and the node's own xtables lock.
    pub fn command(&self, cmd: &str, args: &[&str]) -> Command {
        let path = format!(
            "{}:{}",
            self.dir.join("shims").display(),
            std::env::var("PATH").unwrap()
        );
        let mut c = Command::new(BIN);
        c.args(["node", cmd, "--netns", &self.netns]);
        if let Some(backend) = self.backend {
            c.args(["--backend", backend]);
        }
        c.arg("--state-file")
            .arg(self.dir.join("state/state.json"))
            .env("PATH", path)
            .env("XTABLES_LOCKFILE", self.dir.join("xtables.lock"))
            .stdin(Stdio::null());
        if cmd != "cleanup" {
            c.arg("--host-root").arg(self.dir.join("host"));
        }
        c.args(args);
        c
    }

    /// `ip6tables-<backend> ARGS` in the node's namespace, sharing loopguard's xtables lock (as
    /// every writer of a real host shares /run/xtables.lock). Returns whether it succeeded.
    pub fn ip6tables(&self, args: &[&str]) -> Output {
        let backend = self.backend.expect("a forced backend");
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.netns,
                &format!("ip6tables-{backend}"),
            ])
            .args(args)
            .env("XTABLES_LOCKFILE", self.dir.join("xtables.lock"))
            .stdin(Stdio::null())
            .output()
            .expect("run ip6tables")
    }

    /// How many rules of INPUT are exactly `-A INPUT spec`.
    pub fn input_copies(&self, spec: &str) -> usize {
        let out = self.ip6tables(&["-S", "INPUT"]);
        assert!(out.status.success(), "ip6tables -S INPUT failed: {out:?}");
        let line = format!("-A INPUT {spec}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| *l == line)
            .count()
    }
}

/// A `loopguard node watch --output json` running in the background; its reports and log are
/// collected as they come. Killed on drop.
pub struct Watch {
    child: std::process::Child,
    reports: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    log: std::sync::Arc<std::sync::Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Node {
    /// Starts `node watch --output json ARGS` (the backend flag as for every command).
    pub fn watch(&self, args: &[&str]) -> Watch {
        let mut all = vec!["--output", "json"];
        all.extend(args);
        Watch::start(self.loopguard_command("watch", &all))
    }
}

impl Watch {
    pub fn start(mut command: Command) -> Watch {
        use std::io::BufRead;
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start loopguard node watch");
        let reports = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (r, l) = (reports.clone(), log.clone());
        let readers = vec![
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stdout)
                    .lines()
                    .map_while(Result::ok)
                {
                    let report = serde_json::from_str(&line).unwrap_or_else(|e| {
                        panic!("watch printed a line that is not JSON ({e}): {line}")
                    });
                    r.lock().unwrap().push(report);
                }
            }),
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stderr)
                    .lines()
                    .map_while(Result::ok)
                {
                    let mut log = l.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            }),
        ];
        Watch {
            child,
            reports,
            log,
            readers,
        }
    }

    pub fn reports(&self) -> Vec<Value> {
        self.reports.lock().unwrap().clone()
    }

    /// The last three reports, for messages.
    fn last_reports(&self) -> String {
        let all = self.reports();
        all[all.len().saturating_sub(3)..]
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits up to `timeout` for a report that satisfies `pred`; panics with the log if none comes.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: std::time::Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let started = std::time::Instant::now();
        loop {
            if let Some(report) = self.reports().into_iter().find(|r| pred(r)) {
                return report;
            }
            self.check_alive(what);
            assert!(
                started.elapsed() < timeout,
                "no report {what} within {timeout:?}; last reports: {}\nlog:\n{}",
                self.last_reports(),
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` until the latest report satisfies `pred`.
    pub fn wait_for_latest(
        &mut self,
        what: &str,
        timeout: std::time::Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let started = std::time::Instant::now();
        loop {
            if let Some(report) = self.reports().pop().filter(|r| pred(r)) {
                return report;
            }
            self.check_alive(what);
            assert!(
                started.elapsed() < timeout,
                "latest report not {what} within {timeout:?}; last reports: {}\nlog:\n{}",
                self.last_reports(),
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    fn check_alive(&mut self, what: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "watch exited ({status}) before {what}; log:\n{}",
                self.log()
            );
        }
    }

    /// Waits up to `timeout` for `needle` in the log.
    pub fn wait_for_log(&mut self, needle: &str, timeout: std::time::Duration) {
        let started = std::time::Instant::now();
        while !self.log().contains(needle) {
            self.check_alive(needle);
            assert!(
                started.elapsed() < timeout,
                "{needle:?} not logged within {timeout:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The watch process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops the watch with SIGTERM; returns whether it exited cleanly, and its log.
    pub fn stop(mut self) -> (bool, String) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("wait for watch");
        for reader in self.readers.drain(..) {
            reader.join().expect("reader thread");
        }
        (status.success(), self.log())
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `body` on another thread, again and again, until the returned guard is dropped (or
/// `stop`ped); `body` gets the round number.
pub struct Repeat {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Repeat {
    pub fn start(mut body: impl FnMut(usize) + Send + 'static) -> Repeat {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut round = 0;
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                body(round);
                round += 1;
            }
        });
        Repeat {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops the loop after its current round; panics if a round panicked.
    pub fn stop(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(handle) = self.handle.take()
            && let Err(panic) = handle.join()
        {
            std::panic::resume_unwind(panic);
        }
    }
}

impl Drop for Repeat {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}
