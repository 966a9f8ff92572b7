//! The record-batch byte format: header layout, validation, record iteration and the
//! client-side builder. Pure functions on bytes; no I/O, no allocation on the read side.
//!
//! `docs/FORMAT.md` draws the same layout byte by byte. In short: a 64-byte
//! little-endian header, then `record_count` records encoded exactly as Kafka v2
//! records are (zigzag varints, key, value, headers). The CRC-32 (IEEE, crc32fast)
//! covers every byte after the CRC field, so the broker stamps `base_offset` without
//! recomputing it; `base_offset` and `batch_len` are checked by the log instead
//! (offset continuity, bounds).

use crate::limits;
use crate::types::{Offset, TimestampMs};
use zerocopy::little_endian::{I16, I32, I64, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The only batch format version this build reads and writes.
pub const MAGIC: u8 = 1;

// Field positions, each derived from the one before (STYLE 1).
pub const BASE_OFFSET_POS: usize = 0;
pub const BATCH_LEN_POS: usize = BASE_OFFSET_POS + 8;
pub const CRC_POS: usize = BATCH_LEN_POS + 4;
/// The first byte the CRC covers.
pub const CRC_START: usize = CRC_POS + 4;
pub const MAGIC_POS: usize = CRC_START;
pub const FLAGS_POS: usize = MAGIC_POS + 1;
pub const ATTRIBUTES_POS: usize = FLAGS_POS + 1;
pub const RECORD_COUNT_POS: usize = ATTRIBUTES_POS + 2;
pub const LAST_OFFSET_DELTA_POS: usize = RECORD_COUNT_POS + 4;
pub const RESERVED_POS: usize = LAST_OFFSET_DELTA_POS + 4;
pub const FIRST_TIMESTAMP_POS: usize = RESERVED_POS + 4;
pub const MAX_TIMESTAMP_POS: usize = FIRST_TIMESTAMP_POS + 8;
pub const PRODUCER_ID_POS: usize = MAX_TIMESTAMP_POS + 8;
pub const PRODUCER_EPOCH_POS: usize = PRODUCER_ID_POS + 8;
pub const RESERVED2_POS: usize = PRODUCER_EPOCH_POS + 2;
pub const BASE_SEQUENCE_POS: usize = RESERVED2_POS + 2;
/// Header length; records start here.
pub const HEADER_LEN: usize = BASE_SEQUENCE_POS + 4;

/// Attribute bits that this version understands. Bits 0-2 are the compression codec
/// (only 0 = none today); every other bit must be zero.
pub const ATTRIBUTES_KNOWN: u16 = 0;

/// "No producer id" (Kafka's convention; zero is a valid id, so it is no sentinel).
pub const NO_PRODUCER_ID: i64 = -1;
/// "No sequence number".
pub const NO_SEQUENCE: i32 = -1;

/// The fixed batch header, little-endian, read in place with zerocopy.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug, Clone, Copy)]
#[repr(C)]
pub struct BatchHeader {
    pub base_offset: U64,
    pub batch_len: U32,
    pub crc: U32,
    pub magic: u8,
    pub flags: u8,
    pub attributes: U16,
    pub record_count: U32,
    pub last_offset_delta: U32,
    pub reserved: U32,
    pub first_timestamp: I64,
    pub max_timestamp: I64,
    pub producer_id: I64,
    pub producer_epoch: I16,
    pub reserved2: U16,
    pub base_sequence: I32,
}

const _: () = assert!(HEADER_LEN == 64);
const _: () = assert!(std::mem::size_of::<BatchHeader>() == HEADER_LEN);
const _: () = assert!(std::mem::offset_of!(BatchHeader, crc) == CRC_POS);
const _: () = assert!(std::mem::offset_of!(BatchHeader, magic) == MAGIC_POS);
const _: () = assert!(std::mem::offset_of!(BatchHeader, record_count) == RECORD_COUNT_POS);
const _: () = assert!(std::mem::offset_of!(BatchHeader, first_timestamp) == FIRST_TIMESTAMP_POS);
const _: () = assert!(std::mem::offset_of!(BatchHeader, base_sequence) == BASE_SEQUENCE_POS);

/// Why a byte string is not a valid batch. Every variant carries the facts needed to
/// find the bad bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("batch truncated: need {needed} bytes, have {available}")]
    Truncated { needed: usize, available: usize },
    #[error("batch length {len} outside [{min}, {max}]")]
    BadLength { len: u64, min: usize, max: usize },
    #[error("unknown batch magic {found} (expected {MAGIC})")]
    BadMagic { found: u8 },
    #[error("batch CRC mismatch: stored {expected:#010x}, computed {actual:#010x}")]
    ChecksumMismatch { expected: u32, actual: u32 },
    #[error("unsupported batch attributes {attributes:#06x}")]
    UnsupportedAttributes { attributes: u16 },
    #[error("reserved header field {field} is {value}, must be 0")]
    ReservedNonZero { field: &'static str, value: u32 },
    #[error("record count {count} outside [1, {max}]")]
    BadRecordCount { count: u32, max: u32 },
    #[error("record {index} malformed at batch byte {position}: {reason}")]
    RecordMalformed {
        index: u32,
        position: usize,
        reason: &'static str,
    },
    #[error("records end at byte {end} but the batch is {len} bytes")]
    TrailingBytes { end: usize, len: usize },
    #[error("last offset delta is {found}, header says {declared}")]
    OffsetDeltaMismatch { declared: u32, found: u32 },
    #[error("max timestamp is {found}, header says {declared}")]
    TimestampMismatch { declared: i64, found: i64 },
}

/// Reads the header at the front of `bytes` without checking anything but length.
pub fn header(bytes: &[u8]) -> Result<&BatchHeader, BatchError> {
    BatchHeader::ref_from_prefix(bytes)
        .map(|(h, _)| h)
        .map_err(|_| BatchError::Truncated {
            needed: HEADER_LEN,
            available: bytes.len(),
        })
}

/// The CRC-32 of the bytes a batch's CRC covers.
pub fn compute_crc(batch: &[u8]) -> u32 {
    assert!(batch.len() >= CRC_START);
    crc32fast::hash(&batch[CRC_START..])
}

/// Checks the header fields and the length of the batch at the front of `bytes` and
/// returns the batch's total length. Does not check the CRC or the records.
pub fn check_header(bytes: &[u8]) -> Result<usize, BatchError> {
    let h = header(bytes)?;
    let len = h.batch_len.get() as usize;
    if !(HEADER_LEN..=limits::BATCH_BYTES_MAX).contains(&len) {
        return Err(BatchError::BadLength {
            len: len as u64,
            min: HEADER_LEN,
            max: limits::BATCH_BYTES_MAX,
        });
    }
    if h.magic != MAGIC {
        return Err(BatchError::BadMagic { found: h.magic });
    }
    if len > bytes.len() {
        return Err(BatchError::Truncated {
            needed: len,
            available: bytes.len(),
        });
    }
    if h.attributes.get() & !ATTRIBUTES_KNOWN != 0 {
        return Err(BatchError::UnsupportedAttributes {
            attributes: h.attributes.get(),
        });
    }
    for (field, value) in [
        ("flags", u32::from(h.flags)),
        ("reserved", h.reserved.get()),
        ("reserved2", u32::from(h.reserved2.get())),
    ] {
        if value != 0 {
            return Err(BatchError::ReservedNonZero { field, value });
        }
    }
    let count = h.record_count.get();
    if count == 0 || count > limits::BATCH_RECORDS_MAX {
        return Err(BatchError::BadRecordCount {
            count,
            max: limits::BATCH_RECORDS_MAX,
        });
    }
    Ok(len)
}

/// Checks header and CRC of the batch at the front of `bytes`; returns its length.
/// This is what the read path and recovery run on every batch.
pub fn check_header_and_crc(bytes: &[u8]) -> Result<usize, BatchError> {
    let len = check_header(bytes)?;
    let h = header(bytes)?;
    let actual = compute_crc(&bytes[..len]);
    if actual != h.crc.get() {
        return Err(BatchError::ChecksumMismatch {
            expected: h.crc.get(),
            actual,
        });
    }
    Ok(len)
}

/// A batch whose header and CRC have been checked.
#[derive(Debug, Clone, Copy)]
pub struct BatchRef<'a> {
    bytes: &'a [u8],
}

