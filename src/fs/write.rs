//! Uploading staged files and copying objects, at any size S3 allows.
//!
//! Up to the multipart threshold a file goes up in one PUT. Above it, parts go up
//! concurrently; a part whose bytes are all unchanged from the original object is copied
//! server-side (UploadPartCopy) instead of being sent, so editing a few bytes of a large
//! object moves a few parts, not the object. Part sizes grow with the file so that 10,000
//! parts reach S3's 5 TiB limit.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use tracing::{debug, warn};

use super::budget::MemoryBudget;
use crate::cache::BLOCK_SIZE;
use crate::cache::blocks::{BlockCache, BlockId};
use crate::cache::staging::{Original, Staging, StagingReader};
use crate::store::{
    CompletedPart, Expect, MAX_PART_SIZE, MAX_PARTS, MAX_SINGLE_OBJECT, MIN_PART_SIZE, ObjectStore,
    StoreError, StoreResult, WriteHeaders,
};

/// Blocks fetched at once when filling a staging file from its original: 8 × 1 MiB in flight
/// keeps a 1 Gbit/s link busy at 50 ms of latency, with 8 MiB of memory at most.
const FETCH_CONCURRENCY: usize = 8;

/// Part size for an object of `size` bytes: at least `min_part`, at least 5 MiB, and large
/// enough that the object fits in 10,000 parts (rounded up to whole MiB).
pub fn part_size_for(size: u64, min_part: u64) -> u64 {
    const MIB: u64 = 1024 * 1024;
    let needed = size.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB;
    needed.max(min_part).clamp(MIN_PART_SIZE, MAX_PART_SIZE)
}

/// Blocks of a staging file's original to bring in, chosen under the file's lock and fetched
/// without it (reads and opens of the file go on meanwhile); [`FetchedBlocks::fill`] stores
/// them under the lock again. At most [`FETCH_CONCURRENCY`] at a time.
#[derive(Debug)]
pub struct BlockFetch {
    original: Original,
    blocks: Vec<(u64, Range<u64>)>,
}

/// Blocks fetched by a [`BlockFetch`].
#[derive(Debug)]
pub struct FetchedBlocks {
    original: Original,
    blocks: Vec<(u64, Bytes)>,
}

impl BlockFetch {
    /// The first blocks of `missing` (blocks of `staging` that need fetching), or `None`
    /// when there is nothing to fetch.
    pub fn first_of(staging: &Staging, missing: &[u64]) -> Option<BlockFetch> {
        let original = staging.original()?.clone();
        let blocks: Vec<_> = missing
            .iter()
            .take(FETCH_CONCURRENCY)
            .map(|&b| (b, staging.fetch_range(b)))
            .collect();
        (!blocks.is_empty()).then_some(BlockFetch { original, blocks })
    }

    /// The original the blocks come from.
    pub fn original(&self) -> &Original {
        &self.original
    }

    /// Fetches the blocks: from the block cache when it has them (editing a file that was
    /// read costs no GET), else with concurrent ranged GETs pinned to the original's ETag,
    /// whose whole blocks are then cached too.
    pub async fn run(
        self,
        store: &Arc<dyn ObjectStore>,
        cache: Option<&Arc<BlockCache>>,
    ) -> StoreResult<FetchedBlocks> {
        let orig = &self.original;
        let id = |index| BlockId {
            key: &orig.key,
            etag: &orig.etag,
            index,
        };
        let blocks = futures::future::try_join_all(self.blocks.iter().map(|(b, range)| {
            let cached = cache.and_then(|c| c.get(&id(*b), 0..(range.end - range.start) as usize));
            async move {
                if let Some(data) = cached {
                    return Ok((*b, data));
                }
                let data = store
                    .get_range(&orig.key, range.clone(), Some(&orig.etag))
                    .await?;
                if data.len() as u64 == BLOCK_SIZE
                    && let Some(c) = cache
                {
                    c.put(&id(*b), &data);
                }
                Ok::<_, StoreError>((*b, data))
            }
        }))
        .await?;
        Ok(FetchedBlocks {
            original: self.original,
            blocks,
        })
    }
}

impl FetchedBlocks {
    /// Stores the blocks in `staging`, skipping what changed there since they were chosen
    /// ([`Staging::fill_block`]).
    pub fn fill(&self, staging: &mut Staging) -> std::io::Result<()> {
        for (b, data) in &self.blocks {
            staging.fill_block(&self.original, *b, data)?;
        }
        Ok(())
    }
}

