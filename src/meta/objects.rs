//! How an object becomes an entry: the one place that turns what the bucket says about an
//! object (a listing line, a HEAD) into the attributes `stat` shows.
//!
//! Every path that learns about an object — a listing with its batched HEADs, a lookup's
//! probe, an open, a revalidation after the TTL — goes through these functions, so the same
//! object version always shows the same attributes, whichever path saw it first and on
//! whichever mount (design.md §4: exact from the first look, and stable). Directories are
//! the exception that the clock rule below makes: their times are each mount's own.
//!
//! Two rules live here besides the s3fs header mapping:
//!
//! - **A type must fit the size.** A symlink's body is its target, at most [`SYMLINK_MAX`]
//!   bytes; FIFOs, sockets and device nodes have no body. An object whose mode header claims
//!   one of those types but whose size cannot be one is shown as the regular file it can be
//!   read as. So an object larger than `SYMLINK_MAX` is a regular file whatever its headers
//!   say, and its type is known from a listing alone.
//! - **A directory's clock only moves forward.** A directory has no object that records
//!   changes of its entries; this mount keeps its mtime and ctime, and when it learns that
//!   entries changed outside it moves them to at least one whole second past their previous
//!   value ([`advance`]). Nextcloud notices outside changes only by `filemtime(dir) > stored`
//!   in whole seconds (shared/nextcloud.md), so equal or earlier would hide the change.

use std::time::{SystemTime, UNIX_EPOCH};

use super::headers::{self, PosixHeaders};
use super::{EntryDefaults, Inode, Kind, Timestamp};
use crate::store::UserMetadata;

/// Longest symlink target (PATH_MAX less the NUL): the largest body a symlink object has.
pub const SYMLINK_MAX: usize = 4095;

/// How far the server's clock may be ahead of this host's, for [`Inode::holds`] (ms). An
/// NTP-synchronised pair differs by milliseconds; a minute also covers an unsynchronised VM
/// that drifted a little. Too small costs only a HEAD of an object this mount wrote.
pub const CLOCK_SKEW_MS: i64 = 60_000;

/// One version of an object, as a listing or a HEAD identifies it.
///
/// The ETag alone does not identify a version: S3's ETag of a single-part object is the MD5
/// of its body, so a `chmod` or `touch` from another mount (a CopyObject onto the same key
/// with new headers) keeps the ETag and changes only Last-Modified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectVersion {
    /// ETag, quotes included.
    pub etag: String,
    /// Size in bytes.
    pub size: u64,
    /// Last-Modified in milliseconds since the epoch. Listings carry milliseconds on some
    /// servers (Garage) and HEAD answers (HTTP dates) whole seconds; see [`same_moment`].
    pub last_modified: i64,
}

impl ObjectVersion {
    /// The version with this ETag, size and Last-Modified.
    pub fn new(etag: &str, size: u64, last_modified: SystemTime) -> Self {
        let ms = match last_modified.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_millis() as i64,
            Err(e) => -(e.duration().as_millis() as i64),
        };
        ObjectVersion {
            etag: etag.to_string(),
            size,
            last_modified: ms,
        }
    }

    /// Last-Modified in whole seconds, as an object without an mtime header shows it: the
    /// same whether a listing or a HEAD told it.
    pub fn modified(&self) -> Timestamp {
        Timestamp {
            sec: self.last_modified.div_euclid(1000),
            nsec: 0,
        }
    }
}

/// Whether two Last-Modified values (ms) can name the same version: equal, or equal in the
/// second where one of them came without milliseconds (a HEAD's HTTP date). Servers that
/// list milliseconds so tell apart two versions written within one second, where the ETag
/// is the same (a `chmod` from another mount right after a write); those that do not, cannot.
pub fn same_moment(a: i64, b: i64) -> bool {
    a == b || ((a % 1000 == 0 || b % 1000 == 0) && a.div_euclid(1000) == b.div_euclid(1000))
}

/// Of two values [`same_moment`] finds equal, the one that says more.
fn finer(a: i64, b: i64) -> i64 {
    if a % 1000 == 0 { b } else { a }
}

