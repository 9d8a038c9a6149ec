//! Node states → policy status: the counts, the short list of failing nodes, the conditions
//! (Compliant, Ready, Progressing/Reconciling, Degraded, Stalled), the Events worth telling an
//! admin, and when a deleted policy may let go. Pure: the controller feeds it what its caches hold.
//!
//! A green status must be true now, not only when it was written, so every targeted node needs a
//! live agent that vouches for it: its agent Pod is Ready (the kubelet probes the agent's
//! `/readyz`), and its report was verified within the heartbeat interval. A node without one for
//! longer than the grace period counts as `Unknown` (reason `AgentUnavailable`), never as
//! compliant and never as silently pending.

use crate::api::conditions::{self, ConditionUpdate};
use crate::api::{
    Compliance, ConditionStatus, LoopbackNodeStateStatus, LoopbackPolicy, LoopbackPolicyStatus,
    Mode,
};
use crate::selection;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::collections::BTreeMap;
use std::time::Duration;

/// At most this many names in `nonCompliantNodeNames`.
pub const MAX_LISTED_NODES: usize = 20;

/// What the cluster says about the loopguard agent Pod on a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentPod {
    /// An agent Pod on the node is Ready.
    Ready,
    /// The node's agent Pod is not Ready; since when, when known.
    NotReady { since: Option<Time> },
    /// No agent Pod is on the node.
    Missing,
}

/// What aggregation needs to know about a Node.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Set when the node's Ready condition is not True: since when.
    pub not_ready_since: Option<Time>,
    /// When the Node object was created.
    pub created: Option<Time>,
    /// Its agent Pod.
    pub agent: AgentPod,
}

impl NodeInfo {
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
    /// How often agents refresh `lastVerifiedTime` when nothing else changes.
    pub heartbeat: Duration,
    /// How long a node may be without a live agent before it counts as `Unknown`.
    pub agent_grace: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            not_ready_timeout: Duration::from_secs(300),
            heartbeat: Duration::from_secs(600),
            agent_grace: Duration::from_secs(120),
        }
    }
}

/// Whether a live agent vouches for a node.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Vouch {
    Live,
    /// The agent Pod has not been Ready (or there is none) for longer than the grace period, but
    /// its last report is recent: an agent that reports an error is not Ready, and says why.
    PodDown(String),
    /// Its last report is older than the heartbeat interval plus the grace period.
    Stale(String),
}

fn age(now: &Time, then: &Time) -> Duration {
    now.0.duration_since(then.0).unsigned_abs()
}

/// `1h5m`, `3m20s`, `12s`.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

