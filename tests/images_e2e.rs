//! Supported nodes, end to end: one hollow node per node image of the README's "Supported nodes"
//! table, each with a host root laid out as that image has it (the dpkg status file or the rpm
//! SQLite database at the image's path, firewalld's unit links, ufw's `ufw.conf`, `os-release`,
//! the binaries; no package database at all for Bottlerocket), the chart installed as users
//! install it, and one policy (`nftables: Enforce`, `ufw: Report`, `firewalld: Report`). Each
//! node's state must list exactly the rules ComplianceAsCode would apply to that image, and pass
//! the ones loopguard enforces.

mod support;

use kube::api::{Api, PostParams};
use loopguard::api::{LoopbackNodeState, LoopbackNodeStateStatus, LoopbackPolicy};
use serde_json::json;
use std::path::Path;
use std::time::Duration;
use support::cluster::eventually;
use support::deploy::{self, has_loopguard_table, install_packages};
use support::netns::scanner_passes;

const NS: &str = "loopguard-system";

/// One node image: how its root looks, and which rules ComplianceAsCode applies to it.
struct Image {
    name: &'static str,
    lay_out: fn(&Path),
    /// The rule ids that apply, in catalog order.
    applies: &'static [&'static str],
}

const SEED: &str = "set_ipv6_loopback_traffic";
const SEED_V4: &str = "set_loopback_traffic";
const NFT: &str = "set_nftables_loopback_traffic";
const UFW: &str = "set_ufw_loopback_traffic";
const FIREWALLD: [&str; 2] = [
    "firewalld_loopback_traffic_trusted",
    "firewalld_loopback_traffic_restricted",
];

fn write(root: &Path, path: &str, text: &str) {
    let path = root.join(path);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn os_release(root: &Path, id: &str) {
    write(root, "etc/os-release", &format!("ID={id}\nNAME=\"{id}\"\n"));
}

/// An rpm SQLite database at `path`, laid out as rpm lays out its `Name` index.
fn rpmdb(root: &Path, path: &str, names: &[&str]) {
    let path = root.join(path);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let db = rusqlite::Connection::open(&path).unwrap();
    db.execute_batch(
        "CREATE TABLE Packages (hnum INTEGER PRIMARY KEY AUTOINCREMENT, blob BLOB NOT NULL);
         CREATE TABLE Name (key TEXT NOT NULL, hnum INTEGER NOT NULL, idx INTEGER NOT NULL,
                            FOREIGN KEY (hnum) REFERENCES Packages(hnum));",
    )
    .unwrap();
    for (i, name) in names.iter().enumerate() {
        let hnum = i as i64 + 1;
        db.execute(
            "INSERT INTO Packages (hnum, blob) VALUES (?1, x'00')",
            [hnum],
        )
        .unwrap();
        db.execute(
            "INSERT INTO Name (key, hnum, idx) VALUES (?1, ?2, 0)",
            (name, hnum),
        )
        .unwrap();
    }
}

fn ubuntu_2404(root: &Path) {
    install_packages(root, &["iptables", "nftables", "ufw"]);
    write(root, "etc/ufw/ufw.conf", "ENABLED=no\nLOGLEVEL=low\n");
    os_release(root, "ubuntu");
}

fn aks_ubuntu(root: &Path) {
    install_packages(root, &["iptables", "nftables"]);
    os_release(root, "ubuntu");
}

fn al2023(root: &Path) {
    rpmdb(
        root,
        "var/lib/rpm/rpmdb.sqlite",
        &["bash", "iptables-nft", "iptables-libs", "nftables"],
    );
    os_release(root, "amzn");
}

fn azure_linux(root: &Path) {
    rpmdb(
        root,
        "var/lib/rpm/rpmdb.sqlite",
        &["bash", "iptables", "nftables"],
    );
    os_release(root, "azurelinux");
}

fn rhcos(root: &Path) {
    rpmdb(
        root,
        "usr/lib/sysimage/rpm/rpmdb.sqlite",
        &["bash", "iptables-nft", "nftables"],
    );
    os_release(root, "rhcos");
}

fn rhel_firewalld(root: &Path) {
    rpmdb(
        root,
        "var/lib/rpm/rpmdb.sqlite",
        &["bash", "iptables-nft", "nftables", "firewalld"],
    );
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants).unwrap();
    std::os::unix::fs::symlink(
        "/usr/lib/systemd/system/firewalld.service",
        wants.join("firewalld.service"),
    )
    .unwrap();
    os_release(root, "rhel");
}

fn debian_12_cloud(root: &Path) {
    install_packages(root, &["iptables"]);
    os_release(root, "debian");
}

fn bottlerocket(root: &Path) {
    for binary in [
        "iptables",
        "ip6tables",
        "iptables-legacy",
        "ip6tables-legacy",
    ] {
        write(root, &format!("usr/sbin/{binary}"), "");
    }
    os_release(root, "bottlerocket");
}

const IMAGES: [Image; 8] = [
    Image {
        name: "Ubuntu 24.04",
        lay_out: ubuntu_2404,
        applies: &[NFT, UFW],
    },
    Image {
        name: "AKS Ubuntu",
        lay_out: aks_ubuntu,
        applies: &[NFT],
    },
    Image {
        name: "Amazon Linux 2023",
        lay_out: al2023,
        applies: &[NFT],
    },
    Image {
        name: "Azure Linux",
        lay_out: azure_linux,
        applies: &[NFT],
    },
    Image {
        name: "RHCOS",
        lay_out: rhcos,
        applies: &[NFT],
    },
    Image {
        name: "RHEL with firewalld",
        lay_out: rhel_firewalld,
        applies: &FIREWALLD,
    },
    Image {
        name: "Debian 12 cloud",
        lay_out: debian_12_cloud,
        applies: &[SEED, SEED_V4],
    },
    Image {
        name: "Bottlerocket",
        lay_out: bottlerocket,
        applies: &[SEED, SEED_V4],
    },
];