/// What the bucket says of one object: its version, its POSIX headers and, for a symlink
/// whose body was read with them, its target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The version described.
    pub version: ObjectVersion,
    /// Its s3fs headers (absent ones: the mount's defaults apply).
    pub headers: PosixHeaders,
    /// A symlink's target, when its body was read.
    pub symlink_target: Option<String>,
}

impl ObjectMeta {
    /// The description of `version` carrying the user metadata `metadata`.
    pub fn new(version: ObjectVersion, metadata: &UserMetadata) -> Self {
        ObjectMeta {
            version,
            headers: headers::decode(metadata),
            symlink_target: None,
        }
    }

    /// The type this object is shown as (see the module docs: a type must fit the size).
    pub fn kind(&self) -> Kind {
        kind_of(self.headers.mode, self.version.size)
    }
}

/// What reading an object's headers gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Headers {
    /// Read: the object as it is now.
    Read(ObjectMeta),
    /// The object is gone (for a directory marker: the directory is implicit).
    Gone,
    /// Not read: known already, or the mount trusts listings, or the request failed.
    Unread,
}

/// The type an object with mode header `mode` and `size` bytes is shown as.
pub fn kind_of(mode: Option<u32>, size: u64) -> Kind {
    match mode.and_then(Kind::from_mode) {
        Some(Kind::Symlink) if (1..=SYMLINK_MAX as u64).contains(&size) => Kind::Symlink,
        Some(k @ (Kind::Fifo | Kind::Socket | Kind::CharDev | Kind::BlockDev)) if size == 0 => k,
        // Directories are keys ending in `/`; anything else with a body is a file.
        _ => Kind::File,
    }
}

/// `t` moved forward past its whole second, or `now` if that is later: the clock of a
/// directory whose entries changed outside this mount.
pub fn advance(t: Timestamp, now: Timestamp) -> Timestamp {
    let next = Timestamp {
        sec: t.sec.saturating_add(1),
        nsec: 0,
    };
    next.max(now)
}

impl Inode {
    /// Whether this entry shows object version `v`. A row written by this mount does not
    /// know its object's Last-Modified (servers do not return it for a PUT or a completed
    /// upload): with our ETag and size the version is ours unless it is later than our write
    /// by more than clocks may differ ([`CLOCK_SKEW_MS`]), which then costs a HEAD.
    pub fn holds(&self, v: &ObjectVersion) -> bool {
        self.etag.as_deref() == Some(v.etag.as_str())
            && (self.kind == Kind::Dir || self.size == v.size)
            && match self.last_modified {
                Some(lm) => same_moment(lm, v.last_modified),
                None => v.last_modified <= self.validated_at.div_euclid(1_000_000) + CLOCK_SKEW_MS,
            }
    }

    /// Whether `stat` would show the same for both (the bookkeeping aside).
    pub fn shows_same(&self, other: &Inode) -> bool {
        (
            self.kind, self.perm, self.uid, self.gid, self.size, self.rdev, self.mtime, self.ctime,
        ) == (
            other.kind,
            other.perm,
            other.uid,
            other.gid,
            other.size,
            other.rdev,
            other.mtime,
            other.ctime,
        ) && self.xattrs == other.xattrs
            && self.etag == other.etag
    }

    /// Takes the Last-Modified of `v`, a version this entry [`Self::holds`]: learned for an
    /// object this mount wrote, or more precise than what a HEAD told.
    pub fn learn_modified(&mut self, v: &ObjectVersion) {
        self.last_modified = Some(match self.last_modified {
            Some(lm) => finer(lm, v.last_modified),
            None => v.last_modified,
        });
    }

    /// Records that this mount wrote the entry's object and got `etag` back: its headers are
    /// the entry's own, its Last-Modified is learned from the next listing.
    pub fn wrote(&mut self, etag: String) {
        self.etag = Some(etag);
        self.last_modified = None;
        self.headers_known = true;
    }

