//! The nftables loopback rule (`set_nftables_loopback_traffic`), pure: the table loopguard owns,
//! the check as ComplianceAsCode runs it, and whether a table named like loopguard's is the one
//! loopguard writes.
//!
//! loopguard writes one table of its own and nothing else:
//!
//! ```text
//! table inet loopguard {
//!     chain input {
//!         type filter hook input priority -150; policy accept;
//!         iif "lo" accept
//!         ip saddr 127.0.0.0/8 drop
//!         ip6 saddr ::1 drop
//!     }
//! }
//! ```
//!
//! An accept ends only the base chain it is in (every other base chain on the hook still sees the
//! packet), and a drop is final: this table can only remove spoofed loopback packets, never let
//! through anything another table drops. `iif` (not `iifname`) and no counter on the accept,
//! because ComplianceAsCode greps the listing for `iif "lo" accept`.

pub mod journal;
pub mod wire;
pub mod xt;

use wire::{ChainInfo, Expr, HOOK_INPUT, NF_ACCEPT, RuleInfo, TableInfo, own_rules};

/// The table loopguard owns (family `inet`: one rule for IPv4 and IPv6).
pub const TABLE: &str = "loopguard";
/// Its one base chain, on the input hook.
pub const CHAIN: &str = "input";
/// A priority no well-known neighbour uses (kube-proxy's nftables mode -110, Talos -140,
/// iptables-nft 0, firewalld 10); the verdict is the same at any priority.
pub const PRIORITY: i32 = -150;

/// The rules of the chain, in order, as `nft` reads them.
pub const RULES: [&str; 3] = [
    "iif \"lo\" accept",
    "ip saddr 127.0.0.0/8 drop",
    "ip6 saddr ::1 drop",
];

/// The `nft -f` transaction that (re)creates the table as loopguard writes it, atomically: the
/// `add` makes the `delete` valid when the table is not there yet.
pub fn create_script() -> String {
    format!(
        "add table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n\tchain {CHAIN} {{\n\t\ttype filter hook input priority {PRIORITY}; policy accept;\n\t\t{}\n\t}}\n}}\n",
        RULES.join("\n\t\t")
    )
}

/// ComplianceAsCode's check (`sce/ubuntu.sh` of `set_nftables_loopback_traffic`) on the output of
/// `nft list ruleset`: the lines from each `hook input` line up to the next line holding `}`
/// (`awk '/hook input/,/}/'`), which must hold `iif "lo" accept` and `ip saddr`, and with IPv6 on
/// `ip6 saddr`, anywhere (plain substrings: no order, no verdict is checked).
pub fn cac_passes(ruleset: &str, ipv6_enabled: bool) -> bool {
    let range = hook_input_lines(ruleset);
    range.contains("iif \"lo\" accept")
        && range.contains("ip saddr")
        && (!ipv6_enabled || range.contains("ip6 saddr"))
}

/// `awk '/hook input/,/}/'`: a range opens at a line matching the first pattern (that same line
/// may close it) and closes at the next line matching the second.
fn hook_input_lines(ruleset: &str) -> String {
    let mut out = String::new();
    let mut open = false;
    for line in ruleset.lines() {
        if !open && line.contains("hook input") {
            open = true;
        }
        if open {
            out.push_str(line);
            out.push('\n');
            if line.contains('}') {
                open = false;
            }
        }
    }
    out
}

/// What the table named like loopguard's is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnTable {
    /// No such table.
    Absent,
    /// Exactly the table loopguard writes.
    AsWritten,
    /// loopguard's chain with some of its rules gone or reordered, and nothing else: loopguard's
    /// own table after someone deleted from it.
    Partial,
    /// A table of that name that is not (or no longer) what loopguard writes: why.
    Other(String),
}

