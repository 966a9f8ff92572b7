//! ringbus: a single-machine event log engine and message broker.
//!
//! The crate is layered bottom-up, and dependencies only point down:
//! - [`batch`]: the record-batch byte format (pure functions on bytes).
//! - [`storage`]: segments, indexes, partitions, recovery and the I/O backends.
//! - [`protocol`]: the binary wire protocol (frames, requests, responses).
//! - [`server`]: the thread-per-core broker on glommio.
//! - [`client`]: the Rust client (plain threads, any runtime).
//!
//! `unsafe` is denied here and allowed only in the two modules that need it:
//! `storage::mmap` (mapping files) and `storage::io` (aligned buffers, `fallocate`).
#![deny(unsafe_code)]
#![warn(missing_debug_implementations)]

pub mod batch;
pub mod client;
pub mod limits;
pub mod protocol;
pub mod server;
pub mod storage;
pub mod types;

pub use types::{Offset, TimestampMs};
