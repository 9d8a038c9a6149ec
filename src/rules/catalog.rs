//! The loopback rules of the CIS benchmarks, one per firewall tool, with ComplianceAsCode's ids
//! and its platform expressions: which of them applies to a host is decided here, from facts the
//! node layer reads (`node::packages`), exactly as ComplianceAsCode's platforms decide it.
//!
//! | rule | ComplianceAsCode platform |
//! |---|---|
//! | `set_ipv6_loopback_traffic`, `set_loopback_traffic` | `package[iptables] and not package[nftables] and not package[ufw]` |
//! | `set_nftables_loopback_traffic` | `package[nftables] and service_disabled[firewalld]` |
//! | `set_ufw_loopback_traffic` | `package[ufw]` |
//! | `firewalld_loopback_traffic_trusted`, `_restricted` | firewalld installed and enabled |
//!
//! `service_disabled[firewalld]` follows ComplianceAsCode's OVAL: firewalld not installed, or its
//! unit not enabled (its bash form asks `systemctl is-active` instead; a unit that runs without
//! being enabled is rare on nodes, and the OVAL is what the scanners run). A host without any
//! package database (Bottlerocket, Container-Optimized OS, Flatcar, Talos) is outside
//! ComplianceAsCode's platforms: there the same expressions are read over the binaries found,
//! the basis is said, and the vendor's own benchmark is named where it has one.

use serde::Serialize;
use std::collections::BTreeSet;
use std::fmt;

/// The seed's rule as XCCDF results name it (what `--output json` and the reports carry).
pub const SEED_XCCDF_ID: &str = "xccdf_org.ssgproject.content_rule_set_ipv6_loopback_traffic";

/// The packages whose presence decides a loopback rule.
pub const FIREWALL_PACKAGES: [&str; 4] = ["iptables", "nftables", "ufw", "firewalld"];

/// What the host's package databases say.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum PackageBasis {
    /// The firewall packages installed, and where that was read.
    Installed {
        packages: BTreeSet<String>,
        source: String,
    },
    /// No package database loopguard can read: decided from the binaries found (why, in words).
    NoDatabase(String),
    /// A package database that is there but cannot be read: nothing can be decided (why).
    Unreadable(String),
}

impl PackageBasis {
    pub fn describe(&self) -> String {
        match self {
            PackageBasis::Installed { source, .. } => source.clone(),
            PackageBasis::NoDatabase(why) | PackageBasis::Unreadable(why) => why.clone(),
        }
    }
}

/// The host facts the platforms read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Host {
    pub packages: PackageBasis,
    /// Firewall binaries found under the host root (`ip6tables`, `nft`, `ufw`, ...).
    pub binaries: BTreeSet<String>,
    /// The firewalld unit is enabled (linked into a `.wants` folder, not masked).
    pub firewalld_enabled: bool,
    /// What `/etc/ufw/ufw.conf` says (`ENABLED=yes`: enabled).
    pub ufw: UfwConf,
    pub ipv6_enabled: bool,
    /// The host's `ID` from os-release (`debian`, `bottlerocket`, `cos`, ...), when it has one.
    pub os_id: Option<String>,
}

/// ufw's setting as its configuration file says it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub enum UfwConf {
    Enabled,
    /// `ENABLED=no`, or no ufw.conf (ufw not installed).
    #[default]
    Disabled,
    /// ufw.conf is there but cannot be read: why.
    Unreadable(String),
}

/// The vendor's own CIS benchmark item for the loopback rules, for hosts outside
/// ComplianceAsCode's platforms: Bottlerocket's and Container-Optimized OS's ask for exactly the
/// seed's ip6tables rules.
pub fn vendor_benchmark(os_id: &str) -> Option<&'static str> {
    match os_id {
        "bottlerocket" => Some("CIS Bottlerocket 3.4.2.2 asks for the seed's ip6tables rules"),
        "cos" => {
            Some("CIS Google Container-Optimized OS 3.3.1.2 asks for the seed's ip6tables rules")
        }
        _ => None,
    }
}

impl Host {
    /// Whether `package` is installed: from the package database, or where there is none from
    /// its binaries; `None` when the database cannot be read.
    pub fn installed(&self, package: &str) -> Option<bool> {
        match &self.packages {
            PackageBasis::Installed { packages, .. } => Some(packages.contains(package)),
            PackageBasis::NoDatabase(_) => Some(match package {
                "iptables" => {
                    self.binaries.contains("ip6tables") || self.binaries.contains("iptables")
                }
                "nftables" => self.binaries.contains("nft"),
                other => self.binaries.contains(other),
            }),
            PackageBasis::Unreadable(_) => None,
        }
    }

