//! `explain`: why a request goes where it goes. Runs exactly the routing code the gateway
//! runs, and also reports every rule it considered and why each did or did not match.
//!
//! Operators use it before and after an edit (`tidegate explain`, `GET /admin/explain`).
//! It allocates freely: it is never on the request path.

use std::fmt;

use serde::Serialize;

use crate::classify::RequestParts;
use crate::matcher::{MatchInput, Mismatch};
use crate::route::{BucketKey, RouteAction, RouteInput, Via};
use crate::snapshot::Snapshot;

/// The full account of one routing decision.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Explanation {
    /// What classification found.
    pub classification: Classification,
    /// Every rule that could apply (indexed by this app and interface), most specific first.
    pub considered: Vec<Considered>,
    /// The outcome; `None` when no rule matched (the gateway answers 404 `no_route`).
    pub decision: Option<Decision>,
}

/// The classified request.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Classification {
    /// App ID.
    pub app: Option<String>,
    /// Interface name.
    pub interface: Option<String>,
    /// User ID.
    pub user: Option<String>,
}

/// One rule considered.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Considered {
    /// Rule name.
    pub rule: String,
    /// Its precedence (higher wins).
    pub specificity: u8,
    /// Whether all its conditions hold.
    pub matched: bool,
    /// Why it did or did not decide.
    pub reason: String,
}

/// The decision.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Decision {
    /// The deciding rule.
    pub rule: String,
    /// The upstream chosen.
    pub upstream: String,
    /// How: `direct`, `override`, `whitelist_user`, `whitelist_app` or `split`.
    pub via: &'static str,
    /// The bucket, for a split.
    pub bucket: Option<u32>,
    /// What the bucket was computed from: `user`, `header`, `client_ip`, `random`.
    pub bucket_key: Option<&'static str>,
    /// For a split: each target with its ppm and bucket range.
    pub split: Vec<SplitShare>,
    /// The rule's `shadow_split`, when it has one and the split placed the request: where it
    /// would have sent it (never sent; counted when it differs from `upstream`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow_split: Option<ShadowChoice>,
    /// The rule's mirror, and whether this request would be copied to it; `None` when the
    /// rule has no mirror.
    pub mirror: Option<MirrorShare>,
}

/// Where a route's shadow split would send a request.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ShadowChoice {
    /// The upstream.
    pub upstream: String,
    /// The request's bucket under the shadow split's salt.
    pub bucket: u32,
    /// The shadow split's targets with their ppm and bucket ranges.
    pub split: Vec<SplitShare>,
}

/// A route's mirror, as it applies to one request.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MirrorShare {
    /// The upstream copies go to.
    pub upstream: String,
    /// Share of users mirrored, in parts per million.
    pub ppm: u32,
    /// The request's bucket under the mirror's salt (`None` at 0% or 100%: no hash needed).
    pub bucket: Option<u32>,
    /// Whether a copy would be sent (when the request is forwarded, its body is within
    /// `max_body_bytes` and the mirror has room in flight).
    pub mirrored: bool,
}

/// One target of a split, as configured.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SplitShare {
    /// The upstream.
    pub upstream: String,
    /// Weight in parts per million.
    pub ppm: u32,
    /// Its bucket range `[from, to)`.
    pub buckets: [u32; 2],
}

// === impl Snapshot (explain) ===

