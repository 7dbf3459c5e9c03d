//! The fast path's parser (what it takes, what it leaves to hyper), keep-alive rules, the
//! replaying IO and the framing of responses.

use bytes::BytesMut;
use http::{HeaderMap, HeaderValue, StatusCode, Version};
use tokio::io::AsyncReadExt;

use super::write::{Framing, Request, head};
use super::*;

const L: Limits = Limits {
    max_buf: 8192,
    max_headers: 16,
    header_read_timeout: Duration::from_secs(10),
    max_inline_body: 64,
};

fn parse_all(bytes: &[u8]) -> (Parsed, BytesMut) {
    let mut buf = BytesMut::from(bytes);
    let p = parse(&mut buf, &L, &mut Parser::default());
    (p, buf)
}

fn taken(bytes: &[u8]) -> Head {
    match parse_all(bytes).0 {
        Parsed::Request(h) => h,
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(bytes)),
    }
}

fn handed_off(bytes: &[u8]) {
    let (p, buf) = parse_all(bytes);
    assert!(
        matches!(p, Parsed::Handoff),
        "{:?}: {p:?}",
        String::from_utf8_lossy(bytes)
    );
    assert_eq!(&buf[..], bytes, "a handoff leaves the buffer whole");
}

/// An ordinary GET: method, target, version, fields in order, no body.
#[test]
fn takes_an_ordinary_get() {
    let h = taken(b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\n\r\n");
    assert_eq!(h.parts.method, Method::GET);
    assert_eq!(h.parts.uri, "/a?b=1");
    assert_eq!(h.parts.version, Version::HTTP_11);
    let all: Vec<_> = h.parts.headers.get_all("x-a").iter().collect();
    assert_eq!(all, ["1", "2"]);
    assert!(h.body.is_none());
    assert!(h.keep_alive);
}

/// A small body that came with its head is read whole; the next request stays.
#[test]
fn takes_a_small_buffered_body_and_keeps_what_follows() {
    let (p, rest) =
        parse_all(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\n\r\n");
    let Parsed::Request(h) = p else {
        panic!("{p:?}")
    };
    assert_eq!(h.body.as_deref(), Some(&b"abc"[..]));
    assert_eq!(&rest[..], b"GET / HTTP/1.1\r\n\r\n");
    assert!(
        taken(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            .body
            .is_none()
    );
}

/// A connection's parts carry nothing of one request into the next: the second head's
/// method, target, version and fields are its own, the first's extensions gone.
#[test]
fn parts_reused_in_place_start_clean() {
    let mut buf = BytesMut::from(
        &b"POST /one HTTP/1.1\r\nX-User-Id: alice\r\nContent-Length: 1\r\n\r\nx\
           GET /two HTTP/1.0\r\nHost: b\r\n\r\n"[..],
    );
    let mut p = Parser::default();
    let mut parts = http::Request::new(()).into_parts().0;
    let first = parse_into(&mut buf, &L, &mut p, &mut parts);
    assert!(
        matches!(
            first,
            Taken::Request {
                body: Some(_),
                keep_alive: true
            }
        ),
        "{first:?}"
    );
    assert_eq!(parts.headers["x-user-id"], "alice");
    // What the request path may leave behind: a field it added, an extension.
    parts
        .headers
        .insert("x-added", HeaderValue::from_static("1"));
    parts.extensions.insert(7u8);
    let second = parse_into(&mut buf, &L, &mut p, &mut parts);
    assert!(
        matches!(
            second,
            Taken::Request {
                body: None,
                keep_alive: false
            }
        ),
        "{second:?}"
    );
    assert_eq!(parts.method, Method::GET);
    assert_eq!(parts.uri, "/two");
    assert_eq!(parts.version, Version::HTTP_10);
    let fields: Vec<_> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
        .collect();
    assert_eq!(fields, [("host", "b")]);
    assert!(parts.extensions.get::<u8>().is_none());
    assert!(buf.is_empty());
}

/// Everything unusual goes to hyper, the buffer untouched.
#[test]
fn hands_off_the_unusual() {
    for h in [
        &b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"[..], // body not here yet
        b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\n",        // over max_inline_body
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
        b"POST / HTTP/1.1\r\nContent-Length: 1,1\r\n\r\nx",
        b"POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\nx",
        b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n", // obs-fold
        b"GET / HTTP/1.1\r\nX Y: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x7fb\r\nY: c\r\n\r\nGET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.2\r\n\r\n",
        b"GET /a b HTTP/1.1\r\n\r\n",
    ] {
        handed_off(h);
    }
}

/// Too many fields, or a head larger than hyper's buffer, is hyper's (431).
#[test]
fn limits_hand_off() {
    let mut many = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..17 {
        many.extend_from_slice(format!("h{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    handed_off(&many);
    let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
    big.resize(L.max_buf + 10, b'a');
    handed_off(&big);
    // Still short of the limit: wait for more.
    assert!(matches!(
        parse_all(b"GET / HTTP/1.1\r\nHost: a\r\n").0,
        Parsed::Partial
    ));
}

/// hyper's keep-alive rules: 1.1 by default, 1.0 only when asked, close wins.
#[test]
fn keep_alive_rules() {
    assert!(taken(b"GET / HTTP/1.1\r\n\r\n").keep_alive);
    assert!(!taken(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
    assert!(!taken(b"GET / HTTP/1.1\r\nConnection: x, Close\r\n\r\n").keep_alive);
    assert!(!taken(b"GET / HTTP/1.0\r\n\r\n").keep_alive);
    assert!(taken(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive);
    assert!(
        !taken(b"GET / HTTP/1.0\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n").keep_alive
    );
}

/// The replaying IO yields the bytes already read, then the IO's own.
#[tokio::test]
async fn rewind_replays_first() {
    let (mut a, b) = tokio::io::duplex(64);
    tokio::io::AsyncWriteExt::write_all(&mut a, b" world")
        .await
        .unwrap();
    drop(a);
    let mut r = Rewind::new(b, Bytes::from_static(b"hello"));
    let mut s = String::new();
    r.read_to_string(&mut s).await.unwrap();
    assert_eq!(s, "hello world");
}

fn framed(
    status: u16,
    headers: &[(&'static str, &'static str)],
    exact: Option<u64>,
    version: Version,
    head_only: bool,
    keep: bool,
) -> (String, Framing, bool) {
    let mut out = Vec::new();
    let mut h = HeaderMap::new();
    for (n, v) in headers {
        h.append(*n, HeaderValue::from_static(v));
    }
    let id = HeaderValue::from_static("rid-1");
    let req = Request {
        version,
        head_only,
        id: &id,
    };
    let (f, k) = head(
        &mut out,
        StatusCode::from_u16(status).unwrap(),
        None,
        None,
        &h,
        exact,
        req,
        keep,
    );
    (String::from_utf8(out).unwrap(), f, k)
}

/// Exact sizes get `content-length`, unknown ones chunked (1.1) or close-delimited (1.0);
/// a `date` is added; HEAD, 204 and 304 carry no body.
#[test]
fn response_framing() {
    let (s, f, k) = framed(200, &[("x", "1")], Some(5), Version::HTTP_11, false, true);
    assert!(s.starts_with(
        "HTTP/1.1 200 OK\r\nx: 1\r\nx-request-id: rid-1\r\ncontent-length: 5\r\ndate: "
    ));
    assert!(s.ends_with(" GMT\r\n\r\n"));
    assert_eq!((f, k), (Framing::Length(5), true));

    let (s, f, _) = framed(200, &[], None, Version::HTTP_11, false, true);
    assert!(s.contains("transfer-encoding: chunked\r\n"));
    assert_eq!(f, Framing::Chunked);

    let (s, f, k) = framed(200, &[], None, Version::HTTP_10, false, true);
    assert!(s.starts_with("HTTP/1.0 200 OK\r\n"));
    assert_eq!((f, k), (Framing::Close, false));

    // HTTP/1.0 kept open says so.
    let (s, _, k) = framed(200, &[], Some(0), Version::HTTP_10, false, true);
    assert!(s.contains("connection: keep-alive\r\n") && s.contains("content-length: 0\r\n"));
    assert!(k);

    // HEAD: the upstream's length kept, no body.
    let (s, f, _) = framed(
        200,
        &[("content-length", "42")],
        Some(0),
        Version::HTTP_11,
        true,
        true,
    );
    assert!(s.contains("content-length: 42\r\n"));
    assert_eq!(f, Framing::None);

    // 204 and 304: no body, no length made up.
    let (s, f, _) = framed(
        204,
        &[("content-length", "3")],
        Some(3),
        Version::HTTP_11,
        false,
        true,
    );
    assert!(!s.contains("content-length"));
    assert_eq!(f, Framing::None);
    let (s, f, _) = framed(304, &[], Some(0), Version::HTTP_11, false, true);
    assert!(!s.contains("content-length") && !s.contains("transfer-encoding"));
    assert_eq!(f, Framing::None);

    // Closing: the answer says so, once.
    let (s, _, k) = framed(
        400,
        &[("connection", "close")],
        Some(0),
        Version::HTTP_11,
        false,
        true,
    );
    assert_eq!(s.matches("connection: close").count(), 1);
    assert!(!k);
    let (s, _, k) = framed(200, &[], Some(0), Version::HTTP_11, false, false);
    assert!(s.contains("connection: close\r\n") && !k);

    // The request's ID is the gateway's, whatever the upstream said.
    let (s, _, _) = framed(
        200,
        &[
            ("X-Request-Id", "upstream's"),
            ("x-request-id", "and another"),
        ],
        Some(0),
        Version::HTTP_11,
        false,
        true,
    );
    assert_eq!(s.matches("x-request-id").count(), 1, "{s}");
    assert!(s.contains("x-request-id: rid-1\r\n"), "{s}");

    // A coding the response arrived with is the gateway's to choose: dropped, and the
    // body framed by its exact size.
    let (s, f, _) = framed(
        200,
        &[("transfer-encoding", "chunked")],
        Some(5),
        Version::HTTP_11,
        false,
        true,
    );
    assert!(!s.contains("transfer-encoding"), "{s}");
    assert!(s.contains("content-length: 5\r\n"), "{s}");
    assert_eq!(f, Framing::Length(5));

    // `close` on any `Connection` line closes, whatever the others say.
    let (s, _, k) = framed(
        200,
        &[("connection", "keep-alive"), ("connection", "x, Close")],
        Some(0),
        Version::HTTP_11,
        false,
        true,
    );
    assert!(!k, "{s}");
    assert_eq!(s.matches("connection:").count(), 2, "{s}");

    // HTTP/1.0 already told keep-alive is not told twice.
    let (s, _, k) = framed(
        200,
        &[("connection", "keep-alive")],
        Some(0),
        Version::HTTP_10,
        false,
        true,
    );
    assert!(k);
    assert_eq!(s.matches("keep-alive").count(), 1, "{s}");

    // The first `Content-Length` frames the body.
    let (_, f, _) = framed(
        200,
        &[("content-length", "7")],
        Some(7),
        Version::HTTP_11,
        false,
        true,
    );
    assert_eq!(f, Framing::Length(7));
}

/// A whole response with a small body goes out in one write.
#[tokio::test]
async fn small_response_is_one_write() {
    struct Writes(Vec<Vec<u8>>);
    impl AsyncWrite for Writes {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            d: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.0.push(d.to_vec());
            Poll::Ready(Ok(d.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }
    let mut w = Writes(Vec::new());
    let body = http_body_util::Full::new(Bytes::from_static(b"hello"));
    let mut resp = http::Response::new(http_body_util::Either::Right(body));
    let id = HeaderValue::from_static("rid-1");
    let req = Request {
        version: Version::HTTP_11,
        head_only: false,
        id: &id,
    };
    let keep = write::response(&mut w, &mut Vec::new(), &mut resp, req, true)
        .await
        .unwrap();
    assert!(keep);
    assert_eq!(w.0.len(), 1, "one write");
    let s = String::from_utf8(w.0[0].clone()).unwrap();
    assert!(s.starts_with("HTTP/1.1 200 OK\r\nx-request-id: rid-1\r\ncontent-length: 5\r\n"));
    assert!(s.ends_with("\r\n\r\nhello"));
}

/// The HTTP/2 preface is recognised as far as it has come (after HTTP/1 requests the
/// connection is closed on it, as hyper's HTTP/1 server does).
#[test]
fn h2_preface_prefixes() {
    assert!(h2_preface(b"PRI * HTTP/2"));
    assert!(h2_preface(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0"));
    assert!(!h2_preface(b"PRI / HTTP/1.1\r\n\r\n"));
    assert!(!h2_preface(b"GET / HTTP/1.1\r\n"));
}

mod raw_fields {
    use proptest::prelude::*;

    use super::*;
    use crate::upstream::h1::{RawFields, final_head};
    use crate::upstream::headers::strip_hop_by_hop;

    const NAMES: &[&str] = &[
        "content-length",
        "date",
        "x-request-id",
        "content-type",
        "cache-control",
        "set-cookie",
        "x-a",
        "etag",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "transfer-encoding",
        "proxy-connection",
    ];
    const VALUES: &[&str] = &[
        "5",
        "close",
        "Keep-Alive, close",
        "keep-alive",
        "chunked",
        "gzip, chunked",
        "text/plain",
        "a=b; Path=/",
        "x-a, y",
        "",
    ];

    fn field() -> impl Strategy<Value = (String, String)> {
        let name = proptest::sample::select(NAMES);
        (name, proptest::sample::select(VALUES), any::<u16>()).prop_map(|(n, v, case)| {
            // Any mix of capitals: names are matched case-insensitively.
            let n: String = (n.chars().enumerate())
                .map(|(i, c)| match case >> (i % 16) & 1 {
                    1 => c.to_ascii_uppercase(),
                    _ => c,
                })
                .collect();
            let v = if n.eq_ignore_ascii_case("content-length") {
                "5"
            } else {
                v
            };
            (n, v.to_owned())
        })
    }

    proptest! {
        /// A head kept as it came is written exactly as the same head would be from the
        /// parser's header map with the hop-by-hop fields stripped (the path of every other
        /// answer), and put in a map as that map.
        #[test]
        fn written_as_from_the_map(
            status in proptest::sample::select(&[200u16, 201, 204, 304, 404, 500][..]),
            fields in proptest::collection::vec(field(), 0..20),
            head_only in any::<bool>(),
            http10 in any::<bool>(),
            keep in any::<bool>(),
            exact in proptest::option::of(0u64..10),
        ) {
            let mut raw = format!("HTTP/1.1 {status} X\r\n");
            for (n, v) in &fields {
                raw.push_str(&format!("{n}: {v}\r\n"));
            }
            raw.push_str("\r\n");
            let method = if head_only { Method::HEAD } else { Method::GET };
            let Some((parts, Some(kept))) = final_head(raw.as_bytes(), &method) else {
                return Ok(()); // refused, or built as a map: nothing to compare
            };
            prop_assert!(parts.headers.is_empty());
            // The map the parser makes of a head it does not keep: every field, in order,
            // without a length that Transfer-Encoding overrides (where a body may come);
            // then stripped, as the request path does.
            let mut map = HeaderMap::new();
            for (n, v) in kept.iter() {
                map.append(
                    http::HeaderName::from_bytes(n).unwrap(),
                    HeaderValue::from_bytes(v).unwrap(),
                );
            }
            let bodiless = head_only || status == 204 || status == 304;
            if map.contains_key(http::header::TRANSFER_ENCODING) && !bodiless {
                map.remove(http::header::CONTENT_LENGTH);
            }
            strip_hop_by_hop(&mut map);
            let mut materialized = HeaderMap::new();
            kept.append_to(&mut materialized);
            prop_assert_eq!(&materialized, &map);
            let id = HeaderValue::from_static("rid-1");
            let req = Request {
                version: if http10 { Version::HTTP_10 } else { Version::HTTP_11 },
                head_only,
                id: &id,
            };
            let empty = HeaderMap::new();
            let write = |raw: Option<&RawFields>, map: &HeaderMap| {
                let mut out = Vec::new();
                let (f, k) = head(&mut out, parts.status, None, raw, map, exact, req, keep);
                (String::from_utf8(out).unwrap(), f, k)
            };
            let (a, fa, ka) = write(None, &map);
            let (b, fb, kb) = write(Some(&kept), &empty);
            // A map keeps a name's values together, the raw fields keep the upstream's
            // order: the same lines, each name's values in the same order. (The date may
            // turn over between the two writes.)
            let lines = |s: &str| {
                let mut l: Vec<String> = s
                    .lines()
                    .filter(|l| !l.starts_with("date: "))
                    .map(str::to_owned)
                    .collect();
                l[1..].sort_by_key(|l| l.split(':').next().unwrap_or("").to_owned());
                l
            };
            prop_assert_eq!(lines(&a), lines(&b));
            prop_assert_eq!(a.contains("date: "), b.contains("date: "));
            prop_assert_eq!((fa, ka), (fb, kb));
        }
    }
}
