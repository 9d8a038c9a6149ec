//! `loopguard report`: the evidence an auditor asks for, per policy and node, read from the cluster
//! (the kubeconfig as kubectl finds it) and written as a table, JSON (schema:
//! `docs/report.schema.json`, `loopguard report --schema`), CSV, or one self-contained HTML page.
//!
//! Building the evidence and rendering it are pure; only [`run`] talks to the API server.

use crate::api::{LoopbackNodeState, LoopbackNodeStateStatus, LoopbackPolicy};
use crate::{Error, Result};

pub mod archive;
mod html;
mod oscal;
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use schemars::JsonSchema;
use serde::Serialize;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

/// The ComplianceAsCode rule, and what it stands for.
pub const RULE_ID: &str = crate::rules::catalog::SEED_XCCDF_ID;
pub const RULE_TITLE: &str = "Set configuration for IPv6 loopback traffic";
pub const REFERENCES: [&str; 2] = [
    "CIS Debian Linux 12 / Ubuntu 24.04 Benchmark 4.4.3.2 (Ensure ip6tables loopback traffic is configured)",
    "PCI DSS v4.0 1.4.1",
];

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
    Html,
    /// OSCAL assessment results (JSON).
    Oscal,
}

/// Flags of `loopguard report`.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    #[arg(long, short, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    /// Only this policy's nodes.
    #[arg(long)]
    pub policy: Option<String>,
    /// A node state verified longer ago than this (seconds) counts as Unknown: no live agent
    /// vouches for it (the default is the chart's heartbeat plus grace period).
    #[arg(long, value_name = "SECONDS", default_value_t = 720)]
    pub stale_after: u64,
    /// Report on the cluster's Nodes (those matching --node-selector) only, and count each one
    /// without a LoopbackNodeState as Missing: no agent has ever reported from it.
    #[arg(long)]
    pub expect_every_node: bool,
    /// With --expect-every-node: the nodes the agent DaemonSet covers, as a label selector
    /// (`kubernetes.io/os=linux`; empty: every node).
    #[arg(long, value_name = "SELECTOR", default_value = "")]
    pub node_selector: String,
    /// What makes the exit code 1: any node not compliant (`non-compliant`, the default: a node
    /// NonCompliant, in Error, Unknown or Missing), or only nodes no live agent covers
    /// (`uncovered`: Error, Unknown or Missing; what `helm test` checks), or also nodes no policy
    /// governs (`unmanaged`: every node not compliant, plus Unmanaged ones; for evidence that
    /// every node is in scope, with --expect-every-node).
    #[arg(long, value_enum, default_value_t = FailOn::NonCompliant)]
    pub fail_on: FailOn,
    /// Print the JSON Schema of `--output json` and exit.
    #[arg(long)]
    pub schema: bool,
    /// Keep the report as evidence in this folder instead of printing it: one folder per run,
    /// named by its UTC time, with the report as JSON, CSV, HTML and OSCAL and a SHA256SUMS
    /// manifest; written whole before anything older is removed (what the chart's evidence
    /// CronJob runs). The exit code follows --fail-on as without it.
    #[arg(long, value_name = "DIR", conflicts_with = "output")]
    pub archive: Option<std::path::PathBuf>,
    /// With --archive: remove the runs older than this many days, once the new one is written.
    #[arg(long, value_name = "DAYS", default_value_t = 366, requires = "archive")]
    pub keep_days: u32,
}

/// What fails `loopguard report`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FailOn {
    NonCompliant,
    Uncovered,
    Unmanaged,
}

impl FailOn {
    /// As given on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            FailOn::NonCompliant => "non-compliant",
            FailOn::Uncovered => "uncovered",
            FailOn::Unmanaged => "unmanaged",
        }
    }
}

/// The whole report (`--output json`).
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Evidence {
    /// When the report was made (RFC 3339).
    pub generated_at: String,
    /// The API server the report was read from.
    pub cluster: String,
    /// The cluster's identity: the UID of its `kube-system` namespace, which lives as long as the
    /// cluster (absent when the reader may not get that namespace).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_uid: Option<String>,
    /// The loopguard version that made the report.
    pub loopguard_version: String,
    pub rule: RuleEvidence,
    pub summary: Summary,
    /// Per loopback rule of the CIS benchmarks (ComplianceAsCode id): the nodes verified recently,
    /// by verdict.
    pub rules: Vec<crate::api::RuleTally>,
    pub policies: Vec<PolicyEvidence>,
    /// Every LoopbackException, in force or not, with its fields.
    pub exceptions: Vec<ExceptionEvidence>,
    /// One row per node.
    pub nodes: Vec<NodeEvidence>,
}

/// One exception, as an auditor reads it.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExceptionEvidence {
    pub name: String,
    /// Active, MatchesNoNode or Expired, at the report's time.
    pub state: String,
    pub rule_ids: Vec<String>,
    pub node_names: Vec<String>,
    pub node_selector: crate::api::NodeSelector,
    pub justification: String,
    pub approved_by: String,
    pub approved_at: String,
    pub ticket: String,
    pub expires: String,
    /// The nodes of this report it exempts.
    pub exempted_nodes: Vec<String>,
}

/// The rule the evidence is about.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuleEvidence {
    /// The ComplianceAsCode (XCCDF) rule id scanners report.
    pub id: String,
    pub title: String,
    pub references: Vec<String>,
    /// The rules a compliant node carries, in ip6tables-save syntax.
    pub baseline: Vec<String>,
}

/// Nodes by verdict.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub nodes: usize,
    pub compliant: usize,
    pub non_compliant: usize,
    pub not_applicable: usize,
    pub errored: usize,
    /// Not verified recently: no live agent vouches for them.
    pub unknown: usize,
    pub unmanaged: usize,
    /// Nodes of the cluster without any LoopbackNodeState (only with --expect-every-node).
    pub missing: usize,
    /// Non-compliant (or unmanaged) nodes an unexpired LoopbackException covers: not compliant,
    /// not failing.
    pub exempted: usize,
}

