//! The `s3bridge` command: parses the command line ([`cli`]), then mounts and serves the
//! filesystem — in the background ([`daemon`]) unless `-f` — or unmounts ([`mountpoint`]).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

use s3bridge::config::Config;
use s3bridge::control;
use s3bridge::fs::Fs;
use s3bridge::store::StoreError;
use s3bridge::store::s3::{S3Options, S3Store};

mod cli;
mod daemon;
mod mount_helper;
mod mountpoint;
mod warm;

use cli::{Cli, Commands, MountArgs, build_config};
use daemon::{PidFile, READY_FD_ENV, daemonize, notify_systemd, raise_descriptor_limit};
use mountpoint::{check_mountpoint, raise_kernel_read_ahead, unmount};

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
            Ok(mount_helper::Invocation::Remount {
                mountpoint,
                read_only,
            }) => {
                return exit_code(mountpoint::remount(&mountpoint, read_only));
            }
            Ok(mount_helper::Invocation::Mount(mount_helper::Translated { args, env })) => {
                for (k, v) in env {
                    // SAFETY: still single-threaded; nothing reads the environment yet.
                    unsafe { std::env::set_var(k, v) };
                }
                Cli::parse_from(args)
            }
            Err(msg) => return exit_code(Err(msg)),
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
    exit_code(result)
}

/// Success, or the error as one line on stderr and a failed exit.
fn exit_code(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("s3bridge: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(level: &str, file: Option<&Path>) -> Result<(), String> {
    // aws_config warns of every source of its chains it could not use (the instance metadata
    // service on any machine that is no EC2 instance); what matters is said by our errors.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "warn,s3bridge={level},fuser=error,aws_config=error"
        ))
    });
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
        StoreError::NoCredentials(why) => {
            let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
            let file = std::env::var("AWS_SHARED_CREDENTIALS_FILE")
                .unwrap_or_else(|_| "~/.aws/credentials".into());
            format!(
                "no AWS credentials found ({why}): looked in the environment \
                 (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), profile '{profile}' of {file} and \
                 ~/.aws/config, a web identity token, the container endpoint and the EC2 \
                 instance metadata; export the two variables, write {file}, or give \
                 credentials=FILE in an fstab line (mount runs with an empty environment)"
            )
        }
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
    let credentials = rt.block_on(async {
        let probe = S3Store::connect(&preflight_opts).await;
        let source = probe
            .load_credentials()
            .await
            .map_err(|e| explain_preflight(&cfg, e))?;
        s3bridge::store::ObjectStore::list(&probe, &cfg.prefix, Some("/"), None, Some(1))
            .await
            .map_err(|e| explain_preflight(&cfg, e))?;
        Ok::<_, String>(source)
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
        "mounted, with credentials from {credentials}"
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
