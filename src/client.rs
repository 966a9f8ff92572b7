//! The Rust client: a pipelined connection, an admin API, a batching `Producer` and a
//! long-polling `Consumer`. Plain threads and blocking sockets, so it works from any
//! program, async runtime or not; it never touches glommio.
//!
//! One [`Connection`] carries many requests at once: a writer sends frames as they
//! come and a reader thread matches responses to requests by correlation id.

use crate::batch::{BatchBuilder, BatchRef, RecordInput};
use crate::limits;
use crate::protocol::{
    self, ApiKey, ErrorCode, OffsetSpec, PartitionSelector, Request, Response, TopicConfig,
    TopicInfo,
};
use crate::storage::Durability;
use crate::types::{Offset, TimestampMs};
use bytes::Bytes;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// Largest response frame the client accepts.
pub const RESPONSE_FRAME_BYTES_MAX: usize = 256 * 1024 * 1024;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("connection lost: {0}")]
    Disconnected(String),
    #[error("broker error {code:?}: {message}")]
    Broker { code: ErrorCode, message: String },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

impl ClientError {
    /// Whether retrying on a new connection can help.
    pub fn is_retriable(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. } | ClientError::Disconnected(_) | ClientError::Timeout(_)
        )
    }

    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Broker { code, .. } => Some(*code),
            _ => None,
        }
    }
}

type Reply = Result<Response, ClientError>;

struct Shared {
    pending: Mutex<HashMap<u32, (ApiKey, mpsc::SyncSender<Reply>)>>,
    closed: Mutex<Option<String>>,
}

impl Shared {
    fn fail_all(&self, why: &str) {
        *self.closed.lock().expect("lock") = Some(why.to_owned());
        for (_, (_, tx)) in self.pending.lock().expect("lock").drain() {
            let _ = tx.send(Err(ClientError::Disconnected(why.to_owned())));
        }
    }
}

/// A response not yet received.
#[derive(Debug)]
pub struct PendingReply {
    rx: mpsc::Receiver<Reply>,
}

impl PendingReply {
    pub fn wait(self) -> Reply {
        self.rx
            .recv()
            .unwrap_or_else(|_| Err(ClientError::Disconnected("connection closed".into())))
    }

    pub fn wait_timeout(self, t: Duration) -> Reply {
        match self.rx.recv_timeout(t) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(ClientError::Timeout(t)),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(ClientError::Disconnected("connection closed".into()))
            }
        }
    }
}

/// One TCP connection with many requests in flight.
pub struct Connection {
    addr: SocketAddr,
    writer: Mutex<TcpStream>,
    shared: Arc<Shared>,
    next_id: AtomicU32,
    reader: Option<thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Connection({})", self.addr)
    }
}

