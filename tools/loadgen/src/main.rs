//! `ringbus-loadgen`: drives a ringbus broker with producers and consumers the way
//! users compare brokers, and reports throughput and latency percentiles.
//!
//! It owns the run: the options, the broker it targets (`--addr`, or `--embedded`
//! in-process in a temporary directory), the producer threads (as fast as possible,
//! or open loop at `--rate` with latency measured from each message's intended send
//! time, so coordinated omission does not hide stalls), the consumers that verify
//! every message (see [`message`]), the progress line and the report (see [`report`]).
//!
//! Each producer has its own connection and keeps up to `--in-flight` produce
//! requests outstanding; a collector thread per producer takes the acknowledgements
//! in order and records their latency the moment they arrive.

mod message;
mod report;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use ringbus::batch::{BatchBuilder, RecordInput};
use ringbus::client::{ClientError, Connection, PendingReply};
use ringbus::protocol::{ErrorCode, OffsetSpec, PartitionSelector, Request, Response, TopicConfig};
use ringbus::server::{Broker, ServerConfig};
use ringbus::storage::Durability;
use ringbus::types::TimestampMs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "ringbus-loadgen",
    version,
    about = "Load generator for ringbus: throughput, latency percentiles, and a check of every message"
)]
struct Args {
    /// A running broker (HOST:PORT).
    #[arg(
        long,
        conflicts_with = "embedded",
        required_unless_present = "embedded"
    )]
    addr: Option<String>,
    /// Start a broker in-process, with its data in a temporary directory.
    #[arg(long)]
    embedded: bool,
    /// Shards of the embedded broker (0 = one per core).
    #[arg(long, default_value_t = 0)]
    broker_cores: usize,
    /// Retention by size of the topic it creates, per partition (default: the
    /// broker's). With a limit the run reaches the steady state of a long-running
    /// broker, where expired segments' files are reused for new ones.
    #[arg(long)]
    retention_bytes: Option<u64>,
    /// With --embedded: the broker's tail cache in bytes (default: the broker's own).
    #[arg(long)]
    broker_tail_cache_bytes: Option<u64>,
    /// Where the embedded broker keeps its data (default: a temporary directory
    /// under $TMPDIR, removed afterwards).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Topic to use; created when missing (default: a new `loadgen-…` topic,
    /// deleted afterwards).
    #[arg(long)]
    topic: Option<String>,
    /// Keep the topic after the run.
    #[arg(long)]
    keep_topic: bool,
    #[arg(long, default_value_t = 1)]
    producers: usize,
    /// Consumer threads; partitions are shared out among them (0 = none).
    #[arg(long, default_value_t = 1)]
    consumers: usize,
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// Bytes per message value (at least 24: the verification header).
    #[arg(long, default_value_t = 1024)]
    message_size: usize,
    /// Records per batch (one produce request carries one batch).
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// At a fixed rate: send a batch that is not full once its first message has
    /// waited this long.
    #[arg(long, default_value_t = 1000)]
    linger_us: u64,
    /// Produce requests in flight per producer. 16 keeps a producer of 1 MB
    /// requests from being bound by its own window: with 8, it waited on the
    /// disk's write latency at depth (docs/PERFORMANCE.md, "Producer window").
    #[arg(long, default_value_t = 16)]
    in_flight: usize,
    /// fsync: acknowledged once on disk; memory: once written (survives a process crash).
    #[arg(long, default_value = "fsync")]
    durability: Durability,
    /// How long to produce after the warm-up (e.g. 10s).
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "messages")]
    duration: Option<Duration>,
    /// Messages to produce in all, warm-up included.
    #[arg(long)]
    messages: Option<u64>,
    /// Run this long before measuring (e.g. 2s).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    warmup: Duration,
    /// Messages per second across all producers (open loop); absent = as fast as possible.
    #[arg(long)]
    rate: Option<f64>,
    /// Consumers start only after the producers finished and read everything from
    /// the start (a consumer catching up on a backlog).
    #[arg(long)]
    catch_up: bool,
    /// With --catch-up and --embedded: restart the broker and drop the topic's
    /// segment files from the page cache before the consumers start, so the backlog
    /// is read from the disk (a consumer catching up after a restart).
    #[arg(long, requires = "catch_up", requires = "embedded")]
    cold: bool,
    /// max_bytes of each fetch.
    #[arg(long, default_value_t = 8 << 20)]
    fetch_bytes: u32,
    /// Write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write every acknowledged batch to this file as CSV (`ack_ms,ack_unix_ms,
    /// oldest_us,records`: when its acknowledgement came, in ms since the load
    /// generator started and since the Unix epoch; the acknowledgement latency of its
    /// oldest message; its records), warm-up included, to see when slow
    /// acknowledgements happen and line them up with what the machine did meanwhile.
    #[arg(long)]
    timeline: Option<PathBuf>,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

