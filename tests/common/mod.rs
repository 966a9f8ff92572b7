//! Helpers shared by the integration tests: building batches and reading a
//! partition back into plain values.
#![allow(dead_code)]

use ringbus::batch::{BatchBuilder, BatchRef, RecordInput};
use ringbus::storage::{Fetch, LogIo, Partition, PartitionConfig, StdIo};
use ringbus::{Offset, TimestampMs};
use std::time::Instant;

/// A batch whose record `j` has value `{tag}-{j}` padded to `value_len` bytes.
pub fn batch(tag: &str, records: usize, value_len: usize, ts: i64) -> Vec<u8> {
    let mut b = BatchBuilder::with_capacity(records * (value_len + 16));
    for j in 0..records {
        let mut v = format!("{tag}-{j}").into_bytes();
        v.resize(value_len.max(v.len()), b'.');
        b.push(RecordInput {
            timestamp: TimestampMs(ts),
            key: Some(tag.as_bytes()),
            value: Some(&v),
            headers: &[("h", Some(b"1"))],
        });
    }
    b.finish()
}

pub fn small_config() -> PartitionConfig {
    PartitionConfig {
        segment_bytes: 64 * 1024,
        ..PartitionConfig::default()
    }
}

pub fn open(
    dir: &std::path::Path,
    config: PartitionConfig,
) -> (Partition<StdIo>, ringbus::storage::RecoveryReport) {
    Partition::open(dir, config, StdIo::default(), TimestampMs(1_000)).expect("open partition")
}

pub fn append<B: LogIo>(p: &mut Partition<B>, bytes: &[u8]) -> ringbus::storage::Appended {
    p.append(bytes, Instant::now(), TimestampMs(1_000))
        .expect("append")
}

/// Every record value from `from` to the high watermark, with its offset.
pub fn read_all<B: LogIo>(p: &Partition<B>, from: Offset) -> Vec<(Offset, Vec<u8>)> {
    let mut out = Vec::new();
    let mut cur = from;
    loop {
        let f: Fetch = p.read(cur, 64 * 1024).expect("read");
        if f.chunks.is_empty() {
            assert_eq!(f.next_offset, f.high_watermark, "read stopped early");
            return out;
        }
        push_values(&f.chunks, from, &mut out);
        assert!(f.next_offset > cur, "no progress");
        cur = f.next_offset;
    }
}

/// Appends every record value at or after `from` in fetched `chunks`, with its
/// offset, checking each batch whole.
pub fn push_values(chunks: &[bytes::Bytes], from: Offset, out: &mut Vec<(Offset, Vec<u8>)>) {
    for chunk in chunks {
        let mut pos = 0;
        while pos < chunk.len() {
            let b = BatchRef::parse_full(&chunk[pos..]).expect("fetched batch valid");
            for r in b.records() {
                let r = r.expect("record");
                if r.offset >= from {
                    out.push((r.offset, r.value.unwrap_or_default().to_vec()));
                }
            }
            pos += b.len();
        }
    }
}

/// Offsets and raw bytes of every batch in the partition (for exact comparison).
pub fn batches<B: LogIo>(p: &Partition<B>) -> Vec<(Offset, Vec<u8>)> {
    let mut out = Vec::new();
    let mut cur = p.log_start();
    loop {
        let f = p.read(cur, 1).expect("read");
        if f.chunks.is_empty() {
            return out;
        }
        let chunk = &f.chunks[0];
        let b = BatchRef::parse(chunk).expect("valid");
        out.push((b.base_offset(), chunk[..b.len()].to_vec()));
        cur = b.last_offset().plus(1);
    }
}

/// A xorshift64 generator: reproducible pseudo-random numbers for tests, from `seed`
/// (non-zero).
pub fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}
