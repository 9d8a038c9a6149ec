//! When a deleted policy may let go: the nodes it still waits for.

use super::{NodeInfo, Settings};
use crate::api::{Compliance, LoopbackNodeStateStatus, LoopbackPolicy};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::collections::BTreeMap;

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
