//! `loopguard-hollow`: runs hollow nodes until SIGINT or SIGTERM, then deletes their namespaces and Node
//! objects. A node reports NotReady while the file `<state-dir>/nodes/<node>/not-ready` exists.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use kube::config::{KubeConfigOptions, Kubeconfig};
use loopguard_hollow::{Hollow, HollowOptions, ImageMapping};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    version,
    about = "Hollow nodes that play the kubelet for loopguard's own workloads"
)]
struct Args {
    /// Admin kubeconfig of the cluster.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// Node names (comma-separated); each also names the node's network namespace.
    #[arg(long, value_delimiter = ',', required = true)]
    nodes: Vec<String>,
    /// Extra node labels, KEY=VALUE (comma-separated).
    #[arg(long, value_delimiter = ',', value_parser = parse_label)]
    node_labels: Vec<(String, String)>,
    /// Image repository to local binary, REPOSITORY=BINARY (repeatable; tag and digest are ignored).
    #[arg(long = "image")]
    images: Vec<ImageMapping>,
    /// Folder for node roots (hostPath volumes), pod volumes and container logs.
    #[arg(long)]
    state_dir: PathBuf,
    /// First delay before restarting an exited container (doubles up to five minutes).
    #[arg(long, default_value = "10", value_name = "SECONDS")]
    restart_backoff: u64,
    /// Seconds that containers get between SIGTERM and SIGKILL when the harness stops.
    #[arg(long, default_value = "10", value_name = "SECONDS")]
    shutdown_grace: u64,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("label {s:?} is not KEY=VALUE"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let args = Args::parse();
    let kubeconfig = Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("reading {}", args.kubeconfig.display()))?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    let mut options = HollowOptions::new(args.nodes, &args.state_dir);
    options.node_labels = args.node_labels.into_iter().collect::<BTreeMap<_, _>>();
    options.images = args.images;
    options.restart_backoff = Duration::from_secs(args.restart_backoff);
    if options.images.is_empty() {
        bail!("no --image mapping: no pod could run");
    }

    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let hollow = Hollow::start(config, options).await?;
    let nodes: Vec<String> = hollow.node_names().map(str::to_owned).collect();
    tracing::info!("hollow nodes running: {}", nodes.join(", "));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = tick.tick() => {
                for node in &nodes {
                    let not_ready = args.state_dir.join("nodes").join(node).join("not-ready").exists();
                    hollow.set_node_ready(node, !not_ready)?;
                }
            }
        }
    }
    tracing::info!("stopping");
    hollow
        .shutdown(Duration::from_secs(args.shutdown_grace))
        .await?;
    Ok(())
}
