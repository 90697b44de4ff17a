//! Issue 5: secrets never reach the log or an error body. A busy scenario runs at TRACE level for
//! every crate, and the whole log is searched for each secret: the CometAPI key, client API keys,
//! callback URL tokens, the callback token secret and notification signing secrets.

use crate::common::receiver::Receiver;
use crate::common::*;
use kling_relay::simulator::Faults;
use serde_json::json;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::ErrorKind::Other)?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// One subscriber for the whole test process, at TRACE for every crate, writing into a buffer:
/// service tasks run on the runtime's worker threads, so a thread-local one would miss them.
fn captured_log() -> Captured {
    static LOG: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let log = Captured::default();
        tracing::subscriber::set_global_default(
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_writer(log.clone())
                .with_ansi(false)
                .finish(),
        )
        .expect("no subscriber installed before this one");
        log
    })
    .clone()
}

/// The log must be its process's only subscriber, at TRACE for every crate, and other tests of
/// this binary install theirs first: so the scenario runs in a process of its own, this test
/// binary again running only it (`own_process::*`, ignored in the ordinary run).
async fn busy_scenario_at_trace_level_logs_no_secret(b: Backend) {
    let name = match b {
        Backend::Sqlite => "secrets::own_process::sqlite",
        Backend::Postgres => "secrets::own_process::postgres",
    };
    let out = std::process::Command::new(std::env::current_exe().expect("own test binary"))
        .args([name, "--exact", "--ignored", "--nocapture"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run the scenario in its own process");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the scenario failed:\n{text}");
    assert!(
        text.contains("1 passed"),
        "the scenario did not run:\n{text}"
    );
}

mod own_process {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "run by secrets::*::busy_scenario_at_trace_level_logs_no_secret in its own process"]
    async fn sqlite() {
        super::scenario(Backend::Sqlite).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "run by secrets::*::busy_scenario_at_trace_level_logs_no_secret in its own process"]
    async fn postgres() {
        if let Some(()) = postgres_or_skip() {
            super::scenario(Backend::Postgres).await
        }
    }
}

async fn scenario(b: Backend) {
    let log = captured_log();

    let mut app = TestApp::spawn(b).await;
    let rx = Receiver::start().await;
    rx.script("/hook", &[500]);
    app.sim.set_faults(Faults {
        drop_callbacks: 0.3,
        duplicate_callbacks: true,
        ..Faults::default()
    });
    let mut ids = Vec::new();
    for i in 0..4 {
        let mut body = valid_body();
        body["notify_url"] = json!(rx.url("/hook"));
        if i == 3 {
            body["prompt"] = json!("forbidden");
        }
        ids.push(app.submit_ok(&body).await);
    }
    // Rejected attempts with real-looking credentials.
    let (status, body) = app
        .post_callback(
            &format!(
                "{}/webhooks/cometapi/{}?token=not-the-token",
                app.base, ids[0]
            ),
            &callback("1", "succeed", 1),
        )
        .await;
    assert_eq!(status, 401);
    assert!(!body.to_string().contains(&app.callback_url(&ids[0])));
    let wrong = client_with_key("klr_wrong_key_value");
    let r = wrong
        .get(format!("{}/v1/tasks", app.base))
        .send()
        .await
        .unwrap();
    assert!(
        !r.text().await.unwrap().contains("klr_wrong_key_value"),
        "error body echoes a key"
    );
    // A secret rotation, a restart and a second client, to cover every path that touches secrets.
    let store = kling_relay::storage::Store::connect(&app.db.url, 1)
        .await
        .unwrap();
    let rotated =
        kling_relay::service::clients::rotate_secret(&store, "tester", Duration::from_secs(60))
            .await
            .unwrap();
    store.close().await;
    let other = create_client(&app.db, "other").await;
    app.restart().await;
    for id in &ids[..3] {
        app.wait_for_status(id, "succeeded", Duration::from_secs(15))
            .await;
    }
    app.wait_for_status(&ids[3], "failed", Duration::from_secs(15))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let text = String::from_utf8_lossy(&log.0.lock().unwrap()).into_owned();
    assert!(
        text.len() > 10_000,
        "the scenario logged at trace level ({} bytes)",
        text.len()
    );
    assert!(text.contains("TRACE"), "trace level was on");
    for worker_line in [
        "dispatcher started",
        "notification attempt",
        "callback received",
    ] {
        assert!(text.contains(worker_line), "the log covers `{worker_line}`");
    }
    let mut secrets: Vec<(String, String)> = vec![
        ("CometAPI key".into(), app.sim.api_key().to_owned()),
        ("client API key".into(), app.client.api_key.clone()),
        ("other client API key".into(), other.api_key.clone()),
        ("signing secret".into(), app.client.signing_secret.clone()),
        ("rotated signing secret".into(), rotated),
        ("callback token secret".into(), WEBHOOK_SECRET.to_owned()),
    ];
    for id in &ids {
        let url = app.callback_url(id);
        let token = url.rsplit('/').next().unwrap().to_owned();
        secrets.push((format!("callback token of {id}"), token));
    }
    for (what, secret) in &secrets {
        // The base64 body of a whsec_ secret is what would leak if anything did.
        let needle = secret.trim_start_matches("whsec_");
        assert!(!text.contains(needle), "the log contains the {what}");
    }
}

on_both_backends!(busy_scenario_at_trace_level_logs_no_secret);
