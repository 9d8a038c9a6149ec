//! `LoopbackPolicy`: which nodes must carry the loopback baseline, and how.

use super::conditions::{Condition, conditions_schema};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The IPv6 loopback baseline of CIS (Debian 12 / Ubuntu 24.04, 4.4.3.2) and PCI-DSS v4 1.4.1 for a
/// set of nodes: in INPUT, `-i lo -j ACCEPT` immediately followed by `-s ::1/128 -j DROP`, and in
/// OUTPUT, `-o lo -j ACCEPT`. Each selected node's agent enforces it and reports in a
/// LoopbackNodeState; the status here rolls those reports up.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "loopguard.dev",
    version = "v1alpha1",
    kind = "LoopbackPolicy",
    plural = "loopbackpolicies",
    shortname = "lbp",
    category = "loopguard",
    status = "LoopbackPolicyStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "A LoopbackPolicy makes the selected nodes enforce the IPv6 loopback firewall baseline (CIS 4.4.3.2, PCI-DSS v4 1.4.1) and reports their compliance.",
    printcolumn = r#"{"name": "Mode", "type": "string", "jsonPath": ".spec.mode"}"#,
    printcolumn = r#"{"name": "Nodes", "type": "string", "jsonPath": ".status.summary", "description": "Compliant nodes / targeted nodes where the rule applies"}"#,
    printcolumn = r#"{"name": "Compliant", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Compliant\")].status"}"#,
    printcolumn = r#"{"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name": "Degraded", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Degraded\")].status"}"#,
    printcolumn = r#"{"name": "N/A", "type": "integer", "jsonPath": ".status.notApplicableNodes", "description": "Targeted nodes where the CIS rule does not apply", "priority": 1}"#,
    printcolumn = r#"{"name": "Exempted", "type": "integer", "jsonPath": ".status.exemptedNodes", "description": "Failing nodes a LoopbackException covers", "priority": 1}"#,
    printcolumn = r#"{"name": "Unsupported", "type": "integer", "jsonPath": ".status.unsupportedNodes", "description": "Selected nodes where no loopguard agent can run (Windows, Fargate, virtual-kubelet)", "priority": 1}"#,
    printcolumn = r#"{"name": "Reason", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Compliant\")].reason", "priority": 1}"#,
    printcolumn = r#"{"name": "Message", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Compliant\")].message", "priority": 1}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct LoopbackPolicySpec {
    /// Enforce (the default) writes the rules and repairs drift; Audit only reports, and never
    /// writes a rule.
    #[serde(default)]
    pub mode: Mode,

    /// Which nodes the policy applies to, as a standard label selector. Empty selects every node.
    #[serde(default)]
    pub node_selector: NodeSelector,

    /// The IP families to enforce. IPv6 (the default, and required) is the CIS IPv6 loopback rule;
    /// adding IPv4 enforces its IPv4 sibling too (lo accepted, 127.0.0.0/8 from elsewhere dropped).
    #[serde(default = "default_ip_families")]
    #[schemars(length(min = 1, max = 2), extend("x-kubernetes-list-type" = "set"))]
    #[x_kube(
        validation = Rule::new("self.exists(f, f == 'IPv6')").message("ipFamilies must include IPv6: the baseline is the IPv6 loopback rule (add IPv4 to enforce its IPv4 sibling too)")
    )]
    pub ip_families: Vec<IpFamily>,

    /// Auto (the default) enforces only where the CIS rule applies: iptables installed, nftables
    /// and ufw not, IPv6 on; other nodes report NotApplicable with the reason. Always enforces
    /// wherever ip6tables works and IPv6 is on.
    #[serde(default)]
    pub applicability: Applicability,

    /// Where missing rules go: Insert (the default) puts them at the top of the chain; Append at
    /// the end, as the CIS remediation script does. Rules already compliant are never moved.
    #[serde(default)]
    pub placement: Placement,

    /// What nodes do when the policy is deleted or stops selecting them: Remove (the default)
    /// deletes the rules loopguard inserted, keeping rules it found in place; Retain leaves
    /// everything as it is.
    #[serde(default)]
    pub on_removal: OnRemoval,

    /// When several policies select a node, the highest priority wins; ties go to the oldest
    /// policy, then to the name that sorts first.
    #[serde(default)]
    pub priority: i32,

    /// The loopback rules of the other firewall tools, one mode per rule family. The CIS
    /// benchmarks have one loopback control per tool, and which applies to a node is decided as
    /// ComplianceAsCode's platforms decide it (from the node's dpkg and rpm packages, firewalld
    /// and ufw). The iptables family is what ipFamilies and applicability configure. Absent: every
    /// other family is ignored, as before families existed. mode Audit makes every family report
    /// only.
    #[serde(default, skip_serializing_if = "RuleFamilies::is_default")]
    pub rule_families: RuleFamilies,
}

