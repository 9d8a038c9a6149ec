//! Property tests of the pure core (no kernel, no root): thousands of random chains from a grammar
//! of real ip6tables rules, and random histories of loopguard passes, crashes and other writers.
//! Edits are applied with the test's own model of iptables (`support/chains.rs`), not loopguard's.

#[path = "support/chains.rs"]
mod chains;

use chains::{
    ACCEPT_IN, ACCEPT_OUT, Chains, DROP_SRC, apply_edit, foreign, is_baseline, same_rule,
};
use loopguard::rules::{
    Chain, ChainListing, EditKind, Family, Ownership, Placement, Rule, RulePlan, Tables, evaluate,
    plan_cleanup, plan_enforce,
};
use proptest::prelude::*;

const V6: &[Family] = &[Family::Ipv6];

/// Reads the generated chains the way the engine reads a legacy kernel: through `-S` text, with
/// the rules that only print like loopguard's marked (the engine tells them by their entries).
fn read(c: &Chains) -> Tables {
    let mut t = Tables::default();
    for (chain, rules) in [(Chain::Input, &c.input), (Chain::Output, &c.output)] {
        let text = chains::listing(chain.name(), rules);
        let mut listing = ChainListing::parse(chain, &text);
        for (line, spec) in listing.rules.iter_mut().zip(rules) {
            if chains::legacy_view(spec) != *line {
                assert_eq!(*line, chains::listed(spec), "-S prints the rule");
                *line = chains::legacy_view(spec);
            }
        }
        t.insert(Family::Ipv6, chain, listing);
    }
    t
}

fn rules(t: &Tables, chain: Chain) -> Vec<String> {
    t.chain(Family::Ipv6, chain).rules.clone()
}

/// Applies a plan with the test's model of iptables.
fn apply(t: &Tables, plan: &RulePlan) -> Tables {
    let mut out = t.clone();
    for edit in &plan.edits {
        let mut chain = rules(&out, edit.chain);
        let (action, position) = match edit.kind {
            EditKind::Insert(n) => ("insert", Some(n)),
            EditKind::Append => ("append", None),
            EditKind::Delete => ("delete", None),
        };
        apply_edit(&mut chain, action, position, &edit.target.spec());
        out.insert(edit.family, edit.chain, ChainListing { rules: chain });
    }
    out
}

