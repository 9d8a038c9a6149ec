//! nf_tables over netlink, pure: the messages that read and write loopguard's table, and the
//! decoding of the kernel's answers into what [`super::classify`] needs. `node::nft` only sends
//! and receives these bytes.
//!
//! The rules are encoded exactly as `nft` 1.0.6 encodes them (`nft --debug=netlink`):
//!
//! ```text
//! iif "lo" accept             [ meta load iif => reg 1 ] [ cmp eq reg 1 <ifindex of lo> ] [ immediate reg 0 accept ]
//! ip saddr 127.0.0.0/8 drop   [ meta load nfproto => reg 1 ] [ cmp eq reg 1 0x02 ]
//!                             [ payload load 1b @ network header + 12 => reg 1 ] [ cmp eq reg 1 0x7f ] [ immediate reg 0 drop ]
//! ip6 saddr ::1 drop          [ meta load nfproto => reg 1 ] [ cmp eq reg 1 0x0a ]
//!                             [ payload load 16b @ network header + 8 => reg 1 ] [ cmp eq reg 1 ::1 ] [ immediate reg 0 drop ]
//! ```
//!
//! so that `nft list ruleset` prints them as ComplianceAsCode greps for them, and a table written by
//! `nft -f` and one written here read the same (`tests/nft_differential.rs` checks both ways).

use super::{CHAIN, PRIORITY, TABLE};

pub const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub const NFT_MSG_NEWTABLE: u16 = 0;
pub const NFT_MSG_GETTABLE: u16 = 1;
pub const NFT_MSG_DELTABLE: u16 = 2;
pub const NFT_MSG_NEWCHAIN: u16 = 3;
pub const NFT_MSG_GETCHAIN: u16 = 4;
pub const NFT_MSG_NEWRULE: u16 = 6;
pub const NFT_MSG_GETRULE: u16 = 7;
pub const NFT_MSG_DELRULE: u16 = 8;
/// The batch-begin attribute that makes the kernel refuse the batch (`ERESTART`) unless the
/// ruleset is still at this generation.
const NFNL_BATCH_GENID: u16 = 1;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;

const NLM_F_REQUEST: u16 = 0x1;
pub(super) const NLM_F_ACK: u16 = 0x4;
pub(super) const NLM_F_ECHO: u16 = 0x8;
pub(super) const NLM_F_DUMP: u16 = 0x300;
pub(super) const NLM_F_CREATE: u16 = 0x400;
pub(super) const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

pub const NFPROTO_UNSPEC: u8 = 0;
pub const NFPROTO_INET: u8 = 1;
pub const NFPROTO_IPV4: u8 = 2;
pub const NFPROTO_ARP: u8 = 3;
pub const NFPROTO_BRIDGE: u8 = 7;
pub const NFPROTO_IPV6: u8 = 10;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_TABLE_USE: u16 = 3;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
pub(super) const NFTA_RULE_TABLE: u16 = 1;
pub(super) const NFTA_RULE_CHAIN: u16 = 2;
pub(super) const NFTA_RULE_EXPRESSIONS: u16 = 4;
pub(super) const NFTA_LIST_ELEM: u16 = 1;
pub(super) const NFTA_EXPR_NAME: u16 = 1;
pub(super) const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;

/// `NF_INET_LOCAL_IN`: the input hook of ip, ip6, inet and bridge (`NF_BR_LOCAL_IN`) chains.
pub const HOOK_INPUT: u32 = 1;
/// `NF_ARP_IN`: the input hook of arp chains.
const ARP_HOOK_INPUT: u32 = 0;
pub const NF_DROP: u32 = 0;
pub const NF_ACCEPT: u32 = 1;
const NFT_META_IIF: u32 = 4;
const NFT_META_NFPROTO: u32 = 15;
pub(super) const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
pub(super) const NFT_CMP_EQ: u32 = 0;
pub(super) const NFT_REG_VERDICT: u32 = 0;
pub(super) const NFT_REG_1: u32 = 1;

