//! Verification against real keys (test-only key pairs in `tests/fixtures/jwt`, made with
//! `openssl genpkey`): every refusal the issue lists, and the key file's own checks.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{EncodingKey, Header};
use rules::identity::{ClaimHeader, CompiledJwt, TokenSource};
use serde_json::json;

use super::*;

const RSA_1: &[u8] = include_bytes!("../../../tests/fixtures/jwt/rsa-1.pem");
const RSA_2: &[u8] = include_bytes!("../../../tests/fixtures/jwt/rsa-2.pem");
const EC_1: &[u8] = include_bytes!("../../../tests/fixtures/jwt/ec-1.pem");
const ED_1: &[u8] = include_bytes!("../../../tests/fixtures/jwt/ed-1.pem");
const HS_1: &[u8] = include_bytes!("../../../tests/fixtures/jwt/hs-1.secret");

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn encoding(alg: Algorithm) -> EncodingKey {
    match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(RSA_1).unwrap(),
        Algorithm::ES256 => EncodingKey::from_ec_pem(EC_1).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(ED_1).unwrap(),
        Algorithm::HS256 => EncodingKey::from_secret(HS_1).unwrap(),
        a => panic!("no test key for {a:?}"),
    }
}

/// The public JWK of a test key, with a `kid`.
fn jwk(key: &EncodingKey, alg: Algorithm, kid: &str) -> Jwk {
    let mut j = Jwk::from_encoding_key(key, alg).unwrap();
    j.common.key_id = Some(kid.to_owned());
    j
}

/// A JWKS with one key per algorithm: `rsa`, `ec`, `ed`, `hs`.
fn jwks() -> Vec<u8> {
    let keys = vec![
        jwk(&encoding(Algorithm::RS256), Algorithm::RS256, "rsa"),
        jwk(&encoding(Algorithm::ES256), Algorithm::ES256, "ec"),
        jwk(&encoding(Algorithm::EdDSA), Algorithm::EdDSA, "ed"),
        jwk(&encoding(Algorithm::HS256), Algorithm::HS256, "hs"),
    ];
    serde_json::to_vec(&JwkSet { keys }).unwrap()
}

fn settings() -> CompiledJwt {
    CompiledJwt {
        jwks_file: "jwks.json".into(),
        from: TokenSource::Bearer,
        algorithms: ["RS256", "ES256", "EdDSA", "HS256"]
            .map(Into::into)
            .to_vec(),
        issuers: vec!["https://id.example".into()],
        audiences: vec!["tidegate".into()],
        leeway_s: 30,
        required: true,
        max_token_bytes: 4096,
        cache_entries: 1000,
        user: Some(ClaimHeader {
            claim: "sub".into(),
            header: http::HeaderName::from_static("x-user-id"),
        }),
        app: Some(ClaimHeader {
            claim: "azp".into(),
            header: http::HeaderName::from_static("x-app-id"),
        }),
    }
}

fn verifier() -> Arc<Verifier> {
    let s = settings();
    let keys = KeySet::parse(&jwks(), &algorithms(&s)).unwrap();
    Verifier::build(&s, Arc::new(keys), None)
}

fn claims() -> serde_json::Value {
    json!({
        "sub": "alice", "azp": "shop", "iss": "https://id.example", "aud": "tidegate",
        "exp": now() + 600, "iat": now(),
    })
}

fn mint(alg: Algorithm, kid: &str, claims: &serde_json::Value) -> String {
    let mut h = Header::new(alg);
    h.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&h, claims, &encoding(alg)).unwrap()
}

