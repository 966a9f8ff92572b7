//! Fuzzes the request decoder the broker runs on every frame: frame splitting with
//! its size bound, then request decoding. Neither may panic, and whatever decodes
//! must encode back to the same request.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use ringbus::protocol::{decode_request, encode_request, frame_len, LENGTH_PREFIX_LEN};

fuzz_target!(|data: &[u8]| {
    // As the connection loop does: split frames off a byte stream.
    let mut rest = data;
    while let Ok(Some(len)) = frame_len(rest, 1 << 20) {
        let frame = Bytes::copy_from_slice(&rest[LENGTH_PREFIX_LEN..LENGTH_PREFIX_LEN + len]);
        if let Ok((h, req)) = decode_request(&frame) {
            let mut out = Vec::new();
            encode_request(h.correlation_id, &req, &mut out);
            let again = decode_request(&Bytes::from(out).slice(LENGTH_PREFIX_LEN..)).expect("re-encoded request decodes");
            assert_eq!(again.1, req);
        }
        rest = &rest[LENGTH_PREFIX_LEN + len..];
    }
    // And the raw bytes as one frame body.
    let _ = decode_request(&Bytes::copy_from_slice(data));
});
