//! Plumbing shared by the long-running components (agent, controller, `node watch`): the async
//! runtime, the shutdown signal, and reflector caches that say when anything changed.

use crate::{Error, Result};
use futures::StreamExt;
use kube::Api;
use kube::core::DeserializeGuard;
use kube::core::error_boundary::InvalidObject;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::ExponentialBackoff;
use kube::runtime::{WatchStreamExt, watcher};
use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Runs a component on a multi-threaded runtime; exit 0 when it stops cleanly.
pub fn run_async(component: impl Future<Output = Result<()>>) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the async runtime", e))?;
    runtime.block_on(component)?;
    Ok(ExitCode::SUCCESS)
}

/// A future that resolves on SIGTERM or SIGINT.
pub fn shutdown_signal() -> Result<Pin<Box<dyn Future<Output = ()> + Send>>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| Error::io("installing SIGTERM handler", e))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| Error::io("installing SIGINT handler", e))?;
    Ok(Box::pin(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }))
}

/// Called with an object's kind and what was wrong when it cannot be read.
pub type OnInvalid = Arc<dyn Fn(&str, &InvalidObject) + Send + Sync>;

/// Starts a reflector for `api` (retrying with backoff while the API server is away) that pokes
/// `changed` whenever its cache changed, and returns the cache. `slim` trims each object before
/// it is cached (the controller keeps only what it reads of a Pod).
///
/// One object that does not decode (an enum value written by a newer CRD version while older
/// binaries still run, say) never stalls the watch: it is reported to `on_invalid` and skipped,
/// and the last version of it that could be read stays in the cache, so that a policy this
/// binary cannot read yet is not mistaken for a deleted one.
pub fn reflect<K>(
    api: Api<DeserializeGuard<K>>,
    config: watcher::Config,
    changed: Arc<Notify>,
    on_invalid: OnInvalid,
    slim: fn(&mut K),
) -> Store<K>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let reader = store.clone();
    let events = watcher(api, config).filter_map(move |event| {
        let event = event.map(|e| readable(e, &reader, &on_invalid));
        let event = match event {
            Ok(Some(mut e)) => {
                if let watcher::Event::Apply(k) | watcher::Event::InitApply(k) = &mut e {
                    slim(k);
                }
                Some(Ok(e))
            }
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        };
        futures::future::ready(event)
    });
    let stream = reflector::reflector(writer, events).backoff(watch_backoff());
    tokio::spawn(notify_on_change(stream, changed));
    store
}

/// Does nothing to an object: for `reflect` when the whole object is wanted.
pub fn keep_whole<K>(_: &mut K) {}

/// The event with every object that decoded; an object that did not is reported and replaced by
/// the last readable version in `cache` (or left out when there is none).
fn readable<K>(
    event: watcher::Event<DeserializeGuard<K>>,
    cache: &Store<K>,
    on_invalid: &OnInvalid,
) -> Option<watcher::Event<K>>
where
    K: kube::Resource + Clone,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let last_readable = |invalid: &InvalidObject| -> Option<K> {
        let name = invalid.metadata.name.as_deref()?;
        let mut key = ObjectRef::<K>::new(name);
        if let Some(ns) = &invalid.metadata.namespace {
            key = key.within(ns);
        }
        cache.get(&key).map(|k| (*k).clone())
    };
    let read = |guard: DeserializeGuard<K>, report: bool| match guard.0 {
        Ok(k) => Some(k),
        Err(invalid) => {
            if report {
                let dt = K::DynamicType::default();
                let kind = K::kind(&dt);
                tracing::warn!(
                    kind = %kind,
                    name = invalid.metadata.name.as_deref().unwrap_or_default(),
                    error = %invalid.error,
                    "cannot read this object (written by a newer loopguard?); skipping it, keeping the last version read"
                );
                on_invalid(&kind, &invalid);
            }
            last_readable(&invalid)
        }
    };
    Some(match event {
        watcher::Event::Apply(g) => watcher::Event::Apply(read(g, true)?),
        watcher::Event::InitApply(g) => watcher::Event::InitApply(read(g, true)?),
        watcher::Event::Delete(g) => watcher::Event::Delete(read(g, false)?),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitDone => watcher::Event::InitDone,
    })
}

/// How long a watch waits before retrying after an error: 0.5 s, doubling up to 5 s, each plus up
/// to as much again of jitter; back to 0.5 s as soon as the watch delivers again.
///
/// kube's default (client-go's: up to 30 s plus as much jitter) left an agent blind for up to two
/// minutes after an API server restart: the first watch after the restart fails with
/// `410 Expired` (the new watch cache starts after the old resource version), and the re-list
/// waits a second full delay. Our watches are one Node, the policies and the node states; a
/// refused connection every few seconds per watch costs the API server little, and the jitter
/// spreads the re-lists when it comes back.
fn watch_backoff() -> ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(5))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .into()
}

