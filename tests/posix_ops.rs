//! Every filesystem operation through a real FUSE mount on a real S3 server, checking both
//! what the mount shows and what the bucket holds.

mod common;

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Mount, MountOptions, pattern};

fn errno_of<T>(r: std::io::Result<T>) -> i32 {
    r.err().and_then(|e| e.raw_os_error()).unwrap_or(0)
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn renameat2(from: &Path, to: &Path, flags: u32) -> std::io::Result<()> {
    let (f, t) = (cstr(from), cstr(to));
    // SAFETY: valid C strings; AT_FDCWD.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn setxattr(p: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let (p, n) = (cstr(p), CString::new(name).unwrap());
    // SAFETY: valid pointers and lengths.
    let rc = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn getxattr(p: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let (p, n) = (cstr(p), CString::new(name).unwrap());
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid pointers and lengths.
    let rc = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(rc as usize);
    Ok(buf)
}

fn listxattr(p: &Path) -> std::io::Result<Vec<u8>> {
    let p = cstr(p);
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid pointers and lengths.
    let rc = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(rc as usize);
    Ok(buf)
}

fn removexattr(p: &Path, name: &str) -> std::io::Result<()> {
    let (p, n) = (cstr(p), CString::new(name).unwrap());
    // SAFETY: valid C strings.
    if unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn create_write_read_and_stat() {
    let m = Mount::new("create");
    let b = m.bucket();
    fs::write(m.p("a.txt"), b"hello\n").unwrap();
    assert_eq!(
        b.get("a.txt").unwrap(),
        b"hello\n",
        "in the bucket at close"
    );
    assert_eq!(fs::read(m.p("a.txt")).unwrap(), b"hello\n");
    let md = fs::metadata(m.p("a.txt")).unwrap();
    assert_eq!(md.len(), 6);
    assert!(md.is_file());
    assert_eq!(md.uid(), unsafe { libc::getuid() });
    assert_eq!(errno_of(fs::metadata(m.p("missing"))), libc::ENOENT);
    // O_EXCL on an existing name.
    let excl = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(m.p("a.txt"));
    assert_eq!(errno_of(excl), libc::EEXIST);
    // An empty file is an empty object.
    File::create(m.p("empty")).unwrap();
    assert_eq!(b.get("empty").unwrap(), b"");
    // The bucket carries s3fs headers.
    let (meta, _) = b.head("a.txt").unwrap();
    assert_eq!(meta["mode"], (libc::S_IFREG | 0o644).to_string());
    // statfs reports a large, usable filesystem.
    let out = common::sh(&m.path, "stat -f -c '%b %a %l' .");
    let v: Vec<u64> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
    assert!(v[0] > 1 << 30 && v[1] > 1 << 30 && v[2] == 255, "{out}");
}

#[test]
fn writes_at_any_offset() {
    let m = Mount::new("offsets");
    let b = m.bucket();
    // Random writes into an existing multi-part object.
    let big = pattern(40 << 20, 1);
    b.put("big", &big, &[]);
    let mut want = big.clone();
    {
        let f = OpenOptions::new().write(true).open(m.p("big")).unwrap();
        for (i, off) in [7u64, 5_000_000, 17 << 20, (40 << 20) - 3]
            .iter()
            .enumerate()
        {
            let data = [b'A' + i as u8; 3];
            f.write_all_at(&data, *off).unwrap();
            want[*off as usize..*off as usize + 3].copy_from_slice(&data);
        }
        f.sync_all().unwrap();
        assert!(b.get("big").unwrap() == want, "fsync uploads");
    }
    assert!(fs::read(m.p("big")).unwrap() == want);
    assert_eq!(b.pending_uploads(), 0);
    // Sparse: a write far past the end leaves zeros.
    {
        let f = File::create(m.p("sparse")).unwrap();
        f.write_all_at(b"end", 1_000_000).unwrap();
    }
    let sparse = b.get("sparse").unwrap();
    assert_eq!(sparse.len(), 1_000_003);
    assert!(sparse[..1_000_000].iter().all(|&x| x == 0));
    assert_eq!(&sparse[1_000_000..], b"end");
    // Append with O_APPEND, twice.
    fs::write(m.p("log"), b"one\n").unwrap();
    for line in [b"two\n", b"tri\n"] {
        let mut f = OpenOptions::new().append(true).open(m.p("log")).unwrap();
        f.write_all(line).unwrap();
    }
    assert_eq!(b.get("log").unwrap(), b"one\ntwo\ntri\n");
    // Read and write through one read-write handle, with seeks.
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.p("log"))
        .unwrap();
    f.seek(SeekFrom::Start(4)).unwrap();
    f.write_all(b"TWO").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "one\nTWO\ntri\n");
    drop(f);
    assert_eq!(b.get("log").unwrap(), b"one\nTWO\ntri\n");
}

#[test]
fn truncate_grow_and_shrink() {
    let m = Mount::new("truncate");
    let b = m.bucket();
    fs::write(m.p("f"), b"0123456789").unwrap();
    // truncate(2) on a path: done when it returns.
    let c = cstr(&m.p("f"));
    assert_eq!(unsafe { libc::truncate(c.as_ptr(), 4) }, 0);
    assert_eq!(b.get("f").unwrap(), b"0123");
    assert_eq!(unsafe { libc::truncate(c.as_ptr(), 8) }, 0);
    assert_eq!(b.get("f").unwrap(), b"0123\0\0\0\0");
    // ftruncate through a handle, then write.
    let f = OpenOptions::new().write(true).open(m.p("f")).unwrap();
    f.set_len(2).unwrap();
    f.write_all_at(b"Z", 5).unwrap();
    drop(f);
    assert_eq!(b.get("f").unwrap(), b"01\0\0\0Z");
    // O_TRUNC.
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.p("f"))
        .unwrap();
    f.write_all(b"new").unwrap();
    drop(f);
    assert_eq!(b.get("f").unwrap(), b"new");
    assert_eq!(fs::metadata(m.p("f")).unwrap().len(), 3);
    // posix_fallocate extends with zeros; hole punching is not supported.
    let f = OpenOptions::new().write(true).open(m.p("f")).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    assert_eq!(unsafe { libc::posix_fallocate(fd, 0, 6) }, 0);
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    assert_eq!(unsafe { libc::fallocate(fd, punch, 0, 1) }, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EOPNOTSUPP)
    );
    drop(f);
    assert_eq!(b.get("f").unwrap(), b"new\0\0\0");
}

