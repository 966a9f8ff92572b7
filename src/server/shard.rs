//! One shard: a glommio executor pinned to a core that owns a set of partitions
//! (placed by a stable hash of topic and partition), accepts connections on the
//! shared port, forwards requests for partitions it does not own to their shard
//! through bounded glommio channels, and runs group commit and retention for its own.
//!
//! Shard 0 also owns the topic catalog file: creates and deletes go through it and
//! it tells every other shard before answering.

use super::catalog::{self, Catalog};
use super::{conn, Shared};
use crate::batch::{self, ValidBatch};
use crate::limits;
use crate::protocol::{
    ErrorCode, OffsetSpec, PartitionInfo, PartitionSelector, Request, Response, TopicConfig,
    TopicInfo, API_VERSIONS,
};
use crate::storage::cold::ReadPool;
use crate::storage::partition::{offset_for_timestamp_shared, prepare_read};
use crate::storage::uring::{group_commit, UringIo};
use crate::storage::watermark::Watermark;
use crate::storage::{CacheBudget, Durability, LogIo, Partition, PartitionConfig, StorageError};
use crate::types::{Offset, TimestampMs};
use bytes::Bytes;
use futures_channel::oneshot;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a request handler answers: a response or a typed error with a message.
pub type Reply = Result<Response, (ErrorCode, String)>;

/// Work for a partition's owner shard.
#[derive(Debug)]
pub enum PartitionOp {
    Produce {
        durability: Durability,
        batches: Bytes,
    },
    Fetch {
        offset: Offset,
        max_bytes: u32,
        max_wait_ms: u32,
    },
    ListOffsets(OffsetSpec),
}

#[derive(Debug, Clone)]
pub enum CatalogChange {
    Create { name: String, config: TopicConfig },
    Delete { name: String },
}

/// Messages between shards (all `Send`: they cross threads through the mesh).
#[derive(Debug)]
pub enum ShardMsg {
    Partition {
        topic: String,
        partition: u32,
        op: PartitionOp,
        reply: oneshot::Sender<Reply>,
    },
    Catalog {
        change: CatalogChange,
        ack: oneshot::Sender<Result<(), String>>,
    },
    Admin {
        req: Request,
        reply: oneshot::Sender<Reply>,
    },
    Info {
        reply: oneshot::Sender<Vec<(String, PartitionInfo)>>,
    },
}

struct Slot {
    part: Rc<RefCell<Partition<UringIo>>>,
    stop: Watermark,
    driver: RefCell<Option<glommio::Task<Result<(), StorageError>>>>,
}

pub struct Shard {
    pub id: usize,
    pub shared: Arc<Shared>,
    senders: Senders<ShardMsg>,
    catalog: RefCell<Catalog>,
    partitions: RefCell<HashMap<(String, u32), Rc<Slot>>>,
    io: UringIo,
    /// The tail cache every partition of this shard draws from.
    cache: CacheBudget,
    /// Buffers for the partitions' cold reads (`storage::cold`).
    read_pool: ReadPool,
    /// Requests being handled on this shard (for the shutdown drain).
    pub active: Cell<usize>,
    /// Bytes of large request frames being received or handled on this shard's
    /// connections, out of `request_memory_bytes` (see `conn`).
    pub request_memory: conn::RequestMemory,
    /// Topic creates and deletes run one at a time (on shard 0): each awaits I/O
    /// between changing the catalog and the files, and a delete interleaved with a
    /// create of the same name would remove the new topic's files.
    admin_turn: glommio::sync::Semaphore,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Shard({})", self.id)
    }
}

/// The shard that owns `partition` of `topic`: a stable hash, so consecutive
/// partitions of a topic land on consecutive shards.
pub fn owner(topic: &str, partition: u32, shards: usize) -> usize {
    (crc32fast::hash(topic.as_bytes()) as usize + partition as usize) % shards
}

