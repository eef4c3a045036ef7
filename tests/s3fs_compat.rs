//! Buckets move between s3fs and s3bridge with nothing lost: a tree written through Debian's
//! s3fs shows the same modes, owners, mtimes, link targets and directories in s3bridge, and
//! the reverse.

mod common;

use std::path::Path;

use common::s3fs::S3fs;
use common::{Mount, MountOptions, Server, sh, unique};

/// Writes the same small tree with chmod, chown, utimes, a symlink, directories and an xattr.
const MAKE_TREE: &str = "
    mkdir -p d/sub
    chmod 0750 d
    printf 'content\\n' > d/file
    chmod 0640 d/file
    chown 1234:5678 d/file
    touch -d @1500000000.25 d/file
    printf 'x' > exec
    chmod 0755 exec
    touch -d @1400000000 exec
    ln -s d/file link
    mkdir empty
    python3 -c \"import os; os.setxattr('d/file', 'user.tag', b'blue')\"
";

/// What both filesystems must agree on.
const DESCRIBE: &str = "
    find . -mindepth 1 \\( -type d -printf '%P %y %m\\n' \\) \\
        -o -printf '%P %y %m %U %G %T@ %s %l\\n' | sort
    python3 -c \"import os; print(os.getxattr('d/file', 'user.tag'))\"
";

/// s3bridge serves xattrs with --xattr, as s3fs does with use_xattr.
fn with_xattrs() -> MountOptions {
    MountOptions {
        extra: vec!["--xattr".into()],
        ..MountOptions::default()
    }
}

fn describe(dir: &Path) -> String {
    sh(dir, DESCRIBE)
}

#[test]
fn a_tree_written_by_s3fs_reads_the_same_in_s3bridge() {
    let server = Server::from_env();
    let prefix = format!("{}/", unique("from-s3fs"));
    let s3fs = S3fs::mount(&server, &prefix);
    sh(&s3fs.path, MAKE_TREE);
    let want = describe(&s3fs.path);
    assert!(
        want.contains("d/file f 640 1234 5678 1500000000.2500000000 8"),
        "{want}"
    );
    // From the first look: every header is read with the listing, symlinks are symlinks.
    let m = Mount::of_prefix(&prefix, with_xattrs());
    assert_eq!(describe(&m.path), want);
    assert_eq!(std::fs::read(m.p("link")).unwrap(), b"content\n");
    drop(m);
    // --trust-listings shows listed files with the defaults until they are opened; the
    // symlink, listed as a file, is found to be a symlink when opened (ESTALE, the kernel
    // looks it up again) and then everything reads as s3fs wrote it.
    let trusting = MountOptions {
        extra: vec!["--trust-listings".into(), "--xattr".into()],
        ..MountOptions::default()
    };
    let m = Mount::of_prefix(&prefix, trusting);
    let listed = sh(&m.path, "ls -l . d");
    assert!(listed.contains("-rw-r--r--"), "listing view: {listed}");
    assert_eq!(std::fs::read(m.p("link")).unwrap(), b"content\n");
    assert_eq!(std::fs::read(m.p("d/file")).unwrap(), b"content\n");
    assert_eq!(std::fs::read(m.p("exec")).unwrap(), b"x");
    std::thread::sleep(std::time::Duration::from_secs(6)); // the kernel's attribute TTL
    assert_eq!(describe(&m.path), want);
}

#[test]
fn a_tree_written_by_s3bridge_reads_the_same_in_s3fs() {
    let server = Server::from_env();
    let prefix = format!("{}/", unique("to-s3fs"));
    let want = {
        let m = Mount::of_prefix(&prefix, with_xattrs());
        sh(&m.path, MAKE_TREE);
        describe(&m.path)
    };
    assert!(
        want.contains("d/file f 640 1234 5678 1500000000.2500000000 8"),
        "{want}"
    );
    let s3fs = S3fs::mount(&server, &prefix);
    assert_eq!(describe(&s3fs.path), want);
    assert_eq!(std::fs::read(s3fs.path.join("link")).unwrap(), b"content\n");
}
