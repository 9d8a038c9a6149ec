//! Readiness probes, run from inside the pod's network namespace. httpGet (HTTP; HTTPS as a TCP connect) and
//! tcpSocket probes are run; exec and grpc probes count as passing.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerPort, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::Netns;

/// Runs `probe` every period and calls `set_ready` whenever the readiness it concludes changes, after
/// the probe's success or failure threshold. Runs until aborted.
pub async fn run(
    netns: Arc<Netns>,
    probe: Probe,
    ports: Vec<ContainerPort>,
    set_ready: impl Fn(bool),
) {
    let period = Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64);
    let success_threshold = probe.success_threshold.unwrap_or(1).max(1);
    let failure_threshold = probe.failure_threshold.unwrap_or(3).max(1);
    tokio::time::sleep(Duration::from_secs(
        probe.initial_delay_seconds.unwrap_or(0).max(0) as u64,
    ))
    .await;
    let probe = Arc::new(probe);
    let ports = Arc::new(ports);
    let (mut ready, mut streak) = (false, 0);
    loop {
        let (netns, probe, ports) = (netns.clone(), probe.clone(), ports.clone());
        let passed = tokio::task::spawn_blocking(move || netns.run(|| check(&probe, &ports)))
            .await
            .is_ok_and(|r| r.unwrap_or(false));
        streak = if passed == ready { 0 } else { streak + 1 };
        if streak
            >= if ready {
                failure_threshold
            } else {
                success_threshold
            }
        {
            ready = passed;
            streak = 0;
            set_ready(ready);
        }
        tokio::time::sleep(period).await;
    }
}

/// One probe attempt; runs inside the node namespace.
fn check(probe: &Probe, ports: &[ContainerPort]) -> bool {
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    let resolve = |port: &IntOrString| match port {
        IntOrString::Int(port) => u16::try_from(*port).ok(),
        IntOrString::String(name) => ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    };
    let address = |host: Option<&String>, port| {
        let ip = host
            .and_then(|h| h.parse().ok())
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        SocketAddr::new(ip, port)
    };
    if let Some(http) = &probe.http_get {
        let Some(port) = resolve(&http.port) else {
            return false;
        };
        let address = address(http.host.as_ref(), port);
        if http.scheme.as_deref() == Some("HTTPS") {
            return TcpStream::connect_timeout(&address, timeout).is_ok();
        }
        let headers: String = http
            .http_headers
            .iter()
            .flatten()
            .map(|h| format!("{}: {}\r\n", h.name, h.value))
            .collect();
        let path = http.path.as_deref().unwrap_or("/");
        return http_get(address, path, &headers, timeout)
            .is_some_and(|code| (200..400).contains(&code));
    }
    if let Some(tcp) = &probe.tcp_socket {
        let Some(port) = resolve(&tcp.port) else {
            return false;
        };
        return TcpStream::connect_timeout(&address(tcp.host.as_ref(), port), timeout).is_ok();
    }
    true
}

/// The status code of `GET path`.
fn http_get(address: SocketAddr, path: &str, headers: &str, timeout: Duration) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&address, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: kube-probe/1.37\r\nAccept: */*\r\n\
         Connection: close\r\n{headers}\r\n"
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut status_line = String::new();
    BufReader::new(stream).read_line(&mut status_line).ok()?;
    status_line.split_whitespace().nth(1)?.parse().ok()
}
