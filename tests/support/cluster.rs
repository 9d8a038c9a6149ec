//! A real control plane for tests (hack/cluster.sh): reused when `KUBECONFIG` names a running
//! hack/cluster.sh cluster, else started once per test binary and stopped when the binary exits.
//! Plus hollow nodes, unique names and service-account identities.
//!
//! Without the control-plane binaries, tests skip with a message, unless `LOOPGUARD_REQUIRE_CLUSTER` is
//! set (CI sets it), in which case `hack/cluster.sh up` builds them.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, PostParams};
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig, NamedAuthInfo};
use kube::{Client, Config};
use loopguard_hollow::{Hollow, HollowOptions};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// Marks a folder made by hack/cluster.sh.
const MARKER: &str = ".loopguard-cluster";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A name unique to this test process and call, usable for namespaces, nodes and network namespaces:
/// `<tag>-<pid>-<n>`.
pub fn unique_name(tag: &str) -> String {
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// A running control plane: its state folder (hack/cluster.sh's `LOOPGUARD_CLUSTER_DIR`).
pub struct Cluster {
    pub dir: PathBuf,
    /// Stopped with `hack/cluster.sh down` when dropped (private clusters only).
    owned: bool,
    /// Set once loopguard's CRDs are installed and established.
    crds: OnceLock<()>,
}

/// The control plane shared by the tests of this binary; `None` (after printing why) when the tests
/// should skip.
pub fn shared() -> Option<&'static Cluster> {
    static SHARED: OnceLock<Option<Cluster>> = OnceLock::new();
    let cluster = SHARED
        .get_or_init(|| {
            // A cluster that runs another kube-apiserver (LOOPGUARD_KUBE_APISERVER: the oldest
            // version claimed) is always one of this binary's own, never the one KUBECONFIG names.
            if std::env::var_os("LOOPGUARD_KUBE_APISERVER").is_some() {
                return start("shared", &[]);
            }
            if let Some(dir) = running_cluster_from_kubeconfig() {
                return Some(Cluster {
                    dir,
                    owned: false,
                    crds: OnceLock::new(),
                });
            }
            // The watchdog stops it when this test binary exits; nothing drops a static.
            start("shared", &[])
        })
        .as_ref();
    if cluster.is_none() {
        skipped("no control plane (why is printed above, once per test binary)");
    }
    cluster
}

