//! The FUSE adapter: decode a kernel request, run it on tokio, reply.
//!
//! Nothing here waits: each request becomes a task on the runtime and the request loop goes
//! straight back to `/dev/fuse`, so a slow S3 call holds up only the caller that needs it.
//! The few answered on the loop itself take only memory and short in-memory locks: statfs
//! (constant), forget's lookup counts (the row it may delete goes to a blocking thread),
//! releasedir, and a readdirplus batch of a listing already made (if its lock is free). Reads
//! and writes start here and move to the runtime only when they first have to wait
//! ([`FuseAdapter::run_here_first`]): what they do before that is a local disk read of at most
//! 64 KiB of cached blocks, a slice of a block in memory, or a write into a staging file,
//! which cost less than handing the request to a worker and back. There are two request
//! threads by default (`--fuse-threads`), so one waiting for the local disk does not hold up
//! the mount.
//! Semantics live in [`crate::fs`]; this file only translates types and errnos.

use std::ffi::OsStr;
use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, SessionACL, TimeOrNow, WriteFlags,
};
use tracing::{Instrument, debug, instrument, warn};

use crate::fs::kernel::{Invalidation, KernelCache};
use crate::fs::{self, Attr, BLKSIZE, Caller, Fs, FsError, SetAttr, TimeSet};
use crate::meta::Kind;

/// Requests the kernel may have in flight at once (its default of 16 would idle S3).
const MAX_BACKGROUND: u16 = 64;

/// The `fuser::Filesystem` of a mount.
#[derive(Debug)]
pub struct FuseAdapter {
    fs: Arc<Fs>,
    rt: tokio::runtime::Handle,
    ttl: Duration,
    xattrs: bool,
}

impl FuseAdapter {
    /// An adapter running `fs`'s operations on `rt`.
    pub fn new(fs: Arc<Fs>, rt: tokio::runtime::Handle) -> Self {
        let ttl = fs.config().metadata_ttl.kernel_ttl();
        let xattrs = fs.config().xattrs;
        FuseAdapter {
            fs,
            rt,
            ttl,
            xattrs,
        }
    }

    fn spawn<F>(&self, f: impl FnOnce(Arc<Fs>) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        // The task runs in the request's span: its request id, inode and pid.
        self.rt.spawn(f(self.fs.clone()).in_current_span());
    }

    /// Like [`Self::spawn`], but the task first runs here, on the request thread, until it
    /// first has to wait (for a lock, the bucket, a blocking thread); only then does it go
    /// to the runtime, which polls it again at once and from then on. For requests that
    /// usually need no waiting, where the hand-off to a worker and back (two wake-ups and
    /// their context switches) was most of the daemon's CPU: a write of a 2 KiB piece (what
    /// Apache's mod_dav_fs sends), a random 4 KiB read of a cached block.
    fn run_here_first<F>(&self, f: impl FnOnce(Arc<Fs>) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let _runtime = self.rt.enter();
        let mut task = Box::pin(f(self.fs.clone()).in_current_span());
        // Nothing is lost to this waker: a task that was not ready is polled again by the
        // runtime, and a future looks at what it waits for each time it is polled.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if task.as_mut().poll(&mut cx).is_pending() {
            self.rt.spawn(task);
        }
    }
}

/// Mount options for the kernel.
pub fn mount_options(fs: &Fs) -> fuser::Config {
    let cfg = fs.config();
    let mut options = vec![
        MountOption::FSName(format!("s3bridge:{}", cfg.bucket)),
        // As a kernel option, so that the mount table says `fuse.s3bridge` (`findmnt -t
        // fuse.s3bridge`): fuser hands `Subtype` to fusermount only, and a mount by root
        // calls mount(2) itself with type `fuse`. fusermount takes it from here as well.
        MountOption::CUSTOM("subtype=s3bridge".to_string()),
        // The kernel enforces modes and ownership (as it must with allow_other).
        MountOption::DefaultPermissions,
        // Device nodes and set-user-ID bits from a bucket must not take effect on this host.
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoAtime,
    ];
    if cfg.read_only {
        options.push(MountOption::RO);
    }
    let mut config = fuser::Config::default();
    config.mount_options = options;
    config.n_threads = Some(cfg.fuse_threads);
    // Each thread reads its own clone of the descriptor, so the kernel hands requests to
    // whichever is waiting.
    config.clone_fd = true;
    config.acl = if cfg.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config
}

