//! The narrow I/O interface between the log and the operating system, and the
//! blocking backend used by tests, tools and start-up recovery.
//!
//! The log core (segments, partitions) never calls `write` or `fsync` itself: a flush
//! produces a [`crate::storage::FlushJob`] and the job runs against a [`LogIo`]
//! backend. Two backends exist:
//! - [`StdIo`]: positioned `pwrite` (O_DIRECT where the filesystem allows it) and
//!   `fdatasync`, completing synchronously. Used by tests, benches, tools.
//! - `UringIo` (`storage::uring`): glommio's io_uring `DmaFile`, so a core never
//!   blocks on the disk.
//!
//! This module also owns the page-aligned buffer type, `fallocate` and the extended
//! attribute that marks a recycled segment, which is why it may use `unsafe`
//! (STYLE 10). It must not know about batches or offsets.
#![allow(unsafe_code)]

use crate::limits::IO_ALIGN_BYTES;
use std::alloc::Layout;
use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;

/// A write buffer owned by a backend, aligned for O_DIRECT.
pub trait WriteBuf: 'static {
    fn as_slice(&self) -> &[u8];
    fn as_mut_slice(&mut self) -> &mut [u8];
}

/// What the log needs from the disk. Every method may be asynchronous; a backend
/// that completes synchronously returns ready futures.
pub trait LogIo: Clone + 'static {
    /// An open handle on one segment file, for writes.
    type File: 'static;
    /// A buffer the backend can write from without copying.
    type Buf: WriteBuf;

    /// A buffer of exactly `len` bytes (a multiple of [`IO_ALIGN_BYTES`]), aligned for
    /// direct I/O. Its contents are unspecified; the log zeroes what it pads.
    fn alloc(&self, len: usize) -> Self::Buf;

    /// Opens an existing, preallocated segment file for writing.
    fn open(&self, path: &Path) -> impl Future<Output = io::Result<Self::File>>;

    /// Writes `buf[..len]` at file position `pos`, both aligned to [`IO_ALIGN_BYTES`].
    /// A short write is an error. Hands the buffer back for reuse when it can.
    fn write_at(
        &self,
        file: &Self::File,
        buf: Self::Buf,
        len: usize,
        pos: u64,
    ) -> impl Future<Output = io::Result<Option<Self::Buf>>>;

    /// Makes every completed write to `file` durable (fdatasync).
    fn sync_data(&self, file: &Self::File) -> impl Future<Output = io::Result<()>>;

    /// [`LogIo::write_at`], and the written range is durable (with the file's
    /// metadata needed to read it back) when the future completes. Durable for this
    /// range only: a device with FUA may make just these blocks durable, so callers
    /// use it only when everything written before it is durable already.
    /// The default writes, then syncs the whole file.
    fn write_durable_at(
        &self,
        file: &Self::File,
        buf: Self::Buf,
        len: usize,
        pos: u64,
    ) -> impl Future<Output = io::Result<Option<Self::Buf>>> {
        async move {
            let buf = self.write_at(file, buf, len, pos).await?;
            self.sync_data(file).await?;
            Ok(buf)
        }
    }

    /// Makes the entries of directory `dir` durable (files created or renamed in it).
    fn sync_dir(&self, dir: &Path) -> impl Future<Output = io::Result<()>>;

    /// Runs `f`, which may block (file creation, `fallocate`, `mmap`), where it
    /// cannot stall the caller's core: a helper thread for the io_uring backend,
    /// the calling thread for the blocking one.
    fn run_blocking<R, F>(&self, f: F) -> impl Future<Output = R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static;
}