/// One expression of a rule, for the kinds loopguard's rules use; anything else is `Other`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    Meta {
        key: u32,
        dreg: u32,
    },
    Cmp {
        sreg: u32,
        op: u32,
        data: Vec<u8>,
    },
    Payload {
        dreg: u32,
        base: u32,
        offset: u32,
        len: u32,
    },
    Verdict {
        dreg: u32,
        code: u32,
    },
    /// A counter starting at zero (iptables-nft puts one in every rule).
    Counter,
    /// An expression (or attribute) loopguard does not write: its name.
    Other(String),
}

/// The expressions of loopguard's three rules, in order (`lo` has interface index `lo_index`).
pub fn own_rules(lo_index: u32) -> [Vec<Expr>; 3] {
    let nfproto = |proto: u8| {
        [
            Expr::Meta {
                key: NFT_META_NFPROTO,
                dreg: NFT_REG_1,
            },
            Expr::Cmp {
                sreg: NFT_REG_1,
                op: NFT_CMP_EQ,
                data: vec![proto],
            },
        ]
    };
    let saddr = |offset: u32, value: Vec<u8>| {
        [
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
        ]
    };
    let verdict = |code| Expr::Verdict {
        dreg: NFT_REG_VERDICT,
        code,
    };
    let mut loopback6 = vec![0u8; 16];
    loopback6[15] = 1;
    [
        vec![
            Expr::Meta {
                key: NFT_META_IIF,
                dreg: NFT_REG_1,
            },
            Expr::Cmp {
                sreg: NFT_REG_1,
                op: NFT_CMP_EQ,
                // meta iif is compared in host byte order.
                data: lo_index.to_ne_bytes().to_vec(),
            },
            verdict(NF_ACCEPT),
        ],
        [
            nfproto(NFPROTO_IPV4).to_vec(),
            saddr(12, vec![127]).to_vec(),
            vec![verdict(NF_DROP)],
        ]
        .concat(),
        [
            nfproto(NFPROTO_IPV6).to_vec(),
            saddr(8, loopback6).to_vec(),
            vec![verdict(NF_DROP)],
        ]
        .concat(),
    ]
}

