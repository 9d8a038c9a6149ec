//! `loopguard controller`: rolls the node states up into each policy's status, holds the cleanup
//! finalizer until the nodes have removed what loopguard inserted, and records Events. Runs as a
//! leader-elected Deployment; only the leader writes.

mod crds;
pub mod lease;
mod reports;
pub mod slim;

use crate::aggregate::{self, AgentPod, NodeInfo, Settings};
use crate::api::{
    self, Compliance, ExceptionState, LoopbackException, LoopbackNodeState,
    LoopbackNodeStateStatus, LoopbackPolicy, LoopbackPolicyStatus, OnRemoval,
};
use crate::metrics::{self, Readiness};
use crate::rules::catalog::RuleId;
use crate::runtime::{OnInvalid, keep_whole, reflect};
use crate::{Error, Result};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family as MetricFamily;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Flags of `loopguard controller`.
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerArgs {
    /// Namespace of the leader-election Lease (the controller's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "loopguard-system")]
    pub namespace: String,
    /// This replica's identity in the Lease (defaults to the pod name, else host name and pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "LOOPGUARD_METRICS_ADDR", default_value = "0.0.0.0:8080", value_parser = crate::args::socket_addr)]
    pub metrics_addr: SocketAddr,
    /// Seconds a replica holds the Lease without renewing.
    #[arg(long, value_name = "SECONDS", default_value_t = 15)]
    pub lease_duration: u64,
    /// Seconds a NotReady node may stay silent before its policy turns Degraded (and a deleted
    /// policy stops waiting for it).
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub node_not_ready_timeout: u64,
    /// Seconds a deleted policy waits for its nodes to remove their rules before letting go anyway.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub cleanup_timeout: u64,
    /// Milliseconds to gather a burst of node reports into one status write per policy.
    #[arg(long, value_name = "MS", default_value_t = 500)]
    pub coalesce_ms: u64,
    /// Namespace of the agent Pods (defaults to --namespace: the chart runs both in one).
    #[arg(long, env = "LOOPGUARD_AGENT_NAMESPACE")]
    pub agent_namespace: Option<String>,
    /// Label selector of the agent Pods; a node whose agent Pod is not Ready is not vouched for.
    #[arg(
        long,
        default_value = "app.kubernetes.io/name=loopguard,app.kubernetes.io/component=agent"
    )]
    pub agent_selector: String,
    /// Seconds between agent heartbeats (the agents' --heartbeat): a report older than this plus
    /// --agent-grace no longer vouches for its node.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub agent_heartbeat: u64,
    /// Seconds a targeted node may be without a live agent before it counts as Unknown
    /// (AgentUnavailable) and the policy stops being Compliant.
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    pub agent_grace: u64,
    /// Bring loopguard's CRDs up to this version's revision at start (never back to an earlier
    /// one): `helm upgrade` never upgrades a chart's CRDs.
    #[arg(long, env = "LOOPGUARD_MANAGE_CRDS")]
    pub manage_crds: bool,
    /// Keep a ClusterPolicyReport (wgpolicyk8s.io/v1alpha2, read by Kyverno's Policy Reporter)
    /// per node a policy governs, with a result per loopback rule; needs that CRD.
    #[arg(long, env = "LOOPGUARD_POLICY_REPORTS")]
    pub policy_reports: bool,
}

