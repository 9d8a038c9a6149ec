//! The state file: which rules loopguard inserted on this node, so that cleanup removes exactly
//! those, also after a restart. Written atomically (temporary file, fsync, rename). Every
//! loopguard process that writes to a node's firewall (the agent, `loopguard node` run by hand,
//! a second agent during an upgrade) first takes the lock beside it, so the state file is never
//! read, planned against and written by two at once.

use super::iptables::Backend;
use super::lock::{FileLock, flock_within};
use crate::rules::Ownership;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_PATH: &str = "/var/lib/loopguard/state.json";
const VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct State {
    pub version: u32,
    /// The backend whose tables hold the owned rules.
    pub backend: Backend,
    #[serde(flatten)]
    pub ownership: Ownership,
    /// loopguard's nftables table (`table inet loopguard`): `pending` is written before the
    /// transaction that creates it, `owned` after; absent when loopguard has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nft_table: Option<NftTable>,
    /// The ufw rules loopguard added (recorded before `ufw` runs): cleanup deletes these, and
    /// only these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ufw_rules: Vec<crate::rules::ufw::UfwRule>,
}

/// What the state file says of loopguard's nftables table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum NftTable {
    /// A transaction creating it was about to run (settled by the next look at the table).
    Pending,
    /// loopguard created it: cleanup deletes it.
    Owned,
}

impl State {
    /// Whether it records nothing loopguard owns (then there is no file).
    pub fn owns_nothing(&self) -> bool {
        self.ownership.is_empty() && self.nft_table.is_none() && self.ufw_rules.is_empty()
    }

    pub fn new(backend: Backend, ownership: Ownership) -> State {
        State {
            version: VERSION,
            backend,
            ownership,
            nft_table: None,
            ufw_rules: Vec::new(),
        }
    }
}

/// Where the state lives.
#[derive(Clone, Debug)]
pub struct StateFile {
    pub path: PathBuf,
}

impl StateFile {
    pub fn new(path: impl Into<PathBuf>) -> StateFile {
        StateFile { path: path.into() }
    }

    fn error(&self, problem: impl Into<String>) -> Error {
        Error::StateFile {
            path: self.path.clone(),
            problem: problem.into(),
        }
    }

    /// The recorded state; `None` when there is no file (nothing owned yet).
    pub fn load(&self) -> Result<Option<State>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.error(format!("cannot read it: {e}"))),
        };
        let corrupt = |detail: String| {
            self.error(format!(
                "it is not a loopguard state file ({detail}). loopguard will not guess which rules it owns: \
                 move the file aside and run `loopguard node check` to see the rules; rules it had inserted \
                 will then be treated as adopted and never deleted"
            ))
        };
        // The version first: a newer loopguard may have written fields this one does not know.
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        if let Ok(Versioned { version }) = serde_json::from_str::<Versioned>(&text)
            && version > VERSION
        {
            return Err(self.error(format!(
                "it was written by a newer loopguard (state version {version}; this one reads version {VERSION}). \
                 Run the newer loopguard (finish or roll forward the upgrade); this one will not guess which rules it owns"
            )));
        }
        let state: State = serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        if state.version != VERSION {
            return Err(corrupt(format!(
                "version {} where {VERSION} was expected",
                state.version
            )));
        }
        if let Some(bad) = state.ownership.rules.iter().find(|r| r.rule().is_none()) {
            return Err(corrupt(format!(
                "{:?} is not a rule loopguard manages",
                bad.rule
            )));
        }
        Ok(Some(state))
    }

    /// The lock beside the state file (`state.lock` for `state.json`).
    pub fn lock_path(&self) -> PathBuf {
        self.path.with_extension("lock")
    }

    /// Takes the lock beside the state file, waiting up to `wait` for another loopguard process
    /// to finish its pass.
    pub fn lock(&self, wait: Duration) -> Result<FileLock> {
        let path = self.lock_path();
        let dir = folder_of(&path);
        std::fs::create_dir_all(dir)
            .map_err(|e| self.error(format!("cannot create {}: {e}", dir.display())))?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| self.error(format!("cannot open its lock {}: {e}", path.display())))?;
        flock_within(file, wait).ok_or_else(|| Error::StateLocked {
            path,
            seconds: wait.as_secs_f64(),
        })
    }

    /// Writes the state atomically, or removes the file when nothing is owned.
    pub fn store(&self, state: &State) -> Result<()> {
        if state.owns_nothing() {
            return match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(self.error(format!("cannot remove it: {e}")))
                }
                _ => Ok(()),
            };
        }
        let dir = folder_of(&self.path);
        std::fs::create_dir_all(dir)
            .map_err(|e| self.error(format!("cannot create {}: {e}", dir.display())))?;
        let mut json = serde_json::to_vec_pretty(state).expect("state serializes");
        json.push(b'\n');
        let tmp = self
            .path
            .with_extension(format!("tmp.{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&json)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            self.error(format!("cannot write it: {e}"))
        })
    }
}