    /// The firewall packages installed (as [`Host::installed`] reads them), in the order of
    /// [`FIREWALL_PACKAGES`].
    pub fn firewall_packages(&self) -> Vec<&'static str> {
        FIREWALL_PACKAGES
            .into_iter()
            .filter(|p| self.installed(p) == Some(true))
            .collect()
    }
}

/// The rule families: one firewall tool each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleFamily {
    Iptables,
    Nftables,
    Ufw,
    Firewalld,
}

impl fmt::Display for RuleFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RuleFamily::Iptables => "iptables",
            RuleFamily::Nftables => "nftables",
            RuleFamily::Ufw => "ufw",
            RuleFamily::Firewalld => "firewalld",
        })
    }
}

/// One loopback rule as the benchmarks name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum RuleId {
    /// `set_ipv6_loopback_traffic`: the seed.
    Ipv6Loopback,
    /// `set_loopback_traffic`: its IPv4 sibling.
    Ipv4Loopback,
    /// `set_nftables_loopback_traffic`.
    NftablesLoopback,
    /// `set_ufw_loopback_traffic`.
    UfwLoopback,
    /// `firewalld_loopback_traffic_trusted`.
    FirewalldTrusted,
    /// `firewalld_loopback_traffic_restricted`.
    FirewalldRestricted,
}

impl RuleId {
    pub const ALL: [RuleId; 6] = [
        RuleId::Ipv6Loopback,
        RuleId::Ipv4Loopback,
        RuleId::NftablesLoopback,
        RuleId::UfwLoopback,
        RuleId::FirewalldTrusted,
        RuleId::FirewalldRestricted,
    ];

    /// ComplianceAsCode's rule id.
    pub fn cac_id(self) -> &'static str {
        match self {
            RuleId::Ipv6Loopback => "set_ipv6_loopback_traffic",
            RuleId::Ipv4Loopback => "set_loopback_traffic",
            RuleId::NftablesLoopback => "set_nftables_loopback_traffic",
            RuleId::UfwLoopback => "set_ufw_loopback_traffic",
            RuleId::FirewalldTrusted => "firewalld_loopback_traffic_trusted",
            RuleId::FirewalldRestricted => "firewalld_loopback_traffic_restricted",
        }
    }

    /// The CIS ids: Ubuntu 24.04 and Debian 12 (v1.0.0, v1.1.0), Ubuntu 22.04 (v2.0.0); RHEL 9
    /// for firewalld.
    pub fn cis_ids(self) -> &'static [&'static str] {
        match self {
            RuleId::Ipv6Loopback => &[
                "ubuntu2404:4.4.3.2",
                "debian12:4.4.3.2",
                "ubuntu2204:4.3.3.2",
            ],
            RuleId::Ipv4Loopback => &[
                "ubuntu2404:4.4.2.2",
                "debian12:4.4.2.2",
                "ubuntu2204:4.3.2.2",
            ],
            RuleId::NftablesLoopback => &["ubuntu2404:4.3.6", "debian12:4.3.6", "ubuntu2204:4.2.6"],
            RuleId::UfwLoopback => &["ubuntu2404:4.2.4", "debian12:4.2.4", "ubuntu2204:4.1.4"],
            RuleId::FirewalldTrusted | RuleId::FirewalldRestricted => &["rhel9:4.2.2"],
        }
    }

    /// Datadog's out-of-the-box rule, where it has one.
    pub fn datadog_id(self) -> Option<&'static str> {
        match self {
            RuleId::Ipv6Loopback => Some("def-000-mkc"),
            RuleId::Ipv4Loopback => Some("def-000-byk"),
            RuleId::NftablesLoopback => Some("def-000-x1o"),
            RuleId::UfwLoopback => Some("def-000-sbg"),
            RuleId::FirewalldTrusted | RuleId::FirewalldRestricted => None,
        }
    }

    pub fn family(self) -> RuleFamily {
        match self {
            RuleId::Ipv6Loopback | RuleId::Ipv4Loopback => RuleFamily::Iptables,
            RuleId::NftablesLoopback => RuleFamily::Nftables,
            RuleId::UfwLoopback => RuleFamily::Ufw,
            RuleId::FirewalldTrusted | RuleId::FirewalldRestricted => RuleFamily::Firewalld,
        }
    }
}

impl fmt::Display for RuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.cac_id())
    }
}

/// What a policy asks of one rule family.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum,
)]
pub enum FamilyMode {
    /// Make the node pass the family's rules where they apply.
    Enforce,
    /// Check and report only; a failing rule makes the node non-compliant for that rule.
    Report,
    /// Leave the family out (the report says so).
    #[default]
    Ignore,
}

impl fmt::Display for FamilyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FamilyMode::Enforce => "Enforce",
            FamilyMode::Report => "Report",
            FamilyMode::Ignore => "Ignore",
        })
    }
}

