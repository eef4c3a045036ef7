//! Security through a real mount: what s3bridge keeps on local disk is private to its user,
//! credentials never reach the log even at trace level, and with `--allow-other` the kernel
//! enforces file modes for other users.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::{Mount, MountOptions, pattern, write_checked};

/// Every file and directory under `dir`, recursively.
fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        out.push(p.clone());
        if p.is_dir() && !p.is_symlink() {
            walk(&p, out);
        }
    }
}

#[test]
fn the_cache_directory_is_private_and_no_secret_is_logged() {
    let opts = MountOptions {
        extra: vec!["--write-back".into()],
        // Every crate at trace level: the AWS SDK's HTTP layers too.
        rust_log: Some("trace".into()),
        ..Default::default()
    };
    let mut m = Mount::with("private", opts);
    // Some of everything: staged data, cached blocks, a multipart upload, a listing.
    fs::create_dir(m.p("d")).unwrap();
    write_checked(&m.p("d/small"), b"secret data").unwrap();
    write_checked(&m.p("big"), &pattern(20_000_000, 3)).unwrap();
    assert_eq!(fs::read(m.p("d/small")).unwrap(), b"secret data");
    let out = Command::new(common::binary())
        .args(["flush"])
        .arg(&m.path)
        .output()
        .unwrap();
    assert!(out.status.success());

    let mode = |p: &Path| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&m.cache_dir), 0o700, "the cache directory");
    let mut all = Vec::new();
    walk(&m.cache_dir, &mut all);
    assert!(all.iter().any(|p| p.ends_with("meta.db")));
    assert!(all.iter().any(|p| p.ends_with("meta.db-wal")));
    for p in &all {
        // A write-back mount retires staged files in the background: one gone since the walk
        // is no leak.
        let md = match fs::symlink_metadata(p) {
            Ok(md) => md,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("{}: {e}", p.display()),
        };
        let others = md.mode() & 0o077;
        assert_eq!(
            others,
            0,
            "{} is {:o}: readable by others",
            p.display(),
            md.mode()
        );
    }

    let log = m.unmount();
    assert!(log.contains("TRACE"), "the log is at trace level");
    let secret = &m.server.secret_key;
    assert!(
        !log.contains(secret.as_str()),
        "the secret key is in the log"
    );
    // Nor any signing material derived from it.
    assert!(
        !log.contains("Signature="),
        "a request signature is in the log"
    );
}

#[test]
fn with_allow_other_the_kernel_enforces_modes_for_other_users() {
    let m = Mount::with(
        "allow-other",
        MountOptions {
            extra: vec!["--allow-other".into()],
            ..Default::default()
        },
    );
    write_checked(&m.p("private"), b"root only").unwrap();
    fs::set_permissions(m.p("private"), fs::Permissions::from_mode(0o600)).unwrap();
    write_checked(&m.p("public"), b"everyone").unwrap();
    fs::set_permissions(m.p("public"), fs::Permissions::from_mode(0o644)).unwrap();
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .args(args)
            .output()
            .unwrap()
    };
    let private = m.p("private");
    let denied = as_nobody(&["cat", private.to_str().unwrap()]);
    assert!(!denied.status.success(), "another user read a 0600 file");
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    let public = m.p("public");
    let allowed = as_nobody(&["cat", public.to_str().unwrap()]);
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
    assert_eq!(allowed.stdout, b"everyone");
    let write = as_nobody(&["sh", "-c", &format!("echo x > {}", public.display())]);
    assert!(!write.status.success(), "another user wrote a 0644 file");
    // The modes hold after a remount: they are in the objects' headers.
    assert_eq!(
        m.bucket().head("private").unwrap().0["mode"],
        (libc::S_IFREG | 0o600).to_string()
    );
}
