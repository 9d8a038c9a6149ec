//! The kubelet's pod lifecycle on one node: watch the pods bound to it, run their containers as
//! processes, report their status, and stop them and finish the deletion when a pod is deleted.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, future};
use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, Pod, PodCondition, PodIP,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::watcher::Event;
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::Netns;
use crate::container::{self, POD_IP, Process, ProcessSpec};
use crate::volumes::{self, Volumes};
use crate::{Error, FIELD_MANAGER, IoContext, NodeContext, Result, probe};

const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(300);
/// A container that ran this long without exiting starts over with the shortest restart back-off.
const BACKOFF_RESET: Duration = Duration::from_secs(600);
const MAX_TERMINATION_MESSAGE: u64 = 4096;

/// Why a pod's processes stop, and how long they get between SIGTERM and SIGKILL.
#[derive(Clone, Copy, Debug)]
enum Stop {
    /// The pod is being deleted: stop, then finish the deletion (delete with grace period 0).
    Deleted(Duration),
    /// The pod object is gone, or the harness shuts down: stop only.
    Abandoned(Duration),
}

impl Stop {
    fn grace(self) -> Duration {
        match self {
            Stop::Deleted(grace) | Stop::Abandoned(grace) => grace,
        }
    }
}

struct Worker {
    stop: watch::Sender<Option<Stop>>,
    grace: Duration,
    task: JoinHandle<()>,
}

type Workers = Arc<Mutex<HashMap<String, Worker>>>;
/// Process groups of the running containers, for killing them all when the harness is dropped.
type Processes = Arc<Mutex<HashSet<i32>>>;

/// Syncs the pods of one node until dropped or stopped.
pub struct PodSync {
    workers: Workers,
    processes: Processes,
    watch: JoinHandle<()>,
}

impl PodSync {
    pub fn start(node: Arc<NodeContext>) -> Self {
        let workers = Workers::default();
        let processes = Processes::default();
        let watch = tokio::spawn(sync(node, workers.clone(), processes.clone()));
        Self {
            workers,
            processes,
            watch,
        }
    }

    /// Stops watching and stops every pod's processes (SIGTERM, then SIGKILL after at most `grace`).
    pub async fn stop_all(&mut self, grace: Duration) {
        self.watch.abort();
        let _ = (&mut self.watch).await;
        let workers: Vec<Worker> = self
            .workers
            .lock()
            .unwrap()
            .drain()
            .map(|(_, w)| w)
            .collect();
        for worker in &workers {
            worker
                .stop
                .send_replace(Some(Stop::Abandoned(worker.grace.min(grace))));
        }
        future::join_all(workers.into_iter().map(|w| w.task)).await;
    }

    /// Kills every process at once, without waiting.
    pub fn kill_all(&self) {
        self.watch.abort();
        self.workers
            .lock()
            .unwrap()
            .values()
            .for_each(|w| w.task.abort());
        for group in self.processes.lock().unwrap().iter() {
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(-group, libc::SIGKILL) };
        }
    }
}

async fn sync(node: Arc<NodeContext>, workers: Workers, processes: Processes) {
    let api: Api<Pod> = Api::all(node.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", node.name));
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut listed = HashSet::new();
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => listed.clear(),
            Ok(Event::InitApply(pod)) => {
                listed.insert(uid(&pod));
                on_pod(&node, &workers, &processes, pod);
            }
            Ok(Event::Apply(pod)) => on_pod(&node, &workers, &processes, pod),
            Ok(Event::InitDone) => {
                for worker in workers
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(uid, _)| !listed.contains(*uid))
                {
                    worker
                        .1
                        .stop
                        .send_replace(Some(Stop::Abandoned(worker.1.grace)));
                }
            }
            Ok(Event::Delete(pod)) => {
                if let Some(worker) = workers.lock().unwrap().get(&uid(&pod)) {
                    worker
                        .stop
                        .send_replace(Some(Stop::Abandoned(worker.grace)));
                }
            }
            Err(e) => tracing::warn!(node = %node.name, "watching pods: {e}"),
        }
    }
}

