use super::*;
use crate::api::{ConditionStatus, LoopbackPolicySpec, NodeSelector};

fn t(s: &str) -> Time {
    Time(s.parse().unwrap())
}

const NOW: &str = "2026-06-01T12:00:00Z";

fn policy(name: &str, generation: i64, priority: i32, selector: &[(&str, &str)]) -> LoopbackPolicy {
    let mut p = LoopbackPolicy::new(
        name,
        LoopbackPolicySpec {
            priority,
            node_selector: NodeSelector {
                match_labels: selector
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            },
            ..Default::default()
        },
    );
    p.metadata.generation = Some(generation);
    p.metadata.creation_timestamp = Some(t("2026-01-01T00:00:00Z"));
    p
}

fn node(name: &str, labels: &[(&str, &str)]) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        not_ready_since: None,
        created: Some(t("2026-01-01T00:00:00Z")),
        agent: AgentPod::Ready,
    }
}

fn report(policy: &str, generation: i64, compliance: Compliance) -> LoopbackNodeStateStatus {
    LoopbackNodeStateStatus {
        policy_name: Some(policy.into()),
        policy_generation: Some(generation),
        compliance,
        ..Default::default()
    }
}

fn run(
    p: &LoopbackPolicy,
    all: &[&LoopbackPolicy],
    nodes: &[NodeInfo],
    states: &[(&str, LoopbackNodeStateStatus)],
) -> LoopbackPolicyStatus {
    let states = states
        .iter()
        .map(|(n, s)| (n.to_string(), s.clone()))
        .collect();
    aggregate(
        p,
        all,
        nodes,
        &states,
        &[],
        None,
        &t(NOW),
        Settings::default(),
    )
}

fn cond(s: &LoopbackPolicyStatus, type_: &str) -> (ConditionStatus, String) {
    let c = s.conditions.iter().find(|c| c.type_ == type_).unwrap();
    (c.status, c.reason.clone())
}

#[test]
fn mixed_nodes_are_counted_and_not_compliant() {
    let p = policy("base", 3, 0, &[]);
    let nodes: Vec<NodeInfo> = ["a", "b", "c", "d", "e"]
        .iter()
        .map(|n| node(n, &[]))
        .collect();
    let s = run(
        &p,
        &[&p],
        &nodes,
        &[
            ("a", report("base", 3, Compliance::Compliant)),
            ("b", report("base", 3, Compliance::NonCompliant)),
            ("c", report("base", 3, Compliance::NotApplicable)),
            ("d", report("base", 3, Compliance::Error)),
            ("e", report("base", 2, Compliance::Compliant)),
        ],
    );
    assert_eq!(
        (
            s.targeted_nodes,
            s.compliant_nodes,
            s.non_compliant_nodes,
            s.not_applicable_nodes,
            s.errored_nodes,
            s.pending_nodes
        ),
        (5, 1, 1, 1, 1, 1)
    );
    assert_eq!(s.non_compliant_node_names, vec!["b", "d"]);
    assert_eq!(s.summary, "1/4", "NotApplicable nodes are left out");
    assert_eq!(
        cond(&s, "Compliant"),
        (ConditionStatus::False, "NodeErrors".into())
    );
    assert_eq!(
        cond(&s, "Progressing"),
        (ConditionStatus::True, "NodesPending".into())
    );
    assert_eq!(
        cond(&s, "Degraded"),
        (ConditionStatus::True, "NodeErrors".into())
    );
    assert!(
        s.conditions
            .iter()
            .all(|c| c.observed_generation == Some(3))
    );
}

#[test]
fn not_applicable_nodes_do_not_block_compliance() {
    let p = policy("base", 1, 0, &[]);
    let nodes = [node("a", &[]), node("b", &[])];
    let s = run(
        &p,
        &[&p],
        &nodes,
        &[
            ("a", report("base", 1, Compliance::Compliant)),
            ("b", report("base", 1, Compliance::NotApplicable)),
        ],
    );
    assert_eq!(
        cond(&s, "Compliant"),
        (ConditionStatus::True, "AllNodesCompliant".into())
    );
    assert_eq!(cond(&s, "Progressing").0, ConditionStatus::False);
    assert_eq!(cond(&s, "Degraded").0, ConditionStatus::False);
}

