//! Who may do what, asked of a real API server as each user would (impersonation by the admin):
//! the chart's roles for people (viewer and editor aggregated into the built-in `view` and `edit`,
//! an auditor who reads everything loopguard writes and nothing else), and `protection.enabled`:
//! no one but an approver switches an Enforce policy off, and only with who and why written on it.
//!
//! On a control plane of the test's own: the protection policy governs every LoopbackPolicy of a
//! cluster, and the shared one runs other tests' policies at the same time.

mod support;

use k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy;
use kube::api::Api;
use serde_json::{Value, json};
use std::process::Command;
use std::time::Duration;
use support::cluster::{self, Cluster, eventually, unique_name};
use support::{output, run};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/loopguard");
const TIMEOUT: Duration = Duration::from_secs(120);

/// `kubectl ARGS` as `user` (and `groups`), with what it printed.
fn as_user(cluster: &Cluster, user: &str, groups: &[&str], args: &[&str]) -> (bool, String) {
    let mut kubectl = cluster.kubectl();
    kubectl.arg(format!("--as={user}"));
    for group in groups {
        kubectl.arg(format!("--as-group={group}"));
    }
    kubectl.args(args);
    let out = output(kubectl, None);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `kubectl auth can-i VERB RESOURCE [-n NS] --as USER`: yes or no, never an error.
fn can(cluster: &Cluster, user: &str, verb: &str, resource: &str, namespace: Option<&str>) -> bool {
    let mut kubectl = cluster.kubectl();
    kubectl.args(["auth", "can-i", verb, resource, &format!("--as={user}")]);
    if let Some(ns) = namespace {
        kubectl.args(["-n", ns]);
    }
    let out = output(kubectl, None);
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        (answer == "yes") == out.status.success() && (answer == "yes" || answer == "no"),
        "kubectl auth can-i {verb} {resource} as {user}: {answer} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    answer == "yes"
}

/// A LoopbackPolicy in mode Enforce selecting nodes labelled `role=<name>` (there are none).
fn policy(name: &str) -> String {
    json!({
        "apiVersion": "loopguard.dev/v1alpha1",
        "kind": "LoopbackPolicy",
        "metadata": { "name": name },
        "spec": {
            "mode": "Enforce",
            "nodeSelector": { "matchLabels": { "role": name } },
            "ruleFamilies": { "nftables": "Enforce" },
        },
    })
    .to_string()
}

fn merge_patch(
    cluster: &Cluster,
    user: &str,
    groups: &[&str],
    name: &str,
    patch: Value,
) -> (bool, String) {
    as_user(
        cluster,
        user,
        groups,
        &[
            "patch",
            "loopbackpolicy",
            name,
            "--type=merge",
            "-p",
            &patch.to_string(),
        ],
    )
}

fn approval(by: &str, reason: &str) -> Value {
    json!({ "loopguard.dev/approved-by": by, "loopguard.dev/reason": reason })
}

#[tokio::test]
async fn roles_and_protection_hold_for_each_user() {
    let Some(cluster) = cluster::private("access") else {
        return;
    };
    cluster.install_crds();
    let client = cluster.client().await;
    let namespace = cluster.namespace(&client, "access").await;
    let release = unique_name("lgacc");
    let mut helm = Command::new(cluster.dir.join("bin/helm"));
    helm.args(["template", &release, CHART, "--namespace", &namespace])
        .args(["--show-only", "templates/user-roles.yaml"])
        .args(["--show-only", "templates/protection-policy.yaml"])
        .args(["--show-only", "templates/uninstall-hooks.yaml"])
        .args(["--set", "protection.enabled=true"])
        .args(["--set", "protection.approvers.users={dave}"])
        .args(["--set", "protection.approvers.groups={security-approvers}"])
        .args([
            "--set-json",
            r#"roles.auditors=[{"kind":"User","name":"carol","apiGroup":"rbac.authorization.k8s.io"}]"#,
        ]);
    let rendered = run(helm, None);
    // Everything but the hooks' Jobs: the uninstall hook's identity, as Helm creates it.
    let docs: Vec<Value> = serde_saphyr::from_multiple::<Value>(&rendered)
        .expect("rendered YAML")
        .into_iter()
        .filter(|d| d.is_object() && d["kind"] != "Job")
        .collect();
    let hook = docs
        .iter()
        .find(|d| d["kind"] == "ServiceAccount")
        .and_then(|d| d["metadata"]["name"].as_str())
        .expect("the uninstall hook's ServiceAccount")
        .to_owned();
    let objects = docs
        .iter()
        .map(|d| serde_json::to_string(d).unwrap())
        .collect::<Vec<_>>()
        .join("\n---\n");
    cluster.kubectl_ok(&["apply", "--server-side", "-f", "-"], Some(&objects));
    // Who holds what: alice the built-in view, bob, the approvers and another ServiceAccount of
    // the release's namespace the built-in edit (all cluster-wide), carol the auditor (through the
    // chart's roles.auditors), mallory nothing.
    let other_sa = format!("--serviceaccount={namespace}:default");
    for (binding, role, subject) in [
        ("access-alice", "view", "--user=alice"),
        ("access-bob", "edit", "--user=bob"),
        ("access-dave", "edit", "--user=dave"),
        ("access-approvers", "edit", "--group=security-approvers"),
        ("access-other-sa", "edit", other_sa.as_str()),
    ] {
        cluster.kubectl_ok(
            &[
                "create",
                "clusterrolebinding",
                binding,
                &format!("--clusterrole={role}"),
                subject,
            ],
            None,
        );
    }

    // --- roles -----------------------------------------------------------------------------------
    // Aggregation is done by the controller manager: wait until view carries loopguard's rules.
    eventually("the viewer aggregated into view", TIMEOUT, || async {
        (can(&cluster, "alice", "list", "loopbackpolicies", None)
            && can(&cluster, "bob", "delete", "loopbackpolicies", None))
        .then_some(())
    })
    .await;
    let expected: &[(&str, &str, &str, Option<&str>, bool)] = &[
        ("alice", "get", "loopbackpolicies", None, true),
        ("alice", "watch", "loopbacknodestates", None, true),
        ("alice", "create", "loopbackpolicies", None, false),
        ("alice", "delete", "loopbacknodestates", None, false),
        ("bob", "create", "loopbackpolicies", None, true),
        ("bob", "patch", "loopbackpolicies", None, true),
        ("bob", "list", "loopbacknodestates", None, true),
        ("bob", "create", "loopbackexceptions", None, true),
        ("alice", "list", "loopbackexceptions", None, true),
        ("alice", "create", "loopbackexceptions", None, false),
        ("carol", "get", "loopbackexceptions/status", None, true),
        ("carol", "delete", "loopbackexceptions", None, false),
        ("bob", "update", "loopbacknodestates", None, false),
        ("bob", "patch", "loopbacknodestates/status", None, false),
        ("carol", "list", "loopbackpolicies", None, true),
        ("carol", "get", "loopbackpolicies/status", None, true),
        ("carol", "list", "loopbacknodestates", None, true),
        (
            "carol",
            "list",
            "events.events.k8s.io",
            Some("default"),
            true,
        ),
        ("carol", "list", "events", Some("default"), true),
        ("carol", "get", "namespaces/kube-system", None, true),
        ("carol", "get", "namespaces/default", None, false),
        ("carol", "list", "namespaces", None, false),
        ("carol", "create", "loopbackpolicies", None, false),
        ("carol", "patch", "loopbacknodestates", None, false),
        ("carol", "list", "events", Some("kube-system"), false),
        ("carol", "list", "pods", Some(&namespace), false),
        ("carol", "get", "secrets", Some("default"), false),
        ("carol", "list", "nodes", None, false),
        ("mallory", "get", "loopbackpolicies", None, false),
        ("mallory", "list", "loopbacknodestates", None, false),
    ];
    let mut wrong = Vec::new();
    for (user, verb, resource, ns, allowed) in expected {
        if can(&cluster, user, verb, resource, *ns) != *allowed {
            wrong.push(format!(
                "{user} {} {verb} {resource}{}",
                if *allowed { "cannot" } else { "can" },
                ns.map(|n| format!(" in {n}")).unwrap_or_default()
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");

    // --- protection ------------------------------------------------------------------------------
    let vaps: Api<ValidatingAdmissionPolicy> = Api::all(client.clone());
    let vap = format!("{release}-loopguard-protection");
    let status = eventually("the protection policy's type check", TIMEOUT, || async {
        let policy = vaps.get(&vap).await.ok()?;
        let status = policy.status?;
        (status.observed_generation == policy.metadata.generation).then_some(status)
    })
    .await;
    let warnings = status
        .type_checking
        .and_then(|t| t.expression_warnings)
        .unwrap_or_default();
    assert!(warnings.is_empty(), "type-check warnings: {warnings:?}");

    let names: Vec<String> = ["p", "q", "r", "s"]
        .iter()
        .map(|n| unique_name(&format!("protect-{n}")))
        .collect();
    let [p, q, r, s] = [&names[0], &names[1], &names[2], &names[3]];
    for name in &names {
        cluster.kubectl_ok(&["create", "-f", "-"], Some(&policy(name)));
    }

    // The binding takes effect once the API server loaded it: bob's first refusal, waited for.
    let refused = eventually("bob refused switching p to Audit", TIMEOUT, || async {
        let (ok, text) = merge_patch(
            &cluster,
            "bob",
            &[],
            p,
            json!({ "spec": { "mode": "Audit" } }),
        );
        (!ok && text.contains("only an approver")).then_some(text)
    })
    .await;
    assert!(
        refused.contains(&format!("switch LoopbackPolicy {p} off"))
            && refused.contains("bob is not one")
            && refused.contains("break-glass"),
        "{refused}"
    );
    // Every way of switching it off, by an editor who is no approver: refused, with what to do,
    // even with the annotations written (they would name someone else).
    for (what, patch) in [
        (
            "another nodeSelector",
            json!({ "spec": { "nodeSelector": { "matchLabels": { "role": "none" } } } }),
        ),
        ("every node", json!({ "spec": { "nodeSelector": null } })),
        (
            "nftables off Enforce",
            json!({ "spec": { "ruleFamilies": { "nftables": "Report" } } }),
        ),
        (
            "Audit, annotated",
            json!({ "metadata": { "annotations": approval("bob", "CHG-1") }, "spec": { "mode": "Audit" } }),
        ),
    ] {
        let (ok, text) = merge_patch(&cluster, "bob", &[], p, patch);
        assert!(!ok && text.contains("only an approver"), "{what}: {text}");
    }
    let (ok, text) = as_user(&cluster, "bob", &[], &["delete", "loopbackpolicy", p]);
    assert!(
        !ok && text.contains(&format!(
            "delete LoopbackPolicy {p}, which is in mode Enforce"
        )),
        "{text}"
    );
    // What switches nothing off stays open to editors: the priority, other annotations.
    let (ok, text) = merge_patch(
        &cluster,
        "bob",
        &[],
        p,
        json!({ "spec": { "priority": 5 } }),
    );
    assert!(ok, "{text}");
    let (ok, text) = merge_patch(
        &cluster,
        "bob",
        &[],
        p,
        json!({ "metadata": { "annotations": { "team": "platform" } } }),
    );
    assert!(ok, "{text}");

    // An approver must write who and why, naming themself.
    let (ok, text) = merge_patch(
        &cluster,
        "dave",
        &[],
        p,
        json!({ "spec": { "mode": "Audit" } }),
    );
    assert!(
        !ok && text.contains("needs the annotations loopguard.dev/approved-by: dave"),
        "{text}"
    );
    let (ok, text) = merge_patch(
        &cluster,
        "dave",
        &[],
        p,
        json!({ "metadata": { "annotations": approval("bob", "CHG-2") }, "spec": { "mode": "Audit" } }),
    );
    assert!(!ok && text.contains("approved-by: dave"), "{text}");
    let (ok, text) = merge_patch(
        &cluster,
        "dave",
        &[],
        p,
        json!({ "metadata": { "annotations": approval("dave", "  ") }, "spec": { "mode": "Audit" } }),
    );
    assert!(!ok && text.contains("loopguard.dev/reason"), "{text}");
    let (ok, text) = merge_patch(
        &cluster,
        "dave",
        &[],
        p,
        json!({ "metadata": { "annotations": approval("dave", "CHG-3: pool moves to nftables") }, "spec": { "mode": "Audit" } }),
    );
    assert!(ok, "{text}");
    let mode = cluster.kubectl_ok(&["get", "lbp", p, "-o", "jsonpath={.spec.mode}"], None);
    assert_eq!(mode, "Audit");
    // Audit now: deleting it switches nothing off.
    let (ok, text) = as_user(&cluster, "bob", &[], &["delete", "loopbackpolicy", p]);
    assert!(ok, "{text}");

    // Deleting an Enforce policy: annotate first (anyone may write annotations), then delete, as
    // the approver named; a member of an approvers' group counts.
    let (ok, text) = as_user(
        &cluster,
        "erin",
        &["security-approvers"],
        &["delete", "loopbackpolicy", q],
    );
    assert!(
        !ok && text.contains("annotate it first, then delete it"),
        "{text}"
    );
    let (ok, text) = merge_patch(
        &cluster,
        "erin",
        &["security-approvers"],
        q,
        json!({ "metadata": { "annotations": approval("erin", "CHG-4: cluster retired") } }),
    );
    assert!(ok, "{text}");
    let (ok, text) = as_user(&cluster, "bob", &[], &["delete", "loopbackpolicy", q]);
    assert!(!ok && text.contains("bob is not one"), "{text}");
    let (ok, text) = as_user(
        &cluster,
        "erin",
        &["security-approvers"],
        &["delete", "loopbackpolicy", q],
    );
    assert!(ok, "{text}");

    // The approver's selector change, with the annotations in the same request.
    let (ok, text) = merge_patch(
        &cluster,
        "dave",
        &[],
        r,
        json!({
            "metadata": { "annotations": approval("dave", "CHG-5") },
            "spec": { "nodeSelector": { "matchLabels": { "role": "smaller" } } },
        }),
    );
    assert!(ok, "{text}");

    // The chart's uninstall hook deletes every policy, Enforce ones too, without annotations.
    let hook_user = format!("system:serviceaccount:{namespace}:{hook}");
    let (ok, text) = as_user(&cluster, &hook_user, &[], &["delete", "loopbackpolicy", s]);
    assert!(ok, "the uninstall hook: {text}");
    let gone = cluster.kubectl_ok(&["get", "lbp", "--ignore-not-found", "-o", "name", s], None);
    assert_eq!(gone.trim(), "", "the hook's delete went through");
    // ... and no other ServiceAccount of its namespace, with the same rights.
    let (ok, text) = as_user(
        &cluster,
        &format!("system:serviceaccount:{namespace}:default"),
        &[],
        &["delete", "loopbackpolicy", r],
    );
    assert!(!ok && text.contains("only an approver"), "{text}");
    // Not even a cluster admin who is no approver; break-glass for one is removing the binding
    // (an API call of its own in the audit log), after which the delete goes through.
    let mut admin = cluster.kubectl();
    admin.args(["delete", "loopbackpolicy", r]);
    let out = output(admin, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("only an approver"),
        "{stderr}"
    );
    cluster.kubectl_ok(&["delete", "validatingadmissionpolicybinding", &vap], None);
    eventually(
        "the admin's delete once the binding is gone",
        TIMEOUT,
        || async {
            let mut admin = cluster.kubectl();
            admin.args(["delete", "--ignore-not-found", "loopbackpolicy", r]);
            output(admin, None).status.success().then_some(())
        },
    )
    .await;
}

#[test]
fn protection_without_an_approver_fails_at_render() {
    let helm = match std::env::var_os("HELM") {
        Some(helm) => std::path::PathBuf::from(helm),
        None => {
            let out = Command::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/hack/build-control-plane.sh"
            ))
            .arg("--check")
            .output()
            .unwrap();
            let bin = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if !out.status.success() || bin.is_empty() {
                assert!(
                    std::env::var_os("LOOPGUARD_REQUIRE_CLUSTER").is_none(),
                    "no helm (set HELM or run hack/build-control-plane.sh)"
                );
                cluster::skipped("no helm");
                return;
            }
            std::path::PathBuf::from(bin).join("helm")
        }
    };
    let mut template = Command::new(helm);
    template.args(["template", "lg", CHART, "--set", "protection.enabled=true"]);
    let out = output(template, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("protection.enabled needs at least one approver"),
        "{stderr}"
    );
}
