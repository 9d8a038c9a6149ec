//! The node engine: check, enforce and clean up the baseline on one node, owning only what it adds.

use super::facts::{
    self, Applicability, ApplicabilityMode, BackendChoice, FirewallManager, NodeFacts,
};
use super::families::{self, Action, FamilyOutcome};
use super::iptables::{Backend, Xtables};
use super::legacy::{Applied, Held, Legacy};
use super::nft_rules::{NftApplied, NftHeld, NftRules};
use super::state_file::{State, StateFile};
use crate::rules::catalog::{self, FamilyMode, RuleId, RuleResult, Verdict};
use crate::rules::{
    self, ChainListing, Edit, EditKind, Family, Finding, Ownership, Placement, Rule, RulePlan,
    RuleState, Tables,
};
use crate::{Error, Result};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How the engine behaves; one value per node (the agent changes it when its policy changes).
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub families: Vec<Family>,
    pub applicability: ApplicabilityMode,
    pub placement: Placement,
    pub state_file: PathBuf,
    pub host_root: PathBuf,
    pub backend: BackendChoice,
    /// How long to wait for the xtables lock.
    pub wait: Duration,
    pub lock_path: PathBuf,
    /// The rule families beside iptables: nftables, ufw, firewalld (see `node::families`).
    pub nftables: FamilyMode,
    pub ufw: FamilyMode,
    pub firewalld: FamilyMode,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            families: vec![Family::Ipv6],
            applicability: ApplicabilityMode::Auto,
            placement: Placement::Insert,
            state_file: super::state_file::DEFAULT_PATH.into(),
            host_root: "/".into(),
            backend: BackendChoice::Auto,
            wait: Duration::from_secs(5),
            lock_path: super::iptables::default_lock_path(),
            nftables: FamilyMode::Ignore,
            ufw: FamilyMode::Ignore,
            firewalld: FamilyMode::Ignore,
        }
    }
}

/// A finding plus whether loopguard inserted (a copy of) that rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleReport {
    #[serde(flatten)]
    pub finding: Finding,
    /// True when at least one copy of the rule was inserted by loopguard; false when adopted.
    pub owned: bool,
}

/// Why a report says what it says: one CamelCase word, the same in the CLI's JSON and in the
/// node's LoopbackNodeState.
pub mod reason {
    /// The rules are in place as the scanners require.
    pub const IN_PLACE: &str = "RulesInPlace";
    /// In place as the scanners require, but after a catch-all rule that decides every packet.
    pub const SHADOWED: &str = "Shadowed";
    /// Not in place (see the message for which rule and how).
    pub const NOT_IN_PLACE: &str = "RulesNotInPlace";
    /// The CIS rule does not apply to this node (see the message).
    pub const NOT_APPLICABLE: &str = "RuleNotApplicable";
    /// Repairs keep being undone; loopguard is backing off before the next one.
    pub const NOT_CONVERGING: &str = "NotConverging";
}

/// The outcome of a check, enforce or cleanup: what `--output json` prints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub compliant: bool,
    pub applicable: bool,
    /// One CamelCase word (see [`reason`]).
    pub reason: String,
    /// The verdict in a sentence.
    pub message: String,
    pub backend: Backend,
    pub ipv6_enabled: bool,
    pub firewall_managers: Vec<FirewallManager>,
    pub findings: Vec<RuleReport>,
    /// The edits applied (enforce and cleanup only); empty when nothing was written. With
    /// `dryRun`, the edits that would be applied, none of them written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changes: Option<Vec<Edit>>,
    /// True when this is a plan only: nothing was written, not even the state file.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// Every loopback rule with its ComplianceAsCode and CIS ids, whether it applies and why,
    /// and its verdict.
    pub rules: Vec<RuleResult>,
    /// What was written beside iptables (`create table inet loopguard`, `ufw allow in on lo`);
    /// with `dryRun`, what would be.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub family_changes: Vec<String>,
    /// When the last restore of this run returned: the rules were back from that moment.
    #[serde(skip)]
    pub applied_at: Option<Instant>,
}

