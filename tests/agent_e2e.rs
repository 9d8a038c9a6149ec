//! End to end: loopguard installed from its Helm chart on a real control plane of its own, with
//! hollow nodes (each a network namespace) running the real agent, on a mix of backends.

mod support;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use loopguard::api::{Compliance, LoopbackNodeState, LoopbackNodeStateStatus, LoopbackPolicy};
use serde_json::json;
use std::time::{Duration, Instant};
use support::cluster::{Cluster, eventually};
use support::deploy::{self, chain, delete_and_time_repair, in_node, save};
use support::netns::scanner_passes;

const NS: &str = "loopguard-system";
const ACCEPT_IN: &str = "-A INPUT -i lo -j ACCEPT";
const DROP_SRC: &str = "-A INPUT -s ::1/128 -j DROP";
const ACCEPT_OUT: &str = "-A OUTPUT -o lo -j ACCEPT";

/// Prints the tail of every container log (agents, controllers) when the test fails: the cluster
/// and its files are gone afterwards.
struct DumpLogsOnPanic(std::path::PathBuf);

impl Drop for DumpLogsOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for entry in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!(
                "--- {} (last 40 lines)",
                entry.file_name().to_string_lossy()
            );
            for line in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{line}");
            }
        }
    }
}

struct Nodes {
    legacy: String,
    nft: String,
    no_ipv6: String,
    seeded: String,
}

async fn state(client: &Client, node: &str) -> Option<LoopbackNodeStateStatus> {
    Api::<LoopbackNodeState>::all(client.clone())
        .get_opt(node)
        .await
        .ok()??
        .status
}

async fn wait_state(
    client: &Client,
    node: &str,
    what: &str,
    check: impl Fn(&LoopbackNodeStateStatus) -> bool,
) -> LoopbackNodeStateStatus {
    eventually(
        &format!("{node}: {what}"),
        Duration::from_secs(60),
        || async { state(client, node).await.filter(|s| check(s)) },
    )
    .await
}

