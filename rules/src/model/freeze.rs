//! A change freeze as written: a window in time during which a reload may change only what
//! is listed as editable.
//!
//! The window's ends are RFC 3339 timestamps with their offset (`"2026-12-31T18:00:00+08:00"`
//! or `...Z`): a time without a zone is ambiguous across data centres, so the format demands
//! one. They are kept as written (messages and the admin port echo them in the author's
//! zone) and parsed by [`parse_time`] where they are judged.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The `freeze` section: a change freeze (a gala night, a year-end close).
///
/// While `start <= now < end`, a reload whose edit changes anything outside `editable` is
/// refused: the old rules stay live and the error names the frozen path. The `freeze`
/// section itself is always editable (so a freeze can be lifted, moved or extended), and
/// every edit of it is logged. A window that has ended or not begun blocks nothing. A
/// (re)start always applies what is on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Freeze {
    /// A name for messages and the admin port (`"gala-night"`). Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// When the freeze begins: RFC 3339 with an offset (`"2026-12-31T18:00:00+08:00"`).
    pub start: String,
    /// When it ends (exclusive): RFC 3339 with an offset. Must be after `start`.
    pub end: String,
    /// What a reload may still change during the window, as paths of the form
    /// `SECTION[/RULE[/FIELD...]]` (the paths `tidegate diff` prints: `active_plans`,
    /// `routes/canary/split/0/weight`, `limits/per-user`). A path covers everything below it;
    /// `*` stands for any one segment (`fallbacks/*/fraction`). Sections: `server`,
    /// `identity`, `interfaces`, `upstreams`, `routes`, `limits`, `fallbacks`, `plans`,
    /// `active_plans`, `breakers`, `overload`. Default: `["active_plans"]` (switching
    /// emergency plans on and off is what a freeze is for). An empty list freezes everything
    /// but `freeze` itself. Brakes are editable whatever the list: a ramp's `stop` set (to
    /// `hold` or `rollback`) and a plan's `auto` set to `false`.
    #[serde(default = "default_editable")]
    pub editable: Vec<String>,
}

/// The sections a path in `freeze.editable` may start with (those `tidegate diff` compares).
pub const FREEZE_SECTIONS: [&str; 11] = [
    "server",
    "identity",
    "interfaces",
    "upstreams",
    "routes",
    "limits",
    "fallbacks",
    "plans",
    "active_plans",
    "breakers",
    "overload",
];

fn default_editable() -> Vec<String> {
    vec!["active_plans".to_owned()]
}

/// An RFC 3339 timestamp with its offset (`2026-12-31T18:00:00+08:00`, `2026-12-31T10:00:00Z`).
pub fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s, &Rfc3339).map_err(|e| {
        format!(
            "{s:?} is not an RFC 3339 time with an offset (like 2026-12-31T18:00:00+08:00): {e}"
        )
    })
}
