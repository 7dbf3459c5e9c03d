//! gRPC passing through: what makes a request gRPC, and the count of the statuses upstreams
//! answer with (`tidegate_grpc_status_total`).
//!
//! A gRPC status travels in `grpc-status`: in the trailers after the messages, or in the
//! head of a trailers-only answer (an error with no message). Both are counted; the body
//! itself is streamed untouched and its trailers passed on.

use std::sync::OnceLock;

use http::{HeaderMap, HeaderName, header};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::metrics::{GrpcStatusLabels, Name};

/// `grpc-status`.
pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// `grpc-message`.
pub static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// The 17 gRPC status codes by number, and the label of a value outside them.
const CODES: [&str; 18] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
    "unknown",
];

/// An upstream's `tidegate_grpc_status_total` series, each made on its first use (an
/// upstream that never answers gRPC exports none).
#[derive(Debug)]
pub struct StatusCounts {
    family: Family<GrpcStatusLabels, Counter>,
    upstream: Name,
    series: [OnceLock<Counter>; 18],
}

/// Whether a request or response is gRPC (`content-type: application/grpc`, or a subtype
/// such as `application/grpc+proto`).
pub fn is_grpc(h: &HeaderMap) -> bool {
    rules::classify::field(h, &header::CONTENT_TYPE).is_some_and(|v| is_grpc_type(v.as_bytes()))
}

/// Whether a `Content-Type` value is gRPC's.
pub fn is_grpc_type(v: &[u8]) -> bool {
    v.len() >= 16
        && v[..16].eq_ignore_ascii_case(b"application/grpc")
        && matches!(v.get(16), None | Some(b'+' | b';'))
}

/// The index in [`CODES`] of a `grpc-status` value: its code, or the last for anything
/// that is not a decimal code 0..=16.
fn index(v: &[u8]) -> usize {
    match v {
        [d @ b'0'..=b'9'] => usize::from(d - b'0'),
        [b'1', d @ b'0'..=b'6'] => 10 + usize::from(d - b'0'),
        _ => CODES.len() - 1,
    }
}

// === impl StatusCounts ===

impl StatusCounts {
    /// The series of `upstream` in `family`.
    pub fn new(family: &Family<GrpcStatusLabels, Counter>, upstream: Name) -> Self {
        Self {
            family: family.clone(),
            upstream,
            series: Default::default(),
        }
    }

    /// Count the `grpc-status` in `h`, if there is one; whether there was.
    pub fn count(&self, h: &HeaderMap) -> bool {
        let Some(v) = h.get(&GRPC_STATUS) else {
            return false;
        };
        let i = index(v.as_bytes());
        self.series[i]
            .get_or_init(|| {
                self.family
                    .get_or_create(&GrpcStatusLabels {
                        upstream: self.upstream.clone(),
                        code: CODES[i],
                    })
                    .clone()
            })
            .inc();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Codes 0..=16 by name; anything else (17, a sign, spaces, text) is `unknown`.
    #[test]
    fn codes() {
        assert_eq!(CODES[index(b"0")], "OK");
        assert_eq!(CODES[index(b"5")], "NOT_FOUND");
        assert_eq!(CODES[index(b"8")], "RESOURCE_EXHAUSTED");
        assert_eq!(CODES[index(b"14")], "UNAVAILABLE");
        assert_eq!(CODES[index(b"16")], "UNAUTHENTICATED");
        for bad in [&b"17"[..], b"-1", b" 0", b"", b"OK", b"007"] {
            assert_eq!(CODES[index(bad)], "unknown", "{bad:?}");
        }
    }

    /// `application/grpc` and its subtypes are gRPC; look-alikes are not.
    #[test]
    fn content_types() {
        let h = |v: &'static str| {
            let mut m = HeaderMap::new();
            m.insert(header::CONTENT_TYPE, http::HeaderValue::from_static(v));
            m
        };
        assert!(is_grpc(&h("application/grpc")));
        assert!(is_grpc(&h("application/grpc+proto")));
        assert!(is_grpc(&h("Application/GRPC;charset=x")));
        assert!(!is_grpc(&h("application/grpc-web")));
        assert!(!is_grpc(&h("application/grpcx")));
        assert!(!is_grpc(&h("application/json")));
        assert!(!is_grpc(&HeaderMap::new()));
    }
}
