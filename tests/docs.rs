//! The README's performance lines are the ones the benches last wrote into BENCHMARKS.md, and every
//! section the benches write holds something.

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

#[test]
fn every_bench_section_holds_a_measurement() {
    for name in ["node-engine", "cluster"] {
        let section = between("BENCHMARKS.md", name);
        assert!(
            section.starts_with("Measured ") && section.contains("| "),
            "BENCHMARKS.md's {name} section was not written by the bench: run `cargo bench --bench {}`",
            name.replace('-', "_")
        );
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
