//! `s3bridge warm PATH`: loads files of a mount into its block cache ahead of use (a photo
//! library before a slideshow, a dataset before a job), so that later reads are local.
//!
//! It reads every file under PATH through the mount, front to back: the mount's sequential
//! read-ahead fetches each file in parallel ranged GETs and stores the blocks, exactly as any
//! reader would. The pages are dropped from the kernel's page cache as they are read
//! (`POSIX_FADV_DONTNEED`), so warming a large tree does not push other data out of memory.
//! Progress is a bar on a terminal (indicatif) and one line per file otherwise.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};

/// Size of each read: one cache block, one FUSE request.
const CHUNK: usize = 1 << 20;

/// Regular files under `root` (or `root` itself), with their sizes, without following
/// symlinks.
fn files_under(root: &Path) -> Result<Vec<(PathBuf, u64)>, String> {
    let mut out = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(p) = pending.pop() {
        let md = std::fs::symlink_metadata(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        if md.is_dir() {
            let entries = std::fs::read_dir(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            for e in entries {
                pending.push(e.map_err(|e| format!("{}: {e}", p.display()))?.path());
            }
        } else if md.is_file() {
            out.push((p, md.len()));
        }
    }
    out.sort();
    Ok(out)
}

/// Reads every file under `root`; returns (files, bytes) read. Files that cannot be read
/// are reported and skipped; the error lists them at the end.
pub fn warm(root: &Path, terminal: bool) -> Result<(usize, u64), String> {
    let files = files_under(root)?;
    let total: u64 = files.iter().map(|(_, len)| len).sum();
    let bar = if terminal {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {wide_msg}",
            )
            .expect("a valid template"),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let (mut read_bytes, mut failed) = (0u64, Vec::new());
    let mut buf = vec![0u8; CHUNK];
    for (path, _) in &files {
        bar.set_message(path.display().to_string());
        match read_through(path, &mut buf, |n| bar.inc(n)) {
            Ok(n) => {
                read_bytes += n;
                if !terminal {
                    println!("warmed {} ({n} bytes)", path.display());
                }
            }
            Err(e) => {
                bar.suspend(|| eprintln!("s3bridge: {}: {e}", path.display()));
                failed.push(path.display().to_string());
            }
        }
    }
    bar.finish_and_clear();
    if failed.is_empty() {
        Ok((files.len(), read_bytes))
    } else {
        Err(format!(
            "{} files could not be read: {}",
            failed.len(),
            failed.join(", ")
        ))
    }
}

/// Reads `path` to its end, telling `progress` each chunk's size; returns the bytes read.
fn read_through(path: &Path, buf: &mut [u8], progress: impl Fn(u64)) -> std::io::Result<u64> {
    let mut f = File::open(path)?;
    let mut done = 0u64;
    loop {
        let n = f.read(buf)?;
        if n == 0 {
            break;
        }
        // SAFETY: advice on a range of an fd we own; failure only means pages stay cached.
        unsafe {
            libc::posix_fadvise(
                f.as_raw_fd(),
                done as i64,
                n as i64,
                libc::POSIX_FADV_DONTNEED,
            );
        }
        done += n as u64;
        progress(n as u64);
    }
    Ok(done)
}
