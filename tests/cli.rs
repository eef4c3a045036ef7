//! The command line: background mounts return once ready, unmount works, and every error a
//! user can make before mounting is one clear line and a non-zero exit — never a hang.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{Mount, Server, binary, is_mounted, scratch, unique};

/// Runs `s3bridge` with `args` against the test server, with the given credentials; fails
/// the test if it takes longer than 60 s.
fn run(args: &[&str], key: &str, secret: &str) -> Output {
    run_with(args, |cmd| {
        cmd.env("AWS_ACCESS_KEY_ID", key)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .env("AWS_REGION", "us-east-1");
    })
}

/// Runs `s3bridge` with `args` in the environment `env` makes; fails the test if it takes
/// longer than 60 s.
fn run_with(args: &[&str], env: impl FnOnce(&mut Command)) -> Output {
    let start = Instant::now();
    let mut cmd = Command::new("timeout");
    cmd.arg("60").arg(binary()).args(args);
    env(&mut cmd);
    let out = cmd.output().unwrap();
    assert_ne!(out.status.code(), Some(124), "s3bridge {args:?} hung");
    assert!(start.elapsed() < Duration::from_secs(60));
    out
}

fn fresh_dirs() -> (PathBuf, PathBuf) {
    let base = scratch().join(unique("cli"));
    let mnt = base.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    (mnt, base.join("cache"))
}

/// Unmounts on drop, so a failing test leaves no mount behind.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn mount_args<'a>(
    source: &'a str,
    mnt: &'a Path,
    cache: &'a Path,
    endpoint: &'a str,
) -> Vec<&'a str> {
    vec![
        "mount",
        source,
        mnt.to_str().unwrap(),
        "--endpoint-url",
        endpoint,
        "--cache-dir",
        cache.to_str().unwrap(),
    ]
}

/// Asserts a failed run printed exactly one line to stderr containing `needle`.
fn assert_one_line_error(out: &Output, needle: &str) {
    assert!(!out.status.success(), "expected a failure");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected, got:\n{err}");
    assert!(lines[0].starts_with("s3bridge: "), "{err}");
    assert!(lines[0].contains(needle), "'{needle}' not in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn background_mount_returns_when_ready_and_unmount_stops_it() {
    let s = Server::from_env();
    let (mnt, cache) = fresh_dirs();
    let _guard = Unmount(mnt.clone());
    let source = format!("{}:{}/", s.bucket, unique("daemon"));
    let out = run(
        &mount_args(&source, &mnt, &cache, &s.endpoint),
        &s.access_key,
        &s.secret_key,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(&mnt), "mounted when the command returns");
    std::fs::write(mnt.join("f"), b"daemon").unwrap();
    assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"daemon");
    // A second mount on the same point is refused.
    let again = run(
        &mount_args(&source, &mnt, &cache, &s.endpoint),
        &s.access_key,
        &s.secret_key,
    );
    assert_one_line_error(&again, "already a mount point");
    let out = run(
        &["unmount", mnt.to_str().unwrap()],
        &s.access_key,
        &s.secret_key,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(&mnt));
    // unmount returned after the daemon let go of its cache: it can be mounted again at once.
    let out = run(
        &mount_args(&source, &mnt, &cache, &s.endpoint),
        &s.access_key,
        &s.secret_key,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"daemon");
    let unmount = || {
        run(
            &["unmount", mnt.to_str().unwrap()],
            &s.access_key,
            &s.secret_key,
        )
    };
    assert!(unmount().status.success());
    assert_one_line_error(&unmount(), "is not mounted");
    // The log went to the cache directory.
    let log = std::fs::read_to_string(cache.join("s3bridge.log")).unwrap();
    assert!(log.contains("mounted"), "{log}");
}

#[test]
fn a_missing_bucket_is_one_clear_line() {
    let s = Server::from_env();
    let (mnt, cache) = fresh_dirs();
    let _guard = Unmount(mnt.clone());
    for fg in [true, false] {
        let mut args = mount_args("no-such-bucket-here", &mnt, &cache, &s.endpoint);
        if fg {
            args.push("-f");
        }
        let out = run(&args, &s.access_key, &s.secret_key);
        assert_one_line_error(&out, "does not exist");
        assert!(!is_mounted(&mnt));
    }
}

#[test]
fn bad_credentials_are_one_clear_line() {
    let s = Server::from_env();
    let (mnt, cache) = fresh_dirs();
    let _guard = Unmount(mnt.clone());
    let out = run(
        &mount_args(&s.bucket, &mnt, &cache, &s.endpoint),
        "GK0000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000000",
    );
    assert_one_line_error(&out, "check the credentials");
    assert!(!is_mounted(&mnt));
}