static START: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the loadgen started: the clock of every timestamp it writes.
fn now_ns() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn sleep_until_ns(t: u64) {
    let now = now_ns();
    if t > now {
        thread::sleep(Duration::from_nanos(t - now));
    }
}

/// What the threads share. Counters are atomics; the rest is written rarely.
struct Run {
    args: Args,
    /// The broker's address (it changes when --cold restarts the embedded broker).
    addr: Mutex<String>,
    topic: String,
    warmup_end_ns: u64,
    produce_end_ns: Option<u64>,
    stop: AtomicBool,
    failure: Mutex<Option<String>>,
    /// Acknowledged messages, all / after the warm-up.
    acked: AtomicU64,
    acked_window: AtomicU64,
    last_ack_ns: AtomicU64,
    consumed: AtomicU64,
    consumed_window: AtomicU64,
    last_consume_ns: AtomicU64,
    consume_start_ns: AtomicU64,
    /// Per partition: the offset after the last acknowledged record.
    ends: Mutex<Vec<u64>>,
    producers_done: AtomicBool,
    /// With --timeline: (ack time, oldest message's latency, records) per batch.
    timeline: Option<Mutex<Vec<(u64, u64, u32)>>>,
}

impl Run {
    fn fail(&self, why: String) {
        let mut f = self.failure.lock().expect("lock");
        if f.is_none() {
            *f = Some(why);
        }
        self.stop.store(true, Ordering::SeqCst);
    }

    fn failed(&self) -> bool {
        self.failure.lock().expect("lock").is_some()
    }
}

/// A producer or consumer thread: its latency histogram, or why it failed.
type Worker = thread::JoinHandle<Result<Histogram<u64>, String>>;

struct InFlight {
    pending: PendingReply,
    partition: u32,
    send_ns: Vec<u64>,
}

fn main() {
    let args = Args::parse();
    START.get_or_init(Instant::now);
    match run(args) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("ringbus-loadgen: {e:#}");
            std::process::exit(2);
        }
    }
}

/// Starts the in-process broker on `dir` and waits until its tail cache's memory is
/// reserved, so that runs measure the broker and not its start-up (it touches that
/// memory in the background).
fn start_embedded(args: &Args, dir: &std::path::Path) -> anyhow::Result<Broker> {
    let b = Broker::start(ServerConfig {
        listen: "127.0.0.1:0".parse().expect("address"),
        data_dir: dir.to_path_buf(),
        cores: args.broker_cores,
        tail_cache_bytes: args.broker_tail_cache_bytes,
        ..ServerConfig::default()
    })
    .context("start the embedded broker")?;
    let waited = Instant::now();
    while !b.cache_is_warm() && waited.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !args.quiet {
        eprintln!(
            "embedded broker ready after {:.1} s (tail cache memory reserved)",
            waited.elapsed().as_secs_f64()
        );
    }
    Ok(b)
}

