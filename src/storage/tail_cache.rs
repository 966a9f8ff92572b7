//! The tail cache: in-memory copies of recently appended batches, so that consumers
//! near the tail read from memory instead of faulting the segment in from disk.
//!
//! Appends reach the disk with O_DIRECT, past the page cache, so without this every
//! read of fresh data is a disk read on the shard's own thread (400-650 MB/s of mmap
//! faults here, against a disk that writes 1.2-1.6 GB/s). Kafka gets the same effect
//! from the kernel's page cache; Redpanda keeps a batch cache like this one.
//!
//! What it owns:
//! - [`CacheMemory`]: one per broker: the budget, the bytes published under it, and
//!   the pool of blocks waiting for reuse.
//! - [`CacheBudget`]: one shard's view of it: the shard's pieces in the order they
//!   were published. Memory is counted in whole blocks, as taken: a shard that needs
//!   a block while the blocks out would pass the budget, and that holds more than
//!   its fair share, first evicts its own oldest pieces until one of its blocks comes
//!   back. The cache keeps the most recently written data, and a full cache recycles
//!   its own blocks instead of mapping (and zeroing) new ones.
//! - [`SegmentCache`]: one per segment that was written since the broker started. An
//!   append copies the batch (with its stamped base offset) into an open block; when
//!   the batch's write completes, [`SegmentCache::publish`] freezes the written prefix
//!   into an immutable piece (`bytes::Bytes`, shared with any reader). Pieces hold
//!   whole batches, so a reader never has to join a batch from two pieces.
//!
//! Readers get `Bytes` slices of pieces: evicting a piece drops the cache's reference,
//! and its block goes back to the budget's pool once the last reader lets go.
//!
//! Blocks are recycled, and mapped with transparent huge pages, because fresh memory
//! is what costs: with a new 8 MiB allocation per block, zeroing and faulting in 4 KiB
//! pages took a quarter of the shard's time and memory-durability appends fell from
//! about 1.2 GB/s to 178 MB/s. This is why the module may use `unsafe`: a block is
//! written (once, front to back, by its one segment cache) while readers hold slices
//! of its frozen prefix.
#![allow(unsafe_code)]

use crate::storage::copy::copy_streaming;
use bytes::Bytes;
use memmap2::MmapMut;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Unused blocks kept for reuse at least; the pool keeps up to the budget's worth.
const FREE_BLOCKS_MIN: usize = 16;

/// The broker-wide side of the cache, shared by every shard: the budget, the bytes
/// published under it, and the blocks waiting for reuse. A block returns to the
/// pool when the last `Bytes` of it drops, on whatever thread that happens.
pub struct CacheMemory {
    budget: u64,
    /// The standard block size; only blocks of this size are pooled.
    block: usize,
    /// Shards sharing the budget: a shard below `budget / shares` never evicts.
    shares: u64,
    /// Bytes published and not yet evicted (what readers can be served).
    used: AtomicU64,
    /// Bytes of blocks taken from the pool or mapped, and not yet given back: the
    /// memory the budget bounds, including open blocks, the unused end of each block
    /// and blocks that readers still hold after eviction.
    held: AtomicU64,
    /// One block per segment cache that may still take appends: open blocks are
    /// memory the published bytes do not count, so they get at most half the budget.
    reserved: AtomicU64,
    free: Mutex<Vec<MmapMut>>,
    free_max: usize,
    /// Blocks mapped fresh (not reused) so far.
    mapped: AtomicU64,
}

impl std::fmt::Debug for CacheMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CacheMemory({} of {} bytes)", self.used(), self.budget)
    }
}

