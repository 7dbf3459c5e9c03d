//! How the gateway speaks to an upstream as written: `tls` (verified rustls client) and
//! `protocol` (HTTP/1.1 or HTTP/2).
//!
//! Plain serde types that reject unknown fields; `validate` checks them and `upstream`
//! compiles them into the [`UpstreamSpec`]. The files named here are read by the proxy
//! beside the config at every load and reload, never by this crate.
//!
//! [`UpstreamSpec`]: crate::upstream::UpstreamSpec

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// TLS to the upstream's endpoints. The server's certificate is always verified: there is
/// no switch to turn verification off, so a misconfigured trust store fails loudly
/// (502 `upstream_unavailable`, counted as `upstream_tls`) instead of silently forwarding
/// in the clear or to anyone.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// PEM file of the certificate authorities trusted for this upstream (relative to the
    /// config file). Default: the operating system's trust store. When given, only these
    /// authorities are trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// Name sent as SNI and checked against the certificate. Default: each endpoint's host
    /// as configured; an endpoint written as an IP address is checked against the
    /// certificate's IP addresses (and sends no SNI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// PEM file of the client certificate chain presented for mutual TLS (relative to the
    /// config file). Default: none. Given together with `client_key_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<String>,
    /// PEM file of the private key of `client_cert_file` (PKCS#8, PKCS#1 or SEC1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<String>,
}

/// The HTTP version spoken to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// HTTP/1.1 (ALPN `http/1.1` with `tls`).
    #[default]
    Http1,
    /// HTTP/2: with `tls` negotiated by ALPN `h2` (a server that does not agree fails the
    /// connection); without, prior knowledge (h2c). Requests share one multiplexed
    /// connection per endpoint; gRPC needs it.
    Http2,
}
