use super::*;

fn sample(n: u64) -> Vec<Record> {
    (0..n)
        .map(|i| Record::Grab {
            envelope: 1 + i % 3,
            user: Arc::from(format!("user-{i}")),
            amount_cents: 1 + i * 7,
            at_ms: 1_700_000_000_000 + i,
        })
        .collect()
}

fn segment_bytes(base: u64, records: &[Record]) -> (Vec<u8>, Vec<usize>) {
    let mut buf = Vec::new();
    buf.extend_from_slice(SEGMENT_MAGIC);
    buf.extend_from_slice(&base.to_le_bytes());
    let mut ends = Vec::new();
    for (i, r) in records.iter().enumerate() {
        encode_frame(&mut buf, base + i as u64, r);
        ends.push(buf.len());
    }
    (buf, ends)
}

/// Cutting a segment at every byte offset (a crash mid-write) yields exactly the
/// whole frames before the cut: never an error, never a misread record.
#[test]
fn every_torn_cut_yields_a_prefix() {
    let records = sample(12);
    let (bytes, ends) = segment_bytes(5, &records);
    for cut in SEGMENT_HEADER_LEN as usize..=bytes.len() {
        let scan = scan_segment(&bytes[..cut], 5).expect("a torn tail is not an error");
        let whole = ends.iter().filter(|&&e| e <= cut).count();
        assert_eq!(scan.records.len(), whole, "cut at {cut}");
        for (i, (lsn, r)) in scan.records.iter().enumerate() {
            assert_eq!(*lsn, 5 + i as u64);
            assert_eq!(r, &records[i]);
        }
        let complete = cut == SEGMENT_HEADER_LEN as usize || ends.contains(&cut);
        assert_eq!(scan.damage.is_none(), complete, "cut at {cut}");
        if let Some(d) = &scan.damage {
            assert!(
                d.later.is_empty(),
                "cut at {cut}: a cut leaves nothing after it"
            );
        }
    }
}

/// A flipped byte anywhere after the header stops the scan at that frame:
/// the records returned are always an unmodified prefix, and resynchronising
/// finds every later frame, so damage before the last frame is never
/// mistaken for a tail.
#[test]
fn corruption_is_detected_not_misread() {
    let records = sample(6);
    let (bytes, ends) = segment_bytes(1, &records);
    for pos in SEGMENT_HEADER_LEN as usize..bytes.len() {
        let mut bad = bytes.clone();
        bad[pos] ^= 0x5a;
        let scan = scan_segment(&bad, 1).expect("damage, not an error");
        let damage = scan.damage.as_ref().expect("a flip never goes unnoticed");
        for (i, (_, r)) in scan.records.iter().enumerate() {
            assert_eq!(r, &records[i], "flip at {pos} misread record {i}");
        }
        // The damaged frame is the one holding `pos`; every later one is found.
        let hit = ends.iter().filter(|&&e| e <= pos).count();
        assert_eq!(scan.records.len(), hit, "flip at {pos}");
        let later: Vec<u64> = damage.later.iter().map(|f| f.lsn).collect();
        let want: Vec<u64> = (hit as u64 + 2..=records.len() as u64).collect();
        assert_eq!(later, want, "flip at {pos}");
        for f in &damage.later {
            assert_eq!(f.record.as_ref().unwrap(), &records[f.lsn as usize - 1]);
        }
    }
}

/// A zero-filled tail (file extended, data never written) reads as torn.
#[test]
fn zero_tail_is_torn() {
    let (mut bytes, ends) = segment_bytes(1, &sample(3));
    bytes.extend_from_slice(&[0u8; 4096]);
    let scan = scan_segment(&bytes, 1).unwrap();
    assert_eq!(scan.records.len(), 3);
    assert_eq!(scan.valid_len as usize, ends[2]);
    let damage = scan.damage.unwrap();
    assert_eq!(damage.reason, "checksum mismatch");
    assert!(damage.later.is_empty());
}

/// A header naming a different first record than the file name is corruption.
#[test]
fn header_mismatch_is_an_error() {
    let (bytes, _) = segment_bytes(7, &sample(1));
    assert!(scan_segment(&bytes, 8).is_err());
    let mut bad = bytes.clone();
    bad[0] = b'X';
    assert!(scan_segment(&bad, 7).is_err());
}

/// Segment names sort numerically and round-trip through the listing.
#[test]
fn segment_names_list_in_order() {
    let dir = tempfile::tempdir().unwrap();
    for base in [100u64, 2, 30] {
        std::fs::write(dir.path().join(segment_name(base)), b"").unwrap();
    }
    std::fs::write(dir.path().join("snapshot.bin"), b"").unwrap();
    let bases: Vec<u64> = list_segments(dir.path())
        .unwrap()
        .into_iter()
        .map(|s| s.0)
        .collect();
    assert_eq!(bases, vec![2, 30, 100]);
}

fn options(group_commit: bool) -> WalOptions {
    WalOptions {
        mode: FsyncMode::Always,
        group_commit,
        batch_interval: Duration::from_millis(10),
        segment_max_bytes: 1 << 20,
    }
}

/// Concurrent appenders all get committed, in one contiguous log, with group
/// commit on and off; settlement receives every record in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_commit_in_order() {
    for group in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = mpsc::channel();
        let wal = Arc::new(Wal::start(dir.path(), None, 1, options(group), tx).unwrap());
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let wal = wal.clone();
            tasks.push(tokio::spawn(async move {
                for r in sample(25) {
                    let _ = t;
                    let (_, commit) = wal.append(r).unwrap();
                    commit.wait().await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(wal.committed_lsn(), 200);
        wal.close();
        let mut next = 1;
        while let Ok(batch) = rx.try_recv() {
            assert_eq!(batch.first_lsn, next);
            next += batch.records.len() as u64;
        }
        assert_eq!(next, 201);
        let segs = list_segments(dir.path()).unwrap();
        let bytes = std::fs::read(&segs[0].1).unwrap();
        let scan = scan_segment(&bytes, 1).unwrap();
        assert_eq!(scan.records.len(), 200);
        assert!(scan.damage.is_none());
        assert!(matches!(
            wal.append(sample(1).remove(0)),
            Err(WalError::Closed)
        ));
    }
}

/// Segments rotate at the size limit and stay contiguous.
#[test]
fn rotation_keeps_sequence_contiguous() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, _rx) = mpsc::channel();
    let mut opts = options(true);
    opts.segment_max_bytes = 512;
    let wal = Wal::start(dir.path(), None, 1, opts, tx).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for r in sample(60) {
        let (_, c) = wal.append(r).unwrap();
        rt.block_on(c.wait()).unwrap();
    }
    wal.close();
    let segs = list_segments(dir.path()).unwrap();
    assert!(
        segs.len() > 3,
        "expected rotation, got {} segments",
        segs.len()
    );
    let mut next = 1;
    for (base, path) in segs {
        assert_eq!(base, next);
        let scan = scan_segment(&std::fs::read(path).unwrap(), base).unwrap();
        assert!(scan.damage.is_none());
        next += scan.records.len() as u64;
    }
    assert_eq!(next, 61);
}
