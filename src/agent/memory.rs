//! What the agent keeps on the host beside its state file, so that a restart forgets nothing:
//! the policy it follows (enforced again before the API server answers) and the repair history
//! (`repairs` and `lastRepairTime` never go backwards).

use crate::api::{LoopbackPolicy, LoopbackPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The policy a node follows, as remembered on the host between agent runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Remembered {
    pub name: String,
    pub generation: Option<i64>,
    pub spec: LoopbackPolicySpec,
    /// The policy no longer governs the node and its rules are being removed: a restarted agent
    /// retries the cleanup instead of enforcing the policy again.
    #[serde(default)]
    pub releasing: bool,
}

impl Remembered {
    pub fn from_policy(policy: &LoopbackPolicy) -> Remembered {
        Remembered {
            name: policy.name_any(),
            generation: policy.metadata.generation,
            spec: policy.spec.clone(),
            releasing: false,
        }
    }
}

/// Drift repairs on this node for one policy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct History {
    pub policy: String,
    pub repairs: i64,
    pub last_repair_time: Option<Time>,
    /// The process that made the change last repaired, when the kernel named it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_repair_by: Option<String>,
}

/// A small JSON file written atomically; unreadable contents are reported and treated as absent
/// (neither file decides which rules loopguard owns: the state file does).
#[derive(Clone, Debug)]
pub struct Memo<T> {
    path: PathBuf,
    _kind: std::marker::PhantomData<T>,
}

impl<T: Serialize + serde::de::DeserializeOwned> Memo<T> {
    /// `name` beside the state file.
    pub fn beside(state_file: &Path, name: &str) -> Memo<T> {
        Memo {
            path: state_file.with_file_name(name),
            _kind: std::marker::PhantomData,
        }
    }

    pub fn load(&self) -> Option<T> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        serde_json::from_str(&text)
            .inspect_err(|e| tracing::warn!(path = %self.path.display(), error = %e, "ignoring an unreadable file"))
            .ok()
    }

    /// Writes `value`, or removes the file for `None`; failures are logged, not fatal.
    pub fn store(&self, value: Option<&T>) {
        let result = match value {
            Some(v) => {
                let tmp = self.path.with_extension("tmp");
                std::fs::write(&tmp, serde_json::to_vec(v).expect("serializes"))
                    .and_then(|()| std::fs::rename(&tmp, &self.path))
            }
            None => std::fs::remove_file(&self.path).or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            }),
        };
        if let Err(e) = result {
            tracing::warn!(path = %self.path.display(), error = %e, "could not write the file");
        }
    }
}

impl History {
    /// The history to continue for `policy`: the stored one if it is that policy's, else new.
    pub fn continued(stored: Option<History>, policy: &str) -> History {
        match stored {
            Some(h) if h.policy == policy => h,
            _ => History {
                policy: policy.to_string(),
                ..History::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_survives_a_restart_and_starts_over_for_another_policy() {
        let dir = tempfile::tempdir().unwrap();
        let memo: Memo<History> = Memo::beside(&dir.path().join("state.json"), "history.json");
        assert_eq!(memo.load(), None);
        let h = History {
            policy: "base".into(),
            repairs: 4,
            last_repair_time: Some(Time("2026-06-01T12:00:00Z".parse().unwrap())),
            last_repair_by: Some("iptables-nft-re (pid 4242)".into()),
        };
        memo.store(Some(&h));
        assert_eq!(History::continued(memo.load(), "base"), h);
        assert_eq!(History::continued(memo.load(), "other").repairs, 0);
        std::fs::write(dir.path().join("history.json"), "{broken").unwrap();
        assert_eq!(memo.load(), None, "unreadable: absent, with a warning");
    }
}
