//! Unit tests of the filesystem semantics on the in-memory store, without a mount.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::config::MetadataTtl;
use crate::meta::DirRename;
use crate::store::mem::{MemStore, Op};

const ROOT: u64 = ROOT_INO;
/// Root: opens in these tests are about contents, not permissions.
const ROOT_CALLER: Caller = Caller { uid: 0, gid: 0 };
const ME: Caller = Caller {
    uid: 1000,
    gid: 1000,
};

struct Setup {
    fs: Arc<Fs>,
    mem: Arc<MemStore>,
    dir: tempfile::TempDir,
}

fn setup_with(mem: Arc<MemStore>, ttl: MetadataTtl, dir: tempfile::TempDir) -> Setup {
    setup_configured(mem, ttl, dir, |_| {})
}

/// A write-back mount of `mem` with its cache in `dir`.
fn setup_write_back(mem: Arc<MemStore>, dir: tempfile::TempDir) -> Setup {
    setup_configured(mem, MetadataTtl::For(Duration::from_secs(60)), dir, |cfg| {
        cfg.write_back = true
    })
}

fn setup_configured(
    mem: Arc<MemStore>,
    ttl: MetadataTtl,
    dir: tempfile::TempDir,
    configure: impl FnOnce(&mut Config),
) -> Setup {
    let mut cfg = Config {
        bucket: "b".into(),
        prefix: "pre/".into(),
        cache_dir: dir.path().to_path_buf(),
        uid: 7,
        gid: 8,
        metadata_ttl: ttl,
        multipart_threshold: 6 * 1024 * 1024,
        part_size: 5 * 1024 * 1024,
        ..Config::default()
    };
    configure(&mut cfg);
    let fs = Arc::new(Fs::new(cfg, mem.clone()).unwrap());
    Setup { fs, mem, dir }
}

fn setup() -> Setup {
    setup_with(
        Arc::new(MemStore::new()),
        MetadataTtl::For(Duration::from_secs(60)),
        tempfile::tempdir().unwrap(),
    )
}

fn n(s: &str) -> &OsStr {
    OsStr::new(s)
}

impl Setup {
    async fn write_file(&self, parent: u64, name: &str, data: &[u8]) -> u64 {
        let (attr, fh) = self
            .fs
            .create(parent, n(name), 0o644, 0o022, libc::O_WRONLY, ME)
            .await
            .unwrap();
        if !data.is_empty() {
            self.fs.write(fh, 0, data).await.unwrap();
        }
        self.fs.flush(fh).await.unwrap();
        self.fs.release(fh).await;
        attr.ino
    }

    async fn read_all(&self, ino: u64) -> Vec<u8> {
        let fh = self
            .fs
            .open(ino, libc::O_RDONLY, ROOT_CALLER)
            .await
            .unwrap()
            .fh;
        let mut out = Vec::new();
        loop {
            let chunk = self
                .fs
                .read(fh, out.len() as u64, 128 * 1024)
                .await
                .unwrap();
            if chunk.is_empty() {
                break;
            }
            out.extend_from_slice(&chunk);
        }
        self.fs.release(fh).await;
        out
    }

    /// All names in `dir`, read as the kernel does: batch after batch until an empty one.
    async fn names(&self, dir: u64) -> Vec<String> {
        let fh = self.fs.opendir(dir).await.unwrap().fh;
        let mut names = Vec::new();
        let mut offset = 0;
        loop {
            let batch = self.fs.readdir(dir, fh, offset).await.unwrap();
            let Some(last) = batch.last() else { break };
            offset = last.next_offset;
            names.extend(batch.into_iter().map(|e| e.name));
        }
        self.fs.releasedir(fh);
        names.retain(|n| n != "." && n != "..");
        // In inode order as read; sorted, as `ls` shows them.
        names.sort();
        names
    }

    fn body(&self, key: &str) -> Option<Vec<u8>> {
        self.mem.object(key).map(|(b, _)| b.to_vec())
    }
}

#[tokio::test]
async fn a_written_file_is_an_object_with_s3fs_headers() {
    let s = setup();
    s.write_file(ROOT, "a.txt", b"hello\n").await;
    let (body, headers) = s.mem.object("pre/a.txt").unwrap();
    assert_eq!(&body[..], b"hello\n");
    assert_eq!(
        headers.metadata["mode"],
        (libc::S_IFREG | 0o644).to_string()
    );
    assert_eq!(headers.metadata["uid"], "1000");
    assert_eq!(headers.metadata["gid"], "1000");
    assert!(headers.metadata.contains_key("mtime"));
}

#[tokio::test]
async fn objects_from_other_clients_appear_with_their_headers_or_the_defaults() {
    let s = setup();
    s.mem.insert("pre/plain", b"abc", WriteHeaders::default());
    let mut meta = BTreeMap::new();
    meta.insert("mode".to_string(), (libc::S_IFREG | 0o600).to_string());
    meta.insert("uid".to_string(), "33".to_string());
    meta.insert("mtime".to_string(), "1600000000.5".to_string());
    s.mem.insert(
        "pre/s3fs",
        b"x",
        WriteHeaders {
            content_type: None,
            metadata: meta,
        },
    );
    let plain = s.fs.lookup(ROOT, n("plain")).await.unwrap();
    assert_eq!(
        (plain.perm, plain.uid, plain.gid, plain.size),
        (0o644, 7, 8, 3)
    );
    let other = s.fs.lookup(ROOT, n("s3fs")).await.unwrap();
    assert_eq!((other.perm, other.uid, other.gid), (0o600, 33, 8));
    assert_eq!(
        other.mtime,
        std::time::UNIX_EPOCH + Duration::from_millis(1_600_000_000_500)
    );
    assert_eq!(s.read_all(plain.ino).await, b"abc");
}

#[tokio::test]
async fn listing_hides_odd_keys_and_prefers_directories() {
    let s = setup();
    for key in [
        "pre/ok",
        "pre/a//b",
        "pre/./x",
        "pre/../escape",
        "pre/both",
        "pre/both/inner",
        "pre/implicit/deep/file",
        &format!("pre/{}", "x".repeat(300)),
    ] {
        s.mem.insert(key, b"1", WriteHeaders::default());
    }
    let names = s.names(ROOT).await;
    // "a" is a directory (from "a//b") whose only key is hidden.
    assert_eq!(names, ["a", "both", "implicit", "ok"]);
    let both = s.fs.lookup(ROOT, n("both")).await.unwrap();
    assert_eq!(both.kind, Kind::Dir);
    let a = s.fs.lookup(ROOT, n("a")).await.unwrap();
    assert_eq!(s.names(a.ino).await, Vec::<String>::new());
    assert_eq!(
        s.fs.lookup(ROOT, n("..")).await.unwrap_err().errno(),
        libc::EINVAL
    );
}

#[tokio::test]
async fn a_name_listed_as_a_file_and_on_a_later_page_as_a_directory_is_one_directory() {
    let s = setup_with(
        Arc::new(MemStore::new()),
        MetadataTtl::For(Duration::from_millis(200)),
        tempfile::tempdir().unwrap(),
    );
    // Keys sort "both", "both-000" ... "both-998", "both/inner": the file ends the first
    // page of 1,000 and the prefix "both/" begins the second.
    s.mem.insert("pre/both", b"file", WriteHeaders::default());
    for i in 0..999 {
        s.mem
            .insert(&format!("pre/both-{i:03}"), b"x", WriteHeaders::default());
    }
    s.mem
        .insert("pre/both/inner", b"y", WriteHeaders::default());
    assert_eq!(s.names(ROOT).await.len(), 1000);
    let both = s.fs.lookup(ROOT, n("both")).await.unwrap();
    assert_eq!(both.kind, Kind::Dir);
    assert_eq!(s.names(both.ino).await, ["inner"]);
    let clock = s.fs.getattr(ROOT).await.unwrap().mtime;
    // Listed again after the TTL: nothing changed, so nothing moves.
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(s.names(ROOT).await.len(), 1000);
    let again = s.fs.lookup(ROOT, n("both")).await.unwrap();
    assert_eq!((again.ino, again.kind), (both.ino, Kind::Dir));
    assert_eq!(s.fs.getattr(ROOT).await.unwrap().mtime, clock);
}

#[tokio::test]
async fn changes_a_listing_applied_before_it_failed_reach_the_kernel_and_the_clock() {
    let mem = Arc::new(MemStore::new());
    for i in 0..1500 {
        mem.insert(&format!("pre/d/f{i:04}"), b"1", WriteHeaders::default());
    }
    let ttl = MetadataTtl::For(Duration::from_millis(100));
    let s = setup_with(mem.clone(), ttl, tempfile::tempdir().unwrap());
    let kernel = kernel::RecordedKernel::default();
    s.fs.set_kernel_cache(Arc::new(kernel.clone()));
    let d = s.fs.lookup(ROOT, n("d")).await.unwrap();
    assert_eq!(s.names(d.ino).await.len(), 1500);
    let first = s.fs.lookup(d.ino, n("f0000")).await.unwrap();
    let stored = s.fs.getattr(d.ino).await.unwrap().mtime;
    // From outside: one file of the first page and one of the second replaced; the
    // second's HEAD fails, so the listing fails after its first page went in.
    mem.insert("pre/d/f0000", b"new", WriteHeaders::default());
    mem.insert("pre/d/f1499", b"new", WriteHeaders::default());
    mem.fail_heads_of("pre/d/f1499");
    tokio::time::sleep(Duration::from_millis(150)).await;
    let clock = s.fs.getattr(d.ino).await.unwrap().mtime;
    let secs =
        |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(secs(clock) > secs(stored), "{clock:?} after {stored:?}");
    assert!(
        kernel
            .0
            .lock()
            .unwrap()
            .contains(&kernel::Invalidation::Inode(first.ino))
    );
}

#[tokio::test]
async fn a_warm_listing_costs_no_request() {
    let s = setup();
    for i in 0..50 {
        s.mem
            .insert(&format!("pre/d/f{i}"), b"x", WriteHeaders::default());
    }
    let d = s.fs.lookup(ROOT, n("d")).await.unwrap();
    assert_eq!(s.names(d.ino).await.len(), 50);
    let (lists, heads) = (s.mem.count(Op::List), s.mem.count(Op::Head));
    assert_eq!(s.names(d.ino).await.len(), 50);
    assert_eq!(s.mem.count(Op::List), lists);
    assert_eq!(s.mem.count(Op::Head), heads, "no HEAD per entry");
}

