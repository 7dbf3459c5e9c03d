//! Validation of a route's `mirror`: its upstream, its fraction, its salt and its bounds.

use crate::bucket::{BUCKETS, Weight, parse_percent};
use crate::error::JsonPath;
use crate::model::{Config, Route};
use crate::route::CompiledMirror;

use super::Validator;

/// Largest `mirror.max_body_bytes`: copies are held in memory until sent.
const MAX_MIRROR_BODY_BYTES: u64 = 16 * 1024 * 1024;
/// Largest `mirror.max_in_flight`.
const MAX_MIRROR_IN_FLIGHT: u64 = 100_000;

impl Validator<'_> {
    /// `r`'s mirror, compiled; `None` when it has none or it is faulty (then reported).
    pub(super) fn mirror(
        &mut self,
        c: &Config,
        rp: &JsonPath,
        r: &Route,
    ) -> Option<CompiledMirror> {
        let m = r.mirror.as_ref()?;
        let p = rp.key("mirror");
        let before = self.issues.len();
        let upstream = self.upstream_ref(c, p.key("upstream"), &m.upstream);
        let ppm = match (&m.fraction, m.fraction_ppm) {
            (Some(_), Some(_)) => {
                self.err(
                    p.key("fraction_ppm"),
                    "give either `fraction` or `fraction_ppm`, not both",
                );
                None
            }
            (None, None) => {
                self.err(
                    p.clone(),
                    "missing field `fraction` (or `fraction_ppm`): the share of users mirrored",
                );
                None
            }
            (Some(f), None) => match parse_percent(f) {
                Ok(Weight::Ppm(ppm)) => Some(ppm),
                Ok(Weight::Rest) => {
                    self.err(
                        p.key("fraction"),
                        format!("{f:?}: a fraction is a percentage, not \"rest\""),
                    );
                    None
                }
                Err(e) => {
                    self.err(p.key("fraction"), e);
                    None
                }
            },
            (None, Some(ppm)) if ppm > BUCKETS => {
                self.err(
                    p.key("fraction_ppm"),
                    format!("{ppm} is out of range; allowed 0..={BUCKETS}"),
                );
                None
            }
            (None, Some(ppm)) => Some(ppm),
        };
        if m.salt.as_deref() == Some("") {
            self.err(
                p.key("salt"),
                "salt must not be empty (omit it to use the route's salt and \"#mirror\")",
            );
        }
        self.range(
            p.key("max_body_bytes"),
            m.max_body_bytes,
            0,
            MAX_MIRROR_BODY_BYTES,
        );
        self.range(
            p.key("max_in_flight"),
            m.max_in_flight.into(),
            1,
            MAX_MIRROR_IN_FLIGHT,
        );
        if self.reported_since(before) {
            return None;
        }
        Some(CompiledMirror {
            upstream: upstream?,
            ppm: ppm?,
            salt: r.mirror_salt()?.into(),
            max_body_bytes: m.max_body_bytes,
            max_in_flight: m.max_in_flight,
        })
    }
}
