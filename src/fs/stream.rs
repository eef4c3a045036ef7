//! Streaming uploads: a file written from empty, front to back, goes up while it is written.
//!
//! Once such a file passes the multipart threshold, a multipart upload starts and every part
//! the writer has moved past is sent in the background, read back from the staging file. At
//! `close()` only the last parts are left to send, so closing a 1 GiB file takes about as
//! long as sending its last few parts, not the whole file.
//!
//! The parts are cut by a fixed schedule, since the final size is unknown while writing:
//! 1,000 parts of the part size (8 MiB by default), then 1,000 of twice that, and so on
//! (capped at S3's 5 GiB per part). With 8 MiB this reaches 7.8 TiB within 10,000 parts,
//! above S3's 5 TiB limit for an object.
//!
//! A stream is an optimisation and never the only copy: the staging file keeps every byte.
//! Anything that breaks the front-to-back pattern (a write or truncate behind what was sent,
//! a rename, a failed part) abandons the stream — its upload is aborted — and the file is
//! uploaded the ordinary way at close.
//!
//! The streamed object carries mode, owner and xattrs but no time headers: its mtime is its
//! Last-Modified, which is when `close()` completed it. Times set explicitly while it was
//! written (`cp -p`, `rsync`) are written with the other headers after completion.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::budget::MemoryBudget;
use super::write::send_local_part;
use crate::cache::staging::StagingReader;
use crate::store::{CompletedPart, MAX_PART_SIZE, MIN_PART_SIZE, ObjectStore, StoreError};
use crate::store::{Expect, StoreResult, WriteHeaders};

/// Parts per size step of the schedule.
const PARTS_PER_STEP: u64 = 1000;

/// Header names that a streamed upload leaves out (see the module docs).
const TIME_HEADERS: [&str; 3] = ["mtime", "ctime", "atime"];

/// Bytes covered by part `n` (from 0) of a stream whose first parts are `base` bytes.
pub fn streamed_part(n: u64, base: u64) -> Range<u64> {
    let mut size = base.max(MIN_PART_SIZE);
    let mut start = 0;
    let mut first_of_step = 0;
    while n >= first_of_step + PARTS_PER_STEP {
        start += size * PARTS_PER_STEP;
        size = (size * 2).min(MAX_PART_SIZE);
        first_of_step += PARTS_PER_STEP;
    }
    start += (n - first_of_step) * size;
    start..start + size
}

/// `headers` without the time headers, as a streamed upload sends them.
pub fn without_times(headers: &WriteHeaders) -> WriteHeaders {
    let mut h = headers.clone();
    h.metadata
        .retain(|k, _| !TIME_HEADERS.contains(&k.as_str()));
    h
}

/// What a stream needs from the mount.
#[derive(Clone, Copy)]
pub struct StreamContext<'a> {
    /// The bucket.
    pub store: &'a Arc<dyn ObjectStore>,
    /// Memory for parts in flight.
    pub budget: &'a MemoryBudget,
    /// Parts in flight at once.
    pub concurrency: usize,
}

/// A multipart upload fed while its file is written.
pub struct Stream {
    key: String,
    headers: WriteHeaders,
    upload_id: String,
    base: u64,
    next_part: u64,
    sent_end: u64,
    in_flight: VecDeque<JoinHandle<StoreResult<CompletedPart>>>,
    done: Vec<CompletedPart>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("key", &self.key)
            .field("next_part", &self.next_part)
            .field("sent_end", &self.sent_end)
            .finish()
    }
}

impl Stream {
    /// Starts a multipart upload of `key` with `headers` (time headers left out).
    pub async fn start(
        store: &Arc<dyn ObjectStore>,
        key: String,
        headers: &WriteHeaders,
        base: u64,
    ) -> StoreResult<Stream> {
        let headers = without_times(headers);
        let upload_id = store.create_multipart(&key, &headers).await?;
        debug!(key, "streaming upload started");
        Ok(Stream {
            key,
            headers,
            upload_id,
            base,
            next_part: 0,
            sent_end: 0,
            in_flight: VecDeque::new(),
            done: Vec::new(),
        })
    }

    /// End of the bytes already handed to parts: writes below it break the stream.
    pub fn sent_end(&self) -> u64 {
        self.sent_end
    }

