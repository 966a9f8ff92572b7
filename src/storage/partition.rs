//! A partition: the ordered segments of one log. Owns offset assignment, rolling,
//! fetches across segments, group-commit bookkeeping, durability watermarks, retention,
//! fencing after I/O failure, and recovery on open.
//!
//! The partition never performs data I/O itself: [`Partition::begin_flush`] hands out
//! a [`FlushJob`] (writes) and [`Partition::begin_sync`] a [`SyncJob`] (fdatasync);
//! the caller runs them on a [`LogIo`] backend (io_uring in the broker, blocking in
//! tests) and reports back with [`Partition::complete_write`] and
//! [`Partition::complete_sync`]. Between those calls the partition stays usable, so
//! appends continue while I/O is in flight, and the next write job streams to the
//! disk while the previous bytes are being synced. Time comes in as arguments, so the
//! whole state machine runs in plain unit tests.
//!
//! Offsets visible to readers stop at the *written* watermark: bytes whose write
//! completed (they survive a process crash). The *durable* watermark trails it by the
//! fdatasync. `Durability::Memory` acknowledges at the first, `Durability::Fsync` at
//! the second.

use crate::batch::{BatchError, ValidBatch};
use crate::limits;
use crate::storage::cold::{self, ReadPool};
use crate::storage::io::LogIo;
use crate::storage::mmap::{self, MapWatch};
use crate::storage::segment::{
    self, BufPool, Role, Segment, SegmentFlush, SegmentWriter, SpareSegment, TimestampScan, Trim,
};
use crate::storage::tail_cache::CacheBudget;
use crate::storage::watermark::{WaitFailed, WaitFor, Watermark};
use crate::storage::StorageError;
use crate::types::{Offset, TimestampMs};
use bytes::Bytes;
use futures_util::future::Either;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// When a produce is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// After the bytes are fdatasynced: survives a machine crash.
    #[default]
    Fsync,
    /// After the write completed: survives a process crash, not a machine crash.
    Memory,
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fsync" => Ok(Durability::Fsync),
            "memory" => Ok(Durability::Memory),
            other => Err(format!("unknown durability {other:?} (fsync|memory)")),
        }
    }
}

/// How much of the log recovery validates on open. In a broker's TOML file:
/// `recovery = "tail_from_index"` (the default) or `"full"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecoveryPolicy {
    /// Validate each segment from its last index entry that checks out against the
    /// log; rebuild the index from the start of the segment when none does.
    #[default]
    TailFromIndex,
    /// Validate every batch of every segment and rebuild every index.
    Full,
}

/// How a partition rolls, keeps, flushes and recovers its log. A broker holds one as
/// the defaults of its topics (`[topic_defaults]` in its TOML file), which a topic's
/// own settings override.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PartitionConfig {
    /// Roll when the active segment cannot take the next batch within this size.
    pub segment_bytes: u64,
    /// Roll when the active segment is older than this.
    pub segment_ms: Option<u64>,
    /// Delete the oldest segments while the rest still hold at least this much.
    pub retention_bytes: Option<u64>,
    /// Delete segments whose newest record is older than this.
    pub retention_ms: Option<u64>,
    /// Group commit: flush once this many bytes are pending ...
    pub flush_bytes: u64,
    /// ... or once the oldest pending byte waited this long. Not applied while a
    /// producer waits for fsync durability and under `flush_bytes / 4` is pending:
    /// that data is written at once.
    pub flush_delay_us: u64,
    /// How much of the log is validated when the partition opens.
    pub recovery: RecoveryPolicy,
}

impl Default for PartitionConfig {
    fn default() -> Self {
        PartitionConfig {
            segment_bytes: limits::SEGMENT_BYTES_DEFAULT,
            segment_ms: None,
            retention_bytes: None,
            retention_ms: None,
            flush_bytes: limits::FLUSH_BYTES_DEFAULT,
            flush_delay_us: limits::FLUSH_DELAY_US_DEFAULT,
            recovery: RecoveryPolicy::TailFromIndex,
        }
    }
}

impl PartitionConfig {
    /// Checks the settings; returns the segment capacity they give (block-aligned).
    pub fn validate(&self) -> Result<u64, StorageError> {
        if !(limits::SEGMENT_BYTES_MIN..=limits::SEGMENT_BYTES_MAX).contains(&self.segment_bytes) {
            return Err(StorageError::Config(format!(
                "segment_bytes {} outside [{}, {}]",
                self.segment_bytes,
                limits::SEGMENT_BYTES_MIN,
                limits::SEGMENT_BYTES_MAX
            )));
        }
        let capacity = segment::align_up(self.segment_bytes);
        Ok(capacity.min(segment::align_down(limits::SEGMENT_BYTES_MAX)))
    }
}

/// Offsets given to an appended batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub base_offset: Offset,
    pub last_offset: Offset,
}

/// Batches read from the log: zero-copy slices of the segment maps.
#[derive(Debug, Clone)]
pub struct Fetch {
    /// Whole batches, in offset order; one slice per segment touched.
    pub chunks: Vec<Bytes>,
    /// The offset to fetch next.
    pub next_offset: Offset,
    /// Offsets below this are readable (written).
    pub high_watermark: Offset,
    pub log_start: Offset,
}

impl Fetch {
    pub fn bytes(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum()
    }
}

/// Which staged bytes a write job takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushScope {
    /// What group commit calls for: full chunks when enough bytes are pending,
    /// everything when the delay ran out.
    Due,
    /// Everything, including the partial last block (explicit flush, shutdown).
    All,
}

/// When the group-commit driver should flush next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushDue {
    Idle,
    Now,
    At(Instant),
}

/// What recovery did on open. Also logged through `tracing`.
#[derive(Debug, Default)]
pub struct RecoveryReport {
    pub segments: usize,
    pub next_offset: Offset,
    pub batches_scanned: u64,
    /// Torn or corrupt tail bytes cut from the active segment.
    pub truncated_bytes: u64,
    pub truncated_at: Option<(PathBuf, u64)>,
    /// Zero padding cut from sealed segments that were not trimmed before a crash
    /// (for a recycled segment, its earlier contents).
    pub trimmed_bytes: u64,
    /// Bytes cut after the last batch of a recycled active segment: the file's
    /// earlier contents (and any write that was never acknowledged). Expected after
    /// any restart with recycling on; not damage.
    pub recycled_bytes: u64,
    pub indexes_rebuilt: Vec<PathBuf>,
    /// Damage that recovery did not repair because it would drop sealed data.
    pub corruptions: Vec<StorageError>,
    pub removed_files: Vec<PathBuf>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Segments dropped from the log (recycled ones included).
    pub segments_deleted: usize,
    pub bytes_deleted: u64,
    pub new_log_start: Offset,
    /// Of those, segments whose file became the next spare instead of being
    /// removed ([`SpareSegment::recycle`]).
    pub segments_recycled: usize,
}

/// Write jobs started since a partition was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushStats {
    pub jobs: u64,
    /// Jobs that wrote a partial last block, which the next job rewrites.
    pub carries: u64,
    /// Jobs written durable (their own sync: see [`Partition::begin_flush`]).
    pub durable: u64,
}

/// The chunks one flush writes, and the watermark it moves.
pub struct FlushJob<B: LogIo> {
    id: u64,
    segments: Vec<SegmentFlush<B>>,
    bytes: u64,
    /// Written with [`LogIo::write_durable_at`]: the job is its own sync.
    durable: bool,
    /// Buffers the backend handed back, for the partition's pool.
    returned: RefCell<Vec<B::Buf>>,
}

impl<B: LogIo> std::fmt::Debug for FlushJob<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlushJob")
            .field("id", &self.id)
            .field("segments", &self.segments.len())
            .field("bytes", &self.bytes)
            .field("durable", &self.durable)
            .finish()
    }
}

impl<B: LogIo> FlushJob<B> {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether the job is written durable, as its own sync.
    pub fn is_durable(&self) -> bool {
        self.durable
    }

    /// Writes every chunk, all of them at once (a job holds at most
    /// `job_chunks_max` chunks). Writes may
    /// land in any order (and jobs may overlap); the partition publishes only the
    /// prefix of jobs that completed, and recovery cuts any unpublished bytes that
    /// follow a hole.
    pub async fn write(&mut self, io: &B) -> std::io::Result<()> {
        for seg in &mut self.segments {
            let file = seg.writer.file(io).await?;
            let chunks = std::mem::take(&mut seg.chunks);
            let file = &file;
            let durable = self.durable;
            stream::iter(chunks.into_iter().map(|mut c| {
                let len = c.seal_for_write();
                // Two futures of different types; `Either` keeps the stream's item one.
                if durable {
                    Either::Left(io.write_durable_at(file, c.buf, len, c.pos))
                } else {
                    Either::Right(io.write_at(file, c.buf, len, c.pos))
                }
            }))
            .buffer_unordered(job_chunks_max(durable))
            .try_for_each(|buf| {
                self.returned.borrow_mut().extend(buf);
                std::future::ready(Ok(()))
            })
            .await?;
        }
        Ok(())
    }

    fn first_path(&self) -> PathBuf {
        self.segments
            .first()
            .map(|s| s.writer.path().to_owned())
            .unwrap_or_default()
    }
}

/// One fdatasync round: every segment with written bytes not yet synced.
pub struct SyncJob<B: LogIo> {
    /// `(base, writer, written length, written next offset)` per segment.
    segments: Vec<(Offset, Rc<SegmentWriter<B>>, u64, Offset)>,
    /// The partition's directory, when a segment was renamed into it since the last
    /// sync (a roll onto a spare): its entries must be durable with the data.
    dir: Option<PathBuf>,
    upto: Offset,
}

impl<B: LogIo> std::fmt::Debug for SyncJob<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncJob")
            .field("segments", &self.segments.len())
            .field("upto", &self.upto)
            .finish()
    }
}

impl<B: LogIo> SyncJob<B> {
    /// The offset that becomes durable when this job completes.
    pub fn upto(&self) -> Offset {
        self.upto
    }

    /// fdatasyncs the segments; covers every write that completed before the job
    /// was taken.
    pub async fn run(&self, io: &B) -> std::io::Result<()> {
        for (_, writer, _, _) in &self.segments {
            let file = writer.file(io).await?;
            io.sync_data(&file).await?;
        }
        if let Some(dir) = &self.dir {
            io.sync_dir(dir).await?;
        }
        Ok(())
    }

    fn first_path(&self) -> PathBuf {
        self.segments
            .first()
            .map(|s| s.1.path().to_owned())
            .unwrap_or_default()
    }
}

/// A write job the partition is waiting on.
#[derive(Debug)]
struct InFlightJob {
    id: u64,
    done: bool,
    /// `(segment base, file position the job writes up to)` per segment.
    ends: Vec<(Offset, u64)>,
}

