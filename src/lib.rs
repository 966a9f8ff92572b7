//! ringbus: a single-machine event log engine and message broker.
//!
//! The crate is layered bottom-up, and dependencies only point down:
//! - [`batch`]: the record-batch byte format (pure functions on bytes).
//! - [`storage`]: segments, indexes, partitions, recovery and the I/O backends.
//!
//! `unsafe` is denied here and allowed only in the two modules that need it:
//! `storage::mmap` (mapping files) and `storage::io` (aligned buffers, `fallocate`).
#![deny(unsafe_code)]
#![warn(missing_debug_implementations)]

pub mod batch;
pub mod limits;
pub mod storage;
pub mod types;

pub use types::{Offset, TimestampMs};
