//! Read-only memory maps of segment files, handed out as `bytes::Bytes`, and the
//! page residency checks that keep a shard from faulting cold pages in itself.
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
//!
//! Retention may reuse an expired segment's file for a later segment (see
//! `SpareSegment::recycle`), which overwrites bytes readers were given. It does so
//! only once the [`MapWatch`] of that file's map says no `Bytes` of it is alive;
//! the segment is out of the log by then, so no new slice can be cut from it.
#![allow(unsafe_code)]

use bytes::Bytes;
use memmap2::MmapOptions;
use std::fs::File;
use std::io;
use std::sync::{Arc, OnceLock, Weak};

fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf only reads its integer argument.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(p)
            .ok()
            .filter(|p| p.is_power_of_two())
            .unwrap_or(4096)
    })
}

/// The page-aligned span of memory that covers `bytes`.
fn pages(bytes: &[u8]) -> (*mut libc::c_void, usize) {
    let page = page_size();
    if bytes.is_empty() {
        // No pages: an empty slice may point anywhere (`Bytes::new()`).
        return (std::ptr::null_mut(), 0);
    }
    let start = bytes.as_ptr() as usize;
    let first = start & !(page - 1);
    let end = (start + bytes.len()).next_multiple_of(page);
    (first as *mut libc::c_void, end - first)
}

/// Whether every page under `bytes`, a slice of a map from [`map_readonly`], is in
/// memory, so that reading it will not wait for the disk. Answers `true` when the
/// kernel cannot tell (the caller then reads as it would have anyway).
pub fn resident(bytes: &[u8]) -> bool {
    residency(bytes).is_none_or(|pages| pages.iter().all(|v| v & 1 == 1))
}

/// How many bytes of the pages under `bytes` (a slice of a map) are in memory, for
/// a file map: in the page cache. `None` when the kernel cannot tell.
pub fn resident_bytes(bytes: &[u8]) -> Option<usize> {
    let pages = residency(bytes)?;
    Some(pages.iter().filter(|v| *v & 1 == 1).count() * page_size())
}

/// One byte per page under `bytes` from mincore (bit 0: resident).
fn residency(bytes: &[u8]) -> Option<Vec<u8>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let (addr, len) = pages(bytes);
    let mut vec = vec![0u8; len / page_size()];
    // SAFETY: `addr..addr + len` covers pages of a live mapping (the caller's slice
    // keeps it mapped), `addr` is page-aligned, and `vec` has one byte per page of
    // that span, which is all mincore writes.
    let rc = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
    (rc == 0).then_some(vec)
}

/// Brings the pages under `bytes` into memory: asks the kernel to read `ahead` (a
/// larger slice of the same map that holds `bytes`, for the reads that follow) in
/// large requests, then touches every page of `bytes`. Blocks on the disk: call it
/// on a helper thread, never on a shard's.
pub fn fault_in(bytes: &[u8], ahead: &[u8]) {
    read_ahead(ahead);
    let page = page_size();
    let mut sum = 0u8;
    for i in (0..bytes.len()).step_by(page) {
        sum = sum.wrapping_add(bytes[i]);
    }
    std::hint::black_box(sum);
}

/// Reads of `map` (a whole map from [`map_readonly`]) fault in only the page they
/// touch (`MADV_RANDOM`): a recovery scan reads the bytes a segment file holds,
/// and the kernel's usual read-around of a fault would also read (and zero-fill)
/// megabytes of reserved, never-written blocks after them. Advisory; see
/// [`read_ahead`] for the ranges the scan will read.
pub fn advise_random(map: &[u8]) {
    let (addr, len) = pages(map);
    if len > 0 {
        // SAFETY: MADV_RANDOM only changes how the kernel reads this live,
        // page-aligned span of our own map on faults; never its contents. Advisory:
        // the result is ignored.
        let _ = unsafe { libc::madvise(addr, len, libc::MADV_RANDOM) };
    }
}

/// Asks the kernel to read the pages under `bytes` (a slice of a map) ahead, in
/// large requests (`MADV_WILLNEED`). Advisory. One request reads at most the
/// device's read-ahead size, so a long span goes as many requests of 2 MiB.
pub fn read_ahead(bytes: &[u8]) {
    for part in bytes.chunks(2 << 20) {
        let (addr, len) = pages(part);
        if len > 0 {
            // SAFETY: MADV_WILLNEED only starts reads of the pages of this live,
            // page-aligned span; it never changes their contents. Advisory: the
            // result is ignored.
            let _ = unsafe { libc::madvise(addr, len, libc::MADV_WILLNEED) };
        }
    }
}

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

/// A map as the owner of its `Bytes`, with a token that dies with the last of them.
struct Watched {
    map: memmap2::Mmap,
    _alive: Arc<()>,
}

impl AsRef<[u8]> for Watched {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

/// Tells whether any `Bytes` of a map from [`map_watched`] is still alive.
#[derive(Debug, Clone, Default)]
pub struct MapWatch(Weak<()>);

impl MapWatch {
    /// Whether a slice of the map is held anywhere (the segment's own `Bytes`
    /// included). Once false it stays false if no one can clone a slice meanwhile.
    pub fn in_use(&self) -> bool {
        self.0.strong_count() > 0
    }
}

/// [`map_readonly`], with a [`MapWatch`] that reports whether the map is still read.
pub fn map_watched(file: &File, len: u64) -> io::Result<(Bytes, MapWatch)> {
    if len == 0 {
        return Ok((Bytes::new(), MapWatch::default()));
    }
    let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: as in `map_readonly`; and a recycled file is written again only once
    // the watch says no slice of this map is alive (module doc).
    let map = unsafe { MmapOptions::new().len(len).map(file)? };
    let alive = Arc::new(());
    let watch = MapWatch(Arc::downgrade(&alive));
    Ok((Bytes::from_owner(Watched { map, _alive: alive }), watch))
}
