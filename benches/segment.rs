//! Segment append and read throughput (one partition's active segments), through the
//! real io_uring backend and the group-commit driver: 1 KB records in 1,000-record batches (about 1 MiB each),
//! with `memory` and `fsync` durability; and sequential fetch of a 256 MiB log.
//!
//! The producer keeps `IN_FLIGHT` batches unacknowledged, as a pipelining client
//! does. One executor and partition live for the whole benchmark (steady state), and
//! retention keeps the data directory near 1 GiB however long criterion runs.

mod common;

use common::{build, fill};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringbus::batch::BatchRef;
use ringbus::storage::uring::{group_commit, UringIo};
use ringbus::storage::watermark::Watermark;
use ringbus::storage::{Durability, Partition, PartitionConfig, StdIo};
use ringbus::{Offset, TimestampMs};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

const IN_FLIGHT: usize = 8;

fn config() -> PartitionConfig {
    PartitionConfig {
        retention_bytes: Some(1 << 30),
        ..PartitionConfig::default()
    }
}

/// One partition on one glommio executor on the bench thread, kept for the whole
/// benchmark so every sample measures the steady state (an executor and a reopen per
/// sample made criterion pick 7-140 batch samples, dominated by ramp-up).
struct Appender {
    ex: glommio::LocalExecutor,
    part: Rc<RefCell<Partition<UringIo>>>,
    stop: Watermark,
    _dir: tempfile::TempDir,
}

impl Appender {
    fn new() -> Appender {
        let dir = tempfile::tempdir_in(".").expect("tempdir");
        let ex = ringbus::storage::uring::executor_builder(glommio::Placement::Fixed(0))
            .make()
            .expect("executor");
        let path = dir.path().to_owned();
        let (part, stop) = ex.run(async move {
            let io = UringIo::new(&path).await.expect("uring io");
            let (p, _) = Partition::open(&path, config(), io, TimestampMs::now()).expect("open");
            let p = Rc::new(RefCell::new(p));
            let stop = Watermark::new(0);
            glommio::spawn_local(group_commit(p.clone(), stop.clone())).detach();
            (p, stop)
        });
        Appender {
            ex,
            part,
            stop,
            _dir: dir,
        }
    }

    /// Appends `iters` copies of `batch`, acknowledging at `durability`; returns the
    /// time from the first append to the last acknowledgement.
    fn run(&self, batch: &[u8], iters: u64, durability: Durability) -> Duration {
        let p = self.part.clone();
        self.ex.run(async move {
            let mut waits = VecDeque::new();
            let start = Instant::now();
            for i in 0..iters {
                if waits.len() >= IN_FLIGHT {
                    let w: ringbus::storage::watermark::WaitFor =
                        waits.pop_front().expect("non-empty");
                    w.await.expect("ack");
                }
                let mut part = p.borrow_mut();
                let a = part
                    .append(batch, Instant::now(), TimestampMs::now())
                    .expect("append");
                waits.push_back(part.wait_for(a.last_offset, durability));
                if i % 256 == 255 {
                    part.apply_retention(TimestampMs::now()).expect("retention");
                }
            }
            for w in waits {
                w.await.expect("ack");
            }
            start.elapsed()
        })
    }
}

impl Drop for Appender {
    fn drop(&mut self) {
        self.stop.advance(1);
        // Let the driver write and sync what is left before the directory goes.
        self.ex
            .run(glommio::timer::sleep(Duration::from_millis(50)));
    }
}

fn appends(c: &mut Criterion) {
    let batch = build(1000, 1024);
    let mut g = c.benchmark_group("segment_append");
    g.throughput(Throughput::Bytes(batch.len() as u64));
    g.sample_size(20).measurement_time(Duration::from_secs(8));
    for (name, d) in [
        ("memory_1000x1KB", Durability::Memory),
        ("fsync_1000x1KB", Durability::Fsync),
    ] {
        let app = Appender::new();
        g.bench_function(name, |b| b.iter_custom(|iters| app.run(&batch, iters, d)));
    }
    g.finish();
}

fn reads(c: &mut Criterion) {
    // 256 MiB written once, then fetched front to back in 1 MiB fetches (each
    // fetch walks batch headers and checks every CRC).
    let dir = tempfile::tempdir_in(".").expect("tempdir");
    let batch = build(1000, 1024);
    let (mut p, _) =
        Partition::open(dir.path(), config(), StdIo::default(), TimestampMs::now()).expect("open");
    let total = fill(&mut p, &batch, 256 << 20);
    let mut g = c.benchmark_group("segment_read");
    g.throughput(Throughput::Bytes(total));
    g.sample_size(10);
    g.bench_function("sequential_256MiB_1MiB_fetches", |b| {
        b.iter(|| {
            let mut cur = Offset(0);
            let mut bytes = 0usize;
            loop {
                let f = p.read(cur, 1 << 20).expect("read");
                if f.chunks.is_empty() {
                    break;
                }
                bytes += f.bytes();
                cur = f.next_offset;
            }
            assert_eq!(bytes as u64, total);
            BatchRef::parse(&p.read(Offset(0), 1).expect("read").chunks[0]).expect("valid");
        })
    });
    g.finish();
}

// Reads first: the append benches run their executor on this thread (pinning it to
// core 0) and leave gigabytes of deleted segments being discarded behind them.
criterion_group!(segment, reads, appends);
criterion_main!(segment);
