//! Validation of `server.tracing`.

use crate::error::JsonPath;
use crate::model::Tracing;

use super::Validator;

impl Validator<'_> {
    /// `server.tracing`: every problem reported at its field's path.
    pub(super) fn tracing(&mut self, t: &Tracing) {
        let p = JsonPath::root().key("server").key("tracing");
        // NaN fails both comparisons, so it is reported too.
        if !(0.0..=1.0).contains(&t.sample_ratio) {
            self.err(
                p.key("sample_ratio"),
                format!("{} is out of range; allowed 0..=1", t.sample_ratio),
            );
        }
        if let Some(e) = &t.otlp_endpoint {
            self.otlp_endpoint(p.key("otlp_endpoint"), e);
            if !t.propagate {
                self.err(
                    p.key("otlp_endpoint"),
                    "exporting spans needs `propagate`: without it no request has a span",
                );
            }
        }
        if t.service_name.is_empty() || t.service_name.len() > 128 {
            self.err(p.key("service_name"), "a service name is 1..=128 bytes");
        }
        self.range(p.key("max_queue"), t.max_queue.into(), 1, 1_000_000);
        self.range(
            p.key("max_batch"),
            t.max_batch.into(),
            1,
            t.max_queue.clamp(1, 1_000_000).into(),
        );
        self.range(
            p.key("export_interval_ms"),
            t.export_interval_ms,
            10,
            60_000,
        );
        self.range(p.key("export_timeout_ms"), t.export_timeout_ms, 100, 60_000);
    }

    /// `http://host[:port]/path`: what the exporter's plain HTTP client can reach.
    fn otlp_endpoint(&mut self, p: JsonPath, e: &str) {
        let Ok(uri) = e.parse::<http::Uri>() else {
            self.err(p, format!("{e:?} is not a URL"));
            return;
        };
        match (uri.scheme_str(), uri.host()) {
            (Some("http"), Some(h)) if !h.is_empty() => {}
            (Some("https"), _) => self.err(
                p.clone(),
                "TLS to the collector (https://) is not built in; use http:// to a collector on a private network or loopback",
            ),
            _ => self.err(
                p.clone(),
                format!("{e:?} is not an http:// URL with a host: write http://host:4318/v1/traces"),
            ),
        }
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            self.err(p, "credentials in the URL are not supported");
        }
    }
}