/// One netlink message under construction (header and `nfgenmsg` written, attributes appended).
pub(super) struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    pub(super) fn new(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend(0u32.to_ne_bytes()); // length, set by `finish`
        buf.extend(kind.to_ne_bytes());
        buf.extend(flags.to_ne_bytes());
        buf.extend(seq.to_ne_bytes());
        buf.extend(0u32.to_ne_bytes()); // port id: the kernel's
        buf.extend([family, 0]); // nfgenmsg: family, NFNETLINK_V0
        buf.extend(res_id.to_be_bytes());
        Msg { buf }
    }

    pub(super) fn nft(msg: u16, flags: u16, seq: u32, family: u8) -> Msg {
        Msg::new(
            (NFNL_SUBSYS_NFTABLES << 8) | msg,
            NLM_F_REQUEST | flags,
            seq,
            family,
            0,
        )
    }

    pub(super) fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Msg {
        self.buf.extend(((4 + data.len()) as u16).to_ne_bytes());
        self.buf.extend(kind.to_ne_bytes());
        self.buf.extend(data);
        self.pad();
        self
    }

    pub(super) fn str(&mut self, kind: u16, value: &str) -> &mut Msg {
        let mut data = value.as_bytes().to_vec();
        data.push(0);
        self.attr(kind, &data)
    }

    fn u32(&mut self, kind: u16, value: u32) -> &mut Msg {
        self.attr(kind, &value.to_be_bytes())
    }

    pub(super) fn nest(&mut self, kind: u16, inner: impl FnOnce(&mut Msg)) -> &mut Msg {
        let at = self.buf.len();
        self.buf.extend([0, 0]);
        self.buf.extend((kind | NLA_F_NESTED).to_ne_bytes());
        inner(self);
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    pub(super) fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

pub(super) fn encode_expr(m: &mut Msg, expr: &Expr) {
    let name = match expr {
        Expr::Meta { .. } => "meta",
        Expr::Cmp { .. } => "cmp",
        Expr::Payload { .. } => "payload",
        Expr::Verdict { .. } => "immediate",
        Expr::Counter => "counter",
        Expr::Other(name) => unreachable!("loopguard never writes a {name} expression"),
    };
    m.nest(NFTA_LIST_ELEM, |m| {
        m.str(NFTA_EXPR_NAME, name)
            .nest(NFTA_EXPR_DATA, |m| match expr {
                Expr::Meta { key, dreg } => {
                    m.u32(2, *key).u32(1, *dreg);
                }
                Expr::Cmp { sreg, op, data } => {
                    m.u32(1, *sreg).u32(2, *op).nest(3, |m| {
                        m.attr(NFTA_DATA_VALUE, data);
                    });
                }
                Expr::Payload {
                    dreg,
                    base,
                    offset,
                    len,
                } => {
                    m.u32(1, *dreg).u32(2, *base).u32(3, *offset).u32(4, *len);
                }
                Expr::Verdict { dreg, code } => {
                    m.u32(1, *dreg).nest(2, |m| {
                        m.nest(NFTA_DATA_VERDICT, |m| {
                            m.u32(NFTA_VERDICT_CODE, *code);
                        });
                    });
                }
                Expr::Counter => {
                    // NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS, as libnftnl puts them.
                    m.attr(1, &0u64.to_be_bytes()).attr(2, &0u64.to_be_bytes());
                }
                Expr::Other(_) => {}
            });
    });
}

/// A batch of messages: what to send, and how many acknowledgements the kernel owes for it.
pub struct Batch {
    pub bytes: Vec<u8>,
    pub acks: usize,
}

pub(super) fn batch(
    seq: u32,
    generation: u32,
    build: impl FnOnce(&mut Vec<Vec<u8>>, &mut u32),
) -> Batch {
    let mut messages = Vec::new();
    let mut next = seq + 1;
    build(&mut messages, &mut next);
    let acks = messages.len();
    let mut bytes = Msg::new(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
    );
    bytes.u32(NFNL_BATCH_GENID, generation);
    let mut bytes = bytes.finish();
    for message in messages {
        bytes.extend(message);
    }
    bytes.extend(
        Msg::new(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            next,
            0,
            NFNL_SUBSYS_NFTABLES,
        )
        .finish(),
    );
    Batch { bytes, acks }
}

/// One transaction that puts loopguard's table as written, committed only if the ruleset is still
/// at `generation` (the one in which loopguard read its table as absent or as its own, drifted):
/// `add table`, `add chain` (both leave an existing one as it is), `flush chain`, then the three
/// rules. The chain's hook stays registered across the repair (deleting and re-creating the table,
/// as [`super::create_script`] does, unregisters it and costs the kernel a grace period, ~10 ms),
/// and a change made by anyone since loopguard read the table fails the batch instead of being
/// flushed with it.
pub fn create_batch(seq: u32, generation: u32, lo_index: u32) -> Batch {
    batch(seq, generation, |out, next| {
        let mut push = |msg: u16, flags: u16, body: &dyn Fn(&mut Msg)| {
            let mut m = Msg::nft(msg, NLM_F_ACK | flags, *next, NFPROTO_INET);
            body(&mut m);
            out.push(m.finish());
            *next += 1;
        };
        let table = |m: &mut Msg| {
            m.str(NFTA_TABLE_NAME, TABLE).u32(NFTA_TABLE_FLAGS, 0);
        };
        push(NFT_MSG_NEWTABLE, NLM_F_CREATE, &table);
        push(NFT_MSG_NEWCHAIN, NLM_F_CREATE, &|m| {
            m.str(NFTA_CHAIN_TABLE, TABLE)
                .str(NFTA_CHAIN_NAME, CHAIN)
                .nest(NFTA_CHAIN_HOOK, |m| {
                    m.u32(NFTA_HOOK_HOOKNUM, HOOK_INPUT)
                        .u32(NFTA_HOOK_PRIORITY, PRIORITY as u32);
                })
                .u32(NFTA_CHAIN_POLICY, NF_ACCEPT)
                .str(NFTA_CHAIN_TYPE, "filter");
        });
        // A rule delete naming the chain and no handle deletes every rule of the chain.
        push(NFT_MSG_DELRULE, 0, &|m| {
            m.str(NFTA_RULE_TABLE, TABLE).str(NFTA_RULE_CHAIN, CHAIN);
        });
        for rule in own_rules(lo_index) {
            push(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, &|m| {
                m.str(NFTA_RULE_TABLE, TABLE)
                    .str(NFTA_RULE_CHAIN, CHAIN)
                    .nest(NFTA_RULE_EXPRESSIONS, |m| {
                        for expr in &rule {
                            encode_expr(m, expr);
                        }
                    });
            });
        }
    })
}

/// One transaction that deletes loopguard's table and nothing else, committed only if the ruleset
/// is still at `generation` (the one in which loopguard read the table as its own).
pub fn delete_batch(seq: u32, generation: u32) -> Batch {
    batch(seq, generation, |out, next| {
        let mut m = Msg::nft(NFT_MSG_DELTABLE, NLM_F_ACK, *next, NFPROTO_INET);
        m.str(NFTA_TABLE_NAME, TABLE);
        out.push(m.finish());
        *next += 1;
    })
}

/// Asks for loopguard's table (one `NEWTABLE` answer, or `ENOENT`).
pub fn get_table(seq: u32) -> Vec<u8> {
    let mut m = Msg::nft(NFT_MSG_GETTABLE, 0, seq, NFPROTO_INET);
    m.str(NFTA_TABLE_NAME, TABLE);
    m.finish()
}

/// Asks for every chain of `family` (`NFPROTO_UNSPEC`: all families).
pub fn dump_chains(seq: u32, family: u8) -> Vec<u8> {
    Msg::nft(NFT_MSG_GETCHAIN, NLM_F_DUMP, seq, family).finish()
}

/// Asks for the rules of loopguard's chain (the kernel filters the dump by table and chain).
pub fn dump_own_rules(seq: u32) -> Vec<u8> {
    let mut m = Msg::nft(NFT_MSG_GETRULE, NLM_F_DUMP, seq, NFPROTO_INET);
    m.str(NFTA_RULE_TABLE, TABLE).str(NFTA_RULE_CHAIN, CHAIN);
    m.finish()
}

/// One message of the kernel's answer.
#[derive(Debug)]
pub struct Message<'a> {
    pub kind: u16,
    pub seq: u32,
    /// The nfgenmsg family (nf_tables messages only).
    pub family: u8,
    /// The attributes (after the nfgenmsg); for `NLMSG_ERROR`, the error body.
    pub body: &'a [u8],
}

