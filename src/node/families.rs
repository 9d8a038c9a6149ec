//! The rule families beside iptables, for one node pass: each decides whether its rule applies
//! (`rules::catalog`), reads, evaluates with ComplianceAsCode's check, and (nftables, in Enforce
//! mode) writes loopguard's own table. The engine composes them with the iptables family.
//!
//! - nftables: `table inet loopguard`, created in one transaction where the check fails, deleted
//!   by cleanup only when loopguard created it and it holds nothing but loopguard's rules.
//! - ufw: where ufw is active, the four rules of ComplianceAsCode's remediation that `ufw status
//!   verbose` does not show are added with the host's `ufw` (Enforce), each recorded before it is
//!   added; cleanup deletes exactly those. loopguard never enables ufw (its default-deny incoming
//!   policy would cut the kubelet, NodePorts and the CNI); an inactive ufw fails the CIS check,
//!   with the ways out.
//! - firewalld: reported as applying where it is enabled; loopguard never touches `inet firewalld`.

use super::facts::NodeFacts;
use super::nftables;
use super::state_file::{NftTable, State, StateFile};
use super::ufw::Ufw;
use crate::Result;
use crate::rules::catalog::{self, FamilyMode, RuleId, RuleResult, UfwConf, Verdict};
use crate::rules::nft::{self, OwnTable};
use crate::rules::ufw::{self as ufw_rules, UfwRule};

/// What the pass may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Read only.
    Check,
    /// Say what enforce would write, write nothing.
    Plan,
    Enforce,
    Cleanup,
}

/// Reason words of the families' results.
pub mod reason {
    pub use super::super::engine::reason::{IN_PLACE, NOT_APPLICABLE, NOT_IN_PLACE};
    pub const IGNORED: &str = "FamilyIgnored";
    pub const PACKAGES_UNREADABLE: &str = "PackageDatabaseUnreadable";
    pub const FOREIGN_TABLE: &str = "ForeignTable";
    pub const NFT_FAILED: &str = "NftablesUnavailable";
    pub const UFW_INACTIVE: &str = "UfwInactive";
    pub const UFW_FAILED: &str = "UfwUnavailable";
    pub const UFW_CONFIG_UNREADABLE: &str = "UfwConfigUnreadable";
    pub const NOT_CHECKED: &str = "NotChecked";
}

/// One family's pass: its results and what it wrote (or, for a plan, would write).
#[derive(Debug, Default)]
pub struct FamilyOutcome {
    pub results: Vec<RuleResult>,
    /// `nft` statements, in words (`create table inet loopguard`).
    pub changes: Vec<String>,
    /// When the last write of the pass was done.
    pub applied_at: Option<std::time::Instant>,
}

/// Runs the nftables, ufw and firewalld families. Errors of one family are its result, never
/// an error of the pass.
pub fn run(
    facts: &NodeFacts,
    modes: [FamilyMode; 3],
    state: &StateFile,
    host_ufw: &Ufw,
    action: Action,
) -> FamilyOutcome {
    let [nftables, ufw, firewalld] = modes;
    let mut outcome = FamilyOutcome::default();
    nftables_pass(facts, nftables, state, action, &mut outcome);
    ufw_pass(facts, ufw, state, host_ufw, action, &mut outcome);
    for rule in [RuleId::FirewalldTrusted, RuleId::FirewalldRestricted] {
        outcome
            .results
            .push(firewalld_result(facts, firewalld, rule));
    }
    outcome
}

/// The result as far as applicability decides it.
enum Decided {
    /// Final: ignored, not applicable, or it cannot be told.
    Final(RuleResult),
    /// The rule applies: go on checking.
    Applies(RuleResult),
}

