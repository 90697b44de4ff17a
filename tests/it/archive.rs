//! Issue 8: the image archive. Succeeded tasks' images are fetched from the upstream URLs and
//! kept (local folder, or memory), served by `GET /v1/tasks/{id}/images/{index}` with their
//! ETag; bad sources fail the image, never the task; a crash mid-archive ends with one copy;
//! backfill and the retention sweep.

use crate::common::*;
use kling_relay::config::ArchiveBackend;
use kling_relay::simulator::{Faults, ImageFault};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(20);

/// An app archiving into a folder of its own (returned with it).
async fn archiving_app(
    b: Backend,
    tune: impl FnOnce(&mut kling_relay::config::Settings) + Send + 'static,
) -> (TestApp, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("archive");
    let app = TestApp::spawn_with(
        b,
        Options {
            settings: Box::new(move |s| {
                s.archive.backend = ArchiveBackend::Local;
                s.archive.path = path.display().to_string();
                s.archive.retry_initial = Duration::from_millis(100);
                s.archive.retry_max = Duration::from_millis(200);
                tune(s);
            }),
            ..Options::default()
        },
    )
    .await;
    (app, dir)
}

/// Waits until every image of the task has left `pending`; returns the task.
async fn archived(app: &TestApp, id: &str) -> Value {
    let mut last = Value::Null;
    for _ in 0..400 {
        let t = app.task(id).await;
        let images = t["images"].as_array().cloned().unwrap_or_default();
        let settled = !images.is_empty()
            && images
                .iter()
                .all(|i| !i["archive"].is_null() && i["archive"]["state"] != "pending");
        if settled {
            return t;
        }
        last = t;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("images of {id} still pending: {last:#}");
}

async fn succeeded_task(app: &TestApp) -> String {
    let id = app.submit_ok(&valid_body()).await;
    app.wait_for_status(&id, "succeeded", WITHIN).await;
    id
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

async fn image_happy_path(app: &TestApp, dir: Option<&Path>) {
    let id = succeeded_task(app).await;
    let t = archived(app, &id).await;
    let images = t["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    for img in images {
        let index = img["index"].as_u64().unwrap();
        let a = &img["archive"];
        assert_eq!(a["state"], "stored", "{img}");
        assert_eq!(a["content_type"], "image/png");
        assert_eq!(
            img["archived_url"],
            format!("/v1/tasks/{id}/images/{index}"),
            "{img}"
        );
        // Our copy is the upstream image, byte for byte, under its SHA-256.
        let upstream = reqwest::get(img["url"].as_str().unwrap())
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let r = app
            .http
            .get(format!(
                "{}{}",
                app.base,
                img["archived_url"].as_str().unwrap()
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "image/png");
        assert_eq!(
            r.headers()["cache-control"],
            "private, max-age=31536000, immutable"
        );
        let etag = r.headers()["etag"].to_str().unwrap().to_owned();
        let body = r.bytes().await.unwrap();
        assert_eq!(body, upstream);
        let sha = hex(&Sha256::digest(&body));
        assert_eq!(etag, format!("\"{sha}\""));
        assert_eq!(a["sha256"], sha);
        assert_eq!(a["size_bytes"], body.len() as u64);
        // Revalidation.
        let again = app
            .http
            .get(format!("{}/v1/tasks/{id}/images/{index}", app.base))
            .header("if-none-match", &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 304);
        assert_eq!(again.headers()["etag"], etag.as_str());
    }
    // The history page carries the same archive records.
    let (_, page) = app.get_json("/v1/tasks").await;
    let listed = page["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == id.as_str())
        .unwrap()
        .clone();
    assert_eq!(listed["images"], t["images"]);
    if let Some(dir) = dir {
        let mut files: Vec<String> = files_under(dir)
            .iter()
            .map(|p| p.strip_prefix(dir).unwrap().display().to_string())
            .collect();
        files.sort();
        assert_eq!(files, [format!("{id}/0.png"), format!("{id}/1.png")]);
    }
}

/// GET /v1/tasks/{id}/images/{index} with the test client's key.
async fn get_image(app: &TestApp, id: &str, index: u32) -> reqwest::Response {
    app.http
        .get(format!("{}/v1/tasks/{id}/images/{index}", app.base))
        .send()
        .await
        .unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn images_are_archived_in_a_local_folder(b: Backend) {
    let (app, dir) = archiving_app(b, |_| {}).await;
    image_happy_path(&app, Some(&dir.path().join("archive"))).await;
}

async fn images_are_archived_in_memory(b: Backend) {
    let app = TestApp::spawn(b).await; // the harness archives in memory
    image_happy_path(&app, None).await;
}

/// Sources that cannot give an image: each image fails with its reason, the task stays
/// `succeeded`, and the image route says the image is not archived.
async fn bad_sources_fail_the_image_never_the_task(b: Backend) {
    let (app, _dir) = archiving_app(b, |s| {
        s.archive.max_image_bytes = 1024 * 1024;
        s.archive.timeout = Duration::from_millis(500);
        s.archive.max_attempts = 2;
    })
    .await;
    let cases: [(Faults, &str); 5] = [
        (image_fault(ImageFault::NotFound), "HTTP 404"),
        (
            image_fault(ImageFault::Html),
            "not a PNG or JPEG image (content-type text/html",
        ),
        (image_fault(ImageFault::Huge), "too large"),
        (
            image_fault(ImageFault::RedirectToMetadata),
            "redirect refused",
        ),
        (
            Faults {
                image_delay_ms: 3_000,
                ..Faults::default()
            },
            "gave up after 2 attempts",
        ),
    ];
    for (faults, reason) in cases {
        app.sim.set_faults(faults.clone());
        let id = succeeded_task(&app).await;
        let t = archived(&app, &id).await;
        assert_eq!(t["status"], "succeeded", "{t}");
        for img in t["images"].as_array().unwrap() {
            let a = &img["archive"];
            assert_eq!(a["state"], "failed", "{faults:?}: {img}");
            let error = a["error"].as_str().unwrap_or_default();
            assert!(error.contains(reason), "{faults:?}: {error}");
            assert!(img["archived_url"].is_null());
        }
        let r = get_image(&app, &id, 0).await;
        problem(r, 404).await;
    }
    // A temporary failure is retried and then succeeds.
    app.sim.set_faults(image_fault(ImageFault::Unavailable));
    let id = succeeded_task(&app).await;
    // Every image has a failed fetch on record before the fault is lifted.
    wait_until(WITHIN, || async {
        let t = app.task(&id).await;
        t["images"].as_array().is_some_and(|images| {
            images
                .iter()
                .all(|img| img["archive"]["attempts"].as_i64().unwrap_or(0) >= 1)
        })
    })
    .await;
    app.sim.set_faults(Faults::default());
    let t = archived(&app, &id).await;
    for img in t["images"].as_array().unwrap() {
        assert_eq!(img["archive"]["state"], "stored", "{img}");
        assert!(img["archive"]["attempts"].as_i64().unwrap() >= 2, "{img}");
    }
}

fn image_fault(f: ImageFault) -> Faults {
    Faults {
        image_fault: Some(f),
        ..Faults::default()
    }
}

/// Only the configured sources: http refused unless allowed, hosts outside the list refused.
async fn sources_outside_the_policy_are_refused(b: Backend) {
    let (app, _dir) = archiving_app(b, |s| s.archive.allow_http = false).await;
    let id = succeeded_task(&app).await;
    let t = archived(&app, &id).await;
    let error = t["images"][0]["archive"]["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(error.contains("scheme `http` is not fetched"), "{error}");

    let (app, _dir) = archiving_app(b, |s| {
        s.archive.allowed_hosts = vec!["cdn.klingai.example".into()];
    })
    .await;
    let id = succeeded_task(&app).await;
    let t = archived(&app, &id).await;
    let error = t["images"][1]["archive"]["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(error.contains("not in archive.allowed_hosts"), "{error}");
    assert_eq!(app.sim.stats().image_requests, 0, "nothing was fetched");
}

/// The service dies while it fetches: after the restart the claim's lease lapses, the image is
/// fetched again and ends stored once, in one object.
async fn killed_mid_archive_the_image_ends_stored_once(b: Backend) {
    let (mut app, dir) = archiving_app(b, |s| {
        s.archive.timeout = Duration::from_secs(1);
    })
    .await;
    app.sim.set_faults(Faults {
        image_delay_ms: 700,
        ..Faults::default()
    });
    let id = succeeded_task(&app).await;
    // Both fetches are under way (each waits 700 ms upstream).
    wait_until(WITHIN, || async { app.sim.stats().image_requests >= 2 }).await;
    app.crash_and_restart().await;
    app.sim.set_faults(Faults::default());
    let t = archived(&app, &id).await;
    for img in t["images"].as_array().unwrap() {
        assert_eq!(img["archive"]["state"], "stored", "{img}");
        assert_eq!(
            img["archive"]["attempts"], 2,
            "fetched again after the crash: {img}"
        );
    }
    let root = dir.path().join("archive");
    let files: Vec<PathBuf> = files_under(&root);
    assert_eq!(files.len(), 2, "one object per image: {files:?}");
    assert!(app.sim.stats().image_requests >= 4);
}

/// Tasks that succeeded while archiving was off: `archive backfill` archives them; a second run
/// finds nothing left; the service then serves them.
async fn backfill_archives_earlier_successes_and_resumes(b: Backend) {
    let (mut app, dir) = archiving_app(b, |s| s.archive.enabled = false).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(succeeded_task(&app).await);
    }
    let t = app.task(&ids[0]).await;
    assert!(t["images"][0]["archive"].is_null(), "not archived: {t}");
    app.stop().await;

    let path = dir.path().join("archive").display().to_string();
    let backfill = |db: &TestDb| {
        let out = crate::common::process::command(&["archive", "backfill", "--batch", "2"])
            .env("KLING_RELAY_DATABASE__URL", &db.url)
            .env("KLING_RELAY_ARCHIVE__PATH", &path)
            .env("KLING_RELAY_ARCHIVE__ALLOW_HTTP", "true")
            // The simulator's images are on this host: listed, or refused.
            .env("KLING_RELAY_ARCHIVE__ALLOWED_HOSTS", "[\"127.0.0.1\"]")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let first = backfill(&app.db);
    assert!(
        first.contains("3 tasks queued; images stored 6, failed 0, pending 0"),
        "{first}"
    );
    let second = backfill(&app.db);
    assert!(second.contains("0 tasks queued"), "{second}");

    app.settings.archive.enabled = true;
    app.restart().await;
    for id in &ids {
        let t = app.task(id).await;
        for img in t["images"].as_array().unwrap() {
            assert_eq!(img["archive"]["state"], "stored", "{img}");
        }
        let r = get_image(&app, id, 1).await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(files_under(&dir.path().join("archive")).len(), 6);
}

/// Images older than `archive.retention` are deleted by the sweep, which records it.
async fn the_retention_sweep_deletes_old_images_and_records_it(b: Backend) {
    let (app, dir) = archiving_app(b, |s| {
        s.archive.retention = Some(Duration::from_secs(2));
    })
    .await;
    let id = succeeded_task(&app).await;
    let t = archived(&app, &id).await;
    assert_eq!(t["images"][0]["archive"]["state"], "stored");
    assert_eq!(files_under(&dir.path().join("archive")).len(), 2);
    let mut swept = Value::Null;
    for _ in 0..100 {
        swept = app.task(&id).await;
        if swept["images"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["archive"]["state"] == "deleted")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for img in swept["images"].as_array().unwrap() {
        assert_eq!(img["archive"]["state"], "deleted", "{img}");
        assert!(img["archive"]["deleted_at"].is_string(), "{img}");
        assert!(img["archived_url"].is_null());
        assert!(img["url"].is_string(), "the upstream URL stays");
    }
    assert_eq!(swept["status"], "succeeded");
    assert!(files_under(&dir.path().join("archive")).is_empty());
    let r = get_image(&app, &id, 0).await;
    assert_eq!(r.status(), 404);
}

/// The image route is as private as the rest of /v1/.
async fn the_image_route_keeps_clients_apart(b: Backend) {
    let (app, _dir) = archiving_app(b, |_| {}).await;
    let id = succeeded_task(&app).await;
    archived(&app, &id).await;
    let url = |path: &str| format!("{}{path}", app.base);
    let ok = app
        .http
        .get(url(&format!("/v1/tasks/{id}/images/0")))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);

    let other = create_client(&app.db, "someone-else").await;
    let other = client_with_key(&other.api_key);
    let cases: [(&reqwest::Client, String, u16); 6] = [
        (&other, format!("/v1/tasks/{id}/images/0"), 404),
        (&app.anonymous, format!("/v1/tasks/{id}/images/0"), 401),
        (&app.http, format!("/v1/tasks/{id}/images/x"), 400),
        (&app.http, format!("/v1/tasks/{id}/images/-1"), 400),
        (&app.http, format!("/v1/tasks/{id}/images/9"), 404),
        (
            &app.http,
            "/v1/tasks/0190f6a2-0000-7000-8000-000000000000/images/0".to_owned(),
            404,
        ),
    ];
    for (client, path, status) in cases {
        let r = client.get(url(&path)).send().await.unwrap();
        assert_eq!(r.status(), status, "{path}");
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{path}"
        );
    }
    // Someone else's task does not even show its archive records.
    let r = other
        .get(url(&format!("/v1/tasks/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

on_both_backends!(
    images_are_archived_in_a_local_folder,
    images_are_archived_in_memory,
    bad_sources_fail_the_image_never_the_task,
    sources_outside_the_policy_are_refused,
    killed_mid_archive_the_image_ends_stored_once,
    backfill_archives_earlier_successes_and_resumes,
    the_retention_sweep_deletes_old_images_and_records_it,
    the_image_route_keeps_clients_apart,
);

#[test]
fn backfill_needs_archiving_on() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/db.sqlite", dir.path().display());
    let out = crate::common::process::command(&["archive", "backfill"])
        .env("KLING_RELAY_DATABASE__URL", &url)
        .env("KLING_RELAY_ARCHIVE__ENABLED", "false")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("archive.enabled is false"));
}
