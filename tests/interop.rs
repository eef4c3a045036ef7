//! The mount and other S3 clients see each other's work: objects written with the S3 API
//! appear in the mount within the metadata TTL, files written through the mount are plain
//! objects, deletes show on both sides, and odd keys never break the mount.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use common::{Mount, MountOptions, eventually, pattern};

fn one_second_ttl() -> MountOptions {
    MountOptions {
        ttl: "1".into(),
        ..Default::default()
    }
}

#[test]
fn objects_written_with_the_s3_api_appear_in_the_mount() {
    let m = Mount::with("api-to-mount", one_second_ttl());
    let b = m.bucket();
    assert!(fs::read_dir(&m.path).unwrap().next().is_none());
    b.put("test.txt", b"from the api\n", &[]);
    b.put("dir/nested/data.bin", &pattern(3 << 20, 9), &[]);
    assert!(
        eventually(Duration::from_secs(5), || m.p("test.txt").exists()),
        "test.txt did not appear"
    );
    assert_eq!(fs::read(m.p("test.txt")).unwrap(), b"from the api\n");
    assert!(fs::read(m.p("dir/nested/data.bin")).unwrap() == pattern(3 << 20, 9));
    // No headers: the mount's defaults.
    let md = fs::metadata(m.p("test.txt")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o644);
    assert_eq!(md.uid(), unsafe { libc::getuid() });
    let md = fs::metadata(m.p("dir")).unwrap();
    assert!(md.is_dir());
    assert_eq!(md.mode() & 0o7777, 0o755);
    // An overwrite by another client shows after the TTL.
    b.put("test.txt", b"changed", &[]);
    // Within the TTL a read may fail with ESTALE (the object it was pinned to is gone),
    // never return a mix of the two versions.
    assert!(eventually(Duration::from_secs(5), || {
        match fs::read(m.p("test.txt")) {
            Ok(data) => {
                assert!(data == b"changed" || data == b"from the api\n", "{data:?}");
                data == b"changed"
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ESTALE));
                false
            }
        }
    }));
}

#[test]
fn files_written_through_the_mount_are_plain_objects() {
    let m = Mount::new("mount-to-api");
    let b = m.bucket();
    let small = b"hello\n".to_vec();
    let large = pattern(50 << 20, 4);
    fs::write(m.p("small"), &small).unwrap();
    fs::create_dir(m.p("sub")).unwrap();
    fs::write(m.p("sub/large"), &large).unwrap();
    assert_eq!(b.get("small").unwrap(), small);
    assert!(
        b.get("sub/large").unwrap() == large,
        "multipart upload reassembled"
    );
    assert_eq!(b.pending_uploads(), 0);
    assert_eq!(b.keys(), ["small", "sub/", "sub/large"]);
}

#[test]
fn deletes_show_on_the_other_side() {
    let m = Mount::with("deletes", one_second_ttl());
    let b = m.bucket();
    fs::write(m.p("by-mount"), b"1").unwrap();
    b.put("by-api", b"2", &[]);
    b.put("dir/in-dir", b"3", &[]);
    assert!(eventually(Duration::from_secs(5), || m
        .p("by-api")
        .exists()));
    fs::remove_file(m.p("by-mount")).unwrap();
    assert!(b.get("by-mount").is_none(), "gone from the bucket at once");
    b.delete("by-api");
    b.delete("dir/in-dir");
    assert!(
        eventually(Duration::from_secs(5), || !m.p("by-api").exists()),
        "a delete through the API shows in the mount after the TTL"
    );
    assert!(eventually(Duration::from_secs(5), || !m.p("dir").exists()));
}

#[test]
fn odd_keys_are_hidden_and_harmless() {
    let m = Mount::with("odd-keys", one_second_ttl());
    let b = m.bucket();
    for key in [
        "ok.txt",
        "a//b",
        "./dot",
        "../escape",
        "x/../../up",
        "trailing/",
        &"long".repeat(70),
    ] {
        b.put(key, b"data", &[]);
    }
    // A key that is both a file and a prefix: the directory wins.
    b.put("both", b"file", &[]);
    b.put("both/inner", b"inner", &[]);
    // A trailing-slash object with content is a directory.
    b.put("withbody/", b"not empty", &[]);
    // Nextcloud's directory markers.
    b.put("nc/", b"", &[]);
    let mut names: Vec<String> = fs::read_dir(&m.path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["a", "both", "nc", "ok.txt", "trailing", "withbody", "x"],
        "hidden: '.', '..' and over-long components"
    );
    assert!(m.p("both").is_dir());
    assert_eq!(fs::read(m.p("both/inner")).unwrap(), b"inner");
    assert!(m.p("withbody").is_dir());
    assert!(
        fs::read_dir(m.p("a")).unwrap().next().is_none(),
        "'a//b' is hidden"
    );
    assert!(
        fs::read_dir(m.p("x")).unwrap().next().is_none(),
        "'x/../../up' is hidden"
    );
    // Nothing escaped the mount or the cache directory.
    assert!(!m.path.parent().unwrap().join("escape").exists());
    assert!(!m.path.parent().unwrap().join("up").exists());
    // The mount keeps working.
    fs::write(m.p("after"), b"fine").unwrap();
    assert_eq!(b.get("after").unwrap(), b"fine");
}

#[test]
fn objects_without_headers_take_the_mount_options() {
    let m = Mount::with(
        "defaults",
        MountOptions {
            extra: [
                "--uid",
                "33",
                "--gid",
                "44",
                "--file-mode",
                "0600",
                "--dir-mode",
                "0750",
            ]
            .map(String::from)
            .to_vec(),
            ..Default::default()
        },
    );
    let b = m.bucket();
    b.put("plain.txt", b"x", &[]);
    b.put("dir/inner", b"y", &[]);
    let f = fs::metadata(m.p("plain.txt")).unwrap();
    assert_eq!((f.uid(), f.gid(), f.mode() & 0o7777), (33, 44, 0o600));
    let d = fs::metadata(m.p("dir")).unwrap();
    assert_eq!((d.uid(), d.gid(), d.mode() & 0o7777), (33, 44, 0o750));
    let root = fs::metadata(&m.path).unwrap();
    assert_eq!(
        (root.uid(), root.gid(), root.mode() & 0o7777),
        (33, 44, 0o750)
    );
    // Headers win over the defaults.
    b.put("owned", b"z", &[("uid", "7"), ("mode", "33188")]);
    let o = fs::metadata(m.p("owned")).unwrap();
    assert_eq!((o.uid(), o.gid(), o.mode() & 0o7777), (7, 44, 0o644));
}

#[test]
fn read_only_mounts_read_and_refuse_changes() {
    let m = Mount::with(
        "read-only",
        MountOptions {
            extra: vec!["--read-only".into()],
            ..Default::default()
        },
    );
    let b = m.bucket();
    b.put("f", b"data", &[]);
    assert_eq!(fs::read(m.p("f")).unwrap(), b"data");
    let errno = |r: std::io::Result<()>| r.unwrap_err().raw_os_error();
    assert_eq!(errno(fs::write(m.p("g"), b"x")), Some(libc::EROFS));
    assert_eq!(errno(fs::create_dir(m.p("d"))), Some(libc::EROFS));
    assert_eq!(errno(fs::remove_file(m.p("f"))), Some(libc::EROFS));
    assert_eq!(b.keys(), ["f"]);
}
