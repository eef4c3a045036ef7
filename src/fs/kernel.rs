//! What the kernel holds of this mount, and telling it to forget what changed outside.
//!
//! [`KernelView`] keeps, in memory, what this run has shown the kernel: the references it
//! counts per inode, the names it was told are absent, the object version whose pages it may
//! have cached per file, the clock at which it may have cached a directory's entries, and the
//! second of each directory's mtime it has seen. None of it needs the inode table or the
//! bucket, so it is counted and asked without waiting for either.
//!
//! The kernel caches attributes and directory entries for `--metadata-ttl`, and file pages
//! until they are invalidated. When a listing or a probe finds that another client replaced,
//! removed or added an object, waiting for those caches to expire would let a reader see the
//! old size or the old bytes after the mount already knows better (design.md §4). The FUSE
//! adapter implements [`KernelCache`] with FUSE's invalidation notifications; `fs/` only says
//! what to forget.
//!
//! Order matters for inodes: the request that brought the news (an open that revalidated its
//! file, a listing) is answered only once the kernel has dropped the old attributes. A read
//! that starts with the old size cached and meets the shorter new object would otherwise be
//! padded with zeros: the kernel corrects its size after a short read only if no attribute
//! change arrived meanwhile. Entries are not waited for: the kernel applies those under the
//! directory's lock, which the request being answered may hold.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::oneshot;
use tracing::warn;

use crate::config::MetadataTtl;
use crate::meta::{Timestamp, now_ns};

/// Names a negative lookup may remember before the memo is cleared: about 10 MiB at most,
/// and enough for the misses of a `git status` or a build in a large tree.
const NEGATIVE_CACHE_MAX: usize = 100_000;

/// Longest wait for the kernel to apply an inode's invalidation (it takes microseconds, or
/// as long as a read of that file in flight holds its pages).
const INVALIDATION_WAIT: Duration = Duration::from_secs(5);

/// What the kernel should forget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// Attributes and cached pages of an inode (its object was replaced), or of a directory
    /// its cached entries (they changed outside the kernel's view).
    Inode(u64),
    /// The entry `name` of directory `parent`, positive or negative.
    Entry(u64, String),
}

impl Invalidation {
    /// Whether it must be applied before the request that found the change is answered
    /// (see the module docs); entries must not be waited for.
    pub fn is_waited_for(&self) -> bool {
        !matches!(self, Invalidation::Entry(..))
    }
}

/// The kernel's caches, as far as the filesystem may ask them to forget.
pub trait KernelCache: Send + Sync + std::fmt::Debug {
    /// Forgets `what` and, once the kernel has, signals `applied` (if given). Never blocks
    /// the caller on the kernel.
    fn invalidate(&self, what: Invalidation, applied: Option<oneshot::Sender<()>>);
}

/// No kernel (unit tests, and the time before the mount exists).
#[derive(Debug, Default)]
pub struct NoKernel;

impl KernelCache for NoKernel {
    fn invalidate(&self, _: Invalidation, applied: Option<oneshot::Sender<()>>) {
        if let Some(done) = applied {
            let _ = done.send(());
        }
    }
}

/// A directory's clock (mtime, ctime).
pub type DirClock = (Timestamp, Timestamp);

/// What the kernel holds of this mount (see the module docs).
#[derive(Debug)]
pub struct KernelView {
    /// The kernel's caches, once the mount exists.
    kernel: OnceLock<Arc<dyn KernelCache>>,
    /// How long a name found absent stays known absent.
    ttl: MetadataTtl,
    /// Per inode, the references the kernel holds (lookups not yet forgotten).
    lookups: Mutex<HashMap<u64, u64>>,
    /// Names found absent, and when.
    absent: Mutex<HashMap<(u64, String), i64>>,
    /// Per file, the ETag of the version whose pages the kernel may have cached.
    pages: Mutex<HashMap<u64, String>>,
    /// Per directory, its clock at the last `opendir`: the entries the kernel may have cached
    /// of it (`FOPEN_CACHE_DIR`) were listed at or after that clock.
    entries: Mutex<HashMap<u64, DirClock>>,
    /// Directories whose cached entries are to be dropped when their listing's TTL runs out.
    entries_expiring: Mutex<HashSet<u64>>,
    /// Per directory, the latest second of its mtime shown in this run.
    clocks: Mutex<HashMap<u64, i64>>,
}

impl KernelView {
    /// A view of a kernel that holds nothing yet; names found absent stay so for `ttl`.
    pub fn new(ttl: MetadataTtl) -> Self {
        KernelView {
            kernel: OnceLock::new(),
            ttl,
            lookups: Mutex::default(),
            absent: Mutex::default(),
            pages: Mutex::default(),
            entries: Mutex::default(),
            entries_expiring: Mutex::default(),
            clocks: Mutex::default(),
        }
    }

