//! A real cluster (hack/real-cluster.sh): three real nodes (kubelet, containerd, runc), each with a
//! pod network and kube-proxy writing its own rules: in iptables mode on the legacy backend, in
//! iptables mode on nft, in nftables mode. The chart from the image built from the Dockerfile runs
//! there with nothing hollow: the agents, two controller replicas in pods that reach the API
//! server through the `kubernetes` Service, `helm test` and the uninstall hooks.

mod support;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams};
use kube::{Client, ResourceExt};
use loopguard::api::{LoopbackNodeState, LoopbackPolicy};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::cluster::{RealCluster, eventually};
use support::deploy::{self, chain};
use support::netns::scanner_passes;
use support::watch::{self, NftWatch};

/// One real cluster at a time: three kubelets, containerds and kube-proxies are plenty for two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const NS: &str = "loopguard-system";
const CONTROLLER_SELECTOR: &str = "app.kubernetes.io/component=controller";

/// The default example policy (every node, each the loopback rule that applies to it), with a
/// node selector, approved by the test's admin (`protection.approvers`: a selector change needs it).
fn policy(selector: &str) -> String {
    format!(
        "apiVersion: loopguard.dev/v1alpha1
kind: LoopbackPolicy
metadata:
  name: baseline
  annotations:
    loopguard.dev/approved-by: kubernetes-admin
    loopguard.dev/reason: \"CHG-1 the ufw node is covered by its own exception\"
spec:
  nodeSelector: {selector}
  ruleFamilies:
    nftables: Enforce
    ufw: Report
    firewalld: Report
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_on_three_real_nodes_beside_kube_proxy() {
    let _serial = SERIAL.lock().await;
    let archive = deploy::image_archive();
    let started = Instant::now();
    let Some(real) = support::cluster::real("rc", &[&archive]) else {
        return;
    };
    println!(
        "real cluster up, the image on three nodes: {:?}",
        started.elapsed()
    );
    let cluster = &real.cluster;
    let client = cluster.client().await;
    let [legacy, nft, nftables] = [&real.nodes[0], &real.nodes[1], &real.nodes[2]];

    nodes_are_dual_stack_and_ready(&client, &real.nodes).await;
    kube_proxy_writes_where_its_node_says(&real).await;

    // helm install --wait: the agents and two controller replicas, all on real nodes, and the
    // evidence CronJob writing to a static hostPath volume (the cluster has no provisioner): a
    // small tmpfs of its own, so that it can be filled.
    let evidence = EvidenceVolume::new(cluster);
    let installed = Instant::now();
    deploy::install_on_real(
        &real,
        &[
            "controller.replicas=2",
            "agent.resync=2",
            "evidence.enabled=true",
            "evidence.persistence.storageClassName=-",
            "evidence.persistence.size=2Mi",
            "evidence.activeDeadlineSeconds=30",
            "protection.enabled=true",
            "protection.approvers.users={kubernetes-admin}",
        ],
    );
    println!("helm install --wait: {:?}", installed.elapsed());
    controllers_reach_the_api_through_the_service(&client).await;

    // One policy for every node: each enforces the rule that applies to it, beside kube-proxy's.
    cluster.kubectl_ok(&["apply", "-f", "-"], Some(&policy("{}")));
    let states: Api<LoopbackNodeState> = Api::all(client.clone());
    let reported = |node: String, reason: &'static str| {
        let states = states.clone();
        async move {
            let status = states.get(&node).await.ok()?.status?;
            (status.reason == reason).then_some(status)
        }
    };
    let wait = Duration::from_secs(120);
    let on_legacy = eventually("the legacy node compliant", wait, || {
        reported(legacy.clone(), "RulesInPlace")
    })
    .await;
    // kube-proxy's legacy rules tell the agent's detection which backend the node uses; the
    // rules went in through the kernel's table interface, under the runtime's seccomp profile.
    assert_eq!(on_legacy.backend.as_deref(), Some("iptables-legacy"));
    let input = chain(legacy, "legacy", "INPUT");
    assert!(
        deploy::PAIR.iter().all(|r| input.contains(&r.to_string())),
        "{input:#?}"
    );
    assert!(
        input.iter().any(|r| r.contains("KUBE-")),
        "kube-proxy's jumps kept: {input:#?}"
    );
    assert!(scanner_passes(legacy, "legacy"), "{input:#?}");

    let on_nftables = eventually("the nftables node compliant", wait, || {
        reported(nftables.clone(), "RulesInPlace")
    })
    .await;
    let rule = on_nftables
        .checks
        .iter()
        .find(|c| c.id == "set_nftables_loopback_traffic")
        .unwrap_or_else(|| panic!("{:?}", on_nftables.checks));
    assert_eq!(rule.verdict, "Pass", "{rule:?}");
    let ruleset = deploy::nft_ruleset(nftables);
    assert!(deploy::has_loopguard_table(nftables), "{ruleset}");
    assert!(
        ruleset.contains("table ip6 kube-proxy {"),
        "kube-proxy's table beside loopguard's: {ruleset}"
    );

    // ufw installed and inactive: its rule applies and cannot pass; loopguard never enables ufw.
    let on_ufw = eventually("the ufw node reported", wait, || {
        reported(nft.clone(), "UfwInactive")
    })
    .await;
    assert!(
        on_ufw
            .checks
            .iter()
            .any(|c| c.id == "set_ufw_loopback_traffic" && c.reason == "UfwInactive")
    );
    let input = chain(nft, "nft", "INPUT");
    assert!(
        !deploy::PAIR.iter().any(|r| input.contains(&r.to_string())),
        "the seed's rule does not apply where ufw is installed: {input:#?}"
    );
    let policies: Api<LoopbackPolicy> = Api::all(client.clone());
    let status = eventually("the policy's counts", wait, || async {
        let status = policies.get("baseline").await.ok()?.status?;
        (status.targeted_nodes == 3 && status.compliant_nodes == 2).then_some(status)
    })
    .await;
    assert_eq!(status.non_compliant_nodes, 1, "{status:?}");

    // Without the ufw node, the policy turns Compliant: `kubectl wait` as a user runs it.
    let selector = format!(
        "{{matchExpressions: [{{key: kubernetes.io/hostname, operator: NotIn, values: [{nft}]}}]}}"
    );
    cluster.kubectl_ok(&["apply", "-f", "-"], Some(&policy(&selector)));
    cluster.wait_compliant("baseline", "120s");

    prometheus_finds_every_target_as_the_monitors_say(&real);
    // The agent's metrics answer on the node's own address (what Prometheus and the probes use),
    // not on its other addresses: not on loopback, not on the router's side of the node.
    for node in &real.nodes {
        let curl = |url: &str| {
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    node,
                    "curl",
                    "-sS",
                    "-o",
                    "/dev/null",
                    "--max-time",
                    "5",
                ])
                .arg(url)
                .output()
                .unwrap()
                .status
                .success()
        };
        let ip = deploy::node_ipv4(node);
        assert!(curl(&format!("http://{ip}:9742/healthz")), "{node}: {ip}");
        assert!(
            !curl("http://127.0.0.1:9742/healthz"),
            "{node}: loopback answers"
        );
    }
    leader_moves_when_its_pod_goes(&client).await;

    // helm test: its Pod runs on a real node and reaches the API server through the Service.
    let out = deploy::helm(
        cluster,
        &[
            "test",
            deploy::RELEASE,
            "--namespace",
            NS,
            "--timeout",
            "3m",
        ],
    );
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.lines()
            .any(|l| l.starts_with("Phase:") && l.trim_end().ends_with("Succeeded")),
        "{out}"
    );

    evidence_kept_on_a_volume(cluster, &evidence, nft).await;

    // No silent switch-off: without a reason on the object even the approver is refused ...
    cluster.kubectl_ok(
        &["annotate", "lbp", "baseline", "loopguard.dev/reason-"],
        None,
    );
    let refused = eventually("the protection policy refuses", wait, || async {
        let out = cluster
            .kubectl()
            .args(["patch", "lbp", "baseline", "--type=merge", "-p"])
            .arg(r#"{"spec":{"mode":"Audit"}}"#)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        (!out.status.success()).then_some(text)
    })
    .await;
    assert!(
        refused.contains("needs the annotations loopguard.dev/approved-by"),
        "{refused}"
    );
    // ... while the uninstall hook below deletes this Enforce policy: its ServiceAccount is exempt.

    // helm uninstall: the hooks run on real nodes; loopguard's rules go, kube-proxy's stay.
    let uninstalled = Instant::now();
    deploy::helm(
        cluster,
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
    let input = chain(legacy, "legacy", "INPUT");
    assert!(
        !deploy::PAIR.iter().any(|r| input.contains(&r.to_string())),
        "loopguard's rules left on {legacy}: {input:#?}"
    );
    assert!(
        input.iter().any(|r| r.contains("KUBE-")),
        "kube-proxy's jumps kept: {input:#?}"
    );
    let ruleset = deploy::nft_ruleset(nftables);
    assert!(!deploy::has_loopguard_table(nftables), "{ruleset}");
    assert!(ruleset.contains("table ip6 kube-proxy {"), "{ruleset}");
    assert!(
        policies
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );

    taken_down_completely(real, false);
}

/// The evidence CronJob's volume: a 2 MiB tmpfs (owned by the Job's user) behind a static
/// hostPath PersistentVolume bound to the chart's claim; unmounted and deleted when dropped.
struct EvidenceVolume {
    dir: tempfile::TempDir,
}

const EVIDENCE_PV: &str = "loopguard-evidence-test";
const EVIDENCE_JOB: &str = "loopguard-evidence";

impl EvidenceVolume {
    fn new(cluster: &support::cluster::Cluster) -> EvidenceVolume {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_str().unwrap().to_string();
        support::run(
            {
                let mut c = Command::new("mount");
                c.args([
                    "-t",
                    "tmpfs",
                    "-o",
                    "size=2m,uid=65532,gid=65532,mode=0750",
                    "loopguard-evidence-test",
                    &path,
                ]);
                c
            },
            None,
        );
        let volume = EvidenceVolume { dir };
        cluster.kubectl_ok(
            &["apply", "-f", "-"],
            Some(&format!(
                "apiVersion: v1
kind: PersistentVolume
metadata:
  name: {EVIDENCE_PV}
spec:
  capacity: {{storage: 2Mi}}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: \"\"
  claimRef: {{namespace: {NS}, name: {EVIDENCE_JOB}}}
  hostPath: {{path: {path}, type: Directory}}
"
            )),
        );
        volume
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The runs' folders, sorted.
    fn runs(&self) -> Vec<String> {
        let mut runs: Vec<String> = std::fs::read_dir(self.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("20"))
            .collect();
        runs.sort();
        runs
    }
}

impl Drop for EvidenceVolume {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Runs the CronJob's Job once (`kubectl create job --from`) and returns whether it completed,
/// with its Pod's termination message (the report's last line, or what went wrong).
fn run_evidence_job(cluster: &support::cluster::Cluster, name: &str) -> (bool, String) {
    cluster.kubectl_ok(
        &[
            "-n",
            NS,
            "create",
            "job",
            name,
            &format!("--from=cronjob/{EVIDENCE_JOB}"),
        ],
        None,
    );
    let started = Instant::now();
    loop {
        let conditions = cluster.kubectl_ok(
            &[
                "-n",
                NS,
                "get",
                "job",
                name,
                "-o",
                "jsonpath={range .status.conditions[?(@.status==\"True\")]}{.type}{\" \"}{end}",
            ],
            None,
        );
        let done = conditions
            .split_whitespace()
            .find(|c| *c == "Complete" || *c == "Failed");
        if let Some(done) = done {
            let message = cluster.kubectl_ok(
                &[
                    "-n",
                    NS,
                    "get",
                    "pods",
                    "-l",
                    &format!("job-name={name}"),
                    "-o",
                    "jsonpath={.items[*].status.containerStatuses[*].state.terminated.message}",
                ],
                None,
            );
            println!(
                "evidence job {name}: {done} after {:?}: {}",
                started.elapsed(),
                message.trim()
            );
            return (done == "Complete", message);
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "job {name} neither completed nor failed: {conditions}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The Events of an object, as `reason: message` lines.
fn events_of(cluster: &support::cluster::Cluster, name: &str) -> String {
    cluster.kubectl_ok(
        &[
            "-n",
            NS,
            "get",
            "events",
            "--field-selector",
            &format!("involvedObject.name={name}"),
            "-o",
            "jsonpath={range .items[*]}{.reason}: {.message}{\"\\n\"}{end}",
        ],
        None,
    )
}

fn sums_check(folder: &Path) {
    let out = Command::new("sha256sum")
        .args(["-c", "SHA256SUMS"])
        .current_dir(folder)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}: {out:?}", folder.display());
}

/// The evidence CronJob's runs on a real node: every format and a manifest that `sha256sum -c`
/// accepts, a node left out of every policy fails the run (after writing it) until an exception
/// covers it, runs past the retention go and nothing else does, and a full or missing volume
/// fails the Job visibly without losing a run.
async fn evidence_kept_on_a_volume(
    cluster: &support::cluster::Cluster,
    volume: &EvidenceVolume,
    unmanaged: &str,
) {
    let old = volume.path().join("20200101T000000Z");
    std::fs::create_dir(&old).unwrap();
    std::fs::write(old.join("report.json"), "{}").unwrap();
    // As the Job's user wrote it.
    for path in [&old, &old.join("report.json")] {
        std::os::unix::fs::chown(path, Some(65532), Some(65532)).unwrap();
    }
    std::fs::write(volume.path().join("README.txt"), "kept by the auditors").unwrap();

    // The ufw node is outside the policy's selector and no exception says why: the run fails,
    // and its evidence is written all the same.
    let (complete, message) = run_evidence_job(cluster, "evidence-unmanaged");
    assert!(!complete, "{message}");
    assert!(
        message.contains("evidence written to /evidence/20"),
        "{message}"
    );
    let runs = volume.runs();
    assert_eq!(
        runs.len(),
        1,
        "the 2020 run is past the 366 days kept: {runs:?}"
    );
    assert!(
        volume.path().join("README.txt").exists(),
        "not loopguard's: kept"
    );
    let first = volume.path().join(&runs[0]);
    let mut files: Vec<String> = std::fs::read_dir(&first)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "SHA256SUMS",
            "oscal-assessment-results.json",
            "report.csv",
            "report.html",
            "report.json"
        ]
    );
    sums_check(&first);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(first.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["summary"]["unmanaged"], 1, "{}", report["summary"]);
    assert!(
        report["clusterUid"].as_str().is_some_and(|u| !u.is_empty()),
        "the cluster's identity"
    );
    assert!(events_of(cluster, "evidence-unmanaged").contains("BackoffLimitExceeded"));

    // An approved exception for that node: the next run passes.
    let now = jiff::Timestamp::now();
    cluster.kubectl_ok(
        &["apply", "-f", "-"],
        Some(&format!(
            "apiVersion: loopguard.dev/v1alpha1
kind: LoopbackException
metadata: {{name: ufw-pool}}
spec:
  nodeNames: [{unmanaged}]
  ruleIds: [set_ufw_loopback_traffic]
  justification: ufw stays inactive on this node until its pool is retired
  approvedBy: Jane Auditor
  approvedAt: \"{now}\"
  ticket: CHG-1042
  expires: \"{}\"
",
            now + jiff::SignedDuration::from_hours(24 * 30)
        )),
    );
    let (complete, message) = run_evidence_job(cluster, "evidence-excepted");
    assert!(complete, "{message}");
    let runs = volume.runs();
    assert_eq!(runs.len(), 2, "{runs:?}");
    let second = volume.path().join(&runs[1]);
    sums_check(&second);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(second.join("report.json")).unwrap())
            .unwrap();
    assert_eq!(
        report["exceptions"][0]["name"], "ufw-pool",
        "{}",
        report["exceptions"]
    );

    // The volume full: the Job fails and says why; no run lost, nothing half-written left.
    let filler = volume.path().join("filler");
    let fill = Command::new("dd")
        .args(["if=/dev/zero", &format!("of={}", filler.display()), "bs=4k"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&fill.stderr).contains("No space left"),
        "{fill:?}"
    );
    let (complete, message) = run_evidence_job(cluster, "evidence-full");
    assert!(!complete);
    assert!(
        message.contains("full") && message.contains("nothing older was removed"),
        "{message}"
    );
    assert_eq!(volume.runs(), runs, "no run lost or added");
    assert!(
        !std::fs::read_dir(volume.path()).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".incomplete")),
        "the half-written run was taken away"
    );
    sums_check(&first);
    sums_check(&second);
    assert!(events_of(cluster, "evidence-full").contains("BackoffLimitExceeded"));
    std::fs::remove_file(&filler).unwrap();

    // The claim gone: the Pod cannot start, and the Job fails at its deadline instead of waiting.
    cluster.kubectl_ok(
        &["-n", NS, "delete", "pvc", EVIDENCE_JOB, "--wait=false"],
        None,
    );
    let (complete, _) = run_evidence_job(cluster, "evidence-no-claim");
    assert!(!complete);
    let events = events_of(cluster, "evidence-no-claim");
    assert!(events.contains("DeadlineExceeded"), "{events}");
    assert_eq!(volume.runs(), runs);
    cluster.kubectl_ok(&["delete", "pv", EVIDENCE_PV, "--wait=false"], None);
    cluster.kubectl_ok(&["delete", "lbex", "ufw-pool"], None);
}

