//! Which policy governs a node. One pure function, shared by the agent (which enforces it) and the
//! controller (which counts the node for it), so that the two never disagree.

use crate::api::{LoopbackPolicy, NodeSelector, SelectorOperator};
use kube::core::{Expression, Selector, SelectorExt};
use std::cmp::Reverse;
use std::collections::BTreeMap;

/// Whether `selector` selects a node with `labels`. Requirements are ANDed; empty selects all. The
/// matching is kube-core's `Selector` (the API server's semantics: `NotIn` matches a node without
/// the key).
pub fn selector_matches(selector: &NodeSelector, labels: &BTreeMap<String, String>) -> bool {
    to_selector(selector).matches(labels)
}

/// Our selector as kube-core's.
fn to_selector(selector: &NodeSelector) -> Selector {
    let mut out: Selector = selector
        .match_labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    out.extend(selector.match_expressions.iter().map(|req| {
        let key = req.key.clone();
        let values = || req.values.iter().cloned().collect();
        match req.operator {
            SelectorOperator::In => Expression::In(key, values()),
            SelectorOperator::NotIn => Expression::NotIn(key, values()),
            SelectorOperator::Exists => Expression::Exists(key),
            SelectorOperator::DoesNotExist => Expression::DoesNotExist(key),
        }
    }));
    out
}

/// Why no loopguard agent can run on a node with `labels`, if none can: the label that tells.
/// The chart keeps the agent off these nodes; the controller counts them `Unsupported`.
pub fn unsupported(labels: &BTreeMap<String, String>) -> Option<String> {
    let label = |key: &str| labels.get(key).map(String::as_str);
    if let Some(os) = label("kubernetes.io/os").filter(|os| *os != "linux") {
        return Some(format!("kubernetes.io/os={os}"));
    }
    if label("eks.amazonaws.com/compute-type") == Some("fargate") {
        return Some("eks.amazonaws.com/compute-type=fargate".into());
    }
    if label("type") == Some("virtual-kubelet") {
        return Some("type=virtual-kubelet".into());
    }
    None
}

/// Whether a policy is live (not being deleted) and selects the node.
pub fn selects_node(policy: &LoopbackPolicy, labels: &BTreeMap<String, String>) -> bool {
    policy.metadata.deletion_timestamp.is_none()
        && selector_matches(&policy.spec.node_selector, labels)
}

/// The policy that governs a node with `labels`: among the live policies that select it, the
/// highest `priority`, then the oldest, then the name that sorts first.
pub fn governing<'a, I>(
    labels: &BTreeMap<String, String>,
    policies: I,
) -> Option<&'a LoopbackPolicy>
where
    I: IntoIterator<Item = &'a LoopbackPolicy>,
{
    policies
        .into_iter()
        .filter(|p| selects_node(p, labels))
        .min_by_key(|p| {
            (
                Reverse(p.spec.priority),
                // A policy without a creation time (not yet stored) counts as the newest.
                p.metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| t.0)
                    .is_none(),
                p.metadata.creation_timestamp.as_ref().map(|t| t.0),
                p.metadata.name.clone(),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{LoopbackPolicySpec, NodeSelectorRequirement};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, operator: SelectorOperator, values: &[&str]) -> NodeSelectorRequirement {
        NodeSelectorRequirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    fn policy(name: &str, priority: i32, created: &str, selector: NodeSelector) -> LoopbackPolicy {
        let mut p = LoopbackPolicy::new(
            name,
            LoopbackPolicySpec {
                priority,
                node_selector: selector,
                ..Default::default()
            },
        );
        p.metadata.creation_timestamp = Some(Time(created.parse().unwrap()));
        p
    }

    #[test]
    fn selectors_follow_kubernetes_semantics() {
        let node = labels(&[("role", "worker"), ("zone", "a")]);
        assert!(
            selector_matches(&NodeSelector::default(), &node),
            "empty selects every node"
        );
        let by_label = NodeSelector {
            match_labels: labels(&[("role", "worker")]),
            ..Default::default()
        };
        assert!(selector_matches(&by_label, &node));
        assert!(!selector_matches(
            &by_label,
            &labels(&[("role", "control-plane")])
        ));
        use SelectorOperator::*;
        let expr = |r| NodeSelector {
            match_expressions: vec![r],
            ..Default::default()
        };
        assert!(selector_matches(&expr(req("zone", In, &["a", "b"])), &node));
        assert!(!selector_matches(&expr(req("zone", NotIn, &["a"])), &node));
        assert!(
            selector_matches(&expr(req("gpu", NotIn, &["yes"])), &node),
            "NotIn matches a missing label"
        );
        assert!(selector_matches(&expr(req("role", Exists, &[])), &node));
        assert!(selector_matches(
            &expr(req("gpu", DoesNotExist, &[])),
            &node
        ));
        assert!(!selector_matches(&expr(req("gpu", Exists, &[])), &node));
    }

    #[test]
    fn priority_then_age_then_name_decides() {
        let all = NodeSelector::default();
        let node = labels(&[]);
        let old_low = policy("b-old", 0, "2026-01-01T00:00:00Z", all.clone());
        let new_low = policy("a-new", 0, "2026-02-01T00:00:00Z", all.clone());
        let new_high = policy("z-high", 5, "2026-03-01T00:00:00Z", all.clone());
        let same_time = policy("a-same", 0, "2026-01-01T00:00:00Z", all.clone());
        let ps = [old_low.clone(), new_low.clone()];
        assert_eq!(
            governing(&node, &ps).unwrap().metadata.name.as_deref(),
            Some("b-old")
        );
        let ps = [old_low.clone(), new_low, new_high];
        assert_eq!(
            governing(&node, &ps).unwrap().metadata.name.as_deref(),
            Some("z-high")
        );
        let ps = [old_low, same_time];
        assert_eq!(
            governing(&node, &ps).unwrap().metadata.name.as_deref(),
            Some("a-same")
        );
    }

    #[test]
    fn deleting_and_non_selecting_policies_never_govern() {
        let workers = NodeSelector {
            match_labels: labels(&[("role", "worker")]),
            ..Default::default()
        };
        let mut deleting = policy(
            "deleting",
            9,
            "2026-01-01T00:00:00Z",
            NodeSelector::default(),
        );
        deleting.metadata.deletion_timestamp = Some(Time("2026-05-01T00:00:00Z".parse().unwrap()));
        let ps = [
            deleting,
            policy("workers", 0, "2026-01-01T00:00:00Z", workers),
        ];
        assert!(governing(&labels(&[("role", "infra")]), &ps).is_none());
        assert_eq!(
            governing(&labels(&[("role", "worker")]), &ps)
                .unwrap()
                .metadata
                .name
                .as_deref(),
            Some("workers")
        );
    }
}
