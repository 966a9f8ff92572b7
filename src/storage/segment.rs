//! One segment: a `<base offset, 20 digits>.log` file, sized to its capacity from the
//! start with its blocks reserved ahead of the appends, and its sparse
//! `.index` and `.timeindex`. Owns appending into staging chunks, handing written
//! chunks to a flush, zero-copy reads, and the recovery scan of one file.
//!
//! It does not decide when to roll, flush or delete; the partition does.
//!
//! Write path: an append copies the batch once into a page-aligned staging chunk
//! (1 MiB). A flush takes the filled chunks and writes them with O_DIRECT through the
//! [`LogIo`] backend; the last partial 4 KiB block is carried into the next chunk (a
//! copy of at most 4 KiB) and written again next time with more bytes behind it.
//! Read path: `Bytes` slices of a read-only map of the whole file,
//! limited to the bytes whose write has completed.

use crate::batch::{self, BatchRef, HEADER_LEN};
use crate::limits::{
    self, COLD_WARM_BYTES_MAX, INDEX_INTERVAL_BYTES, IO_ALIGN_BYTES, STAGING_BUFFERS_FREE_MAX,
    STAGING_CHUNK_BYTES,
};
use crate::storage::index::{self, IndexEntry, TimeEntry};
use crate::storage::io::{self as sio, LogIo, WriteBuf};
use crate::storage::mmap::{map_readonly, map_watched, MapWatch};
use crate::storage::tail_cache::{CacheBudget, SegmentCache};
use crate::storage::StorageError;
use crate::types::{Offset, TimestampMs};
use bytes::Bytes;
use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::ops::ControlFlow;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

pub fn log_path(dir: &Path, base: Offset) -> PathBuf {
    dir.join(format!("{:020}.log", base.0))
}

pub fn index_path(dir: &Path, base: Offset) -> PathBuf {
    dir.join(format!("{:020}.index", base.0))
}

pub fn time_index_path(dir: &Path, base: Offset) -> PathBuf {
    dir.join(format!("{:020}.timeindex", base.0))
}

/// The extended attribute on a recycled segment's log ([`SpareSegment::recycle`]):
/// recovery then reports the bytes it cuts after the last batch as the file's
/// earlier contents, not as damage. It informs the report only: recovery cuts those
/// bytes the same way with or without it.
const RECYCLED_MARK: &std::ffi::CStr = c"user.ringbus.recycled";

/// Whether the segment log at `path` lives in a recycled file (for tests and
/// tools); `false` when it cannot be read.
pub fn is_recycled(path: &Path) -> bool {
    File::open(path).is_ok_and(|f| sio::has_mark(&f, RECYCLED_MARK))
}

/// `[log, index, time index]` of the segment at `base`.
fn segment_paths(dir: &Path, base: Offset) -> [PathBuf; 3] {
    [
        log_path(dir, base),
        index_path(dir, base),
        time_index_path(dir, base),
    ]
}

/// The files of a spare segment (see [`SpareSegment`]): `spare.log`,
/// `spare.index`, `spare.timeindex`.
fn spare_paths(dir: &Path) -> [PathBuf; 3] {
    ["log", "index", "timeindex"].map(|ext| dir.join(format!("spare.{ext}")))
}

/// Whether `name` is one of a spare segment's files.
pub fn is_spare_name(name: &str) -> bool {
    name.strip_prefix("spare.")
        .is_some_and(|ext| matches!(ext, "log" | "index" | "timeindex"))
}

/// The base offset named by a `.log` file name, if it is one.
pub fn parse_log_name(name: &str) -> Option<Offset> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(Offset)
}

pub(crate) fn align_down(v: u64) -> u64 {
    v / IO_ALIGN_BYTES as u64 * IO_ALIGN_BYTES as u64
}

pub(crate) fn align_up(v: u64) -> u64 {
    v.div_ceil(IO_ALIGN_BYTES as u64) * IO_ALIGN_BYTES as u64
}

/// What one valid batch found by a scan looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchInfo {
    pub position: u64,
    pub len: u32,
    pub base_offset: Offset,
    pub last_offset: Offset,
    pub record_count: u32,
    pub first_timestamp: TimestampMs,
    pub max_timestamp: TimestampMs,
    pub crc: u32,
}

/// Why a scan stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanStop {
    /// Reached the end of the bytes exactly at a batch boundary.
    End,
    /// Found an all-zero header: the unwritten part of a segment.
    Zeros,
    /// Found bytes that are not a valid batch.
    Invalid(batch::BatchError),
    /// Found a valid batch whose base offset is not the one expected.
    OffsetGap { expected: Offset, found: Offset },
    /// The caller of [`scan_while`] asked to stop after the batch it was given.
    Stopped,
}

/// Result of [`scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// Position just past the last valid batch.
    pub end: u64,
    /// The offset after the last valid batch (the expected one if there was none).
    pub next_offset: Option<Offset>,
    pub stop: ScanStop,
    pub batches: u64,
}

/// Walks batches from `start`, checking each header and CRC, and that base offsets
/// continue from `expected` (when given). Never panics on any input: this is the
/// parser the `segment_parser` fuzz target drives.
pub fn scan(
    bytes: &[u8],
    start: u64,
    expected: Option<Offset>,
    mut each: impl FnMut(&BatchInfo),
) -> Scan {
    scan_while(bytes, start, expected, |b| {
        each(b);
        ControlFlow::Continue(())
    })
}

/// [`scan`] that stops (with [`ScanStop::Stopped`], `end` just past that batch) once
/// `each` breaks: a lookup that has found its batch does not check the rest of the
/// segment (256 MiB by default, up to 4 GiB) on the shard's thread.
pub fn scan_while(
    bytes: &[u8],
    start: u64,
    expected: Option<Offset>,
    mut each: impl FnMut(&BatchInfo) -> ControlFlow<()>,
) -> Scan {
    let mut pos = usize::try_from(start)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    let mut next = expected;
    let mut batches = 0;
    let stop = loop {
        let rest = &bytes[pos..];
        if rest.is_empty() {
            break ScanStop::End;
        }
        let head = &rest[..rest.len().min(HEADER_LEN)];
        if head.iter().all(|&b| b == 0) {
            break ScanStop::Zeros;
        }
        let b = match BatchRef::parse(rest) {
            Ok(b) => b,
            Err(e) => break ScanStop::Invalid(e),
        };
        if let Some(exp) = next {
            if b.base_offset() != exp {
                break ScanStop::OffsetGap {
                    expected: exp,
                    found: b.base_offset(),
                };
            }
        }
        let h = b.header();
        let Some(last) = b
            .base_offset()
            .0
            .checked_add(u64::from(h.last_offset_delta.get()))
        else {
            break ScanStop::Invalid(batch::BatchError::BadLength {
                len: 0,
                min: 0,
                max: 0,
            });
        };
        let info = BatchInfo {
            position: pos as u64,
            len: b.len() as u32,
            base_offset: b.base_offset(),
            last_offset: Offset(last),
            record_count: b.record_count(),
            first_timestamp: b.first_timestamp(),
            max_timestamp: b.max_timestamp(),
            crc: h.crc.get(),
        };
        let flow = each(&info);
        batches += 1;
        let Some(n) = last.checked_add(1) else {
            break ScanStop::Invalid(batch::BatchError::BadLength {
                len: 0,
                min: 0,
                max: 0,
            });
        };
        next = Some(Offset(n));
        pos += b.len();
        if flow.is_break() {
            break ScanStop::Stopped;
        }
    };
    Scan {
        end: pos as u64,
        next_offset: next,
        stop,
        batches,
    }
}

/// Removes a segment's `.log`, `.index` and `.timeindex`; returns the paths removed.
pub(crate) fn remove_files(dir: &Path, base: Offset) -> Result<Vec<PathBuf>, StorageError> {
    remove_existing(segment_paths(dir, base))
}

/// Removes those of `paths` that exist; returns them.
fn remove_existing(paths: [PathBuf; 3]) -> Result<Vec<PathBuf>, StorageError> {
    let mut removed = Vec::new();
    for p in paths {
        match std::fs::remove_file(&p) {
            Ok(()) => removed.push(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StorageError::io("remove", p, e)),
        }
    }
    Ok(removed)
}

/// Position just past the last non-zero byte of `bytes`, or 0.
pub(crate) fn nonzero_end(bytes: &[u8]) -> usize {
    let mut end = bytes.len();
    for chunk in bytes.rchunks(64 * 1024) {
        if chunk.iter().all(|&b| b == 0) {
            end -= chunk.len();
            continue;
        }
        let last = chunk.iter().rposition(|&b| b != 0).expect("non-zero byte");
        return end - chunk.len() + last + 1;
    }
    0
}

