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
use support::prometheus::{Prometheus, Target};

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
    let roots: Vec<std::path::PathBuf> = names.iter().map(|n| options.node_root(n)).collect();
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
            // A resync five times the repair bound: every repair below must come from the event
            // path (nft events, the legacy probe), which the repairs_by_trigger metric shows.
            // Half the heartbeat, so that each heartbeat finds a verification 10 s after the last.
            "agent.resync=5",
            "controller.leaseDuration=5",
            "controller.cleanupTimeout=60",
            "controller.agentGracePeriod=5",
            "agent.heartbeatInterval=10",
            "logFormat=plain",
        ],
    );
    deploy::wait_agents_ready(&client, NS, &names).await;
    // A real Prometheus scrapes every agent and controller from here to the end of the checks of
    // the metrics, as the chart's ServiceMonitor would (with a `node` label).
    let scrape_start = jiff::Timestamp::now().as_millisecond() as f64 / 1000.0;
    let (prometheus, targets) = start_prometheus(&client, &names).await;

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
    cluster.wait_compliant("baseline", "60s");
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

    // Drift: a rule deleted by hand is back within a second, counted, and an Event says so; the
    // repair came from the event path (the agent's repairs_by_trigger), the resync is 10 s away.
    let nft_events = repairs_on(&n.nft, "nft_event");
    let took = delete_and_time_repair(&n.nft, "nft", Duration::from_secs(1));
    println!("nft node: deleted rule back after {took:?}");
    repaired_on(&n.nft, "nft_event", nft_events + 1.0).await;
    let probed = repairs_on(&n.legacy, "legacy_probe");
    let took = delete_and_time_repair(&n.legacy, "legacy", Duration::from_secs(3));
    println!("legacy node (lock closes and the shape probe): deleted rule back after {took:?}");
    repaired_on(&n.legacy, "legacy_probe", probed + 1.0).await;
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
    // The pass that found the gap has ended (its report is out); it wrote nothing.
    assert!(
        !chain(&n.nft, "nft", "INPUT").iter().any(|r| r == DROP_SRC),
        "Audit never writes"
    );
    // Nor does the next one: wait for a verification after that report.
    let found_at = audit.last_verified_time.clone();
    wait_state(&client, &n.nft, "verified again in audit", |s| {
        s.last_verified_time > found_at
    })
    .await;
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
    // A LoopbackException for the node's failing rules (approved, 30 days): the policy counts it
    // Exempted, the agent's verdict stays what it found. It stays in place (the node passes again
    // below): every exception metric the alerts and the dashboard read has a series.
    let failing: Vec<String> = audit
        .checks
        .iter()
        .filter(|c| c.verdict == "Fail")
        .map(|c| c.id.clone())
        .collect();
    assert!(!failing.is_empty(), "{:?}", audit.checks);
    let now = jiff::Timestamp::now();
    let exception: loopguard::api::LoopbackException = serde_json::from_value(json!({
        "apiVersion": "loopguard.dev/v1alpha1", "kind": "LoopbackException",
        "metadata": {"name": "audit-window"},
        "spec": {
            "nodeNames": [n.nft],
            "ruleIds": failing,
            "justification": "the node is audited before its firewall is switched to Enforce",
            "approvedBy": "Jane Auditor",
            "approvedAt": now.to_string(),
            "ticket": "CHG-300",
            "expires": (now + jiff::SignedDuration::from_hours(24 * 30)).to_string(),
        },
    }))
    .unwrap();
    Api::<loopguard::api::LoopbackException>::all(client.clone())
        .create(&PostParams::default(), &exception)
        .await
        .unwrap();
    let exempted = eventually(
        "the audited node exempted",
        Duration::from_secs(30),
        || async {
            let s = policies.get("baseline").await.ok()?.status?;
            (s.exempted_node_names == vec![format!("{} (audit-window)", n.nft)]).then_some(s)
        },
    )
    .await;
    assert_eq!(exempted.non_compliant_nodes, 0, "{exempted:?}");
    let compliant = exempted
        .conditions
        .iter()
        .find(|c| c.type_ == "Compliant")
        .unwrap();
    assert_eq!(
        (&compliant.status, compliant.reason.as_str()),
        (
            &loopguard::api::ConditionStatus::True,
            "CompliantWithExceptions"
        )
    );
    assert_eq!(
        state(&client, &n.nft).await.unwrap().compliance,
        Compliance::NonCompliant,
        "an exception never changes what the agent found"
    );
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
    let history_before = wait_state(&client, &n.nft, "compliant before the restart", |s| {
        s.compliance == Compliance::Compliant
    })
    .await;
    assert!(
        history_before.verdict_since.is_some() && !history_before.transitions.is_empty(),
        "{history_before:#?}"
    );
    let restarted_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        jiff::Timestamp::now(),
    ));
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
    // Every restarted agent whose rules are compared has been through a pass (verified after
    // the old Pods were deleted) before they are.
    for node in [&n.legacy, &n.nft, &n.seeded] {
        wait_state(&client, node, "verified after the restart", |s| {
            s.last_verified_time > restarted_at
        })
        .await;
    }
    let after = rulesets();
    assert_eq!(before, after, "restarting the agents changed rules");
    // The repair history survived the restart (kept beside the state file).
    let restarted = wait_state(&client, &n.nft, "verified after the restart", |s| {
        s.last_verified_time > restarted_at
    })
    .await;
    assert_eq!(
        (restarted.repairs, &restarted.last_repair_time),
        (repaired.repairs, &repaired.last_repair_time),
        "repairs never go backwards across restarts"
    );
    // So did the verdict's history (read back from the API server by the new agent).
    assert_eq!(
        (&restarted.verdict_since, &restarted.transitions),
        (&history_before.verdict_since, &history_before.transitions),
        "the verdict history starts over after a restart"
    );

    // The API server hangs (SIGSTOP: a partition, not a refusal): repairs do not wait for it,
    // and the status catches up once it answers again.
    let repairs_before = restarted.repairs;
    cluster.pause_apiserver();
    let first = delete_and_time_repair(&n.nft, "nft", Duration::from_secs(1));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let second = delete_and_time_repair(&n.nft, "nft", Duration::from_secs(1));
    cluster.resume_apiserver();
    println!("API server hung: rules back after {first:?} and {second:?}");
    wait_state(
        &client,
        &n.nft,
        "both repairs reported after the hang",
        |s| s.repairs == repairs_before + 2,
    )
    .await;

    // An agent that stops (SIGSTOP: it neither answers its probes nor writes) no longer vouches
    // for its node: the policy names it and is not Compliant; back, and it is green again.
    let pid = agent_pid(&n.nft);
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    let stopped = Instant::now();
    let s = eventually(
        "the stopped agent's node named",
        Duration::from_secs(60),
        || async {
            let s = policies.get("baseline").await.ok()?.status?;
            (s.unknown_nodes == 1 && s.non_compliant_node_names == vec![n.nft.clone()]).then_some(s)
        },
    )
    .await;
    println!(
        "agent stopped → policy names its node after {:?}",
        stopped.elapsed()
    );
    let compliant = s
        .conditions
        .iter()
        .find(|c| c.type_ == "Compliant")
        .unwrap();
    assert_eq!(compliant.reason, "AgentsUnavailable", "{compliant:?}");
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    cluster.wait_compliant("baseline", "60s");

    // A broken node says so: with a corrupt state file its agent stays up, writes nothing, and
    // reports Error with what to do; once the file is back it enforces again.
    let state_file = roots[0].join("var/lib/loopguard/state.json");
    let good = std::fs::read_to_string(&state_file).expect("the legacy node's state file");
    std::fs::write(&state_file, "{not json").unwrap();
    restart_agent(&client, &n.legacy).await;
    let broken = wait_state(
        &client,
        &n.legacy,
        "Error for the corrupt state file",
        |s| s.compliance == Compliance::Error,
    )
    .await;
    assert_eq!(broken.reason, "StateFileUnusable", "{broken:?}");
    assert!(
        broken.message.contains("move the file aside"),
        "{}",
        broken.message
    );
    // Two passes refused after the delete (the one the legacy probe brings, then a retry or the
    // resync): waited for on the agent's error count rather than for a fixed time.
    let refusals = |node: &str| {
        metric(
            &node_http(node, "/metrics"),
            "loopguard_agent_errors_total{kind=\"StateFileUnusable\"}",
        )
    };
    let refused = refusals(&n.legacy);
    assert!(refused >= 1.0, "the agent counted its refusal");
    deploy::delete_drop_rule(&n.legacy, "legacy");
    let started = Instant::now();
    while refusals(&n.legacy) < refused + 2.0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the agent ran no pass after the delete"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !chain(&n.legacy, "legacy", "INPUT")
            .iter()
            .any(|r| r == DROP_SRC),
        "nothing written while the state file is unusable"
    );
    let readyz = node_http(&n.legacy, "/readyz");
    assert!(
        readyz.contains("503") && readyz.contains("not a loopguard state file"),
        "{readyz}"
    );
    assert!(
        node_http(&n.legacy, "/healthz").contains("200"),
        "alive, not restarted"
    );
    let pod = agent_pod(&client, &n.legacy).await;
    let restarts = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |c| c[0].restart_count);
    assert_eq!(restarts, 0, "no crash loop");
    eventually(
        "policy counts the error",
        Duration::from_secs(30),
        || async {
            let s = policies.get("baseline").await.ok()?.status?;
            (s.errored_nodes == 1).then_some(())
        },
    )
    .await;
    std::fs::write(&state_file, &good).unwrap();
    wait_state(&client, &n.legacy, "compliant once the file is back", |s| {
        s.compliance == Compliance::Compliant
    })
    .await;
    assert!(scanner_passes(&n.legacy, "legacy"));
    cluster.wait_compliant("baseline", "60s");

    // At steady state an agent writes only its heartbeat: 3600/heartbeat writes per hour.
    let writes = || -> f64 {
        names
            .iter()
            .map(|node| {
                metric(
                    &node_http(node, "/metrics"),
                    "loopguard_agent_status_writes_total",
                )
            })
            .sum()
    };
    let (before, window) = (writes(), Duration::from_secs(40));
    tokio::time::sleep(window).await;
    let per_node = (writes() - before) / names.len() as f64;
    let per_hour = per_node * 3600.0 / window.as_secs_f64();
    println!(
        "steady state: {per_node:.1} status writes per node in {}s with a 10 s heartbeat ({per_hour:.0}/node/hour); \
         with the default 600 s heartbeat that is 6 writes per node per hour, 30,000 per hour (8.3/s) at 5,000 nodes",
        window.as_secs()
    );
    // A heartbeat goes out with the first verification at least 10 s after the last one written:
    // every 10 to 15 s with a 5 s resync.
    let (fewest, most) = (
        window.as_secs_f64() / 15.0 - 1.0,
        window.as_secs_f64() / 10.0 + 1.0,
    );
    assert!(
        (fewest..=most).contains(&per_node),
        "{per_node} writes per node in 40 s: only heartbeats expected ({fewest:.1} to {most:.1})"
    );

    // Metrics made for alerting: NotApplicable is not non-compliant, polling shows, checks are recent.
    let metrics = |node: &str| node_http(node, "/metrics");
    let no_ipv6 = metrics(&n.no_ipv6);
    assert_eq!(
        metric(
            &no_ipv6,
            "loopguard_agent_compliance{state=\"NotApplicable\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &no_ipv6,
            "loopguard_agent_compliance{state=\"NonCompliant\"}"
        ),
        0.0
    );
    assert_eq!(
        metric(&metrics(&n.nft), "loopguard_agent_event_driven"),
        1.0
    );
    assert_eq!(
        metric(&metrics(&n.legacy), "loopguard_agent_event_driven"),
        0.0
    );
    let checked = metric(
        &metrics(&n.nft),
        "loopguard_agent_last_check_timestamp_seconds",
    );
    let now = jiff::Timestamp::now().as_millisecond() as f64 / 1000.0;
    assert!(
        (now - checked).abs() < 10.0,
        "last check {checked}, now {now}"
    );
    assert!(metrics(&n.nft).contains("loopguard_build_info{version="));

    // Every query of the chart's alerts and dashboard, run by the Prometheus that has scraped the
    // agents and controllers since before the policy existed, returns series.
    let queries = support::prometheus::queries();
    let started = Instant::now();
    loop {
        let empty: Vec<&(String, String)> = queries
            .iter()
            .filter(|(_, expr)| prometheus.query(expr).is_empty())
            .collect();
        if empty.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "queries without series: {empty:?}; errors: {:?}",
            empty
                .iter()
                .filter_map(|(_, e)| prometheus.error(e))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    println!(
        "{} alert and dashboard queries return series from a real Prometheus scraping {} targets",
        queries.len(),
        targets
    );
    dashboard_preview(&prometheus, scrape_start);
    drop(prometheus);

    // The auditor's evidence: `loopguard report` with the user's kubeconfig, in every format; the
    // HTML page rendered by headless Chromium shows the cluster's numbers.
    evidence_report(&cluster, &client).await;

    // The API server is down for 30 s while a rule is deleted: repaired anyway; status right after.
    let repairs_before = state(&client, &n.nft).await.unwrap().repairs;
    cluster.stop_apiserver();
    let outage = Instant::now();
    let nft_events = repairs_on(&n.nft, "nft_event");
    let took = delete_and_time_repair(&n.nft, "nft", Duration::from_secs(2));
    println!("during the API outage: rule back after {took:?}");
    repaired_on(&n.nft, "nft_event", nft_events + 1.0).await;
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
    cluster.wait_compliant("baseline", "60s");

    // Deleting the policy removes what loopguard inserted and keeps what it adopted. The nft
    // node's xtables lock is held meanwhile: its cleanup fails, says so, and is retried until it
    // works; the policy waits for it.
    let lock = roots[1].join("run/xtables.lock");
    let mut holder = std::process::Command::new("flock")
        .arg(&lock)
        .args(["sleep", "12"])
        .spawn()
        .unwrap();
    policies
        .delete("baseline", &DeleteParams::default())
        .await
        .unwrap();
    let failed = wait_state(&client, &n.nft, "cleanup failing on the held lock", |s| {
        s.compliance == Compliance::Error
    })
    .await;
    assert_eq!(failed.reason, "LockTimeout", "{failed:?}");
    assert!(
        failed
            .message
            .contains("removing the rules of policy baseline"),
        "{}",
        failed.message
    );
    assert!(
        policies.get_opt("baseline").await.unwrap().is_some(),
        "the policy waits for the cleanup"
    );
    holder.wait().unwrap();
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

    // The node states go with their Nodes (their owner references survived the restarts).
    let states: Api<LoopbackNodeState> = Api::all(client.clone());
    nodes
        .delete(&n.nft, &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "node state garbage-collected",
        Duration::from_secs(60),
        || async { states.get_opt(&n.nft).await.ok()?.is_none().then_some(()) },
    )
    .await;

    hollow.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// The pid of the agent process of `node` (its container on the hollow node).
fn agent_pid(node: &str) -> u32 {
    let wanted = format!("NODE_NAME={node}");
    deploy::agent_pids()
        .into_iter()
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == wanted.as_bytes()))
        })
        .unwrap_or_else(|| panic!("no agent process for {node}"))
}

