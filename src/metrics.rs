//! Prometheus metrics and the health endpoints, served on one port: `/metrics`, `/healthz`
//! (the component's loop is making progress: a liveness probe restarts it otherwise) and
//! `/readyz` (its caches are synced and it can do its job).

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Whether the process is ready, and why not; set by the component.
#[derive(Clone)]
pub struct Readiness(Arc<Mutex<Option<String>>>);

impl Default for Readiness {
    fn default() -> Self {
        Readiness(Arc::new(Mutex::new(Some("caches not synced yet".into()))))
    }
}

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.set_reason(if ready {
            None
        } else {
            Some("not ready".into())
        });
    }

    /// Ready when `why_not` is `None`; else `/readyz` answers 503 with the reason.
    pub fn set_reason(&self, why_not: Option<String>) {
        *self.0.lock().expect("readiness lock") = why_not;
    }

    pub fn get(&self) -> bool {
        self.why_not().is_none()
    }

    fn why_not(&self) -> Option<String> {
        self.0.lock().expect("readiness lock").clone()
    }
}

/// Whether the component's main loop is making progress: it calls `beat` each time round, and
/// `/healthz` fails once the last beat is older than the limit.
#[derive(Clone)]
pub struct Liveness {
    started: Instant,
    last: Arc<AtomicU64>,
    limit: Option<Duration>,
}

impl Liveness {
    /// A loop expected to beat at least every `limit`.
    pub fn within(limit: Duration) -> Liveness {
        Liveness {
            started: Instant::now(),
            last: Arc::new(AtomicU64::new(0)),
            limit: Some(limit),
        }
    }

    /// For a component whose health is only that it answers.
    pub fn always() -> Liveness {
        Liveness {
            limit: None,
            ..Liveness::within(Duration::ZERO)
        }
    }

    pub fn beat(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::SeqCst);
    }

    /// `None` when healthy, else why not.
    pub fn problem(&self) -> Option<String> {
        let limit = self.limit?;
        let last = Duration::from_millis(self.last.load(Ordering::SeqCst));
        let silent = self.started.elapsed().saturating_sub(last);
        (silent > limit).then(|| {
            format!(
                "the enforcement loop has not finished a round for {:.0}s (limit {:.0}s)",
                silent.as_secs_f64(),
                limit.as_secs_f64()
            )
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct BuildLabels {
    version: String,
    component: String,
}

/// `loopguard_build_info{version, component} 1`: which loopguard runs where.
pub fn register_build_info(registry: &mut Registry, component: &str) {
    let info = prometheus_client::metrics::family::Family::<
        BuildLabels,
        prometheus_client::metrics::gauge::Gauge,
    >::default();
    info.get_or_create(&BuildLabels {
        version: env!("CARGO_PKG_VERSION").into(),
        component: component.into(),
    })
    .set(1);
    registry.sub_registry_with_prefix("loopguard").register(
        "build_info",
        "The loopguard version running, 1 per process",
        info,
    );
}

/// Binds `addr` and serves the endpoints until the process ends.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    ready: Readiness,
    live: Liveness,
) -> crate::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| crate::Error::io(format!("binding the metrics address {addr}"), e))?;
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut text = String::new();
                    match prometheus_client::encoding::text::encode(&mut text, &registry) {
                        Ok(()) => (
                            StatusCode::OK,
                            [(
                                header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            text,
                        )
                            .into_response(),
                        Err(e) => {
                            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
                        }
                    }
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let live = live.clone();
                async move {
                    match live.problem() {
                        None => (StatusCode::OK, "ok".to_string()),
                        Some(why) => (StatusCode::INTERNAL_SERVER_ERROR, why),
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    match ready.why_not() {
                        None => (StatusCode::OK, "ready".to_string()),
                        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}")),
                    }
                }
            }),
        );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_fails_once_the_loop_stops_beating() {
        let live = Liveness::within(Duration::from_millis(50));
        live.beat();
        assert_eq!(live.problem(), None);
        std::thread::sleep(Duration::from_millis(80));
        let problem = live.problem().expect("stalled");
        assert!(problem.contains("has not finished a round"), "{problem}");
        live.beat();
        assert_eq!(live.problem(), None);
        assert_eq!(Liveness::always().problem(), None);
    }
}