impl Report {
    /// The rules that were missing before an enforce re-inserted them.
    pub fn inserted(&self) -> Vec<String> {
        self.changes
            .iter()
            .flatten()
            .filter(|e| e.kind != EditKind::Delete)
            .map(|e| format!("{} {}", e.family, e.rule))
            .chain(self.family_changes.iter().filter_map(|c| {
                if let Some(table) = c.strip_prefix("create ") {
                    Some(format!("nftables {table}"))
                } else if c.starts_with("ufw ") && !c.starts_with("ufw delete") {
                    Some(c.clone())
                } else {
                    None
                }
            }))
            .collect()
    }

    /// Same verdict and findings (what was written aside).
    pub fn same_state(&self, other: &Report) -> bool {
        (
            self.compliant,
            self.applicable,
            &self.reason,
            &self.message,
            &self.findings,
        ) == (
            other.compliant,
            other.applicable,
            &other.reason,
            &other.message,
            &other.findings,
        )
    }

    pub fn wrote(&self) -> bool {
        self.changes.as_ref().is_some_and(|c| !c.is_empty())
            || (!self.dry_run && !self.family_changes.is_empty())
    }
}

/// What a read for a change holds until the plan is applied (see [`Engine::read_for_change`]).
enum Hold {
    /// The xtables lock and the legacy tables read under it.
    Legacy(Held),
    /// The nft ruleset generation and the chains read in it.
    Nft(NftHeld),
}

/// The engine for one node.
#[derive(Clone, Debug)]
pub struct Engine {
    config: EngineConfig,
    facts: NodeFacts,
    state_file: StateFile,
    /// For a long-running watch on the legacy backend: reads and writes through the kernel's
    /// table interface once it knows the entries (see `node::legacy`). Shared by the engine's
    /// clones, so that what one pass learns the next one uses.
    legacy: Option<Arc<Mutex<Legacy>>>,
    /// The same for the nft backend: iptables-nft's chains over netlink (see `node::nft_rules`).
    nft_rules: Option<Arc<Mutex<NftRules>>>,
    /// Backend detection, re-run at each resync only where its inputs changed (shared too).
    detector: Arc<Mutex<facts::Detector>>,
}

impl Engine {
    /// Learns the node's facts and makes sure the backend's binaries are there.
    pub fn new(config: EngineConfig) -> Result<Engine> {
        let engine = Engine::unchecked(config);
        engine
            .xtables()
            .require_binaries(&[Family::Ipv6, Family::Ipv4])?;
        Ok(engine)
    }

    /// Learns the node's facts only: a missing binary shows up as an error of the first pass
    /// (what the agent wants: it reports the problem instead of exiting).
    pub fn unchecked(config: EngineConfig) -> Engine {
        let mut detector = facts::Detector::default();
        let facts = facts::discover_with(&config.host_root, config.backend, &mut detector);
        let state_file = StateFile::new(config.state_file.clone());
        Engine {
            config,
            facts,
            state_file,
            legacy: None,
            nft_rules: None,
            detector: Arc::new(Mutex::new(detector)),
        }
    }

    /// Reads and writes legacy tables in process (see `node::legacy`): INPUT and OUTPUT are
    /// decoded from the kernel's entries where `rules::decode` covers them, learnt from the
    /// binaries otherwise, and a plan is written as one table replace. The commands and the watch
    /// use it; without it (the differential tests' reference) every read and write goes through
    /// the binaries. The returned handle is what the drift watch's probe compares against.
    pub fn keep_legacy_tables(&mut self) -> Arc<Mutex<Legacy>> {
        self.legacy
            .get_or_insert_with(|| Arc::new(Mutex::new(Legacy::default())))
            .clone()
    }

