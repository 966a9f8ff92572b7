//! Read-only memory maps of segment files, handed out as `bytes::Bytes`.
//!
//! This module is the only place that maps files, which is why it may use `unsafe`.
//! A map is wrapped in a `Bytes` whose owner is the `Mmap`; every slice handed to a
//! reader holds a reference, so the mapping (and the file's pages, even after the file
//! is unlinked by retention) lives until the last reader drops its slice.
//!
//! What the mapping relies on: the log only ever writes bytes past the published
//! written length, or rewrites the last partial block with identical bytes before
//! that length. A writer outside this process that modifies a segment file under a
//! running broker breaks that and can change bytes a reader already holds; a writer
//! that truncates a mapped file makes reads of the cut pages fault (SIGBUS). Operators
//! must not edit segment files of a running broker.
#![allow(unsafe_code)]

use bytes::Bytes;
use memmap2::MmapOptions;
use std::fs::File;
use std::io;

/// Maps the first `len` bytes of `file` read-only. An empty length yields empty
/// `Bytes` (mmap of zero bytes is an error on Linux).
pub fn map_readonly(file: &File, len: u64) -> io::Result<Bytes> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the map is read-only and private to this process's log. Its contents
    // change only through the log's own appends, which touch bytes no reader has been
    // given yet (see the module doc); callers never map past the file's length, and
    // the log never truncates below a length it has published to readers.
    let map = unsafe { MmapOptions::new().len(len).map(file)? };
    Ok(Bytes::from_owner(map))
}
