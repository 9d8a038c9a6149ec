//! One policy, whichever firewall, end to end: the chart on hollow nodes of a control plane of
//! its own, one node where only iptables is installed (the seed's rule applies) and one with
//! nftables too (the nftables rule applies instead). A policy with `ruleFamilies.nftables:
//! Enforce` makes both pass the rule that applies to them; each node state lists every rule with
//! its verdict; a flushed ruleset is repaired; deleting the policy removes loopguard's table and
//! rules and nothing else; the API refuses `firewalld: Enforce` with a message.

mod support;

use kube::api::{Api, DeleteParams, PostParams};
use loopguard::api::{Compliance, LoopbackNodeState, LoopbackNodeStateStatus, LoopbackPolicy};
use serde_json::json;
use std::time::Duration;
use support::cluster::eventually;
use support::deploy::{self, chain, has_loopguard_table, in_node, nft_ruleset};
use support::netns::scanner_passes;

const NS: &str = "loopguard-system";

fn check<'a>(status: &'a LoopbackNodeStateStatus, id: &str) -> &'a loopguard::api::RuleCheck {
    status
        .checks
        .iter()
        .find(|c| c.id == id)
        .unwrap_or_else(|| panic!("no {id} in {:?}", status.checks))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_policy_makes_every_node_pass_the_rule_that_applies_to_it() {
    let Some(cluster) = support::cluster::private("fam") else {
        return;
    };
    let client = cluster.client().await;
    let options = deploy::iptables_hosts(&cluster, "fam", 2, ("loopguard.dev/fam", "yes"));
    let names = options.nodes.clone();
    let (seed_node, nft_node) = (names[0].clone(), names[1].clone());
    deploy::install_packages(&options.node_root(&nft_node), &["iptables", "nftables"]);
    let hollow = cluster.start_nodes(options).await;
    deploy::install(
        &cluster,
        NS,
        &[
            "agent.resync=600",
            "logFormat=plain",
            "controller.leaseDuration=5",
        ],
    );
    deploy::wait_agents_ready(&client, NS, &names).await;

    // The API refuses what loopguard will never do.
    let mut kubectl = cluster.kubectl();
    kubectl.args(["apply", "-f", "-"]);
    let refused = support::output(
        kubectl,
        Some(
            r#"{"apiVersion": "loopguard.dev/v1alpha1", "kind": "LoopbackPolicy",
                "metadata": {"name": "bad"}, "spec": {"ruleFamilies": {"firewalld": "Enforce"}}}"#,
        ),
    );
    assert!(!refused.status.success(), "firewalld: Enforce accepted");
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("loopguard never touches firewalld's zones"),
        "{refused:?}"
    );

    let policies: Api<LoopbackPolicy> = Api::all(client.clone());
    let policy: LoopbackPolicy = serde_json::from_value(json!({
        "apiVersion": "loopguard.dev/v1alpha1", "kind": "LoopbackPolicy",
        "metadata": {"name": "fleet"},
        "spec": {
            "nodeSelector": {"matchLabels": {"loopguard.dev/fam": "yes"}},
            "ruleFamilies": {"nftables": "Enforce", "ufw": "Report"},
        },
    }))
    .unwrap();
    policies
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    cluster.wait_compliant("fleet", "60s");
    // A Windows node the policy selects: no agent can run there; it is named, never waited for.
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let windows: k8s_openapi::api::core::v1::Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "fam-win-1", "labels": {
            "kubernetes.io/os": "windows", "loopguard.dev/fam": "yes"}},
    }))
    .unwrap();
    nodes
        .create(&PostParams::default(), &windows)
        .await
        .unwrap();
    let status = eventually(
        "the Windows node counted Unsupported",
        Duration::from_secs(30),
        || async {
            let status = policies.get("fleet").await.ok()?.status?;
            (status.unsupported_nodes == 1).then_some(status)
        },
    )
    .await;
    assert_eq!(
        status.unsupported_node_names,
        ["fam-win-1 (kubernetes.io/os=windows)"]
    );
    assert_eq!((status.targeted_nodes, status.pending_nodes), (2, 0));
    let compliant = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Compliant")
        .unwrap();
    assert_eq!(
        format!("{:?}", compliant.status),
        "True",
        "{}",
        compliant.message
    );
    assert!(
        compliant.message.contains("fam-win-1"),
        "{}",
        compliant.message
    );
    // The policy counts the nodes per rule id.
    let tally = |id: &str| {
        status
            .rules
            .iter()
            .find(|r| r.id == id)
            .cloned()
            .unwrap_or_else(|| panic!("no {id} in {:?}", status.rules))
    };
    let seed = tally("set_ipv6_loopback_traffic");
    assert_eq!((seed.pass, seed.not_applicable), (1, 1), "{seed:?}");
    let nft_rule = tally("set_nftables_loopback_traffic");
    assert_eq!(
        (nft_rule.pass, nft_rule.not_applicable),
        (1, 1),
        "{nft_rule:?}"
    );
    nodes
        .delete("fam-win-1", &DeleteParams::default())
        .await
        .unwrap();

    let states: Api<LoopbackNodeState> = Api::all(client.clone());
    let state = |node: String| {
        let states = states.clone();
        async move { states.get(&node).await.ok()?.status }
    };

    // The seed's rule where only iptables is installed; the nftables rule where nftables is.
    let seeded = state(seed_node.clone()).await.unwrap();
    assert_eq!(seeded.compliance, Compliance::Compliant);
    assert_eq!(check(&seeded, "set_ipv6_loopback_traffic").verdict, "Pass");
    assert_eq!(
        check(&seeded, "set_nftables_loopback_traffic").verdict,
        "NotApplicable"
    );
    assert!(scanner_passes(&seed_node, "nft"));
    assert!(
        !has_loopguard_table(&seed_node),
        "no table where the rule does not apply"
    );

    let nft = state(nft_node.clone()).await.unwrap();
    assert_eq!(nft.compliance, Compliance::Compliant, "{nft:?}");
    let rule = check(&nft, "set_nftables_loopback_traffic");
    assert_eq!((rule.verdict.as_str(), rule.applies), ("Pass", Some(true)));
    assert!(rule.cis.iter().any(|c| c == "ubuntu2404:4.3.6"), "{rule:?}");
    let seed_rule = check(&nft, "set_ipv6_loopback_traffic");
    assert_eq!(seed_rule.verdict, "NotApplicable");
    assert!(
        seed_rule.why.contains("nftables is installed"),
        "{seed_rule:?}"
    );
    assert_eq!(
        check(&nft, "set_ufw_loopback_traffic").verdict,
        "NotApplicable"
    );
    assert!(has_loopguard_table(&nft_node));
    assert!(
        chain(&nft_node, "nft", "INPUT").is_empty(),
        "no ip6tables rules where the seed's rule does not apply"
    );

    // `kubectl get lbns` shows which rule each node carries.
    let listed = cluster.kubectl_ok(&["get", "lbns", &seed_node, &nft_node], None);
    let row = |node: &str| {
        listed
            .lines()
            .find(|l| l.starts_with(node))
            .unwrap_or_else(|| panic!("{node} not in {listed}"))
            .to_string()
    };
    assert!(listed.lines().next().unwrap().contains("RULES"), "{listed}");
    assert!(row(&seed_node).contains(" iptables=Pass "), "{listed}");
    assert!(row(&nft_node).contains(" nftables=Pass "), "{listed}");
    assert!(!row(&nft_node).contains("iptables="), "{listed}");

    // Debian's nftables.service reload flushes the ruleset: the table comes back at once.
    in_node(&nft_node, &["nft", "flush", "ruleset"]);
    eventually(
        "the table back after a flush",
        Duration::from_secs(10),
        || async { has_loopguard_table(&nft_node).then_some(()) },
    )
    .await;

    // Deleting the policy removes loopguard's table and rules, and nothing else.
    in_node(&nft_node, &["nft", "add", "table", "inet", "theirs"]);
    policies
        .delete("fleet", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the policy gone", Duration::from_secs(60), || async {
        policies
            .get_opt("fleet")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        !has_loopguard_table(&nft_node),
        "{}",
        nft_ruleset(&nft_node)
    );
    assert!(nft_ruleset(&nft_node).contains("table inet theirs"));
    assert!(chain(&seed_node, "nft", "INPUT").is_empty());
    hollow.shutdown(Duration::from_secs(5)).await.unwrap();
}