fn storage_error(e: StorageError) -> (ErrorCode, String) {
    let code = match &e {
        StorageError::InvalidBatch(_) => ErrorCode::InvalidBatch,
        StorageError::BatchTooLarge { .. } => ErrorCode::BatchTooLarge,
        StorageError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
        StorageError::ChecksumMismatch { .. }
        | StorageError::CorruptBatch { .. }
        | StorageError::OffsetGap { .. } => ErrorCode::CorruptData,
        StorageError::Config(_) => ErrorCode::InvalidConfig,
        StorageError::Io { .. } | StorageError::Fenced { .. } => ErrorCode::StorageError,
    };
    (code, e.to_string())
}

fn shutting_down() -> (ErrorCode, String) {
    (ErrorCode::ShuttingDown, "broker is shutting down".into())
}

pub async fn run(
    id: usize,
    shared: Arc<Shared>,
    mesh: MeshBuilder<ShardMsg, Full>,
    catalog: Catalog,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) -> anyhow::Result<()> {
    let started = async {
        let (senders, mut receivers) = mesh
            .join()
            .await
            .map_err(|e| anyhow::anyhow!("shard mesh: {e}"))?;
        let io = UringIo::new(&shared.config.data_dir.join(format!(".shard-{id}"))).await?;
        let shard = Rc::new(Shard {
            id,
            shared: shared.clone(),
            senders,
            catalog: RefCell::new(catalog),
            partitions: RefCell::new(HashMap::new()),
            io,
            cache: CacheBudget::new(shared.cache.clone()),
            read_pool: ReadPool::new(limits::COLD_READ_BUFFERS_PER_SHARD),
            active: Cell::new(0),
            request_memory: conn::RequestMemory::new(shared.config.request_memory_bytes),
            admin_turn: glommio::sync::Semaphore::new(1),
        });
        let topics: Vec<_> = shard
            .catalog
            .borrow()
            .topics
            .iter()
            .map(|(n, c)| (n.clone(), c.clone()))
            .collect();
        for (name, cfg) in topics {
            shard.open_owned(&name, &cfg)?;
        }
        for (_, rx) in receivers.streams() {
            let shard = shard.clone();
            glommio::spawn_local(async move {
                while let Some(msg) = rx.recv().await {
                    let shard = shard.clone();
                    glommio::spawn_local(async move { shard.on_message(msg).await }).detach();
                }
            })
            .detach();
        }
        let listener = glommio::net::TcpListener::bind(shared.config.listen)
            .map_err(|e| anyhow::anyhow!("listen on {}: {e}", shared.config.listen))?;
        anyhow::Ok((shard, listener))
    };
    let (shard, listener) = match started.await {
        Ok(x) => x,
        Err(e) => {
            let _ = ready.send(Err(format!("shard {id}: {e:#}")));
            return Err(e);
        }
    };
    let _ = ready.send(Ok(()));

    // Accept until shutdown.
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            wait_shutdown(&shared).await;
            None
        })
        .await;
        let Some(accepted) = accepted else { break };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(shard = id, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let n = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
        if n > shared.config.max_connections {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(
                shard = id,
                limit = shared.config.max_connections,
                "connection limit reached; closing new connection"
            );
            drop(stream);
            continue;
        }
        let shard = shard.clone();
        glommio::spawn_local(async move {
            conn::serve(&shard, stream).await;
            shard.shared.connections.fetch_sub(1, Ordering::SeqCst);
        })
        .detach();
    }
    drop(listener);
    // Drain: let in-flight requests finish, then flush and close every partition.
    let deadline = Instant::now() + Duration::from_millis(shared.config.shutdown_grace_ms);
    while shard.active.get() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    let slots: Vec<_> = shard.partitions.borrow_mut().drain().collect();
    for ((topic, p), slot) in slots {
        if let Err(e) = stop_slot(&slot).await {
            tracing::error!(shard = id, topic, partition = p, error = %e, "final flush failed");
        }
    }
    // Peers may still be forwarding for a moment; give them the grace period too.
    glommio::timer::sleep(Duration::from_millis(20)).await;
    shard.senders.close();
    tracing::info!(shard = id, "shard stopped");
    Ok(())
}

pub async fn wait_shutdown(shared: &Shared) {
    while !shared.shutdown.load(Ordering::SeqCst) {
        glommio::timer::sleep(Duration::from_millis(25)).await;
    }
}

