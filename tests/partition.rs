//! Partition behaviour against a simple in-memory model (a `Vec` of batches), plus
//! rolling, retention with held readers, timestamps, limits and fencing.

mod common;

use common::*;
use proptest::prelude::*;
use ringbus::batch::BatchRef;
use ringbus::storage::io::{AlignedBuf, StdIo};
use ringbus::storage::partition::{apply_retention_shared, prepare_spare_shared};
use ringbus::storage::{CacheBudget, Durability, LogIo, Partition, PartitionConfig, StorageError};
use ringbus::{Offset, TimestampMs};
use std::cell::Cell;
use std::rc::Rc;
use std::time::Instant;

#[derive(Debug, Clone)]
enum Op {
    Append {
        records: usize,
        value_len: usize,
    },
    Flush,
    Roll,
    Retain {
        bytes: u64,
    },
    Read {
        at: usize,
        max_bytes: usize,
    },
    /// Reopen, with a tail cache of this many bytes (in 16 KiB blocks; under one
    /// block is no cache).
    Reopen {
        cache: u64,
    },
    /// Make the spare segment the partition asks for (as its driver would), so
    /// later rolls rename it instead of creating a segment.
    Spare,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1usize..20, 0usize..3000).prop_map(|(records, value_len)| Op::Append { records, value_len }),
        3 => Just(Op::Flush),
        1 => Just(Op::Roll),
        1 => (0u64..200_000).prop_map(|bytes| Op::Retain { bytes }),
        3 => (0usize..1000, 1usize..100_000).prop_map(|(at, max_bytes)| Op::Read { at, max_bytes }),
        1 => (0u64..300_000).prop_map(|cache| Op::Reopen { cache }),
        2 => Just(Op::Spare),
    ]
}

/// The model: batches in offset order, how many are flushed, and the log start.
#[derive(Default)]
struct Model {
    batches: Vec<(Offset, Vec<u8>)>,
    flushed: usize,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn partition_matches_model(
        ops in proptest::collection::vec(op(), 1..60),
        first_cache in 0u64..300_000,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = small_config();
        let (mut p, _) = open(dir.path(), cfg.clone());
        // Reads must return the same bytes whether they come from the tail cache
        // (with evictions under a small budget), the maps, or both in one fetch.
        let cached = |p: &mut Partition<StdIo>, bytes: u64| {
            p.set_tail_cache(CacheBudget::with_block_bytes(bytes, 16 * 1024));
        };
        cached(&mut p, first_cache);
        let mut m = Model::default();
        let mut n = 0u64;
        for op in ops {
            match op {
                Op::Append { records, value_len } => {
                    n += 1;
                    let b = batch(&format!("b{n}"), records, value_len, 1_000 + n as i64);
                    let a = append(&mut p, &b);
                    let expect = m.batches.last().map_or(p.log_start(), |(o, bytes)| {
                        o.plus(u64::from(BatchRef::parse(bytes).unwrap().record_count()))
                    });
                    prop_assert_eq!(a.base_offset, expect);
                    prop_assert_eq!(a.last_offset, expect.plus(records as u64 - 1));
                    let mut stamped = b.clone();
                    ringbus::batch::stamp_base_offset(&mut stamped, a.base_offset);
                    m.batches.push((a.base_offset, stamped));
                }
                Op::Flush => {
                    p.flush_blocking().unwrap();
                    m.flushed = m.batches.len();
                    prop_assert_eq!(p.durable_offset(), p.next_offset());
                }
                Op::Roll => {
                    p.roll(TimestampMs(1_000)).unwrap();
                }
                Op::Retain { bytes } => {
                    let mut c = p.config().clone();
                    c.retention_bytes = Some(bytes);
                    drop(p);
                    // Unflushed batches are lost with the process; reopen with the limit.
                    m.batches.truncate(m.flushed);
                    let (mut q, _) = open(dir.path(), c);
                    cached(&mut q, first_cache);
                    let before = q.size_bytes();
                    let r = q.apply_retention(TimestampMs(1_000)).unwrap();
                    prop_assert!(r.segments_deleted == 0 || before - r.bytes_deleted >= bytes);
                    m.batches.retain(|(o, _)| *o >= q.log_start());
                    m.flushed = m.batches.len();
                    p = q;
                }
                Op::Read { at, max_bytes } => {
                    if m.flushed == 0 { continue; }
                    let i = at % m.flushed;
                    let (off, _) = &m.batches[i];
                    let f = p.read(*off, max_bytes).unwrap();
                    prop_assert!(!f.chunks.is_empty());
                    // The fetched bytes are exactly the model's batches from i on.
                    let got: Vec<u8> = f.chunks.iter().flat_map(|c| c.iter().copied()).collect();
                    let mut want = Vec::new();
                    let mut j = i;
                    while j < m.flushed && want.len() < got.len() {
                        want.extend_from_slice(&m.batches[j].1);
                        j += 1;
                    }
                    prop_assert_eq!(got.len(), want.len());
                    prop_assert!(got == want, "fetched bytes differ from the model");
                    prop_assert!(f.bytes() <= max_bytes || f.chunks.len() == 1);
                }
                Op::Spare => {
                    let cell = std::cell::RefCell::new(p);
                    futures_lite::future::block_on(prepare_spare_shared(&cell));
                    p = cell.into_inner();
                }
                Op::Reopen { cache } => {
                    drop(p);
                    m.batches.truncate(m.flushed);
                    let (mut q, rep) = open(dir.path(), cfg.clone());
                    cached(&mut q, cache);
                    prop_assert_eq!(rep.truncated_bytes, 0);
                    prop_assert!(rep.corruptions.is_empty());
                    p = q;
                }
            }
        }
        p.flush_blocking().unwrap();
        let all = batches(&p);
        prop_assert_eq!(all.len(), m.batches.len());
        for (a, b) in all.iter().zip(&m.batches) {
            prop_assert_eq!(a.0, b.0);
            prop_assert!(a.1 == b.1);
        }
    }
}

/// A read that would fault pages in from the disk is found before it runs (so the
/// server can bring them in on a helper thread), and reads that the tail cache or
/// resident pages serve are not.
#[test]
fn cold_reads_are_found_before_they_fault() {
    use ringbus::storage::mmap;
    // On the build's own filesystem: tmpfs pages are always resident.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (mut p, _) = open(dir.path(), small_config());
    let budget = CacheBudget::with_block_bytes(1 << 20, 64 * 1024);
    p.set_tail_cache(budget);
    for i in 0..100 {
        append(&mut p, &batch(&format!("c{i}"), 4, 500, 1_000));
    }
    p.flush_blocking().unwrap();
    assert!(
        p.cold_span(Offset(0), 64 * 1024).is_none(),
        "the tail cache serves this read"
    );
    assert!(
        p.cold_span(p.next_offset(), 64 * 1024).is_none(),
        "nothing to read"
    );
    let expected = read_all(&p, Offset(0));
    drop(p);
    // Reopened: no cache for recovered batches, so reads come from the maps.
    let (q, _) = open(dir.path(), small_config());
    // The first segment, which holds offset 0.
    let seg = dir.path().join(format!("{:020}.log", 0));
    // Drop the file's cached pages (the target directory is on a disk filesystem:
    // tmpfs would keep them).
    ringbus::storage::io::drop_cached_pages(&std::fs::File::open(&seg).unwrap()).unwrap();
    let (span, ahead) = q.cold_span(Offset(0), 64 * 1024).unwrap_or_else(|| {
        panic!(
            "{} is out of memory but the read was not found cold",
            seg.display()
        )
    });
    assert!(!span.is_empty() && ahead.len() >= span.len());
    assert!(!mmap::resident(&ahead));
    mmap::fault_in(&span, &ahead);
    assert!(mmap::resident(&span), "fault_in left pages out");
    mmap::fault_in(&ahead, &ahead);
    assert!(q.cold_span(Offset(0), 64 * 1024).is_none(), "now resident");
    assert_eq!(read_all(&q, Offset(0)), expected);
}

/// A closed log on disk for cold-read tests: `n` batches from `make` in segments of
/// `segment_bytes`, and every value with its offset as the maps read them.
struct ColdLog {
    dir: tempfile::TempDir,
    cfg: PartitionConfig,
    expected: Vec<(Offset, Vec<u8>)>,
    segments: usize,
}

impl ColdLog {
    fn new(segment_bytes: u64, n: usize, make: impl Fn(usize) -> Vec<u8>) -> ColdLog {
        // On the build's own filesystem, where O_DIRECT works (tmpfs refuses it).
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let cfg = PartitionConfig {
            segment_bytes,
            ..PartitionConfig::default()
        };
        let (mut p, _) = open(dir.path(), cfg.clone());
        for i in 0..n {
            append(&mut p, &make(i));
        }
        p.flush_blocking().unwrap();
        drop(p);
        let (q, _) = open(dir.path(), cfg.clone());
        let expected = read_all(&q, Offset(0));
        let segments = q.segment_count();
        ColdLog {
            dir,
            cfg,
            expected,
            segments,
        }
    }

    /// The log reopened (nothing cached) with a read pool of `buffers`.
    fn reopen(
        &self,
        buffers: usize,
    ) -> (
        Rc<std::cell::RefCell<Partition<StdIo>>>,
        ringbus::storage::cold::ReadPool,
    ) {
        let (mut q, _) = open(self.dir.path(), self.cfg.clone());
        let pool = ringbus::storage::cold::ReadPool::new(buffers);
        q.set_read_pool(pool.clone());
        (Rc::new(std::cell::RefCell::new(q)), pool)
    }
}

/// Reads the whole partition the way the server does: `prepare_read` (cold reads
/// and their read-ahead, run to completion here) before every `read`. Returns the
/// values with their offsets, and the fetches' sizes.
fn read_all_prepared(
    p: &Rc<std::cell::RefCell<Partition<StdIo>>>,
    max_bytes: usize,
) -> (Vec<(Offset, Vec<u8>)>, Vec<usize>) {
    use futures_lite::future::block_on;
    use ringbus::storage::partition::prepare_read;
    let mut out = Vec::new();
    let mut sizes = Vec::new();
    let mut cur = p.borrow().log_start();
    loop {
        if let Some(ahead) = block_on(prepare_read(p, cur, max_bytes)) {
            block_on(ahead);
        }
        let f = p.borrow().read(cur, max_bytes).expect("read");
        if f.chunks.is_empty() {
            assert_eq!(f.next_offset, f.high_watermark, "read stopped early");
            return (out, sizes);
        }
        sizes.push(f.chunks.iter().map(|c| c.len()).sum());
        push_values(&f.chunks, Offset(0), &mut out);
        assert!(f.next_offset > cur, "no progress");
        cur = f.next_offset;
    }
}

/// After a restart nothing is cached: with a read pool, reads go through O_DIRECT
/// cold spans (and their read-ahead) and return exactly what the maps hold, across
/// segment boundaries, with fetches that stop where the spans stop.
#[test]
fn cold_reads_through_spans_match_the_maps() {
    let log = ColdLog::new(256 * 1024, 300, |i| {
        batch(&format!("cold{i}"), 3, 700 + i % 50, 1_000)
    });
    let expected = &log.expected;
    assert!(log.segments > 2, "the data spans several segments");
    let (q, pool) = log.reopen(4);
    for max_bytes in [10_000, 64 * 1024, 1 << 20] {
        let (got, sizes) = read_all_prepared(&q, max_bytes);
        assert_eq!(&got, expected, "max_bytes {max_bytes}");
        assert!(sizes.iter().all(|&n| n <= max_bytes.max(3_000)));
    }
    assert!(pool.allocated() > 0, "no cold read ran");
    assert!(
        pool.allocated() <= 4,
        "the pool grew past its limit: {}",
        pool.allocated()
    );
}