impl Message<'_> {
    /// The nf_tables message type, when this is one.
    pub fn nft(&self) -> Option<u16> {
        (self.kind >> 8 == NFNL_SUBSYS_NFTABLES).then_some(self.kind & 0xff)
    }

    /// For `NLMSG_ERROR`: the errno (0 for an acknowledgement).
    pub fn error(&self) -> Option<i32> {
        (self.kind == NLMSG_ERROR && self.body.len() >= 4)
            .then(|| -i32::from_ne_bytes(self.body[0..4].try_into().expect("4 bytes")))
    }
}

/// Splits a datagram into its messages (a truncated tail is dropped).
pub fn messages(buf: &[u8]) -> Vec<Message<'_>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
        if len < 16 || at + len > buf.len() {
            break;
        }
        let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
        let seq = u32::from_ne_bytes(buf[at + 8..at + 12].try_into().expect("4 bytes"));
        let payload = &buf[at + 16..at + len];
        let (family, body) = if kind >> 8 == NFNL_SUBSYS_NFTABLES && payload.len() >= 4 {
            (payload[0], &payload[4..])
        } else {
            (0, payload)
        };
        out.push(Message {
            kind,
            seq,
            family,
            body,
        });
        at += (len + 3) & !3;
    }
    out
}

/// The attributes in `buf`: (type without flags, payload).
pub(super) fn attrs(buf: &[u8]) -> Vec<(u16, &[u8])> {
    Attrs(buf).collect()
}

/// The attributes in `buf`, read in place: `(type, payload)`, nested ones not opened; stops at
/// the first malformed one.
#[derive(Clone, Copy)]
pub(super) struct Attrs<'a>(pub(super) &'a [u8]);

impl<'a> Attrs<'a> {
    /// The payload of the first attribute of type `kind`.
    pub(super) fn get(self, kind: u16) -> Option<&'a [u8]> {
        self.into_iter().find(|(k, _)| *k == kind).map(|(_, d)| d)
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let buf = self.0;
        let len = u16::from_ne_bytes([*buf.first()?, *buf.get(1)?]) as usize;
        if buf.len() < 4 || len < 4 || len > buf.len() {
            self.0 = &[];
            return None;
        }
        self.0 = &buf[((len + 3) & !3).min(buf.len())..];
        Some((
            u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK,
            &buf[4..len],
        ))
    }
}

