//! A fault-injecting HTTP proxy between a mount and the S3 server.
//!
//! It reads each request (head and body), decides its fate, and either answers it itself —
//! `500 InternalError`, `503 SlowDown`, a reset connection before the request reaches the
//! server, a GET whose body breaks off halfway — or forwards it, sometimes after a delay.
//! Forwarded requests carry `Connection: close`, so each response ends at end of stream and
//! needs no parsing. `set_down(true)` makes it reset every connection: the server is
//! unreachable. `hold_puts` keeps the PUTs of one object from the server until `release`: an
//! upload that hangs.
//!
//! Faults are only injected where a real S3 outage can put them without changing what the
//! server did: before the request is processed, or in the body of a read. A write whose
//! response is lost after the server applied it (a completed multipart upload answered by a
//! reset) is a different problem — the retry finds the upload gone — and is not injected.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What happens to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Forward,
    Delay,
    InternalError,
    SlowDown,
    ResetBefore,
    TruncateBody,
}

struct State {
    upstream: String,
    /// Fraction of requests that fail, in millionths.
    fault_ppm: AtomicU64,
    down: AtomicBool,
    requests: AtomicU64,
    faults: AtomicU64,
    rng: Mutex<u64>,
    /// PUTs whose path ends with this wait before they reach the server.
    hold: Mutex<Option<String>>,
    /// Requests waiting for that now.
    held: AtomicU64,
}

impl State {
    fn holds(&self, method: &str, path: &str) -> bool {
        method == "PUT"
            && self
                .hold
                .lock()
                .unwrap()
                .as_deref()
                .is_some_and(|suffix| path.ends_with(suffix))
    }

    fn random(&self) -> u64 {
        let mut x = self.rng.lock().unwrap();
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    fn fate(&self, method: &str) -> Fate {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if self.random() % 1_000_000 >= self.fault_ppm.load(Ordering::Relaxed) {
            return Fate::Forward;
        }
        self.faults.fetch_add(1, Ordering::Relaxed);
        match self.random() % 5 {
            0 => Fate::Delay,
            1 => Fate::InternalError,
            2 => Fate::SlowDown,
            3 if method == "GET" => Fate::TruncateBody,
            _ => Fate::ResetBefore,
        }
    }
}

/// A running proxy; it stops accepting when dropped.
pub struct FaultProxy {
    port: u16,
    state: Arc<State>,
}

impl FaultProxy {
    /// Starts a proxy on 127.0.0.1 in front of `upstream` (`http://host:port`), passing
    /// everything until told otherwise.
    pub fn start(upstream: &str) -> FaultProxy {
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1;
        let state = Arc::new(State {
            upstream,
            fault_ppm: AtomicU64::new(0),
            down: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            rng: Mutex::new(seed),
            hold: Mutex::new(None),
            held: AtomicU64::new(0),
        });
        let shared = Arc::downgrade(&state);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Some(state) = shared.upgrade() else {
                    return;
                };
                let Ok(conn) = conn else { continue };
                std::thread::spawn(move || {
                    let _ = serve(conn, &state);
                });
            }
        });
        FaultProxy { port, state }
    }

    /// The endpoint URL to give the mount.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Makes `fraction` of the requests fail (0.0 to 1.0).
    pub fn set_fault_rate(&self, fraction: f64) {
        self.state
            .fault_ppm
            .store((fraction * 1e6) as u64, Ordering::Relaxed);
    }

    /// Takes the server away (every connection is reset) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::Relaxed);
    }

    /// Holds every PUT of the object whose key ends with `suffix` before it reaches the
    /// server, until [`Self::release`].
    pub fn hold_puts(&self, suffix: &str) {
        *self.state.hold.lock().unwrap() = Some(suffix.to_string());
    }

    /// Lets the held requests go on, and holds no more.
    pub fn release(&self) {
        *self.state.hold.lock().unwrap() = None;
    }

    /// How many requests are being held now.
    pub fn held(&self) -> u64 {
        self.state.held.load(Ordering::Relaxed)
    }

    /// Requests seen and faults injected so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.state.requests.load(Ordering::Relaxed),
            self.state.faults.load(Ordering::Relaxed),
        )
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Wake the accept loop so it sees the state gone.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Closes `conn` with a TCP reset instead of an orderly close.
fn reset(conn: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an fd we own, with a correctly sized struct.
    unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(conn);
}

