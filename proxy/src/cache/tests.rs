use std::time::Duration;

use super::*;

fn snapshot() -> Snapshot {
    let text = br#"{ "schema_version": 1,
      "identity": { "app": {"header": "x-app-id"}, "user": {"header": "x-user-id"} },
      "interfaces": [ { "name": "open", "method": "GET", "path": "/envelopes/{id}" } ],
      "upstreams": { "up": { "endpoints": ["127.0.0.1:9"] } },
      "routes": [ { "name": "d", "upstream": "up" } ] }"#;
    rules::load("t.json", text).expect("valid").snapshot
}

fn cache(ttl_ms: u64, vary_on_identity: bool, max_waiters: u32) -> Arc<ResponseCache> {
    let spec = CacheSpec {
        ttl: Duration::from_millis(ttl_ms),
        max_entries: 100,
        max_body_bytes: 1024,
        vary_on_identity,
        max_waiters,
        max_wait: Duration::from_secs(5),
    };
    let name = Name("open".into());
    Arc::new(ResponseCache::new(
        &name,
        Some(Method::GET),
        "/envelopes/{id}",
        spec,
        &Metrics::new(),
    ))
}

fn parts(method: Method, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
    let mut b = http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).expect("valid").into_parts().0
}

fn class<'a>(user: Option<&'a str>) -> Classified<'a> {
    Classified {
        user: user.map(Into::into),
        ..Classified::default()
    }
}