/// Fetches at scattered offsets and sizes through cold spans (several readers'
/// spans in one partition, a pool too small for all of them) return whole,
/// consecutive batches holding the requested offset, with the values the maps hold.
#[test]
fn scattered_cold_reads_return_the_right_batches() {
    use ringbus::storage::partition::prepare_read;
    let log = ColdLog::new(128 * 1024, 400, |i| {
        batch(&format!("s{i}"), 1 + i % 4, 300 + i % 700, 1_000)
    });
    let end = log.expected.last().unwrap().0.plus(1);
    let expected: std::collections::HashMap<Offset, Vec<u8>> =
        log.expected.iter().cloned().collect();
    let (q, pool) = log.reopen(3);
    let mut next = xorshift(0x2545_f491_4f6c_dd1d);
    for _ in 0..300 {
        let from = Offset(next() % end.0);
        let max_bytes = 1 + (next() % (200 * 1024)) as usize;
        // Sometimes the read-ahead runs, sometimes it is left pending.
        if let Some(ahead) = futures_lite::future::block_on(prepare_read(&q, from, max_bytes)) {
            if next() % 2 == 0 {
                futures_lite::future::block_on(ahead);
            }
        }
        let f = q.borrow().read(from, max_bytes).expect("read");
        let mut got = Vec::new();
        push_values(&f.chunks, Offset(0), &mut got);
        assert!(!got.is_empty(), "nothing read at {from:?}");
        assert!(got[0].0 <= from && got.last().unwrap().0 >= from);
        for w in got.windows(2) {
            assert_eq!(w[1].0, w[0].0.plus(1), "a gap after {:?}", w[0].0);
        }
        for (o, v) in &got {
            assert_eq!(Some(v), expected.get(o), "value at {o:?}");
        }
        assert_eq!(f.next_offset, got.last().unwrap().0.plus(1));
    }
    assert!(pool.allocated() > 0 && pool.allocated() <= 3);
}

/// A batch larger than a cold span keeps nothing when read cold: the fetch goes
/// through the map instead, the position is not read cold again, and neither the
/// fetch nor the read-ahead loops.
#[test]
fn batches_larger_than_a_cold_span_are_read_through_the_map() {
    let log = ColdLog::new(512 * 1024, 12, |i| {
        batch(&format!("big{i}"), 40, 2_000, 1_000)
    });
    let expected = log.expected.clone();
    let (q, _pool) = log.reopen(2);
    // 10,000 bytes asked, spans of at most 10,000 + 8 KiB: every 80 KB batch is larger.
    let (got, _) = read_all_prepared(&q, 10_000);
    assert_eq!(got, expected);
    let (again, _) = read_all_prepared(&q, 10_000);
    assert_eq!(again, expected);
}

/// Cold spans give their buffers back: those a sequential reader has moved past at
/// once, and all of them once no read went through them for `COLD_IDLE_MS`.
#[test]
fn cold_spans_give_their_buffers_back() {
    let log = ColdLog::new(256 * 1024, 300, |i| batch(&format!("g{i}"), 3, 700, 1_000));
    let (q, pool) = log.reopen(8);
    let (got, sizes) = read_all_prepared(&q, 32 * 1024);
    assert!(sizes.len() > 10 && !got.is_empty());
    let held = pool.allocated() - pool.free();
    assert!(
        held <= ringbus::limits::COLD_SPANS_PER_PARTITION,
        "{held} buffers still held after a sequential read"
    );
    let later = Instant::now() + std::time::Duration::from_millis(ringbus::limits::COLD_IDLE_MS);
    q.borrow_mut().expire_cold_spans(Instant::now());
    assert_eq!(pool.allocated() - pool.free(), held, "not idle yet");
    q.borrow_mut().expire_cold_spans(later);
    assert_eq!(
        pool.free(),
        pool.allocated(),
        "idle spans kept their buffers"
    );
}

/// A partition whose driver ended (fenced) gives its cold spans' buffers back at
/// once, and reads on through the maps.
#[test]
fn stopped_cold_reads_give_every_buffer_back_and_reads_go_on() {
    use ringbus::storage::partition::prepare_read;
    let log = ColdLog::new(256 * 1024, 300, |i| batch(&format!("s{i}"), 3, 700, 1_000));
    let (q, pool) = log.reopen(8);
    let _ = futures_lite::future::block_on(prepare_read(&q, Offset(0), 32 * 1024));
    assert!(pool.allocated() > pool.free(), "no cold span was read");
    q.borrow_mut().stop_cold_reads();
    assert_eq!(pool.free(), pool.allocated(), "a cold span kept its buffer");
    let before = pool.allocated();
    let (got, _) = read_all_prepared(&q, 32 * 1024);
    assert_eq!(got.len(), 900);
    assert_eq!(
        pool.allocated(),
        before,
        "a read took a buffer after the stop"
    );
    assert_eq!(pool.free(), pool.allocated());
}

/// A batch corrupted on disk is caught when a cold span serves it (CRC), as a
/// typed error, never served.
#[test]
fn a_corrupt_batch_in_a_cold_span_is_an_error() {
    use ringbus::storage::cold::ReadPool;
    use ringbus::storage::partition::prepare_read;
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (mut p, _) = open(dir.path(), small_config());
    for i in 0..80 {
        append(&mut p, &batch(&format!("x{i}"), 2, 600, 1_000));
    }
    p.flush_blocking().unwrap();
    assert!(p.segment_count() > 1);
    drop(p);
    // A value byte of the third batch of the first (sealed) segment.
    let seg = dir.path().join(format!("{:020}.log", 0));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .unwrap();
    let at = 2 * batch("x0", 2, 600, 1_000).len() as u64 + 200;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x55], at).unwrap();
    f.sync_all().unwrap();
    ringbus::storage::io::drop_cached_pages(&f).unwrap();

    let (mut q, _) = open(dir.path(), small_config());
    let pool = ReadPool::new(2);
    q.set_read_pool(pool.clone());
    let q = Rc::new(std::cell::RefCell::new(q));
    let _ = futures_lite::future::block_on(prepare_read(&q, Offset(0), 64 * 1024));
    assert_eq!(
        pool.allocated(),
        1,
        "the read did not go through a cold span"
    );
    let got = q.borrow().read(Offset(0), 64 * 1024);
    match got {
        Err(StorageError::ChecksumMismatch { position, .. }) => {
            assert!(position <= at, "reported at {position}, corrupted at {at}");
        }
        other => panic!("expected a CRC error, got {other:?}"),
    }
}

#[test]
fn tail_cache_serves_fresh_batches_evicts_the_oldest_and_matches_the_maps() {
    let dir = tempfile::tempdir().unwrap();
    let (mut p, _) = open(dir.path(), small_config());
    for i in 0..20 {
        append(&mut p, &batch(&format!("old{i}"), 2, 400, 1_000));
    }
    p.flush_blocking().unwrap();
    // Attached mid-segment: earlier batches come from the map, later ones from
    // memory; 16 KiB blocks under a 64 KiB budget, so most of what follows is evicted.
    let budget = CacheBudget::with_block_bytes(64 * 1024, 16 * 1024);
    p.set_tail_cache(budget.clone());
    for i in 0..300 {
        append(&mut p, &batch(&format!("new{i}"), 3, 300, 1_000));
        if i % 7 == 0 {
            p.flush_blocking().unwrap();
        }
    }
    p.flush_blocking().unwrap();
    assert!(budget.used() <= 64 * 1024, "over budget: {}", budget.used());
    assert!(budget.evicted() > 0, "nothing was evicted");
    let cached = read_all(&p, Offset(0));
    assert!(budget.served() > 0, "no read came from the cache");
    // The newest batches are cached: a fetch at the tail is served from memory.
    let before = budget.served();
    let last = p.next_offset().0 - 3;
    let f = p.read(Offset(last), 1 << 20).unwrap();
    assert_eq!(budget.served() - before, f.bytes() as u64);
    // The same bytes and values as the maps give without any cache.
    let with_cache = batches(&p);
    drop(p);
    let (q, _) = open(dir.path(), small_config());
    assert!(
        with_cache == batches(&q),
        "cached reads differ from the maps"
    );
    assert_eq!(cached, read_all(&q, Offset(0)));
    assert_eq!(cached.len(), 40 + 900);
}

#[test]
fn reads_cross_segment_boundaries_and_roll_by_size() {
    let dir = tempfile::tempdir().unwrap();
    let (mut p, _) = open(dir.path(), small_config());
    for i in 0..200 {
        append(&mut p, &batch(&format!("x{i}"), 3, 500, 1_000));
    }
    p.flush_blocking().unwrap();
    assert!(
        p.segment_count() >= 5,
        "64 KiB segments must roll: {}",
        p.segment_count()
    );
    let all = read_all(&p, Offset(0));
    assert_eq!(all.len(), 600);
    for (i, (o, v)) in all.iter().enumerate() {
        assert_eq!(o.0, i as u64);
        assert!(v.starts_with(format!("x{}-{}", i / 3, i % 3).as_bytes()));
    }
    // A single fetch with a big budget spans several segments.
    let f = p.read(Offset(0), 1 << 20).unwrap();
    assert!(f.chunks.len() > 1);
    // Sealed segments were trimmed to their real length.
    let bases = p.segment_bases();
    let first = dir.path().join(format!("{:020}.log", bases[0].0));
    let len = std::fs::metadata(first).unwrap().len();
    assert!(
        len < 64 * 1024 && len > 60 * 1024,
        "sealed segment trimmed: {len}"
    );
}

#[test]
fn unwritten_appends_are_invisible_until_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let (mut p, _) = open(dir.path(), small_config());
    append(&mut p, &batch("a", 2, 10, 1_000));
    assert_eq!(p.written_offset(), Offset(0));
    assert!(p.read(Offset(0), 1000).unwrap().chunks.is_empty());
    assert!(matches!(
        p.read(Offset(1), 1000),
        Err(StorageError::OffsetOutOfRange { .. })
    ));
    p.flush_blocking().unwrap();
    assert_eq!(p.written_offset(), Offset(2));
    assert_eq!(read_all(&p, Offset(0)).len(), 2);
    assert_eq!(read_all(&p, Offset(1)).len(), 1);
}

#[test]
fn retention_keeps_held_bytes_readable_after_delete() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = PartitionConfig {
        retention_bytes: Some(100 * 1024),
        ..small_config()
    };
    let (mut p, _) = open(dir.path(), cfg);
    for i in 0..400 {
        append(&mut p, &batch(&format!("r{i}"), 1, 1000, 1_000));
        if i % 50 == 0 {
            p.flush_blocking().unwrap();
        }
    }
    p.flush_blocking().unwrap();
    let held = p.read(Offset(0), 4096).unwrap();
    let held_copy: Vec<u8> = held.chunks[0].to_vec();
    let first_log = dir.path().join(format!("{:020}.log", 0));
    assert!(first_log.exists());
    // The broker's way: files removed on a helper thread (inline with StdIo).
    let cell = std::cell::RefCell::new(p);
    let r =
        futures_lite::future::block_on(apply_retention_shared(&cell, TimestampMs(1_000))).unwrap();
    let p = cell.into_inner();
    assert!(r.segments_deleted > 0);
    assert!(!first_log.exists(), "deleted segment file still present");
    assert!(p.size_bytes() >= 100 * 1024);
    assert_eq!(
        held.chunks[0][..],
        held_copy[..],
        "held bytes changed after delete"
    );
    BatchRef::parse_full(&held.chunks[0]).unwrap();
    assert!(matches!(
        p.read(Offset(0), 10),
        Err(StorageError::OffsetOutOfRange { .. })
    ));
    assert_eq!(
        read_all(&p, r.new_log_start).len() as u64,
        400 - r.new_log_start.0
    );
}

