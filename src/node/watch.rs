//! Drift detection: nftables netlink events (nft backend); for the legacy backend, whose kernel
//! interface has no events, the xtables lock's use by other programs, at once (see
//! `node::lock_events`), and every 100 ms a probe of the tables' shape (see `node::legacy`); and
//! a periodic full re-check (both).

use super::converge::Convergence;
use super::engine::{Engine, Report, reason};
use super::iptables::Backend;
use super::legacy::{Legacy, Probe};
use super::lock_events::LockEvents;
use crate::Result;
use crate::rules::Family;
use crate::rules::blob::TableInfo;
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;

/// A subscription to the nftables ruleset change notifications (group `NFNLGRP_NFTABLES`) of the
/// network namespace the calling thread is in.
pub struct NftEvents {
    fd: AsyncFd<OwnedFd>,
}

impl NftEvents {
    pub fn subscribe() -> std::io::Result<NftEvents> {
        let fd = super::nft::subscribe()?;
        // SAFETY: `fd` is a socket this process just opened and owns; the AsyncFd takes it and is
        // the only one to use or close it.
        let fd = unsafe { AsyncFd::register(fd)? };
        Ok(NftEvents { fd })
    }

    /// Waits until at least one notification arrived, then drains what is queued, and says what
    /// it was: another program's transaction ended (`NFT_MSG_NEWGEN`, sent once per committed
    /// ruleset change), with the process that committed the last one as the kernel names it; only
    /// loopguard's own transactions ended (already verified by the read that follows each write:
    /// nothing to look at); or messages of a transaction whose end is still to come. A receive
    /// buffer overflow (ENOBUFS) means events were lost: a change by nobody known.
    pub async fn changed(&self) -> std::io::Result<Change> {
        loop {
            let mut guard = self.fd.readable().await?;
            match self.drain() {
                Ok(Drained { datagrams: 0, .. }) => guard.clear_ready(),
                Ok(drained) if drained.foreign => return Ok(Change::Foreign(drained.writer)),
                Ok(drained) if drained.own => return Ok(Change::Own),
                Ok(_) => return Ok(Change::Partial),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    return Ok(Change::Foreign(None));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads every queued message without waiting.
    fn drain(&self) -> std::io::Result<Drained> {
        let mut buf = [0u8; 16 * 1024];
        let mut drained = Drained::default();
        drained.datagrams = super::nft::drain(self.fd.get_ref(), &mut buf, |datagram| {
            if let Some(ends) = transaction_ends(datagram) {
                drained.own |= ends.own;
                drained.foreign |= ends.foreign;
                drained.writer = ends.writer.or(drained.writer);
            }
        })?;
        Ok(drained)
    }
}

#[derive(Default)]
struct Drained {
    datagrams: usize,
    /// One of loopguard's own transactions ended.
    own: bool,
    /// Another program's transaction ended.
    foreign: bool,
    /// Who committed the last of those, when the kernel named it.
    writer: Option<Writer>,
}

/// What a batch of nftables notifications held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Another program's transaction ended; who committed the last one, when named.
    Foreign(Option<Writer>),
    /// Only loopguard's own transactions ended.
    Own,
    /// Messages of a transaction that has not ended yet.
    Partial,
}

/// The process that committed an nftables transaction, from its `NFT_MSG_NEWGEN`
/// (`NFTA_GEN_PROC_PID`, `NFTA_GEN_PROC_NAME`: the pid as the node sees it, the command name
/// cut to 15 bytes as the kernel keeps it).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Writer {
    pub pid: u32,
    name: [u8; 16],
}

impl Writer {
    pub fn new(pid: u32, name: &str) -> Writer {
        let mut bytes = [0u8; 16];
        let cut = name.len().min(15);
        bytes[..cut].copy_from_slice(&name.as_bytes()[..cut]);
        Writer { pid, name: bytes }
    }