async fn agent_pod(client: &Client, node: &str) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    pods.list(&ListParams::default().labels(deploy::AGENT_SELECTOR))
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        .unwrap_or_else(|| panic!("no agent pod on {node}"))
}

/// Deletes the agent Pod of `node` and waits until its replacement is Running.
async fn restart_agent(client: &Client, node: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let old = agent_pod(client, node).await.name_any();
    pods.delete(&old, &DeleteParams::default()).await.unwrap();
    eventually(
        "a new agent pod running",
        Duration::from_secs(60),
        || async {
            let pod = agent_pod(client, node).await;
            let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            (pod.name_any() != old && running).then_some(())
        },
    )
    .await;
}

/// A metric's value in Prometheus text (0 when absent).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The node's agent's repairs brought by `trigger` (`loopguard_agent_repairs_by_trigger_total`).
fn repairs_on(node: &str, trigger: &str) -> f64 {
    metric(
        &node_http(node, "/metrics"),
        &format!("loopguard_agent_repairs_by_trigger_total{{trigger=\"{trigger}\"}}"),
    )
}

/// Waits (10 s at most: the metric follows the pass) until `node`'s agent counts `count` repairs
/// brought by `trigger`, and none by the periodic re-check.
async fn repaired_on(node: &str, trigger: &str, count: f64) {
    let started = Instant::now();
    while repairs_on(node, trigger) < count {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{node}: the repair was not brought by {trigger}: {}",
            node_http(node, "/metrics")
                .lines()
                .filter(|l| l.starts_with("loopguard_agent_repairs_by_trigger"))
                .collect::<Vec<_>>()
                .join("; ")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        repairs_on(node, "resync"),
        0.0,
        "{node}: a repair at the resync"
    );
}

