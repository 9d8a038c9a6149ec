//! Every number of BENCHMARKS.md's bench sections and of the README's performance lines is what the
//! raw samples the benches kept in BENCHMARKS.json render to, and the README's mutant list is the
//! script's.

#[path = "../benches/support/render.rs"]
mod render;

use std::path::Path;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// What lies between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in `file`.
fn between(file: &str, name: &str) -> String {
    let text = std::fs::read_to_string(Path::new(REPO).join(file))
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    let (begin, end) = (
        format!("<!-- {name}:begin -->\n"),
        format!("<!-- {name}:end -->"),
    );
    let b = text
        .find(&begin)
        .unwrap_or_else(|| panic!("{file} lacks {begin:?}"))
        + begin.len();
    let e = text[b..]
        .find(&end)
        .unwrap_or_else(|| panic!("{file} lacks {end:?} after {begin:?}"));
    text[b..b + e].to_string()
}

#[test]
fn readme_headlines_are_what_the_benches_wrote() {
    for name in ["node-engine-headline", "cluster-headline"] {
        let benchmarks = between("BENCHMARKS.md", name);
        let readme = between("README.md", name);
        assert!(
            benchmarks.lines().any(|l| l.starts_with("- ")),
            "BENCHMARKS.md's {name} block is empty: run the bench (see BENCHMARKS.md)"
        );
        assert_eq!(
            readme, benchmarks,
            "README.md's {name} block differs from BENCHMARKS.md's: the benches write both; run them again rather than editing either"
        );
    }
}

/// The bench's raw record in BENCHMARKS.json.
fn record<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let path = Path::new(REPO).join("BENCHMARKS.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let all: serde_json::Value = serde_json::from_str(&text).expect("BENCHMARKS.json is JSON");
    let raw = all.get(name).unwrap_or_else(|| {
        panic!(
            "BENCHMARKS.json holds no {name:?} record: run `cargo bench --bench {}`",
            name.replace('-', "_")
        )
    });
    serde_json::from_value(raw.clone())
        .unwrap_or_else(|e| panic!("BENCHMARKS.json's {name:?} record does not read: {e}"))
}

/// Renders a bench's raw record again and compares every line with what BENCHMARKS.md shows.
fn assert_rendered(name: &str, (section, headline): (String, String)) {
    let bench = name.replace('-', "_");
    for (block, expected) in [
        (name.to_string(), section),
        (format!("{name}-headline"), headline),
    ] {
        let written = between("BENCHMARKS.md", &block);
        for (i, (w, e)) in written.lines().zip(expected.lines()).enumerate() {
            assert_eq!(
                w,
                e,
                "BENCHMARKS.md's {block} block, line {}, is not what BENCHMARKS.json's samples give: run `cargo bench --bench {bench}` rather than editing either",
                i + 1
            );
        }
        assert_eq!(
            written, expected,
            "BENCHMARKS.md's {block} block differs in length from what BENCHMARKS.json's samples give: run `cargo bench --bench {bench}`"
        );
    }
}

#[test]
fn node_engine_numbers_come_from_its_samples() {
    let run: render::NodeRun = record("node-engine");
    assert!(
        run.reps >= 15
            && run
                .one_shot
                .iter()
                .all(|o| o.samples.iter().all(|s| s.len() == run.reps)),
        "the node-engine record is not a full run ({} samples per command)",
        run.reps
    );
    assert_rendered("node-engine", render::render_node(&run));
}

#[test]
fn cluster_numbers_come_from_its_samples() {
    let run: render::ClusterRun = record("cluster");
    assert!(
        run.steady.is_some() && run.simulated.is_some() && !run.applies.is_empty(),
        "the cluster record is not a full run (a part is missing)"
    );
    assert_rendered("cluster", render::render_cluster(&run));
}

#[test]
fn soak_numbers_come_from_its_samples() {
    let run: render::SoakRun = record("soak");
    assert!(
        run.window_s >= 600 && run.nodes.len() == 3,
        "the soak record is not a full run (10 minutes, three nodes)"
    );
    assert_rendered("soak", render::render_soak(&run));
}

/// A quick run warns about every row whose median is more than 20 % above the committed one, and
/// about no other: checked on the committed node-engine record with one row slowed down.
#[test]
fn a_slower_row_is_named_and_no_other() {
    let committed: render::NodeRun = record("node-engine");
    let base = render::node_medians(&committed);
    let (compared, warnings) = render::regressions(&base, &base);
    assert_eq!((compared, warnings.len()), (base.len(), 0), "{warnings:?}");
    for (factor, expected) in [(1.1, 0), (1.25, 1)] {
        let mut now = committed.clone();
        now.repairs[0]
            .latency
            .0
            .iter_mut()
            .for_each(|ns| *ns = (*ns as f64 * factor) as u64);
        let (_, warnings) = render::regressions(&base, &render::node_medians(&now));
        assert_eq!(warnings.len(), expected, "slowed by {factor}: {warnings:?}");
        if expected == 1 {
            let r = &committed.repairs[0];
            let row = format!("{} | {} | drift repair", r.backend, r.foreign);
            assert!(
                warnings[0].contains(&row),
                "{} does not name {row}",
                warnings[0]
            );
        }
    }
}

/// The README's list of mutants is `hack/mutants.sh --list`: the script is the list.
#[test]
fn readme_mutants_are_the_scripts() {
    let out = std::process::Command::new("bash")
        .arg(Path::new(REPO).join("hack/mutants.sh"))
        .arg("--list")
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        between("README.md", "mutants"),
        String::from_utf8(out.stdout).unwrap(),
        "README.md's mutants block differs from `hack/mutants.sh --list`: paste its output between the markers"
    );
}
