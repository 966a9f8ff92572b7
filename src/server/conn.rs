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
//! buffer of its own size, so its bytes are copied once, by the kernel. Before that
//! buffer is made, the connection takes the frame's size from the shard's request
//! memory (`request_memory_bytes`) and gives it back when the request is answered:
//! while it is used up, connections wait and stop reading (TCP pushes back on their
//! clients). Smaller frames share read chunks; at most
//! `max_in_flight_per_connection` of them are held per connection. A client that
//! starts a large frame and then stalls for `frame_stall_timeout_ms` is disconnected,
//! so it cannot keep the memory.

use super::shard::{wait_shutdown, Shard};
use crate::protocol::{self, ErrorCode, FrameError, LENGTH_PREFIX_LEN, REQUEST_HEADER_LEN};
use bytes::{Bytes, BytesMut};
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::local_channel;
use glommio::net::TcpStream;
use glommio::sync::Semaphore;
use glommio::sync::StaticPermit;
use std::rc::Rc;
use std::time::Duration;

/// Bytes read from the socket at a time when no larger frame is pending.
const READ_CHUNK_BYTES: usize = 64 * 1024;

type Outgoing = (Vec<u8>, Vec<Bytes>);

pub async fn serve(shard: &Rc<Shard>, stream: TcpStream) {
    let peer = stream.peer_addr().ok();
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = futures_lite::io::split(stream);
    let cfg = &shard.shared.config;
    let (tx, rx) = local_channel::new_bounded::<Outgoing>(cfg.max_in_flight_per_connection + 2);
    let writer = glommio::spawn_local(async move {
        while let Some((head, tail)) = rx.recv().await {
            if wr.write_all(&head).await.is_err() {
                return;
            }
            for b in tail {
                if wr.write_all(&b).await.is_err() {
                    return;
                }
            }
            if wr.flush().await.is_err() {
                return;
            }
        }
        let _ = wr.close().await;
    });
    let permits = Rc::new(Semaphore::new(cfg.max_in_flight_per_connection as u64));
    let tx = Rc::new(tx);
    // `buf[..filled]` arrived; the rest of `buf` is zeroed room the next read fills.
    let mut buf = BytesMut::new();
    let mut filled = 0;
    // Request memory held for the large frame being received.
    let mut held: Option<StaticPermit> = None;
    'conn: loop {
        // Every whole frame in the buffer.
        loop {
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
                if total > READ_CHUNK_BYTES && held.is_none() {
                    let granted = futures_lite::future::or(
                        async {
                            shard
                                .request_memory
                                .acquire_static_permit(total as u64)
                                .await
                                .ok()
                        },
                        async {
                            wait_shutdown(&shard.shared).await;
                            None
                        },
                    )
                    .await;
                    match granted {
                        Some(p) => held = Some(p),
                        None => break 'conn,
                    }
                }
                if held.is_some() && buf.len() < total {
                    buf.resize(total, 0);
                }
                break;
            }
            let memory = held.take();
            filled -= total;
            let frame = buf.split_to(total).freeze().slice(LENGTH_PREFIX_LEN..);
            if frame.len() < REQUEST_HEADER_LEN {
                let msg = format!(
                    "frame of {} bytes is shorter than the request header",
                    frame.len()
                );
                send_error(&tx, 0, ErrorCode::MalformedRequest, &msg).await;
                break 'conn;
            }
            let (header, req) = match protocol::decode_request(&frame) {
                Ok(x) => x,
                Err(e) => {
                    let Some(h) = e.header else {
                        send_error(&tx, 0, e.code, &e.message).await;
                        break 'conn;
                    };
                    send_error(&tx, h.correlation_id, e.code, &e.message).await;
                    continue;
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
                drop(memory);
            })
            .detach();
        }
        // Read more: into the rest of a large frame's buffer, or a chunk.
        if filled == buf.len() {
            buf.resize(filled + READ_CHUNK_BYTES, 0);
        }
        let room = &mut buf[filled..];
        // Holding request memory, the client must keep sending.
        let stall = held
            .is_some()
            .then(|| Duration::from_millis(cfg.frame_stall_timeout_ms));
        let read = futures_lite::future::or(async { Some(rd.read(room).await) }, async {
            match stall {
                Some(d) => {
                    let timeout = async {
                        glommio::timer::sleep(d).await;
                        tracing::debug!(?peer, "closing a connection that stalled mid-frame");
                    };
                    futures_lite::future::or(wait_shutdown(&shard.shared), timeout).await;
                }
                None => wait_shutdown(&shard.shared).await,
            }
            None
        })
        .await;
        match read {
            Some(Ok(n)) if n > 0 => filled += n,
            _ => break,
        }
    }
    // Let in-flight requests answer, then close.
    let _ = permits
        .acquire(cfg.max_in_flight_per_connection as u64)
        .await;
    drop(tx);
    writer.await;
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
