//! Deciding compliance the way the scanners do.
//!
//! ComplianceAsCode's `set_ipv6_loopback_traffic` (used by the CIS benchmarks and Datadog) reads
//! `ip6tables -L -v -n -x` and passes when, in the built-in `INPUT` chain, `-i lo -j ACCEPT` is
//! *immediately followed* by `-s ::1/128 -j DROP`, and `OUTPUT` holds `-o lo -j ACCEPT`.
//! `evaluate` is the one place that decides this, with the scanner's own reading of a rule
//! ([`scanner_counts_as`]); loopguard itself only ever writes the exact baseline rules.

use super::parse::{ChainListing, Shape};
use super::{Chain, Family, Rule, RuleKind};
use serde::Serialize;
use std::collections::BTreeMap;

/// Everything read from the kernel for one check: the two chains of each checked family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    chains: BTreeMap<(Family, Chain), ChainListing>,
}

impl Tables {
    pub fn insert(&mut self, family: Family, chain: Chain, listing: ChainListing) {
        self.chains.insert((family, chain), listing);
    }

    pub fn chain(&self, family: Family, chain: Chain) -> &ChainListing {
        static EMPTY: ChainListing = ChainListing { rules: Vec::new() };
        self.chains.get(&(family, chain)).unwrap_or(&EMPTY)
    }

    /// How many copies of `rule` its chain holds.
    pub fn count(&self, rule: Rule) -> usize {
        self.chain(rule.family, rule.chain())
            .positions(&rule.spec())
            .len()
    }
}

/// What a check found for one desired rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleState {
    /// In place, exactly once.
    Present,
    /// Not in its chain at all.
    Missing,
    /// In its chain, but not where the scanners need it (the DROP not right after the ACCEPT).
    Misplaced,
    /// In place, and in the chain more than once (for example after the seed script ran twice).
    Duplicate,
    /// In place, but after a catch-all rule (`-j DROP`, `-j REJECT`, ...) that decides every
    /// packet first: the scanners pass it, yet it protects nothing.
    Shadowed,
}

impl RuleState {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleState::Present => "present",
            RuleState::Missing => "missing",
            RuleState::Misplaced => "misplaced",
            RuleState::Duplicate => "duplicate",
            RuleState::Shadowed => "shadowed",
        }
    }
}

/// One line of a check report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub family: Family,
    pub chain: Chain,
    /// The rule in `iptables-save` syntax.
    pub rule: String,
    pub state: RuleState,
}

/// The verdict for a set of families.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evaluation {
    pub compliant: bool,
    pub findings: Vec<Finding>,
    /// The catch-all rule that shadows a compliant pair (`Shadowed` findings), if any.
    pub shadowed_by: Option<(Family, String)>,
}

/// Evaluates the listings of `families` against the baseline.
pub fn evaluate(tables: &Tables, families: &[Family]) -> Evaluation {
    let mut all = Evaluation {
        compliant: true,
        findings: Vec::new(),
        shadowed_by: None,
    };
    for &family in families {
        let one = evaluate_family(tables, family);
        all.compliant &= one.compliant;
        all.findings.extend(one.findings);
        all.shadowed_by = all.shadowed_by.or(one.shadowed_by);
    }
    all
}

/// Whether `spec` is, as the scanners see it, a copy of the baseline rule `rule`. The scanners
/// read `iptables -L`, which does not show everything: `-i lo -p tcp -j ACCEPT` looks the same
/// as `-i lo -j ACCEPT` to them, and they only read the DROP and OUTPUT rules up to the
/// addresses, so a comment or match after those does not count against them.
pub fn scanner_counts_as(rule: Rule, spec: &str) -> bool {
    if Shape::surely_not_loopback(spec, rule.family) {
        return false;
    }
    spec == rule.spec() || counts_as(rule, &Shape::of(spec))
}

/// [`scanner_counts_as`] for a rule whose shape is known (and whose text is not the rule's own).
fn counts_as(rule: Rule, shape: &Shape) -> bool {
    match rule.kind {
        RuleKind::AcceptLoopbackIn => shape.accepts_loopback_in(),
        RuleKind::DropLoopbackSource => shape.drops_loopback_source(rule.family),
        RuleKind::AcceptLoopbackOut => shape.accepts_loopback_out(),
    }
}

/// What the evaluation asks of a chain's rules, worked out once per chain (a long chain is read
/// many times over): which of the family's baseline rules each counts as, and where the first
/// catch-all is. Each rule is parsed only where it may matter: one that surely is neither about
/// loopback nor a catch-all (`Shape::surely_not_loopback`, `Shape::surely_not_catch_all`) is not.
struct Shaped {
    /// Per rule, a bit per baseline rule it counts as ([`bit`]).
    counts: Vec<u8>,
    first_catch_all: Option<usize>,
}

/// The bit of a baseline rule in [`Shaped::counts`].
fn bit(rule: Rule) -> u8 {
    match rule.kind {
        RuleKind::AcceptLoopbackIn => 1,
        RuleKind::DropLoopbackSource => 2,
        RuleKind::AcceptLoopbackOut => 4,
    }
}

