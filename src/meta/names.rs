//! Mapping between POSIX names and S3 keys (design.md §3).
//!
//! A path `/a/b/c` is the key `PREFIX + "a/b/c"`; a directory is `PREFIX + "a/b/"`. S3 keys are
//! any UTF-8 up to 1,024 bytes, so some keys cannot be POSIX names (an empty component from
//! `a//b`, `.` or `..`, a component over 255 bytes, a NUL): those are hidden and logged once,
//! never shown, never fatal, and never allowed to reach outside the mount.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Mutex;

use tracing::warn;

use crate::store::MAX_KEY_LEN;

/// Longest name of one directory entry, in bytes (Linux's NAME_MAX).
pub const NAME_MAX: usize = 255;

/// Why a name cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Longer than [`NAME_MAX`], or the key it makes is longer than S3 allows.
    #[error("name too long")]
    TooLong,
    /// Empty, `.`, `..`, or contains `/` or NUL.
    #[error("not a valid name")]
    Invalid,
    /// Not UTF-8: S3 keys are UTF-8.
    #[error("name is not UTF-8, which S3 keys must be")]
    NotUtf8,
}

impl NameError {
    /// The errno for a caller that used this name.
    pub fn errno(self) -> i32 {
        match self {
            NameError::TooLong => libc::ENAMETOOLONG,
            NameError::Invalid => libc::EINVAL,
            NameError::NotUtf8 => libc::EILSEQ,
        }
    }
}

/// Checks a name the kernel gave us and returns it as UTF-8.
pub fn check_name(name: &OsStr) -> Result<&str, NameError> {
    let bytes = name.as_bytes();
    if bytes.len() > NAME_MAX {
        return Err(NameError::TooLong);
    }
    let name = std::str::from_utf8(bytes).map_err(|_| NameError::NotUtf8)?;
    if is_valid_component(name) {
        Ok(name)
    } else {
        Err(NameError::Invalid)
    }
}

/// Whether `name` can be a directory entry.
pub fn is_valid_component(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= NAME_MAX
        && !name.contains('/')
        && !name.contains('\0')
}

/// The key of a path below the mount's prefix. `components` run from the root down; `dir`
/// appends the trailing `/` of a directory marker. Fails with [`NameError::TooLong`] when the
/// key would exceed S3's limit.
pub fn key_of(prefix: &str, components: &[String], dir: bool) -> Result<String, NameError> {
    let mut key = String::with_capacity(prefix.len() + 64);
    key.push_str(prefix);
    for (i, c) in components.iter().enumerate() {
        if i > 0 {
            key.push('/');
        }
        key.push_str(c);
    }
    if dir && !components.is_empty() {
        key.push('/');
    }
    if key.len() > MAX_KEY_LEN {
        return Err(NameError::TooLong);
    }
    Ok(key)
}

/// What one key of a delimited listing of `dir_prefix` means for that directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listed<'a> {
    /// The directory's own marker object (`dir_prefix` itself).
    Marker,
    /// A file (or symlink, or special file) named so.
    File(&'a str),
    /// A subdirectory named so (from a common prefix).
    Dir(&'a str),
    /// Not representable: hidden.
    Hidden,
}

/// Classifies an object key of a listing of `dir_prefix` (a key that starts with it).
pub fn classify_object<'a>(dir_prefix: &str, key: &'a str) -> Listed<'a> {
    match key.strip_prefix(dir_prefix) {
        Some("") => Listed::Marker,
        Some(name) if is_valid_component(name) => Listed::File(name),
        _ => Listed::Hidden,
    }
}

/// Classifies a common prefix (`dir_prefix + name + "/"`) of a listing of `dir_prefix`.
pub fn classify_prefix<'a>(dir_prefix: &str, prefix: &'a str) -> Listed<'a> {
    match prefix
        .strip_prefix(dir_prefix)
        .and_then(|p| p.strip_suffix('/'))
    {
        Some(name) if is_valid_component(name) => Listed::Dir(name),
        _ => Listed::Hidden,
    }
}

/// Logs each hidden key once per process, so a bucket full of odd keys does not flood the log.
#[derive(Debug, Default)]
pub struct HiddenKeyLog {
    seen: Mutex<HashSet<String>>,
}

impl HiddenKeyLog {
    /// Logs `key` as hidden, the first time only.
    pub fn hide(&self, key: &str) {
        let mut seen = self.seen.lock().unwrap();
        // Bounded: a hostile bucket must not grow memory without limit.
        if seen.len() < 100_000 && seen.insert(key.to_string()) {
            warn!(
                key,
                "object key is not a valid POSIX path (empty, '.' or '..' component, or a \
                 component over 255 bytes); it is not shown in the mount"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert_eq!(check_name(OsStr::new("a.txt")), Ok("a.txt"));
        assert_eq!(check_name(OsStr::new(".")), Err(NameError::Invalid));
        assert_eq!(check_name(OsStr::new("..")), Err(NameError::Invalid));
        assert_eq!(check_name(OsStr::new("")), Err(NameError::Invalid));
        assert_eq!(
            check_name(OsStr::new(&"x".repeat(256))),
            Err(NameError::TooLong)
        );
        assert!(check_name(OsStr::new(&"x".repeat(255))).is_ok());
        assert_eq!(
            check_name(OsStr::from_bytes(b"\xff")),
            Err(NameError::NotUtf8)
        );
    }

    #[test]
    fn keys_join_components_under_the_prefix() {
        let c = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(key_of("", &c(&["a", "b"]), false).unwrap(), "a/b");
        assert_eq!(key_of("p/", &c(&["a", "b"]), true).unwrap(), "p/a/b/");
        assert_eq!(key_of("p/", &[], true).unwrap(), "p/");
        let long = c(&[
            &"x".repeat(255),
            &"y".repeat(255),
            &"z".repeat(255),
            &"w".repeat(255),
        ]);
        assert_eq!(key_of("pp/", &long, false), Err(NameError::TooLong));
    }

    #[test]
    fn listing_keys_are_classified() {
        assert_eq!(classify_object("d/", "d/"), Listed::Marker);
        assert_eq!(classify_object("d/", "d/f"), Listed::File("f"));
        assert_eq!(classify_object("d/", "d/.."), Listed::Hidden);
        assert_eq!(classify_object("", "."), Listed::Hidden);
        assert_eq!(
            classify_object("d/", &format!("d/{}", "x".repeat(256))),
            Listed::Hidden
        );
        assert_eq!(classify_prefix("d/", "d/sub/"), Listed::Dir("sub"));
        assert_eq!(classify_prefix("d/", "d//"), Listed::Hidden);
        assert_eq!(classify_prefix("d/", "d/./"), Listed::Hidden);
    }
}
