//! End-to-end tests: the real `ringbus` binary on an ephemeral loopback port, with
//! two shards, driven through the Rust client, the CLI and raw sockets.

mod common;

use ringbus::client::{Connection, Consumer, Producer, ProducerConfig};
use ringbus::protocol::{
    self, ErrorCode, OffsetSpec, PartitionSelector, Request, Response, TopicConfig,
};
use ringbus::storage::Durability;
use ringbus::Offset;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Broker {
    child: Child,
    addr: String,
}

impl Broker {
    fn start(dir: &std::path::Path) -> Broker {
        Self::start_with(dir, &[])
    }

    /// With `extra` flags; two shards unless `extra` sets `--cores`.
    fn start_with(dir: &std::path::Path, extra: &[&str]) -> Broker {
        Self::start_logging(dir, extra, Stdio::inherit())
    }

    /// [`Broker::start_with`], with the broker's log (stderr) going to `log`.
    fn start_logging(dir: &std::path::Path, extra: &[&str], log: Stdio) -> Broker {
        Self::start_command(Command::new(env!("CARGO_BIN_EXE_ringbus")), dir, extra, log)
    }

    /// [`Broker::start_with`] through `command`, which runs the binary (a shell
    /// that sets a limit first, say) with the arguments that follow.
    fn start_command(
        mut command: Command,
        dir: &std::path::Path,
        extra: &[&str],
        log: Stdio,
    ) -> Broker {
        let cores: &[&str] = if extra.contains(&"--cores") {
            &[]
        } else {
            &["--cores", "2"]
        };
        let mut child = command
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--segment-bytes",
                "1048576",
                // Small, so that parallel tests do not each reserve an eighth of RAM.
                "--tail-cache-bytes",
                "33554432",
            ])
            .args(cores)
            .arg("--data-dir")
            .arg(dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start ringbus");
        // Read the first line on a helper thread, so a broker that never comes up
        // fails this test instead of hanging the suite.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            panic!("broker did not report its address within 30 s");
        };
        let addr = line
            .trim()
            .strip_prefix("ringbus listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Broker { child, addr }
    }

    /// With the settings of a TOML file holding `toml` (inside `dir`), plus `extra`.
    fn start_with_config(dir: &std::path::Path, toml: &str, extra: &[&str]) -> Broker {
        let cfg = dir.join("ringbus.toml");
        std::fs::write(&cfg, toml).unwrap();
        let mut args = extra.to_vec();
        args.extend(["--config", cfg.to_str().unwrap()]);
        Broker::start_with(&dir.join("data"), &args)
    }

    /// Sends the broker a signal (`-STOP`, `-CONT`, ...).
    fn signal(&self, sig: &str) {
        let sent = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill {sig} failed");
    }

    fn conn(&self) -> Connection {
        Connection::connect(self.addr.as_str()).unwrap()
    }

    /// SIGTERM and wait: a graceful shutdown must exit 0.
    fn stop(mut self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "broker exit status {status}");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn topic(parts: u32) -> TopicConfig {
    TopicConfig {
        partitions: parts,
        ..TopicConfig::default()
    }
}

/// One partition in segments of 64 KiB (a few 10 KB batches each).
fn small_segments() -> TopicConfig {
    TopicConfig {
        partitions: 1,
        segment_bytes: Some(64 * 1024),
        ..TopicConfig::default()
    }
}

/// How many segment logs (`.log` files) a partition directory holds.
fn log_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "log")
        })
        .count()
}

/// Produces `value` once to each of `topic`'s first `parts` partitions, and waits
/// for every acknowledgement.
fn one_record_each(addr: &str, topic: &str, parts: u32, value: &[u8]) {
    let p = Producer::new(addr, ProducerConfig::default()).unwrap();
    let receipts: Vec<_> = (0..parts)
        .map(|part| p.send(topic, Some(part), None, value, &[]).unwrap())
        .collect();
    for r in receipts {
        r.wait().unwrap();
    }
}

/// `chattr FLAG path` (e2fsprogs; ext4): whether it worked.
fn chattr(flag: &str, path: &std::path::Path) -> bool {
    Command::new("chattr")
        .arg(flag)
        .arg(path)
        .status()
        .is_ok_and(|s| s.success())
}

/// Every value in a partition from offset 0, with offsets.
fn read_partition(addr: &str, topic: &str, p: u32) -> Vec<(Offset, Vec<u8>)> {
    let mut c = Consumer::new(addr, topic, p, Offset(0)).unwrap();
    let mut out = Vec::new();
    loop {
        let recs = c.poll(Duration::ZERO).unwrap();
        if recs.is_empty() {
            return out;
        }
        out.extend(
            recs.into_iter()
                .map(|r| (r.offset, r.value.unwrap().to_vec())),
        );
    }
}

#[test]
fn produce_and_consume_across_partitions_on_two_shards() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path());
    b.conn().create_topic("orders", topic(6)).unwrap();
    let shards: std::collections::HashSet<_> = (0..6)
        .map(|p| ringbus::server::shard::owner("orders", p, 2))
        .collect();
    assert_eq!(shards.len(), 2, "partitions must span both shards");

    let producer = Producer::new(
        &b.addr,
        ProducerConfig {
            linger: Duration::from_millis(2),
            ..ProducerConfig::default()
        },
    )
    .unwrap();
    let mut receipts = Vec::new();
    for i in 0..3000u32 {
        let key = format!("customer-{}", i % 40);
        let value = format!("{key}:{i}");
        receipts.push((
            value.clone(),
            producer
                .send("orders", None, Some(key.as_bytes()), value.as_bytes(), &[])
                .unwrap(),
        ));
    }
    producer.flush();
    let mut acked: BTreeMap<u32, Vec<(Offset, Vec<u8>)>> = BTreeMap::new();
    for (v, r) in receipts {
        let (p, o) = r.wait().unwrap();
        assert_eq!(
            p,
            protocol::partition_for_key(v.split(':').next().unwrap().as_bytes(), 6)
        );
        acked.entry(p).or_default().push((o, v.into_bytes()));
    }
    drop(producer);
    let mut total = 0;
    for (p, mut want) in acked {
        want.sort();
        let got = read_partition(&b.addr, "orders", p);
        assert_eq!(
            got, want,
            "partition {p}: every message once, in offset order"
        );
        // Within a key, values arrive in the order they were sent.
        let mut last: HashMap<String, u32> = HashMap::new();
        for (_, v) in &got {
            let s = String::from_utf8(v.clone()).unwrap();
            let (k, i) = s.split_once(':').unwrap();
            let i: u32 = i.parse().unwrap();
            assert!(
                last.insert(k.to_owned(), i).is_none_or(|prev| prev < i),
                "reordered within {k}"
            );
        }
        total += got.len();
    }
    assert_eq!(total, 3000);
    let listed = b.conn().list_topics().unwrap();
    let hw: u64 = listed[0]
        .partitions
        .iter()
        .map(|p| p.high_watermark.0)
        .sum();
    assert_eq!(hw, 3000);
    b.stop();
}

