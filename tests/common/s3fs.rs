//! s3fs-fuse (Debian's s3fs) mounted on a prefix of the test bucket: the peer whose header
//! format s3bridge shares, for tests that write with one and read with the other.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{Server, is_mounted, scratch, unique};

/// A running s3fs mount of one prefix; unmounted when dropped.
pub struct S3fs {
    pub path: PathBuf,
}

impl S3fs {
    pub fn mount(server: &Server, prefix: &str) -> S3fs {
        let base = scratch().join(unique("s3fs"));
        let path = base.join("mnt");
        std::fs::create_dir_all(&path).unwrap();
        let passwd = base.join("passwd");
        std::fs::write(
            &passwd,
            format!("{}:{}", server.access_key, server.secret_key),
        )
        .unwrap();
        std::fs::set_permissions(&passwd, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let status = Command::new("s3fs")
            .arg(format!(
                "{}:/{}",
                server.bucket,
                prefix.trim_end_matches('/')
            ))
            .arg(&path)
            .args(["-o", &format!("passwd_file={}", passwd.display())])
            .args(["-o", &format!("url={}", server.endpoint)])
            .args(["-o", "use_path_request_style,endpoint=us-east-1,use_xattr"])
            // No stat cache: every check below reads the bucket.
            .args(["-o", "max_stat_cache_size=0"])
            .status()
            .expect("s3fs is not installed: tests/run.sh installs it (apt-get install s3fs)");
        assert!(status.success(), "s3fs failed to mount");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !is_mounted(&path) {
            assert!(Instant::now() < deadline, "s3fs mount did not appear");
            std::thread::sleep(Duration::from_millis(50));
        }
        S3fs { path }
    }
}

impl Drop for S3fs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
        if is_mounted(&self.path) {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}
