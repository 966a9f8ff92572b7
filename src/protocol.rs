//! The binary wire protocol: frame splitting, request and response codecs, error
//! codes. Pure functions on bytes; no I/O. `docs/PROTOCOL.md` is the same thing in
//! prose, for client authors in other languages.
//!
//! Every frame is `u32 LE length` followed by that many bytes. A request continues
//! with `api_key u16, api_version u16, correlation_id u32` and the body; a response
//! with `correlation_id u32, error_code u16` and, when the code is 0, the body
//! (otherwise a `str16` message). All integers are little-endian. A frame is checked
//! whole (length bound first, then every field bound) before anything acts on it.

use crate::types::Offset;
use bytes::Bytes;

/// Length prefix of every frame.
pub const LENGTH_PREFIX_LEN: usize = 4;
/// `api_key u16, api_version u16, correlation_id u32`.
pub const REQUEST_HEADER_LEN: usize = 8;
/// `correlation_id u32, error_code u16`.
pub const RESPONSE_HEADER_LEN: usize = 6;
/// Longest topic name, in bytes (UTF-8; `[A-Za-z0-9._-]`).
pub const TOPIC_NAME_BYTES_MAX: usize = 200;

/// API keys. Each has a version range the server accepts (see [`API_VERSIONS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ApiKey {
    ApiVersions = 0,
    CreateTopic = 1,
    DeleteTopic = 2,
    ListTopics = 3,
    Produce = 4,
    Fetch = 5,
    ListOffsets = 6,
}

/// `(api key, min version, max version)` this build speaks.
pub const API_VERSIONS: &[(ApiKey, u16, u16)] = &[
    (ApiKey::ApiVersions, 0, 0),
    (ApiKey::CreateTopic, 0, 0),
    (ApiKey::DeleteTopic, 0, 0),
    (ApiKey::ListTopics, 0, 0),
    (ApiKey::Produce, 0, 0),
    (ApiKey::Fetch, 0, 0),
    (ApiKey::ListOffsets, 0, 0),
];

impl ApiKey {
    pub fn from_u16(v: u16) -> Option<ApiKey> {
        API_VERSIONS.iter().map(|a| a.0).find(|k| *k as u16 == v)
    }
}

/// Typed error codes carried in every response header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[repr(u16)]
pub enum ErrorCode {
    #[error("unknown API key")]
    UnknownApi = 1,
    #[error("unsupported API version")]
    UnsupportedVersion = 2,
    #[error("malformed request")]
    MalformedRequest = 3,
    #[error("frame too large")]
    FrameTooLarge = 4,
    #[error("unknown topic")]
    UnknownTopic = 5,
    #[error("unknown partition")]
    UnknownPartition = 6,
    #[error("topic already exists")]
    TopicExists = 7,
    #[error("invalid record batch")]
    InvalidBatch = 8,
    #[error("record batch too large")]
    BatchTooLarge = 9,
    #[error("offset out of range")]
    OffsetOutOfRange = 10,
    #[error("storage error")]
    StorageError = 11,
    #[error("corrupt data on disk")]
    CorruptData = 12,
    #[error("invalid configuration")]
    InvalidConfig = 13,
    #[error("broker shutting down")]
    ShuttingDown = 14,
    #[error("no offset for that timestamp")]
    OffsetNotFound = 15,
    #[error("internal error")]
    Internal = 16,
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> Option<ErrorCode> {
        use ErrorCode::*;
        [
            UnknownApi,
            UnsupportedVersion,
            MalformedRequest,
            FrameTooLarge,
            UnknownTopic,
            UnknownPartition,
            TopicExists,
            InvalidBatch,
            BatchTooLarge,
            OffsetOutOfRange,
            StorageError,
            CorruptData,
            InvalidConfig,
            ShuttingDown,
            OffsetNotFound,
            Internal,
        ]
        .into_iter()
        .find(|c| *c as u16 == v)
    }
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: u64, max: usize },
    #[error("frame of {len} bytes is shorter than its header")]
    TooShort { len: usize },
}

