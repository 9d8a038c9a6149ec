//! Random INPUT and OUTPUT chains from a grammar of real ip6tables rules, written the way
//! `ip6tables -S` prints them, with loopguard's own rules among them at random places
//! (duplicated, misordered, look-alikes with comments or extra matches, empty rules, a catch-all
//! at the end). Shared by the property tests of the pure core and the differential tests on the
//! kernel, with a model of how iptables applies edits that does not use loopguard's code.

#![allow(dead_code)]

use proptest::prelude::*;

/// How many random cases a differential test runs: `LOOPGUARD_DIFF_CASES`, 100 by default.
pub fn budget() -> u32 {
    std::env::var("LOOPGUARD_DIFF_CASES")
        .ok()
        .map(|v| v.parse().expect("LOOPGUARD_DIFF_CASES is a number"))
        .unwrap_or(100)
}

/// The seed of a differential run: `LOOPGUARD_DIFF_SEED` (to replay one), else the clock.
pub fn seed() -> u64 {
    match std::env::var("LOOPGUARD_DIFF_SEED") {
        Ok(v) => v.parse().expect("LOOPGUARD_DIFF_SEED is a number"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    }
}

/// A proptest runner for a differential test: `budget()` cases from `seed()` (printed with
/// `label`, so a failure can be replayed), shrinking at most `max_shrink_iters` times. Returns
/// the runner and the seed.
pub fn runner(label: &str, max_shrink_iters: u32) -> (proptest::test_runner::TestRunner, u64) {
    use proptest::test_runner::{RngAlgorithm, TestRng, TestRunner};
    let (cases, seed) = (budget(), seed());
    eprintln!("{label}{cases} cases, seed {seed} (replay with LOOPGUARD_DIFF_SEED={seed})");
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = ProptestConfig {
        cases,
        failure_persistence: None,
        max_shrink_iters,
        ..ProptestConfig::default()
    };
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
    (TestRunner::new_with_rng(config, rng), seed)
}

pub const ACCEPT_IN: &str = "-i lo -j ACCEPT";
pub const DROP_SRC: &str = "-s ::1/128 -j DROP";
pub const ACCEPT_OUT: &str = "-o lo -j ACCEPT";

/// The user chains the generated rules may jump to.
pub const USER_CHAINS: [&str; 2] = ["LG-USER-0", "LG-USER-1"];

/// Whether `spec` is exactly one of loopguard's rules (the only rules it may ever own).
pub fn is_baseline(spec: &str) -> bool {
    [ACCEPT_IN, DROP_SRC, ACCEPT_OUT].contains(&spec)
}

/// An argument as `ip6tables -S` prints it (xtables_save_string): bare when it is only letters,
/// digits, `_` and `-`; else in double quotes, with `"`, `\` and `'` escaped.
pub fn save_string(value: &str) -> String {
    let bare = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        return value.to_string();
    }
    let mut out = String::from("\"");
    for c in value.chars() {
        if matches!(c, '"' | '\\' | '\'') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

fn comment_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("ssh".to_string()),
        Just("allow web".to_string()),
        Just("team \"blue\" rule".to_string()),
        Just("it's a back\\slash".to_string()),
        Just("two\nlines".to_string()),
        Just("-i lo -j ACCEPT".to_string()),
    ]
}

/// Rules other tools write to INPUT.
fn foreign_input() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        (1u16..=65535).prop_map(|p| format!("-p tcp -m tcp --dport {p} -j ACCEPT")),
        (1u16..=0xffff).prop_map(|n| format!("-s 2001:db8::{n:x}/128 -j DROP")),
        (1u16..=65535)
            .prop_map(|p| format!("-d 2001:db8:1::/64 -p udp -m udp --dport {p} -j ACCEPT")),
        (0u8..4).prop_map(|n| format!("-i eth{n} -j ACCEPT")),
        Just("! -i lo -j DROP".to_string()),
        Just("-i lo+ -j ACCEPT".to_string()),
        comment_text().prop_map(|c| format!("-m comment --comment {} -j ACCEPT", save_string(&c))),
        Just("-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".to_string()),
        (0usize..USER_CHAINS.len()).prop_map(|n| format!("-j {}", USER_CHAINS[n])),
        Just("-p ipv6-icmp -m icmp6 --icmpv6-type 128 -j ACCEPT".to_string()),
        Just("-j LOG --log-prefix \"lg: \"".to_string()),
        Just("-m mark --mark 0x1 -j RETURN".to_string()),
    ]
}

/// Rules that print exactly like one of loopguard's (`-S` drops `-p all`), yet on the legacy
/// backend are other entries: `ip6tables -D` leaves them, and so must loopguard. On nft they are
/// the same rule as loopguard's.
pub const SAME_TEXT: [&str; 4] = [
    "-i lo -p all -j ACCEPT",
    "-i lo -p 0 -j ACCEPT",
    "-s ::1/128 -p all -j DROP",
    "-o lo -p all -j ACCEPT",
];

/// A rule as `-S` prints it: the generated spec without `-p all` (`-p 0`), which it never shows.
pub fn listed(spec: &str) -> String {
    spec.replace(" -p all", "").replace(" -p 0", "")
}

/// A rule as loopguard's legacy reader sees it: as `-S` prints it, marked as a look-alike where
/// that text is one of loopguard's rules but the rule written is not.
pub fn legacy_view(spec: &str) -> String {
    let text = listed(spec);
    if text != spec && is_baseline(&text) {
        format!("{}{text}", loopguard::rules::LOOK_ALIKE)
    } else {
        text
    }
}

