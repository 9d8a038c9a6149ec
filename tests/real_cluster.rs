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
use std::time::{Duration, Instant};
use support::cluster::{RealCluster, eventually};
use support::deploy::{self, chain};
use support::netns::scanner_passes;

const NS: &str = "loopguard-system";
const CONTROLLER_SELECTOR: &str = "app.kubernetes.io/component=controller";
const PAIR: [&str; 2] = ["-A INPUT -i lo -j ACCEPT", "-A INPUT -s ::1/128 -j DROP"];

/// The default example policy (every node, each the loopback rule that applies to it), with a
/// node selector.
fn policy(selector: &str) -> String {
    format!(
        "apiVersion: loopguard.dev/v1alpha1
kind: LoopbackPolicy
metadata:
  name: baseline
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

    // helm install --wait: the agents and two controller replicas, all on real nodes.
    let installed = Instant::now();
    let roots = format!("agent.perNodeHostRoots={}", real.node_roots.display());
    deploy::helm(
        cluster,
        &[
            "install",
            deploy::RELEASE,
            deploy::CHART,
            "--namespace",
            NS,
            "--create-namespace",
            "--wait",
            "--timeout",
            "5m",
            "--set",
            &roots,
            "--set",
            "controller.replicas=2",
            "--set",
            "agent.resync=2",
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
        PAIR.iter().all(|r| input.contains(&r.to_string())),
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
        !PAIR.iter().any(|r| input.contains(&r.to_string())),
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
    cluster.kubectl_ok(
        &[
            "wait",
            "--for=condition=Compliant",
            "lbp/baseline",
            "--timeout=120s",
        ],
        None,
    );

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
        !PAIR.iter().any(|r| input.contains(&r.to_string())),
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

    taken_down_completely(real);
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
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let environ = std::fs::read(e.path().join("environ")).ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        if !cmdline.starts_with(b"/usr/local/bin/loopguard\0") {
            return None;
        }
        let vars: Vec<String> = environ
            .split(|b| *b == 0)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        vars.contains(&wanted).then_some(vars)
    })
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

/// `hack/real-cluster.sh down`: no namespace, process or mount of the cluster left.
fn taken_down_completely(real: RealCluster) {
    let dir = real.cluster.dir.clone();
    let nodes = real.nodes.clone();
    drop(real);
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