impl CacheMemory {
    /// A cache of `budget` bytes in blocks of `block` bytes, shared by `shares`
    /// shards.
    pub fn new(budget: u64, block: usize, shares: usize) -> Arc<CacheMemory> {
        let block = block.max(1);
        let blocks = usize::try_from(budget / block as u64).unwrap_or(usize::MAX);
        Arc::new(CacheMemory {
            budget,
            block,
            shares: shares.max(1) as u64,
            used: AtomicU64::new(0),
            held: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
            free: Mutex::new(Vec::new()),
            free_max: blocks.max(FREE_BLOCKS_MIN),
            mapped: AtomicU64::new(0),
        })
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Bytes published and not yet evicted, across every shard.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Bytes of blocks in use (taken and not given back), across every shard.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Blocks mapped so far (every other block used was recycled).
    pub fn blocks_mapped(&self) -> u64 {
        self.mapped.load(Ordering::Relaxed)
    }

    fn free(&self) -> std::sync::MutexGuard<'_, Vec<MmapMut>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the pool plus the blocks in use cover the budget (nothing is left
    /// for [`CacheMemory::prefault`] to do).
    pub fn is_warm(&self) -> bool {
        self.budget < self.block as u64
            || (self.free().len() * self.block) as u64 + self.held() + self.block as u64
                > self.budget
    }

    /// Maps and touches blocks until the pool and the cache together hold the
    /// budget, or `stop` is set. Meant for a background thread at start-up: memory
    /// touched for the first time is slow (zeroing and faulting it took half of a
    /// shard's time and cut appends to a third on this machine), so the shards
    /// should find it ready. Returns the blocks it added.
    pub fn prefault(&self, stop: &AtomicBool) -> std::io::Result<usize> {
        let mut added = 0;
        while !self.is_warm() && !stop.load(Ordering::Relaxed) {
            let mut m = self.map(self.block)?;
            for i in (0..m.len()).step_by(4096) {
                m[i] = 0;
            }
            self.free().push(m);
            added += 1;
        }
        Ok(added)
    }

    /// A pooled block, when `len` is the standard size and the pool has one.
    fn take_pooled(&self, len: usize) -> Option<MmapMut> {
        let m = if len == self.block {
            self.free().pop()
        } else {
            None
        }?;
        self.held.fetch_add(len as u64, Ordering::Relaxed);
        Some(m)
    }

    /// A freshly mapped block of `len` bytes.
    fn take_fresh(&self, len: usize) -> std::io::Result<MmapMut> {
        let m = self.map(len)?;
        self.held.fetch_add(len as u64, Ordering::Relaxed);
        Ok(m)
    }

    /// Whether a new block of `len` bytes stays within the budget.
    fn fits(&self, len: usize) -> bool {
        self.held() + len as u64 <= self.budget
    }

    /// Returns a block to the pool; oversized ones and those past the pool's limit
    /// are unmapped.
    fn give_back(&self, m: MmapMut) {
        self.held.fetch_sub(m.len() as u64, Ordering::Relaxed);
        let mut f = self.free();
        if f.len() < self.free_max && m.len() == self.block {
            f.push(m);
        }
    }

    fn map(&self, len: usize) -> std::io::Result<MmapMut> {
        let m = MmapMut::map_anon(len)?;
        self.mapped.fetch_add(1, Ordering::Relaxed);
        // Fewer, larger faults; advisory, so a refusal changes nothing.
        let _ = m.advise(memmap2::Advice::HugePage);
        Ok(m)
    }
}

/// A block of cache memory: written front to back by one [`SegmentCache`], read
/// through [`Frozen`] slices of the part already written.
struct Block {
    /// Start of `mem`; writes and reads go through it, never through `mem` itself.
    ptr: *mut u8,
    len: usize,
    mem: Option<MmapMut>,
    /// Where `mem` goes back to when the block drops.
    pool: Arc<CacheMemory>,
    /// The taking shard's count of bytes in its blocks (see [`Ledger::held`]).
    owner: Arc<AtomicU64>,
}

// SAFETY: the raw pointer refers to `mem`, which the block owns and which lives as
// long as it does. Bytes below a frozen length are never written again, and only
// they are read (by any thread); bytes above it are written only by the single
// `SegmentCache` that holds the block open, on its shard's thread.
unsafe impl Send for Block {}
// SAFETY: as above: shared access only ever reads frozen bytes.
unsafe impl Sync for Block {}

impl Block {
    /// Wraps `mem`, already counted in the pool's and `owner`'s held bytes.
    fn new(mut mem: MmapMut, pool: &Arc<CacheMemory>, owner: &Arc<AtomicU64>) -> Block {
        owner.fetch_add(mem.len() as u64, Ordering::Relaxed);
        Block {
            ptr: mem.as_mut_ptr(),
            len: mem.len(),
            mem: Some(mem),
            pool: pool.clone(),
            owner: owner.clone(),
        }
    }