#[test]
fn chmod_chown_and_utimes_persist() {
    let m = Mount::new("attrs");
    let b = m.bucket();
    fs::write(m.p("f"), b"x").unwrap();
    fs::set_permissions(m.p("f"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(m.p("f"), Some(1234), Some(5678)).unwrap();
    let when = UNIX_EPOCH + Duration::new(1_500_000_000, 123_456_789);
    File::options()
        .write(true)
        .open(m.p("f"))
        .unwrap()
        .set_modified(when)
        .unwrap();
    let md = fs::metadata(m.p("f")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o640);
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    assert_eq!(md.modified().unwrap(), when);
    let (meta, _) = b.head("f").unwrap();
    assert_eq!(meta["mode"], (libc::S_IFREG | 0o640).to_string());
    assert_eq!(meta["uid"], "1234");
    assert_eq!(meta["gid"], "5678");
    assert_eq!(meta["mtime"], "1500000000.123456789");
    assert_eq!(b.get("f").unwrap(), b"x", "contents untouched");
    // Directories keep their attributes in their marker.
    fs::create_dir(m.p("d")).unwrap();
    fs::set_permissions(m.p("d"), fs::Permissions::from_mode(0o700)).unwrap();
    let (meta, ctype) = b.head("d/").unwrap();
    assert_eq!(meta["mode"], (libc::S_IFDIR | 0o700).to_string());
    assert_eq!(ctype.as_deref(), Some("application/x-directory"));
    // After a remount with a fresh cache, everything reads back from the bucket.
    let mut m = m;
    let fresh = m.cache_dir.with_file_name("cache2");
    m.remount(MountOptions {
        cache_dir: Some(fresh),
        ..Default::default()
    });
    let md = fs::metadata(m.p("f")).unwrap();
    assert_eq!(
        (md.mode() & 0o7777, md.uid(), md.gid()),
        (0o640, 1234, 5678)
    );
    assert_eq!(md.modified().unwrap(), when);
    assert_eq!(fs::metadata(m.p("d")).unwrap().mode() & 0o7777, 0o700);
}

#[test]
fn directories_mkdir_rmdir_and_large_listings() {
    let m = Mount::new("dirs");
    let b = m.bucket();
    fs::create_dir(m.p("d")).unwrap();
    assert!(b.head("d/").is_some(), "marker object");
    assert_eq!(errno_of(fs::create_dir(m.p("d"))), libc::EEXIST);
    fs::write(m.p("d/f"), b"1").unwrap();
    assert_eq!(errno_of(fs::remove_dir(m.p("d"))), libc::ENOTEMPTY);
    assert_eq!(errno_of(fs::remove_file(m.p("d"))), libc::EISDIR);
    assert_eq!(errno_of(fs::remove_dir(m.p("d/f"))), libc::ENOTDIR);
    fs::remove_file(m.p("d/f")).unwrap();
    fs::remove_dir(m.p("d")).unwrap();
    assert!(b.keys().is_empty(), "{:?}", b.keys());
    // Empty directories persist, also across a remount.
    fs::create_dir_all(m.p("e/f/g")).unwrap();
    let mut m = m;
    m.remount(MountOptions::default());
    assert!(m.p("e/f/g").is_dir());
    // Objects under a prefix without a marker make an implicit directory.
    b.put("imp/sub/file", b"x", &[]);
    assert!(m.p("imp/sub").is_dir());
    assert_eq!(fs::read(m.p("imp/sub/file")).unwrap(), b"x");
    fs::remove_file(m.p("imp/sub/file")).unwrap();
    assert!(m.p("imp/sub").is_dir(), "still there once empty");
}

#[test]
fn readdir_of_a_hundred_thousand_entries() {
    let m = Mount::new("wide");
    let b = m.bucket();
    let n = 100_000;
    b.put_many((0..n).map(|i| format!("w/f{i:06}")).collect(), b"");
    let names: Vec<String> = fs::read_dir(m.p("w"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), n);
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), n, "no duplicates");
    assert_eq!(sorted[0], "f000000");
    assert_eq!(sorted[n - 1], format!("f{:06}", n - 1));
}