/// Drives a reflector stream and pokes `changed` each time the cache it fills has changed.
///
/// A re-list (at start, and after a watch expired, for example when the API server was away)
/// fills a buffer that replaces the cache only at `InitDone`: poking on each listed object would
/// wake readers while the cache still holds the old objects, and nothing would wake them again,
/// so a change made during an outage (a relabelled Node, a deleted policy) would go unseen.
async fn notify_on_change<K, S>(stream: S, changed: Arc<Notify>)
where
    K: kube::Resource,
    K::DynamicType: Default,
    S: futures::Stream<Item = std::result::Result<watcher::Event<K>, watcher::Error>>,
{
    futures::pin_mut!(stream);
    while let Some(item) = stream.next().await {
        match item {
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone) => {
                changed.notify_one()
            }
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Err(e) => {
                tracing::warn!(error = %e, kind = %K::kind(&Default::default()), "watch error; retrying")
            }
        }
    }
}

/// Whether a cache has been filled once (its first list arrived).
pub fn is_synced<K: kube::Resource + Clone>(store: &Store<K>) -> bool
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    futures::FutureExt::now_or_never(store.wait_until_ready()).is_some_and(|r| r.is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::ObjectMeta;
    use std::collections::BTreeMap;

    fn config_map(name: &str, value: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([("v".to_string(), value.to_string())])),
            ..ConfigMap::default()
        }
    }

    fn values(store: &Store<ConfigMap>) -> Vec<(String, String)> {
        let mut all: Vec<_> = store
            .state()
            .iter()
            .map(|cm| {
                (
                    cm.metadata.name.clone().unwrap(),
                    cm.data.as_ref().unwrap()["v"].clone(),
                )
            })
            .collect();
        all.sort();
        all
    }

    /// After any number of failures a watch retries within 10 s: an agent whose API server
    /// was away sees the cluster again within seconds of its return.
    #[test]
    fn watches_retry_within_ten_seconds() {
        let mut backoff = watch_backoff();
        let delays: Vec<Duration> = (0..200).map(|_| backoff.next().unwrap()).collect();
        assert!(delays[0] <= Duration::from_secs(1), "{:?}", delays[0]);
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(10)));
        assert!(delays[10..].iter().all(|d| *d >= Duration::from_secs(5)));
    }

    /// Every poke comes after the cache holds the change, also across a re-list that replaces
    /// one object and drops another.
    #[tokio::test]
    async fn pokes_only_when_the_cache_has_changed() {
        let (store, writer) = reflector::store::<ConfigMap>();
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let changed = Arc::new(Notify::new());
        tokio::spawn(notify_on_change(
            reflector::reflector(writer, rx),
            changed.clone(),
        ));
        let send = |event| tx.unbounded_send(Ok(event)).unwrap();
        let poked = || async {
            tokio::time::timeout(std::time::Duration::from_secs(5), changed.notified())
                .await
                .is_ok()
        };
        let quiet = || async {
            tokio::time::timeout(std::time::Duration::from_millis(100), changed.notified())
                .await
                .is_err()
        };
        let pair = |n: &str, v: &str| (n.to_string(), v.to_string());

        send(watcher::Event::Init);
        send(watcher::Event::InitApply(config_map("a", "1")));
        send(watcher::Event::InitApply(config_map("b", "1")));
        assert!(quiet().await, "no poke before the first list is complete");
        send(watcher::Event::InitDone);
        assert!(poked().await);
        assert_eq!(values(&store), vec![pair("a", "1"), pair("b", "1")]);

        send(watcher::Event::Apply(config_map("a", "2")));
        assert!(poked().await);
        assert_eq!(values(&store), vec![pair("a", "2"), pair("b", "1")]);

        // The watch expired (API server away): a re-list in which `a` changed and `b` is gone.
        tx.unbounded_send(Err(watcher::Error::NoResourceVersion))
            .unwrap();
        send(watcher::Event::Init);
        send(watcher::Event::InitApply(config_map("a", "3")));
        assert!(quiet().await, "the cache still holds the old objects");
        send(watcher::Event::InitDone);
        assert!(poked().await, "the end of a re-list is a change");
        assert_eq!(values(&store), vec![pair("a", "3")]);

        send(watcher::Event::Delete(config_map("a", "3")));
        assert!(poked().await);
        assert!(values(&store).is_empty());
    }
}
