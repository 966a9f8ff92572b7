//! The io_uring write ceiling: what glommio alone reaches writing 1 MiB O_DIRECT
//! blocks, from its registered buffer pool, into a preallocated file at a given
//! queue depth. The engine's append figures are compared with it (and with dd) in
//! docs/PERFORMANCE.md.
//!
//! Usage: `cargo run --release --example uring_ceiling -- [QUEUE_DEPTH] [DIR]`

use futures_util::stream::{self, StreamExt};
use glommio::io::OpenOptions;
use std::rc::Rc;
use std::time::Instant;

const BLOCK: usize = 1 << 20;
const TOTAL: u64 = 2 << 30;

fn main() {
    let qd: usize = std::env::args()
        .nth(1)
        .map_or(4, |s| s.parse().expect("queue depth"));
    let dir = std::env::args().nth(2).unwrap_or_else(|| ".".into());
    let path = std::path::Path::new(&dir).join("uring-ceiling.tmp");
    // Incompressible content unless RINGBUS_CEILING_ZEROS is set, so a storage
    // layer that compresses or deduplicates cannot flatter the ceiling.
    let random = std::env::var_os("RINGBUS_CEILING_ZEROS").is_none();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let pattern: std::sync::Arc<Vec<u8>> = std::sync::Arc::new(
        (0..(16 * BLOCK / 8))
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect(),
    );
    let mbps = ringbus::storage::uring::executor_builder(glommio::Placement::Fixed(0))
        .spawn(move || async move {
            let pattern = pattern;
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&path)
                .expect("create");
            ringbus::storage::io::size_and_reserve(&f, TOTAL, TOTAL).expect("fallocate");
            drop(f);
            let file = Rc::new(
                OpenOptions::new()
                    .write(true)
                    .dma_open(&path)
                    .await
                    .expect("open"),
            );
            let start = Instant::now();
            stream::iter(0..TOTAL / BLOCK as u64)
                .map(|i| {
                    let file = file.clone();
                    let pattern = pattern.clone();
                    async move {
                        let mut b = file.alloc_dma_buffer(BLOCK);
                        if random {
                            let at = (i as usize * 4099 * 8) % (15 * BLOCK);
                            b.as_bytes_mut().copy_from_slice(&pattern[at..at + BLOCK]);
                        } else {
                            b.as_bytes_mut().fill(0);
                        }
                        file.write_at(b, i * BLOCK as u64).await.expect("write");
                    }
                })
                .buffer_unordered(qd)
                .collect::<Vec<()>>()
                .await;
            file.fdatasync().await.expect("fdatasync");
            let secs = start.elapsed().as_secs_f64();
            let _ = std::fs::remove_file(&path);
            TOTAL as f64 / secs / 1e6
        })
        .expect("executor")
        .join()
        .expect("join");
    println!("uring_ceiling qd={qd}: {mbps:.0} MB/s");
}
