//! The controller against a real control plane. Node states are written by the test, as agents
//! would write them; the real `loopguard controller` binary rolls them up.
//!
//! Controllers reconcile every policy of the cluster, so these tests run one at a time; each uses
//! its own node labels, policies and Lease namespace.

mod support;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use loopguard::api::{Compliance, LoopbackPolicyStatus};
use serde_json::json;
use std::time::{Duration, Instant};
use support::cluster::{eventually, unique_name};
use support::sim::{Controller, World};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn cond(status: &LoopbackPolicyStatus, type_: &str) -> (String, String) {
    let c = status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} in {status:?}"));
    (format!("{:?}", c.status), c.reason.clone())
}

async fn lock() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

#[tokio::test]
async fn invalid_specs_are_refused_with_their_messages() {
    let Some(w) = World::new("invalid").await else {
        return;
    };
    let cases = [
        (
            json!({"ipFamilies": ["IPv4"]}),
            "ipFamilies must include IPv6",
        ),
        (json!({"ipFamilies": ["IPv6", "IPv6"]}), "Duplicate value"),
        (
            json!({"mode": "Enforcing"}),
            "supported values: \"Enforce\", \"Audit\"",
        ),
        (
            json!({"placement": "Top"}),
            "supported values: \"Insert\", \"Append\"",
        ),
        (
            json!({"onRemoval": "Delete"}),
            "supported values: \"Remove\", \"Retain\"",
        ),
        (
            json!({"applicability": "Sometimes"}),
            "supported values: \"Auto\", \"Always\"",
        ),
        (
            json!({"nodeSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}),
            "values must be non-empty for In and NotIn",
        ),
        (
            json!({"nodeSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}}),
            "empty for Exists",
        ),
        (
            json!({"nodeSelector": {"matchExpressions": [{"key": "a", "operator": "Like", "values": ["x"]}]}}),
            "supported values: \"In\"",
        ),
        (json!({"priority": "high"}), "spec.priority"),
    ];
    for (spec, message) in cases {
        let doc = json!({"apiVersion": "loopguard.dev/v1alpha1", "kind": "LoopbackPolicy",
                         "metadata": {"name": unique_name("bad")}, "spec": spec});
        let mut apply = w.cluster.kubectl();
        apply.args(["apply", "-f", "-"]);
        let out = support::output(apply, Some(&doc.to_string()));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted {spec}");
        assert!(
            stderr.contains(message),
            "{spec}: expected {message:?} in {stderr}"
        );
    }
    // Exceptions: every field an auditor needs, a bounded expiry, named nodes and known rules.
    let good = json!({
        "nodeNames": ["node-a"],
        "ruleIds": ["set_ufw_loopback_traffic"],
        "justification": "ufw replaced by the cloud firewall on this pool",
        "approvedBy": "Jane Auditor",
        "approvedAt": "2026-12-01T00:00:00Z",
        "ticket": "CHG-100",
        "expires": "2027-01-15T00:00:00Z",
    });
    let with = |field: &str, value: serde_json::Value| {
        let mut spec = good.clone();
        if value.is_null() {
            spec.as_object_mut().unwrap().remove(field);
        } else {
            spec[field] = value;
        }
        spec
    };
    let exception_cases = [
        (
            with("justification", json!(null)),
            "spec.justification: Required value",
        ),
        (
            with("justification", json!("because")),
            "spec.justification",
        ),
        (
            with("approvedBy", json!(null)),
            "spec.approvedBy: Required value",
        ),
        (
            with("approvedAt", json!(null)),
            "spec.approvedAt: Required value",
        ),
        (with("ticket", json!(null)), "spec.ticket: Required value"),
        (with("expires", json!(null)), "spec.expires: Required value"),
        (
            with("expires", json!("2026-11-15T00:00:00Z")),
            "expires must be after approvedAt",
        ),
        (
            with("expires", json!("2027-06-15T00:00:00Z")),
            "at most 90 days",
        ),
        (
            with("nodeNames", json!(null)),
            "name the nodes (nodeNames) or select them",
        ),
        (
            with("ruleIds", json!(["set_bogus_loopback_traffic"])),
            "supported values: \"set_ipv6_loopback_traffic\"",
        ),
        (with("ruleIds", json!([])), "spec.ruleIds"),
    ];
    for (spec, message) in exception_cases {
        let doc = json!({"apiVersion": "loopguard.dev/v1alpha1", "kind": "LoopbackException",
                         "metadata": {"name": unique_name("bad-ex")}, "spec": spec});
        let mut apply = w.cluster.kubectl();
        apply.args(["apply", "--dry-run=server", "-f", "-"]);
        let out = support::output(apply, Some(&doc.to_string()));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted {spec}");
        assert!(
            stderr.contains(message),
            "{spec}: expected {message:?} in {stderr}"
        );
    }
    let doc = json!({"apiVersion": "loopguard.dev/v1alpha1", "kind": "LoopbackException",
                     "metadata": {"name": unique_name("good-ex")}, "spec": good});
    w.cluster.kubectl_ok(
        &["apply", "--dry-run=server", "-f", "-"],
        Some(&doc.to_string()),
    );

    // And the defaults land in the stored object.
    let p = w.policy(&unique_name("defaults"), json!({})).await;
    let stored = serde_json::to_value(&p.spec).unwrap();
    assert_eq!(stored["mode"], "Enforce");
    assert_eq!(stored["ipFamilies"], json!(["IPv6"]));
    assert_eq!(stored["applicability"], "Auto");
    assert_eq!(stored["placement"], "Insert");
    assert_eq!(stored["onRemoval"], "Remove");
    assert_eq!(stored["priority"], 0);
    w.clean(&[&p.name_any()]).await;
}

#[tokio::test]
async fn conditions_and_counts_follow_node_reports() {
    let _serial = lock().await;
    let Some(w) = World::new("mix").await else {
        return;
    };
    let _ctl = Controller::start(w.cluster, &w.lease_ns, "mix", &[]);
    let nodes: Vec<String> = futures::future::join_all((0..4).map(|n| w.node(n, &[], None))).await;
    let name = unique_name("mix");
    let p = w.policy(&name, json!({})).await;
    let g = p.metadata.generation.unwrap();

    let s = w
        .wait_status(&name, "4 pending", |s| s.pending_nodes == 4)
        .await;
    assert_eq!(
        cond(&s, "Compliant"),
        ("Unknown".into(), "AwaitingNodeReports".into())
    );
    assert_eq!(cond(&s, "Progressing").0, "True");

    w.report(&nodes[0], &name, g, Compliance::Compliant, 0)
        .await;
    w.report(&nodes[1], &name, g, Compliance::NonCompliant, 0)
        .await;
    w.report(&nodes[2], &name, g, Compliance::NotApplicable, 0)
        .await;
    w.report(&nodes[3], &name, g, Compliance::Error, 0).await;
    let s = w
        .wait_status(&name, "all reported", |s| s.pending_nodes == 0)
        .await;
    assert_eq!(
        (
            s.targeted_nodes,
            s.compliant_nodes,
            s.non_compliant_nodes,
            s.not_applicable_nodes,
            s.errored_nodes
        ),
        (4, 1, 1, 1, 1)
    );
    assert_eq!(
        s.non_compliant_node_names,
        vec![nodes[1].clone(), nodes[3].clone()]
    );
    assert_eq!(cond(&s, "Compliant"), ("False".into(), "NodeErrors".into()));
    assert_eq!(cond(&s, "Degraded"), ("True".into(), "NodeErrors".into()));
    assert_eq!(cond(&s, "Progressing").0, "False");
    assert_eq!(s.summary, "1/3", "the NotApplicable node is left out");

    // The errored and non-compliant nodes recover: Compliant, and `kubectl wait` agrees.
    w.report(&nodes[1], &name, g, Compliance::Compliant, 1)
        .await;
    w.report(&nodes[3], &name, g, Compliance::Compliant, 0)
        .await;
    w.cluster.wait_compliant(&name, "30s");
    let s = w
        .wait_status(&name, "degraded cleared", |s| {
            cond(s, "Degraded").0 == "False"
        })
        .await;
    assert_eq!((s.compliant_nodes, s.not_applicable_nodes), (3, 1));
    let row = w
        .cluster
        .kubectl()
        .args(["get", "lbp", &name, "--no-headers"])
        .output()
        .unwrap();
    let row = String::from_utf8_lossy(&row.stdout);
    assert!(
        row.contains("Enforce") && row.contains("3/3") && row.contains("True"),
        "{row}"
    );

    let events = eventually("events", Duration::from_secs(15), || async {
        let e = w.events_for(&name).await;
        (e.iter().any(|(_, r, _)| r == "DriftRepaired")
            && e.iter().any(|(_, r, _)| r == "Compliant"))
        .then_some(e)
    })
    .await;
    assert!(
        events.iter().any(|(t, r, note)| t == "Warning"
            && r == "NodesNotCompliant"
            && note.contains(&nodes[1])),
        "{events:?}"
    );
    w.clean(&[&name]).await;
}

#[tokio::test]
async fn a_spec_change_is_progressing_until_nodes_catch_up() {
    let _serial = lock().await;
    let Some(w) = World::new("gen").await else {
        return;
    };
    let _ctl = Controller::start(w.cluster, &w.lease_ns, "gen", &[]);
    let node = w.node(0, &[], None).await;
    let name = unique_name("gen");
    w.policy(&name, json!({})).await;
    w.report(&node, &name, 1, Compliance::Compliant, 0).await;
    let before = w
        .wait_status(&name, "compliant", |s| s.compliant_nodes == 1)
        .await;
    assert_eq!(cond(&before, "Compliant").0, "True");

    w.policies()
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"mode": "Audit"}})),
        )
        .await
        .unwrap();
    let s = w
        .wait_status(&name, "generation 2 pending", |s| {
            s.observed_generation == Some(2)
        })
        .await;
    assert_eq!(s.pending_nodes, 1);
    assert_eq!(
        cond(&s, "Progressing"),
        ("True".into(), "NodesPending".into())
    );
    assert_eq!(cond(&s, "Compliant").0, "Unknown");
    assert!(
        s.conditions
            .iter()
            .all(|c| c.observed_generation == Some(2))
    );

    w.report(&node, &name, 2, Compliance::Compliant, 0).await;
    let s = w
        .wait_status(&name, "caught up", |s| s.pending_nodes == 0)
        .await;
    assert_eq!(cond(&s, "Progressing").0, "False");
    assert_eq!(cond(&s, "Compliant").0, "True");
    w.clean(&[&name]).await;
}

