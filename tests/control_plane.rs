//! The test control plane itself (issue 3): a real kube-apiserver with etcd, controller manager and
//! scheduler, and hollow nodes that run Pods as processes. Needs root and the control-plane binaries
//! (`hack/cluster.sh up` builds them); skips with a message when they are absent, unless
//! `LOOPGUARD_REQUIRE_CLUSTER` is set.

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams,
};
use kube::runtime::watcher::{self, Event};
use loopguard_hollow::ImageMapping;
use serde_json::{Value, json};
use support::cluster::{self, delete_namespace, eventually, unique_name};
use support::{deploy, run};

const TIMEOUT: Duration = Duration::from_secs(60);
/// The test image every hollow node maps to /bin/sh; pods give it a script with `command: [sh, -c, ...]`.
const SHELL_IMAGE: &str = "loopguard.test/shell";

fn object<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("valid object")
}

fn shell_mapping() -> ImageMapping {
    format!("{SHELL_IMAGE}=/bin/sh").parse().expect("mapping")
}

#[tokio::test]
async fn server_reports_the_pinned_version() {
    let Some(cluster) = cluster::shared() else {
        return;
    };
    let version = cluster
        .client()
        .await
        .apiserver_version()
        .await
        .expect("version");
    assert_eq!(version.git_version, "v1.37.2");
}

#[tokio::test]
async fn crd_becomes_established_and_an_object_round_trips() {
    let Some(cluster) = cluster::shared() else {
        return;
    };
    let client = cluster.client().await;
    let namespace = cluster.namespace(&client, "crd").await;
    let group = format!("{}.loopguard.test", unique_name("crd"));
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = object(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": { "name": format!("widgets.{group}") },
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": { "kind": "Widget", "plural": "widgets", "singular": "widget", "listKind": "WidgetList" },
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": { "openAPIV3Schema": {
                    "type": "object",
                    "properties": { "spec": {
                        "type": "object",
                        "required": ["size"],
                        "properties": { "size": { "type": "integer", "minimum": 1 } },
                    }},
                }},
            }],
        },
    }));
    crds.create(&PostParams::default(), &crd)
        .await
        .expect("create CRD");
    let name = format!("widgets.{group}");
    eventually("the CRD to become Established", TIMEOUT, || async {
        let crd = crds.get(&name).await.ok()?;
        let conditions = crd.status?.conditions?;
        conditions
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
            .then_some(())
    })
    .await;

    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(&group, "v1", "Widget"),
        "widgets",
    );
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), &namespace, &resource);
    let widget = |name: &str, size: i64| -> DynamicObject {
        object(json!({
            "apiVersion": format!("{group}/v1"), "kind": "Widget",
            "metadata": { "name": name }, "spec": { "size": size },
        }))
    };
    eventually("the Widget API to accept objects", TIMEOUT, || async {
        widgets
            .create(&PostParams::default(), &widget("big", 7))
            .await
            .ok()
    })
    .await;
    let read = widgets.get("big").await.expect("get widget");
    assert_eq!(read.data["spec"], json!({ "size": 7 }));
    let invalid = widgets
        .create(&PostParams::default(), &widget("small", 0))
        .await;
    assert!(
        matches!(&invalid, Err(kube::Error::Api(s)) if s.code == 422),
        "the schema must reject size 0: {invalid:?}"
    );

    crds.delete(&name, &DeleteParams::default())
        .await
        .expect("delete CRD");
    delete_namespace(&client, &namespace).await;
}

#[tokio::test]
async fn a_watch_delivers_an_event() {
    let Some(cluster) = cluster::shared() else {
        return;
    };
    let client = cluster.client().await;
    let namespace = cluster.namespace(&client, "watch").await;
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let mut events = watcher::watcher(configmaps.clone(), watcher::Config::default()).boxed();
    let mut next = async |pred: fn(&Event<ConfigMap>) -> bool| {
        loop {
            let event = events
                .try_next()
                .await
                .expect("watch")
                .expect("watch ended");
            if pred(&event) {
                return;
            }
        }
    };
    tokio::time::timeout(TIMEOUT, next(|e| matches!(e, Event::InitDone)))
        .await
        .expect("initial list");
    let configmap = object(json!({ "metadata": { "name": "watched" }, "data": { "k": "v" } }));
    configmaps
        .create(&PostParams::default(), &configmap)
        .await
        .expect("create");
    let applied = |e: &Event<ConfigMap>| matches!(e, Event::Apply(cm) if cm.metadata.name.as_deref() == Some("watched"));
    tokio::time::timeout(TIMEOUT, next(applied))
        .await
        .expect("the watch delivers the new ConfigMap");
    delete_namespace(&client, &namespace).await;
}

