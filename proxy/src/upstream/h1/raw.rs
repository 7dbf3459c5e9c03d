//! A response head's fields as the upstream sent them, for the gateway's own HTTP/1 server
//! to copy into its answer without a header map.
//!
//! Building a map of an answer's fields cost more than anything else the gateway did with a
//! typical answer (a hash, a name and a value made and an insert per field), only for the
//! server's writer to walk the map and write the same bytes back. The parser keeps the head
//! (a slice of the read buffer) and where each field is instead, and notes once what the
//! gateway does with each: hop-by-hop fields (and a `Content-Length` that
//! `Transfer-Encoding` overrides) are never passed on, the upstream's `X-Request-Id` is not
//! written (the gateway's own is), `Content-Length` is not where no length may be. A head
//! is kept so only when that is all the gateway would change: its `Connection` names
//! nothing but `close` and `keep-alive` (other names would be stripped too), it is not a
//! gRPC answer (whose status is counted from the map), and it has at most [`RAW_MAX`]
//! fields.
//!
//! The fields travel in the response's body (`ResponseBody::take_raw`), the response's own
//! map empty: `http::Response` has no other room that costs no allocation. Every reader of
//! the map between the upstream client and the own server's writer puts them in it first
//! (`upstream::materialize`): the response cache and hyper's server. httparse accepts
//! exactly the name and value characters `HeaderName` and `HeaderValue` do, so
//! [`RawFields::append_to`] makes the map the parser would have made, hop-by-hop fields
//! already stripped.
//!
//! The field table is boxed, so a response carrying it moves 8 more bytes, not 300 (moves
//! of the response through the request path are `memcpy`s, whose cost grows with the
//! size), and the boxes are reused per thread, so a steady stream of answers allocates
//! nothing.

use std::cell::RefCell;

use bytes::Bytes;
use http::HeaderMap;

use super::{Span, header_field};

/// Most fields a response head may have to be kept as [`RawFields`] (one bit each in the
/// masks).
pub(super) const RAW_MAX: usize = 32;

/// Spare tables kept per thread.
const KEEP: usize = 32;

thread_local! {
    // The boxes are what is reused: each goes to a `RawFields` as it is.
    #[allow(clippy::vec_box)]
    static SPARE: RefCell<Vec<Box<Table>>> = const { RefCell::new(Vec::new()) };
}

/// The fields of one response head (see the module docs).
#[derive(Debug)]
pub struct RawFields(Option<Box<Table>>);

#[derive(Debug)]
struct Table {
    /// The head's bytes; every name in lower case.
    head: Bytes,
    len: u8,
    spans: [Span; RAW_MAX],
    /// Fields never passed on: hop-by-hop ones, and `Content-Length` when
    /// `Transfer-Encoding` came with it.
    hop: u32,
    /// `X-Request-Id` fields (not written: the gateway's own is).
    ids: u32,
    /// `Content-Length` fields (not written where no length may be).
    lengths: u32,
    /// The first `Content-Length` value passed on.
    declared: Option<u64>,
    has_date: bool,
}

/// What the gateway does with a field when passing a head on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Passed on.
    Pass,
    /// `Date`: passed on (and none added).
    Date,
    /// `Content-Length`, of this value: passed on where a length may be.
    Length(u64),
    /// `X-Request-Id`: not written (the gateway's own is).
    RequestId,
    /// Hop-by-hop: never passed on.
    HopByHop,
}

impl RawFields {
    /// An empty table for the head `head`: a spare one of this thread's if it has one.
    pub(super) fn new(head: Bytes) -> Self {
        let spare = SPARE.with(|s| s.borrow_mut().pop());
        let mut t = spare.unwrap_or_else(|| {
            Box::new(Table {
                head: Bytes::new(),
                len: 0,
                spans: [(0, 0, 0, 0); RAW_MAX],
                hop: 0,
                ids: 0,
                lengths: 0,
                declared: None,
                has_date: false,
            })
        });
        t.head = head;
        t.len = 0;
        (t.hop, t.ids, t.lengths) = (0, 0, 0);
        t.declared = None;
        t.has_date = false;
        Self(Some(t))
    }

    fn table(&self) -> &Table {
        self.0.as_ref().expect("a table until dropped")
    }

    /// Add a field (at most [`RAW_MAX`]; the caller counts).
    pub(super) fn push(&mut self, span: Span, kind: Kind) {
        let t = self.0.as_mut().expect("a table until dropped");
        let bit = 1u32 << t.len;
        t.spans[usize::from(t.len)] = span;
        t.len += 1;
        match kind {
            Kind::Pass => {}
            Kind::Date => t.has_date = true,
            Kind::Length(n) => {
                t.lengths |= bit;
                t.declared = t.declared.or(Some(n));
            }
            Kind::RequestId => t.ids |= bit,
            Kind::HopByHop => t.hop |= bit,
        }
    }

    /// `Transfer-Encoding` came with a `Content-Length`: the lengths are not passed on.
    pub(super) fn drop_lengths(&mut self) {
        let t = self.0.as_mut().expect("a table until dropped");
        t.hop |= t.lengths;
        t.declared = None;
    }

    /// Each field's name (lower case) and value, in order, every one of them.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let t = self.table();
        t.fields().map(|(_, span)| t.slices(span))
    }

    /// The first `Content-Length` passed on, if any.
    pub fn declared(&self) -> Option<u64> {
        self.table().declared
    }

    /// Whether a `Date` is among the fields.
    pub fn has_date(&self) -> bool {
        self.table().has_date
    }

    /// Write the fields passed on as HTTP/1 field lines, `Content-Length` too unless
    /// `drop_length`.
    pub fn write(&self, out: &mut Vec<u8>, drop_length: bool) {
        let t = self.table();
        let skip = t.hop | t.ids | if drop_length { t.lengths } else { 0 };
        for (_, span) in t.fields().filter(|&(bit, _)| skip & bit == 0) {
            let (name, value) = t.slices(span);
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
    }

    /// Append the fields passed on to `map`, in order: the map the parser would have made,
    /// with the hop-by-hop fields stripped (`headers::strip_hop_by_hop`).
    pub fn append_to(&self, map: &mut HeaderMap) {
        let t = self.table();
        map.reserve(usize::from(t.len));
        for (_, span) in t.fields().filter(|&(bit, _)| t.hop & bit == 0) {
            match header_field(&t.head, span) {
                Ok((n, v)) => {
                    map.append(n, v);
                }
                // Not reached: httparse accepts no other characters (tested).
                Err(_) => debug_assert!(false, "a field httparse accepted is not a valid header"),
            }
        }
    }
}

impl Table {
    /// Each field's bit in the masks, and its span.
    fn fields(&self) -> impl Iterator<Item = (u32, Span)> + '_ {
        let spans = self.spans[..usize::from(self.len)].iter();
        spans.enumerate().map(|(i, &span)| (1 << i, span))
    }

    /// A field's name and value.
    fn slices(&self, (ns, nl, vs, vl): Span) -> (&[u8], &[u8]) {
        (
            &self.head[usize::from(ns)..][..usize::from(nl)],
            &self.head[usize::from(vs)..][..usize::from(vl)],
        )
    }
}

impl Drop for RawFields {
    fn drop(&mut self) {
        let Some(mut t) = self.0.take() else { return };
        t.head = Bytes::new(); // the read buffer is not kept alive by a spare
        // A thread being torn down has no spares to keep.
        let _ = SPARE.try_with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < KEEP {
                s.push(t);
            }
        });
    }
}