/// Position just past the last non-zero byte of `map` (a whole file) at or after
/// `from`, or `from`. Reads only the file's data `regions` (`None`: all of it,
/// where the filesystem cannot tell; [`sio::data_regions`]): the rest of a
/// segment (a hole, or blocks reserved and never written) reads as zeros. Reading
/// it all made every start touch each active segment whole: 74 s to start a
/// broker of 200 empty partitions of 256 MiB segments.
fn nonzero_end_from(regions: Option<&[(u64, u64)]>, map: &[u8], from: usize) -> usize {
    let Some(regions) = regions else {
        return from + nonzero_end(&map[from..]);
    };
    let mut last = from;
    for &(start, end) in regions {
        let start = (start as usize).max(from).min(map.len());
        let end = (end as usize).min(map.len());
        if end > start {
            let e = nonzero_end(&map[start..end]);
            if e > 0 {
                last = start + e;
            }
        }
    }
    last
}

/// The backend's write handle for a segment, opened on first write (opening may be
/// asynchronous, so it happens inside a flush job, never inside `append`).
pub(crate) struct SegmentWriter<B: LogIo> {
    path: PathBuf,
    file: RefCell<Option<Rc<B::File>>>,
}

impl<B: LogIo> SegmentWriter<B> {
    pub(crate) async fn file(&self, io: &B) -> std::io::Result<Rc<B::File>> {
        if let Some(f) = self.file.borrow().as_ref() {
            return Ok(f.clone());
        }
        let f = Rc::new(io.open(&self.path).await?);
        *self.file.borrow_mut() = Some(f.clone());
        Ok(f)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn close(&self) {
        self.file.borrow_mut().take();
    }
}

/// Staging buffers of exactly `STAGING_CHUNK_BYTES`, recycled after their write
/// and shared by a partition's segments.
pub(crate) struct BufPool<B: LogIo>(Rc<RefCell<Vec<B::Buf>>>);

impl<B: LogIo> Clone for BufPool<B> {
    fn clone(&self) -> Self {
        BufPool(self.0.clone())
    }
}

impl<B: LogIo> BufPool<B> {
    pub(crate) fn new() -> Self {
        BufPool(Rc::new(RefCell::new(Vec::new())))
    }

    fn take(&self, io: &B, len: usize) -> B::Buf {
        if len == STAGING_CHUNK_BYTES {
            if let Some(b) = self.0.borrow_mut().pop() {
                return b;
            }
        }
        io.alloc(len)
    }

    pub(crate) fn put(&self, buf: B::Buf) {
        let mut free = self.0.borrow_mut();
        if buf.as_slice().len() == STAGING_CHUNK_BYTES && free.len() < STAGING_BUFFERS_FREE_MAX {
            free.push(buf);
        }
    }
}

/// A page-aligned staging buffer covering file bytes `[pos, pos + filled)`.
pub(crate) struct Chunk<Buf> {
    pub(crate) buf: Buf,
    pub(crate) pos: u64,
    pub(crate) filled: usize,
}

impl<Buf: WriteBuf> Chunk<Buf> {
    fn room(&self) -> usize {
        self.buf.as_slice().len() - self.filled
    }

    /// Zeroes the padding up to the next block boundary and returns the write length.
    pub(crate) fn seal_for_write(&mut self) -> usize {
        let len = align_up(self.filled as u64) as usize;
        self.buf.as_mut_slice()[self.filled..len].fill(0);
        len
    }
}

/// The chunks of one segment that a flush job writes.
pub(crate) struct SegmentFlush<B: LogIo> {
    pub(crate) base: Offset,
    pub(crate) writer: Rc<SegmentWriter<B>>,
    pub(crate) chunks: Vec<Chunk<B::Buf>>,
    /// File position just past the last chunk byte this job writes.
    pub(crate) upto_len: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SegmentState {
    Active,
    /// No more appends; `trimmed` once the file was cut to its real length.
    Sealed {
        trimmed: bool,
    },
}

pub(crate) struct Segment<B: LogIo> {
    pub(crate) base: Offset,
    pub(crate) path: PathBuf,
    dir: PathBuf,
    file: File,
    index_file: File,
    time_file: File,
    map: Bytes,
    /// Whether any slice of `map` is still held (by a reader, or by `map` itself):
    /// retention reuses the file only once none is.
    map_watch: MapWatch,
    /// Preallocated file length (active) or real length (sealed).
    pub(crate) capacity: u64,
    /// Bytes from the start whose blocks are reserved (`fallocate`); the active
    /// segment's driver reserves more ahead of the appends
    /// (`Partition::begin_allocation`). Past it the file is a hole, which reads as
    /// zeros and takes writes all the same (the filesystem allocates them).
    pub(crate) allocated: u64,
    pub(crate) state: SegmentState,
    /// Bytes appended (staged or written).
    pub(crate) len: u64,
    pub(crate) next_offset: Offset,
    /// Bytes whose write completed: readers see up to here.
    pub(crate) written_len: u64,
    pub(crate) written_next: Offset,
    /// Bytes covered by a completed fdatasync.
    pub(crate) synced_len: u64,
    /// Bytes handed to a flush job.
    flush_issued_len: u64,
    /// `(end position, next offset)` of appended batches not yet published as
    /// written; chunk writes end anywhere, readers only ever see whole batches.
    batch_ends: std::collections::VecDeque<(u64, Offset)>,
    index: Vec<IndexEntry>,
    index_persisted: usize,
    time_index: Vec<TimeEntry>,
    time_persisted: usize,
    pub(crate) max_timestamp: Option<TimestampMs>,
    pub(crate) created: TimestampMs,
    last_batch_rel: Option<u32>,
    writer: Rc<SegmentWriter<B>>,
    pool: BufPool<B>,
    staging: Option<Chunk<B::Buf>>,
    ready: Vec<Chunk<B::Buf>>,
    /// Copies of the batches appended since the cache was attached (see
    /// [`tail_cache`](super::tail_cache)); reads of those positions use it.
    cache: Option<SegmentCache>,
    /// File bytes read by cold reads (`storage::cold`); reads of those positions
    /// use them instead of the map. The partition decides how many stay.
    cold: std::collections::VecDeque<ColdSpan>,
}

/// File bytes `[pos, pos + bytes.len())` of a segment, read from the disk into a
/// reused buffer; whole batches only, starting on a batch boundary.
struct ColdSpan {
    pos: u64,
    bytes: Bytes,
    /// The offset after its last batch.
    next: Offset,
}

impl ColdSpan {
    fn end(&self) -> u64 {
        self.pos + self.bytes.len() as u64
    }
}

impl<B: LogIo> std::fmt::Debug for Segment<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("path", &self.path)
            .field("len", &self.len)
            .field("next_offset", &self.next_offset)
            .field("state", &self.state)
            .finish()
    }
}

/// How a segment is opened by recovery.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Role {
    /// Not the last segment: the next segment starts at `next_base`. A file still
    /// `capacity` long was never trimmed, so it was not fully synced before a crash.
    Sealed { next_base: Offset, capacity: u64 },
    /// The last segment, which takes appends; sized to `capacity`.
    Active { capacity: u64 },
}

/// What recovery did to one segment.
#[derive(Debug, Default)]
pub(crate) struct SegmentRecovery {
    pub(crate) truncated_bytes: u64,
    pub(crate) truncated_at: Option<u64>,
    pub(crate) trimmed_bytes: u64,
    pub(crate) index_rebuilt: bool,
    pub(crate) corruption: Vec<StorageError>,
    pub(crate) batches_scanned: u64,
    /// Bytes cut after the last batch of a recycled active segment (its earlier
    /// contents, and any write that was never acknowledged), instead of
    /// `truncated_bytes`.
    pub(crate) recycled_bytes: u64,
    /// A sealed segment whose tail was never written (zeros where batches should
    /// be): a crash interrupted the flush that crossed a roll. Nothing after it
    /// was acknowledged, because writes are ordered by segment.
    pub(crate) incomplete: bool,
}

/// A sealed segment's file, to be cut to its real length.
#[derive(Debug)]
pub struct Trim {
    file: File,
    len: u64,
    path: PathBuf,
    base: Offset,
}

impl Trim {
    /// The base offset of the segment it cuts.
    pub(crate) fn base(&self) -> Offset {
        self.base
    }

