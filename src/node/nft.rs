//! nf_tables over netlink, the effects: the ruleset generation (a number the kernel bumps on every
//! committed ruleset change, so "did anything change in nftables?" costs one round trip), reading
//! loopguard's own table and the input-hook chains, and writing or deleting loopguard's table in one
//! transaction. The messages themselves are built and decoded in `rules::nft::wire`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::rules::nft::wire::{self as wire, Batch, ChainInfo, NLMSG_DONE, RuleInfo, TableInfo};
use crate::rules::nft::{self, OwnTable, xt};
use crate::rules::{Chain, Family};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NFTA_GEN_ID: u16 = 1;
const NLMSG_ERROR: u16 = 2;

/// A netlink socket to nf_tables, with a receive timeout so that no answer never hangs a pass.
struct Socket {
    fd: OwnedFd,
    buf: Vec<u8>,
}

/// Sequence numbers, unique within this process.
static SEQ: AtomicU32 = AtomicU32::new(1);

fn next_seq(count: u32) -> u32 {
    SEQ.fetch_add(count, Ordering::Relaxed)
}

impl Socket {
    fn open() -> io::Result<Socket> {
        // SAFETY: socket and setsockopt on a descriptor we create and own, with a fully
        // initialised timeval and its size.
        unsafe {
            let raw = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            );
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(raw);
            let timeout = libc::timeval {
                tv_sec: 5,
                tv_usec: 0,
            };
            if libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &timeout as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(Socket {
                fd,
                buf: vec![0; 64 * 1024],
            })
        }
    }

    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        // SAFETY: send from a buffer we own, with its length.
        let sent = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                bytes.as_ptr() as *const libc::c_void,
                bytes.len(),
                0,
            )
        };
        match sent {
            n if n < 0 => Err(io::Error::last_os_error()),
            n if n as usize != bytes.len() => Err(io::Error::other("short netlink send")),
            _ => Ok(()),
        }
    }

    /// One datagram (of one or more messages).
    fn recv(&mut self) -> io::Result<&[u8]> {
        // SAFETY: recv into a buffer we own, with its length.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                self.buf.as_mut_ptr() as *mut libc::c_void,
                self.buf.len(),
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return Err(if e.kind() == io::ErrorKind::WouldBlock {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no answer from nf_tables within 5 s",
                )
            } else {
                e
            });
        }
        Ok(&self.buf[..n as usize])
    }

    /// Sends a dump request and hands every nf_tables message of the answer to `each`.
    fn dump(
        &mut self,
        request: &[u8],
        seq: u32,
        mut each: impl FnMut(u8, u16, &[u8]),
    ) -> io::Result<()> {
        self.send(request)?;
        loop {
            let datagram = self.recv()?;
            for m in wire::messages(datagram) {
                if m.seq != seq {
                    continue;
                }
                if let Some(errno) = m.error() {
                    return Err(io::Error::from_raw_os_error(errno));
                }
                if m.kind == NLMSG_DONE {
                    return Ok(());
                }
                if let Some(kind) = m.nft() {
                    each(m.family, kind, m.body);
                }
            }
        }
    }

    /// Sends one transaction and waits for every acknowledgement; the first error fails it (the
    /// kernel then applied none of it).
    fn transact(&mut self, batch: &Batch, first_seq: u32) -> io::Result<()> {
        self.transact_echoed(batch, first_seq, |_, _, _| {})
    }

    /// [`Socket::transact`], handing each nf_tables message the kernel echoes back (messages
    /// sent with `NLM_F_ECHO`: the object as committed, its handle included) to `echoed`, with
    /// the sequence number of the message it answers. The kernel echoes after the commit and
    /// before the acknowledgements.
    fn transact_echoed(
        &mut self,
        batch: &Batch,
        first_seq: u32,
        mut echoed: impl FnMut(u32, u16, &[u8]),
    ) -> io::Result<()> {
        self.send(&batch.bytes)?;
        let mut acked = 0;
        let mut failed = None;
        while acked < batch.acks {
            let datagram = self.recv()?;
            for m in wire::messages(datagram) {
                if let Some(kind) = m.nft()
                    && m.seq > first_seq
                    && m.seq <= first_seq + batch.acks as u32
                {
                    echoed(m.seq, kind, m.body);
                    continue;
                }
                let Some(errno) = m.error() else { continue };
                // The batch as a whole refused (ERESTART: the ruleset is no longer at the
                // generation the batch names) is answered on the batch-begin message.
                if m.seq == first_seq && errno != 0 {
                    failed = Some(errno);
                    break;
                }
                if m.seq <= first_seq || m.seq > first_seq + batch.acks as u32 {
                    continue;
                }
                acked += 1;
                if errno != 0 && failed.is_none() {
                    failed = Some(errno);
                }
            }
            if failed.is_some() {
                // An aborted batch answers the failing messages only.
                break;
            }
        }
        match failed {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Ok(()),
        }
    }
}

