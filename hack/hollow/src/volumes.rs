//! Pod volumes as host folders: hostPath from the node's folder, everything else from the pod's folder,
//! and the bind mounts each container gets.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, ServiceAccount,
    ServiceAccountTokenProjection, Volume,
};
use kube::Api;
use kube::api::PostParams;

use crate::container::{Mount, field_value};
use crate::{Error, IoContext, NodeContext, Result};

const DEFAULT_MODE: u32 = 0o644;

/// A projected service account token file, refreshed while the pod runs.
#[derive(Clone, Debug)]
pub struct TokenFile {
    path: PathBuf,
    audience: Option<String>,
    expiration_seconds: i64,
    mode: u32,
}

/// The pod's volumes, materialized.
pub struct Volumes {
    paths: HashMap<String, PathBuf>,
    /// Projected token files, each with the delay after which it needs a fresh token.
    pub tokens: Vec<(TokenFile, Duration)>,
}

impl Volumes {
    /// Materializes every volume of `pod`; the pod's own ones go below `pod_dir`.
    pub async fn prepare(node: &NodeContext, pod: &Pod, pod_dir: &Path) -> Result<Self> {
        let mut paths = HashMap::new();
        let mut tokens = Vec::new();
        for volume in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
            let dir = pod_dir.join("volumes").join(&volume.name);
            let path = prepare_one(node, pod, volume, &dir, &mut tokens).await?;
            paths.insert(volume.name.clone(), path);
        }
        let mut written = Vec::new();
        for token in tokens {
            let refresh_after = token.write(node, pod).await?;
            written.push((token, refresh_after));
        }
        Ok(Self {
            paths,
            tokens: written,
        })
    }

    /// The bind mounts of one container, from its `volumeMounts` and its termination message file.
    pub fn mounts(&self, container: &Container, termination_log: &Path) -> Result<Vec<Mount>> {
        let mut mounts = Vec::new();
        for volume_mount in container.volume_mounts.iter().flatten() {
            let volume = self.paths.get(&volume_mount.name).ok_or_else(|| {
                Error::Invalid(format!(
                    "volumeMount {} names no volume of the pod",
                    volume_mount.name
                ))
            })?;
            if volume_mount
                .sub_path_expr
                .as_ref()
                .is_some_and(|s| !s.is_empty())
            {
                return Err(Error::Invalid(
                    "subPathExpr is not supported by the hollow node".into(),
                ));
            }
            let source = match volume_mount.sub_path.as_deref().filter(|s| !s.is_empty()) {
                Some(sub_path) => {
                    let source = volume.join(sub_path);
                    if !source.exists() {
                        create_dir(&source)?;
                    }
                    source
                }
                None => volume.clone(),
            };
            mounts.push(Mount {
                source,
                target: volume_mount.mount_path.clone().into(),
                read_only: volume_mount.read_only.unwrap_or(false),
            });
        }
        mounts.push(Mount {
            source: termination_log.to_owned(),
            target: container
                .termination_message_path
                .as_deref()
                .unwrap_or("/dev/termination-log")
                .into(),
            read_only: false,
        });
        // Parents before children, as container runtimes mount them.
        mounts.sort_by_key(|m| m.target.components().count());
        Ok(mounts)
    }
}

impl TokenFile {
    fn new(dir: &Path, projection: &ServiceAccountTokenProjection, mode: u32) -> Self {
        Self {
            path: dir.join(&projection.path),
            audience: projection.audience.clone().filter(|a| !a.is_empty()),
            expiration_seconds: projection.expiration_seconds.unwrap_or(3600).max(600),
            mode,
        }
    }