    /// Reads iptables-nft's chains over netlink and writes a plan's inserts as one netlink
    /// transaction (see `node::nft_rules`), on the nft backend; without it every read and write
    /// goes through the binaries (the differential tests' reference).
    pub fn keep_nft_rules(&mut self) -> Arc<Mutex<NftRules>> {
        self.nft_rules
            .get_or_insert_with(|| Arc::new(Mutex::new(NftRules::default())))
            .clone()
    }

    /// Both in-process paths: [`Engine::keep_legacy_tables`] and [`Engine::keep_nft_rules`].
    pub fn in_process(&mut self) {
        self.keep_legacy_tables();
        self.keep_nft_rules();
    }

    /// The nft rules cache, when this engine keeps one and the node is on the nft backend.
    fn nft_cache(&self) -> Option<&Arc<Mutex<NftRules>>> {
        self.nft_rules
            .as_ref()
            .filter(|_| self.facts.backend == Backend::Nft)
    }

    /// The families whose chains a pass reads.
    pub fn families(&self) -> Vec<Family> {
        self.read_families(&self.load_ownership().unwrap_or_default())
    }

    /// Whether the nftables rule family is checked (then nftables events matter on any backend).
    pub fn watches_nftables(&self) -> bool {
        self.config.nftables != FamilyMode::Ignore
    }

    /// The xtables lock file every iptables user opens (the legacy watch listens to it).
    pub fn lock_path(&self) -> &std::path::Path {
        &self.config.lock_path
    }

    pub fn facts(&self) -> &NodeFacts {
        &self.facts
    }

    /// Re-reads the node facts (the periodic full re-check); the backend is detected again only
    /// where what decides it changed.
    pub fn refresh_facts(&mut self) {
        let mut detector = self.detector.lock().expect("detector lock");
        self.facts =
            facts::discover_with(&self.config.host_root, self.config.backend, &mut detector);
    }

    /// How often each part of the backend detection really ran.
    pub fn detections(&self) -> (u64, u64) {
        let detector = self.detector.lock().expect("detector lock");
        (detector.nft_runs, detector.legacy_runs)
    }

    /// The ip6tables/iptables binaries of the detected backend, with the configured lock.
    fn xtables(&self) -> Xtables {
        Xtables::new(
            self.facts.backend,
            self.config.wait,
            self.config.lock_path.clone(),
        )
    }

    /// Changes what the engine enforces from now on (families, applicability, placement).
    pub fn reconfigure(
        &mut self,
        families: Vec<Family>,
        applicability: ApplicabilityMode,
        placement: Placement,
    ) {
        self.config.families = families;
        self.config.applicability = applicability;
        self.config.placement = placement;
    }

    /// Changes what the other rule families do from now on: nftables, ufw, firewalld.
    pub fn set_rule_families(&mut self, modes: [FamilyMode; 3]) {
        [self.config.nftables, self.config.ufw, self.config.firewalld] = modes;
    }

    pub fn applicability(&self) -> Applicability {
        facts::applicability(&self.facts, self.config.applicability)
    }

    /// Reads and evaluates; never writes (not even the state file). An unreadable state file
    /// only costs the `owned` annotations, with a warning.
    pub fn check(&self) -> Result<Report> {
        let mut ownership = match self.load_ownership() {
            Ok(ownership) => ownership,
            Err(e) => {
                tracing::warn!("{e}");
                Ownership::default()
            }
        };
        let families = self.read_families(&ownership);
        let tables = self.read(&families)?;
        ownership.reconcile(&tables, &families);
        let report = self.report(&tables, &ownership, None);
        Ok(self.with_families(report, Action::Check))
    }

    /// Runs the other rule families and composes their results into `report`.
    fn with_families(&self, report: Report, action: Action) -> Report {
        compose(report, self.run_families(action))
    }

