//! What loopguard needs to know about a node before it touches anything: is IPv6 on, which
//! iptables backend the host uses, and which firewall managers are installed.

use super::iptables::{Backend, Xtables};
use super::legacy::XtSocket;
use crate::rules::Family;
use crate::rules::blob::{self, TableInfo};
use crate::rules::catalog::{self, Host, RuleId};
use serde::Serialize;
use std::fmt;
use std::path::Path;

/// How the backend is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// Detect it the way kubernetes-sigs/iptables-wrappers does.
    #[default]
    Auto,
    Nft,
    Legacy,
}

/// Whether the seed rule's own platform conditions decide applicability.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ApplicabilityMode {
    /// Exactly the seed rule: iptables installed, nftables and ufw not, IPv6 on.
    #[default]
    Auto,
    /// Whenever ip6tables works and IPv6 is on.
    Always,
}

/// A firewall manager whose presence matters to the seed rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FirewallManager {
    Iptables,
    Nftables,
    Ufw,
    Firewalld,
}

impl FirewallManager {
    const ALL: [FirewallManager; 4] = [
        FirewallManager::Iptables,
        FirewallManager::Nftables,
        FirewallManager::Ufw,
        FirewallManager::Firewalld,
    ];

    /// The Debian package name.
    pub fn package(self) -> &'static str {
        match self {
            FirewallManager::Iptables => "iptables",
            FirewallManager::Nftables => "nftables",
            FirewallManager::Ufw => "ufw",
            FirewallManager::Firewalld => "firewalld",
        }
    }
}

impl fmt::Display for FirewallManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.package())
    }
}

/// The facts about one node (one network namespace and the host root it belongs to).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeFacts {
    pub ipv6_enabled: bool,
    pub backend: Backend,
    /// Why that backend was chosen.
    pub backend_reason: String,
    pub firewall_managers: Vec<FirewallManager>,
    /// Where the firewall managers were read from.
    pub managers_source: String,
    /// What the rule platforms read (packages, firewalld and ufw enablement).
    #[serde(skip)]
    pub host: Host,
}

/// Whether the baseline applies to a node, and why (not).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Applicability {
    pub applicable: bool,
    pub reason: String,
}

/// Decides applicability from the facts (pure).
pub fn applicability(facts: &NodeFacts, mode: ApplicabilityMode) -> Applicability {
    let not = |reason: String| Applicability {
        applicable: false,
        reason,
    };
    if !facts.ipv6_enabled {
        return not("IPv6 is disabled (net.ipv6.conf.all.disable_ipv6 = 1)".into());
    }
    if mode == ApplicabilityMode::Auto {
        let decided = catalog::applies(RuleId::Ipv6Loopback, &facts.host);
        return match decided.applies {
            Some(true) => Applicability {
                applicable: true,
                reason: format!("{}, and IPv6 is on", decided.why),
            },
            Some(false) => not(format!(
                "{} (use applicability Always to enforce anyway)",
                decided.why
            )),
            None => not(format!(
                "cannot tell whether the CIS rule applies: {}",
                decided.why
            )),
        };
    }
    Applicability {
        applicable: true,
        reason: "applicability Always, and IPv6 is on".into(),
    }
}

/// Reads the node facts. `host_root` is where the host's filesystem is visible (`/` on the host,
/// a hostPath mount inside the agent's container).
pub fn discover(host_root: &Path, choice: BackendChoice) -> NodeFacts {
    discover_with(host_root, choice, &mut Detector::default())
}

/// [`discover`], detecting the backend with `detector`, which re-runs only the parts of the
/// detection whose inputs changed since it last ran.
pub fn discover_with(
    host_root: &Path,
    choice: BackendChoice,
    detector: &mut Detector,
) -> NodeFacts {
    let (backend, backend_reason) = match choice {
        BackendChoice::Nft => (Backend::Nft, "chosen with --backend".to_string()),
        BackendChoice::Legacy => (Backend::Legacy, "chosen with --backend".to_string()),
        BackendChoice::Auto => detector.detect(),
    };
    let ipv6 = ipv6_enabled();
    let host = super::packages::read_host(host_root, ipv6);
    NodeFacts {
        ipv6_enabled: ipv6,
        backend,
        backend_reason,
        firewall_managers: firewall_managers(&host),
        managers_source: host.packages.describe(),
        host,
    }
}

/// `net.ipv6.conf.all.disable_ipv6` of the current network namespace; no IPv6 at all counts as off.
pub fn ipv6_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
        .map(|v| v.trim() == "0")
        .unwrap_or(false)
}

/// The chains kubelet (1.17+) creates in the mangle table of the backend it uses.
const KUBELET_HINT_CHAINS: [&str; 2] = ["KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY"];