    pub(crate) fn run(&self) -> Result<(), StorageError> {
        self.file
            .set_len(self.len)
            .map_err(|e| StorageError::io("truncate", &self.path, e))
    }
}

/// The open files and map of a new, empty segment.
struct SegmentFiles {
    file: File,
    index_file: File,
    time_file: File,
    map: Bytes,
    map_watch: MapWatch,
    /// Bytes from the file's start whose blocks are reserved.
    allocated: u64,
}

impl SegmentFiles {
    /// Creates `[log, index, time index]`, sizes the log to `capacity` with its
    /// first `reserve` bytes reserved ([`sio::size_and_reserve`]), syncs `dir` and
    /// maps the log. Blocks for about a millisecond here (the directory sync is a
    /// journal commit).
    fn create(
        dir: &Path,
        paths: &[PathBuf; 3],
        capacity: u64,
        reserve: u64,
    ) -> Result<Self, StorageError> {
        let [path, index_path, time_path] = paths;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| StorageError::io("create", path, e))?;
        let allocated = match sio::size_and_reserve(&file, capacity, reserve) {
            Ok(n) => n,
            Err(e) => {
                // Leave nothing behind, or every later roll would fail on the name.
                let _ = std::fs::remove_file(path);
                return Err(StorageError::io("fallocate", path, e));
            }
        };
        let index_file = open_rw(index_path, true)?;
        let time_file = open_rw(time_path, true)?;
        index_file
            .set_len(0)
            .map_err(|e| StorageError::io("truncate", index_path, e))?;
        time_file
            .set_len(0)
            .map_err(|e| StorageError::io("truncate", time_path, e))?;
        sio::sync_dir(dir).map_err(|e| StorageError::io("fsync dir", dir, e))?;
        Self::finish(file, index_file, time_file, path, capacity, allocated)
    }

    /// Maps `file` and assembles the set.
    fn finish(
        file: File,
        index_file: File,
        time_file: File,
        path: &Path,
        capacity: u64,
        allocated: u64,
    ) -> Result<Self, StorageError> {
        let (map, map_watch) =
            map_watched(&file, capacity).map_err(|e| StorageError::io("mmap", path, e))?;
        Ok(SegmentFiles {
            file,
            index_file,
            time_file,
            map,
            map_watch,
            allocated,
        })
    }
}

/// The files of the next segment, created ahead of its roll under `spare.*` names
/// so that the blocking steps (create, `fallocate`, directory sync, `mmap`: about
/// 1 ms, every 0.2-0.5 s under full load) run off the shard's thread. A roll
/// renames them ([`Segment::from_spare`]). Spares hold no data: recovery deletes
/// any it finds.
pub(crate) struct SpareSegment {
    files: SegmentFiles,
    capacity: u64,
}

impl std::fmt::Debug for SpareSegment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SpareSegment({} bytes)", self.capacity)
    }
}

impl SpareSegment {
    /// Creates a spare of `capacity` bytes in `dir`, replacing any spare files
    /// left there. Blocks; meant for a helper thread.
    pub(crate) fn create(dir: &Path, capacity: u64) -> Result<SpareSegment, StorageError> {
        remove_existing(spare_paths(dir))?;
        let files = SegmentFiles::create(
            dir,
            &spare_paths(dir),
            capacity,
            limits::SEGMENT_ALLOC_STEP_MAX_BYTES,
        )?;
        Ok(SpareSegment { files, capacity })
    }

    /// Makes the spare from the file of the expired segment at `base` instead of a
    /// new one: its log becomes `spare.log` (sized to `capacity`, reserved as a spare
    /// again), its indexes are removed and new empty ones created, and `dir` is
    /// synced. The blocks it had written stay written, so writes into them need no
    /// unwritten-extent conversion (a metadata write and, with `discard`, a discard
    /// per write: see docs/ARCHITECTURE.md, "Recycled segments"). The old batches
    /// stay in the file until overwritten; every reader is bounded by the written
    /// length, and recovery stops at the first batch whose offset does not follow,
    /// which theirs, below the new base, never do.
    ///
    /// The caller must know that no slice of the old segment's map is alive
    /// ([`MapWatch::in_use`]). On failure the old segment's files are removed, as
    /// retention would have, so that no expired segment comes back at the next open.
    /// Blocks; meant for a helper thread.
    pub(crate) fn recycle(
        dir: &Path,
        base: Offset,
        capacity: u64,
    ) -> Result<SpareSegment, StorageError> {
        let made = Self::recycle_inner(dir, base, capacity);
        if made.is_err() {
            let _ = remove_files(dir, base);
            let _ = remove_existing(spare_paths(dir));
        }
        made
    }

    fn recycle_inner(
        dir: &Path,
        base: Offset,
        capacity: u64,
    ) -> Result<SpareSegment, StorageError> {
        let paths = spare_paths(dir);
        let [log, index_path, time_path] = &paths;
        remove_existing(paths.clone())?;
        let from = log_path(dir, base);
        // The log first: once it is renamed the segment is gone from the log, and
        // its orphan indexes are removed below or by recovery.
        std::fs::rename(&from, log).map_err(|e| StorageError::io("rename", &from, e))?;
        remove_files(dir, base)?;
        let file = open_rw(log, false)?;
        // The old segment's blocks up to its length stay written (reserving them
        // again costs nothing); past it, reserve as for a spare.
        let written = file
            .metadata()
            .map_err(|e| StorageError::io("stat", log, e))?
            .len();
        let allocated = sio::size_and_reserve(
            &file,
            capacity,
            written.max(limits::SEGMENT_ALLOC_STEP_MAX_BYTES),
        )
        .map_err(|e| StorageError::io("fallocate", log, e))?;
        if let Err(e) = sio::set_mark(&file, RECYCLED_MARK) {
            tracing::debug!(file = %log.display(), error = %e, "could not mark a recycled segment");
        }
        let index_file = open_rw(index_path, true)?;
        let time_file = open_rw(time_path, true)?;
        sio::sync_dir(dir).map_err(|e| StorageError::io("fsync dir", dir, e))?;
        let files = SegmentFiles::finish(file, index_file, time_file, log, capacity, allocated)?;
        Ok(SpareSegment { files, capacity })
    }

    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }
}

/// The error for a scan of the segment at `path` that stopped at `position`.
fn stop_error(path: &Path, position: u64, stop: ScanStop) -> StorageError {
    match stop {
        ScanStop::Invalid(e) => StorageError::at(path, position, e),
        ScanStop::OffsetGap { expected, found } => StorageError::OffsetGap {
            segment: path.to_owned(),
            position,
            expected,
            found,
        },
        // A zero header where batches should go on (recovery's scan never stops
        // early; `Stopped` is listed only to keep this match exhaustive).
        ScanStop::End | ScanStop::Zeros | ScanStop::Stopped => StorageError::CorruptBatch {
            segment: path.to_owned(),
            position,
            source: batch::BatchError::Truncated {
                needed: HEADER_LEN,
                available: 0,
            },
        },
    }
}

fn open_rw(path: &Path, create: bool) -> Result<File, StorageError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
        .map_err(|e| StorageError::io("open", path, e))
}

impl<B: LogIo> Segment<B> {
    /// Creates a new, empty segment with its first blocks reserved (every blocking step of a roll,
    /// on the calling thread; [`Segment::from_spare`] is the cheap way).
    pub(crate) fn create(
        dir: &Path,
        base: Offset,
        capacity: u64,
        pool: BufPool<B>,
        now: TimestampMs,
    ) -> Result<Self, StorageError> {
        let paths = segment_paths(dir, base);
        let f = SegmentFiles::create(dir, &paths, capacity, limits::SEGMENT_ALLOC_FIRST_BYTES)?;
        let [path, _, _] = paths;
        Ok(Self::assemble(dir, base, path, f, capacity, pool, now))
    }

    /// Makes `spare` the segment starting at `base`: renames its files (indexes
    /// first, so a crash between the renames leaves only orphan indexes, which
    /// recovery removes). The new names are durable only after the directory is
    /// synced; the caller must sync it before acknowledging data of this segment.
    pub(crate) fn from_spare(
        dir: &Path,
        base: Offset,
        spare: SpareSegment,
        pool: BufPool<B>,
        now: TimestampMs,
    ) -> Result<Self, StorageError> {
        let [from_log, from_index, from_time] = spare_paths(dir);
        let path = log_path(dir, base);
        for (from, to) in [
            (from_index, index_path(dir, base)),
            (from_time, time_index_path(dir, base)),
            (from_log, path.clone()),
        ] {
            std::fs::rename(&from, &to).map_err(|e| StorageError::io("rename", &from, e))?;
        }
        Ok(Self::assemble(
            dir,
            base,
            path,
            spare.files,
            spare.capacity,
            pool,
            now,
        ))
    }

