//! Broker start-up and shutdown, repeated: every start must finish.
//!
//! glommio 0.9 can park an executor that has runnable tasks (see
//! `storage::uring::with_heartbeat`); before the heartbeat, about one broker start
//! in a hundred hung for good in the shard mesh join on a loaded machine, and CI ran
//! into its time limit. With the heartbeat as a task of its own (armed only once the
//! scheduler reached it), one start in about 9,000 still hung here, and one in a CI
//! run. Starting many brokers in a row, while other threads load both cores, makes
//! the first race likely enough to catch; the second shows up only in long runs.

use ringbus::client::Connection;
use ringbus::protocol::{Request, Response};
use ringbus::server::{Broker, ServerConfig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

const ROUNDS: usize = 60;

#[test]
fn repeated_starts_never_hang() {
    let dir = tempfile::tempdir().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Keep both cores busy so shard threads get descheduled mid-loop.
    let hogs: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();
    for round in 0..ROUNDS {
        let config = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().to_path_buf(),
            cores: 2,
            tail_cache_bytes: Some(16 << 20),
            ..ServerConfig::default()
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let result = Broker::start(config).and_then(|broker| {
                let conn = Connection::connect(broker.addr())?;
                let reply = conn
                    .send(&Request::ApiVersions)?
                    .wait_timeout(Duration::from_secs(10))?;
                broker.shutdown()?;
                Ok(reply)
            });
            let _ = tx.send(result.map_err(|e| e.to_string()));
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Ok(Response::ApiVersions(v))) => assert!(!v.is_empty()),
            Ok(other) => panic!("round {round}: {other:?}"),
            Err(_) => {
                stop.store(true, Ordering::Relaxed);
                panic!("round {round}: start, one request and shutdown took over 20 s");
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for h in hogs {
        h.join().unwrap();
    }
}
