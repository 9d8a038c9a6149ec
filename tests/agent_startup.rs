//! A broken node says so instead of crash-looping where nobody looks: with a local problem it
//! cannot fix (a corrupt state file, no iptables binaries, no NET_ADMIN) the agent stays up,
//! writes nothing to the firewall, and reports the problem with what to do (in its node state,
//! and here on `/readyz` and in its log), and it is still alive (`/healthz`).
//!
//! The agent runs in a test network namespace with a policy remembered from an earlier run, so
//! it enforces before it reaches any API server; the kubeconfig points nowhere.

#[path = "support/netns.rs"]
mod netns;

use netns::TestNetns;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_loopguard");
const PORT: u16 = 19742;

/// What the agent showed while it ran for a few seconds.
struct Seen {
    still_running: bool,
    readyz: String,
    healthz: String,
    log: String,
}

/// Runs `loopguard agent` in `ns` (after `prefix`, for example `setpriv ...`), with a remembered
/// policy, for a few seconds; reads its endpoints from inside the namespace, then stops it.
fn run_agent(ns: &TestNetns, dir: &std::path::Path, prefix: &[&str]) -> Seen {
    let state = dir.join("state.json");
    std::fs::write(
        dir.join("policy.json"),
        r#"{"name":"baseline","generation":1,"spec":{"applicability":"Always"}}"#,
    )
    .unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1', insecure-skip-tls-verify: true}}]\n\
         users: [{name: u, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n",
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(prefix)
        .arg(BIN)
        .args(["agent", "--node-name", "node-a", "--log-format", "plain"])
        .arg(format!("--metrics-addr=127.0.0.1:{PORT}"))
        .arg(format!("--state-file={}", state.display()))
        .arg(format!("--host-root={}", dir.display()))
        .arg(format!(
            "--termination-log={}",
            dir.join("termination-log").display()
        ))
        .args(["--wait", "1", "--resync", "1"])
        .env("KUBECONFIG", &kubeconfig)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let http = |path: &str| -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.name, "curl", "-si", "--max-time", "2"])
            .arg(format!("http://127.0.0.1:{PORT}{path}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Wait for the endpoints, then give the agent a few rounds.
    let started = Instant::now();
    while !http("/healthz").contains("200") && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    let seen = Seen {
        still_running: child.try_wait().unwrap().is_none(),
        readyz: http("/readyz"),
        healthz: http("/healthz"),
        log: String::new(),
    };
    let _ = child.kill();
    let _ = child.wait();
    Seen {
        log: std::fs::read_to_string(dir.join("agent.log")).unwrap(),
        ..seen
    }
}

fn assert_reported(seen: &Seen, what: &[&str]) {
    assert!(seen.still_running, "the agent exited:\n{}", seen.log);
    assert!(seen.healthz.contains("200 OK"), "alive: {}", seen.healthz);
    assert!(seen.readyz.contains("503"), "not ready: {}", seen.readyz);
    for needle in what {
        assert!(
            seen.readyz.contains(needle) && seen.log.contains(needle),
            "{needle:?} not reported:\n/readyz: {}\nlog:\n{}",
            seen.readyz,
            seen.log
        );
    }
}

fn input_rules(ns: &TestNetns) -> Vec<String> {
    ns.ip6tables("nft", "-S INPUT")
        .lines()
        .filter(|l| l.starts_with("-A"))
        .map(str::to_string)
        .collect()
}

#[test]
fn an_unusable_state_file_is_reported_and_nothing_is_written() {
    let ns = TestNetns::new("agentstate");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("state.json"), "{not json").unwrap();
    let seen = run_agent(&ns, dir.path(), &[]);
    assert_reported(
        &seen,
        &["not a loopguard state file", "move the file aside"],
    );
    assert!(input_rules(&ns).is_empty(), "nothing written");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("state.json")).unwrap(),
        "{not json",
        "kept for inspection"
    );
}

#[test]
fn missing_iptables_binaries_are_reported() {
    let ns = TestNetns::new("agentbin");
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty-path");
    std::fs::create_dir_all(&empty).unwrap();
    let path = format!("PATH={}", empty.display());
    let seen = run_agent(&ns, dir.path(), &["env", &path]);
    assert_reported(&seen, &["not found in PATH", "install iptables"]);
}

#[test]
fn missing_net_admin_is_reported() {
    let ns = TestNetns::new("agentcap");
    let dir = tempfile::tempdir().unwrap();
    // uid 0 without any capability: what a pod without NET_ADMIN gets.
    let drop_all = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"];
    let seen = run_agent(&ns, dir.path(), &drop_all);
    assert_reported(&seen, &["permission denied", "CAP_NET_ADMIN"]);
    assert!(input_rules(&ns).is_empty());
}

#[test]
fn a_healthy_node_is_ready_before_the_api_server_answers() {
    let ns = TestNetns::new("agentok");
    let dir = tempfile::tempdir().unwrap();
    let seen = run_agent(&ns, dir.path(), &[]);
    assert!(seen.still_running, "{}", seen.log);
    assert!(seen.healthz.contains("200 OK"), "{}", seen.healthz);
    // It enforces the remembered policy at once, API server or not.
    assert_eq!(
        input_rules(&ns),
        vec!["-A INPUT -i lo -j ACCEPT", "-A INPUT -s ::1/128 -j DROP"]
    );
    assert!(
        seen.readyz.contains("503") && seen.readyz.contains("caches not synced"),
        "ready only once it has heard from the cluster: {}",
        seen.readyz
    );
}