    /// Copies `src` to `at`.
    ///
    /// # Safety
    /// `[at, at + src.len())` must lie in the block, and no [`Frozen`] may cover
    /// any of it (the caller freezes only bytes it wrote before).
    unsafe fn write(&self, at: usize, src: &[u8]) {
        assert!(at + src.len() <= self.len, "write past the block");
        // SAFETY: in bounds (checked above); the caller guarantees that no reader
        // holds these bytes, so this is the only reference to them, and `src`
        // cannot overlap memory this block owns exclusively for writing.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.ptr.add(at), src.len()) };
        copy_streaming(dst, src);
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        if let Some(m) = self.mem.take() {
            self.owner.fetch_sub(m.len() as u64, Ordering::Relaxed);
            self.pool.give_back(m);
        }
    }
}

/// Written bytes `[start, end)` of a block, as a `Bytes` owner.
struct Frozen {
    block: Arc<Block>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for Frozen {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `start..end` lies in the block and was written before this value
        // was made; nothing writes it again while the block lives.
        unsafe { std::slice::from_raw_parts(self.block.ptr.add(self.start), self.end - self.start) }
    }
}

/// One shard's view of the cache: its pieces in the order they were published, so
/// that it evicts its own oldest first, and its counters. Several shards share one
/// [`CacheMemory`]; one busy partition may use the whole budget while the others
/// are idle.
#[derive(Clone)]
pub struct CacheBudget(Rc<RefCell<Ledger>>);

struct Ledger {
    mem: Arc<CacheMemory>,
    /// Published pieces, oldest first: their owner, id and length. An entry whose
    /// piece is gone already (its segment cache was cleared or dropped) is skipped.
    order: VecDeque<(Weak<RefCell<Pieces>>, u64, u64)>,
    next_id: u64,
    /// Pieces of this shard still cached.
    live: usize,
    /// Bytes of the blocks this shard took and that have not come back yet (a block
    /// comes back when its last piece is evicted and its last reader lets go, on
    /// whatever thread that happens).
    held: Arc<AtomicU64>,
    evicted: u64,
    served: u64,
}

impl std::fmt::Debug for CacheBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CacheBudget({:?})", self.0.borrow().mem)
    }
}

impl CacheBudget {
    /// A shard's view of `mem`.
    pub fn new(mem: Arc<CacheMemory>) -> CacheBudget {
        CacheBudget(Rc::new(RefCell::new(Ledger {
            mem,
            order: VecDeque::new(),
            next_id: 0,
            live: 0,
            held: Arc::new(AtomicU64::new(0)),
            evicted: 0,
            served: 0,
        })))
    }

    /// A budget of `bytes` of its own, in blocks of `block` bytes (tests use small
    /// blocks to exercise eviction).
    pub fn with_block_bytes(bytes: u64, block: usize) -> CacheBudget {
        Self::new(CacheMemory::new(bytes, block, 1))
    }

    /// Bytes published and not yet evicted, across every shard.
    pub fn used(&self) -> u64 {
        self.0.borrow().mem.used()
    }

    /// Bytes this shard evicted so far to stay within the budget.
    pub fn evicted(&self) -> u64 {
        self.0.borrow().evicted
    }

    /// Blocks mapped so far (every other block used was recycled).
    pub fn blocks_mapped(&self) -> u64 {
        self.0.borrow().mem.blocks_mapped()
    }

    /// Bytes that this shard's reads took from the cache so far.
    pub fn served(&self) -> u64 {
        self.0.borrow().served
    }

    pub fn budget(&self) -> u64 {
        self.0.borrow().mem.budget
    }

