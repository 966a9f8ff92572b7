//! Every limit and default size in one place (STYLE 7). Units go last in the name.
//!
//! This module owns numbers only; the code that enforces a limit cites the constant.

/// Block size for O_DIRECT writes and the unit of staging buffers. 4 KiB matches the
/// page size and the logical block size of every disk we target.
pub const IO_ALIGN_BYTES: usize = 4096;

/// A batch header is 64 bytes; anything smaller cannot be a batch.
pub const BATCH_BYTES_MIN: usize = crate::batch::HEADER_LEN;

/// Largest record batch the engine accepts. 16 MiB bounds the staging memory a single
/// request can pin and keeps one batch well below the smallest sensible segment.
pub const BATCH_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Largest number of records in one batch (bounds validation work per batch).
pub const BATCH_RECORDS_MAX: u32 = 1_000_000;

/// Largest number of headers on one record.
pub const RECORD_HEADERS_MAX: u32 = 10_000;

/// Default segment size: 256 MiB. Preallocated per active segment; 256 MiB keeps
/// recovery scans short (a full tail scan reads at most this much) while rolling rarely.
pub const SEGMENT_BYTES_DEFAULT: u64 = 256 * 1024 * 1024;

/// Smallest segment size allowed (room for at least one maximum batch is not required,
/// but a segment must hold a few blocks).
pub const SEGMENT_BYTES_MIN: u64 = 64 * 1024;

/// Segment positions are stored as u32 in the offset index, so a segment is < 4 GiB.
pub const SEGMENT_BYTES_MAX: u64 = u32::MAX as u64;

/// Disk a new segment reserves at first (`fallocate`): the file is `segment_bytes`
/// long from the start, but blocks are reserved only ahead of the appends, so an
/// idle partition holds 4 MiB, not a whole segment (a topic of 400 partitions
/// reserved 100 GiB before any data came, and failed with ENOSPC on a 73 GiB disk).
pub const SEGMENT_ALLOC_FIRST_BYTES: u64 = 4 * 1024 * 1024;

/// Largest step by which the reserved part of the active segment grows. Each step
/// doubles what is reserved, up to this; the partition's driver reserves the next
/// step once the appends are half a step from the end of the reserved part. Spare
/// segments, made only for partitions busy enough to fill half a segment, reserve
/// this much at once. Appends that outrun a reservation still running write into
/// the hole (the filesystem allocates; on a full disk that write fails and fences
/// the partition); after a failed reservation, appends past the reserved part are
/// refused instead (docs/FORMAT.md §1).
pub const SEGMENT_ALLOC_STEP_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// One sparse index entry per 4 KiB of log keeps the index at 8 B / 4 KiB = 0.2% of
/// the log and bounds the scan after an index lookup to about 4 KiB plus one batch.
pub const INDEX_INTERVAL_BYTES: u64 = 4096;

/// Staging buffer chunk for the active segment: appends are copied here once and the
/// chunk is written with one O_DIRECT write. 1 MiB matches the write size at which the
/// measured O_DIRECT throughput saturates (docs/ARCHITECTURE.md).
pub const STAGING_CHUNK_BYTES: usize = 1024 * 1024;

/// Recycled staging buffers kept per partition (1 MiB each, only as many as were
/// in use at the peak). A fresh heap DMA buffer costs a page fault per 4 KiB on
/// first touch; buffers from glommio's registered pool (`URING_IO_MEMORY_BYTES`)
/// do not, so the free list stays short and returns the rest to that pool.
pub const STAGING_BUFFERS_FREE_MAX: usize = 8;

/// Registered I/O memory per shard (glommio `io_memory`): the pool staging
/// buffers come from. 64 MiB holds the staging and in-flight writes of several busy
/// partitions (each keeps at most 4 jobs x 2 MiB in flight plus a staging chunk).
pub const URING_IO_MEMORY_BYTES: usize = 64 * 1024 * 1024;

/// Group commit: flush once this many bytes are pending ...
pub const FLUSH_BYTES_DEFAULT: u64 = 1024 * 1024;