#[test]
fn a_policy_selecting_nothing_is_never_green() {
    let p = policy("typo", 1, 0, &[("role", "wrokers")]);
    let s = run(&p, &[&p], &[node("a", &[("role", "workers")])], &[]);
    assert_eq!(s.targeted_nodes, 0);
    assert_eq!(
        cond(&s, "Compliant"),
        (ConditionStatus::False, "NoTargetNodes".into())
    );
}

#[test]
fn a_spec_change_is_progressing_until_nodes_catch_up() {
    let mut p = policy("base", 1, 0, &[]);
    let nodes = [node("a", &[])];
    let before = run(
        &p,
        &[&p],
        &nodes,
        &[("a", report("base", 1, Compliance::Compliant))],
    );
    assert_eq!(cond(&before, "Compliant").0, ConditionStatus::True);
    p.metadata.generation = Some(2);
    let states: BTreeMap<String, LoopbackNodeStateStatus> =
        [("a".to_string(), report("base", 1, Compliance::Compliant))].into();
    let later = t("2026-06-01T12:05:00Z");
    let after = aggregate(
        &p,
        &[&p],
        &nodes,
        &states,
        &[],
        Some(&before),
        &later,
        Settings::default(),
    );
    assert_eq!(after.pending_nodes, 1);
    assert_eq!(
        cond(&after, "Compliant"),
        (ConditionStatus::Unknown, "AwaitingNodeReports".into())
    );
    assert_eq!(cond(&after, "Progressing").0, ConditionStatus::True);
    let progressing = after
        .conditions
        .iter()
        .find(|c| c.type_ == "Progressing")
        .unwrap();
    assert_eq!(
        progressing.last_transition_time, later,
        "Progressing flipped"
    );
    let degraded = after
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(
        degraded.last_transition_time,
        t(NOW),
        "Degraded stayed False"
    );
}

#[test]
fn overlapping_policies_report_overridden_nodes() {
    let base = policy("base", 1, 0, &[]);
    let workers = policy("workers", 1, 10, &[("role", "worker")]);
    let nodes = [
        node("w1", &[("role", "worker")]),
        node("w2", &[("role", "worker")]),
        node("cp", &[]),
    ];
    let all = [&base, &workers];
    let s = run(
        &base,
        &all,
        &nodes,
        &[("cp", report("base", 1, Compliance::Compliant))],
    );
    assert_eq!(
        (s.targeted_nodes, s.overridden_nodes, s.compliant_nodes),
        (1, 2, 1)
    );
    assert_eq!(cond(&s, "Compliant").0, ConditionStatus::True);
    let w = run(&workers, &all, &nodes, &[]);
    assert_eq!(
        (w.targeted_nodes, w.overridden_nodes, w.pending_nodes),
        (2, 0, 2)
    );
}

#[test]
fn a_node_stuck_not_ready_turns_degraded() {
    let p = policy("base", 1, 0, &[]);
    let mut down = node("down", &[]);
    down.not_ready_since = Some(t("2026-06-01T11:50:00Z"));
    let mut flapping = node("flap", &[]);
    flapping.not_ready_since = Some(t("2026-06-01T11:59:00Z"));
    let s = run(&p, &[&p], &[down, flapping], &[]);
    assert_eq!(
        cond(&s, "Degraded"),
        (ConditionStatus::True, "NodesNotReady".into())
    );
    let msg = &s
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap()
        .message;
    assert!(msg.contains("down") && !msg.contains("flap"), "{msg}");
}