#[test]
fn topics_and_messages_survive_a_graceful_restart() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path());
    let c = b.conn();
    c.create_topic("a", topic(3)).unwrap();
    c.create_topic(
        "b",
        TopicConfig {
            partitions: 1,
            retention_ms: Some(86_400_000),
            ..TopicConfig::default()
        },
    )
    .unwrap();
    let p = Producer::new(
        &b.addr,
        ProducerConfig {
            durability: Durability::Memory,
            ..ProducerConfig::default()
        },
    )
    .unwrap();
    for i in 0..300u32 {
        p.send("a", Some(i % 3), None, format!("m{i}").as_bytes(), &[])
            .unwrap();
    }
    p.flush();
    drop(p);
    drop(c);
    b.stop();

    let b = Broker::start(dir.path());
    let topics = b.conn().list_topics().unwrap();
    let names: Vec<_> = topics
        .iter()
        .map(|t| (t.name.as_str(), t.config.partitions))
        .collect();
    assert_eq!(names, vec![("a", 3), ("b", 1)]);
    assert_eq!(topics[1].config.retention_ms, Some(86_400_000));
    for part in 0..3 {
        let got = read_partition(&b.addr, "a", part);
        assert_eq!(got.len(), 100);
        for (j, (o, v)) in got.iter().enumerate() {
            assert_eq!(o.0, j as u64);
            assert_eq!(v, format!("m{}", j as u32 * 3 + part).as_bytes());
        }
    }
    // Deleting a topic removes it and its data, also across a restart.
    b.conn().delete_topic("a").unwrap();
    assert_eq!(b.conn().list_topics().unwrap().len(), 1);
    assert!(!dir.path().join("topics/a").exists());
    b.stop();
    let b = Broker::start(dir.path());
    assert_eq!(b.conn().list_topics().unwrap().len(), 1);
    b.stop();
}

#[test]
fn kill9_while_producing_keeps_every_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = Broker::start(dir.path());
    b.conn().create_topic("k", topic(4)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..4u32)
        .map(|t| {
            let (addr, stop, acked) = (b.addr.clone(), stop.clone(), acked.clone());
            std::thread::spawn(move || {
                let c = Connection::connect(addr.as_str()).unwrap();
                for seq in 0u32.. {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let mut builder = ringbus::batch::BatchBuilder::default();
                    let values: Vec<String> =
                        (0..10).map(|j| format!("t{t}-s{seq}-r{j}")).collect();
                    for v in &values {
                        builder.push(ringbus::batch::RecordInput {
                            value: Some(v.as_bytes()),
                            ..Default::default()
                        });
                    }
                    let bytes = bytes::Bytes::from(builder.finish());
                    match c.produce(
                        "k",
                        PartitionSelector::Partition(t),
                        Durability::Fsync,
                        bytes,
                    ) {
                        Ok((p, bases)) => acked.lock().unwrap().push((p, bases[0], values)),
                        Err(_) => return, // the broker died
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    b.child.kill().unwrap(); // SIGKILL
    b.child.wait().unwrap();
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(
        acked.len() > 20,
        "only {} batches acknowledged",
        acked.len()
    );
    drop(b);

    let b = Broker::start(dir.path());
    let mut parts: HashMap<u32, Vec<(Offset, Vec<u8>)>> = HashMap::new();
    for p in 0..4 {
        parts.insert(p, read_partition(&b.addr, "k", p));
    }
    for (p, base, values) in &acked {
        let got = &parts[p];
        for (j, v) in values.iter().enumerate() {
            let o = base.plus(j as u64);
            let rec = got
                .get(o.0 as usize)
                .unwrap_or_else(|| panic!("acked offset {o} of partition {p} lost"));
            assert_eq!(
                (rec.0, rec.1.as_slice()),
                (o, v.as_bytes()),
                "partition {p}"
            );
        }
    }
    for (p, got) in &parts {
        for (i, (o, _)) in got.iter().enumerate() {
            assert_eq!(
                o.0, i as u64,
                "partition {p}: offsets must be dense and in order"
            );
        }
    }
    eprintln!("{} acknowledged batches all recovered", acked.len());
    b.stop();
}

fn raw_request(s: &mut TcpStream, bytes: &[u8]) {
    s.write_all(bytes).unwrap();
}

/// Reads one response frame; `None` when the broker closed the connection.
fn raw_response(s: &mut TcpStream) -> Option<(u32, u16)> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut body).ok()?;
    Some((
        u32::from_le_bytes(body[..4].try_into().unwrap()),
        u16::from_le_bytes(body[4..6].try_into().unwrap()),
    ))
}

fn closed(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn bad_input_on_one_connection_leaves_the_others_and_the_log_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path());
    b.conn().create_topic("good", topic(2)).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    // A well-behaved client keeps producing and consuming throughout.
    let (addr, d) = (b.addr.clone(), done.clone());
    let good = std::thread::spawn(move || {
        let c = Connection::connect(addr.as_str()).unwrap();
        let mut n = 0u64;
        while !d.load(Ordering::SeqCst) {
            let mut builder = ringbus::batch::BatchBuilder::default();
            builder.push(ringbus::batch::RecordInput {
                value: Some(format!("g{n}").as_bytes()),
                ..Default::default()
            });
            let (_, bases) = c
                .produce(
                    "good",
                    PartitionSelector::Partition(0),
                    Durability::Fsync,
                    bytes::Bytes::from(builder.finish()),
                )
                .unwrap();
            assert_eq!(bases[0], Offset(n));
            let f = c
                .fetch("good", 0, Offset(n), 1 << 20, Duration::ZERO)
                .unwrap();
            assert_eq!(
                f.records(0, Offset(n)).unwrap()[0].value.as_deref(),
                Some(format!("g{n}").as_bytes())
            );
            n += 1;
        }
        n
    });

    // 1. Unknown API key with a valid header: typed error under its correlation id,
    //    and the connection stays usable.
    let mut s = TcpStream::connect(&b.addr).unwrap();
    raw_request(&mut s, &[8, 0, 0, 0, 99, 0, 0, 0, 77, 0, 0, 0]);
    assert_eq!(
        raw_response(&mut s),
        Some((77, ErrorCode::UnknownApi as u16))
    );
    let mut v = Vec::new();
    protocol::encode_request(78, &Request::ApiVersions, &mut v);
    raw_request(&mut s, &v);
    assert_eq!(
        raw_response(&mut s).map(|r| r.1),
        Some(0),
        "connection still serves after an unknown key"
    );
    // 2. A produce whose batch bytes are garbage: InvalidBatch, nothing appended.
    let mut v = Vec::new();
    let bad = Request::Produce {
        topic: "good".into(),
        partition: PartitionSelector::Partition(1),
        durability: Durability::Fsync,
        batches: bytes::Bytes::from(vec![0xAB; 200]),
    };
    protocol::encode_request(79, &bad, &mut v);
    raw_request(&mut s, &v);
    assert_eq!(
        raw_response(&mut s),
        Some((79, ErrorCode::InvalidBatch as u16))
    );
    // 3. A frame length of 4 GiB: FrameTooLarge under correlation 0, then closed.
    let mut s = TcpStream::connect(&b.addr).unwrap();
    raw_request(&mut s, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
    assert_eq!(
        raw_response(&mut s),
        Some((0, ErrorCode::FrameTooLarge as u16))
    );
    assert!(closed(&mut s));
    // 4. A frame too short for a header: MalformedRequest, then closed.
    let mut s = TcpStream::connect(&b.addr).unwrap();
    raw_request(&mut s, &[3, 0, 0, 0, 1, 2, 3]);
    assert_eq!(
        raw_response(&mut s),
        Some((0, ErrorCode::MalformedRequest as u16))
    );
    assert!(closed(&mut s));
    // 5. A truncated frame, then the client goes away.
    let mut s = TcpStream::connect(&b.addr).unwrap();
    raw_request(&mut s, &[100, 0, 0, 0, 4, 0, 0, 0, 1]);
    drop(s);
    // 6. Random bytes.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..20 {
        let mut s = TcpStream::connect(&b.addr).unwrap();
        let junk: Vec<u8> = (0..512)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let _ = s.write_all(&junk);
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut sink = [0u8; 4096];
        let _ = s.read(&mut sink);
    }
    std::thread::sleep(Duration::from_millis(300));
    done.store(true, Ordering::SeqCst);
    let n = good.join().expect("the good client never saw an error");
    assert!(n > 0);
    // The log holds exactly the good client's messages.
    let c = b.conn();
    assert_eq!(
        c.list_offsets("good", 0, OffsetSpec::Latest).unwrap(),
        Offset(n)
    );
    assert_eq!(
        c.list_offsets("good", 1, OffsetSpec::Latest).unwrap(),
        Offset(0)
    );
    assert_eq!(read_partition(&b.addr, "good", 0).len() as u64, n);
    b.stop();
}

#[test]
fn long_poll_returns_as_soon_as_a_message_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path());
    b.conn().create_topic("tail", topic(1)).unwrap();
    let addr = b.addr.clone();
    let waiter = std::thread::spawn(move || {
        let c = Connection::connect(addr.as_str()).unwrap();
        let start = Instant::now();
        // One request, up to 10 s: the broker holds it until data arrives.
        let f = c
            .fetch("tail", 0, Offset(0), 1 << 20, Duration::from_secs(10))
            .unwrap();
        (start.elapsed(), f.records(0, Offset(0)).unwrap())
    });
    std::thread::sleep(Duration::from_millis(400));
    let mut builder = ringbus::batch::BatchBuilder::default();
    builder.push(ringbus::batch::RecordInput {
        value: Some(b"wake up"),
        ..Default::default()
    });
    b.conn()
        .produce(
            "tail",
            PartitionSelector::Partition(0),
            Durability::Fsync,
            bytes::Bytes::from(builder.finish()),
        )
        .unwrap();
    let (waited, recs) = waiter.join().unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].value.as_deref(), Some(&b"wake up"[..]));
    assert!(
        waited >= Duration::from_millis(350),
        "returned before the message existed: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "did not wake on the append: {waited:?}"
    );
    // With nothing to read, the wait ends at max_wait with an empty answer.
    let start = Instant::now();
    let f = b
        .conn()
        .fetch("tail", 0, Offset(1), 1 << 20, Duration::from_millis(300))
        .unwrap();
    assert!(f.records.is_empty());
    assert!(start.elapsed() >= Duration::from_millis(280));
    b.stop();
}

