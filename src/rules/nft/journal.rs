//! What nf_tables' change notifications say was done to iptables-nft's `filter` tables, commit by
//! commit, pure: enough to bring a read of INPUT and OUTPUT forward without listing them again in
//! the one case that is both common and unambiguous (rules deleted: the notification names the
//! rule's handle), and to tell every other case apart (anything else done to a `filter` table:
//! list again).
//!
//! Every committed transaction ends with `NFT_MSG_NEWGEN` carrying the ruleset's new generation;
//! the kernel sends a transaction's notifications together, after its commit, in order. A read
//! made at generation G can be brought to generation H when every commit G+1..=H was seen whole,
//! in a row: a commit missed (the socket's buffer overflowed, or it came before the subscription)
//! leaves a gap in the generations or is marked unknown, and the read is made again.

use super::wire::{
    self, NFPROTO_IPV4, NFPROTO_IPV6, NFT_MSG_DELRULE, NFT_MSG_NEWRULE, NFTA_RULE_CHAIN,
};
use super::xt::{NFTA_RULE_HANDLE, TABLE};
use crate::rules::{Chain, Family};
use std::collections::VecDeque;

const NFT_MSG_NEWGEN: u16 = 15;
const NFTA_GEN_ID: u16 = 1;
/// The table's name is attribute 1 of every nf_tables object (table, chain, rule, set, ...).
const NFTA_TABLE: u16 = 1;
/// Commits kept: a reader more than this far behind lists again.
const KEPT: usize = 256;

/// One committed transaction, as far as iptables-nft's built-in chains are concerned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Commit {
    pub generation: u32,
    /// Rules deleted from INPUT or OUTPUT: (family, chain, handle), in order.
    pub deleted: Vec<(Family, Chain, u64)>,
    /// Families whose `filter` table saw anything else that could change what INPUT and OUTPUT
    /// list (a rule added or replaced there, a chain or the table changed, a set, ...).
    pub touched: Vec<Family>,
    /// Not seen whole: notifications were lost, or the subscription began inside it.
    pub unknown: bool,
}

/// The commits seen, oldest first, and the one whose end is still to come.
#[derive(Debug)]
pub struct Journal {
    commits: VecDeque<Commit>,
    pending: Commit,
    /// Every commit after this generation is seen whole (unless lost).
    start: Option<u32>,
}

impl Default for Journal {
    /// A journal starts unsure of its first commit: the subscription may have begun in the middle
    /// of its notifications.
    fn default() -> Self {
        Journal {
            commits: VecDeque::new(),
            pending: Commit {
                unknown: true,
                ..Commit::default()
            },
            start: None,
        }
    }
}

impl Journal {
    /// A journal of a subscription made before the ruleset was seen at `generation`: a commit
    /// after that generation moved it after the subscription, and the kernel sends a commit's
    /// notifications after it moves the generation, so every one of them is seen.
    pub fn after(generation: u32) -> Journal {
        Journal {
            commits: VecDeque::new(),
            pending: Commit::default(),
            start: Some(generation),
        }
    }

    /// Takes in one datagram of notifications.
    pub fn record(&mut self, datagram: &[u8]) {
        for m in wire::messages(datagram) {
            let Some(kind) = m.nft() else {
                self.pending.unknown = true;
                continue;
            };
            if kind == NFT_MSG_NEWGEN {
                let generation = attr(m.body, NFTA_GEN_ID).and_then(be32);
                let mut commit = std::mem::take(&mut self.pending);
                match generation {
                    Some(generation) => commit.generation = generation,
                    None => {
                        // A commit without its number: nothing before it can be joined to what
                        // comes after.
                        self.commits.clear();
                        continue;
                    }
                }
                if self.commits.len() == KEPT {
                    self.commits.pop_front();
                }
                self.commits.push_back(commit);
                continue;
            }
            let family = match m.family {
                NFPROTO_IPV6 => Family::Ipv6,
                NFPROTO_IPV4 => Family::Ipv4,
                // Other families' tables are not iptables-nft's `filter`.
                _ => continue,
            };
            match attr(m.body, NFTA_TABLE) {
                Some(table) if wire_str(table) != TABLE => continue,
                Some(_) => {}
                None => {
                    self.pending.touched.push(family);
                    continue;
                }
            }
            let chain = matches!(kind, NFT_MSG_NEWRULE | NFT_MSG_DELRULE)
                .then(|| attr(m.body, NFTA_RULE_CHAIN).map(wire_str))
                .flatten();
            let builtin = Chain::ALL.into_iter().find(|c| Some(c.name()) == chain);
            match (kind, builtin) {
                (NFT_MSG_DELRULE, Some(chain)) => {
                    match attr(m.body, NFTA_RULE_HANDLE).and_then(be64) {
                        Some(handle) => self.pending.deleted.push((family, chain, handle)),
                        None => self.pending.touched.push(family),
                    }
                }
                // A rule of another chain: INPUT and OUTPUT list the same.
                (NFT_MSG_NEWRULE | NFT_MSG_DELRULE, None) if chain.is_some() => {}
                _ => self.pending.touched.push(family),
            }
        }
    }

