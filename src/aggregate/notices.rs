//! The Events worth an admin's attention when a policy's status changes.

use super::conditions::names;
use crate::api::{ConditionStatus, LoopbackPolicyStatus};

/// The status of a condition type in a status, if present.
fn condition(status: Option<&LoopbackPolicyStatus>, type_: &str) -> Option<ConditionStatus> {
    status?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status)
}

/// An Event the controller should record on the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
    /// The node the notice is about (the first, when it names several).
    pub node: Option<String>,
}

/// Events worth an admin's attention in the move from `before` to `after`.
pub fn notices(before: Option<&LoopbackPolicyStatus>, after: &LoopbackPolicyStatus) -> Vec<Notice> {
    let mut out = Vec::new();
    let was = condition(before, "Compliant");
    let is = condition(Some(after), "Compliant");
    if is == Some(ConditionStatus::True) && was != Some(ConditionStatus::True) {
        out.push(Notice {
            warning: false,
            reason: "Compliant",
            note: format!("all {} targeted nodes are compliant", after.targeted_nodes),
            node: None,
        });
    }
    let before_failing: Vec<&String> = before
        .map(|b| b.non_compliant_node_names.iter().collect())
        .unwrap_or_default();
    let newly: Vec<String> = after
        .non_compliant_node_names
        .iter()
        .filter(|n| !before_failing.contains(n))
        .cloned()
        .collect();
    if !newly.is_empty() {
        out.push(Notice {
            warning: true,
            reason: "NodesNotCompliant",
            note: format!("fell out of compliance: {}", names(&newly)),
            node: newly.first().cloned(),
        });
    }
    out
}
