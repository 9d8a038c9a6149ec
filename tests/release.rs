//! A release end to end, as hack/release.sh makes one: into a real OCI registry on this machine
//! (go-containerregistry's, hack/registry.sh), from a clean commit of the tree under test. What a
//! user checks afterwards: `cosign verify` accepts the image and the chart with the release's
//! public key and refuses a tampered image and another key; the SBOM attached to the image lists
//! every crate of Cargo.lock and the image's Debian packages; `helm install oci://…` installs the
//! chart from the registry, pulling the image by digest, and the policy goes Compliant. Before that,
//! the bad inputs: each refused with its reason, and nothing pushed.

mod support;

use loopguard_hollow::ImageMapping;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use support::cluster::Cluster;
use support::deploy;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const PASSWORD: &str = "release-test";

/// A registry of this test's own (hack/registry.sh with a state dir of its own), down on drop.
struct Registry {
    dir: PathBuf,
    address: String,
}

impl Registry {
    fn up(dir: &Path) -> Registry {
        let out = support::run(
            {
                let mut c = Command::new(format!("{REPO}/hack/registry.sh"));
                c.args(["up", "--owner-pid", &std::process::id().to_string()])
                    .env("LOOPGUARD_REGISTRY_DIR", dir);
                c
            },
            None,
        );
        let address = out
            .lines()
            .find_map(|l| l.strip_prefix("export LOOPGUARD_REGISTRY="))
            .unwrap_or_else(|| panic!("hack/registry.sh up printed no address: {out}"))
            .to_string();
        Registry {
            dir: dir.to_path_buf(),
            address,
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = Command::new(format!("{REPO}/hack/registry.sh"))
            .arg("down")
            .env("LOOPGUARD_REGISTRY_DIR", &self.dir)
            .output();
    }
}

fn tools() -> PathBuf {
    let out = support::run(
        Command::new(format!("{REPO}/hack/build-release-tools.sh")),
        None,
    );
    PathBuf::from(out.lines().last().expect("the tools' bin dir").trim())
}

/// The tree under test (tracked and untracked files, as git sees them) committed into a repository
/// of its own, so that a release can be made from a clean commit of exactly what is tested.
fn snapshot(into: &Path) {
    let files = support::run(
        {
            let mut c = Command::new("git");
            c.current_dir(REPO).args([
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard",
            ]);
            c
        },
        None,
    );
    for file in files.split('\0').filter(|f| !f.is_empty()) {
        let from = Path::new(REPO).join(file);
        if !from.exists() {
            continue; // deleted in the working tree, not yet in a commit
        }
        let to = into.join(file);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("copy {file}: {e}"));
    }
    for args in [
        &["init", "--quiet"][..],
        &["add", "--all"],
        &[
            "-c",
            "user.name=loopguard test",
            "-c",
            "user.email=test@loopguard.invalid",
            "commit",
            "--quiet",
            "--message",
            "the tree under test",
        ],
    ] {
        support::run(
            {
                let mut c = Command::new("git");
                c.current_dir(into).args(args);
                c
            },
            None,
        );
    }
}

/// `hack/release.sh VERSION` in `checkout` with `env`; its output, whether it failed or not.
fn release(checkout: &Path, version: &str, env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(checkout.join("hack/release.sh"));
    c.current_dir(checkout)
        .arg(version)
        .env_remove("COSIGN_KEY")
        .env_remove("LOOPGUARD_REGISTRY")
        .env("COSIGN_PASSWORD", PASSWORD);
    for (k, v) in env {
        c.env(k, v);
    }
    support::output(c, None)
}