fn run(args: Args) -> anyhow::Result<bool> {
    if args.message_size < message::HEADER_BYTES {
        bail!(
            "--message-size must be at least {} bytes",
            message::HEADER_BYTES
        );
    }
    if args.producers == 0 || args.batch_size == 0 || args.in_flight == 0 || args.partitions == 0 {
        bail!("--producers, --batch-size, --in-flight and --partitions must be at least 1");
    }
    if args.rate.is_some_and(|r| r.is_nan() || r <= 0.0) {
        bail!("--rate must be positive");
    }
    let mut temp = None;
    let mut broker = None;
    let mut data_dir = None;
    let addr = match &args.addr {
        Some(a) => a.clone(),
        None => {
            let dir = match &args.data_dir {
                Some(d) => d.clone(),
                None => {
                    let t = tempfile::Builder::new()
                        .prefix("ringbus-loadgen-")
                        .tempdir()?;
                    let p = t.path().to_path_buf();
                    temp = Some(t);
                    p
                }
            };
            let b = start_embedded(&args, &dir)?;
            data_dir = Some(dir);
            let a = b.addr().to_string();
            broker = Some(b);
            a
        }
    };
    let mut admin = Connection::connect(addr.as_str())?;
    let (topic, created) = open_topic(&admin, &args)?;
    let mut starts = Vec::new();
    for p in 0..args.partitions {
        starts.push(admin.list_offsets(&topic, p, OffsetSpec::Latest)?.0);
    }
    let warmup_end_ns = now_ns() + args.warmup.as_nanos() as u64;
    // --duration after the warm-up; --messages alone runs until they are sent;
    // neither: 10 s.
    let produce_end_ns = match (args.duration, args.messages) {
        (Some(d), _) => Some(warmup_end_ns + d.as_nanos() as u64),
        (None, Some(_)) => None,
        (None, None) => Some(warmup_end_ns + 10_000_000_000),
    };
    let run = Arc::new(Run {
        args: args.clone(),
        addr: Mutex::new(addr.clone()),
        topic: topic.clone(),
        warmup_end_ns,
        produce_end_ns,
        stop: AtomicBool::new(false),
        failure: Mutex::new(None),
        acked: AtomicU64::new(0),
        acked_window: AtomicU64::new(0),
        last_ack_ns: AtomicU64::new(0),
        consumed: AtomicU64::new(0),
        consumed_window: AtomicU64::new(0),
        last_consume_ns: AtomicU64::new(0),
        consume_start_ns: AtomicU64::new(warmup_end_ns),
        ends: Mutex::new(starts.clone()),
        producers_done: AtomicBool::new(false),
        timeline: args.timeline.as_ref().map(|_| Mutex::new(Vec::new())),
    });
    let progress = spawn_progress(run.clone());

    let mut consumers = Vec::new();
    if !args.catch_up {
        consumers = spawn_consumers(&run, &starts)?;
    }
    let mut producers = Vec::new();
    for id in 0..args.producers {
        let parts = producer_partitions(id, args.producers, args.partitions);
        let quota = args.messages.map(|m| {
            let n = args.producers as u64;
            m / n + u64::from((id as u64) < m % n)
        });
        let r = run.clone();
        producers.push(
            thread::Builder::new()
                .name(format!("producer-{id}"))
                .spawn(move || produce(&r, id as u32, &parts, quota))?,
        );
    }
    let ack_hist = join_all(&run, producers, "producer");
    run.producers_done.store(true, Ordering::SeqCst);
    if args.cold && !run.failed() {
        // Restart on the same data with nothing cached: the backlog is on disk only.
        let dir = data_dir.as_ref().expect("--cold requires --embedded");
        drop(admin);
        if let Some(b) = broker.take() {
            b.shutdown().context("stop the embedded broker")?;
        }
        let topic_dir = dir.join("topics").join(&topic);
        for part in std::fs::read_dir(&topic_dir)? {
            for f in std::fs::read_dir(part?.path())? {
                let f = f?.path();
                if f.extension().is_some_and(|e| e == "log") {
                    ringbus::storage::io::drop_cached_pages(&std::fs::File::open(&f)?)
                        .with_context(|| format!("drop {} from the page cache", f.display()))?;
                }
            }
        }
        let b = start_embedded(&args, dir)?;
        let a = b.addr().to_string();
        admin = Connection::connect(a.as_str())?;
        *run.addr.lock().expect("lock") = a;
        broker = Some(b);
    }
    if args.catch_up && !run.failed() {
        run.consume_start_ns.store(now_ns(), Ordering::SeqCst);
        consumers = spawn_consumers(&run, &starts)?;
    }
    let e2e_hist = join_all(&run, consumers, "consumer");
    run.stop.store(true, Ordering::SeqCst);
    let _ = progress.join();

    // Every acknowledged message must have been consumed, exactly once.
    let acked = run.acked.load(Ordering::SeqCst);
    let in_log: u64 = {
        let ends = run.ends.lock().expect("lock");
        ends.iter().zip(&starts).map(|(e, s)| e - s).sum()
    };
    if !run.failed() && in_log != acked {
        run.fail(format!(
            "the partitions grew by {in_log} records but {acked} were acknowledged (another writer on the topic?)"
        ));
    }
    let consumed = run.consumed.load(Ordering::SeqCst);
    if !run.failed() && args.consumers > 0 && consumed != acked {
        run.fail(format!(
            "{acked} messages acknowledged, {consumed} consumed"
        ));
    }

    let summary = summarize(&run, &ack_hist, &e2e_hist);
    print_summary(&run, &summary, &ack_hist, &e2e_hist);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&summary)? + "\n")
            .with_context(|| format!("write {}", path.display()))?;
    }
    if let (Some(path), Some(tl)) = (&args.timeline, &run.timeline) {
        let mut rows = std::mem::take(&mut *tl.lock().expect("lock"));
        rows.sort_unstable();
        // The wall clock at the load generator's start, to line rows up with samples
        // taken outside it.
        let start_unix_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            .saturating_sub(now_ns());
        let mut out = String::from("ack_ms,ack_unix_ms,oldest_us,records\n");
        for (t, oldest, n) in rows {
            let (ms, unix_ms) = (t as f64 / 1e6, (start_unix_ns + t) as f64 / 1e6);
            out += &format!("{ms:.3},{unix_ms:.3},{},{n}\n", oldest / 1000);
        }
        std::fs::write(path, out).with_context(|| format!("write {}", path.display()))?;
    }
    if created && !args.keep_topic {
        if let Err(e) = admin.delete_topic(&topic) {
            eprintln!("ringbus-loadgen: could not delete topic {topic}: {e}");
        }
    }
    drop(admin);
    if let Some(b) = broker {
        b.shutdown().context("stop the embedded broker")?;
    }
    drop(temp);
    let failure = run.failure.lock().expect("lock").clone();
    match failure {
        Some(f) => {
            eprintln!("ringbus-loadgen: FAILED: {f}");
            Ok(false)
        }
        None => Ok(true),
    }
}