fn on_pod(node: &Arc<NodeContext>, workers: &Workers, processes: &Processes, pod: Pod) {
    let uid = uid(&pod);
    let deleting = pod.metadata.deletion_timestamp.is_some();
    let mut workers_guard = workers.lock().unwrap();
    if let Some(worker) = workers_guard.get(&uid) {
        if deleting {
            let grace = pod
                .metadata
                .deletion_grace_period_seconds
                .map_or(worker.grace, seconds);
            // The first deletion decides; a pod already stopping keeps stopping as it was told.
            worker.stop.send_if_modified(|stop| {
                let first = stop.is_none();
                if first {
                    *stop = Some(Stop::Deleted(grace));
                }
                first
            });
        }
        return;
    }
    if deleting {
        // Never started here (or already stopped): only the deletion is left to finish.
        tokio::spawn(finish_deletion(Api::all(node.client.clone()), pod));
        return;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return; // finished before this harness started
    }
    let grace = seconds(
        pod.spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(30),
    );
    let (stop, stop_rx) = watch::channel(None);
    let task = tokio::spawn(run_pod(
        node.clone(),
        pod,
        stop_rx,
        processes.clone(),
        workers.clone(),
    ));
    workers_guard.insert(uid, Worker { stop, grace, task });
}

fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

fn seconds(seconds: i64) -> Duration {
    Duration::from_secs(seconds.max(0) as u64)
}

/// What the pod's status is made of; container tasks update it, the status writer reports it.
#[derive(Clone, Debug)]
struct PodState {
    containers: Vec<ContainerStatus>,
    /// Per container: it will not run again.
    finished: Vec<bool>,
    /// The volumes are in place (the kubelet's PodReadyToStartContainers).
    ready_to_start: bool,
}

type SharedState = Arc<watch::Sender<PodState>>;

async fn run_pod(
    node: Arc<NodeContext>,
    pod: Pod,
    mut stop: watch::Receiver<Option<Stop>>,
    processes: Processes,
    workers: Workers,
) {
    let uid = uid(&pod);
    let api: Api<Pod> = Api::namespaced(
        node.client.clone(),
        pod.metadata.namespace.as_deref().unwrap_or("default"),
    );
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.clone())
        .unwrap_or_default();
    let state = Arc::new(watch::Sender::new(PodState {
        containers: containers
            .iter()
            .map(|c| waiting_status(c, "ContainerCreating", ""))
            .collect(),
        finished: vec![false; containers.len()],
        ready_to_start: false,
    }));
    let mut writer = tokio::spawn(write_status(api.clone(), pod.clone(), state.subscribe()));
    let pod_dir = node.state_dir.join("pods").join(&uid);
    // A pod without hostNetwork gets a network namespace of its own (lo, and the API proxy), as a
    // pod on a real node does: only hostNetwork pods see the node's network.
    let network = match pod_network(&node, &pod, &pod_dir) {
        Ok(network) => network,
        Err(e) => {
            tracing::warn!(pod = ?pod.metadata.name, "pod network: {e}");
            writer.abort();
            workers.lock().unwrap().remove(&uid);
            return;
        }
    };

    let prepared = tokio::select! {
        prepared = prepare(&node, &pod, &pod_dir, &state) => Some(prepared),
        _ = stop.wait_for(Option::is_some) => None,
    };
    if let Some((volumes, specs)) = prepared {
        state.send_modify(|s| s.ready_to_start = true);
        let tokens = tokio::spawn(volumes::refresh_tokens(
            node.clone(),
            pod.clone(),
            volumes.tokens,
        ));
        let restart_policy = pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or("Always".into());
        let runs =
            containers
                .into_iter()
                .zip(specs)
                .enumerate()
                .map(|(index, (container, spec))| {
                    let run = ContainerRun {
                        node: node.clone(),
                        netns: network.netns.clone(),
                        index,
                        termination_log: termination_log(&pod_dir, &container.name),
                        container,
                        spec,
                        restart_policy: restart_policy.clone(),
                        state: state.clone(),
                        stop: stop.clone(),
                        processes: processes.clone(),
                    };
                    tokio::spawn(run.run())
                });
        future::join_all(runs.collect::<Vec<_>>()).await;
        tokens.abort();
        let _ = tokens.await;
    }
    let stopped = *stop
        .wait_for(Option::is_some)
        .await
        .as_deref()
        .unwrap_or(&None);
    drop(state); // the writer reports the final state and ends
    if tokio::time::timeout(Duration::from_secs(10), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
    if let Some(Stop::Deleted(_)) = stopped {
        finish_deletion(api, pod).await;
    }
    drop(network);
    let _ = std::fs::remove_dir_all(&pod_dir);
    workers.lock().unwrap().remove(&uid);
}

/// The network a pod's containers run in; dropping it deletes a namespace of the pod's own.
struct PodNetwork {
    netns: Arc<Netns>,
    proxy: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        if let Some(proxy) = &self.proxy {
            proxy.abort();
        }
    }
}