/// A partition that rolls every second and keeps 5 s, with one one-record batch
/// stamped each second from 0 to 9 s (offset t at t s): ten segments.
fn one_second_segments<B: LogIo>(dir: &std::path::Path, io: B) -> Partition<B> {
    let cfg = PartitionConfig {
        segment_ms: Some(1_000),
        retention_ms: Some(5_000),
        ..small_config()
    };
    let (mut p, _) = Partition::open(dir, cfg, io, TimestampMs(0)).unwrap();
    for t in 0..10i64 {
        let wall = TimestampMs(t * 1_000);
        p.append(&batch("t", 1, 10, t * 1_000), Instant::now(), wall)
            .unwrap();
        p.flush_blocking().unwrap();
    }
    p
}

#[test]
fn retention_by_age_and_roll_by_age() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = one_second_segments(dir.path(), StdIo::default());
    assert_eq!(p.segment_count(), 10, "one segment per second of age");
    let r = p.apply_retention(TimestampMs(10_000)).unwrap();
    // Segments whose newest record is more than 5 s old: t = 0..=4.
    assert_eq!(r.segments_deleted, 5);
    assert_eq!(p.log_start(), Offset(5));
    assert_eq!(
        p.offset_for_timestamp(TimestampMs(7_000)).unwrap(),
        Some(Offset(7))
    );
    assert_eq!(
        p.offset_for_timestamp(TimestampMs(6_500)).unwrap(),
        Some(Offset(7))
    );
    assert_eq!(p.offset_for_timestamp(TimestampMs(99_000)).unwrap(), None);
}

#[test]
fn a_timestamp_scan_needs_no_partition_and_outlives_its_segment() {
    use ringbus::storage::partition::offset_for_timestamp_shared;
    let dir = tempfile::tempdir().unwrap();
    let mut p = one_second_segments(dir.path(), StdIo::default());
    // The first segment that can hold 1,500 ms is the third (its batch is at 2,000).
    let scan = p.timestamp_scan(TimestampMs(1_500), None).unwrap();
    assert_eq!(scan.base, Offset(2));
    // The next one after it, and none after the last.
    assert_eq!(
        p.timestamp_scan(TimestampMs(1_500), Some(Offset(2)))
            .unwrap()
            .base,
        Offset(3)
    );
    assert!(p
        .timestamp_scan(TimestampMs(1_500), Some(Offset(9)))
        .is_none());
    assert!(p.timestamp_scan(TimestampMs(9_001), None).is_none());
    // Retention takes that segment while the scan is out (on a helper thread in a
    // shard): the partition says so, and the scan still reads its own map.
    assert!(p.segment_written_len(Offset(2)).is_some());
    let r = p.apply_retention(TimestampMs(10_000)).unwrap();
    assert_eq!(r.segments_deleted, 5);
    assert_eq!(p.segment_written_len(Offset(2)), None);
    assert_eq!(scan.run().unwrap(), Some(Offset(2)));
    // The shard's lookup goes through the scans and finds what the log still holds.
    let cell = std::cell::RefCell::new(p);
    let got =
        futures_lite::future::block_on(offset_for_timestamp_shared(&cell, TimestampMs(1_500)));
    assert_eq!(got.unwrap(), Some(Offset(5)));
    let got =
        futures_lite::future::block_on(offset_for_timestamp_shared(&cell, TimestampMs(7_000)));
    assert_eq!(got.unwrap(), Some(Offset(7)));
}

#[test]
fn a_timestamp_lookup_starts_again_when_retention_takes_its_segment() {
    use ringbus::storage::partition::offset_for_timestamp_shared;
    let dir = tempfile::tempdir().unwrap();
    let cell = std::cell::RefCell::new(one_second_segments(dir.path(), FaultyIo::yielding()));
    // The lookup's first scan (segment 2) is out when retention deletes segments
    // 0-4: the answer must come from what the log holds afterwards, not offset 2.
    let (got, deleted) = futures_lite::future::block_on(futures_lite::future::zip(
        offset_for_timestamp_shared(&cell, TimestampMs(1_500)),
        async {
            let r = cell.borrow_mut().apply_retention(TimestampMs(10_000));
            r.unwrap().segments_deleted
        },
    ));
    assert_eq!(deleted, 5);
    assert_eq!(cell.borrow().log_start(), Offset(5));
    assert_eq!(got.unwrap(), Some(Offset(5)));
}

#[test]
fn a_timestamp_lookup_that_retention_keeps_outrunning_still_answers() {
    use ringbus::storage::partition::offset_for_timestamp_shared;
    let dir = tempfile::tempdir().unwrap();
    let cell = std::cell::RefCell::new(one_second_segments(dir.path(), FaultyIo::yielding()));
    // Each time the lookup's scan is out, retention takes the oldest segment (the
    // one being scanned): 6 segments go, one at a time.
    let mut now = 5_000;
    let retention = std::future::poll_fn(|cx| {
        now += 1_000;
        let r = cell.borrow_mut().apply_retention(TimestampMs(now)).unwrap();
        assert_eq!(r.segments_deleted, 1);
        if now == 11_000 {
            return std::task::Poll::Ready(());
        }
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    });
    let (got, ()) = futures_lite::future::block_on(futures_lite::future::zip(
        offset_for_timestamp_shared(&cell, TimestampMs(0)),
        retention,
    ));
    // Segments 0-3 went under its first four scans, segment 4 under the fifth:
    // then it answered in one go from the log as it was, starting at offset 5
    // (and retention went on to take that one too).
    assert_eq!(got.unwrap(), Some(Offset(5)));
    assert_eq!(cell.borrow().log_start(), Offset(6));
}

#[test]
fn a_timestamp_lookup_scans_again_a_segment_written_while_it_ran() {
    use ringbus::storage::partition::offset_for_timestamp_shared;
    /// Appends one record of `len` bytes stamped `ts` ms, and writes it if `write`.
    fn put<B: LogIo>(p: &mut Partition<B>, len: usize, ts: i64, write: bool) {
        let wall = TimestampMs(ts);
        p.append(&batch("v", 1, len, ts), Instant::now(), wall)
            .unwrap();
        if write {
            p.flush_blocking().unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let io = FaultyIo::yielding();
    let (mut p, _) = Partition::open(dir.path(), small_config(), io, TimestampMs(0)).unwrap();
    // Offset 0 (1 s) is written; offset 1 (5 s), 40 KB, is appended but not yet.
    put(&mut p, 100, 1_000, true);
    put(&mut p, 40_000, 5_000, false);
    let cell = std::cell::RefCell::new(p);
    // While the lookup's scan of the first segment is out, offset 1 is written and
    // offset 2 (6 s), which does not fit beside it, is written in a new segment.
    let (got, ()) = futures_lite::future::block_on(futures_lite::future::zip(
        offset_for_timestamp_shared(&cell, TimestampMs(5_000)),
        async {
            let mut p = cell.borrow_mut();
            p.flush_blocking().unwrap();
            put(&mut p, 40_000, 6_000, true);
            assert_eq!(p.segment_count(), 2);
        },
    ));
    assert_eq!(got.unwrap(), Some(Offset(1)), "skipped the batch at 5 s");
}

#[test]
fn bad_batches_are_rejected_without_touching_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (mut p, _) = open(dir.path(), small_config());
    let good = batch("g", 2, 10, 1_000);
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    let now = Instant::now();
    assert!(matches!(
        p.append(&flipped, now, TimestampMs(0)),
        Err(StorageError::InvalidBatch(_))
    ));
    assert!(matches!(
        p.append(&good[..good.len() - 1], now, TimestampMs(0)),
        Err(StorageError::InvalidBatch(_))
    ));
    let mut two = good.clone();
    two.extend_from_slice(&good);
    assert!(matches!(
        p.append(&two, now, TimestampMs(0)),
        Err(StorageError::InvalidBatch(_))
    ));
    let huge = batch("h", 1, 70 * 1024, 1_000);
    assert!(matches!(
        p.append(&huge, now, TimestampMs(0)),
        Err(StorageError::BatchTooLarge { .. })
    ));
    assert_eq!(p.next_offset(), Offset(0));
    append(&mut p, &good);
    p.flush_blocking().unwrap();
    assert_eq!(read_all(&p, Offset(0)).len(), 2);
}

/// A backend that fails the n-th write or sync.
#[derive(Clone)]
struct FaultyIo {
    inner: StdIo,
    writes_left: Rc<Cell<u32>>,
    syncs_left: Rc<Cell<u32>>,
    /// Directory syncs so far.
    dir_syncs: Rc<Cell<u32>>,
    /// `(file position, length)` of every write issued, in order.
    writes: Rc<std::cell::RefCell<Vec<(u64, usize)>>>,
    /// `(file position, length)` of every durable write issued, in order.
    durable_writes: Rc<std::cell::RefCell<Vec<(u64, usize)>>>,
    /// Syncs issued.
    syncs: Rc<Cell<u32>>,
    /// `run_blocking` first lets other futures run once, as a helper thread's work
    /// does on a shard.
    yield_before_blocking: Rc<Cell<bool>>,
}

impl FaultyIo {
    fn new(writes: u32, syncs: u32) -> FaultyIo {
        FaultyIo {
            inner: StdIo::default(),
            writes_left: Rc::new(Cell::new(writes)),
            syncs_left: Rc::new(Cell::new(syncs)),
            dir_syncs: Rc::new(Cell::new(0)),
            writes: Rc::default(),
            durable_writes: Rc::default(),
            syncs: Rc::default(),
            yield_before_blocking: Rc::default(),
        }
    }
}

impl FaultyIo {
    /// No injected failures; `run_blocking` lets other futures run first.
    fn yielding() -> FaultyIo {
        let io = FaultyIo::new(u32::MAX, u32::MAX);
        io.yield_before_blocking.set(true);
        io
    }

    fn tick(c: &Cell<u32>) -> std::io::Result<()> {
        if c.get() == 0 {
            return Err(std::io::Error::other("injected I/O error"));
        }
        c.set(c.get() - 1);
        Ok(())
    }

    /// `inner`, or the injected error once the operations counted by `left` ran out.
    fn gated<T>(
        left: &Cell<u32>,
        inner: impl std::future::Future<Output = std::io::Result<T>>,
    ) -> impl std::future::Future<Output = std::io::Result<T>> {
        let r = Self::tick(left);
        async move {
            r?;
            inner.await
        }
    }
}

impl LogIo for FaultyIo {
    type File = std::fs::File;
    type Buf = AlignedBuf;
    fn alloc(&self, len: usize) -> AlignedBuf {
        self.inner.alloc(len)
    }
    fn open(
        &self,
        path: &std::path::Path,
    ) -> impl std::future::Future<Output = std::io::Result<std::fs::File>> {
        self.inner.open(path)
    }
    fn write_at(
        &self,
        f: &std::fs::File,
        buf: AlignedBuf,
        len: usize,
        pos: u64,
    ) -> impl std::future::Future<Output = std::io::Result<Option<AlignedBuf>>> {
        self.writes.borrow_mut().push((pos, len));
        Self::gated(&self.writes_left, self.inner.write_at(f, buf, len, pos))
    }
    fn sync_data(
        &self,
        f: &std::fs::File,
    ) -> impl std::future::Future<Output = std::io::Result<()>> {
        self.syncs.set(self.syncs.get() + 1);
        Self::gated(&self.syncs_left, self.inner.sync_data(f))
    }
    fn write_durable_at(
        &self,
        f: &std::fs::File,
        buf: AlignedBuf,
        len: usize,
        pos: u64,
    ) -> impl std::future::Future<Output = std::io::Result<Option<AlignedBuf>>> {
        self.durable_writes.borrow_mut().push((pos, len));
        let inner = self.inner.write_durable_at(f, buf, len, pos);
        Self::gated(&self.writes_left, inner)
    }
    fn sync_dir(
        &self,
        dir: &std::path::Path,
    ) -> impl std::future::Future<Output = std::io::Result<()>> {
        self.dir_syncs.set(self.dir_syncs.get() + 1);
        self.inner.sync_dir(dir)
    }
    async fn run_blocking<R, F>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        if self.yield_before_blocking.get() {
            futures_lite::future::yield_now().await;
        }
        self.inner.run_blocking(f).await
    }
}

