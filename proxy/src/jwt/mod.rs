//! Verified identity: JSON Web Tokens checked against the keys of a JWKS file
//! (`identity.jwt`), with the `jsonwebtoken` crate doing the JOSE parsing and the signature
//! and claim checks.
//!
//! What this module adds around the crate is what a gateway needs:
//! - a size bound checked before anything is decoded;
//! - the key chosen by `kid`, and the token's `alg` accepted only if it is both configured
//!   and one the key is for (an RSA public key is never tried as an HMAC secret, and
//!   `alg: none` is not an algorithm at all);
//! - every key checked when the file is loaded (`tidegate check` and each reload), so a bad
//!   key is refused with its place instead of failing requests later;
//! - a bounded cache of verified tokens (see [`cache`]), so a client's repeated token costs
//!   a lookup, not a signature check.

pub mod cache;
pub mod mint;

use std::str::FromStr;
use std::sync::Arc;

use base64::Engine as _;
use http::{HeaderMap, HeaderValue, header};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rules::identity::{CompiledJwt, TokenSource};
use serde_json::{Map, Value};

use self::cache::TokenCache;

/// Shortest HMAC secret accepted in a JWKS (`oct` key), in bytes.
pub const MIN_HMAC_KEY_BYTES: usize = 32;

/// Why a token was not accepted. Each has a stable code (the `error` of the 401 body, the
/// access log's `identity` field and a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenError {
    /// No token where the config says it is.
    Missing,
    /// Longer than `max_token_bytes` (checked before decoding).
    TooLarge,
    /// Not a JWS compact token (three base64url parts with JSON where JSON belongs).
    Malformed,
    /// `alg` not allowed: not configured, not one the key is for, or `none`.
    Algorithm,
    /// No key with the token's `kid` (or, without one, not exactly one key for its `alg`).
    UnknownKey,
    /// The signature does not verify.
    BadSignature,
    /// Past `exp` (plus leeway), or no `exp`.
    Expired,
    /// Before `nbf` (minus leeway).
    NotYetValid,
    /// `iss` not one of `issuers`.
    WrongIssuer,
    /// `aud` not one of `audiences`.
    WrongAudience,
    /// A required claim (`exp`, `iss`, `aud`, or one an ID is read from) is missing or not a
    /// usable string.
    BadClaim,
}

/// The IDs a verified token gives, as the header values the upstream receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    /// The user ID (from `identity.user`'s claim).
    pub user: Option<HeaderValue>,
    /// The app ID (from `identity.app`'s claim).
    pub app: Option<HeaderValue>,
}

/// The keys of a JWKS file, each checked and bound to the algorithms it may verify.
#[derive(Debug)]
pub struct KeySet {
    keys: Vec<Key>,
    /// XXH3-64 of the file's bytes: equal files give equal key sets.
    fingerprint: u64,
}

#[derive(Debug)]
struct Key {
    kid: Option<String>,
    /// The algorithms this key verifies that the config allows (never empty).
    algorithms: Vec<Algorithm>,
    decoding: DecodingKey,
}

/// Everything needed to verify a request's token: the compiled settings, the keys, one
/// prepared validation per allowed algorithm, and the cache.
#[derive(Debug)]
pub struct Verifier {
    settings: CompiledJwt,
    keys: Arc<KeySet>,
    validations: Vec<(Algorithm, Validation)>,
    cache: TokenCache,
}

// === impl TokenError ===

