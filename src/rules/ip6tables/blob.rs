//! The kernel's own form of a legacy (x_tables) table: the blob `IP6T_SO_GET_ENTRIES` returns and
//! `IP6T_SO_SET_REPLACE` takes, and the two edits loopguard makes to it: insert one entry into a
//! built-in chain, delete one. Pure: the bytes come from and go to `node::legacy`.
//!
//! A table is a run of entries, each an `ip6t_entry` (or `ipt_entry`) header, its matches and a
//! target; `next_offset` leads to the next. Built-in chains start at `hook_entry[hook]` and end with
//! their policy entry at `underflow[hook]`; a user chain starts with an `ERROR` entry carrying its
//! name; the table ends with an `ERROR` entry named `ERROR`. The only offsets inside entries are the
//! verdicts of standard targets that jump (or go) to a user chain: they point just past its `ERROR`
//! head; and a rule without a target (`-A INPUT`) carries the offset of the entry right after it
//! (a fall-through). Inserting or deleting an entry shifts every offset behind it; getting that wrong would
//! send a foreign jump somewhere else, so every edit is checked afterwards against the table it came
//! from: the same entries (bytes, counters aside) in the same order, every jump to the same chain.

use super::{Chain, Family, Rule, RuleKind};
use std::collections::BTreeMap;
use std::fmt;

/// Hooks (`NF_INET_*`), in the order of `hook_entry` and `underflow`.
pub const HOOKS: usize = 5;

/// The hook of a built-in chain of the filter table.
pub fn hook(chain: Chain) -> usize {
    match chain {
        Chain::Input => 1,  // NF_INET_LOCAL_IN
        Chain::Output => 3, // NF_INET_LOCAL_OUT
    }
}

/// Where the fields of an entry header are, per family (`ipt_entry` / `ip6t_entry`, x86-64 and
/// every other Linux ABI with 8-byte-aligned u64).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Size of the header; matches start here.
    pub header: usize,
    pub(super) target_offset: usize,
    pub(super) next_offset: usize,
    comefrom: usize,
    counters: usize,
}

impl Layout {
    pub fn of(family: Family) -> Layout {
        match family {
            Family::Ipv6 => Layout {
                header: 168,
                target_offset: 140,
                next_offset: 142,
                comefrom: 144,
                counters: 152,
            },
            Family::Ipv4 => Layout {
                header: 112,
                target_offset: 88,
                next_offset: 90,
                comefrom: 92,
                counters: 96,
            },
        }
    }
}

/// `struct xt_entry_target`: u16 size, 29-byte name, u8 revision; the data follows.
pub(super) const TARGET_HEADER: usize = 32;
/// The standard target's name is empty; its data is an i32 verdict.
const STANDARD_TARGET_SIZE: usize = TARGET_HEADER + 4;

/// Where the fields of the address part of an entry are (`ip6t_ip6` / `ipt_ip`).
struct AddressLayout {
    src: usize,
    smsk: usize,
    iniface: usize,
    outiface: usize,
    iniface_mask: usize,
    outiface_mask: usize,
    /// The address length (16 or 4).
    len: usize,
}

impl AddressLayout {
    fn of(family: Family) -> AddressLayout {
        match family {
            Family::Ipv6 => AddressLayout {
                src: 0,
                smsk: 32,
                iniface: 64,
                outiface: 80,
                iniface_mask: 96,
                outiface_mask: 112,
                len: 16,
            },
            Family::Ipv4 => AddressLayout {
                src: 0,
                smsk: 8,
                iniface: 16,
                outiface: 32,
                iniface_mask: 48,
                outiface_mask: 64,
                len: 4,
            },
        }
    }
}

/// `NF_ACCEPT` and `NF_DROP` as a standard target's verdict (`-verdict - 1`).
const VERDICT_ACCEPT: i32 = -2;
const VERDICT_DROP: i32 = -1;

/// The entry `ip6tables-legacy` (or `iptables-legacy`) writes for one of loopguard's rules, with
/// zero counters: the bytes loopguard inserts, and the only entry it ever takes for its own.
/// Another rule can print the same line (`-i lo -p all -j ACCEPT` sets the protocol flag) and
/// still be another entry; `ip6tables -D` compares these bytes, and so does loopguard.
pub fn rule_entry(rule: Rule) -> Vec<u8> {
    let layout = Layout::of(rule.family);
    let addresses = AddressLayout::of(rule.family);
    let mut e = vec![0u8; layout.header + STANDARD_TARGET_SIZE.next_multiple_of(8)];
    // An interface name matches up to and including its NUL: "lo" masks three bytes.
    let mut interface = |at: usize, mask: usize| {
        e[at..at + 2].copy_from_slice(b"lo");
        e[mask..mask + 3].fill(0xff);
    };
    let verdict = match rule.kind {
        RuleKind::AcceptLoopbackIn => {
            interface(addresses.iniface, addresses.iniface_mask);
            VERDICT_ACCEPT
        }
        RuleKind::AcceptLoopbackOut => {
            interface(addresses.outiface, addresses.outiface_mask);
            VERDICT_ACCEPT
        }
        RuleKind::DropLoopbackSource => {
            let (src, mask) = match rule.family {
                // ::1/128
                Family::Ipv6 => {
                    let mut src = [0u8; 16];
                    src[15] = 1;
                    (src.to_vec(), vec![0xff; 16])
                }
                // 127.0.0.0/8
                Family::Ipv4 => (vec![127, 0, 0, 0], vec![0xff, 0, 0, 0]),
            };
            e[addresses.src..addresses.src + addresses.len].copy_from_slice(&src);
            e[addresses.smsk..addresses.smsk + addresses.len].copy_from_slice(&mask);
            VERDICT_DROP
        }
    };
    let len = e.len();
    e[layout.target_offset..layout.target_offset + 2]
        .copy_from_slice(&(layout.header as u16).to_ne_bytes());
    e[layout.next_offset..layout.next_offset + 2].copy_from_slice(&(len as u16).to_ne_bytes());
    let target = layout.header;
    e[target..target + 2].copy_from_slice(&((len - target) as u16).to_ne_bytes());
    e[target + TARGET_HEADER..target + TARGET_HEADER + 4].copy_from_slice(&verdict.to_ne_bytes());
    e
}

