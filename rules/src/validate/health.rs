//! Validation of an upstream's endpoint health: `health_check`, `outlier` and
//! `resolve_ttl_ms`.

use http::HeaderValue;
use http::uri::PathAndQuery;

use crate::error::JsonPath;
use crate::model::Upstream;

use super::Validator;

impl Validator<'_> {
    /// The health fields of upstream `u`, at `up`.
    pub(super) fn upstream_health(&mut self, up: &JsonPath, u: &Upstream) {
        self.range(up.key("resolve_ttl_ms"), u.resolve_ttl_ms, 100, 86_400_000);
        if let Some(h) = &u.health_check {
            let p = up.key("health_check");
            // The path goes on the wire as the request target: it must parse as one, and
            // be in origin form.
            if !h.path.starts_with('/') || h.path.parse::<PathAndQuery>().is_err() {
                self.err(
                    p.key("path"),
                    format!(
                        "{:?} is not a request path: it must start with `/` and hold no spaces or control characters",
                        h.path
                    ),
                );
            }
            self.range(p.key("interval_ms"), h.interval_ms, 10, 3_600_000);
            self.range(p.key("timeout_ms"), h.timeout_ms, 1, 60_000);
            if h.timeout_ms > h.interval_ms && (10..=3_600_000).contains(&h.interval_ms) {
                self.err(
                    p.key("timeout_ms"),
                    format!(
                        "{} is longer than interval_ms ({}); allowed 1..={}",
                        h.timeout_ms,
                        h.interval_ms,
                        h.interval_ms.min(60_000)
                    ),
                );
            }
            self.range(
                p.key("healthy_threshold"),
                h.healthy_threshold.into(),
                1,
                100,
            );
            self.range(
                p.key("unhealthy_threshold"),
                h.unhealthy_threshold.into(),
                1,
                100,
            );
            let [lo, hi] = h.expected_status;
            self.range(p.key("expected_status").index(0), lo.into(), 100, 599);
            self.range(p.key("expected_status").index(1), hi.into(), 100, 599);
            if lo > hi {
                self.err(
                    p.key("expected_status"),
                    format!("[{lo}, {hi}]: the lowest status is above the highest"),
                );
            }
            if let Some(host) = &h.host
                && (host.is_empty() || HeaderValue::from_str(host).is_err())
            {
                self.err(
                    p.key("host"),
                    format!("{host:?} is not a valid Host header value"),
                );
            }
        }
        let o = &u.outlier;
        let p = up.key("outlier");
        self.range(
            p.key("consecutive_failures"),
            o.consecutive_failures.into(),
            1,
            1_000,
        );
        self.range(p.key("base_ejection_ms"), o.base_ejection_ms, 1, 3_600_000);
        self.range(p.key("max_ejection_ms"), o.max_ejection_ms, 1, 86_400_000);
        if o.max_ejection_ms < o.base_ejection_ms {
            self.err(
                p.key("max_ejection_ms"),
                format!(
                    "{} is shorter than base_ejection_ms ({}); allowed {}..=86400000",
                    o.max_ejection_ms, o.base_ejection_ms, o.base_ejection_ms
                ),
            );
        }
        self.range(
            p.key("max_ejected_percent"),
            o.max_ejected_percent.into(),
            0,
            100,
        );
    }
}