fn answer(body: &'static str, headers: &[(&str, &str)]) -> Response<UpstreamBody> {
    let mut r = Response::new(UpstreamBody::buffered(Bytes::from_static(body.as_bytes())));
    for (k, v) in headers {
        r.headers_mut().append(
            header::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    r
}

async fn text(resp: Response<UpstreamBody>) -> (String, String) {
    let tag = resp.headers()[&X_CACHE].to_str().expect("ascii").to_owned();
    let body = resp.into_body().collect().await.expect("whole").to_bytes();
    (tag, String::from_utf8(body.to_vec()).expect("utf-8"))
}

/// With identity in the key, two users (or two tokens of one claimed user) never share an
/// answer; a shared cache is one key for all and is bypassed by requests with credentials;
/// a POST always bypasses.
#[test]
fn keys() {
    let c = cache(1000, true, 10);
    let get =
        |h: &[(&str, &str)], user| c.key(&parts(Method::GET, "/envelopes/1", h), &class(user));
    assert_eq!(get(&[], Some("alice")), get(&[], Some("alice")));
    assert_ne!(get(&[], Some("alice")), get(&[], Some("bob")));
    assert_ne!(get(&[], Some("alice")), get(&[], None));
    assert_ne!(
        get(&[("authorization", "Bearer a")], Some("alice")),
        get(&[("authorization", "Bearer b")], Some("alice")),
        "a claimed user without the token is not that user"
    );
    assert_ne!(
        get(&[("cookie", "s=1")], None),
        get(&[("cookie", "s=2")], None)
    );
    let q = |uri| c.key(&parts(Method::GET, uri, &[]), &class(None));
    assert_ne!(q("/envelopes/1?a=1"), q("/envelopes/1?a=2"));
    assert_ne!(
        q("/envelopes/1"),
        c.key(&parts(Method::HEAD, "/envelopes/1", &[]), &class(None))
    );
    assert_eq!(
        c.key(&parts(Method::POST, "/envelopes/1", &[]), &class(None)),
        None
    );

    let shared = cache(1000, false, 10);
    let get =
        |h: &[(&str, &str)], user| shared.key(&parts(Method::GET, "/envelopes/1", h), &class(user));
    assert_eq!(get(&[], Some("alice")), get(&[], Some("bob")));
    assert_eq!(get(&[("authorization", "Bearer a")], None), None);
    assert_eq!(get(&[("cookie", "s=1")], None), None);
    assert_eq!(shared.counts.bypass.get(), 2);
}

/// Only a 200 of declared length within bounds, without Set-Cookie, no-store, private or
/// no-cache, and varying only on what the key covers, is kept.
#[test]
fn keepable() {
    let snap = snapshot();
    let c = cache(1000, true, 10);
    let ok = |r: Response<UpstreamBody>| c.keepable(&r.into_parts().0, false, &snap);
    assert!(ok(answer("{}", &[])));
    assert!(ok(answer("{}", &[("cache-control", "public, max-age=5")])));
    assert!(ok(answer("{}", &[("vary", "Authorization, x-user-id")])));
    assert!(!ok(answer(
        "{}",
        &[("cache-control", "max-age=0, no-store")]
    )));
    assert!(!ok(answer("{}", &[("cache-control", "Private")])));
    assert!(!ok(answer("{}", &[("cache-control", "no-cache=\"x\"")])));
    assert!(!ok(answer("{}", &[("set-cookie", "s=1")])));
    assert!(!ok(answer("{}", &[("vary", "accept-encoding")])));
    assert!(!ok(answer("{}", &[("vary", "*")])));
    let mut r = answer("{}", &[]);
    *r.status_mut() = StatusCode::NOT_FOUND;
    assert!(!ok(r));
    let mut r = answer("{}", &[]);
    r.headers_mut().remove(header::CONTENT_LENGTH);
    assert!(!ok(r), "undeclared length");
    let mut r = answer("{}", &[]);
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(2000));
    assert!(!ok(r), "over max_body_bytes");
    // A shared cache keeps nothing that varies on identity.
    let shared = cache(1000, false, 10);
    let r = answer("{}", &[("vary", "authorization")]).into_parts().0;
    assert!(!shared.keepable(&r, false, &snap));
}

/// Concurrent misses of one key wait for the leader's call and all get its answer; the
/// next request within the TTL is a hit, and after the TTL it leads again.
#[tokio::test]
async fn coalescing_and_ttl() {
    let snap = snapshot();
    let c = cache(300, true, 100);
    let Lookup::Lead(lead) = c.lookup(7).await else {
        panic!("the first miss leads")
    };
    let waiters: Vec<_> = (0..50)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.lookup(7).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (resp, _) = lead
        .fill(Ok((answer("v1", &[]), Duration::ZERO)), false, &snap)
        .await
        .expect("kept");
    assert_eq!(text(resp).await, ("miss".into(), "v1".into()));
    for w in waiters {
        let Lookup::Answered(resp) = w.await.expect("joined") else {
            panic!("a waiter gets the leader's answer")
        };
        assert_eq!(text(resp).await, ("coalesced".into(), "v1".into()));
    }
    let Lookup::Answered(resp) = c.lookup(7).await else {
        panic!("kept")
    };
    assert_eq!(text(resp).await, ("hit".into(), "v1".into()));
    assert_eq!(c.figures(), (1, 50, 1));
    tokio::time::sleep(Duration::from_millis(320)).await;
    assert!(
        matches!(c.lookup(7).await, Lookup::Lead(_)),
        "stale after the TTL"
    );
}

/// When the leader's answer cannot be kept (a 503) or the leader goes away, the waiters
/// are released to their own calls rather than given its error; beyond `max_waiters` a
/// request does not wait at all.
#[tokio::test]
async fn failed_leader_and_waiter_bound() {
    let snap = snapshot();
    let c = cache(5000, true, 2);
    let Lookup::Lead(lead) = c.lookup(1).await else {
        panic!("leads")
    };
    let waiters: Vec<_> = (0..2)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.lookup(1).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        matches!(c.lookup(1).await, Lookup::Alone),
        "over max_waiters"
    );
    let mut err = answer("down", &[]);
    *err.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let (resp, _) = lead
        .fill(Ok((err, Duration::ZERO)), false, &snap)
        .await
        .expect("passed");
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    for w in waiters {
        assert!(matches!(w.await.expect("joined"), Lookup::Alone));
    }
    // A leader that goes away (its client left) releases its waiters too.
    let Lookup::Lead(lead) = c.lookup(2).await else {
        panic!("leads")
    };
    let w = {
        let c = c.clone();
        tokio::spawn(async move { c.lookup(2).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(lead);
    assert!(matches!(w.await.expect("joined"), Lookup::Alone));
    assert!(
        matches!(c.lookup(2).await, Lookup::Lead(_)),
        "the flight is gone"
    );
}
