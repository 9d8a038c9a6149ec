use clap::Parser;
use loopguard::cli::{Cli, Command};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Node(_) | Command::Agent(_)) {
        loopguard::node::legacy::big_buffers_from_the_system();
    }
    loopguard::telemetry::init(cli.log_format, "info");
    let result = match cli.command {
        Command::Node(node) => node
            .target()
            .netns
            .clone()
            .map_or(Ok(()), |name| loopguard::node::netns::enter(&name))
            .and_then(|()| loopguard::cli::run_node(node)),
        Command::Demo => loopguard::demo::run(),
        Command::Crd(args) => loopguard::cli::run_crd(&args),
        Command::Controller(args) => {
            loopguard::runtime::run_async(loopguard::controller::run(args))
        }
        Command::Agent(args) => loopguard::agent::main(args),
        Command::Completion { shell } => loopguard::cli::run_completion(shell),
        Command::Report(args) => tokio::runtime::Runtime::new()
            .map_err(|e| loopguard::Error::io("starting the async runtime", e))
            .and_then(|rt| rt.block_on(loopguard::report::run(args))),
        Command::Uninstall(args) => loopguard::runtime::run_async(loopguard::uninstall::run(args)),
    };
    result.unwrap_or_else(|e| {
        eprintln!("loopguard: error: {e}");
        ExitCode::from(2)
    })
}