/// A batch whose header, CRC and every record were checked
/// ([`BatchRef::parse_full`]): what the log accepts. Holding one means the checks
/// ran, so a batch checked once on its way in is not checked again.
#[derive(Debug, Clone, Copy)]
pub struct ValidBatch<'a>(BatchRef<'a>);

impl<'a> ValidBatch<'a> {
    /// [`BatchRef::parse_full`] of the batch at the front of `bytes`.
    pub fn parse(bytes: &'a [u8]) -> Result<ValidBatch<'a>, BatchError> {
        BatchRef::parse_full(bytes).map(ValidBatch)
    }

    pub fn batch(&self) -> BatchRef<'a> {
        self.0
    }
}

impl<'a> BatchRef<'a> {
    /// Checks header and CRC of the batch at the front of `bytes` (which may continue
    /// past the batch) and returns a view of exactly that batch.
    pub fn parse(bytes: &'a [u8]) -> Result<BatchRef<'a>, BatchError> {
        let len = check_header_and_crc(bytes)?;
        Ok(BatchRef {
            bytes: &bytes[..len],
        })
    }

    /// Like [`BatchRef::parse`], and also walks every record, checking the count,
    /// offset deltas, timestamps and that the records fill the batch exactly. The
    /// broker runs this on every produced batch before anything reaches the log.
    pub fn parse_full(bytes: &'a [u8]) -> Result<BatchRef<'a>, BatchError> {
        let batch = Self::parse(bytes)?;
        batch.validate_records()?;
        Ok(batch)
    }

    fn validate_records(&self) -> Result<(), BatchError> {
        let h = self.header();
        let mut it = self.records();
        let mut found = 0u32;
        let mut last_delta: Option<u32> = None;
        let mut max_ts = i64::MIN;
        while let Some(rec) = it.next() {
            let rec = rec?;
            if last_delta.is_none() && rec.offset_delta != 0 {
                return Err(BatchError::RecordMalformed {
                    index: 0,
                    position: HEADER_LEN,
                    reason: "first offset delta is not 0",
                });
            }
            if let Some(prev) = last_delta {
                if rec.offset_delta <= prev {
                    return Err(BatchError::RecordMalformed {
                        index: found,
                        position: it.pos,
                        reason: "offset delta does not increase",
                    });
                }
            }
            // Walk headers so a malformed header is caught at produce time.
            for hdr in rec.headers() {
                hdr?;
            }
            last_delta = Some(rec.offset_delta);
            max_ts = max_ts.max(rec.timestamp.0);
            found += 1;
        }
        if it.pos != self.bytes.len() {
            return Err(BatchError::TrailingBytes {
                end: it.pos,
                len: self.bytes.len(),
            });
        }
        if found != h.record_count.get() {
            return Err(BatchError::BadRecordCount {
                count: found,
                max: h.record_count.get(),
            });
        }
        let declared = h.last_offset_delta.get();
        let last = last_delta.unwrap_or(0);
        if last != declared {
            return Err(BatchError::OffsetDeltaMismatch {
                declared,
                found: last,
            });
        }
        if max_ts != h.max_timestamp.get() {
            return Err(BatchError::TimestampMismatch {
                declared: h.max_timestamp.get(),
                found: max_ts,
            });
        }
        Ok(())
    }

    pub fn header(&self) -> &'a BatchHeader {
        // The length was checked in `parse`.
        BatchHeader::ref_from_prefix(self.bytes)
            .map(|(h, _)| h)
            .expect("checked batch shorter than its header")
    }

    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn base_offset(&self) -> Offset {
        Offset(self.header().base_offset.get())
    }

    /// The offset of the batch's last record.
    pub fn last_offset(&self) -> Offset {
        self.base_offset()
            .plus(u64::from(self.header().last_offset_delta.get()))
    }

    pub fn record_count(&self) -> u32 {
        self.header().record_count.get()
    }

    pub fn first_timestamp(&self) -> TimestampMs {
        TimestampMs(self.header().first_timestamp.get())
    }

    pub fn max_timestamp(&self) -> TimestampMs {
        TimestampMs(self.header().max_timestamp.get())
    }

    /// Iterates the records. Each item is checked as it is decoded; the iterator
    /// stops after the first error.
    pub fn records(&self) -> RecordIter<'a> {
        RecordIter {
            bytes: self.bytes,
            pos: HEADER_LEN,
            index: 0,
            count: self.record_count(),
            base_offset: self.base_offset(),
            first_timestamp: self.header().first_timestamp.get(),
            failed: false,
        }
    }
}

