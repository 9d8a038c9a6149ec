//! Which rules loopguard inserted itself, as opposed to rules it found in place and adopted.
//!
//! Identical rules cannot be told apart by their text, so ownership is a count per rule. Each
//! check reconciles the count with what the chain holds now: when copies disappear, loopguard
//! assumes its own went first. That errs on the safe side: cleanup may leave a rule behind, but it
//! never deletes a copy someone else added.

use super::{Chain, Family, Placement, Rule, Tables};
use serde::{Deserialize, Serialize};

/// A rule loopguard inserted, with how many copies of it are loopguard's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnedRule {
    pub family: Family,
    pub chain: Chain,
    /// The rule in `iptables-save` syntax.
    pub rule: String,
    /// Copies that loopguard inserted.
    pub owned: usize,
    /// Copies the chain held at the last check (loopguard's and others').
    pub observed: usize,
    /// Where loopguard put its copies; decides which copy cleanup removes.
    pub placement: Placement,
}

impl OwnedRule {
    pub fn rule(&self) -> Option<Rule> {
        Rule::from_save_syntax(self.family, &self.rule).filter(|r| r.chain() == self.chain)
    }
}

/// Every rule loopguard owns on a node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ownership {
    pub rules: Vec<OwnedRule>,
}

impl Ownership {
    /// Copies of `rule` that are loopguard's.
    pub fn owned(&self, rule: Rule) -> usize {
        self.entry(rule).map_or(0, |e| e.owned)
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Families in which loopguard owns at least one rule.
    pub fn families(&self) -> Vec<Family> {
        super::distinct(self.rules.iter().map(|r| r.family))
    }

    /// Brings the counts in line with what `tables` shows for `families` (the families read).
    pub fn reconcile(&mut self, tables: &Tables, families: &[Family]) {
        for entry in self.rules.iter_mut() {
            let Some(rule) = entry.rule() else { continue };
            if !families.contains(&rule.family) {
                continue;
            }
            let now = tables.count(rule);
            if now < entry.observed {
                entry.owned = entry.owned.saturating_sub(entry.observed - now);
            }
            entry.observed = now;
        }
        self.rules.retain(|e| e.owned > 0);
    }

    /// Records that loopguard inserted one copy of `rule`; `observed_before` is the count before.
    pub fn record_insert(&mut self, rule: Rule, observed_before: usize, placement: Placement) {
        match self.entry_mut(rule) {
            Some(entry) => {
                entry.owned += 1;
                entry.observed = observed_before + 1;
            }
            None => self.rules.push(OwnedRule {
                family: rule.family,
                chain: rule.chain(),
                rule: rule.save_syntax(),
                owned: 1,
                observed: observed_before + 1,
                placement,
            }),
        }
        self.rules.sort_by_key(|r| (r.family, r.chain));
    }

    /// Records that loopguard deleted one of its copies of `rule`.
    pub fn record_delete(&mut self, rule: Rule) {
        if let Some(entry) = self.entry_mut(rule) {
            entry.owned = entry.owned.saturating_sub(1);
            entry.observed = entry.observed.saturating_sub(1);
        }
        self.rules.retain(|e| e.owned > 0);
    }

    pub fn placement(&self, rule: Rule) -> Placement {
        self.entry(rule).map_or(Placement::Insert, |e| e.placement)
    }

    fn entry(&self, rule: Rule) -> Option<&OwnedRule> {
        self.rules.iter().find(|e| e.rule() == Some(rule))
    }

    fn entry_mut(&mut self, rule: Rule) -> Option<&mut OwnedRule> {
        self.rules.iter_mut().find(|e| e.rule() == Some(rule))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::RuleKind;
    use crate::rules::evaluate::tests::tables;

    const A: &str = "-i lo -j ACCEPT";
    const D: &str = "-s ::1/128 -j DROP";
    const O: &str = "-o lo -j ACCEPT";

    fn rule(kind: RuleKind) -> Rule {
        Rule {
            family: Family::Ipv6,
            kind,
        }
    }

    #[test]
    fn inserted_rules_are_owned_until_they_disappear() {
        let mut own = Ownership::default();
        let drop = rule(RuleKind::DropLoopbackSource);
        own.record_insert(drop, 0, Placement::Insert);
        own.reconcile(&tables(&[A, D], &[O]), &[Family::Ipv6]);
        assert_eq!(own.owned(drop), 1);
        own.reconcile(&tables(&[A], &[O]), &[Family::Ipv6]);
        assert_eq!(own.owned(drop), 0);
        assert!(own.is_empty());
    }

    #[test]
    fn when_a_copy_disappears_loopguard_assumes_its_own_went_first() {
        // One adopted DROP and one inserted by loopguard; one of them is deleted by hand.
        let mut own = Ownership::default();
        let drop = rule(RuleKind::DropLoopbackSource);
        own.record_insert(drop, 1, Placement::Insert);
        own.reconcile(&tables(&[A, D], &[O]), &[Family::Ipv6]);
        assert_eq!(own.owned(drop), 0, "never claim the copy that was adopted");
    }

    #[test]
    fn copies_added_by_others_are_not_claimed() {
        let mut own = Ownership::default();
        let accept = rule(RuleKind::AcceptLoopbackIn);
        own.record_insert(accept, 0, Placement::Insert);
        own.reconcile(&tables(&[A, D, A, D], &[O]), &[Family::Ipv6]);
        assert_eq!(own.owned(accept), 1);
        assert_eq!(own.rules[0].observed, 2);
    }

    #[test]
    fn families_not_read_are_left_alone() {
        let mut own = Ownership::default();
        let drop4 = Rule {
            family: Family::Ipv4,
            kind: RuleKind::DropLoopbackSource,
        };
        own.record_insert(drop4, 0, Placement::Append);
        own.reconcile(&tables(&[], &[]), &[Family::Ipv6]);
        assert_eq!(own.owned(drop4), 1);
        assert_eq!(own.families(), vec![Family::Ipv4]);
    }

    #[test]
    fn a_tampered_rule_text_is_ignored_not_matched() {
        let own = Ownership {
            rules: vec![OwnedRule {
                family: Family::Ipv6,
                chain: Chain::Input,
                rule: "-A INPUT -j DROP".into(),
                owned: 1,
                observed: 1,
                placement: Placement::Insert,
            }],
        };
        assert_eq!(own.rules[0].rule(), None);
        assert_eq!(own.owned(rule(RuleKind::DropLoopbackSource)), 0);
    }
}
