//! Issue 13: `kling-relay doctor` against the simulator, in each profile and fault: the verdict
//! and advice for each, and its exit code. The service runs in process on the test's database,
//! so the public-URL check can reach it.

use crate::common::process::command;
use crate::common::*;
use kling_relay::config::UpstreamProfile;
use kling_relay::simulator::{AnswerStyle, Faults, SimConfig};
use serde_json::Value;

/// Runs `doctor --json` against the app's simulator and database; (exit code, report).
fn doctor(app: &TestApp, env: &[(&str, &str)]) -> (i32, Value) {
    let mut c = command(&["doctor", "--json"]);
    let dir = tempfile::tempdir().unwrap();
    c.current_dir(dir.path())
        .env("KLING_RELAY_DATABASE__URL", &app.db.url)
        .env("KLING_RELAY_COMETAPI__BASE_URL", app.sim.base_url())
        .env(
            "KLING_RELAY_COMETAPI__PROFILE",
            app.settings.cometapi.profile.as_str(),
        )
        .env("KLING_RELAY_SERVER__PUBLIC_URL", &app.base)
        .env("COMETAPI_KEY", app.sim.api_key())
        .env("KLING_ACCESS_KEY", "ak-simulator")
        .env("KLING_SECRET_KEY", "sk-simulator-secret");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = tokio::task::block_in_place(|| c.output().unwrap());
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json printed no JSON ({e}): {} / {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

fn result<'a>(report: &'a Value, check: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == check)
        .unwrap_or_else(|| panic!("no {check} check in {report}"))
}

/// Every profile against the upstream it describes: every check passes, exit 0, and nothing
/// was created upstream (doctor pays for nothing).
async fn every_profile_passes_against_its_own_upstream(b: Backend) {
    for profile in [
        UpstreamProfile::Cometapi,
        UpstreamProfile::CometapiGenerations,
        UpstreamProfile::Kling,
    ] {
        let app = TestApp::playing(b, profile).await;
        let (code, report) = doctor(&app, &[]);
        assert_eq!(code, 0, "{profile:?}: {report:#}");
        assert_eq!(report["ok"], true);
        for check in [
            "credentials",
            "key",
            "query_path",
            "create_path",
            "external_lookup",
            "public_url",
            "clock",
        ] {
            assert_eq!(
                result(&report, check)["result"],
                "pass",
                "{profile:?} {check}: {report:#}"
            );
        }
        assert!(result(&report, "public_url")["detail"]
            .as_str()
            .unwrap()
            .contains("query string survives"));
        let stats = app.sim.stats();
        assert_eq!(
            (stats.tasks_created, stats.text_to_image_tasks),
            (0, 0),
            "{profile:?}"
        );
    }
}