/// Writes `offset` into the base-offset field. The CRC does not cover this field.
pub fn stamp_base_offset(batch: &mut [u8], offset: Offset) {
    batch[BASE_OFFSET_POS..BASE_OFFSET_POS + 8].copy_from_slice(&offset.0.to_le_bytes());
}

/// One decoded record, borrowing from the batch bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub offset: Offset,
    pub offset_delta: u32,
    pub timestamp: TimestampMs,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    headers: &'a [u8],
    header_count: u32,
}

impl<'a> Record<'a> {
    pub fn header_count(&self) -> u32 {
        self.header_count
    }

    pub fn headers(&self) -> HeaderIter<'a> {
        HeaderIter {
            bytes: self.headers,
            pos: 0,
            left: self.header_count,
            failed: false,
        }
    }
}

/// One record header: a UTF-8 key and an optional value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    pub key: &'a str,
    pub value: Option<&'a [u8]>,
}

#[derive(Debug)]
pub struct RecordIter<'a> {
    bytes: &'a [u8],
    pos: usize,
    index: u32,
    count: u32,
    base_offset: Offset,
    first_timestamp: i64,
    failed: bool,
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = Result<Record<'a>, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.index >= self.count {
            return None;
        }
        let start = self.pos;
        let index = self.index;
        let r = decode_record(self.bytes, start, self.base_offset, self.first_timestamp);
        match r {
            Ok((rec, end)) => {
                self.pos = end;
                self.index += 1;
                Some(Ok(rec))
            }
            Err((position, reason)) => {
                self.failed = true;
                Some(Err(BatchError::RecordMalformed {
                    index,
                    position,
                    reason,
                }))
            }
        }
    }
}