    /// Connects the kernel's caches. Set once, when mounted; later calls are ignored.
    pub fn connect(&self, kernel: Arc<dyn KernelCache>) {
        let _ = self.kernel.set(kernel);
    }

    /// The kernel's caches ([`NoKernel`] before the mount exists).
    pub fn kernel(&self) -> &dyn KernelCache {
        match self.kernel.get() {
            Some(k) => k.as_ref(),
            None => &NoKernel,
        }
    }

    /// Has the kernel forget everything in `what`, and waits (a bounded time: a kernel that
    /// does not answer must not hold up the request for good) until it has forgotten those
    /// that must be applied before the caller answers ([`Invalidation::is_waited_for`]).
    /// Returns whether the kernel answered in time.
    pub async fn forget_all(&self, what: Vec<Invalidation>) -> bool {
        let mut applied = Vec::new();
        for w in what {
            let done = w.is_waited_for().then(|| {
                let (tx, rx) = oneshot::channel();
                applied.push(rx);
                tx
            });
            self.kernel().invalidate(w, done);
        }
        if applied.is_empty() {
            return true;
        }
        let answered =
            tokio::time::timeout(INVALIDATION_WAIT, futures::future::join_all(applied)).await;
        if answered.is_err() {
            warn!("the kernel took too long to drop what it cached of changed files");
        }
        answered.is_ok()
    }

    /// Records that the kernel holds one more reference to `ino`.
    pub fn looked_up(&self, ino: u64) {
        *self.lookups.lock().unwrap().entry(ino).or_default() += 1;
    }

    /// The kernel dropped `n` references to `ino`. Returns whether it holds none now; then it
    /// dropped the inode's cached pages, attributes and entries too, and they are forgotten
    /// here.
    pub fn forgot(&self, ino: u64, n: u64) -> bool {
        {
            let mut lookups = self.lookups.lock().unwrap();
            match lookups.get_mut(&ino) {
                Some(count) if *count > n => {
                    *count -= n;
                    return false;
                }
                _ => lookups.remove(&ino),
            };
        }
        self.pages.lock().unwrap().remove(&ino);
        self.entries.lock().unwrap().remove(&ino);
        self.clocks.lock().unwrap().remove(&ino);
        true
    }

    /// Whether the kernel holds a reference to `ino`.
    pub fn holds(&self, ino: u64) -> bool {
        self.lookups.lock().unwrap().contains_key(&ino)
    }

    /// Records that `name` was found absent from directory `parent` now.
    pub fn found_absent(&self, parent: u64, name: &str) {
        let mut absent = self.absent.lock().unwrap();
        if absent.len() >= NEGATIVE_CACHE_MAX {
            absent.clear();
        }
        absent.insert((parent, name.to_string()), now_ns());
    }

    /// `name` exists in directory `parent` (again).
    pub fn not_absent(&self, parent: u64, name: &str) {
        self.absent
            .lock()
            .unwrap()
            .remove(&(parent, name.to_string()));
    }

    /// Whether `name` was found absent from directory `parent` within the TTL.
    pub fn known_absent(&self, parent: u64, name: &str) -> bool {
        let absent = self.absent.lock().unwrap();
        absent
            .get(&(parent, name.to_string()))
            .is_some_and(|&at| self.ttl.is_fresh(at, now_ns()))
    }

    /// At an open of file `ino` whose contents are now the object version `etag` (`None`:
    /// local contents, or none known): whether the pages the kernel cached at an earlier open
    /// hold those very contents, so it may keep them. Records what the kernel caches from now.
    pub fn pages_still_valid(&self, ino: u64, etag: Option<&str>) -> bool {
        let mut pages = self.pages.lock().unwrap();
        match etag {
            Some(etag) => pages.insert(ino, etag.to_string()).as_deref() == Some(etag),
            None => {
                pages.remove(&ino);
                false
            }
        }
    }

    /// At an open of directory `dir` whose clock is `clock`: whether the entries the kernel
    /// cached at the previous open were taken at the same clock. Records `clock` as the one
    /// the kernel's entries are taken at from now.
    pub fn entries_opened(&self, dir: u64, clock: DirClock) -> bool {
        self.entries.lock().unwrap().insert(dir, clock) == Some(clock)
    }

    /// Starts the wait for directory `dir`'s cached entries to expire; `false` if one is
    /// pending already.
    pub fn start_entries_expiry(&self, dir: u64) -> bool {
        self.entries_expiring.lock().unwrap().insert(dir)
    }

    /// The wait for directory `dir`'s cached entries ran out: the kernel drops them.
    pub fn expire_entries(&self, dir: u64) {
        self.entries_expiring.lock().unwrap().remove(&dir);
        self.kernel().invalidate(Invalidation::Inode(dir), None);
    }

