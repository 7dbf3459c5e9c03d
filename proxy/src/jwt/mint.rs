//! `tidegate token` and `tidegate jwks`: mint a token from a private key file and print the
//! JWKS of its public half, for tests, rehearsals and the docs' examples. Signing is the
//! `jsonwebtoken` crate's; this only reads the key file and assembles the claims.

use std::path::Path;
use std::str::FromStr;

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value};

/// The signing key in `path` for `alg`: a PEM private key (PKCS#8, or PKCS#1 for RSA) for
/// the asymmetric algorithms, the file's bytes (a trailing newline dropped) for `HS*`.
pub fn signing_key(path: &Path, alg: &str) -> Result<(EncodingKey, Algorithm), String> {
    let alg = Algorithm::from_str(alg).map_err(|_| {
        format!(
            "unknown algorithm {alg:?}; one of {}",
            rules::identity::ALGORITHMS.join(", ")
        )
    })?;
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let key = match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            let secret = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
            EncodingKey::from_secret(secret)
        }
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&bytes),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&bytes),
        _ => EncodingKey::from_rsa_pem(&bytes),
    }
    .map_err(|e| format!("{}: not a {alg:?} key: {e}", path.display()))?;
    Ok((key, alg))
}

/// What goes into a minted token.
#[derive(Debug, Default)]
pub struct Claims {
    /// `sub`.
    pub sub: Option<String>,
    /// `iss`.
    pub iss: Option<String>,
    /// `aud`.
    pub aud: Option<String>,
    /// Lifetime: `exp` is `now + ttl_s`.
    pub ttl_s: i64,
    /// `nbf` as `now + nbf_in_s`, when set.
    pub nbf_in_s: Option<i64>,
    /// More string claims, `name=value`.
    pub extra: Vec<(String, String)>,
}

/// A signed token with these claims at `now` (Unix seconds).
pub fn token(
    key: &EncodingKey,
    alg: Algorithm,
    kid: Option<&str>,
    c: &Claims,
    now: i64,
) -> Result<String, String> {
    let mut claims = Map::new();
    let mut put = |k: &str, v: Value| {
        claims.insert(k.to_owned(), v);
    };
    for (k, v) in &c.extra {
        put(k, Value::String(v.clone()));
    }
    if let Some(s) = &c.sub {
        put("sub", s.clone().into());
    }
    if let Some(s) = &c.iss {
        put("iss", s.clone().into());
    }
    if let Some(s) = &c.aud {
        put("aud", s.clone().into());
    }
    put("iat", now.into());
    put("exp", (now + c.ttl_s).into());
    if let Some(n) = c.nbf_in_s {
        put("nbf", (now + n).into());
    }
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, &claims, key).map_err(|e| format!("cannot sign: {e}"))
}

/// A JWKS (pretty JSON) with the public half of `key` under `kid`.
pub fn jwks(key: &EncodingKey, alg: Algorithm, kid: &str) -> Result<String, String> {
    let mut jwk = Jwk::from_encoding_key(key, alg).map_err(|e| format!("{e}"))?;
    jwk.common.key_id = Some(kid.to_owned());
    serde_json::to_string_pretty(&JwkSet { keys: vec![jwk] }).map_err(|e| e.to_string())
}