/// How one part of a multipart upload gets its bytes.
enum PartSource<'a> {
    /// Read from the staging file and sent.
    Local(Range<u64>),
    /// Copied server-side from `range` of object `key`, pinned to `etag`.
    Copy {
        key: &'a str,
        etag: Option<&'a str>,
        range: Range<u64>,
    },
}

/// Reads `range` of a staging file and sends it as part `number`, holding its size of the
/// memory budget while the bytes are in memory.
pub(super) async fn send_local_part(
    store: &Arc<dyn ObjectStore>,
    key: &str,
    upload_id: &str,
    number: i32,
    reader: &StagingReader,
    range: Range<u64>,
    budget: &MemoryBudget,
) -> StoreResult<CompletedPart> {
    let _memory = budget.reserve(range.end - range.start).await;
    let body = reader.read(range).map_err(StoreError::Local)?;
    let etag = store
        .upload_part(key, upload_id, number, crate::buffers::freeze(body))
        .await?;
    Ok(CompletedPart { number, etag })
}

/// Creates a multipart upload of `key`, sends its parts `concurrency` at a time (reading
/// local parts with `local`) and completes it. If anything fails the upload is aborted,
/// so no parts are left behind.
async fn run_multipart(
    store: &Arc<dyn ObjectStore>,
    dest: Destination<'_>,
    parts: Vec<PartSource<'_>>,
    local: Option<(&StagingReader, &MemoryBudget)>,
    concurrency: usize,
) -> StoreResult<String> {
    let Destination {
        key,
        headers,
        expect,
    } = dest;
    let upload_id = store.create_multipart(key, headers).await?;
    // The futures are built first (they start when polled): a stream that maps borrowed
    // items to futures trips over higher-ranked lifetimes in `Send` futures.
    let sends: Vec<_> = parts
        .into_iter()
        .enumerate()
        .map(|(i, part)| {
            let number = i as i32 + 1;
            let upload_id = &upload_id;
            async move {
                match part {
                    PartSource::Local(r) => {
                        let (reader, budget) = local.expect("local parts need a staging file");
                        send_local_part(store, key, upload_id, number, reader, r, budget).await
                    }
                    PartSource::Copy {
                        key: src,
                        etag,
                        range,
                    } => {
                        let etag = store
                            .upload_part_copy(key, upload_id, number, src, range, etag)
                            .await?;
                        Ok(CompletedPart { number, etag })
                    }
                }
            }
        })
        .collect();
    let result = stream::iter(sends)
        .buffered(concurrency.max(1))
        .try_collect::<Vec<_>>()
        .await;
    let finished = match result {
        Ok(parts) => {
            store
                .complete_multipart(key, &upload_id, &parts, expect)
                .await
        }
        Err(e) => Err(e),
    };
    if finished.is_err()
        && let Err(e) = store.abort_multipart(key, &upload_id).await
    {
        warn!(key, "could not abort a failed multipart upload: {e}");
    }
    finished
}

/// Where an upload goes: the key, the headers the object gets, and what the key must hold
/// for the upload to go ahead (another client's change since we read it is a conflict).
#[derive(Debug, Clone, Copy)]
pub struct Destination<'a> {
    /// The object's key.
    pub key: &'a str,
    /// Its headers.
    pub headers: &'a WriteHeaders,
    /// What the key must hold.
    pub expect: Expect<'a>,
}

/// Upload tuning.
#[derive(Debug, Clone, Copy)]
pub struct UploadTuning {
    /// Largest file sent with a single PUT.
    pub multipart_threshold: u64,
    /// Smallest part size.
    pub part_size: u64,
    /// Parts in flight at once.
    pub concurrency: usize,
}

/// How the bytes of an upload go: in one PUT, or as parts, each sent or copied server-side.
#[derive(Debug)]
enum Body {
    Single,
    Parts(Vec<PlannedPart>),
}

#[derive(Debug)]
enum PlannedPart {
    /// Read from the staging file and sent.
    Send(Range<u64>),
    /// Unchanged from the original: copied server-side.
    Copy(Range<u64>),
}

/// What an upload sends, fixed under the file's lock so that the transfer runs without it.
///
/// The staging file is read through a handle of its own. Nothing changes the bytes of a range
/// the plan sends while it runs: the uploader holds the file's change lock, which every
/// writer needs, and readers only fill in blocks with the bytes of the original they hold
/// already; a range it copies is the original's, which the uploader's key hold keeps in place.
#[derive(Debug)]
pub struct UploadPlan {
    reader: StagingReader,
    size: u64,
    original: Option<Original>,
    body: Body,
}

