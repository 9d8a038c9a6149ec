//! `loopguard agent`: runs on every node (DaemonSet, host network), enforces the policy that
//! governs its node, repairs drift, and reports in its node's LoopbackNodeState.
//!
//! The node stays safe without the API server: the policy last followed is remembered on the
//! host, so a restarted agent enforces it before it can reach the cluster, and drift is repaired
//! whatever the API server's state. Status catches up when the server is back.

pub mod report;

use crate::api::{self, LoopbackPolicy, LoopbackPolicySpec, Mode, OnRemoval};
use crate::metrics::{self, Readiness};
use crate::node::converge::Convergence;
use crate::node::facts::ApplicabilityMode;
use crate::node::watch::{DriftWatch, Trigger, run_pass};
use crate::node::{Engine, EngineConfig, Report};
use crate::runtime::{is_synced, reflect};
use crate::{Result, selection};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family as MetricFamily;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use report::{Following, Reporter};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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
    #[arg(long, env = "LOOPGUARD_METRICS_ADDR", default_value = "0.0.0.0:9742")]
    pub metrics_addr: SocketAddr,
    /// Seconds between full re-checks (and polls, with the legacy backend).
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = crate::cli::seconds)]
    pub resync: Duration,
    /// iptables backend: detect it like kubernetes-sigs/iptables-wrappers, or force one.
    #[arg(long, value_enum, default_value_t = crate::node::facts::BackendChoice::Auto)]
    pub backend: crate::node::facts::BackendChoice,
    /// Seconds to wait for the xtables lock.
    #[arg(long, value_name = "SECONDS", default_value_t = 5, value_parser = crate::cli::wait_seconds)]
    pub wait: u64,
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

/// The policy a node follows, as remembered on the host between agent runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Remembered {
    name: String,
    generation: Option<i64>,
    spec: LoopbackPolicySpec,
}

impl Remembered {
    fn from_policy(policy: &LoopbackPolicy) -> Remembered {
        Remembered {
            name: policy.name_any(),
            generation: policy.metadata.generation,
            spec: policy.spec.clone(),
        }
    }

    fn following(&self) -> Following {
        Following {
            name: self.name.clone(),
            generation: self.generation,
            mode: self.spec.mode,
        }
    }

    fn load(path: &Path) -> Option<Remembered> {
        let text = std::fs::read_to_string(path).ok()?;
        serde_json::from_str(&text)
            .inspect_err(|e| tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable remembered policy"))
            .ok()
    }

    fn store(this: Option<&Remembered>, path: &Path) {
        let result = match this {
            Some(r) => {
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, serde_json::to_vec(r).expect("serializes"))
                    .and_then(|()| std::fs::rename(&tmp, path))
            }
            None => std::fs::remove_file(path).or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            }),
        };
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "could not remember the policy");
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: String,
}

struct Metrics {
    rules_enforced: Gauge,
    compliant: Gauge,
    not_converging: Gauge,
    repairs: Counter,
    repair_latency: Histogram,
    check_seconds: Histogram,
    apply_seconds: Histogram,
    errors: MetricFamily<ErrorLabels, Counter>,
    status_writes: Counter,
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
            compliant: Gauge::default(),
            not_converging: Gauge::default(),
            repairs: Counter::default(),
            repair_latency: buckets(),
            check_seconds: buckets(),
            apply_seconds: buckets(),
            errors: MetricFamily::default(),
            status_writes: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("loopguard_agent");
        r.register(
            "rules_enforced",
            "Baseline rules in place on this node",
            m.rules_enforced.clone(),
        );
        r.register(
            "compliant",
            "1 when the node is compliant",
            m.compliant.clone(),
        );
        r.register(
            "not_converging",
            "1 while repairs keep being undone and loopguard backs off",
            m.not_converging.clone(),
        );
        r.register("repairs", "Drift repairs", m.repairs.clone());
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
    remembered_path: PathBuf,
    following: Option<Remembered>,
    repairs: i64,
    last_repair: Option<Time>,
    last_report: Option<Report>,
    /// The status to publish (kept until a write succeeds).
    pending: Option<api::LoopbackNodeStateStatus>,
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
    let engine = tokio::task::spawn_blocking(move || -> Result<Engine> {
        let engine = Engine::new(config)?;
        engine.preflight()?;
        Ok(engine)
    })
    .await
    .expect("preflight does not panic")?;
    tracing::info!(node = %args.node_name, backend = %engine.facts().backend, reason = %engine.facts().backend_reason, "node engine ready");

    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let ready = Readiness::default();
    metrics::serve(args.metrics_addr, Arc::new(registry), ready.clone()).await?;

    let remembered_path = args.state_file.with_file_name("policy.json");
    let mut drift = DriftWatch::new(engine.facts().backend, args.resync);
    let mut agent = Agent {
        node_name: args.node_name.clone(),
        engine,
        convergence: Convergence::default(),
        following: None,
        remembered_path: remembered_path.clone(),
        repairs: 0,
        last_repair: None,
        last_report: None,
        pending: None,
        metrics,
    };
    // Enforce what this node followed before, without waiting for the API server.
    if let Some(remembered) = Remembered::load(&remembered_path) {
        tracing::info!(policy = %remembered.name, "enforcing the remembered policy until the cluster answers");
        agent.follow(remembered).await;
    }

