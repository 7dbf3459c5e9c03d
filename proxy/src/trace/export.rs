//! OTLP/HTTP export of sampled request spans (`server.tracing.otlp_endpoint`).
//!
//! The request path only offers a finished [`SpanRecord`] to a bounded queue
//! ([`Exporter::offer`]): when the queue is full the span is dropped and counted, so a slow
//! or dead collector never makes a request wait. One task drains the queue into batches of
//! at most `max_batch` spans (whatever is queued `export_interval_ms` after a batch's first
//! span, or sooner once a full batch is), encodes each as an OTLP
//! `ExportTraceServiceRequest` (protobuf, written by [`super::otlp`]) and POSTs it, one
//! request at a time, each bounded by `export_timeout_ms`. A failed batch is dropped and counted, never retried: spans are
//! diagnostics, and a retry backlog is what the queue bound exists to prevent.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Uri, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{Notify, mpsc};

use super::otlp::Encoder;
pub use super::otlp::SpanRecord;
use crate::metrics::{Metrics, SpanDropLabels};

/// Largest collector answer read; a longer one fails the export.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The request path's handle on the export queue: a clone is one sender.
#[derive(Debug, Clone)]
pub struct Exporter {
    tx: mpsc::Sender<SpanRecord>,
    /// Told when a full batch is queued, so the export task need not wake for every span.
    full: Arc<Notify>,
    max_batch: usize,
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
    /// Start the export task on a thread and runtime of its own; it ends when every
    /// [`Exporter`] is dropped, after sending what was queued.
    ///
    /// Not on the request workers: encoding a batch of up to `max_batch` spans would hold a
    /// worker for its length, and the batch deadline's timer would sit in the workers'
    /// timer wheel, looked at every time a worker parks.
    pub fn start(settings: ExportSettings, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::channel(settings.max_queue);
        let full = Arc::new(Notify::new());
        let max_batch = settings.max_batch;
        let task = run(rx, full.clone(), settings, metrics.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        let spawned = rt.map_err(|e| e.to_string()).and_then(|rt| {
            std::thread::Builder::new()
                .name("tidegate-export".into())
                .spawn(move || rt.block_on(task))
                .map_err(|e| e.to_string())
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "span export not started: spans will be dropped");
        }
        Self {
            tx,
            full,
            max_batch,
            metrics,
        }
    }

    /// Queue a span for export, or drop and count it when the queue is full. Never waits.
    pub fn offer(&self, span: SpanRecord) {
        if self.tx.try_send(span).is_err() {
            self.dropped("queue_full", 1);
        } else if self.tx.max_capacity() - self.tx.capacity() >= self.max_batch {
            self.full.notify_one();
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
///
/// A batch starts with the first span queued; the task then sleeps until the batch's
/// deadline, or until the request path says a full batch is queued, and takes what is
/// there. Spans arriving in between do not wake it: at a high sampled rate, a wake per span
/// cost more than encoding it.
async fn run(
    mut rx: mpsc::Receiver<SpanRecord>,
    full: Arc<Notify>,
    s: ExportSettings,
    metrics: Arc<Metrics>,
) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut encoder = Encoder::new(&s.service_name);
    // Each batch's body is split off this buffer; once the exchange has dropped it, the
    // next batch reuses the same allocation.
    let mut out = BytesMut::new();
    let mut batch = Vec::with_capacity(s.max_batch);
    loop {
        if rx.recv_many(&mut batch, s.max_batch).await == 0 {
            return;
        }
        if batch.len() < s.max_batch {
            let deadline = tokio::time::Instant::now() + s.interval;
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {}
                _ = full.notified() => {}
            }
            while batch.len() < s.max_batch {
                match rx.try_recv() {
                    Ok(span) => batch.push(span),
                    Err(_) => break,
                }
            }
        }
        let n = batch.len() as u64;
        encoder.encode(batch.drain(..), &mut out);
        let body = out.split().freeze();
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
