//! Runs the real `ringbus-loadgen` binary against an embedded broker and checks its
//! JSON report: counts, verification, rates and latency fields.

use serde_json::Value;
use std::process::Command;

fn loadgen(args: &[&str]) -> (std::process::Output, Option<Value>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("out.json");
    let out = Command::new(env!("CARGO_BIN_EXE_ringbus-loadgen"))
        .args(["--broker-tail-cache-bytes", "67108864"])
        .args(["--embedded", "--broker-cores", "2", "--quiet", "--json"])
        .arg(&json)
        .args(args)
        .output()
        .expect("run ringbus-loadgen");
    let v = std::fs::read_to_string(&json)
        .ok()
        .map(|s| serde_json::from_str(&s).expect("valid JSON"));
    (out, v)
}

fn ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "loadgen failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn max_rate_run_verifies_every_message_across_partitions() {
    let (out, v) = loadgen(&[
        "--producers",
        "2",
        "--consumers",
        "2",
        "--partitions",
        "4",
        "--message-size",
        "100",
        "--batch-size",
        "100",
        "--messages",
        "20000",
        "--durability",
        "memory",
    ]);
    ok(&out);
    let v = v.expect("json written");
    assert_eq!(v["produced_msgs"], 20000);
    assert_eq!(v["consumed_msgs"], 20000);
    assert_eq!(v["verified"], true);
    assert!(v["failure"].is_null());
    assert!(v["produce_msgs_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["consume_mb_per_s"].as_f64().unwrap() > 0.0);
    for field in ["produce_ack_us", "end_to_end_us"] {
        let h = &v[field];
        let (p50, p99, p9999, max) = (
            h["p50"].as_f64().unwrap(),
            h["p99"].as_f64().unwrap(),
            h["p99_99"].as_f64().unwrap(),
            h["max"].as_f64().unwrap(),
        );
        assert!(
            0.0 < p50 && p50 <= p99 && p99 <= p9999 && p9999 <= max,
            "{field}: {h}"
        );
        assert_eq!(h["count"], 20000, "{field}");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("produce:") && text.contains("end-to-end latency"),
        "{text}"
    );
}

#[test]
fn fixed_rate_run_holds_the_rate_and_measures_from_intended_times() {
    let (out, v) = loadgen(&[
        "--rate",
        "20000",
        "--duration",
        "2s",
        "--batch-size",
        "50",
        "--linger-us",
        "2000",
        "--message-size",
        "256",
        "--durability",
        "memory",
    ]);
    ok(&out);
    let v = v.expect("json written");
    let produced = v["produced_msgs"].as_f64().unwrap();
    assert!(
        (32_000.0..=44_000.0).contains(&produced),
        "{produced} messages in 2 s at 20k/s"
    );
    let rate = v["produce_msgs_per_s"].as_f64().unwrap();
    assert!((15_000.0..=25_000.0).contains(&rate), "rate {rate}");
    assert_eq!(v["consumed_msgs"], v["produced_msgs"]);
    // Every message waits for its batch to fill (50 messages at 20k/s = 2.5 ms, cut
    // at the 2 ms linger), so latency from the intended time is at least most of that
    // for the first messages of each batch.
    assert!(
        v["produce_ack_us"]["p90"].as_f64().unwrap() >= 1000.0,
        "{}",
        v["produce_ack_us"]
    );
}

/// Milliseconds since the Unix epoch, now.
fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as f64
}

#[test]
fn timeline_lists_every_acknowledged_batch_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("timeline.csv");
    let before_ms = unix_ms();
    let (out, v) = loadgen(&[
        "--rate",
        "20000",
        "--messages",
        "20000",
        "--batch-size",
        "100",
        "--linger-us",
        "1000",
        "--message-size",
        "128",
        "--durability",
        "memory",
        "--timeline",
        path.to_str().unwrap(),
    ]);
    ok(&out);
    let after_ms = unix_ms();
    let v = v.expect("json written");
    let text = std::fs::read_to_string(&path).expect("timeline written");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("ack_ms,ack_unix_ms,oldest_us,records"));
    let (mut records, mut last_ms) = (0u64, 0.0f64);
    let (mut clock_offset, mut oldest) = (None::<f64>, Vec::new());
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), 4, "{line}");
        let ack_ms: f64 = f[0].parse().unwrap();
        let unix_ms: f64 = f[1].parse().unwrap();
        let oldest_us: u64 = f[2].parse().unwrap();
        let n: u64 = f[3].parse().unwrap();
        assert!(ack_ms >= last_ms, "rows out of order: {line}");
        assert!(
            (before_ms - 1000.0..=after_ms + 1000.0).contains(&unix_ms),
            "wall clock {unix_ms} outside the run ({before_ms}..{after_ms})"
        );
        // Both columns are the same instant on two clocks.
        let offset = unix_ms - ack_ms;
        let first = *clock_offset.get_or_insert(offset);
        assert!((offset - first).abs() < 0.01, "clock offset moved: {line}");
        assert!((1..=100).contains(&n), "{line}");
        // The oldest message waited at least for the batch's round trip through the
        // broker, and far less than the run took.
        assert!((1..10_000_000).contains(&oldest_us), "{line}");
        oldest.push(oldest_us);
        last_ms = ack_ms;
        records += n;
    }
    assert_eq!(records, 20_000, "every acknowledged message is in a row");
    assert_eq!(v["consumed_msgs"].as_u64(), Some(20_000));
    // At 20 messages per ms, a batch of 100 never fills before its 1 ms linger, so
    // a typical batch's oldest message waited at least the linger.
    oldest.sort_unstable();
    let median = oldest[oldest.len() / 2];
    assert!(
        median >= 1000,
        "median oldest {median} us, under the linger"
    );
}

#[test]
fn catch_up_consumer_reads_the_backlog_after_the_producers() {
    let (out, v) = loadgen(&["--messages", "5000", "--catch-up", "--message-size", "512"]);
    ok(&out);
    let v = v.expect("json written");
    assert_eq!(v["consumed_msgs"], 5000);
    assert!(
        v["end_to_end_us"].is_null(),
        "no end-to-end latency when catching up"
    );
    assert!(v["consume_mb_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn bad_options_fail_with_a_message() {
    let (out, v) = loadgen(&["--message-size", "10", "--messages", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 24"));
    assert!(v.is_none());
    let out = Command::new(env!("CARGO_BIN_EXE_ringbus-loadgen"))
        .args(["--messages", "1"])
        .output()
        .expect("run");
    assert!(
        !out.status.success(),
        "neither --addr nor --embedded must fail"
    );
}