/// What it takes to open (and reopen) one partition of this shard.
struct Opener {
    topic: String,
    partition: u32,
    dir: std::path::PathBuf,
    config: PartitionConfig,
    io: UringIo,
    cache: CacheBudget,
    read_pool: ReadPool,
}

impl Opener {
    /// Opens the partition (recovery), with the shard's tail cache and read buffers.
    fn open(&self) -> Result<Partition<UringIo>, StorageError> {
        let (mut part, report) = Partition::open(
            &self.dir,
            self.config.clone(),
            self.io.clone(),
            TimestampMs::now(),
        )?;
        part.set_tail_cache(self.cache.clone());
        part.set_read_pool(self.read_pool.clone());
        if report.truncated_bytes > 0 || !report.corruptions.is_empty() {
            tracing::warn!(
                topic = self.topic,
                partition = self.partition,
                ?report,
                "partition recovered with repairs"
            );
        }
        Ok(part)
    }
}

/// Runs a partition's group-commit driver until `stop`. When an I/O error fences
/// the partition (a failed write, fdatasync or cut: its appends are refused, its
/// waiters failed), opens it again from the disk after a pause, as a restart would
/// (recovery keeps exactly what the disk holds), so that it takes appends again
/// once the cause is gone; until then it keeps trying, less and less often. Reads
/// go on throughout, from the fenced partition and then from the reopened one.
async fn drive(
    part: Rc<RefCell<Partition<UringIo>>>,
    stop: Watermark,
    opener: Opener,
) -> Result<(), StorageError> {
    let first = Duration::from_millis(limits::FENCED_REOPEN_FIRST_MS);
    let most = Duration::from_millis(limits::FENCED_REOPEN_MAX_MS);
    let mut pause = first;
    loop {
        let ran = Instant::now();
        let fenced = match group_commit(part.clone(), stop.clone()).await {
            Ok(()) => return Ok(()),
            Err(e) if stop.get() >= 1 => return Err(e),
            Err(e) => e,
        };
        if ran.elapsed() > most {
            // It ran well since the last reopen (or the start): a new fault.
            pause = first;
        }
        loop {
            tracing::warn!(topic = opener.topic, partition = opener.partition, error = %fenced,
                retry_in_ms = pause.as_millis() as u64, "partition fenced; reopening it from the disk");
            futures_lite::future::or(glommio::timer::sleep(pause), async {
                stop.wait_for(1).await.ok();
            })
            .await;
            if stop.get() >= 1 {
                return Err(fenced);
            }
            // Kept doubling across reopens that fence again soon (a disk that
            // keeps failing): only a good run resets it, above.
            pause = (pause * 2).min(most);
            match opener.open() {
                Ok(mut reopened) => {
                    // Recovery kept what the disk holds (appends whose write or
                    // sync failed may be there or not; their producers got the
                    // error). Recovery runs here, on the shard, as at start-up.
                    reopened.keep_old_files();
                    *part.borrow_mut() = reopened;
                    tracing::info!(
                        topic = opener.topic,
                        partition = opener.partition,
                        "partition reopened after a fence"
                    );
                    break;
                }
                Err(e) => {
                    tracing::warn!(topic = opener.topic, partition = opener.partition, error = %e,
                        "could not reopen a fenced partition");
                }
            }
        }
    }
}

async fn stop_slot(slot: &Slot) -> Result<(), StorageError> {
    slot.stop.advance(1);
    let driver = slot.driver.borrow_mut().take();
    match driver {
        Some(d) => d.await,
        None => Ok(()),
    }
}

impl Shard {
    fn partition_config(&self, cfg: &TopicConfig) -> PartitionConfig {
        let d = &self.shared.config.topic_defaults;
        PartitionConfig {
            segment_bytes: cfg.segment_bytes.unwrap_or(d.segment_bytes),
            retention_bytes: cfg.retention_bytes.or(d.retention_bytes),
            retention_ms: cfg.retention_ms.or(d.retention_ms),
            ..d.clone()
        }
    }

