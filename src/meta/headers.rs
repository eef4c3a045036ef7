//! POSIX attributes in `x-amz-meta-*` headers, the way s3fs stores them, so a bucket moves
//! between s3fs and s3bridge with nothing lost.
//!
//! - `mode`: decimal `st_mode`, type bits included (`33188` is a 0644 regular file).
//! - `uid`, `gid`: decimal.
//! - `mtime`, `ctime`, `atime`: seconds since the epoch, optionally with a decimal fraction
//!   (`1700000000` or `1700000000.250000000`); the fraction is read as a decimal fraction.
//! - `rdev`: decimal device number of a device node (s3bridge's addition; s3fs ignores it).
//! - `xattr`: percent-encoded JSON object mapping each attribute name to its base64 value.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

use super::Timestamp;
use crate::store::UserMetadata;

/// Content-Type of a directory marker written by s3bridge (and s3fs). Any key ending in `/`
/// is a directory whatever its type, Nextcloud's `httpd/unix-directory` markers included.
pub const DIR_CONTENT_TYPE: &str = "application/x-directory";

/// The POSIX attributes an object's headers carry; each is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PosixHeaders {
    /// Full `st_mode` (type bits and permissions).
    pub mode: Option<u32>,
    /// Owner.
    pub uid: Option<u32>,
    /// Group.
    pub gid: Option<u32>,
    /// Modification time.
    pub mtime: Option<Timestamp>,
    /// Status-change time.
    pub ctime: Option<Timestamp>,
    /// Access time.
    pub atime: Option<Timestamp>,
    /// Device number.
    pub rdev: Option<u32>,
    /// Extended attributes, full names (`user.foo`) to raw values.
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// Reads the POSIX attributes from an object's user metadata. Malformed values are ignored
/// (the mount's defaults apply), never fatal.
pub fn decode(meta: &UserMetadata) -> PosixHeaders {
    let num = |name: &str| meta.get(name).and_then(|v| v.trim().parse::<u32>().ok());
    let time = |name: &str| meta.get(name).and_then(|v| parse_time(v));
    PosixHeaders {
        mode: num("mode"),
        uid: num("uid"),
        gid: num("gid"),
        mtime: time("mtime"),
        ctime: time("ctime"),
        atime: time("atime"),
        rdev: num("rdev"),
        xattrs: meta
            .get("xattr")
            .map(|v| decode_xattrs(v))
            .unwrap_or_default(),
    }
}

/// Writes the POSIX attributes into user metadata (replacing those names).
pub fn encode(h: &PosixHeaders) -> UserMetadata {
    let mut meta = UserMetadata::new();
    let mut put = |name: &str, value: Option<String>| {
        if let Some(v) = value {
            meta.insert(name.to_string(), v);
        }
    };
    put("mode", h.mode.map(|v| v.to_string()));
    put("uid", h.uid.map(|v| v.to_string()));
    put("gid", h.gid.map(|v| v.to_string()));
    put("mtime", h.mtime.map(format_time));
    put("ctime", h.ctime.map(format_time));
    put("atime", h.atime.map(format_time));
    put("rdev", h.rdev.filter(|&r| r != 0).map(|v| v.to_string()));
    if !h.xattrs.is_empty() {
        meta.insert("xattr".to_string(), encode_xattrs(&h.xattrs));
    }
    meta
}

/// Parses `sec` or `sec.fraction` (fraction as a decimal fraction of a second).
pub fn parse_time(value: &str) -> Option<Timestamp> {
    let value = value.trim();
    let (int, frac) = match value.split_once('.') {
        Some((i, f)) => (i, f),
        None => (value, ""),
    };
    let negative = int.starts_with('-');
    let sec: i64 = int.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Decimal fraction: "5" is half a second; digits past nanoseconds are dropped.
    let digits: String = frac.chars().chain("000000000".chars()).take(9).collect();
    let nsec: u32 = digits.parse().ok()?;
    if negative && nsec > 0 {
        // "-1.5" is one and a half seconds before the epoch.
        Some(Timestamp {
            sec: sec - 1,
            nsec: 1_000_000_000 - nsec,
        })
    } else {
        Some(Timestamp { sec, nsec })
    }
}

/// Formats a time as s3fs reads it: whole seconds, or seconds with nine decimals.
pub fn format_time(t: Timestamp) -> String {
    if t.nsec == 0 {
        t.sec.to_string()
    } else if t.sec >= 0 {
        format!("{}.{:09}", t.sec, t.nsec)
    } else {
        // Negative: write the decimal value, e.g. sec -2 + 0.5 s is "-1.500000000".
        let sec = t.sec + 1;
        let nsec = 1_000_000_000 - t.nsec;
        if sec == 0 {
            format!("-0.{nsec:09}")
        } else {
            format!("{sec}.{nsec:09}")
        }
    }
}

