//! The policy's conditions from its counts and the nodes behind them.

use super::Settings;
use crate::api::conditions::ConditionUpdate;
use crate::api::{ConditionStatus, LoopbackPolicyStatus};

/// The nodes behind the conditions, by kind of trouble.
pub(super) struct Problems<'a> {
    pub(super) errored: &'a [String],
    /// "name (why)" for each node without a live agent.
    pub(super) unavailable: &'a [String],
    /// NotReady nodes that have not reported for long.
    pub(super) stale: &'a [String],
    pub(super) audit: bool,
}

pub(super) fn names(list: &[String]) -> String {
    let shown: Vec<&str> = list.iter().take(5).map(String::as_str).collect();
    let more = list.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// What each condition says: one small function per condition, in the order they are listed.
pub(super) fn condition_updates(
    s: &LoopbackPolicyStatus,
    generation: Option<i64>,
    p: &Problems,
    settings: Settings,
) -> Vec<ConditionUpdate> {
    let words = Words::new(s, generation, p);
    let (status, reason, message) = compliant(s, p, &words);
    let compliant = update("Compliant", status, reason, message.clone());
    let ready = ready(s, p, &words, &compliant);
    let (progressing, reconciling) = progress(s, &words);
    let stalled = stalled(&ready, reason, message);
    let degraded = degraded(s, p, &words, settings);
    vec![
        compliant,
        ready,
        progressing,
        reconciling,
        degraded,
        stalled,
    ]
}

/// The phrases more than one condition uses.
struct Words {
    /// "generation 4".
    at_gen: String,
    /// "2 of 5 nodes have not reported generation 4 yet".
    not_reported: String,
    /// "1 of 5 nodes have no live agent vouching for them: b (its agent Pod is not Ready)".
    no_agent: String,
}

impl Words {
    fn new(s: &LoopbackPolicyStatus, generation: Option<i64>, p: &Problems) -> Words {
        let at_gen = generation.map_or_else(
            || "the current generation".to_string(),
            |g| format!("generation {g}"),
        );
        Words {
            not_reported: format!(
                "{} of {} nodes have not reported {at_gen} yet",
                s.pending_nodes, s.targeted_nodes
            ),
            no_agent: format!(
                "{} of {} nodes have no live agent vouching for them: {}",
                s.unknown_nodes,
                s.targeted_nodes,
                names(p.unavailable)
            ),
            at_gen,
        }
    }
}

fn update(
    type_: &'static str,
    status: ConditionStatus,
    reason: &str,
    message: String,
) -> ConditionUpdate {
    ConditionUpdate {
        type_,
        status,
        reason: reason.into(),
        message,
    }
}

/// Compliant: do the nodes carry the rules, as verified now?
fn compliant(
    s: &LoopbackPolicyStatus,
    p: &Problems,
    w: &Words,
) -> (ConditionStatus, &'static str, String) {
    use ConditionStatus::*;
    if s.targeted_nodes == 0 {
        let mut others = Vec::new();
        if s.overridden_nodes > 0 {
            others.push(format!(
                "{} selected nodes are governed by other policies",
                s.overridden_nodes
            ));
        }
        if s.unsupported_nodes > 0 {
            others.push(format!(
                "{} selected nodes cannot run a loopguard agent: {}",
                s.unsupported_nodes,
                names(&s.unsupported_node_names)
            ));
        }
        let extra = if others.is_empty() {
            String::new()
        } else {
            format!(" ({})", others.join("; "))
        };
        (
            False,
            "NoTargetNodes",
            format!("the policy selects no node it governs; check spec.nodeSelector{extra}"),
        )
    } else if s.errored_nodes > 0 {
        (
            False,
            "NodeErrors",
            format!(
                "{} of {} nodes report errors: {}",
                s.errored_nodes,
                s.targeted_nodes,
                names(p.errored)
            ),
        )
    } else if s.unknown_nodes > 0 {
        (False, "AgentsUnavailable", w.no_agent.clone())
    } else if s.non_compliant_nodes > 0 {
        (
            False,
            "NodesNotCompliant",
            format!(
                "{} of {} nodes are not compliant: {}",
                s.non_compliant_nodes,
                s.targeted_nodes,
                names(&s.non_compliant_node_names)
            ),
        )
    } else if s.pending_nodes > 0 {
        (Unknown, "AwaitingNodeReports", w.not_reported.clone())
    } else {
        let mut na = String::new();
        if s.not_applicable_nodes > 0 {
            na.push_str(&format!("; {} not applicable", s.not_applicable_nodes));
        }
        if s.unsupported_nodes > 0 {
            na.push_str(&format!(
                "; {} selected nodes cannot run an agent and are left out: {}",
                s.unsupported_nodes,
                names(&s.unsupported_node_names)
            ));
        }
        if s.exempted_nodes > 0 {
            return (
                True,
                "CompliantWithExceptions",
                format!(
                    "{} of {} nodes compliant at {}; {} failing but exempted by LoopbackExceptions: {}{na}",
                    s.compliant_nodes,
                    s.targeted_nodes,
                    w.at_gen,
                    s.exempted_nodes,
                    names(&s.exempted_node_names)
                ),
            );
        }
        (
            True,
            "AllNodesCompliant",
            format!(
                "{} of {} nodes compliant at {}{na}",
                s.compliant_nodes, s.targeted_nodes, w.at_gen
            ),
        )
    }
}

/// Ready: has loopguard done what the policy asks? The same as Compliant in Enforce mode; in
/// Audit mode, every node has reported (findings are the point of an audit, not a failure).
fn ready(
    s: &LoopbackPolicyStatus,
    p: &Problems,
    w: &Words,
    compliant: &ConditionUpdate,
) -> ConditionUpdate {
    use ConditionStatus::*;
    if p.audit && compliant.reason == "NodesNotCompliant" {
        update(
            "Ready",
            True,
            "AuditReported",
            format!(
                "every targeted node reported {}; {} have findings",
                w.at_gen, s.non_compliant_nodes
            ),
        )
    } else {
        let status = match compliant.status {
            Unknown => False,
            other => other,
        };
        update(
            "Ready",
            status,
            &compliant.reason,
            compliant.message.clone(),
        )
    }
}

/// Progressing and Reconciling: are nodes still to report the current generation?
fn progress(s: &LoopbackPolicyStatus, w: &Words) -> (ConditionUpdate, ConditionUpdate) {
    use ConditionStatus::*;
    if s.pending_nodes > 0 {
        (
            update("Progressing", True, "NodesPending", w.not_reported.clone()),
            update("Reconciling", True, "NodesPending", w.not_reported.clone()),
        )
    } else {
        let done = format!("every targeted node reported {}", w.at_gen);
        (
            update("Progressing", False, "AllNodesReported", done.clone()),
            update("Reconciling", False, "AllNodesReported", done),
        )
    }
}

/// Stalled (kstatus: Failed): not Ready for a reason that waiting alone will not fix.
fn stalled(ready: &ConditionUpdate, reason: &str, message: String) -> ConditionUpdate {
    if ready.status == ConditionStatus::False && reason != "AwaitingNodeReports" {
        update("Stalled", ConditionStatus::True, reason, message)
    } else {
        update(
            "Stalled",
            ConditionStatus::False,
            "AsExpected",
            "nothing keeps the policy from taking effect".into(),
        )
    }
}

/// Degraded: is something wrong with loopguard itself on some node?
fn degraded(
    s: &LoopbackPolicyStatus,
    p: &Problems,
    w: &Words,
    settings: Settings,
) -> ConditionUpdate {
    use ConditionStatus::*;
    if s.errored_nodes > 0 {
        update(
            "Degraded",
            True,
            "NodeErrors",
            format!("agents report errors on {}", names(p.errored)),
        )
    } else if s.unknown_nodes > 0 {
        update("Degraded", True, "AgentsUnavailable", w.no_agent.clone())
    } else if !p.stale.is_empty() {
        update(
            "Degraded",
            True,
            "NodesNotReady",
            format!(
                "{} NotReady for over {}s without reporting {}",
                names(p.stale),
                settings.not_ready_timeout.as_secs(),
                w.at_gen
            ),
        )
    } else {
        update(
            "Degraded",
            False,
            "AsExpected",
            "every targeted node has a live agent, and none reports an error or is stuck NotReady"
                .into(),
        )
    }
}
