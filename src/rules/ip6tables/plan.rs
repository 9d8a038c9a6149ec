//! The smallest set of edits that makes a node compliant, or that removes what loopguard owns,
//! rendered as one `iptables-restore --noflush` transaction per family.
//!
//! Safe by construction:
//! - a delete names the rule (`-D INPUT -s ::1/128 -j DROP`), never a position, so it can only
//!   ever remove a rule identical to one of loopguard's, and ownership counts decide how many;
//! - inserts name a position read before the restore; if another writer changed the chain in
//!   between, that can at worst misplace loopguard's own rule, which the verifying read catches;
//! - loopguard's copies of a rule are kept ahead of other identical copies (it completes a pair
//!   on the side where its copy becomes the first one), so deleting by specification removes
//!   exactly the copies it inserted and cleanup gives back the chain it found.

use super::evaluate::{compliant_pair, scanner_counts_as};
use super::{Chain, ChainListing, Family, Ownership, Placement, Rule, Tables};
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
    /// `-D CHAIN SPEC`: delete the first rule identical to the edit's rule.
    Delete,
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
        let spec = self.target.spec();
        match self.kind {
            EditKind::Insert(n) => format!("-I {} {n} {spec}", self.chain),
            EditKind::Append => format!("-A {} {spec}", self.chain),
            EditKind::Delete => format!("-D {} {spec}", self.chain),
        }
    }

    /// Applies the edit to a listing the way iptables does (`false` when a delete finds nothing).
    pub fn apply_to(&self, listing: &mut ChainListing) -> bool {
        let spec = self.target.spec();
        match self.kind {
            EditKind::Insert(n) => {
                let at = n.saturating_sub(1).min(listing.rules.len());
                listing.rules.insert(at, spec);
            }
            EditKind::Append => listing.rules.push(spec),
            EditKind::Delete => match listing.positions(&spec).first() {
                Some(&at) => {
                    listing.rules.remove(at);
                }
                None => return false,
            },
        }
        true
    }
}

impl fmt::Display for Edit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.family, self.restore_line())
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

    /// What the tables hold after the plan, as iptables would apply it.
    pub fn applied_to(&self, tables: &Tables) -> Tables {
        let mut after = tables.clone();
        for edit in &self.edits {
            let mut listing = after.chain(edit.family, edit.chain).clone();
            edit.apply_to(&mut listing);
            after.insert(edit.family, edit.chain, listing);
        }
        after
    }
}

/// The smallest plan that makes `families` compliant given the current `tables` and what
/// loopguard owns there (already reconciled with `tables`).
pub fn plan_enforce(
    tables: &Tables,
    ownership: &Ownership,
    families: &[Family],
    placement: Placement,
) -> RulePlan {
    let mut plan = RulePlan::default();
    for &family in families {
        let input = tables.chain(family, Chain::Input);
        if compliant_pair(input, family).is_none() {
            plan.edits
                .extend(pair_edits(input, ownership, family, placement));
        }
        let [_, _, accept_out] = Rule::baseline(family);
        let output = tables.chain(family, Chain::Output);
        if !output
            .rules
            .iter()
            .any(|r| scanner_counts_as(accept_out, r))
        {
            let kind = match placement {
                Placement::Insert => EditKind::Insert(1),
                Placement::Append => EditKind::Append,
            };
            plan.edits.push(Edit::new(accept_out, kind));
        }
    }
    plan
}

/// Edits that give INPUT the pair. When the simplest edit would give loopguard a second copy of
/// a rule it already owns (its pair was split up or misplaced, for example by another writer
/// inserting between the two), loopguard takes its own copies out and places the pair afresh,
/// in the same transaction, so that copies never pile up.
fn pair_edits(
    input: &ChainListing,
    ownership: &Ownership,
    family: Family,
    placement: Placement,
) -> Vec<Edit> {
    let edits = complete_or_add(input, family, placement);
    if edits.iter().all(|e| ownership.owned(e.target) == 0) {
        return edits;
    }
    let [accept, drop, _] = Rule::baseline(family);
    let mut remaining = input.clone();
    let mut edits = Vec::new();
    for rule in [accept, drop] {
        for _ in 0..ownership.owned(rule) {
            let delete = Edit::new(rule, EditKind::Delete);
            if delete.apply_to(&mut remaining) {
                edits.push(delete);
            }
        }
    }
    edits.extend(complete_or_add(&remaining, family, placement));
    edits
}