/// If `buf` starts with a whole frame, its body length (after the prefix).
/// `Ok(None)`: need more bytes. Checks the bound before any body byte is read.
pub fn frame_len(buf: &[u8], max_frame_bytes: usize) -> Result<Option<usize>, FrameError> {
    Ok(declared_len(buf, max_frame_bytes)?.filter(|&len| buf.len() - LENGTH_PREFIX_LEN >= len))
}

/// The body length the frame at the start of `buf` declares, once its length
/// prefix is there (the body may still be arriving); an error if it is over
/// `max_frame_bytes`.
pub fn declared_len(buf: &[u8], max_frame_bytes: usize) -> Result<Option<usize>, FrameError> {
    let Some(prefix) = buf.get(..LENGTH_PREFIX_LEN) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes(prefix.try_into().expect("4 bytes")) as usize;
    if len > max_frame_bytes {
        return Err(FrameError::TooLarge {
            len: len as u64,
            max: max_frame_bytes,
        });
    }
    Ok(Some(len))
}

/// A request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub api_key: u16,
    pub api_version: u16,
    pub correlation_id: u32,
}

/// Topic settings carried by `CreateTopic`; `None` means the broker default.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TopicConfig {
    pub partitions: u32,
    pub segment_bytes: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub retention_ms: Option<u64>,
}

/// Which partition a produce goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionSelector {
    Partition(u32),
    /// Hashed with Kafka's murmur2 partitioner, so keyed data lands where a Kafka
    /// client would put it.
    Key(Bytes),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetSpec {
    Earliest,
    Latest,
    /// The first offset whose batch has a timestamp at or after this (ms).
    Timestamp(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    ApiVersions,
    CreateTopic {
        name: String,
        config: TopicConfig,
    },
    DeleteTopic {
        name: String,
    },
    ListTopics,
    Produce {
        topic: String,
        partition: PartitionSelector,
        durability: crate::storage::Durability,
        /// One or more record batches back to back, exactly as stored.
        batches: Bytes,
    },
    Fetch {
        topic: String,
        partition: u32,
        offset: Offset,
        max_bytes: u32,
        max_wait_ms: u32,
    },
    ListOffsets {
        topic: String,
        partition: u32,
        spec: OffsetSpec,
    },
}

impl Request {
    pub fn api_key(&self) -> ApiKey {
        match self {
            Request::ApiVersions => ApiKey::ApiVersions,
            Request::CreateTopic { .. } => ApiKey::CreateTopic,
            Request::DeleteTopic { .. } => ApiKey::DeleteTopic,
            Request::ListTopics => ApiKey::ListTopics,
            Request::Produce { .. } => ApiKey::Produce,
            Request::Fetch { .. } => ApiKey::Fetch,
            Request::ListOffsets { .. } => ApiKey::ListOffsets,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    pub partition: u32,
    pub log_start: Offset,
    pub high_watermark: Offset,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    pub name: String,
    pub config: TopicConfig,
    pub partitions: Vec<PartitionInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    ApiVersions(Vec<(u16, u16, u16)>),
    CreateTopic,
    DeleteTopic,
    ListTopics(Vec<TopicInfo>),
    /// The partition written and the base offset of each batch, in order.
    Produce {
        partition: u32,
        base_offsets: Vec<Offset>,
    },
    Fetch {
        high_watermark: Offset,
        log_start: Offset,
        next_offset: Offset,
        /// Whole batches, in order (several slices when the fetch crossed segments).
        records: Vec<Bytes>,
    },
    ListOffsets {
        offset: Offset,
    },
}

/// A request that could not be decoded. `header` is set when the header was
/// readable, so the server can answer with `code` under the right correlation id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct DecodeError {
    pub header: Option<RequestHeader>,
    pub code: ErrorCode,
    pub message: String,
}

/// Reads fields from a frame body, never past its end.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

type FieldResult<T> = Result<T, String>;

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> FieldResult<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| format!("{what} runs past the end of the frame"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> FieldResult<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> FieldResult<u16> {
        Ok(u16::from_le_bytes(
            self.take(2, what)?.try_into().expect("2"),
        ))
    }
    fn u32(&mut self, what: &str) -> FieldResult<u32> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4"),
        ))
    }
    fn u64(&mut self, what: &str) -> FieldResult<u64> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8"),
        ))
    }
    fn i32(&mut self, what: &str) -> FieldResult<i32> {
        Ok(self.u32(what)? as i32)
    }
    fn i64(&mut self, what: &str) -> FieldResult<i64> {
        Ok(self.u64(what)? as i64)
    }
    /// `u16 length` + UTF-8.
    fn str16(&mut self, what: &str) -> FieldResult<&'a str> {
        let n = self.u16(what)? as usize;
        std::str::from_utf8(self.take(n, what)?).map_err(|_| format!("{what} is not UTF-8"))
    }
    /// `u32 length` + bytes.
    fn bytes32(&mut self, what: &str) -> FieldResult<&'a [u8]> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }
    /// `u64` where `u64::MAX` means "none".
    fn opt_u64(&mut self, what: &str) -> FieldResult<Option<u64>> {
        Ok(Some(self.u64(what)?).filter(|&v| v != u64::MAX))
    }
    fn end(&self) -> FieldResult<()> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(format!("{} trailing bytes", self.buf.len() - self.pos))
        }
    }
}

