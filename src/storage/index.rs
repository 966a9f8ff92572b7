//! The sparse offset index and the time index of one segment: their in-memory form,
//! their file format, and validation of what is read back from disk.
//!
//! `.index`: 8-byte entries `(relative_offset u32 LE, position u32 LE)`, one per
//! ~4 KiB of log, each pointing at the first byte of a batch.
//! `.timeindex`: 12-byte entries `(max_timestamp_so_far i64 LE, relative_offset u32 LE)`,
//! added beside an offset-index entry whenever the segment's maximum timestamp grew.
//! Both are rebuildable from the log, which is the truth: nothing here is trusted
//! until recovery checks the entry it starts from against the log.

use crate::types::TimestampMs;

pub const INDEX_ENTRY_LEN: usize = 8;
pub const TIME_ENTRY_LEN: usize = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub relative_offset: u32,
    pub position: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeEntry {
    pub max_timestamp: TimestampMs,
    pub relative_offset: u32,
}

impl IndexEntry {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.relative_offset.to_le_bytes());
        out.extend_from_slice(&self.position.to_le_bytes());
    }
}

impl TimeEntry {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.max_timestamp.0.to_le_bytes());
        out.extend_from_slice(&self.relative_offset.to_le_bytes());
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Decodes an `.index` file. Returns `None` when the bytes cannot be a valid index
/// for a log of `log_len` bytes: a partial entry, an entry past the log, or entries
/// that do not strictly increase. A trailing partial entry (torn index write) is
/// dropped rather than rejecting the whole file.
pub fn decode_index(bytes: &[u8], log_len: u64) -> Option<Vec<IndexEntry>> {
    let whole = bytes.len() / INDEX_ENTRY_LEN * INDEX_ENTRY_LEN;
    let mut out = Vec::with_capacity(whole / INDEX_ENTRY_LEN);
    for e in bytes[..whole].chunks_exact(INDEX_ENTRY_LEN) {
        let entry = IndexEntry {
            relative_offset: u32_at(e, 0),
            position: u32_at(e, 4),
        };
        if u64::from(entry.position) >= log_len {
            return None;
        }
        if let Some(prev) = out.last() {
            let prev: &IndexEntry = prev;
            if entry.relative_offset <= prev.relative_offset || entry.position <= prev.position {
                return None;
            }
        } else if entry.position != 0 || entry.relative_offset != 0 {
            // The first batch of a segment is always indexed.
            return None;
        }
        out.push(entry);
    }
    Some(out)
}

/// Decodes a `.timeindex` file under the same rules: timestamps never decrease,
/// relative offsets strictly increase and stay at or below `max_relative_offset`.
pub fn decode_time_index(bytes: &[u8], max_relative_offset: u32) -> Option<Vec<TimeEntry>> {
    let whole = bytes.len() / TIME_ENTRY_LEN * TIME_ENTRY_LEN;
    let mut out: Vec<TimeEntry> = Vec::with_capacity(whole / TIME_ENTRY_LEN);
    for e in bytes[..whole].chunks_exact(TIME_ENTRY_LEN) {
        let entry = TimeEntry {
            max_timestamp: TimestampMs(i64::from_le_bytes(e[..8].try_into().expect("8 bytes"))),
            relative_offset: u32_at(e, 8),
        };
        if entry.relative_offset > max_relative_offset {
            return None;
        }
        if let Some(prev) = out.last() {
            if entry.max_timestamp <= prev.max_timestamp
                || entry.relative_offset <= prev.relative_offset
            {
                return None;
            }
        }
        out.push(entry);
    }
    Some(out)
}

/// The last entry at or before `relative_offset` whose batch starts below `limit`.
pub fn lookup(entries: &[IndexEntry], relative_offset: u32, limit: u64) -> Option<IndexEntry> {
    let n = entries
        .partition_point(|e| e.relative_offset <= relative_offset && u64::from(e.position) < limit);
    n.checked_sub(1).map(|i| entries[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(entries: &[(u32, u32)]) -> Vec<u8> {
        let mut v = Vec::new();
        for &(r, p) in entries {
            IndexEntry {
                relative_offset: r,
                position: p,
            }
            .encode(&mut v);
        }
        v
    }

    #[test]
    fn decode_rejects_damage_and_drops_torn_entry() {
        let good = enc(&[(0, 0), (10, 5000), (20, 9000)]);
        assert_eq!(decode_index(&good, 10_000).unwrap().len(), 3);
        assert_eq!(
            decode_index(&good[..good.len() - 3], 10_000).unwrap().len(),
            2
        );
        assert!(decode_index(&good, 9000).is_none(), "entry past the log");
        assert!(decode_index(&enc(&[(0, 0), (10, 5000), (5, 9000)]), 10_000).is_none());
        assert!(decode_index(&enc(&[(3, 0)]), 10_000).is_none());
    }

    #[test]
    fn lookup_respects_limit() {
        let e = decode_index(&enc(&[(0, 0), (10, 5000), (20, 9000)]), 10_000).unwrap();
        assert_eq!(lookup(&e, 15, u64::MAX).unwrap().position, 5000);
        assert_eq!(lookup(&e, 25, 9000).unwrap().position, 5000);
        assert_eq!(lookup(&e, 0, u64::MAX).unwrap().position, 0);
    }
}
