//! One client connection: reads length-prefixed frames, checks each whole frame
//! before decoding it, runs up to `max_in_flight_per_connection` requests at once
//! and writes each response as soon as it is ready (matched by correlation id).
//!
//! Bad input never reaches the log: a frame over the size limit, or too short to
//! carry a header, is answered with an error under correlation id 0 and the
//! connection is closed (the stream cannot be resynchronised); a frame with a
//! readable header but a bad body is answered under its own id and the connection
//! carries on.
//!
//! Memory: a frame larger than one read chunk (64 KiB) is received straight into a
//! buffer of its own size, so its bytes are copied once, by the kernel. The buffer
//! comes from the shard's [`FramePool`] and goes back to it when the request is done
//! with (up to `limits::FRAME_POOL_BYTES_MAX` kept, the newest first; a reused buffer
//! is at most an eighth longer than its frame), so memory is zeroed or faulted in
//! once, not for every frame (a 1 MB memset per frame was 6% of the shard's time in
//! scenario b). Before taking a buffer, the connection takes the frame's size from
//! the shard's request memory (`request_memory_bytes`) and gives it back when the
//! request is answered:
//! while it is used up, connections wait and stop reading (TCP pushes back on their
//! clients). Frames get their memory in arrival order, and must then arrive whole
//! within `frame_timeout_ms`, or the connection is closed. Smaller frames share read
//! chunks; at most `max_in_flight_per_connection` of them are held per connection.
//!
//! Liveness: connections use TCP keepalive (first probe after 60 s idle), so a
//! client whose machine or network went away without closing is dropped within
//! about two minutes instead of holding its slot, and anything it pinned, for good.
//! Idle clients that are alive are never disconnected.

use super::shard::{wait_shutdown, Shard};
use crate::limits;
use crate::protocol::{self, ErrorCode, FrameError, LENGTH_PREFIX_LEN, REQUEST_HEADER_LEN};
use bytes::{Bytes, BytesMut};
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::local_channel;
use glommio::net::TcpStream;
use glommio::sync::Semaphore;
use glommio::sync::StaticPermit;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A shard's memory for large request frames (`request_memory_bytes`).
#[derive(Debug)]
pub struct RequestMemory {
    bytes: Rc<Semaphore>,
    /// Waiters for `bytes` pass one at a time, in arrival order: glommio's semaphore
    /// wakes whichever waiter fits, so a large frame could otherwise wait forever
    /// behind a stream of smaller ones.
    turnstile: Semaphore,
    /// Buffers for the frames that the permits pay for.
    frames: Arc<FramePool>,
}

impl RequestMemory {
    pub fn new(bytes: usize) -> RequestMemory {
        RequestMemory {
            bytes: Rc::new(Semaphore::new(bytes as u64)),
            turnstile: Semaphore::new(1),
            frames: Arc::new(FramePool::new(limits::FRAME_POOL_BYTES_MAX)),
        }
    }

    /// `n` bytes, once every earlier request for memory got its own.
    async fn acquire(&self, n: usize) -> Option<StaticPermit> {
        let _turn = self.turnstile.acquire_permit(1).await.ok()?;
        self.bytes.acquire_static_permit(n as u64).await.ok()
    }
}

/// Large frame buffers that requests are done with, for the next large frames. A
/// frame's buffer returns here when the last `Bytes` of it drops, on whatever thread
/// that happens (a produce handled by another shard), hence the mutex.
#[derive(Debug)]
pub struct FramePool {
    idle: Mutex<Idle>,
    idle_bytes_max: usize,
}

/// Idle buffers, oldest first, and their total length.
#[derive(Debug, Default)]
struct Idle {
    bufs: std::collections::VecDeque<Vec<u8>>,
    bytes: usize,
}