#[test]
fn errors_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path());
    let c = b.conn();
    c.create_topic("t", topic(2)).unwrap();
    let code = |r: Result<Response, ringbus::client::ClientError>| r.unwrap_err().code();
    assert_eq!(
        c.create_topic("t", topic(2)).unwrap_err().code(),
        Some(ErrorCode::TopicExists)
    );
    assert_eq!(
        c.create_topic("z", topic(0)).unwrap_err().code(),
        Some(ErrorCode::InvalidConfig)
    );
    assert_eq!(
        c.delete_topic("nope").unwrap_err().code(),
        Some(ErrorCode::UnknownTopic)
    );
    let huge = TopicConfig {
        partitions: 1,
        retention_ms: Some(1 << 63),
        ..TopicConfig::default()
    };
    assert_eq!(
        c.create_topic("r", huge).unwrap_err().code(),
        Some(ErrorCode::InvalidConfig)
    );
    let fetch = |t: &str, p: u32, o: u64| {
        c.call(&Request::Fetch {
            topic: t.into(),
            partition: p,
            offset: Offset(o),
            max_bytes: 100,
            max_wait_ms: 0,
        })
    };
    assert_eq!(code(fetch("nope", 0, 0)), Some(ErrorCode::UnknownTopic));
    assert_eq!(code(fetch("t", 2, 0)), Some(ErrorCode::UnknownPartition));
    assert_eq!(code(fetch("t", 0, 5)), Some(ErrorCode::OffsetOutOfRange));
    assert_eq!(
        c.list_offsets("t", 0, OffsetSpec::Timestamp(0))
            .unwrap_err()
            .code(),
        Some(ErrorCode::OffsetNotFound)
    );
    b.stop();
}

#[test]
fn timestamp_lookups_cross_segments_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path());
    let c = b.conn();
    c.create_topic("ts", small_segments()).unwrap();
    // 40 batches of 10 records of 1 KB (about 6 batches a segment): batch k holds
    // offsets 10k..10k+9, stamped 1,000,000 + 1,000k + j for record j.
    for k in 0..40i64 {
        let req = produce_request_at("ts", 0, "v", 10, 1_000, |j| 1_000_000 + 1_000 * k + j);
        let r = c.call(&req);
        assert!(matches!(r, Ok(Response::Produce { .. })), "{r:?}");
    }
    let check = |c: &Connection| {
        for (t, want) in [
            (0, Some(0)),
            (1_000_009, Some(0)),
            (1_000_010, Some(10)),
            (1_017_500, Some(180)),
            (1_039_009, Some(390)),
            (1_039_010, None),
        ] {
            let got = c.list_offsets("ts", 0, OffsetSpec::Timestamp(t));
            match want {
                Some(o) => assert_eq!(got.unwrap(), Offset(o), "lookup of {t}"),
                None => assert_eq!(
                    got.unwrap_err().code(),
                    Some(ErrorCode::OffsetNotFound),
                    "lookup of {t}"
                ),
            }
        }
    };
    check(&c);
    drop(c);
    b.stop();
    let segments = log_files(&dir.path().join("topics/ts/0"));
    assert!(segments >= 5, "only {segments} segments");
    // After a restart the lookups work from the time indexes and segment files as
    // recovery reloaded them.
    let b = Broker::start(dir.path());
    check(&b.conn());
    b.stop();
}

#[test]
fn cli_quickstart() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path());
    let bin = env!("CARGO_BIN_EXE_ringbus");
    let run = |args: &[&str], stdin: &str| {
        let mut c = Command::new(bin)
            .args(args)
            .args(["--addr", &b.addr])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    run(&["topic", "create", "greetings", "--partitions", "3"], "");
    assert!(run(&["topic", "list"], "").contains("greetings\tpartitions=3"));
    run(
        &["produce", "greetings", "--key", "alice"],
        "hello\nworld\n",
    );
    run(
        &[
            "produce",
            "greetings",
            "--partition",
            "2",
            "--durability",
            "memory",
        ],
        "third\n",
    );
    let all = run(&["consume", "greetings"], "");
    let mut lines: Vec<_> = all.lines().collect();
    lines.sort();
    assert_eq!(lines, vec!["hello", "third", "world"]);
    let p = protocol::partition_for_key(b"alice", 3).to_string();
    assert_eq!(
        run(
            &["consume", "greetings", "--partition", &p, "--count", "1"],
            ""
        ),
        "hello\n"
    );
    assert_eq!(
        run(
            &[
                "consume",
                "greetings",
                "--partition",
                "2",
                "--from",
                "latest"
            ],
            ""
        ),
        ""
    );
    run(&["topic", "delete", "greetings"], "");
    assert!(!run(&["topic", "list"], "").contains("greetings"));
    b.stop();
}