#[tokio::test]
async fn kubectl_auth_can_i_answers_for_a_service_account() {
    let Some(cluster) = cluster::shared() else {
        return;
    };
    let client = cluster.client().await;
    let namespace = cluster.namespace(&client, "rbac").await;
    let apply = |manifest: Value| {
        let mut kubectl = cluster.kubectl();
        kubectl.args(["apply", "-n", &namespace, "-f", "-"]);
        run(kubectl, Some(&manifest.to_string()))
    };
    apply(
        json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": { "name": "reader" } }),
    );
    apply(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": { "name": "reader" },
        "rules": [{ "apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"] }],
    }));
    apply(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": { "name": "reader" },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader" },
        "subjects": [{ "kind": "ServiceAccount", "name": "reader", "namespace": namespace }],
    }));

    let can_i = |kubectl: std::process::Command, verb: &str| {
        let mut kubectl = kubectl;
        kubectl.args(["auth", "can-i", verb, "configmaps", "-n", &namespace]);
        String::from_utf8_lossy(&kubectl.output().expect("kubectl").stdout)
            .trim()
            .to_owned()
    };
    let as_reader = || {
        let mut kubectl = cluster.kubectl();
        kubectl.arg(format!("--as=system:serviceaccount:{namespace}:reader"));
        kubectl
    };
    eventually("RBAC to allow the reader", TIMEOUT, || async {
        (can_i(as_reader(), "get") == "yes").then_some(())
    })
    .await;
    assert_eq!(can_i(as_reader(), "delete"), "no");

    let mut create_token = cluster.kubectl();
    create_token.args(["create", "token", "reader", "-n", &namespace]);
    let token = run(create_token, None);
    assert_eq!(
        token.trim().split('.').count(),
        3,
        "kubectl create token prints a JWT: {token}"
    );

    // The same answers with the service account's own token.
    let kubeconfig = cluster
        .service_account_kubeconfig(&client, &namespace, "reader", None)
        .await;
    let as_itself = || {
        let mut kubectl = std::process::Command::new(cluster.dir.join("bin/kubectl"));
        kubectl.arg(format!("--kubeconfig={}", kubeconfig.display()));
        kubectl
    };
    assert_eq!(can_i(as_itself(), "get"), "yes");
    assert_eq!(can_i(as_itself(), "delete"), "no");
    delete_namespace(&client, &namespace).await;
}

#[tokio::test]
async fn validating_admission_policy_denies() {
    let Some(cluster) = cluster::shared() else {
        return;
    };
    let client = cluster.client().await;
    let namespace = cluster.namespace(&client, "vap").await;
    let name = unique_name("vap");
    let policies: Api<ValidatingAdmissionPolicy> = Api::all(client.clone());
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(client.clone());
    let policy = object(json!({
        "metadata": { "name": name },
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": { "resourceRules": [{
                "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["configmaps"],
            }]},
            "validations": [{
                "expression": "!has(object.metadata.labels) || !('forbidden' in object.metadata.labels)",
                "message": "the forbidden label is forbidden",
            }],
        },
    }));
    let binding = object(json!({
        "metadata": { "name": name },
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": { "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": namespace } } },
        },
    }));
    policies
        .create(&PostParams::default(), &policy)
        .await
        .expect("policy");
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .expect("binding");

    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let labelled = |name: &str| -> ConfigMap {
        object(json!({ "metadata": { "name": name, "labels": { "forbidden": "yes" } } }))
    };
    let mut attempt = 0;
    let denial = eventually("the policy to deny", TIMEOUT, || {
        attempt += 1;
        let configmap = labelled(&format!("attempt-{attempt}"));
        let configmaps = configmaps.clone();
        async move {
            configmaps
                .create(&PostParams::default(), &configmap)
                .await
                .err()
        }
    })
    .await;
    assert!(
        denial
            .to_string()
            .contains("the forbidden label is forbidden"),
        "{denial}"
    );
    let allowed: ConfigMap = object(json!({ "metadata": { "name": "allowed" } }));
    configmaps
        .create(&PostParams::default(), &allowed)
        .await
        .expect("an unlabelled ConfigMap is allowed");

    bindings
        .delete(&name, &DeleteParams::default())
        .await
        .expect("delete binding");
    policies
        .delete(&name, &DeleteParams::default())
        .await
        .expect("delete policy");
    delete_namespace(&client, &namespace).await;
}

