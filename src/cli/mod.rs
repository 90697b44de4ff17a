//! The `kling-relay` command line: the service (`serve`, `migrate`, `doctor`), the operator's
//! commands on the database (`clients`, `usage`, `archive`), the CometAPI simulator, and a client
//! of a running service (`submit`, `tasks`, `healthcheck`). `main.rs` only calls [`main`].
//!
//! Exit codes: 0 success; 1 a failure (for `submit`/`tasks wait`: the task failed); 2 a usage or
//! connection error of the remote-client commands.

pub mod clients;
pub mod remote;
pub mod simulator;
pub mod usage;

use crate::config::{LogFormat, Settings};
use crate::{app, telemetry};
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "kling-relay",
    version,
    about = "A durable relay in front of CometAPI's Kling image generation",
    after_help = "Settings: config/default.toml, then --config FILE, then KLING_RELAY_SECTION__KEY \
                  variables. See README.md."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `--config`, shared by every command that reads the settings.
#[derive(clap::Args, Clone)]
struct ConfigArg {
    /// Settings file (TOML) layered over config/default.toml; relative paths in it are taken
    /// from the working directory.
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Serve {
        #[command(flatten)]
        config: ConfigArg,
        /// Run against a built-in CometAPI simulator (offline; results are simulated).
        #[arg(long)]
        simulate: bool,
        /// Log format (overrides log.format).
        #[arg(long, value_parser = parse_log_format, value_name = "text|json")]
        log_format: Option<LogFormat>,
    },
    /// Check, with calls that cost nothing, that this configuration works against the real
    /// upstream: key, create and query paths, lookup by external_task_id, public URL, clock.
    /// Exits 0 when every check passes, 1 when one fails.
    Doctor {
        #[command(flatten)]
        config: ConfigArg,
        /// Print the report as JSON (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Apply database migrations and exit.
    Migrate {
        #[command(flatten)]
        config: ConfigArg,
        /// Print {"database", "backend"} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the CometAPI simulator on its own.
    Simulator(simulator::SimulatorArgs),
    /// Submit a task to a running service (local images are sent as Base64).
    Submit(remote::SubmitArgs),
    /// Your tasks on a running service: list, show, events, wait, cancel, deliveries.
    Tasks {
        #[command(subcommand)]
        command: remote::TasksCommand,
    },
    /// Exit 0 if the service answers /healthz (for container health checks).
    Healthcheck {
        /// The health URL to ask.
        #[arg(long, default_value = "http://127.0.0.1:8080/healthz")]
        url: String,
    },
    /// The image archive.
    Archive {
        #[command(flatten)]
        config: ConfigArg,
        #[command(subcommand)]
        command: ArchiveCommand,
    },
    /// What every client spent: tasks by final status and units deducted, from the database.
    Usage {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        args: usage::UsageArgs,
    },
    /// Manage the internal clients that call the API (on the database directly).
    Clients {
        #[command(flatten)]
        config: ConfigArg,
        #[command(subcommand)]
        command: clients::ClientsCommand,
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
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("`{s}`: expected text or json")),
    }
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
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
        Command::Submit(a) => runtime.block_on(remote::submit(a)),
        Command::Tasks { command } => runtime.block_on(remote::tasks(command)),
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
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(remote::EXIT_USAGE)
        }
    }
}

/// Loads the settings for a command that works on the database, and says which database: a
/// relative `database.url` is resolved against the working directory, so the absolute path shows
/// where the data is. Read-only commands refuse a SQLite file that does not exist rather than
/// create an empty one in whatever folder they were run from.
fn settings_for_database(config: &ConfigArg, must_exist: bool) -> anyhow::Result<Settings> {
    let settings = Settings::load(config.config.as_deref())?;
    name_database(&settings, must_exist)?;
    Ok(settings)
}

fn name_database(settings: &Settings, must_exist: bool) -> anyhow::Result<()> {
    if let Some(file) = settings.sqlite_file() {
        anyhow::ensure!(
            !must_exist || file.exists(),
            "no database at {} (run this from the folder the service runs in, or point \
             database.url or --config at its database)",
            file.display()
        );
    }
    eprintln!("database: {}", settings.database_location());
    Ok(())
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
            let mut settings = Settings::load(config.config.as_deref())?;
            if !simulate {
                settings.require_api_key()?;
            }
            if let Some(f) = log_format {
                settings.log.format = f;
            }
            telemetry::init(settings.log.format, &settings.log.level);
            tracing::info!(database = %settings.database_location(), "opening the database");
            if settings.archive.enabled {
                tracing::info!(path = %settings.archive.path, "archive folder");
            }
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
        Command::Migrate { config, json } => {
            let settings = settings_for_database(&config, false)?;
            telemetry::init(settings.log.format, &settings.log.level);
            let store = app::open_store(&settings).await?;
            store.close().await;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "database": settings.database_location(),
                        "backend": store.backend().to_string(),
                    })
                );
            } else {
                println!("migrations applied ({})", store.backend());
            }
            Ok(())
        }
        Command::Archive {
            config,
            command: ArchiveCommand::Backfill { batch, json },
        } => backfill(&config, batch, json).await,
        Command::Doctor { config, json } => {
            let settings = Settings::load(config.config.as_deref())?;
            telemetry::init(settings.log.format, "error");
            let store = app::open_store(&settings).await.ok();
            let report = crate::doctor::run(&settings, store.as_ref()).await;
            if let Some(s) = store {
                s.close().await;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", crate::doctor::render(&report));
            }
            anyhow::ensure!(report.ok, "doctor: some checks failed");
            Ok(())
        }
        Command::Usage { config, args } => {
            let settings = settings_for_database(&config, true)?;
            telemetry::init(settings.log.format, "warn");
            let store = app::open_store(&settings).await?;
            let result = usage::run(&store, args).await;
            store.close().await;
            result
        }
        Command::Clients { config, command } => {
            let settings = settings_for_database(&config, command.only_reads())?;
            telemetry::init(settings.log.format, "warn");
            let store = app::open_store(&settings).await?;
            let result = clients::run(&store, &settings, command).await;
            store.close().await;
            result
        }
        Command::Simulator(a) => simulator::run(a).await,
    }
}

/// `archive backfill`, with a progress bar on the terminal.
async fn backfill(config: &ConfigArg, batch: i64, json: bool) -> anyhow::Result<()> {
    let settings = Settings::load(config.config.as_deref())?;
    telemetry::init(settings.log.format, "warn");
    if !settings.archive.enabled {
        anyhow::bail!("archive.enabled is false: turn archiving on first");
    }
    name_database(&settings, true)?;
    let store = app::open_store(&settings).await?;
    let relay = std::sync::Arc::new(
        crate::service::Relay::new(store.clone(), std::sync::Arc::new(settings)).await?,
    );
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} backfill [{bar:30}] {pos}/{len} tasks ({per_sec}, eta {eta})",
        )
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let report = crate::workers::archiver::backfill(relay, batch, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .await;
    bar.finish_and_clear();
    store.close().await;
    let report = report?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "tasks_queued": report.tasks_queued,
                "stored": report.stored,
                "failed": report.failed,
                "pending": report.pending,
            })
        );
    } else {
        println!(
            "backfill: {} tasks queued; images stored {}, failed {}, pending {} (the service retries pending ones)",
            report.tasks_queued, report.stored, report.failed, report.pending
        );
    }
    Ok(())
}

/// Cancels `token` on Ctrl-C or SIGTERM.
pub async fn stop_on_signal(token: CancellationToken) {
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
