//! Crash recovery: torn tails at every byte, flipped bytes, lost or damaged indexes,
//! and corruption inside a sealed segment.

mod common;

use common::*;
use ringbus::batch::BatchRef;
use ringbus::storage::segment::{index_path, log_path, scan, time_index_path};
use ringbus::storage::{PartitionConfig, RecoveryPolicy, StorageError};
use ringbus::Offset;
use std::fs::OpenOptions;
use std::path::Path;

/// Writes `n` flushed batches into a fresh partition; returns every batch's bytes.
fn fill(dir: &Path, n: usize, value_len: usize) -> Vec<(Offset, Vec<u8>)> {
    let (mut p, _) = open(dir, small_config());
    for i in 0..n {
        append(
            &mut p,
            &batch(&format!("c{i}"), 1 + i % 4, value_len, 1_000 + i as i64),
        );
    }
    p.flush_blocking().unwrap();
    batches(&p)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A flushed partition of 200 two-record batches over several 64 KiB segments.
fn several_segments(dir: &Path, tag: &str) -> ringbus::storage::Partition<ringbus::storage::StdIo> {
    let (mut p, _) = open(dir, small_config());
    for i in 0..200 {
        append(&mut p, &batch(&format!("{tag}{i}"), 2, 400, 1_000));
    }
    p.flush_blocking().unwrap();
    p
}

/// Reopens `dir` and checks that exactly `expect` is there, then that appends
/// resume at the right offset and survive another reopen.
fn check_recovered(
    dir: &Path,
    expect: &[(Offset, Vec<u8>)],
    config: PartitionConfig,
) -> ringbus::storage::RecoveryReport {
    let (mut p, report) = open(dir, config.clone());
    let got = batches(&p);
    assert_eq!(got.len(), expect.len(), "batch count after recovery");
    for (g, e) in got.iter().zip(expect) {
        assert_eq!(g.0, e.0);
        assert!(g.1 == e.1, "batch at offset {} changed", g.0);
    }
    let next = expect.last().map_or(Offset(0), |(o, b)| {
        o.plus(u64::from(BatchRef::parse(b).unwrap().record_count()))
    });
    assert_eq!(
        p.next_offset(),
        next,
        "appends resume after the last intact batch"
    );
    let a = append(&mut p, &batch("resume", 2, 33, 5_000));
    assert_eq!(a.base_offset, next);
    p.flush_blocking().unwrap();
    drop(p);
    let (p, again) = open(dir, config);
    assert_eq!(again.truncated_bytes, 0, "second recovery found damage");
    assert_eq!(batches(&p).len(), expect.len() + 1);
    report
}

#[test]
fn truncation_at_every_byte_of_the_last_batch() {
    let src = tempfile::tempdir().unwrap();
    let all = fill(src.path(), 12, 40);
    let log = log_path(src.path(), Offset(0));
    let bytes = std::fs::read(&log).unwrap();
    let s = scan(&bytes, 0, Some(Offset(0)), |_| {});
    let last_len = all.last().unwrap().1.len() as u64;
    let last_pos = s.end - last_len;
    for cut in last_pos..s.end {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(src.path(), dir.path());
        let f = OpenOptions::new()
            .write(true)
            .open(log_path(dir.path(), Offset(0)))
            .unwrap();
        f.set_len(cut).unwrap();
        let report = check_recovered(dir.path(), &all[..all.len() - 1], small_config());
        assert!(
            report.truncated_bytes <= cut - last_pos,
            "cut {cut}: reported {}",
            report.truncated_bytes
        );
        if cut > last_pos {
            assert!(
                report.truncated_bytes > 0,
                "cut {cut}: torn bytes not reported"
            );
            assert_eq!(report.truncated_at.as_ref().map(|t| t.1), Some(last_pos));
        }
    }
}

#[test]
fn truncation_inside_earlier_batches_keeps_the_prefix() {
    let src = tempfile::tempdir().unwrap();
    let all = fill(src.path(), 30, 300);
    let bytes = std::fs::read(log_path(src.path(), Offset(0))).unwrap();
    let mut starts = Vec::new();
    let s = scan(&bytes, 0, Some(Offset(0)), |b| starts.push(b.position));
    assert_eq!(starts.len(), all.len());
    for (i, &start) in starts.iter().enumerate().step_by(3) {
        for cut in [start, start + 1, start + 63, start + 64, start + 65] {
            if cut >= s.end {
                continue;
            }
            let dir = tempfile::tempdir().unwrap();
            copy_dir(src.path(), dir.path());
            let f = OpenOptions::new()
                .write(true)
                .open(log_path(dir.path(), Offset(0)))
                .unwrap();
            f.set_len(cut).unwrap();
            check_recovered(dir.path(), &all[..i], small_config());
        }
    }
}

#[test]
fn flipped_bytes_in_the_tail_cut_the_log_there() {
    let src = tempfile::tempdir().unwrap();
    let all = fill(src.path(), 40, 100);
    let bytes = std::fs::read(log_path(src.path(), Offset(0))).unwrap();
    let mut starts = Vec::new();
    let s = scan(&bytes, 0, Some(Offset(0)), |b| starts.push(b.position));
    let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
    // The last four batches form the tail.
    let tail_start = starts[starts.len() - 4];
    for _ in 0..150 {
        let pos = tail_start + next() % (s.end - tail_start);
        let bit = 1u8 << (next() % 8);
        let victim = starts.iter().rposition(|&p| p <= pos).unwrap();
        let dir = tempfile::tempdir().unwrap();
        copy_dir(src.path(), dir.path());
        let path = log_path(dir.path(), Offset(0));
        let mut b = std::fs::read(&path).unwrap();
        b[pos as usize] ^= bit;
        std::fs::write(&path, &b).unwrap();
        let report = check_recovered(dir.path(), &all[..victim], small_config());
        assert!(report.truncated_bytes > 0, "flip at {pos} not reported");
    }
}

#[test]
fn missing_or_damaged_index_is_rebuilt() {
    let src = tempfile::tempdir().unwrap();
    let all = fill(src.path(), 60, 500);
    let original_index = std::fs::read(index_path(src.path(), Offset(0))).unwrap();
    let original_time = std::fs::read(time_index_path(src.path(), Offset(0))).unwrap();
    assert!(
        original_index.len() >= 8 * 5,
        "expected several index entries"
    );
    type Damage = fn(&Path);
    let damages: [(&str, Damage); 5] = [
        ("deleted", |d| {
            std::fs::remove_file(index_path(d, Offset(0))).unwrap()
        }),
        ("emptied", |d| {
            std::fs::write(index_path(d, Offset(0)), b"").unwrap()
        }),
        ("garbage", |d| {
            std::fs::write(index_path(d, Offset(0)), vec![0xAB; 100]).unwrap()
        }),
        ("last entry off by one", |d| {
            let p = index_path(d, Offset(0));
            let mut b = std::fs::read(&p).unwrap();
            let n = b.len();
            b[n - 4] = b[n - 4].wrapping_add(1);
            std::fs::write(p, b).unwrap();
        }),
        ("time index deleted", |d| {
            std::fs::remove_file(time_index_path(d, Offset(0))).unwrap()
        }),
    ];
    for (what, damage) in damages {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(src.path(), dir.path());
        damage(dir.path());
        let (p, report) = open(dir.path(), small_config());
        assert_eq!(report.indexes_rebuilt.len(), 1, "{what}: index not rebuilt");
        assert_eq!(batches(&p).len(), all.len(), "{what}");
        assert_eq!(
            read_all(&p, Offset(77)).first().map(|r| r.0),
            Some(Offset(77)),
            "{what}: index lookup"
        );
        drop(p);
        assert_eq!(
            std::fs::read(index_path(dir.path(), Offset(0))).unwrap(),
            original_index,
            "{what}: rebuilt index differs"
        );
        assert_eq!(
            std::fs::read(time_index_path(dir.path(), Offset(0))).unwrap(),
            original_time,
            "{what}: rebuilt time index differs"
        );
    }
}

#[test]
fn corruption_inside_a_sealed_segment_is_reported_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let p = several_segments(dir.path(), "s");
    assert!(p.segment_count() >= 3);
    let all = batches(&p);
    drop(p);
    // Flip one byte in the middle of the first (sealed) segment.
    let path = log_path(dir.path(), Offset(0));
    let mut b = std::fs::read(&path).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x40;
    std::fs::write(&path, &b).unwrap();
    let sealed_len = b.len() as u64;

    let full = PartitionConfig {
        recovery: RecoveryPolicy::Full,
        ..small_config()
    };
    let (p, report) = open(dir.path(), full);
    assert_eq!(report.corruptions.len(), 1, "{:?}", report.corruptions);
    match &report.corruptions[0] {
        StorageError::ChecksumMismatch {
            segment,
            position,
            expected,
            actual,
        } => {
            assert_eq!(segment, &path);
            assert!(*position <= mid as u64);
            assert_ne!(expected, actual);
        }
        other => panic!("unexpected {other}"),
    }
    // Nothing was cut: the sealed file keeps its length and later data is intact.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), sealed_len);
    assert_eq!(p.next_offset(), all.last().unwrap().0.plus(2));
    // Reading across the bad batch fails with the typed error naming it.
    let mut cur = Offset(0);
    let err = loop {
        match p.read(cur, 4096) {
            Ok(f) => cur = f.next_offset,
            Err(e) => break e,
        }
    };
    assert!(
        matches!(err, StorageError::ChecksumMismatch { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("00000000000000000000.log"),
        "{err}"
    );
    // Later segments still read back.
    let bases = p.segment_bases();
    assert_eq!(
        read_all(&p, bases[1]).len() as u64,
        p.next_offset().0 - bases[1].0
    );
}

/// A sealed segment still at its preallocated size was never fully synced: a
/// hole followed by bytes means a flush that crossed a roll was cut short by a
/// crash, and nothing from the hole on was acknowledged (regression: such a
/// segment used to be reported as corrupt and kept).
#[test]
fn hole_in_an_untrimmed_sealed_segment_cuts_the_log_there() {
    let dir = tempfile::tempdir().unwrap();
    let p = several_segments(dir.path(), "h");
    let all = batches(&p);
    let bases = p.segment_bases();
    assert!(bases.len() >= 3);
    drop(p);
    // Undo the trim and punch a hole over the 5th batch of the first segment.
    let path = log_path(dir.path(), Offset(0));
    let mut b = std::fs::read(&path).unwrap();
    let mut starts = Vec::new();
    scan(&b, 0, Some(Offset(0)), |x| {
        starts.push((x.position, x.len, x.base_offset))
    });
    let (hole_pos, hole_len, hole_offset) = starts[4];
    b[hole_pos as usize..(hole_pos + u64::from(hole_len)) as usize].fill(0);
    b.resize(64 * 1024, 0);
    std::fs::write(&path, &b).unwrap();
    // Index entries are persisted only for synced bytes, which stop before the
    // hole; keep the entries below it.
    let ix_path = index_path(dir.path(), Offset(0));
    let ix = std::fs::read(&ix_path).unwrap();
    let keep: Vec<u8> = ix
        .chunks_exact(8)
        .filter(|e| u64::from(u32::from_le_bytes(e[4..8].try_into().unwrap())) < hole_pos)
        .flatten()
        .copied()
        .collect();
    std::fs::write(&ix_path, keep).unwrap();

    let (p, report) = open(dir.path(), small_config());
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
    assert_eq!(p.next_offset(), hole_offset);
    assert_eq!(
        p.segment_count(),
        1,
        "later segments held only unacknowledged data"
    );
    assert!(report
        .removed_files
        .iter()
        .any(|f| f.ends_with(format!("{:020}.log", bases[1].0))));
    let kept: Vec<_> = all
        .iter()
        .take_while(|(o, _)| *o < hole_offset)
        .cloned()
        .collect();
    assert_eq!(batches(&p), kept);
}

/// Every record value at or after `from` in `batches` (as [`batches`] returns them).
fn values_from(batches: &[(Offset, Vec<u8>)], from: Offset) -> Vec<(Offset, Vec<u8>)> {
    let chunks: Vec<bytes::Bytes> = batches
        .iter()
        .map(|(_, b)| bytes::Bytes::from(b.clone()))
        .collect();
    let mut out = Vec::new();
    push_values(&chunks, from, &mut out);
    out
}

/// Flips one bit in the third batch of the segment at `base` in `dir`; returns the
/// offsets that segment's batches start at, and where the damaged one is.
fn damage_third_batch(dir: &Path, base: Offset) -> (Vec<Offset>, usize) {
    let path = log_path(dir, base);
    let mut b = std::fs::read(&path).unwrap();
    let mut starts = Vec::new();
    scan(&b, 0, Some(base), |x| {
        starts.push((x.position, x.base_offset))
    });
    assert!(starts.len() > 6, "{} batches", starts.len());
    b[starts[2].0 as usize + 80] ^= 0x10;
    std::fs::write(&path, &b).unwrap();
    (starts.iter().map(|s| s.1).collect(), 2)
}

/// Full recovery validates every batch, and damage it finds before a segment's
/// last index entry is bit rot in bytes written whole once: it is reported and
/// kept, and the batches after it stay readable. Regression: in a sealed segment
/// still at its preallocated size (a crash before its trim), such damage was taken
/// for a flush cut short and every later segment was deleted.
#[test]
fn full_recovery_reports_early_damage_in_an_untrimmed_sealed_segment_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let p = several_segments(dir.path(), "u");
    let all = batches(&p);
    let bases = p.segment_bases();
    assert!(bases.len() >= 3);
    drop(p);
    let (starts, bad) = damage_third_batch(dir.path(), Offset(0));
    // Undo the trim, as a crash between the sync and the trim leaves it.
    let path = log_path(dir.path(), Offset(0));
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(64 * 1024)
        .unwrap();
    let full = PartitionConfig {
        recovery: RecoveryPolicy::Full,
        ..small_config()
    };
    let (p, report) = open(dir.path(), full);
    assert!(
        report.removed_files.is_empty(),
        "{:?}",
        report.removed_files
    );
    assert_eq!(p.segment_bases(), bases);
    assert_eq!(p.next_offset(), all.last().unwrap().0.plus(2));
    assert_eq!(report.truncated_bytes, 0);
    assert_eq!(report.corruptions.len(), 1, "{:?}", report.corruptions);
    assert!(
        matches!(report.corruptions[0], StorageError::ChecksumMismatch { .. }),
        "{}",
        report.corruptions[0]
    );
    // The damaged batch fails its read; the one after it and later segments read.
    assert!(p.read(starts[bad], 1).is_err());
    assert_eq!(
        read_all(&p, starts[bad + 1]),
        values_from(&all, starts[bad + 1])
    );
}

/// The same in the active segment: the default recovery, which starts at the last
/// index entry, never reads the damage; the full one reports it and cuts nothing
/// (it used to cut the log at the damage, dropping every later batch).
#[test]
fn full_recovery_reports_early_damage_in_the_active_segment_and_cuts_nothing() {
    let src = tempfile::tempdir().unwrap();
    let all = fill(src.path(), 40, 100);
    let (starts, bad) = damage_third_batch(src.path(), Offset(0));
    let full = PartitionConfig {
        recovery: RecoveryPolicy::Full,
        ..small_config()
    };
    for (config, reported) in [(small_config(), 0), (full, 1)] {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(src.path(), dir.path());
        let (mut p, report) = open(dir.path(), config.clone());
        assert_eq!(
            report.corruptions.len(),
            reported,
            "{:?}",
            report.corruptions
        );
        assert_eq!(report.truncated_bytes, 0);
        let next = all.last().unwrap().0.plus(u64::from(
            BatchRef::parse(&all.last().unwrap().1)
                .unwrap()
                .record_count(),
        ));
        assert_eq!(p.next_offset(), next);
        assert!(p.read(starts[bad], 1).is_err());
        assert_eq!(
            read_all(&p, starts[bad + 1]),
            values_from(&all, starts[bad + 1])
        );
        // Appends go on after the last batch, and a second recovery agrees.
        assert_eq!(
            append(&mut p, &batch("more", 2, 50, 2_000)).base_offset,
            next
        );
        p.flush_blocking().unwrap();
        drop(p);
        let (p, again) = open(dir.path(), config);
        assert_eq!(again.truncated_bytes, 0);
        assert_eq!(p.next_offset(), next.plus(2));
    }
}

/// The base offset is outside the CRC; a damaged one in a sealed segment must
/// give a typed error on read, never a panic or a silently skipped batch.
#[test]
fn damaged_base_offset_is_a_typed_read_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = several_segments(dir.path(), "o");
    drop(p);
    let path = log_path(dir.path(), Offset(0));
    let mut b = std::fs::read(&path).unwrap();
    let mut starts = Vec::new();
    scan(&b, 0, Some(Offset(0)), |x| starts.push(x.position));
    for (i, value) in [(3usize, u64::MAX), (9, 5)] {
        let at = starts[i] as usize;
        b[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }
    std::fs::write(&path, &b).unwrap();
    let (p, _) = open(dir.path(), small_config());
    let mut errors = 0;
    for o in 0..30u64 {
        match p.read(Offset(o), 1 << 20) {
            Ok(f) => {
                for c in &f.chunks {
                    BatchRef::parse(c).unwrap();
                }
            }
            Err(StorageError::OffsetGap { .. }) => errors += 1,
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert!(
        errors >= 6,
        "reads across the damaged headers must fail: {errors}"
    );
}

/// Crafted batches whose offsets run past what a segment's u32 index can hold
/// (appends roll long before) end recovery there instead of panicking.
#[test]
fn crafted_offsets_beyond_u32_are_cut_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut file = Vec::new();
    let mut next = 0u64;
    for _ in 0..3 {
        let mut b = batch("big", 1, 10, 1_000);
        let delta = 3_000_000_000u32;
        b[ringbus::batch::LAST_OFFSET_DELTA_POS..ringbus::batch::LAST_OFFSET_DELTA_POS + 4]
            .copy_from_slice(&delta.to_le_bytes());
        let crc = ringbus::batch::compute_crc(&b);
        b[ringbus::batch::CRC_POS..ringbus::batch::CRC_POS + 4].copy_from_slice(&crc.to_le_bytes());
        ringbus::batch::stamp_base_offset(&mut b, Offset(next));
        next += u64::from(delta) + 1;
        file.extend_from_slice(&b);
    }
    std::fs::write(log_path(dir.path(), Offset(0)), &file).unwrap();
    let (p, report) = open(dir.path(), small_config());
    assert_eq!(
        p.next_offset(),
        Offset(3_000_000_001),
        "only the first batch fits a u32 relative offset"
    );
    assert!(report.truncated_bytes > 0);
}

/// A partition in `dir` with segments of `segment_bytes` (more than the first
/// reservation), holding `n` flushed batches of 10 values of `value_len` bytes;
/// returns its config and batches.
fn filled_large_segment(
    dir: &Path,
    segment_bytes: u64,
    n: usize,
    value_len: usize,
) -> (PartitionConfig, Vec<(Offset, Vec<u8>)>) {
    let config = PartitionConfig {
        segment_bytes,
        ..PartitionConfig::default()
    };
    let (mut p, _) = open(dir, config.clone());
    let mut all = Vec::new();
    for i in 0..n {
        // Kept as appended (base offset stamped), not read back: reads through the
        // map would bring the file's pages into memory.
        let mut b = batch(&format!("t{i}"), 10, value_len, 1_000);
        let at = append(&mut p, &b).base_offset;
        ringbus::batch::stamp_base_offset(&mut b, at);
        all.push((at, b));
    }
    p.flush_blocking().unwrap();
    (config, all)
}

/// Recovery cuts a torn tail of a segment whose blocks are reserved only in part:
/// the file is its full length again, reads zeros after the cut, and has its
/// blocks reserved past the recovered end.
#[test]
fn a_torn_tail_in_a_partly_reserved_segment_is_cut_and_reserved_again() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let (config, all) = filled_large_segment(dir.path(), 64 << 20, 20, 5_000);
    let path = log_path(dir.path(), Offset(0));
    let written = scan(&std::fs::read(&path).unwrap(), 0, Some(Offset(0)), |_| {}).end;
    // A torn write: garbage after the last batch, reaching past the reserved 4 MiB.
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[0x5a; 8192], written).unwrap();
    f.write_all_at(&[0x5a; 4096], 6 << 20).unwrap();
    drop(f);
    let report = check_recovered(dir.path(), &all, config);
    assert!(report.truncated_bytes > 0);
    let m = std::fs::metadata(&path).unwrap();
    assert_eq!(m.len(), 64 << 20);
    assert!(
        m.blocks() * 512 >= 4 << 20,
        "{} bytes reserved",
        m.blocks() * 512
    );
    let b = std::fs::read(&path).unwrap();
    assert!(b[(6 << 20)..(6 << 20) + 4096].iter().all(|&x| x == 0));
}