pub struct Partition<B: LogIo> {
    dir: PathBuf,
    config: PartitionConfig,
    capacity: u64,
    io: B,
    pool: BufPool<B>,
    segments: VecDeque<Segment<B>>,
    next_offset: Offset,
    pending_since: Option<Instant>,
    /// Write jobs in flight, oldest first.
    jobs: VecDeque<InFlightJob>,
    next_job_id: u64,
    /// Write jobs that carried a partial block (each one holds back the next job).
    carry_jobs: u64,
    /// The in-flight job that writes a partial block the next job would rewrite;
    /// no job starts until it completes.
    carry_job: Option<u64>,
    /// The in-flight job written durable (its own sync); no job starts until it
    /// completes, so it acknowledges exactly what it wrote.
    durable_job: Option<u64>,
    /// Durable write jobs started since open.
    durable_jobs: u64,
    /// A sync job completed since open: only then is everything written known to
    /// be durable (see `begin_flush`).
    synced_since_open: bool,
    sync_in_flight: bool,
    fenced: Option<(&'static str, String)>,
    appended: Watermark,
    written: Watermark,
    durable: Watermark,
    kicks: Watermark,
    /// Where new segments' tail caches draw their memory; `None` reads the maps only.
    cache: Option<CacheBudget>,
    /// Where the next segment comes from.
    spare: Spare,
    reserve: Reserve,
    /// Segments below this base are never reused as spares, only removed: after a
    /// reopen ([`Partition::keep_old_files`]) maps of the partition this one
    /// replaced may still be read, which this one's watches do not see.
    reuse_from: Offset,
    /// Bumped when a spare is wanted, for the driver that creates it.
    spare_kicks: Watermark,
    /// A roll happened and retention limits are set: the driver applies retention
    /// at once, so that an expired segment's file can become the next spare.
    retention_due: bool,
    /// A segment was renamed into the directory since the last sync job was taken.
    dir_unsynced: bool,
    /// Sealed segments marked trimmed whose files are still to be cut.
    trims: Vec<Trim>,
    /// Base offsets of the segments whose cut is running on a helper thread. Until
    /// it has run, retention leaves them alone: a cut that ran after the file was
    /// recycled would shorten the next segment's file.
    cutting: Vec<Offset>,
    /// Expired segments, oldest first, whose files a failed retirement left in the
    /// directory: the next pass retires them before any newer segment, so the
    /// directory never holds an expired segment, a hole, then newer ones.
    unretired: Vec<(Offset, MapWatch)>,
    /// Buffers for cold reads (`storage::cold`); `None` faults the maps in instead.
    read_pool: Option<ReadPool>,
    /// What the cold read tasks touch without borrowing the partition.
    cold: Rc<ColdState>,
    /// Cold spans kept in the segments, `(segment base, file position)`.
    cold_spans: VecDeque<(Offset, u64)>,
    /// Where the last cold read started `(segment base, file position, max_bytes)`:
    /// read-ahead follows it.
    cold_reader: Option<(Offset, u64, usize)>,
    /// When a read last went through the cold spans; idle spans give their buffers
    /// back ([`Partition::expire_cold_spans`]).
    cold_used: Option<Instant>,
}

/// Cold-read bookkeeping shared with the read tasks, so that a task dropped
/// half-way can undo its part without borrowing the partition.
struct ColdState {
    /// Reads in flight, `(segment base, file position)`.
    reads: RefCell<Vec<(Offset, u64)>>,
    /// Positions whose read kept nothing (a batch larger than a span, a header that
    /// does not parse, a failed read): the map serves reads there, and they are not
    /// read cold again. The most recent `COLD_DEAD_MAX`.
    dead: RefCell<VecDeque<(Offset, u64)>>,
    /// Bumped when a cold read ends, for fetches waiting on one in flight.
    done: Watermark,
    /// A read-ahead task is running.
    ahead_running: Cell<bool>,
}

impl ColdState {
    fn in_flight(&self, at: (Offset, u64)) -> bool {
        self.reads.borrow().contains(&at)
    }

    fn is_dead(&self, at: (Offset, u64)) -> bool {
        self.dead.borrow().contains(&at)
    }

    /// The read at `at` ended (completed, failed or dropped).
    fn end_read(&self, at: (Offset, u64)) {
        self.reads.borrow_mut().retain(|k| *k != at);
        self.done.advance(self.done.get() + 1);
    }
}

/// Most chunks in one write job, all written at once: a durable job may take a
/// backlog, a plain one keeps to small jobs that stream side by side.
fn job_chunks_max(durable: bool) -> usize {
    if durable {
        limits::DURABLE_JOB_CHUNKS_MAX
    } else {
        limits::FLUSH_JOB_CHUNKS_MAX
    }
}

/// Positions remembered as unreadable cold ([`ColdState::dead`]).
const COLD_DEAD_MAX: usize = 64;

/// What a read needs before it runs ([`Partition::cold_read_plan`]).
#[derive(Debug)]
pub enum ColdPlan {
    /// Its bytes are in memory (tail cache or cold spans), or nothing is written.
    Ready,
    /// This span is to be read from the disk first.
    Read(ColdRead),
    /// A cold read there kept nothing before: the read goes through the map.
    Map,
}

/// A span of one segment file for a cold read to bring into memory.
#[derive(Debug, Clone)]
pub struct ColdRead {
    base: Offset,
    path: PathBuf,
    pos: u64,
    len: usize,
}

/// The partition's next segment, prepared off the shard's thread (see
/// [`SpareSegment`]).
enum Spare {
    /// None yet: one is asked for once the active segment is half full.
    Idle,
    /// Asked for; the driver has not started it yet.
    Wanted,
    /// Being created on a helper thread.
    Preparing,
    Ready(SpareSegment),
    /// Creating one failed: the next roll creates its segment in place (and
    /// reports the error if it fails again); the one after asks anew.
    Failed,
}

/// Reserving more of the active segment's blocks ahead of the appends
/// ([`Partition::begin_allocation`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reserve {
    Idle,
    /// Asked for; the driver has not started it yet.
    Wanted,
    /// Running on a helper thread.
    Running,
    /// The last reservation failed (a full disk): appends that reach past the
    /// reserved part reserve on the shard's thread first, and are refused if that
    /// fails too, so the disk filling up costs appends an error, not the partition.
    Failed,
}

/// One reservation of a segment's blocks, run off the shard's thread
/// ([`Allocation::run`]).
#[derive(Debug)]
pub struct Allocation {
    base: Offset,
    file: std::fs::File,
    path: PathBuf,
    from: u64,
    to: u64,
}

impl Allocation {
    /// Reserves `[from, to)` of the segment's file. Blocks. Does nothing to a file
    /// already cut to its length (sealed and trimmed after a roll meanwhile):
    /// blocks reserved past its end would stay until the file is deleted.
    pub fn run(&self) -> std::io::Result<()> {
        if self.file.metadata()?.len() < self.to {
            return Ok(());
        }
        crate::storage::io::allocate(&self.file, self.from, self.to - self.from)
    }
}

/// How far past `allocated` the active segment's next reservation reaches: it
/// doubles what is reserved, by at least the first and at most the largest step.
fn reserve_step(allocated: u64) -> u64 {
    allocated.clamp(
        limits::SEGMENT_ALLOC_FIRST_BYTES,
        limits::SEGMENT_ALLOC_STEP_MAX_BYTES,
    )
}

impl Spare {
    fn name(&self) -> &'static str {
        match self {
            Spare::Idle => "idle",
            Spare::Wanted => "wanted",
            Spare::Preparing => "preparing",
            Spare::Ready(_) => "ready",
            Spare::Failed => "failed",
        }
    }
}

impl<B: LogIo> std::fmt::Debug for Partition<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition")
            .field("dir", &self.dir)
            .field("segments", &self.segments.len())
            .field("next_offset", &self.next_offset)
            .field("written", &self.written.get())
            .field("durable", &self.durable.get())
            .finish()
    }
}

