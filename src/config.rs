//! The one configuration of a mount, built from the command line (or fstab options).

use std::path::PathBuf;
use std::time::Duration;

/// How long entries read from the bucket are trusted before they are checked again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetadataTtl {
    /// Re-validate after this long.
    For(Duration),
    /// Never re-validate: for a bucket that only this mount writes.
    Forever,
}

impl MetadataTtl {
    /// Whether something confirmed at `at_ns` (ns since the epoch) is still fresh at `now_ns`.
    pub fn is_fresh(self, at_ns: i64, now_ns: i64) -> bool {
        match self {
            MetadataTtl::Forever => true,
            MetadataTtl::For(d) => now_ns.saturating_sub(at_ns) < d.as_nanos() as i64,
        }
    }

    /// How long the kernel may cache entries and attributes.
    pub fn kernel_ttl(self) -> Duration {
        match self {
            MetadataTtl::Forever => Duration::from_secs(3600),
            MetadataTtl::For(d) => d,
        }
    }
}

impl std::str::FromStr for MetadataTtl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "forever" {
            return Ok(MetadataTtl::Forever);
        }
        parse_seconds(s)
            .map(MetadataTtl::For)
            .map_err(|e| format!("{e}, or 'forever'"))
    }
}

/// Parses a number of seconds, fractions allowed, with or without a trailing `s`
/// (`5`, `0.5s`).
pub fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !(0.0..=1e9).contains(&secs) {
        return Err(format!("'{s}' is out of range (0 to 1e9 seconds)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Everything a mount needs to know. Defaults are documented on each field.
#[derive(Debug, Clone)]
pub struct Config {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix the mount's root maps to: empty, or ending with `/`.
    pub prefix: String,
    /// Custom S3 endpoint; `None` for AWS.
    pub endpoint_url: Option<String>,
    /// Region; `None` uses the AWS configuration chain.
    pub region: Option<String>,
    /// Path-style addressing (default: on with a custom endpoint, off for AWS).
    pub force_path_style: bool,
    /// Directory for the inode database and staging files (created 0700).
    pub cache_dir: PathBuf,
    /// Owner of objects without `x-amz-meta-uid` (default: the mounting user).
    pub uid: u32,
    /// Group of objects without `x-amz-meta-gid` (default: the mounting user's group).
    pub gid: u32,
    /// Permissions of files without `x-amz-meta-mode` (default 0644).
    pub file_mode: u32,
    /// Permissions of directories without `x-amz-meta-mode`, and of the root (default 0755).
    pub dir_mode: u32,
    /// Let other users than the mounting one use the mount (`allow_other`).
    pub allow_other: bool,
    /// Refuse every change (EROFS).
    pub read_only: bool,
    /// How long listed entries and attributes are trusted (default 5 s).
    pub metadata_ttl: MetadataTtl,
    /// Files up to this size are uploaded with one PUT; larger ones with multipart (16 MiB).
    pub multipart_threshold: u64,
    /// Smallest multipart part size; it grows with the file so 10,000 parts reach 5 TiB
    /// (8 MiB).
    pub part_size: u64,
    /// Parts uploaded (or copied) at once by one upload (8).
    pub upload_concurrency: usize,
    /// Threads reading requests from the kernel (2; see `--fuse-threads`).
    pub fuse_threads: usize,
    /// `close()` returns once the data is durable on local disk; uploads run in the
    /// background (false: `close()` waits for the bucket).
    pub write_back: bool,
    /// How long a file closed in write-back mode waits before its upload starts (1 s). A
    /// rename, unlink or change of attributes meanwhile is local only: the temporary file
    /// renamed into place of Nextcloud (`.part`), Samba, rsync and editors then costs one PUT
    /// instead of a PUT, a CopyObject and a DeleteObject, and one deleted at once none.
    pub write_back_delay: Duration,
    /// Files uploaded at once by the background uploader (8).
    pub background_uploads: usize,
    /// The server checks `If-Match`/`If-None-Match` on writes, so another client's change
    /// is caught by the upload itself; otherwise a HEAD checks first (on for AWS).
    pub conditional_writes: bool,
    /// Largest read-ahead window of a sequential reader (64 MiB).
    pub read_ahead_max: u64,
    /// Size of each ranged GET of a read-ahead window (8 MiB).
    pub read_part_size: u64,
    /// Show files as their listing describes them (size, Last-Modified, the mount's owner and
    /// mode) and read their headers only when they are opened, instead of reading every
    /// object's headers with the listing (false). For buckets that only plain S3 clients
    /// write: there, no object carries headers, and the listing alone is exact.
    pub trust_listings: bool,
    /// Serve `user.*` extended attributes (stored in s3fs's `x-amz-meta-xattr`). Off, the
    /// kernel is told there are none and stops asking, which saves two round trips per file
    /// of every `ls -l` (false, as s3fs without `use_xattr`).
    pub xattrs: bool,
    /// Most bytes the block cache keeps on disk; 0 turns it off (10 GiB).
    pub cache_size: u64,
    /// Free space the block cache leaves on its filesystem (1 GiB).
    pub cache_min_free: u64,
    /// Memory for data buffers in flight: read-ahead windows and upload parts (32 MiB).
    pub max_buffer_memory: u64,
    /// Attempts per S3 request, the first included (5).
    pub max_attempts: u32,
    /// Time allowed to connect to the server (5 s).
    pub connect_timeout: Duration,
    /// Time allowed for one attempt of one request, body included (60 s).
    pub request_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Config {
            bucket: String::new(),
            prefix: String::new(),
            endpoint_url: None,
            region: None,
            force_path_style: false,
            cache_dir: PathBuf::new(),
            uid,
            gid,
            file_mode: 0o644,
            dir_mode: 0o755,
            allow_other: false,
            read_only: false,
            metadata_ttl: MetadataTtl::For(Duration::from_secs(5)),
            multipart_threshold: 16 * 1024 * 1024,
            part_size: 8 * 1024 * 1024,
            upload_concurrency: 8,
            fuse_threads: 2,
            write_back: false,
            write_back_delay: Duration::from_secs(1),
            background_uploads: 8,
            conditional_writes: false,
            read_ahead_max: 64 * 1024 * 1024,
            read_part_size: 8 * 1024 * 1024,
            trust_listings: false,
            xattrs: false,
            cache_size: 10 << 30,
            cache_min_free: 1 << 30,
            max_buffer_memory: 32 << 20,
            max_attempts: 5,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
        }
    }
}

/// Splits `BUCKET[:PREFIX]` into the bucket and a prefix that is empty or ends with `/`.
pub fn parse_source(source: &str) -> Result<(String, String), String> {
    let source = source.strip_prefix("s3://").unwrap_or(source);
    let (bucket, prefix) = match source.split_once(':') {
        Some((b, p)) => (b, p),
        None => (source, ""),
    };
    if bucket.is_empty() {
        return Err(format!("'{source}': the bucket name is empty"));
    }
    let prefix = prefix.trim_start_matches('/');
    if prefix.split('/').any(|c| c == "." || c == "..") || prefix.contains("//") {
        return Err(format!(
            "'{source}': the prefix must be a plain path like 'dir/sub/' (no '.', '..' or '//')"
        ));
    }
    let prefix = if prefix.is_empty() || prefix.ends_with('/') {
        prefix.to_string()
    } else {
        format!("{prefix}/")
    };
    Ok((bucket.to_string(), prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_split_into_bucket_and_prefix() {
        assert_eq!(parse_source("b").unwrap(), ("b".into(), "".into()));
        assert_eq!(parse_source("b:").unwrap(), ("b".into(), "".into()));
        assert_eq!(parse_source("b:p").unwrap(), ("b".into(), "p/".into()));
        assert_eq!(
            parse_source("b:/p/q/").unwrap(),
            ("b".into(), "p/q/".into())
        );
        assert_eq!(parse_source("s3://b:p").unwrap(), ("b".into(), "p/".into()));
        assert!(parse_source(":p").is_err());
        assert!(parse_source("b:a/../c").is_err());
        assert!(parse_source("b:a//c").is_err());
    }

    #[test]
    fn ttl_parses_seconds_or_forever() {
        assert_eq!("forever".parse(), Ok(MetadataTtl::Forever));
        assert_eq!("2".parse(), Ok(MetadataTtl::For(Duration::from_secs(2))));
        assert_eq!(
            "0.5s".parse(),
            Ok(MetadataTtl::For(Duration::from_millis(500)))
        );
        assert!("x".parse::<MetadataTtl>().is_err());
        let ttl = MetadataTtl::For(Duration::from_secs(1));
        assert!(ttl.is_fresh(0, 999_999_999));
        assert!(!ttl.is_fresh(0, 1_000_000_000));
    }
}
