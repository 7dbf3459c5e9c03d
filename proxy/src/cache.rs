//! Interface response caches (`interfaces[].cache`): answers of idempotent interfaces kept
//! for a short while, and concurrent misses of one key coalesced into one upstream call, so
//! a thousand readers of one hot envelope cost its service one request per TTL.
//!
//! The phase runs after the decision and the checks that wait (limits, fallbacks, overload
//! admission and slots apply to every request, answered from here or not) and in place of
//! forwarding. A request is keyed by a 128-bit XXH3 of method, path, query and, unless the
//! cache is shared (`vary_on_identity: false`), the caller's app and user IDs and its
//! `Authorization` and `Cookie` values: one user's answer is never served to another (a
//! collision is a 2^-128 event). A shared cache is bypassed by requests carrying
//! credentials.
//!
//! The staleness bound: an answer is served for at most `ttl` after the request that
//! fetched it was *sent*, and a request joins another's call only while that call is
//! younger than `ttl`; so whatever the upstream had acknowledged `ttl` before a request is
//! visible in its answer. Nothing invalidates early: a grab never empties the cache.
//!
//! Coalescing: the first miss of a key leads (registers a flight, forwards, and publishes
//! the kept answer); the misses after it wait for that answer, at most `max_waiters` of
//! them for at most `max_wait`. When the leader's answer is not kept (an error, a 5xx,
//! `no-store`, too large) or the leader goes away or takes too long, each waiter makes its
//! own call: an upstream error is never fanned out to requests that did not cause it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use prometheus_client::metrics::counter::Counter;
use rules::{CacheSpec, Classified, Snapshot};
use tokio::sync::watch;
use xxhash_rust::xxh3::Xxh3;

use crate::metrics::{CacheLabels, Metrics, Name};
use crate::respond::GatewayError;
use crate::upstream::UpstreamBody;
use crate::upstream::headers::strip_hop_by_hop;

/// The response header saying what the cache did: `hit`, `coalesced` or `miss` (absent when
/// the request bypassed it).
pub const X_CACHE: header::HeaderName = header::HeaderName::from_static("x-cache");

/// One interface's cache. Shared by the runtimes of reloads that leave the interface and its
/// `cache` section unchanged.
#[derive(Debug)]
pub struct ResponseCache {
    /// Its settings.
    pub spec: CacheSpec,
    /// The interface's method and path template, for keeping the cache over a reload.
    template: (Option<Method>, Box<str>),
    /// Kept answers, at most `max_entries` (each at most `max_body_bytes`): S3-FIFO eviction.
    store: quick_cache::sync::Cache<u128, Arc<Kept>>,
    /// Upstream calls in flight, by key. A std mutex: held for a map operation, never
    /// across an await.
    flights: Mutex<HashMap<u128, Arc<Flight>>>,
    /// `tidegate_cache_total` by outcome, resolved once.
    counts: Counts,
}

/// An answer kept (always a 200).
#[derive(Debug)]
pub struct Kept {
    headers: HeaderMap,
    body: Bytes,
    /// When the request that fetched it was sent: it is served until `sent + ttl`.
    sent: Instant,
}

/// One upstream call that waiters share.
#[derive(Debug)]
struct Flight {
    /// `None` while in flight; then the kept answer, or `Some(None)` when there is none to
    /// share. Dropped unsent when the leader goes away.
    done: watch::Sender<Option<Option<Arc<Kept>>>>,
    waiters: AtomicU32,
    sent: Instant,
}

/// What to do with a cacheable request.
#[derive(Debug)]
pub enum Lookup {
    /// Answered: a kept answer (`hit`) or another request's (`coalesced`).
    Answered(Response<UpstreamBody>),
    /// Forward, then hand the result to [`Lead::fill`].
    Lead(Lead),
    /// Forward without sharing (the flight was full, too old, failed or gone).
    Alone,
}

/// The leader of a key's flight: it forwards and fills the cache. Dropping it without
/// [`Lead::fill`] (the client went away) releases the waiters to their own calls.
#[derive(Debug)]
pub struct Lead {
    cache: Arc<ResponseCache>,
    key: u128,
    flight: Arc<Flight>,
}

#[derive(Debug)]
struct Counts {
    hit: Counter,
    miss: Counter,
    coalesced: Counter,
    bypass: Counter,
    stored: Counter,
}

// === impl ResponseCache ===