    pub fn name(&self) -> String {
        let end = self.name.iter().position(|b| *b == 0).unwrap_or(16);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

impl std::fmt::Display for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (pid {})", self.name(), self.pid)
    }
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

/// `(NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN`: the message that closes every committed
/// nftables transaction.
const NFT_NEWGEN: u16 = (10 << 8) | 15;

/// The ruleset generations of loopguard's own writes, so that its own transactions are never
/// taken for drift nor named as the change a repair undid. Only a write that is the one
/// transaction between the generation read before it and the one read after it is recorded:
/// where another program committed in between, both count as another program's (a pass looks).
/// The last 64 are kept.
static OWN_GENERATIONS: std::sync::Mutex<std::collections::VecDeque<u32>> =
    std::sync::Mutex::new(std::collections::VecDeque::new());

/// Runs `write`, one of loopguard's own ruleset writes that commits `transactions` nftables
/// transactions (a `*-restore`, a netlink batch: one), and records their generations. A write that
/// failed committed nothing: the transaction in between, if any, was someone else's.
pub fn own_write<T, E>(transactions: u32, write: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
    let before = super::nft::generation().ok();
    let result = write();
    if let (Some(before), Ok(after), true) = (before, super::nft::generation(), result.is_ok())
        && after.wrapping_sub(before) == transactions
    {
        let mut own = OWN_GENERATIONS.lock().expect("own generations lock");
        for generation in (1..=transactions).map(|n| before.wrapping_add(n)) {
            if own.len() == 64 {
                own.pop_front();
            }
            own.push_back(generation);
        }
    }
    result
}

fn is_own_generation(generation: u32) -> bool {
    OWN_GENERATIONS
        .lock()
        .expect("own generations lock")
        .contains(&generation)
}

/// The transactions a datagram ends.
#[derive(Debug, PartialEq, Eq)]
struct Ends {
    own: bool,
    foreign: bool,
    /// The writer of the last transaction not loopguard's own, when the kernel named it.
    writer: Option<Writer>,
}

/// The NEWGEN messages of a netlink datagram (walking the `nlmsghdr` chain), if it holds any.
fn transaction_ends(buf: &[u8]) -> Option<Ends> {
    ends_by(buf, is_own_generation)
}

fn ends_by(mut buf: &[u8], own: impl Fn(u32) -> bool) -> Option<Ends> {
    const HEADER: usize = 16;
    // nlmsghdr, then the nfgenmsg (4 bytes), then the attributes.
    const ATTRS: usize = HEADER + 4;
    const NFTA_GEN_ID: u16 = 1;
    const NFTA_GEN_PROC_PID: u16 = 2;
    const NFTA_GEN_PROC_NAME: u16 = 3;
    let mut found: Option<Ends> = None;
    while buf.len() >= HEADER {
        let len = u32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(buf[4..6].try_into().expect("2 bytes"));
        let message = &buf[..len.min(buf.len())];
        if kind == NFT_NEWGEN {
            let (mut generation, mut pid, mut name) = (None, None, None);
            let mut at = ATTRS;
            while at + 4 <= message.len() {
                let attr_len = u16::from_ne_bytes([message[at], message[at + 1]]) as usize;
                let attr_type = u16::from_ne_bytes([message[at + 2], message[at + 3]]) & 0x3fff;
                if attr_len < 4 || at + attr_len > message.len() {
                    break;
                }
                let value = &message[at + 4..at + attr_len];
                match attr_type {
                    NFTA_GEN_ID if value.len() >= 4 => {
                        generation =
                            Some(u32::from_be_bytes(value[..4].try_into().expect("4 bytes")));
                    }
                    NFTA_GEN_PROC_PID if value.len() >= 4 => {
                        pid = Some(u32::from_be_bytes(value[..4].try_into().expect("4 bytes")));
                    }
                    NFTA_GEN_PROC_NAME => {
                        let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
                        name = Some(String::from_utf8_lossy(&value[..end]).into_owned());
                    }
                    _ => {}
                }
                at += (attr_len + 3) & !3;
            }
            let ends = found.get_or_insert(Ends {
                own: false,
                foreign: false,
                writer: None,
            });
            if generation.is_some_and(&own) {
                ends.own = true;
            } else {
                ends.foreign = true;
                ends.writer = match (pid, name) {
                    (Some(pid), Some(name)) => Some(Writer::new(pid, &name)),
                    _ => None,
                };
            }
        }
        let aligned = (len + 3) & !3;
        if len < HEADER || aligned > buf.len() {
            break;
        }
        buf = &buf[aligned..];
    }
    found
}

/// Why the engine should look again.
#[derive(Clone, Copy, Debug)]
pub enum Trigger {
    /// The first pass, when the watch starts: what it writes is enforcement, not a repair.
    Start { at: Instant },
    /// The ruleset changed (nft event); `at` is when the first event of the burst arrived, `by`
    /// the process that committed the last transaction, when the kernel named it.
    Changed { at: Instant, by: Option<Writer> },
    /// A legacy table's shape changed (the probe); `at` is when the probe saw it.
    Probed { at: Instant },
    /// The periodic full re-check (and, with the legacy backend, the poll).
    Resync { at: Instant },
    /// A repair held back while repairs kept being undone is due.
    Retry { at: Instant },
    /// The read right after loopguard's own write found the rules not in place: someone changed
    /// the chains at that moment, and no probe may see it again (its baseline is that read).
    Undone { at: Instant },
}

impl Trigger {
    pub fn at(self) -> Instant {
        match self {
            Trigger::Start { at }
            | Trigger::Changed { at, .. }
            | Trigger::Probed { at }
            | Trigger::Resync { at }
            | Trigger::Retry { at }
            | Trigger::Undone { at } => at,
        }
    }