impl<B: LogIo> Partition<B> {
    /// Opens (creating if needed) the partition stored in `dir` and recovers it.
    pub fn open(
        dir: impl AsRef<Path>,
        config: PartitionConfig,
        io: B,
        now: TimestampMs,
    ) -> Result<(Self, RecoveryReport), StorageError> {
        let dir = dir.as_ref().to_owned();
        let capacity = config.validate()?;
        std::fs::create_dir_all(&dir).map_err(|e| StorageError::io("create dir", &dir, e))?;
        let mut bases = Vec::new();
        let mut others = Vec::new();
        let entries = std::fs::read_dir(&dir).map_err(|e| StorageError::io("list", &dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| StorageError::io("list", &dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(base) = segment::parse_log_name(name) {
                bases.push(base);
            } else {
                others.push(name.to_owned());
            }
        }
        bases.sort();
        let mut report = RecoveryReport::default();
        // Index files whose log is gone (a crash during retention) are removed, and
        // so are spare segments (they never hold data).
        for name in others {
            if segment::is_spare_name(&name) {
                let p = dir.join(&name);
                std::fs::remove_file(&p).map_err(|e| StorageError::io("remove", &p, e))?;
                report.removed_files.push(p);
                continue;
            }
            let stem = name
                .strip_suffix(".index")
                .or_else(|| name.strip_suffix(".timeindex"));
            if let Some(base) = stem.and_then(|s| segment::parse_log_name(&format!("{s}.log"))) {
                if bases.binary_search(&base).is_err() {
                    let p = dir.join(&name);
                    std::fs::remove_file(&p).map_err(|e| StorageError::io("remove", &p, e))?;
                    report.removed_files.push(p);
                }
            }
        }
        let full = config.recovery == RecoveryPolicy::Full;
        let pool = BufPool::new();
        let mut segments = VecDeque::new();
        if bases.is_empty() {
            segments.push_back(Segment::create(
                &dir,
                Offset(0),
                capacity,
                pool.clone(),
                now,
            )?);
        }
        for (i, &base) in bases.iter().enumerate() {
            let role = match bases.get(i + 1) {
                Some(&next_base) => Role::Sealed {
                    next_base,
                    capacity,
                },
                None => Role::Active { capacity },
            };
            let (mut seg, mut rec) = Segment::open(&dir, base, role, full, &io, pool.clone(), now)?;
            let incomplete = rec.incomplete;
            if incomplete {
                // Everything after this segment's last written batch was never
                // acknowledged: drop the later segments and make this one active.
                drop(seg);
                for &later in &bases[i + 1..] {
                    report
                        .removed_files
                        .extend(segment::remove_files(&dir, later)?);
                }
                // Durably, before this segment takes new data: were the removals
                // lost in a crash, the old segments would come back after the
                // new data and overlap it.
                crate::storage::io::sync_dir(&dir)
                    .map_err(|e| StorageError::io("fsync dir", &dir, e))?;
                tracing::warn!(
                    segment = %segment::log_path(&dir, base).display(), dropped_segments = bases.len() - i - 1,
                    "segment was not fully written before a crash; later segments held only unacknowledged data"
                );
                (seg, rec) = Segment::open(
                    &dir,
                    base,
                    Role::Active { capacity },
                    full,
                    &io,
                    pool.clone(),
                    now,
                )?;
            }
            let last = incomplete || role_is_active(role);
            report.batches_scanned += rec.batches_scanned;
            report.trimmed_bytes += rec.trimmed_bytes;
            report.recycled_bytes += rec.recycled_bytes;
            if rec.truncated_bytes > 0 {
                report.truncated_bytes += rec.truncated_bytes;
                report.truncated_at = rec.truncated_at.map(|p| (seg.path.clone(), p));
            }
            if rec.index_rebuilt {
                report.indexes_rebuilt.push(seg.path.clone());
            }
            report.corruptions.extend(rec.corruption);
            segments.push_back(seg);
            if last {
                break;
            }
        }
        let next_offset = segments.back().expect("at least one segment").next_offset;
        report.segments = segments.len();
        report.next_offset = next_offset;
        tracing::info!(
            dir = %dir.display(), segments = report.segments, next_offset = %next_offset,
            truncated_bytes = report.truncated_bytes, indexes_rebuilt = report.indexes_rebuilt.len(),
            corruptions = report.corruptions.len(), "partition recovered"
        );
        let p = Partition {
            dir,
            config,
            capacity,
            io,
            pool,
            segments,
            next_offset,
            pending_since: None,
            jobs: VecDeque::new(),
            next_job_id: 0,
            carry_jobs: 0,
            carry_job: None,
            durable_job: None,
            durable_jobs: 0,
            synced_since_open: false,
            sync_in_flight: false,
            fenced: None,
            appended: Watermark::new(next_offset.0),
            written: Watermark::new(next_offset.0),
            durable: Watermark::new(next_offset.0),
            kicks: Watermark::new(0),
            cache: None,
            spare: Spare::Idle,
            reserve: Reserve::Idle,
            reuse_from: Offset(0),
            spare_kicks: Watermark::new(0),
            retention_due: false,
            dir_unsynced: false,
            trims: Vec::new(),
            cutting: Vec::new(),
            unretired: Vec::new(),
            read_pool: None,
            cold: Rc::new(ColdState {
                reads: RefCell::new(Vec::new()),
                dead: RefCell::new(VecDeque::new()),
                done: Watermark::new(0),
                ahead_running: Cell::new(false),
            }),
            cold_spans: VecDeque::new(),
            cold_reader: None,
            cold_used: None,
        };
        Ok((p, report))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &PartitionConfig {
        &self.config
    }

    pub fn io(&self) -> &B {
        &self.io
    }

    /// The offset the next appended record gets.
    pub fn next_offset(&self) -> Offset {
        self.next_offset
    }

    /// Offsets below this are written and readable.
    pub fn written_offset(&self) -> Offset {
        Offset(self.written.get())
    }

    /// Offsets below this are fdatasynced.
    pub fn durable_offset(&self) -> Offset {
        Offset(self.durable.get())
    }

    /// The first offset still in the log.
    pub fn log_start(&self) -> Offset {
        self.segments.front().expect("at least one segment").base
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Bytes in all segments.
    pub fn size_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// Base offsets of the segments, oldest first.
    pub fn segment_bases(&self) -> Vec<Offset> {
        self.segments.iter().map(|s| s.base).collect()
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.is_some()
    }

    fn fenced_error(&self) -> Option<StorageError> {
        self.fenced
            .as_ref()
            .map(|(op, reason)| StorageError::Fenced {
                op,
                reason: reason.clone(),
            })
    }

    /// Validates one record batch (all of `batch`), assigns its offsets, and copies
    /// it once into the active segment's staging buffer. The batch becomes readable
    /// once a flush writes it.
    pub fn append(
        &mut self,
        batch: &[u8],
        now: Instant,
        wall: TimestampMs,
    ) -> Result<Appended, StorageError> {
        self.check_fenced()?;
        let b = ValidBatch::parse(batch)?;
        if b.batch().len() != batch.len() {
            return Err(BatchError::TrailingBytes {
                end: b.batch().len(),
                len: batch.len(),
            }
            .into());
        }
        self.append_valid(b, now, wall)
    }

    /// Appends the batches of one request, all or none: whatever can refuse an
    /// append (a batch larger than a segment, the roll to a new segment, reserving
    /// blocks on a full disk) is done or checked before the first batch goes in, so
    /// a refused request leaves nothing behind that a retry would duplicate. To
    /// that end a request that does not fit in the active segment starts a new one
    /// (the active segment is sealed with that room unused), and its batches all go
    /// into one segment. Only a request larger than a whole segment (or with more
    /// offsets than one holds) is appended batch by batch, and may be cut where a
    /// later roll fails.
    pub fn append_all(
        &mut self,
        batches: &[ValidBatch<'_>],
        now: Instant,
        wall: TimestampMs,
    ) -> Result<Vec<Appended>, StorageError> {
        self.check_fenced()?;
        let mut total = 0u64;
        let mut span = 0u64;
        for b in batches {
            let b = b.batch();
            if b.len() as u64 > self.capacity {
                return Err(StorageError::BatchTooLarge {
                    len: b.len(),
                    segment_bytes: self.capacity,
                });
            }
            total += b.len() as u64;
            span += u64::from(b.header().last_offset_delta.get()) + 1;
        }
        if batches.len() < 2 || total > self.capacity || span > u64::from(u32::MAX) {
            return batches
                .iter()
                .map(|&b| self.append_valid(b, now, wall))
                .collect();
        }
        // One decision for the whole request: after it, nothing below can refuse,
        // and no batch rolls on its own (a segment past `segment_ms` once its first
        // batch is in would otherwise roll in the middle of the request).
        if self.needs_roll(total, span, wall) {
            self.roll(wall)?;
        }
        self.reserve_for_append(total)?;
        Ok(batches.iter().map(|&b| self.append_here(b, now)).collect())
    }

    /// Whether `len` bytes holding `span` offsets need a new segment first.
    fn needs_roll(&self, len: u64, span: u64, wall: TimestampMs) -> bool {
        let active = self.segments.back().expect("at least one segment");
        let too_old = self.config.segment_ms.is_some_and(|ms| {
            !active.is_empty()
                && wall.0.saturating_sub(active.created.0) >= i64::try_from(ms).unwrap_or(i64::MAX)
        });
        let offsets_full = self.next_offset.0 - active.base.0 + span > u64::from(u32::MAX);
        active.room() < len || too_old || offsets_full
    }

    /// [`Partition::append`] of a batch already checked whole (the broker checks
    /// every batch of a request before appending any).
    pub fn append_valid(
        &mut self,
        batch: ValidBatch<'_>,
        now: Instant,
        wall: TimestampMs,
    ) -> Result<Appended, StorageError> {
        self.check_fenced()?;
        let b = batch.batch();
        let len = b.len() as u64;
        if len > self.capacity {
            return Err(StorageError::BatchTooLarge {
                len: b.len(),
                segment_bytes: self.capacity,
            });
        }
        let span = u64::from(b.header().last_offset_delta.get()) + 1;
        if self.needs_roll(len, span, wall) {
            self.roll(wall)?;
        }
        self.reserve_for_append(len)?;
        Ok(self.append_here(batch, now))
    }

    /// Appends `batch` to the active segment, which the caller made sure has the
    /// room, the offsets and the reserved blocks for it.
    fn append_here(&mut self, batch: ValidBatch<'_>, now: Instant) -> Appended {
        let b = batch.batch();
        let len = b.len() as u64;
        let span = u64::from(b.header().last_offset_delta.get()) + 1;
        let base = self.next_offset;
        let io = &self.io;
        let active = self.segments.back_mut().expect("at least one segment");
        active.append(io, &b, base);
        self.next_offset = active.next_offset;
        assert_eq!(self.next_offset, base.plus(span));
        self.want_spare_if_due();
        self.want_allocation_if_due();
        let pending = self.pending_bytes();
        self.pending_since.get_or_insert(now);
        self.appended.advance(self.next_offset.0);
        if pending - len < self.config.flush_bytes && pending >= self.config.flush_bytes {
            self.kicks.advance(self.kicks.get() + 1);
        }
        Appended {
            base_offset: base,
            last_offset: Offset(self.next_offset.0 - 1),
        }
    }

    /// Seals the active segment and starts a new one at the next offset: the
    /// spare, renamed, when one is ready (its name becomes durable with the next
    /// sync), otherwise a segment created here and now.
    pub fn roll(&mut self, wall: TimestampMs) -> Result<(), StorageError> {
        if self.segments.back().is_some_and(Segment::is_empty) {
            return Ok(());
        }
        let (dir, base, pool) = (&self.dir, self.next_offset, self.pool.clone());
        tracing::debug!(dir = %dir.display(), %base, spare = self.spare.name(), "roll");
        let mut seg = match std::mem::replace(&mut self.spare, Spare::Idle) {
            Spare::Ready(spare) if spare.capacity() == self.capacity => {
                let seg = Segment::from_spare(dir, base, spare, pool, wall)?;
                self.dir_unsynced = true;
                seg
            }
            other => {
                if matches!(other, Spare::Preparing) {
                    // It lands later and serves the roll after this one.
                    self.spare = Spare::Preparing;
                }
                Segment::create(dir, base, self.capacity, pool, wall)?
            }
        };
        if let Some(budget) = &self.cache {
            seg.attach_cache(budget);
        }
        self.segments
            .back_mut()
            .expect("at least one segment")
            .seal();
        self.segments.push_back(seg);
        if self.reserve == Reserve::Failed {
            // The new segment came with its own first reservation.
            self.reserve = Reserve::Idle;
        }
        if self.config.retention_bytes.is_some() || self.config.retention_ms.is_some() {
            self.retention_due = true;
            self.spare_kicks.advance(self.spare_kicks.get() + 1);
        }
        Ok(())
    }

    /// Whether a roll asked for retention since the last call (and clears it).
    pub(crate) fn take_retention_due(&mut self) -> bool {
        std::mem::take(&mut self.retention_due)
    }

    /// Bumped whenever the partition wants a spare segment made
    /// ([`Partition::begin_spare`]).
    pub fn spare_kick_watch(&self) -> Watermark {
        self.spare_kicks.clone()
    }

    /// If a spare segment is wanted, marks it in preparation and returns where and
    /// how large to create it ([`SpareSegment::create`], off the shard's thread);
    /// hand the outcome to [`Partition::complete_spare`].
    pub(crate) fn begin_spare(&mut self) -> Option<(PathBuf, u64)> {
        if self.fenced.is_some() || !matches!(self.spare, Spare::Wanted) {
            return None;
        }
        self.spare = Spare::Preparing;
        Some((self.dir.clone(), self.capacity))
    }

    /// Takes the spare made for [`Partition::begin_spare`]. A failure is only
    /// logged: the next roll creates its segment itself, and fails loudly if the
    /// cause persists.
    pub(crate) fn complete_spare(&mut self, made: Result<SpareSegment, StorageError>) {
        self.spare = match made {
            Ok(spare) => Spare::Ready(spare),
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "could not prepare the next segment");
                Spare::Failed
            }
        };
    }

    /// Takes the outcome of the recycling that [`Partition::take_expired`] planned:
    /// the spare, an error (logged: the next roll creates its segment itself), or
    /// `None` when every expired segment's map was still read, so none could be
    /// reused; then a spare is asked for as usual.
    fn complete_recycle(&mut self, made: Option<Result<SpareSegment, StorageError>>) {
        match made {
            Some(made) => self.complete_spare(made),
            None => {
                self.spare = Spare::Idle;
                self.want_spare_if_due();
            }
        }
    }

    /// Asks for a spare once the active segment is half full and none is on its way.
    fn want_spare_if_due(&mut self) {
        let half = self
            .segments
            .back()
            .is_some_and(|s| s.len >= self.capacity / 2);
        if matches!(self.spare, Spare::Idle) && half {
            self.spare = Spare::Wanted;
            self.spare_kicks.advance(self.spare_kicks.get() + 1);
        }
    }

    /// For a partition opened to replace one still read through its maps (a reopen
    /// after a fence): the files it opened are never reused as spares, only
    /// removed, since the old maps' readers are invisible to this partition.
    pub fn keep_old_files(&mut self) {
        let active = self.segments.back().expect("at least one segment");
        self.reuse_from = active.base.plus(1);
    }

    /// Asks the driver to reserve more of the active segment once the appends are
    /// within half a step of the end of its reserved part.
    fn want_allocation_if_due(&mut self) {
        let s = self.segments.back().expect("at least one segment");
        let due = s.allocated < s.capacity && s.len + reserve_step(s.allocated) / 2 >= s.allocated;
        if due && self.reserve == Reserve::Idle {
            self.reserve = Reserve::Wanted;
            self.spare_kicks.advance(self.spare_kicks.get() + 1);
        }
    }

    /// If a reservation is wanted, marks it running and returns it, to be run off
    /// the shard's thread and handed to [`Partition::complete_allocation`].
    pub fn begin_allocation(&mut self) -> Option<Allocation> {
        if self.fenced.is_some() || self.reserve != Reserve::Wanted {
            return None;
        }
        let s = self.segments.back().expect("at least one segment");
        let to = (s.allocated + reserve_step(s.allocated)).min(s.capacity);
        let job = s.file_handle().map(|file| Allocation {
            base: s.base,
            file,
            path: s.path.clone(),
            from: s.allocated,
            to,
        });
        match job {
            Ok(job) => {
                self.reserve = Reserve::Running;
                Some(job)
            }
            Err(e) => {
                tracing::warn!(segment = %s.path.display(), error = %e, "could not reserve the segment's next blocks");
                self.reserve = Reserve::Failed;
                None
            }
        }
    }

    /// Takes the outcome of an [`Allocation`]. A failure is only logged here; the
    /// appends that reach past the reserved part then reserve first
    /// ([`Partition::append_valid`]).
    pub fn complete_allocation(&mut self, job: &Allocation, result: std::io::Result<()>) {
        let active = self.segments.back_mut().expect("at least one segment");
        if active.base != job.base {
            // Rolled meanwhile; the new segment has its own reservation.
            self.reserve = Reserve::Idle;
        } else {
            match result {
                Ok(()) => {
                    active.allocated = active.allocated.max(job.to);
                    self.reserve = Reserve::Idle;
                }
                Err(e) => {
                    tracing::warn!(segment = %job.path.display(), from = job.from, to = job.to, error = %e,
                        "could not reserve the segment's next blocks");
                    self.reserve = Reserve::Failed;
                }
            }
        }
        self.want_allocation_if_due();
    }

    /// Before an append of `len` bytes to the active segment: after a reservation
    /// failed, one that reaches past the reserved part reserves first, here on the
    /// shard's thread, and is refused (nothing appended, the partition unharmed)
    /// if the disk is still full. While the driver's reservation is only late, the
    /// append goes ahead: the filesystem allocates what it writes past the
    /// reserved part.
    fn reserve_for_append(&mut self, len: u64) -> Result<(), StorageError> {
        let s = self.segments.back_mut().expect("at least one segment");
        if self.reserve != Reserve::Failed || s.len + len <= s.allocated {
            return Ok(());
        }
        let to = (s.allocated + reserve_step(s.allocated))
            .max(segment::align_up(s.len + len))
            .min(s.capacity);
        s.reserve_blocks(to)
            .map_err(|e| StorageError::io("fallocate", &s.path, e))?;
        self.reserve = Reserve::Idle;
        Ok(())
    }

    /// Keeps copies of the batches appended from now on in memory under `budget`
    /// (a shard's), so that reads near the tail do not go to the disk. Data written
    /// before the call, or evicted since, is read from the segment maps.
    pub fn set_tail_cache(&mut self, budget: CacheBudget) {
        self.segments
            .back_mut()
            .expect("at least one segment")
            .attach_cache(&budget);
        self.cache = Some(budget);
    }

    /// Reads data the tail cache does not hold with O_DIRECT into `pool`'s buffers
    /// ([`prepare_read`]), instead of faulting the segment maps in.
    pub fn set_read_pool(&mut self, pool: ReadPool) {
        self.read_pool = Some(pool);
    }

    /// Gives every cold span's buffer back to the shard's pool and reads through
    /// the maps from here on: for a partition whose driver has ended (fenced), since
    /// nothing would expire its idle spans any more.
    pub fn stop_cold_reads(&mut self) {
        self.read_pool = None;
        for at in self.cold_spans.clone() {
            self.drop_cold_span(at);
        }
        self.cold_used = None;
    }

    /// What a read from `from` of about `max_bytes` needs first: the cold read of
    /// the span that holds the batch with `from` (`Segment::cold_plan_at`, after the
    /// spans that end before it). Looks at the first segment the read touches.
    pub fn cold_read_plan(&self, from: Offset, max_bytes: usize) -> ColdPlan {
        let Some((seg, mut pos)) = self.read_start(from) else {
            return ColdPlan::Ready;
        };
        // The read scans from the index entry before `from`; spans whose batches all
        // come before `from` are only walked through.
        while let Some((end, next)) = seg.cold_end(pos) {
            if next > from {
                return ColdPlan::Ready;
            }
            pos = end;
        }
        if self.cold.is_dead((seg.base, pos)) {
            return ColdPlan::Map;
        }
        match seg.cold_plan_at(pos, max_bytes) {
            Some((pos, len)) => ColdPlan::Read(ColdRead {
                base: seg.base,
                path: seg.path.clone(),
                pos,
                len,
            }),
            None => ColdPlan::Ready,
        }
    }

    /// The segment a read from `from` starts in, and the file position it scans from.
    fn read_start(&self, from: Offset) -> Option<(&Segment<B>, u64)> {
        let seg = self.first_read_segment(from)?;
        Some((seg, seg.read_start(from.max(seg.base))?))
    }

    /// The segment whose first offset is `base`, if the partition still has it.
    fn segment_at(&self, base: Offset) -> Option<&Segment<B>> {
        self.segments.iter().find(|s| s.base == base)
    }

    fn segment_at_mut(&mut self, base: Offset) -> Option<&mut Segment<B>> {
        self.segments.iter_mut().find(|s| s.base == base)
    }

    /// The first segment with written batches at or after `from`; `None` when
    /// `from` is outside the readable range.
    fn first_read_segment(&self, from: Offset) -> Option<&Segment<B>> {
        if from < self.log_start() || from >= self.written_offset() {
            return None;
        }
        self.segments
            .iter()
            .skip(self.segment_holding(from))
            .find(|s| from.max(s.base) < s.written_next)
    }

    /// The next read-ahead for the last cold reader: the first span past the cold
    /// spans from its position on (into the next segment at a segment's end),
    /// unless `COLD_AHEAD_SPANS` spans after its own are there already, or that
    /// read is in flight or known to keep nothing.
    fn cold_ahead_plan(&self) -> Option<ColdRead> {
        let (mut base, mut pos, max_bytes) = self.cold_reader?;
        let mut spans = 0;
        loop {
            let i = self.segments.iter().position(|s| s.base == base)?;
            let seg = &self.segments[i];
            if let Some((end, _)) = seg.cold_end(pos) {
                // The reader's own span, then the ones ready after it.
                spans += 1;
                if spans > limits::COLD_AHEAD_SPANS {
                    return None;
                }
                pos = end;
                continue;
            }
            if pos >= seg.written_len {
                // A sealed segment read to its end: on to the next one.
                let next = self.segments.get(i + 1)?;
                if seg.is_active() {
                    return None;
                }
                (base, pos) = (next.base, 0);
                continue;
            }
            if self.cold.in_flight((base, pos)) || self.cold.is_dead((base, pos)) {
                return None;
            }
            let (pos, len) = seg.cold_plan_at(pos, max_bytes)?;
            return Some(ColdRead {
                base,
                path: seg.path.clone(),
                pos,
                len,
            });
        }
    }

    /// Keeps what a cold read brought (if its segment is still there), lets fetches
    /// waiting for it look again, and returns whether anything was kept. A read that
    /// kept nothing marks its position dead: a failed read is only logged, and the
    /// map serves that position (and reports a real problem with the file itself).
    fn complete_cold_read(&mut self, r: &ColdRead, got: std::io::Result<Bytes>) -> bool {
        let kept = match got {
            // Cold reads were stopped while this one ran: its buffer goes back.
            Ok(_) if self.read_pool.is_none() => false,
            Ok(bytes) => self
                .segment_at_mut(r.base)
                .is_some_and(|seg| seg.install_cold(r.pos, bytes)),
            Err(e) => {
                tracing::warn!(path = %r.path.display(), pos = r.pos, error = %e, "cold read failed; reading through the map");
                false
            }
        };
        if kept {
            // Over the limit, the span earliest in the log goes (never the one just
            // read): a sequential reader has left it behind.
            if self.cold_spans.len() >= limits::COLD_SPANS_PER_PARTITION {
                let oldest = self.cold_spans.iter().copied().min();
                if let Some(at) = oldest {
                    self.drop_cold_span(at);
                }
            }
            self.cold_spans.push_back((r.base, r.pos));
        } else {
            let mut dead = self.cold.dead.borrow_mut();
            if dead.len() >= COLD_DEAD_MAX {
                dead.pop_front();
            }
            dead.push_back((r.base, r.pos));
        }
        self.cold.end_read((r.base, r.pos));
        kept
    }

    fn drop_cold_span(&mut self, at: (Offset, u64)) {
        self.cold_spans.retain(|k| *k != at);
        if let Some(seg) = self.segment_at_mut(at.0) {
            seg.drop_cold(at.1);
        }
    }

    /// Gives back the buffers of cold spans that end at or before file position
    /// `pos` of segment `base` (a reader has moved past them).
    fn drop_cold_spans_before(&mut self, base: Offset, pos: u64) {
        let behind: Vec<(Offset, u64)> = self
            .cold_spans
            .iter()
            .copied()
            .filter(|&(b, p)| {
                b < base
                    || (b == base
                        && self
                            .segment_at(b)
                            .and_then(|s| s.cold_end(p))
                            .is_some_and(|(end, _)| end <= pos))
            })
            .collect();
        for at in behind {
            self.drop_cold_span(at);
        }
    }

    /// Drops every cold span when no read has gone through them for
    /// `COLD_IDLE_MS`, so that a reader that left does not keep the shard's read
    /// buffers. Called with retention's periodic check.
    pub fn expire_cold_spans(&mut self, now: Instant) {
        let idle = self.cold_used.is_some_and(|t| {
            now.saturating_duration_since(t) >= Duration::from_millis(limits::COLD_IDLE_MS)
        });
        if idle {
            for at in self.cold_spans.clone() {
                self.drop_cold_span(at);
            }
            self.cold_used = None;
        }
    }

    /// Bytes appended but not yet handed to a write job.
    pub fn pending_bytes(&self) -> u64 {
        self.segments.iter().map(Segment::unflushed_bytes).sum()
    }

    /// Counts of write jobs since open.
    pub fn flush_stats(&self) -> FlushStats {
        FlushStats {
            jobs: self.next_job_id,
            carries: self.carry_jobs,
            durable: self.durable_jobs,
        }
    }

    /// Write jobs in flight.
    pub fn writes_in_flight(&self) -> usize {
        self.jobs.len()
    }

    /// Bytes written but not yet covered by an fdatasync.
    pub fn unsynced_bytes(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.written_len - s.synced_len)
            .sum()
    }

    /// When the group-commit driver should flush.
    pub fn flush_due(&self, now: Instant) -> FlushDue {
        let pending = self.pending_bytes();
        if self.fenced.is_some() || pending == 0 {
            return FlushDue::Idle;
        }
        if pending >= self.config.flush_bytes {
            return FlushDue::Now;
        }
        // A sync holds the partial chunk back only when producers wait for it; a
        // background sync acknowledges nobody.
        let acking_sync = self.sync_in_flight && self.durable.waiter_count() > 0;
        if !self.jobs.is_empty() || acking_sync {
            // Only a partial chunk is pending and I/O is in flight: writing it now
            // would carry its last block and hold back every later job until it
            // lands. Wait for that I/O (its acknowledgements bring more data that
            // may fill the chunk); the driver looks again when it completes.
            // Measured: 40% of jobs were carries with 8 MiB in flight, and the
            // appends ran at 0.7x of what 16 MiB in flight (1% carries) reached.
            return FlushDue::Idle;
        }
        if self.durable.waiter_count() > 0 && pending < self.config.flush_bytes / 4 {
            // A producer waits for fsync: the sync that acknowledges it cannot
            // start before this write, so the delay would only add to its latency.
            // Group commit still happens at the sync: data that arrives while one
            // runs is held back above and goes out together after it. Measured with
            // scenario e's client at 140k msgs/s of 1 KB: ack p50 0.82-0.92 ms, from
            // 1.12-1.14 ms with the 200 us delay. At 550k msgs/s a sync is nearly
            // always in flight, so p50 stayed at 2.1-2.3 ms.
            // Only for a small partial chunk: a large one usually means producers
            // stream big batches back to back, and the delay lets the next one fill
            // the chunk instead of leaving a carry that holds back every later job.
            // Without that limit, 4 fsync producers x 4 partitions (scenario c) ran
            // 4% slower (5 interleaved runs each: 1,173-1,418 against 1,211-1,490
            // MB/s); with it, 1,304-1,485.
            return FlushDue::Now;
        }
        let since = self.pending_since.unwrap_or(now);
        let at = since + Duration::from_micros(self.config.flush_delay_us);
        if at <= now {
            FlushDue::Now
        } else {
            FlushDue::At(at)
        }
    }

    /// Takes staged bytes into a write job. With [`FlushScope::Due`] and at least
    /// `flush_bytes` pending, only full chunks go (so jobs never overlap and several
    /// stream at once); otherwise the partial last chunk goes too, and its job
    /// must finish before the next starts, because the next rewrites that block.
    /// Returns `None` when nothing is pending, `FLUSH_JOBS_IN_FLIGHT_MAX` jobs are
    /// running, a carry or durable job is running, or the partition is fenced.
    ///
    /// A job is written durable ([`LogIo::write_durable_at`], O_DSYNC) when a
    /// producer waits for fsync, everything written before is durable, no other I/O
    /// is in flight, and the job takes all that is pending from the active segment
    /// (even past `flush_bytes`, up to `DURABLE_JOB_CHUNKS_MAX` chunks).
    /// Its completion then acknowledges the fsync producers: one round trip through
    /// the ring, where a write and then an fdatasync take two (each one waiting for
    /// the reactor to submit and to reap it). Scenario e at 550k msgs/s: group-commit
    /// cycle p50 573-800 us against 922-1,027 with fdatasync, ack p50 1.70-2.01 ms
    /// against 2.07-2.31. Because nothing before it is undurable, the job is correct
    /// whether the kernel flushes the device after it or writes it with FUA. No job
    /// starts while it runs, so it acknowledges exactly what it wrote. The cost:
    /// consumers see these bytes only once durable (e2e p50 +0.25 ms in e).
    pub fn begin_flush(&mut self, scope: FlushScope) -> Option<FlushJob<B>> {
        if self.fenced.is_some()
            || self.carry_job.is_some()
            || self.durable_job.is_some()
            || self.jobs.len() >= limits::FLUSH_JOBS_IN_FLIGHT_MAX
        {
            return None;
        }
        let include_partial =
            scope == FlushScope::All || self.pending_bytes() < self.config.flush_bytes;
        // Before taking (see above): a producer waits for durability, everything
        // written so far is durable, no I/O is in flight, and the job will take all
        // that is pending from the active segment. Durable means synced by this
        // process: recovered bytes may sit in the device's cache, which an O_DSYNC
        // write with FUA would not flush, so the first sync after open is a real one.
        let active_only =
            self.segments
                .iter()
                .rev()
                .skip(1)
                .all(|s| s.unflushed_bytes() == 0)
                && self.segments.back().is_some_and(|s| {
                    s.is_active() && s.fits_one_flush(limits::DURABLE_JOB_CHUNKS_MAX)
                });
        let durable_ok = self.durable.waiter_count() > 0
            && self.synced_since_open
            && self.jobs.is_empty()
            && !self.sync_in_flight
            && !self.dir_unsynced
            && self.written.get() == self.durable.get()
            && self.unsynced_bytes() == 0
            && active_only;
        let include_partial = include_partial || durable_ok;
        let io = &self.io;
        let mut carries = false;
        let mut segments = Vec::new();
        // Small jobs (a few chunks) complete, and acknowledge, one after another
        // while the next ones stream: one big job would hold every ack until its
        // slowest write finished and leave the disk idle while producers refill.
        let mut budget = job_chunks_max(durable_ok);
        for seg in self.segments.iter_mut() {
            if budget == 0 {
                break;
            }
            if let Some((sf, c)) = seg.take_unflushed(io, include_partial, budget, durable_ok) {
                budget = budget.saturating_sub(sf.chunks.len());
                carries |= c;
                segments.push(sf);
            }
        }
        if segments.is_empty() {
            return None;
        }
        let id = self.next_job_id;
        self.next_job_id += 1;
        // Its own completion acknowledges the fsync producers. Checked again after
        // taking, so a mismatch can only cost a sync, never an early ack.
        let durable = durable_ok && segments.len() == 1 && self.pending_bytes() == 0;
        if durable {
            self.durable_job = Some(id);
            self.durable_jobs += 1;
        }
        let bytes = segments
            .iter()
            .flat_map(|s| s.chunks.iter())
            .map(|c| c.filled as u64)
            .sum();
        self.jobs.push_back(InFlightJob {
            id,
            done: false,
            ends: segments.iter().map(|s| (s.base, s.upto_len)).collect(),
        });
        if carries {
            self.carry_job = Some(id);
            self.carry_jobs += 1;
        }
        if self.pending_bytes() == 0 {
            self.pending_since = None;
        }
        Some(FlushJob {
            id,
            segments,
            bytes,
            durable,
            returned: RefCell::new(Vec::new()),
        })
    }

    /// Reports the outcome of [`FlushJob::write`]. Once every earlier job has
    /// completed too, the written watermark advances over the whole batches they
    /// cover and `Memory` producers are acknowledged; a failure fences the
    /// partition.
    pub fn complete_write(
        &mut self,
        job: &FlushJob<B>,
        result: std::io::Result<()>,
    ) -> Result<(), StorageError> {
        self.check_fenced()?;
        for buf in job.returned.borrow_mut().drain(..) {
            self.pool.put(buf);
        }
        let entry = self
            .jobs
            .iter_mut()
            .find(|j| j.id == job.id)
            .expect("complete_write for a job that is not in flight");
        entry.done = true;
        if self.carry_job == Some(job.id) {
            self.carry_job = None;
        }
        if self.durable_job == Some(job.id) {
            self.durable_job = None;
        }
        if let Err(e) = result {
            return Err(self.fence("write", &job.first_path(), e));
        }
        while self.jobs.front().is_some_and(|j| j.done) {
            let done = self.jobs.pop_front().expect("checked");
            for (base, end) in done.ends {
                let seg = self
                    .segment_at_mut(base)
                    .expect("a segment being flushed is never deleted");
                if let Err(e) = seg.advance_written(end) {
                    let reason = e.to_string();
                    return Err(self.fence_with("index write", reason));
                }
            }
        }
        // Jobs complete as a prefix of the log: every segment before the first one
        // not fully written is fully written, and none after it has published.
        let written = self
            .segments
            .iter()
            .find(|s| s.written_len < s.len)
            .map_or(self.next_offset, |s| s.written_next);
        self.written.advance(written.0);
        if job.durable {
            // It was the only job, started with everything before it durable: the
            // log is durable up to its end, which `written` now is.
            let seg = job.segments.first().expect("a job writes a segment");
            let synced = self
                .segment_at(seg.base)
                .map(|s| (s.base, s.written_len, s.written_next))
                .expect("a segment being flushed is never deleted");
            assert_eq!(synced.1, seg.upto_len, "durable job not the last written");
            return self.publish_durable(&[synced], written);
        }
        if self.pending_bytes() >= self.config.flush_bytes {
            self.kicks.advance(self.kicks.get() + 1);
        }
        Ok(())
    }

    /// Takes an fdatasync of every segment with unsynced written bytes, unless a
    /// sync is in flight or nothing is unsynced.
    pub fn begin_sync(&mut self) -> Option<SyncJob<B>> {
        if self.fenced.is_some() || self.sync_in_flight || self.written.get() == self.durable.get()
        {
            return None;
        }
        let segments: Vec<_> = self
            .segments
            .iter()
            .filter(|s| s.needs_sync())
            .map(|s| (s.base, s.writer().clone(), s.written_len, s.written_next))
            .collect();
        assert!(
            !segments.is_empty(),
            "written ahead of durable, yet nothing to sync"
        );
        self.sync_in_flight = true;
        Some(SyncJob {
            segments,
            dir: std::mem::take(&mut self.dir_unsynced).then(|| self.dir.clone()),
            upto: self.written_offset(),
        })
    }

    /// Reports the outcome of [`SyncJob::run`]: advances the durable watermark
    /// (acknowledging `Fsync` producers) and marks sealed segments that are done as
    /// trimmed. The files are cut to length by [`sync_shared`] (on a helper thread)
    /// or the next [`Partition::flush`].
    pub fn complete_sync(
        &mut self,
        job: &SyncJob<B>,
        result: std::io::Result<()>,
    ) -> Result<(), StorageError> {
        self.check_fenced()?;
        assert!(self.sync_in_flight, "complete_sync without a sync job");
        self.sync_in_flight = false;
        if let Err(e) = result {
            // Never retry an fsync: the kernel may have dropped the dirty pages.
            return Err(self.fence("fdatasync", &job.first_path(), e));
        }
        assert!(job.upto.0 <= self.written.get(), "sync ahead of write");
        self.synced_since_open = true;
        let synced: Vec<_> = job
            .segments
            .iter()
            .map(|(base, _, len, next)| (*base, *len, *next))
            .collect();
        self.publish_durable(&synced, job.upto)
    }

    /// Records that `synced` segments (`(base, length, next offset)`) are durable up
    /// to their lengths and the log up to `upto`: persists their index entries,
    /// advances the durable watermark (acknowledging `Fsync` producers) and marks
    /// sealed segments that are done as trimmed.
    fn publish_durable(
        &mut self,
        synced: &[(Offset, u64, Offset)],
        upto: Offset,
    ) -> Result<(), StorageError> {
        for (base, len, next) in synced {
            let Some(seg) = self.segment_at_mut(*base) else {
                continue;
            };
            seg.synced_len = seg.synced_len.max(*len);
            // Index entries go out only for synced batches, so after a power loss
            // an entry never points past data the disk may have lost.
            if let Err(e) = seg.persist_index(*len, *next) {
                let reason = e.to_string();
                return Err(self.fence_with("index write", reason));
            }
        }
        self.durable.advance(upto.0);
        // The writer may be holding a partial chunk back for this sync.
        if self.pending_bytes() > 0 {
            self.kicks.advance(self.kicks.get() + 1);
        }
        for i in 0..self.segments.len() {
            let seg = &mut self.segments[i];
            if seg.state == (segment::SegmentState::Sealed { trimmed: false }) && seg.fully_synced()
            {
                match seg.trim() {
                    Ok(t) => self.trims.push(t),
                    Err(e) => return Err(self.fence_with("truncate", e.to_string())),
                }
            }
        }
        Ok(())
    }

    fn fence(&mut self, op: &'static str, path: &Path, e: std::io::Error) -> StorageError {
        let reason = format!("{}: {e}", path.display());
        self.fence_with(op, reason)
    }

    fn fence_with(&mut self, op: &'static str, reason: String) -> StorageError {
        tracing::error!(dir = %self.dir.display(), op, %reason, "partition fenced");
        // In-flight bookkeeping stays as it is: jobs still running report back and
        // get `Fenced`; nothing starts again until the partition is reopened.
        let why = WaitFailed(format!("partition fenced after a failed {op}: {reason}").into());
        self.written.fail(why.clone());
        self.durable.fail(why);
        self.fenced = Some((op, reason.clone()));
        // The writer may be idle waiting for a kick; let it see the fence and stop.
        self.kicks.advance(self.kicks.get() + 1);
        StorageError::Fenced { op, reason }
    }

    /// Writes and syncs everything appended so far. Holds `&mut self` across the
    /// I/O; drivers that keep appending during a flush use the job calls instead
    /// (see [`run_write_shared`] and [`sync_shared`]).
    pub async fn flush(&mut self) -> Result<(), StorageError> {
        self.check_fenced()?;
        let io = self.io.clone();
        while let Some(mut job) = self.begin_flush(FlushScope::All) {
            let r = job.write(&io).await;
            self.complete_write(&job, r)?;
        }
        if let Some(job) = self.begin_sync() {
            let r = job.run(&io).await;
            self.complete_sync(&job, r)?;
        }
        // Cut sealed segments to length here and now; a failure fences, as a failed
        // sync would.
        let trims = std::mem::take(&mut self.trims);
        match trims.iter().try_for_each(Trim::run) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fence_with("truncate", e.to_string())),
        }
    }

