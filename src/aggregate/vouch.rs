//! Whether a live agent vouches for a node: its agent Pod is Ready and its report is recent.

use super::{AgentPod, NodeInfo, Settings};
use crate::api::LoopbackNodeStateStatus;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::time::Duration;

/// Whether a live agent vouches for a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Vouch {
    Live,
    /// The agent Pod has not been Ready (or there is none) for longer than the grace period, but
    /// its last report is recent: an agent that reports an error is not Ready, and says why.
    PodDown(String),
    /// Its last report is older than the heartbeat interval plus the grace period.
    Stale(String),
}

pub(super) fn age(now: &Time, then: &Time) -> Duration {
    now.0.duration_since(then.0).unsigned_abs()
}

/// `1h5m`, `3m20s`, `12s`.
pub(super) fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

pub(super) fn vouch(
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