    /// Opens (creating if needed) every partition of `topic` this shard owns.
    fn open_owned(&self, topic: &str, cfg: &TopicConfig) -> anyhow::Result<()> {
        for p in 0..cfg.partitions {
            if owner(topic, p, self.shared.shards) != self.id {
                continue;
            }
            let opener = Opener {
                topic: topic.to_owned(),
                partition: p,
                dir: catalog::partition_dir(&self.shared.config.data_dir, topic, p),
                config: self.partition_config(cfg),
                io: self.io.clone(),
                cache: self.cache.clone(),
                read_pool: self.read_pool.clone(),
            };
            let part = opener
                .open()
                .map_err(|e| anyhow::anyhow!("open {topic}/{p}: {e}"))?;
            let part = Rc::new(RefCell::new(part));
            let stop = Watermark::new(0);
            let driver = glommio::spawn_local(drive(part.clone(), stop.clone(), opener));
            self.partitions.borrow_mut().insert(
                (topic.to_owned(), p),
                Rc::new(Slot {
                    part,
                    stop,
                    driver: RefCell::new(Some(driver)),
                }),
            );
        }
        Ok(())
    }

    async fn on_message(&self, msg: ShardMsg) {
        self.active.set(self.active.get() + 1);
        match msg {
            ShardMsg::Partition {
                topic,
                partition,
                op,
                reply,
            } => {
                let r = self.partition_op(&topic, partition, op).await;
                let _ = reply.send(r);
            }
            ShardMsg::Catalog { change, ack } => {
                let _ = ack.send(self.apply_catalog(change).await);
            }
            ShardMsg::Admin { req, reply } => {
                let _ = reply.send(self.admin(req).await);
            }
            ShardMsg::Info { reply } => {
                let _ = reply.send(self.local_info());
            }
        }
        self.active.set(self.active.get() - 1);
    }

    /// Handles one client request (on the shard that accepted the connection).
    pub async fn handle(&self, req: Request) -> Reply {
        if self.shared.shutdown.load(Ordering::SeqCst) {
            return Err(shutting_down());
        }
        match req {
            Request::ApiVersions => Ok(Response::ApiVersions(
                API_VERSIONS
                    .iter()
                    .map(|(k, lo, hi)| (*k as u16, *lo, *hi))
                    .collect(),
            )),
            Request::CreateTopic { .. } | Request::DeleteTopic { .. } => {
                if self.id == 0 {
                    self.admin(req).await
                } else {
                    let (tx, rx) = oneshot::channel();
                    self.send(0, ShardMsg::Admin { req, reply: tx }).await?;
                    rx.await.unwrap_or_else(|_| Err(shutting_down()))
                }
            }
            Request::ListTopics => self.list_topics().await,
            Request::Produce {
                topic,
                partition,
                durability,
                batches,
            } => {
                let n = self.partition_count(&topic)?;
                let p = match partition {
                    PartitionSelector::Partition(p) => p,
                    PartitionSelector::Key(k) => crate::protocol::partition_for_key(&k, n),
                };
                self.route(
                    topic,
                    p,
                    n,
                    PartitionOp::Produce {
                        durability,
                        batches,
                    },
                )
                .await
            }
            Request::Fetch {
                topic,
                partition,
                offset,
                max_bytes,
                max_wait_ms,
            } => {
                let n = self.partition_count(&topic)?;
                let op = PartitionOp::Fetch {
                    offset,
                    max_bytes: max_bytes.min(limits::FETCH_BYTES_MAX),
                    max_wait_ms: max_wait_ms.min(limits::FETCH_WAIT_MS_MAX),
                };
                self.route(topic, partition, n, op).await
            }
            Request::ListOffsets {
                topic,
                partition,
                spec,
            } => {
                let n = self.partition_count(&topic)?;
                self.route(topic, partition, n, PartitionOp::ListOffsets(spec))
                    .await
            }
        }
    }

    fn partition_count(&self, topic: &str) -> Result<u32, (ErrorCode, String)> {
        self.catalog
            .borrow()
            .topics
            .get(topic)
            .map(|c| c.partitions)
            .ok_or_else(|| (ErrorCode::UnknownTopic, format!("unknown topic {topic:?}")))
    }