fn refused(out: &std::process::Output, reason: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(reason),
        "expected a refusal saying {reason:?}, got {:?}:\n{}{stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The repositories in the registry (`crane catalog`, which must succeed).
fn catalog(tools: &Path, registry: &str) -> Vec<String> {
    let out = support::run(
        {
            let mut c = Command::new(tools.join("crane"));
            c.args(["catalog", "--insecure", registry]);
            c
        },
        None,
    );
    out.lines().map(String::from).collect()
}

fn cosign(tools: &Path, args: &[&str]) -> std::process::Output {
    let mut c = Command::new(tools.join("cosign"));
    c.args(args).env("COSIGN_PASSWORD", PASSWORD);
    support::output(c, None)
}

fn verify(tools: &Path, key: &Path, subject: &str) -> std::process::Output {
    cosign(
        tools,
        &[
            "verify",
            "--key",
            key.to_str().unwrap(),
            "--insecure-ignore-tlog",
            "--allow-http-registry",
            subject,
        ],
    )
}

/// `cosign verify-attestation` of the attestations of `kind` on `subject`, with `key`.
fn verify_attestation(tools: &Path, key: &Path, kind: &str, subject: &str) -> std::process::Output {
    cosign(
        tools,
        &[
            "verify-attestation",
            "--key",
            key.to_str().unwrap(),
            "--insecure-ignore-tlog",
            "--allow-http-registry",
            "--type",
            kind,
            subject,
        ],
    )
}

fn generate_key_pair(tools: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let mut c = Command::new(tools.join("cosign"));
    c.current_dir(dir)
        .args(["generate-key-pair"])
        .env("COSIGN_PASSWORD", PASSWORD);
    support::run(c, None);
    (dir.join("cosign.key"), dir.join("cosign.pub"))
}

fn cargo_lock_packages() -> Vec<(String, String)> {
    let lock = std::fs::read_to_string(format!("{REPO}/Cargo.lock")).unwrap();
    let mut out = Vec::new();
    let mut name = None;
    for line in lock.lines() {
        if let Some(n) = line.strip_prefix("name = ") {
            name = Some(n.trim_matches('"').to_string());
        } else if let Some(v) = line.strip_prefix("version = ")
            && let Some(n) = name.take()
        {
            out.push((n, v.trim_matches('"').to_string()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_is_pushed_signed_verified_and_installed_from_the_registry() {
    let Some(cluster) = support::cluster::private("release") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let tools = tools();
    let checkout = work.path().join("checkout");
    snapshot(&checkout);
    let registry = Registry::up(&work.path().join("registry"));
    let reg = registry.address.as_str();
    let (key, public) = generate_key_pair(&tools, &work.path().join("keys"));
    let out_dir = work.path().join("out");
    let version = "0.1.0";
    let env = [
        ("LOOPGUARD_REGISTRY", reg),
        ("COSIGN_KEY", key.to_str().unwrap()),
        ("LOOPGUARD_RELEASE_DIR", out_dir.to_str().unwrap()),
    ];

    // Bad input: each refused with what to do, before anything is built or pushed.
    refused(
        &release(&checkout, version, &env[..1]),
        "COSIGN_KEY is not set",
    );
    let missing = work.path().join("no-such.key");
    refused(
        &release(
            &checkout,
            version,
            &[env[0], ("COSIGN_KEY", missing.to_str().unwrap())],
        ),
        "cannot be read",
    );
    refused(&release(&checkout, "1.2.3", &env), "not 1.2.3");
    refused(
        &release(&checkout, "v0.1.0", &env),
        "not a semantic version",
    );
    std::fs::write(checkout.join("stray.txt"), "not committed").unwrap();
    refused(
        &release(&checkout, version, &env),
        "the working tree has changes",
    );
    std::fs::remove_file(checkout.join("stray.txt")).unwrap();
    refused(
        &release(
            &checkout,
            version,
            &[("LOOPGUARD_REGISTRY", "127.0.0.1:1"), env[1], env[2]],
        ),
        "does not answer",
    );
    assert_eq!(catalog(&tools, reg), Vec::<String>::new(), "nothing pushed");
    assert!(!out_dir.exists(), "no release files written");

    // The release.
    let out = release(&checkout, version, &env);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "hack/release.sh failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name}= in\n{stdout}"))
            .to_string()
    };
    let (image, chart) = (field("image"), field("chart"));
    assert!(
        image.starts_with(&format!("{reg}/loopguard/loopguard@sha256:")),
        "{image}"
    );
    assert!(
        chart.starts_with(&format!("{reg}/charts/loopguard@sha256:")),
        "{chart}"
    );

    // A released version is never overwritten.
    refused(&release(&checkout, version, &env), "already released");

    // Signatures: both verify with the release's key; not with another key; a tampered image (a
    // changed image pushed under the released tag) has no signature.
    for subject in [&image, &chart] {
        let v = verify(&tools, &public, subject);
        assert!(
            v.status.success(),
            "cosign verify {subject}:\n{}",
            String::from_utf8_lossy(&v.stderr)
        );
    }
    let (_, other_public) = generate_key_pair(&tools, &work.path().join("other-keys"));
    assert!(
        !verify(&tools, &other_public, &image).status.success(),
        "another key must not verify the image"
    );
    let tag = format!("{reg}/loopguard/loopguard:{version}");
    let tampered = support::run(
        {
            let mut c = Command::new(tools.join("crane"));
            c.args(["mutate", "--insecure", "--label", "tampered=yes", &tag]);
            c
        },
        None,
    );
    let tampered = tampered.lines().last().unwrap().trim().to_string();
    assert_ne!(tampered.split('@').nth(1), image.split('@').nth(1));
    let v = verify(&tools, &public, &tag);
    assert!(
        !v.status.success(),
        "the tampered image under {tag} verified:\n{}",
        String::from_utf8_lossy(&v.stdout)
    );
    assert!(verify(&tools, &public, &image).status.success());

    // The SBOM, as a user gets it: the verified attestation's predicate.
    let attested = verify_attestation(&tools, &public, "spdxjson", &image);
    assert!(
        attested.status.success(),
        "cosign verify-attestation:\n{}",
        String::from_utf8_lossy(&attested.stderr)
    );
    let envelope: Value = serde_json::from_slice(
        String::from_utf8_lossy(&attested.stdout)
            .lines()
            .next()
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    let statement = support::run(
        {
            let mut c = Command::new("base64");
            c.arg("-d");
            c
        },
        Some(envelope["payload"].as_str().unwrap()),
    );
    let statement: Value = serde_json::from_str(&statement).unwrap();
    assert_eq!(statement["predicateType"], "https://spdx.dev/Document");
    assert_eq!(
        statement["subject"][0]["digest"]["sha256"].as_str(),
        image.split(':').next_back()
    );
    let packages = statement["predicate"]["packages"].as_array().unwrap();
    let purls: Vec<&str> = packages
        .iter()
        .filter_map(|p| p["externalRefs"][0]["referenceLocator"].as_str())
        .collect();
    for (name, version) in cargo_lock_packages() {
        // A purl percent-encodes '+' (build metadata) in the version.
        let purl = format!("pkg:cargo/{name}@{}", version.replace('+', "%2B"));
        assert!(
            purls.contains(&purl.as_str()),
            "{purl} missing from the SBOM"
        );
    }
    for deb in [
        "pkg:deb/debian/iptables@1.8.9-2",
        "pkg:deb/debian/nftables@1.0.6-2%2Bdeb12u2",
    ] {
        assert!(
            purls.iter().any(|p| p.starts_with(deb)),
            "{deb} missing from the SBOM"
        );
    }
    let provenance = verify_attestation(&tools, &public, "slsaprovenance1", &image);
    assert!(provenance.status.success(), "the provenance verifies");

    // helm install oci://, the image by digest (hollow nodes run it as the local binary).
    install_from_registry(&cluster, reg, version, &image).await;
}

async fn install_from_registry(cluster: &Cluster, reg: &str, version: &str, image: &str) {
    let mut options = deploy::iptables_hosts(cluster, "rel", 1, ("loopguard.test/release", "yes"));
    options.images.push(ImageMapping {
        repository: format!("{reg}/loopguard/loopguard"),
        binary: PathBuf::from(deploy::BIN),
    });
    // The chart's default image must not be what runs: drop the mapping of the default repository.
    options.images.retain(|m| m.repository != deploy::IMAGE);
    let _hollow = cluster.start_nodes(options).await;
    let digest = image.split('@').nth(1).unwrap();
    let (registry_value, digest_value) = (
        format!("image.registry={reg}"),
        format!("image.digest={digest}"),
    );
    deploy::helm(
        cluster,
        &[
            "install",
            deploy::RELEASE,
            &format!("oci://{reg}/charts/loopguard"),
            "--version",
            version,
            "--plain-http",
            "--namespace",
            "loopguard-system",
            "--create-namespace",
            "--wait",
            "--timeout",
            "3m",
            "--set",
            &registry_value,
            "--set",
            &digest_value,
            "--set",
            "controller.replicas=1",
            "--set",
            "controller.nodeSelector.loopguard\\.test/release=yes",
            "--set",
            "defaultPolicy.enabled=true",
            "--set",
            "defaultPolicy.spec.applicability=Always",
        ],
    );
    let images = cluster.kubectl_ok(
        &[
            "get",
            "pods",
            "-n",
            "loopguard-system",
            "-o",
            "jsonpath={.items[*].spec.containers[*].image}",
        ],
        None,
    );
    assert!(
        images.split_whitespace().all(|i| i == image),
        "every Pod runs {image}: {images}"
    );
    cluster.wait_compliant("default", "180s");
}

/// The base images are reproducible: rebuilt from hack/image/bookworm.lock in a buildah storage of
/// their own, each has the digest hack/release/base-images.lock records.
#[test]
fn the_base_images_rebuild_to_their_recorded_digests() {
    let out = support::output(
        {
            let mut c = Command::new(format!("{REPO}/hack/build-image.sh"));
            c.arg("--verify-bases");
            c
        },
        None,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "hack/build-image.sh --verify-bases:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recorded =
        std::fs::read_to_string(format!("{REPO}/hack/release/base-images.lock")).unwrap();
    for line in recorded.lines().filter(|l| !l.starts_with('#')) {
        let (name, digest) = line.split_once(' ').unwrap();
        assert!(
            stdout.contains(&format!("{name}: {digest}, as recorded")),
            "{name} {digest} not confirmed:\n{stdout}"
        );
    }
}

/// A lock pinning a version the Debian mirror does not serve fails the build, naming the package
/// and the version.
#[test]
fn a_pinned_version_the_mirror_no_longer_serves_is_named() {
    let lock = std::fs::read_to_string(format!("{REPO}/hack/image/bookworm.lock")).unwrap();
    let bash = lock
        .lines()
        .find(|l| l.starts_with("debian bash "))
        .expect("bash pinned in the lock");
    let stale = lock.replace(bash, "debian bash 5.0-0loopguard1");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bookworm.lock");
    std::fs::write(&path, stale).unwrap();
    let out = support::output(
        {
            let mut c = Command::new(format!("{REPO}/hack/build-image.sh"));
            c.arg("--verify-bases").env("LOOPGUARD_BASE_LOCK", &path);
            c
        },
        None,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("bookworm no longer serves")
            && stderr.contains("bash 5.0-0loopguard1")
            && stderr.contains("--refresh-lock"),
        "{:?}:\n{stderr}",
        out.status
    );
}
