//! Shared by the criterion benches: the batches they append and validate.

use ringbus::batch::{BatchBuilder, RecordInput};
use ringbus::TimestampMs;

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