#[tokio::test]
async fn directories_are_markers_and_empty_ones_persist() {
    let s = setup();
    let d = s.fs.mkdir(ROOT, n("d"), 0o750, 0, ME).await.unwrap();
    assert_eq!(d.perm, 0o750);
    let (_, h) = s.mem.object("pre/d/").unwrap();
    assert_eq!(h.content_type.as_deref(), Some(DIR_CONTENT_TYPE));
    assert_eq!(
        s.fs.mkdir(ROOT, n("d"), 0o755, 0, ME)
            .await
            .unwrap_err()
            .errno(),
        libc::EEXIST
    );
    // An implicit directory keeps existing when its last file goes.
    s.mem.insert("pre/imp/only", b"1", WriteHeaders::default());
    let imp = s.fs.lookup(ROOT, n("imp")).await.unwrap();
    s.fs.lookup(imp.ino, n("only")).await.unwrap();
    s.fs.unlink(imp.ino, n("only")).await.unwrap();
    assert!(s.mem.object("pre/imp/").is_some(), "marker written");
    assert!(s.mem.object("pre/imp/only").is_none());
    // rmdir refuses a non-empty directory and removes an empty one.
    s.write_file(d.ino, "f", b"1").await;
    assert_eq!(
        s.fs.rmdir(ROOT, n("d")).await.unwrap_err().errno(),
        libc::ENOTEMPTY
    );
    s.fs.unlink(d.ino, n("f")).await.unwrap();
    s.fs.rmdir(ROOT, n("d")).await.unwrap();
    assert!(s.mem.object("pre/d/").is_none());
    assert_eq!(
        s.fs.lookup(ROOT, n("d")).await.unwrap_err().errno(),
        libc::ENOENT
    );
}

#[tokio::test]
async fn nextcloud_directory_markers_are_directories() {
    let s = setup();
    s.mem.insert(
        "pre/files/",
        b"",
        WriteHeaders {
            content_type: Some("httpd/unix-directory".into()),
            metadata: BTreeMap::new(),
        },
    );
    let d = s.fs.lookup(ROOT, n("files")).await.unwrap();
    assert_eq!(d.kind, Kind::Dir);
    assert_eq!(s.names(d.ino).await, Vec::<String>::new());
    assert_eq!(s.names(ROOT).await, ["files"]);
}

#[tokio::test]
async fn rmdir_sees_keys_the_listing_hides() {
    let s = setup();
    s.mem.insert("pre/d/", b"", WriteHeaders::default());
    s.mem.insert("pre/d//odd", b"1", WriteHeaders::default());
    s.fs.lookup(ROOT, n("d")).await.unwrap();
    assert_eq!(
        s.fs.rmdir(ROOT, n("d")).await.unwrap_err().errno(),
        libc::ENOTEMPTY
    );
}

#[tokio::test]
async fn random_writes_into_a_large_object_fetch_only_what_they_need() {
    let s = setup();
    let data: Vec<u8> = (0..(12 << 20)).map(|i| (i % 251) as u8).collect();
    s.mem.insert("pre/big", &data, WriteHeaders::default());
    let big = s.fs.lookup(ROOT, n("big")).await.unwrap();
    let fh =
        s.fs.open(big.ino, libc::O_RDWR, ROOT_CALLER)
            .await
            .unwrap()
            .fh;
    let gets = s.mem.count(Op::Get);
    s.fs.write(fh, 5_000_000, b"XYZ").await.unwrap();
    assert_eq!(s.mem.count(Op::Get) - gets, 1, "one block fetched");
    s.fs.flush(fh).await.unwrap();
    s.fs.release(fh).await;
    let mut want = data.clone();
    want[5_000_000..5_000_003].copy_from_slice(b"XYZ");
    assert!(s.body("pre/big").unwrap() == want);
    assert_eq!(s.mem.pending_uploads(), 0);
}

