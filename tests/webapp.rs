//! A PHP web application on Apache with its data directory on the mount, owned by www-data
//! with mode 0770, doing over HTTP what Nextcloud does to its data directory
//! (tests/webapp/app.php): setup checks, recursive mkdir, chunked upload to `*.part` then
//! rename, `fopen` with `r+` and `a`, `touch` and `filemtime`, `scandir`, `unlink`. The
//! bucket must hold exactly what was uploaded. Needs apache2 and PHP (Debian's apache2, php,
//! libapache2-mod-php; tests/support/ensure-deps.sh installs them).

mod common;

use std::fs;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Mount, MountOptions, flush_ok, pattern, scratch, unique};

/// Apache with mod_php serving tests/webapp/app.php on 127.0.0.1; stopped when dropped.
struct Apache {
    child: Child,
    port: u16,
}

impl Apache {
    fn start(dir: &Path, data: &Path) -> Apache {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let www = dir.join("www");
        fs::create_dir_all(&www).unwrap();
        fs::create_dir_all(dir.join("run")).unwrap();
        fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/webapp/app.php"),
            www.join("app.php"),
        )
        .unwrap();
        let modules = "/usr/lib/apache2/modules";
        let php = fs::read_dir(modules)
            .expect("apache2 (Debian's apache2 package)")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with("libphp") && n.ends_with(".so"))
            .expect("mod_php (Debian's libapache2-mod-php package)");
        let (d, w) = (dir.display(), www.display());
        let conf = format!(
            "ServerRoot /etc/apache2\n\
             ServerName localhost\n\
             Listen 127.0.0.1:{port}\n\
             PidFile {d}/run/httpd.pid\n\
             DefaultRuntimeDir {d}/run\n\
             Mutex file:{d}/run default\n\
             ErrorLog {d}/error.log\n\
             LoadModule mpm_prefork_module {modules}/mod_mpm_prefork.so\n\
             LoadModule authz_core_module {modules}/mod_authz_core.so\n\
             LoadModule env_module {modules}/mod_env.so\n\
             LoadModule php_module {modules}/{php}\n\
             User www-data\n\
             Group www-data\n\
             DocumentRoot {w}\n\
             <Directory {w}>\n  Require all granted\n</Directory>\n\
             <FilesMatch \\.php$>\n  SetHandler application/x-httpd-php\n</FilesMatch>\n\
             SetEnv S3BRIDGE_DATA {}\n",
            data.display()
        );
        let conf_path = dir.join("httpd.conf");
        fs::write(&conf_path, conf).unwrap();
        // Its own process group: stopping, Apache signals its whole group.
        let mut child = Command::new("apache2")
            .args(["-DFOREGROUND", "-f"])
            .arg(&conf_path)
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("apache2");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = child.try_wait().unwrap().is_some();
            assert!(
                Instant::now() < deadline && !exited,
                "apache did not listen in 30 s: {}",
                fs::read_to_string(dir.join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Apache { child, port }
    }

    /// Calls the app: `op` with query `args`, an optional request body; the JSON answer.
    fn call(&self, op: &str, args: &str, body: Option<&[u8]>) -> serde_json::Value {
        let url = format!("http://127.0.0.1:{}/app.php?op={op}&{args}", self.port);
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--fail-with-body", &url]);
        if body.is_some() {
            cmd.args([
                "--data-binary",
                "@-",
                "-H",
                "Content-Type: application/octet-stream",
            ])
            .stdin(Stdio::piped());
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(b) = body {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(b).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{op} {args}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("{op}: not JSON: {text}"))
    }
}

impl Drop for Apache {
    fn drop(&mut self) {
        // SIGTERM: the parent stops its workers (SIGKILL would orphan them).
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_php_app_uses_its_data_directory_on_the_mount_like_nextcloud() {
    let m = Mount::with("webapp", MountOptions::nextcloud());
    let apache = Apache::start(&scratch().join(unique("apache")), &m.path);

    let check = apache.call("check", "", None);
    assert_eq!(check["whoami"], "www-data");
    assert_eq!(
        (check["owner"].as_u64(), check["group"].as_u64()),
        (Some(33), Some(33))
    );
    assert_eq!(check["mode"], "770");
    assert_eq!(check["writable"], true);
    assert!(check["free"].as_f64().unwrap() > 1e12, "{check}");

    assert_eq!(
        apache.call("mkdir", "path=alice/files/Photos", None)["ok"],
        true
    );
    // A 12 MiB file in three chunks, then renamed from its .part name.
    let photo = pattern(12 << 20, 7);
    for (i, chunk) in photo.chunks(4 << 20).enumerate() {
        let r = apache.call(
            "chunk",
            &format!("path=alice/files/Photos/p.jpg&index={i}"),
            Some(chunk),
        );
        assert_eq!(
            (r["written"].as_u64(), &r["closed"]),
            (Some(chunk.len() as u64), &serde_json::json!(true))
        );
    }
    let done = apache.call("finish", "path=alice/files/Photos/p.jpg", None);
    assert_eq!(
        (&done["ok"], done["size"].as_u64()),
        (&serde_json::json!(true), Some(12 << 20))
    );
    // Small files edited in place and appended to.
    for (op, args, body) in [
        (
            "chunk",
            "path=alice/files/notes.md&index=0",
            &b"# Notes\nfirst line\n"[..],
        ),
        ("finish", "path=alice/files/notes.md", &b""[..]),
        ("patch", "path=alice/files/notes.md&offset=2", &b"NOTES"[..]),
        ("append", "path=alice/files/notes.md", &b"second line\n"[..]),
        (
            "chunk",
            "path=alice/files/tmp.txt&index=0",
            &b"temporary"[..],
        ),
        ("finish", "path=alice/files/tmp.txt", &b""[..]),
    ] {
        let r = apache.call(op, args, (!body.is_empty()).then_some(body));
        assert!(r.get("error").is_none(), "{op}: {r}");
    }
    let touched = apache.call("touch", "path=alice/files/notes.md&mtime=1600000000", None);
    assert_eq!(touched["mtime"], 1_600_000_000);
    let listed = apache.call("scandir", "path=alice/files", None);
    assert_eq!(
        listed["entries"],
        serde_json::json!(["Photos", "notes.md", "tmp.txt"])
    );
    let unlinked = apache.call("unlink", "path=alice/files/tmp.txt", None);
    assert_eq!(
        (&unlinked["ok"], &unlinked["exists"]),
        (&serde_json::json!(true), &serde_json::json!(false))
    );
    let read = apache.call("read", "path=alice/files/notes.md", None);
    assert_eq!(read["size"], 31);

    flush_ok(&m.path);
    let b = m.bucket();
    let mut keys = b.keys();
    keys.sort();
    assert_eq!(
        keys,
        [
            "alice/",
            "alice/files/",
            "alice/files/Photos/",
            "alice/files/Photos/p.jpg",
            "alice/files/notes.md"
        ],
        "exactly what was uploaded"
    );
    assert!(b.get("alice/files/Photos/p.jpg").unwrap() == photo);
    assert_eq!(
        b.get("alice/files/notes.md").unwrap(),
        b"# NOTES\nfirst line\nsecond line\n"
    );
    let (meta, _) = b.head("alice/files/notes.md").unwrap();
    assert_eq!(meta["uid"], "33", "owned by www-data in s3fs's headers");
    assert!(meta["mtime"].starts_with("1600000000"), "{meta:?}");
}
