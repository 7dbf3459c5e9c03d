//! Validation of `identity.jwt` and of the claim extractors that read it.

use http::HeaderName;

use crate::classify::CompiledExtractor;
use crate::error::JsonPath;
use crate::identity::{ALGORITHMS, ClaimHeader, CompiledJwt, TokenSource};
use crate::model::{Config, Extractor, TokenFrom};

use super::Validator;

/// Largest `identity.jwt.max_token_bytes`.
const MAX_TOKEN_BYTES: u64 = 65_536;
/// Largest `identity.jwt.cache_entries`.
const MAX_CACHE_ENTRIES: u64 = 4_194_304;
/// Headers the gateway may not set from a claim: framing, routing and the token itself.
const RESERVED_HEADERS: [&str; 11] = [
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "te",
    "upgrade",
    "keep-alive",
    "authorization",
    "cookie",
    "x-forwarded-for",
    "forwarded",
];

impl Validator<'_> {
    /// `{"claim": "..."}` for `field` (`app` or `user`): classified by the header the
    /// gateway writes the verified claim into.
    pub(super) fn claim_extractor(
        &mut self,
        c: &Config,
        path: JsonPath,
        field: &str,
        claim: &str,
    ) -> Option<CompiledExtractor> {
        let Some(jwt) = &c.identity.jwt else {
            self.err(
                path,
                "reads a claim of the verified token, but identity.jwt is not set",
            );
            return None;
        };
        if claim.is_empty() {
            self.err(path, "name must not be empty");
            return None;
        }
        let (key, header) = match field {
            "user" => ("user_header", &jwt.user_header),
            _ => ("app_header", &jwt.app_header),
        };
        let hp = JsonPath::root().key("identity").key("jwt").key(key);
        self.header_name(hp, header).map(CompiledExtractor::Header)
    }

    /// `identity.jwt`, compiled (`None` when absent or invalid; the issues say which).
    pub(super) fn jwt(&mut self, c: &Config) -> Option<CompiledJwt> {
        let j = c.identity.jwt.as_ref()?;
        let p = JsonPath::root().key("identity").key("jwt");
        let before = self.issues.len();
        if j.jwks_file.trim().is_empty() {
            self.err(p.key("jwks_file"), "name the JWKS file with the keys");
        }
        if j.algorithms.is_empty() {
            self.err(
                p.key("algorithms"),
                "list the accepted algorithms (e.g. [\"ES256\"])",
            );
        }
        for (i, a) in j.algorithms.iter().enumerate() {
            if a.eq_ignore_ascii_case("none") {
                self.err(
                    p.key("algorithms").index(i),
                    "`none` is never accepted: a token must be signed",
                );
            } else if !ALGORITHMS.contains(&a.as_str()) {
                self.err(
                    p.key("algorithms").index(i),
                    format!("unknown algorithm {a:?}; one of {}", ALGORITHMS.join(", ")),
                );
            }
        }
        for (key, list) in [("issuers", &j.issuers), ("audiences", &j.audiences)] {
            for (i, v) in list.iter().enumerate() {
                if v.is_empty() {
                    self.err(p.key(key).index(i), "must not be empty");
                }
            }
        }
        self.range(p.key("leeway_s"), j.leeway_s, 0, 300);
        self.range(
            p.key("max_token_bytes"),
            j.max_token_bytes.into(),
            128,
            MAX_TOKEN_BYTES,
        );
        self.range(
            p.key("cache_entries"),
            j.cache_entries.into(),
            0,
            MAX_CACHE_ENTRIES,
        );
        let from = match &j.from {
            TokenFrom::Bearer => TokenSource::Bearer,
            TokenFrom::Cookie(name) => {
                if name.is_empty() {
                    self.err(p.key("from").key("cookie"), "name must not be empty");
                }
                TokenSource::Cookie(name.as_str().into())
            }
        };
        let user = self.claim_header(&c.identity.user, p.key("user_header"), &j.user_header);
        let app = self.claim_header(&c.identity.app, p.key("app_header"), &j.app_header);
        if let (Some(u), Some(a)) = (&user, &app)
            && u.header == a.header
        {
            self.err(
                p.key("app_header"),
                "the user and app IDs need different headers",
            );
        }
        (self.issues.len() == before).then(|| CompiledJwt {
            jwks_file: j.jwks_file.as_str().into(),
            from,
            algorithms: j.algorithms.iter().map(|a| a.as_str().into()).collect(),
            issuers: j.issuers.clone(),
            audiences: j.audiences.clone(),
            leeway_s: j.leeway_s,
            required: j.required,
            max_token_bytes: j.max_token_bytes as usize,
            cache_entries: j.cache_entries as usize,
            user,
            app,
        })
    }

    /// The claim and forwarding header of one ID, when its extractor reads a claim.
    fn claim_header(
        &mut self,
        extractor: &Extractor,
        path: JsonPath,
        header: &str,
    ) -> Option<ClaimHeader> {
        let Extractor::Claim(claim) = extractor else {
            return None;
        };
        let name = HeaderName::from_bytes(header.as_bytes()).ok()?;
        if RESERVED_HEADERS.contains(&name.as_str()) {
            self.err(
                path,
                format!("{header:?} cannot carry an ID: the gateway needs it for itself"),
            );
            return None;
        }
        Some(ClaimHeader {
            claim: claim.as_str().into(),
            header: name,
        })
    }
}
