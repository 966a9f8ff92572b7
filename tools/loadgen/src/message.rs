//! The loadgen's message format and the consumer-side verifier.
//!
//! Every value starts with a 24-byte little-endian header that the consumer checks:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | producer id |
//! | 4..8 | partition the producer sent it to |
//! | 8..16 | sequence number, per producer and partition, from 0 |
//! | 16..24 | send time, ns since the loadgen started (the intended time at a fixed rate) |
//!
//! The rest is filler. The batch CRC (set by the producer, checked by the consumer)
//! covers every byte end to end; the header catches a broker that serves the wrong
//! data with a valid CRC, loses messages or reorders them.

use ringbus::batch::BatchRef;
use std::collections::HashMap;

pub const HEADER_BYTES: usize = 24;

/// Writes the header into `value` (which must hold at least [`HEADER_BYTES`]).
pub fn write_header(value: &mut [u8], producer: u32, partition: u32, seq: u64, send_ns: u64) {
    value[0..4].copy_from_slice(&producer.to_le_bytes());
    value[4..8].copy_from_slice(&partition.to_le_bytes());
    value[8..16].copy_from_slice(&seq.to_le_bytes());
    value[16..24].copy_from_slice(&send_ns.to_le_bytes());
}

/// A value of `size` bytes with a zeroed header and a fixed filler pattern.
pub fn template(size: usize) -> Vec<u8> {
    (0..size.max(HEADER_BYTES))
        .map(|i| {
            if i < HEADER_BYTES {
                0
            } else {
                (i * 31 % 251) as u8
            }
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub producer: u32,
    pub partition: u32,
    pub seq: u64,
    pub send_ns: u64,
}

pub fn read_header(value: &[u8]) -> Option<Header> {
    let h = value.get(..HEADER_BYTES)?;
    let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
    Some(Header {
        producer: u32_at(0),
        partition: u32_at(4),
        seq: u64_at(8),
        send_ns: u64_at(16),
    })
}

/// Checks one partition's stream: contiguous offsets, every batch's CRC, the value
/// size, the partition, and per producer a sequence that rises by exactly one.
#[derive(Debug)]
pub struct Verifier {
    partition: u32,
    message_size: usize,
    next_offset: u64,
    next_seq: HashMap<u32, u64>,
    pub records: u64,
}

impl Verifier {
    pub fn new(partition: u32, message_size: usize, start_offset: u64) -> Verifier {
        Verifier {
            partition,
            message_size,
            next_offset: start_offset,
            next_seq: HashMap::new(),
            records: 0,
        }
    }

    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// Verifies the batches in a fetch response and calls `on_record(send_ns)` for
    /// each new record. Records before the expected offset (the start of a batch
    /// already partly seen) are skipped.
    pub fn check(
        &mut self,
        mut bytes: &[u8],
        mut on_record: impl FnMut(u64),
    ) -> Result<(), String> {
        let p = self.partition;
        while !bytes.is_empty() {
            let b = BatchRef::parse_full(bytes).map_err(|e| {
                format!(
                    "partition {p}: bad batch at offset {}: {e}",
                    self.next_offset
                )
            })?;
            for r in b.records() {
                let r = r.map_err(|e| format!("partition {p}: bad record: {e}"))?;
                let off = r.offset.0;
                if off < self.next_offset {
                    continue;
                }
                if off != self.next_offset {
                    return Err(format!(
                        "partition {p}: offset gap: expected {}, got {off}",
                        self.next_offset
                    ));
                }
                let v = r.value.unwrap_or_default();
                if v.len() != self.message_size {
                    return Err(format!(
                        "partition {p} offset {off}: value of {} bytes, sent {}",
                        v.len(),
                        self.message_size
                    ));
                }
                let h = read_header(v)
                    .ok_or_else(|| format!("partition {p} offset {off}: short value"))?;
                if h.partition != p {
                    return Err(format!(
                        "partition {p} offset {off}: message was sent to partition {}",
                        h.partition
                    ));
                }
                let expect = self.next_seq.entry(h.producer).or_insert(0);
                if h.seq != *expect {
                    return Err(format!(
                        "partition {p} offset {off}: producer {} sequence {} where {} was due ({})",
                        h.producer,
                        h.seq,
                        *expect,
                        if h.seq > *expect {
                            "lost messages"
                        } else {
                            "reordered or duplicated"
                        }
                    ));
                }
                *expect += 1;
                self.next_offset += 1;
                self.records += 1;
                on_record(h.send_ns);
            }
            bytes = &bytes[b.len()..];
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringbus::batch::{stamp_base_offset, BatchBuilder, RecordInput};
    use ringbus::types::{Offset, TimestampMs};

    fn batch(base: u64, producer: u32, partition: u32, seqs: &[u64], size: usize) -> Vec<u8> {
        let mut b = BatchBuilder::default();
        for &s in seqs {
            let mut v = template(size);
            write_header(&mut v, producer, partition, s, 1000 + s);
            b.push(RecordInput {
                timestamp: TimestampMs(0),
                key: None,
                value: Some(&v),
                headers: &[],
            });
        }
        let mut bytes = b.finish();
        stamp_base_offset(&mut bytes, Offset(base));
        bytes
    }

    #[test]
    fn accepts_a_clean_stream_from_two_producers() {
        let mut v = Verifier::new(3, 100, 10);
        let mut seen = Vec::new();
        let mut bytes = batch(10, 0, 3, &[0, 1, 2], 100);
        bytes.extend(batch(13, 1, 3, &[0, 1], 100));
        bytes.extend(batch(15, 0, 3, &[3], 100));
        v.check(&bytes, |ns| seen.push(ns)).unwrap();
        assert_eq!(v.records, 6);
        assert_eq!(v.next_offset(), 16);
        assert_eq!(seen, vec![1000, 1001, 1002, 1000, 1001, 1003]);
        // A refetch of the last batch is skipped, not double counted.
        v.check(&batch(15, 0, 3, &[3], 100), |_| panic!("seen twice"))
            .unwrap();
        assert_eq!(v.records, 6);
    }

    #[test]
    fn rejects_loss_reordering_gaps_corruption_and_misrouting() {
        let lost = batch(0, 0, 0, &[0, 2], 64);
        let e = Verifier::new(0, 64, 0).check(&lost, |_| {}).unwrap_err();
        assert!(e.contains("lost messages"), "{e}");

        let reordered = batch(0, 0, 0, &[1, 0], 64);
        let e = Verifier::new(0, 64, 0)
            .check(&reordered, |_| {})
            .unwrap_err();
        assert!(e.contains("sequence 1 where 0"), "{e}");

        let gap = batch(5, 0, 0, &[0], 64);
        let e = Verifier::new(0, 64, 0).check(&gap, |_| {}).unwrap_err();
        assert!(e.contains("offset gap"), "{e}");

        let mut corrupt = batch(0, 0, 0, &[0, 1], 64);
        let last = corrupt.len() - 3;
        corrupt[last] ^= 1;
        let e = Verifier::new(0, 64, 0).check(&corrupt, |_| {}).unwrap_err();
        assert!(e.contains("bad batch"), "{e}");

        let misrouted = batch(0, 0, 7, &[0], 64);
        let e = Verifier::new(0, 64, 0)
            .check(&misrouted, |_| {})
            .unwrap_err();
        assert!(e.contains("sent to partition 7"), "{e}");

        let short = batch(0, 0, 0, &[0], 64);
        let e = Verifier::new(0, 100, 0).check(&short, |_| {}).unwrap_err();
        assert!(e.contains("value of 64 bytes"), "{e}");
    }
}
