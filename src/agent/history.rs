//! A node's verdict history: when its verdict last changed, since when it is not compliant, and
//! its last few changes. Pure: the status about to be written, and the one written before it (by
//! this process, or by the agent before a restart, read back from the API server).

use crate::api::node_state::Transition;
use crate::api::{Compliance, LoopbackNodeStateStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// How many verdict changes a node state keeps (the CRD's limit too).
pub const MAX_TRANSITIONS: usize = 10;

/// Whether a verdict counts against the node: from the first such verdict on, and through any
/// number of them in a row, the node is not compliant.
fn failing(c: Compliance) -> bool {
    matches!(c, Compliance::NonCompliant | Compliance::Error)
}

/// `status` with the history carried over from `previous` and, where its verdict differs (or
/// there is none before), one more transition at the time the check found it. A status that
/// repeats the previous verdict gets the previous history unchanged, so it says nothing new.
pub fn carry(
    previous: Option<&LoopbackNodeStateStatus>,
    mut status: LoopbackNodeStateStatus,
) -> LoopbackNodeStateStatus {
    let found = status
        .last_verified_time
        .clone()
        .unwrap_or_else(|| Time(jiff::Timestamp::now()));
    let before = previous.map(|p| p.compliance);
    let mut transitions = previous.map(|p| p.transitions.clone()).unwrap_or_default();
    if before == Some(status.compliance) && previous.is_some_and(|p| p.verdict_since.is_some()) {
        let previous = previous.expect("checked");
        status.verdict_since = previous.verdict_since.clone();
        status.non_compliant_since = previous.non_compliant_since.clone();
        status.transitions = transitions;
        return status;
    }
    if before != Some(status.compliance) {
        transitions.push(Transition {
            time: found.clone(),
            from: before,
            to: status.compliance,
            reason: status.reason.clone(),
        });
    }
    let excess = transitions.len().saturating_sub(MAX_TRANSITIONS);
    transitions.drain(..excess);
    status.verdict_since = Some(found.clone());
    status.non_compliant_since = if failing(status.compliance) {
        previous
            .filter(|p| failing(p.compliance))
            .and_then(|p| p.non_compliant_since.clone())
            .or(Some(found))
    } else {
        None
    };
    status.transitions = transitions;
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(minute: u32, compliance: Compliance, reason: &str) -> LoopbackNodeStateStatus {
        LoopbackNodeStateStatus {
            compliance,
            reason: reason.into(),
            last_verified_time: Some(Time(
                format!("2026-06-01T12:{minute:02}:00Z").parse().unwrap(),
            )),
            ..Default::default()
        }
    }

    fn time(minute: u32) -> Option<Time> {
        Some(Time(
            format!("2026-06-01T12:{minute:02}:00Z").parse().unwrap(),
        ))
    }

    #[test]
    fn the_first_verdict_starts_the_history_and_a_repeat_changes_nothing() {
        let first = carry(None, at(0, Compliance::Compliant, "RulesPresent"));
        assert_eq!(first.verdict_since, time(0));
        assert_eq!(first.non_compliant_since, None);
        assert_eq!(first.transitions.len(), 1);
        assert_eq!(first.transitions[0].from, None);
        // The same verdict a minute later: the same history, so the status says nothing new.
        let again = carry(Some(&first), at(1, Compliance::Compliant, "RulesPresent"));
        assert_eq!(again.verdict_since, first.verdict_since);
        assert_eq!(again.transitions, first.transitions);
    }

    #[test]
    fn not_compliant_since_spans_errors_and_ends_when_compliant() {
        let mut s = carry(None, at(0, Compliance::Compliant, "RulesPresent"));
        s = carry(Some(&s), at(5, Compliance::NonCompliant, "RulesMissing"));
        assert_eq!(s.non_compliant_since, time(5));
        s = carry(Some(&s), at(6, Compliance::NonCompliant, "RulesMissing"));
        assert_eq!(s.non_compliant_since, time(5));
        s = carry(Some(&s), at(7, Compliance::Error, "RestoreFailed"));
        assert_eq!(
            (s.non_compliant_since.clone(), s.verdict_since.clone()),
            (time(5), time(7)),
            "an error after a failure: still not compliant since 12:05"
        );
        s = carry(Some(&s), at(9, Compliance::Compliant, "RulesPresent"));
        assert_eq!(s.non_compliant_since, None);
        assert_eq!(s.verdict_since, time(9));
        let path: Vec<(Option<Compliance>, Compliance, &str)> = s
            .transitions
            .iter()
            .map(|t| (t.from, t.to, t.reason.as_str()))
            .collect();
        assert_eq!(
            path,
            [
                (None, Compliance::Compliant, "RulesPresent"),
                (
                    Some(Compliance::Compliant),
                    Compliance::NonCompliant,
                    "RulesMissing"
                ),
                (
                    Some(Compliance::NonCompliant),
                    Compliance::Error,
                    "RestoreFailed"
                ),
                (
                    Some(Compliance::Error),
                    Compliance::Compliant,
                    "RulesPresent"
                ),
            ]
        );
    }

    #[test]
    fn the_history_is_bounded_keeping_the_newest() {
        let mut s = carry(None, at(0, Compliance::Compliant, "RulesPresent"));
        for minute in 1..30 {
            let c = if minute % 2 == 1 {
                Compliance::NonCompliant
            } else {
                Compliance::Compliant
            };
            s = carry(Some(&s), at(minute, c, "R"));
        }
        assert_eq!(s.transitions.len(), MAX_TRANSITIONS);
        assert_eq!(s.transitions.last().unwrap().time, time(29).unwrap());
        assert_eq!(s.non_compliant_since, time(29));
    }

    #[test]
    fn a_status_written_before_history_existed_gets_one() {
        // An agent of an earlier version wrote Compliant without history: the new agent starts
        // the history at its own first check, recording no change.
        let old = at(0, Compliance::Compliant, "RulesPresent");
        let s = carry(Some(&old), at(3, Compliance::Compliant, "RulesPresent"));
        assert_eq!(s.verdict_since, time(3));
        assert!(s.transitions.is_empty());
    }
}
