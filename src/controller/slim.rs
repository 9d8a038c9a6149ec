//! What the controller keeps of Nodes and agent Pods: only the fields it reads. They are read
//! straight into these small types (everything else in the JSON is skipped while parsing), so a
//! cache of 5,000 Nodes and 5,000 Pods holds a few hundred bytes per object instead of the
//! k8s-openapi structs (1.5 KB per Node and 2.5 KB per Pod before any of their strings).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::Deserialize;
use std::borrow::Cow;

/// A condition as the controller reads it (`Ready` of a Node or a Pod).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub last_transition_time: Option<Time>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Status {
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

impl Status {
    /// The `Ready` condition, if there is one.
    pub fn ready(&self) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == "Ready")
    }
}

/// A Node: its metadata (name, labels, creation time) and its Ready condition.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Node {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub status: Status,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    pub node_name: Option<String>,
}

/// An agent Pod: its node, whether it is Ready and since when, and whether it is going away.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Pod {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: Status,
}

macro_rules! core_v1 {
    ($type:ty, $kind:literal, $plural:literal, $scope:ty) => {
        impl kube::Resource for $type {
            type DynamicType = ();
            type Scope = $scope;

            fn kind(_: &()) -> Cow<'_, str> {
                $kind.into()
            }
            fn group(_: &()) -> Cow<'_, str> {
                "".into()
            }
            fn version(_: &()) -> Cow<'_, str> {
                "v1".into()
            }
            fn plural(_: &()) -> Cow<'_, str> {
                $plural.into()
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

core_v1!(Node, "Node", "nodes", k8s_openapi::ClusterResourceScope);
core_v1!(Pod, "Pod", "pods", k8s_openapi::NamespaceResourceScope);

/// Drops what the controller never reads and the parse had to keep (metadata it does not use,
/// conditions other than Ready).
pub fn trim_meta(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
}

pub fn trim_node(node: &mut Node) {
    trim_meta(&mut node.metadata);
    node.status.conditions.retain(|c| c.type_ == "Ready");
    node.status.conditions.shrink_to_fit();
}

pub fn trim_pod(pod: &mut Pod) {
    trim_meta(&mut pod.metadata);
    pod.metadata.labels = None;
    pod.status.conditions.retain(|c| c.type_ == "Ready");
    pod.status.conditions.shrink_to_fit();
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_node_and_a_pod_parse_into_what_the_controller_reads() {
        let mut node: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n1", "labels": {"a": "b"}, "annotations": {"x": "y"},
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"podCIDR": "10.0.0.0/24"},
            "status": {"conditions": [
                {"type": "MemoryPressure", "status": "False"},
                {"type": "Ready", "status": "False", "lastTransitionTime": "2026-01-02T00:00:00Z"}],
                "images": [{"names": ["x"], "sizeBytes": 1}]},
        }))
        .unwrap();
        trim_node(&mut node);
        assert_eq!(node.metadata.name.as_deref(), Some("n1"));
        assert_eq!(node.metadata.annotations, None);
        assert_eq!(node.status.conditions.len(), 1);
        assert_eq!(node.status.ready().unwrap().status, "False");

        let mut pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "agent-1", "namespace": "ns", "labels": {"a": "b"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "agent", "image": "i"}]},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .unwrap();
        trim_pod(&mut pod);
        assert_eq!(pod.spec.node_name.as_deref(), Some("n1"));
        assert_eq!(pod.status.ready().unwrap().status, "True");
        assert_eq!(pod.metadata.labels, None);
        // A Pod that has no status yet (just created) parses too.
        let fresh: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {}}))
        .unwrap();
        assert!(fresh.status.ready().is_none());
    }
}
