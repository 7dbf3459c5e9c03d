//! Classification: who is calling what. Each request gets an interface (method + path
//! template, found by a router, not a scan), an app ID and a user ID, read by the extractors
//! the config names.
//!
//! Values borrow from the request wherever they can; only a percent-encoded query value is
//! decoded into a new string. An absent or empty value is `None`, never `""`, so "no user"
//! can never collide with a user whose ID is empty. A value longer than
//! `identity.max_id_bytes` is also `None` (and [`Classified::invalid_id`] set): the bound is
//! enforced here, once, so limits, routing, admission and the logs all see the same
//! (anonymous) request and never an unbounded ID.

use std::borrow::Cow;

use http::{HeaderMap, HeaderName, Method, header};
use percent_encoding::percent_decode_str;

use crate::ids::InterfaceId;

/// Most distinct path parameters limit keys may read, over all limits: classification
/// keeps their values in a fixed array, so reading them allocates nothing.
pub const MAX_KEY_PARAMS: usize = 4;

/// The values of the path parameters limit keys read, by slot (see
/// [`Classifier::key_params`]): percent-decoded, borrowed from the path unless decoding
/// changed them; `None` when the request's interface does not have the parameter.
pub type PathParams<'a> = [Option<Cow<'a, [u8]>>; MAX_KEY_PARAMS];

/// The classified identity of one request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Classified<'a> {
    /// The interface whose method and path template match, if any.
    pub interface: Option<InterfaceId>,
    /// The app ID, if present.
    pub app: Option<Cow<'a, str>>,
    /// The user ID, if present.
    pub user: Option<Cow<'a, str>>,
    /// Whether an app or user ID was present but invalid (longer than `max_id_bytes`); it
    /// is then `None` above, so every phase sees the request as lacking it.
    pub invalid_id: bool,
    /// The path parameters limit keys read, taken from the route match that found the
    /// interface (no second lookup).
    pub params: PathParams<'a>,
}

/// The parts of a request classification reads.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    /// The method.
    pub method: &'a Method,
    /// The path, without the query.
    pub path: &'a str,
    /// The raw query string, without `?`.
    pub query: Option<&'a str>,
    /// The headers.
    pub headers: &'a HeaderMap,
}

/// An interface, compiled.
#[derive(Debug)]
pub struct CompiledInterface {
    /// Its name.
    pub name: Box<str>,
    /// Its method; `None` for `*`.
    pub method: Option<Method>,
    /// Its path template.
    pub path: Box<str>,
    /// Its response cache, if it has one.
    pub cache: Option<CacheSpec>,
}

/// An interface's response cache, compiled (see [`crate::model::Cache`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSpec {
    /// How long an answer is served after its request was sent.
    pub ttl: std::time::Duration,
    /// Answers kept at once.
    pub max_entries: u32,
    /// Largest body kept, in bytes.
    pub max_body_bytes: u32,
    /// Whether the key holds the caller's identity.
    pub vary_on_identity: bool,
    /// Requests waiting at once for one key's upstream call.
    pub max_waiters: u32,
    /// Longest wait for another request's upstream call.
    pub max_wait: std::time::Duration,
}

/// The interfaces declared on one path template: exact methods first, then `*`.
pub(crate) type MethodTable = Vec<(Option<Method>, InterfaceId)>;

/// What classification needs: the interfaces' path router and the identity extractors.
#[derive(Debug)]
pub(crate) struct Classifier {
    /// Path template → the interfaces declared on it.
    pub(crate) router: matchit::Router<MethodTable>,
    /// Where the app ID is read.
    pub(crate) app: CompiledExtractor,
    /// Where the user ID is read.
    pub(crate) user: CompiledExtractor,
    /// Longest app or user ID accepted, in bytes.
    pub(crate) max_id_bytes: usize,
    /// Whether an invalid ID refuses the request (`identity.on_invalid: reject`).
    pub(crate) reject_invalid: bool,
    /// The path parameters limit keys read (`{"path_param": NAME}`), slot by slot: a
    /// request's values land in [`Classified::params`] at the same index.
    pub(crate) key_params: Vec<Box<str>>,
}

/// An identity extractor, compiled.
#[derive(Debug)]
pub(crate) enum CompiledExtractor {
    Header(HeaderName),
    Query(Box<str>),
    Cookie(Box<str>),
    PathParam(Box<str>),
}

// === impl Classifier ===

impl Classifier {
    /// Whether the app or user extractor reads the header `name` (any case).
    pub(crate) fn is_identity_header(&self, name: &str) -> bool {
        [&self.app, &self.user].into_iter().any(|e| match e {
            CompiledExtractor::Header(h) => h.as_str().eq_ignore_ascii_case(name),
            _ => false,
        })
    }
}

impl Classifier {
    /// Classify a request.
    pub(crate) fn classify<'a>(&self, req: RequestParts<'a>) -> Classified<'a> {
        let mut out = Classified::default();
        let mut params: Option<matchit::Params<'_, 'a>> = None;
        if let Ok(m) = self.router.at(req.path) {
            let hit = m
                .value
                .iter()
                .find(|(method, _)| method.as_ref().is_none_or(|x| x == req.method));
            if let Some((_, id)) = hit {
                out.interface = Some(*id);
                for (slot, name) in out.params.iter_mut().zip(&self.key_params) {
                    *slot = m.params.get(&**name).map(|v| percent_decode_str(v).into());
                }
                params = Some(m.params);
            }
        }
        out.app = extract(&self.app, &req, params.as_ref());
        out.user = extract(&self.user, &req, params.as_ref());
        for id in [&mut out.app, &mut out.user] {
            if id.as_ref().is_some_and(|v| v.len() > self.max_id_bytes) {
                *id = None;
                out.invalid_id = true;
            }
        }
        out
    }

    /// Whether a request with an invalid ID is refused rather than made anonymous.
    pub(crate) fn rejects_invalid_id(&self) -> bool {
        self.reject_invalid
    }
}