impl ResponseCache {
    /// A cache for interface `name` (method and path template given) with `spec`.
    pub fn new(
        name: &Name,
        method: Option<Method>,
        path: &str,
        spec: CacheSpec,
        metrics: &Metrics,
    ) -> Self {
        let count = |outcome| {
            (metrics.cache)
                .get_or_create(&CacheLabels {
                    interface: name.clone(),
                    outcome,
                })
                .clone()
        };
        Self {
            store: quick_cache::sync::Cache::new(spec.max_entries as usize),
            spec,
            template: (method, path.into()),
            flights: Mutex::new(HashMap::new()),
            counts: Counts {
                hit: count("hit"),
                miss: count("miss"),
                coalesced: count("coalesced"),
                bypass: count("bypass"),
                stored: count("stored"),
            },
        }
    }

    /// Whether this cache can serve an interface with this method, template and spec (a
    /// reload that changes none of them keeps it, answers and all).
    pub fn same(&self, method: Option<&Method>, path: &str, spec: &CacheSpec) -> bool {
        self.template.0.as_ref() == method && *self.template.1 == *path && self.spec == *spec
    }

    /// `(hit, coalesced, miss)` counts since the gateway started, for the dashboard.
    pub fn figures(&self) -> (u64, u64, u64) {
        let c = &self.counts;
        (c.hit.get(), c.coalesced.get(), c.miss.get())
    }

    /// The request's key, or `None` when it bypasses the cache (not `GET`/`HEAD`, or
    /// credentials on a shared cache); counted.
    pub fn key(&self, parts: &http::request::Parts, class: &Classified<'_>) -> Option<u128> {
        let h = &parts.headers;
        let credentials =
            || h.contains_key(header::AUTHORIZATION) || h.contains_key(header::COOKIE);
        let method = &parts.method;
        if (*method != Method::GET && *method != Method::HEAD)
            || (!self.spec.vary_on_identity && credentials())
        {
            self.counts.bypass.inc();
            return None;
        }
        let mut x = Xxh3::new();
        let mut field = |tag: u8, v: &[u8]| {
            x.update(&[tag]);
            x.update(&(v.len() as u64).to_le_bytes());
            x.update(v);
        };
        field(0, method.as_str().as_bytes());
        field(1, parts.uri.path().as_bytes());
        if let Some(q) = parts.uri.query() {
            field(2, q.as_bytes());
        }
        if self.spec.vary_on_identity {
            if let Some(a) = &class.app {
                field(3, a.as_bytes());
            }
            if let Some(u) = &class.user {
                field(4, u.as_bytes());
            }
            for v in h.get_all(header::AUTHORIZATION) {
                field(5, v.as_bytes());
            }
            for v in h.get_all(header::COOKIE) {
                field(6, v.as_bytes());
            }
        }
        Some(x.digest128())
    }

    /// Serve `key` from the cache, wait for its flight, or lead one.
    pub async fn lookup(self: &Arc<Self>, key: u128) -> Lookup {
        if let Some(kept) = self.fresh(key) {
            self.counts.hit.inc();
            return Lookup::Answered(kept.response("hit"));
        }
        let joined = {
            let mut flights = self.flights.lock().expect("never poisoned");
            match flights.get(&key) {
                Some(f) if f.sent.elapsed() < self.spec.ttl => {
                    // One more waiter, unless the flight has its fill.
                    let n = f.waiters.fetch_add(1, Ordering::Relaxed);
                    (n < self.spec.max_waiters).then(|| f.done.subscribe())
                }
                // Too old to share within the staleness bound: its own call, unshared.
                Some(_) => None,
                None => {
                    let flight = Arc::new(Flight {
                        done: watch::channel(None).0,
                        waiters: AtomicU32::new(0),
                        sent: Instant::now(),
                    });
                    flights.insert(key, flight.clone());
                    self.counts.miss.inc();
                    return Lookup::Lead(Lead {
                        cache: self.clone(),
                        key,
                        flight,
                    });
                }
            }
        };
        if let Some(mut rx) = joined {
            let shared = tokio::time::timeout(self.spec.max_wait, rx.wait_for(Option::is_some));
            if let Ok(Ok(done)) = shared.await
                && let Some(Some(kept)) = &*done
            {
                self.counts.coalesced.inc();
                return Lookup::Answered(kept.response("coalesced"));
            }
        }
        self.counts.miss.inc();
        Lookup::Alone
    }

    /// The kept answer of `key` while it is fresh.
    fn fresh(&self, key: u128) -> Option<Arc<Kept>> {
        self.store
            .get(&key)
            .filter(|k| k.sent.elapsed() < self.spec.ttl)
    }

