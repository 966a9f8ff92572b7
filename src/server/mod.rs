//! The broker: configuration, start-up, one glommio executor per core, signal
//! handling and graceful shutdown. Shards live in [`shard`], connections in
//! [`conn`], the topic catalog in [`catalog`].
//!
//! This module and its children are where glommio meets the network; the layers
//! below (protocol, storage core) do not know about it.

pub mod catalog;
pub mod conn;
pub mod placement;
pub mod shard;

use crate::limits;
use crate::storage::tail_cache::CacheMemory;
use crate::storage::PartitionConfig;
pub use placement::PlacementMode;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Broker settings, from flags or a TOML file (`--config`); flags win.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Shards (executors). 0: as many as `placement` chooses (auto: one per CPU
    /// that does not take the data disk's interrupts).
    pub cores: usize,
    /// Which CPUs the shards run on (see [`placement`]). `auto` keeps them off the
    /// CPUs that take the data disk's interrupts, and with `cores` 0 runs one shard
    /// per remaining CPU.
    pub placement: PlacementMode,
    pub max_connections: usize,
    pub max_frame_bytes: usize,
    /// Requests one connection may have in flight.
    pub max_in_flight_per_connection: usize,
    /// Per shard: memory for large request frames, from their first byte until
    /// their request is answered. At least `max_frame_bytes` + 4.
    pub request_memory_bytes: usize,
    /// A large frame must arrive whole within this long of its request memory being
    /// granted, or its connection is closed (returning the memory). Above 0.
    pub frame_timeout_ms: u64,
    /// A response must be taken by its client within this long, or the connection
    /// is closed. Above 0.
    pub write_timeout_ms: u64,
    /// Partition settings of topics that do not set their own (a topic may set
    /// `segment_bytes`, `retention_bytes` and `retention_ms`), and the recovery
    /// every partition runs at start-up. TOML: the `[topic_defaults]` table.
    pub topic_defaults: PartitionConfig,
    /// How long a graceful shutdown waits for in-flight requests.
    pub shutdown_grace_ms: u64,
    /// Memory for copies of recently written batches, which consumers near the tail
    /// read instead of the disk; shared by every shard, reserved and touched in the
    /// background at start-up. `None`: an eighth of physical memory. Below 8 MiB
    /// the cache is off.
    pub tail_cache_bytes: Option<u64>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], limits::DEFAULT_PORT)),
            data_dir: PathBuf::from("ringbus-data"),
            cores: 0,
            placement: PlacementMode::Auto,
            max_connections: limits::CONNECTIONS_MAX_DEFAULT,
            max_frame_bytes: limits::FRAME_BYTES_MAX_DEFAULT,
            max_in_flight_per_connection: limits::CONNECTION_IN_FLIGHT_MAX_DEFAULT,
            request_memory_bytes: limits::REQUEST_MEMORY_BYTES_DEFAULT,
            frame_timeout_ms: limits::FRAME_TIMEOUT_MS_DEFAULT,
            write_timeout_ms: limits::WRITE_TIMEOUT_MS_DEFAULT,
            topic_defaults: PartitionConfig::default(),
            shutdown_grace_ms: 5_000,
            tail_cache_bytes: None,
        }
    }
}