#[test]
fn the_failing_list_is_short_and_sorted() {
    let p = policy("base", 1, 0, &[]);
    let nodes: Vec<NodeInfo> = (0..50).map(|i| node(&format!("n{i:02}"), &[])).collect();
    let states: Vec<(String, LoopbackNodeStateStatus)> = (0..50)
        .rev()
        .map(|i| {
            (
                format!("n{i:02}"),
                report("base", 1, Compliance::NonCompliant),
            )
        })
        .collect();
    let refs: Vec<(&str, LoopbackNodeStateStatus)> = states
        .iter()
        .map(|(n, s)| (n.as_str(), s.clone()))
        .collect();
    let s = run(&p, &[&p], &nodes, &refs);
    assert_eq!(s.non_compliant_nodes, 50);
    assert_eq!(s.non_compliant_node_names.len(), MAX_LISTED_NODES);
    assert_eq!(s.non_compliant_node_names[0], "n00");
    let msg = &s.conditions[0].message;
    assert!(msg.contains("and 15 more"), "{msg}");
}

#[test]
fn notices_fire_on_transitions_only() {
    let p = policy("base", 1, 0, &[]);
    let nodes = [node("a", &[]), node("b", &[])];
    let green = run(
        &p,
        &[&p],
        &nodes,
        &[
            ("a", report("base", 1, Compliance::Compliant)),
            ("b", report("base", 1, Compliance::Compliant)),
        ],
    );
    assert_eq!(notices(None, &green)[0].reason, "Compliant");
    assert!(notices(Some(&green), &green).is_empty());
    let red = run(
        &p,
        &[&p],
        &nodes,
        &[
            ("a", report("base", 1, Compliance::Compliant)),
            ("b", report("base", 1, Compliance::NonCompliant)),
        ],
    );
    let n = notices(Some(&green), &red);
    assert_eq!(n.len(), 1);
    assert!(n[0].warning && n[0].note.contains('b'));
    assert!(notices(Some(&red), &red).is_empty());
}

#[test]
fn cleanup_waits_for_followers_but_not_for_unreachable_nodes() {
    let p = policy("gone", 1, 0, &[]);
    let mut down = node("down", &[]);
    down.not_ready_since = Some(t("2026-06-01T11:00:00Z"));
    let nodes = [node("a", &[]), node("b", &[]), down];
    let mut states: BTreeMap<String, LoopbackNodeStateStatus> = [
        ("a".to_string(), report("gone", 1, Compliance::Compliant)),
        ("b".to_string(), report("other", 4, Compliance::Compliant)),
        ("down".to_string(), report("gone", 1, Compliance::Compliant)),
        (
            "vanished".to_string(),
            report("gone", 1, Compliance::Compliant),
        ),
    ]
    .into();
    let progress = cleanup_progress(&p, &nodes, &states, &t(NOW), Settings::default());
    assert_eq!(progress.waiting, vec!["a", "down", "vanished"]);
    assert_eq!(progress.unreachable, vec!["down", "vanished"]);
    assert!(!progress.done());
    states.insert("a".into(), report("gone", 1, Compliance::Unmanaged));
    assert!(cleanup_progress(&p, &nodes, &states, &t(NOW), Settings::default()).done());
}

fn verified_at(mut r: LoopbackNodeStateStatus, at: &str) -> LoopbackNodeStateStatus {
    r.last_verified_time = Some(t(at));
    r
}