    /// Runs the other rule families (nftables, ufw, firewalld).
    fn run_families(&self, action: Action) -> FamilyOutcome {
        let modes = [self.config.nftables, self.config.ufw, self.config.firewalld];
        let ufw = super::ufw::Ufw::new(&self.config.host_root);
        families::run(&self.facts, modes, &self.state_file, &ufw, action)
    }

    /// Makes the node compliant with the smallest plan, in one restore per family; writes nothing
    /// when it already is. Rules owned in families no longer enforced are removed.
    pub fn enforce(&self) -> Result<Report> {
        self.enforce_or_plan(false)
    }

    /// What `enforce` would do, without writing anything (not even the state file).
    pub fn plan_enforce(&self) -> Result<Report> {
        self.enforce_or_plan(true)
    }

    fn enforce_or_plan(&self, dry_run: bool) -> Result<Report> {
        let _lock = (!dry_run)
            .then(|| self.state_file.lock(self.config.wait))
            .transpose()?;
        let action = if dry_run {
            Action::Plan
        } else {
            Action::Enforce
        };
        // The other families first: the nftables repair is one netlink transaction, and it does
        // not wait for the iptables reads. The pass has repaired when its last write is done.
        let outcome = self.run_families(action);
        let families_wrote_at = outcome.applied_at;
        let report = self.enforce_iptables(dry_run)?;
        let mut report = compose(report, outcome);
        report.applied_at = report.applied_at.max(families_wrote_at);
        Ok(report)
    }

    /// The iptables family's enforce (the state lock held by the caller).
    fn enforce_iptables(&self, dry_run: bool) -> Result<Report> {
        let mut ownership = self.load_ownership()?;
        let families = self.read_families(&ownership);
        let (tables, held) = self.read_for_change(&families, dry_run)?;
        let recorded = ownership.clone();
        ownership.reconcile(&tables, &families);

        let mut plan = RulePlan::default();
        if self.applicability().applicable {
            plan = rules::plan_enforce(
                &tables,
                &ownership,
                &self.config.families,
                self.config.placement,
            );
        }
        let dropped: Vec<Family> = ownership
            .families()
            .into_iter()
            .filter(|f| !self.config.families.contains(f))
            .collect();
        plan.extend(rules::plan_cleanup(&tables, &ownership, &dropped));

        if dry_run {
            return Ok(self.planned(&tables, &ownership, plan));
        }
        if plan.is_empty() {
            drop(held);
            if ownership != recorded {
                self.store(&ownership)?;
            }
            return Ok(self.report(&tables, &ownership, Some(Vec::new())));
        }
        self.apply_and_verify(plan, &tables, held, ownership, &families)
    }

    /// Removes exactly the rules loopguard inserted, in every family it owns rules in.
    pub fn cleanup(&self) -> Result<Report> {
        self.cleanup_or_plan(false)
    }

    /// What `cleanup` would remove, without writing anything.
    pub fn plan_cleanup(&self) -> Result<Report> {
        self.cleanup_or_plan(true)
    }

    fn cleanup_or_plan(&self, dry_run: bool) -> Result<Report> {
        let _lock = (!dry_run)
            .then(|| self.state_file.lock(self.config.wait))
            .transpose()?;
        let report = self.cleanup_iptables(dry_run)?;
        if dry_run {
            // What cleanup would delete in nftables: loopguard's table, when it has one.
            return Ok(self.with_families(report, Action::Check));
        }
        Ok(self.with_families(report, Action::Cleanup))
    }

    /// The iptables family's cleanup (the state lock held by the caller).
    fn cleanup_iptables(&self, dry_run: bool) -> Result<Report> {
        let mut ownership = self.load_ownership()?;
        let families = self.read_families(&ownership);
        let (tables, held) = self.read_for_change(&families, dry_run)?;
        ownership.reconcile(&tables, &families);
        let plan = rules::plan_cleanup(&tables, &ownership, &ownership.families());
        if dry_run {
            return Ok(self.planned(&tables, &ownership, plan));
        }
        if plan.is_empty() {
            drop(held);
            self.store(&ownership)?;
            return Ok(self.report(&tables, &ownership, Some(Vec::new())));
        }
        self.apply_and_verify(plan, &tables, held, ownership, &families)
    }