struct Metrics {
    status_writes: Counter,
    events: Counter,
    leader: Gauge,
    reconcile_seconds: Histogram,
    errors: Counter,
    invalid_objects: Counter,
    /// Per policy: nodes by state (targeted, compliant, ...), from the leader's roll-up.
    policy_nodes: MetricFamily<PolicyNodes, Gauge>,
    /// Per policy, loopback rule (ComplianceAsCode id) and verdict: nodes, from the leader's roll-up.
    policy_rule_nodes: MetricFamily<PolicyRule, Gauge>,
    /// Per policy and condition: 1 for the condition's current status, 0 for the others.
    policy_condition: MetricFamily<PolicyCondition, Gauge>,
    /// The policies that have series.
    policies: std::sync::Mutex<HashSet<String>>,
    /// Per exception: when it expires (Unix seconds), and the nodes it exempts now.
    exception_expiry: MetricFamily<ExceptionLabel, Gauge>,
    exception_exempted: MetricFamily<ExceptionLabel, Gauge>,
    /// Per exception and state: 1 for its current state, 0 for the others.
    exception_state: MetricFamily<ExceptionStateLabel, Gauge>,
    /// Per exception and node it matches: 1 while it exempts the node, else 0.
    exception_node: MetricFamily<ExceptionNode, Gauge>,
    /// ClusterPolicyReport writes and deletions.
    report_writes: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExceptionStateLabel {
    exception: String,
    ticket: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExceptionNode {
    exception: String,
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExceptionLabel {
    exception: String,
    ticket: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyNodes {
    policy: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyRule {
    policy: String,
    rule: &'static str,
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyCondition {
    policy: String,
    condition: String,
    status: &'static str,
}

impl Metrics {
    /// The per-policy gauges of one roll-up.
    fn record(&self, policy: &str, s: &LoopbackPolicyStatus) {
        let counts = [
            ("targeted", s.targeted_nodes),
            ("compliant", s.compliant_nodes),
            ("non_compliant", s.non_compliant_nodes),
            ("exempted", s.exempted_nodes),
            ("not_applicable", s.not_applicable_nodes),
            ("errored", s.errored_nodes),
            ("pending", s.pending_nodes),
            ("unknown", s.unknown_nodes),
            ("overridden", s.overridden_nodes),
            ("unsupported", s.unsupported_nodes),
        ];
        for (state, count) in counts {
            let labels = PolicyNodes {
                policy: policy.into(),
                state,
            };
            self.policy_nodes.get_or_create(&labels).set(count.into());
        }
        for rule in RuleId::ALL {
            let tally = s.rules.iter().find(|t| t.id == rule.cac_id());
            for verdict in RULE_VERDICTS {
                let count = tally.map_or(0, |t| match verdict {
                    "pass" => t.pass,
                    "fail" => t.fail,
                    "not_applicable" => t.not_applicable,
                    "ignored" => t.ignored,
                    _ => t.unknown,
                });
                let labels = PolicyRule {
                    policy: policy.into(),
                    rule: rule.cac_id(),
                    verdict,
                };
                self.policy_rule_nodes
                    .get_or_create(&labels)
                    .set(count.into());
            }
        }
        for condition in &s.conditions {
            for status in STATUSES {
                let labels = PolicyCondition {
                    policy: policy.into(),
                    condition: condition.type_.clone(),
                    status,
                };
                let now = format!("{:?}", condition.status) == status;
                self.policy_condition.get_or_create(&labels).set(now as i64);
            }
        }
    }

    /// Drops the per-policy series of policies that are gone (all of them when `keep` is empty).
    fn forget_policies_but(&self, keep: &HashSet<String>) {
        let gone: HashSet<String> = self
            .policies
            .lock()
            .expect("policies lock")
            .difference(keep)
            .cloned()
            .collect();
        for policy in &gone {
            for state in POLICY_STATES {
                self.policy_nodes.remove(&PolicyNodes {
                    policy: policy.clone(),
                    state,
                });
            }
            for rule in RuleId::ALL {
                for verdict in RULE_VERDICTS {
                    self.policy_rule_nodes.remove(&PolicyRule {
                        policy: policy.clone(),
                        rule: rule.cac_id(),
                        verdict,
                    });
                }
            }
            for condition in CONDITIONS {
                for status in STATUSES {
                    self.policy_condition.remove(&PolicyCondition {
                        policy: policy.clone(),
                        condition: condition.into(),
                        status,
                    });
                }
            }
        }
        *self.policies.lock().expect("policies lock") = keep.clone();
    }
}

const STATUSES: [&str; 3] = ["True", "False", "Unknown"];
const CONDITIONS: [&str; 6] = [
    "Compliant",
    "Ready",
    "Progressing",
    "Reconciling",
    "Degraded",
    "Stalled",
];
const RULE_VERDICTS: [&str; 5] = ["pass", "fail", "not_applicable", "ignored", "unknown"];
const POLICY_STATES: [&str; 10] = [
    "targeted",
    "compliant",
    "non_compliant",
    "exempted",
    "not_applicable",
    "errored",
    "pending",
    "unknown",
    "overridden",
    "unsupported",
];

impl Metrics {
    fn register(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            status_writes: Counter::default(),
            events: Counter::default(),
            leader: Gauge::default(),
            reconcile_seconds: Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            errors: Counter::default(),
            invalid_objects: Counter::default(),
            policy_nodes: MetricFamily::default(),
            policy_rule_nodes: MetricFamily::default(),
            policy_condition: MetricFamily::default(),
            policies: Default::default(),
            exception_expiry: MetricFamily::default(),
            exception_exempted: MetricFamily::default(),
            exception_state: MetricFamily::default(),
            exception_node: MetricFamily::default(),
            report_writes: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("loopguard_controller");
        r.register(
            "status_writes",
            "LoopbackPolicy status writes",
            m.status_writes.clone(),
        );
        r.register("events", "Events recorded on policies", m.events.clone());
        r.register(
            "leader",
            "1 while this replica holds the lease",
            m.leader.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Time to roll up every policy once",
            m.reconcile_seconds.clone(),
        );
        r.register("errors", "Failed API writes", m.errors.clone());
        r.register(
            "policy_report_writes",
            "ClusterPolicyReport writes and deletions (--policy-reports)",
            m.report_writes.clone(),
        );
        r.register(
            "invalid_objects",
            "Objects skipped because they could not be read (written by a newer loopguard?)",
            m.invalid_objects.clone(),
        );
        let p = registry.sub_registry_with_prefix("loopguard_policy");
        p.register(
            "nodes",
            "Nodes of a policy by state (targeted, compliant, non_compliant, exempted: failing but covered by a LoopbackException, not_applicable, errored, pending, unknown: no live agent, overridden, unsupported: no agent can run there); set by the leader",
            m.policy_nodes.clone(),
        );
        p.register(
            "rule_nodes",
            "Targeted nodes of a policy with a live, current report, per loopback rule (ComplianceAsCode id) and verdict (pass, fail, not_applicable, ignored, unknown); set by the leader",
            m.policy_rule_nodes.clone(),
        );
        p.register(
            "condition",
            "1 for the current status of each condition of a policy, 0 for the others; set by the leader",
            m.policy_condition.clone(),
        );
        let e = registry.sub_registry_with_prefix("loopguard_exception");
        e.register(
            "expiry_timestamp_seconds",
            "When each LoopbackException expires (Unix time); set by the leader",
            m.exception_expiry.clone(),
        );
        e.register(
            "exempted_nodes",
            "Failing nodes each LoopbackException exempts now (0 once expired); set by the leader",
            m.exception_exempted.clone(),
        );
        e.register(
            "state",
            "1 for the current state of each LoopbackException (Active, MatchesNoNode, Expired), 0 for the others; set by the leader",
            m.exception_state.clone(),
        );
        e.register(
            "node_exempted",
            "Per LoopbackException and node it matches (until it expires): 1 while it exempts the node's failing results, else 0; set by the leader",
            m.exception_node.clone(),
        );
        metrics::register_build_info(registry, "controller");
        m
    }
}

/// What the reconcile loop reads and remembers.
struct Context {
    client: Client,
    policies: Store<LoopbackPolicy>,
    exceptions: Store<LoopbackException>,
    states: Store<LoopbackNodeState>,
    nodes: Store<slim::Node>,
    agents: Store<slim::Pod>,
    leadership: lease::Leadership,
    recorder: Recorder,
    metrics: Metrics,
    settings: Settings,
    cleanup_timeout: Duration,
    /// The status last written per policy uid, so an unchanged roll-up is never written twice.
    written: HashMap<String, LoopbackPolicyStatus>,
    /// Repairs last seen per node, to tell admins about new ones.
    repairs_seen: HashMap<String, i64>,
    /// Objects that could not be read, to be told in an Event (once per version).
    invalid: tokio::sync::mpsc::UnboundedReceiver<(ObjectReference, String)>,
    invalid_told: HashSet<(String, String)>,
    /// Deleted policies (uid) whose deletion was told in an Event.
    deletion_told: HashSet<String>,
    /// The nodes' ClusterPolicyReports, with --policy-reports.
    reports: Option<reports::PolicyReports>,
}

/// Runs the controller until SIGTERM/SIGINT.
pub async fn run(args: ControllerArgs) -> Result<()> {
    let client = Client::try_default().await?;
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let ready = Readiness::default();
    metrics::serve(
        args.metrics_addr,
        Arc::new(registry),
        ready.clone(),
        metrics::Liveness::always(),
    )
    .await?;

    if args.manage_crds {
        crds::ensure(&client).await;
    }
    let dirty = Arc::new(Notify::new());
    let (invalid_tx, invalid) = tokio::sync::mpsc::unbounded_channel();
    let invalid_objects = metrics.invalid_objects.clone();
    let on_invalid: OnInvalid = Arc::new(move |kind, object| {
        invalid_objects.inc();
        let reference = ObjectReference {
            api_version: Some("loopguard.dev/v1alpha1".into()),
            kind: Some(kind.to_string()),
            name: object.metadata.name.clone(),
            uid: object.metadata.uid.clone(),
            resource_version: object.metadata.resource_version.clone(),
            ..Default::default()
        };
        let _ = invalid_tx.send((reference, object.error.clone()));
    });
    let policies = reflect::<LoopbackPolicy>(
        Api::all(client.clone()),
        watcher::Config::default(),
        dirty.clone(),
        on_invalid.clone(),
        keep_whole,
    );
    let exceptions = reflect::<LoopbackException>(
        Api::all(client.clone()),
        watcher::Config::default(),
        dirty.clone(),
        on_invalid.clone(),
        keep_whole,
    );
    let states = reflect::<LoopbackNodeState>(
        Api::all(client.clone()),
        watcher::Config::default(),
        dirty.clone(),
        on_invalid.clone(),
        slim_state,
    );
    let nodes = reflect::<slim::Node>(
        Api::all(client.clone()),
        watcher::Config::default(),
        dirty.clone(),
        on_invalid.clone(),
        slim::trim_node,
    );
    let agent_namespace = args
        .agent_namespace
        .clone()
        .unwrap_or_else(|| args.namespace.clone());
    let agents = reflect::<slim::Pod>(
        Api::namespaced(client.clone(), &agent_namespace),
        watcher::Config::default().labels(&args.agent_selector),
        dirty.clone(),
        on_invalid,
        slim::trim_pod,
    );
    for store in [
        policies.wait_until_ready().await,
        states.wait_until_ready().await,
        nodes.wait_until_ready().await,
        agents.wait_until_ready().await,
    ] {
        store.map_err(|_| Error::Invalid("a watch ended before its cache synced".into()))?;
    }
    // Exceptions only ever turn a failing node into an exempted one: until their cache is there
    // (a cluster whose CRDs were not upgraded has none: `kubectl apply --server-side -f crds/`),
    // every failing node counts as failing, never the other way round.
    if tokio::time::timeout(Duration::from_secs(15), exceptions.wait_until_ready())
        .await
        .is_err()
    {
        tracing::warn!(
            "LoopbackExceptions cannot be listed yet (is the CRD installed? kubectl apply --server-side -f crds/); counting without them until they can"
        );
    }
    ready.set(true);
    tracing::info!("caches synced");

    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let elector = lease::LeaderElector::new(
        Api::namespaced(client.clone(), &args.namespace),
        api::LEASE_NAME,
        &identity,
        Duration::from_secs(args.lease_duration),
    );
    let leadership = elector.leadership();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let elector_task = tokio::spawn(elector.run(stop_rx));

    let mut ctx = Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: api::CONTROLLER_MANAGER.into(),
                instance: Some(identity),
            },
        ),
        client,
        policies,
        exceptions,
        states,
        nodes,
        agents,
        leadership,
        metrics,
        settings: Settings {
            not_ready_timeout: Duration::from_secs(args.node_not_ready_timeout),
            heartbeat: Duration::from_secs(args.agent_heartbeat),
            agent_grace: Duration::from_secs(args.agent_grace),
        },
        cleanup_timeout: Duration::from_secs(args.cleanup_timeout),
        written: HashMap::new(),
        repairs_seen: HashMap::new(),
        invalid,
        invalid_told: HashSet::new(),
        deletion_told: HashSet::new(),
        reports: None,
    };
    if args.policy_reports {
        ctx.reports = Some(reports::PolicyReports::new(ctx.client.clone()));
    }
    let coalesce = Duration::from_millis(args.coalesce_ms);
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut shutdown = crate::runtime::shutdown_signal()?;
    loop {
        tokio::select! {
            _ = dirty.notified() => {}
            _ = tick.tick() => {}
            _ = &mut shutdown => break,
        }
        // Let a burst of node reports land before rolling up: one write per policy per burst.
        tokio::time::sleep(coalesce).await;
        ctx.metrics.leader.set(ctx.leadership.is_leader() as i64);
        let started = Instant::now();
        reconcile_all(&mut ctx).await;
        ctx.metrics
            .reconcile_seconds
            .observe(started.elapsed().as_secs_f64());
    }
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = elector_task.await;
    Ok(())
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_else(|_| "controller".into());
    format!("{}-{}", host.trim(), std::process::id())
}

/// Rolls up every policy once. Everything is computed from the caches; only changes are written,
/// and only by the leader.
async fn reconcile_all(ctx: &mut Context) {
    let states: BTreeMap<String, LoopbackNodeStateStatus> = ctx
        .states
        .state()
        .iter()
        .map(|s| (s.name_any(), s.status.clone().unwrap_or_default()))
        .collect();
    // Followers only keep counting repairs, so that a new leader reports only new ones. What this
    // replica wrote as leader says nothing once another may have written since.
    let repairs = new_repairs(&mut ctx.repairs_seen, &states);
    if !ctx.leadership.is_leader() {
        if let Some(reports) = ctx.reports.as_mut() {
            reports.forget();
        }
        ctx.written.clear();
        ctx.metrics.forget_policies_but(&HashSet::new());
        return;
    }
    tell_invalid(ctx).await;
    let now = Time(jiff::Timestamp::now());
    let policies = ctx.policies.state();
    let agents = agent_pods(&ctx.agents.state());
    let nodes: Vec<NodeInfo> = ctx
        .nodes
        .state()
        .iter()
        .filter_map(|n| node_info(n))
        .map(|mut n| {
            n.agent = agents.get(&n.name).cloned().unwrap_or(AgentPod::Missing);
            n
        })
        .collect();
    let all: Vec<&LoopbackPolicy> = policies.iter().map(|p| p.as_ref()).collect();
    let exceptions = ctx.exceptions.state();
    let in_force: Vec<&LoopbackException> = exceptions.iter().map(|e| e.as_ref()).collect();
    for policy in &policies {
        if !ctx.leadership.is_leader() {
            break;
        }
        if policy.metadata.deletion_timestamp.is_some() {
            finish_deletion(ctx, policy, &nodes, &states, &now).await;
            continue;
        }
        if !has_finalizer(policy) {
            ctx.write(
                add_finalizer(&ctx.client, policy).await,
                policy,
                "adding the finalizer",
            );
        }
        let status = aggregate::aggregate(
            policy,
            &all,
            &nodes,
            &states,
            &in_force,
            policy.status.as_ref(),
            &now,
            ctx.settings,
        );
        ctx.metrics.record(&policy.name_any(), &status);
        let uid = policy.uid().unwrap_or_default();
        let unchanged =
            policy.status.as_ref() == Some(&status) || ctx.written.get(&uid) == Some(&status);
        if !unchanged {
            let result = write_status(&ctx.client, policy, &status).await;
            if result.is_ok() {
                ctx.metrics.status_writes.inc();
                for notice in aggregate::notices(policy.status.as_ref(), &status) {
                    ctx.event(
                        policy,
                        notice.warning,
                        notice.reason,
                        notice.note,
                        notice.node.as_deref(),
                    )
                    .await;
                }
                ctx.written.insert(uid, status);
            }
            ctx.write(result, policy, "writing the status");
        }
        for (node, count) in repairs
            .iter()
            .filter(|(node, _)| states[node].policy_name == policy.metadata.name)
        {
            let by = states[node]
                .last_repair_by
                .as_ref()
                .map(|w| format!("; the change was made by {w}"))
                .unwrap_or_default();
            let note = format!("{node}: drift repaired ({count} repairs so far{by})");
            ctx.event(policy, false, "DriftRepaired", note, Some(node))
                .await;
        }
    }
    write_exception_statuses(ctx, &in_force, &nodes, &states, &now).await;
    if ctx.reports.is_some() {
        write_policy_reports(ctx, &all, &in_force, &nodes, &states, &now).await;
    }
    let live: Vec<String> = policies.iter().filter_map(|p| p.uid()).collect();
    ctx.written.retain(|uid, _| live.contains(uid));
    ctx.deletion_told.retain(|uid| live.contains(uid));
    let current: HashSet<String> = policies
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| p.name_any())
        .collect();
    ctx.metrics.forget_policies_but(&current);
}

/// Records a Warning Event on each object that could not be read, once per version.
async fn tell_invalid(ctx: &mut Context) {
    while let Ok((reference, error)) = ctx.invalid.try_recv() {
        let key = (
            reference.name.clone().unwrap_or_default(),
            reference.resource_version.clone().unwrap_or_default(),
        );
        if !ctx.leadership.is_leader() || !ctx.invalid_told.insert(key) {
            continue;
        }
        let event = Event {
            type_: EventType::Warning,
            reason: "InvalidObject".into(),
            note: Some(format!(
                "this loopguard cannot read the object ({error}); it is skipped and its last readable version is used. Upgrade loopguard, or fix the object"
            )),
            action: "Read".into(),
            secondary: None,
        };
        match ctx.recorder.publish(&event, &reference).await {
            Ok(()) => {
                ctx.metrics.events.inc();
            }
            Err(e) => tracing::warn!(error = %e, "recording an Event failed"),
        }
    }
}

/// What the controller reads of a node state: everything but who wrote which field.
fn slim_state(state: &mut LoopbackNodeState) {
    state.metadata.managed_fields = None;
}

/// What aggregation needs of a Node.
fn node_info(node: &slim::Node) -> Option<NodeInfo> {
    let not_ready_since = node.status.ready().filter(|c| c.status != "True").map(|c| {
        c.last_transition_time
            .clone()
            .unwrap_or(Time(jiff::Timestamp::UNIX_EPOCH))
    });
    Some(NodeInfo {
        name: node.metadata.name.clone()?,
        labels: node.metadata.labels.clone().unwrap_or_default(),
        not_ready_since,
        created: node.metadata.creation_timestamp.clone(),
        agent: AgentPod::Missing,
    })
}

/// The agent Pod of each node: Ready when one of its Pods is Ready (during a rolling update
/// the old and the new Pod are both there); else NotReady since the latest transition.
fn agent_pods(pods: &[Arc<slim::Pod>]) -> HashMap<String, AgentPod> {
    let mut by_node: HashMap<String, AgentPod> = HashMap::new();
    for pod in pods {
        let Some(node) = pod.spec.node_name.clone() else {
            continue;
        };
        let ready = pod.status.ready();
        let state = match ready {
            Some(c) if c.status == "True" && pod.metadata.deletion_timestamp.is_none() => {
                AgentPod::Ready
            }
            _ => AgentPod::NotReady {
                since: ready
                    .and_then(|c| c.last_transition_time.clone())
                    .or_else(|| pod.metadata.creation_timestamp.clone()),
            },
        };
        let merged = match (by_node.remove(&node), state) {
            (Some(AgentPod::Ready), _) | (_, AgentPod::Ready) => AgentPod::Ready,
            (Some(AgentPod::NotReady { since: a }), AgentPod::NotReady { since: b }) => {
                AgentPod::NotReady {
                    since: [a, b].into_iter().flatten().max_by_key(|t| t.0),
                }
            }
            (_, other) => other,
        };
        by_node.insert(node, merged);
    }
    by_node
}

fn has_finalizer(policy: &LoopbackPolicy) -> bool {
    policy.finalizers().iter().any(|f| f == api::FINALIZER)
}

/// Nodes whose repair count went up since the last round (not on first sight).
fn new_repairs(
    seen: &mut HashMap<String, i64>,
    states: &BTreeMap<String, LoopbackNodeStateStatus>,
) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for (node, state) in states {
        if let Some(before) = seen.insert(node.clone(), state.repairs)
            && state.repairs > before
        {
            out.push((node.clone(), state.repairs));
        }
    }
    seen.retain(|node, _| states.contains_key(node));
    out
}

impl Context {
    fn write(&self, result: kube::Result<()>, policy: &LoopbackPolicy, what: &str) {
        if let Err(e) = result {
            self.metrics.errors.inc();
            tracing::warn!(policy = %policy.name_any(), error = %e, "{what} failed; retrying on the next round");
        }
    }

