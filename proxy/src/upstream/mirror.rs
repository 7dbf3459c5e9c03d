//! Request mirroring: a fire-and-forget copy of a request to a route's mirror upstream.
//!
//! The decision (which users are mirrored) is the rules' ([`rules::route::CompiledMirror`]);
//! this module sends the copy. The primary never waits for it: the copy is its own task,
//! sent through the mirror upstream's shared pool (never the downstream connection's own
//! connections), and its answer is read to the end and discarded, counted by status class
//! and latency. What the primary pays for a mirrored request is a copy of its head and a
//! task spawn; for one with a body, a reference-count bump per body piece as it streams
//! (the [`Tee`]), since the copy is only sent once the whole body has passed. Bodies of
//! undeclared length, or longer than `max_body_bytes`, are not mirrored at all.
//!
//! Each mirror bounds its copies in flight: beyond `max_in_flight` a copy is dropped and
//! counted, so a slow or hung mirror holds a bounded number of tasks, sockets and bodies. A
//! mirror that refuses a connection (down) gets no copies for [`DOWN_PAUSE`], so it costs a
//! failed connect per pause rather than per request.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, header};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use rules::route::CompiledMirror;

use super::{Tee, Upstream};
use crate::metrics::{Metrics, MirrorLabels, MirrorOutcomeLabels, Name, status_class};
use crate::respond::GatewayError;

/// Most bytes of a mirror's answer read (and discarded) before its connection is dropped.
pub const DRAIN_BYTES: u64 = 1 << 20;

/// How long a mirror that refused a connection gets no copies: a mirror that is down then
/// costs one failed connect per pause, not one per mirrored request.
pub const DOWN_PAUSE: Duration = Duration::from_secs(1);

/// The header that marks a copy, so the mirror service can tell it from real traffic.
pub static X_TIDEGATE_MIRROR: HeaderName = HeaderName::from_static("x-tidegate-mirror");

/// One route's mirror at run time: where copies go, their bounds, how many are in flight,
/// and its metric series (looked up once per load, not per request).
#[derive(Debug)]
pub struct Mirror {
    upstream: Arc<Upstream>,
    max_body: u64,
    max_in_flight: u32,
    /// Copies in flight; each task gives its slot back when it ends (see [`Slot`]).
    in_flight: AtomicU32,
    /// Until when (nanoseconds after `epoch`) copies are skipped because the mirror refused
    /// a connection; 0: not paused.
    down_until: AtomicU64,
    epoch: Instant,
    series: Series,
    labels: MirrorLabels,
    metrics: Arc<Metrics>,
}

#[derive(Debug)]
struct Series {
    sent: Counter,
    skipped_body: Counter,
    body_incomplete: Counter,
    dropped: Counter,
    skipped_down: Counter,
    latency: Histogram,
    in_flight: Gauge,
}

/// A claimed place among a mirror's copies in flight, given back on drop (however the
/// copy's task ends).
struct Slot(Arc<Mirror>);

// === impl Mirror ===

impl Mirror {
    /// The mirror of route `route` as `def` describes it, copying to `upstream`. A mirror of
    /// `previous` with the same definition is kept, with its copies in flight, so a reload
    /// does not double the bound while old copies finish.
    pub fn build(
        route: &str,
        def: &CompiledMirror,
        upstream: &Arc<Upstream>,
        metrics: &Arc<Metrics>,
        previous: Option<&Arc<Mirror>>,
    ) -> Arc<Self> {
        if let Some(p) = previous
            && Arc::ptr_eq(&p.upstream, upstream)
            && p.max_body == def.max_body_bytes
            && p.max_in_flight == def.max_in_flight
            && &*p.labels.route.0 == route
        {
            return Arc::clone(p);
        }
        let labels = MirrorLabels {
            route: Name::from(route),
            upstream: upstream.name.clone(),
        };
        let counter = |outcome| {
            metrics
                .mirror_requests
                .get_or_create(&MirrorOutcomeLabels {
                    route: labels.route.clone(),
                    upstream: labels.upstream.clone(),
                    outcome,
                })
                .clone()
        };
        let series = Series {
            sent: counter("sent"),
            skipped_body: counter("skipped_body"),
            body_incomplete: counter("body_incomplete"),
            dropped: counter("dropped"),
            skipped_down: counter("skipped_down"),
            latency: metrics.mirror_latency.get_or_create(&labels).clone(),
            in_flight: metrics.mirror_in_flight.get_or_create(&labels).clone(),
        };
        Arc::new(Self {
            upstream: Arc::clone(upstream),
            max_body: def.max_body_bytes,
            max_in_flight: def.max_in_flight,
            in_flight: AtomicU32::new(0),
            down_until: AtomicU64::new(0),
            epoch: Instant::now(),
            series,
            labels,
            metrics: Arc::clone(metrics),
        })
    }

