//! The ufw rule (`set_ufw_loopback_traffic`) with the real ufw: a Debian 12 host root with ufw
//! installed (hack/build-ufw-root.sh), seen by each command through an overlay of its own (the
//! cached root is never written) in a private mount namespace, in a network namespace of the
//! test's. loopguard runs that root's ufw through chroot, as the agent runs a node's. Checked with
//! ComplianceAsCode's own regexes on `ufw status verbose` (tests/fixtures/cac-ufw-check.sh):
//! - installed but inactive: fails with UfwInactive in every mode, and loopguard never enables
//!   ufw (`ufw status` stays inactive, no iptables rule written);
//! - active, with an admin's rules and one of the four already there: enforce adds exactly the
//!   three missing (the oracle passes, the admin's rules are unchanged, the state file records
//!   the three), a second enforce writes nothing, a rule deleted by hand is put back, cleanup
//!   deletes the three and leaves the admin's, the oracle fails again.
//!
//! Needs root.

#[path = "support/netns.rs"]
mod netns;

use netns::TestNetns;
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_loopguard");
const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The cached host root with ufw installed (built on first use).
fn ufw_root() -> PathBuf {
    let out = Command::new(format!("{REPO}/hack/build-ufw-root.sh"))
        .output()
        .expect("run hack/build-ufw-root.sh");
    assert!(
        out.status.success(),
        "hack/build-ufw-root.sh failed (it needs root and Debian's packages): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A node with ufw: its network namespace and its own copy (overlay) of the host root.
struct UfwNode {
    netns: TestNetns,
    lower: PathBuf,
    dir: tempfile::TempDir,
}

impl UfwNode {
    fn new(tag: &str) -> UfwNode {
        let dir = tempfile::tempdir().unwrap();
        for d in ["upper", "work", "root"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        UfwNode {
            netns: TestNetns::new(tag),
            lower: ufw_root(),
            dir,
        }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn state_file(&self) -> PathBuf {
        self.dir.path().join("state.json")
    }

    /// Runs `args` in the node's network namespace, in a private mount namespace where the node's
    /// root is mounted (its overlay, /proc, /sys, /dev, a /run of its own).
    fn exec(&self, args: &[&str]) -> Output {
        let d = self.dir.path();
        let mounts = format!(
            "set -e; r={root}; mount -t overlay overlay -o lowerdir={lower},upperdir={upper},workdir={work} \"$r\"; \
             mount --rbind /proc \"$r/proc\"; mount --rbind /sys \"$r/sys\"; mount --rbind /dev \"$r/dev\"; \
             mount -t tmpfs tmpfs \"$r/run\"; exec \"$@\"",
            root = self.root().display(),
            lower = self.lower.display(),
            upper = d.join("upper").display(),
            work = d.join("work").display(),
        );
        let mut command = vec!["unshare", "-m", "--propagation", "private", "sh", "-c"];
        command.push(&mounts);
        command.push("sh");
        command.extend_from_slice(args);
        self.netns.exec(&command)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The node's own ufw, as its admin runs it.
    fn ufw(&self, args: &[&str]) -> String {
        let root = self.root();
        let mut command = vec!["chroot", root.to_str().unwrap(), "/usr/sbin/ufw"];
        command.extend_from_slice(args);
        self.ok(&command)
    }

    /// ComplianceAsCode's check, run in the node's root.
    fn oracle_passes(&self) -> bool {
        let script = std::fs::read_to_string(format!("{REPO}/tests/fixtures/cac-ufw-check.sh"))
            .expect("the oracle script");
        let root = self.root();
        let out = self.exec(&["chroot", root.to_str().unwrap(), "bash", "-c", &script]);
        match out.status.code() {
            Some(0) => true,
            Some(1) => false,
            other => panic!(
                "the oracle did not run ({other:?}): {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    /// `loopguard node COMMAND` for the ufw rule alone, in `mode`: its JSON report.
    fn loopguard(&self, command: &str, mode: &str) -> Value {
        self.loopguard_with(&[], command, mode)
    }

    /// The same, run with only `capabilities` (as the chart's agent runs).
    fn loopguard_with(&self, capabilities: &[&str], command: &str, mode: &str) -> Value {
        let root = self.root();
        let state = self.state_file();
        let bounding: String = capabilities.iter().map(|c| format!(",+{c}")).collect();
        let bounding = format!("--bounding-set=-all{bounding}");
        let mut args = Vec::new();
        if !capabilities.is_empty() {
            args.extend_from_slice(&[
                "setpriv",
                bounding.as_str(),
                "--inh-caps=-all",
                "--no-new-privs",
                "--",
            ]);
        }
        args.extend_from_slice(&[
            BIN,
            "node",
            command,
            "--state-file",
            state.to_str().unwrap(),
            "--output",
            "json",
        ]);
        if command != "cleanup" {
            args.extend_from_slice(&[
                "--host-root",
                root.to_str().unwrap(),
                "--nftables",
                "ignore",
                "--ufw",
                mode,
            ]);
        } else {
            args.extend_from_slice(&["--host-root", root.to_str().unwrap()]);
        }
        let out = self.exec(&args);
        // check and enforce exit 1 when the node is not compliant; the report says why.
        assert!(
            matches!(out.status.code(), Some(0 | 1)),
            "loopguard node {command} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "no JSON from loopguard node {command} ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// What `ufw` keeps of the admin's and loopguard's rules: the `### tuple ###` lines.
    fn tuples(&self) -> Vec<String> {
        let root = self.root();
        let files = self.ok(&[
            "cat",
            root.join("etc/ufw/user.rules").to_str().unwrap(),
            root.join("etc/ufw/user6.rules").to_str().unwrap(),
        ]);
        files
            .lines()
            .filter(|l| l.starts_with("### tuple ###"))
            .map(String::from)
            .collect()
    }

    fn recorded(&self) -> Vec<String> {
        match std::fs::read_to_string(self.state_file()) {
            Ok(text) => {
                let state: Value = serde_json::from_str(&text).unwrap();
                state["ufwRules"]
                    .as_array()
                    .map(|a| a.iter().map(|r| r.as_str().unwrap().to_string()).collect())
                    .unwrap_or_default()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => panic!("state file: {e}"),
        }
    }
}

fn ufw_result(report: &Value) -> &Value {
    report["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .find(|r| r["id"] == "set_ufw_loopback_traffic")
        .expect("the ufw rule in the report")
}

fn changes(report: &Value) -> Vec<String> {
    report["familyChanges"]
        .as_array()
        .map(|a| a.iter().map(|c| c.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn an_inactive_ufw_fails_and_loopguard_never_enables_it() {
    let node = UfwNode::new("ufwoff");
    assert!(node.ufw(&["status"]).contains("Status: inactive"));
    assert!(!node.oracle_passes());
    for (command, mode) in [("check", "report"), ("enforce", "enforce")] {
        let report = node.loopguard(command, mode);
        let rule = ufw_result(&report);
        assert_eq!(
            (rule["verdict"].as_str(), rule["reason"].as_str()),
            (Some("Fail"), Some("UfwInactive")),
            "{command}: {rule}"
        );
        assert!(
            rule["message"]
                .as_str()
                .unwrap()
                .contains("apt-get purge ufw"),
            "{rule}"
        );
    }
    assert!(node.ufw(&["status"]).contains("Status: inactive"));
    let conf = node.ok(&[
        "cat",
        node.root().join("etc/ufw/ufw.conf").to_str().unwrap(),
    ]);
    assert!(conf.contains("ENABLED=no"), "{conf}");
    assert!(node.tuples().is_empty(), "{:?}", node.tuples());
    let rules = node.netns.run(&["iptables-save"]) + &node.netns.run(&["ip6tables-save"]);
    assert!(!rules.contains("-A "), "something wrote rules: {rules}");
    assert!(node.recorded().is_empty());
}

#[test]
fn enforce_adds_exactly_the_missing_ufw_rules_and_cleanup_deletes_exactly_those() {
    let node = UfwNode::new("ufwon");
    node.ufw(&["--force", "enable"]);
    node.ufw(&["allow", "22/tcp"]);
    node.ufw(&["deny", "from", "10.9.0.0/16"]);
    // The admin already has one of the four.
    node.ufw(&["deny", "in", "from", "127.0.0.0/8"]);
    let admins = node.tuples();
    assert!(!node.oracle_passes());

    let checked = node.loopguard("check", "report");
    assert_eq!(ufw_result(&checked)["verdict"], "Fail", "{checked}");

    let enforced = node.loopguard("enforce", "enforce");
    let rule = ufw_result(&enforced);
    assert_eq!(
        (rule["verdict"].as_str(), rule["owned"].as_bool()),
        (Some("Pass"), Some(true)),
        "{rule}"
    );
    assert!(node.oracle_passes(), "{}", node.ufw(&["status", "verbose"]));
    assert_eq!(
        node.recorded(),
        ["AllowInLo", "AllowOutLo", "DenyInV6"],
        "the admin's deny from 127.0.0.0/8 is not loopguard's"
    );
    let after = node.tuples();
    for line in &admins {
        assert!(
            after.contains(line),
            "the admin's {line} is gone: {after:?}"
        );
    }
    let relative = |list: &[String]| -> Vec<String> {
        list.iter()
            .filter(|l| admins.contains(l))
            .cloned()
            .collect()
    };
    assert_eq!(relative(&after), admins, "the admin's rules moved");

    // Nothing to do: nothing written.
    let again = node.loopguard("enforce", "enforce");
    assert_eq!(ufw_result(&again)["verdict"], "Pass");
    assert!(changes(&again).is_empty(), "{again}");
    assert_eq!(node.tuples(), after);

    // An admin deletes one by hand: put back.
    node.ufw(&["delete", "allow", "out", "on", "lo"]);
    assert!(!node.oracle_passes());
    let repaired = node.loopguard("enforce", "enforce");
    assert_eq!(ufw_result(&repaired)["verdict"], "Pass", "{repaired}");
    assert!(node.oracle_passes());

    // Cleanup deletes loopguard's three and nothing else.
    let cleaned = node.loopguard("cleanup", "enforce");
    assert!(
        ufw_result(&cleaned)["message"]
            .as_str()
            .unwrap()
            .contains("deleted the ufw rules loopguard added"),
        "{cleaned}"
    );
    assert_eq!(node.tuples(), admins);
    assert!(node.recorded().is_empty());
    assert!(!node.oracle_passes());
    assert!(node.ufw(&["status"]).contains("Status: active"));
}

#[test]
fn the_oracle_and_loopguard_agree_after_the_scanners_remediation() {
    // ComplianceAsCode's own remediation (bash/shared.sh), run by the admin: loopguard passes the
    // node and owns nothing.
    let node = UfwNode::new("ufwcac");
    node.ufw(&["--force", "enable"]);
    for rule in [
        &["allow", "in", "on", "lo"][..],
        &["allow", "out", "on", "lo"],
        &["deny", "in", "from", "127.0.0.0/8"],
        &["deny", "in", "from", "::1"],
    ] {
        node.ufw(rule);
    }
    assert!(node.oracle_passes());
    let report = node.loopguard("enforce", "enforce");
    let rule = ufw_result(&report);
    assert_eq!(
        (rule["verdict"].as_str(), rule["owned"].as_bool()),
        (Some("Pass"), Some(false)),
        "{rule}"
    );
    assert!(changes(&report).is_empty(), "{report}");
    assert!(node.recorded().is_empty());
}

/// What the chart's agent gets with `agent.ufw.enforce=true` (tests/chart.rs checks the rendering):
/// enough to run the host's ufw; without CAP_SYS_CHROOT the rule is Unknown, and says why.
#[test]
fn the_charts_capabilities_for_ufw_suffice_and_without_chroot_it_says_so() {
    let node = UfwNode::new("ufwcaps");
    node.ufw(&["--force", "enable"]);
    let without = node.loopguard_with(&["net_admin", "net_raw"], "enforce", "enforce");
    let rule = ufw_result(&without);
    assert_eq!(
        (rule["verdict"].as_str(), rule["reason"].as_str()),
        (Some("Unknown"), Some("UfwUnavailable")),
        "{rule}"
    );
    assert!(
        rule["message"].as_str().unwrap().contains("CAP_SYS_CHROOT"),
        "{rule}"
    );
    let with = node.loopguard_with(
        &["net_admin", "net_raw", "sys_chroot"],
        "enforce",
        "enforce",
    );
    assert_eq!(ufw_result(&with)["verdict"], "Pass", "{with}");
    assert!(node.oracle_passes());
}
