use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use super::*;

/// The head of `raw`, its fields in its map wherever the parser kept them.
fn head_of(raw: &[u8], method: &Method) -> Result<Option<Head>, Error> {
    let mut buf = BytesMut::from(raw);
    loop {
        match parse_head(&mut buf, method)? {
            Some(Parsed::Final(mut h)) => {
                if let Some(r) = h.raw.take() {
                    r.append_to(&mut h.parts.headers);
                }
                return Ok(Some(h));
            }
            Some(Parsed::Interim) => continue,
            None => return Ok(None),
        }
    }
}

fn framing(raw: &str) -> (Framing, bool) {
    let h = head_of(raw.as_bytes(), &Method::GET).unwrap().unwrap();
    (h.framing, h.keep_alive)
}

fn invalid(raw: &str) -> String {
    match head_of(raw.as_bytes(), &Method::GET) {
        Err(Error::Invalid(why)) => why.to_owned(),
        other => panic!("{raw:?} was accepted: {other:?}"),
    }
}

/// Status, headers (values shared with the buffer) and keep-alive from a plain answer.
#[test]
fn parses_a_response_head() {
    let mut buf = BytesMut::from(
        &b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\nhello"[..],
    );
    let Some(Parsed::Final(mut h)) = parse_head(&mut buf, &Method::GET).unwrap() else {
        panic!("complete head");
    };
    assert!(h.parts.headers.is_empty(), "kept as they came");
    h.raw.take().unwrap().append_to(&mut h.parts.headers);
    assert_eq!(h.parts.status, StatusCode::CREATED);
    assert_eq!(h.parts.headers["content-length"], "5");
    let xs: Vec<_> = h.parts.headers.get_all("x-a").iter().collect();
    assert_eq!(xs, ["1", "2"]);
    assert_eq!((h.framing, h.keep_alive), (Framing::Length(5), true));
    assert_eq!(&buf[..], b"hello", "the body stays in the buffer");
}

/// Every field of a head reaches the map, in order, on both sides of the count whose spans
/// stay on the stack: 0 to 100 fields, with a `Content-Length` last so framing reads a
/// span from the end.
#[test]
fn heads_of_any_field_count_parse_whole() {
    for n in [
        0,
        1,
        SMALL_HEAD - 1,
        SMALL_HEAD,
        SMALL_HEAD + 1,
        40,
        MAX_HEADERS - 1,
    ] {
        let fields: String = (0..n).map(|i| format!("X-F{i}: v{i}\r\n")).collect();
        let raw = format!("HTTP/1.1 200 OK\r\n{fields}Content-Length: 2\r\n\r\nok");
        let h = head_of(raw.as_bytes(), &Method::GET).unwrap().unwrap();
        assert_eq!(h.framing, Framing::Length(2), "{n} fields");
        assert_eq!(h.parts.headers.len(), n + 1, "{n} fields");
        for i in 0..n {
            assert_eq!(
                h.parts.headers[format!("x-f{i}")],
                format!("v{i}"),
                "{n} fields"
            );
        }
    }
}

/// RFC 9112 §6.3 framing, and when a connection may be reused.
#[test]
fn framing_rules() {
    use Framing::*;
    assert_eq!(
        framing("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        (Empty, true)
    );
    assert_eq!(
        framing("HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n"),
        (Empty, true)
    );
    assert_eq!(framing("HTTP/1.1 304 Not Modified\r\n\r\n"), (Empty, true));
    assert_eq!(
        framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
        (Chunked, true)
    );
    // A coding other than chunked last: read to the close.
    assert_eq!(
        framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
        (Close, false)
    );
    // No length at all: read to the close.
    assert_eq!(framing("HTTP/1.1 200 OK\r\n\r\n"), (Close, false));
    assert_eq!(
        framing("HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 1\r\n\r\n"),
        (Length(1), false)
    );
    assert_eq!(
        framing("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n"),
        (Length(1), false)
    );
    // Equal repeated lengths are one length.
    assert_eq!(
        framing("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n"),
        (Length(3), true)
    );
    // HEAD: the length describes a body that is not sent.
    let h = head_of(
        b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n",
        &Method::HEAD,
    )
    .unwrap()
    .unwrap();
    assert_eq!((h.framing, h.keep_alive), (Empty, true));
    assert_eq!(h.parts.headers["content-length"], "42");
}

/// Transfer-Encoding and Content-Length together: the length goes, and so does the
/// connection afterwards.
#[test]
fn chunked_wins_over_length() {
    let h = head_of(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        &Method::GET,
    )
    .unwrap()
    .unwrap();
    assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, false));
    assert!(!h.parts.headers.contains_key("content-length"));
}

