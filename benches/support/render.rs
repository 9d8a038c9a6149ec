//! The benches' raw measurements and the Markdown made from them: pure, shared by the bench
//! targets (which measure, keep the raw record in BENCHMARKS.json and write what `render_*` makes
//! of it into BENCHMARKS.md and the README) and by `tests/docs.rs` (which renders the committed
//! BENCHMARKS.json again and fails when a table row or headline differs from what is written).
//! Everything a page shows is computed here, from samples as measured: nothing is rounded or
//! derived before it is kept.

#![allow(dead_code)]

use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::time::Duration;

/// Timed samples of one measurement, in nanoseconds as measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Samples(pub Vec<u64>);

impl Samples {
    pub fn push(&mut self, d: Duration) {
        self.0.push(d.as_nanos() as u64);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn last(&self) -> Option<Duration> {
        self.0.last().map(|&ns| Duration::from_nanos(ns))
    }

    fn sorted(&self) -> Vec<u64> {
        let mut s = self.0.clone();
        s.sort();
        s
    }

    pub fn median(&self) -> Duration {
        let s = self.sorted();
        Duration::from_nanos(s[s.len() / 2])
    }

    /// The 90th percentile (nearest rank).
    pub fn p90(&self) -> Duration {
        let s = self.sorted();
        let rank = (s.len() * 9).div_ceil(10).max(1);
        Duration::from_nanos(s[rank - 1])
    }

    pub fn max(&self) -> Duration {
        Duration::from_nanos(*self.0.iter().max().expect("samples"))
    }

    /// `median / p90 / max` in milliseconds, one decimal.
    pub fn ms(&self) -> String {
        format!(
            "{:.1} / {:.1} / {:.1}",
            ms(self.median()),
            ms(self.p90()),
            ms(self.max())
        )
    }

    /// `median / p90 / max` in seconds, two decimals.
    pub fn secs(&self) -> String {
        format!(
            "{:.2} / {:.2} / {:.2}",
            self.median().as_secs_f64(),
            self.p90().as_secs_f64(),
            self.max().as_secs_f64()
        )
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Markdown being built for one section.
#[derive(Default)]
pub struct Section(pub String);

impl Section {
    pub fn line(&mut self, text: impl AsRef<str>) {
        self.0.push_str(text.as_ref());
        self.0.push('\n');
    }

    pub fn table(&mut self, header: &[&str], rows: &[Vec<String>]) {
        let _ = writeln!(self.0, "| {} |", header.join(" | "));
        let align: Vec<&str> = header
            .iter()
            .enumerate()
            .map(|(i, _)| if i == 0 { "---" } else { "---:" })
            .collect();
        let _ = writeln!(self.0, "|{}|", align.join("|"));
        for row in rows {
            let _ = writeln!(self.0, "| {} |", row.join(" | "));
        }
        self.0.push('\n');
    }
}

/// When, where and at which commit a run was made.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub date: String,
    pub commit: String,
    pub machine: String,
}

/// A share of one core: CPU time used over a wall-clock window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuUse {
    pub used_ns: u64,
    pub window_ns: u64,
}

impl CpuUse {
    pub fn new(used: Duration, window: Duration) -> CpuUse {
        CpuUse {
            used_ns: used.as_nanos() as u64,
            window_ns: window.as_nanos() as u64,
        }
    }

    pub fn percent(&self) -> f64 {
        self.used_ns as f64 / self.window_ns as f64 * 100.0
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ---------------------------------------------------------------------------------------------
// Node engine
// ---------------------------------------------------------------------------------------------

/// How many foreign rules a namespace holds, and where.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Foreign {
    pub total: usize,
    /// [`LONG_CHAIN`] each in INPUT and OUTPUT, the chains loopguard's rules are in, and the rest
    /// over twenty chains of their own; else ten each there.
    pub long: bool,
}

/// How many foreign rules INPUT and OUTPUT each hold in a long-chain layout.
pub const LONG_CHAIN: usize = 5_000;

impl Foreign {
    /// The foreign rules in INPUT and in OUTPUT each.
    pub fn builtin(&self) -> usize {
        let each = if self.long { LONG_CHAIN } else { 10 };
        each.min(self.total / 2)
    }
}

impl Foreign {
    pub fn spread(total: usize) -> Foreign {
        Foreign { total, long: false }
    }

