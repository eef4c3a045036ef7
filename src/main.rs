//! The `s3bridge` command: mount and unmount.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tracing::{debug, error, info, warn};
use tracing_subscriber::EnvFilter;

use s3bridge::config::{Config, MetadataTtl, parse_source};
use s3bridge::control;
use s3bridge::fs::Fs;
use s3bridge::store::StoreError;
use s3bridge::store::s3::{S3Options, S3Store};

/// Environment variable through which a daemonizing parent hands its child the write end of
/// the readiness pipe.
mod mount_helper;
mod warm;

const READY_FD_ENV: &str = "S3BRIDGE_READY_FD";

#[derive(Parser, Debug)]
#[command(
    name = "s3bridge",
    version,
    about = "Mount an S3 bucket as a POSIX directory",
    long_about = "Mount an S3 bucket (or a prefix of one) as an ordinary directory. Every file \
                  stays a plain S3 object that other S3 clients read and write."
)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand, Debug)]
enum Commands {
    /// Mount BUCKET[:PREFIX] at MOUNTPOINT.
    Mount(Box<MountArgs>),
    /// Unmount a mounted s3bridge; uploads finish first.
    Unmount {
        /// The mount point.
        mountpoint: PathBuf,
    },
    /// Upload everything the mount has pending (write-back) now, and wait until it is in
    /// the bucket.
    Flush {
        /// The mount point.
        mountpoint: PathBuf,
    },
    /// Load files (a file, or a directory's tree) of a mount into its block cache, so that
    /// later reads are local; with a progress bar on a terminal.
    Warm {
        /// A file or directory inside a mount.
        path: PathBuf,
    },
    /// Write the man pages and shell completions into DIR (for packaging).
    #[command(hide = true)]
    Generate {
        /// Output directory; `man/` and `completions/` are created in it.
        dir: PathBuf,
    },
    /// Show a mount's activity: pending and running uploads, block cache, S3 requests.
    Status {
        /// The mount point.
        mountpoint: PathBuf,
        /// One line of JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
}

fn parse_octal(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("'{s}' is not an octal mode like 0644"))
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let mult = match s[i..].to_ascii_lowercase().as_str() {
                "k" | "kib" | "kb" => 1 << 10,
                "m" | "mib" | "mb" => 1 << 20,
                "g" | "gib" | "gb" => 1 << 30,
                other => return Err(format!("unknown size unit '{other}' (use K, M or G)")),
            };
            (&s[..i], mult)
        }
        None => (s, 1),
    };
    num.trim()
        .parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("'{s}' is not a size like 8M"))
}

