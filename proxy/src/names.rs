//! Header names as both HTTP/1 parsers (the server's and the upstream client's) make them.
//!
//! Every request and response of a keep-alive stream repeats the same few names (`Host`,
//! the identity headers, `Content-Length`), byte for byte. [`header_name`] remembers the
//! names it made, per thread, in a small direct-mapped table keyed by the exact bytes: a
//! repeated name is one compare and a clone instead of the `http` crate's parse, and for a
//! name that is not a standard one (`x-user-id`), a shared reference instead of a fresh
//! allocation. The table's value is what `HeaderName::from_bytes` returned for exactly those
//! bytes, so the result is the same either way; a client sending ever-new names only
//! replaces entries (the table never grows).

use std::cell::RefCell;

use http::HeaderName;
use http::header::InvalidHeaderName;

/// Table size (a power of two): more than the distinct names of a typical stream.
const SLOTS: usize = 32;
/// Longer names are made afresh each time (they are rare, and keys stay inline).
const MAX_LEN: usize = 32;

#[derive(Clone)]
struct Slot {
    len: u8,
    key: [u8; MAX_LEN],
    name: HeaderName,
}

thread_local! {
    static TABLE: RefCell<[Option<Slot>; SLOTS]> = const { RefCell::new([const { None }; SLOTS]) };
}

/// `HeaderName::from_bytes(raw)`, remembered (see the module's docs).
pub fn header_name(raw: &[u8]) -> Result<HeaderName, InvalidHeaderName> {
    let n = raw.len();
    if n == 0 || n > MAX_LEN {
        return HeaderName::from_bytes(raw);
    }
    // Length and three bytes: enough to spread a stream's names over the table.
    let h = n
        .wrapping_mul(0x9e37)
        .wrapping_add(usize::from(raw[0]) * 31)
        .wrapping_add(usize::from(raw[n / 2]) * 7)
        .wrapping_add(usize::from(raw[n - 1]));
    let i = (h ^ (h >> 5)) & (SLOTS - 1);
    TABLE.with(|t| {
        let mut t = t.borrow_mut();
        if let Some(s) = &t[i]
            && s.key[..usize::from(s.len)] == *raw
        {
            return Ok(s.name.clone());
        }
        let name = HeaderName::from_bytes(raw)?;
        let mut key = [0; MAX_LEN];
        key[..n].copy_from_slice(raw);
        t[i] = Some(Slot {
            len: n as u8,
            key,
            name: name.clone(),
        });
        Ok(name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the table holds, the answer is `from_bytes`'s for those exact bytes: names
    /// that differ only in case, share a slot, or repeat all come back as made afresh.
    #[test]
    fn same_answer_as_from_bytes() {
        let mut names: Vec<Vec<u8>> = [
            "host",
            "Host",
            "HOST",
            "x-user-id",
            "X-User-Id",
            "x-app-id",
            "content-length",
            "Content-Length",
            "date",
            "x",
            "a-name-of-exactly-thirty-two-byt",
            "a-name-of-thirty-three-bytes-long",
            "bad name",
            "",
            "b\u{e9}d",
            "te",
            "et",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        // Many names of one length and ends, to force slot collisions.
        names.extend((0..200u32).map(|i| format!("x-{i:04}-z").into_bytes()));
        for round in 0..3 {
            for raw in names.iter().chain(names.iter().rev()) {
                let want = HeaderName::from_bytes(raw);
                let got = header_name(raw);
                match (want, got) {
                    (Ok(w), Ok(g)) => assert_eq!(w, g, "{raw:?} in round {round}"),
                    (Err(_), Err(_)) => {}
                    (w, g) => panic!("{raw:?}: from_bytes {w:?}, cached {g:?}"),
                }
            }
        }
    }
}
