//! The smallest set of edits that makes a node compliant, or that removes what loopguard owns,
//! rendered as one `iptables-restore --noflush` transaction per family.
//!
//! Rules already compliant are never moved, and only rules loopguard owns are ever deleted.

use super::evaluate::compliant_pair;
use super::{Chain, ChainListing, Family, Ownership, Placement, Rule, RuleKind, Tables};
use serde::Serialize;
use std::fmt::{self, Write as _};

/// What an edit does to its chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "action", content = "position")]
pub enum EditKind {
    /// `-I CHAIN N`: insert at 1-based position N.
    Insert(usize),
    /// `-A CHAIN`: append at the end.
    Append,
    /// `-D CHAIN N`: delete the rule at 1-based position N (always a copy loopguard owns).
    Delete(usize),
}

/// One rule edit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Edit {
    pub family: Family,
    pub chain: Chain,
    #[serde(flatten)]
    pub kind: EditKind,
    /// The rule in `iptables-save` syntax.
    pub rule: String,
    #[serde(skip)]
    pub target: Rule,
}

impl Edit {
    fn new(target: Rule, kind: EditKind) -> Edit {
        Edit {
            family: target.family,
            chain: target.chain(),
            kind,
            rule: target.save_syntax(),
            target,
        }
    }

    /// The line of an `iptables-restore` script.
    pub fn restore_line(&self) -> String {
        match self.kind {
            EditKind::Insert(n) => format!("-I {} {} {}", self.chain, n, self.target.spec()),
            EditKind::Append => format!("-A {} {}", self.chain, self.target.spec()),
            EditKind::Delete(n) => format!("-D {} {}", self.chain, n),
        }
    }
}

impl fmt::Display for Edit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            EditKind::Delete(_) => write!(
                f,
                "{}: {}  # {}",
                self.family,
                self.restore_line(),
                self.rule
            ),
            _ => write!(f, "{}: {}", self.family, self.restore_line()),
        }
    }
}

/// An ordered list of edits; positions are valid when applied in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct RulePlan {
    pub edits: Vec<Edit>,
}

impl RulePlan {
    pub fn is_empty(&self) -> bool {
        self.edits.is_empty()
    }

    pub fn families(&self) -> Vec<Family> {
        super::distinct(self.edits.iter().map(|e| e.family))
    }

    /// The `iptables-restore --noflush` input for one family, or `None` when it has no edits.
    /// It names no chain policy and flushes nothing: only the listed edits happen.
    pub fn restore_script(&self, family: Family) -> Option<String> {
        let mut script = String::from("*filter\n");
        let mut any = false;
        for edit in self.edits.iter().filter(|e| e.family == family) {
            let _ = writeln!(script, "{}", edit.restore_line());
            any = true;
        }
        script.push_str("COMMIT\n");
        any.then_some(script)
    }

    pub fn extend(&mut self, other: RulePlan) {
        self.edits.extend(other.edits);
    }
}

/// The smallest plan that makes `families` compliant given the current `tables`.
pub fn plan_enforce(tables: &Tables, families: &[Family], placement: Placement) -> RulePlan {
    let mut plan = RulePlan::default();
    for &family in families {
        let [accept, drop, accept_out] = Rule::baseline(family);
        let input = tables.chain(family, Chain::Input);
        if compliant_pair(input, family).is_none() {
            let accepts = input.positions(&accept.spec());
            let drops = input.positions(&drop.spec());
            if let Some(&first_accept) = accepts.first() {
                // Keep the ACCEPT where it is; put a DROP right after it.
                plan.edits
                    .push(Edit::new(drop, EditKind::Insert(first_accept + 2)));
            } else if let Some(&first_drop) = drops.first() {
                // Keep the DROP where it is; put the ACCEPT right before it.
                plan.edits
                    .push(Edit::new(accept, EditKind::Insert(first_drop + 1)));
            } else {
                match placement {
                    Placement::Insert => {
                        plan.edits.push(Edit::new(accept, EditKind::Insert(1)));
                        plan.edits.push(Edit::new(drop, EditKind::Insert(2)));
                    }
                    Placement::Append => {
                        plan.edits.push(Edit::new(accept, EditKind::Append));
                        plan.edits.push(Edit::new(drop, EditKind::Append));
                    }
                }
            }
        }
        if tables.count(accept_out) == 0 {
            let kind = match placement {
                Placement::Insert => EditKind::Insert(1),
                Placement::Append => EditKind::Append,
            };
            plan.edits.push(Edit::new(accept_out, kind));
        }
    }
    plan
}

