//! systemd integration: the unit files in packaging/ pass `systemd-analyze verify`, and a
//! foreground mount tells a `Type=notify` supervisor when it is ready and when it stops.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Server, binary, is_mounted, scratch, unique};

fn verify(unit: &Path) {
    // The units name /usr/bin/s3bridge, which the package installs; here it is the binary
    // under test. Man pages come with the package too (tests/packaging/deb.sh verifies the
    // installed unit with them).
    let text = std::fs::read_to_string(unit)
        .unwrap()
        .replace("/usr/bin/s3bridge", binary().to_str().unwrap());
    let name = unit
        .file_name()
        .unwrap()
        .to_string_lossy()
        .replace("@.", "@example.");
    let dir = scratch().join(unique("units"));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join(name);
    std::fs::write(&copy, text).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .expect("systemd-analyze (Debian's systemd package)");
    let said =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "{}:\n{said}",
        unit.display()
    );
}

#[test]
fn the_unit_files_verify() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/systemd");
    verify(&dir.join("s3bridge@.service"));
    verify(&dir.join("srv-data.mount"));
}

#[test]
fn a_foreground_mount_notifies_systemd_when_ready_and_when_stopping() {
    let server = Server::from_env();
    let dir = scratch().join(unique("notify"));
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut child = Command::new(binary())
        .args(["mount", "-f"])
        .arg(format!("{}:{}/", server.bucket, unique("notify")))
        .arg(&mnt)
        .args(["--endpoint-url", &server.endpoint])
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .env("NOTIFY_SOCKET", &socket_path)
        .env("AWS_ACCESS_KEY_ID", &server.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &server.secret_key)
        .env("AWS_REGION", "us-east-1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("READY=1 within 30 s");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    assert!(is_mounted(&mnt), "ready means mounted");
    let out = Command::new(binary())
        .arg("unmount")
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n = socket.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(child.wait().unwrap().success());
}