fn decided(facts: &NodeFacts, rule: RuleId, mode: FamilyMode) -> Decided {
    let applies = catalog::applies(rule, &facts.host);
    let result = RuleResult::new(rule, mode, applies.clone());
    if mode == FamilyMode::Ignore {
        return Decided::Final(result.with(
            Verdict::Ignored,
            reason::IGNORED,
            format!("the policy leaves {} out", rule.family()),
        ));
    }
    match applies.applies {
        Some(false) => {
            Decided::Final(result.with(Verdict::NotApplicable, reason::NOT_APPLICABLE, applies.why))
        }
        None => {
            Decided::Final(result.with(Verdict::Unknown, reason::PACKAGES_UNREADABLE, applies.why))
        }
        Some(true) => Decided::Applies(result),
    }
}

fn nftables_pass(
    facts: &NodeFacts,
    mode: FamilyMode,
    state: &StateFile,
    action: Action,
    outcome: &mut FamilyOutcome,
) {
    let rule = RuleId::NftablesLoopback;
    // Cleanup removes loopguard's table whatever the mode or the platform says now.
    if action == Action::Cleanup {
        let mut result = RuleResult::new(rule, mode, catalog::applies(rule, &facts.host));
        result = match cleanup_table(facts, state, outcome) {
            Ok(message) => {
                result.why = message.clone();
                result.with(Verdict::NotApplicable, reason::NOT_APPLICABLE, message)
            }
            Err(e) => result.with(Verdict::Unknown, reason::NFT_FAILED, e.to_string()),
        };
        outcome.results.push(result);
        return;
    }
    let result = match decided(facts, rule, mode) {
        Decided::Final(result) => result,
        Decided::Applies(result) => match check_or_enforce(facts, mode, state, action, outcome) {
            Ok((verdict, reason, message, owned)) => {
                let mut result = result.with(verdict, reason, message);
                result.owned = owned;
                result
            }
            Err(e) => result.with(Verdict::Unknown, reason::NFT_FAILED, e.to_string()),
        },
    };
    outcome.results.push(result);
}

