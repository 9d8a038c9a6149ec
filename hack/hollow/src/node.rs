//! The Node object and its heartbeat: the Ready condition and the `kube-node-lease` Lease.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::sync::watch;

use crate::{FIELD_MANAGER, Result};

const HEARTBEAT: Duration = Duration::from_secs(10);
const LEASE_DURATION_SECONDS: i32 = 40;
const KUBELET_VERSION: &str = "v1.37.2-hollow";

/// Creates (or takes over) the Node object and returns its uid.
pub async fn register(
    client: &Client,
    name: &str,
    labels: &BTreeMap<String, String>,
) -> Result<String> {
    let mut labels = labels.clone();
    labels.insert("kubernetes.io/hostname".into(), name.into());
    labels.insert("kubernetes.io/os".into(), "linux".into());
    labels.insert(
        "kubernetes.io/arch".into(),
        std::env::consts::ARCH.replace("x86_64", "amd64"),
    );
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(labels),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: Api<Node> = Api::all(client.clone());
    let applied = api
        .patch(name, &apply_params(), &Patch::Apply(typed(node)))
        .await?;
    Ok(applied.metadata.uid.unwrap_or_default())
}

/// Renews the lease and posts the Ready condition every ten seconds, and at once when `ready` changes.
/// Stops when the Node object is deleted: like a kubelet, it does not register the node again.
pub async fn heartbeat(
    client: Client,
    name: String,
    uid: String,
    mut ready: watch::Receiver<bool>,
) {
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    let mut last_transition = Timestamp::now();
    let mut was_ready = true;
    loop {
        let is_ready = *ready.borrow_and_update();
        if is_ready != was_ready {
            last_transition = Timestamp::now();
            was_ready = is_ready;
        }
        match post_status(&nodes, &name, is_ready, last_transition).await {
            Err(crate::Error::Kube(kube::Error::Api(s))) if s.code == 404 => {
                tracing::info!(node = %name, "Node deleted; heartbeat stops");
                return;
            }
            Err(e) => tracing::warn!(node = %name, "posting node status: {e}"),
            Ok(()) => {
                if let Err(e) = renew_lease(&leases, &name, &uid).await {
                    tracing::warn!(node = %name, "renewing lease: {e}");
                }
            }
        }
        let _ = tokio::time::timeout(HEARTBEAT, ready.changed()).await;
    }
}

async fn post_status(api: &Api<Node>, name: &str, ready: bool, since: Timestamp) -> Result<()> {
    let now = Time(Timestamp::now());
    let since = Time(since);
    let condition = |type_: &str, status: bool, reason: &str, message: &str| NodeCondition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(since.clone()),
    };
    let quantity = |q: &str| Quantity(q.into());
    let capacity = BTreeMap::from([
        ("cpu".to_owned(), quantity("4")),
        ("memory".to_owned(), quantity("8Gi")),
        ("pods".to_owned(), quantity("110")),
        ("ephemeral-storage".to_owned(), quantity("20Gi")),
    ]);
    let (reason, message) = if ready {
        ("KubeletReady", "hollow node is posting ready status")
    } else {
        ("KubeletNotReady", "hollow node was told to report NotReady")
    };
    let status = NodeStatus {
        conditions: Some(vec![
            condition("Ready", ready, reason, message),
            condition(
                "MemoryPressure",
                false,
                "KubeletHasSufficientMemory",
                "hollow",
            ),
            condition("DiskPressure", false, "KubeletHasNoDiskPressure", "hollow"),
            condition("PIDPressure", false, "KubeletHasSufficientPID", "hollow"),
        ]),
        // The node namespace has only `lo`: 127.0.0.1 is the one address reachable there.
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: "127.0.0.1".into(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: name.into(),
            },
        ]),
        allocatable: Some(capacity.clone()),
        capacity: Some(capacity),
        node_info: Some(NodeSystemInfo {
            architecture: std::env::consts::ARCH.replace("x86_64", "amd64"),
            boot_id: String::new(),
            container_runtime_version: "hollow://0".into(),
            kernel_version: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            kube_proxy_version: String::new(),
            kubelet_version: KUBELET_VERSION.into(),
            machine_id: String::new(),
            operating_system: "linux".into(),
            os_image: "loopguard hollow node".into(),
            system_uuid: String::new(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let patch = json!({ "apiVersion": "v1", "kind": "Node", "status": status });
    api.patch_status(name, &apply_params(), &Patch::Apply(patch))
        .await?;
    Ok(())
}

async fn renew_lease(api: &Api<Lease>, node: &str, node_uid: &str) -> Result<()> {
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(node.into()),
            // Like the kubelet's, the lease goes away with its Node.
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: node.into(),
                uid: node_uid.into(),
                ..Default::default()
            }]),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(node.into()),
            lease_duration_seconds: Some(LEASE_DURATION_SECONDS),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..Default::default()
        }),
    };
    api.patch(node, &apply_params(), &Patch::Apply(typed(lease)))
        .await?;
    Ok(())
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// An object as a server-side apply body: with its apiVersion and kind.
fn typed<K: k8s_openapi::Resource + serde::Serialize>(object: K) -> serde_json::Value {
    let mut value = serde_json::to_value(object).expect("Kubernetes objects serialize");
    value["apiVersion"] = K::API_VERSION.into();
    value["kind"] = K::KIND.into();
    value
}