/// The parts of an upload of `size` bytes, `None` for a single PUT.
fn part_ranges(size: u64, tuning: UploadTuning) -> Option<Vec<Range<u64>>> {
    if size <= tuning.multipart_threshold.min(MAX_SINGLE_OBJECT) {
        return None;
    }
    let part_size = part_size_for(size, tuning.part_size);
    Some(
        (0..size)
            .step_by(part_size as usize)
            .map(|s| s..(s + part_size).min(size))
            .collect(),
    )
}

impl UploadPlan {
    /// Blocks the upload of `staging` needs local before it can be planned: all of a
    /// single PUT's, and those of every part that is not copied.
    pub fn blocks_to_fetch(staging: &Staging, tuning: UploadTuning) -> Vec<u64> {
        let size = staging.size();
        match part_ranges(size, tuning) {
            None => staging.missing_for_read(0..size),
            Some(ranges) => ranges
                .into_iter()
                .filter(|r| !staging.is_untouched(r))
                .flat_map(|r| staging.missing_for_read(r))
                .collect(),
        }
    }

    /// Plans the upload of `staging`, whose [`Self::blocks_to_fetch`] are all local.
    pub fn new(staging: &Staging, tuning: UploadTuning) -> std::io::Result<UploadPlan> {
        let body = match part_ranges(staging.size(), tuning) {
            None => Body::Single,
            Some(ranges) => Body::Parts(
                ranges
                    .into_iter()
                    .map(|r| match staging.is_untouched(&r) {
                        true => PlannedPart::Copy(r),
                        false => PlannedPart::Send(r),
                    })
                    .collect(),
            ),
        };
        Ok(UploadPlan {
            reader: staging.reader()?,
            size: staging.size(),
            original: staging.original().cloned(),
            body,
        })
    }
}

/// Uploads what `plan` says to `dest`; returns the new ETag. On failure nothing is left
/// behind (a started multipart upload is aborted) and the staging file is intact.
pub async fn upload(
    store: &Arc<dyn ObjectStore>,
    plan: &UploadPlan,
    dest: Destination<'_>,
    tuning: UploadTuning,
    budget: &MemoryBudget,
) -> StoreResult<String> {
    let planned = match &plan.body {
        Body::Single => {
            let body = plan.reader.read(0..plan.size).map_err(StoreError::Local)?;
            return store
                .put(
                    dest.key,
                    crate::buffers::freeze(body),
                    dest.headers,
                    dest.expect,
                )
                .await;
        }
        Body::Parts(parts) => parts,
    };
    let parts = planned
        .iter()
        .map(|part| match (part, &plan.original) {
            (PlannedPart::Copy(r), Some(orig)) => PartSource::Copy {
                key: &orig.key,
                etag: Some(&orig.etag),
                range: r.clone(),
            },
            (PlannedPart::Send(r) | PlannedPart::Copy(r), _) => PartSource::Local(r.clone()),
        })
        .collect();
    run_multipart(
        store,
        dest,
        parts,
        Some((&plan.reader, budget)),
        tuning.concurrency,
    )
    .await
}

