//! The persistent block cache: downloaded object data kept on local disk.
//!
//! Objects are cached in blocks of [`BLOCK_SIZE`] (1 MiB) keyed by (bucket, key, ETag, block
//! index). Each block is one file named by the BLAKE3 hash of that key, under one of 256
//! sub-directories — never by the object key, so no key can steer a path. A new ETag gives new
//! names: a changed object can never be served from blocks of its old version, and the old
//! blocks simply age out.
//!
//! Why 1 MiB: it is the granularity of the staging bitmap (so the two share fetch logic), a
//! FUSE read is at most 1 MiB, a 10 GiB cache is 10,240 files (a few hundred KiB of index in
//! memory), and one ranged GET of 1 MiB costs about the same time to first byte as one of
//! 4 KiB on real S3, where latency dominates.
//!
//! Each block file starts with a header (padded to one 4 KiB page, so sectors are pages)
//! holding the hash it was stored under, the data length and a CRC32C per 4 KiB sector. A reader verifies the sectors it reads, so a 4 KiB random
//! read checks 4 KiB, not 1 MiB; a block whose header or any sector does not verify is
//! deleted and reported as a miss, and the caller fetches it again. Corrupt data is never
//! served.
//!
//! Eviction is least-recently-used (the `lru` crate) under two limits: the cache's total size
//! (`--cache-size`) and the free space left on the cache's filesystem (`--cache-min-free`).
//! At start the index is rebuilt from the files on disk, oldest modification time first, so a
//! remount finds its blocks again.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use lru::LruCache;
use tracing::{debug, warn};

/// Size of a cached block (the last block of an object may be shorter).
pub const BLOCK_SIZE: u64 = 1024 * 1024;

/// Checksum granularity within a block: a 4 KiB random read reads and verifies 4 KiB, not
/// the whole block (256 CRCs make a 1 KiB header, 0.1% of a block).
pub const SECTOR_SIZE: usize = 4 * 1024;

const SECTORS: usize = BLOCK_SIZE as usize / SECTOR_SIZE;
const MAGIC: &[u8; 8] = b"S3BBLK03";
/// magic, hash, data length, sector CRCs, header CRC.
const HEADER_LEN: usize = 8 + 32 + 4 + 4 * SECTORS + 4;
/// Where a block's data starts in its file: the header padded to one page, so that every
/// 4 KiB sector is one page of the cache's filesystem and a random read is one disk read,
/// not two (3 KiB per block, 0.3%, buys that).
const DATA_OFFSET: usize = 4096;
/// Written in the cache directory; blocks of another format are discarded at start.
const FORMAT_FILE: &str = "format";

/// How often the free space of the cache's filesystem is checked: at most once per
/// [`FREE_CHECK_BYTES`] written or [`FREE_CHECK_INTERVAL`], whichever comes first, so
/// `statvfs` stays off the per-block path while a burst cannot overrun the guard by more
/// than 64 MiB.
const FREE_CHECK_BYTES: u64 = 64 * 1024 * 1024;
const FREE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

type Digest = [u8; 32];

/// Which block of which object version.
#[derive(Debug, Clone, Copy)]
pub struct BlockId<'a> {
    /// Object key.
    pub key: &'a str,
    /// ETag of the version the block belongs to.
    pub etag: &'a str,
    /// Block index: the block holds bytes `index * BLOCK_SIZE ..`.
    pub index: u64,
}

/// Size limits of the cache.
#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    /// Most bytes of block files kept.
    pub max_bytes: u64,
    /// Free space to leave on the cache's filesystem.
    pub min_free: u64,
}

/// Counters, for `status` and the benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Block reads served from disk.
    pub hits: u64,
    /// Block reads that found nothing usable.
    pub misses: u64,
    /// Blocks dropped because a checksum did not match.
    pub corrupt: u64,
    /// Blocks evicted to stay under the limits.
    pub evicted: u64,
    /// Blocks in the cache now.
    pub blocks: u64,
    /// Bytes of block files now.
    pub bytes: u64,
}

