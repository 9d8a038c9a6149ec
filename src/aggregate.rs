//! Node states → policy status: the counts, the short list of failing nodes, the Compliant /
//! Progressing / Degraded conditions, the Events worth telling an admin, and when a deleted
//! policy may let go. Pure: the controller feeds it what its caches hold.

use crate::api::conditions::{self, ConditionUpdate};
use crate::api::{
    Compliance, ConditionStatus, LoopbackNodeStateStatus, LoopbackPolicy, LoopbackPolicyStatus,
};
use crate::selection;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::collections::BTreeMap;
use std::time::Duration;

/// At most this many names in `nonCompliantNodeNames`.
pub const MAX_LISTED_NODES: usize = 20;

/// What aggregation needs to know about a Node.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Set when the node's Ready condition is not True: since when.
    pub not_ready_since: Option<Time>,
}

impl NodeInfo {
    pub fn from_node(node: &Node) -> Option<NodeInfo> {
        let ready = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
        let not_ready_since = ready.filter(|c| c.status != "True").map(|c| {
            c.last_transition_time
                .clone()
                .unwrap_or(Time(jiff::Timestamp::UNIX_EPOCH))
        });
        Some(NodeInfo {
            name: node.metadata.name.clone()?,
            labels: node.metadata.labels.clone().unwrap_or_default(),
            not_ready_since,
        })
    }

    fn not_ready_for(&self, now: &Time) -> Option<Duration> {
        self.not_ready_since
            .as_ref()
            .map(|since| now.0.duration_since(since.0).unsigned_abs())
    }
}

/// Tunables of the roll-up.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// A targeted node NotReady for this long, without a current report, makes the policy Degraded.
    pub not_ready_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            not_ready_timeout: Duration::from_secs(300),
        }
    }
}

/// Whether `state` is a report for `policy` at its current generation.
fn reports_current(policy: &LoopbackPolicy, s: &LoopbackNodeStateStatus) -> bool {
    s.policy_name.as_deref() == policy.metadata.name.as_deref()
        && s.policy_generation == policy.metadata.generation
        && s.compliance != Compliance::Unmanaged
}

/// The status `policy` should have now. `previous` supplies the conditions' transition times.
pub fn aggregate(
    policy: &LoopbackPolicy,
    policies: &[&LoopbackPolicy],
    nodes: &[NodeInfo],
    states: &BTreeMap<String, LoopbackNodeStateStatus>,
    previous: Option<&LoopbackPolicyStatus>,
    now: &Time,
    settings: Settings,
) -> LoopbackPolicyStatus {
    let generation = policy.metadata.generation;
    let mut status = LoopbackPolicyStatus {
        observed_generation: generation,
        ..Default::default()
    };
    let mut failing = Vec::new();
    let mut errored_names = Vec::new();
    let mut stale = Vec::new();
    for node in nodes {
        if !selection::selects_node(policy, &node.labels) {
            continue;
        }
        let winner = selection::governing(&node.labels, policies.iter().copied());
        if winner.map(|w| &w.metadata.name) != Some(&policy.metadata.name) {
            status.overridden_nodes += 1;
            continue;
        }
        status.targeted_nodes += 1;
        let state = states.get(&node.name);
        let current = state.filter(|s| reports_current(policy, s));
        match current.map(|s| s.compliance) {
            Some(Compliance::Compliant) => status.compliant_nodes += 1,
            Some(Compliance::NotApplicable) => status.not_applicable_nodes += 1,
            Some(Compliance::NonCompliant) => {
                status.non_compliant_nodes += 1;
                failing.push(node.name.clone());
            }
            Some(Compliance::Error) => {
                status.errored_nodes += 1;
                failing.push(node.name.clone());
                errored_names.push(node.name.clone());
            }
            // No report for this generation yet (a current report is never Unmanaged).
            None | Some(Compliance::Unmanaged) => {
                status.pending_nodes += 1;
                if node
                    .not_ready_for(now)
                    .is_some_and(|d| d >= settings.not_ready_timeout)
                {
                    stale.push(node.name.clone());
                }
            }
        }
    }
    failing.sort();
    errored_names.sort();
    stale.sort();
    status.non_compliant_node_names = failing.iter().take(MAX_LISTED_NODES).cloned().collect();
    status.summary = format!("{}/{}", status.compliant_nodes, status.targeted_nodes);
    let updates = condition_updates(&status, generation, &errored_names, &stale, settings);
    let previous_conditions = previous
        .map(|p| p.conditions.as_slice())
        .unwrap_or_default();
    status.conditions = conditions::merge(previous_conditions, updates, generation, now);
    status
}

