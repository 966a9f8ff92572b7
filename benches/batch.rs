//! Batch format costs: full validation of a 1,000 × 1 KB and a 100 × 100 B batch
//! (header, CRC, every record), and building one on the client side. The CRC alone
//! is in `benches/crc.rs`.

mod common;

use common::build;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ringbus::batch::BatchRef;
use std::hint::black_box;

fn benches(c: &mut Criterion) {
    let batch = build(1000, 1024);
    let mut g = c.benchmark_group("batch");
    g.throughput(Throughput::Bytes(batch.len() as u64));
    g.bench_function("validate_1000x1KB", |b| {
        b.iter(|| {
            BatchRef::parse_full(black_box(&batch))
                .expect("valid")
                .record_count()
        })
    });
    g.bench_function("build_1000x1KB", |b| {
        b.iter_batched(|| (), |()| build(1000, 1024), BatchSize::SmallInput)
    });
    let small = build(100, 100);
    g.throughput(Throughput::Bytes(small.len() as u64));
    g.bench_function("validate_100x100B", |b| {
        b.iter(|| {
            BatchRef::parse_full(black_box(&small))
                .expect("valid")
                .record_count()
        })
    });
    g.finish();
}

criterion_group!(batch, benches);
criterion_main!(batch);