/// The DaemonSet's script proves what its process got: the API server through the node namespace's proxy,
/// a token bound to its Pod (the SelfSubjectReview shows the node-name claim), the node's namespace, the
/// downward API and `$(VAR)` expansion, and its hostPath volume.
const DAEMON_SCRIPT: &str = r#"
sa=/var/run/secrets/kubernetes.io/serviceaccount
mkdir -p "$OUT"
curl -sS --fail --cacert $sa/ca.crt -H "Authorization: Bearer $(cat $sa/token)" \
  -H 'Content-Type: application/json' -X POST \
  -d '{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}' \
  "https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/apis/authentication.k8s.io/v1/selfsubjectreviews" \
  > "$OUT/review.tmp" && mv "$OUT/review.tmp" "$OUT/review.json"
readlink /proc/self/ns/net > "$OUT/netns"
exec sleep infinity
"#;

#[tokio::test]
async fn a_daemonset_runs_on_three_hollow_nodes() {
    let Some(cluster) = cluster::shared() else {
        return;
    };
    let client = cluster.client().await;
    let namespace = cluster.namespace(&client, "ds").await;
    let run = unique_name("run");
    let mut options = cluster.hollow_options("ds", 3);
    options.images.push(shell_mapping());
    options
        .node_labels
        .insert("loopguard.test/run".into(), run.clone());
    let hollow = cluster.start_nodes(options.clone()).await;
    let nodes: Vec<String> = hollow.node_names().map(str::to_owned).collect();

    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), &namespace);
    let daemonset = object(json!({
        "metadata": { "name": "probe" },
        "spec": {
            "selector": { "matchLabels": { "app": "probe" } },
            "template": {
                "metadata": { "labels": { "app": "probe" } },
                "spec": {
                    "nodeSelector": { "loopguard.test/run": run },
                    // The node's own network, as loopguard's agent has it (other pods get one of
                    // their own).
                    "hostNetwork": true,
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "probe",
                        "image": format!("{SHELL_IMAGE}:v1"),
                        "command": ["sh", "-c", DAEMON_SCRIPT],
                        "env": [
                            { "name": "NODE_NAME", "valueFrom": { "fieldRef": { "fieldPath": "spec.nodeName" } } },
                            { "name": "OUT", "value": "/tmp/loopguard-hollow-test/$(NODE_NAME)" },
                        ],
                        "volumeMounts": [{ "name": "data", "mountPath": "/tmp/loopguard-hollow-test" }],
                    }],
                    "volumes": [{ "name": "data", "hostPath": { "path": "/var/lib/probe", "type": "DirectoryOrCreate" } }],
                },
            },
        },
    }));
    daemonsets
        .create(&PostParams::default(), &daemonset)
        .await
        .expect("create DaemonSet");

    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let running = eventually(
        "three Running and Ready pods, one per node",
        TIMEOUT,
        || async {
            let list = pods
                .list(&ListParams::default().labels("app=probe"))
                .await
                .ok()?;
            let mut bound: Vec<String> = list
                .items
                .iter()
                .filter(|pod| pod_is_running_and_ready(pod))
                .filter_map(|pod| pod.spec.as_ref()?.node_name.clone())
                .collect();
            bound.sort();
            (bound == sorted(&nodes)).then_some(list.items)
        },
    )
    .await;
    assert_eq!(running.len(), 3);

    for node in &nodes {
        let out = options.node_root(node).join("var/lib/probe").join(node);
        let review: Value = eventually("the pod's SelfSubjectReview", TIMEOUT, || async {
            serde_json::from_slice(&std::fs::read(out.join("review.json")).ok()?).ok()
        })
        .await;
        let user = &review["status"]["userInfo"];
        assert_eq!(
            user["username"],
            format!("system:serviceaccount:{namespace}:default")
        );
        assert_eq!(
            user["extra"]["authentication.kubernetes.io/node-name"],
            json!([node]),
            "{review}"
        );
        let netns = std::fs::read_to_string(out.join("netns")).expect("netns file");
        let inode = std::fs::metadata(format!("/run/netns/{node}"))
            .expect("node netns")
            .ino();
        assert_eq!(
            netns.trim(),
            format!("net:[{inode}]"),
            "the process runs in the node's namespace"
        );
    }

    daemonsets
        .delete("probe", &DeleteParams::default())
        .await
        .expect("delete DaemonSet");
    eventually("the pods to be stopped and deleted", TIMEOUT, || async {
        pods.list(&ListParams::default().labels("app=probe"))
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    hollow
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
    for node in &nodes {
        assert!(
            !PathBuf::from("/run/netns").join(node).exists(),
            "netns {node} deleted"
        );
    }
    delete_namespace(&client, &namespace).await;
}

#[tokio::test]
async fn pod_exits_are_reported_and_restarted_per_policy() {
    let Some(cluster) = cluster::shared() else {
        return;
    };
    let client = cluster.client().await;
    let namespace = cluster.namespace(&client, "exit").await;
    let mut options = cluster.hollow_options("exit", 1);
    options.images.push(shell_mapping());
    let hollow = cluster.start_nodes(options).await;
    let node = hollow.node_names().next().expect("node").to_owned();

    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let pod = |name: &str, image: &str, restart: &str, script: &str| -> Pod {
        object(json!({
            "metadata": { "name": name },
            "spec": {
                "nodeName": node,
                "restartPolicy": restart,
                "terminationGracePeriodSeconds": 1,
                "containers": [{
                    "name": "main", "image": image, "command": ["sh", "-c", script],
                    "env": [{ "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } }],
                }],
            },
        }))
    };
    let create = |pod: Pod| {
        let pods = pods.clone();
        async move {
            pods.create(&PostParams::default(), &pod)
                .await
                .expect("create pod")
        }
    };
    create(pod(
        "once",
        SHELL_IMAGE,
        "Never",
        "echo bye from $(POD_NAME) > /dev/termination-log; exit 3",
    ))
    .await;
    create(pod("again", SHELL_IMAGE, "Always", "exit 1")).await;
    create(pod(
        "unmapped",
        "example.invalid/unmapped:1",
        "Always",
        "true",
    ))
    .await;

    let status = |name: &'static str| {
        let pods = pods.clone();
        async move { pods.get(name).await.ok()?.status }
    };
    let once = eventually("pod once to fail", TIMEOUT, || async {
        status("once")
            .await
            .filter(|s| s.phase.as_deref() == Some("Failed"))
    })
    .await;
    let terminated = once.container_statuses.expect("statuses")[0]
        .state
        .clone()
        .expect("state")
        .terminated
        .expect("terminated");
    assert_eq!(terminated.exit_code, 3);
    assert_eq!(terminated.message.as_deref(), Some("bye from once\n"));

    let again = eventually("pod again to be restarted twice", TIMEOUT, || async {
        let statuses = status("again").await?.container_statuses?;
        (statuses[0].restart_count >= 2).then(|| statuses[0].clone())
    })
    .await;
    let last = again
        .last_state
        .expect("last state")
        .terminated
        .expect("terminated");
    assert_eq!(last.exit_code, 1);

    let unmapped = eventually("pod unmapped to wait with a reason", TIMEOUT, || async {
        let statuses = status("unmapped").await?.container_statuses?;
        statuses[0].state.clone()?.waiting
    })
    .await;
    assert_eq!(unmapped.reason.as_deref(), Some("ImageNotMapped"));
    assert_eq!(
        status("unmapped").await.and_then(|s| s.phase).as_deref(),
        Some("Pending")
    );

    hollow
        .shutdown(Duration::from_secs(1))
        .await
        .expect("shutdown");
    delete_namespace(&client, &namespace).await;
}

#[tokio::test]
async fn a_hollow_node_goes_not_ready_on_request() {
    let Some(cluster) = cluster::shared() else {
        return;
    };
    let client = cluster.client().await;
    let hollow = cluster
        .start_nodes(cluster.hollow_options("ready", 1))
        .await;
    let node = hollow.node_names().next().expect("node").to_owned();
    let nodes: Api<Node> = Api::all(client.clone());
    let ready = |want: &'static str| {
        let (nodes, node) = (nodes.clone(), node.clone());
        async move {
            let conditions = nodes.get(&node).await.ok()?.status?.conditions?;
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == want)
                .then_some(())
        }
    };
    eventually("the node to be Ready", TIMEOUT, || ready("True")).await;
    hollow.set_node_ready(&node, false).expect("set not ready");
    eventually("the node to be NotReady", TIMEOUT, || ready("False")).await;
    hollow.set_node_ready(&node, true).expect("set ready");
    eventually("the node to be Ready again", TIMEOUT, || ready("True")).await;
    hollow
        .shutdown(Duration::from_secs(1))
        .await
        .expect("shutdown");
}

