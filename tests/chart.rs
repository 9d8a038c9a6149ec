//! The Helm chart, the plain manifests and the image recipe: the chart lints clean and rejects a
//! misspelt value, carries the generated CRDs and the product's version, passes only flags the binary
//! knows, is accepted by a real API server, its admission policy confines each agent to its own node,
//! and installed on hollow nodes it makes a policy Compliant; deploy/loopguard.yaml is the chart's
//! current rendering.
//!
//! Every install uses its own release name and namespace, so cluster-scoped objects never collide.

mod support;

use k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use loopguard::api::{LoopbackNodeState, LoopbackPolicy};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use support::cluster::{self, Cluster, delete_namespace, eventually, unique_name};
use support::deploy::{self, BIN, IMAGE};
use support::{output, run};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/loopguard");
const TIMEOUT: Duration = Duration::from_secs(120);

// --- helpers ---------------------------------------------------------------------------------------------

/// helm: `$HELM`, else the one `hack/build-control-plane.sh` built (no cluster needed).
fn helm_path() -> Option<&'static PathBuf> {
    static HELM: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    HELM.get_or_init(|| {
        if let Some(helm) = std::env::var_os("HELM") {
            return Some(PathBuf::from(helm));
        }
        let out = Command::new(format!("{REPO}/hack/build-control-plane.sh"))
            .arg("--check")
            .output()
            .ok()?;
        let bin = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !bin.is_empty()).then(|| PathBuf::from(bin).join("helm"))
    })
    .as_ref()
}

/// Whether helm is there; without it a test prints its own SKIPPED line, and under
/// `LOOPGUARD_REQUIRE_CLUSTER` (CI) it fails instead.
fn helm_ready() -> bool {
    if helm_path().is_some() {
        return true;
    }
    let test = std::thread::current().name().unwrap_or("?").to_string();
    assert!(
        std::env::var_os("LOOPGUARD_REQUIRE_CLUSTER").is_none(),
        "{test}: no helm (set HELM or run hack/build-control-plane.sh)"
    );
    eprintln!("SKIPPED {test}: no helm (set HELM or run hack/build-control-plane.sh)");
    false
}

fn helm() -> Command {
    Command::new(helm_path().expect("helm_ready() was checked"))
}

/// `helm template RELEASE charts/loopguard --namespace NAMESPACE EXTRA...`.
fn template(release: &str, namespace: &str, extra: &[&str]) -> String {
    let mut helm = helm();
    helm.args(["template", release, CHART, "--namespace", namespace])
        .args(extra);
    run(helm, None)
}

/// The objects of a multi-document YAML stream (empty documents dropped).
fn documents(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .expect("rendered YAML parses")
        .into_iter()
        .filter(|doc| doc.is_object())
        .collect()
}

fn kinds(docs: &[Value]) -> BTreeSet<String> {
    docs.iter()
        .filter_map(|d| d["kind"].as_str().map(str::to_owned))
        .collect()
}

/// Writes `values` (JSON is YAML) to a file for `helm template -f`.
fn values_file(cluster: &Cluster, values: &Value) -> PathBuf {
    let path = cluster
        .dir
        .join(format!("{}.values.json", unique_name("chart")));
    std::fs::write(&path, serde_json::to_vec_pretty(values).expect("json")).expect("values file");
    path
}

/// The `Compliant` condition's status of a policy, if any.
fn compliant(policy: &LoopbackPolicy) -> Option<String> {
    let value = serde_json::to_value(policy.status.as_ref()?).ok()?;
    value["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Compliant")
        .and_then(|c| c["status"].as_str().map(str::to_owned))
}

// --- without a cluster -----------------------------------------------------------------------------------

#[test]
fn chart_crds_are_the_generated_crds() {
    let generated: Vec<(String, String)> = loopguard::api::crd_documents();
    let chart_dir = Path::new(CHART).join("crds");
    let mut in_chart: Vec<String> = std::fs::read_dir(&chart_dir)
        .expect("charts/loopguard/crds")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    in_chart.sort();
    let mut names: Vec<String> = generated.iter().map(|(name, _)| name.clone()).collect();
    names.sort();
    assert_eq!(
        in_chart, names,
        "charts/loopguard/crds holds exactly the generated CRDs"
    );
    for (name, yaml) in &generated {
        let top = std::fs::read_to_string(Path::new(REPO).join("crds").join(name)).expect("crds/");
        let chart = std::fs::read_to_string(chart_dir.join(name)).expect("chart crd");
        assert_eq!(
            &top, yaml,
            "crds/{name} is stale: run `loopguard crd --write crds/`"
        );
        assert_eq!(
            chart, top,
            "charts/loopguard/crds/{name} differs from crds/{name}: cp crds/*.yaml charts/loopguard/crds/"
        );
    }
}

#[test]
fn chart_and_image_carry_the_product_version() {
    let version = env!("CARGO_PKG_VERSION");
    let chart = std::fs::read_to_string(Path::new(CHART).join("Chart.yaml")).expect("Chart.yaml");
    let chart: Value = serde_saphyr::from_str(&chart).expect("Chart.yaml parses");
    assert_eq!(
        chart["appVersion"], version,
        "Chart.yaml appVersion follows Cargo.toml"
    );
    let dockerfile =
        std::fs::read_to_string(Path::new(REPO).join("Dockerfile")).expect("Dockerfile");
    assert!(
        dockerfile
            .lines()
            .any(|l| l.trim() == format!("ARG VERSION={version}")),
        "the Dockerfile's `ARG VERSION=` follows Cargo.toml ({version})"
    );
    // Artifact Hub: the image it lists is this version's, and the chart ships the licence it names.
    let images: Value = serde_saphyr::from_str(
        chart["annotations"]["artifacthub.io/images"]
            .as_str()
            .expect("artifacthub.io/images"),
    )
    .expect("artifacthub.io/images parses");
    assert_eq!(
        images[0]["image"],
        format!("ghcr.io/loopguard/loopguard:{version}")
    );
    assert_eq!(
        chart["annotations"]["artifacthub.io/license"],
        env!("CARGO_PKG_LICENSE")
    );
    let license = std::fs::read_to_string(Path::new(REPO).join("LICENSE")).expect("LICENSE");
    assert!(license.contains("Apache License") && license.contains("Version 2.0"));
    assert_eq!(
        std::fs::read_to_string(Path::new(CHART).join("LICENSE")).expect("the chart's LICENSE"),
        license,
        "charts/loopguard/LICENSE is a copy of LICENSE"
    );
}