#[test]
fn connection_limit_and_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start_with_config(
        dir.path(),
        "max_connections = 2\nmax_frame_bytes = 4096\nplacement = \"unpinned\"\n",
        &[],
    );
    let c1 = b.conn();
    let c2 = b.conn();
    c1.call(&Request::ApiVersions).unwrap();
    c2.call(&Request::ApiVersions).unwrap();
    // The third is accepted by the kernel and closed by the broker.
    let mut s3 = TcpStream::connect(&b.addr).unwrap();
    assert!(
        closed(&mut s3),
        "third connection over the limit stayed open"
    );
    drop(c2);
    // Once the broker notices the closed connection its slot is free again.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut raw = loop {
        let mut t = TcpStream::connect(&b.addr).unwrap();
        let mut v = Vec::new();
        protocol::encode_request(1, &Request::ApiVersions, &mut v);
        t.write_all(&v).unwrap();
        t.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        if raw_response(&mut t).is_some() {
            break t;
        }
        assert!(Instant::now() < deadline, "slot never freed");
        std::thread::sleep(Duration::from_millis(50));
    };
    // The frame limit from the file applies: 5000 bytes > 4096.
    raw.write_all(&5000u32.to_le_bytes()).unwrap();
    assert_eq!(
        raw_response(&mut raw),
        Some((0, ErrorCode::FrameTooLarge as u16))
    );
    c1.call(&Request::ApiVersions).unwrap();
    drop(c1);
    b.stop();
}

/// A produce to `topic`/`partition` of one batch of `records` values `{tag}-{j}` of
/// `value_len` bytes, stamped 1,000 ms.
fn produce_request(
    topic: &str,
    partition: u32,
    tag: &str,
    records: usize,
    value_len: usize,
) -> Request {
    produce_request_at(topic, partition, tag, records, value_len, |_| 1_000)
}

/// [`produce_request`] with record `j` stamped `ts(j)` ms.
fn produce_request_at(
    topic: &str,
    partition: u32,
    tag: &str,
    records: usize,
    value_len: usize,
    ts: impl Fn(i64) -> i64,
) -> Request {
    let mut b = ringbus::batch::BatchBuilder::with_capacity(records * (value_len + 16));
    for j in 0..records {
        let mut v = format!("{tag}-{j}").into_bytes();
        v.resize(value_len, b'.');
        b.push(ringbus::batch::RecordInput {
            timestamp: ringbus::TimestampMs(ts(j as i64)),
            key: None,
            value: Some(&v),
            headers: &[],
        });
    }
    Request::Produce {
        topic: topic.into(),
        partition: PartitionSelector::Partition(partition),
        durability: Durability::Fsync,
        batches: bytes::Bytes::from(b.finish()),
    }
}

#[test]
fn large_frames_wait_for_the_shards_request_memory() {
    let dir = tempfile::tempdir().unwrap();
    // One shard, with request memory for two 1 MB frames.
    let b = Broker::start_with_config(
        dir.path(),
        "max_frame_bytes = 1048576\nrequest_memory_bytes = 2200000\nplacement = \"unpinned\"\n",
        &["--cores", "1"],
    );
    b.conn().create_topic("big", topic(1)).unwrap();
    // Two clients start 1 MB frames and stall: together they hold all but 200 KB.
    let stalled: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(&b.addr).unwrap();
            s.write_all(&1_000_000u32.to_le_bytes()).unwrap();
            s.write_all(&[0u8; 1000]).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // An 800 KB produce must wait for memory ...
    let (tx, rx) = std::sync::mpsc::channel();
    let addr = b.addr.clone();
    let waiting = std::thread::spawn(move || {
        let c = Connection::connect(addr.as_str()).unwrap();
        tx.send(c.call(&produce_request("big", 0, "w", 100, 8_000)))
            .unwrap();
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(1_000)).is_err(),
        "answered although the stalled frames hold the shard's request memory"
    );
    // ... and small requests still go through meanwhile.
    b.conn().call(&Request::ApiVersions).unwrap();
    // A stalled client leaves: its memory comes back and the produce lands.
    drop(stalled.into_iter().next());
    let r = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("produce answered");
    assert!(matches!(r, Ok(Response::Produce { .. })), "{r:?}");
    waiting.join().unwrap();
    // Six producers then share what the last stalled frame leaves, one frame at
    // a time, and every record lands in order.
    let producers: Vec<_> = (0..6)
        .map(|t| {
            let addr = b.addr.clone();
            std::thread::spawn(move || {
                let c = Connection::connect(addr.as_str()).unwrap();
                for i in 0..5 {
                    let r = c.call(&produce_request("big", 0, &format!("p{t}.{i}"), 100, 8_000));
                    assert!(matches!(r, Ok(Response::Produce { .. })), "{r:?}");
                }
            })
        })
        .collect();
    for p in producers {
        p.join().unwrap();
    }
    let records = read_partition(&b.addr, "big", 0);
    assert_eq!(records.len(), 100 + 6 * 5 * 100);
    for t in 0..6 {
        let mine: Vec<String> = records
            .iter()
            .map(|(_, v)| String::from_utf8_lossy(v).trim_end_matches('.').to_owned())
            .filter(|v| v.starts_with(&format!("p{t}.")))
            .collect();
        let want: Vec<String> = (0..5)
            .flat_map(|i| (0..100).map(move |j| format!("p{t}.{i}-{j}")))
            .collect();
        assert_eq!(mine, want, "producer {t}'s records, in order");
    }
    b.stop();
}

#[test]
fn a_frame_that_comes_too_slowly_is_dropped_and_its_memory_returned() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start_with_config(
        dir.path(),
        "max_frame_bytes = 1048576\nrequest_memory_bytes = 1100000\n\
         frame_timeout_ms = 500\nplacement = \"unpinned\"\n",
        &["--cores", "1"],
    );
    b.conn().create_topic("big", topic(1)).unwrap();
    let mut stalled = TcpStream::connect(&b.addr).unwrap();
    stalled.write_all(&1_000_000u32.to_le_bytes()).unwrap();
    stalled.write_all(&[0u8; 1000]).unwrap();
    let started = Instant::now();
    // It keeps sending, a byte every 100 ms: too slowly to finish in 500 ms.
    let mut trickle = stalled.try_clone().unwrap();
    std::thread::spawn(move || {
        for _ in 0..100 {
            std::thread::sleep(Duration::from_millis(100));
            if trickle.write_all(&[0]).is_err() {
                return;
            }
        }
    });
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut byte = [0u8; 1];
    let r = stalled.read(&mut byte);
    assert!(
        matches!(r, Ok(0))
            || matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "slow connection not closed: {r:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "closed too early"
    );
    // Its memory is back: a frame that needs nearly all of it is served.
    let c = b.conn();
    let r = c.call(&produce_request("big", 0, "after", 100, 8_000));
    assert!(matches!(r, Ok(Response::Produce { .. })), "{r:?}");
    b.stop();
}

#[test]
fn request_memory_must_hold_the_largest_frame() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ringbus"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--max-frame-bytes",
            "4194304",
        ])
        .args(["--request-memory-bytes", "1048576", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("request_memory_bytes"), "{err}");
}

#[test]
fn a_create_that_fails_on_a_shard_leaves_no_topic_behind() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path());
    // A file where partition 1's directory belongs: its shard cannot open it.
    let topic_dir = dir.path().join("topics").join("half");
    std::fs::create_dir_all(&topic_dir).unwrap();
    std::fs::write(topic_dir.join("1"), b"in the way").unwrap();
    let c = b.conn();
    let e = c.create_topic("half", topic(2)).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::StorageError), "{e}");
    assert!(
        !c.list_topics().unwrap().iter().any(|t| t.name == "half"),
        "a failed create must not leave the topic listed"
    );
    assert!(!topic_dir.exists(), "nor its directory");
    // Nothing half-made is in the way: the same create now succeeds and works.
    c.create_topic("half", topic(2)).unwrap();
    for p in 0..2 {
        let r = c.call(&produce_request("half", p, &format!("h{p}"), 3, 10));
        assert!(matches!(r, Ok(Response::Produce { .. })), "{r:?}");
        assert_eq!(read_partition(&b.addr, "half", p).len(), 3);
    }
    b.stop();
}

