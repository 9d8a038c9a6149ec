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

use chains::Chains;
use loopguard::node::facts::{ApplicabilityMode, BackendChoice};
use loopguard::node::{Engine, EngineConfig, Report};
use loopguard::rules::{Family, Placement};
use netns::TestNetns;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
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
        ..EngineConfig::default()
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
    foreign_at: Option<usize>,
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
    // `-save -c` shows rules, jumps and counters; the kernel's tables also show what `-save`
    // cannot (a look-alike such as `-i lo -p all -j ACCEPT` saves like loopguard's rule).
    let same = |step: &str| -> Result<(), TestCaseError> {
        let (a, b) = (saved(&kept), saved(&plain));
        prop_assert_eq!(a, b, "after {}", step);
        for family in [Family::Ipv6, Family::Ipv4] {
            let (a, b) = (kept.legacy_table(family), plain.legacy_table(family));
            prop_assert!(
                a.as_ref().map(|t| &t.blob) == b.as_ref().map(|t| &t.blob),
                "after {}: the {} tables differ in the kernel although they save alike",
                step,
                family
            );
        }
        Ok(())
    };

    // Enforce: both through the binaries (nothing known yet); the kept engine learns.
    let (fast, r) = in_netns(&kept, fast, |e| e.enforce().map(|r| r.compliant));
    prop_assert_eq!(r.map_err(|e| e.to_string()), Ok(true));
    let (slow, r) = in_netns(&plain, slow, |e| e.enforce().map(|r| r.compliant));
    prop_assert_eq!(r.map_err(|e| e.to_string()), Ok(true));
    same("enforce")?;

    // Drift: some of loopguard's rules deleted in both, by another program.
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
        if let Some(at) = foreign_at {
            // Another program inserts between loopguard's rules (or anywhere in INPUT): the
            // repair then moves loopguard's own pair, never a rule that only prints like it.
            let len = ns.run(&["ip6tables-legacy", "-S", "INPUT"]).lines().count() - 1;
            let position = (at % (len + 1) + 1).to_string();
            ns.run(&[
                "ip6tables-legacy",
                "-I",
                "INPUT",
                &position,
                "-p",
                "tcp",
                "-m",
                "tcp",
                "--dport",
                "7",
                "-j",
                "ACCEPT",
            ]);
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
    // A rule it has never seen (the foreign insert) sends the engine to the binaries once.
    if fast_report.wrote() && foreign_at.is_none() {
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
    let (mut runner, seed) = chains::runner("", 100);
    let strategy = (
        chains::chains(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        (any::<bool>(), any::<bool>(), any::<bool>()),
        prop::option::of(any::<usize>()),
    );
    if let Err(e) = runner.run(
        &strategy,
        |(c, append, ipv4, gotos, deletions, foreign_at)| {
            one_case(&c, append, ipv4, gotos, deletions, foreign_at)
        },
    ) {
        panic!("{e}\nreplay with LOOPGUARD_DIFF_SEED={seed}");
    }
}

/// The entry loopguard writes for each of its rules is the one `ip6tables-legacy` (and
/// `iptables-legacy`) writes for it, and not the one of a rule that only prints like it.
#[test]
fn loopguard_writes_the_entries_ip6tables_legacy_writes() {
    use loopguard::rules::Rule;
    use loopguard::rules::blob::rule_entry;
    for family in [Family::Ipv6, Family::Ipv4] {
        for rule in Rule::baseline(family) {
            let ns = TestNetns::new("entry");
            let command = format!("{}-legacy", family.command());
            let mut args = vec![command.clone(), "-A".into(), rule.chain().name().into()];
            args.extend(loopguard::rules::split_args(&rule.spec()));
            args.extend(["-p".into(), "all".into()]);
            ns.run(&args.iter().map(String::as_str).collect::<Vec<_>>());
            let plain = args.len() - 2;
            ns.run(&args[..plain].iter().map(String::as_str).collect::<Vec<_>>());
            let entries = ns.legacy_entries(family, rule.chain());
            assert_eq!(entries.len(), 2);
            assert_eq!(entries[1], rule_entry(rule), "{family} {rule}");
            if family == Family::Ipv6 {
                assert_ne!(
                    entries[0],
                    rule_entry(rule),
                    "{family} {rule} -p all is another entry"
                );
            }
            let listed = ns.run(&[&command, "-S", rule.chain().name()]);
            assert_eq!(
                listed.lines().filter(|l| *l == rule.save_syntax()).count(),
                2,
                "both print as {rule}: {listed}"
            );
        }
    }
}