#[tokio::test]
async fn sparse_writes_truncate_and_append() {
    let s = setup();
    let ino = s.write_file(ROOT, "f", b"0123456789").await;
    // Shrink, then grow: the cut bytes read back as zeros.
    s.fs.setattr(
        ino,
        None,
        SetAttr {
            size: Some(4),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(s.body("pre/f").unwrap(), b"0123");
    let fh = s.fs.open(ino, libc::O_RDWR, ROOT_CALLER).await.unwrap().fh;
    s.fs.write(fh, 8, b"AB").await.unwrap();
    assert_eq!(s.fs.getattr(ino).await.unwrap().size, 10);
    s.fs.flush(fh).await.unwrap();
    s.fs.release(fh).await;
    assert_eq!(s.body("pre/f").unwrap(), b"0123\0\0\0\0AB");
    // O_TRUNC empties it.
    let fh =
        s.fs.open(ino, libc::O_WRONLY | libc::O_TRUNC, ROOT_CALLER)
            .await
            .unwrap()
            .fh;
    s.fs.write(fh, 0, b"new").await.unwrap();
    s.fs.release(fh).await;
    assert_eq!(s.body("pre/f").unwrap(), b"new");
}

#[tokio::test]
async fn lookups_see_unflushed_writes() {
    let s = setup();
    let (_, fh) =
        s.fs.create(ROOT, n("f"), 0o644, 0, libc::O_WRONLY, ME)
            .await
            .unwrap();
    s.fs.flush(fh).await.unwrap();
    s.fs.write(fh, 0, b"12345").await.unwrap();
    assert_eq!(s.fs.lookup(ROOT, n("f")).await.unwrap().size, 5);
    s.fs.release(fh).await;
    assert_eq!(s.body("pre/f").unwrap(), b"12345");
}

#[tokio::test]
async fn a_failed_upload_fails_the_flush_and_keeps_the_data() {
    let s = setup();
    let (attr, fh) =
        s.fs.create(ROOT, n("f"), 0o644, 0, libc::O_WRONLY, ME)
            .await
            .unwrap();
    s.fs.write(fh, 0, b"precious").await.unwrap();
    s.mem.fail_next(Op::Put, 1);
    let err = s.fs.flush(fh).await.unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
    assert!(s.body("pre/f").is_none());
    // Still readable through the mount, and uploaded by the next attempt.
    assert_eq!(s.fs.read(fh, 0, 100).await.unwrap(), &b"precious"[..]);
    s.fs.flush(fh).await.unwrap();
    s.fs.release(fh).await;
    assert_eq!(s.body("pre/f").unwrap(), b"precious");
    assert_eq!(s.fs.getattr(attr.ino).await.unwrap().size, 8);
}

#[tokio::test]
async fn a_file_whose_upload_kept_failing_is_uploaded_by_the_next_mount() {
    let mem = Arc::new(MemStore::new());
    let dir = tempfile::tempdir().unwrap();
    let ttl = MetadataTtl::For(Duration::from_secs(60));
    let s = setup_with(mem.clone(), ttl, dir);
    let (_, fh) =
        s.fs.create(ROOT, n("f"), 0o644, 0, libc::O_WRONLY, ME)
            .await
            .unwrap();
    s.fs.write(fh, 0, b"survives").await.unwrap();
    mem.fail_next(Op::Put, 2);
    assert!(s.fs.flush(fh).await.is_err());
    s.fs.release(fh).await;
    assert!(mem.object("pre/f").is_none());
    let Setup { fs, dir, .. } = s;
    drop(fs);
    let s = setup_with(mem.clone(), ttl, dir);
    assert_eq!(s.fs.recover_pending().unwrap(), 1);
    assert_eq!(s.fs.flush_all().await, 0);
    assert_eq!(s.body("pre/f").unwrap(), b"survives");
}

#[tokio::test]
async fn an_unlinked_open_file_stays_readable() {
    let s = setup();
    s.mem
        .insert("pre/f", b"still here", WriteHeaders::default());
    let f = s.fs.lookup(ROOT, n("f")).await.unwrap();
    let fh =
        s.fs.open(f.ino, libc::O_RDONLY, ROOT_CALLER)
            .await
            .unwrap()
            .fh;
    s.fs.unlink(ROOT, n("f")).await.unwrap();
    assert!(s.mem.object("pre/f").is_none());
    assert_eq!(s.fs.read(fh, 0, 100).await.unwrap(), &b"still here"[..]);
    assert_eq!(s.fs.getattr(f.ino).await.unwrap().nlink, 0);
    s.fs.release(fh).await;
    assert_eq!(
        s.fs.lookup(ROOT, n("f")).await.unwrap_err().errno(),
        libc::ENOENT
    );
}

#[tokio::test]
async fn renames_copy_then_delete() {
    let s = setup();
    let ino = s.write_file(ROOT, "a", b"A").await;
    s.write_file(ROOT, "b", b"B").await;
    assert_eq!(
        s.fs.rename(ROOT, n("a"), ROOT, n("b"), libc::RENAME_NOREPLACE)
            .await
            .unwrap_err()
            .errno(),
        libc::EEXIST
    );
    s.fs.rename(ROOT, n("a"), ROOT, n("b"), 0).await.unwrap();
    assert_eq!(s.body("pre/b").unwrap(), b"A");
    assert!(s.body("pre/a").is_none());
    assert_eq!(s.fs.lookup(ROOT, n("b")).await.unwrap().ino, ino);
    // A directory moves with its whole subtree.
    let d = s.fs.mkdir(ROOT, n("d"), 0o755, 0, ME).await.unwrap();
    let sub = s.fs.mkdir(d.ino, n("sub"), 0o755, 0, ME).await.unwrap();
    s.write_file(sub.ino, "f", b"deep").await;
    let e = s.fs.mkdir(ROOT, n("e"), 0o755, 0, ME).await.unwrap();
    s.fs.rename(ROOT, n("d"), e.ino, n("moved"), 0)
        .await
        .unwrap();
    assert_eq!(
        s.mem.keys(),
        [
            "pre/b",
            "pre/e/",
            "pre/e/moved/",
            "pre/e/moved/sub/",
            "pre/e/moved/sub/f"
        ]
    );
    let moved = s.fs.lookup(e.ino, n("moved")).await.unwrap();
    let sub2 = s.fs.lookup(moved.ino, n("sub")).await.unwrap();
    let f = s.fs.lookup(sub2.ino, n("f")).await.unwrap();
    assert_eq!(s.read_all(f.ino).await, b"deep");
    assert_eq!(
        s.fs.rename(e.ino, n("moved"), sub2.ino, n("x"), 0)
            .await
            .unwrap_err()
            .errno(),
        libc::EINVAL
    );
}

#[tokio::test]
async fn a_failed_directory_rename_leaves_the_source_and_no_partial_copy() {
    let s = setup();
    let d = s.fs.mkdir(ROOT, n("d"), 0o755, 0, ME).await.unwrap();
    for i in 0..5 {
        s.write_file(d.ino, &format!("f{i}"), b"x").await;
    }
    let before = s.mem.keys();
    s.mem.fail_next(Op::Copy, 1);
    let err =
        s.fs.rename(ROOT, n("d"), ROOT, n("e"), 0)
            .await
            .unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
    assert_eq!(s.mem.keys(), before);
    assert_eq!(s.names(d.ino).await.len(), 5);
    s.fs.rename(ROOT, n("d"), ROOT, n("e"), 0).await.unwrap();
    assert!(s.mem.keys().iter().all(|k| k.starts_with("pre/e/")));
}

#[tokio::test]
async fn a_file_renamed_before_its_first_upload_lands_under_the_new_name() {
    let s = setup();
    let (_, fh) =
        s.fs.create(ROOT, n("tmp"), 0o644, 0, libc::O_WRONLY, ME)
            .await
            .unwrap();
    s.fs.write(fh, 0, b"data").await.unwrap();
    s.fs.rename(ROOT, n("tmp"), ROOT, n("final"), 0)
        .await
        .unwrap();
    s.fs.flush(fh).await.unwrap();
    s.fs.release(fh).await;
    assert_eq!(s.mem.keys(), ["pre/final"]);
}

#[tokio::test]
async fn symlinks_and_special_files_use_s3fs_modes() {
    let s = setup();
    let l =
        s.fs.symlink(ROOT, n("l"), n("../target"), ME)
            .await
            .unwrap();
    assert_eq!((l.kind, l.size), (Kind::Symlink, 9));
    let (body, h) = s.mem.object("pre/l").unwrap();
    assert_eq!(&body[..], b"../target");
    assert_eq!(h.metadata["mode"], (libc::S_IFLNK | 0o777).to_string());
    // A fresh mount of the same bucket reads the target from the object.
    let t = setup_with(
        s.mem.clone(),
        MetadataTtl::For(Duration::from_secs(60)),
        tempfile::tempdir().unwrap(),
    );
    let l2 = t.fs.lookup(ROOT, n("l")).await.unwrap();
    assert_eq!(l2.kind, Kind::Symlink);
    assert_eq!(t.fs.readlink(l2.ino).await.unwrap(), b"../target");
    let fifo =
        s.fs.mknod(ROOT, n("p"), libc::S_IFIFO | 0o600, 0, 0, ME)
            .await
            .unwrap();
    assert_eq!(fifo.kind, Kind::Fifo);
    assert_eq!(t.fs.lookup(ROOT, n("p")).await.unwrap().kind, Kind::Fifo);
}

#[tokio::test]
async fn attribute_changes_are_stored_in_the_object() {
    let s = setup();
    let ino = s.write_file(ROOT, "f", b"x").await;
    let a =
        s.fs.setattr(
            ino,
            None,
            SetAttr {
                mode: Some(0o4711),
                uid: Some(33),
                gid: Some(44),
                mtime: Some(TimeSet::At(Timestamp {
                    sec: 1_000_000_000,
                    nsec: 5,
                })),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((a.perm, a.uid, a.gid), (0o4711, 33, 44));
    let (body, h) = s.mem.object("pre/f").unwrap();
    assert_eq!(&body[..], b"x");
    assert_eq!(h.metadata["mode"], (libc::S_IFREG | 0o4711).to_string());
    assert_eq!(h.metadata["mtime"], "1000000000.000000005");
    // The root's attributes are local: nothing is written for it.
    let keys = s.mem.keys();
    s.fs.setattr(
        ROOT,
        None,
        SetAttr {
            mode: Some(0o700),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(s.mem.keys(), keys);
}

#[tokio::test]
async fn user_xattrs_round_trip_through_the_bucket() {
    let s = setup();
    let ino = s.write_file(ROOT, "f", b"x").await;
    s.fs.setxattr(ino, n("user.color"), b"blue\0", 0)
        .await
        .unwrap();
    assert_eq!(
        s.fs.setxattr(ino, n("user.color"), b"red", libc::XATTR_CREATE)
            .await
            .unwrap_err()
            .errno(),
        libc::EEXIST
    );
    assert_eq!(
        s.fs.setxattr(ino, n("security.x"), b"1", 0)
            .await
            .unwrap_err()
            .errno(),
        libc::EOPNOTSUPP
    );
    assert_eq!(
        s.fs.setxattr(ino, n("user.big"), &[b'x'; 3000], 0)
            .await
            .unwrap_err()
            .errno(),
        libc::E2BIG
    );
    let t = setup_with(
        s.mem.clone(),
        MetadataTtl::For(Duration::from_secs(60)),
        tempfile::tempdir().unwrap(),
    );
    let f = t.fs.lookup(ROOT, n("f")).await.unwrap();
    assert_eq!(
        t.fs.getxattr(f.ino, n("user.color")).await.unwrap(),
        b"blue\0"
    );
    assert_eq!(t.fs.listxattr(f.ino).await.unwrap(), b"user.color\0");
    t.fs.removexattr(f.ino, n("user.color")).await.unwrap();
    assert_eq!(
        t.fs.getxattr(f.ino, n("user.color"))
            .await
            .unwrap_err()
            .errno(),
        libc::ENODATA
    );
}

#[tokio::test]
async fn names_are_checked() {
    let s = setup();
    let long = "x".repeat(256);
    assert_eq!(
        s.fs.create(ROOT, n(&long), 0o644, 0, libc::O_WRONLY, ME)
            .await
            .unwrap_err()
            .errno(),
        libc::ENAMETOOLONG
    );
    assert_eq!(s.fs.link().unwrap_err().errno(), libc::EPERM);
    // Four 255-byte components exceed S3's 1,024-byte keys.
    let mut dir = ROOT;
    let name = "y".repeat(255);
    let mut err = None;
    for _ in 0..4 {
        match s.fs.mkdir(dir, n(&name), 0o755, 0, ME).await {
            Ok(a) => dir = a.ino,
            Err(e) => err = Some(e.errno()),
        }
    }
    assert_eq!(err, Some(libc::ENAMETOOLONG));
}

#[tokio::test]
async fn changes_by_others_show_after_the_ttl_only() {
    let s = setup_with(
        Arc::new(MemStore::new()),
        MetadataTtl::For(Duration::from_millis(200)),
        tempfile::tempdir().unwrap(),
    );
    s.mem.insert("pre/a", b"1", WriteHeaders::default());
    assert_eq!(s.names(ROOT).await, ["a"]);
    s.mem.insert("pre/b", b"2", WriteHeaders::default());
    assert_eq!(s.names(ROOT).await, ["a"], "listing trusted within the TTL");
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(s.names(ROOT).await, ["a", "b"]);
    s.mem.insert("pre/a", b"changed", WriteHeaders::default());
    tokio::time::sleep(Duration::from_millis(250)).await;
    let a = s.fs.lookup(ROOT, n("a")).await.unwrap();
    assert_eq!(a.size, 7);
    assert_eq!(s.read_all(a.ino).await, b"changed");
}

#[tokio::test]
async fn inode_numbers_survive_a_remount() {
    let mem = Arc::new(MemStore::new());
    let ttl = MetadataTtl::For(Duration::from_secs(60));
    let s = setup_with(mem.clone(), ttl, tempfile::tempdir().unwrap());
    let ino = s.write_file(ROOT, "f", b"x").await;
    let Setup { fs, dir, .. } = s;
    drop(fs);
    let s = setup_with(mem, ttl, dir);
    assert_eq!(s.fs.lookup(ROOT, n("f")).await.unwrap().ino, ino);
}

#[tokio::test]
async fn a_second_mount_of_one_cache_dir_is_refused() {
    let s = setup();
    let cfg = s.fs.config().clone();
    let err = Fs::new(cfg, s.mem.clone()).unwrap_err();
    assert!(err.to_string().contains("in use"), "{err}");
    let _ = &s.dir;
}

#[tokio::test]
async fn read_only_mounts_refuse_changes() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemStore::new());
    mem.insert("pre/f", b"x", WriteHeaders::default());
    let cfg = Config {
        bucket: "b".into(),
        prefix: "pre/".into(),
        cache_dir: dir.path().to_path_buf(),
        read_only: true,
        ..Config::default()
    };
    let fs = Fs::new(cfg, mem).unwrap();
    let f = fs.lookup(ROOT, n("f")).await.unwrap();
    assert_eq!(
        fs.open(f.ino, libc::O_RDWR, ROOT_CALLER)
            .await
            .unwrap_err()
            .errno(),
        libc::EROFS
    );
    assert_eq!(
        fs.mkdir(ROOT, n("d"), 0o755, 0, ME)
            .await
            .unwrap_err()
            .errno(),
        libc::EROFS
    );
    assert!(fs.open(f.ino, libc::O_RDONLY, ROOT_CALLER).await.is_ok());
}

#[tokio::test]
async fn the_kernel_keeps_its_page_cache_only_for_an_unchanged_object() {
    let s = setup_with(
        Arc::new(MemStore::new()),
        MetadataTtl::For(Duration::from_millis(100)),
        tempfile::tempdir().unwrap(),
    );
    let ino = s.write_file(ROOT, "f", b"one").await;
    let keep = |o: Opened| o.keep_cache;
    let open = || async {
        let o = s.fs.open(ino, libc::O_RDONLY, ROOT_CALLER).await.unwrap();
        s.fs.release(o.fh).await;
        o
    };
    assert!(!keep(open().await), "first open: nothing cached yet");
    assert!(keep(open().await), "same version");
    s.mem.insert("pre/f", b"two", WriteHeaders::default());
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!keep(open().await), "changed by another client");
    assert!(keep(open().await));
    let o = s.fs.open(ino, libc::O_RDWR, ROOT_CALLER).await.unwrap();
    s.fs.write(o.fh, 0, b"3").await.unwrap();
    s.fs.release(o.fh).await;
    assert!(
        !keep(open().await),
        "changed through the mount: a new version"
    );
}

#[tokio::test]
async fn the_block_cache_serves_a_remount_without_requests() {
    let mem = Arc::new(MemStore::new());
    let ttl = MetadataTtl::Forever;
    let data: Vec<u8> = (0..3_500_000u32).map(|i| (i % 253) as u8).collect();
    mem.insert("pre/big", &data, WriteHeaders::default());
    let s = setup_with(mem.clone(), ttl, tempfile::tempdir().unwrap());
    let ino = s.fs.lookup(ROOT, n("big")).await.unwrap().ino;
    assert_eq!(s.read_all(ino).await, data);
    let Setup { fs, dir, .. } = s;
    drop(fs);
    let s = setup_with(mem.clone(), ttl, dir);
    let gets = mem.count(Op::Get);
    let ino = s.fs.lookup(ROOT, n("big")).await.unwrap().ino;
    assert_eq!(s.read_all(ino).await, data);
    assert_eq!(mem.count(Op::Get), gets, "served from the cache");
    assert_eq!(s.fs.cache_stats().blocks, 4);
}

fn s3fs_headers(mode: u32, uid: u32) -> WriteHeaders {
    let mut meta = BTreeMap::new();
    meta.insert("mode".to_string(), mode.to_string());
    meta.insert("uid".to_string(), uid.to_string());
    WriteHeaders {
        content_type: None,
        metadata: meta,
    }
}

/// readdir, then lookup and getattr of every entry: what `ls -l` does.
async fn ls_l(s: &Setup, dir: u64) -> Vec<Attr> {
    let mut out = Vec::new();
    for name in s.names(dir).await {
        let a = s.fs.lookup(dir, n(&name)).await.unwrap();
        out.push(s.fs.getattr(a.ino).await.unwrap());
    }
    out
}

/// A mount of `mem` with its cache in `dir`, trusting listings (`--trust-listings`).
fn setup_trusting(mem: Arc<MemStore>, dir: tempfile::TempDir) -> Setup {
    setup_configured(mem, MetadataTtl::For(Duration::from_secs(60)), dir, |cfg| {
        cfg.trust_listings = true
    })
}

#[tokio::test]
async fn a_cold_ls_l_reads_each_objects_headers_once_and_a_warm_one_nothing() {
    // Long enough for the first listing of 2,500 objects to be fresh when it ends on a
    // loaded machine (a listing is dated by its start): a stale one would make every lookup
    // a probe of its own.
    const LISTING_TTL: Duration = Duration::from_secs(2);
    let mem = Arc::new(MemStore::new());
    for i in 0..2500 {
        mem.insert(
            &format!("pre/d/f{i:05}"),
            b"abcd",
            s3fs_headers(libc::S_IFREG | 0o600, 33),
        );
    }
    let s = setup_with(
        mem.clone(),
        MetadataTtl::For(LISTING_TTL),
        tempfile::tempdir().unwrap(),
    );
    let d = s.fs.lookup(ROOT, n("d")).await.unwrap();
    let (lists, heads) = (s.mem.count(Op::List), s.mem.count(Op::Head));
    let attrs = ls_l(&s, d.ino).await;
    assert_eq!(attrs.len(), 2500);
    assert!(
        attrs
            .iter()
            .all(|a| a.size == 4 && a.perm == 0o600 && a.uid == 33),
        "exact from the first look"
    );
    assert_eq!(s.mem.count(Op::Head) - heads, 2500, "one HEAD per object");
    assert_eq!(
        s.mem.count(Op::List) - lists,
        3,
        "2,500 keys are 3 pages of 1,000"
    );
    // Warm: no request at all.
    let before = (s.mem.count(Op::List), s.mem.count(Op::Head));
    assert_eq!(ls_l(&s, d.ino).await, attrs);
    assert_eq!((s.mem.count(Op::List), s.mem.count(Op::Head)), before);
    // After the TTL the directory is listed again, and nothing else is read.
    tokio::time::sleep(LISTING_TTL + Duration::from_millis(50)).await;
    assert_eq!(ls_l(&s, d.ino).await, attrs, "the same attributes");
    assert_eq!(
        s.mem.count(Op::Head),
        before.1,
        "headers are not read again"
    );
    // A remount of the same cache directory neither.
    let Setup { fs, dir, .. } = s;
    drop(fs);
    let s = setup_with(mem, MetadataTtl::For(LISTING_TTL), dir);
    let heads = s.mem.count(Op::Head);
    let d = s.fs.lookup(ROOT, n("d")).await.unwrap();
    assert_eq!(ls_l(&s, d.ino).await, attrs);
    assert_eq!(s.mem.count(Op::Head), heads);
}

#[tokio::test]
async fn trusting_listings_costs_list_pages_only() {
    let s = setup_trusting(Arc::new(MemStore::new()), tempfile::tempdir().unwrap());
    for i in 0..2500 {
        s.mem
            .insert(&format!("pre/d/f{i:05}"), b"abcd", WriteHeaders::default());
    }
    let d = s.fs.lookup(ROOT, n("d")).await.unwrap();
    let (lists, heads) = (s.mem.count(Op::List), s.mem.count(Op::Head));
    let attrs = ls_l(&s, d.ino).await;
    assert!(
        attrs
            .iter()
            .all(|a| a.size == 4 && a.perm == 0o644 && a.uid == 7)
    );
    assert_eq!(s.mem.count(Op::Head), heads, "no HEAD per file");
    assert_eq!(s.mem.count(Op::List) - lists, 3);
}

#[tokio::test]
async fn trusting_listings_a_listed_file_shows_its_real_mode_once_opened() {
    let s = setup_trusting(Arc::new(MemStore::new()), tempfile::tempdir().unwrap());
    s.mem
        .insert("pre/secret", b"x", s3fs_headers(libc::S_IFREG | 0o600, 33));
    let attrs = ls_l(&s, ROOT).await;
    assert_eq!((attrs[0].perm, attrs[0].uid), (0o644, 7), "listing view");
    let err =
        s.fs.open(attrs[0].ino, libc::O_RDONLY, ME)
            .await
            .unwrap_err();
    assert_eq!(err.errno(), libc::EACCES);
    let a = s.fs.getattr(attrs[0].ino).await.unwrap();
    assert_eq!(
        (a.perm, a.uid),
        (0o600, 33),
        "the headers were read at open"
    );
    let owner = Caller { uid: 33, gid: 1 };
    let o = s.fs.open(a.ino, libc::O_RDONLY, owner).await.unwrap();
    s.fs.release(o.fh).await;
}

#[tokio::test]
async fn trusting_listings_a_listed_s3fs_symlink_turns_out_stale_at_open() {
    let s = setup_trusting(Arc::new(MemStore::new()), tempfile::tempdir().unwrap());
    s.mem.insert(
        "pre/link",
        b"target",
        s3fs_headers(libc::S_IFLNK | 0o777, 0),
    );
    let attrs = ls_l(&s, ROOT).await;
    assert_eq!(attrs[0].kind, Kind::File, "the listing's view");
    let err =
        s.fs.open(attrs[0].ino, libc::O_RDONLY, ROOT_CALLER)
            .await
            .unwrap_err();
    assert_eq!(err.errno(), libc::ESTALE);
    let a = s.fs.lookup(ROOT, n("link")).await.unwrap();
    assert_eq!(a.kind, Kind::Symlink);
    assert_eq!(s.fs.readlink(a.ino).await.unwrap(), b"target");
}

#[tokio::test]
async fn the_first_look_shows_types_modes_owners_times_and_link_targets() {
    let s = setup();
    let mut meta = s3fs_headers(libc::S_IFREG | 0o600, 33).metadata;
    meta.insert("gid".into(), "34".into());
    meta.insert("mtime".into(), "1262304000".into());
    let file = WriteHeaders {
        content_type: None,
        metadata: meta,
    };
    s.mem.insert("pre/secret", b"x", file);
    s.mem.insert(
        "pre/link",
        b"secret",
        s3fs_headers(libc::S_IFLNK | 0o777, 0),
    );
    s.mem
        .insert("pre/fifo", b"", s3fs_headers(libc::S_IFIFO | 0o640, 0));
    s.mem.insert(
        "pre/big-claims-link",
        &[b'x'; 5000],
        s3fs_headers(libc::S_IFLNK | 0o777, 0),
    );
    s.mem.insert("pre/plain", b"abc", WriteHeaders::default());
    s.mem
        .insert("pre/sub/", b"", s3fs_headers(libc::S_IFDIR | 0o750, 33));
    let fh = s.fs.opendir(ROOT).await.unwrap().fh;
    let mut types: Vec<(String, Kind)> =
        s.fs.readdir(ROOT, fh, 0)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.name, e.kind))
            .filter(|(n, _)| !n.starts_with('.'))
            .collect();
    s.fs.releasedir(fh);
    types.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        types,
        [
            ("big-claims-link".to_string(), Kind::File),
            ("fifo".to_string(), Kind::Fifo),
            ("link".to_string(), Kind::Symlink),
            ("plain".to_string(), Kind::File),
            ("secret".to_string(), Kind::File),
            ("sub".to_string(), Kind::Dir),
        ],
        "d_type right from the first readdir"
    );
    let gets = s.mem.count(Op::Get);
    let heads = s.mem.count(Op::Head);
    let attrs = ls_l(&s, ROOT).await;
    let by_name = |name: &str| {
        let i = ["big-claims-link", "fifo", "link", "plain", "secret", "sub"]
            .iter()
            .position(|n| *n == name)
            .unwrap();
        attrs[i].clone()
    };
    let secret = by_name("secret");
    assert_eq!((secret.perm, secret.uid, secret.gid), (0o600, 33, 34));
    assert_eq!(
        secret.mtime,
        std::time::UNIX_EPOCH + Duration::from_secs(1_262_304_000)
    );
    let plain = by_name("plain");
    assert_eq!((plain.perm, plain.uid, plain.gid), (0o644, 7, 8));
    let sub = by_name("sub");
    assert_eq!((sub.kind, sub.perm, sub.uid), (Kind::Dir, 0o750, 33));
    assert_eq!(by_name("fifo").perm, 0o640);
    let link = by_name("link");
    assert_eq!(s.fs.readlink(link.ino).await.unwrap(), b"secret");
    assert_eq!(
        (s.mem.count(Op::Get), s.mem.count(Op::Head)),
        (gets, heads),
        "the listing read everything, the target included"
    );
}

