//! Cold reads: segment bytes that the tail cache no longer holds (older data, or
//! anything after a restart), read from the file with O_DIRECT into buffers that a
//! shard allocates once and reuses.
//!
//! Why not the page cache through the segment maps: on a VM that reports free pages
//! to its host (this one does, `page_reporting_order` 9), every fresh page-cache page
//! costs the host a fault and a zeroing on first touch, and a catch-up reader after a
//! restart touched nothing but fresh pages: 330-600 MB/s from a device that reads 2.0
//! GB/s at queue depth 1. Reused buffers stay backed, and a direct read skips the
//! page cache's own copy.
//!
//! This module owns the buffers ([`ReadPool`]), the blocking read ([`read_span`]) and
//! the rule that a span holds whole batches only ([`whole_batches`]). Which span a
//! fetch needs, and where spans are kept, belongs to `segment` and `partition`.

use crate::batch;
use crate::limits::{self, IO_ALIGN_BYTES};
use crate::storage::io::{AlignedBuf, WriteBuf};
use bytes::Bytes;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Bytes of one read buffer: the largest span (`COLD_WARM_BYTES_MAX` plus the two
/// index intervals a read may start before its offset), aligned at both ends.
pub const READ_BUF_BYTES: usize =
    limits::COLD_WARM_BYTES_MAX + 2 * limits::INDEX_INTERVAL_BYTES as usize + 2 * IO_ALIGN_BYTES;

/// A shard's read buffers: at most `max` exist, each allocated on first need and
/// kept for reuse (so its pages stay resident), shared by the shard's partitions.
#[derive(Debug, Clone)]
pub struct ReadPool {
    inner: Arc<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    max: usize,
    state: Mutex<PoolState>,
}

#[derive(Debug, Default)]
struct PoolState {
    free: Vec<AlignedBuf>,
    allocated: usize,
}

impl ReadPool {
    pub fn new(max: usize) -> ReadPool {
        ReadPool {
            inner: Arc::new(PoolInner {
                max,
                state: Mutex::new(PoolState::default()),
            }),
        }
    }

    /// A free buffer, or a new one while fewer than `max` exist; `None` when every
    /// buffer is held by a span or a response still being sent.
    pub fn take(&self) -> Option<PoolBuf> {
        let mut s = self.inner.state.lock().expect("read pool lock");
        let buf = match s.free.pop() {
            Some(b) => b,
            None if s.allocated < self.inner.max => {
                s.allocated += 1;
                AlignedBuf::zeroed(READ_BUF_BYTES)
            }
            None => return None,
        };
        Some(PoolBuf {
            buf: Some(buf),
            len: 0,
            pool: self.inner.clone(),
        })
    }

    /// Buffers allocated so far (free or in use).
    pub fn allocated(&self) -> usize {
        self.inner.state.lock().expect("read pool lock").allocated
    }

    /// Buffers allocated and not held by any span or response.
    pub fn free(&self) -> usize {
        self.inner.state.lock().expect("read pool lock").free.len()
    }
}

/// A buffer taken from a [`ReadPool`]; goes back to it when dropped. Its first
/// `len` bytes are the data read.
#[derive(Debug)]
pub struct PoolBuf {
    buf: Option<AlignedBuf>,
    len: usize,
    pool: Arc<PoolInner>,
}

impl AsRef<[u8]> for PoolBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf.as_ref().expect("present until drop").as_slice()[..self.len]
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            if let Ok(mut s) = self.pool.state.lock() {
                s.free.push(b);
            }
        }
    }
}

/// Reads file bytes `[pos, pos + len)` of `path` into `buf`, with O_DIRECT where
/// the filesystem allows it, and returns the bytes from `pos` (fewer at the end of
/// the file). Blocks on the disk: run it on a helper thread.
pub fn read_span(path: &Path, pos: u64, len: usize, mut buf: PoolBuf) -> io::Result<Bytes> {
    let start = pos - pos % IO_ALIGN_BYTES as u64;
    let skip = (pos - start) as usize;
    let want = (skip + len).div_ceil(IO_ALIGN_BYTES) * IO_ALIGN_BYTES;
    if want > READ_BUF_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a cold read of {len} bytes does not fit a read buffer"),
        ));
    }
    let file = open_direct(path)?;
    let dst = &mut buf.buf.as_mut().expect("present until drop").as_mut_slice()[..want];
    let mut got = 0;
    while got < want {
        // Direct reads past the end of the file return short; a short read within
        // it (a signal) continues from where it stopped, still aligned.
        let n = file.read_at(&mut dst[got..], start + got as u64)?;
        if n == 0 {
            break;
        }
        got += n;
        if got % IO_ALIGN_BYTES != 0 {
            break;
        }
    }
    buf.len = got.min(skip + len);
    let bytes = Bytes::from_owner(buf);
    Ok(if skip >= bytes.len() {
        Bytes::new()
    } else {
        bytes.slice(skip..)
    })
}

fn open_direct(path: &Path) -> io::Result<File> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => Ok(f),
        // tmpfs and some others refuse O_DIRECT; the page cache still reads right.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => File::open(path),
        Err(e) => Err(e),
    }
}

/// The length of the longest prefix of `bytes` made of whole batches (by their
/// declared lengths; a header that does not parse ends the prefix, and the reader
/// that reaches it reports it from the map), and the offset after its last batch
/// (`None` for an empty prefix).
pub fn whole_batches(bytes: &[u8]) -> (usize, Option<u64>) {
    let mut pos = 0;
    let mut next = None;
    while let Ok(len) = batch::check_header(&bytes[pos..]) {
        let h = batch::header(&bytes[pos..]).expect("checked");
        let Some(after) = h
            .base_offset
            .get()
            .checked_add(u64::from(h.last_offset_delta.get()) + 1)
        else {
            break;
        };
        next = Some(after);
        pos += len;
    }
    (pos, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_reuses_its_buffers_and_refuses_past_its_limit() {
        let pool = ReadPool::new(2);
        let a = pool.take().expect("first");
        let b = pool.take().expect("second");
        assert!(pool.take().is_none(), "a third buffer past the limit");
        drop(a);
        let c = pool.take().expect("the first one, back");
        assert_eq!(pool.allocated(), 2);
        drop((b, c));
        assert_eq!(pool.allocated(), 2);
    }

    #[test]
    fn read_span_returns_the_bytes_from_an_unaligned_position() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let pool = ReadPool::new(1);
        let got = read_span(&path, 5_000, 9_000, pool.take().unwrap()).unwrap();
        assert_eq!(&got[..], &data[5_000..14_000]);
        drop(got);
        // Past the end of the file: what is there.
        let got = read_span(&path, 19_000, 4_000, pool.take().unwrap()).unwrap();
        assert_eq!(&got[..], &data[19_000..]);
        let got2 = pool.take();
        assert!(got2.is_none(), "the buffer is held by the bytes");
    }
}
