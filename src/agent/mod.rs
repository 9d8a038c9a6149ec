//! `loopguard agent`: runs on every node (DaemonSet, host network), enforces the policy that
//! governs its node, repairs drift, and reports in its node's LoopbackNodeState.
//!
//! The node stays safe without the API server: the policy last followed is remembered on the
//! host, so a restarted agent enforces it before it can reach the cluster, and drift is repaired
//! whatever the API server's state: the status is published by a task of its own, latest value
//! wins, and catches up when the server is back. A local problem the agent cannot fix (a corrupt
//! state file, missing iptables binaries, no NET_ADMIN) is reported as an `Error` in the node's
//! status, with what to do; the agent stays up, writes nothing, and tries again at every resync.

pub mod history;
pub mod memory;
pub mod report;

use crate::api::{self, LoopbackPolicy, Mode, OnRemoval};
use crate::metrics::{self, Liveness, Readiness};
use crate::node::converge::Convergence;
use crate::node::facts::ApplicabilityMode;
use crate::node::watch::{DriftWatch, Trigger, run_pass};
use crate::node::{Engine, EngineConfig, Report};
use crate::rules::catalog::FamilyMode;
use crate::rules::catalog::RuleId;
use crate::runtime::{OnInvalid, is_synced, keep_whole, reflect};
use crate::{Error, Result, selection};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use memory::{History, Memo, Remembered};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family as MetricFamily;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use report::{Following, Reporter};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Flags of `loopguard agent`.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// The node this agent runs on (the downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Where the host's root filesystem (at least /var/lib/dpkg and /usr/sbin) is mounted, for the
    /// applicability check.
    #[arg(long, env = "LOOPGUARD_HOST_ROOT", default_value = "/host")]
    pub host_root: PathBuf,
    /// Where the rules this agent inserted are recorded (a hostPath, so restarts remember).
    #[arg(long, env = "LOOPGUARD_STATE_FILE", default_value = crate::node::state_file::DEFAULT_PATH)]
    pub state_file: PathBuf,
    /// Address of /metrics, /healthz and /readyz (the agent uses the host network).
    #[arg(long, env = "LOOPGUARD_METRICS_ADDR", default_value = "0.0.0.0:9742", value_parser = crate::args::socket_addr)]
    pub metrics_addr: SocketAddr,
    /// Seconds between full re-checks (and polls, with the legacy backend).
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = crate::args::seconds)]
    pub resync: Duration,
    /// iptables backend: detect it like kubernetes-sigs/iptables-wrappers, or force one.
    #[arg(long, value_enum, default_value_t = crate::node::facts::BackendChoice::Auto)]
    pub backend: crate::node::facts::BackendChoice,
    /// Seconds to wait for the xtables lock.
    #[arg(long, value_name = "SECONDS", default_value_t = 5, value_parser = crate::args::wait_seconds)]
    pub wait: u64,
    /// Seconds between heartbeats: the node's status is written at least this often (with a new
    /// lastVerifiedTime) even when nothing changes, so the controller knows the agent is alive.
    #[arg(long, value_name = "SECONDS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(10..=86_400))]
    pub heartbeat: u64,
    /// Where a fatal error's reason is written for `kubectl describe pod`.
    #[arg(long, value_name = "PATH", default_value = "/dev/termination-log")]
    pub termination_log: PathBuf,
}

/// Runs the agent; on a fatal error, writes the reason to the termination log and exits 2.
pub fn main(args: AgentArgs) -> Result<ExitCode> {
    let termination_log = args.termination_log.clone();
    let result = crate::runtime::run_async(run(args));
    if let Err(e) = &result {
        let _ = std::fs::write(&termination_log, format!("{e}\n"));
    }
    result
}

