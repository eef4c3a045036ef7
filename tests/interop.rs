//! The mount and other S3 clients see each other's work: objects written with the S3 API
//! appear in the mount within the metadata TTL, files written through the mount are plain
//! objects, deletes show on both sides, and odd keys never break the mount.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use common::{Mount, MountOptions, eventually, pattern, sh};

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

#[test]
fn hostile_keys_deep_and_wide_trees_never_break_the_mount() {
    let m = Mount::with("hostile", one_second_ttl());
    let b = m.bucket();
    // The mount's own prefix as an object with a body, and names POSIX allows but shells
    // dislike: all fine. A leading slash (an empty first component), `.` in the middle and a
    // 256-byte component are not names: hidden.
    b.put("", b"root marker with a body", &[]);
    let ok_names = [
        "nl\nname",
        "tab\tname",
        "sp ace",
        "ünïcödé",
        &"n".repeat(255),
    ];
    for name in ok_names {
        b.put(name, b"ok", &[]);
    }
    for key in ["/leading", "a/./b", &"m".repeat(256)] {
        b.put(key, b"hidden", &[]);
    }
    // 100 levels deep, and 3,000 entries wide.
    let deep = "d/".repeat(100) + "leaf";
    b.put(&deep, b"bottom", &[]);
    b.put_many((0..3000).map(|i| format!("wide/{i:05}")).collect(), b"w");

    let mut names: Vec<String> = fs::read_dir(&m.path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut expected: Vec<String> = ok_names.iter().map(|s| s.to_string()).collect();
    expected.extend(["a", "d", "wide"].map(String::from));
    expected.sort();
    assert_eq!(names, expected);
    for name in ok_names {
        assert_eq!(fs::read(m.p(name)).unwrap(), b"ok", "{name:?}");
    }
    assert_eq!(fs::read(m.p(&deep)).unwrap(), b"bottom");
    assert_eq!(fs::read_dir(m.p("wide")).unwrap().count(), 3000);
    let found = sh(&m.path, "find . -print0 | tr -cd '\\0' | wc -c");
    assert_eq!(
        found.trim(),
        (1 + ok_names.len() + 1 + 100 + 1 + 1 + 3000).to_string()
    );
    // Renaming the deep tree moves every level; the mount keeps working.
    fs::rename(m.p("d"), m.p("moved")).unwrap();
    assert_eq!(
        fs::read(m.p(&format!("moved/{}", &deep[2..]))).unwrap(),
        b"bottom"
    );
    fs::write(m.p("after"), b"fine").unwrap();
    assert_eq!(b.get("after").unwrap(), b"fine");
    assert_eq!(b.get("").unwrap(), b"root marker with a body", "left alone");
}