#[test]
fn a_node_without_a_live_agent_is_unknown_never_green() {
    let p = policy("base", 1, 0, &[]);
    let compliant = |at| verified_at(report("base", 1, Compliance::Compliant), at);
    let mut not_ready = node("stopped", &[]);
    not_ready.agent = AgentPod::NotReady {
        since: Some(t("2026-06-01T11:57:00Z")),
    };
    let mut blip = node("blip", &[]);
    blip.agent = AgentPod::NotReady {
        since: Some(t("2026-06-01T11:59:30Z")),
    };
    let mut no_pod = node("nopod", &[]);
    no_pod.agent = AgentPod::Missing;
    let s = run(
        &p,
        &[&p],
        &[node("fine", &[]), not_ready, blip, no_pod, node("old", &[])],
        &[
            ("fine", compliant("2026-06-01T11:59:00Z")),
            ("stopped", compliant("2026-06-01T11:56:00Z")),
            ("blip", compliant("2026-06-01T11:50:00Z")),
            ("nopod", compliant("2026-06-01T11:55:00Z")),
            // Pod Ready, but the report is 20 minutes old: the agent is wedged.
            ("old", compliant("2026-06-01T11:40:00Z")),
        ],
    );
    assert_eq!(
        (s.targeted_nodes, s.compliant_nodes, s.unknown_nodes),
        (5, 2, 3),
        "{s:?}"
    );
    assert_eq!(s.non_compliant_node_names, vec!["nopod", "old", "stopped"]);
    assert_eq!(
        cond(&s, "Compliant"),
        (ConditionStatus::False, "AgentsUnavailable".into())
    );
    assert_eq!(
        cond(&s, "Degraded"),
        (ConditionStatus::True, "AgentsUnavailable".into())
    );
    assert_eq!(cond(&s, "Ready").0, ConditionStatus::False);
    assert_eq!(cond(&s, "Stalled").0, ConditionStatus::True);
    let message = &s.conditions[0].message;
    for why in [
        "stopped (its agent Pod is not Ready (for 3m0s))",
        "nopod (no agent Pod runs on it (for 5m0s))",
        "old (its agent last verified it 20m0s ago)",
    ] {
        assert!(message.contains(why), "{message}");
    }
}

#[test]
fn a_node_without_an_agent_and_without_a_report_is_not_silently_pending() {
    let p = policy("base", 1, 0, &[]);
    let mut fresh = node("fresh", &[]);
    fresh.agent = AgentPod::Missing;
    fresh.created = Some(t("2026-06-01T11:59:30Z"));
    let mut forgotten = node("forgotten", &[]);
    forgotten.agent = AgentPod::Missing;
    let s = run(&p, &[&p], &[fresh, forgotten], &[]);
    assert_eq!((s.pending_nodes, s.unknown_nodes), (1, 1));
    assert_eq!(s.non_compliant_node_names, vec!["forgotten"]);
}

#[test]
fn an_agent_that_reports_an_error_is_counted_as_an_error_not_as_missing() {
    let p = policy("base", 1, 0, &[]);
    let mut broken = node("broken", &[]);
    broken.agent = AgentPod::NotReady {
        since: Some(t("2026-06-01T11:00:00Z")),
    };
    let error = verified_at(report("base", 1, Compliance::Error), "2026-06-01T11:58:00Z");
    let s = run(&p, &[&p], &[broken], &[("broken", error)]);
    assert_eq!((s.errored_nodes, s.unknown_nodes), (1, 0));
    assert_eq!(
        cond(&s, "Compliant"),
        (ConditionStatus::False, "NodeErrors".into())
    );
}