impl Summary {
    /// Nodes no live agent covers: missing, not verified recently, or unable to check.
    pub fn uncovered(&self) -> usize {
        self.missing + self.unknown + self.errored
    }

    /// Nodes that do not carry the baseline, or of which nobody knows.
    pub fn failing(&self) -> usize {
        self.uncovered() + self.non_compliant
    }

    /// The nodes that make the report fail under `fail_on`.
    pub fn failing_on(&self, fail_on: FailOn) -> usize {
        match fail_on {
            FailOn::NonCompliant => self.failing(),
            FailOn::Uncovered => self.uncovered(),
            FailOn::Unmanaged => self.failing() + self.unmanaged,
        }
    }
}

/// One policy.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyEvidence {
    pub name: String,
    pub mode: String,
    pub generation: Option<i64>,
    /// The Compliant condition: status, reason and message.
    pub compliant: String,
    pub reason: String,
    pub message: String,
    pub targeted_nodes: i32,
    pub compliant_nodes: i32,
    pub not_applicable_nodes: i32,
    /// Selected nodes where no agent can run (Windows, Fargate, virtual-kubelet), with the label
    /// that tells.
    pub unsupported_nodes: Vec<String>,
    /// The policy's spec as it stands: mode, node selector (its scope), families and the rest.
    pub spec: crate::api::LoopbackPolicySpec,
    /// The last change approval the controller recorded (who, why, at which generation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_approval: Option<crate::api::policy::Approval>,
}

/// One node.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeEvidence {
    pub node: String,
    pub policy: Option<String>,
    /// Compliant, NonCompliant, NotApplicable, Error, Unmanaged, Unknown (not verified recently) or
    /// Missing (a node without any LoopbackNodeState).
    pub verdict: String,
    pub reason: String,
    pub message: String,
    /// The baseline rules present on the node (ip6tables-save syntax, with the family).
    pub rules_present: Vec<String>,
    /// Every baseline rule with its state and whether loopguard inserted it.
    pub rules: Vec<RuleRow>,
    /// Every loopback rule of the CIS benchmarks (one per firewall tool): whether it applies and
    /// why, and its verdict on the node.
    pub checks: Vec<CheckRow>,
    pub backend: Option<String>,
    pub last_verified_time: Option<String>,
    pub agent_version: Option<String>,
    pub repairs: i64,
    pub last_repair_time: Option<String>,
    /// When the node's verdict (as its agent reported it) last changed.
    pub verdict_since: Option<String>,
    /// Since when the node has been non-compliant or in error without a break.
    pub non_compliant_since: Option<String>,
    /// Its last verdict changes, newest last.
    pub transitions: Vec<TransitionRow>,
    /// The exceptions that exempt it (verdict Exempted), by name.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exempted_by: Vec<String>,
}

/// One change of a node's verdict.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransitionRow {
    pub time: String,
    pub from: Option<String>,
    pub to: String,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuleRow {
    pub family: String,
    pub rule: String,
    pub state: String,
    pub owned: bool,
}

/// One loopback rule on one node.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckRow {
    /// ComplianceAsCode's rule id.
    pub id: String,
    /// The CIS ids (benchmark:section).
    pub cis: Vec<String>,
    /// iptables, nftables, ufw or firewalld.
    pub family: String,
    /// Enforce, Report or Ignore.
    pub mode: String,
    pub applies: Option<bool>,
    pub why: String,
    /// Pass, Fail, NotApplicable, Ignored or Unknown.
    pub verdict: String,
    pub reason: String,
}

impl CheckRow {
    /// `set_nftables_loopback_traffic=Pass`.
    fn short(&self) -> String {
        format!("{}={}", self.id, self.verdict)
    }
}

/// Builds the evidence from what the cluster holds (pure).
///
/// `expected_nodes`, when given, are the cluster's nodes that should each have a state: the report
/// covers only them, and those without a state are rows of verdict Missing.
pub fn evidence(
    policies: &[LoopbackPolicy],
    states: &[(String, LoopbackNodeStateStatus)],
    expected_nodes: Option<&[String]>,
    only_policy: Option<&str>,
    stale_after: Duration,
    now: jiff::Timestamp,
    cluster: &str,
) -> Evidence {
    let mut nodes: Vec<NodeEvidence> = states
        .iter()
        .filter(|(_, s)| only_policy.is_none_or(|p| s.policy_name.as_deref() == Some(p)))
        .filter(|(name, _)| expected_nodes.is_none_or(|nodes| nodes.contains(name)))
        .map(|(name, s)| node_evidence(name, s, stale_after, now))
        .collect();
    for node in expected_nodes.unwrap_or_default() {
        if !states.iter().any(|(name, _)| name == node) {
            nodes.push(missing_node(node));
        }
    }
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    let summary = summarize(&nodes);
    let policies = policies
        .iter()
        .filter(|p| only_policy.is_none_or(|o| p.name_any() == o))
        .map(policy_evidence)
        .collect();
    // Only what a live agent vouches for counts per rule, as in the policies' status.
    let fresh: Vec<&str> = nodes
        .iter()
        .filter(|n| !matches!(n.verdict.as_str(), "Unknown" | "Missing"))
        .map(|n| n.node.as_str())
        .collect();
    let rules = crate::aggregate::tally_rules(
        states
            .iter()
            .filter(|(name, _)| fresh.contains(&name.as_str()))
            .map(|(_, s)| s.checks.as_slice()),
    );
    Evidence {
        generated_at: now.to_string(),
        cluster: cluster.to_string(),
        cluster_uid: None,
        loopguard_version: env!("CARGO_PKG_VERSION").to_string(),
        rule: RuleEvidence {
            id: RULE_ID.into(),
            title: RULE_TITLE.into(),
            references: REFERENCES.iter().map(|r| r.to_string()).collect(),
            baseline: crate::rules::Rule::baseline(crate::rules::Family::Ipv6)
                .iter()
                .map(|r| r.save_syntax())
                .collect(),
        },
        summary,
        rules,
        policies,
        exceptions: Vec::new(),
        nodes,
    }
}