/// A zero-initialised heap buffer aligned to [`IO_ALIGN_BYTES`].
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> AlignedBuf {
        assert!(
            len > 0 && len % IO_ALIGN_BYTES == 0,
            "unaligned buffer length {len}"
        );
        let layout = Self::layout(len);
        // SAFETY: `layout` has a non-zero size (asserted above) and a valid power-of-two
        // alignment, which is all `alloc_zeroed` requires.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, IO_ALIGN_BYTES).expect("buffer layout")
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with exactly this layout and is freed
        // only here, once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

impl WriteBuf for AlignedBuf {
    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points at `len` initialised (zeroed at allocation) bytes owned
        // by `self`; the shared borrow of `self` prevents concurrent mutation.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and the unique borrow of `self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

// SAFETY: AlignedBuf uniquely owns its allocation, like a Box<[u8]>; nothing about it
// is tied to the allocating thread.
unsafe impl Send for AlignedBuf {}

/// Whether [`StdIo`] opens files with O_DIRECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectIo {
    /// O_DIRECT, falling back to buffered I/O where the filesystem refuses it (tmpfs).
    Prefer,
    /// Always buffered (page cache) writes.
    Off,
}

/// Blocking backend: `pwrite` + `fdatasync` on the calling thread.
#[derive(Debug, Clone, Copy)]
pub struct StdIo {
    pub direct: DirectIo,
}

impl Default for StdIo {
    fn default() -> Self {
        StdIo {
            direct: DirectIo::Prefer,
        }
    }
}

impl StdIo {
    fn open_sync(&self, path: &Path) -> io::Result<File> {
        if self.direct == DirectIo::Prefer {
            match OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
            {
                Ok(f) => return Ok(f),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
        OpenOptions::new().write(true).open(path)
    }
}

impl LogIo for StdIo {
    type File = File;
    type Buf = AlignedBuf;

    fn alloc(&self, len: usize) -> AlignedBuf {
        AlignedBuf::zeroed(len)
    }

    fn open(&self, path: &Path) -> impl Future<Output = io::Result<File>> {
        std::future::ready(self.open_sync(path))
    }

    fn write_at(
        &self,
        file: &File,
        buf: AlignedBuf,
        len: usize,
        pos: u64,
    ) -> impl Future<Output = io::Result<Option<AlignedBuf>>> {
        std::future::ready(
            file.write_all_at(&buf.as_slice()[..len], pos)
                .map(|()| Some(buf)),
        )
    }

    fn sync_data(&self, file: &File) -> impl Future<Output = io::Result<()>> {
        std::future::ready(file.sync_data())
    }

    fn sync_dir(&self, dir: &Path) -> impl Future<Output = io::Result<()>> {
        std::future::ready(sync_dir(dir))
    }

    fn run_blocking<R, F>(&self, f: F) -> impl Future<Output = R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        std::future::ready(f())
    }
}

/// Sets a segment file's length to `len` (the rest reads as zeros) and reserves its
/// first `reserve` bytes ([`allocate`]); returns how many bytes are reserved.
pub fn size_and_reserve(file: &File, len: u64, reserve: u64) -> io::Result<u64> {
    file.set_len(len)?;
    let reserve = reserve.min(len);
    allocate(file, 0, reserve)?;
    Ok(reserve)
}

/// Reserves the blocks of `file` in `[from, from + len)` without changing its
/// length (`FALLOC_FL_KEEP_SIZE`): writes there allocate nothing, and a full disk
/// shows up here, before the writes. Blocks already there stay as they are.
/// Filesystems without `fallocate` reserve nothing (writes allocate as they go).
pub fn allocate(file: &File, from: u64, len: u64) -> io::Result<()> {
    #[cfg(test)]
    if FAIL_ALLOCATIONS.with(std::cell::Cell::get) {
        return Err(io::Error::from_raw_os_error(libc::ENOSPC));
    }
    if len == 0 {
        return Ok(());
    }
    let from =
        libc::off_t::try_from(from).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let len =
        libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: fallocate reads no memory of ours; the fd is valid for the borrow of
    // `file`.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, from, len) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
        return Ok(());
    }
    Err(err)
}

#[cfg(test)]
thread_local! {
    /// Makes [`allocate`] fail with ENOSPC on this thread (unit tests).
    pub(crate) static FAIL_ALLOCATIONS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The data regions of `file` from `from` on, as `[start, end)` ranges (`lseek`
/// with `SEEK_DATA` and `SEEK_HOLE`): what lies between them reads as zeros without
/// being read. Holes count as such everywhere; on ext4 (and XFS) so do unwritten
/// (fallocated) extents with no cached data. `None` where the filesystem cannot
/// tell, so the caller must treat the whole file as data.
pub fn data_regions(file: &File, from: u64) -> Option<Vec<(u64, u64)>> {
    let seek = |pos: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        let pos =
            libc::off_t::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: lseek touches no memory of ours; the fd is valid for the borrow of
        // `file`. It moves the file offset, which nothing here uses: every read and
        // write of segment files is positional.
        let r = unsafe { libc::lseek(file.as_raw_fd(), pos, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        // ENXIO: no data (or no hole) at or after `pos`.
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    };
    let len = file.metadata().ok()?.len();
    let mut regions = Vec::new();
    let mut pos = from;
    while pos < len {
        let Some(start) = seek(pos, libc::SEEK_DATA).ok()? else {
            break;
        };
        let end = seek(start, libc::SEEK_HOLE).ok()?.unwrap_or(len).min(len);
        if end <= start {
            break;
        }
        regions.push((start, end));
        pos = end;
    }
    Some(regions)
}

/// Sets the extended attribute `name` (no value) on `file`: a mark for recovery's
/// report, never for its decisions. Filesystems without user attributes answer
/// with an error the caller may ignore.
pub fn set_mark(file: &File, name: &CStr) -> io::Result<()> {
    // SAFETY: `name` is a NUL-terminated string that outlives the call; the value
    // pointer is valid for its length (zero); the fd is valid for the borrow.
    let rc = unsafe { libc::fsetxattr(file.as_raw_fd(), name.as_ptr(), std::ptr::null(), 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether `file` carries the mark `name` ([`set_mark`]); `false` where the
/// filesystem cannot tell.
pub fn has_mark(file: &File, name: &CStr) -> bool {
    // SAFETY: as in `set_mark`; a zero-length buffer only asks for the size.
    let rc = unsafe { libc::fgetxattr(file.as_raw_fd(), name.as_ptr(), std::ptr::null_mut(), 0) };
    rc >= 0
}

/// Removes the mark `name` from `file`, if it has it.
pub fn clear_mark(file: &File, name: &CStr) -> io::Result<()> {
    // SAFETY: as in `set_mark`.
    let rc = unsafe { libc::fremovexattr(file.as_raw_fd(), name.as_ptr()) };
    let err = io::Error::last_os_error();
    if rc == 0 || err.raw_os_error() == Some(libc::ENODATA) {
        Ok(())
    } else {
        Err(err)
    }
}

/// fsyncs a directory so a file created or removed in it survives a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Takes an exclusive `flock` on `dir/.lock`, so two brokers never share a data
/// directory. The lock lives as long as the returned file.
pub fn lock_dir(dir: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".lock"))?;
    // SAFETY: flock takes a valid fd (borrowed from `f`) and no memory of ours.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f)
}

/// Asks the kernel to drop `file`'s clean cached pages that no process has mapped
/// (`POSIX_FADV_DONTNEED`), so that later reads go to the disk: for tools and tests
/// that measure or exercise cold reads.
pub fn drop_cached_pages(file: &File) -> io::Result<()> {
    // SAFETY: posix_fadvise only reads its integer arguments; the fd is valid for the
    // borrow of `file`.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// The machine's physical memory, if the system reports it.
pub fn physical_memory_bytes() -> Option<u64> {
    // SAFETY: sysconf only reads its integer argument and returns -1 for an
    // unknown name.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let pages = u64::try_from(pages).ok()?;
    let page = u64::try_from(page).ok()?;
    pages.checked_mul(page)
}
