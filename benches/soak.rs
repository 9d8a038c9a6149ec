//! loopguard beside kube-proxy on a real cluster; writes the "Beside kube-proxy" section of
//! BENCHMARKS.md (`cargo bench --bench soak`, as root, control-plane binaries built: 10 minutes of
//! churn; `-- --quick`: the same code for 2 minutes, and it writes nothing).
//!
//! The three real nodes of `hack/real-cluster.sh` (kube-proxy in iptables mode on the legacy
//! backend, in iptables mode on nft, in nftables mode), the chart from the image, one policy that
//! enforces the seed's rules on every node and loopguard's nftables table where nftables is
//! installed. Then Services (NodePort, dual-stack) and their EndpointSlices are created, scaled and
//! deleted all through the window, so kube-proxy rewrites its rules many times a minute. Throughout:
//! loopguard's rules are watched on every node without forking `ip6tables` (the legacy node's
//! kernel table read every 5 ms; every nftables event on the nft nodes, where a deleted rule of
//! loopguard's shows as an event); afterwards, from the agents' and kube-proxy's own metrics and
//! logs: loopguard wrote nothing after its first enforce (no restore, only heartbeat status writes,
//! no repair), every write it ever logged names only its own rules, kube-proxy had no failed sync
//! and logged no error. Any of those failing fails the bench (and CI, which runs `--quick`).

#[path = "support/render.rs"]
mod render;
#[path = "support/report.rs"]
mod report;
#[path = "../tests/support/mod.rs"]
mod support;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use render::{Meta, SoakNode, SoakRun};
use serde_json::json;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use support::cluster::{RealCluster, eventually};
use support::deploy;
use support::watch::{self, RULES};

const NS: &str = "loopguard-system";
const CHURN_NS: &str = "soak";
/// The chart's default `agent.heartbeatInterval`.
const HEARTBEAT_S: u64 = 600;
const METRICS_PORT: u16 = 9742;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let window = Duration::from_secs(if report::quick() { 120 } else { 600 });
    let meta = Meta {
        date: report::today(),
        commit: report::commit(),
        machine: report::machine(),
    };
    let archive = deploy::image_archive();
    let real = support::cluster::real("soak", &[&archive])
        .expect("no control plane: build it first (hack/cluster.sh up builds the binaries)");
    let cluster = &real.cluster;
    let client = cluster.client().await;
    deploy::install_on_real(&real, &[]);
    cluster.kubectl_ok(
        &["apply", "-f", "-"],
        Some(
            "apiVersion: loopguard.dev/v1alpha1
kind: LoopbackPolicy
metadata:
  name: soak
spec:
  applicability: Always
  ruleFamilies:
    nftables: Enforce
",
        ),
    );
    let [legacy, nft, nftables] = [&real.nodes[0], &real.nodes[1], &real.nodes[2]];
    eventually(
        "loopguard's rules on every node",
        Duration::from_secs(180),
        || async {
            (deploy::has_seed_rules(legacy, "legacy")
                && deploy::has_seed_rules(nft, "nft")
                && deploy::has_seed_rules(nftables, "nft")
                && deploy::has_loopguard_table(nftables))
            .then_some(())
        },
    )
    .await;
    // The first enforce's status writes land right after the rules.
    tokio::time::sleep(Duration::from_secs(15)).await;
    cluster.kubectl_ok(&["create", "namespace", CHURN_NS], None);

    let before: Vec<Counters> = real
        .nodes
        .iter()
        .map(|n| Counters::read(&real, n))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let legacy_watch = watch::watch_legacy(legacy, stop.clone());
    let nft_watches = [nft, nftables].map(|n| watch::NftWatch::start(n));
    println!(
        "soak: churning Services for {window:?} on {}",
        real.nodes.join(", ")
    );
    let churn = churn(&client, window).await;
    // kube-proxy's last sync of the window, and any late reaction of loopguard's, land.
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::SeqCst);
    let after: Vec<Counters> = real
        .nodes
        .iter()
        .map(|n| Counters::read(&real, n))
        .collect();

    let mut watched = vec![legacy_watch.join().expect("the legacy sampler")];
    watched.extend(nft_watches.map(watch::NftWatch::finish));
    let modes = ["iptables/legacy", "iptables/nft", "nftables/nft"];
    let nodes: Vec<SoakNode> = real
        .nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let (b, a) = (&before[i], &after[i]);
            let (logged_writes, foreign_edits) = logged_writes(&real, node);
            SoakNode {
                node: node.clone(),
                kube_proxy: modes[i].into(),
                sampled_from: watched[i].how.into(),
                samples: watched[i].samples,
                missing: watched[i].missing,
                kube_proxy_syncs: a.syncs - b.syncs,
                kube_proxy_failures: a.failures - b.failures,
                kube_proxy_errors: errors_since(&real, node, b.log_offset),
                loopguard_writes: a.writes - b.writes,
                status_writes: a.status_writes - b.status_writes,
                repairs: a.repairs - b.repairs,
                logged_writes,
                foreign_edits,
            }
        })
        .collect();
    let run = report::kept(&SoakRun {
        meta,
        window_s: window.as_secs(),
        heartbeat_s: HEARTBEAT_S,
        services_created: churn.created,
        services_scaled: churn.scaled,
        services_deleted: churn.deleted,
        nodes,
    });
    let (section, headline) = render::render_soak(&run);
    let broken = broken_promises(&run, &after);
    if !broken.is_empty() {
        println!("{section}");
        panic!("the soak broke a promise:\n{}", broken.join("\n"));
    }
    report::publish("soak", &run, &section, &headline);
    drop(real);
}