/// Serves the requests of one client connection.
fn serve(conn: TcpStream, state: &State) -> io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut client = conn;
    loop {
        if state.down.load(Ordering::Relaxed) {
            reset(client);
            return Ok(());
        }
        let Some(head) = read_head(&mut reader)? else {
            return Ok(());
        };
        let method = head.split(' ').next().unwrap_or("").to_string();
        let expects_continue =
            header(&head, "expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        if expects_continue {
            client.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let body = read_body(&mut reader, &head)?;
        if state.down.load(Ordering::Relaxed) {
            reset(client);
            return Ok(());
        }
        let path = head.split(' ').nth(1).unwrap_or("");
        let path = path.split('?').next().unwrap_or(path);
        if state.holds(&method, path) {
            state.held.fetch_add(1, Ordering::Relaxed);
            while state.holds(&method, path) {
                std::thread::sleep(Duration::from_millis(5));
            }
            state.held.fetch_sub(1, Ordering::Relaxed);
        }
        let fate = state.fate(&method);
        match fate {
            Fate::ResetBefore => {
                reset(client);
                return Ok(());
            }
            Fate::InternalError => {
                error_response(&mut client, 500, "InternalError", &method)?;
                continue;
            }
            Fate::SlowDown => {
                error_response(&mut client, 503, "SlowDown", &method)?;
                continue;
            }
            Fate::Delay => std::thread::sleep(Duration::from_millis(300)),
            Fate::Forward | Fate::TruncateBody => {}
        }
        return forward(
            &state.upstream,
            &head,
            &body,
            client,
            fate == Fate::TruncateBody,
        );
    }
}

/// Reads a request head up to the blank line; `None` at end of stream.
fn read_head(reader: &mut BufReader<TcpStream>) -> io::Result<Option<String>> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        head.push_str(&line);
        if line == "\r\n" || line == "\n" {
            return Ok(Some(head));
        }
        if head.len() > 64 * 1024 {
            return Err(io::Error::other("request head too large"));
        }
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The raw request body: `Content-Length` bytes, or the chunks of a chunked body.
fn read_body(reader: &mut BufReader<TcpStream>, head: &str) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    if header(head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size_line = String::new();
            reader.read_line(&mut size_line)?;
            body.extend_from_slice(size_line.as_bytes());
            let size = usize::from_str_radix(size_line.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(io::Error::other)?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk);
            if size == 0 {
                return Ok(body);
            }
        }
    }
    let len = header(head, "content-length")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    body.resize(len, 0);
    reader.read_exact(&mut body)?;
    Ok(body)
}

fn error_response(client: &mut TcpStream, status: u16, code: &str, method: &str) -> io::Result<()> {
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
         <Message>injected by the test's fault proxy</Message></Error>"
    );
    let reason = if status == 503 {
        "Slow Down"
    } else {
        "Internal Server Error"
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n",
        xml.len()
    );
    client.write_all(head.as_bytes())?;
    if method != "HEAD" {
        client.write_all(xml.as_bytes())?;
    }
    client.flush()
}

/// Sends the request upstream with `Connection: close` and copies the response back, whole
/// or (`truncate`) cut off after its first half with a reset.
fn forward(
    upstream: &str,
    head: &str,
    body: &[u8],
    mut client: TcpStream,
    truncate: bool,
) -> io::Result<()> {
    let mut server = TcpStream::connect(upstream)?;
    let mut rewritten = String::new();
    for (i, line) in head.split("\r\n").enumerate() {
        let name = line.split(':').next().unwrap_or("").trim();
        if i > 0 && (name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("expect"))
        {
            continue;
        }
        if line.is_empty() {
            break;
        }
        rewritten.push_str(line);
        rewritten.push_str("\r\n");
    }
    rewritten.push_str("Connection: close\r\n\r\n");
    server.write_all(rewritten.as_bytes())?;
    server.write_all(body)?;
    let mut response = Vec::new();
    server.read_to_end(&mut response)?;
    if truncate && response.len() > 1024 {
        client.write_all(&response[..response.len() / 2])?;
        reset(client);
        return Ok(());
    }
    client.write_all(&response)?;
    client.flush()?;
    let _ = client.shutdown(Shutdown::Write);
    Ok(())
}
