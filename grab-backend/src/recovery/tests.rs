use std::panic::{AssertUnwindSafe, catch_unwind};

use super::*;
use crate::config::{Config, Limits};
use crate::embedded::EmbeddedStore;
use crate::ids::Ids;
use crate::store::{CreateRequest, NewEnvelope, Store};

fn new_env(total: u64, count: u64) -> NewEnvelope {
    let req = CreateRequest {
        sender: "sender".into(),
        total_cents: total,
        count,
        expires_in_s: Some(3_600),
    };
    NewEnvelope::validate(req, &Limits::default()).unwrap()
}

/// A crash image of a real log: what a store with `fsync always` left on
/// disk after acknowledging every record, and those records in log order.
struct Image {
    /// Segment file names and contents, in order.
    segments: Vec<(String, Vec<u8>)>,
    /// `ids.hwm` as the store left it.
    ids: Vec<u8>,
    /// Every acknowledged record, in log order (lsn = index + 1).
    acked: Vec<Record>,
    /// Envelope ids acknowledged.
    acked_ids: Vec<u64>,
}

/// Two creates and five grabs through the store API, all acknowledged, then
/// the data directory copied while the store still runs (a crash image).
async fn write_image(segment_max_bytes: u64) -> Image {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        data_dir: dir.path().to_owned(),
        segment_max_bytes,
        snapshot_every_records: u64::MAX,
        ..Config::default()
    };
    let store = EmbeddedStore::open(&cfg).unwrap();
    let mut acked_ids = Vec::new();
    let mut grabs = Vec::new();
    let a = store.create(new_env(1_000, 5)).await.unwrap();
    acked_ids.push(a.id.0);
    for u in ["ann", "bob", "cy"] {
        grabs.push(store.grab(a.id, u).await.unwrap().amount_cents);
    }
    let b = store.create(new_env(50, 2)).await.unwrap();
    acked_ids.push(b.id.0);
    for u in ["dee", "eve"] {
        grabs.push(store.grab(b.id, u).await.unwrap().amount_cents);
    }
    let segments: Vec<(String, Vec<u8>)> = wal::list_segments(dir.path())
        .unwrap()
        .into_iter()
        .map(|(_, p)| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, fs::read(&p).unwrap())
        })
        .collect();
    let ids = fs::read(dir.path().join(ids::FILE)).unwrap();
    drop(store);
    let mut acked = Vec::new();
    for (name, bytes) in &segments {
        let base = name[4..24].parse().unwrap();
        let scan = wal::scan_segment(bytes, base).unwrap();
        assert!(scan.damage.is_none());
        acked.extend(scan.records.into_iter().map(|(_, r)| r));
    }
    assert_eq!(acked.len(), 7, "every acknowledged record is in the log");
    let logged: Vec<u64> = acked
        .iter()
        .filter_map(|r| match r {
            Record::Grab { amount_cents, .. } => Some(*amount_cents),
            _ => None,
        })
        .collect();
    assert_eq!(logged, grabs);
    Image {
        segments,
        ids,
        acked,
        acked_ids,
    }
}

/// What one damaged image recovered to.
#[derive(Debug, Default)]
struct Counts {
    positions: usize,
    trials: usize,
    /// A proper prefix with the torn-tail warning, damage in the final frame
    /// (or a cut).
    prefix: usize,
    /// A proper prefix without a warning: a cut exactly between frames.
    clean_cuts: usize,
    /// Everything recovered (a cut at the very end).
    intact: usize,
    /// Refused with the segment and byte offset named.
    refused: usize,
    /// Everything else: silent losses, wrong refusals, panics, reused ids.
    failures: Vec<String>,
}

enum Damage {
    Flip(u8),
    /// The log ends at the position: the segment is cut there and later
    /// segments are gone (a crash before they were written).
    Cut,
}

/// The ledger the first `k` acknowledged records describe.
fn ledger_after(acked: &[Record], k: usize) -> serde_json::Value {
    let mut l = Ledger::default();
    for (i, r) in acked[..k].iter().enumerate() {
        l.apply(i as u64 + 1, r, 20).unwrap();
    }
    serde_json::to_value(&l).unwrap()
}

