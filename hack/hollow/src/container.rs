//! One container as a host process: its command line and environment resolved like the kubelet does, and
//! the process started inside its pod's network namespace (the node's, for hostNetwork pods) and a
//! private mount namespace, with only the capabilities its securityContext grants.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, Pod, Secret};
use kube::Api;

use crate::{API_PROXY_PORT, Error, IoContext, NodeContext, Result};

/// The one address of a pod: pods share their node's namespace, which has only `lo`.
pub const POD_IP: &str = "127.0.0.1";
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A bind mount from a host folder or file onto the path the container expects.
#[derive(Clone, Debug)]
pub struct Mount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

/// Everything needed to start (and restart) one container's process.
#[derive(Clone, Debug)]
pub struct ProcessSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: PathBuf,
    pub mounts: Vec<Mount>,
    pub log: PathBuf,
    /// The capabilities the process keeps (a bit per capability number).
    pub capabilities: u64,
    /// `allowPrivilegeEscalation: false`.
    pub no_new_privs: bool,
}

/// The capabilities a container runtime gives a container unless told otherwise (containerd's).
const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Linux capability names, by number.
const CAPABILITY_NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

fn capability_bit(name: &str) -> Option<u64> {
    let name = name.trim_start_matches("CAP_");
    CAPABILITY_NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name))
        .map(|n| 1 << n)
}

/// What a container's securityContext grants: all capabilities when privileged; else the
/// runtime's default set, less `drop` (`ALL` drops them all), plus `add`.
pub fn granted_capabilities(container: &Container) -> u64 {
    let security = container.security_context.as_ref();
    if security.and_then(|s| s.privileged) == Some(true) {
        return (1 << CAPABILITY_NAMES.len()) - 1;
    }
    let caps = security.and_then(|s| s.capabilities.as_ref());
    let listed = |list: Option<&Vec<String>>| -> Vec<String> { list.cloned().unwrap_or_default() };
    let (add, drop) = (
        listed(caps.and_then(|c| c.add.as_ref())),
        listed(caps.and_then(|c| c.drop.as_ref())),
    );
    let mut granted = if drop.iter().any(|d| d.eq_ignore_ascii_case("ALL")) {
        0
    } else {
        DEFAULT_CAPABILITIES
            .iter()
            .filter_map(|c| capability_bit(c))
            .fold(0, |all, bit| all | bit)
    };
    for name in &drop {
        granted &= !capability_bit(name).unwrap_or(0);
    }
    for name in &add {
        granted |= capability_bit(name).unwrap_or(0);
    }
    granted
}

/// Resolves a container's process: `command[0]` (or the image's entrypoint, when `command` is empty) is
/// the binary its image maps to; the rest of `command` and `args` follow, `$(VAR)`-expanded.
pub async fn process_spec(
    node: &NodeContext,
    pod: &Pod,
    container: &Container,
    binary: &Path,
    mounts: Vec<Mount>,
) -> Result<ProcessSpec> {
    let program =
        std::fs::canonicalize(binary).context(|| format!("binary {}", binary.display()))?;
    let env = environment(node, pod, container).await?;
    let lookup: HashMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let command = container.command.iter().flatten().skip(1);
    let args = command
        .chain(container.args.iter().flatten())
        .map(|a| expand(a, &lookup))
        .collect();
    let meta = &pod.metadata;
    let log = node.state_dir.join("logs").join(format!(
        "{}_{}_{}.log",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default(),
        container.name
    ));
    let no_new_privs = container
        .security_context
        .as_ref()
        .and_then(|s| s.allow_privilege_escalation)
        == Some(false);
    Ok(ProcessSpec {
        program,
        args,
        env,
        working_dir: container.working_dir.as_deref().unwrap_or("/").into(),
        mounts,
        log,
        capabilities: granted_capabilities(container),
        no_new_privs,
    })
}

/// The environment in kubelet order: the API server's service variables, then the container's `env`,
/// each value expanded with the variables defined before it.
async fn environment(
    node: &NodeContext,
    pod: &Pod,
    container: &Container,
) -> Result<Vec<(String, String)>> {
    if container.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
        return Err(Error::Invalid(
            "envFrom is not supported by the hollow node".into(),
        ));
    }
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let hostname = if host_network {
        node.name.clone()
    } else {
        pod.metadata.name.clone().unwrap_or_default()
    };
    let port = API_PROXY_PORT.to_string();
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOSTNAME".into(), hostname),
        ("KUBERNETES_SERVICE_HOST".into(), POD_IP.into()),
        ("KUBERNETES_SERVICE_PORT".into(), port.clone()),
        ("KUBERNETES_SERVICE_PORT_HTTPS".into(), port.clone()),
        ("KUBERNETES_PORT".into(), format!("tcp://{POD_IP}:{port}")),
    ];
    for var in container.env.iter().flatten() {
        let value = env_value(node, pod, var, &env).await?;
        env.retain(|(name, _)| *name != var.name);
        env.push((var.name.clone(), value));
    }
    Ok(env)
}