/// A write never spans a block written before and blocks never written: ext4 does
/// not count that as an overwrite, so io_uring cannot start it without blocking and
/// hands it to a worker thread. A carried partial block, after a flush or after
/// recovery, is rewritten by a write of one block.
#[test]
fn carried_blocks_are_rewritten_by_writes_of_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let io = FaultyIo::new(u32::MAX, u32::MAX);
    let writes = io.writes.clone();
    let cfg = PartitionConfig {
        segment_bytes: 16 << 20,
        flush_delay_us: 0,
        ..PartitionConfig::default()
    };
    let mut expected = Vec::new();
    for round in 0..2 {
        // The second round starts from recovery's carried block.
        let (mut p, _) =
            Partition::open(dir.path(), cfg.clone(), io.clone(), TimestampMs(0)).unwrap();
        for i in 0..40 {
            // 3 x 1 KB records: every flush ends inside a block; every tenth
            // round of appends passes a whole chunk, so full chunks go out too.
            let n = if i % 10 == 9 { 1_200 } else { 3 };
            append(&mut p, &batch(&format!("r{round}-{i}"), n, 1_000, 1_000));
            p.flush_blocking().unwrap();
        }
        expected = read_all(&p, Offset(0));
    }
    let mut written_end = 0u64;
    let mut carries = 0;
    for &(pos, len) in writes.borrow().iter() {
        if pos < written_end {
            assert_eq!(
                len, 4096,
                "the write at {pos} of {len} bytes rewrites a written block and goes past it"
            );
            carries += 1;
        }
        written_end = written_end.max(pos + len as u64);
    }
    assert!(carries >= 70, "only {carries} carried blocks");
    let (p, _) = open(dir.path(), cfg);
    assert_eq!(read_all(&p, Offset(0)), expected);
    assert_eq!(expected.len(), 2 * (36 * 3 + 4 * 1_200));
}

fn spare_files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("spare."))
        .collect();
    names.sort();
    names
}

#[test]
fn rolls_rename_the_prepared_spare_and_the_next_sync_covers_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let io = FaultyIo::new(u32::MAX, u32::MAX);
    let dir_syncs = io.dir_syncs.clone();
    let (p, _) = Partition::open(dir.path(), small_config(), io, TimestampMs(0)).unwrap();
    let p = std::cell::RefCell::new(p);
    let prepare = || futures_lite::future::block_on(prepare_spare_shared(&p));
    assert!(!prepare(), "nothing asked for a spare yet");
    // 64 KiB segments: three 12 KB batches pass half of the first one.
    let b = |i: usize| batch(&format!("s{i}"), 4, 3_000, 1_000 + i as i64);
    let mut expect = Vec::new();
    let stamped = |i: usize, at: Offset| {
        let mut x = b(i);
        ringbus::batch::stamp_base_offset(&mut x, at);
        (at, x)
    };
    for i in 0..3 {
        let a = append(&mut p.borrow_mut(), &b(i));
        expect.push(stamped(i, a.base_offset));
    }
    assert!(prepare(), "a half-full segment asks for a spare");
    assert_eq!(
        spare_files(dir.path()),
        ["spare.index", "spare.log", "spare.timeindex"]
    );
    assert!(!prepare(), "one spare at a time");
    p.borrow_mut().flush_blocking().unwrap();
    let before = dir_syncs.get();
    // Fill the segment: the roll takes the spare.
    for i in 3..8 {
        let a = append(&mut p.borrow_mut(), &b(i));
        expect.push(stamped(i, a.base_offset));
    }
    assert_eq!(p.borrow().segment_count(), 2);
    assert!(spare_files(dir.path()).is_empty(), "the spare was renamed");
    let second = p.borrow().segment_bases()[1];
    assert!(ringbus::storage::segment::log_path(dir.path(), second).exists());
    p.borrow_mut().flush_blocking().unwrap();
    assert_eq!(
        dir_syncs.get(),
        before + 1,
        "the sync after the roll syncs the directory"
    );
    p.borrow_mut().flush_blocking().unwrap();
    assert_eq!(dir_syncs.get(), before + 1, "and only that one");
    assert!(batches(&p.borrow()) == expect, "every batch reads back");
    // A spare left behind (a stop or crash after it was made) holds no data:
    // reopening removes it and recovers everything.
    for _ in 8..10 {
        append(&mut p.borrow_mut(), &b(9));
    }
    assert!(prepare());
    p.borrow_mut().flush_blocking().unwrap();
    let n = p.borrow().next_offset();
    drop(p);
    assert_eq!(spare_files(dir.path()).len(), 3);
    let (q, rep) = open(dir.path(), small_config());
    assert!(spare_files(dir.path()).is_empty());
    assert_eq!(rep.removed_files.len(), 3, "{:?}", rep.removed_files);
    assert_eq!(q.next_offset(), n);
    assert!(
        batches(&q)[..expect.len()] == expect[..],
        "and after reopening"
    );
}

fn fence_case(writes: u32, syncs: u32, op: &str) {
    let dir = tempfile::tempdir().unwrap();
    let io = FaultyIo::new(writes, syncs);
    let (mut p, _) = Partition::open(dir.path(), small_config(), io, TimestampMs(0)).unwrap();
    append(&mut p, &batch("ok", 1, 10, 0));
    p.flush_blocking().unwrap();
    let a = append(&mut p, &batch("lost", 1, 10, 0));
    let mut wait = Box::pin(p.wait_for(a.last_offset, Durability::Fsync));
    let e = p.flush_blocking().unwrap_err();
    assert!(matches!(e, StorageError::Fenced { .. }), "{e}");
    assert!(e.to_string().contains(op), "{e}");
    // Waiters learn about the failure; the partition refuses writes until reopened.
    let r = futures_lite::future::block_on(futures_lite::future::poll_once(&mut wait));
    assert!(matches!(r, Some(Err(_))), "waiter not failed");
    assert!(matches!(
        p.append(&batch("x", 1, 1, 0), Instant::now(), TimestampMs(0)),
        Err(StorageError::Fenced { .. })
    ));
    assert!(matches!(
        p.flush_blocking(),
        Err(StorageError::Fenced { .. })
    ));
    assert!(p.is_fenced());
    drop(p);
    let (mut p, _) = open(dir.path(), small_config());
    assert_eq!(read_all(&p, Offset(0)).len() as u64, p.next_offset().0);
    assert!(p.next_offset() >= Offset(1));
    append(&mut p, &batch("after", 1, 10, 0));
    p.flush_blocking().unwrap();
}

#[test]
fn failed_write_fences_the_partition() {
    fence_case(1, u32::MAX, "write");
}

#[test]
fn failed_fsync_fences_the_partition_and_is_never_retried() {
    fence_case(u32::MAX, 1, "fdatasync");
}

#[test]
fn out_of_order_job_completion_publishes_only_a_prefix() {
    use ringbus::storage::FlushScope;
    let dir = tempfile::tempdir().unwrap();
    let cfg = PartitionConfig {
        segment_bytes: 16 << 20,
        flush_bytes: 1 << 20,
        ..PartitionConfig::default()
    };
    let (mut p, _) = open(dir.path(), cfg);
    let io = *p.io();
    // ~1.5 MiB pending: the first job takes only the full 1 MiB chunk.
    for i in 0..3 {
        append(&mut p, &batch(&format!("a{i}"), 500, 1000, 1_000));
    }
    let mut first = p.begin_flush(FlushScope::Due).expect("first job");
    for i in 3..6 {
        append(&mut p, &batch(&format!("b{i}"), 500, 1000, 1_000));
    }
    let mut second = p
        .begin_flush(FlushScope::Due)
        .expect("second job runs beside the first");
    // A third job would have to take the partial block: it waits for nothing here,
    // but once it is in flight no further job may start.
    append(&mut p, &batch("c", 10, 10, 1_000));
    let mut third = p.begin_flush(FlushScope::All).expect("third job");
    append(&mut p, &batch("d", 10, 10, 1_000));
    assert!(
        p.begin_flush(FlushScope::All).is_none(),
        "a job started while a carried block was in flight"
    );

    let r = futures_lite::future::block_on(second.write(&io));
    p.complete_write(&second, r).unwrap();
    assert_eq!(
        p.written_offset(),
        Offset(0),
        "published past an unfinished earlier job"
    );
    let r = futures_lite::future::block_on(third.write(&io));
    p.complete_write(&third, r).unwrap();
    assert_eq!(p.written_offset(), Offset(0));
    let r = futures_lite::future::block_on(first.write(&io));
    p.complete_write(&first, r).unwrap();
    assert_eq!(
        p.written_offset(),
        Offset(3010),
        "all three jobs published once the first finished"
    );
    p.flush_blocking().unwrap();
    assert_eq!(p.durable_offset(), Offset(3020));
    let all = read_all(&p, Offset(0));
    assert_eq!(all.len(), 3020);
    drop(p);
    let (p, rep) = open(dir.path(), small_config());
    assert_eq!(rep.truncated_bytes, 0);
    assert_eq!(read_all(&p, Offset(0)).len(), 3020);
}