impl ServerConfig {
    pub fn from_toml_file(path: &std::path::Path) -> anyhow::Result<ServerConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("read {}: {e}", path.display()))?;
        ServerConfig::from_toml_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// Parses a TOML configuration. Partition settings at the top level (where
    /// they were before the `[topic_defaults]` table) are refused with a pointer to it.
    pub fn from_toml_str(text: &str) -> anyhow::Result<ServerConfig> {
        toml::from_str(text).map_err(|e| {
            let mut moved: Vec<String> = toml::from_str::<toml::Table>(text)
                .map(|t| {
                    t.keys()
                        .filter(|k| TOPIC_DEFAULT_KEYS.contains(&k.as_str()))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            moved.sort();
            if moved.is_empty() {
                anyhow::anyhow!("{e}")
            } else {
                anyhow::anyhow!(
                    "{}\n{} belong in the [topic_defaults] table",
                    e.to_string().trim_end(),
                    moved.join(", ")
                )
            }
        })
    }

    /// The tail cache of the whole broker, in bytes.
    pub fn tail_cache_total(&self) -> u64 {
        self.tail_cache_bytes.unwrap_or_else(|| {
            crate::storage::io::physical_memory_bytes().unwrap_or(0)
                / limits::TAIL_CACHE_RAM_DIVISOR
        })
    }
}

/// The keys of `[topic_defaults]` ([`PartitionConfig`]'s fields), for the hint above.
const TOPIC_DEFAULT_KEYS: [&str; 7] = [
    "segment_bytes",
    "segment_ms",
    "retention_bytes",
    "retention_ms",
    "flush_bytes",
    "flush_delay_us",
    "recovery",
];

/// Raises this process's limit of open files to the most it may have (the hard
/// limit). Each partition keeps three files open per segment (log, offset index,
/// time index) and two more for the active segment's writes, and each client one
/// socket: at the usual soft limit of 1,024, a few hundred partitions would leave
/// topic creations and connections failing with EMFILE. Where the hard limit
/// itself is low, says so.
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) if n < limits::OPEN_FILES_WANTED => tracing::warn!(
            limit = n,
            "open files are limited to {n}; raise the hard limit (ulimit -Hn, or LimitNOFILE \
             for systemd) to serve many partitions and connections"
        ),
        Ok(n) => tracing::debug!(limit = n, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open files limit"),
    }
}

/// State every shard shares (atomics only: no locks on the request path).
#[derive(Debug)]
pub struct Shared {
    pub config: ServerConfig,
    pub shards: usize,
    pub connections: AtomicUsize,
    pub shutdown: AtomicBool,
    /// The tail cache's memory, shared by every shard.
    pub cache: Arc<CacheMemory>,
}

/// A running broker: its shards serve until [`Broker::shutdown`] (or a drop).
/// `ringbus serve` wraps one in signal handling; `ringbus-loadgen --embedded` and
/// tests start one in-process.
pub struct Broker {
    shared: Arc<Shared>,
    addr: SocketAddr,
    executors: Vec<glommio::ExecutorJoinHandle<anyhow::Result<()>>>,
    _lock: std::fs::File,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Broker({})", self.addr)
    }
}

