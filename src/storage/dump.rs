//! The operator's view of a segment: every batch (offsets, size, timestamps, CRC
//! status) and the index entries, as printed by `ringbus segdump` and
//! `tools/segdump`. Reads files only; never modifies them.

use crate::batch::{self, BatchRef};
use crate::storage::index;
use crate::storage::segment::{self, ScanStop};
use std::fmt::Write as _;
use std::path::Path;

/// Renders the dump of the `.log` file at `path` (and its `.index`/`.timeindex`
/// beside it) as text. With `records`, also prints each record's key, value size
/// and headers.
pub fn dump_segment(path: &Path, records: bool) -> std::io::Result<String> {
    let bytes = std::fs::read(path)?;
    let mut out = String::new();
    let base = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(segment::parse_log_name);
    let _ = writeln!(out, "segment {} ({} bytes)", path.display(), bytes.len());
    // A recycled file holds its earlier segment's batches after its own, until
    // recovery or the writes of this segment cover them.
    let recycled = segment::is_recycled(path);
    if recycled {
        let _ = writeln!(
            out,
            "recycled file: what follows its last batch in sequence is its earlier contents"
        );
    }
    let mut pos = 0usize;
    let mut batches = 0u64;
    let mut expected = base;
    loop {
        let rest = &bytes[pos..];
        if rest.is_empty() {
            let _ = writeln!(out, "end of file at byte {pos}");
            break;
        }
        let starts_next = expected.is_none_or(|e| {
            rest.get(batch::BASE_OFFSET_POS..batch::BASE_OFFSET_POS + 8)
                .is_some_and(|b| b == e.0.to_le_bytes())
        });
        if recycled && !starts_next && segment::nonzero_end(rest) > 0 {
            let _ = writeln!(
                out,
                "earlier contents of the recycled file from byte {pos} to {} (not data)",
                pos + segment::nonzero_end(rest)
            );
            break;
        }
        if rest[..rest.len().min(batch::HEADER_LEN)]
            .iter()
            .all(|&b| b == 0)
        {
            let nz = segment::nonzero_end(rest);
            let _ = writeln!(
                out,
                "zeros from byte {pos} (preallocated space){}",
                if nz > 0 {
                    format!("; NON-ZERO bytes up to {}", pos + nz)
                } else {
                    String::new()
                }
            );
            break;
        }
        let len = match batch::check_header(rest) {
            Ok(l) => l,
            Err(e) => {
                let _ = writeln!(out, "INVALID batch at byte {pos}: {e}");
                break;
            }
        };
        let h = batch::header(rest).expect("header checked");
        let crc = batch::compute_crc(&rest[..len]);
        let crc_status = if crc == h.crc.get() {
            "ok".to_string()
        } else {
            format!("MISMATCH (computed {crc:#010x})")
        };
        let base_off = h.base_offset.get();
        let last = base_off.saturating_add(u64::from(h.last_offset_delta.get()));
        let gap = match expected {
            Some(e) if e.0 != base_off => format!(" OFFSET GAP (expected {e})"),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "batch pos={pos} len={len} offsets={base_off}..={last} records={} first_ts={} max_ts={} producer={} crc={:#010x} {crc_status}{gap}",
            h.record_count.get(),
            h.first_timestamp.get(),
            h.max_timestamp.get(),
            h.producer_id.get(),
            h.crc.get(),
        );
        if records && crc == h.crc.get() {
            match BatchRef::parse_full(rest) {
                Ok(b) => {
                    for r in b.records().flatten() {
                        let _ = write!(
                            out,
                            "  record offset={} ts={} key={} value_bytes={}",
                            r.offset,
                            r.timestamp.0,
                            r.key
                                .map_or("null".into(), |k| String::from_utf8_lossy(k).into_owned()),
                            r.value.map_or(0, <[u8]>::len)
                        );
                        for hd in r.headers().flatten() {
                            let _ = write!(
                                out,
                                " {}={}",
                                hd.key,
                                hd.value
                                    .map_or("null".into(), |v| String::from_utf8_lossy(v)
                                        .into_owned())
                            );
                        }
                        out.push('\n');
                    }
                }
                Err(e) => {
                    let _ = writeln!(out, "  records invalid: {e}");
                }
            }
        }
        batches += 1;
        expected = last.checked_add(1).map(crate::Offset);
        pos += len;
    }
    let _ = writeln!(out, "{batches} batches");
    // Cross-check with the validating scanner used by recovery.
    let s = segment::scan(&bytes, 0, base, |_| {});
    let verdict = match &s.stop {
        ScanStop::End | ScanStop::Zeros | ScanStop::Stopped => "clean".to_string(),
        other => format!("recovery would stop at byte {}: {other:?}", s.end),
    };
    let _ = writeln!(
        out,
        "scan: {} valid batches, valid end at byte {}, {verdict}",
        s.batches, s.end
    );

    let dir = path.parent().unwrap_or(Path::new("."));
    if let Some(base) = base {
        match std::fs::read(segment::index_path(dir, base)) {
            Ok(ix) => match index::decode_index(&ix, bytes.len() as u64) {
                Some(entries) => {
                    let _ = writeln!(out, "index: {} entries", entries.len());
                    for e in entries {
                        let _ = writeln!(
                            out,
                            "  offset={} (rel {}) pos={}",
                            base.0 + u64::from(e.relative_offset),
                            e.relative_offset,
                            e.position
                        );
                    }
                }
                None => {
                    let _ = writeln!(
                        out,
                        "index: DAMAGED ({} bytes); recovery rebuilds it",
                        ix.len()
                    );
                }
            },
            Err(e) => {
                let _ = writeln!(out, "index: missing ({e})");
            }
        }
        match std::fs::read(segment::time_index_path(dir, base)) {
            Ok(tx) => match index::decode_time_index(&tx, u32::MAX) {
                Some(entries) => {
                    let _ = writeln!(out, "time index: {} entries", entries.len());
                    for e in entries {
                        let _ = writeln!(
                            out,
                            "  max_ts={} offset={}",
                            e.max_timestamp.0,
                            base.0 + u64::from(e.relative_offset)
                        );
                    }
                }
                None => {
                    let _ = writeln!(out, "time index: DAMAGED ({} bytes)", tx.len());
                }
            },
            Err(e) => {
                let _ = writeln!(out, "time index: missing ({e})");
            }
        }
    }
    Ok(out)
}