#[test]
fn a_client_that_stops_reading_is_closed_and_the_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start_with_config(
        dir.path(),
        "write_timeout_ms = 500\nplacement = \"unpinned\"\n",
        &["--cores", "1"],
    );
    let c = b.conn();
    c.create_topic("w", topic(1)).unwrap();
    for i in 0..4 {
        let r = c.call(&produce_request("w", 0, &format!("w{i}"), 100, 10_000));
        assert!(matches!(r, Ok(Response::Produce { .. })), "{r:?}");
    }
    // 50 fetches of the whole 4 MB, and never a byte read back: far more than the
    // socket buffers hold, so the broker's writer blocks.
    let mut lazy = TcpStream::connect(&b.addr).unwrap();
    let mut v = Vec::new();
    for id in 1..=50 {
        let fetch = Request::Fetch {
            topic: "w".into(),
            partition: 0,
            offset: Offset(0),
            max_bytes: 8 << 20,
            max_wait_ms: 0,
        };
        protocol::encode_request(id, &fetch, &mut v);
    }
    lazy.write_all(&v).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // Everyone else is served meanwhile.
    assert_eq!(read_partition(&b.addr, "w", 0).len(), 400);
    // The lazy client finds what was sent before the broker gave up, then the end.
    lazy.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    let r = lazy.read_to_end(&mut got);
    assert!(
        r.is_ok() || matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "connection still open after the write timeout: {r:?} ({} bytes read)",
        got.len()
    );
    assert!(
        got.len() < 50 * 4_000_000,
        "{} bytes: nothing was held back",
        got.len()
    );
    b.stop();
}

#[test]
fn large_fetch_responses_arrive_whole_and_in_order() {
    // The connection writes a response in slices and may yield to the shard's other
    // tasks between them. Six fetches sent at once on one connection, each answered
    // with a batch of about 5 MB (two and a half slices), while a second client
    // produces on the same shard, must come back whole, unmixed and in order. (This
    // guards the slicing; whether a yield happened is not observable here.)
    const RECORDS: usize = 487;
    const VALUE: usize = 10_301;
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start_with_config(dir.path(), "placement = \"unpinned\"\n", &["--cores", "1"]);
    let c = b.conn();
    // Segments that hold all six batches (the harness makes them 1 MiB).
    let cfg = TopicConfig {
        segment_bytes: Some(64 << 20),
        ..topic(2)
    };
    c.create_topic("big", cfg).unwrap();
    for i in 0..6 {
        let r = c.call(&produce_request("big", 0, &format!("b{i}"), RECORDS, VALUE));
        assert!(matches!(r, Ok(Response::Produce { .. })), "{r:?}");
    }
    let addr = b.addr.clone();
    let busy = std::thread::spawn(move || {
        let c = Connection::connect(addr.as_str()).unwrap();
        for i in 0..20 {
            let r = c.call(&produce_request("big", 1, &format!("o{i}"), 100, 10_000));
            assert!(matches!(r, Ok(Response::Produce { .. })), "{r:?}");
        }
    });
    for _ in 0..3 {
        let pending: Vec<_> = (0..6)
            .map(|i| {
                let fetch = Request::Fetch {
                    topic: "big".into(),
                    partition: 0,
                    offset: Offset((i * RECORDS) as u64),
                    max_bytes: 8 << 20,
                    max_wait_ms: 0,
                };
                (i, c.send(&fetch).unwrap())
            })
            .collect();
        for (i, p) in pending {
            // A response cut short would leave the client waiting: fail instead.
            let r = p.wait_timeout(Duration::from_secs(30));
            let Ok(Response::Fetch { records, .. }) = r else {
                panic!("fetch {i}: {r:?}");
            };
            let bytes = records.into_iter().next().unwrap_or_default();
            // At least batch i whole: more than two slices.
            assert!(
                bytes.len() > RECORDS * VALUE,
                "fetch {i}: {} bytes",
                bytes.len()
            );
            let mut recs = Vec::new();
            common::push_values(&[bytes], Offset((i * RECORDS) as u64), &mut recs);
            assert!(recs.len() >= RECORDS, "fetch {i}: {} records", recs.len());
            for (k, (offset, value)) in recs.iter().enumerate() {
                let n = i * RECORDS + k;
                assert_eq!(*offset, Offset(n as u64), "fetch {i}");
                let mut want = format!("b{}-{}", n / RECORDS, n % RECORDS).into_bytes();
                want.resize(VALUE, b'.');
                assert_eq!(value, &want, "fetch {i}, record {n}");
            }
        }
    }
    busy.join().unwrap();
    b.stop();
}

/// Retention by age reaches a partition nobody writes to any more (the periodic
/// check in its group-commit driver), keeps the tail readable, and a topic deleted
/// afterwards leaves no file behind.
#[test]
fn age_retention_expires_an_idle_partition_and_delete_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path());
    let c = b.conn();
    let cfg = TopicConfig {
        partitions: 1,
        segment_bytes: Some(64 * 1024),
        retention_ms: Some(1_000),
        ..TopicConfig::default()
    };
    c.create_topic("aged", cfg).unwrap();
    // Batches well inside the topic's 64 KiB segments.
    let producer = Producer::new(
        &b.addr,
        ProducerConfig {
            batch_bytes: 16 * 1024,
            ..ProducerConfig::default()
        },
    )
    .unwrap();
    let value = vec![b'v'; 4096];
    let pending: Vec<_> = (0..100)
        .map(|_| producer.send("aged", Some(0), None, &value, &[]).unwrap())
        .collect();
    producer.flush();
    for p in pending {
        p.wait().unwrap();
    }
    drop(producer);
    let latest = c.list_offsets("aged", 0, OffsetSpec::Latest).unwrap();
    assert_eq!(latest, Offset(100));
    let part_dir = dir.path().join("topics").join("aged").join("0");
    assert!(
        log_files(&part_dir) >= 5,
        "the data should span several segments"
    );
    // The producer kept its batches to `batch_bytes` (while its sender was busy,
    // records went on queueing behind full batches instead of growing them).
    let mut records = 0;
    for e in std::fs::read_dir(&part_dir).unwrap() {
        let path = e.unwrap().path();
        let Some(base) = path
            .file_name()
            .and_then(|n| ringbus::storage::segment::parse_log_name(n.to_str()?))
        else {
            continue;
        };
        let bytes = std::fs::read(&path).unwrap();
        ringbus::storage::segment::scan(&bytes, 0, Some(base), |b| {
            assert!(
                b.len as usize <= 16 * 1024 + 4096,
                "a batch of {} bytes",
                b.len
            );
            records += b.record_count;
        });
    }
    assert_eq!(records, 100);
    // The check runs every 10 s; every sealed segment is past its age by then.
    let deadline = Instant::now() + Duration::from_secs(30);
    let earliest = loop {
        let e = c.list_offsets("aged", 0, OffsetSpec::Earliest).unwrap();
        if e > Offset(0) || Instant::now() > deadline {
            break e;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(earliest > Offset(0), "nothing expired within 30 s");
    assert_eq!(
        c.list_offsets("aged", 0, OffsetSpec::Latest).unwrap(),
        latest
    );
    // What is left reads back whole, from the new log start to the end.
    let mut consumer = Consumer::new(&b.addr, "aged", 0, earliest).unwrap();
    let mut next = earliest;
    while next < latest {
        let recs = consumer.poll(Duration::from_secs(1)).unwrap();
        assert!(!recs.is_empty(), "stalled at {next}");
        for r in recs {
            assert_eq!(r.offset, next);
            assert_eq!(r.value.as_deref(), Some(&value[..]));
            next = Offset(next.0 + 1);
        }
    }
    c.delete_topic("aged").unwrap();
    assert!(!dir.path().join("topics").join("aged").exists());
    b.stop();
}

/// A producer whose broker stops answering holds at most `buffer_bytes` of
/// records (plus its requests in flight): `send` blocks instead of queueing
/// without bound, and every record goes out once the broker is back.
#[test]
fn a_producer_blocks_once_its_buffer_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path());
    b.conn().create_topic("bp", topic(1)).unwrap();
    let config = ProducerConfig {
        batch_bytes: 16 * 1024,
        buffer_bytes: 256 * 1024,
        in_flight: 2,
        linger: Duration::from_millis(1),
        ..ProducerConfig::default()
    };
    let producer = Producer::new(&b.addr, config).unwrap();
    let signal = |sig: &str| b.signal(sig);
    signal("-STOP");
    let sent = Arc::new(AtomicUsize::new(0));
    let total = 2_000;
    let sender = {
        let sent = sent.clone();
        std::thread::spawn(move || {
            let value = vec![b'x'; 4096];
            let receipts: Vec<_> = (0..total)
                .map(|_| {
                    let r = producer.send("bp", Some(0), None, &value, &[]).unwrap();
                    sent.fetch_add(1, Ordering::SeqCst);
                    r
                })
                .collect();
            receipts
                .into_iter()
                .map(|r| r.wait().unwrap().1)
                .collect::<Vec<_>>()
        })
    };
    std::thread::sleep(Duration::from_millis(1_500));
    let queued = sent.load(Ordering::SeqCst);
    // 256 KiB buffered, two 16 KiB requests in flight, and whatever the sockets
    // hold (a few MB at most): far from all 8 MB.
    assert!(
        queued < total,
        "send never blocked ({queued} records queued)"
    );
    assert!(queued >= 256 * 1024 / 4200, "only {queued} records queued");
    signal("-CONT");
    let offsets = sender.join().unwrap();
    assert_eq!(offsets.len(), total);
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "out of order");
    b.stop();
}

