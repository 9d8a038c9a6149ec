//! What the agent tells the cluster: its node's LoopbackNodeState, built from an engine report
//! (pure) and written with server-side apply only when it changed.

use super::history;
use super::memory::History;
use crate::api::node_state::RuleState as ApiRuleState;
use crate::api::{
    self, Compliance, IpFamily, LoopbackNodeState, LoopbackNodeStateStatus, Mode, NodeRule,
    RuleCheck,
};
use crate::node::Report;
use crate::rules::catalog::Verdict;
use crate::rules::{Family, RuleState};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use prometheus_client::metrics::counter::Counter;
use std::time::Duration;

/// The policy a node follows, as far as the report is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Following {
    pub name: String,
    pub generation: Option<i64>,
    pub mode: Mode,
}

/// The status for a node that follows `policy` and whose engine produced `report`.
pub fn status_from_report(
    policy: &Following,
    report: &Report,
    history: &History,
) -> LoopbackNodeStateStatus {
    let compliance = if !report.applicable {
        Compliance::NotApplicable
    } else if report.compliant {
        Compliance::Compliant
    } else {
        Compliance::NonCompliant
    };
    let reason = if compliance == Compliance::NonCompliant && policy.mode == Mode::Audit {
        "AuditFindings"
    } else {
        report.reason.as_str()
    };
    LoopbackNodeStateStatus {
        policy_name: Some(policy.name.clone()),
        policy_generation: policy.generation,
        mode: Some(policy.mode),
        compliance,
        reason: reason.into(),
        message: report.message.clone(),
        backend: Some(report.backend.to_string()),
        ipv6_enabled: Some(report.ipv6_enabled),
        firewall_managers: report
            .firewall_managers
            .iter()
            .map(|m| m.to_string())
            .collect(),
        rule_summary: rule_summary(report),
        checks: report
            .rules
            .iter()
            .map(|r| RuleCheck {
                id: r.id.to_string(),
                cis: r.cis.iter().map(|c| c.to_string()).collect(),
                family: r.family.to_string(),
                mode: r.mode.to_string(),
                applies: r.applies,
                why: r.why.clone(),
                verdict: format!("{:?}", r.verdict),
                reason: r.reason.clone(),
                message: r.message.clone(),
            })
            .collect(),
        rules: report
            .findings
            .iter()
            .map(|f| NodeRule {
                family: match f.finding.family {
                    Family::Ipv6 => IpFamily::IPv6,
                    Family::Ipv4 => IpFamily::IPv4,
                },
                chain: f.finding.chain.to_string(),
                rule: f.finding.rule.clone(),
                state: match f.finding.state {
                    RuleState::Present => ApiRuleState::Present,
                    RuleState::Missing => ApiRuleState::Missing,
                    RuleState::Misplaced => ApiRuleState::Misplaced,
                    RuleState::Duplicate => ApiRuleState::Duplicate,
                    RuleState::Shadowed => ApiRuleState::Shadowed,
                },
                owned: f.owned,
            })
            .collect(),
        repairs: history.repairs,
        last_repair_time: history.last_repair_time.clone(),
        last_repair_by: history.last_repair_by.clone(),
        last_verified_time: None,
        agent_version: None,
        ..Default::default()
    }
}

