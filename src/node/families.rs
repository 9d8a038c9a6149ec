//! The rule families beside iptables, for one node pass: each decides whether its rule applies
//! (`rules::catalog`), reads, evaluates with ComplianceAsCode's check, and (nftables, in Enforce
//! mode) writes loopguard's own table. The engine composes them with the iptables family.
//!
//! - nftables: `table inet loopguard`, created in one transaction where the check fails, deleted
//!   by cleanup only when loopguard created it and it holds nothing but loopguard's rules.
//! - ufw: reported. loopguard never enables ufw (its default-deny incoming policy would cut the
//!   kubelet, NodePorts and the CNI); an inactive ufw fails the CIS check, with the ways out.
//! - firewalld: reported as applying where it is enabled; loopguard never touches `inet firewalld`.

use super::facts::NodeFacts;
use super::nftables;
use super::state_file::{NftTable, StateFile};
use crate::Result;
use crate::rules::catalog::{self, FamilyMode, RuleId, RuleResult, Verdict};
use crate::rules::nft::{self, OwnTable};

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
    pub const NOT_CHECKED: &str = "NotChecked";
}

/// One family's pass: its results and what it wrote (or, for a plan, would write).
#[derive(Debug, Default)]
pub struct FamilyOutcome {
    pub results: Vec<RuleResult>,
    /// `nft` statements, in words (`create table inet loopguard`).
    pub changes: Vec<String>,
}

/// Runs the nftables, ufw and firewalld families. Errors of one family are its result, never
/// an error of the pass.
pub fn run(
    facts: &NodeFacts,
    modes: [FamilyMode; 3],
    state: &StateFile,
    action: Action,
) -> FamilyOutcome {
    let [nftables, ufw, firewalld] = modes;
    let mut outcome = FamilyOutcome::default();
    nftables_pass(facts, nftables, state, action, &mut outcome);
    outcome.results.push(ufw_result(facts, ufw));
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

fn check_or_enforce(
    facts: &NodeFacts,
    mode: FamilyMode,
    state: &StateFile,
    action: Action,
    outcome: &mut FamilyOutcome,
) -> Result<Checked> {
    let ipv6 = facts.ipv6_enabled;
    let recorded = state.load()?.and_then(|s| s.nft_table);
    let table = nftables::own_table()?;
    let owned = recorded.is_some() && table != OwnTable::Absent;
    if nft::cac_passes(&nftables::ruleset()?, ipv6) {
        if action == Action::Enforce && recorded == Some(NftTable::Pending) {
            store(facts, state, owned.then_some(NftTable::Owned))?;
        }
        return Ok(passing(owned));
    }
    let may_replace = match &table {
        OwnTable::Absent => true,
        OwnTable::AsWritten | OwnTable::Partial => recorded.is_some(),
        OwnTable::Other(_) => false,
    };
    if !may_replace {
        let why = match &table {
            OwnTable::Other(why) => why.clone(),
            _ => "loopguard's state file does not record creating it".into(),
        };
        return Ok((
            Verdict::Fail,
            reason::FOREIGN_TABLE,
            format!(
                "a table inet {} exists that loopguard did not write ({why}); loopguard touches nothing in it. \
                 Rename or delete it (`nft delete table inet {}`), or set nftables to Report",
                nft::TABLE,
                nft::TABLE
            ),
            false,
        ));
    }
    let missing = format!(
        "nft list ruleset has no input-hook chain holding `iif \"lo\" accept`, `ip saddr`{}",
        if ipv6 { " and `ip6 saddr`" } else { "" }
    );
    if mode != FamilyMode::Enforce || action == Action::Check {
        return Ok((Verdict::Fail, reason::NOT_IN_PLACE, missing, owned));
    }
    outcome
        .changes
        .push(format!("create table inet {}", nft::TABLE));
    if action == Action::Plan {
        return Ok((Verdict::Fail, reason::NOT_IN_PLACE, missing, owned));
    }
    store(facts, state, Some(NftTable::Pending))?;
    if let Err(e) = nftables::create() {
        store(facts, state, recorded)?;
        return Err(e);
    }
    store(facts, state, Some(NftTable::Owned))?;
    if nft::cac_passes(&nftables::ruleset()?, ipv6) {
        Ok(passing(true))
    } else {
        Ok((
            Verdict::Fail,
            reason::NOT_IN_PLACE,
            format!("{missing}, even after loopguard wrote its table"),
            true,
        ))
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
    match nftables::own_table()? {
        OwnTable::Absent => {
            store(facts, state, None)?;
            Ok("loopguard's nftables table was already gone".into())
        }
        OwnTable::AsWritten | OwnTable::Partial => {
            nftables::delete()?;
            outcome
                .changes
                .push(format!("delete table inet {}", nft::TABLE));
            store(facts, state, None)?;
            Ok(format!("deleted table inet {}", nft::TABLE))
        }
        OwnTable::Other(why) => Ok(format!(
            "table inet {} now holds more than loopguard wrote ({why}): not deleted; delete it yourself with `nft delete table inet {}`",
            nft::TABLE,
            nft::TABLE
        )),
    }
}

/// Records what loopguard owns of nftables, keeping the rest of the state file.
fn store(facts: &NodeFacts, state: &StateFile, table: Option<NftTable>) -> Result<()> {
    let Some(mut current) = state.load()? else {
        if table.is_none() {
            return Ok(());
        }
        let mut fresh =
            super::state_file::State::new(facts.backend, crate::rules::Ownership::default());
        fresh.nft_table = table;
        return state.store(&fresh);
    };
    current.nft_table = table;
    state.store(&current)
}

fn ufw_result(facts: &NodeFacts, mode: FamilyMode) -> RuleResult {
    let rule = RuleId::UfwLoopback;
    match decided(facts, rule, mode) {
        Decided::Final(result) => result,
        Decided::Applies(result) if !facts.host.ufw_enabled => result.with(
            Verdict::Fail,
            reason::UFW_INACTIVE,
            "ufw is installed but not enabled, so `ufw status verbose` shows no rules and the CIS check fails. \
             loopguard never enables ufw: its default-deny incoming policy would cut the kubelet, NodePorts and the CNI. \
             Either remove ufw (`apt-get purge ufw`, as the CIS profile and AKS do), or enable it yourself with rules for the node's traffic",
        ),
        Decided::Applies(result) => result.with(
            Verdict::Unknown,
            reason::NOT_CHECKED,
            "ufw is enabled: checking its loopback rules is not built yet (run `ufw status verbose` on the node)",
        ),
    }
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
