//! Leader election with a `coordination.k8s.io/v1` Lease, in the manner of client-go: renew while
//! leading, take over a lease whose holder stopped renewing for a whole lease duration (measured
//! on our own clock, so clock skew between replicas does not matter), and release it on shutdown.
//!
//! A leader that cannot renew stops leading on its own clock *before* anyone else may take over:
//! `Leadership::is_leader` turns false `renew_deadline` after the last successful renewal, and
//! every write of the controller checks it first.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Shared view of whether this replica leads.
#[derive(Clone)]
pub struct Leadership {
    valid_until: Arc<Mutex<Option<Instant>>>,
}

impl Leadership {
    pub fn is_leader(&self) -> bool {
        self.valid_until
            .lock()
            .expect("lock")
            .is_some_and(|until| Instant::now() < until)
    }

    fn set(&self, until: Option<Instant>) {
        *self.valid_until.lock().expect("lock") = until;
    }
}

/// A lease holder and its last renewal, as another replica wrote them.
type LeaseRecord = (Option<String>, Option<MicroTime>);

/// Competes for one Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_duration: Duration,
    renew_deadline: Duration,
    retry_period: Duration,
    leadership: Leadership,
    /// The last lease record seen from another holder, and when we first saw it.
    observed: Option<(LeaseRecord, Instant)>,
}

impl LeaderElector {
    pub fn new(
        api: Api<Lease>,
        name: &str,
        identity: &str,
        lease_duration: Duration,
    ) -> LeaderElector {
        LeaderElector {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
            lease_duration,
            renew_deadline: lease_duration * 2 / 3,
            retry_period: (lease_duration / 5).max(Duration::from_millis(500)),
            leadership: Leadership {
                valid_until: Arc::default(),
            },
            observed: None,
        }
    }

    pub fn leadership(&self) -> Leadership {
        self.leadership.clone()
    }

    /// Tries to acquire or renew, every retry period, until `stop` fires; then releases.
    pub async fn run(mut self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut was_leader = false;
        loop {
            let attempt_started = Instant::now();
            match self.try_acquire_or_renew().await {
                Ok(true) => self
                    .leadership
                    .set(Some(attempt_started + self.renew_deadline)),
                Ok(false) => self.leadership.set(None),
                Err(e) => tracing::warn!(error = %e, lease = %self.name, "lease update failed"),
            }
            let leading = self.leadership.is_leader();
            if leading != was_leader {
                if leading {
                    tracing::info!(identity = %self.identity, lease = %self.name, "became leader");
                } else {
                    tracing::warn!(identity = %self.identity, lease = %self.name, "lost leadership; stopped writing");
                }
                was_leader = leading;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.retry_period) => {}
                _ = stop.changed() => break,
            }
        }
        if self.leadership.is_leader() {
            self.leadership.set(None);
            if let Err(e) = self.release().await {
                tracing::warn!(error = %e, "could not release the lease; another replica takes over when it expires");
            } else {
                tracing::info!(lease = %self.name, "released leadership");
            }
        }
    }

    fn now() -> MicroTime {
        MicroTime(jiff::Timestamp::now())
    }

    /// One round: returns whether we hold the lease afterwards.
    async fn try_acquire_or_renew(&mut self) -> kube::Result<bool> {
        let seconds = self.lease_duration.as_secs().max(1) as i32;
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(Self::now()),
                    renew_time: Some(Self::now()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        if holder.as_deref() != Some(self.identity.as_str()) {
            let record = (holder.clone(), spec.renew_time.clone());
            let first_seen = match &self.observed {
                Some((seen, at)) if *seen == record => *at,
                _ => {
                    self.observed = Some((record, Instant::now()));
                    Instant::now()
                }
            };
            let their_duration =
                Duration::from_secs(spec.lease_duration_seconds.unwrap_or(seconds).max(1) as u64);
            if holder.is_some() && first_seen.elapsed() < their_duration {
                return Ok(false);
            }
            spec.acquire_time = Some(Self::now());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.holder_identity = Some(self.identity.clone());
        }
        spec.renew_time = Some(Self::now());
        spec.lease_duration_seconds = Some(seconds);
        // replace() carries the resourceVersion we read: a concurrent change makes it fail (409).
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn release(&self) -> kube::Result<()> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(Self::now());
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
    }
}
