//! Latency histograms (hdrhistogram, nanoseconds) and the run's report: the text
//! table printed at the end and the `--json` document.

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Quantiles reported for every latency, with their JSON names.
pub const QUANTILES: [(&str, f64); 5] = [
    ("p50", 0.50),
    ("p90", 0.90),
    ("p99", 0.99),
    ("p99_9", 0.999),
    ("p99_99", 0.9999),
];

/// A latency histogram in nanoseconds, 1 ns to 1 hour, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds")
}

/// Records a latency, clamped into the histogram's range.
pub fn record(h: &mut Histogram<u64>, ns: u64) {
    let _ = h.record(ns.clamp(1, h.high()));
}

/// Quantiles in microseconds, or `null` when nothing was recorded.
pub fn latency_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return Value::Null;
    }
    let mut m = serde_json::Map::new();
    for (name, q) in QUANTILES {
        m.insert(name.into(), json!(us(h.value_at_quantile(q))));
    }
    m.insert("max".into(), json!(us(h.max())));
    m.insert(
        "mean".into(),
        json!((h.mean() / 1000.0 * 10.0).round() / 10.0),
    );
    m.insert("count".into(), json!(h.len()));
    Value::Object(m)
}

/// One line of a latency table: `p50 …  p90 …` in microseconds.
pub fn latency_line(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "no samples".into();
    }
    let mut s = String::new();
    for (name, q) in QUANTILES {
        s.push_str(&format!(
            "{}={} ",
            name.replace('_', "."),
            us(h.value_at_quantile(q))
        ));
    }
    s.push_str(&format!("max={} (us, {} samples)", us(h.max()), h.len()));
    s
}

fn us(ns: u64) -> f64 {
    (ns as f64 / 100.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_out_in_microseconds() {
        let mut h = histogram();
        for i in 1..=10_000u64 {
            record(&mut h, i * 1000); // 1 us .. 10 ms
        }
        let j = latency_json(&h);
        let p50 = j["p50"].as_f64().unwrap();
        let p99 = j["p99"].as_f64().unwrap();
        assert!((p50 - 5000.0).abs() / 5000.0 < 0.01, "{p50}");
        assert!((p99 - 9900.0).abs() / 9900.0 < 0.01, "{p99}");
        assert!(j["max"].as_f64().unwrap() >= 9990.0);
        assert_eq!(j["count"], 10_000);
        assert!(latency_json(&histogram()).is_null());
        assert!(latency_line(&h).starts_with("p50="));
    }
}
