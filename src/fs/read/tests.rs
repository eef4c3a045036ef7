use super::*;

const MIB: u64 = 1024 * 1024;
use crate::cache::blocks::CacheLimits;
use crate::store::WriteHeaders;
use crate::store::mem::{MemStore, Op};

const TUNING: ReadTuning = ReadTuning {
    max_window: 4 * MIB,
    part_size: 2 * MIB,
};

struct Setup {
    mem: Arc<MemStore>,
    src: Arc<BlockSource>,
    version: ObjectVersion,
    data: Vec<u8>,
    _dir: tempfile::TempDir,
}

fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 7 + seed) % 251) as u8).collect()
}

async fn put(mem: &MemStore, data: &[u8]) -> ObjectVersion {
    mem.insert("k", data, WriteHeaders::default());
    let etag = mem.head("k").await.unwrap().etag;
    ObjectVersion {
        key: "k".into(),
        etag,
        size: data.len() as u64,
    }
}

async fn setup_with(len: usize, cache_blocks: u64, budget_mib: usize) -> Setup {
    let mem = Arc::new(MemStore::new());
    let data = pattern(len, 0);
    let version = put(&mem, &data).await;
    let dir = tempfile::tempdir().unwrap();
    let cache = (cache_blocks > 0).then(|| {
        Arc::new(
            BlockCache::open(
                dir.path(),
                "bucket",
                CacheLimits {
                    max_bytes: cache_blocks * (BLOCK_SIZE + 4096),
                    min_free: 0,
                },
            )
            .unwrap(),
        )
    });
    let store: Arc<dyn ObjectStore> = mem.clone();
    let src = Arc::new(BlockSource::new(
        store,
        cache,
        MemoryBudget::new(budget_mib as u64 * MIB),
        TUNING,
    ));
    Setup {
        mem,
        src,
        version,
        data,
        _dir: dir,
    }
}

async fn setup(len: usize) -> Setup {
    setup_with(len, 64, 64).await
}

async fn read_all(s: &Setup, chunk: usize) -> Vec<u8> {
    let mut r = Reader::default();
    let mut got = Vec::new();
    loop {
        let b = r
            .read(&s.src, &s.version, got.len() as u64, chunk)
            .await
            .unwrap();
        if b.is_empty() {
            return got;
        }
        got.extend_from_slice(&b);
    }
}

#[tokio::test]
async fn sequential_reads_match_with_few_large_gets() {
    let s = setup(9 * MIB as usize + 17).await;
    assert_eq!(read_all(&s, 128 * 1024).await, s.data);
    // 10 blocks in windows of 1, 2, 4, 4 (max) blocks, each split in parts of 2 blocks.
    let gets = s.mem.count(Op::Get);
    assert!(gets <= 8, "{gets} GETs");
}

#[tokio::test]
async fn reads_at_every_offset_and_size_match_the_object() {
    let s = setup(5 * MIB as usize + 4321).await;
    let len = s.data.len() as u64;
    let sizes = [
        1usize,
        4095,
        4096,
        65_537,
        131_072,
        MIB as usize,
        2 * MIB as usize + 1,
    ];
    let offsets = [
        0u64,
        1,
        4095,
        MIB - 1,
        MIB,
        MIB + 1,
        3 * MIB + 7,
        len - 1,
        len,
        len + 10,
    ];
    for &size in &sizes {
        for &off in &offsets {
            let mut r = Reader::default();
            let got = r.read(&s.src, &s.version, off, size).await.unwrap();
            let (a, b) = (
                (off.min(len)) as usize,
                ((off + size as u64).min(len)) as usize,
            );
            assert_eq!(&got[..], &s.data[a..b], "offset {off} size {size}");
        }
    }
    // And a sequential stream of odd-sized reads, with jumps back and forth, on one handle.
    let mut r = Reader::default();
    let mut off = 0u64;
    let mut step = 1usize;
    while off < len {
        let got = r.read(&s.src, &s.version, off, step).await.unwrap();
        let end = (off as usize + step).min(len as usize);
        assert_eq!(&got[..], &s.data[off as usize..end], "stream at {off}");
        off = end as u64;
        step = (step * 3 + 1001) % (700 * 1024) + 1;
        if off.is_multiple_of(5) {
            let back = off / 3;
            let got = r.read(&s.src, &s.version, back, 10_000).await.unwrap();
            let e = (back as usize + 10_000).min(len as usize);
            assert_eq!(&got[..], &s.data[back as usize..e], "jump to {back}");
        }
    }
}

