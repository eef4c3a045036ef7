//! Real programs on the mount: cp -a, rsync -a, tar, git, sed -i, shell appends, and the
//! write-then-rename save of editors. Each result is compared with the same work done on a
//! local directory, and with what the bucket holds.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{Mount, MountOptions, sh};

/// A real source tree to copy around: the sources of the tokio crate this project builds
/// with (about 800 files in 80 directories), else this project's own sources.
fn source_tree() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lock = fs::read_to_string(manifest.join("Cargo.lock")).unwrap_or_default();
    let version = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"tokio\"\n"))
        .and_then(|p| p.lines().find(|l| l.starts_with("version = ")))
        .map(|l| {
            l.trim_start_matches("version = ")
                .trim_matches('"')
                .to_string()
        });
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let (Some(home), Some(version)) = (cargo_home, version)
        && let Ok(registries) = fs::read_dir(home.join("registry/src"))
    {
        for r in registries.flatten() {
            let candidate = r.path().join(format!("tokio-{version}"));
            if candidate.is_dir() {
                return candidate;
            }
        }
    }
    manifest.join("src")
}

/// Lists a tree: name, type, mode, owner, group, mtime, and for non-directories size and
/// link target (a directory's size is the filesystem's own business).
const LISTING: &str = "find . \\( -type d -printf '%P %y %M %U %G %T@\\n' \\) \
     -o -printf '%P %y %M %U %G %T@ %s %l\\n' | sort";

/// Asserts two listings are equal, showing the first differing lines.
fn assert_same_tree(want: &str, got: &str) {
    if want != got {
        let diff: Vec<String> = want
            .lines()
            .zip(got.lines())
            .filter(|(a, b)| a != b)
            .take(10)
            .map(|(a, b)| format!("want: {a}\n got: {b}"))
            .collect();
        panic!(
            "trees differ ({} vs {} entries):\n{}",
            want.lines().count(),
            got.lines().count(),
            diff.join("\n")
        );
    }
}

/// A local scratch directory next to the mount.
fn local(m: &Mount, name: &str) -> PathBuf {
    let dir = m.path.parent().unwrap().join(name);
    fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn tar_extracts_a_source_tree() {
    let m = Mount::new("tar");
    let src = source_tree();
    let work = local(&m, "work");
    sh(
        &work,
        &format!(
            "tar -C {} -cf src.tar . && mkdir ref && tar -C ref -xf src.tar",
            src.display()
        ),
    );
    sh(
        &m.path,
        &format!("mkdir t && tar -C t -xf {}/src.tar", work.display()),
    );
    sh(&work, &format!("diff -r ref {}/t", m.path.display()));
    // Same modes and mtimes as the local extraction.
    let here = sh(&work.join("ref"), LISTING);
    assert_same_tree(&here, &sh(&m.p("t"), LISTING));
    // The bucket holds one object per file and directory.
    let files = sh(&work.join("ref"), "find . -mindepth 1 | wc -l")
        .trim()
        .parse::<usize>()
        .unwrap();
    assert_eq!(m.bucket().keys().len(), files + 1, "entries plus t/");
    // And a fresh mount sees the same tree.
    let mut m = m;
    let fresh = m.cache_dir.with_file_name("cache2");
    m.remount(MountOptions {
        cache_dir: Some(fresh),
        ..Default::default()
    });
    assert_same_tree(&here, &sh(&m.p("t"), LISTING));
}

#[test]
fn cp_a_and_rsync_a_preserve_everything() {
    let m = Mount::new("copy");
    let src = source_tree();
    let work = local(&m, "work");
    sh(
        &work,
        &format!(
            "cp -a {}/. tree && chmod 0600 tree/Cargo.toml && ln -s Cargo.toml tree/link \
             && touch -h -d @1234567890 tree/link",
            src.display()
        ),
    );
    sh(&m.path, &format!("cp -a {}/tree cp", work.display()));
    sh(
        &m.path,
        &format!("rsync -a {}/tree/ rsync/", work.display()),
    );
    let want = sh(&work.join("tree"), LISTING);
    assert_same_tree(&want, &sh(&m.p("cp"), LISTING));
    assert_same_tree(&want, &sh(&m.p("rsync"), LISTING));
    // A second rsync finds nothing to do.
    let changes = sh(
        &m.path,
        &format!("rsync -a --itemize-changes {}/tree/ rsync/", work.display()),
    );
    assert_eq!(changes.trim(), "", "rsync saw differences:\n{changes}");
    sh(&work, &format!("diff -r tree {}/rsync", m.path.display()));
}

#[test]
fn git_init_add_and_commit() {
    let m = Mount::new("git");
    let out = sh(
        &m.path,
        "git init -q repo && cd repo \
         && git config user.email t@example.com && git config user.name Tester \
         && printf 'one\\n' > a.txt && mkdir -p sub && printf 'two\\n' > sub/b.txt \
         && git add . && git commit -qm first \
         && printf 'three\\n' >> a.txt && git commit -qam second \
         && git mv a.txt renamed.txt && git commit -qm third \
         && git fsck --strict 2>&1 && git log --oneline | wc -l && git status --porcelain",
    );
    assert!(out.trim_end().ends_with('3'), "{out}");
    let clone = local(&m, "clone");
    sh(
        &clone,
        &format!(
            "git clone -q {}/repo c && cat c/renamed.txt",
            m.path.display()
        ),
    );
    assert_eq!(
        fs::read_to_string(clone.join("c/renamed.txt")).unwrap(),
        "one\nthree\n"
    );
}

#[test]
fn sed_append_and_editor_saves() {
    let m = Mount::new("edit");
    let b = m.bucket();
    sh(
        &m.path,
        "printf 'alpha\\nbeta\\n' > f && sed -i 's/beta/gamma/' f \
         && echo delta >> f && echo epsilon >> f",
    );
    assert_eq!(b.get("f").unwrap(), b"alpha\ngamma\ndelta\nepsilon\n");
    // What editors do: write a temporary file, fsync it, rename it over the original.
    sh(
        &m.path,
        "printf 'v1\\n' > doc.txt && chmod 640 doc.txt \
         && python3 -c \"import os\nf=open('.doc.txt.tmp','w'); f.write('v2\\\\n'); f.flush(); os.fsync(f.fileno()); f.close()\nos.chmod('.doc.txt.tmp', 0o640)\nos.rename('.doc.txt.tmp','doc.txt')\"",
    );
    assert_eq!(b.get("doc.txt").unwrap(), b"v2\n");
    assert!(b.get(".doc.txt.tmp").is_none());
    // vim's own save (writebackup: rename the original away, write anew, delete backup).
    sh(
        &m.path,
        "vim -u NONE -i NONE -N -n -e -s -c 'set backup writebackup backupcopy=no' \
         -c '%s/v2/v3/' -c 'wq' doc.txt",
    );
    assert_eq!(fs::read(m.p("doc.txt")).unwrap(), b"v3\n");
    assert_eq!(b.get("doc.txt").unwrap(), b"v3\n");
    assert_eq!(
        b.keys(),
        ["doc.txt", "f"],
        "no temporary or backup file left"
    );
}