/// Who approved a change and why (annotations loopguard.dev/approved-by and loopguard.dev/reason,
/// which the chart's protection policy makes true and required for switching a policy off) end up
/// in the status and an Event; a deletion is told with them, or with a Warning that none was
/// written.
#[tokio::test]
async fn approved_changes_and_deletions_are_told_with_who_and_why() {
    let _serial = lock().await;
    let Some(w) = World::new("appr").await else {
        return;
    };
    let _ctl = Controller::start(w.cluster, &w.lease_ns, "appr", &[]);
    let node = w.node(0, &[], None).await;
    let name = unique_name("appr");
    w.policy(&name, json!({})).await;
    w.report(&node, &name, 1, Compliance::Compliant, 0).await;
    let before = w
        .wait_status(&name, "compliant", |s| s.compliant_nodes == 1)
        .await;
    assert_eq!(before.last_approval, None);

    let approval = |by: &str, reason: &str| json!({ "loopguard.dev/approved-by": by, "loopguard.dev/reason": reason });
    w.policies()
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(&json!({
                "metadata": { "annotations": approval("dave", "CHG-7: audit while the pool moves") },
                "spec": { "mode": "Audit" },
            })),
        )
        .await
        .unwrap();
    let s = w
        .wait_status(&name, "the approval recorded", |s| {
            s.last_approval.is_some()
        })
        .await;
    let recorded = s.last_approval.clone().unwrap();
    assert_eq!(
        (
            recorded.by.as_str(),
            recorded.reason.as_str(),
            recorded.generation
        ),
        ("dave", "CHG-7: audit while the pool moves", Some(2))
    );
    let events = eventually(
        "the ChangeApproved Event",
        Duration::from_secs(15),
        || async {
            let events = w.events_for(&name).await;
            events
                .iter()
                .any(|(_, r, _)| r == "ChangeApproved")
                .then_some(events)
        },
    )
    .await;
    assert!(
        events.iter().any(|(t, r, note)| t == "Normal"
            && r == "ChangeApproved"
            && note.contains("approved by dave (spec generation 2): CHG-7")),
        "{events:?}"
    );

    // Deleted with the approval still on it: told with who and why.
    w.policies()
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    w.report(&node, &name, 2, Compliance::Unmanaged, 0).await;
    w.gone(&name, Duration::from_secs(15)).await;
    let events = w.events_for(&name).await;
    assert!(
        events.iter().any(|(t, r, note)| t == "Normal"
            && r == "Deleted"
            && note.contains("approved by dave: CHG-7")),
        "{events:?}"
    );

    // An Enforce policy deleted without one: a Warning that says so.
    let bare = unique_name("bare");
    w.policy(&bare, json!({"onRemoval": "Retain"})).await;
    eventually("finalizer added", Duration::from_secs(15), || async {
        let p = w.policies().get(&bare).await.ok()?;
        (!p.finalizers().is_empty()).then_some(())
    })
    .await;
    w.policies()
        .delete(&bare, &DeleteParams::default())
        .await
        .unwrap();
    w.gone(&bare, Duration::from_secs(15)).await;
    let events = w.events_for(&bare).await;
    assert!(
        events.iter().any(|(t, r, note)| t == "Warning"
            && r == "Deleted"
            && note.contains("without an approval")),
        "{events:?}"
    );
    w.clean(&[]).await;
}

