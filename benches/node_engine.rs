//! Node engine benchmarks on the real kernel, both backends; writes the "Node engine" section of
//! BENCHMARKS.md (`cargo bench --bench node_engine`, as root; `-- --quick` only checks that the
//! bench still works and writes nothing).
//!
//! Every command, loopguard's and the baselines', runs the same way: a fresh process started in
//! the network namespace with `nsenter --net=/run/netns/NAME` (loopguard without `--netns`), from
//! this process, with the same PATH (`ip6tables` there is the backend's binary). The namespace
//! holds N foreign rules: ten each in INPUT and OUTPUT, the rest over twenty other chains; the
//! largest N is measured once more with 5,000 of its rules in INPUT and 5,000 in OUTPUT (where the
//! plan and the position search are on the hot path).
//! - One-shot: `loopguard node check|enforce` with backend auto-detection (what the chart runs)
//!   and with `--backend` forced, the seed's shell script, the seed's Ansible playbook (ansible-core
//!   from PyPI, in a cached virtualenv), and a full `ip6tables-save -t filter`.
//! - Drift repair: `loopguard node watch` (auto-detection, the chart's 10 s resync) while the
//!   bench deletes the DROP at random moments; timed from the delete reaching the kernel to the rule
//!   being back, both seen from outside by the bench (nft: the delete's and the next ruleset change
//!   events on a netlink socket of the bench's own, then confirmed with `ip6tables -C`; legacy: the
//!   table's entry count, polled every 0.2 ms for the delete and every millisecond for the return,
//!   then confirmed with `-C`). Only repairs the watcher logged as triggered by the event path (nft
//!   events; the legacy probe) are counted; others are reported.
//! - The nftables rule: loopguard's own table, beside ComplianceAsCode's bash remediation.
//! - Idle: the same watcher's CPU time, children included (a cgroup of its own), and resident
//!   memory over a quiet minute.

#[path = "../tests/support/netns.rs"]
mod netns;
#[path = "support/render.rs"]
mod render;
#[path = "support/report.rs"]
mod report;

use netns::TestNetns;
use render::{Foreign, Meta, NFT_DRIFTS, NFT_ONE_SHOT, NodeRun, ONE_SHOT, Samples};
use std::io::BufRead as _;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_loopguard");
const ANSIBLE_CORE: &str = "2.19.14";

/// The value after `flag` on the command line.
fn flag_value(flag: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let at = args.iter().position(|a| a == flag)?;
    args.get(at + 1).cloned()
}

fn reps() -> usize {
    if report::quick() { 2 } else { 15 }
}

fn main() {
    let sizes: &[usize] = if report::quick() {
        &[0, 1_000]
    } else {
        &[0, 1_000, 10_000, 50_000]
    };
    let repair_sizes: &[usize] = if report::quick() {
        &[1_000]
    } else {
        &[1_000, 50_000]
    };
    // `-- --part repair [--backend B]`: the drift repairs alone, printed and not recorded (for
    // working on the watch; the full run measures everything side by side).
    if let Some(part) = flag_value("--part") {
        assert_eq!(part, "repair", "--part: only `repair` is known");
        let backend = flag_value("--backend");
        let largest = *repair_sizes.last().unwrap();
        for b in ["nft", "legacy"] {
            if backend.as_deref().is_none_or(|wanted| wanted == b) {
                for &total in repair_sizes {
                    bench_repair(b, Foreign::spread(total));
                }
                bench_repair(b, Foreign::long(largest));
            }
        }
        return;
    }
    let ansible = ansible_playbook();
    let meta = Meta {
        date: report::today(),
        commit: report::commit(),
        machine: report::machine(),
    };
    // Every size spread over twenty chains of their own (ten rules each in INPUT and OUTPUT), and
    // the largest once more with 5,000 each in INPUT and OUTPUT, where loopguard's rules sit.
    let largest = *sizes.last().unwrap();
    let layouts: Vec<Foreign> = sizes
        .iter()
        .map(|&total| Foreign::spread(total))
        .chain([Foreign::long(largest)])
        .collect();
    let mut one_shot = Vec::new();
    for backend in ["nft", "legacy"] {
        for &foreign in &layouts {
            one_shot.push(bench_size(backend, foreign, &ansible));
        }
    }
    let largest = *repair_sizes.last().unwrap();
    let layouts: Vec<Foreign> = repair_sizes
        .iter()
        .map(|&total| Foreign::spread(total))
        .chain([Foreign::long(largest)])
        .collect();
    let mut repairs = Vec::new();
    for backend in ["nft", "legacy"] {
        for &foreign in &layouts {
            repairs.push(bench_repair(backend, foreign));
        }
    }
    let nft_table = bench_nft_table(*sizes.last().unwrap());
    let run = report::kept(&NodeRun {
        meta,
        reps: reps(),
        one_shot,
        repairs,
        nft_table,
    });
    let (section, headline) = render::render_node(&run);
    report::publish("node-engine", &run, &section, &headline);
    if report::quick() {
        let old: Option<NodeRun> = report::committed("node-engine");
        let old = old.as_ref().map(render::node_medians).unwrap_or_default();
        let now = render::node_medians(&run);
        report::print_regressions("node-engine", render::regressions(&old, &now));
    }
}

