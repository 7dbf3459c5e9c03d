//! The config file as written by operators: plain serde types, one per JSON object.
//!
//! Every struct rejects unknown fields (a typo must fail the load, not silently switch a rule
//! off) and documents its unit and default. Nothing here is trusted yet: `validate`
//! checks ranges and references, reports every problem at once, and turns a valid config into
//! the typed parts of the indexed snapshot the request path reads.
//!
//! The file has two halves. `server` is *bootstrap*: listeners, TLS files, the admin address
//! and connection limits, read once at start-up (a change needs a restart). Everything else
//! (`identity`, `interfaces`, `upstreams`, `routes`) is *rules*, which later reloads replace as
//! one snapshot.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod cache;
mod freeze;
mod govern;
mod health;
mod matching;
mod overload;
mod ramp;
mod tracing;
mod upstream_tls;

pub use cache::Cache;
pub use freeze::{FREEZE_SECTIONS, Freeze, parse_time};
pub use govern::{
    Breaker, Condition, Fallback, KeyPart, Limit, LimitMode, LimitScope, LocalResponse,
    OnStoreError, Plan, RuleMode, Trigger, WhenMissing,
};
pub use health::{HealthCheck, Outlier};
pub use matching::{BucketRangeSpec, Match, NoUserKey};
pub use overload::{Adaptive, Admission, InterfaceOverload, Overload, Priority, UpstreamOverload};
pub use ramp::{Guard, OnBreach, Ramp, Stop};
pub use tracing::{ParentSampled, Tracing};
pub use upstream_tls::{Protocol, UpstreamTls};

/// The only `schema_version` this build understands.
pub const SCHEMA_VERSION: u32 = 1;

/// Data directory of an `embedded` upstream that does not name one.
pub const DEFAULT_EMBEDDED_DATA_DIR: &str = "data/grab";

/// A whole Tidegate config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Format version of this file. Must be `1`; a file written for a newer Tidegate is
    /// refused rather than half-understood.
    pub schema_version: u32,
    /// Bootstrap settings: read at start-up only.
    #[serde(default)]
    pub server: Server,
    /// Where the app ID and user ID of each request come from.
    #[serde(default)]
    pub identity: Identity,
    /// Named interfaces: a method and a path template each (`POST /envelopes/{id}/grab` is
    /// `grab`). Requests matching none are classified with no interface.
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    /// Upstream clusters by name.
    pub upstreams: BTreeMap<String, Upstream>,
    /// Route rules: which upstream a request goes to. Required; an empty list is refused
    /// unless `allow_empty_routes` is set, because "no rules" is far more often a broken
    /// edit than an intention.
    pub routes: Vec<Route>,
    /// A directory of rules fragments (`*.json`, by file name order) merged into this config:
    /// each may hold `interfaces`, `upstreams`, `routes`, `limits`, `fallbacks`, `plans` and
    /// `breakers`. Relative to this file's directory. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_dir: Option<String>,
    /// Accept an empty `routes` list (every request then answers 404 `no_route`).
    /// Default: false.
    #[serde(default)]
    pub allow_empty_routes: bool,
    /// Rate limit rules; every matching one applies. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<Limit>,
    /// Fallback rules: answer matching requests locally. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<Fallback>,
    /// Emergency plans by name: sets of limit and fallback overrides. Default: none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub plans: BTreeMap<String, Plan>,
    /// The plans in force, applied in order (`["peak"]`). Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub active_plans: Vec<String>,
    /// Circuit breakers on upstreams. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub breakers: Vec<Breaker>,
    /// Overload protection: concurrency caps, adaptive limits and priority admission.
    /// Default: off. Main file only (like `active_plans`), so switching it is a one-file edit.
    #[serde(default, skip_serializing_if = "is_default_overload")]
    pub overload: Overload,
    /// A change freeze: a window during which a reload may change only what it lists as
    /// editable. Default: none. Main file only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze: Option<Freeze>,
}

fn is_default_tracing(t: &Tracing) -> bool {
    *t == Tracing::default()
}

fn is_http1(p: &Protocol) -> bool {
    *p == Protocol::Http1
}

