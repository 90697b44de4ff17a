//! The `kling-relay` command: `serve`, `migrate` and `simulator`.

use anyhow::Context;
use clap::{Parser, Subcommand};
use kling_relay::config::{LogFormat, Settings, UpstreamProfile};
use kling_relay::simulator::{AnswerStyle, Failure, Faults, SimConfig, Simulator};
use kling_relay::{app, telemetry};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "kling-relay",
    version,
    about = "A durable relay in front of CometAPI's Kling image generation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Serve {
        /// Settings file layered over config/default.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Run against a built-in CometAPI simulator (offline; results are simulated).
        #[arg(long)]
        simulate: bool,
        /// Log format: text or json (overrides log.format).
        #[arg(long, value_parser = parse_log_format)]
        log_format: Option<LogFormat>,
    },
    /// Check, with calls that cost nothing, that this configuration works against the real
    /// upstream: key, create and query paths, lookup by external_task_id, public URL, clock.
    /// Exits 0 when every check passes, 1 when one fails.
    Doctor {
        /// Settings file layered over config/default.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the report as JSON (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Apply database migrations and exit.
    Migrate {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run the CometAPI simulator on its own.
    Simulator(SimulatorArgs),
    /// Submit a task to a running service (local images are sent as Base64).
    Submit(kling_relay::cli_client::SubmitArgs),
    /// Read your tasks from a running service.
    Tasks {
        #[command(subcommand)]
        command: kling_relay::cli_client::TasksCommand,
    },
    /// Exit 0 if the service answers /healthz (for container health checks).
    Healthcheck {
        #[arg(long, default_value = "http://127.0.0.1:8080/healthz")]
        url: String,
    },
    /// The image archive.
    Archive {
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: ArchiveCommand,
    },
    /// What every client spent: tasks by final status and units deducted, from the database.
    Usage {
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        args: kling_relay::cli_usage::UsageArgs,
    },
    /// Manage the internal clients that call the API.
    Clients {
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: ClientsCommand,
    },
}

#[derive(Subcommand)]
enum ArchiveCommand {
    /// Archive the images of tasks that succeeded before archiving was on. Resumable: tasks
    /// already queued are skipped, so run it again after an interruption.
    Backfill {
        /// Tasks queued (and archived) per round.
        #[arg(long, default_value_t = 200)]
        batch: i64,
    },
}

#[derive(Subcommand)]
enum ClientsCommand {
    /// Create a client; prints its API key (shown only now) and notification signing secret.
    Create {
        name: String,
        /// Default notify URL for the client's tasks.
        #[arg(long)]
        notify_url: Option<String>,
        /// Print {"name", "api_key", "signing_secret"} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List clients.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a client's API key for good.
    Revoke { name: String },
    /// Make a new signing secret; the old one keeps signing beside it for the grace period.
    RotateSecret {
        name: String,
        /// How long the old secret stays valid (default: notifications.secret_rotation_grace).
        #[arg(long, value_parser = humantime::parse_duration)]
        grace: Option<Duration>,
        #[arg(long)]
        json: bool,
    },
    /// Set the client's share of the upstream units: its weight when clients compete, and a cap.
    Set {
        name: String,
        /// Relative share when several clients have work waiting (1 to 1000; default 1).
        #[arg(long)]
        weight: Option<i64>,
        /// Most units the client's tasks may hold upstream at once.
        #[arg(long, conflicts_with = "no_max_units")]
        max_units: Option<i64>,
        /// Remove the cap.
        #[arg(long)]
        no_max_units: bool,
        /// Budget: units the client's tasks may spend per UTC day (spent + reserved); a submit
        /// over it is refused with 429.
        #[arg(long, conflicts_with = "no_units_per_day")]
        units_per_day: Option<i64>,
        /// Remove the daily budget.
        #[arg(long)]
        no_units_per_day: bool,
        /// Budget: units per UTC month.
        #[arg(long, conflicts_with = "no_units_per_month")]
        units_per_month: Option<i64>,
        /// Remove the monthly budget.
        #[arg(long)]
        no_units_per_month: bool,
    },
    /// Set (or with --clear, remove) the client's default notify URL.
    SetNotifyUrl {
        name: String,
        url: Option<String>,
        #[arg(long, conflicts_with = "url")]
        clear: bool,
    },
}

#[derive(clap::Args)]
struct SimulatorArgs {
    #[arg(long, default_value = "127.0.0.1:9090")]
    listen: SocketAddr,
    /// Which upstream to behave as: cometapi, cometapi-generations or kling (routes, field
    /// names, subject bounds, authentication).
    #[arg(long, default_value = "cometapi", value_parser = parse_profile)]
    profile: UpstreamProfile,
    /// Bearer key the simulator expects (cometapi profiles).
    #[arg(long, default_value = "sk-simulator")]
    api_key: String,
    /// Access key and secret key of the kling profile (its JWT is checked against them).
    #[arg(long, default_value = "ak-simulator")]
    access_key: String,
    #[arg(long, default_value = "sk-simulator-secret")]
    secret_key: String,
    /// Error answers as Kling's table has them (kling) or reshaped by a gateway into HTTP 400
    /// {"code":"task_failed"} (relay).
    #[arg(long, default_value = "kling", value_parser = parse_answer_style)]
    answer_style: AnswerStyle,
    /// Send callbacks without the callback URL's query string (as some proxies do).
    #[arg(long)]
    strip_callback_query: bool,
    /// Callbacks carry a task_id other than the create answer's.
    #[arg(long)]
    callback_task_id_renamed: bool,
    /// Create answers carry data.task_id but no task_status.
    #[arg(long)]
    create_without_status: bool,
    /// The account is out of credit: creates answer 1102.
    #[arg(long)]
    out_of_credit: bool,
    /// The key is revoked: every call answers 1002 (HTTP 401).
    #[arg(long)]
    key_revoked: bool,
    /// Time from submitted to processing.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    processing_after: Duration,
    /// Time from processing to the final status.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    finish_after: Duration,
    /// Account concurrency in units (a task holds n).
    #[arg(long, default_value_t = 20)]
    concurrency_units: i64,
    /// Do not answer queries by external_task_id.
    #[arg(long)]
    no_external_lookup: bool,
    /// Probability (0 to 1) of dropping each callback.
    #[arg(long, default_value_t = 0.0)]
    drop_callbacks: f64,
    #[arg(long)]
    duplicate_callbacks: bool,
    #[arg(long)]
    reorder_callbacks: bool,
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    callback_delay: Duration,
    /// Make every create call fail: http500, http503, http429 or code1303.
    #[arg(long, value_parser = parse_failure)]
    create_fail: Option<Failure>,
    /// Make every query fail: http500, http503, http429 or code1303.
    #[arg(long, value_parser = parse_failure)]
    query_fail: Option<Failure>,
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    create_delay: Duration,
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    query_delay: Duration,
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("`{s}`: expected text or json")),
    }
}

