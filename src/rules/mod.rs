//! The rule model, one folder per rule family: the shared words (`Family`, `Chain`, `Rule` and,
//! in `catalog`, each family's rule with its ComplianceAsCode, CIS and Datadog ids, applicability
//! and verdicts), then `ip6tables/` (the seed's rules), `nft/` (loopguard's own nftables table) and
//! `ufw` (the four ufw rules): each family's pure logic, read → evaluate → plan.
//!
//! Nothing here performs I/O; `node` feeds it listings read from the kernel.

pub mod catalog;
pub mod ip6tables;
pub mod nft;
pub mod ufw;

pub use ip6tables::{
    ChainListing, Edit, EditKind, Evaluation, Finding, LOOK_ALIKE, OPAQUE, OwnedRule, Ownership,
    RulePlan, RuleState, Shape, Tables, compliant_pair, evaluate, plan_cleanup, plan_enforce,
    scanner_counts_as, split_args,
};
pub use ip6tables::{blob, decode};

use serde::{Deserialize, Serialize};
use std::fmt;

/// An IP family: which of `ip6tables` / `iptables` a rule lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv6,
    Ipv4,
}

impl Family {
    /// `ip6tables` or `iptables`: the command prefix for this family.
    pub fn command(self) -> &'static str {
        match self {
            Family::Ipv6 => "ip6tables",
            Family::Ipv4 => "iptables",
        }
    }

    /// The loopback source network as `iptables -S` prints it.
    pub fn loopback_source(self) -> &'static str {
        match self {
            Family::Ipv6 => "::1/128",
            Family::Ipv4 => "127.0.0.0/8",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ipv6 => "ipv6",
            Family::Ipv4 => "ipv4",
        })
    }
}

/// The two built-in chains of the `filter` table that the baseline lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Chain {
    Input,
    Output,
}

impl Chain {
    pub const ALL: [Chain; 2] = [Chain::Input, Chain::Output];

    pub fn name(self) -> &'static str {
        match self {
            Chain::Input => "INPUT",
            Chain::Output => "OUTPUT",
        }
    }
}

impl fmt::Display for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The three rules of the baseline, per family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RuleKind {
    /// `-A INPUT -i lo -j ACCEPT`
    AcceptLoopbackIn,
    /// `-A INPUT -s ::1/128 -j DROP` (IPv4: `127.0.0.0/8`), right after `AcceptLoopbackIn`.
    DropLoopbackSource,
    /// `-A OUTPUT -o lo -j ACCEPT`
    AcceptLoopbackOut,
}

/// One desired rule: a kind in a family. Its text is exactly what `iptables -S` prints, with no
/// comment or other match, because that is what the compliance scanners look for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rule {
    pub family: Family,
    pub kind: RuleKind,
}

impl Rule {
    pub fn chain(self) -> Chain {
        match self.kind {
            RuleKind::AcceptLoopbackIn | RuleKind::DropLoopbackSource => Chain::Input,
            RuleKind::AcceptLoopbackOut => Chain::Output,
        }
    }

    /// The rule specification without the chain: `-i lo -j ACCEPT`.
    pub fn spec(self) -> String {
        match self.kind {
            RuleKind::AcceptLoopbackIn => "-i lo -j ACCEPT".to_string(),
            RuleKind::AcceptLoopbackOut => "-o lo -j ACCEPT".to_string(),
            RuleKind::DropLoopbackSource => {
                format!("-s {} -j DROP", self.family.loopback_source())
            }
        }
    }

    /// The rule in `iptables-save` syntax: `-A INPUT -i lo -j ACCEPT`.
    pub fn save_syntax(self) -> String {
        format!("-A {} {}", self.chain(), self.spec())
    }

    /// Every rule of the baseline for one family, in the order the seed script adds them.
    pub fn baseline(family: Family) -> [Rule; 3] {
        [
            RuleKind::AcceptLoopbackIn,
            RuleKind::DropLoopbackSource,
            RuleKind::AcceptLoopbackOut,
        ]
        .map(|kind| Rule { family, kind })
    }

    /// Finds the rule of the baseline (any family) whose `iptables-save` text is `text`.
    pub fn from_save_syntax(family: Family, text: &str) -> Option<Rule> {
        Rule::baseline(family)
            .into_iter()
            .find(|rule| rule.save_syntax() == text.trim())
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.save_syntax())
    }
}

/// Where missing rules go: the top of the chain (default) or the end (as the seed script does).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    #[default]
    Insert,
    Append,
}

/// The families to enforce, IPv6 always first. IPv6 is required by the baseline.
pub fn families(with_ipv4: bool) -> Vec<Family> {
    if with_ipv4 {
        vec![Family::Ipv6, Family::Ipv4]
    } else {
        vec![Family::Ipv6]
    }
}

/// Each family of `families` once, in order (IPv6 first).
pub fn distinct(families: impl IntoIterator<Item = Family>) -> Vec<Family> {
    let set: std::collections::BTreeSet<Family> = families.into_iter().collect();
    set.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_render_as_iptables_save_prints_them() {
        let [accept_in, drop, accept_out] = Rule::baseline(Family::Ipv6);
        assert_eq!(accept_in.save_syntax(), "-A INPUT -i lo -j ACCEPT");
        assert_eq!(drop.save_syntax(), "-A INPUT -s ::1/128 -j DROP");
        assert_eq!(accept_out.save_syntax(), "-A OUTPUT -o lo -j ACCEPT");
        let [_, drop4, _] = Rule::baseline(Family::Ipv4);
        assert_eq!(drop4.save_syntax(), "-A INPUT -s 127.0.0.0/8 -j DROP");
    }

    #[test]
    fn save_syntax_round_trips() {
        for family in [Family::Ipv6, Family::Ipv4] {
            for rule in Rule::baseline(family) {
                assert_eq!(
                    Rule::from_save_syntax(family, &rule.save_syntax()),
                    Some(rule)
                );
            }
        }
        assert_eq!(
            Rule::from_save_syntax(Family::Ipv6, "-A INPUT -s 127.0.0.0/8 -j DROP"),
            None
        );
    }
}
