//! Watching loopguard's rules on a real node without forking `ip6tables`: the legacy kernel table
//! read in a loop over one socket, or every nftables event of the node. A rule of loopguard's that
//! goes missing, for however short a time, shows in one or the other.

#![allow(dead_code)]

use loopguard::rules::{Chain, Family};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The seed's three rules, as `ip6tables -S` prints them.
pub const RULES: [(&str, &str); 3] = [
    ("INPUT", "-i lo -j ACCEPT"),
    ("OUTPUT", "-o lo -j ACCEPT"),
    ("INPUT", "-s ::1/128 -j DROP"),
];

/// What a watch saw: how it watched, how many samples (table reads or events), and how many of
/// them showed loopguard's rules missing (or being removed).
#[derive(Debug)]
pub struct Watched {
    pub how: &'static str,
    pub samples: u64,
    pub missing: u64,
}

/// The legacy node's kernel table, read every 5 ms on a thread inside the node's namespace (one
/// socket, no process forked): (how, reads, reads without one of loopguard's three entries).
pub fn watch_legacy(node: &str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Watched> {
    let expected: Vec<(Chain, Vec<u8>)> = RULES
        .iter()
        .map(|(chain, spec)| {
            let c = if *chain == "INPUT" {
                Chain::Input
            } else {
                Chain::Output
            };
            (c, super::netns::legacy_entry_of(chain, spec))
        })
        .collect();
    let node = node.to_string();
    std::thread::spawn(move || {
        use loopguard::node::legacy::{FILTER, XtSocket};
        loopguard::node::netns::enter(&node).expect("enter the node's namespace");
        let socket = XtSocket::open(Family::Ipv6).expect("the legacy table's socket");
        let (mut reads, mut missing) = (0, 0);
        while !stop.load(Ordering::SeqCst) {
            let table = socket.read(FILTER).expect("read the legacy filter table");
            let present = expected.iter().all(|(chain, entry)| {
                table
                    .chain(*chain)
                    .iter()
                    .any(|&e| table.fingerprint(e) == *entry)
            });
            reads += 1;
            if !present {
                missing += 1;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Watched {
            how: "legacy table reads",
            samples: reads,
            missing,
        }
    })
}

/// `nft -a monitor ruleset` in a node: every event counted, and those that remove one of
/// loopguard's rules (its iptables-nft rules by handle, anything of its own table) or flush a
/// chain or table holding them.
pub struct NftWatch {
    child: std::process::Child,
    reader: std::thread::JoinHandle<(u64, u64)>,
}

impl NftWatch {
    pub fn start(node: &str) -> NftWatch {
        let own = own_handles(node);
        assert_eq!(own.len(), 3, "{node}: loopguard's three rules by handle");
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{node}"))
            .args(["nft", "-a", "monitor", "ruleset"])
            .stdout(Stdio::piped())
            // nft cannot translate some of kube-proxy's xtables targets back ("XT target DNAT
            // not found"): noise on stderr, the events are on stdout.
            .stderr(Stdio::null())
            .spawn()
            .expect("nft monitor");
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let (mut events, mut removing) = (0, 0);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                events += 1;
                if removes_loopguards(&line, &own) {
                    eprintln!("watch: loopguard's rule removed: {line}");
                    removing += 1;
                }
            }
            (events, removing)
        });
        // The monitor's socket is subscribed before the window starts.
        std::thread::sleep(Duration::from_millis(500));
        NftWatch { child, reader }
    }

    pub fn finish(mut self) -> Watched {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (events, removing) = self.reader.join().expect("the nft monitor's reader");
        Watched {
            how: "nftables events",
            samples: events,
            missing: removing,
        }
    }
}

/// The handles of loopguard's three rules in `ip6 filter` (as iptables-nft writes them).
fn own_handles(node: &str) -> BTreeSet<(String, u64)> {
    let mut own = BTreeSet::new();
    for chain in ["INPUT", "OUTPUT"] {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{node}"))
            .args(["nft", "-a", "list", "chain", "ip6", "filter", chain])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{node}: nft list chain {chain}: {out:?}"
        );
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let line = line.trim();
            let ours = (chain == "INPUT"
                && (line.starts_with("iifname \"lo\" counter") && line.contains(" accept #")
                    || line.starts_with("ip6 saddr ::1 counter") && line.contains(" drop #")))
                || (chain == "OUTPUT"
                    && line.starts_with("oifname \"lo\" counter")
                    && line.contains(" accept #"));
            if ours && let Some(h) = line.rsplit("# handle ").next() {
                own.insert((chain.to_string(), h.trim().parse().unwrap()));
            }
        }
    }
    own
}

fn removes_loopguards(event: &str, own: &BTreeSet<(String, u64)>) -> bool {
    if event.contains("inet loopguard") {
        return event.starts_with("delete") || event.starts_with("flush");
    }
    for (chain, handle) in own {
        if event == format!("delete rule ip6 filter {chain} handle {handle}") {
            return true;
        }
    }
    event.starts_with("flush table ip6 filter")
        || event.starts_with("delete table ip6 filter")
        || event.starts_with("flush chain ip6 filter INPUT")
        || event.starts_with("flush chain ip6 filter OUTPUT")
        || event == "flush ruleset"
}