/// The create path set to today's text-to-image route: a failure whose advice names
/// multi-image2image, exit non-zero, and still nothing created.
async fn the_text_to_image_route_is_caught_and_multi_image2image_advised(b: Backend) {
    let app = TestApp::playing(b, UpstreamProfile::Cometapi).await;
    for env in [
        vec![(
            "KLING_RELAY_COMETAPI__CREATE_PATH",
            "/kling/v1/images/generations",
        )],
        // The older page's profile against today's API.
        vec![("KLING_RELAY_COMETAPI__PROFILE", "cometapi-generations")],
    ] {
        let (code, report) = doctor(&app, &env);
        assert_ne!(code, 0, "{report:#}");
        let c = result(&report, "create_path");
        assert_eq!(c["result"], "fail", "{report:#}");
        assert!(
            c["detail"].as_str().unwrap().contains("text-to-image"),
            "{c}"
        );
        assert!(
            c["advice"].as_str().unwrap().contains("multi-image2image"),
            "{c}"
        );
        assert!(report["settings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s.as_str().unwrap().contains("multi-image2image")));
    }
    assert_eq!(app.sim.stats().tasks_created, 0);
}

/// A refused key, in Kling's shape and in a gateway's, fails the key check; so do an account
/// out of credit, missing credentials, and a wrong JWT secret under the kling profile.
async fn a_refused_key_fails_the_key_check(b: Backend) {
    let app = TestApp::playing(b, UpstreamProfile::Cometapi).await;
    for style in [AnswerStyle::Kling, AnswerStyle::Relay] {
        app.sim.set_faults(Faults {
            key_revoked: true,
            answer_style: style,
            ..Faults::default()
        });
        let (code, report) = doctor(&app, &[]);
        assert_ne!(code, 0);
        assert_eq!(
            result(&report, "key")["result"],
            "fail",
            "{style:?}: {report:#}"
        );
    }
    app.sim.set_faults(Faults {
        out_of_credit: true,
        ..Faults::default()
    });
    let (code, report) = doctor(&app, &[]);
    assert_ne!(code, 0);
    let c = result(&report, "account");
    assert_eq!(c["result"], "fail", "{report:#}");
    assert!(c["advice"].as_str().unwrap().contains("top it up"));
    app.sim.set_faults(Faults::default());
    let (code, report) = doctor(&app, &[("COMETAPI_KEY", "")]);
    assert_ne!(code, 0);
    assert_eq!(result(&report, "credentials")["result"], "fail");

    let kling = TestApp::playing(b, UpstreamProfile::Kling).await;
    let (code, report) = doctor(&kling, &[("KLING_SECRET_KEY", "not-the-secret")]);
    assert_ne!(code, 0);
    assert_eq!(result(&report, "key")["result"], "fail", "{report:#}");
}

/// A public URL that reaches nothing (or not this instance) fails; one without a query string
/// survivor is only a warning.
async fn a_public_url_that_does_not_reach_this_instance_fails(b: Backend) {
    let app = TestApp::playing(b, UpstreamProfile::Cometapi).await;
    let nowhere = format!("http://127.0.0.1:{}", crate::common::process::free_port());
    let (code, report) = doctor(&app, &[("KLING_RELAY_SERVER__PUBLIC_URL", &nowhere)]);
    assert_ne!(code, 0);
    assert_eq!(
        result(&report, "public_url")["result"],
        "fail",
        "{report:#}"
    );
    // The simulator answers, but it is not this instance.
    let other = app.sim.base_url();
    let (code, report) = doctor(&app, &[("KLING_RELAY_SERVER__PUBLIC_URL", &other)]);
    assert_ne!(code, 0);
    assert_eq!(
        result(&report, "public_url")["result"],
        "fail",
        "{report:#}"
    );
    // No public URL: a warning, not a failure.
    let (code, report) = doctor(&app, &[("KLING_RELAY_SERVER__PUBLIC_URL", "")]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(result(&report, "public_url")["result"], "warn");
}

/// No lookup by external_task_id upstream: a warning with advice, not a failure.
async fn a_missing_external_lookup_is_a_warning(b: Backend) {
    let app = TestApp::spawn_with(
        b,
        Options {
            sim: SimConfig {
                lookup_by_external_id: false,
                ..fast_sim()
            },
            ..Options::default()
        },
    )
    .await;
    let (code, report) = doctor(&app, &[]);
    assert_eq!(code, 0, "{report:#}");
    let c = result(&report, "external_lookup");
    assert_eq!(c["result"], "warn", "{report:#}");
    assert!(c["advice"].as_str().unwrap().contains("external_lookup"));
}

on_both_backends!(every_profile_passes_against_its_own_upstream);
mod sqlite_only {
    use super::*;
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn text_to_image_route() {
        the_text_to_image_route_is_caught_and_multi_image2image_advised(Backend::Sqlite).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refused_key() {
        a_refused_key_fails_the_key_check(Backend::Sqlite).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn public_url() {
        a_public_url_that_does_not_reach_this_instance_fails(Backend::Sqlite).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn external_lookup() {
        a_missing_external_lookup_is_a_warning(Backend::Sqlite).await
    }
}