impl TokenError {
    /// The stable code.
    pub fn code(self) -> &'static str {
        match self {
            Self::Missing => "token_missing",
            Self::TooLarge => "token_too_large",
            Self::Malformed => "token_malformed",
            Self::Algorithm => "token_algorithm",
            Self::UnknownKey => "token_unknown_key",
            Self::BadSignature => "token_bad_signature",
            Self::Expired => "token_expired",
            Self::NotYetValid => "token_not_yet_valid",
            Self::WrongIssuer => "token_wrong_issuer",
            Self::WrongAudience => "token_wrong_audience",
            Self::BadClaim => "token_bad_claim",
        }
    }

    /// The 401 body: `{"error":"<code>"}`.
    pub fn body(self) -> &'static str {
        match self {
            Self::Missing => r#"{"error":"token_missing"}"#,
            Self::TooLarge => r#"{"error":"token_too_large"}"#,
            Self::Malformed => r#"{"error":"token_malformed"}"#,
            Self::Algorithm => r#"{"error":"token_algorithm"}"#,
            Self::UnknownKey => r#"{"error":"token_unknown_key"}"#,
            Self::BadSignature => r#"{"error":"token_bad_signature"}"#,
            Self::Expired => r#"{"error":"token_expired"}"#,
            Self::NotYetValid => r#"{"error":"token_not_yet_valid"}"#,
            Self::WrongIssuer => r#"{"error":"token_wrong_issuer"}"#,
            Self::WrongAudience => r#"{"error":"token_wrong_audience"}"#,
            Self::BadClaim => r#"{"error":"token_bad_claim"}"#,
        }
    }

    /// Every error, for tables and tests.
    pub const ALL: [TokenError; 11] = [
        Self::Missing,
        Self::TooLarge,
        Self::Malformed,
        Self::Algorithm,
        Self::UnknownKey,
        Self::BadSignature,
        Self::Expired,
        Self::NotYetValid,
        Self::WrongIssuer,
        Self::WrongAudience,
        Self::BadClaim,
    ];

    fn from_crate(e: &jsonwebtoken::errors::Error) -> Self {
        use jsonwebtoken::errors::ErrorKind as K;
        match e.kind() {
            K::InvalidSignature
            | K::InvalidEcdsaKey
            | K::InvalidEddsaKey
            | K::InvalidRsaKey(_)
            | K::InvalidKeyFormat => Self::BadSignature,
            K::ExpiredSignature => Self::Expired,
            K::ImmatureSignature => Self::NotYetValid,
            K::InvalidIssuer => Self::WrongIssuer,
            K::InvalidAudience => Self::WrongAudience,
            K::InvalidAlgorithm
            | K::InvalidAlgorithmName
            | K::UnsupportedAlgorithm
            | K::MissingAlgorithm => Self::Algorithm,
            K::MissingRequiredClaim(_) | K::InvalidClaimFormat(_) | K::InvalidSubject => {
                Self::BadClaim
            }
            _ => Self::Malformed,
        }
    }
}

// === impl KeySet ===

impl KeySet {
    /// Parse a JWKS document (`{"keys": [...]}`) for a config that allows `allowed`.
    ///
    /// Keys marked `"use": "enc"` are skipped. Every other key must be usable: a supported
    /// type and curve, material the crypto backend accepts, at least one of its algorithms
    /// allowed, and a `kid` unique in the file (required when there is more than one key).
    pub fn parse(bytes: &[u8], allowed: &[Algorithm]) -> Result<Self, String> {
        #[derive(serde::Deserialize)]
        struct Doc {
            keys: Vec<Value>,
        }
        let doc: Doc = serde_json::from_slice(bytes)
            .map_err(|e| format!("not a JWKS document ({{\"keys\": [...]}}): {e}"))?;
        let mut keys: Vec<Key> = Vec::with_capacity(doc.keys.len());
        for (i, v) in doc.keys.into_iter().enumerate() {
            let jwk: Jwk =
                serde_json::from_value(v).map_err(|e| format!("keys[{i}]: not a JWK: {e}"))?;
            if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
                continue;
            }
            let key = Key::from_jwk(&jwk, allowed).map_err(|e| match &jwk.common.key_id {
                Some(kid) => format!("keys[{i}] (kid {kid:?}): {e}"),
                None => format!("keys[{i}]: {e}"),
            })?;
            if let Some(kid) = &key.kid
                && keys.iter().any(|k| k.kid.as_ref() == Some(kid))
            {
                return Err(format!("keys[{i}]: kid {kid:?} is used by an earlier key"));
            }
            keys.push(key);
        }
        if keys.is_empty() {
            return Err("the file has no signing keys".to_owned());
        }
        if keys.len() > 1 && keys.iter().any(|k| k.kid.is_none()) {
            return Err(
                "with more than one key, every key needs a `kid` (tokens name their key by it)"
                    .to_owned(),
            );
        }
        Ok(Self {
            keys,
            fingerprint: xxhash_rust::xxh3::xxh3_64(bytes),
        })
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are none (never, for a parsed set).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key a token with this header is verified with.
    fn key_for(&self, kid: Option<&str>, alg: Algorithm) -> Result<&Key, TokenError> {
        let key = match kid {
            Some(kid) => self.keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
            // Without a `kid`, only a single key is unambiguous.
            None if self.keys.len() == 1 => self.keys.first(),
            None => None,
        }
        .ok_or(TokenError::UnknownKey)?;
        match key.algorithms.contains(&alg) {
            true => Ok(key),
            false => Err(TokenError::Algorithm),
        }
    }
}