fn applying(status: &LoopbackNodeStateStatus) -> Vec<String> {
    status
        .checks
        .iter()
        .filter(|c| c.applies == Some(true))
        .map(|c| c.id.clone())
        .collect()
}

fn verdict<'a>(status: &'a LoopbackNodeStateStatus, id: &str) -> (&'a str, &'a str) {
    let check = status
        .checks
        .iter()
        .find(|c| c.id == id)
        .unwrap_or_else(|| panic!("no {id} in {:?}", status.checks));
    (check.verdict.as_str(), check.reason.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_supported_image_gets_exactly_the_rules_compliance_as_code_applies() {
    let Some(cluster) = support::cluster::private("img") else {
        return;
    };
    let client = cluster.client().await;
    let mut options = deploy::with_image(cluster.hollow_options("img", IMAGES.len()));
    options
        .node_labels
        .insert("loopguard.dev/img".into(), "yes".into());
    let names = options.nodes.clone();
    for (node, image) in names.iter().zip(&IMAGES) {
        (image.lay_out)(&options.node_root(node));
    }
    let hollow = cluster.start_nodes(options).await;
    deploy::install(
        &cluster,
        NS,
        &[
            "agent.resync=600",
            "logFormat=plain",
            "controller.leaseDuration=5",
        ],
    );
    deploy::wait_agents_ready(&client, NS, &names).await;

    let policies: Api<LoopbackPolicy> = Api::all(client.clone());
    let policy: LoopbackPolicy = serde_json::from_value(json!({
        "apiVersion": "loopguard.dev/v1alpha1", "kind": "LoopbackPolicy",
        "metadata": {"name": "images"},
        "spec": {
            "nodeSelector": {"matchLabels": {"loopguard.dev/img": "yes"}},
            "ruleFamilies": {"nftables": "Enforce", "ufw": "Report", "firewalld": "Report"},
        },
    }))
    .unwrap();
    policies
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();

    let states: Api<LoopbackNodeState> = Api::all(client.clone());
    let generation = eventually(
        "the policy's generation",
        Duration::from_secs(10),
        || async { policies.get("images").await.ok()?.metadata.generation },
    )
    .await;
    for (node, image) in names.iter().zip(&IMAGES) {
        let status = eventually(
            &format!("{} ({node}) reports the policy", image.name),
            Duration::from_secs(60),
            || async {
                let status = states.get(node).await.ok()?.status?;
                (status.policy_name.as_deref() == Some("images")
                    && status.policy_generation == Some(generation)
                    && !status.checks.is_empty())
                .then_some(status)
            },
        )
        .await;
        assert_eq!(
            applying(&status),
            image.applies,
            "{}: the rules that apply ({:?})",
            image.name,
            status.checks
        );
        for id in image.applies {
            let (verdict, reason) = verdict(&status, id);
            let expected = match *id {
                // Enforced: the iptables rule for the IPv6 family the policy asks for, the nftables rule.
                SEED | NFT => ("Pass", "RulesInPlace"),
                // The policy's ipFamilies leave the IPv4 sibling out.
                SEED_V4 => ("Ignored", "FamilyIgnored"),
                // Installed, never enabled by loopguard.
                UFW => ("Fail", "UfwInactive"),
                _ => ("Unknown", "NotChecked"),
            };
            assert_eq!((verdict, reason), expected, "{}: {id}", image.name);
        }
        let wrote_table = has_loopguard_table(node);
        assert_eq!(
            wrote_table,
            image.applies.contains(&NFT),
            "{}: loopguard's nftables table only where the nftables rule applies",
            image.name
        );
        if image.applies.contains(&SEED) {
            assert!(scanner_passes(node, "nft") || scanner_passes(node, "legacy"));
        }
    }
    // The images without a package database say what the decision rests on and which benchmark
    // their vendor has.
    let bottlerocket = states.get(&names[7]).await.unwrap().status.unwrap();
    let why = &bottlerocket
        .checks
        .iter()
        .find(|c| c.id == SEED)
        .unwrap()
        .why;
    assert!(why.contains("binaries"), "{why}");
    assert!(why.contains("3.4.2.2"), "{why}");

    // The policy counts them per rule id.
    let status = eventually(
        "the roll-up of every node",
        Duration::from_secs(30),
        || async {
            let status = policies.get("images").await.ok()?.status?;
            (status.pending_nodes == 0 && status.targeted_nodes == IMAGES.len() as i32)
                .then_some(status)
        },
    )
    .await;
    let tally = |id: &str| status.rules.iter().find(|r| r.id == id).cloned().unwrap();
    assert_eq!(tally(NFT).pass, 5, "{:?}", status.rules);
    assert_eq!(tally(SEED).pass, 2, "{:?}", status.rules);
    assert_eq!(tally(UFW).fail, 1, "{:?}", status.rules);
    assert_eq!(tally(FIREWALLD[0]).unknown, 1, "{:?}", status.rules);
    hollow.shutdown(Duration::from_secs(5)).await.unwrap();
}
