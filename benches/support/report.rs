//! Shared by the bench targets: samples and their statistics, the machine and commit a run was
//! made on, and writing a bench's section of BENCHMARKS.md (and its headline lines in the
//! README) between markers, so that nobody edits a number by hand.

#![allow(dead_code)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// Timed samples of one measurement.
#[derive(Clone, Debug, Default)]
pub struct Samples(pub Vec<Duration>);

impl Samples {
    pub fn push(&mut self, d: Duration) {
        self.0.push(d);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    fn sorted(&self) -> Vec<Duration> {
        let mut s = self.0.clone();
        s.sort();
        s
    }

    pub fn median(&self) -> Duration {
        let s = self.sorted();
        s[s.len() / 2]
    }

    /// The 90th percentile (nearest rank).
    pub fn p90(&self) -> Duration {
        let s = self.sorted();
        let rank = (s.len() * 9).div_ceil(10).max(1);
        s[rank - 1]
    }

    pub fn max(&self) -> Duration {
        *self.0.iter().max().expect("samples")
    }

    /// `median / p90 / max` in milliseconds, one decimal.
    pub fn ms(&self) -> String {
        format!(
            "{:.1} / {:.1} / {:.1}",
            ms(self.median()),
            ms(self.p90()),
            ms(self.max())
        )
    }

    /// `median / p90 / max` in seconds, two decimals.
    pub fn secs(&self) -> String {
        format!(
            "{:.2} / {:.2} / {:.2}",
            self.median().as_secs_f64(),
            self.p90().as_secs_f64(),
            self.max().as_secs_f64()
        )
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Whether the bench runs in CI's quick mode (`-- --quick`): few samples, nothing written.
pub fn quick() -> bool {
    std::env::args().any(|a| a == "--quick")
}

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The machine: CPU model, cores, memory, kernel, iptables.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
        .map_or("?".to_string(), |kb| {
            format!("{:.0} GiB", kb as f64 / 1024.0 / 1024.0)
        });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let iptables = command_output("iptables-legacy", &["--version"]);
    format!("{model}, {cores} cores, {memory}, kernel {kernel}, {iptables}")
}

/// The commit the run measured (`+changes` when the work tree differs from it).
pub fn commit() -> String {
    let sha = command_output("git", &["-C", REPO, "rev-parse", "--short=12", "HEAD"]);
    let dirty = !command_output(
        "git",
        &["-C", REPO, "status", "--porcelain", "--untracked-files=no"],
    )
    .is_empty();
    if dirty { format!("{sha}+changes") } else { sha }
}

/// The date of the run (UTC).
pub fn today() -> String {
    command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
}

/// Markdown being built for one section.
#[derive(Default)]
pub struct Section(pub String);

impl Section {
    pub fn line(&mut self, text: impl AsRef<str>) {
        self.0.push_str(text.as_ref());
        self.0.push('\n');
    }

    pub fn table(&mut self, header: &[&str], rows: &[Vec<String>]) {
        let _ = writeln!(self.0, "| {} |", header.join(" | "));
        let align: Vec<&str> = header
            .iter()
            .enumerate()
            .map(|(i, _)| if i == 0 { "---" } else { "---:" })
            .collect();
        let _ = writeln!(self.0, "|{}|", align.join("|"));
        for row in rows {
            let _ = writeln!(self.0, "| {} |", row.join(" | "));
        }
        self.0.push('\n');
    }
}

/// Replaces what lies between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in `file` with
/// `text`. Panics when the markers are missing: the bench would otherwise write nowhere.
pub fn replace_between(file: &Path, name: &str, text: &str) {
    let (begin, end) = (
        format!("<!-- {name}:begin -->"),
        format!("<!-- {name}:end -->"),
    );
    let old = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let (Some(b), Some(e)) = (old.find(&begin), old.find(&end)) else {
        panic!("{} lacks the {begin} ... {end} markers", file.display());
    };
    let new = format!("{}{begin}\n{}{}", &old[..b], text, &old[e..]);
    std::fs::write(file, new).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
}

/// Writes a bench's section of BENCHMARKS.md and its headline lines (in BENCHMARKS.md and the
/// README alike), unless this is a quick run, which only prints.
pub fn publish(name: &str, section: &Section, headline: &Section) {
    println!("{}", section.0);
    println!("headline:\n{}", headline.0);
    if quick() {
        println!("(quick run: BENCHMARKS.md and README.md left as they are)");
        return;
    }
    let benchmarks = Path::new(REPO).join("BENCHMARKS.md");
    replace_between(&benchmarks, name, &section.0);
    let headline_name = format!("{name}-headline");
    replace_between(&benchmarks, &headline_name, &headline.0);
    replace_between(
        &Path::new(REPO).join("README.md"),
        &headline_name,
        &headline.0,
    );
    println!("wrote the {name} section of BENCHMARKS.md and its headline in README.md");
}

/// Every thread's CPU time so far (the scheduler's own account, `/proc/PID/task/*/schedstat`, in
/// nanoseconds), by thread id.
fn thread_times(pid: u32) -> std::collections::HashMap<u64, u64> {
    let mut times = std::collections::HashMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return times;
    };
    for task in tasks.flatten() {
        let Ok(tid) = task.file_name().to_string_lossy().parse::<u64>() else {
            continue;
        };
        let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        if let Some(ns) = stat.split_whitespace().next().and_then(|v| v.parse().ok()) {
            times.insert(tid, ns);
        }
    }
    times
}

/// Measures the CPU time processes use from `start` to `stop`, all threads counted: the
/// scheduler's account (exact, where utime/stime are sampled in clock ticks), read every `poll`
/// on a thread of its own, so that a thread that exits meanwhile (tokio's blocking threads do
/// after 10 s idle) keeps what it had used, and one that starts counts from zero.
pub struct CpuMeter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Duration>>,
}

