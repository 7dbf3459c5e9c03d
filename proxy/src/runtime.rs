//! What one config compiles to, and the handle to the live one.
//!
//! A [`Runtime`] is built off the request path (at start and on every reload) from a
//! compiled [`Snapshot`]: upstream clients, limiter and breaker state, overload gates and the
//! dashboard's counters, each carried over from the runtime it replaces where the rule is
//! unchanged. It is published whole with one atomic swap in [`Live`]; a request loads it
//! once and decides against that one version from start to end.
//!
//! [`Live`] is all that background tasks (reload, limiter sweeps, the overload controller,
//! the dashboard's sampler, the admin port) need: the runtime and the metrics. They hold it
//! instead of the gateway, so nothing below the request path depends on the request path.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rules::Snapshot;

use crate::cache::ResponseCache;
use crate::govern::Governors;
use crate::jwt::{KeySet, Verifier};
use crate::metrics::{Metrics, Name};
use crate::overload::Overload;
use crate::stats::Counters;
use crate::upstream::Upstream;
use crate::upstream::mirror::Mirror;
use rules::overload::PriorityKey;

/// Everything a request needs from the current config, published as one unit.
#[derive(Debug)]
pub struct Runtime {
    /// The compiled rules.
    pub snapshot: Snapshot,
    /// Runtime upstreams, indexed like `snapshot.upstreams`.
    pub upstreams: Vec<Arc<Upstream>>,
    /// Route mirrors, indexed like the snapshot's routes (`None` for a route without one;
    /// empty off-line, where nothing is forwarded).
    pub mirrors: Vec<Option<Arc<Mirror>>>,
    /// Interface names as metric labels, indexed like `snapshot.interfaces`.
    pub interface_names: Vec<Name>,
    /// Response caches, indexed like `snapshot.interfaces` (`None` for an interface without
    /// one; empty off-line, where nothing is forwarded). Kept, answers and all, over a
    /// reload that leaves the interface and its cache unchanged.
    pub caches: Vec<Option<Arc<ResponseCache>>>,
    /// Limiter and breaker state (carried over a reload for unchanged rules).
    pub governors: Governors,
    /// Overload caps and admission level (carried over a reload when unchanged).
    pub overload: Overload,
    /// Live per-second counters for the dashboard (carried over a reload by name).
    pub stats: Arc<Counters>,
    /// The gateway's one registry (the same for every runtime).
    pub metrics: Arc<Metrics>,
    /// The token verifier of `identity.jwt` (kept, cache and all, over a reload that
    /// changes neither its settings nor its keys).
    pub identity: Option<Arc<Verifier>>,
    /// The request headers the rules read, which the access log records (values bounded)
    /// so that `tidegate replay` can decide the request again: [`Snapshot::headers_read`]
    /// without credentials ([`NEVER_LOGGED`]) and without the identity extractors' headers
    /// (their result, the app and user, is logged). Computed here, once per config.
    pub access_inputs: Box<[http::HeaderName]>,
}

/// Headers the access log never records, whatever the rules read: they carry credentials.
pub const NEVER_LOGGED: [&str; 5] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
];

/// What a config names on disk that its rules need at run time, read with it (the rules
/// read no files themselves).
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    /// The keys of `identity.jwt` (its JWKS file).
    pub jwks: Option<Arc<KeySet>>,
    /// The key of `overload.admission.priority_key_file`.
    pub priority_key: Option<PriorityKey>,
    /// The TLS client of each upstream with `tls`, by upstream name, built from the files
    /// it names (or the system's trust store).
    pub upstream_tls: std::collections::HashMap<Box<str>, crate::upstream::tls::TlsClient>,
}

