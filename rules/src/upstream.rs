//! Upstreams as the proxy needs them to build connections: endpoints, balancing, timeouts
//! and pool size, with defaults applied. Sorted by name, so an [`UpstreamId`] is the index
//! of its name among the config's upstream names.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::ids::UpstreamId;
use crate::model::{Balance, DEFAULT_EMBEDDED_DATA_DIR, Protocol, Upstream, UpstreamKind};

/// Active health checks of an upstream, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckSpec {
    /// Path and query requested.
    pub path: Box<str>,
    /// Time between two checks of an endpoint.
    pub interval: Duration,
    /// Time for one check, connect included.
    pub timeout: Duration,
    /// Checks passed in a row that bring an endpoint back.
    pub healthy_threshold: u32,
    /// Checks failed in a row that take an endpoint out.
    pub unhealthy_threshold: u32,
    /// Passing statuses, both inclusive.
    pub expected_status: (u16, u16),
    /// `Host` of the check; `None`: the endpoint as configured.
    pub host: Option<Box<str>>,
}

/// Passive outlier ejection of an upstream, compiled (present only when enabled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierSpec {
    /// Failed exchanges in a row that eject an endpoint.
    pub consecutive_failures: u32,
    /// Length of a first ejection.
    pub base_ejection: Duration,
    /// Longest ejection, and the quiet time that resets the backoff.
    pub max_ejection: Duration,
    /// Most endpoints ejected at once, in percent.
    pub max_ejected_percent: u32,
}

/// TLS to an upstream, compiled: the names of its files (read by the proxy, relative to the
/// config file) and the name to verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSpec {
    /// CA bundle; `None`: the system's trust store.
    pub ca_file: Option<Box<str>>,
    /// SNI and verified name; `None`: each endpoint's host.
    pub server_name: Option<Box<str>>,
    /// Client certificate chain and key for mutual TLS, both or neither.
    pub client_identity: Option<(Box<str>, Box<str>)>,
}

/// An upstream, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSpec {
    /// Its name.
    pub name: Box<str>,
    /// Static endpoints or the embedded backend.
    pub kind: UpstreamKind,
    /// `host:port` strings, validated; resolved by the proxy at load time.
    pub endpoints: Vec<Box<str>>,
    /// Load-balancing policy.
    pub balance: Balance,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Request-to-response-head timeout.
    pub request_timeout: Duration,
    /// Longest stall between pieces of a response body.
    pub read_timeout: Duration,
    /// Idle pooled connections kept per endpoint.
    pub pool_max_idle_per_endpoint: usize,
    /// Data directory of an embedded upstream.
    pub data_dir: Option<Box<str>>,
    /// Active health checks, when configured.
    pub health_check: Option<HealthCheckSpec>,
    /// Passive outlier ejection, when enabled.
    pub outlier: Option<OutlierSpec>,
    /// How often endpoint host names are resolved again.
    pub resolve_ttl: Duration,
    /// TLS, when configured.
    pub tls: Option<TlsSpec>,
    /// HTTP version spoken to it.
    pub protocol: Protocol,
}

// === impl UpstreamSpec ===

impl UpstreamSpec {
    /// An upstream as written, with its defaults applied. Needs no validation to be built:
    /// every field is copied, none is parsed.
    pub(crate) fn new(name: &str, u: &Upstream) -> Self {
        Self {
            name: name.into(),
            kind: u.kind,
            endpoints: u.endpoints.iter().map(|e| e.as_str().into()).collect(),
            balance: u.balance,
            connect_timeout: Duration::from_millis(u.connect_timeout_ms),
            request_timeout: Duration::from_millis(u.request_timeout_ms),
            read_timeout: Duration::from_millis(u.read_timeout_ms),
            pool_max_idle_per_endpoint: u.pool_max_idle_per_endpoint as usize,
            data_dir: match u.kind {
                UpstreamKind::Embedded => Some(
                    u.data_dir
                        .as_deref()
                        .unwrap_or(DEFAULT_EMBEDDED_DATA_DIR)
                        .into(),
                ),
                UpstreamKind::Static => None,
            },
            health_check: u.health_check.as_ref().map(|h| HealthCheckSpec {
                path: h.path.as_str().into(),
                interval: Duration::from_millis(h.interval_ms),
                timeout: Duration::from_millis(h.timeout_ms),
                healthy_threshold: h.healthy_threshold,
                unhealthy_threshold: h.unhealthy_threshold,
                expected_status: (h.expected_status[0], h.expected_status[1]),
                host: h.host.as_deref().map(Into::into),
            }),
            outlier: (u.outlier.enabled && u.outlier.max_ejected_percent > 0).then(|| {
                OutlierSpec {
                    consecutive_failures: u.outlier.consecutive_failures,
                    base_ejection: Duration::from_millis(u.outlier.base_ejection_ms),
                    max_ejection: Duration::from_millis(u.outlier.max_ejection_ms),
                    max_ejected_percent: u.outlier.max_ejected_percent,
                }
            }),
            resolve_ttl: Duration::from_millis(u.resolve_ttl_ms),
            tls: u.tls.as_ref().map(|t| TlsSpec {
                ca_file: t.ca_file.as_deref().map(Into::into),
                server_name: t.server_name.as_deref().map(Into::into),
                client_identity: t
                    .client_cert_file
                    .as_deref()
                    .zip(t.client_key_file.as_deref())
                    .map(|(c, k)| (c.into(), k.into())),
            }),
            protocol: u.protocol,
        }
    }
}

/// The ID of each upstream name: its index in name order.
pub(crate) fn upstream_ids(upstreams: &BTreeMap<String, Upstream>) -> HashMap<&str, UpstreamId> {
    upstreams
        .keys()
        .enumerate()
        .map(|(i, name)| (name.as_str(), UpstreamId(i as u32)))
        .collect()
}
