//! Verified identity, compiled: what the gateway needs to find and judge a request's token
//! (`identity.jwt`) and which claims become the app and user IDs.
//!
//! The rules stay pure: the keys (a JWKS file) are read and checked by the gateway, which
//! also owns the clock; this is the part of the config that says how.
//!
//! A claim extractor (`"user": {"claim": "sub"}`) classifies by a header the gateway itself
//! writes after verification (`user_header`, default `x-user-id`), dropping every copy the
//! client sent: classification, limits, the access log and the upstream all read the same
//! verified value.

use http::HeaderName;

/// Signature algorithms a config may allow, by their JOSE names. `none` is not one.
pub const ALGORITHMS: [&str; 12] = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA", "HS256",
    "HS384", "HS512",
];

/// Where a request's token is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer <token>`.
    Bearer,
    /// A cookie of this name.
    Cookie(Box<str>),
}

/// A claim that gives an ID, and the header it is forwarded in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimHeader {
    /// The claim (a string claim: `sub`, `azp`, any other).
    pub claim: Box<str>,
    /// The header the gateway sets from it (and classifies by).
    pub header: HeaderName,
}

/// `identity.jwt`, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledJwt {
    /// The JWKS file, as written (relative to the config file).
    pub jwks_file: Box<str>,
    /// Where the token is.
    pub from: TokenSource,
    /// Allowed algorithms, by JOSE name (each one of [`ALGORITHMS`]).
    pub algorithms: Vec<Box<str>>,
    /// Accepted issuers (`iss`); empty: not checked.
    pub issuers: Vec<String>,
    /// Accepted audiences (`aud`); empty: not checked.
    pub audiences: Vec<String>,
    /// Clock leeway for `exp` and `nbf`, in seconds.
    pub leeway_s: u64,
    /// Whether a request without a valid token is refused (else it is anonymous).
    pub required: bool,
    /// Longest token accepted, in bytes.
    pub max_token_bytes: usize,
    /// Verified tokens remembered.
    pub cache_entries: usize,
    /// The user ID's claim and header, when `identity.user` reads a claim.
    pub user: Option<ClaimHeader>,
    /// The app ID's claim and header, when `identity.app` reads a claim.
    pub app: Option<ClaimHeader>,
}