/// One line per skipped test, naming it.
pub fn skipped(why: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// A control plane of its own, for a test that disturbs it (restarts a component); stopped on drop.
pub fn private(tag: &str) -> Option<Cluster> {
    let cluster = start(tag, &[]);
    if cluster.is_none() {
        skipped("no control plane");
    }
    cluster
}

/// A control plane of its own whose controller manager runs only `controllers` (its
/// `--controllers` flag, e.g. `*,-node-lifecycle-controller` for Nodes that no kubelet heartbeats).
pub fn private_with_controllers(tag: &str, controllers: &str) -> Option<Cluster> {
    let cluster = start(tag, &["--controllers", controllers]);
    if cluster.is_none() {
        skipped("no control plane");
    }
    cluster
}

/// `KUBECONFIG` is reused only when it is a hack/cluster.sh cluster that answers: tests create Nodes and
/// network namespaces, which must never land on some other cluster.
fn running_cluster_from_kubeconfig() -> Option<PathBuf> {
    let kubeconfig = PathBuf::from(std::env::var_os("KUBECONFIG")?);
    let dir = kubeconfig.parent()?.to_owned();
    if !dir.join(MARKER).exists() {
        say(&format!(
            "KUBECONFIG={} is not a hack/cluster.sh cluster; not using it",
            kubeconfig.display()
        ));
        return None;
    }
    let readyz = Command::new(dir.join("bin/kubectl"))
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(["get", "--raw=/readyz", "--request-timeout=5s"])
        .output();
    if readyz.is_ok_and(|o| o.status.success()) {
        return Some(dir);
    }
    say(&format!(
        "the cluster of KUBECONFIG={} does not answer; starting one",
        kubeconfig.display()
    ));
    None
}

/// A real cluster of this test binary's own (hack/real-cluster.sh: three real nodes with a pod
/// network and kube-proxy), the OCI `images` pushed to the cluster's registry, which the nodes pull
/// them from by digest (`RealCluster::images`); taken down on drop, and by
/// the watchdog when the test binary dies. `None` (after a message) as for `private`.
pub fn real(tag: &str, images: &[&Path]) -> Option<RealCluster> {
    let mut args = vec!["--owner-pid".to_string(), std::process::id().to_string()];
    for image in images {
        args.extend(["--image".to_string(), image.display().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let Some(cluster) = start_with("real-cluster.sh", tag, &args) else {
        skipped("no control plane");
        return None;
    };
    let env = super::run(
        {
            let mut env = Command::new(format!("{REPO}/hack/real-cluster.sh"));
            env.arg("env").env("LOOPGUARD_CLUSTER_DIR", &cluster.dir);
            env
        },
        None,
    );
    let value = |name: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("export {name}=")))
            .unwrap_or_else(|| panic!("{name} in hack/real-cluster.sh env:\n{env}"))
            .trim_matches('"')
            .to_string()
    };
    let nodes: Vec<String> = value("LOOPGUARD_REAL_NODES")
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(nodes.len(), 3, "{env}");
    let images: Vec<String> = (0..images.len())
        .map(|n| value(&format!("LOOPGUARD_REAL_IMAGE_{n}")))
        .collect();
    Some(RealCluster {
        images,
        node_roots: PathBuf::from(value("LOOPGUARD_NODE_ROOTS")),
        xtables_lock: PathBuf::from(value("LOOPGUARD_XTABLES_LOCK")),
        nodes,
        cluster,
    })
}

/// hack/real-cluster.sh's cluster: the control plane, and its nodes in the script's order
/// (kube-proxy in iptables mode on the legacy backend, in iptables mode on nft, in nftables mode).
pub struct RealCluster {
    pub cluster: Cluster,
    pub nodes: Vec<String>,
    /// The folder the chart's `agent.perNodeHostRoots` takes.
    pub node_roots: PathBuf,
    /// The nodes' xtables lock (the chart's `agent.xtablesLock`).
    pub xtables_lock: PathBuf,
    /// The images given to `real`, in that order, as the nodes pull them from the cluster's
    /// registry: `10.254.10.1:5000/REPOSITORY@sha256:...`.
    pub images: Vec<String>,
}

impl RealCluster {
    /// The router namespace of the cluster network (the nodes' bridge, the API server's relay).
    pub fn router(&self) -> String {
        self.nodes[0].replace("-legacy", "-net")
    }

    /// The API server's address on the cluster network (the one the `kubernetes` Service names).
    pub fn api_server(&self) -> String {
        let env = std::fs::read_to_string(self.cluster.dir.join("cluster.env")).unwrap();
        let port = env
            .lines()
            .find_map(|l| l.strip_prefix("APISERVER_PORT="))
            .expect("APISERVER_PORT in cluster.env");
        format!("https://10.254.10.1:{}", port.trim_matches('"'))
    }

    /// The chart's values that put each agent on its own node's host facts and lock, and pull the
    /// first image from the cluster's registry by digest.
    pub fn chart_values(&self) -> String {
        let mut values = format!(
            "agent.perNodeHostRoots={},agent.xtablesLock={}",
            self.node_roots.display(),
            self.xtables_lock.display()
        );
        if let Some(image) = self.images.first() {
            let (name, digest) = image.split_once('@').expect("REPOSITORY@DIGEST");
            let (registry, _repository) = name.split_once('/').expect("REGISTRY/REPOSITORY");
            values.push_str(&format!(",image.registry={registry},image.digest={digest}"));
        }
        values
    }
}

fn start(tag: &str, up_args: &[&str]) -> Option<Cluster> {
    start_with("cluster.sh", tag, up_args)
}

fn start_with(script: &str, tag: &str, up_args: &[&str]) -> Option<Cluster> {
    if !may_start() {
        return None;
    }
    let dir = std::env::temp_dir().join(format!("loopguard-{}", unique_name(tag)));
    Some(up_in(script, dir, up_args, &[]).0)
}

/// Whether a control plane can be started: its binaries are built, or the tests must not skip (then
/// `up` builds them).
fn may_start() -> bool {
    let binaries_built = Command::new(format!("{REPO}/hack/build-control-plane.sh"))
        .arg("--check")
        .output()
        .is_ok_and(|o| o.status.success());
    if !binaries_built && std::env::var_os("LOOPGUARD_REQUIRE_CLUSTER").is_none() {
        say(
            "SKIPPED: the control-plane binaries are not built (hack/build-control-plane.sh, about 15 \
             minutes the first time) and LOOPGUARD_REQUIRE_CLUSTER is unset",
        );
        return false;
    }
    true
}

/// A control plane of its own in `dir`, hack/cluster.sh given `env` besides, and what its `up`
/// printed; stopped on drop. For tests of the script's own start-up.
pub fn private_in(dir: PathBuf, env: &[(&str, &str)]) -> Option<(Cluster, String)> {
    if !may_start() {
        skipped("no control plane");
        return None;
    }
    Some(up_in("cluster.sh", dir, &[], env))
}

fn up_in(script: &str, dir: PathBuf, up_args: &[&str], env: &[(&str, &str)]) -> (Cluster, String) {
    let owner = std::process::id().to_string();
    let args: Vec<&str> = if script == "cluster.sh" {
        [&["up", "--owner-pid", &owner], up_args].concat()
    } else {
        [&["up"], up_args].concat()
    };
    let output = Command::new(format!("{REPO}/hack/{script}"))
        .args(&args)
        .env("LOOPGUARD_CLUSTER_DIR", &dir)
        .envs(env.iter().copied())
        .output()
        .expect("running the cluster script");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "hack/{script} up failed:\n{stderr}"
    );
    let cluster = Cluster {
        dir,
        owned: true,
        crds: OnceLock::new(),
    };
    (cluster, stderr)
}