#[test]
fn ready_is_what_gitops_tools_wait_for() {
    let p = policy("base", 1, 0, &[]);
    let nodes = [node("a", &[]), node("b", &[])];
    let green = run(
        &p,
        &[&p],
        &nodes,
        &[
            ("a", report("base", 1, Compliance::Compliant)),
            ("b", report("base", 1, Compliance::Compliant)),
        ],
    );
    assert_eq!(
        cond(&green, "Ready"),
        (ConditionStatus::True, "AllNodesCompliant".into())
    );
    assert_eq!(cond(&green, "Reconciling").0, ConditionStatus::False);
    assert_eq!(cond(&green, "Stalled").0, ConditionStatus::False);
    // Rolling out: Reconciling (kstatus: InProgress), not Stalled.
    let rolling = run(
        &p,
        &[&p],
        &nodes,
        &[("a", report("base", 1, Compliance::Compliant))],
    );
    assert_eq!(cond(&rolling, "Ready").0, ConditionStatus::False);
    assert_eq!(cond(&rolling, "Reconciling").0, ConditionStatus::True);
    assert_eq!(cond(&rolling, "Stalled").0, ConditionStatus::False);
    // An audit with findings did its job: Ready, not Compliant.
    let mut audit = policy("audit", 1, 0, &[]);
    audit.spec.mode = Mode::Audit;
    let s = run(
        &audit,
        &[&audit],
        &nodes,
        &[
            ("a", report("audit", 1, Compliance::NonCompliant)),
            ("b", report("audit", 1, Compliance::Compliant)),
        ],
    );
    assert_eq!(cond(&s, "Compliant").0, ConditionStatus::False);
    assert_eq!(
        cond(&s, "Ready"),
        (ConditionStatus::True, "AuditReported".into())
    );
    // Enforce mode with a node that stays non-compliant: stalled.
    let s = run(
        &p,
        &[&p],
        &nodes,
        &[
            ("a", report("base", 1, Compliance::NonCompliant)),
            ("b", report("base", 1, Compliance::Compliant)),
        ],
    );
    assert_eq!(cond(&s, "Ready").0, ConditionStatus::False);
    assert_eq!(
        cond(&s, "Stalled"),
        (ConditionStatus::True, "NodesNotCompliant".into())
    );
}

fn check(id: &str, verdict: &str) -> crate::api::RuleCheck {
    crate::api::RuleCheck {
        id: id.into(),
        cis: vec![],
        family: "nftables".into(),
        mode: "Enforce".into(),
        applies: Some(verdict != "NotApplicable"),
        why: String::new(),
        verdict: verdict.into(),
        reason: String::new(),
        message: String::new(),
    }
}

#[test]
fn nodes_no_agent_can_run_on_are_named_and_never_waited_for() {
    let p = policy("base", 1, 0, &[]);
    let mut win = node("win-1", &[("kubernetes.io/os", "windows")]);
    win.agent = AgentPod::Missing;
    let mut fargate = node(
        "fargate-ip-1",
        &[("eks.amazonaws.com/compute-type", "fargate")],
    );
    fargate.agent = AgentPod::Missing;
    let mut aci = node("virtual-node-aci", &[("type", "virtual-kubelet")]);
    aci.agent = AgentPod::Missing;
    let nodes = [
        node("a", &[("kubernetes.io/os", "linux")]),
        win,
        fargate,
        aci,
    ];
    let s = run(
        &p,
        &[&p],
        &nodes,
        &[("a", report("base", 1, Compliance::Compliant))],
    );
    assert_eq!((s.targeted_nodes, s.unsupported_nodes), (1, 3));
    assert_eq!(s.pending_nodes + s.unknown_nodes, 0);
    assert_eq!(
        s.unsupported_node_names,
        [
            "fargate-ip-1 (eks.amazonaws.com/compute-type=fargate)",
            "virtual-node-aci (type=virtual-kubelet)",
            "win-1 (kubernetes.io/os=windows)",
        ]
    );
    let compliant = s
        .conditions
        .iter()
        .find(|c| c.type_ == "Compliant")
        .unwrap();
    assert_eq!(compliant.status, ConditionStatus::True);
    assert!(
        compliant
            .message
            .contains("3 selected nodes cannot run an agent"),
        "{}",
        compliant.message
    );
    assert_eq!(s.summary, "1/1");

    // A policy that selects only such nodes targets none, and says why.
    let only = policy("windows", 1, 0, &[("kubernetes.io/os", "windows")]);
    let s = run(&only, &[&only], &nodes, &[]);
    assert_eq!(
        cond(&s, "Compliant"),
        (ConditionStatus::False, "NoTargetNodes".into())
    );
    let message = &s.conditions[0].message;
    assert!(
        message.contains("cannot run a loopguard agent: win-1"),
        "{message}"
    );
}