/// The live runtime and the metrics: the handle every background task holds.
#[derive(Debug)]
pub struct Live {
    /// The live rules; replaced whole by a reload.
    pub runtime: ArcSwap<Runtime>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

// === impl Runtime ===

impl Runtime {
    /// Build the runtime for a compiled snapshot and the keys its `identity.jwt` names (read
    /// with the config). `embedded` gives the address of each running embedded upstream by
    /// name.
    ///
    /// State worth keeping moves over from `previous` (the runtime being replaced by a
    /// reload): an upstream whose definition did not change keeps its client, so its pooled
    /// connections stay warm instead of every reload causing a reconnect storm, and its
    /// health checker; one that changed is built anew, its endpoints keeping their health
    /// (ejections, backoff, check verdicts) by name.
    pub fn build(
        snapshot: Snapshot,
        secrets: Secrets,
        embedded: &dyn Fn(&str) -> Option<std::net::SocketAddr>,
        previous: Option<&Runtime>,
        metrics: &Arc<Metrics>,
    ) -> Result<Self, String> {
        let upstreams = snapshot
            .upstreams
            .iter()
            .map(|spec| {
                let addr = embedded(&spec.name);
                let tls = secrets.upstream_tls.get(&spec.name);
                let kept = previous.and_then(|p| {
                    p.upstreams
                        .iter()
                        .find(|u| u.same_definition(spec, addr, tls))
                });
                match kept {
                    Some(u) => Ok(u.clone()),
                    None => {
                        // Rebuilt by an edit: its endpoints keep their health by name.
                        let same_name = previous
                            .and_then(|p| p.upstreams.iter().find(|u| *u.name.0 == *spec.name));
                        Upstream::build(spec, addr, tls, same_name.map(|u| &**u), metrics)
                    }
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let identity = match (&snapshot.jwt, secrets.jwks) {
            (None, _) => None,
            (Some(s), Some(k)) => Some(Verifier::build(
                s,
                k,
                previous.and_then(|p| p.identity.as_ref()),
            )),
            (Some(_), None) => {
                return Err(
                    "identity.jwt: its key file was not read (start the gateway from the config file)"
                        .to_owned(),
                );
            }
        };
        if snapshot.overload.priority_key_file.is_some() && secrets.priority_key.is_none() {
            return Err(
                "overload.admission.priority_key_file: the key file was not read (start the gateway from the config file)"
                    .to_owned(),
            );
        }
        let mirrors = snapshot
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let m = r.mirror.as_ref()?;
                let kept = previous
                    .and_then(|p| p.mirrors.get(i))
                    .and_then(Option::as_ref);
                let up = &upstreams[m.upstream.0 as usize];
                Some(Mirror::build(&r.name, m, up, metrics, kept))
            })
            .collect();
        if let Some(p) = previous {
            Upstream::retire_endpoints(&p.upstreams, &upstreams, metrics);
        }
        let mut rt = Self::with_state(snapshot, secrets.priority_key, previous, metrics);
        rt.caches = rt
            .snapshot
            .interfaces
            .iter()
            .zip(&rt.interface_names)
            .map(|(itf, name)| {
                let spec = itf.cache.as_ref()?;
                let kept = previous
                    .and_then(|p| {
                        let i = p
                            .snapshot
                            .interfaces
                            .iter()
                            .position(|x| x.name == itf.name)?;
                        p.caches.get(i)?.clone()
                    })
                    .filter(|c| c.same(itf.method.as_ref(), &itf.path, spec));
                Some(kept.unwrap_or_else(|| {
                    Arc::new(ResponseCache::new(
                        name,
                        itf.method.clone(),
                        &itf.path,
                        spec.clone(),
                        metrics,
                    ))
                }))
            })
            .collect();
        rt.upstreams = upstreams;
        rt.mirrors = mirrors;
        rt.identity = identity;
        Ok(rt)
    }

    /// A runtime with state for `snapshot` (carried over from `previous` where unchanged)
    /// but no upstream clients: enough to decide (`tidegate explain` off-line), not to
    /// forward.
    pub fn offline(snapshot: Snapshot, previous: Option<&Runtime>, metrics: &Arc<Metrics>) -> Self {
        Self::with_state(snapshot, None, previous, metrics)
    }

    /// [`Runtime::offline`] with user priorities keyed by `priority_key` (the key file of
    /// `overload.admission.priority_key_file`, read with the config): `tidegate replay`,
    /// which decides but never connects (no upstream client, no name resolved).
    pub fn offline_keyed(
        snapshot: Snapshot,
        priority_key: Option<PriorityKey>,
        metrics: &Arc<Metrics>,
    ) -> Self {
        Self::with_state(snapshot, priority_key, None, metrics)
    }

    /// [`Runtime::offline`] with user priorities keyed by `priority_key`.
    fn with_state(
        snapshot: Snapshot,
        priority_key: Option<PriorityKey>,
        previous: Option<&Runtime>,
        metrics: &Arc<Metrics>,
    ) -> Self {
        let interface_names = snapshot
            .interfaces
            .iter()
            .map(|i| Name(i.name.as_ref().into()))
            .collect();
        let governors = Governors::build(&snapshot, previous.map(|p| &p.governors));
        let overload = Overload::build(&snapshot, priority_key, previous.map(|p| &p.overload));
        let stats = Arc::new(Counters::build(
            &snapshot,
            previous.map(|p| (&p.snapshot, &*p.stats)),
            &metrics.series_activated,
        ));
        let access_inputs = (snapshot.headers_read().into_iter())
            .filter(|h| {
                !NEVER_LOGGED.contains(&h.as_str()) && !snapshot.is_identity_header(h.as_str())
            })
            .collect();
        Self {
            access_inputs,
            snapshot,
            upstreams: Vec::new(),
            mirrors: Vec::new(),
            caches: Vec::new(),
            interface_names,
            governors,
            overload,
            stats,
            metrics: Arc::clone(metrics),
            identity: None,
        }
    }
}

// === impl Live ===

impl Live {
    /// A handle serving `runtime`.
    pub fn new(runtime: Runtime, metrics: Arc<Metrics>) -> Self {
        Self {
            runtime: ArcSwap::from_pointee(runtime),
            metrics,
        }
    }
}