/// What the policy asks of each rule family besides iptables.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.firewalld) || self.firewalld != 'Enforce'").message("firewalld can be Report or Ignore: loopguard never touches firewalld's zones")
)]
pub struct RuleFamilies {
    /// set_nftables_loopback_traffic (CIS Ubuntu 24.04 / Debian 12 4.3.6): applies where nftables
    /// is installed and firewalld is not enabled. Enforce writes a table of loopguard's own,
    /// `table inet loopguard` (iif lo accept, ip saddr 127.0.0.0/8 drop, ip6 saddr ::1 drop),
    /// where ComplianceAsCode's check fails; it never writes into another table, and the table
    /// can only drop spoofed loopback packets, never let anything through.
    #[serde(default, skip_serializing_if = "FamilyMode::is_ignore")]
    pub nftables: FamilyMode,
    /// set_ufw_loopback_traffic (CIS 4.2.4): applies where ufw is installed, active or not.
    /// Enforce, where ufw is active, adds the rules of ComplianceAsCode's remediation that `ufw
    /// status verbose` does not show (`ufw allow in on lo`, `allow out on lo`, `deny in from
    /// 127.0.0.0/8`, `deny in from ::1`) with the host's ufw, and cleanup deletes exactly those
    /// (the chart needs agent.ufw.enforce=true for it). loopguard never enables ufw: an installed
    /// but inactive ufw fails (UfwInactive) in every mode.
    #[serde(default, skip_serializing_if = "FamilyMode::is_ignore")]
    pub ufw: FamilyMode,
    /// firewalld_loopback_traffic_trusted and _restricted (CIS RHEL 9 4.2.2): apply where
    /// firewalld is enabled. Report or Ignore.
    #[serde(default, skip_serializing_if = "FamilyMode::is_ignore")]
    pub firewalld: FamilyMode,
}

impl RuleFamilies {
    pub fn is_default(&self) -> bool {
        *self == RuleFamilies::default()
    }
}

/// What a policy asks of one rule family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum FamilyMode {
    /// Make the node pass the family's rule where it applies.
    Enforce,
    /// Check and report; a failing rule makes the node NonCompliant for that rule.
    Report,
    /// Leave the family out.
    #[default]
    Ignore,
}

impl FamilyMode {
    pub fn is_ignore(&self) -> bool {
        *self == FamilyMode::Ignore
    }
}

fn default_ip_families() -> Vec<IpFamily> {
    vec![IpFamily::IPv6]
}

/// Enforce or only report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

/// An IP family of the baseline.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[allow(clippy::upper_case_acronyms)]
pub enum IpFamily {
    /// ip6tables: the CIS IPv6 loopback rule.
    IPv6,
    /// iptables: its IPv4 sibling.
    IPv4,
}

/// Whether the CIS rule's own conditions decide where it applies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Applicability {
    /// The CIS rule's conditions: iptables installed, nftables and ufw not, IPv6 on.
    #[default]
    Auto,
    /// Wherever ip6tables works and IPv6 is on.
    Always,
}

/// Where missing rules are added.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Placement {
    /// At the top of the chain.
    #[default]
    Insert,
    /// At the end of the chain, as the CIS script does.
    Append,
}

/// What happens to inserted rules when a node is no longer governed by the policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum OnRemoval {
    /// Delete the rules loopguard inserted (adopted rules stay).
    #[default]
    Remove,
    /// Leave every rule in place.
    Retain,
}

/// A label selector (the same shape as Kubernetes' own LabelSelector). The requirements are
/// ANDed; an empty selector selects every node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeSelector {
    /// Labels a node must carry with exactly these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub match_labels: BTreeMap<String, String>,

    /// Requirements on node labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub match_expressions: Vec<NodeSelectorRequirement>,
}

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new("self.operator in ['In', 'NotIn'] ? size(self.values) > 0 : size(self.values) == 0").message("values must be non-empty for In and NotIn, and empty for Exists and DoesNotExist"))]
pub struct NodeSelectorRequirement {
    /// The label key.
    #[schemars(length(min = 1, max = 317))]
    pub key: String,
    /// In, NotIn, Exists or DoesNotExist.
    pub operator: SelectorOperator,
    /// The values for In and NotIn; empty for Exists and DoesNotExist.
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub values: Vec<String>,
}

/// How a requirement relates a label to its values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SelectorOperator {
    /// The label's value is one of the values.
    In,
    /// The label is missing, or its value is none of the values.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is missing.
    DoesNotExist,
}

