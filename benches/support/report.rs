//! Shared by the bench targets, the effects beside `render.rs`: the machine and commit a run was
//! made on, CPU meters, and keeping a run's raw record in BENCHMARKS.json while writing what it
//! renders to into BENCHMARKS.md (and its headline lines into the README) between markers, so
//! that nobody edits a number by hand.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

pub const REPO: &str = env!("CARGO_MANIFEST_DIR");

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

/// The raw record as BENCHMARKS.json will hold it, read back: what a run renders is what a reader
/// of that file renders (`tests/docs.rs` does), not the values before they were written.
pub fn kept<T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(
    run: &T,
) -> T {
    let json = serde_json::to_string(run).expect("a bench record serializes");
    let back: T = serde_json::from_str(&json).expect("a bench record reads back");
    assert_eq!(
        &back, run,
        "the bench record changed on its way through JSON"
    );
    back
}

/// The committed record of a bench (`name` in BENCHMARKS.json), if there is one this build reads.
pub fn committed<T: serde::de::DeserializeOwned>(name: &str) -> Option<T> {
    let text = std::fs::read_to_string(Path::new(REPO).join("BENCHMARKS.json")).ok()?;
    let all: serde_json::Value = serde_json::from_str(&text).ok()?;
    serde_json::from_value(all.get(name)?.clone()).ok()
}

/// Prints what `render::regressions` found: one warning line per row, never a failure (a quick run
/// has two samples; CI must not fail on noise).
pub fn print_regressions(name: &str, (compared, warnings): (usize, Vec<String>)) {
    match compared {
        0 => println!(
            "{name}: no row of this run is in the committed BENCHMARKS.json to compare with"
        ),
        n => println!(
            "{name}: {n} rows compared with the committed BENCHMARKS.json, {} more than 20 % slower",
            warnings.len()
        ),
    }
    for w in warnings {
        println!("{w}");
    }
}

/// Writes a bench's raw record into BENCHMARKS.json (under `name`), its section of BENCHMARKS.md
/// and its headline lines (in BENCHMARKS.md and the README alike), unless this is a quick run,
/// which only prints.
pub fn publish(name: &str, raw: &impl serde::Serialize, section: &str, headline: &str) {
    println!("{section}");
    println!("headline:\n{headline}");
    if quick() {
        println!("(quick run: BENCHMARKS.md, BENCHMARKS.json and README.md left as they are)");
        return;
    }
    let json_path = Path::new(REPO).join("BENCHMARKS.json");
    let mut all: serde_json::Map<String, serde_json::Value> = std::fs::read_to_string(&json_path)
        .ok()
        .map(|text| {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", json_path.display()))
        })
        .unwrap_or_default();
    all.insert(
        name.to_string(),
        serde_json::to_value(raw).expect("a bench record serializes"),
    );
    let mut text = serde_json::to_string_pretty(&all).expect("JSON");
    text.push('\n');
    std::fs::write(&json_path, text).unwrap_or_else(|e| panic!("{}: {e}", json_path.display()));
    let benchmarks = Path::new(REPO).join("BENCHMARKS.md");
    replace_between(&benchmarks, name, section);
    let headline_name = format!("{name}-headline");
    replace_between(&benchmarks, &headline_name, headline);
    replace_between(&Path::new(REPO).join("README.md"), &headline_name, headline);
    println!(
        "wrote the {name} record in BENCHMARKS.json, its section of BENCHMARKS.md and its headline in README.md"
    );
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
