//! The `-S` line of a legacy table entry, for the common forms only, written exactly as
//! `ip6tables-legacy -S` (or `iptables-legacy -S`) prints it: addresses with their prefix
//! length, interfaces (with `+`), `-p tcp`/`-p udp` with `-m tcp`/`-m udp` ports, the standard
//! verdicts, jumps and gotos to user chains, and `REJECT` with its default answer.
//!
//! Everything else (another match or target, a negation, a mask that is no prefix, an address
//! that libc prints in dotted form) gives `None`, and the caller reads that chain with the
//! binaries: a line here is never a guess. `tests/legacy_kernel.rs` holds every line against
//! `ip6tables-legacy -S` on random tables.

use super::blob::{Entry, TARGET_HEADER, Table, name_at, u16_at};
use crate::rules::Family;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Where the fields of `ip6t_ip6` / `ipt_ip` are, at the start of an entry.
struct Fields {
    dst: usize,
    smsk: usize,
    dmsk: usize,
    iniface: usize,
    outiface: usize,
    iniface_mask: usize,
    outiface_mask: usize,
    proto: usize,
    flags: usize,
    invflags: usize,
    /// The `goto` flag (`IP6T_F_GOTO` / `IPT_F_GOTO`); any other flag but `IP6T_F_PROTO` makes
    /// the entry one this module does not write.
    goto: u8,
    allowed_flags: u8,
    len: usize,
}

impl Fields {
    fn of(family: Family) -> Fields {
        match family {
            Family::Ipv6 => Fields {
                dst: 16,
                smsk: 32,
                dmsk: 48,
                iniface: 64,
                outiface: 80,
                iniface_mask: 96,
                outiface_mask: 112,
                proto: 128,
                flags: 131,
                invflags: 132,
                goto: 0x04,
                // IP6T_F_PROTO | IP6T_F_GOTO
                allowed_flags: 0x01 | 0x04,
                len: 16,
            },
            Family::Ipv4 => Fields {
                dst: 4,
                smsk: 8,
                dmsk: 12,
                iniface: 16,
                outiface: 32,
                iniface_mask: 48,
                outiface_mask: 64,
                proto: 80,
                flags: 82,
                invflags: 83,
                goto: 0x02,
                // IPT_F_GOTO (IPT_F_FRAG prints `-f`)
                allowed_flags: 0x02,
                len: 4,
            },
        }
    }
}

/// `struct xt_entry_match`: u16 size, 29-byte name, u8 revision; the data follows.
const MATCH_HEADER: usize = 32;
const PROTO_TCP: u16 = 6;
const PROTO_UDP: u16 = 17;

/// The rule specification `-S` prints after `-A CHAIN` for entry `e` of `table`, with the
/// table's user chains from [`Table::chain_starts`]; `None` for a form not covered here.
pub fn line(table: &Table, e: Entry, starts: &BTreeMap<u32, Vec<u8>>) -> Option<String> {
    let family = table.family;
    let f = Fields::of(family);
    let b = table.bytes(e);
    let flags = b[f.flags];
    if b[f.invflags] != 0 || flags & !f.allowed_flags != 0 {
        return None;
    }
    let mut parts: Vec<String> = Vec::new();
    for (flag, addr, mask) in [("-s", 0, f.smsk), ("-d", f.dst, f.dmsk)] {
        if let Some(text) = address(family, &b[addr..addr + f.len], &b[mask..mask + f.len])? {
            parts.push(format!("{flag} {text}"));
        }
    }
    for (flag, name, mask) in [
        ("-i", f.iniface, f.iniface_mask),
        ("-o", f.outiface, f.outiface_mask),
    ] {
        if let Some(text) = interface(&b[name..name + 16], &b[mask..mask + 16])? {
            parts.push(format!("{flag} {text}"));
        }
    }
    let proto = u16::from_ne_bytes([b[f.proto], b[f.proto + 1]]);
    match proto {
        0 => {}
        PROTO_TCP => parts.push("-p tcp".into()),
        PROTO_UDP => parts.push("-p udp".into()),
        // Other names come from /etc/protocols (`ipv6-icmp`, ...): the binaries know.
        _ => return None,
    }
    let layout = super::blob::Layout::of(family);
    let target_at = u16_at(b, layout.target_offset) as usize;
    let mut at = layout.header;
    while at < target_at {
        let size = u16_at(b, at) as usize;
        if size < MATCH_HEADER || at + size > target_at {
            return None;
        }
        parts.push(port_match(&b[at..at + size], proto)?);
        at += size;
    }
    let goto = flags & f.goto != 0;
    match table.verdict(e) {
        Some((_, verdict)) if verdict < 0 => {
            let name = match verdict {
                -1 => "DROP",
                -2 => "ACCEPT",
                -5 => "RETURN",
                _ => return None,
            };
            if goto {
                return None;
            }
            parts.push(format!("-j {name}"));
        }
        Some(_) if table.falls_through(e) => {
            if goto {
                return None;
            }
        }
        Some((_, verdict)) => {
            let chain = std::str::from_utf8(starts.get(&(verdict as u32))?).ok()?;
            parts.push(format!("-{} {chain}", if goto { 'g' } else { 'j' }));
        }
        None => {
            if goto {
                return None;
            }
            parts.push(reject(family, &b[target_at..])?);
        }
    }
    Some(parts.join(" "))
}