thread_local! {
    /// One socket per thread, kept open: closing a netlink socket that talked to nf_tables makes
    /// the kernel wait for its pending ruleset clean-up (an RCU grace period, 5-20 ms), which a
    /// socket per request would pay on every repair. A thread stays in one network namespace.
    static SOCKET: std::cell::RefCell<Option<Socket>> = const { std::cell::RefCell::new(None) };
    /// This thread's second socket, for the listing read beside another ([`iptables_chains`]).
    static SIDE: std::cell::RefCell<Option<Socket>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` on this thread's socket (opened on first use); a socket that failed is replaced next
/// time.
fn with_socket<T>(f: impl FnOnce(&mut Socket) -> io::Result<T>) -> io::Result<T> {
    SOCKET.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(Socket::open()?);
        }
        let result = f(slot.as_mut().expect("opened"));
        if result.is_err() {
            *slot = None;
        }
        result
    })
}

/// The interface index of `lo` in this network namespace (1 wherever the kernel made it).
fn lo_index() -> u32 {
    // SAFETY: a NUL-terminated constant string.
    match unsafe { libc::if_nametoindex(c"lo".as_ptr()) } {
        0 => 1,
        index => index,
    }
}

/// What the table named like loopguard's is now (the table, its chain and the chain's rules), and
/// the ruleset generation it was read in, which [`create`] and [`delete`] are bound to (a change
/// during the read reads it again).
pub fn own_table_at() -> io::Result<(OwnTable, u32)> {
    for _ in 0..5 {
        let before = generation()?;
        let seen = with_socket(read_own)?;
        if generation()? == before {
            return Ok((seen, before));
        }
    }
    Err(io::Error::other(
        "the nftables ruleset kept changing while loopguard read its table",
    ))
}

fn read_own(socket: &mut Socket) -> io::Result<OwnTable> {
    let seq = next_seq(1);
    socket.send(&wire::get_table(seq))?;
    let mut table: Option<TableInfo> = None;
    while table.is_none() {
        let datagram = socket.recv()?;
        for m in wire::messages(datagram) {
            if m.seq != seq {
                continue;
            }
            match m.error() {
                Some(libc::ENOENT) => return Ok(OwnTable::Absent),
                Some(errno) => return Err(io::Error::from_raw_os_error(errno)),
                None => {}
            }
            if m.nft() == Some(wire::NFT_MSG_NEWTABLE) {
                table = Some(wire::parse_table(m.body));
            }
        }
    }
    let mut chain: Option<ChainInfo> = None;
    let seq = next_seq(1);
    socket.dump(
        &wire::dump_chains(seq, wire::NFPROTO_INET),
        seq,
        |family, kind, body| {
            if kind == wire::NFT_MSG_NEWCHAIN {
                let c = wire::parse_chain(family, body);
                if c.table == nft::TABLE && c.name == nft::CHAIN {
                    chain = Some(c);
                }
            }
        },
    )?;
    let mut rules: Vec<RuleInfo> = Vec::new();
    if chain.is_some() {
        let seq = next_seq(1);
        socket.dump(&wire::dump_own_rules(seq), seq, |_, kind, body| {
            if kind == wire::NFT_MSG_NEWRULE {
                let rule = wire::parse_rule(body);
                if rule.table == nft::TABLE && rule.chain == nft::CHAIN {
                    rules.push(rule);
                }
            }
        })?;
    }
    Ok(nft::classify(
        table.as_ref(),
        chain.as_ref(),
        &rules,
        lo_index(),
    ))
}

/// Every base chain on an input hook, in every family (what `nft list ruleset` prints with
/// `hook input`).
pub fn input_hook_chains() -> io::Result<Vec<ChainInfo>> {
    let mut chains = all_chains()?;
    chains.retain(ChainInfo::hooks_input);
    Ok(chains)
}

/// Every chain of every table and family, in one dump (rules not included).
pub fn all_chains() -> io::Result<Vec<ChainInfo>> {
    let mut chains = Vec::new();
    let seq = next_seq(1);
    with_socket(|socket| {
        socket.dump(
            &wire::dump_chains(seq, wire::NFPROTO_UNSPEC),
            seq,
            |family, kind, body| {
                if kind == wire::NFT_MSG_NEWCHAIN {
                    chains.push(wire::parse_chain(family, body));
                }
            },
        )
    })?;
    Ok(chains)
}

/// Puts loopguard's table as written in one transaction, if the ruleset is still at `generation`
/// (read by [`own_table_at`] with the table absent or loopguard's own, drifted). Any change since
/// fails it with [`is_stale`] and writes nothing: read the table again.
pub fn create(generation: u32) -> io::Result<()> {
    // Batch begin, six messages, batch end.
    let seq = next_seq(8);
    with_socket(|socket| socket.transact(&wire::create_batch(seq, generation, lo_index()), seq))
}

/// Whether a [`create`] or [`delete`] failed because the ruleset changed after loopguard read its
/// table.
pub fn is_stale(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ERESTART)
}

/// Deletes loopguard's table, and nothing else, in one transaction, if the ruleset is still at
/// `generation` (else [`is_stale`]).
pub fn delete(generation: u32) -> io::Result<()> {
    let seq = next_seq(3);
    with_socket(|socket| socket.transact(&wire::delete_batch(seq, generation), seq))
}

/// The current ruleset generation of this network namespace.
pub fn generation() -> io::Result<u32> {
    // nlmsghdr (16 bytes) + nfgenmsg (family AF_UNSPEC, version 0, res_id 0).
    let seq = next_seq(1);
    let mut request = [0u8; 20];
    request[0..4].copy_from_slice(&20u32.to_ne_bytes());
    request[4..6].copy_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN).to_ne_bytes());
    request[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    request[8..12].copy_from_slice(&seq.to_ne_bytes());
    with_socket(|socket| {
        socket.send(&request)?;
        loop {
            let reply = socket.recv()?;
            // An answer to an earlier request that timed out is not this one's.
            if reply.len() >= 12 && u32::from_ne_bytes(reply[8..12].try_into().expect("4")) == seq {
                return parse_generation(reply);
            }
        }
    })
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

/// The rules of a built-in chain of iptables-nft's table (`ip6 filter`, `ip filter`) in order,
/// with their handles and identities; `None` when the table or the chain does not exist.
pub fn iptables_chain(family: Family, chain: Chain) -> io::Result<Option<Vec<xt::Listed>>> {
    absent_is_none(with_socket(|socket| list_chain(socket, family, chain)))
}

/// [`iptables_chain`] for INPUT and OUTPUT, listed side by side: the kernel writes a dump in the
/// thread that reads it, so OUTPUT is read in a thread of its own, on a second socket of this
/// thread (opened in this thread's network namespace and kept, like the first).
pub fn iptables_chains(family: Family) -> [io::Result<Option<Vec<xt::Listed>>>; 2] {
    // OUTPUT on the side socket (opened on first use); a socket that failed is replaced next time.
    let list_output = move |side: Option<Socket>| {
        let mut socket = match side.map_or_else(Socket::open, Ok) {
            Ok(socket) => socket,
            Err(e) => return (Err(e), None),
        };
        let listed = list_chain(&mut socket, family, Chain::Output);
        let keep = listed.is_ok().then_some(socket);
        (listed, keep)
    };
    let side = SIDE.with(|cell| cell.borrow_mut().take());
    let (input, (output, side)) = std::thread::scope(|scope| {
        let beside = std::thread::Builder::new()
            .name("nft-list".into())
            .spawn_scoped(scope, move || list_output(side));
        let input = with_socket(|socket| list_chain(socket, family, Chain::Input));
        let output = match beside {
            Ok(thread) => thread.join().expect("the OUTPUT listing does not panic"),
            // No thread to be had (a pids limit): one after the other, on a new socket.
            Err(_) => list_output(None),
        };
        (input, output)
    });
    if let Some(socket) = side {
        SIDE.with(|cell| *cell.borrow_mut() = Some(socket));
    }
    [absent_is_none(input), absent_is_none(output)]
}

fn list_chain(socket: &mut Socket, family: Family, chain: Chain) -> io::Result<Vec<xt::Listed>> {
    let seq = next_seq(1);
    let mut rules = Vec::new();
    let mut malformed = false;
    socket.dump(&xt::dump_rules(seq, family, chain), seq, |_, kind, body| {
        if kind == wire::NFT_MSG_NEWRULE {
            match xt::parse_listed(body, family) {
                Some(rule) => rules.push(rule),
                None => malformed = true,
            }
        }
    })?;
    if malformed {
        return Err(io::Error::other("a rule without a handle"));
    }
    Ok(rules)
}

/// A listing, `None` where the kernel answered that the table or chain does not exist.
fn absent_is_none<T>(read: io::Result<T>) -> io::Result<Option<T>> {
    match read {
        Ok(found) => Ok(Some(found)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Adds rules to iptables-nft's chains in one transaction, if the ruleset is still at
/// `generation` (else [`is_stale`], and nothing is written). Returns each added rule as the kernel
/// echoed it back after the commit (its handle and `-S` line), in the order of `adds`; `None`
/// where no echo came.
pub fn add_iptables_rules(
    generation: u32,
    adds: &[(Family, Chain, xt::Add)],
) -> io::Result<Vec<Option<xt::Listed>>> {
    // Batch begin, one message per rule, batch end.
    let seq = next_seq(adds.len() as u32 + 2);
    let mut added: Vec<Option<xt::Listed>> = vec![None; adds.len()];
    with_socket(|socket| {
        socket.transact_echoed(
            &xt::add_batch(seq, generation, adds),
            seq,
            |at, kind, body| {
                let index = (at - seq - 1) as usize;
                if kind == wire::NFT_MSG_NEWRULE
                    && let Some((family, _, _)) = adds.get(index)
                {
                    added[index] = xt::parse_listed(body, *family);
                }
            },
        )
    })?;
    Ok(added)
}

/// A subscription to the ruleset's change notifications (group `NFNLGRP_NFTABLES`) of the network
/// namespace the calling thread is in, on a non-blocking socket.
pub fn subscribe() -> io::Result<OwnedFd> {
    // SAFETY: plain socket syscalls on a descriptor we create and own; the structs passed are
    // fully initialised and their sizes given.
    unsafe {
        let raw = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            libc::NETLINK_NETFILTER,
        );
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(raw);
        let mut addr: libc::sockaddr_nl = std::mem::zeroed();
        addr.nl_family = libc::AF_NETLINK as u16;
        let len = std::mem::size_of::<libc::sockaddr_nl>() as u32;
        if libc::bind(raw, &addr as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(io::Error::last_os_error());
        }
        let group: libc::c_int = libc::NFNLGRP_NFTABLES;
        let size = std::mem::size_of::<libc::c_int>() as u32;
        if libc::setsockopt(
            raw,
            libc::SOL_NETLINK,
            libc::NETLINK_ADD_MEMBERSHIP,
            &group as *const _ as *const _,
            size,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }
}

/// Hands every datagram queued on a [`subscribe`]d socket to `each`, without waiting. An overflow
/// of its receive buffer (notifications lost) is `ENOBUFS`, and so is a datagram longer than
/// `buf`.
pub fn drain(fd: &OwnedFd, buf: &mut [u8], mut each: impl FnMut(&[u8])) -> io::Result<usize> {
    let mut datagrams = 0;
    loop {
        // SAFETY: recv into a buffer we own, with its length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        };
        if n > 0 && n as usize > buf.len() {
            // Cut to the buffer (MSG_TRUNC returns the datagram's real length): what it held
            // is not all known.
            return Err(io::Error::from_raw_os_error(libc::ENOBUFS));
        }
        if n > 0 {
            datagrams += 1;
            each(&buf[..n as usize]);
            continue;
        }
        if n == 0 {
            return Ok(datagrams);
        }
        let err = io::Error::last_os_error();
        return match err.kind() {
            io::ErrorKind::WouldBlock => Ok(datagrams),
            _ => Err(err),
        };
    }
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