fn cluster_sh(dir: &Path, args: &[&str]) -> Output {
    Command::new(format!("{REPO}/hack/cluster.sh"))
        .args(args)
        .env("LOOPGUARD_CLUSTER_DIR", dir)
        .output()
        .expect("running hack/cluster.sh")
}

/// Prints past the test harness's output capture, so a skip is visible in a plain `cargo test`.
fn say(message: &str) {
    let _ = writeln!(std::io::stderr(), "control plane: {message}");
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.owned {
            cluster_sh(&self.dir, &["down"]);
        }
    }
}

impl Cluster {
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    pub async fn config(&self) -> Config {
        kubeconfig_config(&self.kubeconfig()).await
    }

    /// A client as cluster admin. Make one per test: a client belongs to the runtime it was made on.
    pub async fn client(&self) -> Client {
        Client::try_from(self.config().await).expect("client")
    }

    /// `kubectl` (as built for this cluster) with the admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut kubectl = Command::new(self.dir.join("bin/kubectl"));
        kubectl.arg(format!("--kubeconfig={}", self.kubeconfig().display()));
        kubectl
    }

    /// Runs `kubectl ARGS` (with `stdin`, if any) and returns its stdout; panics when it fails.
    /// `kubectl wait --for=condition=Compliant lbp/POLICY`, insisting that it succeeds within
    /// `timeout` (such as "180s"): what a user runs after applying a policy.
    pub fn wait_compliant(&self, policy: &str, timeout: &str) {
        self.wait_condition("Compliant", &[format!("lbp/{policy}")], timeout);
    }

    pub fn kubectl_ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let mut kubectl = self.kubectl();
        kubectl.args(args);
        super::run(kubectl, stdin)
    }

    /// Applies loopguard's generated CRDs (server-side, once per cluster and test binary) and
    /// waits until they are established.
    pub fn install_crds(&self) {
        self.crds.get_or_init(|| {
            self.kubectl_ok(
                &[
                    "apply",
                    "--server-side",
                    "--force-conflicts",
                    "-f",
                    &format!("{REPO}/crds"),
                ],
                None,
            );
            self.wait_established(&[
                "loopbackpolicies.loopguard.dev",
                "loopbacknodestates.loopguard.dev",
            ]);
        });
    }

    /// Waits (60 s at most) until every one of `crds` is Established.
    pub fn wait_established(&self, crds: &[&str]) {
        let crds: Vec<String> = crds.iter().map(|c| format!("crd/{c}")).collect();
        self.wait_condition("Established", &crds, "60s");
    }

    /// `kubectl wait --for=condition=CONDITION OBJECTS...` until it succeeds, `timeout` (such as
    /// "60s") at most. kubectl fails at once, instead of waiting, while an object has no conditions
    /// yet (".status.conditions accessor error: <nil>": a CRD just created, a policy the controller
    /// has not written a status for), so it is run again until the deadline.
    pub fn wait_condition(&self, condition: &str, objects: &[String], timeout: &str) {
        let seconds: u64 = timeout
            .strip_suffix('s')
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("timeout {timeout:?} is not like \"60s\""));
        let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
        loop {
            // Each try waits only for what is left of the whole timeout.
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let mut args = vec![
                "wait".to_string(),
                format!("--for=condition={condition}"),
                format!("--timeout={}s", left.as_secs().max(1)),
            ];
            args.extend(objects.iter().cloned());
            let out = self.kubectl().args(&args).output().unwrap();
            if out.status.success() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "kubectl {args:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Restarts kube-apiserver on the same port; etcd and its data stay.
    pub fn restart_apiserver(&self) {
        let output = cluster_sh(&self.dir, &["restart-apiserver"]);
        assert!(
            output.status.success(),
            "restart-apiserver failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Stops kube-apiserver (an outage); etcd and the other components keep running.
    pub fn stop_apiserver(&self) {
        let output = cluster_sh(&self.dir, &["stop-apiserver"]);
        assert!(
            output.status.success(),
            "stop-apiserver failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// SIGSTOPs kube-apiserver: connections stay open and requests hang, as in a network
    /// partition (a stopped server refuses at once instead).
    pub fn pause_apiserver(&self) {
        let output = cluster_sh(&self.dir, &["pause-apiserver"]);
        assert!(
            output.status.success(),
            "pause-apiserver failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// SIGCONTs kube-apiserver after [`Cluster::pause_apiserver`].
    pub fn resume_apiserver(&self) {
        let output = cluster_sh(&self.dir, &["resume-apiserver"]);
        assert!(
            output.status.success(),
            "resume-apiserver failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Starts kube-apiserver again after [`Cluster::stop_apiserver`] and waits until it is ready.
    pub fn start_apiserver(&self) {
        let output = cluster_sh(&self.dir, &["start-apiserver"]);
        assert!(
            output.status.success(),
            "start-apiserver failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Options for `count` hollow nodes with unique names (`<tag>-<pid>-<n>`), their state below the
    /// cluster's folder (so `hack/cluster.sh down` deletes namespaces a crashed test left) and a quick
    /// restart back-off. Add image mappings and labels, then [`Cluster::start_nodes`].
    pub fn hollow_options(&self, tag: &str, count: usize) -> HollowOptions {
        let nodes = (0..count).map(|_| unique_name(tag)).collect();
        let mut options = HollowOptions::new(nodes, self.dir.join("hollow").join(unique_name(tag)));
        options.restart_backoff = Duration::from_secs(1);
        options
    }

    pub async fn start_nodes(&self, options: HollowOptions) -> Hollow {
        Hollow::start(self.config().await, options)
            .await
            .expect("starting hollow nodes")
    }

    /// A fresh namespace for one test.
    pub async fn namespace(&self, client: &Client, tag: &str) -> String {
        let name = unique_name(tag);
        let namespace = Namespace {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .expect("namespace");
        name
    }

    /// A kubeconfig file that authenticates as ServiceAccount `namespace/account` with a TokenRequest
    /// token; bound to `pod` when given, so that it carries the pod's node claims. Run a process with
    /// this identity by pointing its `KUBECONFIG` (or `--kubeconfig`) here.
    pub async fn service_account_kubeconfig(
        &self,
        client: &Client,
        namespace: &str,
        account: &str,
        pod: Option<&Pod>,
    ) -> PathBuf {
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(3600),
                bound_object_ref: pod.map(|pod| BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: pod.metadata.name.clone(),
                    uid: pod.metadata.uid.clone(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
        let response = api
            .create_token_request(account, &PostParams::default(), &request)
            .await
            .expect("token");
        let token = response
            .status
            .and_then(|s| s.token)
            .expect("token in TokenRequest status");

        let mut kubeconfig = Kubeconfig::read_from(self.kubeconfig()).expect("admin kubeconfig");
        let user = format!("{namespace}-{account}");
        kubeconfig.auth_infos = vec![NamedAuthInfo {
            name: user.clone(),
            auth_info: Some(AuthInfo {
                token: Some(token.into()),
                ..Default::default()
            }),
            ..Default::default()
        }];
        for context in kubeconfig
            .contexts
            .iter_mut()
            .filter_map(|c| c.context.as_mut())
        {
            context.user = Some(user.clone());
            context.namespace = Some(namespace.into());
        }
        let path = self.dir.join(format!("{}.kubeconfig", unique_name(&user)));
        // JSON is YAML: kubectl and kube read it as a kubeconfig.
        std::fs::write(
            &path,
            serde_json::to_vec(&kubeconfig).expect("kubeconfig json"),
        )
        .expect("write kubeconfig");
        path
    }
}

/// A client configuration from a kubeconfig file.
pub async fn kubeconfig_config(path: &Path) -> Config {
    let kubeconfig = Kubeconfig::read_from(path).expect("reading kubeconfig");
    Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig")
}

/// Deletes a test's namespace (best effort; a crashed run's leftovers go with `hack/cluster.sh down`).
pub async fn delete_namespace(client: &Client, name: &str) {
    let _ = Api::<Namespace>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await;
}

/// Polls `check` every 200 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Processes whose command line names `dir` (kubelet, containerd, shims, relays of a real node).
pub fn processes_under(dir: &Path) -> Vec<String> {
    pids_under(dir)
        .into_iter()
        .map(|(_, cmdline)| cmdline)
        .collect()
}

/// [`processes_under`], with their pids.
pub fn pids_under(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.to_string_lossy().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .chars()
            .all(|c| c.is_ascii_digit())
        {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle)
            && let Ok(pid) = entry.file_name().to_string_lossy().parse()
        {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Mount points under `dir`, from this process's mount table.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let needle = format!("{}/", dir.display());
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("/proc/self/mountinfo")
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|target| target.starts_with(&needle))
        .map(String::from)
        .collect()
}