/// Recovery reads only where the file holds data: the never-written rest of an
/// active segment (a hole, or blocks reserved and never written) reads as zeros,
/// and reading it, or the read-around of a fault, made every start touch each
/// active segment (74 s to start a broker of 200 empty partitions of 256 MiB
/// segments, 41 s for 2,000). What it reads lands in the page cache, so that shows
/// it.
#[test]
fn recovery_reads_only_the_written_part_of_an_active_segment() {
    use ringbus::storage::mmap::{map_readonly, resident_bytes};
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = filled_large_segment(dir.path(), 256 << 20, 10, 10_000);
    let path = log_path(dir.path(), Offset(0));
    let (p, report) = open(dir.path(), config.clone());
    assert_eq!(report.truncated_bytes, 0);
    drop(p);
    let file = std::fs::File::open(&path).unwrap();
    let map = map_readonly(&file, 256 << 20).unwrap();
    let cached = resident_bytes(&map).expect("mincore");
    // The data from the last index entry on and a page or two, not the 256 MiB
    // segment, nor the 4 MiB of reserved blocks a fault's read-around would fill.
    assert!(
        cached < 3 << 20,
        "{cached} bytes of the segment read into memory"
    );
    // An empty partition: a page, not the reserved 4 MiB that the read-around of
    // the scan's first fault would zero-fill (41 s to start 2,000 such partitions).
    let empty = tempfile::tempdir().unwrap();
    drop(open(empty.path(), config.clone()));
    let (p, _) = open(empty.path(), config.clone());
    assert_eq!(p.next_offset(), Offset(0));
    drop(p);
    let file = std::fs::File::open(log_path(empty.path(), Offset(0))).unwrap();
    let map = map_readonly(&file, 256 << 20).unwrap();
    let cached = resident_bytes(&map).expect("mincore");
    assert!(
        cached <= 64 << 10,
        "{cached} bytes of an empty segment read"
    );
    // Garbage past a hole, as a torn write that landed out of order leaves: it is
    // still found and cut.
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x33; 4096], 40 << 20).unwrap();
    drop(f);
    let (p, report) = open(dir.path(), config.clone());
    assert_eq!(report.truncated_bytes, (40 << 20) + 4096 - p.size_bytes());
    assert_eq!(p.next_offset(), Offset(100));
    drop(p);
    // And in reserved blocks that hold it only in the page cache (a buffered write
    // not yet written back, into an unwritten extent).
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x44; 100], 3 << 20).unwrap();
    drop(f);
    let (p, report) = open(dir.path(), config);
    assert_eq!(report.truncated_bytes, (3 << 20) + 100 - p.size_bytes());
    assert_eq!(p.next_offset(), Offset(100));
}