fn parse_profile(s: &str) -> Result<UpstreamProfile, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("`{s}`: expected cometapi, cometapi-generations or kling"))
}

fn parse_answer_style(s: &str) -> Result<AnswerStyle, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("`{s}`: expected kling or relay"))
}

fn parse_failure(s: &str) -> Result<Failure, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("`{s}`: expected http500, http503, http429 or code1303"))
}

fn main() -> ExitCode {
    app::return_large_blocks_to_the_system();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The client commands have exit codes of their own: 0 ok, 1 task failed, 2 usage/connection.
    let client = match cli.command {
        Command::Submit(a) => Some(runtime.block_on(kling_relay::cli_client::submit(a))),
        Command::Tasks { command } => {
            Some(runtime.block_on(kling_relay::cli_client::tasks(command)))
        }
        other => {
            return match runtime.block_on(run(other)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    };
    match client {
        Some(Ok(code)) => ExitCode::from(code),
        Some(Err(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(kling_relay::cli_client::EXIT_USAGE)
        }
        None => ExitCode::SUCCESS,
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Submit(_) | Command::Tasks { .. } => Ok(()),
        Command::Healthcheck { url } => {
            let resp = reqwest::Client::builder()
                .timeout(Duration::from_secs(3))
                .build()?
                .get(&url)
                .send()
                .await
                .with_context(|| format!("{url} does not answer"))?;
            anyhow::ensure!(
                resp.status().is_success(),
                "{url} answered {}",
                resp.status()
            );
            Ok(())
        }
        Command::Serve {
            config,
            simulate,
            log_format,
        } => {
            let mut settings = Settings::load(config.as_deref())?;
            if !simulate {
                settings.require_api_key()?;
            }
            if let Some(f) = log_format {
                settings.log.format = f;
            }
            telemetry::init(settings.log.format, &settings.log.level);
            for warning in settings.warnings(simulate) {
                tracing::warn!("{warning}");
            }
            let listener = tokio::net::TcpListener::bind(settings.server.listen)
                .await
                .with_context(|| format!("cannot listen on {}", settings.server.listen))?;
            let _sim = if simulate {
                let sim = app::simulate(&mut settings, listener.local_addr()?).await?;
                app::announce_demo_client(&settings).await?;
                Some(sim)
            } else {
                None
            };
            let shutdown = CancellationToken::new();
            tokio::spawn(stop_on_signal(shutdown.clone()));
            app::run(settings, listener, shutdown).await
        }
        Command::Migrate { config } => {
            let settings = Settings::load(config.as_deref())?;
            telemetry::init(settings.log.format, &settings.log.level);
            let store = app::open_store(&settings).await?;
            store.close().await;
            println!("migrations applied ({})", store.backend());
            Ok(())
        }
        Command::Archive {
            config,
            command: ArchiveCommand::Backfill { batch },
        } => {
            let settings = Settings::load(config.as_deref())?;
            telemetry::init(settings.log.format, "warn");
            if !settings.archive.enabled {
                anyhow::bail!("archive.enabled is false: turn archiving on first");
            }
            let store = app::open_store(&settings).await?;
            let relay = std::sync::Arc::new(
                kling_relay::service::Relay::new(store.clone(), std::sync::Arc::new(settings))
                    .await?,
            );
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} backfill [{bar:30}] {pos}/{len} tasks ({per_sec}, eta {eta})",
                )
                .map(|s| s.progress_chars("=> "))
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let report = kling_relay::workers::archiver::backfill(relay, batch, |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })
            .await;
            bar.finish_and_clear();
            store.close().await;
            let report = report?;
            println!(
                "backfill: {} tasks queued; images stored {}, failed {}, pending {} (the service retries pending ones)",
                report.tasks_queued, report.stored, report.failed, report.pending
            );
            Ok(())
        }
        Command::Doctor { config, json } => {
            let settings = Settings::load(config.as_deref())?;
            telemetry::init(settings.log.format, "error");
            let store = app::open_store(&settings).await.ok();
            let report = kling_relay::doctor::run(&settings, store.as_ref()).await;
            if let Some(s) = store {
                s.close().await;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", kling_relay::doctor::render(&report));
            }
            anyhow::ensure!(report.ok, "doctor: some checks failed");
            Ok(())
        }
        Command::Usage { config, args } => {
            let settings = Settings::load(config.as_deref())?;
            telemetry::init(settings.log.format, "warn");
            let store = app::open_store(&settings).await?;
            let result = kling_relay::cli_usage::run(&store, args).await;
            store.close().await;
            result
        }
        Command::Clients { config, command } => {
            let settings = Settings::load(config.as_deref())?;
            telemetry::init(settings.log.format, "warn");
            let store = app::open_store(&settings).await?;
            let result = run_clients(&store, &settings, command).await;
            store.close().await;
            result
        }
        Command::Simulator(a) => {
            telemetry::init(LogFormat::Text, "info");
            let listener = tokio::net::TcpListener::bind(a.listen)
                .await
                .with_context(|| format!("cannot listen on {}", a.listen))?;
            let cfg = SimConfig {
                profile: a.profile,
                api_key: a.api_key,
                access_key: a.access_key,
                secret_key: a.secret_key,
                processing_after: a.processing_after,
                finish_after: a.finish_after,
                concurrency_units: a.concurrency_units,
                lookup_by_external_id: !a.no_external_lookup,
                ..SimConfig::default()
            };
            let faults = Faults {
                answer_style: a.answer_style,
                strip_callback_query: a.strip_callback_query,
                callback_task_id_renamed: a.callback_task_id_renamed,
                create_without_status: a.create_without_status,
                out_of_credit: a.out_of_credit,
                key_revoked: a.key_revoked,
                drop_callbacks: a.drop_callbacks,
                duplicate_callbacks: a.duplicate_callbacks,
                reorder_callbacks: a.reorder_callbacks,
                callback_delay_ms: a.callback_delay.as_millis() as u64,
                create_fail: a.create_fail,
                query_fail: a.query_fail,
                create_delay_ms: a.create_delay.as_millis() as u64,
                query_delay_ms: a.query_delay.as_millis() as u64,
                ..Faults::default()
            };
            let sim = Simulator::start_with_faults(cfg, faults, listener).await?;
            tracing::info!(url = %sim.base_url(), "CometAPI simulator listening; faults at PUT /_sim/faults");
            let shutdown = CancellationToken::new();
            stop_on_signal(shutdown.clone()).await;
            sim.stop();
            Ok(())
        }
    }
}

