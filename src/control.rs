//! The control socket: how `s3bridge flush` and `s3bridge status` talk to the process serving
//! a mount.
//!
//! Each mount listens on a Unix socket named after a hash of its mount point, in a runtime
//! directory only its user can enter (`/run/s3bridge` for root, `$XDG_RUNTIME_DIR/s3bridge`
//! otherwise), next to the pid file that `s3bridge unmount` waits on. The protocol is one
//! request line and answer lines, so it can be driven with `socat` too:
//!
//! - `status`: one line of JSON (see [`crate::fs::Status`]).
//! - `flush`: uploads everything pending now; while it runs, `pending FILES BYTES` every half
//!   second; at the end `done`, or `failed FILES` when some files could not be uploaded (they
//!   stay queued and are retried).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tracing::{debug, warn};

use crate::fs::Fs;

/// How often a running flush reports what is left.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Path of a per-mount runtime file (`ext`: "pid", "sock") for `mountpoint` (canonical).
pub fn runtime_path(mountpoint: &Path, ext: &str) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    let base = if uid == 0 {
        PathBuf::from("/run/s3bridge")
    } else {
        std::env::var_os("XDG_RUNTIME_DIR")
            .map(|d| PathBuf::from(d).join("s3bridge"))
            .unwrap_or_else(|| PathBuf::from(format!("/tmp/s3bridge-{uid}")))
    };
    let id = blake3::hash(mountpoint.as_os_str().as_bytes()).to_hex();
    base.join(format!("{}.{ext}", &id[..16]))
}

/// Creates the runtime directory of `path` (0700) if needed.
pub fn create_runtime_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir),
        None => Ok(()),
    }
}

/// The listening control socket of a mount; the socket file is removed when it is dropped.
pub struct ControlSocket {
    path: PathBuf,
}

impl ControlSocket {
    /// Listens for `mountpoint` and serves requests on the current tokio runtime for as long
    /// as `fs` lives.
    pub fn listen(mountpoint: &Path, fs: Weak<Fs>) -> std::io::Result<ControlSocket> {
        let path = runtime_path(mountpoint, "sock");
        create_runtime_dir(&path)?;
        // A socket left by a process that died: nobody listens there any more.
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)?;
        tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let fs = fs.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(conn, fs).await {
                        debug!("control connection ended: {e}");
                    }
                });
            }
        });
        Ok(ControlSocket { path })
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn answer(conn: tokio::net::UnixStream, fs: Weak<Fs>) -> std::io::Result<()> {
    let (read, mut write) = conn.into_split();
    let mut line = String::new();
    tokio::io::BufReader::new(read).read_line(&mut line).await?;
    let Some(fs) = fs.upgrade() else {
        return write.write_all(b"error the mount is shutting down\n").await;
    };
    match line.trim() {
        "flush" => {
            let flush = fs.flush_all();
            tokio::pin!(flush);
            let mut tick = tokio::time::interval(PROGRESS_EVERY);
            let failed = loop {
                tokio::select! {
                    failed = &mut flush => break failed,
                    _ = tick.tick() => {
                        let (files, bytes) = fs.pending_uploads();
                        write.write_all(format!("pending {files} {bytes}\n").as_bytes()).await?;
                    }
                }
            };
            if failed == 0 {
                write.write_all(b"done\n").await
            } else {
                warn!(failed, "flush requested: files still not uploaded");
                write
                    .write_all(format!("failed {failed}\n").as_bytes())
                    .await
            }
        }
        "status" => {
            let line = fs.status().to_json().to_string() + "\n";
            write.write_all(line.as_bytes()).await
        }
        other => {
            write
                .write_all(format!("error unknown request {other:?}\n").as_bytes())
                .await
        }
    }
}

/// `s3bridge status MOUNTPOINT`: the mount's activity, as JSON (`json`) or for people.
pub fn status(mountpoint: &Path, json: bool) -> Result<String, String> {
    let (canonical, mut conn) = connect(mountpoint)?;
    conn.write_all(b"status\n")
        .map_err(|e| format!("control socket: {e}"))?;
    let mut line = String::new();
    BufReader::new(conn)
        .read_line(&mut line)
        .map_err(|e| format!("control socket: {e}"))?;
    let v: serde_json::Value = serde_json::from_str(line.trim())
        .map_err(|_| format!("unexpected answer from the mount: {}", line.trim()))?;
    if json {
        return Ok(v.to_string());
    }
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    let mib = |k: &str| n(k) as f64 / (1 << 20) as f64;
    let hit_rate = v["cache_hit_rate"]
        .as_f64()
        .map_or("-".to_string(), |r| format!("{:.1}%", r * 100.0));
    Ok(format!(
        "{}\n  uptime            {}\n  pending uploads   {} files, {:.1} MiB\n  \
         uploading now     {} files\n  block cache       {:.1} MiB in {} blocks, hit rate {}\n  \
         S3 requests       {} ({} failed)",
        canonical.display(),
        human_duration(n("uptime_secs")),
        n("pending_files"),
        mib("pending_bytes"),
        n("uploads_in_flight"),
        mib("cache_bytes"),
        n("cache_blocks"),
        hit_rate,
        n("s3_requests"),
        n("s3_errors"),
    ))
}

fn human_duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m {}s", secs / 60, secs % 60),
        _ => format!("{}h {}m", secs / 3600, secs / 60 % 60),
    }
}

/// Connects to the control socket of the mount at `mountpoint`.
fn connect(mountpoint: &Path) -> Result<(PathBuf, UnixStream), String> {
    let canonical = mountpoint
        .canonicalize()
        .map_err(|e| format!("{}: {e}", mountpoint.display()))?;
    let path = runtime_path(&canonical, "sock");
    let conn = UnixStream::connect(&path).map_err(|e| {
        format!(
            "no s3bridge serves {} (control socket {}: {e}); is it mounted, by this user?",
            canonical.display(),
            path.display()
        )
    })?;
    Ok((canonical, conn))
}

/// `s3bridge flush MOUNTPOINT`: asks the mount to upload everything pending and waits,
/// showing progress on `progress` (a terminal gets one updating line).
pub fn flush(mountpoint: &Path, progress: &mut dyn Write, terminal: bool) -> Result<(), String> {
    let (_, mut conn) = connect(mountpoint)?;
    conn.write_all(b"flush\n")
        .map_err(|e| format!("control socket: {e}"))?;
    let mut shown = false;
    for line in BufReader::new(conn).lines() {
        let line = line.map_err(|e| format!("control socket: {e}"))?;
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("pending"), Some(files), Some(bytes)) => {
                let mib = bytes.parse::<u64>().unwrap_or(0) as f64 / (1 << 20) as f64;
                let text = format!("uploading: {files} files ({mib:.1} MiB) left");
                if terminal {
                    let _ = write!(progress, "\r\x1b[K{text}");
                    shown = true;
                } else {
                    let _ = writeln!(progress, "{text}");
                }
                let _ = progress.flush();
            }
            (Some("done"), _, _) => {
                if shown {
                    let _ = writeln!(progress, "\r\x1b[Kall uploads done");
                }
                return Ok(());
            }
            (Some("failed"), Some(files), _) => {
                if shown {
                    let _ = writeln!(progress);
                }
                return Err(format!(
                    "{files} files could not be uploaded yet (see the mount's log); they stay \
                     queued and are retried"
                ));
            }
            _ => return Err(format!("unexpected answer from the mount: {line}")),
        }
    }
    Err("the mount closed the control connection before the flush ended".into())
}
