//! The node engine against a real kernel: every test makes its own network namespace, programs
//! real ip6tables in it with both backends, and deletes it afterwards. Needs root.

#[path = "support/netns.rs"]
mod netns;

use netns::TestNetns;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_loopguard");
const ACCEPT_IN: &str = "-A INPUT -i lo -j ACCEPT";
const DROP_SRC: &str = "-A INPUT -s ::1/128 -j DROP";
const ACCEPT_OUT: &str = "-A OUTPUT -o lo -j ACCEPT";

/// One node under test: a namespace, a backend, a host root whose dpkg database says "iptables
/// installed, nftables and ufw not" (where the CIS rule applies), a state file, and shims that
/// record every `*-restore` process loopguard starts.
struct Node {
    ns: TestNetns,
    backend: &'static str,
    dir: tempfile::TempDir,
}

impl Node {
    fn new(tag: &str, backend: &'static str) -> Node {
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
                std::fs::write(
                    &shim,
                    format!(
                        "#!/bin/sh\necho \"$0 $*\" >> {}\nexec {} \"$@\"\n",
                        dir.path().join("restores.log").display(),
                        real.display()
                    ),
                )
                .unwrap();
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

    fn state_file(&self) -> PathBuf {
        self.dir.path().join("state/state.json")
    }

    /// Runs `loopguard node <cmd> --netns NS --backend B --state-file F [--host-root H] ARGS`.
    fn loopguard(&self, cmd: &str, args: &[&str]) -> Output {
        self.loopguard_command(cmd, args).output().unwrap()
    }

    fn loopguard_command(&self, cmd: &str, args: &[&str]) -> Command {
        let path = format!(
            "{}:{}",
            self.dir.path().join("shims").display(),
            std::env::var("PATH").unwrap()
        );
        let mut c = Command::new(BIN);
        c.args([
            "node",
            cmd,
            "--netns",
            &self.ns.name,
            "--backend",
            self.backend,
        ])
        .arg("--state-file")
        .arg(self.state_file())
        .env("PATH", path)
        .env("XTABLES_LOCKFILE", self.dir.path().join("xtables.lock"))
        .stdin(Stdio::null());
        if cmd != "cleanup" {
            c.arg("--host-root").arg(self.dir.path().join("host"));
        }
        c.args(args);
        c
    }

    /// Runs a node command with `--output json`; returns (exit code, report).
    fn json(&self, cmd: &str, args: &[&str]) -> (i32, Value) {
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

    fn restores(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("restores.log"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    fn ip6(&self, args: &str) -> String {
        self.ns.ip6tables(self.backend, args)
    }

    fn chain(&self, chain: &str) -> Vec<String> {
        self.ip6(&format!("-S {chain}"))
            .lines()
            .filter(|l| l.starts_with("-A"))
            .map(str::to_string)
            .collect()
    }

    fn save(&self) -> String {
        self.ns.save("ip6tables", self.backend)
    }

    /// Runs the seed's own remediation script as users do today, with `ip6tables` pointing at this
    /// backend and `dpkg-query` answering like a host where the rule applies.
    fn run_seed_script(&self) {
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

    fn scanner_passes(&self) -> bool {
        netns::scanner_passes(&self.ns.name, self.backend)
    }
}

fn find_binary(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} not found: install iptables (apt-get install iptables)");
}

fn make_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn states(report: &Value) -> Vec<(String, String)> {
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

fn changes(report: &Value) -> usize {
    report["changes"].as_array().expect("changes").len()
}

/// Declares one test per backend.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod nft { $( #[test] fn $name() { super::$name("nft") } )* }
        mod legacy { $( #[test] fn $name() { super::$name("legacy") } )* }
    };
}

both_backends!(
    enforce_is_idempotent_and_second_run_writes_nothing,
    enforced_node_passes_the_scanner,
    seed_script_result_is_adopted_not_rewritten,
    seed_script_three_times_reports_duplicates,
    drop_before_accept_is_repaired,
    ten_thousand_foreign_rules_are_untouched,
    cleanup_after_adoption_removes_nothing,
    ipv6_disabled_is_not_applicable_and_untouched,
    held_xtables_lock_makes_enforce_wait_then_fail,
    watch_repairs_a_deleted_rule,
    ipv4_sibling_is_enforced_and_cleaned_up,
    state_file_problems_are_refused_without_deleting,
);

fn enforce_is_idempotent_and_second_run_writes_nothing(backend: &'static str) {
    let node = Node::new("idem", backend);
    let (code, report) = node.json("check", &[]);
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["compliant"], false);
    assert_eq!(report["backend"], format!("iptables-{backend}"));

    let (code, first) = node.json("enforce", &[]);
    assert_eq!(code, 0, "{first}");
    assert_eq!(first["compliant"], true);
    assert_eq!(changes(&first), 3);
    assert_eq!(
        node.restores(),
        1,
        "one restore transaction for the whole plan"
    );
    let after_first = node.save();

    let (code, second) = node.json("enforce", &[]);
    assert_eq!(code, 0);
    assert_eq!(changes(&second), 0);
    assert_eq!(
        node.restores(),
        1,
        "a compliant node gets no restore process at all"
    );
    assert_eq!(node.save(), after_first, "byte-identical ip6tables-save");
    assert_eq!(node.chain("INPUT"), vec![ACCEPT_IN, DROP_SRC]);
    assert_eq!(node.chain("OUTPUT"), vec![ACCEPT_OUT]);

    let (code, check) = node.json("check", &[]);
    assert_eq!(code, 0);
    assert!(
        check["findings"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["owned"] == true)
    );
}

fn enforced_node_passes_the_scanner(backend: &'static str) {
    let node = Node::new("scan", backend);
    node.ns.restore(
        "ip6tables",
        backend,
        "*filter\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n",
    );
    assert!(!node.scanner_passes());
    let (code, _) = node.json("enforce", &[]);
    assert_eq!(code, 0);
    assert!(
        node.scanner_passes(),
        "ComplianceAsCode regex fails:\n{}",
        node.ip6("-L INPUT -v -n -x")
    );

    // Append placement (the seed's) passes too, and puts the rules after the foreign one.
    let appended = Node::new("scanapp", backend);
    appended.ns.restore(
        "ip6tables",
        backend,
        "*filter\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n",
    );
    let (code, _) = appended.json("enforce", &["--placement", "append"]);
    assert_eq!(code, 0);
    assert_eq!(
        appended.chain("INPUT")[0],
        "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT"
    );
    assert!(appended.scanner_passes());
}

fn seed_script_result_is_adopted_not_rewritten(backend: &'static str) {
    let node = Node::new("seed", backend);
    node.run_seed_script();
    assert!(
        node.scanner_passes(),
        "the seed's own result passes the scanner"
    );
    let (code, report) = node.json("check", &[]);
    assert_eq!(code, 0, "{report}");
    assert!(states(&report).iter().all(|(_, s)| s == "present"));
    let before = node.save();
    let (code, report) = node.json("enforce", &[]);
    assert_eq!(code, 0);
    assert_eq!(changes(&report), 0);
    assert_eq!(node.restores(), 0);
    assert!(
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["owned"] == false),
        "adopted, not claimed"
    );
    assert_eq!(node.save(), before);
}

fn seed_script_three_times_reports_duplicates(backend: &'static str) {
    let node = Node::new("seed3", backend);
    for _ in 0..3 {
        node.run_seed_script();
    }
    let (code, report) = node.json("check", &[]);
    assert_eq!(code, 0, "the scanner still passes: {report}");
    assert_eq!(
        states(&report),
        vec![
            (ACCEPT_IN.into(), "duplicate".into()),
            (DROP_SRC.into(), "duplicate".into()),
            (ACCEPT_OUT.into(), "duplicate".into())
        ]
    );
    let text = String::from_utf8(node.loopguard("check", &[]).stdout).unwrap();
    assert!(text.contains("duplicate"), "{text}");
}

fn drop_before_accept_is_repaired(backend: &'static str) {
    let node = Node::new("order", backend);
    node.ns.restore(
        "ip6tables",
        backend,
        "*filter\n-A INPUT -s ::1/128 -j DROP\n-A INPUT -p tcp --dport 22 -j ACCEPT\n-A INPUT -i lo -j ACCEPT\n-A OUTPUT -o lo -j ACCEPT\nCOMMIT\n",
    );
    let (code, report) = node.json("check", &[]);
    assert_eq!(code, 1);
    assert_eq!(states(&report)[1], (DROP_SRC.into(), "misplaced".into()));
    let (code, report) = node.json("enforce", &[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(
        changes(&report),
        1,
        "one DROP inserted right after the ACCEPT; nothing moved"
    );
    assert_eq!(
        node.chain("INPUT"),
        vec![
            DROP_SRC,
            "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT",
            ACCEPT_IN,
            DROP_SRC
        ]
    );
    assert!(node.scanner_passes());
    // Cleanup removes the one DROP loopguard added, and only it.
    let (code, _) = node.json("cleanup", &[]);
    assert_eq!(code, 0);
    assert_eq!(
        node.chain("INPUT"),
        vec![
            DROP_SRC,
            "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT",
            ACCEPT_IN
        ]
    );
}

/// 10,000 foreign rules: 1,000 in INPUT (some at the top, before anything loopguard adds),
/// 1,000 in OUTPUT and 8,000 in eight other chains.
fn foreign_rules_script(total_other: usize) -> String {
    let mut s = String::from("*filter\n");
    for c in 0..8 {
        s.push_str(&format!(":FOREIGN-{c} - [0:0]\n"));
    }
    s.push_str("-A INPUT -j FOREIGN-0\n-A INPUT -p tcp --dport 22 -j ACCEPT\n");
    for i in 0..998 {
        s.push_str(&format!(
            "-A INPUT -s 2001:db8:1::{:x}/128 -p tcp --dport {} -j ACCEPT\n",
            i + 1,
            1000 + i
        ));
    }
    s.push_str("-A OUTPUT -j FOREIGN-1\n");
    for i in 0..999 {
        s.push_str(&format!(
            "-A OUTPUT -d 2001:db8:2::{:x}/128 -j REJECT\n",
            i + 1
        ));
    }
    for i in 0..total_other {
        s.push_str(&format!(
            "-A FOREIGN-{} -s 2001:db8:3::{:x}/128 -j DROP\n",
            i % 8,
            i + 1
        ));
    }
    s.push_str("COMMIT\n");
    s
}

fn ten_thousand_foreign_rules_are_untouched(backend: &'static str) {
    let node = Node::new("foreign", backend);
    node.ns
        .restore("ip6tables", backend, &foreign_rules_script(8000));
    let original = node.save();
    assert_eq!(
        original.lines().filter(|l| l.starts_with("-A")).count(),
        10_000
    );

    let (code, report) = node.json("enforce", &[]);
    assert_eq!(code, 0, "{report}");
    let enforced = node.save();
    // Removing loopguard's three lines gives back the original, byte for byte.
    let mut without_ours: Vec<&str> = enforced.lines().collect();
    for ours in [ACCEPT_IN, DROP_SRC, ACCEPT_OUT] {
        let at = without_ours
            .iter()
            .position(|l| *l == ours)
            .expect("rule inserted");
        without_ours.remove(at);
    }
    assert_eq!(without_ours.join("\n"), original);
    assert_eq!(
        node.chain("INPUT")[..3],
        [ACCEPT_IN, DROP_SRC, "-A INPUT -j FOREIGN-0"]
    );

    let (code, _) = node.json("cleanup", &[]);
    assert_eq!(code, 0);
    assert_eq!(node.save(), original, "byte-identical after cleanup");
    assert!(!node.state_file().exists(), "nothing left to own");
}

fn cleanup_after_adoption_removes_nothing(backend: &'static str) {
    let node = Node::new("adopt", backend);
    node.run_seed_script();
    let (code, _) = node.json("enforce", &[]);
    assert_eq!(code, 0);
    let before = node.save();
    let (code, report) = node.json("cleanup", &[]);
    assert_eq!(code, 0);
    assert_eq!(changes(&report), 0);
    assert_eq!(node.restores(), 0);
    assert_eq!(node.save(), before);
}

fn ipv6_disabled_is_not_applicable_and_untouched(backend: &'static str) {
    let node = Node::new("noip6", backend);
    node.ns.set_sysctl("net.ipv6.conf.all.disable_ipv6", "1");
    let before = node.save();
    let (code, report) = node.json("check", &[]);
    assert_eq!(code, 3, "{report}");
    assert_eq!(report["applicable"], false);
    assert_eq!(report["ipv6Enabled"], false);
    assert!(
        report["reason"]
            .as_str()
            .unwrap()
            .contains("IPv6 is disabled")
    );
    let (code, report) = node.json("enforce", &["--applicability", "always"]);
    assert_eq!(code, 3);
    assert_eq!(changes(&report), 0);
    assert_eq!(node.restores(), 0);
    assert_eq!(node.save(), before);
}

fn held_xtables_lock_makes_enforce_wait_then_fail(backend: &'static str) {
    let node = Node::new("lock", backend);
    let lock = node.dir.path().join("xtables.lock");
    std::fs::write(&lock, "").unwrap();
    let hold = |secs: &str| {
        let child = Command::new("flock")
            .arg(&lock)
            .args(["sleep", secs])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        child
    };

    // Held longer than --wait: enforce waits that long, then fails clearly, writing nothing.
    let mut holder = hold("4");
    let started = Instant::now();
    let out = node.loopguard("enforce", &["--wait", "1"]);
    let waited = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        waited >= Duration::from_millis(900),
        "gave up after {waited:?} without waiting"
    );
    assert!(
        stderr.contains("xtables lock") && stderr.contains("--wait"),
        "{stderr}"
    );
    assert!(node.chain("INPUT").is_empty());
    holder.kill().unwrap();
    holder.wait().unwrap();

    // Held for a moment: enforce waits for it and succeeds.
    let mut holder = hold("1");
    let started = Instant::now();
    let (code, report) = node.json("enforce", &["--wait", "5"]);
    assert_eq!(code, 0, "{report}");
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(report["compliant"], true);
    holder.wait().unwrap();
}

fn watch_repairs_a_deleted_rule(backend: &'static str) {
    let node = Node::new("watch", backend);
    let mut child = node
        .loopguard_command("watch", &["--output", "json", "--resync", "0.5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["compliant"], true);

    node.ip6("-D INPUT -s ::1/128 -j DROP");
    let deleted = Instant::now();
    while node.chain("INPUT") != vec![ACCEPT_IN, DROP_SRC] {
        assert!(
            deleted.elapsed() < Duration::from_secs(5),
            "not repaired: {:?}",
            node.chain("INPUT")
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let repaired_in = deleted.elapsed();
    eprintln!("{backend}: rule back after {repaired_in:?}");
    if backend == "nft" {
        // Event driven: far below the 0.5 s resync poll.
        assert!(
            repaired_in < Duration::from_millis(400),
            "nft repair took {repaired_in:?}"
        );
    }

    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("repaired drift"), "{stderr}");
    assert_eq!(
        node.chain("INPUT"),
        vec![ACCEPT_IN, DROP_SRC],
        "rules stay after the watch ends"
    );
}

fn ipv4_sibling_is_enforced_and_cleaned_up(backend: &'static str) {
    let node = Node::new("ipv4", backend);
    let rules4 = || -> Vec<String> {
        node.ns
            .run(&[&format!("iptables-{backend}"), "-S"])
            .lines()
            .filter(|l| l.starts_with("-A"))
            .map(str::to_string)
            .collect()
    };
    let (code, report) = node.json("enforce", &["--ip-families", "ipv6,ipv4"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(changes(&report), 6);
    assert_eq!(node.restores(), 2, "one restore per family");
    assert_eq!(
        rules4(),
        vec![
            "-A INPUT -i lo -j ACCEPT",
            "-A INPUT -s 127.0.0.0/8 -j DROP",
            "-A OUTPUT -o lo -j ACCEPT"
        ]
    );
    // Dropping IPv4 from the families removes the IPv4 rules loopguard owns.
    let (code, report) = node.json("enforce", &[]);
    assert_eq!(code, 0);
    assert_eq!(changes(&report), 3, "{report}");
    assert!(rules4().is_empty());
    assert_eq!(node.chain("INPUT"), vec![ACCEPT_IN, DROP_SRC]);
}

fn state_file_problems_are_refused_without_deleting(backend: &'static str) {
    let node = Node::new("state", backend);
    let (code, _) = node.json("enforce", &[]);
    assert_eq!(code, 0);
    let enforced = node.save();

    // Corrupt: a clear error, no deletion, the file kept for inspection.
    let good = std::fs::read_to_string(node.state_file()).unwrap();
    std::fs::write(node.state_file(), "{garbage").unwrap();
    let out = node.loopguard("cleanup", &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a loopguard state file"));
    assert_eq!(node.save(), enforced);
    assert_eq!(
        std::fs::read_to_string(node.state_file()).unwrap(),
        "{garbage"
    );

    // From the other backend: a clear error naming the way out, no deletion.
    let other = if backend == "nft" { "legacy" } else { "nft" };
    std::fs::write(
        node.state_file(),
        good.replace(&format!("iptables-{backend}"), &format!("iptables-{other}")),
    )
    .unwrap();
    let out = node.loopguard("cleanup", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains(&format!("written for iptables-{other}")) && stderr.contains("--backend"),
        "{stderr}"
    );
    assert_eq!(node.save(), enforced);
}

#[test]
fn backend_is_detected_like_iptables_wrappers() {
    let node = Node::new("detect", "nft");
    let detect = |ns: &TestNetns| -> Value {
        let out = Command::new(BIN)
            .args([
                "node",
                "check",
                "--netns",
                &ns.name,
                "--output",
                "json",
                "--applicability",
                "always",
            ])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert_eq!(
        detect(&node.ns)["backend"],
        "iptables-nft",
        "empty host: nft"
    );
    node.ns.restore(
        "ip6tables",
        "legacy",
        "*filter\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n",
    );
    assert_eq!(
        detect(&node.ns)["backend"],
        "iptables-legacy",
        "rules only in legacy"
    );
    node.ns.restore(
        "iptables",
        "nft",
        "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n",
    );
    assert_eq!(
        detect(&node.ns)["backend"],
        "iptables-nft",
        "kubelet's hint chain in nft wins"
    );
}

#[test]
fn bad_input_gets_clear_errors() {
    let out = Command::new(BIN)
        .args(["node", "check", "--netns", "no-such-ns-lgt"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ip netns add"));
    let node = Node::new("flags", "nft");
    let out = node.loopguard("check", &["--ip-families", "ipv4"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must include ipv6"));
    let out = node.loopguard("check", &["--placement", "top"]);
    assert_eq!(out.status.code(), Some(2), "clap usage errors exit 2");
}
