//! A real OTLP/HTTP trace receiver for the tracing tests: a hyper server on `127.0.0.1:0`
//! that decodes each `POST` body as an OTLP `ExportTraceServiceRequest` (protobuf, with the
//! OpenTelemetry project's own generated types) and keeps the spans with their resource's
//! `service.name`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
pub use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// One span as received, with the `service.name` of its resource.
#[derive(Debug, Clone)]
pub struct Received {
    pub service: String,
    pub span: Span,
}

#[derive(Debug, Default)]
struct Log {
    spans: Vec<Received>,
    /// Export requests received, and those whose body was not a valid OTLP request.
    requests: usize,
    malformed: usize,
}

/// The receiver: `endpoint()` is what `server.tracing.otlp_endpoint` should name.
#[derive(Debug)]
pub struct Collector {
    pub addr: SocketAddr,
    log: Arc<Mutex<Log>>,
    task: JoinHandle<()>,
}

impl Collector {
    /// Start one.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
        let addr = listener.local_addr().expect("a bound address");
        let log = Arc::new(Mutex::new(Log::default()));
        let l = log.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = l.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let log = log.clone();
                        async move { Ok::<_, Infallible>(receive(req, &log).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { addr, log, task }
    }

    /// `http://{addr}/v1/traces`.
    pub fn endpoint(&self) -> String {
        format!("http://{}/v1/traces", self.addr)
    }

    /// Spans received so far.
    pub fn spans(&self) -> Vec<Received> {
        self.log.lock().expect("not poisoned").spans.clone()
    }

    /// Export requests received so far.
    pub fn requests(&self) -> usize {
        self.log.lock().expect("not poisoned").requests
    }

    /// Export requests whose body did not decode.
    pub fn malformed(&self) -> usize {
        self.log.lock().expect("not poisoned").malformed
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(req: Request<Incoming>, log: &Mutex<Log>) -> Response<Full<Bytes>> {
    let ok_path = req.method() == http::Method::POST && req.uri().path() == "/v1/traces";
    let protobuf = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v == "application/x-protobuf");
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let decoded = match body {
        Ok(b) if ok_path && protobuf => ExportTraceServiceRequest::decode(b).ok(),
        _ => None,
    };
    let mut l = log.lock().expect("not poisoned");
    l.requests += 1;
    let Some(export) = decoded else {
        l.malformed += 1;
        return Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .body(Full::new(Bytes::new()))
            .expect("a valid response");
    };
    for rs in export.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for span in ss.spans {
                l.spans.push(Received {
                    service: service.clone(),
                    span,
                });
            }
        }
    }
    Response::builder()
        .header(http::header::CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(
            ExportTraceServiceResponse::default().encode_to_vec().into(),
        ))
        .expect("a valid response")
}

/// The string or integer value of the span's attribute `key`, as text.
pub fn attribute(span: &Span, key: &str) -> Option<String> {
    let kv = span.attributes.iter().find(|kv| kv.key == key)?;
    match kv.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// Lowercase hex of an ID.
pub fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}