    async fn send(&self, to: usize, msg: ShardMsg) -> Result<(), (ErrorCode, String)> {
        self.senders.send_to(to, msg).await.map_err(|_| {
            (
                ErrorCode::ShuttingDown,
                format!("shard {to} is not accepting requests"),
            )
        })
    }

    async fn route(
        &self,
        topic: String,
        partition: u32,
        partitions: u32,
        op: PartitionOp,
    ) -> Reply {
        if partition >= partitions {
            return Err((
                ErrorCode::UnknownPartition,
                format!("topic {topic:?} has {partitions} partitions; {partition} does not exist"),
            ));
        }
        let to = owner(&topic, partition, self.shared.shards);
        if to == self.id {
            return self.partition_op(&topic, partition, op).await;
        }
        let (tx, rx) = oneshot::channel();
        self.send(
            to,
            ShardMsg::Partition {
                topic,
                partition,
                op,
                reply: tx,
            },
        )
        .await?;
        rx.await.unwrap_or_else(|_| Err(shutting_down()))
    }

    async fn partition_op(&self, topic: &str, partition: u32, op: PartitionOp) -> Reply {
        let slot = self
            .partitions
            .borrow()
            .get(&(topic.to_owned(), partition))
            .cloned()
            .ok_or_else(|| {
                (
                    ErrorCode::UnknownTopic,
                    format!("{topic}/{partition} is not open on this broker"),
                )
            })?;
        match op {
            PartitionOp::Produce {
                durability,
                batches,
            } => {
                // Check every batch before appending any, so a bad batch never
                // leaves part of a request in the log.
                let mut valid = Vec::new();
                let mut pos = 0;
                while pos < batches.len() {
                    let rest = &batches[pos..];
                    let len = batch::check_header(rest).map_err(|e| {
                        (ErrorCode::InvalidBatch, format!("batch at byte {pos}: {e}"))
                    })?;
                    valid.push(ValidBatch::parse(&rest[..len]).map_err(|e| {
                        (ErrorCode::InvalidBatch, format!("batch at byte {pos}: {e}"))
                    })?);
                    pos += len;
                }
                if valid.is_empty() {
                    return Err((
                        ErrorCode::MalformedRequest,
                        "produce without batches".to_owned(),
                    ));
                }
                let (bases, wait) = {
                    let mut part = slot.part.borrow_mut();
                    // All or none (see `Partition::append_all`).
                    let appended = part
                        .append_all(&valid, Instant::now(), TimestampMs::now())
                        .map_err(storage_error)?;
                    let last = appended.last().expect("at least one batch").last_offset;
                    let bases = appended.iter().map(|a| a.base_offset).collect();
                    (bases, part.wait_for(last, durability))
                };
                wait.await
                    .map_err(|e| (ErrorCode::StorageError, e.to_string()))?;
                Ok(Response::Produce {
                    partition,
                    base_offsets: bases,
                })
            }
            PartitionOp::Fetch {
                offset,
                max_bytes,
                max_wait_ms,
            } => {
                let deadline = Instant::now() + Duration::from_millis(u64::from(max_wait_ms));
                loop {
                    // Cold pages are read on a helper thread, not faulted in here.
                    // Data the tail cache does not hold is read from the disk off
                    // the shard's thread, and the span after it read ahead.
                    if let Some(ahead) = prepare_read(&slot.part, offset, max_bytes as usize).await
                    {
                        glommio::spawn_local(ahead).detach();
                    }
                    let (res, written) = {
                        let part = slot.part.borrow();
                        (part.read(offset, max_bytes as usize), part.written_watch())
                    };
                    let f = res.map_err(storage_error)?;
                    let now = Instant::now();
                    if f.chunks.is_empty()
                        && now < deadline
                        && !self.shared.shutdown.load(Ordering::SeqCst)
                    {
                        // Long poll: wake on the first write past `offset`, or at the deadline.
                        let more = async {
                            if written.wait_for(offset.0 + 1).await.is_err() {
                                // Fenced: nothing is written until it is reopened, and
                                // the wait fails at once; look again shortly rather
                                // than spin (which held the whole shard up to the
                                // deadline).
                                glommio::timer::sleep(Duration::from_millis(
                                    limits::FENCED_POLL_MS,
                                ))
                                .await;
                            }
                        };
                        futures_lite::future::or(more, glommio::timer::sleep(deadline - now)).await;
                        continue;
                    }
                    return Ok(Response::Fetch {
                        high_watermark: f.high_watermark,
                        log_start: f.log_start,
                        next_offset: f.next_offset,
                        records: f.chunks,
                    });
                }
            }
            PartitionOp::ListOffsets(spec) => {
                let offset = match spec {
                    OffsetSpec::Earliest => slot.part.borrow().log_start(),
                    OffsetSpec::Latest => slot.part.borrow().written_offset(),
                    // The scan reads segment maps: on a helper thread.
                    OffsetSpec::Timestamp(t) => {
                        offset_for_timestamp_shared(&slot.part, TimestampMs(t))
                            .await
                            .map_err(storage_error)?
                            .ok_or((
                                ErrorCode::OffsetNotFound,
                                format!("no record at or after timestamp {t}"),
                            ))?
                    }
                };
                Ok(Response::ListOffsets { offset })
            }
        }
    }

