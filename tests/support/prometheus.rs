//! A real Prometheus (hack/build-prometheus.sh) scraping loopguard's metrics endpoints inside the
//! network namespaces of hollow nodes and pods, and the queries of the chart's alerts and dashboard.

#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The bin folder with `prometheus` and `promtool` (built on first use).
pub fn bin_dir() -> PathBuf {
    let out = super::run(
        Command::new(format!("{REPO}/hack/build-prometheus.sh")),
        None,
    );
    PathBuf::from(out.lines().last().expect("bin dir").trim())
}

/// The helm the control plane build pinned.
pub fn helm() -> PathBuf {
    let out = super::run(
        {
            let mut c = Command::new(format!("{REPO}/hack/build-control-plane.sh"));
            c.arg("--check");
            c
        },
        None,
    );
    PathBuf::from(out.trim()).join("helm")
}

/// The chart rendered with `sets`, only `template` (for example `templates/prometheusrule.yaml`).
pub fn render(template: &str, sets: &[&str]) -> String {
    render_in("default", template, sets)
}

/// [`render`] for a release in `namespace`.
pub fn render_in(namespace: &str, template: &str, sets: &[&str]) -> String {
    let mut helm = Command::new(helm());
    helm.args(["template", "loopguard", &format!("{REPO}/charts/loopguard")])
        .args(["--namespace", namespace, "--show-only", template]);
    for set in sets {
        helm.args(["--set", set]);
    }
    super::run(helm, None)
}

/// The alerting rules of the chart's PrometheusRule, as a Prometheus rule file's `groups`.
pub fn alert_groups() -> Value {
    let rendered = render(
        "templates/prometheusrule.yaml",
        &["prometheusRule.enabled=true"],
    );
    let rule: Value = serde_saphyr::from_str(&rendered).expect("PrometheusRule YAML");
    rule["spec"]["groups"].clone()
}

/// Every query a user's Prometheus runs for loopguard: each alert's query (its expression without
/// the final comparison) and each dashboard target, with where it comes from.
pub fn queries() -> Vec<(String, String)> {
    let mut all = Vec::new();
    for group in alert_groups().as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let expr = rule["expr"].as_str().expect("expr");
            all.push((
                format!("alert {}", rule["alert"].as_str().unwrap()),
                alert_query(expr).to_string(),
            ));
        }
    }
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{REPO}/charts/loopguard/dashboards/loopguard.json"))
            .expect("dashboard"),
    )
    .expect("dashboard JSON");
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            all.push((
                format!("panel {}", panel["title"].as_str().unwrap()),
                target["expr"].as_str().expect("expr").to_string(),
            ));
        }
    }
    // Each metric selector on its own as well: `or vector(0)` and the like answer a query whose
    // metric was renamed away.
    let mut selectors: Vec<(String, String)> = Vec::new();
    for (from, expr) in &all {
        for selector in metric_selectors(expr) {
            if !selectors.iter().any(|(_, s)| *s == selector) {
                selectors.push((format!("the selector of {from}"), selector));
            }
        }
    }
    all.extend(selectors);
    all
}

