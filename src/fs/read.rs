//! Reading objects: ranged GETs in parallel, with read-ahead for sequential readers.
//!
//! Each open handle has a [`Reader`]. A reader whose requests follow each other is sequential:
//! its window starts at [`FIRST_WINDOW`] and doubles on each refill up to the configured
//! maximum, and the next window is fetched in the background while the current one is served.
//! A reader that jumps gets exactly the bytes it asked for — no wasted read-ahead. Windows are
//! split into parts fetched concurrently, which is how one stream reaches S3's per-connection
//! throughput many times over. The on-disk block cache will sit under this seam later.

use std::ops::Range;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::future::try_join_all;
use tokio::task::JoinHandle;

use crate::store::{ObjectStore, StoreError, StoreResult};

/// First read-ahead window of a sequential reader: 1 MiB is what one FUSE read asks at most,
/// so a reader that stops early wastes little.
pub const FIRST_WINDOW: u64 = 1024 * 1024;

/// Which object version to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectVersion {
    /// Key.
    pub key: String,
    /// ETag the read is pinned to.
    pub etag: String,
    /// Size of that version.
    pub size: u64,
}

/// How windows are fetched.
#[derive(Debug, Clone, Copy)]
pub struct ReadTuning {
    /// Largest window.
    pub max_window: u64,
    /// Size of each concurrent GET within a window.
    pub part_size: u64,
}

/// Fetches `range` of `version` as concurrent GETs of `part_size`, returned in order. The
/// parts are kept as they arrived: concatenating them would double the memory of a window.
pub async fn fetch_parallel(
    store: &Arc<dyn ObjectStore>,
    version: &ObjectVersion,
    range: Range<u64>,
    part_size: u64,
) -> StoreResult<Vec<Bytes>> {
    let part_size = part_size.max(1);
    let parts = (range.start..range.end)
        .step_by(part_size as usize)
        .map(|s| s..(s + part_size).min(range.end));
    try_join_all(parts.map(|r| store.get_range(&version.key, r, Some(&version.etag)))).await
}

/// Fetched bytes of an object starting at `start`, as consecutive parts.
struct Window {
    start: u64,
    parts: Vec<Bytes>,
}

impl Window {
    fn end(&self) -> u64 {
        self.start + self.parts.iter().map(|p| p.len() as u64).sum::<u64>()
    }

    fn covers(&self, offset: u64) -> bool {
        offset >= self.start && offset < self.end()
    }

    /// Appends the window's bytes from `from` up to `to` (absolute offsets) to `out`;
    /// returns where it stopped.
    fn copy_out(&self, from: u64, to: u64, out: &mut BytesMut) -> u64 {
        let mut part_start = self.start;
        let mut pos = from;
        for part in &self.parts {
            let part_end = part_start + part.len() as u64;
            if pos >= part_start && pos < part_end && pos < to {
                let end = to.min(part_end);
                out.extend_from_slice(
                    &part[(pos - part_start) as usize..(end - part_start) as usize],
                );
                pos = end;
            }
            part_start = part_end;
        }
        pos
    }
}

struct Prefetch {
    start: u64,
    task: JoinHandle<StoreResult<Vec<Bytes>>>,
}

/// Read state of one open handle.
#[derive(Default)]
pub struct Reader {
    next_offset: u64,
    window_size: u64,
    current: Option<Window>,
    prefetch: Option<Prefetch>,
    version: Option<ObjectVersion>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("next_offset", &self.next_offset)
            .field("window_size", &self.window_size)
            .finish()
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if let Some(p) = self.prefetch.take() {
            p.task.abort();
        }
    }
}

