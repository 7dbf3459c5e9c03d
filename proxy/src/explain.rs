//! `tidegate explain` and `GET /admin/explain`: one query type, one code path, so the command
//! line and the admin port can never disagree about a decision.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use rules::explain::Explanation;
use rules::{RequestParts, Snapshot};

/// A request to explain.
#[derive(Debug, Clone, Default)]
pub struct ExplainQuery {
    /// HTTP method. Default `GET`.
    pub method: Option<String>,
    /// Path, optionally with `?query`.
    pub path: String,
    /// Headers, as `(name, value)`.
    pub headers: Vec<(String, String)>,
    /// App ID (replaces what the app extractor finds).
    pub app: Option<String>,
    /// User ID (replaces what the user extractor finds).
    pub user: Option<String>,
    /// Client IP (bucket key for requests without a user).
    pub client_ip: Option<IpAddr>,
}

/// Explain a query against a snapshot; an error names the bad input.
pub fn explain(snap: &Snapshot, q: &ExplainQuery) -> Result<Explanation, String> {
    let method = Method::from_bytes(q.method.as_deref().unwrap_or("GET").as_bytes())
        .map_err(|_| format!("{:?} is not an HTTP method", q.method))?;
    let uri: Uri = q
        .path
        .parse()
        .map_err(|e| format!("path {:?}: {e}", q.path))?;
    if !uri.path().starts_with('/') {
        return Err(format!("path {:?} must start with `/`", q.path));
    }
    let mut headers = HeaderMap::new();
    for (k, v) in &q.headers {
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| format!("{k:?} is not a header name"))?;
        let value = HeaderValue::from_str(v).map_err(|_| format!("{v:?} is not a header value"))?;
        headers.append(name, value);
    }
    let req = RequestParts {
        method: &method,
        path: uri.path(),
        query: uri.query(),
        headers: &headers,
    };
    Ok(snap.explain(req, q.app.as_deref(), q.user.as_deref(), q.client_ip))
}

/// Split `name:value` (as given to `--header` or `header=`).
pub fn parse_header(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: write a header as name:value"))?;
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

/// Build a query from an admin URL's query string
/// (`app=..&user=..&method=..&path=..&header=k:v&client_ip=..`).
pub fn query_from_url(query: &str) -> Result<ExplainQuery, String> {
    let mut q = ExplainQuery::default();
    let mut path = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, _) = pair.split_once('=').unwrap_or((pair, ""));
        let v = rules::classify::query_param(pair, k)
            .map(|v| v.into_owned())
            .unwrap_or_default();
        match k {
            "app" => q.app = Some(v),
            "user" => q.user = Some(v),
            "method" => q.method = Some(v),
            "path" => path = Some(v),
            "header" => q.headers.push(parse_header(&v)?),
            "client_ip" => {
                q.client_ip = Some(
                    v.parse()
                        .map_err(|_| format!("{v:?} is not an IP address"))?,
                )
            }
            other => {
                return Err(format!(
                    "unknown parameter {other:?}; use app, user, method, path, header, client_ip"
                ));
            }
        }
    }
    q.path = path.ok_or("missing parameter `path`")?;
    Ok(q)
}
