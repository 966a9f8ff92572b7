//! The io_uring backend (glommio `DmaFile`) and the group-commit driver that runs a
//! partition's flushes on a glommio executor.
//!
//! This module is one of the three places that import glommio (with the runtime
//! bootstrap and the network layer), so swapping the runtime touches only them.

use crate::limits;
use crate::storage::io::{LogIo, WriteBuf};
use crate::storage::partition::{
    apply_retention_shared, prepare_spare_shared, reserve_blocks_shared, run_write_shared,
    sync_shared, FlushDue, FlushScope, Partition,
};
use crate::storage::watermark::Watermark;
use crate::storage::StorageError;
use crate::types::TimestampMs;
use futures_util::stream::{FuturesUnordered, StreamExt};
use glommio::io::{DmaBuffer, DmaFile, OpenOptions};
use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

impl WriteBuf for DmaBuffer {
    fn as_slice(&self) -> &[u8] {
        self.as_bytes()
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        self.as_bytes_mut()
    }
}

/// A glommio executor builder with the I/O memory the log needs. DMA buffers from
/// glommio's registered pool are written with fixed-buffer operations; past the
/// pool, buffers come from the heap and every write pins its pages. Measured with
/// 1 MiB writes at queue depth 4: 2.6-3.0 GB/s from the pool, 1.3 GB/s from the heap;
/// the engine's appends went from 1.1-1.3 to 1.45-1.65 GB/s with 64 MiB.
pub fn executor_builder(placement: glommio::Placement) -> glommio::LocalExecutorBuilder {
    // Spinning briefly before parking: a parked reactor is slower to run a task
    // woken by another shard (a produce crossing shards). Small fsync batches (100 x
    // 100 B) ran at 527k-964k msgs/s with it, 271k-927k without (unpinned shards).
    glommio::LocalExecutorBuilder::new(placement)
        .io_memory(limits::URING_IO_MEMORY_BYTES)
        .spin_before_park(Duration::from_micros(limits::SPIN_BEFORE_PARK_US))
}

/// Runs `fut` as an executor's main future with timers pending beside it.
///
/// glommio 0.9 can park an executor that still has runnable tasks: its scheduler
/// loop (`run_task_queues`) returns "nothing ran" both when the queues are empty and
/// when the latency ring already holds a completion before the first queue ran (the
/// preempt timer of a `Latency::Matters(1 ms)` queue that fired while the thread was
/// descheduled, or a wake from another executor), and the caller parks on either.
/// The parked reactor then sleeps in `io_uring_enter` until some I/O completes or a
/// timer expires; at start-up (the shard mesh join) neither is coming, and a broker
/// hung there for good under CI load (both shards parked, `Broker::start` waiting
/// for them). A pending timer bounds such a sleep.
///
/// - The heartbeat, a timer every `EXECUTOR_HEARTBEAT_MS`, is polled here, inside
///   the main future, before `fut` is first polled. As a task of its own it was
///   armed only once the scheduler got to it, and an executor that parked before
///   then had nothing to wake it (one start in about 9,000 hung that way here with
///   both cores loaded, and one in CI).
/// - A fired timer leaves the reactor, so between the heartbeat firing and the main
///   task's next poll nothing would be pending. A second timer, set two periods
///   ahead on every poll (so it does not fire while the heartbeat runs), covers that
///   gap: a park for good now takes the race twice in a row.
///
/// What is left: a park before the main future's very first poll, which needs the
/// thread to be descheduled for a whole default preempt period between two
/// statements of glommio's loop, with nothing spawned yet that could have woken it
/// (the broker sets that period to `DEFAULT_QUEUE_PREEMPT_S`, not glommio's 100 ms);
/// or the race once when the heartbeat fires and again when the spare one does.
pub async fn with_heartbeat<F: Future>(fut: F) -> F::Output {
    let period = Duration::from_millis(limits::EXECUTOR_HEARTBEAT_MS);
    let mut beat = std::pin::pin!(async move {
        loop {
            glommio::timer::sleep(period).await;
        }
    });
    let mut spare: Option<glommio::timer::Timer> = None;
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        // The heartbeat never ends; polling it arms (or re-arms) its timer.
        let _ = beat.as_mut().poll(cx);
        // Arm the new spare before dropping (and so deregistering) the old one.
        let mut next = glommio::timer::Timer::new(2 * period);
        let _ = std::pin::Pin::new(&mut next).poll(cx);
        spare = Some(next);
        fut.as_mut().poll(cx)
    })
    .await
}