/// A LoopbackException turns a failing node into an exempted one (Compliant, saying so), writes its
/// own status, and when it expires the node is a finding again without anyone acting.
#[tokio::test]
async fn an_exception_exempts_a_failing_node_until_it_expires() {
    let _serial = lock().await;
    let Some(w) = World::new("exc").await else {
        return;
    };
    let _ctl = Controller::start(w.cluster, &w.lease_ns, "exc", &[]);
    let nodes: Vec<String> = futures::future::join_all((0..2).map(|n| w.node(n, &[], None))).await;
    let name = unique_name("exc");
    w.policy(&name, json!({})).await;
    w.report(&nodes[0], &name, 1, Compliance::Compliant, 0)
        .await;
    w.report(&nodes[1], &name, 1, Compliance::NonCompliant, 0)
        .await;
    let s = w
        .wait_status(&name, "one node failing", |s| s.non_compliant_nodes == 1)
        .await;
    assert_eq!(cond(&s, "Compliant").0, "False");

    // Approved now, expiring in 25 seconds; whole seconds, as the API's times are written (a
    // fraction would be cut off on the way in, and the expiry come up to a second before `expires`).
    let now = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second()).unwrap();
    let expires = now + jiff::SignedDuration::from_secs(25);
    let exception = unique_name("exc");
    let api: Api<loopguard::api::LoopbackException> = Api::all(w.client.clone());
    let object: loopguard::api::LoopbackException = serde_json::from_value(json!({
        "apiVersion": "loopguard.dev/v1alpha1", "kind": "LoopbackException",
        "metadata": {"name": exception},
        "spec": {
            "nodeNames": [nodes[1]],
            "ruleIds": ["set_ipv6_loopback_traffic"],
            "justification": "the node is drained and replaced this week",
            "approvedBy": "Jane Auditor",
            "approvedAt": now.to_string(),
            "ticket": "CHG-200",
            "expires": expires.to_string(),
        },
    }))
    .unwrap();
    api.create(&Default::default(), &object).await.unwrap();
    let s = w
        .wait_status(&name, "the node exempted", |s| s.exempted_nodes == 1)
        .await;
    assert_eq!(s.non_compliant_nodes, 0);
    assert_eq!(
        cond(&s, "Compliant"),
        ("True".into(), "CompliantWithExceptions".into())
    );
    assert_eq!(
        s.exempted_node_names,
        [format!("{} ({exception})", nodes[1])]
    );
    let ex = eventually(
        "the exception's status",
        Duration::from_secs(15),
        || async {
            api.get(&exception)
                .await
                .ok()?
                .status
                .filter(|s| s.exempted_nodes == 1)
        },
    )
    .await;
    assert_eq!(
        (ex.state, ex.matched_nodes),
        (loopguard::api::ExceptionState::Active, 1)
    );

    // Expired: a finding again, and the exception says so.
    let s = eventually(
        "a finding again after the expiry",
        Duration::from_secs(60),
        || async {
            let p = w.policies().get(&name).await.ok()?;
            p.status.filter(|s| s.non_compliant_nodes == 1)
        },
    )
    .await;
    assert!(jiff::Timestamp::now() >= expires, "not before the expiry");
    assert_eq!(
        (s.exempted_nodes, cond(&s, "Compliant").0.as_str()),
        (0, "False")
    );
    let ex = eventually("the exception expired", Duration::from_secs(15), || async {
        api.get(&exception)
            .await
            .ok()?
            .status
            .filter(|s| s.state == loopguard::api::ExceptionState::Expired)
    })
    .await;
    assert_eq!(ex.exempted_nodes, 0);
    api.delete(&exception, &DeleteParams::default())
        .await
        .unwrap();
    w.clean(&[&name]).await;
}

