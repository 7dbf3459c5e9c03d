//! Validation of the `overload` section: ranges, references to interfaces and upstreams, and
//! combinations that cannot work (admission with no cap to measure queueing at).

use std::collections::HashSet;

use crate::error::JsonPath;
use crate::model::Config;

use super::{MAX_IN_FLIGHT, Validator};

impl Validator<'_> {
    pub(super) fn overload(&mut self, c: &Config, interfaces: &HashSet<String>) {
        let o = &c.overload;
        let p = JsonPath::root().key("overload");
        if let Some(n) = o.max_in_flight {
            self.range(p.key("max_in_flight"), n.into(), 1, MAX_IN_FLIGHT);
        }
        self.range(p.key("queue_timeout_ms"), o.queue_timeout_ms, 0, 10_000);
        self.range(p.key("max_queue"), o.max_queue.into(), 0, 100_000);
        self.range(p.key("retry_after_s"), o.retry_after_s.into(), 1, 3600);
        self.range(p.key("window_ms"), o.window_ms, 10, 10_000);
        let mut caps = o.max_in_flight.is_some();
        for (name, i) in &o.interfaces {
            let ip = p.key("interfaces").key(name.clone());
            self.interface_ref(ip.clone(), name, interfaces);
            if let Some(n) = i.max_in_flight {
                self.range(ip.key("max_in_flight"), n.into(), 1, MAX_IN_FLIGHT);
                caps = true;
            }
        }
        for (name, u) in &o.upstreams {
            let up = p.key("upstreams").key(name.clone());
            self.upstream_ref(c, up.clone(), name);
            if let Some(n) = u.max_in_flight {
                self.range(up.key("max_in_flight"), n.into(), 1, MAX_IN_FLIGHT);
            }
            match (&u.adaptive, u.max_in_flight) {
                (Some(_), Some(_)) => self.err(
                    up.key("adaptive"),
                    "give either `max_in_flight` (a fixed cap) or `adaptive`, not both",
                ),
                (None, None) => self.err(
                    up.clone(),
                    "an upstream entry needs `max_in_flight` or `adaptive`",
                ),
                _ => caps = true,
            }
            if let Some(a) = &u.adaptive {
                let ap = up.key("adaptive");
                self.range(ap.key("min"), a.min.into(), 1, MAX_IN_FLIGHT);
                self.range(ap.key("max"), a.max.into(), 1, MAX_IN_FLIGHT);
                if a.min > a.max {
                    self.err(
                        ap.key("min"),
                        format!("min {} is above max {}", a.min, a.max),
                    );
                }
                if let Some(i) = a.initial
                    && (i < a.min || i > a.max)
                {
                    self.err(
                        ap.key("initial"),
                        format!("{i} is outside min..=max ({}..={})", a.min, a.max),
                    );
                }
                if let Some(t) = a.target_latency_ms {
                    self.range(ap.key("target_latency_ms"), t, 1, 600_000);
                }
            }
        }
        let a = &o.admission;
        let ap = p.key("admission");
        self.range(
            ap.key("queue_delay_threshold_ms"),
            a.queue_delay_threshold_ms,
            1,
            10_000,
        );
        self.range(
            ap.key("user_priority_levels"),
            a.user_priority_levels.into(),
            1,
            1024,
        );
        self.range(ap.key("rotate_every_s"), a.rotate_every_s, 1, 604_800);
        self.range(ap.key("shed_percent"), a.shed_percent.into(), 1, 50);
        self.range(ap.key("admit_percent"), a.admit_percent.into(), 1, 50);
        if o.enabled && a.enabled && !caps {
            self.err(
                ap.key("enabled"),
                "admission measures queueing at a concurrency cap, and none is set: set \
                 `max_in_flight`, or a cap for an interface or upstream (or disable admission)",
            );
        }
    }
}