    /// Whether an answer may be kept: a 200 of declared length within bounds (any length
    /// for `HEAD`, which has no body), without `Set-Cookie`, without `Cache-Control`
    /// `no-store`, `private` or `no-cache`, and with no `Vary` on a header the key does not
    /// cover (with identity in the key: `Authorization`, `Cookie` and the identity
    /// extractors' headers; otherwise none).
    fn keepable(&self, head: &http::response::Parts, head_only: bool, snap: &Snapshot) -> bool {
        let h = &head.headers;
        if head.status != StatusCode::OK || h.contains_key(header::SET_COOKIE) {
            return false;
        }
        let declared = h
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if !head_only && declared.is_none_or(|n| n > u64::from(self.spec.max_body_bytes)) {
            return false;
        }
        let tokens = |name| {
            h.get_all(name)
                .into_iter()
                .flat_map(|v| v.to_str().unwrap_or("*").split(','))
                .map(str::trim)
        };
        let forbids = tokens(header::CACHE_CONTROL).any(|d| {
            let d = d.split('=').next().unwrap_or(d).trim();
            ["no-store", "private", "no-cache"]
                .iter()
                .any(|x| d.eq_ignore_ascii_case(x))
        });
        let covered = |name: &str| {
            self.spec.vary_on_identity
                && (name.eq_ignore_ascii_case("authorization")
                    || name.eq_ignore_ascii_case("cookie")
                    || snap.is_identity_header(name))
        };
        !forbids && tokens(header::VARY).all(|v| v.is_empty() || covered(v))
    }
}

/// The answer of a request that went upstream without sharing: marked `miss`.
pub fn mark_miss(result: &mut Result<(Response<UpstreamBody>, std::time::Duration), GatewayError>) {
    if let Ok((resp, _)) = result {
        crate::upstream::materialize(resp, UpstreamBody::take_raw);
        resp.headers_mut()
            .insert(X_CACHE, HeaderValue::from_static("miss"));
    }
}

// === impl Kept ===

impl Kept {
    fn response(&self, outcome: &'static str) -> Response<UpstreamBody> {
        let mut resp = Response::new(UpstreamBody::buffered(self.body.clone()));
        *resp.headers_mut() = self.headers.clone();
        resp.headers_mut()
            .insert(X_CACHE, HeaderValue::from_static(outcome));
        resp
    }
}

// === impl Lead ===

impl Lead {
    /// The upstream's answer to the leader: kept (its body read whole, bounded) and
    /// shared with the waiters when [`ResponseCache::keepable`], else passed through as is
    /// and the waiters released to their own calls. `head_only` for a `HEAD` request.
    pub async fn fill(
        self,
        result: Result<(Response<UpstreamBody>, std::time::Duration), GatewayError>,
        head_only: bool,
        snap: &Snapshot,
    ) -> Result<(Response<UpstreamBody>, std::time::Duration), GatewayError> {
        let (mut resp, latency) = match result {
            Ok(ok) => ok,
            Err(e) => return Err(e), // the waiters make their own calls (drop)
        };
        crate::upstream::materialize(&mut resp, UpstreamBody::take_raw);
        let (mut head, body) = resp.into_parts();
        if !self.cache.keepable(&head, head_only, snap) {
            let mut resp = Response::from_parts(head, body);
            resp.headers_mut()
                .insert(X_CACHE, HeaderValue::from_static("miss"));
            return Ok((resp, latency));
        }
        // Bounded twice: by the declared length checked above, and here should the body
        // run past it.
        let limit = self.cache.spec.max_body_bytes as usize;
        let body = match Limited::new(body, limit).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return Err(GatewayError::UpstreamReset),
        };
        strip_hop_by_hop(&mut head.headers);
        let kept = Arc::new(Kept {
            headers: head.headers,
            body,
            sent: self.flight.sent,
        });
        self.cache.store.insert(self.key, kept.clone());
        self.cache.counts.stored.inc();
        self.flight.done.send_replace(Some(Some(kept.clone())));
        let mut resp = kept.response("miss");
        *resp.status_mut() = head.status;
        *resp.version_mut() = head.version;
        Ok((resp, latency))
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        // Tell waiters still there that there is nothing to share (a no-op after a kept
        // answer was sent), and take the flight down so the next miss leads anew.
        self.flight.done.send_if_modified(|v| {
            let unset = v.is_none();
            if unset {
                *v = Some(None);
            }
            unset
        });
        let mut flights = self.cache.flights.lock().expect("never poisoned");
        if flights
            .get(&self.key)
            .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
        {
            flights.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests;