impl Snapshot {
    /// Explain the routing of a request. `app` and `user`, when given, replace what the
    /// extractors find (handy on the command line).
    pub fn explain(
        &self,
        req: RequestParts<'_>,
        app: Option<&str>,
        user: Option<&str>,
        client_ip: Option<std::net::IpAddr>,
    ) -> Explanation {
        let c = self.classify(req);
        let app = app.or(c.app.as_deref());
        let user = user.or(c.user.as_deref());
        let input = RouteInput {
            m: MatchInput {
                app,
                interface: c.interface,
                user,
                headers: req.headers,
                params: &c.params,
            },
            client_ip,
            random: 0,
            pair: Default::default(),
        };
        let decision = self.route(&input);
        let mut ids: Vec<u32> = self
            .routes
            .index()
            .candidates(app, c.interface)
            .into_iter()
            .flatten()
            .copied()
            .collect();
        ids.sort_by_key(|&i| {
            (
                std::cmp::Reverse(self.routes[i as usize].matcher.specificity),
                i,
            )
        });
        ids.dedup();
        let considered = ids
            .into_iter()
            .map(|i| {
                let r = &self.routes[i as usize];
                let check = r.matcher.check(&input.m);
                let reason = match (check, &decision) {
                    (Err(m), _) => mismatch_reason(m, app, user),
                    (Ok(()), Some(d)) if d.rule_id == i => {
                        "matched: the most specific matching rule".to_owned()
                    }
                    (Ok(()), Some(d)) => {
                        format!("matched, but {:?} is more specific", &*d.rule.name)
                    }
                    (Ok(()), None) => "matched".to_owned(),
                };
                Considered {
                    rule: r.name.to_string(),
                    specificity: r.matcher.specificity,
                    matched: check.is_ok(),
                    reason,
                }
            })
            .collect();
        let shares = |edges: &[crate::route::SplitEdge]| -> Vec<SplitShare> {
            edges
                .iter()
                .map(|e| SplitShare {
                    upstream: self.upstreams[e.upstream.0 as usize].name.to_string(),
                    ppm: e.ppm,
                    buckets: [e.edge - e.ppm, e.edge],
                })
                .collect()
        };
        let decision = decision.map(|d| {
            let shadow_split =
                d.rule
                    .shadow_choice(&input, d.via)
                    .map(|(u, bucket)| ShadowChoice {
                        upstream: self.upstreams[u.0 as usize].name.to_string(),
                        bucket,
                        split: d
                            .rule
                            .shadow
                            .as_ref()
                            .map_or_else(Vec::new, |s| shares(&s.targets)),
                    });
            let (bucket, bucket_key) = match d.via {
                Via::Split { bucket, key } => (Some(bucket), Some(key)),
                _ => (None, None),
            };
            let split = match &d.rule.action {
                RouteAction::Upstream(_) => Vec::new(),
                RouteAction::Split(edges) => shares(edges),
            };
            let mirror = d.rule.mirror.as_ref().map(|m| {
                let (mirrored, bucket) = d.rule.mirror_of(&input).unwrap_or((false, None));
                MirrorShare {
                    upstream: self.upstreams[m.upstream.0 as usize].name.to_string(),
                    ppm: m.ppm,
                    bucket: bucket.map(|(b, _)| b),
                    mirrored,
                }
            });
            Decision {
                rule: d.rule.name.to_string(),
                upstream: self.upstreams[d.upstream.0 as usize].name.to_string(),
                via: match d.via {
                    Via::Direct => "direct",
                    Via::Override => "override",
                    Via::WhitelistUser => "whitelist_user",
                    Via::WhitelistApp => "whitelist_app",
                    Via::Split { .. } => "split",
                },
                bucket,
                bucket_key: bucket_key.map(|k| match k {
                    BucketKey::User => "user",
                    BucketKey::Header => "header",
                    BucketKey::ClientIp => "client_ip",
                    BucketKey::Random => "random",
                }),
                split,
                shadow_split,
                mirror,
            }
        });
        Explanation {
            classification: Classification {
                app: app.map(str::to_owned),
                interface: c.interface.map(|i| self.interface_name(i).to_string()),
                user: user.map(str::to_owned),
            },
            considered,
            decision,
        }
    }
}

fn mismatch_reason(m: Mismatch, app: Option<&str>, user: Option<&str>) -> String {
    let show = |v: Option<&str>| v.map_or("none".to_owned(), |v| format!("{v:?}"));
    match m {
        Mismatch::App => format!("app {} is not in `apps`", show(app)),
        Mismatch::Interface => "interface is not in `interfaces`".to_owned(),
        Mismatch::User => format!("user {} is not in `users`", show(user)),
        Mismatch::UserBucket => format!("user {}'s bucket is outside `user_buckets`", show(user)),
        Mismatch::Header => "a header in `headers` is missing or has another value".to_owned(),
    }
}

