//! Test harness: a real database per test (a SQLite file in a temp folder, or a fresh Postgres
//! database), an in-process simulator, and the service on a loopback port.
#![allow(dead_code)]

pub mod process;
pub mod receiver;
pub mod tools;

use kling_relay::config::{Secret, Settings};
use kling_relay::simulator::{SimConfig, Simulator};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const WEBHOOK_SECRET: &str = "test-webhook-secret-of-at-least-32-bytes";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs each listed `async fn name(Backend)` once per backend, as `sqlite::name` and
/// `postgres::name`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
            )*
        }
        $crate::on_postgres!(postgres; $($name),*);
    };
}

/// Runs each listed `async fn name(Backend)` on Postgres only, as `<module>::name` (a missing
/// Postgres fails them unless the run opts out, see `tools`).
#[macro_export]
macro_rules! on_postgres {
    ($module:ident; $($name:ident),* $(,)?) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(()) = $crate::common::postgres_or_skip() {
                        super::$name($crate::common::Backend::Postgres).await
                    }
                }
            )*
        }
    };
}

pub fn postgres_admin_url() -> String {
    std::env::var("KLING_RELAY_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Some(()) when Postgres tests should run. Without Postgres the test fails, naming it, unless the
/// run opted out (`KLING_RELAY_TEST_SKIP=postgres`, see `tools`).
pub fn postgres_or_skip() -> Option<()> {
    let url =
        url::Url::parse(&postgres_admin_url()).expect("KLING_RELAY_TEST_POSTGRES_URL is not a URL");
    let host = url.host_str().unwrap_or("127.0.0.1").to_owned();
    let port = url.port().unwrap_or(5432);
    let up = tools::postgres_reachable(&host, port);
    tools::require(
        tools::Tool::Postgres,
        up,
        &format!("Postgres at {host}:{port}"),
    )
    .then_some(())
}

/// A database of the test's own, removed when dropped.
pub struct TestDb {
    pub url: String,
    pub backend: Backend,
    _dir: Option<tempfile::TempDir>,
    pg_name: Option<String>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}/nested/relay.db", dir.path().display());
                TestDb {
                    url,
                    backend,
                    _dir: Some(dir),
                    pg_name: None,
                }
            }
            Backend::Postgres => {
                use sqlx::Connection;
                let admin = postgres_admin_url();
                let name = format!("klr_test_{}", uuid::Uuid::new_v4().simple());
                let mut conn = sqlx::PgConnection::connect(&admin)
                    .await
                    .expect("connect to Postgres");
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .await
                    .expect("create test database");
                let mut url = url::Url::parse(&admin).expect("admin url");
                url.set_path(&format!("/{name}"));
                TestDb {
                    url: url.to_string(),
                    backend,
                    _dir: None,
                    pg_name: Some(name),
                }
            }
        }
    }
}

/// Runs `$body` with `$c` bound to a fresh connection to the test's database, whichever backend.
macro_rules! with_connection {
    ($db:expr, $c:ident => $body:expr) => {{
        use sqlx::Connection;
        match $db.backend {
            Backend::Sqlite => {
                let mut $c = sqlx::SqliteConnection::connect(&$db.url)
                    .await
                    .expect("connect");
                $body
            }
            Backend::Postgres => {
                let mut $c = sqlx::PgConnection::connect(&$db.url)
                    .await
                    .expect("connect");
                $body
            }
        }
    }};
}

impl TestDb {
    /// Runs one statement on the test's database from outside the service.
    pub async fn exec(&self, sql: &str) {
        with_connection!(self, c => {
            sqlx::query(sql).execute(&mut c).await.expect("exec");
        })
    }

    /// The single integer a counting query returns.
    pub async fn count(&self, sql: &str) -> i64 {
        with_connection!(self, c => sqlx::query_scalar(sql).fetch_one(&mut c).await.expect("count"))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_name.take() else {
            return;
        };
        // Drop runs outside async context; a short-lived runtime on its own thread does the cleanup.
        let admin = postgres_admin_url();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async {
                    use sqlx::Connection;
                    if let Ok(mut c) = sqlx::PgConnection::connect(&admin).await {
                        let _ =
                            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                                .execute(&mut c)
                                .await;
                    }
                });
            }
        })
        .join();
    }
}