async fn run_clients(
    store: &kling_relay::storage::Store,
    settings: &Settings,
    command: ClientsCommand,
) -> anyhow::Result<()> {
    use kling_relay::resource::rfc3339;
    use kling_relay::service::clients as admin;
    match command {
        ClientsCommand::Create {
            name,
            notify_url,
            json,
        } => {
            let c = admin::create_client(store, &name, notify_url.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string(&c)?);
            } else {
                println!("client:         {}", c.name);
                println!("api key:        {}", c.api_key);
                println!("signing secret: {}", c.signing_secret);
                println!("(the API key is shown only now; only its hash is stored)");
            }
        }
        ClientsCommand::List { json } => {
            let clients = store.list_clients().await?;
            if json {
                let list: Vec<serde_json::Value> = clients
                    .iter()
                    .map(|c| {
                        serde_json::json!({
                            "name": c.name,
                            "api_key_prefix": c.api_key_prefix,
                            "notify_url": c.notify_url,
                            "created_at": rfc3339(c.created_at_ms),
                            "revoked_at": c.revoked_at_ms.map(rfc3339),
                            "weight": c.weight,
                            "max_units": c.max_units,
                            "units_per_day": c.units_per_day,
                            "units_per_month": c.units_per_month,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string(&list)?);
            } else {
                println!(
                    "{:<24} {:<12} {:<8} {:>6} {:>9} {:>9} {:>11} notify url",
                    "name", "key", "state", "weight", "max units", "units/day", "units/month"
                );
                let dash = |v: Option<i64>| v.map_or("-".to_string(), |m| m.to_string());
                for c in clients {
                    println!(
                        "{:<24} {:<12} {:<8} {:>6} {:>9} {:>9} {:>11} {}",
                        c.name,
                        format!("{}…", c.api_key_prefix),
                        if c.is_revoked() { "revoked" } else { "active" },
                        c.weight,
                        dash(c.max_units),
                        dash(c.units_per_day),
                        dash(c.units_per_month),
                        c.notify_url.unwrap_or_default()
                    );
                }
            }
        }
        ClientsCommand::Revoke { name } => {
            store
                .revoke_client(&name, kling_relay::service::now_ms())
                .await?;
            println!("client `{name}` revoked");
        }
        ClientsCommand::RotateSecret { name, grace, json } => {
            let grace = grace.unwrap_or(settings.notifications.secret_rotation_grace);
            let secret = admin::rotate_secret(store, &name, grace).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"name": name, "signing_secret": secret})
                );
            } else {
                println!("signing secret: {secret}");
                println!(
                    "(the previous secret keeps signing for {})",
                    humantime::format_duration(grace)
                );
            }
        }
        ClientsCommand::Set {
            name,
            weight,
            max_units,
            no_max_units,
            units_per_day,
            no_units_per_day,
            units_per_month,
            no_units_per_month,
        } => {
            let setting = |value: Option<i64>, remove: bool| {
                if remove {
                    Some(None)
                } else {
                    value.map(Some)
                }
            };
            let cap = setting(max_units, no_max_units);
            let per_day = setting(units_per_day, no_units_per_day);
            let per_month = setting(units_per_month, no_units_per_month);
            if weight.is_none() && cap.is_none() && per_day.is_none() && per_month.is_none() {
                anyhow::bail!(
                    "give --weight, --max-units, --units-per-day or --units-per-month (or a --no-… to remove one)"
                );
            }
            if weight.is_some() || cap.is_some() {
                admin::set_share(store, &name, weight, cap).await?;
            }
            if per_day.is_some() || per_month.is_some() {
                admin::set_budgets(store, &name, per_day, per_month).await?;
            }
            let c = store
                .get_client(&name)
                .await?
                .with_context(|| format!("no client named `{name}`"))?;
            let or_none = |v: Option<i64>| v.map_or("none".to_string(), |m| m.to_string());
            println!(
                "client `{name}`: weight {}, max units {}, units per day {}, units per month {}",
                c.weight,
                or_none(c.max_units),
                or_none(c.units_per_day),
                or_none(c.units_per_month),
            );
        }
        ClientsCommand::SetNotifyUrl { name, url, clear } => {
            if url.is_none() && !clear {
                anyhow::bail!("give a URL, or --clear");
            }
            admin::set_notify_url(store, &name, url.as_deref()).await?;
            println!(
                "client `{name}` notify url: {}",
                url.as_deref().unwrap_or("(none)")
            );
        }
    }
    Ok(())
}

/// Cancels `token` on Ctrl-C or SIGTERM.
async fn stop_on_signal(token: CancellationToken) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
    token.cancel();
}
