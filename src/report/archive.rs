//! `loopguard report --archive DIR`: the report in every format, kept as evidence over time. Each
//! run writes one folder named by its time (`20261206T211500Z`) with the files and a `SHA256SUMS`
//! manifest (`sha256sum -c SHA256SUMS` checks it). The folder is written under a temporary name and
//! renamed only once every file is on disk, so a folder with a run's name is always complete; only
//! then are the runs older than the retention removed. Nothing else in DIR is touched.

use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The manifest's name in each run's folder.
pub const MANIFEST: &str = "SHA256SUMS";
/// A run's folder while it is written.
const INCOMPLETE: &str = ".incomplete-";

/// A run's folder name: its UTC time, to the second, without separators that a file system or a
/// shell would mind.
pub fn run_name(at: jiff::Timestamp) -> String {
    at.strftime("%Y%m%dT%H%M%SZ").to_string()
}

/// The time of a run's folder (or of an incomplete one left by a run that died), None for any
/// other name: those are not loopguard's and are never removed.
pub fn run_time(name: &str) -> Option<jiff::Timestamp> {
    let stamp = name.strip_prefix(INCOMPLETE).unwrap_or(name);
    if stamp.len() != 16 || !stamp.ends_with('Z') {
        return None;
    }
    let dt = jiff::civil::DateTime::strptime("%Y%m%dT%H%M%S", &stamp[..15]).ok()?;
    dt.to_zoned(jiff::tz::TimeZone::UTC)
        .ok()
        .map(|z| z.timestamp())
}

/// The names (of `names`, the entries of DIR) of runs older than `keep_days` at `now`, oldest
/// first. `current` (the run just written) is never among them.
pub fn expired<'a>(
    names: &'a [String],
    current: &str,
    now: jiff::Timestamp,
    keep_days: u32,
) -> Vec<&'a String> {
    let cutoff = now - jiff::SignedDuration::from_hours(24 * i64::from(keep_days));
    let mut out: Vec<(jiff::Timestamp, &String)> = names
        .iter()
        .filter(|n| n.as_str() != current)
        .filter_map(|n| run_time(n).map(|t| (t, n)))
        .filter(|(t, _)| *t < cutoff)
        .collect();
    out.sort();
    out.into_iter().map(|(_, n)| n).collect()
}

/// The manifest of `files` (name, content), as `sha256sum` writes it.
pub fn manifest(files: &[(&str, &[u8])]) -> String {
    let mut out = String::new();
    for (name, content) in files {
        let digest = Sha256::digest(content);
        for b in digest {
            let _ = write!(out, "{b:02x}");
        }
        let _ = writeln!(out, "  {name}");
    }
    out
}

/// What an archive run did.
#[derive(Debug)]
pub struct Written {
    pub folder: PathBuf,
    pub removed: Vec<String>,
}

/// Writes `files` as the run `name` into `dir`, then removes the runs older than `keep_days`.
/// On any error nothing older is removed and the incomplete folder is taken away again.
pub fn write(
    dir: &Path,
    name: &str,
    files: &[(&str, &[u8])],
    now: jiff::Timestamp,
    keep_days: u32,
) -> Result<Written, String> {
    if !dir.is_dir() {
        return Err(format!(
            "the evidence folder {} does not exist (or is not a folder): mount the evidence volume there",
            dir.display()
        ));
    }
    let folder = dir.join(name);
    if folder.exists() {
        return Err(format!(
            "{} exists already: a run at the same second; nothing was written",
            folder.display()
        ));
    }
    let tmp = dir.join(format!("{INCOMPLETE}{name}"));
    let written = write_folder(&tmp, files).and_then(|()| {
        std::fs::rename(&tmp, &folder)?;
        std::fs::File::open(dir)?.sync_all()
    });
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        let hint = if e.raw_os_error() == Some(28) {
            ": the evidence volume is full; nothing older was removed. Grow the volume or keep fewer days (evidence.keepDays)"
        } else {
            ""
        };
        return Err(format!(
            "writing the evidence into {} failed: {e}{hint}",
            dir.display()
        ));
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    let mut removed = Vec::new();
    for old in expired(&names, name, now, keep_days) {
        std::fs::remove_dir_all(dir.join(old)).map_err(|e| {
            format!(
                "the new run {} is written, but removing the expired run {old} failed: {e}",
                folder.display()
            )
        })?;
        removed.push(old.clone());
    }
    Ok(Written { folder, removed })
}

