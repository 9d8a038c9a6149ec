//! An engine run in a test's network namespace, as the differential tests of the in-process
//! paths (`legacy_kernel.rs`, `nft_inprocess.rs`) drive it: one thread per call, which enters the
//! namespace (an engine's kernel handles belong to the thread that made them).

#![allow(dead_code)]

use crate::netns::TestNetns;
use loopguard::node::facts::{ApplicabilityMode, BackendChoice};
use loopguard::node::{Engine, EngineConfig, Report};
use loopguard::rules::{Family, Placement};
use proptest::test_runner::TestCaseError;
use std::path::Path;

/// Runs `f` on an engine in `ns` (in a thread of its own, which enters the namespace).
pub fn in_netns<T: Send + 'static>(
    ns: &TestNetns,
    engine: Engine,
    f: impl FnOnce(&mut Engine) -> T + Send + 'static,
) -> (Engine, T) {
    let name = ns.name.clone();
    std::thread::spawn(move || {
        loopguard::node::netns::enter(&name).expect("enter the namespace");
        let mut engine = engine;
        let out = f(&mut engine);
        (engine, out)
    })
    .join()
    .expect("engine thread")
}

/// One enforce or cleanup on `engine` in `ns`; an error fails the case. Returns the engine and
/// the report.
pub fn step(
    ns: &TestNetns,
    engine: Engine,
    f: impl FnOnce(&mut Engine) -> loopguard::Result<Report> + Send + 'static,
) -> Result<(Engine, Report), TestCaseError> {
    let (engine, report) = in_netns(ns, engine, f);
    let report = report.map_err(|e| TestCaseError::fail(e.to_string()))?;
    Ok((engine, report))
}

/// An engine for `ns` on `backend`, applicability Always, its state and lock files in `dir`.
pub fn engine(
    dir: &Path,
    ns: &TestNetns,
    families: Vec<Family>,
    append: bool,
    backend: BackendChoice,
) -> Engine {
    let config = EngineConfig {
        families,
        applicability: ApplicabilityMode::Always,
        placement: if append {
            Placement::Append
        } else {
            Placement::Insert
        },
        state_file: dir.join(format!("{}.json", ns.name)),
        host_root: dir.to_path_buf(),
        backend,
        wait: std::time::Duration::from_secs(5),
        lock_path: dir.join("xtables.lock"),
        ..EngineConfig::default()
    };
    let name = ns.name.clone();
    std::thread::spawn(move || {
        loopguard::node::netns::enter(&name).unwrap();
        Engine::new(config).expect("engine")
    })
    .join()
    .unwrap()
}

/// A restore script of `forms` in INPUT and OUTPUT (an interface only where the kernel allows it:
/// `-i` in INPUT, `-o` in OUTPUT), after `header` (chain declarations) and before `tail`.
pub fn forms_script(header: &str, forms: &[&str], tail: &str) -> String {
    let mut s = format!("*filter\n{header}");
    for spec in forms {
        if !spec.contains("-o ") {
            s.push_str(&format!("-A INPUT {spec}\n"));
        }
        if !spec.contains("-i ") {
            s.push_str(&format!("-A OUTPUT {spec}\n"));
        }
    }
    s.push_str(tail);
    s.push_str("COMMIT\n");
    s
}