    /// Records an Event on `policy`. `node` becomes the Event's related object: kube's recorder
    /// folds repeats of the same reason, object and related object into one series (keeping the
    /// first note), so events about different nodes must name their node there.
    async fn event(
        &self,
        policy: &LoopbackPolicy,
        warning: bool,
        reason: &str,
        note: String,
        node: Option<&str>,
    ) {
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: node.map(|name| ObjectRef::<slim::Node>::new(name).into()),
        };
        match self.recorder.publish(&event, &policy.object_ref(&())).await {
            Ok(()) => {
                self.metrics.events.inc();
            }
            Err(e) => {
                tracing::warn!(policy = %policy.name_any(), error = %e, "recording an Event failed")
            }
        }
    }
}

/// A deleted policy keeps its finalizer until its nodes removed their rules (onRemoval: Remove),
/// or they became unreachable, or the cleanup timeout passed: never forever.
async fn finish_deletion(
    ctx: &mut Context,
    policy: &LoopbackPolicy,
    nodes: &[NodeInfo],
    states: &BTreeMap<String, LoopbackNodeStateStatus>,
    now: &Time,
) {
    if !has_finalizer(policy) {
        return;
    }
    if ctx.deletion_told.insert(policy.uid().unwrap_or_default()) {
        let (warning, note) = aggregate::deletion_note(policy);
        ctx.event(policy, warning, "Deleted", note, None).await;
    }
    if policy.spec.on_removal == OnRemoval::Remove {
        let progress = aggregate::cleanup_progress(policy, nodes, states, now, ctx.settings);
        let deleted_at = policy
            .metadata
            .deletion_timestamp
            .as_ref()
            .expect("deleting");
        let waited = now.0.duration_since(deleted_at.0).unsigned_abs();
        if !progress.done() && waited < ctx.cleanup_timeout {
            tracing::debug!(policy = %policy.name_any(), waiting = ?progress.waiting, "waiting for nodes to remove their rules");
            return;
        }
        if !progress.waiting.is_empty() {
            let why = if progress.done() {
                "their nodes are gone or NotReady".to_string()
            } else {
                format!(
                    "the cleanup timeout of {}s passed",
                    ctx.cleanup_timeout.as_secs()
                )
            };
            let note = format!(
                "released without confirmed cleanup on {} ({why}); rules loopguard inserted there may remain until their agents run again",
                progress.waiting.join(", ")
            );
            ctx.event(policy, true, "CleanupIncomplete", note, None)
                .await;
        }
    }
    ctx.write(
        remove_finalizer(&ctx.client, policy).await,
        policy,
        "removing the finalizer",
    );
}

