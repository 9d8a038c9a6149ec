//! loopguard installed from its own Helm chart on a test control plane, with hollow nodes that run
//! the agent binary built from this checkout.

#![allow(dead_code)]

use super::cluster::{Cluster, RealCluster, eventually};
use super::run;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use loopguard_hollow::{HollowOptions, ImageMapping};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const IMAGE: &str = "ghcr.io/loopguard/loopguard";
pub const BIN: &str = env!("CARGO_BIN_EXE_loopguard");
pub const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/loopguard");
pub const RELEASE: &str = "loopguard";
pub const AGENT_SELECTOR: &str = "app.kubernetes.io/component=agent";

/// Hollow-node options that run the chart's image as the locally built binary.
pub fn with_image(mut options: HollowOptions) -> HollowOptions {
    options.images.push(ImageMapping {
        repository: IMAGE.into(),
        binary: PathBuf::from(BIN),
    });
    options
}

/// Options for `count` hollow nodes labelled `label` that run the chart's image as the local
/// binary, each a Debian host with iptables installed (and neither nftables nor ufw), so the CIS
/// rule applies: the host's dpkg database is what the agent's read-only mount shows it.
pub fn iptables_hosts(
    cluster: &Cluster,
    tag: &str,
    count: usize,
    label: (&str, &str),
) -> HollowOptions {
    let mut options = with_image(cluster.hollow_options(tag, count));
    options.node_labels.insert(label.0.into(), label.1.into());
    for node in &options.nodes {
        install_packages(&options.node_root(node), &["iptables"]);
    }
    options
}

/// Writes a dpkg database into a node's root: `installed` packages are installed, others not.
pub fn install_packages(root: &Path, installed: &[&str]) {
    let dir = root.join("var/lib/dpkg");
    std::fs::create_dir_all(&dir).unwrap();
    let text: String = installed
        .iter()
        .map(|p| format!("Package: {p}\nStatus: install ok installed\nVersion: 1.0\n\n"))
        .collect();
    std::fs::write(dir.join("status"), text).unwrap();
}

/// `helm template` of the chart (CRDs included) with `sets`, applied server-side in `namespace`.
pub fn install(cluster: &Cluster, namespace: &str, sets: &[&str]) {
    let mut helm = Command::new(cluster.dir.join("bin/helm"));
    helm.args([
        "template",
        RELEASE,
        CHART,
        "--include-crds",
        "--no-hooks",
        "--namespace",
        namespace,
    ]);
    for set in sets {
        helm.args(["--set", set]);
    }
    let manifests = run(helm, None);
    let _ = cluster
        .kubectl()
        .args(["create", "namespace", namespace])
        .output();
    cluster.kubectl_ok(&["apply", "--server-side", "-f", "-"], Some(&manifests));
}

/// Waits until the agent DaemonSet has a Ready pod on every one of `nodes`.
pub async fn wait_agents_ready(client: &kube::Client, namespace: &str, nodes: &[String]) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let started = Instant::now();
    let told = std::sync::atomic::AtomicBool::new(false);
    let told = &told;
    let pods = &pods;
    eventually("agents ready", Duration::from_secs(180), || async {
        // Past half the time, say which nodes are waited for and what their Pods say.
        if started.elapsed() > Duration::from_secs(90)
            && !told.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            if let Ok(list) = pods
                .list(&ListParams::default().labels(AGENT_SELECTOR))
                .await
            {
                for pod in list.items.iter().filter(|p| !is_ready(p)) {
                    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
                    let status = pod
                        .status
                        .as_ref()
                        .map(|s| serde_json::to_string(&s.container_statuses).unwrap_or_default());
                    eprintln!("agent Pod not Ready after 90 s on {node:?}: {status:?}");
                }
            }
        }
        let list = pods
            .list(&ListParams::default().labels(AGENT_SELECTOR))
            .await
            .ok()?;
        let ready_on = |node: &String| {
            list.items.iter().any(|p| {
                p.metadata.deletion_timestamp.is_none()
                    && p.spec.as_ref().and_then(|s| s.node_name.as_ref()) == Some(node)
                    && is_ready(p)
            })
        };
        nodes.iter().all(ready_on).then_some(())
    })
    .await;
}

/// Whether a Pod's `Ready` condition is True.
pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The agent processes running on this machine (the hollow nodes' containers), by pid.
pub fn agent_pids() -> Vec<u32> {
    // The hollow kubelet starts the binary by its canonical path; the target directory may sit
    // behind a symlink (a cache on another disk), so compare canonical paths.
    use std::os::unix::ffi::OsStrExt;
    let canonical = |path: &[u8]| std::fs::canonicalize(std::ffi::OsStr::from_bytes(path));
    let bin = std::fs::canonicalize(BIN).expect("the loopguard binary");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args
            .first()
            .is_some_and(|a| *a == BIN.as_bytes() || canonical(a).is_ok_and(|p| p == bin))
            && args.get(1).is_some_and(|a| *a == b"agent")
        {
            pids.push(pid);
        }
    }
    pids
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// `ip6tables-<backend> -S CHAIN` rule lines in a node's namespace.
pub fn chain(node: &str, backend: &str, chain: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            node,
            &format!("ip6tables-{backend}"),
            "-w",
            "5",
            "-S",
            chain,
        ])
        .output()
        .unwrap();
    // An empty answer from a failed command would pass every "nothing left" check.
    assert!(
        out.status.success(),
        "ip6tables-{backend} -S {chain} in {node}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("-A"))
        .map(str::to_string)
        .collect()
}