type DecodeErr = (usize, &'static str);

fn decode_record(
    bytes: &[u8],
    start: usize,
    base_offset: Offset,
    first_ts: i64,
) -> Result<(Record<'_>, usize), DecodeErr> {
    let mut pos = start;
    let len = varint::read_i32(bytes, &mut pos)?;
    let len = usize::try_from(len).map_err(|_| (start, "negative record length"))?;
    let end = pos
        .checked_add(len)
        .filter(|&e| e <= bytes.len())
        .ok_or((start, "record length past batch end"))?;
    let body = &bytes[..end];
    let _attributes = *body.get(pos).ok_or((pos, "missing attributes"))?;
    pos += 1;
    let ts_delta = varint::read_i64(body, &mut pos)?;
    let offset_delta = varint::read_i32(body, &mut pos)?;
    let offset_delta = u32::try_from(offset_delta).map_err(|_| (pos, "negative offset delta"))?;
    let key = read_nullable(body, &mut pos)?;
    let value = read_nullable(body, &mut pos)?;
    let header_count = varint::read_i32(body, &mut pos)?;
    let header_count = u32::try_from(header_count)
        .ok()
        .filter(|&c| c <= limits::RECORD_HEADERS_MAX)
        .ok_or((pos, "bad header count"))?;
    let headers_start = pos;
    // Walk headers to find where they end; the record must end exactly there.
    for _ in 0..header_count {
        let klen = varint::read_i32(body, &mut pos)?;
        let klen = usize::try_from(klen).map_err(|_| (pos, "negative header key length"))?;
        let kend = pos
            .checked_add(klen)
            .filter(|&e| e <= end)
            .ok_or((pos, "header key past record end"))?;
        std::str::from_utf8(&body[pos..kend]).map_err(|_| (pos, "header key not UTF-8"))?;
        pos = kend;
        read_nullable(body, &mut pos)?;
    }
    if pos != end {
        return Err((pos, "record length does not match its fields"));
    }
    let timestamp = first_ts
        .checked_add(ts_delta)
        .ok_or((start, "timestamp overflow"))?;
    let rec = Record {
        offset: Offset(
            base_offset
                .0
                .checked_add(u64::from(offset_delta))
                .ok_or((start, "offset overflow"))?,
        ),
        offset_delta,
        timestamp: TimestampMs(timestamp),
        key,
        value,
        headers: &body[headers_start..end],
        header_count,
    };
    Ok((rec, end))
}

fn read_nullable<'a>(bytes: &'a [u8], pos: &mut usize) -> Result<Option<&'a [u8]>, DecodeErr> {
    let len = varint::read_i32(bytes, pos)?;
    if len == -1 {
        return Ok(None);
    }
    let len = usize::try_from(len).map_err(|_| (*pos, "bad length"))?;
    let end = pos
        .checked_add(len)
        .filter(|&e| e <= bytes.len())
        .ok_or((*pos, "field past record end"))?;
    let s = &bytes[*pos..end];
    *pos = end;
    Ok(Some(s))
}