#[test]
fn unlinked_open_files_stay_readable() {
    let m = Mount::new("unlink");
    let b = m.bucket();
    let data = pattern(3 << 20, 2);
    fs::write(m.p("f"), &data).unwrap();
    let mut f = File::open(m.p("f")).unwrap();
    fs::remove_file(m.p("f")).unwrap();
    assert!(b.get("f").is_none());
    assert_eq!(errno_of(fs::metadata(m.p("f"))), libc::ENOENT);
    let mut back = Vec::new();
    f.read_to_end(&mut back).unwrap();
    assert!(back == data);
    drop(f);
    assert!(b.keys().is_empty());
}

#[test]
fn renames_of_files_and_directories() {
    let m = Mount::new("rename");
    let b = m.bucket();
    fs::write(m.p("a"), b"A").unwrap();
    fs::write(m.p("b"), b"B").unwrap();
    // RENAME_NOREPLACE refuses an existing target.
    assert_eq!(
        errno_of(renameat2(&m.p("a"), &m.p("b"), libc::RENAME_NOREPLACE)),
        libc::EEXIST
    );
    renameat2(&m.p("a"), &m.p("c"), libc::RENAME_NOREPLACE).unwrap();
    assert_eq!(b.get("c").unwrap(), b"A");
    // Over an existing file.
    fs::rename(m.p("c"), m.p("b")).unwrap();
    assert_eq!(b.get("b").unwrap(), b"A");
    assert_eq!(b.keys(), ["b"]);
    // A directory with a subtree, into another directory.
    fs::create_dir_all(m.p("src/x/y")).unwrap();
    fs::write(m.p("src/x/y/deep"), b"deep").unwrap();
    fs::write(m.p("src/top"), b"top").unwrap();
    std::os::unix::fs::symlink("x/y/deep", m.p("src/link")).unwrap();
    fs::create_dir(m.p("dst")).unwrap();
    fs::rename(m.p("src"), m.p("dst/moved")).unwrap();
    assert!(!m.p("src").exists());
    assert_eq!(fs::read(m.p("dst/moved/x/y/deep")).unwrap(), b"deep");
    assert_eq!(fs::read(m.p("dst/moved/link")).unwrap(), b"deep");
    assert_eq!(
        b.keys(),
        [
            "b",
            "dst/",
            "dst/moved/",
            "dst/moved/link",
            "dst/moved/top",
            "dst/moved/x/",
            "dst/moved/x/y/",
            "dst/moved/x/y/deep"
        ]
    );
    // A directory over an empty directory; not over a non-empty one; not into itself.
    fs::create_dir(m.p("empty")).unwrap();
    fs::rename(m.p("dst/moved"), m.p("empty")).unwrap();
    assert_eq!(fs::read(m.p("empty/top")).unwrap(), b"top");
    fs::create_dir(m.p("d2")).unwrap();
    fs::write(m.p("d2/f"), b"").unwrap();
    assert_eq!(
        errno_of(fs::rename(m.p("empty"), m.p("d2"))),
        libc::ENOTEMPTY
    );
    assert_eq!(
        errno_of(fs::rename(m.p("empty"), m.p("empty/x/inside"))),
        libc::EINVAL
    );
    // RENAME_EXCHANGE cannot be atomic on S3.
    assert_eq!(
        errno_of(renameat2(&m.p("b"), &m.p("d2/f"), libc::RENAME_EXCHANGE)),
        libc::EINVAL
    );
    // The mount agrees with a fresh view of the bucket.
    let mut m = m;
    let fresh = m.cache_dir.with_file_name("cache2");
    m.remount(MountOptions {
        cache_dir: Some(fresh),
        ..Default::default()
    });
    assert_eq!(fs::read(m.p("empty/x/y/deep")).unwrap(), b"deep");
    assert!(!m.p("dst/moved").exists());
}

