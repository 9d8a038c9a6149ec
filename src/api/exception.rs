//! `LoopbackException`: a written-down, approved, expiring exception to loopback rules on some nodes.
//! It changes how a failing result is counted (Exempted: not compliant, not failing), never what an
//! agent does: the agents keep enforcing.

use super::policy::NodeSelector;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The longest an exception may run, from its approval to its expiry.
pub const MAX_DAYS: i64 = 90;

/// An exception to loopback rules on some nodes, as an auditor accepts one: which nodes and rules,
/// why, who approved it and when, the ticket, and when it ends (at most 90 days after approval).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "loopguard.dev",
    version = "v1alpha1",
    kind = "LoopbackException",
    plural = "loopbackexceptions",
    shortname = "lbex",
    category = "loopguard",
    status = "LoopbackExceptionStatus",
    derive = "PartialEq",
    doc = "A LoopbackException exempts failing loopback rules on some nodes, with a justification, an approver, a ticket and an expiry. The agents keep enforcing; the failing results are counted Exempted until it expires.",
    printcolumn = r#"{"name": "State", "type": "string", "jsonPath": ".status.state"}"#,
    printcolumn = r#"{"name": "Nodes", "type": "integer", "jsonPath": ".status.matchedNodes"}"#,
    printcolumn = r#"{"name": "Exempted", "type": "integer", "jsonPath": ".status.exemptedNodes"}"#,
    printcolumn = r#"{"name": "Expires", "type": "date", "jsonPath": ".spec.expires"}"#,
    printcolumn = r#"{"name": "Ticket", "type": "string", "jsonPath": ".spec.ticket"}"#,
    printcolumn = r#"{"name": "Approved by", "type": "string", "jsonPath": ".spec.approvedBy", "priority": 1}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("(has(self.nodeNames) && size(self.nodeNames) > 0) || (has(self.nodeSelector) && ((has(self.nodeSelector.matchLabels) && size(self.nodeSelector.matchLabels) > 0) || (has(self.nodeSelector.matchExpressions) && size(self.nodeSelector.matchExpressions) > 0)))").message("name the nodes (nodeNames) or select them (a non-empty nodeSelector): an exception never covers every node by default"),
    validation = Rule::new("self.expires > self.approvedAt").message("expires must be after approvedAt"),
    validation = Rule::new("self.expires - self.approvedAt <= duration('2160h')").message("an exception runs at most 90 days from approvedAt to expires: ask for a new approval to extend it")
)]
pub struct LoopbackExceptionSpec {
    /// The nodes, by name.
    #[serde(default)]
    #[schemars(length(max = 1000), extend("x-kubernetes-list-type" = "set"))]
    pub node_names: Vec<String>,
    /// The nodes, by label (added to nodeNames). Empty selects none.
    #[serde(default)]
    pub node_selector: NodeSelector,
    /// The loopback rules excepted, by ComplianceAsCode id.
    #[schemars(length(min = 1, max = 6), extend("x-kubernetes-list-type" = "set"))]
    pub rule_ids: Vec<ExceptedRule>,
    /// Why the rules cannot be met on these nodes, and what stands in for them.
    #[schemars(length(min = 10, max = 4096))]
    pub justification: String,
    /// Who approved it (a name an auditor can find).
    #[schemars(length(min = 1, max = 256))]
    pub approved_by: String,
    /// When it was approved (RFC 3339).
    pub approved_at: Time,
    /// The change or risk ticket that records it.
    #[schemars(length(min = 1, max = 256))]
    pub ticket: String,
    /// When it ends (RFC 3339), at most 90 days after approvedAt. The nodes' failing results count
    /// as findings again from then on, without anyone acting.
    pub expires: Time,
}

/// A loopback rule id an exception can name.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[allow(non_camel_case_types)]
pub enum ExceptedRule {
    set_ipv6_loopback_traffic,
    set_loopback_traffic,
    set_nftables_loopback_traffic,
    set_ufw_loopback_traffic,
    firewalld_loopback_traffic_trusted,
    firewalld_loopback_traffic_restricted,
}

impl ExceptedRule {
    pub fn id(&self) -> &'static str {
        match self {
            ExceptedRule::set_ipv6_loopback_traffic => "set_ipv6_loopback_traffic",
            ExceptedRule::set_loopback_traffic => "set_loopback_traffic",
            ExceptedRule::set_nftables_loopback_traffic => "set_nftables_loopback_traffic",
            ExceptedRule::set_ufw_loopback_traffic => "set_ufw_loopback_traffic",
            ExceptedRule::firewalld_loopback_traffic_trusted => {
                "firewalld_loopback_traffic_trusted"
            }
            ExceptedRule::firewalld_loopback_traffic_restricted => {
                "firewalld_loopback_traffic_restricted"
            }
        }
    }
}

/// Where an exception stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ExceptionState {
    /// In force, on at least one node.
    #[default]
    Active,
    /// In force, but it matches no node (a typo, or the nodes are gone).
    MatchesNoNode,
    /// Past its expiry: it exempts nothing.
    Expired,
}

impl ExceptionState {
    pub fn as_str(&self) -> &'static str {
        match self {
            ExceptionState::Active => "Active",
            ExceptionState::MatchesNoNode => "MatchesNoNode",
            ExceptionState::Expired => "Expired",
        }
    }
}

/// What the controller found of an exception.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoopbackExceptionStatus {
    /// Active, MatchesNoNode or Expired.
    pub state: ExceptionState,
    /// Nodes it matches (named or selected, existing).
    #[serde(default)]
    pub matched_nodes: i32,
    /// Nodes whose failing results it exempts now.
    #[serde(default)]
    pub exempted_nodes: i32,
    /// Up to 20 of them, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub exempted_node_names: Vec<String>,
    /// The state in a sentence.
    #[serde(default)]
    pub message: String,
}