/// `ip6t_getinfo` minus the name: what `*_SO_GET_INFO` tells about a table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TableInfo {
    pub valid_hooks: u32,
    pub hook_entry: [u32; HOOKS],
    pub underflow: [u32; HOOKS],
    pub num_entries: u32,
    pub size: u32,
}

/// Whether a table of this shape must hold rules: a table without any has one policy entry per
/// built-in chain, a head and a `RETURN` per user chain and an end, all of known sizes, so a
/// count or a size that no number of user chains gives proves rules. `false`: the shape alone
/// cannot tell (read the table).
pub fn holds_rules_by_shape(family: Family, info: &TableInfo) -> bool {
    let layout = Layout::of(family);
    let (standard, error) = (
        (layout.header + STANDARD_TARGET_SIZE.next_multiple_of(8)) as u64,
        (layout.header + 2 * TARGET_HEADER) as u64,
    );
    let hooks = u64::from(info.valid_hooks.count_ones());
    let Some(chains) = u64::from(info.num_entries).checked_sub(hooks + 1) else {
        return false;
    };
    if chains % 2 == 1 {
        return true;
    }
    let user = chains / 2;
    u64::from(info.size) != hooks * standard + user * (error + standard) + error
}

/// What is wrong with a blob (or an edit of it): the caller falls back to the iptables binaries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobError(pub String);

impl fmt::Display for BlobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BlobError {}

fn bad(message: impl Into<String>) -> BlobError {
    BlobError(message.into())
}

/// One entry: where it starts and how long it is, and what its target is (found once, when the
/// table is parsed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub offset: u32,
    pub len: u32,
    /// Where a standard target's verdict is in the blob (0: not a standard target).
    verdict_at: u32,
    /// An `ERROR` target: a user chain's head, or the table's end.
    error: bool,
}

/// Room an edited table keeps in front of its entries for the header of `*_SO_SET_REPLACE`
/// (`ip6t_replace` / `ipt_replace`: name, hooks, counts, hook offsets, the counters pointer), so
/// that the edit is written from where it was made, without a copy of a table of megabytes.
pub const REPLACE_ROOM: usize = 96;

/// A table as the kernel hands it over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    pub family: Family,
    pub info: TableInfo,
    /// The entries, behind `head` bytes of room for a socket option's header (see
    /// [`Table::parse_behind`]).
    raw: Vec<u8>,
    head: usize,
    entries: Vec<Entry>,
}

/// Writes `value` into the reference `r` of a table's `info` and `blob`.
fn set_ref(info: &mut TableInfo, blob: &mut [u8], r: Ref, value: u32) {
    match r {
        Ref::HookEntry(h) => info.hook_entry[h] = value,
        Ref::Underflow(h) => info.underflow[h] = value,
        Ref::Jump(at) => blob[at..at + 4].copy_from_slice(&(value as i32).to_ne_bytes()),
    }
}

/// How far ahead of a walk over a table's entries [`prefetch`] asks for memory: a few dozen
/// entries, which a large table's walk would otherwise wait for one by one.
const PREFETCH_AHEAD: usize = 8192;

