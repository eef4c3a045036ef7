//! The truthful view (design.md §4): a mount shows what the bucket holds from the first look,
//! on a fresh cache directory as on a warm one, whoever wrote the objects (s3fs, another
//! s3bridge mount, a plain S3 client); what `stat` shows changes only when the bucket did;
//! and a change made outside moves the directory's mtime, which is how Nextcloud notices it
//! (its Watcher compares `filemtime(folder)` with what it stored, shared/nextcloud.md).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::s3fs::S3fs;
use common::{Bucket, Mount, MountOptions, Server, eventually, sh, unique};

/// What every entry shows, one line each: name, type, mode, owner, group, size, mtime,
/// ctime (both to the nanosecond) and link target.
const DESCRIBE: &str = "find . -mindepth 1 -printf '%P %y %m %U %G %s %T@ %C@ %l\\n' | sort";

fn describe(dir: &Path) -> String {
    sh(dir, DESCRIBE)
}

/// `describe` without what another filesystem may show differently for directories (their
/// size and ctime), to compare with s3fs itself.
fn portable(dir: &Path) -> String {
    sh(
        dir,
        "find . -mindepth 1 \\( -type d -printf '%P %y %m %U %G %T@\\n' \\) \
         -o -printf '%P %y %m %U %G %s %T@ %l\\n' | sort",
    )
}

fn ttl(secs: u32) -> MountOptions {
    MountOptions {
        ttl: secs.to_string(),
        ..MountOptions::default()
    }
}

/// Files of every type with modes, owners and times set: what s3fs and s3bridge store in
/// their headers. Directory times are set last, as a restore would.
const MAKE_TREE: &str = "
    mkdir -p d/sub
    printf 'content\\n' > d/file
    chmod 0600 d/file
    chown 33:33 d/file
    touch -d '2010-01-01 00:00:00 UTC' d/file
    printf 'x' > exec
    chmod 0755 exec
    touch -d @1400000000.5 exec
    ln -s d/file link
    mkfifo pipe
    chmod 0640 pipe
    chmod 0750 d
    touch -d @1300000000 d/sub d
";

/// The checks of a first look that `find` alone does not make: `find -type l`, and PHP's
/// view of the symlink and the FIFO (Nextcloud's storage layer calls filetype/is_link).
fn assert_types(dir: &Path) {
    assert_eq!(sh(dir, "find . -type l"), "./link\n");
    assert_eq!(sh(dir, "find . -type p"), "./pipe\n");
    let php = sh(
        dir,
        "php -r 'echo filetype(\"link\"), \" \", var_export(is_link(\"link\"), true), \" \", \
         filetype(\"pipe\"), \" \", filetype(\"d\"), \" \", decoct(fileperms(\"d/file\") & 0777), \
         \" \", fileowner(\"d/file\");'",
    );
    assert_eq!(php, "link true fifo dir 600 33");
}

/// The first look of a fresh mount, then the same after opening every file, after the TTL,
/// after a remount of the same cache directory, and on another fresh cache directory.
fn assert_exact_and_stable(prefix: &str, want_portable: Option<&str>) -> String {
    let mut m = Mount::of_prefix(prefix, ttl(1));
    let first = describe(&m.path);
    assert_types(&m.path);
    if let Some(want) = want_portable {
        assert_eq!(
            portable(&m.path),
            want,
            "the writer's view, from the first look"
        );
    }
    assert_eq!(sh(&m.path, "cat d/file exec link"), "content\nxcontent\n");
    assert_eq!(describe(&m.path), first, "after the files were opened");
    std::thread::sleep(Duration::from_millis(1500)); // past --metadata-ttl 1
    assert_eq!(describe(&m.path), first, "after the TTL");
    m.remount(ttl(1));
    assert_eq!(describe(&m.path), first, "after a remount");
    let other = Mount::of_prefix(prefix, ttl(1));
    assert_eq!(
        describe(&other.path),
        first,
        "on another fresh cache directory"
    );
    first
}

#[test]
fn a_fresh_mount_shows_what_s3fs_wrote_from_the_first_look_and_keeps_showing_it() {
    let server = Server::from_env();
    let prefix = format!("{}/", unique("truth-s3fs"));
    let want = {
        let s3fs = S3fs::mount(&server, &prefix);
        sh(&s3fs.path, MAKE_TREE);
        portable(&s3fs.path)
    };
    assert!(
        want.contains("d/file f 600 33 33 8 1262304000.0000000000 \n"),
        "{want}"
    );
    assert_exact_and_stable(&prefix, Some(&want));
}