/// Completes a pair around an exact ACCEPT or DROP already in INPUT, on the side where the new
/// copy becomes the first copy of its rule (a DROP right after the first ACCEPT when that comes
/// first, else an ACCEPT right before the first DROP); else adds the pair where `placement` says.
/// With Insert placement a pair is never completed behind a catch-all rule, where it would be
/// shadowed: the pair then goes on top.
fn complete_or_add(input: &ChainListing, family: Family, placement: Placement) -> Vec<Edit> {
    let [accept, drop, _] = Rule::baseline(family);
    let first_accept = input.positions(&accept.spec()).first().copied();
    let first_drop = input.positions(&drop.spec()).first().copied();
    // (the edit, the 0-based index the completed pair starts at)
    let completion = match (first_accept, first_drop) {
        (Some(a), d) if d.is_none_or(|d| a < d) => {
            Some((Edit::new(drop, EditKind::Insert(a + 2)), a))
        }
        (_, Some(d)) => Some((Edit::new(accept, EditKind::Insert(d + 1)), d)),
        _ => None,
    };
    let shadowed = |at: usize| input.first_catch_all().is_some_and(|c| c < at);
    match (completion, placement) {
        (Some((edit, at)), placement) if placement == Placement::Append || !shadowed(at) => {
            vec![edit]
        }
        (_, Placement::Insert) => vec![
            Edit::new(accept, EditKind::Insert(1)),
            Edit::new(drop, EditKind::Insert(2)),
        ],
        (_, Placement::Append) => vec![
            Edit::new(accept, EditKind::Append),
            Edit::new(drop, EditKind::Append),
        ],
    }
}

