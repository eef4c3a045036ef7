//! Staging files: local files holding the contents of files being written.
//!
//! A staging file mirrors the whole file at its offsets (sparse on disk). When an existing
//! object is modified, only the blocks a write touches partially are fetched from the object
//! ("the original"); untouched blocks stay remote, are fetched when read, and on upload can be
//! copied server-side. A bitmap records which blocks are present locally.
//!
//! The original is described by `orig_len`: how many leading bytes of the object still belong
//! to the file. A truncation lowers it, so bytes past it read as zeros even after the file
//! grows again. A block needs fetching iff it is not present and starts below `orig_len`.
//!
//! [`BLOCK_SIZE`] is 1 MiB: a 4 KiB random write fetches at most two blocks (2 MiB), and the
//! bitmap of a 5 TiB file is 640 KiB.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::meta::StagingRecord;

/// Granularity of fetching and of the presence bitmap: the block cache's block size.
pub use super::BLOCK_SIZE;

/// The object a staged file started from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Original {
    /// Its key (updated when the file is renamed).
    pub key: String,
    /// Its ETag: fetches are pinned to it.
    pub etag: String,
}

/// A staging file and its bookkeeping.
#[derive(Debug)]
pub struct Staging {
    file: File,
    path: PathBuf,
    original: Option<Original>,
    orig_len: u64,
    present: Vec<u64>,
    size: u64,
    /// The directory entry is known to be on disk (synced once, or found there at reopen).
    entry_synced: bool,
}

/// Reads ranges of a staging file from any task (the parts of an upload).
#[derive(Debug, Clone)]
pub struct StagingReader(std::sync::Arc<File>);

/// Reads at least this long run off the async worker ([`crate::blocking::off_worker`]):
/// copying 256 KiB from the page cache takes 30-60 µs, more than the hand-off's 10 µs, and a
/// part of 8 MiB or more that the kernel evicted waits for the disk.
const READ_OFF_WORKER: u64 = 256 * 1024;

impl StagingReader {
    /// Bytes `range`, which must lie within the file.
    pub fn read(&self, range: Range<u64>) -> io::Result<Vec<u8>> {
        let read =
            || crate::buffers::read_at(&self.0, (range.end - range.start) as usize, range.start);
        if range.end - range.start >= READ_OFF_WORKER {
            crate::blocking::off_worker(read)
        } else {
            read()
        }
    }
}

/// Path of the staging file of inode `ino` under `dir`.
pub fn staging_path(dir: &Path, ino: u64) -> PathBuf {
    dir.join(format!("{ino}.data"))
}

impl Staging {
    /// Creates a staging file for a file of `size` bytes whose first `size` bytes are those of
    /// `original` (or zeros without one). Nothing is fetched yet.
    pub fn create(dir: &Path, ino: u64, original: Option<Original>, size: u64) -> io::Result<Self> {
        let path = staging_path(dir, ino);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        file.set_len(size)?;
        let orig_len = if original.is_some() { size } else { 0 };
        Ok(Staging {
            file,
            path,
            original,
            orig_len,
            present: Vec::new(),
            size,
            entry_synced: false,
        })
    }