/// How many nodes stand where on one loopback rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuleTally {
    /// ComplianceAsCode's rule id (set_ipv6_loopback_traffic, set_nftables_loopback_traffic, ...).
    pub id: String,
    /// Nodes where it applies and passes.
    #[serde(default)]
    pub pass: i32,
    /// Nodes where it applies and fails (Report mode, or a repair failing).
    #[serde(default)]
    pub fail: i32,
    /// Nodes where it does not apply.
    #[serde(default)]
    pub not_applicable: i32,
    /// Nodes where the policy leaves its firewall tool out (Ignore).
    #[serde(default)]
    pub ignored: i32,
    /// Nodes where it could not be told (see each node's LoopbackNodeState).
    #[serde(default)]
    pub unknown: i32,
}

/// The rolled-up compliance of the nodes a policy targets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoopbackPolicyStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// "compliant/applicable": compliant nodes of the targeted nodes where the rule applies, for
    /// `kubectl get` (NotApplicable nodes are left out of both).
    #[serde(default)]
    pub summary: String,
    /// Nodes this policy selects and governs (it wins the priority order on them).
    #[serde(default)]
    pub targeted_nodes: i32,
    /// Targeted nodes that reported Compliant for the current generation.
    #[serde(default)]
    pub compliant_nodes: i32,
    /// Targeted nodes that reported NonCompliant for the current generation, exceptions aside.
    #[serde(default)]
    pub non_compliant_nodes: i32,
    /// Targeted nodes that reported NonCompliant, every failing rule of which an unexpired
    /// LoopbackException covers: not compliant, and not failing.
    #[serde(default)]
    pub exempted_nodes: i32,
    /// Up to 20 of them, sorted, each with its exceptions: `node-a (legacy-pool)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub exempted_node_names: Vec<String>,
    /// Targeted nodes where the rule does not apply (for example IPv6 off, or nftables installed).
    #[serde(default)]
    pub not_applicable_nodes: i32,
    /// Targeted nodes whose agent reported an error.
    #[serde(default)]
    pub errored_nodes: i32,
    /// Targeted nodes that have not yet reported the current generation.
    #[serde(default)]
    pub pending_nodes: i32,
    /// Targeted nodes no live agent vouches for (no Ready agent Pod for longer than the grace
    /// period, or a report older than the heartbeat interval plus the grace period): their
    /// compliance is Unknown, and they count as failing.
    #[serde(default)]
    pub unknown_nodes: i32,
    /// Nodes this policy selects but another policy governs (higher priority, or older).
    #[serde(default)]
    pub overridden_nodes: i32,
    /// Selected nodes where no loopguard agent can run (Windows, Fargate, virtual-kubelet, told
    /// by their labels). They are not targeted: never waited for, never counted compliant.
    #[serde(default)]
    pub unsupported_nodes: i32,
    /// Up to 20 of them, sorted, each with the label that tells: `win-1 (kubernetes.io/os=windows)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub unsupported_node_names: Vec<String>,
    /// Per loopback rule of the CIS benchmarks (ComplianceAsCode id): how the targeted nodes that
    /// reported the current generation, with a live agent, stand on it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleTally>,
    /// Up to 20 non-compliant, errored or unknown nodes, sorted by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub non_compliant_node_names: Vec<String>,
    /// Compliant, Ready, Progressing, Reconciling, Degraded and Stalled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The last approval written on the policy (annotations loopguard.dev/approved-by and
    /// loopguard.dev/reason), kept after the annotations go. With the chart's protection.enabled,
    /// switching a policy off needs one, and the approver named is the user who made the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_approval: Option<Approval>,
}

/// Who approved a change of a policy, and why.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Approval {
    /// The approver's user name (annotation loopguard.dev/approved-by).
    pub by: String,
    /// Why (annotation loopguard.dev/reason).
    pub reason: String,
    /// The policy's generation when the controller first saw this approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
}

/// The annotation naming who approved a change (with protection on: the user who made it).
pub const APPROVED_BY: &str = "loopguard.dev/approved-by";
/// The annotation saying why.
pub const APPROVAL_REASON: &str = "loopguard.dev/reason";

impl Approval {
    /// The approval written on `policy`'s annotations, when both are there and not blank.
    pub fn written_on(policy: &LoopbackPolicy) -> Option<Approval> {
        let annotations = policy.metadata.annotations.as_ref()?;
        let by = annotations.get(APPROVED_BY)?.trim();
        let reason = annotations.get(APPROVAL_REASON)?.trim();
        (!by.is_empty() && !reason.is_empty()).then(|| Approval {
            by: by.to_string(),
            reason: reason.to_string(),
            generation: policy.metadata.generation,
        })
    }

    /// The same approver and reason (the generation aside).
    pub fn same(&self, other: &Approval) -> bool {
        self.by == other.by && self.reason == other.reason
    }
}