    fn assemble(
        dir: &Path,
        base: Offset,
        path: PathBuf,
        files: SegmentFiles,
        capacity: u64,
        pool: BufPool<B>,
        now: TimestampMs,
    ) -> Self {
        let SegmentFiles {
            file,
            index_file,
            time_file,
            map,
            map_watch,
            allocated,
        } = files;
        Segment {
            base,
            dir: dir.to_owned(),
            writer: Rc::new(SegmentWriter {
                path: path.clone(),
                file: RefCell::new(None),
            }),
            path,
            file,
            index_file,
            time_file,
            map,
            map_watch,
            capacity,
            allocated,
            state: SegmentState::Active,
            len: 0,
            next_offset: base,
            written_len: 0,
            written_next: base,
            synced_len: 0,
            flush_issued_len: 0,
            batch_ends: std::collections::VecDeque::new(),
            index: Vec::new(),
            index_persisted: 0,
            time_index: Vec::new(),
            time_persisted: 0,
            max_timestamp: None,
            created: now,
            last_batch_rel: None,
            pool,
            staging: None,
            ready: Vec::new(),
            cache: None,
            cold: std::collections::VecDeque::new(),
        }
    }

    /// Opens an existing segment and recovers it (see `docs/FORMAT.md`, "Recovery"):
    /// validate from the last index entry that checks out against the log (or from
    /// the start, rebuilding the indexes, when none does or `full` is set), then
    /// truncate a torn tail (active) or trim an untrimmed one (sealed).
    pub(crate) fn open(
        dir: &Path,
        base: Offset,
        role: Role,
        full: bool,
        io: &B,
        pool: BufPool<B>,
        now: TimestampMs,
    ) -> Result<(Self, SegmentRecovery), StorageError> {
        let path = log_path(dir, base);
        let file = open_rw(&path, false)?;
        let file_len = file
            .metadata()
            .map_err(|e| StorageError::io("stat", &path, e))?
            .len();
        let scan_map =
            map_readonly(&file, file_len).map_err(|e| StorageError::io("mmap", &path, e))?;
        // Where the file holds data (see `nonzero_end_from`): the scan reads only
        // that, fault by fault, after asking for what it will read in large reads
        // (`read_from`); a fault's usual read-around would also zero-fill megabytes
        // of reserved, never-written blocks (41 s to start 2,000 empty partitions).
        let regions = sio::data_regions(&file, 0);
        if regions.is_some() {
            // Where the filesystem cannot tell, every byte is read: leave the
            // kernel's read-around to it.
            crate::storage::mmap::advise_random(&scan_map);
        }
        let read_from = |from: u64, to: u64| {
            let all = [(0, file_len)];
            for &(a, b) in regions.as_deref().unwrap_or(&all) {
                let (a, b) = (a.max(from), b.min(to));
                if a < b {
                    crate::storage::mmap::read_ahead(&scan_map[a as usize..b as usize]);
                }
            }
        };
        let mut rec = SegmentRecovery::default();

        let read_opt = |p: PathBuf| match std::fs::read(&p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StorageError::io("read", p, e)),
        };
        let index_bytes = read_opt(index_path(dir, base))?;
        let time_bytes = read_opt(time_index_path(dir, base))?;
        let on_disk_index = index_bytes
            .as_deref()
            .and_then(|b| index::decode_index(b, file_len));
        let on_disk_time = time_bytes
            .as_deref()
            .and_then(|b| index::decode_time_index(b, u32::MAX));

        let index_file = open_rw(&index_path(dir, base), true)?;
        let time_file = open_rw(&time_index_path(dir, base), true)?;
        let files = SegmentFiles {
            file,
            index_file,
            time_file,
            map: Bytes::new(),
            map_watch: MapWatch::default(),
            allocated: file_len,
        };
        let mut seg = Self::assemble(dir, base, path.clone(), files, file_len, pool, now);

        // An on-disk index entry that checks out against the log: the batch there
        // parses whole with the offset the entry names (position, offset).
        let check = |e: &IndexEntry| {
            let expect = base.0.checked_add(u64::from(e.relative_offset)).map(Offset);
            match BatchRef::parse(scan_map.get(e.position as usize..)?) {
                Ok(b) if Some(b.base_offset()) == expect => {
                    Some((u64::from(e.position), b.base_offset()))
                }
                _ => None,
            }
        };
        // What the scan reads: from the last index entry by default, else from the
        // start (and from there too if that entry does not check out, below).
        let tail = match &on_disk_index {
            Some(ix) if !full => ix.last().map_or(0, |e| u64::from(e.position)),
            _ => 0,
        };
        read_from(tail, file_len);
        // The last entry, if it checks out: the index is written only after the
        // bytes it points into, so the log was whole up to there once
        // (`vouched`: position, offset, relative offset).
        let vouched = match &on_disk_index {
            Some(ix) if on_disk_time.is_some() => ix
                .last()
                .and_then(|e| check(e).map(|(pos, at)| (pos, at, e.relative_offset))),
            _ => None,
        };
        // Where to start validating: the vouched entry, unless `full`.
        let mut start = (0u64, base);
        let trusted = match (vouched, &on_disk_index, &on_disk_time) {
            (Some((pos, at, rel)), Some(ix), Some(tx)) if !full => {
                start = (pos, at);
                seg.index = ix.clone();
                seg.time_index = tx
                    .iter()
                    .copied()
                    .take_while(|t| t.relative_offset <= rel)
                    .collect();
                seg.max_timestamp = seg.time_index.last().map(|t| t.max_timestamp);
                true
            }
            _ => false,
        };

        if start.0 < tail {
            read_from(start.0, tail);
        }
        // Scan; `note_batch` rebuilds index entries past the trusted point.
        let mut infos = Vec::new();
        let mut scanned = scan(&scan_map, start.0, Some(start.1), |b| infos.push(*b));
        // Where a full scan went on past damage (indexes into `infos`).
        let mut resumed = Vec::new();
        if let (true, Some((last_pos, ..)), Some(ix)) = (full, vouched, &on_disk_index) {
            while scanned.end < last_pos {
                // A full scan stopped before the last index entry: damage to bytes
                // written whole once (bit rot, or a stray write), not a write that
                // a crash cut short. Reported, and the scan goes on from the first
                // index entry past it that checks out (the last one at the latest),
                // so a full recovery never cuts or drops more than the default one.
                let err = stop_error(&path, scanned.end, scanned.stop.clone());
                tracing::error!(segment = %path.display(), error = %err,
                    "damage before the last index entry; keeping the batches after it");
                rec.corruption.push(err);
                let end = scanned.end;
                let Some((pos, at)) = ix
                    .iter()
                    .filter(|e| u64::from(e.position) > end)
                    .find_map(&check)
                else {
                    break; // not reached: the last entry checks out
                };
                resumed.push(infos.len());
                scanned = scan(&scan_map, pos, Some(at), |b| infos.push(*b));
            }
        }
        // Offsets relative to the base and positions must fit the u32 index
        // fields; appends roll long before, so only a crafted file gets here.
        let fits = |b: &BatchInfo| {
            b.last_offset.0 - base.0 <= u64::from(u32::MAX) && b.position <= u64::from(u32::MAX)
        };
        if let Some(bad) = infos.iter().position(|b| !fits(b)) {
            let b = infos[bad];
            scanned.end = b.position;
            scanned.next_offset = Some(b.base_offset);
            scanned.stop = ScanStop::Invalid(batch::BatchError::BadLength {
                len: b.position,
                min: 0,
                max: u32::MAX as usize,
            });
            infos.truncate(bad);
        }
        for (i, b) in infos.iter().enumerate() {
            if resumed.contains(&i) {
                // Reads after the damage must start here, not scan into it.
                seg.push_index_entry(b.position, b.base_offset);
            }
            seg.note_batch(b.position, b.base_offset, b.last_offset, b.max_timestamp);
        }
        rec.batches_scanned = infos.len() as u64;
        // An empty segment has an empty index: nothing was lost or rebuilt.
        rec.index_rebuilt = !trusted && !infos.is_empty();
        if rec.index_rebuilt && !full {
            tracing::warn!(segment = %path.display(), "index missing or damaged; rebuilt from the log");
        }
        let end = scanned.end;
        let next = scanned.next_offset.unwrap_or(start.1);
        let garbage_end = nonzero_end_from(regions.as_deref(), &scan_map, end as usize);
        // Whether the bytes after the last batch start with the offset expected next.
        let own_next = scan_map[end as usize..garbage_end]
            .get(batch::BASE_OFFSET_POS..batch::BASE_OFFSET_POS + 8)
            .is_some_and(|b| b == next.0.to_le_bytes());
        drop(scan_map);