/// Copies `src` (of `size` bytes, pinned to `etag`) to `dst` server-side, with multipart copy
/// above 5 GiB. `headers` replaces the metadata; `None` keeps the source's.
pub async fn copy_object(
    store: &Arc<dyn ObjectStore>,
    src: &str,
    dst: &str,
    size: u64,
    etag: Option<&str>,
    headers: Option<&WriteHeaders>,
    tuning: UploadTuning,
) -> StoreResult<String> {
    let source_headers;
    let headers = match headers {
        Some(h) => h,
        None => {
            let info = store.head(src).await?;
            source_headers = WriteHeaders {
                content_type: info.content_type,
                metadata: info.metadata,
            };
            &source_headers
        }
    };
    if size <= MAX_SINGLE_OBJECT {
        return store.copy(src, dst, etag, headers).await;
    }
    debug!(src, dst, size, "multipart copy");
    let part_size = part_size_for(size, tuning.part_size.max(512 * 1024 * 1024));
    let parts = (0..size)
        .step_by(part_size as usize)
        .map(|s| PartSource::Copy {
            key: src,
            etag,
            range: s..(s + part_size).min(size),
        })
        .collect();
    let dest = Destination {
        key: dst,
        headers,
        expect: Expect::Any,
    };
    run_multipart(store, dest, parts, None, tuning.concurrency).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brings the blocks `wanted` names into `s`, until it names none.
    async fn fetch_blocks(
        store: &Arc<dyn ObjectStore>,
        s: &mut Staging,
        wanted: impl Fn(&Staging) -> Vec<u64>,
    ) {
        while let Some(fetch) = BlockFetch::first_of(s, &wanted(s)) {
            fetch.run(store, None).await.unwrap().fill(s).unwrap();
        }
    }

    /// Uploads `s` to `key` with no headers and the test tuning.
    async fn upload_to(
        store: &Arc<dyn ObjectStore>,
        s: &mut Staging,
        key: &str,
    ) -> StoreResult<String> {
        let budget = MemoryBudget::new(64 << 20);
        let dest = Destination {
            key,
            headers: &WriteHeaders::default(),
            expect: Expect::Any,
        };
        fetch_blocks(store, s, |s| UploadPlan::blocks_to_fetch(s, TUNING)).await;
        let plan = UploadPlan::new(s, TUNING).unwrap();
        upload(store, &plan, dest, TUNING, &budget).await
    }
    use crate::cache::staging::BLOCK_SIZE;
    use crate::store::mem::{MemStore, Op};

    const MIB: u64 = 1024 * 1024;
    const TUNING: UploadTuning = UploadTuning {
        multipart_threshold: 8 * MIB,
        part_size: 5 * MIB,
        concurrency: 4,
    };

    #[test]
    fn part_sizes_reach_five_tebibytes() {
        assert_eq!(part_size_for(100 * MIB, 8 * MIB), 8 * MIB);
        assert_eq!(part_size_for(1, 0), MIN_PART_SIZE);
        let five_tib = 5 * 1024 * 1024 * MIB;
        let p = part_size_for(five_tib, 8 * MIB);
        assert!(five_tib.div_ceil(p) <= MAX_PARTS);
        assert!(p <= MAX_PART_SIZE);
    }

    #[tokio::test]
    async fn editing_a_large_object_sends_only_the_changed_parts() {
        let mem = Arc::new(MemStore::new());
        let data: Vec<u8> = (0..(23 * MIB) as usize).map(|i| (i % 253) as u8).collect();
        mem.insert("big", &data, WriteHeaders::default());
        let store: Arc<dyn ObjectStore> = mem.clone();
        let etag = store.head("big").await.unwrap().etag;
        let dir = tempfile::tempdir().unwrap();
        let orig = Original {
            key: "big".into(),
            etag,
        };
        let mut s = Staging::create(dir.path(), 1, Some(orig), data.len() as u64).unwrap();
        let at = 12 * MIB + 5;
        fetch_blocks(&store, &mut s, |s| s.missing_for_write(at..at + 4)).await;
        s.write(at, b"EDIT").unwrap();
        let gets_before = mem.count(Op::Get);
        upload_to(&store, &mut s, "big").await.unwrap();
        let (body, _) = mem.object("big").unwrap();
        let mut want = data.clone();
        want[at as usize..at as usize + 4].copy_from_slice(b"EDIT");
        assert!(body == want, "uploaded bytes differ");
        // Parts of 5 MiB: [0,5) [5,10) copied, [10,15) sent (needs 4 more blocks),
        // [15,20) [20,23) copied.
        assert_eq!(mem.count(Op::Get) - gets_before, 4);
        assert_eq!(mem.pending_uploads(), 0);
        assert_eq!(BLOCK_SIZE, MIB);
    }

    #[tokio::test]
    async fn a_failed_part_aborts_the_upload_and_keeps_the_staging() {
        let mem = Arc::new(MemStore::new());
        let store: Arc<dyn ObjectStore> = mem.clone();
        let dir = tempfile::tempdir().unwrap();
        let mut s = Staging::create(dir.path(), 1, None, 0).unwrap();
        s.write(0, &vec![9u8; (12 * MIB) as usize]).unwrap();
        mem.fail_next(Op::UploadPart, 1);
        let err = upload_to(&store, &mut s, "g").await;
        assert!(err.is_err());
        assert!(mem.object("g").is_none());
        assert_eq!(mem.pending_uploads(), 0, "the failed upload was aborted");
        upload_to(&store, &mut s, "g").await.unwrap();
        assert_eq!(mem.object("g").unwrap().0.len() as u64, 12 * MIB);
        assert_eq!(s.read(0, 4).unwrap(), vec![9u8; 4]);
    }
}