    /// `Err(Fenced)` once a write or sync has failed.
    pub fn check_fenced(&self) -> Result<(), StorageError> {
        self.fenced_error().map_or(Ok(()), Err)
    }

    /// [`Partition::flush`] for backends whose futures complete synchronously
    /// ([`crate::storage::StdIo`]). Never call it inside an async runtime.
    pub fn flush_blocking(&mut self) -> Result<(), StorageError> {
        futures_lite::future::block_on(self.flush())
    }

    /// Resolves when `last_offset` is acknowledged at `durability`, or fails if the
    /// partition is fenced first.
    pub fn wait_for(&self, last_offset: Offset, durability: Durability) -> WaitFor {
        let mark = match durability {
            Durability::Fsync => &self.durable,
            Durability::Memory => &self.written,
        };
        mark.wait_for(last_offset.0 + 1)
    }

    pub fn written_watch(&self) -> Watermark {
        self.written.clone()
    }

    pub fn durable_watch(&self) -> Watermark {
        self.durable.clone()
    }

    /// Advances to `next_offset` on every append (for long-polling and the driver).
    pub fn appended_watch(&self) -> Watermark {
        self.appended.clone()
    }

    /// Bumped whenever pending bytes cross `flush_bytes`, and when a sync completes
    /// with bytes pending (the writer may be holding them back for it).
    pub fn flush_kick_watch(&self) -> Watermark {
        self.kicks.clone()
    }