struct Index {
    lru: LruCache<Digest, u64>,
    bytes: u64,
    written_since_check: u64,
    /// When free space was last checked; `None`: check at the next store.
    checked_at: Option<Instant>,
    /// Free space found then, plus what evictions freed since (`u64::MAX`: unknown).
    free_at_check: u64,
}

/// Open block files kept for reads, with their verified headers (1 KiB each): opening a file
/// and reading its header per 4 KiB read cost more than reading the 4 KiB. A quarter of the
/// process's descriptor limit, at most 4,096 (a 4 GiB working set of random reads).
fn open_files_capacity() -> std::num::NonZeroUsize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur as usize
    } else {
        1024
    };
    std::num::NonZeroUsize::new((soft / 4).clamp(64, 4096)).expect("nonzero")
}

/// The block cache under `<cache dir>/blocks`.
pub struct BlockCache {
    dir: PathBuf,
    namespace: String,
    limits: CacheLimits,
    index: Mutex<Index>,
    open_files: Mutex<LruCache<Digest, std::sync::Arc<OpenBlock>>>,
    hits: AtomicU64,
    misses: AtomicU64,
    corrupt: AtomicU64,
    evicted: AtomicU64,
    tmp_seq: AtomicU64,
}

impl std::fmt::Debug for BlockCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCache")
            .field("dir", &self.dir)
            .field("limits", &self.limits)
            .finish()
    }
}