impl CpuMeter {
    pub fn start(pids: &[u32], poll: Duration) -> CpuMeter {
        use std::collections::HashMap;
        use std::sync::atomic::Ordering;
        let pids = pids.to_vec();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let first: Vec<HashMap<u64, u64>> = pids.iter().map(|&p| thread_times(p)).collect();
        let thread = std::thread::spawn(move || {
            let mut last = first.clone();
            loop {
                let done = stopped.load(Ordering::Relaxed);
                for (i, &pid) in pids.iter().enumerate() {
                    last[i].extend(thread_times(pid));
                }
                if done {
                    break;
                }
                let slept = std::time::Instant::now();
                while slept.elapsed() < poll && !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            first
                .iter()
                .zip(&last)
                .map(|(first, last)| {
                    let ns: u64 = last
                        .iter()
                        .map(|(tid, ns)| ns.saturating_sub(first.get(tid).copied().unwrap_or(0)))
                        .sum();
                    Duration::from_nanos(ns)
                })
                .collect()
        });
        CpuMeter { stop, thread }
    }

    /// The CPU time each process used since `start`.
    pub fn stop(self) -> Vec<Duration> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("cpu meter")
    }
}

/// CPU time of a process and every child it starts, from a cgroup of its own (v2 `cpu.stat`, or
/// v1 `cpuacct.usage`): children (the `ip6tables-nft` of a resync) are counted, which a sum over
/// the process's own threads would leave out. Removed on drop.
pub struct CgroupCpu {
    dir: PathBuf,
    v2: bool,
}

impl CgroupCpu {
    /// Moves `pid` (and so whatever it starts from now on) into a new cgroup.
    pub fn adopt(pid: u32, name: &str) -> CgroupCpu {
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let root = if v2 {
            "/sys/fs/cgroup"
        } else {
            "/sys/fs/cgroup/cpuacct"
        };
        let dir = Path::new(root).join(format!("loopguard-bench-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
        std::fs::write(dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("moving {pid} into {}: {e}", dir.display()));
        CgroupCpu { dir, v2 }
    }

    /// CPU time used by the cgroup so far.
    pub fn used(&self) -> Duration {
        if self.v2 {
            let stat = std::fs::read_to_string(self.dir.join("cpu.stat")).expect("cpu.stat");
            let usec: u64 = stat
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse().ok())
                .expect("usage_usec");
            Duration::from_micros(usec)
        } else {
            let ns: u64 = std::fs::read_to_string(self.dir.join("cpuacct.usage"))
                .expect("cpuacct.usage")
                .trim()
                .parse()
                .expect("a number");
            Duration::from_nanos(ns)
        }
    }
}

impl Drop for CgroupCpu {
    fn drop(&mut self) {
        // Its processes have exited by now (or are moved back to the root to let it go).
        let root = self.dir.parent().unwrap().join("cgroup.procs");
        if let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write(&root, pid);
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