/// What a user runs: `kubectl wait --for=condition=Compliant lbp/baseline`.
fn wait_compliant(cluster: &Cluster) {
    cluster.kubectl_ok(
        &[
            "wait",
            "--for=condition=Compliant",
            "lbp/baseline",
            "--timeout=60s",
        ],
        None,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopguard_end_to_end_on_hollow_nodes() {
    // A control plane of its own: this test stops the API server.
    let Some(cluster) = support::cluster::private("e2e") else {
        return;
    };
    let client = cluster.client().await;

    // Four nodes: one on the legacy backend (it already has legacy rules), one nft, one with IPv6
    // off, one where the CIS script already ran (rules to adopt). All are iptables hosts.
    let options = deploy::iptables_hosts(&cluster, "e2e", 4, ("loopguard.dev/e2e", "yes"));
    let names = options.nodes.clone();
    let _dump = DumpLogsOnPanic(options.state_dir.join("logs"));
    let hollow = cluster.start_nodes(options).await;
    let n = Nodes {
        legacy: names[0].clone(),
        nft: names[1].clone(),
        no_ipv6: names[2].clone(),
        seeded: names[3].clone(),
    };
    in_node(
        &n.legacy,
        &[
            "ip6tables-legacy",
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            "22",
            "-j",
            "ACCEPT",
        ],
    );
    in_node(
        &n.no_ipv6,
        &["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"],
    );
    let seed_bin = tempfile::tempdir().unwrap();
    support::run(
        support::netns::seed_script(&n.seeded, "nft", seed_bin.path()),
        None,
    );
    let seeded_before = save(&n.seeded, "nft");
    assert!(scanner_passes(&n.seeded, "nft"));

    deploy::install(
        &cluster,
        NS,
        &[
            "agent.resync=1",
            "controller.leaseDuration=5",
            "controller.cleanupTimeout=60",
            "logFormat=plain",
        ],
    );
    deploy::wait_agents_ready(&client, NS, &names).await;

    // A policy: Compliant, with the IPv6-off node NotApplicable.
    let policies: Api<LoopbackPolicy> = Api::all(client.clone());
    let policy: LoopbackPolicy = serde_json::from_value(json!({
        "apiVersion": "loopguard.dev/v1alpha1", "kind": "LoopbackPolicy",
        "metadata": {"name": "baseline"},
        "spec": {"nodeSelector": {"matchLabels": {"loopguard.dev/e2e": "yes"}}},
    }))
    .unwrap();
    let applied = Instant::now();
    policies
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    wait_compliant(&cluster);
    println!(
        "kubectl apply → Compliant=True on 4 nodes: {:?}",
        applied.elapsed()
    );
    let p = policies.get("baseline").await.unwrap();
    let s = p.status.unwrap();
    assert_eq!(
        (s.targeted_nodes, s.compliant_nodes, s.not_applicable_nodes),
        (4, 3, 1)
    );
    assert_eq!(
        state(&client, &n.legacy).await.unwrap().backend.as_deref(),
        Some("iptables-legacy")
    );
    assert_eq!(
        state(&client, &n.nft).await.unwrap().backend.as_deref(),
        Some("iptables-nft")
    );
    let na = state(&client, &n.no_ipv6).await.unwrap();
    assert_eq!(na.compliance, Compliance::NotApplicable);
    assert!(na.message.contains("IPv6 is disabled"), "{}", na.message);
    assert!(
        chain(&n.no_ipv6, "nft", "INPUT").is_empty(),
        "nothing written where the rule does not apply"
    );
    assert!(scanner_passes(&n.legacy, "legacy"));
    assert!(scanner_passes(&n.nft, "nft"));
    assert_eq!(
        save(&n.seeded, "nft"),
        seeded_before,
        "adopted, not rewritten"
    );
    let seeded = state(&client, &n.seeded).await.unwrap();
    assert!(
        seeded.rules.iter().all(|r| !r.owned),
        "the seed's rules are adopted: {:?}",
        seeded.rules
    );
    assert!(
        state(&client, &n.nft)
            .await
            .unwrap()
            .rules
            .iter()
            .all(|r| r.owned)
    );
    let table = cluster.kubectl_ok(&["get", "lbp,lbns"], None);
    println!("{table}");

    // Drift: a rule deleted by hand is back within a second, counted, and an Event says so.
    let took = delete_and_time_repair(&n.nft, "nft", Duration::from_secs(1));
    println!("nft node: deleted rule back after {took:?}");
    let took = delete_and_time_repair(&n.legacy, "legacy", Duration::from_secs(3));
    println!("legacy node (1 s polling): deleted rule back after {took:?}");
    let repaired = wait_state(&client, &n.nft, "repair counted", |s| s.repairs == 1).await;
    assert!(repaired.last_repair_time.is_some());
    eventually("DriftRepaired event", Duration::from_secs(30), || async {
        let events: Api<K8sEvent> = Api::namespaced(client.clone(), "default");
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("DriftRepaired")
                    && e.note.as_deref().is_some_and(|n2| n2.contains(&n.nft))
            })
            .then_some(())
    })
    .await;

    // Audit: reports, writes nothing; back to Enforce repairs.
    let set_mode = |mode: &'static str| {
        let policies = policies.clone();
        async move {
            let patch = json!({"spec": {"mode": mode}});
            policies
                .patch("baseline", &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
        }
    };
    set_mode("Audit").await;
    wait_state(&client, &n.nft, "audit generation", |s| {
        s.policy_generation == Some(2)
    })
    .await;
    deploy::delete_drop_rule(&n.nft, "nft");
    let audit = wait_state(&client, &n.nft, "audit finding", |s| {
        s.compliance == Compliance::NonCompliant
    })
    .await;
    assert_eq!(audit.reason, "AuditFindings");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !chain(&n.nft, "nft", "INPUT").iter().any(|r| r == DROP_SRC),
        "Audit never writes"
    );
    eventually(
        "policy not compliant in audit",
        Duration::from_secs(30),
        || async {
            let s = policies.get("baseline").await.ok()?.status?;
            (s.non_compliant_node_names == vec![n.nft.clone()]).then_some(())
        },
    )
    .await;
    set_mode("Enforce").await;
    wait_state(&client, &n.nft, "enforced again", |s| {
        s.policy_generation == Some(3) && s.compliance == Compliance::Compliant
    })
    .await;
    assert!(scanner_passes(&n.nft, "nft"));

    // Restarting every agent (a rolling update) changes no rule.
    let rulesets = || -> Vec<String> {
        [(&n.legacy, "legacy"), (&n.nft, "nft"), (&n.seeded, "nft")]
            .iter()
            .map(|(node, backend)| save(node, backend))
            .collect()
    };
    let before = rulesets();
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let old: Vec<String> = pods
        .list(&ListParams::default().labels(deploy::AGENT_SELECTOR))
        .await
        .unwrap()
        .items
        .iter()
        .map(|p| p.name_any())
        .collect();
    for pod in &old {
        pods.delete(pod, &DeleteParams::default()).await.unwrap();
    }
    eventually("old agents gone", Duration::from_secs(60), || async {
        let list = pods
            .list(&ListParams::default().labels(deploy::AGENT_SELECTOR))
            .await
            .ok()?;
        (!list.items.iter().any(|p| old.contains(&p.name_any()))).then_some(())
    })
    .await;
    deploy::wait_agents_ready(&client, NS, &names).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rulesets();
    assert_eq!(before, after, "restarting the agents changed rules");

    // The API server is down for 30 s while a rule is deleted: repaired anyway; status right after.
    let repairs_before = state(&client, &n.nft).await.unwrap().repairs;
    cluster.stop_apiserver();
    let outage = Instant::now();
    let took = delete_and_time_repair(&n.nft, "nft", Duration::from_secs(2));
    println!("during the API outage: rule back after {took:?}");
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(outage.elapsed())).await;
    cluster.start_apiserver();
    let client = cluster.client().await;
    let policies: Api<LoopbackPolicy> = Api::all(client.clone());

    // The legacy node is relabelled out of the selector at once, while the agents' watches are
    // still backing off: its agent learns of it from the re-list that follows.
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch(
            &n.legacy,
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {"loopguard.dev/e2e": null}}})),
        )
        .await
        .unwrap();
    let relabelled = Instant::now();
    let s = wait_state(&client, &n.nft, "repair reported after the outage", |s| {
        s.repairs == repairs_before + 1
    })
    .await;
    assert_eq!(s.compliance, Compliance::Compliant);
    let s = wait_state(&client, &n.legacy, "unmanaged after the outage", |s| {
        s.compliance == Compliance::Unmanaged
    })
    .await;
    println!(
        "relabelled right after the outage: node unmanaged after {:?}",
        relabelled.elapsed()
    );
    assert_eq!(s.reason, "RulesRemoved");
    assert_eq!(
        chain(&n.legacy, "legacy", "INPUT"),
        vec!["-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT"],
        "only loopguard's rules went"
    );
    assert!(chain(&n.legacy, "legacy", "OUTPUT").is_empty());
    wait_compliant(&cluster);

    // Deleting the policy removes what loopguard inserted and keeps what it adopted.
    policies
        .delete("baseline", &DeleteParams::default())
        .await
        .unwrap();
    eventually("policy gone", Duration::from_secs(60), || async {
        policies
            .get_opt("baseline")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert!(chain(&n.nft, "nft", "INPUT").is_empty() && chain(&n.nft, "nft", "OUTPUT").is_empty());
    assert_eq!(save(&n.seeded, "nft"), seeded_before, "adopted rules stay");
    assert_eq!(chain(&n.seeded, "nft", "OUTPUT"), vec![ACCEPT_OUT]);
    assert_eq!(chain(&n.seeded, "nft", "INPUT"), vec![ACCEPT_IN, DROP_SRC]);
    for node in [&n.nft, &n.seeded] {
        assert_eq!(
            state(&client, node).await.unwrap().compliance,
            Compliance::Unmanaged
        );
    }

    hollow.shutdown(Duration::from_secs(5)).await.unwrap();
}
