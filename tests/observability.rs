//! The chart's alerts, tested with promtool (built from the Prometheus Go module): they fire as
//! their tests in tests/alerts/ expect, and each links to a runbook section that exists. (The
//! end-to-end test runs every alert and dashboard query against a real Prometheus.)

mod support;

use std::process::Command;
use support::prometheus;

#[test]
fn the_alerts_fire_when_their_tests_say() {
    let bin = prometheus::bin_dir();
    let dir = tempfile::tempdir().unwrap();
    let rules = serde_json::json!({ "groups": prometheus::alert_groups() });
    std::fs::write(dir.path().join("rules.yaml"), rules.to_string()).unwrap();
    std::fs::copy(
        prometheus::repo_file("tests/alerts/loopguard.test.yaml"),
        dir.path().join("loopguard.test.yaml"),
    )
    .unwrap();
    let promtool = |args: &[&str]| {
        let mut c = Command::new(bin.join("promtool"));
        c.args(args).current_dir(dir.path());
        support::run(c, None)
    };
    let checked = promtool(&["check", "rules", "rules.yaml"]);
    assert!(checked.contains("SUCCESS: 8 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "loopguard.test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn every_alert_links_to_its_runbook() {
    let readme =
        std::fs::read_to_string(prometheus::repo_file("charts/loopguard/README.md")).unwrap();
    let anchors: Vec<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("### "))
        .map(|h| h.trim().to_lowercase())
        .collect();
    let groups = prometheus::alert_groups();
    let rules = groups[0]["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 8);
    for rule in rules {
        let alert = rule["alert"].as_str().unwrap();
        let url = rule["annotations"]["runbook_url"].as_str().unwrap();
        let anchor = url.rsplit_once('#').expect("an anchor").1;
        assert_eq!(anchor, alert.to_lowercase(), "{alert}");
        assert!(
            anchors.contains(&anchor.to_string()),
            "no runbook section for {alert}"
        );
    }
}

#[test]
fn alert_queries_are_the_expressions_without_their_threshold() {
    assert_eq!(
        prometheus::alert_query("(max by (node) (x{state=\"Error\"})) == 1"),
        "max by (node) (x{state=\"Error\"})"
    );
    assert_eq!(
        prometheus::alert_query("(max(x) or vector(0)) < 1"),
        "max(x) or vector(0)"
    );
    let queries = prometheus::queries();
    assert!(queries.len() >= 20, "{}", queries.len());
}

#[test]
fn metric_selectors_are_found_in_queries() {
    assert_eq!(
        prometheus::metric_selectors(
            "(max(loopguard_controller_leader) or vector(0)) + sum(rate(loopguard_agent_errors_total{kind=\"x\"}[5m]))"
        ),
        [
            "loopguard_controller_leader",
            "loopguard_agent_errors_total{kind=\"x\"}"
        ]
    );
    let queries = prometheus::queries();
    assert!(
        queries
            .iter()
            .any(|(_, q)| q == "loopguard_controller_leader"),
        "every alert's selector is a query of its own: {queries:?}"
    );
}
