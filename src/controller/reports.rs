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

/// A report to write: its name, the object, and its content (what is compared between rounds).
type Write<'a> = (&'a String, &'a Value, Value);

/// What one round does (pure): write each desired report whose content differs from what loopguard
/// last wrote and from what another manager refused it, then delete reports loopguard wrote that are
/// no longer desired; at most `budget` writes and deletions together, writes first, the rest left
/// to the next rounds.
fn plan<'a>(
    desired: &'a BTreeMap<String, Value>,
    written: &HashMap<String, Value>,
    refused: &HashMap<String, Value>,
    budget: usize,
) -> (Vec<Write<'a>>, Vec<String>) {
    let writes: Vec<Write<'a>> = desired
        .iter()
        .filter_map(|(name, report)| {
            let content = policy_report::content(report);
            let current =
                written.get(name) == Some(&content) || refused.get(name) == Some(&content);
            (!current).then_some((name, report, content))
        })
        .take(budget)
        .collect();
    let gone = written
        .keys()
        .filter(|name| !desired.contains_key(*name))
        .take(budget - writes.len())
        .cloned()
        .collect();
    (writes, gone)
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
        let (writes, gone) = plan(desired, written, &self.refused, MAX_WRITES);
        for (name, report, content) in writes {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn report(result: &str) -> Value {
        json!({ "scope": {}, "summary": {}, "results": [{ "result": result }] })
    }

    fn named(range: std::ops::Range<usize>, result: &str) -> BTreeMap<String, Value> {
        range
            .map(|i| (format!("r{i:04}"), report(result)))
            .collect()
    }

    fn contents(reports: &BTreeMap<String, Value>) -> HashMap<String, Value> {
        reports
            .iter()
            .map(|(n, r)| (n.clone(), policy_report::content(r)))
            .collect()
    }

    #[test]
    fn a_round_writes_at_most_its_budget_and_the_rest_follow() {
        let desired = named(0..250, "pass");
        let mut written = HashMap::new();
        for round in 0..3 {
            let (writes, gone) = plan(&desired, &written, &HashMap::new(), MAX_WRITES);
            assert_eq!(writes.len(), (250 - round * 100).min(100), "round {round}");
            assert!(gone.is_empty());
            for (name, _, content) in writes {
                written.insert(name.clone(), content);
            }
        }
        assert_eq!(written, contents(&desired));
        let (writes, gone) = plan(&desired, &written, &HashMap::new(), MAX_WRITES);
        assert!(writes.is_empty() && gone.is_empty(), "nothing left to do");
    }

    #[test]
    fn deletions_share_the_budget_after_the_writes() {
        let before = named(0..200, "pass");
        let written = contents(&before);
        // 30 changed, 150 no longer desired (nodes gone), 20 unchanged.
        let mut desired = named(0..30, "fail");
        desired.extend(named(180..200, "pass"));
        let (writes, gone) = plan(&desired, &written, &HashMap::new(), MAX_WRITES);
        assert_eq!(writes.len(), 30);
        assert_eq!(gone.len(), 70);
        assert!(gone.iter().all(|n| !desired.contains_key(n)));
    }

    #[test]
    fn a_refused_report_is_tried_again_only_when_its_content_changes() {
        let desired = named(0..1, "fail");
        let refused = contents(&desired);
        let (writes, _) = plan(&desired, &HashMap::new(), &refused, MAX_WRITES);
        assert!(writes.is_empty(), "the same content is not retried");
        let changed = named(0..1, "pass");
        let (writes, _) = plan(&changed, &HashMap::new(), &refused, MAX_WRITES);
        assert_eq!(writes.len(), 1);
        // Only reports loopguard wrote are ever deleted: a refused one is not in `written`.
        let (_, gone) = plan(&BTreeMap::new(), &HashMap::new(), &refused, MAX_WRITES);
        assert!(gone.is_empty());
    }
}