#[test]
fn the_policy_counts_nodes_per_rule_id_from_live_current_reports() {
    let p = policy("base", 2, 0, &[]);
    let with = |compliance, checks: Vec<crate::api::RuleCheck>| LoopbackNodeStateStatus {
        checks,
        ..report("base", 2, compliance)
    };
    let mut gone = node("d", &[]);
    gone.agent = AgentPod::Missing;
    gone.created = Some(t("2026-05-01T00:00:00Z"));
    let nodes = [node("a", &[]), node("b", &[]), node("c", &[]), gone];
    let s = run(
        &p,
        &[&p],
        &nodes,
        &[
            (
                "a",
                with(
                    Compliance::Compliant,
                    vec![
                        check("set_ipv6_loopback_traffic", "NotApplicable"),
                        check("set_nftables_loopback_traffic", "Pass"),
                        check("set_ufw_loopback_traffic", "Ignored"),
                    ],
                ),
            ),
            (
                "b",
                with(
                    Compliance::NonCompliant,
                    vec![
                        check("set_nftables_loopback_traffic", "Pass"),
                        check("set_ufw_loopback_traffic", "Fail"),
                        check("set_ipv6_loopback_traffic", "NotApplicable"),
                    ],
                ),
            ),
            // An older generation's report is not counted per rule either.
            (
                "c",
                LoopbackNodeStateStatus {
                    checks: vec![check("set_nftables_loopback_traffic", "Fail")],
                    ..report("base", 1, Compliance::NonCompliant)
                },
            ),
            // Nor is the report of a node no live agent vouches for.
            (
                "d",
                with(
                    Compliance::Compliant,
                    vec![check("set_nftables_loopback_traffic", "Pass")],
                ),
            ),
        ],
    );
    let tally = |id: &str| s.rules.iter().find(|r| r.id == id).cloned().unwrap();
    let ids: Vec<&str> = s.rules.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "set_ipv6_loopback_traffic",
            "set_nftables_loopback_traffic",
            "set_ufw_loopback_traffic"
        ],
        "the catalog's order"
    );
    assert_eq!(tally("set_ipv6_loopback_traffic").not_applicable, 2);
    let nft = tally("set_nftables_loopback_traffic");
    assert_eq!((nft.pass, nft.fail), (2, 0));
    let ufw = tally("set_ufw_loopback_traffic");
    assert_eq!((ufw.ignored, ufw.fail), (1, 1));
}

#[test]
fn an_approval_is_recorded_once_told_once_and_kept_after_its_annotations_go() {
    let nodes = [node("a", &[])];
    let states = BTreeMap::from([("a".to_string(), report("p", 1, Compliance::Compliant))]);
    let status = |p: &LoopbackPolicy, previous: Option<&LoopbackPolicyStatus>| {
        aggregate(
            p,
            &[p],
            &nodes,
            &states,
            &[],
            previous,
            &t(NOW),
            Settings::default(),
        )
    };
    let annotate = |p: &mut LoopbackPolicy, by: &str, reason: &str| {
        p.metadata.annotations = Some(BTreeMap::from([
            (crate::api::policy::APPROVED_BY.to_string(), by.to_string()),
            (
                crate::api::policy::APPROVAL_REASON.to_string(),
                reason.to_string(),
            ),
        ]));
    };
    let mut p = policy("p", 1, 0, &[]);
    let plain = status(&p, None);
    assert_eq!(plain.last_approval, None);

    // Written with the change at generation 2: recorded with it, and told once.
    p.metadata.generation = Some(2);
    annotate(&mut p, "dave", "CHG-42: node pool retired");
    let approved = status(&p, Some(&plain));
    let recorded = approved.last_approval.clone().expect("recorded");
    assert_eq!(
        (
            recorded.by.as_str(),
            recorded.reason.as_str(),
            recorded.generation
        ),
        ("dave", "CHG-42: node pool retired", Some(2))
    );
    let told: Vec<Notice> = notices(Some(&plain), &approved)
        .into_iter()
        .filter(|n| n.reason == "ChangeApproved")
        .collect();
    assert_eq!(told.len(), 1, "{told:?}");
    assert!(
        told[0].note.contains("dave") && told[0].note.contains("CHG-42") && !told[0].warning,
        "{told:?}"
    );

    // Later generations with the same annotations keep the generation it was first seen at, and
    // tell nothing new.
    p.metadata.generation = Some(3);
    let later = status(&p, Some(&approved));
    assert_eq!(later.last_approval, approved.last_approval);
    assert!(
        notices(Some(&approved), &later)
            .iter()
            .all(|n| n.reason != "ChangeApproved")
    );

    // The annotations removed: the record stays. A blank reason is no approval.
    p.metadata.annotations = None;
    assert_eq!(
        status(&p, Some(&later)).last_approval,
        approved.last_approval
    );
    annotate(&mut p, "eve", "  ");
    assert_eq!(
        status(&p, Some(&later)).last_approval,
        approved.last_approval
    );

    // A new approval replaces it.
    p.metadata.generation = Some(4);
    annotate(&mut p, "erin", "CHG-43");
    let next = status(&p, Some(&later)).last_approval.expect("replaced");
    assert_eq!((next.by.as_str(), next.generation), ("erin", Some(4)));
}