/// Waits for workers and merges their histograms; a failed worker fails the run.
fn join_all(run: &Run, workers: Vec<Worker>, what: &str) -> Histogram<u64> {
    let mut hist = report::histogram();
    for w in workers {
        match w.join() {
            Ok(Ok(h)) => hist.add(&h).expect("same bounds"),
            Ok(Err(e)) => run.fail(e),
            Err(_) => run.fail(format!("a {what} thread panicked")),
        }
    }
    hist
}

/// Creates the topic, or checks that an existing one has enough partitions.
fn open_topic(admin: &Connection, args: &Args) -> anyhow::Result<(String, bool)> {
    let name = args.topic.clone().unwrap_or_else(|| {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        format!("loadgen-{}-{ms}", std::process::id())
    });
    let config = TopicConfig {
        partitions: args.partitions,
        segment_bytes: None,
        retention_bytes: args.retention_bytes,
        retention_ms: None,
    };
    match admin.create_topic(&name, config) {
        Ok(()) => Ok((name, true)),
        Err(ClientError::Broker {
            code: ErrorCode::TopicExists,
            ..
        }) => {
            let topics = admin.list_topics()?;
            let t = topics
                .iter()
                .find(|t| t.name == name)
                .context("topic exists but is not listed")?;
            if t.config.partitions < args.partitions {
                bail!(
                    "topic {name} has {} partitions, --partitions asks for {}",
                    t.config.partitions,
                    args.partitions
                );
            }
            Ok((name, false))
        }
        Err(e) => Err(e.into()),
    }
}