/// The folder a file is in; `.` for a bare file name (whose `parent()` is the empty path, which
/// cannot be opened or created).
fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{Family, OwnedRule, Placement, Rule, RuleKind};

    fn owned_drop() -> Ownership {
        let rule = Rule {
            family: Family::Ipv6,
            kind: RuleKind::DropLoopbackSource,
        };
        Ownership {
            rules: vec![OwnedRule {
                family: rule.family,
                chain: rule.chain(),
                rule: rule.save_syntax(),
                owned: 1,
                observed: 1,
                placement: Placement::Insert,
                pending: 0,
            }],
        }
    }

    #[test]
    fn a_bare_file_name_lives_in_the_current_folder() {
        assert_eq!(folder_of(Path::new("state.json")), Path::new("."));
        assert_eq!(folder_of(Path::new("a/state.json")), Path::new("a"));
        assert_eq!(folder_of(Path::new("/state.json")), Path::new("/"));
    }

    #[test]
    fn round_trips_and_removes_itself_when_empty() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path().join("sub/state.json"));
        assert_eq!(file.load().unwrap(), None);
        let state = State::new(Backend::Nft, owned_drop());
        file.store(&state).unwrap();
        assert_eq!(file.load().unwrap(), Some(state));
        let text = std::fs::read_to_string(&file.path).unwrap();
        assert!(text.contains("\"backend\": \"iptables-nft\""), "{text}");
        file.store(&State::new(Backend::Nft, Ownership::default()))
            .unwrap();
        assert!(!file.path.exists());
        assert_eq!(
            std::fs::read_dir(dir.path().join("sub")).unwrap().count(),
            0
        );
    }

    #[test]
    fn corrupt_files_are_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path().join("state.json"));
        for bad in [
            "{not json",
            r#"{"version":0,"backend":"iptables-nft","rules":[]}"#,
            r#"{"version":1,"backend":"iptables-nft","rules":[{"family":"ipv6","chain":"INPUT","rule":"-A INPUT -j DROP","owned":1,"observed":1,"placement":"insert"}]}"#,
        ] {
            std::fs::write(&file.path, bad).unwrap();
            let err = file.load().unwrap_err().to_string();
            assert!(err.contains("not a loopguard state file"), "{err}");
            assert!(err.contains("move the file aside"), "{err}");
            // Refusing never destroys the evidence.
            assert_eq!(std::fs::read_to_string(&file.path).unwrap(), bad);
        }
    }

    #[test]
    fn a_file_from_a_newer_loopguard_is_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path().join("state.json"));
        let newer = r#"{"version":2,"backend":"iptables-nft","rules":[],"somethingNew":true}"#;
        std::fs::write(&file.path, newer).unwrap();
        let err = file.load().unwrap_err().to_string();
        assert!(err.contains("newer loopguard"), "{err}");
        assert_eq!(std::fs::read_to_string(&file.path).unwrap(), newer);
    }

    #[test]
    fn the_lock_beside_the_state_file_serializes_writers() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path().join("new/state.json"));
        assert_eq!(file.lock_path(), dir.path().join("new/state.lock"));
        let held = file.lock(Duration::ZERO).unwrap();
        let err = file
            .lock(Duration::from_millis(100))
            .unwrap_err()
            .to_string();
        assert!(err.contains("another loopguard"), "{err}");
        drop(held);
        file.lock(Duration::ZERO).unwrap();
    }
}