/// Mounts `fs` at `mountpoint`; the returned session serves requests when run.
pub fn mount(
    fs: Arc<Fs>,
    rt: tokio::runtime::Handle,
    mountpoint: &Path,
) -> io::Result<fuser::Session<FuseAdapter>> {
    let config = mount_options(&fs);
    let session = fuser::Session::new(FuseAdapter::new(fs.clone(), rt), mountpoint, &config)?;
    fs.set_kernel_cache(Arc::new(KernelNotifier::start(session.notifier())?));
    Ok(session)
}

/// The kernel's caches of a mount, told to forget through FUSE notifications.
///
/// They are sent from threads of their own: the kernel applies an entry's invalidation under
/// its directory's lock, which the request that brought the news (a lookup, a readdir of the
/// directory) may hold until it is answered, so sending from the task that answers it would
/// wait for itself. Inodes have a thread apart from entries, so that an inode's invalidation,
/// which that task does wait for (see `fs::kernel`), never queues behind such an entry.
#[derive(Debug)]
struct KernelNotifier {
    entries: Queue,
    inodes: Queue,
}

type Applied = tokio::sync::oneshot::Sender<()>;
type Queue = std::sync::mpsc::Sender<(Invalidation, Option<Applied>)>;

impl KernelNotifier {
    fn start(notifier: fuser::Notifier) -> io::Result<Self> {
        Ok(KernelNotifier {
            entries: Self::sender("s3bridge-inval-e", notifier.clone())?,
            inodes: Self::sender("s3bridge-inval-i", notifier)?,
        })
    }

    /// A thread that applies what it is sent, in order; it ends when the filesystem, which
    /// holds the sender, is dropped.
    fn sender(name: &str, notifier: fuser::Notifier) -> io::Result<Queue> {
        let (queue, pending) = std::sync::mpsc::channel::<(Invalidation, Option<Applied>)>();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                for (what, applied) in pending {
                    let sent = match &what {
                        Invalidation::Inode(ino) => notifier.inval_inode(INodeNo(*ino), 0, 0),
                        Invalidation::Entry(parent, name) => {
                            notifier.inval_entry(INodeNo(*parent), OsStr::new(name))
                        }
                    };
                    if let Err(e) = sent {
                        debug!(?what, "kernel invalidation not applied: {e}");
                    }
                    if let Some(done) = applied {
                        let _ = done.send(());
                    }
                }
            })?;
        Ok(queue)
    }
}

impl KernelCache for KernelNotifier {
    fn invalidate(&self, what: Invalidation, applied: Option<Applied>) {
        let queue = match what {
            Invalidation::Entry(..) => &self.entries,
            _ => &self.inodes,
        };
        // Fails only once the thread is gone, i.e. after the unmount.
        let _ = queue.send((what, applied));
    }
}

fn errno(op: &str, e: &FsError) -> Errno {
    let code = e.errno();
    match e {
        FsError::Store(_) | FsError::Meta(_) | FsError::Io(_) => warn!("{op}: {e}"),
        _ => debug!("{op}: {e}"),
    }
    Errno::from_i32(code)
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: file_type(a.kind),
        perm: a.perm as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: BLKSIZE,
        flags: 0,
    }
}

