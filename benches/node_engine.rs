//! Node engine benchmarks on a real kernel, both backends, printed as a table.
//!
//! `cargo bench --bench node_engine` (as root). For 0, 1,000, 10,000 and 50,000 foreign rules in
//! the filter table, it times the `loopguard node` commands as users run them, next to the seed's
//! own shell remediation and a full `ip6tables-save -t filter` (the read loopguard avoids), and
//! then measures drift repair: rule deleted → rule back, nft events vs legacy polling.

#[path = "../tests/support/netns.rs"]
mod netns;

use netns::TestNetns;
use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_loopguard");
const REPS: usize = 15;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let sizes: &[usize] = if quick {
        &[0, 1_000]
    } else {
        &[0, 1_000, 10_000, 50_000]
    };
    println!(
        "loopguard node engine benchmark: median (p90) of {REPS} runs, milliseconds, whole processes as users run them"
    );
    println!("machine: {} cores, kernel {}", num_cpus(), kernel());
    println!();
    println!(
        "| backend | foreign rules | check | enforce (no-op) | enforce (full) | seed script | full `-save -t filter` |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for backend in ["nft", "legacy"] {
        for &size in sizes {
            bench_size(backend, size);
        }
    }
    println!();
    println!(
        "| backend | drift signal | repair latency, median (p90, max) of {} deletions |",
        REPS
    );
    println!("|---|---|---:|");
    for backend in ["nft", "legacy"] {
        bench_repair(backend);
    }
}

struct Fixture {
    ns: TestNetns,
    backend: &'static str,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new(backend: &'static str, foreign: usize) -> Fixture {
        let ns = TestNetns::new("bench");
        if foreign > 0 {
            ns.restore("ip6tables", backend, &foreign_rules(foreign));
        } else {
            ns.ip6tables(backend, "-S");
        }
        let dir = tempfile::tempdir().unwrap();
        Fixture { ns, backend, dir }
    }

    fn loopguard(&self, cmd: &str) -> Command {
        let mut c = Command::new(BIN);
        c.args([
            "node",
            cmd,
            "--netns",
            &self.ns.name,
            "--backend",
            self.backend,
            "--state-file",
        ])
        .arg(self.dir.path().join("state.json"))
        .stdout(Stdio::null());
        if cmd != "cleanup" {
            c.args(["--applicability", "always"]);
        }
        c
    }

    fn seed(&self) -> Command {
        let mut c = netns::seed_script(&self.ns.name, self.backend, &self.dir.path().join("bin"));
        c.stdout(Stdio::null());
        c
    }

    fn full_save(&self) -> Command {
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &self.ns.name,
            &format!("ip6tables-{}-save", self.backend),
            "-t",
            "filter",
        ])
        .stdout(Stdio::null());
        c
    }

    /// Removes the three baseline rules however they got there (the seed appends them).
    fn reset(&self) {
        let binary = format!("ip6tables-{}", self.backend);
        for rule in [
            "-D INPUT -i lo -j ACCEPT",
            "-D INPUT -s ::1/128 -j DROP",
            "-D OUTPUT -o lo -j ACCEPT",
        ] {
            let args: Vec<&str> = std::iter::once(binary.as_str())
                .chain(rule.split(' '))
                .collect();
            let _ = self.ns.exec(&args);
        }
        let _ = std::fs::remove_file(self.dir.path().join("state.json"));
    }
}

fn bench_size(backend: &'static str, size: usize) {
    let fx = Fixture::new(backend, size);
    let mut check = Vec::new();
    let mut noop = Vec::new();
    let mut full = Vec::new();
    let mut seed = Vec::new();
    let mut save = Vec::new();
    for _ in 0..REPS {
        fx.reset();
        full.push(time(&mut fx.loopguard("enforce")));
        noop.push(time(&mut fx.loopguard("enforce")));
        check.push(time(&mut fx.loopguard("check")));
        save.push(time(&mut fx.full_save()));
        fx.reset();
        seed.push(time(&mut fx.seed()));
    }
    println!(
        "| {backend} | {size} | {} | {} | {} | {} | {} |",
        stats(&mut check),
        stats(&mut noop),
        stats(&mut full),
        stats(&mut seed),
        stats(&mut save)
    );
}

fn bench_repair(backend: &'static str) {
    let fx = Fixture::new(backend, 1_000);
    let resync = if backend == "nft" { "10" } else { "1" };
    let mut child = fx
        .loopguard("watch")
        .args(["--resync", resync, "--log-format", "json"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    wait_for(&mut log, "watching for drift");
    let mut latencies = Vec::new();
    for _ in 0..REPS {
        let started = Instant::now();
        fx.ns.ip6tables(backend, "-D INPUT -s ::1/128 -j DROP");
        let line = wait_for(&mut log, "repaired drift");
        // Wall time from the delete command's start to the watcher's report, minus nothing:
        // an upper bound on what a user would see, including the delete itself.
        let wall = started.elapsed();
        let reported: f64 = serde_json::from_str::<serde_json::Value>(&line).unwrap()["latency_ms"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        latencies.push(if backend == "nft" {
            Duration::from_secs_f64(reported / 1000.0)
        } else {
            wall
        });
        std::thread::sleep(Duration::from_millis(50));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    let signal = if backend == "nft" {
        "nftables netlink event (time from event to rule back, as the watcher logs it)".to_string()
    } else {
        format!("polling every {resync} s (time from the delete to the watcher's repair log)")
    };
    let max = latencies.iter().max().copied().unwrap();
    println!(
        "| {backend} | {signal} | {} (max {:.1}) |",
        stats(&mut latencies),
        ms(max)
    );
}

fn wait_for(log: &mut impl Iterator<Item = std::io::Result<String>>, needle: &str) -> String {
    for line in log {
        let line = line.unwrap();
        if line.contains(needle) {
            return line;
        }
    }
    panic!("watcher ended before logging {needle:?}");
}

fn time(cmd: &mut Command) -> Duration {
    let started = Instant::now();
    let status = cmd.status().unwrap();
    let elapsed = started.elapsed();
    assert!(
        status.success() || status.code() == Some(1),
        "{cmd:?}: {status}"
    );
    elapsed
}

fn stats(samples: &mut [Duration]) -> String {
    samples.sort();
    let median = samples[samples.len() / 2];
    let p90 = samples[(samples.len() * 9 / 10).min(samples.len() - 1)];
    format!("{:.1} ({:.1})", ms(median), ms(p90))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `total` foreign rules: ten each in INPUT and OUTPUT (some at the top), the rest spread over
/// twenty other chains, as kube-proxy or Calico would have them.
fn foreign_rules(total: usize) -> String {
    let mut s = String::from("*filter\n");
    for c in 0..20 {
        s.push_str(&format!(":FOREIGN-{c} - [0:0]\n"));
    }
    let builtin = 10.min(total / 2);
    for i in 0..builtin {
        s.push_str(&format!(
            "-A INPUT -s 2001:db8:1::{:x}/128 -p tcp --dport {} -j ACCEPT\n",
            i + 1,
            1000 + i
        ));
        s.push_str(&format!(
            "-A OUTPUT -d 2001:db8:2::{:x}/128 -j REJECT\n",
            i + 1
        ));
    }
    for i in 0..total - 2 * builtin {
        s.push_str(&format!(
            "-A FOREIGN-{} -s 2001:db8:{:x}::{:x}/128 -j DROP\n",
            i % 20,
            3 + i / 60000,
            i % 60000 + 1
        ));
    }
    s.push_str("COMMIT\n");
    s
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}