/// Regression: a job still in flight when another fails used to panic on
/// completion ("not in flight") instead of reporting the fence.
#[test]
fn jobs_finishing_after_a_fence_report_it_without_panicking() {
    use ringbus::storage::FlushScope;
    let dir = tempfile::tempdir().unwrap();
    let cfg = PartitionConfig {
        segment_bytes: 16 << 20,
        ..PartitionConfig::default()
    };
    let (mut p, _) = open(dir.path(), cfg);
    let io = *p.io();
    for i in 0..3 {
        append(&mut p, &batch(&format!("a{i}"), 500, 1000, 1_000));
    }
    let mut first = p.begin_flush(FlushScope::Due).unwrap();
    let r = futures_lite::future::block_on(first.write(&io));
    p.complete_write(&first, r).unwrap();
    let sync = p.begin_sync().expect("written bytes to sync");
    for i in 3..6 {
        append(&mut p, &batch(&format!("b{i}"), 500, 1000, 1_000));
    }
    let second = p.begin_flush(FlushScope::Due).unwrap();
    let third = p.begin_flush(FlushScope::Due).unwrap();
    let e = p
        .complete_write(&second, Err(std::io::Error::other("EIO")))
        .unwrap_err();
    assert!(matches!(e, StorageError::Fenced { .. }));
    assert!(matches!(
        p.complete_write(&third, Ok(())),
        Err(StorageError::Fenced { .. })
    ));
    assert!(matches!(
        p.complete_sync(&sync, Ok(())),
        Err(StorageError::Fenced { .. })
    ));
    assert!(p.begin_flush(FlushScope::All).is_none());
    assert!(p.begin_sync().is_none());
}

/// The flush delay coalesces writes nobody waits on; a producer waiting for fsync
/// is written at once, since its sync cannot start before the write.
#[test]
fn fsync_waiters_skip_the_flush_delay() {
    use ringbus::storage::FlushDue;
    let dir = tempfile::tempdir().unwrap();
    let cfg = PartitionConfig {
        flush_delay_us: 10_000_000,
        ..PartitionConfig::default()
    };
    let (mut p, _) = open(dir.path(), cfg);
    let now = Instant::now();
    let last = append(&mut p, &batch("a", 10, 100, 1_000)).last_offset;
    assert!(
        matches!(p.flush_due(now), FlushDue::At(at) if at > now),
        "nobody waits: the delay applies"
    );
    let mut memory = Box::pin(p.wait_for(last, Durability::Memory));
    assert!(futures_lite::future::block_on(futures_lite::future::poll_once(&mut memory)).is_none());
    assert!(
        matches!(p.flush_due(now), FlushDue::At(_)),
        "a memory waiter still coalesces"
    );
    let mut fsync = Box::pin(p.wait_for(last, Durability::Fsync));
    assert!(futures_lite::future::block_on(futures_lite::future::poll_once(&mut fsync)).is_none());
    assert_eq!(
        p.flush_due(now),
        FlushDue::Now,
        "an fsync waiter is written at once"
    );
    // A large partial chunk waits for the delay even then: the next batch of a
    // streaming producer is likely to fill it.
    let big = append(&mut p, &batch("b", 300, 1_000, 1_000)).last_offset;
    assert!(p.pending_bytes() >= p.config().flush_bytes / 4);
    assert!(p.pending_bytes() < p.config().flush_bytes);
    let mut fsync_big = Box::pin(p.wait_for(big, Durability::Fsync));
    assert!(
        futures_lite::future::block_on(futures_lite::future::poll_once(&mut fsync_big)).is_none()
    );
    assert!(
        matches!(p.flush_due(now), FlushDue::At(_)),
        "a large partial chunk waits"
    );
    drop((fsync, fsync_big));
    assert!(matches!(p.flush_due(now), FlushDue::At(_)));
    p.flush_blocking().unwrap();
    assert!(futures_lite::future::block_on(futures_lite::future::poll_once(&mut memory)).is_some());
}

/// A partial chunk is held back while I/O is in flight: writing it would carry its
/// last block and stall every later job (40% of jobs were such carries under load).
#[test]
fn partial_chunks_wait_while_io_is_in_flight() {
    use ringbus::storage::{FlushDue, FlushScope};
    let dir = tempfile::tempdir().unwrap();
    let cfg = PartitionConfig {
        segment_bytes: 16 << 20,
        flush_delay_us: 0,
        ..PartitionConfig::default()
    };
    let (mut p, _) = open(dir.path(), cfg);
    let io = *p.io();
    let later = Instant::now() + std::time::Duration::from_millis(10);
    for i in 0..3 {
        append(&mut p, &batch(&format!("a{i}"), 500, 1000, 1_000));
    }
    let mut job = p.begin_flush(FlushScope::Due).expect("full chunk");
    assert!(p.pending_bytes() > 0 && p.pending_bytes() < p.config().flush_bytes);
    assert_eq!(
        p.flush_due(later),
        FlushDue::Idle,
        "partial chunk must wait for the write in flight"
    );
    let r = futures_lite::future::block_on(job.write(&io));
    p.complete_write(&job, r).unwrap();
    let sync = p.begin_sync().unwrap();
    // A background sync (nobody waiting) does not hold the chunk back ...
    assert_eq!(p.flush_due(later), FlushDue::Now);
    // ... one that fsync producers wait for does: their acks bring more data.
    let mut waiter = Box::pin(p.wait_for(Offset(1499), Durability::Fsync));
    assert!(futures_lite::future::block_on(futures_lite::future::poll_once(&mut waiter)).is_none());
    assert_eq!(
        p.flush_due(later),
        FlushDue::Idle,
        "partial chunk must wait for the sync in flight"
    );
    let r = futures_lite::future::block_on(sync.run(&io));
    p.complete_sync(&sync, r).unwrap();
    assert_eq!(p.flush_due(later), FlushDue::Now, "due once the I/O landed");
    p.flush_blocking().unwrap();
    assert_eq!(p.durable_offset(), Offset(1500));
    assert_eq!(
        p.flush_stats(),
        ringbus::storage::FlushStats {
            jobs: 2,
            carries: 1,
            durable: 1
        },
        "two jobs: the full chunk, then the partial one that carried its block, \
         written durable for the fsync waiter"
    );
}

/// A partition on `io` holding one small batch, synced: durable jobs need a sync
/// since open.
fn open_synced(dir: &std::path::Path, io: &FaultyIo) -> Partition<FaultyIo> {
    open_synced_with(dir, io, small_config())
}

fn open_synced_with(
    dir: &std::path::Path,
    io: &FaultyIo,
    config: PartitionConfig,
) -> Partition<FaultyIo> {
    let (mut p, _) = Partition::open(dir, config, io.clone(), TimestampMs(0)).unwrap();
    append(&mut p, &batch("s0", 1, 100, 1_000));
    p.flush_blocking().unwrap();
    p
}

fn poll<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
    futures_lite::future::block_on(futures_lite::future::poll_once(f))
}

/// A producer waiting for fsync, with everything before its data durable and no
/// I/O in flight, gets one durable write (O_DSYNC on io_uring) that acknowledges
/// it, and no fdatasync.
#[test]
fn fsync_waiters_get_a_durable_write_instead_of_a_sync() {
    use ringbus::storage::FlushScope;
    let dir = tempfile::tempdir().unwrap();
    let io = FaultyIo::new(u32::MAX, u32::MAX);
    let (syncs, durable_writes) = (io.syncs.clone(), io.durable_writes.clone());
    let writes = io.writes.clone();
    let (mut p, _) =
        Partition::open(dir.path(), small_config(), io.clone(), TimestampMs(0)).unwrap();
    // The first fsync after open is a real sync: recovered bytes may be in the
    // device's cache, which a FUA write would not flush.
    append(&mut p, &batch("r0", 3, 1_000, 1_000));
    let mut waiter = Box::pin(p.wait_for(Offset(2), Durability::Fsync));
    assert!(poll(&mut waiter).is_none());
    let mut job = p.begin_flush(FlushScope::Due).expect("pending bytes");
    assert!(!job.is_durable(), "no sync since open");
    let r = futures_lite::future::block_on(job.write(&io));
    p.complete_write(&job, r).unwrap();
    p.flush_blocking().unwrap();
    assert!(matches!(poll(&mut waiter), Some(Ok(_))));
    assert_eq!(syncs.get(), 1);
    append(&mut p, &batch("d0", 3, 1_000, 1_000));
    let mut waiter = Box::pin(p.wait_for(Offset(5), Durability::Fsync));
    assert!(poll(&mut waiter).is_none());
    let mut job = p.begin_flush(FlushScope::Due).expect("pending bytes");
    assert!(job.is_durable());
    let plain_writes = writes.borrow().len();
    assert!(
        p.begin_flush(FlushScope::All).is_none(),
        "nothing starts while a durable job runs"
    );
    let r = futures_lite::future::block_on(job.write(&io));
    p.complete_write(&job, r).unwrap();
    assert_eq!(p.durable_offset(), Offset(6));
    assert!(matches!(poll(&mut waiter), Some(Ok(_))));
    assert!(p.begin_sync().is_none(), "nothing left to sync");
    assert_eq!(syncs.get(), 1, "no fdatasync for the durable job");
    // Two: the block the plain job carried has a chunk of its own.
    assert_eq!(durable_writes.borrow().len(), 2);
    assert_eq!(writes.borrow().len(), plain_writes, "no plain write");
    // The data is there after a reopen.
    drop(p);
    let (p, _) = open(dir.path(), small_config());
    assert_eq!(read_all(&p, Offset(0)).len(), 6);
}

/// A durable write makes only its own blocks durable on a device with FUA, so it
/// is never used while written bytes are not yet synced or other I/O is in flight.
#[test]
fn durable_writes_only_follow_durable_data() {
    use ringbus::storage::FlushScope;
    let dir = tempfile::tempdir().unwrap();
    let io = FaultyIo::new(u32::MAX, u32::MAX);
    let (mut p, _) =
        Partition::open(dir.path(), big_segments(), io.clone(), TimestampMs(0)).unwrap();
    // Written, not synced (a memory producer's data).
    append(&mut p, &batch("m0", 3, 1_000, 1_000));
    let mut job = p.begin_flush(FlushScope::All).unwrap();
    assert!(!job.is_durable(), "nobody waits for durability");
    let r = futures_lite::future::block_on(job.write(&io));
    p.complete_write(&job, r).unwrap();
    assert_eq!(
        (p.written_offset(), p.durable_offset()),
        (Offset(3), Offset(0))
    );
    append(&mut p, &batch("f0", 3, 1_000, 1_000));
    let mut waiter = Box::pin(p.wait_for(Offset(5), Durability::Fsync));
    assert!(poll(&mut waiter).is_none());
    let mut job = p.begin_flush(FlushScope::All).unwrap();
    assert!(
        !job.is_durable(),
        "earlier written bytes are not durable yet"
    );
    let r = futures_lite::future::block_on(job.write(&io));
    p.complete_write(&job, r).unwrap();
    assert!(
        poll(&mut waiter).is_none(),
        "a write alone acknowledges no fsync"
    );
    let sync = p.begin_sync().unwrap();
    let r = futures_lite::future::block_on(sync.run(&io));
    p.complete_sync(&sync, r).unwrap();
    assert!(matches!(poll(&mut waiter), Some(Ok(_))));
    // Now durable up to the end: a new fsync producer gets a durable job, but not
    // while a plain job is still in flight.
    append(&mut p, &batch("f1", 1_200, 1_000, 1_000));
    let plain = p.begin_flush(FlushScope::Due).unwrap();
    assert!(!plain.is_durable(), "nobody waits yet");
    let mut waiter = Box::pin(p.wait_for(Offset(p.next_offset().0 - 1), Durability::Fsync));
    assert!(poll(&mut waiter).is_none());
    let next = p
        .begin_flush(FlushScope::All)
        .expect("a second job may stream");
    assert!(!next.is_durable(), "another job is in flight");
}