/// The partitions producer `id` writes: one each when there are at least as many
/// producers as partitions, otherwise every `producers`-th partition.
fn producer_partitions(id: usize, producers: usize, partitions: u32) -> Vec<u32> {
    if producers >= partitions as usize {
        vec![(id % partitions as usize) as u32]
    } else {
        (0..partitions)
            .filter(|p| *p as usize % producers == id)
            .collect()
    }
}

fn produce(
    run: &Arc<Run>,
    id: u32,
    parts: &[u32],
    quota: Option<u64>,
) -> Result<Histogram<u64>, String> {
    let args = &run.args;
    let addr = run.addr.lock().expect("lock").clone();
    let conn = Connection::connect(addr.as_str()).map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::sync_channel::<InFlight>(args.in_flight - 1);
    let r = run.clone();
    let collector = thread::Builder::new()
        .name(format!("acks-{id}"))
        .spawn(move || collect_acks(&r, &rx))
        .map_err(|e| e.to_string())?;
    let result = produce_loop(run, id, parts, quota, &conn, &tx);
    drop(tx);
    let hist = collector
        .join()
        .map_err(|_| "an ack collector panicked".to_string())?;
    result?;
    Ok(hist)
}

/// One produce request being filled: the batch and each message's send time.
struct Filling<'a> {
    builder: BatchBuilder,
    send_ns: Vec<u64>,
    value: &'a mut [u8],
    producer: u32,
    partition: u32,
    seq: &'a mut u64,
    timestamp: TimestampMs,
}

impl Filling<'_> {
    fn push(&mut self, send_ns: u64) {
        message::write_header(
            self.value,
            self.producer,
            self.partition,
            *self.seq,
            send_ns,
        );
        *self.seq += 1;
        self.builder.push(RecordInput {
            timestamp: self.timestamp,
            key: None,
            value: Some(self.value),
            headers: &[],
        });
        self.send_ns.push(send_ns);
    }
}

/// Open loop: message `k` of a producer is due at `start_ns + k * interval_ns`.
struct Schedule {
    start_ns: u64,
    interval_ns: f64,
    k: u64,
}

impl Schedule {
    fn due(&self, k: u64) -> u64 {
        self.start_ns + (k as f64 * self.interval_ns) as u64
    }
}

/// Fills `f` with up to `n` messages as they fall due; closes the batch when it is
/// full or its first message has lingered `linger_ns`. Returns false when the run
/// ends before any message was due.
fn fill_on_schedule(run: &Run, f: &mut Filling<'_>, n: usize, sch: &mut Schedule) -> bool {
    let linger_ns = run.args.linger_us * 1000;
    loop {
        let now = now_ns();
        while f.send_ns.len() < n && sch.due(sch.k) <= now {
            f.push(sch.due(sch.k));
            sch.k += 1;
        }
        let missing = (n - f.send_ns.len()) as u64;
        if missing == 0 {
            return true;
        }
        let wake = match f.send_ns.first() {
            Some(&first) if now >= first + linger_ns => return true,
            Some(&first) => sch.due(sch.k + missing - 1).min(first + linger_ns),
            None => sch.due(sch.k),
        };
        if run.stop.load(Ordering::Relaxed) || run.produce_end_ns.is_some_and(|e| wake >= e) {
            return !f.send_ns.is_empty();
        }
        sleep_until_ns(wake);
    }
}