/// Each governed node's ClusterPolicyReport, written when its content changed (bounded per
/// round); the reports of nodes no policy governs any more are deleted.
async fn write_policy_reports(
    ctx: &mut Context,
    policies: &[&LoopbackPolicy],
    exceptions: &[&LoopbackException],
    nodes: &[NodeInfo],
    states: &BTreeMap<String, LoopbackNodeStateStatus>,
    now: &Time,
) {
    use aggregate::policy_report;
    let uids: HashMap<String, String> = ctx
        .nodes
        .state()
        .iter()
        .filter_map(|n| Some((n.metadata.name.clone()?, n.metadata.uid.clone()?)))
        .collect();
    let desired: BTreeMap<String, serde_json::Value> = nodes
        .iter()
        .filter_map(|n| {
            let results = policy_report::node_results(
                policies,
                n,
                states.get(&n.name),
                exceptions,
                now,
                ctx.settings,
            )?;
            Some((
                policy_report::report_name(&n.name),
                policy_report::report_object(
                    &n.name,
                    uids.get(&n.name).map(String::as_str),
                    &results,
                ),
            ))
        })
        .collect();
    let Some(reports) = ctx.reports.as_mut() else {
        return;
    };
    let round = reports.sync(&desired).await;
    ctx.metrics
        .report_writes
        .inc_by((round.written + round.deleted) as u64);
    ctx.metrics.errors.inc_by(round.failed as u64);
}

