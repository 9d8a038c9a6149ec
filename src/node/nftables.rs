//! The nftables rule's effects: `nft list ruleset` (what ComplianceAsCode's check reads), the
//! JSON listing of loopguard's own table, and one `nft -f` transaction to write or delete it.
//! Nothing here ever names another table.

use crate::rules::nft::{self, OwnTable};
use crate::{Error, Result};
use std::io::Write as _;
use std::process::{Command, Stdio};

/// The `nft` binary (from PATH).
const NFT: &str = "nft";

/// Runs `nft ARGS` (with `stdin`), returns stdout; a failure is an error naming the command.
fn run(args: &[&str], stdin: Option<&str>) -> Result<String> {
    let command = format!("{NFT} {}", args.join(" "));
    let mut child = Command::new(NFT)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::Invalid(
                "nft not found in PATH: the nftables rule needs the nft command (Debian: `apt-get install nftables`; the loopguard image has it)".into(),
            ),
            _ => Error::io(format!("starting {command}"), e),
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| Error::io(format!("writing to {command}"), e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::io(format!("waiting for {command}"), e))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let hint = if stderr.contains("Operation not supported")
            || stderr.contains("Protocol not supported")
        {
            " (this kernel has no nf_tables: the nftables rule cannot be enforced here)"
        } else if stderr.contains("Operation not permitted") {
            " (run as root, or give loopguard CAP_NET_ADMIN)"
        } else {
            ""
        };
        return Err(Error::Command {
            command,
            status: out.status.to_string(),
            stderr: format!("{stderr}{hint}"),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `nft list ruleset`, as ComplianceAsCode's check reads it.
pub fn ruleset() -> Result<String> {
    run(&["list", "ruleset"], None)
}

/// What the table named like loopguard's holds now.
pub fn own_table() -> Result<OwnTable> {
    let table = format!("inet {}", nft::TABLE);
    match run(&["-j", "list", "table", "inet", nft::TABLE], None) {
        Ok(listing) => Ok(nft::own_table(Some(&listing))),
        Err(Error::Command { stderr, .. }) if stderr.contains("No such file or directory") => {
            Ok(OwnTable::Absent)
        }
        Err(e) => Err(match e {
            Error::Command {
                command,
                status,
                stderr,
            } => Error::Command {
                command,
                status,
                stderr: format!("{stderr} (listing {table})"),
            },
            other => other,
        }),
    }
}

/// Writes loopguard's table (one atomic transaction, replacing a drifted copy of it).
pub fn create() -> Result<()> {
    run(&["-f", "-"], Some(&nft::create_script())).map(|_| ())
}

/// Deletes loopguard's table, and nothing else.
pub fn delete() -> Result<()> {
    run(&["-f", "-"], Some(&nft::delete_script())).map(|_| ())
}
