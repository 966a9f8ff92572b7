//! Shared by the criterion benches: the batches they append and validate, and the
//! log the read benches fetch from.

use ringbus::batch::{BatchBuilder, RecordInput};
use ringbus::storage::{Partition, StdIo};
use ringbus::TimestampMs;
use std::time::Instant;

/// A batch of `records` records of `value_len` bytes each, no keys or headers.
pub fn build(records: usize, value_len: usize) -> Vec<u8> {
    let value = vec![b'x'; value_len];
    let mut b = BatchBuilder::with_capacity(records * (value_len + 16));
    for i in 0..records {
        b.push(RecordInput {
            timestamp: TimestampMs(1_700_000_000_000 + i as i64),
            key: None,
            value: Some(&value),
            headers: &[],
        });
    }
    b.finish()
}

/// Appends copies of `batch` until the log holds at least `bytes`, flushing every
/// 16 MiB; returns the bytes appended.
#[allow(dead_code)] // not every bench reads a log
pub fn fill(p: &mut Partition<StdIo>, batch: &[u8], bytes: u64) -> u64 {
    let mut total = 0u64;
    while total < bytes {
        p.append(batch, Instant::now(), TimestampMs::now())
            .expect("append");
        total += batch.len() as u64;
        if total % (16 << 20) < batch.len() as u64 {
            p.flush_blocking().expect("flush");
        }
    }
    p.flush_blocking().expect("flush");
    total
}