/// `ADDRESS/PREFIX`, `Some(None)` when the mask is empty (nothing printed), `None` for a mask
/// that is no prefix or an address libc would print otherwise than Rust does.
pub(crate) fn address(family: Family, addr: &[u8], mask: &[u8]) -> Option<Option<String>> {
    Some(address_prefix(family, addr, mask)?.map(|ones| {
        let mut text = String::new();
        write_address(&mut text, addr, ones);
        text
    }))
}

/// The prefix length [`address`] prints with `addr`, `Some(None)` when it prints nothing, `None`
/// when it cannot print the pair.
pub(crate) fn address_prefix(family: Family, addr: &[u8], mask: &[u8]) -> Option<Option<u32>> {
    let ones: u32 = mask.iter().map(|m| m.count_ones()).sum();
    let prefix = mask
        .iter()
        .enumerate()
        .all(|(i, &m)| m == prefix_byte(ones, i));
    if !prefix {
        return None;
    }
    match family {
        Family::Ipv6 => {
            if ones == 0 {
                return Some(None);
            }
            let w = Ipv6Addr::from(<[u8; 16]>::try_from(addr).ok()?).segments();
            // glibc prints ::a.b.c.d and ::ffff:a.b.c.d in dotted form.
            if w[..5] == [0; 5] && (w[5] == 0xffff || (w[5] == 0 && w[6] != 0)) {
                return None;
            }
            Some(Some(ones))
        }
        Family::Ipv4 => {
            let ip = Ipv4Addr::from(<[u8; 4]>::try_from(addr).ok()?);
            if ones == 0 {
                return ip.is_unspecified().then_some(None);
            }
            Some(Some(ones))
        }
    }
}

/// `ADDRESS/ONES` appended to `out`, for an address (16 or 4 bytes) [`address_prefix`] accepted.
pub(crate) fn write_address(out: &mut String, addr: &[u8], ones: u32) {
    use std::fmt::Write as _;
    let _ = match <[u8; 16]>::try_from(addr) {
        Ok(v6) => write!(out, "{}/{ones}", Ipv6Addr::from(v6)),
        Err(_) => {
            let v4: [u8; 4] = addr.try_into().expect("an IPv4 address is 4 bytes");
            write!(out, "{}/{ones}", Ipv4Addr::from(v4))
        }
    };
}

/// Byte `i` of a prefix mask of `ones` bits.
fn prefix_byte(ones: u32, i: usize) -> u8 {
    let before = 8 * i as u32;
    match ones.saturating_sub(before) {
        0 => 0,
        n if n >= 8 => 0xff,
        n => 0xff << (8 - n),
    }
}