    /// Reads whole batches from `from` (which must lie in `[log_start, high
    /// watermark]`) up to about `max_bytes`, crossing segment boundaries. The first
    /// batch is returned even when it alone exceeds `max_bytes`, so a consumer can
    /// always make progress.
    pub fn read(&self, from: Offset, max_bytes: usize) -> Result<Fetch, StorageError> {
        let hw = self.written_offset();
        let start = self.log_start();
        if from < start || from > hw {
            return Err(StorageError::OffsetOutOfRange {
                requested: from,
                start,
                end: hw,
            });
        }
        let mut chunks = Vec::new();
        let mut cur = from;
        let mut budget = max_bytes;
        for seg in self.segments.iter().skip(self.segment_holding(from)) {
            if cur >= hw {
                break;
            }
            cur = cur.max(seg.base);
            if !chunks.is_empty() && self.read_pool.is_some() && seg.would_read_map(cur) {
                // With cold reads, a fetch that has bytes does not fault the next
                // segment's map in on the shard: the next fetch reads it cold.
                break;
            }
            let Some((n, next)) = seg.read(cur, budget, chunks.is_empty(), &mut chunks)? else {
                continue;
            };
            if n == 0 {
                break;
            }
            budget = budget.saturating_sub(n);
            cur = next;
            if next < seg.written_next || budget == 0 {
                break;
            }
        }
        Ok(Fetch {
            chunks,
            next_offset: cur,
            high_watermark: hw,
            log_start: start,
        })
    }