#[tokio::test]
async fn what_stat_shows_is_stable_across_opens_ttls_and_remounts() {
    let mem = Arc::new(MemStore::new());
    mem.insert(
        "pre/d/s3fs",
        b"abc",
        s3fs_headers(libc::S_IFREG | 0o600, 33),
    );
    mem.insert("pre/d/plain", b"abcd", WriteHeaders::default());
    let ttl = MetadataTtl::For(Duration::from_millis(200));
    let s = setup_with(mem.clone(), ttl, tempfile::tempdir().unwrap());
    let d = s.fs.lookup(ROOT, n("d")).await.unwrap();
    let first = ls_l(&s, d.ino).await;
    let dir_first = s.fs.getattr(d.ino).await.unwrap();
    for a in &first {
        assert_eq!(&s.fs.getattr(a.ino).await.unwrap(), a);
        assert_eq!(s.read_all(a.ino).await.len() as u64, a.size);
        assert_eq!(&s.fs.getattr(a.ino).await.unwrap(), a, "after an open");
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(ls_l(&s, d.ino).await, first, "after the TTL");
    assert_eq!(
        s.fs.getattr(d.ino).await.unwrap(),
        dir_first,
        "listed again, same clock"
    );
    let Setup { fs, dir, .. } = s;
    drop(fs);
    let s = setup_with(mem.clone(), ttl, dir);
    assert_eq!(s.fs.lookup(ROOT, n("d")).await.unwrap(), dir_first);
    assert_eq!(ls_l(&s, d.ino).await, first, "after a remount");
    // A fresh cache directory (another front end): the same view, inode numbers aside.
    let fresh = setup_with(mem, ttl, tempfile::tempdir().unwrap());
    let d2 = fresh.fs.lookup(ROOT, n("d")).await.unwrap();
    let other: Vec<Attr> = ls_l(&fresh, d2.ino)
        .await
        .into_iter()
        .zip(&first)
        .map(|(a, f)| Attr { ino: f.ino, ..a })
        .collect();
    assert_eq!(other, first);
}

#[tokio::test]
async fn the_kernel_keeps_a_directory_s_entries_only_while_they_are_what_a_listing_gives() {
    let mem = Arc::new(MemStore::new());
    mem.insert("pre/d/a", b"1", WriteHeaders::default());
    let ttl = MetadataTtl::For(Duration::from_millis(300));
    let s = setup_with(mem.clone(), ttl, tempfile::tempdir().unwrap());
    let d = s.fs.lookup(ROOT, n("d")).await.unwrap().ino;
    // Opened and read as `ls` does; whether the kernel may keep its cached entries.
    let ls = || async {
        let o = s.fs.opendir(d).await.unwrap();
        let mut offset = 0;
        while let Some(last) = s.fs.readdir(d, o.fh, offset).await.unwrap().last() {
            offset = last.next_offset;
        }
        s.fs.releasedir(o.fh);
        o.keep_cache
    };
    let wait_ttl = || tokio::time::sleep(Duration::from_millis(350));
    assert!(!ls().await, "first open: nothing cached");
    assert!(ls().await, "listing fresh and unchanged");
    s.write_file(d, "mine", b"x").await;
    assert!(!ls().await, "an entry created through the mount");
    assert!(ls().await);
    wait_ttl().await;
    assert!(!ls().await, "a listing is due: it may find changes");
    assert!(ls().await, "listed again, nothing changed");
    // Within one second of the last look: the clock must still move.
    mem.insert("pre/d/b", b"2", WriteHeaders::default());
    wait_ttl().await;
    s.fs.getattr(d).await.unwrap();
    assert!(
        !ls().await,
        "an entry added from outside, found by a listing"
    );
    assert_eq!(s.names(d).await, ["a", "b", "mine"]);
    assert!(ls().await);
    s.mem.delete("pre/d/a").await.unwrap();
    wait_ttl().await;
    s.fs.getattr(d).await.unwrap();
    assert!(!ls().await, "an entry removed from outside");
    assert_eq!(s.names(d).await, ["b", "mine"]);
}

#[tokio::test]
async fn a_directory_offset_means_the_same_entry_in_every_snapshot() {
    let s = setup();
    for name in ["a", "b", "c"] {
        s.write_file(ROOT, name, b"x").await;
    }
    let first = s.fs.opendir(ROOT).await.unwrap().fh;
    let listed = s.fs.readdir(ROOT, first, 0).await.unwrap();
    let after_a = listed.iter().find(|e| e.name == "a").unwrap().next_offset;
    s.fs.releasedir(first);
    // The kernel read up to `a` (from its cache, say), then an entry before it went: reading
    // on from that offset with a new snapshot skips nothing that is still there.
    s.fs.unlink(ROOT, n("a")).await.unwrap();
    let second = s.fs.opendir(ROOT).await.unwrap().fh;
    let rest: Vec<String> =
        s.fs.readdir(ROOT, second, after_a)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
    assert_eq!(rest, ["b", "c"]);
    s.fs.releasedir(second);
}

#[tokio::test]
async fn outside_changes_move_the_directory_clock_and_reach_the_kernel() {
    let mem = Arc::new(MemStore::new());
    mem.insert("pre/d/a", b"1", WriteHeaders::default());
    let ttl = MetadataTtl::For(Duration::from_millis(100));
    let s = setup_with(mem.clone(), ttl, tempfile::tempdir().unwrap());
    let kernel = kernel::RecordedKernel::default();
    s.fs.set_kernel_cache(Arc::new(kernel.clone()));
    let d = s.fs.lookup(ROOT, n("d")).await.unwrap();
    let a = s.fs.lookup(d.ino, n("a")).await.unwrap();
    assert_eq!(s.names(d.ino).await, ["a"]);
    let stored = s.fs.getattr(d.ino).await.unwrap().mtime;
    let secs =
        |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let wait_ttl = || tokio::time::sleep(Duration::from_millis(150));
    // Unchanged: a stat after the TTL lists it again and the clock stays.
    wait_ttl().await;
    assert_eq!(s.fs.getattr(d.ino).await.unwrap().mtime, stored);
    assert!(kernel.0.lock().unwrap().is_empty());
    // Added, from outside: a stat of the directory alone shows it (Nextcloud's check).
    mem.insert("pre/d/b", b"2", WriteHeaders::default());
    wait_ttl().await;
    let added = s.fs.getattr(d.ino).await.unwrap().mtime;
    assert!(secs(added) > secs(stored), "{added:?} after {stored:?}");
    assert!(
        kernel
            .0
            .lock()
            .unwrap()
            .contains(&kernel::Invalidation::Entry(d.ino, "b".into()))
    );
    // Replaced with new contents: the file shows them, and the kernel drops its pages.
    mem.insert("pre/d/a", b"replaced", WriteHeaders::default());
    wait_ttl().await;
    let replaced = s.fs.getattr(d.ino).await.unwrap().mtime;
    assert!(secs(replaced) > secs(added));
    assert!(
        kernel
            .0
            .lock()
            .unwrap()
            .contains(&kernel::Invalidation::Inode(a.ino))
    );
    assert_eq!(s.read_all(a.ino).await, b"replaced");
    // Copied onto itself with new headers (a chmod from another mount): same ETag.
    mem.advance_clock(Duration::from_secs(2));
    let before = s.mem.object("pre/d/a").unwrap().0;
    s.mem
        .insert("pre/d/a", &before, s3fs_headers(libc::S_IFREG | 0o600, 33));
    wait_ttl().await;
    let chmodded = s.fs.getattr(d.ino).await.unwrap().mtime;
    assert!(secs(chmodded) > secs(replaced));
    assert_eq!(s.fs.getattr(a.ino).await.unwrap().perm, 0o600);
    // Removed.
    s.mem.delete("pre/d/b").await.unwrap();
    wait_ttl().await;
    let removed = s.fs.getattr(d.ino).await.unwrap().mtime;
    assert!(secs(removed) > secs(chmodded));
    assert_eq!(s.names(d.ino).await, ["a"]);
    // This mount's own changes move it as POSIX says, and never back.
    s.write_file(d.ino, "mine", b"x").await;
    let mine = s.fs.getattr(d.ino).await.unwrap().mtime;
    assert!(mine >= removed);
    wait_ttl().await;
    assert_eq!(
        s.fs.getattr(d.ino).await.unwrap().mtime,
        mine,
        "not news to itself"
    );
}

/// Creates `name` and writes `len` bytes front to back in 1 MiB writes, without closing it.
async fn write_streaming(s: &Setup, name: &str, data: &[u8]) -> (u64, u64) {
    let (attr, fh) =
        s.fs.create(ROOT, n(name), 0o640, 0o022, libc::O_WRONLY, ME)
            .await
            .unwrap();
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        s.fs.write(fh, (i << 20) as u64, chunk).await.unwrap();
    }
    (attr.ino, fh)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_written_front_to_back_streams_its_parts_while_written() {
    let s = setup();
    let data: Vec<u8> = (0..23 * 1024 * 1024 + 11)
        .map(|i| (i % 239) as u8)
        .collect();
    let (ino, fh) = write_streaming(&s, "big", &data).await;
    // Parts of 5 MiB are cut as soon as the writer passes them (the threshold is 6 MiB).
    assert_eq!(s.mem.count(Op::Multipart), 1, "started while writing");
    let mut waited = 0;
    while s.mem.count(Op::UploadPart) < 4 && waited < 500 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        waited += 1;
    }
    assert_eq!(
        s.mem.count(Op::UploadPart),
        4,
        "whole parts go up before close"
    );
    s.fs.flush(fh).await.unwrap();
    s.fs.release(fh).await;
    assert_eq!(s.mem.count(Op::UploadPart), 5, "nothing sent twice");
    assert_eq!(s.mem.count(Op::Put), 0);
    let (body, h) = s.mem.object("pre/big").unwrap();
    assert!(body[..] == data[..]);
    assert_eq!(h.metadata["mode"], (libc::S_IFREG | 0o640).to_string());
    assert!(
        !h.metadata.contains_key("mtime"),
        "Last-Modified is the mtime"
    );
    assert_eq!(s.mem.pending_uploads(), 0);
    assert!(s.read_all(ino).await == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_behind_the_streamed_parts_falls_back_to_a_whole_upload() {
    let s = setup();
    let mut data: Vec<u8> = (0..13 * 1024 * 1024).map(|i| (i % 241) as u8).collect();
    let (_, fh) = write_streaming(&s, "f", &data).await;
    assert_eq!(s.mem.count(Op::Multipart), 1, "a stream started");
    s.fs.write(fh, 100, b"patched").await.unwrap();
    data[100..107].copy_from_slice(b"patched");
    s.fs.flush(fh).await.unwrap();
    s.fs.release(fh).await;
    assert!(s.mem.object("pre/f").unwrap().0[..] == data[..]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        s.mem.pending_uploads(),
        0,
        "the abandoned upload was aborted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_streamed_part_falls_back_to_a_whole_upload() {
    let s = setup();
    let data: Vec<u8> = (0..17 * 1024 * 1024).map(|i| (i % 233) as u8).collect();
    s.mem.fail_next(Op::UploadPart, 1);
    let (_, fh) = write_streaming(&s, "f", &data).await;
    s.fs.flush(fh).await.unwrap();
    s.fs.release(fh).await;
    assert!(s.mem.object("pre/f").unwrap().0[..] == data[..]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.mem.pending_uploads(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn times_set_while_streaming_are_stored() {
    let s = setup();
    let data = vec![7u8; 12 * 1024 * 1024];
    let (ino, fh) = write_streaming(&s, "f", &data).await;
    let t = Timestamp {
        sec: 1_500_000_000,
        nsec: 0,
    };
    s.fs.setattr(
        ino,
        Some(fh),
        SetAttr {
            mtime: Some(TimeSet::At(t)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    s.fs.flush(fh).await.unwrap();
    s.fs.release(fh).await;
    let (body, h) = s.mem.object("pre/f").unwrap();
    assert_eq!(body.len(), data.len());
    assert_eq!(h.metadata["mtime"], "1500000000");
    let mtime = s.fs.getattr(ino).await.unwrap().mtime;
    assert_eq!(
        mtime,
        std::time::UNIX_EPOCH + Duration::from_secs(1_500_000_000)
    );
}

#[tokio::test]
async fn editing_a_file_that_was_read_fetches_nothing_again() {
    let s = setup();
    let mut data: Vec<u8> = (0..14 * 1024 * 1024).map(|i| (i % 229) as u8).collect();
    s.mem.insert("pre/big", &data, WriteHeaders::default());
    let ino = s.fs.lookup(ROOT, n("big")).await.unwrap().ino;
    assert!(s.read_all(ino).await == data);
    let gets = s.mem.count(Op::Get);
    let fh = s.fs.open(ino, libc::O_RDWR, ROOT_CALLER).await.unwrap().fh;
    s.fs.write(fh, 7 * 1024 * 1024 + 3, b"edit").await.unwrap();
    data[7 * 1024 * 1024 + 3..7 * 1024 * 1024 + 7].copy_from_slice(b"edit");
    s.fs.flush(fh).await.unwrap();
    s.fs.release(fh).await;
    assert_eq!(
        s.mem.count(Op::Get),
        gets,
        "blocks came from the block cache"
    );
    assert!(s.mem.object("pre/big").unwrap().0[..] == data[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_written_through_the_mount_reads_back_from_the_cache() {
    let s = setup();
    let data: Vec<u8> = (0..2_500_000u32).map(|i| (i % 251) as u8).collect();
    let ino = s.write_file(ROOT, "new", &data).await;
    let seed_dir = s.dir.path().join("blocks").join("seed");
    let seeded =
        || s.fs.cache_stats().blocks == 3 && std::fs::read_dir(&seed_dir).unwrap().count() == 0;
    let mut waited = 0;
    while !seeded() && waited < 500 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        waited += 1;
    }
    assert!(
        seeded(),
        "the staged blocks seed the cache, then the seed file goes"
    );
    let gets = s.mem.count(Op::Get);
    assert!(s.read_all(ino).await == data);
    assert_eq!(s.mem.count(Op::Get), gets, "read back without a GET");
}

#[tokio::test]
async fn a_write_back_close_returns_before_the_upload_and_the_data_goes_up_later() {
    let s = setup_write_back(Arc::new(MemStore::new()), tempfile::tempdir().unwrap());
    s.write_file(ROOT, "f", b"queued").await;
    assert_eq!(s.mem.count(Op::Put), 0, "close did not wait for the bucket");
    assert!(s.body("pre/f").is_none());
    assert_eq!(s.fs.pending_uploads(), (1, 6));
    s.mem.fail_next(Op::Put, 1);
    assert_eq!(s.fs.flush_all().await, 1, "the server failed");
    assert_eq!(s.fs.flush_all().await, 0);
    assert_eq!(s.body("pre/f").unwrap(), b"queued");
    assert_eq!(s.fs.pending_uploads(), (0, 0));
}

#[tokio::test]
async fn a_temporary_file_renamed_into_place_within_the_write_back_delay_is_one_put() {
    let s = setup_configured(
        Arc::new(MemStore::new()),
        MetadataTtl::For(Duration::from_secs(60)),
        tempfile::tempdir().unwrap(),
        |cfg| {
            cfg.write_back = true;
            cfg.write_back_delay = Duration::from_secs(2);
        },
    );
    tokio::spawn(Fs::run_background(Arc::downgrade(&s.fs)));
    s.write_file(ROOT, ".f.part", b"final contents").await;
    // The uploader has the time to look meanwhile.
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.fs.rename(ROOT, n(".f.part"), ROOT, n("f"), 0)
        .await
        .unwrap();
    s.write_file(ROOT, "scratch", b"deleted at once").await;
    s.fs.unlink(ROOT, n("scratch")).await.unwrap();
    s.write_file(ROOT, "later", b"closed last").await;
    // Nobody flushes: the uploader sends each once its delay is over.
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.body("pre/f").is_none() || s.body("pre/later").is_none() {
        assert!(Instant::now() < deadline, "the uploads never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.body("pre/f").unwrap(), b"final contents");
    assert_eq!(s.mem.keys(), ["pre/f", "pre/later"]);
    assert_eq!(s.mem.count(Op::Put), 2, "one PUT per surviving file");
    assert_eq!(s.mem.count(Op::Copy), 0, "the rename was local");
    assert_eq!(s.mem.count(Op::Delete), 0, "nothing went up to be deleted");
}

#[tokio::test]
async fn write_back_data_a_close_acknowledged_survives_a_crash() {
    let mem = Arc::new(MemStore::new());
    let s = setup_write_back(mem.clone(), tempfile::tempdir().unwrap());
    s.write_file(ROOT, "a", b"first file").await;
    let big: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    s.write_file(ROOT, "b", &big).await;
    // The process dies: nothing was uploaded, nothing is flushed on the way out.
    let Setup { fs, dir, .. } = s;
    drop(fs);
    assert!(mem.keys().is_empty());
    let s = setup_write_back(mem.clone(), dir);
    assert_eq!(s.fs.recover_pending().unwrap(), 2);
    assert_eq!(s.fs.flush_all().await, 0);
    assert_eq!(s.body("pre/a").unwrap(), b"first file");
    assert!(s.body("pre/b").unwrap() == big);
}

#[tokio::test]
async fn fsync_waits_for_the_bucket_in_write_back_mode() {
    let s = setup_write_back(Arc::new(MemStore::new()), tempfile::tempdir().unwrap());
    let (_, fh) =
        s.fs.create(ROOT, n("f"), 0o644, 0, libc::O_WRONLY, ME)
            .await
            .unwrap();
    s.fs.write(fh, 0, b"synced").await.unwrap();
    s.fs.fsync(fh).await.unwrap();
    assert_eq!(s.body("pre/f").unwrap(), b"synced");
    s.fs.release(fh).await;
}

#[tokio::test]
async fn an_acknowledged_version_is_uploaded_before_it_is_changed() {
    let s = setup_write_back(Arc::new(MemStore::new()), tempfile::tempdir().unwrap());
    let ino = s.write_file(ROOT, "f", b"version one").await;
    assert!(s.body("pre/f").is_none());
    let fh = s.fs.open(ino, libc::O_RDWR, ME).await.unwrap().fh;
    s.fs.write(fh, 0, b"VERSION").await.unwrap();
    // The staging file held the only copy of what close acknowledged: it went up first.
    assert_eq!(s.body("pre/f").unwrap(), b"version one");
    s.fs.flush(fh).await.unwrap();
    s.fs.release(fh).await;
    assert_eq!(s.fs.flush_all().await, 0);
    assert_eq!(s.body("pre/f").unwrap(), b"VERSION one");
}

#[tokio::test]
async fn reads_and_opens_of_a_file_go_on_while_it_is_uploaded_and_a_write_waits() {
    let s = setup();
    let f = s.write_file(ROOT, "f", b"first version").await;
    let fh = s.fs.open(f, libc::O_RDWR, ROOT_CALLER).await.unwrap().fh;
    s.fs.write(fh, 0, b"FIRST").await.unwrap();
    let put = s.mem.pause(Op::Put, "pre/f");
    let during = async {
        put.reached().await;
        // Bounded, so that a wait for the upload fails the test rather than hangs it.
        let wait = Duration::from_secs(10);
        let read = tokio::time::timeout(wait, s.fs.read(fh, 0, 64)).await;
        let read = read.expect("a read waited for the upload of the file");
        assert_eq!(read.unwrap(), b"FIRST version"[..]);
        let opened = tokio::time::timeout(wait, s.fs.open(f, libc::O_RDONLY, ROOT_CALLER)).await;
        let other = opened.expect("an open waited for the upload of the file");
        let other = other.unwrap().fh;
        assert_eq!(s.fs.read(other, 0, 64).await.unwrap(), b"FIRST version"[..]);
        s.fs.release(other).await;
        // A change of the contents waits for the upload of what was there before.
        let mut write = std::pin::pin!(s.fs.write(fh, 0, b"X"));
        assert!(futures::poll!(&mut write).is_pending());
        put.resume();
        write.await.unwrap();
    };
    let (flushed, ()) = tokio::join!(s.fs.flush(fh), during);
    flushed.unwrap();
    assert_eq!(s.body("pre/f").unwrap(), b"FIRST version");
    s.fs.flush(fh).await.unwrap();
    s.fs.release(fh).await;
    assert_eq!(s.body("pre/f").unwrap(), b"XIRST version");
}

/// Waits until the background upload of `ino` has ended and taken it out of the open-file
/// table.
async fn retired(s: &Setup, ino: u64) {
    while s.fs.dirs.open_file_of(ino).is_some() {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_file_whose_upload_ends_while_it_is_renamed_moves_with_its_object() {
    let mem = Arc::new(MemStore::new());
    mem.ignore_conditions();
    let s = setup_write_back(mem.clone(), tempfile::tempdir().unwrap());
    let a = s.write_file(ROOT, "a", b"contents of a").await;
    s.write_file(ROOT, "b", b"contents of b").await;
    let (put_a, put_b) = (mem.pause(Op::Put, "pre/a"), mem.pause(Op::Put, "pre/b"));
    let rename = async {
        put_a.reached().await;
        put_b.reached().await;
        let steps = async {
            // The rename has read "a" (not uploaded yet) and waits for "b", whose upload
            // holds it. Meanwhile "a" goes up, and nobody holding it, leaves the table.
            put_a.resume();
            retired(&s, a).await;
            put_b.resume();
        };
        tokio::join!(s.fs.rename(ROOT, n("a"), ROOT, n("b"), 0), steps).0
    };
    let (pending, renamed) = tokio::join!(s.fs.flush_all(), rename);
    renamed.unwrap();
    assert_eq!(pending, 0);
    assert_eq!(s.mem.keys(), ["pre/b"], "the object moved with the file");
    assert_eq!(s.body("pre/b").unwrap(), b"contents of a");
    assert_eq!(s.read_all(a).await, b"contents of a");
    // The name it left is free in the bucket too: a new file there is no conflict.
    s.write_file(ROOT, "a", b"a new a").await;
    assert_eq!(s.fs.flush_all().await, 0);
    assert_eq!(s.body("pre/a").unwrap(), b"a new a");
    assert!(conflict_copies(&s.mem, "pre/a").is_empty());
}

#[tokio::test]
async fn a_file_whose_upload_ends_while_a_rename_replaces_it_leaves_no_object() {
    let mem = Arc::new(MemStore::new());
    mem.ignore_conditions();
    // An implicit directory: a rename out of it gives it a marker first.
    mem.insert("pre/d/other", b"x", WriteHeaders::default());
    let s = setup_write_back(mem.clone(), tempfile::tempdir().unwrap());
    let d = s.fs.lookup(ROOT, n("d")).await.unwrap().ino;
    s.write_file(d, "x", b"new b").await;
    let b = s.write_file(ROOT, "b", b"old b").await;
    let (put_x, put_b) = (mem.pause(Op::Put, "pre/d/x"), mem.pause(Op::Put, "pre/b"));
    let put_marker = mem.pause(Op::Put, "pre/d/");
    let rename = async {
        put_x.reached().await;
        put_b.reached().await;
        // "x" stays not uploaded (its upload fails); "b" is being uploaded.
        mem.fail_next(Op::Put, 1);
        put_x.resume();
        let steps = async {
            // The rename has read "b" (not uploaded yet) and puts the marker. Meanwhile "b"
            // goes up, and nobody holding it, leaves the table.
            put_marker.reached().await;
            put_b.resume();
            retired(&s, b).await;
            put_marker.resume();
        };
        tokio::join!(s.fs.rename(d, n("x"), ROOT, n("b"), 0), steps).0
    };
    let (pending, renamed) = tokio::join!(s.fs.flush_all(), rename);
    renamed.unwrap();
    assert_eq!(pending, 1, "the upload of x failed");
    assert!(s.body("pre/b").is_none(), "the replaced version is gone");
    // So x's upload finds the name free: no conflict.
    assert_eq!(s.fs.flush_all().await, 0);
    assert_eq!(s.mem.keys(), ["pre/b", "pre/d/", "pre/d/other"]);
    assert_eq!(s.body("pre/b").unwrap(), b"new b");
}

#[tokio::test]
async fn a_file_whose_upload_ends_while_it_is_unlinked_leaves_no_object() {
    let mem = Arc::new(MemStore::new());
    mem.ignore_conditions();
    // An implicit directory: the unlink gives it a marker before it removes the file.
    mem.insert("pre/d/other", b"x", WriteHeaders::default());
    let s = setup_write_back(mem.clone(), tempfile::tempdir().unwrap());
    let d = s.fs.lookup(ROOT, n("d")).await.unwrap().ino;
    let f = s.write_file(d, "f", b"contents").await;
    let (put_f, put_marker) = (mem.pause(Op::Put, "pre/d/f"), mem.pause(Op::Put, "pre/d/"));
    let unlink = async {
        put_f.reached().await;
        let steps = async {
            // The unlink has read "f" (not uploaded yet) and puts the marker. Meanwhile "f"
            // goes up, and nobody holding it, leaves the table.
            put_marker.reached().await;
            put_f.resume();
            retired(&s, f).await;
            put_marker.resume();
        };
        tokio::join!(s.fs.unlink(d, n("f")), steps).0
    };
    let (pending, unlinked) = tokio::join!(s.fs.flush_all(), unlink);
    unlinked.unwrap();
    assert_eq!(pending, 0);
    assert_eq!(s.mem.keys(), ["pre/d/", "pre/d/other"]);
    // A new file of that name is no conflict.
    s.write_file(d, "f", b"a new f").await;
    assert_eq!(s.fs.flush_all().await, 0);
    assert_eq!(s.body("pre/d/f").unwrap(), b"a new f");
    assert!(conflict_copies(&s.mem, "pre/d/f").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_uploads_a_crash_interrupts_are_aborted_by_the_next_mount() {
    let mem = Arc::new(MemStore::new());
    let s = setup_with(
        mem.clone(),
        MetadataTtl::For(Duration::from_secs(60)),
        tempfile::tempdir().unwrap(),
    );
    let data = vec![7u8; 12 * 1024 * 1024];
    write_streaming(&s, "big", &data).await;
    assert_eq!(mem.pending_uploads(), 1, "a streaming upload is in flight");
    let Setup { fs, dir, .. } = s;
    drop(fs);
    let s = setup_with(mem.clone(), MetadataTtl::For(Duration::from_secs(60)), dir);
    assert_eq!(s.fs.abort_leftover_uploads().await, 1);
    assert_eq!(mem.pending_uploads(), 0);
    assert_eq!(
        s.fs.abort_leftover_uploads().await,
        0,
        "forgotten once aborted"
    );
}

/// The conflict copies of `key` in the bucket, with their bodies.
fn conflict_copies(mem: &MemStore, stem: &str) -> Vec<(String, Vec<u8>)> {
    mem.keys()
        .into_iter()
        .filter(|k| k.starts_with(&format!("{stem}.conflict-")))
        .map(|k| {
            let body = mem.object(&k).unwrap().0.to_vec();
            (k, body)
        })
        .collect()
}

/// Edits `f` (uploaded as "ours, v1") while another client replaces its object, then closes.
async fn edit_while_another_client_writes(s: &Setup) -> u64 {
    let ino = s.write_file(ROOT, "f.txt", b"ours, v1").await;
    let fh = s.fs.open(ino, libc::O_RDWR, ME).await.unwrap().fh;
    s.fs.write(fh, 0, b"OURS").await.unwrap();
    s.mem
        .insert("pre/f.txt", b"theirs", WriteHeaders::default());
    s.fs.flush(fh).await.unwrap();
    s.fs.release(fh).await;
    assert_eq!(s.fs.flush_all().await, 0);
    ino
}

async fn assert_both_versions_kept(s: &Setup, ino: u64) {
    assert_eq!(
        s.body("pre/f.txt").unwrap(),
        b"theirs",
        "the bucket's version stays"
    );
    let copies = conflict_copies(&s.mem, "pre/f");
    assert_eq!(copies.len(), 1, "{:?}", s.mem.keys());
    assert!(copies[0].0.ends_with(".txt"), "{}", copies[0].0);
    assert_eq!(copies[0].1, b"OURS, v1");
    // The name shows the bucket's version from now on, and the copy is listed.
    assert_eq!(s.read_all(ino).await, b"theirs");
    let names = s.names(ROOT).await;
    assert!(
        names.iter().any(|n| n.starts_with("f.conflict-")),
        "{names:?}"
    );
}

#[tokio::test]
async fn a_conflicting_change_is_caught_by_a_conditional_write() {
    let s = setup_configured(
        Arc::new(MemStore::new()),
        MetadataTtl::For(Duration::from_secs(60)),
        tempfile::tempdir().unwrap(),
        |cfg| cfg.conditional_writes = true,
    );
    // No ETag check before the upload: only the server's 412 can catch it.
    let ino = edit_while_another_client_writes(&s).await;
    assert_both_versions_kept(&s, ino).await;
}

#[tokio::test]
async fn a_conflicting_change_is_caught_by_an_etag_check_where_writes_are_unconditional() {
    let mem = Arc::new(MemStore::new());
    mem.ignore_conditions();
    let s = setup_with(
        mem,
        MetadataTtl::For(Duration::from_secs(60)),
        tempfile::tempdir().unwrap(),
    );
    let ino = edit_while_another_client_writes(&s).await;
    assert_both_versions_kept(&s, ino).await;
}

#[tokio::test]
async fn a_name_taken_in_the_bucket_before_a_write_back_upload_is_a_conflict() {
    let mem = Arc::new(MemStore::new());
    mem.ignore_conditions();
    let s = setup_write_back(mem, tempfile::tempdir().unwrap());
    s.write_file(ROOT, "new.txt", b"mine").await;
    s.mem
        .insert("pre/new.txt", b"someone else's", WriteHeaders::default());
    assert_eq!(s.fs.flush_all().await, 0);
    assert_eq!(s.body("pre/new.txt").unwrap(), b"someone else's");
    let copies = conflict_copies(&s.mem, "pre/new");
    assert_eq!(copies.len(), 1);
    assert_eq!(copies[0].1, b"mine");
}

#[tokio::test]
async fn edits_of_this_mount_alone_are_never_conflicts() {
    let s = setup();
    let ino = s.write_file(ROOT, "f", b"one").await;
    for (i, text) in [&b"two"[..], b"three", b"four"].iter().enumerate() {
        let fh = s.fs.open(ino, libc::O_RDWR, ME).await.unwrap().fh;
        s.fs.write(fh, 0, text).await.unwrap();
        s.fs.flush(fh).await.unwrap();
        s.fs.release(fh).await;
        if i == 1 {
            s.fs.setattr(
                ino,
                None,
                SetAttr {
                    mode: Some(0o600),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        }
    }
    assert_eq!(s.body("pre/f").unwrap(), b"foure");
    assert!(
        conflict_copies(&s.mem, "pre/f").is_empty(),
        "{:?}",
        s.mem.keys()
    );
}

#[tokio::test]
async fn a_directory_rename_interrupted_before_its_deletes_is_completed_by_the_next_mount() {
    let mem = Arc::new(MemStore::new());
    let ttl = MetadataTtl::For(Duration::from_secs(60));
    let s = setup_with(mem.clone(), ttl, tempfile::tempdir().unwrap());
    let d = s.fs.mkdir(ROOT, n("d"), 0o755, 0, ME).await.unwrap();
    for i in 0..5 {
        s.write_file(d.ino, &format!("f{i}"), format!("file {i}").as_bytes())
            .await;
    }
    // Every copy is made, then the deletes fail as if the process died there.
    mem.fail_next(Op::Delete, 100);
    assert!(s.fs.rename(ROOT, n("d"), ROOT, n("e"), 0).await.is_err());
    assert!(s.body("pre/d/f3").is_some() && s.body("pre/e/f3").is_some());
    let Setup { fs, dir, .. } = s;
    drop(fs);
    mem.heal();
    let s = setup_with(mem.clone(), ttl, dir);
    assert_eq!(s.fs.resume_dir_renames().await.unwrap(), 1);
    assert_eq!(
        s.mem.keys(),
        [
            "pre/e/", "pre/e/f0", "pre/e/f1", "pre/e/f2", "pre/e/f3", "pre/e/f4"
        ]
    );
    assert_eq!(s.fs.resume_dir_renames().await.unwrap(), 0, "done once");
    let e = s.fs.lookup(ROOT, n("e")).await.unwrap();
    assert_eq!(e.ino, d.ino, "the row moved with the objects");
    let f = s.fs.lookup(e.ino, n("f3")).await.unwrap();
    assert_eq!(s.read_all(f.ino).await, b"file 3");
    assert_eq!(
        s.fs.lookup(ROOT, n("d")).await.unwrap_err().errno(),
        libc::ENOENT
    );
}

#[tokio::test]
async fn a_directory_rename_interrupted_while_copying_is_completed_with_a_staged_edit_inside() {
    let mem = Arc::new(MemStore::new());
    let ttl = MetadataTtl::For(Duration::from_secs(60));
    let s = setup_write_back(mem.clone(), tempfile::tempdir().unwrap());
    let d = s.fs.mkdir(ROOT, n("d"), 0o755, 0, ME).await.unwrap();
    let big: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 241) as u8).collect();
    let f = s.write_file(d.ino, "big", &big).await;
    s.write_file(d.ino, "small", b"small").await;
    assert_eq!(s.fs.flush_all().await, 0);
    // A write-back edit of one block of "big", acknowledged, not uploaded.
    let fh = s.fs.open(f, libc::O_RDWR, ME).await.unwrap().fh;
    s.fs.write(fh, 1024 * 1024 + 10, b"EDIT").await.unwrap();
    s.fs.flush(fh).await.unwrap();
    s.fs.release(fh).await;
    // The state a crash leaves after copying "small" only: journal entry, partial copy.
    s.fs.meta
        .begin_dir_rename(&DirRename {
            src_ino: d.ino,
            new_parent: ROOT,
            new_name: "e".into(),
            old_prefix: "pre/d/".into(),
            new_prefix: "pre/e/".into(),
        })
        .unwrap();
    mem.insert("pre/e/small", b"small", WriteHeaders::default());
    let Setup { fs, dir, .. } = s;
    drop(fs);
    let s = setup_configured(mem.clone(), ttl, dir, |c| c.write_back = true);
    assert_eq!(s.fs.resume_dir_renames().await.unwrap(), 1);
    assert_eq!(s.fs.recover_pending().unwrap(), 1);
    assert_eq!(s.fs.flush_all().await, 0);
    let mut expected = big.clone();
    expected[1024 * 1024 + 10..1024 * 1024 + 14].copy_from_slice(b"EDIT");
    assert!(
        s.body("pre/e/big").unwrap() == expected,
        "the edit landed at the new key"
    );
    assert_eq!(s.body("pre/e/small").unwrap(), b"small");
    assert!(
        s.mem.keys().iter().all(|k| !k.starts_with("pre/d")),
        "{:?}",
        s.mem.keys()
    );
}

#[tokio::test]
async fn our_own_upload_found_after_a_crash_is_not_a_conflict() {
    let mem = Arc::new(MemStore::new());
    mem.ignore_conditions();
    let s = setup_write_back(mem.clone(), tempfile::tempdir().unwrap());
    s.write_file(ROOT, "f.txt", b"mine, whole").await;
    // The upload completed, then the process died before recording it.
    mem.insert("pre/f.txt", b"mine, whole", WriteHeaders::default());
    let puts = mem.count(Op::Put);
    assert_eq!(s.fs.flush_all().await, 0);
    assert_eq!(s.body("pre/f.txt").unwrap(), b"mine, whole");
    assert!(
        conflict_copies(&s.mem, "pre/f").is_empty(),
        "{:?}",
        s.mem.keys()
    );
    assert_eq!(mem.count(Op::Put), puts, "nothing sent again");
}

#[tokio::test]
async fn staging_files_nobody_owns_are_removed_at_start() {
    let mem = Arc::new(MemStore::new());
    let s = setup_write_back(mem.clone(), tempfile::tempdir().unwrap());
    s.write_file(ROOT, "kept", b"pending").await;
    let gone = s
        .write_file(ROOT, "gone", b"unlinked before its upload")
        .await;
    s.fs.unlink(ROOT, n("gone")).await.unwrap();
    let Setup { fs, dir, .. } = s;
    drop(fs);
    let staging = dir.path().join("staging");
    // Left by a crash: a staging file whose row is gone, and a stray temporary.
    std::fs::write(staging.join(format!("{gone}.data")), b"x").unwrap();
    std::fs::write(staging.join("leftover.tmp"), b"x").unwrap();
    let s = setup_write_back(mem.clone(), dir);
    assert_eq!(s.fs.recover_pending().unwrap(), 1);
    let left: Vec<String> = std::fs::read_dir(s.dir.path().join("staging"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(s.fs.flush_all().await, 0);
    assert_eq!(s.body("pre/kept").unwrap(), b"pending");
    assert!(s.body("pre/gone").is_none());
}

#[tokio::test]
async fn a_file_replaced_outside_while_open_reads_new_on_the_next_open_and_stale_on_the_old() {
    let mem = Arc::new(MemStore::new());
    mem.insert("pre/f", b"old contents", WriteHeaders::default());
    let ttl = MetadataTtl::For(Duration::from_millis(100));
    let s = setup_with(mem.clone(), ttl, tempfile::tempdir().unwrap());
    let f = s.fs.lookup(ROOT, n("f")).await.unwrap();
    let old = s.fs.open(f.ino, libc::O_RDONLY, ROOT_CALLER).await.unwrap();
    assert_eq!(
        &s.fs.read(old.fh, 0, 100).await.unwrap()[..],
        b"old contents"
    );
    mem.insert("pre/f", b"new contents!", WriteHeaders::default());
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(s.names(ROOT).await, ["f"], "the listing finds it replaced");
    assert_eq!(s.fs.getattr(f.ino).await.unwrap().size, 13);
    assert_eq!(
        s.read_all(f.ino).await,
        b"new contents!",
        "a new open reads the new version"
    );
    let err = s.fs.read(old.fh, 0, 100).await.unwrap_err();
    assert_eq!(
        err.errno(),
        libc::ESTALE,
        "the old handle does not mix versions"
    );
    s.fs.release(old.fh).await;
    // A rename of this mount's own keeps a reader reading.
    let r = s.fs.open(f.ino, libc::O_RDONLY, ROOT_CALLER).await.unwrap();
    s.fs.rename(ROOT, n("f"), ROOT, n("g"), 0).await.unwrap();
    assert_eq!(
        &s.fs.read(r.fh, 0, 100).await.unwrap()[..],
        b"new contents!"
    );
    s.fs.release(r.fh).await;
}

#[tokio::test]
async fn readdirplus_past_the_first_batch_is_answered_at_once_with_the_same_attributes() {
    let s = setup();
    for i in 0..70 {
        s.mem.insert(
            &format!("pre/f{i:02}"),
            b"x",
            s3fs_headers(libc::S_IFREG | 0o600, 33),
        );
    }
    s.mem
        .insert("pre/sub/", b"", s3fs_headers(libc::S_IFDIR | 0o750, 33));
    let fh = s.fs.opendir(ROOT).await.unwrap().fh;
    assert!(
        s.fs.readdirplus_now(fh, 0).is_none(),
        "offset 0 lists first"
    );
    let first = s.fs.readdirplus(ROOT, fh, 0).await.unwrap();
    let next = first.last().unwrap().0.next_offset;
    let now = s.fs.readdirplus_now(fh, next).unwrap().unwrap();
    assert_eq!(now, s.fs.readdirplus(ROOT, fh, next).await.unwrap());
    assert!(now.iter().all(|(_, a)| a.perm == 0o600 && a.uid == 33));
    // The last batch holds the directory, whose link count is not counted on the FUSE thread.
    let mut offset = next;
    loop {
        let batch = s.fs.readdirplus(ROOT, fh, offset).await.unwrap();
        let Some(last) = batch.last() else { break };
        if batch.iter().any(|(e, _)| e.kind == Kind::Dir) {
            assert!(s.fs.readdirplus_now(fh, offset).is_none());
        }
        offset = last.0.next_offset;
    }
    s.fs.releasedir(fh);
}

#[tokio::test]
async fn a_chmod_while_the_file_uploads_in_the_background_reaches_the_bucket_and_the_row() {
    let mem = Arc::new(MemStore::new());
    mem.ignore_conditions();
    let s = setup_write_back(mem.clone(), tempfile::tempdir().unwrap());
    let f = s.write_file(ROOT, "f", b"contents").await;
    let put = mem.pause(Op::Put, "pre/f");
    let chmod = async {
        put.reached().await;
        let steps = async {
            // The chmod has found the file open, its upload under way; the upload ends and
            // takes it out of the table before the chmod is made.
            put.resume();
            retired(&s, f).await;
        };
        let set = SetAttr {
            mode: Some(0o600),
            ..SetAttr::default()
        };
        tokio::join!(s.fs.setattr(f, None, set), steps).0
    };
    let (pending, changed) = tokio::join!(s.fs.flush_all(), chmod);
    assert_eq!(changed.unwrap().perm, 0o600);
    assert_eq!(pending, 0);
    assert_eq!(s.fs.flush_all().await, 0);
    let (body, headers) = s.mem.object("pre/f").unwrap();
    assert_eq!(&body[..], b"contents");
    assert_eq!(
        headers.metadata["mode"],
        (libc::S_IFREG | 0o600).to_string(),
        "the chmod is in the bucket"
    );
    // And in the row: a remount of the cache directory shows it, with nothing left to upload.
    let Setup { fs, dir, .. } = s;
    drop(fs);
    let s = setup_write_back(mem, dir);
    let again = s.fs.lookup(ROOT, n("f")).await.unwrap();
    assert_eq!((again.ino, again.perm), (f, 0o600));
    assert_eq!(s.fs.flush_all().await, 0);
    assert!(conflict_copies(&s.mem, "pre/f").is_empty());
}

/// Runs `op` while a move of `pre/d/` to `pre/e/` is held at its copy of `pre/d/f`: `op`
/// either waits for the move (and is given 50 ms to show it does not) or ran in the middle
/// of it. Returns `op`'s result once both are done.
async fn during_a_dir_move<T>(s: &Setup, op: impl std::future::Future<Output = T>) -> T {
    let copy = s.mem.pause(Op::Copy, "pre/e/f");
    let mv = s.fs.rename(ROOT, n("d"), ROOT, n("e"), 0);
    let overlapping = async {
        copy.reached().await;
        let mut op = Box::pin(op);
        let early = tokio::time::timeout(Duration::from_millis(50), op.as_mut()).await;
        copy.resume();
        match early {
            Ok(done) => done,
            Err(_) => op.await,
        }
    };
    let (moved, result) = tokio::join!(mv, overlapping);
    moved.unwrap();
    result
}

#[tokio::test]
async fn a_chmod_overlapping_a_move_of_its_directory_reaches_the_moved_object() {
    let s = setup();
    let d = s.fs.mkdir(ROOT, n("d"), 0o755, 0, ME).await.unwrap().ino;
    let f = s.write_file(d, "f", b"contents").await;
    let set = SetAttr {
        mode: Some(0o600),
        ..Default::default()
    };
    during_a_dir_move(&s, s.fs.setattr(f, None, set))
        .await
        .unwrap();
    assert_eq!(s.mem.keys(), ["pre/e/", "pre/e/f"], "nothing left behind");
    let (body, headers) = s.mem.object("pre/e/f").unwrap();
    assert_eq!(&body[..], b"contents");
    assert_eq!(
        headers.metadata["mode"],
        (libc::S_IFREG | 0o600).to_string(),
        "the chmod is in the bucket"
    );
    // And on a fresh mount of the bucket.
    let fresh = setup_with(
        s.mem.clone(),
        MetadataTtl::For(Duration::from_secs(60)),
        tempfile::tempdir().unwrap(),
    );
    let e = fresh.fs.lookup(ROOT, n("e")).await.unwrap().ino;
    assert_eq!(fresh.fs.lookup(e, n("f")).await.unwrap().perm, 0o600);
}

#[tokio::test]
async fn a_file_rename_overlapping_a_move_of_its_directory_leaves_one_name() {
    let s = setup();
    let d = s.fs.mkdir(ROOT, n("d"), 0o755, 0, ME).await.unwrap().ino;
    s.write_file(d, "f", b"contents").await;
    during_a_dir_move(&s, s.fs.rename(d, n("f"), d, n("g"), 0))
        .await
        .unwrap();
    assert_eq!(
        s.mem.keys(),
        ["pre/e/", "pre/e/g"],
        "one name, under the new directory"
    );
    assert_eq!(s.body("pre/e/g").unwrap(), b"contents");
    let e = s.fs.lookup(ROOT, n("e")).await.unwrap().ino;
    assert_eq!(s.names(e).await, ["g"]);
}

#[tokio::test]
async fn an_open_overlapping_a_move_of_its_directory_reads_the_moved_object() {
    // Nothing is fresh: the open looks at the object first, and is held there.
    let s = setup_with(
        Arc::new(MemStore::new()),
        MetadataTtl::For(Duration::ZERO),
        tempfile::tempdir().unwrap(),
    );
    s.mem
        .insert("pre/d/f", b"contents", WriteHeaders::default());
    let d = s.fs.lookup(ROOT, n("d")).await.unwrap().ino;
    let f = s.fs.lookup(d, n("f")).await.unwrap().ino;
    let head = s.mem.pause(Op::Head, "pre/d/f");
    let delete = s.mem.pause(Op::Delete, "pre/d/f");
    let opened = tokio::sync::Notify::new();
    let open = async {
        let result = s.fs.open(f, libc::O_RDONLY, ME).await;
        opened.notify_one();
        result
    };
    // The move either waits for the open, or runs until it deletes the original (its copy
    // made, the entries inside pointed at it) while the open ends.
    let moved = async {
        head.reached().await;
        let mut mv = Box::pin(s.fs.rename(ROOT, n("d"), ROOT, n("e"), 0));
        let _ = tokio::time::timeout(Duration::from_millis(50), async {
            tokio::select! {
                _ = mv.as_mut() => unreachable!("the original is deleted first"),
                _ = delete.reached() => {}
            }
        })
        .await;
        head.resume();
        opened.notified().await;
        delete.resume();
        mv.await
    };
    let (opened, moved) = tokio::join!(open, moved);
    moved.unwrap();
    let fh = opened.unwrap().fh;
    assert_eq!(&s.fs.read(fh, 0, 100).await.unwrap()[..], b"contents");
    s.fs.release(fh).await;
    assert_eq!(s.mem.keys(), ["pre/e/f"]);
}
