//! The API server as seen from inside a node namespace: a TCP proxy listening on the namespace's
//! 127.0.0.1:443 that forwards to the real kube-apiserver on the host's loopback. TLS passes through
//! untouched; the serving certificate covers 127.0.0.1.

use std::net::{Ipv4Addr, SocketAddr};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::{API_PROXY_PORT, Error, IoContext, Netns, Result};

/// The host address of the API server named by the kubeconfig.
pub async fn upstream_address(cluster_url: &http::Uri) -> Result<SocketAddr> {
    let host = cluster_url
        .host()
        .ok_or_else(|| Error::Invalid(format!("API server URL {cluster_url} has no host")))?;
    let port = cluster_url.port_u16().unwrap_or(443);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    tokio::net::lookup_host((host, port))
        .await
        .context(|| format!("resolving {host}"))?
        .next()
        .ok_or_else(|| Error::Invalid(format!("{host} does not resolve")))
}

/// Binds the listener inside `netns` and serves it on the runtime (whose threads stay in the host
/// namespace, so the upstream connections are made there).
pub fn serve(netns: &Netns, upstream: SocketAddr) -> Result<JoinHandle<()>> {
    let listener = netns
        .run(|| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, API_PROXY_PORT)))?
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(TcpListener::from_std)
        .context(|| {
            format!(
                "listening on 127.0.0.1:{API_PROXY_PORT} in netns {}",
                netns.name()
            )
        })?;
    Ok(tokio::spawn(async move {
        loop {
            let mut downstream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("API proxy: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                match TcpStream::connect(upstream).await {
                    Ok(mut up) => {
                        let _ = tokio::io::copy_bidirectional(&mut downstream, &mut up).await;
                    }
                    Err(e) => tracing::debug!("API proxy: connecting to {upstream}: {e}"),
                }
            });
        }
    }))
}