    pub fn long(total: usize) -> Foreign {
        Foreign { total, long: true }
    }
}

impl std::fmt::Display for Foreign {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.long {
            write!(
                f,
                "{} ({} each in INPUT and OUTPUT)",
                self.total,
                self.builtin()
            )
        } else {
            write!(f, "{}", self.total)
        }
    }
}

/// The one-shot commands of one namespace, in this order (`OneShot::samples` follows it).
pub const ONE_SHOT: [&str; 9] = [
    "loopguard check, auto-detected backend",
    "loopguard check, --backend forced",
    "loopguard enforce, nothing to do, auto",
    "loopguard enforce, nothing to do, forced",
    "loopguard enforce, three rules, auto",
    "loopguard enforce, three rules, forced",
    "the seed's shell script (three rules)",
    "the seed's Ansible playbook (three rules)",
    "full `ip6tables-save -t filter`",
];

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OneShot {
    pub backend: String,
    pub foreign: Foreign,
    /// One per `ONE_SHOT` command.
    pub samples: Vec<Samples>,
}

/// `loopguard node watch` with deletions of its DROP, then idle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Repair {
    pub backend: String,
    pub foreign: Foreign,
    /// Delete reaching the kernel → rule back, for the repairs the expected trigger made.
    pub latency: Samples,
    /// nft: the same, when the deleting process keeps its netlink socket open (`nft -i`): the
    /// kernel holds every write while a closing writer's socket is released, so this is
    /// loopguard's own part.
    #[serde(default)]
    pub latency_open: Samples,
    /// Deletions made.
    pub deletions: usize,
    /// The triggers the watcher logged for the repairs left out.
    pub others: Vec<String>,
    pub idle_cpu: CpuUse,
    pub rss_kib: u64,
}

/// The nftables rule's commands, in this order (`NftTable::one_shot` follows it).
pub const NFT_ONE_SHOT: [&str; 6] = [
    "loopguard enforce, writing its table",
    "loopguard enforce, nothing to do",
    "loopguard check",
    "ComplianceAsCode's bash remediation (`nft add rule` ×3, into inet filter)",
    "the seed's shell script (`ip6tables -A` ×3)",
    "full `nft list ruleset` (what ComplianceAsCode's check reads)",
];

/// The drifts of loopguard's table, in this order (`NftTable::latency` and `counted` follow it).
/// The third is the first done by a writer that keeps its netlink socket open (`nft -i`).
pub const NFT_DRIFTS: [&str; 3] = [
    "`nft delete rule` of its ip6 drop",
    "`nft flush ruleset`",
    "the same delete, from a writer that keeps its socket open (`nft -i`)",
];

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NftTable {
    pub foreign: usize,
    pub one_shot: Vec<Samples>,
    /// Change committed → table back, per drift, for the repairs the nft event made.
    pub latency: Vec<Samples>,
    /// Drifts made, per drift.
    pub counted: Vec<usize>,
    pub others: Vec<String>,
    pub idle_cpu: CpuUse,
    pub rss_kib: u64,
}

/// Everything one run of `benches/node_engine.rs` measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeRun {
    pub meta: Meta,
    pub reps: usize,
    pub one_shot: Vec<OneShot>,
    pub repairs: Vec<Repair>,
    pub nft_table: NftTable,
}

/// What brought a repair, as the bench saw and counted it, with the repairs left out.
fn repair_signal(backend: &str, others: &[String]) -> String {
    let signal = match backend {
        "nft" => "nftables event (watcher) / next ruleset event, then `-C` (bench)",
        _ => {
            "the legacy probe: xtables lock closes, GET_INFO shapes (watcher) / entry count polled every 1 ms, then `-C` (bench)"
        }
    };
    if others.is_empty() {
        return signal.to_string();
    }
    let mut counted: std::collections::BTreeMap<&str, usize> = Default::default();
    for other in others {
        *counted.entry(other.as_str()).or_default() += 1;
    }
    let counted: Vec<String> = counted.iter().map(|(t, n)| format!("{n} by {t}")).collect();
    format!("{signal}; left out: {}", counted.join(", "))
}