fn is_default_overload(o: &Overload) -> bool {
    *o == Overload::default()
}

/// Bootstrap settings (not hot-reloadable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// Traffic listeners. Default: one plain listener on `127.0.0.1:8080`.
    #[serde(default = "default_listeners")]
    pub listeners: Vec<Listener>,
    /// The admin listener (health, readiness, metrics). Default: `127.0.0.1:9901`.
    #[serde(default)]
    pub admin: Admin,
    /// Protective limits applied to every downstream connection.
    #[serde(default)]
    pub limits: ConnLimits,
    /// How long a graceful shutdown (SIGTERM/SIGINT) waits for in-flight requests, in
    /// milliseconds. Default: 10000. Range: 0..=600000.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// The per-request access log.
    #[serde(default)]
    pub access_log: AccessLog,
    /// Trace context propagation (W3C `traceparent`/`tracestate`) and the gateway's
    /// spans. Default: propagation on, 10% of new traces sampled.
    #[serde(default, skip_serializing_if = "is_default_tracing")]
    pub tracing: Tracing,
    /// The Redis that cluster-scope limits count in. Default: none (every limit must then
    /// be `scope: local`). Bootstrap: changing it needs a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSettings>,
    /// Proxies (CIDRs, IPv4 or IPv6: `"10.0.0.0/8"`, `"2001:db8::/32"`; a bare IP is one
    /// address) whose `X-Forwarded-For` the gateway believes. A request from one is governed
    /// and logged under the right-most `X-Forwarded-For` entry that is not itself trusted;
    /// from any other peer, under the peer's address, and the client's forwarding headers
    /// are replaced. Default: none (no peer is trusted). Unlike the rest of `server`, a
    /// reload applies a change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<String>,
    /// The gateway's own state directory; the history of applied configs is kept in its
    /// `history/` folder. A relative path is resolved against the config file's directory.
    /// Default: `data/tidegate`.
    #[serde(default = "default_data_dir")]
    pub data_dir: String,
    /// How many applied configs the history keeps (`GET /admin/config/history`,
    /// `tidegate rollback`); the oldest are removed. 0 keeps none. Default: 20. Range:
    /// 0..=1000.
    #[serde(default = "default_history_keep")]
    pub history_keep: u32,
}

/// Connection to the Redis shared by every gateway (cluster-scope limits).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]`. TLS (`rediss://`) is not built in.
    pub url: String,
    /// Longest a request waits for Redis, in milliseconds; past it the limit's
    /// `on_store_error` decides. Also the connect timeout. Default: 50. Range: 1..=5000.
    /// Keep it small: it is added to the latency of every request that has to refill a
    /// lease while Redis is slow.
    #[serde(default = "default_redis_timeout_ms")]
    pub timeout_ms: u64,
    /// How much of a key's rate one lease takes, in milliseconds of that rate: a gateway
    /// asks Redis for `ceil(rate × lease_ms)` tokens at once (at least 1, at most the burst)
    /// and spends them locally, and leased tokens it has not spent after `lease_ms` are
    /// dropped. Larger leases mean fewer Redis calls and a coarser limit. Default: 100.
    /// Range: 1..=10000.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
}

fn default_redis_timeout_ms() -> u64 {
    50
}
fn default_lease_ms() -> u64 {
    100
}

/// One traffic listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// A name for logs and metrics. Default: the address.
    #[serde(default)]
    pub name: Option<String>,
    /// `IP:port` to bind, for example `0.0.0.0:8443`. Port 0 picks a free port.
    pub address: String,
    /// Serve TLS (rustls; ALPN h2 and http/1.1; TLS 1.2 minimum). Absent: plain HTTP/1.1
    /// and prior-knowledge HTTP/2 (h2c) on the same port.
    #[serde(default)]
    pub tls: Option<Tls>,
}

/// TLS certificate and key files for a listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// PEM file with the certificate chain, leaf first.
    pub cert_path: String,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_path: String,
}