async fn env_value(
    node: &NodeContext,
    pod: &Pod,
    var: &EnvVar,
    defined: &[(String, String)],
) -> Result<String> {
    if let Some(value) = &var.value {
        let lookup = defined
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        return Ok(expand(value, &lookup));
    }
    let Some(source) = &var.value_from else {
        return Ok(String::new());
    };
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    if let Some(field) = &source.field_ref {
        return field_value(pod, &field.field_path);
    }
    if let Some(key) = &source.config_map_key_ref {
        let api: Api<ConfigMap> = Api::namespaced(node.client.clone(), namespace);
        let data = api.get_opt(&key.name).await?.and_then(|cm| cm.data);
        let value = data.and_then(|mut d| d.remove(&key.key));
        return optional(value, key.optional, || {
            format!("configmap {}/{} key {}", namespace, key.name, key.key)
        });
    }
    if let Some(key) = &source.secret_key_ref {
        let api: Api<Secret> = Api::namespaced(node.client.clone(), namespace);
        let data = api.get_opt(&key.name).await?.and_then(|s| s.data);
        let value = data
            .and_then(|mut d| d.remove(&key.key))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned());
        return optional(value, key.optional, || {
            format!("secret {}/{} key {}", namespace, key.name, key.key)
        });
    }
    Err(Error::Invalid(format!(
        "env {}: only fieldRef, configMapKeyRef and secretKeyRef are supported by the hollow node",
        var.name
    )))
}

fn optional(
    value: Option<String>,
    optional: Option<bool>,
    what: impl FnOnce() -> String,
) -> Result<String> {
    match value {
        Some(value) => Ok(value),
        None if optional == Some(true) => Ok(String::new()),
        None => Err(Error::Invalid(format!("{} not found", what()))),
    }
}

/// A downward API value (`fieldRef.fieldPath`).
pub fn field_value(pod: &Pod, path: &str) -> Result<String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let from_map = |map: &Option<std::collections::BTreeMap<String, String>>, prefix: &str| {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(
            map.as_ref()
                .and_then(|m| m.get(key))
                .cloned()
                .unwrap_or_default(),
        )
    };
    let value = match path {
        "metadata.name" => meta.name.clone(),
        "metadata.namespace" => meta.namespace.clone(),
        "metadata.uid" => meta.uid.clone(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()),
        "spec.serviceAccountName" => spec.and_then(|s| s.service_account_name.clone()),
        "status.podIP" | "status.podIPs" | "status.hostIP" | "status.hostIPs" => {
            Some(POD_IP.into())
        }
        _ => from_map(&meta.labels, "metadata.labels['")
            .or_else(|| from_map(&meta.annotations, "metadata.annotations['")),
    };
    value.ok_or_else(|| {
        Error::Invalid(format!(
            "fieldRef {path} is not supported by the hollow node"
        ))
    })
}

/// Kubernetes' `$(VAR)` expansion: defined variables are replaced, undefined references are kept as
/// they are, and `$$` escapes a `$`.
pub fn expand(input: &str, vars: &HashMap<&str, &str>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        let after = &rest[dollar + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some((name, tail)) = after.strip_prefix('(').and_then(|r| r.split_once(')')) {
            match vars.get(name) {
                Some(value) => out.push_str(value),
                None => out.push_str(&rest[dollar..dollar + name.len() + 3]),
            }
            rest = tail;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A started container process, leader of its own process group.
pub struct Process {
    pub child: tokio::process::Child,
    pub pid: i32,
}

impl Process {
    /// Signals the whole process group.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory effects; a group that is gone only yields ESRCH.
        unsafe { libc::kill(-self.pid, signal) };
    }
}

/// Starts the process: in `netns`, in a private mount namespace with `spec.mounts` bind-mounted, its
/// output appended to `spec.log`. It gets SIGKILL if the harness thread that started it dies.
pub fn spawn(spec: &ProcessSpec, netns: BorrowedFd<'_>) -> Result<Process> {
    for mount in &spec.mounts {
        ensure_mount_target(mount)?;
    }
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .context(|| format!("opening {}", spec.log.display()))?;
    let mut command = tokio::process::Command::new(&spec.program);
    command
        .args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone().context(|| "duplicating log file".into())?)
        .stderr(log)
        .process_group(0)
        .kill_on_drop(true);
    let setup = ChildSetup::new(spec, netns.as_raw_fd())?;
    // SAFETY: the closure only makes async-signal-safe system calls on data prepared before fork.
    unsafe { command.pre_exec(move || setup.run()) };
    let child = command
        .spawn()
        .context(|| format!("starting {}", spec.program.display()))?;
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .unwrap_or_default();
    Ok(Process { child, pid })
}

/// A mount point must exist and be of the source's kind; missing ones are created on the host, as the
/// kubelet creates missing hostPath folders (documented in hack/README.md).
fn ensure_mount_target(mount: &Mount) -> Result<()> {
    let target = &mount.target;
    let created = if mount.source.is_dir() {
        std::fs::create_dir_all(target)
    } else if target.exists() {
        Ok(())
    } else {
        target
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| {
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(target)
                    .map(drop)
            })
    };
    created.context(|| format!("creating mount point {}", target.display()))?;
    if mount.source.is_dir() != target.is_dir() {
        return Err(Error::Invalid(format!(
            "cannot bind {} onto {}: one is a folder, the other is not (an earlier pod left that mount \
             point on this machine; remove it if nothing uses it)",
            mount.source.display(),
            target.display()
        )));
    }
    Ok(())
}