/// The node engine's section of BENCHMARKS.md and its headline lines.
pub fn render_node(run: &NodeRun) -> (String, String) {
    let mut section = Section::default();
    let mut headline = Section::default();
    section.line(format!(
        "Measured {} at commit `{}` on {}. Median / p90 / max of {} runs, milliseconds, unless said otherwise.\n",
        run.meta.date, run.meta.commit, run.meta.machine, run.reps
    ));
    let largest = run.one_shot.iter().map(|o| o.foreign.total).max();
    let mut one_shot = Vec::new();
    for o in &run.one_shot {
        for (name, s) in ONE_SHOT.iter().zip(&o.samples) {
            one_shot.push(vec![
                o.backend.clone(),
                o.foreign.to_string(),
                name.to_string(),
                s.ms(),
            ]);
        }
        if Some(o.foreign.total) == largest {
            let s = &o.samples;
            let seed = s[6].median().as_secs_f64();
            let of_seed = |d: std::time::Duration| d.as_secs_f64() / seed;
            headline.line(format!(
                "- {} backend, {} foreign rules, median: `loopguard node enforce` writing the three rules {:.0} ms ({:.2}x the seed's shell script; nothing to do: {:.0} ms, {:.2}x; `check` {:.0} ms, {:.2}x), the seed's shell script {:.0} ms, its Ansible playbook {:.0} ms.",
                o.backend,
                o.foreign,
                ms(s[4].median()),
                of_seed(s[4].median()),
                ms(s[2].median()),
                of_seed(s[2].median()),
                ms(s[0].median()),
                of_seed(s[0].median()),
                ms(s[6].median()),
                ms(s[7].median()),
            ));
        }
    }
    section.line("### One-shot commands\n");
    section.table(
        &[
            "backend",
            "foreign rules",
            "command",
            "median / p90 / max (ms)",
        ],
        &one_shot,
    );

    let largest = run.repairs.iter().map(|r| r.foreign.total).max();
    let (mut repairs, mut idle) = (Vec::new(), Vec::new());
    for r in &run.repairs {
        repairs.push(vec![
            r.backend.clone(),
            r.foreign.to_string(),
            repair_signal(&r.backend, &r.others),
            format!("{} of {}", r.latency.len(), r.deletions),
            r.latency.ms(),
        ]);
        if r.latency_open.len() > 0 {
            repairs.push(vec![
                r.backend.clone(),
                r.foreign.to_string(),
                "the same, deleted by a writer that keeps its netlink socket open (`nft -i`)"
                    .into(),
                format!("{}", r.latency_open.len()),
                r.latency_open.ms(),
            ]);
        }
        idle.push(vec![
            r.backend.clone(),
            r.foreign.to_string(),
            format!("{:.2} %", r.idle_cpu.percent()),
            format!("{:.1} MiB", mib(r.rss_kib)),
        ]);
        if Some(r.foreign.total) == largest {
            let open = if r.latency_open.len() > 0 {
                format!(
                    " ({:.1} ms median when the deleting process keeps its netlink socket open: the rest is the kernel holding writes while a closing writer's socket is released)",
                    ms(r.latency_open.median())
                )
            } else {
                String::new()
            };
            headline.line(format!(
                "- Drift repair, {} backend, {} foreign rules: median {:.1} ms, p90 {:.1} ms from the delete reaching the kernel to the rule back, seen from outside ({} of {} deletions, those repaired on the {}){open}; idle watcher {:.2} % of a core, {:.1} MiB.",
                r.backend,
                r.foreign,
                ms(r.latency.median()),
                ms(r.latency.p90()),
                r.latency.len(),
                r.deletions,
                if r.backend == "nft" { "nftables event" } else { "legacy probe" },
                r.idle_cpu.percent(),
                mib(r.rss_kib),
            ));
        }
    }
    section.line("### Drift repair\n");
    section.table(
        &[
            "backend",
            "foreign rules",
            "what brought the repair",
            "deletions counted",
            "delete in the kernel → rule back, median / p90 / max (ms)",
        ],
        &repairs,
    );
    section.line("### The watcher at idle\n");
    section.table(
        &[
            "backend",
            "foreign rules",
            "CPU (of one core)",
            "resident memory",
        ],
        &idle,
    );

    let t = &run.nft_table;
    section.line(format!(
        "### The nftables rule: table inet loopguard, {} foreign iptables-nft rules\n",
        t.foreign
    ));
    let rows: Vec<Vec<String>> = NFT_ONE_SHOT
        .iter()
        .zip(&t.one_shot)
        .map(|(name, s)| vec![name.to_string(), s.ms()])
        .collect();
    section.table(&["command", "median / p90 / max (ms)"], &rows);
    let rows: Vec<Vec<String>> = NFT_DRIFTS
        .iter()
        .enumerate()
        .map(|(i, drift)| {
            vec![
                drift.to_string(),
                format!("{} of {}", t.latency[i].len(), t.counted[i]),
                t.latency[i].ms(),
            ]
        })
        .collect();
    section.table(
        &[
            "drift",
            "counted",
            "change committed → table back, median / p90 / max (ms)",
        ],
        &rows,
    );
    section.line(format!(
        "The watcher at idle: {:.2} % of a core, {:.1} MiB.\n",
        t.idle_cpu.percent(),
        mib(t.rss_kib)
    ));
    headline.line(format!(
        "- The nftables rule, {} foreign iptables-nft rules, median: `loopguard node enforce` writing table inet loopguard {:.0} ms (nothing to do: {:.0} ms), ComplianceAsCode's bash remediation {:.0} ms; its table back {:.1} ms after a rule of it is deleted ({:.1} ms when the deleting process keeps its netlink socket open: the rest is the kernel's wait when that socket closes) and {:.1} ms after `nft flush ruleset`, seen from outside; idle watcher {:.2} % of a core.",
        t.foreign,
        ms(t.one_shot[0].median()),
        ms(t.one_shot[1].median()),
        ms(t.one_shot[3].median()),
        ms(t.latency[0].median()),
        ms(t.latency[2].median()),
        ms(t.latency[1].median()),
        t.idle_cpu.percent(),
    ));
    (section.0, headline.0)
}