/// The admin listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// `IP:port` to bind. Default: `127.0.0.1:9901`. An address other than loopback
    /// requires `token_file`.
    #[serde(default = "default_admin_address")]
    pub address: String,
    /// Further `Host` header values the admin port answers (`admin.internal`,
    /// `admin.internal:9901`), besides its own bound `IP:port`, `localhost`, `127.0.0.1`
    /// and `[::1]` (each with or without a port). Any other `Host` gets 403
    /// `forbidden_host`, which defeats DNS rebinding. Compared case-insensitively.
    /// Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_hosts: Vec<String>,
    /// Most admin connections open at once; beyond it new connections wait in the kernel's
    /// accept queue. Separate from `server.limits.max_connections`. Default: 64.
    /// Range: 1..=10000.
    #[serde(default = "default_admin_max_connections")]
    pub max_connections: u32,
    /// A file holding the admin bearer token (surrounding whitespace ignored; at least 16
    /// bytes), relative to this config file's directory. When set, every admin endpoint
    /// but `/healthz` and `/readyz` requires `Authorization: Bearer <token>`. Required
    /// when `address` is not loopback. Read at start-up. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
}

/// Limits that protect the gateway from slow, large or numerous clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConnLimits {
    /// Time a client has to send the complete request head, in milliseconds: from accept for
    /// a connection's first request (TLS handshake and HTTP/2 preface included), from the
    /// start of each later HTTP/1 head. An absolute deadline, not reset by each byte.
    /// Default: 10000. Range: 100..=300000.
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// Most bytes of request head (request line + headers) accepted. Default: 65536.
    /// Range: 4096..=1048576.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: u32,
    /// Most request header fields accepted. Default: 100. Range: 8..=1000.
    #[serde(default = "default_max_headers")]
    pub max_headers: u32,
    /// Largest request body forwarded, in bytes; larger ones answer 413. Default: 67108864
    /// (64 MiB). Range: 0..=17179869184.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// HTTP/2 streams a client may have open at once. Default: 256. Range: 1..=10000.
    #[serde(default = "default_h2_max_concurrent_streams")]
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 streams reset by the client but not yet processed before the connection is
    /// closed (rapid-reset protection). Default: 32. Range: 1..=10000.
    #[serde(default = "default_h2_max_pending_reset_streams")]
    pub h2_max_pending_reset_streams: u32,
    /// A keep-alive connection with no request in flight is closed after this many
    /// milliseconds. Default: 60000. Range: 100..=3600000.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Most downstream connections open at once over all listeners; beyond it new
    /// connections wait in the kernel's accept queue. Default: 10000. Range: 1..=1000000.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Most upgraded connections (tunnels: WebSocket and the other protocols a route's
    /// `upgrade` allows) open at once over all listeners. An upgraded connection no longer
    /// counts against `max_connections`; this cap bounds the sockets and tasks tunnels
    /// hold. Over it an upgrade request is answered 503 `upgrade_capacity` before it is
    /// forwarded. 0 refuses every upgrade. Default: 1024. Range: 0..=1000000.
    #[serde(default = "default_max_upgraded_connections")]
    pub max_upgraded_connections: u32,
    /// An upgraded connection that moves no byte in either direction for this many
    /// milliseconds is closed, both sides. Protocols that stay open while quiet should
    /// send pings more often (WebSocket ping frames count as bytes). Default: 60000.
    /// Range: 100..=86400000.
    #[serde(default = "default_upgrade_idle_timeout_ms")]
    pub upgrade_idle_timeout_ms: u64,
}

/// The access log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccessLog {
    /// Write one line per request. Default: false (the hot path then skips formatting).
    #[serde(default)]
    pub enabled: bool,
    /// `json` (one JSON object per line) or `text`. Default: `json`.
    #[serde(default)]
    pub format: LogFormat,
}

/// Access log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// Human-readable `key=value` text.
    Text,
}