/// Fast timings so the whole loop runs in well under a second per task.
pub fn fast_settings(db_url: &str) -> Settings {
    let mut s = Settings::defaults().expect("defaults load");
    s.database.url = db_url.to_owned();
    s.database.max_connections = 4;
    s.server.webhook_secret = Secret::new(WEBHOOK_SECRET);
    s.dispatch.wait = Duration::from_secs(2);
    s.dispatch.retry_initial = Duration::from_millis(50);
    s.dispatch.retry_max = Duration::from_millis(400);
    s.cometapi.timeout = Duration::from_secs(5);
    // Roomy by default; the admission tests set their own limits.
    s.cometapi.max_concurrency = 1000;
    s.poller.first_poll_after = Duration::from_millis(400);
    s.poller.interval = Duration::from_millis(200);
    s.poller.max_interval = Duration::from_secs(1);
    s.poller.tick = Duration::from_millis(50);
    s.poller.not_found_grace = Duration::from_secs(3600);
    s.notifications.timeout = Duration::from_secs(2);
    // In memory, and the simulator's images come over plain http; tests/archive.rs sets its own.
    s.archive.backend = kling_relay::config::ArchiveBackend::Memory;
    s.archive.allow_http = true;
    // The simulator's result images are on this host, which archive fetches refuse unless listed.
    s.archive.allowed_hosts = vec!["127.0.0.1".into()];
    // Every receiver of the suite is on this host: loopback is opt-in.
    s.notifications.allow_networks = vec!["127.0.0.0/8".into(), "::1/128".into()];
    s.notifications.retry_schedule = [0, 100, 200, 300]
        .into_iter()
        .map(|ms| Duration::from_millis(ms).into())
        .collect();
    s
}

/// A simulator playing `cfg` on loopback, and fast settings for a relay on `db` that talks to it
/// (its key, and the profile and Kling keys the simulator plays, unless a test says otherwise).
pub async fn simulated_upstream(db: &TestDb, cfg: SimConfig) -> (Simulator, Settings) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sim");
    let mut settings = fast_settings(&db.url);
    settings.cometapi.profile = cfg.profile;
    settings.cometapi.access_key = Secret::new(cfg.access_key.clone());
    settings.cometapi.secret_key = Secret::new(cfg.secret_key.clone());
    let sim = Simulator::start(cfg, listener).await.expect("start sim");
    settings.cometapi.base_url = sim.base_url();
    settings.cometapi.api_key = Secret::new(sim.api_key());
    (sim, settings)
}

pub fn fast_sim() -> SimConfig {
    SimConfig {
        processing_after: Duration::from_millis(100),
        finish_after: Duration::from_millis(300),
        concurrency_units: 1000,
        ..SimConfig::default()
    }
}

/// An upstream that accepts tasks but does not move them on within a test's lifetime.
pub fn stalled_sim() -> SimConfig {
    SimConfig {
        processing_after: Duration::from_secs(600),
        concurrency_units: 10_000,
        ..fast_sim()
    }
}

impl Options {
    pub fn stalled() -> Options {
        Options {
            sim: stalled_sim(),
            ..Options::default()
        }
    }
}

/// GET a JSON document.
pub async fn fetch_json(http: &reqwest::Client, url: &str) -> Value {
    http.get(url)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON body")
}