fn be32(data: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(data.get(..4)?.try_into().ok()?))
}

pub(super) fn string(data: &[u8]) -> String {
    String::from_utf8_lossy(until_nul(data)).into_owned()
}

/// A string attribute's bytes up to its NUL (all of them without one).
pub(super) fn until_nul(data: &[u8]) -> &[u8] {
    &data[..data.iter().position(|&b| b == 0).unwrap_or(data.len())]
}

/// A table as the kernel describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableInfo {
    pub flags: u32,
    /// How many chains, sets, objects and flowtables it holds.
    pub objects: u32,
}

pub fn parse_table(body: &[u8]) -> TableInfo {
    let mut table = TableInfo {
        flags: 0,
        objects: 0,
    };
    for (kind, data) in attrs(body) {
        match kind {
            NFTA_TABLE_FLAGS => table.flags = be32(data).unwrap_or(0),
            NFTA_TABLE_USE => table.objects = be32(data).unwrap_or(0),
            _ => {}
        }
    }
    table
}

/// A chain as the kernel describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainInfo {
    pub family: u8,
    pub table: String,
    pub name: String,
    /// Hook number and priority, for a base chain.
    pub hook: Option<(u32, i32)>,
    pub chain_type: String,
    pub policy: Option<u32>,
}

impl ChainInfo {
    /// Whether `nft list` prints this chain with `hook input`.
    pub fn hooks_input(&self) -> bool {
        match (self.family, self.hook) {
            (NFPROTO_ARP, Some((hook, _))) => hook == ARP_HOOK_INPUT,
            (NFPROTO_INET | NFPROTO_IPV4 | NFPROTO_IPV6 | NFPROTO_BRIDGE, Some((hook, _))) => {
                hook == HOOK_INPUT
            }
            _ => false,
        }
    }

    /// The family as `nft` names it.
    pub fn family_name(&self) -> &'static str {
        match self.family {
            NFPROTO_INET => "inet",
            NFPROTO_IPV4 => "ip",
            NFPROTO_IPV6 => "ip6",
            NFPROTO_ARP => "arp",
            NFPROTO_BRIDGE => "bridge",
            _ => "netdev",
        }
    }
}

pub fn parse_chain(family: u8, body: &[u8]) -> ChainInfo {
    let mut chain = ChainInfo {
        family,
        table: String::new(),
        name: String::new(),
        hook: None,
        chain_type: String::new(),
        policy: None,
    };
    for (kind, data) in attrs(body) {
        match kind {
            NFTA_CHAIN_TABLE => chain.table = string(data),
            NFTA_CHAIN_NAME => chain.name = string(data),
            NFTA_CHAIN_TYPE => chain.chain_type = string(data),
            NFTA_CHAIN_POLICY => chain.policy = be32(data),
            NFTA_CHAIN_HOOK => {
                let hook = attrs(data);
                let num = hook.iter().find(|(k, _)| *k == NFTA_HOOK_HOOKNUM);
                let prio = hook.iter().find(|(k, _)| *k == NFTA_HOOK_PRIORITY);
                if let (Some((_, num)), Some((_, prio))) = (num, prio) {
                    chain.hook = be32(num).zip(be32(prio).map(|p| p as i32));
                }
            }
            _ => {}
        }
    }
    chain
}

/// A rule as the kernel describes it: where it is and its expressions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleInfo {
    pub table: String,
    pub chain: String,
    pub exprs: Vec<Expr>,
}

pub fn parse_rule(body: &[u8]) -> RuleInfo {
    let mut rule = RuleInfo {
        table: String::new(),
        chain: String::new(),
        exprs: Vec::new(),
    };
    for (kind, data) in attrs(body) {
        match kind {
            NFTA_RULE_TABLE => rule.table = string(data),
            NFTA_RULE_CHAIN => rule.chain = string(data),
            NFTA_RULE_EXPRESSIONS => {
                rule.exprs = attrs(data)
                    .into_iter()
                    .filter(|(k, _)| *k == NFTA_LIST_ELEM)
                    .map(|(_, e)| decode_expr(e))
                    .collect();
            }
            _ => {}
        }
    }
    rule
}

