//! Verified identity (`identity.jwt`), end to end: a real gateway started from a config file
//! with a JWKS beside it, a recording upstream, tokens signed with test keys
//! (`tests/fixtures/jwt`, made with `openssl genpkey`). Every refusal answers 401 and
//! reaches nothing; a valid token's user is the user, whatever headers the client adds;
//! keys rotate under load without a failed request; `tidegate token` and `tidegate jwks`
//! produce what the gateway accepts.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use http::{Request, StatusCode};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tidegate_tests::{
    ChildGateway, Reply, TIMEOUT, Upstream, api, config, full, h1_client, send, set, tidegate_bin,
    tidegate_check,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/jwt")
        .join(name)
}

fn key(name: &str, alg: Algorithm) -> EncodingKey {
    let bytes = std::fs::read(fixture(name)).unwrap();
    match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&bytes).unwrap(),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&bytes).unwrap(),
        a => panic!("{a:?}"),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A JWKS document with the public halves of `keys` (`(file, alg, kid)`).
fn jwks(keys: &[(&str, Algorithm, &str)]) -> Vec<u8> {
    let keys = keys
        .iter()
        .map(|(file, alg, kid)| {
            let mut j = Jwk::from_encoding_key(&key(file, *alg), *alg).unwrap();
            j.common.key_id = Some((*kid).to_owned());
            j
        })
        .collect();
    serde_json::to_vec_pretty(&JwkSet { keys }).unwrap()
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "azp": "shop", "iss": "https://id.test", "aud": "tidegate",
           "exp": now() + 600})
}

fn mint(file: &str, alg: Algorithm, kid: &str, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&h, claims, &key(file, alg)).unwrap()
}

