//! kill -9 while a child process appends with fsync durability through the real
//! io_uring backend and group commit: every batch the child reported as durable
//! must be on disk, intact, after reopening.

mod common;

use common::*;
use ringbus::batch::BatchRef;
use ringbus::storage::uring::{group_commit, UringIo};
use ringbus::storage::watermark::Watermark;
use ringbus::storage::{Durability, Partition, PartitionConfig};
use ringbus::{Offset, TimestampMs};
use std::cell::RefCell;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "RINGBUS_KILL_CHILD_DIR";
/// Set for the rounds under size retention: the child's expired segments' files
/// are reused for new segments (recycled), and old batches sit past the new ones.
const RETENTION_ENV: &str = "RINGBUS_KILL_CHILD_RETENTION";
const PRODUCERS: usize = 4;

/// The child process of `kill9_keeps_every_fsynced_batch`, which runs it with
/// `--ignored`; on its own it has nothing to check.
#[test]
#[ignore = "helper process: kill9_keeps_every_fsynced_batch starts it and kills it"]
fn child_appender() {
    let dir = std::env::var(CHILD_ENV).expect("run by kill9_keeps_every_fsynced_batch");
    let ex = ringbus::storage::uring::executor_builder(glommio::Placement::Unbound)
        .make()
        .unwrap();
    ex.run(async move {
        let dir = std::path::PathBuf::from(dir);
        let io = UringIo::new(&dir).await.unwrap();
        let cfg = PartitionConfig {
            segment_bytes: 256 * 1024,
            flush_delay_us: 300,
            retention_bytes: std::env::var(RETENTION_ENV)
                .ok()
                .map(|v| v.parse().unwrap()),
            ..PartitionConfig::default()
        };
        let (p, _) = Partition::open(&dir, cfg, io, TimestampMs::now()).unwrap();
        let p = Rc::new(RefCell::new(p));
        let stop = Watermark::new(0);
        glommio::spawn_local(group_commit(p.clone(), stop)).detach();
        let tasks: Vec<_> = (0..PRODUCERS)
            .map(|t| {
                let p = p.clone();
                glommio::spawn_local(async move {
                    for seq in 0u64.. {
                        let tag = format!("p{t}s{seq}");
                        let records = 1 + (seq as usize % 7);
                        let b = batch(&tag, records, 200 + (seq as usize % 900), 1_000);
                        let (a, wait) = {
                            let mut p = p.borrow_mut();
                            let a = p.append(&b, Instant::now(), TimestampMs::now()).unwrap();
                            (a, p.wait_for(a.last_offset, Durability::Fsync))
                        };
                        wait.await.unwrap();
                        println!("durable {} {} {tag}", a.base_offset.0, records);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await;
        }
    });
}

#[test]
fn kill9_keeps_every_fsynced_batch() {
    let exe = std::env::current_exe().unwrap();
    let rounds = [
        (150u64, None),
        (400, None),
        (900, None),
        (600, Some(1024 * 1024u64)),
        (1200, Some(1024 * 1024)),
    ];
    for (round, (delay_ms, retention)) in rounds.into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let mut command = Command::new(&exe);
        if let Some(r) = retention {
            command.env(RETENTION_ENV, r.to_string());
        }
        let mut child = command
            .args([
                "--ignored",
                "--exact",
                "child_appender",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut acked = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut it = line.split_whitespace();
                if it.next() != Some("durable") {
                    continue;
                }
                let base: u64 = it.next().unwrap().parse().unwrap();
                let count: usize = it.next().unwrap().parse().unwrap();
                let tag = it.next().unwrap().to_owned();
                acked.push((Offset(base), count, tag));
                if acked.len() == 1 {
                    let _ = first_tx.send(());
                }
            }
            acked
        });
        // The kill lands `delay_ms` after the first acknowledgement, so a slow
        // start (registering the executor's I/O memory) does not eat the window.
        first_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("child acknowledged nothing");
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let acked = reader.join().unwrap();
        assert!(
            acked.len() > 10,
            "round {round}: child acknowledged only {} batches",
            acked.len()
        );

        let (p, report) = open(
            dir.path(),
            PartitionConfig {
                segment_bytes: 256 * 1024,
                ..PartitionConfig::default()
            },
        );
        assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
        if retention.is_some() {
            // Retention ran after rolls: expired batches are gone by design, and
            // the files of some were reused.
            let recycled = p
                .segment_bases()
                .iter()
                .filter(|&&b| {
                    let log = ringbus::storage::segment::log_path(dir.path(), b);
                    ringbus::storage::segment::is_recycled(&log)
                })
                .count();
            assert!(recycled > 0, "round {round}: no segment was recycled");
        }
        for (base, count, tag) in acked.iter().filter(|(b, _, _)| *b >= p.log_start()) {
            let f = p
                .read(*base, 1)
                .unwrap_or_else(|e| panic!("round {round}: acked offset {base} unreadable: {e}"));
            let b = BatchRef::parse_full(&f.chunks[0]).unwrap();
            assert_eq!(b.base_offset(), *base);
            assert_eq!(b.record_count() as usize, *count);
            for (j, r) in b.records().enumerate() {
                let r = r.unwrap();
                assert!(
                    r.value
                        .unwrap()
                        .starts_with(format!("{tag}-{j}").as_bytes()),
                    "round {round}: wrong data at {}",
                    r.offset
                );
            }
        }
        let max_acked = acked.iter().map(|(b, c, _)| b.0 + *c as u64).max().unwrap();
        assert!(p.next_offset().0 >= max_acked);
        // Every record from the log start to the recovered end reads back in order.
        let all = read_all(&p, p.log_start());
        assert_eq!(all.len() as u64, p.next_offset().0 - p.log_start().0);
        eprintln!(
            "round {round}: killed after {delay_ms} ms, {} acked batches, recovered {} records, {} segments, truncated {} bytes, recycled tail {} bytes",
            acked.len(),
            all.len(),
            p.segment_count(),
            report.truncated_bytes,
            report.recycled_bytes
        );
    }
}