#[derive(Debug)]
pub struct HeaderIter<'a> {
    bytes: &'a [u8],
    pos: usize,
    left: u32,
    failed: bool,
}

impl<'a> Iterator for HeaderIter<'a> {
    type Item = Result<Header<'a>, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.left == 0 {
            return None;
        }
        self.left -= 1;
        let r = (|| {
            let k =
                read_nullable(self.bytes, &mut self.pos)?.ok_or((self.pos, "null header key"))?;
            let key = std::str::from_utf8(k).map_err(|_| (self.pos, "header key not UTF-8"))?;
            let value = read_nullable(self.bytes, &mut self.pos)?;
            Ok(Header { key, value })
        })();
        Some(r.map_err(|(position, reason)| {
            self.failed = true;
            BatchError::RecordMalformed {
                index: 0,
                position,
                reason,
            }
        }))
    }
}

/// Zigzag varints, as Kafka's record format uses them.
pub mod varint {
    type DecodeErr = (usize, &'static str);

    fn read_u64(bytes: &[u8], pos: &mut usize, max_bytes: usize) -> Result<u64, DecodeErr> {
        let start = *pos;
        let mut v = 0u64;
        for i in 0..max_bytes {
            let b = *bytes.get(*pos).ok_or((start, "truncated varint"))?;
            *pos += 1;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err((start, "varint too long"))
    }

    pub fn read_i32(bytes: &[u8], pos: &mut usize) -> Result<i32, DecodeErr> {
        let start = *pos;
        let raw = read_u64(bytes, pos, 5)?;
        let raw = u32::try_from(raw).map_err(|_| (start, "varint overflows i32"))?;
        Ok(((raw >> 1) as i32) ^ -((raw & 1) as i32))
    }

    pub fn read_i64(bytes: &[u8], pos: &mut usize) -> Result<i64, DecodeErr> {
        let raw = read_u64(bytes, pos, 10)?;
        Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64))
    }

    pub fn write_i64(out: &mut Vec<u8>, v: i64) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        while z >= 0x80 {
            out.push((z as u8) | 0x80);
            z >>= 7;
        }
        out.push(z as u8);
    }

    pub fn write_i32(out: &mut Vec<u8>, v: i32) {
        write_i64(out, i64::from(v));
    }

    /// Encoded size of `v` as a zigzag varint.
    pub fn len_i64(v: i64) -> usize {
        let z = ((v << 1) ^ (v >> 63)) as u64;
        let bits = 64 - (z | 1).leading_zeros() as usize;
        bits.div_ceil(7)
    }
}

/// One record to add to a batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct RecordInput<'a> {
    pub timestamp: TimestampMs,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: &'a [(&'a str, Option<&'a [u8]>)],
}

/// Builds a batch on the client side. The broker never re-encodes: it stamps the base
/// offset into the bytes this produces.
#[derive(Debug, Clone)]
pub struct BatchBuilder {
    buf: Vec<u8>,
    count: u32,
    first_timestamp: Option<i64>,
    max_timestamp: i64,
    producer_id: i64,
    producer_epoch: i16,
    base_sequence: i32,
}

impl Default for BatchBuilder {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl BatchBuilder {
    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(bytes.max(HEADER_LEN));
        buf.resize(HEADER_LEN, 0);
        BatchBuilder {
            buf,
            count: 0,
            first_timestamp: None,
            max_timestamp: i64::MIN,
            producer_id: NO_PRODUCER_ID,
            producer_epoch: -1,
            base_sequence: NO_SEQUENCE,
        }
    }

    /// Sets the idempotent-producer identity carried in the header.
    pub fn producer(mut self, id: i64, epoch: i16, base_sequence: i32) -> Self {
        self.producer_id = id;
        self.producer_epoch = epoch;
        self.base_sequence = base_sequence;
        self
    }

