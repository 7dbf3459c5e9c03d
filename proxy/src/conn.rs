//! What the gateway knows of a downstream connection: the facts each of its requests is
//! decided and forwarded with. Built once per connection by `serve`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;

use http::{HeaderMap, HeaderValue};
use rules::trusted::TrustedProxies;

/// Per-connection facts: the peer's address (the client address unless the peer is a trusted
/// proxy, see [`ConnInfo::client_ip`]; `X-Forwarded-For`) and the scheme it came in on.
#[derive(Debug)]
pub struct ConnInfo {
    /// The peer's (socket) address.
    pub remote: SocketAddr,
    /// The peer's IP, preformatted for `X-Forwarded-For`.
    pub remote_ip: HeaderValue,
    /// `http` or `https`.
    pub proto: HeaderValue,
    /// This hop's `Forwarded` element without a host (`for=<peer>;proto=<scheme>`, RFC 7239),
    /// preformatted: a request adds only its `;host=`.
    pub forwarded: HeaderValue,
    /// The last request's `Host` and the `Forwarded` element built for it: the next request
    /// on the connection with the same `Host` (nearly every one) reuses it.
    pub forwarded_last: Mutex<Option<(HeaderValue, HeaderValue)>>,
}

impl Clone for ConnInfo {
    fn clone(&self) -> Self {
        Self {
            remote: self.remote,
            remote_ip: self.remote_ip.clone(),
            proto: self.proto.clone(),
            forwarded: self.forwarded.clone(),
            forwarded_last: Mutex::new(None),
        }
    }
}

impl ConnInfo {
    /// The facts of a connection from `remote` on a listener of scheme `proto`.
    pub fn new(remote: SocketAddr, proto: HeaderValue) -> Self {
        let ip = remote.ip().to_canonical();
        let for_ = match ip {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("\"[{a}]\""),
        };
        let proto_s = proto.to_str().unwrap_or("http");
        Self {
            remote,
            remote_ip: HeaderValue::from_str(&remote.ip().to_string())
                .expect("an IP is a valid header value"),
            forwarded: HeaderValue::from_str(&format!("for={for_};proto={proto_s}"))
                .expect("an IP and a scheme are a valid header value"),
            proto,
            forwarded_last: Mutex::new(None),
        }
    }

    /// The client address of a request on this connection with these headers: the peer,
    /// unless it is one of `trusted`, then the right-most untrusted `X-Forwarded-For` entry
    /// (see [`rules::trusted`]). Limit keys, overload buckets and the access log use it.
    pub fn client_ip(&self, headers: &HeaderMap, trusted: &TrustedProxies) -> IpAddr {
        let peer = self.remote.ip();
        if trusted.is_empty() {
            // The common case: no proxy in front, one branch.
            return peer;
        }
        trusted.client_ip(peer, headers)
    }
}
