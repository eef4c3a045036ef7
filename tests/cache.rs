//! The block cache and the read path through a real mount: blocks outlive a remount, are
//! never served for a changed object or when corrupt, stay under the size cap, and reads at
//! any offset and size return the object's bytes.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Mount, MountOptions, pattern, scratch, sh, unique};

/// Block files under the cache directory, with their sizes.
fn block_files(cache_dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let Ok(subdirs) = fs::read_dir(cache_dir.join("blocks")) else {
        return out;
    };
    for sub in subdirs {
        let sub = sub.unwrap().path();
        if !sub.is_dir() {
            continue; // the format marker
        }
        for f in fs::read_dir(sub).unwrap() {
            let f = f.unwrap();
            out.push((f.path(), f.metadata().unwrap().len()));
        }
    }
    out
}

fn ttl(t: &str) -> MountOptions {
    MountOptions {
        ttl: t.into(),
        ..Default::default()
    }
}

#[test]
fn cached_blocks_serve_a_remount_without_the_bucket() {
    let mut m = Mount::with("cache-remount", ttl("forever"));
    let b = m.bucket();
    let data = pattern(5 * 1024 * 1024 + 123, 1);
    b.put("big.bin", &data, &[]);
    assert!(fs::read(m.p("big.bin")).unwrap() == data);
    let blocks = block_files(&m.cache_dir);
    assert_eq!(blocks.len(), 6, "one file per 1 MiB block");
    // The object goes away; a remount of the same cache dir (trusting its metadata forever)
    // still reads every byte, so they can only come from the cache.
    b.delete("big.bin");
    m.remount(ttl("forever"));
    assert!(fs::read(m.p("big.bin")).unwrap() == data);
}

#[test]
fn a_changed_object_is_never_served_from_old_blocks() {
    let m = Mount::with("cache-change", ttl("1"));
    let b = m.bucket();
    let old = pattern(3 * 1024 * 1024, 2);
    let new = pattern(3 * 1024 * 1024, 3);
    b.put("f", &old, &[]);
    assert!(fs::read(m.p("f")).unwrap() == old);
    assert!(fs::read(m.p("f")).unwrap() == old, "warm read");
    b.put("f", &new, &[]);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(fs::read(m.p("f")).unwrap() == new, "same size, new bytes");
    assert!(fs::read(m.p("f")).unwrap() == new);
}

#[test]
fn a_corrupt_block_is_fetched_again_not_served() {
    let mut m = Mount::with("cache-corrupt", ttl("forever"));
    let b = m.bucket();
    let data = pattern(2 * 1024 * 1024 + 5, 4);
    b.put("f", &data, &[]);
    assert!(fs::read(m.p("f")).unwrap() == data);
    m.unmount();
    let blocks = block_files(&m.cache_dir);
    assert_eq!(blocks.len(), 3);
    for (path, len) in &blocks {
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut byte = [0u8];
        f.read_exact_at(&mut byte, len - 1).unwrap();
        f.write_all_at(&[byte[0] ^ 0x5a], len - 1).unwrap();
    }
    m.remount(ttl("forever"));
    assert!(fs::read(m.p("f")).unwrap() == data);
    let log = m.unmount();
    assert_eq!(
        log.matches("dropping a corrupt cache block").count(),
        3,
        "{log}"
    );
    // Fetched again and stored again, intact.
    assert_eq!(block_files(&m.cache_dir).len(), 3);
}

#[test]
fn the_cache_stays_under_its_size_cap() {
    let opts = || MountOptions {
        extra: vec!["--cache-size".into(), "4M".into()],
        ..Default::default()
    };
    let m = Mount::with("cache-cap", opts());
    let b = m.bucket();
    let data = pattern(12 * 1024 * 1024, 5);
    b.put("f", &data, &[]);
    for _ in 0..2 {
        assert!(fs::read(m.p("f")).unwrap() == data);
        let total: u64 = block_files(&m.cache_dir).iter().map(|(_, l)| l).sum();
        assert!(total <= 4 << 20, "{total} bytes cached");
        assert!(total >= 2 << 20, "the cache is used: {total} bytes");
    }
}