    pub fn record_count(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes the batch would occupy if finished now.
    pub fn encoded_len(&self) -> usize {
        self.buf.len()
    }

    /// Appends one record. Panics past `BATCH_RECORDS_MAX` records: callers bound
    /// their batches by count and bytes.
    pub fn push(&mut self, rec: RecordInput<'_>) {
        assert!(self.count < limits::BATCH_RECORDS_MAX, "batch record limit");
        let first = *self.first_timestamp.get_or_insert(rec.timestamp.0);
        self.max_timestamp = self.max_timestamp.max(rec.timestamp.0);
        let ts_delta = rec.timestamp.0.wrapping_sub(first);
        let offset_delta = i64::from(self.count);
        let nullable_len = |f: Option<&[u8]>| match f {
            None => varint::len_i64(-1),
            Some(b) => varint::len_i64(b.len() as i64) + b.len(),
        };
        let mut body = 1 + varint::len_i64(ts_delta) + varint::len_i64(offset_delta);
        body += nullable_len(rec.key) + nullable_len(rec.value);
        body += varint::len_i64(rec.headers.len() as i64);
        for (k, v) in rec.headers {
            body += nullable_len(Some(k.as_bytes())) + nullable_len(*v);
        }
        let buf = &mut self.buf;
        buf.reserve(body + 5);
        varint::write_i64(buf, body as i64);
        let body_start = buf.len();
        buf.push(0); // record attributes: unused, as in Kafka v2
        varint::write_i64(buf, ts_delta);
        varint::write_i64(buf, offset_delta);
        let put = |buf: &mut Vec<u8>, f: Option<&[u8]>| match f {
            None => varint::write_i64(buf, -1),
            Some(b) => {
                varint::write_i64(buf, b.len() as i64);
                buf.extend_from_slice(b);
            }
        };
        put(buf, rec.key);
        put(buf, rec.value);
        varint::write_i64(buf, rec.headers.len() as i64);
        for (k, v) in rec.headers {
            put(buf, Some(k.as_bytes()));
            put(buf, *v);
        }
        assert_eq!(buf.len() - body_start, body, "record size precomputation");
        self.count += 1;
    }

    /// Writes the header and CRC and returns the batch bytes, base offset 0.
    /// Panics if no record was pushed: an empty batch is a caller bug.
    pub fn finish(mut self) -> Vec<u8> {
        assert!(self.count > 0, "empty batch");
        let len = u32::try_from(self.buf.len()).expect("batch over 4 GiB");
        let h = BatchHeader {
            base_offset: U64::new(0),
            batch_len: U32::new(len),
            crc: U32::new(0),
            magic: MAGIC,
            flags: 0,
            attributes: U16::new(0),
            record_count: U32::new(self.count),
            last_offset_delta: U32::new(self.count - 1),
            reserved: U32::new(0),
            first_timestamp: I64::new(self.first_timestamp.unwrap_or(0)),
            max_timestamp: I64::new(self.max_timestamp),
            producer_id: I64::new(self.producer_id),
            producer_epoch: I16::new(self.producer_epoch),
            reserved2: U16::new(0),
            base_sequence: I32::new(self.base_sequence),
        };
        self.buf[..HEADER_LEN].copy_from_slice(h.as_bytes());
        let crc = compute_crc(&self.buf);
        self.buf[CRC_POS..CRC_POS + 4].copy_from_slice(&crc.to_le_bytes());
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn build(values: &[&[u8]]) -> Vec<u8> {
        let mut b = BatchBuilder::default();
        for (i, v) in values.iter().enumerate() {
            b.push(RecordInput {
                timestamp: TimestampMs(1_000 + i as i64),
                key: Some(b"k"),
                value: Some(v),
                headers: &[("trace", Some(b"abc")), ("n", None)],
            });
        }
        b.finish()
    }

    #[test]
    fn round_trip_records_and_headers() {
        let bytes = build(&[b"one", b"two", b""]);
        let batch = BatchRef::parse_full(&bytes).unwrap();
        assert_eq!(batch.record_count(), 3);
        assert_eq!(batch.max_timestamp(), TimestampMs(1_002));
        let recs: Vec<_> = batch.records().map(Result::unwrap).collect();
        assert_eq!(recs[1].value, Some(&b"two"[..]));
        assert_eq!(recs[2].offset, Offset(2));
        assert_eq!(recs[2].timestamp, TimestampMs(1_002));
        let hs: Vec<_> = recs[0].headers().map(Result::unwrap).collect();
        assert_eq!(
            hs,
            vec![
                Header {
                    key: "trace",
                    value: Some(&b"abc"[..])
                },
                Header {
                    key: "n",
                    value: None
                }
            ]
        );
    }

    #[test]
    fn stamping_keeps_crc_valid() {
        let mut bytes = build(&[b"x"]);
        stamp_base_offset(&mut bytes, Offset(77));
        let batch = BatchRef::parse_full(&bytes).unwrap();
        assert_eq!(batch.base_offset(), Offset(77));
        assert_eq!(batch.records().next().unwrap().unwrap().offset, Offset(77));
    }

    #[test]
    fn every_flipped_covered_bit_is_detected() {
        let bytes = build(&[b"hello", b"world"]);
        for pos in CRC_POS..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[pos] ^= 1 << bit;
                assert!(
                    BatchRef::parse_full(&b).is_err(),
                    "flip at {pos}:{bit} accepted"
                );
            }
        }
    }