/// A durable write that fails fences the partition and fails its waiters.
#[test]
fn failed_durable_write_fences_the_partition() {
    use ringbus::storage::FlushScope;
    let dir = tempfile::tempdir().unwrap();
    let io = FaultyIo::new(1, u32::MAX);
    let mut p = open_synced(dir.path(), &io);
    append(&mut p, &batch("d0", 3, 1_000, 1_000));
    let mut waiter = Box::pin(p.wait_for(Offset(3), Durability::Fsync));
    assert!(poll(&mut waiter).is_none());
    let mut job = p.begin_flush(FlushScope::Due).unwrap();
    assert!(job.is_durable());
    let r = futures_lite::future::block_on(job.write(&io));
    assert!(r.is_err());
    assert!(matches!(
        p.complete_write(&job, r),
        Err(StorageError::Fenced { .. })
    ));
    assert!(matches!(poll(&mut waiter), Some(Err(_))));
    assert_eq!(p.durable_offset(), Offset(1));
}

/// Back-to-back durable jobs write each carried block together with the new bytes
/// after it: one write, so one device flush, per job.
#[test]
fn durable_jobs_write_their_carried_block_in_the_same_write() {
    let dir = tempfile::tempdir().unwrap();
    let io = FaultyIo::new(u32::MAX, u32::MAX);
    let (writes, durable_writes) = (io.writes.clone(), io.durable_writes.clone());
    let p = open_synced(dir.path(), &io);
    writes.borrow_mut().clear();
    let p = std::cell::RefCell::new(p);
    for i in 0..10 {
        let last = {
            let mut p = p.borrow_mut();
            append(&mut p, &batch(&format!("c{i}"), 3, 1_000, 1_000));
            Offset(p.next_offset().0 - 1)
        };
        let mut waiter = Box::pin(p.borrow().wait_for(last, Durability::Fsync));
        assert!(poll(&mut waiter).is_none());
        let job = p
            .borrow_mut()
            .begin_flush(ringbus::storage::FlushScope::Due)
            .unwrap();
        assert!(job.is_durable());
        futures_lite::future::block_on(ringbus::storage::partition::run_write_shared(&p, job))
            .unwrap();
        assert!(matches!(poll(&mut waiter), Some(Ok(_))));
    }
    let dw = durable_writes.borrow();
    assert_eq!(dw.len(), 10, "one write per job: {dw:?}");
    for pair in dw.windows(2) {
        let (prev_end, (pos, _)) = (pair[0].0 + pair[0].1 as u64, pair[1]);
        assert_eq!(
            pos,
            prev_end - 4096,
            "each starts at the block the last one carried"
        );
    }
    assert!(
        writes.borrow().is_empty(),
        "no plain writes: {:?}",
        writes.borrow()
    );
    assert_eq!(p.borrow().flush_stats().durable, 10);
}

/// A backlog of fsync data larger than `flush_bytes` (producers got ahead while a
/// slow write ran) still goes out as one durable job when it fits
/// `DURABLE_JOB_CHUNKS_MAX` chunks, all written at once; it used to fall back to
/// plain writes and an fdatasync, which take twice as long and let the backlog
/// grow again. A larger backlog streams through plain jobs as before.
#[test]
fn a_backlog_within_the_durable_job_limit_goes_out_durable() {
    use ringbus::storage::FlushScope;
    let dir = tempfile::tempdir().unwrap();
    let io = FaultyIo::new(u32::MAX, u32::MAX);
    let mut p = open_synced_with(dir.path(), &io, big_segments());
    let syncs_before = io.syncs.get();
    io.writes.borrow_mut().clear();
    // About 2.5 MiB: more than flush_bytes (1 MiB), within 4 staging chunks.
    for i in 0..5 {
        append(&mut p, &batch(&format!("b{i}"), 500, 1_000, 1_000));
    }
    assert!(p.pending_bytes() > PartitionConfig::default().flush_bytes);
    let last = Offset(p.next_offset().0 - 1);
    let mut waiter = Box::pin(p.wait_for(last, Durability::Fsync));
    assert!(poll(&mut waiter).is_none());
    let mut job = p.begin_flush(FlushScope::Due).expect("pending bytes");
    assert!(job.is_durable(), "the whole backlog is one durable job");
    assert_eq!(p.pending_bytes(), 0, "it took everything");
    let r = futures_lite::future::block_on(job.write(&io));
    p.complete_write(&job, r).unwrap();
    assert!(matches!(poll(&mut waiter), Some(Ok(_))));
    assert_eq!(p.durable_offset(), p.next_offset());
    assert_eq!(io.syncs.get(), syncs_before, "no fdatasync");
    assert!(io.writes.borrow().is_empty(), "no plain write");
    assert!(io.durable_writes.borrow().len() >= 3, "one write per chunk");
    // Over the limit (about 5 MiB pending): plain jobs stream, a sync acknowledges.
    for i in 0..10 {
        append(&mut p, &batch(&format!("c{i}"), 500, 1_000, 1_000));
    }
    let last = Offset(p.next_offset().0 - 1);
    let mut waiter = Box::pin(p.wait_for(last, Durability::Fsync));
    assert!(poll(&mut waiter).is_none());
    let job = p.begin_flush(FlushScope::Due).expect("pending bytes");
    assert!(!job.is_durable(), "too large for one durable job");
    drop(job);
    drop(p);
    let (p, _) = open(dir.path(), big_segments());
    assert!(
        read_all(&p, Offset(0)).len() >= 2_501,
        "the durable backlog is there"
    );
}

fn big_segments() -> PartitionConfig {
    PartitionConfig {
        segment_bytes: 16 << 20,
        ..PartitionConfig::default()
    }
}

/// A write that fails while earlier written bytes are not yet synced fences the
/// partition, and group commit then ends with the fence instead of retrying a sync
/// that can never start (it used to spin on the shard's thread for good).
#[test]
fn group_commit_ends_on_a_fence_with_unsynced_bytes() {
    use ringbus::storage::uring::group_commit;
    use ringbus::storage::watermark::Watermark;
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .make()
            .unwrap();
        ex.run(async move {
            let dir = tempfile::tempdir().unwrap();
            let cfg = PartitionConfig {
                flush_delay_us: 0,
                ..small_config()
            };
            let (p, _) =
                Partition::open(dir.path(), cfg, FaultyIo::new(1, u32::MAX), TimestampMs(0))
                    .unwrap();
            let p = Rc::new(std::cell::RefCell::new(p));
            let driver = glommio::spawn_local(group_commit(p.clone(), Watermark::new(0)));
            let first = append(&mut p.borrow_mut(), &batch("w0", 3, 1_000, 1_000));
            let written = p.borrow().wait_for(first.last_offset, Durability::Memory);
            written.await.unwrap();
            assert_eq!(p.borrow().durable_offset(), Offset(0), "not synced yet");
            let second = append(&mut p.borrow_mut(), &batch("w1", 3, 1_000, 1_000));
            let failed = p.borrow().wait_for(second.last_offset, Durability::Memory);
            assert!(failed.await.is_err(), "the second write fails");
            let ended = driver.await;
            done_tx.send(format!("{ended:?}")).unwrap();
        });
    });
    let ended = done_rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("group commit did not end after the fence");
    assert!(ended.contains("Fenced"), "{ended}");
}

/// A durable job is a sync: a segment sealed while it ran is cut to length when it
/// completes, as after a sync job, not left at its preallocated size.
#[test]
fn a_durable_job_trims_the_segment_sealed_while_it_ran() {
    use ringbus::storage::partition::run_write_shared;
    let dir = tempfile::tempdir().unwrap();
    let io = FaultyIo::new(u32::MAX, u32::MAX);
    let mut p = open_synced(dir.path(), &io);
    let last = append(&mut p, &batch("d0", 3, 1_000, 1_000)).last_offset;
    let mut waiter = Box::pin(p.wait_for(last, Durability::Fsync));
    assert!(poll(&mut waiter).is_none());
    let job = p.begin_flush(ringbus::storage::FlushScope::Due).unwrap();
    assert!(job.is_durable());
    p.roll(TimestampMs(0)).unwrap();
    let log = dir.path().join(format!("{:020}.log", 0));
    let preallocated = std::fs::metadata(&log).unwrap().len();
    assert_eq!(preallocated, small_config().segment_bytes);
    let p = std::cell::RefCell::new(p);
    futures_lite::future::block_on(run_write_shared(&p, job)).unwrap();
    assert!(matches!(poll(&mut waiter), Some(Ok(_))));
    let len = std::fs::metadata(&log).unwrap().len();
    assert!(len < preallocated, "sealed segment still {len} bytes");
    drop(p);
    let (p, _) = open(dir.path(), small_config());
    assert_eq!(read_all(&p, Offset(0)).len(), 4);
}

#[test]
fn timestamp_lookup_finds_the_first_later_batch_inside_one_segment() {
    let dir = tempfile::tempdir().unwrap();
    let (mut p, _) = open(dir.path(), small_config());
    // 40 one-record batches a second apart, in one 64 KiB segment, so the lookup
    // starts from a time-index entry and stops partway through the segment.
    for t in 0..40i64 {
        append(&mut p, &batch("k", 1, 200, 1_000 + t * 1_000));
    }
    p.flush_blocking().unwrap();
    assert_eq!(p.segment_count(), 1);
    for (ts, want) in [
        (0, Some(0)),
        (1_000, Some(0)),
        (1_001, Some(1)),
        (20_500, Some(20)),
        (40_000, Some(39)),
        (40_001, None),
    ] {
        assert_eq!(
            p.offset_for_timestamp(TimestampMs(ts)).unwrap(),
            want.map(Offset),
            "lookup of {ts}"
        );
    }
}