#[tokio::test]
async fn random_misses_fetch_growing_aligned_chunks() {
    let s = setup(8 * MIB as usize).await;
    let mut r = Reader::default();
    // Misses at blocks 5, 0 and 7 fetch chunks of 1, 2 and 4 blocks: [5], [0, 1], [4..8)
    // without block 5, which is cached.
    for &(off, len) in &[(5 * MIB + 10, 4096usize), (10, 100), (8 * MIB - 5, 100)] {
        let b = r.read(&s.src, &s.version, off, len).await.unwrap();
        let end = (off as usize + len).min(s.data.len());
        assert_eq!(&b[..], &s.data[off as usize..end]);
    }
    assert_eq!(s.mem.bytes_read(), 6 * MIB);
    assert_eq!(s.mem.count(Op::Get), 4);
    // Hits cost nothing: blocks 0, 1 and 4 to 7 are cached.
    for off in [MIB + 100, 4 * MIB + 100, 6 * MIB] {
        let b = r.read(&s.src, &s.version, off, 4096).await.unwrap();
        assert_eq!(&b[..], &s.data[off as usize..off as usize + 4096]);
    }
    assert_eq!(s.mem.count(Op::Get), 4);
    // A single random read of a fresh handle costs one block.
    let s = setup(8 * MIB as usize).await;
    let b = Reader::default()
        .read(&s.src, &s.version, 3 * MIB + 1, 10)
        .await
        .unwrap();
    assert_eq!(&b[..], &s.data[3 * MIB as usize + 1..3 * MIB as usize + 11]);
    assert_eq!(s.mem.bytes_read(), MIB);
}

#[tokio::test]
async fn a_second_reader_is_served_from_the_cache() {
    let s = setup(6 * MIB as usize + 5).await;
    assert_eq!(read_all(&s, 1 << 20).await, s.data);
    let gets = s.mem.count(Op::Get);
    assert_eq!(read_all(&s, 128 * 1024).await, s.data);
    assert_eq!(s.mem.count(Op::Get), gets, "warm read made requests");
    let stats = s.src.cache().unwrap().stats();
    assert_eq!(stats.blocks, 7);
    assert!(stats.hits >= 7);
}

#[tokio::test]
async fn a_changed_object_is_read_anew_never_from_old_blocks() {
    let s = setup(3 * MIB as usize).await;
    assert_eq!(read_all(&s, 1 << 20).await, s.data);
    let newer = pattern(3 * MIB as usize, 99);
    let v2 = put(&s.mem, &newer).await;
    assert_ne!(v2.etag, s.version.etag);
    let mut r = Reader::default();
    let got = r.read(&s.src, &v2, 0, 3 * MIB as usize).await.unwrap();
    assert_eq!(&got[..], &newer[..]);
    // A reader still pinned to the old version gets a precondition failure (ESTALE), not a
    // mix, for blocks that were not cached...
    let s2 = setup(3 * MIB as usize).await;
    s2.mem.insert("k", b"other", WriteHeaders::default());
    let err = Reader::default()
        .read(&s2.src, &s2.version, 0, 10)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::PreconditionFailed(_)));
}

#[tokio::test]
async fn a_corrupt_cached_block_is_fetched_again() {
    let s = setup(2 * MIB as usize).await;
    assert_eq!(read_all(&s, 1 << 20).await, s.data);
    let gets = s.mem.count(Op::Get);
    let cache = s.src.cache().unwrap();
    let path = cache.block_path(&s.version.block_id(1));
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    assert_eq!(read_all(&s, 1 << 20).await, s.data);
    assert_eq!(
        s.mem.count(Op::Get),
        gets + 1,
        "only the damaged block was fetched"
    );
    assert_eq!(cache.stats().corrupt, 1);
}

#[tokio::test]
async fn without_a_cache_or_a_budget_reads_still_work() {
    let s = setup_with(5 * MIB as usize + 1, 0, 0).await;
    assert_eq!(read_all(&s, 200_000).await, s.data);
    // No budget: no read-ahead, one GET per block.
    assert_eq!(s.mem.count(Op::Get), 6);
    assert_eq!(s.src.budget.available_mib(), 0);
}

#[tokio::test]
async fn read_ahead_memory_is_returned() {
    let s = setup_with(20 * MIB as usize, 64, 6).await;
    let mut r = Reader::default();
    r.read(&s.src, &s.version, 0, 1 << 20).await.unwrap();
    r.read(&s.src, &s.version, 1 << 20, 1 << 20).await.unwrap();
    assert!(s.src.budget.available_mib() < 6, "read-ahead holds memory");
    drop(r);
    assert_eq!(s.src.budget.available_mib(), 6);
    // Two readers at once share the budget and both read correctly.
    let (a, b) = tokio::join!(read_all(&s, 1 << 20), read_all(&s, 300_000));
    assert_eq!(a, s.data);
    assert_eq!(b, s.data);
    assert_eq!(s.src.budget.available_mib(), 6);
}

#[tokio::test]
async fn a_failed_read_ahead_is_retried_on_demand() {
    let s = setup_with(8 * MIB as usize, 0, 64).await;
    let mut r = Reader::default();
    r.read(&s.src, &s.version, 0, 1 << 20).await.unwrap();
    s.mem.fail_next(Op::Get, 1);
    let mut off = 1 << 20;
    let mut got = s.data[..off as usize].to_vec();
    while off < s.data.len() as u64 {
        let b = r.read(&s.src, &s.version, off, 1 << 20).await.unwrap();
        off += b.len() as u64;
        got.extend_from_slice(&b);
    }
    assert_eq!(got, s.data);
}
