//! The legacy backend's in-process path on the real kernel, held against `ip6tables-legacy`
//! itself: two network namespaces get the same random tables (from the grammar of
//! `support/chains.rs`, plus jumps and gotos between user chains, FORWARD rules, IPv4 rules and
//! packet counters on every foreign rule). In one, an engine that keeps the legacy tables enforces,
//! has its rules deleted, repairs them and cleans up, writing through the kernel's table interface;
//! in the other, the same engine without it does the same through `ip6tables-legacy-restore`.
//! After every step both namespaces' `*-legacy-save -c` are identical: every foreign rule, jump and
//! counter exactly as iptables itself leaves them. The in-process path must actually have run.
//!
//! `LOOPGUARD_DIFF_CASES` cases (100 by default), seed from `LOOPGUARD_DIFF_SEED` or the clock.
//! Needs root.

#[path = "support/chains.rs"]
mod chains;
#[path = "support/netns.rs"]
mod netns;

use chains::{Chains, budget, seed};
use loopguard::node::facts::{ApplicabilityMode, BackendChoice};
use loopguard::node::{Engine, EngineConfig, Report};
use loopguard::rules::{EditKind, Family, Placement};
use netns::TestNetns;
use proptest::prelude::*;
use proptest::test_runner::{RngAlgorithm, TestCaseError, TestRng, TestRunner};
use std::collections::BTreeSet;
use std::path::Path;

/// The IPv6 script: the generated INPUT and OUTPUT, user chains that jump and go to each other,
/// FORWARD rules, and a counter on every rule (`[packets:bytes]`, as `-save -c` prints them).
fn ipv6_script(c: &Chains, gotos: bool) -> String {
    let mut s = String::from("*filter\n");
    for chain in chains::USER_CHAINS {
        s.push_str(&format!(":{chain} - [0:0]\n"));
    }
    let mut n = 0u64;
    let mut rule = |s: &mut String, chain: &str, spec: &str| {
        n += 1;
        s.push_str(&format!(
            "[{n}:{}] {}\n",
            n * 100,
            chains::rule_line(chain, spec)
        ));
    };
    rule(&mut s, "FORWARD", "-j LG-USER-0");
    for spec in &c.input {
        rule(&mut s, "INPUT", spec);
    }
    if gotos {
        rule(&mut s, "INPUT", "-p tcp -g LG-USER-1");
    }
    rule(&mut s, "FORWARD", "-p tcp -m tcp --dport 8080 -j ACCEPT");
    for spec in &c.output {
        rule(&mut s, "OUTPUT", spec);
    }
    rule(&mut s, "LG-USER-0", "-p udp -j LG-USER-1");
    rule(&mut s, "LG-USER-1", "-p tcp -j RETURN");
    s.push_str("COMMIT\n");
    s
}

const IPV4_SCRIPT: &str = "*filter\n:V4 - [0:0]\n[3:300] -A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\n\
[4:400] -A INPUT -j V4\n[5:500] -A OUTPUT -j V4\n[6:600] -A V4 -p udp -j RETURN\nCOMMIT\n";