/// The values a platform team sets on a real cluster reach the objects: labels on every object,
/// environment and volumes on both components, ServiceAccount annotations, the priority-class quota.
#[test]
fn platform_values_reach_every_object() {
    if !helm_ready() {
        return;
    }
    let mut sets: Vec<String> = [
        "commonLabels.team=platform-security",
        "agent.priorityClassQuota.enabled=true",
        "prometheusRule.enabled=true",
        "serviceMonitor.enabled=true",
        "grafanaDashboard.enabled=true",
        "defaultPolicy.enabled=true",
    ]
    .map(String::from)
    .to_vec();
    for c in ["controller", "agent"] {
        sets.extend([
            format!("{c}.extraEnv[0].name=HTTPS_PROXY"),
            format!("{c}.extraEnv[0].value=http://proxy:3128"),
            format!("{c}.extraVolumes[0].name=ca"),
            format!("{c}.extraVolumes[0].configMap.name=corp-ca"),
            format!("{c}.extraVolumeMounts[0].name=ca"),
            format!("{c}.extraVolumeMounts[0].mountPath=/etc/corp-ca"),
            format!("{c}.serviceAccount.annotations.iam\\.example/role={c}"),
        ]);
    }
    let args: Vec<&str> = sets.iter().flat_map(|s| ["--set", s.as_str()]).collect();
    let rendered = template("lgvals", "loopguard-system", &args);
    let docs = documents(&rendered);
    assert!(docs.len() > 20, "{} objects", docs.len());
    for doc in &docs {
        assert_eq!(
            doc["metadata"]["labels"]["team"], "platform-security",
            "{} {} lacks commonLabels",
            doc["kind"], doc["metadata"]["name"]
        );
    }
    for kind in ["Deployment", "DaemonSet"] {
        let workload = docs.iter().find(|d| d["kind"] == kind).expect(kind);
        let pod = &workload["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        assert!(
            container["env"]
                .as_array()
                .expect("env")
                .iter()
                .any(|e| e["name"] == "HTTPS_PROXY" && e["value"] == "http://proxy:3128"),
            "{kind}: {}",
            container["env"]
        );
        assert!(
            container["volumeMounts"]
                .as_array()
                .expect("mounts")
                .iter()
                .any(|m| m["name"] == "ca" && m["mountPath"] == "/etc/corp-ca"),
            "{kind}"
        );
        assert!(
            pod["volumes"]
                .as_array()
                .expect("volumes")
                .iter()
                .any(|v| v["name"] == "ca" && v["configMap"]["name"] == "corp-ca"),
            "{kind}"
        );
    }
    let accounts: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ServiceAccount")
        .filter(|d| d["metadata"]["annotations"]["iam.example/role"].is_string())
        .collect();
    assert_eq!(
        accounts
            .iter()
            .map(|a| a["metadata"]["annotations"]["iam.example/role"]
                .as_str()
                .unwrap())
            .collect::<BTreeSet<_>>(),
        BTreeSet::from(["agent", "controller"])
    );
    let quota = docs
        .iter()
        .find(|d| d["kind"] == "ResourceQuota")
        .expect("the priority-class quota");
    assert_eq!(
        quota["spec"]["scopeSelector"]["matchExpressions"][0]["values"][0],
        "system-node-critical"
    );
    assert_eq!(quota["metadata"]["namespace"], "loopguard-system");
}