#[test]
fn a_scan_told_to_stop_ends_right_after_that_batch() {
    use ringbus::storage::segment::{log_path, scan, scan_while, ScanStop};
    use std::ops::ControlFlow;
    let dir = tempfile::tempdir().unwrap();
    let (mut p, _) = open(dir.path(), small_config());
    for t in 0..12i64 {
        append(&mut p, &batch("s", 2, 150, t));
    }
    p.flush_blocking().unwrap();
    let log = std::fs::read(log_path(dir.path(), Offset(0))).unwrap();
    let mut ends = Vec::new();
    let whole = scan(&log, 0, None, |b| ends.push(b.position + u64::from(b.len)));
    assert_eq!((ends.len(), whole.stop), (12, ScanStop::Zeros));
    let mut calls = 0;
    let part = scan_while(&log, 0, None, |b| {
        calls += 1;
        if b.base_offset == Offset(8) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    // Two records per batch: offset 8 starts the fifth, and nothing after it is read.
    assert_eq!(calls, 5);
    assert_eq!(
        (part.batches, part.stop, part.end, part.next_offset),
        (5, ScanStop::Stopped, ends[4], Some(Offset(10)))
    );
}

/// A log under size retention, driven the way the broker's group-commit driver
/// does it (retention after each roll, then the spare).
struct RecyclingLog {
    p: Partition<StdIo>,
    /// The batches it holds, as appended.
    model: Vec<(Offset, Vec<u8>)>,
    /// Inodes of the log files retention expired.
    expired: Vec<u64>,
    total: ringbus::storage::partition::RetentionReport,
}

fn recycling_log(dir: &std::path::Path, n: usize) -> RecyclingLog {
    use std::os::unix::fs::MetadataExt;
    let cfg = PartitionConfig {
        retention_bytes: Some(160 * 1024),
        ..small_config()
    };
    let (p, _) = open(dir, cfg);
    let p = std::cell::RefCell::new(p);
    let mut model = Vec::new();
    let mut expired = Vec::new();
    let mut total = ringbus::storage::partition::RetentionReport::default();
    for i in 0..n {
        // Different sizes, so a recycled file's old batch boundaries do not line
        // up with the new ones.
        let b = batch(&format!("c{i}"), 1 + i % 5, 700 + (i * 37) % 2_000, 1_000);
        let segments = p.borrow().segment_count();
        let a = append(&mut p.borrow_mut(), &b);
        let mut stamped = b.clone();
        ringbus::batch::stamp_base_offset(&mut stamped, a.base_offset);
        model.push((a.base_offset, stamped));
        p.borrow_mut().flush_blocking().unwrap();
        if p.borrow().segment_count() != segments {
            let inodes: Vec<(Offset, u64)> = p
                .borrow()
                .segment_bases()
                .iter()
                .map(|&b| {
                    let log = ringbus::storage::segment::log_path(dir, b);
                    (b, std::fs::metadata(log).unwrap().ino())
                })
                .collect();
            let r = futures_lite::future::block_on(apply_retention_shared(&p, TimestampMs(1_000)))
                .unwrap();
            let start = p.borrow().log_start();
            expired.extend(inodes.iter().filter(|(b, _)| *b < start).map(|(_, i)| *i));
            total.segments_deleted += r.segments_deleted;
            total.segments_recycled += r.segments_recycled;
        }
        futures_lite::future::block_on(prepare_spare_shared(&p));
    }
    let p = p.into_inner();
    model.retain(|(o, _)| *o >= p.log_start());
    RecyclingLog {
        p,
        model,
        expired,
        total,
    }
}

#[test]
fn retention_recycles_expired_segments_and_their_old_batches_never_read_back() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let RecyclingLog {
        p,
        model,
        expired,
        total,
    } = recycling_log(dir.path(), 400);
    assert!(total.segments_deleted >= 5, "{total:?}");
    assert!(
        total.segments_recycled >= total.segments_deleted / 2,
        "most expired segments should become spares: {total:?}"
    );
    // Later segments live in files that held earlier ones.
    let reused = p
        .segment_bases()
        .iter()
        .filter(|&&b| {
            let log = ringbus::storage::segment::log_path(dir.path(), b);
            expired.contains(&std::fs::metadata(log).unwrap().ino())
        })
        .count();
    assert!(reused >= 1, "no segment lives in a recycled file");
    assert!(batches(&p) == model, "reads differ from what was appended");
    // Reopen (a restart, or a kill -9 after the flush): the active segment's file
    // still holds its earlier batches past the new ones; recovery cuts them as
    // such, reports no damage, and every batch reads back.
    let next = p.next_offset();
    drop(p);
    let cfg = PartitionConfig {
        retention_bytes: Some(160 * 1024),
        ..small_config()
    };
    let (mut q, rep) = open(dir.path(), cfg.clone());
    assert_eq!(rep.truncated_bytes, 0, "{rep:?}");
    assert!(rep.corruptions.is_empty(), "{rep:?}");
    assert_eq!(q.next_offset(), next);
    assert!(batches(&q) == model, "reads differ after reopening");
    // And appends go on from there, into the now cut file.
    let mut model = model;
    for i in 0..30 {
        let b = batch(&format!("after{i}"), 2, 900, 1_000);
        let a = append(&mut q, &b);
        let mut stamped = b.clone();
        ringbus::batch::stamp_base_offset(&mut stamped, a.base_offset);
        model.push((a.base_offset, stamped));
    }
    q.flush_blocking().unwrap();
    drop(q);
    let (q, rep) = open(dir.path(), cfg);
    assert_eq!(rep.truncated_bytes, 0, "{rep:?}");
    assert!(rep.corruptions.is_empty(), "{rep:?}");
    let start = q.log_start();
    model.retain(|(o, _)| *o >= start);
    assert!(batches(&q) == model, "reads differ after the second reopen");
}

/// A log of `n` flushed 1 KB batches over 64 KiB segments, 100 KiB retained.
fn retained_log(dir: &std::path::Path, n: usize) -> Partition<StdIo> {
    let cfg = PartitionConfig {
        retention_bytes: Some(100 * 1024),
        ..small_config()
    };
    let (mut p, _) = open(dir, cfg);
    for i in 0..n {
        append(&mut p, &batch(&format!("r{i}"), 1, 1000, 1_000));
    }
    p.flush_blocking().unwrap();
    p
}

/// A file is reused only once no reader holds a slice of its map: the held bytes
/// of every expired segment stay as they were while new segments are written.
#[test]
fn held_reads_keep_expired_segments_from_being_recycled() {
    let dir = tempfile::tempdir().unwrap();
    let p = retained_log(dir.path(), 300);
    // Read through the maps, as a broker out of read buffers would.
    let held: Vec<_> = p
        .segment_bases()
        .iter()
        .map(|&b| p.read(b, 64 * 1024).unwrap())
        .collect();
    let copies: Vec<Vec<u8>> = held.iter().map(|f| f.chunks[0].to_vec()).collect();
    let cell = std::cell::RefCell::new(p);
    let r =
        futures_lite::future::block_on(apply_retention_shared(&cell, TimestampMs(1_000))).unwrap();
    assert!(r.segments_deleted >= 2, "{r:?}");
    assert_eq!(r.segments_recycled, 0, "a held segment was recycled");
    // Segments written from here on go to new files (or to spares made anew).
    for i in 0..200 {
        append(
            &mut cell.borrow_mut(),
            &batch(&format!("n{i}"), 1, 1000, 1_000),
        );
        futures_lite::future::block_on(prepare_spare_shared(&cell));
    }
    cell.borrow_mut().flush_blocking().unwrap();
    for (f, copy) in held.iter().zip(&copies) {
        assert!(f.chunks[0][..] == copy[..], "held bytes changed");
    }
    // Once the readers let go, the next expiry may recycle.
    drop(held);
    for i in 0..200 {
        append(
            &mut cell.borrow_mut(),
            &batch(&format!("m{i}"), 1, 1000, 1_000),
        );
    }
    cell.borrow_mut().flush_blocking().unwrap();
    let r =
        futures_lite::future::block_on(apply_retention_shared(&cell, TimestampMs(1_000))).unwrap();
    assert_eq!(r.segments_recycled, 1, "{r:?}");
}

/// A partition opened to replace a fenced one (the broker's reopen) never reuses
/// the files it found: readers may still hold slices of the old partition's maps
/// of them, which its own watches do not see. Once those files are gone, files of
/// segments it wrote itself are reused again.
#[test]
fn a_reopened_partition_removes_the_files_it_found_instead_of_reusing_them() {
    for keep in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut p = retained_log(dir.path(), 300);
        if keep {
            p.keep_old_files();
        }
        let cell = std::cell::RefCell::new(p);
        let retain =
            || futures_lite::future::block_on(apply_retention_shared(&cell, TimestampMs(1_000)));
        let r = retain().unwrap();
        assert!(r.segments_deleted >= 2, "{r:?}");
        assert_eq!(
            r.segments_recycled,
            usize::from(!keep),
            "keep {keep}: {r:?}"
        );
        if !keep {
            continue;
        }
        // Enough new segments that every file found at the reopen expires.
        let found = cell.borrow().segment_bases();
        for i in 0..600 {
            append(
                &mut cell.borrow_mut(),
                &batch(&format!("k{i}"), 1, 1000, 1_000),
            );
        }
        cell.borrow_mut().flush_blocking().unwrap();
        let r = retain().unwrap();
        assert!(cell.borrow().log_start() > *found.last().unwrap(), "{r:?}");
        let r = {
            for i in 0..200 {
                append(
                    &mut cell.borrow_mut(),
                    &batch(&format!("l{i}"), 1, 1000, 1_000),
                );
            }
            cell.borrow_mut().flush_blocking().unwrap();
            retain().unwrap()
        };
        assert_eq!(r.segments_recycled, 1, "{r:?}");
    }
}

/// A crash after a recycled segment was sealed and made durable but before its
/// file was cut to length leaves the file's earlier batches after the new ones.
/// Recovery must see that every offset up to the next segment is there and trim the
/// rest, not take it for an interrupted flush and drop the segments after it.
#[test]
fn a_recycled_segment_left_untrimmed_by_a_crash_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let RecyclingLog {
        p, model, total, ..
    } = recycling_log(dir.path(), 400);
    assert!(total.segments_recycled >= 1, "{total:?}");
    let bases = p.segment_bases();
    assert!(bases.len() >= 3, "{bases:?}");
    let next = p.next_offset();
    drop(p);
    // Untrim the first sealed segment the way the crash would leave it: its own
    // batches, then batches with offsets below its base (an earlier segment's),
    // up to the preallocated length.
    let log = ringbus::storage::segment::log_path(dir.path(), bases[0]);
    let mut bytes = std::fs::read(&log).unwrap();
    let mut old = batch("old", 3, 1_500, 1_000);
    ringbus::batch::stamp_base_offset(&mut old, Offset(0));
    let capacity = small_config().segment_bytes as usize;
    while bytes.len() + old.len() <= capacity {
        bytes.extend_from_slice(&old);
    }
    bytes.resize(capacity, 0x5a);
    std::fs::write(&log, &bytes).unwrap();
    let (q, rep) = open(dir.path(), small_config());
    assert!(rep.corruptions.is_empty(), "{rep:?}");
    assert!(rep.trimmed_bytes > 0, "{rep:?}");
    assert_eq!(q.segment_bases(), bases, "segments were dropped");
    assert_eq!(q.next_offset(), next);
    assert!(batches(&q) == model, "reads differ after recovery");
    assert!(std::fs::metadata(&log).unwrap().len() < capacity as u64);
}

fn log_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            let n = e.as_ref().unwrap().file_name();
            ringbus::storage::segment::parse_log_name(&n.to_string_lossy()).is_some()
        })
        .count()
}

/// Retention by size removes no file it could reuse: one expired file becomes the
/// spare, and the newest other expired segment waits for the next roll instead of
/// being unlinked (a written segment's discard stalls the device for tens of ms).
#[test]
fn size_retention_keeps_back_one_segment_it_cannot_reuse_yet() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = retained_log(dir.path(), 400);
    let before = p.segment_count();
    assert!(before >= 6, "{before}");
    // The spare's place is free: one expired file is reused, one expired segment
    // is kept back, the rest are removed.
    let r = p.apply_retention(TimestampMs(1_000)).unwrap();
    assert_eq!(r.segments_recycled, 1, "{r:?}");
    assert!(r.segments_deleted >= 2, "{r:?}");
    assert_eq!(p.segment_count(), before - r.segments_deleted);
    assert_eq!(log_files(dir.path()), p.segment_count());
    let bases = p.segment_bases();
    // The oldest one left is past the limit too (sealed, its file is its length).
    let oldest = std::fs::metadata(ringbus::storage::segment::log_path(dir.path(), bases[0]))
        .unwrap()
        .len();
    assert!(
        p.size_bytes() - oldest >= 100 * 1024,
        "nothing was kept back"
    );
    // The spare is taken: the kept-back segment stays however often retention runs.
    let again = p.apply_retention(TimestampMs(1_000)).unwrap();
    assert_eq!(again.segments_deleted, 0, "{again:?}");
    assert_eq!(p.segment_bases(), bases);
    // The next roll uses the spare; then the kept-back segment goes, as the spare.
    let segments = p.segment_count();
    let mut i = 0;
    while p.segment_count() == segments {
        append(&mut p, &batch(&format!("l{i}"), 1, 1000, 1_000));
        i += 1;
    }
    p.flush_blocking().unwrap();
    let r = p.apply_retention(TimestampMs(1_000)).unwrap();
    assert_eq!(r.segments_recycled, 1, "{r:?}");
    assert_eq!(log_files(dir.path()), p.segment_count());
    assert!(!p.segment_bases().contains(&bases[0]));
}

