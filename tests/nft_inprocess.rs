//! The nft backend's in-process path (`node::nft_rules`) on the real kernel, held against
//! `ip6tables-nft` itself: two network namespaces get the same random chains (the grammar of
//! `support/chains.rs`, IPv4 rules too). In one, an engine that keeps the nft rules enforces,
//! has rules deleted and another program's rule inserted, repairs and cleans up, writing its
//! inserts as netlink transactions; in the other, the same engine without it does the same through
//! `ip6tables-nft-restore`. After every step both namespaces' `nft -j list ruleset` (rule handles
//! aside) are identical: every expression of every rule, loopguard's included, is what iptables-nft
//! writes. The in-process write must actually have run.
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

const IPV4_SCRIPT: &str = "*filter\n:V4 - [0:0]\n-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\n\
-A INPUT -j V4\n-A OUTPUT -j V4\n-A V4 -p udp -j RETURN\nCOMMIT\n";

/// `nft -j list ruleset` without the rule handles (the same rules in the same order, whatever
/// numbers the kernel gave them).
fn ruleset(ns: &TestNetns) -> serde_json::Value {
    let mut json: serde_json::Value =
        serde_json::from_str(&ns.run(&["nft", "-j", "list", "ruleset"])).expect("nft -j");
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                map.remove("handle");
                map.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut json);
    json
}

fn one_case(
    c: &Chains,
    append: bool,
    ipv4: bool,
    deletions: (bool, bool, bool),
    foreign_at: Option<usize>,
) -> Result<(), TestCaseError> {
    prop_assume!(c.input.iter().chain(&c.output).all(|r| !r.contains('\n')));
    let (kept, plain) = (TestNetns::new("ni"), TestNetns::new("ni"));
    let dir = tempfile::tempdir().unwrap();
    // The built-in chains declared: iptables-nft creates them only when used, and a chain that
    // is not there yet is created by the binaries (the in-process path only adds rules).
    let script = c.restore_script().replacen(
        "*filter\n",
        "*filter\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n",
        1,
    );
    for ns in [&kept, &plain] {
        ns.restore("ip6tables", "nft", &script);
        ns.restore("iptables", "nft", IPV4_SCRIPT);
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
        BackendChoice::Nft,
    );
    let cache = fast.keep_nft_rules();
    // The notifications followed, as the watch does: a read after deletions takes the last
    // read without the deleted rules, and a write's new rules come back with their handles.
    let following = cache.clone();
    let (fast, ()) = in_netns(&kept, fast, move |_| following.lock().unwrap().follow());
    let slow = engine(
        dir.path(),
        &plain,
        families.clone(),
        append,
        BackendChoice::Nft,
    );
    let same = |step: &str| -> Result<(), TestCaseError> {
        prop_assert_eq!(ruleset(&kept), ruleset(&plain), "after {}", step);
        Ok(())
    };

    let (fast, r) = step(&kept, fast, |e| e.enforce())?;
    let (slow, s) = step(&plain, slow, |e| e.enforce())?;
    prop_assert!(r.compliant && s.compliant);
    prop_assert_eq!(r.changes.clone(), s.changes.clone(), "the same enforce");
    same("enforce")?;
    if r.wrote() {
        prop_assert!(cache.lock().unwrap().writes > 0, "written in process");
    }
    let enforced_in_process = !r.wrote() || cache.lock().unwrap().writes > 0;

    // Drift: some of loopguard's rules deleted in both, another program's rule inserted.
    let specs = [
        ("INPUT", chains::ACCEPT_IN, deletions.0),
        ("INPUT", chains::DROP_SRC, deletions.1),
        ("OUTPUT", chains::ACCEPT_OUT, deletions.2),
    ];
    // Whether a rule was deleted in `kept` (one that is not there is not).
    let mut deleted = false;
    for ns in [&kept, &plain] {
        for (chain, spec, delete) in specs {
            if delete {
                let mut args = vec!["ip6tables-nft".to_string(), "-D".into(), chain.into()];
                args.extend(spec.split(' ').map(String::from));
                let mut check: Vec<&str> = args.iter().map(String::as_str).collect();
                check[1] = "-C";
                if ns.exec(&check).status.success() {
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    ns.run(&args);
                    deleted |= ns.name == kept.name;
                }
            }
        }
        if let Some(at) = foreign_at {
            let len = ns.run(&["ip6tables-nft", "-S", "INPUT"]).lines().count() - 1;
            let position = (at % (len + 1) + 1).to_string();
            ns.run(&[
                "ip6tables-nft",
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
                "iptables-nft",
                "-D",
                "INPUT",
                "-s",
                "127.0.0.0/8",
                "-j",
                "DROP",
            ]);
            deleted |= ns.name == kept.name;
        }
    }
    let (writes, replayed) = {
        let c = cache.lock().unwrap();
        (c.writes, c.replayed)
    };
    let (fast, r) = step(&kept, fast, |e| e.enforce())?;
    let (slow, s) = step(&plain, slow, |e| e.enforce())?;
    prop_assert!(r.compliant && s.compliant);
    prop_assert_eq!(r.changes.clone(), s.changes.clone(), "the same repair");
    same("the repair")?;
    if enforced_in_process && deleted && foreign_at.is_none() {
        prop_assert_eq!(
            cache.lock().unwrap().replayed,
            replayed + 1,
            "only deletions since the write: the repair's read is the last one without them"
        );
    }
    if foreign_at.is_some() {
        prop_assert_eq!(
            cache.lock().unwrap().replayed,
            replayed,
            "a rule added to INPUT: listed again"
        );
    }
    let inserts_only = r
        .changes
        .iter()
        .flatten()
        .all(|e| !matches!(e.kind, loopguard::rules::EditKind::Delete));
    if r.wrote() && inserts_only {
        prop_assert!(
            cache.lock().unwrap().writes > writes,
            "the repair was written in process"
        );
    }

    // Cleanup (deletes: the binaries), then both are as loaded.
    let (_, r) = step(&kept, fast, |e| e.cleanup())?;
    let (_, s) = step(&plain, slow, |e| e.cleanup())?;
    prop_assert_eq!(r.changes.clone(), s.changes.clone(), "the same cleanup");
    same("cleanup")?;
    prop_assert!(cache.lock().unwrap().reads > 0, "chains read in process");
    Ok(())
}