    /// Start a copy of a request about to be forwarded. `parts` is its head after header
    /// hygiene, so the copy carries the same forwarding headers; `body_empty` says the
    /// client's body is known to be empty. Returns the [`Tee`] the primary's body must feed
    /// when the copy waits for a body; `None` when it does not (no body, or no copy). Out of
    /// line, as every path that spawns a task from the request path is (the task is built
    /// on the caller's stack before it moves to the heap).
    #[inline(never)]
    pub fn start(self: &Arc<Self>, parts: &http::request::Parts, body_empty: bool) -> Option<Tee> {
        if !body_empty {
            let declared = parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_none_or(|n| n > self.max_body) {
                self.series.skipped_body.inc();
                return None;
            }
        }
        if self.paused() {
            self.series.skipped_down.inc();
            return None;
        }
        let slot = self.claim()?;
        let mut copy = Request::new(());
        *copy.method_mut() = parts.method.clone();
        *copy.uri_mut() = parts.uri.clone();
        *copy.headers_mut() = parts.headers.clone();
        copy.headers_mut()
            .insert(&X_TIDEGATE_MIRROR, HeaderValue::from_static("1"));
        let (head, ()) = copy.into_parts();
        if body_empty {
            tokio::spawn(slot.send(head, Bytes::new()));
            return None;
        }
        let (tee, body) = Tee::new(self.max_body);
        // The body comes as fast as the client sends it and the primary reads it; a copy
        // waits for it no longer than the mirror would for an answer.
        let wait = self.upstream.request_timeout;
        tokio::spawn(async move {
            match tokio::time::timeout(wait, body).await {
                Ok(Ok(body)) => slot.send(head, body).await,
                _ => {
                    slot.0.series.body_incomplete.inc();
                }
            }
        });
        Some(tee)
    }

    /// A place among the copies in flight, or `None` (counted) when they are all taken.
    fn claim(self: &Arc<Self>) -> Option<Slot> {
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= self.max_in_flight {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.series.dropped.inc();
            return None;
        }
        self.series.in_flight.inc();
        Some(Slot(Arc::clone(self)))
    }

    /// Whether copies are paused after a refused connection (one atomic load while the
    /// mirror has not refused any).
    fn paused(&self) -> bool {
        let until = self.down_until.load(Ordering::Relaxed);
        until != 0 && (self.epoch.elapsed().as_nanos() as u64) < until
    }

    /// Pause copies for [`DOWN_PAUSE`].
    fn pause(&self) {
        let until = (self.epoch.elapsed() + DOWN_PAUSE).as_nanos() as u64;
        self.down_until.store(until, Ordering::Relaxed);
    }

    fn count_response(&self, outcome: &'static str) {
        self.metrics
            .mirror_responses
            .get_or_create(&MirrorOutcomeLabels {
                route: self.labels.route.clone(),
                upstream: self.labels.upstream.clone(),
                outcome,
            })
            .inc();
    }

    /// Copies in flight now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }
}

// === impl Slot ===