    #[test]
    fn header_without_records_is_rejected_even_with_a_valid_crc() {
        let mut b = build(&[b"x"]);
        b.truncate(HEADER_LEN);
        b[BATCH_LEN_POS..BATCH_LEN_POS + 4].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        let crc = compute_crc(&b);
        b[CRC_POS..CRC_POS + 4].copy_from_slice(&crc.to_le_bytes());
        assert!(BatchRef::parse(&b).is_ok(), "header and CRC alone are fine");
        assert!(
            BatchRef::parse_full(&b).is_err(),
            "but the declared record is missing"
        );
    }

    #[test]
    fn every_truncation_is_rejected() {
        let bytes = build(&[b"hello", b"world"]);
        for len in 0..bytes.len() {
            assert!(BatchRef::parse(&bytes[..len]).is_err());
        }
    }

    /// The worked example in docs/FORMAT.md, byte for byte.
    #[test]
    fn format_doc_example() {
        let mut b = BatchBuilder::default();
        b.push(RecordInput {
            timestamp: TimestampMs(1000),
            key: Some(b"k"),
            value: Some(b"v"),
            headers: &[],
        });
        let bytes = b.finish();
        assert_eq!(bytes.len(), 73);
        assert_eq!(&bytes[CRC_POS..CRC_POS + 4], &[0x9e, 0x52, 0x59, 0x6a]);
        assert_eq!(
            &bytes[HEADER_LEN..],
            &[0x10, 0, 0, 0, 0x02, b'k', 0x02, b'v', 0]
        );
    }

    #[test]
    fn varint_matches_kafka_examples() {
        // Kafka's zigzag: 0→0, -1→1, 1→2, 63→126, -64→127, 64→128 (two bytes).
        for (v, enc) in [
            (0i64, vec![0u8]),
            (-1, vec![1]),
            (1, vec![2]),
            (-64, vec![127]),
            (64, vec![0x80, 1]),
        ] {
            let mut out = Vec::new();
            varint::write_i64(&mut out, v);
            assert_eq!(out, enc, "{v}");
            assert_eq!(varint::len_i64(v), enc.len());
            let mut pos = 0;
            assert_eq!(varint::read_i64(&out, &mut pos).unwrap(), v);
        }
    }

    proptest! {
        #[test]
        fn builder_output_always_parses(
            recs in proptest::collection::vec(
                (any::<i32>(), proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
                 proptest::option::of(proptest::collection::vec(any::<u8>(), 0..200))), 1..30)
        ) {
            let mut b = BatchBuilder::default();
            for (ts, k, v) in &recs {
                b.push(RecordInput { timestamp: TimestampMs(i64::from(*ts)), key: k.as_deref(), value: v.as_deref(), headers: &[] });
            }
            let bytes = b.finish();
            let batch = BatchRef::parse_full(&bytes).unwrap();
            let got: Vec<_> = batch.records().map(Result::unwrap).collect();
            prop_assert_eq!(got.len(), recs.len());
            for (r, (ts, k, v)) in got.iter().zip(&recs) {
                prop_assert_eq!(r.timestamp.0, i64::from(*ts));
                prop_assert_eq!(r.key, k.as_deref());
                prop_assert_eq!(r.value, v.as_deref());
            }
        }

        #[test]
        fn varint_round_trips(v in any::<i64>()) {
            let mut out = Vec::new();
            varint::write_i64(&mut out, v);
            prop_assert_eq!(out.len(), varint::len_i64(v));
            let mut pos = 0;
            prop_assert_eq!(varint::read_i64(&out, &mut pos).unwrap(), v);
        }
    }
}
