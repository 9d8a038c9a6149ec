//! An upgrade from the previous release (hack/release/previous, built by hack/build-previous.sh:
//! its chart and its binary) to this one with `helm upgrade`, and `helm rollback` back, on hollow
//! nodes with a policy and node states in place: the CRDs move forward (the controller applies its
//! own, LoopbackException among them) and stay there on the rollback, every object stays readable,
//! the policy is Compliant on each side, and loopguard's rules never leave the nodes.

mod support;

use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use loopguard::api::{LoopbackException, LoopbackNodeState, LoopbackPolicy};
use loopguard_hollow::ImageMapping;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use support::cluster::{Cluster, eventually};
use support::deploy;

const NS: &str = "loopguard-system";
const PREVIOUS_IMAGE: &str = "ghcr.io/loopguard/loopguard-previous";
const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/loopguard");

/// The previous release's folder: `bin/loopguard` and `src/charts/loopguard`.
fn previous_release() -> PathBuf {
    let out = support::run(
        Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/hack/build-previous.sh"
        )),
        None,
    );
    PathBuf::from(out.lines().last().expect("the folder").trim())
}

fn crd_revision(cluster: &Cluster, crd: &str) -> Option<String> {
    let out = cluster
        .kubectl()
        .args(["get", "crd", crd, "-o"])
        .arg("jsonpath={.metadata.annotations.loopguard\\.dev/crd-revision}")
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The agent Pods' images, once every agent Pod runs `image` and is Ready.
async fn agents_run(client: &kube::Client, image: &str, nodes: usize) {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), NS);
    eventually(
        &format!("every agent on {image}"),
        Duration::from_secs(180),
        || async {
            let list = pods
                .list(&ListParams::default().labels(deploy::AGENT_SELECTOR))
                .await
                .ok()?;
            let on: Vec<_> = list
                .items
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter(|p| {
                    p.spec.as_ref().is_some_and(|s| {
                        s.containers[0]
                            .image
                            .as_deref()
                            .is_some_and(|i| i.starts_with(&format!("{image}:")))
                    })
                })
                .filter(|p| deploy::is_ready(p))
                .collect();
            (on.len() == nodes && list.items.len() == nodes).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_from_the_previous_release_and_a_rollback() {
    let Some(cluster) = support::cluster::private("upgrade") else {
        return;
    };
    let previous = previous_release();
    let mut options = deploy::iptables_hosts(&cluster, "upg", 2, ("loopguard.test/upgrade", "yes"));
    options.images.push(ImageMapping {
        repository: PREVIOUS_IMAGE.into(),
        binary: previous.join("bin/loopguard"),
    });
    let nodes = options.nodes.clone();
    let _hollow = cluster.start_nodes(options).await;
    let client = cluster.client().await;
    let common = [
        "--namespace",
        NS,
        "--wait",
        "--timeout",
        "5m",
        "--set",
        "controller.replicas=1",
        "--set",
        "controller.nodeSelector.loopguard\\.test/upgrade=yes",
        "--set",
        "agent.resync=2",
        "--set",
        "defaultPolicy.enabled=true",
        "--set",
        "defaultPolicy.spec.applicability=Always",
    ];

    // The previous release: its chart (its CRDs from its crds/), its binary.
    let previous_chart = previous.join("src/charts/loopguard");
    let mut install = vec![
        "install",
        deploy::RELEASE,
        previous_chart.to_str().unwrap(),
        "--create-namespace",
        "--set",
    ];
    let repository = format!("image.repository={PREVIOUS_IMAGE}");
    install.push(&repository);
    install.extend(common);
    deploy::helm(&cluster, &install);
    cluster.wait_compliant("default", "180s");
    agents_run(&client, PREVIOUS_IMAGE, nodes.len()).await;
    assert_eq!(
        crd_revision(&cluster, "loopbackexceptions.loopguard.dev"),
        None,
        "the previous release has no LoopbackException"
    );
    assert_eq!(
        crd_revision(&cluster, "loopbackpolicies.loopguard.dev").as_deref(),
        Some(""),
        "the previous release's CRDs carry no revision"
    );

    // helm upgrade to this version: the controller brings the CRDs forward; no moment without
    // the rules on any node.
    let sampler = deploy::PairSampler::start(nodes.clone(), Duration::from_millis(5));
    let mut upgrade = vec!["upgrade", deploy::RELEASE, CHART, "--reset-values"];
    upgrade.extend(common);
    deploy::helm(&cluster, &upgrade);
    agents_run(&client, deploy::IMAGE, nodes.len()).await;
    let revision = loopguard::api::CRD_REVISION.to_string();
    for crd in [
        "loopbackpolicies.loopguard.dev",
        "loopbacknodestates.loopguard.dev",
        "loopbackexceptions.loopguard.dev",
    ] {
        eventually(
            &format!("{crd} at revision {revision}"),
            Duration::from_secs(60),
            || async { (crd_revision(&cluster, crd).as_deref() == Some(&revision)).then_some(()) },
        )
        .await;
    }
    cluster.wait_established(&["loopbackexceptions.loopguard.dev"]);
    cluster.wait_compliant("default", "180s");
    // Every object readable by this version; the agents write the new fields (verdict history).
    let states: Api<LoopbackNodeState> = Api::all(client.clone());
    eventually(
        "every node state with its verdict history",
        Duration::from_secs(60),
        || async {
            let list = states.list(&ListParams::default()).await.ok()?;
            (list.items.len() == nodes.len()
                && list
                    .items
                    .iter()
                    .all(|s| s.status.as_ref().is_some_and(|s| s.verdict_since.is_some())))
            .then_some(())
        },
    )
    .await;
    let policies: Api<LoopbackPolicy> = Api::all(client.clone());
    assert_eq!(
        policies
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    let now = jiff::Timestamp::now();
    let exception: LoopbackException = serde_json::from_value(serde_json::json!({
        "apiVersion": "loopguard.dev/v1alpha1", "kind": "LoopbackException",
        "metadata": {"name": "after-upgrade"},
        "spec": {
            "nodeNames": [nodes[0]], "ruleIds": ["set_ipv6_loopback_traffic"],
            "justification": "created on the upgraded CRDs", "approvedBy": "Jane Auditor",
            "approvedAt": now.to_string(), "ticket": "CHG-9",
            "expires": (now + jiff::SignedDuration::from_hours(24)).to_string(),
        },
    }))
    .unwrap();
    Api::<LoopbackException>::all(client.clone())
        .create(&PostParams::default(), &exception)
        .await
        .expect("the upgraded CRDs serve LoopbackException");

    // helm rollback: the previous release's Pods again; the CRDs stay at this revision, and the
    // previous version reads every object and keeps the policy Compliant.
    deploy::helm(
        &cluster,
        &[
            "rollback",
            deploy::RELEASE,
            "1",
            "--namespace",
            NS,
            "--wait",
            "--timeout",
            "5m",
        ],
    );
    agents_run(&client, PREVIOUS_IMAGE, nodes.len()).await;
    // The previous controller writes the policy's status again (its own leader), Compliant.
    let generation = policies.get("default").await.unwrap().metadata.generation;
    eventually(
        "the rolled-back controller's status",
        Duration::from_secs(120),
        || async {
            let p = policies.get("default").await.ok()?;
            let s = p.status?;
            (s.observed_generation == generation
                && s.conditions.iter().any(|c| {
                    c.type_ == "Compliant" && c.status == loopguard::api::ConditionStatus::True
                }))
            .then_some(())
        },
    )
    .await;
    cluster.wait_compliant("default", "180s");
    assert_eq!(
        crd_revision(&cluster, "loopbackexceptions.loopguard.dev").as_deref(),
        Some(revision.as_str()),
        "a rollback never moves the CRDs back"
    );
    assert!(
        Api::<LoopbackException>::all(client.clone())
            .get("after-upgrade")
            .await
            .is_ok(),
        "the exception written on the upgraded CRDs is still there"
    );
    let states_now = states.list(&ListParams::default()).await.unwrap();
    assert_eq!(states_now.items.len(), nodes.len());
    for s in &states_now.items {
        assert!(s.status.is_some(), "{}", s.name_any());
    }
    let (samples, without) = sampler.finish();
    println!(
        "upgrade and rollback: {samples} reads of INPUT on {} nodes, {without} without loopguard's pair",
        nodes.len()
    );
    assert!(samples > 100, "{samples} samples");
    assert_eq!(without, 0, "a moment without the rules");
}