fn following(policy: &Remembered) -> Following {
    Following {
        name: policy.name.clone(),
        generation: policy.generation,
        mode: policy.spec.mode,
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

const COMPLIANCE_STATES: [(api::Compliance, &str); 5] = [
    (api::Compliance::Compliant, "Compliant"),
    (api::Compliance::NonCompliant, "NonCompliant"),
    (api::Compliance::NotApplicable, "NotApplicable"),
    (api::Compliance::Error, "Error"),
    (api::Compliance::Unmanaged, "Unmanaged"),
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriterLabels {
    changed_by: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TriggerLabels {
    trigger: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    rule: &'static str,
    verdict: &'static str,
}

/// The verdicts a node state's checks carry.
const RULE_VERDICTS: [&str; 5] = ["Pass", "Fail", "NotApplicable", "Ignored", "Unknown"];

struct Metrics {
    rules_enforced: Gauge,
    /// Per loopback rule (ComplianceAsCode id): 1 for its verdict now, 0 for the others.
    rule_verdict: MetricFamily<RuleLabels, Gauge>,
    compliant: Gauge,
    /// 1 for the node's compliance now, 0 for the other values.
    compliance: MetricFamily<StateLabels, Gauge>,
    /// When the node was last checked successfully (Unix seconds).
    last_check: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// 1 while drift is noticed from nftables events, 0 while polling.
    event_driven: Gauge,
    not_converging: Gauge,
    repairs: Counter,
    /// Repairs by the process whose change they undid (`unknown` where the kernel does not say).
    repairs_by: MetricFamily<WriterLabels, Counter>,
    repairs_on: MetricFamily<TriggerLabels, Counter>,
    repair_latency: Histogram,
    check_seconds: Histogram,
    apply_seconds: Histogram,
    errors: MetricFamily<ErrorLabels, Counter>,
    status_writes: Counter,
    invalid_objects: Counter,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Metrics {
        let buckets = || {
            Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
            ])
        };
        let m = Metrics {
            rules_enforced: Gauge::default(),
            rule_verdict: MetricFamily::default(),
            compliant: Gauge::default(),
            compliance: MetricFamily::default(),
            last_check: Gauge::default(),
            event_driven: Gauge::default(),
            not_converging: Gauge::default(),
            repairs: Counter::default(),
            repairs_by: MetricFamily::default(),
            repairs_on: MetricFamily::default(),
            repair_latency: buckets(),
            check_seconds: buckets(),
            apply_seconds: buckets(),
            errors: MetricFamily::default(),
            status_writes: Counter::default(),
            invalid_objects: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("loopguard_agent");
        r.register(
            "rules_enforced",
            "Baseline rules in place on this node",
            m.rules_enforced.clone(),
        );
        r.register(
            "rule_verdict",
            "Per loopback rule of the CIS benchmarks (rule: ComplianceAsCode id): 1 for its verdict on this node now (Pass, Fail, NotApplicable, Ignored, Unknown), 0 for the others; all 0 while no policy governs the node or the check failed",
            m.rule_verdict.clone(),
        );
        r.register(
            "compliant",
            "1 when the node is compliant (0 also when the rule does not apply: see compliance)",
            m.compliant.clone(),
        );
        r.register(
            "compliance",
            "1 for the node's compliance now (Compliant, NonCompliant, NotApplicable, Error, Unmanaged), 0 for the others",
            m.compliance.clone(),
        );
        r.register(
            "last_check_timestamp_seconds",
            "When the node's chains were last read successfully",
            m.last_check.clone(),
        );
        r.register(
            "event_driven",
            "1 while drift is noticed from nftables events, 0 while polling (legacy backend, or events refused)",
            m.event_driven.clone(),
        );
        r.register(
            "not_converging",
            "1 while repairs keep being undone and loopguard backs off",
            m.not_converging.clone(),
        );
        r.register("repairs", "Drift repairs", m.repairs.clone());
        r.register(
            "repairs_by_writer",
            "Drift repairs by the process whose change they undid (changed_by: its command name as the kernel gives it for nftables transactions, cut to 15 characters; unknown elsewhere)",
            m.repairs_by.clone(),
        );
        r.register(
            "repairs_by_trigger",
            "Drift repairs by what brought the pass that made them (nft_event, legacy_probe, after_own_write, resync, retry): a working event path repairs before the resync",
            m.repairs_on.clone(),
        );
        r.register(
            "repair_latency_seconds",
            "From the ruleset change (or poll) to the rules being back",
            m.repair_latency.clone(),
        );
        r.register(
            "check_duration_seconds",
            "Passes that only read",
            m.check_seconds.clone(),
        );
        r.register(
            "apply_duration_seconds",
            "Passes that wrote",
            m.apply_seconds.clone(),
        );
        r.register("errors", "Errors by kind", m.errors.clone());
        r.register(
            "status_writes",
            "LoopbackNodeState status writes",
            m.status_writes.clone(),
        );
        r.register(
            "invalid_objects",
            "Objects skipped because they could not be read (written by a newer loopguard?)",
            m.invalid_objects.clone(),
        );
        crate::metrics::register_build_info(registry, "agent");
        m
    }

    fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&ErrorLabels { kind: kind.into() })
            .inc();
    }
}

/// Everything the agent's loop holds.
struct Agent {
    node_name: String,
    engine: Engine,
    convergence: Convergence,
    /// The last pass's rules were undone right after its write: the drift watch looks again.
    look_again: bool,
    policy_memo: Memo<Remembered>,
    history_memo: Memo<History>,
    following: Option<Remembered>,
    /// A policy that no longer governs the node, whose rules could not be removed yet.
    releasing: Option<Remembered>,
    history: History,
    last_report: Option<Report>,
    /// The latest status, for the publisher.
    status: tokio::sync::watch::Sender<Option<api::LoopbackNodeStateStatus>>,
    /// Why the agent cannot enforce right now (the last pass failed), for /readyz.
    trouble: Option<String>,
    /// When a node no policy governs was last checked.
    unmanaged_checked: Option<Instant>,
    resync: Duration,
    metrics: Metrics,
}

async fn run(args: AgentArgs) -> Result<()> {
    let config = EngineConfig {
        state_file: args.state_file.clone(),
        host_root: args.host_root.clone(),
        backend: args.backend,
        wait: Duration::from_secs(args.wait),
        ..EngineConfig::default()
    };
    let mut engine = tokio::task::spawn_blocking(move || Engine::unchecked(config))
        .await
        .expect("learning the node's facts does not panic");
    tracing::info!(node = %args.node_name, backend = %engine.facts().backend, reason = %engine.facts().backend_reason, "node engine ready");

    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let ready = Readiness::default();
    // The loop goes round at least every 2 s, and a pass may wait twice for the xtables lock.
    let live = Liveness::within(args.resync * 2 + Duration::from_secs(2 * args.wait + 30));
    metrics::serve(
        args.metrics_addr,
        Arc::new(registry),
        ready.clone(),
        live.clone(),
    )
    .await?;

    let policy_memo: Memo<Remembered> = Memo::beside(&args.state_file, "policy.json");
    let history_memo: Memo<History> = Memo::beside(&args.state_file, "history.json");
    let mut drift = DriftWatch::new(&mut engine, args.resync);
    metrics.event_driven.set(drift.event_driven() as i64);
    let (status, latest) = tokio::sync::watch::channel(None);
    let mut agent = Agent {
        node_name: args.node_name.clone(),
        engine,
        convergence: Convergence::default(),
        look_again: false,
        following: None,
        releasing: None,
        history: history_memo.load().unwrap_or_default(),
        history_memo,
        policy_memo,
        last_report: None,
        status,
        trouble: None,
        unmanaged_checked: None,
        resync: args.resync,
        metrics,
    };
    // Enforce what this node followed before (or finish removing its rules), without waiting
    // for the API server.
    if let Some(remembered) = agent.policy_memo.load() {
        if remembered.releasing {
            tracing::info!(policy = %remembered.name, "retrying the cleanup of a policy that no longer governs this node");
            agent.releasing = Some(remembered);
            agent.retry_release().await;
        } else {
            tracing::info!(policy = %remembered.name, "enforcing the remembered policy until the cluster answers");
            agent.follow(remembered).await;
        }
    }
    live.beat();

    let client = Client::try_default().await?;
    let changed = Arc::new(Notify::new());
    let invalid = agent.metrics.invalid_objects.clone();
    let on_invalid: OnInvalid = Arc::new(move |_, _| {
        invalid.inc();
    });
    let policies = reflect(
        Api::<DeserializeGuard<LoopbackPolicy>>::all(client.clone()),
        watcher::Config::default(),
        changed.clone(),
        on_invalid.clone(),
        keep_whole,
    );
    let nodes = reflect(
        Api::<DeserializeGuard<Node>>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={}", args.node_name)),
        changed.clone(),
        on_invalid,
        keep_whole,
    );
    let publisher = {
        let errors = agent.metrics.errors.clone();
        tokio::spawn(report::publish_loop(
            Reporter::new(client, &args.node_name),
            nodes.clone(),
            agent.status.subscribe(),
            Duration::from_secs(args.heartbeat),
            agent.metrics.status_writes.clone(),
            move || {
                errors
                    .get_or_create(&ErrorLabels {
                        kind: "ApiError".into(),
                    })
                    .inc();
            },
        ))
    };
    drop(latest);
    let mut synced = false;
    let mut retry = tokio::time::interval(Duration::from_secs(2));
    let mut shutdown = crate::runtime::shutdown_signal()?;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = changed.notified() => {}
            _ = retry.tick() => {}
            trigger = drift.next(agent.convergence.retry_at(Instant::now())) => agent.pass(trigger).await,
        }
        if std::mem::take(&mut agent.look_again) {
            drift.look_again();
        }
        if agent.engine.facts().backend != drift.backend() {
            tracing::warn!(from = %drift.backend(), to = %agent.engine.facts().backend, "the node's iptables backend changed; watching the new one");
            drift = DriftWatch::new(&mut agent.engine, args.resync);
            agent.metrics.event_driven.set(drift.event_driven() as i64);
        }
        if !synced && is_synced(&policies) && is_synced(&nodes) {
            synced = true;
            tracing::info!("caches synced");
        }
        if synced {
            agent.decide(&policies, &nodes).await;
        }
        if agent.releasing.is_some() && agent.following.is_none() {
            agent.retry_release().await;
        }
        ready.set_reason(
            agent
                .trouble
                .clone()
                .or_else(|| (!synced).then(|| "caches not synced yet".into())),
        );
        live.beat();
    }
    publisher.abort();
    tracing::info!("stopping; the rules stay in place");
    Ok(())
}

