//! `server.tracing`: W3C Trace Context propagation and the gateway's own spans.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `server.tracing`: each request's trace context (W3C `traceparent`, `tracestate`)
/// continued or started, passed to the upstream with the gateway's span as the parent, and
/// its trace ID written to the access log. Bootstrap: a change needs a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tracing {
    /// Continue or start a trace for every request and send the upstream a `traceparent`.
    /// Off: the client's `traceparent` and `tracestate` pass through untouched and the
    /// access log has no trace fields. Default: true.
    #[serde(default = "default_true")]
    pub propagate: bool,
    /// Fraction of traces the gateway starts (or continues without following the
    /// caller's flag) that are sampled: their `traceparent` says so to the upstream.
    /// Drawn by the gateway, not read from the trace ID (a client chooses that).
    /// Default: 0.1. Range: 0..=1.
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// Whose `sampled` flag a continued trace follows (both ways: sampled or not):
    /// `trusted_proxies` (peers in `server.trusted_proxies`; other clients get
    /// `sample_ratio`), `any`, or `never` (always `sample_ratio`). A client that could set
    /// the flag would choose how much is sampled. Default: `trusted_proxies`.
    #[serde(default)]
    pub parent_sampled: ParentSampled,
    /// Where sampled spans are exported: an OTLP/HTTP (protobuf) traces endpoint,
    /// `http://host:port/v1/traces`. Plain `http://` only (keep the collector on a private
    /// network or loopback). One span per sampled request, batched off the request path.
    /// Default: none (no export).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans. Default: `tidegate`. 1..=128 bytes.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Most spans waiting for export; a span that finds the queue full is dropped and
    /// counted (`tidegate_trace_spans_dropped_total{reason="queue_full"}`): a request never
    /// waits for the exporter. Default: 2048. Range: 1..=1000000.
    #[serde(default = "default_max_queue")]
    pub max_queue: u32,
    /// Most spans in one export request. Default: 512. Range: 1..=`max_queue`.
    #[serde(default = "default_max_batch")]
    pub max_batch: u32,
    /// Longest a span waits for its batch to fill before the batch is sent, in
    /// milliseconds. Default: 1000. Range: 10..=60000.
    #[serde(default = "default_export_interval_ms")]
    pub export_interval_ms: u64,
    /// Longest one export request may take, connecting included, in milliseconds; past it
    /// the batch is dropped and counted (never retried). Default: 5000. Range: 100..=60000.
    #[serde(default = "default_export_timeout_ms")]
    pub export_timeout_ms: u64,
}

/// Whose `sampled` flag a continued trace follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ParentSampled {
    /// Requests from a peer in `server.trusted_proxies`.
    #[default]
    TrustedProxies,
    /// Every request.
    Any,
    /// None: the gateway's own draw decides.
    Never,
}

fn default_true() -> bool {
    true
}
fn default_sample_ratio() -> f64 {
    0.1
}
fn default_service_name() -> String {
    "tidegate".to_owned()
}
fn default_max_queue() -> u32 {
    2048
}
fn default_max_batch() -> u32 {
    512
}
fn default_export_interval_ms() -> u64 {
    1000
}
fn default_export_timeout_ms() -> u64 {
    5000
}

impl Default for Tracing {
    fn default() -> Self {
        Self {
            propagate: true,
            sample_ratio: default_sample_ratio(),
            parent_sampled: ParentSampled::default(),
            otlp_endpoint: None,
            service_name: default_service_name(),
            max_queue: default_max_queue(),
            max_batch: default_max_batch(),
            export_interval_ms: default_export_interval_ms(),
            export_timeout_ms: default_export_timeout_ms(),
        }
    }
}