fn topic_name(name: &str) -> FieldResult<String> {
    let ok = !name.is_empty()
        && name.len() <= TOPIC_NAME_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        && name != "."
        && name != "..";
    if ok {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "invalid topic name {name:?}: 1-{TOPIC_NAME_BYTES_MAX} of [A-Za-z0-9._-]"
        ))
    }
}

/// Checks a topic's settings, from a request or from the catalog on disk.
pub fn validate_topic_config(c: &TopicConfig) -> Result<(), String> {
    if c.partitions == 0 || c.partitions > crate::limits::TOPIC_PARTITIONS_MAX {
        return Err(format!(
            "partitions must be in [1, {}]",
            crate::limits::TOPIC_PARTITIONS_MAX
        ));
    }
    if let Some(b) = c.segment_bytes {
        if !(crate::limits::SEGMENT_BYTES_MIN..=crate::limits::SEGMENT_BYTES_MAX).contains(&b) {
            return Err(format!(
                "segment_bytes {b} outside [{}, {}]",
                crate::limits::SEGMENT_BYTES_MIN,
                crate::limits::SEGMENT_BYTES_MAX
            ));
        }
    }
    for (what, v) in [
        ("retention_bytes", c.retention_bytes),
        ("retention_ms", c.retention_ms),
    ] {
        if v.is_some_and(|v| v > i64::MAX as u64) {
            return Err(format!("{what} must be below 2^63"));
        }
    }
    Ok(())
}

/// Checks a topic name (also used by the broker for names from disk).
pub fn validate_topic_name(name: &str) -> Result<(), String> {
    topic_name(name).map(drop)
}