impl Shaped {
    fn of(listing: &ChainListing, family: Family) -> Shaped {
        let baseline = Rule::baseline(family);
        let specs = baseline.map(Rule::spec);
        let mut counts = Vec::with_capacity(listing.rules.len());
        let mut first_catch_all = None;
        for (i, r) in listing.rules.iter().enumerate() {
            let loopback = !Shape::surely_not_loopback(r, family);
            let shape = (loopback || !Shape::surely_not_catch_all(r)).then(|| Shape::of(r));
            let mut bits = 0;
            if let Some(shape) = &shape {
                if loopback {
                    for (rule, spec) in baseline.iter().zip(&specs) {
                        if r == spec || counts_as(*rule, shape) {
                            bits |= bit(*rule);
                        }
                    }
                }
                if first_catch_all.is_none() && shape.catch_all() {
                    first_catch_all = Some(i);
                }
            }
            counts.push(bits);
        }
        Shaped {
            counts,
            first_catch_all,
        }
    }

    fn counts(&self, rule: Rule, i: usize) -> bool {
        self.counts[i] & bit(rule) != 0
    }

    fn copies(&self, rule: Rule) -> usize {
        self.counts.iter().filter(|&&c| c & bit(rule) != 0).count()
    }

    fn pair(&self, family: Family) -> Option<usize> {
        let [accept, drop, _] = Rule::baseline(family);
        (1..self.counts.len())
            .find_map(|i| (self.counts(accept, i - 1) && self.counts(drop, i)).then_some(i - 1))
    }
}

/// Index of the first rule the scanners read as the loopback ACCEPT that is immediately followed
/// by one they read as the loopback DROP: the one test of compliance in INPUT.
pub fn compliant_pair(input: &ChainListing, family: Family) -> Option<usize> {
    Shaped::of(input, family).pair(family)
}