/// A plan that deletes exactly the copies loopguard owns in `families`, nothing else.
///
/// Among identical copies, the ones standing in a compliant pair are taken first (loopguard always
/// inserts the pair together or completes one), then the first copies for rules it inserted at the
/// top, the last for rules it appended.
pub fn plan_cleanup(tables: &Tables, ownership: &Ownership, families: &[Family]) -> RulePlan {
    let mut plan = RulePlan::default();
    for &family in families {
        for chain in Chain::ALL {
            let listing = tables.chain(family, chain);
            let mut deletions: Vec<(usize, Rule)> = Vec::new();
            for rule in Rule::baseline(family)
                .into_iter()
                .filter(|r| r.chain() == chain)
            {
                let owned = ownership.owned(rule);
                if owned == 0 {
                    continue;
                }
                let chosen = deletion_candidates(listing, rule, ownership.placement(rule));
                deletions.extend(chosen.into_iter().take(owned).map(|pos| (pos, rule)));
            }
            // Delete from the bottom up so that earlier positions stay valid.
            deletions.sort_by_key(|d| std::cmp::Reverse(d.0));
            plan.edits.extend(
                deletions
                    .into_iter()
                    .map(|(pos, rule)| Edit::new(rule, EditKind::Delete(pos + 1))),
            );
        }
    }
    plan
}

