//! Bad input and odd hosts, through `loopguard node enforce` in a network namespace of the test's,
//! with a host root of the test's: `nft` missing where the check must list an input-hook chain, a kernel without nf_tables (an `nft` that fails
//! as nft does there), ufw's configuration unreadable, a corrupt dpkg status file, a corrupt rpm
//! database. Each gives the rule a clear reason and message in the report, writes nothing for it,
//! and the command ends with a verdict, not a crash.
//!
//! Needs root.

#[path = "support/netns.rs"]
mod netns;

use netns::TestNetns;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

const BIN: &str = env!("CARGO_BIN_EXE_loopguard");

fn write(root: &Path, path: &str, bytes: &[u8]) {
    let path = root.join(path);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn dpkg(root: &Path, packages: &[&str]) {
    let text: String = packages
        .iter()
        .map(|p| format!("Package: {p}\nStatus: install ok installed\nVersion: 1.0\n\n"))
        .collect();
    write(root, "var/lib/dpkg/status", text.as_bytes());
}

/// A folder for PATH with every iptables command of this machine and, when `nft` is given, that
/// script as `nft`.
fn path_without_nft(dir: &Path, nft: Option<&str>) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let mut linked = 0;
    for entry in std::fs::read_dir("/usr/sbin").unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().to_string();
        if name.contains("tables") && name != "nft" {
            std::os::unix::fs::symlink(entry.path(), bin.join(&name)).unwrap();
            linked += 1;
        }
    }
    assert!(
        linked >= 6,
        "this machine's iptables commands ({linked} found)"
    );
    if let Some(script) = nft {
        let path = bin.join("nft");
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin
}

/// `loopguard node enforce` of every family in `ns`, with `root` as the host root and PATH
/// `path` (else the test's): exit code and report.
fn enforce(ns: &TestNetns, root: &Path, state: &Path, path: Option<&Path>) -> (i32, Value) {
    let path_env = path.map(|p| format!("PATH={}:/usr/bin:/bin", p.display()));
    let mut args = Vec::new();
    if let Some(env) = &path_env {
        args.extend_from_slice(&["env", env.as_str()]);
    }
    args.extend_from_slice(&[
        BIN,
        "node",
        "enforce",
        "--host-root",
        root.to_str().unwrap(),
        "--state-file",
        state.to_str().unwrap(),
        "--nftables",
        "enforce",
        "--ufw",
        "enforce",
        "--output",
        "json",
    ]);
    let out = ns.exec(&args);
    let code = out.status.code().expect("exited");
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no report ({e}), exit {code}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, report)
}

fn rule<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("no {id} in {report}"))
}

fn reason(report: &Value, id: &str) -> (String, String, String) {
    let r = rule(report, id);
    (
        r["verdict"].as_str().unwrap().to_string(),
        r["reason"].as_str().unwrap().to_string(),
        r["message"].as_str().unwrap().to_string(),
    )
}

/// The ruleset of the namespace, as nft lists it (the machine's own nft).
fn ruleset(ns: &TestNetns) -> String {
    ns.run(&["nft", "list", "ruleset"])
}

/// An input-hook chain that is not loopguard's (iptables-nft's INPUT, with a rule), so that the
/// check has to list it with `nft`.
fn iptables_nft_input(ns: &TestNetns) {
    ns.run(&[
        "ip6tables-nft",
        "-A",
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        "22",
        "-j",
        "ACCEPT",
    ]);
}

#[test]
fn without_nft_the_nftables_rule_says_so_and_nothing_is_written() {
    let ns = TestNetns::new("nonft");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    dpkg(&root, &["iptables", "nftables"]);
    iptables_nft_input(&ns);
    let before = ruleset(&ns);
    let bin = path_without_nft(dir.path(), None);
    let (code, report) = enforce(&ns, &root, &dir.path().join("state.json"), Some(&bin));
    let (verdict, why, message) = reason(&report, "set_nftables_loopback_traffic");
    assert_eq!(
        (verdict.as_str(), why.as_str()),
        ("Unknown", "NftablesUnavailable")
    );
    assert!(message.contains("nft not found in PATH"), "{message}");
    assert_eq!(code, 1, "not compliant: the rule could not be told");
    assert_eq!(ruleset(&ns), before, "something was written");
}