/// Decodes one expression; any attribute beyond those loopguard writes makes it `Other`.
fn decode_expr(elem: &[u8]) -> Expr {
    let outer = attrs(elem);
    let name = outer
        .iter()
        .find(|(k, _)| *k == NFTA_EXPR_NAME)
        .map(|(_, d)| string(d))
        .unwrap_or_default();
    let data = outer
        .iter()
        .find(|(k, _)| *k == NFTA_EXPR_DATA)
        .map(|(_, d)| attrs(d))
        .unwrap_or_default();
    let other = || Expr::Other(name.clone());
    let only = |allowed: &[u16]| data.iter().all(|(k, _)| allowed.contains(k));
    let u32_of = |kind: u16| {
        data.iter()
            .find(|(k, _)| *k == kind)
            .and_then(|(_, d)| be32(d))
    };
    let nested = |kind: u16| data.iter().find(|(k, _)| *k == kind).map(|(_, d)| attrs(d));
    let decoded = match name.as_str() {
        "meta" if only(&[1, 2]) => u32_of(2)
            .zip(u32_of(1))
            .map(|(key, dreg)| Expr::Meta { key, dreg }),
        "cmp" if only(&[1, 2, 3]) => match nested(3).as_deref() {
            Some([(NFTA_DATA_VALUE, value)]) => {
                u32_of(1).zip(u32_of(2)).map(|(sreg, op)| Expr::Cmp {
                    sreg,
                    op,
                    data: value.to_vec(),
                })
            }
            _ => None,
        },
        "payload" if only(&[1, 2, 3, 4]) => match (u32_of(1), u32_of(2), u32_of(3), u32_of(4)) {
            (Some(dreg), Some(base), Some(offset), Some(len)) => Some(Expr::Payload {
                dreg,
                base,
                offset,
                len,
            }),
            _ => None,
        },
        "immediate" if only(&[1, 2]) => match nested(2).as_deref() {
            Some([(NFTA_DATA_VERDICT, verdict)]) => match attrs(verdict).as_slice() {
                [(NFTA_VERDICT_CODE, code)] => u32_of(1)
                    .zip(be32(code))
                    .map(|(dreg, code)| Expr::Verdict { dreg, code }),
                _ => None,
            },
            _ => None,
        },
        _ => None,
    };
    decoded.unwrap_or_else(other)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The NEWRULE messages of a create batch, as the kernel would dump them back.
    fn rules_of(batch: &Batch) -> Vec<RuleInfo> {
        messages(&batch.bytes)
            .iter()
            .filter(|m| m.nft() == Some(NFT_MSG_NEWRULE))
            .map(|m| parse_rule(m.body))
            .collect()
    }

    #[test]
    fn a_create_batch_is_one_transaction_of_six_acknowledged_messages() {
        let batch = create_batch(100, 42, 1);
        let all = messages(&batch.bytes);
        let kinds: Vec<u16> = all.iter().map(|m| m.kind).collect();
        assert_eq!(kinds.first(), Some(&NFNL_MSG_BATCH_BEGIN));
        assert_eq!(kinds.last(), Some(&NFNL_MSG_BATCH_END));
        let nft: Vec<u16> = all.iter().filter_map(|m| m.nft()).collect();
        assert_eq!(
            nft,
            [
                NFT_MSG_NEWTABLE,
                NFT_MSG_NEWCHAIN,
                NFT_MSG_DELRULE,
                NFT_MSG_NEWRULE,
                NFT_MSG_NEWRULE,
                NFT_MSG_NEWRULE
            ]
        );
        assert_eq!(batch.acks, 6);
        let seqs: Vec<u32> = all.iter().map(|m| m.seq).collect();
        assert_eq!(
            seqs,
            (100..108).collect::<Vec<_>>(),
            "one sequence number each"
        );
        // The batch is bound to the generation loopguard read the table in, and so is a delete.
        // (A batch-begin message is not an nf_tables one: its body starts with the nfgenmsg.)
        assert_eq!(
            attrs(&all[0].body[4..]),
            [(NFNL_BATCH_GENID, &42u32.to_be_bytes()[..])]
        );
        assert_eq!(
            attrs(&messages(&delete_batch(1, 7).bytes)[0].body[4..]),
            [(NFNL_BATCH_GENID, &7u32.to_be_bytes()[..])]
        );
        // The rule delete names the chain and no handle: the chain's rules, nothing else.
        let flush = all
            .iter()
            .find(|m| m.nft() == Some(NFT_MSG_DELRULE))
            .unwrap();
        assert_eq!(
            attrs(flush.body)
                .iter()
                .map(|(kind, data)| (*kind, string(data)))
                .collect::<Vec<_>>(),
            [
                (NFTA_RULE_TABLE, TABLE.to_string()),
                (NFTA_RULE_CHAIN, CHAIN.to_string())
            ]
        );
        // Every message names loopguard's table, in family inet, and no other.
        for m in all.iter().filter(|m| m.nft().is_some()) {
            assert_eq!(m.family, NFPROTO_INET);
            assert!(attrs(m.body).iter().any(|(_, d)| string(d) == TABLE));
        }
    }

    #[test]
    fn the_rules_written_decode_to_loopguards_rules() {
        let batch = create_batch(1, 1, 1);
        let rules = rules_of(&batch);
        let expected = own_rules(1);
        assert_eq!(rules.len(), 3);
        for (rule, want) in rules.iter().zip(&expected) {
            assert_eq!((rule.table.as_str(), rule.chain.as_str()), (TABLE, CHAIN));
            assert_eq!(&rule.exprs, want);
        }
        let chain = messages(&batch.bytes)
            .iter()
            .find(|m| m.nft() == Some(NFT_MSG_NEWCHAIN))
            .map(|m| parse_chain(m.family, m.body))
            .unwrap();
        assert_eq!(chain.hook, Some((HOOK_INPUT, -150)));
        assert_eq!(
            (chain.chain_type.as_str(), chain.policy),
            ("filter", Some(NF_ACCEPT))
        );
        assert!(chain.hooks_input());
    }

    #[test]
    fn an_unknown_attribute_or_expression_is_other() {
        let mut m = Msg::nft(NFT_MSG_NEWRULE, 0, 1, NFPROTO_INET);
        m.nest(NFTA_RULE_EXPRESSIONS, |m| {
            // A counter, and a meta with a source register (a "meta set"): neither is loopguard's.
            m.nest(NFTA_LIST_ELEM, |m| {
                m.str(NFTA_EXPR_NAME, "counter")
                    .nest(NFTA_EXPR_DATA, |_| {});
            });
            m.nest(NFTA_LIST_ELEM, |m| {
                m.str(NFTA_EXPR_NAME, "meta").nest(NFTA_EXPR_DATA, |m| {
                    m.u32(2, NFT_META_IIF).u32(3, 1);
                });
            });
        });
        let bytes = m.finish();
        let rule = parse_rule(messages(&bytes)[0].body);
        assert_eq!(
            rule.exprs,
            [Expr::Other("counter".into()), Expr::Other("meta".into())]
        );
    }

    #[test]
    fn input_hooks_are_named_per_family() {
        let chain = |family, hook| ChainInfo {
            family,
            table: "t".into(),
            name: "c".into(),
            hook,
            chain_type: "filter".into(),
            policy: None,
        };
        assert!(chain(NFPROTO_IPV6, Some((1, 0))).hooks_input());
        assert!(chain(NFPROTO_ARP, Some((0, 0))).hooks_input());
        assert!(
            !chain(NFPROTO_ARP, Some((1, 0))).hooks_input(),
            "arp output"
        );
        assert!(!chain(NFPROTO_IPV4, Some((3, 0))).hooks_input(), "output");
        assert!(!chain(NFPROTO_IPV4, None).hooks_input(), "a regular chain");
        assert!(!chain(5, Some((0, 0))).hooks_input(), "netdev ingress");
    }

    #[test]
    fn errors_and_acknowledgements_are_read() {
        let mut ack = Msg::new(NLMSG_ERROR, 0, 7, 0, 0).finish();
        // An nlmsgerr: errno, then the request's header. Msg::new wrote 4 bytes of nfgenmsg where
        // the errno goes.
        ack[16..20].copy_from_slice(&(-2i32).to_ne_bytes());
        let all = messages(&ack);
        assert_eq!(all[0].error(), Some(2));
        assert_eq!(all[0].seq, 7);
    }
}
