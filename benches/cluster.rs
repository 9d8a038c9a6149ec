//! loopguard in a cluster; writes the "In a cluster" section of BENCHMARKS.md
//! (`cargo bench --bench cluster`, as root, control-plane binaries built; `-- --quick` only checks
//! that the bench still works, with few nodes and samples, and writes nothing).
//!
//! 1. Real agents on hollow nodes (the chart installed with its defaults on a private control
//!    plane): `LoopbackPolicy` created → `Compliant=True` with every node counted, then deleted →
//!    gone (the agents clean up), at 3, 10, 50 and 200 nodes; then, with 200 nodes compliant, API
//!    requests per node per hour over a quiet window of one heartbeat interval (kube-apiserver's
//!    `apiserver_request_total`, and its flow-control counts for loopguard's service accounts), and
//!    the agents' CPU (a cgroup each, children included) and resident memory.
//! 2. 5,000 simulated nodes (Nodes, Ready agent Pods and node reports written by the bench as the
//!    kubelet and the agents would) rolled up by the real `loopguard controller`: policy change →
//!    converged status, the controller's status writes, CPU and memory.
//! 3. Scale: one simulated cluster grown to 5,000, 10,000 and 15,000 nodes, five policy changes at
//!    each size (`-- --part scale` runs only this part and merges it into the committed record,
//!    with its own date and commit).

#[path = "support/render.rs"]
mod render;
#[path = "support/report.rs"]
mod report;
#[path = "../tests/support/mod.rs"]
mod support;

use futures::StreamExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use loopguard::api::{Compliance, ConditionStatus, LoopbackPolicy, LoopbackPolicyStatus};
use render::{Applies, ClusterRun, CpuUse, Meta, RequestCount, Samples, Simulated, Steady};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use support::cluster::{Cluster, eventually};
use support::deploy;
use support::sim::{Controller, World};

const NS: &str = "loopguard-system";
/// The chart's `agent.heartbeatInterval`: the steady-state window must hold one of each agent.
const HEARTBEAT: Duration = Duration::from_secs(600);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let meta = Meta {
        date: report::today(),
        commit: report::commit(),
        machine: report::machine(),
    };
    // `-- --part agents` or `-- --part sim` runs one part, and only prints; `-- --part scale` runs
    // the scale part and merges it into the committed record.
    let args: Vec<String> = std::env::args().collect();
    let part = args
        .iter()
        .position(|a| a == "--part")
        .and_then(|i| args.get(i + 1).cloned());
    if part.as_deref() == Some("scale") {
        // The scale part alone, merged into the committed record with a date of its own.
        let scale = scaled().await;
        let mut run: ClusterRun = report::committed("cluster")
            .expect("a committed cluster record (BENCHMARKS.json) to add the scale part to");
        run.scale = scale;
        run.scale_meta = Some(meta);
        let run = report::kept(&run);
        let (section, headline) = render::render_cluster(&run);
        if report::quick() {
            println!("{section}\nheadline:\n{headline}\n(quick run: nothing written)");
            return;
        }
        report::publish("cluster", &run, &section, &headline);
        return;
    }
    let (applies, steady) = if part.is_none() || part.as_deref() == Some("agents") {
        real_agents().await
    } else {
        (Vec::new(), None)
    };
    let simulated = if part.as_deref() != Some("agents") {
        Some(simulated().await)
    } else {
        None
    };
    let scale = if part.is_none() {
        scaled().await
    } else {
        Vec::new()
    };
    let run = report::kept(&ClusterRun {
        meta,
        applies,
        steady,
        simulated,
        scale,
        scale_meta: None,
    });
    let (section, headline) = render::render_cluster(&run);
    if report::quick() {
        let old: Option<ClusterRun> = report::committed("cluster");
        let old = old
            .as_ref()
            .map(render::cluster_medians)
            .unwrap_or_default();
        let now = render::cluster_medians(&run);
        report::print_regressions("cluster", render::regressions(&old, &now));
    }
    if part.is_some() {
        println!("{section}\nheadline:\n{headline}\n(one part only: nothing written)");
        return;
    }
    report::publish("cluster", &run, &section, &headline);
}