/// Every node Ready, with an IPv4 and an IPv6 InternalIP.
async fn nodes_are_dual_stack_and_ready(client: &Client, names: &[String]) {
    let nodes: Api<Node> = Api::all(client.clone());
    for name in names {
        let status = nodes.get(name).await.unwrap().status.unwrap();
        let ready = status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        assert!(ready, "{name}: {:?}", status.conditions);
        let internal: Vec<String> = status
            .addresses
            .iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .map(|a| a.address.clone())
            .collect();
        assert!(
            internal.len() == 2 && internal.iter().any(|a| a.contains(':')),
            "{name}: {internal:?}"
        );
    }
}

/// kube-proxy programs each node with the tool its node is set up with, and only with that one.
async fn kube_proxy_writes_where_its_node_says(real: &RealCluster) {
    let services =
        |node: &str, backend: &str| deploy::save(node, backend).contains(":KUBE-SERVICES");
    let [legacy, nft, nftables] = [&real.nodes[0], &real.nodes[1], &real.nodes[2]];
    eventually(
        "kube-proxy's rules on every node",
        Duration::from_secs(60),
        || async {
            (services(legacy, "legacy")
                && services(nft, "nft")
                && deploy::nft_ruleset(nftables).contains("table ip6 kube-proxy {"))
            .then_some(())
        },
    )
    .await;
    assert!(!services(legacy, "nft"), "iptables-nft rules on {legacy}");
    assert!(!services(nft, "legacy"), "legacy rules on {nft}");
    assert!(
        !services(nftables, "nft") && !services(nftables, "legacy"),
        "iptables rules on {nftables}"
    );
}