    fn local_info(&self) -> Vec<(String, PartitionInfo)> {
        self.partitions
            .borrow()
            .iter()
            .map(|((t, p), slot)| {
                let part = slot.part.borrow();
                (
                    t.clone(),
                    PartitionInfo {
                        partition: *p,
                        log_start: part.log_start(),
                        high_watermark: part.written_offset(),
                    },
                )
            })
            .collect()
    }

    async fn list_topics(&self) -> Reply {
        let mut infos = self.local_info();
        for to in (0..self.shared.shards).filter(|&s| s != self.id) {
            let (tx, rx) = oneshot::channel();
            self.send(to, ShardMsg::Info { reply: tx }).await?;
            infos.extend(rx.await.map_err(|_| shutting_down())?);
        }
        // Group once: scanning every partition for every topic was quadratic.
        let mut by_topic: HashMap<String, Vec<_>> = HashMap::new();
        for (t, i) in infos {
            by_topic.entry(t).or_default().push(i);
        }
        let catalog = self.catalog.borrow().clone();
        let topics = catalog
            .topics
            .into_iter()
            .map(|(name, config)| {
                let mut partitions = by_topic.remove(&name).unwrap_or_default();
                partitions.sort_by_key(|p| p.partition);
                TopicInfo {
                    name,
                    config,
                    partitions,
                }
            })
            .collect();
        Ok(Response::ListTopics(topics))
    }

    /// Topic creation and deletion, on shard 0 only.
    async fn admin(&self, req: Request) -> Reply {
        assert_eq!(self.id, 0, "admin requests run on shard 0");
        let _turn = self
            .admin_turn
            .acquire_permit(1)
            .await
            .map_err(|_| shutting_down())?;
        let change = match req {
            Request::CreateTopic { name, config } => {
                if self.catalog.borrow().topics.contains_key(&name) {
                    return Err((
                        ErrorCode::TopicExists,
                        format!("topic {name:?} already exists"),
                    ));
                }
                crate::protocol::validate_topic_config(&config)
                    .map_err(|e| (ErrorCode::InvalidConfig, e))?;
                CatalogChange::Create { name, config }
            }
            Request::DeleteTopic { name } => {
                if !self.catalog.borrow().topics.contains_key(&name) {
                    return Err((ErrorCode::UnknownTopic, format!("unknown topic {name:?}")));
                }
                CatalogChange::Delete { name }
            }
            other => {
                return Err((
                    ErrorCode::Internal,
                    format!("not an admin request: {other:?}"),
                ))
            }
        };
        // Persist first: a crash after this point reopens the topic (create) or
        // removes what is left of it (delete) on the next start.
        self.save_catalog(&change)?;
        let result = self.change_everywhere(&change).await;
        if let (Err(e), CatalogChange::Create { name, .. }) = (&result, &change) {
            // Some shard could not open its partitions: take the topic back out, so
            // the client can fix the cause and create it again (instead of meeting a
            // half-open topic that says it exists).
            tracing::warn!(topic = name, error = %e.1, "create failed; removing the topic again");
            let undo = CatalogChange::Delete { name: name.clone() };
            let undone = match self.save_catalog(&undo) {
                Ok(()) => self.change_everywhere(&undo).await,
                Err(e) => Err(e),
            };
            if let Err((_, u)) = undone {
                tracing::error!(topic = name, error = %u, "could not undo a failed create");
            }
        }
        result?;
        Ok(match change {
            CatalogChange::Create { .. } => Response::CreateTopic,
            CatalogChange::Delete { .. } => Response::DeleteTopic,
        })
    }

