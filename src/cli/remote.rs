//! The command-line client: `kling-relay submit` and `kling-relay tasks ...`, talking to a
//! running service over its REST API. Exit codes: 0 success, 1 the task failed (or `tasks wait`
//! ran out of time), 2 usage or connection error.
//!
//! Longer than 400 lines: one function per `submit` and `tasks` subcommand over a shared client,
//! output and exit-code helpers; each is short.

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
    /// The service's base URL.
    #[arg(
        long,
        env = "KLING_RELAY_URL",
        hide_env_values = true,
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
    /// Your client's API key (`klr_…`, from `kling-relay clients create`).
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
    /// A scene image (file or URL) the subjects are placed in.
    #[arg(long)]
    pub scene: Option<String>,
    /// A style image (file or URL) whose look the result takes.
    #[arg(long)]
    pub style: Option<String>,
    /// What to make, in words (at most 2,500 characters).
    #[arg(long)]
    pub prompt: Option<String>,
    /// How many images to make, 1 to 9 (default 1); a task holds n units upstream.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=9))]
    pub n: Option<u8>,
    /// Shape of the images (default 16:9).
    #[arg(long, value_parser = crate::domain::validation::ASPECT_RATIOS)]
    pub aspect_ratio: Option<String>,
    /// Upstream model (default: the service's `cometapi.model_name`, kling-v2-1).
    #[arg(long)]
    pub model: Option<String>,
    /// Where the service POSTs the task's status changes, signed (default: your client's URL).
    #[arg(long)]
    pub notify_url: Option<String>,
    /// Makes a retried submit safe: the same key answers with the same task, never a second.
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
    /// Your tasks, newest first, a page at a time (`--all` for every page).
    List {
        #[command(flatten)]
        conn: Connection,
        /// Only these statuses (repeat or comma-separate): pending, submitted, processing,
        /// succeeded, failed, timed_out, canceled.
        #[arg(long)]
        status: Vec<String>,
        /// Tasks per page (1 to 100).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=100))]
        limit: u32,
        /// Start after this page (the `next_cursor` a previous page printed).
        #[arg(long, conflicts_with = "all")]
        cursor: Option<String>,
        /// Follow `next_cursor` to the last page.
        #[arg(long)]
        all: bool,
        /// Print JSON: the page as the API answers it (with --all, one array of every task).
        #[arg(long)]
        json: bool,
    },
    /// One task.
    Show {
        #[command(flatten)]
        conn: Connection,
        /// The task's id.
        id: String,
        /// Print the task as JSON.
        #[arg(long)]
        json: bool,
    },
    /// A task's timeline.
    Events {
        #[command(flatten)]
        conn: Connection,
        /// The task's id.
        id: String,
        /// Print the timeline as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Wait until a task is final. Exits 0 when it succeeded, 1 when it failed, timed out or was
    /// canceled, or when --timeout passes first.
    Wait {
        #[command(flatten)]
        conn: Connection,
        /// The task's id.
        id: String,
        /// Give up after this long (e.g. 90s, 10m); default: wait as long as it takes.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// Print the final task as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a task that has not been sent upstream yet (one already sent cannot be recalled).
    Cancel {
        #[command(flatten)]
        conn: Connection,
        /// The task's id.
        id: String,
        /// Print the task as JSON.
        #[arg(long)]
        json: bool,
    },
    /// A task's notifications to your notify URL: each attempt, its answer, what comes next.
    Deliveries {
        #[command(flatten)]
        conn: Connection,
        /// The task's id.
        id: String,
        /// Send this notification again now (its id, `msg_…`, from the list).
        #[arg(long, value_name = "DELIVERY_ID")]
        retry: Option<String>,
        /// Print JSON as the API answers it.
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
        if status == reqwest::StatusCode::UNAUTHORIZED {
            msg.push_str(
                "\n  hint: set KLING_RELAY_API_KEY (or pass --api-key) to your client's key; \
                 `kling-relay clients create NAME` makes one",
            );
        }
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

    async fn post(&self, path: &str) -> Result<Value, UsageError> {
        self.send(self.http.post(format!("{}{path}", self.base)))
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
async fn wait_final(api: &Api, task: Value) -> Result<Value, UsageError> {
    wait_until_final(api, task, None).await
}

/// Like `wait_final`, giving up at `deadline` (the last task seen is returned, not final).
async fn wait_until_final(
    api: &Api,
    mut task: Value,
    deadline: Option<tokio::time::Instant>,
) -> Result<Value, UsageError> {
    let id = task["id"].as_str().unwrap_or_default().to_owned();
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.enable_steady_tick(Duration::from_millis(120));
    loop {
        let status = task["status"].as_str().unwrap_or("").to_owned();
        spinner.set_message(format!("task {id}: {status}"));
        let left = deadline.map(|d| d.saturating_duration_since(tokio::time::Instant::now()));
        if is_final(&status) || left.is_some_and(|l| l.is_zero()) {
            spinner.finish_and_clear();
            return Ok(task);
        }
        // The service holds a long-poll up to 30 s; never past our own deadline.
        let wait = left.map_or(30, |l| l.as_secs().clamp(1, 30));
        let path = format!(
            "/v1/tasks/{}?wait={wait}&status_not={}",
            segment(&id),
            segment(&status)
        );
        let next = api.get(&path);
        task = match deadline {
            Some(d) => match tokio::time::timeout_at(d, next).await {
                Ok(t) => t?,
                Err(_) => task,
            },
            None => next.await?,
        };
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

fn print_task_rows(tasks: &[Value]) {
    println!(
        "{:<38} {:<11} {:<26} {:>2}  prompt",
        "id", "status", "created", "n"
    );
    for t in tasks {
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
}

fn print_deliveries(v: &Value) {
    let list = v["deliveries"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no notifications for this task");
        return;
    }
    println!(
        "{:<36} {:<11} {:<10} {:>8} {:>6}  next attempt / last error",
        "id", "event", "state", "attempts", "status"
    );
    for d in &list {
        let tail = d["next_attempt_at"]
            .as_str()
            .or(d["last_error"].as_str())
            .unwrap_or("");
        println!(
            "{:<36} {:<11} {:<10} {:>8} {:>6}  {}",
            d["id"].as_str().unwrap_or(""),
            d["event"].as_str().unwrap_or(""),
            d["state"].as_str().unwrap_or(""),
            d["attempts"],
            d["last_status_code"]
                .as_i64()
                .map_or("-".to_string(), |c| c.to_string()),
            tail
        );
    }
}

/// A path segment from user input (a task or delivery id), so `/` or `?` cannot change the route.
fn segment(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

pub async fn tasks(cmd: TasksCommand) -> Result<u8, UsageError> {
    match cmd {
        TasksCommand::List {
            conn,
            status,
            limit,
            cursor,
            all,
            json,
        } => {
            let api = Api::new(&conn)?;
            let mut query = format!("/v1/tasks?limit={limit}");
            for s in &status {
                query.push_str(&format!("&status={}", segment(s)));
            }
            let mut cursor = cursor;
            let mut every = Vec::new();
            loop {
                let path = match &cursor {
                    Some(c) => format!("{query}&cursor={}", segment(c)),
                    None => query.clone(),
                };
                let page = api.get(&path).await?;
                let tasks = page["tasks"].as_array().cloned().unwrap_or_default();
                let next = page["next_cursor"].as_str().map(str::to_owned);
                if !all {
                    if json {
                        println!("{page}");
                    } else {
                        print_task_rows(&tasks);
                        if let Some(next) = &next {
                            println!("more: --cursor {next}");
                        }
                    }
                    return Ok(EXIT_OK);
                }
                every.extend(tasks);
                match next {
                    Some(n) => cursor = Some(n),
                    None => break,
                }
            }
            if json {
                println!("{}", Value::Array(every));
            } else {
                print_task_rows(&every);
            }
            Ok(EXIT_OK)
        }
        TasksCommand::Show { conn, id, json } => {
            let t = Api::new(&conn)?
                .get(&format!("/v1/tasks/{}", segment(&id)))
                .await?;
            if json {
                println!("{t}");
            } else {
                print_task(&t);
            }
            Ok(EXIT_OK)
        }
        TasksCommand::Events { conn, id, json } => {
            let v = Api::new(&conn)?
                .get(&format!("/v1/tasks/{}/events", segment(&id)))
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
        TasksCommand::Wait {
            conn,
            id,
            timeout,
            json,
        } => {
            let api = Api::new(&conn)?;
            let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
            let task = api.get(&format!("/v1/tasks/{}", segment(&id))).await?;
            let task = wait_until_final(&api, task, deadline).await?;
            let status = task["status"].as_str().unwrap_or("").to_owned();
            if json {
                println!("{task}");
            } else {
                print_task(&task);
            }
            if !is_final(&status) {
                eprintln!("gave up waiting: the task is still {status}");
                return Ok(EXIT_TASK_FAILED);
            }
            Ok(if status_is_failure(&status) {
                EXIT_TASK_FAILED
            } else {
                EXIT_OK
            })
        }
        TasksCommand::Cancel { conn, id, json } => {
            let t = Api::new(&conn)?
                .post(&format!("/v1/tasks/{}/cancel", segment(&id)))
                .await?;
            if json {
                println!("{t}");
            } else {
                print_task(&t);
            }
            Ok(EXIT_OK)
        }
        TasksCommand::Deliveries {
            conn,
            id,
            retry,
            json,
        } => {
            let api = Api::new(&conn)?;
            let base = format!("/v1/tasks/{}/deliveries", segment(&id));
            if let Some(delivery) = retry {
                let v = api
                    .post(&format!("{base}/{}/retry", segment(&delivery)))
                    .await?;
                if json {
                    println!("{v}");
                } else {
                    println!("notification {delivery} queued to be sent again");
                }
                return Ok(EXIT_OK);
            }
            let v = api.get(&base).await?;
            if json {
                println!("{v}");
            } else {
                print_deliveries(&v);
            }
            Ok(EXIT_OK)
        }
    }
}
