//! Results as `ClusterPolicyReport` objects (`wgpolicyk8s.io/v1alpha2`, what Kyverno's Policy
//! Reporter reads): one report per node a policy governs, scoped to the Node, with a result per
//! loopback rule id. A result is what the policy's status counts: `pass` only where a live agent
//! vouches for a current report, `fail` for a failing rule, `skip` for a rule that does not apply
//! or is exempted (with the exception), `error` for an agent in error or none that vouches. The
//! results carry no time that changes without the verdict, so an unchanged node is never written.

use super::vouch::{Vouch, vouch};
use super::{NodeInfo, Settings, exemption, reports_current};
use crate::api::{Compliance, LoopbackException, LoopbackNodeStateStatus, LoopbackPolicy};
use crate::selection;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;

pub const API_VERSION: &str = "wgpolicyk8s.io/v1alpha2";
pub const KIND: &str = "ClusterPolicyReport";
/// Each result's `source`: Policy Reporter groups results by it.
pub const SOURCE: &str = "loopguard";
/// The label on every report loopguard writes; it deletes only reports that carry it.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "loopguard");
const CATEGORY: &str = "CIS loopback traffic";
/// ComplianceAsCode's severity of the loopback rules.
const SEVERITY: &str = "medium";

/// One result of a report, as the CRD's schema names its fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportResult {
    pub source: String,
    pub policy: String,
    pub rule: String,
    pub category: String,
    pub severity: String,
    pub result: String,
    pub scored: bool,
    pub message: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<Timestamp>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    pub seconds: i64,
    pub nanos: i32,
}

