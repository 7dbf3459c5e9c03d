use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;

use super::*;

const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn headers(pairs: &[(&HeaderName, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in pairs {
        h.append(*n, HeaderValue::from_str(v).unwrap());
    }
    h
}

fn sampler(ratio: f64, parent: ParentSampled) -> Sampler {
    Sampler::new(ratio, parent)
}

/// The spec's example parses; every way of breaking it is refused.
#[test]
fn traceparent_parsed_per_spec() {
    let p = parse_traceparent(GOOD.as_bytes()).expect("valid");
    assert_eq!(p.trace_id[0], 0x4b);
    assert_eq!(p.span_id[7], 0xb7);
    assert!(p.sampled);
    let bad = [
        // Uppercase hex.
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        // All-zero trace ID, all-zero parent ID.
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        // Version ff; version 00 with trailing data; wrong lengths.
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        // Wrong separators, non-hex.
        "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        // A later version whose extra part is not set off by a dash.
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        "",
    ];
    for b in bad {
        assert_eq!(parse_traceparent(b.as_bytes()), None, "{b:?} was accepted");
    }
    // A later version may carry more fields: the first four are read.
    let future = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-what-the-future-holds";
    assert!(parse_traceparent(future.as_bytes()).is_some());
}

/// A valid parent is continued with a new span ID, and the upstream's `traceparent` names
/// the gateway's span; `tracestate` passes unchanged.
#[test]
fn continued_with_new_span() {
    let mut h = headers(&[
        (&TRACEPARENT, GOOD),
        (&TRACESTATE, "congo=t61rcWkgMzE, rojo=00f067aa0ba902b7"),
    ]);
    let s = sampler(0.0, ParentSampled::Any);
    let ctx = TraceContext::continue_or_start(&mut h, &s, false, 0, [7, 8, 9]);
    assert!(!h.contains_key(&TRACEPARENT), "the incoming one is gone");
    ctx.put(&mut h);
    let p = parse_traceparent(GOOD.as_bytes()).unwrap();
    assert_eq!(ctx.trace_id, p.trace_id);
    assert_eq!(ctx.parent_id, Some(p.span_id));
    assert_eq!(ctx.span_id, 9u64.to_be_bytes());
    assert!(ctx.sampled);
    assert_eq!(
        h[&TRACEPARENT],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000009-01"
    );
    assert_eq!(h[&TRACESTATE], "congo=t61rcWkgMzE, rojo=00f067aa0ba902b7");
}

/// Absent, invalid or repeated `traceparent`: a new trace, and the old `tracestate` gone.
#[test]
fn invalid_or_absent_starts_a_new_trace() {
    let s = sampler(1.0, ParentSampled::Any);
    for h in [
        headers(&[(&TRACESTATE, "a=b")]),
        headers(&[(&TRACEPARENT, &GOOD.to_uppercase()), (&TRACESTATE, "a=b")]),
        headers(&[
            (&TRACEPARENT, GOOD),
            (&TRACEPARENT, GOOD),
            (&TRACESTATE, "a=b"),
        ]),
    ] {
        let mut h = h;
        let ctx = TraceContext::continue_or_start(&mut h, &s, true, 0, [1, 2, 3]);
        assert!(!h.contains_key(&TRACEPARENT), "the incoming ones are gone");
        ctx.put(&mut h);
        assert_eq!(ctx.parent_id, None);
        assert_eq!(u128::from_be_bytes(ctx.trace_id), 1 << 64 | 2);
        assert!(ctx.sampled);
        assert!(!h.contains_key(&TRACESTATE));
        assert_eq!(h.get_all(&TRACEPARENT).iter().count(), 1);
        assert!(parse_traceparent(h[&TRACEPARENT].as_bytes()).is_some());
    }
    // Zero draws never make a zero ID.
    let mut h = HeaderMap::new();
    let ctx = TraceContext::continue_or_start(&mut h, &s, true, 0, [0, 0, 0]);
    ctx.put(&mut h);
    assert!(
        parse_traceparent(h[&TRACEPARENT].as_bytes()).is_some(),
        "{ctx:?}"
    );
}

/// The line written straight into an HTTP/1 head says what `put` would.
#[test]
fn header_line_matches_the_field() {
    let s = sampler(1.0, ParentSampled::Any);
    let mut h = headers(&[(&TRACEPARENT, GOOD)]);
    let ctx = TraceContext::continue_or_start(&mut h, &s, false, 0, [1, 2, 3]);
    ctx.put(&mut h);
    let mut buf = [0u8; TRACEPARENT_LINE_LEN];
    let line = ctx.header_line(&mut buf);
    let want = format!("traceparent: {}\r\n", h[&TRACEPARENT].to_str().unwrap());
    assert_eq!(line, want.as_bytes());
}

/// Whose `sampled` flag is followed: an untrusted client cannot switch sampling on (or off)
/// under `trusted_proxies`; the ratio is the gateway's draw.
#[test]
fn parent_flag_followed_only_as_configured() {
    let t = sampler(0.0, ParentSampled::TrustedProxies);
    assert!(t.decide(Some(true), true, u64::MAX));
    assert!(!t.decide(Some(true), false, 0));
    let half = sampler(0.5, ParentSampled::TrustedProxies);
    assert!(!half.decide(Some(true), false, u64::MAX - 1));
    assert!(half.decide(Some(false), false, 1));
    assert!(!half.decide(Some(false), true, 1));
    let never = sampler(0.0, ParentSampled::Never);
    assert!(!never.decide(Some(true), true, 0));
    let any = sampler(0.0, ParentSampled::Any);
    assert!(any.decide(Some(true), false, u64::MAX));
    assert!(sampler(1.0, ParentSampled::Never).decide(None, false, u64::MAX));
}

/// `tracestate` bounds: 32 members, 512 bytes, well-formed members; else dropped.
#[test]
fn tracestate_bounds() {
    let ok = |v: &str| tracestate_valid(&headers(&[(&TRACESTATE, v)]));
    assert!(ok("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"));
    assert!(ok("tenant@vendor=x, ,a=b"));
    let members: Vec<String> = (0..32).map(|i| format!("k{i}=v")).collect();
    assert!(ok(&members.join(",")));
    let members: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
    assert!(!ok(&members.join(",")));
    assert!(!ok(&format!("a={}", "x".repeat(511))));
    for bad in [
        "Upper=x", "a", "a=", "=b", "a=b=c", "a=b\tc", "@v=x", "t@=x", "a=\u{80}",
    ] {
        let h = HeaderMap::from_iter([(
            TRACESTATE.clone(),
            HeaderValue::from_bytes(bad.as_bytes()).unwrap(),
        )]);
        assert!(!tracestate_valid(&h), "{bad:?} was accepted");
    }
    // Several fields count together.
    let mut h = HeaderMap::new();
    for i in 0..2 {
        h.append(
            &TRACESTATE,
            HeaderValue::from_str(&format!("a{i}={}", "x".repeat(255))).unwrap(),
        );
    }
    assert!(!tracestate_valid(&h));
    // Invalid tracestate is removed while the trace continues.
    let mut h = headers(&[(&TRACEPARENT, GOOD), (&TRACESTATE, "BAD")]);
    let ctx = TraceContext::continue_or_start(
        &mut h,
        &sampler(0.0, ParentSampled::Any),
        false,
        0,
        [1, 2, 3],
    );
    assert!(ctx.parent_id.is_some());
    assert!(!h.contains_key(&TRACESTATE));
}

proptest! {
    /// Anything a client sends: no panic, and what is accepted formats back to the same
    /// IDs (so what is forwarded is always valid version-00).
    #[test]
    fn parser_total(v in proptest::collection::vec(any::<u8>(), 0..80)) {
        if let Some(p) = parse_traceparent(&v) {
            let ctx = TraceContext { trace_id: p.trace_id, span_id: p.span_id, parent_id: None, sampled: p.sampled };
            let mut buf = [0u8; 55];
            let back = parse_traceparent(ctx.format(&mut buf)).expect("formats valid");
            prop_assert_eq!(back, p);
        }
    }

    /// Valid inputs round-trip.
    #[test]
    fn valid_round_trip(t in 1u128.., s in 1u64.., sampled: bool) {
        let ctx = TraceContext { trace_id: t.to_be_bytes(), span_id: s.to_be_bytes(), parent_id: None, sampled };
        let mut buf = [0u8; 55];
        let p = parse_traceparent(ctx.format(&mut buf)).expect("valid");
        prop_assert_eq!((p.trace_id, p.span_id, p.sampled), (ctx.trace_id, ctx.span_id, sampled));
    }
}

#[test]
fn hex_digits_match_the_formatter() {
    use rand::{Rng, SeedableRng, rngs::StdRng};
    let mut rng = StdRng::seed_from_u64(16);
    for len in [0usize, 1, 2, 3, 4, 5, 8, 9, 16] {
        for _ in 0..200 {
            let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let mut out = vec![0u8; 2 * len];
            super::hex_into(&bytes, &mut out);
            let want: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(std::str::from_utf8(&out).unwrap(), want);
        }
    }
    let mut out = [0u8; 8];
    super::hex_into(&[0x00, 0x9a, 0xf0, 0xff], &mut out);
    assert_eq!(&out, b"009af0ff");
}