fn produce_loop(
    run: &Run,
    id: u32,
    parts: &[u32],
    quota: Option<u64>,
    conn: &Connection,
    tx: &mpsc::SyncSender<InFlight>,
) -> Result<(), String> {
    let args = &run.args;
    let mut value = message::template(args.message_size);
    let mut seqs = vec![0u64; parts.len()];
    let mut remaining = quota.unwrap_or(u64::MAX);
    let mut schedule = args.rate.map(|r| Schedule {
        start_ns: now_ns(),
        interval_ns: (1e9 * args.producers as f64 / r).max(1.0),
        k: 0,
    });
    let record_bytes = args.message_size + 32;
    for pi in (0..parts.len()).cycle() {
        if remaining == 0
            || run.stop.load(Ordering::Relaxed)
            || run.produce_end_ns.is_some_and(|e| now_ns() >= e)
        {
            break;
        }
        let p = parts[pi];
        let n = (args.batch_size as u64).min(remaining) as usize;
        let mut f = Filling {
            builder: BatchBuilder::with_capacity(n * record_bytes + 128),
            send_ns: Vec::with_capacity(n),
            value: &mut value,
            producer: id,
            partition: p,
            seq: &mut seqs[pi],
            timestamp: TimestampMs::now(),
        };
        match schedule.as_mut() {
            None => {
                let t = now_ns();
                (0..n).for_each(|_| f.push(t));
            }
            Some(sch) => {
                if !fill_on_schedule(run, &mut f, n, sch) {
                    break;
                }
            }
        }
        remaining -= f.send_ns.len() as u64;
        let req = Request::Produce {
            topic: run.topic.clone(),
            partition: PartitionSelector::Partition(p),
            durability: args.durability,
            batches: Bytes::from(f.builder.finish()),
        };
        let pending = conn.send(&req).map_err(|e| format!("producer {id}: {e}"))?;
        let item = InFlight {
            pending,
            partition: p,
            send_ns: f.send_ns,
        };
        if tx.send(item).is_err() {
            break; // the collector failed the run
        }
    }
    Ok(())
}

fn collect_acks(run: &Run, rx: &mpsc::Receiver<InFlight>) -> Histogram<u64> {
    let mut hist = report::histogram();
    for f in rx {
        let reply = f.pending.wait();
        let t = now_ns();
        let n = f.send_ns.len() as u64;
        match reply {
            Ok(Response::Produce {
                partition,
                base_offsets,
            }) if partition == f.partition && base_offsets.len() == 1 => {
                {
                    let mut ends = run.ends.lock().expect("lock");
                    let e = &mut ends[partition as usize];
                    *e = (*e).max(base_offsets[0].0 + n);
                }
                run.acked.fetch_add(n, Ordering::Relaxed);
                if let (Some(tl), Some(&first)) = (&run.timeline, f.send_ns.first()) {
                    let oldest = t.saturating_sub(first);
                    tl.lock().expect("lock").push((t, oldest, n as u32));
                }
                if t >= run.warmup_end_ns {
                    run.acked_window.fetch_add(n, Ordering::Relaxed);
                    run.last_ack_ns.fetch_max(t, Ordering::Relaxed);
                }
                for &s in &f.send_ns {
                    if s >= run.warmup_end_ns {
                        report::record(&mut hist, t.saturating_sub(s));
                    }
                }
            }
            Ok(other) => {
                run.fail(format!("unexpected produce response: {other:?}"));
                return hist;
            }
            Err(e) => {
                run.fail(format!("produce to partition {} failed: {e}", f.partition));
                return hist;
            }
        }
    }
    hist
}

fn spawn_consumers(run: &Arc<Run>, starts: &[u64]) -> anyhow::Result<Vec<Worker>> {
    let n = run.args.consumers;
    let mut out = Vec::new();
    for c in 0..n {
        let parts: Vec<u32> = (0..run.args.partitions)
            .filter(|p| *p as usize % n == c)
            .collect();
        if parts.is_empty() {
            continue;
        }
        let r = run.clone();
        let st: Vec<u64> = parts.iter().map(|p| starts[*p as usize]).collect();
        out.push(
            thread::Builder::new()
                .name(format!("consumer-{c}"))
                .spawn(move || consume(&r, &parts, &st))?,
        );
    }
    Ok(out)
}