#[test]
fn a_deletion_says_who_approved_it_or_warns_that_no_one_did() {
    let mut p = policy("p", 1, 0, &[]);
    let (warning, note) = deletion_note(&p);
    assert!(warning && note.contains("without an approval"), "{note}");
    p.spec.mode = Mode::Audit;
    assert!(
        !deletion_note(&p).0,
        "an Audit policy's deletion switches nothing off"
    );
    p.metadata.annotations = Some(BTreeMap::from([
        (
            crate::api::policy::APPROVED_BY.to_string(),
            "dave".to_string(),
        ),
        (
            crate::api::policy::APPROVAL_REASON.to_string(),
            "CHG-44".to_string(),
        ),
    ]));
    p.spec.mode = Mode::Enforce;
    let (warning, note) = deletion_note(&p);
    assert!(
        !warning && note.contains("approved by dave: CHG-44"),
        "{note}"
    );
}

fn exception(name: &str, nodes: &[&str], rules: &[&str], expires: &str) -> LoopbackException {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "loopguard.dev/v1alpha1",
        "kind": "LoopbackException",
        "metadata": { "name": name },
        "spec": {
            "nodeNames": nodes,
            "ruleIds": rules,
            "justification": "replaced by the cloud firewall",
            "approvedBy": "Jane Auditor",
            "approvedAt": "2026-05-01T00:00:00Z",
            "ticket": "CHG-100",
            "expires": expires,
        },
    }))
    .unwrap()
}

fn failing(policy: &str, ids: &[&str]) -> LoopbackNodeStateStatus {
    let mut r = report(policy, 1, Compliance::NonCompliant);
    r.checks = [
        "set_ipv6_loopback_traffic",
        "set_nftables_loopback_traffic",
        "set_ufw_loopback_traffic",
    ]
    .iter()
    .map(|id| crate::api::RuleCheck {
        id: id.to_string(),
        cis: Vec::new(),
        family: String::new(),
        mode: "Enforce".into(),
        applies: Some(true),
        why: String::new(),
        verdict: if ids.contains(id) { "Fail" } else { "Pass" }.into(),
        reason: String::new(),
        message: String::new(),
    })
    .collect();
    r
}

