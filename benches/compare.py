#!/usr/bin/env python3
"""s3bridge against s3fs and rclone mount, and against raw S3 and the local disk, in one run.

Started by benches/run.sh, which installs what is missing, builds s3bridge (release) and the
raw S3 client, and starts Garage on 127.0.0.1 (the environment of tests/support/garage.sh).
Every filesystem runs the same workloads on its own prefix of the same bucket:

  write       cp of a 1 GiB file into the mount (close included); for rclone, whose close
              returns before the upload, the time until the object is in the bucket is shown
  cold read   the file read on a fresh mount with an empty cache and the page cache dropped
  warm read   read again after dropping the page cache: from the filesystem's own cache
  hot read    read again: from the kernel's page cache where the filesystem allows it
  rand 4K     fio, 4 KiB random reads of the 1 GiB file, cold and then warm (same offsets)
  1000 files  cp -r of 1,000 files of 1-16 KiB
  untar       tar x of a real source tree (tokio's crate)
  ls -l       of 10,000 objects carrying s3fs headers (mode, owner, mtime), cold (fresh mount,
              empty cache) and warm (the better of two runs), with the daemon's CPU seconds
              for the cold one; plain `ls` (names and types only) cold
  rename      mv of the 1 GiB file
  webdav      Apache with mod_dav on a folder of the mount, as www-data, driven over HTTP
              from 127.0.0.1 on one keep-alive connection: PUT of the 1 GiB file, PUT of the
              1,000 small files, PROPFIND (depth 1) of a 10,000-entry folder on a fresh mount
              and again, GET of the 1 GiB file on a fresh mount; mod_dav_fs writes each PUT
              to a temporary file and renames it, as Nextcloud does with its .part files
  many users  one user moves a 2,000-file folder into a trash folder (Nextcloud's delete)
              while another copies in the 1 GiB file, and a third saves 4 KiB documents and
              lists and stats a 200-file folder in a loop: the third user's latencies (p50,
              p99, worst) and how many of each got done per second, against the same loop on
              the idle mount; the moved folder is checked whole in the bucket

With --latency-ms, everything runs a second time with that delay added each way between
the clients and the server (tc netem on lo, or benches/latency_proxy.rs where the kernel has
no netem).

References in the same run: raw multipart PUT and parallel ranged GET of 1 GiB, a raw
server-side copy, and a raw exact listing (LIST pages and a HEAD of each of the 10,000
objects, 64 at a time) (benches/raw_s3.rs), and reading the same bytes from the local disk. Peak
RSS is each daemon's VmHWM, the largest over its mounts. The WebDAV workload's reference is
the same Apache on a local directory.

`s3bridge-wb` in --only adds a column: s3bridge with --write-back.

Writes results/latest.{md,json,svg} next to this script and prints the table.
"""

import argparse
import glob
import http.client
import json
import os
import pwd
import re
import signal
import socket
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
ENV = os.environ
BUCKET = ENV["S3BRIDGE_TEST_BUCKET"]
ENDPOINT = ENV["S3BRIDGE_TEST_ENDPOINT"]
S3BRIDGE = "s3bridge"  # set from --s3bridge
SIZE_LABEL = "1 GiB"  # set from --size-mib


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, **kw).stdout


def timed(cmd, **kw):
    start = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kw)
    return time.monotonic() - start


def drop_caches():
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def is_mounted(path):
    target = str(Path(path).resolve())
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if line.split(" ")[4].replace("\\040", " ") == target:
            return True
    return False