/// The verdict on one rule for one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Verdict {
    /// The rule applies and the node passes ComplianceAsCode's check for it.
    Pass,
    /// The rule applies and the node fails the check.
    Fail,
    /// The rule's platform does not select this node.
    NotApplicable,
    /// The policy leaves the rule's family out.
    Ignored,
    /// It could not be told (see the reason).
    Unknown,
}

/// One rule's result on one node: what `--output json` and the node state list per rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleResult {
    /// ComplianceAsCode's rule id.
    pub id: &'static str,
    pub cis: &'static [&'static str],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datadog: Option<&'static str>,
    pub family: RuleFamily,
    pub mode: FamilyMode,
    /// Whether the rule applies (`null`: could not be told).
    pub applies: Option<bool>,
    /// Why it applies or not, naming the facts and where they were read.
    pub why: String,
    pub verdict: Verdict,
    /// One CamelCase word.
    pub reason: String,
    pub message: String,
    /// Whether what passes the check is loopguard's own (it inserted or created it).
    pub owned: bool,
}

impl RuleResult {
    /// A result for `rule`, with its ids filled in.
    pub fn new(rule: RuleId, mode: FamilyMode, decided: Applies) -> RuleResult {
        RuleResult {
            id: rule.cac_id(),
            cis: rule.cis_ids(),
            datadog: rule.datadog_id(),
            family: rule.family(),
            mode,
            applies: decided.applies,
            why: decided.why,
            verdict: Verdict::Unknown,
            reason: String::new(),
            message: String::new(),
            owned: false,
        }
    }

    pub fn with(mut self, verdict: Verdict, reason: &str, message: impl Into<String>) -> Self {
        self.verdict = verdict;
        self.reason = reason.to_string();
        self.message = message.into();
        self
    }

    /// Whether this result keeps the node from being compliant.
    pub fn counts_against(&self) -> bool {
        self.mode != FamilyMode::Ignore && matches!(self.verdict, Verdict::Fail | Verdict::Unknown)
    }
}

/// Whether a rule applies, and why, in words that name the facts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Applies {
    /// `None`: cannot be told (an unreadable package database).
    pub applies: Option<bool>,
    pub why: String,
}

