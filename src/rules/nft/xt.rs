//! The seed's rules in iptables-nft's tables (`ip6 filter`, `ip filter`), pure: the expressions
//! `ip6tables-nft` (1.8.9) writes for each of loopguard's rules, the request that lists a built-in
//! chain's rules with their handles, a rule's identity (what `-S` prints depends on), and a plan's
//! inserts as one netlink transaction bound to the ruleset generation the plan was made in.
//!
//! ```text
//! -A INPUT -i lo -j ACCEPT       [ meta load iifname => reg 1 ] [ cmp eq reg 1 "lo\0" ] [ counter ] [ immediate reg 0 accept ]
//! -A INPUT -s ::1/128 -j DROP    [ payload load 16b @ network header + 8 => reg 1 ] [ cmp eq reg 1 ::1 ] [ counter ] [ immediate reg 0 drop ]
//! -A INPUT -s 127.0.0.0/8 -j DROP [ payload load 1b @ network header + 12 => reg 1 ] [ cmp eq reg 1 0x7f ] [ counter ] [ immediate reg 0 drop ]
//! -A OUTPUT -o lo -j ACCEPT      [ meta load oifname => reg 1 ] [ cmp eq reg 1 "lo\0" ] [ counter ] [ immediate reg 0 accept ]
//! ```
//!
//! `tests/nft_inprocess.rs` holds a write from here against `ip6tables-nft`'s own, through
//! `nft -j list ruleset`.

use super::wire::{
    self, Batch, Expr, Msg, NF_ACCEPT, NF_DROP, NFPROTO_IPV4, NFPROTO_IPV6, NFT_CMP_EQ,
    NFT_MSG_GETRULE, NFT_MSG_NEWRULE, NFT_PAYLOAD_NETWORK_HEADER, NFT_REG_1, NFT_REG_VERDICT,
    NFTA_EXPR_NAME, NFTA_LIST_ELEM, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS, NFTA_RULE_TABLE,
    NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP, NLM_F_ECHO,
};
use crate::rules::{Chain, EditKind, Family, Rule, RuleKind, RulePlan};

/// iptables-nft's table (in the `ip6` and `ip` families).
pub const TABLE: &str = "filter";
pub(super) const NFTA_RULE_HANDLE: u16 = 3;
const NFTA_RULE_COMPAT: u16 = 5;
const NFTA_RULE_POSITION: u16 = 6;
const NFTA_RULE_USERDATA: u16 = 7;
const NFT_META_IIFNAME: u32 = 6;
const NFT_META_OIFNAME: u32 = 7;

/// The nf_tables family of an iptables family.
pub fn nfproto(family: Family) -> u8 {
    match family {
        Family::Ipv6 => NFPROTO_IPV6,
        Family::Ipv4 => NFPROTO_IPV4,
    }
}

/// The expressions `ip6tables-nft` (or `iptables-nft`) writes for one of loopguard's rules.
pub fn rule_exprs(rule: Rule) -> Vec<Expr> {
    let interface = |key: u32| {
        vec![
            Expr::Meta {
                key,
                dreg: NFT_REG_1,
            },
            // The name up to and including its NUL: an exact match, as for `-i lo`.
            Expr::Cmp {
                sreg: NFT_REG_1,
                op: NFT_CMP_EQ,
                data: b"lo\0".to_vec(),
            },
        ]
    };
    let verdict = |code| Expr::Verdict {
        dreg: NFT_REG_VERDICT,
        code,
    };
    let (mut exprs, code) = match rule.kind {
        RuleKind::AcceptLoopbackIn => (interface(NFT_META_IIFNAME), NF_ACCEPT),
        RuleKind::AcceptLoopbackOut => (interface(NFT_META_OIFNAME), NF_ACCEPT),
        RuleKind::DropLoopbackSource => {
            // ::1/128 in full; 127.0.0.0/8 as its first byte (a whole-byte prefix).
            let (offset, value) = match rule.family {
                Family::Ipv6 => {
                    let mut one = vec![0u8; 16];
                    one[15] = 1;
                    (8, one)
                }
                Family::Ipv4 => (12, vec![127]),
            };
            (
                vec![
                    Expr::Payload {
                        dreg: NFT_REG_1,
                        base: NFT_PAYLOAD_NETWORK_HEADER,
                        offset,
                        len: value.len() as u32,
                    },
                    Expr::Cmp {
                        sreg: NFT_REG_1,
                        op: NFT_CMP_EQ,
                        data: value,
                    },
                ],
                NF_DROP,
            )
        }
    };
    exprs.push(Expr::Counter);
    exprs.push(verdict(code));
    exprs
}

