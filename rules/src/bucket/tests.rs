use super::*;

/// Golden vectors: the bucket of these (salt, user) pairs is part of the contract. If this
/// test fails, an upgrade has changed the hash and would move users between targets.
#[test]
fn golden_vectors() {
    let got: Vec<u32> = [
        ("", ""),
        ("grab-canary", "u1"),
        ("grab-canary", "u2"),
        ("r", "alice"),
        ("salt", "用户42"),
    ]
    .iter()
    .map(|(s, u)| bucket(s, u))
    .collect();
    assert_eq!(got, GOLDEN);
}

/// Computed independently with the reference XXH3 implementation (Python `xxhash`, which
/// wraps the C library): `xxh3_64_intdigest(salt + b"\0" + user, seed=0) % 1000000`.
const GOLDEN: [u32; 5] = [801_883, 207_493, 864_615, 425_425, 203_356];

/// Keys of every length, on both sides of the small buffer's and the large buffer's bounds
/// (the longest take the streaming path), agree with the one-shot hash of the layout.
#[test]
fn keys_of_any_length_same_layout() {
    for n in (0..=SHORT + 2).chain(250..=260).chain([300, 1000]) {
        let user: String = (0..n).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
        let mut bytes = b"s".to_vec();
        bytes.push(0);
        bytes.extend_from_slice(user.as_bytes());
        let expect = (xxh3_64_with_seed(&bytes, SEED) % u64::from(BUCKETS)) as u32;
        assert_eq!(bucket("s", &user), expect, "user of {n} bytes");
    }
}

/// An IPv4 client and its mapped IPv6 form share a bucket.
#[test]
fn ip_forms() {
    let v4: IpAddr = "10.1.2.3".parse().unwrap();
    let v6: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
    assert_eq!(bucket_ip("s", v4), bucket_ip("s", v6));
}

/// Percentages parse exactly to ppm; bad ones are refused with a reason.
#[test]
fn percentages() {
    assert_eq!(parse_percent("0.0125%"), Ok(Weight::Ppm(125)));
    assert_eq!(parse_percent("5%"), Ok(Weight::Ppm(50_000)));
    assert_eq!(parse_percent("33.3333%"), Ok(Weight::Ppm(333_333)));
    assert_eq!(parse_percent("100%"), Ok(Weight::Ppm(1_000_000)));
    assert_eq!(parse_percent("0.0001%"), Ok(Weight::Ppm(1)));
    assert_eq!(parse_percent("rest"), Ok(Weight::Rest));
    for bad in [
        "0.00001%", "5", "101%", "-1%", "1.%", ".5%", "abc%", "", "5 %x",
    ] {
        assert!(parse_percent(bad).is_err(), "{bad}");
    }
}

/// Edges are cumulative in order; `rest` fills the gap.
#[test]
fn edges_in_order() {
    assert_eq!(
        edges(&[Weight::Ppm(100), Weight::Rest]),
        vec![100, 1_000_000]
    );
    assert_eq!(
        edges(&[Weight::Rest, Weight::Ppm(100)]),
        vec![999_900, 1_000_000]
    );
    assert_eq!(
        edges(&[Weight::Ppm(500_000), Weight::Ppm(500_000)]),
        vec![500_000, 1_000_000]
    );
}

/// The short copy writes exactly `src` at the start of `dst`, for every length across its
/// cases' bounds, and nothing past it.
#[test]
fn copy_short_copies_exactly() {
    for n in 0..=40 {
        let src: Vec<u8> = (0..n as u8).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
        let mut dst = [0xEEu8; 48];
        copy_short(&mut dst, &src);
        assert_eq!(&dst[..n], &src[..], "length {n}");
        assert!(
            dst[n..].iter().all(|&b| b == 0xEE),
            "length {n}: wrote past the end"
        );
    }
}