/// An interface as `-S` prints it: the name, `+` when the mask ends before its NUL.
/// `Some(None)`: no interface.
fn interface(name: &[u8], mask: &[u8]) -> Option<Option<String>> {
    if mask[0] == 0 {
        return Some(None);
    }
    let mut text = String::new();
    for i in 0..16 {
        if mask[i] != 0 {
            if name[i] != 0 {
                if !name[i].is_ascii_graphic() {
                    return None;
                }
                text.push(name[i] as char);
            }
        } else {
            if name[i - 1] != 0 {
                text.push('+');
            }
            break;
        }
    }
    Some(Some(text))
}

/// `-m tcp`/`-m udp` with ports only (no negation, flags or options), on its own protocol.
fn port_match(m: &[u8], proto: u16) -> Option<String> {
    let name = name_at(m, 2, 29);
    let revision = m[31];
    let data = &m[MATCH_HEADER..];
    let (word, expected) = match name {
        b"tcp" => ("tcp", PROTO_TCP),
        b"udp" => ("udp", PROTO_UDP),
        _ => return None,
    };
    if revision != 0 || proto != expected || data.len() != 16 {
        return None;
    }
    let port = |at: usize| u16::from_ne_bytes([data[at], data[at + 1]]);
    let (spts, dpts) = ([port(0), port(2)], [port(4), port(6)]);
    // tcp: option, flg_mask, flg_cmp, invflags; udp: invflags.
    let rest = if expected == PROTO_TCP {
        &data[8..12]
    } else {
        &data[8..9]
    };
    if rest.iter().any(|&b| b != 0) {
        return None;
    }
    let mut text = format!("-m {word}");
    for (flag, [lo, hi]) in [("--sport", spts), ("--dport", dpts)] {
        if lo == 0 && hi == 0xffff {
            continue;
        }
        if lo == hi {
            text.push_str(&format!(" {flag} {lo}"));
        } else {
            text.push_str(&format!(" {flag} {lo}:{hi}"));
        }
    }
    Some(text)
}

/// `-j REJECT --reject-with` the default answer (port unreachable), the one form covered.
fn reject(family: Family, target: &[u8]) -> Option<String> {
    let size = u16_at(target, 0) as usize;
    if name_at(target, 2, 29) != b"REJECT" || target[31] != 0 || size != TARGET_HEADER + 8 {
        return None;
    }
    let with = u32::from_ne_bytes(target[TARGET_HEADER..TARGET_HEADER + 4].try_into().ok()?);
    reject_with(family, with)
}

/// `-j REJECT --reject-with ANSWER` for the default answer of `family` (`ip6t_reject_info` /
/// `ipt_reject_info`'s `with`), `None` for any other.
pub(crate) fn reject_with(family: Family, with: u32) -> Option<String> {
    Some(format!(
        "-j REJECT --reject-with {}",
        reject_answer(family, with)?
    ))
}