    /// The position in `segments` of the segment whose range holds `from` (the first
    /// one when `from` precedes them all).
    fn segment_holding(&self, from: Offset) -> usize {
        self.segments
            .partition_point(|s| s.base <= from)
            .saturating_sub(1)
    }

    /// The map bytes that [`Partition::read`] from `from` would have to fault in from
    /// the disk (at most `COLD_WARM_BYTES_MAX`), with the span after them to read
    /// ahead (see [`warm_for_read`]); `None` when both are in memory already (the
    /// tail cache, or resident pages) or nothing is written at `from`. Looks at the
    /// first segment the read touches.
    pub fn cold_span(&self, from: Offset, max_bytes: usize) -> Option<(Bytes, Bytes)> {
        let seg = self.first_read_segment(from)?;
        let (span, ahead) = seg.cold_span(from.max(seg.base), max_bytes)?;
        // The read-ahead span counts too: were only this fetch's span checked, every
        // other fetch of a sequential reader would find its pages cold (measured:
        // 623-635 MB/s from the disk with read-ahead on the shard, 724-842 with this).
        (!mmap::resident(&ahead)).then_some((span, ahead))
    }

    /// The first offset whose batch carries a timestamp at or after `ts`. Reads
    /// segment maps on the calling thread; a shard goes through
    /// [`offset_for_timestamp_shared`] instead.
    pub fn offset_for_timestamp(&self, ts: TimestampMs) -> Result<Option<Offset>, StorageError> {
        let mut after = None;
        while let Some(scan) = self.timestamp_scan(ts, after) {
            after = Some(scan.base);
            if let Some(o) = scan.run()? {
                return Ok(Some(o));
            }
        }
        Ok(None)
    }

    /// The next segment a timestamp lookup must read: the first after the segment
    /// based at `after` (from the oldest when `None`) that can hold a batch at or
    /// after `ts`. Running it ([`TimestampScan::run`]) reads only that segment's
    /// written bytes, and needs no borrow of the partition; when it finds nothing,
    /// the lookup goes on from its segment.
    pub fn timestamp_scan(&self, ts: TimestampMs, after: Option<Offset>) -> Option<TimestampScan> {
        self.segments
            .iter()
            .filter(|seg| after.is_none_or(|a| seg.base > a))
            .find_map(|seg| seg.timestamp_scan(ts))
    }

    /// The written length of the segment based at `base`, or `None` when it is no
    /// longer in the log (retention took it).
    pub fn segment_written_len(&self, base: Offset) -> Option<u64> {
        self.segment_at(base).map(|s| s.written_len)
    }

    /// Deletes the oldest sealed, fully written segments while the retention limits
    /// say so. Never deletes the active segment.
    pub fn apply_retention(&mut self, now: TimestampMs) -> Result<RetentionReport, StorageError> {
        let (mut report, gone) = self.take_expired(now);
        let (retired, removed, recycled) = retire_segments(&gone);
        report.segments_recycled = usize::from(matches!(recycled, Some(Ok(_))));
        if gone.recycle.is_some() {
            self.complete_recycle(recycled);
        }
        self.keep_unretired(gone, retired, &removed);
        removed.map(|()| report)
    }

    /// After a failed retirement: the segments from the failed one on stay on disk,
    /// to be retired first by the next pass.
    fn keep_unretired(
        &mut self,
        mut gone: Expired,
        retired: usize,
        removed: &Result<(), StorageError>,
    ) {
        if let Err(e) = removed {
            let left = gone.segments.split_off(retired);
            tracing::warn!(dir = %self.dir.display(), segments = left.len(), error = %e,
                "expired segments left on disk; the next retention pass retries them first");
            self.unretired = left;
        }
    }

    /// The decision half of [`Partition::apply_retention`]: drops the expired
    /// segments from the partition (the log start moves at once) and returns what is
    /// left to do with their files ([`retire_segments`]): remove them, or reuse one
    /// as the next spare when none is on its way (its blocks stay written, which
    /// makes the next segment's writes cheaper: docs/ARCHITECTURE.md, "Recycled
    /// segments").
    fn take_expired(&mut self, now: TimestampMs) -> (RetentionReport, Expired) {
        let mut report = RetentionReport::default();
        // Those a failed pass left go first.
        let mut gone = Expired {
            dir: self.dir.clone(),
            segments: std::mem::take(&mut self.unretired),
            recycle: None,
        };
        // How many of the oldest segments the limits expire.
        let mut total = self.size_bytes();
        let mut expired = 0;
        let mut newest_by_age = false;
        for (i, seg) in self.segments.iter().enumerate() {
            let cut_pending =
                self.trims.iter().any(|t| t.base() == seg.base) || self.cutting.contains(&seg.base);
            if i + 1 == self.segments.len()
                || seg.state != (segment::SegmentState::Sealed { trimmed: true })
                || cut_pending
            {
                break;
            }
            let by_bytes = self
                .config
                .retention_bytes
                .is_some_and(|r| total - seg.len >= r);
            let by_age = self.config.retention_ms.is_some_and(|ms| {
                seg.max_timestamp.is_none_or(|m| {
                    now.0.saturating_sub(m.0) > i64::try_from(ms).unwrap_or(i64::MAX)
                })
            });
            if !(by_bytes || by_age) {
                break;
            }
            total -= seg.len;
            expired += 1;
            newest_by_age = by_age;
        }
        let reusable = self
            .segments
            .front()
            .is_some_and(|s| s.base >= self.reuse_from);
        let spare_free =
            reusable && matches!(self.spare, Spare::Idle | Spare::Wanted | Spare::Failed);
        if expired > usize::from(spare_free) && !newest_by_age && reusable {
            // One expired file can become the spare, and only when none is on its
            // way; the others are removed, and unlinking a written 256 MiB segment
            // discards it on the device (45-50 ms of stalled writes here, e's worst
            // acknowledgements). So the newest expired segment that could not be
            // reused stays until the next roll frees the spare's place: the log
            // holds at most one segment over the limits meanwhile, and in steady
            // state every roll reuses a file and removes none. Not for segments
            // past `retention_ms`: their age limit is kept to the check.
            expired -= 1;
        }
        for _ in 0..expired {
            let oldest = self.segments.pop_front().expect("counted above");
            gone.segments.push((oldest.base, oldest.map_watch()));
            report.segments_deleted += 1;
            report.bytes_deleted += oldest.len;
            tracing::info!(segment = %oldest.path.display(), "retention deleted segment");
        }
        report.new_log_start = self.log_start();
        if !gone.segments.is_empty() && spare_free && self.fenced.is_none() {
            self.spare = Spare::Preparing;
            gone.recycle = Some(self.capacity);
        }
        (report, gone)
    }

    /// Number of index entries in each segment (for tests and `segdump`).
    pub fn index_entries(&self) -> Vec<usize> {
        self.segments.iter().map(|s| s.index_entries()).collect()
    }
}

fn role_is_active(role: Role) -> bool {
    matches!(role, Role::Active { .. })
}

/// Runs one write job on a partition shared with appenders: the partition is
/// borrowed only between I/O steps, never across an await.
pub async fn run_write_shared<B: LogIo>(
    part: &RefCell<Partition<B>>,
    mut job: FlushJob<B>,
) -> Result<(), StorageError> {
    let io = part.borrow().io.clone();
    let r = job.write(&io).await;
    part.borrow_mut().complete_write(&job, r)?;
    // A durable job is a sync, and may have sealed segments to cut too.
    run_trims(part, &io).await
}

/// Faults in, on a helper thread, the map pages that a read from `from` would
/// otherwise fault in on the shard's thread (a consumer behind the tail cache, or
/// reading after a restart), so the shard keeps serving while the disk reads. Reads
/// that the tail cache or resident pages serve skip it. Pages can be evicted again
/// before the read; the read is still correct, only slower.
pub async fn warm_for_read<B: LogIo>(part: &RefCell<Partition<B>>, from: Offset, max_bytes: usize) {
    let (cold, io) = {
        let p = part.borrow();
        (p.cold_span(from, max_bytes), p.io.clone())
    };
    if let Some((span, ahead)) = cold {
        io.run_blocking(move || mmap::fault_in(&span, &ahead)).await;
    }
}