// ---------------------------------------------------------------------------------------------
// In a cluster
// ---------------------------------------------------------------------------------------------

/// Real agents on `nodes` hollow nodes: policies applied and deleted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Applies {
    pub nodes: usize,
    /// Nodes registered and an agent Ready on each.
    pub up_ns: u64,
    pub apply: Samples,
    pub delete: Samples,
}

/// One `apiserver_request_total` series (summed by resource and verb) before and after the window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestCount {
    pub resource: String,
    pub verb: String,
    pub before: f64,
    pub after: f64,
}

/// The quiet window with every node compliant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Steady {
    pub nodes: usize,
    pub window_ns: u64,
    pub heartbeat_secs: u64,
    pub requests: Vec<RequestCount>,
    /// loopguard's requests as flow control dispatched them: writes, and the rest.
    pub writes_before: f64,
    pub writes_after: f64,
    pub reads_before: f64,
    pub reads_after: f64,
    /// One per agent.
    pub agent_cpu: Vec<CpuUse>,
    pub agent_rss_kib: Vec<u64>,
}

/// Simulated nodes rolled up by the real controller.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Simulated {
    pub nodes: usize,
    pub written: Samples,
    pub lag: Samples,
    pub total: Samples,
    /// The controller's status writes, per change.
    pub writes: Vec<f64>,
    pub cpu: CpuUse,
    pub rss_kib: u64,
    pub peak_kib: u64,
}

/// Everything one run of `benches/cluster.rs` measured (a part left out is `None`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterRun {
    pub meta: Meta,
    pub applies: Vec<Applies>,
    pub steady: Option<Steady>,
    pub simulated: Option<Simulated>,
    /// The simulated cluster grown past 5,000 nodes, size by size.
    #[serde(default)]
    pub scale: Vec<Simulated>,
    /// When the scale part was measured, if in a run of its own (`-- --part scale`).
    #[serde(default)]
    pub scale_meta: Option<Meta>,
}

/// The cluster's section of BENCHMARKS.md and its headline lines.
pub fn render_cluster(run: &ClusterRun) -> (String, String) {
    let mut section = Section::default();
    let mut headline = Section::default();
    section.line(format!(
        "Measured {} at commit `{}` on {}.\n",
        run.meta.date, run.meta.commit, run.meta.machine
    ));
    if !run.applies.is_empty() {
        render_applies(run, &mut section, &mut headline);
    }
    if let Some(sim) = &run.simulated {
        render_simulated(sim, &mut section, &mut headline);
    }
    if !run.scale.is_empty() {
        render_scale(run, &mut section, &mut headline);
    }
    (section.0, headline.0)
}