/// `flush` returns only once every record sent before it is answered: each
/// receipt holds its offset at once, and the offsets cover each partition.
#[test]
fn flush_returns_once_every_receipt_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path());
    b.conn().create_topic("fl", topic(2)).unwrap();
    let producer = Producer::new(
        &b.addr,
        ProducerConfig {
            batch_bytes: 16 * 1024,
            in_flight: 4,
            durability: Durability::Fsync,
            ..ProducerConfig::default()
        },
    )
    .unwrap();
    let value = vec![b'f'; 1000];
    let total = 3_000u32;
    let mut receipts: Vec<_> = (0..total)
        .map(|i| producer.send("fl", Some(i % 2), None, &value, &[]).unwrap())
        .collect();
    producer.flush();
    let mut offsets = [Vec::new(), Vec::new()];
    for (i, r) in receipts.iter_mut().enumerate() {
        let got = r.try_wait();
        let Some(Ok((p, o))) = got else {
            panic!("receipt {i} not answered after flush: {got:?}");
        };
        assert_eq!(*p, i as u32 % 2);
        offsets[*p as usize].push(o.0);
    }
    for o in offsets {
        assert_eq!(o, (0..u64::from(total / 2)).collect::<Vec<_>>());
    }
    // A flush with nothing queued returns at once, and a receipt read early still
    // gives its answer to `wait`.
    producer.flush();
    let last = receipts.pop().unwrap().wait().unwrap();
    assert_eq!(last, (1, Offset(u64::from(total / 2) - 1)));
    b.stop();
}

/// A loopback proxy to `target` that cuts its first connection (both ways) once
/// `cut_after` bytes went from the client to the broker; later connections pass.
/// Returns its address and the count of connections it took.
fn cutting_proxy(target: String, cut_after: usize) -> (String, Arc<AtomicUsize>) {
    use std::net::{Shutdown, TcpListener};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let count = Arc::new(AtomicUsize::new(0));
    let taken = count.clone();
    std::thread::spawn(move || {
        for (n, client) in listener.incoming().enumerate() {
            let Ok(client) = client else { return };
            taken.fetch_add(1, Ordering::SeqCst);
            let Ok(server) = TcpStream::connect(&target) else {
                return;
            };
            let limit = if n == 0 { cut_after } else { usize::MAX };
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            // Broker to client, as it comes.
            std::thread::spawn(move || {
                let (mut from, mut to) = (s2, c2);
                let _ = std::io::copy(&mut from, &mut to);
                let _ = to.shutdown(Shutdown::Both);
            });
            // Client to broker, up to the limit.
            std::thread::spawn(move || {
                let (mut from, mut to) = (client, server);
                let mut buf = vec![0u8; 16 * 1024];
                let mut passed = 0;
                while let Ok(k) = from.read(&mut buf) {
                    let k = k.min(limit - passed);
                    if k == 0 || to.write_all(&buf[..k]).is_err() {
                        break;
                    }
                    passed += k;
                }
                let _ = to.shutdown(Shutdown::Both);
                let _ = from.shutdown(Shutdown::Both);
            });
        }
    });
    (addr, count)
}

/// When the connection fails with requests in flight, the producer sends them all
/// again in order before anything newer: a record may be stored twice
/// (at-least-once), but none lands before an older record of its partition was
/// stored, and every acknowledged record is there.
#[test]
fn a_lost_connection_resends_in_flight_batches_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path());
    b.conn().create_topic("rs", topic(1)).unwrap();
    let (proxy, connections) = cutting_proxy(b.addr.clone(), 600 * 1024);
    let producer = Producer::new(
        &proxy,
        ProducerConfig {
            batch_bytes: 16 * 1024,
            in_flight: 8,
            linger: Duration::from_millis(1),
            ..ProducerConfig::default()
        },
    )
    .unwrap();
    let total = 3_000u32;
    let receipts: Vec<_> = (0..total)
        .map(|i| {
            let mut v = format!("{i:08}").into_bytes();
            v.resize(1000, b'.');
            producer.send("rs", Some(0), None, &v, &[]).unwrap()
        })
        .collect();
    producer.flush();
    for (i, r) in receipts.into_iter().enumerate() {
        r.wait()
            .unwrap_or_else(|e| panic!("record {i} was not acknowledged: {e}"));
    }
    let stored: Vec<u32> = read_partition(&b.addr, "rs", 0)
        .iter()
        .map(|(_, v)| std::str::from_utf8(&v[..8]).unwrap().parse().unwrap())
        .collect();
    assert!(
        connections.load(Ordering::SeqCst) >= 2,
        "the producer never reconnected"
    );
    // First occurrences, in log order, must be 0, 1, 2, ...
    let mut seen = vec![false; total as usize];
    let mut firsts = Vec::new();
    for &v in &stored {
        if !std::mem::replace(&mut seen[v as usize], true) {
            firsts.push(v);
        }
    }
    assert_eq!(firsts.len(), total as usize, "records lost");
    if let Some(w) = firsts.windows(2).find(|w| w[1] != w[0] + 1) {
        panic!("record {} was stored before record {}", w[1], w[0] + 1);
    }
    b.stop();
}