    /// Reopens the staging file of `ino` from its saved bookkeeping. `size` is the file's size
    /// as last recorded; the file on disk is brought to it.
    pub fn reopen(dir: &Path, ino: u64, rec: &StagingRecord, size: u64) -> io::Result<Self> {
        let path = staging_path(dir, ino);
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        file.set_len(size)?;
        let original = match (&rec.orig_key, &rec.orig_etag) {
            (Some(key), Some(etag)) => Some(Original {
                key: key.clone(),
                etag: etag.clone(),
            }),
            _ => None,
        };
        let present = rec
            .present
            .chunks(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b[..c.len()].copy_from_slice(c);
                u64::from_le_bytes(b)
            })
            .collect();
        Ok(Staging {
            file,
            path,
            original,
            orig_len: if rec.block_size == BLOCK_SIZE {
                rec.orig_len
            } else {
                0
            },
            present,
            size,
            entry_synced: true,
        })
    }

    /// The bookkeeping to persist.
    pub fn record(&self) -> StagingRecord {
        StagingRecord {
            orig_key: self.original.as_ref().map(|o| o.key.clone()),
            orig_etag: self.original.as_ref().map(|o| o.etag.clone()),
            orig_len: self.orig_len,
            block_size: BLOCK_SIZE,
            present: self.present.iter().flat_map(|w| w.to_le_bytes()).collect(),
        }
    }

    /// Current size of the file.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The original object, if the contents started from one.
    pub fn original(&self) -> Option<&Original> {
        self.original.as_ref()
    }

    /// How many leading bytes of the original still belong to the file.
    pub fn orig_len(&self) -> u64 {
        self.orig_len
    }

    /// Points at the original under a new key (after a server-side rename copy).
    pub fn set_original(&mut self, original: Original) {
        self.original = Some(original);
    }

    /// Records that the contents, `size` bytes, are now the object `original`: blocks not
    /// present locally come from it from now on.
    pub fn mark_uploaded(&mut self, original: Original, size: u64) {
        self.original = Some(original);
        self.orig_len = size;
    }

    fn is_present(&self, block: u64) -> bool {
        let (w, b) = ((block / 64) as usize, block % 64);
        self.present.get(w).is_some_and(|word| word & (1 << b) != 0)
    }

    fn mark_present(&mut self, block: u64) {
        let (w, b) = ((block / 64) as usize, block % 64);
        if self.present.len() <= w {
            self.present.resize(w + 1, 0);
        }
        self.present[w] |= 1 << b;
    }

    fn needs_fetch(&self, block: u64) -> bool {
        self.original.is_some() && block * BLOCK_SIZE < self.orig_len && !self.is_present(block)
    }

    /// The range of the original to fetch into `block`.
    pub fn fetch_range(&self, block: u64) -> Range<u64> {
        let start = block * BLOCK_SIZE;
        start..(start + BLOCK_SIZE).min(self.orig_len)
    }

    /// Blocks that must be fetched before bytes `range` can be read.
    pub fn missing_for_read(&self, range: Range<u64>) -> Vec<u64> {
        let end = range.end.min(self.size);
        if range.start >= end {
            return Vec::new();
        }
        (range.start / BLOCK_SIZE..end.div_ceil(BLOCK_SIZE))
            .filter(|&b| self.needs_fetch(b))
            .collect()
    }

    /// Blocks that must be fetched before bytes `range` are overwritten: those the write
    /// covers only partly (fully overwritten blocks need nothing from the original).
    pub fn missing_for_write(&self, range: Range<u64>) -> Vec<u64> {
        if range.start >= range.end {
            return Vec::new();
        }
        let first = range.start / BLOCK_SIZE;
        let last = (range.end - 1) / BLOCK_SIZE;
        // A block is covered when the write spans all of the original's bytes in it.
        let covered = |b: u64| {
            let need_end = ((b + 1) * BLOCK_SIZE).min(self.orig_len);
            range.start <= b * BLOCK_SIZE && range.end >= need_end
        };
        let mut blocks = vec![first];
        if last != first {
            blocks.push(last);
        }
        blocks
            .into_iter()
            .filter(|&b| !covered(b) && self.needs_fetch(b))
            .collect()
    }

    /// Stores the bytes of `block` fetched from `from` (its [`Self::fetch_range`] then).
    ///
    /// The fetch ran without the file's lock, so the staging file may have changed since:
    /// bytes of another original than the current one (the file was uploaded, or moved to
    /// another key) are not used, nor those of a block present by now (written, or filled by
    /// another reader); a truncation since keeps only the bytes still below `orig_len`.
    pub fn fill_block(&mut self, from: &Original, block: u64, data: &[u8]) -> io::Result<()> {
        if self.original.as_ref() != Some(from) || !self.needs_fetch(block) {
            return Ok(());
        }
        let start = block * BLOCK_SIZE;
        let want = self.fetch_range(block);
        let len = (want.end - want.start) as usize;
        if data.len() < len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "original object returned {} bytes for block {block}, expected {len}",
                    data.len(),
                ),
            ));
        }
        self.file.write_all_at(&data[..len], start)?;
        self.mark_present(block);
        Ok(())
    }

    /// Writes `data` at `offset`; the caller fetched [`Self::missing_for_write`] first.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.file.write_all_at(data, offset)?;
        let end = offset + data.len() as u64;
        for b in offset / BLOCK_SIZE..end.div_ceil(BLOCK_SIZE) {
            self.mark_present(b);
        }
        self.size = self.size.max(end);
        Ok(())
    }

    /// Reads up to `len` bytes at `offset`; the caller fetched [`Self::missing_for_read`].
    pub fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let end = (offset + len as u64).min(self.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        crate::buffers::read_at(&self.file, (end - offset) as usize, offset)
    }

    /// A handle other tasks can read ranges with while this one goes on writing elsewhere.
    pub fn reader(&self) -> io::Result<StagingReader> {
        Ok(StagingReader(std::sync::Arc::new(self.file.try_clone()?)))
    }

    /// Sets the size; bytes past a shrink read as zeros if the file grows again.
    pub fn truncate(&mut self, size: u64) -> io::Result<()> {
        self.file.set_len(size)?;
        self.orig_len = self.orig_len.min(size);
        self.size = size;
        Ok(())
    }

    /// Whether no byte of `range` was changed locally and all of it is the original's:
    /// such a range can be copied server-side on upload.
    pub fn is_untouched(&self, range: &Range<u64>) -> bool {
        self.original.is_some()
            && range.end <= self.orig_len
            && (range.start / BLOCK_SIZE..range.end.div_ceil(BLOCK_SIZE))
                .all(|b| !self.is_present(b))
    }

    /// Flushes the staging file (and, the first time, its directory entry) to disk.
    pub fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()?;
        if !self.entry_synced {
            // A new file's name is only durable once its directory is synced.
            if let Some(dir) = self.path.parent() {
                File::open(dir)?.sync_all()?;
            }
            self.entry_synced = true;
        }
        Ok(())
    }

    /// Blocks whose bytes are all here (written, or fetched whole): after an upload they are
    /// exactly the object's blocks.
    pub fn present_blocks(&self) -> Vec<u64> {
        (0..self.size.div_ceil(BLOCK_SIZE))
            .filter(|&b| self.is_present(b))
            .collect()
    }

    /// Moves the staging file to `to` (same filesystem) and hands over its open file and size;
    /// the inode's staging path is free for a new staging file at once.
    pub fn detach(self, to: &Path) -> io::Result<(File, u64)> {
        std::fs::rename(&self.path, to)?;
        Ok((self.file, self.size))
    }

    /// Deletes the staging file.
    pub fn remove(self) -> io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn orig() -> Option<Original> {
        Some(Original {
            key: "k".into(),
            etag: "e".into(),
        })
    }

    #[test]
    fn partial_writes_need_their_edge_blocks_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = Staging::create(dir.path(), 1, orig(), 10 * BLOCK_SIZE).unwrap();
        assert_eq!(
            s.missing_for_write(BLOCK_SIZE..2 * BLOCK_SIZE),
            Vec::<u64>::new()
        );
        assert_eq!(s.missing_for_write(10..20), vec![0]);
        assert_eq!(
            s.missing_for_write(BLOCK_SIZE - 1..3 * BLOCK_SIZE + 1),
            vec![0, 3]
        );
        // Appending past the end of the original fetches nothing.
        assert_eq!(
            s.missing_for_write(10 * BLOCK_SIZE..10 * BLOCK_SIZE + 5),
            Vec::<u64>::new()
        );
    }

    #[test]
    fn a_write_to_the_last_short_block_fetches_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = Staging::create(dir.path(), 1, orig(), BLOCK_SIZE + 100).unwrap();
        // Overwrites bytes 0..50 of the 100-byte last block: the other 50 are needed.
        assert_eq!(s.missing_for_write(BLOCK_SIZE..BLOCK_SIZE + 50), vec![1]);
        // Overwrites the whole short block and beyond: nothing needed.
        assert_eq!(
            s.missing_for_write(BLOCK_SIZE..BLOCK_SIZE + 200),
            Vec::<u64>::new()
        );
    }

    #[test]
    fn truncation_hides_the_original_past_the_new_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Staging::create(dir.path(), 1, orig(), 4 * BLOCK_SIZE).unwrap();
        s.truncate(BLOCK_SIZE + 10).unwrap();
        s.truncate(4 * BLOCK_SIZE).unwrap();
        assert_eq!(s.missing_for_read(0..4 * BLOCK_SIZE), vec![0, 1]);
        assert_eq!(s.fetch_range(1), BLOCK_SIZE..BLOCK_SIZE + 10);
        let from = orig().unwrap();
        // Fetched before the truncation: only what is still the original's is kept.
        s.fill_block(&from, 1, &[7u8; 30]).unwrap();
        let got = s.read(BLOCK_SIZE, 20).unwrap();
        assert_eq!(&got[..10], &[7u8; 10]);
        assert_eq!(&got[10..], &[0u8; 10]);
        assert!(
            s.fill_block(&from, 0, &[1u8; 3]).is_err(),
            "short fetch is refused"
        );
        // Bytes of another version are not used.
        let other = Original {
            key: "k".into(),
            etag: "other".into(),
        };
        s.fill_block(&other, 0, &vec![1u8; BLOCK_SIZE as usize])
            .unwrap();
        assert_eq!(s.missing_for_read(0..10), vec![0]);
    }

    #[test]
    fn bookkeeping_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Staging::create(dir.path(), 9, orig(), 3 * BLOCK_SIZE).unwrap();
        s.write(BLOCK_SIZE, &vec![1u8; BLOCK_SIZE as usize])
            .unwrap();
        assert!(s.is_untouched(&(0..BLOCK_SIZE)));
        assert!(!s.is_untouched(&(0..2 * BLOCK_SIZE)));
        let rec = s.record();
        let r = Staging::reopen(dir.path(), 9, &rec, s.size()).unwrap();
        assert_eq!(r.missing_for_read(0..3 * BLOCK_SIZE), vec![0, 2]);
        assert_eq!(r.read(BLOCK_SIZE, 4).unwrap(), vec![1u8; 4]);
        assert_eq!(r.original(), orig().as_ref());
    }
}
