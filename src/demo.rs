//! `loopguard demo`: the first thing a newcomer runs. A throwaway network namespace stands in for
//! a node; the demo runs the real `loopguard node` commands against it and always deletes it.

use crate::node::iptables::{Backend, Xtables};
use crate::rules::Family;
use crate::{Error, Result};
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err(Error::Invalid("interrupted".into()))
    } else {
        Ok(())
    }
}

/// Deletes the demo namespace and its files on every way out.
struct Scratch {
    netns: String,
    dir: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        println!("\n$ ip netns del {}", self.netns);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn run() -> Result<ExitCode> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "loopguard demo needs root: it creates a throwaway network namespace and programs ip6tables inside it.\n\
             Run it as root (for example `sudo loopguard demo`); nothing outside that namespace is touched."
        );
        return Ok(ExitCode::from(2));
    }
    Xtables::probe(Backend::Nft).require_binaries(&[Family::Ipv6])?;
    // SAFETY: installing an async-signal-safe handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let netns = format!("loopguard-demo-{}", std::process::id());
    let dir = std::env::temp_dir().join(&netns);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating the demo folder", e))?;
    say(
        "loopguard demo: a throwaway network namespace stands in for a node. Nothing outside it is touched.",
    );
    shell(&["ip", "netns", "add", &netns])?;
    let scratch = Scratch { netns, dir };
    shell(&["ip", "-n", &scratch.netns, "link", "set", "lo", "up"])?;
    let result = tour(&scratch);
    drop(scratch);
    match result {
        Ok(()) => {
            say(
                "That's loopguard on one node. In a cluster, the agent DaemonSet does this on every node and reports to the LoopbackPolicy status.",
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(_) if INTERRUPTED.load(Ordering::SeqCst) => {
            eprintln!("demo interrupted; namespace deleted");
            Ok(ExitCode::from(130))
        }
        Err(e) => Err(e),
    }
}

fn tour(s: &Scratch) -> Result<()> {
    let state = s.dir.join("state.json");
    let state = state.to_str().expect("utf-8 temp path");
    let node = |cmd: &'static str| -> Vec<String> {
        let mut args: Vec<String> = ["node", cmd, "--netns", &s.netns, "--state-file", state]
            .map(String::from)
            .to_vec();
        if cmd != "cleanup" {
            // The demo namespace has no host of its own to judge applicability from; steps 1-5
            // show the seed's ip6tables rule, step 6 the nftables one.
            args.extend(
                [
                    "--applicability",
                    "always",
                    "--nftables",
                    "ignore",
                    "--ufw",
                    "ignore",
                    "--firewalld",
                    "ignore",
                ]
                .map(String::from),
            );
        }
        args
    };

    step("1. A fresh node has no loopback rules: not compliant (exit code 1).");
    say(
        "   (--applicability always: on a real node, the default `auto` first checks the CIS rule's own conditions: iptables installed, nftables and ufw not, IPv6 on.)",
    );
    loopguard(&node("check"))?;

    step("2. Enforce: the smallest plan, applied as ONE ip6tables-restore --noflush transaction.");
    loopguard(&node("enforce"))?;

    step("3. Enforce again: already compliant, so nothing is written at all.");
    loopguard(&node("enforce"))?;

    step(
        "4. Drift: a watcher is running; someone deletes a rule by hand (or a firewall reload wipes it).",
    );
    let mut args = node("watch");
    args.extend(["--log-format", "json"].map(String::from));
    println!("$ loopguard {} &", args.join(" "));
    let mut watcher =
        Command::new(std::env::current_exe().map_err(|e| Error::io("finding loopguard", e))?)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::io("starting the watcher", e))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = watcher.stderr.take().expect("piped");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(|l| l.ok())
        {
            let _ = tx.send(line);
        }
    });
    let outcome = (|| {
        wait_for_log(&rx, "watching for drift", Duration::from_secs(10))?;
        let deleted = Instant::now();
        shell(&[
            "ip",
            "netns",
            "exec",
            &s.netns,
            "ip6tables-nft",
            "-D",
            "INPUT",
            "-s",
            "::1/128",
            "-j",
            "DROP",
        ])?;
        let line = wait_for_log(&rx, "repaired drift", Duration::from_secs(10))?;
        let seen = deleted.elapsed();
        let latency = serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| v["latency_ms"].as_str().map(str::to_string))
            .unwrap_or_else(|| "?".into());
        say(&format!(
            "   The watcher got the kernel's nftables event and put the rule back {latency} ms after the change (we saw its log {:.1} ms after our delete returned).",
            seen.as_secs_f64() * 1000.0
        ));
        loopguard(&node("check"))
    })();
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(watcher.id() as libc::pid_t, libc::SIGTERM) };
    let _ = watcher.wait();
    outcome?;

    step(
        "5. Cleanup removes exactly the rules loopguard inserted (rules it found in place would stay).",
    );
    loopguard(&node("cleanup"))?;

    step(
        "6. A node with nftables installed (most node images): the CIS rule that applies there is the nftables one.",
    );
    say(
        "   loopguard reads the host's packages (here a dpkg database that lists iptables and nftables) and writes a table of its own, `table inet loopguard`, never another table.",
    );
    let host = s.dir.join("nftables-host");
    let dpkg = host.join("var/lib/dpkg");
    std::fs::create_dir_all(&dpkg).map_err(|e| Error::io("creating the demo host", e))?;
    std::fs::write(
        dpkg.join("status"),
        "Package: iptables\nStatus: install ok installed\n\nPackage: nftables\nStatus: install ok installed\n",
    )
    .map_err(|e| Error::io("writing the demo host's dpkg status", e))?;
    let nft_node = |cmd: &str| -> Vec<String> {
        let mut args: Vec<String> = ["node", cmd, "--netns", &s.netns, "--state-file", state]
            .map(String::from)
            .to_vec();
        if cmd != "cleanup" {
            args.extend(["--host-root".to_string(), host.display().to_string()]);
            args.extend(["--nftables", "enforce"].map(String::from));
        }
        args
    };
    loopguard(&nft_node("enforce"))?;
    say(
        "   `nft flush ruleset` (what Debian's nftables.service does on reload) would bring a watcher's repair at once; cleanup deletes the table:",
    );
    loopguard(&nft_node("cleanup"))?;
    Ok(())
}