/// With --policy-reports, each node a policy governs has a ClusterPolicyReport (wgpolicyk8s.io,
/// the CRD as Kyverno ships it) with a result per rule, kept current: a changed verdict is written,
/// heartbeats are not, a node no policy governs loses its report, and a report loopguard did not
/// write is never touched.
#[tokio::test]
async fn policy_reports_follow_the_nodes_and_touch_nothing_else() {
    let _serial = lock().await;
    let Some(w) = World::new("polr").await else {
        return;
    };
    let crd = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/wgpolicyk8s/wgpolicyk8s.io_clusterpolicyreports.yaml"
    );
    w.cluster
        .kubectl_ok(&["apply", "--server-side", "-f", crd], None);
    w.cluster
        .wait_established(&["clusterpolicyreports.wgpolicyk8s.io"]);
    let resource = kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("wgpolicyk8s.io", "v1alpha2", "ClusterPolicyReport"),
        "clusterpolicyreports",
    );
    let reports: Api<kube::api::DynamicObject> = Api::all_with(w.client.clone(), &resource);
    let nodes: Vec<String> = futures::future::join_all((0..2).map(|n| w.node(n, &[], None))).await;
    // Another tool's report, with the name loopguard would give the second node, and another one.
    let foreign = |name: &str| {
        serde_json::from_value::<kube::api::DynamicObject>(json!({
            "apiVersion": "wgpolicyk8s.io/v1alpha2", "kind": "ClusterPolicyReport",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "kyverno"}},
            "results": [{"policy": "other", "rule": "r", "result": "fail", "source": "kyverno"}],
        }))
        .unwrap()
    };
    let other = unique_name("kyverno");
    for name in [other.clone(), format!("loopguard-{}", nodes[1])] {
        reports
            .create(&Default::default(), &foreign(&name))
            .await
            .unwrap();
    }
    let version = |o: &kube::api::DynamicObject| o.metadata.resource_version.clone().unwrap();
    let before = version(&reports.get(&other).await.unwrap());
    let taken = version(
        &reports
            .get(&format!("loopguard-{}", nodes[1]))
            .await
            .unwrap(),
    );

    let _ctl = Controller::start(w.cluster, &w.lease_ns, "polr", &["--policy-reports"]);
    let name = unique_name("polr");
    w.policy(&name, json!({})).await;
    w.report(&nodes[0], &name, 1, Compliance::Compliant, 0)
        .await;
    w.report(&nodes[1], &name, 1, Compliance::NonCompliant, 0)
        .await;
    let result = |node: String, want: &'static str| {
        let reports = reports.clone();
        async move {
            let o = reports.get(&format!("loopguard-{node}")).await.ok()?;
            (o.data["results"][0]["result"] == want).then_some(o)
        }
    };
    let report = eventually(
        "the node's report says pass",
        Duration::from_secs(30),
        || result(nodes[0].clone(), "pass"),
    )
    .await;
    let uid = Api::<k8s_openapi::api::core::v1::Node>::all(w.client.clone())
        .get(&nodes[0])
        .await
        .unwrap()
        .uid()
        .unwrap();
    assert_eq!(report.data["scope"]["name"], nodes[0].as_str());
    assert_eq!(report.data["scope"]["uid"], uid.as_str());
    assert_eq!(
        report.metadata.owner_references.as_ref().unwrap()[0].uid,
        uid,
        "owned by the node: deleted with it"
    );
    assert_eq!(report.data["summary"]["pass"], 1);
    let r = &report.data["results"][0];
    assert_eq!(
        (
            r["source"].as_str(),
            r["policy"].as_str(),
            r["rule"].as_str()
        ),
        (
            Some("loopguard"),
            Some(name.as_str()),
            Some("set_ipv6_loopback_traffic")
        )
    );

    // Heartbeats (the same verdict verified again) write nothing.
    let written = version(&report);
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(4)).await;
        w.report(&nodes[0], &name, 1, Compliance::Compliant, 0)
            .await;
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        version(
            &reports
                .get(&format!("loopguard-{}", nodes[0]))
                .await
                .unwrap()
        ),
        written,
        "rewritten without a change"
    );
    // The second node's report name was taken by another tool: loopguard does not take it over.
    let kept = reports
        .get(&format!("loopguard-{}", nodes[1]))
        .await
        .unwrap();
    assert_eq!(version(&kept), taken, "{:?}", kept.data);

    // A changed verdict is written.
    w.report(&nodes[0], &name, 1, Compliance::NonCompliant, 0)
        .await;
    eventually(
        "the node's report says fail",
        Duration::from_secs(30),
        || result(nodes[0].clone(), "fail"),
    )
    .await;

    // The policy gone: no policy governs the nodes, and their reports go; the others stay.
    w.policies()
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the node's report deleted",
        Duration::from_secs(60),
        || async {
            match reports.get(&format!("loopguard-{}", nodes[0])).await {
                Err(kube::Error::Api(s)) if s.code == 404 => Some(()),
                _ => None,
            }
        },
    )
    .await;
    assert_eq!(version(&reports.get(&other).await.unwrap()), before);
    assert_eq!(
        version(
            &reports
                .get(&format!("loopguard-{}", nodes[1]))
                .await
                .unwrap()
        ),
        taken
    );
    for other in [other, format!("loopguard-{}", nodes[1])] {
        reports
            .delete(&other, &DeleteParams::default())
            .await
            .unwrap();
    }
    w.clean(&[&name]).await;
}

