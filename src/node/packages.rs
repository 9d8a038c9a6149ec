//! What the host has installed and enabled, read under `--host-root` the way ComplianceAsCode's
//! platforms read it: packages from the dpkg status file and from the rpm database (SQLite:
//! RHEL 9+, Fedora, Amazon Linux 2023, Azure Linux), the firewalld unit's enablement from its
//! unit links, and ufw's `ENABLED=` from `/etc/ufw/ufw.conf`. The decision itself is pure
//! (`rules::catalog`).

use crate::rules::catalog::{FIREWALL_PACKAGES, Host, PackageBasis, UfwConf};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Where the rpm database lives, newest layout first.
const RPM_SQLITE: [&str; 2] = [
    "usr/lib/sysimage/rpm/rpmdb.sqlite",
    "var/lib/rpm/rpmdb.sqlite",
];
/// The Berkeley DB rpm database of RHEL 8 and Amazon Linux 2.
const RPM_BDB: &str = "var/lib/rpm/Packages";
const DPKG_STATUS: &str = "var/lib/dpkg/status";
/// Where binaries are looked for on hosts without a package database.
const BIN_DIRS: [&str; 5] = ["usr/sbin", "sbin", "usr/bin", "bin", "usr/local/sbin"];

/// Reads what the rule platforms need from the host.
pub fn read_host(host_root: &Path, ipv6_enabled: bool) -> Host {
    Host {
        packages: packages(host_root),
        binaries: FIREWALL_PACKAGES
            .iter()
            .flat_map(|p| binaries_of(p))
            .filter(|b| binary_present(host_root, b))
            .map(|b| b.to_string())
            .collect(),
        firewalld_enabled: firewalld_enabled(host_root),
        ufw: ufw_conf(host_root),
        ipv6_enabled,
        os_id: os_id(host_root),
    }
}

/// `ID=` of the host's os-release (`/etc/os-release`, else `/usr/lib/os-release`).
fn os_id(root: &Path) -> Option<String> {
    ["etc/os-release", "usr/lib/os-release"]
        .iter()
        .find_map(|p| std::fs::read_to_string(root.join(p)).ok())
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("ID="))
                .map(|id| id.trim().trim_matches('"').to_string())
        })
}

fn binaries_of(package: &str) -> &'static [&'static str] {
    match package {
        "iptables" => &["iptables", "ip6tables"],
        "nftables" => &["nft"],
        "ufw" => &["ufw"],
        "firewalld" => &["firewalld"],
        _ => &[],
    }
}

fn binary_present(root: &Path, name: &str) -> bool {
    BIN_DIRS
        .iter()
        .map(|dir| root.join(dir).join(name))
        // symlink_metadata: an absolute symlink under a mounted host root points into our own
        // filesystem, so its presence is the fact, not its target.
        .any(|path: PathBuf| std::fs::symlink_metadata(path).is_ok())
}

/// The firewall packages installed, from every package database the host has.
fn packages(root: &Path) -> PackageBasis {
    let mut installed = BTreeSet::new();
    let mut sources = Vec::new();
    let dpkg = root.join(DPKG_STATUS);
    if dpkg.exists() {
        match std::fs::read(&dpkg) {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => {
                    installed.extend(dpkg_installed(&text));
                    sources.push(format!("dpkg status {}", dpkg.display()));
                }
                Err(_) => {
                    return PackageBasis::Unreadable(format!(
                        "the dpkg status file {} is not text (corrupt?): repair it with dpkg, or set applicability Always",
                        dpkg.display()
                    ));
                }
            },
            Err(e) => {
                return PackageBasis::Unreadable(format!(
                    "cannot read the dpkg status file {}: {e}",
                    dpkg.display()
                ));
            }
        }
    }
    if let Some(sqlite) = RPM_SQLITE.iter().map(|p| root.join(p)).find(|p| p.exists()) {
        match rpm_sqlite_installed(&sqlite) {
            Ok(names) => {
                installed.extend(names);
                sources.push(format!("rpm database {}", sqlite.display()));
            }
            Err(e) => {
                return PackageBasis::Unreadable(format!(
                    "cannot read the rpm database {}: {e}; check it with `rpm --verifydb` on the node, or set applicability Always",
                    sqlite.display()
                ));
            }
        }
    } else if root.join(RPM_BDB).exists() && sources.is_empty() {
        return PackageBasis::NoDatabase(format!(
            "the rpm database {} is Berkeley DB (RHEL 8, Amazon Linux 2), which loopguard does not read; decided from the binaries found instead",
            root.join(RPM_BDB).display()
        ));
    }
    if sources.is_empty() {
        return PackageBasis::NoDatabase(format!(
            "no dpkg or rpm database under {}; decided from the binaries found",
            root.display()
        ));
    }
    PackageBasis::Installed {
        packages: installed,
        source: sources.join(" and "),
    }
}