/// Damage the image at every byte position of every segment in turn, run
/// recovery in process, and classify the outcome.
fn sweep(img: &Image, damages: &[Damage]) -> Counts {
    let mut c = Counts::default();
    let total: usize = img.segments.iter().map(|s| s.1.len()).sum();
    // Where the final frame of the whole log starts, as a global position.
    let final_frame = {
        let mut start = 0;
        let mut pos = 0;
        for (name, bytes) in &img.segments {
            let base = name[4..24].parse().unwrap();
            let scan = wal::scan_segment(bytes, base).unwrap();
            if let Some(o) = scan.offsets.last() {
                start = pos + *o as usize;
            }
            pos += bytes.len();
        }
        start
    };
    // Cuts here leave whole frames only: nothing torn to warn about.
    let frame_ends: Vec<usize> = {
        let mut ends = Vec::new();
        let mut pos = 0;
        for (name, bytes) in &img.segments {
            let base = name[4..24].parse().unwrap();
            let scan = wal::scan_segment(bytes, base).unwrap();
            ends.push(pos + SEGMENT_HEADER_LEN as usize);
            ends.extend(scan.offsets.iter().map(|o| pos + *o as usize));
            ends.push(pos + bytes.len());
            pos += bytes.len();
        }
        ends
    };
    let max_id = *img.acked_ids.iter().max().unwrap();
    for global in 0..=total {
        c.positions += 1;
        for damage in damages {
            if global == total && !matches!(damage, Damage::Cut) {
                continue;
            }
            c.trials += 1;
            let what = match damage {
                Damage::Flip(x) => format!("flip ^{x:#04x} at {global}"),
                Damage::Cut => format!("cut at {global}"),
            };
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join(ids::FILE), &img.ids).unwrap();
            let mut pos = 0;
            let mut hit = None;
            for (name, bytes) in &img.segments {
                let local = global.wrapping_sub(pos);
                let mut bytes = bytes.clone();
                let len = bytes.len();
                let here = global >= pos && global < pos + len;
                pos += len;
                match damage {
                    Damage::Flip(x) if here => {
                        bytes[local] ^= x;
                        hit = Some((name.clone(), local));
                    }
                    Damage::Cut if global < pos - len => break,
                    Damage::Cut if here => {
                        bytes.truncate(local);
                        hit = Some((name.clone(), local));
                    }
                    _ => {}
                }
                fs::write(dir.path().join(name), &bytes).unwrap();
            }
            let outcome = catch_unwind(AssertUnwindSafe(|| recover(dir.path(), 20)));
            match outcome {
                Err(_) => c.failures.push(format!("{what}: recovery panicked")),
                Ok(Err(e)) => {
                    let msg = format!("{e:#}");
                    let (name, local) = hit.clone().expect("a refusal needs damage");
                    // The offset named is the damaged frame's start: at or
                    // before the damaged byte.
                    let named = msg.contains(&name)
                        && msg
                            .split("at byte ")
                            .nth(1)
                            .and_then(|r| r.split(':').next())
                            .and_then(|n| n.parse::<usize>().ok())
                            .is_some_and(|off| off <= local);
                    if matches!(damage, Damage::Cut) {
                        c.failures.push(format!("{what}: a cut was refused: {msg}"));
                    } else if named {
                        c.refused += 1;
                    } else {
                        c.failures
                            .push(format!("{what}: refusal names no segment+offset: {msg}"));
                    }
                }
                Ok(Ok(rec)) => {
                    let k = rec.ledger.lsn as usize;
                    let got = serde_json::to_value(&rec.ledger).unwrap();
                    let warned = rec.torn.is_some();
                    let boundary = frame_ends.contains(&global);
                    if k > img.acked.len() || got != ledger_after(&img.acked, k) {
                        c.failures
                            .push(format!("{what}: recovered state is not a log prefix"));
                    } else if k == img.acked.len() {
                        c.intact += 1;
                    } else {
                        let allowed = match damage {
                            Damage::Flip(_) => warned && global >= final_frame,
                            Damage::Cut => warned || boundary,
                        };
                        if allowed && !warned {
                            c.clean_cuts += 1;
                        } else if allowed {
                            c.prefix += 1;
                        } else {
                            c.failures.push(format!(
                                "{what}: SILENT LOSS: recovered {k} of {} acknowledged records \
                                 (torn-tail warning: {warned})",
                                img.acked.len()
                            ));
                        }
                    }
                    // Whatever was dropped, no acknowledged id comes back.
                    let ids = Ids::open(dir.path(), rec.ledger.next_envelope_id).unwrap();
                    let next = ids.allocate().unwrap();
                    if next <= max_id {
                        c.failures.push(format!(
                            "{what}: next envelope id {next} was already acknowledged"
                        ));
                    }
                }
            }
        }
    }
    c
}

fn check(name: &str, c: &Counts) {
    eprintln!(
        "{name}: {} positions, {} trials: {} prefix recoveries with the torn-tail warning, \
         {} clean cuts between frames, {} intact, {} refusals (segment+offset named), \
         {} losses/failures",
        c.positions,
        c.trials,
        c.prefix,
        c.clean_cuts,
        c.intact,
        c.refused,
        c.failures.len()
    );
    assert!(
        c.failures.is_empty(),
        "{name}: {} failures, first ones:\n{}",
        c.failures.len(),
        c.failures[..c.failures.len().min(20)].join("\n")
    );
    assert!(
        c.refused > 0 && c.prefix > 0,
        "{name}: the sweep exercised nothing"
    );
}

