//! The tools the suite needs beside cargo: Postgres, Chromium with chromedriver, and the Python
//! reference verifier of Standard Webhooks. `scripts/test` sets all three up.
//!
//! A test whose tool is missing fails with one line naming the tool and how to get it. A run may
//! opt out explicitly (`KLING_RELAY_TEST_SKIP=browser,postgres,python`): each skipped test then
//! prints a `SKIPPED` line, and the test binary (`tests/it`) ends with a count of what it skipped. Both go to
//! stderr past the harness's capture, so they show in a plain `cargo test`.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once, OnceLock};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Postgres,
    Browser,
    Python,
}

impl Tool {
    const ALL: [Tool; 3] = [Tool::Postgres, Tool::Browser, Tool::Python];

    /// The name used in `KLING_RELAY_TEST_SKIP`.
    pub fn name(self) -> &'static str {
        match self {
            Tool::Postgres => "postgres",
            Tool::Browser => "browser",
            Tool::Python => "python",
        }
    }

    fn how_to_get(self) -> &'static str {
        match self {
            Tool::Postgres => {
                "start it (`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`) \
                 or point KLING_RELAY_TEST_POSTGRES_URL at one"
            }
            Tool::Browser => "install it: `sudo apt-get install chromium chromium-driver`",
            Tool::Python => {
                "install it: `python3 -m venv .ci/venv && .ci/venv/bin/pip install standardwebhooks` \
                 (or set KLING_RELAY_TEST_PYTHON to a Python that has it)"
            }
        }
    }
}

/// The tools this run opted out of; an unknown name fails, so a typo cannot hide a skip.
fn opted_out() -> &'static Vec<Tool> {
    static SKIP: OnceLock<Vec<Tool>> = OnceLock::new();
    SKIP.get_or_init(|| {
        let raw = std::env::var("KLING_RELAY_TEST_SKIP").unwrap_or_default();
        raw.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                Tool::ALL
                    .into_iter()
                    .find(|t| t.name() == s)
                    .unwrap_or_else(|| {
                        panic!(
                            "KLING_RELAY_TEST_SKIP: unknown tool `{s}` (known: browser, postgres, python)"
                        )
                    })
            })
            .collect()
    })
}

static SKIPPED: [AtomicUsize; 3] = [
    AtomicUsize::new(0),
    AtomicUsize::new(0),
    AtomicUsize::new(0),
];

fn slot(tool: Tool) -> usize {
    Tool::ALL.iter().position(|t| *t == tool).unwrap_or(0)
}

/// Whether a test that needs `tool` should run: true when `available`; false (and reported) when
/// it is missing and the run opted out of it; otherwise the test fails here, naming `what`.
pub fn require(tool: Tool, available: bool, what: &str) -> bool {
    if available {
        return true;
    }
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    if !opted_out().contains(&tool) {
        panic!(
            "{test}: {what} is missing: {}; `scripts/test` sets it up, or opt out with KLING_RELAY_TEST_SKIP={}",
            tool.how_to_get(),
            tool.name()
        );
    }
    // A test may ask more than once (one reference check per notification): count it once.
    static SEEN: Mutex<Vec<(String, usize)>> = Mutex::new(Vec::new());
    {
        let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
        let key = (test.clone(), slot(tool));
        if seen.contains(&key) {
            return false;
        }
        seen.push(key);
    }
    SKIPPED[slot(tool)].fetch_add(1, Ordering::SeqCst);
    report_at_exit();
    // Straight to stderr: the harness captures `eprintln!`, and a skip must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {what} is missing (opted out by KLING_RELAY_TEST_SKIP={})",
        tool.name()
    );
    false
}

fn report_at_exit() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        unsafe extern "C" {
            fn atexit(f: extern "C" fn()) -> std::os::raw::c_int;
        }
        extern "C" fn summary() {
            let parts: Vec<String> = Tool::ALL
                .iter()
                .map(|t| (t.name(), SKIPPED[slot(*t)].load(Ordering::SeqCst)))
                .filter(|(_, n)| *n > 0)
                .map(|(name, n)| format!("{name}: {n}"))
                .collect();
            let total: usize = SKIPPED.iter().map(|n| n.load(Ordering::SeqCst)).sum();
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED in tests/it: {total} test(s) by KLING_RELAY_TEST_SKIP ({})",
                parts.join(", ")
            );
        }
        // SAFETY: registering a plain function with the C runtime; it runs once at exit.
        unsafe {
            atexit(summary);
        }
    });
}

/// Whether Postgres answers at the test URL, checked once per test binary.
pub fn postgres_reachable(host: &str, port: u16) -> bool {
    use std::net::ToSocketAddrs;
    static UP: OnceLock<bool> = OnceLock::new();
    *UP.get_or_init(|| {
        (host, port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .is_some_and(|a| {
                std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_secs(2)).is_ok()
            })
    })
}

/// A Python that can import `standardwebhooks`: `KLING_RELAY_TEST_PYTHON`, else the one
/// `scripts/test` installs in `.ci/venv`, else `python3`.
pub fn reference_python() -> Option<&'static str> {
    static FOUND: OnceLock<Option<String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let venv = format!("{}/.ci/venv/bin/python", env!("CARGO_MANIFEST_DIR"));
            let candidates: Vec<String> = match std::env::var("KLING_RELAY_TEST_PYTHON") {
                // Named explicitly: that one or none, so a broken setting is not papered over.
                Ok(p) => vec![p],
                Err(_) => vec![venv, "python3".into()],
            };
            candidates.into_iter().find(|p| {
                std::process::Command::new(p)
                    .args(["-c", "import standardwebhooks"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
        })
        .as_deref()
}