/// `curl -si http://127.0.0.1:9742PATH` inside the node: status line and body.
fn node_http(node: &str, path: &str) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", node, "curl", "-si", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:9742{path}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `loopguard report` against the cluster and checks it against the node states.
/// Prometheus with every agent (port 9742 of its node) and both controllers (port 8080 of their
/// pod's network namespace) as targets; returns it and the number of targets.
async fn start_prometheus(client: &Client, names: &[String]) -> (Prometheus, usize) {
    let mut targets: Vec<Target> = names
        .iter()
        .map(|node| Target {
            netns: node.clone(),
            port: 9742,
            labels: vec![("node".into(), node.clone())],
        })
        .collect();
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let controllers = eventually(
        "two controller pods running",
        Duration::from_secs(120),
        || async {
            let list = pods
                .list(&ListParams::default().labels("app.kubernetes.io/component=controller"))
                .await
                .ok()?;
            let running: Vec<Pod> = list
                .items
                .into_iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .collect();
            (running.len() == 2).then_some(running)
        },
    )
    .await;
    for pod in controllers {
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap();
        let uid = pod.uid().unwrap();
        targets.push(Target {
            netns: format!("{node}-p{}", &uid[..8]),
            port: 8080,
            labels: vec![("node".into(), node), ("pod".into(), pod.name_any())],
        });
    }
    let count = targets.len();
    (Prometheus::start(&targets), count)
}