/// Where each part of a request's identity is read from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// The app ID. Default: header `x-app-id`.
    #[serde(default = "default_app_extractor")]
    pub app: Extractor,
    /// The user ID. Default: header `x-user-id` (the header the grab backend reads).
    #[serde(default = "default_user_extractor")]
    pub user: Extractor,
    /// Longest app or user ID accepted, in bytes; a longer one is invalid (see
    /// `on_invalid`) and is never logged. Default: 128. Range: 1..=4096.
    #[serde(default = "default_max_id_bytes")]
    pub max_id_bytes: u32,
    /// What an invalid (too long) app or user ID means: `anonymous` (the default: the
    /// request is treated as having no such ID, so it is bucketed and limited like any
    /// request without one) or `reject` (400 `invalid_identity`).
    #[serde(default)]
    pub on_invalid: OnInvalidId,
    /// Verified identity: the token every request is checked for, and the keys and claims
    /// that make it valid. An extractor `{"claim": "sub"}` reads a verified claim; the
    /// gateway forwards it in `user_header`/`app_header`, dropping client-sent copies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<Jwt>,
}

/// `identity.jwt`: where the token is and what makes it valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Jwt {
    /// The verification keys: a JWKS file (`{"keys": [...]}`), relative to the config file.
    /// Read with the config on every reload; keys rotate by editing it.
    pub jwks_file: String,
    /// Where the token is: `"bearer"` (`Authorization: Bearer <token>`, the default) or
    /// `{"cookie": "NAME"}`.
    #[serde(default)]
    pub from: TokenFrom,
    /// Accepted `alg` values: RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA,
    /// HS256, HS384, HS512. A token's `alg` must also be one its key is for.
    pub algorithms: Vec<String>,
    /// Accepted issuers (`iss`); when set, `iss` is required. Default: not checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub issuers: Vec<String>,
    /// Accepted audiences (`aud`); when set, `aud` is required. Default: not checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// Clock leeway for `exp` and `nbf`, in seconds. Default: 30. Range: 0..=300.
    #[serde(default = "default_leeway_s")]
    pub leeway_s: u64,
    /// `true` (the default): a request without a valid token is refused with 401.
    /// `false`: it is anonymous (no verified IDs; client-sent copies are still dropped).
    #[serde(default = "default_true")]
    pub required: bool,
    /// Longest token accepted, in bytes, checked before decoding. Default: 8192. Range:
    /// 128..=65536.
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: u32,
    /// Verified tokens remembered (never past their `exp`). Default: 65536; 0 turns the
    /// cache off. At most 4194304.
    #[serde(default = "default_cache_entries")]
    pub cache_entries: u32,
    /// The header the verified user ID is forwarded (and classified) in. Default:
    /// `x-user-id`.
    #[serde(default = "default_user_header")]
    pub user_header: String,
    /// The header the verified app ID is forwarded (and classified) in. Default: `x-app-id`.
    #[serde(default = "default_app_header")]
    pub app_header: String,
}

/// Where a request's token is.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TokenFrom {
    /// `Authorization: Bearer <token>`.
    #[default]
    Bearer,
    /// A cookie of this name.
    Cookie(String),
}

/// What a request with an invalid app or user ID becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnInvalidId {
    /// Treated as having no such ID.
    #[default]
    Anonymous,
    /// Refused: 400 `invalid_identity`.
    Reject,
}

/// Where one value is taken from. Exactly one key: `{"header": "x-app-id"}`,
/// `{"query": "uid"}`, `{"cookie": "uid"}` or `{"path_param": "app"}`. A missing value is
/// "none", never an empty string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Extractor {
    /// A request header (case-insensitive name).
    Header(String),
    /// A query-string parameter (exact name; the value is percent-decoded).
    Query(String),
    /// A cookie from the `Cookie` header (exact name).
    Cookie(String),
    /// A `{name}` parameter of the matched interface's path template.
    PathParam(String),
    /// A string claim of the verified token (`sub`, `azp`, any other); needs
    /// `identity.jwt`.
    Claim(String),
}

/// A named interface: method + path template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    /// Unique name, used in rules, metrics and logs (`grab`).
    pub name: String,
    /// HTTP method (`GET`, `POST`, ...), or `*` for any.
    pub method: String,
    /// Path template: literal segments and `{param}` segments, for example
    /// `/envelopes/{id}/grab`. Must start with `/`.
    pub path: String,
    /// A short-lived cache of its answers, with request coalescing (method `GET`, `HEAD`
    /// or `*`). Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<Cache>,
}

