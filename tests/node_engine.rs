//! The node engine against a real kernel: every test makes its own network namespace, programs
//! real ip6tables in it with both backends, and deletes it afterwards. Needs root.

#[path = "support/netns.rs"]
mod netns;
#[path = "support/node.rs"]
mod node;

use netns::TestNetns;
use node::{BIN, Node, Repeat, Watch, changes, states};
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
const ACCEPT_IN: &str = "-A INPUT -i lo -j ACCEPT";
const DROP_SRC: &str = "-A INPUT -s ::1/128 -j DROP";
const ACCEPT_OUT: &str = "-A OUTPUT -o lo -j ACCEPT";

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
    the_lockout_case_keeps_ssh,
    a_kill_right_after_the_restore_forgets_nothing,
    a_fight_ends_without_piling_up_rules,
    two_loopguards_take_turns,
    a_foreign_writer_never_loses_a_rule,
    a_pair_behind_a_catch_all_is_reported_shadowed,
    dry_runs_print_the_plan_and_write_nothing,
    enforce_fails_when_the_node_stays_non_compliant,
);

/// A foreign rule whose legacy entry `rules::decode` does not cover (a comment match): with it in
/// INPUT, the legacy backend reads with the binaries and writes with `ip6tables-legacy-restore`,
/// the path the restore shim can hold, swallow or kill.
const UNDECODED: &str = "-A INPUT -p tcp --dport 22 -m comment --comment ssh -j ACCEPT";