fn b64(v: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

/// Each algorithm the issue names verifies, giving the user and app claims.
#[test]
fn each_algorithm_verifies() {
    let v = verifier();
    for (alg, kid) in [
        (Algorithm::RS256, "rsa"),
        (Algorithm::ES256, "ec"),
        (Algorithm::EdDSA, "ed"),
        (Algorithm::HS256, "hs"),
    ] {
        let (ids, exp) = v
            .verify_uncached(&mint(alg, kid, &claims()))
            .unwrap_or_else(|e| panic!("{alg:?}: {e:?}"));
        assert_eq!(ids.user.unwrap(), "alice", "{alg:?}");
        assert_eq!(ids.app.unwrap(), "shop", "{alg:?}");
        assert!(exp > now());
    }
}

/// Every refusal, with its code.
#[test]
fn refusals() {
    let v = verifier();
    let good = mint(Algorithm::ES256, "ec", &claims());
    let check = |t: &str| v.verify_uncached(t).map(|_| ()).unwrap_err();

    // A bad signature: another key's signature under this key's kid.
    let other = {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some("rsa".into());
        jsonwebtoken::encode(&h, &claims(), &EncodingKey::from_rsa_pem(RSA_2).unwrap()).unwrap()
    };
    assert_eq!(check(&other), TokenError::BadSignature);
    // One flipped signature character.
    let mut flipped = good.clone().into_bytes();
    let last = flipped.len() - 5;
    flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
    assert_eq!(
        check(std::str::from_utf8(&flipped).unwrap()),
        TokenError::BadSignature
    );

    // `alg: none`, with and without a signature.
    let body = b64(&serde_json::to_vec(&claims()).unwrap());
    let none = b64(br#"{"alg":"none","typ":"JWT"}"#);
    assert_eq!(check(&format!("{none}.{body}.")), TokenError::Algorithm);
    let none_kid = b64(br#"{"alg":"none","kid":"ec"}"#);
    assert_eq!(check(&format!("{none_kid}.{body}.")), TokenError::Algorithm);

    // Algorithm confusion: HS256 signed with the RSA key's public half (as an attacker
    // would, from the published JWKS), naming the RSA key. HS256 is allowed by the config,
    // but not for that key.
    let rsa_public = jwk(&encoding(Algorithm::RS256), Algorithm::RS256, "rsa");
    let AlgorithmParameters::RSA(p) = &rsa_public.algorithm else {
        unreachable!()
    };
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&p.n)
        .unwrap();
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("rsa".into());
    let confused =
        jsonwebtoken::encode(&h, &claims(), &EncodingKey::from_secret(&secret).unwrap()).unwrap();
    assert_eq!(check(&confused), TokenError::Algorithm);
    // The same with the PEM text of the public key as the secret.
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("rsa".into());
    let confused_pem =
        jsonwebtoken::encode(&h, &claims(), &EncodingKey::from_secret(RSA_1).unwrap()).unwrap();
    assert_eq!(check(&confused_pem), TokenError::Algorithm);

    // Unknown kid; no kid with several keys.
    assert_eq!(
        check(&mint(Algorithm::ES256, "gone", &claims())),
        TokenError::UnknownKey
    );
    let no_kid = jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        &claims(),
        &encoding(Algorithm::ES256),
    )
    .unwrap();
    assert_eq!(check(&no_kid), TokenError::UnknownKey);

    // Time: expired beyond the leeway, not yet valid beyond it; within it, fine.
    let mut c = claims();
    c["exp"] = json!(now() - 120);
    assert_eq!(
        check(&mint(Algorithm::ES256, "ec", &c)),
        TokenError::Expired
    );
    c["exp"] = json!(now() - 5);
    assert!(v.verify_uncached(&mint(Algorithm::ES256, "ec", &c)).is_ok());
    let mut c = claims();
    c["nbf"] = json!(now() + 600);
    assert_eq!(
        check(&mint(Algorithm::ES256, "ec", &c)),
        TokenError::NotYetValid
    );

    // Issuer and audience: wrong, and missing (required when configured).
    for (claim, value, want) in [
        (
            "iss",
            json!("https://evil.example"),
            TokenError::WrongIssuer,
        ),
        ("aud", json!("someone-else"), TokenError::WrongAudience),
    ] {
        let mut c = claims();
        c[claim] = value;
        assert_eq!(check(&mint(Algorithm::ES256, "ec", &c)), want, "{claim}");
        let mut c = claims();
        c.as_object_mut().unwrap().remove(claim);
        assert_eq!(
            check(&mint(Algorithm::ES256, "ec", &c)),
            TokenError::BadClaim,
            "no {claim}"
        );
    }
    // No exp; the ID claim missing or not a string.
    for (claim, value) in [
        ("exp", None),
        ("sub", None),
        ("sub", Some(json!(42))),
        ("sub", Some(json!("bad\nid"))),
    ] {
        let mut c = claims();
        match value {
            Some(v) => c[claim] = v,
            None => {
                c.as_object_mut().unwrap().remove(claim);
            }
        }
        assert_eq!(
            check(&mint(Algorithm::ES256, "ec", &c)),
            TokenError::BadClaim,
            "{claim}"
        );
    }

    // Not a token.
    let bad_body = format!("{}.!!!.x", b64(br#"{"alg":"ES256","kid":"ec"}"#));
    for junk in ["", "a.b", "a.b.c", "....", &bad_body] {
        assert_eq!(check(junk), TokenError::Malformed, "{junk:?}");
    }
}

/// Where the token is, and the size bound applied before decoding.
#[test]
fn finding_the_token() {
    let v = verifier();
    let mut h = HeaderMap::new();
    assert_eq!(v.token(&h), Err(TokenError::Missing));
    h.insert(header::AUTHORIZATION, "Basic dXNlcjpwdw==".parse().unwrap());
    assert_eq!(v.token(&h), Err(TokenError::Missing));
    h.insert(
        header::AUTHORIZATION,
        "bearer  abc.def.ghi ".parse().unwrap(),
    );
    assert_eq!(v.token(&h), Ok("abc.def.ghi"));
    h.append(header::AUTHORIZATION, "Bearer x.y.z".parse().unwrap());
    assert_eq!(v.token(&h), Err(TokenError::Malformed), "two Authorization");
    let mut h = HeaderMap::new();
    let big = format!("Bearer {}", "a".repeat(4097));
    h.insert(header::AUTHORIZATION, big.parse().unwrap());
    assert_eq!(v.token(&h), Err(TokenError::TooLarge));
    let huge = format!("Bearer {}", "a".repeat(60_000));
    h.insert(header::AUTHORIZATION, huge.parse().unwrap());
    assert_eq!(v.token(&h), Err(TokenError::TooLarge));

    let mut s = settings();
    s.from = TokenSource::Cookie("session".into());
    let keys = KeySet::parse(&jwks(), &algorithms(&s)).unwrap();
    let c = Verifier::build(&s, Arc::new(keys), None);
    let mut h = HeaderMap::new();
    h.insert(header::COOKIE, "a=1; session=t.o.k".parse().unwrap());
    assert_eq!(c.token(&h), Ok("t.o.k"));
}

/// A verified token is served from the cache until its `exp`, then verified again (and
/// refused once expired).
#[test]
fn cached_until_expiry() {
    let v = verifier();
    let t = mint(Algorithm::RS256, "rsa", &claims());
    let n = now();
    assert_eq!(v.verify(&t, n).unwrap().user.as_ref().unwrap(), "alice");
    assert_eq!(v.cached(), 1);
    assert!(v.verify(&t, n + 1).is_ok());
    assert_eq!(v.cached(), 1);
    // A refused token is never cached.
    let mut c = claims();
    c["iss"] = json!("https://evil.example");
    assert!(v.verify(&mint(Algorithm::RS256, "rsa", &c), n).is_err());
    assert_eq!(v.cached(), 1);
    // Past exp the cache does not answer; the real check does (expired: the crate reads
    // the real clock, the token's exp is 600 s away, so fake it with a short-lived one).
    let mut c = claims();
    c["exp"] = json!(n + 2);
    let short = mint(Algorithm::RS256, "rsa", &c);
    assert!(v.verify(&short, n).is_ok());
    assert!(v.cache.get(short.as_bytes(), n + 1).is_some());
    assert!(v.cache.get(short.as_bytes(), n + 2).is_none());
}

/// A reload with the same settings and keys keeps the verifier (and its cache); new keys
/// make a new one.
#[test]
fn rebuilt_only_on_change() {
    let v = verifier();
    let s = settings();
    let same = Verifier::build(
        &s,
        Arc::new(KeySet::parse(&jwks(), &algorithms(&s)).unwrap()),
        Some(&v),
    );
    assert!(Arc::ptr_eq(&v, &same));
    let one = serde_json::to_vec(&JwkSet {
        keys: vec![jwk(&encoding(Algorithm::ES256), Algorithm::ES256, "ec")],
    })
    .unwrap();
    let other = Verifier::build(
        &s,
        Arc::new(KeySet::parse(&one, &algorithms(&s)).unwrap()),
        Some(&v),
    );
    assert!(!Arc::ptr_eq(&v, &other));
    assert_eq!(other.keys().len(), 1);
}

/// The key file's checks, each with its place.
#[test]
fn key_file_checks() {
    let all = algorithms(&settings());
    let err = |doc: serde_json::Value, allowed: &[Algorithm]| {
        KeySet::parse(&serde_json::to_vec(&doc).unwrap(), allowed).unwrap_err()
    };
    let ec =
        serde_json::to_value(jwk(&encoding(Algorithm::ES256), Algorithm::ES256, "ec")).unwrap();
    let rsa =
        serde_json::to_value(jwk(&encoding(Algorithm::RS256), Algorithm::RS256, "rsa")).unwrap();

    assert!(
        KeySet::parse(b"[]", &all)
            .unwrap_err()
            .contains("not a JWKS")
    );
    assert!(err(json!({"keys": []}), &all).contains("no signing keys"));
    let dup = err(json!({"keys": [ec.clone(), ec.clone()]}), &all);
    assert!(
        dup.contains("keys[1]") && dup.contains("earlier key"),
        "{dup}"
    );
    let not_allowed = err(json!({"keys": [rsa.clone()]}), &[Algorithm::ES256]);
    assert!(
        not_allowed.starts_with("keys[0] (kid \"rsa\")") && not_allowed.contains("RS256"),
        "{not_allowed}"
    );
    // A point that is not on the curve.
    let mut off_curve = ec.clone();
    off_curve["y"] = json!(b64(&[7u8; 32]));
    let bad = err(json!({"keys": [off_curve]}), &all);
    assert!(bad.contains("bad key material"), "{bad}");
    let short_hmac = err(
        json!({"keys": [{"kty": "oct", "kid": "h", "k": b64(b"sixteen-byte-key")}]}),
        &all,
    );
    assert!(short_hmac.contains("HMAC key of 16 bytes"), "{short_hmac}");
    let unknown = err(json!({"keys": [{"kty": "XYZ", "kid": "k"}]}), &all);
    assert!(unknown.starts_with("keys[0]"), "{unknown}");
    let mut no_kid = ec.clone();
    no_kid.as_object_mut().unwrap().remove("kid");
    assert!(err(json!({"keys": [no_kid, rsa.clone()]}), &all).contains("needs a `kid`"));
    // An encryption key is skipped, not refused.
    let mut enc = serde_json::from_value::<Jwk>(rsa.clone()).unwrap();
    enc.common.public_key_use = Some(PublicKeyUse::Encryption);
    enc.common.key_id = Some("enc".into());
    let set = KeySet::parse(
        &serde_json::to_vec(&json!({"keys": [ec, enc]})).unwrap(),
        &all,
    )
    .unwrap();
    assert_eq!(set.len(), 1);
}
