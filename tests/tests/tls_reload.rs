//! TLS certificates replaced on disk are picked up for new handshakes without a restart; a
//! bad replacement keeps the previous certificate serving.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tidegate_tests::api;
use tidegate_tests::{TestCert, Upstream, config, set, test_cert, tls_client, tls_get};

/// Whether a TLS handshake trusting only `cert` succeeds against `addr`.
async fn handshake_ok(addr: SocketAddr, cert: &TestCert) -> bool {
    let cfg: Arc<rustls::ClientConfig> =
        tls_client(cert, &[b"http/1.1"], &[&rustls::version::TLS13]);
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    matches!(
        tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp)).await,
        Ok(Ok(_))
    )
}

/// Copy `from`'s certificate and key over the files the gateway reads, each by an atomic
/// rename (as cert-manager and most deploy tools do).
fn install(from: &TestCert, cert_path: &std::path::Path, key_path: &std::path::Path) {
    for (src, dst) in [(&from.cert_path, cert_path), (&from.key_path, key_path)] {
        let tmp = dst.with_extension("tmp");
        std::fs::copy(src, &tmp).unwrap();
        std::fs::rename(&tmp, dst).unwrap();
    }
}

/// Replace the certificate on disk: new handshakes present the new one, with no restart;
/// a garbage replacement is refused (reported on the admin status) and the last good
/// certificate keeps serving; a good one after it applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_and_bad_ones_are_refused() {
    let up = Upstream::start().await;
    let (a, b) = (test_cert(), test_cert());
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    install(&a, &cert_path, &key_path);
    let mut c = config(&[up.addr]);
    set(
        &mut c,
        "server/listeners/0/tls",
        json!({ "cert_path": cert_path, "key_path": key_path }),
    );
    let config_path = dir.path().join("tidegate.json");
    std::fs::write(&config_path, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
    let server = api::start_from_file(&config_path).await.expect("starts");
    let addr = server.listen_addrs[0];
    let reloader = server.reloader.clone().unwrap();

    assert!(handshake_ok(addr, &a).await);
    assert!(!handshake_ok(addr, &b).await, "b is not served yet");
    let r = tls_get(
        addr,
        tls_client(&a, &[b"h2"], &[&rustls::version::TLS13]),
        "/x",
    )
    .await;
    assert_eq!(r.reply.status, 200);

    install(&b, &cert_path, &key_path);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !handshake_ok(addr, &b).await {
        assert!(
            Instant::now() < deadline,
            "the new certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !handshake_ok(addr, &a).await,
        "the old certificate is no longer served"
    );

    // A garbage certificate: refused, reported, and b keeps serving.
    std::fs::write(
        &cert_path,
        b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while reloader.status().tls_last_error.is_none() {
        assert!(
            Instant::now() < deadline,
            "the bad certificate was not reported"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        reloader
            .status()
            .tls_last_error
            .unwrap()
            .contains("tls.crt")
    );
    assert!(
        handshake_ok(addr, &b).await,
        "the last good certificate keeps serving"
    );

    // A good pair again: applied, error cleared.
    install(&a, &cert_path, &key_path);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !handshake_ok(addr, &a).await {
        assert!(
            Instant::now() < deadline,
            "recovery after the bad certificate"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(reloader.status().tls_last_error.is_none());
    assert!(server.shutdown().await);
}