/// io_uring writes and fdatasync through glommio. Must be created and used on a
/// glommio executor thread.
#[derive(Clone)]
pub struct UringIo {
    /// Any DMA file of this executor: glommio allocates DMA buffers (from its
    /// registered pool when it can) through a file handle.
    allocator: Rc<DmaFile>,
}

impl std::fmt::Debug for UringIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UringIo")
    }
}

impl UringIo {
    /// Opens the backend; `dir` receives a small `.dma-alloc` file used only to
    /// reach glommio's buffer allocator.
    pub async fn new(dir: &Path) -> io::Result<UringIo> {
        std::fs::create_dir_all(dir)?;
        let f = OpenOptions::new()
            .create(true)
            .write(true)
            .read(true)
            .dma_open(dir.join(".dma-alloc"))
            .await?;
        Ok(UringIo {
            allocator: Rc::new(f),
        })
    }
}

/// A segment file opened twice: plain writes, and O_DSYNC writes that complete only
/// once durable. An O_DSYNC direct write makes the kernel flush the device (or write
/// with FUA) before the completion is posted, one io_uring round trip where a write
/// and then an fdatasync take two.
pub struct UringFile {
    plain: DmaFile,
    durable: DmaFile,
}

impl std::fmt::Debug for UringFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringFile")
            .field("fd", &self.plain.as_raw_fd())
            .field("durable_fd", &self.durable.as_raw_fd())
            .finish()
    }
}

impl LogIo for UringIo {
    type File = UringFile;
    type Buf = DmaBuffer;

    fn alloc(&self, len: usize) -> DmaBuffer {
        self.allocator.alloc_dma_buffer(len)
    }

    fn open(&self, path: &Path) -> impl Future<Output = io::Result<UringFile>> {
        let path = path.to_owned();
        async move {
            let plain = OpenOptions::new().write(true).dma_open(&path).await?;
            let durable = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DSYNC)
                .dma_open(&path)
                .await?;
            Ok(UringFile { plain, durable })
        }
    }

    fn write_at(
        &self,
        file: &UringFile,
        buf: DmaBuffer,
        len: usize,
        pos: u64,
    ) -> impl Future<Output = io::Result<Option<DmaBuffer>>> {
        write_dma(&file.plain, buf, len, pos)
    }

    fn write_durable_at(
        &self,
        file: &UringFile,
        buf: DmaBuffer,
        len: usize,
        pos: u64,
    ) -> impl Future<Output = io::Result<Option<DmaBuffer>>> {
        write_dma(&file.durable, buf, len, pos)
    }

    async fn sync_data(&self, file: &UringFile) -> io::Result<()> {
        Ok(file.plain.fdatasync().await?)
    }

    async fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let d = glommio::io::Directory::open(dir).await?;
        d.sync().await?;
        Ok(d.close().await?)
    }

    fn run_blocking<R, F>(&self, f: F) -> impl Future<Output = R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        glommio::executor().spawn_blocking(f)
    }
}

/// Writes `buf[..len]` at `pos` through `file`; a short write is an error. Hands the
/// buffer back for reuse when it was not trimmed.
fn write_dma(
    file: &DmaFile,
    mut buf: DmaBuffer,
    len: usize,
    pos: u64,
) -> impl Future<Output = io::Result<Option<DmaBuffer>>> + '_ {
    if len < buf.len() {
        // Trimming is permanent, so a partial chunk's buffer is not reused.
        buf.trim_to_size(len);
    }
    async move {
        // Shared form so the buffer comes back after the write for reuse: fresh
        // heap DMA buffers cost a page fault per 4 KiB (measured: 120x the minor
        // faults and half the throughput with 32 MiB in flight).
        let buf = Rc::new(buf);
        let n = file.write_rc_at(buf.clone(), pos).await?;
        if n != len {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write: {n} of {len} bytes at {pos}"),
            ));
        }
        Ok(Rc::try_unwrap(buf).ok())
    }
}

/// The group-commit driver for one partition. Three loops share it:
/// - the writer flushes staged bytes when `flush_bytes` are pending or the oldest
///   pending byte has waited `flush_delay_us`, whichever comes first, waking
///   `Memory` waiters as each write completes;
/// - the syncer issues one fdatasync whenever written bytes are not yet durable,
///   covering everything written before it (group commit), waking `Fsync` waiters;
/// - the spare maker reserves the active segment's next blocks ahead of the
///   appends, and creates the next segment's files once the active segment is half
///   full (so a roll only renames them), both on a helper thread.
///
/// Writes therefore keep streaming while a sync is in flight. Returns after a final
/// write and sync once `stop` reaches 1, or with the error that fenced the partition.
pub async fn group_commit<B: LogIo>(
    part: Rc<RefCell<Partition<B>>>,
    stop: Watermark,
) -> Result<(), StorageError> {
    let writer_done = Watermark::new(0);
    let writer = async {
        let r = write_loop(&part, &stop).await;
        writer_done.advance(1);
        r
    };
    let syncer = sync_loop(&part, &writer_done);
    let ((w, s), ()) = futures_lite::future::zip(
        futures_lite::future::zip(writer, syncer),
        spare_loop(&part, &writer_done),
    )
    .await;
    w.and(s)
}