fn pod_network(node: &NodeContext, pod: &Pod, pod_dir: &Path) -> Result<PodNetwork> {
    let host_network = pod.spec.as_ref().and_then(|s| s.host_network) == Some(true);
    if host_network {
        return Ok(PodNetwork {
            netns: node.netns.clone(),
            proxy: None,
        });
    }
    std::fs::create_dir_all(pod_dir).context(|| format!("creating {}", pod_dir.display()))?;
    let name = format!("{}-p{}", node.name, &uid(pod)[..8.min(uid(pod).len())]);
    let netns = Arc::new(Netns::create(&name, pod_dir)?);
    let proxy = crate::proxy::serve(&netns, node.upstream)?;
    Ok(PodNetwork {
        netns,
        proxy: Some(proxy),
    })
}

/// Deletes the pod object for good once its processes are gone, as the kubelet does.
async fn finish_deletion(api: Api<Pod>, pod: Pod) {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let params = DeleteParams::default()
        .grace_period(0)
        .preconditions(Preconditions {
            uid: pod.metadata.uid.clone(),
            resource_version: None,
        });
    match api.delete(&name, &params).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if matches!(s.code, 404 | 409) => {}
        Err(e) => tracing::warn!(pod = %name, "finishing deletion: {e}"),
    }
}