impl BlockCache {
    /// Opens (creating it 0700) the cache in `dir`, for objects of `namespace` (the bucket):
    /// indexes the blocks already there and evicts down to `limits`.
    pub fn open(dir: &Path, namespace: &str, limits: CacheLimits) -> io::Result<Self> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let format = dir.join(FORMAT_FILE);
        let same_format = fs::read(&format).is_ok_and(|f| f == MAGIC);
        let mut found = Vec::new();
        for sub in fs::read_dir(dir)? {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                continue;
            }
            for entry in fs::read_dir(sub.path())? {
                let entry = entry?;
                let meta = entry.metadata()?;
                let digest = entry.file_name().to_str().and_then(parse_digest);
                match digest {
                    Some(d) if meta.is_file() && same_format => {
                        let age = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                        found.push((age, d, meta.len()));
                    }
                    // Leftovers of an interrupted write, or foreign files: not ours to keep.
                    _ => {
                        let _ = fs::remove_file(entry.path());
                    }
                }
            }
        }
        if !same_format {
            create_0600(&format)
                .or_else(|_| OpenOptions::new().write(true).truncate(true).open(&format))?
                .write_all(MAGIC)?;
        }
        found.sort_by_key(|&(age, _, _)| age);
        let mut lru = LruCache::unbounded();
        let mut bytes = 0;
        for (_, d, len) in found {
            bytes += len;
            lru.put(d, len);
        }
        let cache = BlockCache {
            dir: dir.to_path_buf(),
            namespace: namespace.to_string(),
            limits,
            index: Mutex::new(Index {
                lru,
                bytes,
                written_since_check: 0,
                checked_at: None,
                free_at_check: u64::MAX,
            }),
            open_files: Mutex::new(LruCache::new(open_files_capacity())),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            tmp_seq: AtomicU64::new(0),
        };
        cache.make_room(0);
        cache.index.lock().unwrap().checked_at = None;
        Ok(cache)
    }

    fn digest(&self, id: &BlockId) -> Digest {
        let mut h = blake3::Hasher::new();
        for part in [
            self.namespace.as_bytes(),
            id.key.as_bytes(),
            id.etag.as_bytes(),
        ] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.update(&id.index.to_le_bytes());
        *h.finalize().as_bytes()
    }

    fn path_of(&self, d: &Digest) -> PathBuf {
        let name = hex(d);
        self.dir.join(&name[..2]).join(name)
    }

    /// Whether the block is indexed (it may still turn out corrupt when read).
    pub fn contains(&self, id: &BlockId) -> bool {
        let d = self.digest(id);
        self.index.lock().unwrap().lru.contains(&d)
    }

    /// Bytes `range` (within the block) of a cached block, verified; `None` if the block is
    /// not cached, shorter than `range`, or corrupt (then it is deleted).
    pub fn get(&self, id: &BlockId, range: std::ops::Range<usize>) -> Option<Bytes> {
        let d = self.digest(id);
        let known = self.index.lock().unwrap().lru.get(&d).is_some();
        let found = if known { self.read(&d, range) } else { None };
        match found {
            Some(b) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(b)
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// The open block `d`, from the open-file LRU or opened (and its header verified) now.
    fn open_block(&self, d: &Digest) -> io::Result<std::sync::Arc<OpenBlock>> {
        if let Some(f) = self.open_files.lock().unwrap().get(d) {
            return Ok(f.clone());
        }
        let f = std::sync::Arc::new(OpenBlock::open(&self.path_of(d), d)?);
        self.open_files.lock().unwrap().put(*d, f.clone());
        Ok(f)
    }

    fn read(&self, d: &Digest, range: std::ops::Range<usize>) -> Option<Bytes> {
        let path = self.path_of(d);
        let verified = self.open_block(d).and_then(|f| f.read(range.clone()));
        match verified {
            Ok(Some(b)) => Some(b),
            Ok(None) => None,
            Err(e) => {
                if e.kind() == io::ErrorKind::InvalidData {
                    self.corrupt.fetch_add(1, Ordering::Relaxed);
                    warn!(path = %path.display(), "dropping a corrupt cache block: {e}");
                } else {
                    debug!(path = %path.display(), "cache block unreadable: {e}");
                }
                self.remove(d);
                None
            }
        }
    }

    fn remove(&self, d: &Digest) {
        let mut idx = self.index.lock().unwrap();
        if let Some(len) = idx.lru.pop(d) {
            idx.bytes -= len;
        }
        self.delete_file(d);
    }

    fn delete_file(&self, d: &Digest) {
        self.open_files.lock().unwrap().pop(d);
        let _ = fs::remove_file(self.path_of(d));
    }

    /// Stores a block. Failures (a full disk, say) only mean the block is not cached; they
    /// are logged, never returned, since the data itself is safe in the bucket.
    pub fn put(&self, id: &BlockId, data: &[u8]) {
        if self.limits.max_bytes == 0 || data.len() > BLOCK_SIZE as usize {
            return;
        }
        let d = self.digest(id);
        let len = (DATA_OFFSET + data.len()) as u64;
        if !self.make_room(len) {
            debug!("cache full: block not stored");
            return;
        }
        match self.write_block(&d, data) {
            Ok(block) => {
                // Kept open: a read of it soon (the reader that fetched it, a random reader
                // coming back) needs no path lookup and no header read, which after the
                // kernel dropped its caches are disk reads of their own.
                self.open_files
                    .lock()
                    .unwrap()
                    .put(d, std::sync::Arc::new(block));
                let mut idx = self.index.lock().unwrap();
                if let Some(old) = idx.lru.put(d, len) {
                    idx.bytes -= old;
                }
                idx.bytes += len;
                idx.written_since_check += len;
            }
            Err(e) => warn!("could not store a block in the cache: {e}"),
        }
    }

    fn write_block(&self, d: &Digest, data: &[u8]) -> io::Result<OpenBlock> {
        let path = self.path_of(d);
        let parent = path.parent().expect("block paths have a parent");
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = parent.join(format!("tmp.{}.{seq}", std::process::id()));
        let write = || -> io::Result<OpenBlock> {
            let mut f = match create_0600(&tmp) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // Another thread may be creating the same sub-directory.
                    match fs::DirBuilder::new().mode(0o700).create(parent) {
                        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                        _ => {}
                    }
                    create_0600(&tmp)?
                }
                other => other?,
            };
            let header = header(d, data);
            let mut page = [0u8; DATA_OFFSET];
            page[..HEADER_LEN].copy_from_slice(&header);
            f.write_all(&page)?;
            f.write_all(data)?;
            fs::rename(&tmp, &path)?;
            Ok(OpenBlock { file: f, header })
        };
        let result = write();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Evicts least-recently-used blocks until `incoming` more bytes fit under both limits;
    /// false if they cannot fit even with the cache empty.
    fn make_room(&self, incoming: u64) -> bool {
        if incoming > self.limits.max_bytes {
            return false;
        }
        let mut idx = self.index.lock().unwrap();
        let mut excess = (idx.bytes + incoming).saturating_sub(self.limits.max_bytes);
        if idx.written_since_check >= FREE_CHECK_BYTES
            || idx
                .checked_at
                .is_none_or(|t| t.elapsed() >= FREE_CHECK_INTERVAL)
        {
            idx.written_since_check = 0;
            idx.checked_at = Some(Instant::now());
            idx.free_at_check = super::free_bytes(&self.dir).unwrap_or(u64::MAX);
        }
        // Between checks, what was written since counts against the free space found, so a
        // disk found short stays short until blocks are evicted or the next check.
        let free = idx.free_at_check.saturating_sub(idx.written_since_check);
        excess = excess.max((self.limits.min_free + incoming).saturating_sub(free));
        while excess > 0 {
            let Some((d, len)) = idx.lru.pop_lru() else {
                return false;
            };
            idx.free_at_check = idx.free_at_check.saturating_add(len);
            idx.bytes -= len;
            excess = excess.saturating_sub(len);
            self.evicted.fetch_add(1, Ordering::Relaxed);
            self.delete_file(&d);
        }
        true
    }

    /// Where a staging file is moved while [`Self::seed`] copies it in; the directory is
    /// emptied when the cache is opened, so a crash leaves nothing behind.
    pub fn seed_path(&self, name: &str) -> io::Result<PathBuf> {
        let dir = self.dir.join("seed");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        Ok(dir.join(name))
    }

    /// Stores `blocks` of a file of `size` bytes read from `file`, as the blocks of object
    /// `key` at `etag` (a file just uploaded from there), so reading it back needs no GET.
    /// Stops at the first read error; stores at most half the cache, so one large upload
    /// does not evict everything else.
    pub fn seed(&self, file: &File, blocks: &[u64], size: u64, key: &str, etag: &str) {
        let budget = (self.limits.max_bytes / 2 / BLOCK_SIZE) as usize;
        for &index in blocks.iter().take(budget) {
            let start = index * BLOCK_SIZE;
            let len = (size.saturating_sub(start)).min(BLOCK_SIZE) as usize;
            let mut buf = vec![0u8; len];
            if len == 0 || file.read_exact_at(&mut buf, start).is_err() {
                return;
            }
            self.put(&BlockId { key, etag, index }, &buf);
        }
    }

    /// Current counters.
    pub fn stats(&self) -> CacheStats {
        let idx = self.index.lock().unwrap();
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            corrupt: self.corrupt.load(Ordering::Relaxed),
            evicted: self.evicted.load(Ordering::Relaxed),
            blocks: idx.lru.len() as u64,
            bytes: idx.bytes,
        }
    }

    /// Path of a block's file (tests damage it on purpose).
    #[doc(hidden)]
    pub fn block_path(&self, id: &BlockId) -> PathBuf {
        self.path_of(&self.digest(id))
    }
}