fn placement(append: bool) -> Placement {
    if append {
        Placement::Append
    } else {
        Placement::Insert
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    /// Every rule line counts: parsing `-S` gives back every generated rule, in order.
    #[test]
    fn parsing_counts_every_rule(c in chains::chains()) {
        let t = read(&c);
        let view = |rules: &[String]| rules.iter().map(|r| chains::legacy_view(r)).collect::<Vec<_>>();
        prop_assert_eq!(rules(&t, Chain::Input), view(&c.input));
        prop_assert_eq!(rules(&t, Chain::Output), view(&c.output));
    }

    /// Enforce reaches compliance in one plan, keeps every foreign rule in order, is idempotent,
    /// never shadows its pair with Insert, and cleanup gives back the chains it found.
    #[test]
    fn enforce_is_safe_and_cleanup_restores(c in chains::chains(), append in any::<bool>()) {
        let placement = placement(append);
        let before = read(&c);
        let plan = plan_enforce(&before, &Ownership::default(), V6, placement);
        prop_assert!(plan.edits.iter().all(|e| e.kind != EditKind::Delete), "nothing owned, nothing deleted");
        let after = apply(&before, &plan);
        let verdict = evaluate(&after, V6);
        prop_assert!(verdict.compliant, "{:?}", plan);
        for chain in Chain::ALL {
            prop_assert_eq!(foreign(&rules(&after, chain)), foreign(&rules(&before, chain)));
        }
        let input_edited = plan.edits.iter().any(|e| e.chain == Chain::Input);
        if placement == Placement::Insert && input_edited {
            prop_assert_eq!(verdict.shadowed_by, None);
        }
        let mut own = Ownership::default();
        own.expect(&plan, &before);
        own.reconcile(&after, V6);
        prop_assert!(plan_enforce(&after, &own, V6, placement).is_empty());
        let cleaned = apply(&after, &plan_cleanup(&after, &own, V6));
        prop_assert_eq!(cleaned, before);
    }
}

/// What happens to a node in a random history.
#[derive(Clone, Debug)]
enum Step {
    /// A loopguard enforce; `crash`: killed after the restore, before the state was written.
    Enforce { append: bool, crash: bool },
    /// A loopguard cleanup.
    Cleanup,
    /// Another writer inserts a rule at a position (taken modulo the chain's length + 1).
    Insert {
        chain: Chain,
        at: usize,
        spec: String,
    },
    /// Another writer deletes the rule at a position, if it is one of its own (not identical to
    /// a baseline rule).
    DeleteForeign { chain: Chain, at: usize },
    /// Another writer deletes a copy of a baseline rule by spec (`ip6tables -D INPUT -s ::1 -j DROP`).
    DeleteBaseline { which: usize },
}

fn step() -> impl Strategy<Value = Step> {
    let chain = prop_oneof![Just(Chain::Input), Just(Chain::Output)];
    prop_oneof![
        3 => (any::<bool>(), prop::bool::weighted(0.2))
            .prop_map(|(append, crash)| Step::Enforce { append, crash }),
        1 => Just(Step::Cleanup),
        3 => (chain.clone(), any::<usize>(), prop_oneof![
                4 => chains::foreign_writer_rule(),
                1 => prop_oneof![Just(ACCEPT_IN.to_string()), Just(DROP_SRC.to_string())],
            ])
            .prop_map(|(chain, at, spec)| Step::Insert { chain, at, spec }),
        2 => (chain, any::<usize>()).prop_map(|(chain, at)| Step::DeleteForeign { chain, at }),
        1 => (0usize..3).prop_map(|which| Step::DeleteBaseline { which }),
    ]
}

const BASELINE: [&str; 3] = [ACCEPT_IN, DROP_SRC, ACCEPT_OUT];

fn chain_of(which: usize) -> Chain {
    if which == 2 {
        Chain::Output
    } else {
        Chain::Input
    }
}

/// A node as the engine sees it: the tables and the stored ownership.
struct Node {
    tables: Tables,
    stored: Ownership,
    /// Who put each physical rule there (true: loopguard), per chain (INPUT, OUTPUT), in order.
    tags: [Vec<bool>; 2],
    /// Copies of each baseline rule that others put there, net of the copies of theirs that
    /// others deleted: a delete by spec removes the first copy, which by design is loopguard's.
    external: [i64; 3],
    /// Copies of loopguard's that others deleted, and copies others added, since loopguard last
    /// read the chains. Within that window a copy deleted and a copy added (in either order) are
    /// indistinguishable from nothing happening to loopguard's copy (same rule, same count, no
    /// identity in the kernel's table): the model then counts the added copy as loopguard's. That
    /// is the limit of what any reader of the table can know; the watcher reads after every change.
    unseen_losses: [usize; 3],
    unseen_adds: [usize; 3],
}

impl Node {
    fn tags(&mut self, chain: Chain) -> &mut Vec<bool> {
        &mut self.tags[usize::from(chain == Chain::Output)]
    }

    /// Applies loopguard's plan to the tables and to the physical copies. loopguard's delete is
    /// by spec: the first copy goes. Copies are interchangeable, so where that first copy was
    /// someone else's and loopguard has a copy of its own below it, the two swap owners; where
    /// loopguard has none, it removed someone else's rule, and the count check below fails.
    fn apply(&mut self, plan: &RulePlan) {
        for edit in &plan.edits {
            let spec = edit.target.spec();
            let chain = rules(&self.tables, edit.chain);
            let tags = self.tags(edit.chain);
            match edit.kind {
                EditKind::Insert(n) => tags.insert(n - 1, true),
                EditKind::Append => tags.push(true),
                EditKind::Delete => {
                    let at = chain
                        .iter()
                        .position(|r| same_rule("legacy", r, &spec))
                        .expect("loopguard deletes a rule that is there");
                    if !tags.remove(at) {
                        if let Some(own) = (0..chain.len() - 1).find(|&i| {
                            tags[i] && same_rule("legacy", &chain[i + usize::from(i >= at)], &spec)
                        }) {
                            tags[own] = false;
                        }
                    }
                }
            }
            self.tables = apply(
                &self.tables,
                &RulePlan {
                    edits: vec![edit.clone()],
                },
            );
        }
    }

    fn count(&self, which: usize) -> i64 {
        rules(&self.tables, chain_of(which))
            .iter()
            .filter(|r| *r == BASELINE[which])
            .count() as i64
    }

    /// One loopguard pass the way `Engine` runs it: reconcile, plan, record the intent, apply,
    /// reconcile with the verifying read (unless killed before), store.
    fn pass(
        &mut self,
        plan_for: impl Fn(&Tables, &Ownership) -> RulePlan,
        crash: bool,
    ) -> RulePlan {
        let mut own = self.stored.clone();
        own.reconcile(&self.tables, V6);
        self.unseen_losses = [0; 3];
        self.unseen_adds = [0; 3];
        let plan = plan_for(&self.tables, &own);
        if !plan.is_empty() {
            own.expect(&plan, &self.tables);
            self.apply(&plan);
            if !crash {
                own.reconcile(&self.tables, V6);
            }
        }
        self.stored = own;
        plan
    }

    fn owned(&self) -> Ownership {
        let mut own = self.stored.clone();
        own.reconcile(&self.tables, V6);
        own
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, failure_persistence: None, ..ProptestConfig::default() })]

    /// Whatever others do between and around loopguard's passes (and whenever loopguard is
    /// killed after a restore): loopguard never removes or moves a foreign rule, never removes
    /// more copies of a baseline rule than it inserted, never holds two copies of a rule after
    /// an enforce, and a final cleanup leaves nothing of its own.
    #[test]
    fn no_history_makes_loopguard_touch_what_it_does_not_own(
        c in chains::chains(),
        steps in prop::collection::vec(step(), 1..16),
    ) {
        let tables = read(&c);
        let tags = [
            vec![false; rules(&tables, Chain::Input).len()],
            vec![false; rules(&tables, Chain::Output).len()],
        ];
        let mut node = Node {
            tables: tables.clone(),
            stored: Ownership::default(),
            tags,
            external: [0; 3],
            unseen_losses: [0; 3],
            unseen_adds: [0; 3],
        };
        for which in 0..3 {
            node.external[which] = node.count(which);
        }
        for step in &steps {
            let foreign_before: Vec<Vec<String>> =
                Chain::ALL.iter().map(|&ch| foreign(&rules(&node.tables, ch))).collect();
            let mut loopguard_ran = true;
            match step {
                Step::Enforce { append, crash } => {
                    node.pass(|t, own| plan_enforce(t, own, V6, placement(*append)), *crash);
                    prop_assert!(evaluate(&node.tables, V6).compliant);
                    let own = node.owned();
                    for rule in Rule::baseline(Family::Ipv6) {
                        prop_assert!(own.owned(rule) <= 1, "{rule} owned {} times", own.owned(rule));
                    }
                }
                Step::Cleanup => {
                    node.pass(|t, own| plan_cleanup(t, own, &own.families()), false);
                }
                Step::Insert { chain, at, spec } => {
                    loopguard_ran = false;
                    let mut r = rules(&node.tables, *chain);
                    let at = at % (r.len() + 1);
                    r.insert(at, chains::legacy_view(spec));
                    node.tables.insert(Family::Ipv6, *chain, ChainListing { rules: r });
                    match (0..3).find(|&w| BASELINE[w] == spec && chain_of(w) == *chain) {
                        Some(which) if node.unseen_losses[which] > 0 => {
                            node.unseen_losses[which] -= 1;
                            node.tags(*chain).insert(at, true);
                        }
                        Some(which) => {
                            node.external[which] += 1;
                            node.unseen_adds[which] += 1;
                            node.tags(*chain).insert(at, false);
                        }
                        None => node.tags(*chain).insert(at, false),
                    }
                }
                Step::DeleteForeign { chain, at } => {
                    loopguard_ran = false;
                    let mut r = rules(&node.tables, *chain);
                    if !r.is_empty() && !is_baseline(&r[at % r.len()]) {
                        let at = at % r.len();
                        r.remove(at);
                        node.tables.insert(Family::Ipv6, *chain, ChainListing { rules: r });
                        node.tags(*chain).remove(at);
                    }
                }
                Step::DeleteBaseline { which } => {
                    loopguard_ran = false;
                    let mut r = rules(&node.tables, chain_of(*which));
                    if let Some(at) = r.iter().position(|x| x == BASELINE[*which]) {
                        r.remove(at);
                        node.tables.insert(Family::Ipv6, chain_of(*which), ChainListing { rules: r });
                        // `-D` takes the first copy: when that is loopguard's, every copy the
                        // others put there is still there.
                        if node.tags(chain_of(*which)).remove(at) {
                            if node.unseen_adds[*which] > 0 {
                                // A copy added since loopguard last read takes its place.
                                node.unseen_adds[*which] -= 1;
                                node.external[*which] -= 1;
                                let r = rules(&node.tables, chain_of(*which));
                                let tags = node.tags(chain_of(*which));
                                if let Some(i) = (0..r.len()).find(|&i| !tags[i] && r[i] == BASELINE[*which]) {
                                    tags[i] = true;
                                }
                            } else {
                                node.unseen_losses[*which] += 1;
                            }
                        } else {
                            node.external[*which] -= 1;
                            node.unseen_adds[*which] =
                                node.unseen_adds[*which].min(node.external[*which].max(0) as usize);
                        }
                    }
                }
            }
            if loopguard_ran {
                for (i, &ch) in Chain::ALL.iter().enumerate() {
                    prop_assert_eq!(&foreign(&rules(&node.tables, ch)), &foreign_before[i], "{:?} moved foreign rules", step);
                }
            }
            for ch in Chain::ALL {
                prop_assert_eq!(node.tags(ch).len(), rules(&node.tables, ch).len(), "the model lost track");
            }
            for (which, rule) in BASELINE.iter().enumerate() {
                prop_assert!(
                    node.count(which) >= node.external[which],
                    "{} copies of {} left, others put {} there",
                    node.count(which), rule, node.external[which]
                );
            }
        }
        node.pass(|t, own| plan_cleanup(t, own, &own.families()), false);
        prop_assert!(node.owned().is_empty(), "owned after cleanup: {:?}", node.owned());
        for (which, rule) in BASELINE.iter().enumerate() {
            prop_assert!(
                node.count(which) >= node.external[which],
                "after cleanup, {} copies of {} left, others put {} there: {:?}, loopguard's: {:?}",
                node.count(which), rule, node.external[which], node.tables, node.tags
            );
        }
    }
}
