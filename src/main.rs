use clap::Parser;
use loopguard::cli::{Cli, Command};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
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
        Command::Uninstall(args) => loopguard::runtime::run_async(loopguard::uninstall::run(args)),
    };
    result.unwrap_or_else(|e| {
        eprintln!("loopguard: error: {e}");
        ExitCode::from(2)
    })
}
