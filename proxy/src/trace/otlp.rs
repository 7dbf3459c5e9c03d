//! The OTLP `ExportTraceServiceRequest` protobuf, written straight from span records into
//! one buffer.
//!
//! The generated message types (`opentelemetry-proto`, prost) cost about 14,600
//! instructions per span here: each attribute is an owned `String` key and value, and prost
//! measures every nested message again at each level it is written under. This writer
//! knows the keys at compile time and the shape of every message, works out each
//! attribute's length before writing it, and writes each span once into a reused buffer,
//! then copies it behind its length. The tests decode what it
//! writes with `opentelemetry-proto` and compare it with that crate's own encoding of the
//! same spans, for hand-picked and random records.
//!
//! Field numbers are those of `opentelemetry/proto/{collector/trace,trace,common,resource}/v1`.

use std::sync::Arc;

use bytes::BytesMut;
use http::HeaderValue;

use crate::metrics::Name;

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

/// Protobuf wire types.
const LEN: u8 = 2;
const VARINT: u8 = 0;
const I64: u8 = 1;
const I32: u8 = 5;

/// `SpanKind.SPAN_KIND_SERVER`.
const KIND_SERVER: u64 = 2;
/// `Status.StatusCode.STATUS_CODE_ERROR`.
const STATUS_ERROR: u64 = 2;

/// Writes export requests; keeps its buffers between batches.
#[derive(Debug)]
pub struct Encoder {
    /// `Resource` (field 1 of `ResourceSpans`), written once.
    resource: Vec<u8>,
    /// `InstrumentationScope` (field 1 of `ScopeSpans`), written once.
    scope: Vec<u8>,
    /// The batch's spans, each as field 2 of `ScopeSpans`.
    spans: Vec<u8>,
    /// One span's message, before its length is known.
    span: Vec<u8>,
}

impl Encoder {
    /// An encoder for spans of the service `service_name`.
    pub fn new(service_name: &str) -> Self {
        let mut resource = Vec::new();
        key_value(&mut resource, 1, "service.name", Value::Str(service_name));
        let mut scope = Vec::new();
        string(&mut scope, 1, "tidegate");
        string(&mut scope, 2, env!("CARGO_PKG_VERSION"));
        Self {
            resource,
            scope,
            spans: Vec::new(),
            span: Vec::new(),
        }
    }

    /// One export request holding `spans`, appended to `out`.
    pub fn encode(&mut self, spans: impl Iterator<Item = SpanRecord>, out: &mut BytesMut) {
        self.spans.clear();
        for r in spans {
            self.span.clear();
            self.write_span(&r);
            bytes(&mut self.spans, 2, &self.span);
        }
        // ScopeSpans { scope = 1, spans = 2 }
        let scope_spans_len = field_len(self.scope.len()) + self.spans.len();
        // ResourceSpans { resource = 1, scope_spans = 2 }
        let resource_spans_len = field_len(self.resource.len()) + field_len(scope_spans_len);
        let mut head = Vec::with_capacity(32 + self.resource.len() + self.scope.len());
        // ExportTraceServiceRequest { resource_spans = 1 }
        tag(&mut head, 1, LEN);
        varint(&mut head, resource_spans_len as u64);
        bytes(&mut head, 1, &self.resource);
        tag(&mut head, 2, LEN);
        varint(&mut head, scope_spans_len as u64);
        bytes(&mut head, 1, &self.scope);
        out.reserve(head.len() + self.spans.len());
        out.extend_from_slice(&head);
        out.extend_from_slice(&self.spans);
    }

