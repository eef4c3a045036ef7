//! Concurrency stress through a real mount: threads write, truncate, rename, unlink and
//! read their own files and shared ones at the same time, for a bounded time, and every
//! byte is checked against a model — through the mount while it runs, in the bucket after.
//! Meanwhile one more thread moves a directory round three places (two parents), and the
//! workers write, chmod, rename and read their files inside it as it moves: each file must
//! end with its bytes and its mode at the directory's last place, and nothing under the
//! others. A watchdog fails the test if the workload stops making progress (a deadlock).

mod common;

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, PermissionsExt};
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

/// What one thread believes its files in the moving directory hold, and their modes.
type MovingModel = HashMap<String, (Vec<u8>, u32)>;

/// The places the moving directory goes round, one after the other.
const PLACES: [&str; 3] = ["box", "shelf/box", "box2"];

/// Runs `op` on `name` in the moving directory, wherever it is now: a path that names a
/// place the directory has just left fails with ENOENT, and the next place is tried.
fn in_moving_dir<T>(root: &Path, name: &str, op: impl Fn(&Path) -> std::io::Result<T>) -> T {
    for _ in 0..1000 {
        for place in PLACES {
            match op(&root.join(place).join(name)) {
                Ok(v) => return v,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => panic!("{place}/{name}: {e}"),
            }
        }
    }
    panic!("{name} is in none of {PLACES:?}");
}

/// Moves the directory round [`PLACES`] until `RUN_FOR` is over; returns where it is and
/// how many moves were made.
fn mover(root: PathBuf, done: Arc<AtomicU64>) -> (usize, u64) {
    let started = Instant::now();
    let (mut at, mut moves) = (0, 0);
    while started.elapsed() < RUN_FOR {
        let next = (at + 1) % PLACES.len();
        fs::rename(root.join(PLACES[at]), root.join(PLACES[next])).unwrap();
        at = next;
        moves += 1;
        done.fetch_add(1, Ordering::Relaxed);
    }
    (at, moves)
}

/// One operation on this thread's files in the moving directory.
fn in_moving_op(root: &Path, t: u64, rng: &mut Rng, model: &mut MovingModel) {
    let name = format!("t{t}-m{}", rng.below(3));
    match rng.below(4) {
        0 => {
            let off = rng.below(200_000);
            let data = pattern(1 + rng.below(100_000) as usize, rng.below(u64::MAX));
            in_moving_dir(root, &name, |p| {
                let f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(p)?;
                f.write_all_at(&data, off)?;
                write_and_close(f, b"")
            });
            let (m, _) = model.entry(name).or_insert((Vec::new(), 0o644));
            let end = off as usize + data.len();
            if m.len() < end {
                m.resize(end, 0);
            }
            m[off as usize..end].copy_from_slice(&data);
        }
        1 => {
            if let Some((_, mode)) = model.get_mut(&name) {
                let new = [0o600, 0o640, 0o644, 0o664][rng.below(4) as usize];
                in_moving_dir(root, &name, |p| {
                    fs::set_permissions(p, fs::Permissions::from_mode(new))
                });
                *mode = new;
            }
        }
        2 => {
            let to = format!("t{t}-m{}", rng.below(3));
            if to != name
                && let Some(entry) = model.remove(&name)
            {
                in_moving_dir(root, &name, |p| fs::rename(p, p.with_file_name(&to)));
                model.insert(to, entry);
            }
        }
        _ => {
            if let Some((want, mode)) = model.get(&name) {
                let (got, got_mode) = in_moving_dir(root, &name, |p| {
                    let got = fs::read(p)?;
                    Ok((got, fs::metadata(p)?.permissions().mode() & 0o7777))
                });
                assert!(
                    got == *want,
                    "{name} read back while moving: {}",
                    diff(&got, want)
                );
                assert_eq!(got_mode, *mode, "{name}'s mode while moving");
            }
        }
    }
}

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