#[test]
fn without_xattr_the_mount_has_no_xattrs() {
    let m = Mount::new("no-xattr");
    fs::write(m.p("f"), b"x").unwrap();
    assert_eq!(
        errno_of(setxattr(&m.p("f"), "user.k", b"v")),
        libc::EOPNOTSUPP
    );
    assert_eq!(errno_of(getxattr(&m.p("f"), "user.k")), libc::EOPNOTSUPP);
    assert!(!m.bucket().head("f").unwrap().0.contains_key("xattr"));
}

#[test]
fn symlinks_xattrs_access_and_links() {
    let m = Mount::with(
        "misc",
        MountOptions {
            extra: vec!["--xattr".into()],
            ..Default::default()
        },
    );
    let b = m.bucket();
    fs::write(m.p("target"), b"t").unwrap();
    std::os::unix::fs::symlink("target", m.p("link")).unwrap();
    assert_eq!(fs::read_link(m.p("link")).unwrap().to_str(), Some("target"));
    assert_eq!(fs::read(m.p("link")).unwrap(), b"t");
    assert!(
        fs::symlink_metadata(m.p("link"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(b.get("link").unwrap(), b"target");
    assert_eq!(
        b.head("link").unwrap().0["mode"],
        (libc::S_IFLNK | 0o777).to_string()
    );
    // user.* extended attributes live in x-amz-meta-xattr.
    setxattr(&m.p("target"), "user.k", b"value").unwrap();
    assert_eq!(getxattr(&m.p("target"), "user.k").unwrap(), b"value");
    assert_eq!(listxattr(&m.p("target")).unwrap(), b"user.k\0");
    assert!(b.head("target").unwrap().0.contains_key("xattr"));
    assert_eq!(
        errno_of(getxattr(&m.p("target"), "user.none")),
        libc::ENODATA
    );
    assert_eq!(
        errno_of(setxattr(&m.p("target"), "trusted.x", b"1")),
        libc::EOPNOTSUPP
    );
    removexattr(&m.p("target"), "user.k").unwrap();
    assert_eq!(errno_of(getxattr(&m.p("target"), "user.k")), libc::ENODATA);
    // access(2).
    let c = cstr(&m.p("target"));
    assert_eq!(
        unsafe { libc::access(c.as_ptr(), libc::R_OK | libc::W_OK) },
        0
    );
    // Hard links cannot exist on S3.
    assert_eq!(
        errno_of(fs::hard_link(m.p("target"), m.p("hard"))),
        libc::EPERM
    );
    // A name too long for POSIX.
    assert_eq!(
        errno_of(File::create(m.p(&"n".repeat(256)))),
        libc::ENAMETOOLONG
    );
    // mkfifo makes an s3fs-style special file.
    let fifo = cstr(&m.p("fifo"));
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    assert_eq!(
        b.head("fifo").unwrap().0["mode"],
        (libc::S_IFIFO | 0o600).to_string()
    );
}

#[test]
fn keys_longer_than_s3_allows_are_enametoolong() {
    // A long prefix brings keys near S3's 1,024 bytes without long keys in the bucket
    // (Garage stores keys of at most about 500 bytes).
    let prefix = format!("{}/{}/", common::unique("longkey"), "p".repeat(800));
    let m = Mount::of_prefix(&prefix, MountOptions::default());
    let name = "n".repeat(250);
    assert_eq!(errno_of(File::create(m.p(&name))), libc::ENAMETOOLONG);
    assert_eq!(errno_of(fs::create_dir(m.p(&name))), libc::ENAMETOOLONG);
    assert_eq!(
        errno_of(std::os::unix::fs::symlink("t", m.p(&name))),
        libc::ENAMETOOLONG
    );
}

#[test]
fn slow_requests_do_not_block_others() {
    // A large upload in one thread must not stop stat and reads in another.
    let m = Mount::new("concurrent");
    fs::write(m.p("small"), b"s").unwrap();
    let big = m.p("big");
    let writer = std::thread::spawn(move || {
        let data = pattern(200 << 20, 3);
        fs::write(&big, &data).unwrap();
    });
    let start = SystemTime::now();
    let mut stats = 0;
    while !writer.is_finished() {
        assert_eq!(fs::read(m.p("small")).unwrap(), b"s");
        stats += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    writer.join().unwrap();
    assert!(
        stats > 1,
        "reads ran while the upload did ({stats} in {:?})",
        start.elapsed()
    );
    assert_eq!(fs::metadata(m.p("big")).unwrap().len(), 200 << 20);
}