/// The controller's two replicas: Ready pods of the pod network on two real nodes, whose
/// processes were given the `kubernetes` Service's address, and one of which holds the lease.
async fn controllers_reach_the_api_through_the_service(client: &Client) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let controllers = pods
        .list(&ListParams::default().labels(CONTROLLER_SELECTOR))
        .await
        .unwrap()
        .items;
    assert_eq!(controllers.len(), 2);
    let mut nodes = Vec::new();
    for pod in &controllers {
        assert!(deploy::is_ready(pod), "{pod:?}");
        let spec = pod.spec.as_ref().unwrap();
        assert_ne!(spec.host_network, Some(true));
        let ip = pod.status.as_ref().unwrap().pod_ip.clone().unwrap();
        assert!(ip.starts_with("10.244."), "{} has {ip}", pod.name_any());
        nodes.push(spec.node_name.clone().unwrap());
        let environ = process_environ(&pod.name_any()).expect("the controller's process");
        assert!(
            environ.contains(&"KUBERNETES_SERVICE_HOST=10.96.0.1".to_string()),
            "{environ:?}"
        );
    }
    assert_ne!(nodes[0], nodes[1], "two replicas on two nodes");
    let holder = lease_holder(client).await;
    assert!(
        controllers.iter().any(|p| p.name_any() == holder),
        "the lease is held by {holder}"
    );
}