/// Decodes one request frame body (the bytes after the length prefix). `frame` is
/// `Bytes` so produce batches come out as zero-copy slices of it.
pub fn decode_request(frame: &Bytes) -> Result<(RequestHeader, Request), DecodeError> {
    let mut r = Reader { buf: frame, pos: 0 };
    let header = (|| -> FieldResult<RequestHeader> {
        Ok(RequestHeader {
            api_key: r.u16("api_key")?,
            api_version: r.u16("api_version")?,
            correlation_id: r.u32("correlation_id")?,
        })
    })()
    .map_err(|message| DecodeError {
        header: None,
        code: ErrorCode::MalformedRequest,
        message,
    })?;
    let fail = |code, message| DecodeError {
        header: Some(header),
        code,
        message,
    };
    let Some(key) = ApiKey::from_u16(header.api_key) else {
        return Err(fail(
            ErrorCode::UnknownApi,
            format!("unknown API key {}", header.api_key),
        ));
    };
    let (_, min, max) = API_VERSIONS.iter().find(|a| a.0 == key).expect("listed");
    if !(*min..=*max).contains(&header.api_version) {
        return Err(fail(
            ErrorCode::UnsupportedVersion,
            format!(
                "{key:?} version {} not in [{min}, {max}]",
                header.api_version
            ),
        ));
    }
    let body = (|| -> FieldResult<Request> {
        let req = match key {
            ApiKey::ApiVersions => Request::ApiVersions,
            ApiKey::CreateTopic => {
                let name = topic_name(r.str16("topic")?)?;
                let partitions = r.u32("partitions")?;
                let config = TopicConfig {
                    partitions,
                    segment_bytes: r.opt_u64("segment_bytes")?,
                    retention_bytes: r.opt_u64("retention_bytes")?,
                    retention_ms: r.opt_u64("retention_ms")?,
                };
                Request::CreateTopic { name, config }
            }
            ApiKey::DeleteTopic => Request::DeleteTopic {
                name: topic_name(r.str16("topic")?)?,
            },
            ApiKey::ListTopics => Request::ListTopics,
            ApiKey::Produce => {
                let topic = topic_name(r.str16("topic")?)?;
                let partition = r.i32("partition")?;
                let key = r.bytes32("key")?;
                let partition = match partition {
                    -1 => PartitionSelector::Key(frame.slice_ref(key)),
                    p if p >= 0 => PartitionSelector::Partition(p as u32),
                    p => return Err(format!("partition {p} is neither >= 0 nor -1 (by key)")),
                };
                let durability = match r.u8("durability")? {
                    0 => crate::storage::Durability::Fsync,
                    1 => crate::storage::Durability::Memory,
                    d => return Err(format!("unknown durability {d}")),
                };
                let batches = r.bytes32("batches")?;
                if batches.is_empty() {
                    return Err("produce without batches".into());
                }
                Request::Produce {
                    topic,
                    partition,
                    durability,
                    batches: frame.slice_ref(batches),
                }
            }
            ApiKey::Fetch => Request::Fetch {
                topic: topic_name(r.str16("topic")?)?,
                partition: r.u32("partition")?,
                offset: Offset(r.u64("offset")?),
                max_bytes: r.u32("max_bytes")?,
                max_wait_ms: r.u32("max_wait_ms")?,
            },
            ApiKey::ListOffsets => {
                let topic = topic_name(r.str16("topic")?)?;
                let partition = r.u32("partition")?;
                let spec = match r.i64("timestamp")? {
                    -1 => OffsetSpec::Latest,
                    -2 => OffsetSpec::Earliest,
                    t if t >= 0 => OffsetSpec::Timestamp(t),
                    t => return Err(format!("timestamp {t} is neither >= 0, -1 nor -2")),
                };
                Request::ListOffsets {
                    topic,
                    partition,
                    spec,
                }
            }
        };
        r.end()?;
        Ok(req)
    })()
    .map_err(|m| fail(ErrorCode::MalformedRequest, m))?;
    Ok((header, body))
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_str16(out: &mut Vec<u8>, s: &str) {
    let n = u16::try_from(s.len()).expect("string over 64 KiB");
    put_u16(out, n);
    out.extend_from_slice(s.as_bytes());
}
fn put_bytes32(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, u32::try_from(b.len()).expect("field over 4 GiB"));
    out.extend_from_slice(b);
}
fn put_opt_u64(out: &mut Vec<u8>, v: Option<u64>) {
    put_u64(out, v.unwrap_or(u64::MAX));
}

/// Starts a frame in `out`; returns where its length prefix is, for [`end_frame`].
fn begin_frame(out: &mut Vec<u8>) -> usize {
    let at = out.len();
    put_u32(out, 0);
    at
}

fn end_frame(out: &mut [u8], at: usize) {
    end_frame_with_tail(out, at, 0);
}

