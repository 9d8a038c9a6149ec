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

use serde_json::{Value, json};

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

/// The `nft -f` transaction that removes the table, and nothing else.
pub fn delete_script() -> String {
    format!("delete table inet {TABLE}\n")
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

/// What `nft -j list table inet loopguard` shows.
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

/// The expressions of each rule as `nft -j` prints them.
fn expected_exprs() -> [Value; 3] {
    [
        json!([{"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "lo"}}, {"accept": null}]),
        json!([{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                "right": {"prefix": {"addr": "127.0.0.0", "len": 8}}}}, {"drop": null}]),
        json!([{"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "saddr"}},
                "right": "::1"}}, {"drop": null}]),
    ]
}

/// Reads the JSON listing of the table (`None`: `nft` said there is no such table).
pub fn own_table(listing: Option<&str>) -> OwnTable {
    let Some(listing) = listing else {
        return OwnTable::Absent;
    };
    let other = |why: &str| OwnTable::Other(why.to_string());
    let Ok(doc) = serde_json::from_str::<Value>(listing) else {
        return other("its listing is not the JSON nft prints");
    };
    let Some(items) = doc["nftables"].as_array() else {
        return other("its listing has no nftables array");
    };
    let of = |kind: &str| -> Vec<&Value> { items.iter().filter_map(|i| i.get(kind)).collect() };
    let (chains, rules) = (of("chain"), of("rule"));
    if !of("set").is_empty() || !of("map").is_empty() || !of("flowtable").is_empty() {
        return other("it holds sets, maps or flowtables");
    }
    if !of("counter").is_empty() || !of("quota").is_empty() || !of("limit").is_empty() {
        return other("it holds named objects");
    }
    let [chain] = chains.as_slice() else {
        return other("it does not hold exactly one chain");
    };
    let chain_ok = chain["name"] == CHAIN
        && chain["type"] == "filter"
        && chain["hook"] == "input"
        && chain["prio"] == PRIORITY
        && chain["policy"] == "accept";
    if !chain_ok {
        return other("its chain is not loopguard's input chain");
    }
    let exprs: Vec<&Value> = rules.iter().map(|r| &r["expr"]).collect();
    let expected = expected_exprs();
    if exprs.len() == expected.len() && exprs.iter().zip(&expected).all(|(a, b)| *a == b) {
        return OwnTable::AsWritten;
    }
    let mut left: Vec<&Value> = expected.iter().collect();
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

    /// `nft -j list table inet loopguard` after `nft -f` of [`create_script`] (nft 1.0.6).
    pub const WRITTEN: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "loopguard", "handle": 1}}, {"chain": {"family": "inet", "table": "loopguard", "name": "input", "handle": 1, "type": "filter", "hook": "input", "prio": -150, "policy": "accept"}}, {"rule": {"family": "inet", "table": "loopguard", "chain": "input", "handle": 2, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "lo"}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "loopguard", "chain": "input", "handle": 3, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "127.0.0.0", "len": 8}}}}, {"drop": null}]}}, {"rule": {"family": "inet", "table": "loopguard", "chain": "input", "handle": 4, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "saddr"}}, "right": "::1"}}, {"drop": null}]}}]}"#;

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
    fn own_table_tells_loopguards_table_from_others() {
        assert_eq!(own_table(None), OwnTable::Absent);
        assert_eq!(own_table(Some(WRITTEN)), OwnTable::AsWritten);
        let one_rule_gone = WRITTEN.replace(
            r#", {"rule": {"family": "inet", "table": "loopguard", "chain": "input", "handle": 4, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "saddr"}}, "right": "::1"}}, {"drop": null}]}}"#,
            "",
        );
        assert_eq!(own_table(Some(&one_rule_gone)), OwnTable::Partial);
        let foreign_rule = WRITTEN.replace(r#""right": "::1""#, r#""right": "::2""#);
        assert!(matches!(own_table(Some(&foreign_rule)), OwnTable::Other(_)));
        let other_priority = WRITTEN.replace("\"prio\": -150", "\"prio\": 0");
        assert!(matches!(
            own_table(Some(&other_priority)),
            OwnTable::Other(_)
        ));
        assert!(matches!(own_table(Some("not json")), OwnTable::Other(_)));
    }
}
