//! Hollow nodes: the kubelet's part for loopguard's own workloads, for tests against a real control plane.
//!
//! Each hollow node is a Node object (Ready condition and `kube-node-lease` Lease kept fresh) plus a
//! network namespace named like the node (`/run/netns/<node>`) that stands for the node's host network.
//! Pods bound to a hollow node whose container images map to local binaries run as real processes in that
//! namespace, each in a private mount namespace with its volumes bind-mounted, and their status is reported
//! like a kubelet does. See hack/README.md for what is and is not supported.

mod container;
mod netns;
mod node;
mod pod;
mod probe;
mod proxy;
mod volumes;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use tokio::task::JoinHandle;

pub use netns::Netns;

/// Port on which every node namespace's 127.0.0.1 reaches the real kube-apiserver.
pub const API_PROXY_PORT: u16 = 443;
/// Field manager of every write the harness makes.
const FIELD_MANAGER: &str = "loopguard-hollow";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds a description to an I/O error.
trait IoContext<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}

/// Maps a container image repository (tag and digest ignored) to a local binary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageMapping {
    pub repository: String,
    pub binary: PathBuf,
}

impl FromStr for ImageMapping {
    type Err = Error;

    /// Parses `REPOSITORY=/path/to/binary`.
    fn from_str(s: &str) -> Result<Self> {
        let (image, binary) = s
            .split_once('=')
            .filter(|(image, binary)| !image.is_empty() && !binary.is_empty())
            .ok_or_else(|| {
                Error::Invalid(format!("image mapping {s:?} is not REPOSITORY=BINARY"))
            })?;
        Ok(Self {
            repository: image_repository(image).to_owned(),
            binary: binary.into(),
        })
    }
}

/// The repository part of an image reference: without `@digest` and without `:tag`.
fn image_repository(image: &str) -> &str {
    let image = image.split_once('@').map_or(image, |(name, _)| name);
    match image.rfind(':') {
        Some(colon) if !image[colon..].contains('/') => &image[..colon],
        _ => image,
    }
}

/// What to run: which nodes, with which labels, and which images map to which binaries.
#[derive(Clone, Debug)]
pub struct HollowOptions {
    /// Node names; each also names the node's network namespace.
    pub nodes: Vec<String>,
    /// Labels for every node, on top of `kubernetes.io/hostname`, `kubernetes.io/os` and `kubernetes.io/arch`.
    pub node_labels: BTreeMap<String, String>,
    pub images: Vec<ImageMapping>,
    /// Holds `nodes/<node>/root` (hostPath volumes), `pods/<uid>` (other volumes) and `logs/`.
    pub state_dir: PathBuf,
    /// First delay before restarting an exited container; it doubles up to five minutes, like kubelet's.
    pub restart_backoff: Duration,
}

impl HollowOptions {
    pub fn new(nodes: Vec<String>, state_dir: impl Into<PathBuf>) -> Self {
        Self {
            nodes,
            node_labels: BTreeMap::new(),
            images: Vec::new(),
            state_dir: state_dir.into(),
            restart_backoff: Duration::from_secs(10),
        }
    }
}

/// Everything a node's tasks share.
struct NodeContext {
    client: Client,
    name: String,
    /// The node's host network: hostNetwork pods run here.
    netns: Arc<Netns>,
    /// The API server on the host, for the proxy of each pod network namespace.
    upstream: std::net::SocketAddr,
    images: Vec<ImageMapping>,
    state_dir: PathBuf,
    restart_backoff: Duration,
}

impl NodeContext {
    /// The folder that stands for this node's root file system in hostPath volumes.
    fn root(&self) -> PathBuf {
        node_dir(&self.state_dir, &self.name).join("root")
    }

    fn binary_for(&self, image: &str) -> Option<&Path> {
        let repository = image_repository(image);
        self.images
            .iter()
            .find(|m| m.repository == repository)
            .map(|m| m.binary.as_path())
    }
}

impl HollowOptions {
    /// The folder that stands for `node`'s root file system (hostPath volumes come from there).
    pub fn node_root(&self, node: &str) -> PathBuf {
        node_dir(&self.state_dir, node).join("root")
    }
}

fn node_dir(state_dir: &Path, node: &str) -> PathBuf {
    state_dir.join("nodes").join(node)
}

struct RunningNode {
    context: Arc<NodeContext>,
    ready: tokio::sync::watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    pods: pod::PodSync,
}

/// A set of running hollow nodes. Call [`Hollow::shutdown`] to stop them cleanly (processes stopped,
/// network namespaces and Node objects deleted); dropping it instead kills the processes and deletes the
/// namespaces but leaves the Node objects behind.
pub struct Hollow {
    client: Client,
    nodes: Vec<RunningNode>,
}

