//! Command-line values that more than one command reads (`loopguard node ...` and
//! `loopguard agent`): parsed once, with the same words when they are wrong.

use std::time::Duration;

/// Parses `--resync`: seconds (fractions allowed) between 0.1 and one day. Shorter would make
/// the re-check a busy loop, longer is no re-check at all.
pub fn seconds(text: &str) -> std::result::Result<Duration, String> {
    const MIN: f64 = 0.1;
    const MAX: f64 = 86_400.0;
    match text.trim().parse::<f64>() {
        Ok(s) if (MIN..=MAX).contains(&s) => Ok(Duration::from_secs_f64(s)),
        Ok(_) => Err(format!(
            "must be between {MIN} and {MAX} seconds (10 is the default)"
        )),
        Err(_) => Err("must be a number of seconds, for example 10 or 0.5".into()),
    }
}

/// Parses `--metrics-addr`: `ADDRESS:PORT`, an IPv6 address in brackets or bare (what a Pod's
/// `$(HOST_IP):9742` becomes on an IPv6 node: the port is always the part after the last colon).
pub fn socket_addr(text: &str) -> std::result::Result<std::net::SocketAddr, String> {
    let text = text.trim();
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let bad = || {
        format!(
            "{text:?} is not ADDRESS:PORT: give an IP address and a port, for example 0.0.0.0:9742, [::]:9742 or 10.0.0.5:9742"
        )
    };
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip: std::net::IpAddr = host.parse().map_err(|_| bad())?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    Ok(std::net::SocketAddr::new(ip, port))
}

/// Parses `--wait`: whole seconds, at most an hour.
pub fn wait_seconds(text: &str) -> std::result::Result<u64, String> {
    match text.trim().parse::<u64>() {
        Ok(s) if s <= 3600 => Ok(s),
        _ => Err("must be a whole number of seconds between 0 and 3600".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_addresses_with_bare_or_bracketed_ipv6() {
        for (text, want) in [
            ("0.0.0.0:9742", "0.0.0.0:9742"),
            ("[::]:9742", "[::]:9742"),
            ("fd00::5:9742", "[fd00::5]:9742"),
            ("10.0.0.5:8080", "10.0.0.5:8080"),
        ] {
            assert_eq!(socket_addr(text).unwrap().to_string(), want, "{text}");
        }
        for bad in ["", ":9742", "node-ip:9742", "10.0.0.5", "10.0.0.5:99999"] {
            let e = socket_addr(bad).unwrap_err();
            assert!(e.contains("ADDRESS:PORT"), "{bad}: {e}");
        }
    }
}