    /// The report of a dry run: the node as it is, and the plan as `changes`.
    fn planned(&self, tables: &Tables, ownership: &Ownership, plan: RulePlan) -> Report {
        let mut report = self.report(tables, ownership, Some(plan.edits));
        report.dry_run = true;
        report
    }

    /// Applies a non-empty plan, then reads the chains again: the report tells what is there now.
    ///
    /// What the plan inserts is stored as pending before the first restore runs, and settled by
    /// the read after it; a process killed in between leaves the intent on record, and the next
    /// run settles it the same way, so loopguard never mistakes its own rules for adopted ones.
    fn apply_and_verify(
        &self,
        plan: RulePlan,
        tables: &Tables,
        held: Option<Hold>,
        mut ownership: Ownership,
        families: &[Family],
    ) -> Result<Report> {
        ownership.expect(&plan, tables);
        self.store(&ownership)?;
        let applied = self.apply(&plan, held, &mut ownership, tables);
        // Written in process, the chains are known as the kernel took them (see
        // `legacy::Applied::Done`); written with the binaries, they are read again.
        let (applied, written) = match applied {
            Ok((at, written)) => (Ok(at), written),
            Err(e) => (Err(e), None),
        };
        let after = match written {
            Some(written) => Ok(written),
            None => self.read(families),
        };
        if let Ok(after) = &after {
            ownership.reconcile(after, families);
        }
        self.store(&ownership)?;
        let applied_at = applied?;
        let after = after?;
        let mut report = self.report(&after, &ownership, Some(plan.edits));
        report.applied_at = Some(applied_at);
        Ok(report)
    }

