//! Rule conditions ([`Match`]) and the bucket key of requests without a user
//! ([`NoUserKey`]): shared by routes, limits and fallbacks. Plain serde types like the rest
//! of the model; the `matcher` module compiles them.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What a request with no user ID is bucketed by.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum NoUserKey {
    /// The client's IP address.
    #[default]
    ClientIp,
    /// A random draw per request.
    Random,
    /// A request header (the client IP when it is absent).
    Header(String),
}

/// A range of user buckets, `[from_ppm, to_ppm)` out of 1,000,000, under the rule's salt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BucketRangeSpec {
    /// First bucket in the range (0..=1000000).
    pub from_ppm: u32,
    /// First bucket after the range (from_ppm..=1000000).
    pub to_ppm: u32,
}

/// Conditions of a rule; all given conditions must hold. Precedence when several rules
/// match: a rule constraining `users` beats one that does not, then `headers`, then
/// `interfaces`, then `apps` (compared as a whole, most significant first). Two rules with
/// the same constrained dimensions that can match the same request are a validation error.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// App IDs (any of). Absent: any app, including none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apps: Option<Vec<String>>,
    /// Interface names (any of), from `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interfaces: Option<Vec<String>>,
    /// User IDs (any of).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<Vec<String>>,
    /// Users whose bucket (under the rule's salt) falls in this range. Counts as a `users`
    /// condition for precedence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_buckets: Option<BucketRangeSpec>,
    /// Header values that must all be present, exactly (name → value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<BTreeMap<String, String>>,
}

// === impl Match ===

impl Match {
    /// Which dimensions the matcher constrains, as a precedence number: users (8) >
    /// headers (4) > interfaces (2) > apps (1). Higher wins.
    pub fn specificity(&self) -> u8 {
        ((self.users.is_some() || self.user_buckets.is_some()) as u8) << 3
            | (self.headers.is_some() as u8) << 2
            | (self.interfaces.is_some() as u8) << 1
            | (self.apps.is_some() as u8)
    }
}