    /// Writes the catalog as it is after `change` (shard 0 only).
    fn save_catalog(&self, change: &CatalogChange) -> Result<(), (ErrorCode, String)> {
        let mut next = self.catalog.borrow().clone();
        match change {
            CatalogChange::Create { name, config } => {
                next.topics.insert(name.clone(), config.clone());
            }
            CatalogChange::Delete { name } => {
                next.topics.remove(name);
            }
        }
        next.save(&self.shared.config.data_dir)
            .map_err(|e| (ErrorCode::StorageError, format!("save catalog: {e}")))
    }

    /// Applies `change` on every shard (this one first), and for a delete removes
    /// the topic's directory; the first error of any shard, once all have run.
    async fn change_everywhere(&self, change: &CatalogChange) -> Result<(), (ErrorCode, String)> {
        let mut result = self.apply_catalog(change.clone()).await;
        for to in 1..self.shared.shards {
            let (tx, rx) = oneshot::channel();
            self.send(
                to,
                ShardMsg::Catalog {
                    change: change.clone(),
                    ack: tx,
                },
            )
            .await?;
            let r = rx
                .await
                .unwrap_or_else(|_| Err(format!("shard {to} went away")));
            result = result.and(r);
        }
        if let CatalogChange::Delete { name } = change {
            let dir = catalog::topic_dir(&self.shared.config.data_dir, name);
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    result = result.and(Err(format!("remove {}: {e}", dir.display())));
                }
            }
        }
        result.map_err(|e| (ErrorCode::StorageError, e))
    }

    /// Removes a partition's directory, if there is one. Unlinking a written 256 MiB
    /// segment took 45-50 ms here: off the shard's thread.
    async fn remove_partition_dir(&self, dir: std::path::PathBuf) -> Result<(), String> {
        let d = dir.clone();
        match self
            .io
            .run_blocking(move || std::fs::remove_dir_all(d))
            .await
        {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(format!("remove {}: {e}", dir.display()))
            }
            _ => Ok(()),
        }
    }

    async fn apply_catalog(&self, change: CatalogChange) -> Result<(), String> {
        match change {
            CatalogChange::Create { name, config } => {
                // A new topic starts empty: whatever an earlier topic of this name
                // left (a delete that failed partway) goes first, or it would be
                // recovered as this topic's data.
                for p in 0..config.partitions {
                    if owner(&name, p, self.shared.shards) != self.id {
                        continue;
                    }
                    let dir = catalog::partition_dir(&self.shared.config.data_dir, &name, p);
                    self.remove_partition_dir(dir).await?;
                }
                self.catalog
                    .borrow_mut()
                    .topics
                    .insert(name.clone(), config.clone());
                self.open_owned(&name, &config)
                    .map_err(|e| format!("{e:#}"))
            }
            CatalogChange::Delete { name } => {
                self.catalog.borrow_mut().topics.remove(&name);
                let slots: Vec<_> = {
                    let mut parts = self.partitions.borrow_mut();
                    let keys: Vec<_> = parts.keys().filter(|(t, _)| *t == name).cloned().collect();
                    keys.into_iter()
                        .filter_map(|k| parts.remove(&k).map(|s| (k, s)))
                        .collect()
                };
                for ((t, p), slot) in slots {
                    if let Err(e) = stop_slot(&slot).await {
                        tracing::warn!(topic = t, partition = p, error = %e, "flush before delete failed");
                    }
                    let dir = catalog::partition_dir(&self.shared.config.data_dir, &t, p);
                    drop(slot);
                    self.remove_partition_dir(dir).await?;
                }
                Ok(())
            }
        }
    }
}