/// ... or once the oldest pending byte has waited this long, whichever comes first.
pub const FLUSH_DELAY_US_DEFAULT: u64 = 200;

/// Largest number of chunks in one write job. Jobs complete (and acknowledge) in
/// order, so small jobs keep acknowledgements flowing while later jobs stream.
pub const FLUSH_JOB_CHUNKS_MAX: usize = 2;

/// Largest number of chunks in one durable (O_DSYNC) write job, all written at once.
/// A backlog within it (producers got ahead during a slow write) goes out as one
/// durable job instead of plain writes and an fdatasync, which take about twice as
/// long and let the backlog grow again (see docs/ARCHITECTURE.md).
pub const DURABLE_JOB_CHUNKS_MAX: usize = 4;

/// Largest number of write jobs in flight per partition. With 1 MiB chunks this
/// bounds a partition's queued write I/O at 8 MiB; the measured device needs a
/// queue depth of about 4 to pass its single-stream O_DIRECT rate.
/// (measured: 4 jobs x 8 chunks gave no more throughput than 4 x 2.)
pub const FLUSH_JOBS_IN_FLIGHT_MAX: usize = 4;

/// Without a producer waiting for durability, written bytes are fdatasynced at most
/// this long after they were written. Syncs cost a journal commit that stalls
/// concurrent O_DIRECT completions; `Memory` producers do not wait for them, and
/// 10 ms bounds what a machine crash can take from them.
pub const SYNC_BACKGROUND_DELAY_US_MAX: u64 = 10_000;

/// The broker's default TCP port.
pub const DEFAULT_PORT: u16 = 9470;

/// A partition fenced by an I/O error is opened again from the disk after this
/// pause, doubled after each failed attempt up to `FENCED_REOPEN_MAX_MS`
/// (`server::shard::drive`).
pub const FENCED_REOPEN_FIRST_MS: u64 = 1_000;
pub const FENCED_REOPEN_MAX_MS: u64 = 30_000;

/// How often a long-polling fetch of a fenced partition looks again.
pub const FENCED_POLL_MS: u64 = 100;

/// Open files below which the broker warns at start-up, having raised its soft
/// limit to the hard one (`server::raise_open_files_limit`).
pub const OPEN_FILES_WANTED: u64 = 16_384;

/// Connections the broker accepts at once (all shards together).
pub const CONNECTIONS_MAX_DEFAULT: usize = 4096;

/// Largest request frame. 64 MiB holds a produce of several maximum-size batches;
/// anything larger is refused before a byte of its body is buffered.
pub const FRAME_BYTES_MAX_DEFAULT: usize = 64 * 1024 * 1024;

/// Memory one shard lets connections hold for large request frames being received
/// and handled (see `server::conn`); a connection waits, and stops reading, while
/// it is used up. Must hold the largest frame.
pub const REQUEST_MEMORY_BYTES_DEFAULT: usize = 256 * 1024 * 1024;

/// Buffers of large request frames kept per shard for the next frames once their
/// requests are answered, in bytes (see `server::conn`): a fresh buffer is zeroed or
/// faulted in before the socket fills it, a reused one is not. Beyond this, buffers
/// are freed, oldest first. Counted apart from `request_memory_bytes`, which bounds
/// frames in use (within an eighth: a reused buffer may be that much longer).
pub const FRAME_POOL_BYTES_MAX: usize = 64 * 1024 * 1024;

/// A large frame (holding request memory) must arrive whole within this long of its
/// memory being granted, or its connection is closed: neither a stalled client nor
/// one trickling a byte at a time keeps the memory. 64 MiB in 30 s is 2.2 MB/s.
pub const FRAME_TIMEOUT_MS_DEFAULT: u64 = 30_000;

/// A response must be taken by its client within this long, or the connection is
/// closed (8 MiB in 30 s is 280 kB/s).
pub const WRITE_TIMEOUT_MS_DEFAULT: u64 = 30_000;

