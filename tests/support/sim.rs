//! A simulated cluster for the controller: Nodes, agent Pods and `LoopbackNodeState` reports written
//! as the kubelet and the agents would, and the real `loopguard controller` binary rolling them up.
//! Used by `tests/controller.rs` and the cluster bench.

#![allow(dead_code)]

use super::cluster::{Cluster, eventually, unique_name};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use loopguard::api::{Compliance, LoopbackNodeState, LoopbackPolicy, LoopbackPolicyStatus};
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_loopguard");

/// A running `loopguard controller`, killed on drop.
pub struct Controller {
    pub child: Child,
    pub port: u16,
}

impl Controller {
    pub fn start(
        cluster: &Cluster,
        lease_namespace: &str,
        identity: &str,
        extra: &[&str],
    ) -> Controller {
        let port = super::free_port();
        let mut cmd = Command::new(BIN);
        cmd.args([
            "controller",
            "--namespace",
            lease_namespace,
            "--identity",
            identity,
        ])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")]);
        if !extra.contains(&"--coalesce-ms") {
            cmd.args(["--coalesce-ms", "200"]);
        }
        let child = cmd
            .args(extra)
            .env("KUBECONFIG", cluster.kubeconfig())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .spawn()
            .expect("start loopguard controller");
        Controller { child, port }
    }

    /// One metric from /metrics (0 when absent or not reachable yet).
    pub fn metric(&self, name: &str) -> f64 {
        let out = Command::new("curl")
            .args(["-sf", &format!("http://127.0.0.1:{}/metrics", self.port)])
            .output();
        let Ok(out) = out else { return 0.0 };
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .map(str::to_string)
            })
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    pub fn writes(&self) -> f64 {
        self.metric("loopguard_controller_status_writes_total")
    }

    pub fn stop(&mut self, signal: i32) {
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let _ = self.child.wait();
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One test's world: a client, a label that marks its nodes, and a Lease namespace.
pub struct World<'a> {
    pub cluster: &'a Cluster,
    pub client: Client,
    pub label: String,
    pub lease_ns: String,
}