    /// A cache for a segment whose next append lands at file position `pos`, or
    /// `None` when the budget is too small to hold even one block.
    pub(crate) fn segment_cache(&self, pos: u64) -> Option<SegmentCache> {
        let mem = self.0.borrow().mem.clone();
        if mem.budget < mem.block as u64 {
            return None;
        }
        // Reserve this cache's open block; past half the budget, segments go
        // uncached (their reads use the maps) rather than overrun it.
        let block = mem.block as u64;
        let cap = (mem.budget / 2).max(block);
        let reserved = mem
            .reserved
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                (r + block <= cap).then_some(r + block)
            })
            .is_ok();
        reserved.then(|| SegmentCache {
            pieces: Rc::new(RefCell::new(Pieces {
                pieces: VecDeque::new(),
                bytes: 0,
            })),
            opens: VecDeque::new(),
            open_pos: pos,
            unpublished: 0,
            sealed: false,
            reserved: true,
            mem,
            budget: self.clone(),
        })
    }

    /// A block of `len` bytes for one of this shard's segment caches, within the
    /// budget: from the pool, or freshly mapped while the blocks in use leave room.
    /// When they do not and this shard holds more than its fair share, it evicts
    /// its own oldest pieces until one of its blocks comes back. A shard within its
    /// share may pass the budget instead (so idle shards holding the rest cannot
    /// starve it; the total then passes the budget by up to one share). `None` when
    /// neither works: the caller goes uncached until the next block.
    fn take_block(&self, len: usize) -> Option<Block> {
        let mut l = self.0.borrow_mut();
        let mem = l.mem.clone();
        let share = mem.budget / mem.shares;
        let within_share = |l: &Ledger| l.held.load(Ordering::Relaxed) + len as u64 <= share;
        loop {
            if mem.fits(len) || within_share(&l) {
                if let Some(m) = mem.take_pooled(len) {
                    return Some(Block::new(m, &mem, &l.held));
                }
                return mem
                    .take_fresh(len)
                    .ok()
                    .map(|m| Block::new(m, &mem, &l.held));
            }
            if let Some(m) = mem.take_pooled(len) {
                // Another shard's block came back meanwhile.
                return Some(Block::new(m, &mem, &l.held));
            }
            // Evict only if giving back all of this shard's blocks could make room:
            // otherwise (a batch larger than the budget or this shard's share, with
            // other shards holding the rest) it would empty the cache for nothing.
            let others = mem.held().saturating_sub(l.held.load(Ordering::Relaxed));
            let reachable = others + len as u64 <= mem.budget || len as u64 <= share;
            if !reachable || !l.evict_oldest() {
                return None;
            }
        }
    }

    /// Drops ledger entries of pieces already gone, once they outnumber the live
    /// ones (segment caches cleared or dropped leave theirs behind).
    fn compact(&self) {
        let mut l = self.0.borrow_mut();
        if l.order.len() > 2 * l.live + 1024 {
            l.order.retain(|(owner, id, _)| {
                owner.upgrade().is_some_and(|o| {
                    o.borrow()
                        .pieces
                        .front()
                        .is_some_and(|(_, front, _)| front <= id)
                })
            });
        }
    }
}

impl Ledger {
    /// Evicts this shard's oldest piece (skipping entries of pieces already gone).
    /// Returns false when nothing is left to evict.
    fn evict_oldest(&mut self) -> bool {
        while let Some((owner, id, len)) = self.order.pop_front() {
            // A dropped or cleared cache returned its bytes already.
            let Some(owner) = owner.upgrade() else {
                continue;
            };
            let mut p = owner.borrow_mut();
            if p.pieces.front().is_some_and(|(_, front, _)| *front == id) {
                // Dropping the piece may return its block to the pool right here.
                let piece = p.pieces.pop_front();
                p.bytes -= len;
                self.mem.used.fetch_sub(len, Ordering::Relaxed);
                self.live -= 1;
                self.evicted += len;
                drop(p);
                drop(piece);
                return true;
            }
        }
        false
    }
}

/// Published pieces of one segment: `(file position, id, whole batches)`, contiguous
/// and in position order.
struct Pieces {
    pieces: VecDeque<(u64, u64, Bytes)>,
    bytes: u64,
}

/// A block appends are copied into: `filled` bytes written, of which the first
/// `frozen` are published.
struct Open {
    block: Arc<Block>,
    frozen: usize,
    filled: usize,
}

