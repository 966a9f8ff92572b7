//! CRC-32 (crc32fast, the batch checksum) over a 1 MiB batch and a 4 KiB one.

mod common;

use common::build;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("crc");
    for (name, batch) in [
        ("crc32_1MiB", build(1000, 1024)),
        ("crc32_4KiB", build(4, 1000)),
    ] {
        g.throughput(Throughput::Bytes(batch.len() as u64));
        g.bench_function(name, |b| b.iter(|| crc32fast::hash(black_box(&batch))));
    }
    g.finish();
}

criterion_group!(crc, benches);
criterion_main!(crc);
