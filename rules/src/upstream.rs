//! Upstreams as the proxy needs them to build connections: endpoints, balancing, timeouts
//! and pool size, with defaults applied. Sorted by name, so an [`UpstreamId`] is the index
//! of its name among the config's upstream names.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::ids::UpstreamId;
use crate::model::{Balance, DEFAULT_EMBEDDED_DATA_DIR, Upstream, UpstreamKind};

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