    /// Requests a token bound to the pod (so it carries the node-name claim) and writes it. Returns when it
    /// should be refreshed: at 80% of its lifetime, like the kubelet.
    pub async fn write(&self, node: &NodeContext, pod: &Pod) -> Result<Duration> {
        let spec = pod.spec.as_ref();
        let account = spec
            .and_then(|s| s.service_account_name.as_deref())
            .unwrap_or("default");
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: self.audience.clone().map(|audience| vec![audience]),
                expiration_seconds: Some(self.expiration_seconds),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: pod.metadata.name.clone(),
                    uid: pod.metadata.uid.clone(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let api: Api<ServiceAccount> = Api::namespaced(node.client.clone(), namespace);
        let response = api
            .create_token_request(account, &PostParams::default(), &request)
            .await?;
        let status = response.status.unwrap_or_default();
        let (Some(token), Some(expires)) = (status.token, status.expiration_timestamp) else {
            return Err(Error::Invalid("TokenRequest answered without token".into()));
        };
        write_file(&self.path, token.as_bytes(), self.mode)?;
        let lifetime = expires
            .0
            .duration_since(k8s_openapi::jiff::Timestamp::now());
        let lifetime = Duration::try_from(lifetime).unwrap_or_default();
        Ok(lifetime.mul_f64(0.8).max(Duration::from_secs(10)))
    }
}

/// Keeps the pod's projected tokens fresh until aborted.
pub async fn refresh_tokens(
    node: std::sync::Arc<NodeContext>,
    pod: Pod,
    tokens: Vec<(TokenFile, Duration)>,
) {
    let now = tokio::time::Instant::now();
    let mut due: Vec<_> = tokens.iter().map(|(_, after)| now + *after).collect();
    while let Some((i, when)) = due
        .iter()
        .copied()
        .enumerate()
        .min_by_key(|(_, when)| *when)
    {
        tokio::time::sleep_until(when).await;
        let after = tokens[i].0.write(&node, &pod).await.unwrap_or_else(|e| {
            tracing::warn!(pod = ?pod.metadata.name, "refreshing token: {e}");
            Duration::from_secs(10)
        });
        due[i] = tokio::time::Instant::now() + after;
    }
}

async fn prepare_one(
    node: &NodeContext,
    pod: &Pod,
    volume: &Volume,
    dir: &Path,
    tokens: &mut Vec<TokenFile>,
) -> Result<PathBuf> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    if let Some(host_path) = &volume.host_path {
        return host_path_volume(&node.root(), &host_path.path, host_path.type_.as_deref());
    }
    create_dir(dir)?;
    if volume.empty_dir.is_some() {
        return Ok(dir.to_owned());
    }
    if let Some(source) = &volume.config_map {
        let mode = mode(source.default_mode);
        write_config_map(
            node,
            namespace,
            dir,
            &source.name,
            &source.items,
            source.optional,
            mode,
        )
        .await?;
    } else if let Some(source) = &volume.secret {
        let name = source.secret_name.as_deref().unwrap_or_default();
        write_secret(
            node,
            namespace,
            dir,
            name,
            &source.items,
            source.optional,
            mode(source.default_mode),
        )
        .await?;
    } else if let Some(source) = &volume.downward_api {
        write_downward_api(
            pod,
            dir,
            source.items.iter().flatten(),
            mode(source.default_mode),
        )?;
    } else if let Some(projected) = &volume.projected {
        let mode = mode(projected.default_mode);
        for source in projected.sources.iter().flatten() {
            if let Some(token) = &source.service_account_token {
                tokens.push(TokenFile::new(dir, token, mode));
            } else if let Some(cm) = &source.config_map {
                write_config_map(node, namespace, dir, &cm.name, &cm.items, cm.optional, mode)
                    .await?;
            } else if let Some(secret) = &source.secret {
                write_secret(
                    node,
                    namespace,
                    dir,
                    &secret.name,
                    &secret.items,
                    secret.optional,
                    mode,
                )
                .await?;
            } else if let Some(downward) = &source.downward_api {
                write_downward_api(pod, dir, downward.items.iter().flatten(), mode)?;
            } else {
                return Err(unsupported(&volume.name));
            }
        }
    } else {
        return Err(unsupported(&volume.name));
    }
    Ok(dir.to_owned())
}

/// A hostPath volume is a folder (or file) below the node's root folder, created when missing: the node's
/// root starts empty, so even types that require an existing path are created.
fn host_path_volume(root: &Path, path: &str, type_: Option<&str>) -> Result<PathBuf> {
    let host = root.join(path.trim_start_matches('/'));
    if !host.exists() {
        match type_ {
            Some("File" | "FileOrCreate") => write_file(&host, b"", DEFAULT_MODE)?,
            Some("Socket" | "CharDevice" | "BlockDevice") => {
                return Err(Error::Invalid(format!(
                    "hostPath {path} of type {type_:?} does not exist on the node"
                )));
            }
            _ => create_dir(&host)?,
        }
    }
    Ok(host)
}

