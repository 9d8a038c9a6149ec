//! Which rules loopguard inserted itself, as opposed to rules it found in place and adopted.
//!
//! Identical rules cannot be told apart by their text, so ownership is a count per rule. Each
//! check reconciles the count with what the chain holds now: when copies disappear, loopguard
//! assumes its own went first. That errs on the safe side: cleanup may leave a rule behind, but it
//! never deletes a copy someone else added.
//!
//! Ownership survives a crash: before a restore runs, the copies it is about to insert are
//! recorded as `pending` (and stored). The next reconcile, after the verifying read or after a
//! restart, claims as many of them as the chain actually gained, so a restore whose result was
//! never written down is still recognised as loopguard's own.

use super::{Chain, EditKind, Family, Placement, Rule, RulePlan, Tables};
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
    /// Where loopguard put its copies (for the record; deletes name the rule, not a place).
    pub placement: Placement,
    /// Copies a restore is inserting right now: written before the restore runs, settled by the
    /// next reconcile.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pending: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
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

    /// True when nothing is owned and nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Families in which loopguard owns (or is inserting) at least one rule.
    pub fn families(&self) -> Vec<Family> {
        super::distinct(self.rules.iter().map(|r| r.family))
    }

    /// Brings the counts in line with what `tables` shows for `families` (the families read):
    /// copies that disappeared are taken from loopguard's first; copies that appeared are
    /// loopguard's only as far as a pending insert explains them.
    pub fn reconcile(&mut self, tables: &Tables, families: &[Family]) {
        for entry in self.rules.iter_mut() {
            let Some(rule) = entry.rule() else { continue };
            if !families.contains(&rule.family) {
                continue;
            }
            let now = tables.count(rule);
            if now < entry.observed {
                entry.owned = entry.owned.saturating_sub(entry.observed - now);
            } else {
                entry.owned += entry.pending.min(now - entry.observed);
            }
            entry.owned = entry.owned.min(now);
            entry.observed = now;
            entry.pending = 0;
        }
        self.rules.retain(|e| e.owned > 0 || e.pending > 0);
    }

    /// Records, before `plan` is applied to `before`, how many copies of each rule it adds:
    /// its inserts less its deletes of the same rule (a plan that takes loopguard's copy out and
    /// puts it back elsewhere adds none, and must not later explain someone else's new copy).
    /// Deletes need no record of their own: a copy that disappears is taken from loopguard's
    /// count by the next reconcile.
    pub fn expect(&mut self, plan: &RulePlan, before: &Tables) {
        for edit in plan.edits.iter().filter(|e| e.kind != EditKind::Delete) {
            let target = edit.target;
            let count = |kind: fn(EditKind) -> bool| {
                plan.edits
                    .iter()
                    .filter(|e| e.target == target && kind(e.kind))
                    .count()
            };
            let inserts = count(|k| k != EditKind::Delete);
            let deletes = count(|k| k == EditKind::Delete);
            let adds = inserts.saturating_sub(deletes);
            if self.entry(target).is_some_and(|e| e.pending > 0) || adds == 0 {
                continue; // already recorded for this plan, or nothing added
            }
            match self.entry_mut(target) {
                Some(entry) => entry.pending = adds,
                None => self.rules.push(OwnedRule {
                    family: edit.family,
                    chain: edit.chain,
                    rule: edit.rule.clone(),
                    owned: 0,
                    observed: before.count(target),
                    placement: match edit.kind {
                        EditKind::Append => Placement::Append,
                        _ => Placement::Insert,
                    },
                    pending: adds,
                }),
            }
        }
        self.rules.sort_by_key(|r| (r.family, r.chain));
    }

    /// Forgets the pending inserts of `family`: its restore failed, and a failed restore changes
    /// nothing.
    pub fn abandon(&mut self, family: Family) {
        for entry in self.rules.iter_mut().filter(|e| e.family == family) {
            entry.pending = 0;
        }
        self.rules.retain(|e| e.owned > 0 || e.pending > 0);
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
    use crate::rules::ip6tables::evaluate::tests::tables;
    use crate::rules::{RuleKind, plan_enforce};

    const A: &str = "-i lo -j ACCEPT";
    const D: &str = "-s ::1/128 -j DROP";
    const O: &str = "-o lo -j ACCEPT";
    const V6: &[Family] = &[Family::Ipv6];

    fn rule(kind: RuleKind) -> Rule {
        Rule {
            family: Family::Ipv6,
            kind,
        }
    }

    /// What loopguard owns after inserting one `kind` where the chain held `before` copies.
    fn inserted(kind: RuleKind, before: usize) -> Ownership {
        let rule = rule(kind);
        Ownership {
            rules: vec![OwnedRule {
                family: rule.family,
                chain: rule.chain(),
                rule: rule.save_syntax(),
                owned: 1,
                observed: before + 1,
                placement: Placement::Insert,
                pending: 0,
            }],
        }
    }

    #[test]
    fn inserted_rules_are_owned_until_they_disappear() {
        let mut own = inserted(RuleKind::DropLoopbackSource, 0);
        let drop = rule(RuleKind::DropLoopbackSource);
        own.reconcile(&tables(&[A, D], &[O]), V6);
        assert_eq!(own.owned(drop), 1);
        own.reconcile(&tables(&[A], &[O]), V6);
        assert_eq!(own.owned(drop), 0);
        assert!(own.is_empty());
    }

    #[test]
    fn when_a_copy_disappears_loopguard_assumes_its_own_went_first() {
        // One adopted DROP and one inserted by loopguard; one of them is deleted by hand.
        let mut own = inserted(RuleKind::DropLoopbackSource, 1);
        own.reconcile(&tables(&[A, D], &[O]), V6);
        assert_eq!(
            own.owned(rule(RuleKind::DropLoopbackSource)),
            0,
            "never claim the copy that was adopted"
        );
    }

    #[test]
    fn copies_added_by_others_are_not_claimed() {
        let mut own = inserted(RuleKind::AcceptLoopbackIn, 0);
        own.reconcile(&tables(&[A, D, A, D], &[O]), V6);
        assert_eq!(own.owned(rule(RuleKind::AcceptLoopbackIn)), 1);
        assert_eq!(own.rules[0].observed, 2);
    }

    #[test]
    fn a_pending_insert_is_claimed_by_the_next_read_even_after_a_crash() {
        let before = tables(&["-j X"], &[]);
        let plan = plan_enforce(&before, &Ownership::default(), V6, Placement::Insert);
        let mut own = Ownership::default();
        own.expect(&plan, &before);
        assert!(
            !own.is_empty(),
            "the intent is on record before the restore"
        );
        assert_eq!(own.owned(rule(RuleKind::DropLoopbackSource)), 0);
        // Restarted after the restore, before the result was written down: the read explains it.
        let mut restarted: Ownership =
            serde_json::from_str(&serde_json::to_string(&own).unwrap()).unwrap();
        restarted.reconcile(&plan.applied_to(&before), V6);
        for kind in [
            RuleKind::AcceptLoopbackIn,
            RuleKind::DropLoopbackSource,
            RuleKind::AcceptLoopbackOut,
        ] {
            assert_eq!(restarted.owned(rule(kind)), 1, "{kind:?}");
        }
        // Killed before the restore ran: nothing is claimed, nothing stays pending.
        let mut never_ran = own.clone();
        never_ran.reconcile(&before, V6);
        assert!(never_ran.is_empty());
    }

    #[test]
    fn a_failed_restore_claims_nothing_even_if_someone_adds_the_same_rule() {
        let before = tables(&[], &[]);
        let plan = plan_enforce(&before, &Ownership::default(), V6, Placement::Insert);
        let mut own = Ownership::default();
        own.expect(&plan, &before);
        own.abandon(Family::Ipv6);
        own.reconcile(&tables(&[A, D], &[O]), V6);
        assert!(own.is_empty());
    }

    #[test]
    fn families_not_read_are_left_alone() {
        let drop4 = Rule {
            family: Family::Ipv4,
            kind: RuleKind::DropLoopbackSource,
        };
        let mut own = Ownership {
            rules: vec![OwnedRule {
                family: Family::Ipv4,
                chain: Chain::Input,
                rule: drop4.save_syntax(),
                owned: 1,
                observed: 1,
                placement: Placement::Append,
                pending: 0,
            }],
        };
        own.reconcile(&tables(&[], &[]), V6);
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
                pending: 0,
            }],
        };
        assert_eq!(own.rules[0].rule(), None);
        assert_eq!(own.owned(rule(RuleKind::DropLoopbackSource)), 0);
    }

    #[test]
    fn moving_its_own_copy_claims_no_copy_added_later_by_someone_else() {
        // loopguard's pair was split; it takes its copies out and puts a pair on top, and is
        // killed before the verifying read. Then someone adds an ACCEPT of their own.
        let before = tables(&[A, "", D], &[O]);
        let mut own = Ownership::default();
        let fresh = plan_enforce(&tables(&[], &[]), &own, V6, Placement::Insert);
        own.expect(&fresh, &tables(&[], &[]));
        own.reconcile(&tables(&[A, D], &[O]), V6);
        own.reconcile(&before, V6);
        let plan = plan_enforce(&before, &own, V6, Placement::Insert);
        assert!(
            plan.edits.iter().any(|e| e.kind == EditKind::Delete),
            "{plan:?}"
        );
        own.expect(&plan, &before);
        let later = tables(&[A, A, D, ""], &[O]);
        own.reconcile(&later, V6);
        assert_eq!(own.owned(rule(RuleKind::AcceptLoopbackIn)), 1);
    }
}