/// A delete that fails partway (a file that cannot be removed) reports the error
/// and leaves the topic gone; a topic created again under that name starts empty
/// instead of recovering what the failed delete left.
#[test]
fn a_topic_created_after_a_failed_delete_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path());
    let c = b.conn();
    c.create_topic("again", topic(1)).unwrap();
    let p = Producer::new(&b.addr, ProducerConfig::default()).unwrap();
    for i in 0..50u32 {
        p.send("again", Some(0), None, format!("old{i}").as_bytes(), &[])
            .unwrap();
    }
    p.flush();
    drop(p);
    let seg = dir
        .path()
        .join("topics/again/0")
        .join(format!("{:020}.log", 0));
    let chattr = |flag: &str| chattr(flag, &seg);
    assert!(chattr("+i"), "chattr +i failed (needs ext4 and e2fsprogs)");
    let deleted = c.delete_topic("again");
    assert!(chattr("-i"));
    assert!(
        deleted.is_err(),
        "the delete could not have removed every file"
    );
    assert!(seg.exists());
    assert!(c.list_topics().unwrap().iter().all(|t| t.name != "again"));
    c.create_topic("again", topic(1)).unwrap();
    assert_eq!(
        c.list_offsets("again", 0, OffsetSpec::Latest).unwrap(),
        Offset(0),
        "the new topic recovered the old one's records"
    );
    let p = Producer::new(&b.addr, ProducerConfig::default()).unwrap();
    let r = p.send("again", Some(0), None, b"new", &[]).unwrap();
    assert_eq!(r.wait().unwrap(), (0, Offset(0)));
    drop(p);
    let got = read_partition(&b.addr, "again", 0);
    assert_eq!(got, vec![(Offset(0), b"new".to_vec())]);
    b.stop();
}

/// A full buffer sends the open batches at once: with a linger far longer than
/// the run, `send` still goes on as fast as the broker answers.
#[test]
fn a_full_buffer_sends_open_batches_before_their_linger() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path());
    b.conn().create_topic("full", topic(1)).unwrap();
    let linger = Duration::from_secs(30);
    let producer = Producer::new(
        &b.addr,
        ProducerConfig {
            batch_bytes: 1 << 20,
            buffer_bytes: 64 * 1024,
            linger,
            ..ProducerConfig::default()
        },
    )
    .unwrap();
    let started = Instant::now();
    let value = vec![b'v'; 1000];
    let receipts: Vec<_> = (0..1_000)
        .map(|_| producer.send("full", Some(0), None, &value, &[]).unwrap())
        .collect();
    // 1 MB through a 64 KiB buffer: at least 15 times the buffer filled.
    assert!(
        started.elapsed() < linger,
        "send waited for the linger when the buffer was full"
    );
    producer.flush();
    let offsets: Vec<u64> = receipts
        .into_iter()
        .map(|r| r.wait().unwrap().1 .0)
        .collect();
    assert_eq!(offsets, (0..1_000).collect::<Vec<_>>());
    b.stop();
}

/// `flush` waits for the records sent before it, not for those other threads keep
/// sending meanwhile.
#[test]
fn flush_is_not_held_up_by_other_threads_sends() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path());
    b.conn().create_topic("busy", topic(2)).unwrap();
    let producer = Arc::new(
        Producer::new(
            &b.addr,
            ProducerConfig {
                linger: Duration::from_millis(2),
                ..ProducerConfig::default()
            },
        )
        .unwrap(),
    );
    let (stop, done) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let other = {
        let (producer, stop, done) = (producer.clone(), stop.clone(), done.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut sent = 0u64;
            while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(20) {
                producer.send("busy", Some(1), None, b"other", &[]).unwrap();
                sent += 1;
            }
            done.store(true, Ordering::SeqCst);
            sent
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let mut mine = producer.send("busy", Some(0), None, b"mine", &[]).unwrap();
    producer.flush();
    assert!(
        !done.load(Ordering::SeqCst),
        "flush returned only once the other thread stopped sending"
    );
    assert!(matches!(mine.try_wait(), Some(Ok((0, Offset(0))))));
    stop.store(true, Ordering::SeqCst);
    assert!(other.join().unwrap() > 0);
    producer.flush();
    b.stop();
}

/// A broker that stops answering fails a request with `Timeout` once its
/// `request_timeout` passed; once the broker answers again, the
/// same producer goes on.
#[test]
fn a_request_that_is_never_answered_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path());
    b.conn().create_topic("hung", topic(1)).unwrap();
    let producer = Producer::new(
        &b.addr,
        ProducerConfig {
            request_timeout: Duration::from_millis(300),
            // With retries, the last error would be the reconnect's (a stopped
            // broker's kernel still accepts, but the handshake is not answered).
            retries: 0,
            linger: Duration::from_millis(1),
            ..ProducerConfig::default()
        },
    )
    .unwrap();
    let signal = |sig: &str| b.signal(sig);
    signal("-STOP");
    let r = producer.send("hung", Some(0), None, b"lost", &[]).unwrap();
    producer.flush();
    let got = r.wait();
    signal("-CONT");
    assert!(
        matches!(got, Err(ringbus::client::ClientError::Timeout(_))),
        "{got:?}"
    );
    let r = producer.send("hung", Some(0), None, b"after", &[]).unwrap();
    let (_, at) = r.wait().unwrap();
    let got = read_partition(&b.addr, "hung", 0);
    assert_eq!(got.last().unwrap(), &(at, b"after".to_vec()));
    b.stop();
}

/// `--recovery full` validates every batch at start-up: damage inside a sealed
/// segment, before its last index entry, is reported as the broker starts, where the
/// default recovery (from each segment's last good index entry) does not read it.
#[test]
fn full_recovery_reports_damage_that_the_default_does_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let b = Broker::start_with(&data, &["--cores", "1"]);
    let c = b.conn();
    c.create_topic("r", small_segments()).unwrap();
    // 20 batches of 10 KB: several sealed segments of a few batches each.
    for i in 0..20 {
        let r = c.call(&produce_request("r", 0, &format!("b{i}"), 10, 1000));
        assert!(matches!(r, Ok(Response::Produce { .. })), "{r:?}");
    }
    drop(c);
    b.stop();
    let seg = data.join("topics/r/0").join(format!("{:020}.log", 0));
    let mut bytes = std::fs::read(&seg).unwrap();
    // Several batches, and trimmed to its length at the stop.
    assert!(
        bytes.len() > 40 * 1024 && bytes.len() < 64 * 1024,
        "{}",
        bytes.len()
    );
    let segments = log_files(&data.join("topics/r/0"));
    assert!(segments >= 3, "{segments} segments");
    // Inside the first batch's records (after its 64-byte header).
    bytes[200] ^= 0xff;
    std::fs::write(&seg, &bytes).unwrap();
    // Every start keeps every batch after the damaged first one, in every segment.
    let log_of_start = |extra: &[&str], name: &str| -> String {
        let path = dir.path().join(name);
        let log = std::fs::File::create(&path).unwrap();
        let b = Broker::start_logging(&data, extra, Stdio::from(log));
        let mut c = Consumer::new(&b.addr, "r", 0, Offset(10)).unwrap();
        let mut values = Vec::new();
        loop {
            let recs = c.poll(Duration::ZERO).unwrap();
            if recs.is_empty() {
                break;
            }
            values.extend(recs.into_iter().map(|r| (r.offset, r.value.unwrap())));
        }
        assert_eq!(values.len(), 190, "{name}: records after the damaged batch");
        for (k, (offset, v)) in values.iter().enumerate() {
            let k = k as u64 + 10;
            assert_eq!(*offset, Offset(k));
            assert!(v.starts_with(format!("b{}-{}.", k / 10, k % 10).as_bytes()));
        }
        drop(c);
        b.stop();
        std::fs::read_to_string(&path).unwrap()
    };
    let default = log_of_start(&["--cores", "1"], "default.log");
    assert!(!default.contains("recovered with repairs"), "{default}");
    let full = log_of_start(&["--cores", "1", "--recovery", "full"], "full.log");
    assert!(
        full.contains("recovered with repairs") && full.contains("ChecksumMismatch"),
        "{full}"
    );
    assert!(!full.contains("truncated a torn"), "{full}");
    assert_eq!(std::fs::read(&seg).unwrap(), bytes, "segment 0 was changed");
    assert_eq!(
        log_files(&data.join("topics/r/0")),
        segments,
        "a segment was dropped"
    );
}