/// Asks for the rules of one built-in chain of iptables-nft's table (filtered by the kernel).
pub fn dump_rules(seq: u32, family: Family, chain: Chain) -> Vec<u8> {
    let mut m = Msg::nft(NFT_MSG_GETRULE, NLM_F_DUMP, seq, nfproto(family));
    m.str(NFTA_RULE_TABLE, TABLE)
        .str(NFTA_RULE_CHAIN, chain.name());
    m.finish()
}

/// A rule as listed: its handle, its `-S` line where [`line`] covers the form, and otherwise what
/// identifies it ([`identity`]; empty for a decoded rule, whose line says it all).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub handle: u64,
    pub identity: Vec<u8>,
    pub line: Option<String>,
}

/// Reads a `NEWRULE` answer; `None` without a handle.
pub fn parse_listed(body: &[u8], family: Family) -> Option<Listed> {
    let mut handle = None;
    let mut expressions = None;
    let mut userdata = false;
    for (kind, data) in wire::Attrs(body) {
        match kind {
            NFTA_RULE_HANDLE => {
                handle = Some(u64::from_be_bytes(data.get(..8)?.try_into().ok()?));
            }
            NFTA_RULE_EXPRESSIONS => expressions = Some(data),
            // A comment lives in the user data: printed by the binaries only.
            NFTA_RULE_USERDATA => userdata = true,
            _ => {}
        }
    }
    let line = expressions
        .filter(|_| !userdata)
        .and_then(|e| self::line(family, e));
    Some(Listed {
        handle: handle?,
        identity: if line.is_none() {
            identity(body)
        } else {
            Vec::new()
        },
        line,
    })
}

/// What identifies a listed rule (`NEWRULE` attributes): its expressions with the counters'
/// values left out, its user data such as a comment, its compat attribute. Two rules with the
/// same identity print the same `-S` line.
pub fn identity(body: &[u8]) -> Vec<u8> {
    let mut identity = Vec::new();
    for (kind, data) in wire::Attrs(body) {
        match kind {
            NFTA_RULE_EXPRESSIONS => {
                for (k, elem) in wire::Attrs(data) {
                    if k != NFTA_LIST_ELEM {
                        continue;
                    }
                    let counter = wire::Attrs(elem)
                        .any(|(k, d)| k == NFTA_EXPR_NAME && d.starts_with(b"counter\0"));
                    identity.extend_from_slice(b"|");
                    if counter {
                        identity.extend_from_slice(b"counter");
                    } else {
                        identity.extend_from_slice(elem);
                    }
                }
            }
            NFTA_RULE_USERDATA | NFTA_RULE_COMPAT => {
                identity.extend_from_slice(&[b'#', kind as u8]);
                identity.extend_from_slice(data);
            }
            _ => {}
        }
    }
    identity
}

/// One expression as listed: its name (without the NUL) and its attributes, read in place.
#[derive(Clone, Copy)]
struct Raw<'a> {
    name: &'a [u8],
    data: wire::Attrs<'a>,
}

