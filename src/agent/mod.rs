//! `loopguard agent`: runs on every node (DaemonSet, host network), enforces the policy that
//! governs its node, repairs drift, and reports in its node's LoopbackNodeState.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Flags of `loopguard agent`.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// The node this agent runs on (the downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Where the host's root filesystem (at least /var/lib/dpkg and /usr/sbin) is mounted, for the
    /// applicability check.
    #[arg(long, env = "LOOPGUARD_HOST_ROOT", default_value = "/host")]
    pub host_root: PathBuf,
    /// Where the rules this agent inserted are recorded (a hostPath, so restarts remember).
    #[arg(long, env = "LOOPGUARD_STATE_FILE", default_value = crate::node::state_file::DEFAULT_PATH)]
    pub state_file: PathBuf,
    /// Address of /metrics, /healthz and /readyz (the agent uses the host network).
    #[arg(long, env = "LOOPGUARD_METRICS_ADDR", default_value = "0.0.0.0:9742")]
    pub metrics_addr: SocketAddr,
    /// Seconds between full re-checks (and polls, with the legacy backend).
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub resync: f64,
    /// iptables backend: detect it like kubernetes-sigs/iptables-wrappers, or force one.
    #[arg(long, value_enum, default_value_t = crate::node::facts::BackendChoice::Auto)]
    pub backend: crate::node::facts::BackendChoice,
    /// Seconds to wait for the xtables lock.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    pub wait: u64,
    /// Where a fatal error's reason is written for `kubectl describe pod`.
    #[arg(long, value_name = "PATH", default_value = "/dev/termination-log")]
    pub termination_log: PathBuf,
}

/// Entry point of `loopguard agent` (in progress).
pub fn main(_args: AgentArgs) -> crate::Result<std::process::ExitCode> {
    Err(crate::Error::Invalid(
        "loopguard agent: not built yet".into(),
    ))
}
