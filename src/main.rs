//! The `ringbus` command line: the broker (`serve`), topic administration, a
//! line-oriented producer and consumer, and operator tools (`segdump`).

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ringbus::client::{Connection, Consumer, Producer, ProducerConfig};
use ringbus::protocol::{OffsetSpec, TopicConfig};
use ringbus::server::ServerConfig;
use ringbus::storage::Durability;
use ringbus::Offset;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "ringbus",
    version,
    about = "A single-machine event log engine and message broker"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Addr {
    /// Broker address.
    #[arg(long, default_value = "127.0.0.1:9470")]
    addr: String,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (one shard per core) until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Create, list and delete topics.
    #[command(subcommand)]
    Topic(TopicCmd),
    /// Read stdin and produce one message per line.
    Produce {
        topic: String,
        /// Write to this partition.
        #[arg(long, conflicts_with = "key")]
        partition: Option<u32>,
        /// Pick the partition by hashing this key (Kafka's partitioner); also sets each record's key.
        #[arg(long)]
        key: Option<String>,
        #[arg(long, default_value = "fsync")]
        durability: Durability,
        #[command(flatten)]
        addr: Addr,
    },
    /// Print one message value per line.
    Consume {
        topic: String,
        /// Read only this partition (default: every partition).
        #[arg(long)]
        partition: Option<u32>,
        /// earliest, latest or an offset.
        #[arg(long, default_value = "earliest")]
        from: String,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// Keep waiting for new messages at the end of the log.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        addr: Addr,
    },
    /// Print a segment's batches (offsets, sizes, timestamps, CRC status) and its index.
    Segdump {
        /// Path to a `<base offset>.log` segment file.
        path: PathBuf,
        /// Also print every record's key, value size and headers.
        #[arg(long)]
        records: bool,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// TOML file with any of the settings below (flags win).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long)]
    listen: Option<SocketAddr>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Shards (default: one per CPU free of the data disk's interrupts; see --placement).
    #[arg(long)]
    cores: Option<usize>,
    /// Where shards run: auto keeps them off the CPUs that take the data disk's
    /// interrupts (one shard per remaining CPU when --cores is not given).
    #[arg(long, value_enum)]
    placement: Option<ringbus::server::PlacementMode>,
    #[arg(long)]
    max_connections: Option<usize>,
    #[arg(long)]
    max_frame_bytes: Option<usize>,
    /// Per shard: memory for large request frames being received or handled;
    /// connections wait while it is used up (at least --max-frame-bytes + 4).
    #[arg(long)]
    request_memory_bytes: Option<usize>,
    /// Default segment size for new topics.
    #[arg(long)]
    segment_bytes: Option<u64>,
    /// Roll segments older than this.
    #[arg(long)]
    segment_ms: Option<u64>,
    /// Default retention by size, per partition.
    #[arg(long)]
    retention_bytes: Option<u64>,
    /// Default retention by age.
    #[arg(long)]
    retention_ms: Option<u64>,
    /// Group commit: flush once this many bytes are pending ...
    #[arg(long)]
    flush_bytes: Option<u64>,
    /// ... or after this many microseconds (small data a producer waits to fsync goes at once).
    #[arg(long)]
    flush_delay_us: Option<u64>,
    /// Memory for the tail cache, all shards together (default: an eighth of RAM).
    #[arg(long)]
    tail_cache_bytes: Option<u64>,
    /// How much of each partition's log start-up validates: from each segment's
    /// last good index entry (default), or every batch of every segment.
    #[arg(long, value_enum)]
    recovery: Option<Recovery>,
}

/// `--recovery`: [`ringbus::storage::RecoveryPolicy`] as a flag value.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Recovery {
    TailFromIndex,
    Full,
}

impl From<Recovery> for ringbus::storage::RecoveryPolicy {
    fn from(r: Recovery) -> Self {
        match r {
            Recovery::TailFromIndex => ringbus::storage::RecoveryPolicy::TailFromIndex,
            Recovery::Full => ringbus::storage::RecoveryPolicy::Full,
        }
    }
}

#[derive(Subcommand)]
enum TopicCmd {
    /// Create a topic.
    Create {
        name: String,
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        #[arg(long)]
        segment_bytes: Option<u64>,
        #[arg(long)]
        retention_bytes: Option<u64>,
        #[arg(long)]
        retention_ms: Option<u64>,
        #[command(flatten)]
        addr: Addr,
    },
    /// List topics with their partitions and offsets.
    List {
        #[command(flatten)]
        addr: Addr,
    },
    /// Delete a topic and its data.
    Delete {
        name: String,
        #[command(flatten)]
        addr: Addr,
    },
}

fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let mut c = match &a.config {
        Some(p) => ServerConfig::from_toml_file(p)?,
        None => ServerConfig::default(),
    };
    // A flag given replaces the file's value: `set!` for settings with a value,
    // `set_opt!` for optional ones (the flag's `Some` replaces the setting).
    macro_rules! set {
        ($to:expr; $($f:ident),*) => { $( if let Some(v) = a.$f { $to.$f = v.into(); } )* };
    }
    macro_rules! set_opt {
        ($to:expr; $($f:ident),*) => { $( if a.$f.is_some() { $to.$f = a.$f; } )* };
    }
    set!(c; listen, data_dir, cores, placement, max_connections, max_frame_bytes, request_memory_bytes);
    set!(c.topic_defaults; segment_bytes, flush_bytes, flush_delay_us, recovery);
    set_opt!(c.topic_defaults; segment_ms, retention_bytes, retention_ms);
    set_opt!(c; tail_cache_bytes);
    ringbus::server::run(c)
}

