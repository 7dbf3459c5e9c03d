//! Answers the gateway makes itself: small JSON bodies with a stable `error` code.
//!
//! The codes are an API: clients and dashboards key on them, so they never change meaning.
//! Bodies are built once (static bytes); answering costs no allocation beyond the response.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

/// Why the gateway answered instead of the upstream. Each maps to a status and a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayError {
    /// No route rule matched (404).
    NoRoute,
    /// Declared body larger than `max_body_bytes` (413).
    BodyTooLarge,
    /// The request was malformed in a way hyper let through (400).
    BadRequest,
    /// Could not connect to any endpoint tried (502).
    UpstreamUnavailable,
    /// The upstream closed or reset the connection, or answered garbage (502).
    UpstreamReset,
    /// Connect or response-head timeout (504).
    UpstreamTimeout,
    /// The gateway is shutting down or not ready (503).
    Unavailable,
}

// === impl GatewayError ===

impl GatewayError {
    /// The stable code in the JSON body and the metric label.
    pub fn code(self) -> &'static str {
        match self {
            Self::NoRoute => "no_route",
            Self::BodyTooLarge => "body_too_large",
            Self::BadRequest => "bad_request",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::UpstreamReset => "upstream_reset",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::Unavailable => "unavailable",
        }
    }

    /// The HTTP status answered.
    pub fn status(self) -> StatusCode {
        match self {
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::UpstreamUnavailable | Self::UpstreamReset => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn body(self) -> &'static str {
        match self {
            Self::NoRoute => r#"{"error":"no_route"}"#,
            Self::BodyTooLarge => r#"{"error":"body_too_large"}"#,
            Self::BadRequest => r#"{"error":"bad_request"}"#,
            Self::UpstreamUnavailable => r#"{"error":"upstream_unavailable"}"#,
            Self::UpstreamReset => r#"{"error":"upstream_reset"}"#,
            Self::UpstreamTimeout => r#"{"error":"upstream_timeout"}"#,
            Self::Unavailable => r#"{"error":"unavailable"}"#,
        }
    }

    /// The full response.
    pub fn response(self) -> Response<Full<Bytes>> {
        json(self.status(), Bytes::from_static(self.body().as_bytes()))
    }
}

/// A JSON response with the given status and body.
pub fn json(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every body is valid JSON whose `error` is the code.
    #[test]
    fn bodies_are_json_with_code() {
        for e in [
            GatewayError::NoRoute,
            GatewayError::BodyTooLarge,
            GatewayError::BadRequest,
            GatewayError::UpstreamUnavailable,
            GatewayError::UpstreamReset,
            GatewayError::UpstreamTimeout,
            GatewayError::Unavailable,
        ] {
            let v: serde_json::Value = serde_json::from_str(e.body()).unwrap();
            assert_eq!(v["error"], e.code());
        }
    }
}
