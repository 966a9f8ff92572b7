//! Fuzzes everything that reads segment bytes from disk: the batch parser and record
//! iterator, the segment scanner, the index decoders, and full partition recovery
//! (open + read everything) over an arbitrary `.log` file. None may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringbus::batch::BatchRef;
use ringbus::storage::io::{DirectIo, StdIo};
use ringbus::storage::segment::{index_path, log_path, scan, scan_while};
use ringbus::storage::{index, Partition, PartitionConfig, RecoveryPolicy};
use ringbus::{Offset, TimestampMs};
use std::ops::ControlFlow;
use std::sync::OnceLock;

fn workdir() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("tempdir")).path()
}

fuzz_target!(|data: &[u8]| {
    // Pure parsers.
    if let Ok(b) = BatchRef::parse_full(data) {
        for r in b.records() {
            if let Ok(r) = r {
                for h in r.headers() {
                    let _ = h;
                }
            }
        }
    }
    let _ = scan(data, 0, None, |_| {});
    let _ = scan(data, 0, Some(Offset(0)), |_| {});
    // A timestamp lookup's early stop: at the first batch not older than time 0.
    let _ = scan_while(data, 0, None, |b| {
        if b.max_timestamp >= TimestampMs(0) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    let _ = index::decode_index(data, data.len() as u64);
    let _ = index::decode_time_index(data, u32::MAX);

    // Recovery over the bytes as a segment file; the first byte picks the policy and
    // whether the tail of the input doubles as an index file.
    let Some((&mode, rest)) = data.split_first() else { return };
    let dir = workdir().join("p");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let (log, ix) = if mode & 2 != 0 && rest.len() > 16 {
        let cut = rest.len() - 16;
        (&rest[..cut], &rest[cut..])
    } else {
        (rest, &[][..])
    };
    std::fs::write(log_path(&dir, Offset(0)), log).expect("write log");
    if !ix.is_empty() {
        std::fs::write(index_path(&dir, Offset(0)), ix).expect("write index");
    }
    let config = PartitionConfig {
        segment_bytes: 64 * 1024,
        recovery: if mode & 1 != 0 { RecoveryPolicy::Full } else { RecoveryPolicy::TailFromIndex },
        ..PartitionConfig::default()
    };
    let io = StdIo { direct: DirectIo::Off };
    let Ok((p, _report)) = Partition::open(&dir, config, io, TimestampMs(0)) else { return };
    let mut cur = p.log_start();
    while let Ok(f) = p.read(cur, 1 << 16) {
        if f.chunks.is_empty() || f.next_offset <= cur {
            break;
        }
        for c in &f.chunks {
            // Everything recovery kept must parse.
            assert!(BatchRef::parse(c).is_ok(), "recovered log holds an invalid batch");
        }
        cur = f.next_offset;
    }
});
