//! iptables-nft's INPUT and OUTPUT without a process per look (the nft backend's counterpart of
//! `node::legacy`): the chains' rules listed over netlink, with their handles, and the `-S` line
//! of each rule taken from what loopguard has learnt. A rule it has not seen is learnt from one
//! `ip6tables-nft -S` listing, taken while the ruleset generation stands still (the listing and
//! the netlink dump are then of the same ruleset, rule for rule). A plan's inserts are written as
//! one netlink transaction, with the expressions `ip6tables-nft` writes (`rules::nft::xt`), bound
//! to the generation the plan was made in: the kernel refuses it if anything changed since, and
//! otherwise the chains are exactly the ones read plus the inserts, with no read after. Deletes,
//! and anything else it does not know, go to the binaries.

use super::iptables::Xtables;
use super::nft;
use crate::Result;
use crate::rules::nft::xt::{self, Listed, Slot};
use crate::rules::{Chain, ChainListing, Family, RulePlan, Tables};
use std::collections::HashMap;
use std::io;
use std::sync::Arc;

/// A rule's handle and its `-S` line.
type Handled = (u64, Arc<str>);

/// The chains of one read, per family: each rule's identity and handle, in order.
type Dump = Vec<((Family, Chain), Vec<Listed>)>;

/// What loopguard has learnt about iptables-nft's chains: which rule identity prints as which
/// `-S` line, for the rules `xt::line` does not decode (the others are decoded at every read, and
/// not kept: a chain of thousands of rules would hold megabytes of their expressions).
#[derive(Debug, Default)]
pub struct NftRules {
    lines: HashMap<(Family, Chain), HashMap<Vec<u8>, Arc<str>>>,
    /// Reads and writes done in process (for tests and benchmarks: which path ran).
    pub reads: u64,
    pub writes: u64,
    /// Listings taken with the binaries to learn rules.
    pub learnt: u64,
    /// Reads answered from the last read because the ruleset's generation had not moved.
    pub unchanged: u64,
    /// The last read: its families, and what it found in which generation.
    last: Option<(Vec<Family>, NftHeld)>,
}

/// A read for a change: the generation it was made in, and each chain's rules (handle, line).
#[derive(Clone, Debug)]
pub struct NftHeld {
    generation: u32,
    chains: HashMap<(Family, Chain), Vec<Handled>>,
}

impl NftHeld {
    /// The chains read, as lines.
    fn tables(&self) -> Tables {
        let mut tables = Tables::default();
        for ((family, chain), listed) in &self.chains {
            let rules = listed.iter().map(|(_, line)| line.to_string()).collect();
            tables.insert(*family, *chain, ChainListing { rules });
        }
        tables
    }
}

/// How an in-process write ended.
#[derive(Debug)]
pub enum NftApplied {
    /// Written; the chains of every family of the plan as they now are.
    Done(Vec<(Family, Chain, Vec<String>)>),
    /// Not written here (a delete, a changed ruleset, ...): use the binaries.
    NotHere(String),
}

impl NftRules {
    /// INPUT and OUTPUT of `families`, read in process (learning what it does not know from one
    /// listing with the binaries). `Ok(None)`: not possible here (a table or chain missing, the
    /// ruleset changing all the time): read with the binaries.
    ///
    /// The kernel moves the ruleset's generation on every change to any table of the
    /// namespace: while it stands where the last read was made, the chains are the ones that
    /// read found, and are not listed again (a re-check of thousands of rules costs
    /// microseconds instead of a dump of them all).
    pub fn read(
        &mut self,
        families: &[Family],
        xtables: &Xtables,
    ) -> Result<Option<(Tables, NftHeld)>> {
        if let (Some((read, held)), Ok(now)) = (&self.last, nft::generation())
            && read == families
            && held.generation == now
        {
            self.unchanged += 1;
            return Ok(Some((held.tables(), held.clone())));
        }
        let found = self.read_now(families, xtables)?;
        self.last = found
            .as_ref()
            .map(|(_, held)| (families.to_vec(), held.clone()));
        Ok(found)
    }