/// Resolves images, volumes and processes; until that works, the containers wait with the reason.
async fn prepare(
    node: &NodeContext,
    pod: &Pod,
    pod_dir: &Path,
    state: &SharedState,
) -> (Volumes, Vec<ProcessSpec>) {
    let mut delay = Duration::from_secs(1);
    loop {
        match try_prepare(node, pod, pod_dir).await {
            Ok(prepared) => return prepared,
            Err((reason, e)) => {
                tracing::info!(pod = ?pod.metadata.name, "{reason}: {e}");
                let containers = pod.spec.iter().flat_map(|s| &s.containers);
                let statuses = containers
                    .map(|c| waiting_status(c, reason, &e.to_string()))
                    .collect();
                state.send_modify(|s| s.containers = statuses);
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

async fn try_prepare(
    node: &NodeContext,
    pod: &Pod,
    pod_dir: &Path,
) -> Result<(Volumes, Vec<ProcessSpec>), (&'static str, Error)> {
    let config_error = |e| ("CreateContainerConfigError", e);
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| config_error(Error::Invalid("pod without spec".into())))?;
    if spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err(config_error(Error::Invalid(
            "init containers are not supported by the hollow node".into(),
        )));
    }
    let mut binaries = Vec::new();
    for container in &spec.containers {
        let image = container.image.as_deref().unwrap_or_default();
        let binary = node.binary_for(image).ok_or_else(|| {
            let message = format!(
                "the hollow node maps no binary to image {image:?} (--image REPOSITORY=BINARY)"
            );
            ("ImageNotMapped", Error::Invalid(message))
        })?;
        binaries.push(binary);
    }
    let volumes = Volumes::prepare(node, pod, pod_dir)
        .await
        .map_err(config_error)?;
    let mut specs = Vec::new();
    for (container, binary) in spec.containers.iter().zip(binaries) {
        let log = termination_log(pod_dir, &container.name);
        let parent = log.parent().unwrap_or(pod_dir);
        std::fs::create_dir_all(parent)
            .context(|| format!("creating {}", parent.display()))
            .map_err(config_error)?;
        let mounts = volumes.mounts(container, &log).map_err(config_error)?;
        specs.push(
            container::process_spec(node, pod, container, binary, mounts)
                .await
                .map_err(config_error)?,
        );
    }
    Ok((volumes, specs))
}

fn termination_log(pod_dir: &Path, container: &str) -> PathBuf {
    pod_dir
        .join("containers")
        .join(container)
        .join("termination-log")
}

/// One container's process, restarted per the pod's restart policy.
struct ContainerRun {
    node: Arc<NodeContext>,
    netns: Arc<Netns>,
    index: usize,
    container: Container,
    spec: ProcessSpec,
    termination_log: PathBuf,
    restart_policy: String,
    state: SharedState,
    stop: watch::Receiver<Option<Stop>>,
    processes: Processes,
}

impl ContainerRun {
    async fn run(mut self) {
        let mut backoff = self.node.restart_backoff;
        loop {
            let (terminated, ran_for) = self.run_once().await;
            if ran_for >= BACKOFF_RESET {
                backoff = self.node.restart_backoff;
            }
            let exit_code = terminated.exit_code;
            let restart = match self.restart_policy.as_str() {
                "Always" => true,
                "OnFailure" => exit_code != 0,
                _ => false,
            };
            let stopping = self.stop.borrow().is_some();
            if !restart || stopping {
                self.update(|status, finished| {
                    status.ready = false;
                    status.started = Some(false);
                    status.state = Some(ContainerState {
                        terminated: Some(terminated),
                        ..Default::default()
                    });
                    *finished = true;
                });
                return;
            }
            let message = format!(
                "back-off {}s restarting failed container={}",
                backoff.as_secs(),
                self.container.name
            );
            self.update(|status, _| {
                status.ready = false;
                status.started = Some(false);
                status.restart_count += 1;
                status.last_state = Some(ContainerState {
                    terminated: Some(terminated.clone()),
                    ..Default::default()
                });
                status.state = Some(ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some("CrashLoopBackOff".into()),
                        message: Some(message),
                    }),
                    ..Default::default()
                });
            });
            let stopped = tokio::select! {
                () = tokio::time::sleep(backoff) => false,
                _ = self.stop.wait_for(Option::is_some) => true,
            };
            if stopped {
                self.update(|status, finished| {
                    status.state = Some(ContainerState {
                        terminated: Some(terminated),
                        ..Default::default()
                    });
                    *finished = true;
                });
                return;
            }
            backoff = (backoff * 2).min(MAX_RESTART_BACKOFF);
        }
    }

    /// Starts the process once and waits for it to exit (or stops it when the pod stops); returns how it
    /// ended and how long it ran.
    async fn run_once(&mut self) -> (ContainerStateTerminated, Duration) {
        let _ = std::fs::write(&self.termination_log, b"");
        let started_at = Time(Timestamp::now());
        let started = Instant::now();
        let process = match container::spawn(&self.spec, self.netns.fd()) {
            Ok(process) => process,
            Err(e) => {
                tracing::warn!(container = %self.container.name, "{e}");
                return (
                    terminated(128, "StartError", Some(e.to_string()), started_at),
                    started.elapsed(),
                );
            }
        };
        let pid = process.pid;
        tracing::info!(node = %self.node.name, container = %self.container.name, pid, "started {:?}", self.spec.args);
        self.processes.lock().unwrap().insert(pid);
        let has_probe = self.container.readiness_probe.is_some();
        self.update(|status, _| {
            status.container_id = Some(format!("hollow://{pid}"));
            status.started = Some(true);
            status.ready = !has_probe;
            status.state = Some(ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(started_at.clone()),
                }),
                ..Default::default()
            });
        });
        let probe = self.container.readiness_probe.clone().map(|probe| {
            let (state, index) = (self.state.clone(), self.index);
            let set_ready = move |ready| state.send_modify(|s| s.containers[index].ready = ready);
            let ports = self.container.ports.clone().unwrap_or_default();
            tokio::spawn(probe::run(self.netns.clone(), probe, ports, set_ready))
        });
        let exit_code = self.wait(process).await;
        if let Some(probe) = probe {
            probe.abort();
            let _ = probe.await;
        }
        self.processes.lock().unwrap().remove(&pid);
        tracing::info!(node = %self.node.name, container = %self.container.name, pid, exit_code, "exited");
        let reason = if exit_code == 0 { "Completed" } else { "Error" };
        let message = self.termination_message(exit_code);
        (
            terminated(exit_code, reason, message, started_at),
            started.elapsed(),
        )
    }

    /// Waits for the process; when the pod stops first, sends SIGTERM and, after the grace period, SIGKILL.
    /// Whatever is left of the process group afterwards is killed, as a container runtime does.
    async fn wait(&mut self, mut process: Process) -> i32 {
        let stop = tokio::select! {
            status = process.child.wait() => {
                process.signal(libc::SIGKILL);
                return exit_code(status);
            }
            stop = self.stop.wait_for(Option::is_some) => stop.map_or(Duration::ZERO, |s| s.map_or(Duration::ZERO, Stop::grace)),
        };
        process.signal(libc::SIGTERM);
        let status = match tokio::time::timeout(stop, process.child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                process.signal(libc::SIGKILL);
                process.child.wait().await
            }
        };
        process.signal(libc::SIGKILL);
        exit_code(status)
    }

    /// The termination-log file, or with FallbackToLogsOnError after a failure, the end of the log.
    fn termination_message(&self, exit_code: i32) -> Option<String> {
        let message = read_tail(&self.termination_log, MAX_TERMINATION_MESSAGE, false);
        let fallback =
            self.container.termination_message_policy.as_deref() == Some("FallbackToLogsOnError");
        if message.is_empty() && fallback && exit_code != 0 {
            return Some(read_tail(&self.spec.log, 2048, true)).filter(|m| !m.is_empty());
        }
        Some(message).filter(|m| !m.is_empty())
    }

    fn update(&self, f: impl FnOnce(&mut ContainerStatus, &mut bool)) {
        self.state
            .send_modify(|s| f(&mut s.containers[self.index], &mut s.finished[self.index]));
    }
}