/// Interim answers are skipped; a protocol switch nobody asked for is refused.
#[test]
fn interim_answers() {
    let h = head_of(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        &Method::GET,
    )
    .unwrap()
    .unwrap();
    assert_eq!(h.parts.status, StatusCode::OK);
    assert!(!h.parts.headers.contains_key("link"));
    assert_eq!(
        invalid("HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"),
        "unrequested protocol switch"
    );
}

/// Malformed heads and lengths are refused, never guessed at.
#[test]
fn refuses_malformed_heads() {
    assert_eq!(
        invalid("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"),
        "conflicting content-length"
    );
    for bad in ["-1", "1 2", "0x10", "", "3,3", "99999999999999999999"] {
        assert_eq!(
            invalid(&format!("HTTP/1.1 200 OK\r\nContent-Length: {bad}\r\n\r\n")),
            "bad content-length",
            "{bad:?}"
        );
    }
    assert_eq!(
        invalid("SSH-2.0-OpenSSH_9.2\r\n\r\n"),
        "malformed response head"
    );
    let many: String = (0..MAX_HEADERS + 1)
        .map(|i| format!("x-{i}: v\r\n"))
        .collect();
    assert_eq!(
        invalid(&format!("HTTP/1.1 200 OK\r\n{many}\r\n")),
        "too many header fields"
    );
    // Incomplete is not an error.
    assert!(
        head_of(b"HTTP/1.1 200 OK\r\nContent-Le", &Method::GET)
            .unwrap()
            .is_none()
    );
}

fn decode_all(dec: &mut Decoder, input: &[u8], piece: usize) -> Result<(Vec<u8>, bool), Error> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut fed = 0;
    loop {
        match dec.step(&mut buf)? {
            Step::Data(b) => out.extend_from_slice(&b),
            Step::Done => return Ok((out, buf.is_empty())),
            Step::NeedMore if fed == input.len() => return Ok((out, false)),
            Step::NeedMore => {
                let end = (fed + piece).min(input.len());
                buf.extend_from_slice(&input[fed..end]);
                fed = end;
            }
        }
    }
}

/// Chunked bodies decode the same whatever way the bytes arrive; extensions and trailers
/// are read past.
#[test]
fn chunked_decoding_in_any_pieces() {
    let wire = b"5;name=value\r\nhello\r\n1 \r\n,\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n";
    for piece in [1, 2, 3, 7, wire.len()] {
        let mut dec = Decoder::Chunked(Chunk::Size);
        let (data, exact) = decode_all(&mut dec, wire, piece).unwrap();
        assert_eq!(data, b"hello, world", "pieces of {piece}");
        assert!(exact, "nothing left over");
    }
}

/// Broken chunked framing is an error, not a guess.
#[test]
fn chunked_decoding_errors() {
    for bad in [
        &b"zz\r\nhello\r\n0\r\n\r\n"[..],
        b"5\r\nhelloXX0\r\n\r\n",
        b"5\nhello\r\n0\r\n\r\n",
        b"11111111111111111\r\n",
        b"5 x\r\nhello\r\n",
    ] {
        let mut dec = Decoder::Chunked(Chunk::Size);
        assert!(
            decode_all(&mut dec, bad, 1).is_err(),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let long = format!("5;{}\r\n", "e".repeat(MAX_CHUNK_LINE + 10));
    let mut dec = Decoder::Chunked(Chunk::Size);
    assert!(decode_all(&mut dec, long.as_bytes(), 64).is_err());
    let trailers = format!("0\r\n{}", "x-t: v\r\n".repeat(MAX_TRAILER_BYTES / 8 + 1));
    let mut dec = Decoder::Chunked(Chunk::Size);
    assert!(decode_all(&mut dec, trailers.as_bytes(), 512).is_err());
}

/// A raw upstream that answers each request head it reads with the next canned bytes (in
/// pieces, with a pause between); when it has run out, it closes: at once with `linger`
/// false, on the next request with `linger` true.
async fn canned(answers: Vec<Vec<&'static [u8]>>, linger: bool) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let last = linger.then_some(None);
        for pieces in answers.into_iter().map(Some).chain(last) {
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            got.drain(..end);
            let Some(pieces) = pieces else { return };
            for p in pieces {
                s.write_all(p).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
    });
    addr
}

type Returned = Arc<Mutex<Vec<Conn>>>;

/// A deadline no test reaches.
fn far() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(60)
}

/// What writes a bodiless `method /x` head.
fn encoder(method: &Method) -> impl FnOnce(&mut Vec<u8>) + '_ {
    move |out| encode_head(method, "/x", &HeaderMap::new(), &Outgoing::default(), out)
}

