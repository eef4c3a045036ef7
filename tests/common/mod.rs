//! Harness of the end-to-end tests: a real S3 server (Garage, started by `tests/run.sh`),
//! real FUSE mounts of the `s3bridge` binary, and an independent S3 client (aws-sdk-s3) to
//! check what the bucket holds.
//!
//! Each test mounts its own prefix of the bucket, so tests run in parallel without seeing
//! each other. Mounts are unmounted and their daemons stopped when dropped, even when the
//! test fails.

#![allow(dead_code)]

pub mod fault_proxy;
pub mod s3fs;

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::primitives::ByteStream;

/// Where the test server is, from the environment `tests/run.sh` sets up.
#[derive(Debug, Clone)]
pub struct Server {
    pub endpoint: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
}

impl Server {
    /// The server `tests/run.sh` started (or that the caller set up with
    /// `tests/support/garage.sh start DIR`).
    pub fn from_env() -> Server {
        let get = |k: &str| {
            std::env::var(k).unwrap_or_else(|_| {
                panic!(
                    "{k} is not set: run the end-to-end tests with tests/run.sh, which starts \
                     a Garage server, or export the output of `tests/support/garage.sh start DIR`"
                )
            })
        };
        Server {
            endpoint: get("S3BRIDGE_TEST_ENDPOINT"),
            bucket: get("S3BRIDGE_TEST_BUCKET"),
            access_key: get("AWS_ACCESS_KEY_ID"),
            secret_key: get("AWS_SECRET_ACCESS_KEY"),
        }
    }
}

impl Server {
    /// The moto server `tests/run.sh` started (`tests/support/moto.sh start DIR`): the one
    /// with conditional writes.
    pub fn moto() -> Server {
        let get = |k: &str| {
            std::env::var(k).unwrap_or_else(|_| {
                panic!("{k} is not set: run the tests with tests/run.sh, which starts moto")
            })
        };
        Server {
            endpoint: get("S3BRIDGE_MOTO_ENDPOINT"),
            bucket: get("S3BRIDGE_MOTO_BUCKET"),
            access_key: "test".into(),
            secret_key: "test".into(),
        }
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, for prefixes and directories.
pub fn unique(name: &str) -> String {
    format!(
        "{name}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Root of the tests' scratch space (mount points, cache dirs).
pub fn scratch() -> PathBuf {
    let dir = std::env::var_os("S3BRIDGE_TEST_SCRATCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("s3bridge-tests"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The s3bridge binary under test.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_s3bridge"))
}

/// A view of one prefix of the bucket through an independent S3 client.
pub struct Bucket {
    rt: tokio::runtime::Runtime,
    client: Client,
    pub name: String,
    pub prefix: String,
}

impl Bucket {
    pub fn new(server: &Server, prefix: &str) -> Bucket {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let conf = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(&server.endpoint)
            .force_path_style(true)
            .credentials_provider(Credentials::new(
                &server.access_key,
                &server.secret_key,
                None,
                None,
                "test",
            ))
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        Bucket {
            rt,
            client: Client::from_conf(conf),
            name: server.bucket.clone(),
            prefix: prefix.to_string(),
        }
    }

    fn key(&self, rel: &str) -> String {
        format!("{}{rel}", self.prefix)
    }

    /// The body of `rel` (relative to the prefix), or `None`.
    pub fn get(&self, rel: &str) -> Option<Vec<u8>> {
        let key = self.key(rel);
        self.rt.block_on(async {
            match self
                .client
                .get_object()
                .bucket(&self.name)
                .key(&key)
                .send()
                .await
            {
                Ok(o) => Some(o.body.collect().await.unwrap().into_bytes().to_vec()),
                Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => None,
                Err(e) => panic!("GET {key}: {e:?}"),
            }
        })
    }

    /// The `x-amz-meta-*` headers and content type of `rel`, or `None`.
    pub fn head(&self, rel: &str) -> Option<(HashMap<String, String>, Option<String>)> {
        let key = self.key(rel);
        self.rt.block_on(async {
            match self
                .client
                .head_object()
                .bucket(&self.name)
                .key(&key)
                .send()
                .await
            {
                Ok(o) => Some((
                    o.metadata().cloned().unwrap_or_default(),
                    o.content_type().map(str::to_string),
                )),
                Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => None,
                Err(e) => panic!("HEAD {key}: {e:?}"),
            }
        })
    }

    /// Writes `rel` with `body` and the given user metadata, as another S3 client would.
    pub fn put(&self, rel: &str, body: &[u8], meta: &[(&str, &str)]) {
        let key = self.key(rel);
        self.rt.block_on(async {
            let mut req = self
                .client
                .put_object()
                .bucket(&self.name)
                .key(&key)
                .body(ByteStream::from(body.to_vec()));
            for (k, v) in meta {
                req = req.metadata(*k, *v);
            }
            req.send()
                .await
                .unwrap_or_else(|e| panic!("PUT {key}: {e:?}"));
        })
    }

    /// Writes many objects with the same body, 64 at a time.
    pub fn put_many(&self, rels: Vec<String>, body: &[u8]) {
        use futures::stream::{self, StreamExt};
        let body = bytes::Bytes::copy_from_slice(body);
        self.rt.block_on(async {
            stream::iter(rels)
                .map(|rel| {
                    let key = self.key(&rel);
                    let body = body.clone();
                    async move {
                        self.client
                            .put_object()
                            .bucket(&self.name)
                            .key(&key)
                            .body(ByteStream::from(body))
                            .send()
                            .await
                            .unwrap_or_else(|e| panic!("PUT {key}: {e:?}"));
                    }
                })
                .buffer_unordered(64)
                .collect::<Vec<()>>()
                .await;
        })
    }

    /// Deletes `rel`.
    pub fn delete(&self, rel: &str) {
        let key = self.key(rel);
        self.rt.block_on(async {
            self.client
                .delete_object()
                .bucket(&self.name)
                .key(&key)
                .send()
                .await
                .unwrap_or_else(|e| panic!("DELETE {key}: {e:?}"));
        })
    }

    /// All keys under the prefix (relative to it), sorted.
    pub fn keys(&self) -> Vec<String> {
        self.rt.block_on(async {
            let mut keys = Vec::new();
            let mut token = None;
            loop {
                let out = self
                    .client
                    .list_objects_v2()
                    .bucket(&self.name)
                    .prefix(&self.prefix)
                    .set_continuation_token(token)
                    .send()
                    .await
                    .unwrap();
                keys.extend(
                    out.contents()
                        .iter()
                        .filter_map(|o| o.key())
                        .map(|k| k[self.prefix.len()..].to_string()),
                );
                match out.next_continuation_token() {
                    Some(t) if out.is_truncated() == Some(true) => token = Some(t.to_string()),
                    _ => break,
                }
            }
            keys.sort();
            keys
        })
    }

    /// Multipart uploads under the prefix that were neither completed nor aborted.
    pub fn pending_uploads(&self) -> usize {
        self.rt.block_on(async {
            self.client
                .list_multipart_uploads()
                .bucket(&self.name)
                .prefix(&self.prefix)
                .send()
                .await
                .map(|o| o.uploads().len())
                .unwrap_or(0)
        })
    }
}

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// `--metadata-ttl`.
    pub ttl: String,
    /// More arguments for `s3bridge mount`.
    pub extra: Vec<String>,
    /// Cache directory; a fresh one when `None`.
    pub cache_dir: Option<PathBuf>,
    /// Endpoint to mount through (a fault proxy); the test server's when `None`.
    pub endpoint: Option<String>,
    /// `RUST_LOG` of the daemon; `S3BRIDGE_TEST_LOG` or `s3bridge=info` when `None`.
    pub rust_log: Option<String>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            ttl: "5".into(),
            extra: Vec::new(),
            cache_dir: None,
            endpoint: None,
            rust_log: None,
        }
    }
}