/// A sealed segment whose cut to length is still pending (it runs on a helper
/// thread after the sync that made the segment durable) is not expired until the
/// cut has run: recycled first, its file would be shortened under the next segment.
#[test]
fn retention_waits_for_a_sealed_segments_pending_cut() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = PartitionConfig {
        retention_ms: Some(1),
        ..small_config()
    };
    let (mut p, _) = open(dir.path(), cfg);
    let mut i = 0;
    while p.segment_count() < 3 {
        append(&mut p, &batch(&format!("s{i}"), 1, 1000, 1_000));
        i += 1;
    }
    p.flush_blocking().unwrap();
    // Seal the third segment, then write and sync it without running the cut.
    while p.segment_count() < 4 {
        append(&mut p, &batch(&format!("t{i}"), 1, 1000, 1_000));
        i += 1;
    }
    let io = StdIo::default();
    use futures_lite::future::block_on;
    while let Some(mut job) = p.begin_flush(ringbus::storage::FlushScope::All) {
        let r = block_on(job.write(&io));
        p.complete_write(&job, r).unwrap();
    }
    let sync = p.begin_sync().expect("unsynced bytes");
    let r = block_on(sync.run(&io));
    p.complete_sync(&sync, r).unwrap();
    let bases = p.segment_bases();
    let third = ringbus::storage::segment::log_path(dir.path(), bases[2]);
    let untrimmed = std::fs::metadata(&third).unwrap().len();
    assert_eq!(untrimmed, small_config().segment_bytes, "cut already ran");
    // Every sealed segment is past its age, but the third one's cut is pending.
    let far = TimestampMs(10_000_000);
    let r = p.apply_retention(far).unwrap();
    assert_eq!(r.segments_deleted, 2, "{r:?}");
    assert_eq!(p.segment_bases(), bases[2..]);
    assert_eq!(
        std::fs::metadata(&third).unwrap().len(),
        untrimmed,
        "the pending segment's file was touched"
    );
    // Once cut, it expires too.
    p.flush_blocking().unwrap();
    assert!(std::fs::metadata(&third).unwrap().len() < untrimmed);
    let r = p.apply_retention(far).unwrap();
    assert_eq!(r.segments_deleted, 1, "{r:?}");
    assert_eq!(p.segment_bases(), bases[3..]);
}

/// Recovery reports the bytes after a recycled segment's last batch as its
/// earlier contents only when they are: a batch of its own that starts where the
/// next one was expected but does not check out is a torn or damaged write, and
/// is reported as such.
#[test]
fn a_torn_write_in_a_recycled_segment_is_reported_as_damage() {
    let dir = tempfile::tempdir().unwrap();
    let RecyclingLog { p, model, .. } = recycling_log(dir.path(), 400);
    let active = *p.segment_bases().last().unwrap();
    let log = ringbus::storage::segment::log_path(dir.path(), active);
    assert!(
        ringbus::storage::segment::is_recycled(&log),
        "the active segment is not in a recycled file"
    );
    let next = p.next_offset();
    drop(p);
    let mut bytes = std::fs::read(&log).unwrap();
    let scanned = ringbus::storage::segment::scan(&bytes, 0, Some(active), |_| {});
    assert_eq!(scanned.next_offset, Some(next));
    let end = scanned.end;
    assert!(
        bytes[end as usize..].iter().any(|&b| b != 0),
        "nothing of the file's earlier contents is left after its batches"
    );
    // The next batch, written over the file's earlier contents and torn.
    let mut torn = batch("torn", 2, 1_200, 1_000);
    ringbus::batch::stamp_base_offset(&mut torn, next);
    let last = torn.len() - 1;
    torn[last] ^= 0xff;
    let at = end as usize;
    bytes[at..at + torn.len()].copy_from_slice(&torn);
    std::fs::write(&log, &bytes).unwrap();
    let cfg = PartitionConfig {
        retention_bytes: Some(160 * 1024),
        ..small_config()
    };
    let (q, rep) = open(dir.path(), cfg);
    assert!(rep.truncated_bytes > 0, "{rep:?}");
    assert_eq!(rep.recycled_bytes, 0, "{rep:?}");
    assert_eq!(rep.truncated_at.as_ref().map(|(_, at)| *at), Some(end));
    assert_eq!(q.next_offset(), next);
    assert!(batches(&q) == model, "reads differ after recovery");
}

/// `segdump` shows a recycled file's batches up to the last one in sequence and
/// labels what follows as the file's earlier contents, not as batches.
#[test]
fn segdump_stops_at_a_recycled_files_earlier_contents() {
    let dir = tempfile::tempdir().unwrap();
    let RecyclingLog { p, .. } = recycling_log(dir.path(), 400);
    let active = *p.segment_bases().last().unwrap();
    let log = ringbus::storage::segment::log_path(dir.path(), active);
    assert!(ringbus::storage::segment::is_recycled(&log));
    drop(p);
    let bytes = std::fs::read(&log).unwrap();
    let scanned = ringbus::storage::segment::scan(&bytes, 0, Some(active), |_| {});
    let text = ringbus::storage::dump::dump_segment(&log, false).unwrap();
    assert!(text.contains("recycled file"), "{text}");
    assert!(
        text.contains(&format!(
            "earlier contents of the recycled file from byte {}",
            scanned.end
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("\n{} batches\n", scanned.batches)),
        "{text}"
    );
    assert!(!text.contains("INVALID"), "{text}");
}

/// Makes a file immutable (`chattr +i`: even root cannot unlink it) until dropped.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn new(path: std::path::PathBuf) -> Immutable {
        let ok = std::process::Command::new("chattr")
            .arg("+i")
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "chattr +i {} failed (needs ext4 and e2fsprogs)",
            path.display()
        );
        Immutable(path)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

/// A retention pass that cannot remove an expired segment stops there, and the
/// next passes retry it before removing any newer segment: the directory never
/// holds an expired segment, a hole, then newer ones (which recovery would read
/// as a gap, or as an unfinished flush that drops every later segment).
#[test]
fn a_failed_retirement_is_retried_before_any_newer_segment_goes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut p, _) = open(dir.path(), small_config());
    for i in 0..300 {
        append(&mut p, &batch(&format!("a{i}"), 1, 1000, 1_000));
    }
    p.flush_blocking().unwrap();
    drop(p);
    let cfg = PartitionConfig {
        retention_bytes: Some(100 * 1024),
        ..small_config()
    };
    let (mut p, _) = open(dir.path(), cfg.clone());
    let first = p.segment_bases()[0];
    let log = ringbus::storage::segment::log_path(dir.path(), first);
    let stuck = Immutable::new(log.clone());
    let on_disk = || {
        let mut bases: Vec<Offset> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                name.strip_suffix(".log")?.parse().ok().map(Offset)
            })
            .collect();
        bases.sort();
        bases
    };
    assert!(p.apply_retention(TimestampMs(1_000)).is_err());
    let after_first = on_disk();
    assert_eq!(after_first[0], first);
    // More segments expire; every pass fails at the same file and removes nothing.
    for round in 0..3 {
        for i in 0..100 {
            append(&mut p, &batch(&format!("b{round}-{i}"), 1, 1000, 1_000));
        }
        p.flush_blocking().unwrap();
        assert!(p.apply_retention(TimestampMs(1_000)).is_err());
        let now = on_disk();
        assert!(
            after_first.iter().all(|b| now.contains(b)),
            "a newer segment went while an older expired one stayed: {after_first:?} -> {now:?}"
        );
    }
    let next = p.next_offset();
    // Once the file can go, the next pass retires the leftovers, oldest first.
    drop(stuck);
    let r = p.apply_retention(TimestampMs(1_000)).unwrap();
    assert!(!log.exists(), "the stuck segment was not retried");
    assert!(r.new_log_start > first, "{r:?}");
    let start = p.log_start();
    assert_eq!(on_disk()[0], start, "files older than the log start remain");
    drop(p);
    let (q, rep) = open(dir.path(), cfg);
    assert!(rep.corruptions.is_empty(), "{rep:?}");
    assert_eq!(rep.truncated_bytes, 0, "{rep:?}");
    assert_eq!((q.log_start(), q.next_offset()), (start, next));
    let got = read_all(&q, start);
    assert_eq!(got.len() as u64, next.0 - start.0);
    assert!(got.iter().zip(start.0..).all(|((o, _), want)| o.0 == want));
}

/// Blocks the segment file `path` holds on disk, in bytes.
fn reserved_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// A segment is its full length from the start but reserves its blocks in steps
/// ahead of the appends (a new partition holds 4 MiB of disk, not a segment), and
/// the driver's reservations double the reserved part as the appends come near it.
#[test]
fn segments_reserve_their_blocks_ahead_of_the_appends() {
    use ringbus::storage::partition::reserve_blocks_shared;
    const MIB: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let config = PartitionConfig {
        segment_bytes: 64 * MIB,
        ..PartitionConfig::default()
    };
    let (p, _) = open(dir.path(), config);
    let log = ringbus::storage::segment::log_path(dir.path(), Offset(0));
    assert_eq!(std::fs::metadata(&log).unwrap().len(), 64 * MIB);
    let first = reserved_bytes(&log);
    assert!(
        (4 * MIB..5 * MIB).contains(&first),
        "{first} bytes reserved"
    );
    let p = std::cell::RefCell::new(p);
    let reserve = || futures_lite::future::block_on(reserve_blocks_shared(&p));
    assert!(
        !reserve(),
        "nothing to reserve before the appends come near"
    );
    let mut appended = 0u64;
    let mut fill_to = |mib: u64| {
        while appended < mib * MIB {
            let b = batch(&format!("r{appended}"), 10, 10_000, 1_000);
            appended += b.len() as u64;
            append(&mut p.borrow_mut(), &b);
        }
    };
    // Half a step (2 MiB) from the end of the first 4 MiB: the next 4 MiB.
    fill_to(1);
    assert!(!reserve());
    fill_to(3);
    assert!(reserve());
    assert!(!reserve(), "one step at a time");
    assert!(reserved_bytes(&log) >= 8 * MIB);
    // Then 8 MiB more once the appends are 4 MiB from its end.
    fill_to(4);
    assert!(reserve());
    let reserved = reserved_bytes(&log);
    assert!((16 * MIB..17 * MIB).contains(&reserved), "{reserved}");
    let mut p = p.into_inner();
    p.flush_blocking().unwrap();
    let n = read_all(&p, Offset(0)).len();
    drop(p);
    // Recovery starts from what is written: the data, and the file's length.
    let (p, report) = open(
        dir.path(),
        PartitionConfig {
            segment_bytes: 64 * MIB,
            ..PartitionConfig::default()
        },
    );
    assert_eq!(report.truncated_bytes, 0);
    assert_eq!(read_all(&p, Offset(0)).len(), n);
    assert_eq!(std::fs::metadata(&log).unwrap().len(), 64 * MIB);
}
