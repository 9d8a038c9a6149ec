//! The nftables rule (`set_nftables_loopback_traffic`) on the real kernel, held against
//! ComplianceAsCode's own check: random rulesets of foreign tables (kube-proxy-like `ip`/`ip6`
//! tables, a firewalld-like `inet` table with anonymous sets, iptables-nft's tables, named sets,
//! counters, tables that already pass the check or half of it) are loaded into fresh network
//! namespaces, and
//! - `check`'s verdict for the rule equals the oracle's (`nft list ruleset | awk '/hook input/,/}/'`
//!   and its greps, run in the namespace);
//! - after `enforce --nftables enforce` the oracle passes, every foreign table is byte-identical
//!   (`nft -j list table`, handles and counters included), and a node that passed before got
//!   nothing written;
//! - a second enforce writes nothing; cleanup leaves `nft -j list ruleset` as it was.
//!
//! `LOOPGUARD_DIFF_CASES` cases (100 by default), seed from `LOOPGUARD_DIFF_SEED` or the clock.
//! Needs root.

#[path = "support/chains.rs"]
mod chains;
#[path = "support/netns.rs"]
mod netns;

use netns::TestNetns;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_loopguard");

/// One foreign table, as `nft -f` input, with its family and name.
#[derive(Clone, Debug)]
struct Foreign {
    family: &'static str,
    name: String,
    script: String,
}

fn kube_proxy(family: &'static str, port: u16) -> Foreign {
    Foreign {
        family,
        name: "kube-proxy".into(),
        script: format!(
            "table {family} kube-proxy {{\n\tchain services {{\n\t\ttcp dport {port} counter accept\n\t}}\n\
             \tchain filter-input {{\n\t\ttype filter hook input priority -110; policy accept;\n\t\tct state new jump services\n\t}}\n}}\n"
        ),
    }
}

fn firewalld_like(port: u16) -> Foreign {
    Foreign {
        family: "inet",
        name: "firewalld".into(),
        script: format!(
            "table inet firewalld {{\n\tchain filter_INPUT {{\n\t\ttype filter hook input priority 10; policy accept;\n\
             \t\tct state {{ established, related }} accept\n\t\tiifname \"lo\" accept\n\t\ttcp dport {port} accept\n\t}}\n}}\n"
        ),
    }
}

/// An admin's own table: the whole rule (`full`), or only its IPv4 half.
fn admin_filter(full: bool) -> Foreign {
    let v6 = if full {
        "\t\tip6 saddr ::1 counter drop\n"
    } else {
        ""
    };
    Foreign {
        family: "inet",
        name: "filter".into(),
        script: format!(
            "table inet filter {{\n\tchain input {{\n\t\ttype filter hook input priority 0; policy accept;\n\
             \t\tiif \"lo\" accept\n\t\tip saddr 127.0.0.0/8 counter drop\n{v6}\t}}\n}}\n"
        ),
    }
}

fn blocklist(n: u8) -> Foreign {
    Foreign {
        family: "inet",
        name: "blocklist".into(),
        script: format!(
            "table inet blocklist {{\n\tset bad {{\n\t\ttype ipv4_addr\n\t\telements = {{ 192.0.2.{n} }}\n\t}}\n\
             \tchain input {{\n\t\ttype filter hook input priority 5; policy accept;\n\t\tip saddr @bad counter drop\n\t}}\n\
             \tchain output {{\n\t\ttype filter hook output priority 0; policy accept;\n\t\toif \"lo\" accept\n\t}}\n}}\n"
        ),
    }
}

/// A node: foreign tables, iptables-nft rules (written with `ip6tables-nft-restore`), IPv6 on/off.
#[derive(Clone, Debug)]
struct Case {
    tables: Vec<Foreign>,
    iptables_nft: Vec<String>,
    ipv6: bool,
}