async fn write_config_map(
    node: &NodeContext,
    namespace: &str,
    dir: &Path,
    name: &str,
    items: &Option<Vec<KeyToPath>>,
    optional: Option<bool>,
    mode: u32,
) -> Result<()> {
    let api: Api<ConfigMap> = Api::namespaced(node.client.clone(), namespace);
    let Some(cm) = api.get_opt(name).await? else {
        return missing(optional, || format!("configmap {namespace}/{name}"));
    };
    let mut data: BTreeMap<String, Vec<u8>> = cm
        .data
        .into_iter()
        .flatten()
        .map(|(k, v)| (k, v.into_bytes()))
        .collect();
    data.extend(cm.binary_data.into_iter().flatten().map(|(k, v)| (k, v.0)));
    write_keys(dir, data, items, mode, || {
        format!("configmap {namespace}/{name}")
    })
}

async fn write_secret(
    node: &NodeContext,
    namespace: &str,
    dir: &Path,
    name: &str,
    items: &Option<Vec<KeyToPath>>,
    optional: Option<bool>,
    mode: u32,
) -> Result<()> {
    let api: Api<Secret> = Api::namespaced(node.client.clone(), namespace);
    let Some(secret) = api.get_opt(name).await? else {
        return missing(optional, || format!("secret {namespace}/{name}"));
    };
    let data = secret
        .data
        .into_iter()
        .flatten()
        .map(|(k, v)| (k, v.0))
        .collect();
    write_keys(dir, data, items, mode, || {
        format!("secret {namespace}/{name}")
    })
}

fn missing(optional: Option<bool>, what: impl FnOnce() -> String) -> Result<()> {
    if optional == Some(true) {
        Ok(())
    } else {
        Err(Error::Invalid(format!("{} not found", what())))
    }
}

/// Writes every key (or only `items`, at their paths) as a file.
fn write_keys(
    dir: &Path,
    mut data: BTreeMap<String, Vec<u8>>,
    items: &Option<Vec<KeyToPath>>,
    mode: u32,
    what: impl Fn() -> String,
) -> Result<()> {
    let Some(items) = items else {
        return data
            .iter()
            .try_for_each(|(key, value)| write_file(&dir.join(key), value, mode));
    };
    for item in items {
        let value = data
            .remove(&item.key)
            .ok_or_else(|| Error::Invalid(format!("{} has no key {}", what(), item.key)))?;
        write_file(
            &dir.join(&item.path),
            &value,
            item.mode.map_or(mode, |m| m as u32),
        )?;
    }
    Ok(())
}

fn write_downward_api<'a>(
    pod: &Pod,
    dir: &Path,
    items: impl Iterator<Item = &'a DownwardAPIVolumeFile>,
    mode: u32,
) -> Result<()> {
    for item in items {
        let field = item.field_ref.as_ref().ok_or_else(|| {
            Error::Invalid(format!(
                "downwardAPI {}: only fieldRef is supported by the hollow node",
                item.path
            ))
        })?;
        let value = field_value(pod, &field.field_path)?;
        write_file(
            &dir.join(&item.path),
            value.as_bytes(),
            item.mode.map_or(mode, |m| m as u32),
        )?;
    }
    Ok(())
}

fn unsupported(volume: &str) -> Error {
    Error::Invalid(format!(
        "volume {volume}: only hostPath, emptyDir, configMap, secret, downwardAPI and projected \
         (serviceAccountToken, configMap, secret, downwardAPI) volumes are supported by the hollow node"
    ))
}

fn mode(mode: Option<i32>) -> u32 {
    mode.map_or(DEFAULT_MODE, |m| m as u32)
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).context(|| format!("creating {}", dir.display()))
}

/// Replaces a file atomically, so a running process never reads half of it.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    create_dir(parent)?;
    let temp = parent.join(format!(
        ".{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    std::fs::write(&temp, contents)
        .and_then(|()| std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(mode)))
        .and_then(|()| std::fs::rename(&temp, path))
        .context(|| format!("writing {}", path.display()))
}