/// Each exchange is held to its own deadline by the connection's one timer: a later one
/// is not cut short by an earlier exchange's (still armed in the timer wheel), and an
/// earlier one fires on time.
#[tokio::test]
async fn each_exchange_keeps_its_own_deadline() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        // The first answer at once, the second after 300 ms, then none.
        for pause in [0, 300] {
            let _ = s.read(&mut buf).await;
            tokio::time::sleep(Duration::from_millis(pause)).await;
            let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
            s.write_all(ok).await.unwrap();
        }
        let _ = s.read(&mut buf).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let mut conn = Conn::new(TcpStream::connect(addr).await.unwrap());
    let get = Method::GET;
    let soon = tokio::time::Instant::now() + Duration::from_millis(100);
    let h = conn.exchange(&get, soon, encoder(&get)).await.unwrap();
    assert_eq!(h.parts.status, 200);
    let later = tokio::time::Instant::now() + Duration::from_secs(5);
    let h = conn.exchange(&get, later, encoder(&get)).await;
    assert_eq!(
        h.unwrap().parts.status,
        200,
        "cut short by the first deadline"
    );
    let started = std::time::Instant::now();
    let soon = tokio::time::Instant::now() + Duration::from_millis(150);
    let err = conn.exchange(&get, soon, encoder(&get)).await.unwrap_err();
    assert!(matches!(err, (Error::Timeout, true)), "{err:?}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(150), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
}

async fn fetch(conn: Conn, method: Method, returned: &Returned) -> Result<(u16, Vec<u8>), Error> {
    let mut conn = conn;
    let mut h = (conn.exchange(&method, far(), encoder(&method)).await).map_err(|(e, _)| e)?;
    let r = returned.clone();
    let body = conn.into_body(&mut h, move |c| r.lock().unwrap().push(c));
    let data = body.collect().await?.to_bytes();
    Ok((h.parts.status.as_u16(), data.to_vec()))
}

/// A keep-alive exchange gives the connection back, whether the body came with the head or
/// after it, chunked or not; the next request goes over the same connection.
#[tokio::test]
async fn connection_reused_after_whole_bodies() {
    let addr = canned(
        vec![
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"],
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe", b"llo"],
            vec![
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhe",
                b"\r\n3\r\nllo\r\n0\r\n\r\n",
            ],
        ],
        true,
    )
    .await;
    let returned: Returned = Arc::default();
    let mut conn = Conn::new(TcpStream::connect(addr).await.unwrap());
    for round in 0..3 {
        let (status, body) = fetch(conn, Method::GET, &returned).await.unwrap();
        assert_eq!((status, &body[..]), (200, &b"hello"[..]), "round {round}");
        conn = returned.lock().unwrap().pop().expect("given back");
        assert!(conn.is_idle_usable(), "round {round}");
    }
    // The upstream has no more answers and closes: nothing of an answer came, so a reused
    // connection's request may be sent again.
    let err = (conn
        .exchange(&Method::GET, far(), encoder(&Method::GET))
        .await)
        .unwrap_err();
    assert!(matches!(err, (Error::Closed, false)), "{err:?}");
}

/// An idle connection the upstream closed is seen as unusable before a request is risked.
#[tokio::test]
async fn idle_check_sees_a_close() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let mut conn = Conn::new(TcpStream::connect(addr).await.unwrap());
    let (s, _) = l.accept().await.unwrap();
    assert!(conn.is_idle_usable());
    drop(s);
    // Once the event loop has seen the close.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while conn.is_idle_usable() {
        assert!(std::time::Instant::now() < deadline, "close never seen");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// Bytes beyond the response, a body read to the close, or `Connection: close`: the