impl Connection {
    pub fn connect(
        addr: impl ToSocketAddrs + std::fmt::Display,
    ) -> Result<Connection, ClientError> {
        let err = |reason: String| ClientError::Connect {
            addr: addr.to_string(),
            reason,
        };
        let addrs: Vec<_> = addr
            .to_socket_addrs()
            .map_err(|e| err(e.to_string()))?
            .collect();
        let mut last = String::from("no address");
        for a in addrs {
            match TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
                Ok(s) => {
                    let conn = Self::from_stream(a, s).map_err(|e| err(e.to_string()))?;
                    conn.handshake().map_err(|e| err(e.to_string()))?;
                    return Ok(conn);
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(err(last))
    }

    fn from_stream(addr: SocketAddr, stream: TcpStream) -> std::io::Result<Connection> {
        stream.set_nodelay(true)?;
        let read = stream.try_clone()?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            closed: Mutex::new(None),
        });
        let sh = shared.clone();
        let reader = thread::Builder::new()
            .name("ringbus-client-reader".into())
            .spawn(move || read_loop(read, &sh))?;
        Ok(Connection {
            addr,
            writer: Mutex::new(stream),
            shared,
            next_id: AtomicU32::new(1),
            reader: Some(reader),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The API-versions handshake: the broker must speak version 0 of every API
    /// this client uses.
    fn handshake(&self) -> Result<(), ClientError> {
        let versions = expect(
            self.send(&Request::ApiVersions)?
                .wait_timeout(Duration::from_secs(10))?,
            |r| match r {
                Response::ApiVersions(v) => Some(v),
                _ => None,
            },
        )?;
        for (key, _, _) in protocol::API_VERSIONS {
            let k = *key as u16;
            if !versions.iter().any(|(vk, lo, _)| *vk == k && *lo == 0) {
                return Err(ClientError::Protocol(format!(
                    "broker does not support {key:?} version 0"
                )));
            }
        }
        Ok(())
    }

    /// Whether the connection failed (the reason is in every later error).
    pub fn is_closed(&self) -> bool {
        self.shared.closed.lock().expect("lock").is_some()
    }

    /// Sends a request without waiting for its response.
    pub fn send(&self, req: &Request) -> Result<PendingReply, ClientError> {
        if let Some(why) = self.shared.closed.lock().expect("lock").clone() {
            return Err(ClientError::Disconnected(why));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(1);
        self.shared
            .pending
            .lock()
            .expect("lock")
            .insert(id, (req.api_key(), tx));
        // The batches of a produce go to the socket from the request itself, after
        // the head: one copy less of every byte (the kernel's).
        let mut head = Vec::new();
        let tail = protocol::encode_request_head(id, req, &mut head);
        let mut w = self.writer.lock().expect("lock");
        if let Err(e) = write_all_vectored(&mut *w, &head, tail) {
            drop(w);
            self.shared.fail_all(&e.to_string());
            return Err(ClientError::Disconnected(e.to_string()));
        }
        Ok(PendingReply { rx })
    }

    /// Sends a request and waits for its response.
    pub fn call(&self, req: &Request) -> Result<Response, ClientError> {
        self.send(req)?.wait()
    }

    pub fn create_topic(&self, name: &str, config: TopicConfig) -> Result<(), ClientError> {
        expect(
            self.call(&Request::CreateTopic {
                name: name.to_owned(),
                config,
            })?,
            |r| matches!(r, Response::CreateTopic).then_some(()),
        )
    }

    pub fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        expect(
            self.call(&Request::DeleteTopic {
                name: name.to_owned(),
            })?,
            |r| matches!(r, Response::DeleteTopic).then_some(()),
        )
    }

    pub fn list_topics(&self) -> Result<Vec<TopicInfo>, ClientError> {
        expect(self.call(&Request::ListTopics)?, |r| match r {
            Response::ListTopics(t) => Some(t),
            _ => None,
        })
    }

    pub fn list_offsets(
        &self,
        topic: &str,
        partition: u32,
        spec: OffsetSpec,
    ) -> Result<Offset, ClientError> {
        expect(
            self.call(&Request::ListOffsets {
                topic: topic.to_owned(),
                partition,
                spec,
            })?,
            |r| match r {
                Response::ListOffsets { offset } => Some(offset),
                _ => None,
            },
        )
    }

    /// Fetches batches from `offset`; waits up to `max_wait` for data at the tail.
    pub fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: Offset,
        max_bytes: u32,
        max_wait: Duration,
    ) -> Result<FetchResult, ClientError> {
        let resp = self.call(&Request::Fetch {
            topic: topic.to_owned(),
            partition,
            offset,
            max_bytes,
            max_wait_ms: u32::try_from(max_wait.as_millis()).unwrap_or(u32::MAX),
        })?;
        expect(resp, |r| match r {
            Response::Fetch {
                high_watermark,
                log_start,
                next_offset,
                records,
            } => Some(FetchResult {
                high_watermark,
                log_start,
                next_offset,
                records: records.into_iter().next().unwrap_or_default(),
            }),
            _ => None,
        })
    }

    /// Produces ready-made batches; returns the partition and each batch's base offset.
    pub fn produce(
        &self,
        topic: &str,
        partition: PartitionSelector,
        durability: Durability,
        batches: Bytes,
    ) -> Result<(u32, Vec<Offset>), ClientError> {
        let resp = self.call(&Request::Produce {
            topic: topic.to_owned(),
            partition,
            durability,
            batches,
        })?;
        expect(resp, |r| match r {
            Response::Produce {
                partition,
                base_offsets,
            } => Some((partition, base_offsets)),
            _ => None,
        })
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Ok(w) = self.writer.lock() {
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// Writes `head` then `tail` with as few system calls as the socket allows.
fn write_all_vectored(w: &mut impl Write, head: &[u8], tail: &[u8]) -> std::io::Result<()> {
    let mut bufs = [std::io::IoSlice::new(head), std::io::IoSlice::new(tail)];
    let mut bufs = &mut bufs[..];
    while bufs.iter().any(|b| !b.is_empty()) {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => std::io::IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn expect<T>(resp: Response, f: impl FnOnce(Response) -> Option<T>) -> Result<T, ClientError> {
    let dbg = format!("{resp:?}");
    f(resp).ok_or_else(|| {
        ClientError::Protocol(format!(
            "unexpected response {}",
            &dbg[..dbg.len().min(200)]
        ))
    })
}

/// Bytes of responses read from the socket at a time: small responses (produce
/// acknowledgements) arrive many per read instead of two reads each.
const READ_BUFFER_BYTES: usize = 64 * 1024;

fn read_loop(s: TcpStream, shared: &Shared) {
    let mut s = std::io::BufReader::with_capacity(READ_BUFFER_BYTES, s);
    let why = loop {
        let mut prefix = [0u8; 4];
        if let Err(e) = s.read_exact(&mut prefix) {
            break e.to_string();
        }
        let len = u32::from_le_bytes(prefix) as usize;
        if len > RESPONSE_FRAME_BYTES_MAX {
            break format!("response frame of {len} bytes over the limit");
        }
        // Read into unused capacity: zero-filling a large fetch response first
        // cost the reader thread 4% of its time in scenario e.
        let mut body = Vec::with_capacity(len);
        match (&mut s).take(len as u64).read_to_end(&mut body) {
            Ok(n) if n == len => {}
            Ok(n) => break format!("connection closed {n} bytes into a {len}-byte response"),
            Err(e) => break e.to_string(),
        }
        let body = Bytes::from(body);
        let Some(id) = body
            .get(..4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4")))
        else {
            break "response shorter than its header".into();
        };
        let entry = shared.pending.lock().expect("lock").remove(&id);
        let Some((key, tx)) = entry else {
            // Correlation 0 is how the broker reports an unframeable request.
            if id == 0 {
                break match protocol::decode_response(ApiKey::ApiVersions, &body) {
                    Ok((_, Err((code, msg)))) => {
                        format!("broker closed the connection: {code:?}: {msg}")
                    }
                    _ => "broker closed the connection".into(),
                };
            }
            continue;
        };
        let reply = match protocol::decode_response(key, &body) {
            Ok((_, Ok(r))) => Ok(r),
            Ok((_, Err((code, message)))) => Err(ClientError::Broker { code, message }),
            Err(e) => Err(ClientError::Protocol(e)),
        };
        let _ = tx.send(reply);
    };
    shared.fail_all(&why);
}

/// What a fetch returned: whole batches, zero-copy from the response frame.
#[derive(Debug, Clone, Default)]
pub struct FetchResult {
    pub high_watermark: Offset,
    pub log_start: Offset,
    pub next_offset: Offset,
    pub records: Bytes,
}

/// One consumed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedRecord {
    pub partition: u32,
    pub offset: Offset,
    pub timestamp: TimestampMs,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Option<Bytes>)>,
}

impl FetchResult {
    /// Decodes and checks every batch (CRC included); records before `from` (the
    /// start of the first batch) are skipped.
    pub fn records(
        &self,
        partition: u32,
        from: Offset,
    ) -> Result<Vec<ConsumedRecord>, ClientError> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < self.records.len() {
            let b = BatchRef::parse_full(&self.records[pos..])
                .map_err(|e| ClientError::Protocol(format!("bad batch from broker: {e}")))?;
            for r in b.records() {
                let r = r.map_err(|e| ClientError::Protocol(e.to_string()))?;
                if r.offset < from {
                    continue;
                }
                let sl = |s: Option<&[u8]>| s.map(|s| self.records.slice_ref(s));
                out.push(ConsumedRecord {
                    partition,
                    offset: r.offset,
                    timestamp: r.timestamp,
                    key: sl(r.key),
                    value: sl(r.value),
                    headers: r
                        .headers()
                        .filter_map(Result::ok)
                        .map(|h| (h.key.to_owned(), h.value.map(|v| self.records.slice_ref(v))))
                        .collect(),
                });
            }
            pos += b.len();
        }
        Ok(out)
    }
}

/// Reads one partition from an offset, with long polling and reconnects.
#[derive(Debug)]
pub struct Consumer {
    addr: String,
    conn: Option<Connection>,
    topic: String,
    partition: u32,
    offset: Offset,
    pub max_bytes: u32,
}

impl Consumer {
    pub fn new(
        addr: &str,
        topic: &str,
        partition: u32,
        offset: Offset,
    ) -> Result<Consumer, ClientError> {
        Ok(Consumer {
            addr: addr.to_owned(),
            conn: Some(Connection::connect(addr)?),
            topic: topic.to_owned(),
            partition,
            offset,
            max_bytes: 1 << 20,
        })
    }

    pub fn offset(&self) -> Offset {
        self.offset
    }

    pub fn seek(&mut self, offset: Offset) {
        self.offset = offset;
    }

    /// Returns the next records, waiting up to `max_wait` when none are there yet.
    /// Reconnects once on a lost connection.
    pub fn poll(&mut self, max_wait: Duration) -> Result<Vec<ConsumedRecord>, ClientError> {
        for attempt in 0..2 {
            if self.conn.as_ref().is_none_or(Connection::is_closed) {
                self.conn = Some(Connection::connect(self.addr.as_str())?);
            }
            let conn = self.conn.as_ref().expect("connected");
            match conn.fetch(
                &self.topic,
                self.partition,
                self.offset,
                self.max_bytes,
                max_wait,
            ) {
                Ok(f) => {
                    let recs = f.records(self.partition, self.offset)?;
                    self.offset = self.offset.max(f.next_offset);
                    return Ok(recs);
                }
                Err(e) if e.is_retriable() && attempt == 0 => self.conn = None,
                Err(e) => return Err(e),
            }
        }
        unreachable!("loop returns")
    }
}

/// Producer settings.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    pub durability: Durability,
    /// Send a partition's batch once it holds this many bytes (a batch never
    /// grows past it, unless one record alone does) ...
    pub batch_bytes: usize,
    /// ... or once its first record has waited this long.
    pub linger: Duration,
    /// Requests in flight per producer.
    pub in_flight: usize,
    /// Retries of a request that failed on the connection (not on a broker error).
    pub retries: u32,
    /// [`Producer::send`] blocks while this many bytes of records wait in the
    /// producer to be sent (back-pressure when the broker or the network is slower
    /// than the application), and sends that came after a waiting one wait behind
    /// it (first come, first served).
    pub buffer_bytes: usize,
    /// How long a request may wait for its answer. Past it the connection counts
    /// as failed: the request and every one after it go again on a new one (one
    /// of `retries` each). A request out of retries fails with the last error:
    /// `Timeout`, or `Connect` when a new connection could not be made either.
    pub request_timeout: Duration,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            durability: Durability::Fsync,
            batch_bytes: 1 << 20,
            linger: Duration::from_millis(5),
            in_flight: 8,
            retries: 3,
            buffer_bytes: 32 << 20,
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// The outcome of one produced record.
#[derive(Debug)]
pub struct RecordReceipt {
    rx: mpsc::Receiver<Result<(u32, Offset), ClientError>>,
    got: Option<Result<(u32, Offset), ClientError>>,
}

impl RecordReceipt {
    /// Blocks until the broker acknowledged (or refused) the record; returns its
    /// partition and offset.
    pub fn wait(self) -> Result<(u32, Offset), ClientError> {
        match self.got {
            Some(r) => r,
            None => self
                .rx
                .recv()
                .unwrap_or_else(|_| Err(ClientError::Disconnected("producer closed".into()))),
        }
    }

    /// The answer if it has arrived, without blocking.
    pub fn try_wait(&mut self) -> Option<&Result<(u32, Offset), ClientError>> {
        if self.got.is_none() {
            self.got = match self.rx.try_recv() {
                Ok(r) => Some(r),
                Err(mpsc::TryRecvError::Empty) => None,
                Err(mpsc::TryRecvError::Disconnected) => {
                    Some(Err(ClientError::Disconnected("producer closed".into())))
                }
            };
        }
        self.got.as_ref()
    }
}

struct Open {
    builder: BatchBuilder,
    receipts: Vec<mpsc::SyncSender<Result<(u32, Offset), ClientError>>>,
    since: Instant,
    /// What its records added to `ProducerState::queued`.
    queued: usize,
    /// Its place in the order batches were opened (`ProducerState::outstanding`).
    seq: u64,
}

struct ProducerState {
    /// The batch each partition is filling.
    open: HashMap<(String, u32), Open>,
    /// Full batches, in the order they filled, to go before any open one.
    sealed: VecDeque<((String, u32), Open)>,
    /// Encoded bytes in `open` and `sealed`.
    queued: usize,
    /// Every batch whose receipts are not answered yet (open, sealed, or taken by
    /// the sender), by `Open::seq`: `flush` waits for those opened before it only,
    /// so other threads that keep sending cannot hold it up for good.
    outstanding: BTreeSet<u64>,
    next_seq: u64,
    /// Sends waiting for room in the buffer, by ticket, in the order they came.
    waiting: VecDeque<u64>,
    next_ticket: u64,
    closing: bool,
    /// The sender thread has ended (after `closing`, or by a panic): nothing queued
    /// will be sent any more.
    sender_gone: bool,
    /// Tests: the sender thread panics, holding this state, once a batch is open.
    #[cfg(test)]
    inject_sender_panic: bool,
}

type SharedState = (Mutex<ProducerState>, Condvar);

/// The producer's state, also when a thread panicked while holding it. The sender
/// thread's panic is handled: [`SenderExit`] leaves the state consistent and marked
/// `sender_gone`, which every caller looks at first. The producer's own methods do
/// not panic while they hold it.
fn lock_state(lock: &Mutex<ProducerState>) -> MutexGuard<'_, ProducerState> {
    lock.lock().unwrap_or_else(PoisonError::into_inner)
}

/// [`Condvar::wait_timeout`] on the producer's state, poisoned or not.
fn wait_state<'a>(
    cv: &Condvar,
    st: MutexGuard<'a, ProducerState>,
    timeout: Duration,
) -> MutexGuard<'a, ProducerState> {
    cv.wait_timeout(st, timeout)
        .unwrap_or_else(PoisonError::into_inner)
        .0
}

/// Owned by the sender thread: when it ends, however it ends (a panic included),
/// the batches it will never send fail their receipts and every `send` and `flush`
/// waiting on it is released with an error instead of blocking for good.
struct SenderExit<'a>(&'a SharedState);

impl Drop for SenderExit<'_> {
    fn drop(&mut self) {
        let (lock, cv) = self.0;
        let mut guard = lock_state(lock);
        let st = &mut *guard;
        st.sender_gone = true;
        let why = ClientError::Disconnected("the producer's sender thread stopped".into());
        let left: Vec<Open> = st
            .sealed
            .drain(..)
            .map(|(_, o)| o)
            .chain(st.open.drain().map(|(_, o)| o))
            .collect();
        for r in left.into_iter().flat_map(|o| o.receipts) {
            let _ = r.send(Err(why.clone()));
        }
        // Requests it had in flight dropped their receipts as it unwound.
        st.outstanding.clear();
        st.queued = 0;
        cv.notify_all();
    }
}