/// Ends a frame whose last `tail` bytes follow `out` instead of being in it.
fn end_frame_with_tail(out: &mut [u8], at: usize, tail: usize) {
    let len = u32::try_from(out.len() - at - LENGTH_PREFIX_LEN + tail).expect("frame over 4 GiB");
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

/// Appends a whole request frame (prefix included) to `out`.
pub fn encode_request(correlation_id: u32, req: &Request, out: &mut Vec<u8>) {
    let tail = encode_request_head(correlation_id, req, out);
    out.extend_from_slice(tail);
}

/// Appends a request frame to `out` except its last field's bytes, which it returns
/// (a produce's batches; empty for other requests): the frame is `out`'s new bytes
/// followed by them, so a client writes both without copying the batches.
pub fn encode_request_head<'a>(
    correlation_id: u32,
    req: &'a Request,
    out: &mut Vec<u8>,
) -> &'a [u8] {
    let at = begin_frame(out);
    put_u16(out, req.api_key() as u16);
    put_u16(out, 0);
    put_u32(out, correlation_id);
    match req {
        Request::ApiVersions | Request::ListTopics => {}
        Request::CreateTopic { name, config } => {
            put_str16(out, name);
            put_u32(out, config.partitions);
            put_opt_u64(out, config.segment_bytes);
            put_opt_u64(out, config.retention_bytes);
            put_opt_u64(out, config.retention_ms);
        }
        Request::DeleteTopic { name } => put_str16(out, name),
        Request::Produce {
            topic,
            partition,
            durability,
            batches,
        } => {
            put_str16(out, topic);
            match partition {
                PartitionSelector::Partition(p) => {
                    put_u32(out, *p);
                    put_bytes32(out, &[]);
                }
                PartitionSelector::Key(k) => {
                    put_u32(out, u32::MAX);
                    put_bytes32(out, k);
                }
            }
            out.push(match durability {
                crate::storage::Durability::Fsync => 0,
                crate::storage::Durability::Memory => 1,
            });
            put_u32(out, u32::try_from(batches.len()).expect("field over 4 GiB"));
            end_frame_with_tail(out, at, batches.len());
            return batches;
        }
        Request::Fetch {
            topic,
            partition,
            offset,
            max_bytes,
            max_wait_ms,
        } => {
            put_str16(out, topic);
            put_u32(out, *partition);
            put_u64(out, offset.0);
            put_u32(out, *max_bytes);
            put_u32(out, *max_wait_ms);
        }
        Request::ListOffsets {
            topic,
            partition,
            spec,
        } => {
            put_str16(out, topic);
            put_u32(out, *partition);
            let t = match spec {
                OffsetSpec::Latest => -1,
                OffsetSpec::Earliest => -2,
                OffsetSpec::Timestamp(t) => *t,
            };
            put_u64(out, t as u64);
        }
    }
    end_frame(out, at);
    &[]
}

/// Appends an error response frame.
pub fn encode_error(correlation_id: u32, code: ErrorCode, message: &str, out: &mut Vec<u8>) {
    let at = begin_frame(out);
    put_u32(out, correlation_id);
    put_u16(out, code as u16);
    let mut m = message;
    while m.len() > 1024 {
        let mut cut = 1024;
        while !m.is_char_boundary(cut) {
            cut -= 1;
        }
        m = &m[..cut];
    }
    put_str16(out, m);
    end_frame(out, at);
}

