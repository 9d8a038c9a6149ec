//! Exceptions: which failing results a `LoopbackException` exempts now, and its own status. An
//! exception changes how a failing result is counted, never what an agent does.

use crate::api::{
    ExceptionState, LoopbackException, LoopbackExceptionStatus, LoopbackNodeStateStatus,
};
use crate::rules::catalog::RuleId;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::collections::BTreeMap;

/// At most this many exempted nodes are named in a status.
const MAX_LISTED: usize = 20;

/// Whether an exception has ended at `now`.
pub fn expired(ex: &LoopbackException, now: &Time) -> bool {
    now.0 >= ex.spec.expires.0
}

/// Whether the exception names or selects a node (expired or not).
pub fn matches(ex: &LoopbackException, node: &str, labels: &BTreeMap<String, String>) -> bool {
    let s = &ex.spec.node_selector;
    let selects = !(s.match_labels.is_empty() && s.match_expressions.is_empty())
        && crate::selection::selector_matches(s, labels);
    ex.spec.node_names.iter().any(|n| n == node) || selects
}

/// The rule ids a node's report fails: its checks with verdict Fail; a report without checks (an
/// agent of an earlier version) fails the iptables rule.
pub fn failing_rule_ids(state: &LoopbackNodeStateStatus) -> Vec<String> {
    if state.checks.is_empty() {
        return vec![RuleId::Ipv6Loopback.to_string()];
    }
    state
        .checks
        .iter()
        .filter(|c| c.verdict == "Fail")
        .map(|c| c.id.clone())
        .collect()
}

/// The exceptions (names, sorted) that together exempt a failing node now: every rule it fails is
/// named by an unexpired exception that matches it. None when one failing rule is not covered,
/// or when nothing fails (a failing verdict without a failing rule is never exempted).
pub fn exempting(
    exceptions: &[&LoopbackException],
    node: &str,
    labels: &BTreeMap<String, String>,
    state: &LoopbackNodeStateStatus,
    now: &Time,
) -> Option<Vec<String>> {
    let failing = failing_rule_ids(state);
    if failing.is_empty() {
        return None;
    }
    let mut used = Vec::new();
    for id in &failing {
        let ex = exceptions.iter().find(|ex| {
            !expired(ex, now)
                && matches(ex, node, labels)
                && ex.spec.rule_ids.iter().any(|r| r.id() == id)
        })?;
        used.push(ex.metadata.name.clone().unwrap_or_default());
    }
    used.sort();
    used.dedup();
    Some(used)
}

/// An exception's status: its state, the nodes it matches (of `nodes`: name and labels) and
/// those it exempts now (`exempted`: node names).
pub fn status(
    ex: &LoopbackException,
    nodes: &[(&str, &BTreeMap<String, String>)],
    exempted: &[String],
    now: &Time,
) -> LoopbackExceptionStatus {
    let matched = nodes
        .iter()
        .filter(|(name, labels)| matches(ex, name, labels))
        .count();
    let mut names = exempted.to_vec();
    names.sort();
    let (state, message) = if expired(ex, now) {
        (
            ExceptionState::Expired,
            format!(
                "expired at {}: the failing results it covered count as findings again; renew it with a new approval or delete it",
                ex.spec.expires.0
            ),
        )
    } else if matched == 0 {
        (
            ExceptionState::MatchesNoNode,
            "matches no node: check spec.nodeNames and spec.nodeSelector".to_string(),
        )
    } else {
        (
            ExceptionState::Active,
            format!(
                "in force until {}; matches {matched} nodes, exempts {} failing",
                ex.spec.expires.0,
                names.len()
            ),
        )
    };
    LoopbackExceptionStatus {
        state,
        matched_nodes: matched as i32,
        exempted_nodes: names.len() as i32,
        exempted_node_names: names.into_iter().take(MAX_LISTED).collect(),
        message,
    }
}