/// How many restores a write of `per_nft` transactions runs: as many on nft (the namespace starts
/// without iptables-nft's chains, and creating them is left to the binaries), none on legacy,
/// where the commands write the table in process.
fn restores_for(backend: &str, per_nft: usize) -> usize {
    if backend == "legacy" { 0 } else { per_nft }
}

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
    // nft: one restore transaction for the whole plan; legacy: one table replace in process.
    let writes = restores_for(backend, 1);
    assert_eq!(
        node.restores(),
        writes,
        "one restore transaction for the whole plan (none on legacy: written in process)"
    );
    let after_first = node.save();

    let (code, second) = node.json("enforce", &[]);
    assert_eq!(code, 0);
    assert_eq!(changes(&second), 0);
    assert_eq!(
        node.restores(),
        writes,
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
    let original = node.save();
    let (code, report) = node.json("check", &[]);
    assert_eq!(code, 1);
    assert_eq!(states(&report)[1], (DROP_SRC.into(), "misplaced".into()));
    let (code, report) = node.json("enforce", &[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(
        changes(&report),
        1,
        "one ACCEPT inserted right before the first DROP; nothing moved"
    );
    assert_eq!(
        node.chain("INPUT"),
        vec![
            ACCEPT_IN,
            DROP_SRC,
            "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT",
            ACCEPT_IN,
        ]
    );
    assert!(node.scanner_passes());
    // Cleanup removes the one ACCEPT loopguard added (by spec: it is the first copy), and only it.
    let (code, _) = node.json("cleanup", &[]);
    assert_eq!(code, 0);
    assert_eq!(node.save(), original);
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
    assert_eq!(report["reason"], "RuleNotApplicable");
    assert!(
        report["message"]
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
        wait_until_held(&lock);
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
    // A resync far away: the repair must come from nft events or the legacy probe.
    let mut child = node
        .loopguard_command("watch", &["--output", "json", "--resync", "30"])
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
    assert!(
        repaired_in < Duration::from_secs(2),
        "{backend} repair took {repaired_in:?}"
    );

    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let trigger = match backend {
        "nft" => "after the nft event",
        _ => "after the legacy table change",
    };
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("repaired drift") && l.contains(trigger)),
        "repaired {trigger}: {stderr}"
    );
    if backend == "nft" {
        // The nft event names the process that made the change (NFT_MSG_NEWGEN), and so does the log.
        assert!(
            stderr
                .lines()
                .any(|l| l.contains("repaired drift")
                    && l.contains("changed by ip6tables-nft (pid ")),
            "the repair names the writer: {stderr}"
        );
    }
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
    assert_eq!(
        node.restores(),
        restores_for(backend, 2),
        "one restore per family (none on legacy: written in process)"
    );
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

/// Backend detection runs again only where its inputs changed: the nft part when the nftables
/// ruleset generation moves, the legacy part (a full `*-legacy-save`) when a legacy table's shape
/// does; otherwise a resync costs no detection at all.
#[test]
fn backend_detection_runs_again_only_when_its_inputs_change() {
    let node = Node::new("detect-once", "nft");
    node.ns.restore(
        "ip6tables",
        "legacy",
        "*filter\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n",
    );
    let name = node.ns.name.clone();
    let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let detector = std::thread::spawn(move || {
        loopguard::node::netns::enter(&name).unwrap();
        let mut detector = loopguard::node::facts::Detector::default();
        let mut runs = Vec::new();
        for step in rx {
            let (backend, _) = detector.detect();
            runs.push((step, backend, detector.nft_runs, detector.legacy_runs));
            done_tx.send(()).unwrap();
        }
        runs
    });
    let step = |name: &'static str| {
        tx.send(name).unwrap();
        done_rx.recv().unwrap();
    };
    step("first");
    step("nothing changed");
    step("nothing changed again");
    node.ns.restore(
        "ip6tables",
        "legacy",
        "*filter\n-A INPUT -p tcp --dport 23 -j ACCEPT\nCOMMIT\n",
    );
    step("a legacy rule more");
    node.ns
        .restore("iptables", "nft", "*filter\n:SOMETHING - [0:0]\nCOMMIT\n");
    step("an nft change");
    drop(tx);
    let runs = detector.join().unwrap();
    let summary: Vec<(&str, String, u64, u64)> = runs
        .into_iter()
        .map(|(s, b, n, l)| (s, b.to_string(), n, l))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("first", "iptables-legacy".to_string(), 1, 1),
            ("nothing changed", "iptables-legacy".to_string(), 1, 1),
            ("nothing changed again", "iptables-legacy".to_string(), 1, 1),
            ("a legacy rule more", "iptables-legacy".to_string(), 1, 2),
            ("an nft change", "iptables-legacy".to_string(), 2, 2),
        ]
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
    let long = "n".repeat(300);
    for name in ["a/b", "..", "x\ny", long.as_str()] {
        let out = Command::new(BIN)
            .args(["node", "check", "--netns", name])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name:?}: {stderr}");
        assert!(
            stderr.contains("invalid network namespace name") && !stderr.contains("panicked"),
            "{name:?}: {stderr}"
        );
    }
    let node = Node::new("flags", "nft");
    let out = node.loopguard("check", &["--ip-families", "ipv4"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must include ipv6"));
    let out = node.loopguard("check", &["--placement", "top"]);
    assert_eq!(out.status.code(), Some(2), "clap usage errors exit 2");
    for resync in ["0", "1e-12", "1e12", "-1", "abc", "NaN", "inf"] {
        let out = node.loopguard("watch", &[&format!("--resync={resync}")]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--resync {resync}: {stderr}");
        assert!(
            stderr.contains("--resync")
                && stderr.contains("seconds")
                && !stderr.contains("panicked"),
            "--resync {resync}: {stderr}"
        );
    }
    let out = node.loopguard("enforce", &["--wait", "99999999999999"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("between 0 and 3600"));
    assert!(node.chain("INPUT").is_empty(), "nothing written");
}

/// A state file from a newer loopguard, and another loopguard holding the state lock: clear
/// errors, nothing written, nothing lost.
#[test]
fn state_from_elsewhere_is_refused_and_kept() {
    let node = Node::new("newer", "nft");
    std::fs::create_dir_all(node.state_file().parent().unwrap()).unwrap();
    let newer = r#"{"version":2,"backend":"iptables-nft","rules":[],"somethingNew":{}}"#;
    std::fs::write(node.state_file(), newer).unwrap();
    for cmd in ["enforce", "cleanup"] {
        let out = node.loopguard(cmd, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {stderr}");
        assert!(stderr.contains("newer loopguard"), "{stderr}");
    }
    assert_eq!(std::fs::read_to_string(node.state_file()).unwrap(), newer);
    assert!(node.chain("INPUT").is_empty());

    std::fs::remove_file(node.state_file()).unwrap();
    let lock = node.state_file().with_extension("lock");
    std::fs::write(&lock, "").unwrap();
    let mut holder = Command::new("flock")
        .arg(&lock)
        .args(["sleep", "5"])
        .spawn()
        .unwrap();
    wait_until_held(&lock);
    let started = Instant::now();
    let out = node.loopguard("enforce", &["--wait", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(stderr.contains("another loopguard process"), "{stderr}");
    assert!(
        node.chain("INPUT").is_empty(),
        "nothing written while locked out"
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
    let (code, _) = node.json("enforce", &[]);
    assert_eq!(code, 0);
}

/// The report's edits as (action, rule) pairs.
fn edits(report: &Value) -> Vec<(String, String)> {
    report["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_string(),
                e["rule"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The issue's lockout case, as a new user ran it: an empty accounting rule and an SSH rule,
/// enforce with append, clean up. Cleanup once deleted the SSH rule.
fn the_lockout_case_keeps_ssh(backend: &'static str) {
    let node = Node::new("lockout", backend);
    node.ip6("-A INPUT");
    node.ip6("-A INPUT -p tcp --dport 22 -j ACCEPT");
    let before = node.save();
    let (code, report) = node.json(
        "enforce",
        &["--applicability", "always", "--placement", "append"],
    );
    assert_eq!(code, 0, "{report}");
    assert_eq!(
        node.chain("INPUT"),
        vec![
            "-A INPUT",
            "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT",
            ACCEPT_IN,
            DROP_SRC
        ]
    );
    let (code, report) = node.json("cleanup", &[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(
        edits(&report),
        vec![
            ("delete".to_string(), ACCEPT_IN.to_string()),
            ("delete".to_string(), DROP_SRC.to_string()),
            ("delete".to_string(), ACCEPT_OUT.to_string()),
        ],
        "deletes name loopguard's rules, never a position"
    );
    assert_eq!(
        node.save(),
        before,
        "the empty rule and the SSH rule are there, loopguard's rules are gone"
    );
}

/// SIGKILL between a successful restore and the state write: the intent stored before the
/// restore lets the next run claim the rules, so cleanup removes them instead of adopting them.
fn a_kill_right_after_the_restore_forgets_nothing(backend: &'static str) {
    use std::os::unix::process::ExitStatusExt;
    let node = Node::new("crash", backend);
    // A commented rule: on legacy its entry is one loopguard does not decode, so the chains are
    // read with the binaries and the plan written with a restore, which the shim kills after.
    node.ip6(UNDECODED);
    let before = node.save();
    let killed = node
        .loopguard_command("enforce", &[])
        .env("LGT_KILL_AFTER_RESTORE", "1")
        .output()
        .unwrap();
    assert_eq!(
        killed.status.signal(),
        Some(libc::SIGKILL),
        "the shim kills loopguard after the restore: {killed:?}"
    );
    assert!(node.scanner_passes(), "the restore went through");
    let state = std::fs::read_to_string(node.state_file()).expect("the intent was stored");
    assert!(state.contains("\"pending\": 1"), "{state}");

    let (code, report) = node.json("check", &[]);
    assert_eq!(code, 0, "{report}");
    assert!(
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["owned"] == true),
        "loopguard's own rules, not adopted ones: {report}"
    );
    // Killed again, now right after cleanup's restore: the next run sees its rules gone.
    let killed = node
        .loopguard_command("cleanup", &[])
        .env("LGT_KILL_AFTER_RESTORE", "1")
        .output()
        .unwrap();
    assert_eq!(killed.status.signal(), Some(libc::SIGKILL));
    assert_eq!(node.save(), before);
    let (code, report) = node.json("cleanup", &[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(changes(&report), 0);
    assert!(!node.state_file().exists(), "nothing left to own");
    assert_eq!(node.save(), before);
}

/// Another tool deletes the DROP every 50 ms for 10 s while `node watch` runs: loopguard never
/// holds two DROPs, backs off (bounded restores, the hold doubling from 1 s), says NotConverging,
/// and is compliant again once the fight stops.
fn a_fight_ends_without_piling_up_rules(backend: &'static str) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let node = Node::new("fight", backend);
    let mut watch = node.watch(&["--resync", "0.5"]);
    watch.wait_for("compliant at start", Duration::from_secs(10), |r| {
        r["compliant"] == true
    });
    let invoker = node.invoker();
    let most = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = most.clone();
    let sampler = Repeat::start(move |_| {
        let drops = invoker.input_copies("-s ::1/128 -j DROP");
        seen.fetch_max(drops, Ordering::SeqCst);
    });
    let restores_before = node.restores();
    let invoker = node.invoker();
    let fighter = Repeat::start(move |_| {
        invoker.ip6tables(&["-D", "INPUT", "-s", "::1/128", "-j", "DROP"]);
        std::thread::sleep(Duration::from_millis(50));
    });
    std::thread::sleep(Duration::from_secs(10));
    fighter.stop();
    let restores = node.restores() - restores_before;
    watch.wait_for("NotConverging", Duration::from_secs(1), |r| {
        r["reason"] == "NotConverging"
    });
    let stopped = Instant::now();
    watch.wait_for_latest("compliant again", Duration::from_secs(45), |r| {
        r["compliant"] == true
    });
    eprintln!(
        "{backend}: {restores} restores in 10 s of fighting; compliant {:?} after it stopped",
        stopped.elapsed()
    );
    sampler.stop();
    assert!(node.scanner_passes());
    assert_eq!(node.copies("INPUT", "-s ::1/128 -j DROP"), 1);
    let most = most.load(Ordering::SeqCst);
    assert!(most <= 1, "INPUT held {most} DROPs at once");
    let (clean, log) = watch.stop();
    assert!(clean, "{log}");
    // Every write is a logged repair (the legacy watch writes in process, without a restore).
    let repairs = log.lines().filter(|l| l.contains("repaired drift")).count();
    eprintln!("{backend}: {repairs} repairs logged");
    assert!(
        repairs <= 13,
        "{repairs} repairs in 10 s of fighting and the one after: the fight was not damped"
    );
    match backend {
        "nft" => assert!(
            restores <= 12,
            "{restores} restores in 10 s: the fight was not damped"
        ),
        _ => assert_eq!(restores, 0, "the legacy watch repairs in process"),
    }
    assert!(
        log.contains("not converging") && log.contains("-s ::1/128 -j DROP inserted"),
        "the log names what kept changing:\n{log}"
    );
    // The hold doubles with every write that is undone again (1 s, 2 s, 4 s, ... up to 30 s).
    let holds: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("not converging"))
        .filter_map(|l| {
            l.split("backoff_s=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    eprintln!("{backend}: holds {holds:?}");
    assert!(
        holds.len() >= 3 && holds[..3] == [1.0, 2.0, 4.0],
        "the back-off doubles: {holds:?}\n{log}"
    );
}

/// Two loopguard processes on one node (an enforce loop and a cleanup loop, each restore held
/// open for 100 ms) take turns on the lock beside the state file: no two restores ever run at
/// once, and the node never holds two DROPs.
fn two_loopguards_take_turns(backend: &'static str) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let node = Node::new("turns", backend);
    // Restores on both backends (see `UNDECODED`), each held open by the shim.
    node.ip6(UNDECODED);
    let before = node.save();
    let invoker = node.invoker();
    let most = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = most.clone();
    let sampler = Repeat::start(move |_| {
        let drops = invoker.input_copies("-s ::1/128 -j DROP");
        seen.fetch_max(drops, Ordering::SeqCst);
    });
    let loops: Vec<Repeat> = ["enforce", "cleanup"]
        .into_iter()
        .map(|cmd| {
            let invoker = node.invoker();
            Repeat::start(move |_| {
                let out = invoker
                    .command(cmd, &[])
                    .env("LGT_RESTORE_HOLD", "0.1")
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{cmd}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(4));
    for l in loops {
        l.stop();
    }
    sampler.stop();
    let restores = node.restores();
    assert!(restores >= 6, "both took turns: {restores} restores");
    assert_eq!(node.overlaps(), 0, "two restores ran at once");
    assert!(most.load(Ordering::SeqCst) <= 1);
    let (code, _) = node.json("cleanup", &[]);
    assert_eq!(code, 0);
    assert_eq!(node.save(), before);
    assert!(!node.state_file().exists());
}

/// Another program inserts its own rules at random positions of INPUT and deletes them again
/// while loopguard watches, enforces and cleans up: every delete of its own rule succeeds, and
/// at the end INPUT holds exactly its rules.
fn a_foreign_writer_never_loses_a_rule(backend: &'static str) {
    let node = Node::new("writer", backend);
    let mut watch = node.watch(&["--resync", "0.5"]);
    watch.wait_for("compliant at start", Duration::from_secs(10), |r| {
        r["compliant"] == true
    });
    let mine = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let writer_rules = mine.clone();
    let invoker = node.invoker();
    let (inserted, refused) = (
        std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
    );
    let (ins, refs) = (inserted.clone(), refused.clone());
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let writer = Repeat::start(move |round| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let mut own = writer_rules.lock().unwrap();
        if own.len() < 4 || seed % 3 != 0 {
            let listed = invoker.ip6tables(&["-S", "INPUT"]);
            let len = String::from_utf8_lossy(&listed.stdout).lines().count() - 1;
            let position = (1 + seed as usize % (len + 1)).to_string();
            let source = format!("2001:db8:f::{:x}/128", round + 1);
            let out = invoker.ip6tables(&["-I", "INPUT", &position, "-s", &source, "-j", "ACCEPT"]);
            // A position made stale by loopguard's own write is refused; nothing was inserted.
            if out.status.success() {
                own.push(format!("-A INPUT -s {source} -j ACCEPT"));
                ins.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            } else {
                refs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        } else {
            let at = seed as usize % own.len();
            let victim = own.remove(at);
            let args: Vec<&str> = victim.split_whitespace().skip(2).collect();
            let out = invoker.ip6tables(&[&["-D", "INPUT"], &args[..]].concat());
            assert!(
                out.status.success(),
                "the writer's own rule {victim} is gone: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        drop(own);
        std::thread::sleep(Duration::from_millis(15));
    });
    let started = Instant::now();
    let mut rounds = 0;
    while started.elapsed() < Duration::from_secs(6) {
        for cmd in ["enforce", "cleanup"] {
            let (code, report) = node.json(cmd, &[]);
            // The writer may put its rule between the ACCEPT and the DROP right after enforce
            // wrote them: enforce then says, with exit 1, that the node is still not compliant.
            let expected: &[i32] = if cmd == "enforce" { &[0, 1] } else { &[0] };
            assert!(expected.contains(&code), "{cmd} exited {code}: {report}");
        }
        rounds += 1;
    }
    writer.stop();
    let (clean, log) = watch.stop();
    assert!(clean, "{log}");
    let (code, _) = node.json("cleanup", &[]);
    assert_eq!(code, 0);
    let mut expected = mine.lock().unwrap().clone();
    let mut input = node.chain("INPUT");
    eprintln!(
        "{backend}: {rounds} enforce+cleanup rounds beside the watch; the writer ends with {} rules",
        expected.len()
    );
    expected.sort();
    input.sort();
    assert_eq!(input, expected, "INPUT holds exactly the writer's rules");
    // The writer really wrote: most of its inserts went through, beside loopguard.
    let (inserted, refused) = (
        inserted.load(std::sync::atomic::Ordering::SeqCst),
        refused.load(std::sync::atomic::Ordering::SeqCst),
    );
    eprintln!("{backend}: the writer inserted {inserted} rules, {refused} inserts refused");
    assert!(
        inserted >= 20 && refused * 2 <= inserted,
        "the writer inserted {inserted} rules and had {refused} refused"
    );
    assert!(node.chain("OUTPUT").is_empty());
}

/// A pair after a catch-all REJECT passes the scanner but protects nothing: reported Shadowed.
/// Insert placement never produces it.
fn a_pair_behind_a_catch_all_is_reported_shadowed(backend: &'static str) {
    let node = Node::new("shadow", backend);
    node.ns.restore(
        "ip6tables",
        backend,
        "*filter\n-A INPUT -p tcp --dport 22 -j ACCEPT\n-A INPUT -j REJECT\nCOMMIT\n",
    );
    let (code, report) = node.json("enforce", &["--placement", "append"]);
    assert_eq!(code, 0, "{report}");
    assert!(node.scanner_passes(), "the scanner passes it");
    assert_eq!(report["compliant"], true);
    assert_eq!(report["reason"], "Shadowed", "{report}");
    assert!(
        report["message"]
            .as_str()
            .unwrap()
            .contains("-j REJECT --reject-with icmp6-port-unreachable"),
        "{report}"
    );
    assert_eq!(
        states(&report)[..2],
        [
            (ACCEPT_IN.to_string(), "shadowed".to_string()),
            (DROP_SRC.to_string(), "shadowed".to_string())
        ]
    );
    let text = String::from_utf8(node.loopguard("check", &[]).stdout).unwrap();
    assert!(
        text.contains("shadowed") && text.contains("Shadowed"),
        "{text}"
    );

    let (code, _) = node.json("cleanup", &[]);
    assert_eq!(code, 0);
    let (code, report) = node.json("enforce", &[]);
    assert_eq!(code, 0);
    assert_eq!(report["reason"], "RulesInPlace", "{report}");
    assert_eq!(node.chain("INPUT")[..2], [ACCEPT_IN, DROP_SRC]);
}

/// IPv6 switched off and on, and the backend changing under a running watch (backend detected,
/// as the chart runs it): each is noticed at the next resync and reported, without a crash.
#[test]
fn runtime_changes_are_noticed_at_the_next_resync() {
    let node = Node::new("runtime", "nft");
    let mut invoker = node.invoker();
    invoker.backend = None;
    let mut watch =
        Watch::start(invoker.command("watch", &["--output", "json", "--resync", "0.5"]));
    watch.wait_for("compliant on nft", Duration::from_secs(10), |r| {
        r["compliant"] == true && r["backend"] == "iptables-nft"
    });

    node.ns.set_sysctl("net.ipv6.conf.all.disable_ipv6", "1");
    watch.wait_for_latest("not applicable", Duration::from_secs(5), |r| {
        r["applicable"] == false
            && r["reason"] == "RuleNotApplicable"
            && r["message"].as_str().unwrap().contains("IPv6 is disabled")
    });
    node.ns.set_sysctl("net.ipv6.conf.all.disable_ipv6", "0");
    watch.wait_for_latest("compliant again", Duration::from_secs(5), |r| {
        r["compliant"] == true
    });

    // Rules appear in the legacy tables: the host now looks like a legacy host, while the rules
    // loopguard owns are in the nft tables. It says so, and writes nothing to either.
    node.ns
        .ip6tables("legacy", "-A INPUT -p tcp --dport 22 -j ACCEPT");
    watch.wait_for_log("BackendChanged", Duration::from_secs(5));
    assert!(
        watch.log().contains("loopguard node cleanup --backend nft"),
        "{}",
        watch.log()
    );
    assert!(watch.running(), "no crash");
    assert_eq!(
        node.ns.ip6tables("legacy", "-S INPUT"),
        "-P INPUT ACCEPT\n-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\n",
        "nothing written to the legacy tables"
    );
    node.ns
        .ip6tables("legacy", "-D INPUT -p tcp --dport 22 -j ACCEPT");
    watch.wait_for_log("to=iptables-nft", Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(1));
    assert!(watch.running());
    let (code, report) = node.json("check", &[]);
    assert_eq!(code, 0, "{report}");
    let (clean, log) = watch.stop();
    assert!(clean, "{log}");
}

/// `--dry-run` prints the plan (the restore lines) and writes nothing: no restore, no state file.
fn dry_runs_print_the_plan_and_write_nothing(backend: &'static str) {
    let node = Node::new("dryrun", backend);
    node.ip6("-A INPUT -p tcp --dport 22 -j ACCEPT");
    let before = node.save();
    let (code, report) = node.json("enforce", &["--dry-run"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["dryRun"], true);
    assert_eq!(report["compliant"], false, "the node as it is");
    assert_eq!(changes(&report), 3);
    let text = String::from_utf8(node.loopguard("enforce", &["--dry-run"]).stdout).unwrap();
    assert!(
        text.contains("dry run, nothing written") && text.contains("-I INPUT 1 -i lo -j ACCEPT"),
        "{text}"
    );
    assert_eq!(node.restores(), 0);
    assert_eq!(node.save(), before);
    assert!(!node.state_file().exists());

    let (code, _) = node.json("enforce", &[]);
    assert_eq!(code, 0);
    let enforced = node.save();
    let (code, report) = node.json("cleanup", &["--dry-run"]);
    assert_eq!(code, 0);
    assert_eq!(edits(&report).len(), 3, "{report}");
    assert!(edits(&report).iter().all(|(action, _)| action == "delete"));
    assert_eq!(
        node.restores(),
        restores_for(backend, 1),
        "only the real enforce wrote (on legacy in process)"
    );
    assert_eq!(node.save(), enforced);
    assert!(node.state_file().exists());
}

/// `enforce` exits 1 when the node is still not compliant afterwards (here the restore is
/// swallowed), and the JSON says when, where, by which version and for which rule.
fn enforce_fails_when_the_node_stays_non_compliant(backend: &'static str) {
    let node = Node::new("stays", backend);
    // Restores on both backends (see `UNDECODED`), which the shim swallows.
    node.ip6(UNDECODED);
    let out = node
        .loopguard_command("enforce", &["--output", "json"])
        .env("LGT_RESTORE_NOOP", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["compliant"], false);
    assert_eq!(
        report["ruleId"],
        "xccdf_org.ssgproject.content_rule_set_ipv6_loopback_traffic"
    );
    assert_eq!(report["version"], env!("CARGO_PKG_VERSION"));
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(report["hostname"], hostname.trim());
    let stamp: jiff::Timestamp = report["timestamp"].as_str().unwrap().parse().unwrap();
    assert!((jiff::Timestamp::now() - stamp).get_seconds().abs() < 60);
    let (code, _) = node.json("enforce", &[]);
    assert_eq!(code, 0, "compliant once the restore goes through");
}

#[test]
fn shell_completions_are_printed() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(BIN)
            .args(["completion", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(
            script.contains("loopguard")
                && script.contains("enforce")
                && script.contains("dry-run"),
            "{shell}"
        );
    }
    let out = Command::new(BIN)
        .args(["completion", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

/// Waits until `node`'s INPUT is `want`, polling with the machine's own xtables lock (not the
/// node's, which loopguard listens to: polling must not be what wakes it). Returns how long.
fn wait_for_input(node: &Node, want: &[&str], within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let input = node.chain("INPUT");
        if input == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "INPUT not {want:?} within {within:?}: {input:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The legacy watch with a resync far away (600 s): a rule replaced by a foreign rule of the
/// same size leaves the table's shape as it was, yet is repaired at once, because the writer
/// took the xtables lock, as every iptables binary does.
#[test]
fn legacy_watch_sees_a_same_size_replacement_through_the_lock() {
    // The premise: the replacement leaves the table's shape (size, entries, hooks) as it was.
    let scratch = TestNetns::new("shape");
    scratch.run(&[
        "ip6tables-legacy",
        "-A",
        "INPUT",
        "-i",
        "lo",
        "-j",
        "ACCEPT",
    ]);
    let shape = || {
        scratch
            .legacy_table(loopguard::rules::Family::Ipv6)
            .unwrap()
            .info
    };
    let before = shape();
    scratch.run(&[
        "ip6tables-legacy",
        "-R",
        "INPUT",
        "1",
        "-i",
        "eth0",
        "-j",
        "ACCEPT",
    ]);
    assert_eq!(shape(), before, "same shape");

    let node = Node::new("samesize", "legacy");
    let invoker = node.invoker();
    let mut watch = node.watch(&["--resync", "600"]);
    watch.wait_for("compliant", Duration::from_secs(10), |r| {
        r["compliant"] == true
    });
    let out = invoker.ip6tables(&["-R", "INPUT", "1", "-i", "eth0", "-j", "ACCEPT"]);
    assert!(out.status.success(), "{out:?}");
    let took = wait_for_input(
        &node,
        &["-A INPUT -i eth0 -j ACCEPT", ACCEPT_IN, DROP_SRC],
        Duration::from_secs(2),
    );
    eprintln!("same-size replacement repaired after {took:?}");
    let (clean, log) = watch.stop();
    assert!(clean, "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("repaired drift") && l.contains("after the legacy table change")),
        "repaired on the probe: {log}"
    );
}

/// The legacy watch with a resync far away: loopguard's OUTPUT rule deleted right after
/// loopguard's own repair wrote (by a program that does not share loopguard's lock file, so
/// only the probe or the read after the write can see it) is repaired within 2 s.
#[test]
fn legacy_watch_repairs_a_change_right_after_its_own_write() {
    let node = Node::new("rightafter", "legacy");
    let mut watch = node.watch(&["--resync", "600"]);
    watch.wait_for("compliant", Duration::from_secs(10), |r| {
        r["compliant"] == true
    });
    for round in 0..2 {
        node.ip6("-D INPUT -s ::1/128 -j DROP");
        // As soon as loopguard's repair lands, take OUTPUT's rule away.
        let started = Instant::now();
        while !node
            .ns
            .exec(&[
                "ip6tables-legacy",
                "-C",
                "INPUT",
                "-s",
                "::1/128",
                "-j",
                "DROP",
            ])
            .status
            .success()
        {
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "round {round}: DROP not repaired"
            );
        }
        node.ip6("-D OUTPUT -o lo -j ACCEPT");
        let started = Instant::now();
        while node.chain("OUTPUT") != vec![ACCEPT_OUT] {
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "round {round}: OUTPUT not repaired within 2 s; log:\n{}",
                watch.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // Two writes a round: past the fight window (3 writes in 10 s), so that back-off does
        // not hold the next round.
        std::thread::sleep(Duration::from_millis(10_500));
    }
    let (clean, log) = watch.stop();
    assert!(clean, "{log}");
}

/// CPU time (user and system, in clock ticks) `pid` has used so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the process runs");
    // The fields after the command name, which ends at the last ')': utime and stime are the
    // 14th and 15th of the whole line.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Two legacy watches on one host, in two network namespaces (or side by side during a rolling
/// update), share the host's xtables lock file. Each watch wakes on another program's use of the
/// lock and reads its table under it: if loopguard's own read showed as a use, each watch would
/// wake the other without end (with 20,000 rules, about half a core each). It does not: quiet
/// tables leave both watches idle, and a real change is still repaired.
#[test]
fn two_legacy_watches_sharing_the_lock_do_not_wake_each_other() {
    let nodes = [Node::new("pair-a", "legacy"), Node::new("pair-b", "legacy")];
    let lock = nodes[0].dir.path().join("xtables.lock");
    for node in &nodes {
        // Reads long enough (tens of milliseconds) for the two watches' passes to chain.
        let mut rules = String::from("*filter\n:FOREIGN - [0:0]\n");
        for n in 0..20_000u32 {
            rules.push_str(&format!(
                "-A FOREIGN -s 2001:db8:{:x}::{:x}/128 -j ACCEPT\n",
                n >> 16,
                n & 0xffff
            ));
        }
        rules.push_str("COMMIT\n");
        node.ns.restore("ip6tables", "legacy", &rules);
    }
    let mut watches: Vec<Watch> = nodes
        .iter()
        .map(|node| {
            let mut command =
                node.loopguard_command("watch", &["--output", "json", "--resync", "600"]);
            command.env("XTABLES_LOCKFILE", &lock);
            Watch::start(command)
        })
        .collect();
    for watch in &mut watches {
        watch.wait_for("compliant", Duration::from_secs(20), |r| {
            r["compliant"] == true
        });
    }
    // Past the first passes, nothing changes for 4 s.
    std::thread::sleep(Duration::from_secs(1));
    let before: Vec<u64> = watches.iter().map(|w| cpu_ticks(w.pid())).collect();
    std::thread::sleep(Duration::from_secs(4));
    let used: Vec<u64> = watches
        .iter()
        .zip(&before)
        .map(|(w, b)| cpu_ticks(w.pid()) - b)
        .collect();
    // A clock tick is 10 ms: 40 ticks in 4 s is a tenth of a core.
    assert!(
        used.iter().all(|&t| t < 40),
        "CPU ticks of the two idle watches over 4 s: {used:?}; logs:\n{}\n{}",
        watches[0].log(),
        watches[1].log()
    );
    // The lock still wakes a watch for another program's change (the same size: only the lock
    // shows it before the resync).
    let replace = format!(
        "XTABLES_LOCKFILE={} ip6tables-legacy -R INPUT 1 -i eth0 -j ACCEPT",
        lock.display()
    );
    let out = nodes[1].ns.exec(&["sh", "-c", &replace]);
    assert!(out.status.success(), "{out:?}");
    wait_for_input(
        &nodes[1],
        &["-A INPUT -i eth0 -j ACCEPT", ACCEPT_IN, DROP_SRC],
        Duration::from_secs(2),
    );
    for watch in watches {
        let (clean, log) = watch.stop();
        assert!(clean, "{log}");
    }
}

/// What the legacy watch cannot see cheaply: a same-size replacement by a writer that does not
/// take loopguard's xtables lock (another lock file, or a program writing the table itself). The
/// periodic re-check finds it: within the resync (here 2 s) and a second, never later.
#[test]
fn legacy_watch_finds_a_lockless_same_size_change_at_the_resync() {
    let node = Node::new("lockless", "legacy");
    let mut watch = node.watch(&["--resync", "2"]);
    watch.wait_for("compliant", Duration::from_secs(10), |r| {
        r["compliant"] == true
    });
    // Not the node's lock file: the machine's (as a container without /run/xtables.lock would).
    node.ip6("-R INPUT 1 -i eth0 -j ACCEPT");
    let took = wait_for_input(
        &node,
        &["-A INPUT -i eth0 -j ACCEPT", ACCEPT_IN, DROP_SRC],
        Duration::from_secs(3),
    );
    eprintln!("lockless same-size replacement repaired after {took:?}");
    let (clean, log) = watch.stop();
    assert!(clean, "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("repaired drift") && l.contains("after the periodic re-check")),
        "found by the resync: {log}"
    );
}

/// Waits (5 s at most) until another process holds the lock on `path`: `flock -n` then fails.
fn wait_until_held(path: &std::path::Path) {
    let started = Instant::now();
    loop {
        let free = Command::new("flock")
            .args(["-n", "-E", "99"])
            .arg(path)
            .arg("true")
            .status()
            .expect("flock");
        match free.code() {
            Some(99) => return,
            Some(0) => {}
            other => panic!("flock -n {}: {other:?}", path.display()),
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "nobody took {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
