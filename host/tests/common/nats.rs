//! A real `nats-server` with JetStream for the tests of the NATS engine: each
//! test gets its own, on a free loopback port with a temp store dir, never the
//! machine's shared server (tests must not see each other's streams, and may
//! stop, kill and restart theirs).

use std::fs::OpenOptions;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a start or restart may take before the test gives up: a loaded
/// 2-core CI machine can be slow to recover a JetStream store.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// One `nats-server -js` process (and its store, which outlives restarts).
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    /// The monitoring port: `/healthz` says when JetStream is ready.
    monitor: u16,
    /// Holds `store/` and `nats.log`; removed on drop.
    dir: tempfile::TempDir,
    binary: PathBuf,
}

/// A port nobody listens on right now (the kernel's pick for port 0).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free loopback port")
        .port()
}

/// `nats-server` from `SWITCHYARD_NATS_SERVER`, `PATH` or Debian's /usr/sbin
/// (not in a normal user's PATH).
fn find_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("SWITCHYARD_NATS_SERVER") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "nats-server is not installed, and the NATS engine's tests need a real one \
                 (Debian: `apt-get install nats-server`; .ci/run installs it; or point \
                 SWITCHYARD_NATS_SERVER at the binary)"
            )
        })
}

impl NatsServer {
    /// Starts a server and waits until it accepts connections and JetStream is
    /// ready.
    pub async fn start() -> NatsServer {
        let mut server = NatsServer {
            child: None,
            port: free_port(),
            monitor: free_port(),
            dir: tempfile::tempdir().expect("tempdir for nats-server"),
            binary: find_binary(),
        };
        // The ports were free when picked, but another test may bind one
        // before nats-server does: it then exits at once, and new ports are
        // tried.
        for _ in 0..5 {
            let seen = server.log().len();
            server.spawn();
            match server.wait_ready().await {
                Ok(()) => return server,
                Err(_) if server.log()[seen..].contains("address already in use") => {
                    server.port = free_port();
                    server.monitor = free_port();
                }
                Err(status) => panic!(
                    "nats-server exited while starting ({status}):\n{}",
                    server.log()
                ),
            }
        }
        panic!(
            "nats-server found its ports taken five times:\n{}",
            server.log()
        );
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store dir (kept across restarts).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }

    /// Everything the server logged, over every life (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "nats-server is already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open nats.log");
        let log2 = log.try_clone().expect("clone nats.log handle");
        let child = Command::new(&self.binary)
            .args(["-js", "-a", "127.0.0.1"])
            .args(["-p", &self.port.to_string()])
            .args(["-m", &self.monitor.to_string()])
            .arg("-sd")
            .arg(self.store_dir())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.binary.display()));
        self.child = Some(child);
    }

    /// Polls until the client port accepts TCP and `/healthz` (which covers
    /// JetStream) answers 200; the exit status if the server exits first,
    /// and a panic with the log if it takes too long.
    async fn wait_ready(&mut self) -> Result<(), std::process::ExitStatus> {
        let deadline = Instant::now() + READY_WITHIN;
        let health = format!("http://127.0.0.1:{}/healthz", self.monitor);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("http client");
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(status);
            }
            let tcp = TcpStream::connect_timeout(
                &([127, 0, 0, 1], self.port).into(),
                Duration::from_millis(200),
            )
            .is_ok();
            if tcp {
                let healthy = client
                    .get(&health)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if healthy {
                    return Ok(());
                }
            }
            assert!(
                Instant::now() < deadline,
                "nats-server on port {} not ready within {READY_WITHIN:?}:\n{}",
                self.port,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Graceful stop (SIGTERM, as a service manager would), waiting for the
    /// exit; SIGKILL if it takes over 10 s.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // No libc in the dev-dependencies: kill(1) sends the signal.
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        if !sent.is_ok_and(|s| s.success()) {
            let _ = child.kill();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
            }
        }
    }

    /// SIGKILL, waiting for the exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same store (stopping it
    /// first, gracefully, if it runs), and waits until it is ready.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.spawn();
        if let Err(status) = self.wait_ready().await {
            panic!(
                "nats-server exited while restarting ({status}); is port {} taken?\n{}",
                self.port,
                self.log()
            );
        }
    }

    /// The dir holding the store and the log, for keeping after a failure.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
