//! A real node: the loopguard image built from the Dockerfile (hack/build-image.sh), run by a real
//! kubelet with containerd and runc (hack/real-node.sh), installed, upgraded and uninstalled with
//! helm. The real node has no pod network, so the controller (and the uninstall hooks) run on a
//! hollow node beside it; the agent runs on both.

mod support;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use loopguard::api::{LoopbackNodeState, LoopbackPolicy};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::cluster::{Cluster, eventually};
use support::deploy::{self, chain, delete_and_time_repair};
use support::netns::scanner_passes;

const NS: &str = "loopguard-system";
const NODE: &str = "lg-real-0";
const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/loopguard");
const STATE_DIR: &str = "/var/lib/loopguard-real-node-test";

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("hack")
        .join(name)
}

/// The real node, taken down again on drop (also when the test fails).
struct RealNode<'a> {
    cluster: &'a Cluster,
}

impl<'a> RealNode<'a> {
    fn up(cluster: &'a Cluster, images: &[&Path]) -> RealNode<'a> {
        let node = RealNode { cluster };
        support::run(node.script(&["up", NODE]), None);
        let mut import = node.script(&["import", NODE]);
        import.args(images);
        support::run(import, None);
        node
    }

    fn script(&self, args: &[&str]) -> Command {
        let mut c = Command::new(script("real-node.sh"));
        c.args(args).env("LOOPGUARD_CLUSTER_DIR", &self.cluster.dir);
        c
    }
}

impl Drop for RealNode<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.cluster.dir.join("real-nodes").join(NODE).join("logs");
            for name in ["kubelet.log", "containerd.log"] {
                let text = std::fs::read_to_string(logs.join(name)).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("--- {name} (last 30 lines)");
                for line in &lines[lines.len().saturating_sub(30)..] {
                    eprintln!("{line}");
                }
            }
        }
        let _ = self.script(&["down", NODE]).status();
        let _ = std::fs::remove_dir_all(STATE_DIR);
    }
}

async fn agent_pod(client: &Client, node: &str) -> Option<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    pods.list(&ListParams::default().labels(deploy::AGENT_SELECTOR))
        .await
        .ok()?
        .items
        .into_iter()
        .find(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
        })
}

/// The pid of the agent process the real node's runtime started (the image's binary, not the
/// hollow nodes' local one).
fn real_agent_pid() -> u32 {
    let wanted = format!("NODE_NAME={NODE}");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .find(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            cmdline.starts_with(b"/usr/local/bin/loopguard\0agent\0")
                && environ.split(|b| *b == 0).any(|v| v == wanted.as_bytes())
        })
        .expect("the agent process of the real node")
}

fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_string()))
        .unwrap_or_else(|| panic!("{field} of {pid}"))
}

