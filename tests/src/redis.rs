//! A real `redis-server` for tests: started on a free loopback port in a temp dir, killed
//! on drop.
//!
//! Redis cannot listen on port 0 and report the port, so a free port is found by binding
//! `127.0.0.1:0` and closing it, then handed to `redis-server --port P`. The server can be
//! killed (`SIGKILL`) and restarted on the same port and directory, which is how tests
//! take Redis away mid-load and bring it back.
//!
//! When `redis-server` is not on `PATH`, [`RedisServer::start`] returns `None` after a
//! loud message, so a developer machine without Redis skips these tests; under CI
//! (`CI` set) a missing binary is a failure, because `.ci/run` installs it.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` child process on `127.0.0.1:port`.
#[derive(Debug)]
pub struct RedisServer {
    /// The port it listens on (kept across restarts).
    pub port: u16,
    child: Option<Child>,
    durable: bool,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Start a throwaway server (no persistence). `None` (after a loud message) when
    /// `redis-server` is missing on a developer machine; panics when it is missing in CI.
    pub fn start() -> Option<Self> {
        Self::start_with(false)
    }

    /// Start a server with the append-only file on and `appendfsync always`, so a restart
    /// (even after `SIGKILL`) keeps every acknowledged write.
    pub fn start_durable() -> Option<Self> {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> Option<Self> {
        if !available() {
            return None;
        }
        let dir = tempfile::tempdir().expect("a temp dir");
        let port = free_port();
        let mut s = Self {
            port,
            child: None,
            durable,
            dir,
        };
        s.spawn();
        Some(s)
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `SIGKILL` the server and reap it. Clients see refused connections until
    /// [`RedisServer::restart`].
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `SIGSTOP` the server: connections stay open but nothing is answered, so clients
    /// meet their timeouts rather than refused connections. Undo with
    /// [`RedisServer::resume`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// `SIGCONT` a paused server.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid} failed");
    }

    /// Start it again on the same port and directory (after [`RedisServer::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.current_dir(self.dir.path())
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--daemonize", "no"])
            .args(["--loglevel", "warning"])
            .args(["--dir", &self.dir.path().display().to_string()]);
        if self.durable {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting redis-server");
        self.child = Some(child);
        // Wait for PING → PONG (the port may take a moment after a restart).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if ping(self.port) {
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("redis-server on port {} exited: {status}", self.port);
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING within 10s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // A paused server would ignore nothing but SIGKILL anyway.
        self.kill();
    }
}

/// Whether `redis-server` can be run. Prints a loud skip notice when it cannot, and
/// panics instead when `CI` is set.
pub fn available() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "redis-server is not on PATH, but CI is set: .ci/run must install it"
    );
    eprintln!(
        "\n==== SKIPPED: redis-server is not on PATH; the Redis tests did not run. \
         Install it (apt-get install redis-server) to run them. ====\n"
    );
    false
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    l.local_addr().expect("a bound address").port()
}

/// One `PING` over a fresh connection, answered `+PONG`.
fn ping(port: u16) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}
