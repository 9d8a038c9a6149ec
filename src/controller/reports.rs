//! Keeps the nodes' `ClusterPolicyReport`s (`--policy-reports`) as the leader computes them
//! (`aggregate::policy_report`): written only when a report's content changed, at most
//! [`MAX_WRITES`] writes and deletions per round (the rest follow in the next rounds), and only
//! reports that carry loopguard's label are ever deleted.

use crate::aggregate::policy_report::{self, API_VERSION, KIND, MANAGED_BY};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use kube::{Client, ResourceExt};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// Writes and deletions per round (the controller's round is 5 s: at most 20 per second).
pub const MAX_WRITES: usize = 100;
/// After the API server refused to list reports (no CRD, no permission), the next try.
const RETRY: Duration = Duration::from_secs(60);

pub struct PolicyReports {
    api: Api<DynamicObject>,
    /// What each report of loopguard's holds (its content); None until listed as leader.
    written: Option<HashMap<String, Value>>,
    /// Reports of loopguard's names that another manager wrote (a conflict), with the content
    /// loopguard would have written: not tried again until that changes, never deleted.
    refused: HashMap<String, Value>,
    retry_at: Option<Instant>,
}

/// What one round did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Round {
    pub written: usize,
    pub deleted: usize,
    pub failed: usize,
}

impl PolicyReports {
    pub fn new(client: Client) -> PolicyReports {
        let (group, version) = API_VERSION.split_once('/').expect("group/version");
        let gvk = GroupVersionKind::gvk(group, version, KIND);
        let resource = ApiResource::from_gvk_with_plural(&gvk, "clusterpolicyreports");
        PolicyReports {
            api: Api::all_with(client, &resource),
            written: None,
            refused: HashMap::new(),
            retry_at: None,
        }
    }

    /// A follower forgets what it wrote: another replica may write meanwhile.
    pub fn forget(&mut self) {
        self.written = None;
        self.refused.clear();
    }

    /// Brings the reports in line with `desired` (report name → object).
    pub async fn sync(&mut self, desired: &BTreeMap<String, Value>) -> Round {
        let mut round = Round::default();
        if self.written.is_none() {
            if self.retry_at.is_some_and(|at| Instant::now() < at) {
                return round;
            }
            match self.load().await {
                Ok(written) => {
                    self.written = Some(written);
                    self.retry_at = None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "listing ClusterPolicyReports failed (is the wgpolicyk8s.io CRD installed, as Kyverno or Policy Reporter install it?); trying again in a minute");
                    self.retry_at = Some(Instant::now() + RETRY);
                    round.failed += 1;
                    return round;
                }
            }
        }
        let written = self.written.as_mut().expect("loaded");
        let mut budget = MAX_WRITES;
        for (name, report) in desired {
            if budget == 0 {
                break;
            }
            let content = policy_report::content(report);
            if written.get(name) == Some(&content) || self.refused.get(name) == Some(&content) {
                continue;
            }
            budget -= 1;
            // Never forced: a report of the same name that another manager wrote stays its own
            // (a conflict, logged), loopguard's own earlier writes apply without one.
            let params = PatchParams::apply(crate::api::CONTROLLER_MANAGER);
            match self.api.patch(name, &params, &Patch::Apply(report)).await {
                Ok(_) => {
                    self.refused.remove(name);
                    written.insert(name.clone(), content);
                    round.written += 1;
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    tracing::warn!(report = %name, error = %s.message, "a ClusterPolicyReport of this name belongs to another manager: left alone");
                    self.refused.insert(name.clone(), content);
                    round.failed += 1;
                }
                Err(e) => {
                    tracing::warn!(report = %name, error = %e, "writing the ClusterPolicyReport failed; retrying on the next round");
                    round.failed += 1;
                }
            }
        }
        let gone: Vec<String> = written
            .keys()
            .filter(|name| !desired.contains_key(*name))
            .take(budget)
            .cloned()
            .collect();
        for name in gone {
            match self.api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {
                    written.remove(&name);
                    round.deleted += 1;
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    written.remove(&name);
                }
                Err(e) => {
                    tracing::warn!(report = %name, error = %e, "deleting the ClusterPolicyReport failed; retrying on the next round");
                    round.failed += 1;
                }
            }
        }
        round
    }

    /// The reports that carry loopguard's label, with their content.
    async fn load(&self) -> kube::Result<HashMap<String, Value>> {
        let selector = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
        let list = self
            .api
            .list(&ListParams::default().labels(&selector))
            .await?;
        Ok(list
            .items
            .into_iter()
            .map(|o| {
                let content = policy_report::content(&o.data);
                (o.name_any(), content)
            })
            .collect())
    }
}