fn inode(path: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().ino()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_on_a_real_node_installed_upgraded_and_uninstalled_with_helm() {
    let Some(cluster) = support::cluster::private("real") else {
        return;
    };
    let started = Instant::now();
    let archive = deploy::image_archive();
    let real = RealNode::up(&cluster, &[&archive]);
    println!(
        "real node up with the image imported in {:?}",
        started.elapsed()
    );
    let client = cluster.client().await;
    let options = deploy::iptables_hosts(&cluster, "realh", 1, ("loopguard.dev/hollow", "yes"));
    let hollow_node = options.nodes[0].clone();
    let hollow = cluster.start_nodes(options).await;

    // helm install, the controller (and the hooks) on the hollow node, a default policy.
    let installed = Instant::now();
    deploy::helm(
        &cluster,
        &[
            "install",
            deploy::RELEASE,
            CHART,
            "--namespace",
            NS,
            "--create-namespace",
            "--wait",
            "--timeout",
            "5m",
            "--set",
            "controller.replicas=1",
            "--set",
            "controller.nodeSelector.loopguard\\.dev/hollow=yes",
            "--set",
            &format!("agent.stateDir={STATE_DIR}"),
            "--set",
            "agent.resync=2",
            "--set",
            "defaultPolicy.enabled=true",
            "--set",
            "defaultPolicy.spec.applicability=Always",
        ],
    );
    cluster.wait_compliant("default", "120s");
    println!(
        "helm install --wait → Compliant on the real and the hollow node: {:?}",
        installed.elapsed()
    );

    // The agent on the real node runs as the chart says, enforced by the runtime.
    let pod = agent_pod(&client, NODE)
        .await
        .expect("an agent pod on the real node");
    assert!(deploy::is_ready(&pod), "{pod:?}");
    let pid = real_agent_pid();
    assert_eq!(
        status_field(pid, "CapEff:"),
        "0000000000003000",
        "NET_ADMIN and NET_RAW only"
    );
    assert!(
        status_field(pid, "Uid:").starts_with("0\t"),
        "uid 0: {}",
        status_field(pid, "Uid:")
    );
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
    assert_eq!(
        inode(&format!("/proc/{pid}/ns/net")),
        inode(&format!("/run/netns/{NODE}")),
        "hostNetwork: the node's network namespace"
    );
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .expect("the root mount");
    assert!(
        root.split(' ')
            .nth(5)
            .unwrap()
            .split(',')
            .any(|o| o == "ro"),
        "read-only root: {root}"
    );

    // The rules are in the node's namespace, the scanner passes there, a deleted rule comes back.
    assert!(
        scanner_passes(NODE, "nft"),
        "{:?}",
        chain(NODE, "nft", "INPUT")
    );
    let took = delete_and_time_repair(NODE, "nft", Duration::from_secs(1));
    println!("real node: deleted rule back after {took:?}");
    let states: Api<LoopbackNodeState> = Api::all(client.clone());
    let state = states.get(NODE).await.unwrap().status.unwrap();
    assert_eq!(state.backend.as_deref(), Some("iptables-nft"));
    // This machine has nftables installed, so its rule applies too, and the chart's default
    // policy enforces it: nft from the image, under the runtime's seccomp profile and the agent's
    // two capabilities, wrote loopguard's table in the node's namespace.
    let nft_rule = state
        .checks
        .iter()
        .find(|c| c.id == "set_nftables_loopback_traffic")
        .unwrap_or_else(|| panic!("no nftables rule in {:?}", state.checks));
    assert_eq!(nft_rule.verdict, "Pass", "{nft_rule:?}");
    assert!(
        deploy::has_loopguard_table(NODE),
        "table inet loopguard in {NODE}"
    );

    // helm test: every node the agents cover has a recent report (the test Pod runs where the
    // controller runs, on the hollow node; a hollow node keeps no logs for `--logs`).
    let tested = Instant::now();
    let out = deploy::helm(
        &cluster,
        &[
            "test",
            deploy::RELEASE,
            "--namespace",
            NS,
            "--timeout",
            "2m",
        ],
    );
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.lines()
            .any(|l| l.starts_with("Phase:") && l.trim_end().ends_with("Succeeded")),
        "{out}"
    );
    println!("helm test: {:?}", tested.elapsed());

    // helm upgrade with a changed value: the DaemonSet rolls, and the rules never go away.
    let old = pod.name_any();
    let sampler = deploy::PairSampler::start(vec![NODE.to_string()], Duration::from_millis(3));
    let upgraded = Instant::now();
    deploy::helm(
        &cluster,
        &[
            "upgrade",
            deploy::RELEASE,
            CHART,
            "--namespace",
            NS,
            "--reuse-values",
            "--wait",
            "--timeout",
            "5m",
            "--set",
            "agent.resync=3",
        ],
    );
    let new = eventually("the new agent Ready", Duration::from_secs(120), || async {
        agent_pod(&client, NODE)
            .await
            .filter(|p| p.name_any() != old && deploy::is_ready(p))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (samples, without) = sampler.finish();
    println!(
        "helm upgrade: agent {old} → {} in {:?}; {samples} samples of INPUT, {without} without the pair",
        new.name_any(),
        upgraded.elapsed()
    );
    assert!(samples > 100, "{samples} samples");
    assert_eq!(without, 0, "a moment without the rules during the rollout");

    // A wedged agent (SIGSTOP: it answers no probe) is restarted by the kubelet's liveness probe.
    let pid = real_agent_pid();
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    let wedged = Instant::now();
    eventually(
        "the wedged agent restarted and Ready",
        Duration::from_secs(150),
        || async {
            let pod = agent_pod(&client, NODE).await?;
            let restarts = pod.status.as_ref()?.container_statuses.as_ref()?[0].restart_count;
            (restarts >= 1 && deploy::is_ready(&pod)).then_some(())
        },
    )
    .await;
    println!(
        "wedged agent restarted and Ready after {:?}",
        wedged.elapsed()
    );
    assert_ne!(real_agent_pid(), pid);

    // helm uninstall: no loopguard rule left on any node, no policy, no node state, no pod.
    let uninstalled = Instant::now();
    deploy::helm(
        &cluster,
        &[
            "uninstall",
            deploy::RELEASE,
            "--namespace",
            NS,
            "--wait",
            "--timeout",
            "5m",
        ],
    );
    println!("helm uninstall --wait: {:?}", uninstalled.elapsed());
    for (node, backend) in [(NODE, "nft"), (hollow_node.as_str(), "nft")] {
        assert!(
            chain(node, backend, "INPUT").is_empty() && chain(node, backend, "OUTPUT").is_empty(),
            "loopguard's rules left on {node}"
        );
        assert!(
            !deploy::has_loopguard_table(node),
            "loopguard's nftables table left on {node}"
        );
    }
    let policies: Api<LoopbackPolicy> = Api::all(client.clone());
    assert!(
        policies
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(
        states
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    eventually("no pod left", Duration::from_secs(60), || async {
        let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
        pods.list(&ListParams::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    hollow.shutdown(Duration::from_secs(5)).await.unwrap();
    drop(real);
}

/// `hack/cluster.sh down` (what the watchdog runs when a test binary dies) takes a real node down
/// with the control plane: no kubelet, containerd or relay left running, no mount, no netns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_down_takes_its_real_nodes_down() {
    const NODE: &str = "lg-real-down";
    let Some(cluster) = support::cluster::private("realdown") else {
        return;
    };
    let netns = Path::new("/run/netns").join(NODE);
    let mut up = Command::new(script("real-node.sh"));
    up.args(["up", NODE])
        .env("LOOPGUARD_CLUSTER_DIR", &cluster.dir);
    support::run(up, None);
    // The node is up: the negative checks below have something to miss.
    assert!(netns.exists(), "{} after real-node.sh up", netns.display());
    let running = support::cluster::processes_under(&cluster.dir);
    assert!(
        running.iter().any(|p| p.contains("kubelet"))
            && running.iter().any(|p| p.contains("containerd")),
        "no kubelet and containerd of the real node running: {running:#?}"
    );

    let mut down = Command::new(script("cluster.sh"));
    down.arg("down").env("LOOPGUARD_CLUSTER_DIR", &cluster.dir);
    support::run(down, None);
    assert!(
        !netns.exists(),
        "{} left after cluster.sh down",
        netns.display()
    );
    let left = support::cluster::processes_under(&cluster.dir);
    assert!(
        left.is_empty(),
        "left running after cluster.sh down: {left:#?}"
    );
    let mounts = support::cluster::mounts_under(&cluster.dir);
    assert!(
        mounts.is_empty(),
        "mounts left after cluster.sh down: {mounts:#?}"
    );
    assert!(
        !cluster.dir.exists(),
        "{} left after cluster.sh down",
        cluster.dir.display()
    );
}