#[tokio::test]
async fn deleting_a_node_garbage_collects_what_it_owns() {
    let Some(cluster) = cluster::shared() else {
        return;
    };
    let client = cluster.client().await;
    let namespace = cluster.namespace(&client, "gc").await;
    let nodes: Api<Node> = Api::all(client.clone());
    let name = unique_name("gc-node");
    let node = nodes
        .create(
            &PostParams::default(),
            &object(json!({ "metadata": { "name": name } })),
        )
        .await
        .expect("create node");
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let owned: ConfigMap = object(json!({
        "metadata": {
            "name": "owned-by-node",
            "ownerReferences": [{ "apiVersion": "v1", "kind": "Node", "name": name, "uid": node.metadata.uid }],
        },
    }));
    configmaps
        .create(&PostParams::default(), &owned)
        .await
        .expect("create owned ConfigMap");
    nodes
        .delete(&name, &DeleteParams::default())
        .await
        .expect("delete node");
    eventually(
        "the garbage collector to delete the ConfigMap",
        TIMEOUT,
        || async {
            configmaps
                .get_opt("owned-by-node")
                .await
                .ok()?
                .is_none()
                .then_some(())
        },
    )
    .await;
    delete_namespace(&client, &namespace).await;
}

#[tokio::test]
async fn the_control_plane_survives_an_apiserver_restart() {
    let Some(cluster) = cluster::private("restart") else {
        return;
    };
    let client = cluster.client().await;
    let namespace = cluster.namespace(&client, "restart").await;
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let before: ConfigMap =
        object(json!({ "metadata": { "name": "before" }, "data": { "kept": "yes" } }));
    configmaps
        .create(&PostParams::default(), &before)
        .await
        .expect("create");

    cluster.restart_apiserver();

    let client = cluster.client().await;
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let kept = configmaps
        .get("before")
        .await
        .expect("the ConfigMap survives the restart");
    assert_eq!(
        kept.data,
        Some(BTreeMap::from([("kept".to_owned(), "yes".to_owned())]))
    );
    let after: ConfigMap = object(json!({ "metadata": { "name": "after" } }));
    configmaps
        .create(&PostParams::default(), &after)
        .await
        .expect("writes work after the restart");
    assert_eq!(
        configmaps
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        3
    ); // + kube-root-ca.crt
    drop(cluster);
}