#[test]
fn an_exception_exempts_only_the_rules_and_nodes_it_names_and_only_until_it_expires() {
    let p = policy("base", 1, 0, &[]);
    let nodes = [node("a", &[]), node("b", &[]), node("c", &[])];
    let states = BTreeMap::from([
        (
            "a".to_string(),
            failing("base", &["set_ufw_loopback_traffic"]),
        ),
        (
            "b".to_string(),
            failing(
                "base",
                &["set_ufw_loopback_traffic", "set_nftables_loopback_traffic"],
            ),
        ),
        ("c".to_string(), report("base", 1, Compliance::Compliant)),
    ]);
    let ufw = exception(
        "ufw-pool",
        &["a", "b"],
        &["set_ufw_loopback_traffic"],
        "2026-07-01T00:00:00Z",
    );
    let at = |now: &str| {
        aggregate(
            &p,
            &[&p],
            &nodes,
            &states,
            &[&ufw],
            None,
            &t(now),
            Settings::default(),
        )
    };
    let s = at(NOW);
    // a fails only ufw: exempted; b fails nftables too: still failing.
    assert_eq!(
        (s.exempted_nodes, s.non_compliant_nodes, s.compliant_nodes),
        (1, 1, 1)
    );
    assert_eq!(s.exempted_node_names, ["a (ufw-pool)"]);
    assert_eq!(s.non_compliant_node_names, ["b"]);
    assert_eq!(cond(&s, "Compliant").0, ConditionStatus::False);
    assert_eq!(s.summary, "1/2 +1 exempted");

    // With b's nftables excepted too (a second exception), the policy is Compliant, saying so.
    let nft = exception(
        "nft-b",
        &["b"],
        &["set_nftables_loopback_traffic"],
        "2026-07-01T00:00:00Z",
    );
    let s = aggregate(
        &p,
        &[&p],
        &nodes,
        &states,
        &[&ufw, &nft],
        None,
        &t(NOW),
        Settings::default(),
    );
    assert_eq!((s.exempted_nodes, s.non_compliant_nodes), (2, 0));
    assert_eq!(
        s.exempted_node_names,
        ["a (ufw-pool)", "b (nft-b, ufw-pool)"]
    );
    let (status, reason) = cond(&s, "Compliant");
    assert_eq!(
        (status, reason.as_str()),
        (ConditionStatus::True, "CompliantWithExceptions")
    );

    // Expired: a is a finding again, by itself.
    let s = at("2026-07-01T00:00:00Z");
    assert_eq!((s.exempted_nodes, s.non_compliant_nodes), (0, 2));

    // A node in error or without a live agent is never exempted.
    let mut errored = states.clone();
    errored.insert("a".into(), report("base", 1, Compliance::Error));
    let s = aggregate(
        &p,
        &[&p],
        &nodes,
        &errored,
        &[&ufw],
        None,
        &t(NOW),
        Settings::default(),
    );
    assert_eq!((s.exempted_nodes, s.errored_nodes), (0, 1));
}

#[test]
fn an_exceptions_status_says_expired_or_matching_nothing() {
    let labelled = BTreeMap::from([("pool".to_string(), "legacy".to_string())]);
    let nodes: Vec<(&str, &BTreeMap<String, String>)> = vec![("a", &labelled)];
    let ex = exception(
        "x",
        &["a"],
        &["set_ufw_loopback_traffic"],
        "2026-07-01T00:00:00Z",
    );
    let s = exemption::status(&ex, &nodes, &["a".to_string()], &t(NOW));
    assert_eq!(
        (s.state, s.matched_nodes, s.exempted_nodes),
        (crate::api::ExceptionState::Active, 1, 1)
    );
    let s = exemption::status(&ex, &nodes, &[], &t("2026-08-01T00:00:00Z"));
    assert_eq!(s.state, crate::api::ExceptionState::Expired);
    assert!(s.message.contains("expired"), "{}", s.message);
    let gone = exception(
        "y",
        &["nope"],
        &["set_ufw_loopback_traffic"],
        "2026-07-01T00:00:00Z",
    );
    let s = exemption::status(&gone, &nodes, &[], &t(NOW));
    assert_eq!(s.state, crate::api::ExceptionState::MatchesNoNode);
    // By label: a selector that matches.
    let mut by_label = exception(
        "z",
        &[],
        &["set_ufw_loopback_traffic"],
        "2026-07-01T00:00:00Z",
    );
    by_label.spec.node_selector.match_labels = labelled.clone();
    assert_eq!(
        exemption::status(&by_label, &nodes, &[], &t(NOW)).matched_nodes,
        1
    );
}
