//! The gateway speaks HTTP/1.1, prior-knowledge h2c and TLS (ALPN h2 and http/1.1, TLS 1.2
//! minimum) to clients, and HTTP/1.1 to upstreams, whatever the client spoke.

use std::time::Duration;

use http::{StatusCode, Version};
use serde_json::json;
use tidegate_tests::api::Server;
use tidegate_tests::raw::exchange;
use tidegate_tests::{
    TestCert, Upstream, config, get, h1_client, h2c_client, set, start_gateway, test_cert,
    tls_client, tls_get,
};

/// A plain HTTP/1.1 request is proxied: the upstream answers 200 and sees HTTP/1.1.
#[tokio::test]
async fn http1_is_proxied() {
    let up = Upstream::start().await;
    let gw = start_gateway(&config(&[up.addr])).await;
    let r = get(&h1_client(), gw.listen_addrs[0], "/hello?x=1").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.version, Version::HTTP_11);
    let body = r.json();
    assert_eq!(body["path"], "/hello?x=1");
    assert_eq!(body["version"], "HTTP/1.1");
    assert_eq!(up.hits(), 1);
    assert!(gw.shutdown().await);
}

/// A prior-knowledge h2c request is proxied over HTTP/2 downstream and HTTP/1.1 upstream.
#[tokio::test]
async fn h2c_is_proxied() {
    let up = Upstream::start().await;
    let gw = start_gateway(&config(&[up.addr])).await;
    let client = h2c_client();
    for i in 0..3 {
        let r = get(&client, gw.listen_addrs[0], &format!("/h2/{i}")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.version, Version::HTTP_2);
        let body = r.json();
        assert_eq!(body["path"], format!("/h2/{i}"));
        assert_eq!(body["version"], "HTTP/1.1");
        // The authority the client addressed reaches the upstream as `Host`, as it does
        // for HTTP/1.1 clients.
        assert_eq!(body["headers"]["host"], gw.listen_addrs[0].to_string());
    }
    assert_eq!(up.hits(), 3);
    drop(client);
    assert!(gw.shutdown().await);
}

/// An echo upstream, a test certificate, and a gateway in front of the upstream whose
/// listener speaks TLS with that certificate.
async fn tls_gateway() -> (Upstream, TestCert, Server) {
    let up = Upstream::start().await;
    let cert = test_cert();
    let mut cfg = config(&[up.addr]);
    set(
        &mut cfg,
        "server/listeners/0/tls",
        json!({
            "cert_path": cert.cert_path.to_str().unwrap(),
            "key_path": cert.key_path.to_str().unwrap(),
        }),
    );
    let gw = start_gateway(&cfg).await;
    (up, cert, gw)
}

/// Over TLS 1.2 and 1.3, ALPN picks h2 or http/1.1 as offered; upstream sees https and the host.
#[tokio::test]
async fn tls_alpn_h2_and_http11() {
    let (up, cert, gw) = tls_gateway().await;
    let addr = gw.listen_addrs[0];

    const BOTH: &[&[u8]] = &[b"h2", b"http/1.1"];
    const H1: &[&[u8]] = &[b"http/1.1"];
    let cases = [
        (BOTH, &rustls::version::TLS13, "h2", Version::HTTP_2),
        (H1, &rustls::version::TLS13, "http/1.1", Version::HTTP_11),
        (BOTH, &rustls::version::TLS12, "h2", Version::HTTP_2),
        (H1, &rustls::version::TLS12, "http/1.1", Version::HTTP_11),
    ];
    for (offer, tls_version, want_alpn, want_http) in cases {
        let r = tls_get(addr, tls_client(&cert, offer, &[tls_version]), "/secure").await;
        let label = format!("{:?} {want_alpn}", tls_version.version);
        assert_eq!(r.alpn.as_deref(), Some(want_alpn.as_bytes()), "{label}");
        assert_eq!(r.tls_version, Some(tls_version.version), "{label}");
        assert_eq!(
            r.reply.status,
            StatusCode::OK,
            "{label}: {}",
            r.reply.text()
        );
        assert_eq!(r.reply.version, want_http, "{label}");
        let body = r.reply.json();
        assert_eq!(body["path"], "/secure", "{label}");
        assert_eq!(body["headers"]["x-forwarded-proto"], "https", "{label}");
        assert_eq!(body["headers"]["host"], "localhost", "{label}");
    }
    assert_eq!(up.hits(), 4);
    assert!(gw.shutdown().await);
}

/// A TLS connection idle past the park delay (its serving task ended, the TLS stream handed
/// to the small task that waits, then to a new serving task) serves on, and says
/// `https` to the upstream each time.
#[tokio::test]
async fn a_parked_tls_connection_serves_on() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (_up, cert, gw) = tls_gateway().await;
    let tcp = tokio::net::TcpStream::connect(gw.listen_addrs[0])
        .await
        .unwrap();
    let client = tls_client(&cert, &[b"http/1.1"], &[&rustls::version::TLS13]);
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(client)
        .connect(name, tcp)
        .await
        .expect("the TLS handshake succeeds");
    for (i, pause) in [0, 1_300, 1_300].into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let req = format!("GET /p{i} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        tls.write_all(req.as_bytes()).await.unwrap();
        // The echo upstream's answer is one JSON object.
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.ends_with(b"}") {
            let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf))
                .await
                .expect("an answer in time")
                .unwrap();
            assert_ne!(n, 0, "closed after request {i}");
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "request {i}: {text}");
        assert!(text.contains(&format!("\"path\":\"/p{i}\"")), "{text}");
        assert!(text.contains("\"x-forwarded-proto\":\"https\""), "{text}");
    }
    assert!(gw.shutdown().await);
}

/// A ClientHello offering only TLS 1.1 is refused with a `protocol_version` alert.
#[tokio::test]
async fn tls_below_1_2_is_refused() {
    let (up, _cert, gw) = tls_gateway().await;

    // A minimal TLS 1.1 ClientHello: no supported_versions extension; otherwise acceptable
    // (a suite and a signature scheme the server supports), so only the version is wrong.
    let mut hello = vec![0x03, 0x02]; // client_version TLS 1.1
    hello.extend_from_slice(&[0x42; 32]); // random
    hello.push(0); // session id
    hello.extend_from_slice(&[0x00, 0x04, 0xc0, 0x2b, 0xc0, 0x2f]); // ECDHE-{ECDSA,RSA}-AES128-GCM
    hello.extend_from_slice(&[0x01, 0x00]); // compression: null
    // extensions: signature_algorithms = [ecdsa_secp256r1_sha256]
    hello.extend_from_slice(&[0x00, 0x08, 0x00, 0x0d, 0x00, 0x04, 0x00, 0x02, 0x04, 0x03]);
    let mut handshake = vec![0x01, 0x00];
    handshake.extend_from_slice(&(hello.len() as u16).to_be_bytes());
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);

    let r = exchange(gw.listen_addrs[0], &record, Duration::from_secs(5)).await;
    let answer = r.bytes.get(..7).unwrap_or_else(|| {
        panic!(
            "the server answers in time with an alert record, got {:02x?}",
            r.bytes
        )
    });
    assert_eq!(answer[0], 0x15, "an alert record, got {answer:02x?}");
    assert_eq!(answer[5], 2, "a fatal alert, got {answer:02x?}");
    assert_eq!(answer[6], 70, "protocol_version, got {answer:02x?}");
    assert_eq!(up.hits(), 0);
    assert!(gw.shutdown().await);
}
