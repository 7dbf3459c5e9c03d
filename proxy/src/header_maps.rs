//! Header maps for the own HTTP/1 paths, reused per thread.
//!
//! Each request on the fast path builds a map of its head (the server's parser), and so does
//! the upstream client's parser for an answer it does not keep as it came (see
//! `upstream::h1::RawFields`). A fresh `HeaderMap` is two allocations (its
//! index and its entries, the latter over 1 KB for a typical head) and two frees when it
//! drops, for memory that is the same size every time. [`take`] hands out a cleared map
//! from this thread's spares and [`give`] returns one whose request is done with it, so a
//! steady stream allocates none (clearing still drops the entries: the saving measured
//! about 190 instructions a request).
//!
//! A returned map is cleared (entries dropped, index reset, hash state back to the fast one)
//! before it is kept, so nothing of one request reaches the next. Only a few maps are kept
//! per thread, and only ordinary-sized ones: a head with hundreds of fields gives its memory
//! back.

use std::cell::RefCell;

use http::HeaderMap;

/// Spare maps kept per thread: more than the requests a worker has between parse and
/// response at once in a steady stream; a burst beyond that allocates as before.
const KEEP: usize = 32;

/// A map that has room for more fields than this is freed, not kept.
const MAX_KEPT_CAPACITY: usize = 64;

thread_local! {
    static SPARE: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// An empty map with room for at least `fields` fields.
#[inline]
pub fn take(fields: usize) -> HeaderMap {
    let spare = SPARE.with(|s| s.borrow_mut().pop());
    match spare {
        Some(mut m) => {
            m.reserve(fields);
            m
        }
        None => HeaderMap::with_capacity(fields),
    }
}

/// Keep `map`'s memory for a later [`take`] on this thread (or free it; see the module docs).
#[inline]
pub fn give(mut map: HeaderMap) {
    let cap = map.capacity();
    if cap == 0 || cap > MAX_KEPT_CAPACITY {
        return;
    }
    map.clear();
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < KEEP {
            s.push(map);
        }
    });
}

#[cfg(test)]
mod tests {
    use http::header::{HOST, HeaderName, HeaderValue};

    use super::*;

    fn spares() -> usize {
        SPARE.with(|s| s.borrow().len())
    }

    #[test]
    fn a_returned_map_comes_back_empty_with_its_memory() {
        let mut m = take(4);
        let cap = m.capacity();
        m.insert(HOST, HeaderValue::from_static("a.example"));
        m.append(
            HeaderName::from_static("x-user-id"),
            HeaderValue::from_static("u1"),
        );
        let before = spares();
        give(m);
        assert_eq!(spares(), before + 1);
        let again = take(4);
        assert_eq!(spares(), before);
        assert!(again.is_empty(), "nothing of the last request is left");
        assert!(again.get(HOST).is_none());
        assert_eq!(again.capacity(), cap, "the memory was reused");
    }

    #[test]
    fn large_and_empty_maps_are_not_kept() {
        let before = spares();
        give(HeaderMap::new());
        give(HeaderMap::with_capacity(1000));
        assert_eq!(spares(), before);
    }

    #[test]
    fn at_most_keep_maps_are_kept() {
        for _ in 0..KEEP * 2 {
            give(HeaderMap::with_capacity(8));
        }
        assert_eq!(spares(), KEEP);
        let maps: Vec<_> = (0..KEEP * 2).map(|_| take(8)).collect();
        assert!(maps.iter().all(|m| m.capacity() >= 8));
        assert_eq!(spares(), 0);
    }

    #[test]
    fn take_makes_room_for_more_fields_than_a_spare_has() {
        give(HeaderMap::with_capacity(2));
        let m = take(40);
        assert!(m.capacity() >= 40);
    }
}