    /// Shows file (or symlink, or special file) object `obj`, exactly as its headers say.
    pub fn describe_file(&mut self, obj: &ObjectMeta, d: &EntryDefaults) {
        let h = &obj.headers;
        let v = &obj.version;
        let same_body = self.etag.as_deref() == Some(v.etag.as_str());
        self.kind = obj.kind();
        self.size = v.size;
        self.perm = h.mode.map_or(d.file_perm, |m| m & 0o7777);
        self.uid = h.uid.unwrap_or(d.uid);
        self.gid = h.gid.unwrap_or(d.gid);
        self.mtime = h.mtime.unwrap_or(v.modified());
        self.ctime = h.ctime.unwrap_or(self.mtime);
        self.atime = h.atime.unwrap_or(self.mtime);
        self.rdev = h.rdev.unwrap_or(0);
        self.xattrs = h.xattrs.clone();
        self.symlink_target = match self.kind {
            Kind::Symlink => obj
                .symlink_target
                .clone()
                .or_else(|| self.symlink_target.take().filter(|_| same_body)),
            _ => None,
        };
        self.etag = Some(v.etag.clone());
        self.last_modified = Some(v.last_modified);
        self.headers_known = true;
    }

    /// Shows a file as a listing alone describes it: its size and Last-Modified, with the
    /// mount's owner and mode; its headers are read when it is opened (`--trust-listings`).
    pub fn describe_listed_file(&mut self, v: &ObjectVersion, d: &EntryDefaults) {
        self.kind = Kind::File;
        self.size = v.size;
        self.perm = d.file_perm;
        self.uid = d.uid;
        self.gid = d.gid;
        self.mtime = v.modified();
        self.ctime = self.mtime;
        self.atime = self.mtime;
        self.rdev = 0;
        self.xattrs.clear();
        self.symlink_target = None;
        self.etag = Some(v.etag.clone());
        self.last_modified = Some(v.last_modified);
        self.headers_known = false;
    }

    /// Shows directory marker `marker` (`None`: the directory has none, it is implied by the
    /// keys under it). The first time a directory is described its times are the marker's;
    /// after that a new marker from outside changes mode and owner, and moves the clock
    /// forward but never back.
    pub fn describe_dir(&mut self, marker: Option<&ObjectMeta>, d: &EntryDefaults, now: Timestamp) {
        let seen_before = self.headers_known;
        self.kind = Kind::Dir;
        self.size = 0;
        self.headers_known = true;
        let Some(m) = marker else {
            // Implicit: what this mount first saw of it stays (owner and mode: the defaults).
            self.etag = None;
            self.last_modified = None;
            return;
        };
        let h = &m.headers;
        self.perm = h.mode.map_or(d.dir_perm, |m| m & 0o7777);
        self.uid = h.uid.unwrap_or(d.uid);
        self.gid = h.gid.unwrap_or(d.gid);
        self.xattrs = h.xattrs.clone();
        let mtime = h.mtime.unwrap_or(m.version.modified());
        let ctime = h.ctime.unwrap_or(mtime);
        if seen_before {
            self.mtime = mtime.max(advance(self.mtime, now));
            self.ctime = ctime.max(advance(self.ctime, now));
        } else {
            self.mtime = mtime;
            self.ctime = ctime;
            self.atime = h.atime.unwrap_or(mtime);
        }
        self.etag = Some(m.version.etag.clone());
        self.last_modified = Some(m.version.last_modified);
    }

    /// Applies what was read of a directory's marker, if it is news: the first description
    /// of the directory, a marker that is another version than the one shown, or a marker
    /// that is gone (the directory is implicit from now on; its attributes stay).
    pub fn apply_marker(&mut self, marker: &Headers, d: &EntryDefaults, now: Timestamp) {
        match marker {
            Headers::Read(m) if !self.headers_known || !self.marker_is(m, d) => {
                self.describe_dir(Some(m), d, now)
            }
            Headers::Gone if !self.headers_known || self.etag.is_some() => {
                self.describe_dir(None, d, now)
            }
            _ => {}
        }
    }