/// Decides whether `rule` applies to `host` with ComplianceAsCode's platform for it.
pub fn applies(rule: RuleId, host: &Host) -> Applies {
    let basis = match &host.packages {
        PackageBasis::Unreadable(why) => {
            return Applies {
                applies: None,
                why: why.clone(),
            };
        }
        PackageBasis::Installed { source, .. } => source.clone(),
        PackageBasis::NoDatabase(why) => {
            let found: Vec<&str> = host.binaries.iter().map(String::as_str).collect();
            let vendor = match (rule, host.os_id.as_deref().and_then(vendor_benchmark)) {
                (RuleId::Ipv6Loopback, Some(item)) => format!("; {item}"),
                _ => String::new(),
            };
            format!(
                "{why}: {}{vendor}",
                if found.is_empty() {
                    "none".into()
                } else {
                    found.join(", ")
                }
            )
        }
    };
    let has = |p: &str| host.installed(p) == Some(true);
    let list = |ps: &[&str]| ps.join(", ");
    let (verdict, why) = match rule {
        RuleId::Ipv6Loopback | RuleId::Ipv4Loopback => {
            let iptables_only = has("iptables") && !has("nftables") && !has("ufw");
            if rule == RuleId::Ipv6Loopback && !host.ipv6_enabled && iptables_only {
                (
                    false,
                    "IPv6 is disabled (net.ipv6.conf.all.disable_ipv6 = 1)".to_string(),
                )
            } else if iptables_only {
                (
                    true,
                    "iptables is installed, nftables and ufw are not".to_string(),
                )
            } else if !has("iptables") {
                (false, "iptables is not installed".to_string())
            } else {
                let others: Vec<&str> =
                    ["nftables", "ufw"].into_iter().filter(|p| has(p)).collect();
                (
                    false,
                    format!(
                        "{} installed; the rule applies only where neither nftables nor ufw is",
                        if others.len() == 1 {
                            format!("{} is", others[0])
                        } else {
                            format!("{} are", list(&others))
                        }
                    ),
                )
            }
        }
        RuleId::NftablesLoopback => {
            if !has("nftables") {
                (false, "nftables is not installed".to_string())
            } else if has("firewalld") && host.firewalld_enabled {
                (
                    false,
                    "firewalld is enabled; the nftables rule applies only where it is not (the firewalld rules apply)"
                        .to_string(),
                )
            } else {
                (
                    true,
                    "nftables is installed and firewalld is not enabled".to_string(),
                )
            }
        }
        RuleId::UfwLoopback => {
            if has("ufw") {
                let active = match host.ufw {
                    UfwConf::Enabled => "enabled",
                    UfwConf::Disabled => "not enabled",
                    UfwConf::Unreadable(_) => "its ufw.conf unreadable",
                };
                (true, format!("ufw is installed ({active})"))
            } else {
                (false, "ufw is not installed".to_string())
            }
        }
        RuleId::FirewalldTrusted | RuleId::FirewalldRestricted => {
            if has("firewalld") && host.firewalld_enabled {
                (true, "firewalld is installed and enabled".to_string())
            } else if has("firewalld") {
                (false, "firewalld is installed but not enabled".to_string())
            } else {
                (false, "firewalld is not installed".to_string())
            }
        }
    };
    Applies {
        applies: Some(verdict),
        why: format!("{why} ({basis})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(packages: &[&str], firewalld_enabled: bool) -> Host {
        Host {
            packages: PackageBasis::Installed {
                packages: packages.iter().map(|p| p.to_string()).collect(),
                source: "test".into(),
            },
            binaries: BTreeSet::new(),
            firewalld_enabled,
            ufw: UfwConf::Disabled,
            ipv6_enabled: true,
            os_id: None,
        }
    }

    fn applying(h: &Host) -> Vec<&'static str> {
        RuleId::ALL
            .into_iter()
            .filter(|&r| applies(r, h).applies == Some(true))
            .map(RuleId::cac_id)
            .collect()
    }

    /// The node images of the issue, each with exactly the rules ComplianceAsCode applies.
    #[test]
    fn each_node_image_gets_the_rules_its_platforms_select() {
        let ubuntu = host(&["iptables", "nftables", "ufw"], false);
        assert_eq!(
            applying(&ubuntu),
            ["set_nftables_loopback_traffic", "set_ufw_loopback_traffic"]
        );
        let nft_only = host(&["iptables", "nftables"], false); // AKS Ubuntu, RHCOS, Azure Linux
        assert_eq!(applying(&nft_only), ["set_nftables_loopback_traffic"]);
        let al2023 = host(&["nftables"], false); // iptables-nft, no package named iptables
        assert_eq!(applying(&al2023), ["set_nftables_loopback_traffic"]);
        let rhel = host(&["iptables", "nftables", "firewalld"], true);
        assert_eq!(
            applying(&rhel),
            [
                "firewalld_loopback_traffic_trusted",
                "firewalld_loopback_traffic_restricted"
            ]
        );
        let rocky = host(&["nftables", "firewalld"], false); // firewalld disabled
        assert_eq!(applying(&rocky), ["set_nftables_loopback_traffic"]);
        let debian = host(&["iptables"], false);
        assert_eq!(
            applying(&debian),
            ["set_ipv6_loopback_traffic", "set_loopback_traffic"]
        );
    }

    #[test]
    fn reasons_name_the_facts_and_their_basis() {
        let ubuntu = host(&["iptables", "nftables", "ufw"], false);
        let seed = applies(RuleId::Ipv6Loopback, &ubuntu);
        assert_eq!(seed.applies, Some(false));
        assert!(
            seed.why.contains("nftables, ufw are installed") && seed.why.contains("(test)"),
            "{}",
            seed.why
        );
        let mut off = host(&["iptables"], false);
        off.ipv6_enabled = false;
        assert!(
            applies(RuleId::Ipv6Loopback, &off)
                .why
                .contains("IPv6 is disabled")
        );
        assert_eq!(applies(RuleId::Ipv4Loopback, &off).applies, Some(true));
    }

    #[test]
    fn without_a_package_database_the_binaries_decide_and_an_unreadable_one_decides_nothing() {
        let bottlerocket = Host {
            packages: PackageBasis::NoDatabase("no package database".into()),
            binaries: ["ip6tables".to_string(), "iptables".to_string()].into(),
            firewalld_enabled: false,
            ufw: UfwConf::Disabled,
            ipv6_enabled: true,
            os_id: Some("bottlerocket".into()),
        };
        let seed = applies(RuleId::Ipv6Loopback, &bottlerocket);
        assert_eq!(seed.applies, Some(true));
        assert!(
            seed.why
                .contains("no package database: ip6tables, iptables"),
            "{}",
            seed.why
        );
        assert!(
            seed.why.contains("CIS Bottlerocket 3.4.2.2"),
            "{}",
            seed.why
        );
        let broken = Host {
            packages: PackageBasis::Unreadable("cannot read the rpm database".into()),
            ..bottlerocket
        };
        for rule in RuleId::ALL {
            assert_eq!(applies(rule, &broken).applies, None);
        }
    }
}