    /// Reads INPUT and OUTPUT of `families`: in process where the engine keeps the tables
    /// (`node::legacy`, `node::nft_rules`: the lines decoded from the kernel's entries or rules, or
    /// learnt from one listing with the binaries), else with the binaries.
    ///
    /// On the legacy backend every read is held against the kernel's entries, so that a rule that
    /// only prints like one of loopguard's is marked as such (see `rules::LOOK_ALIKE`).
    fn read(&self, families: &[Family]) -> Result<Tables> {
        if self.facts.backend != Backend::Legacy {
            if let Some(cache) = self.nft_cache() {
                let read = cache
                    .lock()
                    .expect("nft rules lock")
                    .read(families, &self.xtables())?;
                if let Some((tables, _)) = read {
                    return Ok(tables);
                }
            }
            return self.xtables().read(families);
        }
        let mut once = Legacy::default();
        let mut kept = self
            .legacy_cache()
            .map(|l| l.lock().expect("legacy cache lock"));
        let legacy = match kept.as_deref_mut() {
            Some(legacy) => {
                match legacy.read(families) {
                    Ok(Some(tables)) => return Ok(tables),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "reading the legacy tables in process failed; reading with the binaries")
                    }
                }
                legacy
            }
            None => &mut once,
        };
        const TRIES: usize = 3;
        for attempt in 1..=TRIES {
            let before = Legacy::snapshot(families);
            let mut tables = self.xtables().read(families)?;
            let after = Legacy::snapshot(families);
            if legacy.learn(families, &before, &after, &mut tables) || attempt == TRIES {
                if attempt == TRIES {
                    tracing::warn!(
                        "the legacy tables kept changing while being read; rules that only print like loopguard's cannot be told apart in this read"
                    );
                }
                return Ok(tables);
            }
        }
        unreachable!("the last attempt returns")
    }

    /// The legacy cache, when this engine keeps one and the node is on the legacy backend.
    fn legacy_cache(&self) -> Option<&Arc<Mutex<Legacy>>> {
        self.legacy
            .as_ref()
            .filter(|_| self.facts.backend == Backend::Legacy)
    }

    /// Reads for an enforce or cleanup. In process, the returned [`Hold`] keeps what the plan is
    /// made from until it is applied: on legacy the xtables lock and the tables read under it, on
    /// nft the ruleset generation (a write bound to it fails if anything changed since);
    /// otherwise as [`Engine::read`].
    fn read_for_change(
        &self,
        families: &[Family],
        dry_run: bool,
    ) -> Result<(Tables, Option<Hold>)> {
        if let (Some(cache), false) = (self.nft_cache(), dry_run) {
            let read = cache
                .lock()
                .expect("nft rules lock")
                .read(families, &self.xtables())?;
            if let Some((tables, held)) = read {
                return Ok((tables, Some(Hold::Nft(held))));
            }
        }
        if let (Some(legacy), false) = (self.legacy_cache(), dry_run) {
            let read = legacy.lock().expect("legacy cache lock").read_for_change(
                families,
                &self.config.lock_path,
                self.config.wait,
            );
            match read {
                Ok(Some((tables, held))) => return Ok((tables, Some(Hold::Legacy(held)))),
                Ok(None) => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    return Err(Error::LockTimeout {
                        path: self.config.lock_path.clone(),
                        seconds: self.config.wait.as_secs().max(1),
                    });
                }
                Err(e) => {
                    tracing::debug!(error = %e, "reading the legacy tables in process failed; reading with the binaries")
                }
            }
        }
        Ok((self.read(families)?, None))
    }

    /// Applies a plan family by family, one transaction each: in process where `held` has the
    /// family's table (read under the xtables lock it still holds), else one restore. A
    /// transaction that fails changed nothing, so its family's pending inserts are dropped.
    /// When every family was written in process, also returns `tables` (what the plan was made
    /// from) with the written chains as the kernel took them.
    fn apply(
        &self,
        plan: &RulePlan,
        held: Option<Hold>,
        ownership: &mut Ownership,
        tables: &Tables,
    ) -> Result<(Instant, Option<Tables>)> {
        // Every write, as the restore input it amounts to: what an admin (or the real-cluster
        // soak) checks names nothing but loopguard's own rules.
        for family in plan.families() {
            let edits: Vec<String> = plan
                .edits
                .iter()
                .filter(|e| e.family == family)
                .map(|e| e.restore_line())
                .collect();
            tracing::info!(%family, ?edits, "writing");
        }
        let mut written = tables.clone();
        let rest = match held {
            Some(Hold::Nft(held)) => {
                if let Some(cache) = self.nft_cache() {
                    // One netlink transaction for every family, as the restores would be one each.
                    let applied = super::watch::own_write(1, || {
                        cache.lock().expect("nft rules lock").apply(plan, &held)
                    });
                    match applied {
                        Ok(NftApplied::Done(chains)) => {
                            for (family, chain, rules) in chains {
                                written.insert(family, chain, ChainListing { rules });
                            }
                            return Ok((Instant::now(), Some(written)));
                        }
                        Ok(NftApplied::NotHere(why)) => {
                            tracing::debug!(why, "applying with the restore binary");
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "writing the nft rules in process failed (nothing changed); applying with the restore binary");
                        }
                    }
                }
                plan.families()
            }
            // The binaries (for what is left) take the xtables lock themselves: `held` goes
            // with this arm.
            Some(Hold::Legacy(held)) => self.apply_legacy(plan, &held, &mut written),
            None => plan.families(),
        };
        if rest.is_empty() {
            return Ok((Instant::now(), Some(written)));
        }
        for family in rest {
            let script = plan
                .restore_script(family)
                .expect("plan has edits for family");
            if let Err(e) = super::watch::own_write(1, || self.xtables().restore(family, &script)) {
                ownership.abandon(family);
                return Err(e);
            }
        }
        Ok((Instant::now(), None))
    }

    /// Writes `plan` family by family through the legacy tables `held` read, into `written`;
    /// returns the families left to the binaries.
    fn apply_legacy(&self, plan: &RulePlan, held: &Held, written: &mut Tables) -> Vec<Family> {
        let Some(legacy) = self.legacy_cache() else {
            return plan.families();
        };
        let mut rest = Vec::new();
        for family in plan.families() {
            match legacy
                .lock()
                .expect("legacy cache lock")
                .apply(family, plan, held)
            {
                Ok(Applied::Done(_, listings)) => {
                    for (chain, rules) in listings {
                        written.insert(family, chain, ChainListing { rules });
                    }
                }
                Ok(Applied::NotHere(why)) => {
                    tracing::debug!(%family, why, "applying with the restore binary");
                    rest.push(family);
                }
                Err(e) => {
                    tracing::warn!(%family, error = %e, "writing the legacy table in process failed (nothing changed); applying with the restore binary");
                    rest.push(family);
                }
            }
        }
        rest
    }

    fn read_families(&self, ownership: &Ownership) -> Vec<Family> {
        rules::distinct(
            self.config
                .families
                .iter()
                .copied()
                .chain(ownership.families()),
        )
    }

    fn load_ownership(&self) -> Result<Ownership> {
        let Some(state) = self.state_file.load()? else {
            return Ok(Ownership::default());
        };
        if state.backend != self.facts.backend && !state.ownership.is_empty() {
            return Err(Error::StateBackendMismatch {
                path: self.state_file.path.clone(),
                recorded: state.backend.to_string(),
                recorded_flag: state.backend.suffix().into(),
                detected: self.facts.backend.to_string(),
            });
        }
        Ok(state.ownership)
    }

    fn store(&self, ownership: &Ownership) -> Result<()> {
        let mut state = State::new(self.facts.backend, ownership.clone());
        // The other families' records stay as they are (see `node::families`).
        if let Some(recorded) = self.state_file.load()? {
            state.nft_table = recorded.nft_table;
            state.ufw_rules = recorded.ufw_rules;
        }
        self.state_file.store(&state)
    }

    fn report(&self, tables: &Tables, ownership: &Ownership, changes: Option<Vec<Edit>>) -> Report {
        let applicability = self.applicability();
        let evaluation = rules::evaluate(tables, &self.config.families);
        let findings: Vec<RuleReport> = evaluation
            .findings
            .into_iter()
            .map(|finding| {
                let owned = Rule::from_save_syntax(finding.family, &finding.rule)
                    .is_some_and(|rule| ownership.owned(rule) > 0);
                RuleReport { finding, owned }
            })
            .collect();
        let compliant = applicability.applicable && evaluation.compliant;
        let (reason, message) = if !applicability.applicable {
            (reason::NOT_APPLICABLE, applicability.reason.clone())
        } else if let (true, Some((family, catch_all))) = (compliant, &evaluation.shadowed_by) {
            (
                reason::SHADOWED,
                format!(
                    "the scanners pass, but in {family} INPUT the catch-all rule `{catch_all}` comes before the loopback pair, so the pair never sees a packet; \
                     with placement Insert loopguard puts its pair on top"
                ),
            )
        } else if compliant {
            (
                reason::IN_PLACE,
                "in INPUT the loopback ACCEPT is immediately followed by the loopback-source DROP, and OUTPUT accepts loopback".into(),
            )
        } else {
            let problems: Vec<String> = findings
                .iter()
                .filter(|f| matches!(f.finding.state, RuleState::Missing | RuleState::Misplaced))
                .map(|f| {
                    format!(
                        "{} {} {}",
                        f.finding.family,
                        f.finding.rule,
                        f.finding.state.as_str()
                    )
                })
                .collect();
            (reason::NOT_IN_PLACE, problems.join("; "))
        };
        Report {
            compliant,
            applicable: applicability.applicable,
            reason: reason.into(),
            message,
            backend: self.facts.backend,
            ipv6_enabled: self.facts.ipv6_enabled,
            firewall_managers: self.facts.firewall_managers.clone(),
            findings,
            changes,
            dry_run: false,
            rules: self.iptables_results(tables, ownership, &applicability),
            family_changes: Vec::new(),
            applied_at: None,
        }
    }

    /// The iptables family's rules: the seed (IPv6), and IPv4 where the policy enforces it.
    fn iptables_results(
        &self,
        tables: &Tables,
        ownership: &Ownership,
        applicability: &Applicability,
    ) -> Vec<RuleResult> {
        [
            (RuleId::Ipv6Loopback, Family::Ipv6),
            (RuleId::Ipv4Loopback, Family::Ipv4),
        ]
        .into_iter()
        .map(|(id, family)| {
            let decided = catalog::Applies {
                applies: Some(applicability.applicable),
                why: applicability.reason.clone(),
            };
            let result = RuleResult::new(id, FamilyMode::Enforce, decided);
            if !self.config.families.contains(&family) {
                let mut result = RuleResult::new(
                    id,
                    FamilyMode::Ignore,
                    catalog::applies(id, &self.facts.host),
                );
                result = result.with(
                    Verdict::Ignored,
                    families::reason::IGNORED,
                    format!("{family} is not in the policy's ipFamilies"),
                );
                return result;
            }
            if !applicability.applicable {
                return result.with(
                    Verdict::NotApplicable,
                    reason::NOT_APPLICABLE,
                    applicability.reason.clone(),
                );
            }
            let evaluation = rules::evaluate(tables, &[family]);
            let owned = Rule::baseline(family)
                .into_iter()
                .any(|rule| ownership.owned(rule) > 0);
            let mut result = if evaluation.compliant {
                result.with(
                    Verdict::Pass,
                    reason::IN_PLACE,
                    "the rules are in place as the scanner reads them",
                )
            } else {
                result.with(
                    Verdict::Fail,
                    reason::NOT_IN_PLACE,
                    "the rules are not in place (see the findings)",
                )
            };
            result.owned = owned;
            result
        })
        .collect()
    }
}

