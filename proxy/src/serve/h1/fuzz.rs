//! What the `h1_head` fuzz target in `fuzz/` runs: a differential test of the fast path's
//! head parser ([`super::parse`]) against hyper's HTTP/1 server, in process. Kept here so
//! `cargo test` replays the committed corpus.
//!
//! The same bytes go to both (hyper over an in-memory duplex, its service noting the first
//! request it is handed, the client's side shut after the bytes). Properties, checked by
//! panicking (the fuzzer reports a panic as a crash):
//! - a head the fast path takes, hyper takes too, with the same method, target, version,
//!   fields (names, values, order) and body framing (a length; the fast path takes no
//!   chunked body);
//! - a head the fast path finds incomplete, hyper does not take;
//! - a head the fast path hands to hyper agrees by construction (hyper decides it);
//! - what the fast path takes off the buffer is exactly its head and body;
//! - a connection's parts, reused after another request (and what the request path may
//!   leave in them: a field, an extension), read the same bytes exactly as fresh ones do.

use std::cell::RefCell;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use http_body::Body as _;
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Limits, Parsed, Parser, Taken, parse, parse_into};

/// The limits both sides run with: small, so the fuzzer reaches them.
pub const LIMITS: Limits = Limits {
    max_buf: 8192,
    max_headers: 24,
    header_read_timeout: Duration::from_secs(10),
    max_inline_body: 1024,
};

/// What one server made of a head, comparable across the two.
#[derive(Debug, PartialEq, Eq)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Target, as the `Uri` prints it.
    pub uri: String,
    /// Version.
    pub version: http::Version,
    /// Fields in order.
    pub fields: Vec<(String, Vec<u8>)>,
    /// Body length (0: none), or `None` for a chunked body.
    pub body_len: Option<u64>,
}

/// Bytes → both parsers; panics when they disagree (see the module docs).
pub fn differential(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    let ours = parse(&mut buf, &LIMITS, &mut Parser::default());
    reused_reads_the_same(data, &ours, &buf);
    match ours {
        Parsed::Handoff => {}
        Parsed::Partial => {
            if let Some(theirs) = hyper_first_request(data) {
                panic!("the fast path waits for more of a head hyper took: {theirs:?}");
            }
        }
        Parsed::Request(head) => {
            let body_len = head.body.as_ref().map_or(0, |b| b.len() as u64);
            let consumed = data.len() - buf.len();
            assert_eq!(
                &data[consumed..],
                &buf[..],
                "the rest of the buffer is kept"
            );
            if let Some(b) = &head.body {
                assert_eq!(
                    &data[consumed - b.len()..consumed],
                    &b[..],
                    "the body is the bytes after the head"
                );
            }
            let ours = seen(&head.parts, Some(body_len));
            let Some(theirs) = hyper_first_request(data) else {
                panic!("the fast path took a head hyper refused: {ours:?}");
            };
            assert_eq!(
                ours, theirs,
                "the fast path and hyper read the head differently"
            );
        }
    }
}

/// `data` parsed into parts that served a request before gives what [`parse`] gave
/// (`fresh`, leaving `rest` in the buffer).
fn reused_reads_the_same(data: &[u8], fresh: &Parsed, rest: &[u8]) {
    let mut parts = http::Request::new(()).into_parts().0;
    let mut p = Parser::default();
    let mut before = BytesMut::from(
        &b"POST /before HTTP/1.1\r\nX-User-Id: before\r\nContent-Length: 1\r\n\r\nx"[..],
    );
    let served = parse_into(&mut before, &LIMITS, &mut p, &mut parts);
    assert!(matches!(served, Taken::Request { .. }), "{served:?}");
    parts
        .headers
        .insert("x-left-behind", HeaderValue::from_static("1"));
    parts.extensions.insert(1u8);
    let mut buf = BytesMut::from(data);
    let reused = parse_into(&mut buf, &LIMITS, &mut p, &mut parts);
    assert_eq!(
        &buf[..],
        rest,
        "reused parts take the same bytes off the buffer"
    );
    match (fresh, reused) {
        (Parsed::Partial, Taken::Partial) | (Parsed::Handoff, Taken::Handoff) => {}
        (Parsed::Request(h), Taken::Request { body, keep_alive }) => {
            let len = |b: &Option<Bytes>| Some(b.as_ref().map_or(0, |b| b.len() as u64));
            assert_eq!(seen(&parts, len(&body)), seen(&h.parts, len(&h.body)));
            assert_eq!((body, keep_alive), (h.body.clone(), h.keep_alive));
            assert!(parts.extensions.is_empty(), "no extension carried over");
        }
        (fresh, reused) => panic!("fresh parts: {fresh:?}; reused: {reused:?}"),
    }
}

fn seen(parts: &http::request::Parts, body_len: Option<u64>) -> Seen {
    Seen {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        version: parts.version,
        fields: parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect(),
        body_len,
    }
}

/// The first request hyper's HTTP/1 server hands its service for these bytes, if any.
pub fn hyper_first_request(data: &[u8]) -> Option<Seen> {
    thread_local! {
        static RT: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
    }
    RT.with(|rt| {
        let mut rt = rt.borrow_mut();
        let rt = rt.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("a runtime")
        });
        rt.block_on(hyper_serve(Bytes::copy_from_slice(data)))
    })
}

async fn hyper_serve(data: Bytes) -> Option<Seen> {
    let (mut client, server) = tokio::io::duplex(data.len() + 64 * 1024);
    let first: Arc<Mutex<Option<Seen>>> = Arc::default();
    let noted = first.clone();
    // Noted when hyper hands the request over (the future may never be polled: hyper drops
    // it when the client's side is already shut).
    let svc = service_fn(move |req: hyper::Request<Incoming>| {
        let mut n = noted.lock().expect("not poisoned");
        if n.is_none() {
            let body_len = req.body().size_hint().exact();
            *n = Some(seen(&req.into_parts().0, body_len));
        }
        std::future::ready(Ok::<_, Infallible>(hyper::Response::new(
            Empty::<Bytes>::new(),
        )))
    });
    let mut b = hyper::server::conn::http1::Builder::new();
    b.max_buf_size(LIMITS.max_buf)
        .max_headers(LIMITS.max_headers)
        .writev(false);
    let conn = b.serve_connection(TokioIo::new(server), svc);
    let talk = async move {
        let _ = client.write_all(&data).await;
        let _ = client.shutdown().await;
        let mut sink = Vec::new();
        let _ = client.read_to_end(&mut sink).await;
    };
    // Both sides end on their own (the client's side is shut); the timeout only guards.
    let r = tokio::time::timeout(Duration::from_secs(2), async { tokio::join!(conn, talk) }).await;
    if std::env::var_os("H1_FUZZ_DEBUG").is_some() {
        eprintln!("hyper: {r:?}");
    }
    first.lock().expect("not poisoned").take()
}

#[cfg(test)]
mod tests {
    /// Replay the committed corpus of the `h1_head` target (and any crash inputs kept).
    #[test]
    fn replay_corpus() {
        let n = crate::pipeline::fuzz::replay_corpus("h1_head", super::differential);
        assert!(
            n >= 10,
            "the committed corpus is replayed ({n} inputs found)"
        );
    }

    /// Heads both take, and heads the fast path leaves to hyper.
    #[test]
    fn known_heads() {
        for h in [
            &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"GET http://a/x?y HTTP/1.1\r\nHost: a\r\nX: 1\r\nx: 2\r\n\r\n",
            b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
            b"GET / HTTP/1.0\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
            b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
            b"GET / HTTP/1.1\nHost: a\n\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            super::differential(h);
        }
    }
}