    /// Notifications were lost (the receive buffer overflowed): nothing seen so far joins what
    /// comes next, and the commit under way is unknown.
    pub fn lost(&mut self) {
        self.commits.clear();
        self.pending = Commit {
            unknown: true,
            ..Commit::default()
        };
    }

    /// Every commit after generation `from` up to generation `to`, if each was seen whole and in
    /// a row; `None` otherwise. Commits up to `from` are let go.
    pub fn between(&mut self, from: u32, to: u32) -> Option<Vec<&Commit>> {
        if self.start.is_some_and(|start| after(start, from)) {
            // Read before the subscription: what came in between was not seen.
            return None;
        }
        while self
            .commits
            .front()
            .is_some_and(|c| !after(c.generation, from))
        {
            self.commits.pop_front();
        }
        let mut at = from;
        let mut out = Vec::new();
        for commit in &self.commits {
            if at == to {
                break;
            }
            if commit.generation != next(at) || commit.unknown {
                return None;
            }
            out.push(commit);
            at = commit.generation;
        }
        (at == to).then_some(out)
    }
}

/// The generation after `generation` (the kernel skips 0 when it wraps).
fn next(generation: u32) -> u32 {
    match generation.wrapping_add(1) {
        0 => 1,
        n => n,
    }
}

/// Whether `generation` comes after `from` (within half the number space, as with sequence
/// numbers).
fn after(generation: u32, from: u32) -> bool {
    let d = generation.wrapping_sub(from);
    d != 0 && d < 1 << 31
}

fn attr(body: &[u8], kind: u16) -> Option<&[u8]> {
    wire::Attrs(body).get(kind)
}

fn wire_str(data: &[u8]) -> &str {
    std::str::from_utf8(wire::until_nul(data)).unwrap_or("")
}

fn be32(data: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(data.get(..4)?.try_into().ok()?))
}