/// Puts the other families' results beside the iptables family's. With every other family
/// ignored the verdict is the iptables family's alone (as before families existed); otherwise the
/// node is compliant when every rule that applies passes, and not applicable when none applies.
fn compose(mut report: Report, outcome: FamilyOutcome) -> Report {
    report.family_changes = outcome.changes;
    let considered: Vec<RuleResult> = outcome
        .results
        .iter()
        .filter(|r| r.mode != FamilyMode::Ignore)
        .cloned()
        .collect();
    report.rules.extend(outcome.results);
    if considered.is_empty() {
        return report;
    }
    let applying = considered.iter().any(|r| r.applies != Some(false));
    let iptables_applicable = report.applicable;
    report.applicable = iptables_applicable || applying;
    let failing: Vec<&RuleResult> = report.rules.iter().filter(|r| r.counts_against()).collect();
    report.compliant = report.applicable && failing.is_empty();
    if !report.applicable {
        let whys: Vec<String> = report
            .rules
            .iter()
            .filter(|r| r.mode != FamilyMode::Ignore)
            .map(|r| format!("{}: {}", r.id, r.why))
            .collect();
        report.message = format!(
            "no loopback rule applies to this node ({})",
            whys.join("; ")
        );
    } else if let Some(first) = failing.first() {
        report.reason = first.reason.clone();
        report.message = failing
            .iter()
            .map(|r| format!("{}: {}", r.id, r.message))
            .collect::<Vec<_>>()
            .join("; ");
    } else if !iptables_applicable {
        report.reason = reason::IN_PLACE.into();
        let passing: Vec<&str> = report
            .rules
            .iter()
            .filter(|r| r.verdict == Verdict::Pass)
            .map(|r| r.id)
            .collect();
        report.message = format!(
            "every loopback rule that applies is in place: {}",
            passing.join(", ")
        );
    }
    report
}