/// An upstream cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// `static` (the default: the `endpoints` listed) or `embedded` (the bundled grab
    /// backend, hosted in-process on a loopback port the gateway picks).
    #[serde(default)]
    pub kind: UpstreamKind,
    /// `IP:port` or `host:port` of each endpoint (`static` only). Names are resolved at
    /// load time and again every `resolve_ttl_ms` in the background, never per request.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// How requests are spread over endpoints. Default: `round_robin`.
    #[serde(default)]
    pub balance: Balance,
    /// Time to establish a TCP connection, in milliseconds; a failure tries the next
    /// endpoint once, then answers 502. Default: 1000. Range: 1..=60000.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time from sending the request to receiving the response head, in milliseconds;
    /// beyond it the client gets 504. Default: 30000. Range: 1..=3600000.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Longest wait for the next piece of a response body once its head has arrived, in
    /// milliseconds; an upstream that stalls longer has the response aborted (the client
    /// sees the connection cut, since the status is already sent) and its connection
    /// closed. Default: 30000. Range: 1..=3600000.
    #[serde(default = "default_read_timeout_ms")]
    pub read_timeout_ms: u64,
    /// Idle pooled connections kept per endpoint. Default: 256. Range: 0..=100000.
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle_per_endpoint: u32,
    /// Data directory of an `embedded` upstream. Default: `data/grab`.
    #[serde(default)]
    pub data_dir: Option<String>,
    /// Active health checks of the endpoints. Default: none (no active checks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Passive outlier ejection of endpoints whose exchanges keep failing. Default: on,
    /// with the settings [`Outlier`] documents.
    #[serde(default)]
    pub outlier: Outlier,
    /// How often endpoint host names are resolved again, in milliseconds (endpoints written
    /// as IP addresses are never resolved). A failed resolution keeps the last good address.
    /// Default: 30000. Range: 100..=86400000.
    #[serde(default = "health::default_resolve_ttl_ms")]
    pub resolve_ttl_ms: u64,
    /// TLS to the endpoints (`static` only), certificates always verified. Default: none
    /// (cleartext).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
    /// `http1` (the default) or `http2` (`static` only): prior knowledge without `tls`,
    /// ALPN `h2` with it.
    #[serde(default, skip_serializing_if = "is_http1")]
    pub protocol: Protocol,
}

/// Kind of upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamKind {
    /// Endpoints listed in `endpoints`.
    #[default]
    Static,
    /// The bundled grab backend, run inside the gateway process.
    Embedded,
}

/// Load-balancing policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Each endpoint in turn.
    #[default]
    RoundRobin,
    /// The endpoint with the fewest requests in flight (ties: the next in turn).
    LeastOutstanding,
}