/// The environment of the loopguard process whose HOSTNAME is `pod`.
fn process_environ(pod: &str) -> Option<Vec<String>> {
    let wanted = format!("HOSTNAME={pod}");
    loopguard_processes()
        .into_iter()
        .find(|p| p.1.contains(&wanted))
        .map(|p| p.1)
}

async fn lease_holder(client: &Client) -> String {
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    eventually("a lease holder", Duration::from_secs(60), || async {
        leases
            .get("loopguard-controller")
            .await
            .ok()?
            .spec?
            .holder_identity
            .filter(|h| !h.is_empty())
    })
    .await
}

/// The leader's pod deleted: another replica (the standby, or the Deployment's replacement
/// if it starts first) takes the lease over; the deleted pod never holds it again.
async fn leader_moves_when_its_pod_goes(client: &Client) {
    let leader = lease_holder(client).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let deleted = Instant::now();
    pods.delete(&leader, &DeleteParams::default())
        .await
        .unwrap();
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let (holder, node) = eventually(
        "another replica leading",
        Duration::from_secs(120),
        || async {
            let holder = leases
                .get("loopguard-controller")
                .await
                .ok()?
                .spec?
                .holder_identity?;
            if holder == leader || holder.is_empty() {
                return None;
            }
            let pod = pods.get(&holder).await.ok()?;
            let node = pod.spec?.node_name?;
            Some((holder, node))
        },
    )
    .await;
    println!(
        "leader {leader} deleted: {holder} on {node} leads after {:?}",
        deleted.elapsed()
    );
}

/// `hack/real-cluster.sh down`: no namespace, process or mount of the cluster left; with
/// `running`, the pods' containers (which must be running before) stopped too.
fn taken_down_completely(real: RealCluster, running: bool) {
    let dir = real.cluster.dir.clone();
    let nodes = real.nodes.clone();
    // The containers of the nodes (the image's loopguard, the pods' pause), pods with a network
    // namespace of their own included: down must stop them too.
    let containers = container_pids();
    assert!(
        !running || containers.len() >= 5,
        "the pods' containers of the cluster are not running before down: {containers:?}"
    );
    drop(real);
    let alive: Vec<&(u32, Vec<u8>)> = containers
        .iter()
        .filter(|(pid, cmdline)| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == *cmdline)
        })
        .collect();
    assert!(
        alive.is_empty(),
        "containers left running after down: {alive:?}"
    );
    for node in &nodes {
        assert!(
            !Path::new("/run/netns").join(node).exists(),
            "{node}'s namespace left"
        );
    }
    let router = nodes[0].replace("-legacy", "-net");
    assert!(
        !Path::new("/run/netns").join(&router).exists(),
        "the router's namespace {router} left"
    );
    let left = support::cluster::processes_under(&dir);
    assert!(left.is_empty(), "left running: {left:#?}");
    let mounts = support::cluster::mounts_under(&dir);
    assert!(mounts.is_empty(), "mounts left: {mounts:#?}");
    assert!(!dir.exists(), "{} left", dir.display());
}