// === impl Key ===

impl Key {
    fn from_jwk(jwk: &Jwk, allowed: &[Algorithm]) -> Result<Self, String> {
        let for_type: &[Algorithm] = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => &[
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
            ],
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => &[Algorithm::ES256],
                EllipticCurve::P384 => &[Algorithm::ES384],
                ref c => return Err(format!("curve {c:?} is not supported for signatures")),
            },
            AlgorithmParameters::OctetKeyPair(p) => match p.curve {
                EllipticCurve::Ed25519 => &[Algorithm::EdDSA],
                ref c => return Err(format!("curve {c:?} is not supported for signatures")),
            },
            AlgorithmParameters::OctetKey(_) => {
                &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512]
            }
            _ => return Err("unsupported key type (kty)".to_owned()),
        };
        // A key's own `alg` narrows it to that one algorithm.
        let own = match jwk.common.key_algorithm {
            Some(a) => Some(
                Algorithm::from_str(&a.to_string())
                    .map_err(|_| format!("alg {a} is not a signature algorithm"))?,
            ),
            None => None,
        };
        if let Some(a) = own
            && !for_type.contains(&a)
        {
            return Err(format!("alg {a:?} does not fit the key type"));
        }
        let of_key: Vec<Algorithm> = match own {
            Some(a) => vec![a],
            None => for_type.to_vec(),
        };
        let algorithms: Vec<Algorithm> = of_key
            .iter()
            .copied()
            .filter(|a| allowed.contains(a))
            .collect();
        if algorithms.is_empty() {
            return Err(format!(
                "none of the algorithms this key is for ({}) is in identity.jwt.algorithms",
                names(&of_key)
            ));
        }
        let decoding = DecodingKey::from_jwk(jwk).map_err(|e| format!("bad key material: {e}"))?;
        // RFC 7518 §3.2: an HMAC key at least as long as the hash; a short secret can be
        // brute-forced from any one token.
        if let AlgorithmParameters::OctetKey(_) = &jwk.algorithm {
            let len = decoding.try_get_as_bytes().map_or(0, <[u8]>::len);
            if len < MIN_HMAC_KEY_BYTES {
                return Err(format!(
                    "an HMAC key of {len} bytes; at least {MIN_HMAC_KEY_BYTES} are needed (RFC 7518 §3.2)"
                ));
            }
        }
        // Build a verifier now: the backend parses the key here (an RSA modulus, a curve
        // point), so a key it cannot use is refused at load, not on the first request.
        jsonwebtoken::crypto::verify("AA", b"probe", &decoding, algorithms[0])
            .map_err(|e| format!("bad key material: {e}"))?;
        Ok(Self {
            kid: jwk.common.key_id.clone(),
            algorithms,
            decoding,
        })
    }
}

