//! The decision allocates nothing per request: `decide` on a runtime of the peer
//! comparison's realistic rules (`bench-config rules`: 1,000 routes with 5% splits, 1,000
//! pair limits, a per-user limit, a dry-run global limit, a breaker on the upstream), for the
//! comparison's request (`GET /envelopes/{id}` as `app7`) by users already tracked,
//! `Mode::Serve`, makes zero heap allocations after warm-up. A counting global allocator
//! (this test binary only) counts the allocations of the deciding thread.
//!
//! Each forwarded request's breaker permit is then reported as a 200 (as the pipeline does
//! once the upstream answered), so recording the outcome is counted too. Limiter keys, metric
//! series and counter handles are created in the warm-up.

// The allocator wrapper is the one unsafe thing in this crate (`GlobalAlloc` is an unsafe
// trait): see `[lints]` in benches/Cargo.toml.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, StatusCode};
use rules::RequestParts;
use tidegate::conn::ConnInfo;
use tidegate::govern::finish_call;
use tidegate::metrics::Metrics;
use tidegate::pipeline::decide::{Action, Mode, decide};
use tidegate::runtime::Runtime;

/// [`System`], counting the allocations (and reallocations) of each thread.
struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    // `try_with`: the allocator also runs while thread-locals are torn down.
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every call is passed to `System` unchanged; counting touches no allocator state.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made by this thread so far.
fn allocs() -> u64 {
    ALLOCS.with(Cell::get)
}

/// Users of the measured requests (the comparison rotates over 100,000).
const USERS: usize = 1_000;

#[test]
fn decide_allocates_nothing_per_request() {
    let text = tidegate_benches::peer_config(true, "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3");
    let snap = rules::load("bench.json", text.as_bytes())
        .expect("the peer config is valid")
        .snapshot;
    let rt = Runtime::offline(snap, None, &Arc::new(Metrics::new()));
    let conn = ConnInfo::new("10.0.0.1:40000".parse().unwrap(), false);
    let requests: Vec<HeaderMap> = (0..USERS)
        .map(|i| {
            let mut h = HeaderMap::new();
            h.insert("x-app-id", HeaderValue::from_static("app7"));
            h.insert("x-user-id", format!("user-{i}").parse().unwrap());
            h
        })
        .collect();
    let paths: Vec<String> = (0..USERS).map(|i| format!("/envelopes/{i}")).collect();
    let method = Method::GET;
    // One request: the draw varies, so both sides of the 5% split are taken.
    let run = |i: usize, draw: u64| {
        let req = RequestParts {
            method: &method,
            path: &paths[i],
            query: None,
            headers: &requests[i],
        };
        let mut d = decide(
            &rt,
            req,
            &conn,
            Mode::Serve {
                draw,
                at: tidegate::clock::Stamp::now(),
            },
        );
        let action = std::mem::replace(&mut d.action, Action::NoRoute);
        black_box(d);
        match action {
            // As the pipeline reports a 200: the breaker counts it.
            Action::Forward { permit, .. } => {
                finish_call(
                    &rt.metrics,
                    permit,
                    Ok(StatusCode::OK),
                    Duration::from_millis(1),
                    tidegate::clock::Stamp::now(),
                );
                true
            }
            _ => false,
        }
    };
    let draw = |n: usize| (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // Warm-up: every user's limiter key, every metric series and counter handle.
    for round in 0..3 {
        for i in 0..USERS {
            assert!(run(i, draw(round * USERS + i)), "forwarded");
        }
    }
    let before = allocs();
    let mut forwarded = 0;
    for round in 3..8 {
        for i in 0..USERS {
            forwarded += usize::from(run(i, draw(round * USERS + i)));
        }
    }
    let made = allocs() - before;
    assert_eq!(forwarded, 5 * USERS, "every measured request was forwarded");
    assert_eq!(
        made,
        0,
        "{made} heap allocations in {} decisions after warm-up",
        5 * USERS
    );
    // The counter counts: one more allocation is seen.
    let before = allocs();
    black_box(vec![0u8; 16]);
    assert_eq!(allocs() - before, 1, "the counting allocator counts");
}