impl ProducerState {
    /// Makes every open batch due at once, whatever its linger.
    fn send_open_now(&mut self) {
        let due = Instant::now() - Duration::from_secs(3600);
        self.open.values_mut().for_each(|o| o.since = due);
    }
}

/// Batches records per partition by size and linger time and keeps several
/// requests in flight. Records are routed by explicit partition or by key (Kafka's
/// murmur2), so keyed records keep their partition.
pub struct Producer {
    state: Arc<SharedState>,
    partitions: Mutex<HashMap<String, u32>>,
    addr: String,
    batch_bytes: usize,
    buffer_bytes: usize,
    sender: Option<thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Producer({})", self.addr)
    }
}

impl Producer {
    pub fn new(addr: &str, config: ProducerConfig) -> Result<Producer, ClientError> {
        let conn = Connection::connect(addr)?;
        let state = Arc::new((
            Mutex::new(ProducerState {
                open: HashMap::new(),
                sealed: VecDeque::new(),
                queued: 0,
                outstanding: BTreeSet::new(),
                next_seq: 0,
                waiting: VecDeque::new(),
                next_ticket: 0,
                closing: false,
                sender_gone: false,
                #[cfg(test)]
                inject_sender_panic: false,
            }),
            Condvar::new(),
        ));
        let st = state.clone();
        let a = addr.to_owned();
        let (batch_bytes, buffer_bytes) = (config.batch_bytes, config.buffer_bytes);
        let sender = thread::Builder::new()
            .name("ringbus-producer".into())
            .spawn(move || send_loop(&a, conn, &st, &config))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(Producer {
            state,
            partitions: Mutex::new(HashMap::new()),
            addr: addr.to_owned(),
            batch_bytes,
            buffer_bytes,
            sender: Some(sender),
        })
    }