impl<'a> World<'a> {
    /// On the shared control plane (None when there is none and none is required).
    pub async fn new(tag: &str) -> Option<World<'static>> {
        Some(World::on(super::cluster::shared()?, tag).await)
    }

    /// On `cluster`.
    pub async fn on(cluster: &'a Cluster, tag: &str) -> World<'a> {
        cluster.install_crds();
        let client = cluster.client().await;
        let lease_ns = cluster.namespace(&client, tag).await;
        World {
            cluster,
            client,
            label: unique_name(tag),
            lease_ns,
        }
    }

    pub fn node_name(&self, n: usize) -> String {
        format!("{}-n{n}", self.label)
    }

    /// A Node carrying this test's label (plus `extra`), Ready unless `not_ready_since` is given.
    pub async fn node(
        &self,
        n: usize,
        extra: &[(&str, &str)],
        not_ready_since: Option<&str>,
    ) -> String {
        let name = self.node_name(n);
        let mut labels = serde_json::Map::new();
        labels.insert("loopguard.dev/test".into(), json!(self.label));
        for (k, v) in extra {
            labels.insert(k.to_string(), json!(v));
        }
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels},
        }))
        .unwrap();
        let api: Api<Node> = Api::all(self.client.clone());
        api.create(&PostParams::default(), &node)
            .await
            .expect("create node");
        let (status, since) = match not_ready_since {
            Some(since) => ("False", since.to_string()),
            None => ("True", jiff::Timestamp::now().to_string()),
        };
        let now = jiff::Timestamp::now().to_string();
        let patch = json!({"status": {"conditions": [{
            "type": "Ready", "status": status, "reason": "Test", "message": "set by the test",
            "lastHeartbeatTime": now, "lastTransitionTime": since,
        }]}});
        api.patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
            .expect("node status");
        self.agent_pod(&name, true).await;
        name
    }

    /// The node's agent Pod (in the controller's namespace, with the chart's labels), Ready or
    /// not, as the kubelet would report it. No kubelet runs it: only its status matters here.
    pub async fn agent_pod(&self, node: &str, ready: bool) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.lease_ns);
        let name = format!("agent-{node}");
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {
                "app.kubernetes.io/name": "loopguard", "app.kubernetes.io/component": "agent"}},
            "spec": {"nodeName": node, "automountServiceAccountToken": false,
                     "containers": [{"name": "agent", "image": "loopguard:test"}]},
        }))
        .unwrap();
        // The namespace's default ServiceAccount may take a moment to appear.
        eventually("agent pod created", Duration::from_secs(30), || async {
            match pods.create(&PostParams::default(), &pod).await {
                Ok(_) => Some(()),
                Err(kube::Error::Api(e)) if e.code == 409 => Some(()),
                Err(_) => None,
            }
        })
        .await;
        self.set_agent_ready(node, ready).await;
    }

    pub async fn set_agent_ready(&self, node: &str, ready: bool) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.lease_ns);
        let status = if ready { "True" } else { "False" };
        let now = jiff::Timestamp::now().to_string();
        let patch = json!({"status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": status, "lastTransitionTime": now}]}});
        pods.patch_status(
            &format!("agent-{node}"),
            &PatchParams::default(),
            &Patch::Strategic(&patch),
        )
        .await
        .expect("agent pod status");
    }

    /// Writes the node's LoopbackNodeState as its agent would, verified now.
    pub async fn report(
        &self,
        node: &str,
        policy: &str,
        generation: i64,
        compliance: Compliance,
        repairs: i64,
    ) {
        let compliance = serde_json::to_value(compliance).unwrap();
        let now = jiff::Timestamp::now();
        self.report_raw(node, policy, generation, compliance, repairs, now)
            .await
    }

    /// Writes a LoopbackNodeState with any compliance value and verification time.
    pub async fn report_raw(
        &self,
        node: &str,
        policy: &str,
        generation: i64,
        compliance: Value,
        repairs: i64,
        verified: jiff::Timestamp,
    ) {
        // Untyped: the status may hold a value this version's types do not know.
        let resource = kube::discovery::ApiResource::erase::<LoopbackNodeState>(&());
        let api: Api<kube::api::DynamicObject> = Api::all_with(self.client.clone(), &resource);
        let object = json!({
            "apiVersion": "loopguard.dev/v1alpha1", "kind": "LoopbackNodeState",
            "metadata": {"name": node}, "spec": {"nodeName": node},
        });
        let pp = PatchParams::apply("test-agent").force();
        api.patch(node, &pp, &Patch::Apply(&object))
            .await
            .expect("node state");
        let status = json!({
            "apiVersion": "loopguard.dev/v1alpha1", "kind": "LoopbackNodeState",
            "status": {"policyName": policy, "policyGeneration": generation, "compliance": compliance,
                       "reason": "Test", "message": "written by the test", "repairs": repairs,
                       "lastVerifiedTime": verified.to_string()},
        });
        api.patch_status(node, &pp, &Patch::Apply(&status))
            .await
            .expect("node state status");
    }

    /// Rewrites only the status of a node's existing LoopbackNodeState (verified now): what an
    /// agent sends when the policy's generation moves on.
    pub async fn report_status(
        &self,
        node: &str,
        policy: &str,
        generation: i64,
        compliance: Compliance,
    ) {
        let api: Api<LoopbackNodeState> = Api::all(self.client.clone());
        let status = json!({
            "apiVersion": "loopguard.dev/v1alpha1", "kind": "LoopbackNodeState",
            "status": {"policyName": policy, "policyGeneration": generation,
                       "compliance": serde_json::to_value(compliance).unwrap(),
                       "reason": "Test", "message": "written by the test", "repairs": 0,
                       "lastVerifiedTime": jiff::Timestamp::now().to_string()},
        });
        api.patch_status(
            node,
            &PatchParams::apply("test-agent").force(),
            &Patch::Apply(&status),
        )
        .await
        .expect("node state status");
    }

    pub async fn policy(&self, name: &str, spec: Value) -> LoopbackPolicy {
        let mut spec = spec;
        if spec.get("nodeSelector").is_none() {
            spec["nodeSelector"] = json!({"matchLabels": {"loopguard.dev/test": self.label}});
        }
        let object: LoopbackPolicy = serde_json::from_value(json!({
            "apiVersion": "loopguard.dev/v1alpha1", "kind": "LoopbackPolicy",
            "metadata": {"name": name}, "spec": spec,
        }))
        .unwrap();
        self.policies()
            .create(&PostParams::default(), &object)
            .await
            .expect("create policy")
    }

    pub fn policies(&self) -> Api<LoopbackPolicy> {
        Api::all(self.client.clone())
    }

    pub async fn wait_status(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&LoopbackPolicyStatus) -> bool,
    ) -> LoopbackPolicyStatus {
        eventually(
            &format!("{name}: {what}"),
            Duration::from_secs(30),
            || async {
                let p = self.policies().get_opt(name).await.ok()??;
                p.status.filter(|s| check(s))
            },
        )
        .await
    }

    pub async fn gone(&self, name: &str, within: Duration) {
        eventually(&format!("{name} deleted"), within, || async {
            self.policies()
                .get_opt(name)
                .await
                .ok()?
                .is_none()
                .then_some(())
        })
        .await
    }

    pub async fn events_for(&self, policy: &str) -> Vec<(String, String, String)> {
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), "default");
        api.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(policy))
            .map(|e| {
                (
                    e.type_.unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.note.unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Removes the test's objects (finalizers included, in case no controller runs any more).
    pub async fn clean(&self, policies: &[&str]) {
        for name in policies {
            let _ = self
                .policies()
                .patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({"metadata": {"finalizers": null}})),
                )
                .await;
            let _ = self.policies().delete(name, &DeleteParams::default()).await;
        }
        let nodes: Api<Node> = Api::all(self.client.clone());
        let states: Api<LoopbackNodeState> = Api::all(self.client.clone());
        let selector = ListParams::default().labels(&format!("loopguard.dev/test={}", self.label));
        for node in nodes.list(&selector).await.unwrap().items {
            let _ = states
                .delete(&node.name_any(), &DeleteParams::default())
                .await;
            let _ = nodes
                .delete(&node.name_any(), &DeleteParams::default())
                .await;
        }
        super::cluster::delete_namespace(&self.client, &self.lease_ns).await;
    }
}