/// Where no input-hook chain is there to list, the check needs no `nft`: loopguard writes its
/// table over netlink and the rule passes.
#[test]
fn without_nft_and_nothing_to_list_the_table_is_written_over_netlink() {
    let ns = TestNetns::new("nonft2");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    dpkg(&root, &["iptables", "nftables"]);
    let bin = path_without_nft(dir.path(), None);
    let (code, report) = enforce(&ns, &root, &dir.path().join("state.json"), Some(&bin));
    let (verdict, _, message) = reason(&report, "set_nftables_loopback_traffic");
    assert_eq!(verdict, "Pass", "{message}");
    assert_eq!(code, 0, "{report}");
    assert!(
        ruleset(&ns).contains("table inet loopguard"),
        "{}",
        ruleset(&ns)
    );
}

#[test]
fn a_kernel_without_nf_tables_is_named() {
    let ns = TestNetns::new("nonftk");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    dpkg(&root, &["iptables", "nftables"]);
    iptables_nft_input(&ns);
    // What nft prints where the kernel has no nf_tables.
    let bin = path_without_nft(
        dir.path(),
        Some(
            "#!/bin/sh\necho 'Error: Could not process rule: Operation not supported' >&2\nexit 1\n",
        ),
    );
    let (code, report) = enforce(&ns, &root, &dir.path().join("state.json"), Some(&bin));
    let (verdict, why, message) = reason(&report, "set_nftables_loopback_traffic");
    assert_eq!(
        (verdict.as_str(), why.as_str()),
        ("Unknown", "NftablesUnavailable")
    );
    assert!(
        message.contains("this kernel has no nf_tables"),
        "{message}"
    );
    assert_eq!(code, 1);
    assert!(!dir.path().join("state.json").exists(), "nothing recorded");
}

#[test]
fn an_unreadable_ufw_conf_is_unknown_and_nothing_runs_ufw() {
    let ns = TestNetns::new("ufwconf");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    dpkg(&root, &["iptables", "ufw"]);
    // A folder where ufw.conf should be: read fails (EISDIR), as it would with bad permissions
    // for a process without CAP_DAC_OVERRIDE.
    std::fs::create_dir_all(root.join("etc/ufw/ufw.conf")).unwrap();
    let (code, report) = enforce(&ns, &root, &dir.path().join("state.json"), None);
    let (verdict, why, message) = reason(&report, "set_ufw_loopback_traffic");
    assert_eq!(
        (verdict.as_str(), why.as_str()),
        ("Unknown", "UfwConfigUnreadable")
    );
    assert!(message.contains("etc/ufw/ufw.conf"), "{message}");
    assert_eq!(code, 1);
    let saved = ns.run(&["iptables-save"]) + &ns.run(&["ip6tables-save"]);
    assert!(!saved.contains("ufw"), "{saved}");
}

#[test]
fn corrupt_package_databases_make_every_rule_unknown_and_nothing_is_written() {
    for (name, lay_out) in [
        (
            "dpkg status that is not text",
            (|root: &Path| write(root, "var/lib/dpkg/status", &[0xff, 0xfe, 0x00, 0x80]))
                as fn(&Path),
        ),
        ("rpm database that is not SQLite", |root: &Path| {
            write(
                root,
                "var/lib/rpm/rpmdb.sqlite",
                b"this is not an SQLite database at all, only text",
            )
        }),
    ] {
        let ns = TestNetns::new("corrupt");
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        lay_out(&root);
        let (code, report) = enforce(&ns, &root, &dir.path().join("state.json"), None);
        for id in [
            "set_nftables_loopback_traffic",
            "set_ufw_loopback_traffic",
            "firewalld_loopback_traffic_trusted",
        ] {
            let (verdict, why, message) = reason(&report, id);
            assert_eq!(
                (verdict.as_str(), why.as_str()),
                ("Unknown", "PackageDatabaseUnreadable"),
                "{name}: {id}"
            );
            assert!(
                message.contains("dpkg status") || message.contains("rpm database"),
                "{name}: {message}"
            );
        }
        assert_ne!(code, 0, "{name}: a node nobody can judge is not compliant");
        assert_eq!(ruleset(&ns).trim(), "", "{name}: something was written");
    }
}
