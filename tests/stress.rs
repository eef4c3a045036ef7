//! Concurrency stress through a real mount: threads write, truncate, rename, unlink and
//! read their own files and shared ones at the same time, for a bounded time, and every
//! byte is checked against a model — through the mount while it runs, in the bucket after.
//! A watchdog fails the test if the workload stops making progress (a deadlock).

mod common;

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use common::{Mount, MountOptions, flush_ok, pattern, write_and_close};

const THREADS: u64 = 6;
const RUN_FOR: Duration = Duration::from_secs(15);
/// No operation may take longer than this: a deadlock, not a slow server.
const STALL: Duration = Duration::from_secs(60);
/// Each thread's region of the shared file.
const REGION: u64 = 256 * 1024;

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// What one thread believes its files hold.
type Model = HashMap<String, Vec<u8>>;

fn pwrite(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap();
    f.write_all_at(data, offset).unwrap();
    write_and_close(f, b"").unwrap();
}

/// Where two contents first differ, for the failure message.
fn diff(got: &[u8], want: &[u8]) -> String {
    let first = got.iter().zip(want).position(|(a, b)| a != b);
    format!(
        "{} bytes read, {} expected, first difference at {:?}",
        got.len(),
        want.len(),
        first
    )
}

/// One thread's workload; returns its model and the operations it made.
fn worker(dir: PathBuf, t: u64, seed: u64, done: Arc<AtomicU64>) -> (Model, u64) {
    let mut rng = Rng(seed | 1);
    let mut model: Model = HashMap::new();
    let shared = dir.join("shared");
    let started = Instant::now();
    let mut ops = 0;
    while started.elapsed() < RUN_FOR {
        let name = format!("t{t}-f{}", rng.below(4));
        let path = dir.join(&name);
        match rng.below(10) {
            0..=3 => {
                let off = rng.below(2 << 20);
                let data = pattern(1 + rng.below(300_000) as usize, rng.below(u64::MAX));
                pwrite(&path, off, &data);
                let m = model.entry(name).or_default();
                let end = off as usize + data.len();
                if m.len() < end {
                    m.resize(end, 0);
                }
                m[off as usize..end].copy_from_slice(&data);
            }
            4 => {
                if let Some(m) = model.get_mut(&name) {
                    let len = rng.below(m.len() as u64 + 100_000);
                    OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .unwrap()
                        .set_len(len)
                        .unwrap();
                    m.resize(len as usize, 0);
                }
            }
            5 => {
                let to = format!("t{t}-f{}", rng.below(4));
                if to != name
                    && let Some(m) = model.remove(&name)
                {
                    fs::rename(&path, dir.join(&to)).unwrap();
                    model.insert(to, m);
                }
            }
            6 => {
                if model.remove(&name).is_some() {
                    fs::remove_file(&path).unwrap();
                }
            }
            7 => {
                // This thread's region of the file all threads write.
                let data = pattern(REGION as usize, t * 1000 + ops);
                pwrite(&shared, t * REGION, &data);
                model.insert("shared".into(), data);
            }
            _ => {
                if let Some(m) = model.get(&name) {
                    let got = fs::read(&path).unwrap();
                    assert!(
                        got == *m,
                        "{name} read back while running: {}",
                        diff(&got, m)
                    );
                }
            }
        }
        ops += 1;
        done.fetch_add(1, Ordering::Relaxed);
    }
    (model, ops)
}

fn stress(opts: MountOptions) {
    let m = Mount::with("stress", opts);
    let done = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel();
    for t in 0..THREADS {
        let (dir, done, tx) = (m.path.clone(), done.clone(), tx.clone());
        std::thread::spawn(move || {
            let _ = tx.send((t, worker(dir, t, 0x9e37_79b9 * (t + 1), done)));
        });
    }
    drop(tx);
    let mut models = vec![Model::new(); THREADS as usize];
    let mut total = 0;
    let mut last = (0, Instant::now());
    for _ in 0..THREADS {
        let (t, (model, ops)) = loop {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(r) => break r,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let now = done.load(Ordering::Relaxed);
                    if now != last.0 {
                        last = (now, Instant::now());
                    }
                    assert!(
                        last.1.elapsed() < STALL,
                        "no operation finished for {STALL:?}: deadlock after {now} operations"
                    );
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!("a worker panicked"),
            }
        };
        models[t as usize] = model;
        total += ops;
    }
    flush_ok(&m.path);
    let b = m.bucket();
    let mut files = 0;
    for (t, model) in models.iter().enumerate() {
        for (name, want) in model {
            if name == "shared" {
                let region = t as u64 * REGION..(t as u64 + 1) * REGION;
                let body = b.get("shared").unwrap();
                assert!(
                    body[region.start as usize..region.end as usize] == want[..],
                    "thread {t}'s region of the shared file"
                );
                continue;
            }
            assert!(
                fs::read(m.p(name)).unwrap() == *want,
                "{name} through the mount"
            );
            assert!(
                b.get(name).as_deref() == Some(&want[..]),
                "{name} in the bucket"
            );
            files += 1;
        }
        for k in 0..4 {
            let name = format!("t{t}-f{k}");
            if !model.contains_key(&name) {
                assert!(!m.p(&name).exists(), "{name} was removed");
                assert!(b.get(&name).is_none(), "{name} is not in the bucket");
            }
        }
    }
    eprintln!("{total} operations by {THREADS} threads; {files} files verified");
}

#[test]
fn concurrent_writers_and_readers_match_the_model() {
    stress(MountOptions::default());
}

#[test]
fn concurrent_writers_and_readers_match_the_model_in_write_back_mode() {
    stress(MountOptions {
        extra: vec!["--write-back".into()],
        ..Default::default()
    });
}