/// The values users reach for, each where it belongs: per-component security contexts (the UID
/// left to the platform with null), topology spread, the PDB's minAvailable, the DaemonSet's whole
/// updateStrategy, the image registry (the chart's, a global one, one inside the repository), and
/// the metrics bind address; misuse fails with a message.
#[test]
fn the_values_users_expect_reach_their_objects() {
    if !helm_ready() {
        return;
    }
    let render = |sets: &[&str]| -> Vec<Value> {
        let args: Vec<&str> = sets.iter().flat_map(|s| ["--set", *s]).collect();
        documents(&template("lgv", "loopguard-system", &args))
    };
    let find = |docs: &[Value], kind: &str| -> Value {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .cloned()
            .expect(kind)
    };
    let docs = render(&[
        "controller.podSecurityContext.runAsUser=null",
        "controller.podSecurityContext.runAsGroup=null",
        "controller.containerSecurityContext.runAsUser=null",
        "controller.containerSecurityContext.runAsGroup=null",
        "controller.topologySpreadConstraints[0].maxSkew=1",
        "controller.topologySpreadConstraints[0].topologyKey=topology.kubernetes.io/zone",
        "controller.topologySpreadConstraints[0].whenUnsatisfiable=ScheduleAnyway",
        "controller.podDisruptionBudget.minAvailable=1",
        "controller.podDisruptionBudget.maxUnavailable=null",
        "controller.metricsBindAddress=::",
        "agent.updateStrategy.type=RollingUpdate",
        "agent.updateStrategy.rollingUpdate.maxUnavailable=0",
        "agent.updateStrategy.rollingUpdate.maxSurge=1",
        "agent.metricsBindAddress=10.0.0.1",
        "agent.ufw.enforce=true",
        "agent.podSecurityContext.seccompProfile.type=Localhost",
        "agent.podSecurityContext.seccompProfile.localhostProfile=loopguard.json",
        "global.imageRegistry=mirror.example:5000",
        "evidence.enabled=true",
        "uninstallHooks.enabled=true",
    ]);
    let deployment = find(&docs, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    assert!(
        pod["securityContext"].get("runAsUser").is_none(),
        "{}",
        pod["securityContext"]
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    assert!(container["securityContext"].get("runAsUser").is_none());
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        pod["topologySpreadConstraints"][0]["topologyKey"],
        "topology.kubernetes.io/zone"
    );
    assert_eq!(
        container["image"],
        "mirror.example:5000/loopguard/loopguard:0.1.0"
    );
    assert!(
        container["args"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "--metrics-addr=[::]:8080"),
        "{}",
        container["args"]
    );
    let pdb = find(&docs, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert!(pdb["spec"].get("maxUnavailable").is_none());
    // The Pods that run as the controller does follow its security contexts.
    for (kind, pod) in docs.iter().filter_map(|d| match d["kind"].as_str() {
        Some("Job") => Some(("Job", &d["spec"]["template"]["spec"])),
        Some("CronJob") => Some((
            "CronJob",
            &d["spec"]["jobTemplate"]["spec"]["template"]["spec"],
        )),
        _ => None,
    }) {
        assert!(
            pod["securityContext"].get("runAsUser").is_none(),
            "{kind}: {}",
            pod["securityContext"]
        );
        assert!(
            pod["containers"][0]["securityContext"]
                .get("runAsUser")
                .is_none(),
            "{kind}"
        );
    }
    let daemonset = find(&docs, "DaemonSet");
    let spec = &daemonset["spec"];
    assert_eq!(spec["updateStrategy"]["rollingUpdate"]["maxSurge"], 1);
    assert_eq!(spec["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 0);
    let agent = &spec["template"]["spec"]["containers"][0];
    assert_eq!(
        spec["template"]["spec"]["securityContext"]["seccompProfile"]["type"],
        "Localhost"
    );
    let caps: Vec<&str> = agent["securityContext"]["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(
        caps,
        ["NET_ADMIN", "NET_RAW", "SYS_CHROOT"],
        "ufw.enforce adds SYS_CHROOT"
    );
    assert!(
        agent["args"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "--metrics-addr=10.0.0.1:9742")
    );
    assert_eq!(
        agent["image"],
        "mirror.example:5000/loopguard/loopguard:0.1.0"
    );

    // The image: the chart's registry by default, none, or one the repository names itself.
    let image = |sets: &[&str]| {
        find(&render(sets), "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["image"]
            .clone()
    };
    assert_eq!(image(&[]), "ghcr.io/loopguard/loopguard:0.1.0");
    assert_eq!(
        image(&["image.registry=registry.example"]),
        "registry.example/loopguard/loopguard:0.1.0"
    );
    assert_eq!(
        image(&["image.repository=registry.example/sec/loopguard"]),
        "registry.example/sec/loopguard:0.1.0"
    );
    assert_eq!(image(&["image.registry="]), "loopguard/loopguard:0.1.0");

    // Misuse: both PDB fields, an address that is not one.
    for (set, says) in [
        ("controller.podDisruptionBudget.minAvailable=1", "not both"),
        ("agent.metricsBindAddress=node-ip", "metricsBindAddress"),
        ("agent.updateStrategy.type=Recreate", "updateStrategy"),
    ] {
        let mut helm = helm();
        helm.args(["template", "lgv", CHART, "--set", set]);
        let out = helm.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(says),
            "{set}: {stderr}"
        );
    }
}

/// Installing into a namespace whose Pod Security level would reject the agent fails at once,
/// saying how to fix it, instead of leaving a DaemonSet that never creates a pod.
#[tokio::test]
async fn a_namespace_that_rejects_privileged_pods_fails_the_install() {
    let Some(cluster) = cluster::shared() else {
        return;
    };
    cluster.install_crds();
    let client = cluster.client().await;
    let namespace = cluster.namespace(&client, "chart-psa").await;
    let kubeconfig = cluster.kubeconfig();
    let install = |extra: &[&str]| {
        let mut helm = helm();
        helm.arg("--kubeconfig")
            .arg(&kubeconfig)
            .args([
                "install",
                "lgpsa",
                CHART,
                "--dry-run=server",
                "--namespace",
                &namespace,
            ])
            .args(extra);
        output(helm, None)
    };
    let label = |level: &str| {
        cluster.kubectl_ok(
            &[
                "label",
                "namespace",
                &namespace,
                &format!("pod-security.kubernetes.io/enforce={level}"),
                "--overwrite",
            ],
            None,
        );
    };

    let out = install(&[]);
    assert!(
        out.status.success(),
        "no Pod Security label: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for level in ["baseline", "restricted"] {
        label(level);
        let out = install(&[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "enforce={level} was accepted");
        assert!(
            stderr.contains(&format!("enforces Pod Security \"{level}\""))
                && stderr.contains(&format!(
                    "kubectl label namespace {namespace} pod-security.kubernetes.io/enforce=privileged"
                )),
            "{stderr}"
        );
        let out = install(&["--set", "podSecurity.skipCheck=true"]);
        assert!(
            out.status.success(),
            "skipCheck: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    label("privileged");
    let out = install(&[]);
    assert!(
        out.status.success(),
        "enforce=privileged: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    delete_namespace(&client, &namespace).await;
}

/// Every value in values.yaml has a row in the chart README's table (or a parent key has).
#[test]
fn every_value_is_documented_in_the_chart_readme() {
    let values = std::fs::read_to_string(Path::new(CHART).join("values.yaml")).expect("values");
    let values: Value = serde_saphyr::from_str(&values).expect("values.yaml parses");
    let readme = std::fs::read_to_string(Path::new(CHART).join("README.md")).expect("README");
    let mut leaves = Vec::new();
    collect_leaves(&values, String::new(), &mut leaves);
    assert!(leaves.len() > 20, "values.yaml walked: {leaves:?}");
    let undocumented: Vec<&String> = leaves
        .iter()
        .filter(|path| {
            let parts: Vec<&str> = path.split('.').collect();
            !(1..=parts.len()).any(|n| readme.contains(&format!("`{}`", parts[..n].join("."))))
        })
        .collect();
    assert!(
        undocumented.is_empty(),
        "values without a row in charts/loopguard/README.md: {undocumented:?}"
    );
}

fn collect_leaves(value: &Value, path: String, out: &mut Vec<String>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, child) in map {
                let child_path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                collect_leaves(child, child_path, out);
            }
        }
        _ => out.push(path),
    }
}

/// The agent container's privileges as deploy/loopguard.yaml grants them (uid 0, only the added
/// capabilities, no privilege escalation) are enough for iptables with both backends. Hollow nodes ignore
/// securityContext, so this checks it on the kernel: `setpriv` drops every other capability from the
/// bounding set before `loopguard node enforce` runs in a fresh network namespace. Without NET_RAW the
/// legacy backend fails, which is why the chart adds it.
#[test]
fn the_agents_capabilities_suffice_for_both_backends() {
    let manifest = std::fs::read_to_string(Path::new(REPO).join("deploy/loopguard.yaml"))
        .expect("deploy/loopguard.yaml");
    let daemonset = documents(&manifest)
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("the agent DaemonSet");
    let security = &daemonset["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(security["runAsUser"], 0, "{security}");
    assert_eq!(security["allowPrivilegeEscalation"], false, "{security}");
    assert_eq!(security["privileged"], false, "{security}");
    assert_eq!(
        security["capabilities"]["drop"],
        json!(["ALL"]),
        "{security}"
    );
    let added: Vec<String> = security["capabilities"]["add"]
        .as_array()
        .expect("added capabilities")
        .iter()
        .map(|c| c.as_str().expect("capability").to_lowercase())
        .collect();
    assert_eq!(added, ["net_admin", "net_raw"]);

    let enforce = |capabilities: &[String], backend: &str| -> Output {
        let ns = support::netns::TestNetns::new("caps");
        let state = tempfile::tempdir().expect("tempdir");
        let state_file = state.path().join("state.json");
        let bounding: String = capabilities.iter().map(|c| format!(",+{c}")).collect();
        ns.exec(&[
            "setpriv",
            &format!("--bounding-set=-all{bounding}"),
            "--inh-caps=-all",
            "--no-new-privs",
            "--",
            BIN,
            "node",
            "enforce",
            "--backend",
            backend,
            "--applicability",
            "always",
            // This machine has nftables installed: its rule applies, and nft must work with
            // the same capabilities.
            "--nftables",
            "enforce",
            "--state-file",
            state_file.to_str().expect("path"),
        ])
    };
    for backend in ["nft", "legacy"] {
        let out = enforce(&added, backend);
        assert!(
            out.status.success(),
            "{backend} with {added:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("result:     COMPLIANT"), "{stdout}");
        assert!(
            stdout.contains("nftables:   create table inet loopguard"),
            "nft wrote loopguard's table with these capabilities: {stdout}"
        );
    }
    let out = enforce(&["net_admin".to_owned()], "legacy");
    assert!(
        !out.status.success(),
        "the legacy backend needs NET_RAW as well"
    );
}

/// The host's files reach the agent through one read-only mount of the host's root, which exists on
/// every node, so that the kubelet and the container runtime create nothing on a host that lacks
/// one of them (a missing hostPath source becomes an empty folder with `DirectoryOrCreate`, and
/// with type `""` under containerd, CRI-O and Docker). The only paths the chart may create are
/// loopguard's own: its state folder and the xtables lock every iptables user shares. Only
/// `agent.ufw.enforce` makes the root writable and adds CAP_SYS_CHROOT.
#[test]
fn the_host_root_is_read_only_and_nothing_else_is_created_unless_ufw_enforce() {
    if !helm_ready() {
        return;
    }
    let daemonset = |extra: &[&str]| {
        documents(&template("lg", "loopguard-system", extra))
            .into_iter()
            .find(|d| d["kind"] == "DaemonSet")
            .expect("the agent DaemonSet")
    };
    let added = |d: &Value| {
        d["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
            .clone()
    };
    let host_paths = |d: &Value| -> Vec<(String, String)> {
        d["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["hostPath"].is_object())
            .map(|v| {
                (
                    v["hostPath"]["path"].as_str().unwrap().to_string(),
                    v["hostPath"]["type"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    };
    let root_mount = |d: &Value| -> Value {
        d["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == "/host")
            .cloned()
            .expect("a mount at /host")
    };
    let stock = daemonset(&[]);
    assert_eq!(added(&stock), json!(["NET_ADMIN", "NET_RAW"]));
    assert_eq!(
        host_paths(&stock),
        [
            ("/run/xtables.lock".into(), "FileOrCreate".into()),
            ("/var/lib/loopguard".into(), "DirectoryOrCreate".into()),
            ("/".into(), "Directory".into()),
        ],
        "every hostPath either loopguard's own or one that exists on every node"
    );
    assert_eq!(root_mount(&stock)["readOnly"], json!(true));
    assert_eq!(root_mount(&stock)["recursiveReadOnly"], json!("IfPossible"));
    let ufw = daemonset(&["--set", "agent.ufw.enforce=true"]);
    assert_eq!(added(&ufw), json!(["NET_ADMIN", "NET_RAW", "SYS_CHROOT"]));
    assert_eq!(host_paths(&ufw), host_paths(&stock));
    assert!(root_mount(&ufw).get("readOnly").is_none(), "{ufw}");
}

/// The ServiceMonitor scrapes a named port of both components' metrics Services, whose target
/// port is a named container port of the pods they select; the PodMonitor selects both
/// components' pods and names one of their container ports.
#[test]
fn the_monitors_scrape_a_named_port_of_both_components() {
    if !helm_ready() {
        return;
    }
    let subset = |selector: &Value, labels: &Value| {
        selector
            .as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    };
    let container_ports = |workload: &Value| -> Vec<String> {
        workload["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| p["name"].as_str().map(String::from))
            .collect()
    };
    for kind in ["ServiceMonitor", "PodMonitor"] {
        let docs = documents(&template(
            "lg",
            "loopguard-system",
            &[
                "--set",
                "serviceMonitor.enabled=true",
                "--set",
                &format!("serviceMonitor.kind={kind}"),
            ],
        ));
        let monitor = docs
            .iter()
            .find(|d| d["kind"] == kind)
            .expect("the monitor");
        let selector = &monitor["spec"]["selector"]["matchLabels"];
        let endpoints = if kind == "ServiceMonitor" {
            &monitor["spec"]["endpoints"]
        } else {
            &monitor["spec"]["podMetricsEndpoints"]
        };
        let port = endpoints[0]["port"].as_str().expect("a named port");
        let workloads: Vec<&Value> = docs
            .iter()
            .filter(|d| d["kind"] == "Deployment" || d["kind"] == "DaemonSet")
            .collect();
        assert_eq!(workloads.len(), 2, "controller and agent");
        if kind == "ServiceMonitor" {
            let services: Vec<&Value> = docs
                .iter()
                .filter(|d| d["kind"] == "Service" && subset(selector, &d["metadata"]["labels"]))
                .collect();
            assert_eq!(services.len(), 2, "both metrics Services: {selector}");
            for service in services {
                let service_port = service["spec"]["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|p| p["name"] == port)
                    .unwrap_or_else(|| {
                        panic!("{} has no port {port}", service["metadata"]["name"])
                    });
                let target = service_port["targetPort"]
                    .as_str()
                    .expect("a named target port");
                let pods = workloads
                    .iter()
                    .find(|w| {
                        subset(
                            &service["spec"]["selector"],
                            &w["spec"]["template"]["metadata"]["labels"],
                        )
                    })
                    .expect("the Service selects a workload's pods");
                assert!(
                    container_ports(pods).contains(&target.to_string()),
                    "{target}"
                );
            }
        } else {
            for workload in &workloads {
                assert!(subset(
                    selector,
                    &workload["spec"]["template"]["metadata"]["labels"]
                ));
                assert!(
                    container_ports(workload).contains(&port.to_string()),
                    "{port}"
                );
            }
        }
    }
}

// --- helm ------------------------------------------------------------------------------------------------

#[test]
fn helm_lint_is_clean() {
    if !helm_ready() {
        return;
    }
    for sets in [
        &[][..],
        &[
            "--set",
            "serviceMonitor.enabled=true",
            "--set",
            "defaultPolicy.enabled=true",
        ][..],
    ] {
        let mut lint = helm();
        lint.args(["lint", "--strict", CHART]).args(sets);
        let out = run(lint, None);
        assert!(out.contains("0 chart(s) failed"), "{out}");
        assert!(!out.contains("[WARNING]"), "{out}");
    }
}

#[test]
fn a_misspelt_or_mistyped_value_fails_at_install() {
    if !helm_ready() {
        return;
    }
    for (set, expect) in [
        ("controler.replicas=3", "controler"),
        ("agent.backend=iptables", "agent/backend"),
        ("controller.replicas=two", "controller/replicas"),
        (
            "defaultPolicy.spec.mode=Enforcing",
            "defaultPolicy/spec/mode",
        ),
    ] {
        let mut helm = helm();
        helm.args(["template", "loopguard", CHART, "--set", set]);
        let out = output(helm, None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--set {set} was accepted");
        assert!(
            stderr.contains("schema") && stderr.contains(expect),
            "--set {set}: {stderr}"
        );
    }
}

#[test]
fn deploy_manifest_is_the_current_rendering() {
    if !helm_ready() {
        return;
    }
    let mut render = Command::new(format!("{REPO}/hack/render-manifests.sh"));
    render
        .arg("--stdout")
        .env("HELM", helm_path().expect("helm_ready() was checked"));
    let fresh = run(render, None);
    let committed = std::fs::read_to_string(Path::new(REPO).join("deploy/loopguard.yaml"))
        .expect("deploy/loopguard.yaml");
    assert!(
        fresh == committed,
        "deploy/loopguard.yaml is stale: run hack/render-manifests.sh"
    );
    let docs = documents(&committed);
    let kinds = kinds(&docs);
    for kind in [
        "Namespace",
        "CustomResourceDefinition",
        "Deployment",
        "DaemonSet",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ] {
        assert!(
            kinds.contains(kind),
            "deploy/loopguard.yaml has a {kind}: {kinds:?}"
        );
    }
    assert_eq!(
        docs[0]["kind"], "Namespace",
        "the Namespace comes first, before what lives in it"
    );
}

/// The flags the chart passes parse with the binary they are for (`--help` last: clap reads
/// everything before it, so an unknown flag or a bad value fails first).
#[test]
fn the_chart_passes_only_flags_the_binary_knows() {
    if !helm_ready() {
        return;
    }
    let rendered = template(
        "loopguard",
        "loopguard-system",
        &["--set", "evidence.enabled=true"],
    );
    let mut seen = BTreeSet::new();
    for doc in documents(&rendered) {
        let pod = match doc["kind"].as_str() {
            Some("Deployment" | "DaemonSet") => &doc["spec"]["template"]["spec"],
            Some("CronJob") => &doc["spec"]["jobTemplate"]["spec"]["template"]["spec"],
            _ => continue,
        };
        for container in pod["containers"].as_array().expect("containers") {
            assert!(
                container["image"]
                    .as_str()
                    .is_some_and(|i| i.starts_with(&format!("{IMAGE}:"))),
                "{container}"
            );
            let args: Vec<&str> = container["args"]
                .as_array()
                .expect("args")
                .iter()
                .map(|a| a.as_str().expect("string arg"))
                .collect();
            // Every flag as the chart writes it, `$(VAR)` expanded as the kubelet does (from the
            // container's env, the downward API's fields given sample values), parsed by the
            // binary (`--help` last stops it before it runs).
            let mut vars: Vec<(String, String)> = Vec::new();
            for env in container["env"].as_array().into_iter().flatten() {
                let value = match env["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                    Some("status.hostIP" | "status.podIP") => "10.0.0.5".to_string(),
                    Some(_) => "sample".to_string(),
                    None => env["value"].as_str().unwrap_or_default().to_string(),
                };
                vars.push((env["name"].as_str().unwrap().to_string(), value));
            }
            let args: Vec<String> = args
                .iter()
                .map(|a| {
                    vars.iter()
                        .fold(a.to_string(), |a, (k, v)| a.replace(&format!("$({k})"), v))
                })
                .collect();
            assert!(
                args.iter().all(|a| !a.contains("$(")),
                "a variable the container does not define: {args:?}"
            );
            let mut command = Command::new(BIN);
            command.args(&args).arg("--help");
            run(command, None);
            seen.insert(args[0].to_owned());
        }
    }
    assert_eq!(
        seen,
        BTreeSet::from(["agent".into(), "controller".into(), "report".into()])
    );
}

/// Runs the Argo CD health check of deploy/argocd/ (Lua, as Argo CD runs it: `obj` is the object)
/// on a LoopbackPolicy and returns its status and message.
fn argo_cd_health(policy: &Value) -> (String, String) {
    let file =
        std::fs::read_to_string(Path::new(REPO).join("deploy/argocd/loopbackpolicy-health.yaml"))
            .expect("deploy/argocd/loopbackpolicy-health.yaml");
    let doc: Value = serde_saphyr::from_str(&file).expect("YAML");
    let script = doc["data"]["resource.customizations.health.loopguard.dev_LoopbackPolicy"]
        .as_str()
        .expect("the health check's key");
    let lua = mlua::Lua::new();
    use mlua::LuaSerdeExt;
    lua.globals()
        .set("obj", lua.to_value(policy).unwrap())
        .unwrap();
    let hs: mlua::Table = lua.load(script).eval().expect("the check runs");
    (
        hs.get::<String>("status").unwrap(),
        hs.get::<String>("message").unwrap_or_default(),
    )
}

#[test]
fn the_argo_cd_health_check_reads_the_conditions() {
    let with =
        |conditions: Value| json!({"kind": "LoopbackPolicy", "status": {"conditions": conditions}});
    let cond = |t: &str, s: &str, m: &str| json!({"type": t, "status": s, "message": m});
    assert_eq!(
        argo_cd_health(&json!({"kind": "LoopbackPolicy"})).0,
        "Progressing",
        "no status yet"
    );
    assert_eq!(
        argo_cd_health(&with(json!([
            cond("Ready", "False", "2/3 verified"),
            cond("Stalled", "False", "")
        ]))),
        (
            "Progressing".into(),
            "waiting for the nodes to report".into()
        )
    );
    assert_eq!(
        argo_cd_health(&with(json!([
            cond("Ready", "True", "3/3 verified"),
            cond("Stalled", "False", "")
        ]))),
        ("Healthy".into(), "3/3 verified".into())
    );
    assert_eq!(
        argo_cd_health(&with(json!([
            cond("Ready", "True", "ok"),
            cond("Stalled", "True", "no agent can run on 2 nodes")
        ]))),
        ("Degraded".into(), "no agent can run on 2 nodes".into())
    );
    // The chart README shows the same check.
    let readme = std::fs::read_to_string(Path::new(CHART).join("README.md")).unwrap();
    let file =
        std::fs::read_to_string(Path::new(REPO).join("deploy/argocd/loopbackpolicy-health.yaml"))
            .unwrap();
    let data = &file[file.find("data:").expect("data:")..];
    assert!(
        readme.contains(data.trim_end()),
        "the chart README's Argo CD check differs from deploy/argocd/"
    );
}

// --- the API server --------------------------------------------------------------------------------------

#[tokio::test]
async fn the_rendered_chart_is_accepted_by_the_api_server() {
    let Some(cluster) = cluster::shared() else {
        return;
    };
    cluster.install_crds();
    let client = cluster.client().await;
    let namespace = cluster.namespace(&client, "chart-dry").await;
    let release = unique_name("lgdry");
    // Every optional object but the ServiceMonitor (its CRD belongs to the Prometheus Operator).
    // The `helm test` Pod names a ServiceAccount a dry run does not create; the hollow-node test
    // runs it.
    let variants: [&[&str]; 3] = [
        &["--skip-tests"],
        &[
            "--skip-tests",
            "--set",
            "defaultPolicy.enabled=true",
            "--set",
            "evidence.enabled=true",
            "--set",
            "policyReports.enabled=true",
            "--set",
            "image.digest=sha256:0000000000000000000000000000000000000000000000000000000000000000",
        ],
        // The values users reach for, as the API server types them.
        &[
            "--skip-tests",
            "--set",
            "controller.podSecurityContext.runAsUser=null",
            "--set",
            "controller.containerSecurityContext.runAsUser=null",
            "--set",
            "controller.topologySpreadConstraints[0].maxSkew=1",
            "--set",
            "controller.topologySpreadConstraints[0].topologyKey=topology.kubernetes.io/zone",
            "--set",
            "controller.topologySpreadConstraints[0].whenUnsatisfiable=ScheduleAnyway",
            "--set",
            "controller.podDisruptionBudget.minAvailable=50%",
            "--set",
            "controller.podDisruptionBudget.maxUnavailable=null",
            "--set",
            "agent.updateStrategy.rollingUpdate.maxSurge=1",
            "--set",
            "agent.updateStrategy.rollingUpdate.maxUnavailable=0",
            "--set",
            "agent.metricsBindAddress=::",
            "--set",
            "global.imageRegistry=mirror.example",
        ],
    ];
    for extra in variants {
        let rendered = template(&release, &namespace, extra);
        let out = cluster.kubectl_ok(
            &["apply", "--server-side", "--dry-run=server", "-f", "-"],
            Some(&rendered),
        );
        assert_eq!(
            out.lines().count(),
            documents(&rendered).len(),
            "one accepted object per document:\n{out}"
        );
    }

    // deploy/loopguard.yaml as a user applies it, Namespace included; moved to a namespace of this
    // test (a dry run of what lives in a namespace needs the namespace to exist).
    let moved = unique_name("chart-deploy");
    let manifest = std::fs::read_to_string(Path::new(REPO).join("deploy/loopguard.yaml"))
        .expect("deploy/loopguard.yaml")
        .replace("loopguard-system", &moved);
    let docs = documents(&manifest);
    let namespace_doc = serde_json::to_string(&docs[0]).expect("json");
    cluster.kubectl_ok(&["apply", "--server-side", "-f", "-"], Some(&namespace_doc));
    let out = cluster.kubectl_ok(
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--dry-run=server",
            "-f",
            "-",
        ],
        Some(&manifest),
    );
    assert_eq!(
        out.lines().count(),
        docs.len(),
        "one accepted object per document:\n{out}"
    );
    delete_namespace(&client, &moved).await;
    delete_namespace(&client, &namespace).await;
}

/// `openshift.enabled`: a SecurityContextConstraints that admits exactly what the agent's Pod asks
/// for, `use` of it for the agent's ServiceAccount only, the other Pods' UID left to restricted-v2;
/// accepted by the API server against OpenShift's own SCC schema (tests/fixtures/openshift/).
#[tokio::test]
async fn the_openshift_rendering_fits_its_scc_schema_and_the_agent() {
    let Some(cluster) = cluster::shared() else {
        return;
    };
    let crd = format!("{REPO}/tests/fixtures/openshift/securitycontextconstraints.crd.yaml");
    cluster.kubectl_ok(&["apply", "--server-side", "-f", &crd], None);
    cluster.wait_established(&["securitycontextconstraints.security.openshift.io"]);
    let client = cluster.client().await;
    let namespace = cluster.namespace(&client, "chart-ocp").await;
    let release = unique_name("lgocp");
    let rendered = template(
        &release,
        &namespace,
        &[
            "--skip-tests",
            "--set",
            "openshift.enabled=true",
            "--set",
            "evidence.enabled=true",
        ],
    );
    let docs = documents(&rendered);
    let scc = docs
        .iter()
        .find(|d| d["kind"] == "SecurityContextConstraints")
        .expect("the SCC");
    let daemonset = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(scc["allowHostNetwork"], true);
    let allowed: Vec<&Value> = scc["allowedCapabilities"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    for cap in pod["containers"][0]["securityContext"]["capabilities"]["add"]
        .as_array()
        .unwrap()
    {
        assert!(
            allowed.contains(&cap),
            "{cap} not allowed by the SCC: {allowed:?}"
        );
    }
    let volumes: Vec<&str> = scc["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for volume in pod["volumes"].as_array().unwrap() {
        let kind = volume
            .as_object()
            .unwrap()
            .keys()
            .find(|k| *k != "name")
            .unwrap();
        assert!(
            volumes.contains(&kind.as_str()),
            "{kind} not in {volumes:?}"
        );
    }
    assert_eq!(pod["containers"][0]["securityContext"]["runAsUser"], 0);
    assert_eq!(scc["runAsUser"]["type"], "RunAsAny");
    // `use` for the agent's ServiceAccount, and nothing else.
    let binding = docs
        .iter()
        .find(|d| {
            d["kind"] == "RoleBinding"
                && d["roleRef"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with("-scc"))
        })
        .expect("the SCC's binding");
    assert_eq!(binding["subjects"][0]["name"], pod["serviceAccountName"]);
    let role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == binding["roleRef"]["name"])
        .unwrap();
    assert_eq!(
        role["rules"],
        json!([{"apiGroups": ["security.openshift.io"], "resources": ["securitycontextconstraints"],
                "resourceNames": [scc["metadata"]["name"]], "verbs": ["use"]}])
    );
    // The others run under restricted-v2: no UID of ours.
    for doc in &docs {
        let pod = match doc["kind"].as_str() {
            Some("Deployment" | "Job") => &doc["spec"]["template"]["spec"],
            Some("CronJob") => &doc["spec"]["jobTemplate"]["spec"]["template"]["spec"],
            _ => continue,
        };
        assert!(
            pod["securityContext"].get("runAsUser").is_none(),
            "{}",
            doc["kind"]
        );
        assert!(
            pod["securityContext"].get("fsGroup").is_none(),
            "{}",
            doc["kind"]
        );
        for c in pod["containers"].as_array().unwrap() {
            assert!(
                c["securityContext"].get("runAsUser").is_none(),
                "{}",
                doc["kind"]
            );
            assert_eq!(c["securityContext"]["runAsNonRoot"], true);
        }
    }
    // The API server accepts every object, the SCC against OpenShift's schema.
    let out = cluster.kubectl_ok(
        &["apply", "--server-side", "--dry-run=server", "-f", "-"],
        Some(&rendered),
    );
    assert_eq!(out.lines().count(), docs.len(), "{out}");
    assert!(
        out.contains("securitycontextconstraints.security.openshift.io/"),
        "{out}"
    );
    delete_namespace(&client, &namespace).await;
}

/// The API server the tests run against is the one asked for: the pinned one, or the oldest
/// version loopguard claims when hack/test.sh sets LOOPGUARD_KUBE_APISERVER (the API-server tests
/// run a second time against it).
#[tokio::test]
async fn the_api_server_is_the_version_asked_for() {
    let Some(cluster) = cluster::shared() else {
        return;
    };
    let bin = std::env::var("LOOPGUARD_KUBE_APISERVER")
        .unwrap_or_else(|_| cluster.dir.join("bin/kube-apiserver").display().to_string());
    let want = run(
        {
            let mut c = Command::new(&bin);
            c.arg("--version");
            c
        },
        None,
    );
    let want = want.trim().trim_start_matches("Kubernetes ").to_string();
    let version: Value =
        serde_json::from_str(&cluster.kubectl_ok(&["version", "-o", "json"], None)).unwrap();
    assert_eq!(
        version["serverVersion"]["gitVersion"],
        want.as_str(),
        "{bin}"
    );
    println!("API server {want}");
}

/// The agent's identity may write only its own node's LoopbackNodeState: a token bound to a Pod on
/// node A is refused for node B, allowed for A; a token bound to no Pod is refused. The policy's CEL
/// compiles and type-checks on the real API server.
#[tokio::test]
async fn the_admission_policy_confines_each_agent_to_its_own_node() {
    let Some(cluster) = cluster::shared() else {
        return;
    };
    cluster.install_crds();
    let client = cluster.client().await;
    let namespace = cluster.namespace(&client, "chart-vap").await;
    let release = unique_name("lgvap");
    // Only the agent's identity and the policy: no workload runs.
    let rendered = template(
        &release,
        &namespace,
        &[
            "--show-only",
            "templates/agent-rbac.yaml",
            "--show-only",
            "templates/admission-policy.yaml",
        ],
    );
    cluster.kubectl_ok(&["apply", "--server-side", "-f", "-"], Some(&rendered));
    let docs = documents(&rendered);
    let account = docs
        .iter()
        .find(|d| d["kind"] == "ServiceAccount")
        .and_then(|d| d["metadata"]["name"].as_str())
        .expect("agent ServiceAccount")
        .to_owned();
    let policy_name = docs
        .iter()
        .find(|d| d["kind"] == "ValidatingAdmissionPolicy")
        .and_then(|d| d["metadata"]["name"].as_str())
        .expect("ValidatingAdmissionPolicy")
        .to_owned();

    // Compiles (creation succeeded) and type-checks against the CRD's schema without warnings.
    let policies: Api<ValidatingAdmissionPolicy> = Api::all(client.clone());
    let status = eventually("the policy's type check", TIMEOUT, || async {
        let policy = policies.get(&policy_name).await.ok()?;
        let status = policy.status?;
        (status.observed_generation == policy.metadata.generation).then_some(status)
    })
    .await;
    let warnings = status
        .type_checking
        .and_then(|t| t.expression_warnings)
        .unwrap_or_default();
    assert!(warnings.is_empty(), "type-check warnings: {warnings:?}");

    let nodes: Api<Node> = Api::all(client.clone());
    let (node_a, node_b) = (unique_name("vap-a"), unique_name("vap-b"));
    for node in [&node_a, &node_b] {
        nodes
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({ "metadata": { "name": node } })).expect("node"),
            )
            .await
            .expect("create node");
    }
    // A Pod bound to node A under the agent's account: nothing runs it, but a token bound to it
    // carries node A's name.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "agent-on-a" },
        "spec": {
            "nodeName": node_a,
            "serviceAccountName": account,
            "containers": [{ "name": "agent", "image": format!("{IMAGE}:test") }],
        },
    }))
    .expect("pod");
    let pod = pods
        .create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let bound = cluster
        .service_account_kubeconfig(&client, &namespace, &account, Some(&pod))
        .await;
    let unbound = cluster
        .service_account_kubeconfig(&client, &namespace, &account, None)
        .await;
    let agent = Client::try_from(support::cluster::kubeconfig_config(&bound).await).expect("agent");
    let stranger =
        Client::try_from(support::cluster::kubeconfig_config(&unbound).await).expect("client");
    let as_agent: Api<LoopbackNodeState> = Api::all(agent);
    let as_unbound: Api<LoopbackNodeState> = Api::all(stranger);
    let admin: Api<LoopbackNodeState> = Api::all(client.clone());
    let state = |node: &str| -> LoopbackNodeState {
        serde_json::from_value(json!({
            "apiVersion": "loopguard.dev/v1alpha1",
            "kind": "LoopbackNodeState",
            "metadata": { "name": node },
            "spec": { "nodeName": node },
        }))
        .expect("node state")
    };
    let denial = |result: Result<LoopbackNodeState, kube::Error>| -> Option<String> {
        match result {
            Err(kube::Error::Api(status)) if status.code == 403 => Some(status.message.clone()),
            _ => None,
        }
    };

    // The policy is enforced once the API server has loaded it: probe with dry runs.
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let message = eventually("the policy to deny node B's state", TIMEOUT, || async {
        denial(as_agent.create(&dry_run, &state(&node_b)).await)
            .filter(|m| m.contains("may only write"))
    })
    .await;
    assert!(
        message.contains(&format!(
            "the loopguard agent on node {node_a} may only write LoopbackNodeState {node_a}, not {node_b}"
        )),
        "{message}"
    );

    // Its own node: allowed, the object and its status.
    as_agent
        .create(&PostParams::default(), &state(&node_a))
        .await
        .expect("the agent on A creates A's state");
    let status_patch = |reason: &str| {
        Patch::Merge(json!({ "status": { "compliance": "Compliant", "reason": reason } }))
    };
    as_agent
        .patch_status(&node_a, &PatchParams::default(), &status_patch("test"))
        .await
        .expect("the agent on A writes A's status");

    // Another node's: refused, for the object and for its status.
    admin
        .create(&PostParams::default(), &state(&node_b))
        .await
        .expect("admin creates B's state");
    let message = denial(
        as_agent
            .patch_status(&node_b, &PatchParams::default(), &status_patch("forged"))
            .await,
    )
    .expect("the agent on A may not write B's status");
    assert!(
        message.contains("may only write LoopbackNodeState"),
        "{message}"
    );
    let message = denial(
        as_agent
            .patch(
                &node_b,
                &PatchParams::default(),
                &Patch::Merge(json!({ "metadata": { "labels": { "forged": "true" } } })),
            )
            .await,
    )
    .expect("the agent on A may not change B's state");
    assert!(
        message.contains("may only write LoopbackNodeState"),
        "{message}"
    );

    // A token of the same account bound to no Pod names no node.
    let message = denial(as_unbound.create(&dry_run, &state(&node_a)).await)
        .expect("a token bound to no Pod is refused");
    assert!(message.contains("names no node"), "{message}");

    // Others (here the admin) are not matched by the policy.
    admin
        .patch_status(&node_b, &PatchParams::default(), &status_patch("admin"))
        .await
        .expect("admin writes B's status");

    // No kubelet finishes this Pod's deletion: force it, or the namespace would wait for it.
    let _ = pods
        .delete(
            "agent-on-a",
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await;
    for node in [&node_a, &node_b] {
        let _ = admin.delete(node, &DeleteParams::default()).await;
        let _ = nodes.delete(node, &DeleteParams::default()).await;
    }
    cluster.kubectl_ok(
        &["delete", "--ignore-not-found", "--wait=false", "-f", "-"],
        Some(&rendered),
    );
    delete_namespace(&client, &namespace).await;
}

// --- installed on hollow nodes ---------------------------------------------------------------------------

/// The chart as a user installs it, on three hollow nodes that run the locally built binary: the
/// controller's two replicas and an agent per node become Ready, one replica leads, the chart's default
/// policy becomes Compliant on every node with the rules in each node's ip6tables, and deleting the
/// policy removes them again.
#[tokio::test]
async fn the_chart_runs_on_hollow_nodes() {
    let Some(cluster) = cluster::shared() else {
        return;
    };
    cluster.install_crds();
    let client = cluster.client().await;
    let namespace = cluster.namespace(&client, "chart-run").await;
    let release = unique_name("lgrun");
    let run_label = unique_name("run");
    let policy_name = unique_name("chart-default");

    let options = deploy::iptables_hosts(cluster, "chart", 3, ("loopguard.test/chart", &run_label));
    let logs = options.state_dir.join("logs");
    let hollow = cluster.start_nodes(options).await;
    let node_names: Vec<String> = hollow.node_names().map(str::to_owned).collect();

    let on_our_nodes = json!({ "loopguard.test/chart": run_label });
    let controller_selector = json!({
        "app.kubernetes.io/instance": release,
        "app.kubernetes.io/component": "controller",
    });
    let values = values_file(
        cluster,
        &json!({
            "controller": {
                "nodeSelector": on_our_nodes,
                // A hollow node's pods share one network namespace: two replicas on one node would
                // compete for the metrics port.
                "affinity": { "podAntiAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": [{
                    "topologyKey": "kubernetes.io/hostname",
                    "labelSelector": { "matchLabels": controller_selector },
                }]}},
            },
            "agent": { "nodeSelector": on_our_nodes },
            "defaultPolicy": {
                "enabled": true,
                "name": policy_name,
                "spec": { "nodeSelector": { "matchLabels": on_our_nodes } },
            },
        }),
    );
    let values = values.to_string_lossy().into_owned();
    let rendered = template(&release, &namespace, &["-f", &values]);
    cluster.kubectl_ok(&["apply", "--server-side", "-f", "-"], Some(&rendered));

    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    deploy::wait_agents_ready(&client, &namespace, &node_names).await;
    let controllers =
        format!("app.kubernetes.io/instance={release},app.kubernetes.io/component=controller");
    eventually("two controller replicas Ready", TIMEOUT, || async {
        let list = pods
            .list(&ListParams::default().labels(&controllers))
            .await
            .ok()?;
        let ready: BTreeSet<String> = list
            .items
            .iter()
            .filter(|pod| deploy::is_ready(pod))
            .filter_map(|pod| pod.spec.as_ref()?.node_name.clone())
            .collect();
        (ready.len() == 2).then_some(())
    })
    .await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &namespace);
    let holder = eventually("a leader", TIMEOUT, || async {
        leases
            .get(loopguard::api::LEASE_NAME)
            .await
            .ok()?
            .spec?
            .holder_identity
    })
    .await;
    let deployment = documents(&rendered)
        .into_iter()
        .find(|d| d["kind"] == "Deployment")
        .and_then(|d| d["metadata"]["name"].as_str().map(str::to_owned))
        .expect("the controller Deployment");
    assert!(
        holder.starts_with(&format!("{deployment}-")),
        "a controller Pod leads: {holder}"
    );

    let policies: Api<LoopbackPolicy> = Api::all(client.clone());
    let policy = eventually("the default policy Compliant on 3/3", TIMEOUT, || async {
        let policy = policies.get(&policy_name).await.ok()?;
        let summary = policy.status.as_ref()?.summary.clone();
        (compliant(&policy).as_deref() == Some("True") && summary == "3/3").then_some(policy)
    })
    .await;
    assert_eq!(policy.name_any(), policy_name);
    // Argo CD's view of it, through the health check users copy (deploy/argocd/).
    let (health, message) = argo_cd_health(&serde_json::to_value(&policy).unwrap());
    assert_eq!(health, "Healthy", "{message}");
    let states: Api<LoopbackNodeState> = Api::all(client.clone());
    for node in &node_names {
        let state = states.get(node).await.expect("the node's state");
        let value = serde_json::to_value(&state.status).expect("status");
        assert_eq!(value["compliance"], "Compliant", "{node}: {value}");
        let rules = deploy::chain(node, "nft", "INPUT");
        assert!(
            rules.iter().any(|r| r == "-A INPUT -i lo -j ACCEPT")
                && rules.iter().any(|r| r == "-A INPUT -s ::1/128 -j DROP"),
            "{node}: {rules:?}"
        );
    }

    // `helm test`: its Pod (applied with the rest, and failed then, before any agent reported) run
    // again now, finds a recent report from every node the agents cover.
    let test_pod = documents(&rendered)
        .into_iter()
        .find(|d| d["kind"] == "Pod")
        .expect("the helm test Pod");
    let test_pod_name = test_pod["metadata"]["name"]
        .as_str()
        .expect("name")
        .to_owned();
    cluster.kubectl_ok(
        &[
            "delete",
            "pod",
            "--ignore-not-found",
            "-n",
            &namespace,
            &test_pod_name,
        ],
        None,
    );
    // A hollow node appends a container's output to this file (there is no `kubectl logs`).
    let log_file = logs.join(format!("{namespace}_{test_pod_name}_check.log"));
    let _ = std::fs::remove_file(&log_file);
    cluster.kubectl_ok(
        &["apply", "--server-side", "-f", "-"],
        Some(&serde_json::to_string(&test_pod).expect("json")),
    );
    let phase = eventually("the helm test Pod to finish", TIMEOUT, || async {
        let phase = pods.get(&test_pod_name).await.ok()?.status?.phase?;
        matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase)
    })
    .await;
    let log = std::fs::read_to_string(&log_file).expect("the helm test Pod's output");
    assert_eq!(phase, "Succeeded", "helm test:\n{log}");
    assert!(log.contains(" 3 nodes: 3 compliant,"), "{log}");
    for node in &node_names {
        assert!(log.contains(node.as_str()), "{node} in:\n{log}");
    }

    // `helm template` renders the uninstall hooks too, and kubectl applied them: they ran, saw
    // that Helm is not uninstalling anything, and deleted nothing.
    let jobs: Api<Job> = Api::namespaced(client.clone(), &namespace);
    for step in ["pre", "post"] {
        let name = format!("{release}-loopguard-uninstall-{step}");
        eventually(&format!("job {name} done"), TIMEOUT, || async {
            let job = jobs.get(&name).await.ok()?;
            (job.status?.succeeded? == 1).then_some(())
        })
        .await;
        // And said why it deleted nothing (its Pod's log, as the hollow kubelet keeps it).
        let prefix = format!("{namespace}_{name}-");
        let said: Vec<String> = std::fs::read_dir(&logs)
            .expect("the hollow nodes' logs")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .collect();
        assert!(
            !said.is_empty()
                && said
                    .iter()
                    .all(|log| log.contains("Helm is not uninstalling this release")),
            "the {step} hook ran outside helm uninstall and must delete nothing: {said:?}"
        );
    }
    let policy = policies
        .get(&policy_name)
        .await
        .expect("the policy is still there");
    assert!(policy.metadata.deletion_timestamp.is_none());
    assert_eq!(compliant(&policy).as_deref(), Some("True"));

    // Deleting the policy: the agents remove what they inserted, the controller lets it go.
    policies
        .delete(&policy_name, &DeleteParams::default())
        .await
        .expect("delete policy");
    eventually("the policy to be gone", TIMEOUT, || async {
        matches!(
            policies.get(&policy_name).await,
            Err(kube::Error::Api(status)) if status.code == 404
        )
        .then_some(())
    })
    .await;
    for node in &node_names {
        assert!(
            !deploy::chain(node, "nft", "INPUT")
                .iter()
                .any(|r| r.contains("::1/128")),
            "{node}: the inserted rules are removed"
        );
    }

    // Uninstall, and let the hollow nodes stop the pods before they go themselves.
    cluster.kubectl_ok(
        &["delete", "--ignore-not-found", "--wait=false", "-f", "-"],
        Some(&rendered),
    );
    eventually("the pods to be gone", TIMEOUT, || async {
        pods.list(&ListParams::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    delete_namespace(&client, &namespace).await;
    for node in &node_names {
        let _ = states.delete(node, &DeleteParams::default()).await;
    }
    hollow
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
}

/// Two broken renderings of the agent DaemonSet, and what the hollow end-to-end check sees: without
/// `hostNetwork: true` the agent enforces its own pod's network namespace (its status may even say
/// Compliant) and the node's stays bare; without NET_ADMIN it cannot write. Either way the node's
/// own namespace lacks the rules and the scanner fails there: the check is red. (Hollow nodes give
/// non-hostNetwork pods a namespace of their own, and containers only the capabilities their
/// securityContext grants, as a real runtime does.)
#[tokio::test]
async fn a_broken_agent_daemonset_turns_the_hollow_check_red() {
    let Some(cluster) = cluster::shared() else {
        return;
    };
    cluster.install_crds();
    let client = cluster.client().await;
    type Breakage = fn(&mut Value);
    let breakages: [(&str, Breakage); 2] = [
        ("nohostnet", |pod| {
            pod.as_object_mut().unwrap().remove("hostNetwork");
            pod["dnsPolicy"] = json!("ClusterFirst");
        }),
        ("nonetadmin", |pod| {
            pod["containers"][0]["securityContext"]["capabilities"]["add"] = json!(["NET_RAW"]);
        }),
    ];
    for (tag, breakage) in breakages {
        let namespace = cluster.namespace(&client, tag).await;
        let release = unique_name("lgbroken");
        let label = unique_name(tag);
        let options = deploy::iptables_hosts(cluster, tag, 1, ("loopguard.test/broken", &label));
        let hollow = cluster.start_nodes(options).await;
        let node = hollow.node_names().next().unwrap().to_owned();
        let on_our_node = json!({ "loopguard.test/broken": label });
        let policy_name = unique_name("broken");
        let values = values_file(
            cluster,
            &json!({
                "controller": { "replicas": 1, "nodeSelector": on_our_node },
                "uninstallHooks": { "enabled": false },
                "agent": { "nodeSelector": on_our_node },
                "defaultPolicy": {
                    "enabled": true,
                    "name": policy_name,
                    "spec": { "nodeSelector": { "matchLabels": on_our_node } },
                },
            }),
        );
        let rendered = template(&release, &namespace, &["-f", &values.to_string_lossy()]);
        let mut items = documents(&rendered);
        let daemonset = items
            .iter_mut()
            .find(|d| d["kind"] == "DaemonSet")
            .expect("the agent DaemonSet");
        breakage(&mut daemonset["spec"]["template"]["spec"]);
        let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
        cluster.kubectl_ok(
            &["apply", "--server-side", "-f", "-"],
            Some(&list.to_string()),
        );

        // The agent runs, and says something about the node.
        let states: Api<LoopbackNodeState> = Api::all(client.clone());
        let state = eventually(&format!("{tag}: the node's state"), TIMEOUT, || async {
            let status = states.get(&node).await.ok()?.status?;
            (status.policy_name.as_deref() == Some(policy_name.as_str())).then_some(status)
        })
        .await;
        // The status is written after the pass that would have written the rules.
        let input = deploy::chain(&node, "nft", "INPUT");
        println!(
            "{tag}: the agent reports {:?} ({}); the node's INPUT: {input:?}",
            state.compliance, state.reason
        );
        assert!(
            !support::netns::scanner_passes(&node, "nft")
                && !input.iter().any(|r| r == "-A INPUT -s ::1/128 -j DROP"),
            "{tag}: the node's own namespace got the rules: the check would stay green"
        );

        cluster.kubectl_ok(
            &["delete", "--ignore-not-found", "--wait=false", "-f", "-"],
            Some(&list.to_string()),
        );
        let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        eventually("the pods to be gone", TIMEOUT, || async {
            pods.list(&ListParams::default())
                .await
                .ok()?
                .items
                .is_empty()
                .then_some(())
        })
        .await;
        delete_namespace(&client, &namespace).await;
        let _ = states.delete(&node, &DeleteParams::default()).await;
        hollow
            .shutdown(Duration::from_secs(10))
            .await
            .expect("shutdown");
    }
}