    fn partition_count(&self, topic: &str) -> Result<u32, ClientError> {
        if let Some(n) = self.partitions.lock().expect("lock").get(topic) {
            return Ok(*n);
        }
        let conn = Connection::connect(self.addr.as_str())?;
        let topics = conn.list_topics()?;
        let t = topics
            .iter()
            .find(|t| t.name == topic)
            .ok_or_else(|| ClientError::Broker {
                code: ErrorCode::UnknownTopic,
                message: format!("unknown topic {topic}"),
            })?;
        self.partitions
            .lock()
            .expect("lock")
            .insert(topic.to_owned(), t.config.partitions);
        Ok(t.config.partitions)
    }

    /// Queues one record. `partition` wins over `key`; with neither, records go to
    /// partition 0. Blocks while `buffer_bytes` of records wait to be sent (and
    /// sends the open batches meanwhile, whatever their linger); while sends wait,
    /// later ones queue behind them, first come first served, even where they would
    /// fit. Fails with `Disconnected` once the sender thread has stopped.
    pub fn send(
        &self,
        topic: &str,
        partition: Option<u32>,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&str, Option<&[u8]>)],
    ) -> Result<RecordReceipt, ClientError> {
        let p = match (partition, key) {
            (Some(p), _) => p,
            (None, Some(k)) => protocol::partition_for_key(k, self.partition_count(topic)?),
            (None, None) => 0,
        };
        let (tx, rx) = mpsc::sync_channel(1);
        // An upper bound of the record's encoded size (varints at their widest).
        let size = 32
            + key.map_or(0, <[u8]>::len)
            + value.len()
            + headers
                .iter()
                .map(|(k, v)| 20 + k.len() + v.map_or(0, <[u8]>::len))
                .sum::<usize>();
        let (lock, cv) = &*self.state;
        let mut st = lock_state(lock);
        let full = |st: &ProducerState| st.queued > 0 && st.queued + size > self.buffer_bytes;
        if !st.closing && !st.sender_gone && (full(&st) || !st.waiting.is_empty()) {
            // The buffer is full, or others wait for it already: records get in
            // first come, first served, so a large record is not kept out for
            // good by smaller ones that fit whenever a little room comes back.
            let ticket = st.next_ticket;
            st.next_ticket += 1;
            st.waiting.push_back(ticket);
            let mut hurried = false;
            while !st.closing
                && !st.sender_gone
                && (st.waiting.front() != Some(&ticket) || full(&st))
            {
                // At the head of the queue, once: open batches go now instead of
                // after their linger, which could be longer than the sender needs
                // to make room. (Only the head, and only once, or waiters would
                // wake each other for as long as the buffer stays full; no batch
                // opens while it waits, since every later send queues behind it.)
                if !hurried && st.waiting.front() == Some(&ticket) {
                    hurried = true;
                    st.send_open_now();
                    cv.notify_all();
                }
                st = wait_state(cv, st, Duration::from_millis(50));
            }
            st.waiting.retain(|&t| t != ticket);
            cv.notify_all();
        }
        if st.sender_gone {
            return Err(ClientError::Disconnected(
                "the producer's sender thread stopped".into(),
            ));
        }
        if st.closing {
            return Err(ClientError::Disconnected("producer closed".into()));
        }
        let at = (topic.to_owned(), p);
        let full = st.open.get(&at).is_some_and(|o| {
            !o.builder.is_empty()
                && (o.builder.encoded_len() + size > self.batch_bytes
                    || o.builder.record_count() >= limits::BATCH_RECORDS_MAX)
        });
        if full {
            let o = st.open.remove(&at).expect("checked");
            st.sealed.push_back((at.clone(), o));
        }
        if !st.open.contains_key(&at) {
            let seq = st.next_seq;
            st.next_seq += 1;
            st.outstanding.insert(seq);
            let o = Open {
                builder: BatchBuilder::default(),
                receipts: Vec::new(),
                since: Instant::now(),
                queued: 0,
                seq,
            };
            st.open.insert(at.clone(), o);
        }
        let open = st.open.get_mut(&at).expect("just ensured");
        let before = open.builder.encoded_len();
        open.builder.push(RecordInput {
            timestamp: TimestampMs::now(),
            key,
            value: Some(value),
            headers,
        });
        let grown = open.builder.encoded_len() - before;
        open.receipts.push(tx);
        open.queued += grown;
        st.queued += grown;
        cv.notify_all();
        Ok(RecordReceipt { rx, got: None })
    }

    /// Sends everything queued and waits until the broker answered all of it:
    /// when it returns, every receipt of a record sent before it holds its answer.
    /// Records other threads send meanwhile do not hold it up.
    /// If the sender thread has stopped (it panicked), returns at once: every
    /// receipt it left holds an error.
    pub fn flush(&self) {
        let (lock, cv) = &*self.state;
        let mut st = lock_state(lock);
        let before = st.next_seq;
        st.send_open_now();
        cv.notify_all();
        while !st.sender_gone && st.outstanding.first().is_some_and(|&s| s < before) {
            st = wait_state(cv, st, Duration::from_millis(5));
        }
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.flush();
        {
            let (lock, cv) = &*self.state;
            lock_state(lock).closing = true;
            cv.notify_all();
        }
        if let Some(s) = self.sender.take() {
            let _ = s.join();
        }
    }
}