impl<'a> Raw<'a> {
    fn of(elem: &'a [u8]) -> Raw<'a> {
        let outer = wire::Attrs(elem);
        let name = outer.get(NFTA_EXPR_NAME).unwrap_or_default();
        Raw {
            name: wire::until_nul(name),
            data: wire::Attrs(outer.get(2).unwrap_or_default()),
        }
    }

    fn get(&self, kind: u16) -> Option<&'a [u8]> {
        self.data.get(kind)
    }

    fn be32(&self, kind: u16) -> Option<u32> {
        Some(u32::from_be_bytes(
            self.get(kind)?.get(..4)?.try_into().ok()?,
        ))
    }

    /// The value of a `cmp eq` on register 1.
    fn compared(&self) -> Option<&'a [u8]> {
        if self.name != b"cmp" || self.be32(1)? != NFT_REG_1 || self.be32(2)? != NFT_CMP_EQ {
            return None;
        }
        wire::Attrs(self.get(3)?).get(1)
    }
}

const NFT_META_L4PROTO: u32 = 16;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;
const NFT_RETURN: i32 = -5;

/// The `-S` line (after `-A CHAIN`) `ip6tables-nft` prints for a rule of these expressions
/// (`NFTA_RULE_EXPRESSIONS`), for the forms iptables-nft writes natively for addresses with a
/// whole-byte prefix, interfaces, `-p tcp`/`-p udp` with single ports, the standard verdicts,
/// jumps and gotos, and `REJECT` with its default answer; `None` for anything else (the line is
/// then learnt from the binaries). Printed as `rules::decode` prints the same rule's legacy entry.
pub fn line(family: Family, expressions: &[u8]) -> Option<String> {
    use std::fmt::Write as _;
    let addr_len = match family {
        Family::Ipv6 => 16,
        Family::Ipv4 => 4,
    };
    let (src_at, dst_at) = match family {
        Family::Ipv6 => (8, 24),
        Family::Ipv4 => (12, 16),
    };
    // Read in place and printed at the end, in `-S`'s order (an address as its bytes and prefix).
    let mut src: Option<([u8; 16], u32)> = None;
    let mut dst: Option<([u8; 16], u32)> = None;
    let mut iif: Option<(&str, bool)> = None;
    let mut oif: Option<(&str, bool)> = None;
    let mut proto: Option<u8> = None;
    let mut sport: Option<u16> = None;
    let mut dport: Option<u16> = None;
    let mut target: Option<Target> = None;
    fn once<T>(slot: &mut Option<T>, value: T) -> Option<()> {
        slot.is_none().then(|| *slot = Some(value))
    }
    let mut exprs = wire::Attrs(expressions)
        .filter(|(k, _)| *k == NFTA_LIST_ELEM)
        .map(|(_, elem)| Raw::of(elem));
    while let Some(e) = exprs.next() {
        if target.is_some() {
            return None;
        }
        match e.name {
            b"counter" => {}
            b"meta" | b"payload" => {
                if e.be32(1)? != NFT_REG_1 {
                    return None;
                }
                let value = exprs.next()?.compared()?;
                if e.name == b"meta" {
                    match e.be32(2)? {
                        NFT_META_IIFNAME => once(&mut iif, interface(value)?)?,
                        NFT_META_OIFNAME => once(&mut oif, interface(value)?)?,
                        NFT_META_L4PROTO if proto.is_none() && value.len() == 1 => {
                            proto = Some(value[0]);
                        }
                        _ => return None,
                    }
                    continue;
                }
                let (base, offset, len) = (e.be32(2)?, e.be32(3)?, e.be32(4)? as usize);
                if value.len() != len {
                    return None;
                }
                match (base, offset) {
                    (NFT_PAYLOAD_NETWORK_HEADER, at) if at == src_at || at == dst_at => {
                        if len == 0 || len > addr_len {
                            return None;
                        }
                        let mut addr = [0u8; 16];
                        addr[..len].copy_from_slice(value);
                        let mut mask = [0u8; 16];
                        mask[..len].fill(0xff);
                        let (addr_b, mask_b) = (&addr[..addr_len], &mask[..addr_len]);
                        let ones = crate::rules::decode::address_prefix(family, addr_b, mask_b)??;
                        once(if at == src_at { &mut src } else { &mut dst }, (addr, ones))?;
                    }
                    (NFT_PAYLOAD_TRANSPORT_HEADER, 0 | 2) if len == 2 => {
                        let port = u16::from_be_bytes([value[0], value[1]]);
                        let slot = if offset == 0 { &mut sport } else { &mut dport };
                        if slot.is_some() || !matches!(proto, Some(6 | 17)) {
                            return None;
                        }
                        *slot = Some(port);
                    }
                    _ => return None,
                }
            }
            b"immediate" => {
                if e.be32(1)? != NFT_REG_VERDICT {
                    return None;
                }
                let verdict = wire::Attrs(wire::Attrs(e.get(2)?).get(2)?);
                let code = verdict.get(1)?;
                let code = i32::from_be_bytes(code.get(..4)?.try_into().ok()?);
                let chain = match verdict.get(2) {
                    None => None,
                    Some(d) => Some(std::str::from_utf8(wire::until_nul(d)).ok()?),
                };
                target = Some(match (code, chain) {
                    (c, None) if c == NF_ACCEPT as i32 => Target::Word("ACCEPT"),
                    (c, None) if c == NF_DROP as i32 => Target::Word("DROP"),
                    (NFT_RETURN, None) => Target::Word("RETURN"),
                    (NFT_JUMP, Some(chain)) if !chain.is_empty() => Target::Jump(chain),
                    (NFT_GOTO, Some(chain)) if !chain.is_empty() => Target::Goto(chain),
                    _ => return None,
                });
            }
            b"target" => {
                let info = e.get(3)?;
                if e.get(1).map(wire::until_nul) != Some(b"REJECT".as_slice())
                    || e.be32(2)? != 0
                    || info.len() < 4
                    || info[4..].iter().any(|&b| b != 0)
                {
                    return None;
                }
                let with = u32::from_ne_bytes(info[..4].try_into().ok()?);
                target = Some(Target::Reject(crate::rules::decode::reject_answer(
                    family, with,
                )?));
            }
            _ => return None,
        }
    }
    let word = match proto {
        None => None,
        Some(6) => Some("tcp"),
        Some(17) => Some("udp"),
        // Other names come from /etc/protocols: the binaries know.
        Some(_) => return None,
    };
    let target = target?;
    let mut out = String::with_capacity(96);
    let sep = |out: &mut String| {
        if !out.is_empty() {
            out.push(' ');
        }
    };
    for (flag, value) in [("-s ", src), ("-d ", dst)] {
        if let Some((addr, ones)) = value {
            sep(&mut out);
            out.push_str(flag);
            crate::rules::decode::write_address(&mut out, &addr[..addr_len], ones);
        }
    }
    for (flag, value) in [("-i ", iif), ("-o ", oif)] {
        if let Some((name, wildcard)) = value {
            sep(&mut out);
            out.push_str(flag);
            out.push_str(name);
            if wildcard {
                out.push('+');
            }
        }
    }
    if let Some(word) = word {
        sep(&mut out);
        let _ = write!(out, "-p {word}");
        if sport.is_some() || dport.is_some() {
            let _ = write!(out, " -m {word}");
            for (flag, port) in [("--sport", sport), ("--dport", dport)] {
                if let Some(port) = port {
                    let _ = write!(out, " {flag} {port}");
                }
            }
        }
    }
    sep(&mut out);
    let _ = match target {
        Target::Word(word) => write!(out, "-j {word}"),
        Target::Jump(chain) => write!(out, "-j {chain}"),
        Target::Goto(chain) => write!(out, "-g {chain}"),
        Target::Reject(answer) => write!(out, "-j REJECT --reject-with {answer}"),
    };
    Some(out)
}

