//! Status conditions: their schema (a list merged by `type` under server-side apply) and the one
//! rule for `lastTransitionTime`: it moves only when the status of a condition changes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The state of a condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// It does not.
    False,
    /// It cannot be told yet (for example while nodes have not reported).
    Unknown,
}

/// One aspect of an object's state, in the shape of Kubernetes' own conditions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The aspect: Compliant, Ready, Progressing, Reconciling, Degraded or Stalled.
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: ConditionStatus,
    /// A CamelCase word for why the condition has this status.
    pub reason: String,
    /// What a person needs to know, in a sentence.
    pub message: String,
    /// The policy generation this condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the status last changed.
    pub last_transition_time: Time,
}

/// The schema of a conditions list: a map keyed by `type`, so that server-side apply merges
/// conditions one by one.
pub fn conditions_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let item = generator.subschema_for::<Condition>();
    schemars::json_schema!({
        "type": "array",
        "description": "The Compliant, Ready, Progressing, Reconciling, Degraded and Stalled conditions, one of each type.",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": item,
    })
}

/// A condition as computed now, before `lastTransitionTime` is settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionUpdate {
    pub type_: &'static str,
    pub status: ConditionStatus,
    pub reason: String,
    pub message: String,
}

/// Merges freshly computed conditions with the previous ones: a condition keeps its
/// `lastTransitionTime` unless its status changed.
pub fn merge(
    previous: &[Condition],
    updates: Vec<ConditionUpdate>,
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    updates
        .into_iter()
        .map(|u| {
            let last_transition_time = previous
                .iter()
                .find(|p| p.type_ == u.type_ && p.status == u.status)
                .map_or_else(|| now.clone(), |p| p.last_transition_time.clone());
            Condition {
                type_: u.type_.to_string(),
                status: u.status,
                reason: u.reason,
                message: u.message,
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    fn update(status: ConditionStatus, reason: &str) -> ConditionUpdate {
        ConditionUpdate {
            type_: "Compliant",
            status,
            reason: reason.into(),
            message: "m".into(),
        }
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let t0 = time("2026-01-01T00:00:00Z");
        let t1 = time("2026-01-01T00:01:00Z");
        let first = merge(
            &[],
            vec![update(ConditionStatus::False, "NodesNotCompliant")],
            Some(1),
            &t0,
        );
        assert_eq!(first[0].last_transition_time, t0);
        // Same status, new reason and generation: the time stays.
        let same = merge(
            &first,
            vec![update(ConditionStatus::False, "AwaitingNodeReports")],
            Some(2),
            &t1,
        );
        assert_eq!(same[0].last_transition_time, t0);
        assert_eq!(same[0].observed_generation, Some(2));
        let flipped = merge(
            &same,
            vec![update(ConditionStatus::True, "AllNodesCompliant")],
            Some(2),
            &t1,
        );
        assert_eq!(flipped[0].last_transition_time, t1);
    }
}