impl Reader {
    /// Reads up to `len` bytes at `offset` of `version`.
    pub async fn read(
        &mut self,
        store: &Arc<dyn ObjectStore>,
        version: &ObjectVersion,
        offset: u64,
        len: usize,
        tuning: ReadTuning,
    ) -> StoreResult<Bytes> {
        if self.version.as_ref() != Some(version) {
            // A new version (after an upload or a rename): nothing buffered is valid.
            self.reset();
            self.version = Some(version.clone());
        }
        let end = (offset + len as u64).min(version.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let sequential =
            offset == self.next_offset || self.current.as_ref().is_some_and(|w| w.covers(offset));
        self.next_offset = end;
        if !sequential {
            self.reset_window();
            return store
                .get_range(&version.key, offset..end, Some(&version.etag))
                .await;
        }
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        let mut pos = offset;
        while pos < end {
            if !self.current.as_ref().is_some_and(|w| w.covers(pos)) {
                self.refill(store, version, pos, end, tuning).await?;
            }
            let w = self.current.as_ref().expect("refilled");
            if !w.covers(pos) {
                // The object is shorter than the version said: stop at what exists.
                break;
            }
            pos = w.copy_out(pos, end, &mut out);
        }
        self.maybe_prefetch(store, version, tuning);
        Ok(out.freeze())
    }

    fn reset(&mut self) {
        self.reset_window();
        self.current = None;
        self.next_offset = 0;
    }

    fn reset_window(&mut self) {
        self.window_size = 0;
        if let Some(p) = self.prefetch.take() {
            p.task.abort();
        }
    }

    async fn refill(
        &mut self,
        store: &Arc<dyn ObjectStore>,
        version: &ObjectVersion,
        pos: u64,
        want_end: u64,
        tuning: ReadTuning,
    ) -> StoreResult<()> {
        if let Some(p) = self.prefetch.take() {
            if p.start == pos {
                let parts = p
                    .task
                    .await
                    .map_err(|e| StoreError::Other(format!("read-ahead task: {e}")))??;
                self.current = Some(Window { start: pos, parts });
                return Ok(());
            }
            p.task.abort();
        }
        self.window_size =
            (self.window_size * 2).clamp(FIRST_WINDOW, tuning.max_window.max(FIRST_WINDOW));
        let end = (pos + self.window_size).max(want_end).min(version.size);
        let parts = fetch_parallel(store, version, pos..end, tuning.part_size).await?;
        self.current = Some(Window { start: pos, parts });
        Ok(())
    }

    /// Starts fetching the next window once the reader is past half of the current one.
    fn maybe_prefetch(
        &mut self,
        store: &Arc<dyn ObjectStore>,
        version: &ObjectVersion,
        tuning: ReadTuning,
    ) {
        let Some(w) = &self.current else { return };
        if self.prefetch.is_some() || w.end() >= version.size {
            return;
        }
        let half = w.start + (w.end() - w.start) / 2;
        if self.next_offset < half {
            return;
        }
        self.window_size =
            (self.window_size * 2).clamp(FIRST_WINDOW, tuning.max_window.max(FIRST_WINDOW));
        let start = w.end();
        let end = (start + self.window_size).min(version.size);
        let (store, version) = (store.clone(), version.clone());
        let task = tokio::spawn(async move {
            fetch_parallel(&store, &version, start..end, tuning.part_size).await
        });
        self.prefetch = Some(Prefetch { start, task });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::WriteHeaders;
    use crate::store::mem::{MemStore, Op};

    fn setup(len: usize) -> (Arc<MemStore>, Arc<dyn ObjectStore>, ObjectVersion, Vec<u8>) {
        let mem = Arc::new(MemStore::new());
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        mem.insert("k", &data, WriteHeaders::default());
        let store: Arc<dyn ObjectStore> = mem.clone();
        let etag = futures::executor::block_on(store.head("k")).unwrap().etag;
        let v = ObjectVersion {
            key: "k".into(),
            etag,
            size: len as u64,
        };
        (mem, store, v, data)
    }

    const TUNING: ReadTuning = ReadTuning {
        max_window: 4 * 1024 * 1024,
        part_size: 512 * 1024,
    };

    #[tokio::test]
    async fn sequential_reads_match_and_use_few_large_gets() {
        let (mem, store, v, data) = setup(9 * 1024 * 1024 + 17);
        let mut r = Reader::default();
        let mut got = Vec::new();
        let mut off = 0u64;
        loop {
            let b = r.read(&store, &v, off, 128 * 1024, TUNING).await.unwrap();
            if b.is_empty() {
                break;
            }
            off += b.len() as u64;
            got.extend_from_slice(&b);
        }
        assert_eq!(got, data);
        // 72 reads of 128 KiB served by windows of 1, 2, 4, 4 MiB split in 512 KiB parts.
        assert!(mem.count(Op::Get) <= 20, "{} GETs", mem.count(Op::Get));
    }

    #[tokio::test]
    async fn random_reads_fetch_exactly_what_is_asked() {
        let (mem, store, v, data) = setup(3 * 1024 * 1024);
        let mut r = Reader::default();
        for &(off, len) in &[
            (2_000_000u64, 4096usize),
            (10, 100),
            (3 * 1024 * 1024 - 5, 100),
        ] {
            let b = r.read(&store, &v, off, len, TUNING).await.unwrap();
            let end = (off as usize + len).min(data.len());
            assert_eq!(&b[..], &data[off as usize..end]);
        }
        assert_eq!(mem.count(Op::Get), 3);
    }

    #[tokio::test]
    async fn a_changed_object_is_stale_not_mixed() {
        let (mem, store, v, _) = setup(100);
        mem.insert("k", b"other", WriteHeaders::default());
        let mut r = Reader::default();
        let err = r.read(&store, &v, 0, 10, TUNING).await.unwrap_err();
        assert!(matches!(err, StoreError::PreconditionFailed(_)));
    }
}