impl Agent {
    /// Hands a status to the publisher, stamped with the time the node was checked.
    fn set_status(&mut self, mut status: api::LoopbackNodeStateStatus) {
        let now = jiff::Timestamp::now();
        status.last_verified_time = Some(Time(now));
        status.agent_version = Some(env!("CARGO_PKG_VERSION").into());
        for (compliance, state) in COMPLIANCE_STATES {
            let value = (status.compliance == compliance) as i64;
            self.metrics
                .compliance
                .get_or_create(&StateLabels { state })
                .set(value);
        }
        for rule in RuleId::ALL {
            let check = status.checks.iter().find(|c| c.id == rule.cac_id());
            for verdict in RULE_VERDICTS {
                let value = check.is_some_and(|c| c.verdict == verdict) as i64;
                self.metrics
                    .rule_verdict
                    .get_or_create(&RuleLabels {
                        rule: rule.cac_id(),
                        verdict,
                    })
                    .set(value);
            }
        }
        if status.compliance != api::Compliance::Error {
            self.metrics
                .last_check
                .set(now.as_millisecond() as f64 / 1000.0);
        }
        self.status.send_replace(Some(status));
    }

    /// Applies the policy that governs the node now, if it changed.
    async fn decide(&mut self, policies: &Store<LoopbackPolicy>, nodes: &Store<Node>) {
        let Some(node) = nodes.get(&ObjectRef::new(&self.node_name)) else {
            return; // Our Node is not known (yet): keep doing what we do.
        };
        let all = policies.state();
        let winner = selection::governing(node.labels(), all.iter().map(|p| p.as_ref()));
        match (winner, &self.following) {
            (Some(w), Some(current))
                if w.name_any() == current.name && w.metadata.generation == current.generation => {}
            (Some(w), _) => {
                let next = Remembered::from_policy(w);
                self.policy_memo.store(Some(&next));
                self.releasing = None;
                self.follow(next).await;
            }
            (None, Some(current)) => {
                let mut current = current.clone();
                current.releasing = true;
                self.following = None;
                self.policy_memo.store(Some(&current));
                self.releasing = Some(current);
                self.retry_release().await;
            }
            (None, None) => {
                let due = self
                    .unmanaged_checked
                    .is_none_or(|t| t.elapsed() >= self.resync);
                if self.releasing.is_none() && due {
                    self.check_unmanaged().await;
                }
            }
        }
    }