/// TCP keepalive on client connections: the first probe after this long without
/// traffic ...
pub const TCP_KEEPALIVE_IDLE_S: u64 = 60;
/// ... then one probe this often ...
pub const TCP_KEEPALIVE_INTERVAL_S: u64 = 10;
/// ... and the connection is dropped after this many go unanswered (a dead peer is
/// found within about two minutes, and its connection slot and memory freed).
pub const TCP_KEEPALIVE_PROBES: u32 = 6;

/// Requests one connection may have in flight; the reader stops reading past it.
pub const CONNECTION_IN_FLIGHT_MAX_DEFAULT: usize = 128;

/// Capacity of each bounded channel between two shards.
pub const SHARD_CHANNEL_CAPACITY: usize = 1024;

/// Partitions one topic may have.
pub const TOPIC_PARTITIONS_MAX: u32 = 10_000;

/// Most bytes one fetch returns (a fetch still returns one whole batch when that
/// batch alone is larger). Bounds the memory a response pins and keeps every frame
/// far below 4 GiB.
pub const FETCH_BYTES_MAX: u32 = 64 * 1024 * 1024;

/// At most this much of a cold fetch is read from the disk (a cold span, or the map
/// pages faulted in) on a helper thread before the fetch runs. The shard's two
/// helpers also make spares and remove files, so one cold read must not hold one
/// for long: 8 MiB is 4-8 ms of reading at this disk's speed.
pub const COLD_WARM_BYTES_MAX: usize = 8 * 1024 * 1024;

/// Cold spans (`storage::cold`) a partition keeps: the reader's, the read-ahead
/// after it, and the one before (a fetch starts at the index entry before its
/// offset, which may lie in it). Past it, the span earliest in the log goes.
pub const COLD_SPANS_PER_PARTITION: usize = 4;

/// Spans a cold reader's read-ahead keeps ready after the reader's own: each
/// read-ahead (about 8 MiB from the disk) overlaps the reader's sending of the span
/// before.
pub const COLD_AHEAD_SPANS: usize = 2;

/// Cold spans no read went through for this long give their buffers back (checked
/// with retention, every `RETENTION_CHECK_MS`).
pub const COLD_IDLE_MS: u64 = 5_000;

/// Read buffers per shard for cold reads, each `storage::cold::READ_BUF_BYTES`
/// (about 8 MiB). Past them, a cold read goes through the segment map instead.
pub const COLD_READ_BUFFERS_PER_SHARD: usize = 8;

/// Longest a fetch may wait for data at the tail.
pub const FETCH_WAIT_MS_MAX: u32 = 60_000;

/// How often each partition's group-commit driver applies retention (it also does
/// after every roll).
pub const RETENTION_CHECK_MS: u64 = 10_000;

/// How long an executor spins looking for work before it parks in io_uring: a
/// parked reactor is slower to run a task woken from another shard (see
/// docs/ARCHITECTURE.md, "Waking across shards").
pub const SPIN_BEFORE_PARK_US: u64 = 200;

/// Preempt period of a shard executor's default task queue, which runs only its main
/// future (the shard's work has a queue of its own, with a 1 ms budget). glommio's
/// default, 100 ms, left a window in which a start could hang for good (see
/// `storage::uring::with_heartbeat`).
pub const DEFAULT_QUEUE_PREEMPT_S: u64 = 10;

/// Period of each executor's heartbeat timer: the longest a shard can stay parked
/// while it has runnable tasks (see `storage::uring::with_heartbeat`).
pub const EXECUTOR_HEARTBEAT_MS: u64 = 10;

/// Allocation unit of the tail cache: appended batches are copied into blocks of this
/// size (a larger batch gets a block of its own), and readers get slices of them.
pub const TAIL_CACHE_BLOCK_BYTES: usize = 8 * 1024 * 1024;

/// Default tail cache of the whole broker, shared by its shards: this fraction of
/// physical memory (1/8).
pub const TAIL_CACHE_RAM_DIVISOR: u64 = 8;