    /// The trigger as a metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Trigger::Start { .. } => "start",
            Trigger::Changed { .. } => "nft_event",
            Trigger::Probed { .. } => "legacy_probe",
            Trigger::Resync { .. } => "resync",
            Trigger::Retry { .. } => "retry",
            Trigger::Undone { .. } => "after_own_write",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Trigger::Start { .. } => "start",
            Trigger::Changed { .. } => "nft event",
            Trigger::Probed { .. } => "legacy table change",
            Trigger::Resync { .. } => "periodic re-check",
            Trigger::Retry { .. } => "retry after backing off",
            Trigger::Undone { .. } => "change right after loopguard's write",
        }
    }
}

/// How often the legacy probe looks at the tables' shape (a `GET_INFO` per table: microseconds).
/// Programs that take the xtables lock (every iptables binary, kube-proxy, CNI plugins) wake the
/// watch at once by closing the lock file; the shape is for those that do not. Each tick is a
/// thread wake-up, which costs far more than its syscalls (about 60 µs of CPU on a 2-core VM):
/// at 100 ms the probe is under 0.1 % of a core, at 25 ms it was a quarter of a percent.
pub const LEGACY_PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// The legacy probe, on a thread of its own (in the namespace the process is in): asleep in
/// `poll` on the xtables lock's inotify watch, it wakes the watch when another program closes the
/// lock file, and every [`LEGACY_PROBE_INTERVAL`] asks the tables' shapes, waking the watch only
/// when one is new. No async wake-ups while nothing changes.
struct LegacyWatch {
    changed: Arc<tokio::sync::Notify>,
    stop: Arc<AtomicBool>,
}