/// Characters s3fs leaves unencoded in the xattr header; everything else is percent-encoded
/// so the header stays printable ASCII.
const XATTR_KEEP: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn encode_xattrs(xattrs: &BTreeMap<String, Vec<u8>>) -> String {
    let json: serde_json::Map<String, serde_json::Value> = xattrs
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(BASE64.encode(v))))
        .collect();
    let text = serde_json::Value::Object(json).to_string();
    utf8_percent_encode(&text, XATTR_KEEP).to_string()
}

fn decode_xattrs(value: &str) -> BTreeMap<String, Vec<u8>> {
    let text = percent_decode_str(value).decode_utf8_lossy();
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(&text)
    else {
        return BTreeMap::new();
    };
    map.into_iter()
        .filter_map(|(k, v)| {
            let raw = v.as_str()?;
            Some((k, BASE64.decode(raw).ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_decimal_fractions() {
        let t = |sec, nsec| Some(Timestamp { sec, nsec });
        assert_eq!(parse_time("1700000000"), t(1_700_000_000, 0));
        assert_eq!(parse_time("1700000000.5"), t(1_700_000_000, 500_000_000));
        assert_eq!(parse_time("1700000000.000000001"), t(1_700_000_000, 1));
        assert_eq!(parse_time("1.1234567891"), t(1, 123_456_789));
        assert_eq!(parse_time("-1.5"), t(-2, 500_000_000));
        assert_eq!(parse_time("-3"), t(-3, 0));
        assert_eq!(parse_time("x"), None);
        assert_eq!(parse_time("1.x"), None);
    }

    #[test]
    fn times_round_trip() {
        for (sec, nsec) in [
            (0, 0),
            (5, 1),
            (1_700_000_000, 999_999_999),
            (-2, 500_000_000),
            (-1, 1),
        ] {
            let ts = Timestamp { sec, nsec };
            assert_eq!(
                parse_time(&format_time(ts)),
                Some(ts),
                "{}",
                format_time(ts)
            );
        }
    }

    #[test]
    fn headers_round_trip_and_match_s3fs_names() {
        let mut h = PosixHeaders {
            mode: Some(0o100644),
            uid: Some(33),
            gid: Some(33),
            mtime: Some(Timestamp {
                sec: 1_600_000_000,
                nsec: 0,
            }),
            ctime: Some(Timestamp {
                sec: 1_600_000_001,
                nsec: 7,
            }),
            atime: None,
            rdev: None,
            xattrs: BTreeMap::new(),
        };
        h.xattrs.insert("user.k".into(), b"v\0\xff".to_vec());
        let meta = encode(&h);
        assert_eq!(meta["mode"], "33188");
        assert_eq!(meta["uid"], "33");
        assert_eq!(meta["mtime"], "1600000000");
        assert_eq!(meta["ctime"], "1600000001.000000007");
        assert!(meta["xattr"].is_ascii());
        assert_eq!(decode(&meta), h);
    }

    #[test]
    fn reads_what_s3fs_writes() {
        // Written by s3fs 1.90 for a regular file, and for a directory (no type bits).
        let mut meta = UserMetadata::new();
        meta.insert("mode".into(), "33184".into());
        meta.insert("mtime".into(), "1500000000.500000000".into());
        meta.insert(
            "xattr".into(),
            "%7B%22user.k%22%3A%22dgBhbA%3D%3D%22%2C%22user.other%22%3A%22Mg%3D%3D%22%7D".into(),
        );
        let h = decode(&meta);
        assert_eq!(h.mode, Some(0o100640));
        assert_eq!(
            h.mtime,
            Some(Timestamp {
                sec: 1_500_000_000,
                nsec: 500_000_000
            })
        );
        assert_eq!(h.xattrs["user.k"], b"v\0al");
        assert_eq!(h.xattrs["user.other"], b"2");
        assert_eq!(encode(&h)["xattr"], meta["xattr"], "the same encoding back");
    }

    #[test]
    fn garbage_headers_are_ignored() {
        let mut meta = UserMetadata::new();
        meta.insert("mode".into(), "rwx".into());
        meta.insert("xattr".into(), "%7Bnot json".into());
        meta.insert("uid".into(), "-1".into());
        assert_eq!(decode(&meta), PosixHeaders::default());
    }
}
