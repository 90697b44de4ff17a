//! Issue 5: the command-line client against a running service — submit with local files and
//! URLs, --wait, --out, --json, tasks list/show/events, and its exit codes. Issue 18: tasks
//! cancel/wait/deliveries, list --cursor/--all, the 401 hint, help on every option.

use crate::common::*;
use serde_json::Value;
use std::process::{Command, Output};
use std::time::Duration;

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
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("401"), "{err}");
    assert!(err.contains("hint: set KLING_RELAY_API_KEY"), "{err}");
}

fn json_of(o: &Output) -> Value {
    serde_json::from_str(stdout(o).trim()).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            stdout(o),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

async fn cancel_wait_and_pages(b: Backend) {
    // Two units upstream (one task of n = 2), and upstream never finishes: the first task holds it, the rest wait.
    let app = TestApp::spawn_with(
        b,
        Options {
            settings: Box::new(|s| s.cometapi.max_concurrency = 2),
            ..Options::stalled()
        },
    )
    .await;
    let running = app.submit_ok(&valid_body()).await;
    let waiting = app.submit_ok(&valid_body()).await;
    let third = app.submit_ok(&valid_body()).await;
    assert_eq!(app.task(&waiting).await["status"], "pending");

    let o = tokio::task::block_in_place(|| run(&app, &["tasks", "cancel", &waiting, "--json"]));
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(json_of(&o)["status"], "canceled");
    // Already sent upstream: refused, exit 2 with the service's reason.
    let o = tokio::task::block_in_place(|| run(&app, &["tasks", "cancel", &running]));
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("409"));

    // Waiting on a final failure exits 1; on a task that does not finish, --timeout gives up.
    let o = tokio::task::block_in_place(|| run(&app, &["tasks", "wait", &waiting, "--json"]));
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(json_of(&o)["status"], "canceled");
    let started = std::time::Instant::now();
    let o =
        tokio::task::block_in_place(|| run(&app, &["tasks", "wait", &running, "--timeout", "1s"]));
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("gave up waiting"));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    // Pages: two, then the rest through the printed cursor; --all follows every cursor.
    let o = tokio::task::block_in_place(|| run(&app, &["tasks", "list", "--limit", "2"]));
    let text = stdout(&o);
    let cursor = text
        .lines()
        .find_map(|l| l.strip_prefix("more: --cursor "))
        .unwrap_or_else(|| panic!("no cursor printed: {text}"))
        .to_owned();
    let o = tokio::task::block_in_place(|| {
        run(
            &app,
            &[
                "tasks", "list", "--limit", "2", "--cursor", &cursor, "--json",
            ],
        )
    });
    let rest = json_of(&o);
    let rest: Vec<&str> = rest["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        rest,
        [running.as_str()],
        "newest first: the oldest is on page 2"
    );
    let o = tokio::task::block_in_place(|| {
        run(&app, &["tasks", "list", "--limit", "1", "--all", "--json"])
    });
    let every = json_of(&o);
    let ids: Vec<&str> = every
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [third.as_str(), waiting.as_str(), running.as_str()]);
}

async fn deliveries_listed_and_sent_again(b: Backend) {
    let app = TestApp::spawn(b).await;
    let rx = crate::common::receiver::Receiver::start().await;
    let url = rx.url("/hook");
    let o = tokio::task::block_in_place(|| {
        run(
            &app,
            &[
                "submit",
                "--subject",
                "https://example.com/a.png",
                "--subject",
                "https://example.com/b.png",
                "--notify-url",
                &url,
                "--wait",
                "--json",
            ],
        )
    });
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let id = json_of(&o)["id"].as_str().unwrap().to_owned();
    let start = std::time::Instant::now();
    let list = loop {
        let o = tokio::task::block_in_place(|| run(&app, &["tasks", "deliveries", &id, "--json"]));
        let v = json_of(&o);
        let d = v["deliveries"].as_array().cloned().unwrap_or_default();
        if d.len() == 3 && d.iter().all(|x| x["state"] == "delivered") {
            break d;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "{v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let o = tokio::task::block_in_place(|| run(&app, &["tasks", "deliveries", &id]));
    let table = stdout(&o);
    assert!(
        table.contains("delivered") && table.contains("succeeded"),
        "{table}"
    );
    let before = rx.received("/hook").len();
    let one = list[0]["id"].as_str().unwrap();
    let o =
        tokio::task::block_in_place(|| run(&app, &["tasks", "deliveries", &id, "--retry", one]));
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let start = std::time::Instant::now();
    while rx.received("/hook").len() == before {
        assert!(start.elapsed() < Duration::from_secs(15), "not sent again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let again = rx.received("/hook");
    assert_eq!(again.last().unwrap().header("webhook-id"), one);
}

/// Every option of every command says what it is for, in `--help`.
#[test]
fn every_option_has_help_and_lists_its_values() {
    fn walk(path: &[&str], out: &mut Vec<String>, seen: &mut usize) {
        *seen += 1;
        let mut args: Vec<&str> = path.to_vec();
        args.push("--help");
        let o = Command::new(BIN).args(&args).env_clear().output().unwrap();
        assert!(o.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let mut section = "";
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            if !line.starts_with(' ') && line.ends_with(':') {
                section = line;
                continue;
            }
            let t = line.trim_start();
            let indent = line.len() - t.len();
            // Option lines are indented 2 (with a short flag) or 6; their help follows on the
            // line, or on the next ones indented further.
            if section == "Options:" && indent <= 6 && t.starts_with('-') {
                let rest = t.split_once("  ").map_or("", |(_, r)| r.trim());
                let has_inline = !rest.is_empty() && !rest.starts_with('[');
                let next_is_help = lines.peek().is_some_and(|n| {
                    let nt = n.trim_start();
                    n.len() - nt.len() >= 8 && !nt.starts_with('[') && !nt.is_empty()
                });
                if !has_inline && !next_is_help {
                    out.push(format!("{}: {t}", path.join(" ")));
                }
            }
            if section == "Commands:" && indent == 2 {
                let name = t.split_whitespace().next().unwrap_or_default();
                if name != "help" {
                    let mut sub = path.to_vec();
                    sub.push(name);
                    // The borrow of `name` ends here: recurse with owned strings.
                    let owned: Vec<String> = sub.iter().map(|s| s.to_string()).collect();
                    let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
                    walk(&refs, out, seen);
                }
            }
        }
        assert!(
            !text.contains("KLING_RELAY_URL="),
            "env values shown: {text}"
        );
    }
    let mut missing = Vec::new();
    let mut seen = 0;
    walk(&[], &mut missing, &mut seen);
    assert!(seen >= 24, "only {seen} commands walked");
    assert!(
        missing.is_empty(),
        "options without help:\n{}",
        missing.join("\n")
    );

    let o = Command::new(BIN)
        .args(["submit", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("16:9") && text.contains("21:9"), "{text}");
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
    cancel_wait_and_pages,
    deliveries_listed_and_sent_again,
);
