//! The evidence as OSCAL assessment results (JSON, OSCAL 1.1), for the tools compliance teams run:
//! one result for the report; per node an inventory item and an observation (its verdict, how it
//! was found, when its agent last verified it), and per node and loopback rule that applies a
//! finding on the rule's ComplianceAsCode id (satisfied or not). Pure: built from the `Evidence`.

use super::{Evidence, NodeEvidence};
use serde_json::{Value, json};
use std::hash::{Hash, Hasher};

/// The OSCAL version the document follows.
pub const OSCAL_VERSION: &str = "1.1.2";

/// A UUID (version-4 layout) derived from the report's time and cluster and `parts`, so that one
/// report's references agree and two reports never share one.
fn uuid(e: &Evidence, parts: &[&str]) -> String {
    let mut bytes = [0u8; 16];
    for (half, chunk) in bytes.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (half, &e.generated_at, &e.cluster, &e.cluster_uid, parts).hash(&mut h);
        chunk.copy_from_slice(&h.finish().to_be_bytes());
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A rule's full XCCDF id (ComplianceAsCode's short ids get their prefix), one form throughout.
fn xccdf_id(id: &str) -> String {
    const PREFIX: &str = "xccdf_org.ssgproject.content_rule_";
    if id.starts_with(PREFIX) {
        id.to_string()
    } else {
        format!("{PREFIX}{id}")
    }
}

/// A property in loopguard's namespace.
fn prop(name: &str, value: &str) -> Value {
    json!({ "name": name, "ns": "https://loopguard.dev/ns/oscal", "value": value })
}

fn observation(e: &Evidence, n: &NodeEvidence) -> Value {
    let mut props = vec![
        prop("verdict", &n.verdict),
        prop("reason", non_empty(&n.reason)),
    ];
    if let Some(p) = &n.policy {
        props.push(prop("policy", p));
    }
    if let Some(b) = &n.backend {
        props.push(prop("backend", b));
    }
    if let Some(t) = &n.non_compliant_since {
        props.push(prop("non-compliant-since", t));
    }
    for x in &n.exempted_by {
        props.push(prop("exempted-by", x));
    }
    let mut o = json!({
        "uuid": uuid(e, &["observation", &n.node]),
        "title": format!("{}: {}", n.node, n.verdict),
        "description": format!("{}: {}", non_empty(&n.reason), non_empty(&n.message)),
        "props": props,
        "methods": ["TEST"],
        "types": ["finding"],
        "subjects": [{
            "subject-uuid": uuid(e, &["node", &n.node]),
            "type": "inventory-item",
            "title": n.node,
        }],
        "collected": n.last_verified_time.clone().unwrap_or_else(|| e.generated_at.clone()),
    });
    if !n.rules_present.is_empty() {
        o["relevant-evidence"] = json!([{
            "description": format!("rules present: {}", n.rules_present.join("; ")),
        }]);
    }
    o
}

/// OSCAL strings must not be empty.
fn non_empty(text: &str) -> &str {
    if text.trim().is_empty() { "-" } else { text }
}

/// The findings of one node: one per loopback rule that applies (or cannot be told), else one
/// on the report's rule.
fn findings(e: &Evidence, n: &NodeEvidence) -> Vec<Value> {
    let observation = uuid(e, &["observation", &n.node]);
    let vouched = !matches!(n.verdict.as_str(), "Unknown" | "Missing" | "Error");
    let mut rows: Vec<(String, bool, String)> = n
        .checks
        .iter()
        .filter(|c| c.applies != Some(false) && c.verdict != "Ignored")
        .map(|c| {
            (
                xccdf_id(&c.id),
                // A node nobody vouches for satisfies nothing, whatever it said last.
                c.verdict == "Pass" && vouched,
                format!("{}: {}", c.verdict, non_empty(&c.reason)),
            )
        })
        .collect();
    if rows.is_empty() && n.verdict != "NotApplicable" && n.verdict != "Unmanaged" {
        rows.push((
            xccdf_id(&e.rule.id),
            n.verdict == "Compliant",
            format!("{}: {}", n.verdict, non_empty(&n.reason)),
        ));
    }
    rows.into_iter()
        .map(|(id, ok, why)| {
            json!({
                "uuid": uuid(e, &["finding", &n.node, &id]),
                "title": format!("{id} on {}", n.node),
                "description": why,
                "target": {
                    "type": "objective-id",
                    "target-id": id,
                    "status": { "state": if ok { "satisfied" } else { "not-satisfied" } },
                },
                "related-observations": [{ "observation-uuid": observation }],
            })
        })
        .collect()
}

/// The assessment results document.
pub fn render(e: &Evidence) -> String {
    let mut inventory: Vec<Value> = e
        .nodes
        .iter()
        .map(|n| {
            json!({
                "uuid": uuid(e, &["node", &n.node]),
                "description": format!("Kubernetes node {}", n.node),
                "props": [prop("node-name", &n.node)],
            })
        })
        .collect();
    inventory.dedup();
    let rule_ids: std::collections::BTreeSet<String> = e
        .rules
        .iter()
        .map(|r| xccdf_id(&r.id))
        .chain(std::iter::once(xccdf_id(&e.rule.id)))
        .collect();
    let mut result = json!({
        "uuid": uuid(e, &["result"]),
        "title": "loopguard report",
        "description": format!(
            "The loopback firewall rules of the CIS benchmarks ({}) on every node loopguard reports on, from {}",
            e.rule.references.join("; "),
            e.cluster
        ),
        "start": e.generated_at,
        "end": e.generated_at,
        "props": [
            prop("cluster", &e.cluster),
            prop("nodes", &e.summary.nodes.to_string()),
            prop("compliant", &e.summary.compliant.to_string()),
            prop("failing", &e.summary.failing().to_string()),
        ],
        "reviewed-controls": {
            "control-selections": [{
                "include-controls": rule_ids
                    .iter()
                    .map(|id| json!({ "control-id": id }))
                    .collect::<Vec<_>>(),
            }],
        },
        "observations": e.nodes.iter().map(|n| observation(e, n)).collect::<Vec<_>>(),
        "findings": e.nodes.iter().flat_map(|n| findings(e, n)).collect::<Vec<_>>(),
    });
    if !inventory.is_empty() {
        result["local-definitions"] = json!({ "inventory-items": inventory });
    }
    if let Some(uid) = &e.cluster_uid {
        result["props"]
            .as_array_mut()
            .expect("props")
            .push(prop("cluster-uid", uid));
    }
    if result["observations"].as_array().is_some_and(Vec::is_empty) {
        result
            .as_object_mut()
            .expect("object")
            .remove("observations");
    }
    if result["findings"].as_array().is_some_and(Vec::is_empty) {
        result.as_object_mut().expect("object").remove("findings");
    }
    let document = json!({
        "assessment-results": {
            "uuid": uuid(e, &["document"]),
            "metadata": {
                "title": format!("loopguard report of {}", e.cluster),
                "last-modified": e.generated_at,
                "version": e.loopguard_version,
                "oscal-version": OSCAL_VERSION,
                "props": [prop("generator", &format!("loopguard {}", e.loopguard_version))],
            },
            // No assessment plan document exists: the plan is the policies the report names.
            "import-ap": { "href": "#loopguard-policies", "remarks": "The assessment plan is the LoopbackPolicies in force, listed in loopguard report -o json." },
            "results": [result],
        }
    });
    serde_json::to_string_pretty(&document).expect("serializes") + "\n"
}