/// A namespace with foreign rules, and the stubs every command runs with.
struct Fx {
    ns: TestNetns,
    backend: &'static str,
    dir: tempfile::TempDir,
}

impl Fx {
    fn new(backend: &'static str, foreign: Foreign) -> Fx {
        let ns = TestNetns::new("bench");
        if foreign.total > 0 {
            ns.restore("ip6tables", backend, &foreign_rules(foreign));
        } else {
            ns.ip6tables(backend, "-S");
        }
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        // `ip6tables` is the backend's binary, as Debian's alternatives would have it.
        for tool in ["", "-save", "-restore"] {
            std::os::unix::fs::symlink(
                format!("/usr/sbin/ip6tables-{backend}{tool}"),
                bin.join(format!("ip6tables{tool}")),
            )
            .unwrap();
        }
        // The seed script asks dpkg-query whether iptables, nftables and ufw are installed:
        // answered like a host where the rule applies.
        let stub = bin.join("dpkg-query");
        std::fs::write(
            &stub,
            "#!/bin/sh\nfor p; do :; done\n[ \"$p\" = iptables ] && echo installed\nexit 0\n",
        )
        .unwrap();
        std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
        // loopguard reads the same answer from a dpkg status file under --host-root.
        let dpkg = dir.path().join("host/var/lib/dpkg");
        std::fs::create_dir_all(&dpkg).unwrap();
        std::fs::write(
            dpkg.join("status"),
            "Package: iptables\nStatus: install ok installed\n",
        )
        .unwrap();
        Fx { ns, backend, dir }
    }

    fn path(&self) -> String {
        format!(
            "{}:{}",
            self.dir.path().join("bin").display(),
            std::env::var("PATH").unwrap()
        )
    }

    /// `program` as a new process in the namespace (`nsenter --net`), with the bench's PATH.
    fn in_ns(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns.name))
            .arg("--")
            .arg(program)
            .env("PATH", self.path())
            .stdout(Stdio::null());
        c
    }

    fn loopguard(&self, cmd: &str, forced: bool) -> Command {
        let mut c = self.in_ns(BIN);
        c.args(["node", cmd, "--state-file"])
            .arg(self.dir.path().join("state.json"));
        if cmd != "cleanup" {
            // As the chart runs it (applicability Auto, every family at its default), on a host
            // whose packages make the seed's rule apply: the same answer the seed's script and
            // playbook get from their package checks.
            c.arg("--host-root").arg(self.dir.path().join("host"));
        }
        if forced {
            c.args(["--backend", self.backend]);
        }
        c
    }

    fn seed(&self) -> Command {
        let mut c = self.in_ns("bash");
        c.arg(Path::new(report::REPO).join("tests/fixtures/seed-remediation.sh"));
        c
    }

    /// The seed's playbook, run by ansible-playbook against localhost in the namespace. A mount
    /// namespace of its own shows the playbook's package_facts a dpkg database where iptables is
    /// installed and nftables and ufw are not (this machine has nftables), like the stub does for
    /// the shell script.
    fn ansible(&self, ansible: &Ansible) -> Command {
        let mut c = self.in_ns("unshare");
        c.args(["--mount", "sh", "-c"]).arg(format!(
            "mount --bind {status} /var/lib/dpkg/status && exec {bin}/ansible-playbook -i localhost, -c local -e ansible_python_interpreter={bin}/python {playbook}",
            status = ansible.dpkg_status.display(),
            bin = ansible.bin.display(),
            playbook = Path::new(report::REPO)
                .join("tests/fixtures/seed-playbook.yml")
                .display(),
        ));
        c
    }

    fn save(&self) -> Command {
        let mut c = self.in_ns(&format!("ip6tables-{}-save", self.backend));
        c.args(["-t", "filter"]);
        c
    }

    /// Removes the baseline rules however they got there, and loopguard's state.
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
            while self.ns.exec(&args).status.success() {}
        }
        let _ = std::fs::remove_file(self.dir.path().join("state.json"));
    }

    /// Whether the DROP is listed (`ip6tables -C`).
    fn drop_listed(&self) -> bool {
        self.ns
            .exec(&[
                &format!("ip6tables-{}", self.backend),
                "-C",
                "INPUT",
                "-s",
                "::1/128",
                "-j",
                "DROP",
            ])
            .status
            .success()
    }
}