fn case() -> impl Strategy<Value = Case> {
    let port = 1u16..=65535;
    (
        prop::option::of(port.clone()),
        prop::option::of(port.clone()),
        prop::option::of(port.clone()),
        prop::option::of(any::<bool>()),
        prop::option::of(any::<u8>()),
        prop::collection::vec(
            prop_oneof![
                port.prop_map(|p| format!("-A INPUT -p tcp -m tcp --dport {p} -j ACCEPT")),
                Just("-A INPUT -i lo -j ACCEPT".to_string()),
                Just("-A INPUT -s ::1/128 -j DROP".to_string()),
                Just("-A OUTPUT -o lo -j ACCEPT".to_string()),
            ],
            0..4,
        ),
        prop::bool::weighted(0.8),
    )
        .prop_map(|(kp4, kp6, fw, admin, block, iptables_nft, ipv6)| {
            let mut tables = Vec::new();
            tables.extend(kp4.map(|p| kube_proxy("ip", p)));
            tables.extend(kp6.map(|p| kube_proxy("ip6", p)));
            tables.extend(fw.map(firewalld_like));
            tables.extend(admin.map(admin_filter));
            tables.extend(block.map(blocklist));
            Case {
                tables,
                iptables_nft,
                ipv6,
            }
        })
}

/// ComplianceAsCode's check for `set_nftables_loopback_traffic`, as its SCE runs it.
fn oracle_passes(ns: &TestNetns) -> bool {
    let script = r#"
out=$(nft list ruleset | awk '/hook input/,/}/')
echo "$out" | grep -q 'iif "lo" accept' || exit 1
echo "$out" | grep -q 'ip saddr' || exit 1
if [ "$(sysctl -n net.ipv6.conf.all.disable_ipv6)" -eq 0 ]; then
  echo "$out" | grep -q 'ip6 saddr' || exit 1
fi
exit 0
"#;
    let out = ns.exec(&["bash", "-c", script]);
    out.status.success()
}

/// `nft -j list table FAMILY NAME` without the metainfo line: the table byte for byte.
fn table_json(ns: &TestNetns, family: &str, name: &str) -> String {
    strip_metainfo(&ns.run(&["nft", "-j", "list", "table", family, name]))
}

fn ruleset_json(ns: &TestNetns) -> String {
    strip_metainfo(&ns.run(&["nft", "-j", "list", "ruleset"]))
}

fn strip_metainfo(json: &str) -> String {
    let mut doc: Value = serde_json::from_str(json).expect("nft -j prints JSON");
    if let Some(items) = doc["nftables"].as_array_mut() {
        items.retain(|i| i.get("metainfo").is_none());
    }
    doc.to_string()
}

/// The tables the namespace holds: (family, name).
fn tables(ns: &TestNetns) -> Vec<(String, String)> {
    ns.run(&["nft", "list", "tables"])
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace().skip(1);
            Some((words.next()?.to_string(), words.next()?.to_string()))
        })
        .collect()
}

/// A host root where the nftables rule applies (iptables and nftables installed, no firewalld).
fn host_root(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("host");
    std::fs::create_dir_all(root.join("var/lib/dpkg")).unwrap();
    std::fs::write(
        root.join("var/lib/dpkg/status"),
        "Package: iptables\nStatus: install ok installed\n\nPackage: nftables\nStatus: install ok installed\n",
    )
    .unwrap();
    root
}

