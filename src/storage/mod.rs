//! The storage engine: segment files, their indexes, partitions, recovery and the
//! I/O backends. Everything above (server, routing, groups) talks to a [`Partition`].
//!
//! Module map:
//! - [`io`]: the narrow [`LogIo`] interface and the blocking [`StdIo`] backend.
//! - [`uring`]: the glommio (io_uring) backend and the group-commit driver.
//! - [`mmap`]: read-only maps handed out as `bytes::Bytes`.
//! - [`cold`]: reads of data the tail cache does not hold, with O_DIRECT into reused
//!   buffers.
//! - [`index`]: the sparse offset index and the time index.
//! - [`segment`]: one `.log` file: appends, reads, recovery scan.
//! - [`partition`]: the ordered segments, offsets, flush, roll, retention.
//! - [`tail_cache`]: in-memory copies of recently written batches for readers.
//! - [`copy`]: the tail cache's streaming (non-temporal) copies.
//! - [`watermark`]: runtime-free waiting on written and durable offsets.
//! - [`dump`]: the operator's view of a segment (`ringbus segdump`).

pub mod cold;
pub mod copy;
pub mod dump;
pub mod index;
pub mod io;
pub mod mmap;
pub mod partition;
pub mod segment;
pub mod tail_cache;
pub mod uring;
pub mod watermark;

pub use io::{DirectIo, LogIo, StdIo};
pub use partition::{
    Appended, Durability, Fetch, FlushDue, FlushJob, FlushScope, FlushStats, Partition,
    PartitionConfig, RecoveryPolicy, RecoveryReport, RetentionReport, SyncJob,
};
pub use segment::TimestampScan;
pub use tail_cache::CacheBudget;

use crate::batch::BatchError;
use crate::types::Offset;
use std::path::PathBuf;

/// Errors of the storage layer, each with the facts an operator needs.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CRC mismatch in {segment} at byte {position}: stored {expected:#010x}, computed {actual:#010x}")]
    ChecksumMismatch {
        segment: PathBuf,
        position: u64,
        expected: u32,
        actual: u32,
    },
    #[error("corrupt batch in {segment} at byte {position}: {source}")]
    CorruptBatch {
        segment: PathBuf,
        position: u64,
        #[source]
        source: BatchError,
    },
    #[error(
        "offset gap in {segment} at byte {position}: expected offset {expected}, found {found}"
    )]
    OffsetGap {
        segment: PathBuf,
        position: u64,
        expected: Offset,
        found: Offset,
    },
    #[error("invalid batch: {0}")]
    InvalidBatch(#[from] BatchError),
    #[error("batch of {len} bytes does not fit a segment of {segment_bytes} bytes")]
    BatchTooLarge { len: usize, segment_bytes: u64 },
    #[error("partition is fenced after a failed {op}: {reason}; reopen it to recover")]
    Fenced { op: &'static str, reason: String },
    #[error("offset {requested} is outside the log [{start}, {end}]")]
    OffsetOutOfRange {
        requested: Offset,
        start: Offset,
        end: Offset,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl StorageError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StorageError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// A read-time batch error located in a segment file.
    pub(crate) fn at(segment: &std::path::Path, position: u64, e: BatchError) -> Self {
        match e {
            BatchError::ChecksumMismatch { expected, actual } => StorageError::ChecksumMismatch {
                segment: segment.to_owned(),
                position,
                expected,
                actual,
            },
            other => StorageError::CorruptBatch {
                segment: segment.to_owned(),
                position,
                source: other,
            },
        }
    }
}