/// A port taken by another process between `up` choosing it and a component binding it (an outgoing
/// connection, another cluster starting) makes `up` start again on other free ports, not fail.
#[tokio::test]
async fn up_starts_again_when_a_port_is_taken_while_it_starts() {
    // Six ports of its own (outside the kernel's ephemeral range), so the second start has exactly
    // the five that the taken one leaves.
    let first = 24000 + (std::process::id() % 1000) * 6;
    let range = format!("{first}-{}", first + 5);
    let dir = std::env::temp_dir().join(format!("loopguard-{}", unique_name("port-race")));
    let env_file = dir.join("cluster.env");
    // Takes the controller manager's port as soon as `up` has written it down, before it starts.
    let taker = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        while std::time::Instant::now() < deadline {
            let port = std::fs::read_to_string(&env_file).ok().and_then(|env| {
                env.lines()
                    .find_map(|l| l.strip_prefix("CONTROLLER_MANAGER_PORT="))
                    .and_then(|p| p.trim_matches('"').parse::<u16>().ok())
            });
            if let Some(port) = port {
                let held = std::net::TcpListener::bind(("127.0.0.1", port))
                    .unwrap_or_else(|e| panic!("taking port {port}: {e}"));
                return (port, held);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("up never wrote {}", env_file.display());
    });
    let Some((cluster, stderr)) =
        cluster::private_in(dir, &[("LOOPGUARD_PORT_RANGE", range.as_str())])
    else {
        return;
    };
    let (port, _held) = taker.join().expect("the port taker");
    assert!(
        stderr.contains("starting again on other free ports (attempt 2 of 3)"),
        "{stderr}"
    );
    let env = std::fs::read_to_string(cluster.dir.join("cluster.env")).expect("cluster.env");
    assert!(
        !env.contains(&format!("={port}\n")) && !env.contains(&format!("=\"{port}\"")),
        "the second start chose the taken port {port} again:\n{env}"
    );
    let client = cluster.client().await;
    let nodes: Api<Node> = Api::all(client);
    nodes
        .list(&ListParams::default())
        .await
        .expect("the API server of the second start answers");
    drop(cluster);
}

fn pod_is_running_and_ready(pod: &Pod) -> bool {
    let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    running && deploy::is_ready(pod)
}

fn sorted(names: &[String]) -> Vec<String> {
    let mut names = names.to_vec();
    names.sort();
    names
}