impl FramePool {
    pub fn new(idle_bytes_max: usize) -> FramePool {
        FramePool {
            idle: Mutex::new(Idle::default()),
            idle_bytes_max,
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A buffer of at least `len` bytes and at most an eighth more (the request
    /// memory that pays for the frame counts `len`, so it bounds the buffers in use
    /// within that): an idle one if one fits, else a new zeroed one. Its contents
    /// are whatever an earlier frame left; the caller reads over them.
    pub fn take(self: &Arc<Self>, len: usize) -> FrameBuf {
        let reused = {
            let mut idle = self.idle();
            let best = idle
                .bufs
                .iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= len && b.len() - len <= len / 8)
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i);
            let buf = best.and_then(|i| idle.bufs.remove(i));
            if let Some(b) = &buf {
                idle.bytes -= b.len();
            }
            buf
        };
        FrameBuf {
            buf: reused.unwrap_or_else(|| vec![0; len]),
            pool: self.clone(),
        }
    }

    /// Keeps `buf` for reuse, dropping the oldest idle buffers to stay within the
    /// bound: the newest ones match the frames clients send now.
    fn put(&self, buf: Vec<u8>) {
        if buf.len() > self.idle_bytes_max {
            return;
        }
        let mut idle = self.idle();
        while idle.bytes + buf.len() > self.idle_bytes_max {
            let old = idle
                .bufs
                .pop_front()
                .expect("idle bytes count idle buffers");
            idle.bytes -= old.len();
        }
        idle.bytes += buf.len();
        idle.bufs.push_back(buf);
    }

    /// Bytes of idle buffers.
    pub fn idle_bytes(&self) -> usize {
        self.idle().bytes
    }
}

/// A buffer from a [`FramePool`], returned to it on drop.
#[derive(Debug)]
pub struct FrameBuf {
    buf: Vec<u8>,
    pool: Arc<FramePool>,
}

impl FrameBuf {
    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl AsRef<[u8]> for FrameBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for FrameBuf {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.buf));
    }
}

/// A frame larger than a read chunk, being received into a buffer of its own.
struct LargeFrame {
    buf: FrameBuf,
    /// The frame's length, prefix included.
    total: usize,
    /// The request memory it holds until its request is answered.
    memory: StaticPermit,
    /// When it must be complete, or its connection is closed.
    deadline: Instant,
}

/// Bytes read from the socket at a time when no larger frame is pending.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Largest piece of a response written before the connection checks whether the
/// shard's time slice is used up. Smaller slices cost throughput: with 256 KiB, a
/// consumer catching up (scenario d) read 2,516-2,711 MB/s against 3,374-3,392
/// without slicing (three interleaved pairs); with 2 MiB, 3,345-3,409 against
/// 3,337-3,451. A 2 MiB send takes about 0.8 ms at the loopback's 2.7 GB/s.
const WRITE_SLICE_BYTES: usize = 2 * 1024 * 1024;

type Outgoing = (Vec<u8>, Vec<Bytes>);

/// Turns on TCP keepalive with the probe timing in `limits`.
#[allow(unsafe_code)]
pub(crate) fn keep_alive(socket: &impl std::os::fd::AsRawFd) -> std::io::Result<()> {
    // SAFETY: the descriptor belongs to `socket`, which the caller keeps open for the
    // whole call; the borrow does not outlive it and nothing closes it here.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(socket.as_raw_fd()) };
    let params = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(limits::TCP_KEEPALIVE_IDLE_S))
        .with_interval(Duration::from_secs(limits::TCP_KEEPALIVE_INTERVAL_S))
        .with_retries(limits::TCP_KEEPALIVE_PROBES);
    socket2::SockRef::from(&fd).set_tcp_keepalive(&params)
}