fn render_applies(run: &ClusterRun, section: &mut Section, headline: &mut Section) {
    // The steady state is measured with the largest size, in its last apply: it comes first.
    if let Some(steady) = &run.steady {
        render_steady(steady, section, headline);
    }
    let rows: Vec<Vec<String>> = run
        .applies
        .iter()
        .map(|a| {
            vec![
                a.nodes.to_string(),
                format!("{:.1}", Duration::from_nanos(a.up_ns).as_secs_f64()),
                a.apply.len().to_string(),
                a.apply.secs(),
                a.delete.secs(),
            ]
        })
        .collect();
    let medians: Vec<String> = run
        .applies
        .iter()
        .map(|a| format!("{} nodes {:.2} s", a.nodes, a.apply.median().as_secs_f64()))
        .collect();
    section.line("### Real agents: a policy applied and deleted\n");
    section.table(
        &[
            "nodes",
            "nodes up, an agent Ready on each (s)",
            "samples",
            "create → `Compliant=True`, median / p90 / max (s)",
            "delete → policy gone (every node cleaned up), median / p90 / max (s)",
        ],
        &rows,
    );
    headline.line(format!(
        "- Real agents on hollow nodes, `kubectl apply` of a policy → `Compliant=True`, median: {}.",
        medians.join(", ")
    ));
}

fn render_steady(s: &Steady, section: &mut Section, headline: &mut Section) {
    let window = Duration::from_nanos(s.window_ns).as_secs_f64();
    let per_node_hour = |delta: f64| delta / s.nodes as f64 * 3600.0 / window;
    let mut rows = Vec::new();
    for r in &s.requests {
        let delta = r.after - r.before;
        if delta <= 0.0 {
            continue;
        }
        let who = match (r.resource.as_str(), r.verb.as_str()) {
            (res, _) if res.starts_with("loopback") => "loopguard (agents, controller)",
            ("leases", "GET" | "PUT") => {
                "leader elections (loopguard's controller, kube-controller-manager, kube-scheduler)"
            }
            ("leases", _) | ("nodes" | "nodes/status", _) => "hollow kubelets' heartbeats",
            _ => "other clients",
        };
        rows.push(vec![
            r.resource.clone(),
            r.verb.clone(),
            who.to_string(),
            format!("{delta:.0}"),
            format!("{:.2}", per_node_hour(delta)),
        ]);
    }
    let (writes, reads) = (
        s.writes_after - s.writes_before,
        s.reads_after - s.reads_before,
    );
    let (writes_hour, all_hour) = (per_node_hour(writes), per_node_hour(writes + reads));
    let rss: Vec<f64> = s.agent_rss_kib.iter().map(|&k| mib(k)).collect();
    let cpu: Vec<f64> = s.agent_cpu.iter().map(CpuUse::percent).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    section.line(format!(
        "### Steady state: {} compliant nodes, {} s (one heartbeat interval)\n",
        s.nodes,
        Duration::from_nanos(s.window_ns).as_secs()
    ));
    section.line(
        "Requests that kube-apiserver counted in the window (resources loopguard or the nodes use; \
         `apiserver_request_total`, which does not say who sent them), and per node per hour:\n",
    );
    section.table(
        &[
            "resource",
            "verb",
            "from",
            "in the window",
            "per node per hour",
        ],
        &rows,
    );
    section.line(format!(
        "- **loopguard's requests: {writes_hour:.1} writes and {all_hour:.1} in all per node per hour** \
         ({writes:.0} writes and {reads:.0} other requests in the window, every request of loopguard's \
         service accounts, agents and controller, the controller's leader Lease included, as \
         kube-apiserver's flow control counted them: `apiserver_flowcontrol_dispatched_requests_total` \
         under FlowSchemas of the bench's own). The heartbeat is one status write per node every {} s \
         (`agent.heartbeatInterval`); nothing else changes.",
        s.heartbeat_secs
    ));
    section.line(format!(
        "- Agents ({}): resident memory {:.1} MiB on average, {:.1} MiB at most; CPU {:.3} % of a core on average, {:.3} % at most (each agent in a cgroup of its own, the processes it starts included).\n",
        rss.len(),
        mean(&rss),
        max(&rss),
        mean(&cpu),
        max(&cpu),
    ));
    headline.line(format!(
        "- {} real agents at steady state, one heartbeat interval: {writes_hour:.1} API writes and {all_hour:.1} requests in all per node per hour (the controller's Lease included); agent memory {:.1} MiB on average ({:.1} MiB at most), CPU {:.3} % of a core (children included).",
        s.nodes,
        mean(&rss),
        max(&rss),
        mean(&cpu),
    ));
}