type Checked = (Verdict, &'static str, String, bool);

/// How many times a write bound to the generation loopguard read its table in is tried again, the
/// ruleset having changed in between (each try reads the table again).
const STALE_TRIES: usize = 5;

fn check_or_enforce(
    facts: &NodeFacts,
    mode: FamilyMode,
    state: &StateFile,
    action: Action,
    outcome: &mut FamilyOutcome,
) -> Result<Checked> {
    for _ in 0..STALE_TRIES {
        if let Some(checked) = check_or_enforce_once(facts, mode, state, action, outcome)? {
            return Ok(checked);
        }
    }
    Err(stale_error("writing"))
}

fn stale_error(what: &str) -> crate::Error {
    crate::Error::io(
        format!("{what} table inet {}", nft::TABLE),
        std::io::Error::other(format!(
            "the nftables ruleset changed between loopguard reading its table and writing it, {STALE_TRIES} times in a row; nothing was written, the next pass tries again"
        )),
    )
}

/// One try; `None` when the write found the ruleset changed since the table was read.
fn check_or_enforce_once(
    facts: &NodeFacts,
    mode: FamilyMode,
    state: &StateFile,
    action: Action,
    outcome: &mut FamilyOutcome,
) -> Result<Option<Checked>> {
    let ipv6 = facts.ipv6_enabled;
    let recorded = state.load()?.and_then(|s| s.nft_table);
    let (table, generation) = nftables::own_table_at()?;
    let owned = recorded.is_some() && table != OwnTable::Absent;
    let may_replace = match &table {
        OwnTable::Absent => true,
        OwnTable::AsWritten | OwnTable::Partial => recorded.is_some(),
        OwnTable::Other(_) => false,
    };
    // loopguard's table as written is an input-hook chain holding the three rules, so the check
    // passes without listing anything else; and loopguard's own table, drifted, is put back at once
    // (the drift repair), without first listing the other input-hook chains.
    let repair = recorded.is_some()
        && matches!(table, OwnTable::Absent | OwnTable::Partial)
        && mode == FamilyMode::Enforce
        && action == Action::Enforce;
    if table == OwnTable::AsWritten || (!repair && nft::cac_passes(&nftables::ruleset()?, ipv6)) {
        if action == Action::Enforce && recorded == Some(NftTable::Pending) {
            store(facts, state, owned.then_some(NftTable::Owned))?;
        }
        return Ok(Some(passing(owned)));
    }
    if !may_replace {
        let why = match &table {
            OwnTable::Other(why) => why.clone(),
            _ => "loopguard's state file does not record creating it".into(),
        };
        return Ok(Some((
            Verdict::Fail,
            reason::FOREIGN_TABLE,
            format!(
                "a table inet {} exists that loopguard did not write ({why}); loopguard touches nothing in it. \
                 Rename or delete it (`nft delete table inet {}`), or set nftables to Report",
                nft::TABLE,
                nft::TABLE
            ),
            false,
        )));
    }
    let missing = format!(
        "nft list ruleset has no input-hook chain holding `iif \"lo\" accept`, `ip saddr`{}",
        if ipv6 { " and `ip6 saddr`" } else { "" }
    );
    if mode != FamilyMode::Enforce || action == Action::Check {
        return Ok(Some((Verdict::Fail, reason::NOT_IN_PLACE, missing, owned)));
    }
    outcome
        .changes
        .push(format!("create table inet {}", nft::TABLE));
    if action == Action::Plan {
        return Ok(Some((Verdict::Fail, reason::NOT_IN_PLACE, missing, owned)));
    }
    // Recorded before it is written, so that a crash in between leaves no table loopguard forgets;
    // a table already recorded as loopguard's needs no new record to be put back.
    let record_first = recorded != Some(NftTable::Owned);
    if record_first {
        store(facts, state, Some(NftTable::Pending))?;
    }
    let written = nftables::create(generation);
    if !matches!(written, Ok(nftables::Written::Done)) {
        if record_first {
            store(facts, state, recorded)?;
        }
        written?;
        return Ok(None);
    }
    outcome.applied_at = Some(std::time::Instant::now());
    if record_first {
        store(facts, state, Some(NftTable::Owned))?;
    }
    if nftables::own_table()? == OwnTable::AsWritten || nft::cac_passes(&nftables::ruleset()?, ipv6)
    {
        Ok(Some(passing(true)))
    } else {
        Ok(Some((
            Verdict::Fail,
            reason::NOT_IN_PLACE,
            format!("{missing}, even after loopguard wrote its table"),
            true,
        )))
    }
}

fn passing(owned: bool) -> Checked {
    (
        Verdict::Pass,
        reason::IN_PLACE,
        "an input-hook chain holds `iif \"lo\" accept` and the loopback-source drops, as ComplianceAsCode's check reads `nft list ruleset`".into(),
        owned,
    )
}

/// Deletes loopguard's table when loopguard created it and it holds only loopguard's rules.
fn cleanup_table(
    facts: &NodeFacts,
    state: &StateFile,
    outcome: &mut FamilyOutcome,
) -> Result<String> {
    let Some(_) = state.load()?.and_then(|s| s.nft_table) else {
        return Ok("loopguard has no nftables table here".into());
    };
    for _ in 0..STALE_TRIES {
        let (table, generation) = nftables::own_table_at()?;
        if let Some(done) = cleanup_once(facts, state, outcome, table, generation)? {
            return Ok(done);
        }
    }
    Err(stale_error("deleting"))
}

fn cleanup_once(
    facts: &NodeFacts,
    state: &StateFile,
    outcome: &mut FamilyOutcome,
    table: OwnTable,
    generation: u32,
) -> Result<Option<String>> {
    let done = match table {
        OwnTable::Absent => {
            store(facts, state, None)?;
            "loopguard's nftables table was already gone".into()
        }
        OwnTable::AsWritten | OwnTable::Partial => {
            if nftables::delete(generation)? == nftables::Written::Stale {
                return Ok(None);
            }
            outcome.applied_at = Some(std::time::Instant::now());
            outcome
                .changes
                .push(format!("delete table inet {}", nft::TABLE));
            store(facts, state, None)?;
            format!("deleted table inet {}", nft::TABLE)
        }
        OwnTable::Other(why) => format!(
            "table inet {} now holds more than loopguard wrote ({why}): not deleted; delete it yourself with `nft delete table inet {}`",
            nft::TABLE,
            nft::TABLE
        ),
    };
    Ok(Some(done))
}

/// Records what loopguard owns of nftables, keeping the rest of the state file.
fn store(facts: &NodeFacts, state: &StateFile, table: Option<NftTable>) -> Result<()> {
    record(facts, state, |s| s.nft_table = table)
}

/// Changes the state file's record with `edit`, keeping the rest; writes no file where there is
/// none and the record stays empty.
fn record(facts: &NodeFacts, state: &StateFile, edit: impl FnOnce(&mut State)) -> Result<()> {
    let existed = state.load()?;
    let mut current = existed
        .clone()
        .unwrap_or_else(|| State::new(facts.backend, crate::rules::Ownership::default()));
    edit(&mut current);
    if existed.is_none() && current.owns_nothing() {
        return Ok(());
    }
    state.store(&current)
}

const UFW_INACTIVE_MESSAGE: &str = "ufw is installed but not active, so `ufw status verbose` shows no rules and the CIS check fails. \
     loopguard never enables ufw: its default-deny incoming policy would cut the kubelet, NodePorts and the CNI. \
     Either remove ufw (`apt-get purge ufw`, as the CIS profile and AKS do), or enable it yourself with rules for the node's traffic";

fn ufw_pass(
    facts: &NodeFacts,
    mode: FamilyMode,
    state: &StateFile,
    host_ufw: &Ufw,
    action: Action,
    outcome: &mut FamilyOutcome,
) {
    let rule = RuleId::UfwLoopback;
    if action == Action::Cleanup {
        let mut result = RuleResult::new(rule, mode, catalog::applies(rule, &facts.host));
        result = match ufw_cleanup(facts, state, host_ufw, outcome) {
            Ok(message) => {
                result.why = message.clone();
                result.with(Verdict::NotApplicable, reason::NOT_APPLICABLE, message)
            }
            Err(e) => result.with(Verdict::Unknown, reason::UFW_FAILED, e.to_string()),
        };
        outcome.results.push(result);
        return;
    }
    let result = match decided(facts, rule, mode) {
        Decided::Final(result) => result,
        Decided::Applies(result) => match &facts.host.ufw {
            UfwConf::Disabled => {
                result.with(Verdict::Fail, reason::UFW_INACTIVE, UFW_INACTIVE_MESSAGE)
            }
            UfwConf::Unreadable(why) => result.with(
                Verdict::Unknown,
                reason::UFW_CONFIG_UNREADABLE,
                format!(
                    "{why}: whether ufw is enabled cannot be told, so loopguard neither checks nor writes its rules; \
                     check the file's permissions on the node (it is root's, mode 0644 as ufw installs it)"
                ),
            ),
            UfwConf::Enabled => {
                match ufw_check_or_enforce(facts, mode, state, host_ufw, action, outcome) {
                    Ok((verdict, reason, message, owned)) => {
                        let mut result = result.with(verdict, reason, message);
                        result.owned = owned;
                        result
                    }
                    Err(e) => result.with(Verdict::Unknown, reason::UFW_FAILED, e.to_string()),
                }
            }
        },
    };
    outcome.results.push(result);
}

fn ufw_check_or_enforce(
    facts: &NodeFacts,
    mode: FamilyMode,
    state: &StateFile,
    host_ufw: &Ufw,
    action: Action,
    outcome: &mut FamilyOutcome,
) -> Result<Checked> {
    let ipv6 = facts.ipv6_enabled;
    let status = host_ufw.status()?;
    if !ufw_rules::active(&status) {
        return Ok((
            Verdict::Fail,
            reason::UFW_INACTIVE,
            UFW_INACTIVE_MESSAGE.into(),
            false,
        ));
    }
    let recorded = state.load()?.map(|s| s.ufw_rules).unwrap_or_default();
    let missing = ufw_rules::missing(&status, ipv6);
    let owned = !recorded.is_empty();
    if missing.is_empty() {
        return Ok(ufw_passing(owned));
    }
    let words = |rules: &[UfwRule]| {
        rules
            .iter()
            .map(|r| format!("`{r}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let message = format!(
        "ufw status verbose does not show what {} would add",
        words(&missing)
    );
    if mode != FamilyMode::Enforce || action == Action::Check {
        return Ok((Verdict::Fail, reason::NOT_IN_PLACE, message, owned));
    }
    outcome
        .changes
        .extend(missing.iter().map(|r| r.to_string()));
    if action == Action::Plan {
        return Ok((Verdict::Fail, reason::NOT_IN_PLACE, message, owned));
    }
    for rule in &missing {
        // Recorded first: a crash between the two leaves a record of a rule that may exist,
        // never a rule of loopguard's that nothing records.
        record(facts, state, |s| {
            if !s.ufw_rules.contains(rule) {
                s.ufw_rules.push(*rule);
            }
        })?;
        host_ufw.add(*rule)?;
        outcome.applied_at = Some(std::time::Instant::now());
    }
    let after = ufw_rules::missing(&host_ufw.status()?, ipv6);
    if after.is_empty() {
        Ok(ufw_passing(true))
    } else {
        Ok((
            Verdict::Fail,
            reason::NOT_IN_PLACE,
            format!(
                "ufw status verbose still does not show what {} would add, after loopguard ran them (is IPV6=no in /etc/default/ufw while IPv6 is on?)",
                words(&after)
            ),
            true,
        ))
    }
}

fn ufw_passing(owned: bool) -> Checked {
    (
        Verdict::Pass,
        reason::IN_PLACE,
        "ufw is active and `ufw status verbose` shows the loopback allows and the loopback-source denies, as ComplianceAsCode's check reads it".into(),
        owned,
    )
}

/// Deletes the ufw rules loopguard added, and only those.
fn ufw_cleanup(
    facts: &NodeFacts,
    state: &StateFile,
    host_ufw: &Ufw,
    outcome: &mut FamilyOutcome,
) -> Result<String> {
    let recorded = state.load()?.map(|s| s.ufw_rules).unwrap_or_default();
    if recorded.is_empty() {
        return Ok("loopguard added no ufw rules here".into());
    }
    let status = host_ufw.status()?;
    let mut deleted = Vec::new();
    for rule in &recorded {
        // A rule no longer shown is gone already (or ufw is off): nothing to delete.
        if rule.listed(&status) {
            host_ufw.delete(*rule)?;
            outcome.applied_at = Some(std::time::Instant::now());
            outcome.changes.push(format!("ufw delete {}", rule.words()));
            deleted.push(format!("`ufw delete {}`", rule.words()));
        }
        record(facts, state, |s| s.ufw_rules.retain(|r| r != rule))?;
    }
    Ok(if deleted.is_empty() {
        "the ufw rules loopguard added were already gone".into()
    } else {
        format!(
            "deleted the ufw rules loopguard added: {}",
            deleted.join(", ")
        )
    })
}

fn firewalld_result(facts: &NodeFacts, mode: FamilyMode, rule: RuleId) -> RuleResult {
    match decided(facts, rule, mode) {
        Decided::Final(result) => result,
        Decided::Applies(result) => result.with(
            Verdict::Unknown,
            reason::NOT_CHECKED,
            "firewalld is enabled: loopguard never touches inet firewalld, and checking its zones is not built yet \
             (`firewall-cmd --zone=trusted --list-interfaces` on the node)",
        ),
    }
}