/// Runs `loopguard node CMD --output json` in `ns`; returns (exit code, report).
fn loopguard(ns: &TestNetns, dir: &Path, cmd: &str, extra: &[&str]) -> (i32, Value) {
    let mut c = Command::new(BIN);
    c.args(["node", cmd, "--netns", &ns.name, "--output", "json"])
        .arg("--state-file")
        .arg(dir.join("state.json"));
    if cmd != "cleanup" {
        c.arg("--host-root").arg(host_root(dir));
    }
    let out = c.args(extra).output().expect("run loopguard");
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{cmd}: not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

fn nft_rule(report: &Value) -> &Value {
    report["rules"]
        .as_array()
        .and_then(|rules| {
            rules
                .iter()
                .find(|r| r["id"] == "set_nftables_loopback_traffic")
        })
        .unwrap_or_else(|| panic!("no nftables rule in {report}"))
}

fn nft_changes(report: &Value) -> usize {
    report["familyChanges"].as_array().map_or(0, Vec::len)
}

fn one_case(c: &Case) -> Result<(), TestCaseError> {
    let ns = TestNetns::new("nftd");
    let dir = tempfile::tempdir().unwrap();
    if !c.ipv6 {
        ns.set_sysctl("net.ipv6.conf.all.disable_ipv6", "1");
    }
    for table in &c.tables {
        let path = dir
            .path()
            .join(format!("{}-{}.nft", table.family, table.name));
        std::fs::write(&path, &table.script).unwrap();
        ns.run(&["nft", "-f", path.to_str().unwrap()]);
    }
    if !c.iptables_nft.is_empty() {
        ns.restore(
            "ip6tables",
            "nft",
            &format!("*filter\n{}\nCOMMIT\n", c.iptables_nft.join("\n")),
        );
    }
    let foreign: Vec<(String, String)> = tables(&ns);
    let before: Vec<String> = foreign.iter().map(|(f, n)| table_json(&ns, f, n)).collect();
    let ruleset_before = ruleset_json(&ns);
    let passed = oracle_passes(&ns);

    let (code, report) = loopguard(&ns, dir.path(), "check", &["--nftables", "report"]);
    let verdict = nft_rule(&report)["verdict"].clone();
    prop_assert_eq!(
        verdict == "Pass",
        passed,
        "check says {} where ComplianceAsCode's check says {}: {}",
        verdict,
        passed,
        report
    );
    prop_assert_eq!(code == 0, passed, "check's exit code: {}", report);

    let (code, report) = loopguard(&ns, dir.path(), "enforce", &["--nftables", "enforce"]);
    prop_assert_eq!(code, 0, "enforce: {}", report);
    prop_assert!(
        oracle_passes(&ns),
        "the check fails after enforce: {}",
        report
    );
    prop_assert_eq!(
        nft_changes(&report),
        usize::from(!passed),
        "a table only where the check failed: {}",
        report
    );
    for ((family, name), json) in foreign.iter().zip(&before) {
        prop_assert_eq!(
            &table_json(&ns, family, name),
            json,
            "table {} {} changed",
            family,
            name
        );
    }
    let (code, again) = loopguard(&ns, dir.path(), "enforce", &["--nftables", "enforce"]);
    prop_assert_eq!(code, 0);
    prop_assert_eq!(
        nft_changes(&again),
        0,
        "a second enforce writes nothing: {}",
        again
    );

    let (code, report) = loopguard(&ns, dir.path(), "cleanup", &[]);
    prop_assert_eq!(code, 0, "cleanup: {}", report);
    prop_assert_eq!(
        ruleset_json(&ns),
        ruleset_before,
        "cleanup gives back the ruleset it found"
    );
    Ok(())
}

#[test]
fn nftables_rule_matches_complianceascode_and_touches_no_foreign_table() {
    let (mut runner, seed) = chains::runner("", 100);
    if let Err(e) = runner.run(&case(), |c| one_case(&c)) {
        panic!("{e}\nreplay with LOOPGUARD_DIFF_SEED={seed}");
    }
}

/// A table named like loopguard's that loopguard did not write: reported, never touched, not
/// even by cleanup.
#[test]
fn a_foreign_table_named_loopguard_is_never_touched() {
    let ns = TestNetns::new("nftforeign");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("theirs.nft");
    std::fs::write(
        &path,
        "table inet loopguard {\n\tchain input {\n\t\ttype filter hook input priority 0; policy accept;\n\t\ttcp dport 22 accept\n\t}\n}\n",
    )
    .unwrap();
    ns.run(&["nft", "-f", path.to_str().unwrap()]);
    let before = ruleset_json(&ns);
    let (code, report) = loopguard(&ns, dir.path(), "enforce", &["--nftables", "enforce"]);
    assert_eq!(code, 1, "not compliant: {report}");
    let rule = nft_rule(&report);
    assert_eq!(rule["reason"], "ForeignTable", "{report}");
    assert!(
        rule["message"]
            .as_str()
            .unwrap()
            .contains("loopguard did not write"),
        "{report}"
    );
    assert_eq!(ruleset_json(&ns), before, "nothing written");
    let (code, _) = loopguard(&ns, dir.path(), "cleanup", &[]);
    assert_eq!(code, 0);
    assert_eq!(ruleset_json(&ns), before, "cleanup deleted nothing");
}

/// `nft flush ruleset` (what Debian's nftables.service does on reload) and a deleted table come
/// back on the nftables event path, with a resync far away: on a node whose iptables backend is
/// nft, and on one whose backend is legacy (loopguard's table is nftables all the same).
#[test]
fn a_flushed_ruleset_gets_loopguards_table_back_on_the_event_path() {
    flushed_ruleset_comes_back("nft");
    flushed_ruleset_comes_back("legacy");
}

fn flushed_ruleset_comes_back(backend: &str) {
    let ns = TestNetns::new("nftflush");
    let dir = tempfile::tempdir().unwrap();
    let mut watch = Command::new(BIN);
    watch
        .args(["node", "watch", "--netns", &ns.name, "--output", "json"])
        .args([
            "--nftables",
            "enforce",
            "--resync",
            "600",
            "--backend",
            backend,
        ])
        .arg("--state-file")
        .arg(dir.path().join("state.json"))
        .arg("--host-root")
        .arg(host_root(dir.path()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = Watcher(Some(watch.spawn().unwrap()));
    let has_table = || {
        tables(&ns)
            .iter()
            .any(|(f, n)| f == "inet" && n == "loopguard")
    };
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        let started = std::time::Instant::now();
        while !cond() {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(5),
                "{what} within 5 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        started.elapsed()
    };
    wait("the table written at start", &has_table);
    let has_drop = || {
        has_table()
            && ns
                .run(&["nft", "list", "table", "inet", "loopguard"])
                .contains("ip6 saddr ::1 drop")
    };
    for how in [
        &["flush", "ruleset"][..],
        &["delete", "table", "inet", "loopguard"][..],
        &["delete", "rule"][..],
    ] {
        if how == ["delete", "rule"] {
            // Pauses between the changes: loopguard must see no fight.
            std::thread::sleep(std::time::Duration::from_millis(500));
            ns.delete_loopguard_rule(&ns.loopguard_rule_handle("ip6 saddr ::1 drop"));
        } else {
            let mut args = vec!["nft"];
            args.extend(how);
            ns.run(&args);
        }
        let took = wait("the table back", &has_drop);
        eprintln!(
            "{backend}: after nft {}: table back in {took:?}",
            how.join(" ")
        );
        assert!(oracle_passes(&ns));
    }
    let out = child.stop();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    // On legacy the iptables probe may look first (a pass of loopguard's own runs the legacy
    // binaries, whose use of the xtables lock wakes it once): either way not the resync.
    let quick = |l: &&str| {
        l.contains("after the nft event")
            || (backend == "legacy" && l.contains("after the legacy table change"))
    };
    assert!(
        log.lines()
            .filter(|l| l.contains("repaired drift"))
            .filter(quick)
            .count()
            >= 3,
        "the three repairs came from nftables events: {log}"
    );
}

/// A `loopguard node watch` process of a test: stopped with SIGTERM by [`Watcher::stop`], killed
/// if the test fails before that (a failing assertion must not leave it running).
struct Watcher(Option<std::process::Child>);

impl Watcher {
    fn stop(mut self) -> std::process::Output {
        let child = self.0.take().expect("running");
        // SAFETY: a signal to the child this test started and has not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait_with_output().unwrap()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A drift repair puts back loopguard's table only where it holds loopguard's rules and nothing
/// else: a foreign rule added to loopguard's chain (in the transaction that deletes one of
/// loopguard's rules, or just before it) makes the table not loopguard's, and loopguard touches
/// nothing in it.
#[test]
fn a_foreign_rule_in_loopguards_table_stops_its_repair() {
    for together in [true, false] {
        let ns = TestNetns::new("nftnofast");
        let dir = tempfile::tempdir().unwrap();
        let mut watch = Command::new(BIN);
        watch
            .args(["node", "watch", "--netns", &ns.name, "--output", "json"])
            .args(["--nftables", "enforce", "--resync", "600"])
            .arg("--state-file")
            .arg(dir.path().join("state.json"))
            .arg("--host-root")
            .arg(host_root(dir.path()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let child = Watcher(Some(watch.spawn().unwrap()));
        let listing = || ns.run(&["nft", "list", "table", "inet", "loopguard"]);
        let started = std::time::Instant::now();
        while !tables(&ns)
            .iter()
            .any(|(f, n)| f == "inet" && n == "loopguard")
        {
            assert!(started.elapsed() < std::time::Duration::from_secs(5));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let handle = ns.loopguard_rule_handle("ip6 saddr ::1 drop");
        let add = "add rule inet loopguard input tcp dport 2222 accept\n";
        let delete = format!("delete rule inet loopguard input handle {handle}\n");
        let script = dir.path().join("change.nft");
        if together {
            std::fs::write(&script, format!("{add}{delete}")).unwrap();
            ns.run(&["nft", "-f", script.to_str().unwrap()]);
        } else {
            std::fs::write(&script, add).unwrap();
            ns.run(&["nft", "-f", script.to_str().unwrap()]);
            ns.delete_loopguard_rule(&handle);
        }
        // What the admin left, as `nft` lists it; loopguard must keep all of it, the foreign
        // rule first, and not put its deleted rule back into a table that is not its own now.
        let expected = "table inet loopguard {\n\tchain input {\n\t\ttype filter hook input priority mangle; policy accept;\n\t\tiif \"lo\" accept\n\t\tip saddr 127.0.0.0/8 drop\n\t\ttcp dport 2222 accept\n\t}\n}\n";
        std::thread::sleep(std::time::Duration::from_millis(1500));
        assert_eq!(
            listing(),
            expected,
            "loopguard touched a table holding a foreign rule (together: {together})"
        );
        let out = child.stop();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{log}");
        assert!(!log.contains("repaired drift"), "{log}");
    }
}

/// loopguard writes its table over netlink; `nft -f` of the same table must give the same table,
/// both ways: the listing ComplianceAsCode greps and the JSON are identical, and a table `nft`
/// wrote is read back as loopguard's own (cleanup deletes it), so the two never disagree.
#[test]
fn netlink_and_nft_write_the_same_table() {
    let ours = TestNetns::new("nftsame1");
    let dir = tempfile::tempdir().unwrap();
    let (code, report) = loopguard(&ours, dir.path(), "enforce", &["--nftables", "enforce"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(nft_changes(&report), 1, "{report}");

    let by_nft = TestNetns::new("nftsame2");
    let script = dir.path().join("create.nft");
    std::fs::write(&script, loopguard::rules::nft::create_script()).unwrap();
    by_nft.run(&["nft", "-f", script.to_str().unwrap()]);

    let listing = |ns: &TestNetns| ns.run(&["nft", "list", "table", "inet", "loopguard"]);
    assert_eq!(listing(&ours), listing(&by_nft));
    assert_eq!(
        listing(&ours),
        "table inet loopguard {\n\tchain input {\n\t\ttype filter hook input priority mangle; policy accept;\n\t\tiif \"lo\" accept\n\t\tip saddr 127.0.0.0/8 drop\n\t\tip6 saddr ::1 drop\n\t}\n}\n"
    );
    let debug = |ns: &TestNetns| {
        // The expressions as the kernel holds them, rule handles left out.
        ns.run(&[
            "nft",
            "--debug=netlink",
            "list",
            "table",
            "inet",
            "loopguard",
        ])
        .lines()
        .filter(|l| l.starts_with("  ["))
        .collect::<Vec<_>>()
        .join("\n")
    };
    assert_eq!(debug(&ours), debug(&by_nft));
    // The handles are the kernel's numbering (`nft -f` of the script adds and deletes the table
    // before writing it, so its table has handle 2): everything else is the same.
    let without_handles = |json: String| {
        let mut doc: Value = serde_json::from_str(&json).unwrap();
        for item in doc["nftables"].as_array_mut().unwrap() {
            for object in item.as_object_mut().unwrap().values_mut() {
                object.as_object_mut().unwrap().remove("handle");
            }
        }
        doc.to_string()
    };
    assert_eq!(
        without_handles(table_json(&ours, "inet", "loopguard")),
        without_handles(table_json(&by_nft, "inet", "loopguard"))
    );

    // Replace loopguard's table with the one nft writes: still loopguard's (nothing to write),
    // and cleanup deletes it.
    ours.run(&["nft", "-f", script.to_str().unwrap()]);
    let (code, again) = loopguard(&ours, dir.path(), "enforce", &["--nftables", "enforce"]);
    assert_eq!(code, 0, "{again}");
    assert_eq!(
        nft_changes(&again),
        0,
        "nft's table is loopguard's: {again}"
    );
    assert_eq!(nft_rule(&again)["owned"], true, "{again}");
    let (code, report) = loopguard(&ours, dir.path(), "cleanup", &[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(tables(&ours), Vec::<(String, String)>::new(), "{report}");
}

/// Runs `f` in a thread that entered `ns` (loopguard's netlink calls act on the thread's
/// namespace).
fn in_netns<T: Send + 'static>(ns: &TestNetns, f: impl FnOnce() -> T + Send + 'static) -> T {
    let name = ns.name.clone();
    std::thread::spawn(move || {
        loopguard::node::netns::enter(&name).expect("enter the namespace");
        f()
    })
    .join()
    .expect("netlink thread")
}

/// loopguard's write is bound to the ruleset generation it read its table in. A rule someone
/// adds to loopguard's drifted table between that read and the write fails the write: nothing is
/// written, the foreign rule stays (a repair that flushed the chain would have taken it), and the
/// next read names the table as not loopguard's. Read again once the foreign rule is gone, the
/// write goes through.
#[test]
fn a_change_between_reading_and_writing_the_table_fails_the_write() {
    use loopguard::node::nftables::{self, Written};
    use loopguard::rules::nft::OwnTable;

    let ns = TestNetns::new("nftstale");
    let dir = tempfile::tempdir().unwrap();
    let (code, report) = loopguard(&ns, dir.path(), "enforce", &["--nftables", "enforce"]);
    assert_eq!(code, 0, "{report}");
    let as_written = ns.run(&["nft", "list", "table", "inet", "loopguard"]);
    ns.delete_loopguard_rule(&ns.loopguard_rule_handle("ip6 saddr ::1 drop"));

    let (table, generation) = in_netns(&ns, || nftables::own_table_at().unwrap());
    assert_eq!(table, OwnTable::Partial);
    // Someone else's rule, added after loopguard read its table.
    ns.run(&[
        "nft",
        "add",
        "rule",
        "inet",
        "loopguard",
        "input",
        "tcp",
        "dport",
        "22",
        "accept",
    ]);
    let foreign = ns.run(&["nft", "list", "table", "inet", "loopguard"]);
    assert!(foreign.contains("tcp dport 22 accept"), "{foreign}");

    let written = in_netns(&ns, move || nftables::create(generation).unwrap());
    assert_eq!(written, Written::Stale);
    assert_eq!(
        ns.run(&["nft", "list", "table", "inet", "loopguard"]),
        foreign,
        "a stale write changes nothing"
    );
    let deleted = in_netns(&ns, move || nftables::delete(generation).unwrap());
    assert_eq!(deleted, Written::Stale, "a stale delete deletes nothing");
    assert_eq!(
        ns.run(&["nft", "list", "table", "inet", "loopguard"]),
        foreign
    );
    let (table, _) = in_netns(&ns, || nftables::own_table_at().unwrap());
    assert!(matches!(table, OwnTable::Other(_)), "{table:?}");

    // The foreign rule gone, the table read again is loopguard's, and the write goes through.
    ns.delete_loopguard_rule(&ns.loopguard_rule_handle("tcp dport 22 accept"));
    let (table, generation) = in_netns(&ns, || nftables::own_table_at().unwrap());
    assert_eq!(table, OwnTable::Partial);
    let written = in_netns(&ns, move || nftables::create(generation).unwrap());
    assert_eq!(written, Written::Done);
    assert_eq!(
        ns.run(&["nft", "list", "table", "inet", "loopguard"]),
        as_written
    );
}