/// The seed's rules on every node (the ufw node's own rule left out, as it cannot pass while ufw
/// is inactive), loopguard's nftables table where nftables is installed.
const EVERY_NODE: &str = "apiVersion: loopguard.dev/v1alpha1
kind: LoopbackPolicy
metadata:
  name: every-node
spec:
  applicability: Always
  ruleFamilies:
    nftables: Enforce
    ufw: Ignore
";

/// What the kubelet does with the chart on real nodes: the runtime's seccomp profile on the legacy
/// in-process path, the controller's user and read-only root, a rolling upgrade of the agents
/// without a moment without the rules (watched without forking), liveness that leaves healthy
/// agents alone through a 3-minute API outage with the xtables lock held and restarts wedged ones,
/// and every node rebooted (processes, /run state and firewall gone) back to Compliant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubelet_runs_the_chart_as_it_says() {
    let _serial = SERIAL.lock().await;
    let archive = deploy::image_archive();
    let Some(real) = support::cluster::real("rk", &[&archive]) else {
        return;
    };
    let cluster = &real.cluster;
    let client = cluster.client().await;
    let [legacy, nft, nftables] = [&real.nodes[0], &real.nodes[1], &real.nodes[2]];
    deploy::install_on_real(&real, &["agent.resync=5"]);
    cluster.kubectl_ok(&["apply", "-f", "-"], Some(EVERY_NODE));
    cluster.wait_compliant("every-node", "180s");

    // The legacy node's agent under the runtime's default seccomp profile (mode 2: filter),
    // enforcing through the kernel's table interface.
    let pid = agent_pid(legacy);
    assert_eq!(status_field(pid, "Seccomp:"), "2", "RuntimeDefault");
    let states: Api<LoopbackNodeState> = Api::all(client.clone());
    let state = states.get(legacy).await.unwrap().status.unwrap();
    assert_eq!(state.backend.as_deref(), Some("iptables-legacy"));
    // The controller as the chart says: its own uid, a read-only root.
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    for pod in pods
        .list(&ListParams::default().labels(CONTROLLER_SELECTOR))
        .await
        .unwrap()
        .items
    {
        let pid = pid_of_pod(&pod.name_any()).expect("the controller's process");
        assert!(
            status_field(pid, "Uid:").starts_with("65532\t"),
            "runAsUser"
        );
        assert!(root_is_read_only(pid), "readOnlyRootFilesystem");
    }

    // helm upgrade with a changed value: every agent replaced, the rules there all along.
    let stop = Arc::new(AtomicBool::new(false));
    let legacy_watch = watch::watch_legacy(legacy, stop.clone());
    let nft_watches = [nft, nftables].map(|n| NftWatch::start(n));
    let before = agent_containers(&client).await;
    let upgraded = Instant::now();
    deploy::helm(
        cluster,
        &[
            "upgrade",
            deploy::RELEASE,
            deploy::CHART,
            "--namespace",
            NS,
            "--reuse-values",
            "--wait",
            "--timeout",
            "5m",
            "--set",
            "agent.resync=6",
        ],
    );
    eventually(
        "three new agents Ready",
        Duration::from_secs(180),
        || async {
            let now = agent_containers(&client).await;
            (now.len() == 3
                && now
                    .iter()
                    .all(|(pod, _, ready)| *ready && !before.iter().any(|b| b.0 == *pod)))
            .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let mut watched = vec![legacy_watch.join().unwrap()];
    watched.extend(nft_watches.map(NftWatch::finish));
    println!(
        "helm upgrade, three agents replaced in {:?}: {watched:?}",
        upgraded.elapsed()
    );
    for w in &watched {
        assert!(w.samples > 0 && w.missing == 0, "during the rollout: {w:?}");
    }

    // Healthy agents are never restarted: the API server gone for 3 minutes, the xtables lock held
    // for the first 90 seconds of it (longer than the liveness probe's patience).
    let restarts =
        |containers: &[(String, i32, bool)]| -> i32 { containers.iter().map(|c| c.1).sum() };
    let before = agent_containers(&client).await;
    let lock = hold_lock(&real.xtables_lock, Duration::from_secs(90));
    let outage = Instant::now();
    cluster_sh(cluster, "stop-apiserver");
    tokio::time::sleep(Duration::from_secs(180)).await;
    cluster_sh(cluster, "start-apiserver");
    lock.join().unwrap();
    println!("API server back after {:?}", outage.elapsed());
    let after = eventually("three agents Ready", Duration::from_secs(120), || async {
        let now = agent_containers(&client).await;
        (now.len() == 3 && now.iter().all(|c| c.2)).then_some(now)
    })
    .await;
    assert_eq!(
        restarts(&after),
        restarts(&before),
        "{before:?} → {after:?}"
    );
    cluster.wait_compliant("every-node", "180s");

    // Passes over a big table: 50,000 rules of the test's own (in a chain nothing jumps to) in
    // every node's ip6tables filter table, while kube-proxy syncs through it too, for a minute (twice
    // the liveness probe's patience): not one restart, every node Compliant after it, and the
    // passes' time printed. (The slowest passes are those that wait for the xtables lock, held
    // 90 s above; the liveness limit is longer than two such waits and a resync.)
    let backends = [(legacy, "legacy"), (nft, "nft"), (nftables, "nft")];
    let checks_before: Vec<(f64, f64)> = real.nodes.iter().map(|n| check_seconds(n)).collect();
    for (node, backend) in backends {
        big_chain(&real, node, backend, Some(50_000));
    }
    let slow = Instant::now();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let checks_after: Vec<(f64, f64)> = real.nodes.iter().map(|n| check_seconds(n)).collect();
    for (node, backend) in backends {
        big_chain(&real, node, backend, None);
    }
    let now = agent_containers(&client).await;
    assert_eq!(restarts(&now), restarts(&after), "{after:?} → {now:?}");
    for ((node, (sum0, n0)), (sum1, n1)) in real.nodes.iter().zip(&checks_before).zip(&checks_after)
    {
        assert!(
            n1 > n0,
            "{node}: no pass in {:?} of a big table",
            slow.elapsed()
        );
        println!(
            "{node}: {} passes over a 50,000-rule table in {:?}, {:.0} ms each on average",
            n1 - n0,
            slow.elapsed(),
            (sum1 - sum0) / (n1 - n0) * 1000.0
        );
    }
    cluster.wait_compliant("every-node", "180s");

    // Wedged agents (SIGSTOP: they answer no probe) are restarted by the liveness probe.
    let wedged = Instant::now();
    for node in &real.nodes {
        unsafe { libc::kill(agent_pid(node) as i32, libc::SIGSTOP) };
    }
    eventually(
        "every wedged agent restarted and Ready",
        Duration::from_secs(180),
        || async {
            let now = agent_containers(&client).await;
            (now.len() == 3 && restarts(&now) >= restarts(&after) + 3 && now.iter().all(|c| c.2))
                .then_some(())
        },
    )
    .await;
    println!(
        "three wedged agents restarted and Ready after {:?}",
        wedged.elapsed()
    );

    // Every node rebooted at once: back to the rules and Compliant.
    let before = agent_container_ids(&client).await;
    let rebooted = Instant::now();
    for node in &real.nodes {
        let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/hack/real-node.sh"))
            .args(["reboot", node])
            .env("LOOPGUARD_CLUSTER_DIR", &cluster.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "reboot {node}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eventually(
        "every node's rules back from new agents",
        Duration::from_secs(300),
        || async {
            let now = agent_container_ids(&client).await;
            let new = now.len() == 3 && now.iter().all(|id| !before.contains(id));
            (new && deploy::has_seed_rules(legacy, "legacy")
                && deploy::has_seed_rules(nft, "nft")
                && deploy::has_seed_rules(nftables, "nft")
                && deploy::has_loopguard_table(nftables))
            .then_some(())
        },
    )
    .await;
    cluster.wait_compliant("every-node", "180s");
    println!(
        "three nodes rebooted: Compliant again after {:?}",
        rebooted.elapsed()
    );

    // A host without a dpkg database (RHEL, Flatcar, Talos have none): the legacy node's moved
    // aside and its agent replaced. The new agent starts, decides from the binaries it finds
    // (iptables only: the seed's rule), is Compliant, and nothing is created in the host's files
    // (a hostPath per file would have had an empty var/lib/dpkg made for it).
    let root = real.node_roots.join(legacy);
    let dpkg = root.join("var/lib/dpkg");
    let aside = root.join("var/lib/dpkg.aside");
    std::fs::rename(&dpkg, &aside).unwrap();
    let listing = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = walk(dir)
            .into_iter()
            .filter(|p| !p.starts_with(root.join("var/lib/loopguard")))
            .map(|p| p.display().to_string())
            .collect();
        names.sort();
        names
    };
    let files_before = listing(&root);
    let before = agent_container_ids(&client).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let old = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={legacy}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|p| p.name_any().contains("agent"))
        .expect("the legacy node's agent");
    pods.delete(&old.name_any(), &DeleteParams::default())
        .await
        .unwrap();
    let state = eventually(
        "a new agent on the legacy node, deciding without a package database",
        Duration::from_secs(180),
        || async {
            let now = agent_container_ids(&client).await;
            let replaced =
                now.len() == 3 && now.iter().filter(|id| !before.contains(id)).count() == 1;
            let state = states.get(legacy).await.ok()?.status?;
            let text = serde_json::to_string(&state).unwrap();
            (replaced && text.contains("no dpkg or rpm database under /host")).then_some(state)
        },
    )
    .await;
    assert_eq!(
        state.compliance,
        loopguard::api::Compliance::Compliant,
        "{state:#?}"
    );
    assert!(deploy::has_seed_rules(legacy, "legacy"));
    assert_eq!(listing(&root), files_before, "files created on the host");
    std::fs::rename(&aside, &dpkg).unwrap();

    // Taken down with the chart running: its pods' containers go with the nodes.
    taken_down_completely(real, true);
}