/// The sweep, one segment: a real log written through the store API; at
/// every byte a flip (two patterns) and a cut. A recovery either returns a
/// prefix of the acknowledged history with the torn-tail warning (only for
/// damage in the final frame, or a cut) or refuses naming the segment and
/// the byte offset. Never a silent loss, never a panic, never a reused id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_sweep_never_loses_acknowledged_records_silently() {
    let img = write_image(16 << 20).await;
    assert_eq!(img.segments.len(), 1);
    let c = sweep(&img, &[Damage::Flip(0xff), Damage::Flip(0x01), Damage::Cut]);
    check("sweep (1 segment)", &c);
}

/// The same sweep over a log spread across several small segments, so
/// damage in closed segments and segment headers is covered too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_sweep_across_segments() {
    let img = write_image(300).await;
    assert!(img.segments.len() >= 3, "{} segments", img.segments.len());
    let c = sweep(&img, &[Damage::Flip(0xff), Damage::Cut]);
    check("sweep (segments)", &c);
}

/// The reported case: one flipped byte in the first frame of the last
/// segment refuses to open, `inspect` lists the records behind it, and a
/// truncating repair serves the prefix with new ids above every acked one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_first_frame_refuses_then_repairs() {
    let img = write_image(16 << 20).await;
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(ids::FILE), &img.ids).unwrap();
    let (name, bytes) = &img.segments[0];
    let mut bytes = bytes.clone();
    bytes[SEGMENT_HEADER_LEN as usize + 20] ^= 0x40;
    fs::write(dir.path().join(name), &bytes).unwrap();
    let cfg = Config {
        data_dir: dir.path().to_owned(),
        ..Config::default()
    };

    let err = format!("{:#}", EmbeddedStore::open(&cfg).err().expect("refuses"));
    assert!(
        err.contains(name.as_str()) && err.contains("at byte 16"),
        "{err}"
    );
    let before = fs::read(dir.path().join(name)).unwrap();
    assert_eq!(before, bytes, "a refusal changes nothing");

    let report = inspect(dir.path()).unwrap();
    let c = report.corruption.as_ref().expect("corruption reported");
    assert_eq!(c.offset, SEGMENT_HEADER_LEN);
    let kinds: Vec<_> = c.after.iter().map(|r| (r.kind, r.lsn)).collect();
    assert_eq!(
        kinds,
        vec![
            ("grab", 2),
            ("grab", 3),
            ("grab", 4),
            ("create", 5),
            ("grab", 6),
            ("grab", 7)
        ]
    );
    assert_eq!(c.after[0].user.as_deref(), Some("ann"));
    assert_eq!(c.after[3].envelope, Some(img.acked_ids[1]));
    let text = report.to_string();
    assert!(
        text.contains("CORRUPTION") && text.contains("user=\"ann\""),
        "{text}"
    );
    assert_eq!(fs::read(dir.path().join(name)).unwrap(), bytes);

    let quarantine = dir.path().join("quarantine");
    let after = repair(dir.path(), &Repair::Quarantine(quarantine.clone())).unwrap();
    assert!(after.corruption.is_none(), "{after}");
    assert!(after.id_high_water > *img.acked_ids.iter().max().unwrap());
    assert_eq!(fs::read(quarantine.join(name)).unwrap(), bytes);

    let store = EmbeddedStore::open(&cfg).unwrap();
    let next = store.create(new_env(10, 1)).await.unwrap();
    assert!(
        next.id.0 > *img.acked_ids.iter().max().unwrap(),
        "id {} reused",
        next.id
    );
}

/// Without the side file (a data dir from before it existed), `repair` still
/// raises the high-water mark past every id the dropped records name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_raises_the_id_mark_from_dropped_records() {
    let img = write_image(16 << 20).await;
    let dir = tempfile::tempdir().unwrap();
    let (name, bytes) = &img.segments[0];
    let mut bytes = bytes.clone();
    bytes[SEGMENT_HEADER_LEN as usize + 3] ^= 0x01;
    fs::write(dir.path().join(name), &bytes).unwrap();
    let after = repair(dir.path(), &Repair::Truncate).unwrap();
    assert!(after.corruption.is_none() && after.recovered_lsn == 0);
    assert_eq!(after.id_high_water, img.acked_ids[1] + 1);
    // Clean logs are left alone.
    let again = repair(dir.path(), &Repair::Truncate).unwrap();
    assert_eq!(again.repaired, None);
}
