//! The Events worth an admin's attention when a policy's status changes.

use super::conditions::names;
use crate::api::policy::{APPROVAL_REASON, APPROVED_BY, Approval};
use crate::api::{ConditionStatus, LoopbackPolicy, LoopbackPolicyStatus, Mode};

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
    if let Some(approval) = &after.last_approval
        && before.and_then(|b| b.last_approval.as_ref()) != Some(approval)
    {
        let generation = approval
            .generation
            .map(|g| format!(" (spec generation {g})"))
            .unwrap_or_default();
        out.push(Notice {
            warning: false,
            reason: "ChangeApproved",
            note: format!(
                "change approved by {}{generation}: {}",
                approval.by, approval.reason
            ),
            node: None,
        });
    }
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

/// The Event for a policy being deleted: who approved it and why when the policy says (a Normal
/// Event), else a Warning that no approval was written.
pub fn deletion_note(policy: &LoopbackPolicy) -> (bool, String) {
    let mode = format!("{:?}", policy.spec.mode);
    match Approval::written_on(policy) {
        Some(a) => (
            false,
            format!("deleted (mode {mode}), approved by {}: {}", a.by, a.reason),
        ),
        None => (
            policy.spec.mode == Mode::Enforce,
            format!(
                "deleted (mode {mode}) without an approval written on it (annotations {APPROVED_BY} and {APPROVAL_REASON})"
            ),
        ),
    }
}
