//! The command line: flags for every subcommand, and the `node` commands' output and exit codes.

use crate::node::converge::Convergence;
use crate::node::facts::{ApplicabilityMode, BackendChoice, NodeFacts};
use crate::node::watch::{DriftWatch, Trigger, run_pass};
use crate::node::{Engine, EngineConfig, Report};
use crate::rules::Placement;
use crate::rules::catalog::FamilyMode;
use crate::telemetry::LogFormat;
use crate::{Error, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "loopguard",
    version,
    about = "Enforce the CIS/PCI-DSS IPv6 loopback firewall baseline on every node"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Plain, env = "LOOPGUARD_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check, enforce, clean up or watch the rules of this node (or of a network namespace).
    #[command(subcommand)]
    Node(NodeCommand),
    /// A guided tour in a throwaway network namespace (needs root, no cluster).
    Demo,
    /// Print the CustomResourceDefinitions as YAML, or write them into a folder.
    Crd(CrdArgs),
    /// Run the controller: roll node states up into policy status (leader-elected).
    Controller(crate::controller::ControllerArgs),
    /// Run the node agent: enforce this node's policy, repair drift, report (DaemonSet).
    Agent(crate::agent::AgentArgs),
    /// The chart's uninstall hooks: pre deletes every policy and waits until the agents removed
    /// their rules; post deletes the node states.
    Uninstall(crate::uninstall::UninstallArgs),
    /// The evidence an auditor asks for, per policy and node, from the cluster of your kubeconfig:
    /// a table, JSON, CSV or one HTML page. Exit 0 all good, 1 a node fails, 2 error.
    Report(crate::report::ReportArgs),
    /// Print a shell completion script: `source <(loopguard completion bash)`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// `loopguard completion SHELL`.
pub fn run_completion(shell: clap_complete::Shell) -> Result<ExitCode> {
    use clap::CommandFactory;
    use std::io::Write as _;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "loopguard", &mut script);
    // A closed pipe (`| head`) is the reader's choice, not an error worth a panic.
    let _ = std::io::stdout().write_all(&script);
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct CrdArgs {
    /// Write one file per CRD into this folder (for example `crds/`) instead of printing.
    #[arg(long, value_name = "DIR")]
    pub write: Option<PathBuf>,
}

/// `loopguard crd`.
pub fn run_crd(args: &CrdArgs) -> Result<ExitCode> {
    let docs = crate::api::crd_documents();
    match &args.write {
        None => {
            let all: Vec<&str> = docs.iter().map(|(_, yaml)| yaml.as_str()).collect();
            print!("{}", all.join("---\n"));
        }
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            for (file, yaml) in docs {
                let path = dir.join(file);
                std::fs::write(&path, yaml)
                    .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Report whether the node is compliant. Exit 0 compliant, 1 not compliant, 3 not applicable, 2 error.
    Check(CheckArgs),
    /// Make the node compliant with the smallest change. Exit 0 compliant after, 1 still not
    /// compliant, 3 not applicable, 2 error (with --dry-run: 0 plan printed).
    Enforce(EnforceArgs),
    /// Remove exactly the rules loopguard inserted (adopted rules stay). Exit 0 done, 2 error.
    Cleanup(CleanupArgs),
    /// Enforce, then repair drift until SIGINT/SIGTERM (rules stay in place on exit).
    Watch(WatchArgs),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IpFamily {
    Ipv6,
    Ipv4,
}

/// Flags shared by every node command.
#[derive(Debug, Args)]
pub struct Target {
    /// Enter /run/netns/NAME first (the network namespace whose ip6tables to use).
    #[arg(long, value_name = "NAME")]
    pub netns: Option<String>,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// iptables backend: detect it like kubernetes-sigs/iptables-wrappers, or force one.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// Seconds to wait for the xtables lock before giving up.
    #[arg(long, value_name = "SECONDS", default_value_t = 5, value_parser = crate::args::wait_seconds)]
    pub wait: u64,
    /// Where rules loopguard inserted are recorded.
    #[arg(long, value_name = "PATH", default_value = crate::node::state_file::DEFAULT_PATH, env = "LOOPGUARD_STATE_FILE")]
    pub state_file: PathBuf,
}

/// Flags that say what the node must enforce.
#[derive(Debug, Args)]
pub struct Desired {
    /// IP families to check and enforce; IPv6 is required, ipv4 adds the CIS IPv4 sibling rule.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "ipv6")]
    pub ip_families: Vec<IpFamily>,
    /// auto: only where the CIS rule applies (iptables installed, nftables and ufw not); always: whenever IPv6 is on.
    #[arg(long, value_enum, default_value_t = ApplicabilityMode::Auto)]
    pub applicability: ApplicabilityMode,
    /// Where the host's filesystem is (its dpkg status and rpm database tell which firewall tools are installed).
    #[arg(long, value_name = "PATH", default_value = "/")]
    pub host_root: PathBuf,
    /// The nftables loopback rule (set_nftables_loopback_traffic): enforce writes loopguard's own `table inet loopguard` where the rule applies and fails.
    #[arg(long, value_enum, default_value_t = FamilyMode::Report)]
    pub nftables: FamilyMode,
    /// The ufw loopback rule (set_ufw_loopback_traffic): enforce adds the missing rules of its remediation with the host's ufw where ufw is active (loopguard never enables ufw).
    #[arg(long, value_enum, default_value_t = FamilyMode::Report)]
    pub ufw: FamilyMode,
    /// The firewalld loopback rules: reported where firewalld is enabled (loopguard never touches inet firewalld).
    #[arg(long, value_enum, default_value_t = FamilyMode::Report)]
    pub firewalld: FamilyMode,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub desired: Desired,
}

#[derive(Debug, Args)]
pub struct EnforceArgs {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub desired: Desired,
    /// insert: missing rules go to the top of the chain; append: to the end, as the seed script does.
    #[arg(long, value_enum, default_value_t = PlacementArg::Insert)]
    pub placement: PlacementArg,
    /// Print the plan (the ip6tables-restore lines) without writing anything.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct CleanupArgs {
    #[command(flatten)]
    pub target: Target,
    /// Where the host's filesystem is: the ufw rules loopguard added are deleted with the host's own ufw there.
    #[arg(long, value_name = "PATH", default_value = "/")]
    pub host_root: PathBuf,
    /// Print what would be removed without writing anything.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub enforce: EnforceArgs,
    /// Only report; never write.
    #[arg(long)]
    pub audit: bool,
    /// Seconds between full re-checks (and polls, with the legacy backend, which has no events).
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = crate::args::seconds)]
    pub resync: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PlacementArg {
    Insert,
    Append,
}

impl From<PlacementArg> for Placement {
    fn from(p: PlacementArg) -> Placement {
        match p {
            PlacementArg::Insert => Placement::Insert,
            PlacementArg::Append => Placement::Append,
        }
    }
}

impl NodeCommand {
    pub fn target(&self) -> &Target {
        match self {
            NodeCommand::Check(a) => &a.target,
            NodeCommand::Enforce(a) => &a.target,
            NodeCommand::Cleanup(a) => &a.target,
            NodeCommand::Watch(a) => &a.enforce.target,
        }
    }

    fn config(&self) -> Result<EngineConfig> {
        let target = self.target();
        let mut config = EngineConfig {
            state_file: target.state_file.clone(),
            backend: target.backend,
            wait: Duration::from_secs(target.wait),
            ..EngineConfig::default()
        };
        let (desired, placement) = match self {
            NodeCommand::Check(a) => (Some(&a.desired), None),
            NodeCommand::Enforce(a) => (Some(&a.desired), Some(a.placement)),
            NodeCommand::Watch(a) => (Some(&a.enforce.desired), Some(a.enforce.placement)),
            NodeCommand::Cleanup(a) => {
                config.host_root = a.host_root.clone();
                (None, None)
            }
        };
        if let Some(desired) = desired {
            if !desired.ip_families.contains(&IpFamily::Ipv6) {
                return Err(Error::Invalid(
                    "--ip-families must include ipv6: the baseline is the IPv6 loopback rule (use ipv6,ipv4 to add the IPv4 sibling)".into(),
                ));
            }
            config.families = crate::rules::families(desired.ip_families.contains(&IpFamily::Ipv4));
            config.applicability = desired.applicability;
            config.host_root = desired.host_root.clone();
            config.nftables = desired.nftables;
            config.ufw = desired.ufw;
            if desired.firewalld == FamilyMode::Enforce {
                return Err(Error::Invalid(
                    "--firewalld enforce: loopguard never touches firewalld's zones; use report or ignore".into(),
                ));
            }
            config.firewalld = desired.firewalld;
        }
        if let Some(p) = placement {
            config.placement = p.into();
        }
        Ok(config)
    }
}

/// Runs a node command (after `--netns` was entered) and returns its exit code.
pub fn run_node(command: NodeCommand) -> Result<ExitCode> {
    let mut engine = Engine::new(command.config()?)?;
    engine.in_process();
    let output = command.target().output;
    match &command {
        NodeCommand::Check(_) => {
            let report = engine.check()?;
            print_report(output, engine.facts(), &report);
            Ok(ExitCode::from(if !report.applicable {
                3
            } else if report.compliant {
                0
            } else {
                1
            }))
        }
        NodeCommand::Enforce(args) => {
            let report = if args.dry_run {
                engine.plan_enforce()?
            } else {
                engine.enforce()?
            };
            print_report(output, engine.facts(), &report);
            Ok(ExitCode::from(if !report.applicable {
                3
            } else if report.compliant || report.dry_run {
                0
            } else {
                1
            }))
        }
        NodeCommand::Cleanup(args) => {
            let report = if args.dry_run {
                engine.plan_cleanup()?
            } else {
                engine.cleanup()?
            };
            if output == Output::Text {
                let removed = report.changes.as_ref().map_or(0, Vec::len);
                print!("{}", render_text(engine.facts(), &report));
                if report.dry_run {
                    println!(
                        "result:     would remove {removed} rule(s) loopguard had inserted; nothing written"
                    );
                } else {
                    println!(
                        "result:     removed {removed} rule(s) loopguard had inserted; rules it found in place stay"
                    );
                }
            } else {
                print_report(output, engine.facts(), &report);
            }
            Ok(ExitCode::SUCCESS)
        }
        NodeCommand::Watch(args) => {
            crate::runtime::run_async(watch(engine, output, args.audit, args.resync))
        }
    }
}

async fn watch(mut engine: Engine, output: Output, audit: bool, resync: Duration) -> Result<()> {
    let mut shutdown = crate::runtime::shutdown_signal()?;
    // Subscribe before the first pass so that no change after it goes unseen.
    let mut drift = DriftWatch::new(&mut engine, resync);
    let mut convergence = Convergence::default();
    let first = run_pass(
        &mut engine,
        &mut convergence,
        audit,
        Trigger::Start {
            at: std::time::Instant::now(),
        },
    )
    .await?;
    print_report(output, engine.facts(), &first.report);
    tracing::info!(
        backend = %engine.facts().backend,
        event_driven = drift.event_driven(),
        resync_s = resync.as_secs_f64(),
        audit,
        "watching for drift"
    );
    let mut last = first.report;
    loop {
        let retry_at = convergence.retry_at(std::time::Instant::now());
        let trigger = tokio::select! {
            _ = &mut shutdown => break,
            trigger = drift.next(retry_at) => trigger,
        };
        match run_pass(&mut engine, &mut convergence, audit, trigger).await {
            Ok(pass) => {
                if pass.look_again {
                    drift.look_again();
                }
                if pass.report.wrote() || !pass.report.same_state(&last) {
                    print_report(output, engine.facts(), &pass.report);
                }
                last = pass.report;
            }
            Err(e) => tracing::error!(reason = e.reason(), "{e}"),
        }
        if engine.facts().backend != drift.backend() {
            tracing::warn!(
                from = %drift.backend(),
                to = %engine.facts().backend,
                reason = %engine.facts().backend_reason,
                "the node's iptables backend changed; watching the new one"
            );
            drift = DriftWatch::new(&mut engine, resync);
        }
    }
    tracing::info!("stopping; the rules stay in place");
    Ok(())
}

fn print_report(output: Output, facts: &NodeFacts, report: &Report) {
    match output {
        Output::Json => println!("{}", json_report(report)),
        Output::Text => print!("{}{}", render_text(facts, report), verdict_line(report)),
    }
}

/// The report as `--output json` prints it: when, where, by which loopguard, for which rule.
pub fn json_report(report: &Report) -> serde_json::Value {
    let mut value = serde_json::to_value(report).expect("report serializes");
    let context = serde_json::json!({
        "timestamp": jiff::Timestamp::now().to_string(),
        "hostname": hostname(),
        "version": env!("CARGO_PKG_VERSION"),
        "ruleId": crate::rules::catalog::SEED_XCCDF_ID,
    });
    if let (Some(all), serde_json::Value::Object(extra)) = (value.as_object_mut(), context) {
        all.extend(extra);
    }
    value
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// The human-readable report: facts, findings and changes (the verdict line is separate).
pub fn render_text(facts: &NodeFacts, report: &Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let managers: Vec<String> = facts
        .firewall_managers
        .iter()
        .map(|m| m.to_string())
        .collect();
    let _ = writeln!(
        s,
        "backend:    {} ({})",
        facts.backend, facts.backend_reason
    );
    let _ = writeln!(
        s,
        "ipv6:       {}",
        if facts.ipv6_enabled {
            "enabled"
        } else {
            "disabled"
        }
    );
    let _ = writeln!(
        s,
        "firewalls:  {} (from {})",
        if managers.is_empty() {
            "none".to_string()
        } else {
            managers.join(", ")
        },
        facts.managers_source
    );
    for f in &report.findings {
        let who = if f.owned {
            "inserted by loopguard"
        } else if f.finding.state == crate::rules::RuleState::Missing {
            ""
        } else {
            "adopted"
        };
        let _ = writeln!(
            s,
            "  {:<5} {:<34} {:<10} {}",
            f.finding.family.to_string(),
            f.finding.rule,
            f.finding.state.as_str(),
            who
        );
    }
    let shown: Vec<_> = report
        .rules
        .iter()
        .filter(|r| r.verdict != crate::rules::catalog::Verdict::Ignored)
        .collect();
    if !shown.is_empty() {
        let _ = writeln!(s, "rules:");
        for r in shown {
            let detail = match r.verdict {
                crate::rules::catalog::Verdict::NotApplicable => &r.why,
                _ => &r.message,
            };
            let _ = writeln!(
                s,
                "  {:<38} {:<14} {} ({})",
                r.id,
                format!("{:?}", r.verdict),
                detail,
                r.mode
            );
        }
    }
    for change in &report.family_changes {
        let _ = writeln!(
            s,
            "{:<11} {change}{}",
            if change.starts_with("ufw") {
                "ufw:"
            } else {
                "nftables:"
            },
            if report.dry_run {
                " (dry run, nothing written)"
            } else {
                ""
            }
        );
    }
    if let Some(changes) = &report.changes {
        if changes.is_empty() {
            let _ = writeln!(s, "changes:    none (nothing written)");
        } else if report.dry_run {
            let _ = writeln!(s, "changes (dry run, nothing written):");
            for edit in changes {
                let _ = writeln!(s, "  {edit}");
            }
        } else {
            let _ = writeln!(s, "changes:");
            for edit in changes {
                let _ = writeln!(s, "  {edit}");
            }
        }
    }
    s
}

/// The last line of a check or enforce report.
fn verdict_line(report: &Report) -> String {
    let verdict = if !report.applicable {
        "NOT APPLICABLE"
    } else if report.compliant {
        "COMPLIANT"
    } else {
        "NOT COMPLIANT"
    };
    format!(
        "result:     {verdict}: {} ({})\n",
        report.reason, report.message
    )
}