#[derive(Args, Debug)]
struct MountArgs {
    /// Bucket, optionally with a key prefix: `mybucket` or `mybucket:some/dir/`.
    source: String,
    /// Existing empty directory to mount on.
    mountpoint: PathBuf,
    /// S3 endpoint for S3-compatible servers (MinIO, Garage, Ceph, R2, B2), e.g.
    /// http://127.0.0.1:3900. Without it, AWS.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    endpoint_url: Option<String>,
    /// Region (default: from the AWS configuration, else us-east-1).
    #[arg(long)]
    region: Option<String>,
    /// Path-style addressing; on by default with --endpoint-url, off for AWS.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    force_path_style: Option<bool>,
    /// Directory for the inode database and staged writes (default: a per-mount directory
    /// under /var/cache/s3bridge as root, ~/.cache/s3bridge otherwise).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Owner of objects that carry no uid header (default: the mounting user).
    #[arg(long)]
    uid: Option<u32>,
    /// Group of objects that carry no gid header (default: the mounting user's group).
    #[arg(long)]
    gid: Option<u32>,
    /// Permissions of files that carry no mode header.
    #[arg(long, value_parser = parse_octal, default_value = "0644")]
    file_mode: u32,
    /// Permissions of directories that carry no mode header, and of the mount's root.
    #[arg(long, value_parser = parse_octal, default_value = "0755")]
    dir_mode: u32,
    /// Let users other than the mounting one use the mount (the kernel then enforces modes).
    #[arg(long)]
    allow_other: bool,
    /// Mount read-only.
    #[arg(long)]
    read_only: bool,
    /// Seconds that listings and attributes are trusted before being checked against the
    /// bucket, or `forever` for a bucket only this mount writes.
    #[arg(long, default_value = "5")]
    metadata_ttl: MetadataTtl,
    /// Show files as their listing describes them (size and Last-Modified, with --uid, --gid
    /// and --file-mode) until they are opened, instead of reading each new object's headers
    /// with the listing. Only for buckets that plain S3 clients alone write: objects written
    /// by s3fs or another s3bridge mount (modes, owners, times, symlinks) show wrong until
    /// opened. Saves one HEAD per object the first time a directory is listed.
    #[arg(long)]
    trust_listings: bool,
    /// Accepted for older fstab lines: exact attributes are the default now.
    #[arg(long, hide = true)]
    exact_attributes: bool,
    /// Serve user.* extended attributes, stored as s3fs stores them (s3fs's use_xattr).
    /// Without it the mount has no xattrs (EOPNOTSUPP), which spares `ls -l` two round trips
    /// to the daemon per file.
    #[arg(long)]
    xattr: bool,
    /// Stay in the foreground (otherwise s3bridge returns once the mount is ready).
    #[arg(short, long)]
    foreground: bool,
    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides).
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Log file when running in the background (default: s3bridge.log in the cache dir).
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// Files larger than this are uploaded in parts.
    #[arg(long, value_parser = parse_size, default_value = "16M")]
    multipart_threshold: u64,
    /// Smallest part size of multipart uploads (grows with the file up to S3's limits).
    #[arg(long, value_parser = parse_size, default_value = "8M")]
    part_size: u64,
    /// Parts of one upload sent at once.
    #[arg(long, default_value = "8")]
    upload_concurrency: usize,
    /// close() returns once the data is safe on local disk (synced staging file, committed
    /// journal row) and uploads run in the background; fsync() still waits for the bucket.
    /// Pending uploads survive a crash and are sent by the next mount of the same cache
    /// directory; `s3bridge flush` and unmount wait for them.
    #[arg(long)]
    write_back: bool,
    /// Files uploaded at once in the background (write-back, retries).
    #[arg(long, default_value = "8")]
    background_uploads: usize,
    /// Whether the server honours conditional writes (If-Match / If-None-Match), so that an
    /// upload over another client's change fails by itself; without, a HEAD checks the ETag
    /// first. Default: on for AWS, off with --endpoint-url (Garage ignores those headers).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    conditional_writes: Option<bool>,
    /// Largest read-ahead window of a sequential reader.
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    read_ahead: u64,
    /// Size of each of the concurrent ranged GETs that fill a read-ahead window.
    #[arg(long, value_parser = parse_size, default_value = "8M")]
    read_part_size: u64,
    /// Most disk space the block cache of downloaded data may use; 0 turns it off.
    #[arg(long, value_parser = parse_size, default_value = "10G")]
    cache_size: u64,
    /// Free space the block cache always leaves on the cache directory's filesystem.
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    cache_min_free: u64,
    /// Memory for data in flight (read-ahead windows and upload parts), shared by all files.
    #[arg(long, value_parser = parse_size, default_value = "128M")]
    max_buffer_memory: u64,
    /// Attempts per S3 request before an error is returned.
    #[arg(long, default_value = "5")]
    max_attempts: u32,
    /// Seconds allowed for one attempt of one S3 request.
    #[arg(long, default_value = "60")]
    request_timeout: u64,
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let command = <Cli as clap::CommandFactory>::command();
    let subcommands: Vec<&str> = command
        .get_subcommands()
        .map(|c| c.get_name())
        .chain(["help"])
        .collect();
    let cli = if mount_helper::is_mount_helper(&args, &subcommands) {
        match mount_helper::translate(&args) {
            Ok(mount_helper::Translated { args, env }) => {
                for (k, v) in env {
                    // SAFETY: still single-threaded; nothing reads the environment yet.
                    unsafe { std::env::set_var(k, v) };
                }
                Cli::parse_from(args)
            }
            Err(msg) => {
                eprintln!("s3bridge: {msg}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        Cli::parse()
    };
    let result = match cli.command {
        Commands::Mount(args) => mount(*args),
        Commands::Unmount { mountpoint } => unmount(&mountpoint),
        Commands::Warm { path } => {
            let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
            warm::warm(&path, terminal).map(|(files, bytes)| {
                eprintln!(
                    "warmed {files} files, {:.1} MiB",
                    bytes as f64 / (1 << 20) as f64
                )
            })
        }
        Commands::Generate { dir } => generate(&dir),
        Commands::Status { mountpoint, json } => {
            control::status(&mountpoint, json).map(|text| println!("{text}"))
        }
        Commands::Flush { mountpoint } => {
            let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
            s3bridge::control::flush(&mountpoint, &mut std::io::stderr(), terminal)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("s3bridge: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn default_cache_dir(cfg: &Config) -> PathBuf {
    let id = blake3::hash(
        format!(
            "{}\n{}\n{}",
            cfg.endpoint_url.as_deref().unwrap_or("aws"),
            cfg.bucket,
            cfg.prefix
        )
        .as_bytes(),
    )
    .to_hex();
    let name = format!("{}-{}", cfg.bucket, &id[..16]);
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/cache/s3bridge").join(name);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("s3bridge").join(name)
}

fn build_config(args: &MountArgs) -> Result<Config, String> {
    let (bucket, prefix) = parse_source(&args.source)?;
    let mut cfg = Config {
        bucket,
        prefix,
        endpoint_url: args.endpoint_url.clone().filter(|e| !e.is_empty()),
        region: args.region.clone(),
        file_mode: args.file_mode,
        dir_mode: args.dir_mode,
        allow_other: args.allow_other,
        read_only: args.read_only,
        metadata_ttl: args.metadata_ttl,
        multipart_threshold: args.multipart_threshold,
        part_size: args.part_size,
        upload_concurrency: args.upload_concurrency.max(1),
        write_back: args.write_back,
        background_uploads: args.background_uploads.max(1),
        read_ahead_max: args.read_ahead,
        read_part_size: args.read_part_size.max(1),
        trust_listings: args.trust_listings,
        xattrs: args.xattr,
        cache_size: args.cache_size,
        cache_min_free: args.cache_min_free,
        max_buffer_memory: args.max_buffer_memory,
        max_attempts: args.max_attempts.max(1),
        request_timeout: Duration::from_secs(args.request_timeout.max(1)),
        ..Config::default()
    };
    cfg.force_path_style = args.force_path_style.unwrap_or(cfg.endpoint_url.is_some());
    cfg.conditional_writes = args
        .conditional_writes
        .unwrap_or(cfg.endpoint_url.is_none());
    if let Some(uid) = args.uid {
        cfg.uid = uid;
    }
    if let Some(gid) = args.gid {
        cfg.gid = gid;
    }
    cfg.cache_dir = match &args.cache_dir {
        Some(d) => d.clone(),
        None => default_cache_dir(&cfg),
    };
    Ok(cfg)
}

/// Fails unless `mountpoint` is an existing directory that nothing is mounted on.
fn check_mountpoint(mountpoint: &Path) -> Result<PathBuf, String> {
    let meta = std::fs::metadata(mountpoint).map_err(|e| {
        format!(
            "mount point {}: {e}; create it first (mkdir -p {})",
            mountpoint.display(),
            mountpoint.display()
        )
    })?;
    if !meta.is_dir() {
        return Err(format!(
            "mount point {} is not a directory",
            mountpoint.display()
        ));
    }
    let canonical = mountpoint
        .canonicalize()
        .map_err(|e| format!("mount point {}: {e}", mountpoint.display()))?;
    if is_mount_point(&canonical) {
        return Err(format!(
            "{} is already a mount point; unmount it first (s3bridge unmount {})",
            canonical.display(),
            canonical.display()
        ));
    }
    Ok(canonical)
}

/// Whether `path` is a mount point in /proc/self/mountinfo.
fn is_mount_point(path: &Path) -> bool {
    mount_device(path).is_some()
}

/// The device (`MAJ:MIN`) mounted at `path`, from /proc/self/mountinfo (the latest mount).
fn mount_device(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.to_string_lossy();
    info.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        (unescape_mountinfo(fields.get(4)?) == want)
            .then(|| fields.get(2).map(|d| d.to_string()))?
    })
}

fn unescape_mountinfo(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn init_logging(level: &str, file: Option<&Path>) -> Result<(), String> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("warn,s3bridge={level},fuser=error")));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match file {
        Some(path) => {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("log file {}: {e}", path.display()))?;
            builder.with_ansi(false).with_writer(Arc::new(f)).init();
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
    Ok(())
}

/// Explains a failed access check in one line, with what to do about it.
fn explain_preflight(cfg: &Config, err: StoreError) -> String {
    let endpoint = cfg.endpoint_url.as_deref().unwrap_or("AWS S3");
    match err {
        StoreError::NoSuchBucket(_) => format!(
            "bucket '{}' does not exist at {endpoint}; create it or check the name",
            cfg.bucket
        ),
        StoreError::AccessDenied(msg) => format!(
            "{endpoint} refused access to bucket '{}': {msg}; check the credentials \
             (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE) and the bucket policy",
            cfg.bucket
        ),
        StoreError::Unavailable(msg) => format!(
            "cannot reach {endpoint}: {msg}; check --endpoint-url and that the server is up"
        ),
        other => format!("cannot use bucket '{}' at {endpoint}: {other}", cfg.bucket),
    }
}

fn s3_options(cfg: &Config) -> S3Options {
    S3Options {
        bucket: cfg.bucket.clone(),
        endpoint_url: cfg.endpoint_url.clone(),
        region: cfg.region.clone(),
        force_path_style: cfg.force_path_style,
        max_attempts: cfg.max_attempts,
        connect_timeout: cfg.connect_timeout,
        attempt_timeout: cfg.request_timeout,
    }
}

fn mount(args: MountArgs) -> Result<(), String> {
    let cfg = build_config(&args)?;
    let mountpoint = check_mountpoint(&args.mountpoint)?;
    let ready_fd = std::env::var(READY_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok());
    if !args.foreground && ready_fd.is_none() {
        return daemonize();
    }
    // SAFETY: the fd was created for us by the parent and is ours alone.
    let mut ready = ready_fd.map(|fd| std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }));
    let result = serve(&args, cfg, &mountpoint, &mut ready);
    if let (Err(msg), Some(pipe)) = (&result, ready.as_mut()) {
        let _ = writeln!(pipe, "{msg}");
    }
    result
}