/// What the legacy tables say about the backend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LegacyEvidence {
    /// A kubelet hint chain found there: (chain, family).
    pub hint: Option<(String, Family)>,
    /// Rules counted in the legacy tables that were read.
    pub rules: usize,
    /// The tables that hold rules (`ipv6 filter`), read or told by their shape.
    pub tables_with_rules: Vec<String>,
}

/// Decides the backend like kubernetes-sigs/iptables-wrappers (pure): kubelet's hint chains in
/// the nft tables; else hint chains or any rules in the legacy tables; else nft.
pub fn decide_backend(
    nft_hint: Option<(String, Family)>,
    legacy: &LegacyEvidence,
) -> (Backend, String) {
    if let Some((chain, family)) = nft_hint {
        return (
            Backend::Nft,
            format!("kubelet's {chain} chain is in the nft {family} mangle table"),
        );
    }
    if let Some((chain, family)) = &legacy.hint {
        return (
            Backend::Legacy,
            format!("kubelet's {chain} chain is in the legacy {family} tables"),
        );
    }
    if !legacy.tables_with_rules.is_empty() {
        return (
            Backend::Legacy,
            format!(
                "no kubelet hint chains; legacy tables hold rules ({})",
                legacy.tables_with_rules.join(", ")
            ),
        );
    }
    (
        Backend::Nft,
        "no kubelet hint chains and no legacy rules: nft is the default".into(),
    )
}

/// Detects the backend (see [`decide_backend`]), all of it.
pub fn detect_backend() -> (Backend, String) {
    decide_backend(nft_hint(), &legacy_evidence())
}

/// Kubelet's hint chains in the nft mangle tables (`ip mangle`, `ip6 mangle`): one chain dump
/// over netlink, or `*-nft -S` of each where that cannot be read.
fn nft_hint() -> Option<(String, Family)> {
    use crate::rules::nft::wire::{NFPROTO_IPV4, NFPROTO_IPV6};
    if let Ok(chains) = super::nft::all_chains() {
        return [(Family::Ipv4, NFPROTO_IPV4), (Family::Ipv6, NFPROTO_IPV6)]
            .into_iter()
            .find_map(|(family, nfproto)| {
                KUBELET_HINT_CHAINS
                    .iter()
                    .find(|hint| {
                        chains
                            .iter()
                            .any(|c| c.family == nfproto && c.table == "mangle" && c.name == **hint)
                    })
                    .map(|hint| (hint.to_string(), family))
            });
    }
    let nft = Xtables::probe(Backend::Nft);
    for family in [Family::Ipv4, Family::Ipv6] {
        for chain in KUBELET_HINT_CHAINS {
            if nft.chain_exists(family, "mangle", chain) {
                return Some((chain.to_string(), family));
            }
        }
    }
    None
}

/// Hint chains and rules in the legacy tables, read in process. The mangle table (where the
/// hint chains are) and every table whose shape cannot tell are read whole; a table whose shape
/// proves rules (see `blob::holds_rules_by_shape`) is not read at all: at 50,000 rules that read
/// is most of a one-shot command's time. The legacy tables are read only when the kernel
/// already has them, so probing never loads legacy modules or creates tables.
fn legacy_evidence() -> LegacyEvidence {
    let mut evidence = LegacyEvidence::default();
    for family in [Family::Ipv4, Family::Ipv6] {
        let tables = legacy_tables(family);
        if tables.is_empty() {
            continue;
        }
        let Ok(socket) = XtSocket::open(family) else {
            continue;
        };
        for name in tables {
            let Ok(info) = socket.info(&name) else {
                continue;
            };
            if name != "mangle" && blob::holds_rules_by_shape(family, &info) {
                evidence.tables_with_rules.push(format!("{family} {name}"));
                continue;
            }
            let Ok(table) = socket.read(&name) else {
                continue;
            };
            if evidence.hint.is_none()
                && let Some(chain) = KUBELET_HINT_CHAINS
                    .iter()
                    .find(|c| table.user_chains().iter().any(|u| u == *c))
            {
                evidence.hint = Some((chain.to_string(), family));
            }
            if table.rule_count() > 0 {
                evidence.rules += table.rule_count();
                evidence.tables_with_rules.push(format!("{family} {name}"));
            }
        }
    }
    evidence
}

/// The legacy tables the kernel has instantiated for `family` in this network namespace.
fn legacy_tables(family: Family) -> Vec<String> {
    super::legacy::tables(family)
}

/// Every legacy table with its shape.
type LegacyShapes = Vec<(Family, String, TableInfo)>;

/// The shapes of every legacy table (`GET_INFO`: microseconds each), or `None` when one cannot be
/// asked: what decides whether the legacy part of the detection must run again.
fn legacy_shapes() -> Option<LegacyShapes> {
    let mut shapes = Vec::new();
    for family in [Family::Ipv4, Family::Ipv6] {
        let tables = legacy_tables(family);
        if tables.is_empty() {
            continue;
        }
        let socket = XtSocket::open(family).ok()?;
        for table in tables {
            let info = socket.info(&table).ok()?;
            shapes.push((family, table, info));
        }
    }
    Some(shapes)
}

