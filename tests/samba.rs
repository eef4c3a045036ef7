//! A Samba share on the mount, driven with smbclient the way Windows clients use it: put,
//! get, mkdir, rename, overwrite, delete, and a file of several hundred MiB. The bucket must
//! hold exactly what was saved. Needs smbd and smbclient (tests/support/ensure-deps.sh
//! installs them).

mod common;

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Mount, MountOptions, flush_ok, pattern, scratch, unique};

/// An smbd serving `path` as share `s3` on 127.0.0.1; stopped when dropped.
struct Smbd {
    child: Child,
    port: u16,
}

impl Smbd {
    fn start(share: &Path, dir: &Path) -> Smbd {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        for sub in ["run", "lock", "state", "cache", "private"] {
            fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let d = dir.display();
        // The settings that matter on s3bridge are explained in the README's Samba section.
        let conf = format!(
            "[global]\n\
             server role = standalone server\n\
             interfaces = 127.0.0.1\n\
             bind interfaces only = yes\n\
             smb ports = {port}\n\
             pid directory = {d}/run\n\
             lock directory = {d}/lock\n\
             state directory = {d}/state\n\
             cache directory = {d}/cache\n\
             private dir = {d}/private\n\
             log file = {d}/log.%m\n\
             map to guest = Bad User\n\
             load printers = no\n\
             disable spoolss = yes\n\
             [s3]\n\
             path = {}\n\
             read only = no\n\
             guest ok = yes\n\
             force user = root\n\
             ea support = no\n\
             store dos attributes = no\n\
             kernel oplocks = no\n\
             strict sync = no\n",
            share.display()
        );
        let conf_path = dir.join("smb.conf");
        fs::write(&conf_path, conf).unwrap();
        let child = Command::new("smbd")
            .args(["--foreground", "--no-process-group", "--debug-stdout", "-s"])
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("smbd (Debian's samba package)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "smbd did not listen in 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        Smbd { child, port }
    }

    /// Runs smbclient commands (`;`-separated) in `local` against the share.
    fn client(&self, local: &Path, commands: &str) -> String {
        let out = Command::new("smbclient")
            .arg("//127.0.0.1/s3")
            .args(["-p", &self.port.to_string(), "-N", "-c", commands])
            .current_dir(local)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !text.contains("NT_STATUS_"),
            "{commands}:\n{text}"
        );
        text
    }
}

impl Drop for Smbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_samba_share_on_the_mount_saves_exactly_what_clients_send() {
    let m = Mount::with(
        "samba",
        MountOptions {
            extra: vec!["--allow-other".into()],
            ..Default::default()
        },
    );
    let work: PathBuf = scratch().join(unique("smb"));
    let local = work.join("local");
    fs::create_dir_all(&local).unwrap();
    let smbd = Smbd::start(&m.path, &work.join("samba"));

    let big = pattern(300 * 1024 * 1024, 5);
    fs::write(local.join("big.bin"), &big).unwrap();
    fs::write(local.join("report.txt"), b"first draft").unwrap();
    fs::write(local.join("notes.txt"), b"to be deleted").unwrap();
    smbd.client(
        &local,
        "mkdir docs; mkdir docs\\old; put report.txt docs\\report.txt; put notes.txt notes.txt; \
         put big.bin big.bin",
    );
    // Overwrite, rename, delete, like an editor's save and a user's tidy-up.
    fs::write(
        local.join("report.txt"),
        b"final version, longer than the draft",
    )
    .unwrap();
    smbd.client(
        &local,
        "put report.txt docs\\report.txt; rename docs\\report.txt docs\\old\\report-2024.txt; \
         del notes.txt",
    );
    let back = work.join("back");
    fs::create_dir_all(&back).unwrap();
    smbd.client(
        &back,
        "get big.bin big.bin; get docs\\old\\report-2024.txt report.txt",
    );
    assert!(
        fs::read(back.join("big.bin")).unwrap() == big,
        "300 MiB round trip"
    );
    assert_eq!(
        fs::read(back.join("report.txt")).unwrap(),
        b"final version, longer than the draft"
    );
    let listing = smbd.client(&local, "ls docs\\old\\*");
    assert!(listing.contains("report-2024.txt"), "{listing}");

    flush_ok(&m.path);
    let b = m.bucket();
    let mut keys = b.keys();
    keys.sort();
    assert_eq!(
        keys,
        ["big.bin", "docs/", "docs/old/", "docs/old/report-2024.txt"],
        "exactly what was saved"
    );
    assert!(b.get("big.bin").unwrap() == big);
    assert_eq!(
        b.get("docs/old/report-2024.txt").unwrap(),
        b"final version, longer than the draft"
    );
}