fn be64(data: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(data.get(..8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::nft::wire::{Msg, NFPROTO_INET, NFT_MSG_NEWCHAIN};

    fn rule_event(kind: u16, family: u8, table: &str, chain: &str, handle: u64) -> Vec<u8> {
        let mut m = Msg::nft(kind, 0, 0, family);
        m.str(NFTA_TABLE, table)
            .str(NFTA_RULE_CHAIN, chain)
            .attr(NFTA_RULE_HANDLE, &handle.to_be_bytes());
        m.finish()
    }

    fn newgen(generation: u32) -> Vec<u8> {
        let mut m = Msg::nft(NFT_MSG_NEWGEN, 0, 0, 0);
        m.attr(NFTA_GEN_ID, &generation.to_be_bytes());
        m.finish()
    }

    /// A journal past its first (unknown) commit, at generation 10.
    fn journal() -> Journal {
        let mut j = Journal::default();
        j.record(&newgen(10));
        j
    }

    #[test]
    fn deletions_from_input_and_output_are_kept_with_their_commit() {
        let mut j = journal();
        let mut datagram = rule_event(NFT_MSG_DELRULE, NFPROTO_IPV6, "filter", "INPUT", 7);
        datagram.extend(rule_event(
            NFT_MSG_DELRULE,
            NFPROTO_IPV4,
            "filter",
            "OUTPUT",
            9,
        ));
        datagram.extend(newgen(11));
        j.record(&datagram);
        let commits = j.between(10, 11).expect("seen whole");
        assert_eq!(
            commits,
            vec![&Commit {
                generation: 11,
                deleted: vec![
                    (Family::Ipv6, Chain::Input, 7),
                    (Family::Ipv4, Chain::Output, 9)
                ],
                touched: vec![],
                unknown: false,
            }]
        );
    }

    #[test]
    fn anything_else_in_a_filter_table_touches_its_family_and_other_tables_do_not() {
        let mut j = journal();
        // A rule added to INPUT, a chain changed: touched.
        j.record(&rule_event(
            NFT_MSG_NEWRULE,
            NFPROTO_IPV6,
            "filter",
            "INPUT",
            3,
        ));
        let mut chain = Msg::nft(NFT_MSG_NEWCHAIN, 0, 0, NFPROTO_IPV4);
        chain.str(NFTA_TABLE, "filter").str(3, "FOREIGN");
        j.record(&chain.finish());
        // Rules of other chains, other tables, other families: not.
        j.record(&rule_event(
            NFT_MSG_NEWRULE,
            NFPROTO_IPV6,
            "filter",
            "KUBE-SERVICES",
            4,
        ));
        j.record(&rule_event(
            NFT_MSG_DELRULE,
            NFPROTO_IPV6,
            "nat",
            "INPUT",
            5,
        ));
        j.record(&rule_event(
            NFT_MSG_DELRULE,
            NFPROTO_INET,
            "filter",
            "INPUT",
            6,
        ));
        j.record(&newgen(11));
        let commits = j.between(10, 11).unwrap();
        assert_eq!(commits[0].touched, vec![Family::Ipv6, Family::Ipv4]);
        assert!(commits[0].deleted.is_empty());
    }

    #[test]
    fn a_gap_a_loss_or_the_first_commit_after_subscribing_is_not_joined() {
        // The first commit seen may have begun before the subscription.
        let mut j = Journal::default();
        j.record(&newgen(5));
        assert_eq!(j.between(4, 5), None);
        j.record(&newgen(6));
        assert_eq!(j.between(5, 6).map(|c| c.len()), Some(1));

        // A generation missing in between.
        let mut j = journal();
        j.record(&newgen(12));
        assert_eq!(j.between(10, 12), None);

        // Lost notifications: what was seen before does not join, and the commit under way is
        // unknown.
        let mut j = journal();
        j.record(&newgen(11));
        j.lost();
        j.record(&newgen(12));
        assert_eq!(j.between(10, 12), None);
        assert_eq!(j.between(11, 12), None);
        j.record(&newgen(13));
        assert_eq!(j.between(12, 13).map(|c| c.len()), Some(1));

        // Nothing yet seen of a generation the kernel already reports.
        let mut j = journal();
        assert_eq!(j.between(10, 11), None);
        assert_eq!(j.between(10, 10), Some(vec![]));
    }

    #[test]
    fn a_journal_started_at_a_generation_knows_every_commit_after_it_and_none_before() {
        let mut j = Journal::after(10);
        j.record(&rule_event(
            NFT_MSG_DELRULE,
            NFPROTO_IPV6,
            "filter",
            "INPUT",
            7,
        ));
        j.record(&newgen(11));
        assert_eq!(j.between(10, 11).map(|c| c[0].deleted.len()), Some(1));
        let mut j = Journal::after(10);
        j.record(&newgen(10));
        j.record(&newgen(11));
        assert_eq!(
            j.between(9, 11),
            None,
            "a read from before the subscription"
        );
    }

    #[test]
    fn older_commits_are_let_go_and_generations_wrap_past_zero() {
        let mut j = journal();
        for g in 11..=14 {
            j.record(&newgen(g));
        }
        assert_eq!(j.between(12, 14).map(|c| c.len()), Some(2));
        assert_eq!(j.between(10, 14), None, "11 and 12 were let go");

        let mut j = Journal::default();
        j.record(&newgen(u32::MAX - 1));
        j.record(&newgen(u32::MAX));
        j.record(&newgen(1));
        let commits = j.between(u32::MAX - 1, 1).unwrap();
        assert_eq!(
            commits.iter().map(|c| c.generation).collect::<Vec<_>>(),
            vec![u32::MAX, 1]
        );
    }
}