#[test]
fn reads_at_every_offset_and_size_match_the_object() {
    let m = Mount::with("cache-offsets", MountOptions::default());
    let b = m.bucket();
    let data = pattern(21 * 1024 * 1024 + 4097, 6);
    b.put("f", &data, &[]);
    let local = scratch().join(unique("expected"));
    fs::write(&local, &data).unwrap();
    // Sequential reads of several sizes, random preads (cold, then warm), and a reader that
    // jumps back and forth, all compared with the same bytes on local disk.
    let script = format!(
        r#"python3 - <<'EOF'
import os, random
a = os.open("{mnt}", os.O_RDONLY)
b = os.open("{local}", os.O_RDONLY)
size = os.fstat(b).st_size
assert os.fstat(a).st_size == size
def check(off, n, what):
    x, y = os.pread(a, n, off), os.pread(b, n, off)
    assert x == y, f"{{what}}: offset {{off}} size {{n}}: {{len(x)}} vs {{len(y)}} bytes"
for chunk in (4096, 131072, 1 << 20, 3 * 1000 * 1000):
    off = 0
    while off < size:
        check(off, chunk, "sequential")
        off += chunk
rnd = random.Random(7)
for round in ("cold", "warm"):
    for _ in range(300):
        off = rnd.randrange(0, size + 10)
        check(off, rnd.choice((1, 512, 4096, 65536, 1 << 20, 5 << 20)), round)
    rnd = random.Random(7)
off = 0
while off < size:
    check(off, 777777, "jumping")
    check(max(0, off - 3 * 1024 * 1024), 4096, "jumping back")
    off += 1234567
print("ok")
EOF"#,
        mnt = m.p("f").display(),
        local = local.display()
    );
    assert_eq!(sh(&m.path, &script).trim(), "ok");
    fs::remove_file(local).unwrap();
}

#[test]
fn a_file_written_through_the_mount_is_cached_for_reading_back() {
    let mut m = Mount::with("cache-seed", ttl("forever"));
    let data = pattern(2 * 1024 * 1024 + 77, 7);
    fs::write(m.p("written"), &data).unwrap();
    assert!(
        common::eventually(Duration::from_secs(10), || {
            block_files(&m.cache_dir)
                .iter()
                .filter(|(p, _)| !p.starts_with(m.cache_dir.join("blocks/seed")))
                .count()
                == 3
        }),
        "the uploaded file's blocks were not cached"
    );
    // Gone from the bucket, still readable: the bytes come from the blocks cached at upload.
    m.bucket().delete("written");
    m.remount(ttl("forever"));
    assert!(fs::read(m.p("written")).unwrap() == data);
}

#[test]
fn warm_loads_a_tree_into_the_cache() {
    let m = Mount::with("cache-warm", ttl("forever"));
    let b = m.bucket();
    let files = [
        ("photos/a.jpg", pattern(3 * 1024 * 1024 + 5, 11)),
        ("photos/2024/b.jpg", pattern(1024 * 1024, 12)),
        ("photos/2024/c.txt", pattern(10, 13)),
    ];
    for (k, v) in &files {
        b.put(k, v, &[]);
    }
    b.put("elsewhere.bin", &pattern(2 * 1024 * 1024, 14), &[]);
    let out = Command::new(common::binary())
        .arg("warm")
        .arg(m.p("photos"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        said.lines().filter(|l| l.starts_with("warmed ")).count(),
        3,
        "{said}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("warmed 3 files"));
    // 4 + 1 + 1 blocks, and nothing of the file outside the tree.
    assert_eq!(block_files(&m.cache_dir).len(), 6);
    // The bucket can go: the warmed files read from the cache.
    for (k, _) in &files {
        b.delete(k);
    }
    for (k, v) in &files {
        assert!(fs::read(m.p(k)).unwrap() == *v, "{k} from the cache");
    }
    let missing = Command::new(common::binary())
        .arg("warm")
        .arg(m.p("no-such-dir"))
        .output()
        .unwrap();
    assert!(!missing.status.success());
}
