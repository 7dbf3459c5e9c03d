//! gRPC through the gateway, end to end: a real tonic server (the standard health service,
//! `grpc.health.v1.Health`) behind an `http2` upstream, called by a real tonic client and by
//! a raw HTTP/2 client that reads the trailers itself. Unary and server-streaming calls
//! pass with their trailers; an error status from the server reaches the client intact; the
//! statuses are counted per upstream; and the gateway's own refusals (a limit, a dead
//! upstream) reach a gRPC client as gRPC statuses (`RESOURCE_EXHAUSTED`, `UNAVAILABLE`).

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tidegate_tests::{TIMEOUT, api, config, dead_addr, metric_value, set, start_gateway};
use tonic::Code;
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::server::HealthReporter;

/// A tonic health server on `127.0.0.1:0`, stopped when the task is dropped.
struct GrpcServer {
    addr: SocketAddr,
    reporter: HealthReporter,
    task: tokio::task::JoinHandle<()>,
}

impl GrpcServer {
    async fn start() -> Self {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("tidegate.Test", ServingStatus::Serving)
            .await;
        let incoming = tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap())
            .expect("binding");
        let addr = incoming.local_addr().expect("a bound address");
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
        });
        Self {
            addr,
            reporter,
            task,
        }
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The gateway config: the health service's methods as interfaces, `up` the tonic server
/// over h2c, `dead` an upstream nobody listens on.
fn grpc_config(up: SocketAddr) -> Value {
    let mut c = config(&[up]);
    set(&mut c, "upstreams/up/protocol", json!("http2"));
    set(
        &mut c,
        "upstreams/dead",
        json!({ "endpoints": [dead_addr().to_string()], "protocol": "http2",
                "connect_timeout_ms": 500 }),
    );
    let interfaces = c["interfaces"].as_array_mut().unwrap();
    interfaces
        .push(json!({ "name": "check", "method": "POST", "path": "/grpc.health.v1.Health/Check" }));
    interfaces
        .push(json!({ "name": "watch", "method": "POST", "path": "/grpc.health.v1.Health/Watch" }));
    interfaces.push(json!({ "name": "dead", "method": "POST", "path": "/dead.Service/Call" }));
    set(
        &mut c,
        "routes",
        json!([
            { "name": "dead", "match": { "interfaces": ["dead"] }, "upstream": "dead" },
            { "name": "default", "upstream": "up" }
        ]),
    );
    c
}

async fn client(gw: SocketAddr) -> HealthClient<tonic::transport::Channel> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{gw}"))
        .unwrap()
        .connect_timeout(TIMEOUT)
        .timeout(TIMEOUT)
        .connect()
        .await
        .expect("connecting to the gateway");
    HealthClient::new(channel)
}

fn check(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.into(),
    }
}

fn grpc_count(server: &api::Server, code: &str) -> f64 {
    let text = server.live.metrics.encode();
    let series = format!(r#"tidegate_grpc_status_total{{upstream="up",code="{code}"}}"#);
    metric_value(&text, &series).unwrap_or(0.0)
}

/// A unary call and a server-streaming call pass through with their statuses; a
/// `NOT_FOUND` from the server reaches the client with its message; the trailers arrive
/// as the server sent them; each status is counted.
#[tokio::test]
async fn calls_pass_with_trailers() {
    let up = GrpcServer::start().await;
    let server = start_gateway(&grpc_config(up.addr)).await;
    let gw = server.listen_addrs[0];
    let mut health = client(gw).await;

    let r = health
        .check(check("tidegate.Test"))
        .await
        .expect("a SERVING answer");
    assert_eq!(r.into_inner().status, ServingStatus::Serving as i32);

    let e = health
        .check(check("no.Such"))
        .await
        .expect_err("an unknown service is NOT_FOUND");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(
        e.message(),
        "service not registered",
        "the server's own message: {e:?}"
    );

    // Server streaming: the current status, then each change, on one call.
    let mut stream = health
        .watch(check("tidegate.Test"))
        .await
        .expect("a stream")
        .into_inner();
    let first = tokio::time::timeout(TIMEOUT, stream.message())
        .await
        .unwrap();
    assert_eq!(
        first.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    up.reporter
        .set_service_status("tidegate.Test", ServingStatus::NotServing)
        .await;
    let next = tokio::time::timeout(TIMEOUT, stream.message())
        .await
        .unwrap();
    assert_eq!(
        next.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    drop(stream);

    // The raw exchange: the message, then the trailers with `grpc-status: 0`.
    let tcp = tokio::net::TcpStream::connect(gw).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    // An empty HealthCheckRequest (service ""): a 5-byte frame, uncompressed, length 0.
    let req = http::Request::post(format!("http://{gw}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap();
    let resp = tokio::time::timeout(TIMEOUT, send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    let body = resp.into_body().collect().await.unwrap();
    let trailers = body.trailers().cloned().expect("the server's trailers");
    assert_eq!(trailers["grpc-status"], "0");
    // status = SERVING (field 1, varint 1), framed.
    assert_eq!(&body.to_bytes()[..], &[0, 0, 0, 0, 2, 0x08, 0x01]);

    // Two unary OKs and the watch's OK (cancelled by the client: no status); one NOT_FOUND.
    assert_eq!(grpc_count(&server, "OK"), 2.0);
    assert_eq!(grpc_count(&server, "NOT_FOUND"), 1.0);
    assert!(server.shutdown().await);
}

/// The gateway's own refusals to a gRPC client are gRPC statuses: a limit's 429 is
/// `RESOURCE_EXHAUSTED`, an unreachable upstream's 502 is `UNAVAILABLE`. A plain HTTP client
/// still gets the JSON answer.
#[tokio::test]
async fn refusals_are_grpc_statuses() {
    let up = GrpcServer::start().await;
    let mut c = grpc_config(up.addr);
    set(
        &mut c,
        "limits",
        json!([{ "name": "check-limit", "match": { "interfaces": ["check"] },
                 "key": ["interface"], "rate": "1/min", "burst": 1 }]),
    );
    let server = start_gateway(&c).await;
    let gw = server.listen_addrs[0];
    let mut health = client(gw).await;

    health
        .check(check("tidegate.Test"))
        .await
        .expect("the first call is within the burst");
    let e = health
        .check(check("tidegate.Test"))
        .await
        .expect_err("the second is limited");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(e.message(), "rate limited");

    let channel = tonic::transport::Channel::from_shared(format!("http://{gw}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/dead.Service/Call");
    let codec = tonic_prost::ProstCodec::<HealthCheckRequest, tonic_health::pb::HealthCheckResponse>::default();
    let e = grpc
        .unary(tonic::Request::new(check("")), path, codec)
        .await
        .expect_err("no upstream to call");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");

    // Not gRPC: the usual JSON refusal.
    let r = tidegate_tests::post(
        &tidegate_tests::h1_client(),
        gw,
        "/grpc.health.v1.Health/Check",
        "",
    )
    .await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"], "rate_limited");
    assert!(server.shutdown().await);
}
