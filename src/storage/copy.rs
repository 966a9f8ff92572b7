//! Streaming copies: appended bytes copied into memory that the CPU does not read
//! back soon (the tail cache's blocks and the staging chunks the disk reads by DMA),
//! with non-temporal stores that bypass the cache.
//!
//! A plain `memcpy` of a batch first reads every destination line into the cache
//! (read for ownership), then evicts other data to hold it: for a 1 MB batch that
//! is twice the memory traffic, and the cache ends up holding bytes that only a
//! later `send` reads. glibc switches to non-temporal stores only above about three
//! quarters of the last-level cache, far above a batch.
//!
//! Measured with scenario b (1 producer, 1 KB x 1000, memory durability), three
//! interleaved runs each: 2,154-2,366 MB/s with the tail cache's copy streaming,
//! 1,581-1,711 with plain copies, 1,777-1,999 with the staging copy streaming too
//! (the disk's DMA then reads the staging buffer from memory instead of the cache).
//! That was on an Intel Xeon host. On the AMD EPYC host of 2026-11-28 the staging
//! copy streaming won instead, six interleaved pairs of b: 1,985-2,469 against
//! 1,748-2,050 MB/s (the host's I/O thread there does not share our L3, so its read
//! comes from memory either way, and only the read for ownership is saved). The
//! staging copy streams now, for the host the project runs on today; on the Xeon
//! this choice should be measured again (there b ran at 0.89-0.97x loopback with the
//! plain copy; on the EPYC the plain copy gave 0.58x in a bench run).
#![allow(unsafe_code)]

/// Shorter copies go through `copy_from_slice`: the set-up costs more than the
/// cache traffic saved.
const STREAMING_BYTES_MIN: usize = 4096;

/// Copies `src` into `dst` (of the same length), with non-temporal stores when
/// the CPU has them and the copy is long.
pub fn copy_streaming(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy of unequal lengths");
    if src.len() >= STREAMING_BYTES_MIN {
        #[cfg(target_arch = "x86_64")]
        {
            stream_x86_64(dst, src);
            return;
        }
    }
    dst.copy_from_slice(src);
}

#[cfg(target_arch = "x86_64")]
fn stream_x86_64(dst: &mut [u8], src: &[u8]) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
    // Non-temporal stores need 16-byte aligned destinations: copy up to the first
    // aligned byte normally.
    let head = dst.as_ptr().align_offset(16).min(dst.len());
    dst[..head].copy_from_slice(&src[..head]);
    let (dst, src) = (&mut dst[head..], &src[head..]);
    let body = dst.len() / 64 * 64;
    let d = dst.as_mut_ptr();
    let s = src.as_ptr();
    let mut i = 0;
    while i < body {
        // SAFETY: SSE2 is part of x86_64. `i + 64 <= body <= len` of both slices,
        // so every load and store is in bounds; `d + i` is 16-byte aligned (the
        // head was copied above, and `i` steps by 64); unaligned loads need no
        // alignment. `dst` and `src` are distinct borrows, so they do not overlap.
        unsafe {
            let a = _mm_loadu_si128(s.add(i) as *const __m128i);
            let b = _mm_loadu_si128(s.add(i + 16) as *const __m128i);
            let c = _mm_loadu_si128(s.add(i + 32) as *const __m128i);
            let e = _mm_loadu_si128(s.add(i + 48) as *const __m128i);
            _mm_stream_si128(d.add(i) as *mut __m128i, a);
            _mm_stream_si128(d.add(i + 16) as *mut __m128i, b);
            _mm_stream_si128(d.add(i + 32) as *mut __m128i, c);
            _mm_stream_si128(d.add(i + 48) as *mut __m128i, e);
        }
        i += 64;
    }
    // SAFETY: SSE2 is part of x86_64. The fence orders the streaming stores before
    // every later store, so whoever learns of these bytes through a later write
    // (a published length, a submitted I/O) sees them.
    unsafe { _mm_sfence() };
    dst[body..].copy_from_slice(&src[body..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_every_length_and_alignment() {
        let src: Vec<u8> = (0..20_000u32).map(|i| (i * 7 + 3) as u8).collect();
        for len in [0, 1, 15, 63, 64, 4095, 4096, 4097, 5000, 12_345] {
            for off in [0, 1, 7, 15, 16] {
                let mut dst = vec![0xAAu8; len + off + 32];
                copy_streaming(&mut dst[off..off + len], &src[3..3 + len]);
                assert_eq!(
                    &dst[off..off + len],
                    &src[3..3 + len],
                    "len {len} off {off}"
                );
                assert!(dst[..off].iter().all(|&b| b == 0xAA), "wrote before");
                assert!(dst[off + len..].iter().all(|&b| b == 0xAA), "wrote after");
            }
        }
    }
}