/// `nftables=Pass,ufw=Fail`: the rules that apply (or cannot be told), by family; the iptables
/// family's IPv4 rule is named `iptables-ipv4`.
fn rule_summary(report: &Report) -> String {
    report
        .rules
        .iter()
        .filter(|r| r.applies != Some(false) && r.verdict != Verdict::Ignored)
        .map(|r| {
            let name = match r.id {
                "set_loopback_traffic" => "iptables-ipv4".to_string(),
                "firewalld_loopback_traffic_trusted" => "firewalld-trusted".to_string(),
                "firewalld_loopback_traffic_restricted" => "firewalld-restricted".to_string(),
                _ => r.family.to_string(),
            };
            format!("{name}={:?}", r.verdict)
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The status for a node whose agent could not check or enforce.
pub fn status_from_error(
    policy: Option<&Following>,
    kind: &str,
    message: String,
    history: Option<&History>,
) -> LoopbackNodeStateStatus {
    LoopbackNodeStateStatus {
        policy_name: policy.map(|p| p.name.clone()),
        policy_generation: policy.and_then(|p| p.generation),
        mode: policy.map(|p| p.mode),
        compliance: Compliance::Error,
        reason: kind.into(),
        message,
        repairs: history.map_or(0, |h| h.repairs),
        last_repair_time: history.and_then(|h| h.last_repair_time.clone()),
        last_repair_by: history.and_then(|h| h.last_repair_by.clone()),
        ..Default::default()
    }
}

/// The status for a node no policy governs (after removing or retaining its rules).
pub fn status_unmanaged(
    reason: &str,
    message: String,
    report: Option<&Report>,
) -> LoopbackNodeStateStatus {
    LoopbackNodeStateStatus {
        compliance: Compliance::Unmanaged,
        reason: reason.into(),
        message,
        backend: report.map(|r| r.backend.to_string()),
        ipv6_enabled: report.map(|r| r.ipv6_enabled),
        firewall_managers: report
            .map(|r| r.firewall_managers.iter().map(|m| m.to_string()).collect())
            .unwrap_or_default(),
        ..Default::default()
    }
}

/// Writes one node's LoopbackNodeState; remembers what it wrote so that nothing is written twice.
pub struct Reporter {
    api: Api<LoopbackNodeState>,
    node: String,
    created: bool,
    written: Option<LoopbackNodeStateStatus>,
    /// The status found in the API server before this process wrote one (read once, by
    /// `load`): the verdict history goes on from it across agent restarts.
    earlier: Option<LoopbackNodeStateStatus>,
    loaded: bool,
}

/// The status without its verification time: what decides whether it says something new.
fn content(status: &LoopbackNodeStateStatus) -> LoopbackNodeStateStatus {
    LoopbackNodeStateStatus {
        last_verified_time: None,
        ..status.clone()
    }
}

impl Reporter {
    pub fn new(client: Client, node: &str) -> Reporter {
        Reporter {
            api: Api::all(client),
            node: node.to_string(),
            created: false,
            written: None,
            earlier: None,
            loaded: false,
        }
    }

    /// Reads the node's status as an earlier agent left it (none when the object is missing).
    pub async fn load(&mut self) -> kube::Result<()> {
        let object = self.api.get_opt(&self.node).await?;
        self.earlier = object.and_then(|o| o.status);
        self.loaded = true;
        Ok(())
    }

    /// `status` with the node's verdict history carried on from the last status written (by
    /// this process, or before it, as `load` found it).
    pub fn with_history(&self, status: LoopbackNodeStateStatus) -> LoopbackNodeStateStatus {
        history::carry(self.written.as_ref().or(self.earlier.as_ref()), status)
    }

    /// Whether `status` needs writing: it says something new, or it was verified a heartbeat
    /// interval after the written one (the liveness signal; never a fabricated time: an agent
    /// whose loop is stuck verifies nothing and so sends no heartbeat).
    pub fn due(&self, status: &LoopbackNodeStateStatus, heartbeat: Duration) -> bool {
        let Some(written) = &self.written else {
            return true;
        };
        if content(written) != content(status) {
            return true;
        }
        match (&written.last_verified_time, &status.last_verified_time) {
            (Some(was), Some(is)) => is.0.duration_since(was.0).unsigned_abs() >= heartbeat,
            (None, Some(_)) => true,
            _ => false,
        }
    }

    /// How long until the written status needs its heartbeat.
    pub fn heartbeat_due_in(&self, heartbeat: Duration) -> Duration {
        let written = self
            .written
            .as_ref()
            .and_then(|w| w.last_verified_time.as_ref());
        let Some(written) = written else {
            return heartbeat;
        };
        let age = jiff::Timestamp::now()
            .duration_since(written.0)
            .unsigned_abs();
        heartbeat.saturating_sub(age).max(Duration::from_secs(1))
    }

    /// Applies the object once per process, owned by its Node (so the garbage collector removes
    /// it with the node; the owner reference is part of every such apply, so it is never
    /// dropped), then the status.
    pub async fn publish(
        &mut self,
        node: &Node,
        status: &LoopbackNodeStateStatus,
    ) -> kube::Result<()> {
        let params = PatchParams::apply(api::AGENT_MANAGER).force();
        if !self.created {
            let object = serde_json::json!({
                "apiVersion": LoopbackNodeState::api_version(&()),
                "kind": LoopbackNodeState::kind(&()),
                "metadata": {
                    "name": self.node,
                    "ownerReferences": [{
                        "apiVersion": "v1", "kind": "Node", "name": node.name_any(),
                        "uid": node.uid().unwrap_or_default(),
                    }],
                },
                "spec": {"nodeName": self.node},
            });
            self.api
                .patch(&self.node, &params, &Patch::Apply(&object))
                .await?;
            self.created = true;
        }
        let patch = serde_json::json!({
            "apiVersion": LoopbackNodeState::api_version(&()),
            "kind": LoopbackNodeState::kind(&()),
            "status": status,
        });
        if let Err(e) = self
            .api
            .patch_status(&self.node, &params, &Patch::Apply(&patch))
            .await
        {
            // Deleted behind our back: create it again on the next attempt.
            if matches!(&e, kube::Error::Api(ae) if ae.code == 404) {
                self.created = false;
            }
            return Err(e);
        }
        self.written = Some(status.clone());
        Ok(())
    }
}

/// How long one status write may take before it is abandoned and retried.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Publishes the latest status the agent's loop put into `latest`, beside that loop: a slow or
/// hanging API server never delays a repair, and a newer status replaces one not yet written.
/// Nothing is written before the agent's Node is known (its uid goes into the owner reference).
pub async fn publish_loop(
    mut reporter: Reporter,
    nodes: Store<Node>,
    mut latest: tokio::sync::watch::Receiver<Option<LoopbackNodeStateStatus>>,
    heartbeat: Duration,
    writes: Counter,
    on_error: impl Fn(),
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        if !reporter.loaded {
            match tokio::time::timeout(REQUEST_TIMEOUT, reporter.load()).await {
                Ok(Ok(())) => {}
                failed => {
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer in {}s", REQUEST_TIMEOUT.as_secs()),
                    };
                    // Writing without it would cut the node's history short: wait for it.
                    tracing::warn!(%error, "reading the node's earlier status failed; retrying");
                    on_error();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            }
        }
        let status = latest
            .borrow_and_update()
            .clone()
            .map(|s| reporter.with_history(s));
        let node = nodes.get(&ObjectRef::new(&reporter.node));
        let wait = match (status, node) {
            (Some(status), Some(node)) if reporter.due(&status, heartbeat) => {
                let result =
                    tokio::time::timeout(REQUEST_TIMEOUT, reporter.publish(&node, &status)).await;
                match result {
                    Ok(Ok(())) => {
                        writes.inc();
                        backoff = Duration::from_secs(1);
                        continue;
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "status not written; retrying"),
                    Err(_) => tracing::warn!(
                        "status write took over {}s; retrying with the latest status",
                        REQUEST_TIMEOUT.as_secs()
                    ),
                }
                on_error();
                let wait = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                // Give the API server room: wait out the backoff, then write what is latest.
                tokio::time::sleep(wait).await;
                continue;
            }
            (Some(_), Some(_)) => reporter.heartbeat_due_in(heartbeat),
            // Nothing to say yet, or our Node is not in the cache yet.
            _ => Duration::from_secs(1),
        };
        tokio::select! {
            changed = latest.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::engine::RuleReport;
    use crate::node::iptables::Backend;
    use crate::rules::{Chain, Finding};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn report(applicable: bool, compliant: bool) -> Report {
        Report {
            compliant,
            applicable,
            reason: if compliant {
                "RulesInPlace"
            } else {
                "RulesNotInPlace"
            }
            .into(),
            message: "why".into(),
            backend: Backend::Nft,
            ipv6_enabled: true,
            firewall_managers: vec![],
            findings: vec![RuleReport {
                finding: Finding {
                    family: Family::Ipv6,
                    chain: Chain::Input,
                    rule: "-A INPUT -i lo -j ACCEPT".into(),
                    state: RuleState::Present,
                },
                owned: true,
            }],
            changes: None,
            dry_run: false,
            rules: vec![],
            family_changes: vec![],
            applied_at: None,
        }
    }

    fn following(mode: Mode) -> Following {
        Following {
            name: "base".into(),
            generation: Some(4),
            mode,
        }
    }

    #[test]
    fn verdicts_map_to_compliance() {
        let p = following(Mode::Enforce);
        assert_eq!(
            status_from_report(&p, &report(true, true), &History::default()).compliance,
            Compliance::Compliant
        );
        assert_eq!(
            status_from_report(&p, &report(true, false), &History::default()).compliance,
            Compliance::NonCompliant
        );
        assert_eq!(
            status_from_report(&p, &report(false, false), &History::default()).compliance,
            Compliance::NotApplicable
        );
        let audit = status_from_report(
            &following(Mode::Audit),
            &report(true, false),
            &History::default(),
        );
        assert_eq!(
            (audit.compliance, audit.reason.as_str()),
            (Compliance::NonCompliant, "AuditFindings")
        );
    }

    #[test]
    fn the_report_carries_policy_rules_and_repairs() {
        let history = History {
            policy: "base".into(),
            repairs: 3,
            last_repair_time: None,
            last_repair_by: Some("nft (pid 77)".into()),
        };
        let s = status_from_report(&following(Mode::Enforce), &report(true, true), &history);
        assert_eq!(s.policy_name.as_deref(), Some("base"));
        assert_eq!(s.policy_generation, Some(4));
        assert_eq!(s.backend.as_deref(), Some("iptables-nft"));
        assert_eq!(s.rules.len(), 1);
        assert!(s.rules[0].owned);
        assert_eq!(s.rules[0].family, IpFamily::IPv6);
        assert_eq!(s.repairs, 3);
        assert_eq!(s.last_repair_by.as_deref(), Some("nft (pid 77)"));
    }

    #[tokio::test]
    async fn a_status_is_written_when_it_changes_or_a_heartbeat_is_due() {
        let client_free = || -> LoopbackNodeStateStatus {
            status_from_report(
                &following(Mode::Enforce),
                &report(true, true),
                &History::default(),
            )
        };
        let at = |s: &str| Some(Time(s.parse().unwrap()));
        let mut reporter = Reporter {
            api: Api::all(
                kube::Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap()))
                    .unwrap(),
            ),
            node: "n".into(),
            created: true,
            written: None,
            earlier: None,
            loaded: true,
        };
        let minute = Duration::from_secs(60);
        let mut first = client_free();
        first.last_verified_time = at("2026-06-01T12:00:00Z");
        assert!(reporter.due(&first, minute), "nothing written yet");
        reporter.written = Some(first.clone());
        let mut later = first.clone();
        later.last_verified_time = at("2026-06-01T12:00:30Z");
        assert!(
            !reporter.due(&later, minute),
            "same content, heartbeat not due"
        );
        later.last_verified_time = at("2026-06-01T12:01:00Z");
        assert!(reporter.due(&later, minute), "heartbeat due");
        let mut changed = first.clone();
        changed.compliance = Compliance::NonCompliant;
        assert!(reporter.due(&changed, minute), "new content");
    }
}
