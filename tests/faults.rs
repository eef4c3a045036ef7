//! S3 failures through a real mount: a fault-injecting proxy (`common::fault_proxy`) between
//! the mount and Garage fails a tenth of the requests (500, 503 SlowDown, resets, GET bodies
//! cut off, delays) while real programs run, and then takes the server away for 60 seconds.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::fault_proxy::FaultProxy;
use common::{
    Mount, MountOptions, Server, eventually, flush_ok, pattern, scratch, sh, unique,
    write_and_close, write_checked,
};

fn through(proxy: &FaultProxy, extra: &[&str]) -> MountOptions {
    MountOptions {
        endpoint: Some(proxy.endpoint()),
        extra: extra.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// A tree of `count` files of varied sizes, two of them large enough for multipart uploads.
fn make_tree(dir: &Path, count: u64) {
    for i in 0..count {
        let sub = dir.join(format!("d{}", i % 7));
        fs::create_dir_all(&sub).unwrap();
        let len = if i % 60 == 59 {
            20_000_000
        } else {
            (i * 7919) % 150_000
        };
        fs::write(sub.join(format!("f{i}.bin")), pattern(len as usize, i)).unwrap();
    }
}

/// `diff -r`: empty output when the trees are the same.
fn assert_same_tree(a: &Path, b: &Path) {
    let out = Command::new("diff")
        .arg("-r")
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "trees differ:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn programs_complete_byte_exact_with_a_tenth_of_requests_failing() {
    let server = Server::from_env();
    let proxy = FaultProxy::start(&server.endpoint);
    let work = scratch().join(unique("faults"));
    let src = work.join("src");
    make_tree(&src, 120);
    sh(&work, "tar czf tree.tgz -C src .");
    proxy.set_fault_rate(0.10);
    let mut m = Mount::with("faults", through(&proxy, &[]));

    sh(&m.path, &format!("cp -r {} copied", src.display()));
    fs::create_dir(m.p("untarred")).unwrap();
    sh(
        &m.path,
        &format!("tar xzf {} -C untarred", work.join("tree.tgz").display()),
    );
    fs::create_dir(m.p("fsx")).unwrap();
    let fsx = Command::new("fsx")
        .args(["-N", "3000", "-S", "7", "-P"])
        .arg(&work)
        .arg(m.p("fsx/file"))
        .output()
        .expect("fsx (cargo install fsx) must be installed");
    let fsx_out =
        String::from_utf8_lossy(&fsx.stdout).to_string() + &String::from_utf8_lossy(&fsx.stderr);
    assert!(
        fsx.status.success() && fsx_out.contains("All operations completed A-OK"),
        "fsx under faults:\n{fsx_out}"
    );

    // Read everything back cold (a new cache), through the faults, and from the bucket.
    m.unmount();
    let fresh = Mount::of_prefix(&m.prefix, through(&proxy, &[]));
    assert_same_tree(&src, &fresh.p("copied"));
    assert_same_tree(&src, &fresh.p("untarred"));
    let b = fresh.bucket();
    for i in [0u64, 1, 59, 64, 119] {
        let rel = format!("copied/d{}/f{i}.bin", i % 7);
        assert!(
            b.get(&rel).unwrap() == fs::read(src.join(&rel[7..])).unwrap(),
            "{rel} in the bucket"
        );
    }
    let (requests, faults) = proxy.counts();
    eprintln!("{requests} requests through the proxy, {faults} failed on purpose");
    assert!(
        faults >= 50,
        "too few faults injected ({faults}) to mean anything"
    );
}

/// The server is unreachable for 60 seconds. A sync mount answers `close()` with EIO within
/// a bounded time and keeps serving what it has cached; a write-back mount keeps accepting
/// writes; both send everything once the server is back.
/// An upload that hangs holds up nothing but changes of its own file: while the server has
/// not answered the PUT of a file being closed, the file is opened, read, closed and stat'ed
/// through another descriptor, and another file is saved.
#[test]
fn a_file_is_opened_and_read_while_its_upload_hangs() {
    let server = Server::from_env();
    let proxy = FaultProxy::start(&server.endpoint);
    let m = Mount::with("hung-upload", through(&proxy, &[]));
    write_checked(&m.p("doc.txt"), b"first version").unwrap();
    let file = fs::OpenOptions::new()
        .write(true)
        .open(m.p("doc.txt"))
        .unwrap();
    proxy.hold_puts("/doc.txt");
    let closing = std::thread::spawn(move || write_and_close(file, b"FIRST"));
    assert!(
        eventually(Duration::from_secs(30), || proxy.held() == 1),
        "the close never sent its upload"
    );
    let (doc, other) = (m.p("doc.txt"), m.p("other.txt"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let read = fs::read(&doc);
        let len = fs::metadata(&doc).map(|md| md.len());
        let saved = write_checked(&other, b"another file");
        let _ = tx.send((read, len, saved));
    });
    // Bounded: a wait for the held upload fails the test rather than hangs it.
    let got = rx.recv_timeout(Duration::from_secs(20));
    let still_held = proxy.held();
    proxy.release();
    let (read, len, saved) = got.expect(
        "an open, a read, a close, a stat or another file's save waited for the hung upload",
    );
    assert_eq!(read.unwrap(), b"FIRST version");
    assert_eq!(len.unwrap(), 13);
    saved.unwrap();
    assert_eq!(still_held, 1, "the upload was still held meanwhile");
    closing.join().unwrap().unwrap();
    assert_eq!(m.bucket().get("doc.txt").unwrap(), b"FIRST version");
    assert_eq!(m.bucket().get("other.txt").unwrap(), b"another file");
}

#[test]
fn a_minute_without_the_server() {
    const OUTAGE: Duration = Duration::from_secs(60);
    let server = Server::from_env();
    let proxy = FaultProxy::start(&server.endpoint);
    let sync = Mount::with("outage-sync", through(&proxy, &["--max-attempts", "3"]));
    let wb = Mount::with(
        "outage-wb",
        through(&proxy, &["--write-back", "--max-attempts", "3"]),
    );
    let cached = pattern(3_000_000, 1);
    for m in [&sync, &wb] {
        fs::create_dir(m.p("dir")).unwrap();
        write_checked(&m.p("dir/cached.bin"), &cached).unwrap();
        assert!(fs::read(m.p("dir/cached.bin")).unwrap() == cached);
    }
    flush_ok(&wb.path);

    proxy.set_down(true);
    let down_at = Instant::now();

    // Sync mode: the upload fails, in bounded time, with EIO; the data stays staged.
    let started = Instant::now();
    let err = write_checked(&sync.p("dir/during.txt"), b"written while down").unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(took < Duration::from_secs(45), "close() took {took:?}");
    eprintln!("sync close() failed with EIO after {took:?}");

    // Write-back: closes succeed, and the files read back through the mount.
    let queued: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| {
            (
                format!("dir/q{i}"),
                pattern(10_000 + i * 40_000, 100 + i as u64),
            )
        })
        .collect();
    for (name, data) in &queued {
        write_checked(&wb.p(name), data).unwrap();
    }
    for (name, data) in &queued {
        assert!(fs::read(wb.p(name)).unwrap() == *data, "{name}");
    }

    // Both keep serving what they have: listings, attributes and cached data, past the TTL.
    std::thread::sleep(Duration::from_secs(6));
    for m in [&sync, &wb] {
        assert!(fs::read(m.p("dir/cached.bin")).unwrap() == cached);
        let names = fs::read_dir(m.p("dir")).unwrap().count();
        assert!(names >= 2, "listing while down: {names} entries");
        assert_eq!(
            fs::metadata(m.p("dir/cached.bin")).unwrap().len(),
            3_000_000
        );
    }

    std::thread::sleep(OUTAGE.saturating_sub(down_at.elapsed()));
    proxy.set_down(false);

    flush_ok(&wb.path);
    flush_ok(&sync.path);
    let (bs, bw) = (sync.bucket(), wb.bucket());
    assert_eq!(bs.get("dir/during.txt").unwrap(), b"written while down");
    for (name, data) in &queued {
        assert!(
            bw.get(name).as_deref() == Some(&data[..]),
            "{name} in the bucket"
        );
    }
}

/// SIGTERM (systemd stopping the service) unmounts only after the write-back queue is in the
/// bucket: files queued while the server was unreachable go up on the way out.
#[test]
fn sigterm_drains_the_write_back_queue_before_exiting() {
    let server = Server::from_env();
    let proxy = FaultProxy::start(&server.endpoint);
    let mut m = Mount::with(
        "sigterm",
        through(&proxy, &["--write-back", "--max-attempts", "2"]),
    );
    // Listed once, the directory's known contents keep answering lookups while the server
    // is away (a never-listed one could not say whether a name is free).
    assert_eq!(fs::read_dir(&m.path).unwrap().count(), 0);
    proxy.set_down(true);
    let files: Vec<(String, Vec<u8>)> = (0..10)
        .map(|i| (format!("q{i}"), pattern(50_000 + i * 10_000, 40 + i as u64)))
        .collect();
    for (name, data) in &files {
        write_checked(&m.p(name), data).unwrap();
    }
    // Queued, not uploaded: the server is away.
    std::thread::sleep(Duration::from_millis(500));
    proxy.set_down(false);
    assert!(
        m.signal_and_wait(libc::SIGTERM, Duration::from_secs(60)),
        "the daemon exits after SIGTERM"
    );
    let b = m.bucket();
    for (name, data) in &files {
        assert!(
            b.get(name).as_deref() == Some(&data[..]),
            "{name} uploaded on the way out"
        );
    }
}