/// Makes a spare segment whenever the partition asks for one, and applies retention
/// after each roll (an expired segment's file then becomes the spare) and every
/// `RETENTION_CHECK_MS` (age limits, idle cold spans), until the writer is done
/// (stopped or fenced: a fenced partition keeps its files as they are until it is
/// reopened, and reads through its maps).
/// Retention runs nowhere else on a served partition, so once the driver has
/// returned no helper thread is touching its directory (a topic delete removes it).
async fn spare_loop<B: LogIo>(part: &RefCell<Partition<B>>, writer_done: &Watermark) {
    let kicks = part.borrow().spare_kick_watch();
    let period = Duration::from_millis(limits::RETENTION_CHECK_MS);
    let mut next_check = Instant::now() + period;
    loop {
        let seen = kicks.get();
        // First, so that appends keep writing into reserved blocks.
        if reserve_blocks_shared(part).await {
            continue;
        }
        let periodic = Instant::now() >= next_check;
        if periodic {
            next_check = Instant::now() + period;
        }
        let due = part.borrow_mut().take_retention_due();
        if due || periodic {
            if let Err(e) = apply_retention_shared(part, TimestampMs::now()).await {
                tracing::error!(error = %e, "retention failed");
            }
        }
        if prepare_spare_shared(part).await {
            continue;
        }
        if writer_done.get() >= 1 {
            // Stopped, or fenced: a fenced partition still serves reads, but
            // nothing runs this loop's periodic work for it any more, so its cold
            // spans would keep the shard's read buffers for good.
            part.borrow_mut().stop_cold_reads();
            return;
        }
        let until_check = next_check.saturating_duration_since(Instant::now());
        futures_lite::future::or(
            async {
                kicks.wait_for(seen + 1).await.ok();
            },
            futures_lite::future::or(
                async {
                    writer_done.wait_for(1).await.ok();
                },
                glommio::timer::sleep(until_check),
            ),
        )
        .await;
    }
}

/// What ended one wait of the writer loop.
enum Event {
    JobDone(Result<(), StorageError>),
    Wake,
}

/// Runs the writer until `stop` or an error. On an error (the partition is fenced)
/// it first waits for the write jobs still running: a write dropped in flight may
/// still land on the disk later, after the partition is reopened
/// (`server::shard::drive`) and its offsets written again.
async fn write_loop<B: LogIo>(
    part: &RefCell<Partition<B>>,
    stop: &Watermark,
) -> Result<(), StorageError> {
    let (appended, kicks) = {
        let p = part.borrow();
        (p.appended_watch(), p.flush_kick_watch())
    };
    let mut running = FuturesUnordered::new();
    let result = loop {
        let stopping = stop.get() >= 1;
        // Start every write job that is due (several stream at once under load).
        let due = loop {
            let due = part.borrow().flush_due(Instant::now());
            let scope = match (stopping, due) {
                (true, _) => FlushScope::All,
                (false, FlushDue::Now) => FlushScope::Due,
                _ => break due,
            };
            let job = part.borrow_mut().begin_flush(scope);
            match job {
                Some(job) => running.push(run_write_shared(part, job)),
                None => break due,
            }
        };
        if let Err(e) = part.borrow().check_fenced() {
            break Err(e);
        }
        if stopping && running.is_empty() && part.borrow().pending_bytes() == 0 {
            break Ok(());
        }
        let next = appended.get() + 1;
        let kick = kicks.get() + 1;
        let idle = running.is_empty();
        let wake = async {
            match due {
                // Also wake when a sync completes (it kicks): partial data held
                // back while it ran (see `flush_due`) is due then. Never wait on the
                // durable mark itself: a waiter there reads as a producer waiting for
                // durability, which makes the syncer fdatasync after every write.
                FlushDue::Idle => {
                    let synced = async {
                        kicks.wait_for(kick).await.ok();
                    };
                    futures_lite::future::or(
                        async {
                            appended.wait_for(next).await.ok();
                        },
                        synced,
                    )
                    .await;
                }
                FlushDue::At(at) => {
                    let kicked = async {
                        kicks.wait_for(kick).await.ok();
                    };
                    // An append during the delay may come from an fsync producer,
                    // whose data is due at once (see `flush_due`): look again.
                    let more = async {
                        appended.wait_for(next).await.ok();
                    };
                    let wait = at.saturating_duration_since(Instant::now());
                    futures_lite::future::or(
                        glommio::timer::sleep(wait),
                        futures_lite::future::or(kicked, more),
                    )
                    .await;
                }
                // Due, but no job could start: a running one must finish first. With
                // none running (not expected), look again shortly instead of hanging.
                FlushDue::Now if idle => glommio::timer::sleep(Duration::from_micros(50)).await,
                FlushDue::Now => std::future::pending::<()>().await,
            }
            Event::Wake
        };
        let stopped = async {
            if stopping {
                std::future::pending::<()>().await;
            }
            stop.wait_for(1).await.ok();
            Event::Wake
        };
        let done = async {
            match running.next().await {
                Some(r) => Event::JobDone(r),
                None => std::future::pending().await,
            }
        };
        // Completions first, so acknowledgements are never starved by wake-ups.
        if let Event::JobDone(Err(e)) =
            futures_lite::future::or(done, futures_lite::future::or(wake, stopped)).await
        {
            break Err(e);
        }
    };
    if result.is_err() {
        while running.next().await.is_some() {}
    }
    result
}