/// Each exception's status (state, matched and exempted nodes), written when it changed, and its
/// gauges.
async fn write_exception_statuses(
    ctx: &Context,
    exceptions: &[&LoopbackException],
    nodes: &[NodeInfo],
    states: &BTreeMap<String, LoopbackNodeStateStatus>,
    now: &Time,
) {
    use aggregate::exemption;
    let labelled: Vec<(&str, &BTreeMap<String, String>)> =
        nodes.iter().map(|n| (n.name.as_str(), &n.labels)).collect();
    ctx.metrics.exception_expiry.clear();
    ctx.metrics.exception_exempted.clear();
    ctx.metrics.exception_state.clear();
    ctx.metrics.exception_node.clear();
    for ex in exceptions {
        let name = ex.name_any();
        let exempted: Vec<String> = nodes
            .iter()
            .filter(|n| {
                states.get(&n.name).is_some_and(|s| {
                    s.compliance == Compliance::NonCompliant
                        && exemption::exempting(exceptions, &n.name, &n.labels, s, now)
                            .is_some_and(|by| by.contains(&name))
                })
            })
            .map(|n| n.name.clone())
            .collect();
        let status = exemption::status(ex, &labelled, &exempted, now);
        let labels = ExceptionLabel {
            exception: name.clone(),
            ticket: ex.spec.ticket.clone(),
        };
        ctx.metrics
            .exception_expiry
            .get_or_create(&labels)
            .set(ex.spec.expires.0.as_second());
        ctx.metrics
            .exception_exempted
            .get_or_create(&labels)
            .set(status.exempted_nodes.into());
        for state in [
            ExceptionState::Active,
            ExceptionState::MatchesNoNode,
            ExceptionState::Expired,
        ] {
            ctx.metrics
                .exception_state
                .get_or_create(&ExceptionStateLabel {
                    exception: name.clone(),
                    ticket: ex.spec.ticket.clone(),
                    state: state.as_str(),
                })
                .set((status.state == state).into());
        }
        if !exemption::expired(ex, now) {
            for (node, labels) in &labelled {
                if exemption::matches(ex, node, labels) {
                    ctx.metrics
                        .exception_node
                        .get_or_create(&ExceptionNode {
                            exception: name.clone(),
                            node: node.to_string(),
                        })
                        .set(exempted.iter().any(|e| e == node).into());
                }
            }
        }
        if ex.status.as_ref() == Some(&status) {
            continue;
        }
        let api: Api<LoopbackException> = Api::all(ctx.client.clone());
        let patch = serde_json::json!({
            "apiVersion": LoopbackException::api_version(&()),
            "kind": LoopbackException::kind(&()),
            "status": status,
        });
        let params = PatchParams::apply(api::CONTROLLER_MANAGER).force();
        if let Err(e) = api
            .patch_status(&name, &params, &Patch::Apply(&patch))
            .await
        {
            ctx.metrics.errors.inc();
            tracing::warn!(exception = %name, error = %e, "writing the exception's status failed; retrying on the next round");
        } else {
            ctx.metrics.status_writes.inc();
        }
    }
}