    /// Checks a node no policy governs, as often as a followed one (its status stays verified);
    /// the reason it is unmanaged (no policy, rules removed, rules retained) is kept.
    async fn check_unmanaged(&mut self) {
        self.unmanaged_checked = Some(Instant::now());
        let previous = self
            .status
            .borrow()
            .clone()
            .filter(|s| s.compliance == api::Compliance::Unmanaged);
        let (reason, message) = previous.map_or_else(
            || {
                (
                    "NoPolicy".to_string(),
                    "no LoopbackPolicy selects this node".to_string(),
                )
            },
            |s| (s.reason, s.message),
        );
        let status = match self.check_only().await {
            Ok(report) => {
                self.trouble = None;
                let status = report::status_unmanaged(&reason, message, Some(&report));
                self.last_report = Some(report);
                status
            }
            Err(e) => self.failed(None, "checking the node", &e),
        };
        self.set_status(status);
    }

    /// Starts following `policy`: reconfigure the engine and enforce (or check, in Audit mode).
    async fn follow(&mut self, policy: Remembered) {
        let spec = &policy.spec;
        let families = crate::rules::families(spec.ip_families.contains(&api::IpFamily::IPv4));
        let applicability = match spec.applicability {
            api::Applicability::Auto => ApplicabilityMode::Auto,
            api::Applicability::Always => ApplicabilityMode::Always,
        };
        let placement = match spec.placement {
            api::Placement::Insert => crate::rules::Placement::Insert,
            api::Placement::Append => crate::rules::Placement::Append,
        };
        self.engine.reconfigure(families, applicability, placement);
        self.engine.set_rule_families(rule_family_modes(spec));
        self.history = History::continued(Some(self.history.clone()), &policy.name);
        tracing::info!(policy = %policy.name, generation = ?policy.generation, mode = ?spec.mode, "following policy");
        self.following = Some(policy);
        self.pass(Trigger::Start { at: Instant::now() }).await;
    }

