//! Trusted proxies (`server.trusted_proxies`): which peers may tell the gateway who the
//! client is, and the client address a request is then governed and logged under.
//!
//! A request's client address is its peer (the socket address), unless the peer is a trusted
//! proxy: then it is the right-most `X-Forwarded-For` entry that is not itself trusted. The
//! walk goes right to left (every header line taken as one comma-separated list, RFC 9110
//! §5.3), skipping trusted addresses; when every entry is trusted, the left-most one is the
//! client; an entry that is not an IP address stops the walk and the peer is used.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// An IP network: an address and a prefix length (`10.0.0.0/8`, `2001:db8::/32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// The trusted proxies of a config: empty (the default) trusts no peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    nets: Box<[Cidr]>,
}

// === impl Cidr ===

impl Cidr {
    /// Parse `IP/prefix`, or a bare IP (a single address: `/32` or `/128`). Host bits set
    /// in the address are refused (`10.0.0.1/8` is a likely typo for a network).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = ip
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR: write IP/prefix, like 10.0.0.0/8"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && !p.starts_with('+') => n,
                _ => {
                    return Err(format!(
                        "{s:?}: the prefix length must be a number in 0..={max}"
                    ));
                }
            },
        };
        let cidr = Self { addr, prefix };
        if cidr.mask(addr) != bits(addr) {
            return Err(format!(
                "{s:?} has host bits set beyond /{prefix}; write the network address"
            ));
        }
        Ok(cidr)
    }

    /// Whether `ip` is in this network. An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, as
    /// a dual-stack socket reports IPv4 peers) counts as its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && self.mask(ip) == bits(self.addr)
    }

    /// `ip`'s bits with everything past the prefix cleared.
    fn mask(&self, ip: IpAddr) -> u128 {
        let width = if ip.is_ipv4() { 32 } else { 128 };
        let keep = u32::from(self.prefix);
        let b = bits(ip);
        if keep == 0 {
            0
        } else {
            b & (u128::MAX << (width - keep)) & (u128::MAX >> (128 - width))
        }
    }
}

fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a).into(),
        IpAddr::V6(a) => u128::from(a),
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

// === impl TrustedProxies ===

impl TrustedProxies {
    /// These networks.
    pub fn new(nets: Vec<Cidr>) -> Self {
        Self { nets: nets.into() }
    }

    /// No peer is trusted (the common case: one branch on the request path).
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// The networks, in config order.
    pub fn nets(&self) -> &[Cidr] {
        &self.nets
    }

    /// Whether `ip` is a trusted proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|n| n.contains(ip))
    }

    /// The client address of a request from `peer` with these headers (see the module
    /// docs): `peer` unless it is trusted, else the right-most untrusted `X-Forwarded-For`
    /// entry.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if self.nets.is_empty() || !self.contains(peer) {
            return peer;
        }
        let mut left_most = peer;
        // Lines right to left, entries in each right to left: one list, walked backwards.
        for line in headers.get_all(&X_FORWARDED_FOR).iter().rev() {
            let Ok(line) = line.to_str() else {
                return peer;
            };
            for entry in line.rsplit(',') {
                let entry = entry.trim();
                if entry.is_empty() {
                    // `a,,b` or a trailing comma: empty list elements are allowed and
                    // ignored (RFC 9110 §5.6.1).
                    continue;
                }
                let Some(ip) = parse_entry(entry) else {
                    return peer;
                };
                if !self.contains(ip) {
                    return ip;
                }
                left_most = ip;
            }
        }
        left_most
    }
}

