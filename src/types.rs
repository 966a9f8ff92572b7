//! Newtypes shared by every layer: offsets and timestamps.
//!
//! Offsets are `u64` wrapped so they cannot be mixed up with byte positions or counts.

use std::fmt;

/// The position of a record in a partition's log: the n-th record ever appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Offset(pub u64);

impl Offset {
    /// The offset `n` records after this one. Panics on overflow: 2^64 records cannot be
    /// appended, so overflow means a broken invariant.
    #[must_use]
    pub fn plus(self, n: u64) -> Offset {
        Offset(self.0.checked_add(n).expect("offset overflow"))
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Milliseconds since the Unix epoch, as Kafka timestamps are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct TimestampMs(pub i64);

impl TimestampMs {
    /// The wall clock now. Only the runtime edges call this; the core takes time as input.
    pub fn now() -> TimestampMs {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        TimestampMs(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}
