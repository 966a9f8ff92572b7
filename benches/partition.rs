//! Partition fetch: reads that cross segment boundaries and reads at random offsets
//! (sparse-index lookup, header walk, CRC of every batch returned), on a 256 MiB log
//! of 8 MiB segments. The appends are benchmarked in `benches/segment.rs`.

mod common;

use common::{build, fill};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringbus::storage::{Partition, PartitionConfig, StdIo};
use ringbus::{Offset, TimestampMs};

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(".").expect("tempdir");
    let config = PartitionConfig {
        segment_bytes: 8 << 20,
        ..PartitionConfig::default()
    };
    let (mut p, _) =
        Partition::open(dir.path(), config, StdIo::default(), TimestampMs::now()).expect("open");
    // 64 KiB batches (64 x 1 KB records), so a fetch ends inside segments too.
    let batch = build(64, 1024);
    let total = fill(&mut p, &batch, 256 << 20);
    let end = p.written_offset();
    assert!(p.segment_count() > 30, "the log must span many segments");

    let mut g = c.benchmark_group("partition_fetch");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(total));
    g.bench_function("sequential_4MiB_fetches_8MiB_segments", |b| {
        b.iter(|| {
            let mut cur = Offset(0);
            let mut bytes = 0usize;
            while cur < end {
                let f = p.read(cur, 4 << 20).expect("read");
                bytes += f.bytes();
                cur = f.next_offset;
            }
            assert_eq!(bytes as u64, total);
        })
    });
    g.throughput(Throughput::Elements(1));
    g.sample_size(50);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    g.bench_function("random_offset_64KiB_fetch", |b| {
        b.iter(|| {
            // xorshift: a cheap, fixed pseudo-random sequence of offsets.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let f = p.read(Offset(x % end.0), 64 << 10).expect("read");
            assert!(f.bytes() > 0);
        })
    });
    g.finish();
}

criterion_group!(partition, benches);
criterion_main!(partition);