/// `*-legacy-save -c` of both families without the comment lines: rules, jumps and counters.
fn saved(ns: &TestNetns) -> String {
    ["ip6tables", "iptables"]
        .iter()
        .map(|command| {
            ns.run(&[&format!("{command}-legacy-save"), "-c"])
                .lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs `f` on an engine in `ns` (in a thread of its own, which enters the namespace).
fn in_netns<T: Send + 'static>(
    ns: &TestNetns,
    engine: Engine,
    f: impl FnOnce(&mut Engine) -> T + Send + 'static,
) -> (Engine, T) {
    let name = ns.name.clone();
    std::thread::spawn(move || {
        loopguard::node::netns::enter(&name).expect("enter the namespace");
        let mut engine = engine;
        let out = f(&mut engine);
        (engine, out)
    })
    .join()
    .expect("engine thread")
}

/// One enforce or cleanup on `engine` in `ns`; an error fails the case. Returns the engine and
/// the report.
fn step(
    ns: &TestNetns,
    engine: Engine,
    f: impl FnOnce(&mut Engine) -> loopguard::Result<Report> + Send + 'static,
) -> Result<(Engine, Report), TestCaseError> {
    let (engine, report) = in_netns(ns, engine, f);
    let report = report.map_err(|e| TestCaseError::fail(e.to_string()))?;
    Ok((engine, report))
}

/// The rules `-S` lists in INPUT and OUTPUT of both families, as (family, rule line).
fn listed(ns: &TestNetns) -> BTreeSet<(Family, String)> {
    let mut rules = BTreeSet::new();
    for (family, command) in [(Family::Ipv6, "ip6tables"), (Family::Ipv4, "iptables")] {
        for chain in ["INPUT", "OUTPUT"] {
            for line in ns.run(&[&format!("{command}-legacy"), "-S", chain]).lines() {
                rules.insert((family, line.to_string()));
            }
        }
    }
    rules
}

/// Whether every rule `report` inserted was listed in `before`: only then can the in-process
/// path write it (it copies the kernel entry of a rule it has seen).
fn inserted_were_seen(report: &Report, before: &BTreeSet<(Family, String)>) -> bool {
    report
        .changes
        .iter()
        .flatten()
        .filter(|e| e.kind != EditKind::Delete)
        .all(|e| before.contains(&(e.family, e.rule.clone())))
}

fn engine(dir: &Path, ns: &TestNetns, families: Vec<Family>, append: bool) -> Engine {
    let config = EngineConfig {
        families,
        applicability: ApplicabilityMode::Always,
        placement: if append {
            Placement::Append
        } else {
            Placement::Insert
        },
        state_file: dir.join(format!("{}.json", ns.name)),
        host_root: dir.to_path_buf(),
        backend: BackendChoice::Legacy,
        wait: std::time::Duration::from_secs(5),
        lock_path: dir.join("xtables.lock"),
    };
    let name = ns.name.clone();
    std::thread::spawn(move || {
        loopguard::node::netns::enter(&name).unwrap();
        Engine::new(config).expect("engine")
    })
    .join()
    .unwrap()
}

fn one_case(
    c: &Chains,
    append: bool,
    ipv4: bool,
    gotos: bool,
    deletions: (bool, bool, bool),
) -> Result<(), TestCaseError> {
    prop_assume!(c.input.iter().chain(&c.output).all(|r| !r.contains('\n')));
    let (kept, plain) = (TestNetns::new("lk"), TestNetns::new("lk"));
    let dir = tempfile::tempdir().unwrap();
    for ns in [&kept, &plain] {
        ns.restore_with("ip6tables", "legacy", "-c", &ipv6_script(c, gotos));
        ns.restore_with("iptables", "legacy", "-c", IPV4_SCRIPT);
    }
    let families = if ipv4 {
        vec![Family::Ipv6, Family::Ipv4]
    } else {
        vec![Family::Ipv6]
    };
    let mut fast = engine(dir.path(), &kept, families.clone(), append);
    let cache = fast.keep_legacy_tables();
    let slow = engine(dir.path(), &plain, families.clone(), append);
    let same = |step: &str| -> Result<(), TestCaseError> {
        let (a, b) = (saved(&kept), saved(&plain));
        prop_assert_eq!(a, b, "after {}", step);
        Ok(())
    };

    // Enforce: both through the binaries (nothing known yet); the kept engine learns.
    let (fast, r) = in_netns(&kept, fast, |e| e.enforce().map(|r| r.compliant));
    prop_assert_eq!(r.map_err(|e| e.to_string()), Ok(true));
    let (slow, r) = in_netns(&plain, slow, |e| e.enforce().map(|r| r.compliant));
    prop_assert_eq!(r.map_err(|e| e.to_string()), Ok(true));
    same("enforce")?;

    // Drift: some of loopguard's rules deleted in both, by another program.
    let seen = listed(&kept);
    let specs = [
        ("INPUT", chains::ACCEPT_IN, deletions.0),
        ("INPUT", chains::DROP_SRC, deletions.1),
        ("OUTPUT", chains::ACCEPT_OUT, deletions.2),
    ];
    for ns in [&kept, &plain] {
        for (chain, spec, delete) in specs {
            if delete {
                let mut args = vec!["ip6tables-legacy".to_string(), "-D".into(), chain.into()];
                args.extend(spec.split(' ').map(String::from));
                let mut check: Vec<&str> = args.iter().map(String::as_str).collect();
                check[1] = "-C";
                if ns.exec(&check).status.success() {
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    ns.run(&args);
                }
            }
        }
        if ipv4 && deletions.1 {
            ns.run(&[
                "iptables-legacy",
                "-D",
                "INPUT",
                "-s",
                "127.0.0.0/8",
                "-j",
                "DROP",
            ]);
        }
    }
    let writes = cache.lock().unwrap().writes;
    let (fast, fast_report) = step(&kept, fast, |e| e.enforce())?;
    let (slow, slow_report) = step(&plain, slow, |e| e.enforce())?;
    prop_assert!(fast_report.compliant && slow_report.compliant);
    prop_assert_eq!(
        fast_report.changes.clone(),
        slow_report.changes.clone(),
        "the same repair"
    );
    same("the repair")?;
    if fast_report.wrote() && inserted_were_seen(&fast_report, &seen) {
        prop_assert!(
            cache.lock().unwrap().writes > writes,
            "the repair was written in process"
        );
    }

    // Cleanup: what loopguard inserted goes, in process, and nothing else moves.
    let writes = cache.lock().unwrap().writes;
    let (_, fast_report) = step(&kept, fast, |e| e.cleanup())?;
    let (_, slow_report) = step(&plain, slow, |e| e.cleanup())?;
    prop_assert_eq!(
        fast_report.changes.clone(),
        slow_report.changes.clone(),
        "the same cleanup"
    );
    same("cleanup")?;
    if fast_report.wrote() {
        prop_assert!(
            cache.lock().unwrap().writes > writes,
            "cleanup was written in process"
        );
    }
    prop_assert!(
        cache.lock().unwrap().reads > 0,
        "tables were read in process"
    );
    Ok(())
}

#[test]
fn in_process_edits_match_ip6tables_legacy() {
    let (cases, seed) = (budget(), seed());
    eprintln!("{cases} cases, seed {seed} (replay with LOOPGUARD_DIFF_SEED={seed})");
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = ProptestConfig {
        cases,
        failure_persistence: None,
        max_shrink_iters: 100,
        ..ProptestConfig::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes));
    let strategy = (
        chains::chains(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        (any::<bool>(), any::<bool>(), any::<bool>()),
    );
    if let Err(e) = runner.run(&strategy, |(c, append, ipv4, gotos, deletions)| {
        one_case(&c, append, ipv4, gotos, deletions)
    }) {
        panic!("{e}\nreplay with LOOPGUARD_DIFF_SEED={seed}");
    }
}
