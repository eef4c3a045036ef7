//! Recycled block buffers: the memory of block data (GET bodies, block-cache reads) is taken
//! from and given back to a small free list, not to the allocator.
//!
//! Why: a cold 1 GiB read moves 1,024 blocks of 1 MiB through the daemon, each allocated on
//! one thread and freed on another. glibc serves such sizes from per-thread arenas once its
//! mmap threshold has risen past them (it does, after the first free), and memory freed into
//! one arena is not reused by another or returned to the system: measured here, with 24 MiB
//! of read-ahead in flight at most, the heap held ~30 MiB live at its peak (heaptrack) while
//! the daemon's anonymous RSS was still 31 MiB after the read had finished and its peak 69 MiB.
//! A buffer that comes back is also a buffer whose pages are already mapped: no page faults
//! and no zeroing of fresh pages, which were ~7 % of the daemon's CPU over a cold read.
//!
//! The free list keeps at most as many buffers as `--max-buffer-memory` has blocks (set by
//! [`keep_at_most`]): what is in flight is bounded by that budget already, so a recycled
//! buffer never adds to the peak, and memory beyond it goes back to the allocator.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

use crate::cache::BLOCK_SIZE;

/// Capacity of every recycled buffer: one block.
const LEN: usize = BLOCK_SIZE as usize;

/// Smallest request served from the free list. Smaller ones come from the allocator, whose
/// heap serves them without a system call (glibc's initial mmap threshold is 128 KiB), and a
/// whole block for a 4 KiB read would hold 256 times the memory it needs.
const SMALLEST: usize = 128 * 1024;

static FREE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// Buffers kept on the free list; 32 (the default budget's) until [`keep_at_most`] is called.
static KEEP: AtomicUsize = AtomicUsize::new(32);

/// Keeps at most `bytes` of free buffers (in whole blocks) from now on.
pub fn keep_at_most(bytes: u64) {
    KEEP.store((bytes / BLOCK_SIZE) as usize, Ordering::Relaxed);
}

/// An empty buffer with room for at least `len` bytes: a recycled block for `len` from
/// 128 KiB to one block, a new allocation otherwise.
pub fn buffer(len: usize) -> Vec<u8> {
    if (SMALLEST..=LEN).contains(&len)
        && let Some(mut buf) = FREE.lock().unwrap().pop()
    {
        buf.clear();
        return buf;
    }
    Vec::with_capacity(if (SMALLEST..=LEN).contains(&len) {
        LEN
    } else {
        len
    })
}

/// `buf` as [`Bytes`] that give the buffer back to the free list when the last of them (and
/// of their slices) is dropped, if it has a block's capacity and the list has room.
pub fn freeze(buf: Vec<u8>) -> Bytes {
    if buf.capacity() == LEN {
        Bytes::from_owner(Recycled(buf))
    } else {
        Bytes::from(buf)
    }
}

/// A block buffer on its way back to the free list.
struct Recycled(Vec<u8>);

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        let mut free = FREE.lock().unwrap();
        if free.len() < KEEP.load(Ordering::Relaxed) {
            free.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_buffer_comes_back_once_its_last_slice_is_dropped() {
        // Tests share the free list: only what this one does to its own buffer is checked.
        let mut buf = buffer(LEN);
        assert!(buf.is_empty() && buf.capacity() == LEN);
        buf.extend_from_slice(&[7u8; 1000]);
        let addr = buf.as_ptr();
        let bytes = freeze(buf);
        let slice = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(&slice[..], &[7u8; 10]);
        drop(slice);
        let back = FREE.lock().unwrap().iter().any(|b| b.as_ptr() == addr);
        assert!(back, "the buffer is on the free list");
        // Small requests do not take a block.
        assert_eq!(buffer(4096).capacity(), 4096);
        assert_eq!(buffer(2 * LEN).capacity(), 2 * LEN);
    }
}