pub struct TestApp {
    pub base: String,
    /// Sends the test client's API key on every request.
    pub http: reqwest::Client,
    /// Sends no key.
    pub anonymous: reqwest::Client,
    /// The test client: name, API key, signing secret.
    pub client: kling_relay::service::clients::NewClient,
    pub sim: Simulator,
    pub db: TestDb,
    pub settings: Settings,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

pub struct Options {
    pub settings: Box<dyn FnOnce(&mut Settings) + Send>,
    pub sim: SimConfig,
    /// Send callbacks to the service (server.public_url set).
    pub callbacks: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            settings: Box::new(|_| {}),
            sim: fast_sim(),
            callbacks: true,
        }
    }
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> TestApp {
        Self::spawn_with(backend, Options::default()).await
    }

    /// The service against a simulator playing `profile` (the service set to the same profile).
    pub async fn playing(
        backend: Backend,
        profile: kling_relay::config::UpstreamProfile,
    ) -> TestApp {
        let sim = SimConfig {
            profile,
            ..fast_sim()
        };
        Self::spawn_with(
            backend,
            Options {
                sim,
                ..Options::default()
            },
        )
        .await
    }

    pub async fn spawn_with(backend: Backend, opts: Options) -> TestApp {
        // Quiet unless RUST_LOG asks for the service's log.
        kling_relay::telemetry::init(kling_relay::config::LogFormat::Text, "off");
        let db = TestDb::new(backend).await;
        let (sim, mut settings) = simulated_upstream(&db, opts.sim).await;
        (opts.settings)(&mut settings);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
        let addr = listener.local_addr().expect("addr");
        if opts.callbacks {
            settings.server.public_url = format!("http://{addr}");
        }
        let client = create_client(&db, "tester").await;
        let mut app = TestApp {
            base: format!("http://{addr}"),
            http: client_with_key(&client.api_key),
            anonymous: reqwest::Client::new(),
            client,
            sim,
            db,
            settings,
            shutdown: CancellationToken::new(),
            handle: None,
        };
        app.start_on(listener).await;
        app
    }

    async fn start_on(&mut self, listener: TcpListener) {
        let token = CancellationToken::new();
        self.shutdown = token.clone();
        self.handle = Some(tokio::spawn(kling_relay::app::run(
            self.settings.clone(),
            listener,
            token,
        )));
        wait_until(Duration::from_secs(10), || async {
            self.http
                .get(format!("{}/healthz", self.base))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
    }

    /// Kills the service abruptly (its task is aborted mid-flight, as a crash would) and starts
    /// it again on the same address and database.
    pub async fn crash_and_restart(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
            let _ = h.await;
        }
        let listener = self.rebind().await;
        self.start_on(listener).await;
    }

    /// The service's address again; an aborted server's tasks release it a moment later.
    async fn rebind(&self) -> TcpListener {
        let addr = self.base.trim_start_matches("http://").to_owned();
        let start = Instant::now();
        loop {
            match TcpListener::bind(&addr).await {
                Ok(l) => return l,
                Err(e) if start.elapsed() > Duration::from_secs(5) => {
                    panic!("cannot rebind {addr}: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// A second instance of the service on the same database and upstream (a replica), on its own
    /// address; it stops when dropped.
    pub async fn replica(&self) -> Replica {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind replica");
        let addr = listener.local_addr().expect("addr");
        let mut settings = self.settings.clone();
        if !settings.server.public_url.is_empty() {
            settings.server.public_url = format!("http://{addr}");
        }
        let shutdown = CancellationToken::new();
        tokio::spawn(kling_relay::app::run(settings, listener, shutdown.clone()));
        let base = format!("http://{addr}");
        wait_until(Duration::from_secs(10), || async {
            self.http
                .get(format!("{base}/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        Replica { base, shutdown }
    }

    /// Stops the service (gracefully) and starts it again on the same address and database.
    pub async fn restart(&mut self) {
        self.stop().await;
        let listener = self.rebind().await;
        self.start_on(listener).await;
    }

    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            h.await.expect("service task").expect("service ran cleanly");
        }
    }

    pub async fn submit(&self, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/tasks", self.base))
            .json(body)
            .send()
            .await
            .expect("POST /v1/tasks")
    }

    /// Submits a valid task and returns its id.
    pub async fn submit_ok(&self, body: &Value) -> String {
        let r = self.submit(body).await;
        assert_eq!(r.status(), 202, "submit failed");
        let v: Value = r.json().await.expect("json");
        v["id"].as_str().expect("id").to_owned()
    }

    /// GET without credentials, as text.
    pub async fn get_text_anonymously(&self, path: &str) -> String {
        self.anonymous
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("GET")
            .text()
            .await
            .expect("text")
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{}", self.base, path))
            .send()
            .await
            .expect("GET");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn task(&self, id: &str) -> Value {
        let (status, v) = self.get_json(&format!("/v1/tasks/{id}")).await;
        assert_eq!(status, 200, "GET task {id}: {v}");
        v
    }

    pub async fn events(&self, id: &str) -> Vec<Value> {
        let (status, v) = self.get_json(&format!("/v1/tasks/{id}/events")).await;
        assert_eq!(status, 200);
        v["events"].as_array().cloned().unwrap_or_default()
    }

    /// Waits for the task to reach `status`; panics with its timeline otherwise.
    pub async fn wait_for_status(&self, id: &str, status: &str, within: Duration) -> Value {
        let start = Instant::now();
        loop {
            let t = self.task(id).await;
            if t["status"] == status {
                return t;
            }
            if start.elapsed() > within {
                panic!(
                    "task {id} is {} after {within:?}, wanted {status}; events: {:#?}",
                    t["status"],
                    self.events(id).await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The callback URL the relay sends upstream: the token is the last path segment.
    pub fn callback_url(&self, id: &str) -> String {
        let token = kling_relay::service::webhook_token(WEBHOOK_SECRET.as_bytes(), id);
        format!("{}/webhooks/cometapi/{id}/{token}", self.base)
    }

    /// The older form, token in the query string, still accepted for tasks sent before.
    pub fn callback_url_query_form(&self, id: &str) -> String {
        let token = kling_relay::service::webhook_token(WEBHOOK_SECRET.as_bytes(), id);
        format!("{}/webhooks/cometapi/{id}?token={token}", self.base)
    }

    pub async fn post_callback(&self, url: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(url)
            .json(body)
            .send()
            .await
            .expect("POST callback");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

/// A task status's place in the order tasks move in (any final status is 3).
pub fn status_rank(status: &str) -> u8 {
    match status {
        "pending" => 0,
        "submitted" => 1,
        "processing" => 2,
        _ => 3,
    }
}

/// The content type an answer declares ("" when none).
pub fn content_type(r: &reqwest::Response) -> String {
    r.headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// Prints a fault test's figures and appends them to `target/tmp/reliability.txt`, which
/// `.ci/run` shows after the suite (the README's Reliability section quotes them).
pub fn record_figures(line: &str) {
    use std::io::Write;
    println!("{line}");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("reliability.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}

/// A store on the test's database, migrated: what one replica of the service opens.
pub async fn open_store(db: &TestDb) -> kling_relay::storage::Store {
    let s = kling_relay::storage::Store::connect(&db.url, 4)
        .await
        .expect("connect");
    s.migrate().await.expect("migrate");
    s
}

/// A task to insert directly (owned by client `c1`, which need not exist), created at `1.7e12 + i`.
pub fn task_record(i: i64) -> kling_relay::storage::NewTaskRecord {
    let id = uuid::Uuid::now_v7().to_string();
    kling_relay::storage::NewTaskRecord {
        external_task_id: format!("klr-{id}"),
        id,
        model_name: "kling-v2".into(),
        prompt: Some(format!("task {i}")),
        n: 1,
        aspect_ratio: None,
        priority: Default::default(),
        metadata: None,
        inputs: kling_relay::domain::TaskInputs {
            subject_images: vec!["https://e.x/a.png".into(), "https://e.x/b.png".into()],
            scene_image: None,
            style_image: None,
            negative_prompt: None,
            watermark_info: None,
        },
        created_at_ms: 1_700_000_000_000 + i,
        client: Some("c1".into()),
        notify_url: None,
        request_id: None,
    }
}

/// Creates a client directly in the test's database (migrating it first).
pub async fn create_client(db: &TestDb, name: &str) -> kling_relay::service::clients::NewClient {
    let store = kling_relay::storage::Store::connect(&db.url, 1)
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    let c = kling_relay::service::clients::create_client(&store, name, None)
        .await
        .expect("create client");
    store.close().await;
    c
}

/// An HTTP client that sends `Authorization: Bearer <key>` on every request.
pub fn client_with_key(key: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&format!("Bearer {key}")).expect("header"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("client")
}

/// An extra in-process instance of the service; see `TestApp::replica`.
pub struct Replica {
    pub base: String,
    shutdown: CancellationToken,
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.sim.stop();
    }
}

pub async fn wait_until<F, Fut>(within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < within,
            "condition not met within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A 300x300 grey PNG, as Base64: the smallest input upstream takes.
pub const PNG_300: &str = "iVBORw0KGgoAAAANSUhEUgAAASwAAAEsCAAAAABcFtGpAAABo0lEQVR42u3QQREAAAwCIKMb3Qp77yACKWdRIEuWLFmyZCmQJUuWLFmyFMiSJUuWLFkKZMmSJUuWLAWyZMmSJUuWAlmyZMmSJUuBLFmyZMmSpUCWLFmyZMlSIEuWLFmyZCmQJUuWLFmyFMiSJUuWLFkKZMmSJUuWLAWyZMmSJUuWAlmyZMmSJUuBLFmyZMmSpUCWLFmyZMlSIEuWLFmyZCmQJUuWLFmyFMiSJUuWLFkKZMmSJUuWLAWyZMmSJUuWAlmyZMmSJUuBLFmyZMmSpUCWLFmyZMlSIEuWLFmyZCmQJUuWLFmyFMiSJUuWLFkKZMmSJUuWLAWyZMmSJUuWAlmyZMmSJUuBLFmyZMmSpUCWLFmyZMlSIEuWLFmyZCmQJUuWLFmyFMiSJUuWLFkKZMmSJUuWLAWyZMmSJUuWAlmyZMmSJUuBLFmyZMmSpUCWLFmyZMlSIEuWLFmyZCmQJUuWLFmyFMiSJUuWLFkKZMmSJUuWLAWyZMmSJUuWAlmyZMmSJUuBLFmyZMmSpUCWLFmyZMlSIEuWLFmyZCmQJUuWrJ8GwefSQmRR+mcAAAAASUVORK5CYII=";
/// An 800x300 PNG: wider than upstream's 2.5:1.
pub const PNG_TOO_WIDE: &str = "iVBORw0KGgoAAAANSUhEUgAAAyAAAAEsCAAAAAAeRojmAAACWUlEQVR42u3TMQ0AAAzDsEIv9CLYt9OGECkpcIoEYBAwCBgEDAIGAYOAQcAgYBDAIGAQMAgYBAwCBgGDgEHAIGAQwCBgEDAIGAQMAgYBg4BBwCCAQcAgYBAwCBgEDAIGAYOAQcAggEHAIGAQMAgYBAwCBgGDgEEAg4BBwCBgEDAIGAQMAgYBg4BBAIOAQcAgYBAwCBgEDAIGAYMABgGDgEHAIGAQMAgYBAwCBgGDAAYBg4BBwCBgEDAIGAQMAgYBg0gABgGDgEHAIGAQMAgYBAwCBgEMAgYBg4BBwCBgEDAIGAQMAgYBDAIGAYOAQcAgYBAwCBgEDAIYBAwCBgGDgEHAIGAQMAgYBAwCGAQMAgYBg4BBwCBgEDAIGAQwCBgEDAIGAYOAQcAgYBAwCBgEMAgYBAwCBgGDgEHAIGAQMAhgEDAIGAQMAgYBg4BBwCBgEDAIYBAwCBgEDAIGAYOAQcAgYBAwiARgEDAIGAQMAgYBg4BBwCBgEMAgYBAwCBgEDAIGAYOAQcAgYBDAIGAQMAgYBAwCBgGDgEHAIIBBwCBgEDAIGAQMAgYBg4BBwCCAQcAgYBAwCBgEDAIGAYOAQQCDgEHAIGAQMAgYBAwCBgGDgEEAg4BBwCBgEDAIGAQMAgYBgwAGAYOAQcAgYBAwCBgEDAIGAYMABgGDgEHAIGAQMAgYBAwCBgGDSAAGAYOAQcAgYBAwCBgEDAIGAQwCBgGDgEHAIGAQMAgYBAwCBgEMAgYBg4BBwCBgEDAIGAQMAhgEDAIGAYOAQcAgYBAwCBgEDAIYBAwCfwbQo9ttis39cgAAAABJRU5ErkJggg==";
/// A 1x1 PNG: a valid image, far too small for upstream.
pub const PNG_1PX: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";

pub fn valid_body() -> Value {
    json!({
        "subject_image_list": [
            {"subject_image": "https://example.com/a.png"},
            {"subject_image": "https://example.com/b.png"}
        ],
        "prompt": "two cats at a tea party",
        "n": 2,
        "aspect_ratio": "1:1"
    })
}

/// A callback body as CometAPI sends it.
pub fn callback(task_id: &str, status: &str, updated_at: i64) -> Value {
    let mut v = json!({
        "task_id": task_id,
        "task_status": status,
        "task_status_msg": "",
        "created_at": 1,
        "updated_at": updated_at,
    });
    if status == "succeed" {
        v["task_result"] = json!({"images": [{"index": 0, "url": "https://cdn.example/0.png"}]});
    }
    v
}

pub fn statuses(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["status"].as_str().unwrap_or("").to_owned())
        .collect()
}

pub fn sources(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["source"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// A status change with nothing beside it (no next poll, notification, archive or payload);
/// a test sets what it needs with `Commit { leaves_pending: true, ..commit(…) }`.
pub fn commit<'a>(
    id: &'a str,
    expected_version: i64,
    change: &'a kling_relay::domain::Change,
    source: kling_relay::domain::EventSource,
    now_ms: i64,
) -> kling_relay::storage::Commit<'a> {
    kling_relay::storage::Commit {
        id,
        expected_version,
        change,
        source,
        now_ms,
        poll_due_at_ms: None,
        outbox: None,
        archive: false,
        upstream_payload: None,
        leaves_pending: false,
        decided_on: None,
    }
}

/// Checks that `r` is an RFC 9457 problem with `status`, a title and a detail; returns its body.
pub async fn problem(r: reqwest::Response, status: u16) -> Value {
    assert_eq!(r.status().as_u16(), status);
    assert_eq!(content_type(&r), "application/problem+json");
    let v: Value = r.json().await.expect("a problem+json body");
    assert_eq!(v["status"], status, "{v}");
    assert!(v["title"].is_string() && v["detail"].is_string(), "{v}");
    v
}
