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
#[path = "support/engines.rs"]
mod engines;
#[path = "support/netns.rs"]
mod netns;

use chains::Chains;
use engines::{engine, forms_script, in_netns, step};
use loopguard::node::facts::BackendChoice;
use loopguard::rules::Family;
use netns::TestNetns;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

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
    let mut fast = engine(
        dir.path(),
        &kept,
        families.clone(),
        append,
        BackendChoice::Legacy,
    );
    let cache = fast.keep_legacy_tables();
    let slow = engine(
        dir.path(),
        &plain,
        families.clone(),
        append,
        BackendChoice::Legacy,
    );
    // `-save -c` shows rules, jumps and counters; the kernel's tables also show what `-save`
    // cannot (a look-alike such as `-i lo -p all -j ACCEPT` saves like loopguard's rule).
    let same = |step: &str| -> Result<(), TestCaseError> {
        let (a, b) = (saved(&kept), saved(&plain));
        prop_assert_eq!(a, b, "after {}", step);
        for family in [Family::Ipv6, Family::Ipv4] {
            let (a, b) = (kept.legacy_table(family), plain.legacy_table(family));
            prop_assert!(
                a.as_ref().map(|t| t.blob()) == b.as_ref().map(|t| t.blob()),
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

/// Rules outside the random grammar: every form the decoder covers, and forms it must leave to
/// the binaries (negations, dotted IPv6, masks that are no prefix, other matches and targets).
const IPV6_FORMS: &[&str] = &[
    "-s 2001:db8:1::1/128 -p tcp -m tcp --dport 1000 -j ACCEPT",
    "-d 2001:db8:2::1/128 -j REJECT --reject-with icmp6-port-unreachable",
    "-j REJECT --reject-with tcp-reset -p tcp",
    "-i eth0+ -j DROP",
    "-p udp -m udp --sport 53 --dport 1000:2000 -j ACCEPT",
    "-p tcp -m tcp --sport 1:1024 -j ACCEPT",
    "-d 2001:db8::/32 -o eth1 -j RETURN",
    "-s fe80::/10 -d ff02::1/128 -i eth2 -o eth3 -j ACCEPT",
    "-s ::1.2.3.4/128 -j DROP",
    "-s ::ffff:1.2.3.4/128 -j DROP",
    "! -s 2001:db8::1/128 -j DROP",
    "-p tcp -m tcp --tcp-flags SYN,ACK SYN -j ACCEPT",
    "-p tcp -m tcp ! --dport 22 -j ACCEPT",
    "-i lo -p all -j ACCEPT",
    "-s ::1/128 -p 0 -j DROP",
    "-j LG-USER-0",
    "-p tcp -g LG-USER-1",
    "-s 2001:db8::/ffff:ff00::",
    "-p sctp -j ACCEPT",
    "-m mark --mark 0x1 -j RETURN",
];

const IPV4_FORMS: &[&str] = &[
    "-s 10.0.0.0/8 -d 192.168.1.1/32 -p tcp -m tcp --dport 22 -j ACCEPT",
    "-o eth0 -j REJECT --reject-with icmp-port-unreachable",
    "-f -j DROP",
    "-s 127.0.0.0/8 -j DROP",
    "-i lo -j ACCEPT",
    "-s 10.1.2.0/255.0.255.0 -j DROP",
    "! -i eth0 -j DROP",
    "-i veth+ -p udp -m udp --dport 53 -j ACCEPT",
];

/// Every line the in-process decoder gives for an entry of INPUT or OUTPUT is the line
/// `*-legacy -S` prints for it; the forms it does not cover give none. Random tables from the
/// grammar, plus the fixed forms above, in both families.
#[test]
fn decoded_lines_are_what_iptables_legacy_prints() {
    use loopguard::rules::{Chain, decode};
    let (mut runner, seed) = chains::runner("", 100);
    let decoded = std::sync::atomic::AtomicUsize::new(0);
    let left = std::sync::atomic::AtomicUsize::new(0);
    let check = |ns: &TestNetns, family: Family| -> Result<(), TestCaseError> {
        let table = ns.legacy_table(family).expect("the filter table");
        let starts = table.chain_starts();
        for chain in Chain::ALL {
            let listed = ns.run(&[&format!("{}-legacy", family.command()), "-S", chain.name()]);
            let lines: Vec<&str> = listed.lines().skip(1).collect();
            let entries = table.chain(chain);
            prop_assert_eq!(entries.len(), lines.len(), "{} {}", family, chain);
            for (&e, line) in entries.iter().zip(&lines) {
                match decode::line(&table, e, &starts) {
                    Some(spec) => {
                        prop_assert_eq!(chains::rule_line(chain.name(), &spec), *line);
                        decoded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    None => {
                        left.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        }
        Ok(())
    };
    let fixed = TestNetns::new("dec");
    let users = ":LG-USER-0 - [0:0]\n:LG-USER-1 - [0:0]\n";
    // An empty rule too: a fall-through, which the decoder leaves to the binaries.
    fixed.restore(
        "ip6tables",
        "legacy",
        &forms_script(users, IPV6_FORMS, "-A INPUT\n"),
    );
    fixed.restore("iptables", "legacy", &forms_script("", IPV4_FORMS, ""));
    check(&fixed, Family::Ipv6).unwrap();
    check(&fixed, Family::Ipv4).unwrap();
    let fixed_left = left.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        fixed_left >= 20,
        "the forms the decoder does not cover were left to the binaries ({fixed_left})"
    );
    if let Err(e) = runner.run(&(chains::chains(), any::<bool>()), |(c, gotos)| {
        prop_assume!(c.input.iter().chain(&c.output).all(|r| !r.contains('\n')));
        let ns = TestNetns::new("dec");
        ns.restore_with("ip6tables", "legacy", "-c", &ipv6_script(&c, gotos));
        check(&ns, Family::Ipv6)
    }) {
        panic!("{e}\nreplay with LOOPGUARD_DIFF_SEED={seed}");
    }
    assert!(
        decoded.load(std::sync::atomic::Ordering::Relaxed) > 100,
        "the decoder covered most entries"
    );
}