impl Slot {
    /// Send the copy and count what became of it.
    async fn send(self, head: http::request::Parts, body: Bytes) {
        let m = &self.0;
        m.series.sent.inc();
        match m.upstream.send_copy(head, body).await {
            Ok((status, latency)) => {
                m.series.latency.observe(latency.as_secs_f64());
                m.count_response(status_class(status));
            }
            Err(e) => {
                if e == GatewayError::UpstreamUnavailable {
                    m.pause();
                }
                tracing::debug!(
                    route = &*m.labels.route.0,
                    upstream = &*m.labels.upstream.0,
                    error = e.code(),
                    "mirror copy failed"
                );
                m.count_response(e.code());
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.series.in_flight.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror(max_in_flight: u32, metrics: &Arc<Metrics>) -> Arc<Mirror> {
        let text = format!(
            r#"{{"schema_version": 1,
              "upstreams": {{"v1": {{"endpoints": ["127.0.0.1:1"]}}, "shadow": {{"endpoints": ["127.0.0.1:2"]}}}},
              "routes": [{{"name": "r", "upstream": "v1",
                "mirror": {{"upstream": "shadow", "fraction": "100%", "max_in_flight": {max_in_flight}}}}}]}}"#
        );
        let snap = rules::load("t.json", text.as_bytes()).unwrap().snapshot;
        let def = snap.routes[0].mirror.as_ref().unwrap();
        let up = Upstream::build(
            &snap.upstreams[def.upstream.0 as usize],
            None,
            None,
            None,
            metrics,
        )
        .unwrap();
        Mirror::build("r", def, &up, metrics, None)
    }

    /// The tee hands over the body's pieces joined, once it has ended.
    #[test]
    fn tee_hands_over_the_whole_body() {
        let (mut t, mut rx) = Tee::new(7);
        t.push(&Bytes::from_static(b"abc"));
        t.push(&Bytes::from_static(b"defg"));
        t.finish();
        assert_eq!(rx.try_recv().unwrap(), Bytes::from_static(b"abcdefg"));
    }

    /// Past its limit, or dropped before the end, the tee hands over nothing.
    #[test]
    fn tee_over_its_limit_or_cut_short_hands_over_nothing() {
        let (mut t, mut rx) = Tee::new(3);
        t.push(&Bytes::from_static(b"abcd"));
        t.finish();
        assert!(rx.try_recv().is_err());
        let (mut t, mut rx) = Tee::new(10);
        t.push(&Bytes::from_static(b"ab"));
        drop(t);
        assert!(rx.try_recv().is_err());
    }

    /// Copies in flight stop at the bound, the excess counted as dropped; a finished copy
    /// gives its place back. The in-flight gauge follows.
    #[tokio::test]
    async fn claims_stop_at_the_bound() {
        let metrics = Arc::new(Metrics::new());
        let m = mirror(2, &metrics);
        let (a, b) = (m.claim(), m.claim());
        assert!(a.is_some() && b.is_some());
        assert!(m.claim().is_none());
        assert_eq!(m.in_flight(), 2);
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"tidegate_mirror_requests_total{route="r",upstream="shadow",outcome="dropped"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"tidegate_mirror_in_flight{route="r",upstream="shadow"} 2"#),
            "{text}"
        );
        drop(a);
        assert_eq!(m.in_flight(), 1);
        assert!(m.claim().is_some());
        drop(b);
    }

    /// After a refused connection copies are skipped (counted) until the pause ends.
    #[tokio::test]
    async fn a_refusing_mirror_is_paused() {
        let metrics = Arc::new(Metrics::new());
        let m = mirror(2, &metrics);
        let (head, ()) = Request::new(()).into_parts();
        assert!(!m.paused());
        m.pause();
        assert!(m.paused());
        assert!(m.start(&head, true).is_none());
        assert_eq!(m.in_flight(), 0, "no copy started");
        let text = metrics.encode();
        assert!(
            text.contains(r#"tidegate_mirror_requests_total{route="r",upstream="shadow",outcome="skipped_down"} 1"#),
            "{text}"
        );
        m.down_until.store(1, Ordering::Relaxed);
        assert!(!m.paused(), "the pause is over");
    }

    /// A reload that keeps the mirror's definition keeps the mirror and its copies in
    /// flight; another bound builds a new one.
    #[tokio::test]
    async fn reload_keeps_an_unchanged_mirror() {
        let metrics = Arc::new(Metrics::new());
        let m = mirror(2, &metrics);
        let def = CompiledMirror {
            upstream: rules::UpstreamId(0),
            ppm: 1_000_000,
            salt: "r#mirror".into(),
            max_body_bytes: m.max_body,
            max_in_flight: 2,
        };
        let kept = Mirror::build("r", &def, &m.upstream, &metrics, Some(&m));
        assert!(Arc::ptr_eq(&kept, &m));
        let other = CompiledMirror {
            max_in_flight: 3,
            ..def
        };
        let new = Mirror::build("r", &other, &m.upstream, &metrics, Some(&m));
        assert!(!Arc::ptr_eq(&new, &m));
    }
}