        let (len, next_offset, capacity) = match role {
            Role::Active { capacity } => {
                let capacity = capacity.max(align_up(end));
                let recycled = sio::has_mark(&seg.file, RECYCLED_MARK);
                // A recycled file (`SpareSegment::recycle`) still holds its earlier
                // segment's batches past the new ones: what follows the last batch
                // is theirs unless it starts like the batch expected next, which
                // is a torn or damaged write of this segment's own.
                if garbage_end as u64 > end && recycled && !own_next {
                    rec.recycled_bytes = garbage_end as u64 - end;
                    tracing::info!(
                        segment = %path.display(), position = end, bytes = rec.recycled_bytes,
                        "cut a recycled segment's bytes after its last batch"
                    );
                } else if garbage_end as u64 > end {
                    rec.truncated_bytes = garbage_end as u64 - end;
                    rec.truncated_at = Some(end);
                    tracing::warn!(
                        segment = %path.display(), position = end, bytes = rec.truncated_bytes,
                        reason = ?scanned.stop, "truncated a torn or corrupt tail"
                    );
                }
                // Reserved ahead of the appends as for a new segment (the blocks
                // before `end` hold data already).
                let reserve = align_up(end) + limits::SEGMENT_ALLOC_FIRST_BYTES;
                if garbage_end as u64 > end || file_len != capacity {
                    // Cut at the last valid batch, then size the file again: what
                    // follows reads as zeros, so stale bytes can never resurface as
                    // data.
                    seg.file
                        .set_len(end)
                        .map_err(|e| StorageError::io("truncate", &path, e))?;
                    seg.file
                        .set_len(capacity)
                        .map_err(|e| StorageError::io("truncate", &path, e))?;
                    // Best effort: a broker must start on a full disk (the driver
                    // reserves from the written end on).
                    seg.allocated = match sio::allocate(&seg.file, 0, reserve.min(capacity)) {
                        Ok(()) => reserve.min(capacity),
                        Err(e) => {
                            tracing::warn!(segment = %path.display(), error = %e, "could not reserve blocks past the recovered end");
                            align_up(end).min(capacity)
                        }
                    };
                    if recycled {
                        // Past `end` the file now reads as zeros, like a new one.
                        sio::clear_mark(&seg.file, RECYCLED_MARK)
                            .map_err(|e| StorageError::io("removexattr", &path, e))?;
                    }
                    seg.file
                        .sync_all()
                        .map_err(|e| StorageError::io("fsync", &path, e))?;
                } else {
                    // Only the written blocks are known to be there; the driver
                    // reserves from there (a start on a full disk must not fail).
                    seg.allocated = align_up(end).min(capacity);
                }
                (end, next, capacity)
            }
            Role::Sealed {
                next_base,
                capacity,
            } => {
                // Every offset up to the next segment is here: whatever follows is
                // not data (a recycled file's earlier batches, left by a crash before
                // the trim), and the trim below cuts it.
                let complete = next == next_base;
                if garbage_end as u64 > end && file_len == capacity && !complete {
                    // Untrimmed: the flush that filled this segment never finished
                    // (writes land out of order, so bytes may follow the hole).
                    // Nothing from the hole on was acknowledged.
                    rec.incomplete = true;
                    return Ok((seg, rec));
                } else if garbage_end as u64 > end && !complete {
                    let err = stop_error(&path, end, scanned.stop.clone());
                    tracing::error!(segment = %path.display(), error = %err, "corrupt sealed segment; keeping its bytes");
                    rec.corruption.push(err);
                    (file_len, next_base, file_len)
                } else if next != next_base && file_len > end {
                    rec.incomplete = true;
                    return Ok((seg, rec));
                } else {
                    if file_len > end {
                        rec.trimmed_bytes = file_len - end;
                        seg.file
                            .set_len(end)
                            .map_err(|e| StorageError::io("truncate", &path, e))?;
                    }
                    if next != next_base {
                        let err = StorageError::OffsetGap {
                            segment: path.clone(),
                            position: end,
                            expected: next,
                            found: next_base,
                        };
                        tracing::error!(error = %err, "offsets missing between segments");
                        rec.corruption.push(err);
                    }
                    (end, next, end)
                }
            }
        };
        seg.capacity = capacity;
        seg.len = len;
        seg.flush_issued_len = len;
        seg.written_len = len;
        seg.synced_len = len;
        seg.next_offset = next_offset;
        seg.written_next = next_offset;
        (seg.map, seg.map_watch) =
            map_watched(&seg.file, capacity).map_err(|e| StorageError::io("mmap", &path, e))?;
        if let Some(b) = infos.last() {
            seg.last_batch_rel = Some(seg.rel(b.base_offset));
        }