/// Reads its partitions with one long-poll fetch in flight per partition, verifying
/// every record, until each reaches the offset the producers ended at.
fn consume(run: &Run, parts: &[u32], starts: &[u64]) -> Result<Histogram<u64>, String> {
    let args = &run.args;
    let addr = run.addr.lock().expect("lock").clone();
    let conn = Connection::connect(addr.as_str()).map_err(|e| e.to_string())?;
    let mut hist = report::histogram();
    let mut verifiers: Vec<message::Verifier> = parts
        .iter()
        .zip(starts)
        .map(|(p, s)| message::Verifier::new(*p, args.message_size, *s))
        .collect();
    let fetch = |v: &message::Verifier, p: u32| {
        conn.send(&Request::Fetch {
            topic: run.topic.clone(),
            partition: p,
            offset: ringbus::types::Offset(v.next_offset()),
            max_bytes: args.fetch_bytes,
            max_wait_ms: 50,
        })
        .map_err(|e| format!("fetch from partition {p}: {e}"))
    };
    let mut pending: Vec<Option<PendingReply>> = Vec::new();
    for (v, p) in verifiers.iter().zip(parts) {
        pending.push(Some(fetch(v, *p)?));
    }
    let mut last_progress = Instant::now();
    while pending.iter().any(Option::is_some) {
        if run.failed() {
            return Ok(hist);
        }
        for i in 0..parts.len() {
            let Some(reply) = pending[i].take() else {
                continue;
            };
            let p = parts[i];
            let resp = reply
                .wait()
                .map_err(|e| format!("fetch from partition {p}: {e}"))?;
            let Response::Fetch { records, .. } = resp else {
                return Err(format!("unexpected fetch response: {resp:?}"));
            };
            let before = verifiers[i].records;
            let now = now_ns();
            let count_e2e = !args.catch_up;
            for bytes in &records {
                verifiers[i].check(bytes, |send_ns| {
                    if count_e2e && send_ns >= run.warmup_end_ns {
                        report::record(&mut hist, now.saturating_sub(send_ns));
                    }
                })?;
            }
            let got = verifiers[i].records - before;
            if got > 0 {
                last_progress = Instant::now();
                run.consumed.fetch_add(got, Ordering::Relaxed);
                if args.catch_up || now >= run.warmup_end_ns {
                    run.consumed_window.fetch_add(got, Ordering::Relaxed);
                    run.last_consume_ns.fetch_max(now, Ordering::Relaxed);
                }
            }
            let done = run.producers_done.load(Ordering::SeqCst)
                && verifiers[i].next_offset() >= run.ends.lock().expect("lock")[p as usize];
            if !done {
                pending[i] = Some(fetch(&verifiers[i], p)?);
            }
        }
        if run.producers_done.load(Ordering::SeqCst)
            && last_progress.elapsed() > Duration::from_secs(30)
        {
            return Err(format!(
                "consumer stalled for 30 s short of the acknowledged end (partitions {parts:?}): messages lost"
            ));
        }
    }
    Ok(hist)
}

fn spawn_progress(run: Arc<Run>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        if run.args.quiet {
            return;
        }
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                .expect("template"),
        );
        let size = run.args.message_size as f64;
        let (mut last_a, mut last_c, mut last_t) = (0u64, 0u64, Instant::now());
        while !run.stop.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(250));
            let a = run.acked.load(Ordering::Relaxed);
            let c = run.consumed.load(Ordering::Relaxed);
            let dt = last_t.elapsed().as_secs_f64();
            let phase = if now_ns() < run.warmup_end_ns {
                "warm-up "
            } else {
                ""
            };
            bar.set_message(format!(
                "{phase}produced {a} ({:.0} MB/s)  consumed {c} ({:.0} MB/s)",
                (a - last_a) as f64 * size / dt / 1e6,
                (c - last_c) as f64 * size / dt / 1e6,
            ));
            bar.tick();
            (last_a, last_c, last_t) = (a, c, Instant::now());
        }
        bar.finish_and_clear();
    })
}