/// Nodes counted by verdict.
fn summarize(nodes: &[NodeEvidence]) -> Summary {
    let mut summary = Summary {
        nodes: nodes.len(),
        ..Summary::default()
    };
    for n in nodes {
        match n.verdict.as_str() {
            "Compliant" => summary.compliant += 1,
            "NonCompliant" => summary.non_compliant += 1,
            "NotApplicable" => summary.not_applicable += 1,
            "Error" => summary.errored += 1,
            "Unmanaged" => summary.unmanaged += 1,
            "Missing" => summary.missing += 1,
            "Exempted" => summary.exempted += 1,
            _ => summary.unknown += 1,
        }
    }
    summary
}

/// Applies the LoopbackExceptions to the evidence (pure): a NonCompliant node every failing rule
/// of which unexpired exceptions cover, and an Unmanaged node an unexpired exception names or
/// selects, become Exempted (with the exceptions' names); the summary is counted again and every
/// exception is listed with its fields and state. Nodes verified too long ago, in error or
/// missing are never exempted: an exception covers a finding, not the lack of one.
pub fn apply_exceptions(
    e: &mut Evidence,
    exceptions: &[crate::api::LoopbackException],
    states: &[(String, LoopbackNodeStateStatus)],
    labels: &std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>,
    now: jiff::Timestamp,
) {
    use crate::aggregate::exemption;
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now);
    let refs: Vec<&crate::api::LoopbackException> = exceptions.iter().collect();
    let none = std::collections::BTreeMap::new();
    for n in &mut e.nodes {
        let node_labels = labels.get(&n.node).unwrap_or(&none);
        let by = match n.verdict.as_str() {
            "NonCompliant" => states
                .iter()
                .find(|(name, _)| *name == n.node)
                .and_then(|(_, s)| exemption::exempting(&refs, &n.node, node_labels, s, &now)),
            "Unmanaged" => {
                let names: Vec<String> = exceptions
                    .iter()
                    .filter(|x| {
                        !exemption::expired(x, &now) && exemption::matches(x, &n.node, node_labels)
                    })
                    .map(|x| x.name_any())
                    .collect();
                (!names.is_empty()).then_some(names)
            }
            _ => None,
        };
        if let Some(by) = by {
            n.verdict = "Exempted".into();
            n.exempted_by = by;
        }
    }
    e.summary = summarize(&e.nodes);
    let listed: Vec<(&str, &std::collections::BTreeMap<String, String>)> = e
        .nodes
        .iter()
        .map(|n| (n.node.as_str(), labels.get(&n.node).unwrap_or(&none)))
        .collect();
    e.exceptions = exceptions
        .iter()
        .map(|x| {
            let name = x.name_any();
            let exempted: Vec<String> = e
                .nodes
                .iter()
                .filter(|n| n.exempted_by.contains(&name))
                .map(|n| n.node.clone())
                .collect();
            let status = exemption::status(x, &listed, &exempted, &now);
            ExceptionEvidence {
                name,
                state: format!("{:?}", status.state),
                rule_ids: x.spec.rule_ids.iter().map(|r| r.id().to_string()).collect(),
                node_names: x.spec.node_names.clone(),
                node_selector: x.spec.node_selector.clone(),
                justification: x.spec.justification.clone(),
                approved_by: x.spec.approved_by.clone(),
                approved_at: x.spec.approved_at.0.to_string(),
                ticket: x.spec.ticket.clone(),
                expires: x.spec.expires.0.to_string(),
                exempted_nodes: exempted,
            }
        })
        .collect();
}

fn node_evidence(
    name: &str,
    s: &LoopbackNodeStateStatus,
    stale_after: Duration,
    now: jiff::Timestamp,
) -> NodeEvidence {
    let age = s
        .last_verified_time
        .as_ref()
        .map(|t| now.duration_since(t.0).unsigned_abs());
    // Agents verify and heartbeat unmanaged nodes too: an old state means no live agent there.
    let stale = age.is_none_or(|a| a > stale_after);
    let (verdict, reason, message) = if stale {
        let when = age.map_or("never".to_string(), |a| format!("{}s ago", a.as_secs()));
        (
            "Unknown".to_string(),
            "NotVerifiedRecently".to_string(),
            format!(
                "last verified {when}; it says {:?}: {}",
                s.compliance, s.message
            ),
        )
    } else {
        (
            format!("{:?}", s.compliance),
            s.reason.clone(),
            s.message.clone(),
        )
    };
    let family = |f: crate::api::IpFamily| format!("{f:?}");
    let rules: Vec<RuleRow> = s
        .rules
        .iter()
        .map(|r| RuleRow {
            family: family(r.family),
            rule: r.rule.clone(),
            state: format!("{:?}", r.state),
            owned: r.owned,
        })
        .collect();
    NodeEvidence {
        node: name.to_string(),
        policy: s.policy_name.clone(),
        verdict,
        reason,
        message,
        rules_present: rules
            .iter()
            .filter(|r| r.state != "Missing")
            .map(|r| format!("{} {}", r.family, r.rule))
            .collect(),
        rules,
        checks: s
            .checks
            .iter()
            .map(|c| CheckRow {
                id: c.id.clone(),
                cis: c.cis.clone(),
                family: c.family.clone(),
                mode: c.mode.clone(),
                applies: c.applies,
                why: c.why.clone(),
                verdict: c.verdict.clone(),
                reason: c.reason.clone(),
            })
            .collect(),
        backend: s.backend.clone(),
        last_verified_time: s.last_verified_time.as_ref().map(|t| t.0.to_string()),
        agent_version: s.agent_version.clone(),
        repairs: s.repairs,
        last_repair_time: s.last_repair_time.as_ref().map(|t| t.0.to_string()),
        verdict_since: s.verdict_since.as_ref().map(|t| t.0.to_string()),
        non_compliant_since: s.non_compliant_since.as_ref().map(|t| t.0.to_string()),
        transitions: s
            .transitions
            .iter()
            .map(|t| TransitionRow {
                time: t.time.0.to_string(),
                from: t.from.map(|c| format!("{c:?}")),
                to: format!("{:?}", t.to),
                reason: t.reason.clone(),
            })
            .collect(),
        exempted_by: Vec::new(),
    }
}

