//! One client connection: reads length-prefixed frames, checks each whole frame
//! before decoding it, runs up to `max_in_flight_per_connection` requests at once
//! and writes each response as soon as it is ready (matched by correlation id).
//!
//! Bad input never reaches the log: a frame over the size limit, or too short to
//! carry a header, is answered with an error under correlation id 0 and the
//! connection is closed (the stream cannot be resynchronised); a frame with a
//! readable header but a bad body is answered under its own id and the connection
//! carries on.

use super::shard::{wait_shutdown, Shard};
use crate::protocol::{self, ErrorCode, FrameError, LENGTH_PREFIX_LEN, REQUEST_HEADER_LEN};
use bytes::{Bytes, BytesMut};
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::local_channel;
use glommio::net::TcpStream;
use glommio::sync::Semaphore;
use std::rc::Rc;

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
    let mut buf = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let mut scratch = vec![0u8; READ_CHUNK_BYTES];
    'conn: loop {
        // Every whole frame in the buffer.
        loop {
            let len = match protocol::frame_len(&buf, cfg.max_frame_bytes) {
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
            let frame = buf
                .split_to(LENGTH_PREFIX_LEN + len)
                .freeze()
                .slice(LENGTH_PREFIX_LEN..);
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
            })
            .detach();
        }
        // Read more: the rest of a known frame at once, or a chunk.
        // Read into a fixed scratch buffer: the frame buffer grows only by bytes
        // that arrived, so a large length prefix reserves nothing up front.
        let read =
            futures_lite::future::or(async { Some(rd.read(&mut scratch[..]).await) }, async {
                wait_shutdown(&shard.shared).await;
                None
            })
            .await;
        match read {
            Some(Ok(n)) if n > 0 => buf.extend_from_slice(&scratch[..n]),
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