/// The cached bytes of one segment.
pub(crate) struct SegmentCache {
    pieces: Rc<RefCell<Pieces>>,
    /// Blocks holding appended bytes not yet published, oldest first: the bytes
    /// `frozen..filled` of each, which start at file position `open_pos`. Only the
    /// last takes appends; more than one exists while writes lag behind appends
    /// by more than a block.
    opens: VecDeque<Open>,
    open_pos: u64,
    unpublished: u64,
    /// No more appends will come (the segment was sealed).
    sealed: bool,
    /// Holds one block of [`CacheMemory::reserved`] until released.
    reserved: bool,
    mem: Arc<CacheMemory>,
    budget: CacheBudget,
}

impl SegmentCache {
    /// Copies one batch, appended at file position `pos`, as `header` then `body`.
    /// A batch that does not follow the previous one (the caller skipped some)
    /// restarts the cache at `pos`. If memory cannot be had, the cache restarts
    /// with the next batch (reads fall back to the maps meanwhile).
    pub(crate) fn append(&mut self, pos: u64, header: &[u8], body: &[u8]) {
        let len = header.len() + body.len();
        if pos != self.open_pos + self.unpublished {
            self.restart(pos);
        }
        let room = self.opens.back().map_or(0, |o| o.block.len - o.filled);
        if room < len {
            // A batch never spans two blocks.
            let Some(block) = self.budget.take_block(self.mem.block.max(len)) else {
                self.restart(pos + len as u64);
                return;
            };
            self.opens.push_back(Open {
                block: Arc::new(block),
                frozen: 0,
                filled: 0,
            });
        }
        let o = self.opens.back_mut().expect("just ensured");
        // SAFETY: `filled..filled + len` fits (room checked) and lies past `frozen`,
        // so no reader holds any of it.
        unsafe {
            o.block.write(o.filled, header);
            o.block.write(o.filled + header.len(), body);
        }
        o.filled += len;
        self.unpublished += len as u64;
    }

    /// Every byte before file position `written_len` (a batch boundary) is on disk
    /// and may be read: freeze it into pieces (one per block it spans).
    pub(crate) fn publish(&mut self, written_len: u64) {
        let mut n = written_len
            .saturating_sub(self.open_pos)
            .min(self.unpublished);
        while n > 0 {
            // A block frozen to its end is done with (it kept no empty piece).
            while self.opens.len() > 1 && self.opens.front().is_some_and(|o| o.frozen == o.filled) {
                self.opens.pop_front();
            }
            let o = self
                .opens
                .front_mut()
                .expect("unpublished bytes sit in a block");
            // Whole batches: each lies in one block and `written_len` ends one.
            let k = (n as usize).min(o.filled - o.frozen);
            if k == 0 {
                break;
            }
            let piece = Bytes::from_owner(Frozen {
                block: o.block.clone(),
                start: o.frozen,
                end: o.frozen + k,
            });
            o.frozen += k;
            if o.frozen == o.filled && self.opens.len() > 1 {
                self.opens.pop_front();
            }
            let pos = self.open_pos;
            let k = k as u64;
            self.open_pos += k;
            self.unpublished -= k;
            n -= k;
            let id = {
                let mut l = self.budget.0.borrow_mut();
                let id = l.next_id;
                l.next_id += 1;
                l.mem.used.fetch_add(k, Ordering::Relaxed);
                l.live += 1;
                l.order.push_back((Rc::downgrade(&self.pieces), id, k));
                id
            };
            let mut p = self.pieces.borrow_mut();
            p.pieces.push_back((pos, id, piece));
            p.bytes += k;
        }
        self.release_if_done();
        self.budget.compact();
    }

    /// No more appends: once everything is published, the last block is released
    /// (its memory returns when its pieces are evicted).
    pub(crate) fn seal(&mut self) {
        self.sealed = true;
        self.release_if_done();
    }

    fn release_if_done(&mut self) {
        if self.sealed && self.unpublished == 0 {
            self.opens.clear();
            self.unreserve();
        }
    }

    fn unreserve(&mut self) {
        if std::mem::take(&mut self.reserved) {
            self.mem
                .reserved
                .fetch_sub(self.mem.block as u64, Ordering::Relaxed);
        }
    }

    /// Drops everything cached and starts again at file position `pos`.
    fn restart(&mut self, pos: u64) {
        self.clear();
        self.opens.clear();
        self.open_pos = pos;
        self.unpublished = 0;
    }