/// A topic of many partitions reserves a few MiB of disk per partition, not a
/// whole segment each: 100 partitions of 1 GiB segments used to reserve 100 GiB at
/// creation (and a topic of 400 partitions of the default 256 MiB failed with
/// ENOSPC on a disk with 73 GiB free).
#[test]
fn a_topic_of_many_partitions_reserves_little_disk() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path());
    let c = b.conn();
    let cfg = TopicConfig {
        partitions: 100,
        segment_bytes: Some(1 << 30),
        ..TopicConfig::default()
    };
    c.create_topic("wide", cfg).unwrap();
    one_record_each(&b.addr, "wide", 100, b"x");
    use std::os::unix::fs::MetadataExt;
    let (mut logs, mut reserved) = (0, 0);
    for part in 0..100 {
        for e in std::fs::read_dir(dir.path().join(format!("topics/wide/{part}"))).unwrap() {
            let path = e.unwrap().path();
            if path.extension().is_some_and(|x| x == "log") {
                let m = std::fs::metadata(&path).unwrap();
                assert_eq!(m.len(), 1 << 30, "a segment is its full length");
                logs += 1;
                reserved += m.blocks() * 512;
            }
        }
    }
    assert_eq!(logs, 100);
    assert!(reserved <= 100 * (5 << 20), "{reserved} bytes reserved");
    assert_eq!(
        read_partition(&b.addr, "wide", 42),
        vec![(Offset(0), b"x".to_vec())]
    );
    // A busy partition's driver reserves ahead of its appends: after 12 MB, the
    // reserved part has doubled from 4 to 32 MiB (a write into a hole would take
    // only the blocks it writes).
    for i in 0..12 {
        let r = c.call(&produce_request("wide", 0, &format!("big{i}"), 1000, 1000));
        assert!(matches!(r, Ok(Response::Produce { .. })), "{r:?}");
    }
    let log = dir.path().join(format!("topics/wide/0/{:020}.log", 0));
    let started = Instant::now();
    let reserved = loop {
        let n = std::fs::metadata(&log).unwrap().blocks() * 512;
        if n >= 24 << 20 || started.elapsed() > Duration::from_secs(10) {
            break n;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        reserved >= 24 << 20,
        "{reserved} bytes reserved after 12 MB"
    );
    b.stop();
}

/// The broker raises its open-files limit to the hard one: started with a soft
/// limit of 256, it still serves a topic of 300 partitions (each with three segment
/// files open, plus two for writes once it takes data), where it used to fail the
/// creation with EMFILE.
#[test]
fn the_broker_raises_its_open_files_limit() {
    let dir = tempfile::tempdir().unwrap();
    // Where the hard limit itself is low, as many partitions as it can hold.
    let (_, hard) = rlimit::Resource::NOFILE.get().unwrap();
    let soft = 256.min(hard / 2);
    let parts = 300.min(u32::try_from(hard / 8).unwrap_or(u32::MAX));
    assert!(
        u64::from(parts) * 3 > soft,
        "hard limit {hard} too low to test"
    );
    let mut sh = Command::new("sh");
    let script = format!("ulimit -S -n {soft} && exec \"$0\" \"$@\"");
    sh.args(["-c", &script, env!("CARGO_BIN_EXE_ringbus")]);
    let b = Broker::start_command(sh, dir.path(), &[], Stdio::inherit());
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", b.child.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_owned();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        fields[3], fields[4],
        "soft limit raised to the hard one: {line}"
    );
    let c = b.conn();
    c.create_topic("many", topic(parts)).unwrap();
    one_record_each(&b.addr, "many", parts, b"y");
    assert_eq!(
        read_partition(&b.addr, "many", parts - 1),
        vec![(Offset(0), b"y".to_vec())]
    );
    b.stop();
}

/// A partition fenced by a failed write (its segment file made immutable) refuses
/// appends, keeps its shard serving the others, also while a consumer long-polls
/// it (that poll used to spin and hold the whole shard until its deadline), and
/// is reopened from the disk by itself once writes work again: no restart.
#[test]
fn a_fenced_partition_is_reopened_once_writes_work_again() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start_with(dir.path(), &["--cores", "1"]);
    let c = b.conn();
    c.create_topic("f", topic(2)).unwrap();
    let produce = |p: u32, tag: &str| c.call(&produce_request("f", p, tag, 10, 100));
    for p in 0..2 {
        let r = produce(p, "first");
        assert!(matches!(r, Ok(Response::Produce { .. })), "{r:?}");
    }
    let seg = dir.path().join(format!("topics/f/0/{:020}.log", 0));
    let chattr = |flag: &str| chattr(flag, &seg);
    assert!(chattr("+i"), "chattr +i failed (needs ext4 and e2fsprogs)");
    let failed = produce(0, "lost");
    assert!(failed.is_err(), "{failed:?}");
    // A consumer long-polls the fenced partition for 20 s ...
    let addr = b.addr.clone();
    let poll = std::thread::spawn(move || {
        Connection::connect(addr.as_str())
            .unwrap()
            .call(&Request::Fetch {
                topic: "f".into(),
                partition: 0,
                offset: Offset(10),
                max_bytes: 1 << 20,
                max_wait_ms: 20_000,
            })
    });
    std::thread::sleep(Duration::from_millis(200));
    // ... while the shard goes on serving the other partition.
    let started = Instant::now();
    let r = produce(1, "other");
    assert!(matches!(r, Ok(Response::Produce { .. })), "{r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the other partition waited {:?}",
        started.elapsed()
    );
    assert!(chattr("-i"));
    // Reopened within its first retries (after 1 s, then 2 s, ...).
    let started = Instant::now();
    let reopened = loop {
        match produce(0, "after") {
            Ok(Response::Produce { base_offsets, .. }) => break base_offsets[0],
            other => {
                assert!(
                    started.elapsed() < Duration::from_secs(15),
                    "still refused: {other:?}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    assert_eq!(reopened, Offset(10), "the refused batch is not in the log");
    let values: Vec<String> = read_partition(&b.addr, "f", 0)
        .into_iter()
        .map(|(_, v)| String::from_utf8(v).unwrap())
        .collect();
    assert_eq!(values.len(), 20);
    assert!(values[..10].iter().all(|v| v.starts_with("first-")));
    assert!(values[10..].iter().all(|v| v.starts_with("after-")));
    let polled = poll.join().unwrap();
    assert!(matches!(polled, Ok(Response::Fetch { .. })), "{polled:?}");
    b.stop();
}