/// connection is not given back.
#[tokio::test]
async fn connection_not_reused_when_out_of_step() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA"[..],
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\n\r\nhello",
    ] {
        let addr = canned(vec![vec![answer]], false).await;
        let returned: Returned = Arc::default();
        let conn = Conn::new(TcpStream::connect(addr).await.unwrap());
        let (status, body) = fetch(conn, Method::GET, &returned).await.unwrap();
        assert_eq!((status, &body[..5]), (200, &b"hello"[..]));
        assert!(returned.lock().unwrap().is_empty(), "{answer:?}");
    }
}

/// An upstream that closes in the middle of a body with a known length (or chunked) fails
/// the body; it does not pass for a whole one.
#[tokio::test]
async fn early_close_fails_the_body() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nabc"[..],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
    ] {
        let addr = canned(vec![vec![answer]], false).await;
        let returned: Returned = Arc::default();
        let conn = Conn::new(TcpStream::connect(addr).await.unwrap());
        let err = fetch(conn, Method::GET, &returned).await.unwrap_err();
        assert!(matches!(err, Error::Closed), "{err:?}");
    }
}

/// The request head: target, fields, and a zero length for a bodiless POST.
#[test]
fn encodes_request_heads() {
    let mut h = HeaderMap::new();
    h.insert(header::HOST, HeaderValue::from_static("example"));
    h.append("x-a", HeaderValue::from_static("1"));
    h.append("x-a", HeaderValue::from_static("2"));
    let mut out = Vec::new();
    encode_head(&Method::GET, "/p?q=1", &h, &Outgoing::default(), &mut out);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "GET /p?q=1 HTTP/1.1\r\nhost: example\r\nx-a: 1\r\nx-a: 2\r\n\r\n"
    );
    let mut out = Vec::new();
    encode_head(
        &Method::POST,
        "/",
        &HeaderMap::new(),
        &Outgoing::default(),
        &mut out,
    );
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n"
    );
    // What the gateway adds goes after the request's own fields, before the framing.
    let extra = Outgoing {
        request_id: Some(HeaderValue::from_static("tg-7")),
        trace: Some(crate::trace::TraceContext {
            trace_id: [0xab; 16],
            span_id: [0xcd; 8],
            parent_id: None,
            sampled: true,
        }),
        forwarding: None,
    };
    let mut out = Vec::new();
    encode_head(&Method::POST, "/", &h, &extra, &mut out);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!(
            "POST / HTTP/1.1\r\nhost: example\r\nx-a: 1\r\nx-a: 2\r\n\
             x-request-id: tg-7\r\ntraceparent: 00-{}-{}-01\r\ncontent-length: 0\r\n\r\n",
            "ab".repeat(16),
            "cd".repeat(8)
        )
    );
}

/// The raw fields of `raw`'s head, or `None` when the parser built a map instead.
fn raw_of(raw: &str) -> Option<RawFields> {
    let mut buf = BytesMut::from(raw.as_bytes());
    match parse_head(&mut buf, &Method::GET).unwrap() {
        Some(Parsed::Final(h)) => {
            assert_eq!(
                h.raw.is_some(),
                h.parts.headers.is_empty(),
                "fields in one place: {raw:?}"
            );
            h.raw
        }
        _ => panic!("no head in {raw:?}"),
    }
}