/// One `X-Forwarded-For` entry: an IP, tolerating the forms proxies write (`[v6]`,
/// `v4:port`, `[v6]:port`).
fn parse_entry(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    s.parse::<std::net::SocketAddr>()
        .map(|a| a.ip())
        .ok()
        .or_else(|| {
            s.strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|r| r.parse::<std::net::Ipv6Addr>().ok())
                .map(IpAddr::V6)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(nets: &[&str]) -> TrustedProxies {
        TrustedProxies::new(nets.iter().map(|n| Cidr::parse(n).unwrap()).collect())
    }

    fn xff(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append("x-forwarded-for", l.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_parsing() {
        for ok in [
            "10.0.0.0/8",
            "0.0.0.0/0",
            "192.168.1.7/32",
            "192.168.1.7",
            "2001:db8::/32",
            "::/0",
            "::1/128",
            "::1",
        ] {
            assert!(Cidr::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "10.0.0.0/33",
            "2001:db8::/129",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/x",
            "10.0.0/8",
            "",
            "example.com/8",
            "10.0.0.1/8",
            "2001:db8::1/32",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Cidr::parse("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
    }

    #[test]
    fn cidr_contains() {
        let n = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(n.contains(ip("10.1.255.3")));
        assert!(!n.contains(ip("10.2.0.1")));
        assert!(
            n.contains(ip("::ffff:10.1.0.9")),
            "IPv4-mapped counts as IPv4"
        );
        assert!(!n.contains(ip("2001:db8::1")));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(!Cidr::parse("0.0.0.0/0").unwrap().contains(ip("::1")));
    }

    /// An untrusted peer is the client, whatever it sends; no trusted proxies at all, too.
    #[test]
    fn untrusted_peer_is_the_client() {
        let h = xff(&["203.0.113.7"]);
        assert_eq!(
            TrustedProxies::default().client_ip(ip("127.0.0.1"), &h),
            ip("127.0.0.1")
        );
        assert_eq!(
            trusted(&["10.0.0.0/8"]).client_ip(ip("127.0.0.1"), &h),
            ip("127.0.0.1")
        );
    }

    /// Right to left, skipping trusted entries, across several lines.
    #[test]
    fn right_most_untrusted_ipv4() {
        let t = trusted(&["10.0.0.0/8", "127.0.0.1/32"]);
        let h = xff(&["198.51.100.1, 203.0.113.7", "10.0.0.2,10.0.0.3"]);
        assert_eq!(t.client_ip(ip("127.0.0.1"), &h), ip("203.0.113.7"));
        // No header: the peer.
        assert_eq!(
            t.client_ip(ip("127.0.0.1"), &HeaderMap::new()),
            ip("127.0.0.1")
        );
        // Ports and empty elements are tolerated.
        let h = xff(&["198.51.100.1:5555, , 10.0.0.2"]);
        assert_eq!(t.client_ip(ip("10.9.9.9"), &h), ip("198.51.100.1"));
    }

    #[test]
    fn right_most_untrusted_ipv6() {
        let t = trusted(&["2001:db8:1::/48", "::1/128"]);
        let h = xff(&["2001:db8:2::5, [2001:db8:1::7]"]);
        assert_eq!(t.client_ip(ip("::1"), &h), ip("2001:db8:2::5"));
        let h = xff(&["[2001:db8:3::9]:443"]);
        assert_eq!(t.client_ip(ip("::1"), &h), ip("2001:db8:3::9"));
    }

    /// Every entry trusted: the left-most is the client.
    #[test]
    fn all_trusted_is_left_most() {
        let t = trusted(&["10.0.0.0/8"]);
        let h = xff(&["10.0.0.5, 10.0.0.6", "10.0.0.7"]);
        assert_eq!(t.client_ip(ip("10.0.0.1"), &h), ip("10.0.0.5"));
    }

    /// An entry that is not an address stops the walk: the peer is used, never a value
    /// left of the garbage.
    #[test]
    fn garbage_entry_uses_peer() {
        let t = trusted(&["10.0.0.0/8"]);
        let h = xff(&["203.0.113.7, unknown, 10.0.0.2"]);
        assert_eq!(t.client_ip(ip("10.0.0.1"), &h), ip("10.0.0.1"));
        // Right of the garbage, an untrusted entry still wins.
        let h = xff(&["bogus, 203.0.113.9, 10.0.0.2"]);
        assert_eq!(t.client_ip(ip("10.0.0.1"), &h), ip("203.0.113.9"));
    }
}
