//! Recycled data buffers: the memory of block data (GET bodies, block-cache reads) and of
//! upload parts read from staging files is taken from and given back to a small free list,
//! not to the allocator.
//!
//! Why: a cold 1 GiB read moves 1,024 blocks of 1 MiB through the daemon, each allocated on
//! one thread and freed on another. glibc serves such sizes from per-thread arenas once its
//! mmap threshold has risen past them (it does, after the first free), and memory freed into
//! one arena is not reused by another or returned to the system: measured here, with 24 MiB
//! of read-ahead in flight at most, the heap held ~30 MiB live at its peak (heaptrack) while
//! the daemon's anonymous RSS was still 31 MiB after the read had finished and its peak 69 MiB.
//! A buffer that comes back is also a buffer whose pages are already mapped: no page faults
//! and no zeroing of fresh pages, which were ~7 % of the daemon's CPU over a cold read and
//! ~12 % over a 1 GiB write (its 8 MiB parts).
//!
//! Buffers come in whole MiB (a block, a part), each size on a list of its own. The lists
//! keep at most `--max-buffer-memory` in all (set by [`keep_at_most`]): what is in flight is
//! bounded by that budget already, so a recycled buffer never adds to the peak, and memory
//! beyond it goes back to the allocator. A buffer coming back takes the place of buffers of
//! other sizes if it must, so the lists follow what the daemon does now.

use std::fs::File;
use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

/// Recycled buffers are whole multiples of this: one block.
const UNIT: usize = crate::cache::BLOCK_SIZE as usize;

/// Smallest request served from the lists. Smaller ones come from the allocator, whose heap
/// serves them without a system call (glibc's initial mmap threshold is 128 KiB), and a whole
/// block for a 4 KiB read would hold 256 times the memory it needs.
const SMALLEST: usize = 128 * 1024;

/// Free buffers by capacity, and the bytes they hold.
struct FreeLists {
    lists: Vec<(usize, Vec<Vec<u8>>)>,
    bytes: usize,
}

impl FreeLists {
    const fn new() -> Self {
        FreeLists {
            lists: Vec::new(),
            bytes: 0,
        }
    }

    /// A free buffer of exactly `capacity`, if there is one.
    fn take(&mut self, capacity: usize) -> Option<Vec<u8>> {
        let buf = self
            .lists
            .iter_mut()
            .find(|(c, _)| *c == capacity)
            .and_then(|(_, list)| list.pop())?;
        self.bytes -= capacity;
        Some(buf)
    }

    /// Keeps `buf` unless that would hold more than `keep` bytes even after letting go of
    /// the buffers of other sizes: the size in use now has the room (a write's parts go
    /// when reads follow).
    fn give(&mut self, buf: Vec<u8>, keep: usize) {
        let capacity = buf.capacity();
        if capacity > keep {
            return;
        }
        while self.bytes + capacity > keep {
            let Some((other, list)) = self
                .lists
                .iter_mut()
                .find(|(c, list)| *c != capacity && !list.is_empty())
            else {
                return;
            };
            let other = *other;
            list.pop();
            self.bytes -= other;
        }
        self.bytes += capacity;
        match self.lists.iter_mut().find(|(c, _)| *c == capacity) {
            Some((_, list)) => list.push(buf),
            None => self.lists.push((capacity, vec![buf])),
        }
    }
}

static FREE: Mutex<FreeLists> = Mutex::new(FreeLists::new());

/// Bytes of free buffers kept; the default budget's 32 MiB until [`keep_at_most`] is called.
static KEEP: AtomicUsize = AtomicUsize::new(32 << 20);

/// Keeps at most `bytes` of free buffers from now on.
pub fn keep_at_most(bytes: u64) {
    KEEP.store(
        usize::try_from(bytes).unwrap_or(usize::MAX),
        Ordering::Relaxed,
    );
}

/// An empty buffer with room for at least `len` bytes: a recycled one (`len` rounded up to
/// whole MiB) from 128 KiB on, a new allocation of exactly `len` below.
pub fn buffer(len: usize) -> Vec<u8> {
    if len < SMALLEST {
        return Vec::with_capacity(len);
    }
    let capacity = len.div_ceil(UNIT) * UNIT;
    let reused = FREE.lock().unwrap().take(capacity);
    match reused {
        Some(mut buf) => {
            buf.clear();
            buf
        }
        None => Vec::with_capacity(capacity),
    }
}