impl LegacyWatch {
    /// Starts the probe; it also listens to the xtables lock at `lock_path` (see
    /// `node::lock_events`), which catches what the shape cannot show.
    fn new(cache: Arc<Mutex<Legacy>>, lock_path: &Path) -> LegacyWatch {
        let changed = Arc::new(tokio::sync::Notify::new());
        let stop = Arc::new(AtomicBool::new(false));
        let (wake, stopped) = (changed.clone(), stop.clone());
        let mut lock = match LockEvents::watch(lock_path, super::lock::own_closes) {
            Ok(events) => Some(events),
            Err(e) => {
                tracing::warn!(path = %lock_path.display(), error = %e, "cannot watch the xtables lock; a rule replaced by one of the same size is found at the periodic re-check");
                None
            }
        };
        let spawned = std::thread::Builder::new()
            .name("legacy-probe".into())
            .spawn(move || {
                let mut probe = ShapeProbe {
                    cache,
                    probe: Probe::new(&[]),
                    reported: HashMap::new(),
                };
                let mut next_probe = Instant::now() + LEGACY_PROBE_INTERVAL;
                while !stopped.load(Ordering::Relaxed) {
                    // Asleep until the shapes are due, or until a close of the lock file: another
                    // program's use wakes the watch at once (the program is done with the lock
                    // then, so the watch's read does not wait for it).
                    let wait = next_probe.saturating_duration_since(Instant::now());
                    let closed = match lock.as_ref() {
                        Some(lock) => lock.wait(wait),
                        None => {
                            std::thread::sleep(wait);
                            false
                        }
                    };
                    let used = closed && lock.as_mut().is_some_and(LockEvents::foreign_use);
                    let due = Instant::now() >= next_probe;
                    if due {
                        next_probe = Instant::now() + LEGACY_PROBE_INTERVAL;
                    }
                    if used | (due && probe.changed()) {
                        wake.notify_one();
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the legacy probe; relying on the periodic re-check");
        }
        LegacyWatch { changed, stop }
    }
}

impl Drop for LegacyWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What the probe thread compares: the shapes the engine last read.
struct ShapeProbe {
    cache: Arc<Mutex<Legacy>>,
    probe: Probe,
    /// The shape the probe last reported, with the engine's read generation then: a shape the
    /// engine could not read (and so did not record) triggers one pass, not one every tick.
    reported: HashMap<Family, (u64, TableInfo)>,
}

impl ShapeProbe {
    /// Whether a table's shape is new: neither what the engine last read nor what was reported.
    fn changed(&mut self) -> bool {
        // Held for the few `GET_INFO`s below (microseconds), not copied: no allocation per tick.
        let cache = match self.cache.try_lock() {
            Ok(cache) => cache,
            // A pass is reading or writing: it will see what there is.
            Err(_) => return false,
        };
        let (seen, generation) = (&cache.seen, cache.generation);
        if self.probe.len() != seen.len() {
            // The engine has read a table the probe does not watch yet (its first read).
            self.probe = Probe::new(&seen.keys().copied().collect::<Vec<_>>());
        }
        let mut changed = false;
        for (family, now) in self.probe.shapes() {
            if seen.get(&family) != Some(&now)
                && self.reported.get(&family) != Some(&(generation, now))
            {
                self.reported.insert(family, (generation, now));
                changed = true;
            }
        }
        changed
    }
}

/// Produces triggers: events (debounced) when the backend has them, the legacy probe, and a
/// periodic resync.
pub struct DriftWatch {
    backend: Backend,
    events: Option<NftEvents>,
    legacy: Option<LegacyWatch>,
    resync: tokio::time::Interval,
    debounce: Duration,
    /// When the first event of a transaction whose end has not been seen yet arrived.
    unfinished: Option<Instant>,
    /// Who committed the last transaction seen (NEWGEN) while a burst is awaited.
    unfinished_by: Option<Writer>,
    /// Set by [`DriftWatch::look_again`]: the next call returns at once.
    again: Option<Instant>,
}

impl DriftWatch {
    /// For the nft backend, subscribes to events (falling back to the periodic re-check, with a
    /// warning, when the kernel refuses the subscription); for the legacy backend, lets the
    /// engine keep the tables and probes their shape. Re-checks every `resync` in any case.
    pub fn new(engine: &mut Engine, resync: Duration) -> DriftWatch {
        let backend = engine.facts().backend;
        let nft_rules = engine.keep_nft_rules();
        if backend == Backend::Nft {
            // A read after a rule was deleted takes the last one without it (see
            // `NftRules::follow`): no dump of long chains per repair.
            nft_rules.lock().expect("nft rules lock").follow();
        }
        let (events, legacy) = match backend {
            Backend::Legacy => {
                let cache = engine.keep_legacy_tables();
                let legacy = LegacyWatch::new(cache, engine.lock_path());
                // loopguard's nftables table lives outside the legacy tables: its events too.
                let events = engine
                    .watches_nftables()
                    .then(|| NftEvents::subscribe().ok())
                    .flatten();
                (events, Some(legacy))
            }
            Backend::Nft => match NftEvents::subscribe() {
                Ok(events) => (Some(events), None),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot subscribe to nftables events; falling back to polling every {resync:?}");
                    (None, None)
                }
            },
        };
        let mut resync = tokio::time::interval_at(tokio::time::Instant::now() + resync, resync);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        DriftWatch {
            backend,
            events,
            legacy,
            resync,
            debounce: Duration::from_millis(20),
            unfinished: None,
            unfinished_by: None,
            again: None,
        }
    }

    /// Makes the next [`DriftWatch::next`] return at once: the pass that just wrote found its
    /// rules gone again (see [`Pass::look_again`]).
    pub fn look_again(&mut self) {
        self.again.get_or_insert_with(Instant::now);
    }

    /// Whether drift arrives as nftables events; otherwise it is polled (the legacy probe every
    /// 100 ms and the lock, or only the periodic re-check where neither works).
    pub fn event_driven(&self) -> bool {
        // On legacy the iptables rules are probed; events there are nftables' only.
        self.events.is_some() && self.legacy.is_none()
    }

    /// The backend this watch listens to (it must be made anew when the node's changes).
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The next reason to look again: a change, the periodic re-check, or `retry_at`.
    ///
    /// Cancel-safe, as `select!` in the agent needs: a change seen before the end of its
    /// transaction is kept in `self` while the rest is awaited, so dropping this future during
    /// that wait loses nothing; the next call finishes the wait and returns the change.
    pub async fn next(&mut self, retry_at: Option<Instant>) -> Trigger {
        let Some(at) = retry_at else {
            return self.next_change().await;
        };
        tokio::select! {
            trigger = self.next_change() => trigger,
            _ = tokio::time::sleep_until(at.into()) => Trigger::Retry { at: Instant::now() },
        }
    }

    async fn next_change(&mut self) -> Trigger {
        if let Some(at) = self.again.take() {
            return Trigger::Undone { at };
        }
        loop {
            if let Some(legacy) = self.legacy.as_ref() {
                let nft = async {
                    match self.events.as_ref() {
                        Some(events) => events.changed().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = self.resync.tick() => return Trigger::Resync { at: Instant::now() },
                    _ = legacy.changed.notified() => return Trigger::Probed { at: Instant::now() },
                    // Any nftables change (a flush, a deleted table): one check, no debounce;
                    // loopguard's own transactions were checked by the read after the write.
                    result = nft => {
                        let by = match result {
                            Ok(Change::Own) => continue,
                            Ok(Change::Foreign(by)) => by,
                            _ => None,
                        };
                        return Trigger::Changed { at: Instant::now(), by };
                    }
                }
            }
            let Some(events) = self.events.as_ref() else {
                self.resync.tick().await;
                return Trigger::Resync { at: Instant::now() };
            };
            if let Some(at) = self.unfinished {
                // Wait for the end of the transaction (its NEWGEN), briefly: one check per change.
                match tokio::time::timeout(self.debounce, events.changed()).await {
                    Ok(Ok(Change::Partial)) => continue,
                    Ok(Ok(Change::Own)) => {
                        // The messages were loopguard's own transaction's.
                        self.unfinished = None;
                        continue;
                    }
                    Ok(Ok(Change::Foreign(by))) => self.unfinished_by = by.or(self.unfinished_by),
                    _ => {}
                }
                self.unfinished = None;
                return Trigger::Changed {
                    at,
                    by: self.unfinished_by.take(),
                };
            }
            tokio::select! {
                _ = self.resync.tick() => return Trigger::Resync { at: Instant::now() },
                result = events.changed() => {
                    let at = Instant::now();
                    match result {
                        Ok(Change::Foreign(by)) => return Trigger::Changed { at, by },
                        Ok(Change::Own) => {}
                        Ok(Change::Partial) => {
                            self.unfinished = Some(at);
                            self.unfinished_by = None;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "nftables event socket failed; relying on the periodic re-check");
                            self.events = None;
                            return Trigger::Changed { at, by: None };
                        }
                    }
                }
            }
        }
    }
}

/// What one pass of the watch loop did.
#[derive(Debug)]
pub struct Pass {
    pub report: Report,
    /// Set when the pass wrote: time from the trigger to the rules being back.
    pub repair_latency: Option<Duration>,
    /// Who changed the ruleset that this pass repaired, when the kernel named the process (the
    /// nftables transaction's NEWGEN): `iptables-nft-re (pid 4242)`.
    pub changed_by: Option<Writer>,
    /// The pass wrote, and the read right after found the rules not in place: look again at
    /// once ([`DriftWatch::look_again`]), as the back-off allows.
    pub look_again: bool,
}

/// Whether a pass brought by `trigger` may write. The first pass for a policy does what the user
/// asked for just now: it is never held back.
fn may_write(convergence: &Convergence, trigger: &Trigger, now: Instant) -> bool {
    matches!(trigger, Trigger::Start { .. }) || convergence.may_write(now)
}

/// Records a pass in `convergence`; returns how long the next write is held back when this one
/// was one too many. The first pass's write is not a repair being undone (applying and deleting
/// policies in a row is no fight), so it is not counted.
fn record(
    convergence: &mut Convergence,
    trigger: &Trigger,
    wrote: bool,
    inserted: &[String],
    now: Instant,
) -> Option<Duration> {
    match (wrote, trigger) {
        (true, Trigger::Start { .. }) => None,
        (true, _) => convergence.wrote(now, inserted),
        (false, _) => {
            convergence.quiet(now);
            None
        }
    }
}

/// Runs one check (audit) or enforce on a blocking thread, and logs a repair with its latency.
/// The periodic re-check first learns the node's facts again (backend, IPv6, packages).
///
/// While repairs keep being undone, `convergence` holds writes back: the pass then only checks,
/// and a node that is not compliant is reported `NotConverging` until the held-back repair is due.
pub async fn run_pass(
    engine: &mut Engine,
    convergence: &mut Convergence,
    audit: bool,
    trigger: Trigger,
) -> Result<Pass> {
    let held_back = !audit && !may_write(convergence, &trigger, Instant::now());
    let mut worker = engine.clone();
    let (worker, report) = tokio::task::spawn_blocking(move || {
        if let Trigger::Resync { .. } = trigger {
            worker.refresh_facts();
        }
        let report = if audit || held_back {
            worker.check()
        } else {
            worker.enforce()
        };
        // A pass on a large legacy table held copies of it: give them back between passes.
        super::legacy::release_memory();
        (worker, report)
    })
    .await
    .expect("engine pass does not panic");
    *engine = worker;
    let mut report = report?;
    let now = Instant::now();
    if let Some(hold) = record(
        convergence,
        &trigger,
        report.wrote(),
        &report.inserted(),
        now,
    ) {
        tracing::warn!(
            kept_changing = %convergence.describe(now),
            backoff_s = hold.as_secs_f64(),
            "not converging: {}",
            convergence.describe(now)
        );
    }
    let look_again = !audit && report.wrote() && report.applicable && !report.compliant;
    if held_back && report.applicable && !report.compliant {
        report.reason = reason::NOT_CONVERGING.into();
        report.message = convergence.describe(now);
    }
    if let Trigger::Start { .. } = trigger {
        if report.wrote() {
            tracing::info!(inserted = ?report.inserted(), "enforced: {}", report.inserted().join(", "));
        }
        return Ok(Pass {
            report,
            repair_latency: None,
            changed_by: None,
            look_again,
        });
    }
    let repair_latency = report
        .applied_at
        .filter(|_| report.wrote())
        .map(|applied| applied.saturating_duration_since(trigger.at()));
    let changed_by = match trigger {
        Trigger::Changed { by, .. } => by.filter(|_| repair_latency.is_some()),
        _ => None,
    };
    if let Some(latency) = repair_latency {
        let by = changed_by
            .map(|w| format!(" (changed by {w})"))
            .unwrap_or_default();
        tracing::info!(
            trigger = trigger.describe(),
            latency_ms = format!("{:.1}", latency.as_secs_f64() * 1000.0),
            repaired = ?report.inserted(),
            changed_by = changed_by.map(|w| w.to_string()),
            "repaired drift: {} back {:.1} ms after the {}{by}",
            report.inserted().join(", "),
            latency.as_secs_f64() * 1000.0,
            trigger.describe(),
        );
    }
    Ok(Pass {
        report,
        repair_latency,
        changed_by,
        look_again,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Policies applied and deleted in a row make one first pass each, every one writing: that
    /// is no fight, and none of them, nor the repair after them, is held back.
    #[test]
    fn first_passes_are_never_held_back_nor_counted_as_a_fight() {
        let mut c = Convergence::default();
        let t0 = Instant::now();
        let drop = vec!["ipv6 -A INPUT -s ::1/128 -j DROP".to_string()];
        for i in 0..10 {
            let now = t0 + Duration::from_millis(300 * i);
            let start = Trigger::Start { at: now };
            assert!(may_write(&c, &start, now), "first pass {i}");
            assert_eq!(record(&mut c, &start, true, &drop, now), None);
        }
        let now = t0 + Duration::from_secs(3);
        let changed = Trigger::Changed { at: now, by: None };
        assert!(may_write(&c, &changed, now));
        assert_eq!(record(&mut c, &changed, true, &drop, now), None);
        assert!(!c.fighting());
    }

    /// Repairs undone again and again still are a fight, and a held-back repair stays held back.
    #[test]
    fn repairs_undone_in_a_row_still_back_off() {
        let mut c = Convergence::default();
        let t0 = Instant::now();
        let drop = vec!["ipv6 -A INPUT -s ::1/128 -j DROP".to_string()];
        let mut held = None;
        for i in 0..4 {
            let now = t0 + Duration::from_millis(100 * i);
            held = record(
                &mut c,
                &Trigger::Changed { at: now, by: None },
                true,
                &drop,
                now,
            );
        }
        assert!(
            held.is_some(),
            "the fourth write within 10 s is one too many"
        );
        let now = t0 + Duration::from_millis(400);
        assert!(!may_write(&c, &Trigger::Changed { at: now, by: None }, now));
        assert!(may_write(&c, &Trigger::Start { at: now }, now));
    }

    fn message(kind: u16, payload: usize) -> Vec<u8> {
        let len = 16 + payload;
        let mut m = Vec::new();
        m.extend((len as u32).to_ne_bytes());
        m.extend(kind.to_ne_bytes());
        m.extend([0u8; 10]);
        m.extend(vec![0u8; payload]);
        m.resize((len + 3) & !3, 0);
        m
    }

    fn foreign(_: u32) -> bool {
        false
    }

    #[test]
    fn newgen_is_found_after_other_messages() {
        let newrule = (10 << 8) | 6;
        let mut datagram = message(newrule, 37);
        assert_eq!(ends_by(&datagram, foreign), None);
        datagram.extend(message(NFT_NEWGEN, 8));
        assert_eq!(
            ends_by(&datagram, foreign),
            Some(Ends {
                own: false,
                foreign: true,
                writer: None
            }),
            "a NEWGEN without a writer"
        );
        assert_eq!(
            ends_by(&datagram[..10], foreign),
            None,
            "a truncated header is not a message"
        );
    }

    /// A NEWGEN as the kernel sends it: nlmsghdr, nfgenmsg, then the generation, the pid and
    /// the command name (NUL-terminated, padded to 4 bytes).
    fn newgen(generation: u32, pid: u32, name: &str) -> Vec<u8> {
        let mut attrs = Vec::new();
        let mut attr = |kind: u16, value: &[u8]| {
            attrs.extend(((4 + value.len()) as u16).to_ne_bytes());
            attrs.extend(kind.to_ne_bytes());
            attrs.extend(value);
            while attrs.len() % 4 != 0 {
                attrs.push(0);
            }
        };
        attr(1, &generation.to_be_bytes());
        attr(2, &pid.to_be_bytes());
        let mut name = name.as_bytes().to_vec();
        name.push(0);
        attr(3, &name);
        let mut m = message(NFT_NEWGEN, 4);
        m.extend(attrs);
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m
    }

    #[test]
    fn the_writer_of_the_last_transaction_is_named() {
        let mut datagram = newgen(7, 4242, "iptables-nft-re");
        datagram.extend(newgen(8, 77, "nft"));
        let writer = ends_by(&datagram, foreign).unwrap().writer.unwrap();
        assert_eq!(writer.to_string(), "nft (pid 77)");
        let one = ends_by(&newgen(9, 4242, "iptables-nft-re"), foreign)
            .unwrap()
            .writer
            .unwrap();
        assert_eq!(one.to_string(), "iptables-nft-re (pid 4242)");
        assert_eq!(
            Writer::new(1, "a-name-longer-than-fifteen").name(),
            "a-name-longer-t"
        );
    }

    #[test]
    fn loopguards_own_transactions_are_neither_drift_nor_named() {
        let ours = |generation: u32| generation == 8;
        // A foreign delete, then loopguard's own restore in the same datagram: the delete's writer.
        let mut datagram = newgen(7, 77, "ip6tables-nft");
        datagram.extend(newgen(8, 4242, "ip6tables-nft-r"));
        let ends = ends_by(&datagram, ours).unwrap();
        assert!(ends.own && ends.foreign);
        assert_eq!(ends.writer.unwrap().to_string(), "ip6tables-nft (pid 77)");
        // Only loopguard's own: nothing to look at, nobody to name.
        assert_eq!(
            ends_by(&newgen(8, 4242, "ip6tables-nft-r"), ours),
            Some(Ends {
                own: true,
                foreign: false,
                writer: None
            })
        );
    }

    /// A write recorded as loopguard's only when it is the one transaction in between (the
    /// namespace of the test has its own generation counter only where it is a new netns; here
    /// the generations are read before and after a write that commits nothing).
    #[test]
    fn a_write_that_commits_nothing_records_nothing() {
        let before = crate::node::nft::generation();
        own_write(1, || Ok::<(), ()>(())).unwrap();
        if let Ok(g) = before {
            assert!(
                !is_own_generation(g.wrapping_add(1)),
                "no transaction, no record"
            );
        }
    }
}
