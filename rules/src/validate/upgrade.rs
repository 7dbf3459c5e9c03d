//! Validation of a route's `upgrade`: the protocols its requests may switch to.

use crate::error::JsonPath;

use super::Validator;

/// Most protocols one route may list.
const MAX_UPGRADE_PROTOCOLS: usize = 8;
/// Longest protocol token, in bytes.
const MAX_PROTOCOL_BYTES: usize = 64;

impl Validator<'_> {
    /// `list`, checked and lowercased (the request path compares case-insensitively with
    /// one pass over bytes). Every problem is reported at its entry's path.
    pub(super) fn upgrade(&mut self, rp: &JsonPath, list: &[String]) -> Box<[Box<str>]> {
        let p = rp.key("upgrade");
        if list.len() > MAX_UPGRADE_PROTOCOLS {
            self.err(
                p.clone(),
                format!(
                    "{} protocols; at most {MAX_UPGRADE_PROTOCOLS} are allowed",
                    list.len()
                ),
            );
        }
        let mut out: Vec<Box<str>> = Vec::with_capacity(list.len());
        for (i, proto) in list.iter().enumerate() {
            let ep = p.index(i);
            let lower = proto.to_ascii_lowercase();
            if proto.is_empty() || proto.len() > MAX_PROTOCOL_BYTES {
                self.err(
                    ep,
                    format!("{proto:?}: a protocol is 1..={MAX_PROTOCOL_BYTES} bytes"),
                );
            } else if let Some(bad) = proto.bytes().find(|&b| !is_tchar(b)) {
                self.err(
                    ep,
                    format!(
                        "{proto:?} contains {:?}; a protocol is an HTTP token (letters, digits and !#$%&'*+-.^_`|~)",
                        char::from(bad)
                    ),
                );
            } else if lower == "h2c" {
                self.err(
                    ep,
                    "\"h2c\" is refused: an h2c upgrade would let a client speak HTTP/2 to the upstream past every rule of the gateway",
                );
            } else if out.iter().any(|o| **o == *lower) {
                self.err(ep, format!("{proto:?} is listed twice"));
            } else {
                out.push(lower.into());
            }
        }
        out.into()
    }
}

/// A token character (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}