/// Exactly `len` bytes of `file` at `offset`, read into a (recycled) buffer without zeroing
/// it first (`vec![0; len]` before a read costs a memset and, for fresh pages, a fault per
/// page), failing on a short read.
pub fn read_at(file: &File, len: usize, offset: u64) -> io::Result<Vec<u8>> {
    let mut buf = buffer(len);
    while buf.len() < len {
        let at = offset + buf.len() as u64;
        let n = rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), at)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    // The capacity may exceed `len`, and a read may then have gone past it.
    buf.truncate(len);
    Ok(buf)
}

/// `buf` as [`Bytes`] that give the buffer back to its free list when the last of them (and
/// of their slices) is dropped, if it is of a recycled size and the lists have room.
pub fn freeze(buf: Vec<u8>) -> Bytes {
    if buf.capacity() >= UNIT && buf.capacity().is_multiple_of(UNIT) {
        Bytes::from_owner(Recycled(buf))
    } else {
        Bytes::from(buf)
    }
}

/// A buffer on its way back to its free list.
struct Recycled(Vec<u8>);

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        let keep = KEEP.load(Ordering::Relaxed);
        FREE.lock().unwrap().give(buf, keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_free(addr: *const u8) -> bool {
        let free = FREE.lock().unwrap();
        free.lists
            .iter()
            .any(|(_, list)| list.iter().any(|b| b.as_ptr() == addr))
    }

    #[test]
    fn a_buffer_comes_back_once_its_last_slice_is_dropped() {
        // Tests share the lists: only what this one does to its own buffers is checked.
        for len in [UNIT, 3 * UNIT - 5] {
            let mut buf = buffer(len);
            assert!(buf.is_empty() && buf.capacity() == len.div_ceil(UNIT) * UNIT);
            buf.extend_from_slice(&[7u8; 1000]);
            let addr = buf.as_ptr();
            let bytes = freeze(buf);
            let slice = bytes.slice(10..20);
            drop(bytes);
            assert!(!is_free(addr), "a slice still holds it");
            assert_eq!(&slice[..], &[7u8; 10]);
            drop(slice);
            assert!(is_free(addr), "the buffer is on its free list");
        }
        // Small requests take no recycled buffer.
        assert_eq!(buffer(4096).capacity(), 4096);
    }

    #[test]
    fn the_lists_keep_their_limit_and_make_room_for_the_size_in_use() {
        let mut lists = FreeLists::new();
        let keep = 4 * UNIT;
        // Two parts of 2 MiB fill the lists.
        lists.give(Vec::with_capacity(2 * UNIT), keep);
        lists.give(Vec::with_capacity(2 * UNIT), keep);
        assert_eq!(lists.bytes, 4 * UNIT);
        // Blocks coming back now take the parts' place: a part goes when a block does not fit.
        for _ in 0..3 {
            lists.give(Vec::with_capacity(UNIT), keep);
        }
        assert_eq!(lists.bytes, 3 * UNIT);
        assert!(lists.take(2 * UNIT).is_none(), "both parts were let go");
        // A fourth block fits; a fifth does not, and nothing of its size is let go for it.
        lists.give(Vec::with_capacity(UNIT), keep);
        lists.give(Vec::with_capacity(UNIT), keep);
        assert_eq!(lists.bytes, 4 * UNIT);
        for _ in 0..4 {
            assert_eq!(lists.take(UNIT).map(|b| b.capacity()), Some(UNIT));
        }
        assert!(lists.take(UNIT).is_none());
        assert_eq!(lists.bytes, 0);
        // A buffer larger than the limit is never kept.
        lists.give(Vec::with_capacity(8 * UNIT), keep);
        assert_eq!(lists.bytes, 0);
    }

    #[test]
    fn a_read_fills_exactly_the_bytes_asked_for() {
        use std::io::Write;
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        f.write_all(&data).unwrap();
        assert_eq!(
            read_at(&f, 200_000, 50_000).unwrap(),
            &data[50_000..250_000]
        );
        assert_eq!(read_at(&f, 10, 7).unwrap(), &data[7..17]);
        let short = read_at(&f, 1000, 299_500).unwrap_err();
        assert_eq!(short.kind(), io::ErrorKind::UnexpectedEof);
    }
}