/// Runs the mount until it is unmounted. `ready` is told "ok" once requests are served.
fn serve(
    args: &MountArgs,
    cfg: Config,
    mountpoint: &Path,
    ready: &mut Option<std::fs::File>,
) -> Result<(), String> {
    raise_descriptor_limit();
    // Everything the daemon creates on local disk (cache, staging, database, log, control
    // socket) is its user's alone, whatever the caller's umask. Files created through the
    // mount are not affected: their modes come with each request.
    // SAFETY: umask cannot fail.
    unsafe {
        libc::umask(0o077);
    }
    // Upload parts are megabytes each. glibc raises its mmap threshold after such buffers
    // are freed and then keeps them in per-thread heaps, which inflated peak RSS by ~200 MiB
    // in a 1 GiB copy; a fixed threshold hands them back to the kernel on free. It sits just
    // above one cache block (1 MiB), so the blocks of reads, allocated and freed by the
    // thousand, are reused from the heap instead of being mapped and page-faulted afresh
    // (that cost ~15% of the daemon's CPU in a cold read).
    // SAFETY: mallopt only changes allocator tuning; it is called before any other thread.
    unsafe {
        libc::mallopt(
            libc::M_MMAP_THRESHOLD,
            (s3bridge::cache::BLOCK_SIZE + 64 * 1024) as i32,
        );
    }
    // Private: it holds staged file contents and the names of everything in the bucket.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cfg.cache_dir)
        .map_err(|e| format!("cache directory {}: {e}", cfg.cache_dir.display()))?;
    let log_file = match (&args.log_file, ready.is_some()) {
        (Some(f), _) => Some(f.clone()),
        (None, true) => Some(cfg.cache_dir.join("s3bridge.log")),
        (None, false) => None,
    };
    init_logging(&args.log_level, log_file.as_deref())?;
    if args.exact_attributes {
        warn!("--exact-attributes is the default now and can be dropped from the mount options");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(4, |n| n.get().max(4)))
        .enable_all()
        .thread_name("s3bridge")
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let preflight_opts = S3Options {
        max_attempts: 2,
        connect_timeout: Duration::from_secs(3),
        attempt_timeout: Duration::from_secs(10),
        ..s3_options(&cfg)
    };
    rt.block_on(async {
        let probe = S3Store::connect(&preflight_opts).await;
        s3bridge::store::ObjectStore::list(&probe, &cfg.prefix, Some("/"), None, Some(1))
            .await
            .map_err(|e| explain_preflight(&cfg, e))
    })?;
    let store = rt.block_on(S3Store::connect(&s3_options(&cfg)));
    let fs = Arc::new(Fs::new(cfg.clone(), Arc::new(store)).map_err(|e| e.to_string())?);
    rt.block_on(fs.resume_dir_renames())
        .map_err(|e| format!("cannot complete an interrupted directory rename: {e}"))?;
    fs.recover_pending().map_err(|e| e.to_string())?;
    rt.spawn(Fs::run_background(Arc::downgrade(&fs)));
    // Listening before the mount appears, so that `s3bridge flush` works as soon as it does.
    let control = {
        let _in_runtime = rt.enter();
        control::ControlSocket::listen(mountpoint, Arc::downgrade(&fs))
    };
    let control = control
        .map_err(|e| warn!("no control socket (`s3bridge flush` will not reach this mount): {e}"))
        .ok();
    let mut session =
        s3bridge::fuse::mount(fs.clone(), rt.handle().clone(), mountpoint).map_err(|e| {
            format!(
                "cannot mount at {}: {e} (is fuse3 installed and /dev/fuse usable by this user?)",
                mountpoint.display()
            )
        })?;
    let mut unmounter = session.unmount_callable();
    let target = mountpoint.to_path_buf();
    rt.spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            info!("signal received: unmounting {}", target.display());
            match unmounter.unmount() {
                Ok(()) => return,
                Err(e) => warn!("cannot unmount {} yet (in use?): {e}", target.display()),
            }
        }
    });
    info!(
        bucket = cfg.bucket,
        prefix = cfg.prefix,
        mountpoint = %mountpoint.display(),
        "mounted"
    );
    raise_kernel_read_ahead(mountpoint);
    let pid_file = PidFile::create(mountpoint);

    if let Some(pipe) = ready.as_mut() {
        let _ = writeln!(pipe, "ok");
    }
    *ready = None;
    notify_systemd("READY=1\nSTATUS=mounted");
    let result = session.run();
    notify_systemd("STOPPING=1");
    drop(fs);
    drop(control);
    drop(pid_file);
    rt.shutdown_timeout(Duration::from_secs(5));
    match result {
        Ok(()) => {
            info!("unmounted");
            Ok(())
        }
        Err(e) => {
            error!("FUSE session ended: {e}");
            Err(format!("FUSE session ended: {e}"))
        }
    }
}