/// A produce request the sender owes an answer to: its records' receipts, and the
/// sends it has left.
struct Outgoing {
    receipts: Vec<mpsc::SyncSender<Result<(u32, Offset), ClientError>>>,
    req: Request,
    retries: u32,
    seq: u64,
}

type InFlight = (PendingReply, Outgoing);

fn send_loop(addr: &str, conn: Connection, state: &SharedState, config: &ProducerConfig) {
    let _exit = SenderExit(state);
    let (lock, cv) = state;
    let mut conn = Some(conn);
    let mut inflight: VecDeque<InFlight> = VecDeque::new();
    loop {
        // Take every batch that is due.
        let mut due = Vec::new();
        {
            let mut st = lock_state(lock);
            loop {
                #[cfg(test)]
                if st.inject_sender_panic && !st.open.is_empty() {
                    panic!("injected: the sender thread panics holding the producer's state");
                }
                let now = Instant::now();
                let ready: Vec<_> = st
                    .open
                    .iter()
                    .filter(|(_, o)| {
                        o.builder.encoded_len() >= config.batch_bytes
                            || now >= o.since + config.linger
                    })
                    .map(|(k, _)| k.clone())
                    .collect();
                // Full batches first: each went before its partition's open one.
                let sealed: Vec<_> = st.sealed.drain(..).collect();
                due.extend(sealed);
                for k in ready {
                    if let Some(o) = st.open.remove(&k) {
                        due.push((k, o));
                    }
                }
                // Their bytes stay counted in `queued` until they are sent, so
                // batches waiting for a free slot in flight count against
                // `buffer_bytes` too.
                if !due.is_empty() || !inflight.is_empty() || (st.closing && st.open.is_empty()) {
                    break;
                }
                let wait = st
                    .open
                    .values()
                    .map(|o| (o.since + config.linger).saturating_duration_since(now))
                    .min()
                    .unwrap_or(Duration::from_millis(50));
                st = wait_state(cv, st, wait.max(Duration::from_micros(100)));
            }
            if due.is_empty() && inflight.is_empty() && st.closing {
                return;
            }
            cv.notify_all();
        }
        for ((topic, p), o) in due {
            let req = Request::Produce {
                topic,
                partition: PartitionSelector::Partition(p),
                durability: config.durability,
                batches: Bytes::from(o.builder.finish()),
            };
            while inflight.len() >= config.in_flight {
                finish_one(addr, &mut conn, &mut inflight, state, config);
            }
            let out = Outgoing {
                receipts: o.receipts,
                req,
                retries: config.retries,
                seq: o.seq,
            };
            let sent = match conn.as_ref().filter(|c| !c.is_closed()) {
                Some(c) => c.send(&out.req).ok(),
                None => None,
            };
            match sent {
                Some(pending) => inflight.push_back((pending, out)),
                // The connection is gone: whatever is in flight on it goes again
                // first, then this one.
                None => {
                    let mut todo = take_all(&mut inflight);
                    todo.push_back(out);
                    let lost = ClientError::Disconnected("connection lost".into());
                    resend(addr, &mut conn, &mut inflight, todo, lost, state);
                }
            }
            let (lock, cv) = state;
            lock_state(lock).queued -= o.queued;
            cv.notify_all();
        }
        if !inflight.is_empty() {
            finish_one(addr, &mut conn, &mut inflight, state, config);
        }
    }
}