    fn read_now(
        &mut self,
        families: &[Family],
        xtables: &Xtables,
    ) -> Result<Option<(Tables, NftHeld)>> {
        for _ in 0..3 {
            let Some((generation, dump)) = list_chains(families) else {
                return Ok(None);
            };
            if let Some(found) = self.known(generation, &dump) {
                self.reads += 1;
                return Ok(Some(found));
            }
            let tables = xtables.read(families)?;
            let Some((after, again)) = list_chains(families) else {
                return Ok(None);
            };
            if after != generation || again != dump {
                continue;
            }
            self.learnt += 1;
            for ((family, chain), rules) in &dump {
                let lines = &tables.chain(*family, *chain).rules;
                if lines.len() != rules.len() {
                    tracing::debug!(%family, %chain, rules = rules.len(), lines = lines.len(), "nft rules and -S lines differ in number; not learning");
                    return Ok(None);
                }
                let known = self.lines.entry((*family, *chain)).or_default();
                // Only what the decoder does not cover: the rest is decoded at every read.
                for (rule, line) in rules.iter().zip(lines) {
                    if rule.line.is_none() {
                        known.insert(rule.identity.clone(), line.as_str().into());
                    }
                }
            }
            // Bounded: a node whose foreign rules keep changing must not grow this forever.
            if self.lines.values().map(HashMap::len).sum::<usize>() > 100_000 {
                self.lines.clear();
            }
            if let Some(found) = self.known(generation, &dump) {
                self.reads += 1;
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// The chains of `dump` as lines, if every rule is decoded (`xt::line`) or learnt.
    fn known(&self, generation: u32, dump: &Dump) -> Option<(Tables, NftHeld)> {
        let mut chains = HashMap::new();
        for ((family, chain), rules) in dump {
            let known = self.lines.get(&(*family, *chain));
            let listed: Vec<Handled> = rules
                .iter()
                .map(|r| match &r.line {
                    Some(line) => Some((r.handle, Arc::from(line.as_str()))),
                    None => known
                        .and_then(|k| k.get(&r.identity))
                        .map(|line| (r.handle, line.clone())),
                })
                .collect::<Option<_>>()?;
            chains.insert((*family, *chain), listed);
        }
        let held = NftHeld { generation, chains };
        Some((held.tables(), held))
    }

    /// Writes `plan`'s inserts in one transaction bound to the generation `held` was read in.
    pub fn apply(&mut self, plan: &RulePlan, held: &NftHeld) -> io::Result<NftApplied> {
        let mut adds = Vec::new();
        let mut after = Vec::new();
        for family in plan.families() {
            for chain in Chain::ALL {
                let Some(rules) = held.chains.get(&(family, chain)) else {
                    return Ok(NftApplied::NotHere(format!(
                        "{family} {chain} was not read in process"
                    )));
                };
                let handles: Vec<u64> = rules.iter().map(|(h, _)| *h).collect();
                let (chain_adds, slots) = match xt::adds_for(plan, family, chain, &handles) {
                    Ok(done) => done,
                    Err(why) => return Ok(NftApplied::NotHere(why)),
                };
                let lines: HashMap<u64, &Arc<str>> = rules.iter().map(|(h, l)| (*h, l)).collect();
                let listing = slots
                    .iter()
                    .map(|slot| match slot {
                        Slot::Kept(h) => lines[h].to_string(),
                        Slot::Added(rule) => rule.spec(),
                    })
                    .collect();
                adds.extend(chain_adds.into_iter().map(|a| (family, chain, a)));
                after.push((family, chain, listing));
            }
        }
        if adds.is_empty() {
            return Ok(NftApplied::NotHere("nothing to add".into()));
        }
        match nft::add_iptables_rules(held.generation, &adds) {
            Ok(()) => {
                self.writes += 1;
                Ok(NftApplied::Done(after))
            }
            Err(e) if nft::is_stale(&e) => Ok(NftApplied::NotHere(
                "the ruleset changed since the read".into(),
            )),
            Err(e) => Err(e),
        }
    }
}

/// The generation and the rules of INPUT and OUTPUT of `families`, read while the generation
/// stood still; `None` when a table or chain is missing or cannot be read.
fn list_chains(families: &[Family]) -> Option<(u32, Dump)> {
    for _ in 0..3 {
        let before = nft::generation().ok()?;
        let mut dump = Vec::new();
        for &family in families {
            for chain in Chain::ALL {
                match nft::iptables_chain(family, chain) {
                    Ok(Some(rules)) => dump.push(((family, chain), rules)),
                    Ok(None) => return None,
                    Err(e) => {
                        tracing::debug!(%family, %chain, error = %e, "listing the chain over netlink failed; reading with the binaries");
                        return None;
                    }
                }
            }
        }
        if nft::generation().ok()? == before {
            return Some((before, dump));
        }
    }
    None
}
