//! `LoopbackNodeState`: one node's answer, written only by that node's agent.

use super::policy::{IpFamily, Mode};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What one node enforces and how it stands. Named after its node and owned by the Node object,
/// so it goes away with the node. Only that node's agent writes it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "loopguard.dev",
    version = "v1alpha1",
    kind = "LoopbackNodeState",
    plural = "loopbacknodestates",
    shortname = "lbns",
    category = "loopguard",
    status = "LoopbackNodeStateStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "A LoopbackNodeState is one node's loopback firewall compliance, reported by its loopguard agent.",
    validation = Rule::new("self.metadata.name == self.spec.nodeName").message("a LoopbackNodeState is named after its node: metadata.name must equal spec.nodeName"),
    printcolumn = r#"{"name": "Compliance", "type": "string", "jsonPath": ".status.compliance"}"#,
    printcolumn = r#"{"name": "Mode", "type": "string", "jsonPath": ".status.mode"}"#,
    printcolumn = r#"{"name": "Policy", "type": "string", "jsonPath": ".status.policyName"}"#,
    printcolumn = r#"{"name": "Backend", "type": "string", "jsonPath": ".status.backend"}"#,
    printcolumn = r#"{"name": "Rules", "type": "string", "jsonPath": ".status.ruleSummary", "description": "The CIS loopback rules that apply to the node, by firewall tool, with their verdicts"}"#,
    printcolumn = r#"{"name": "Repairs", "type": "integer", "jsonPath": ".status.repairs"}"#,
    printcolumn = r#"{"name": "Verified", "type": "date", "jsonPath": ".status.lastVerifiedTime"}"#,
    printcolumn = r#"{"name": "Reason", "type": "string", "jsonPath": ".status.reason", "priority": 1}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct LoopbackNodeStateSpec {
    /// The node this state belongs to; equal to metadata.name.
    #[x_kube(validation = Rule::new("self == oldSelf").message("nodeName is immutable"))]
    pub node_name: String,
}

/// A node's verdict.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Compliance {
    /// The rules are in place as the scanners require.
    Compliant,
    /// They are not (in Audit mode, or while a repair is failing).
    NonCompliant,
    /// The CIS rule does not apply here (see reason).
    NotApplicable,
    /// The agent could not check or enforce (see message).
    Error,
    /// No policy governs the node; rules loopguard inserted were removed (or retained).
    #[default]
    Unmanaged,
}

/// The state of one baseline rule on the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RuleState {
    /// In place, exactly once.
    Present,
    /// Not in its chain.
    Missing,
    /// In its chain, but not where the scanners need it (the DROP not right after the ACCEPT).
    Misplaced,
    /// In place, and more than once (for example after the CIS script ran twice).
    Duplicate,
    /// In place as the scanners require, but after a catch-all rule (-j DROP, -j REJECT, ...)
    /// that decides every packet first, so it protects nothing.
    Shadowed,
}

/// One baseline rule as found on the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeRule {
    /// IPv6 (ip6tables) or IPv4 (iptables).
    pub family: IpFamily,
    /// INPUT or OUTPUT.
    pub chain: String,
    /// The rule in iptables-save syntax.
    pub rule: String,
    /// Present, Missing, Misplaced, Duplicate or Shadowed.
    pub state: RuleState,
    /// True when loopguard inserted it; false when it was found in place and adopted.
    pub owned: bool,
}

/// One loopback rule of the CIS benchmarks (one per firewall tool) on the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuleCheck {
    /// ComplianceAsCode's rule id (set_ipv6_loopback_traffic, set_nftables_loopback_traffic, ...).
    pub id: String,
    /// The CIS ids (benchmark:section).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cis: Vec<String>,
    /// The firewall tool: iptables, nftables, ufw or firewalld.
    pub family: String,
    /// What the policy asks of the family: Enforce, Report or Ignore.
    pub mode: String,
    /// Whether the rule applies to the node (absent: it could not be told).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applies: Option<bool>,
    /// Why it applies or not, naming the facts and where they were read.
    #[serde(default)]
    pub why: String,
    /// Pass, Fail, NotApplicable, Ignored or Unknown.
    pub verdict: String,
    /// A CamelCase word.
    #[serde(default)]
    pub reason: String,
    /// The verdict in a sentence.
    #[serde(default)]
    pub message: String,
}

/// What the node's agent last found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoopbackNodeStateStatus {
    /// The policy the node follows; empty when none governs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_name: Option<String>,
    /// The generation of that policy the agent acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_generation: Option<i64>,
    /// The mode the agent acted in: Enforce or Audit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Mode")]
    pub mode: Option<Mode>,
    /// Compliant, NonCompliant, NotApplicable, Error or Unmanaged.
    pub compliance: Compliance,
    /// A CamelCase word for the verdict.
    #[serde(default)]
    pub reason: String,
    /// The verdict in a sentence.
    #[serde(default)]
    pub message: String,
    /// iptables-nft or iptables-legacy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Whether IPv6 is on (net.ipv6.conf.all.disable_ipv6 = 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_enabled: Option<bool>,
    /// Firewall managers installed on the host (iptables, nftables, ufw, firewalld).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub firewall_managers: Vec<String>,
    /// The baseline rules as found.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<NodeRule>,
    /// Every loopback rule of the CIS benchmarks, one per firewall tool: whether it applies and
    /// why, and its verdict.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<RuleCheck>,
    /// The rules that apply, by firewall tool, with their verdicts: `nftables=Pass,ufw=Fail`
    /// (what `kubectl get lbns` shows).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rule_summary: String,
    /// Drift repairs since the node started following this policy (kept across agent restarts).
    #[serde(default)]
    pub repairs: i64,
    /// When drift was last repaired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_repair_time: Option<Time>,
    /// Who made the change last repaired, where the kernel names the process (nftables
    /// transactions): `iptables-nft-re (pid 4242)`, the command name cut to 15 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_repair_by: Option<String>,
    /// When the agent last checked the node and found what this status says. Refreshed at least
    /// once per heartbeat interval (10 minutes by default) even when nothing changes; an older one
    /// means no live agent vouches for the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verified_time: Option<Time>,
    /// The loopguard version of the agent that wrote this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// When the verdict (compliance) last changed: the check that first found the new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict_since: Option<Time>,
    /// Since when the node has been NonCompliant or in Error without a break (absent while it
    /// is compliant, not applicable or unmanaged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub non_compliant_since: Option<Time>,
    /// The last verdict changes, newest last (at most 10), kept across agent restarts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub transitions: Vec<Transition>,
}

/// One change of a node's verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Transition {
    /// When the check found the new verdict.
    pub time: Time,
    /// The verdict before (absent for the node's first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Compliance>,
    /// The new verdict.
    pub to: Compliance,
    /// Its reason (a CamelCase word).
    #[serde(default)]
    pub reason: String,
}
