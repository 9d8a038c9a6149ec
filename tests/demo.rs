//! `loopguard demo`, the README's first command, runs to its end on this machine: the seed's
//! rules enforced, repaired and cleaned up, then loopguard's nftables table on a node with
//! nftables installed. Needs root.

use std::process::Command;

#[test]
fn the_demo_runs_to_its_end() {
    let out = Command::new(env!("CARGO_BIN_EXE_loopguard"))
        .arg("demo")
        .output()
        .expect("run loopguard demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "put the rule back",
        "removed 3 rule(s) loopguard had inserted",
        "nftables:   create table inet loopguard",
        "COMPLIANT: RulesInPlace (every loopback rule that applies is in place: set_nftables_loopback_traffic)",
        "nftables:   delete table inet loopguard",
    ] {
        assert!(stdout.contains(expected), "{expected:?} not in:\n{stdout}");
    }
}