fn missing_node(name: &str) -> NodeEvidence {
    NodeEvidence {
        node: name.to_string(),
        policy: None,
        verdict: "Missing".into(),
        reason: "NoNodeState".into(),
        message: "no agent has reported from this node: is a loopguard agent pod running there \
                  (kubectl get pods -l app.kubernetes.io/component=agent -o wide)?"
            .into(),
        rules_present: Vec::new(),
        rules: Vec::new(),
        checks: Vec::new(),
        backend: None,
        last_verified_time: None,
        agent_version: None,
        repairs: 0,
        last_repair_time: None,
        verdict_since: None,
        non_compliant_since: None,
        transitions: Vec::new(),
        exempted_by: Vec::new(),
    }
}

fn policy_evidence(p: &LoopbackPolicy) -> PolicyEvidence {
    let status = p.status.clone().unwrap_or_default();
    let compliant = status.conditions.iter().find(|c| c.type_ == "Compliant");
    PolicyEvidence {
        name: p.name_any(),
        mode: format!("{:?}", p.spec.mode),
        generation: p.metadata.generation,
        compliant: compliant.map_or("Unknown".into(), |c| format!("{:?}", c.status)),
        reason: compliant.map_or(String::new(), |c| c.reason.clone()),
        message: compliant.map_or(String::new(), |c| c.message.clone()),
        targeted_nodes: status.targeted_nodes,
        compliant_nodes: status.compliant_nodes,
        not_applicable_nodes: status.not_applicable_nodes,
        unsupported_nodes: status.unsupported_node_names,
        last_approval: status.last_approval,
        spec: p.spec.clone(),
    }
}

/// The JSON Schema of `--output json`.
pub fn schema() -> String {
    let schema = schemars::schema_for!(Evidence);
    serde_json::to_string_pretty(&schema).expect("schema serializes") + "\n"
}

/// Renders the evidence in `format`.
pub fn render(e: &Evidence, format: Format) -> String {
    match format {
        Format::Json => serde_json::to_string_pretty(e).expect("serializes") + "\n",
        Format::Table => table(e),
        Format::Csv => csv(e),
        Format::Html => html::render(e),
        Format::Oscal => oscal::render(e),
    }
}