/// A route rule: which requests it matches and where they go.
///
/// Exactly one of `upstream` (all matching requests go there) or `split` (weighted, sticky
/// per user) is given. For a split, the order of decisions is: the `override_header` (when
/// enabled and naming one of the split's targets), then the `whitelist`, then the user's
/// bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Unique rule name (logs, metrics, `explain`).
    pub name: String,
    /// What the request must look like. Absent or `{}`: every request (the default route).
    #[serde(default, rename = "match")]
    pub matcher: Match,
    /// The upstream requests go to (when there is no `split`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// A weighted split: targets take contiguous ranges of the 1,000,000 user buckets in the
    /// order listed. Weights must sum to exactly 100%, or one target says `"rest"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<Vec<SplitTarget>>,
    /// Salt of this rule's user buckets. Default: the rule name, so independent rules place
    /// users independently. Keep it when renaming a rule, or users move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub salt: Option<String>,
    /// Users and apps pinned to a target, before the split (internal gray release).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub whitelist: Vec<Pin>,
    /// A request header whose value, when it names one of the split's targets, sends the
    /// request there (for testers: `"x-canary"` with `x-canary: grab-v2`). Default: none
    /// (disabled), because anyone can send a header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub override_header: Option<String>,
    /// Client addresses (CIDRs, as `server.trusted_proxies` writes them) whose
    /// `override_header` is honoured: testers' office or VPN ranges. Empty (the default):
    /// anyone's, which lets any client choose its target; `tidegate check` warns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub override_from: Vec<String>,
    /// What a request without a user ID is bucketed by: `"client_ip"` (the default),
    /// `"random"` (a fresh draw per request), or `{"header": "x-device-id"}` (falling back
    /// to the client IP when that header is absent). Never one shared bucket.
    #[serde(default)]
    pub no_user_key: NoUserKey,
    /// A candidate split, evaluated but never used (shadow mode): for each request the
    /// split would place (not one sent by `override_header` or the `whitelist`), the
    /// upstream it would choose is compared with the real one, and a difference is counted
    /// in `tidegate_shadow_split_total{route, from, to}`. Same form and checks as `split`;
    /// allowed beside `upstream` or `split`. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_split: Option<Vec<SplitTarget>>,
    /// Salt of the shadow split's buckets. Default: the rule's `salt` (so the shadow split
    /// answers "what if I changed the weights": users keep their buckets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_salt: Option<String>,
    /// A copy of a fraction of the requests this rule forwards, sent to another upstream
    /// (shadow traffic); its answers are discarded. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
    /// A guarded ramp of one of the split's targets: the gateway steps its weight up while
    /// its figures hold up against another target's, and rolls it back when they do not.
    /// Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ramp: Option<Ramp>,
    /// Protocols an HTTP/1.1 client may switch this route's requests to with `Connection:
    /// upgrade` and `Upgrade` (`["websocket"]`), compared case-insensitively. A request
    /// asking for one of them (and only one protocol) is forwarded with its `Upgrade`
    /// header kept, and a 101 from the upstream turns the connection into a tunnel. Each is
    /// an HTTP token; `h2c` is refused (an h2c upgrade through a proxy lets a client talk
    /// HTTP/2 to the upstream past every rule). At most 8. Default: none: `Upgrade` is
    /// removed like any hop-by-hop header, so an upstream never receives an upgrade it was
    /// not meant to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upgrade: Vec<String>,
}

/// Request mirroring of a route: a fire-and-forget copy of a sticky fraction of its users'
/// requests to another upstream. The client's answer never waits for the copy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    /// The upstream the copies go to.
    pub upstream: String,
    /// Share of users mirrored, as a percentage with up to four decimals (`"30%"`). Give
    /// exactly one of `fraction` or `fraction_ppm`: there is no default, because a copy of
    /// every request doubles the load on the mirror.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<String>,
    /// The same in parts per million (0..=1000000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction_ppm: Option<u32>,
    /// Salt of the mirror's user buckets. Default: the route's salt followed by `#mirror`,
    /// so who is mirrored does not follow who is in a split's canary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub salt: Option<String>,
    /// Largest request body copied, in bytes. A request with a larger body, or with a body
    /// of undeclared length (chunked), is not mirrored (counted as `skipped_body`), since
    /// the copy is made as the body streams to the primary. Default: 65536. Range:
    /// 0..=16777216.
    #[serde(default = "default_mirror_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Most copies of this route in flight at once; beyond it copies are dropped (counted
    /// as `dropped`), so a slow or hung mirror holds a bounded number of tasks and
    /// sockets. Default: 64. Range: 1..=100000.
    #[serde(default = "default_mirror_max_in_flight")]
    pub max_in_flight: u32,
}

/// One target of a weighted split. Give exactly one of `weight` or `weight_ppm`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SplitTarget {
    /// The upstream.
    pub upstream: String,
    /// A percentage with up to four decimals (`"0.0125%"`, `"5%"`), or `"rest"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<String>,
    /// The weight in parts per million (0..=1000000): `125` is 0.0125%.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_ppm: Option<u32>,
}

/// Users and apps pinned to one upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    /// The upstream they go to.
    pub upstream: String,
    /// User IDs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    /// App IDs (all of an app's traffic).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apps: Vec<String>,
}

// === impl Route ===

impl Route {
    /// The salt of its user buckets: `salt`, or its name.
    pub fn bucket_salt(&self) -> &str {
        self.salt.as_deref().unwrap_or(&self.name)
    }

    /// The salt of its mirror's user buckets: the mirror's `salt`, or the route's salt
    /// followed by `#mirror`.
    pub fn mirror_salt(&self) -> Option<String> {
        let m = self.mirror.as_ref()?;
        Some(match &m.salt {
            Some(s) => s.clone(),
            None => format!("{}#mirror", self.bucket_salt()),
        })
    }
}