/// A rule's verdict as [`line`] prints it.
enum Target<'a> {
    Word(&'static str),
    Jump(&'a str),
    Goto(&'a str),
    Reject(&'static str),
}

/// An interface as iptables-nft compares it: the name and its NUL for an exact match, the name
/// alone for a `+` wildcard: the name, and whether it is a wildcard.
fn interface(value: &[u8]) -> Option<(&str, bool)> {
    let (name, wildcard) = match value.split_last()? {
        (0, name) => (name, false),
        _ => (value, true),
    };
    if name.is_empty() || !name.iter().all(u8::is_ascii_graphic) {
        return None;
    }
    Some((std::str::from_utf8(name).ok()?, wildcard))
}

/// One rule to add: before the rule with handle `before`, or at the end of the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Add {
    pub rule: Rule,
    pub before: Option<u64>,
}

/// A built-in chain after a plan: the rules that were there (by handle) and those it adds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slot {
    Kept(u64),
    Added(Rule),
}

/// A plan's edits of `chain` in `family` as inserts relative to the rules already there
/// (`handles`, in order), and the chain as it will be. `Err`: an edit this does not write (a
/// delete, a position past the end): the binaries do it.
pub fn adds_for(
    plan: &RulePlan,
    family: Family,
    chain: Chain,
    handles: &[u64],
) -> Result<(Vec<Add>, Vec<Slot>), String> {
    let mut slots: Vec<Slot> = handles.iter().map(|&h| Slot::Kept(h)).collect();
    for edit in plan
        .edits
        .iter()
        .filter(|e| e.family == family && e.chain == chain)
    {
        match edit.kind {
            EditKind::Insert(n) => {
                let at = n.saturating_sub(1);
                if at > slots.len() {
                    return Err(format!("{chain} has {} rules, not {n}", slots.len()));
                }
                slots.insert(at, Slot::Added(edit.target));
            }
            EditKind::Append => slots.push(Slot::Added(edit.target)),
            EditKind::Delete => return Err(format!("{} is a delete", edit.rule)),
        }
    }
    let adds = slots
        .iter()
        .enumerate()
        .filter_map(|(i, slot)| match slot {
            Slot::Added(rule) => Some(Add {
                rule: *rule,
                before: slots[i + 1..].iter().find_map(|s| match s {
                    Slot::Kept(h) => Some(*h),
                    Slot::Added(_) => None,
                }),
            }),
            Slot::Kept(_) => None,
        })
        .collect();
    Ok((adds, slots))
}

/// One transaction adding `adds` (per family and chain, in order), committed only if the ruleset
/// is still at `generation`.
pub fn add_batch(seq: u32, generation: u32, adds: &[(Family, Chain, Add)]) -> Batch {
    wire::batch(seq, generation, |out, next| {
        for (family, chain, add) in adds {
            // Before a rule: insert at its position; no rule after it: append. Echoed: the
            // kernel answers with the rule as committed, its handle included.
            let flags = NLM_F_ACK
                | NLM_F_ECHO
                | NLM_F_CREATE
                | if add.before.is_none() {
                    NLM_F_APPEND
                } else {
                    0
                };
            let mut m = Msg::nft(NFT_MSG_NEWRULE, flags, *next, nfproto(*family));
            m.str(NFTA_RULE_TABLE, TABLE)
                .str(NFTA_RULE_CHAIN, chain.name());
            if let Some(handle) = add.before {
                m.attr(NFTA_RULE_POSITION, &handle.to_be_bytes());
            }
            m.nest(NFTA_RULE_EXPRESSIONS, |m| {
                for expr in rule_exprs(add.rule) {
                    wire::encode_expr(m, &expr);
                }
            });
            out.push(m.finish());
            *next += 1;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{Edit, Placement, Tables, plan_enforce};

    fn plan(input: &[&str], output: &[&str], placement: Placement) -> RulePlan {
        let mut tables = Tables::default();
        for (chain, rules) in [(Chain::Input, input), (Chain::Output, output)] {
            tables.insert(
                Family::Ipv6,
                chain,
                crate::rules::ChainListing {
                    rules: rules.iter().map(|r| r.to_string()).collect(),
                },
            );
        }
        plan_enforce(
            &tables,
            &crate::rules::Ownership::default(),
            &[Family::Ipv6],
            placement,
        )
    }

    #[test]
    fn inserts_at_the_top_go_before_the_first_rule_in_order() {
        let p = plan(&["-p tcp -j ACCEPT"], &[], Placement::Insert);
        let (adds, slots) = adds_for(&p, Family::Ipv6, Chain::Input, &[7]).unwrap();
        let [accept, drop, _] = Rule::baseline(Family::Ipv6);
        assert_eq!(
            adds,
            vec![
                Add {
                    rule: accept,
                    before: Some(7)
                },
                Add {
                    rule: drop,
                    before: Some(7)
                }
            ]
        );
        assert_eq!(
            slots,
            vec![Slot::Added(accept), Slot::Added(drop), Slot::Kept(7)]
        );
        // An empty chain: appended, in order.
        let (adds, _) = adds_for(&p, Family::Ipv6, Chain::Output, &[]).unwrap();
        assert_eq!(adds.len(), 1);
        assert_eq!(adds[0].before, None);
    }

    #[test]
    fn appends_and_deletes() {
        let p = plan(&["-p tcp -j ACCEPT"], &["-j ACCEPT"], Placement::Append);
        let (adds, slots) = adds_for(&p, Family::Ipv6, Chain::Input, &[3]).unwrap();
        assert!(adds.iter().all(|a| a.before.is_none()));
        assert_eq!(slots[0], Slot::Kept(3));
        let [accept, ..] = Rule::baseline(Family::Ipv6);
        let delete = RulePlan {
            edits: vec![Edit {
                family: Family::Ipv6,
                chain: Chain::Input,
                kind: EditKind::Delete,
                rule: accept.save_syntax(),
                target: accept,
            }],
        };
        assert!(adds_for(&delete, Family::Ipv6, Chain::Input, &[1]).is_err());
    }

    #[test]
    fn a_rules_identity_leaves_the_counters_out() {
        let encode_rule = |rule: usize, packets: u64| {
            let mut m = Msg::nft(NFT_MSG_NEWRULE, 0, 1, NFPROTO_IPV6);
            m.attr(NFTA_RULE_HANDLE, &9u64.to_be_bytes());
            m.nest(NFTA_RULE_EXPRESSIONS, |m| {
                for expr in rule_exprs(Rule::baseline(Family::Ipv6)[rule]) {
                    match expr {
                        Expr::Counter => {
                            m.nest(NFTA_LIST_ELEM, |m| {
                                m.str(NFTA_EXPR_NAME, "counter").nest(2, |m| {
                                    m.attr(2, &packets.to_be_bytes());
                                });
                            });
                        }
                        e => wire::encode_expr(m, &e),
                    }
                }
            });
            m.finish()
        };
        let (a, b) = (encode_rule(0, 0), encode_rule(0, 42));
        // After the nlmsghdr (16) and nfgenmsg (4).
        assert_eq!(identity(&a[20..]), identity(&b[20..]));
        assert_ne!(identity(&a[20..]), identity(&encode_rule(1, 0)[20..]));
        let (a, b) = (
            parse_listed(&a[20..], Family::Ipv6).unwrap(),
            parse_listed(&b[20..], Family::Ipv6).unwrap(),
        );
        assert_eq!(a, Listed { handle: 9, ..b });
        assert_eq!(a.handle, 9);
        assert!(a.identity.is_empty(), "decoded: the line says it all");
        // The rule loopguard writes decodes to its line.
        assert_eq!(a.line.as_deref(), Some("-i lo -j ACCEPT"));
    }
}