/// A head is kept as it came unless the gateway would change more than it notes: a
/// `Connection` naming other fields, a gRPC content type, more than `RAW_MAX` fields. Names
/// are kept in lower case; hop-by-hop fields and `X-Request-Id` are kept but not written.
#[test]
fn raw_fields_kept_and_written() {
    let head = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\nConnection: Keep-Alive\r\n\
                KEEP-ALIVE: timeout=5\r\nX-Request-Id: up\r\nx-a: 2\r\n\r\nok";
    let plain = raw_of(head).unwrap();
    let fields: Vec<_> = plain
        .iter()
        .map(|(n, _)| String::from_utf8_lossy(n))
        .collect();
    assert_eq!(
        fields,
        [
            "content-length",
            "x-a",
            "connection",
            "keep-alive",
            "x-request-id",
            "x-a"
        ]
    );
    let mut out = Vec::new();
    plain.write(&mut out, false);
    assert_eq!(out, b"content-length: 2\r\nx-a: 1\r\nx-a: 2\r\n");
    out.clear();
    plain.write(&mut out, true);
    assert_eq!(out, b"x-a: 1\r\nx-a: 2\r\n");
    assert_eq!(plain.declared(), Some(2));
    for name in super::super::headers::hop_by_hop() {
        let value = match *name {
            header::TRANSFER_ENCODING => "chunked",
            _ => "close",
        };
        let upper = name.as_str().to_ascii_uppercase();
        let head = format!("HTTP/1.1 200 OK\r\n{upper}: {value}\r\nContent-Length: 0\r\n\r\n");
        let mut out = Vec::new();
        raw_of(&head).unwrap().write(&mut out, false);
        let out = String::from_utf8(out).unwrap();
        // A length with Transfer-Encoding is not passed on either.
        let want = match *name {
            header::TRANSFER_ENCODING => "",
            _ => "content-length: 0\r\n",
        };
        assert_eq!(out, want, "{name} written");
    }
    // Transfer-Encoding wins over a length: neither is passed on.
    let te = raw_of("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n");
    let mut out = Vec::new();
    te.as_ref().unwrap().write(&mut out, false);
    assert!(out.is_empty() && te.unwrap().declared().is_none());
    assert!(raw_of("HTTP/1.1 200 OK\r\nConnection: close, x-a\r\nx-a: 1\r\n\r\n").is_none());
    let grpc = "HTTP/1.1 200 OK\r\ncontent-type: Application/gRPC+proto\r\n\r\n";
    assert!(raw_of(grpc).is_none());
    assert!(raw_of("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n").is_some());
    let many = |n: usize| {
        let fields: String = (0..n).map(|i| format!("x-{i}: {i}\r\n")).collect();
        format!("HTTP/1.1 200 OK\r\n{fields}Content-Length: 0\r\n\r\n")
    };
    assert!(raw_of(&many(raw::RAW_MAX - 1)).is_some());
    assert!(raw_of(&many(raw::RAW_MAX)).is_none());
}

/// Every name and value byte httparse accepts is one `HeaderName` and `HeaderValue` accept:
/// raw fields always make the map the parser would have made.
#[test]
fn accepted_field_bytes_are_valid_headers() {
    // The fields of `before`, `b`, `after` as kept, when httparse accepts them.
    let kept = |before: &[u8], b: u8, after: &[u8]| {
        let head = [before, &[b], after].concat();
        match parse_head(&mut BytesMut::from(&head[..]), &Method::GET) {
            Ok(Some(Parsed::Final(h))) => Some(h.raw.expect("a plain field is kept raw")),
            _ => None,
        }
    };
    let mut accepted = (0, 0);
    for b in 0..=255u8 {
        if let Some(r) = kept(b"HTTP/1.1 200 OK\r\nx", b, b": 1\r\n\r\n") {
            for (n, _) in r.iter() {
                assert!(http::HeaderName::from_bytes(n).is_ok(), "name byte {b:#x}");
            }
            accepted.0 += 1;
        }
        if let Some(r) = kept(b"HTTP/1.1 200 OK\r\nx: a", b, b"b\r\n\r\n") {
            for (_, v) in r.iter() {
                assert!(HeaderValue::from_bytes(v).is_ok(), "value byte {b:#x}");
            }
            accepted.1 += 1;
        }
    }
    // Names: the 77 token characters, and `x:` (the name `x`, the value `: 1`). Values:
    // every byte but the controls (tab aside) and DEL.
    assert_eq!(accepted, (77 + 1, 256 - 32 + 1 - 1));
}

/// Putting raw fields in a map keeps them ahead of any added meanwhile, in order.
#[test]
fn materialized_fields_come_first() {
    let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nX-B: 1\r\nX-A: 2\r\nx-b: 3\r\n\r\n"[..]);
    let Some(Parsed::Final(h)) = parse_head(&mut buf, &Method::HEAD).unwrap() else {
        panic!("complete head");
    };
    let body = ResponseBody {
        state: State::Done,
        hint: SizeHint::default(),
        raw: h.raw,
    };
    let mut resp = http::Response::from_parts(h.parts, body);
    resp.headers_mut()
        .append("x-c", HeaderValue::from_static("4"));
    resp.headers_mut()
        .append("x-c", HeaderValue::from_static("5"));
    super::super::materialize(&mut resp, ResponseBody::take_raw);
    let got: Vec<_> = resp
        .headers()
        .iter()
        .map(|(n, v)| format!("{n}={}", v.to_str().unwrap()))
        .collect();
    // A map keeps a name's values together, in order.
    assert_eq!(got, ["x-b=1", "x-b=3", "x-a=2", "x-c=4", "x-c=5"]);
    assert!(resp.body_mut().take_raw().is_none(), "taken once");
}
