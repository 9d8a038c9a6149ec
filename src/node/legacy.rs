//! The legacy (x_tables) backend without a process per look: the kernel's table read and written
//! through the same socket options `iptables-legacy` uses (`*_SO_GET_INFO`, `*_SO_GET_ENTRIES`,
//! `*_SO_SET_REPLACE`, `*_SO_SET_ADD_COUNTERS`), in the calling thread's network namespace.
//!
//! The rule text loopguard reasons about is what `ip6tables-legacy -S` prints. [`Legacy`] writes
//! it itself for the entries of INPUT and OUTPUT whose form `rules::decode` covers (loopguard's own,
//! addresses, interfaces, tcp/udp ports, the standard verdicts, jumps, REJECT); for any other
//! entry it reads the chains with the binaries once and learns which entry is which line, reading
//! the kernel's table before and after while it stands still. Edits happen in process only when
//! every entry involved is known and the chains are exactly what the plan was made from; the
//! edits are checked, as a whole, entry by entry against the table read before they are written
//! (see `rules::blob`), and written under the xtables lock as one `SET_REPLACE` (which the
//! kernel refuses when the table no longer has the entry count that was read).
//!
//! `GET_INFO` costs microseconds whatever the table's size: it is the change probe the drift watch
//! polls between full checks.

use super::lock::FileLock;
use crate::rules::blob::{self, HOOKS, Table, TableInfo};
use crate::rules::decode;
use crate::rules::{Chain, ChainListing, EditKind, Family, LOOK_ALIKE, Rule, RulePlan, Tables};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

const BASE_CTL: libc::c_int = 64;
const SO_GET_INFO: libc::c_int = BASE_CTL;
const SO_GET_ENTRIES: libc::c_int = BASE_CTL + 1;
const SO_SET_REPLACE: libc::c_int = BASE_CTL;
const SO_SET_ADD_COUNTERS: libc::c_int = BASE_CTL + 1;
const NAME_LEN: usize = 32;
/// `ip6t_getinfo`: name, valid_hooks, hook_entry[5], underflow[5], num_entries, size.
const INFO_LEN: usize = NAME_LEN + 4 + 4 * HOOKS * 2 + 4 + 4;
/// `ip6t_get_entries` before the entries: name, size, padding to 8.
const GET_ENTRIES_HEADER: usize = 40;
/// `ip6t_replace` before the entries: name, valid_hooks, num_entries, size, hook_entry[5],
/// underflow[5], num_counters, the counters pointer.
const REPLACE_HEADER: usize = 96;
const _: () = assert!(REPLACE_HEADER == blob::REPLACE_ROOM);
/// `xt_counters_info` before the counters: name, num_counters, padding to 8.
const COUNTERS_HEADER: usize = 40;

/// The table loopguard works in.
pub const FILTER: &str = "filter";

/// A raw socket of one family, the handle for the table socket options.
pub struct XtSocket {
    fd: OwnedFd,
    family: Family,
}

fn level(family: Family) -> libc::c_int {
    match family {
        Family::Ipv6 => libc::IPPROTO_IPV6,
        Family::Ipv4 => libc::IPPROTO_IP,
    }
}