fn write_folder(tmp: &Path, files: &[(&str, &[u8])]) -> std::io::Result<()> {
    std::fs::create_dir(tmp)?;
    let sums = manifest(files);
    for (name, content) in files.iter().copied().chain([(MANIFEST, sums.as_bytes())]) {
        let mut f = std::fs::File::create(tmp.join(name))?;
        f.write_all(content)?;
        f.sync_all()?;
    }
    std::fs::File::open(tmp)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn run_names_round_trip_and_foreign_names_are_not_runs() {
        let t = at("2026-12-06T21:15:00Z");
        assert_eq!(run_name(t), "20261206T211500Z");
        assert_eq!(run_time("20261206T211500Z"), Some(t));
        assert_eq!(run_time(".incomplete-20261206T211500Z"), Some(t));
        for foreign in [
            "notes",
            "lost+found",
            "20261206T211500",
            "20261306T211500Z",
            "x20261206T211500Z",
            "20261206T211500Z.bak",
        ] {
            assert_eq!(run_time(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn only_runs_past_the_retention_expire_and_never_the_current_one() {
        let names: Vec<String> = [
            "20261101T000000Z",
            "20261120T000000Z",
            "20261206T000000Z",
            ".incomplete-20261001T000000Z",
            "lost+found",
            "keep-me",
        ]
        .map(String::from)
        .to_vec();
        let now = at("2026-12-06T00:00:00Z");
        assert_eq!(
            expired(&names, "20261206T000000Z", now, 30),
            [".incomplete-20261001T000000Z", "20261101T000000Z"]
        );
        assert_eq!(expired(&names, "20261206T000000Z", now, 365).len(), 0);
        assert_eq!(
            expired(&names, "20261206T000000Z", now, 0),
            [
                ".incomplete-20261001T000000Z",
                "20261101T000000Z",
                "20261120T000000Z"
            ],
            "the current run stays even with no retention"
        );
    }

    #[test]
    fn the_manifest_is_what_sha256sum_writes() {
        assert_eq!(
            manifest(&[("a.txt", b"abc"), ("empty", b"")]),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad  a.txt\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855  empty\n"
        );
    }

    #[test]
    fn a_run_is_written_whole_then_older_runs_go_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("20260101T000000Z");
        std::fs::create_dir(&old).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
        std::fs::create_dir(dir.path().join("lost+found")).unwrap();
        let now = at("2026-12-06T21:15:00Z");
        let w = write(
            dir.path(),
            &run_name(now),
            &[("report.json", b"{}"), ("report.csv", b"a,b\n")],
            now,
            90,
        )
        .unwrap();
        assert_eq!(w.removed, ["20260101T000000Z"]);
        assert!(!old.exists());
        assert!(dir.path().join("notes.txt").exists());
        assert!(dir.path().join("lost+found").exists());
        let sums = std::fs::read_to_string(w.folder.join(MANIFEST)).unwrap();
        assert_eq!(
            sums,
            manifest(&[("report.json", b"{}"), ("report.csv", b"a,b\n")])
        );
        let out = std::process::Command::new("sha256sum")
            .args(["-c", MANIFEST])
            .current_dir(&w.folder)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        // The same second again: refused, the first run kept.
        let again = write(dir.path(), &run_name(now), &[("x", b"")], now, 90).unwrap_err();
        assert!(again.contains("exists already"), "{again}");
        assert!(w.folder.join("report.json").exists());
    }

    #[test]
    fn a_missing_folder_is_an_error_that_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("evidence");
        let e = write(
            &missing,
            "20261206T211500Z",
            &[],
            at("2026-12-06T21:15:00Z"),
            1,
        )
        .unwrap_err();
        assert!(e.contains("does not exist") && e.contains("mount"), "{e}");
        assert!(!missing.exists(), "nothing created");
    }
}
