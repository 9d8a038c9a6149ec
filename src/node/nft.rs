//! The nftables ruleset generation: a number the kernel bumps on every committed ruleset change
//! (`NFT_MSG_GETGEN` over netlink), so "did anything change in nftables?" costs one round trip.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NFTA_GEN_ID: u16 = 1;
const NLMSG_ERROR: u16 = 2;

/// The current ruleset generation of this network namespace.
pub fn generation() -> io::Result<u32> {
    // SAFETY: socket, bind-less send and recv on a descriptor we create and own, with buffers we
    // own and their lengths.
    let fd = unsafe {
        let raw = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_NETFILTER,
        );
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        OwnedFd::from_raw_fd(raw)
    };
    // nlmsghdr (16 bytes) + nfgenmsg (family AF_UNSPEC, version 0, res_id 0).
    let mut request = [0u8; 20];
    request[0..4].copy_from_slice(&20u32.to_ne_bytes());
    request[4..6].copy_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN).to_ne_bytes());
    request[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    request[8..12].copy_from_slice(&1u32.to_ne_bytes());
    let sent = unsafe {
        libc::send(
            fd.as_raw_fd(),
            request.as_ptr() as *const libc::c_void,
            request.len(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 4096];
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            0,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    parse_generation(&buf[..n as usize])
}

/// The generation in a `NFT_MSG_NEWGEN` reply (its `NFTA_GEN_ID` attribute, big-endian).
fn parse_generation(reply: &[u8]) -> io::Result<u32> {
    if reply.len() < 20 {
        return Err(io::Error::other("short netlink reply"));
    }
    let len =
        (u32::from_ne_bytes(reply[0..4].try_into().expect("4 bytes")) as usize).min(reply.len());
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    if kind == NLMSG_ERROR {
        let errno = i32::from_ne_bytes(reply[16..20].try_into().expect("4 bytes"));
        return Err(io::Error::from_raw_os_error(-errno));
    }
    if kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN {
        return Err(io::Error::other(format!(
            "unexpected netlink message {kind}"
        )));
    }
    let mut at = 20;
    while at + 4 <= len {
        let attr_len = u16::from_ne_bytes([reply[at], reply[at + 1]]) as usize;
        let attr_type = u16::from_ne_bytes([reply[at + 2], reply[at + 3]]) & 0x3fff;
        if attr_len < 4 || at + attr_len > len {
            break;
        }
        if attr_type == NFTA_GEN_ID && attr_len >= 8 {
            return Ok(u32::from_be_bytes(
                reply[at + 4..at + 8].try_into().expect("4 bytes"),
            ));
        }
        at += (attr_len + 3) & !3;
    }
    Err(io::Error::other("no generation in the netlink reply"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generation_is_read_from_its_attribute() {
        let mut reply = vec![0u8; 20];
        reply[4..6].copy_from_slice(&((10u16 << 8) | 15).to_ne_bytes());
        // NFTA_GEN_ID = 0x2a, then an attribute after it that must not confuse the walk.
        reply.extend(8u16.to_ne_bytes());
        reply.extend(1u16.to_ne_bytes());
        reply.extend(42u32.to_be_bytes());
        reply.extend(8u16.to_ne_bytes());
        reply.extend(2u16.to_ne_bytes());
        reply.extend(7u32.to_be_bytes());
        let len = reply.len() as u32;
        reply[0..4].copy_from_slice(&len.to_ne_bytes());
        assert_eq!(parse_generation(&reply).unwrap(), 42);
        let mut error = vec![0u8; 20];
        error[4..6].copy_from_slice(&2u16.to_ne_bytes());
        error[16..20].copy_from_slice(&(-1i32).to_ne_bytes());
        assert_eq!(
            parse_generation(&error).unwrap_err().raw_os_error(),
            Some(1)
        );
    }
}