        // Persist the index as recovered (rewrite only what changed).
        let keep_index = on_disk_index
            .as_ref()
            .is_some_and(|ix| trusted && ix.len() == seg.index.len());
        let keep_time = on_disk_time
            .as_ref()
            .is_some_and(|t| trusted && t.len() == seg.time_index.len());
        seg.index_persisted = if keep_index { seg.index.len() } else { 0 };
        seg.time_persisted = if keep_time { seg.time_index.len() } else { 0 };
        if !keep_index {
            seg.index_file
                .set_len(0)
                .map_err(|e| StorageError::io("truncate", index_path(dir, base), e))?;
        }
        if !keep_time {
            seg.time_file
                .set_len(0)
                .map_err(|e| StorageError::io("truncate", time_index_path(dir, base), e))?;
        }
        match role {
            Role::Sealed { .. } => {
                seg.state = SegmentState::Sealed { trimmed: true };
                seg.push_final_time_entry();
            }
            Role::Active { .. } => {
                if len % IO_ALIGN_BYTES as u64 != 0 {
                    // Carry the partial last block so the next O_DIRECT write can
                    // rewrite it whole.
                    // Read, not through the map: a fault there would read (and
                    // zero-fill) megabytes of reserved blocks around it.
                    let pos = align_down(len);
                    let mut block = vec![0u8; (len - pos) as usize];
                    seg.file
                        .read_exact_at(&mut block, pos)
                        .map_err(|e| StorageError::io("read", &path, e))?;
                    let chunk = seg.carry_chunk(io, pos, &block, false);
                    seg.staging = Some(chunk);
                }
            }
        }
        seg.persist_index(len, next_offset)?;
        Ok((seg, rec))
    }

    fn rel(&self, offset: Offset) -> u32 {
        u32::try_from(offset.0 - self.base.0).expect("relative offset fits u32 (rolled before)")
    }

    /// Whether a slice of this segment's map is held anywhere.
    pub(crate) fn map_watch(&self) -> MapWatch {
        self.map_watch.clone()
    }

    pub(crate) fn is_active(&self) -> bool {
        self.state == SegmentState::Active
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Records a batch at `position` in the sparse indexes.
    fn note_batch(&mut self, position: u64, base: Offset, last: Offset, max_ts: TimestampMs) {
        let rel = self.rel(base);
        // Relative offsets of the last record must fit too.
        let _ = self.rel(last);
        self.max_timestamp = Some(self.max_timestamp.map_or(max_ts, |m| m.max(max_ts)));
        self.last_batch_rel = Some(rel);
        let due = self
            .index
            .last()
            .is_none_or(|e| position >= u64::from(e.position) + INDEX_INTERVAL_BYTES);
        if !due {
            return;
        }
        let position = u32::try_from(position).expect("segment position fits u32");
        self.index.push(IndexEntry {
            relative_offset: rel,
            position,
        });
        let max = self.max_timestamp.expect("set above");
        if self.time_index.last().is_none_or(|t| max > t.max_timestamp) {
            self.time_index.push(TimeEntry {
                max_timestamp: max,
                relative_offset: rel,
            });
        }
    }

    /// An offset-index entry for the batch at `position`, whatever the interval.
    fn push_index_entry(&mut self, position: u64, base: Offset) {
        let relative_offset = self.rel(base);
        let position = u32::try_from(position).expect("segment position fits u32");
        self.index.push(IndexEntry {
            relative_offset,
            position,
        });
    }

    fn push_final_time_entry(&mut self) {
        if let (Some(max), Some(rel)) = (self.max_timestamp, self.last_batch_rel) {
            if self
                .time_index
                .last()
                .is_none_or(|t| max > t.max_timestamp && rel > t.relative_offset)
            {
                self.time_index.push(TimeEntry {
                    max_timestamp: max,
                    relative_offset: rel,
                });
            }
        }
    }

    fn new_chunk(&self, io: &B, pos: u64) -> Chunk<B::Buf> {
        assert_eq!(
            pos % IO_ALIGN_BYTES as u64,
            0,
            "chunk start must be aligned"
        );
        assert!(pos < self.capacity, "chunk past segment capacity");
        let size = (STAGING_CHUNK_BYTES as u64).min(self.capacity - pos) as usize;
        Chunk {
            buf: self.pool.take(io, size),
            pos,
            filled: 0,
        }
    }

    /// A chunk of one block at `pos` that starts with `bytes`: the partial last block,
    /// already written (or recovered), that the next write must rewrite whole. It is
    /// rewritten by a write of its own, and the chunk after it starts on a block
    /// never written. A write spanning a written block and unwritten ones is not an
    /// overwrite to ext4, which then refuses to start it without blocking; io_uring
    /// hands such writes to a worker thread that runs one write per file at a time.
    /// Traced in scenario e: 3,502 of 3,673 writes went that way.
    ///
    /// Not so after a durable write job (O_DSYNC, see `Partition::begin_flush`): the
    /// next job is most likely durable too, and two O_DSYNC writes make the kernel
    /// flush the device twice. One write of the carried block and the new bytes
    /// goes to an io-wq worker and flushes once, which costs less. Scenario f (fsync
    /// producers of 10 KB batches), three interleaved runs: 114-117 MB/s with the
    /// carry in the next staging chunk, 102-108 with a chunk of its own, 104-108
    /// with writes and fdatasyncs (group-commit cycle p50 360-380 us, 400-420 and
    /// 520-560).
    /// With `whole`, the chunk is a full staging chunk instead of one block.
    fn carry_chunk(&self, io: &B, pos: u64, bytes: &[u8], whole: bool) -> Chunk<B::Buf> {
        assert!(bytes.len() < IO_ALIGN_BYTES, "carry is a partial block");
        let mut chunk = if whole {
            self.new_chunk(io, pos)
        } else {
            assert_eq!(pos % IO_ALIGN_BYTES as u64, 0, "carry must start a block");
            assert!(pos < self.capacity, "carry past segment capacity");
            Chunk {
                buf: self.pool.take(io, IO_ALIGN_BYTES),
                pos,
                filled: 0,
            }
        };
        chunk.buf.as_mut_slice()[..bytes.len()].copy_from_slice(bytes);
        chunk.filled = bytes.len();
        chunk
    }

    /// A second handle on the segment's file (for a reservation off the shard).
    pub(crate) fn file_handle(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    /// Reserves the file's blocks up to `to`, here and now (blocks).
    pub(crate) fn reserve_blocks(&mut self, to: u64) -> std::io::Result<()> {
        if to > self.allocated {
            sio::allocate(&self.file, self.allocated, to - self.allocated)?;
            self.allocated = to;
        }
        Ok(())
    }

    /// Room left for appends.
    pub(crate) fn room(&self) -> u64 {
        self.capacity - self.len
    }

    /// Appends a validated batch, stamping `base` into the copy. The caller checked
    /// that the batch fits and that this segment is active.
    pub(crate) fn append(&mut self, io: &B, batch: &BatchRef<'_>, base: Offset) {
        assert!(self.is_active(), "append to a sealed segment");
        assert_eq!(base, self.next_offset, "offsets must be contiguous");
        let bytes = batch.as_bytes();
        assert!(bytes.len() as u64 <= self.room(), "batch does not fit");
        let last = base.plus(u64::from(batch.header().last_offset_delta.get()));
        self.note_batch(self.len, base, last, batch.max_timestamp());
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&bytes[..HEADER_LEN]);
        batch::stamp_base_offset(&mut header, base);
        if let Some(c) = &mut self.cache {
            c.append(self.len, &header, &bytes[HEADER_LEN..]);
        }
        self.copy_in(io, &header);
        self.copy_in(io, &bytes[HEADER_LEN..]);
        self.next_offset = last.plus(1);
        self.batch_ends.push_back((self.len, self.next_offset));
    }

    fn copy_in(&mut self, io: &B, mut src: &[u8]) {
        while !src.is_empty() {
            let full = self.staging.as_ref().is_some_and(|c| c.room() == 0);
            if full {
                let c = self.staging.take().expect("checked");
                self.ready.push(c);
            }
            if self.staging.is_none() {
                assert_eq!(
                    self.len % IO_ALIGN_BYTES as u64,
                    0,
                    "unaligned end without staging"
                );
                let c = self.new_chunk(io, self.len);
                self.staging = Some(c);
            }
            let c = self.staging.as_mut().expect("just set");
            debug_assert_eq!(c.pos + c.filled as u64, self.len);
            let n = c.room().min(src.len());
            // Streaming stores: only the disk's DMA reads these bytes (storage::copy).
            crate::storage::copy::copy_streaming(
                &mut c.buf.as_mut_slice()[c.filled..c.filled + n],
                &src[..n],
            );
            c.filled += n;
            self.len += n as u64;
            src = &src[n..];
        }
    }

    /// Stops appends. Staged bytes still go out with the next flush; the file is
    /// trimmed once they are durable.
    pub(crate) fn seal(&mut self) {
        assert!(self.is_active());
        self.state = SegmentState::Sealed { trimmed: false };
        if let Some(c) = &mut self.cache {
            c.seal();
        }
        if let Some(c) = self.staging.take() {
            if c.pos + c.filled as u64 > self.flush_issued_len {
                self.ready.push(c);
            }
        }
        self.push_final_time_entry();
    }

    /// Hands bytes not yet given to a flush to the caller, in file order: up to
    /// `max_chunks` full chunks, plus the partial staging chunk when
    /// `include_partial` (or when there is no full chunk) and there is room. Returns
    /// the flush and whether it writes a partial last block that the next write of
    /// this segment will rewrite (a "carry"). With `carry_whole`, the carried block
    /// starts the next staging chunk instead of a one-block chunk of its own (see
    /// [`Segment::carry_chunk`]).
    pub(crate) fn take_unflushed(
        &mut self,
        io: &B,
        include_partial: bool,
        max_chunks: usize,
        carry_whole: bool,
    ) -> Option<(SegmentFlush<B>, bool)> {
        if self.len == self.flush_issued_len {
            return None;
        }
        assert!(max_chunks > 0);
        let n = self.ready.len().min(max_chunks);
        let mut chunks: Vec<_> = self.ready.drain(..n).collect();
        let mut carries = false;
        // The staging chunk follows every ready one, so it goes only after them.
        if self.ready.is_empty()
            && chunks.len() < max_chunks
            && (include_partial || chunks.is_empty())
        {
            if let Some(st) = self.staging.take() {
                if st.pos + st.filled as u64 > self.flush_issued_len {
                    if st.filled % IO_ALIGN_BYTES != 0 {
                        let keep = st.filled / IO_ALIGN_BYTES * IO_ALIGN_BYTES;
                        let pos = st.pos + keep as u64;
                        let carried = &st.buf.as_slice()[keep..st.filled];
                        let next = self.carry_chunk(io, pos, carried, carry_whole);
                        self.staging = Some(next);
                        carries = true;
                    }
                    chunks.push(st);
                } else {
                    self.staging = Some(st);
                }
            }
        }
        let last = chunks.last()?;
        let end = last.pos + last.filled as u64;
        assert!(
            end > self.flush_issued_len && end <= self.len,
            "flush range out of order"
        );
        self.flush_issued_len = end;
        Some((
            SegmentFlush {
                base: self.base,
                writer: self.writer.clone(),
                chunks,
                upto_len: end,
            },
            carries,
        ))
    }

    /// Whether [`Segment::take_unflushed`] with `include_partial` and `max_chunks`
    /// takes every unflushed byte.
    pub(crate) fn fits_one_flush(&self, max_chunks: usize) -> bool {
        self.ready.len() < max_chunks
    }

    /// Bytes appended but not yet handed to a flush.
    pub(crate) fn unflushed_bytes(&self) -> u64 {
        self.len - self.flush_issued_len
    }

    /// Every byte before `end` has been written: publish the whole batches in it
    /// and persist their index entries.
    pub(crate) fn advance_written(&mut self, end: u64) -> Result<(), StorageError> {
        assert!(end <= self.flush_issued_len, "written past what was issued");
        let mut last = None;
        while let Some(&(e, n)) = self.batch_ends.front() {
            if e > end {
                break;
            }
            last = Some((e, n));
            self.batch_ends.pop_front();
        }
        let Some((len, next)) = last else {
            return Ok(());
        };
        assert!(
            len > self.written_len && next > self.written_next,
            "written moved back"
        );
        self.written_len = len;
        self.written_next = next;
        if let Some(c) = &mut self.cache {
            c.publish(len);
        }
        Ok(())
    }

    /// Starts caching this segment's appends (from the next one on) under `budget`.
    pub(crate) fn attach_cache(&mut self, budget: &CacheBudget) {
        if self.is_active() && self.cache.is_none() {
            self.cache = budget.segment_cache(self.len);
        }
    }

    /// The readable bytes from file position `pos` up to at most `limit`, contiguous
    /// and ending on a batch boundary: from the tail cache when it holds `pos`,
    /// otherwise from the map (stopping where the cache starts, so the batches after
    /// come from memory). The flag says whether the bytes come from the map.
    /// A cold span read from the disk comes before the map, and a map region stops
    /// where the next span starts. Both count as from the map (checked by CRC).
    fn region(&self, pos: u64, limit: u64) -> (Bytes, bool) {
        if let Some(c) = &self.cache {
            if let Some(r) = c.region(pos, limit) {
                return (r, false);
            }
        }
        let end = self.disk_run_end(pos, limit);
        if let Some(s) = self.cold_at(pos) {
            let stop = end.min(s.end());
            return (
                s.bytes
                    .slice((pos - s.pos) as usize..(stop - s.pos) as usize),
                true,
            );
        }
        (self.map.slice(pos as usize..end as usize), true)
    }

    /// Where bytes read from the disk at `pos` (not cached) stop being the only
    /// source: at `limit`, where the tail cache starts, or where the next cold span
    /// starts, whichever comes first (each a batch boundary).
    fn disk_run_end(&self, pos: u64, limit: u64) -> u64 {
        let cache_first = self.cache.as_ref().and_then(SegmentCache::first_pos);
        let next_span = self.cold.iter().map(|s| s.pos).filter(|&p| p > pos).min();
        [cache_first, next_span]
            .into_iter()
            .flatten()
            .filter(|&p| p > pos)
            .fold(limit, u64::min)
    }

    /// Whether the tail cache holds file position `pos`.
    pub(crate) fn cached_at(&self, pos: u64) -> bool {
        self.cache
            .as_ref()
            .is_some_and(|c| c.region(pos, self.written_len).is_some())
    }

    /// Whether a read from `offset` would start in the map (neither cached nor in a
    /// cold span).
    pub(crate) fn would_read_map(&self, offset: Offset) -> bool {
        self.read_start(offset)
            .is_some_and(|pos| self.map_holds_only(pos))
    }

    /// Whether the bytes at `pos` are neither cached nor in a cold span.
    fn map_holds_only(&self, pos: u64) -> bool {
        self.cold_at(pos).is_none() && !self.cached_at(pos)
    }

    fn cold_at(&self, pos: u64) -> Option<&ColdSpan> {
        self.cold.iter().find(|s| s.pos <= pos && pos < s.end())
    }

    /// Where a read from `offset` starts scanning: the index entry before it (a
    /// batch boundary). `None` when nothing is written at `offset`.
    pub(crate) fn read_start(&self, offset: Offset) -> Option<u64> {
        if offset >= self.written_next || self.written_len == 0 {
            return None;
        }
        Some(
            self.index_entry_for(offset)
                .map_or(0, |e| u64::from(e.position)),
        )
    }

    /// The end of the cold span that holds file position `pos`, if one does, and
    /// the offset after its last batch.
    pub(crate) fn cold_end(&self, pos: u64) -> Option<(u64, Offset)> {
        self.cold_at(pos).map(|s| (s.end(), s.next))
    }

    /// The file span a cold read should bring into memory for reads from `pos` (a
    /// batch boundary) of about `max_bytes`: at most `COLD_WARM_BYTES_MAX` plus the
    /// two index intervals a read may scan first, never into the tail cache. `None`
    /// when the bytes at `pos` are in memory already (cached, or in a span), or
    /// nothing is written there.
    pub(crate) fn cold_plan_at(&self, pos: u64, max_bytes: usize) -> Option<(u64, usize)> {
        let limit = self.written_len;
        if pos >= limit || !self.map_holds_only(pos) {
            return None;
        }
        let want = max_bytes
            .min(COLD_WARM_BYTES_MAX)
            .saturating_add(2 * INDEX_INTERVAL_BYTES as usize) as u64;
        // Never into the tail cache or the next span: spans never hold the same
        // bytes twice.
        let end = self.disk_run_end(pos, limit.min(pos + want));
        Some((pos, (end - pos) as usize))
    }

    /// Keeps `bytes`, read from file position `pos` (a batch boundary, as
    /// [`Segment::cold_plan_at`] gave it), for reads: its whole batches only, and only
    /// what was written. Returns whether it kept anything.
    pub(crate) fn install_cold(&mut self, pos: u64, bytes: Bytes) -> bool {
        let written = self.written_len.saturating_sub(pos) as usize;
        let bytes = bytes.slice(..bytes.len().min(written));
        let (whole, next) = crate::storage::cold::whole_batches(&bytes);
        let Some(next) = next else { return false };
        if self.cold_at(pos).is_some() {
            return false;
        }
        self.cold.push_back(ColdSpan {
            pos,
            bytes: bytes.slice(..whole),
            next: Offset(next),
        });
        true
    }

    /// Lets go of the cold span read from `pos` (readers holding its bytes keep them).
    pub(crate) fn drop_cold(&mut self, pos: u64) {
        self.cold.retain(|s| s.pos != pos);
    }

    pub(crate) fn persist_index(&mut self, len: u64, next: Offset) -> Result<(), StorageError> {
        let n = self.index.partition_point(|e| u64::from(e.position) < len);
        if n > self.index_persisted {
            let mut buf = Vec::with_capacity((n - self.index_persisted) * index::INDEX_ENTRY_LEN);
            self.index[self.index_persisted..n]
                .iter()
                .for_each(|e| e.encode(&mut buf));
            let at = (self.index_persisted * index::INDEX_ENTRY_LEN) as u64;
            self.index_file
                .write_all_at(&buf, at)
                .map_err(|e| StorageError::io("write", index_path(&self.dir, self.base), e))?;
            self.index_persisted = n;
        }
        let written_rel = next.0 - self.base.0;
        let n = self
            .time_index
            .partition_point(|t| u64::from(t.relative_offset) < written_rel);
        if n > self.time_persisted {
            let mut buf = Vec::with_capacity((n - self.time_persisted) * index::TIME_ENTRY_LEN);
            self.time_index[self.time_persisted..n]
                .iter()
                .for_each(|e| e.encode(&mut buf));
            let at = (self.time_persisted * index::TIME_ENTRY_LEN) as u64;
            self.time_file
                .write_all_at(&buf, at)
                .map_err(|e| StorageError::io("write", time_index_path(&self.dir, self.base), e))?;
            self.time_persisted = n;
        }
        Ok(())
    }

    /// Whether every appended byte is written and fdatasynced.
    pub(crate) fn fully_synced(&self) -> bool {
        self.synced_len == self.len
    }

    /// Bytes written but not yet covered by an fdatasync.
    pub(crate) fn needs_sync(&self) -> bool {
        self.written_len > self.synced_len
    }

    pub(crate) fn writer(&self) -> &Rc<SegmentWriter<B>> {
        &self.writer
    }

    /// Marks a sealed, fully durable segment trimmed and closes its writer; returns
    /// the cut still to make on disk ([`Trim::run`], which blocks for 0.2-0.5 ms, so
    /// the caller may run it elsewhere). Until it is made, the file keeps its
    /// capacity-long tail, which recovery trims if a crash comes first.
    pub(crate) fn trim(&mut self) -> Result<Trim, StorageError> {
        assert_eq!(self.state, SegmentState::Sealed { trimmed: false });
        assert!(self.fully_synced());
        let file = self
            .file
            .try_clone()
            .map_err(|e| StorageError::io("dup", &self.path, e))?;
        self.writer.close();
        self.capacity = self.len;
        self.state = SegmentState::Sealed { trimmed: true };
        Ok(Trim {
            file,
            len: self.len,
            path: self.path.clone(),
            base: self.base,
        })
    }

    /// The last index entry at or before `offset` within the written bytes: where a
    /// read of `offset` starts scanning (`None`: from the segment's start).
    fn index_entry_for(&self, offset: Offset) -> Option<IndexEntry> {
        let rel = u32::try_from(offset.0.saturating_sub(self.base.0)).unwrap_or(u32::MAX);
        index::lookup(&self.index, rel, self.written_len)
    }

    /// The map bytes that [`Segment::read`] from `offset` of about `max_bytes` would
    /// fault in (from the index entry before `offset`, so the header scan is
    /// covered; at most `COLD_WARM_BYTES_MAX`), and twice that span of the map to
    /// read ahead for the read after it.
    /// `None` when the read starts in the tail cache or nothing is written at
    /// `offset`.
    pub(crate) fn cold_span(&self, offset: Offset, max_bytes: usize) -> Option<(Bytes, Bytes)> {
        if offset >= self.written_next || self.written_len == 0 {
            return None;
        }
        let limit = self.written_len;
        let pos = self
            .index_entry_for(offset)
            .map_or(0, |e| u64::from(e.position));
        let (region, from_map) = self.region(pos, limit);
        if !from_map {
            return None;
        }
        let want = max_bytes
            .min(COLD_WARM_BYTES_MAX)
            .saturating_add(2 * INDEX_INTERVAL_BYTES as usize);
        let span = region.slice(..want.min(region.len()));
        let ahead = region.slice(..(2 * want).min(region.len()));
        Some((span, ahead))
    }

    /// Reads whole batches starting with the one that holds `offset`, up to
    /// `max_bytes` (past it by one batch when `at_least_one` and the first batch is
    /// larger), from written bytes only, and pushes them onto `out` (one slice per
    /// contiguous region: the map, or a piece of the tail cache). Returns the bytes
    /// pushed (0 when the budget takes no batch) and the offset after the last
    /// batch, or `None` if this segment has no written batch at or after `offset`.
    pub(crate) fn read(
        &self,
        offset: Offset,
        max_bytes: usize,
        at_least_one: bool,
        out: &mut Vec<Bytes>,
    ) -> Result<Option<(usize, Offset)>, StorageError> {
        if offset >= self.written_next || self.written_len == 0 {
            return Ok(None);
        }
        let limit = self.written_len;
        let entry = self.index_entry_for(offset);
        let mut pos = entry.map_or(0, |e| u64::from(e.position));
        // The offset the batch at `pos` must start with: base offsets are not
        // covered by the CRC, so every header is checked against it.
        let mut expect = Offset(self.base.0 + u64::from(entry.map_or(0, |e| e.relative_offset)));
        let gap = |pos: u64, expected: Offset, found: u64| StorageError::OffsetGap {
            segment: self.path.clone(),
            position: pos,
            expected,
            found: Offset(found),
        };
        // The offset after the batch at `at`, checked against `expect`.
        let after = |at: &[u8], pos: u64, expect: Offset| -> Result<Offset, StorageError> {
            let h = batch::header(at).map_err(|e| StorageError::at(&self.path, pos, e))?;
            let found = h.base_offset.get();
            if found != expect.0 {
                return Err(gap(pos, expect, found));
            }
            expect
                .0
                .checked_add(u64::from(h.last_offset_delta.get()) + 1)
                .map(Offset)
                .ok_or_else(|| gap(pos, expect, found))
        };
        // The current region and the file position of its first byte.
        let (mut region, mut from_map) = self.region(pos, limit);
        let mut region_pos = pos;
        // Skip to the batch that holds `offset` (headers only).
        loop {
            if pos >= limit {
                return Ok(None);
            }
            if pos >= region_pos + region.len() as u64 {
                (region, from_map) = self.region(pos, limit);
                region_pos = pos;
            }
            let at = &region[(pos - region_pos) as usize..];
            let len = batch::check_header(at).map_err(|e| StorageError::at(&self.path, pos, e))?;
            let next = after(at, pos, expect)?;
            if next > offset {
                break;
            }
            expect = next;
            pos += len as u64;
        }
        let start = pos;
        let mut next = None;
        // Start of the bytes of the current region not yet pushed.
        let mut pushed_to = start;
        let mut push = |piece: Bytes, from_map: bool| {
            if let (false, Some(c)) = (from_map, &self.cache) {
                c.note_served(piece.len());
            }
            out.push(piece);
        };
        while pos < limit {
            if pos >= region_pos + region.len() as u64 {
                // A read through cold spans stops where they stop rather than fault
                // the map in on the shard: the next fetch reads on from there.
                if self.cold_at(region_pos).is_some() && self.map_holds_only(pos) {
                    break;
                }
                push(region.slice((pushed_to - region_pos) as usize..), from_map);
                (region, from_map) = self.region(pos, limit);
                region_pos = pos;
                pushed_to = pos;
            }
            let at = &region[(pos - region_pos) as usize..];
            // Bytes from the disk are checked whole; cached bytes are the batch that
            // append validated (CRC included) and copied, so their header suffices.
            let len = if from_map {
                batch::check_header_and_crc(at)
            } else {
                batch::check_header(at)
            }
            .map_err(|e| StorageError::at(&self.path, pos, e))?;
            if (pos > start || !at_least_one) && (pos - start) + len as u64 > max_bytes as u64 {
                break;
            }
            expect = after(at, pos, expect)?;
            next = Some(expect);
            pos += len as u64;
        }
        if pos > pushed_to {
            push(
                region.slice((pushed_to - region_pos) as usize..(pos - region_pos) as usize),
                from_map,
            );
        }
        let next = next.unwrap_or(offset);
        Ok(Some(((pos - start) as usize, next)))
    }

    /// What finding the first batch whose max timestamp is at or after `ts` has to
    /// read in this segment, or `None` when no batch here can qualify. Uses only the
    /// in-memory indexes; the scan itself reads the map (cold pages fault from the
    /// disk), so a shard runs it on a helper thread. It covers the bytes written so
    /// far: a qualifying batch appended but not yet written is not found.
    pub(crate) fn timestamp_scan(&self, ts: TimestampMs) -> Option<TimestampScan> {
        if self.max_timestamp.is_none_or(|m| m < ts) {
            return None;
        }
        // Start at the last time entry whose max is below `ts`: no batch up to it
        // qualifies, so scanning from it finds the first one that does.
        let i = self.time_index.partition_point(|t| t.max_timestamp < ts);
        let start_rel = i
            .checked_sub(1)
            .map_or(0, |j| self.time_index[j].relative_offset);
        let (pos, first) =
            index::lookup(&self.index, start_rel, self.written_len).map_or((0, self.base), |e| {
                (
                    u64::from(e.position),
                    Offset(self.base.0 + u64::from(e.relative_offset)),
                )
            });
        Some(TimestampScan {
            base: self.base,
            path: self.path.clone(),
            written: self.map.slice(..self.written_len as usize),
            pos,
            first,
            ts,
        })
    }

    pub(crate) fn index_entries(&self) -> usize {
        self.index.len()
    }
}