/// One thread's workload; returns its models and the operations it made.
fn worker(dir: PathBuf, t: u64, seed: u64, done: Arc<AtomicU64>) -> (Model, MovingModel, u64) {
    let mut rng = Rng(seed | 1);
    let mut model: Model = HashMap::new();
    let mut moving = MovingModel::new();
    let shared = dir.join("shared");
    let started = Instant::now();
    let mut ops = 0;
    while started.elapsed() < RUN_FOR {
        let name = format!("t{t}-f{}", rng.below(4));
        let path = dir.join(&name);
        match rng.below(13) {
            10..=12 => in_moving_op(&dir, t, &mut rng, &mut moving),
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
    (model, moving, ops)
}

fn stress(opts: MountOptions) {
    let m = Mount::with("stress", opts);
    fs::create_dir(m.p(PLACES[0])).unwrap();
    fs::create_dir(m.p("shelf")).unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let moves = {
        let (root, done) = (m.path.clone(), done.clone());
        std::thread::spawn(move || mover(root, done))
    };
    let (tx, rx) = mpsc::channel();
    for t in 0..THREADS {
        let (dir, done, tx) = (m.path.clone(), done.clone(), tx.clone());
        std::thread::spawn(move || {
            let _ = tx.send((t, worker(dir, t, 0x9e37_79b9 * (t + 1), done)));
        });
    }
    drop(tx);
    let mut models = vec![Model::new(); THREADS as usize];
    let mut moving_models = vec![MovingModel::new(); THREADS as usize];
    let mut total = 0;
    let mut last = (0, Instant::now());
    for _ in 0..THREADS {
        let (t, (model, moving, ops)) = loop {
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
        moving_models[t as usize] = moving;
        total += ops;
    }
    let (at, moved) = moves.join().expect("the mover panicked");
    flush_ok(&m.path);
    let b = m.bucket();
    let mut files = 0;
    let place = PLACES[at];
    for (t, model) in moving_models.iter().enumerate() {
        for (name, (want, mode)) in model {
            let rel = format!("{place}/{name}");
            assert!(
                fs::read(m.p(&rel)).unwrap() == *want,
                "{rel} through the mount"
            );
            let shown = fs::metadata(m.p(&rel)).unwrap().permissions().mode() & 0o7777;
            assert_eq!(shown, *mode, "{rel}'s mode through the mount");
            assert!(
                b.get(&rel).as_deref() == Some(&want[..]),
                "{rel} in the bucket"
            );
            let (meta, _) = b.head(&rel).unwrap();
            let stored = meta["mode"].parse::<u32>().unwrap() & 0o7777;
            assert_eq!(stored, *mode, "{rel}'s mode in the bucket");
            files += 1;
        }
        for k in 0..3 {
            let name = format!("t{t}-m{k}");
            if !model.contains_key(&name) {
                assert!(
                    !m.p(&format!("{place}/{name}")).exists(),
                    "{name} was renamed away"
                );
            }
        }
    }
    let left: Vec<String> = b
        .keys()
        .into_iter()
        .filter(|k| {
            PLACES.iter().any(|p| k.starts_with(&format!("{p}/")))
                && !k.starts_with(&format!("{place}/"))
        })
        .collect();
    assert!(
        left.is_empty(),
        "objects left behind by the moves: {left:?}"
    );
    let in_place: Vec<String> = b
        .keys()
        .into_iter()
        .filter_map(|k| k.strip_prefix(&format!("{place}/")).map(str::to_string))
        .filter(|k| !k.is_empty())
        .collect();
    let modeled: usize = moving_models.iter().map(HashMap::len).sum();
    assert_eq!(
        in_place.len(),
        modeled,
        "one object per file in {place}: {in_place:?}"
    );
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
    eprintln!(
        "{total} operations by {THREADS} threads and {moved} directory moves; {files} files verified"
    );
}

#[test]
fn concurrent_writers_and_readers_match_the_model() {
    stress(MountOptions::default());
}

/// Also with one thread reading the kernel's requests (`--fuse-threads 1`; two by default,
/// so that requests of one file and of a moving directory are also taken up in parallel).
#[test]
fn concurrent_writers_and_readers_match_the_model_in_write_back_mode_on_one_request_thread() {
    stress(MountOptions {
        extra: vec!["--write-back".into(), "--fuse-threads".into(), "1".into()],
        ..Default::default()
    });
}