/// A leader whose API server hangs (SIGSTOP: no answer, no refusal) stops leading on its own clock
/// at the renew deadline (2/3 of the lease), before the lease may pass to another replica, and
/// leads again once the API server answers. (kube-lease-manager's leader would stay leader until
/// its hung renewal returned: the README says why loopguard keeps its own.)
#[tokio::test]
async fn a_leader_that_cannot_renew_stops_at_its_renew_deadline() {
    let _serial = lock().await;
    let Some(cluster) = support::cluster::private("lease-hang") else {
        return;
    };
    let client = cluster.client().await;
    let namespace = cluster.namespace(&client, "lease").await;
    let lease = Duration::from_secs(6);
    let elector = loopguard::controller::lease::LeaderElector::new(
        Api::namespaced(client.clone(), &namespace),
        loopguard::api::LEASE_NAME,
        "replica-a",
        lease,
    );
    let leadership = elector.leadership();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(elector.run(stopped));
    eventually("leading", Duration::from_secs(20), || async {
        leadership.is_leader().then_some(())
    })
    .await;
    // Just after a renewal, so that the deadline is as far as it gets.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    cluster.pause_apiserver();
    let paused = Instant::now();
    while leadership.is_leader() {
        assert!(
            paused.elapsed() < lease,
            "still leading when the lease may pass to another replica"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lost = paused.elapsed();
    cluster.resume_apiserver();
    println!("API server hung: leadership ended {lost:?} after the hang began");
    assert!(
        lost <= lease * 2 / 3 + Duration::from_millis(300),
        "leadership ended {lost:?} after the last possible renewal, past the renew deadline"
    );
    eventually("leading again", Duration::from_secs(30), || async {
        leadership.is_leader().then_some(())
    })
    .await;
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn overlapping_policies_resolve_by_priority() {
    let _serial = lock().await;
    let Some(w) = World::new("prio").await else {
        return;
    };
    let _ctl = Controller::start(w.cluster, &w.lease_ns, "prio", &[]);
    let workers: Vec<String> =
        futures::future::join_all((0..2).map(|n| w.node(n, &[("role", "worker")], None))).await;
    let infra = w.node(2, &[("role", "infra")], None).await;
    let base = unique_name("base");
    let special = unique_name("special");
    w.policy(&base, json!({})).await;
    w.policy(
        &special,
        json!({"priority": 10, "ipFamilies": ["IPv6", "IPv4"],
               "nodeSelector": {"matchLabels": {"loopguard.dev/test": w.label, "role": "worker"}}}),
    )
    .await;
    let s = w
        .wait_status(&base, "two overridden", |s| s.overridden_nodes == 2)
        .await;
    assert_eq!(s.targeted_nodes, 1);
    let s = w
        .wait_status(&special, "two targeted", |s| s.targeted_nodes == 2)
        .await;
    assert_eq!(s.overridden_nodes, 0);
    // A node following the losing policy is not counted for the winner.
    w.report(&workers[0], &base, 1, Compliance::Compliant, 0)
        .await;
    w.report(&workers[1], &special, 1, Compliance::Compliant, 0)
        .await;
    w.report(&infra, &base, 1, Compliance::Compliant, 0).await;
    let s = w
        .wait_status(&special, "one of two", |s| s.compliant_nodes == 1)
        .await;
    assert_eq!(s.pending_nodes, 1);
    let s = w
        .wait_status(&base, "infra compliant", |s| s.compliant_nodes == 1)
        .await;
    assert_eq!(cond(&s, "Compliant").0, "True");
    w.clean(&[&base, &special]).await;
}

#[tokio::test]
async fn a_node_stuck_not_ready_turns_the_policy_degraded() {
    let _serial = lock().await;
    let Some(w) = World::new("notready").await else {
        return;
    };
    let _ctl = Controller::start(
        w.cluster,
        &w.lease_ns,
        "nr",
        &["--node-not-ready-timeout", "60"],
    );
    let ten_minutes_ago =
        (jiff::Timestamp::now() - jiff::SignedDuration::from_mins(10)).to_string();
    let up = w.node(0, &[], None).await;
    let down = w.node(1, &[], Some(&ten_minutes_ago)).await;
    let name = unique_name("nr");
    w.policy(&name, json!({})).await;
    w.report(&up, &name, 1, Compliance::Compliant, 0).await;
    let s = w
        .wait_status(&name, "degraded", |s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Degraded" && c.reason == "NodesNotReady")
        })
        .await;
    let degraded = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert!(degraded.message.contains(&down), "{}", degraded.message);
    assert_eq!(s.pending_nodes, 1);
    w.clean(&[&name]).await;
}

#[tokio::test]
async fn deletion_waits_for_cleanup_and_never_forever() {
    let _serial = lock().await;
    let Some(w) = World::new("del").await else {
        return;
    };
    let _ctl = Controller::start(w.cluster, &w.lease_ns, "del", &["--cleanup-timeout", "6"]);
    let nodes: Vec<String> = futures::future::join_all((0..2).map(|n| w.node(n, &[], None))).await;

    // Remove: the finalizer holds until the node reports its rules removed.
    let remove = unique_name("remove");
    w.policy(&remove, json!({"nodeSelector": {"matchLabels": {"purpose": "remove", "loopguard.dev/test": w.label}}})).await;
    let remove_on = w.node(5, &[("purpose", "remove")], None).await;
    w.report(&remove_on, &remove, 1, Compliance::Compliant, 0)
        .await;
    eventually("finalizer added", Duration::from_secs(15), || async {
        let p = w.policies().get(&remove).await.ok()?;
        p.finalizers()
            .contains(&loopguard::api::FINALIZER.to_string())
            .then_some(())
    })
    .await;
    w.policies()
        .delete(&remove, &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = w.policies().get_opt(&remove).await.unwrap();
    assert!(
        held.is_some_and(|p| p.metadata.deletion_timestamp.is_some()),
        "held by the finalizer"
    );
    w.report(&remove_on, &remove, 1, Compliance::Unmanaged, 0)
        .await;
    w.gone(&remove, Duration::from_secs(10)).await;
    assert!(
        !w.events_for(&remove)
            .await
            .iter()
            .any(|(_, r, _)| r == "CleanupIncomplete")
    );

    // Retain: nothing to wait for.
    let retain = unique_name("retain");
    w.policy(&retain, json!({"onRemoval": "Retain"})).await;
    w.report(&nodes[0], &retain, 1, Compliance::Compliant, 0)
        .await;
    eventually("finalizer added", Duration::from_secs(15), || async {
        let p = w.policies().get(&retain).await.ok()?;
        (!p.finalizers().is_empty()).then_some(())
    })
    .await;
    let started = Instant::now();
    w.policies()
        .delete(&retain, &DeleteParams::default())
        .await
        .unwrap();
    w.gone(&retain, Duration::from_secs(5)).await;
    assert!(started.elapsed() < Duration::from_secs(5));

    // A node that never answers: released after the timeout, with a Warning naming it.
    let silent = unique_name("silent");
    w.policy(&silent, json!({})).await;
    w.report(&nodes[1], &silent, 1, Compliance::Compliant, 0)
        .await;
    eventually("finalizer added", Duration::from_secs(15), || async {
        let p = w.policies().get(&silent).await.ok()?;
        (!p.finalizers().is_empty()).then_some(())
    })
    .await;
    let started = Instant::now();
    w.policies()
        .delete(&silent, &DeleteParams::default())
        .await
        .unwrap();
    w.gone(&silent, Duration::from_secs(20)).await;
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "released after {:?}",
        started.elapsed()
    );
    let events = w.events_for(&silent).await;
    assert!(
        events.iter().any(|(t, r, note)| t == "Warning"
            && r == "CleanupIncomplete"
            && note.contains(&nodes[1])),
        "{events:?}"
    );
    w.clean(&[]).await;
}

#[tokio::test]
async fn only_the_leader_writes_and_another_takes_over() {
    let _serial = lock().await;
    let Some(w) = World::new("lease").await else {
        return;
    };
    let args = ["--lease-duration", "4"];
    let mut a = Controller::start(w.cluster, &w.lease_ns, "replica-a", &args);
    let mut b = Controller::start(w.cluster, &w.lease_ns, "replica-b", &args);
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(w.client.clone(), &w.lease_ns);
    let holder = || async {
        leases
            .get_opt(loopguard::api::LEASE_NAME)
            .await
            .ok()??
            .spec?
            .holder_identity
            .filter(|h| !h.is_empty())
    };
    let first = eventually("a leader", Duration::from_secs(20), holder).await;
    let node = w.node(0, &[], None).await;
    let name = unique_name("lease");
    w.policy(&name, json!({})).await;
    w.report(&node, &name, 1, Compliance::Compliant, 0).await;
    w.wait_status(&name, "compliant", |s| s.compliant_nodes == 1)
        .await;
    let (leader, follower) = if first == "replica-a" {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    eventually(
        "leader's writes counted",
        Duration::from_secs(10),
        || async { (leader.writes() > 0.0).then_some(()) },
    )
    .await;
    assert_eq!(follower.writes(), 0.0, "the follower never writes");
    assert_eq!(follower.metric("loopguard_controller_leader"), 0.0);

    // The leader is killed without a chance to release the lease: the follower takes over once
    // the lease expires, and writes from then on.
    leader.stop(libc::SIGKILL);
    let killed = Instant::now();
    let second = eventually("a new leader", Duration::from_secs(30), || async {
        holder().await.filter(|h| *h != first)
    })
    .await;
    println!(
        "lease moved from {first} to {second} {:?} after the kill",
        killed.elapsed()
    );
    w.report(&node, &name, 1, Compliance::NonCompliant, 0).await;
    w.wait_status(&name, "non-compliant", |s| s.non_compliant_nodes == 1)
        .await;
    assert!(follower.writes() > 0.0, "the new leader writes");
    w.clean(&[&name]).await;
}

#[tokio::test]
async fn a_thousand_nodes_converge_with_few_writes() {
    let _serial = lock().await;
    let Some(w) = World::new("scale").await else {
        return;
    };
    const NODES: usize = 1000;
    let started = Instant::now();
    let nodes: Vec<String> = futures::stream::iter(0..NODES)
        .map(|n| w.node(n, &[], None))
        .buffer_unordered(32)
        .collect()
        .await;
    println!("created {NODES} nodes in {:?}", started.elapsed());
    let ctl = Controller::start(w.cluster, &w.lease_ns, "scale", &["--coalesce-ms", "500"]);
    let name = unique_name("scale");
    w.policy(&name, json!({})).await;
    w.wait_status(&name, "all pending", |s| s.pending_nodes == NODES as i32)
        .await;
    let writes_before = ctl.writes();

    let started = Instant::now();
    futures::stream::iter(nodes.iter())
        .map(|node| w.report(node, &name, 1, Compliance::Compliant, 0))
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let reported = started.elapsed();
    let s = w
        .wait_status(&name, "all compliant", |s| {
            s.compliant_nodes == NODES as i32
        })
        .await;
    let converged = started.elapsed();
    assert_eq!(cond(&s, "Compliant").0, "True");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes = ctl.writes() - writes_before;
    println!(
        "{NODES} node reports written in {reported:?}; status converged {converged:?} after the first; {writes} status writes"
    );
    assert!(
        writes >= 1.0 && writes <= (NODES / 20) as f64,
        "{writes} status writes for {NODES} reports"
    );
    w.clean(&[&name]).await;
}

/// A node counts only while a live agent vouches for it: a Ready agent Pod, and a report verified
/// within the heartbeat interval. Without one for longer than the grace period, the node is
/// Unknown, named, and the policy is not Compliant; once the agent is back, it is green again
/// without anyone touching it.
#[tokio::test]
async fn a_node_without_a_live_agent_is_never_counted_compliant() {
    let _serial = lock().await;
    let Some(w) = World::new("alive").await else {
        return;
    };
    let ctl = Controller::start(
        w.cluster,
        &w.lease_ns,
        "alive",
        &["--agent-grace", "3", "--agent-heartbeat", "60"],
    );
    let nodes: Vec<String> = futures::future::join_all((0..3).map(|n| w.node(n, &[], None))).await;
    let name = unique_name("alive");
    let g = w
        .policy(&name, json!({}))
        .await
        .metadata
        .generation
        .unwrap();
    for node in &nodes {
        w.report(node, &name, g, Compliance::Compliant, 0).await;
    }
    w.wait_status(&name, "compliant and ready", |s| {
        cond(s, "Compliant").0 == "True" && cond(s, "Ready").0 == "True"
    })
    .await;
    w.cluster
        .wait_condition("Ready", &[format!("lbp/{name}")], "30s");

    // The agent stops answering its readiness probe (stopped, wedged, crash-looping).
    w.set_agent_ready(&nodes[0], false).await;
    let stopped = Instant::now();
    let s = w
        .wait_status(&name, "node 0 unknown", |s| s.unknown_nodes == 1)
        .await;
    println!(
        "agent not Ready → policy not Compliant after {:?}",
        stopped.elapsed()
    );
    assert_eq!(s.non_compliant_node_names, vec![nodes[0].clone()]);
    assert_eq!(s.compliant_nodes, 2);
    assert_eq!(
        cond(&s, "Compliant"),
        ("False".into(), "AgentsUnavailable".into())
    );
    assert_eq!(
        cond(&s, "Degraded"),
        ("True".into(), "AgentsUnavailable".into())
    );
    assert_eq!(cond(&s, "Ready").0, "False");
    assert_eq!(cond(&s, "Stalled").0, "True");
    let message = &s
        .conditions
        .iter()
        .find(|c| c.type_ == "Compliant")
        .unwrap()
        .message;
    assert!(
        message.contains(&format!("{} (its agent Pod is not Ready", nodes[0])),
        "{message}"
    );
    // What an alert on a node without a live agent reads.
    let gauge = |state: &str| {
        ctl.metric(&format!(
            "loopguard_policy_nodes{{policy=\"{name}\",state=\"{state}\"}}"
        ))
    };
    eventually("the per-policy gauges", Duration::from_secs(15), || async {
        (gauge("unknown") == 1.0 && gauge("compliant") == 2.0 && gauge("targeted") == 3.0)
            .then_some(())
    })
    .await;
    assert_eq!(
        ctl.metric(&format!(
            "loopguard_policy_condition{{policy=\"{name}\",condition=\"Compliant\",status=\"False\"}}"
        )),
        1.0
    );
    assert_eq!(
        ctl.metric(&format!(
            "loopguard_build_info{{version=\"{}\",component=\"controller\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
    w.set_agent_ready(&nodes[0], true).await;
    w.wait_status(&name, "green again", |s| {
        s.unknown_nodes == 0 && cond(s, "Compliant").0 == "True"
    })
    .await;

    // No agent Pod at all on a node.
    let pods: Api<Pod> = Api::namespaced(w.client.clone(), &w.lease_ns);
    pods.delete(
        &format!("agent-{}", nodes[1]),
        &DeleteParams::default().grace_period(0),
    )
    .await
    .unwrap();
    // The Pod is first seen terminating (not Ready), then gone: wait for the second.
    let gone = |s: &LoopbackPolicyStatus| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Compliant" && c.message.contains("no agent Pod runs on it"))
    };
    let s = w
        .wait_status(&name, "node 1 without an agent", |s| {
            s.unknown_nodes == 1 && gone(s)
        })
        .await;
    assert_eq!(s.non_compliant_node_names, vec![nodes[1].clone()]);
    let message = &s
        .conditions
        .iter()
        .find(|c| c.type_ == "Compliant")
        .unwrap()
        .message;
    assert!(message.contains("no agent Pod runs on it"), "{message}");
    w.agent_pod(&nodes[1], true).await;

    // The Pod is Ready but the report was last verified long ago: the agent's loop is stuck.
    let hour_ago = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(3600);
    let compliant = serde_json::to_value(Compliance::Compliant).unwrap();
    w.report_raw(&nodes[2], &name, g, compliant, 0, hour_ago)
        .await;
    let s = w
        .wait_status(&name, "node 2 stale", |s| {
            s.unknown_nodes == 1 && s.non_compliant_node_names == vec![nodes[2].clone()]
        })
        .await;
    let message = &s
        .conditions
        .iter()
        .find(|c| c.type_ == "Compliant")
        .unwrap()
        .message;
    assert!(
        message.contains("its agent last verified it 1h0m ago"),
        "{message}"
    );
    w.report(&nodes[2], &name, g, Compliance::Compliant, 0)
        .await;
    w.wait_status(&name, "all green", |s| {
        s.compliant_nodes == 3 && cond(s, "Compliant").0 == "True"
    })
    .await;
    w.clean(&[&name]).await;
}

/// Adds `value` to an enum of a CRD's schema: what a newer loopguard's CRD would allow while
/// this binary still runs.
fn widen_enum(w: &World, crd: &str, path: &str, value: &str) {
    let patch = json!([{"op": "add", "path": format!("/spec/versions/0/schema/openAPIV3Schema/properties/{path}/enum/-"), "value": value}]);
    w.cluster.kubectl_ok(
        &["patch", "crd", crd, "--type=json", "-p", &patch.to_string()],
        None,
    );
}

/// A node state or policy this binary cannot read (a value from a newer CRD) is reported
/// (Event, metric) and skipped; every other object keeps flowing.
#[tokio::test]
async fn objects_this_version_cannot_read_are_reported_and_skipped() {
    let _serial = lock().await;
    let Some(w) = World::new("newer").await else {
        return;
    };
    let ctl = Controller::start(w.cluster, &w.lease_ns, "newer", &[]);
    widen_enum(
        &w,
        "loopbacknodestates.loopguard.dev",
        "status/properties/compliance",
        "Quarantined",
    );
    widen_enum(
        &w,
        "loopbackpolicies.loopguard.dev",
        "spec/properties/mode",
        "Enforce2",
    );
    let nodes: Vec<String> = futures::future::join_all((0..2).map(|n| w.node(n, &[], None))).await;
    let name = unique_name("newer");
    let g = w
        .policy(&name, json!({}))
        .await
        .metadata
        .generation
        .unwrap();
    w.report(&nodes[0], &name, g, Compliance::Compliant, 0)
        .await;
    let now = jiff::Timestamp::now();
    w.report_raw(&nodes[1], &name, g, json!("Quarantined"), 0, now)
        .await;
    let s = w
        .wait_status(&name, "the readable report counted", |s| {
            s.compliant_nodes == 1 && s.pending_nodes == 1
        })
        .await;
    assert_eq!(s.targeted_nodes, 2);

    // A policy this binary cannot read: reported, and the watch goes on.
    let unreadable = unique_name("newer-mode");
    let manifest = json!({
        "apiVersion": "loopguard.dev/v1alpha1", "kind": "LoopbackPolicy",
        "metadata": {"name": unreadable},
        "spec": {"mode": "Enforce2", "nodeSelector": {"matchLabels": {"none": "none"}}},
    });
    w.cluster
        .kubectl_ok(&["create", "-f", "-"], Some(&manifest.to_string()));
    w.report(&nodes[1], &name, g, Compliance::Compliant, 0)
        .await;
    w.wait_status(&name, "both nodes compliant", |s| s.compliant_nodes == 2)
        .await;
    for (object, value) in [(&nodes[1], "Quarantined"), (&unreadable, "Enforce2")] {
        let events = eventually("InvalidObject event", Duration::from_secs(15), || async {
            let e = w.events_for(object).await;
            e.iter()
                .any(|(t, r, _)| t == "Warning" && r == "InvalidObject")
                .then_some(e)
        })
        .await;
        assert!(
            events
                .iter()
                .any(|(_, _, note)| note.contains(value) && note.contains("Upgrade loopguard")),
            "{events:?}"
        );
    }
    assert!(
        ctl.metric("loopguard_controller_invalid_objects_total") >= 2.0,
        "invalid objects counted"
    );
    let unread = w.policies().get(&unreadable).await;
    assert!(unread.is_err(), "this binary cannot read it either");
    w.cluster.kubectl_ok(&["delete", "lbp", &unreadable], None);
    w.cluster.kubectl_ok(
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            concat!(env!("CARGO_MANIFEST_DIR"), "/crds"),
        ],
        None,
    );
    w.clean(&[&name]).await;
}

/// `loopguard report` fails (exit 1) when a node fails, names it, and shows it on the page: one
/// node compliant, one in error, one without any report (missing, with `--expect-every-node`);
/// then, with every node compliant, it passes (exit 0).
#[tokio::test]
async fn loopguard_report_exits_1_and_names_the_nodes_that_fail() {
    let _serial = lock().await;
    let Some(w) = World::new("report").await else {
        return;
    };
    let nodes: Vec<String> = futures::future::join_all((0..3).map(|n| w.node(n, &[], None))).await;
    let name = unique_name("report");
    let p = w.policy(&name, json!({})).await;
    let g = p.metadata.generation.unwrap();
    w.report(&nodes[0], &name, g, Compliance::Compliant, 0)
        .await;
    w.report(&nodes[1], &name, g, Compliance::Error, 0).await;
    let selector = format!("loopguard.dev/test={}", w.label);
    let report = |extra: &[&str], format: &str| {
        let out = std::process::Command::new(support::sim::BIN)
            .args(["report", "--policy", &name, "--output", format])
            .args(["--expect-every-node", "--node-selector", &selector])
            .args(extra)
            .env("KUBECONFIG", w.cluster.kubeconfig())
            .output()
            .unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(
            !stdout.is_empty(),
            "report printed nothing: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), stdout)
    };
    let verdicts = |json: &serde_json::Value| -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = json["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["node"].as_str().unwrap().to_string(),
                    n["verdict"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        v.sort();
        v
    };

    let (code, out) = report(&[], "json");
    assert_eq!(
        code,
        Some(1),
        "a node in error and one missing fail the report: {out}"
    );
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        verdicts(&json),
        vec![
            (nodes[0].clone(), "Compliant".into()),
            (nodes[1].clone(), "Error".into()),
            (nodes[2].clone(), "Missing".into()),
        ]
    );
    // Tied to its cluster (kube-system's UID) and to the policy's scope (its spec as it stands).
    let kube_system: k8s_openapi::api::core::v1::Namespace =
        Api::all(w.client.clone()).get("kube-system").await.unwrap();
    assert_eq!(
        json["clusterUid"].as_str(),
        kube_system.metadata.uid.as_deref()
    );
    let policy = &json["policies"][0];
    assert_eq!(policy["name"], json!(name));
    assert_eq!(
        policy["spec"]["nodeSelector"]["matchLabels"]["loopguard.dev/test"],
        json!(w.label),
        "{policy}"
    );
    assert_eq!(policy["spec"]["mode"], json!("Enforce"));
    let summary = &json["summary"];
    assert_eq!(
        (
            &summary["nodes"],
            &summary["compliant"],
            &summary["errored"],
            &summary["missing"]
        ),
        (&json!(3), &json!(1), &json!(1), &json!(1)),
        "{summary}"
    );
    // OSCAL assessment results, valid by the OSCAL models of compliance-trestle: a finding per
    // node, satisfied only on the compliant one.
    let (code, oscal) = report(&[], "oscal");
    assert_eq!(code, Some(1));
    let document: serde_json::Value = serde_json::from_str(&oscal).unwrap();
    let mut states: Vec<(String, String)> =
        document["assessment-results"]["results"][0]["findings"]
            .as_array()
            .expect("findings")
            .iter()
            .map(|f| {
                (
                    f["title"].as_str().unwrap().to_string(),
                    f["target"]["status"]["state"].as_str().unwrap().to_string(),
                )
            })
            .collect();
    states.sort();
    let rule = "xccdf_org.ssgproject.content_rule_set_ipv6_loopback_traffic";
    assert_eq!(
        states,
        vec![
            (format!("{rule} on {}", nodes[0]), "satisfied".to_string()),
            (
                format!("{rule} on {}", nodes[1]),
                "not-satisfied".to_string()
            ),
            (
                format!("{rule} on {}", nodes[2]),
                "not-satisfied".to_string()
            ),
        ]
    );
    validate_oscal(&oscal);
    let (code, _) = report(&["--fail-on", "uncovered"], "json");
    assert_eq!(
        code,
        Some(1),
        "the error and the missing node are uncovered"
    );
    let (code, page) = report(&[], "html");
    assert_eq!(code, Some(1));
    let shown = |id: &str| -> String {
        let marker = format!("id=\"count-{id}\">");
        let at = page
            .find(&marker)
            .unwrap_or_else(|| panic!("no {id} on the page"))
            + marker.len();
        page[at..].split('<').next().unwrap().to_string()
    };
    assert_eq!(
        ["nodes", "compliant", "errored", "missing"].map(shown),
        ["3", "1", "1", "1"].map(String::from)
    );
    for node in &nodes[1..] {
        assert!(page.contains(node.as_str()), "the page names {node}");
    }

    // Every node compliant: the report passes, whatever it fails on.
    w.report(&nodes[1], &name, g, Compliance::Compliant, 0)
        .await;
    w.report(&nodes[2], &name, g, Compliance::Compliant, 0)
        .await;
    let (code, out) = report(&[], "json");
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = report(&["--fail-on", "uncovered"], "table");
    assert_eq!(code, Some(0), "{out}");
    w.clean(&[&name]).await;
}

/// Validates an OSCAL assessment-results document with compliance-trestle's models (strict: an
/// unknown field, a malformed UUID or a wrong enum value fails), from `hack/build-trestle.sh`.
fn validate_oscal(document: &str) {
    let check = std::process::Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/hack/build-trestle.sh"
    ))
    .arg("--check")
    .output()
    .unwrap();
    let python = String::from_utf8_lossy(&check.stdout).trim().to_string();
    if !check.status.success() || python.is_empty() {
        assert!(
            std::env::var_os("LOOPGUARD_REQUIRE_CLUSTER").is_none(),
            "no compliance-trestle: run hack/build-trestle.sh"
        );
        support::cluster::skipped("no compliance-trestle (hack/build-trestle.sh)");
        return;
    }
    let script = "import json, sys\n\
        from trestle.oscal.assessment_results import AssessmentResults\n\
        d = json.load(sys.stdin)['assessment-results']\n\
        m = AssessmentResults.parse_obj(d)\n\
        print('valid', len(m.results[0].findings or []))\n";
    let out = support::output(
        {
            let mut c = std::process::Command::new(python);
            c.args(["-c", script]);
            c
        },
        Some(document),
    );
    assert!(
        out.status.success(),
        "not valid OSCAL assessment results: {}\n{document}",
        String::from_utf8_lossy(&out.stderr)
    );
}