/// One segment's part of a timestamp lookup ([`Segment::timestamp_scan`]): its
/// written bytes (a clone of the map, which stays valid after the segment is
/// deleted) and where to start. Runs anywhere, with no borrow of the partition.
#[derive(Debug, Clone)]
pub struct TimestampScan {
    /// The base offset of the segment scanned.
    pub base: Offset,
    path: PathBuf,
    written: Bytes,
    pos: u64,
    first: Offset,
    ts: TimestampMs,
}

impl TimestampScan {
    /// The segment's written bytes that the scan covers.
    pub fn written_len(&self) -> u64 {
        self.written.len() as u64
    }

    /// The first offset in the segment whose batch has a max timestamp at or after
    /// the lookup's, if one does.
    pub fn run(self) -> Result<Option<Offset>, StorageError> {
        let ts = self.ts;
        let mut found = None;
        // With the offsets checked: a batch out of sequence (in a sealed segment
        // kept whole despite damage, a recycled file's earlier batches may follow
        // its own) ends the scan.
        let s = scan_while(&self.written, self.pos, Some(self.first), |b| {
            if b.max_timestamp >= ts {
                found = Some(b.base_offset);
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        if let ScanStop::Invalid(e) = s.stop {
            if found.is_none() {
                return Err(StorageError::at(&self.path, s.end, e));
            }
        }
        Ok(found)
    }
}
