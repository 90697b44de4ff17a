//! The command-line client: `kling-relay submit` and `kling-relay tasks ...`, talking to a
//! running service over its REST API. Exit codes: 0 success, 1 the task failed, 2 usage or
//! connection error.

use base64::Engine;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const EXIT_OK: u8 = 0;
pub const EXIT_TASK_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;

/// Where the service is and who is asking.
#[derive(Debug, Clone, clap::Args)]
pub struct Connection {
    /// Service base URL.
    #[arg(long, env = "KLING_RELAY_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Client API key.
    #[arg(long, env = "KLING_RELAY_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub conn: Connection,
    /// A subject image: a local file (sent as Base64) or an http(s) URL. 2 to 4 of them.
    #[arg(long = "subject", required = true)]
    pub subjects: Vec<String>,
    #[arg(long)]
    pub scene: Option<String>,
    #[arg(long)]
    pub style: Option<String>,
    #[arg(long)]
    pub prompt: Option<String>,
    #[arg(long)]
    pub n: Option<u8>,
    #[arg(long)]
    pub aspect_ratio: Option<String>,
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub notify_url: Option<String>,
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Order among your own waiting tasks: high, normal (default) or low.
    #[arg(long, value_parser = ["high", "normal", "low"])]
    pub priority: Option<String>,
    /// Wait for the final status, showing it live.
    #[arg(long)]
    pub wait: bool,
    /// Download the result images into this folder (implies --wait).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the task as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum TasksCommand {
    /// Your tasks, newest first.
    List {
        #[command(flatten)]
        conn: Connection,
        /// Only these statuses (repeat or comma-separate).
        #[arg(long)]
        status: Vec<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// One task.
    Show {
        #[command(flatten)]
        conn: Connection,
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// A task's timeline.
    Events {
        #[command(flatten)]
        conn: Connection,
        id: String,
        #[arg(long)]
        json: bool,
    },
}

/// A failure the user can act on; always exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(conn: &Connection) -> Result<Api, UsageError> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(key) = &conn.api_key {
            let value =
                reqwest::header::HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
                    UsageError("the API key has characters a header cannot carry".into())
                })?;
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| UsageError(format!("HTTP client: {e}")))?;
        Ok(Api {
            http,
            base: conn.url.trim_end_matches('/').to_owned(),
        })
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value, UsageError> {
        let resp = req
            .send()
            .await
            .map_err(|e| UsageError(format!("cannot reach {}: {}", self.base, describe(&e))))?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(body);
        }
        // problem+json: say what the service said, field by field.
        let mut msg = format!(
            "{} {}",
            status.as_u16(),
            body["detail"].as_str().unwrap_or("request refused")
        );
        if let Some(errors) = body["errors"].as_array() {
            for e in errors {
                msg.push_str(&format!(
                    "\n  {}: {}",
                    e["field"].as_str().unwrap_or(""),
                    e["message"].as_str().unwrap_or("")
                ));
            }
        }
        Err(UsageError(msg))
    }

    async fn get(&self, path: &str) -> Result<Value, UsageError> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }
}

fn describe(e: &reqwest::Error) -> &'static str {
    if e.is_connect() {
        "connection refused or unreachable"
    } else if e.is_timeout() {
        "timed out"
    } else {
        "request failed"
    }
}