fn names(algs: &[Algorithm]) -> String {
    algs.iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The algorithms named in the config (validated by `rules`), as the crate's values.
pub fn algorithms(settings: &CompiledJwt) -> Vec<Algorithm> {
    settings
        .algorithms
        .iter()
        .filter_map(|a| Algorithm::from_str(a).ok())
        .collect()
}

// === impl Verifier ===

impl Verifier {
    /// A verifier for `settings` with `keys`. When `previous` (the live one) has the same
    /// settings and keys, it is kept whole, cache included: a reload that leaves identity
    /// alone costs no re-verification.
    pub fn build(
        settings: &CompiledJwt,
        keys: Arc<KeySet>,
        previous: Option<&Arc<Verifier>>,
    ) -> Arc<Self> {
        if let Some(p) = previous
            && p.settings == *settings
            && p.keys.fingerprint == keys.fingerprint
        {
            return Arc::clone(p);
        }
        let validations = algorithms(settings)
            .into_iter()
            .map(|alg| (alg, validation(settings, alg)))
            .collect();
        Arc::new(Self {
            settings: settings.clone(),
            keys,
            validations,
            cache: TokenCache::new(settings.cache_entries),
        })
    }

    /// The compiled settings.
    pub fn settings(&self) -> &CompiledJwt {
        &self.settings
    }

    /// The keys.
    pub fn keys(&self) -> &KeySet {
        &self.keys
    }

    /// Tokens in the cache now.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// The request's token, where the config says it is, within the size bound.
    pub fn token<'h>(&self, headers: &'h HeaderMap) -> Result<&'h str, TokenError> {
        let max = self.settings.max_token_bytes;
        let raw = match &self.settings.from {
            TokenSource::Bearer => {
                let mut all = headers.get_all(header::AUTHORIZATION).iter();
                let v = all.next().ok_or(TokenError::Missing)?;
                if all.next().is_some() {
                    return Err(TokenError::Malformed);
                }
                // "Bearer " and the token: bounded before anything else is read.
                if v.len() > max + 16 {
                    return Err(TokenError::TooLarge);
                }
                let v = v.to_str().map_err(|_| TokenError::Malformed)?;
                let (scheme, rest) = v.trim().split_once(' ').ok_or(TokenError::Missing)?;
                if !scheme.eq_ignore_ascii_case("bearer") {
                    return Err(TokenError::Missing);
                }
                rest.trim()
            }
            TokenSource::Cookie(name) => {
                rules::classify::cookie(headers, name).ok_or(TokenError::Missing)?
            }
        };
        match raw.len() {
            0 => Err(TokenError::Missing),
            n if n > max => Err(TokenError::TooLarge),
            _ => Ok(raw),
        }
    }

    /// Verify `token` at `now` (Unix seconds): from the cache when it was verified before
    /// and has not expired, else by signature and claims (and then cached).
    pub fn verify(&self, token: &str, now: u64) -> Result<Arc<Ids>, TokenError> {
        if let Some(ids) = self.cache.get(token.as_bytes(), now) {
            return Ok(ids);
        }
        let (ids, exp) = self.verify_uncached(token)?;
        let ids = Arc::new(ids);
        self.cache
            .insert(token.as_bytes(), exp, Arc::clone(&ids), now);
        Ok(ids)
    }

    /// Verify by signature and claims, never looking at the cache; the IDs and `exp`.
    pub fn verify_uncached(&self, token: &str) -> Result<(Ids, u64), TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| header_error(token))?;
        let key = self.keys.key_for(header.kid.as_deref(), header.alg)?;
        let validation = self
            .validations
            .iter()
            .find(|(a, _)| *a == header.alg)
            .map(|(_, v)| v)
            .ok_or(TokenError::Algorithm)?;
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, validation)
            .map_err(|e| TokenError::from_crate(&e))?;
        let claims = data.claims;
        let exp = match claims.get("exp") {
            Some(Value::Number(n)) => n
                .as_u64()
                .or_else(|| n.as_f64().map(|f| f as u64))
                .ok_or(TokenError::BadClaim)?,
            _ => return Err(TokenError::BadClaim),
        };
        let id = |claim: Option<&str>| -> Result<Option<HeaderValue>, TokenError> {
            let Some(claim) = claim else {
                return Ok(None);
            };
            match claims.get(claim) {
                Some(Value::String(s)) if !s.is_empty() => {
                    // Shared bytes: each request's copy of the header is a reference count.
                    HeaderValue::from_maybe_shared(bytes::Bytes::from(s.clone()))
                        .map(Some)
                        .map_err(|_| TokenError::BadClaim)
                }
                _ => Err(TokenError::BadClaim),
            }
        };
        let ids = Ids {
            user: id(self.settings.user.as_ref().map(|c| &*c.claim))?,
            app: id(self.settings.app.as_ref().map(|c| &*c.claim))?,
        };
        Ok((ids, exp))
    }
}

/// The crate's checks for one algorithm under these settings: signature by `alg`, `exp`
/// required, `nbf` checked when present, both with the leeway; `iss` and `aud` required and
/// checked when the config lists any.
fn validation(s: &CompiledJwt, alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = s.leeway_s;
    v.validate_nbf = true;
    let mut required = vec!["exp"];
    if !s.issuers.is_empty() {
        v.set_issuer(&s.issuers);
        required.push("iss");
    }
    if s.audiences.is_empty() {
        v.validate_aud = false;
    } else {
        v.set_audience(&s.audiences);
        required.push("aud");
    }
    v.set_required_spec_claims(&required);
    v
}

/// Why a token header did not parse: an `alg` the crate does not know (`none` among them)
/// is an algorithm refusal, anything else malformed.
fn header_error(token: &str) -> TokenError {
    let Some(head) = token.split('.').next() else {
        return TokenError::Malformed;
    };
    let Ok(json) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(head) else {
        return TokenError::Malformed;
    };
    match serde_json::from_slice::<Map<String, Value>>(&json) {
        Ok(h) if h.get("alg").is_some_and(Value::is_string) => TokenError::Algorithm,
        _ => TokenError::Malformed,
    }
}

#[cfg(test)]
mod tests;
