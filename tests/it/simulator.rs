//! The simulator follows the upstream reference page: envelopes, millisecond timestamps, key
//! check, validation, unique external ids, n-weighted concurrency (`1303`), `task_not_exist`,
//! callbacks and their fault switches.

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use kling_relay::simulator::{Failure, Faults, SimConfig, Simulator};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::sync::mpsc;

struct Rig {
    sim: Simulator,
    http: reqwest::Client,
    url: String,
    callbacks: mpsc::UnboundedReceiver<Value>,
    callback_url: String,
}

async fn rig(cfg: SimConfig) -> Rig {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = Simulator::start(cfg, l).await.unwrap();
    // A receiver that hands every callback to the test.
    let (tx, rx) = mpsc::unbounded_channel::<Value>();
    let app = Router::new()
        .route(
            "/cb",
            post(
                |State(tx): State<mpsc::UnboundedSender<Value>>, Json(v): Json<Value>| async move {
                    let _ = tx.send(v);
                    "ok"
                },
            ),
        )
        .with_state(tx);
    let cl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let callback_url = format!("http://{}/cb", cl.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(cl, app).await });
    Rig {
        url: format!("{}/kling/v1/images/multi-image2image", sim.base_url()),
        sim,
        http: reqwest::Client::new(),
        callbacks: rx,
        callback_url,
    }
}

fn fast() -> SimConfig {
    SimConfig {
        processing_after: Duration::from_millis(50),
        finish_after: Duration::from_millis(100),
        ..SimConfig::default()
    }
}