fn cluster_sh(cluster: &support::cluster::Cluster, command: &str) {
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/hack/cluster.sh"))
        .arg(command)
        .env("LOOPGUARD_CLUSTER_DIR", &cluster.dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cluster.sh {command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Holds the lock file as iptables takes it (flock, exclusive) for `time`, on a thread.
fn hold_lock(path: &Path, time: Duration) -> std::thread::JoinHandle<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap();
    assert_eq!(
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) },
        0,
        "flock {}",
        path.display()
    );
    std::thread::spawn(move || {
        std::thread::sleep(time);
        drop(file);
    })
}

/// The agents' pods: (name, restarts, Ready).
async fn agent_containers(client: &Client) -> Vec<(String, i32, bool)> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let Ok(list) = pods
        .list(&ListParams::default().labels(deploy::AGENT_SELECTOR))
        .await
    else {
        return Vec::new();
    };
    list.items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            let restarts = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .map_or(0, |c| c.iter().map(|c| c.restart_count).sum());
            (p.name_any(), restarts, deploy::is_ready(p))
        })
        .collect()
}

/// The agents' running container ids.
async fn agent_container_ids(client: &Client) -> Vec<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let Ok(list) = pods
        .list(&ListParams::default().labels(deploy::AGENT_SELECTOR))
        .await
    else {
        return Vec::new();
    };
    list.items
        .iter()
        .filter(|p| deploy::is_ready(p))
        .filter_map(|p| {
            p.status
                .as_ref()?
                .container_statuses
                .as_ref()?
                .first()?
                .container_id
                .clone()
        })
        .collect()
}