/// The name of a node's report: `loopguard-NODE`, or a digest of the node's name where that would
/// be longer than an object name may be.
pub fn report_name(node: &str) -> String {
    let name = format!("loopguard-{node}");
    if name.len() <= 253 {
        return name;
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(node.as_bytes());
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("loopguard-node-{hex}")
}

/// The results of the node's report, None when no policy governs it (or it cannot run an agent):
/// it then has no report.
pub fn node_results(
    policies: &[&LoopbackPolicy],
    node: &NodeInfo,
    state: Option<&LoopbackNodeStateStatus>,
    exceptions: &[&LoopbackException],
    now: &Time,
    settings: Settings,
) -> Option<Vec<ReportResult>> {
    let policy = selection::governing(&node.labels, policies.iter().copied())?;
    if selection::unsupported(&node.labels).is_some() {
        return None;
    }
    let policy_name = policy.metadata.name.clone().unwrap_or_default();
    let current = state.filter(|s| reports_current(policy, s));
    let timestamp = state
        .and_then(|s| s.verdict_since.as_ref())
        .map(|t| Timestamp {
            seconds: t.0.as_second(),
            nanos: 0,
        });
    let result = |rule: &str, result: &str, message: String| ReportResult {
        source: SOURCE.into(),
        policy: policy_name.clone(),
        rule: rule.into(),
        category: CATEGORY.into(),
        severity: SEVERITY.into(),
        result: result.into(),
        scored: true,
        message,
        properties: BTreeMap::new(),
        timestamp: timestamp.clone(),
    };
    // The rules of the report: those the current report checked, else the one every node has.
    let rules: Vec<String> = match current.map(|s| &s.checks) {
        Some(checks) if !checks.is_empty() => checks.iter().map(|c| c.id.clone()).collect(),
        _ => vec![crate::rules::catalog::RuleId::Ipv6Loopback.to_string()],
    };
    let every = |verdict: &str, message: &str| -> Vec<ReportResult> {
        rules
            .iter()
            .map(|r| result(r, verdict, message.to_string()))
            .collect()
    };
    let errored = current.is_some_and(|s| s.compliance == Compliance::Error);
    match vouch(node, state, now, settings) {
        Vouch::PodDown(_) if errored => {}
        Vouch::PodDown(why) | Vouch::Stale(why) => {
            return Some(every(
                "error",
                &format!("no live loopguard agent vouches for the node: {why}"),
            ));
        }
        Vouch::Live => {}
    }
    let Some(report) = current else {
        return Some(every(
            "skip",
            "not verified yet: waiting for the agent's report for the policy's current generation",
        ));
    };
    if errored || report.checks.is_empty() {
        let verdict = match report.compliance {
            Compliance::Compliant => "pass",
            Compliance::NonCompliant => "fail",
            Compliance::NotApplicable => "skip",
            _ => "error",
        };
        return Some(every(
            verdict,
            &format!("{}: {}", report.reason, report.message),
        ));
    }
    let exempted_by = (report.compliance == Compliance::NonCompliant)
        .then(|| exemption::exempting(exceptions, &node.name, &node.labels, report, now))
        .flatten();
    Some(
        report
            .checks
            .iter()
            .map(|c| {
                let (verdict, message) = match c.verdict.as_str() {
                    "Pass" => ("pass", c.message.clone()),
                    "Fail" => match &exempted_by {
                        Some(by) => (
                            "skip",
                            format!(
                                "exempted by LoopbackException {}: {}",
                                by.join(", "),
                                c.message
                            ),
                        ),
                        None => ("fail", c.message.clone()),
                    },
                    "NotApplicable" | "Ignored" => ("skip", c.message.clone()),
                    _ => ("error", c.message.clone()),
                };
                let mut r = result(&c.id, verdict, message);
                r.properties.insert("family".into(), c.family.clone());
                r.properties.insert("mode".into(), c.mode.clone());
                r.properties.insert("reason".into(), c.reason.clone());
                if !c.cis.is_empty() {
                    r.properties.insert("cis".into(), c.cis.join(", "));
                }
                if verdict == "skip" && c.verdict == "Fail" {
                    r.properties.insert(
                        "exemptedBy".into(),
                        exempted_by.as_deref().unwrap_or_default().join(", "),
                    );
                }
                r
            })
            .collect(),
    )
}

/// The report object for a node (name, uid) and its results: scoped to, and owned by, the Node
/// (the garbage collector deletes it with the node), with the results' summary.
pub fn report_object(node: &str, uid: Option<&str>, results: &[ReportResult]) -> Value {
    let count = |r: &str| results.iter().filter(|x| x.result == r).count();
    let mut scope = json!({"apiVersion": "v1", "kind": "Node", "name": node});
    let mut metadata = json!({
        "name": report_name(node),
        "labels": {MANAGED_BY.0: MANAGED_BY.1},
    });
    if let Some(uid) = uid {
        scope["uid"] = json!(uid);
        metadata["ownerReferences"] = json!([{
            "apiVersion": "v1", "kind": "Node", "name": node, "uid": uid,
        }]);
    }
    json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "scope": scope,
        "summary": {
            "pass": count("pass"), "fail": count("fail"), "warn": count("warn"),
            "error": count("error"), "skip": count("skip"),
        },
        "results": results,
    })
}