fn summarize(run: &Run, ack: &Histogram<u64>, e2e: &Histogram<u64>) -> serde_json::Value {
    let a = &run.args;
    let size = a.message_size as f64;
    let produce_secs = run
        .last_ack_ns
        .load(Ordering::SeqCst)
        .saturating_sub(run.warmup_end_ns) as f64
        / 1e9;
    let produced = run.acked_window.load(Ordering::SeqCst) as f64;
    let consume_from = if a.catch_up {
        run.consume_start_ns.load(Ordering::SeqCst)
    } else {
        run.warmup_end_ns
    };
    let consume_secs = run
        .last_consume_ns
        .load(Ordering::SeqCst)
        .saturating_sub(consume_from) as f64
        / 1e9;
    let consumed = run.consumed_window.load(Ordering::SeqCst) as f64;
    let rate = |n: f64, s: f64| if s > 0.0 { n / s } else { 0.0 };
    let round = |x: f64| (x * 10.0).round() / 10.0;
    let round2 = |x: f64| (x * 100.0).round() / 100.0;
    serde_json::json!({
        "config": {
            "producers": a.producers,
            "consumers": a.consumers,
            "partitions": a.partitions,
            "message_size_bytes": a.message_size,
            "batch_size": a.batch_size,
            "linger_us": a.linger_us,
            "in_flight": a.in_flight,
            "durability": format!("{:?}", a.durability).to_lowercase(),
            "rate_msgs_per_s": a.rate,
            "catch_up": a.catch_up,
            "cold": a.cold,
            "warmup_s": a.warmup.as_secs_f64(),
            "embedded": a.addr.is_none(),
        },
        "produced_msgs": run.acked.load(Ordering::SeqCst),
        "consumed_msgs": run.consumed.load(Ordering::SeqCst),
        "produce_seconds": round2(produce_secs),
        "produce_msgs_per_s": round(rate(produced, produce_secs)),
        "produce_mb_per_s": round(rate(produced * size, produce_secs) / 1e6),
        "consume_seconds": round2(consume_secs),
        "consume_msgs_per_s": round(rate(consumed, consume_secs)),
        "consume_mb_per_s": round(rate(consumed * size, consume_secs) / 1e6),
        "produce_ack_us": report::latency_json(ack),
        "end_to_end_us": report::latency_json(e2e),
        "verified": !run.failed(),
        "failure": run.failure.lock().expect("lock").clone(),
    })
}

fn print_summary(run: &Run, s: &serde_json::Value, ack: &Histogram<u64>, e2e: &Histogram<u64>) {
    let a = &run.args;
    println!(
        "ringbus-loadgen: {} producer(s), {} consumer(s), {} partition(s), {} B messages, batches of {}, {} in flight, durability {}, {}",
        a.producers,
        a.consumers,
        a.partitions,
        a.message_size,
        a.batch_size,
        a.in_flight,
        s["config"]["durability"].as_str().unwrap_or("?"),
        match a.rate {
            Some(r) => format!("fixed rate {r:.0} msgs/s"),
            None => "as fast as possible".into(),
        }
    );
    println!(
        "produce:  {:>12} msgs/s  {:>9} MB/s  ({} messages acknowledged)",
        s["produce_msgs_per_s"], s["produce_mb_per_s"], s["produced_msgs"]
    );
    if a.consumers > 0 {
        println!(
            "consume:  {:>12} msgs/s  {:>9} MB/s  ({} messages verified{})",
            s["consume_msgs_per_s"],
            s["consume_mb_per_s"],
            s["consumed_msgs"],
            if a.catch_up { ", catching up" } else { "" }
        );
    }
    println!("produce ack latency: {}", report::latency_line(ack));
    if a.consumers > 0 && !a.catch_up {
        println!("end-to-end latency:  {}", report::latency_line(e2e));
    }
}