/// The firewall packages whose dpkg status is `installed` (the seed's `dpkg-query
/// --showformat='${db:Status-Status}'` test).
pub fn dpkg_installed(status_file: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for paragraph in status_file.split("\n\n") {
        let field = |name: &str| {
            paragraph
                .lines()
                .find_map(|l| l.strip_prefix(name).map(str::trim))
        };
        let (Some(package), Some(status)) = (field("Package:"), field("Status:")) else {
            continue;
        };
        if status.split_whitespace().nth(2) == Some("installed")
            && FIREWALL_PACKAGES.contains(&package)
        {
            found.insert(package.to_string());
        }
    }
    found
}

/// The firewall packages in an rpm SQLite database: its `Name` index holds one key per installed
/// package (what `rpm -q NAME` looks up). Opened read-only, never written.
fn rpm_sqlite_installed(path: &Path) -> Result<BTreeSet<String>, rusqlite::Error> {
    use rusqlite::{Connection, OpenFlags};
    // immutable=1: no lock, no journal, nothing written next to the host's database.
    let uri = format!("file:{}?immutable=1", path.display());
    let db = Connection::open_with_flags(
        uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
    )?;
    let mut names = BTreeSet::new();
    let mut query = db.prepare("SELECT key FROM Name")?;
    let rows = query.query_map([], |row| row.get::<_, String>(0))?;
    for name in rows {
        let name = name?;
        if FIREWALL_PACKAGES.contains(&name.as_str()) {
            names.insert(name);
        }
    }
    Ok(names)
}

/// Whether the firewalld unit is enabled: a link to it in a `.wants` folder of the host's
/// systemd configuration, and the unit not masked. ComplianceAsCode's OVAL for
/// `service_disabled[firewalld]` asks exactly this (not whether it runs now).
fn firewalld_enabled(root: &Path) -> bool {
    let system = root.join("etc/systemd/system");
    let masked = std::fs::read_link(system.join("firewalld.service"))
        .is_ok_and(|target| target == Path::new("/dev/null"));
    if masked {
        return false;
    }
    let Ok(entries) = std::fs::read_dir(&system) else {
        return false;
    };
    entries.flatten().any(|entry| {
        entry.file_name().to_string_lossy().ends_with(".wants")
            && std::fs::symlink_metadata(entry.path().join("firewalld.service")).is_ok()
    })
}

