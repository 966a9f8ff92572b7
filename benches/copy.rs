//! The tail cache's copy of a batch: a plain `copy_from_slice` against the
//! streaming (non-temporal) copy of `storage::copy`, each writing 1 MiB batches
//! front to back through a 64 MiB area, as appends fill the cache's blocks (far
//! more than the CPU's caches hold, so a destination line is never still cached).

mod common;

use common::build;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringbus::storage::copy::copy_streaming;
use std::hint::black_box;

const AREA_BYTES: usize = 64 << 20;

fn benches(c: &mut Criterion) {
    let batch = build(1000, 1024);
    let mut area = vec![0u8; AREA_BYTES];
    let slots = AREA_BYTES / batch.len();
    let mut g = c.benchmark_group("copy");
    g.throughput(Throughput::Bytes(batch.len() as u64));
    let mut next = 0;
    g.bench_function("plain_1MiB", |b| {
        b.iter(|| {
            let at = (next % slots) * batch.len();
            next += 1;
            area[at..at + batch.len()].copy_from_slice(black_box(&batch));
        })
    });
    g.bench_function("streaming_1MiB", |b| {
        b.iter(|| {
            let at = (next % slots) * batch.len();
            next += 1;
            copy_streaming(&mut area[at..at + batch.len()], black_box(&batch));
        })
    });
    g.finish();
    black_box(&area);
}

criterion_group!(copy, benches);
criterion_main!(copy);