fn names(list: &[String]) -> String {
    let shown: Vec<&str> = list.iter().take(5).map(String::as_str).collect();
    let more = list.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

fn condition_updates(
    s: &LoopbackPolicyStatus,
    generation: Option<i64>,
    errored: &[String],
    stale: &[String],
    settings: Settings,
) -> Vec<ConditionUpdate> {
    use ConditionStatus::*;
    let at_gen = generation.map_or_else(
        || "the current generation".to_string(),
        |g| format!("generation {g}"),
    );
    let not_reported = format!(
        "{} of {} nodes have not reported {at_gen} yet",
        s.pending_nodes, s.targeted_nodes
    );
    let update = |type_, status, reason: &str, message: String| ConditionUpdate {
        type_,
        status,
        reason: reason.into(),
        message,
    };
    let compliant = if s.targeted_nodes == 0 {
        let extra = if s.overridden_nodes > 0 {
            format!(
                " ({} selected nodes are governed by other policies)",
                s.overridden_nodes
            )
        } else {
            String::new()
        };
        update(
            "Compliant",
            False,
            "NoTargetNodes",
            format!("the policy selects no node it governs; check spec.nodeSelector{extra}"),
        )
    } else if s.errored_nodes > 0 {
        update(
            "Compliant",
            False,
            "NodeErrors",
            format!(
                "{} of {} nodes report errors: {}",
                s.errored_nodes,
                s.targeted_nodes,
                names(errored)
            ),
        )
    } else if s.non_compliant_nodes > 0 {
        update(
            "Compliant",
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
        update(
            "Compliant",
            Unknown,
            "AwaitingNodeReports",
            not_reported.clone(),
        )
    } else {
        let na = if s.not_applicable_nodes > 0 {
            format!("; {} not applicable", s.not_applicable_nodes)
        } else {
            String::new()
        };
        update(
            "Compliant",
            True,
            "AllNodesCompliant",
            format!(
                "{} of {} nodes compliant at {at_gen}{na}",
                s.compliant_nodes, s.targeted_nodes
            ),
        )
    };
    let progressing = if s.pending_nodes > 0 {
        update("Progressing", True, "NodesPending", not_reported)
    } else {
        update(
            "Progressing",
            False,
            "AllNodesReported",
            format!("every targeted node reported {at_gen}"),
        )
    };
    let degraded = if s.errored_nodes > 0 {
        update(
            "Degraded",
            True,
            "NodeErrors",
            format!("agents report errors on {}", names(errored)),
        )
    } else if !stale.is_empty() {
        update(
            "Degraded",
            True,
            "NodesNotReady",
            format!(
                "{} NotReady for over {}s without reporting {at_gen}",
                names(stale),
                settings.not_ready_timeout.as_secs()
            ),
        )
    } else {
        update(
            "Degraded",
            False,
            "AsExpected",
            "no node reports an error or is stuck NotReady".into(),
        )
    };
    vec![compliant, progressing, degraded]
}

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

/// Where the cleanup of a deleted policy stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanupProgress {
    /// Nodes that still report following the policy and have not reported their rules removed.
    pub waiting: Vec<String>,
    /// Of those, nodes that are gone NotReady for longer than the timeout: not worth waiting for.
    pub unreachable: Vec<String>,
}

impl CleanupProgress {
    /// The finalizer may go once every node still waited for is unreachable.
    pub fn done(&self) -> bool {
        self.waiting.len() == self.unreachable.len()
    }
}

/// Which nodes a deleted policy is still waiting for.
pub fn cleanup_progress(
    policy: &LoopbackPolicy,
    nodes: &[NodeInfo],
    states: &BTreeMap<String, LoopbackNodeStateStatus>,
    now: &Time,
    settings: Settings,
) -> CleanupProgress {
    let mut progress = CleanupProgress::default();
    for (name, state) in states {
        let follows = state.policy_name.as_deref() == policy.metadata.name.as_deref();
        if !follows || state.compliance == Compliance::Unmanaged {
            continue;
        }
        let node = nodes.iter().find(|n| &n.name == name);
        // A node whose Node object is gone will never answer; its state goes with it.
        let unreachable = match node {
            None => true,
            Some(n) => n
                .not_ready_for(now)
                .is_some_and(|d| d >= settings.not_ready_timeout),
        };
        progress.waiting.push(name.clone());
        if unreachable {
            progress.unreachable.push(name.clone());
        }
    }
    progress
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{LoopbackPolicySpec, NodeSelector};

    fn t(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    const NOW: &str = "2026-06-01T12:00:00Z";

    fn policy(
        name: &str,
        generation: i64,
        priority: i32,
        selector: &[(&str, &str)],
    ) -> LoopbackPolicy {
        let mut p = LoopbackPolicy::new(
            name,
            LoopbackPolicySpec {
                priority,
                node_selector: NodeSelector {
                    match_labels: selector
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        p.metadata.generation = Some(generation);
        p.metadata.creation_timestamp = Some(t("2026-01-01T00:00:00Z"));
        p
    }

    fn node(name: &str, labels: &[(&str, &str)]) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            not_ready_since: None,
        }
    }

    fn report(policy: &str, generation: i64, compliance: Compliance) -> LoopbackNodeStateStatus {
        LoopbackNodeStateStatus {
            policy_name: Some(policy.into()),
            policy_generation: Some(generation),
            compliance,
            ..Default::default()
        }
    }

    fn run(
        p: &LoopbackPolicy,
        all: &[&LoopbackPolicy],
        nodes: &[NodeInfo],
        states: &[(&str, LoopbackNodeStateStatus)],
    ) -> LoopbackPolicyStatus {
        let states = states
            .iter()
            .map(|(n, s)| (n.to_string(), s.clone()))
            .collect();
        aggregate(p, all, nodes, &states, None, &t(NOW), Settings::default())
    }

    fn cond(s: &LoopbackPolicyStatus, type_: &str) -> (ConditionStatus, String) {
        let c = s.conditions.iter().find(|c| c.type_ == type_).unwrap();
        (c.status, c.reason.clone())
    }

    #[test]
    fn mixed_nodes_are_counted_and_not_compliant() {
        let p = policy("base", 3, 0, &[]);
        let nodes: Vec<NodeInfo> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|n| node(n, &[]))
            .collect();
        let s = run(
            &p,
            &[&p],
            &nodes,
            &[
                ("a", report("base", 3, Compliance::Compliant)),
                ("b", report("base", 3, Compliance::NonCompliant)),
                ("c", report("base", 3, Compliance::NotApplicable)),
                ("d", report("base", 3, Compliance::Error)),
                ("e", report("base", 2, Compliance::Compliant)),
            ],
        );
        assert_eq!(
            (
                s.targeted_nodes,
                s.compliant_nodes,
                s.non_compliant_nodes,
                s.not_applicable_nodes,
                s.errored_nodes,
                s.pending_nodes
            ),
            (5, 1, 1, 1, 1, 1)
        );
        assert_eq!(s.non_compliant_node_names, vec!["b", "d"]);
        assert_eq!(s.summary, "1/5");
        assert_eq!(
            cond(&s, "Compliant"),
            (ConditionStatus::False, "NodeErrors".into())
        );
        assert_eq!(
            cond(&s, "Progressing"),
            (ConditionStatus::True, "NodesPending".into())
        );
        assert_eq!(
            cond(&s, "Degraded"),
            (ConditionStatus::True, "NodeErrors".into())
        );
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(3))
        );
    }

    #[test]
    fn not_applicable_nodes_do_not_block_compliance() {
        let p = policy("base", 1, 0, &[]);
        let nodes = [node("a", &[]), node("b", &[])];
        let s = run(
            &p,
            &[&p],
            &nodes,
            &[
                ("a", report("base", 1, Compliance::Compliant)),
                ("b", report("base", 1, Compliance::NotApplicable)),
            ],
        );
        assert_eq!(
            cond(&s, "Compliant"),
            (ConditionStatus::True, "AllNodesCompliant".into())
        );
        assert_eq!(cond(&s, "Progressing").0, ConditionStatus::False);
        assert_eq!(cond(&s, "Degraded").0, ConditionStatus::False);
    }

    #[test]
    fn a_policy_selecting_nothing_is_never_green() {
        let p = policy("typo", 1, 0, &[("role", "wrokers")]);
        let s = run(&p, &[&p], &[node("a", &[("role", "workers")])], &[]);
        assert_eq!(s.targeted_nodes, 0);
        assert_eq!(
            cond(&s, "Compliant"),
            (ConditionStatus::False, "NoTargetNodes".into())
        );
    }

    #[test]
    fn a_spec_change_is_progressing_until_nodes_catch_up() {
        let mut p = policy("base", 1, 0, &[]);
        let nodes = [node("a", &[])];
        let before = run(
            &p,
            &[&p],
            &nodes,
            &[("a", report("base", 1, Compliance::Compliant))],
        );
        assert_eq!(cond(&before, "Compliant").0, ConditionStatus::True);
        p.metadata.generation = Some(2);
        let states: BTreeMap<String, LoopbackNodeStateStatus> =
            [("a".to_string(), report("base", 1, Compliance::Compliant))].into();
        let later = t("2026-06-01T12:05:00Z");
        let after = aggregate(
            &p,
            &[&p],
            &nodes,
            &states,
            Some(&before),
            &later,
            Settings::default(),
        );
        assert_eq!(after.pending_nodes, 1);
        assert_eq!(
            cond(&after, "Compliant"),
            (ConditionStatus::Unknown, "AwaitingNodeReports".into())
        );
        assert_eq!(cond(&after, "Progressing").0, ConditionStatus::True);
        let progressing = after
            .conditions
            .iter()
            .find(|c| c.type_ == "Progressing")
            .unwrap();
        assert_eq!(
            progressing.last_transition_time, later,
            "Progressing flipped"
        );
        let degraded = after
            .conditions
            .iter()
            .find(|c| c.type_ == "Degraded")
            .unwrap();
        assert_eq!(
            degraded.last_transition_time,
            t(NOW),
            "Degraded stayed False"
        );
    }

    #[test]
    fn overlapping_policies_report_overridden_nodes() {
        let base = policy("base", 1, 0, &[]);
        let workers = policy("workers", 1, 10, &[("role", "worker")]);
        let nodes = [
            node("w1", &[("role", "worker")]),
            node("w2", &[("role", "worker")]),
            node("cp", &[]),
        ];
        let all = [&base, &workers];
        let s = run(
            &base,
            &all,
            &nodes,
            &[("cp", report("base", 1, Compliance::Compliant))],
        );
        assert_eq!(
            (s.targeted_nodes, s.overridden_nodes, s.compliant_nodes),
            (1, 2, 1)
        );
        assert_eq!(cond(&s, "Compliant").0, ConditionStatus::True);
        let w = run(&workers, &all, &nodes, &[]);
        assert_eq!(
            (w.targeted_nodes, w.overridden_nodes, w.pending_nodes),
            (2, 0, 2)
        );
    }

    #[test]
    fn a_node_stuck_not_ready_turns_degraded() {
        let p = policy("base", 1, 0, &[]);
        let mut down = node("down", &[]);
        down.not_ready_since = Some(t("2026-06-01T11:50:00Z"));
        let mut flapping = node("flap", &[]);
        flapping.not_ready_since = Some(t("2026-06-01T11:59:00Z"));
        let s = run(&p, &[&p], &[down, flapping], &[]);
        assert_eq!(
            cond(&s, "Degraded"),
            (ConditionStatus::True, "NodesNotReady".into())
        );
        let msg = &s
            .conditions
            .iter()
            .find(|c| c.type_ == "Degraded")
            .unwrap()
            .message;
        assert!(msg.contains("down") && !msg.contains("flap"), "{msg}");
    }

    #[test]
    fn the_failing_list_is_short_and_sorted() {
        let p = policy("base", 1, 0, &[]);
        let nodes: Vec<NodeInfo> = (0..50).map(|i| node(&format!("n{i:02}"), &[])).collect();
        let states: Vec<(String, LoopbackNodeStateStatus)> = (0..50)
            .rev()
            .map(|i| {
                (
                    format!("n{i:02}"),
                    report("base", 1, Compliance::NonCompliant),
                )
            })
            .collect();
        let refs: Vec<(&str, LoopbackNodeStateStatus)> = states
            .iter()
            .map(|(n, s)| (n.as_str(), s.clone()))
            .collect();
        let s = run(&p, &[&p], &nodes, &refs);
        assert_eq!(s.non_compliant_nodes, 50);
        assert_eq!(s.non_compliant_node_names.len(), MAX_LISTED_NODES);
        assert_eq!(s.non_compliant_node_names[0], "n00");
        let msg = &s.conditions[0].message;
        assert!(msg.contains("and 15 more"), "{msg}");
    }

    #[test]
    fn notices_fire_on_transitions_only() {
        let p = policy("base", 1, 0, &[]);
        let nodes = [node("a", &[]), node("b", &[])];
        let green = run(
            &p,
            &[&p],
            &nodes,
            &[
                ("a", report("base", 1, Compliance::Compliant)),
                ("b", report("base", 1, Compliance::Compliant)),
            ],
        );
        assert_eq!(notices(None, &green)[0].reason, "Compliant");
        assert!(notices(Some(&green), &green).is_empty());
        let red = run(
            &p,
            &[&p],
            &nodes,
            &[
                ("a", report("base", 1, Compliance::Compliant)),
                ("b", report("base", 1, Compliance::NonCompliant)),
            ],
        );
        let n = notices(Some(&green), &red);
        assert_eq!(n.len(), 1);
        assert!(n[0].warning && n[0].note.contains('b'));
        assert!(notices(Some(&red), &red).is_empty());
    }

    #[test]
    fn cleanup_waits_for_followers_but_not_for_unreachable_nodes() {
        let p = policy("gone", 1, 0, &[]);
        let mut down = node("down", &[]);
        down.not_ready_since = Some(t("2026-06-01T11:00:00Z"));
        let nodes = [node("a", &[]), node("b", &[]), down];
        let mut states: BTreeMap<String, LoopbackNodeStateStatus> = [
            ("a".to_string(), report("gone", 1, Compliance::Compliant)),
            ("b".to_string(), report("other", 4, Compliance::Compliant)),
            ("down".to_string(), report("gone", 1, Compliance::Compliant)),
            (
                "vanished".to_string(),
                report("gone", 1, Compliance::Compliant),
            ),
        ]
        .into();
        let progress = cleanup_progress(&p, &nodes, &states, &t(NOW), Settings::default());
        assert_eq!(progress.waiting, vec!["a", "down", "vanished"]);
        assert_eq!(progress.unreachable, vec!["down", "vanished"]);
        assert!(!progress.done());
        states.insert("a".into(), report("gone", 1, Compliance::Unmanaged));
        assert!(cleanup_progress(&p, &nodes, &states, &t(NOW), Settings::default()).done());
    }
}
