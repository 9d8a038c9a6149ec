//! The nftables rule's effects: the input-hook chains as `nft` lists them (what ComplianceAsCode's
//! check reads), and loopguard's own table read, written and deleted over netlink (`node::nft`),
//! one transaction each. Nothing here ever writes to another table.

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

/// What ComplianceAsCode's check reads of `nft list ruleset`: the chains on an input hook. Each is
/// listed alone (`nft list chain`), found over netlink: the listing of the whole ruleset takes
/// seconds where iptables-nft holds tens of thousands of rules, and the check's `awk
/// '/hook input/,/}/'` ranges never reach past a chain's closing brace, so the concatenated listings
/// hold the same ranges. (A rule comment in another chain reading "hook input" would open a range
/// for the check's awk; loopguard does not count that as a pass.) Names `nft` cannot take as a
/// word fall back to the whole listing.
pub fn ruleset() -> Result<String> {
    let chains = super::nft::input_hook_chains()
        .map_err(|e| netlink_error("listing the nftables chains", e))?;
    let plain = |name: &str| {
        name.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-/".contains(c))
    };
    if !chains.iter().all(|c| plain(&c.table) && plain(&c.name)) {
        return run(&["list", "ruleset"], None);
    }
    let mut listing = String::new();
    for chain in &chains {
        listing.push_str(&run(
            &[
                "list",
                "chain",
                chain.family_name(),
                &chain.table,
                &chain.name,
            ],
            None,
        )?);
    }
    Ok(listing)
}

/// A netlink error as loopguard reports it, with what to do.
fn netlink_error(what: &str, e: std::io::Error) -> Error {
    let hint = match e.raw_os_error() {
        Some(libc::EPERM) => " (run as root, or give loopguard CAP_NET_ADMIN)",
        Some(libc::EOPNOTSUPP | libc::EPROTONOSUPPORT | libc::EAFNOSUPPORT) => {
            " (this kernel has no nf_tables: the nftables rule cannot be enforced here)"
        }
        _ => "",
    };
    Error::Invalid(format!("{what} over netlink: {e}{hint}"))
}

/// What the table named like loopguard's holds now.
pub fn own_table() -> Result<OwnTable> {
    own_table_at().map(|(table, _)| table)
}

/// [`own_table`], with the ruleset generation it was read in: what [`create`] and [`delete`]
/// are bound to.
pub fn own_table_at() -> Result<(OwnTable, u32)> {
    super::nft::own_table_at()
        .map_err(|e| netlink_error(&format!("reading table inet {}", nft::TABLE), e))
}

/// What a write bound to a generation gives.
#[derive(Debug, PartialEq, Eq)]
pub enum Written {
    Done,
    /// The ruleset changed after loopguard read its table; nothing was written: read it again.
    Stale,
}

/// Puts loopguard's table as written (one atomic transaction, which leaves the chain's hook in
/// place), if nothing changed in the ruleset since `generation`.
pub fn create(generation: u32) -> Result<Written> {
    tracing::info!(table = %format!("inet {}", nft::TABLE), "writing");
    bound(
        super::watch::own_write(1, || super::nft::create(generation)),
        "writing",
    )
}

/// Deletes loopguard's table, and nothing else, if nothing changed in the ruleset since
/// `generation`.
pub fn delete(generation: u32) -> Result<Written> {
    tracing::info!(table = %format!("inet {}", nft::TABLE), "deleting");
    bound(
        super::watch::own_write(1, || super::nft::delete(generation)),
        "deleting",
    )
}

fn bound(written: std::io::Result<()>, what: &str) -> Result<Written> {
    match written {
        Ok(()) => Ok(Written::Done),
        Err(e) if super::nft::is_stale(&e) => Ok(Written::Stale),
        Err(e) => Err(netlink_error(
            &format!("{what} table inet {}", nft::TABLE),
            e,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netlink_errors_say_what_to_do() {
        let no_tables = netlink_error("x", std::io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        assert!(
            no_tables
                .to_string()
                .contains("this kernel has no nf_tables")
        );
        let not_root = netlink_error("x", std::io::Error::from_raw_os_error(libc::EPERM));
        assert!(not_root.to_string().contains("CAP_NET_ADMIN"));
    }
}