/// [`Partition::offset_for_timestamp`] for a partition served by a shard: each
/// segment's scan reads its map (cold pages fault from the disk) on a helper
/// thread. If retention takes that segment meanwhile, its answer may lie before
/// the new log start, so the lookup starts again (the scan's clone of the map keeps
/// the file from being recycled under it: see `mmap`); after a few such turns it
/// scans on the calling thread instead ([`Partition::offset_for_timestamp`]),
/// rather than chase a log that moves that fast, so it always answers. If the
/// segment was written further meanwhile, a scan that found nothing runs again over
/// it before the lookup moves on: the batch it looks for may have been appended but
/// not yet written when the scan began, and later segments may be written by now.
pub async fn offset_for_timestamp_shared<B: LogIo>(
    part: &RefCell<Partition<B>>,
    ts: TimestampMs,
) -> Result<Option<Offset>, StorageError> {
    let io = part.borrow().io.clone();
    let mut after = None;
    let mut restarts = 0;
    loop {
        let Some(scan) = part.borrow().timestamp_scan(ts, after) else {
            return Ok(None);
        };
        let (base, scanned) = (scan.base, scan.written_len());
        let got = io.run_blocking(move || scan.run()).await;
        let Some(now_written) = part.borrow().segment_written_len(base) else {
            restarts += 1;
            if restarts > TIMESTAMP_LOOKUP_RESTARTS {
                // Retention keeps taking the segments being read: answer from the
                // log as it is now, in one go.
                return part.borrow().offset_for_timestamp(ts);
            }
            after = None;
            continue;
        };
        match got? {
            Some(o) => return Ok(Some(o)),
            // Written further while the scan ran: look at this segment again.
            None if now_written > scanned => {}
            None => after = Some(base),
        }
    }
}

/// How often [`offset_for_timestamp_shared`] starts again after retention took the
/// segment it was reading, before it scans on the calling thread.
const TIMESTAMP_LOOKUP_RESTARTS: usize = 4;

/// Brings what a read from `from` of about `max_bytes` needs into memory before the
/// read runs on the shard: with a read pool, an O_DIRECT read of the span on a
/// helper thread (or a wait for the read-ahead that is bringing it); then, unless
/// one runs already, it returns a read-ahead task for the caller to run in the
/// background, which keeps reading the spans after it (up to `COLD_AHEAD_SPANS`
/// past the reader) while the reader consumes. Without a read pool, or with every
/// buffer in use, [`warm_for_read`] instead.
pub async fn prepare_read<B: LogIo>(
    part: &Rc<RefCell<Partition<B>>>,
    from: Offset,
    max_bytes: usize,
) -> Option<impl Future<Output = ()> + 'static> {
    let (pool, cold) = {
        let p = part.borrow();
        (p.read_pool.clone(), p.cold.clone())
    };
    let Some(pool) = pool else {
        warm_for_read(part, from, max_bytes).await;
        return None;
    };
    let mut waits = 0;
    loop {
        let plan = {
            let mut p = part.borrow_mut();
            let start = p.read_start(from).map(|(seg, pos)| (seg.base, pos));
            if let Some((base, pos)) = start {
                // Spans the read has moved past give their buffers back.
                p.drop_cold_spans_before(base, pos);
                if !p.segment_at(base).is_some_and(|s| s.cached_at(pos)) {
                    p.cold_reader = Some((base, pos, max_bytes));
                    p.cold_used = Some(Instant::now());
                }
            }
            p.cold_read_plan(from, max_bytes)
        };
        let plan = match plan {
            ColdPlan::Ready => break,
            ColdPlan::Map => {
                warm_for_read(part, from, max_bytes).await;
                return None;
            }
            ColdPlan::Read(plan) => plan,
        };
        if cold.in_flight((plan.base, plan.pos)) && waits < 4 {
            // The read-ahead is bringing it: wait, then look again (a few times at
            // most: a read that keeps nothing marks its position for the map).
            waits += 1;
            let seen = cold.done.get();
            let _ = cold.done.wait_for(seen + 1).await;
            continue;
        }
        if run_cold_read(part, &pool, plan).await != Some(true) {
            // No buffer, or the span kept nothing: the map it is.
            warm_for_read(part, from, max_bytes).await;
            return None;
        }
        break;
    }
    {
        let p = part.borrow();
        if cold.ahead_running.get() || p.cold_ahead_plan().is_none() {
            return None;
        }
    }
    cold.ahead_running.set(true);
    // Clears the flag however the task ends, even dropped before it ran.
    let running = ColdGuard {
        cold: cold.clone(),
        read: None,
    };
    let part = part.clone();
    Some(async move {
        let _running = running;
        loop {
            let plan = part.borrow().cold_ahead_plan();
            let Some(plan) = plan else { break };
            if run_cold_read(&part, &pool, plan).await != Some(true) {
                break;
            }
        }
    })
}

/// Undoes a cold read's bookkeeping if its future is dropped before it completes
/// (the read is forgotten, and fetches waiting for it look again), and, without a
/// read, marks the partition's read-ahead task ended.
struct ColdGuard {
    cold: Rc<ColdState>,
    read: Option<(Offset, u64)>,
}

impl Drop for ColdGuard {
    fn drop(&mut self) {
        match self.read.take() {
            Some(at) => {
                if self.cold.in_flight(at) {
                    self.cold.end_read(at);
                }
            }
            None => self.cold.ahead_running.set(false),
        }
    }
}

/// Runs one cold read and keeps its bytes: `None` when no read buffer is free,
/// otherwise whether the read kept anything.
async fn run_cold_read<B: LogIo>(
    part: &Rc<RefCell<Partition<B>>>,
    pool: &ReadPool,
    plan: ColdRead,
) -> Option<bool> {
    let buf = pool.take()?;
    let (io, cold) = {
        let p = part.borrow();
        (p.io.clone(), p.cold.clone())
    };
    cold.reads.borrow_mut().push((plan.base, plan.pos));
    let _pending = ColdGuard {
        cold,
        read: Some((plan.base, plan.pos)),
    };
    let r = plan.clone();
    let got = io
        .run_blocking(move || cold::read_span(&r.path, r.pos, r.len, buf))
        .await;
    Some(part.borrow_mut().complete_cold_read(&plan, got))
}

/// Segments retention dropped from a partition, whose files are still to go.
struct Expired {
    dir: PathBuf,
    /// Base offsets, oldest first, and whether a slice of each map is still held.
    segments: Vec<(Offset, MapWatch)>,
    /// The partition's segment size, when one of them may become its next spare
    /// (the partition then waits for [`Partition::complete_recycle`]).
    recycle: Option<u64>,
}

/// What [`retire_segments`] does with one expired segment's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retire {
    Remove(Offset),
    /// Becomes the partition's next spare ([`SpareSegment::recycle`]).
    Recycle(Offset),
}

/// The steps that dispose of `gone`'s files, oldest segment first: the newest one
/// that no reader holds a slice of is recycled when `recycle` asks for a spare,
/// the others are removed. The order is what keeps a crash safe: recovery expects
/// the segments left in the directory to follow one another, so an expired
/// segment must never survive a newer one. A segment older than a hole in the
/// offsets would be taken for one a crash left unfinished, and every segment after
/// it dropped (`Partition::open`).
fn retire_plan(gone: &Expired) -> Vec<Retire> {
    let reuse = gone
        .recycle
        .and_then(|_| gone.segments.iter().rposition(|(_, w)| !w.in_use()));
    gone.segments
        .iter()
        .enumerate()
        .map(|(i, &(base, _))| {
            if Some(i) == reuse {
                Retire::Recycle(base)
            } else {
                Retire::Remove(base)
            }
        })
        .collect()
}

/// Disposes of expired segments' files by [`retire_plan`] (blocking; the shared
/// path runs it on a helper thread). Readers still holding a removed segment's
/// bytes keep its map. Each step is made durable (the directory synced) before the
/// next, and the first failure stops the rest, so whatever a crash or an error
/// leaves is the newest expired segments, whole, in front of the log: they come
/// back at the next open and retention expires them again (and, until then, the
/// next pass retires them first: `Partition::keep_unretired`). Returns how many
/// segments (oldest first) are gone, the removals' outcome and, when recycling was
/// asked, the spare (`None`: every map was still read, or a removal before it
/// failed).
fn retire_segments(
    gone: &Expired,
) -> (
    usize,
    Result<(), StorageError>,
    Option<Result<SpareSegment, StorageError>>,
) {
    let dir = &gone.dir;
    let started = Instant::now();
    let mut spare = None;
    let mut removed = Ok(());
    let mut retired = 0;
    for step in retire_plan(gone) {
        match step {
            Retire::Recycle(base) => {
                let capacity = gone.recycle.expect("planned only when asked");
                // Renames the log away and syncs the directory itself.
                let made = SpareSegment::recycle(dir, base, capacity);
                let failed = made.is_err();
                spare = Some(made);
                // A failed recycle removes the segment's files; make sure of it,
                // durably, before any newer segment goes.
                if failed {
                    removed = remove_durably(dir, base);
                    if removed.is_err() {
                        break;
                    }
                }
            }
            Retire::Remove(base) => {
                removed = remove_durably(dir, base);
                if removed.is_err() {
                    break;
                }
            }
        }
        retired += 1;
    }
    tracing::debug!(dir = %dir.display(), segments = gone.segments.len(),
        recycled = matches!(spare, Some(Ok(_))), took_us = started.elapsed().as_micros() as u64,
        "expired segments retired");
    (retired, removed, spare)
}

/// Removes the segment at `base`'s files (those left) and syncs `dir`.
fn remove_durably(dir: &Path, base: Offset) -> Result<(), StorageError> {
    segment::remove_files(dir, base)?;
    crate::storage::io::sync_dir(dir).map_err(|e| StorageError::io("fsync dir", dir, e))
}

/// [`Partition::apply_retention`] on a shared partition, with the file removals and
/// the directory sync (milliseconds for large segments) on a helper thread. Idle
/// cold spans give their buffers back here too ([`Partition::expire_cold_spans`]).
pub async fn apply_retention_shared<B: LogIo>(
    part: &RefCell<Partition<B>>,
    now: TimestampMs,
) -> Result<RetentionReport, StorageError> {
    part.borrow_mut().expire_cold_spans(Instant::now());
    let (mut report, gone) = part.borrow_mut().take_expired(now);
    if gone.segments.is_empty() {
        return Ok(report);
    }
    let io = part.borrow().io.clone();
    let asked = gone.recycle.is_some();
    let (gone, retired, removed, recycled) = io
        .run_blocking(move || {
            let (retired, removed, recycled) = retire_segments(&gone);
            (gone, retired, removed, recycled)
        })
        .await;
    report.segments_recycled = usize::from(matches!(recycled, Some(Ok(_))));
    let mut p = part.borrow_mut();
    if asked {
        p.complete_recycle(recycled);
    }
    p.keep_unretired(gone, retired, &removed);
    removed.map(|()| report)
}

/// Makes the spare segment a shared partition wants, if it wants one, on a helper
/// thread (the partition is not borrowed meanwhile); returns whether it tried.
pub async fn prepare_spare_shared<B: LogIo>(part: &RefCell<Partition<B>>) -> bool {
    let Some((dir, capacity)) = part.borrow_mut().begin_spare() else {
        return false;
    };
    let io = part.borrow().io.clone();
    let made = io
        .run_blocking(move || SpareSegment::create(&dir, capacity))
        .await;
    part.borrow_mut().complete_spare(made);
    true
}