/// A local file becomes raw Base64; an http(s) URL stays as it is.
fn image_arg(arg: &str) -> Result<String, UsageError> {
    if arg.starts_with("http://") || arg.starts_with("https://") {
        return Ok(arg.to_owned());
    }
    let bytes = std::fs::read(arg).map_err(|e| UsageError(format!("cannot read {arg}: {e}")))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn status_is_failure(status: &str) -> bool {
    matches!(status, "failed" | "timed_out" | "canceled")
}

fn is_final(status: &str) -> bool {
    status == "succeeded" || status_is_failure(status)
}

pub async fn submit(a: SubmitArgs) -> Result<u8, UsageError> {
    let api = Api::new(&a.conn)?;
    let mut body = json!({
        "subject_image_list": a
            .subjects
            .iter()
            .map(|s| image_arg(s).map(|img| json!({ "subject_image": img })))
            .collect::<Result<Vec<_>, _>>()?,
    });
    let optional = [
        (
            "scene_image",
            a.scene.as_deref().map(image_arg).transpose()?,
        ),
        (
            "style_image",
            a.style.as_deref().map(image_arg).transpose()?,
        ),
        ("prompt", a.prompt.clone()),
        ("aspect_ratio", a.aspect_ratio.clone()),
        ("model_name", a.model.clone()),
        ("notify_url", a.notify_url.clone()),
        ("priority", a.priority.clone()),
    ];
    for (k, v) in optional {
        if let Some(v) = v {
            body[k] = json!(v);
        }
    }
    if let Some(n) = a.n {
        body["n"] = json!(n);
    }
    let mut req = api.http.post(format!("{}/v1/tasks", api.base)).json(&body);
    if let Some(k) = &a.idempotency_key {
        req = req.header("idempotency-key", k);
    }
    let mut task = api.send(req).await?;
    if a.wait || a.out.is_some() {
        task = wait_final(&api, task).await?;
    }
    if let Some(dir) = &a.out {
        download(&api, &task, dir).await?;
    }
    if a.json {
        println!("{task}");
    } else {
        print_task(&task);
    }
    let status = task["status"].as_str().unwrap_or("");
    Ok(if status_is_failure(status) {
        EXIT_TASK_FAILED
    } else {
        EXIT_OK
    })
}

/// Long-polls until the task is final, with a spinner showing the live status.
async fn wait_final(api: &Api, mut task: Value) -> Result<Value, UsageError> {
    let id = task["id"].as_str().unwrap_or_default().to_owned();
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.enable_steady_tick(Duration::from_millis(120));
    loop {
        let status = task["status"].as_str().unwrap_or("").to_owned();
        spinner.set_message(format!("task {id}: {status}"));
        if is_final(&status) {
            spinner.finish_and_clear();
            return Ok(task);
        }
        task = api
            .get(&format!("/v1/tasks/{id}?wait=30&status_not={status}"))
            .await?;
    }
}

async fn download(api: &Api, task: &Value, dir: &Path) -> Result<(), UsageError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| UsageError(format!("cannot create {}: {e}", dir.display())))?;
    let id = task["id"].as_str().unwrap_or("task");
    for img in task["images"].as_array().into_iter().flatten() {
        let (Some(url), Some(index)) = (img["url"].as_str(), img["index"].as_u64()) else {
            continue;
        };
        // Result images are on the provider's CDN, not behind our key.
        let bytes = reqwest::get(url)
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| UsageError(format!("cannot download {url}: {}", describe(&e))))?
            .bytes()
            .await
            .map_err(|e| UsageError(format!("cannot download {url}: {}", describe(&e))))?;
        let ext = if bytes.starts_with(&[0xFF, 0xD8]) {
            "jpg"
        } else {
            "png"
        };
        let path = dir.join(format!("{id}-{index}.{ext}"));
        std::fs::write(&path, &bytes)
            .map_err(|e| UsageError(format!("cannot write {}: {e}", path.display())))?;
        eprintln!("saved {}", path.display());
    }
    let _ = api;
    Ok(())
}

fn print_task(t: &Value) {
    let s = |k: &str| t[k].as_str().unwrap_or("-").to_owned();
    println!("id:        {}", s("id"));
    println!("status:    {}", s("status"));
    println!("created:   {}", s("created_at"));
    if let Some(p) = t["prompt"].as_str() {
        println!("prompt:    {p}");
    }
    if let Some(e) = t["error"].as_object() {
        println!(
            "error:     {} {}",
            e.get("code").and_then(Value::as_str).unwrap_or(""),
            e.get("message").and_then(Value::as_str).unwrap_or("")
        );
    }
    for img in t["images"].as_array().into_iter().flatten() {
        println!(
            "image {}:   {}",
            img["index"],
            img["url"].as_str().unwrap_or("")
        );
    }
}

pub async fn tasks(cmd: TasksCommand) -> Result<u8, UsageError> {
    match cmd {
        TasksCommand::List {
            conn,
            status,
            limit,
            json,
        } => {
            let api = Api::new(&conn)?;
            let mut path = format!("/v1/tasks?limit={limit}");
            for s in &status {
                path.push_str(&format!("&status={s}"));
            }
            let page = api.get(&path).await?;
            if json {
                println!("{page}");
                return Ok(EXIT_OK);
            }
            println!(
                "{:<38} {:<11} {:<26} {:>2}  prompt",
                "id", "status", "created", "n"
            );
            for t in page["tasks"].as_array().into_iter().flatten() {
                let prompt: String = t["prompt"]
                    .as_str()
                    .unwrap_or("")
                    .chars()
                    .take(40)
                    .collect();
                println!(
                    "{:<38} {:<11} {:<26} {:>2}  {}",
                    t["id"].as_str().unwrap_or(""),
                    t["status"].as_str().unwrap_or(""),
                    t["created_at"].as_str().unwrap_or(""),
                    t["n"],
                    prompt
                );
            }
            Ok(EXIT_OK)
        }
        TasksCommand::Show { conn, id, json } => {
            let t = Api::new(&conn)?.get(&format!("/v1/tasks/{id}")).await?;
            if json {
                println!("{t}");
            } else {
                print_task(&t);
            }
            Ok(EXIT_OK)
        }
        TasksCommand::Events { conn, id, json } => {
            let v = Api::new(&conn)?
                .get(&format!("/v1/tasks/{id}/events"))
                .await?;
            if json {
                println!("{v}");
                return Ok(EXIT_OK);
            }
            for e in v["events"].as_array().into_iter().flatten() {
                println!(
                    "{:<26} {:<9} {:<11} {}",
                    e["at"].as_str().unwrap_or(""),
                    e["source"].as_str().unwrap_or(""),
                    e["status"].as_str().unwrap_or(""),
                    e["detail"].as_str().unwrap_or("")
                );
            }
            Ok(EXIT_OK)
        }
    }
}
