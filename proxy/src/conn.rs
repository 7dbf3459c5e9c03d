//! What the gateway knows of a downstream connection: the facts each of its requests is
//! decided and forwarded with. Built once per connection by `serve`.

use std::net::SocketAddr;

use http::HeaderValue;

/// Per-connection facts: the client address (limit and bucket key for requests without a
/// user, `X-Forwarded-For`) and the scheme it came in on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address.
    pub remote: SocketAddr,
    /// The client's IP, preformatted for `X-Forwarded-For`.
    pub remote_ip: HeaderValue,
    /// `http` or `https`.
    pub proto: HeaderValue,
}
