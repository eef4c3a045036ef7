//! The command line: its commands and the options of `mount`, and how they become a
//! [`Config`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use s3bridge::config::{Config, MetadataTtl, parse_source};

#[derive(Parser, Debug)]
#[command(
    name = "s3bridge",
    version,
    about = "Mount an S3 bucket as a POSIX directory",
    long_about = "Mount an S3 bucket (or a prefix of one) as an ordinary directory. Every file \
                  stays a plain S3 object that other S3 clients read and write."
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Commands,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Commands {
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

pub(crate) fn parse_octal(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("'{s}' is not an octal mode like 0644"))
}

pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let mult = match s[i..].to_ascii_lowercase().as_str() {
                "k" | "kib" | "kb" => 1 << 10,
                "m" | "mib" | "mb" => 1 << 20,
                "g" | "gib" | "gb" => 1 << 30,
                "t" | "tib" | "tb" => 1 << 40,
                other => return Err(format!("unknown size unit '{other}' (use K, M, G or T)")),
            };
            (&s[..i], mult)
        }
        None => (s, 1u64),
    };
    let n = num
        .trim()
        .parse::<u64>()
        .map_err(|_| format!("'{s}' is not a size like 8M"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large: sizes go up to 16777215T"))
}

#[derive(Args, Debug)]
pub(crate) struct MountArgs {
    /// Bucket, optionally with a key prefix: `mybucket` or `mybucket:some/dir/`.
    pub(crate) source: String,
    /// Existing empty directory to mount on.
    pub(crate) mountpoint: PathBuf,
    /// S3 endpoint for S3-compatible servers (MinIO, Garage, Ceph, R2, B2), e.g.
    /// http://127.0.0.1:3900. Without it, AWS.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub(crate) endpoint_url: Option<String>,
    /// Region (default: from the AWS configuration, else us-east-1).
    #[arg(long)]
    pub(crate) region: Option<String>,
    /// Path-style addressing; on by default with --endpoint-url, off for AWS.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub(crate) force_path_style: Option<bool>,
    /// Directory for the inode database and staged writes (default: a per-mount directory
    /// under /var/cache/s3bridge as root, ~/.cache/s3bridge otherwise).
    #[arg(long)]
    pub(crate) cache_dir: Option<PathBuf>,
    /// Owner of objects that carry no uid header (default: the mounting user).
    #[arg(long)]
    pub(crate) uid: Option<u32>,
    /// Group of objects that carry no gid header (default: the mounting user's group).
    #[arg(long)]
    pub(crate) gid: Option<u32>,
    /// Permissions of files that carry no mode header.
    #[arg(long, value_parser = parse_octal, default_value = "0644")]
    pub(crate) file_mode: u32,
    /// Permissions of directories that carry no mode header, and of the mount's root.
    #[arg(long, value_parser = parse_octal, default_value = "0755")]
    pub(crate) dir_mode: u32,
    /// Let users other than the mounting one use the mount (the kernel then enforces modes).
    #[arg(long)]
    pub(crate) allow_other: bool,
    /// Mount read-only.
    #[arg(long)]
    pub(crate) read_only: bool,
    /// Seconds that listings and attributes are trusted before being checked against the
    /// bucket, or `forever` for a bucket only this mount writes.
    #[arg(long, default_value = "5")]
    pub(crate) metadata_ttl: MetadataTtl,
    /// Show files as their listing describes them (size and Last-Modified, with --uid, --gid
    /// and --file-mode) until they are opened, instead of reading each new object's headers
    /// with the listing. Only for buckets that plain S3 clients alone write: objects written
    /// by s3fs or another s3bridge mount (modes, owners, times, symlinks) show wrong until
    /// opened. Saves one HEAD per object the first time a directory is listed.
    #[arg(long)]
    pub(crate) trust_listings: bool,
    /// Accepted for older fstab lines: exact attributes are the default now.
    #[arg(long, hide = true)]
    pub(crate) exact_attributes: bool,
    /// Serve user.* extended attributes, stored as s3fs stores them (s3fs's use_xattr).
    /// Without it the mount has no xattrs (EOPNOTSUPP), which spares `ls -l` two round trips
    /// to the daemon per file.
    #[arg(long)]
    pub(crate) xattr: bool,
    /// Stay in the foreground (otherwise s3bridge returns once the mount is ready).
    #[arg(short, long)]
    pub(crate) foreground: bool,
    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides).
    #[arg(long, default_value = "info")]
    pub(crate) log_level: String,
    /// Log file when running in the background (default: s3bridge.log in the cache dir).
    #[arg(long)]
    pub(crate) log_file: Option<PathBuf>,
    /// Files larger than this are uploaded in parts.
    #[arg(long, value_parser = parse_size, default_value = "16M")]
    pub(crate) multipart_threshold: u64,
    /// Smallest part size of multipart uploads (grows with the file up to S3's limits).
    #[arg(long, value_parser = parse_size, default_value = "8M")]
    pub(crate) part_size: u64,
    /// Parts of one upload sent at once.
    #[arg(long, default_value = "8")]
    pub(crate) upload_concurrency: usize,
    /// Threads that read requests from the kernel, each with its own /dev/fuse descriptor.
    /// Reads and writes run on the thread until they first have to wait (a local disk read
    /// of cached blocks or a staging-file write may be done there), then on async workers:
    /// with two, one waiting for the local disk never holds up the rest of the mount.
    #[arg(long, default_value = "2")]
    pub(crate) fuse_threads: usize,
    /// close() returns once the data is safe on local disk (synced staging file, committed
    /// journal row) and uploads run in the background; fsync() still waits for the bucket.
    /// Pending uploads survive a crash and are sent by the next mount of the same cache
    /// directory; `s3bridge flush` and unmount wait for them.
    #[arg(long)]
    pub(crate) write_back: bool,
    /// Seconds a file closed with --write-back waits before its upload starts: renamed,
    /// unlinked or touched meanwhile, it costs no request of its own (a temporary file renamed
    /// into place is one PUT, not a PUT, a copy and a delete).
    #[arg(long, value_parser = s3bridge::config::parse_seconds, default_value = "1")]
    pub(crate) write_back_delay: Duration,
    /// Files uploaded at once in the background (write-back, retries).
    #[arg(long, default_value = "8")]
    pub(crate) background_uploads: usize,
    /// Whether the server honours conditional writes (If-Match / If-None-Match), so that an
    /// upload over another client's change fails by itself; without, a HEAD checks the ETag
    /// first. Default: on for AWS, off with --endpoint-url (Garage ignores those headers).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub(crate) conditional_writes: Option<bool>,
    /// Largest read-ahead window of a sequential reader.
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    pub(crate) read_ahead: u64,
    /// Size of each of the concurrent ranged GETs that fill a read-ahead window.
    #[arg(long, value_parser = parse_size, default_value = "8M")]
    pub(crate) read_part_size: u64,
    /// Most disk space the block cache of downloaded data may use; 0 turns it off.
    #[arg(long, value_parser = parse_size, default_value = "10G")]
    pub(crate) cache_size: u64,
    /// Free space the block cache always leaves on the cache directory's filesystem.
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    pub(crate) cache_min_free: u64,
    /// Memory for data in flight (read-ahead windows and upload parts), shared by all files.
    #[arg(long, value_parser = parse_size, default_value = "32M")]
    pub(crate) max_buffer_memory: u64,
    /// Attempts per S3 request before an error is returned.
    #[arg(long, default_value = "5")]
    pub(crate) max_attempts: u32,
    /// Seconds allowed for one attempt of one S3 request.
    #[arg(long, default_value = "60")]
    pub(crate) request_timeout: u64,
}

pub(crate) fn default_cache_dir(cfg: &Config) -> PathBuf {
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

pub(crate) fn build_config(args: &MountArgs) -> Result<Config, String> {
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
        fuse_threads: args.fuse_threads.max(1),
        write_back: args.write_back,
        write_back_delay: args.write_back_delay,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_modes_parse() {
        assert_eq!(parse_size("8M"), Ok(8 << 20));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("16777215T"), Ok(16777215 << 40));
        assert!(parse_size("1X").is_err());
        // Too large for 64 bits: an error, not a wrapped-around small number.
        assert!(parse_size("16777216T").unwrap_err().contains("too large"));
        assert!(parse_size("18446744073709551616").is_err());
        assert_eq!(parse_octal("0770"), Ok(0o770));
        assert_eq!(parse_octal("755"), Ok(0o755));
        assert!(parse_octal("9").is_err());
    }
}
