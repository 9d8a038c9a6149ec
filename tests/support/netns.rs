//! Throwaway network namespaces for tests: created with `ip netns add`, always deleted on drop
//! (also when the test panics), so the machine's own firewall is never touched.

#![allow(dead_code)]

use loopguard::rules::blob::Table;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A network namespace owned by one test.
pub struct TestNetns {
    pub name: String,
}

impl TestNetns {
    /// Creates `lgt-<tag>-<pid>-<n>` with `lo` up. Panics with a clear message when not root.
    pub fn new(tag: &str) -> TestNetns {
        let name = format!(
            "lgt-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "`ip netns add {name}` failed (these tests need root and iproute2): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = TestNetns { name };
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace; returns its output whatever the status.
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ip netns exec")
    }

    /// The handle of the first rule in loopguard's nftables table whose listing contains `text`
    /// (`nft -a list table inet loopguard`); panics when there is none.
    pub fn loopguard_rule_handle(&self, text: &str) -> String {
        let listing = self.run(&["nft", "-a", "list", "table", "inet", "loopguard"]);
        listing
            .lines()
            .find(|l| l.contains(text))
            .and_then(|l| l.rsplit("# handle ").next())
            .unwrap_or_else(|| panic!("no rule `{text}` in {listing}"))
            .trim()
            .to_string()
    }

    /// Deletes the rule of loopguard's nftables table with `handle`, as an admin would with `nft`.
    pub fn delete_loopguard_rule(&self, handle: &str) {
        self.run(&[
            "nft",
            "delete",
            "rule",
            "inet",
            "loopguard",
            "input",
            "handle",
            handle,
        ]);
    }

    /// Runs a command inside the namespace and insists that it succeeds; returns stdout.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "{args:?} failed in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The legacy filter table of `family` as the kernel hands it over (`*_SO_GET_ENTRIES`: every
    /// entry's bytes, counters and jump offsets included), or `None` when the namespace has none.
    /// Two namespaces hold the same rules, written the same way, exactly when these are equal.
    pub fn legacy_table(&self, family: loopguard::rules::Family) -> Option<Table> {
        let name = self.name.clone();
        std::thread::spawn(move || {
            use loopguard::node::legacy::{FILTER, XtSocket, table_exists};
            loopguard::node::netns::enter(&name).expect("enter the namespace");
            table_exists(family, FILTER).then(|| {
                XtSocket::open(family)
                    .and_then(|s| s.read(FILTER))
                    .expect("read the legacy filter table")
            })
        })
        .join()
        .expect("table reader")
    }

    /// The rules of `chain` (INPUT or OUTPUT) of the legacy filter table, each as its entry's
    /// bytes (counters zeroed). Panics when the table is not there.
    pub fn legacy_entries(
        &self,
        family: loopguard::rules::Family,
        chain: loopguard::rules::Chain,
    ) -> Vec<Vec<u8>> {
        let table = self
            .legacy_table(family)
            .unwrap_or_else(|| panic!("{}: no legacy {family} filter table", self.name));
        table
            .chain(chain)
            .iter()
            .map(|&e| table.fingerprint(e))
            .collect()
    }

    /// `ip6tables-<backend> ARGS` (IPv6) inside the namespace.
    pub fn ip6tables(&self, backend: &str, args: &str) -> String {
        let bin = format!("ip6tables-{backend}");
        let mut argv = vec![bin.as_str()];
        argv.extend(args.split_whitespace());
        self.run(&argv)
    }

    /// Feeds a script to `<family>-<backend>-restore --noflush`.
    pub fn restore(&self, command: &str, backend: &str, script: &str) {
        self.restore_with(command, backend, "--noflush", script);
    }

    /// Feeds a script to `<family>-<backend>-restore FLAG` (`--noflush`, or `-c` to set counters).
    pub fn restore_with(&self, command: &str, backend: &str, flag: &str, script: &str) {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.name,
                &format!("{command}-{backend}-restore"),
                flag,
            ])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "restore failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `ip6tables-<backend>-save` without comments and counters: what must stay byte-identical.
    pub fn save(&self, command: &str, backend: &str) -> String {
        without_counters(&self.run(&[&format!("{command}-{backend}-save")]))
    }

    pub fn set_sysctl(&self, key: &str, value: &str) {
        self.run(&["sysctl", "-q", "-w", &format!("{key}={value}")]);
    }
}