fn name_field(table: &str) -> [u8; NAME_LEN] {
    let mut name = [0u8; NAME_LEN];
    name[..table.len()].copy_from_slice(table.as_bytes());
    name
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The legacy tables the kernel has instantiated for `family` in the calling thread's network
/// namespace. Looking at a table that does not exist would create it (the kernel loads it on
/// first use), so every probe asks this first.
pub fn tables(family: Family) -> Vec<String> {
    let file = match family {
        Family::Ipv6 => "/proc/thread-self/net/ip6_tables_names",
        Family::Ipv4 => "/proc/thread-self/net/ip_tables_names",
    };
    std::fs::read_to_string(file)
        .map(|names| {
            names
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the kernel has instantiated `table` of `family` (see [`tables`]).
pub fn table_exists(family: Family, table: &str) -> bool {
    tables(family).iter().any(|t| t == table)
}

impl XtSocket {
    pub fn open(family: Family) -> io::Result<XtSocket> {
        let domain = match family {
            Family::Ipv6 => libc::AF_INET6,
            Family::Ipv4 => libc::AF_INET,
        };
        // SAFETY: a plain socket(2) call; the descriptor is owned at once.
        let raw = unsafe {
            libc::socket(
                domain,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_RAW,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(XtSocket { fd, family })
    }

    fn getsockopt(&self, option: libc::c_int, buf: &mut [u8]) -> io::Result<usize> {
        let mut len = buf.len() as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes into `buf`, which is that long.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                level(self.family),
                option,
                buf.as_mut_ptr() as *mut libc::c_void,
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(len as usize)
    }

    fn setsockopt(&self, option: libc::c_int, buf: &[u8]) -> io::Result<()> {
        // SAFETY: the kernel reads `buf.len()` bytes from `buf`; pointers inside it (the replace
        // header's counters pointer) point at memory that outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level(self.family),
                option,
                buf.as_ptr() as *const libc::c_void,
                buf.len() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The table's shape: its hooks, entry count and size. Microseconds, whatever its size.
    pub fn info(&self, table: &str) -> io::Result<TableInfo> {
        let mut buf = [0u8; INFO_LEN];
        buf[..NAME_LEN].copy_from_slice(&name_field(table));
        self.getsockopt(SO_GET_INFO, &mut buf)?;
        let mut info = TableInfo {
            valid_hooks: u32_at(&buf, NAME_LEN),
            ..TableInfo::default()
        };
        for h in 0..HOOKS {
            info.hook_entry[h] = u32_at(&buf, NAME_LEN + 4 + 4 * h);
            info.underflow[h] = u32_at(&buf, NAME_LEN + 4 + 4 * HOOKS + 4 * h);
        }
        info.num_entries = u32_at(&buf, NAME_LEN + 4 + 8 * HOOKS);
        info.size = u32_at(&buf, NAME_LEN + 8 + 8 * HOOKS);
        Ok(info)
    }

    /// The whole table. Retries while it changes between the two calls (the kernel refuses a
    /// size that is no longer the table's). The entries stay where the kernel wrote them, behind
    /// the request's header: a large table is megabytes, and every copy of it costs time.
    pub fn read(&self, table: &str) -> io::Result<Table> {
        for _ in 0..5 {
            let info = self.info(table)?;
            // Zeroed by the allocator (fresh pages from the system): no pass over the buffer
            // before the kernel fills it.
            let mut buf = vec![0u8; GET_ENTRIES_HEADER + info.size as usize];
            buf[..NAME_LEN].copy_from_slice(&name_field(table));
            buf[NAME_LEN..NAME_LEN + 4].copy_from_slice(&info.size.to_ne_bytes());
            match self.getsockopt(SO_GET_ENTRIES, &mut buf) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
                Err(e) => return Err(e),
            }
            // The entries are those of the table `info` described only if it did not change
            // in between; the kernel checks the size, and we the rest.
            if self.info(table)? != info {
                continue;
            }
            return Table::parse_behind(self.family, info, buf, GET_ENTRIES_HEADER)
                .map_err(|e| io::Error::other(e.0));
        }
        Err(io::Error::other(format!(
            "the {table} table kept changing while being read"
        )))
    }

    /// Replaces the table with `new`, atomically; `old_entries` is the number of entries of the
    /// table it replaces (the kernel refuses with EAGAIN when that is no longer so). Returns the
    /// old entries' counters. An edit made by [`Table::insert`] or [`Table::delete`] is written
    /// from where it was made (its header goes into the room in front of the entries).
    pub fn replace(&self, table: &str, new: &mut Table, old_entries: u32) -> io::Result<Vec<u8>> {
        let mut counters = vec![0u8; old_entries as usize * 16];
        let info = new.info;
        let mut header = [0u8; REPLACE_HEADER];
        header[..NAME_LEN].copy_from_slice(&name_field(table));
        let mut at = NAME_LEN;
        for value in [info.valid_hooks, info.num_entries, info.size]
            .into_iter()
            .chain(info.hook_entry)
            .chain(info.underflow)
            .chain([old_entries])
        {
            header[at..at + 4].copy_from_slice(&value.to_ne_bytes());
            at += 4;
        }
        let pointer = counters.as_mut_ptr() as u64;
        header[88..96].copy_from_slice(&pointer.to_ne_bytes());
        match new.with_header_room(REPLACE_HEADER) {
            Some(buf) => {
                buf[..REPLACE_HEADER].copy_from_slice(&header);
                self.setsockopt(SO_SET_REPLACE, buf)?;
            }
            None => {
                let buf = [&header[..], new.blob()].concat();
                self.setsockopt(SO_SET_REPLACE, &buf)?;
            }
        }
        Ok(counters)
    }

    /// Adds `counters` (16 bytes per entry of the current table) to the table's counters.
    pub fn add_counters(&self, table: &str, counters: &[u8]) -> io::Result<()> {
        let mut buf = vec![0u8; COUNTERS_HEADER + counters.len()];
        buf[..NAME_LEN].copy_from_slice(&name_field(table));
        buf[NAME_LEN..NAME_LEN + 4].copy_from_slice(&((counters.len() / 16) as u32).to_ne_bytes());
        buf[COUNTERS_HEADER..].copy_from_slice(counters);
        self.setsockopt(SO_SET_ADD_COUNTERS, &buf)
    }
}

/// The lines of INPUT and OUTPUT, as `-S` prints them, for the entries of one table.
pub type Listings = [(Chain, Vec<String>); 2];

/// What loopguard knows about the legacy tables of the namespace it runs in: which kernel entry
/// is which `-S` line, and the shape of each table when it last read it.
#[derive(Debug, Default)]
pub struct Legacy {
    /// (family, chain, entry fingerprint) → the line `-S` prints for it (marked
    /// [`LOOK_ALIKE`] where it prints as one of loopguard's rules but is another entry).
    lines: HashMap<(Family, Chain, Vec<u8>), String>,
    /// The filter table's shape when loopguard last read it, per family.
    pub seen: HashMap<Family, TableInfo>,
    /// Counts the reads (and in-process writes) that set `seen`.
    pub generation: u64,
    /// Reads and edits done in process (for tests and benchmarks: which path ran).
    pub reads: u64,
    pub writes: u64,
}

/// How an in-process edit ended.
#[derive(Debug)]
pub enum Applied {
    /// Written at this moment; INPUT and OUTPUT of the family as the kernel took them: the table
    /// replaced whole, under the xtables lock, and only if it was still the one read (else
    /// `EAGAIN`), so these are the chains as written, with no read after.
    Done(Instant, Listings),
    /// Not possible in process (something unknown, or the chains changed since the plan was made):
    /// use the binaries.
    NotHere(String),
}

impl Legacy {
    /// INPUT and OUTPUT of `table` as lines, if every entry in them is known.
    fn lines_of(&self, table: &Table) -> Option<Listings> {
        let starts = table.chain_starts();
        let listing = |chain: Chain| -> Option<Vec<String>> {
            table
                .chain(chain)
                .iter()
                .map(|&e| {
                    let key = (table.family, chain, table.fingerprint_in(e, &starts));
                    self.lines.get(&key).cloned()
                })
                .collect()
        };
        Some([
            (Chain::Input, listing(Chain::Input)?),
            (Chain::Output, listing(Chain::Output)?),
        ])
    }

    /// INPUT and OUTPUT of `table` as lines, learning on the way the lines of the entries it has
    /// not seen that [`decode::line`] covers (loopguard's own entries among them); `None` when an
    /// entry is neither known nor covered. An entry that prints as one of loopguard's rules
    /// without being its entry is marked [`LOOK_ALIKE`], as [`Legacy::learn`] does. One
    /// fingerprint and one look-up per entry: INPUT may hold thousands.
    fn decode(&mut self, table: &Table) -> Option<Listings> {
        use std::collections::hash_map::Entry as Slot;
        let starts = table.chain_starts();
        let mut complete = true;
        let listings = Chain::ALL.map(|chain| {
            let entries = table.chain(chain);
            let mut rules = Vec::with_capacity(entries.len());
            for &e in entries {
                let key = (table.family, chain, table.fingerprint_in(e, &starts));
                match self.lines.entry(key) {
                    Slot::Occupied(known) => rules.push(known.get().clone()),
                    Slot::Vacant(slot) => match decode::line(table, e, &starts) {
                        Some(mut line) => {
                            if look_alike(table, e, table.family, chain, &line) {
                                line.insert_str(0, LOOK_ALIKE);
                            }
                            rules.push(slot.insert(line).clone());
                        }
                        None => complete = false,
                    },
                }
            }
            (chain, rules)
        });
        self.bound();
        complete.then_some(listings)
    }

    /// Bounded: a node whose foreign rules keep changing must not grow the lines forever.
    fn bound(&mut self) {
        if self.lines.len() > 100_000 {
            self.lines.clear();
        }
    }

    /// Reads INPUT and OUTPUT of `families` from the kernel, without a process, if every entry is
    /// one it has learnt or can decode. `Ok(None)`: read them with the binaries (and [`Legacy::learn`]).
    pub fn read(&mut self, families: &[Family]) -> io::Result<Option<Tables>> {
        Ok(self.read_tables(families)?.map(|(tables, _read)| tables))
    }

    /// [`Legacy::read`] for a change: the xtables lock is taken first and kept in the returned
    /// [`Held`], with the tables as read, so that [`Legacy::apply`] edits exactly what the plan
    /// was made from and no other iptables user writes in between. `Ok(None)`: nothing held (read
    /// with the binaries, which take the lock themselves).
    pub fn read_for_change(
        &mut self,
        families: &[Family],
        lock_path: &Path,
        wait: Duration,
    ) -> io::Result<Option<(Tables, Held)>> {
        if families.iter().any(|&f| !table_exists(f, FILTER)) {
            return Ok(None);
        }
        let Some(lock) = super::lock::xtables_lock(lock_path, wait) else {
            return Err(lock_timeout(lock_path, wait));
        };
        Ok(self
            .read_tables(families)?
            .map(|(tables, read)| (tables, Held { _lock: lock, read })))
    }

    fn read_tables(&mut self, families: &[Family]) -> io::Result<Option<(Tables, Vec<Table>)>> {
        let mut tables = Tables::default();
        let mut read = Vec::new();
        for &family in families {
            if !table_exists(family, FILTER) {
                return Ok(None);
            }
            let table = XtSocket::open(family)?.read(FILTER)?;
            let Some(listings) = self.decode(&table) else {
                return Ok(None);
            };
            for (chain, rules) in listings {
                tables.insert(family, chain, ChainListing { rules });
            }
            read.push(table);
        }
        for table in &read {
            self.seen.insert(table.family, table.info);
        }
        self.generation += 1;
        self.reads += 1;
        Ok(Some((tables, read)))
    }

    /// The tables of `families` as the kernel has them now (for [`Legacy::learn`]); `None` where a
    /// table does not exist or cannot be read.
    pub fn snapshot(families: &[Family]) -> Vec<Option<Table>> {
        families
            .iter()
            .map(|&f| {
                table_exists(f, FILTER)
                    .then(|| XtSocket::open(f).and_then(|s| s.read(FILTER)).ok())
                    .flatten()
            })
            .collect()
    }

    /// Learns which entry is which line from `tables` (read with the binaries) and the kernel's
    /// tables before and after that read: only when they are the same table, and every chain has
    /// as many entries as lines. Marks in `tables` the lines that print as one of loopguard's
    /// rules but are another entry ([`LOOK_ALIKE`]). Returns false when a family could not be
    /// learnt (its table changed during the read): its lines are then unmarked.
    pub fn learn(
        &mut self,
        families: &[Family],
        before: &[Option<Table>],
        after: &[Option<Table>],
        tables: &mut Tables,
    ) -> bool {
        let mut learnt = true;
        for ((&family, before), after) in families.iter().zip(before).zip(after) {
            let (Some(before), Some(after)) = (before, after) else {
                // No table before or after the read: nothing to learn, unless it appeared (or
                // went) in between.
                learnt &= before.is_none() && after.is_none();
                continue;
            };
            if before.info != after.info || !same_rules(before, after) {
                learnt = false;
                continue;
            }
            let starts = after.chain_starts();
            for chain in Chain::ALL {
                let entries = after.chain(chain);
                let mut listing = tables.chain(family, chain).clone();
                if entries.len() != listing.rules.len() {
                    tracing::debug!(%family, %chain, entries = entries.len(), lines = listing.rules.len(), "legacy entries and -S lines differ in number; not learning");
                    learnt = false;
                    continue;
                }
                for (&e, line) in entries.iter().zip(listing.rules.iter_mut()) {
                    if look_alike(after, e, family, chain, line) {
                        line.insert_str(0, LOOK_ALIKE);
                    }
                    self.lines.insert(
                        (family, chain, after.fingerprint_in(e, &starts)),
                        line.clone(),
                    );
                }
                tables.insert(family, chain, listing);
            }
            self.seen.insert(family, after.info);
        }
        self.generation += 1;
        self.bound();
        learnt
    }

    /// Applies `plan`'s edits of `family` in process, to the table `held` read (under the lock
    /// it still holds), if every inserted rule is one whose entry is known.
    pub fn apply(&mut self, family: Family, plan: &RulePlan, held: &Held) -> io::Result<Applied> {
        let Some(table) = held.read.iter().find(|t| t.family == family) else {
            return Ok(Applied::NotHere(format!(
                "{family} was not read in process"
            )));
        };
        let Some(listings) = self.lines_of(table) else {
            return Ok(Applied::NotHere("an entry loopguard has not seen".into()));
        };
        let mut lines: HashMap<Chain, Vec<String>> = listings.into_iter().collect();
        let mut edited: Option<Table> = None;
        let mut map: Vec<Option<u32>> = (0..table.info.num_entries).map(Some).collect();
        for edit in plan.edits.iter().filter(|e| e.family == family) {
            let chain_lines = lines.get_mut(&edit.chain).expect("both chains");
            // Listings hold rules as `-S` prints them after `-A CHAIN`.
            let spec = edit.target.spec();
            // The first edit copies the table read; the next ones edit that copy in place.
            let current = edited.as_ref().unwrap_or(table);
            let result = match edit.kind {
                EditKind::Insert(_) | EditKind::Append => {
                    let position = match edit.kind {
                        EditKind::Insert(n) => n.saturating_sub(1).min(chain_lines.len()),
                        _ => chain_lines.len(),
                    };
                    // The entry ip6tables-legacy writes for the rule, never one that only
                    // prints like it.
                    let bytes = blob::rule_entry(edit.target);
                    self.lines
                        .insert((family, edit.chain, bytes.clone()), spec.clone());
                    chain_lines.insert(position, spec);
                    match edited.take() {
                        Some(previous) => previous.insert_in_place(edit.chain, position, &bytes),
                        None => table.insert_unchecked(edit.chain, position, &bytes),
                    }
                }
                EditKind::Delete => {
                    // As `ip6tables -D` does: the first entry that is the rule's, whatever
                    // else prints like it.
                    let bytes = blob::rule_entry(edit.target);
                    let Some(position) = current.position_of(edit.chain, &bytes) else {
                        return Ok(Applied::NotHere(format!("{} is not there", edit.rule)));
                    };
                    if chain_lines.get(position) != Some(&spec) {
                        return Ok(Applied::NotHere(format!(
                            "the entry of {} is not listed as it",
                            edit.rule
                        )));
                    }
                    chain_lines.remove(position);
                    match edited.take() {
                        Some(previous) => previous.delete_in_place(edit.chain, position),
                        None => table.delete_unchecked(edit.chain, position),
                    }
                }
            };
            let (next, step) = match result {
                Ok(done) => done,
                Err(e) => return Ok(Applied::NotHere(e.0)),
            };
            map = step
                .iter()
                .map(|old| old.and_then(|o| map[o as usize]))
                .collect();
            edited = Some(next);
        }
        let Some(mut edited) = edited else {
            return Ok(Applied::NotHere(format!("no {family} edits")));
        };
        // The edits as a whole: every entry kept is the rule it was, every jump to its chain.
        if let Err(e) = table.check_edit(&edited, &map) {
            return Ok(Applied::NotHere(e.0));
        }
        let socket = XtSocket::open(family)?;
        let old_counters = match socket.replace(FILTER, &mut edited, table.info.num_entries) {
            Ok(counters) => counters,
            // The table is not the one read (a writer that ignores the lock): the binaries,
            // and the verifying read after them, take it from here.
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                return Ok(Applied::NotHere("the table changed while writing".into()));
            }
            Err(e) => return Err(e),
        };
        let applied = Instant::now();
        self.writes += 1;
        // What the probe compares with is the table as written (there is no read after it).
        self.seen.insert(family, edited.info);
        self.generation += 1;
        let counters = Table::carried_counters(&map, &old_counters);
        if let Err(e) = socket.add_counters(FILTER, &counters) {
            tracing::warn!(error = %e, "rules written; carrying the packet counters over failed");
        }
        let listings = [Chain::Input, Chain::Output].map(|chain| {
            let rules = lines.remove(&chain).expect("both chains");
            (chain, rules)
        });
        Ok(Applied::Done(applied, listings))
    }
}

/// Allocations of a megabyte or more (a legacy table's copies: 10 MB at 50,000 rules) come
/// straight from the system and go back to it when freed: zeroed pages without a pass over them,
/// and nothing of a table kept resident between passes. glibc's default moves that threshold up
/// to the largest block freed, after which table buffers come from the heap: zeroed by hand on
/// every read and held there after it. For the processes that read tables (node commands, agent).
pub fn big_buffers_from_the_system() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; called before any table is read.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Returns the heap's free memory to the system. A pass over a large legacy table allocates and
/// frees copies of it (10 MB at 50,000 rules); glibc keeps freed memory of that size for reuse,
/// which would leave an idle watcher holding it between passes.
pub fn release_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory of the allocator's own.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The xtables lock and the tables read under it, for one change (released on drop).
pub struct Held {
    _lock: Option<FileLock>,
    read: Vec<Table>,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("tables", &self.read.len())
            .finish()
    }
}

fn lock_timeout(path: &Path, wait: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "another program held the xtables lock {} for {}s",
            path.display(),
            wait.as_secs().max(1)
        ),
    )
}

/// Whether entry `e` of `chain` prints as `line`, one of loopguard's rules, without being the
/// entry ip6tables writes for it.
fn look_alike(table: &Table, e: blob::Entry, family: Family, chain: Chain, line: &str) -> bool {
    let Some(rule) = Rule::baseline(family)
        .into_iter()
        .find(|r| r.chain() == chain && r.spec() == line)
    else {
        return false;
    };
    table.portable(e) != Some(blob::rule_entry(rule))
}

/// Whether two reads of a table hold the same rules (counters aside).
fn same_rules(a: &Table, b: &Table) -> bool {
    let (sa, sb) = (a.chain_starts(), b.chain_starts());
    a.entries().len() == b.entries().len()
        && a.entries()
            .iter()
            .zip(b.entries())
            .all(|(&x, &y)| a.fingerprint_in(x, &sa) == b.fingerprint_in(y, &sb))
}

/// The legacy drift probe: polls the filter tables' shapes ([`XtSocket::info`]) of the families
/// loopguard enforces, and says when one differs from what loopguard last read.
pub struct Probe {
    sockets: Vec<(Family, XtSocket)>,
}

impl Probe {
    /// Sockets for `families` (only those whose legacy filter table exists: probing must never
    /// create one).
    pub fn new(families: &[Family]) -> Probe {
        let sockets = families
            .iter()
            .filter(|&&f| table_exists(f, FILTER))
            .filter_map(|&f| XtSocket::open(f).ok().map(|s| (f, s)))
            .collect();
        Probe { sockets }
    }

    /// How many families are probed.
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    /// Whether no family is probed.
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// Each probed table's shape now (tables that cannot be asked are left out). No allocation:
    /// the probe runs every few milliseconds for the life of the agent.
    pub fn shapes(&self) -> impl Iterator<Item = (Family, TableInfo)> + '_ {
        self.sockets
            .iter()
            .filter_map(|(family, socket)| socket.info(FILTER).ok().map(|now| (*family, now)))
    }
}
