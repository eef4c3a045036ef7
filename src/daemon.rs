//! Running in the background: detaching from the terminal with a readiness pipe, the pid
//! file `s3bridge unmount` waits on, systemd's notification socket, and the descriptor
//! limit.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tracing::warn;

use s3bridge::control;

/// Environment variable through which a daemonizing parent hands its child the write end of
/// the readiness pipe.
pub(crate) const READY_FD_ENV: &str = "S3BRIDGE_READY_FD";

/// Tells systemd (a `Type=notify` service) about the mount's state, if it is listening: one
/// datagram to `$NOTIFY_SOCKET` (a path, or an abstract name after `@`). Best effort.
pub(crate) fn notify_systemd(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = target.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(&target),
    };
    let sent = addr.and_then(|addr| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr));
    if let Err(e) = sent {
        warn!("cannot notify systemd at {}: {e}", target.to_string_lossy());
    }
}

/// Raises the soft limit on open files to the hard limit (at most 65,536): the block cache
/// keeps a quarter of it open for fast random reads, and the default soft limit of 1,024
/// would leave it 256 files, a 256 MiB working set.
pub(crate) fn raise_descriptor_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max.min(65_536).max(lim.rlim_cur);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Records the daemon's pid under a name derived from the mount point, so that
/// `s3bridge unmount` can wait for the daemon to finish; removed when the daemon ends.
pub(crate) struct PidFile(Option<PathBuf>);

impl PidFile {
    pub(crate) fn path(mountpoint: &Path) -> PathBuf {
        control::runtime_path(mountpoint, "pid")
    }

    pub(crate) fn create(mountpoint: &Path) -> PidFile {
        let path = Self::path(mountpoint);
        let written = control::create_runtime_dir(&path).is_ok()
            && std::fs::write(&path, std::process::id().to_string()).is_ok();
        if !written {
            warn!(
                "cannot write {}: `s3bridge unmount` will not wait for this process",
                path.display()
            );
        }
        PidFile(written.then_some(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Whether process `pid` is a running s3bridge (not gone, not a zombie).
pub(crate) fn daemon_running(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    matches!(state, Some(Some(c)) if c != 'Z' && c != 'X')
        && String::from_utf8_lossy(&cmdline).contains("s3bridge")
}

/// Starts this same command in the background and returns once the mount is ready, or with
/// the child's error line.
pub(crate) fn daemonize() -> Result<(), String> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two fds we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: both fds were just created.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let child_fd = write_end.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .env(READY_FD_ENV, child_fd.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            // Keep the write end open across exec.
            let flags = libc::fcntl(child_fd, libc::F_GETFD);
            libc::fcntl(child_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start the background process: {e}"))?;
    drop(write_end);
    let mut answer = String::new();
    let _ = std::fs::File::from(read_end).read_to_string(&mut answer);
    let first = answer.lines().next().unwrap_or("").trim().to_string();
    if first == "ok" {
        return Ok(());
    }
    let _ = child.wait();
    if first.is_empty() {
        Err("the background process exited before the mount was ready (see its log in the cache directory)".into())
    } else {
        Err(first)
    }
}