impl MountOptions {
    /// A mount laid out as Nextcloud's data directory wants it: other users allowed (the web
    /// server's), objects without headers owned by www-data (33), 0770 and 0660.
    pub fn nextcloud() -> MountOptions {
        let extra = [
            "--allow-other",
            "--uid",
            "33",
            "--gid",
            "33",
            "--dir-mode",
            "0770",
            "--file-mode",
            "0660",
        ];
        MountOptions {
            extra: extra.map(String::from).to_vec(),
            ..MountOptions::default()
        }
    }
}

/// A running mount of one prefix of the test bucket.
pub struct Mount {
    pub server: Server,
    pub prefix: String,
    pub path: PathBuf,
    pub cache_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Mount {
    /// Mounts a fresh prefix named after the test.
    pub fn new(test: &str) -> Mount {
        Mount::with(test, MountOptions::default())
    }

    /// Mounts a fresh prefix with options.
    pub fn with(test: &str, opts: MountOptions) -> Mount {
        let prefix = format!("{}/", unique(test));
        Mount::of_prefix(&prefix, opts)
    }

    /// Mounts `prefix` (ending with `/`) of the test bucket.
    pub fn of_prefix(prefix: &str, opts: MountOptions) -> Mount {
        Mount::on(Server::from_env(), prefix, opts)
    }

    /// Mounts `prefix` (ending with `/`) of `server`'s bucket.
    pub fn on(server: Server, prefix: &str, opts: MountOptions) -> Mount {
        let base = scratch().join(unique("m"));
        let path = base.join("mnt");
        std::fs::create_dir_all(&path).unwrap();
        let cache_dir = opts.cache_dir.clone().unwrap_or_else(|| base.join("cache"));
        let log = base.join("s3bridge.log");
        let mut m = Mount {
            server,
            prefix: prefix.to_string(),
            path,
            cache_dir,
            log,
            child: None,
        };
        m.start(&opts);
        m
    }

    fn start(&mut self, opts: &MountOptions) {
        let log = std::fs::File::create(&self.log).unwrap();
        let mut cmd = Command::new(binary());
        cmd.arg("mount")
            .arg(format!("{}:{}", self.server.bucket, self.prefix))
            .arg(&self.path)
            .arg("--endpoint-url")
            .arg(opts.endpoint.as_ref().unwrap_or(&self.server.endpoint))
            .arg("--cache-dir")
            .arg(&self.cache_dir)
            .arg("--metadata-ttl")
            .arg(&opts.ttl)
            .arg("-f")
            .args(&opts.extra)
            .env("AWS_ACCESS_KEY_ID", &self.server.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &self.server.secret_key)
            .env("AWS_REGION", "us-east-1")
            .env(
                "RUST_LOG",
                opts.rust_log.clone().unwrap_or_else(|| {
                    std::env::var("S3BRIDGE_TEST_LOG").unwrap_or_else(|_| "s3bridge=info".into())
                }),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: prctl is async-signal-safe. If the test thread dies, the daemon unmounts.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("start s3bridge");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_mounted(&self.path) {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "s3bridge exited with {status} before mounting; log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "mount did not appear in 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    /// Path of `rel` inside the mount.
    pub fn p(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// The bucket prefix this mount shows.
    pub fn bucket(&self) -> Bucket {
        Bucket::new(&self.server, &self.prefix)
    }

    /// Unmounts and waits for the daemon to exit (uploads done); returns its log.
    pub fn unmount(&mut self) -> String {
        if let Some(mut child) = self.child.take() {
            if is_mounted(&self.path) {
                let out = Command::new(binary())
                    .arg("unmount")
                    .arg(&self.path)
                    .output()
                    .unwrap();
                if !out.status.success() {
                    let _ = Command::new("umount").arg("-l").arg(&self.path).status();
                }
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Unmounts and mounts the same prefix again with the same cache directory.
    pub fn remount(&mut self, opts: MountOptions) {
        self.unmount();
        self.start(&opts);
    }

    /// Sends `signal` to the daemon and waits (up to `timeout`) for it to exit; whether it did.
    pub fn signal_and_wait(&mut self, signal: i32, timeout: Duration) -> bool {
        let Some(child) = self.child.as_mut() else {
            return true;
        };
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Kills the daemon with SIGKILL (no chance to clean up) and detaches the mount.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let log = self.unmount();
        if std::thread::panicking() {
            eprintln!("---- s3bridge log of {} ----\n{log}", self.path.display());
        }
    }
}

/// Whether `path` is a mount point.
pub fn is_mounted(path: &Path) -> bool {
    mount_entry(path).is_some()
}

/// What the mount table says of the (topmost) mount at `path`.
#[derive(Debug)]
pub struct MountEntry {
    /// What was mounted (`s3bridge:BUCKET`).
    pub source: String,
    /// The filesystem type (`fuse.s3bridge`).
    pub fstype: String,
    /// The options, comma-separated (`ro`/`rw` first).
    pub options: String,
}

/// Reads `/proc/self/mounts` for the mount at `path`.
pub fn mount_entry(path: &Path) -> Option<MountEntry> {
    let want = match path.canonicalize() {
        Ok(p) => p,
        Err(_) => path.to_path_buf(),
    };
    let unescape = |f: &str| f.replace("\\040", " ");
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .rfind(|f| f.len() >= 4 && Path::new(&unescape(f[1])) == want)
        .map(|f| MountEntry {
            source: unescape(f[0]),
            fstype: f[2].to_string(),
            options: f[3].to_string(),
        })
}

/// Runs `script` with bash in `dir`; panics with its output unless it succeeds.
pub fn sh(dir: &Path, script: &str) -> String {
    let out = sh_output(dir, script);
    assert!(
        out.status.success(),
        "script failed ({}):\n{script}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `script` with bash in `dir` and returns its output, whatever its status.
pub fn sh_output(dir: &Path, script: &str) -> Output {
    Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail\n{script}"))
        .current_dir(dir)
        .output()
        .unwrap()
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes `data` to `file` and closes it; the error of any call, `close()` included (std
/// ignores what `close()` returns, and on this filesystem that is where uploads fail).
pub fn write_and_close(mut file: std::fs::File, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::fd::IntoRawFd;
    file.write_all(data)?;
    // SAFETY: the fd is ours, and closed exactly once.
    if unsafe { libc::close(file.into_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Creates (or truncates) `path` with `data`; the error of any call, `close()` included.
pub fn write_checked(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_and_close(std::fs::File::create(path)?, data)
}

/// `s3bridge flush MOUNTPOINT`.
pub fn flush(mount: &Path) -> Output {
    Command::new(binary())
        .arg("flush")
        .arg(mount)
        .output()
        .unwrap()
}

/// `s3bridge flush MOUNTPOINT`, which must succeed.
pub fn flush_ok(mount: &Path) {
    let out = flush(mount);
    assert!(
        out.status.success(),
        "s3bridge flush failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