/// Asks the CPU to bring `b[at]`'s cache line in (a hint: it reads nothing into the program and
/// changes no result; nothing past the slice is asked for).
#[inline(always)]
fn prefetch(b: &[u8], at: usize) {
    #[cfg(target_arch = "x86_64")]
    if at < b.len() {
        // SAFETY: SSE is part of x86_64; the address is inside `b`, and a prefetch neither
        // reads into the program nor faults.
        unsafe {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            _mm_prefetch::<_MM_HINT_T0>(b.as_ptr().add(at).cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (b, at);
}

pub(super) fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn i32_at(b: &[u8], at: usize) -> i32 {
    i32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub(super) fn name_at(b: &[u8], at: usize, len: usize) -> &[u8] {
    let field = &b[at..at + len];
    let end = field.iter().position(|&c| c == 0).unwrap_or(len);
    &field[..end]
}

/// Indexes the entries of `blob`, checking its structure: every entry inside it, offsets
/// aligned, each target inside its entry.
fn walk(blob: &[u8], layout: Layout, expected: usize) -> Result<Vec<Entry>, BlobError> {
    let mut entries = Vec::with_capacity(expected.min(blob.len() / layout.header + 1));
    let mut at = 0usize;
    // Each entry says where the next one starts, so the walk waits for one load before the next:
    // the lines ahead are asked for early, each once.
    let mut fetched = 0usize;
    while at < blob.len() {
        while fetched < at + PREFETCH_AHEAD {
            prefetch(blob, fetched);
            fetched += 64;
        }
        if at + layout.header > blob.len() || at % 8 != 0 {
            return Err(bad(format!("entry at {at} does not fit the table")));
        }
        let target = u16_at(blob, at + layout.target_offset) as usize;
        let next = u16_at(blob, at + layout.next_offset) as usize;
        if target < layout.header
            || target + TARGET_HEADER > next
            || next % 8 != 0
            || at + next > blob.len()
        {
            return Err(bad(format!(
                "entry at {at} has target offset {target} and next offset {next}"
            )));
        }
        let target_size = u16_at(blob, at + target) as usize;
        if target_size < TARGET_HEADER || target + target_size > next {
            return Err(bad(format!(
                "entry at {at} has a target of {target_size} bytes"
            )));
        }
        let name = name_at(blob, at + target + 2, 29);
        let standard = name.is_empty() && target_size >= STANDARD_TARGET_SIZE;
        entries.push(Entry {
            offset: at as u32,
            len: next as u32,
            verdict_at: if standard {
                (at + target + TARGET_HEADER) as u32
            } else {
                0
            },
            error: name == b"ERROR",
        });
        at += next;
    }
    Ok(entries)
}

impl Table {
    /// Checks the blob's structure (every entry inside it, offsets aligned, the counts and size
    /// `info` gives) and indexes its entries.
    pub fn parse(family: Family, info: TableInfo, blob: Vec<u8>) -> Result<Table, BlobError> {
        Table::parse_behind(family, info, blob, 0)
    }

    /// [`Table::parse`] of the entries that start `head` bytes into `raw` (the bytes in front are
    /// a socket option's header: the table is read, and written, in place).
    pub fn parse_behind(
        family: Family,
        info: TableInfo,
        raw: Vec<u8>,
        head: usize,
    ) -> Result<Table, BlobError> {
        let Some(blob) = raw.get(head..) else {
            return Err(bad(format!("no table behind {head} bytes of header")));
        };
        if blob.len() != info.size as usize {
            return Err(bad(format!(
                "table is {} bytes, its info says {}",
                blob.len(),
                info.size
            )));
        }
        let entries = walk(blob, Layout::of(family), info.num_entries as usize)?;
        Table::indexed(family, info, raw, head, entries)
    }

    /// A table from its buffer and the index of its entries (from [`walk`], or worked out from
    /// the table an edit was made on): checks that the index covers the table as `info` says and
    /// that every hook starts and ends at an entry.
    fn indexed(
        family: Family,
        info: TableInfo,
        raw: Vec<u8>,
        head: usize,
        entries: Vec<Entry>,
    ) -> Result<Table, BlobError> {
        if entries.len() != info.num_entries as usize {
            return Err(bad(format!(
                "table holds {} entries, its info says {}",
                entries.len(),
                info.num_entries
            )));
        }
        let end = entries.last().map_or(0, |e| e.offset + e.len);
        if raw.len().checked_sub(head) != Some(info.size as usize) || end != info.size {
            return Err(bad(format!(
                "entries end at {end}, the table is {} bytes",
                info.size
            )));
        }
        let table = Table {
            family,
            info,
            raw,
            head,
            entries,
        };
        for h in table.hooks() {
            for offset in [info.hook_entry[h], info.underflow[h]] {
                table
                    .index_at(offset)
                    .ok_or_else(|| bad(format!("hook {h} points at {offset}, not at an entry")))?;
            }
            if info.hook_entry[h] > info.underflow[h] {
                return Err(bad(format!("hook {h} starts after its policy")));
            }
        }
        Ok(table)
    }

    fn layout(&self) -> Layout {
        Layout::of(self.family)
    }

    /// The entries, as the kernel hands them over and takes them.
    pub fn blob(&self) -> &[u8] {
        &self.raw[self.head..]
    }

    fn blob_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.head..]
    }

    /// The whole buffer with `head` bytes of room in front of the entries, for a socket option
    /// that takes a header and the entries in one piece; `None` when there is less room than
    /// `head`.
    pub fn with_header_room(&mut self, head: usize) -> Option<&mut [u8]> {
        let start = self.head.checked_sub(head)?;
        Some(&mut self.raw[start..])
    }

    /// The hooks the table has (filter: INPUT, FORWARD, OUTPUT).
    fn hooks(&self) -> impl Iterator<Item = usize> + '_ {
        (0..HOOKS).filter(|h| self.info.valid_hooks & (1 << h) != 0)
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    fn index_at(&self, offset: u32) -> Option<usize> {
        self.entries
            .binary_search_by_key(&offset, |e| e.offset)
            .ok()
    }

    pub(super) fn bytes(&self, e: Entry) -> &[u8] {
        &self.blob()[e.offset as usize..(e.offset + e.len) as usize]
    }

    /// The verdict of a standard target (`None` for any other target).
    pub(super) fn verdict(&self, e: Entry) -> Option<(usize, i32)> {
        (e.verdict_at != 0).then(|| {
            let at = e.verdict_at as usize;
            (at, i32_at(self.blob(), at))
        })
    }

    /// Whether `e` is a rule without a target: a standard verdict that leads to the next entry.
    pub(super) fn falls_through(&self, e: Entry) -> bool {
        self.verdict(e)
            .is_some_and(|(_, v)| v >= 0 && v as u32 == e.offset + e.len)
    }

    /// The user chains, by the offset a jump to them carries (just past their `ERROR` head).
    pub fn chain_starts(&self) -> BTreeMap<u32, Vec<u8>> {
        let mut starts = BTreeMap::new();
        for &e in &self.entries {
            if e.error {
                let target =
                    u16_at(self.blob(), e.offset as usize + self.layout().target_offset) as usize;
                let name = name_at(self.blob(), e.offset as usize + target + TARGET_HEADER, 32);
                starts.insert(e.offset + e.len, name.to_vec());
            }
        }
        starts
    }

    /// How many rules `*-save` prints for the table: every entry but the policies, the user
    /// chains' heads and their closing `RETURN`s, and the end.
    pub fn rule_count(&self) -> usize {
        let errors = self.entries.iter().filter(|e| e.error).count();
        let policies = self.hooks().count();
        self.entries
            .len()
            .saturating_sub(policies + (2 * errors).saturating_sub(1))
    }

    /// The user chains' names.
    pub fn user_chains(&self) -> Vec<String> {
        self.chain_starts()
            .into_values()
            .filter(|name| name.as_slice() != b"ERROR")
            .map(|name| String::from_utf8_lossy(&name).into_owned())
            .collect()
    }

    /// The rules of a built-in chain, in order (its policy entry not included).
    pub fn chain(&self, chain: Chain) -> &[Entry] {
        let h = hook(chain);
        let (Some(first), Some(policy)) = (
            self.index_at(self.info.hook_entry[h]),
            self.index_at(self.info.underflow[h]),
        ) else {
            return &[];
        };
        &self.entries[first..policy]
    }

    /// An entry as it is, whatever the table around it: its bytes with the counters and the
    /// kernel's bookkeeping (`comefrom`) zeroed, and a jump's offset replaced by the name of the
    /// chain it jumps to. Two entries with the same fingerprint are the same rule.
    pub fn fingerprint(&self, e: Entry) -> Vec<u8> {
        self.fingerprint_in(e, &self.chain_starts())
    }

    /// [`Table::fingerprint`] with the user chains already looked up.
    pub fn fingerprint_in(&self, e: Entry, starts: &BTreeMap<u32, Vec<u8>>) -> Vec<u8> {
        let layout = self.layout();
        let mut bytes = self.bytes(e).to_vec();
        bytes[layout.comefrom..layout.comefrom + 4].fill(0);
        bytes[layout.counters..layout.counters + 16].fill(0);
        if let Some((at, verdict)) = self.verdict(e)
            && verdict >= 0
        {
            let local = at - e.offset as usize;
            bytes[local..local + 4].fill(0);
            if self.falls_through(e) {
                bytes.extend_from_slice(b"->next");
                return bytes;
            }
            bytes.extend_from_slice(b"->");
            bytes.extend_from_slice(
                starts
                    .get(&(verdict as u32))
                    .map_or(&b"?"[..], |name| name.as_slice()),
            );
        }
        bytes
    }

    /// The 0-based position in `chain` of the first rule whose entry is `entry` (counters and
    /// `comefrom` aside): the rule `ip6tables -D` would delete.
    pub fn position_of(&self, chain: Chain, entry: &[u8]) -> Option<usize> {
        self.chain(chain)
            .iter()
            .position(|&e| self.portable(e).is_some_and(|bytes| bytes == entry))
    }

    /// The entry's bytes, ready to be inserted elsewhere (counters and `comefrom` zeroed). Only
    /// for entries without a jump: the offset would be wrong anywhere else.
    pub fn portable(&self, e: Entry) -> Option<Vec<u8>> {
        if self.verdict(e).is_some_and(|(_, v)| v >= 0) {
            return None;
        }
        let layout = self.layout();
        let mut bytes = self.bytes(e).to_vec();
        bytes[layout.comefrom..layout.comefrom + 4].fill(0);
        bytes[layout.counters..layout.counters + 16].fill(0);
        Some(bytes)
    }

    /// Every offset the table holds that points at an entry: hook starts, policies, jumps.
    /// Returns (where it is, its value, what kind).
    fn references(&self) -> Vec<(Ref, u32)> {
        let mut refs = Vec::new();
        for h in self.hooks() {
            refs.push((Ref::HookEntry(h), self.info.hook_entry[h]));
            refs.push((Ref::Underflow(h), self.info.underflow[h]));
        }
        for &e in &self.entries {
            if let Some((at, verdict)) = self.verdict(e)
                && verdict >= 0
                && !self.falls_through(e)
            {
                refs.push((Ref::Jump(at), verdict as u32));
            }
        }
        refs
    }

    /// The entries (by index) that are rules without a target: their verdict is the offset of
    /// the entry after them, which an edit must follow.
    fn fall_throughs(&self) -> Vec<u32> {
        (0..self.entries.len() as u32)
            .filter(|&i| self.falls_through(self.entries[i as usize]))
            .collect()
    }

    /// Inserts `entry` (from [`Table::portable`]) as rule `position` (0-based; the number of rules
    /// appends) of `chain`. Returns the edited table and, per new entry, the index of the old
    /// entry it is (for carrying the counters over).
    pub fn insert(
        &self,
        chain: Chain,
        position: usize,
        entry: &[u8],
    ) -> Result<(Table, Vec<Option<u32>>), BlobError> {
        let (edited, map) = self.insert_unchecked(chain, position, entry)?;
        self.check_edit(&edited, &map)?;
        Ok((edited, map))
    }

    /// [`Table::insert`] without the check afterwards: for a series of edits checked once, as
    /// a whole, with [`Table::check_edit`] against the table they started from.
    pub fn insert_unchecked(
        &self,
        chain: Chain,
        position: usize,
        entry: &[u8],
    ) -> Result<(Table, Vec<Option<u32>>), BlobError> {
        self.insertion(chain, position, entry)?.copied_from(self)
    }

    /// [`Table::insert_unchecked`] in this table's own buffer when it is an edit's (the next
    /// edit of a series): the entries behind the insertion point move up in place instead of the
    /// whole table being copied again.
    pub fn insert_in_place(
        self,
        chain: Chain,
        position: usize,
        entry: &[u8],
    ) -> Result<(Table, Vec<Option<u32>>), BlobError> {
        self.insertion(chain, position, entry)?.in_place(self)
    }

    fn insertion(&self, chain: Chain, position: usize, entry: &[u8]) -> Result<Splice, BlobError> {
        let rules = self.chain(chain);
        if position > rules.len() {
            return Err(bad(format!(
                "{chain} has {} rules; cannot insert at {position}",
                rules.len()
            )));
        }
        let h = hook(chain);
        let at = rules
            .get(position)
            .map_or(self.info.underflow[h], |e| e.offset);
        let len = entry.len() as u32;
        let check = Table::parse(
            self.family,
            TableInfo {
                num_entries: 1,
                size: len,
                valid_hooks: 0,
                ..TableInfo::default()
            },
            entry.to_vec(),
        )?;
        if check.verdict(check.entries[0]).is_some_and(|(_, v)| v >= 0) {
            return Err(bad("an inserted entry may not jump"));
        }
        let mut info = self.info;
        info.num_entries += 1;
        info.size += len;
        // Shift every reference at or behind the insertion point, except the chain's own start
        // when the new entry becomes its first rule; a jump field behind the insertion point
        // moved with its entry.
        let mut refs = Vec::new();
        for (r, value) in self.references() {
            let stays = value < at || (value == at && r == Ref::HookEntry(h));
            if let Ref::Jump(_) = r
                && value == at
            {
                return Err(bad("a jump points into a built-in chain"));
            }
            if !stays {
                let r = match r {
                    Ref::Jump(field) if field >= at as usize => Ref::Jump(field + len as usize),
                    r => r,
                };
                refs.push((r, value + len));
            }
        }
        let index = self.index_at(at).expect("insertion point is an entry") as u32;
        let map = (0..info.num_entries)
            .map(|i| match i.cmp(&index) {
                std::cmp::Ordering::Less => Some(i),
                std::cmp::Ordering::Equal => None,
                std::cmp::Ordering::Greater => Some(i - 1),
            })
            .collect();
        Ok(Splice {
            family: self.family,
            info,
            at: at as usize,
            removed: 0,
            inserted: entry.to_vec(),
            refs,
            map,
            fall_throughs: self.fall_throughs(),
        })
    }

    /// Deletes rule `position` (0-based) of `chain`. Returns the table and the counter map, as
    /// [`Table::insert`] does.
    pub fn delete(
        &self,
        chain: Chain,
        position: usize,
    ) -> Result<(Table, Vec<Option<u32>>), BlobError> {
        let (edited, map) = self.delete_unchecked(chain, position)?;
        self.check_edit(&edited, &map)?;
        Ok((edited, map))
    }

    /// [`Table::delete`] without the check afterwards (see [`Table::insert_unchecked`]).
    pub fn delete_unchecked(
        &self,
        chain: Chain,
        position: usize,
    ) -> Result<(Table, Vec<Option<u32>>), BlobError> {
        self.deletion(chain, position)?.copied_from(self)
    }

    /// [`Table::delete_unchecked`] in this table's own buffer (see [`Table::insert_in_place`]).
    pub fn delete_in_place(
        self,
        chain: Chain,
        position: usize,
    ) -> Result<(Table, Vec<Option<u32>>), BlobError> {
        self.deletion(chain, position)?.in_place(self)
    }

    fn deletion(&self, chain: Chain, position: usize) -> Result<Splice, BlobError> {
        let rules = self.chain(chain);
        let Some(&gone) = rules.get(position) else {
            return Err(bad(format!(
                "{chain} has {} rules; no rule {position}",
                rules.len()
            )));
        };
        let h = hook(chain);
        let (at, len) = (gone.offset, gone.len);
        let mut info = self.info;
        info.num_entries -= 1;
        info.size -= len;
        let mut refs = Vec::new();
        for (r, value) in self.references() {
            if value == at && r != Ref::HookEntry(h) {
                return Err(bad("something points at the entry to delete"));
            }
            if let Ref::Jump(field) = r
                && field >= at as usize
                && field < (at + len) as usize
            {
                return Err(bad("the entry to delete jumps"));
            }
            if value > at {
                let r = match r {
                    Ref::Jump(field) if field >= (at + len) as usize => {
                        Ref::Jump(field - len as usize)
                    }
                    r => r,
                };
                refs.push((r, value - len));
            }
        }
        let index = self.index_at(at).expect("deleted entry") as u32;
        let map = (0..info.num_entries)
            .map(|i| Some(if i < index { i } else { i + 1 }))
            .collect();
        Ok(Splice {
            family: self.family,
            info,
            at: at as usize,
            removed: len as usize,
            inserted: Vec::new(),
            refs,
            map,
            fall_throughs: self.fall_throughs(),
        })
    }

    /// Every entry the edit kept is the same rule as before (the same bytes, counters and
    /// `comefrom` aside, and every jump to the same chain), and every hook's policy is the entry
    /// it was.
    pub fn check_edit(&self, edited: &Table, map: &[Option<u32>]) -> Result<(), BlobError> {
        if map.len() != edited.entries.len() {
            return Err(bad("counter map does not cover the table"));
        }
        let (old_starts, new_starts) = (self.chain_starts(), edited.chain_starts());
        for (new, old) in map.iter().enumerate() {
            let Some(old) = old else { continue };
            let (a, b) = (self.entries[*old as usize], edited.entries[new]);
            if !self.same_rule(a, &old_starts, edited, b, &new_starts) {
                return Err(bad(format!(
                    "entry {old} would change in the edit (internal error; nothing written)"
                )));
            }
        }
        for h in self.hooks() {
            let old_policy = self.index_at(self.info.underflow[h]).expect("policy");
            let new_policy = edited
                .index_at(edited.info.underflow[h])
                .expect("checked by parse");
            if map[new_policy] != Some(old_policy as u32) {
                return Err(bad(format!(
                    "hook {h}'s policy would move (internal error; nothing written)"
                )));
            }
        }
        Ok(())
    }

    /// Whether entry `a` of this table and entry `b` of `other` are the same rule, without
    /// copying them: the bytes outside `comefrom`, the counters and a jump's offset are equal,
    /// and a jump leads to the same chain.
    fn same_rule(
        &self,
        a: Entry,
        a_starts: &BTreeMap<u32, Vec<u8>>,
        other: &Table,
        b: Entry,
        b_starts: &BTreeMap<u32, Vec<u8>>,
    ) -> bool {
        let layout = self.layout();
        let (x, y) = (self.bytes(a), other.bytes(b));
        if x.len() != y.len() {
            return false;
        }
        let skip_verdict = |t: &Table, e: Entry| {
            t.verdict(e)
                .filter(|(_, v)| *v >= 0)
                .map(|(at, v)| (at - e.offset as usize, v as u32, t.falls_through(e)))
        };
        let (va, vb) = (skip_verdict(self, a), skip_verdict(other, b));
        // comefrom, the counters and (for a jump or fall-through) the verdict; no verdict: an
        // empty hole at the end.
        let mut holes = [
            (layout.comefrom, layout.comefrom + 4),
            (layout.counters, layout.counters + 16),
            (x.len(), x.len()),
        ];
        match (va, vb) {
            (None, None) => {}
            (Some((at, _, true)), Some((at_b, _, true))) if at == at_b => {
                holes[2] = (at, at + 4);
            }
            (Some((at, to_a, false)), Some((at_b, to_b, false))) if at == at_b => {
                if a_starts.get(&to_a).is_none() || a_starts.get(&to_a) != b_starts.get(&to_b) {
                    return false;
                }
                holes[2] = (at, at + 4);
            }
            _ => return false,
        }
        holes.sort_unstable();
        let mut from = 0;
        for (start, end) in holes {
            if x[from..start] != y[from..start] {
                return false;
            }
            from = end;
        }
        x[from..] == y[from..]
    }

    /// The counters `*_SO_SET_ADD_COUNTERS` adds to the new table: each kept entry gets the old
    /// entry's (from `old_counters`, 16 bytes per old entry, as `SET_REPLACE` returned them).
    pub fn carried_counters(map: &[Option<u32>], old_counters: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; map.len() * 16];
        for (new, old) in map.iter().enumerate() {
            if let Some(old) = old {
                let from = *old as usize * 16;
                if from + 16 <= old_counters.len() {
                    out[new * 16..new * 16 + 16].copy_from_slice(&old_counters[from..from + 16]);
                }
            }
        }
        out
    }
}

/// One edit of a table, worked out on the table before it: the bytes to cut out and put in at
/// one offset, the references to set afterwards, and the counter map.
struct Splice {
    family: Family,
    info: TableInfo,
    at: usize,
    removed: usize,
    inserted: Vec<u8>,
    /// (where, in the edited entries, its new value).
    refs: Vec<(Ref, u32)>,
    map: Vec<Option<u32>>,
    /// The old table's rules without a target (see [`Table::fall_throughs`]).
    fall_throughs: Vec<u32>,
}

/// Spare room an edit's buffer keeps behind its entries, so that the next inserts of a series
/// (three rules at most) move entries in place instead of growing the buffer.
const EDIT_SLACK: usize = 4096;

impl Splice {
    /// The edit in a copy of `old`'s entries, behind room for the replace header.
    fn copied_from(self, old: &Table) -> Result<(Table, Vec<Option<u32>>), BlobError> {
        let blob = old.blob();
        let mut raw =
            Vec::with_capacity(REPLACE_ROOM + blob.len() + self.inserted.len() + EDIT_SLACK);
        raw.resize(REPLACE_ROOM, 0);
        raw.extend_from_slice(&blob[..self.at]);
        raw.extend_from_slice(&self.inserted);
        raw.extend_from_slice(&blob[self.at + self.removed..]);
        let entries = self.entries_after(&old.entries, old.layout())?;
        self.finish(raw, entries)
    }

    /// The edit in `old`'s own buffer when it has the replace header's room (an edit's), else in
    /// a copy.
    fn in_place(self, mut old: Table) -> Result<(Table, Vec<Option<u32>>), BlobError> {
        if old.head != REPLACE_ROOM {
            return self.copied_from(&old);
        }
        let entries = self.entries_after(&old.entries, old.layout())?;
        let mut raw = std::mem::take(&mut old.raw);
        let at = REPLACE_ROOM + self.at;
        raw.splice(at..at + self.removed, self.inserted.iter().copied());
        self.finish(raw, entries)
    }

    /// The index of the edited table, worked out from the old one's instead of walking the
    /// edited bytes again (a walk over a large table waits on memory entry by entry): the entries
    /// in front of the edit stay, the inserted ones are indexed, the ones behind move by the
    /// difference in size. [`Table::check_edit`] then holds every kept entry to its old bytes.
    fn entries_after(&self, old: &[Entry], layout: Layout) -> Result<Vec<Entry>, BlobError> {
        let (at, end) = (self.at as u32, (self.at + self.removed) as u32);
        let grow = self.inserted.len() as i64 - self.removed as i64;
        let moved = |offset: u32| (offset as i64 + grow) as u32;
        let front = old.partition_point(|e| e.offset < at);
        let behind = old.partition_point(|e| e.offset < end);
        if old.get(front).is_some_and(|e| e.offset != at)
            || old.get(behind).is_some_and(|e| e.offset != end)
        {
            return Err(bad(
                "an edit cuts into an entry (internal error; nothing written)",
            ));
        }
        let inserted = walk(&self.inserted, layout, 1)?;
        let mut entries = Vec::with_capacity(old.len() + inserted.len());
        entries.extend_from_slice(&old[..front]);
        entries.extend(inserted.into_iter().map(|e| Entry {
            offset: e.offset + at,
            verdict_at: if e.verdict_at == 0 {
                0
            } else {
                e.verdict_at + at
            },
            ..e
        }));
        entries.extend(old[behind..].iter().map(|e| Entry {
            offset: moved(e.offset),
            verdict_at: if e.verdict_at == 0 {
                0
            } else {
                moved(e.verdict_at)
            },
            ..*e
        }));
        Ok(entries)
    }

    fn finish(
        self,
        mut raw: Vec<u8>,
        entries: Vec<Entry>,
    ) -> Result<(Table, Vec<Option<u32>>), BlobError> {
        let mut info = self.info;
        for &(r, value) in &self.refs {
            set_ref(&mut info, &mut raw[REPLACE_ROOM..], r, value);
        }
        let mut edited = Table::indexed(self.family, info, raw, REPLACE_ROOM, entries)?;
        // Every rule without a target points at its entry's new successor.
        for (new, old) in self.map.iter().enumerate() {
            let Some(old) = old else { continue };
            if self.fall_throughs.binary_search(old).is_err() {
                continue;
            }
            let e = edited.entries[new];
            if let Some((at, _)) = edited.verdict(e) {
                edited.blob_mut()[at..at + 4]
                    .copy_from_slice(&((e.offset + e.len) as i32).to_ne_bytes());
            }
        }
        Ok((edited, self.map))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ref {
    HookEntry(usize),
    Underflow(usize),
    /// The byte offset of a standard target's verdict.
    Jump(usize),
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Layout = Layout {
        header: 168,
        target_offset: 140,
        next_offset: 142,
        comefrom: 144,
        counters: 152,
    };

    /// An IPv6 entry with no matches and a standard target (`verdict`), tagged with `tag` in its
    /// source address so that entries differ.
    fn standard(tag: u8, verdict: i32) -> Vec<u8> {
        let mut e = vec![0u8; L.header + 40];
        e[0] = tag;
        e[L.target_offset..L.target_offset + 2].copy_from_slice(&(L.header as u16).to_ne_bytes());
        e[L.next_offset..L.next_offset + 2]
            .copy_from_slice(&((L.header + 40) as u16).to_ne_bytes());
        e[L.header..L.header + 2].copy_from_slice(&40u16.to_ne_bytes());
        e[L.header + 32..L.header + 36].copy_from_slice(&verdict.to_ne_bytes());
        e[L.counters] = tag; // counters differ; fingerprints ignore them
        e
    }

    fn error(name: &str) -> Vec<u8> {
        let mut e = vec![0u8; L.header + 64];
        e[L.target_offset..L.target_offset + 2].copy_from_slice(&(L.header as u16).to_ne_bytes());
        e[L.next_offset..L.next_offset + 2]
            .copy_from_slice(&((L.header + 64) as u16).to_ne_bytes());
        e[L.header..L.header + 2].copy_from_slice(&64u16.to_ne_bytes());
        e[L.header + 2..L.header + 7].copy_from_slice(b"ERROR");
        e[L.header + 32..L.header + 32 + name.len()].copy_from_slice(name.as_bytes());
        e
    }

    const ACCEPT: i32 = -2;
    const DROP: i32 = -1;
    const RETURN: i32 = -5;

    /// filter with INPUT [a, jump MY], FORWARD [], OUTPUT [b], user chain MY [c], ERROR.
    fn sample() -> Table {
        let entry = 208u32;
        // offsets: 0 a, 208 jump, 416 INPUT policy, 624 FORWARD policy, 832 b, 1040 OUTPUT
        // policy, 1248 MY head (232 long), 1480 c, 1688 MY return, 1896 ERROR.
        let my_start = 1248 + 232;
        let parts = [
            standard(1, ACCEPT),
            standard(2, my_start),
            standard(0, ACCEPT),
            standard(0, DROP),
            standard(3, DROP),
            standard(0, ACCEPT),
            error("MY"),
            standard(4, ACCEPT),
            standard(0, RETURN),
            error("ERROR"),
        ];
        let blob: Vec<u8> = parts.concat();
        let info = TableInfo {
            valid_hooks: 0b1110,
            hook_entry: [0, 0, 3 * entry, 4 * entry, 0],
            underflow: [0, 2 * entry, 3 * entry, 5 * entry, 0],
            num_entries: parts.len() as u32,
            size: blob.len() as u32,
        };
        Table::parse(Family::Ipv6, info, blob).unwrap()
    }

    #[test]
    fn rules_are_counted_as_save_prints_them_and_shapes_tell_some() {
        let t = sample();
        // a, the jump, b, c; not the policies, MY's head and return, or the end.
        assert_eq!(t.rule_count(), 4);
        assert_eq!(t.user_chains(), vec!["MY".to_string()]);
        assert!(holds_rules_by_shape(Family::Ipv6, &t.info));
        // Three policies, one user chain (head and RETURN), the end: no rules.
        let empty = TableInfo {
            valid_hooks: 0b1110,
            num_entries: 6,
            size: 3 * 208 + 232 + 208 + 232,
            ..TableInfo::default()
        };
        assert!(!holds_rules_by_shape(Family::Ipv6, &empty));
        let one_more = TableInfo {
            num_entries: 7,
            size: empty.size + 208,
            ..empty
        };
        assert!(holds_rules_by_shape(Family::Ipv6, &one_more));
    }

    #[test]
    fn chains_are_read_between_hook_entry_and_policy() {
        let t = sample();
        assert_eq!(t.chain(Chain::Input).len(), 2);
        assert_eq!(t.chain(Chain::Output).len(), 1);
        let jump = t.fingerprint(t.chain(Chain::Input)[1]);
        assert!(jump.ends_with(b"->MY"), "a jump names its chain");
    }

    #[test]
    fn inserting_shifts_what_lies_behind_and_keeps_every_jump() {
        let t = sample();
        let rule = t.portable(t.chain(Chain::Output)[0]).unwrap();
        for position in 0..=2 {
            let (edited, map) = t.insert(Chain::Input, position, &rule).unwrap();
            assert_eq!(edited.chain(Chain::Input).len(), 3);
            assert_eq!(
                edited.fingerprint(edited.chain(Chain::Input)[position]),
                t.fingerprint(t.chain(Chain::Output)[0])
            );
            let jump = edited
                .chain(Chain::Input)
                .iter()
                .find(|e| edited.fingerprint(**e).ends_with(b"->MY"))
                .copied()
                .unwrap();
            let (_, verdict) = edited.verdict(jump).unwrap();
            assert_eq!(verdict, 1480 + 208, "the jump follows MY");
            assert_eq!(edited.info.underflow[1], 416 + 208, "INPUT's policy moved");
            assert_eq!(edited.info.hook_entry[1], 0);
            assert_eq!(map.iter().filter(|m| m.is_none()).count(), 1);
        }
    }

    #[test]
    fn an_edit_keeps_room_for_the_replace_header_in_front_of_its_entries() {
        let mut t = sample();
        assert!(
            t.with_header_room(REPLACE_ROOM).is_none(),
            "parsed: no room"
        );
        let rule = t.portable(t.chain(Chain::Output)[0]).unwrap();
        let (mut inserted, _) = t.insert(Chain::Input, 0, &rule).unwrap();
        let (mut deleted, _) = t.delete(Chain::Input, 0).unwrap();
        for edited in [&mut inserted, &mut deleted] {
            let entries = edited.blob().to_vec();
            let room = edited
                .with_header_room(REPLACE_ROOM)
                .expect("room for the header");
            assert_eq!(room.len(), REPLACE_ROOM + entries.len());
            assert_eq!(
                &room[REPLACE_ROOM..],
                &entries[..],
                "the entries follow the room"
            );
        }
    }

    #[test]
    fn edits_in_place_give_the_tables_the_copying_edits_give() {
        let t = sample();
        let a = t.portable(t.chain(Chain::Output)[0]).unwrap();
        let b = t.portable(t.chain(Chain::Input)[0]).unwrap();
        let (copied, _) = t.insert_unchecked(Chain::Input, 0, &a).unwrap();
        let (copied, _) = copied.insert_unchecked(Chain::Output, 1, &b).unwrap();
        let (copied, _) = copied.delete_unchecked(Chain::Input, 1).unwrap();
        let (copied, _) = copied.insert_unchecked(Chain::Input, 2, &a).unwrap();
        let (moved, _) = t.insert_unchecked(Chain::Input, 0, &a).unwrap();
        let (moved, _) = moved.insert_in_place(Chain::Output, 1, &b).unwrap();
        let (moved, _) = moved.delete_in_place(Chain::Input, 1).unwrap();
        let (moved, _) = moved.insert_in_place(Chain::Input, 2, &a).unwrap();
        assert_eq!(moved.info, copied.info);
        assert_eq!(moved.blob(), copied.blob());
        // A table as read (no room in front) is edited in a copy, the same way.
        let (from_read, _) = t.clone().insert_in_place(Chain::Input, 0, &a).unwrap();
        assert_eq!(
            from_read,
            t.insert_unchecked(Chain::Input, 0, &a).unwrap().0
        );
    }

    /// An edit's index is worked out from the old table's, not walked again: it must be the
    /// index a walk of the edited bytes gives, for every place an edit can be made.
    #[test]
    fn an_edits_index_is_the_one_its_bytes_give() {
        let walked = |t: &Table| {
            let fresh = Table::parse(t.family, t.info, t.blob().to_vec()).unwrap();
            assert_eq!(t.entries, fresh.entries, "{:?}", t.info);
        };
        let t = sample();
        let a = t.portable(t.chain(Chain::Output)[0]).unwrap();
        let mut deletions = 0;
        for chain in Chain::ALL {
            for position in 0..=t.chain(chain).len() {
                let (inserted, _) = t.insert_unchecked(chain, position, &a).unwrap();
                walked(&inserted);
                let (twice, _) = inserted.insert_in_place(chain, position, &a).unwrap();
                walked(&twice);
                for gone in 0..twice.chain(chain).len() {
                    // The jump to MY cannot be deleted (refused, as it should be).
                    let Ok((deleted, _)) = twice.delete_unchecked(chain, gone) else {
                        continue;
                    };
                    walked(&deleted);
                    walked(&twice.clone().delete_in_place(chain, gone).unwrap().0);
                    deletions += 1;
                }
            }
        }
        assert!(deletions > 10, "{deletions} deletions checked");
    }

    #[test]
    fn other_chains_keep_their_bounds() {
        let t = sample();
        let rule = t.portable(t.chain(Chain::Input)[0]).unwrap();
        let forward = 2; // FORWARD is empty: hook_entry == underflow
        assert_eq!(t.info.hook_entry[forward], t.info.underflow[forward]);
        let (edited, _) = t.insert(Chain::Output, 1, &rule).unwrap();
        assert_eq!(edited.chain(Chain::Output).len(), 2);
        assert_eq!(edited.info.hook_entry[forward], t.info.hook_entry[forward]);
    }

    #[test]
    fn deleting_the_first_rule_keeps_the_chain_start() {
        let t = sample();
        let (edited, map) = t.delete(Chain::Input, 0).unwrap();
        assert_eq!(edited.chain(Chain::Input).len(), 1);
        assert_eq!(edited.info.hook_entry[1], 0);
        assert_eq!(map[0], Some(1));
        let (_, verdict) = edited.verdict(edited.chain(Chain::Input)[0]).unwrap();
        assert_eq!(verdict, 1480 - 208);
        let back = t.portable(t.chain(Chain::Input)[0]).unwrap();
        let (again, _) = edited.insert(Chain::Input, 0, &back).unwrap();
        assert_eq!(
            (0..again.entries.len())
                .map(|i| again.fingerprint(again.entries[i]))
                .collect::<Vec<_>>(),
            (0..t.entries.len())
                .map(|i| t.fingerprint(t.entries[i]))
                .collect::<Vec<_>>(),
            "delete then insert is the original table"
        );
    }

    #[test]
    fn jumps_are_never_moved_or_made() {
        let t = sample();
        assert!(t.portable(t.chain(Chain::Input)[1]).is_none());
        assert!(
            t.delete(Chain::Input, 1).is_err(),
            "a jump is not ours to delete"
        );
        assert!(t.delete(Chain::Input, 2).is_err(), "no such rule");
        assert!(t.insert(Chain::Input, 3, &standard(9, ACCEPT)).is_err());
        assert!(t.insert(Chain::Input, 0, &standard(9, 1480)).is_err());
    }

    #[test]
    fn counters_follow_their_entries() {
        let old: Vec<u8> = (0..3u8).flat_map(|i| [i + 1; 16]).collect();
        let carried = Table::carried_counters(&[Some(0), None, Some(1), Some(2)], &old);
        assert_eq!(carried[0], 1);
        assert_eq!(carried[16], 0);
        assert_eq!(carried[32], 2);
        assert_eq!(carried[48], 3);
    }

    #[test]
    fn malformed_blobs_are_refused() {
        let t = sample();
        let mut info = t.info;
        info.size -= 8;
        assert!(Table::parse(Family::Ipv6, info, t.blob()[..t.blob().len() - 8].to_vec()).is_err());
        let mut info = t.info;
        info.hook_entry[1] = 4;
        assert!(Table::parse(Family::Ipv6, info, t.blob().to_vec()).is_err());
        let mut blob = t.blob().to_vec();
        blob[L.next_offset] = 0;
        blob[L.next_offset + 1] = 0;
        assert!(Table::parse(Family::Ipv6, t.info, blob).is_err());
    }
}