    /// Whether this stream still uploads to `key` with (the time-less part of) `headers`.
    pub fn is_for(&self, key: &str, headers: &WriteHeaders) -> bool {
        self.key == key && self.headers == without_times(headers)
    }

    /// Sends every part that the first `size` bytes of the file complete.
    pub async fn send_ready(
        &mut self,
        ctx: StreamContext<'_>,
        reader: &StagingReader,
        size: u64,
    ) -> StoreResult<()> {
        loop {
            let part = streamed_part(self.next_part, self.base);
            if part.end > size {
                return Ok(());
            }
            self.send(ctx, reader, part).await?;
        }
    }

    async fn send(
        &mut self,
        ctx: StreamContext<'_>,
        reader: &StagingReader,
        range: Range<u64>,
    ) -> StoreResult<()> {
        while self.in_flight.len() >= ctx.concurrency.max(1) {
            self.collect_oldest().await?;
        }
        let number = i32::try_from(self.next_part + 1)
            .map_err(|_| StoreError::Other("too many parts".into()))?;
        let (store, key, upload_id) = (ctx.store.clone(), self.key.clone(), self.upload_id.clone());
        let (reader, budget) = (reader.clone(), ctx.budget.clone());
        self.sent_end = range.end;
        self.next_part += 1;
        self.in_flight.push_back(tokio::spawn(async move {
            send_local_part(&store, &key, &upload_id, number, &reader, range, &budget).await
        }));
        Ok(())
    }

    async fn collect_oldest(&mut self) -> StoreResult<()> {
        if let Some(task) = self.in_flight.pop_front() {
            let part = task
                .await
                .map_err(|e| StoreError::Other(format!("upload task: {e}")))??;
            self.done.push(part);
        }
        Ok(())
    }

    /// Sends the rest of the file's `size` bytes, waits for every part and completes the
    /// upload; returns the object's ETag. On failure the upload is aborted.
    pub async fn finish(
        mut self,
        ctx: StreamContext<'_>,
        reader: &StagingReader,
        size: u64,
        expect: Expect<'_>,
    ) -> StoreResult<String> {
        let result = async {
            if size < self.sent_end {
                return Err(StoreError::Other(
                    "file shorter than its streamed parts".into(),
                ));
            }
            self.send_ready(ctx, reader, size).await?;
            if self.sent_end < size || self.next_part == 0 {
                self.send(ctx, reader, self.sent_end..size).await?;
            }
            while !self.in_flight.is_empty() {
                self.collect_oldest().await?;
            }
            ctx.store
                .complete_multipart(&self.key, &self.upload_id, &self.done, expect)
                .await
        }
        .await;
        if result.is_err() {
            self.abandon(ctx.store);
        }
        result
    }

    /// Stops the stream: parts in flight are cancelled and the upload is aborted in the
    /// background, so no parts are left behind in the bucket.
    pub fn abandon(mut self, store: &Arc<dyn ObjectStore>) {
        for task in self.in_flight.drain(..) {
            task.abort();
        }
        let store = store.clone();
        debug!(key = self.key, "streaming upload abandoned");
        tokio::spawn(async move {
            if let Err(e) = store.abort_multipart(&self.key, &self.upload_id).await {
                warn!(
                    key = self.key,
                    "could not abort an abandoned streaming upload: {e}"
                );
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn the_schedule_reaches_five_tib_within_ten_thousand_parts() {
        assert_eq!(streamed_part(0, 8 * MIB), 0..8 * MIB);
        assert_eq!(streamed_part(999, 8 * MIB).end, 8000 * MIB);
        assert_eq!(streamed_part(1000, 8 * MIB), 8000 * MIB..8016 * MIB);
        let last = streamed_part(9999, 8 * MIB);
        assert!(last.end >= 5 << 40, "{} bytes", last.end);
        assert!(last.end - last.start <= MAX_PART_SIZE);
        // Parts are contiguous.
        for n in [0, 1, 998, 999, 1000, 4321, 9998] {
            assert_eq!(
                streamed_part(n, 8 * MIB).end,
                streamed_part(n + 1, 8 * MIB).start
            );
        }
        // A base under S3's minimum is raised to it.
        assert_eq!(streamed_part(0, MIB), 0..MIN_PART_SIZE);
    }
}