fn time(cmd: &mut Command, what: &str) -> Duration {
    let started = Instant::now();
    let out = cmd.stderr(Stdio::piped()).output().unwrap();
    let elapsed = started.elapsed();
    assert!(
        out.status.success(),
        "{what}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    elapsed
}

/// The one-shot commands' samples in one namespace.
fn bench_size(backend: &'static str, foreign: Foreign, ansible: &Ansible) -> render::OneShot {
    let fx = Fx::new(backend, foreign);
    let names = ONE_SHOT;
    let mut samples: Vec<Samples> = vec![Samples::default(); names.len()];
    for _ in 0..reps() {
        for (forced, first) in [(false, 0), (true, 1)] {
            fx.reset();
            samples[4 + first].push(time(&mut fx.loopguard("enforce", forced), names[4 + first]));
            samples[2 + first].push(time(&mut fx.loopguard("enforce", forced), names[2 + first]));
            samples[first].push(time(&mut fx.loopguard("check", forced), names[first]));
        }
        samples[8].push(time(&mut fx.save(), names[8]));
        fx.reset();
        samples[6].push(time(&mut fx.seed(), names[6]));
        assert!(fx.drop_listed(), "the seed script wrote the DROP");
        fx.reset();
        samples[7].push(time(&mut fx.ansible(ansible), names[7]));
        assert!(fx.drop_listed(), "the playbook wrote the DROP");
    }
    for (name, s) in names.iter().zip(&samples) {
        eprintln!("{backend} | {foreign} | {name} | {}", s.ms());
    }
    render::OneShot {
        backend: backend.to_string(),
        foreign,
        samples,
    }
}

/// A tiny pseudo-random sequence (xorshift), seeded from the clock.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        Rng(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn bench_repair(backend: &'static str, foreign: Foreign) -> render::Repair {
    let fx = Fx::new(backend, foreign);
    let mut watch = fx.loopguard("watch", false);
    watch
        .args(["--resync", "10", "--log-format", "json"])
        .stderr(Stdio::piped());
    let mut child = watch.spawn().unwrap();
    // The watcher and every process it starts (nsenter execs it: the pid is loopguard's).
    let cpu = report::CgroupCpu::adopt(child.id(), "watch");
    let (tx, log) = mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let wait_log = |needle: &str| -> String {
        loop {
            let line = log
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("the watcher never logged {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    };
    wait_log("watching for drift");
    let observer = Observer::start(&fx.ns.name, backend);
    let expected = match backend {
        "nft" => "nft event",
        _ => "legacy table change",
    };
    let mut rng = Rng::new();
    let mut latency = Samples::default();
    let mut latency_open = Samples::default();
    let mut deletions = 0;
    let mut others = Vec::new();
    // nft: every other delete by a writer that keeps its netlink socket open (`nft -i`), as for
    // the nftables rule below: a closing writer's socket holds up every write for a while.
    let open_wanted = if backend == "nft" { reps() } else { 0 };
    while latency.len() < reps() || latency_open.len() < open_wanted {
        assert!(
            deletions < (reps() + open_wanted) * 3,
            "too few repairs by {expected}: {others:?}"
        );
        // 3.5-4.5 s apart: loopguard takes more than three writes within 10 s for a fight and
        // backs off, which would measure the back-off, not the event path.
        std::thread::sleep(Duration::from_millis(3_500 + rng.below(1_000)));
        let open =
            latency_open.len() < open_wanted && (latency.len() >= reps() || deletions % 2 == 1);
        let (deleted, back) = if open {
            let handle = iptables_nft_drop_handle(&fx);
            observer.arm();
            with_socket_open(
                &fx,
                &format!("delete rule ip6 filter INPUT handle {handle}"),
                || observer.back(&fx),
            )
        } else {
            observer.arm();
            let out = fx.ns.exec(&[
                &format!("ip6tables-{backend}"),
                "-D",
                "INPUT",
                "-s",
                "::1/128",
                "-j",
                "DROP",
            ]);
            assert!(out.status.success(), "delete: {out:?}");
            observer.back(&fx)
        };
        deletions += 1;
        let line = wait_log("repaired drift");
        let trigger = serde_json::from_str::<serde_json::Value>(&line).unwrap()["trigger"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if trigger != expected {
            others.push(trigger);
        } else if open {
            latency_open.push(back.saturating_duration_since(deleted));
        } else {
            latency.push(back.saturating_duration_since(deleted));
        }
    }
    // Idle: nothing changes for a while; the watcher's CPU time and memory.
    let window = if report::quick() {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(60)
    };
    let pid = child.id();
    let before = cpu.used();
    std::thread::sleep(window);
    let used = cpu.used() - before;
    let idle_cpu = render::CpuUse::new(used, window);
    let rss_kib = rss_kib(pid);
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = child.wait();
    eprintln!(
        "{backend} {foreign}: repair {} ms over {} of {deletions}; left out: {others:?}; idle {:.2} %, {rss_kib} KiB",
        latency.ms(),
        latency.len(),
        idle_cpu.percent()
    );
    render::Repair {
        backend: backend.to_string(),
        foreign,
        latency,
        latency_open,
        deletions,
        others,
        idle_cpu,
        rss_kib,
    }
}

/// Runs `command` with `nft -i` in the namespace, a writer that keeps its netlink socket open,
/// and returns what `seen` observes before that writer exits.
fn with_socket_open<T>(fx: &Fx, command: &str, seen: impl FnOnce() -> T) -> T {
    let mut nft = Command::new("ip")
        .args(["netns", "exec", &fx.ns.name, "nft", "-i"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("nft -i");
    let mut stdin = nft.stdin.take().expect("piped");
    writeln!(stdin, "{command}").expect("to nft -i");
    let out = seen();
    drop(stdin);
    assert!(nft.wait().expect("nft -i").success(), "nft -i {command}");
    out
}

/// The handle of the seed's DROP in iptables-nft's `ip6 filter` INPUT (`nft -a`).
fn iptables_nft_drop_handle(fx: &Fx) -> String {
    let listed = fx
        .ns
        .run(&["nft", "-a", "list", "chain", "ip6", "filter", "INPUT"]);
    listed
        .lines()
        .find(|l| l.contains("ip6 saddr ::1 ") && l.contains(" drop "))
        .and_then(|l| l.rsplit("# handle ").next())
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|| panic!("no DROP in ip6 filter INPUT: {listed}"))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}

/// Sees the DROP come back from outside loopguard: a thread in the namespace that, once armed
/// (before the delete), reports the moment the rule is back in the kernel.
struct Observer {
    arm: mpsc::Sender<()>,
    /// When the delete reached the kernel, and when the rule was back.
    back: mpsc::Receiver<(Instant, Instant)>,
}

impl Observer {
    fn start(ns: &str, backend: &'static str) -> Observer {
        let (arm, armed) = mpsc::channel::<()>();
        let (found, back) = mpsc::channel();
        let ns = ns.to_string();
        std::thread::spawn(move || {
            loopguard::node::netns::enter(&ns).unwrap();
            match backend {
                "nft" => nft_observer(armed, found),
                _ => legacy_observer(armed, found),
            }
        });
        Observer { arm, back }
    }

    fn arm(&self) {
        self.arm.send(()).unwrap();
        // The observer answers when it is ready; give it the moment to subscribe or read.
        std::thread::sleep(Duration::from_millis(20));
    }

    /// When the delete reached the kernel and when the rule was back, confirmed by listing it.
    fn back(&self, fx: &Fx) -> (Instant, Instant) {
        let at = self
            .back
            .recv_timeout(Duration::from_secs(30))
            .expect("the rule came back");
        assert!(
            fx.drop_listed(),
            "the observer saw a change, but no DROP is listed"
        );
        at
    }
}

/// nft: a netlink socket subscribed to ruleset changes; after the delete's own change, the next
/// committed change is the repair (checked by listing the rule).
fn nft_observer(armed: mpsc::Receiver<()>, found: mpsc::Sender<(Instant, Instant)>) {
    // SAFETY: socket syscalls on a descriptor this thread owns, with buffers it owns.
    let fd = unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_NETFILTER,
        );
        assert!(fd >= 0);
        let mut addr: libc::sockaddr_nl = std::mem::zeroed();
        addr.nl_family = libc::AF_NETLINK as u16;
        assert_eq!(
            libc::bind(
                fd,
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32
            ),
            0
        );
        let group: libc::c_int = libc::NFNLGRP_NFTABLES;
        assert_eq!(
            libc::setsockopt(
                fd,
                libc::SOL_NETLINK,
                libc::NETLINK_ADD_MEMBERSHIP,
                &group as *const _ as *const _,
                4
            ),
            0
        );
        fd
    };
    let recv = |flags: i32| -> isize {
        let mut buf = [0u8; 65536];
        unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut _, buf.len(), flags) }
    };
    for () in armed {
        // Forget what came before the delete.
        while recv(libc::MSG_DONTWAIT) > 0 {}
        // The delete's own transaction, then loopguard's: each ends with a NEWGEN message; a
        // change is only counted once the rule is listed again.
        let mut transactions = 0;
        let mut deleted = None;
        loop {
            let mut buf = [0u8; 65536];
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut _, buf.len(), 0) };
            assert!(n > 0, "netlink receive failed");
            let at = Instant::now();
            transactions += newgens(&buf[..n as usize]);
            if transactions >= 1 && deleted.is_none() {
                deleted = Some(at);
            }
            if transactions >= 2 && drop_listed_here("nft") {
                let _ = found.send((deleted.expect("seen"), at));
                break;
            }
        }
    }
}