fn render_simulated(s: &Simulated, section: &mut Section, headline: &mut Section) {
    let nodes = s.nodes;
    let changes = s.writes.len();
    let writes_mean = s.writes.iter().sum::<f64>() / s.writes.len() as f64;
    let writes_max = s.writes.iter().copied().fold(0.0, f64::max);
    let cpu_seconds = Duration::from_nanos(s.cpu.used_ns).as_secs_f64();
    let elapsed = Duration::from_nanos(s.cpu.window_ns).as_secs_f64();
    let (rss, peak) = (mib(s.rss_kib), mib(s.peak_kib));
    section.line(format!(
        "### {nodes} simulated nodes, {changes} policy changes\n"
    ));
    section.table(
        &["measured per policy change", "median / p90 / max (s)"],
        &[
            vec![
                format!("the {nodes} simulated agents write their reports (64 at a time)"),
                s.written.secs(),
            ],
            vec![
                "the controller: last report written → status converged".into(),
                s.lag.secs(),
            ],
            vec!["policy change → status converged".into(), s.total.secs()],
        ],
    );
    section.line(format!(
        "- Status writes per change: {writes_mean:.1} on average, {writes_max:.0} at most (the controller's `loopguard_controller_status_writes_total`; it coalesces reports for 500 ms)."
    ));
    section.line(format!(
        "- Controller: resident memory {rss:.1} MiB at the end, {peak:.1} MiB at its peak; CPU {cpu_seconds:.1} s over the {elapsed:.0} s of changes ({:.1} % of a core).\n",
        s.cpu.percent()
    ));
    headline.line(format!(
        "- {nodes} simulated nodes: a policy change converges {:.1} s (median; p90 {:.1} s) after the last node reports, {:.1} s after the change; {writes_mean:.1} status writes per change; controller memory {peak:.1} MiB at its peak.",
        s.lag.median().as_secs_f64(),
        s.lag.p90().as_secs_f64(),
        s.total.median().as_secs_f64(),
    ));
}

/// The simulated cluster size by size, what limits it on this machine, and the projection.
fn render_scale(run: &ClusterRun, section: &mut Section, headline: &mut Section) {
    section.line("### Scale: the simulated cluster grown to 15,000 nodes\n");
    if let Some(meta) = &run.scale_meta {
        section.line(format!(
            "Measured {} at commit `{}` on {}, in a run of its own (`cargo bench --bench cluster -- --part scale`).\n",
            meta.date, meta.commit, meta.machine
        ));
    }
    let rows: Vec<Vec<String>> = run
        .scale
        .iter()
        .map(|s| {
            let writes = s.writes.iter().sum::<f64>() / s.writes.len().max(1) as f64;
            vec![
                s.nodes.to_string(),
                s.writes.len().to_string(),
                format!("{:.1}", s.written.median().as_secs_f64()),
                s.lag.secs(),
                format!("{:.1}", s.total.median().as_secs_f64()),
                format!("{writes:.1}"),
                format!("{:.1}", mib(s.peak_kib)),
            ]
        })
        .collect();
    section.table(
        &[
            "nodes",
            "changes",
            "reports written, median (s)",
            "last report → converged, median / p90 / max (s)",
            "change → converged, median (s)",
            "status writes per change",
            "controller peak memory (MiB)",
        ],
        &rows,
    );
    let largest = run.scale.last().expect("not empty");
    let rate = largest.nodes as f64 / largest.written.median().as_secs_f64().max(1e-9);
    let first = &run.scale[0];
    section.line(format!(
        "- What limits it here: one machine of 2 cores runs etcd, kube-apiserver, the simulated agents and the controller, and takes the agents' reports at about {rate:.0} per second, so at {} nodes the last report of a change is written {:.1} s after it; the controller's own part, last report → converged, went from {:.1} s at {} nodes to {:.1} s at {}, and its memory from {:.1} to {:.1} MiB.",
        largest.nodes,
        largest.written.median().as_secs_f64(),
        first.lag.median().as_secs_f64(),
        first.nodes,
        largest.lag.median().as_secs_f64(),
        largest.nodes,
        mib(first.peak_kib),
        mib(largest.peak_kib),
    ));
    section.line(
        "- Projection: in a real cluster every agent writes its own report, so a change converges when the API server has taken one report per node plus the controller's part above; the API server's write throughput, not loopguard, sets the first term.\n",
    );
    headline.line(format!(
        "- {} simulated nodes: a policy change converges {:.1} s after the last node reports ({:.1} s after the change, {rate:.0} reports/s being this machine's API server); {:.1} status writes per change; controller memory {:.1} MiB at its peak.",
        largest.nodes,
        largest.lag.median().as_secs_f64(),
        largest.total.median().as_secs_f64(),
        largest.writes.iter().sum::<f64>() / largest.writes.len().max(1) as f64,
        mib(largest.peak_kib),
    ));
}