/// The pid of the agent process running for `node` (the image's binary).
fn agent_pid(node: &str) -> u32 {
    let wanted = format!("NODE_NAME={node}");
    loopguard_processes()
        .into_iter()
        .find(|(cmdline, environ, _)| {
            cmdline.starts_with(b"/usr/local/bin/loopguard\0agent\0") && environ.contains(&wanted)
        })
        .map(|p| p.2)
        .unwrap_or_else(|| panic!("the agent process of {node}"))
}

fn pid_of_pod(pod: &str) -> Option<u32> {
    let wanted = format!("HOSTNAME={pod}");
    loopguard_processes()
        .into_iter()
        .find(|p| p.1.contains(&wanted))
        .map(|p| p.2)
}

/// Every process of the image's loopguard binary: (command line, environment, pid).
fn loopguard_processes() -> Vec<(Vec<u8>, Vec<String>, u32)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_string_lossy().parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            if !cmdline.starts_with(b"/usr/local/bin/loopguard\0") {
                return None;
            }
            let environ = std::fs::read(e.path().join("environ")).ok()?;
            let vars = environ
                .split(|b| *b == 0)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect();
            Some((cmdline, vars, pid))
        })
        .collect()
}

fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_string()))
        .unwrap_or_else(|| panic!("{field} of {pid}"))
}

fn root_is_read_only(pid: u32) -> bool {
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .is_some_and(|root| {
            root.split(' ')
                .nth(5)
                .unwrap()
                .split(',')
                .any(|o| o == "ro")
        })
}

/// The chart's ServiceMonitor and PodMonitor, as the Prometheus Operator would turn them into scrape
/// jobs, given to a real Prometheus in the cluster network with Kubernetes service discovery: each
/// finds both controller replicas and the three agents, labelled with their node.
fn prometheus_finds_every_target_as_the_monitors_say(real: &RealCluster) {
    use support::prometheus::{Prometheus, SdAccess, render_in, scrape_jobs};
    let pki = real.cluster.dir.join("pki");
    let sd = SdAccess {
        api_server: real.api_server(),
        ca_file: pki.join("ca.crt"),
        cert_file: pki.join("admin.crt"),
        key_file: pki.join("admin.key"),
    };
    let mut jobs = Vec::new();
    for kind in ["ServiceMonitor", "PodMonitor"] {
        let rendered = render_in(
            NS,
            "templates/servicemonitor.yaml",
            &[
                "serviceMonitor.enabled=true",
                &format!("serviceMonitor.kind={kind}"),
            ],
        );
        let monitor: serde_json::Value = serde_saphyr::from_str(&rendered).unwrap();
        jobs.extend(scrape_jobs(&monitor, &sd));
    }
    let started = Instant::now();
    let prometheus = Prometheus::start_in(&real.router(), &jobs, 10);
    println!(
        "Prometheus found and scraped all 10 targets in {:?}",
        started.elapsed()
    );
    for node in &real.nodes {
        for job in ["loopguard-agent-metrics", "loopguard-system/loopguard"] {
            let found = prometheus.query(&format!(
                "loopguard_agent_compliant{{node=\"{node}\", job=\"{job}\"}}"
            ));
            assert_eq!(
                found.len(),
                1,
                "the agent of {node} through job {job}: {found:?}"
            );
        }
    }
    let controllers = prometheus
        .query("count by (job) (loopguard_build_info{component=\"controller\", node!=\"\"})");
    assert_eq!(controllers.len(), 2, "both jobs: {controllers:?}");
    for series in &controllers {
        assert_eq!(
            series["value"][1], "2",
            "two controller replicas: {series:?}"
        );
    }
}

/// The processes of the image's binary and of the pods' sandboxes (pid, command line).
fn container_pids() -> Vec<(u32, Vec<u8>)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_string_lossy().parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            (cmdline.starts_with(b"/usr/local/bin/loopguard\0") || cmdline == b"/pause\0")
                .then_some((pid, cmdline))
        })
        .collect()
}

