//! The mount(8) interface: an /etc/fstab-style line mounted with `mount DIR`, `mount -t
//! s3bridge`, and `mount -t fuse.s3bridge` through mount.fuse3, with options in fstab form
//! and credentials from a file (mount runs with a bare environment).

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Bucket, Server, binary, is_mounted, mount_entry, scratch, unique};

/// A link to the binary under test for the test's duration, where mount(8) or mount.fuse3
/// look for it (left alone if something else is installed there).
struct Helper(Option<PathBuf>);

impl Helper {
    /// `/sbin/mount.s3bridge`, which mount(8) runs for type `s3bridge`.
    fn install() -> Helper {
        Helper::link(PathBuf::from("/sbin/mount.s3bridge"))
    }

    /// `s3bridge` in /usr/local/sbin, the first directory of the PATH mount.fuse3's shell
    /// searches (mount clears the environment) for type `fuse.s3bridge`.
    fn install_for_fuse() -> Helper {
        Helper::link(PathBuf::from("/usr/local/sbin/s3bridge"))
    }

    fn link(link: PathBuf) -> Helper {
        match fs::read_link(&link) {
            Ok(target) if target == binary() => Helper(None),
            Ok(_) => panic!(
                "{} exists: an installed s3bridge; not replacing it",
                link.display()
            ),
            Err(_) => {
                std::os::unix::fs::symlink(binary(), &link).unwrap();
                Helper(Some(link))
            }
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if let Some(link) = &self.0 {
            let _ = fs::remove_file(link);
        }
    }
}

struct Setup {
    server: Server,
    prefix: String,
    dir: PathBuf,
    mnt: PathBuf,
    credentials: PathBuf,
}

fn setup(name: &str) -> Setup {
    let server = Server::from_env();
    let dir = scratch().join(unique(name));
    let mnt = dir.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let credentials = dir.join("credentials");
    fs::write(
        &credentials,
        format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            server.access_key, server.secret_key
        ),
    )
    .unwrap();
    Setup {
        prefix: format!("{}/", unique(name)),
        server,
        dir,
        mnt,
        credentials,
    }
}

impl Setup {
    fn options(&self) -> String {
        format!(
            "endpoint={},region=us-east-1,cache_dir={},credentials={},allow_other,uid=33,gid=33,\
             file_mode=0640,dir_mode=0750,_netdev,noatime,nofail",
            self.server.endpoint,
            self.dir.join("cache").display(),
            self.credentials.display()
        )
    }

    fn source(&self) -> String {
        format!("{}:{}", self.server.bucket, self.prefix)
    }

    /// Runs a mount command with the bare environment mount has under systemd.
    fn run(&self, cmd: &mut Command) {
        let out = cmd
            .env_clear()
            .env(
                "PATH",
                format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin_dir().display()),
            )
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{:?}: {}{}",
            cmd,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// What the mount shows of an object written without POSIX headers, and of its root.
    fn check(&self) {
        let entry = mount_entry(&self.mnt).expect("mounted");
        // What `findmnt -t fuse.s3bridge` and `df -t fuse.s3bridge` look for.
        assert_eq!(entry.fstype, "fuse.s3bridge", "{entry:?}");
        assert!(entry.source.starts_with("s3bridge:"), "{entry:?}");
        Bucket::new(&self.server, &self.prefix).put("plain", b"from the api", &[]);
        let root = fs::metadata(&self.mnt).unwrap();
        assert_eq!(
            (root.uid(), root.gid(), root.mode() & 0o7777),
            (33, 33, 0o750)
        );
        let f = fs::metadata(self.mnt.join("plain")).unwrap();
        assert_eq!((f.uid(), f.gid(), f.mode() & 0o7777), (33, 33, 0o640));
        fs::write(self.mnt.join("written"), b"through fstab").unwrap();
        assert_eq!(
            Bucket::new(&self.server, &self.prefix)
                .get("written")
                .unwrap(),
            b"through fstab"
        );
    }

    /// `mount -o remount,ro` and back to `rw`, as pjdfstest's EROFS cases do it.
    fn remount_read_only_and_back(&self) {
        let option = |want: &str| {
            let entry = mount_entry(&self.mnt).expect("still mounted");
            entry.options.split(',').any(|o| o == want)
        };
        self.run(
            Command::new("mount")
                .args(["-o", "remount,ro"])
                .arg(&self.mnt),
        );
        assert!(option("ro"), "{:?}", mount_entry(&self.mnt));
        let refused = fs::write(self.mnt.join("refused"), b"x").unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::EROFS), "{refused}");
        let refused = fs::remove_file(self.mnt.join("written")).unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::EROFS), "{refused}");
        assert_eq!(
            fs::read(self.mnt.join("written")).unwrap(),
            b"through fstab"
        );
        self.run(
            Command::new("mount")
                .args(["-o", "remount,rw"])
                .arg(&self.mnt),
        );
        assert!(option("rw"), "{:?}", mount_entry(&self.mnt));
        fs::write(self.mnt.join("after"), b"writable again").unwrap();
        let bucket = Bucket::new(&self.server, &self.prefix);
        assert_eq!(bucket.get("after").unwrap(), b"writable again");
        assert!(bucket.get("refused").is_none());
        assert_eq!(bucket.get("written").unwrap(), b"through fstab");
    }

    fn umount(&self) {
        self.run(Command::new("umount").arg(&self.mnt));
        let deadline = Instant::now() + Duration::from_secs(30);
        while is_mounted(&self.mnt) {
            assert!(Instant::now() < deadline, "still mounted");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn bin_dir() -> PathBuf {
    binary().parent().unwrap().to_path_buf()
}

/// One test for everything that needs /sbin/mount.s3bridge: tests run in parallel, and the
/// link is removed when its test ends.
#[test]
fn an_fstab_line_mounts_with_mount_dir() {
    let _helper = Helper::install();
    let s = setup("fstab");
    let fstab = s.dir.join("fstab");
    fs::write(
        &fstab,
        format!(
            "{} {} s3bridge {} 0 0\n",
            s.source(),
            s.mnt.display(),
            s.options()
        ),
    )
    .unwrap();
    s.run(Command::new("mount").arg("--fstab").arg(&fstab).arg(&s.mnt));
    s.check();
    s.remount_read_only_and_back();
    s.umount();
    // mount -t s3bridge, the same options on the command line.
    s.run(
        Command::new("mount")
            .args(["-t", "s3bridge", &s.source()])
            .arg(&s.mnt)
            .args(["-o", &s.options()]),
    );
    s.check();
    s.umount();
    // A misspelt option is one clear line, and nothing is mounted.
    let out = Command::new("mount")
        .args(["-t", "s3bridge", &s.source()])
        .arg(&s.mnt)
        .args(["-o", "endpoint=http://127.0.0.1:1,no_such_option=1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-option"), "{err}");
    assert!(!is_mounted(Path::new(&s.mnt)));
}

#[test]
fn fuse_dot_s3bridge_mounts_through_mount_fuse3() {
    let _helper = Helper::install_for_fuse();
    let s = setup("fuse-type");
    s.run(
        Command::new("mount")
            .args(["-t", "fuse.s3bridge", &s.source()])
            .arg(&s.mnt)
            .args(["-o", &s.options()]),
    );
    s.check();
    s.remount_read_only_and_back();
    s.umount();
}