/// Appends a success response frame. For `Fetch`, only the header and the fixed
/// fields go into `out`, with the record length; the caller writes the record
/// slices after it (zero copy), so the returned `Vec<Bytes>` must follow `out`.
pub fn encode_response(correlation_id: u32, resp: &Response, out: &mut Vec<u8>) -> Vec<Bytes> {
    let at = begin_frame(out);
    put_u32(out, correlation_id);
    put_u16(out, 0);
    let mut tail = Vec::new();
    match resp {
        Response::ApiVersions(v) => {
            put_u16(out, v.len() as u16);
            for (k, lo, hi) in v {
                put_u16(out, *k);
                put_u16(out, *lo);
                put_u16(out, *hi);
            }
        }
        Response::CreateTopic | Response::DeleteTopic => {}
        Response::ListTopics(topics) => {
            put_u32(out, topics.len() as u32);
            for t in topics {
                put_str16(out, &t.name);
                put_u32(out, t.config.partitions);
                put_opt_u64(out, t.config.segment_bytes);
                put_opt_u64(out, t.config.retention_bytes);
                put_opt_u64(out, t.config.retention_ms);
                put_u32(out, t.partitions.len() as u32);
                for p in &t.partitions {
                    put_u32(out, p.partition);
                    put_u64(out, p.log_start.0);
                    put_u64(out, p.high_watermark.0);
                }
            }
        }
        Response::Produce {
            partition,
            base_offsets,
        } => {
            put_u32(out, *partition);
            put_u32(out, base_offsets.len() as u32);
            for o in base_offsets {
                put_u64(out, o.0);
            }
        }
        Response::Fetch {
            high_watermark,
            log_start,
            next_offset,
            records,
        } => {
            put_u64(out, high_watermark.0);
            put_u64(out, log_start.0);
            put_u64(out, next_offset.0);
            let total: usize = records.iter().map(Bytes::len).sum();
            put_u32(out, u32::try_from(total).expect("fetch over 4 GiB"));
            tail = records.clone();
            // The prefix counts the record bytes that follow outside `out`.
            let len = u32::try_from(out.len() - at - LENGTH_PREFIX_LEN + total)
                .expect("frame over 4 GiB");
            out[at..at + 4].copy_from_slice(&len.to_le_bytes());
            return tail;
        }
        Response::ListOffsets { offset } => put_u64(out, offset.0),
    }
    end_frame(out, at);
    tail
}

/// A decoded response: the response, or the broker's error code and message.
pub type BrokerReply = Result<Response, (ErrorCode, String)>;

/// Decodes a response frame body for a request of `key`.
/// `Err((code, message))` when the broker answered with an error.
pub fn decode_response(key: ApiKey, frame: &Bytes) -> Result<(u32, BrokerReply), String> {
    let mut r = Reader { buf: frame, pos: 0 };
    let correlation_id = r.u32("correlation_id")?;
    let code = r.u16("error_code")?;
    if code != 0 {
        let msg = r.str16("error message")?.to_owned();
        let code = ErrorCode::from_u16(code).unwrap_or(ErrorCode::Internal);
        return Ok((correlation_id, Err((code, msg))));
    }
    let resp = match key {
        ApiKey::ApiVersions => {
            let n = r.u16("count")?;
            let mut v = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                v.push((r.u16("key")?, r.u16("min")?, r.u16("max")?));
            }
            Response::ApiVersions(v)
        }
        ApiKey::CreateTopic => Response::CreateTopic,
        ApiKey::DeleteTopic => Response::DeleteTopic,
        ApiKey::ListTopics => {
            let n = r.u32("count")?;
            let mut topics = Vec::new();
            for _ in 0..n {
                let name = r.str16("topic")?.to_owned();
                let config = TopicConfig {
                    partitions: r.u32("partitions")?,
                    segment_bytes: r.opt_u64("segment_bytes")?,
                    retention_bytes: r.opt_u64("retention_bytes")?,
                    retention_ms: r.opt_u64("retention_ms")?,
                };
                let np = r.u32("partition count")?;
                let mut partitions = Vec::new();
                for _ in 0..np {
                    partitions.push(PartitionInfo {
                        partition: r.u32("partition")?,
                        log_start: Offset(r.u64("log_start")?),
                        high_watermark: Offset(r.u64("high_watermark")?),
                    });
                }
                topics.push(TopicInfo {
                    name,
                    config,
                    partitions,
                });
            }
            Response::ListTopics(topics)
        }
        ApiKey::Produce => {
            let partition = r.u32("partition")?;
            let n = r.u32("count")?;
            let mut base_offsets = Vec::new();
            for _ in 0..n {
                base_offsets.push(Offset(r.u64("base_offset")?));
            }
            Response::Produce {
                partition,
                base_offsets,
            }
        }
        ApiKey::Fetch => {
            let high_watermark = Offset(r.u64("high_watermark")?);
            let log_start = Offset(r.u64("log_start")?);
            let next_offset = Offset(r.u64("next_offset")?);
            let recs = r.bytes32("records")?;
            Response::Fetch {
                high_watermark,
                log_start,
                next_offset,
                records: if recs.is_empty() {
                    vec![]
                } else {
                    vec![frame.slice_ref(recs)]
                },
            }
        }
        ApiKey::ListOffsets => Response::ListOffsets {
            offset: Offset(r.u64("offset")?),
        },
    };
    r.end()?;
    Ok((correlation_id, Ok(resp)))
}