// ---------------------------------------------------------------------------------------------
// Regressions against the committed record
// ---------------------------------------------------------------------------------------------

/// How much slower than the committed median a row may be before a run warns about it.
pub const REGRESSION: f64 = 1.2;

/// Every timed row of a node-engine run, by the name its table gives it, with its median.
pub fn node_medians(run: &NodeRun) -> Vec<(String, Duration)> {
    let mut rows = Vec::new();
    for o in &run.one_shot {
        for (name, s) in ONE_SHOT.iter().zip(&o.samples) {
            rows.push((
                format!("{} | {} | {name}", o.backend, o.foreign),
                s.median(),
            ));
        }
    }
    for r in &run.repairs {
        if r.latency.len() > 0 {
            let key = format!("{} | {} | drift repair", r.backend, r.foreign);
            rows.push((key, r.latency.median()));
        }
        if r.latency_open.len() > 0 {
            let key = format!(
                "{} | {} | drift repair, deleter's socket open",
                r.backend, r.foreign
            );
            rows.push((key, r.latency_open.median()));
        }
    }
    let t = &run.nft_table;
    for (name, s) in NFT_ONE_SHOT.iter().zip(&t.one_shot) {
        rows.push((
            format!("table inet loopguard | {} | {name}", t.foreign),
            s.median(),
        ));
    }
    for (drift, s) in NFT_DRIFTS.iter().zip(&t.latency) {
        if s.len() > 0 {
            let key = format!("table inet loopguard | {} | {drift}", t.foreign);
            rows.push((key, s.median()));
        }
    }
    rows
}

/// Every timed row of a cluster run, by the name its table gives it, with its median.
pub fn cluster_medians(run: &ClusterRun) -> Vec<(String, Duration)> {
    let mut rows = Vec::new();
    for a in &run.applies {
        rows.push((
            format!("{} nodes | create → Compliant=True", a.nodes),
            a.apply.median(),
        ));
        rows.push((
            format!("{} nodes | delete → policy gone", a.nodes),
            a.delete.median(),
        ));
    }
    if let Some(s) = &run.simulated {
        let nodes = s.nodes;
        rows.push((
            format!("{nodes} simulated nodes | reports written"),
            s.written.median(),
        ));
        rows.push((
            format!("{nodes} simulated nodes | last report → converged"),
            s.lag.median(),
        ));
        rows.push((
            format!("{nodes} simulated nodes | change → converged"),
            s.total.median(),
        ));
    }
    rows
}

/// The rows measured both now and in the committed record whose median is now more than
/// `REGRESSION` times the committed one, as warning lines naming the row; and how many rows could
/// be compared. A quick run has few samples: this warns, it never fails a run.
pub fn regressions(
    committed: &[(String, Duration)],
    now: &[(String, Duration)],
) -> (usize, Vec<String>) {
    let mut compared = 0;
    let mut warnings = Vec::new();
    for (key, median) in now {
        let Some((_, before)) = committed.iter().find(|(k, _)| k == key) else {
            continue;
        };
        compared += 1;
        if median.as_secs_f64() > before.as_secs_f64() * REGRESSION {
            warnings.push(format!(
                "warning: slower than the committed BENCHMARKS.json: {key}: median {:.1} ms now, {:.1} ms committed (+{:.0} %)",
                ms(*median),
                ms(*before),
                (median.as_secs_f64() / before.as_secs_f64() - 1.0) * 100.0
            ));
        }
    }
    (compared, warnings)
}

