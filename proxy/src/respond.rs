//! Answers the gateway makes itself: small JSON bodies with a stable `error` code.
//!
//! The codes are an API: clients and dashboards key on them, so they never change meaning.
//! Bodies are built once (static bytes); answering costs no allocation beyond the response.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

use crate::jwt::TokenError;

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
    /// The TLS handshake with every endpoint tried failed: a certificate not trusted or
    /// not naming the server, a refused client certificate, or no HTTP/2 where `http2`
    /// was configured (502).
    UpstreamTls,
    /// The gateway is shutting down or not ready (503).
    Unavailable,
    /// A rate limit refused the request (429). The body also names the rule (built by the
    /// limit's `Rejection`).
    RateLimited,
    /// An open circuit breaker answered (503, unless the breaker sets another answer).
    CircuitOpen,
    /// Overload protection refused the request (503 with `Retry-After`): below the admission
    /// level, or no concurrency slot in time. See [`overloaded`].
    Overloaded,
    /// A `fail_closed` cluster-scope limit could not reach its store (Redis) in time (503).
    /// See [`limit_store_unavailable`].
    LimitStoreUnavailable,
    /// An upgrade request while `max_upgraded_connections` tunnels are open (503).
    UpgradeCapacity,
    /// An app or user ID longer than `identity.max_id_bytes`, with
    /// `identity.on_invalid: reject` (400).
    InvalidIdentity,
    /// No valid token where `identity.jwt` requires one (401 with `WWW-Authenticate`); the
    /// code says why (`token_expired`, ...).
    Unauthorized(TokenError),
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
            Self::UpstreamTls => "upstream_tls",
            Self::Unavailable => "unavailable",
            Self::RateLimited => "rate_limited",
            Self::CircuitOpen => "circuit_open",
            Self::Overloaded => "overloaded",
            Self::LimitStoreUnavailable => "limit_store_unavailable",
            Self::UpgradeCapacity => "upgrade_capacity",
            Self::InvalidIdentity => "invalid_identity",
            Self::Unauthorized(e) => e.code(),
        }
    }

    /// The HTTP status answered.
    pub fn status(self) -> StatusCode {
        match self {
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BadRequest | Self::InvalidIdentity => StatusCode::BAD_REQUEST,
            Self::UpstreamUnavailable | Self::UpstreamReset | Self::UpstreamTls => {
                StatusCode::BAD_GATEWAY
            }
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Unavailable
            | Self::CircuitOpen
            | Self::Overloaded
            | Self::LimitStoreUnavailable
            | Self::UpgradeCapacity => StatusCode::SERVICE_UNAVAILABLE,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
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
            Self::UpstreamTls => r#"{"error":"upstream_tls"}"#,
            Self::Unavailable => r#"{"error":"unavailable"}"#,
            Self::RateLimited => r#"{"error":"rate_limited"}"#,
            Self::CircuitOpen => r#"{"error":"circuit_open"}"#,
            Self::Overloaded => r#"{"error":"overloaded"}"#,
            Self::LimitStoreUnavailable => r#"{"error":"limit_store_unavailable"}"#,
            Self::UpgradeCapacity => r#"{"error":"upgrade_capacity"}"#,
            Self::InvalidIdentity => r#"{"error":"invalid_identity"}"#,
            Self::Unauthorized(e) => e.body(),
        }
    }

    /// The full response.
    pub fn response(self) -> Response<Full<Bytes>> {
        let mut r = json(self.status(), Bytes::from_static(self.body().as_bytes()));
        if let Self::Unauthorized(e) = self {
            // RFC 6750 §3: no error code when the request carried no token at all.
            let challenge = match e {
                TokenError::Missing => "Bearer",
                _ => r#"Bearer error="invalid_token""#,
            };
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        r
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

/// 503 for a `fail_closed` cluster-scope limit whose store did not answer:
/// `{"error":"limit_store_unavailable","rule":"NAME"}` with `Retry-After: 1`.
pub fn limit_store_unavailable(rule: &str) -> Response<Full<Bytes>> {
    let mut body = br#"{"error":"limit_store_unavailable","rule":"#.to_vec();
    serde_json::to_writer(&mut body, rule).expect("writing to a Vec");
    body.push(b'}');
    let mut r = json(GatewayError::LimitStoreUnavailable.status(), body.into());
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// 503 `{"error":"overloaded"}` with `Retry-After`: a static body and one header, so
/// refusing costs next to nothing.
pub fn overloaded(retry_after: &HeaderValue) -> Response<Full<Bytes>> {
    let mut r = GatewayError::Overloaded.response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, retry_after.clone());
    r
}

/// The gateway's own answer `resp` to a gRPC request, as gRPC: HTTP 200,
/// `content-type: application/grpc`, no message, and the status in `grpc-status` and
/// `grpc-message` of the head. That is gRPC over HTTP/2's trailers-only response (the head
/// ends the stream, so it is the trailers too), what a gRPC server sends for a call that
/// fails before any message; every gRPC client reads it as the call's status. Other
/// headers (`Retry-After`, `RateLimit`) are kept. `degraded`: answered by a fallback or an
/// open breaker, whose configured body means nothing to a gRPC client: `UNAVAILABLE`.
pub fn grpc<B>(resp: Response<B>, degraded: bool, empty: B) -> Response<B> {
    let (mut parts, _) = resp.into_parts();
    let (code, message) = grpc_status(parts.status, degraded);
    parts.status = StatusCode::OK;
    let h = &mut parts.headers;
    h.remove(header::CONTENT_LENGTH);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(
        HeaderName::from_static("grpc-status"),
        HeaderValue::from_static(code),
    );
    h.insert(
        HeaderName::from_static("grpc-message"),
        HeaderValue::from_static(message),
    );
    Response::from_parts(parts, empty)
}

/// The gRPC status (code and message) of a gateway answer with HTTP `status`. Limits and
/// body size are `RESOURCE_EXHAUSTED` (8); refusals that a retry elsewhere or later may
/// cure (overload, drain, an upstream that failed or timed out, a degraded answer) are
/// `UNAVAILABLE` (14); the rest follow gRPC's HTTP-to-gRPC mapping.
fn grpc_status(status: StatusCode, degraded: bool) -> (&'static str, &'static str) {
    if degraded {
        return (
            "14",
            "degraded: answered by a fallback or an open circuit breaker",
        );
    }
    match status.as_u16() {
        429 => ("8", "rate limited"),
        413 => ("8", "request body too large"),
        400 => ("13", "bad request"),
        401 => ("16", "unauthenticated"),
        403 => ("7", "permission denied"),
        404 => ("12", "no route"),
        502 => ("14", "upstream unavailable"),
        503 => ("14", "unavailable"),
        504 => ("14", "upstream timeout"),
        _ => ("2", "unknown"),
    }
}

/// A canned answer (fallback or open breaker), built at load time: cloning its body is a
/// reference-count bump.
pub fn canned(c: &rules::degrade::CompiledResponse) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(c.body.clone()));
    *r.status_mut() = c.status;
    let h = r.headers_mut();
    h.reserve(c.headers.len());
    for (k, v) in &c.headers {
        h.append(k.clone(), v.clone());
    }
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
            GatewayError::UpstreamTls,
            GatewayError::Unavailable,
            GatewayError::RateLimited,
            GatewayError::CircuitOpen,
            GatewayError::Overloaded,
            GatewayError::LimitStoreUnavailable,
            GatewayError::InvalidIdentity,
        ]
        .into_iter()
        .chain(TokenError::ALL.map(GatewayError::Unauthorized))
        {
            let v: serde_json::Value = serde_json::from_str(e.body()).unwrap();
            assert_eq!(v["error"], e.code());
        }
    }

    /// A gateway answer to a gRPC request becomes a trailers-only gRPC answer: 200,
    /// `application/grpc`, no body, the status by the answer's cause, other headers kept.
    #[test]
    fn grpc_answers() {
        let cases = [
            (GatewayError::RateLimited.response(), false, "8"),
            (GatewayError::BodyTooLarge.response(), false, "8"),
            (overloaded(&HeaderValue::from_static("1")), false, "14"),
            (GatewayError::CircuitOpen.response(), false, "14"),
            (GatewayError::UpstreamTls.response(), false, "14"),
            (GatewayError::UpstreamTimeout.response(), false, "14"),
            (GatewayError::NoRoute.response(), false, "12"),
            (
                GatewayError::Unauthorized(TokenError::Missing).response(),
                false,
                "16",
            ),
            // A fallback answering 200 with its JSON body: degraded, UNAVAILABLE.
            (json(StatusCode::OK, Bytes::from_static(b"{}")), true, "14"),
        ];
        for (resp, degraded, code) in cases {
            let was = resp.status();
            let retry = resp.headers().get(header::RETRY_AFTER).cloned();
            let g = grpc(resp, degraded, Full::default());
            assert_eq!(g.status(), StatusCode::OK, "{was}");
            let h = g.headers();
            assert_eq!(h[header::CONTENT_TYPE], "application/grpc");
            assert_eq!(h["grpc-status"], code, "{was} degraded={degraded}");
            assert!(h.contains_key("grpc-message"));
            assert!(!h.contains_key(header::CONTENT_LENGTH));
            assert_eq!(h.get(header::RETRY_AFTER), retry.as_ref(), "{was}");
            assert!(
                http_body::Body::is_end_stream(g.body()),
                "{was}: no message"
            );
        }
    }
}