fn control_plane(tag: &str, controllers: &str) -> Cluster {
    support::cluster::private_with_controllers(tag, controllers).unwrap_or_else(|| {
        panic!("no control plane: build it first (hack/cluster.sh up builds the binaries)")
    })
}

fn policy_object(name: &str, selector: (&str, &str)) -> LoopbackPolicy {
    serde_json::from_value(json!({
        "apiVersion": "loopguard.dev/v1alpha1", "kind": "LoopbackPolicy", "metadata": {"name": name},
        "spec": {"nodeSelector": {"matchLabels": {selector.0: selector.1}}},
    }))
    .unwrap()
}

/// Whether the status says: this generation, every one of `nodes` compliant, `Compliant=True`.
fn converged(status: &LoopbackPolicyStatus, generation: i64, nodes: usize) -> bool {
    status.observed_generation == Some(generation)
        && status.compliant_nodes == nodes as i32
        && status
            .conditions
            .iter()
            .any(|c| c.type_ == "Compliant" && c.status == ConditionStatus::True)
}

/// Polls the policy every 20 ms until its status has converged; panics after `limit`.
async fn wait_converged(
    policies: &Api<LoopbackPolicy>,
    name: &str,
    generation: i64,
    nodes: usize,
    limit: Duration,
) {
    let started = Instant::now();
    loop {
        if let Ok(p) = policies.get(name).await
            && p.status
                .as_ref()
                .is_some_and(|s| converged(s, generation, nodes))
        {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "{name}: not converged at generation {generation} with {nodes} compliant nodes within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_gone(policies: &Api<LoopbackPolicy>, name: &str) {
    eventually(
        &format!("{name} gone"),
        Duration::from_secs(180),
        || async { policies.get_opt(name).await.ok()?.is_none().then_some(()) },
    )
    .await;
}

// --- real agents ------------------------------------------------------------------------------------

/// Policies applied and deleted at each size; the steady state with the largest.
async fn real_agents() -> (Vec<Applies>, Option<Steady>) {
    let cluster = control_plane("bench", "*");
    let client = cluster.client().await;
    // A node that lives through the whole run, for the controller: a controller Pod whose node goes
    // away is only replaced once the pod garbage collector removes the orphan.
    let infra_options = deploy::with_image(cluster.hollow_options("infra", 1));
    let infra_nodes = infra_options.nodes.clone();
    let infra = cluster.start_nodes(infra_options).await;
    deploy::install(&cluster, NS, &["logFormat=plain", "controller.replicas=1"]);
    deploy::wait_agents_ready(&client, NS, &infra_nodes).await;
    let policies: Api<LoopbackPolicy> = Api::all(client.clone());

    let (sizes, big, applies): (&[usize], usize, usize) = if report::quick() {
        (&[3], 10, 2)
    } else {
        (&[3, 10, 50], 200, 15)
    };
    let mut runs = Vec::new();
    let mut steady = None;
    for &nodes in sizes.iter().chain([big].iter()) {
        let label = ("loopguard.dev/bench", nodes.to_string());
        let options =
            deploy::iptables_hosts(&cluster, &format!("b{nodes}"), nodes, (label.0, &label.1));
        let names = options.nodes.clone();
        let started = Instant::now();
        let hollow = cluster.start_nodes(options).await;
        deploy::wait_agents_ready(&client, NS, &names).await;
        let up = started.elapsed();
        eprintln!("{nodes} nodes registered, an agent Ready on each, in {up:.1?}");

        let samples = applies;
        let (mut apply, mut delete) = (Samples::default(), Samples::default());
        for i in 0..samples {
            let name = format!("bench-{nodes}-{i}");
            let started = Instant::now();
            policies
                .create(
                    &PostParams::default(),
                    &policy_object(&name, (label.0, &label.1)),
                )
                .await
                .unwrap();
            wait_converged(&policies, &name, 1, nodes, Duration::from_secs(180)).await;
            apply.push(started.elapsed());
            if nodes == big && i + 1 == samples {
                // The last policy stays: the steady state is measured with every node compliant.
                steady = Some(steady_state(&cluster, nodes).await);
            }
            let started = Instant::now();
            policies
                .delete(&name, &DeleteParams::default())
                .await
                .unwrap();
            wait_gone(&policies, &name).await;
            delete.push(started.elapsed());
            eprintln!(
                "{nodes} nodes, apply {i}: compliant after {:.2?}, gone {:.2?} after the delete",
                apply.last().unwrap(),
                delete.last().unwrap()
            );
        }
        runs.push(Applies {
            nodes,
            up_ns: up.as_nanos() as u64,
            apply,
            delete,
        });
        hollow.shutdown(Duration::from_secs(5)).await.unwrap();
    }
    infra.shutdown(Duration::from_secs(5)).await.unwrap();

    (runs, steady)
}

/// API requests per node per hour, and the agents' CPU and memory, over a quiet window of exactly
/// one heartbeat interval with every node compliant.
async fn steady_state(cluster: &Cluster, nodes: usize) -> Steady {
    // Every request of loopguard's service accounts (agents and controller, its leader Lease
    // included) is counted by kube-apiserver's flow control under a FlowSchema of the bench's own.
    cluster.kubectl_ok(&["apply", "-f", "-"], Some(&flow_schemas()));
    // Past the burst of the apply (the last status writes, Events).
    tokio::time::sleep(Duration::from_secs(10)).await;
    // Whole heartbeats: each agent writes its heartbeat once in the window.
    let window = if report::quick() {
        Duration::from_secs(20)
    } else {
        HEARTBEAT
    };
    let agents = deploy::agent_pids();
    assert!(
        agents.len() >= nodes,
        "{} agent processes for {nodes} nodes",
        agents.len()
    );
    // One cgroup per agent: the processes an agent starts (`ip6tables-nft` at each resync) count.
    let cgroups: Vec<report::CgroupCpu> = agents
        .iter()
        .map(|pid| report::CgroupCpu::adopt(*pid, &format!("agent{pid}")))
        .collect();
    let before = request_counts(cluster);
    let flows_before = loopguard_requests(cluster);
    let cpu_before: Vec<Duration> = cgroups.iter().map(report::CgroupCpu::used).collect();
    eprintln!("steady state: watching {} s", window.as_secs());
    tokio::time::sleep(window).await;
    let after = request_counts(cluster);
    let flows_after = loopguard_requests(cluster);
    let agent_cpu: Vec<CpuUse> = cgroups
        .iter()
        .zip(&cpu_before)
        .map(|(c, b)| CpuUse::new(c.used() - *b, window))
        .collect();
    drop(cgroups);
    let agent_rss_kib: Vec<u64> = agents.iter().filter_map(|p| deploy::rss_kib(*p)).collect();
    let requests: Vec<RequestCount> = after
        .iter()
        .map(|((resource, verb), after)| RequestCount {
            resource: resource.clone(),
            verb: verb.clone(),
            before: before
                .get(&(resource.clone(), verb.clone()))
                .copied()
                .unwrap_or(0.0),
            after: *after,
        })
        .collect();
    let count = |flows: &BTreeMap<String, f64>, name: &str| flows.get(name).copied().unwrap_or(0.0);
    let steady = Steady {
        nodes,
        window_ns: window.as_nanos() as u64,
        heartbeat_secs: HEARTBEAT.as_secs(),
        requests,
        writes_before: count(&flows_before, WRITES),
        writes_after: count(&flows_after, WRITES),
        reads_before: count(&flows_before, READS),
        reads_after: count(&flows_after, READS),
        agent_cpu,
        agent_rss_kib,
    };
    let writes = steady.writes_after - steady.writes_before;
    assert!(
        writes >= nodes as f64 * 0.9 || report::quick(),
        "{writes} writes of loopguard's in a heartbeat interval, for {nodes} nodes: the flow schemas counted nothing?"
    );
    steady
}

/// The FlowSchemas that count loopguard's requests: its writes, and the rest.
const WRITES: &str = "loopguard-bench-writes";
const READS: &str = "loopguard-bench-reads";

fn flow_schemas() -> String {
    let schema = |name: &str, precedence: u32, verbs: &str| {
        format!(
            r#"apiVersion: flowcontrol.apiserver.k8s.io/v1
kind: FlowSchema
metadata:
  name: {name}
spec:
  matchingPrecedence: {precedence}
  priorityLevelConfiguration:
    name: workload-low
  distinguisherMethod:
    type: ByUser
  rules:
  - subjects:
    - kind: ServiceAccount
      serviceAccount:
        namespace: {NS}
        name: "*"
    resourceRules:
    - verbs: {verbs}
      apiGroups: ["*"]
      resources: ["*"]
      clusterScope: true
      namespaces: ["*"]
"#
        )
    };
    let mut reads = schema(READS, 401, r#"["*"]"#);
    reads.push_str(
        r#"    nonResourceRules:
    - verbs: ["*"]
      nonResourceURLs: ["*"]
"#,
    );
    format!(
        "{}---\n{reads}",
        schema(
            WRITES,
            400,
            r#"["create", "update", "patch", "delete", "deletecollection"]"#
        )
    )
}

/// `apiserver_flowcontrol_dispatched_requests_total` by flow schema, for the bench's own.
fn loopguard_requests(cluster: &Cluster) -> BTreeMap<String, f64> {
    let text = cluster.kubectl_ok(&["get", "--raw", "/metrics"], None);
    let mut counts = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_flowcontrol_dispatched_requests_total{"))
    {
        for name in [WRITES, READS] {
            if line.contains(&format!("flow_schema=\"{name}\"")) {
                let value: f64 = line
                    .rsplit(' ')
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0.0);
                *counts.entry(name.to_string()).or_insert(0.0) += value;
            }
        }
    }
    counts
}

fn status_kib(pid: u32, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// `apiserver_request_total` summed by (resource[/subresource], verb), for the resources loopguard
/// and the nodes use.
fn request_counts(cluster: &Cluster) -> BTreeMap<(String, String), f64> {
    let text = cluster.kubectl_ok(&["get", "--raw", "/metrics"], None);
    let mut counts = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let label = |name: &str| {
            let start = line.find(&format!("{name}=\""))? + name.len() + 2;
            Some(line[start..].split('"').next()?.to_string())
        };
        let (Some(resource), Some(verb)) = (label("resource"), label("verb")) else {
            continue;
        };
        if ![
            "loopbacknodestates",
            "loopbackpolicies",
            "nodes",
            "leases",
            "pods",
            "events",
        ]
        .contains(&resource.as_str())
        {
            continue;
        }
        let resource = match label("subresource").filter(|s| !s.is_empty()) {
            Some(sub) => format!("{resource}/{sub}"),
            None => resource,
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

// --- simulated nodes -------------------------------------------------------------------------------

async fn simulated() -> Simulated {
    let (nodes, changes) = if report::quick() {
        (200, 2)
    } else {
        (5_000, 15)
    };
    // No kubelet heartbeats these Nodes: without the node-lifecycle controller they stay Ready.
    let cluster = control_plane("bench-sim", "*,-node-lifecycle-controller");
    let w = World::on(&cluster, "sim").await;
    let started = Instant::now();
    let names: Vec<String> = futures::stream::iter(0..nodes)
        .map(|n| w.node(n, &[], None))
        .buffer_unordered(64)
        .collect()
        .await;
    eprintln!(
        "{nodes} Nodes with Ready agent Pods written in {:.1?}",
        started.elapsed()
    );
    let ctl = Controller::start(&cluster, &w.lease_ns, "bench", &["--coalesce-ms", "500"]);
    let name = "bench-sim";
    let policies = w.policies();
    w.policy(name, json!({})).await;
    let started = Instant::now();
    futures::stream::iter(names.iter())
        .map(|node| w.report(node, name, 1, Compliance::Compliant, 0))
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    wait_converged(&policies, name, 1, nodes, Duration::from_secs(300)).await;
    eprintln!(
        "first reports of {nodes} nodes written and converged in {:.1?}",
        started.elapsed()
    );

    measure(&w, &ctl, &policies, name, &names, changes, 0).await
}

/// Policy changes on `names` (all compliant at the start) through the running controller: per
/// change, the simulated agents' reports, the controller's lag after the last one and the status
/// writes; the controller's CPU and memory over all of them.
async fn measure(
    w: &World<'_>,
    ctl: &Controller,
    policies: &Api<LoopbackPolicy>,
    name: &str,
    names: &[String],
    changes: usize,
    // Changes made before: each change flips the priority, so that each one is a change.
    before: usize,
) -> Simulated {
    let nodes = names.len();
    let pid = ctl.child.id();
    let meter = report::CpuMeter::start(&[pid], Duration::from_secs(1));
    let run_started = Instant::now();
    let (mut written, mut lag, mut total) =
        (Samples::default(), Samples::default(), Samples::default());
    let mut writes = Vec::new();
    for change in 1..=changes {
        let writes_before = ctl.writes();
        let started = Instant::now();
        let patched = policies
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"spec": {"priority": (before + change) % 2}})),
            )
            .await
            .unwrap();
        let generation = patched.metadata.generation.unwrap();
        futures::stream::iter(names.iter())
            .map(|node| w.report_status(node, name, generation, Compliance::Compliant))
            .buffer_unordered(64)
            .collect::<Vec<_>>()
            .await;
        let reported = started.elapsed();
        wait_converged(policies, name, generation, nodes, Duration::from_secs(120)).await;
        let converged = started.elapsed();
        written.push(reported);
        lag.push(converged - reported);
        total.push(converged);
        // The coalescing window and the next 5 s tick pass before counting this change's writes.
        tokio::time::sleep(Duration::from_secs(6)).await;
        writes.push(ctl.writes() - writes_before);
        eprintln!(
            "change {change}: reports written {reported:.2?}, converged {converged:.2?}, {} status writes",
            writes.last().unwrap()
        );
    }
    let cpu = CpuUse::new(meter.stop()[0], run_started.elapsed());
    let kib = |key: &str| status_kib(pid, key) as u64;
    let (rss_kib, peak_kib) = (kib("VmRSS:"), kib("VmHWM:"));
    Simulated {
        nodes,
        written,
        lag,
        total,
        writes,
        cpu,
        rss_kib,
        peak_kib,
    }
}

/// The simulated cluster grown past 5,000 nodes: 5,000, 10,000 and 15,000 Nodes in one control
/// plane, a few policy changes at each size (`-- --part scale`; merged into the committed record
/// with a date and commit of its own).
async fn scaled() -> Vec<Simulated> {
    let (sizes, changes): (&[usize], usize) = if report::quick() {
        (&[100, 200], 2)
    } else {
        (&[5_000, 10_000, 15_000], 5)
    };
    let cluster = control_plane("bench-scale", "*,-node-lifecycle-controller");
    let w = World::on(&cluster, "scale").await;
    let ctl = Controller::start(&cluster, &w.lease_ns, "bench", &["--coalesce-ms", "500"]);
    let name = "bench-scale";
    let policies = w.policies();
    w.policy(name, json!({})).await;
    let mut names: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for &size in sizes {
        let started = Instant::now();
        let added: Vec<String> = futures::stream::iter(names.len()..size)
            .map(|n| w.node(n, &[], None))
            .buffer_unordered(64)
            .collect()
            .await;
        let generation = policies
            .get(name)
            .await
            .unwrap()
            .metadata
            .generation
            .unwrap();
        futures::stream::iter(added.iter())
            .map(|node| w.report(node, name, generation, Compliance::Compliant, 0))
            .buffer_unordered(64)
            .collect::<Vec<_>>()
            .await;
        names.extend(added);
        wait_converged(&policies, name, generation, size, Duration::from_secs(600)).await;
        eprintln!(
            "{size} nodes written and converged in {:.1?}",
            started.elapsed()
        );
        let before = out.len() * changes;
        out.push(measure(&w, &ctl, &policies, name, &names, changes, before).await);
    }
    drop(ctl);
    out
}
