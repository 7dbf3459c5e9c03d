//! Bodies stream through the gateway both ways: a 50 MiB upload and a 50 MiB download
//! through the real `tidegate` binary, while its resident memory stays flat.
//!
//! Each side pauses before consuming the body, so a gateway that buffered would have time
//! to read the whole 50 MiB into memory, and the RSS sampler would see it.

use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use tidegate_tests::{
    ChildGateway, RssSampler, TIMEOUT, Upstream, config, get, h1_client, send, streamed,
};

const SIZE: u64 = 50 * 1024 * 1024;
/// Allowed RSS growth of the gateway during a transfer.
const BOUND: u64 = 30 * 1024 * 1024;

/// A 50 MiB upload and download pass through a tidegate child intact, RSS growth < 30 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_with_flat_memory() {
    let up = Upstream::start().await;
    let gw = ChildGateway::spawn(&config(&[up.addr]));
    let client = h1_client();

    // Warm up (connection pools, buffers, allocator arenas) before the baseline.
    for _ in 0..3 {
        let r = get(&client, gw.addr, "/warm").await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let baseline = gw.rss_bytes();

    // Upload: the upstream waits before reading, then counts the bytes.
    let sampler = RssSampler::start(gw.pid());
    let req = Request::post(format!("http://{}/upload?sleep_ms=500", gw.addr))
        .body(streamed(SIZE))
        .unwrap();
    let r = send(&client, req).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["body_len"], SIZE);
    assert_eq!(up.body_bytes(), SIZE);
    let upload_peak = sampler.peak();
    drop(sampler);
    assert!(
        upload_peak.saturating_sub(baseline) < BOUND,
        "upload: RSS grew from {} MiB to {} MiB",
        baseline >> 20,
        upload_peak >> 20
    );

    // Download: the client waits before reading, then counts the bytes.
    let sampler = RssSampler::start(gw.pid());
    let resp = tokio::time::timeout(
        TIMEOUT,
        client.request(
            Request::get(format!("http://{}/download?download={SIZE}", gw.addr))
                .body(tidegate_tests::full(""))
                .unwrap(),
        ),
    )
    .await
    .expect("the download starts in time")
    .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut body = resp.into_body();
    let mut received = 0u64;
    let read = async {
        while let Some(frame) = body.frame().await {
            if let Some(d) = frame.expect("the download continues").data_ref() {
                received += d.len() as u64;
            }
        }
    };
    tokio::time::timeout(TIMEOUT, read)
        .await
        .expect("the download finishes in time");
    assert_eq!(received, SIZE);
    let download_peak = sampler.peak();
    drop(sampler);
    assert!(
        download_peak.saturating_sub(baseline) < BOUND,
        "download: RSS grew from {} MiB to {} MiB",
        baseline >> 20,
        download_peak >> 20
    );
}
