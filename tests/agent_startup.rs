//! The agent refuses to start when it could not do its job, and says why in its termination log
//! (what `kubectl describe pod` shows). These checks happen before it contacts the API server.

#[path = "support/netns.rs"]
mod netns;

use netns::TestNetns;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_loopguard");

/// Runs `loopguard agent` inside a test namespace; returns (exit code, termination log).
fn start_agent(ns: &TestNetns, dir: &std::path::Path, prefix: &[&str]) -> (Option<i32>, String) {
    let log = dir.join("termination-log");
    let state = dir.join("state.json");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .args(prefix)
        .arg(BIN)
        .args([
            "agent",
            "--node-name",
            "node-a",
            "--metrics-addr",
            "127.0.0.1:0",
            "--state-file",
            state.to_str().unwrap(),
            "--termination-log",
            log.to_str().unwrap(),
            "--host-root",
            dir.to_str().unwrap(),
        ]);
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        std::fs::read_to_string(&log).unwrap_or_default(),
    )
}

#[test]
fn an_unusable_state_file_is_fatal_and_explained() {
    let ns = TestNetns::new("agentstate");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("state.json"), "{not json").unwrap();
    let (code, log) = start_agent(&ns, dir.path(), &[]);
    assert_eq!(code, Some(2));
    assert!(log.contains("not a loopguard state file"), "{log}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("state.json")).unwrap(),
        "{not json",
        "kept for inspection"
    );
}

#[test]
fn missing_iptables_binaries_are_fatal_and_explained() {
    let ns = TestNetns::new("agentbin");
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty-path");
    std::fs::create_dir_all(&empty).unwrap();
    let path = format!("PATH={}", empty.display());
    let (code, log) = start_agent(&ns, dir.path(), &["env", &path]);
    assert_eq!(code, Some(2));
    assert!(
        log.contains("not found in PATH") && log.contains("install iptables"),
        "{log}"
    );
}

#[test]
fn missing_net_admin_is_fatal_and_explained() {
    let ns = TestNetns::new("agentcap");
    let dir = tempfile::tempdir().unwrap();
    // uid 0 without any capability: what a pod without NET_ADMIN gets.
    let drop_all = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"];
    let (code, log) = start_agent(&ns, dir.path(), &drop_all);
    assert_eq!(code, Some(2));
    assert!(
        log.contains("permission denied") && log.contains("CAP_NET_ADMIN"),
        "{log}"
    );
}