impl Rig {
    async fn create(&self, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(&self.url)
            .bearer_auth("sk-simulator")
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    async fn query(&self, task_id: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}/{task_id}", self.url))
            .bearer_auth("sk-simulator")
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    fn body(&self, n: u8, ext: &str) -> Value {
        json!({
            "subject_image_list": [{"subject_image": "https://e.x/a.png"}, {"subject_image": "https://e.x/b.png"}],
            "prompt": "cats", "n": n, "external_task_id": ext, "callback_url": self.callback_url,
        })
    }

    async fn next_callback(&mut self) -> Value {
        tokio::time::timeout(Duration::from_secs(5), self.callbacks.recv())
            .await
            .expect("a callback within 5s")
            .expect("channel open")
    }
}

#[tokio::test]
async fn create_query_and_callbacks_follow_the_reference() {
    let mut r = rig(fast()).await;
    let (status, v) = r.create(r.body(2, "ext-1")).await;
    assert_eq!(status, 200);
    assert_eq!(v["code"], 0);
    assert_eq!(v["message"], "SUCCEED");
    assert!(v["request_id"].is_string());
    let data = &v["data"];
    let task_id = data["task_id"].as_str().unwrap().to_owned();
    assert_eq!(task_id.len(), 18);
    assert_eq!(data["task_status"], "submitted");
    assert_eq!(data["task_info"]["external_task_id"], "ext-1");
    assert!(
        data["created_at"].as_i64().unwrap() > 1_600_000_000_000,
        "milliseconds"
    );

    let processing = r.next_callback().await;
    assert_eq!(processing["task_status"], "processing");
    assert_eq!(processing["task_id"], task_id.as_str());
    let done = r.next_callback().await;
    assert_eq!(done["task_status"], "succeed");
    assert_eq!(done["final_unit_deduction"], "2");
    assert!(done["updated_at"].as_i64() > processing["updated_at"].as_i64());
    let images = done["task_result"]["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    let png = reqwest::get(images[1]["url"].as_str().unwrap())
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"));

    let (status, q) = r.query(&task_id).await;
    assert_eq!((status, q["code"].as_i64()), (200, Some(0)));
    assert_eq!(q["data"]["task_status"], "succeed");
    // Lookup by external id, Kling's form.
    let by_ext: Value = r
        .http
        .get(format!("{}?external_task_id=ext-1", r.url))
        .bearer_auth("sk-simulator")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(by_ext["data"]["task_id"], task_id.as_str());

    let (status, q) = r.query("123").await;
    assert_eq!(status, 400);
    assert_eq!(q["code"], "task_not_exist");
}

#[tokio::test]
async fn refusals_key_validation_duplicates_and_concurrency() {
    let r = rig(SimConfig {
        concurrency_units: 4,
        processing_after: Duration::from_millis(50),
        finish_after: Duration::from_millis(300),
        ..SimConfig::default()
    })
    .await;
    let no_key = r
        .http
        .post(&r.url)
        .json(&r.body(1, "a"))
        .send()
        .await
        .unwrap();
    assert_eq!(no_key.status(), 401);

    let mut bad = r.body(10, "b");
    bad["aspect_ratio"] = json!("5:4");
    let (status, v) = r.create(bad).await;
    assert_eq!(status, 400);
    assert_eq!(v["code"], 1201);
    assert!(v["message"].as_str().unwrap().contains("aspect_ratio"));

    assert_eq!(r.create(r.body(3, "c")).await.1["code"], 0);
    let (_, dup) = r.create(r.body(1, "c")).await;
    assert!(dup["message"]
        .as_str()
        .unwrap()
        .contains("external_task_id"));
    // 3 of 4 units held: n = 2 does not fit, n = 1 does.
    assert_eq!(r.create(r.body(2, "d")).await.1["code"], 1303);
    assert_eq!(r.create(r.body(1, "e")).await.1["code"], 0);
    assert_eq!(r.sim.stats().units_in_use, 4);
    // Units come back when tasks end.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(r.sim.stats().units_in_use, 0);
    assert_eq!(r.create(r.body(2, "d")).await.1["code"], 0);
}

#[tokio::test]
async fn create_and_query_fault_switches() {
    let r = rig(fast()).await;
    for (failure, status) in [
        (Failure::Http500, 500),
        (Failure::Http503, 503),
        (Failure::Http429, 429),
        (Failure::Code1303, 429),
    ] {
        r.sim.set_faults(Faults {
            create_fail: Some(failure),
            query_fail: Some(failure),
            ..Faults::default()
        });
        assert_eq!(r.create(r.body(1, &format!("{failure:?}"))).await.0, status);
        assert_eq!(r.query("1").await.0, status);
    }
    r.sim.set_faults(Faults {
        create_fail: Some(Failure::Http500),
        create_fail_times: Some(1),
        ..Faults::default()
    });
    assert_eq!(r.create(r.body(1, "x1")).await.0, 500);
    assert_eq!(
        r.create(r.body(1, "x2")).await.0,
        200,
        "the switch clears itself"
    );

    r.sim.set_faults(Faults {
        create_lose_response: true,
        ..Faults::default()
    });
    let before = r.sim.stats().tasks_created;
    assert_eq!(r.create(r.body(1, "lost")).await.0, 500);
    assert_eq!(
        r.sim.stats().tasks_created,
        before + 1,
        "created, answer lost"
    );

    r.sim.set_faults(Faults {
        create_delay_ms: 300,
        ..Faults::default()
    });
    let start = std::time::Instant::now();
    assert_eq!(r.create(r.body(1, "slow")).await.0, 200);
    assert!(start.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn callback_fault_switches() {
    let mut r = rig(fast()).await;
    r.sim.set_faults(Faults {
        reorder_callbacks: true,
        duplicate_callbacks: true,
        callback_envelope: true,
        ..Faults::default()
    });
    r.create(r.body(1, "re")).await;
    let order: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            let cb = r.next_callback().await;
            assert_eq!(cb["code"], 0, "enveloped");
            v.push(cb["data"]["task_status"].as_str().unwrap().to_owned());
        }
        v
    };
    assert_eq!(order, ["succeed", "succeed", "processing", "processing"]);

    r.sim.set_faults(Faults {
        drop_callbacks: 1.0,
        ..Faults::default()
    });
    r.create(r.body(1, "drop")).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(r.callbacks.try_recv().is_err(), "every callback dropped");

    r.sim.set_faults(Faults {
        callback_delay_ms: 300,
        ..Faults::default()
    });
    r.create(r.body(1, "late")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(r.callbacks.try_recv().is_err(), "not yet");
    assert_eq!(r.next_callback().await["task_status"], "processing");
}

#[tokio::test]
async fn moderation_marker_fails_the_task() {
    let mut r = rig(fast()).await;
    let mut body = r.body(1, "mod");
    body["prompt"] = json!("something forbidden");
    r.create(body).await;
    r.next_callback().await;
    let done = r.next_callback().await;
    assert_eq!(done["task_status"], "failed");
    assert!(done["task_status_msg"]
        .as_str()
        .unwrap()
        .contains("moderation"));
    assert!(done.get("task_result").is_none());
}

async fn post_as(http: &reqwest::Client, url: &str, auth: &str, body: &Value) -> (u16, Value) {
    let r = http
        .post(url)
        .bearer_auth(auth)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn each_profile_serves_its_own_routes_and_refuses_what_the_real_one_refuses() {
    use kling_relay::config::UpstreamProfile;
    let http = reqwest::Client::new();
    let multi = json!({"subject_image_list": [{"subject_image": "https://e.x/a.png"}]});
    let mut with_prompt = multi.clone();
    with_prompt["prompt"] = json!("cats");

    // Today's CometAPI: multi-image2image takes one subject; /images/generations is
    // text-to-image: refused without a prompt, a paid text-to-image task with one.
    let r = rig(fast()).await;
    let base = r.sim.base_url();
    let (status, v) = post_as(
        &http,
        &format!("{base}/kling/v1/images/multi-image2image"),
        "sk-simulator",
        &multi,
    )
    .await;
    assert_eq!((status, v["code"].as_i64()), (200, Some(0)), "{v}");
    let t2i = format!("{base}/kling/v1/images/generations");
    let (status, v) = post_as(&http, &t2i, "sk-simulator", &multi).await;
    assert_eq!((status, v["code"].as_i64()), (400, Some(1201)));
    assert!(v["message"].as_str().unwrap().contains("prompt"));
    let (status, _) = post_as(&http, &t2i, "sk-simulator", &with_prompt).await;
    assert_eq!(status, 200);
    assert_eq!(
        r.sim.stats().text_to_image_tasks,
        1,
        "paid for the wrong thing"
    );
    let (status, v) = post_as(
        &http,
        &format!("{base}/kling/v1/images/nope"),
        "sk-simulator",
        &multi,
    )
    .await;
    assert_eq!(status, 404);
    assert!(
        v.get("code").is_none(),
        "a route error carries no service code: {v}"
    );
    // Unknown fields are ignored, as upstream ignores them.
    let mut extra = multi.clone();
    extra["resolution"] = json!("2k");
    assert_eq!(
        post_as(
            &http,
            &format!("{base}/kling/v1/images/multi-image2image"),
            "sk-simulator",
            &extra
        )
        .await
        .0,
        200
    );

    // The older page: /images/generations is the multi-image route, 2 to 4 subjects, and
    // multi-image2image does not exist.
    let r = rig(SimConfig {
        profile: UpstreamProfile::CometapiGenerations,
        ..fast()
    })
    .await;
    let base = r.sim.base_url();
    let (status, v) = post_as(
        &http,
        &format!("{base}/kling/v1/images/generations"),
        "sk-simulator",
        &multi,
    )
    .await;
    assert_eq!((status, v["code"].as_i64()), (400, Some(1201)));
    let two = json!({"subject_image_list": [{"subject_image": "https://e.x/a.png"}, {"subject_image": "https://e.x/b.png"}]});
    assert_eq!(
        post_as(
            &http,
            &format!("{base}/kling/v1/images/generations"),
            "sk-simulator",
            &two
        )
        .await
        .0,
        200
    );
    assert_eq!(
        post_as(
            &http,
            &format!("{base}/kling/v1/images/multi-image2image"),
            "sk-simulator",
            &two
        )
        .await
        .0,
        404
    );
}

#[tokio::test]
async fn the_kling_profile_checks_its_jwt() {
    use kling_relay::config::UpstreamProfile;
    use kling_relay::upstream::jwt::sign_hs256;
    let r = rig(SimConfig {
        profile: UpstreamProfile::Kling,
        ..fast()
    })
    .await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/images/multi-image2image", r.sim.base_url());
    let body = json!({"subject_image_list": [{"subject_image": "https://e.x/a.png"}], "external_task_id": "k-1"});
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let token = |iss: &str, exp: i64, nbf: i64, key: &str| {
        sign_hs256(&json!({"iss": iss, "exp": exp, "nbf": nbf}), key.as_bytes())
    };
    for (auth, code) in [
        ("sk-simulator".to_owned(), 1002),
        (token("ak-simulator", now + 60, now - 5, "wrong"), 1002),
        (
            token("someone", now + 60, now - 5, "sk-simulator-secret"),
            1002,
        ),
        (
            token("ak-simulator", now - 1, now - 60, "sk-simulator-secret"),
            1004,
        ),
        (
            token("ak-simulator", now + 600, now + 300, "sk-simulator-secret"),
            1003,
        ),
    ] {
        let (status, v) = post_as(&http, &url, &auth, &body).await;
        assert_eq!((status, v["code"].as_i64()), (401, Some(code)), "{v}");
    }
    let good = token("ak-simulator", now + 1800, now - 5, "sk-simulator-secret");
    let (status, v) = post_as(&http, &url, &good, &body).await;
    assert_eq!(status, 200, "{v}");
    // Kling takes the external_task_id in the query path's id slot.
    let found: Value = http
        .get(format!("{url}/k-1"))
        .bearer_auth(&good)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(found["data"]["task_id"], v["data"]["task_id"]);
}

#[tokio::test]
async fn switches_for_what_todays_upstream_and_gateways_do() {
    use kling_relay::simulator::AnswerStyle;
    let mut r = rig(SimConfig {
        concurrency_units: 1,
        ..fast()
    })
    .await;
    // A gateway's shape: 1303 as HTTP 400 {"code": "task_failed"}.
    r.sim.set_faults(Faults {
        answer_style: AnswerStyle::Relay,
        ..Faults::default()
    });
    r.create(r.body(1, "hold")).await;
    let (status, v) = r.create(r.body(1, "full")).await;
    assert_eq!((status, v["code"].as_str()), (400, Some("task_failed")));
    assert_eq!(v["message"], "parallel task over resource pack limit");
    r.next_callback().await;
    r.next_callback().await;

    r.sim.set_faults(Faults {
        out_of_credit: true,
        ..Faults::default()
    });
    let (status, v) = r.create(r.body(1, "broke")).await;
    assert_eq!((status, v["code"].as_i64()), (429, Some(1102)));

    r.sim.set_faults(Faults {
        key_revoked: true,
        ..Faults::default()
    });
    assert_eq!(r.create(r.body(1, "revoked")).await.1["code"], 1002);
    assert_eq!(r.query("1").await.0, 401, "queries too");

    // The id alone, no status; callbacks renamed and sent without the query string.
    r.callback_url.push_str("?token=t");
    r.sim.set_faults(Faults {
        create_without_status: true,
        callback_task_id_renamed: true,
        strip_callback_query: true,
        ..Faults::default()
    });
    let (status, v) = r.create(r.body(1, "bare")).await;
    assert_eq!(status, 200);
    assert!(v["data"].get("task_status").is_none(), "{v}");
    let id = v["data"]["task_id"].as_str().unwrap().to_owned();
    let cb = r.next_callback().await;
    assert_eq!(
        cb["task_id"],
        format!("renamed-{id}"),
        "arrived without ?token= at /cb"
    );
}