    /// Removes what loopguard inserted for a policy that no longer governs the node (or keeps it:
    /// onRemoval Retain). A cleanup that fails is reported and retried until it succeeds.
    async fn retry_release(&mut self) {
        let Some(previous) = self.releasing.clone() else {
            return;
        };
        let status = if previous.spec.on_removal == OnRemoval::Retain {
            tracing::info!(policy = %previous.name, "no policy governs this node any more; rules retained");
            let report = self.check_only().await.ok();
            let status = report::status_unmanaged(
                "RulesRetained",
                format!(
                    "policy {} no longer governs this node; onRemoval Retain kept its rules",
                    previous.name
                ),
                report.as_ref(),
            );
            self.last_report = report;
            self.finish_release();
            status
        } else {
            let engine = self.engine.clone();
            match tokio::task::spawn_blocking(move || engine.cleanup())
                .await
                .expect("cleanup does not panic")
            {
                Ok(report) => {
                    let removed = report.changes.as_ref().map_or(0, Vec::len);
                    tracing::info!(policy = %previous.name, removed, "no policy governs this node any more; removed the rules loopguard inserted");
                    let status = report::status_unmanaged(
                        "RulesRemoved",
                        format!(
                            "policy {} no longer governs this node; removed the {removed} rules loopguard had inserted (adopted rules stay)",
                            previous.name
                        ),
                        Some(&report),
                    );
                    self.last_report = Some(report);
                    self.finish_release();
                    status
                }
                Err(e) => {
                    let context = format!(
                        "removing the rules of policy {} (retried every 2 s until it works)",
                        previous.name
                    );
                    self.failed(Some(&following(&previous)), &context, &e)
                }
            }
        };
        self.set_status(status);
    }