    /// Whether this directory shows marker `m`: its version, and the mode, owner and
    /// attributes it carries (a marker rewritten within the same second keeps its ETag and,
    /// where the server gives whole seconds, its Last-Modified).
    fn marker_is(&self, m: &ObjectMeta, d: &EntryDefaults) -> bool {
        let h = &m.headers;
        self.holds(&m.version)
            && self.perm == h.mode.map_or(d.dir_perm, |m| m & 0o7777)
            && self.uid == h.uid.unwrap_or(d.uid)
            && self.gid == h.gid.unwrap_or(d.gid)
            && self.xattrs == h.xattrs
    }

    /// Moves a directory's clock forward: its entries changed outside this mount.
    pub fn advance_clock(&mut self, now: Timestamp) {
        self.mtime = advance(self.mtime, now);
        self.ctime = advance(self.ctime, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: EntryDefaults = EntryDefaults {
        uid: 7,
        gid: 8,
        file_perm: 0o644,
        dir_perm: 0o755,
    };

    fn ts(sec: i64, nsec: u32) -> Timestamp {
        Timestamp { sec, nsec }
    }

    /// A version last modified at `lm` (whole seconds).
    fn version(etag: &str, size: u64, lm: i64) -> ObjectVersion {
        ObjectVersion {
            etag: etag.into(),
            size,
            last_modified: lm * 1000,
        }
    }

    fn meta(v: ObjectVersion, pairs: &[(&str, &str)]) -> ObjectMeta {
        let m: UserMetadata = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ObjectMeta::new(v, &m)
    }

    fn row(kind: Kind) -> Inode {
        Inode::new_entry(Some(1), "x", kind, &D, ts(50, 0), 0)
    }

    #[test]
    fn the_clock_moves_a_whole_second_and_never_back() {
        let now = ts(100, 300);
        assert_eq!(
            advance(ts(100, 900), now),
            ts(101, 0),
            "past the whole second"
        );
        assert_eq!(advance(ts(40, 5), now), now, "to now when that is later");
        assert_eq!(
            advance(ts(500, 0), now),
            ts(501, 0),
            "a future time still moves"
        );
        let mut t = ts(99, 999_999_999);
        for _ in 0..3 {
            let next = advance(t, now);
            assert!(next.sec > t.sec);
            t = next;
        }
    }

    #[test]
    fn types_must_fit_the_size() {
        let lnk = Some(libc::S_IFLNK | 0o777);
        assert_eq!(kind_of(lnk, 5), Kind::Symlink);
        assert_eq!(kind_of(lnk, 0), Kind::File);
        assert_eq!(kind_of(lnk, SYMLINK_MAX as u64 + 1), Kind::File);
        assert_eq!(kind_of(Some(libc::S_IFIFO | 0o644), 0), Kind::Fifo);
        assert_eq!(kind_of(Some(libc::S_IFIFO | 0o644), 3), Kind::File);
        assert_eq!(kind_of(Some(libc::S_IFDIR | 0o755), 0), Kind::File);
        assert_eq!(kind_of(None, 0), Kind::File);
    }

    #[test]
    fn a_file_shows_its_headers_or_the_defaults_and_its_last_modified() {
        let mut r = row(Kind::File);
        let v = version("\"e\"", 3, 1_600_000_000);
        r.describe_file(&meta(v.clone(), &[]), &D);
        assert_eq!((r.perm, r.uid, r.gid, r.size), (0o644, 7, 8, 3));
        assert_eq!(
            (r.mtime, r.ctime),
            (ts(1_600_000_000, 0), ts(1_600_000_000, 0))
        );
        let s3fs = meta(
            v.clone(),
            &[
                ("mode", "33152"),
                ("uid", "33"),
                ("gid", "34"),
                ("mtime", "1262304000"),
                ("ctime", "1262304001.5"),
            ],
        );
        r.describe_file(&s3fs, &D);
        assert_eq!((r.perm, r.uid, r.gid), (0o600, 33, 34));
        assert_eq!(
            (r.mtime, r.ctime),
            (ts(1_262_304_000, 0), ts(1_262_304_001, 500_000_000))
        );
        assert!(r.holds(&v) && r.headers_known);
        // The same version described again is the same row: what stat shows is stable.
        let before = r.clone();
        r.describe_file(&s3fs, &D);
        assert_eq!(r, before);
        assert!(
            !r.holds(&version("\"e\"", 3, 1_600_000_001)),
            "a copy onto itself"
        );
    }

    #[test]
    fn a_symlink_keeps_its_target_while_its_body_is_the_same() {
        let mut r = row(Kind::File);
        let mut m = meta(version("\"t\"", 6, 10), &[("mode", "41471")]);
        m.symlink_target = Some("target".into());
        r.describe_file(&m, &D);
        assert_eq!(
            (r.kind, r.symlink_target.as_deref()),
            (Kind::Symlink, Some("target"))
        );
        m.symlink_target = None;
        m.version.last_modified = 11;
        r.describe_file(&m, &D);
        assert_eq!(
            r.symlink_target.as_deref(),
            Some("target"),
            "same ETag, same body"
        );
        m.version.etag = "\"u\"".into();
        r.describe_file(&m, &D);
        assert_eq!(r.symlink_target, None, "another body: read again");
    }

    #[test]
    fn milliseconds_tell_versions_apart_where_the_server_gives_them() {
        let listed = |ms| ObjectVersion {
            etag: "\"e\"".into(),
            size: 1,
            last_modified: ms,
        };
        assert!(
            same_moment(10_000, 10_250),
            "a HEAD's whole second and a listing's ms"
        );
        assert!(!same_moment(10_250, 10_600), "two listings: two versions");
        assert!(!same_moment(10_000, 11_000));
        let mut r = row(Kind::File);
        r.size = 1;
        r.etag = Some("\"e\"".into());
        r.last_modified = Some(10_000);
        assert!(r.holds(&listed(10_250)));
        r.learn_modified(&listed(10_250));
        assert_eq!(r.last_modified, Some(10_250), "the finer time is kept");
        assert!(!r.holds(&listed(10_600)), "a chmod within the same second");
        assert_eq!(listed(10_600).modified(), ts(10, 0));
    }

    #[test]
    fn a_written_row_holds_its_version_until_the_bucket_says_otherwise() {
        let mut r = row(Kind::File);
        r.size = 4;
        r.wrote("\"w\"".into());
        r.validated_at = 1_000 * 1_000_000_000;
        assert!(r.holds(&version("\"w\"", 4, 123)), "written before: ours");
        assert!(r.holds(&version("\"w\"", 4, 1_030)), "clocks may differ");
        assert!(
            !r.holds(&version("\"w\"", 4, 1_200)),
            "copied onto itself later, by someone else"
        );
        assert!(!r.holds(&version("\"w\"", 5, 123)));
        assert!(!r.holds(&version("\"z\"", 4, 123)));
    }

    #[test]
    fn a_directory_takes_its_first_marker_then_only_moves_forward() {
        let now = ts(2_000_000_000, 0);
        let mut d = row(Kind::Dir);
        d.headers_known = false;
        let marker = meta(
            version("\"m\"", 0, 1_700_000_000),
            &[("mode", "16872"), ("uid", "33"), ("mtime", "1262304000")],
        );
        d.describe_dir(Some(&marker), &D, now);
        assert_eq!((d.perm, d.uid, d.gid), (0o750, 33, 8));
        assert_eq!(
            d.mtime,
            ts(1_262_304_000, 0),
            "first look: the marker's time"
        );
        let replaced = meta(
            version("\"m\"", 0, 1_700_000_100),
            &[("mode", "16877"), ("mtime", "1000")],
        );
        d.describe_dir(Some(&replaced), &D, now);
        assert_eq!(d.perm, 0o755);
        assert_eq!(
            d.mtime, now,
            "a new marker moves the clock forward, never back"
        );
        let mut implicit = row(Kind::Dir);
        implicit.headers_known = false;
        implicit.describe_dir(None, &D, now);
        assert_eq!((implicit.mtime, implicit.etag.as_ref()), (ts(50, 0), None));
    }
}