// === defaults ===

fn default_listeners() -> Vec<Listener> {
    vec![Listener {
        name: None,
        address: "127.0.0.1:8080".to_owned(),
        tls: None,
    }]
}
fn default_admin_address() -> String {
    "127.0.0.1:9901".to_owned()
}
fn default_admin_max_connections() -> u32 {
    64
}
fn default_shutdown_grace_ms() -> u64 {
    10_000
}
fn default_data_dir() -> String {
    "data/tidegate".into()
}
fn default_history_keep() -> u32 {
    20
}
fn default_header_read_timeout_ms() -> u64 {
    10_000
}
fn default_max_header_bytes() -> u32 {
    65_536
}
fn default_max_headers() -> u32 {
    100
}
fn default_max_body_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_h2_max_concurrent_streams() -> u32 {
    256
}
fn default_h2_max_pending_reset_streams() -> u32 {
    32
}
fn default_idle_timeout_ms() -> u64 {
    60_000
}
fn default_max_connections() -> u32 {
    10_000
}
fn default_max_upgraded_connections() -> u32 {
    1024
}
fn default_upgrade_idle_timeout_ms() -> u64 {
    60_000
}
fn default_app_extractor() -> Extractor {
    Extractor::Header("x-app-id".to_owned())
}
fn default_max_id_bytes() -> u32 {
    128
}
fn default_true() -> bool {
    true
}
fn default_leeway_s() -> u64 {
    30
}
fn default_max_token_bytes() -> u32 {
    8192
}
fn default_cache_entries() -> u32 {
    65_536
}
fn default_user_header() -> String {
    "x-user-id".to_owned()
}
fn default_app_header() -> String {
    "x-app-id".to_owned()
}
fn default_user_extractor() -> Extractor {
    Extractor::Header("x-user-id".to_owned())
}
fn default_connect_timeout_ms() -> u64 {
    1_000
}
fn default_request_timeout_ms() -> u64 {
    30_000
}
fn default_read_timeout_ms() -> u64 {
    30_000
}
fn default_pool_max_idle() -> u32 {
    256
}
fn default_mirror_max_body_bytes() -> u64 {
    65_536
}
fn default_mirror_max_in_flight() -> u32 {
    64
}

impl Default for Server {
    fn default() -> Self {
        Self {
            listeners: default_listeners(),
            admin: Admin::default(),
            limits: ConnLimits::default(),
            shutdown_grace_ms: default_shutdown_grace_ms(),
            access_log: AccessLog::default(),
            tracing: Tracing::default(),
            redis: None,
            trusted_proxies: Vec::new(),
            data_dir: default_data_dir(),
            history_keep: default_history_keep(),
        }
    }
}

impl Default for Admin {
    fn default() -> Self {
        Self {
            address: default_admin_address(),
            allowed_hosts: Vec::new(),
            max_connections: default_admin_max_connections(),
            token_file: None,
        }
    }
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            header_read_timeout_ms: default_header_read_timeout_ms(),
            max_header_bytes: default_max_header_bytes(),
            max_headers: default_max_headers(),
            max_body_bytes: default_max_body_bytes(),
            h2_max_concurrent_streams: default_h2_max_concurrent_streams(),
            h2_max_pending_reset_streams: default_h2_max_pending_reset_streams(),
            idle_timeout_ms: default_idle_timeout_ms(),
            max_connections: default_max_connections(),
            max_upgraded_connections: default_max_upgraded_connections(),
            upgrade_idle_timeout_ms: default_upgrade_idle_timeout_ms(),
        }
    }
}

impl Default for AccessLog {
    fn default() -> Self {
        Self {
            enabled: false,
            format: LogFormat::Json,
        }
    }
}

impl Default for Identity {
    fn default() -> Self {
        Self {
            app: default_app_extractor(),
            user: default_user_extractor(),
            max_id_bytes: default_max_id_bytes(),
            on_invalid: OnInvalidId::Anonymous,
            jwt: None,
        }
    }
}