/// 0-based positions of `rule`'s copies in the order cleanup should prefer them.
fn deletion_candidates(listing: &ChainListing, rule: Rule, placement: Placement) -> Vec<usize> {
    let [accept, drop, _] = Rule::baseline(rule.family).map(Rule::spec);
    let partner = |pos: usize| -> bool {
        match rule.kind {
            RuleKind::AcceptLoopbackIn => listing.rules.get(pos + 1) == Some(&drop),
            RuleKind::DropLoopbackSource => pos > 0 && listing.rules[pos - 1] == accept,
            RuleKind::AcceptLoopbackOut => false,
        }
    };
    let mut positions = listing.positions(&rule.spec());
    if placement == Placement::Append {
        positions.reverse();
    }
    let (paired, rest): (Vec<usize>, Vec<usize>) = positions.into_iter().partition(|&p| partner(p));
    paired.into_iter().chain(rest).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::evaluate;
    use crate::rules::evaluate::tests::tables;

    const A: &str = "-i lo -j ACCEPT";
    const D: &str = "-s ::1/128 -j DROP";
    const O: &str = "-o lo -j ACCEPT";
    const V6: &[Family] = &[Family::Ipv6];

    /// Applies a plan to in-memory chains the way iptables-restore would.
    fn apply(t: &Tables, plan: &RulePlan) -> Tables {
        let mut out = t.clone();
        for edit in &plan.edits {
            let mut rules = out.chain(edit.family, edit.chain).rules.clone();
            match edit.kind {
                EditKind::Insert(n) => rules.insert(n - 1, edit.target.spec()),
                EditKind::Append => rules.push(edit.target.spec()),
                EditKind::Delete(n) => {
                    assert_eq!(
                        rules[n - 1],
                        edit.target.spec(),
                        "deletes only its own rule text"
                    );
                    rules.remove(n - 1);
                }
            }
            out.insert(edit.family, edit.chain, ChainListing { rules });
        }
        out
    }

    fn owned_after(t: &Tables, plan: &RulePlan) -> Ownership {
        let mut own = Ownership::default();
        for edit in &plan.edits {
            own.record_insert(edit.target, t.count(edit.target), Placement::Insert);
        }
        own
    }

    #[test]
    fn empty_node_gets_the_pair_on_top_and_output_rule() {
        let t = tables(&["-j KUBE-FIREWALL"], &["-j KUBE-SERVICES"]);
        let plan = plan_enforce(&t, V6, Placement::Insert);
        assert_eq!(
            plan.restore_script(Family::Ipv6).unwrap(),
            "*filter\n-I INPUT 1 -i lo -j ACCEPT\n-I INPUT 2 -s ::1/128 -j DROP\n-I OUTPUT 1 -o lo -j ACCEPT\nCOMMIT\n"
        );
        let after = apply(&t, &plan);
        assert!(evaluate(&after, V6).compliant);
        assert_eq!(
            after.chain(Family::Ipv6, Chain::Input).rules[2],
            "-j KUBE-FIREWALL"
        );
        assert!(plan.restore_script(Family::Ipv4).is_none());
    }

    #[test]
    fn append_placement_appends_like_the_seed() {
        let t = tables(&["-j KUBE-FIREWALL"], &[]);
        let plan = plan_enforce(&t, V6, Placement::Append);
        let after = apply(&t, &plan);
        assert_eq!(
            after.chain(Family::Ipv6, Chain::Input).rules,
            vec!["-j KUBE-FIREWALL", A, D]
        );
        assert!(evaluate(&after, V6).compliant);
    }

    #[test]
    fn compliant_node_gets_no_plan() {
        let t = tables(&["-j KUBE-FIREWALL", A, D], &[O]);
        assert!(plan_enforce(&t, V6, Placement::Insert).is_empty());
    }

    #[test]
    fn drop_before_accept_is_fixed_by_one_insert_without_moving_anything() {
        let t = tables(&[D, "-p tcp -j ACCEPT", A], &[O]);
        let plan = plan_enforce(&t, V6, Placement::Insert);
        assert_eq!(plan.edits.len(), 1);
        let after = apply(&t, &plan);
        assert_eq!(
            after.chain(Family::Ipv6, Chain::Input).rules,
            vec![D, "-p tcp -j ACCEPT", A, D]
        );
        assert!(evaluate(&after, V6).compliant);
    }

    #[test]
    fn lone_drop_gets_an_accept_right_before_it() {
        let t = tables(&["-j X", D], &[O]);
        let after = apply(&t, &plan_enforce(&t, V6, Placement::Insert));
        assert_eq!(
            after.chain(Family::Ipv6, Chain::Input).rules,
            vec!["-j X", A, D]
        );
    }

    #[test]
    fn enforce_then_cleanup_restores_the_original_chains() {
        let cases: Vec<Tables> = vec![
            tables(&[], &[]),
            tables(
                &["-j KUBE-FIREWALL", "-p tcp --dport 22 -j ACCEPT"],
                &["-j KUBE-SERVICES"],
            ),
            tables(&[D, A], &[O]),
            tables(&[A, "-j X", D, "-j Y"], &[]),
            tables(&["-j X", D], &[O, O]),
        ];
        for placement in [Placement::Insert, Placement::Append] {
            for t in &cases {
                let plan = plan_enforce(t, V6, placement);
                let enforced = apply(t, &plan);
                assert!(evaluate(&enforced, V6).compliant, "{t:?} {placement:?}");
                let mut own = Ownership::default();
                for edit in &plan.edits {
                    own.record_insert(edit.target, t.count(edit.target), placement);
                }
                own.reconcile(&enforced, V6);
                let cleaned = apply(&enforced, &plan_cleanup(&enforced, &own, V6));
                assert_eq!(&cleaned, t, "{placement:?}");
            }
        }
    }

    #[test]
    fn cleanup_without_ownership_removes_nothing() {
        let t = tables(&[A, D], &[O]);
        assert!(plan_cleanup(&t, &Ownership::default(), V6).is_empty());
    }

    #[test]
    fn cleanup_takes_the_paired_copy_when_a_duplicate_was_added_later() {
        // loopguard inserted the pair at the top; later someone appended their own pair.
        let t = tables(&[], &[]);
        let plan = plan_enforce(&t, V6, Placement::Insert);
        let own = owned_after(&t, &plan);
        let mut later = apply(&t, &plan);
        let mut input = later.chain(Family::Ipv6, Chain::Input).rules.clone();
        input.extend(["-j X".to_string(), A.to_string(), D.to_string()]);
        later.insert(Family::Ipv6, Chain::Input, ChainListing { rules: input });
        let cleaned = apply(&later, &plan_cleanup(&later, &own, V6));
        assert_eq!(
            cleaned.chain(Family::Ipv6, Chain::Input).rules,
            vec!["-j X", A, D]
        );
    }

    #[test]
    fn deletes_are_ordered_bottom_up() {
        let t = tables(&[A, D], &[O]);
        let own = owned_after(
            &tables(&[], &[]),
            &plan_enforce(&tables(&[], &[]), V6, Placement::Insert),
        );
        let plan = plan_cleanup(&t, &own, V6);
        let lines: Vec<String> = plan.edits.iter().map(Edit::restore_line).collect();
        assert_eq!(lines, vec!["-D INPUT 2", "-D INPUT 1", "-D OUTPUT 1"]);
    }
}