    fn finish_release(&mut self) {
        self.releasing = None;
        self.trouble = None;
        self.unmanaged_checked = Some(Instant::now());
        self.policy_memo.store(None);
    }

    /// Logs and counts an error, remembers it for /readyz, and returns the Error status.
    fn failed(
        &mut self,
        policy: Option<&Following>,
        doing: &str,
        e: &Error,
    ) -> api::LoopbackNodeStateStatus {
        let kind = e.reason();
        self.metrics.error(kind);
        let changed = self.trouble.as_deref() != Some(&e.to_string());
        if changed {
            tracing::error!(reason = kind, error = %e, "{doing} failed");
        }
        self.trouble = Some(e.to_string());
        report::status_from_error(
            policy,
            kind,
            format!("{doing} failed: {e}"),
            Some(&self.history),
        )
    }

    async fn check_only(&self) -> Result<Report> {
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || engine.check())
            .await
            .expect("check does not panic")
    }

    /// One enforce (or audit check) for the policy followed; counts and reports repairs.
    async fn pass(&mut self, trigger: Trigger) {
        let Some(policy) = &self.following else {
            return;
        };
        let audit = policy.spec.mode == Mode::Audit;
        let following = following(policy);
        let started = Instant::now();
        match run_pass(&mut self.engine, &mut self.convergence, audit, trigger).await {
            Ok(pass) => {
                let elapsed = started.elapsed().as_secs_f64();
                if pass.report.wrote() {
                    self.metrics.apply_seconds.observe(elapsed);
                } else {
                    self.metrics.check_seconds.observe(elapsed);
                }
                self.look_again |= pass.look_again;
                if let Some(latency) = pass.repair_latency {
                    self.history.repairs += 1;
                    self.history.last_repair_time = Some(Time(jiff::Timestamp::now()));
                    self.history.last_repair_by = pass.changed_by.map(|w| w.to_string());
                    self.history_memo.store(Some(&self.history));
                    self.metrics.repairs.inc();
                    let writer = pass
                        .changed_by
                        .map_or_else(|| "unknown".into(), |w| w.name());
                    self.metrics
                        .repairs_by
                        .get_or_create(&WriterLabels { changed_by: writer })
                        .inc();
                    self.metrics
                        .repairs_on
                        .get_or_create(&TriggerLabels {
                            trigger: trigger.label(),
                        })
                        .inc();
                    self.metrics.repair_latency.observe(latency.as_secs_f64());
                }
                let present = pass
                    .report
                    .findings
                    .iter()
                    .filter(|f| f.finding.state != crate::rules::RuleState::Missing)
                    .count();
                self.metrics.rules_enforced.set(present as i64);
                self.metrics.compliant.set(pass.report.compliant as i64);
                self.metrics.not_converging.set(
                    (pass.report.reason == crate::node::engine::reason::NOT_CONVERGING) as i64,
                );
                self.trouble = None;
                let status = report::status_from_report(&following, &pass.report, &self.history);
                self.set_status(status);
                self.last_report = Some(pass.report);
            }
            Err(e) => {
                let status = self.failed(Some(&following), "enforcing the policy", &e);
                self.set_status(status);
            }
        }
    }
}

/// The modes of the rule families besides iptables, as the policy asks (absent: ignored); in
/// Audit mode an Enforce family is only reported.
fn rule_family_modes(spec: &api::LoopbackPolicySpec) -> [FamilyMode; 3] {
    let families = &spec.rule_families;
    [families.nftables, families.ufw, families.firewalld].map(|mode| match (mode, spec.mode) {
        (api::FamilyMode::Ignore, _) => FamilyMode::Ignore,
        (_, api::Mode::Audit) | (api::FamilyMode::Report, _) => FamilyMode::Report,
        (api::FamilyMode::Enforce, api::Mode::Enforce) => FamilyMode::Enforce,
    })
}
