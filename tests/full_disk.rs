//! A full cache disk: the cache directory on a small tmpfs. Writes that do not fit fail with
//! ENOSPC, nothing acknowledged before is lost, and the mount carries on once space is back.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Mount, MountOptions, flush_ok, pattern, scratch, unique, write_checked};

/// A tmpfs of `mib` MiB, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(mib: u32) -> Tmpfs {
        let dir = scratch().join(unique("tmpfs"));
        fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(&dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "cannot mount a tmpfs (the tests run as root)");
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn fill_the_cache_disk(extra: &[&str]) {
    let disk = Tmpfs::new(48);
    let m = Mount::with(
        "full-disk",
        MountOptions {
            cache_dir: Some(disk.0.join("cache")),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        },
    );
    let small = |i: u64| pattern(200_000 + i as usize * 1000, i);
    for i in 0..5 {
        write_checked(&m.p(&format!("before{i}")), &small(i)).unwrap();
    }
    // 100 MB cannot be staged on a 48 MiB disk.
    let err = write_checked(&m.p("huge"), &pattern(100_000_000, 9)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    // Space comes back when the file goes; the mount carries on.
    fs::remove_file(m.p("huge")).unwrap();
    write_checked(&m.p("after"), &small(7)).unwrap();
    flush_ok(&m.path);
    let b = m.bucket();
    for i in 0..5 {
        let name = format!("before{i}");
        assert!(b.get(&name).unwrap() == small(i), "{name} in the bucket");
        assert!(
            fs::read(m.p(&name)).unwrap() == small(i),
            "{name} through the mount"
        );
    }
    assert!(b.get("after").unwrap() == small(7));
    assert!(!exists_in(&b.keys(), "huge") || b.get("huge").is_none());
    assert!(
        free_mib(&disk.0) > 20,
        "staged data of the failed file was released"
    );
}

fn exists_in(keys: &[String], name: &str) -> bool {
    keys.iter().any(|k| k == name)
}

fn free_mib(dir: &Path) -> u64 {
    let out = Command::new("df")
        .args(["-m", "--output=avail"])
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn sync_writes_fail_with_enospc_and_nothing_acknowledged_is_lost() {
    fill_the_cache_disk(&[]);
}

#[test]
fn write_back_writes_fail_with_enospc_and_the_queue_survives() {
    fill_the_cache_disk(&["--write-back"]);
}