/// Whether ufw is enabled (`ENABLED=yes` in `/etc/ufw/ufw.conf`, which `ufw enable` writes).
fn ufw_conf(root: &Path) -> UfwConf {
    let path = root.join("etc/ufw/ufw.conf");
    match std::fs::read_to_string(&path) {
        Ok(conf) => {
            let enabled = conf.lines().any(|l| {
                l.trim().trim_matches('"') == "ENABLED=yes" || l.trim() == "ENABLED=\"yes\""
            });
            if enabled {
                UfwConf::Enabled
            } else {
                UfwConf::Disabled
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => UfwConf::Disabled,
        Err(e) => UfwConf::Unreadable(format!("cannot read {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn write(root: &Path, path: &str, text: &str) {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// An rpm SQLite database the way rpm lays out its `Name` index.
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
            db.execute(
                "INSERT INTO Packages (hnum, blob) VALUES (?1, x'00')",
                [i as i64 + 1],
            )
            .unwrap();
            db.execute(
                "INSERT INTO Name (key, hnum, idx) VALUES (?1, ?2, 0)",
                (name, i as i64 + 1),
            )
            .unwrap();
        }
    }

    fn installed(basis: &PackageBasis) -> Vec<String> {
        match basis {
            PackageBasis::Installed { packages, .. } => packages.iter().cloned().collect(),
            other => panic!("no package list: {other:?}"),
        }
    }

    #[test]
    fn dpkg_counts_only_installed_firewall_packages() {
        let status = "Package: iptables\nStatus: install ok installed\nVersion: 1.8.9\n\n\
            Package: nftables\nStatus: deinstall ok config-files\n\n\
            Package: ufw\nStatus: install ok unpacked\n\n\
            Package: libnftables1\nStatus: install ok installed\n";
        assert_eq!(
            dpkg_installed(status).into_iter().collect::<Vec<_>>(),
            vec!["iptables"]
        );
    }

    #[test]
    fn rpm_sqlite_is_read_in_either_place() {
        for path in RPM_SQLITE {
            let r = root();
            rpmdb(
                r.path(),
                path,
                &["nftables", "iptables-nft", "bash", "firewalld"],
            );
            let basis = packages(r.path());
            assert_eq!(installed(&basis), vec!["firewalld", "nftables"]);
            assert!(basis.describe().contains("rpm database"), "{basis:?}");
        }
    }

    #[test]
    fn dpkg_and_rpm_together_are_one_list() {
        let r = root();
        write(
            r.path(),
            DPKG_STATUS,
            "Package: ufw\nStatus: install ok installed\n",
        );
        rpmdb(r.path(), RPM_SQLITE[1], &["nftables"]);
        let basis = packages(r.path());
        assert_eq!(installed(&basis), vec!["nftables", "ufw"]);
        assert!(basis.describe().contains(" and "));
    }

    #[test]
    fn corrupt_databases_are_said_so() {
        let r = root();
        write(r.path(), RPM_SQLITE[0], "this is not a database");
        match packages(r.path()) {
            PackageBasis::Unreadable(why) => {
                assert!(why.contains("cannot read the rpm database"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        let r = root();
        let path = r.path().join(DPKG_STATUS);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, [0xff, 0xfe, 0x00]).unwrap();
        assert!(matches!(packages(r.path()), PackageBasis::Unreadable(_)));
    }

    #[test]
    fn berkeley_db_and_no_database_fall_back_to_the_binaries() {
        let r = root();
        write(r.path(), RPM_BDB, "\0\0\0\0");
        match packages(r.path()) {
            PackageBasis::NoDatabase(why) => assert!(why.contains("Berkeley DB"), "{why}"),
            other => panic!("{other:?}"),
        }
        let r = root();
        write(r.path(), "usr/sbin/nft", "");
        write(
            r.path(),
            "usr/lib/os-release",
            "NAME=Bottlerocket\nID=\"bottlerocket\"\n",
        );
        assert!(matches!(packages(r.path()), PackageBasis::NoDatabase(_)));
        let host = read_host(r.path(), true);
        assert_eq!(host.binaries, BTreeSet::from(["nft".to_string()]));
        assert_eq!(host.os_id.as_deref(), Some("bottlerocket"));
    }

    #[test]
    fn firewalld_enabled_is_read_from_unit_links_and_ufw_from_its_conf() {
        let r = root();
        assert!(!firewalld_enabled(r.path()));
        let wants = r.path().join("etc/systemd/system/multi-user.target.wants");
        std::fs::create_dir_all(&wants).unwrap();
        std::os::unix::fs::symlink(
            "/usr/lib/systemd/system/firewalld.service",
            wants.join("firewalld.service"),
        )
        .unwrap();
        assert!(firewalld_enabled(r.path()));
        std::os::unix::fs::symlink(
            "/dev/null",
            r.path().join("etc/systemd/system/firewalld.service"),
        )
        .unwrap();
        assert!(!firewalld_enabled(r.path()), "masked");

        assert_eq!(ufw_conf(r.path()), UfwConf::Disabled);
        write(
            r.path(),
            "etc/ufw/ufw.conf",
            "# comment\nENABLED=no\nLOGLEVEL=low\n",
        );
        assert_eq!(ufw_conf(r.path()), UfwConf::Disabled);
        write(r.path(), "etc/ufw/ufw.conf", "ENABLED=yes\n");
        assert_eq!(ufw_conf(r.path()), UfwConf::Enabled);
        // A folder where the file should be: unreadable, and it says why.
        std::fs::remove_file(r.path().join("etc/ufw/ufw.conf")).unwrap();
        std::fs::create_dir(r.path().join("etc/ufw/ufw.conf")).unwrap();
        assert!(matches!(ufw_conf(r.path()), UfwConf::Unreadable(why) if why.contains("ufw.conf")),);
    }
}
