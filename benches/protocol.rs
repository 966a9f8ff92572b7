//! Wire protocol costs: encoding and decoding a produce request carrying a 1 MiB
//! batch, a fetch response of 1 MiB, and a small ListOffsets request. Only the
//! client's produce encode copies the batch (reported in bytes/s); the decodes and
//! the fetch encode are zero-copy, so they are reported in frames/s.

mod common;

use bytes::Bytes;
use common::build;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringbus::protocol::{
    decode_request, decode_response, encode_request, encode_response, ApiKey, OffsetSpec,
    PartitionSelector, Request, Response, LENGTH_PREFIX_LEN,
};
use ringbus::storage::Durability;
use ringbus::Offset;
use std::hint::black_box;

fn benches(c: &mut Criterion) {
    let batch = Bytes::from(build(1000, 1024));
    let produce = Request::Produce {
        topic: "orders".into(),
        partition: PartitionSelector::Partition(3),
        durability: Durability::Fsync,
        batches: batch.clone(),
    };
    let mut g = c.benchmark_group("protocol");
    g.throughput(Throughput::Bytes(batch.len() as u64));
    let mut out = Vec::with_capacity(batch.len() + 64);
    g.bench_function("encode_produce_1MiB", |b| {
        b.iter(|| {
            out.clear();
            encode_request(7, black_box(&produce), &mut out);
            out.len()
        })
    });
    // The rest is zero-copy (independent of the batch size): frames per second.
    g.throughput(Throughput::Elements(1));
    let frame = Bytes::from(out[LENGTH_PREFIX_LEN..].to_vec());
    g.bench_function("decode_produce_1MiB", |b| {
        b.iter(|| decode_request(black_box(&frame)).expect("valid"))
    });
    let fetch = Response::Fetch {
        high_watermark: Offset(5000),
        log_start: Offset(0),
        next_offset: Offset(2000),
        records: vec![batch.clone()],
    };
    g.bench_function("encode_fetch_response_1MiB", |b| {
        b.iter(|| {
            out.clear();
            let tail = encode_response(7, black_box(&fetch), &mut out);
            tail.len()
        })
    });
    out.clear();
    for t in encode_response(7, &fetch, &mut out) {
        out.extend_from_slice(&t);
    }
    let frame = Bytes::from(out[LENGTH_PREFIX_LEN..].to_vec());
    g.bench_function("decode_fetch_response_1MiB", |b| {
        b.iter(|| decode_response(ApiKey::Fetch, black_box(&frame)).expect("valid"))
    });
    let small = Request::ListOffsets {
        topic: "orders".into(),
        partition: 3,
        spec: OffsetSpec::Latest,
    };
    g.bench_function("encode_decode_list_offsets", |b| {
        b.iter(|| {
            out.clear();
            encode_request(9, black_box(&small), &mut out);
            let frame = Bytes::copy_from_slice(&out[LENGTH_PREFIX_LEN..]);
            decode_request(&frame).expect("valid")
        })
    });
    g.finish();
}

criterion_group!(protocol, benches);
criterion_main!(protocol);