/// Reserves more of the active segment's blocks if the partition wants that, on a
/// helper thread (the partition is not borrowed meanwhile); returns whether it
/// tried.
pub async fn reserve_blocks_shared<B: LogIo>(part: &RefCell<Partition<B>>) -> bool {
    let Some(job) = part.borrow_mut().begin_allocation() else {
        return false;
    };
    let io = part.borrow().io.clone();
    let (job, result) = io
        .run_blocking(move || {
            let r = job.run();
            (job, r)
        })
        .await;
    part.borrow_mut().complete_allocation(&job, result);
    true
}

/// Runs one sync job on a shared partition; returns whether one ran.
pub async fn sync_shared<B: LogIo>(part: &RefCell<Partition<B>>) -> Result<bool, StorageError> {
    let job = part.borrow_mut().begin_sync();
    let Some(job) = job else {
        return Ok(false);
    };
    let io = part.borrow().io.clone();
    let r = job.run(&io).await;
    part.borrow_mut().complete_sync(&job, r)?;
    run_trims(part, &io).await?;
    Ok(true)
}

/// Cuts the sealed segments that syncs marked trimmed to length, on a helper thread
/// (0.2-0.5 ms each); a failure fences.
async fn run_trims<B: LogIo>(part: &RefCell<Partition<B>>, io: &B) -> Result<(), StorageError> {
    let trims = std::mem::take(&mut part.borrow_mut().trims);
    if trims.is_empty() {
        return Ok(());
    }
    let bases: Vec<Offset> = trims.iter().map(Trim::base).collect();
    part.borrow_mut().cutting.extend_from_slice(&bases);
    let cut = io
        .run_blocking(move || trims.iter().try_for_each(Trim::run))
        .await;
    let mut p = part.borrow_mut();
    p.cutting.retain(|b| !bases.contains(b));
    cut.map_err(|e| p.fence_with("truncate", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A watch whose map is held while the returned bytes live.
    fn held_watch() -> (Bytes, MapWatch) {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4096).unwrap();
        mmap::map_watched(&f, 4096).unwrap()
    }

    fn expired(segments: Vec<(Offset, MapWatch)>, recycle: bool) -> Expired {
        Expired {
            dir: PathBuf::new(),
            segments,
            recycle: recycle.then_some(64 * 1024),
        }
    }

    /// Expired segments go oldest first, whatever is recycled: a crash between
    /// two steps must leave the newer ones, never an older one before a hole.
    #[test]
    fn expired_segments_are_retired_oldest_first() {
        let (_held, watch) = held_watch();
        assert!(watch.in_use());
        let free = MapWatch::default;
        let gone = expired(
            vec![
                (Offset(0), free()),
                (Offset(10), free()),
                (Offset(20), watch),
            ],
            true,
        );
        // The newest is still read, so the one before it is reused.
        assert_eq!(
            retire_plan(&gone),
            [
                Retire::Remove(Offset(0)),
                Retire::Recycle(Offset(10)),
                Retire::Remove(Offset(20)),
            ]
        );
        let gone = expired(vec![(Offset(0), free()), (Offset(10), free())], true);
        assert_eq!(
            retire_plan(&gone),
            [Retire::Remove(Offset(0)), Retire::Recycle(Offset(10))]
        );
        let gone = expired(vec![(Offset(0), free()), (Offset(10), free())], false);
        assert_eq!(
            retire_plan(&gone),
            [Retire::Remove(Offset(0)), Retire::Remove(Offset(10))]
        );
    }

    const MIB: u64 = 1 << 20;

    /// A partition of 64 MiB segments (more than the first reservation) in `dir`.
    fn open_64mib(dir: &Path) -> Partition<crate::storage::io::StdIo> {
        let config = PartitionConfig {
            segment_bytes: 64 * MIB,
            ..PartitionConfig::default()
        };
        let io = crate::storage::io::StdIo::default();
        Partition::open(dir, config, io, TimestampMs(0)).unwrap().0
    }

    /// A batch of `records` values of `value_len` bytes.
    fn batch_of(records: usize, value_len: usize) -> Vec<u8> {
        let v = vec![b'x'; value_len];
        let mut b = crate::batch::BatchBuilder::with_capacity(records * (value_len + 16));
        for _ in 0..records {
            b.push(crate::batch::RecordInput {
                timestamp: TimestampMs(0),
                key: None,
                value: Some(&v),
                headers: &[],
            });
        }
        b.finish()
    }

    /// A full disk at a reservation costs appends an error, not the partition:
    /// the failed reservation is retried on the append that needs it, which is
    /// refused while that fails too and goes through once it does.
    #[test]
    fn a_failed_reservation_refuses_the_appends_past_it_until_the_disk_has_room() {
        use crate::storage::io::FAIL_ALLOCATIONS;
        let dir = tempfile::tempdir().unwrap();
        let p = RefCell::new(open_64mib(dir.path()));
        let batch = batch_of(10, 100_000);
        let append = |_: usize| {
            p.borrow_mut()
                .append(&batch, Instant::now(), TimestampMs(0))
        };
        // 3 MB in: the driver's reservation is due, and fails.
        for i in 0..3 {
            append(i).unwrap();
        }
        FAIL_ALLOCATIONS.with(|f| f.set(true));
        assert!(futures_lite::future::block_on(reserve_blocks_shared(&p)));
        assert_eq!(p.borrow().reserve, Reserve::Failed);
        assert_eq!(p.borrow().segments.back().unwrap().allocated, 4 * MIB);
        // Appends within the reserved 4 MiB go on; the one past it is refused.
        append(3).unwrap();
        let before = p.borrow().next_offset;
        let err = append(4).unwrap_err();
        assert!(err.to_string().contains("fallocate"), "{err}");
        assert_eq!(p.borrow().next_offset, before, "nothing appended");
        assert!(p.borrow().fenced.is_none());
        // Room again: the same append reserves first and goes through.
        FAIL_ALLOCATIONS.with(|f| f.set(false));
        append(4).unwrap();
        assert_ne!(p.borrow().reserve, Reserve::Failed);
        assert!(p.borrow().segments.back().unwrap().allocated >= 8 * MIB);
        p.borrow_mut().flush_blocking().unwrap();
        assert_eq!(p.borrow().next_offset, Offset(50));
    }

    /// A reservation that completes after a roll belongs to the sealed segment: the
    /// new active one keeps its own reserved part, and a failed state ends with
    /// the roll (the new segment came with its own first reservation).
    #[test]
    fn a_reservation_outlived_by_a_roll_changes_nothing_of_the_new_segment() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = open_64mib(dir.path());
        let batch = batch_of(3, 1 << 20);
        p.append(&batch, Instant::now(), TimestampMs(0)).unwrap();
        let job = p
            .begin_allocation()
            .expect("3 MiB in: a reservation is due");
        assert_eq!(p.reserve, Reserve::Running);
        p.roll(TimestampMs(0)).unwrap();
        let new_base = p.segments.back().unwrap().base;
        assert_ne!(new_base, job.base);
        p.complete_allocation(&job, job.run());
        assert_eq!(p.segments.back().unwrap().allocated, 4 * MIB);
        assert_eq!(p.reserve, Reserve::Idle);
        // A failure, then a roll: the new segment starts unfailed.
        p.append(&batch, Instant::now(), TimestampMs(0)).unwrap();
        let job = p.begin_allocation().expect("due again");
        p.complete_allocation(&job, Err(std::io::Error::from_raw_os_error(libc::ENOSPC)));
        assert_eq!(p.reserve, Reserve::Failed);
        p.roll(TimestampMs(0)).unwrap();
        assert_eq!(p.reserve, Reserve::Idle);
        p.flush_blocking().unwrap();
    }

    /// A request's batches go in all or none: a refused reservation refuses the
    /// whole request, where batch by batch the first two would have gone in (and a
    /// retry would have written them twice).
    #[test]
    fn a_request_refused_for_room_appends_none_of_its_batches() {
        use crate::storage::io::FAIL_ALLOCATIONS;
        let dir = tempfile::tempdir().unwrap();
        let mut p = open_64mib(dir.path());
        let big = batch_of(10, 100_000);
        for _ in 0..3 {
            p.append(&big, Instant::now(), TimestampMs(0)).unwrap();
        }
        FAIL_ALLOCATIONS.with(|f| f.set(true));
        let job = p.begin_allocation().expect("due");
        p.complete_allocation(&job, job.run());
        assert_eq!(p.reserve, Reserve::Failed);
        // 3 MB in, 4 MiB reserved: two of these fit, the third does not.
        let half = batch_of(5, 100_000);
        let request: Vec<_> = (0..3).map(|_| ValidBatch::parse(&half).unwrap()).collect();
        let before = (p.next_offset, p.segments.back().unwrap().len);
        assert!(p
            .append_all(&request, Instant::now(), TimestampMs(0))
            .is_err());
        assert_eq!((p.next_offset, p.segments.back().unwrap().len), before);
        FAIL_ALLOCATIONS.with(|f| f.set(false));
        let a = p
            .append_all(&request, Instant::now(), TimestampMs(0))
            .unwrap();
        let bases: Vec<_> = a.iter().map(|a| a.base_offset).collect();
        assert_eq!(bases, [Offset(30), Offset(35), Offset(40)]);
        p.flush_blocking().unwrap();
    }

    /// A request that does not fit in the active segment starts a new one, so a
    /// failing roll can only refuse all of it.
    #[test]
    fn a_request_that_does_not_fit_starts_a_new_segment() {
        let dir = tempfile::tempdir().unwrap();
        let config = PartitionConfig {
            segment_bytes: 64 * 1024,
            ..PartitionConfig::default()
        };
        let io = crate::storage::io::StdIo::default();
        let (mut p, _) = Partition::open(dir.path(), config, io, TimestampMs(0)).unwrap();
        let b = batch_of(1, 8_000);
        for _ in 0..6 {
            p.append(&b, Instant::now(), TimestampMs(0)).unwrap();
        }
        assert_eq!(p.segments.len(), 1);
        let room = p.segments.back().unwrap().room();
        let request: Vec<_> = (0..3).map(|_| ValidBatch::parse(&b).unwrap()).collect();
        assert!(
            room >= b.len() as u64 && room < 3 * b.len() as u64,
            "{room}"
        );
        let a = p
            .append_all(&request, Instant::now(), TimestampMs(0))
            .unwrap();
        assert_eq!(p.segments.len(), 2);
        let second = p.segments.back().unwrap().base;
        assert_eq!(second, Offset(6));
        assert!(a.iter().all(|a| a.base_offset >= second));
        p.flush_blocking().unwrap();
    }

    /// With `segment_ms` 0 every non-empty segment is due to roll, yet a request's
    /// batches still go into one segment: the roll is decided once per request
    /// (batch by batch, the second batch would roll, and a failing roll there would
    /// leave the first one in the log).
    #[test]
    fn a_request_rolls_once_before_its_first_batch_not_between_its_batches() {
        let dir = tempfile::tempdir().unwrap();
        let config = PartitionConfig {
            segment_ms: Some(0),
            ..PartitionConfig::default()
        };
        let io = crate::storage::io::StdIo::default();
        let (mut p, _) = Partition::open(dir.path(), config, io, TimestampMs(0)).unwrap();
        let b = batch_of(2, 100);
        let request: Vec<_> = (0..3).map(|_| ValidBatch::parse(&b).unwrap()).collect();
        p.append_all(&request, Instant::now(), TimestampMs(10))
            .unwrap();
        assert_eq!(p.segments.len(), 1, "one segment for the first request");
        let a = p
            .append_all(&request, Instant::now(), TimestampMs(20))
            .unwrap();
        assert_eq!(p.segments.len(), 2, "the second request rolled once");
        let second = p.segments.back().unwrap().base;
        assert_eq!(second, Offset(6));
        assert!(a.iter().all(|a| a.base_offset >= second));
        p.flush_blocking().unwrap();
    }
}