/// Kafka's murmur2 (as in `org.apache.kafka.common.utils.Utils.murmur2`), so keys
/// map to the same partition as with Kafka's default partitioner.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let chunks = data.chunks_exact(4);
    let rest = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes(c.try_into().expect("4"));
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    match rest.len() {
        3 => {
            h ^= u32::from(rest[2]) << 16;
            h ^= u32::from(rest[1]) << 8;
            h ^= u32::from(rest[0]);
            h = h.wrapping_mul(M);
        }
        2 => {
            h ^= u32::from(rest[1]) << 8;
            h ^= u32::from(rest[0]);
            h = h.wrapping_mul(M);
        }
        1 => {
            h ^= u32::from(rest[0]);
            h = h.wrapping_mul(M);
        }
        _ => {}
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's default partitioner picks for `key`.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    assert!(partitions > 0);
    ((murmur2(key) & 0x7fff_ffff) as u32) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Durability;

    fn round_trip(req: Request) {
        let mut out = Vec::new();
        encode_request(42, &req, &mut out);
        // The head and the tail the client writes after it make the same frame.
        let mut head = vec![9u8; 3];
        let tail = encode_request_head(42, &req, &mut head);
        assert_eq!(tail.is_empty(), !matches!(req, Request::Produce { .. }));
        assert_eq!([&head[3..], tail].concat(), out);
        let len = frame_len(&out, usize::MAX).unwrap().unwrap();
        assert_eq!(len + LENGTH_PREFIX_LEN, out.len());
        let frame = Bytes::from(out).slice(LENGTH_PREFIX_LEN..);
        let (h, back) = decode_request(&frame).unwrap();
        assert_eq!(h.correlation_id, 42);
        assert_eq!(back, req);
        // Every truncation is an error, never a panic.
        for cut in 0..frame.len() {
            assert!(
                decode_request(&frame.slice(..cut)).is_err(),
                "cut {cut} of {req:?}"
            );
        }
    }

    #[test]
    fn every_request_round_trips() {
        round_trip(Request::ApiVersions);
        round_trip(Request::ListTopics);
        round_trip(Request::CreateTopic {
            name: "orders.v1".into(),
            config: TopicConfig {
                partitions: 12,
                segment_bytes: Some(1 << 20),
                retention_bytes: None,
                retention_ms: Some(60_000),
            },
        });
        round_trip(Request::DeleteTopic { name: "t".into() });
        round_trip(Request::Produce {
            topic: "t".into(),
            partition: PartitionSelector::Key(Bytes::from_static(b"user-7")),
            durability: Durability::Memory,
            batches: Bytes::from_static(b"not parsed here"),
        });
        round_trip(Request::Produce {
            topic: "t".into(),
            partition: PartitionSelector::Partition(3),
            durability: Durability::Fsync,
            batches: Bytes::from_static(b"x"),
        });
        round_trip(Request::Fetch {
            topic: "t".into(),
            partition: 1,
            offset: Offset(99),
            max_bytes: 1 << 20,
            max_wait_ms: 500,
        });
        for spec in [
            OffsetSpec::Earliest,
            OffsetSpec::Latest,
            OffsetSpec::Timestamp(1_700_000_000_000),
        ] {
            round_trip(Request::ListOffsets {
                topic: "t".into(),
                partition: 0,
                spec,
            });
        }
    }

    #[test]
    fn responses_round_trip_including_zero_copy_fetch() {
        let cases = [
            (
                ApiKey::ApiVersions,
                Response::ApiVersions(vec![(0, 0, 0), (4, 0, 0)]),
            ),
            (ApiKey::CreateTopic, Response::CreateTopic),
            (
                ApiKey::Produce,
                Response::Produce {
                    partition: 2,
                    base_offsets: vec![Offset(5), Offset(9)],
                },
            ),
            (
                ApiKey::ListOffsets,
                Response::ListOffsets { offset: Offset(77) },
            ),
            (
                ApiKey::ListTopics,
                Response::ListTopics(vec![TopicInfo {
                    name: "a".into(),
                    config: TopicConfig {
                        partitions: 1,
                        ..TopicConfig::default()
                    },
                    partitions: vec![PartitionInfo {
                        partition: 0,
                        log_start: Offset(1),
                        high_watermark: Offset(3),
                    }],
                }]),
            ),
        ];
        for (key, resp) in cases {
            let mut out = Vec::new();
            let tail = encode_response(9, &resp, &mut out);
            assert!(tail.is_empty());
            let frame = Bytes::from(out).slice(LENGTH_PREFIX_LEN..);
            assert_eq!(decode_response(key, &frame).unwrap(), (9, Ok(resp)));
        }
        // Fetch: the records travel after the head, and the prefix counts them.
        let recs = vec![Bytes::from_static(b"abc"), Bytes::from_static(b"defg")];
        let resp = Response::Fetch {
            high_watermark: Offset(10),
            log_start: Offset(0),
            next_offset: Offset(4),
            records: recs.clone(),
        };
        let mut out = Vec::new();
        let tail = encode_response(3, &resp, &mut out);
        assert_eq!(tail, recs);
        for t in &tail {
            out.extend_from_slice(t);
        }
        assert_eq!(frame_len(&out, usize::MAX).unwrap(), Some(out.len() - 4));
        let frame = Bytes::from(out).slice(LENGTH_PREFIX_LEN..);
        match decode_response(ApiKey::Fetch, &frame).unwrap() {
            (
                3,
                Ok(Response::Fetch {
                    records,
                    next_offset,
                    ..
                }),
            ) => {
                assert_eq!(records.concat(), b"abcdefg");
                assert_eq!(next_offset, Offset(4));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_carry_code_and_message() {
        let mut out = Vec::new();
        encode_error(5, ErrorCode::UnknownTopic, "no such topic", &mut out);
        let frame = Bytes::from(out).slice(LENGTH_PREFIX_LEN..);
        assert_eq!(
            decode_response(ApiKey::Fetch, &frame).unwrap(),
            (5, Err((ErrorCode::UnknownTopic, "no such topic".into())))
        );
    }

    #[test]
    fn frames_are_bounded_before_reading_the_body() {
        assert_eq!(frame_len(&[1, 0], 100), Ok(None));
        assert_eq!(frame_len(&[10, 0, 0, 0, 1], 100), Ok(None));
        assert!(matches!(
            frame_len(&[0xff, 0xff, 0xff, 0xff], 1 << 20),
            Err(FrameError::TooLarge { .. })
        ));
        // Unknown key and version are typed errors that keep the header.
        let mut f = vec![99, 0, 0, 0, 7, 0, 0, 0];
        let e = decode_request(&Bytes::from(f.clone())).unwrap_err();
        assert_eq!(
            (e.code, e.header.map(|h| h.correlation_id)),
            (ErrorCode::UnknownApi, Some(7))
        );
        f[0] = ApiKey::Fetch as u8;
        f[2] = 9;
        assert_eq!(
            decode_request(&Bytes::from(f)).unwrap_err().code,
            ErrorCode::UnsupportedVersion
        );
        // Bad topic names are refused.
        let mut out = Vec::new();
        encode_request(
            1,
            &Request::DeleteTopic {
                name: "../etc".into(),
            },
            &mut out,
        );
        let e = decode_request(&Bytes::from(out).slice(4..)).unwrap_err();
        assert_eq!(e.code, ErrorCode::MalformedRequest);
    }

    #[test]
    fn murmur2_matches_kafka() {
        // Vectors from Kafka's UtilsTest.
        for (s, h) in [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ] {
            assert_eq!(murmur2(s.as_bytes()), h, "{s}");
        }
        assert!(partition_for_key(b"foobar", 7) < 7);
    }
}