    /// The cached bytes from file position `pos` to the end of the piece holding it,
    /// cut at `limit`; `None` when `pos` is not cached. A piece always ends on a batch
    /// boundary.
    pub(crate) fn region(&self, pos: u64, limit: u64) -> Option<Bytes> {
        let p = self.pieces.borrow();
        let i = p.pieces.partition_point(|(start, _, _)| *start <= pos);
        let (start, _, piece) = p.pieces.get(i.checked_sub(1)?)?;
        let end = (start + piece.len() as u64).min(limit);
        (pos < end).then(|| piece.slice((pos - start) as usize..(end - start) as usize))
    }

    /// Counts `n` bytes handed to a reader from this cache.
    pub(crate) fn note_served(&self, n: usize) {
        self.budget.0.borrow_mut().served += n as u64;
    }

    /// The first cached file position, if anything is published.
    pub(crate) fn first_pos(&self) -> Option<u64> {
        self.pieces.borrow().pieces.front().map(|(p, _, _)| *p)
    }

    fn clear(&mut self) {
        let mut p = self.pieces.borrow_mut();
        let freed = p.bytes;
        let pieces = p.pieces.len();
        p.pieces.clear();
        p.bytes = 0;
        self.budget.0.borrow_mut().live -= pieces;
        // The ledger's entries for these pieces no longer match a front piece and
        // are skipped when they come up.
        self.mem.used.fetch_sub(freed, Ordering::Relaxed);
    }
}