fn create_0600(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

fn header(d: &Digest, data: &[u8]) -> [u8; HEADER_LEN] {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(d);
    h.extend_from_slice(&(data.len() as u32).to_le_bytes());
    for i in 0..SECTORS {
        let start = (i * SECTOR_SIZE).min(data.len());
        let end = ((i + 1) * SECTOR_SIZE).min(data.len());
        h.extend_from_slice(&crc32c::crc32c(&data[start..end]).to_le_bytes());
    }
    let crc = crc32c::crc32c(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h.try_into().expect("the header has HEADER_LEN bytes")
}

fn corrupt(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// An open block file whose header was verified when it was opened.
struct OpenBlock {
    file: File,
    header: [u8; HEADER_LEN],
}

impl OpenBlock {
    /// Opens the block file at `path`, which must be the block `d`.
    fn open(path: &Path, d: &Digest) -> io::Result<OpenBlock> {
        let file = File::open(path)?;
        let mut header = [0u8; HEADER_LEN];
        file.read_exact_at(&mut header, 0)
            .map_err(|_| corrupt("short header"))?;
        let (body, crc) = header.split_at(HEADER_LEN - 4);
        if crc32c::crc32c(body).to_le_bytes() != crc {
            return Err(corrupt("header checksum mismatch"));
        }
        if &body[..8] != MAGIC || &body[8..40] != d {
            return Err(corrupt("not the block it is named after"));
        }
        Ok(OpenBlock { file, header })
    }

    fn len(&self) -> usize {
        u32::from_le_bytes(self.header[40..44].try_into().expect("4 bytes")) as usize
    }

    /// Bytes `range` of the block, verifying the sectors it touches. `Ok(None)`: the block
    /// is shorter than `range` (a caller's mistake, not corruption).
    fn read(&self, range: std::ops::Range<usize>) -> io::Result<Option<Bytes>> {
        let len = self.len();
        if range.start > range.end || range.end > len {
            return Ok(None);
        }
        let first = range.start / SECTOR_SIZE;
        let last = range.end.div_ceil(SECTOR_SIZE).max(first + 1).min(SECTORS);
        let span = (first * SECTOR_SIZE)..(last * SECTOR_SIZE).min(len);
        let buf =
            crate::buffers::read_at(&self.file, span.len(), (DATA_OFFSET + span.start) as u64)
                .map_err(|_| corrupt("short block"))?;
        for (i, sector) in buf.chunks(SECTOR_SIZE).enumerate() {
            let at = 44 + 4 * (first + i);
            if crc32c::crc32c(sector).to_le_bytes() != self.header[at..at + 4] {
                return Err(corrupt("sector checksum mismatch"));
            }
        }
        let buf = crate::buffers::freeze(buf);
        Ok(Some(
            buf.slice(range.start - span.start..range.end - span.start),
        ))
    }
}

fn hex(d: &Digest) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_digest(name: &str) -> Option<Digest> {
    if name.len() != 64 {
        return None;
    }
    let mut d = [0u8; 32];
    for (i, out) in d.iter_mut().enumerate() {
        *out = u8::from_str_radix(name.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1024 * 1024;

    fn block(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn id(index: u64) -> BlockId<'static> {
        BlockId {
            key: "dir/file",
            etag: "\"e1\"",
            index,
        }
    }

    fn limits(max_blocks: u64) -> CacheLimits {
        CacheLimits {
            max_bytes: max_blocks * (BLOCK_SIZE + DATA_OFFSET as u64),
            min_free: 0,
        }
    }

    #[test]
    fn stores_and_serves_any_range() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlockCache::open(dir.path(), "b", limits(4)).unwrap();
        let data = block(1, MIB - 3);
        cache.put(&id(0), &data);
        for (s, e) in [(0, 1), (0, MIB - 3), (65_535, 65_537), (300_000, 304_096)] {
            assert_eq!(&cache.get(&id(0), s..e).unwrap()[..], &data[s..e]);
        }
        assert!(cache.get(&id(0), 0..MIB).is_none(), "past the block's end");
        assert!(cache.get(&id(1), 0..1).is_none());
        let other_etag = BlockId {
            etag: "\"e2\"",
            ..id(0)
        };
        assert!(cache.get(&other_etag, 0..1).is_none());
    }

    #[test]
    fn a_corrupt_block_is_dropped_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlockCache::open(dir.path(), "b", limits(4)).unwrap();
        let data = block(2, MIB);
        cache.put(&id(0), &data);
        let path = cache.block_path(&id(0));
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"X", (DATA_OFFSET + 700_000) as u64)
            .unwrap();
        // A sector that was not damaged still verifies; the damaged one drops the block.
        assert_eq!(&cache.get(&id(0), 0..10).unwrap()[..], &data[..10]);
        assert!(cache.get(&id(0), 699_000..701_000).is_none());
        assert!(!path.exists());
        assert_eq!(cache.stats().corrupt, 1);
        assert!(cache.get(&id(0), 0..10).is_none());
    }

    #[test]
    fn a_damaged_header_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlockCache::open(dir.path(), "b", limits(4)).unwrap();
        cache.put(&id(0), &block(3, 1000));
        let f = OpenOptions::new()
            .write(true)
            .open(cache.block_path(&id(0)))
            .unwrap();
        f.write_all_at(&[0xff], 41).unwrap();
        // The header in memory is the one written; the damage shows when the file is opened
        // again, as after a remount.
        drop(cache);
        let cache = BlockCache::open(dir.path(), "b", limits(4)).unwrap();
        assert!(cache.get(&id(0), 0..10).is_none());
        assert_eq!(cache.stats().corrupt, 1);
    }

    #[test]
    fn evicts_least_recently_used_under_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlockCache::open(dir.path(), "b", limits(3)).unwrap();
        for i in 0..3 {
            cache.put(&id(i), &block(i as u8, MIB));
        }
        assert!(cache.get(&id(0), 0..1).is_some()); // 0 is now the most recent
        cache.put(&id(3), &block(3, MIB));
        let s = cache.stats();
        assert_eq!((s.blocks, s.evicted), (3, 1));
        assert!(s.bytes <= limits(3).max_bytes);
        assert!(
            cache.get(&id(1), 0..1).is_none(),
            "1 was least recently used"
        );
        for i in [0, 2, 3] {
            assert!(cache.get(&id(i), 0..1).is_some(), "block {i}");
        }
        let files = walk(dir.path());
        assert_eq!(files, 3, "evicted files are deleted");
    }

    #[test]
    fn survives_reopen_and_shrinks_to_a_lower_cap() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = BlockCache::open(dir.path(), "b", limits(8)).unwrap();
            for i in 0..4 {
                cache.put(&id(i), &block(i as u8, MIB));
            }
        }
        std::fs::create_dir_all(dir.path().join("00")).unwrap();
        std::fs::write(dir.path().join("00").join("tmp.1.1"), b"junk").unwrap();
        let cache = BlockCache::open(dir.path(), "b", limits(8)).unwrap();
        assert_eq!(cache.stats().blocks, 4);
        assert_eq!(&cache.get(&id(2), 5..9).unwrap()[..], &block(2, MIB)[5..9]);
        drop(cache);
        let cache = BlockCache::open(dir.path(), "b", limits(2)).unwrap();
        assert_eq!(cache.stats().blocks, 2);
        assert_eq!(walk(dir.path()), 2);
        // Another bucket's cache dir contents are not mistaken for this one's blocks.
        let other = BlockCache::open(dir.path(), "other", limits(8)).unwrap();
        assert!((0..4).all(|i| other.get(&id(i), 0..1).is_none()));
    }

    #[test]
    fn blocks_of_another_format_are_discarded() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = BlockCache::open(dir.path(), "b", limits(4)).unwrap();
            cache.put(&id(0), &block(1, 1000));
        }
        fs::write(dir.path().join(FORMAT_FILE), b"S3BBLK02").unwrap();
        let cache = BlockCache::open(dir.path(), "b", limits(4)).unwrap();
        assert!(cache.get(&id(0), 0..10).is_none());
        assert_eq!(walk(dir.path()), 0, "old blocks are deleted");
        assert_eq!(fs::read(dir.path().join(FORMAT_FILE)).unwrap(), MAGIC);
        cache.put(&id(0), &block(1, 1000));
        drop(cache);
        let cache = BlockCache::open(dir.path(), "b", limits(4)).unwrap();
        assert!(cache.get(&id(0), 0..10).is_some());
    }

    #[test]
    fn zero_size_disables_caching() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlockCache::open(dir.path(), "b", limits(0)).unwrap();
        cache.put(&id(0), &block(0, 10));
        assert!(cache.get(&id(0), 0..1).is_none());
        assert_eq!(walk(dir.path()), 0);
    }

    #[test]
    fn keeps_the_free_space_guard() {
        let dir = tempfile::tempdir().unwrap();
        let free = crate::cache::free_bytes(dir.path()).unwrap();
        let cache = BlockCache::open(
            dir.path(),
            "b",
            CacheLimits {
                max_bytes: u64::MAX / 2,
                min_free: free + (1 << 40),
            },
        )
        .unwrap();
        cache.put(&id(0), &block(0, 10));
        assert_eq!(cache.stats().blocks, 0, "no block may eat into the reserve");
    }

    fn walk(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_dir())
            .map(|p| std::fs::read_dir(p).unwrap().count())
            .sum()
    }
}