#[test]
fn a_fresh_mount_shows_what_another_s3bridge_mount_wrote_from_the_first_look() {
    let prefix = format!("{}/", unique("truth-s3bridge"));
    let writer = Mount::of_prefix(&prefix, MountOptions::default());
    sh(&writer.path, MAKE_TREE);
    let want = describe(&writer.path);
    assert!(want.contains("link l 777 0 0 6 "), "{want}");
    assert!(want.contains("pipe p 640 "), "{want}");
    assert!(
        want.contains("d d 750 0 0 0 1300000000.0000000000 "),
        "{want}"
    );
    let seen = assert_exact_and_stable(&prefix, None);
    assert_eq!(seen, want, "the writer's view, ctimes included");
}

/// A Nextcloud data directory's folder as the Watcher sees it, through PHP as www-data:
/// `filemtime()` (whole seconds, PHP's stat cache cleared) and `scandir()`.
fn nextcloud_view(mount: &Path, folder: &str) -> (i64, Vec<String>) {
    let script = format!(
        "clearstatcache(); $d = '{}/{folder}'; echo filemtime($d), \"\\n\", \
         implode(\"\\n\", array_diff(scandir($d), ['.', '..']));",
        mount.display()
    );
    let out = std::process::Command::new("runuser")
        .args(["-u", "www-data", "--", "php", "-r", &script])
        .output()
        .expect("php (Debian's php package)");
    assert!(
        out.status.success(),
        "php as www-data: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let mtime = lines.next().unwrap().parse().unwrap();
    (mtime, lines.map(str::to_string).collect())
}

/// Waits (up to the TTL and a margin) until Nextcloud's check of `folder` fires — its mtime
/// is above `stored` — and its listing satisfies `listed`; returns the new mtime.
fn until_noticed(
    mount: &Mount,
    folder: &str,
    stored: i64,
    ttl: Duration,
    listed: impl Fn(&[String]) -> bool,
) -> i64 {
    let deadline = Instant::now() + ttl + Duration::from_secs(5);
    loop {
        let (mtime, names) = nextcloud_view(&mount.path, folder);
        if mtime > stored && listed(&names) {
            return mtime;
        }
        assert!(
            Instant::now() < deadline,
            "{folder}: filemtime {mtime} not above the stored {stored}, or the listing \
             {names:?} without the change"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn nextcloud_notices_outside_changes_through_the_folder_mtime() {
    let ttl_secs = 2;
    let ttl_d = Duration::from_secs(ttl_secs as u64);
    let opts = MountOptions {
        ttl: ttl_secs.to_string(),
        ..MountOptions::nextcloud()
    };
    let mut m = Mount::with("truth-nextcloud", opts.clone());
    let bucket: Bucket = m.bucket();
    // A user's files folder, as another S3 client (or Nextcloud's S3 backend) lays it out.
    bucket.put("alice/files/report.odt", b"first", &[]);
    bucket.put("alice/files/photos/cat.jpg", b"meow", &[]);
    let (stored, names) = nextcloud_view(&m.path, "alice/files");
    assert_eq!(names, ["photos", "report.odt"]);

    bucket.put("alice/files/test.txt", b"put with aws s3 cp", &[]);
    let stored = until_noticed(&m, "alice/files", stored, ttl_d, |n| {
        n.iter().any(|n| n == "test.txt")
    });
    bucket.delete("alice/files/report.odt");
    let stored = until_noticed(&m, "alice/files", stored, ttl_d, |n| {
        !n.iter().any(|n| n == "report.odt")
    });
    bucket.put("alice/files/test.txt", b"replaced, longer", &[]);
    let stored = until_noticed(&m, "alice/files", stored, ttl_d, |_| true);
    assert_eq!(
        std::fs::read(m.p("alice/files/test.txt")).unwrap(),
        b"replaced, longer"
    );
    // A subfolder: Nextcloud checks it when it is visited.
    let (photos, _) = nextcloud_view(&m.path, "alice/files/photos");
    bucket.put("alice/files/photos/dog.jpg", b"woof", &[]);
    until_noticed(&m, "alice/files/photos", photos, ttl_d, |n| {
        n.iter().any(|n| n == "dog.jpg")
    });

    // Nothing changes: for twice the TTL, and across a remount, the clock stays put.
    let (now, _) = nextcloud_view(&m.path, "alice/files");
    assert_eq!(now, stored);
    let until = Instant::now() + 2 * ttl_d;
    while Instant::now() < until {
        assert_eq!(
            nextcloud_view(&m.path, "alice/files").0,
            stored,
            "no change, no move"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    m.remount(opts);
    assert_eq!(
        nextcloud_view(&m.path, "alice/files").0,
        stored,
        "after a remount"
    );
}

#[test]
fn a_read_after_an_outside_overwrite_returns_the_new_bytes() {
    let m = Mount::with("truth-overwrite", ttl(1));
    std::fs::write(m.p("f"), b"old contents").unwrap();
    assert_eq!(std::fs::read(m.p("f")).unwrap(), b"old contents");
    let bucket = m.bucket();
    for new in [&b"new contents"[..], b"other, longer contents"] {
        bucket.put("f", new, &[]);
        let fresh = eventually(Duration::from_secs(6), || {
            std::fs::read(m.p("f")).unwrap() == new
                && std::fs::metadata(m.p("f")).unwrap().len() == new.len() as u64
        });
        assert!(
            fresh,
            "still {:?}",
            String::from_utf8_lossy(&std::fs::read(m.p("f")).unwrap())
        );
    }
}

/// One entry as `stat` shows it: type, mode, owner, group, size, mtime, ctime. Of a
/// directory only type, mode and owner: its times are each mount's own (they move with the
/// changes of its entries that mount made or saw, design.md §4).
fn stat(m: &Mount, rel: &str) -> Option<String> {
    let format = "%F %a %u %g $([ -d {rel} ] || echo %s %.9Y %.9Z)";
    let script = format!("stat -c \"{}\" {rel}", format.replace("{rel}", rel));
    let out = common::sh_output(&m.path, &script);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn two_front_ends_see_each_others_changes_with_exact_attributes() {
    let prefix = format!("{}/", unique("truth-two"));
    let a = Mount::of_prefix(&prefix, ttl(2));
    let b = Mount::of_prefix(&prefix, ttl(2));
    let within_ttl = Duration::from_secs(2 + 5);
    // Waits until `rel` on b shows what it shows on a.
    let agree = |rel: &str| {
        let want = stat(&a, rel);
        let same = eventually(within_ttl, || stat(&b, rel) == want);
        assert!(same, "{rel}: {:?} on b, {want:?} on a", stat(&b, rel));
    };
    sh(&b.path, "ls -l >/dev/null");
    sh(
        &a.path,
        "printf abc > f && chmod 0640 f && chown 33:34 f && touch -d @1500000000 f",
    );
    agree("f");
    sh(&a.path, "printf 'longer contents' > f");
    agree("f");
    assert_eq!(std::fs::read(b.p("f")).unwrap(), b"longer contents");
    sh(&a.path, "chmod 0600 f");
    agree("f");
    sh(
        &a.path,
        "mkdir -m 0750 dir && printf x > dir/inner && ln -s dir/inner dir/link && mkfifo dir/pipe",
    );
    for rel in ["dir", "dir/inner", "dir/link", "dir/pipe"] {
        agree(rel);
    }
    assert_eq!(sh(&b.path, "readlink dir/link"), "dir/inner\n");
    sh(&a.path, "mv dir moved");
    let moved = eventually(within_ttl, || {
        stat(&b, "dir").is_none() && stat(&b, "moved/inner").is_some()
    });
    assert!(moved, "the folder move shows on b");
    for rel in ["moved/inner", "moved/link", "moved/pipe"] {
        agree(rel);
    }
    sh(&a.path, "rm f");
    assert!(
        eventually(within_ttl, || stat(&b, "f").is_none()),
        "the delete shows on b"
    );
}

/// The names a directory stream gives from where it stands to its end.
fn read_stream(dir: *mut libc::DIR) -> Vec<String> {
    let mut names = Vec::new();
    loop {
        // SAFETY: `dir` is an open stream; the entry is read before the next call.
        let entry = unsafe { libc::readdir(dir) };
        if entry.is_null() {
            return names;
        }
        let name = unsafe { std::ffi::CStr::from_ptr((*entry).d_name.as_ptr()) };
        names.push(name.to_string_lossy().into_owned());
    }
}

#[test]
fn a_directory_kept_open_and_rewound_sees_outside_changes_after_the_ttl() {
    // A server that keeps a directory open and rewinds it to poll (the kernel answers a
    // rewound stream from the entries it cached, without asking the mount).
    let m = Mount::with("truth-rewind", ttl(1));
    std::fs::write(m.p("first"), b"1").unwrap();
    let path = std::ffi::CString::new(m.path.as_os_str().as_encoded_bytes()).unwrap();
    // Twice, so that the second open may keep what the first one cached.
    for _ in 0..2 {
        let names = std::fs::read_dir(&m.path).unwrap().count();
        assert_eq!(names, 1);
    }
    // SAFETY: a valid path; the stream is closed below.
    let dir = unsafe { libc::opendir(path.as_ptr()) };
    assert!(!dir.is_null());
    assert!(read_stream(dir).contains(&"first".to_string()));
    m.bucket().put("second", b"2", &[]);
    let seen = eventually(Duration::from_secs(8), || {
        unsafe { libc::rewinddir(dir) };
        read_stream(dir).contains(&"second".to_string())
    });
    unsafe { libc::closedir(dir) };
    assert!(
        seen,
        "a rewound stream never showed the object put from outside"
    );
}
