//! Conflicts through a real mount: another S3 client replaces an object while the mount has
//! an edit of it pending. Both versions must survive: the other client's at the name, ours
//! as a clearly named conflict copy, with a warning in the log. Garage ignores conditional
//! writes (an ETag check catches the change); moto honours them (the upload itself fails
//! with 412 and no HEAD is needed).

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::{Mount, MountOptions, Server, unique, write_and_close, write_checked};

fn edit_while_another_client_writes(server: Server, extra: &[&str]) {
    let prefix = format!("{}/", unique("conflict"));
    let mut m = Mount::on(
        server,
        &prefix,
        MountOptions {
            ttl: "1".into(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        },
    );
    let b = m.bucket();
    write_checked(&m.p("report.txt"), b"ours, version 1").unwrap();
    assert_eq!(b.get("report.txt").unwrap(), b"ours, version 1");

    let f = OpenOptions::new()
        .write(true)
        .open(m.p("report.txt"))
        .unwrap();
    f.write_all_at(b"OURS", 0).unwrap();
    b.put("report.txt", b"theirs", &[]);
    write_and_close(f, b"").expect("close() succeeds: our version is kept as a copy");

    assert_eq!(
        b.get("report.txt").unwrap(),
        b"theirs",
        "the other client's version stays"
    );
    let copies: Vec<String> = b
        .keys()
        .into_iter()
        .filter(|k| k.starts_with("report.conflict-"))
        .collect();
    assert_eq!(copies.len(), 1, "one conflict copy: {:?}", b.keys());
    assert!(copies[0].ends_with(".txt"), "{}", copies[0]);
    let rel = copies[0].as_str();
    assert_eq!(b.get(rel).unwrap(), b"OURS, version 1");

    // Through the mount: the name shows theirs, the copy is listed with ours.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(std::fs::read(m.p("report.txt")).unwrap(), b"theirs");
    assert_eq!(std::fs::read(m.p(rel)).unwrap(), b"OURS, version 1");
    let log = m.unmount();
    assert!(
        log.contains("conflict copy"),
        "a warning names the conflict:\n{log}"
    );
}

#[test]
fn garage_a_conflicting_edit_keeps_both_versions() {
    edit_while_another_client_writes(Server::from_env(), &[]);
}

#[test]
fn moto_a_conflicting_edit_is_caught_by_a_conditional_write() {
    edit_while_another_client_writes(Server::moto(), &["--conditional-writes"]);
}