/// The requests in flight, oldest first, without their pending answers.
fn take_all(inflight: &mut VecDeque<InFlight>) -> VecDeque<Outgoing> {
    inflight.drain(..).map(|(_, o)| o).collect()
}

/// Sends `todo` (every request that was in flight, and any new one after them)
/// again, on a new connection and in its order (`why`: what failed). A request
/// whose connection failed may or may not have been appended (at-least-once), but
/// no batch overtakes an older one of its partition: requests still in flight on
/// the failed connection are not left to be retried after newer ones. Each attempt
/// spends one of a request's retries; a request with none left fails its receipts
/// with the last error.
fn resend(
    addr: &str,
    conn: &mut Option<Connection>,
    inflight: &mut VecDeque<InFlight>,
    mut todo: VecDeque<Outgoing>,
    why: ClientError,
    state: &SharedState,
) {
    debug_assert!(inflight.is_empty(), "take_all first");
    let mut attempt = 0u32;
    let mut last = why;
    while !todo.is_empty() {
        *conn = None;
        // Requests out of retries fail; the others spend one on this attempt.
        for o in std::mem::take(&mut todo) {
            if o.retries == 0 {
                fail(o, &last, state);
            } else {
                todo.push_back(Outgoing {
                    retries: o.retries - 1,
                    ..o
                });
            }
        }
        if todo.is_empty() {
            break;
        }
        if attempt > 0 {
            thread::sleep(Duration::from_millis(50 << attempt.min(5)));
        }
        attempt += 1;
        let c = match Connection::connect(addr) {
            Ok(c) => c,
            Err(e) => {
                last = e;
                continue;
            }
        };
        while let Some(o) = todo.pop_front() {
            match c.send(&o.req) {
                Ok(p) => inflight.push_back((p, o)),
                Err(e) => {
                    // This connection failed too: everything sent on it goes again.
                    last = e;
                    todo.push_front(o);
                    let mut sent = take_all(inflight);
                    sent.append(&mut todo);
                    todo = sent;
                    break;
                }
            }
        }
        if todo.is_empty() {
            *conn = Some(c);
        }
    }
}