/// Backend detection that runs again only what changed: the nft part when the nftables ruleset
/// generation moved, the legacy part (a `*-legacy-save` of each family) when a legacy table's
/// shape did. Where an input cannot be read, that part runs every time.
#[derive(Clone, Debug, Default)]
pub struct Detector {
    nft: Option<(u32, Option<(String, Family)>)>,
    legacy: Option<(LegacyShapes, LegacyEvidence)>,
    /// How many times each part really ran (for tests and benchmarks).
    pub nft_runs: u64,
    pub legacy_runs: u64,
}

impl Detector {
    pub fn detect(&mut self) -> (Backend, String) {
        let generation = super::nft::generation().ok();
        let nft = match (&self.nft, generation) {
            (Some((known, hint)), Some(now)) if *known == now => hint.clone(),
            _ => {
                self.nft_runs += 1;
                let hint = nft_hint();
                // The generation after the look: a change during it is seen next time.
                self.nft = super::nft::generation().ok().map(|g| (g, hint.clone()));
                hint
            }
        };
        if nft.is_some() {
            return decide_backend(nft, &LegacyEvidence::default());
        }
        let shapes = legacy_shapes();
        let legacy = match (&self.legacy, &shapes) {
            (Some((known, evidence)), Some(now)) if known == now => evidence.clone(),
            _ => {
                self.legacy_runs += 1;
                let evidence = legacy_evidence();
                self.legacy = legacy_shapes().map(|s| (s, evidence.clone()));
                evidence
            }
        };
        decide_backend(None, &legacy)
    }
}

/// The firewall managers installed on the host (see [`Host::installed`]).
pub fn firewall_managers(host: &Host) -> Vec<FirewallManager> {
    FirewallManager::ALL
        .into_iter()
        .filter(|m| host.installed(m.package()) == Some(true))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::catalog::PackageBasis;
    use std::collections::BTreeSet;

    fn facts(managers: &[FirewallManager], ipv6: bool) -> NodeFacts {
        let host = Host {
            packages: PackageBasis::Installed {
                packages: managers.iter().map(|m| m.package().to_string()).collect(),
                source: "test".into(),
            },
            binaries: BTreeSet::new(),
            firewalld_enabled: false,
            ufw: crate::rules::catalog::UfwConf::Disabled,
            ipv6_enabled: ipv6,
            os_id: None,
        };
        NodeFacts {
            ipv6_enabled: ipv6,
            backend: Backend::Nft,
            backend_reason: String::new(),
            firewall_managers: firewall_managers(&host),
            managers_source: "test".into(),
            host,
        }
    }

    #[test]
    fn seed_conditions_decide_auto_applicability() {
        use FirewallManager::*;
        assert!(applicability(&facts(&[Iptables], true), ApplicabilityMode::Auto).applicable);
        let nft = applicability(&facts(&[Iptables, Nftables], true), ApplicabilityMode::Auto);
        assert!(!nft.applicable);
        assert!(
            nft.reason.contains("nftables is installed"),
            "{}",
            nft.reason
        );
        let ufw = applicability(&facts(&[Iptables, Ufw], true), ApplicabilityMode::Auto);
        assert!(ufw.reason.contains("ufw is installed"));
        let none = applicability(&facts(&[], true), ApplicabilityMode::Auto);
        assert!(none.reason.contains("iptables is not installed"));
        // firewalld is reported but does not change the seed's verdict.
        assert!(
            applicability(
                &facts(&[Iptables, Firewalld], true),
                ApplicabilityMode::Auto
            )
            .applicable
        );
    }

    #[test]
    fn always_ignores_managers_but_not_ipv6() {
        use FirewallManager::*;
        assert!(applicability(&facts(&[Nftables], true), ApplicabilityMode::Always).applicable);
        let off = applicability(&facts(&[Iptables], false), ApplicabilityMode::Always);
        assert!(!off.applicable);
        assert!(off.reason.contains("IPv6 is disabled"));
    }

    #[test]
    fn binaries_are_the_fallback_without_a_package_database() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("usr/sbin")).unwrap();
        std::os::unix::fs::symlink(
            "/nonexistent/xtables-nft-multi",
            root.path().join("usr/sbin/ip6tables"),
        )
        .unwrap();
        std::fs::write(root.path().join("usr/sbin/nft"), "").unwrap();
        let host = super::super::packages::read_host(root.path(), true);
        assert_eq!(
            firewall_managers(&host),
            vec![FirewallManager::Iptables, FirewallManager::Nftables]
        );
        assert!(host.packages.describe().contains("no dpkg or rpm database"));
    }
}
