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
use crate::rules::nft::journal::{Commit, Journal};
use crate::rules::nft::xt::{self, Listed, Slot};
use crate::rules::{Chain, ChainListing, Family, RulePlan, Tables};
use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
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
    /// Reads answered from the last read brought forward by the notifications since (rules
    /// deleted from INPUT or OUTPUT, and nothing else there).
    pub replayed: u64,
    /// The last read (or write): its families, and what it found in which generation.
    last: Option<(Vec<Family>, NftHeld)>,
    /// The change notifications followed since [`NftRules::follow`], if it was called.
    following: Option<Following>,
}

/// A subscription to the ruleset's change notifications and what they said.
#[derive(Debug)]
struct Following {
    fd: OwnedFd,
    journal: Journal,
    buf: Vec<u8>,
}

impl Following {
    /// Takes in every notification queued (a loss marks the journal so).
    fn catch_up(&mut self) {
        loop {
            let journal = &mut self.journal;
            match nft::drain(&self.fd, &mut self.buf, |datagram| journal.record(datagram)) {
                Ok(_) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "nftables notifications lost; the next read lists the chains");
                    self.journal.lost();
                    if e.raw_os_error() != Some(libc::ENOBUFS) {
                        return;
                    }
                }
            }
        }
    }
}

/// A read for a change: the generation it was made in, and each chain's rules (handle, line).
#[derive(Clone, Debug)]
pub struct NftHeld {
    generation: u32,
    chains: HashMap<(Family, Chain), Vec<Handled>>,
}

impl NftHeld {
    /// These chains after `commits` (the ones right after this read's generation, up to
    /// `generation`), if all they did to them was delete rules this read holds.
    fn after(&self, commits: &[&Commit], generation: u32) -> Option<NftHeld> {
        let mut chains = self.chains.clone();
        for commit in commits {
            if commit
                .touched
                .iter()
                .any(|f| Chain::ALL.iter().any(|c| chains.contains_key(&(*f, *c))))
            {
                return None;
            }
            for (family, chain, handle) in &commit.deleted {
                if let Some(rules) = chains.get_mut(&(*family, *chain)) {
                    let at = rules.iter().position(|(h, _)| h == handle)?;
                    rules.remove(at);
                }
            }
        }
        Some(NftHeld { generation, chains })
    }

    /// These chains after a write of `slots` (per chain) committed in the next generation, the
    /// new rules as the kernel echoed them (in the order of the slots); `None` where an echo is
    /// missing or is not the rule planned.
    fn written(
        &self,
        slots: Vec<((Family, Chain), Vec<Slot>)>,
        added: &[Option<Listed>],
    ) -> Option<NftHeld> {
        let generation = match self.generation.wrapping_add(1) {
            0 => 1,
            n => n,
        };
        let mut chains = self.chains.clone();
        let mut echoes = added.iter();
        for (key, slots) in slots {
            // The kept rules are the chain's, in order.
            let mut kept = self.chains.get(&key)?.iter();
            let mut rules = Vec::with_capacity(slots.len());
            for slot in slots {
                match slot {
                    Slot::Kept(h) => {
                        let (k, line) = kept.next()?;
                        if *k != h {
                            return None;
                        }
                        rules.push((h, line.clone()));
                    }
                    Slot::Added(rule) => {
                        let echo = echoes.next()?.as_ref()?;
                        let spec = rule.spec();
                        if echo.line.as_deref() != Some(spec.as_str()) {
                            return None;
                        }
                        rules.push((echo.handle, Arc::from(spec)));
                    }
                }
            }
            chains.insert(key, rules);
        }
        echoes
            .next()
            .is_none()
            .then_some(NftHeld { generation, chains })
    }

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
    /// Follows the ruleset's change notifications from now on (in the calling thread's network
    /// namespace), so that a read after rules were deleted from INPUT or OUTPUT, and nothing else
    /// done there, takes the last read without them instead of listing the chains again. For the
    /// watch: a one-shot command reads once.
    pub fn follow(&mut self) {
        if self.following.is_some() {
            return;
        }
        match nft::subscribe() {
            Ok(fd) => {
                // The generation seen after subscribing: every commit past it is seen whole.
                let journal = match nft::generation() {
                    Ok(generation) => Journal::after(generation),
                    Err(_) => Journal::default(),
                };
                self.following = Some(Following {
                    fd,
                    journal,
                    buf: vec![0; 64 * 1024],
                })
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot follow nftables notifications; every changed read lists the chains")
            }
        }
    }

    /// INPUT and OUTPUT of `families`, read in process (learning what it does not know from one
    /// listing with the binaries). `Ok(None)`: not possible here (a table or chain missing, the
    /// ruleset changing all the time): read with the binaries.
    ///
    /// The kernel moves the ruleset's generation on every change to any table of the
    /// namespace: while it stands where the last read was made, the chains are the ones that
    /// read found, and are not listed again (a re-check of thousands of rules costs
    /// microseconds instead of a dump of them all). Where it moved and the notifications since
    /// (see [`NftRules::follow`]) say only that rules of the last read were deleted, the last
    /// read without them is the answer.
    pub fn read(
        &mut self,
        families: &[Family],
        xtables: &Xtables,
    ) -> Result<Option<(Tables, NftHeld)>> {
        if let Some(following) = self.following.as_mut() {
            following.catch_up();
        }
        if let (Some((read, held)), Ok(now)) = (&self.last, nft::generation())
            && read == families
        {
            if held.generation == now {
                self.unchanged += 1;
                return Ok(Some((held.tables(), held.clone())));
            }
            let brought = self.following.as_mut().and_then(|following| {
                let commits = following.journal.between(held.generation, now)?;
                held.after(&commits, now)
            });
            if let Some(brought) = brought {
                self.replayed += 1;
                let found = (brought.tables(), brought.clone());
                self.last = Some((families.to_vec(), brought));
                return Ok(Some(found));
            }
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
    /// The chains as written, with the handles the kernel gave the new rules, become the last
    /// read (at the generation the write made).
    pub fn apply(&mut self, plan: &RulePlan, held: &NftHeld) -> io::Result<NftApplied> {
        let mut adds = Vec::new();
        let mut after = Vec::new();
        let mut written = Vec::new();
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
                // The kept rules are the chain's, in order.
                let mut kept = rules.iter();
                let listing = slots
                    .iter()
                    .map(|slot| match slot {
                        Slot::Kept(_) => kept.next().expect("a kept rule").1.to_string(),
                        Slot::Added(rule) => rule.spec(),
                    })
                    .collect();
                adds.extend(chain_adds.into_iter().map(|a| (family, chain, a)));
                after.push((family, chain, listing));
                written.push(((family, chain), slots));
            }
        }
        if adds.is_empty() {
            return Ok(NftApplied::NotHere("nothing to add".into()));
        }
        match nft::add_iptables_rules(held.generation, &adds) {
            Ok(added) => {
                self.writes += 1;
                self.last = self.last.take().and_then(|(families, last)| {
                    (last.generation == held.generation)
                        .then(|| held.written(written, &added))
                        .flatten()
                        .map(|held| (families, held))
                });
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
            for (chain, listed) in Chain::ALL.into_iter().zip(nft::iptables_chains(family)) {
                match listed {
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