    let client = Client::try_default().await?;
    let changed = Arc::new(Notify::new());
    let policies = reflect(
        Api::<LoopbackPolicy>::all(client.clone()),
        watcher::Config::default(),
        changed.clone(),
    );
    let nodes = reflect(
        Api::<Node>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={}", args.node_name)),
        changed.clone(),
    );
    let mut reporter = Reporter::new(client, &args.node_name);
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
        if agent.engine.facts().backend != drift.backend() {
            tracing::warn!(from = %drift.backend(), to = %agent.engine.facts().backend, "the node's iptables backend changed; watching the new one");
            drift = DriftWatch::new(agent.engine.facts().backend, args.resync);
        }
        if !synced && is_synced(&policies) && is_synced(&nodes) {
            synced = true;
            tracing::info!("caches synced");
        }
        if synced {
            agent.decide(&policies, &nodes).await;
            ready.set(true);
        }
        if let Some(status) = agent.pending.clone() {
            let node = nodes.get(&ObjectRef::new(&agent.node_name));
            match reporter.publish(node.as_deref(), &status).await {
                Ok(wrote) => {
                    if wrote {
                        agent.metrics.status_writes.inc();
                    }
                    agent.pending = None;
                }
                Err(e) => {
                    agent.metrics.error("ApiError");
                    tracing::warn!(error = %e, "status not written; retrying");
                }
            }
        }
    }
    tracing::info!("stopping; the rules stay in place");
    Ok(())
}

impl Agent {
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
                Remembered::store(Some(&next), &self.remembered_path);
                self.follow(next).await;
            }
            (None, Some(current)) => {
                let current = current.clone();
                self.release(&current).await;
            }
            (None, None) => {
                if self.last_report.is_none() && self.pending.is_none() {
                    self.last_report = self.check_only().await;
                    self.pending = Some(report::status_unmanaged(
                        "NoPolicy",
                        "no LoopbackPolicy selects this node".into(),
                        self.last_report.as_ref(),
                    ));
                }
            }
        }
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
        if self.following.as_ref().map(|f| &f.name) != Some(&policy.name) {
            self.repairs = 0;
            self.last_repair = None;
        }
        tracing::info!(policy = %policy.name, generation = ?policy.generation, mode = ?spec.mode, "following policy");
        self.following = Some(policy);
        self.pass(Trigger::Start { at: Instant::now() }).await;
    }

    /// The node is no longer governed: remove what loopguard inserted, or keep it (onRemoval).
    async fn release(&mut self, previous: &Remembered) {
        self.following = None;
        Remembered::store(None, &self.remembered_path);
        let status = if previous.spec.on_removal == OnRemoval::Retain {
            tracing::info!(policy = %previous.name, "no policy governs this node any more; rules retained");
            self.last_report = self.check_only().await;
            report::status_unmanaged(
                "RulesRetained",
                format!(
                    "policy {} no longer governs this node; onRemoval Retain kept its rules",
                    previous.name
                ),
                self.last_report.as_ref(),
            )
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
                    status
                }
                Err(e) => {
                    let kind = e.reason();
                    self.metrics.error(kind);
                    tracing::error!(error = %e, "cleanup failed");
                    report::status_from_error(
                        None,
                        kind,
                        format!("cleanup after policy {} failed: {e}", previous.name),
                        0,
                    )
                }
            }
        };
        self.pending = Some(status);
    }

    async fn check_only(&self) -> Option<Report> {
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || engine.check())
            .await
            .expect("check does not panic")
            .ok()
    }

    /// One enforce (or audit check) for the policy followed; counts and reports repairs.
    async fn pass(&mut self, trigger: Trigger) {
        let Some(policy) = &self.following else {
            return;
        };
        let audit = policy.spec.mode == Mode::Audit;
        let following = policy.following();
        let started = Instant::now();
        match run_pass(&mut self.engine, &mut self.convergence, audit, trigger).await {
            Ok(pass) => {
                let elapsed = started.elapsed().as_secs_f64();
                if pass.report.wrote() {
                    self.metrics.apply_seconds.observe(elapsed);
                } else {
                    self.metrics.check_seconds.observe(elapsed);
                }
                if let Some(latency) = pass.repair_latency {
                    self.repairs += 1;
                    self.last_repair = Some(Time(jiff::Timestamp::now()));
                    self.metrics.repairs.inc();
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
                self.pending = Some(report::status_from_report(
                    &following,
                    &pass.report,
                    self.repairs,
                    self.last_repair.as_ref(),
                ));
                self.last_report = Some(pass.report);
            }
            Err(e) => {
                let kind = e.reason();
                self.metrics.error(kind);
                tracing::error!(error = %e, "pass failed");
                self.pending = Some(report::status_from_error(
                    Some(&following),
                    kind,
                    e.to_string(),
                    self.repairs,
                ));
            }
        }
    }
}