/// The chart's dashboard, drawn from what Prometheus scraped during the test, in Chromium: every
/// panel shows data. The screenshot is kept beside the report's (docs/dashboard.png is a copy).
fn dashboard_preview(prometheus: &Prometheus, since: f64) {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(support::prometheus::repo_file(
            "charts/loopguard/dashboards/loopguard.json",
        ))
        .unwrap(),
    )
    .unwrap();
    let now = jiff::Timestamp::now().as_millisecond() as f64 / 1000.0;
    let preview = support::dashboard::preview(&dashboard, prometheus, since, now);
    let empty: Vec<&str> = preview
        .panels
        .iter()
        .filter(|p| p.series == 0)
        .map(|p| p.title.as_str())
        .collect();
    assert!(empty.is_empty(), "dashboard panels without data: {empty:?}");
    let (dom, screenshot) = in_chromium(&preview.html, "dashboard", "1600,1500");
    assert_eq!(
        dom.matches("class=\"panel\"").count(),
        preview.panels.len(),
        "every panel on the page"
    );
    assert!(!dom.contains("no data"));
    println!(
        "dashboard preview ({} panels) rendered by Chromium: {}",
        preview.panels.len(),
        screenshot.display()
    );
}

/// Where screenshots are kept: $LOOPGUARD_ARTIFACTS, else the target folder's artifacts/.
fn artifacts() -> std::path::PathBuf {
    let dir = std::env::var_os("LOOPGUARD_ARTIFACTS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(
                &std::env::var("CARGO_TARGET_DIR")
                    .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target").into()),
            )
            .join("artifacts")
        });
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Renders `html` in Chromium at `size`: keeps the screenshot as artifacts/`name`.png, returns the
/// DOM as the browser built it, and the screenshot's path.
fn in_chromium(html: &str, name: &str, size: &str) -> (String, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join(format!("{name}.html"));
    std::fs::write(&page, html).unwrap();
    let screenshot = artifacts().join(format!("{name}.png"));
    let shot = chromium(
        dir.path(),
        &page,
        &[&format!("--screenshot={}", screenshot.display())],
        size,
    );
    assert!(
        screenshot.metadata().is_ok_and(|m| m.len() > 10_000),
        "no screenshot: {shot:?}"
    );
    let dom = chromium(dir.path(), &page, &["--dump-dom"], size);
    (String::from_utf8(dom.stdout).unwrap(), screenshot)
}

