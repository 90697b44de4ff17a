//! The `kling-relay` binary as a child process: spawn it with an environment, wait for it, kill it
//! (`kill -9`) or stop it (SIGTERM), and read what it logged.

use super::{client_with_key, TestDb};
use kling_relay::simulator::{SimConfig, Simulator};
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_kling-relay");

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The binary with a clean environment: only what the test sets.
pub fn command(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn");
    c
}

pub struct Service {
    pub child: Child,
    pub base: String,
    /// Everything the service wrote to stderr so far, drained by a thread so the pipe never fills.
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Service {
    pub fn spawn(args: &[&str], env: &[(String, String)], cwd: &Path) -> Service {
        let port = env
            .iter()
            .find(|(k, _)| k == "KLING_RELAY_SERVER__LISTEN")
            .map(|(_, v)| v.clone())
            .expect("listen set");
        let mut c = command(args);
        c.current_dir(cwd)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c.spawn().expect("spawn service");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        if let Some(mut pipe) = child.stderr.take() {
            let sink = stderr.clone();
            std::thread::spawn(move || {
                use std::io::Read;
                let mut buf = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut s) = sink.lock() {
                        s.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            });
        }
        Service {
            child,
            base: format!("http://{port}"),
            stderr,
        }
    }

    pub async fn wait_ready(&mut self) {
        let http = reqwest::Client::new();
        let start = Instant::now();
        loop {
            if let Ok(r) = http.get(format!("{}/healthz", self.base)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                panic!("service exited with {status}: {}", self.stderr_text());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "service not ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The demo key `serve --simulate` prints on its first line of output.
    pub fn demo_key(&mut self) -> String {
        self.demo_credentials().0
    }

    /// The demo client's API key and signing secret, from the first two lines on stdout.
    pub fn demo_credentials(&mut self) -> (String, String) {
        use std::io::BufRead;
        let out = self.child.stdout.take().expect("stdout piped");
        let mut reader = std::io::BufReader::new(out);
        let (mut first, mut second) = (String::new(), String::new());
        reader.read_line(&mut first).expect("read stdout");
        reader.read_line(&mut second).expect("read stdout");
        let key = first
            .split("KEY=")
            .nth(1)
            .map(|k| k.trim().to_owned())
            .unwrap_or_else(|| panic!("no key in {first:?}"));
        let secret = second
            .split_whitespace()
            .find(|w| w.starts_with("whsec_"))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no signing secret in {second:?}"));
        (key, secret)
    }

    pub fn kill9(&mut self) {
        // std's kill is SIGKILL on Unix: no shutdown code runs.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Sends SIGTERM and waits up to `within` for the exit status.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(sent.success());
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                start.elapsed() < within,
                "no exit within {within:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A simulator with short delays and room for everything.
pub async fn start_sim() -> Simulator {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Simulator::start(
        SimConfig {
            processing_after: Duration::from_millis(200),
            finish_after: Duration::from_millis(400),
            concurrency_units: 10_000,
            ..SimConfig::default()
        },
        listener,
    )
    .await
    .unwrap()
}

/// Runs `kling-relay ARGS` on the test's database and asserts it succeeded.
pub fn cli_ok(db: &TestDb, args: &[&str]) -> std::process::Output {
    let out = command(args)
        .env("KLING_RELAY_DATABASE__URL", &db.url)
        .output()
        .expect("run the binary");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Creates a client with `kling-relay clients create --json` and returns an HTTP client that
/// sends its key.
pub fn client_from_cli(db: &TestDb) -> reqwest::Client {
    let out = cli_ok(db, &["clients", "create", "tester", "--json"]);
    let created: Value = serde_json::from_slice(&out.stdout).expect("clients create --json");
    client_with_key(created["api_key"].as_str().unwrap())
}

pub fn service_env(listen: &str, db: &str, sim: &Simulator) -> Vec<(String, String)> {
    [
        ("KLING_RELAY_SERVER__LISTEN", listen.to_owned()),
        ("KLING_RELAY_SERVER__PUBLIC_URL", format!("http://{listen}")),
        ("KLING_RELAY_DATABASE__URL", db.to_owned()),
        ("KLING_RELAY_COMETAPI__BASE_URL", sim.base_url()),
        ("COMETAPI_KEY", sim.api_key().to_owned()),
        ("KLING_RELAY_COMETAPI__TIMEOUT", "1s".into()),
        ("KLING_RELAY_COMETAPI__MAX_CONCURRENCY", "1000".into()),
        ("KLING_RELAY_DISPATCH__WAIT", "10ms".into()),
        ("KLING_RELAY_DISPATCH__RETRY_INITIAL", "100ms".into()),
        ("KLING_RELAY_DISPATCH__RETRY_MAX", "1s".into()),
        ("KLING_RELAY_POLLER__FIRST_POLL_AFTER", "300ms".into()),
        ("KLING_RELAY_POLLER__INTERVAL", "200ms".into()),
        ("KLING_RELAY_POLLER__MAX_INTERVAL", "1s".into()),
        ("KLING_RELAY_POLLER__TICK", "50ms".into()),
        (
            "KLING_RELAY_NOTIFICATIONS__ALLOW_NETWORKS",
            r#"["127.0.0.0/8", "::1/128"]"#.into(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}