/// What of a report decides whether it must be written again: its scope, summary and results.
pub fn content(report: &Value) -> Value {
    json!({
        "scope": report["scope"],
        "summary": report["summary"],
        "results": report["results"],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::AgentPod;
    use crate::api::node_state::RuleCheck;
    use crate::api::{LoopbackPolicySpec, Mode};
    use std::time::Duration;

    fn at(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    fn settings() -> Settings {
        Settings {
            not_ready_timeout: Duration::from_secs(300),
            heartbeat: Duration::from_secs(600),
            agent_grace: Duration::from_secs(120),
        }
    }

    fn policy() -> LoopbackPolicy {
        let mut p = LoopbackPolicy::new("base", LoopbackPolicySpec::default());
        p.metadata.generation = Some(1);
        p.metadata.creation_timestamp = Some(at("2026-01-01T00:00:00Z"));
        p
    }

    fn node(agent: AgentPod) -> NodeInfo {
        NodeInfo {
            name: "n1".into(),
            labels: BTreeMap::from([("pool".into(), "a".into())]),
            not_ready_since: None,
            created: Some(at("2026-01-01T00:00:00Z")),
            agent,
        }
    }

    fn check(id: &str, verdict: &str) -> RuleCheck {
        RuleCheck {
            id: id.into(),
            cis: vec!["debian12:4.4.3.2".into()],
            family: "iptables".into(),
            mode: "Enforce".into(),
            verdict: verdict.into(),
            applies: Some(verdict != "NotApplicable"),
            why: String::new(),
            reason: format!("{verdict}Reason"),
            message: format!("{id} {verdict}"),
        }
    }

    fn state(compliance: Compliance, checks: Vec<RuleCheck>) -> LoopbackNodeStateStatus {
        LoopbackNodeStateStatus {
            policy_name: Some("base".into()),
            policy_generation: Some(1),
            mode: Some(Mode::Enforce),
            compliance,
            reason: "R".into(),
            message: "m".into(),
            checks,
            last_verified_time: Some(at("2026-06-01T11:59:00Z")),
            verdict_since: Some(at("2026-06-01T10:00:00Z")),
            ..Default::default()
        }
    }

    fn results(
        node: &NodeInfo,
        s: Option<&LoopbackNodeStateStatus>,
        exceptions: &[&LoopbackException],
    ) -> Option<Vec<(String, String)>> {
        let p = policy();
        node_results(
            &[&p],
            node,
            s,
            exceptions,
            &at("2026-06-01T12:00:00Z"),
            settings(),
        )
        .map(|r| r.into_iter().map(|r| (r.rule, r.result)).collect())
    }

    fn pairs(p: &[(&str, &str)]) -> Option<Vec<(String, String)>> {
        Some(
            p.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        )
    }

    #[test]
    fn a_result_per_rule_as_the_live_agent_found_it() {
        let s = state(
            Compliance::NonCompliant,
            vec![
                check("set_ipv6_loopback_traffic", "Pass"),
                check("set_nftables_loopback_traffic", "Fail"),
                check("set_ufw_loopback_traffic", "NotApplicable"),
            ],
        );
        assert_eq!(
            results(&node(AgentPod::Ready), Some(&s), &[]),
            pairs(&[
                ("set_ipv6_loopback_traffic", "pass"),
                ("set_nftables_loopback_traffic", "fail"),
                ("set_ufw_loopback_traffic", "skip"),
            ])
        );
        let p = policy();
        let r = node_results(
            &[&p],
            &node(AgentPod::Ready),
            Some(&s),
            &[],
            &at("2026-06-01T12:00:00Z"),
            settings(),
        )
        .unwrap();
        assert_eq!(r[1].policy, "base");
        assert_eq!(r[1].source, "loopguard");
        assert_eq!(r[1].properties["cis"], "debian12:4.4.3.2");
        assert_eq!(
            r[1].timestamp,
            Some(Timestamp {
                seconds: at("2026-06-01T10:00:00Z").0.as_second(),
                nanos: 0
            }),
            "since the verdict, not the last verification: a heartbeat changes nothing"
        );
    }

    #[test]
    fn no_pass_without_a_live_agent_or_a_current_report() {
        let s = state(
            Compliance::Compliant,
            vec![check("set_ipv6_loopback_traffic", "Pass")],
        );
        let mut stale = s.clone();
        stale.last_verified_time = Some(at("2026-06-01T11:00:00Z"));
        assert_eq!(
            results(&node(AgentPod::Ready), Some(&stale), &[]),
            pairs(&[("set_ipv6_loopback_traffic", "error")])
        );
        let down = node(AgentPod::NotReady {
            since: Some(at("2026-06-01T11:50:00Z")),
        });
        let mut before = s.clone();
        before.last_verified_time = Some(at("2026-06-01T11:55:00Z"));
        assert_eq!(
            results(&down, Some(&before), &[]),
            pairs(&[("set_ipv6_loopback_traffic", "error")])
        );
        let mut older = s.clone();
        older.policy_generation = Some(0);
        assert_eq!(
            results(&node(AgentPod::Ready), Some(&older), &[]),
            pairs(&[("set_ipv6_loopback_traffic", "skip")])
        );
        let mut errored = state(Compliance::Error, vec![]);
        errored.reason = "BackendChanged".into();
        let r = {
            let p = policy();
            node_results(
                &[&p],
                &node(AgentPod::Ready),
                Some(&errored),
                &[],
                &at("2026-06-01T12:00:00Z"),
                settings(),
            )
            .unwrap()
        };
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].result, "error");
        assert!(
            r[0].message.starts_with("BackendChanged"),
            "{}",
            r[0].message
        );
    }

    #[test]
    fn an_exempted_failure_is_skipped_and_names_its_exception() {
        let s = state(
            Compliance::NonCompliant,
            vec![check("set_ufw_loopback_traffic", "Fail")],
        );
        let ex: LoopbackException = serde_json::from_value(json!({
            "apiVersion": "loopguard.dev/v1alpha1", "kind": "LoopbackException",
            "metadata": {"name": "ufw-pool"},
            "spec": {
                "nodeNames": ["n1"], "ruleIds": ["set_ufw_loopback_traffic"],
                "justification": "retired in January", "approvedBy": "Jane",
                "approvedAt": "2026-05-01T00:00:00Z", "ticket": "CHG-1",
                "expires": "2026-07-01T00:00:00Z",
            },
        }))
        .unwrap();
        let p = policy();
        let r = node_results(
            &[&p],
            &node(AgentPod::Ready),
            Some(&s),
            &[&ex],
            &at("2026-06-01T12:00:00Z"),
            settings(),
        )
        .unwrap();
        assert_eq!(r[0].result, "skip");
        assert_eq!(r[0].properties["exemptedBy"], "ufw-pool");
        assert!(
            r[0].message
                .contains("exempted by LoopbackException ufw-pool")
        );
        // Expired: a finding again.
        let r = node_results(
            &[&p],
            &node(AgentPod::Ready),
            Some(&s),
            &[&ex],
            &at("2026-07-02T00:00:00Z"),
            Settings {
                heartbeat: Duration::from_secs(100 * 86400),
                ..settings()
            },
        )
        .unwrap();
        assert_eq!(r[0].result, "fail");
    }

    #[test]
    fn a_node_no_policy_governs_has_no_report() {
        let mut p = policy();
        p.spec.node_selector.match_labels = BTreeMap::from([("pool".into(), "b".into())]);
        let s = state(Compliance::Compliant, vec![]);
        assert_eq!(
            node_results(
                &[&p],
                &node(AgentPod::Ready),
                Some(&s),
                &[],
                &at("2026-06-01T12:00:00Z"),
                settings()
            ),
            None
        );
    }

    #[test]
    fn the_object_is_scoped_to_and_owned_by_its_node() {
        let r = vec![
            ReportResult {
                source: SOURCE.into(),
                policy: "base".into(),
                rule: "set_ipv6_loopback_traffic".into(),
                category: CATEGORY.into(),
                severity: SEVERITY.into(),
                result: "pass".into(),
                scored: true,
                message: "ok".into(),
                properties: BTreeMap::new(),
                timestamp: None,
            };
            2
        ];
        let o = report_object("n1", Some("u-1"), &r);
        assert_eq!(o["metadata"]["name"], "loopguard-n1");
        assert_eq!(o["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert_eq!(o["scope"]["kind"], "Node");
        assert_eq!(o["summary"]["pass"], 2);
        assert_eq!(o["summary"]["fail"], 0);
        assert_eq!(content(&o)["results"].as_array().unwrap().len(), 2);
        let long = "n".repeat(250);
        assert!(report_name(&long).len() <= 253);
        assert_ne!(report_name(&long), report_name(&"m".repeat(250)));
    }
}