/// Fields up to which [`field`] scans rather than hashes.
const SCAN_MAX: usize = 8;

/// The first value of `name`, as [`HeaderMap::get`] gives it. A map of a few fields (what an
/// API client sends) is scanned: comparing a name with a handful of others costs less than
/// hashing it, and the request path looks up several names that are usually absent.
#[inline]
pub fn field<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<&'h http::HeaderValue> {
    if headers.len() > SCAN_MAX {
        return headers.get(name);
    }
    // In insertion order of names, each name's values in order: the first hit is `get`'s.
    headers.iter().find_map(|(k, v)| (k == name).then_some(v))
}

fn extract<'a>(
    e: &CompiledExtractor,
    req: &RequestParts<'a>,
    params: Option<&matchit::Params<'_, 'a>>,
) -> Option<Cow<'a, str>> {
    let v: Cow<'a, str> = match e {
        CompiledExtractor::Header(name) => Cow::Borrowed(
            std::str::from_utf8(field(req.headers, name)?.as_bytes())
                .ok()?
                .trim(),
        ),
        CompiledExtractor::Query(name) => query_param(req.query?, name)?,
        CompiledExtractor::Cookie(name) => Cow::Borrowed(cookie(req.headers, name)?),
        CompiledExtractor::PathParam(name) => Cow::Borrowed(params?.get(&**name)?),
    };
    (!v.is_empty()).then_some(v)
}

/// The first value of `name` in a query string, percent-decoded (`+` is a space).
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<Cow<'a, str>> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(k).as_deref() == Some(name))
            .then(|| decode(v))
            .flatten()
    })
}

/// Percent-decode; `None` when the result is not UTF-8.
fn decode(s: &str) -> Option<Cow<'_, str>> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return Some(Cow::Borrowed(s));
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The value of cookie `name` from the request's `Cookie` header(s).
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get_all(header::COOKIE).iter().find_map(|h| {
        std::str::from_utf8(h.as_bytes())
            .ok()?
            .split(';')
            .find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k.trim() == name).then(|| {
                    let v = v.trim();
                    v.strip_prefix('"')
                        .and_then(|x| x.strip_suffix('"'))
                        .unwrap_or(v)
                })
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Percent-decoding handles `+`, `%XX`, and leaves a stray `%` alone.
    #[test]
    fn query_decoding() {
        assert_eq!(
            query_param("a=1&uid=al%20ice", "uid").as_deref(),
            Some("al ice")
        );
        assert_eq!(query_param("uid=a+b", "uid").as_deref(), Some("a b"));
        assert_eq!(query_param("uid=100%", "uid").as_deref(), Some("100%"));
        assert_eq!(query_param("x=1", "uid"), None);
        assert_eq!(query_param("uid=%ff", "uid"), None, "not UTF-8");
    }

    /// Cookies are found among several, quoted values unquoted.
    #[test]
    fn cookies() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "a=1; uid=\"bob\"; c=3".parse().unwrap());
        assert_eq!(cookie(&h, "uid"), Some("bob"));
        assert_eq!(cookie(&h, "zz"), None);
    }

    /// `field` gives what `get` gives, scanning or hashing: the first value of a repeated
    /// name, none for an absent one, after removals reorder the map, and past the scan's size.
    #[test]
    fn field_is_get() {
        let names: Vec<HeaderName> = ["host", "x-app", "x-user", "content-length", "x-request-id"]
            .iter()
            .map(|n| HeaderName::from_static(n))
            .collect();
        for fields in 0..=SCAN_MAX + 3 {
            let mut h = HeaderMap::new();
            for i in 0..fields {
                let v = http::HeaderValue::from(i);
                h.append(names[i % 3].clone(), v);
            }
            if fields > 4 {
                h.remove(&names[0]);
                h.append(names[3].clone(), http::HeaderValue::from(99));
            }
            for n in &names {
                assert_eq!(field(&h, n), h.get(n), "{fields} fields, {n}");
            }
        }
    }

    /// A key's path parameter is read from the route match, percent-decoded (so an encoded
    /// ID is the same key), borrowed when there was nothing to decode; a template without
    /// it leaves the slot empty.
    #[test]
    fn key_params() {
        let mut router = matchit::Router::new();
        router
            .insert("/envelopes/{id}", vec![(None, InterfaceId(0))])
            .unwrap();
        router
            .insert("/users/{uid}", vec![(None, InterfaceId(1))])
            .unwrap();
        let c = Classifier {
            router,
            app: CompiledExtractor::Header(HeaderName::from_static("x-app")),
            user: CompiledExtractor::Header(HeaderName::from_static("x-user")),
            max_id_bytes: 64,
            reject_invalid: false,
            key_params: vec!["id".into()],
        };
        let h = HeaderMap::new();
        let at = |path| {
            c.classify(RequestParts {
                method: &Method::GET,
                path,
                query: None,
                headers: &h,
            })
            .params[0]
                .clone()
        };
        assert_eq!(at("/envelopes/e1"), Some(Cow::Borrowed(&b"e1"[..])));
        assert!(matches!(at("/envelopes/e1"), Some(Cow::Borrowed(_))));
        assert_eq!(at("/envelopes/%651"), Some(Cow::Owned(b"e1".to_vec())));
        assert_eq!(at("/users/e1"), None);
        assert_eq!(at("/nowhere"), None);
    }
}