/// One real-cluster soak (`benches/soak.rs`): loopguard beside kube-proxy under Service churn.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SoakRun {
    pub meta: Meta,
    /// The churn window, in seconds.
    pub window_s: u64,
    /// The chart's heartbeat interval: the status writes a window may hold.
    pub heartbeat_s: u64,
    pub services_created: u64,
    pub services_scaled: u64,
    pub services_deleted: u64,
    pub nodes: Vec<SoakNode>,
}

/// One node's account of the soak window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SoakNode {
    pub node: String,
    /// kube-proxy's mode and the node's iptables backend, as `iptables/legacy`.
    pub kube_proxy: String,
    /// How loopguard's rules were watched: `legacy table` (the kernel's table read every few
    /// ms) or `nftables events` (every ruleset event of the node).
    pub sampled_from: String,
    /// Table reads, or ruleset events seen.
    pub samples: u64,
    /// Reads without loopguard's rules, or events removing one of them.
    pub missing: u64,
    /// kube-proxy's rule syncs in the window (its `sync_proxy_rules_duration_seconds_count`).
    pub kube_proxy_syncs: u64,
    /// Its failed syncs (restore and partial-restore failures, nftables sync failures).
    pub kube_proxy_failures: u64,
    /// Error lines in its log in the window.
    pub kube_proxy_errors: u64,
    /// loopguard's writes in the window (passes that wrote), status writes, repairs.
    pub loopguard_writes: u64,
    pub status_writes: u64,
    pub repairs: u64,
    /// Every write loopguard logged since it started, and those naming a rule not its own.
    pub logged_writes: u64,
    pub foreign_edits: u64,
}

pub fn render_soak(run: &SoakRun) -> (String, String) {
    let mut section = Section::default();
    let mut headline = Section::default();
    section.line(format!(
        "Measured {} at commit `{}` on {}.\n",
        run.meta.date, run.meta.commit, run.meta.machine
    ));
    section.line(format!(
        "A {}-minute window on the three real nodes of `hack/real-cluster.sh`, one policy enforcing the \
         seed's rules on every node (`applicability: Always`) and loopguard's nftables table where \
         nftables is installed, while {} Services (NodePort, dual-stack, with EndpointSlices) were \
         created, {} scaled and {} deleted. Status writes: at most one heartbeat ({} s) per node is \
         expected.\n",
        run.window_s / 60,
        run.services_created,
        run.services_scaled,
        run.services_deleted,
        run.heartbeat_s
    ));
    let rows: Vec<Vec<String>> = run
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.kube_proxy.clone(),
                n.kube_proxy_syncs.to_string(),
                format!("{} / {}", n.kube_proxy_failures, n.kube_proxy_errors),
                format!("{} {}", n.samples, n.sampled_from),
                n.missing.to_string(),
                n.loopguard_writes.to_string(),
                n.status_writes.to_string(),
                n.repairs.to_string(),
                format!("{} / {}", n.logged_writes, n.foreign_edits),
            ]
        })
        .collect();
    section.table(
        &[
            "kube-proxy mode / backend",
            "kube-proxy syncs",
            "its failed syncs / error lines",
            "loopguard's rules sampled",
            "samples without them",
            "loopguard writes",
            "status writes",
            "repairs",
            "writes logged / naming a foreign rule",
        ],
        &rows,
    );
    let syncs: u64 = run.nodes.iter().map(|n| n.kube_proxy_syncs).sum();
    let missing: u64 = run.nodes.iter().map(|n| n.missing).sum();
    let writes: u64 = run.nodes.iter().map(|n| n.loopguard_writes).sum();
    headline.line(format!(
        "- Beside kube-proxy ({} minutes of Service churn on three real nodes, {} kube-proxy syncs): \
         loopguard's rules missing in {} samples, {} writes by loopguard after its first enforce",
        run.window_s / 60,
        syncs,
        missing,
        writes
    ));
    (section.0, headline.0)
}
