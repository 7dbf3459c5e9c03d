//! Raw exchanges: bytes written to a new TCP connection and everything read back, for
//! requests no HTTP client would send (hostile framing, oversized heads, TLS records).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// What came back on one connection.
#[derive(Debug)]
pub struct RawReply {
    /// Every byte the server sent.
    pub bytes: Vec<u8>,
    /// Whether the server closed (or reset) the connection within the bound; `false` when
    /// it was still open when the bound ran out.
    pub closed: bool,
}

impl RawReply {
    /// The bytes as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// The status code of every HTTP/1.1 response in the bytes, in order.
    pub fn statuses(&self) -> Vec<u16> {
        let raw = self.text();
        raw.match_indices("HTTP/1.1 ")
            .filter_map(|(i, _)| raw.get(i + 9..i + 12)?.parse().ok())
            .collect()
    }

    /// The first response split into its status line, its header block (lower-cased) and
    /// everything after the head; panics when no complete head arrived.
    pub fn head_and_body(&self) -> (String, String, Vec<u8>) {
        let split = self
            .bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no complete response head in {:?}", self.text()));
        let head = String::from_utf8_lossy(&self.bytes[..split]).into_owned();
        let (status, headers) = head.split_once("\r\n").unwrap_or((&head, ""));
        (
            status.to_owned(),
            headers.to_ascii_lowercase(),
            self.bytes[split + 4..].to_vec(),
        )
    }
}

/// Write `raw` on a new connection to `addr` and read until the server closes it or
/// `within` has passed. The server may close before reading everything, so a failed write
/// is part of the answer, as is a reset while reading (counted as closed).
pub async fn exchange(addr: SocketAddr, raw: &[u8], within: Duration) -> RawReply {
    let deadline = tokio::time::Instant::now() + within;
    let mut s = tokio::time::timeout_at(deadline, TcpStream::connect(addr))
        .await
        .expect("connects in time")
        .expect("connects");
    let _ = tokio::time::timeout_at(deadline, s.write_all(raw)).await;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 8192];
    let closed = loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break true,
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    RawReply { bytes, closed }
}