/// What the soak promises, and which of it this run broke (each fails the bench).
fn broken_promises(run: &SoakRun, after: &[Counters]) -> Vec<String> {
    let heartbeats = run.window_s / run.heartbeat_s + 1;
    let mut broken = Vec::new();
    for (n, counters) in run.nodes.iter().zip(after) {
        let mut fail = |ok: bool, what: String| {
            if !ok {
                broken.push(format!("{} ({}): {what}", n.node, n.kube_proxy));
            }
        };
        fail(n.samples > 0, "loopguard's rules were never sampled".into());
        fail(
            n.missing == 0,
            format!("{} samples without loopguard's rules", n.missing),
        );
        fail(
            n.loopguard_writes == 0,
            format!("{} writes after the first enforce", n.loopguard_writes),
        );
        fail(n.repairs == 0, format!("{} repairs", n.repairs));
        fail(
            n.status_writes <= heartbeats,
            format!(
                "{} status writes in {} s (heartbeat {} s)",
                n.status_writes, run.window_s, run.heartbeat_s
            ),
        );
        // The log check has something to look at: the first enforce wrote.
        fail(n.logged_writes > 0, "no write of loopguard's logged".into());
        fail(
            n.foreign_edits == 0,
            format!("{} writes naming a rule not loopguard's", n.foreign_edits),
        );
        fail(counters.not_converging == 0, "NotConverging".into());
        fail(
            n.kube_proxy_failures == 0,
            format!("{} failed kube-proxy syncs", n.kube_proxy_failures),
        );
        fail(
            n.kube_proxy_errors == 0,
            format!("{} kube-proxy error lines", n.kube_proxy_errors),
        );
        fail(
            n.kube_proxy_syncs >= run.window_s / 6,
            format!(
                "kube-proxy synced only {} times in {} s: the churn did not reach it",
                n.kube_proxy_syncs, run.window_s
            ),
        );
    }
    broken
}

/// Counts read from a node's agent and kube-proxy at one moment.
struct Counters {
    syncs: u64,
    failures: u64,
    log_offset: u64,
    writes: u64,
    status_writes: u64,
    repairs: u64,
    not_converging: u64,
}