fn b64(v: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

/// A gateway config with JWT identity (`sub` → user, `azp` → app) in front of `up`.
fn jwt_config(up: &Upstream, required: bool) -> Value {
    let mut c = config(&[up.addr]);
    set(&mut c, "identity/user", json!({"claim": "sub"}));
    set(&mut c, "identity/app", json!({"claim": "azp"}));
    set(
        &mut c,
        "identity/jwt",
        json!({
            "jwks_file": "jwks.json",
            "algorithms": ["RS256", "ES256", "HS256"],
            "issuers": ["https://id.test"],
            "audiences": ["tidegate"],
            "leeway_s": 5,
            "required": required,
            "max_token_bytes": 2048
        }),
    );
    c
}

/// A JWT gateway with one ES256 key (`kid` `ec`) and a per-user limit of `burst` a minute,
/// started in `dir`.
async fn limited_per_user(dir: &Path, up: &Upstream, required: bool, burst: u32) -> api::Server {
    let mut c = jwt_config(up, required);
    set(
        &mut c,
        "limits",
        json!([{ "name": "per-user", "key": ["user"], "rate": "1/min", "burst": burst }]),
    );
    start_in(dir, &c, &jwks(&[("ec-1.pem", Algorithm::ES256, "ec")])).await
}

/// Write `config` and `jwks` into `dir` and start a gateway from the file.
async fn start_in(dir: &Path, config: &Value, jwks: &[u8]) -> api::Server {
    std::fs::write(dir.join("jwks.json"), jwks).unwrap();
    let file = dir.join("tidegate.json");
    std::fs::write(&file, serde_json::to_vec_pretty(config).unwrap()).unwrap();
    tokio::time::timeout(TIMEOUT, api::start_from_file(&file))
        .await
        .expect("starts in time")
        .expect("starts")
}

async fn get_with(
    addr: std::net::SocketAddr,
    token: Option<&str>,
    headers: &[(&str, &str)],
) -> Reply {
    let mut b = Request::get(format!("http://{addr}/envelopes/1"));
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(&h1_client(), b.body(full("")).unwrap()).await
}

/// Each bad token answers 401 with its code and `WWW-Authenticate`, and the upstream is
/// never asked; the good token is forwarded with the verified IDs, the client's copies
/// dropped.
#[tokio::test]
async fn every_refusal_is_401_and_reaches_nothing() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = [
        ("rsa-1.pem", Algorithm::RS256, "rsa"),
        ("ec-1.pem", Algorithm::ES256, "ec"),
    ];
    let server = start_in(dir.path(), &jwt_config(&up, true), &jwks(&keys)).await;
    let gw = server.listen_addrs[0];

    let good = mint("ec-1.pem", Algorithm::ES256, "ec", &claims("alice"));
    let body = b64(&serde_json::to_vec(&claims("alice")).unwrap());
    // HS256 signed with the RSA key's public modulus, naming the RSA key.
    let confused = {
        let rsa =
            Jwk::from_encoding_key(&key("rsa-1.pem", Algorithm::RS256), Algorithm::RS256).unwrap();
        let jsonwebtoken::jwk::AlgorithmParameters::RSA(p) = rsa.algorithm else {
            unreachable!()
        };
        let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(p.n)
            .unwrap();
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("rsa".into());
        jsonwebtoken::encode(&h, &claims("alice"), &EncodingKey::from_secret(&n).unwrap()).unwrap()
    };
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = claims("alice");
        f(&mut c);
        mint("ec-1.pem", Algorithm::ES256, "ec", &c)
    };
    let bad_signature = {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some("rsa".into());
        jsonwebtoken::encode(&h, &claims("alice"), &key("rsa-2.pem", Algorithm::RS256)).unwrap()
    };
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no token", None, "token_missing"),
        ("bad signature", Some(bad_signature), "token_bad_signature"),
        (
            "alg none",
            Some(format!("{}.{body}.", b64(br#"{"alg":"none","kid":"ec"}"#))),
            "token_algorithm",
        ),
        ("RSA key as HMAC secret", Some(confused), "token_algorithm"),
        (
            "unknown kid",
            Some(mint("ec-1.pem", Algorithm::ES256, "gone", &claims("alice"))),
            "token_unknown_key",
        ),
        (
            "expired",
            Some(with(&|c| c["exp"] = json!(now() - 60))),
            "token_expired",
        ),
        (
            "not yet valid",
            Some(with(&|c| c["nbf"] = json!(now() + 600))),
            "token_not_yet_valid",
        ),
        (
            "wrong issuer",
            Some(with(&|c| c["iss"] = json!("https://evil.test"))),
            "token_wrong_issuer",
        ),
        (
            "wrong audience",
            Some(with(&|c| c["aud"] = json!("other"))),
            "token_wrong_audience",
        ),
        (
            "over the size bound",
            Some("a".repeat(3000)),
            "token_too_large",
        ),
        ("not a token", Some("x.y.z".to_owned()), "token_malformed"),
    ];
    for (what, token, code) in &cases {
        let r = get_with(gw, token.as_deref(), &[("x-user-id", "vip")]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}: {}", r.text());
        assert_eq!(r.json()["error"], *code, "{what}");
        let www = r.headers["www-authenticate"].to_str().unwrap();
        match *code {
            "token_missing" => assert_eq!(www, "Bearer", "{what}"),
            _ => assert_eq!(www, r#"Bearer error="invalid_token""#, "{what}"),
        }
        assert_eq!(up.hits(), 0, "{what}: reached the upstream");
        println!("{what}: {} {code}, upstream hits {}", r.status, up.hits());
    }

    let r = get_with(
        gw,
        Some(&good),
        &[("x-user-id", "vip"), ("x-app-id", "evil")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let seen = up.seen();
    let h = &seen[0].headers;
    let all = |n: &str| h.get_all(n).iter().collect::<Vec<_>>();
    assert_eq!(
        all("x-user-id"),
        ["alice"],
        "the verified user, not the client's"
    );
    assert_eq!(all("x-app-id"), ["shop"]);
    assert!(server.shutdown().await);
}

/// One valid token sending many `x-user-id` values is one user to a per-user limit: the
/// burst is spent, then 429, and the upstream saw the verified user every time.
#[tokio::test]
async fn a_token_is_limited_as_its_user_whatever_it_claims() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = limited_per_user(dir.path(), &up, true, 3).await;
    let gw = server.listen_addrs[0];
    let token = mint("ec-1.pem", Algorithm::ES256, "ec", &claims("alice"));
    let mut statuses = Vec::new();
    for i in 0..10 {
        let fake = format!("fresh-user-{i}");
        let r = get_with(gw, Some(&token), &[("x-user-id", &fake)]).await;
        statuses.push(r.status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429, 429, 429, 429, 429, 429]);
    let users: Vec<_> = up
        .seen()
        .iter()
        .map(|s| s.headers["x-user-id"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(users, ["alice", "alice", "alice"]);
    // Another user's token has a quota of its own.
    let bob = mint("ec-1.pem", Algorithm::ES256, "ec", &claims("bob"));
    assert_eq!(get_with(gw, Some(&bob), &[]).await.status, StatusCode::OK);
    // `Connection: x-user-id` cannot take the verified user away from the upstream.
    let r = get_with(
        gw,
        Some(&bob),
        &[("connection", "x-user-id"), ("x-user-id", "vip")],
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert_eq!(up.hits(), 4);
    assert!(server.shutdown().await);
}

/// `required: false`: a request without a valid token is anonymous: its client-sent user
/// is dropped (the upstream sees none) and it is limited by its client address.
#[tokio::test]
async fn not_required_means_anonymous() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = limited_per_user(dir.path(), &up, false, 2).await;
    let gw = server.listen_addrs[0];
    let expired = mint(
        "ec-1.pem",
        Algorithm::ES256,
        "ec",
        &json!({"sub": "alice", "iss": "https://id.test", "aud": "tidegate", "exp": now() - 60}),
    );
    let mut statuses = Vec::new();
    for (i, token) in [None, Some(expired.as_str()), None].into_iter().enumerate() {
        let fake = format!("u{i}");
        statuses.push(get_with(gw, token, &[("x-user-id", &fake)]).await.status);
    }
    // One client address, one quota of 2, whatever the claimed users.
    assert_eq!(statuses, [200, 200, 429]);
    for s in up.seen() {
        assert!(s.headers.get("x-user-id").is_none(), "{:?}", s.headers);
    }
    assert!(server.shutdown().await);
}

/// Key rotation under load: clients with tokens of the old key keep going while the new
/// key is added; both verify during the overlap (0 failed requests for either), and once
/// the old key is removed its tokens are refused while the new key's pass.
#[tokio::test]
async fn keys_rotate_under_load_without_a_failed_request() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let c = jwt_config(&up, true);
    let old = ("rsa-1.pem", Algorithm::RS256, "2026-old");
    let new = ("ec-2.pem", Algorithm::ES256, "2026-new");
    let server = start_in(dir.path(), &c, &jwks(&[old])).await;
    let gw = server.listen_addrs[0];
    let reloader = server.reloader.clone().expect("started from a file");
    let old_token = mint(old.0, old.1, old.2, &claims("alice"));
    let new_token = mint(new.0, new.1, new.2, &claims("bob"));
    // Before: the new key is unknown.
    assert_eq!(
        get_with(gw, Some(&new_token), &[]).await.status,
        StatusCode::UNAUTHORIZED
    );

    let write = |keys: &[(&str, Algorithm, &str)]| {
        // Atomically, as operators (and config management) replace files.
        let tmp = dir.path().join(".jwks.json.tmp");
        std::fs::write(&tmp, jwks(keys)).unwrap();
        std::fs::rename(&tmp, dir.path().join("jwks.json")).unwrap();
    };
    let overlap = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for w in 0..4 {
        let (old_token, new_token) = (old_token.clone(), new_token.clone());
        let (overlap, stop, sent, failed) =
            (overlap.clone(), stop.clone(), sent.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                // Half the workers use the new key once the overlap has begun.
                let use_new = w % 2 == 1 && overlap.load(Ordering::Relaxed);
                let t = if use_new { &new_token } else { &old_token };
                let r = get_with(gw, Some(t), &[]).await;
                sent.fetch_add(1, Ordering::Relaxed);
                if r.status != StatusCode::OK {
                    failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("worker {w} request {i}: {} {}", r.status, r.text());
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    write(&[old, new]);
    api::apply_written(&reloader).await;
    overlap.store(true, Ordering::Relaxed);
    // Rewrite the overlap file in another order: a reload in the middle of the load.
    tokio::time::sleep(Duration::from_millis(300)).await;
    write(&[new, old]);
    reloader.reload("test", Instant::now()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("rotation overlap: {sent} requests, {failed} failed");
    assert!(sent > 40, "too little load to mean anything: {sent}");
    assert_eq!(failed, 0);

    // The old key retired: its tokens are refused, the new key's pass.
    write(&[new]);
    api::apply_written(&reloader).await;
    let r = get_with(gw, Some(&old_token), &[]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["error"], "token_unknown_key");
    assert_eq!(
        get_with(gw, Some(&new_token), &[]).await.status,
        StatusCode::OK
    );
    // A broken key file is refused and the keys stay as they were.
    std::fs::write(
        dir.path().join("jwks.json"),
        b"{\"keys\": [{\"kty\": \"EC\"}]}",
    )
    .unwrap();
    assert_eq!(
        reloader.reload("test", Instant::now()).await,
        api::ReloadOutcome::Failed
    );
    assert_eq!(
        get_with(gw, Some(&new_token), &[]).await.status,
        StatusCode::OK
    );
    assert!(server.shutdown().await);
}

/// `tidegate jwks` prints the public half of a key; `tidegate token` mints a token with
/// it; the gateway accepts that token; `tidegate check` accepts the config and refuses a
/// key file it cannot use, naming the key.
#[tokio::test]
async fn the_cli_mints_what_the_gateway_accepts() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pem = fixture("ec-2.pem");
    let out = Command::new(tidegate_bin())
        .args(["jwks", "--alg", "ES256", "--kid", "cli-key", "--key"])
        .arg(&pem)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let jwks_doc = out.stdout;
    assert!(
        !String::from_utf8_lossy(&jwks_doc).contains("\"d\""),
        "no private part"
    );
    let out = Command::new(tidegate_bin())
        .args([
            "token", "--alg", "ES256", "--kid", "cli-key", "--sub", "carol",
        ])
        .args([
            "--claim",
            "azp=shop",
            "--iss",
            "https://id.test",
            "--aud",
            "tidegate",
        ])
        .args(["--ttl", "300", "--key"])
        .arg(&pem)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    let config = jwt_config(&up, true);
    let server = start_in(dir.path(), &config, &jwks_doc).await;
    let (code, err) = tidegate_check(&dir.path().join("tidegate.json"));
    assert_eq!(code, Some(0), "{err}");
    let r = get_with(server.listen_addrs[0], Some(&token), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(up.seen()[0].headers["x-user-id"], "carol");
    assert!(server.shutdown().await);

    // A key whose point is not on its curve: refused by check, at the key.
    let mut doc: Value = serde_json::from_slice(&jwks_doc).unwrap();
    doc["keys"][0]["y"] = json!(b64(&[7u8; 32]));
    std::fs::write(
        dir.path().join("jwks.json"),
        serde_json::to_vec(&doc).unwrap(),
    )
    .unwrap();
    let (code, err) = tidegate_check(&dir.path().join("tidegate.json"));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("identity.jwt.jwks_file") && err.contains("kid \"cli-key\""),
        "{err}"
    );
}

/// The README's example stays true: `config/tidegate-jwt.json` with its demo key file
/// accepts a token minted by the README's `tidegate token` command (here in front of a
/// recording upstream on free ports), and refuses a request without one.
#[tokio::test]
async fn the_example_config_accepts_the_readme_token() {
    let up = Upstream::start().await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("config/tidegate-jwt.json")).unwrap();
    let mut c: Value = serde_json::from_str(&text).unwrap();
    set(&mut c, "server/listeners/0/address", json!("127.0.0.1:0"));
    set(&mut c, "server/admin/address", json!("127.0.0.1:0"));
    set(&mut c, "server/access_log/enabled", json!(false));
    set(
        &mut c,
        "upstreams",
        json!({ "grab": { "endpoints": [up.addr.to_string()] } }),
    );
    let jwks = root
        .join("config")
        .join(c["identity"]["jwt"]["jwks_file"].as_str().unwrap());
    set(&mut c, "identity/jwt/jwks_file", json!("jwks.json"));
    let dir = tempfile::tempdir().unwrap();
    let server = start_in(dir.path(), &c, &std::fs::read(jwks).unwrap()).await;
    let out = Command::new(tidegate_bin())
        .current_dir(&root)
        .args([
            "token",
            "--key",
            "config/jwt/demo-es256.pem",
            "--alg",
            "ES256",
        ])
        .args(["--kid", "demo-2026", "--sub", "u2", "--claim", "azp=douyin"])
        .args(["--iss", "https://id.tidegate.example", "--aud", "tidegate"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let gw = server.listen_addrs[0];
    assert_eq!(
        get_with(gw, None, &[("x-user-id", "u2")]).await.status,
        StatusCode::UNAUTHORIZED
    );
    let r = get_with(gw, Some(&token), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let h = &up.seen()[0].headers;
    assert_eq!(
        (&h["x-user-id"], &h["x-app-id"]),
        (&"u2".parse().unwrap(), &"douyin".parse().unwrap())
    );
    assert!(server.shutdown().await);
}

/// The access log of the real binary says what the identity phase made of each request:
/// `verified` with the token's user, the token error of an anonymous request (`required:
/// false`), and of a refused one (`required: true`, status 401).
#[tokio::test]
async fn the_access_log_says_verified_anonymous_or_refused() {
    let up = Upstream::start().await;
    let jwks = String::from_utf8(jwks(&[("ec-1.pem", Algorithm::ES256, "ec")])).unwrap();
    let good = mint("ec-1.pem", Algorithm::ES256, "ec", &claims("alice"));
    let mut expired = claims("bob");
    expired["exp"] = json!(now() - 60);
    let expired = mint("ec-1.pem", Algorithm::ES256, "ec", &expired);
    let lines = |required: bool| {
        let mut c = jwt_config(&up, required);
        set(&mut c, "server/access_log/enabled", json!(true));
        ChildGateway::spawn_with_files(&c, &[("jwks.json", &jwks)])
    };
    let access = |gw: &ChildGateway| -> Vec<Value> {
        gw.log_lines()
            .iter()
            .filter(|l| l.contains("tidegate::access"))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };

    let open = lines(false);
    assert_eq!(
        get_with(open.addr, Some(&good), &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get_with(open.addr, Some(&expired), &[("x-user-id", "bob")])
            .await
            .status,
        StatusCode::OK
    );
    let strict = lines(true);
    let r = get_with(strict.addr, Some(&expired), &[]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (o, s) = (access(&open), access(&strict));
    assert_eq!((o.len(), s.len()), (2, 1), "{o:#?} {s:#?}");
    // JSON lines carry the event's fields at the top level or under `fields`.
    let field = |v: &Value, k: &str| v.get(k).or_else(|| v["fields"].get(k)).cloned();
    for (line, identity, user, status) in [
        (&o[0], "verified", "alice", 200),
        (&o[1], "token_expired", "none", 200),
        (&s[0], "token_expired", "none", 401),
    ] {
        assert_eq!(field(line, "identity"), Some(json!(identity)), "{line}");
        assert_eq!(field(line, "user"), Some(json!(user)), "{line}");
        assert_eq!(field(line, "status"), Some(json!(status)), "{line}");
    }
}