/// Writes `s3bridge.1` and a page per subcommand (`s3bridge-mount.1`, ...) into `dir/man`,
/// and bash, zsh and fish completions into `dir/completions`: the package ships them.
fn generate(dir: &Path) -> Result<(), String> {
    use clap::CommandFactory;
    let io = |e: std::io::Error| format!("{}: {e}", dir.display());
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man).map_err(io)?;
    std::fs::create_dir_all(&completions).map_err(io)?;
    let cmd = Cli::command();
    clap_mangen::generate_to(cmd.clone(), &man).map_err(io)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "s3bridge", &completions)
            .map_err(io)?;
    }
    Ok(())
}

/// Tells systemd (a `Type=notify` service) about the mount's state, if it is listening: one
/// datagram to `$NOTIFY_SOCKET` (a path, or an abstract name after `@`). Best effort.
fn notify_systemd(state: &str) {
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

/// Kernel read-ahead of the mount, in KiB. At the kernel's default of 128 KiB a sequential
/// reader costs one FUSE round trip per 128 KiB; at 1 MiB (one cache block per request) a
/// 1 GiB read took 1.26 s instead of 1.51 s cold and 0.49 s instead of 0.72 s from the block
/// cache, with a fifth less daemon CPU.
const KERNEL_READ_AHEAD_KIB: u32 = 1024;

/// Sets the read-ahead of the mount's backing device (`/sys/class/bdi/MAJ:MIN`), found in
/// /proc/self/mountinfo since a `stat` of the mount point would wait for the request loop,
/// which has not started yet. Best effort: only root may write there, and only speed
/// depends on it.
fn raise_kernel_read_ahead(mountpoint: &Path) {
    let Some(dev) = mount_device(mountpoint) else {
        return;
    };
    let knob = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    match std::fs::write(&knob, KERNEL_READ_AHEAD_KIB.to_string()) {
        Ok(()) => debug!("kernel read-ahead of {dev} set to {KERNEL_READ_AHEAD_KIB} KiB"),
        Err(e) => debug!("kernel read-ahead left at its default ({knob}: {e})"),
    }
}

/// Raises the soft limit on open files to the hard limit (at most 65,536): the block cache
/// keeps a quarter of it open for fast random reads, and the default soft limit of 1,024
/// would leave it 256 files, a 256 MiB working set.
fn raise_descriptor_limit() {
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
struct PidFile(Option<PathBuf>);

impl PidFile {
    fn path(mountpoint: &Path) -> PathBuf {
        control::runtime_path(mountpoint, "pid")
    }

    fn create(mountpoint: &Path) -> PidFile {
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
fn daemon_running(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    matches!(state, Some(Some(c)) if c != 'Z' && c != 'X')
        && String::from_utf8_lossy(&cmdline).contains("s3bridge")
}

/// Starts this same command in the background and returns once the mount is ready, or with
/// the child's error line.
fn daemonize() -> Result<(), String> {
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

fn unmount(mountpoint: &Path) -> Result<(), String> {
    let canonical = mountpoint
        .canonicalize()
        .map_err(|e| format!("{}: {e}", mountpoint.display()))?;
    if !is_mount_point(&canonical) {
        return Err(format!("{} is not mounted", canonical.display()));
    }
    let daemon = std::fs::read_to_string(PidFile::path(&canonical))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok());
    // Drain the upload queue first, with progress; the daemon flushes again on its way out,
    // so a failure here (the server is down) only means that wait happens after the unmount.
    if daemon.is_some() {
        let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
        if let Err(e) = control::flush(&canonical, &mut std::io::stderr(), terminal) {
            eprintln!("s3bridge: {e}");
        }
    }
    // SAFETY: geteuid cannot fail.
    let status = if unsafe { libc::geteuid() } == 0 {
        let c = std::ffi::CString::new(canonical.as_os_str().as_encoded_bytes())
            .map_err(|_| "mount point contains a NUL byte".to_string())?;
        // SAFETY: a valid C string.
        if unsafe { libc::umount(c.as_ptr()) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    } else {
        Command::new("fusermount3")
            .arg("-u")
            .arg(&canonical)
            .status()
            .map_err(|e| std::io::Error::other(format!("fusermount3: {e}")))
            .and_then(|s| {
                if s.success() {
                    Ok(())
                } else {
                    Err(std::io::Error::other("fusermount3 -u failed"))
                }
            })
    };
    status.map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) => format!(
            "{} is busy: a process still uses it (see `fuser -vm {}`)",
            canonical.display(),
            canonical.display()
        ),
        _ => format!("cannot unmount {}: {e}", canonical.display()),
    })?;
    // The kernel has let go; the daemon still finishes pending uploads and releases its
    // cache directory. Wait for that, so a new mount of the same cache can follow at once.
    if let Some(pid) = daemon {
        let start = std::time::Instant::now();
        let mut told = false;
        while daemon_running(pid) {
            if !told && start.elapsed() > Duration::from_secs(2) {
                eprintln!("s3bridge: waiting for process {pid} to finish its uploads");
                told = true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_modes_parse() {
        assert_eq!(parse_size("8M"), Ok(8 << 20));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("1X").is_err());
        assert_eq!(parse_octal("0770"), Ok(0o770));
        assert_eq!(parse_octal("755"), Ok(0o755));
        assert!(parse_octal("9").is_err());
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
