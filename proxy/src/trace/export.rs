//! OTLP/HTTP export of sampled request spans (`server.tracing.otlp_endpoint`).
//!
//! The request path only offers a finished [`SpanRecord`] to a bounded queue
//! ([`Exporter::offer`]): when the queue is full the span is dropped and counted, so a slow
//! or dead collector never makes a request wait. One task drains the queue into batches of
//! at most `max_batch` spans (or whatever arrived within `export_interval_ms` of a batch's
//! first span), encodes each as an OTLP `ExportTraceServiceRequest` (protobuf) and POSTs it,
//! one request at a time, each bounded by `export_timeout_ms`. A failed batch is dropped and
//! counted, never retried: spans are diagnostics, and a retry backlog is what the queue
//! bound exists to prevent.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Uri, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, InstrumentationScope, KeyValue, any_value::Value,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode,
};
use prost::Message as _;
use tokio::sync::mpsc;

use crate::metrics::{Metrics, Name, SpanDropLabels};

/// Largest collector answer read; a longer one fails the export.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// One request's span, as the record phase hands it over: owned, so building the
/// protobuf happens on the export task, not on the request path.
#[derive(Debug)]
pub struct SpanRecord {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_id: Option<[u8; 8]>,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub method: Option<http::Method>,
    pub status: u16,
    pub request_id: HeaderValue,
    pub interface: Option<Name>,
    pub app: Option<String>,
    pub route: Option<Arc<str>>,
    pub upstream: Option<Name>,
    /// `forward`, `limited`, `shed`, `fallback`, `breaker`, `no_route`, ... (the access
    /// log's `decision`).
    pub decision: &'static str,
    /// The limit, fallback or breaker that answered.
    pub rule: Option<Arc<str>>,
    /// The identity phase's outcome (the access log's `identity`).
    pub identity: &'static str,
}

/// The request path's handle on the export queue: a clone is one sender.
#[derive(Debug, Clone)]
pub struct Exporter {
    tx: mpsc::Sender<SpanRecord>,
    metrics: Arc<Metrics>,
}

/// What the export task needs, from `server.tracing`.
#[derive(Debug, Clone)]
pub struct ExportSettings {
    pub endpoint: Uri,
    pub service_name: String,
    pub max_queue: usize,
    pub max_batch: usize,
    pub interval: Duration,
    pub timeout: Duration,
}

// === impl Exporter ===

impl Exporter {
    /// Start the export task (on the current runtime); it ends when every [`Exporter`]
    /// is dropped, after sending what was queued.
    pub fn start(settings: ExportSettings, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::channel(settings.max_queue);
        tokio::spawn(run(rx, settings, metrics.clone()));
        Self { tx, metrics }
    }

    /// Queue a span for export, or drop and count it when the queue is full. Never waits.
    pub fn offer(&self, span: SpanRecord) {
        if self.tx.try_send(span).is_err() {
            self.dropped("queue_full", 1);
        }
    }

    fn dropped(&self, reason: &'static str, n: u64) {
        dropped(&self.metrics, reason, n);
    }
}

fn dropped(metrics: &Metrics, reason: &'static str, n: u64) {
    metrics
        .trace_spans_dropped
        .get_or_create(&SpanDropLabels { reason })
        .inc_by(n);
}

impl ExportSettings {
    /// From `server.tracing`, when it has an endpoint (validated: a plain `http://` URL).
    pub fn from_config(t: &rules::model::Tracing) -> Option<Self> {
        let endpoint = t.otlp_endpoint.as_deref()?.parse().ok()?;
        Some(Self {
            endpoint,
            service_name: t.service_name.clone(),
            max_queue: t.max_queue as usize,
            max_batch: t.max_batch as usize,
            interval: Duration::from_millis(t.export_interval_ms),
            timeout: Duration::from_millis(t.export_timeout_ms),
        })
    }
}

/// The export task: batch, encode, POST, count; until the queue's senders are gone.
async fn run(mut rx: mpsc::Receiver<SpanRecord>, s: ExportSettings, metrics: Arc<Metrics>) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let resource = Resource {
        attributes: vec![string_kv("service.name", s.service_name.clone())],
        ..Default::default()
    };
    let mut batch = Vec::with_capacity(s.max_batch);
    loop {
        if rx.recv_many(&mut batch, s.max_batch).await == 0 {
            return;
        }
        let deadline = tokio::time::Instant::now() + s.interval;
        while batch.len() < s.max_batch {
            let room = s.max_batch - batch.len();
            match tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, room)).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let n = batch.len() as u64;
        let body = encode(&resource, batch.drain(..));
        let req = Request::post(s.endpoint.clone())
            .header(header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(body))
            .expect("a valid request");
        // The answer is read to its end so the connection is kept for the next batch, and
        // bounded: OTLP answers are a few bytes (a partial-success message at most).
        let exchange = async {
            let resp = client.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(status)
        };
        match tokio::time::timeout(s.timeout, exchange).await {
            Ok(Ok(status)) if status.is_success() => {
                metrics.trace_spans_exported.inc_by(n);
            }
            outcome => {
                tracing::debug!(?outcome, spans = n, "span export failed; batch dropped");
                dropped(&metrics, "export_failed", n);
            }
        }
    }
}

/// One OTLP request holding `spans`.
fn encode(resource: &Resource, spans: impl Iterator<Item = SpanRecord>) -> Bytes {
    let req = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource.clone()),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "tidegate".to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ..Default::default()
                }),
                spans: spans.map(span).collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    Bytes::from(req.encode_to_vec())
}

/// A request's OTLP span: kind server, named after the method and interface (the route
/// template, never the path, which may carry IDs), with the phase outcomes as attributes.
/// The user ID is not exported (it may be personal data); the app ID is.
fn span(r: SpanRecord) -> Span {
    let interface = r.interface.as_ref().map_or("none", |n| &*n.0);
    let method = r.method.as_ref().map_or("", http::Method::as_str);
    let mut attributes = vec![
        string_kv("http.request.method", method.to_owned()),
        int_kv("http.response.status_code", i64::from(r.status)),
        string_kv("tidegate.interface", interface.to_owned()),
        string_kv("tidegate.decision", r.decision.to_owned()),
        string_kv("tidegate.identity", r.identity.to_owned()),
        string_kv(
            "tidegate.request_id",
            r.request_id.to_str().unwrap_or("-").to_owned(),
        ),
    ];
    let optional = [
        ("tidegate.app", r.app.as_deref()),
        ("tidegate.route", r.route.as_deref()),
        ("tidegate.upstream", r.upstream.as_ref().map(|n| &*n.0)),
        ("tidegate.rule", r.rule.as_deref()),
    ];
    for (k, v) in optional {
        if let Some(v) = v {
            attributes.push(string_kv(k, v.to_owned()));
        }
    }
    let code = if r.status >= 500 {
        StatusCode::Error
    } else {
        StatusCode::Unset
    };
    Span {
        trace_id: r.trace_id.to_vec(),
        span_id: r.span_id.to_vec(),
        parent_span_id: r.parent_id.map(|p| p.to_vec()).unwrap_or_default(),
        // The W3C flags: only `sampled`, and only sampled spans are exported.
        flags: 0x01,
        name: format!("{method} {interface}").trim_start().to_owned(),
        kind: SpanKind::Server as i32,
        start_time_unix_nano: r.start_unix_ns,
        end_time_unix_nano: r.end_unix_ns,
        attributes,
        status: Some(Status {
            code: code as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn string_kv(key: &str, v: String) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(v)),
        }),
    }
}

fn int_kv(key: &str, v: i64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(Value::IntValue(v)),
        }),
    }
}