fn vouch(
    node: &NodeInfo,
    state: Option<&LoopbackNodeStateStatus>,
    now: &Time,
    settings: Settings,
) -> Vouch {
    let verified = state.and_then(|s| s.last_verified_time.as_ref());
    if let Some(v) = verified
        && age(now, v) > settings.heartbeat + settings.agent_grace
    {
        return Vouch::Stale(format!(
            "its agent last verified it {} ago",
            human(age(now, v))
        ));
    }
    let (evidence, why) = match &node.agent {
        AgentPod::Ready => return Vouch::Live,
        AgentPod::NotReady { since } => (since.as_ref(), "its agent Pod is not Ready"),
        AgentPod::Missing => (node.created.as_ref(), "no agent Pod runs on it"),
    };
    // The latest sign of a live agent: the report, or the Pod turning NotReady (or the node
    // appearing, for a node that never had an agent).
    let last = [evidence, verified]
        .into_iter()
        .flatten()
        .max_by_key(|t| t.0);
    match last {
        Some(t) if age(now, t) <= settings.agent_grace => Vouch::Live,
        Some(t) => Vouch::PodDown(format!("{why} (for {})", human(age(now, t)))),
        None => Vouch::PodDown(why.to_string()),
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
    let mut unavailable = Vec::new();
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
        let compliance = match (
            current.map(|s| s.compliance),
            vouch(node, state, now, settings),
        ) {
            // An agent that cannot enforce is not Ready, and its report says why.
            (Some(Compliance::Error), Vouch::Live | Vouch::PodDown(_)) => Some(Compliance::Error),
            (_, Vouch::PodDown(why) | Vouch::Stale(why)) => {
                status.unknown_nodes += 1;
                failing.push(node.name.clone());
                unavailable.push(format!("{} ({why})", node.name));
                continue;
            }
            (compliance, Vouch::Live) => compliance,
        };
        match compliance {
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
    unavailable.sort();
    stale.sort();
    status.non_compliant_node_names = failing.iter().take(MAX_LISTED_NODES).cloned().collect();
    status.summary = format!(
        "{}/{}",
        status.compliant_nodes,
        status.targeted_nodes - status.not_applicable_nodes
    );
    let problems = Problems {
        errored: &errored_names,
        unavailable: &unavailable,
        stale: &stale,
        audit: policy.spec.mode == Mode::Audit,
    };
    let updates = condition_updates(&status, generation, &problems, settings);
    let previous_conditions = previous
        .map(|p| p.conditions.as_slice())
        .unwrap_or_default();
    status.conditions = conditions::merge(previous_conditions, updates, generation, now);
    status
}

/// The nodes behind the conditions, by kind of trouble.
struct Problems<'a> {
    errored: &'a [String],
    /// "name (why)" for each node without a live agent.
    unavailable: &'a [String],
    /// NotReady nodes that have not reported for long.
    stale: &'a [String],
    audit: bool,
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
    p: &Problems,
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
    let no_agent = format!(
        "{} of {} nodes have no live agent vouching for them: {}",
        s.unknown_nodes,
        s.targeted_nodes,
        names(p.unavailable)
    );
    // Compliant: do the nodes carry the rules, as verified now?
    let (status, reason, message) = if s.targeted_nodes == 0 {
        let extra = if s.overridden_nodes > 0 {
            format!(
                " ({} selected nodes are governed by other policies)",
                s.overridden_nodes
            )
        } else {
            String::new()
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
        (False, "AgentsUnavailable", no_agent.clone())
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
        (Unknown, "AwaitingNodeReports", not_reported.clone())
    } else {
        let na = if s.not_applicable_nodes > 0 {
            format!("; {} not applicable", s.not_applicable_nodes)
        } else {
            String::new()
        };
        (
            True,
            "AllNodesCompliant",
            format!(
                "{} of {} nodes compliant at {at_gen}{na}",
                s.compliant_nodes, s.targeted_nodes
            ),
        )
    };
    let compliant = update("Compliant", status, reason, message.clone());
    // Ready: has loopguard done what the policy asks? The same as Compliant in Enforce mode; in
    // Audit mode, every node has reported (findings are the point of an audit, not a failure).
    let audit_done = p.audit && reason == "NodesNotCompliant";
    let ready = if audit_done {
        update(
            "Ready",
            True,
            "AuditReported",
            format!(
                "every targeted node reported {at_gen}; {} have findings",
                s.non_compliant_nodes
            ),
        )
    } else {
        update(
            "Ready",
            if status == Unknown { False } else { status },
            reason,
            message.clone(),
        )
    };
    let (progressing, reconciling) = if s.pending_nodes > 0 {
        (
            update("Progressing", True, "NodesPending", not_reported.clone()),
            update("Reconciling", True, "NodesPending", not_reported),
        )
    } else {
        let done = format!("every targeted node reported {at_gen}");
        (
            update("Progressing", False, "AllNodesReported", done.clone()),
            update("Reconciling", False, "AllNodesReported", done),
        )
    };
    // Stalled (kstatus: Failed): not Ready for a reason that waiting alone will not fix.
    let stalled = if ready.status == False && reason != "AwaitingNodeReports" {
        update("Stalled", True, reason, message)
    } else {
        update(
            "Stalled",
            False,
            "AsExpected",
            "nothing keeps the policy from taking effect".into(),
        )
    };
    let degraded = if s.errored_nodes > 0 {
        update(
            "Degraded",
            True,
            "NodeErrors",
            format!("agents report errors on {}", names(p.errored)),
        )
    } else if s.unknown_nodes > 0 {
        update("Degraded", True, "AgentsUnavailable", no_agent)
    } else if !p.stale.is_empty() {
        update(
            "Degraded",
            True,
            "NodesNotReady",
            format!(
                "{} NotReady for over {}s without reporting {at_gen}",
                names(p.stale),
                settings.not_ready_timeout.as_secs()
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
    };
    vec![
        compliant,
        ready,
        progressing,
        reconciling,
        degraded,
        stalled,
    ]
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
            created: Some(t("2026-01-01T00:00:00Z")),
            agent: AgentPod::Ready,
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
        assert_eq!(s.summary, "1/4", "NotApplicable nodes are left out");
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

    fn verified_at(mut r: LoopbackNodeStateStatus, at: &str) -> LoopbackNodeStateStatus {
        r.last_verified_time = Some(t(at));
        r
    }

    #[test]
    fn a_node_without_a_live_agent_is_unknown_never_green() {
        let p = policy("base", 1, 0, &[]);
        let compliant = |at| verified_at(report("base", 1, Compliance::Compliant), at);
        let mut not_ready = node("stopped", &[]);
        not_ready.agent = AgentPod::NotReady {
            since: Some(t("2026-06-01T11:57:00Z")),
        };
        let mut blip = node("blip", &[]);
        blip.agent = AgentPod::NotReady {
            since: Some(t("2026-06-01T11:59:30Z")),
        };
        let mut no_pod = node("nopod", &[]);
        no_pod.agent = AgentPod::Missing;
        let s = run(
            &p,
            &[&p],
            &[node("fine", &[]), not_ready, blip, no_pod, node("old", &[])],
            &[
                ("fine", compliant("2026-06-01T11:59:00Z")),
                ("stopped", compliant("2026-06-01T11:56:00Z")),
                ("blip", compliant("2026-06-01T11:50:00Z")),
                ("nopod", compliant("2026-06-01T11:55:00Z")),
                // Pod Ready, but the report is 20 minutes old: the agent is wedged.
                ("old", compliant("2026-06-01T11:40:00Z")),
            ],
        );
        assert_eq!(
            (s.targeted_nodes, s.compliant_nodes, s.unknown_nodes),
            (5, 2, 3),
            "{s:?}"
        );
        assert_eq!(s.non_compliant_node_names, vec!["nopod", "old", "stopped"]);
        assert_eq!(
            cond(&s, "Compliant"),
            (ConditionStatus::False, "AgentsUnavailable".into())
        );
        assert_eq!(
            cond(&s, "Degraded"),
            (ConditionStatus::True, "AgentsUnavailable".into())
        );
        assert_eq!(cond(&s, "Ready").0, ConditionStatus::False);
        assert_eq!(cond(&s, "Stalled").0, ConditionStatus::True);
        let message = &s.conditions[0].message;
        for why in [
            "stopped (its agent Pod is not Ready (for 3m0s))",
            "nopod (no agent Pod runs on it (for 5m0s))",
            "old (its agent last verified it 20m0s ago)",
        ] {
            assert!(message.contains(why), "{message}");
        }
    }

    #[test]
    fn a_node_without_an_agent_and_without_a_report_is_not_silently_pending() {
        let p = policy("base", 1, 0, &[]);
        let mut fresh = node("fresh", &[]);
        fresh.agent = AgentPod::Missing;
        fresh.created = Some(t("2026-06-01T11:59:30Z"));
        let mut forgotten = node("forgotten", &[]);
        forgotten.agent = AgentPod::Missing;
        let s = run(&p, &[&p], &[fresh, forgotten], &[]);
        assert_eq!((s.pending_nodes, s.unknown_nodes), (1, 1));
        assert_eq!(s.non_compliant_node_names, vec!["forgotten"]);
    }

    #[test]
    fn an_agent_that_reports_an_error_is_counted_as_an_error_not_as_missing() {
        let p = policy("base", 1, 0, &[]);
        let mut broken = node("broken", &[]);
        broken.agent = AgentPod::NotReady {
            since: Some(t("2026-06-01T11:00:00Z")),
        };
        let error = verified_at(report("base", 1, Compliance::Error), "2026-06-01T11:58:00Z");
        let s = run(&p, &[&p], &[broken], &[("broken", error)]);
        assert_eq!((s.errored_nodes, s.unknown_nodes), (1, 0));
        assert_eq!(
            cond(&s, "Compliant"),
            (ConditionStatus::False, "NodeErrors".into())
        );
    }

    #[test]
    fn ready_is_what_gitops_tools_wait_for() {
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
        assert_eq!(
            cond(&green, "Ready"),
            (ConditionStatus::True, "AllNodesCompliant".into())
        );
        assert_eq!(cond(&green, "Reconciling").0, ConditionStatus::False);
        assert_eq!(cond(&green, "Stalled").0, ConditionStatus::False);
        // Rolling out: Reconciling (kstatus: InProgress), not Stalled.
        let rolling = run(
            &p,
            &[&p],
            &nodes,
            &[("a", report("base", 1, Compliance::Compliant))],
        );
        assert_eq!(cond(&rolling, "Ready").0, ConditionStatus::False);
        assert_eq!(cond(&rolling, "Reconciling").0, ConditionStatus::True);
        assert_eq!(cond(&rolling, "Stalled").0, ConditionStatus::False);
        // An audit with findings did its job: Ready, not Compliant.
        let mut audit = policy("audit", 1, 0, &[]);
        audit.spec.mode = Mode::Audit;
        let s = run(
            &audit,
            &[&audit],
            &nodes,
            &[
                ("a", report("audit", 1, Compliance::NonCompliant)),
                ("b", report("audit", 1, Compliance::Compliant)),
            ],
        );
        assert_eq!(cond(&s, "Compliant").0, ConditionStatus::False);
        assert_eq!(
            cond(&s, "Ready"),
            (ConditionStatus::True, "AuditReported".into())
        );
        // Enforce mode with a node that stays non-compliant: stalled.
        let s = run(
            &p,
            &[&p],
            &nodes,
            &[
                ("a", report("base", 1, Compliance::NonCompliant)),
                ("b", report("base", 1, Compliance::Compliant)),
            ],
        );
        assert_eq!(cond(&s, "Ready").0, ConditionStatus::False);
        assert_eq!(
            cond(&s, "Stalled"),
            (ConditionStatus::True, "NodesNotCompliant".into())
        );
    }
}