fn evaluate_family(tables: &Tables, family: Family) -> Evaluation {
    let input = tables.chain(family, Chain::Input);
    let shaped_input = Shaped::of(input, family);
    let shaped_output = Shaped::of(tables.chain(family, Chain::Output), family);
    let pair = shaped_input.pair(family);
    // The earliest pair is shadowed only when a catch-all comes before it; later pairs then are too.
    let shadow = pair.and_then(|p| shaped_input.first_catch_all.filter(|&c| c < p));
    let copies = |rule: Rule| match rule.chain() {
        Chain::Input => shaped_input.copies(rule),
        Chain::Output => shaped_output.copies(rule),
    };
    let [accept, _, _] = Rule::baseline(family);
    let findings: Vec<Finding> = Rule::baseline(family)
        .into_iter()
        .map(|rule| {
            let in_pair = rule.chain() == Chain::Input;
            let state = match (copies(rule), rule.kind) {
                (0, _) => RuleState::Missing,
                // The DROP only counts right after the ACCEPT; when the ACCEPT is missing, that is
                // the finding, and the DROP itself is where it should be.
                (_, RuleKind::DropLoopbackSource) if pair.is_none() && copies(accept) > 0 => {
                    RuleState::Misplaced
                }
                _ if in_pair && shadow.is_some() => RuleState::Shadowed,
                (1, _) => RuleState::Present,
                _ => RuleState::Duplicate,
            };
            Finding {
                family,
                chain: rule.chain(),
                rule: rule.save_syntax(),
                state,
            }
        })
        .collect();
    let output_ok = findings
        .iter()
        .any(|f| f.chain == Chain::Output && f.state != RuleState::Missing);
    Evaluation {
        compliant: pair.is_some() && output_ok,
        findings,
        shadowed_by: shadow.map(|c| (family, input.rules[c].clone())),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds tables from `-S`-style text for IPv6 INPUT and OUTPUT.
    pub(crate) fn tables(input: &[&str], output: &[&str]) -> Tables {
        let mut t = Tables::default();
        t.insert(
            Family::Ipv6,
            Chain::Input,
            ChainListing {
                rules: input.iter().map(|s| s.to_string()).collect(),
            },
        );
        t.insert(
            Family::Ipv6,
            Chain::Output,
            ChainListing {
                rules: output.iter().map(|s| s.to_string()).collect(),
            },
        );
        t
    }

    fn states(eval: &Evaluation) -> Vec<RuleState> {
        eval.findings.iter().map(|f| f.state).collect()
    }

    const A: &str = "-i lo -j ACCEPT";
    const D: &str = "-s ::1/128 -j DROP";
    const O: &str = "-o lo -j ACCEPT";
    use RuleState::*;

    #[test]
    fn parse_keeps_rules_in_order_and_skips_policy() {
        let out = "-P INPUT DROP\n-A INPUT -i lo -j ACCEPT\n-A INPUT -s ::1/128 -j DROP\n";
        let listing = ChainListing::parse(Chain::Input, out);
        assert_eq!(listing.rules, vec![A, D]);
    }

    #[test]
    fn empty_chains_are_missing_everything() {
        let eval = evaluate(&tables(&[], &[]), &[Family::Ipv6]);
        assert!(!eval.compliant);
        assert_eq!(states(&eval), vec![Missing, Missing, Missing]);
    }

    #[test]
    fn seed_result_is_compliant() {
        let eval = evaluate(&tables(&[A, D], &[O]), &[Family::Ipv6]);
        assert!(eval.compliant);
        assert_eq!(states(&eval), vec![Present, Present, Present]);
    }

    #[test]
    fn foreign_rules_around_the_pair_do_not_matter() {
        let input = ["-j KUBE-FIREWALL", A, D, "-p tcp -j ACCEPT"];
        let eval = evaluate(&tables(&input, &["-j KUBE-SERVICES", O]), &[Family::Ipv6]);
        assert!(eval.compliant);
    }

    #[test]
    fn seed_run_three_times_is_compliant_with_duplicates() {
        let eval = evaluate(&tables(&[A, D, A, D, A, D], &[O, O, O]), &[Family::Ipv6]);
        assert!(eval.compliant);
        assert_eq!(states(&eval), vec![Duplicate, Duplicate, Duplicate]);
    }

    #[test]
    fn drop_before_accept_is_misplaced() {
        let eval = evaluate(&tables(&[D, A], &[O]), &[Family::Ipv6]);
        assert!(!eval.compliant);
        assert_eq!(states(&eval), vec![Present, Misplaced, Present]);
    }

    #[test]
    fn a_rule_between_accept_and_drop_breaks_compliance() {
        let eval = evaluate(&tables(&[A, "-p tcp -j ACCEPT", D], &[O]), &[Family::Ipv6]);
        assert!(!eval.compliant);
        assert_eq!(states(&eval), vec![Present, Misplaced, Present]);
    }

    #[test]
    fn drop_without_accept_reports_the_accept_missing() {
        let eval = evaluate(&tables(&[D], &[O]), &[Family::Ipv6]);
        assert_eq!(states(&eval), vec![Missing, Present, Present]);
        assert!(!eval.compliant);
    }

    #[test]
    fn a_comment_or_extra_match_does_not_count() {
        let commented = "-i lo -m comment --comment loopback -j ACCEPT";
        let eval = evaluate(&tables(&[commented, D], &[O]), &[Family::Ipv6]);
        assert!(!eval.compliant);
        assert_eq!(states(&eval), vec![Missing, Present, Present]);
    }

    #[test]
    fn missing_output_rule_is_not_compliant() {
        let eval = evaluate(&tables(&[A, D], &[]), &[Family::Ipv6]);
        assert!(!eval.compliant);
        assert_eq!(states(&eval), vec![Present, Present, Missing]);
    }

    #[test]
    fn ipv4_is_checked_only_when_asked() {
        let t = tables(&[A, D], &[O]);
        assert!(evaluate(&t, &[Family::Ipv6]).compliant);
        let both = evaluate(&t, &[Family::Ipv6, Family::Ipv4]);
        assert!(!both.compliant);
        assert_eq!(both.findings.len(), 6);
        assert_eq!(both.findings[4].rule, "-A INPUT -s 127.0.0.0/8 -j DROP");
    }

    #[test]
    fn what_the_scanner_cannot_see_does_not_matter_to_the_verdict() {
        // `iptables -L` shows these exactly like the baseline; the scanners pass them.
        let eval = evaluate(
            &tables(
                &[
                    "-i lo -p tcp -j ACCEPT",
                    "-s ::1/128 -m comment --comment x -j DROP",
                ],
                &["-o lo -p tcp -m tcp --dport 80 -j ACCEPT"],
            ),
            &[Family::Ipv6],
        );
        assert!(eval.compliant);
        assert_eq!(states(&eval), vec![Present, Present, Present]);
    }

    #[test]
    fn a_pair_after_a_catch_all_is_shadowed_but_still_what_the_scanner_passes() {
        let reject = "-j REJECT --reject-with icmp6-port-unreachable";
        let eval = evaluate(
            &tables(&["-p tcp -j ACCEPT", reject, A, D], &[O]),
            &[Family::Ipv6],
        );
        assert!(eval.compliant, "the scanner passes it");
        assert_eq!(states(&eval), vec![Shadowed, Shadowed, Present]);
        assert_eq!(eval.shadowed_by, Some((Family::Ipv6, reject.to_string())));
        let eval = evaluate(&tables(&[A, D, reject], &[O]), &[Family::Ipv6]);
        assert_eq!(states(&eval), vec![Present, Present, Present]);
        assert_eq!(eval.shadowed_by, None);
    }

    #[test]
    fn an_empty_rule_between_accept_and_drop_breaks_the_pair() {
        let eval = evaluate(&tables(&[A, "", D], &[O]), &[Family::Ipv6]);
        assert!(!eval.compliant);
        assert_eq!(states(&eval), vec![Present, Misplaced, Present]);
    }
}