/// What the child does between fork and exec, with every path already a C string.
struct ChildSetup {
    parent: libc::pid_t,
    netns: libc::c_int,
    mounts: Vec<(CString, CString, bool)>,
    working_dir: CString,
    capabilities: u64,
    no_new_privs: bool,
}

/// `struct __user_cap_header_struct` and `struct __user_cap_data_struct` of capset(2).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

impl ChildSetup {
    fn new(spec: &ProcessSpec, netns: libc::c_int) -> Result<Self> {
        let c = |p: &Path| {
            CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::Invalid(format!("{p:?}")))
        };
        Ok(Self {
            // SAFETY: getpid cannot fail.
            parent: unsafe { libc::getpid() },
            netns,
            mounts: spec
                .mounts
                .iter()
                .map(|m| Ok((c(&m.source)?, c(&m.target)?, m.read_only)))
                .collect::<Result<_>>()?,
            working_dir: c(&spec.working_dir)?,
            capabilities: spec.capabilities,
            no_new_privs: spec.no_new_privs,
        })
    }

    fn run(&self) -> std::io::Result<()> {
        let check = |rc: libc::c_int| {
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        };
        let none = std::ptr::null::<libc::c_char>();
        // SAFETY: plain system calls on valid C strings owned by `self`.
        unsafe {
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
            if libc::getppid() != self.parent {
                return Err(std::io::Error::other("the harness exited during start-up"));
            }
            check(libc::setns(self.netns, libc::CLONE_NEWNET))?;
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            for (source, target, read_only) in &self.mounts {
                let bind = libc::MS_BIND | libc::MS_REC;
                check(libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    none,
                    bind,
                    std::ptr::null(),
                ))?;
                if *read_only {
                    let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
                    check(libc::mount(
                        none,
                        target.as_ptr(),
                        none,
                        flags,
                        std::ptr::null(),
                    ))?;
                }
            }
            check(libc::chdir(self.working_dir.as_ptr()))?;
            // Only the granted capabilities: out of the bounding set (so that exec as uid 0 cannot
            // bring them back), then out of this process's own sets.
            for cap in 0..64 {
                if self.capabilities & (1 << cap) == 0
                    && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0
                    && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            let header = CapHeader {
                version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
                pid: 0,
            };
            let half = |shift: u32| {
                let bits = (self.capabilities >> shift) as u32;
                CapData {
                    effective: bits,
                    permitted: bits,
                    inheritable: bits,
                }
            };
            let data = [half(0), half(32)];
            check(libc::syscall(libc::SYS_capset, &header, data.as_ptr()) as libc::c_int)?;
            if self.no_new_privs {
                check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_follow_the_security_context() {
        let container = |sc: serde_json::Value| -> Container {
            serde_json::from_value(serde_json::json!({"name": "c", "securityContext": sc})).unwrap()
        };
        let agent = container(serde_json::json!({
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}}));
        assert_eq!(
            granted_capabilities(&agent),
            0x3000,
            "CapEff of the chart's agent"
        );
        assert_eq!(
            granted_capabilities(&container(
                serde_json::json!({"capabilities": {"drop": ["ALL"]}})
            )),
            0
        );
        let default = granted_capabilities(&container(serde_json::json!({})));
        assert_eq!(default & (1 << 12), 0, "no NET_ADMIN by default");
        assert_ne!(default & (1 << 13), 0, "NET_RAW by default");
        let privileged = granted_capabilities(&container(serde_json::json!({"privileged": true})));
        assert_ne!(privileged & (1 << 21), 0, "SYS_ADMIN when privileged");
    }

    #[test]
    fn expands_like_kubelet() {
        let vars = HashMap::from([("NODE", "node-a"), ("EMPTY", "")]);
        assert_eq!(expand("--node=$(NODE)", &vars), "--node=node-a");
        assert_eq!(expand("$(MISSING)/$(NODE)", &vars), "$(MISSING)/node-a");
        assert_eq!(expand("$$(NODE) costs $5 $$", &vars), "$(NODE) costs $5 $");
        assert_eq!(expand("x$(EMPTY)y $(unclosed", &vars), "xy $(unclosed");
    }
}
