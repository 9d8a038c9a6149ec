//! The controller brings loopguard's CRDs up to its own revision at start (`--manage-crds`), so
//! that `helm upgrade` (which never upgrades a chart's `crds/`) and a new image upgrade them too.
//! It never moves them back: a CRD carrying a later revision (a newer loopguard, then a rollback)
//! is left as it is. Server-side apply, so fields others added to a CRD (a conversion webhook's
//! caBundle, labels) stay theirs.

use crate::api::{CRD_REVISION, CRD_REVISION_ANNOTATION};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use std::time::{Duration, Instant};

/// What to do with one CRD, given the revision the cluster has (None: no CRD, or one without the
/// annotation: an earlier loopguard's).
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    Apply,
    /// The cluster has a later revision: leave it.
    KeepNewer(u32),
}

pub fn plan(installed: Option<u32>) -> Plan {
    match installed {
        Some(r) if r > CRD_REVISION => Plan::KeepNewer(r),
        _ => Plan::Apply,
    }
}

fn revision(crd: &CustomResourceDefinition) -> Option<u32> {
    crd.annotations()
        .get(CRD_REVISION_ANNOTATION)
        .and_then(|r| r.parse().ok())
}

/// Applies each CRD that is behind, then waits (at most 30 s) until they are Established. A
/// refusal (no permission) is logged and the controller goes on with the CRDs the cluster has.
pub async fn ensure(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut applied = Vec::new();
    for crd in crate::api::crds() {
        let name = crd.name_any();
        let installed = match api.get_opt(&name).await {
            Ok(c) => c.as_ref().and_then(revision),
            Err(e) => {
                tracing::warn!(crd = %name, error = %e, "cannot read the CRD (--manage-crds needs get, create and patch of customresourcedefinitions); leaving the CRDs as they are: apply crds/ yourself");
                return;
            }
        };
        match plan(installed) {
            Plan::KeepNewer(r) => {
                tracing::warn!(crd = %name, installed = r, ours = CRD_REVISION, "the cluster has a later revision of this CRD (a newer loopguard's); leaving it");
            }
            Plan::Apply => {
                let params = PatchParams::apply(crate::api::CONTROLLER_MANAGER).force();
                match api.patch(&name, &params, &Patch::Apply(&crd)).await {
                    Ok(_) => {
                        if installed != Some(CRD_REVISION) {
                            tracing::info!(crd = %name, from = ?installed, to = CRD_REVISION, "CRD brought up to this loopguard's revision");
                        }
                        applied.push(name);
                    }
                    Err(e) => {
                        tracing::warn!(crd = %name, error = %e, "applying the CRD failed; going on with the cluster's");
                    }
                }
            }
        }
    }
    let started = Instant::now();
    for name in applied {
        loop {
            let established = api.get_opt(&name).await.ok().flatten().is_some_and(|c| {
                c.status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
            if established || started.elapsed() > Duration::from_secs(30) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crds_move_forward_never_back() {
        assert_eq!(plan(None), Plan::Apply, "none, or an earlier loopguard's");
        assert_eq!(plan(Some(CRD_REVISION - 1)), Plan::Apply);
        assert_eq!(plan(Some(CRD_REVISION)), Plan::Apply, "idempotent");
        assert_eq!(
            plan(Some(CRD_REVISION + 1)),
            Plan::KeepNewer(CRD_REVISION + 1)
        );
    }
}