/// Syncs when a producer waits for durability (at once: group commit), and
/// otherwise at most `SYNC_BACKGROUND_DELAY_US_MAX` after bytes were written, so
/// `Memory` traffic does not pay for journal commits it never waits on.
async fn sync_loop<B: LogIo>(
    part: &RefCell<Partition<B>>,
    writer_done: &Watermark,
) -> Result<(), StorageError> {
    let (written, durable) = {
        let p = part.borrow();
        (p.written_watch(), p.durable_watch())
    };
    let done = || async {
        writer_done.wait_for(1).await.ok();
    };
    loop {
        let unsynced = durable.get() < written.get();
        let demand = durable.waiter_count() > 0 || writer_done.get() >= 1;
        // No sync can start once the partition is fenced: look at that before
        // trying again, or this loop would spin without yielding.
        if unsynced && demand && sync_shared(part).await? {
            continue;
        }
        part.borrow().check_fenced()?;
        if writer_done.get() >= 1 {
            return Ok(());
        }
        if unsynced {
            let background =
                glommio::timer::sleep(Duration::from_micros(limits::SYNC_BACKGROUND_DELAY_US_MAX));
            let waited = futures_lite::future::or(durable.wait_for_waiters(), done());
            futures_lite::future::or(waited, background).await;
            sync_shared(part).await?;
        } else {
            let more = async {
                written.wait_for(durable.get() + 1).await.ok();
            };
            futures_lite::future::or(more, done()).await;
        }
    }
}

/// Sets the CPUs that the calling thread's io_uring workers may run on. io_uring
/// runs every fdatasync on an io-wq worker thread, which by default takes the
/// submitting thread's CPU affinity: a worker pinned with its shard waits for the
/// shard's CPU, behind the shard's own busy polling (`perf sched` saw waits up to
/// 3.2 ms). The kernel keeps one io-wq per thread, shared by its rings, so this
/// registers the affinity through a small ring of its own (Linux 5.14+).
#[allow(unsafe_code)]
pub fn set_io_worker_cpus(cpus: &[usize]) -> io::Result<()> {
    const IORING_REGISTER_IOWQ_AFF: libc::c_uint = 17;
    // SAFETY: cpu_set_t is plain data, and all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        if c >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: `c` is below CPU_SETSIZE (checked above), so the bit lies in `set`.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // struct io_uring_params: 120 bytes, all zero asks for the defaults.
    let mut params = [0u32; 30];
    // SAFETY: io_uring_setup writes at most size_of(io_uring_params) = 120 bytes
    // into `params`, which has them.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = fd as libc::c_int;
    // SAFETY: `fd` is the ring just created; the call reads size_of::<cpu_set_t>()
    // bytes from `set`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            fd,
            IORING_REGISTER_IOWQ_AFF,
            &set as *const libc::cpu_set_t,
            std::mem::size_of::<libc::cpu_set_t>(),
        )
    };
    let result = if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    };
    // SAFETY: `fd` is ours and closed once; the affinity belongs to the thread's
    // io-wq and outlives this ring.
    unsafe { libc::close(fd) };
    result
}
