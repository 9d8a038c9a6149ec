//! loopguard: enforce the IPv6 loopback firewall baseline (CIS 4.4.3.2, PCI-DSS v4 1.4.1) on every
//! node of a Kubernetes cluster, and report each node's compliance back to the cluster.
//!
//! Layers, top to bottom: `cli`/`main` (flags, messages, exit codes) → `node` (effects on one node:
//! network namespaces, iptables processes, netlink, the state file) → `rules` (pure: the rule model,
//! evaluation and planning).

pub mod agent;
pub mod aggregate;
pub mod api;
pub mod args;
pub mod cli;
pub mod controller;
pub mod demo;
pub mod metrics;
pub mod node;
pub mod report;
pub mod rules;
pub mod runtime;
pub mod selection;
pub mod telemetry;
pub mod uninstall;

use std::path::PathBuf;

/// Everything that can go wrong, each with what the user can do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "network namespace {name:?} not found ({path} does not exist): create it with `ip netns add {name}` or check the name"
    )]
    NetnsNotFound { name: String, path: PathBuf },

    #[error(
        "cannot enter network namespace {name:?}: {source} (loopguard needs root or CAP_SYS_ADMIN to change namespaces)"
    )]
    NetnsEnter {
        name: String,
        source: std::io::Error,
    },

    #[error(
        "{binary} not found in PATH: install iptables with the {backend} backend (Debian: `apt-get install iptables`)"
    )]
    MissingBinary { binary: String, backend: String },

    #[error(
        "permission denied running {command}: {detail} (run as root, or give loopguard CAP_NET_ADMIN and CAP_NET_RAW)"
    )]
    PermissionDenied { command: String, detail: String },

    #[error(
        "the xtables lock {path} was held by another program for more than {seconds}s: retry later, find the holder with `fuser {path}`, or raise --wait"
    )]
    LockTimeout { path: PathBuf, seconds: u64 },

    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },

    #[error("state file {path}: {problem}")]
    StateFile { path: PathBuf, problem: String },

    #[error(
        "state file {path} was written for {recorded}, but this node now uses {detected}: the rules loopguard owns are in the {recorded} tables. Run `loopguard node cleanup --backend {recorded_flag} --state-file {path}` to remove them, then enforce again"
    )]
    StateBackendMismatch {
        path: PathBuf,
        recorded: String,
        recorded_flag: String,
        detected: String,
    },

    #[error(
        "another loopguard process holds {path} (the agent, or `loopguard node` run by hand) and did not finish within {seconds}s: retry later, find it with `fuser {path}`, or raise --wait"
    )]
    StateLocked { path: PathBuf, seconds: f64 },

    #[error("{0}")]
    Invalid(String),

    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),

    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl Error {
    /// One CamelCase word for the error: the reason in a node's status, a metric label, a log field.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::MissingBinary { .. } => "MissingBinary",
            Error::PermissionDenied { .. } => "PermissionDenied",
            Error::LockTimeout { .. } => "LockTimeout",
            Error::StateLocked { .. } => "StateLocked",
            Error::Command { .. } => "CommandFailed",
            Error::StateFile { .. } => "StateFileUnusable",
            Error::StateBackendMismatch { .. } => "BackendChanged",
            Error::Kube(_) => "ApiError",
            _ => "EngineError",
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