impl Broker {
    /// Opens the data directory, recovers every partition and starts the shards;
    /// returns once all of them are listening.
    pub fn start(mut config: ServerConfig) -> anyhow::Result<Broker> {
        let largest = config
            .max_frame_bytes
            .saturating_add(crate::protocol::LENGTH_PREFIX_LEN);
        if config.request_memory_bytes < largest {
            anyhow::bail!(
                "request_memory_bytes ({}) must hold the largest frame (max_frame_bytes + 4 = {largest})",
                config.request_memory_bytes
            );
        }
        if config.frame_timeout_ms == 0 || config.write_timeout_ms == 0 {
            anyhow::bail!("frame_timeout_ms and write_timeout_ms must be above 0");
        }
        // Checked here so that a bad default stops the broker at once, not every
        // topic creation later.
        config
            .topic_defaults
            .validate()
            .map_err(|e| anyhow::anyhow!("topic_defaults: {e}"))?;
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| anyhow::anyhow!("create {}: {e}", config.data_dir.display()))?;
        raise_open_files_limit();
        let irq_cpus = placement::disk_irq_cpus(&config.data_dir);
        let cpus = placement::allowed_cpus();
        let plan = placement::plan(config.placement, config.cores, &cpus, &irq_cpus);
        let io_cpus = placement::io_worker_cpus(&plan, &cpus);
        let shards = plan.len();
        let lock = crate::storage::io::lock_dir(&config.data_dir).map_err(|e| {
            anyhow::anyhow!(
                "data directory {} is in use by another broker ({e})",
                config.data_dir.display()
            )
        })?;
        let catalog = catalog::Catalog::load(&config.data_dir)?;
        // A crash during a topic delete can leave its directory behind.
        if let Ok(entries) = std::fs::read_dir(config.data_dir.join("topics")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !catalog.topics.contains_key(&name) {
                    tracing::warn!(topic = name, "removing the data of a deleted topic");
                    std::fs::remove_dir_all(e.path())
                        .map_err(|err| anyhow::anyhow!("remove {}: {err}", e.path().display()))?;
                }
            }
        }
        // Bind once here to learn the port (for `:0`); shards then bind the same port
        // with SO_REUSEPORT and the kernel spreads connections across them.
        let probe = socket2::Socket::new(
            socket2::Domain::for_address(config.listen),
            socket2::Type::STREAM,
            None,
        )?;
        probe.set_reuse_port(true)?;
        probe.set_reuse_address(true)?;
        probe.bind(&config.listen.into())?;
        config.listen = probe
            .local_addr()?
            .as_socket()
            .ok_or_else(|| anyhow::anyhow!("listen address is not an IP socket"))?;
        let shared = Arc::new(Shared {
            config: config.clone(),
            shards,
            connections: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            cache: CacheMemory::new(
                config.tail_cache_total(),
                limits::TAIL_CACHE_BLOCK_BYTES,
                shards,
            ),
        });
        // Touch the cache's memory off the shards' threads: first-touch faults cost
        // the shard that takes them far more than the copy itself.
        let sh = shared.clone();
        let prefault = std::thread::Builder::new()
            .name("cache-prefault".into())
            .spawn(move || match sh.cache.prefault(&sh.shutdown) {
                Ok(n) => tracing::debug!(blocks = n, "tail cache memory ready"),
                Err(e) => tracing::warn!(error = %e, "could not reserve tail cache memory"),
            })?;
        drop(prefault);
        let mesh = glommio::channels::channel_mesh::MeshBuilder::full(
            shards,
            limits::SHARD_CHANNEL_CAPACITY,
        );
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let mut executors = Vec::new();
        for (id, cpu) in plan.iter().enumerate() {
            let shared = shared.clone();
            let mesh = mesh.clone();
            let catalog = catalog.clone();
            let ready = ready_tx.clone();
            let io_cpus = io_cpus.clone();
            let placement = match *cpu {
                Some(cpu) => glommio::Placement::Fixed(cpu),
                None => glommio::Placement::Unbound,
            };
            // The default queue's preempt period, the only one before the shard's own
            // queue (1 ms) exists: a long one closes the last window of the park that
            // `with_heartbeat` guards against (the thread descheduled for a whole
            // period before the main future's first poll). Only the main future runs
            // in the default queue, so nothing else preempts on it.
            let mut builder = crate::storage::uring::executor_builder(placement).preempt_timer(
                std::time::Duration::from_secs(limits::DEFAULT_QUEUE_PREEMPT_S),
            );
            // The shard's two helper threads (segment creation, file deletion, cold
            // reads) run beside its io_uring workers, off the shard's CPU where one is
            // known to be free of it (anywhere otherwise). Two, so a
            // cold read does not wait behind an unlink (45-50 ms for a written 256
            // MiB segment here) and the read-ahead overlaps the reader's own read:
            // d-cold 1,746-2,008 against 1,666-1,709 MB/s with one.
            let set = io_cpus.as_ref().and_then(|cpus| {
                glommio::CpuSet::online()
                    .map(|s| s.filter(|l| cpus.contains(&l.cpu)))
                    .ok()
                    .filter(|s| !s.is_empty())
            });
            builder = builder.blocking_thread_pool_placement(match set {
                Some(set) => glommio::PoolPlacement::Fenced(2, set),
                None => glommio::PoolPlacement::Unbound(2),
            });
            let ex = builder
                .name(&format!("shard-{id}"))
                .spawn(move || {
                    crate::storage::uring::with_heartbeat(async move {
                        if let Some(cpus) = &io_cpus {
                            if let Err(e) = crate::storage::uring::set_io_worker_cpus(cpus) {
                                tracing::warn!(shard = id, ?cpus, error = %e,
                                    "could not move io_uring workers off the shard's CPU");
                            }
                        }
                        // A queue whose latency matters: wakes from other threads (replies
                        // crossing shards) then kick a sleeping reactor at once instead of
                        // waiting for its next poll (docs/ARCHITECTURE.md, "Waking across
                        // shards").
                        let tq = glommio::executor().create_task_queue(
                            glommio::Shares::default(),
                            glommio::Latency::Matters(std::time::Duration::from_millis(1)),
                            "shard",
                        );
                        glommio::spawn_local_into(shard::run(id, shared, mesh, catalog, ready), tq)
                            .map_err(|e| anyhow::anyhow!("spawn shard {id}: {e}"))?
                            .await
                    })
                })
                .map_err(|e| anyhow::anyhow!("start shard {id}: {e}"))?;
            executors.push(ex);
        }
        drop(ready_tx);
        let mut broker = Broker {
            shared,
            addr: config.listen,
            executors,
            _lock: lock,
        };
        for _ in 0..shards {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let _ = broker.stop();
                    return Err(anyhow::anyhow!("shard failed to start: {e}"));
                }
                Err(_) => {
                    let _ = broker.stop();
                    return Err(anyhow::anyhow!("a shard exited during start-up"));
                }
            }
        }
        drop(probe);
        tracing::info!(
            addr = %config.listen, shards, data_dir = %config.data_dir.display(),
            tail_cache_bytes = broker.shared.cache.budget(), ?plan, ?irq_cpus, ?io_cpus,
            "ringbus listening"
        );
        Ok(broker)
    }

    /// Whether the tail cache's memory is reserved and touched (start-up does it in
    /// the background; benchmarks wait for it).
    pub fn cache_is_warm(&self) -> bool {
        self.shared.cache.is_warm()
    }

    /// The address the shards listen on (the real port when started on `:0`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Asks every shard to drain and stop, and waits for them.
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.join()
    }

    /// Waits for every shard to exit; the first to exit stops the others.
    fn join(&mut self) -> anyhow::Result<()> {
        let mut result = Ok(());
        for (id, ex) in self.executors.drain(..).enumerate() {
            match ex.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(anyhow::anyhow!("shard {id}: {e}")),
                Err(e) => result = Err(anyhow::anyhow!("shard {id} panicked: {e:?}")),
            }
            self.shared.shutdown.store(true, Ordering::SeqCst);
        }
        result
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Runs the broker until SIGINT or SIGTERM, then shuts down gracefully.
pub fn run(config: ServerConfig) -> anyhow::Result<()> {
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    let mut broker = Broker::start(config)?;
    println!("ringbus listening on {}", broker.addr());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let handle = signals.handle();
    let sh = broker.shared.clone();
    let signal_thread = std::thread::spawn(move || {
        let mut signals = signals;
        if let Some(sig) = signals.forever().next() {
            tracing::info!(signal = sig, "shutting down");
            sh.shutdown.store(true, Ordering::SeqCst);
        }
    });
    let result = broker.join();
    handle.close();
    let _ = signal_thread.join();
    tracing::info!("ringbus stopped");
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::RecoveryPolicy;

    #[test]
    fn topic_defaults_come_from_their_table() {
        let c = ServerConfig::from_toml_str(
            "max_connections = 7\n\
             [topic_defaults]\n\
             segment_bytes = 1048576\n\
             retention_ms = 60000\n\
             recovery = \"full\"\n",
        )
        .unwrap();
        assert_eq!(c.max_connections, 7);
        let d = &c.topic_defaults;
        assert_eq!(d.segment_bytes, 1 << 20);
        assert_eq!(d.retention_ms, Some(60_000));
        assert_eq!(d.recovery, RecoveryPolicy::Full);
        // What the table does not set keeps its default.
        let base = PartitionConfig::default();
        assert_eq!(d.flush_bytes, base.flush_bytes);
        assert_eq!(d.retention_bytes, None);
    }

    #[test]
    fn the_readme_example_parses() {
        let readme = include_str!("../../README.md");
        let block = readme
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("README has a toml block");
        let c = ServerConfig::from_toml_str(block).unwrap();
        assert_eq!(c.topic_defaults.recovery, RecoveryPolicy::Full);
        assert_eq!(c.topic_defaults.retention_ms, Some(604_800_000));
    }

    #[test]
    fn partition_settings_at_the_top_level_point_to_the_table() {
        let e = ServerConfig::from_toml_str("segment_bytes = 1048576\nretention_ms = 5\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\nretention_ms, segment_bytes belong in the [topic_defaults] table"),
            "{e}"
        );
        let e = ServerConfig::from_toml_str("[topic_defaults]\nsegment_size = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `segment_size`"), "{e}");
        let e = ServerConfig::from_toml_str("[topic_defaults]\nrecovery = \"some\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant `some`"), "{e}");
    }

    #[test]
    fn a_bad_topic_default_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().to_path_buf(),
            ..ServerConfig::default()
        };
        config.topic_defaults.segment_bytes = 10;
        let e = match Broker::start(config) {
            Ok(_) => panic!("a broker started with segment_bytes 10"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("topic_defaults: ") && e.contains("segment_bytes 10"),
            "{e}"
        );
    }
}