/// How many `NFT_MSG_NEWGEN` messages (one closes each committed transaction) a datagram holds.
fn newgens(mut buf: &[u8]) -> usize {
    const NEWGEN: u16 = (10 << 8) | 15;
    let mut count = 0;
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize;
        if u16::from_ne_bytes([buf[4], buf[5]]) == NEWGEN {
            count += 1;
        }
        let aligned = (len + 3) & !3;
        if len < 16 || aligned > buf.len() {
            break;
        }
        buf = &buf[aligned..];
    }
    count
}

/// legacy: the filter table's entry count, polled every millisecond; back when it is what it was
/// before the delete.
fn legacy_observer(armed: mpsc::Receiver<()>, found: mpsc::Sender<(Instant, Instant)>) {
    use loopguard::node::legacy::{FILTER, XtSocket};
    let socket = XtSocket::open(loopguard::rules::Family::Ipv6).unwrap();
    for () in armed {
        let full = socket.info(FILTER).unwrap().num_entries;
        // Wait for the delete, then for the entry to be back.
        while socket.info(FILTER).unwrap().num_entries == full {
            std::thread::sleep(Duration::from_micros(200));
        }
        let deleted = Instant::now();
        loop {
            if socket.info(FILTER).unwrap().num_entries == full {
                let _ = found.send((deleted, Instant::now()));
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// `ip6tables-<backend> -C INPUT -s ::1/128 -j DROP` from the observer's own namespace.
fn drop_listed_here(backend: &str) -> bool {
    Command::new(format!("ip6tables-{backend}"))
        .args(["-C", "INPUT", "-s", "::1/128", "-j", "DROP"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `total` foreign rules: ten each in INPUT and OUTPUT (some at the top), the rest spread over
/// twenty other chains, as kube-proxy or Calico would have them; or, `long`, 5,000 each in INPUT and
/// OUTPUT (a host firewall of per-address rules, ahead of loopguard's) and the rest spread.
fn foreign_rules(foreign: Foreign) -> String {
    let total = foreign.total;
    let mut s = String::from("*filter\n");
    for c in 0..20 {
        s.push_str(&format!(":FOREIGN-{c} - [0:0]\n"));
    }
    let builtin = foreign.builtin();
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

/// ansible-core from PyPI in a virtualenv cached under ~/.cache/loopguard (keyed by the pin and
/// the Python version), and the dpkg database the playbook is shown.
struct Ansible {
    bin: PathBuf,
    dpkg_status: PathBuf,
    _dir: tempfile::TempDir,
}

fn ansible_playbook() -> Ansible {
    let python = "python3";
    let version = String::from_utf8(
        Command::new(python)
            .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
            .output()
            .expect("python3 (hack/test.sh installs it)")
            .stdout,
    )
    .unwrap();
    let cache = PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/loopguard");
    let venv = cache.join(format!("ansible-core{ANSIBLE_CORE}-py{}", version.trim()));
    if !venv.join(".complete").exists() {
        let _ = std::fs::remove_dir_all(&venv);
        let ok = Command::new(python)
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "--disable-pip-version-check"])
                .arg(format!("ansible-core=={ANSIBLE_CORE}"))
                .status()
                .is_ok_and(|s| s.success());
        assert!(
            ok,
            "installing ansible-core {ANSIBLE_CORE} into {}",
            venv.display()
        );
        std::fs::write(venv.join(".complete"), "").unwrap();
    }
    // This machine's dpkg database without nftables and ufw.
    let dir = tempfile::tempdir().unwrap();
    let status = std::fs::read_to_string("/var/lib/dpkg/status").expect("a Debian machine");
    let kept: Vec<&str> = status
        .split("\n\n")
        .filter(|p| !p.starts_with("Package: nftables\n") && !p.starts_with("Package: ufw\n"))
        .collect();
    let dpkg_status = dir.path().join("status");
    std::fs::write(&dpkg_status, kept.join("\n\n")).unwrap();
    Ansible {
        bin: venv.join("bin"),
        dpkg_status,
        _dir: dir,
    }
}

/// The nftables rule's numbers: one-shot rows, repair rows, idle, and a headline line.
/// The namespace of [`Fx`] (foreign iptables-nft rules), a host root where the nftables rule
/// applies (iptables and nftables installed, no firewalld: the seed's rule does not apply), and
/// loopguard as the chart runs it there (`nftables: Enforce`).
fn nft_loopguard(fx: &Fx, root: &Path, cmd: &str) -> Command {
    let mut c = fx.in_ns(BIN);
    c.args(["node", cmd, "--state-file"])
        .arg(fx.dir.path().join("state.json"));
    if cmd != "cleanup" {
        c.arg("--host-root").arg(root).args([
            "--nftables",
            "enforce",
            "--ufw",
            "ignore",
            "--firewalld",
            "ignore",
        ]);
    }
    c
}

fn nft_table_listed(fx: &Fx) -> bool {
    let out = fx.ns.exec(&["nft", "list", "table", "inet", "loopguard"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    out.status.success()
        && [
            "iif \"lo\" accept",
            "ip saddr 127.0.0.0/8 drop",
            "ip6 saddr ::1 drop",
        ]
        .iter()
        .all(|r| listing.contains(r))
}

fn bench_nft_table(size: usize) -> render::NftTable {
    let fx = Fx::new("nft", Foreign::spread(size));
    let root = fx.dir.path().join("host");
    std::fs::create_dir_all(root.join("var/lib/dpkg")).unwrap();
    std::fs::write(
        root.join("var/lib/dpkg/status"),
        "Package: iptables\nStatus: install ok installed\n\nPackage: nftables\nStatus: install ok installed\n",
    )
    .unwrap();
    let reset = || {
        for table in ["loopguard", "filter"] {
            let _ = fx.ns.exec(&["nft", "delete", "table", "inet", table]);
        }
        let _ = std::fs::remove_file(fx.dir.path().join("state.json"));
        assert!(!nft_table_listed(&fx), "reset left loopguard's table");
    };
    let names = NFT_ONE_SHOT;
    let mut samples: Vec<Samples> = vec![Samples::default(); names.len()];
    let cac = Path::new(report::REPO).join("tests/fixtures/cac-nftables-remediation.sh");
    for _ in 0..reps() {
        reset();
        samples[0].push(time(&mut nft_loopguard(&fx, &root, "enforce"), names[0]));
        assert!(nft_table_listed(&fx), "loopguard wrote its table");
        samples[1].push(time(&mut nft_loopguard(&fx, &root, "enforce"), names[1]));
        samples[2].push(time(&mut nft_loopguard(&fx, &root, "check"), names[2]));
        reset();
        let mut script = fx.in_ns("bash");
        script.arg(&cac);
        samples[3].push(time(&mut script, names[3]));
        let chain = fx
            .ns
            .run(&["nft", "list", "chain", "inet", "filter", "input"]);
        assert!(
            chain.contains("ip6 saddr ::1 counter"),
            "the remediation wrote: {chain}"
        );
        reset();
        fx.reset();
        samples[4].push(time(&mut fx.seed(), names[4]));
        assert!(fx.drop_listed(), "the seed script wrote the DROP");
        fx.reset();
        let mut list = fx.in_ns("nft");
        list.args(["list", "ruleset"]);
        samples[5].push(time(&mut list, names[5]));
    }
    for (name, s) in names.iter().zip(&samples) {
        eprintln!("nft table | {name} | {}", s.ms());
    }

    reset();
    let mut watch = nft_loopguard(&fx, &root, "watch");
    watch
        .args(["--resync", "10", "--log-format", "json"])
        .stderr(Stdio::piped());
    let mut child = watch.spawn().unwrap();
    // The watcher and every process it starts (nsenter execs it: the pid is loopguard's).
    let cpu = report::CgroupCpu::adopt(child.id(), "watch");
    let (tx, log) = mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let wait_log = |needle: &str| -> String {
        loop {
            let line = log
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("the watcher never logged {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    };
    wait_log("watching for drift");
    assert!(nft_table_listed(&fx), "the watcher wrote its table");
    let observer = TableObserver::start(&fx.ns.name);
    let mut rng = Rng::new();
    // The third is the first done by a writer that keeps its netlink socket open (`nft -i`): when
    // a writer's socket closes, the kernel waits out an RCU grace period under its commit mutex
    // (5-20 ms), which holds up any write until then, loopguard's repair included; kept open, the
    // row shows loopguard's own part.
    let drifts = NFT_DRIFTS;
    let mut latency = [Samples::default(), Samples::default(), Samples::default()];
    let mut counted = [0usize; 3];
    let mut others = Vec::new();
    let mut tries = 0;
    while latency.iter().any(|l| l.len() < reps()) {
        tries += 1;
        assert!(
            tries <= reps() * 6,
            "too few repairs by nft events: {others:?}"
        );
        let which = (0..3)
            .min_by_key(|&i| latency[i].len())
            .expect("three drifts");
        // As for the iptables rules: 3.5-4.5 s apart, so that loopguard sees no fight.
        std::thread::sleep(Duration::from_millis(3_500 + rng.below(1_000)));
        let args: Vec<String> = if which != 1 {
            let handle = fx.ns.loopguard_rule_handle("ip6 saddr ::1 drop");
            [
                "nft",
                "delete",
                "rule",
                "inet",
                "loopguard",
                "input",
                "handle",
                &handle,
            ]
            .map(String::from)
            .to_vec()
        } else {
            ["nft", "flush", "ruleset"].map(String::from).to_vec()
        };
        observer.arm();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (changed, back) = if which == 2 {
            with_socket_open(&fx, &args[1..].join(" "), || observer.back())
        } else {
            let out = fx.ns.exec(&args);
            assert!(out.status.success(), "{args:?}: {out:?}");
            observer.back()
        };
        assert!(
            nft_table_listed(&fx),
            "the observer saw the table, but it is not listed whole"
        );
        let line = wait_log("repaired drift");
        let trigger = serde_json::from_str::<serde_json::Value>(&line).unwrap()["trigger"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        counted[which] += 1;
        if trigger == "nft event" {
            latency[which].push(back.saturating_duration_since(changed));
        } else {
            others.push(trigger);
        }
        if which == 1 {
            // The flush took the foreign rules too: put them back for the next round.
            if size > 0 {
                fx.ns
                    .restore("ip6tables", "nft", &foreign_rules(Foreign::spread(size)));
            }
        }
    }
    let window = if report::quick() {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(60)
    };
    let pid = child.id();
    let before = cpu.used();
    std::thread::sleep(window);
    let used = cpu.used() - before;
    let idle_cpu = render::CpuUse::new(used, window);
    let rss_kib = rss_kib(pid);
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = child.wait();
    let _ = nft_loopguard(&fx, &root, "cleanup").status();
    for (i, drift) in drifts.iter().enumerate() {
        eprintln!(
            "nft table | {drift} | {} of {} | {}",
            latency[i].len(),
            counted[i],
            latency[i].ms()
        );
    }
    eprintln!("nft table: left out {others:?}");
    render::NftTable {
        foreign: size,
        one_shot: samples,
        latency: latency.to_vec(),
        counted: counted.to_vec(),
        others,
        idle_cpu,
        rss_kib,
    }
}

/// Sees loopguard's table come back from outside loopguard: a netlink socket of the bench's own
/// in the namespace; once armed (before the change), it reports when the change was committed (its
/// transaction's NEWGEN) and the end of the first transaction after it that created table
/// loopguard: the repair timed from the kernel's change, both moments seen by the same socket.
struct TableObserver {
    arm: mpsc::Sender<()>,
    back: mpsc::Receiver<(Instant, Instant)>,
}

impl TableObserver {
    fn start(ns: &str) -> TableObserver {
        let (arm, armed) = mpsc::channel::<()>();
        let (found, back) = mpsc::channel();
        let ns = ns.to_string();
        std::thread::spawn(move || {
            loopguard::node::netns::enter(&ns).unwrap();
            let fd = subscribe_nft();
            let mut buf = vec![0u8; 1 << 20];
            let mut recv = |flags: i32| -> Option<(Instant, Vec<u8>)> {
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut _, buf.len(), flags) };
                (n > 0).then(|| (Instant::now(), buf[..n as usize].to_vec()))
            };
            for () in armed {
                while recv(libc::MSG_DONTWAIT).is_some() {}
                // The change's own transaction ends with the first NEWGEN; the repair is the
                // first transaction after it that adds rules to table loopguard (NEWRULE), done
                // at its NEWGEN.
                let mut changed: Option<Instant> = None;
                let mut created = false;
                'transactions: loop {
                    let (at, datagram) = recv(0).expect("netlink receive");
                    for m in loopguard::rules::nft::wire::messages(&datagram) {
                        match m.nft() {
                            Some(6)
                                if changed.is_some()
                                    && m.body.windows(10).any(|w| w == b"loopguard\0") =>
                            {
                                created = true;
                            }
                            Some(15) if changed.is_none() => changed = Some(at),
                            Some(15) if created => {
                                let _ = found.send((changed.expect("seen"), at));
                                break 'transactions;
                            }
                            _ => {}
                        }
                    }
                }
            }
        });
        TableObserver { arm, back }
    }

    fn arm(&self) {
        self.arm.send(()).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }

    /// When the change was committed, and when loopguard's table was back.
    fn back(&self) -> (Instant, Instant) {
        self.back
            .recv_timeout(Duration::from_secs(30))
            .expect("loopguard's table came back")
    }
}

/// A netlink socket subscribed to nftables ruleset changes in this thread's namespace.
fn subscribe_nft() -> i32 {
    // SAFETY: socket syscalls on a descriptor this thread owns, with buffers it owns.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_NETFILTER,
        );
        assert!(fd >= 0);
        let mut addr: libc::sockaddr_nl = std::mem::zeroed();
        addr.nl_family = libc::AF_NETLINK as u16;
        assert_eq!(
            libc::bind(
                fd,
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32
            ),
            0
        );
        let group: libc::c_int = libc::NFNLGRP_NFTABLES;
        assert_eq!(
            libc::setsockopt(
                fd,
                libc::SOL_NETLINK,
                libc::NETLINK_ADD_MEMBERSHIP,
                &group as *const _ as *const _,
                4
            ),
            0
        );
        let size: libc::c_int = 8 << 20;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &size as *const _ as *const _,
            4,
        );
        fd
    }
}
