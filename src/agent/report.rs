//! What the agent tells the cluster: its node's LoopbackNodeState, built from an engine report
//! (pure) and written with server-side apply only when it changed.

use crate::api::node_state::RuleState as ApiRuleState;
use crate::api::{
    self, Compliance, IpFamily, LoopbackNodeState, LoopbackNodeStateStatus, Mode, NodeRule,
};
use crate::node::Report;
use crate::rules::{Family, RuleState};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};

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
    repairs: i64,
    last_repair: Option<&Time>,
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
        repairs,
        last_repair_time: last_repair.cloned(),
    }
}

/// The status for a node whose agent could not check or enforce.
pub fn status_from_error(
    policy: Option<&Following>,
    kind: &str,
    message: String,
    repairs: i64,
) -> LoopbackNodeStateStatus {
    LoopbackNodeStateStatus {
        policy_name: policy.map(|p| p.name.clone()),
        policy_generation: policy.and_then(|p| p.generation),
        mode: policy.map(|p| p.mode),
        compliance: Compliance::Error,
        reason: kind.into(),
        message,
        repairs,
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
}

impl Reporter {
    pub fn new(client: Client, node: &str) -> Reporter {
        Reporter {
            api: Api::all(client),
            node: node.to_string(),
            created: false,
            written: None,
        }
    }

    pub fn is_current(&self, status: &LoopbackNodeStateStatus) -> bool {
        self.written.as_ref() == Some(status)
    }

    /// Applies the object (owned by its Node, so the garbage collector removes it with the node)
    /// once, then the status when it differs from the last one written. Returns whether it wrote.
    pub async fn publish(
        &mut self,
        node: Option<&Node>,
        status: &LoopbackNodeStateStatus,
    ) -> kube::Result<bool> {
        if self.is_current(status) {
            return Ok(false);
        }
        let params = PatchParams::apply(api::AGENT_MANAGER).force();
        if !self.created {
            let owner = node.and_then(|n| {
                Some(serde_json::json!([{
                    "apiVersion": "v1", "kind": "Node", "name": n.name_any(), "uid": n.uid()?,
                }]))
            });
            let mut object = serde_json::json!({
                "apiVersion": LoopbackNodeState::api_version(&()),
                "kind": LoopbackNodeState::kind(&()),
                "metadata": {"name": self.node},
                "spec": {"nodeName": self.node},
            });
            if let Some(owner) = owner {
                object["metadata"]["ownerReferences"] = owner;
            }
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
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::engine::RuleReport;
    use crate::node::iptables::Backend;
    use crate::rules::{Chain, Finding};

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
            status_from_report(&p, &report(true, true), 0, None).compliance,
            Compliance::Compliant
        );
        assert_eq!(
            status_from_report(&p, &report(true, false), 0, None).compliance,
            Compliance::NonCompliant
        );
        assert_eq!(
            status_from_report(&p, &report(false, false), 0, None).compliance,
            Compliance::NotApplicable
        );
        let audit = status_from_report(&following(Mode::Audit), &report(true, false), 0, None);
        assert_eq!(
            (audit.compliance, audit.reason.as_str()),
            (Compliance::NonCompliant, "AuditFindings")
        );
    }

    #[test]
    fn the_report_carries_policy_rules_and_repairs() {
        let s = status_from_report(&following(Mode::Enforce), &report(true, true), 3, None);
        assert_eq!(s.policy_name.as_deref(), Some("base"));
        assert_eq!(s.policy_generation, Some(4));
        assert_eq!(s.backend.as_deref(), Some("iptables-nft"));
        assert_eq!(s.rules.len(), 1);
        assert!(s.rules[0].owned);
        assert_eq!(s.rules[0].family, IpFamily::IPv6);
        assert_eq!(s.repairs, 3);
    }
}