#[test]
fn in_process_inserts_match_ip6tables_nft() {
    let (mut runner, seed) = chains::runner("", 100);
    let strategy = (
        chains::chains(),
        any::<bool>(),
        any::<bool>(),
        (any::<bool>(), any::<bool>(), any::<bool>()),
        prop::option::of(any::<usize>()),
    );
    if let Err(e) = runner.run(&strategy, |(c, append, ipv4, deletions, foreign_at)| {
        one_case(&c, append, ipv4, deletions, foreign_at)
    }) {
        panic!("{e}\nreplay with LOOPGUARD_DIFF_SEED={seed}");
    }
}

/// Each of loopguard's rules, written in process, is the rule `ip6tables-nft` (`iptables-nft`)
/// writes for it: the same `nft -j list ruleset` and the same netlink expressions
/// (`nft --debug=netlink`), counters included.
#[test]
fn loopguard_writes_the_rules_ip6tables_nft_writes() {
    let theirs = TestNetns::new("nfw");
    let ours = TestNetns::new("nfw");
    let dir = tempfile::tempdir().unwrap();
    let foreign =
        "*filter\n-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\n-A OUTPUT -j ACCEPT\nCOMMIT\n";
    for ns in [&theirs, &ours] {
        ns.restore("ip6tables", "nft", foreign);
        ns.restore(
            "iptables",
            "nft",
            foreign.replace("tcp -m tcp", "udp -m udp").as_str(),
        );
    }
    for (command, rules) in [
        (
            "ip6tables-nft",
            [
                "-I INPUT 1 -i lo -j ACCEPT",
                "-I INPUT 2 -s ::1/128 -j DROP",
                "-I OUTPUT 1 -o lo -j ACCEPT",
            ],
        ),
        (
            "iptables-nft",
            [
                "-I INPUT 1 -i lo -j ACCEPT",
                "-I INPUT 2 -s 127.0.0.0/8 -j DROP",
                "-I OUTPUT 1 -o lo -j ACCEPT",
            ],
        ),
    ] {
        for rule in rules {
            let mut args = vec![command];
            args.extend(rule.split(' '));
            theirs.run(&args);
        }
    }
    let mut engine = engine(
        dir.path(),
        &ours,
        vec![Family::Ipv6, Family::Ipv4],
        false,
        BackendChoice::Nft,
    );
    let cache = engine.keep_nft_rules();
    let (_, report) = in_netns(&ours, engine, |e| e.enforce());
    let report = report.expect("enforce");
    assert!(report.compliant);
    assert_eq!(report.changes.as_ref().map(Vec::len), Some(6), "{report:?}");
    assert_eq!(
        cache.lock().unwrap().writes,
        1,
        "one transaction in process"
    );
    assert_eq!(ruleset(&ours), ruleset(&theirs));
    let netlink = |ns: &TestNetns| {
        ns.run(&["nft", "--debug=netlink", "list", "ruleset"])
            .lines()
            .filter(|l| l.trim_start().starts_with('['))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let ours_netlink = netlink(&ours);
    assert!(
        ours_netlink.iter().any(|l| l.contains("meta load iifname")),
        "{ours_netlink:?}"
    );
    assert_eq!(ours_netlink, netlink(&theirs));
}

/// Rules outside the random grammar: the forms the decoder covers and forms it must leave to the
/// binaries (ranges, bitwise prefixes, negations, other matches and targets).
const IPV6_FORMS: &[&str] = &[
    "-s 2001:db8:1::1/128 -p tcp -m tcp --dport 1000 -j ACCEPT",
    "-d 2001:db8:2::1/128 -j REJECT --reject-with icmp6-port-unreachable",
    "-j REJECT --reject-with tcp-reset -p tcp",
    "-i eth0+ -j DROP",
    "-p udp -m udp --sport 53 --dport 1000:2000 -j ACCEPT",
    "-p udp -m udp --sport 53 --dport 1000 -j ACCEPT",
    "-p tcp -m tcp --sport 1:1024 -j ACCEPT",
    "-d 2001:db8::/32 -o eth1 -j RETURN",
    "-s fe80::/10 -d ff02::1/128 -i eth2 -o eth3 -j ACCEPT",
    "-s 2001:db8::/64 -j ACCEPT",
    "-s ::ffff:1.2.3.4/128 -j DROP",
    "! -s 2001:db8::1/128 -j DROP",
    "-p tcp -m tcp --tcp-flags SYN,ACK SYN -j ACCEPT",
    "-p tcp -m tcp ! --dport 22 -j ACCEPT",
    "-p tcp -m tcp -j ACCEPT",
    "-i lo -p all -j ACCEPT",
    "-j LG-USER-0",
    "-p tcp -g LG-USER-1",
    "-p sctp -j ACCEPT",
    "-m comment --comment ssh -j ACCEPT",
    "-m mark --mark 0x1 -j RETURN",
];

const IPV4_FORMS: &[&str] = &[
    "-s 10.0.0.0/8 -d 192.168.1.1/32 -p tcp -m tcp --dport 22 -j ACCEPT",
    "-o eth0 -j REJECT --reject-with icmp-port-unreachable",
    "-s 127.0.0.0/8 -j DROP",
    "-i lo -j ACCEPT",
    "-s 10.1.2.0/255.0.255.0 -j DROP",
    "-s 10.1.0.0/12 -j DROP",
    "! -i eth0 -j DROP",
    "-i veth+ -p udp -m udp --dport 53 -j ACCEPT",
];

/// Every line decoded in process from a rule's netlink expressions is the line `ip6tables-nft -S`
/// / `iptables-nft -S` prints for it; the forms not covered decode to nothing.
#[test]
fn decoded_lines_are_what_iptables_nft_prints() {
    use loopguard::rules::Chain;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let decoded = AtomicUsize::new(0);
    let left = AtomicUsize::new(0);
    let check = |ns: &TestNetns, family: Family| -> Result<(), TestCaseError> {
        let name = ns.name.clone();
        let listed = std::thread::spawn(move || {
            loopguard::node::netns::enter(&name).unwrap();
            Chain::ALL.map(|chain| {
                loopguard::node::nft::iptables_chain(family, chain)
                    .expect("listing over netlink")
                    .unwrap_or_default()
            })
        })
        .join()
        .unwrap();
        for (chain, rules) in Chain::ALL.into_iter().zip(listed) {
            let printed = ns.run(&[&format!("{}-nft", family.command()), "-S", chain.name()]);
            let lines: Vec<&str> = printed.lines().filter(|l| l.starts_with("-A")).collect();
            prop_assert_eq!(rules.len(), lines.len(), "{} {}", family, chain);
            for (rule, line) in rules.iter().zip(&lines) {
                match &rule.line {
                    Some(spec) => {
                        prop_assert_eq!(chains::rule_line(chain.name(), spec), *line);
                        decoded.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {
                        left.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        Ok(())
    };
    let fixed = TestNetns::new("ndec");
    let users = ":LG-USER-0 - [0:0]\n:LG-USER-1 - [0:0]\n";
    fixed.restore("ip6tables", "nft", &forms_script(users, IPV6_FORMS, ""));
    fixed.restore("iptables", "nft", &forms_script("", IPV4_FORMS, ""));
    check(&fixed, Family::Ipv6).unwrap();
    check(&fixed, Family::Ipv4).unwrap();
    let fixed_left = left.load(Ordering::Relaxed);
    assert!(
        fixed_left >= 20,
        "the forms the decoder does not cover were left to the binaries ({fixed_left})"
    );
    let (mut runner, seed) = chains::runner("", 100);
    if let Err(e) = runner.run(&chains::chains(), |c| {
        prop_assume!(c.input.iter().chain(&c.output).all(|r| !r.contains('\n')));
        let ns = TestNetns::new("ndec");
        let script = c.restore_script().replacen(
            "*filter\n",
            "*filter\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n",
            1,
        );
        ns.restore("ip6tables", "nft", &script);
        check(&ns, Family::Ipv6)
    }) {
        panic!("{e}\nreplay with LOOPGUARD_DIFF_SEED={seed}");
    }
    assert!(
        decoded.load(Ordering::Relaxed) > 100,
        "the decoder covered most rules"
    );
}

/// A re-check while the ruleset's generation stands still answers from the last read (no dump);
/// any change in the namespace, by any program and in any table, moves the generation and is
/// read again, so that a deleted rule is seen at the next check.
#[test]
fn a_check_in_an_unmoved_generation_reuses_the_last_read_and_any_change_is_read() {
    let ns = TestNetns::new("ngen");
    ns.restore(
        "ip6tables",
        "nft",
        &forms_script("", &["-s 2001:db8::1/128 -j DROP"], ""),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut engine = engine(
        dir.path(),
        &ns,
        vec![Family::Ipv6],
        false,
        BackendChoice::Nft,
    );
    let cache = engine.keep_nft_rules();
    let counts = || {
        let c = cache.lock().unwrap();
        (c.reads, c.unchanged)
    };
    let (e, r) = step(&ns, engine, |e| e.enforce()).unwrap();
    assert!(r.compliant && r.wrote(), "{r:?}");
    let (e, r) = step(&ns, e, |e| e.check()).unwrap();
    assert!(r.compliant);
    let (reads, unchanged) = counts();
    let (e, r) = step(&ns, e, |e| e.check()).unwrap();
    assert!(r.compliant);
    assert_eq!(
        counts(),
        (reads, unchanged + 1),
        "answered from the last read"
    );

    // Another table changes: the generation moves, and the chains are listed again.
    ns.run(&["nft", "add", "table", "inet", "somebody-else"]);
    let (e, r) = step(&ns, e, |e| e.check()).unwrap();
    assert!(r.compliant);
    assert_eq!(counts(), (reads + 1, unchanged + 1), "listed again");

    // loopguard's DROP deleted by another program: seen at once.
    ns.run(&[
        "ip6tables-nft",
        "-D",
        "INPUT",
        "-s",
        "::1/128",
        "-j",
        "DROP",
    ]);
    let (_, r) = step(&ns, e, |e| e.check()).unwrap();
    assert!(!r.compliant, "the deleted DROP is seen: {r:?}");
    assert_eq!(counts(), (reads + 2, unchanged + 1));
}

/// With the notifications followed (as the watch does), a check after another program deleted
/// one of loopguard's rules takes the last read without it (no dump), and sees it missing; the
/// repair's new rule comes back with the handle the kernel gave it, so that the next deletion is
/// taken from the notifications too. A rule added to INPUT, and notifications lost (a burst that
/// overflows the socket's buffer), are listed again.
#[test]
fn a_followed_read_takes_deletions_from_the_notifications_and_lists_anything_else_again() {
    let ns = TestNetns::new("nfol");
    ns.restore(
        "ip6tables",
        "nft",
        &forms_script("", &["-s 2001:db8::1/128 -j DROP"], ""),
    );
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(
        dir.path(),
        &ns,
        vec![Family::Ipv6],
        false,
        BackendChoice::Nft,
    );
    let mut engine = engine;
    let cache = engine.keep_nft_rules();
    let following = cache.clone();
    let (e, ()) = in_netns(&ns, engine, move |_| following.lock().unwrap().follow());
    let counts = || {
        let c = cache.lock().unwrap();
        (c.reads, c.replayed)
    };
    let delete_drop = |ns: &TestNetns| {
        ns.run(&[
            "ip6tables-nft",
            "-D",
            "INPUT",
            "-s",
            "::1/128",
            "-j",
            "DROP",
        ]);
    };
    let (e, r) = step(&ns, e, |e| e.enforce()).unwrap();
    assert!(r.compliant && r.wrote(), "{r:?}");
    let (reads, replayed) = counts();

    delete_drop(&ns);
    let (e, r) = step(&ns, e, |e| e.check()).unwrap();
    assert!(!r.compliant, "the deleted DROP is seen: {r:?}");
    assert_eq!(
        counts(),
        (reads, replayed + 1),
        "taken from the notifications"
    );
    let (e, r) = step(&ns, e, |e| e.enforce()).unwrap();
    assert!(r.compliant && r.wrote(), "{r:?}");
    assert_eq!(
        ns.run(&["ip6tables-nft", "-S", "INPUT"]),
        "-P INPUT ACCEPT\n-A INPUT -i lo -j ACCEPT\n-A INPUT -s ::1/128 -j DROP\n-A INPUT -s 2001:db8::1/128 -j DROP\n"
    );

    // The repaired DROP deleted again: its handle came from the write's echo.
    delete_drop(&ns);
    let (e, r) = step(&ns, e, |e| e.check()).unwrap();
    assert!(!r.compliant, "{r:?}");
    assert_eq!(counts(), (reads, replayed + 2));

    // A rule added to INPUT by another program: listed again.
    ns.run(&["ip6tables-nft", "-I", "INPUT", "-p", "udp", "-j", "ACCEPT"]);
    let (e, r) = step(&ns, e, |e| e.enforce()).unwrap();
    assert!(r.compliant, "{r:?}");
    assert_eq!(counts(), (reads + 1, replayed + 2), "listed again");
    assert_eq!(
        ns.run(&["ip6tables-nft", "-S", "INPUT"]),
        "-P INPUT ACCEPT\n-A INPUT -p udp -j ACCEPT\n-A INPUT -i lo -j ACCEPT\n-A INPUT -s ::1/128 -j DROP\n-A INPUT -s 2001:db8::1/128 -j DROP\n"
    );

    // A chain made: listed again. Then rules added to it, which change nothing in INPUT: a
    // deletion after them is taken from the notifications.
    ns.run(&["ip6tables-nft", "-N", "BURST"]);
    let (e, r) = step(&ns, e, |e| e.check()).unwrap();
    assert!(r.compliant, "{r:?}");
    assert_eq!(counts(), (reads + 2, replayed + 2), "listed again");
    let burst = |n: usize| {
        let mut script = String::from("*filter\n");
        for i in 0..n {
            script.push_str(&format!(
                "-A BURST -s 2001:db8:9::{:x}/128 -j DROP\n",
                i + 1
            ));
        }
        script + "COMMIT\n"
    };
    ns.restore("ip6tables", "nft", &burst(10));
    delete_drop(&ns);
    let (e, r) = step(&ns, e, |e| e.enforce()).unwrap();
    assert!(r.compliant && r.wrote(), "{r:?}");
    assert_eq!(counts(), (reads + 2, replayed + 3));

    // The same with a burst larger than the socket's buffer: notifications lost, listed again.
    ns.restore("ip6tables", "nft", &burst(3000));
    delete_drop(&ns);
    let (_, r) = step(&ns, e, |e| e.check()).unwrap();
    assert!(!r.compliant, "{r:?}");
    assert_eq!(counts(), (reads + 3, replayed + 3), "lost: listed again");
}

/// INPUT and OUTPUT listed side by side (OUTPUT in a thread of its own, on a second socket) are
/// the chains of the namespace the calling thread entered, exactly as listed one by one; listed
/// again on the kept sockets after a change, the change is there.
#[test]
fn chains_listed_side_by_side_are_those_of_the_entered_namespace() {
    use loopguard::node::nft::{iptables_chain, iptables_chains};
    use loopguard::rules::Chain;
    let ns = TestNetns::new("nside");
    ns.restore(
        "ip6tables",
        "nft",
        "*filter\n-A INPUT -s 2001:db8::1/128 -j DROP\n-A OUTPUT -d 2001:db8::2/128 -j ACCEPT\n\
         -A OUTPUT -o eth0 -j DROP\nCOMMIT\n",
    );
    let name = ns.name.clone();
    let lines = |listed: &[loopguard::rules::nft::xt::Listed]| -> Vec<String> {
        listed
            .iter()
            .map(|r| r.line.clone().expect("decoded"))
            .collect()
    };
    // Both listings in one thread (the second on the sockets the first kept), a rule appended to
    // OUTPUT by another program in between.
    let [(side, single), (side_after, single_after)] = std::thread::spawn(move || {
        loopguard::node::netns::enter(&name).unwrap();
        let list = || {
            let side = iptables_chains(Family::Ipv6)
                .map(|listed| listed.expect("listed").expect("the chain exists"));
            let single = Chain::ALL.map(|chain| {
                iptables_chain(Family::Ipv6, chain)
                    .expect("listed")
                    .expect("the chain exists")
            });
            (side, single)
        };
        let first = list();
        let appended = std::process::Command::new("ip")
            .args(["netns", "exec", &name, "ip6tables-nft", "-A", "OUTPUT"])
            .args(["-o", "eth1", "-j", "ACCEPT"])
            .status()
            .expect("run ip6tables-nft");
        assert!(appended.success(), "ip6tables-nft -A OUTPUT failed");
        [first, list()]
    })
    .join()
    .unwrap();
    assert_eq!(side, single);
    assert_eq!(lines(&side[0]), ["-s 2001:db8::1/128 -j DROP"]);
    assert_eq!(
        lines(&side[1]),
        ["-d 2001:db8::2/128 -j ACCEPT", "-o eth0 -j DROP"]
    );
    assert_eq!(side_after, single_after);
    assert_eq!(side_after[0], side[0]);
    assert_eq!(
        lines(&side_after[1]),
        [
            "-d 2001:db8::2/128 -j ACCEPT",
            "-o eth0 -j DROP",
            "-o eth1 -j ACCEPT"
        ]
    );
}
