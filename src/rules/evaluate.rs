//! Parsing `iptables -S CHAIN` output and deciding compliance the way the scanners do.
//!
//! ComplianceAsCode's `set_ipv6_loopback_traffic` (used by the CIS benchmarks and Datadog) passes
//! when, in the built-in `INPUT` chain, `-i lo -j ACCEPT` is *immediately followed* by
//! `-s ::1/128 -j DROP`, and `OUTPUT` holds `-o lo -j ACCEPT`, each with no other match.
//! `evaluate` is the one place that decides this.

use super::{Chain, Family, Rule, RuleKind};
use serde::Serialize;
use std::collections::BTreeMap;

/// The rules of one built-in chain, in order, as specs without the `-A CHAIN ` prefix.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChainListing {
    pub rules: Vec<String>,
}

impl ChainListing {
    /// Parses the output of `iptables -S CHAIN`: `-P` (policy) lines are skipped, `-A CHAIN` lines
    /// kept in order. Lines for other chains (there are none for a built-in chain) are ignored.
    pub fn parse(chain: Chain, output: &str) -> ChainListing {
        let prefix = format!("-A {} ", chain.name());
        let rules = output
            .lines()
            .filter_map(|line| line.trim_end().strip_prefix(&prefix))
            .map(str::to_string)
            .collect();
        ChainListing { rules }
    }

    /// 0-based positions of the rules whose spec is exactly `spec`.
    pub fn positions(&self, spec: &str) -> Vec<usize> {
        self.rules
            .iter()
            .enumerate()
            .filter(|(_, rule)| *rule == spec)
            .map(|(i, _)| i)
            .collect()
    }
}

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
}

impl RuleState {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleState::Present => "present",
            RuleState::Missing => "missing",
            RuleState::Misplaced => "misplaced",
            RuleState::Duplicate => "duplicate",
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
}

/// Evaluates the listings of `families` against the baseline.
pub fn evaluate(tables: &Tables, families: &[Family]) -> Evaluation {
    let mut compliant = true;
    let mut findings = Vec::new();
    for &family in families {
        let family_eval = evaluate_family(tables, family);
        compliant &= family_eval.compliant;
        findings.extend(family_eval.findings);
    }
    Evaluation {
        compliant,
        findings,
    }
}

/// Index of the first `-i lo -j ACCEPT` that is immediately followed by the loopback DROP.
pub(super) fn compliant_pair(input: &ChainListing, family: Family) -> Option<usize> {
    let [accept, drop, _] = Rule::baseline(family).map(Rule::spec);
    input
        .rules
        .windows(2)
        .position(|pair| pair[0] == accept && pair[1] == drop)
}

fn evaluate_family(tables: &Tables, family: Family) -> Evaluation {
    let input = tables.chain(family, Chain::Input);
    let paired = compliant_pair(input, family).is_some();
    let findings: Vec<Finding> = Rule::baseline(family)
        .into_iter()
        .map(|rule| {
            let count = tables.count(rule);
            let state = match (count, rule.kind) {
                (0, _) => RuleState::Missing,
                // The DROP only counts right after the ACCEPT; when the ACCEPT is missing, that is
                // the finding, and the DROP itself is where it should be.
                (_, RuleKind::DropLoopbackSource)
                    if !paired
                        && tables.count(Rule {
                            family,
                            kind: RuleKind::AcceptLoopbackIn,
                        }) > 0 =>
                {
                    RuleState::Misplaced
                }
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
        compliant: paired && output_ok,
        findings,
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
}