/// Whether the table named like loopguard's is the one loopguard writes, from what the kernel says
/// of it: the table (`None`: there is none), its `input` chain, and the rules of that chain.
pub fn classify(
    table: Option<&TableInfo>,
    chain: Option<&ChainInfo>,
    rules: &[RuleInfo],
    lo_index: u32,
) -> OwnTable {
    let Some(table) = table else {
        return OwnTable::Absent;
    };
    let other = |why: &str| OwnTable::Other(why.to_string());
    if table.flags != 0 {
        return other("its flags are set (dormant, or owned by a process): its rules may not run");
    }
    let Some(chain) = chain else {
        return other("it has no chain named input");
    };
    if table.objects != 1 {
        return other("it holds more than one chain, or sets, objects or flowtables");
    }
    let chain_ok = chain.name == CHAIN
        && chain.chain_type == "filter"
        && chain.hook == Some((HOOK_INPUT, PRIORITY))
        && chain.policy == Some(NF_ACCEPT);
    if !chain_ok {
        return other("its chain is not loopguard's input chain");
    }
    let expected = own_rules(lo_index);
    let exprs: Vec<&Vec<Expr>> = rules.iter().map(|r| &r.exprs).collect();
    if exprs.len() == expected.len() && exprs.iter().zip(&expected).all(|(a, b)| *a == b) {
        return OwnTable::AsWritten;
    }
    let mut left: Vec<&Vec<Expr>> = expected.iter().collect();
    for expr in exprs {
        match left.iter().position(|e| *e == expr) {
            Some(at) => {
                left.remove(at);
            }
            None => return other("it holds a rule that is not one of loopguard's"),
        }
    }
    OwnTable::Partial
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTED: &str = "table inet loopguard {\n\tchain input {\n\t\ttype filter hook input priority mangle; policy accept;\n\t\tiif \"lo\" accept\n\t\tip saddr 127.0.0.0/8 drop\n\t\tip6 saddr ::1 drop\n\t}\n}\n";

    #[test]
    fn the_table_as_written_passes_the_check() {
        assert!(cac_passes(LISTED, true));
        assert!(cac_passes(LISTED, false));
        assert!(create_script().contains("priority -150; policy accept;"));
        assert!(
            create_script().starts_with("add table inet loopguard\ndelete table inet loopguard\n")
        );
    }

    #[test]
    fn the_check_reads_only_input_hook_chains_up_to_the_first_brace() {
        // iptables-nft's rules print `iifname`, not `iif`: the ip6tables rules do not pass.
        let iptables_nft = "table ip6 filter {\n\tchain INPUT {\n\t\ttype filter hook input priority filter; policy accept;\n\t\tiifname \"lo\" counter packets 0 bytes 0 accept\n\t\tip6 saddr ::1 counter packets 0 bytes 0 drop\n\t}\n}\n";
        assert!(!cac_passes(iptables_nft, true));
        // An output chain does not count.
        let output = LISTED.replace("hook input", "hook output");
        assert!(!cac_passes(&output, true));
        // An anonymous set before the rules closes the range early.
        let set = LISTED.replace(
            "\t\tiif \"lo\" accept\n",
            "\t\ttcp dport { 22, 80 } accept\n\t\tiif \"lo\" accept\n",
        );
        assert!(!cac_passes(&set, true));
        // With IPv6 off the ip6 rule is not needed; with it on, it is.
        let v4 = LISTED.replace("\t\tip6 saddr ::1 drop\n", "");
        assert!(cac_passes(&v4, false));
        assert!(!cac_passes(&v4, true));
        // Another table that holds the rules passes the check just as well.
        let theirs = LISTED
            .replace("inet loopguard", "inet filter")
            .replace("chain input", "chain INPUT");
        assert!(cac_passes(&theirs, true));
    }

    #[test]
    fn classify_tells_loopguards_table_from_others() {
        use crate::rules::nft::wire::{NFPROTO_INET, RuleInfo};
        let table = TableInfo {
            flags: 0,
            objects: 1,
        };
        let chain = ChainInfo {
            family: NFPROTO_INET,
            table: TABLE.into(),
            name: CHAIN.into(),
            hook: Some((HOOK_INPUT, PRIORITY)),
            chain_type: "filter".into(),
            policy: Some(NF_ACCEPT),
        };
        let rules: Vec<RuleInfo> = own_rules(1)
            .into_iter()
            .map(|exprs| RuleInfo {
                table: TABLE.into(),
                chain: CHAIN.into(),
                exprs,
            })
            .collect();
        let ours = |t: &TableInfo, c: &ChainInfo, r: &[RuleInfo]| classify(Some(t), Some(c), r, 1);
        assert_eq!(classify(None, None, &[], 1), OwnTable::Absent);
        assert_eq!(ours(&table, &chain, &rules), OwnTable::AsWritten);
        assert_eq!(ours(&table, &chain, &rules[..2]), OwnTable::Partial);
        let swapped = [rules[1].clone(), rules[0].clone(), rules[2].clone()];
        assert_eq!(ours(&table, &chain, &swapped), OwnTable::Partial);
        // lo with another interface index is another rule.
        assert!(matches!(
            classify(Some(&table), Some(&chain), &rules, 2),
            OwnTable::Other(_)
        ));
        let mut foreign = rules.clone();
        foreign[2].exprs[3] = Expr::Cmp {
            sreg: 1,
            op: 0,
            data: vec![0; 16],
        };
        assert!(matches!(ours(&table, &chain, &foreign), OwnTable::Other(_)));
        let doubled = [rules.clone(), rules.clone()].concat();
        assert!(matches!(ours(&table, &chain, &doubled), OwnTable::Other(_)));
        let dormant = TableInfo {
            flags: 1,
            ..table.clone()
        };
        assert!(matches!(ours(&dormant, &chain, &rules), OwnTable::Other(_)));
        let with_a_set = TableInfo {
            objects: 2,
            ..table.clone()
        };
        assert!(matches!(
            ours(&with_a_set, &chain, &rules),
            OwnTable::Other(_)
        ));
        let other_priority = ChainInfo {
            hook: Some((HOOK_INPUT, 0)),
            ..chain.clone()
        };
        assert!(matches!(
            ours(&table, &other_priority, &rules),
            OwnTable::Other(_)
        ));
        let dropping = ChainInfo {
            policy: Some(0),
            ..chain.clone()
        };
        assert!(matches!(
            ours(&table, &dropping, &rules),
            OwnTable::Other(_)
        ));
        assert!(matches!(
            classify(Some(&table), None, &[], 1),
            OwnTable::Other(_)
        ));
    }
}