def wait_for(pred, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Raw:
    """The raw S3 client of benches/raw_s3.rs."""

    def __init__(self, binary):
        self.binary = binary

    def __call__(self, *args):
        out = run([self.binary, *args], env=dict(ENV, S3BRIDGE_TEST_ENDPOINT=ENDPOINT))
        return dict(l.split("=", 1) for l in out.split() if "=" in l)

    def size(self, key):
        return int(self(f"size", key)["size"])


class Mount:
    """A FUSE filesystem under test, mounted in the foreground so its pid is known."""

    name = ""

    def __init__(self, work, prefix):
        self.work = Path(work) / self.name
        self.prefix = prefix
        self.path = self.work / "mnt"
        self.cache = self.work / "cache"
        self.proc = None
        self.peak_rss_kib = 0
        self.path.mkdir(parents=True, exist_ok=True)

    def command(self):
        raise NotImplementedError

    def mount(self, clear_cache=False):
        if clear_cache:
            shutil.rmtree(self.cache, ignore_errors=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        logf = open(self.work / "daemon.log", "a")
        self.proc = subprocess.Popen(self.command(), stdout=logf, stderr=logf, env=self.env())
        wait_for(lambda: is_mounted(self.path) or self.proc.poll() is not None, f"{self.name} mount")
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited; see {self.work / 'daemon.log'}")
        # The mount point answers once the daemon serves requests.
        wait_for(lambda: os.path.isdir(self.path), f"{self.name} ready")

    def env(self):
        return dict(ENV)

    def cpu_seconds(self):
        """User and system CPU time the daemon has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kib(self):
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def unmount(self):
        if self.proc is None:
            return
        self.peak_rss_kib = max(self.peak_rss_kib, self.rss_kib())
        subprocess.run(["umount", str(self.path)], check=False)
        try:
            self.proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            subprocess.run(["umount", "-l", str(self.path)], check=False)
        self.proc = None

    def remount_cold(self):
        self.unmount()
        self.mount(clear_cache=True)
        drop_caches()

    def p(self, rel):
        return str(self.path / rel)


class S3bridge(Mount):
    name = "s3bridge"

    def command(self):
        return [S3BRIDGE, "mount", f"{BUCKET}:{self.prefix}",
                str(self.path), "--endpoint-url", ENDPOINT, "--cache-dir", str(self.cache),
                "-f", "--log-level", "warn", "--allow-other"]


class S3bridgeWriteBack(S3bridge):
    """s3bridge with --write-back: close returns once the data is safe on local disk."""
    name = "s3bridge-wb"

    def command(self):
        return super().command() + ["--write-back"]


class S3fs(Mount):
    name = "s3fs"

    def command(self):
        passwd = self.work / "passwd"
        passwd.write_text(f"{ENV['AWS_ACCESS_KEY_ID']}:{ENV['AWS_SECRET_ACCESS_KEY']}\n")
        passwd.chmod(0o600)
        return ["s3fs", f"{BUCKET}:/{self.prefix.rstrip('/')}", str(self.path), "-f",
                "-o", f"passwd_file={passwd},url={ENDPOINT},use_path_request_style",
                "-o", f"endpoint=us-east-1,use_cache={self.cache},allow_other"]


class Rclone(Mount):
    name = "rclone"

    def env(self):
        e = dict(ENV)
        # rclone's S3 client refuses a custom CA bundle with its own HTTP transport.
        e.pop("AWS_CA_BUNDLE", None)
        e.update(RCLONE_CONFIG_BENCH_TYPE="s3", RCLONE_CONFIG_BENCH_PROVIDER="Other",
                 RCLONE_CONFIG_BENCH_ENDPOINT=ENDPOINT, RCLONE_CONFIG_BENCH_REGION="us-east-1",
                 RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=ENV["AWS_ACCESS_KEY_ID"],
                 RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=ENV["AWS_SECRET_ACCESS_KEY"])
        return e

    def command(self):
        return ["rclone", "mount", f"bench:{BUCKET}/{self.prefix.rstrip('/')}", str(self.path),
                "--vfs-cache-mode", "writes", "--cache-dir", str(self.cache), "--allow-other"]


def fio_iops(path, ios, size):
    out = run(["fio", "--name=rand", f"--filename={path}", "--rw=randread", "--bs=4k",
               "--ioengine=psync", f"--size={size}", f"--number_ios={ios}", "--randrepeat=1",
               "--norandommap", "--invalidate=1", "--output-format=json"])
    job = json.loads(out)["jobs"][0]["read"]
    return job["iops"]


def small_tree(dest, count=1000):
    rnd = random.Random(42)
    dest.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (dest / f"file{i:04}.txt").write_bytes(rnd.randbytes(rnd.randint(1024, 16 * 1024)))


def source_tarball():
    found = sorted(glob.glob(os.path.expanduser("~/.cargo/registry/cache/*/tokio-1.*.crate")))
    if not found:
        raise RuntimeError("no tokio crate in ~/.cargo/registry/cache (run cargo build first)")
    return found[-1]


WORKLOADS = ("data", "small", "ls", "users", "webdav")

# Random 4 KiB reads per fio run.
RANDOM_IOS = 2000

USERS_FOLDER = 2000
USERS_LISTED = 200
USERS_IDLE_SECONDS = 15
USERS_MAX_SECONDS = 900
# Entries of the folder the WebDAV workload lists.
DAV_LISTED = 10000


class UserLoop:
    """The third user: 4 KiB saves in one thread, `ls` + `stat` of a folder in another, each
    timed, until told to stop."""

    def __init__(self, fs):
        self.fs = fs
        self.stop = threading.Event()
        self.saves, self.listings = [], []
        self.errors = []

    def _saves(self, tag):
        body = os.urandom(4096)
        i = 0
        while not self.stop.is_set():
            path = self.fs.p(f"users/docs/{tag}-{i:05}.odt")
            start = time.monotonic()
            try:
                with open(path, "wb") as f:
                    f.write(body)
            except OSError as e:
                self.errors.append(f"save {path}: {e}")
                return
            self.saves.append(time.monotonic() - start)
            i += 1

    def _listings(self):
        folder = self.fs.p("users/shared")
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                names = os.listdir(folder)
                for name in names:
                    os.stat(os.path.join(folder, name))
            except OSError as e:
                self.errors.append(f"ls {folder}: {e}")
                return
            if len(names) != USERS_LISTED:
                self.errors.append(f"ls {folder}: {len(names)} entries, {USERS_LISTED} expected")
                return
            self.listings.append(time.monotonic() - start)

    def run(self, tag, until):
        """Runs the loop until `until()` is true; returns the seconds it ran."""
        threads = [threading.Thread(target=self._saves, args=(tag,)),
                   threading.Thread(target=self._listings)]
        start = time.monotonic()
        for t in threads:
            t.start()
        while not until() and not self.errors:
            time.sleep(0.05)
        self.stop.set()
        for t in threads:
            t.join()
        if self.errors:
            raise RuntimeError(f"{self.fs.name}: " + "; ".join(self.errors[:3]))
        return time.monotonic() - start


class Dav:
    """Apache with mod_dav serving `root` on 127.0.0.1 as www-data, and one keep-alive HTTP
    connection to it; stopped on leaving the `with` block."""

    def __init__(self, work, root):
        self.dir = Path(work)
        run_dir = self.dir / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        www = pwd.getpwnam("www-data")
        os.chown(run_dir, www.pw_uid, www.pw_gid)  # mod_dav's lock database
        # www-data must pass through the directories above the served one (a mount's root
        # may refuse a chmod: s3fs answers EIO).
        for d in Path(root).parents:
            mode = os.stat(d).st_mode
            if not mode & 0o001:
                os.chmod(d, mode | 0o001)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        modules = "/usr/lib/apache2/modules"
        conf = self.dir / "httpd.conf"
        conf.write_text(
            f"ServerRoot /etc/apache2\nServerName localhost\nListen 127.0.0.1:{self.port}\n"
            f"PidFile {run_dir}/httpd.pid\nDefaultRuntimeDir {run_dir}\n"
            f"Mutex file:{run_dir} default\nErrorLog {self.dir}/error.log\n"
            f"LoadModule mpm_event_module {modules}/mod_mpm_event.so\n"
            f"LoadModule authz_core_module {modules}/mod_authz_core.so\n"
            f"LoadModule dav_module {modules}/mod_dav.so\n"
            f"LoadModule dav_fs_module {modules}/mod_dav_fs.so\n"
            f"User www-data\nGroup www-data\nTimeout 900\nLimitRequestBody 0\n"
            f"DavLockDB {run_dir}/davlock\nDocumentRoot {root}\n"
            f"<Directory {root}>\n  Dav On\n  AllowOverride None\n  Require all granted\n"
            f"</Directory>\n")
        self.proc = subprocess.Popen(["apache2", "-DFOREGROUND", "-f", str(conf)],
                                     start_new_session=True)

        def listening():
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                return self.proc.poll() is not None
        wait_for(listening, "apache")
        if self.proc.poll() is not None:
            raise RuntimeError(f"apache exited; see {self.dir / 'error.log'}")
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=900,
                                               blocksize=MIB)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.conn.close()
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=60)

    def request(self, method, path, expect, body=None, headers=None, sink=None):
        """Sends one request; the answer's body (read in 1 MiB pieces into `sink` if given,
        else returned). Fails unless the status is one of `expect`."""
        self.conn.request(method, path, body=body, headers=headers or {})
        resp = self.conn.getresponse()
        if sink is None:
            data = resp.read()
        else:
            while piece := resp.read(MIB):
                sink(piece)
            data = b""
        if resp.status not in expect:
            raise RuntimeError(f"WebDAV {method} {path}: HTTP {resp.status} {data[:300]!r}; "
                               f"see {self.dir / 'error.log'}")
        return data


PROPFIND = (b'<?xml version="1.0"?><d:propfind xmlns:d="DAV:"><d:prop><d:getlastmodified/>'
            b'<d:getcontentlength/><d:resourcetype/><d:getetag/></d:prop></d:propfind>')


def webdav(name, root, work, local, tree, size_mib, remount, fill_list, uploaded):
    """The WebDAV workload (see the module doc) on directory `root` of a mount (or of the
    local disk); `remount()` makes the next step cold, `fill_list()` puts 10,000 entries in
    root/list, `uploaded(rel, size)` waits until the file is whole in the bucket."""
    r = {}
    log(f"{name}: WebDAV through Apache mod_dav")
    www = pwd.getpwnam("www-data")
    # The listed folder is made here, not left implicit in the keys: s3fs shows a folder it
    # has no object for as root's, mode 0750, which www-data may not read.
    for d in (root, root / "list"):
        os.makedirs(d, exist_ok=True)
        try:
            os.chown(d, www.pw_uid, www.pw_gid)
        except OSError:
            pass  # rclone has no owners and lets anyone write
    fill_list()
    remount()
    with Dav(work, root) as dav:
        with open(local, "rb") as body:
            r["dav_put_big"] = timed_call(lambda: dav.request(
                "PUT", "/big.bin", (201, 204), body=body,
                headers={"Content-Length": str(size_mib * MIB)}))
        dav.request("MKCOL", "/small/", (201,))
        files = sorted(tree.iterdir())
        start = time.monotonic()
        for f in files:
            dav.request("PUT", f"/small/{f.name}", (201, 204), body=f.read_bytes())
        r["dav_put_small"] = time.monotonic() - start
    uploaded("big.bin", size_mib * MIB)
    remount()
    with Dav(work, root) as dav:
        for key in ("dav_propfind_cold", "dav_propfind_warm"):
            start = time.monotonic()
            out = dav.request("PROPFIND", "/list/", (207,), body=PROPFIND,
                              headers={"Depth": "1", "Content-Type": "application/xml"})
            r[key] = time.monotonic() - start
            entries = len(re.findall(rb"<[A-Za-z0-9]*:?href>", out))
            if entries != DAV_LISTED + 1:
                raise RuntimeError(f"{name}: PROPFIND answered {entries} entries, not {DAV_LISTED + 1}")
    remount()
    with Dav(work, root) as dav:
        got = [0]
        r["dav_get_cold"] = timed_call(lambda: dav.request(
            "GET", "/big.bin", (200,), sink=lambda piece: got.__setitem__(0, got[0] + len(piece))))
        if got[0] != size_mib * MIB:
            raise RuntimeError(f"{name}: GET gave {got[0]} bytes, not {size_mib * MIB}")
    return r


def timed_call(f):
    start = time.monotonic()
    f()
    return time.monotonic() - start


def with_cpu(fs, work):
    """Runs `work()`; returns what it returned and the daemon CPU seconds it took."""
    cpu = fs.cpu_seconds()
    result = work()
    return result, fs.cpu_seconds() - cpu


def percentile_ms(values, p):
    ordered = sorted(values)
    if not ordered:
        return None
    return 1000 * ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def many_users(fs, raw, local):
    """The many-users workload (see the module doc); fills and returns its rows."""
    r = {}
    raw("put-many-s3fs", fs.prefix + "users/folder/", str(USERS_FOLDER))
    raw("put-many-s3fs", fs.prefix + "users/shared/", str(USERS_LISTED))
    fs.remount_cold()
    os.makedirs(fs.p("users/docs"))
    os.makedirs(fs.p("users/trash"))
    # As the web front end would have: both folders listed once.
    os.listdir(fs.p("users/folder"))
    os.listdir(fs.p("users/shared"))
    log(f"{fs.name}: many users, idle loop ({USERS_IDLE_SECONDS} s)")
    idle = UserLoop(fs)
    deadline = time.monotonic() + USERS_IDLE_SECONDS
    idle_secs = idle.run("idle", lambda: time.monotonic() >= deadline)
    log(f"{fs.name}: many users, during a folder move and a {SIZE_LABEL} upload")
    cpu = fs.cpu_seconds()
    jobs = [subprocess.Popen(["mv", fs.p("users/folder"), fs.p("users/trash/folder")]),
            subprocess.Popen(["cp", str(local), fs.p("users/video.bin")])]
    busy = UserLoop(fs)
    start = time.monotonic()
    busy_secs = busy.run("busy", lambda: all(j.poll() is not None for j in jobs)
                         or time.monotonic() - start > USERS_MAX_SECONDS)
    for j in jobs:
        j.wait()
        if j.returncode != 0:
            raise RuntimeError(f"{fs.name}: {' '.join(j.args)} failed ({j.returncode})")
    r["users_busy_seconds"] = busy_secs
    r["users_busy_cpu"] = fs.cpu_seconds() - cpu
    for kind, idle_v, busy_v in (("save", idle.saves, busy.saves),
                                 ("ls", idle.listings, busy.listings)):
        r[f"users_{kind}_p50"] = percentile_ms(busy_v, 50)
        r[f"users_{kind}_p99"] = percentile_ms(busy_v, 99)
        r[f"users_{kind}_worst"] = percentile_ms(busy_v, 100)
        r[f"users_{kind}_idle_p99"] = percentile_ms(idle_v, 99)
        idle_rate = len(idle_v) / idle_secs
        r[f"users_{kind}_rate"] = len(busy_v) / busy_secs
        r[f"users_{kind}_share"] = (len(busy_v) / busy_secs) / idle_rate if idle_rate else None
    moved = len(os.listdir(fs.p("users/trash/folder")))
    in_bucket = int(raw("count", fs.prefix + "users/trash/folder/")["count"])
    left = int(raw("count", fs.prefix + "users/folder/")["count"])
    r["users_moved_whole"] = moved == USERS_FOLDER and in_bucket >= USERS_FOLDER and left == 0
    if not r["users_moved_whole"]:
        log(f"{fs.name}: moved folder: {moved} entries in the mount, {in_bucket} objects in the "
            f"bucket, {left} left behind")
    return r


def run_filesystem(fs, raw, local, size_mib, tree, tarball, workloads):
    r = {}
    fs.mount(clear_cache=True)
    if "data" in workloads:
        log(f"{fs.name}: write {size_mib} MiB")
        gib = size_mib / 1024

        def write():
            r["write"] = timed(["cp", str(local), fs.p("big")])
            start = time.monotonic()
            wait_for(lambda: raw.size(fs.prefix + "big") == size_mib * MIB, "upload", timeout=600)
            r["write_in_bucket"] = r["write"] + (time.monotonic() - start)
        _, cpu = with_cpu(fs, write)
        r["write_cpu"] = cpu / gib
        # rclone keeps uploading after close: let it finish before measuring reads.
        log(f"{fs.name}: reads")
        fs.remount_cold()
        dd = ["dd", f"if={fs.p('big')}", "of=/dev/null", "bs=1M"]
        r["cold_read"], cpu = with_cpu(fs, lambda: timed(dd, stderr=subprocess.DEVNULL))
        r["cold_read_cpu"] = cpu / gib
        drop_caches()
        r["warm_read"], cpu = with_cpu(fs, lambda: timed(dd, stderr=subprocess.DEVNULL))
        r["warm_read_cpu"] = cpu / gib
        r["hot_read"] = timed(dd, stderr=subprocess.DEVNULL)
        log(f"{fs.name}: random 4K reads")
        fs.remount_cold()
        r["rand_cold_iops"] = fio_iops(fs.p("big"), RANDOM_IOS, size_mib * MIB)
        drop_caches()
        r["rand_warm_iops"], cpu = with_cpu(
            fs, lambda: fio_iops(fs.p("big"), RANDOM_IOS, size_mib * MIB))
        r["rand_warm_cpu"] = cpu / (RANDOM_IOS * 4096 / (1024 * MIB))
    if "small" in workloads:
        log(f"{fs.name}: small files and untar")
        r["small_files"] = timed(["cp", "-r", str(tree), fs.p("small")])
        os.mkdir(fs.p("untar"))
        r["untar"] = timed(["tar", "xzf", tarball, "-C", fs.p("untar")])
    if "ls" in workloads:
        log(f"{fs.name}: ls -l of 10,000 objects with s3fs headers")
        raw("put-many-s3fs", fs.prefix + "list/", "10000")
        fs.remount_cold()
        ls = ["ls", "-l", fs.p("list")]
        r["ls_cold"], r["ls_cold_cpu"] = with_cpu(fs, lambda: timed(ls))
        # The better of two: the cold listing now takes seconds, so the first warm one may
        # cross a filesystem's listing TTL (5 s for s3bridge) and list again.
        r["ls_warm"] = min(timed(ls), timed(ls))
        fs.remount_cold()
        r["ls_plain_cold"] = timed(["ls", fs.p("list")])
    if "users" in workloads:
        r.update(many_users(fs, raw, local))
    if "webdav" in workloads:
        def uploaded(rel, size):
            wait_for(lambda: raw.size(fs.prefix + "dav/" + rel) == size, "upload", timeout=600)
        try:
            r.update(webdav(fs.name, Path(fs.p("dav")), fs.work / "apache", local, tree,
                            size_mib, fs.remount_cold,
                            lambda: raw("put-many-s3fs", fs.prefix + "dav/list/", str(DAV_LISTED)),
                            uploaded))
        except (RuntimeError, OSError, http.client.HTTPException) as e:
            # One filesystem failing it leaves its rows empty, not the whole run lost.
            log(f"{fs.name}: WebDAV workload FAILED: {e}")
            if not is_mounted(fs.path):
                fs.remount_cold()
    if "data" in workloads:
        log(f"{fs.name}: rename")
        r["rename"] = timed(["mv", fs.p("big"), fs.p("big-renamed")])
    fs.unmount()
    r["peak_rss_mib"] = fs.peak_rss_kib / 1024
    return r


def references(raw, local, size_mib, workloads, work, tree):
    r = {}
    log("raw S3 and local disk references")
    if "data" in workloads:
        r["write"] = float(raw("put", "raw/big", str(size_mib))["transfer_seconds"])
        r["cold_read"] = float(raw("get", "raw/big")["seconds"])
        r["rename"] = float(raw("copy", "raw/big", "raw/big-copy")["seconds"])
        # The least a rename can cost on S3: the copy, then the delete of the old key.
        r["move"] = float(raw("move", "raw/big-copy", "raw/big-moved")["seconds"])
        # What the local disk gives the same fio job: the bound for a warm cache on that disk.
        r["rand_warm_iops"] = fio_iops(local, RANDOM_IOS, size_mib * MIB)
        drop_caches()
        dd = ["dd", f"if={local}", "of=/dev/null", "bs=1M"]
        r["warm_read"] = timed(dd, stderr=subprocess.DEVNULL)
        r["hot_read"] = timed(dd, stderr=subprocess.DEVNULL)
    if "ls" in workloads:
        raw("put-many-s3fs", "raw/list/", "10000")
        r["ls_cold"] = float(raw("head-all", "raw/list/", "64")["seconds"])
    if "webdav" in workloads:
        root = Path(work) / "local-dav"
        shutil.rmtree(root, ignore_errors=True)

        def fill_list():
            for i in range(DAV_LISTED):
                (root / "list" / f"f{i:05}").write_bytes(b"x" * 100)
        r.update(webdav("local disk", root, Path(work) / "local-apache", local, tree, size_mib,
                        drop_caches, fill_list, lambda rel, size: None))
        shutil.rmtree(root, ignore_errors=True)
    return r


def memory_run(work, size_mib, prefix):
    """Peak RSS of s3bridge while copying a large file in and out."""
    fs = S3bridge(work, prefix)
    src = Path(work) / "mem-src"
    log(f"memory: {size_mib} MiB in and out of s3bridge")
    run(["dd", "if=/dev/urandom", f"of={src}", "bs=1M", f"count={size_mib}"], stderr=subprocess.DEVNULL)
    fs.mount(clear_cache=True)
    t_in = timed(["cp", str(src), fs.p("big")])
    fs.remount_cold()
    t_out = timed(["cp", fs.p("big"), str(src) + ".out"])
    fs.unmount()
    same = run(["cmp", str(src), str(src) + ".out"]) == ""
    os.remove(src)
    os.remove(str(src) + ".out")
    return {"size_mib": size_mib, "in": t_in, "out": t_out, "peak_rss_mib": fs.peak_rss_kib / 1024,
            "identical": same}


ROWS = [
    # key, label, unit, higher_is_better
    ("write", "write {size} (close included)", "s", False),
    ("write_in_bucket", "  ... until in the bucket", "s", False),
    ("write_cpu", "  ... daemon CPU per GiB (user + system)", "s/GiB", False),
    ("cold_read", "cold sequential read", "s", False),
    ("cold_read_cpu", "  ... daemon CPU per GiB", "s/GiB", False),
    ("warm_read", "warm read (page cache dropped)", "s", False),
    ("warm_read_cpu", "  ... daemon CPU per GiB", "s/GiB", False),
    ("hot_read", "hot read (page cache)", "s", False),
    ("rand_cold_iops", "random 4K reads, cold", "IOPS", True),
    ("rand_warm_iops", "random 4K reads, warm", "IOPS", True),
    ("rand_warm_cpu", "  ... daemon CPU per GiB read", "s/GiB", False),
    ("small_files", "cp -r 1,000 small files", "s", False),
    ("untar", "untar tokio source tree", "s", False),
    ("ls_cold", "ls -l 10,000 objects (s3fs headers), cold", "s", False),
    ("ls_cold_cpu", "  ... daemon CPU", "s", False),
    ("ls_warm", "ls -l 10,000 objects, warm", "s", False),
    ("ls_plain_cold", "ls 10,000 objects, cold", "s", False),
    ("rename", "rename {size}", "s", False),
    ("users_save_p50", "many users: 4 KiB save, p50", "ms", False),
    ("users_save_p99", "  ... p99", "ms", False),
    ("users_save_worst", "  ... worst", "ms", False),
    ("users_save_idle_p99", "  ... p99 on the idle mount", "ms", False),
    ("users_save_rate", "  ... saves done per second meanwhile", "/s", True),
    ("users_save_share", "  ... saves done, of the idle rate", "of idle", True),
    ("users_ls_p50", "many users: ls + stat of 200 files, p50", "ms", False),
    ("users_ls_p99", "  ... p99", "ms", False),
    ("users_ls_worst", "  ... worst", "ms", False),
    ("users_ls_idle_p99", "  ... p99 on the idle mount", "ms", False),
    ("users_ls_rate", "  ... listings done per second meanwhile", "/s", True),
    ("users_ls_share", "  ... listings done, of the idle rate", "of idle", True),
    ("users_busy_seconds", "  ... the 2,000-file move and {size} upload took", "s", False),
    ("users_busy_cpu", "  ... daemon CPU meanwhile", "s", False),
    ("users_moved_whole", "  ... moved folder whole in the bucket", "", True),
    ("dav_put_big", "WebDAV (Apache mod_dav): PUT {size}", "s", False),
    ("dav_put_small", "  ... PUT of 1,000 small files", "s", False),
    ("dav_propfind_cold", "  ... PROPFIND depth 1, 10,000 entries, cold", "s", False),
    ("dav_propfind_warm", "  ... the same again", "s", False),
    ("dav_get_cold", "  ... GET {size}, cold", "s", False),
    ("peak_rss_mib", "peak RSS of the daemon", "MiB", False),
]

PEERS = ["s3fs", "rclone"]


def fmt(v, unit):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if unit == "of idle":
        return f"{v:.0%}"
    if unit == "ms":
        return f"{v:.1f}" if v < 100 else f"{v:,.0f}"
    if unit == "IOPS":
        return f"{v:,.0f}"
    if unit == "MiB":
        return f"{v:.0f}"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def advantage(ours, other, higher_is_better):
    """How many times better s3bridge is than `other` (>1: s3bridge wins)."""
    if ours is None or other is None or ours == 0 or other == 0 or isinstance(ours, bool):
        return None
    return ours / other if higher_is_better else other / ours


def size_label(mib):
    return f"{mib // 1024} GiB" if mib % 1024 == 0 else f"{mib} MiB"


def label_of(label):
    return label.replace("{size}", SIZE_LABEL)


def columns(results):
    """The filesystems shown: s3bridge, with --write-back if it ran, and the peers."""
    return ["s3bridge"] + (["s3bridge-wb"] if "s3bridge-wb" in results else []) + PEERS


def table(results, refs, title):
    names = columns(results)
    lines = [f"### {title}", "",
             "| workload | unit | " + " | ".join(names) + " | raw/local | vs best peer | vs raw |",
             "|---|---|" + "---:|" * (len(names) + 3)]
    for key, label, unit, hib in ROWS:
        if all(r.get(key) is None for r in results.values()):
            continue  # a workload group that did not run
        ours = results["s3bridge"].get(key)
        peers = [results[p].get(key) for p in PEERS if results.get(p)]
        peers = [p for p in peers if p is not None]
        best = (max(peers) if hib else min(peers)) if peers else None
        ref = refs.get(key)
        vs_peer = advantage(ours, best, hib)
        # Against the raw client the ratio is throughput: raw time / our time.
        vs_raw = advantage(ours, ref, hib)
        cells = [fmt(results[n].get(key), unit) if results.get(n) else "-" for n in names]
        lines.append(f"| {label_of(label)} | {unit} | " + " | ".join(cells) +
                     f" | {fmt(ref, unit)} | {'-' if vs_peer is None else f'{vs_peer:.2f}x'}"
                     f" | {'-' if vs_raw is None else f'{vs_raw:.2f}x'} |")
    notes = []
    if refs.get("move") is not None:
        notes.append(f"Raw copy then delete (the least a rename costs on S3): {fmt(refs['move'], 's')} s. "
                     "Random 4K warm, raw/local: the same fio job on the local disk.")
    if refs.get("ls_cold") is not None:
        notes.append("ls -l cold, raw: LIST pages and a HEAD of every object, 64 in flight.")
    if notes:
        lines += ["", " ".join(notes)]
    lines.append("")
    return "\n".join(lines)


def svg(all_runs, path):
    """Horizontal bars: each filesystem's speed relative to s3bridge (log scale), per workload."""
    colors = {"s3bridge": "#1f77b4", "s3bridge-wb": "#9467bd", "s3fs": "#ff7f0e",
              "rclone": "#2ca02c"}
    rows = [r for r in ROWS if r[0] not in ("write_in_bucket", "peak_rss_mib")
            and not r[0].endswith("_cpu")
            and (not r[0].startswith("users_") or r[0] in ("users_save_p99", "users_ls_p99"))]
    import math
    bar, gap, left, width = 9, 10, 250, 420
    blocks = []
    y = 40
    for title, results in all_runs:
        blocks.append(f'<text x="10" y="{y}" font-weight="bold">{title}</text>')
        y += 12
        for key, label, unit, hib in rows:
            if all(r.get(key) is None for r in results.values()):
                continue
            ours = results["s3bridge"].get(key)
            blocks.append(f'<text x="{left - 8}" y="{y + 14}" text-anchor="end">{label_of(label).strip()}</text>')
            for i, name in enumerate(columns(results)):
                v = results.get(name, {}).get(key)
                rel = advantage(v, ours, hib) if v is not None else None  # >1: faster than s3bridge
                if rel is None:
                    continue
                # log scale from 1/100 to 10 (s3bridge = 1 at the 2/3 mark)
                x = max(0.0, min(1.0, (math.log10(rel) + 2) / 3)) * width
                by = y + i * bar
                blocks.append(f'<rect x="{left}" y="{by}" width="{x:.1f}" height="{bar - 1}" fill="{colors[name]}"/>')
                blocks.append(f'<text x="{left + x + 3:.1f}" y="{by + 8}" font-size="9">{rel:.2f}</text>')
            y += len(columns(results)) * bar + gap
        y += 20
    axis = [f'<line x1="{left + width * 2 / 3:.1f}" y1="30" x2="{left + width * 2 / 3:.1f}" y2="{y - 20}" stroke="#888" stroke-dasharray="3,3"/>']
    legend = "".join(f'<rect x="{left + 120 * i}" y="8" width="10" height="10" fill="{c}"/>'
                     f'<text x="{left + 14 + 120 * i}" y="17">{n}</text>' for i, (n, c) in enumerate(colors.items()))
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 60}" height="{y + 20}" '
            f'font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/>')
    foot = (f'<text x="{left}" y="{y + 5}" font-size="10">speed relative to s3bridge (log scale, dashed line = 1; '
            f'left of it: slower than s3bridge)</text></svg>')
    path.write_text(head + legend + "".join(axis + blocks) + foot)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="scratch directory (mounts, caches, files)")
    ap.add_argument("--s3bridge", required=True, help="the s3bridge binary (release build)")
    ap.add_argument("--raw", required=True, help="the raw_s3 bench binary")
    ap.add_argument("--proxy", required=True, help="the latency_proxy bench binary")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--latency-ms", type=float, default=5.0,
                    help="one-way delay added on lo with netem for the second pass (0: skip it)")
    ap.add_argument("--memory-mib", type=int, default=4096, help="size of the in-and-out copy (0: skip)")
    ap.add_argument("--only", default="s3bridge,s3fs,rclone")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help="which groups to run: data (write, reads, random reads, rename), "
                         "small (cp -r, untar), ls (listings), users (many users at once)")
    args = ap.parse_args()

    global S3BRIDGE, SIZE_LABEL
    S3BRIDGE = args.s3bridge
    SIZE_LABEL = size_label(args.size_mib)
    work = Path(args.work)
    raw = Raw(args.raw)
    workloads = args.workloads.split(",")
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        ap.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    local = work / "big.bin"
    if "data" in workloads or "users" in workloads or "webdav" in workloads:
        log(f"making {args.size_mib} MiB of test data")
        run(["dd", "if=/dev/urandom", f"of={local}", "bs=1M", f"count={args.size_mib}"],
            stderr=subprocess.DEVNULL)
    tree = work / "small"
    small_tree(tree)
    tarball = source_tarball()
    names = args.only.split(",")
    classes = {"s3bridge": S3bridge, "s3bridge-wb": S3bridgeWriteBack, "s3fs": S3fs,
               "rclone": Rclone}

    passes = [("no added latency", 0.0)]
    if args.latency_ms > 0:
        passes.append((f"{args.latency_ms:g} ms added each way", args.latency_ms))
    all_runs, md, everything = [], [], {"machine": os.uname().nodename, "cpus": os.cpu_count(),
                                        "size_mib": args.size_mib, "passes": []}
    stamp = time.strftime("%Y%m%d%H%M%S")
    global ENDPOINT
    direct = ENDPOINT
    for title, delay in passes:
        proxy = None
        if delay:
            try:
                run(["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", f"{delay}ms"])
                title += " (tc netem on lo)"
            except subprocess.CalledProcessError as e:
                # No sch_netem here: a delaying TCP proxy in front of the server instead.
                log(f"tc netem unavailable ({e.stderr.strip()}): using benches/latency_proxy.rs")
                host_port = direct.split("://", 1)[1].rstrip("/")
                proxy = subprocess.Popen([args.proxy, "127.0.0.1:0", host_port, str(delay)],
                                         stdout=subprocess.PIPE, text=True)
                listening = proxy.stdout.readline().strip().split("=", 1)[1]
                ENDPOINT = f"http://{listening}"
                title += " (tc netem unavailable on this machine: a delaying TCP proxy, benches/latency_proxy.rs)"
        try:
            refs = references(raw, local, args.size_mib, workloads, work / f"pass{int(delay * 1000)}", tree)
            results = {}
            for n in names:
                fs = classes[n](work / f"pass{int(delay * 1000)}", f"bench-{stamp}-{int(delay * 1000)}-{n}/")
                try:
                    results[n] = run_filesystem(fs, raw, local, args.size_mib, tree, tarball,
                                                workloads)
                finally:
                    fs.unmount()
        finally:
            if proxy:
                proxy.kill()
                ENDPOINT = direct
            elif delay:
                run(["tc", "qdisc", "del", "dev", "lo", "root"])
        all_runs.append((title, results))
        md.append(table(results, refs, title))
        everything["passes"].append({"title": title, "references": refs, "results": results})
        print(md[-1], flush=True)

    if args.memory_mib and "s3bridge" in names and "data" in workloads:
        mem = memory_run(work / "memory", args.memory_mib, f"bench-{stamp}-memory/")
        everything["memory"] = mem
        md.append(f"### Memory\n\nPeak RSS of s3bridge copying {mem['size_mib']} MiB in ({mem['in']:.1f} s) "
                  f"and out ({mem['out']:.1f} s) on a fresh mount: **{mem['peak_rss_mib']:.0f} MiB**; "
                  f"bytes identical: {mem['identical']}.\n")
        print(md[-1])

    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    header = (f"Run of {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} CPUs, Garage on 127.0.0.1, "
              f"{args.size_mib} MiB file. Ratios: how many times better s3bridge is "
              f"(time or IOPS; >1 = s3bridge wins); vs raw = raw client or local disk.\n")
    (out / "latest.md").write_text(header + "\n" + "\n".join(md))
    (out / "latest.json").write_text(json.dumps(everything, indent=1))
    svg(all_runs, out / "latest.svg")
    log(f"wrote {out}/latest.md, latest.json, latest.svg")


if __name__ == "__main__":
    main()