fn time_set(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(t) => TimeSet::At(t.into()),
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

impl fuser::Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // O_TRUNC arrives with open, so a truncating open uploads once, at close.
        let _ = config.add_capabilities(InitFlags::FUSE_ATOMIC_O_TRUNC);
        // Lookups and readdirs of one directory may run concurrently: fs/ locks itself.
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        // Listings carry attributes (READDIRPLUS), adaptively: the kernel asks for them when
        // a listing is followed by lookups (`ls -l`), plain READDIR otherwise.
        let _ = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND * 3 / 4);
        Ok(())
    }

    fn destroy(&mut self) {
        let fs = self.fs.clone();
        let pending = self.rt.block_on(fs.flush_all());
        if pending > 0 {
            warn!(
                pending,
                "unmounted with files not yet uploaded; they stay in the cache directory and \
                 are uploaded by the next mount of it"
            );
        }
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = parent.0, pid = req.pid()))]
    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let (name, ttl) = (name.to_owned(), self.ttl);
        self.spawn(move |fs| async move {
            match fs.lookup(parent.0, &name).await {
                Ok(a) => reply.entry(&ttl, &file_attr(&a), Generation(0)),
                Err(FsError::NotFound) => {
                    // A negative entry the kernel may cache for the TTL.
                    let mut none = file_attr(&Attr {
                        ino: 0,
                        kind: Kind::File,
                        perm: 0,
                        nlink: 0,
                        uid: 0,
                        gid: 0,
                        size: 0,
                        blocks: 0,
                        rdev: 0,
                        atime: SystemTime::UNIX_EPOCH,
                        mtime: SystemTime::UNIX_EPOCH,
                        ctime: SystemTime::UNIX_EPOCH,
                    });
                    none.ino = INodeNo(0);
                    reply.entry(&ttl, &none, Generation(0));
                }
                Err(e) => reply.error(errno("lookup", &e)),
            }
        });
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = ino.0, pid = req.pid()))]
    fn forget(&self, req: &Request, ino: INodeNo, nlookup: u64) {
        // Counting is in memory; deleting an unlinked row is an SQL write, which may wait for
        // the writer (a listing's page, a durable commit): off the request loop.
        if self.fs.forget(ino.0, nlookup) {
            let fs = self.fs.clone();
            self.rt.spawn_blocking(move || fs.forget_row(ino.0));
        }
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = ino.0, pid = req.pid()))]
    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let ttl = self.ttl;
        self.spawn(move |fs| async move {
            reply_attr(reply, ttl, "getattr", fs.getattr(ino.0).await);
        });
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = ino.0, pid = req.pid()))]
    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let ttl = self.ttl;
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time_set),
            mtime: mtime.map(time_set),
        };
        self.spawn(move |fs| async move {
            reply_attr(
                reply,
                ttl,
                "setattr",
                fs.setattr(ino.0, fh.map(|h| h.0), set).await,
            );
        });
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = ino.0, pid = req.pid()))]
    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        self.spawn(move |fs| async move {
            match fs.readlink(ino.0).await {
                Ok(t) => reply.data(&t),
                Err(e) => reply.error(errno("readlink", &e)),
            }
        });
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = parent.0, pid = req.pid()))]
    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let (name, ttl, who) = (name.to_owned(), self.ttl, caller(req));
        self.spawn(move |fs| async move {
            reply_entry(
                reply,
                ttl,
                "mknod",
                fs.mknod(parent.0, &name, mode, umask, rdev, who).await,
            );
        });
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = parent.0, pid = req.pid()))]
    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let (name, ttl, who) = (name.to_owned(), self.ttl, caller(req));
        self.spawn(move |fs| async move {
            reply_entry(
                reply,
                ttl,
                "mkdir",
                fs.mkdir(parent.0, &name, mode, umask, who).await,
            );
        });
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = parent.0, pid = req.pid()))]
    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.spawn(move |fs| async move {
            reply_empty(reply, "unlink", fs.unlink(parent.0, &name).await);
        });
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = parent.0, pid = req.pid()))]
    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.spawn(move |fs| async move {
            reply_empty(reply, "rmdir", fs.rmdir(parent.0, &name).await);
        });
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = parent.0, pid = req.pid()))]
    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let (name, target) = (link_name.to_owned(), target.as_os_str().to_owned());
        let (ttl, who) = (self.ttl, caller(req));
        self.spawn(move |fs| async move {
            reply_entry(
                reply,
                ttl,
                "symlink",
                fs.symlink(parent.0, &name, &target, who).await,
            );
        });
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = parent.0, pid = req.pid()))]
    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (name, newname) = (name.to_owned(), newname.to_owned());
        self.spawn(move |fs| async move {
            let result = fs
                .rename(parent.0, &name, newparent.0, &newname, flags.bits())
                .await;
            reply_empty(reply, "rename", result);
        });
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = ino.0, pid = req.pid()))]
    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply_entry(reply, self.ttl, "link", self.fs.link());
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = ino.0, pid = req.pid()))]
    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let who = caller(req);
        self.spawn(move |fs| async move {
            let opened = fs.open(ino.0, flags.0, who).await;
            reply_opened(reply, "open", FopenFlags::empty(), opened);
        });
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = ino.0, pid = req.pid()))]
    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.run_here_first(move |fs| async move {
            match fs.read(fh.0, offset, size).await {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(errno("read", &e)),
            }
        });
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = ino.0, pid = req.pid()))]
    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let data = data.to_vec();
        self.run_here_first(move |fs| async move {
            match fs.write(fh.0, offset, &data).await {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno("write", &e)),
            }
        });
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = ino.0, pid = req.pid()))]
    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.spawn(move |fs| async move {
            reply_empty(reply, "flush", fs.flush(fh.0).await);
        });
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = ino.0, pid = req.pid()))]
    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn(move |fs| async move {
            fs.release(fh.0).await;
            reply.ok();
        });
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = ino.0, pid = req.pid()))]
    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn(move |fs| async move {
            reply_empty(reply, "fsync", fs.fsync(fh.0).await);
        });
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = ino.0, pid = req.pid()))]
    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.spawn(move |fs| async move {
            let opened = fs.opendir(ino.0).await;
            reply_opened(reply, "opendir", FopenFlags::FOPEN_CACHE_DIR, opened);
        });
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = ino.0, pid = req.pid()))]
    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.spawn(move |fs| async move {
            match fs.readdir(ino.0, fh.0, offset).await {
                Ok(entries) => {
                    for e in entries {
                        if reply.add(INodeNo(e.ino), e.next_offset, file_type(e.kind), &e.name) {
                            break;
                        }
                    }
                    reply.ok();
                }
                Err(e) => reply.error(errno("readdir", &e)),
            }
        });
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = ino.0, pid = req.pid()))]
    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        let ttl = self.ttl;
        if let Some(result) = self.fs.readdirplus_now(fh.0, offset) {
            // From memory: answered here, without a hand-over to a worker.
            return reply_entries_plus(&self.fs, reply, ttl, result);
        }
        self.spawn(move |fs| async move {
            let result = fs.readdirplus(ino.0, fh.0, offset).await;
            reply_entries_plus(&fs, reply, ttl, result);
        });
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = ino.0, pid = req.pid()))]
    fn releasedir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = ino.0, pid = req.pid()))]
    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Directory changes reach the bucket before the call that made them returns.
        reply.ok();
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = ino.0, pid = req.pid()))]
    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.spawn(move |fs| async move {
            reply_empty(
                reply,
                "fallocate",
                fs.fallocate(fh.0, offset, length, mode).await,
            );
        });
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = ino.0, pid = req.pid()))]
    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        reply.statfs(
            s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
        );
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = ino.0, pid = req.pid()))]
    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        if !self.xattrs {
            // ENOSYS: the kernel stops asking and answers EOPNOTSUPP itself from then on.
            reply.error(Errno::ENOSYS);
            return;
        }
        let (name, value) = (name.to_owned(), value.to_vec());
        self.spawn(move |fs| async move {
            reply_empty(
                reply,
                "setxattr",
                fs.setxattr(ino.0, &name, &value, flags).await,
            );
        });
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = ino.0, pid = req.pid()))]
    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if !self.xattrs {
            // ENOSYS: the kernel stops asking and answers EOPNOTSUPP itself from then on.
            reply.error(Errno::ENOSYS);
            return;
        }
        if !fs::is_stored_xattr(name) {
            // `ls -l` asks for security.selinux and system.posix_acl_access on every file:
            // answered here, without a trip through the runtime.
            reply.error(Errno::ENODATA);
            return;
        }
        let name = name.to_owned();
        self.spawn(move |fs| async move {
            match fs.getxattr(ino.0, &name).await {
                Ok(v) => reply_xattr(reply, &v, size),
                Err(e) => reply.error(errno("getxattr", &e)),
            }
        });
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = ino.0, pid = req.pid()))]
    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if !self.xattrs {
            // ENOSYS: the kernel stops asking and answers EOPNOTSUPP itself from then on.
            reply.error(Errno::ENOSYS);
            return;
        }
        self.spawn(move |fs| async move {
            match fs.listxattr(ino.0).await {
                Ok(v) => reply_xattr(reply, &v, size),
                Err(e) => reply.error(errno("listxattr", &e)),
            }
        });
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = ino.0, pid = req.pid()))]
    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if !self.xattrs {
            // ENOSYS: the kernel stops asking and answers EOPNOTSUPP itself from then on.
            reply.error(Errno::ENOSYS);
            return;
        }
        let name = name.to_owned();
        self.spawn(move |fs| async move {
            reply_empty(reply, "removexattr", fs.removexattr(ino.0, &name).await);
        });
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = ino.0, pid = req.pid()))]
    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        // A row read (microseconds, but one that finds no idle reading connection opens
        // one): off the request loop.
        let (mask, caller) = (mask.bits(), caller(req));
        self.spawn(move |fs| async move {
            reply_empty(reply, "access", fs.access(ino.0, mask, caller));
        });
    }

    #[instrument(level = "debug", skip_all, fields(req = u64::from(req.unique()), ino = parent.0, pid = req.pid()))]
    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (name, ttl, who) = (name.to_owned(), self.ttl, caller(req));
        self.spawn(move |fs| async move {
            match fs.create(parent.0, &name, mode, umask, flags, who).await {
                Ok((a, fh)) => reply.created(
                    &ttl,
                    &file_attr(&a),
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::empty(),
                ),
                Err(e) => reply.error(errno("create", &e)),
            }
        });
    }
}