    /// Records that directory `dir`'s clock at `mtime` is being shown (`stat`, `opendir`).
    pub fn show_clock(&self, dir: u64, mtime: Timestamp) {
        let mut shown = self.clocks.lock().unwrap();
        let sec = shown.entry(dir).or_insert(mtime.sec);
        *sec = (*sec).max(mtime.sec);
    }

    /// Whether directory `dir`'s clock at `mtime` may have been shown (see
    /// [`crate::meta::inodes::DirState::clock_shown`]): unless this run has shown only
    /// earlier seconds of it. Answering yes records `mtime` as shown, since the clock then
    /// moves past it and only the new value is unseen.
    pub fn clock_shown(&self, dir: u64, mtime: Timestamp) -> bool {
        let mut shown = self.clocks.lock().unwrap();
        match shown.get(&dir) {
            Some(&sec) if sec < mtime.sec => false,
            _ => {
                shown.insert(dir, mtime.sec);
                true
            }
        }
    }
}

/// Remembers every invalidation, for tests.
#[cfg(test)]
#[derive(Debug, Default, Clone)]
pub struct RecordedKernel(pub std::sync::Arc<std::sync::Mutex<Vec<Invalidation>>>);

#[cfg(test)]
impl KernelCache for RecordedKernel {
    fn invalidate(&self, what: Invalidation, applied: Option<oneshot::Sender<()>>) {
        self.0.lock().unwrap().push(what);
        if let Some(done) = applied {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(sec: i64) -> Timestamp {
        Timestamp { sec, nsec: 0 }
    }

    #[test]
    fn an_inode_is_held_until_every_lookup_is_forgotten_and_then_its_caches_are_gone() {
        let view = KernelView::new(MetadataTtl::Forever);
        view.looked_up(5);
        view.looked_up(5);
        assert!(!view.pages_still_valid(5, Some("e1")));
        assert!(view.pages_still_valid(5, Some("e1")));
        assert!(!view.forgot(5, 1));
        assert!(view.holds(5));
        assert!(view.forgot(5, 1));
        assert!(!view.holds(5));
        // The kernel dropped the pages with the inode: nothing of them may be kept.
        assert!(!view.pages_still_valid(5, Some("e1")));
    }

    #[test]
    fn pages_are_kept_only_for_the_version_they_were_read_from() {
        let view = KernelView::new(MetadataTtl::Forever);
        assert!(!view.pages_still_valid(7, Some("a")));
        assert!(!view.pages_still_valid(7, Some("b")));
        assert!(view.pages_still_valid(7, Some("b")));
        assert!(!view.pages_still_valid(7, None));
        assert!(!view.pages_still_valid(7, Some("b")));
    }

    #[test]
    fn a_name_stays_absent_for_the_ttl_until_it_appears() {
        let view = KernelView::new(MetadataTtl::Forever);
        view.found_absent(1, "x");
        assert!(view.known_absent(1, "x"));
        assert!(!view.known_absent(1, "y"));
        assert!(!view.known_absent(2, "x"));
        view.not_absent(1, "x");
        assert!(!view.known_absent(1, "x"));
        let never = KernelView::new(MetadataTtl::For(Duration::ZERO));
        never.found_absent(1, "x");
        assert!(!never.known_absent(1, "x"));
    }

    #[test]
    fn cached_entries_serve_only_the_clock_they_were_taken_at() {
        let view = KernelView::new(MetadataTtl::Forever);
        let (one, two) = ((at(1), at(1)), (at(2), at(2)));
        assert!(!view.entries_opened(3, one));
        assert!(view.entries_opened(3, one));
        assert!(!view.entries_opened(3, two));
        assert!(view.start_entries_expiry(3));
        assert!(!view.start_entries_expiry(3));
        view.expire_entries(3);
        assert!(view.start_entries_expiry(3));
    }

    #[test]
    fn a_clock_counts_as_shown_unless_only_earlier_seconds_were() {
        let view = KernelView::new(MetadataTtl::Forever);
        // Never shown in this run: it may have been, in an earlier one.
        assert!(view.clock_shown(4, at(10)));
        view.show_clock(4, at(10));
        assert!(!view.clock_shown(4, at(11)));
        view.show_clock(4, at(11));
        assert!(view.clock_shown(4, at(11)));
        // Answering yes records it: the clock moves past it.
        assert!(!view.clock_shown(4, at(12)));
    }

    #[tokio::test]
    async fn forgetting_waits_for_inodes_only() {
        let recorded = RecordedKernel::default();
        let view = KernelView::new(MetadataTtl::Forever);
        view.connect(Arc::new(recorded.clone()));
        let what = vec![Invalidation::Entry(1, "a".into()), Invalidation::Inode(9)];
        assert!(view.forget_all(what.clone()).await);
        assert_eq!(*recorded.0.lock().unwrap(), what);
    }
}