/// Headless Chromium (Debian's package; hack/test.sh installs it) on a local page.
fn chromium(
    profile: &std::path::Path,
    page: &std::path::Path,
    extra: &[&str],
    size: &str,
) -> std::process::Output {
    std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--window-size={size}"))
        .arg(format!(
            "--user-data-dir={}",
            profile.join("profile").display()
        ))
        .args(extra)
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("chromium (Debian's package; hack/test.sh installs it)")
}

async fn evidence_report(cluster: &Cluster, client: &Client) {
    let report = |format: &str| {
        let out = std::process::Command::new(deploy::BIN)
            .args(["report", "--output", format])
            .env("KUBECONFIG", cluster.kubeconfig())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "report {format}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let states: Vec<LoopbackNodeState> = Api::<LoopbackNodeState>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    let count = |c: Compliance| {
        states
            .iter()
            .filter(|s| s.status.as_ref().map(|s| s.compliance) == Some(c))
            .count()
    };
    let json: serde_json::Value = serde_json::from_str(&report("json")).unwrap();
    assert_eq!(
        json["rule"]["id"],
        "xccdf_org.ssgproject.content_rule_set_ipv6_loopback_traffic"
    );
    assert_eq!(json["summary"]["nodes"], states.len());
    assert_eq!(json["summary"]["compliant"], count(Compliance::Compliant));
    assert_eq!(
        json["summary"]["notApplicable"],
        count(Compliance::NotApplicable)
    );
    for node in json["nodes"].as_array().unwrap() {
        let state = states
            .iter()
            .find(|s| s.name_any() == node["node"].as_str().unwrap())
            .unwrap();
        let status = state.status.as_ref().unwrap();
        assert_eq!(node["verdict"], format!("{:?}", status.compliance));
        assert_eq!(node["repairs"], status.repairs);
        assert_eq!(node["agentVersion"], env!("CARGO_PKG_VERSION"));
    }
    let csv = report("csv");
    assert_eq!(csv.lines().count(), states.len() + 1, "{csv}");
    let table = report("table");
    assert!(
        table.contains("NODE") && table.contains("VERDICT"),
        "{table}"
    );

    // The HTML page in a real browser: its numbers are the cluster's.
    let (dom, screenshot) = in_chromium(&report("html"), "report", "1280,1400");
    let shown = |id: &str| -> usize {
        let marker = format!("id=\"count-{id}\">");
        let at = dom
            .find(&marker)
            .unwrap_or_else(|| panic!("no {id} on the page"))
            + marker.len();
        dom[at..].split('<').next().unwrap().parse().unwrap()
    };
    assert_eq!(shown("nodes"), states.len());
    assert_eq!(shown("compliant"), count(Compliance::Compliant));
    assert_eq!(shown("not-applicable"), count(Compliance::NotApplicable));
    assert_eq!(shown("errored"), count(Compliance::Error));
    println!("report rendered by Chromium: {}", screenshot.display());
}
