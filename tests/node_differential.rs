//! Differential tests on the real kernel, both backends: random chains from the grammar of
//! `support/chains.rs` are loaded into fresh network namespaces, and loopguard is held against
//! the ComplianceAsCode scanner and against the test's own model of iptables:
//! - `check`'s verdict equals the scanner's on the same kernel state;
//! - after `enforce` (Insert or Append) the scanner passes, and the chains are exactly the
//!   generated ones with the reported edits applied (so every foreign rule is there, in order);
//! - a second `enforce` writes nothing (no restore process at all);
//! - after `cleanup`, `ip6tables-save` is byte-identical to before.
//!
//! The budget is `LOOPGUARD_DIFF_CASES` cases per backend (100 by default); each run draws a new
//! seed unless `LOOPGUARD_DIFF_SEED` gives one, and a failure prints the seed that replays it
//! (with the smallest failing case proptest found). Needs root.

#[path = "support/chains.rs"]
mod chains;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/node.rs"]
mod node;

use chains::{Chains, apply_edit_on, budget, foreign};
use node::Node;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

fn differential(backend: &'static str) {
    let (mut runner, seed) = chains::runner(&format!("{backend}: "), 300);
    let started = std::time::Instant::now();
    if let Err(e) = runner.run(&(chains::chains(), any::<bool>()), |(c, append)| {
        one_case(backend, &c, append)
    }) {
        panic!("{backend}: {e}\nreplay with LOOPGUARD_DIFF_SEED={seed}");
    }
    eprintln!(
        "{backend}: {} cases passed in {:.1} s",
        budget(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn nft_matches_the_scanner_and_the_model() {
    differential("nft");
}

#[test]
fn legacy_matches_the_scanner_and_the_model() {
    differential("legacy");
}

/// Loads the generated chains: one restore, or (a comment holding a newline cannot go through
/// restore's line format) one `ip6tables -A` per rule.
fn load(node: &Node, c: &Chains) {
    if c.input.iter().chain(&c.output).all(|r| !r.contains('\n')) {
        node.ns
            .restore("ip6tables", node.backend, &c.restore_script());
        return;
    }
    let invoker = node.invoker();
    let run = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = invoker.ip6tables(&args);
        assert!(out.status.success(), "{args:?}: {out:?}");
    };
    for chain in chains::USER_CHAINS {
        run(vec!["-N".into(), chain.into()]);
    }
    for (chain, rules) in [("INPUT", &c.input), ("OUTPUT", &c.output)] {
        for rule in rules {
            let mut args = vec!["-A".to_string(), chain.to_string()];
            args.extend(loopguard::rules::split_args(rule));
            run(args);
        }
    }
}

fn one_case(backend: &'static str, c: &Chains, append: bool) -> Result<(), TestCaseError> {
    let node = Node::new("diff", backend);
    load(&node, c);
    let listed = |chain: &str| node.ip6(&format!("-S {chain}"));
    // The grammar writes rules exactly as -S prints them (else the model below means nothing).
    prop_assert_eq!(listed("INPUT"), chains::listing("INPUT", &c.input));
    prop_assert_eq!(listed("OUTPUT"), chains::listing("OUTPUT", &c.output));
    let before = node.save();

    let (code, report) = node.json("check", &[]);
    let scanner = node.scanner_passes();
    prop_assert!(code == 0 || code == 1, "check: {}", report);
    prop_assert_eq!(
        code == 0,
        scanner,
        "check says compliant={} where the scanner says {}: {}",
        code == 0,
        scanner,
        report
    );

    let placement = if append { "append" } else { "insert" };
    let (code, report) = node.json("enforce", &["--placement", placement]);
    prop_assert_eq!(code, 0, "enforce: {}", report);
    prop_assert!(
        node.scanner_passes(),
        "the scanner fails after enforce: {}",
        report
    );
    let (mut input, mut output) = (c.input.clone(), c.output.clone());
    for edit in report["changes"].as_array().expect("changes") {
        let rules = match edit["chain"].as_str() {
            Some("INPUT") => &mut input,
            _ => &mut output,
        };
        let spec = edit["rule"]
            .as_str()
            .unwrap()
            .splitn(3, ' ')
            .nth(2)
            .unwrap();
        let position = edit["position"].as_u64().map(|p| p as usize);
        apply_edit_on(
            backend,
            rules,
            edit["action"].as_str().unwrap(),
            position,
            spec,
        );
    }
    prop_assert_eq!(listed("INPUT"), chains::listing("INPUT", &input));
    prop_assert_eq!(listed("OUTPUT"), chains::listing("OUTPUT", &output));
    same_entries(&node, "INPUT", &input)?;
    same_entries(&node, "OUTPUT", &output)?;
    prop_assert_eq!(foreign(&input), foreign(&c.input));
    prop_assert_eq!(foreign(&output), foreign(&c.output));

    let restores = node.restores();
    let (code, again) = node.json("enforce", &["--placement", placement]);
    prop_assert_eq!(code, 0);
    prop_assert_eq!(
        again["changes"].as_array().map(Vec::len),
        Some(0),
        "{}",
        again
    );
    prop_assert_eq!(
        node.restores(),
        restores,
        "a compliant node gets no restore"
    );

    let (code, report) = node.json("cleanup", &[]);
    prop_assert_eq!(code, 0, "cleanup: {}", report);
    prop_assert_eq!(
        node.save(),
        before,
        "cleanup gives back the tables it found"
    );
    same_entries(&node, "INPUT", &c.input)?;
    same_entries(&node, "OUTPUT", &c.output)?;
    Ok(())
}

/// On legacy, where `-S` (and `-save`) print a look-alike (`-i lo -p all -j ACCEPT`) exactly like
/// loopguard's rule: every rule that prints as one of loopguard's is, in the kernel, the entry
/// the model says (ip6tables-legacy's own entry for the rule, or the look-alike written).
fn same_entries(node: &Node, chain: &str, model: &[String]) -> Result<(), TestCaseError> {
    if node.backend != "legacy" {
        return Ok(());
    }
    let chain_of = if chain == "INPUT" {
        loopguard::rules::Chain::Input
    } else {
        loopguard::rules::Chain::Output
    };
    let entries = node
        .ns
        .legacy_entries(loopguard::rules::Family::Ipv6, chain_of);
    prop_assert_eq!(
        entries.len(),
        model.len(),
        "{} holds the model's rules",
        chain
    );
    for (i, (entry, spec)) in entries.iter().zip(model).enumerate() {
        let text = chains::listed(spec);
        if !chains::is_baseline(&text) {
            continue;
        }
        let is_loopguards = *entry == netns::legacy_entry_of(chain, &text);
        prop_assert_eq!(
            is_loopguards,
            *spec == text,
            "{} rule {} ({}) is {} in the kernel",
            chain,
            i + 1,
            spec,
            if is_loopguards {
                "the rule itself"
            } else {
                "a look-alike"
            }
        );
    }
    Ok(())
}