/// The name `--reject-with` prints for the default answer of `family`, `None` for any other.
pub(crate) fn reject_answer(family: Family, with: u32) -> Option<&'static str> {
    match (family, with) {
        // IP6T_ICMP6_PORT_UNREACH
        (Family::Ipv6, 4) => Some("icmp6-port-unreachable"),
        // IPT_ICMP_PORT_UNREACHABLE
        (Family::Ipv4, 3) => Some("icmp-port-unreachable"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::blob::rule_entry;
    use crate::rules::{Chain, Rule};

    #[test]
    fn prefix_masks() {
        assert_eq!(prefix_byte(128, 15), 0xff);
        assert_eq!(prefix_byte(64, 8), 0);
        assert_eq!(prefix_byte(12, 1), 0xf0);
        assert_eq!(address(Family::Ipv6, &[0; 16], &[0; 16]), Some(None));
        let mut mask = [0u8; 16];
        mask[0] = 0x0f;
        assert_eq!(address(Family::Ipv6, &[0; 16], &mask), None);
    }

    #[test]
    fn dotted_ipv6_forms_are_left_to_the_binaries() {
        let mut ip = [0u8; 16];
        ip[12..].copy_from_slice(&[1, 2, 3, 4]);
        assert_eq!(address(Family::Ipv6, &ip, &[0xff; 16]), None);
        ip[10..12].copy_from_slice(&[0xff, 0xff]);
        assert_eq!(address(Family::Ipv6, &ip, &[0xff; 16]), None);
        let mut one = [0u8; 16];
        one[15] = 1;
        assert_eq!(
            address(Family::Ipv6, &one, &[0xff; 16]),
            Some(Some("::1/128".into()))
        );
    }

    #[test]
    fn interfaces_print_with_their_wildcard() {
        let mut name = [0u8; 16];
        name[..2].copy_from_slice(b"lo");
        let mut mask = [0u8; 16];
        mask[..3].fill(0xff);
        assert_eq!(interface(&name, &mask), Some(Some("lo".into())));
        mask[2] = 0;
        assert_eq!(interface(&name, &mask), Some(Some("lo+".into())));
        assert_eq!(interface(&name, &[0; 16]), Some(None));
    }

    /// An empty filter table of `family` (three ACCEPT policies and the end), with `rules` in
    /// INPUT and OUTPUT inserted as `Table::insert` does.
    fn table_with(family: Family, rules: impl Fn(Chain) -> Vec<Vec<u8>>) -> Table {
        let layout = crate::rules::blob::Layout::of(family);
        let f = Fields::of(family);
        let mut policy = rule_entry(Rule::baseline(family)[0]);
        policy[f.iniface..f.iniface + 16].fill(0);
        policy[f.iniface_mask..f.iniface_mask + 16].fill(0);
        let mut end = vec![0u8; layout.header + 64];
        end[layout.target_offset..layout.target_offset + 2]
            .copy_from_slice(&(layout.header as u16).to_ne_bytes());
        end[layout.next_offset..layout.next_offset + 2]
            .copy_from_slice(&((layout.header + 64) as u16).to_ne_bytes());
        end[layout.header..layout.header + 2].copy_from_slice(&64u16.to_ne_bytes());
        end[layout.header + 2..layout.header + 7].copy_from_slice(b"ERROR");
        end[layout.header + 32..layout.header + 37].copy_from_slice(b"ERROR");
        let p = policy.len() as u32;
        let blob = [policy.clone(), policy.clone(), policy, end].concat();
        let info = crate::rules::blob::TableInfo {
            valid_hooks: 0b1110,
            hook_entry: [0, 0, p, 2 * p, 0],
            underflow: [0, 0, p, 2 * p, 0],
            num_entries: 4,
            size: blob.len() as u32,
        };
        let mut table = Table::parse(family, info, blob).expect("an empty table");
        for chain in Chain::ALL {
            for (i, entry) in rules(chain).iter().enumerate() {
                table = table.insert(chain, i, entry).expect("insert").0;
            }
        }
        table
    }

    /// loopguard's own entries decode to the lines it writes, and an entry of another target
    /// is left to the binaries (the kernel side is in `tests/legacy_kernel.rs`).
    #[test]
    fn loopguards_entries_decode_to_its_rules() {
        for family in [Family::Ipv6, Family::Ipv4] {
            let table = table_with(family, |chain| {
                Rule::baseline(family)
                    .into_iter()
                    .filter(|r| r.chain() == chain)
                    .map(rule_entry)
                    .collect()
            });
            let starts = table.chain_starts();
            for chain in Chain::ALL {
                let lines: Vec<String> = table
                    .chain(chain)
                    .iter()
                    .map(|&e| line(&table, e, &starts).expect("decodable"))
                    .collect();
                let expected: Vec<String> = Rule::baseline(family)
                    .into_iter()
                    .filter(|r| r.chain() == chain)
                    .map(|r| r.spec())
                    .collect();
                assert_eq!(lines, expected);
            }
            let mut log = rule_entry(Rule::baseline(family)[0]);
            let layout = crate::rules::blob::Layout::of(family);
            log[layout.header + 2..layout.header + 5].copy_from_slice(b"LOG");
            let table = table_with(family, |chain| {
                if chain == Chain::Input {
                    vec![log.clone()]
                } else {
                    vec![]
                }
            });
            let e = table.chain(Chain::Input)[0];
            assert_eq!(line(&table, e, &table.chain_starts()), None);
        }
    }
}