async fn write_status(
    client: &Client,
    policy: &LoopbackPolicy,
    status: &LoopbackPolicyStatus,
) -> kube::Result<()> {
    let api: Api<LoopbackPolicy> = Api::all(client.clone());
    let patch = serde_json::json!({
        "apiVersion": LoopbackPolicy::api_version(&()),
        "kind": LoopbackPolicy::kind(&()),
        "status": status,
    });
    let params = PatchParams::apply(api::CONTROLLER_MANAGER).force();
    api.patch_status(&policy.name_any(), &params, &Patch::Apply(&patch))
        .await
        .map(|_| ())
}

async fn add_finalizer(client: &Client, policy: &LoopbackPolicy) -> kube::Result<()> {
    let mut finalizers = policy.finalizers().to_vec();
    finalizers.push(api::FINALIZER.to_string());
    set_finalizers(client, policy, finalizers).await
}

async fn remove_finalizer(client: &Client, policy: &LoopbackPolicy) -> kube::Result<()> {
    let finalizers = policy
        .finalizers()
        .iter()
        .filter(|f| *f != api::FINALIZER)
        .cloned()
        .collect();
    match set_finalizers(client, policy, finalizers).await {
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        other => other,
    }
}

/// A merge patch of the finalizers carrying the cached resourceVersion: if anyone changed the
/// object since (another finalizer, say), it fails with a conflict and is redone next round.
async fn set_finalizers(
    client: &Client,
    policy: &LoopbackPolicy,
    finalizers: Vec<String>,
) -> kube::Result<()> {
    let api: Api<LoopbackPolicy> = Api::all(client.clone());
    let patch = serde_json::json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": policy.resource_version()},
    });
    api.patch(
        &policy.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map(|_| ())
}