/// `*-save` output without comments and counters: what must stay byte-identical.
pub fn without_counters(save: &str) -> String {
    save.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.find(" [") {
            Some(i) if l.starts_with(':') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The ComplianceAsCode check (`set_ipv6_loopback_traffic`, sce/shared.sh) run on
/// `ip6tables -L -v -n -x` inside network namespace `netns`, with either protocol column style
/// (the older `all`, the newer numeric one). True when a CIS scanner would pass the node.
pub fn scanner_passes(netns: &str, backend: &str) -> bool {
    let script = format!(
        r#"
ipt=ip6tables-{backend}
in_new='\s+[0-9]+\s+[0-9]+\s+ACCEPT\s+[0-9]+\s+--\s+lo\s+\*\s+::\/0\s+::\/0[[:space:]]+[0-9]+\s+[0-9]+\s+DROP\s+[0-9]+\s+--\s+\*\s+\*\s+::1\s+::\/0'
out_new='\s[0-9]+\s+[0-9]+\s+ACCEPT\s+[0-9]+\s+--\s+\*\s+lo\s+::\/0\s+::\/0'
in_old='\s+[0-9]+\s+[0-9]+\s+ACCEPT\s+all\s+lo\s+\*\s+::\/0\s+::\/0[[:space:]]+[0-9]+\s+[0-9]+\s+DROP\s+all\s+\*\s+\*\s+::1\s+::\/0'
out_old='\s[0-9]+\s+[0-9]+\s+ACCEPT\s+all\s+\*\s+lo\s+::\/0\s+::\/0'
for v in new old; do
  eval "ri=\$in_$v; ro=\$out_$v"
  if $ipt -L INPUT -v -n -x | grep -Ezq "$ri" && $ipt -L OUTPUT -v -n -x | grep -Eq "$ro"; then exit 0; fi
done
exit 1
"#
    );
    Command::new("ip")
        .args(["netns", "exec", netns, "bash", "-c", &script])
        .status()
        .is_ok_and(|s| s.success())
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The seed's own remediation script (tests/fixtures/seed-remediation.sh), ready to run as users
/// do today in network namespace `netns`: `ip6tables` is `ip6tables-<backend>`, and `dpkg-query`
/// answers like a host where the rule applies. The two stubs are written into `bin`, a folder of
/// the caller's.
pub fn seed_script(netns: &str, backend: &str, bin: &Path) -> Command {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(bin).expect("stub folder");
    let stubs = [
        (
            "ip6tables",
            format!("#!/bin/sh\nexec ip6tables-{backend} \"$@\"\n"),
        ),
        (
            "dpkg-query",
            "#!/bin/sh\nfor p; do :; done\n[ \"$p\" = iptables ] && echo installed\nexit 0\n"
                .into(),
        ),
    ];
    for (name, text) in stubs {
        let path = bin.join(name);
        std::fs::write(&path, text).expect("stub");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let mut command = Command::new("ip");
    command.args([
        "netns",
        "exec",
        netns,
        "env",
        &format!("PATH={path}"),
        "bash",
    ]);
    command.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/seed-remediation.sh"
    ));
    command
}

/// The entry `ip6tables-legacy` itself writes for `-A CHAIN SPEC` (counters zeroed): written in a
/// namespace of its own and read back. The oracle for "this is loopguard's rule, not a rule that
/// only prints like it"; kept per spec for the test binary's life.
pub fn legacy_entry_of(chain: &str, spec: &str) -> Vec<u8> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    type Known = HashMap<(String, String), Vec<u8>>;
    static KNOWN: Mutex<Option<Known>> = Mutex::new(None);
    let key = (chain.to_string(), spec.to_string());
    if let Some(bytes) = KNOWN
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .get(&key)
    {
        return bytes.clone();
    }
    let ns = TestNetns::new("oracle");
    let mut args = vec!["ip6tables-legacy".to_string(), "-A".into(), chain.into()];
    args.extend(loopguard::rules::split_args(spec));
    ns.run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let chain_of = match chain {
        "INPUT" => loopguard::rules::Chain::Input,
        _ => loopguard::rules::Chain::Output,
    };
    let entries = ns.legacy_entries(loopguard::rules::Family::Ipv6, chain_of);
    assert_eq!(entries.len(), 1, "one rule written");
    KNOWN
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .insert(key, entries[0].clone());
    entries[0].clone()
}
