//! `loopguard uninstall pre|post`: what the Helm chart runs around `helm uninstall`, so that an
//! uninstall leaves no loopguard rule on any node, no policy stuck Terminating and no object
//! behind.
//!
//! - `pre` (a pre-delete hook, while the controller and the agents still run): deletes every
//!   LoopbackPolicy and waits until they are gone, that is until the agents removed the rules
//!   loopguard inserted (or kept them, for onRemoval Retain) and the controller released its
//!   finalizer. Deleting the controller in the same step as the policies would leave them
//!   Terminating for good.
//! - `post` (a post-delete hook, once the agents are gone): deletes every LoopbackNodeState; their
//!   Nodes own them and would otherwise keep them.
//!
//! Objects are handled untyped, so that one written by another version of loopguard goes too.
//!
//! Safe by construction: `helm template` renders hooks too, and whoever applies that output (by
//! hand, or a GitOps tool without Helm's hook support) would otherwise start a job that deletes
//! every policy. So a hook first reads its Helm release record (the Secret, or ConfigMap with the
//! configmap driver, named `sh.helm.release.v1.RELEASE.vREVISION`) and goes on only while Helm
//! marks it `uninstalling`; otherwise it deletes nothing and says so.

use crate::Result;
use crate::api::{LoopbackNodeState, LoopbackPolicy};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams};
use kube::discovery::ApiResource;
use kube::{Client, ResourceExt};
use std::time::{Duration, Instant};

/// Which side of `helm uninstall`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Step {
    /// Delete every policy and wait until their rules are gone from the nodes.
    Pre,
    /// Delete every node state.
    Post,
}

/// Flags of `loopguard uninstall`.
#[derive(Debug, clap::Args)]
pub struct UninstallArgs {
    #[arg(value_enum)]
    pub step: Step,
    /// The Helm release record this hook belongs to (`sh.helm.release.v1.RELEASE.vREVISION`).
    #[arg(long, value_name = "NAME")]
    pub release_record: String,
    /// The namespace of the release record (the release's namespace).
    #[arg(long, env = "POD_NAMESPACE", value_name = "NAMESPACE")]
    pub namespace: String,
    /// Seconds to wait for the policies to be gone (pre).
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub timeout: u64,
}

pub async fn run(args: UninstallArgs) -> Result<()> {
    let client = Client::try_default().await?;
    match release_status(&client, &args).await? {
        Some(status) if status == "uninstalling" => {}
        found => {
            let why = found.map_or("does not exist".to_string(), |s| format!("says {s}"));
            tracing::warn!(
                record = %args.release_record,
                "Helm is not uninstalling this release (its record {} {why}): nothing deleted. \
                 Was the chart rendered with `helm template` and applied? Render it with --no-hooks",
                args.release_record
            );
            return Ok(());
        }
    }
    match args.step {
        Step::Pre => {
            let policies = untyped::<LoopbackPolicy>(&client);
            delete_all(&policies, "LoopbackPolicy").await?;
            wait_gone(&policies, Duration::from_secs(args.timeout)).await
        }
        Step::Post => {
            let states = untyped::<LoopbackNodeState>(&client);
            delete_all(&states, "LoopbackNodeState").await
        }
    }
}

/// The `status` label of the release record (Secret, else ConfigMap), or `None` without one.
async fn release_status(client: &Client, args: &UninstallArgs) -> Result<Option<String>> {
    let status = |labels: &std::collections::BTreeMap<String, String>| {
        labels.get("status").cloned().unwrap_or_default()
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &args.namespace);
    if let Some(record) = secrets.get_metadata_opt(&args.release_record).await? {
        return Ok(Some(status(record.labels())));
    }
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &args.namespace);
    let record = config_maps.get_metadata_opt(&args.release_record).await?;
    Ok(record.map(|r| status(r.labels())))
}

fn untyped<K: kube::Resource<DynamicType = ()>>(client: &Client) -> Api<DynamicObject> {
    Api::all_with(client.clone(), &ApiResource::erase::<K>(&()))
}

async fn delete_all(api: &Api<DynamicObject>, kind: &str) -> Result<()> {
    for object in api.list(&ListParams::default()).await? {
        let name = object.name_any();
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => tracing::info!(kind, %name, "deleted"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Waits until no policy is left; on timeout, names the ones still there and what their status says.
async fn wait_gone(api: &Api<DynamicObject>, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    loop {
        let left = api.list(&ListParams::default()).await?.items;
        if left.is_empty() {
            tracing::info!(
                seconds = started.elapsed().as_secs_f64(),
                "every LoopbackPolicy is gone: the agents removed the rules loopguard inserted"
            );
            return Ok(());
        }
        if started.elapsed() >= timeout {
            let names: Vec<String> = left.iter().map(|p| p.name_any()).collect();
            return Err(crate::Error::Invalid(format!(
                "LoopbackPolicies still there after {}s: {} (see `kubectl describe lbp`; their nodes may be unreachable)",
                timeout.as_secs(),
                names.join(", ")
            )));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
