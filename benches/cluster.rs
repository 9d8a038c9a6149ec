//! loopguard in a cluster: time from `kubectl apply` of a policy to `Compliant=True` for 3, 10 and
//! 50 nodes, drift-repair latency through the whole stack, API requests per node per hour at steady
//! state (from kube-apiserver's own metrics), and the agent's resident memory at idle.
//!
//! `cargo bench --bench cluster` (as root, with the control-plane binaries built: hack/cluster.sh up
//! builds them). Starts a control plane of its own, installs the chart, runs hollow nodes.

#[path = "../tests/support/mod.rs"]
mod support;

use kube::api::{Api, DeleteParams, PostParams};
use loopguard::api::LoopbackPolicy;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use support::cluster::eventually;
use support::deploy;

const NS: &str = "loopguard-system";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Some(cluster) = support::cluster::private("bench") else {
        eprintln!("cluster benchmark skipped: build the control plane first (hack/cluster.sh up)");
        return;
    };
    let client = cluster.client().await;
    // One node that lives through the whole run, for the controller: a controller pod whose node
    // goes away is only replaced once the pod garbage collector removes the orphan (~40 s).
    let infra_options = deploy::with_image(cluster.hollow_options("infra", 1));
    let infra_nodes = infra_options.nodes.clone();
    let infra = cluster.start_nodes(infra_options).await;
    deploy::install(&cluster, NS, &["logFormat=plain", "controller.replicas=1"]);
    deploy::wait_agents_ready(&client, NS, &infra_nodes).await;
    println!(
        "loopguard cluster benchmark: control plane v1.37.2 on 127.0.0.1, hollow nodes (one network namespace each, nft backend), chart defaults (controller coalesces 500 ms)"
    );
    println!(
        "machine: {} cores\n",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );

    let mut rows = Vec::new();
    for nodes in [3usize, 10, 50] {
        let options = deploy::iptables_hosts(
            &cluster,
            &format!("b{nodes}"),
            nodes,
            ("loopguard.dev/bench", &nodes.to_string()),
        );
        let names = options.nodes.clone();
        let started = Instant::now();
        let hollow = cluster.start_nodes(options).await;
        deploy::wait_agents_ready(&client, NS, &names).await;
        println!(
            "{nodes} nodes: registered, and an agent Ready on each, in {:.1} s",
            started.elapsed().as_secs_f64()
        );

        let policies: Api<LoopbackPolicy> = Api::all(client.clone());
        let name = format!("bench-{nodes}");
        let policy: LoopbackPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "loopguard.dev/v1alpha1", "kind": "LoopbackPolicy", "metadata": {"name": name},
            "spec": {"nodeSelector": {"matchLabels": {"loopguard.dev/bench": nodes.to_string()}}},
        }))
        .unwrap();
        let started = Instant::now();
        policies
            .create(&PostParams::default(), &policy)
            .await
            .unwrap();
        loop {
            let p = policies.get(&name).await.unwrap();
            let compliant = p.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Compliant" && c.reason == "AllNodesCompliant")
            });
            if compliant {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(180),
                "{name} not compliant"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let to_compliant = started.elapsed();
        println!(
            "{nodes} nodes: kubectl apply → Compliant=True in {:.2} s",
            to_compliant.as_secs_f64()
        );

        let mut extra = String::new();
        if nodes == 10 {
            extra = steady_state(&cluster, nodes).await;
            let latencies = repair_latencies(&names[0], 15);
            extra.push_str(&format!(
                "drift repair through the agent (rule deleted → back, 15 times): {latencies}\n"
            ));
            let rss: Vec<u64> = deploy::agent_pids()
                .iter()
                .filter_map(|p| deploy::rss_kib(*p))
                .collect();
            let avg = rss.iter().sum::<u64>() as f64 / rss.len().max(1) as f64 / 1024.0;
            let max = rss.iter().max().copied().unwrap_or(0) as f64 / 1024.0;
            extra.push_str(&format!("agent resident memory at idle: {avg:.1} MiB average, {max:.1} MiB max over {} agents\n", rss.len()));
        }
        rows.push((nodes, to_compliant));
        print!("{extra}");
        policies
            .delete(&name, &DeleteParams::default())
            .await
            .unwrap();
        eventually("policy gone", Duration::from_secs(120), || async {
            policies.get_opt(&name).await.ok()?.is_none().then_some(())
        })
        .await;
        hollow.shutdown(Duration::from_secs(5)).await.unwrap();
    }
    infra.shutdown(Duration::from_secs(5)).await.unwrap();
    println!("\n| nodes | kubectl apply → Compliant=True |\n|---:|---:|");
    for (nodes, took) in rows {
        println!("| {nodes} | {:.2} s |", took.as_secs_f64());
    }
}

/// Deletes the DROP rule on `node` `times` times; median, p90 and max of delete → rule back.
fn repair_latencies(node: &str, times: usize) -> String {
    let mut samples = Vec::new();
    for _ in 0..times {
        samples.push(deploy::delete_and_time_repair(
            node,
            "nft",
            Duration::from_secs(5),
        ));
        std::thread::sleep(Duration::from_millis(100));
    }
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "median {:.1} ms, p90 {:.1} ms, max {:.1} ms (each sample includes ~3 ms of polling with ip6tables -S)",
        ms(samples[times / 2]),
        ms(samples[times * 9 / 10]),
        ms(samples[times - 1])
    )
}

/// API requests to loopguard's resources and to nodes over two idle minutes, per node per hour.
async fn steady_state(cluster: &support::cluster::Cluster, nodes: usize) -> String {
    tokio::time::sleep(Duration::from_secs(10)).await;
    let before = request_counts(cluster);
    let window = Duration::from_secs(120);
    tokio::time::sleep(window).await;
    let after = request_counts(cluster);
    let per_node_hour = |key: &(String, String)| {
        let delta =
            after.get(key).copied().unwrap_or(0.0) - before.get(key).copied().unwrap_or(0.0);
        delta / nodes as f64 * 3600.0 / window.as_secs_f64()
    };
    let mut out = format!(
        "steady state over {}s with {nodes} compliant nodes, requests per node per hour (all clients: agents, controller, hollow kubelets):\n",
        window.as_secs()
    );
    let mut keys: Vec<&(String, String)> = after.keys().collect();
    keys.sort();
    for key in keys {
        let rate = per_node_hour(key);
        out.push_str(&format!("  {:<28} {:<8} {rate:.1}\n", key.0, key.1));
    }
    out
}

/// `apiserver_request_total` summed by (resource, verb) for the resources loopguard uses.
fn request_counts(cluster: &support::cluster::Cluster) -> BTreeMap<(String, String), f64> {
    let out = cluster
        .kubectl()
        .args(["get", "--raw", "/metrics"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut counts = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let label = |name: &str| {
            let start = line.find(&format!("{name}=\""))? + name.len() + 2;
            Some(line[start..].split('"').next()?.to_string())
        };
        let (Some(resource), Some(verb), Some(subresource)) =
            (label("resource"), label("verb"), label("subresource"))
        else {
            continue;
        };
        if !["loopbacknodestates", "loopbackpolicies", "nodes", "leases"]
            .contains(&resource.as_str())
        {
            continue;
        }
        let resource = if subresource.is_empty() {
            resource
        } else {
            format!("{resource}/{subresource}")
        };
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *counts.entry((resource, verb)).or_insert(0.0) += value;
    }
    counts
}
