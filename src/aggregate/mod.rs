//! Node states → policy status: the counts, the short list of failing nodes, the conditions
//! (Compliant, Ready, Progressing/Reconciling, Degraded, Stalled), the Events worth telling an
//! admin, and when a deleted policy may let go. Pure: the controller feeds it what its caches hold.
//!
//! A green status must be true now, not only when it was written, so every targeted node needs a
//! live agent that vouches for it: its agent Pod is Ready (the kubelet probes the agent's
//! `/readyz`), and its report was verified within the heartbeat interval. A node without one for
//! longer than the grace period counts as `Unknown` (reason `AgentUnavailable`), never as
//! compliant and never as silently pending.

mod cleanup;
mod conditions;
pub mod exemption;
mod notices;
pub mod policy_report;
#[cfg(test)]
mod tests;
mod vouch;

pub use cleanup::{CleanupProgress, cleanup_progress};
pub use notices::{Notice, deletion_note, notices};

use crate::api::conditions::merge;
use crate::api::policy::Approval;
use crate::api::{
    Compliance, LoopbackException, LoopbackNodeStateStatus, LoopbackPolicy, LoopbackPolicyStatus,
    Mode,
};
use crate::api::{RuleCheck, RuleTally};
use crate::rules::catalog::RuleId;
use crate::selection;
use conditions::{Problems, condition_updates};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::collections::BTreeMap;
use std::time::Duration;
use vouch::{Vouch, vouch};

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

/// Whether `state` is a report for `policy` at its current generation.
fn reports_current(policy: &LoopbackPolicy, s: &LoopbackNodeStateStatus) -> bool {
    s.policy_name.as_deref() == policy.metadata.name.as_deref()
        && s.policy_generation == policy.metadata.generation
        && s.compliance != Compliance::Unmanaged
}

/// The status `policy` should have now. `previous` supplies the conditions' transition times.
#[allow(clippy::too_many_arguments)]
pub fn aggregate(
    policy: &LoopbackPolicy,
    policies: &[&LoopbackPolicy],
    nodes: &[NodeInfo],
    states: &BTreeMap<String, LoopbackNodeStateStatus>,
    exceptions: &[&LoopbackException],
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
    let mut unsupported = Vec::new();
    let mut exempted = Vec::new();
    let mut rules = RuleTallies::default();
    for node in nodes {
        if !selection::selects_node(policy, &node.labels) {
            continue;
        }
        let winner = selection::governing(&node.labels, policies.iter().copied());
        if winner.map(|w| &w.metadata.name) != Some(&policy.metadata.name) {
            status.overridden_nodes += 1;
            continue;
        }
        if let Some(why) = selection::unsupported(&node.labels) {
            unsupported.push(format!("{} ({why})", node.name));
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
        if let Some(report) = current {
            rules.add(&report.checks);
        }
        match compliance {
            Some(Compliance::Compliant) => status.compliant_nodes += 1,
            Some(Compliance::NotApplicable) => status.not_applicable_nodes += 1,
            Some(Compliance::NonCompliant) => {
                let by = current.and_then(|report| {
                    exemption::exempting(exceptions, &node.name, &node.labels, report, now)
                });
                if let Some(by) = by {
                    status.exempted_nodes += 1;
                    exempted.push(format!("{} ({})", node.name, by.join(", ")));
                } else {
                    status.non_compliant_nodes += 1;
                    failing.push(node.name.clone());
                }
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
    unsupported.sort();
    exempted.sort();
    status.exempted_node_names = exempted.into_iter().take(MAX_LISTED_NODES).collect();
    status.unsupported_nodes = unsupported.len() as i32;
    status.unsupported_node_names = unsupported.into_iter().take(MAX_LISTED_NODES).collect();
    status.rules = rules.into_tallies();
    status.non_compliant_node_names = failing.iter().take(MAX_LISTED_NODES).cloned().collect();
    status.summary = format!(
        "{}/{}",
        status.compliant_nodes,
        status.targeted_nodes - status.not_applicable_nodes - status.exempted_nodes
    );
    if status.exempted_nodes > 0 {
        status
            .summary
            .push_str(&format!(" +{} exempted", status.exempted_nodes));
    }
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
    status.conditions = merge(previous_conditions, updates, generation, now);
    status.last_approval = last_approval(policy, previous);
    status
}

/// Nodes per loopback rule and verdict, over the checks of each node counted, in the catalog's
/// order (ids it does not know last): the policy status's `rules` and the report's.
pub fn tally_rules<'a>(nodes: impl IntoIterator<Item = &'a [RuleCheck]>) -> Vec<RuleTally> {
    let mut tallies = RuleTallies::default();
    for checks in nodes {
        tallies.add(checks);
    }
    tallies.into_tallies()
}

#[derive(Default)]
struct RuleTallies(BTreeMap<(usize, String), RuleTally>);

impl RuleTallies {
    fn add(&mut self, checks: &[RuleCheck]) {
        for check in checks {
            let order = RuleId::ALL
                .iter()
                .position(|r| r.cac_id() == check.id)
                .unwrap_or(RuleId::ALL.len());
            let tally = self
                .0
                .entry((order, check.id.clone()))
                .or_insert_with(|| RuleTally {
                    id: check.id.clone(),
                    ..Default::default()
                });
            match check.verdict.as_str() {
                "Pass" => tally.pass += 1,
                "Fail" => tally.fail += 1,
                "NotApplicable" => tally.not_applicable += 1,
                "Ignored" => tally.ignored += 1,
                _ => tally.unknown += 1,
            }
        }
    }

    fn into_tallies(self) -> Vec<RuleTally> {
        self.0.into_values().collect()
    }
}

/// The approval to keep in the status: the one written on the policy now, stamped with the
/// generation at which it first appeared; else the last one recorded (the annotations may go, the
/// record stays).
fn last_approval(
    policy: &LoopbackPolicy,
    previous: Option<&LoopbackPolicyStatus>,
) -> Option<Approval> {
    let recorded = previous.and_then(|p| p.last_approval.clone());
    match (Approval::written_on(policy), recorded) {
        (Some(now), Some(recorded)) if now.same(&recorded) => Some(recorded),
        (Some(now), _) => Some(now),
        (None, recorded) => recorded,
    }
}
