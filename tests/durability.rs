//! The durability contract through a real mount: in write-back mode `close()` returns before
//! the upload, `s3bridge flush` waits for the queue, and no file a close acknowledged is
//! lost when the daemon is killed with SIGKILL at any point of a write-heavy workload.

mod common;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Mount, MountOptions, flush, flush_ok, pattern, write_and_close, write_checked};

/// Write-back mounts with small parts, so that multipart (and streamed) uploads are common
/// in a workload of a few MiB per file.
fn write_back(cache_dir: Option<std::path::PathBuf>) -> MountOptions {
    MountOptions {
        extra: [
            "--write-back",
            "--multipart-threshold",
            "5M",
            "--part-size",
            "5M",
        ]
        .map(String::from)
        .to_vec(),
        cache_dir,
        ..Default::default()
    }
}

/// Writes `data` to a new file at `path`; true only if every call, `close()` included,
/// succeeded: that is what the filesystem acknowledged.
fn write_acknowledged(path: &Path, data: &[u8]) -> bool {
    write_checked(path, data).is_ok()
}

/// Creates `name` in the directory open as `dir` and writes `data` to it; true only if every
/// call succeeded. Relative to an open directory of the mount, never to its path: once the
/// daemon is killed and the mount detached, the path would name the empty directory beneath.
fn write_acknowledged_in(dir: &File, name: &str, data: &[u8]) -> bool {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid directory fd and C string; the new fd is owned by the File below.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
            0o644,
        )
    };
    // SAFETY: fd was just opened and is ours.
    fd >= 0 && write_and_close(unsafe { File::from_raw_fd(fd) }, data).is_ok()
}

/// A small xorshift generator: the test prints its seed, so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn write_back_close_returns_and_flush_waits_for_the_bucket() {
    let m = Mount::with("wb-flush", write_back(None));
    let files: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| (format!("f{i}"), pattern(1000 + i * 70_000, i as u64)))
        .collect();
    for (name, data) in &files {
        assert!(write_acknowledged(&m.p(name), data));
    }
    // Read back through the mount at once, whatever the uploader has done so far.
    for (name, data) in &files {
        assert!(std::fs::read(m.p(name)).unwrap() == *data, "{name}");
    }
    flush_ok(&m.path);
    let b = m.bucket();
    for (name, data) in &files {
        assert!(
            b.get(name).as_deref() == Some(&data[..]),
            "{name} in the bucket"
        );
    }
}

#[test]
fn flush_of_a_path_that_is_not_a_mount_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = flush(dir.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no s3bridge serves"), "{err}");
}

/// The crash test of the durability contract: 20 times, a writer creates files as fast as
/// it can while the daemon is killed with SIGKILL at a random moment; the cache directory is
/// mounted again, `s3bridge flush` drains it, and every file whose `close()` succeeded must
/// be in the bucket byte for byte. No multipart upload may be left behind.
#[test]
fn no_acknowledged_file_is_lost_to_kill_9() {
    const ROUNDS: usize = 20;
    let seed = std::env::var("S3BRIDGE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
        | 1;
    eprintln!("crash test seed {seed} (S3BRIDGE_CRASH_SEED replays it)");
    let mut rng = Rng(seed);
    let mut m = Mount::with("crash", write_back(None));
    let cache_dir = m.cache_dir.clone();
    let acknowledged: Arc<Mutex<Vec<(String, usize, u64)>>> = Arc::default();
    let mut attempted = 0usize;
    for round in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (dir, stop, acked) = (m.path.clone(), stop.clone(), acknowledged.clone());
            let mut rng = Rng(rng.next() | 1);
            std::thread::spawn(move || {
                let dir = File::open(&dir).unwrap();
                let mut tried = 0;
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    // Mostly small files, every eighth one of several parts.
                    let len = if i % 8 == 7 {
                        6_000_000 + rng.below(8_000_000) as usize
                    } else {
                        rng.below(300_000) as usize
                    };
                    let name = format!("r{round}-f{i}");
                    let data_seed = rng.next();
                    tried += 1;
                    if write_acknowledged_in(&dir, &name, &pattern(len, data_seed)) {
                        acked.lock().unwrap().push((name, len, data_seed));
                    } else {
                        break; // the daemon is gone
                    }
                }
                tried
            })
        };
        std::thread::sleep(Duration::from_millis(150 + rng.below(900)));
        m.kill();
        stop.store(true, Ordering::Relaxed);
        attempted += writer.join().unwrap();
        m = Mount::of_prefix(&m.prefix.clone(), write_back(Some(cache_dir.clone())));
        if round % 5 == 4 {
            // Some rounds drain fully before the next crash; the others crash with a queue.
            flush_ok(&m.path);
        }
    }
    let started = Instant::now();
    flush_ok(&m.path);
    let log = m.unmount();
    let acked = acknowledged.lock().unwrap().clone();
    eprintln!(
        "{} files acknowledged of {attempted} attempted over {ROUNDS} kills; drained in {:?}",
        acked.len(),
        started.elapsed()
    );
    assert!(
        acked.len() >= ROUNDS,
        "the workload wrote too little to test anything"
    );
    let b = m.bucket();
    let mut bytes = 0;
    for (name, len, data_seed) in &acked {
        let body = b.get(name);
        assert!(
            body.as_deref() == Some(&pattern(*len, *data_seed)[..]),
            "{name} ({len} bytes) acknowledged but {} in the bucket; seed {seed}\n{log}",
            match &body {
                Some(b) => format!("{} other bytes", b.len()),
                None => "missing".into(),
            }
        );
        bytes += len;
    }
    eprintln!("verified {} files, {bytes} bytes", acked.len());
    assert_eq!(b.pending_uploads(), 0, "multipart uploads left behind");
}