fn say(text: &str) {
    println!("{text}");
}

fn step(text: &str) {
    println!("\n== {text}");
}

/// Runs loopguard itself as a user would, echoing the command line.
fn loopguard(args: &[String]) -> Result<()> {
    interrupted()?;
    println!("$ loopguard {}", args.join(" "));
    let exe = std::env::current_exe().map_err(|e| Error::io("finding loopguard", e))?;
    let status = Command::new(exe)
        .args(args)
        .status()
        .map_err(|e| Error::io("running loopguard", e))?;
    interrupted()?;
    if let Some(code) = status.code()
        && code != 2
    {
        println!("(exit code {code})");
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "`loopguard {}` failed ({status})",
        args.join(" ")
    )))
}

fn shell(args: &[&str]) -> Result<()> {
    println!("$ {}", args.join(" "));
    run_quiet(Path::new(args[0]), &args[1..])
}

fn run_quiet(program: &Path, args: &[&str]) -> Result<()> {
    interrupted()?;
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| Error::io(format!("running {}", program.display()), e))?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "{} {} failed: {}",
        program.display(),
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

fn wait_for_log(
    rx: &std::sync::mpsc::Receiver<String>,
    needle: &str,
    limit: Duration,
) -> Result<String> {
    let deadline = Instant::now() + limit;
    loop {
        interrupted()?;
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) if line.contains(needle) => return Ok(line),
            Ok(_) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(_) => {
                return Err(Error::Invalid(format!(
                    "the watcher did not log {needle:?} within {limit:?}"
                )));
            }
        }
    }
}