fn reply_entries_plus(
    fs: &Fs,
    mut reply: ReplyDirectoryPlus,
    ttl: Duration,
    result: Result<Vec<(fs::DirEntry, Attr)>, FsError>,
) {
    match result {
        Ok(entries) => {
            for (e, a) in entries {
                let full = reply.add(
                    INodeNo(e.ino),
                    e.next_offset,
                    &e.name,
                    &ttl,
                    &file_attr(&a),
                    Generation(0),
                );
                if full {
                    break;
                }
                fs.entry_sent(&e);
            }
            reply.ok();
        }
        Err(e) => reply.error(errno("readdirplus", &e)),
    }
}

fn reply_entry(reply: ReplyEntry, ttl: Duration, op: &str, result: Result<Attr, FsError>) {
    match result {
        Ok(a) => reply.entry(&ttl, &file_attr(&a), Generation(0)),
        Err(e) => reply.error(errno(op, &e)),
    }
}

fn reply_attr(reply: ReplyAttr, ttl: Duration, op: &str, result: Result<Attr, FsError>) {
    match result {
        Ok(a) => reply.attr(&ttl, &file_attr(&a)),
        Err(e) => reply.error(errno(op, &e)),
    }
}

/// Answers an open/opendir: `flags`, and `FOPEN_KEEP_CACHE` where the kernel may keep what it
/// cached at earlier opens.
fn reply_opened(
    reply: ReplyOpen,
    op: &str,
    flags: FopenFlags,
    result: Result<fs::Opened, FsError>,
) {
    match result {
        Ok(o) if o.keep_cache => {
            reply.opened(FileHandle(o.fh), flags | FopenFlags::FOPEN_KEEP_CACHE)
        }
        Ok(o) => reply.opened(FileHandle(o.fh), flags),
        Err(e) => reply.error(errno(op, &e)),
    }
}

fn reply_empty(reply: ReplyEmpty, op: &str, result: Result<(), FsError>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(op, &e)),
    }
}

/// Answers a getxattr/listxattr: the size when asked for it, ERANGE when the buffer is short.
fn reply_xattr(reply: ReplyXattr, value: &[u8], size: u32) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}
