//! The writer against the reference: `opentelemetry-proto`'s generated types, built from
//! the same records the way the OTLP spec reads, decoded from what the writer wrote.

use std::sync::Arc;

use http::HeaderValue;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, InstrumentationScope, KeyValue, any_value::Value,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode,
};
use prost::Message as _;
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::{Encoder, SpanRecord};
use crate::metrics::Name;

fn reference(service: &str, spans: &[SpanRecord]) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", Value::StringValue(service.into()))],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "tidegate".to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ..Default::default()
                }),
                spans: spans.iter().map(span).collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn span(r: &SpanRecord) -> Span {
    let interface = r.interface.as_ref().map_or("none", |n| &*n.0);
    let method = r.method.as_ref().map_or("", http::Method::as_str);
    let s = |v: &str| Value::StringValue(v.to_owned());
    let mut attributes = vec![
        kv("http.request.method", s(method)),
        kv(
            "http.response.status_code",
            Value::IntValue(r.status.into()),
        ),
        kv("tidegate.interface", s(interface)),
        kv("tidegate.decision", s(r.decision)),
        kv("tidegate.identity", s(r.identity)),
        kv(
            "tidegate.request_id",
            s(r.request_id.to_str().unwrap_or("-")),
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
            attributes.push(kv(k, s(v)));
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
        flags: 0x01,
        name: if method.is_empty() {
            interface.to_owned()
        } else {
            format!("{method} {interface}")
        },
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

fn kv(key: &str, v: Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(v) }),
    }
}

fn record(rng: &mut StdRng) -> SpanRecord {
    // Lengths around the varint boundaries (127/128, 16383/16384) as well as short ones.
    let text = |rng: &mut StdRng| -> String {
        let len = match rng.random_range(0..4) {
            0 => rng.random_range(0..20),
            1 => rng.random_range(120..140),
            2 => rng.random_range(16_370..16_400),
            _ => rng.random_range(0..400),
        };
        (0..len)
            .map(|_| char::from(rng.random_range(0x20u8..0x7f)))
            .collect()
    };
    let opt = |rng: &mut StdRng| {
        let s = text(rng);
        rng.random_bool(0.7).then_some(s)
    };
    let name = |s: String| Name(Arc::from(s));
    let methods = [http::Method::GET, http::Method::POST, http::Method::DELETE];
    let start: u64 = rng.random();
    let r = SpanRecord {
        trace_id: rng.random(),
        span_id: rng.random(),
        parent_id: rng.random_bool(0.5).then(|| rng.random()),
        start_unix_ns: start,
        end_unix_ns: start.wrapping_add(rng.random_range(0..u64::from(u32::MAX))),
        method: rng
            .random_bool(0.9)
            .then(|| methods[rng.random_range(0..methods.len())].clone()),
        status: [200, 204, 429, 499, 500, 503, 599][rng.random_range(0..7)],
        request_id: HeaderValue::from_str(&text(rng)).unwrap(),
        interface: None,
        app: None,
        route: None,
        upstream: None,
        decision: ["forward", "limited", "shed", "no_route"][rng.random_range(0..4)],
        rule: None,
        identity: ["none", "verified", "unverified"][rng.random_range(0..3)],
    };
    SpanRecord {
        interface: opt(rng).map(name),
        app: opt(rng),
        route: opt(rng).map(Arc::from),
        upstream: opt(rng).map(name),
        rule: opt(rng).map(Arc::from),
        ..r
    }
}

fn same_as_reference(service: &str, spans: Vec<SpanRecord>) {
    let want = reference(service, &spans);
    let mut got = bytes::BytesMut::new();
    Encoder::new(service).encode(spans.into_iter(), &mut got);
    let decoded = ExportTraceServiceRequest::decode(&got[..]).expect("the writer's bytes decode");
    assert!(decoded == want, "decoded {decoded:#?}\nwant {want:#?}");
    // Byte for byte too: the writer puts fields in prost's order.
    assert!(got[..] == want.encode_to_vec()[..], "the bytes differ");
}

#[test]
fn an_empty_batch_and_a_bare_span() {
    same_as_reference("tidegate", vec![]);
    same_as_reference(
        "",
        vec![SpanRecord {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_id: None,
            start_unix_ns: 0,
            end_unix_ns: 1,
            method: None,
            status: 503,
            request_id: HeaderValue::from_static("r-1"),
            interface: None,
            app: None,
            route: None,
            upstream: None,
            decision: "shed",
            rule: None,
            identity: "none",
        }],
    );
}

#[test]
fn random_batches_match_the_reference() {
    let mut rng = StdRng::seed_from_u64(0x07e1);
    for round in 0..300 {
        let n = [0, 1, 2, 7, 40][round % 5];
        let spans = (0..n).map(|_| record(&mut rng)).collect();
        let service: String = (0..rng.random_range(0..200)).map(|_| 'x').collect();
        same_as_reference(&service, spans);
    }
}

#[test]
fn an_encoder_reused_across_batches_starts_each_afresh() {
    let mut rng = StdRng::seed_from_u64(7);
    let mut encoder = Encoder::new("svc");
    let mut out = bytes::BytesMut::new();
    for n in [40, 3, 0, 17] {
        let spans: Vec<_> = (0..n).map(|_| record(&mut rng)).collect();
        let want = reference("svc", &spans).encode_to_vec();
        encoder.encode(spans.into_iter(), &mut out);
        assert!(out.split()[..] == want[..], "batch of {n} differs");
    }
}
