//! The state file: which rules loopguard inserted on this node, so that cleanup removes exactly
//! those, also after a restart. Written atomically (temporary file, fsync, rename).

use super::iptables::Backend;
use crate::rules::Ownership;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::path::{Path, PathBuf};

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
}

impl State {
    pub fn new(backend: Backend, ownership: Ownership) -> State {
        State {
            version: VERSION,
            backend,
            ownership,
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

    /// Writes the state atomically, or removes the file when nothing is owned.
    pub fn store(&self, state: &State) -> Result<()> {
        if state.ownership.is_empty() {
            return match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(self.error(format!("cannot remove it: {e}")))
                }
                _ => Ok(()),
            };
        }
        let dir = self.path.parent().unwrap_or(Path::new("."));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{Family, Placement, Rule, RuleKind};

    fn owned_drop() -> Ownership {
        let mut own = Ownership::default();
        let rule = Rule {
            family: Family::Ipv6,
            kind: RuleKind::DropLoopbackSource,
        };
        own.record_insert(rule, 0, Placement::Insert);
        own
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
            r#"{"version":9,"backend":"iptables-nft","rules":[]}"#,
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
}