impl Hollow {
    /// Registers the nodes, creates their namespaces and starts playing their kubelet.
    pub async fn start(config: kube::Config, options: HollowOptions) -> Result<Self> {
        let upstream = proxy::upstream_address(&config.cluster_url).await?;
        let logs = options.state_dir.join("logs");
        std::fs::create_dir_all(&logs).context(|| format!("creating {}", logs.display()))?;
        let client = Client::try_from(config)?;
        let mut hollow = Self {
            client: client.clone(),
            nodes: Vec::new(),
        };
        for name in &options.nodes {
            // On error, `hollow` is dropped and cleans up the nodes started so far.
            hollow
                .nodes
                .push(start_node(&client, name, &options, upstream).await?);
        }
        Ok(hollow)
    }

    pub fn node_names(&self) -> impl Iterator<Item = &str> {
        self.nodes.iter().map(|n| n.context.name.as_str())
    }

    /// Lets a node report Ready=False (and back): its lease stays fresh, as for a kubelet whose node is
    /// unhealthy, so the node lifecycle controller taints it `node.kubernetes.io/not-ready`.
    pub fn set_node_ready(&self, node: &str, ready: bool) -> Result<()> {
        let running = self
            .nodes
            .iter()
            .find(|n| n.context.name == node)
            .ok_or_else(|| Error::Invalid(format!("{node} is not a node of this harness")))?;
        running.ready.send_replace(ready);
        Ok(())
    }

    /// Stops every process (SIGTERM, SIGKILL after `grace`), deletes the namespaces and the Node objects.
    pub async fn shutdown(mut self, grace: Duration) -> Result<()> {
        let mut nodes = std::mem::take(&mut self.nodes);
        futures::future::join_all(nodes.iter_mut().map(|n| n.stop(grace))).await;
        let api: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(self.client.clone());
        for node in nodes {
            let name = node.context.name.clone();
            drop(node); // no task holds its context any more: this deletes the namespace
            match api.delete(&name, &Default::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

impl RunningNode {
    /// Stops the node's tasks and pods, waiting until they are gone.
    async fn stop(&mut self, grace: Duration) {
        for task in &mut self.tasks {
            task.abort();
            let _ = task.await;
        }
        self.pods.stop_all(grace).await;
    }
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
        self.pods.kill_all();
    }
}

async fn start_node(
    client: &Client,
    name: &str,
    options: &HollowOptions,
    upstream: std::net::SocketAddr,
) -> Result<RunningNode> {
    let node_dir = node_dir(&options.state_dir, name);
    std::fs::create_dir_all(node_dir.join("root/etc"))
        .context(|| format!("creating {}", node_dir.display()))?;
    // Every Linux host has an os-release file. Without one, a hostPath of /etc/os-release would be
    // created as a folder here (as the container runtime does), and its mount point on this machine,
    // shared by every hollow node, would be a folder for some nodes and a file for others.
    let os_release = node_dir.join("root/etc/os-release");
    if !os_release.exists() {
        std::fs::write(&os_release, "ID=hollow\nNAME=\"loopguard hollow node\"\n")
            .context(|| format!("writing {}", os_release.display()))?;
    }
    let context = Arc::new(NodeContext {
        client: client.clone(),
        name: name.to_owned(),
        netns: Arc::new(Netns::create(name, &node_dir)?),
        upstream,
        images: options.images.clone(),
        state_dir: options.state_dir.clone(),
        restart_backoff: options.restart_backoff,
    });
    let proxy = proxy::serve(&context.netns, upstream)?;
    let node_uid = match node::register(client, name, &options.node_labels).await {
        Ok(uid) => uid,
        Err(e) => {
            proxy.abort();
            return Err(e);
        }
    };
    let (ready, ready_rx) = tokio::sync::watch::channel(true);
    let heartbeat = tokio::spawn(node::heartbeat(
        client.clone(),
        name.to_owned(),
        node_uid,
        ready_rx,
    ));
    let pods = pod::PodSync::start(context.clone());
    Ok(RunningNode {
        context,
        ready,
        tasks: vec![proxy, heartbeat],
        pods,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_repository_ignores_tag_and_digest() {
        assert_eq!(
            image_repository("ghcr.io/loopguard/loopguard:v1"),
            "ghcr.io/loopguard/loopguard"
        );
        assert_eq!(
            image_repository("ghcr.io/loopguard/loopguard@sha256:ab"),
            "ghcr.io/loopguard/loopguard"
        );
        assert_eq!(
            image_repository("registry:5000/x:1@sha256:ab"),
            "registry:5000/x"
        );
        assert_eq!(image_repository("registry:5000/x"), "registry:5000/x");
        let mapping: ImageMapping = "example.test/app:latest=/bin/true".parse().unwrap();
        assert_eq!(mapping.repository, "example.test/app");
        assert!("no-equals".parse::<ImageMapping>().is_err());
    }
}