/// Whether the kernel holds `a` and `b` as the same rule: on legacy only when written alike
/// (the protocol flag of `-p all` is in the entry), on nft when they print alike.
pub fn same_rule(backend: &str, a: &str, b: &str) -> bool {
    if backend == "legacy" {
        a == b
    } else {
        listed(a) == listed(b)
    }
}

/// Rules that look like loopguard's but are not (some of which the scanners still accept).
fn look_alike_input() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(SAME_TEXT[0].to_string()),
        Just(SAME_TEXT[1].to_string()),
        Just(SAME_TEXT[2].to_string()),
        Just("-i lo -m comment --comment loopback -j ACCEPT".to_string()),
        Just("-s ::1/128 -i eth0 -j DROP".to_string()),
        Just("-i lo -p tcp -j ACCEPT".to_string()),
        Just("-s ::1/128 -p udp -j DROP".to_string()),
        Just("-s ::1/128 -m comment --comment \"anti spoof\" -j DROP".to_string()),
        Just("! -s ::1/128 -j DROP".to_string()),
        Just("-s ::1/128 -j REJECT --reject-with icmp6-port-unreachable".to_string()),
        Just("-i lo -j DROP".to_string()),
    ]
}

fn catch_all() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("-j REJECT --reject-with icmp6-port-unreachable".to_string()),
        Just("-j DROP".to_string()),
        Just("-m comment --comment \"default deny\" -j DROP".to_string()),
    ]
}

fn input_rule() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => foreign_input(),
        2 => look_alike_input(),
        2 => Just(ACCEPT_IN.to_string()),
        2 => Just(DROP_SRC.to_string()),
        1 => catch_all(),
    ]
}

fn output_rule() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (1u16..=65535).prop_map(|p| format!("-p tcp -m tcp --dport {p} -j ACCEPT")),
        1 => Just("-d 2001:db8::1/128 -j REJECT --reject-with icmp6-port-unreachable".to_string()),
        1 => Just("-o eth0 -j ACCEPT".to_string()),
        1 => Just("-o lo -p tcp -m tcp --dport 80 -j ACCEPT".to_string()),
        1 => Just("-o lo -m comment --comment x -j ACCEPT".to_string()),
        1 => Just(SAME_TEXT[3].to_string()),
        1 => Just(format!("-j {}", USER_CHAINS[0])),
        1 => Just(String::new()),
        2 => Just(ACCEPT_OUT.to_string()),
    ]
}

/// One generated node: its INPUT and OUTPUT rules, as specs without `-A CHAIN`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chains {
    pub input: Vec<String>,
    pub output: Vec<String>,
}

pub fn chains() -> impl Strategy<Value = Chains> {
    (
        prop::collection::vec(input_rule(), 0..10),
        prop::option::weighted(0.3, catch_all()),
        prop::collection::vec(output_rule(), 0..5),
    )
        .prop_map(|(mut input, last, output)| {
            input.extend(last);
            Chains { input, output }
        })
}

/// A rule another program inserts or appends while loopguard runs.
pub fn foreign_writer_rule() -> impl Strategy<Value = String> {
    prop_oneof![4 => foreign_input(), 1 => look_alike_input()]
}

impl Chains {
    /// The `ip6tables-restore --noflush` script that loads the chains into a fresh filter table.
    pub fn restore_script(&self) -> String {
        let mut s = String::from("*filter\n");
        for chain in USER_CHAINS {
            s.push_str(&format!(":{chain} - [0:0]\n"));
        }
        for (name, rules) in [("INPUT", &self.input), ("OUTPUT", &self.output)] {
            for rule in rules {
                s.push_str(&rule_line(name, rule));
                s.push('\n');
            }
        }
        s.push_str("COMMIT\n");
        s
    }
}

/// `-A CHAIN SPEC` (just `-A CHAIN` for an empty rule), as `-S` prints it.
pub fn rule_line(chain: &str, spec: &str) -> String {
    if spec.is_empty() {
        format!("-A {chain}")
    } else {
        format!("-A {chain} {spec}")
    }
}

/// `ip6tables -S CHAIN` for a chain holding `rules` (policy ACCEPT).
pub fn listing(chain: &str, rules: &[String]) -> String {
    let mut s = format!("-P {chain} ACCEPT\n");
    for rule in rules {
        s.push_str(&rule_line(chain, &listed(rule)));
        s.push('\n');
    }
    s
}

/// How `ip6tables-legacy` applies one edit to a chain: `-I N`, `-A`, or `-D SPEC` (the first
/// identical rule; a look-alike is not one). Panics when a delete finds nothing: iptables would
/// reject the whole transaction.
pub fn apply_edit(rules: &mut Vec<String>, action: &str, position: Option<usize>, spec: &str) {
    apply_edit_on("legacy", rules, action, position, spec)
}

/// [`apply_edit`] as `backend`'s iptables does it (see [`same_rule`]).
pub fn apply_edit_on(
    backend: &str,
    rules: &mut Vec<String>,
    action: &str,
    position: Option<usize>,
    spec: &str,
) {
    match action {
        "insert" => {
            let at = position.expect("insert has a position") - 1;
            assert!(
                at <= rules.len(),
                "insert at {} into {} rules",
                at + 1,
                rules.len()
            );
            rules.insert(at, spec.to_string());
        }
        "append" => rules.push(spec.to_string()),
        "delete" => {
            let at = rules
                .iter()
                .position(|r| same_rule(backend, r, spec))
                .unwrap_or_else(|| panic!("-D {spec}: no such rule in {rules:?}"));
            rules.remove(at);
        }
        other => panic!("unknown edit {other}"),
    }
}

/// The rules of `rules` that are not exactly loopguard's, in order.
pub fn foreign(rules: &[String]) -> Vec<String> {
    rules.iter().filter(|r| !is_baseline(r)).cloned().collect()
}