pub async fn serve(shard: &Rc<Shard>, stream: TcpStream) {
    let peer = stream.peer_addr().ok();
    let _ = stream.set_nodelay(true);
    if let Err(e) = keep_alive(&stream) {
        tracing::warn!(?peer, error = %e, "could not turn on TCP keepalive");
    }
    let (mut rd, mut wr) = futures_lite::io::split(stream);
    let cfg = &shard.shared.config;
    let (tx, rx) = local_channel::new_bounded::<Outgoing>(cfg.max_in_flight_per_connection + 2);
    // Dropped when the writer ends (the client went away, or stopped reading), which
    // ends the reader too.
    let (writer_alive, writer_gone) = local_channel::new_bounded::<()>(1);
    let write_timeout = Duration::from_millis(cfg.write_timeout_ms);
    let writer = glommio::spawn_local(async move {
        let _alive = writer_alive;
        // Each response must be taken by the client within the timeout: a client
        // that stops reading would otherwise pin its queued responses (and the cache
        // blocks and maps they point into) for as long as it stays connected.
        while let Some((head, tail)) = rx.recv().await {
            let sent = async {
                wr.write_all(&head).await?;
                for b in &tail {
                    // A socket with room takes a write at once, so a fetch of many
                    // MB would hold the shard for milliseconds: go in slices, and
                    // let the shard's other work (write completions, acks) run
                    // once its time slice is used up.
                    for slice in b.chunks(WRITE_SLICE_BYTES) {
                        wr.write_all(slice).await?;
                        glommio::yield_if_needed().await;
                    }
                }
                wr.flush().await
            };
            let late = async {
                glommio::timer::sleep(write_timeout).await;
                Err(std::io::Error::from(std::io::ErrorKind::TimedOut))
            };
            if let Err(e) = futures_lite::future::or(sent, late).await {
                tracing::debug!(?peer, error = %e, "closing a connection whose client does not take its responses");
                return;
            }
        }
        let _ = wr.close().await;
    });
    let permits = Rc::new(Semaphore::new(cfg.max_in_flight_per_connection as u64));
    let tx = Rc::new(tx);
    // `buf[..filled]` arrived; the rest of `buf` is zeroed room the next read fills.
    // While a large frame is received, `filled` counts its bytes in `large` instead.
    let mut buf = BytesMut::new();
    let mut filled = 0;
    let mut large: Option<LargeFrame> = None;
    'conn: loop {
        // Every whole frame in the buffer.
        loop {
            if let Some(l) = &large {
                if filled < l.total {
                    break;
                }
                let l = large.take().expect("checked");
                filled = 0;
                let frame = Bytes::from_owner(l.buf).slice(LENGTH_PREFIX_LEN..l.total);
                if !dispatch(shard, &tx, &permits, frame, Some(l.memory)).await {
                    break 'conn;
                }
                continue;
            }
            let len = match protocol::declared_len(&buf[..filled], cfg.max_frame_bytes) {
                Ok(Some(len)) => len,
                Ok(None) => break,
                Err(e) => {
                    let code = match e {
                        FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                        FrameError::TooShort { .. } => ErrorCode::MalformedRequest,
                    };
                    tracing::debug!(?peer, error = %e, "closing connection");
                    send_error(&tx, 0, code, &e.to_string()).await;
                    break 'conn;
                }
            };
            let total = LENGTH_PREFIX_LEN + len;
            if filled < total {
                // Not all here yet. A large frame gets a buffer of its own size, so
                // the rest is read straight into place, once its memory is granted.
                if total > READ_CHUNK_BYTES {
                    let granted =
                        futures_lite::future::or(shard.request_memory.acquire(total), async {
                            wait_shutdown(&shard.shared).await;
                            None
                        })
                        .await;
                    let Some(memory) = granted else { break 'conn };
                    let mut frame = shard.request_memory.frames.take(total);
                    frame.as_mut_slice()[..filled].copy_from_slice(&buf[..filled]);
                    buf.clear();
                    large = Some(LargeFrame {
                        buf: frame,
                        total,
                        memory,
                        deadline: Instant::now() + Duration::from_millis(cfg.frame_timeout_ms),
                    });
                }
                break;
            }
            filled -= total;
            let frame = buf.split_to(total).freeze().slice(LENGTH_PREFIX_LEN..);
            if !dispatch(shard, &tx, &permits, frame, None).await {
                break 'conn;
            }
            // One read chunk can hold many small frames. (After a large frame the
            // buffer is empty, and the next read is followed by a yield anyway.)
            glommio::yield_if_needed().await;
        }
        // Holding request memory, the frame must be complete by its deadline.
        let limit = large
            .as_ref()
            .map(|l| l.deadline.saturating_duration_since(Instant::now()));
        // Read more: into the rest of a large frame's buffer, or a chunk.
        let room = match &mut large {
            Some(l) => &mut l.buf.as_mut_slice()[filled..l.total],
            None => {
                if filled == buf.len() {
                    buf.resize(filled + READ_CHUNK_BYTES, 0);
                }
                &mut buf[filled..]
            }
        };
        let gone = async {
            // Ends only when the writer has ended.
            while writer_gone.recv().await.is_some() {}
            None
        };
        let read = futures_lite::future::or(async { Some(rd.read(room).await) }, async {
            match limit {
                Some(d) => {
                    let timeout = async {
                        glommio::timer::sleep(d).await;
                        tracing::debug!(?peer, "closing a connection whose frame came too slowly");
                    };
                    futures_lite::future::or(wait_shutdown(&shard.shared), timeout).await;
                }
                None => wait_shutdown(&shard.shared).await,
            }
            None
        });
        let read = futures_lite::future::or(read, gone).await;
        // A socket with data reads at once: without this, a client streaming
        // large frames keeps the shard in this loop, and the reactor does not reap
        // write completions or submit the next writes meanwhile.
        glommio::yield_if_needed().await;
        match read {
            Some(Ok(n)) if n > 0 => filled += n,
            _ => break,
        }
    }
    // Nothing more is read: let go of the frame being received (and its memory)
    // before waiting for in-flight requests to answer, then close.
    drop((large, buf));
    let _ = permits
        .acquire(cfg.max_in_flight_per_connection as u64)
        .await;
    drop(tx);
    writer.await;
}