#[test]
fn no_credentials_anywhere_is_its_own_clear_line() {
    let s = Server::from_env();
    let (mnt, cache) = fresh_dirs();
    let _guard = Unmount(mnt.clone());
    // A new user: nothing in the environment, no ~/.aws, no instance role on this machine.
    let home = cache.with_file_name("home");
    std::fs::create_dir_all(&home).unwrap();
    for fg in [true, false] {
        let mut args = mount_args(&s.bucket, &mnt, &cache, &s.endpoint);
        if fg {
            args.push("-f");
        }
        let out = run_with(&args, |cmd| {
            cmd.env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .env("HOME", &home);
        });
        assert_one_line_error(&out, "no AWS credentials found");
        let err = String::from_utf8_lossy(&out.stderr);
        // Where it looked and how to give them; not a server to check.
        for needle in [
            "AWS_ACCESS_KEY_ID",
            "~/.aws/credentials",
            "credentials=FILE",
        ] {
            assert!(err.contains(needle), "'{needle}' not in: {err}");
        }
        assert!(!err.contains("cannot reach"), "{err}");
        assert!(!is_mounted(&mnt));
    }
}

#[test]
fn an_unreachable_endpoint_is_one_clear_line_and_no_hang() {
    let s = Server::from_env();
    let (mnt, cache) = fresh_dirs();
    let _guard = Unmount(mnt.clone());
    // Nothing listens on port 9 of loopback.
    let out = run(
        &mount_args(&s.bucket, &mnt, &cache, "http://127.0.0.1:9"),
        &s.access_key,
        &s.secret_key,
    );
    assert_one_line_error(&out, "cannot reach http://127.0.0.1:9");
}

#[test]
fn a_missing_mountpoint_is_one_clear_line() {
    let s = Server::from_env();
    let (mnt, cache) = fresh_dirs();
    let missing = mnt.join("not-there");
    let out = run(
        &mount_args(&s.bucket, &missing, &cache, &s.endpoint),
        &s.access_key,
        &s.secret_key,
    );
    assert_one_line_error(&out, "create it first");
    let file = mnt.join("file");
    std::fs::write(&file, b"").unwrap();
    let out = run(
        &mount_args(&s.bucket, &file, &cache, &s.endpoint),
        &s.access_key,
        &s.secret_key,
    );
    assert_one_line_error(&out, "is not a directory");
}

#[test]
fn one_cache_dir_serves_one_mount() {
    let m = Mount::new("cache-lock");
    let s = Server::from_env();
    let (mnt, _) = fresh_dirs();
    let _guard = Unmount(mnt.clone());
    let source = format!("{}:{}", s.bucket, m.prefix);
    let mut args = mount_args(&source, &mnt, &m.cache_dir, &s.endpoint);
    args.push("-f");
    let out = run(&args, &s.access_key, &s.secret_key);
    assert_one_line_error(&out, "in use by another s3bridge mount");
}

#[test]
fn status_shows_the_activity_of_a_mount() {
    let m = Mount::with(
        "status",
        common::MountOptions {
            extra: vec!["--write-back".into()],
            ..Default::default()
        },
    );
    std::fs::write(m.p("f"), common::pattern(3 << 20, 1)).unwrap();
    common::flush_ok(&m.path);
    let status = |json: bool| {
        let mut cmd = Command::new(binary());
        cmd.arg("status").arg(&m.path);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let before: serde_json::Value = serde_json::from_str(&status(true)).unwrap();
    assert_eq!(before["pending_files"], 0, "{before}");
    assert!(before["s3_requests"].as_u64().unwrap() >= 1, "{before}");
    // Reading the file back goes through the block cache: its three blocks are looked up
    // (hits if the upload's seeding of the cache finished first, misses otherwise), and
    // they are in the cache afterwards either way.
    assert_eq!(std::fs::read(m.p("f")).unwrap().len(), 3 << 20);
    let after: serde_json::Value = serde_json::from_str(&status(true)).unwrap();
    let lookups = after["cache_hits"].as_u64().unwrap() + after["cache_misses"].as_u64().unwrap();
    assert!(lookups >= 3, "{after}");
    assert!(after["cache_hit_rate"].is_f64(), "{after}");
    let cached = common::eventually(Duration::from_secs(10), || {
        let now: serde_json::Value = serde_json::from_str(&status(true)).unwrap();
        now["cache_bytes"].as_u64().unwrap() >= 3 << 20
    });
    assert!(cached, "the file's blocks are in the cache");
    let human = status(false);
    for needle in ["pending uploads", "block cache", "hit rate", "S3 requests"] {
        assert!(human.contains(needle), "{needle} in:\n{human}");
    }
    let missing = Command::new(binary())
        .args(["status", "/"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no s3bridge serves"));
}
