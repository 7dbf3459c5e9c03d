//! Validation of an interface's `cache`: its ranges, its memory bound, and a method whose
//! answers may be kept.

use std::time::Duration;

use crate::classify::CacheSpec;
use crate::error::JsonPath;
use crate::model::Interface;

use super::Validator;

/// Longest `ttl_ms`: a minute. The cache absorbs bursts on hot keys; longer-lived caching
/// belongs to a CDN or the service, which can invalidate.
const MAX_CACHE_TTL_MS: u64 = 60_000;
/// Largest `max_entries`.
const MAX_CACHE_ENTRIES: u64 = 1_000_000;
/// Largest `max_body_bytes`.
const MAX_CACHE_BODY_BYTES: u64 = 16 * 1024 * 1024;
/// Largest `max_entries × max_body_bytes`: the bodies one cache may hold.
const MAX_CACHE_BYTES: u64 = 1 << 30;
/// Largest `max_waiters`.
const MAX_CACHE_WAITERS: u64 = 100_000;
/// Longest `max_wait_ms`.
const MAX_CACHE_WAIT_MS: u64 = 60_000;

impl Validator<'_> {
    /// The interface's cache at `ip`, compiled; `None` when it has none or it is faulty
    /// (then reported).
    pub(super) fn cache(&mut self, ip: JsonPath, itf: &Interface) -> Option<CacheSpec> {
        let c = itf.cache.as_ref()?;
        let p = ip.key("cache");
        let before = self.issues.len();
        if !matches!(itf.method.as_str(), "GET" | "HEAD" | "*") {
            self.err(
                p.clone(),
                format!(
                    "only GET and HEAD answers are cached; interface {:?} is {}",
                    itf.name, itf.method
                ),
            );
        }
        self.range(p.key("ttl_ms"), c.ttl_ms, 1, MAX_CACHE_TTL_MS);
        self.range(
            p.key("max_entries"),
            c.max_entries.into(),
            1,
            MAX_CACHE_ENTRIES,
        );
        self.range(
            p.key("max_body_bytes"),
            c.max_body_bytes.into(),
            1,
            MAX_CACHE_BODY_BYTES,
        );
        self.range(
            p.key("max_waiters"),
            c.max_waiters.into(),
            1,
            MAX_CACHE_WAITERS,
        );
        self.range(p.key("max_wait_ms"), c.max_wait_ms, 1, MAX_CACHE_WAIT_MS);
        let bytes = u64::from(c.max_entries) * u64::from(c.max_body_bytes);
        if !self.reported_since(before) && bytes > MAX_CACHE_BYTES {
            self.err(
                p.key("max_entries"),
                format!(
                    "max_entries × max_body_bytes is {bytes} bytes; at most {MAX_CACHE_BYTES} (1 GiB) are allowed"
                ),
            );
        }
        if self.reported_since(before) {
            return None;
        }
        Some(CacheSpec {
            ttl: Duration::from_millis(c.ttl_ms),
            max_entries: c.max_entries,
            max_body_bytes: c.max_body_bytes,
            vary_on_identity: c.vary_on_identity,
            max_waiters: c.max_waiters,
            max_wait: Duration::from_millis(c.max_wait_ms),
        })
    }
}