fn exit_code(status: std::io::Result<std::process::ExitStatus>) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(status) => status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
        Err(_) => 128,
    }
}

/// The first `limit` bytes of a file, or with `tail` the last ones.
fn read_tail(path: &Path, limit: u64, tail: bool) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if tail && len > limit {
        let _ = file.seek(SeekFrom::Start(len - limit));
    }
    let mut bytes = Vec::new();
    let _ = file.take(limit).read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

fn terminated(
    exit_code: i32,
    reason: &str,
    message: Option<String>,
    started_at: Time,
) -> ContainerStateTerminated {
    ContainerStateTerminated {
        exit_code,
        reason: Some(reason.into()),
        message,
        started_at: Some(started_at),
        finished_at: Some(Time(Timestamp::now())),
        ..Default::default()
    }
}

fn waiting_status(container: &Container, reason: &str, message: &str) -> ContainerStatus {
    ContainerStatus {
        name: container.name.clone(),
        image: container.image.clone().unwrap_or_default(),
        image_id: String::new(),
        ready: false,
        restart_count: 0,
        started: Some(false),
        state: Some(ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.into()),
                message: Some(message.to_owned()).filter(|m| !m.is_empty()),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Reports the pod's status whenever it changes, until the state's sender is gone and the last state is
/// written (or the pod object is gone). A failed write is retried with the latest state.
async fn write_status(api: Api<Pod>, pod: Pod, mut state: watch::Receiver<PodState>) {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let start_time = Time(Timestamp::now());
    let mut conditions = Conditions::default();
    let mut written = None;
    loop {
        let status = pod_status(&state.borrow_and_update(), &start_time, &mut conditions);
        if written.as_ref() != Some(&status) {
            let patch = Patch::Strategic(json!({ "status": status }));
            let params = PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            };
            match api.patch_status(&name, &params, &patch).await {
                Ok(_) => written = Some(status),
                Err(kube::Error::Api(s)) if s.code == 404 => return,
                Err(e) => {
                    tracing::warn!(pod = %name, "writing status: {e}");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
            }
        }
        if state.changed().await.is_err() {
            return;
        }
    }
}

/// Each condition's last transition time, kept while its status stays the same.
#[derive(Default)]
struct Conditions(HashMap<&'static str, (bool, Time)>);

impl Conditions {
    fn condition(&mut self, type_: &'static str, status: bool) -> PodCondition {
        let entry = self
            .0
            .entry(type_)
            .or_insert_with(|| (status, Time(Timestamp::now())));
        if entry.0 != status {
            *entry = (status, Time(Timestamp::now()));
        }
        PodCondition {
            type_: type_.into(),
            status: if status { "True" } else { "False" }.into(),
            last_transition_time: Some(entry.1.clone()),
            ..Default::default()
        }
    }
}

fn pod_status(
    state: &PodState,
    start_time: &Time,
    conditions: &mut Conditions,
) -> serde_json::Value {
    let terminated = |s: &ContainerStatus| {
        s.state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .map(|t| t.exit_code)
    };
    let phase = if !state.finished.is_empty() && state.finished.iter().all(|f| *f) {
        if state.containers.iter().all(|s| terminated(s) == Some(0)) {
            "Succeeded"
        } else {
            "Failed"
        }
    } else if state
        .containers
        .iter()
        .any(|s| s.started == Some(true) || s.restart_count > 0)
    {
        "Running"
    } else {
        "Pending"
    };
    let ready = !state.containers.is_empty() && state.containers.iter().all(|s| s.ready);
    let ips = vec![PodIP { ip: POD_IP.into() }];
    json!({
        "phase": phase,
        "conditions": [
            conditions.condition("PodReadyToStartContainers", state.ready_to_start),
            conditions.condition("Initialized", true),
            conditions.condition("ContainersReady", ready),
            conditions.condition("Ready", ready),
        ],
        "hostIP": POD_IP,
        "hostIPs": ips,
        "podIP": POD_IP,
        "podIPs": ips,
        "startTime": start_time,
        "containerStatuses": state.containers,
    })
}