fn fail(o: Outgoing, e: &ClientError, state: &SharedState) {
    for r in o.receipts {
        let _ = r.send(Err(e.clone()));
    }
    answered(state, o.seq);
}

/// Batch `seq`'s receipts now hold their answers: `flush` may be waiting.
fn answered(state: &SharedState, seq: u64) {
    let (lock, cv) = state;
    lock_state(lock).outstanding.remove(&seq);
    cv.notify_all();
}

/// Waits for the oldest request in flight and answers its receipts, or sends it
/// again when it failed in a way a retry may fix.
fn finish_one(
    addr: &str,
    conn: &mut Option<Connection>,
    inflight: &mut VecDeque<InFlight>,
    state: &SharedState,
    config: &ProducerConfig,
) {
    let Some((pending, out)) = inflight.pop_front() else {
        return;
    };
    let result = match pending.wait_timeout(config.request_timeout) {
        Ok(Response::Produce {
            partition,
            base_offsets,
        }) => Ok((partition, base_offsets.first().copied().unwrap_or_default())),
        Ok(other) => Err(ClientError::Protocol(format!(
            "unexpected response {other:?}"
        ))),
        Err(e) if e.is_retriable() && out.retries > 0 => {
            // The connection failed (or the answer is late): this request and every
            // one after it go again, in order.
            let mut todo = take_all(inflight);
            todo.push_front(out);
            resend(addr, conn, inflight, todo, e, state);
            return;
        }
        Err(e) => Err(e),
    };
    for (i, r) in out.receipts.into_iter().enumerate() {
        let _ = r.send(result.clone().map(|(p, base)| (p, base.plus(i as u64))));
    }
    answered(state, out.seq);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicked_sender_fails_receipts_and_callers_instead_of_blocking() {
        let addr = handshake_only_broker();
        let (tx, rx) = mpsc::channel();
        let worker = thread::spawn(move || {
            let p = Producer::new(
                &addr,
                ProducerConfig {
                    linger: Duration::from_millis(1),
                    ..ProducerConfig::default()
                },
            )
            .unwrap();
            lock_state(&p.state.0).inject_sender_panic = true;
            let first = p.send("t", Some(0), None, b"one", &[]).unwrap();
            tx.send(("first receipt", first.wait().is_err())).unwrap();
            // The state's lock is poisoned now: callers still get answers.
            p.flush();
            tx.send(("flush returned", true)).unwrap();
            let again = p.send("t", Some(0), None, b"two", &[]);
            tx.send(("later send refused", again.is_err())).unwrap();
            drop(p);
            tx.send(("dropped", true)).unwrap();
        });
        for want in [
            "first receipt",
            "flush returned",
            "later send refused",
            "dropped",
        ] {
            let (what, ok) = rx
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("blocked before: {want}"));
            assert_eq!(what, want);
            assert!(ok, "{what}");
        }
        worker.join().unwrap();
    }

    #[test]
    fn a_large_record_waiting_for_room_is_not_overtaken_by_small_ones() {
        let addr = handshake_only_broker();
        // One request in flight, never answered until it times out: the buffer
        // drains one 12 KB batch every 1.5 s.
        let p = Arc::new(
            Producer::new(
                &addr,
                ProducerConfig {
                    batch_bytes: 13_000,
                    buffer_bytes: 40_000,
                    in_flight: 1,
                    retries: 0,
                    linger: Duration::from_millis(1),
                    request_timeout: Duration::from_millis(1_500),
                    ..ProducerConfig::default()
                },
            )
            .unwrap(),
        );
        let receipts: Vec<_> = (0..3)
            .map(|_| p.send("t", Some(0), None, &[1; 12_000], &[]).unwrap())
            .collect();
        let (tx, rx) = mpsc::channel();
        let spawn_send = |name: &'static str, len: usize| {
            let (p, tx) = (p.clone(), tx.clone());
            thread::spawn(move || {
                let r = p.send("t", Some(0), None, &vec![2; len], &[]);
                tx.send((name, r.is_ok())).unwrap();
            })
        };
        // 20 KB does not fit beside the 24-36 KB queued; 1 KB would.
        let large = spawn_send("large", 20_000);
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock_state(&p.state.0).waiting.is_empty() {
            assert!(Instant::now() < deadline, "the large record never waited");
            thread::sleep(Duration::from_millis(1));
        }
        let small = spawn_send("small", 1_000);
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "a send got in while the large record waited for room"
        );
        // Once a batch times out, room comes back: both get in.
        let mut got = Vec::new();
        for _ in 0..2 {
            got.push(
                rx.recv_timeout(Duration::from_secs(10))
                    .expect("send returned"),
            );
        }
        got.sort();
        assert_eq!(got, vec![("large", true), ("small", true)]);
        large.join().unwrap();
        small.join().unwrap();
        for r in receipts {
            assert!(r.wait().is_err(), "the broker never answers");
        }
    }

    /// A broker on an ephemeral loopback port that answers the handshake and
    /// nothing else: a produce waits for good.
    fn handshake_only_broker() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                thread::spawn(move || answer_handshakes_only(&mut stream));
            }
        });
        addr
    }

    /// Reads request frames from `stream` until it closes, answering ApiVersions.
    fn answer_handshakes_only(stream: &mut TcpStream) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            while let Ok(Some(len)) = protocol::frame_len(&buf, 1 << 24) {
                let end = protocol::LENGTH_PREFIX_LEN + len;
                let frame = Bytes::copy_from_slice(&buf[protocol::LENGTH_PREFIX_LEN..end]);
                buf.drain(..end);
                if let Ok((head, Request::ApiVersions)) = protocol::decode_request(&frame) {
                    let versions = protocol::API_VERSIONS
                        .iter()
                        .map(|(k, lo, hi)| (*k as u16, *lo, *hi))
                        .collect();
                    let mut out = Vec::new();
                    let resp = Response::ApiVersions(versions);
                    protocol::encode_response(head.correlation_id, &resp, &mut out);
                    if stream.write_all(&out).is_err() {
                        return;
                    }
                }
            }
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// A writer that takes at most 3 bytes per call, and is interrupted once.
    struct Trickle {
        got: Vec<u8>,
        calls: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.calls += 1;
            if self.calls == 2 {
                return Err(std::io::ErrorKind::Interrupted.into());
            }
            let n = buf.len().min(3);
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn vectored_writes_survive_partial_writes() {
        let mut w = Trickle {
            got: Vec::new(),
            calls: 0,
        };
        write_all_vectored(&mut w, b"head-", b"and the tail").unwrap();
        assert_eq!(w.got, b"head-and the tail");
        let mut w = Trickle {
            got: Vec::new(),
            calls: 0,
        };
        write_all_vectored(&mut w, b"only", b"").unwrap();
        assert_eq!(w.got, b"only");
    }
}