/// `hack/real-cluster.sh up` run twice, after a crash, and beside a namespace of the same name it
/// does not own: a clear message each time, and never a half-started cluster left running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_cluster_up_refuses_or_recovers_cleanly() {
    let _serial = SERIAL.lock().await;
    let Some(real) = support::cluster::real("rb", &[]) else {
        return;
    };
    let dir = real.cluster.dir.clone();
    let script = |args: &[&str]| {
        Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/hack/real-cluster.sh"))
            .args(args)
            .env("LOOPGUARD_CLUSTER_DIR", &dir)
            .output()
            .unwrap()
    };
    let ready_nodes = || {
        real.cluster.kubectl_ok(
            &[
                "wait",
                "--for=condition=Ready",
                "node",
                "--all",
                "--timeout=120s",
            ],
            None,
        );
        let nodes = real
            .cluster
            .kubectl_ok(&["get", "nodes", "-o", "name"], None);
        assert_eq!(nodes.lines().count(), 3, "{nodes}");
    };

    // Twice: refused, the running cluster untouched.
    let again = script(&["up"]);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && stderr.contains("already up"),
        "{stderr}"
    );
    ready_nodes();

    // A crash: every process of the cluster killed at once (control plane, watchdog, kubelets,
    // runtimes, kube-proxies, relays); the state dir and the namespaces stay behind.
    let pids = support::cluster::pids_under(&dir);
    assert!(pids.len() >= 10, "{pids:#?}");
    for (pid, _) in &pids {
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
    assert!(Path::new("/run/netns").join(real.router()).exists());
    let up = script(&["up"]);
    let stderr = String::from_utf8_lossy(&up.stderr);
    assert!(up.status.success(), "up after a crash: {stderr}");
    assert!(stderr.contains("leftovers of an earlier run"), "{stderr}");
    ready_nodes();

    // A namespace named like the cluster's that no state dir owns: refused before anything starts.
    let down = script(&["down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    let router = real.router();
    support::run(
        {
            let mut c = Command::new("ip");
            c.args(["netns", "add", &router]);
            c
        },
        None,
    );
    let refused = script(&["up"]);
    let _ = Command::new("ip")
        .args(["netns", "delete", &router])
        .status();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("remove it by hand"),
        "{stderr}"
    );
    nothing_left(&dir, &real);

    // A package missing that cannot be installed (containerd, on a machine whose package archive
    // is out of reach: dpkg-query and apt-get in front of the real ones say so): stopped before
    // anything starts, with what is missing and how to get it.
    let fake = tempfile::tempdir().unwrap();
    let calls = fake.path().join("apt-get.calls");
    let write_script = |name: &str, text: &str| {
        let path = fake.path().join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    };
    write_script(
        "dpkg-query",
        "#!/bin/sh\ncase \" $* \" in *\" containerd \"*) echo not-installed; exit 0 ;; esac\nexec /usr/bin/dpkg-query \"$@\"\n",
    );
    write_script(
        "apt-get",
        &format!(
            "#!/bin/sh\necho \"$*\" >>{}\necho 'E: Unable to locate package containerd' >&2\nexit 100\n",
            calls.display()
        ),
    );
    let path = format!(
        "{}:{}",
        fake.path().display(),
        std::env::var("PATH").unwrap()
    );
    let missing = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/hack/real-cluster.sh"))
        .arg("up")
        .env("LOOPGUARD_CLUSTER_DIR", &dir)
        .env("PATH", &path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&missing.stderr);
    let tried = std::fs::read_to_string(&calls).unwrap_or_default();
    assert!(
        tried.contains("install") && tried.contains("containerd"),
        "apt-get was not asked for containerd: {tried:?}\n{stderr}"
    );
    assert!(
        !missing.status.success()
            && stderr.contains("missing packages: containerd")
            && stderr.contains("apt-get install containerd"),
        "{stderr}"
    );
    nothing_left(&dir, &real);

    // Too few free ports for the control plane: every port of the range taken (the test holds
    // them, or something else already does); stopped before anything starts, with what to do.
    let first = 40000 + (std::process::id() % 2000) as u16 * 8;
    let range = format!("{first}-{}", first + 7);
    let held: Vec<_> = (first..first + 8)
        .filter_map(|port| std::net::TcpListener::bind(("127.0.0.1", port)).ok())
        .collect();
    assert!(!held.is_empty(), "could not hold any port of {range}");
    let taken = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/hack/real-cluster.sh"))
        .arg("up")
        .env("LOOPGUARD_CLUSTER_DIR", &dir)
        .env("LOOPGUARD_PORT_RANGE", &range)
        .output()
        .unwrap();
    drop(held);
    let stderr = String::from_utf8_lossy(&taken.stderr);
    assert!(
        !taken.status.success()
            && stderr.contains(&format!("0 of the ports {range} are free"))
            && stderr.contains("LOOPGUARD_PORT_RANGE"),
        "{stderr}"
    );
    nothing_left(&dir, &real);
}

/// Nothing of a cluster that was refused: no process, no namespace of its names, no state dir.
fn nothing_left(dir: &Path, real: &RealCluster) {
    let left = support::cluster::processes_under(dir);
    assert!(left.is_empty(), "started anyway: {left:#?}");
    assert!(!dir.exists(), "{} made anyway", dir.display());
    for ns in std::iter::once(real.router()).chain(real.nodes.iter().cloned()) {
        assert!(
            !Path::new("/run/netns").join(&ns).exists(),
            "namespace {ns} left behind"
        );
    }
}

/// Every path under `dir`, itself excluded.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() {
            found.extend(walk(&path));
        }
        found.push(path);
    }
    found
}

/// `loopguard_agent_check_duration_seconds`'s sum and count from the node's agent.
fn check_seconds(node: &str) -> (f64, f64) {
    let out = Command::new("ip")
        .args(["netns", "exec", node, "curl", "-fsS", "--max-time", "10"])
        .arg(format!("http://{}:9742/metrics", deploy::node_ipv4(node)))
        .output()
        .unwrap();
    assert!(out.status.success(), "metrics of {node}'s agent: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {node}'s metrics"))
    };
    (
        value("loopguard_agent_check_duration_seconds_sum"),
        value("loopguard_agent_check_duration_seconds_count"),
    )
}

/// Fills (`Some(n)`: a chain LGBIG of `n` rules nothing jumps to) or removes (`None`) a chain of
/// the test's own in the node's ip6tables filter table, under the cluster's xtables lock.
fn big_chain(real: &RealCluster, node: &str, backend: &str, rules: Option<usize>) {
    let command = |args: &[&str]| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", node])
            .env("XTABLES_LOCKFILE", &real.xtables_lock)
            .args(args);
        c
    };
    match rules {
        Some(n) => {
            let mut input = String::from("*filter\n:LGBIG - [0:0]\n");
            for i in 0..n {
                input.push_str(&format!(
                    "-A LGBIG -s 2001:db8::{:x}:{:x}/128 -j RETURN\n",
                    i >> 16,
                    i & 0xffff
                ));
            }
            input.push_str("COMMIT\n");
            let restore = format!("ip6tables-{backend}-restore");
            support::run(command(&[&restore, "-w", "30", "--noflush"]), Some(&input));
        }
        None => {
            let ip6tables = format!("ip6tables-{backend}");
            for args in [["-F", "LGBIG"], ["-X", "LGBIG"]] {
                support::run(command(&[&ip6tables, "-w", "30", args[0], args[1]]), None);
            }
        }
    }
}