impl Drop for SegmentCache {
    fn drop(&mut self) {
        self.clear();
        self.unreserve();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(n: usize, fill: u8) -> Vec<u8> {
        vec![fill; n]
    }

    /// Appends and publishes `n` batches of 1,000 bytes of `byte` from position 0.
    fn fill(c: &mut SegmentCache, n: u64, byte: u8) {
        let b = batch(1000, byte);
        for i in 0..n {
            c.append(i * 1000, &b[..10], &b[10..]);
            c.publish((i + 1) * 1000);
        }
    }

    #[test]
    fn publishes_only_written_bytes_and_reads_by_position() {
        let budget = CacheBudget::with_block_bytes(64 << 20, 1 << 20);
        let mut c = budget.segment_cache(4096).unwrap();
        c.append(4096, &batch(10, 1), &batch(90, 2));
        c.append(4196, &batch(10, 3), &batch(40, 4));
        assert!(c.region(4096, u64::MAX).is_none(), "nothing is written yet");
        c.publish(4196);
        assert_eq!(budget.used(), 100);
        let r = c.region(4096, u64::MAX).unwrap();
        assert_eq!(r.len(), 100);
        assert_eq!(&r[..10], &[1; 10]);
        assert!(c.region(4196, u64::MAX).is_none());
        c.publish(4246);
        assert_eq!(
            c.region(4196, u64::MAX).unwrap()[..],
            [&[3u8; 10][..], &[4; 40]].concat()
        );
        assert_eq!(c.region(4100, 4150).unwrap().len(), 50, "cut at the limit");
        assert!(
            c.region(4000, u64::MAX).is_none(),
            "before the first cached byte"
        );
        assert_eq!(c.first_pos(), Some(4096));
    }

    #[test]
    fn oldest_pieces_go_first_across_segments_and_readers_keep_theirs() {
        // Batches of two blocks (each gets a block of its own) under 8 blocks.
        let block = 64 << 10;
        let budget = CacheBudget::with_block_bytes(8 * block as u64, block);
        let mut a = budget.segment_cache(0).unwrap();
        let mut b = budget.segment_cache(0).unwrap();
        let big = batch(2 * block, 7);
        a.append(0, &big[..1], &big[1..]);
        a.publish(big.len() as u64);
        let held = a.region(0, u64::MAX).unwrap();
        for i in 0..4u64 {
            let pos = i * big.len() as u64;
            b.append(pos, &big[..1], &big[1..]);
            b.publish(pos + big.len() as u64);
        }
        // 5 pieces of 2 blocks each into a budget of 8 blocks: a's piece (the
        // oldest) went first, but `held` still pins its memory, so b's oldest had
        // to go as well before a fifth piece fitted.
        assert_eq!(budget.evicted(), 2 * big.len() as u64);
        assert!(a.region(0, u64::MAX).is_none());
        assert!(b.region(0, u64::MAX).is_none());
        assert!(b.region(big.len() as u64, u64::MAX).is_some());
        assert_eq!(budget.used(), 3 * big.len() as u64);
        assert!(budget.0.borrow().mem.held() <= 8 * block as u64);
        assert_eq!(held.len(), big.len());
        assert!(
            held.iter().all(|&x| x == 7),
            "a reader's slice outlives eviction"
        );
        drop(b);
        assert_eq!(budget.used(), 0, "a dropped segment returns its bytes");
    }

    #[test]
    fn writes_lagging_by_several_blocks_publish_in_order() {
        let block = 16 * 1024;
        let budget = CacheBudget::with_block_bytes(1 << 20, block);
        let mut c = budget.segment_cache(0).unwrap();
        // 70 batches of 1000 bytes (16 per block) before any write completes.
        for i in 0..70u64 {
            let b = batch(1000, i as u8);
            c.append(i * 1000, &b[..10], &b[10..]);
        }
        c.publish(35_000);
        c.publish(70_000);
        for i in 0..70u64 {
            let r = c.region(i * 1000, u64::MAX).unwrap();
            assert_eq!(r[0], i as u8, "batch {i}");
            assert_eq!(r.len() % 1000, 0, "regions end on batch boundaries");
        }
        assert_eq!(budget.used(), 70_000);
        // Sealed and fully published: every block but those pieces hold is let go.
        c.seal();
        assert!(c.opens.is_empty());
    }

    #[test]
    fn prefault_fills_the_pool_and_appends_reuse_it() {
        let block = 16 * 1024;
        let mem = CacheMemory::new(8 * block as u64, block, 1);
        assert!(!mem.is_warm());
        let added = mem.prefault(&AtomicBool::new(false)).unwrap();
        assert!(mem.is_warm());
        assert!((7..=8).contains(&added), "added {added}");
        let budget = CacheBudget::new(mem.clone());
        let mut c = budget.segment_cache(0).unwrap();
        fill(&mut c, 500, 5);
        assert!(
            mem.blocks_mapped() <= added as u64 + 2,
            "mapped {} after prefaulting {added}",
            mem.blocks_mapped()
        );
        assert!(mem.used() <= 8 * block as u64);
    }

    #[test]
    fn a_full_cache_recycles_its_blocks_instead_of_mapping_more() {
        // Batches that leave the end of each block unused, and segments that roll
        // mid-block: published bytes stay below the budget while the blocks holding
        // them fill it. The cache must then evict and reuse, not map fresh memory
        // (first-touch zeroing on the shard's thread stalled appends for 10 ms a
        // block on the development machine).
        let block = 16 * 1024;
        let mem = CacheMemory::new(8 * block as u64, block, 1);
        let added = mem.prefault(&AtomicBool::new(false)).unwrap() as u64;
        let budget = CacheBudget::new(mem.clone());
        let b = batch(1500, 9);
        let mut segments = Vec::new();
        for seg in 0..20u64 {
            let mut c = budget.segment_cache(0).unwrap();
            for i in 0..25u64 {
                c.append(i * 1500, &b[..10], &b[10..]);
                c.publish((i + 1) * 1500);
            }
            c.seal();
            assert!(c.region(24 * 1500, u64::MAX).is_some(), "segment {seg}");
            assert!(mem.held() <= mem.budget(), "held {}", mem.held());
            // Keep the segment's pieces cached, as a partition keeps its segments.
            segments.push(c);
        }
        assert_eq!(mem.blocks_mapped(), added, "no block mapped after the pool");
        assert!(budget.evicted() > 0);
    }

    #[test]
    fn a_batch_that_cannot_fit_evicts_nothing() {
        let block = 16 * 1024;
        let budget = CacheBudget::with_block_bytes(8 * block as u64, block);
        let mut c = budget.segment_cache(0).unwrap();
        fill(&mut c, 20, 4);
        let used = budget.used();
        // Larger than the whole budget, in the next segment: that one goes uncached,
        // and what the first holds stays.
        let mut d = budget.segment_cache(0).unwrap();
        let huge = batch(9 * block, 5);
        d.append(0, &huge[..10], &huge[10..]);
        d.publish(huge.len() as u64);
        assert!(d.region(0, u64::MAX).is_none());
        assert_eq!(budget.evicted(), 0);
        assert_eq!(budget.used(), used);
        assert!(c.region(0, u64::MAX).is_some());
    }

    #[test]
    fn blocks_are_recycled_once_evicted() {
        let block = 16 * 1024;
        let budget = CacheBudget::with_block_bytes(4 * block as u64, block);
        let mut c = budget.segment_cache(0).unwrap();
        fill(&mut c, 2000, 3);
        // 2 MB through a 64 KiB budget: never more blocks than the budget holds.
        assert!(
            budget.blocks_mapped() <= 4,
            "mapped {}",
            budget.blocks_mapped()
        );
    }

    #[test]
    fn a_gap_restarts_the_cache() {
        let budget = CacheBudget::with_block_bytes(64 << 20, 1 << 20);
        let mut c = budget.segment_cache(0).unwrap();
        c.append(0, &batch(4, 1), &batch(4, 1));
        c.publish(8);
        c.append(100, &batch(4, 2), &batch(4, 2));
        c.publish(108);
        assert!(c.region(0, u64::MAX).is_none());
        assert_eq!(c.region(100, u64::MAX).unwrap().len(), 8);
        assert_eq!(budget.used(), 8);
    }

    #[test]
    fn open_blocks_take_at_most_half_the_budget_and_come_back() {
        let block = 16 * 1024;
        let budget = CacheBudget::with_block_bytes(8 * block as u64, block);
        let caches: Vec<_> = (0..4).map(|_| budget.segment_cache(0).unwrap()).collect();
        assert!(
            budget.segment_cache(0).is_none(),
            "a fifth open block would pass half"
        );
        drop(caches);
        let mut c = budget.segment_cache(0).unwrap();
        c.append(0, &[1; 10], &[2; 90]);
        c.publish(100);
        c.seal();
        let more: Vec<_> = (0..4).map(|_| budget.segment_cache(0)).collect();
        assert!(
            more.iter().all(Option::is_some),
            "a sealed, published cache let go"
        );
        assert_eq!(c.region(0, u64::MAX).unwrap().len(), 100);
    }

    #[test]
    fn an_idle_shard_cannot_take_a_busy_ones_whole_share() {
        let block = 16 * 1024;
        let mem = CacheMemory::new(8 * block as u64, block, 2);
        let idle = CacheBudget::new(mem.clone());
        let busy = CacheBudget::new(mem.clone());
        let mut i = idle.segment_cache(0).unwrap();
        // 16 batches fill a block: 120 take the idle shard to 8 blocks, the budget.
        fill(&mut i, 120, 1);
        assert!(mem.used() <= 8 * block as u64);
        let mut c = busy.segment_cache(0).unwrap();
        fill(&mut c, 200, 1);
        // The busy shard keeps about its share (half) instead of nothing.
        assert!(c.region(199 * 1000, u64::MAX).is_some());
        assert!(busy.evicted() > 0 && idle.evicted() == 0);
        assert!(mem.held() <= 8 * block as u64 + 4 * block as u64);
    }

    #[test]
    fn the_ledger_forgets_pieces_of_dropped_segments() {
        let block = 16 * 1024;
        let budget = CacheBudget::with_block_bytes(1 << 30, block);
        let b = batch(100, 1);
        for _ in 0..100 {
            let mut c = budget.segment_cache(0).unwrap();
            for k in 0..50u64 {
                c.append(k * 100, &b[..10], &b[10..]);
                c.publish((k + 1) * 100);
            }
        }
        assert_eq!(budget.used(), 0);
        assert!(budget.0.borrow().order.len() <= 2 * 50 + 1024 + 1);
    }

    #[test]
    fn a_budget_below_one_block_disables_the_cache() {
        assert!(CacheBudget::with_block_bytes(1024, 4096)
            .segment_cache(0)
            .is_none());
    }
}
