//! Issue 5: the command-line client against a running service — submit with local files and
//! URLs, --wait, --out, --json, tasks list/show/events, and its exit codes.

mod common;

use common::*;
use serde_json::Value;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_kling-relay");

fn run(app: &TestApp, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("KLING_RELAY_URL", &app.base)
        .env("KLING_RELAY_API_KEY", &app.client.api_key)
        .output()
        .expect("run kling-relay")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

async fn submit_wait_and_download(b: Backend) {
    let app = TestApp::spawn(b).await;
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("a.png");
    let png = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, PNG_300).unwrap();
    std::fs::write(&local, png).unwrap();
    let out_dir = dir.path().join("out");
    let args = [
        "submit",
        "--subject",
        local.to_str().unwrap(),
        "--subject",
        "https://example.com/b.png",
        "--prompt",
        "two cats",
        "--n",
        "2",
        "--aspect-ratio",
        "1:1",
        "--out",
        out_dir.to_str().unwrap(),
        "--json",
    ];
    let o = tokio::task::block_in_place(|| run(&app, &args));
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let task: Value = serde_json::from_str(stdout(&o).trim()).expect("--json");
    assert_eq!(task["status"], "succeeded");
    let id = task["id"].as_str().unwrap();
    for i in 0..2 {
        let f = out_dir.join(format!("{id}-{i}.png"));
        assert!(std::fs::read(&f).unwrap().starts_with(b"\x89PNG"), "{f:?}");
    }
    // The local file went as Base64 and reached upstream (the task succeeded with it).

    // A failing task: exit code 1, and the reason printed.
    let o = tokio::task::block_in_place(|| {
        run(
            &app,
            &[
                "submit",
                "--subject",
                "https://example.com/a.png",
                "--subject",
                "https://example.com/b.png",
                "--prompt",
                "forbidden",
                "--wait",
            ],
        )
    });
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("failed") && stdout(&o).contains("moderation"));

    // Listing, showing, events.
    let o = tokio::task::block_in_place(|| run(&app, &["tasks", "list", "--limit", "5"]));
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains(id) && stdout(&o).contains("succeeded"));
    let o = tokio::task::block_in_place(|| {
        run(&app, &["tasks", "list", "--status", "failed", "--json"])
    });
    let page: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(page["tasks"].as_array().unwrap().len(), 1);
    let o = tokio::task::block_in_place(|| run(&app, &["tasks", "show", id]));
    assert!(stdout(&o).contains("image 1:"));
    let o = tokio::task::block_in_place(|| run(&app, &["tasks", "events", id, "--json"]));
    let ev: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert!(ev["events"].as_array().unwrap().len() >= 3);
    let o = tokio::task::block_in_place(|| run(&app, &["tasks", "events", id]));
    assert!(stdout(&o).contains("dispatch"));
}

async fn usage_and_connection_errors_exit_2(b: Backend) {
    let app = TestApp::spawn(b).await;
    let cases: Vec<Vec<&str>> = vec![
        vec!["submit"],                                                // missing --subject
        vec!["submit", "--subject", "/no/such/file.png"],              // unreadable file
        vec!["submit", "--subject", "https://e.x/a.png", "--n", "12"], // 422: n out of range
        vec!["tasks", "show", "01a20bc5-f578-76a2-b699-4633fad7e034"], // 404
        vec!["tasks", "list", "--status", "nonsense"],                 // 400
    ];
    for args in cases {
        let o = tokio::task::block_in_place(|| run(&app, &args));
        assert_eq!(
            o.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let o = tokio::task::block_in_place(|| {
        Command::new(BIN)
            .args([
                "tasks",
                "list",
                "--url",
                "http://127.0.0.1:9",
                "--api-key",
                "x",
            ])
            .env_clear()
            .output()
            .unwrap()
    });
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot reach"));
    // A wrong key is refused by the service: also 2, with its message.
    let o = tokio::task::block_in_place(|| {
        Command::new(BIN)
            .args([
                "tasks",
                "list",
                "--url",
                &app.base,
                "--api-key",
                "klr_wrong",
            ])
            .env_clear()
            .output()
            .unwrap()
    });
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("401"));
}

async fn healthcheck_command_for_containers(b: Backend) {
    let app = TestApp::spawn(b).await;
    let url = format!("{}/healthz", app.base);
    let o = tokio::task::block_in_place(|| run(&app, &["healthcheck", "--url", &url]));
    assert_eq!(o.status.code(), Some(0));
    let o = tokio::task::block_in_place(|| {
        run(
            &app,
            &["healthcheck", "--url", "http://127.0.0.1:9/healthz"],
        )
    });
    assert_ne!(o.status.code(), Some(0));
}

on_both_backends!(
    submit_wait_and_download,
    usage_and_connection_errors_exit_2,
    healthcheck_command_for_containers,
);