// === impl Explanation ===

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.classification;
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "none".into());
        writeln!(
            f,
            "classification: app={} interface={} user={}",
            show(&c.app),
            show(&c.interface),
            show(&c.user)
        )?;
        writeln!(f, "rules considered ({}):", self.considered.len())?;
        for r in &self.considered {
            let mark = if r.matched { "+" } else { "-" };
            writeln!(
                f,
                "  {mark} {} (specificity {}): {}",
                r.rule, r.specificity, r.reason
            )?;
        }
        match &self.decision {
            None => write!(
                f,
                "decision: no rule matched; the gateway answers 404 no_route"
            ),
            Some(d) => {
                for s in &d.split {
                    writeln!(
                        f,
                        "  split: {} {} ppm, buckets [{}, {})",
                        s.upstream, s.ppm, s.buckets[0], s.buckets[1]
                    )?;
                }
                if let (Some(b), Some(k)) = (d.bucket, d.bucket_key) {
                    writeln!(f, "bucket: {b} (from {k})")?;
                }
                if let Some(s) = &d.shadow_split {
                    for t in &s.split {
                        writeln!(
                            f,
                            "  shadow split: {} {} ppm, buckets [{}, {})",
                            t.upstream, t.ppm, t.buckets[0], t.buckets[1]
                        )?;
                    }
                    let same = if s.upstream == d.upstream {
                        "the same"
                    } else {
                        "elsewhere"
                    };
                    writeln!(
                        f,
                        "shadow: split would send it to {:?} (bucket {}): {same}",
                        s.upstream, s.bucket
                    )?;
                }
                if let Some(m) = &d.mirror {
                    write!(f, "mirror: upstream {:?} {} ppm", m.upstream, m.ppm)?;
                    if let Some(b) = m.bucket {
                        write!(f, ", bucket {b}")?;
                    }
                    let yes = if m.mirrored { "copied" } else { "not copied" };
                    writeln!(f, ": {yes}")?;
                }
                write!(
                    f,
                    "decision: rule {:?} → upstream {:?} via {}",
                    d.rule, d.upstream, d.via
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, Method};

    use super::*;

    fn snap() -> Snapshot {
        let text = r#"{"schema_version": 1,
          "interfaces": [{"name": "grab", "method": "POST", "path": "/envelopes/{id}/grab"}],
          "upstreams": {"v1": {"endpoints": ["127.0.0.1:1"]}, "v2": {"endpoints": ["127.0.0.1:2"]}},
          "routes": [
            {"name": "default", "upstream": "v1"},
            {"name": "douyin-grab", "match": {"apps": ["douyin"], "interfaces": ["grab"]},
             "split": [{"upstream": "v2", "weight": "5%"}, {"upstream": "v1", "weight": "rest"}],
             "whitelist": [{"upstream": "v2", "users": ["tester"]}]},
            {"name": "vip", "match": {"users": ["alice"]}, "upstream": "v2"}]}"#;
        crate::load("t.json", text.as_bytes()).unwrap().snapshot
    }

    fn explain(s: &Snapshot, app: &str, user: &str, path: &str) -> Explanation {
        let h = HeaderMap::new();
        let req = RequestParts {
            method: &Method::POST,
            path,
            query: None,
            headers: &h,
        };
        s.explain(req, Some(app), Some(user), None)
    }

    /// A split decision names the rule, the bucket, the ranges, and why others lost.
    #[test]
    fn split_hit() {
        let s = snap();
        let e = explain(&s, "douyin", "bob", "/envelopes/7/grab");
        let d = e.decision.as_ref().unwrap();
        assert_eq!((d.rule.as_str(), d.via), ("douyin-grab", "split"));
        assert_eq!(d.bucket, Some(crate::bucket::bucket("douyin-grab", "bob")));
        assert_eq!(d.split[0].buckets, [0, 50_000]);
        let names: Vec<&str> = e.considered.iter().map(|c| c.rule.as_str()).collect();
        assert_eq!(names, ["vip", "douyin-grab", "default"], "{e}");
        assert!(!e.considered[0].matched);
        assert!(e.considered[2].reason.contains("more specific"), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("classification: app=douyin interface=grab user=bob"),
            "{text}"
        );
    }

    /// A mirror reports its bucket and whether the request is copied, by the same rule
    /// the request path uses.
    #[test]
    fn mirror_reported() {
        let text = r#"{"schema_version": 1,
          "upstreams": {"v1": {"endpoints": ["127.0.0.1:1"]}, "shadow": {"endpoints": ["127.0.0.1:2"]}},
          "routes": [{"name": "default", "upstream": "v1",
                      "mirror": {"upstream": "shadow", "fraction": "50%"}}]}"#;
        let s = crate::load("t.json", text.as_bytes()).unwrap().snapshot;
        let salt = "default#mirror";
        let (mut seen_in, mut seen_out) = (false, false);
        for user in ["a", "b", "c", "d", "e", "f", "g", "h"] {
            let e = explain(&s, "app", user, "/x");
            let m = e.decision.as_ref().unwrap().mirror.clone().unwrap();
            let b = crate::bucket::bucket(salt, user);
            assert_eq!((m.upstream.as_str(), m.ppm), ("shadow", 500_000));
            assert_eq!((m.bucket, m.mirrored), (Some(b), b < 500_000), "{user}");
            seen_in |= m.mirrored;
            seen_out |= !m.mirrored;
            assert!(
                e.to_string()
                    .contains("mirror: upstream \"shadow\" 500000 ppm")
            );
        }
        assert!(seen_in && seen_out, "both sides of the fraction exercised");
        assert_eq!(
            explain(&snap(), "douyin", "bob", "/x")
                .decision
                .unwrap()
                .mirror,
            None
        );
    }

    /// A whitelisted user is reported as such.
    #[test]
    fn whitelist_hit() {
        let e = explain(&snap(), "douyin", "tester", "/envelopes/7/grab");
        let d = e.decision.unwrap();
        assert_eq!((d.upstream.as_str(), d.via), ("v2", "whitelist_user"));
    }

    /// With no specific match the default decides, and the others say why they missed.
    #[test]
    fn default_when_nothing_specific() {
        let e = explain(&snap(), "kuaishou", "bob", "/other");
        assert_eq!(e.decision.unwrap().rule, "default");
        assert!(
            e.considered.iter().all(|c| c.rule != "douyin-grab"),
            "not indexed for this app"
        );
        let vip = e.considered.iter().find(|c| c.rule == "vip").unwrap();
        assert_eq!(vip.reason, "user \"bob\" is not in `users`");
    }
}