impl Counters {
    fn read(real: &RealCluster, node: &str) -> Counters {
        let proxy = metrics(node, 10249);
        let agent = metrics(node, METRICS_PORT);
        Counters {
            syncs: sum(&proxy, "kubeproxy_sync_proxy_rules_duration_seconds_count"),
            // kube-proxy shows a failure counter only once it counted one.
            failures: [
                "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
                "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
                "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
            ]
            .iter()
            .map(|name| series(&proxy, name).iter().sum::<f64>() as u64)
            .sum(),
            log_offset: std::fs::metadata(kube_proxy_log(real, node))
                .map(|m| m.len())
                .unwrap_or(0),
            writes: sum(&agent, "loopguard_agent_apply_duration_seconds_count"),
            status_writes: sum(&agent, "loopguard_agent_status_writes_total"),
            repairs: sum(&agent, "loopguard_agent_repairs_total"),
            not_converging: sum(&agent, "loopguard_agent_not_converging"),
        }
    }
}

/// A node's /metrics on 127.0.0.1:PORT, from inside its namespace.
/// `/metrics` on a node's port: on loopback (kube-proxy's default), or on the node's own address
/// (the agent's, `agent.metricsBindAddress: hostIP`).
fn metrics(node: &str, port: u16) -> String {
    let host = if port == METRICS_PORT {
        deploy::node_ipv4(node)
    } else {
        "127.0.0.1".to_string()
    };
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{node}"))
        .args(["curl", "-fsS", &format!("http://{host}:{port}/metrics")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{node}: /metrics on port {port}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The sum over every series of `name`, which must be there.
fn sum(text: &str, name: &str) -> u64 {
    let found = series(text, name);
    assert!(!found.is_empty(), "no {name} in:\n{text}");
    found.iter().sum::<f64>() as u64
}

/// The values of every series of `name` (`name` or `name{...}`).
fn series(text: &str, name: &str) -> Vec<f64> {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect()
}

fn node_dir(real: &RealCluster, node: &str) -> PathBuf {
    real.cluster.dir.join("real-nodes").join(node)
}

fn kube_proxy_log(real: &RealCluster, node: &str) -> PathBuf {
    node_dir(real, node).join("logs/kube-proxy.log")
}

/// klog error lines (`E1206 ...`) kube-proxy wrote after `offset`.
fn errors_since(real: &RealCluster, node: &str, offset: u64) -> u64 {
    let text = std::fs::read(kube_proxy_log(real, node)).unwrap();
    let text = String::from_utf8_lossy(&text[offset as usize..]).into_owned();
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with('E')).collect();
    for e in &errors {
        eprintln!("soak: {node}: kube-proxy: {e}");
    }
    errors.len() as u64
}

/// Every write the node's agent logged (its log as the kubelet keeps it): how many, and how many
/// name an edit that is not one of loopguard's three rules.
fn logged_writes(real: &RealCluster, node: &str) -> (u64, u64) {
    let logs = node_dir(real, node).join("pod-logs");
    let (mut writes, mut foreign) = (0, 0);
    let mut files = 0;
    for pod in std::fs::read_dir(&logs).unwrap().flatten() {
        let name = pod.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&format!("{NS}_{}-agent-", deploy::RELEASE)) {
            continue;
        }
        for log in std::fs::read_dir(pod.path().join("agent"))
            .unwrap()
            .flatten()
        {
            files += 1;
            let text = std::fs::read_to_string(log.path()).unwrap();
            for line in text.lines() {
                // CRI log lines: TIME STREAM TAG JSON.
                let Some(json) = line.splitn(4, ' ').nth(3) else {
                    continue;
                };
                let Ok(entry) = serde_json::from_str::<serde_json::Value>(json) else {
                    continue;
                };
                if entry["message"] != "writing" {
                    continue;
                }
                writes += 1;
                if !is_own_write(&entry) {
                    eprintln!("soak: {node}: a write not only of loopguard's rules: {json}");
                    foreign += 1;
                }
            }
        }
    }
    assert!(files > 0, "{node}: no agent log in {}", logs.display());
    (writes, foreign)
}

/// A logged write names loopguard's table, or only edits of loopguard's three rules: `-A`/`-D`
/// CHAIN SPEC, or `-I` CHAIN N SPEC.
fn is_own_write(entry: &serde_json::Value) -> bool {
    if let Some(table) = entry["table"].as_str() {
        return table == "inet loopguard";
    }
    // The agent logs its edits as a list of restore lines: `["-I INPUT 1 -i lo -j ACCEPT", ...]`.
    let edits: Vec<String> = entry["edits"]
        .as_str()
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or_default();
    !edits.is_empty() && edits.iter().all(|edit| is_own_edit(edit))
}

fn is_own_edit(edit: &str) -> bool {
    RULES.iter().any(|(chain, spec)| {
        let appended_or_deleted = [format!("-A {chain} {spec}"), format!("-D {chain} {spec}")];
        let inserted = edit
            .strip_prefix(&format!("-I {chain} "))
            .and_then(|rest| rest.split_once(' '))
            .is_some_and(|(n, rest)| n.parse::<u32>().is_ok() && rest == *spec);
        inserted || appended_or_deleted.iter().any(|e| e == edit)
    })
}

struct Churn {
    created: u64,
    scaled: u64,
    deleted: u64,
}

/// Services with EndpointSlices, created, scaled and deleted for `window`: between 20 and 30 live,
/// an operation every 250 ms.
async fn churn(client: &kube::Client, window: Duration) -> Churn {
    let services: Api<Service> = Api::namespaced(client.clone(), CHURN_NS);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), CHURN_NS);
    let mut live: VecDeque<String> = VecDeque::new();
    let mut done = Churn {
        created: 0,
        scaled: 0,
        deleted: 0,
    };
    let started = Instant::now();
    let counter = AtomicU64::new(0);
    while started.elapsed() < window {
        let step = counter.fetch_add(1, Ordering::SeqCst);
        match step % 3 {
            0 if live.len() < 30 => {
                let name = format!("soak-{step}");
                create_service(&services, &slices, &name, step).await;
                live.push_back(name);
                done.created += 1;
            }
            1 if !live.is_empty() => {
                let name = &live[(step as usize / 3) % live.len()];
                scale(&slices, name, step).await;
                done.scaled += 1;
            }
            2 if live.len() > 20 => {
                let name = live.pop_front().unwrap();
                services
                    .delete(&name, &DeleteParams::default())
                    .await
                    .unwrap();
                for family in ["v4", "v6"] {
                    slices
                        .delete(&format!("{name}-{family}"), &DeleteParams::default())
                        .await
                        .unwrap();
                }
                done.deleted += 1;
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    done
}

async fn create_service(
    services: &Api<Service>,
    slices: &Api<EndpointSlice>,
    name: &str,
    step: u64,
) {
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "type": "NodePort",
            "ipFamilyPolicy": "PreferDualStack",
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    }))
    .unwrap();
    services
        .create(&PostParams::default(), &service)
        .await
        .unwrap();
    for family in ["v4", "v6"] {
        slices
            .create(&PostParams::default(), &slice(name, family, 1 + step % 4))
            .await
            .unwrap();
    }
}

async fn scale(slices: &Api<EndpointSlice>, name: &str, step: u64) {
    for family in ["v4", "v6"] {
        let patch = serde_json::to_value(slice(name, family, 1 + step % 5)).unwrap();
        slices
            .patch(
                &format!("{name}-{family}"),
                &PatchParams::apply("loopguard-soak").force(),
                &Patch::Apply(&patch),
            )
            .await
            .unwrap();
    }
}

/// An EndpointSlice of `count` ready endpoints in the nodes' pod networks (addresses nobody
/// answers on: kube-proxy programs them all the same).
fn slice(service: &str, family: &str, count: u64) -> EndpointSlice {
    let endpoints: Vec<serde_json::Value> = (0..count)
        .map(|i| {
            let node = i % 3;
            let address = if family == "v4" {
                format!("10.244.{node}.{}", 100 + i)
            } else if node == 0 {
                format!("fd00:10:244::{:x}", 0x100 + i)
            } else {
                format!("fd00:10:244:{node}::{:x}", 0x100 + i)
            };
            json!({"addresses": [address], "conditions": {"ready": true}})
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-{family}"),
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "loopguard-soak",
            },
        },
        "addressType": if family == "v4" { "IPv4" } else { "IPv6" },
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .unwrap()
}