    /// A request's span: kind server, named after the method and interface (the route
    /// template, never the path, which may carry IDs), with the phase outcomes as
    /// attributes. The user ID is not exported (it may be personal data); the app ID is.
    fn write_span(&mut self, r: &SpanRecord) {
        let s = &mut self.span;
        let interface = r.interface.as_ref().map_or("none", |n| &*n.0);
        let method = r.method.as_ref().map_or("", http::Method::as_str);
        bytes(s, 1, &r.trace_id);
        bytes(s, 2, &r.span_id);
        if let Some(p) = &r.parent_id {
            bytes(s, 4, p);
        }
        // name = 5: "<method> <interface>", or the interface alone without a method.
        let name_len = if method.is_empty() {
            interface.len()
        } else {
            method.len() + 1 + interface.len()
        };
        // Proto3 leaves out a scalar field holding its default (empty, 0); so does this.
        if name_len > 0 {
            tag(s, 5, LEN);
            varint(s, name_len as u64);
            if !method.is_empty() {
                s.extend_from_slice(method.as_bytes());
                s.push(b' ');
            }
            s.extend_from_slice(interface.as_bytes());
        }
        tag(s, 6, VARINT);
        varint(s, KIND_SERVER);
        for (field, ns) in [(7, r.start_unix_ns), (8, r.end_unix_ns)] {
            if ns != 0 {
                tag(s, field, I64);
                s.extend_from_slice(&ns.to_le_bytes());
            }
        }
        let request_id = r.request_id.to_str().unwrap_or("-");
        let attributes = [
            ("http.request.method", Value::Str(method)),
            ("http.response.status_code", Value::Int(i64::from(r.status))),
            ("tidegate.interface", Value::Str(interface)),
            ("tidegate.decision", Value::Str(r.decision)),
            ("tidegate.identity", Value::Str(r.identity)),
            ("tidegate.request_id", Value::Str(request_id)),
        ];
        for (k, v) in attributes {
            key_value(s, 9, k, v);
        }
        let optional = [
            ("tidegate.app", r.app.as_deref()),
            ("tidegate.route", r.route.as_deref()),
            ("tidegate.upstream", r.upstream.as_ref().map(|n| &*n.0)),
            ("tidegate.rule", r.rule.as_deref()),
        ];
        for (k, v) in optional {
            if let Some(v) = v {
                key_value(s, 9, k, Value::Str(v));
            }
        }
        // status = 15: Status { code = 3 }, an error for a 5xx answer, else unset (empty).
        tag(s, 15, LEN);
        if r.status >= 500 {
            varint(s, 2);
            tag(s, 3, VARINT);
            varint(s, STATUS_ERROR);
        } else {
            varint(s, 0);
        }
        // flags = 16: the W3C flags, only `sampled` (only sampled spans are exported).
        tag(s, 16, I32);
        s.extend_from_slice(&1u32.to_le_bytes());
    }
}

/// An attribute's value.
#[derive(Clone, Copy)]
enum Value<'a> {
    Str(&'a str),
    Int(i64),
}

/// `KeyValue { key = 1, value = 2: AnyValue { string_value = 1 | int_value = 3 } }` as
/// field `field` of `out`, its lengths worked out before it is written.
fn key_value(out: &mut Vec<u8>, field: u32, key: &str, v: Value<'_>) {
    let any_len = match v {
        Value::Str(s) => field_len(s.len()),
        Value::Int(i) => 1 + varint_len(i as u64),
    };
    tag(out, field, LEN);
    varint(out, (field_len(key.len()) + field_len(any_len)) as u64);
    string(out, 1, key);
    tag(out, 2, LEN);
    varint(out, any_len as u64);
    match v {
        Value::Str(s) => string(out, 1, s),
        Value::Int(i) => {
            tag(out, 3, VARINT);
            varint(out, i as u64);
        }
    }
}

fn string(out: &mut Vec<u8>, field: u32, s: &str) {
    bytes(out, field, s.as_bytes());
}

/// A length-delimited field (bytes, string or message).
fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    tag(out, field, LEN);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn tag(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, u64::from(field) << 3 | u64::from(wire));
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    // One byte per started group of 7 bits; 0 takes one.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Bytes a length-delimited field 1..=15 of `len` bytes takes: tag, length, content.
fn field_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

#[cfg(test)]
mod tests;