fn partitions_of(conn: &Connection, topic: &str) -> anyhow::Result<u32> {
    let topics = conn.list_topics()?;
    let t = topics
        .iter()
        .find(|t| t.name == topic)
        .with_context(|| format!("unknown topic {topic:?}"))?;
    Ok(t.config.partitions)
}

fn produce(
    topic: &str,
    partition: Option<u32>,
    key: Option<String>,
    durability: Durability,
    addr: &str,
) -> anyhow::Result<()> {
    let producer = Producer::new(
        addr,
        ProducerConfig {
            durability,
            ..ProducerConfig::default()
        },
    )?;
    let mut receipts = Vec::new();
    let mut n = 0u64;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let r = producer.send(
            topic,
            partition,
            key.as_deref().map(str::as_bytes),
            line.as_bytes(),
            &[],
        )?;
        receipts.push(r);
        n += 1;
        if receipts.len() >= 10_000 {
            for r in receipts.drain(..) {
                r.wait()?;
            }
        }
    }
    producer.flush();
    for r in receipts {
        r.wait()?;
    }
    drop(producer);
    eprintln!("produced {n} messages");
    Ok(())
}

fn consume(
    topic: &str,
    partition: Option<u32>,
    from: &str,
    count: Option<u64>,
    follow: bool,
    addr: &str,
) -> anyhow::Result<()> {
    let conn = Connection::connect(addr)?;
    let parts: Vec<u32> = match partition {
        Some(p) => vec![p],
        None => (0..partitions_of(&conn, topic)?).collect(),
    };
    let mut consumers = Vec::new();
    for &p in &parts {
        let start = match from {
            "earliest" => conn.list_offsets(topic, p, OffsetSpec::Earliest)?,
            "latest" => conn.list_offsets(topic, p, OffsetSpec::Latest)?,
            n => Offset(
                n.parse()
                    .with_context(|| format!("--from {n:?}: earliest, latest or an offset"))?,
            ),
        };
        consumers.push(Consumer::new(addr, topic, p, start)?);
    }
    let out = std::io::stdout();
    let mut out = out.lock();
    let mut printed = 0u64;
    loop {
        let mut any = false;
        let wait = if follow && consumers.len() == 1 {
            Duration::from_millis(500)
        } else {
            Duration::ZERO
        };
        for c in &mut consumers {
            for r in c.poll(wait)? {
                out.write_all(r.value.as_deref().unwrap_or_default())?;
                out.write_all(b"\n")?;
                printed += 1;
                any = true;
                if count.is_some_and(|n| printed >= n) {
                    out.flush()?;
                    return Ok(());
                }
            }
        }
        out.flush()?;
        if !any {
            if !follow {
                return Ok(());
            }
            if consumers.len() > 1 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(a) => serve(a)?,
        Command::Topic(TopicCmd::Create {
            name,
            partitions,
            segment_bytes,
            retention_bytes,
            retention_ms,
            addr,
        }) => {
            Connection::connect(addr.addr.as_str())?.create_topic(
                &name,
                TopicConfig {
                    partitions,
                    segment_bytes,
                    retention_bytes,
                    retention_ms,
                },
            )?;
            println!("created topic {name} with {partitions} partitions");
        }
        Command::Topic(TopicCmd::List { addr }) => {
            for t in Connection::connect(addr.addr.as_str())?.list_topics()? {
                println!("{}\tpartitions={}", t.name, t.config.partitions);
                for p in t.partitions {
                    println!(
                        "  {}/{}\tearliest={}\tlatest={}",
                        t.name, p.partition, p.log_start, p.high_watermark
                    );
                }
            }
        }
        Command::Topic(TopicCmd::Delete { name, addr }) => {
            Connection::connect(addr.addr.as_str())?.delete_topic(&name)?;
            println!("deleted topic {name}");
        }
        Command::Produce {
            topic,
            partition,
            key,
            durability,
            addr,
        } => produce(&topic, partition, key, durability, &addr.addr)?,
        Command::Consume {
            topic,
            partition,
            from,
            count,
            follow,
            addr,
        } => consume(&topic, partition, &from, count, follow, &addr.addr)?,
        Command::Segdump { path, records } => {
            let text = ringbus::storage::dump::dump_segment(&path, records)?;
            print!("{text}");
        }
    }
    Ok(())
}