/// `nft list ruleset` of a node (asserting that `nft` itself worked).
pub fn nft_ruleset(node: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", node, "nft", "list", "ruleset"])
        .output()
        .unwrap();
    assert!(out.status.success(), "nft list ruleset in {node}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether a node holds loopguard's nftables table.
pub fn has_loopguard_table(node: &str) -> bool {
    nft_ruleset(node)
        .lines()
        .any(|l| l == "table inet loopguard {")
}

/// `ip6tables-<backend>-save` of a node without comments and counters.
pub fn save(node: &str, backend: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", node, &format!("ip6tables-{backend}-save")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip6tables-{backend}-save in {node}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    super::netns::without_counters(&String::from_utf8_lossy(&out.stdout))
}

/// Runs a command inside a node's network namespace and insists that it succeeds.
pub fn in_node(node: &str, args: &[&str]) {
    let out = Command::new("ip")
        .args(["netns", "exec", node])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?} in {node}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes the loopback DROP rule by hand, as drift.
pub fn delete_drop_rule(node: &str, backend: &str) {
    in_node(
        node,
        &[
            &format!("ip6tables-{backend}"),
            "-D",
            "INPUT",
            "-s",
            "::1/128",
            "-j",
            "DROP",
        ],
    );
}

/// Deletes the DROP rule by hand and returns how long until it is back (polled every few ms).
pub fn delete_and_time_repair(node: &str, backend: &str, limit: Duration) -> Duration {
    delete_drop_rule(node, backend);
    let deleted = Instant::now();
    loop {
        if chain(node, backend, "INPUT")
            .iter()
            .any(|r| r == "-A INPUT -s ::1/128 -j DROP")
        {
            return deleted.elapsed();
        }
        assert!(
            deleted.elapsed() < limit,
            "{node}: rule not back within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The image archive hack/build-image.sh made (it builds it when missing).
pub fn image_archive() -> PathBuf {
    let out = run(
        Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/hack/build-image.sh")),
        None,
    );
    PathBuf::from(out.lines().last().expect("the archive path").trim())
}

/// `helm ARGS` against the cluster, insisting that it succeeds.
pub fn helm(cluster: &Cluster, args: &[&str]) -> Output {
    let out = Command::new(cluster.dir.join("bin/helm"))
        .args(args)
        .env("KUBECONFIG", cluster.kubeconfig())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Whether the seed's three rules are in a node's chains (`ip6tables-<backend> -S`).
pub fn has_seed_rules(node: &str, backend: &str) -> bool {
    let input = chain(node, backend, "INPUT");
    let output = chain(node, backend, "OUTPUT");
    super::watch::RULES.iter().all(|(c, spec)| {
        let line = format!("-A {c} {spec}");
        if *c == "INPUT" {
            input.contains(&line)
        } else {
            output.contains(&line)
        }
    })
}

/// `helm install --wait` of the chart on hack/real-cluster.sh's cluster, each agent on its own
/// node's host facts and the cluster's xtables lock, with more `--set` values.
pub fn install_on_real(real: &RealCluster, sets: &[&str]) {
    let values = real.chart_values();
    let mut args = vec![
        "install",
        RELEASE,
        CHART,
        "--namespace",
        "loopguard-system",
        "--create-namespace",
        "--wait",
        "--timeout",
        "5m",
        "--set",
        &values,
    ];
    for set in sets {
        args.extend(["--set", set]);
    }
    helm(&real.cluster, &args);
}

/// A real node's own IPv4 address (its `status.hostIP`, which the agent's metrics server binds by
/// default): the first global address in its network namespace.
pub fn node_ipv4(node: &str) -> String {
    let out = run(
        {
            let mut c = Command::new("ip");
            c.args(["-n", node, "-4", "-o", "addr", "show", "scope", "global"]);
            c
        },
        None,
    );
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap_or_else(|| panic!("no global IPv4 address in {node}: {out}"))
        .to_string()
}

/// loopguard's two INPUT rules, adjacent, as `ip6tables -S` prints them.
pub const PAIR: [&str; 2] = ["-A INPUT -i lo -j ACCEPT", "-A INPUT -s ::1/128 -j DROP"];

/// Reads the INPUT chain (nft backend) of each of `nodes` over and over, `pause` apart, counting
/// the reads and those without loopguard's adjacent pair: an upgrade or a rollback leaves none.
pub struct PairSampler {
    stop: Arc<AtomicBool>,
    /// Reads, and reads without the pair.
    counts: Arc<[AtomicUsize; 2]>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PairSampler {
    pub fn start(nodes: Vec<String>, pause: Duration) -> PairSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let counts: Arc<[AtomicUsize; 2]> = Arc::default();
        let (s, c) = (stop.clone(), counts.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                for node in &nodes {
                    let input = chain(node, "nft", "INPUT");
                    c[0].fetch_add(1, Ordering::SeqCst);
                    if !input.windows(2).any(|w| w == PAIR) {
                        c[1].fetch_add(1, Ordering::SeqCst);
                    }
                }
                std::thread::sleep(pause);
            }
        });
        PairSampler {
            stop,
            counts,
            thread: Some(thread),
        }
    }

    /// Stops reading: (reads, reads without the pair).
    pub fn finish(mut self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        (
            self.counts[0].load(Ordering::SeqCst),
            self.counts[1].load(Ordering::SeqCst),
        )
    }
}