/// A plan that deletes exactly the copies loopguard owns in `families`, by specification.
pub fn plan_cleanup(tables: &Tables, ownership: &Ownership, families: &[Family]) -> RulePlan {
    let mut plan = RulePlan::default();
    for &family in families {
        for rule in Rule::baseline(family) {
            let copies = ownership.owned(rule).min(tables.count(rule));
            plan.edits
                .extend((0..copies).map(|_| Edit::new(rule, EditKind::Delete)));
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::ip6tables::evaluate;
    use crate::rules::ip6tables::evaluate::tests::tables;

    const A: &str = "-i lo -j ACCEPT";
    const D: &str = "-s ::1/128 -j DROP";
    const O: &str = "-o lo -j ACCEPT";
    const V6: &[Family] = &[Family::Ipv6];
    const NONE: &Ownership = &Ownership { rules: Vec::new() };

    fn input(t: &Tables) -> Vec<String> {
        t.chain(Family::Ipv6, Chain::Input).rules.clone()
    }

    /// Enforces, and returns the tables after plus what loopguard owns then.
    fn enforce(t: &Tables, own: &Ownership, placement: Placement) -> (Tables, Ownership) {
        let plan = plan_enforce(t, own, V6, placement);
        let after = plan.applied_to(t);
        let mut own = own.clone();
        own.expect(&plan, t);
        own.reconcile(&after, V6);
        (after, own)
    }

    #[test]
    fn empty_node_gets_the_pair_on_top_and_output_rule() {
        let t = tables(&["-j KUBE-FIREWALL"], &["-j KUBE-SERVICES"]);
        let plan = plan_enforce(&t, NONE, V6, Placement::Insert);
        assert_eq!(
            plan.restore_script(Family::Ipv6).unwrap(),
            "*filter\n-I INPUT 1 -i lo -j ACCEPT\n-I INPUT 2 -s ::1/128 -j DROP\n-I OUTPUT 1 -o lo -j ACCEPT\nCOMMIT\n"
        );
        let after = plan.applied_to(&t);
        assert!(evaluate(&after, V6).compliant);
        assert_eq!(input(&after)[2], "-j KUBE-FIREWALL");
        assert!(plan.restore_script(Family::Ipv4).is_none());
    }

    #[test]
    fn append_placement_appends_like_the_seed() {
        let t = tables(&["-j KUBE-FIREWALL"], &[]);
        let after = plan_enforce(&t, NONE, V6, Placement::Append).applied_to(&t);
        assert_eq!(input(&after), vec!["-j KUBE-FIREWALL", A, D]);
        assert!(evaluate(&after, V6).compliant);
    }

    #[test]
    fn compliant_node_gets_no_plan() {
        let t = tables(&["-j KUBE-FIREWALL", A, D], &[O]);
        assert!(plan_enforce(&t, NONE, V6, Placement::Insert).is_empty());
        let lenient = tables(&["-i lo -p tcp -j ACCEPT", D], &[O]);
        assert!(plan_enforce(&lenient, NONE, V6, Placement::Insert).is_empty());
    }

    #[test]
    fn drop_before_accept_gets_an_accept_before_the_first_drop() {
        // Loopguard's ACCEPT becomes the first ACCEPT, so deleting it by spec later is exact.
        let t = tables(&[D, "-p tcp -j ACCEPT", A], &[O]);
        let plan = plan_enforce(&t, NONE, V6, Placement::Insert);
        assert_eq!(plan.edits.len(), 1);
        let after = plan.applied_to(&t);
        assert_eq!(input(&after), vec![A, D, "-p tcp -j ACCEPT", A]);
        assert!(evaluate(&after, V6).compliant);
    }

    /// A rule that only prints like loopguard's (legacy `-i lo -p all -j ACCEPT`) passes the
    /// scanner like the rule, but is never counted, deleted or completed as loopguard's.
    #[test]
    fn look_alikes_count_for_the_scanner_never_for_ownership() {
        use crate::rules::LOOK_ALIKE;
        let look_alike = format!("{LOOK_ALIKE}{A}");
        let t = tables(&[&look_alike, D], &[O]);
        assert!(
            evaluate(&t, V6).compliant,
            "the scanner reads it as the rule"
        );
        assert!(plan_enforce(&t, NONE, V6, Placement::Insert).is_empty());
        let [accept, _, _] = Rule::baseline(Family::Ipv6);
        assert_eq!(t.count(accept), 0, "not a copy of loopguard's rule");
        // loopguard's own ACCEPT went; the look-alike stays, and is not taken for it.
        let mut own = Ownership::default();
        let t = tables(&["-j X"], &[O]);
        let (after, owned) = enforce(&t, &own, Placement::Insert);
        own = owned;
        let mut gone = input(&after);
        gone[0] = look_alike.clone();
        let drifted = tables(&gone.iter().map(String::as_str).collect::<Vec<_>>(), &[O]);
        own.reconcile(&drifted, V6);
        assert_eq!(own.owned(accept), 0);
        let cleanup = plan_cleanup(&drifted, &own, V6);
        assert!(
            cleanup.edits.iter().all(|e| e.target != accept),
            "{cleanup:?}"
        );
        assert_eq!(
            ChainListing { rules: gone }
                .render(Chain::Input)
                .lines()
                .nth(1),
            Some("-A INPUT -i lo -j ACCEPT"),
            "rendered as -S prints it"
        );
    }

    #[test]
    fn lone_accept_gets_a_drop_right_after_it() {
        let t = tables(&["-j X", A, "-j Y", D], &[O]);
        let after = plan_enforce(&t, NONE, V6, Placement::Insert).applied_to(&t);
        assert_eq!(input(&after), vec!["-j X", A, D, "-j Y", D]);
    }

    #[test]
    fn insert_never_completes_a_pair_behind_a_catch_all() {
        let t = tables(&["-j REJECT", A], &[O]);
        let after = plan_enforce(&t, NONE, V6, Placement::Insert).applied_to(&t);
        assert_eq!(input(&after), vec![A, D, "-j REJECT", A]);
        assert!(evaluate(&after, V6).shadowed_by.is_none());
        // Append does what it is told; the report names the shadow.
        let after = plan_enforce(&t, NONE, V6, Placement::Append).applied_to(&t);
        assert_eq!(input(&after), vec!["-j REJECT", A, D]);
        assert!(evaluate(&after, V6).shadowed_by.is_some());
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
            tables(&["", "-p tcp -m tcp --dport 22 -j ACCEPT"], &[]),
        ];
        for placement in [Placement::Insert, Placement::Append] {
            for t in &cases {
                let (enforced, own) = enforce(t, NONE, placement);
                assert!(evaluate(&enforced, V6).compliant, "{t:?} {placement:?}");
                let cleaned = plan_cleanup(&enforced, &own, V6).applied_to(&enforced);
                assert_eq!(&cleaned, t, "{placement:?}");
            }
        }
    }

    #[test]
    fn the_lockout_case_deletes_only_loopguards_rules() {
        // An empty accounting rule, then SSH; enforce with append, then clean up.
        let t = tables(&["", "-p tcp -m tcp --dport 22 -j ACCEPT"], &[]);
        let (enforced, own) = enforce(&t, NONE, Placement::Append);
        let cleanup = plan_cleanup(&enforced, &own, V6);
        let lines: Vec<String> = cleanup.edits.iter().map(Edit::restore_line).collect();
        assert_eq!(
            lines,
            vec![
                "-D INPUT -i lo -j ACCEPT",
                "-D INPUT -s ::1/128 -j DROP",
                "-D OUTPUT -o lo -j ACCEPT"
            ]
        );
        assert_eq!(cleanup.applied_to(&enforced), t);
    }

    #[test]
    fn cleanup_without_ownership_removes_nothing() {
        let t = tables(&[A, D], &[O]);
        assert!(plan_cleanup(&t, NONE, V6).is_empty());
    }

    #[test]
    fn cleanup_takes_its_own_copies_when_a_duplicate_was_added_later() {
        // loopguard inserted the pair at the top; later someone appended their own pair.
        let t = tables(&[], &[]);
        let (mut later, own) = enforce(&t, NONE, Placement::Insert);
        let mut input = input(&later);
        input.extend(["-j X".to_string(), A.to_string(), D.to_string()]);
        later.insert(Family::Ipv6, Chain::Input, ChainListing { rules: input });
        let cleaned = plan_cleanup(&later, &own, V6).applied_to(&later);
        assert_eq!(
            cleaned.chain(Family::Ipv6, Chain::Input).rules,
            vec!["-j X", A, D]
        );
    }

    #[test]
    fn a_split_pair_of_its_own_is_placed_afresh_not_copied() {
        // Another writer inserted its rule between loopguard's ACCEPT and DROP.
        let (enforced, own) = enforce(&tables(&["-j X"], &[]), NONE, Placement::Insert);
        let mut split = input(&enforced);
        split.insert(1, "-j F".into());
        let mut t = enforced.clone();
        t.insert(Family::Ipv6, Chain::Input, ChainListing { rules: split });
        let plan = plan_enforce(&t, &own, V6, Placement::Insert);
        let (after, own) = enforce(&t, &own, Placement::Insert);
        assert_eq!(input(&after), vec![A, D, "-j F", "-j X"], "{plan:?}");
        assert_eq!(
            own.owned(Rule::baseline(Family::Ipv6)[1]),
            1,
            "one DROP, not two"
        );
        assert!(plan_enforce(&after, &own, V6, Placement::Insert).is_empty());
    }
}