/// Decodes one whole frame and starts its request; `memory` is the request memory
/// the frame holds, given back once the request is handled. Returns false when the
/// connection must close (the frame is too short to carry a header).
async fn dispatch(
    shard: &Rc<Shard>,
    tx: &Rc<local_channel::LocalSender<Outgoing>>,
    permits: &Rc<Semaphore>,
    frame: Bytes,
    memory: Option<StaticPermit>,
) -> bool {
    if frame.len() < REQUEST_HEADER_LEN {
        drop(memory);
        let msg = format!(
            "frame of {} bytes is shorter than the request header",
            frame.len()
        );
        send_error(tx, 0, ErrorCode::MalformedRequest, &msg).await;
        return false;
    }
    let (header, req) = match protocol::decode_request(&frame) {
        Ok(x) => x,
        Err(e) => {
            drop((frame, memory));
            let Some(h) = e.header else {
                send_error(tx, 0, e.code, &e.message).await;
                return false;
            };
            send_error(tx, h.correlation_id, e.code, &e.message).await;
            return true;
        }
    };
    let permit = permits
        .acquire_static_permit(1)
        .await
        .expect("semaphore open");
    let shard = shard.clone();
    let tx = tx.clone();
    shard.active.set(shard.active.get() + 1);
    glommio::spawn_local(async move {
        let reply = shard.handle(req).await;
        // The request's bytes are done with: give their memory back now, not
        // after the response is queued behind a client that may not read.
        drop(memory);
        let mut head = Vec::new();
        let tail = match reply {
            Ok(resp) => protocol::encode_response(header.correlation_id, &resp, &mut head),
            Err((code, msg)) => {
                protocol::encode_error(header.correlation_id, code, &msg, &mut head);
                Vec::new()
            }
        };
        let _ = tx.send((head, tail)).await;
        shard.active.set(shard.active.get() - 1);
        drop(permit);
    })
    .detach();
    true
}

async fn send_error(
    tx: &local_channel::LocalSender<Outgoing>,
    correlation_id: u32,
    code: ErrorCode,
    msg: &str,
) {
    let mut head = Vec::new();
    protocol::encode_error(correlation_id, code, msg, &mut head);
    let _ = tx.send((head, Vec::new())).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_buffers_are_reused_within_bounds() {
        let pool = Arc::new(FramePool::new(2_500));
        let a = pool.take(1_000);
        let a_ptr = a.as_ref().as_ptr();
        assert_eq!(a.as_ref().len(), 1_000);
        drop(a);
        assert_eq!(pool.idle_bytes(), 1_000);
        // A frame up to an eighth smaller reuses it ...
        let b = pool.take(900);
        assert_eq!(b.as_ref().as_ptr(), a_ptr, "the idle buffer is reused");
        assert_eq!(pool.idle_bytes(), 0);
        drop(b);
        // ... a smaller one gets a fresh buffer of its own size.
        let small = pool.take(850);
        assert_ne!(small.as_ref().as_ptr(), a_ptr);
        assert_eq!(small.as_ref().len(), 850);
        // A larger frame never gets a smaller buffer.
        let big = pool.take(2_000);
        assert_eq!(big.as_ref().len(), 2_000);
        assert_eq!(pool.idle_bytes(), 1_000);
        // Idle bytes stay within the bound: the oldest idle buffers make room.
        drop(big);
        assert_eq!(pool.idle_bytes(), 2_000, "the 1,000-byte buffer made room");
        drop(small);
        assert_eq!(pool.idle_bytes(), 850, "and then the 2,000-byte one");
        // A buffer over the bound is never kept.
        drop(pool.take(3_000));
        assert_eq!(pool.idle_bytes(), 850);
    }

    #[test]
    fn a_frame_dropped_on_another_thread_returns_its_buffer() {
        let pool = Arc::new(FramePool::new(1 << 20));
        let mut f = pool.take(4_096);
        f.as_mut_slice()[..5].copy_from_slice(b"hello");
        let frame = Bytes::from_owner(f).slice(0..5);
        let piece = frame.slice(1..3);
        drop(frame);
        assert_eq!(pool.idle_bytes(), 0, "a slice still holds it");
        std::thread::spawn(move || assert_eq!(&piece[..], b"el"))
            .join()
            .unwrap();
        assert_eq!(pool.idle_bytes(), 4_096);
    }

    #[test]
    fn keep_alive_sets_the_probe_timing() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let sock = socket2::SockRef::from(&server);
        assert!(!sock.keepalive().unwrap());
        keep_alive(&server).unwrap();
        assert!(sock.keepalive().unwrap());
        assert_eq!(
            sock.keepalive_time().unwrap(),
            Duration::from_secs(limits::TCP_KEEPALIVE_IDLE_S)
        );
        assert_eq!(
            sock.keepalive_interval().unwrap(),
            Duration::from_secs(limits::TCP_KEEPALIVE_INTERVAL_S)
        );
        assert_eq!(
            sock.keepalive_retries().unwrap(),
            limits::TCP_KEEPALIVE_PROBES
        );
        drop(client);
    }
}