fn table(e: &Evidence) -> String {
    let mut out = String::new();
    let s = &e.summary;
    let _ = writeln!(
        out,
        "{} ({}), {} nodes: {} compliant, {} non-compliant, {} exempted, {} not applicable, {} errors, {} unknown, {} unmanaged, {} missing",
        e.rule.id,
        e.generated_at,
        s.nodes,
        s.compliant,
        s.non_compliant,
        s.exempted,
        s.not_applicable,
        s.errored,
        s.unknown,
        s.unmanaged,
        s.missing
    );
    for r in &e.rules {
        let _ = writeln!(
            out,
            "  {}: {} pass, {} fail, {} not applicable, {} ignored, {} unknown",
            r.id, r.pass, r.fail, r.not_applicable, r.ignored, r.unknown
        );
    }
    let rows: Vec<[String; 9]> = e
        .nodes
        .iter()
        .map(|n| {
            [
                n.node.clone(),
                n.policy.clone().unwrap_or_else(|| "-".into()),
                n.verdict.clone(),
                format!("{}/{}", n.rules_present.len(), n.rules.len()),
                n.backend.clone().unwrap_or_else(|| "-".into()),
                n.last_verified_time.clone().unwrap_or_else(|| "-".into()),
                n.repairs.to_string(),
                n.agent_version.clone().unwrap_or_else(|| "-".into()),
                applying(n),
            ]
        })
        .collect();
    let header = [
        "NODE", "POLICY", "VERDICT", "RULES", "BACKEND", "VERIFIED", "REPAIRS", "AGENT", "CHECKS",
    ];
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        padded.join("  ").trim_end().to_string()
    };
    let _ = writeln!(out, "{}", line(header.to_vec()));
    for row in &rows {
        let _ = writeln!(out, "{}", line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// The checks that apply to a node (or could not be told), `id=verdict`, for one cell; `-` when
/// none does.
fn applying(n: &NodeEvidence) -> String {
    let shown: Vec<String> = n
        .checks
        .iter()
        .filter(|c| c.applies != Some(false))
        .map(CheckRow::short)
        .collect();
    if shown.is_empty() {
        "-".into()
    } else {
        shown.join(",")
    }
}

/// The CSV columns, in order.
const CSV_HEADER: [&str; 15] = [
    "node",
    "policy",
    "verdict",
    "reason",
    "rules_present",
    "backend",
    "last_verified_time",
    "agent_version",
    "repairs",
    "last_repair_time",
    "rule_id",
    "references",
    "checks",
    "verdict_since",
    "non_compliant_since",
];

/// One row per node, quoted where RFC 4180 needs it (the `csv` crate's writer).
fn csv(e: &Evidence) -> String {
    let mut w = ::csv::Writer::from_writer(Vec::new());
    w.write_record(CSV_HEADER).expect("writes to memory");
    for n in &e.nodes {
        let fields = [
            n.node.clone(),
            n.policy.clone().unwrap_or_default(),
            n.verdict.clone(),
            n.reason.clone(),
            n.rules_present.join("; "),
            n.backend.clone().unwrap_or_default(),
            n.last_verified_time.clone().unwrap_or_default(),
            n.agent_version.clone().unwrap_or_default(),
            n.repairs.to_string(),
            n.last_repair_time.clone().unwrap_or_default(),
            e.rule.id.clone(),
            e.rule.references.join("; "),
            n.checks
                .iter()
                .map(CheckRow::short)
                .collect::<Vec<_>>()
                .join("; "),
            n.verdict_since.clone().unwrap_or_default(),
            n.non_compliant_since.clone().unwrap_or_default(),
        ];
        w.write_record(&fields).expect("writes to memory");
    }
    String::from_utf8(w.into_inner().expect("flushes to memory")).expect("UTF-8 in, UTF-8 out")
}

/// `loopguard report`: exit 0 when every managed node is compliant or not applicable, 1 when one
/// is not (non-compliant, in error, unknown, or missing; with `--fail-on uncovered` only the last
/// three), 2 on error.
pub async fn run(args: ReportArgs) -> Result<ExitCode> {
    if args.schema {
        print!("{}", schema());
        return Ok(ExitCode::SUCCESS);
    }
    let config = kube::Config::infer().await.map_err(|e| {
        Error::Invalid(format!(
            "no cluster to report on ({e}): set KUBECONFIG or use ~/.kube/config"
        ))
    })?;
    let cluster = config.cluster_url.to_string();
    let client = Client::try_from(config)?;
    let cluster_uid = match Api::<Namespace>::all(client.clone())
        .get("kube-system")
        .await
    {
        Ok(ns) => ns.uid(),
        Err(e) => {
            eprintln!(
                "loopguard report: the cluster's identity (namespace kube-system's UID) is left out: {e}"
            );
            None
        }
    };
    let policies = Api::<LoopbackPolicy>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let expected: Option<Vec<String>> = if args.expect_every_node {
        let nodes = Api::<Node>::all(client.clone())
            .list(&ListParams::default().labels(&args.node_selector))
            .await
            .map_err(|e| match e {
                kube::Error::Api(s) if s.code == 400 => Error::Invalid(format!(
                    "--node-selector {:?} is not a label selector ({}): use key=value,key2=value2",
                    args.node_selector, s.message
                )),
                e => e.into(),
            })?;
        Some(nodes.items.iter().map(|n| n.name_any()).collect())
    } else {
        None
    };
    let states: Vec<(String, LoopbackNodeStateStatus)> =
        Api::<LoopbackNodeState>::all(client.clone())
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .map(|s| (s.name_any(), s.status.unwrap_or_default()))
            .collect();
    let mut e = evidence(
        &policies,
        &states,
        expected.as_deref(),
        args.policy.as_deref(),
        Duration::from_secs(args.stale_after),
        jiff::Timestamp::now(),
        &cluster,
    );
    e.cluster_uid = cluster_uid;
    let exceptions = match Api::<crate::api::LoopbackException>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(list) => list.items,
        // A cluster whose CRDs predate exceptions, or a reader who may not list them: nothing is
        // exempted (every failing node stays failing), and the report says so.
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 403 => {
            eprintln!(
                "loopguard report: LoopbackExceptions not read ({}); no node is counted Exempted",
                s.message
            );
            Vec::new()
        }
        Err(e) => return Err(e.into()),
    };
    if !exceptions.is_empty() {
        let labels = Api::<Node>::all(client.clone())
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .map(|n| (n.name_any(), n.metadata.labels.unwrap_or_default()))
            .collect();
        apply_exceptions(
            &mut e,
            &exceptions,
            &states,
            &labels,
            jiff::Timestamp::now(),
        );
    }
    if let Some(dir) = &args.archive {
        let now = jiff::Timestamp::now();
        let name = archive::run_name(now);
        let rendered: Vec<(&str, String)> = [
            ("report.json", Format::Json),
            ("report.csv", Format::Csv),
            ("report.html", Format::Html),
            ("oscal-assessment-results.json", Format::Oscal),
        ]
        .into_iter()
        .map(|(file, format)| (file, render(&e, format)))
        .collect();
        let files: Vec<(&str, &[u8])> = rendered
            .iter()
            .map(|(file, content)| (*file, content.as_bytes()))
            .collect();
        let written =
            archive::write(dir, &name, &files, now, args.keep_days).map_err(Error::Invalid)?;
        println!(
            "evidence written to {} ({} nodes, {} failing under --fail-on {}); {} older than {} days removed{}",
            written.folder.display(),
            e.summary.nodes,
            e.summary.failing_on(args.fail_on),
            args.fail_on.name(),
            written.removed.len(),
            args.keep_days,
            if written.removed.is_empty() {
                String::new()
            } else {
                format!(": {}", written.removed.join(", "))
            }
        );
    } else {
        print!("{}", render(&e, args.output));
    }
    let failing = e.summary.failing_on(args.fail_on);
    Ok(ExitCode::from(if failing == 0 { 0 } else { 1 }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Compliance;
    use crate::api::node_state::RuleState;
    use crate::api::{IpFamily, NodeRule};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn state(compliance: Compliance, verified: &str) -> LoopbackNodeStateStatus {
        LoopbackNodeStateStatus {
            policy_name: Some("base".into()),
            compliance,
            reason: "RulesInPlace".into(),
            message: "a, \"quoted\" <message>".into(),
            backend: Some("iptables-nft".into()),
            rules: vec![
                NodeRule {
                    family: IpFamily::IPv6,
                    chain: "INPUT".into(),
                    rule: "-A INPUT -i lo -j ACCEPT".into(),
                    state: RuleState::Present,
                    owned: true,
                },
                NodeRule {
                    family: IpFamily::IPv6,
                    chain: "INPUT".into(),
                    rule: "-A INPUT -s ::1/128 -j DROP".into(),
                    state: RuleState::Missing,
                    owned: false,
                },
            ],
            last_verified_time: Some(Time(verified.parse().unwrap())),
            agent_version: Some("0.1.0".into()),
            repairs: 2,
            ..Default::default()
        }
    }

    fn sample() -> Evidence {
        let now: jiff::Timestamp = "2026-06-01T12:00:00Z".parse().unwrap();
        evidence(
            &[],
            &[
                (
                    "b".into(),
                    state(Compliance::Compliant, "2026-06-01T11:59:00Z"),
                ),
                (
                    "a".into(),
                    state(Compliance::NonCompliant, "2026-06-01T11:59:00Z"),
                ),
                (
                    "c".into(),
                    state(Compliance::Compliant, "2026-06-01T10:00:00Z"),
                ),
                (
                    "deleted-node".into(),
                    state(Compliance::Compliant, "2026-06-01T11:59:00Z"),
                ),
            ],
            Some(&["a".into(), "b".into(), "c".into(), "d".into()]),
            None,
            Duration::from_secs(720),
            now,
            "https://k8s.example:6443",
        )
    }

    #[test]
    fn a_report_not_verified_recently_is_unknown() {
        let e = sample();
        assert_eq!(
            e.nodes
                .iter()
                .map(|n| (n.node.as_str(), n.verdict.as_str()))
                .collect::<Vec<_>>(),
            vec![
                ("a", "NonCompliant"),
                ("b", "Compliant"),
                ("c", "Unknown"),
                ("d", "Missing")
            ]
        );
        assert_eq!(
            (
                e.summary.compliant,
                e.summary.non_compliant,
                e.summary.unknown,
                e.summary.missing
            ),
            (1, 1, 1, 1)
        );
        assert_eq!((e.summary.uncovered(), e.summary.failing()), (2, 3));
        assert_eq!(
            e.nodes[1].rules_present,
            vec!["IPv6 -A INPUT -i lo -j ACCEPT"]
        );
        assert_eq!(e.rule.id, RULE_ID);
    }

    #[test]
    fn an_unmanaged_node_counts_as_covered_only_while_its_agent_reports() {
        let now: jiff::Timestamp = "2026-06-01T12:00:00Z".parse().unwrap();
        let e = evidence(
            &[],
            &[
                (
                    "fresh".into(),
                    state(Compliance::Unmanaged, "2026-06-01T11:55:00Z"),
                ),
                (
                    "old".into(),
                    state(Compliance::Unmanaged, "2026-06-01T11:00:00Z"),
                ),
            ],
            Some(&["fresh".into(), "old".into()]),
            None,
            Duration::from_secs(720),
            now,
            "https://k8s.example:6443",
        );
        assert_eq!((e.summary.unmanaged, e.summary.unknown), (1, 1));
        assert_eq!(e.summary.uncovered(), 1);
        assert_eq!(e.nodes[1].reason, "NotVerifiedRecently");
    }

    #[test]
    fn every_format_counts_and_lists_the_rules_per_rule_id() {
        let check = |id: &str, applies: bool, verdict: &str| crate::api::RuleCheck {
            id: id.into(),
            cis: vec!["ubuntu2404:4.3.6".into()],
            family: "nftables".into(),
            mode: "Enforce".into(),
            applies: Some(applies),
            why: String::new(),
            verdict: verdict.into(),
            reason: if verdict == "Fail" {
                "UfwInactive".into()
            } else {
                String::new()
            },
            message: String::new(),
        };
        let with = |compliance, verified: &str, checks| LoopbackNodeStateStatus {
            checks,
            ..state(compliance, verified)
        };
        let now: jiff::Timestamp = "2026-06-01T12:00:00Z".parse().unwrap();
        let e = evidence(
            &[],
            &[
                (
                    "ubuntu".into(),
                    with(
                        Compliance::NonCompliant,
                        "2026-06-01T11:59:00Z",
                        vec![
                            check("set_ipv6_loopback_traffic", false, "NotApplicable"),
                            check("set_nftables_loopback_traffic", true, "Pass"),
                            check("set_ufw_loopback_traffic", true, "Fail"),
                        ],
                    ),
                ),
                (
                    "al2023".into(),
                    with(
                        Compliance::Compliant,
                        "2026-06-01T11:59:00Z",
                        vec![check("set_nftables_loopback_traffic", true, "Pass")],
                    ),
                ),
                // Not verified recently: its checks are not counted.
                (
                    "old".into(),
                    with(
                        Compliance::Compliant,
                        "2026-06-01T09:00:00Z",
                        vec![check("set_nftables_loopback_traffic", true, "Fail")],
                    ),
                ),
            ],
            None,
            None,
            Duration::from_secs(720),
            now,
            "https://k8s.example:6443",
        );
        let nft = e
            .rules
            .iter()
            .find(|r| r.id == "set_nftables_loopback_traffic")
            .unwrap();
        assert_eq!((nft.pass, nft.fail), (2, 0));
        let table = render(&e, Format::Table);
        assert!(
            table.contains("  set_ufw_loopback_traffic: 0 pass, 1 fail, 0 not applicable"),
            "{table}"
        );
        assert!(
            table.contains("set_nftables_loopback_traffic=Pass,set_ufw_loopback_traffic=Fail"),
            "{table}"
        );
        let csv = render(&e, Format::Csv);
        assert!(
            csv.lines()
                .next()
                .unwrap()
                .ends_with(",checks,verdict_since,non_compliant_since"),
            "{csv}"
        );
        assert!(
            csv.contains("set_ipv6_loopback_traffic=NotApplicable; set_nftables_loopback_traffic=Pass; set_ufw_loopback_traffic=Fail"),
            "{csv}"
        );
        let page = render(&e, Format::Html);
        assert!(page.contains(r#"<tr id="rule-set_ufw_loopback_traffic"><td><code>set_ufw_loopback_traffic</code></td><td>0</td><td>1</td>"#), "{page}");
        assert!(page.contains("<li><code>set_ufw_loopback_traffic</code> Fail<span class=\"small\"> UfwInactive</span></li>"));
        let json = render(&e, Format::Json);
        assert!(json.contains("\"checks\""), "{json}");
    }

    #[test]
    fn csv_quotes_what_needs_quoting() {
        let csv = render(&sample(), Format::Csv);
        let first = csv.lines().nth(1).unwrap();
        assert!(
            first.starts_with("a,base,NonCompliant,RulesInPlace,IPv6 -A INPUT -i lo -j ACCEPT,"),
            "{first}"
        );
        assert_eq!(csv.lines().count(), 5);
        // A comma, quotes and a line break survive a reader's round trip.
        let mut e = sample();
        e.nodes[0].reason = "x, \"y\"\nz".into();
        let csv = render(&e, Format::Csv);
        assert!(csv.contains("\"x, \"\"y\"\"\nz\""), "{csv}");
        let mut reader = ::csv::Reader::from_reader(csv.as_bytes());
        assert_eq!(
            reader.headers().unwrap().iter().collect::<Vec<_>>(),
            CSV_HEADER
        );
        let rows: Vec<::csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
        assert_eq!(rows.len(), e.nodes.len());
        assert_eq!(&rows[0][3], "x, \"y\"\nz");
    }

    #[test]
    fn the_html_page_is_self_contained_and_escaped() {
        let page = render(&sample(), Format::Html);
        assert!(
            !page.contains("http://") && !page.contains("src="),
            "no external assets"
        );
        assert!(page.contains(r#"id="count-unknown">1<"#));
        // askama's HTML escaping: numeric character references.
        assert!(
            page.contains("&#34;quoted&#34; &#60;message&#62;"),
            "{page}"
        );
        assert!(!page.contains("<message>"));
    }

    #[test]
    fn oscal_findings_follow_each_rule_that_applies_and_only_a_vouched_pass_satisfies() {
        let check = |id: &str, applies: bool, verdict: &str| crate::api::RuleCheck {
            id: id.into(),
            cis: Vec::new(),
            family: "nftables".into(),
            mode: "Enforce".into(),
            applies: Some(applies),
            why: String::new(),
            verdict: verdict.into(),
            reason: String::new(),
            message: String::new(),
        };
        let checks = vec![
            check("set_ipv6_loopback_traffic", false, "NotApplicable"),
            check("set_nftables_loopback_traffic", true, "Pass"),
            check("set_ufw_loopback_traffic", true, "Fail"),
        ];
        let mut live = state(Compliance::NonCompliant, "2026-06-01T11:59:00Z");
        live.checks = checks.clone();
        // Its last report passed nftables, but it is not verified recently: nothing satisfied.
        let mut stale = state(Compliance::Compliant, "2026-06-01T09:00:00Z");
        stale.checks = checks[..2].to_vec();
        let now: jiff::Timestamp = "2026-06-01T12:00:00Z".parse().unwrap();
        let e = evidence(
            &[],
            &[("live".into(), live), ("stale".into(), stale)],
            None,
            None,
            Duration::from_secs(720),
            now,
            "https://cluster.example",
        );
        let doc: serde_json::Value =
            serde_json::from_str(&render(&e, Format::Oscal)).expect("JSON");
        let result = &doc["assessment-results"]["results"][0];
        let findings: Vec<(String, String)> = result["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["title"].as_str().unwrap().to_string(),
                    f["target"]["status"]["state"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let rule = |id: &str| format!("xccdf_org.ssgproject.content_rule_{id}");
        assert_eq!(
            findings,
            [
                (
                    format!("{} on live", rule("set_nftables_loopback_traffic")),
                    "satisfied".into()
                ),
                (
                    format!("{} on live", rule("set_ufw_loopback_traffic")),
                    "not-satisfied".into()
                ),
                (
                    format!("{} on stale", rule("set_nftables_loopback_traffic")),
                    "not-satisfied".into()
                ),
            ]
        );
        // Every UUID well formed and distinct; every finding points at its node's observation.
        let text = doc.to_string();
        let mut uuids: Vec<&str> = text
            .split('"')
            .filter(|s| s.len() == 36 && s.as_bytes()[14] == b'4' && s.matches('-').count() == 4)
            .collect();
        let observations: Vec<&str> = result["observations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["uuid"].as_str().unwrap())
            .collect();
        for f in result["findings"].as_array().unwrap() {
            let related = f["related-observations"][0]["observation-uuid"]
                .as_str()
                .unwrap();
            assert!(observations.contains(&related), "{f}");
        }
        uuids.sort();
        let all = uuids.len();
        uuids.dedup();
        // Each observation's UUID appears again in its findings, and each node's in its subject.
        assert_eq!(all - uuids.len(), 3 + 2, "{text}");
    }

    #[test]
    fn exceptions_exempt_findings_and_unmanaged_nodes_in_the_report_never_stale_ones() {
        let ex: crate::api::LoopbackException = serde_json::from_value(serde_json::json!({
            "apiVersion": "loopguard.dev/v1alpha1",
            "kind": "LoopbackException",
            "metadata": { "name": "legacy-pool" },
            "spec": {
                "nodeNames": ["a", "c", "u"],
                "ruleIds": ["set_ipv6_loopback_traffic"],
                "justification": "the pool is retired in January",
                "approvedBy": "Jane Auditor",
                "approvedAt": "2026-05-01T00:00:00Z",
                "ticket": "CHG-100",
                "expires": "2026-07-01T00:00:00Z",
            },
        }))
        .unwrap();
        let states = vec![
            (
                "a".to_string(),
                state(Compliance::NonCompliant, "2026-06-01T11:59:00Z"),
            ),
            (
                "b".to_string(),
                state(Compliance::NonCompliant, "2026-06-01T11:59:00Z"),
            ),
            // Named too, but not verified recently: stays Unknown.
            (
                "c".to_string(),
                state(Compliance::NonCompliant, "2026-06-01T09:00:00Z"),
            ),
            (
                "u".to_string(),
                state(Compliance::Unmanaged, "2026-06-01T11:59:00Z"),
            ),
        ];
        let at = |now: &str, stale_after: Duration| {
            let now: jiff::Timestamp = now.parse().unwrap();
            let mut e = evidence(&[], &states, None, None, stale_after, now, "c");
            apply_exceptions(
                &mut e,
                std::slice::from_ref(&ex),
                &states,
                &Default::default(),
                now,
            );
            e
        };
        let e = at("2026-06-01T12:00:00Z", Duration::from_secs(720));
        let verdicts: Vec<(&str, &str)> = e
            .nodes
            .iter()
            .map(|n| (n.node.as_str(), n.verdict.as_str()))
            .collect();
        assert_eq!(
            verdicts,
            [
                ("a", "Exempted"),
                ("b", "NonCompliant"),
                ("c", "Unknown"),
                ("u", "Exempted")
            ]
        );
        assert_eq!(
            (
                e.summary.exempted,
                e.summary.non_compliant,
                e.summary.unmanaged
            ),
            (2, 1, 0)
        );
        assert_eq!(e.summary.failing_on(FailOn::Unmanaged), 2, "b and c");
        assert_eq!(e.exceptions[0].state, "Active");
        assert_eq!(e.exceptions[0].exempted_nodes, ["a", "u"]);
        let page = render(&e, Format::Html);
        assert!(page.contains("id=\"count-exempted\">2<") && page.contains("CHG-100"));
        let json: serde_json::Value = serde_json::from_str(&render(&e, Format::Json)).unwrap();
        assert_eq!(
            json["nodes"][0]["exemptedBy"],
            serde_json::json!(["legacy-pool"])
        );
        assert_eq!(json["exceptions"][0]["approvedBy"], "Jane Auditor");

        // Expired (the reports taken as recent): findings again, the unmanaged node unmanaged.
        let e = at("2026-07-02T00:00:00Z", Duration::from_secs(100 * 86400));
        assert_eq!(
            (
                e.summary.exempted,
                e.summary.non_compliant,
                e.summary.unmanaged
            ),
            (0, 3, 1)
        );
        assert_eq!(e.exceptions[0].state, "Expired");
        assert_eq!(e.summary.failing_on(FailOn::Unmanaged), 4);
    }

    #[test]
    fn what_fails_the_report() {
        let s = |non_compliant, unmanaged, missing| Summary {
            nodes: 5,
            non_compliant,
            unmanaged,
            missing,
            ..Default::default()
        };
        let cases = [
            // (summary, non-compliant, uncovered, unmanaged)
            (s(0, 0, 0), 0, 0, 0),
            (s(0, 1, 0), 0, 0, 1),
            (s(1, 0, 0), 1, 0, 1),
            (s(0, 0, 1), 1, 1, 1),
            (s(1, 2, 1), 2, 1, 4),
        ];
        for (summary, non_compliant, uncovered, unmanaged) in cases {
            assert_eq!(
                [FailOn::NonCompliant, FailOn::Uncovered, FailOn::Unmanaged]
                    .map(|f| summary.failing_on(f)),
                [non_compliant, uncovered, unmanaged],
                "{summary:?}"
            );
        }
    }

    #[test]
    fn a_nodes_history_is_in_every_format_but_the_table() {
        let mut s = state(Compliance::NonCompliant, "2026-06-01T11:59:00Z");
        s = crate::agent::history::carry(
            Some(&crate::agent::history::carry(
                None,
                state(Compliance::Compliant, "2026-06-01T10:00:00Z"),
            )),
            s,
        );
        let now: jiff::Timestamp = "2026-06-01T12:00:00Z".parse().unwrap();
        let n = node_evidence("a", &s, Duration::from_secs(720), now);
        assert_eq!(
            n.non_compliant_since.as_deref(),
            Some("2026-06-01T11:59:00Z")
        );
        assert_eq!(n.transitions.len(), 2);
        assert_eq!(
            (
                n.transitions[1].from.as_deref(),
                n.transitions[1].to.as_str()
            ),
            (Some("Compliant"), "NonCompliant")
        );
        let mut e = sample();
        e.nodes = vec![n];
        let json: serde_json::Value = serde_json::from_str(&render(&e, Format::Json)).unwrap();
        assert_eq!(
            json["nodes"][0]["nonCompliantSince"],
            "2026-06-01T11:59:00Z"
        );
        assert_eq!(json["nodes"][0]["transitions"][0]["to"], "Compliant");
        let csv = render(&e, Format::Csv);
        assert!(
            csv.lines()
                .nth(1)
                .unwrap()
                .ends_with(",2026-06-01T11:59:00Z,2026-06-01T11:59:00Z"),
            "{csv}"
        );
        assert!(render(&e, Format::Html).contains("not compliant since 2026-06-01T11:59:00Z"));
    }

    #[test]
    fn a_policys_last_approval_is_in_the_json_and_the_page() {
        let mut policy = LoopbackPolicy::new("base", Default::default());
        policy.status = Some(crate::api::LoopbackPolicyStatus {
            last_approval: Some(crate::api::policy::Approval {
                by: "dave".into(),
                reason: "CHG-9 <audit>".into(),
                generation: Some(3),
            }),
            ..Default::default()
        });
        let mut e = sample();
        e.policies = vec![policy_evidence(&policy)];
        let json: serde_json::Value = serde_json::from_str(&render(&e, Format::Json)).unwrap();
        assert_eq!(
            json["policies"][0]["lastApproval"],
            serde_json::json!({ "by": "dave", "reason": "CHG-9 <audit>", "generation": 3 })
        );
        let page = render(&e, Format::Html);
        assert!(
            page.contains("dave <span class=\"small\">CHG-9 &#60;audit&#62; (generation 3)</span>"),
            "{page}"
        );
    }

    #[test]
    fn the_published_schema_is_current() {
        assert_eq!(
            include_str!("../docs/report.schema.json"),
            schema(),
            "docs/report.schema.json is stale: loopguard report --schema > docs/report.schema.json"
        );
    }

    #[test]
    fn the_schema_describes_the_json() {
        let schema: serde_json::Value = serde_json::from_str(&schema()).unwrap();
        assert_eq!(schema["title"], "Evidence");
        assert!(schema["properties"]["nodes"].is_object());
    }
}