/// The metric selectors of a PromQL expression: `loopguard_...` with its `{...}` label matchers.
pub fn metric_selectors(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("loopguard_") {
        let tail = &rest[at..];
        let name_len = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let mut end = name_len;
        if tail[name_len..].starts_with('{') {
            end = name_len + tail[name_len..].find('}').expect("a closed label matcher") + 1;
        }
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// `(query) <op> <threshold>` → `query`: what must return series on a live cluster even when
/// nothing is wrong (the comparison then filters them out).
pub fn alert_query(expr: &str) -> &str {
    let open = expr.find('(').expect("an alert expression starts with (");
    let mut depth = 0;
    for (i, c) in expr.char_indices().skip(open) {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return &expr[open + 1..i];
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced alert expression {expr}")
}

/// A metrics endpoint inside a network namespace, with the labels a ServiceMonitor would give it.
pub struct Target {
    pub netns: String,
    pub port: u16,
    pub labels: Vec<(String, String)>,
}

/// Prometheus scraping `targets` every second, through relays from the host into each namespace.
pub struct Prometheus {
    server: Child,
    relays: Vec<Child>,
    pub url: String,
    dir: tempfile::TempDir,
    /// The network namespace Prometheus runs in (its API is reached from there), if not the host's.
    netns: Option<String>,
}

impl Prometheus {
    /// Starts Prometheus and its relays and waits until every target is up. A port that
    /// `free_port` gave can be taken before the relay or Prometheus binds it: a start whose server
    /// or relay exited is made again on new ports (three times at most).
    pub fn start(targets: &[Target]) -> Prometheus {
        let mut failures = Vec::new();
        for _ in 0..3 {
            let mut prometheus = Prometheus::spawn(targets);
            match prometheus.wait_targets_up(targets.len()) {
                Ok(()) => return prometheus,
                Err(why) => failures.push(why),
            }
        }
        panic!(
            "Prometheus never scraped every target:\n{}",
            failures.join("\n---\n")
        );
    }

    fn spawn(targets: &[Target]) -> Prometheus {
        let bin = bin_dir();
        let dir = tempfile::tempdir().unwrap();
        let mut relays = Vec::new();
        let mut scrape = String::new();
        for target in targets {
            let port = super::free_port();
            let relay = Command::new("socat")
                .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"))
                .arg(format!(
                    "EXEC:nsenter --net=/run/netns/{} socat STDIO TCP\\:127.0.0.1\\:{}",
                    target.netns, target.port
                ))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("socat relay");
            relays.push(relay);
            let labels: Vec<String> = target
                .labels
                .iter()
                .map(|(k, v)| format!("{k}: {v:?}"))
                .collect();
            scrape.push_str(&format!(
                "      - targets: ['127.0.0.1:{port}']\n        labels: {{{}}}\n",
                labels.join(", ")
            ));
        }
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: loopguard\n    static_configs:\n{scrape}"
        );
        Prometheus::launch(&bin, dir, &config, None, relays)
    }

    /// Prometheus inside the network namespace `netns` with the scrape `jobs`, once `count`
    /// targets are up (panics with its targets and log after 60 s).
    pub fn start_in(netns: &str, jobs: &[Value], count: usize) -> Prometheus {
        let config = serde_json::json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": jobs,
        });
        let dir = tempfile::tempdir().unwrap();
        let mut prometheus = Prometheus::launch(
            &bin_dir(),
            dir,
            &config.to_string(),
            Some(netns),
            Vec::new(),
        );
        if let Err(why) = prometheus.wait_targets_up(count) {
            panic!("Prometheus in {netns}: {why}");
        }
        prometheus
    }

    fn launch(
        bin: &Path,
        dir: tempfile::TempDir,
        config: &str,
        netns: Option<&str>,
        relays: Vec<Child>,
    ) -> Prometheus {
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let port = super::free_port();
        let mut command = match netns {
            Some(netns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{netns}"))
                    .arg(bin.join("prometheus"));
                c
            }
            None => Command::new(bin.join("prometheus")),
        };
        let server = command
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus");
        Prometheus {
            server,
            relays,
            url: format!("http://127.0.0.1:{port}"),
            dir,
            netns: netns.map(String::from),
        }
    }

    /// The last lines Prometheus logged.
    fn log_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn get(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let mut curl = match &self.netns {
            Some(netns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{netns}")).arg("curl");
                c
            }
            None => Command::new("curl"),
        };
        curl.args([
            "-sf",
            "--max-time",
            "10",
            "-G",
            &format!("{}{path}", self.url),
        ]);
        for (k, v) in query {
            curl.args(["--data-urlencode", &format!("{k}={v}")]);
        }
        let out = curl.output().unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    fn wait_targets_up(&mut self, count: usize) -> Result<(), String> {
        let started = Instant::now();
        loop {
            let up = self.query("up == 1");
            if up.len() == count {
                return Ok(());
            }
            if let Ok(Some(status)) = self.server.try_wait() {
                return Err(format!(
                    "prometheus exited ({status}):\n{}",
                    self.log_tail()
                ));
            }
            for relay in &mut self.relays {
                if let Ok(Some(status)) = relay.try_wait() {
                    return Err(format!("a socat relay exited ({status})"));
                }
            }
            if started.elapsed() > Duration::from_secs(60) {
                return Err(format!(
                    "{} of {count} targets up after 60 s: {:?}\nprometheus log:\n{}",
                    up.len(),
                    self.get("/api/v1/targets", &[]),
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The result vector of an instant query (empty on error).
    pub fn query(&self, expr: &str) -> Vec<Value> {
        let answer = self.get("/api/v1/query", &[("query", expr)]);
        answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The series of a range query over `[start, end]` (Unix seconds), `step` seconds apart.
    pub fn query_range(&self, expr: &str, start: f64, end: f64, step: f64) -> Vec<Value> {
        let answer = self.get(
            "/api/v1/query_range",
            &[
                ("query", expr),
                ("start", &format!("{start:.3}")),
                ("end", &format!("{end:.3}")),
                ("step", &format!("{step:.3}")),
            ],
        );
        answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The error Prometheus gives for `expr`, if any.
    pub fn error(&self, expr: &str) -> Option<String> {
        let answer = self.get("/api/v1/query", &[("query", expr)]);
        (answer["status"] != "success").then(|| answer.to_string())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        for relay in &mut self.relays {
            let _ = relay.kill();
            let _ = relay.wait();
        }
    }
}

/// The path of a file of this repository.
pub fn repo_file(path: &str) -> PathBuf {
    Path::new(REPO).join(path)
}

/// How Prometheus reaches the API server for Kubernetes service discovery.
pub struct SdAccess {
    pub api_server: String,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// A Prometheus label name for a Kubernetes label (what the service discovery does to it).
fn sanitize(label: &str) -> String {
    label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// The scrape jobs the Prometheus Operator makes of a ServiceMonitor or PodMonitor (its
/// `promcfg` generation, reduced to what a monitor of this chart can say): service discovery of
/// endpoint slices (ServiceMonitor) or pods (PodMonitor) in the monitor's namespaces, kept where the
/// selector's labels match and the port is the endpoint's named port, the operator's target labels,
/// then the monitor's own relabelings. A wrong selector, port name or relabeling in the chart gives
/// a job without the targets or labels the tests ask for.
pub fn scrape_jobs(monitor: &Value, sd: &SdAccess) -> Vec<Value> {
    let kind = monitor["kind"].as_str().expect("kind");
    let (role, object, port_label, endpoints) = match kind {
        "ServiceMonitor" => (
            "endpointslice",
            "service",
            "__meta_kubernetes_endpointslice_port_name",
            "endpoints",
        ),
        "PodMonitor" => (
            "pod",
            "pod",
            "__meta_kubernetes_pod_container_port_name",
            "podMetricsEndpoints",
        ),
        other => panic!("not a monitor: {other}"),
    };
    let name = monitor["metadata"]["name"].as_str().expect("name");
    let namespace = monitor["metadata"]["namespace"]
        .as_str()
        .expect("namespace");
    let spec = &monitor["spec"];
    let namespaces: Vec<Value> = spec["namespaceSelector"]["matchNames"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| vec![Value::from(namespace)]);
    let mut keep_selected = Vec::new();
    for (key, value) in spec["selector"]["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
    {
        let label = sanitize(key);
        keep_selected.push(serde_json::json!({
            "action": "keep",
            "source_labels": [
                format!("__meta_kubernetes_{object}_label_{label}"),
                format!("__meta_kubernetes_{object}_labelpresent_{label}"),
            ],
            "regex": format!("({});true", value.as_str().expect("a label value")),
        }));
    }
    let prefix = if kind == "ServiceMonitor" {
        "serviceMonitor"
    } else {
        "podMonitor"
    };
    spec[endpoints]
        .as_array()
        .expect("the monitor's endpoints")
        .iter()
        .enumerate()
        .map(|(i, endpoint)| {
            let port = endpoint["port"].as_str().expect("a named port");
            let mut relabel = keep_selected.clone();
            relabel.push(serde_json::json!({
                "action": "keep", "source_labels": [port_label], "regex": port,
            }));
            let mut target = vec![
                ("namespace", "__meta_kubernetes_namespace"),
                ("pod", "__meta_kubernetes_pod_name"),
                ("container", "__meta_kubernetes_pod_container_name"),
            ];
            if kind == "ServiceMonitor" {
                target.push(("service", "__meta_kubernetes_service_name"));
                target.push(("job", "__meta_kubernetes_service_name"));
            }
            for (label, source) in target {
                relabel.push(serde_json::json!({
                    "source_labels": [source], "target_label": label,
                }));
            }
            if kind == "PodMonitor" {
                relabel.push(serde_json::json!({
                    "target_label": "job", "replacement": format!("{namespace}/{name}"),
                }));
            }
            relabel.push(serde_json::json!({"target_label": "endpoint", "replacement": port}));
            for r in endpoint["relabelings"].as_array().into_iter().flatten() {
                let mut out = serde_json::Map::new();
                for (from, to) in [
                    ("sourceLabels", "source_labels"),
                    ("separator", "separator"),
                    ("targetLabel", "target_label"),
                    ("regex", "regex"),
                    ("modulus", "modulus"),
                    ("replacement", "replacement"),
                    ("action", "action"),
                ] {
                    if !r[from].is_null() {
                        out.insert(to.into(), r[from].clone());
                    }
                }
                relabel.push(Value::Object(out));
            }
            serde_json::json!({
                "job_name": format!("{prefix}/{namespace}/{name}/{i}"),
                "metrics_path": endpoint["path"].as_str().unwrap_or("/metrics"),
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "kubernetes_sd_configs": [{
                    "role": role,
                    "api_server": sd.api_server,
                    "namespaces": {"names": namespaces},
                    "tls_config": {
                        "ca_file": sd.ca_file,
                        "cert_file": sd.cert_file,
                        "key_file": sd.key_file,
                    },
                }],
                "relabel_configs": relabel,
            })
        })
        .collect()
}
