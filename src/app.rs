//! Wiring: opens the database, builds the relay, and runs the HTTP server and the background
//! workers until the shutdown token fires. `main` and the tests both start the service here.

use crate::config::{redact_url, Secret, Settings};
use crate::service::Relay;
use crate::simulator::{SimConfig, Simulator};
use crate::storage::Store;
use crate::{http, workers};
use anyhow::Context;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Opens the database named in the settings and applies pending migrations.
pub async fn open_store(settings: &Settings) -> anyhow::Result<Store> {
    let db = &settings.database;
    let store = Store::connect_with_writers(&db.url, db.max_connections, db.commit_writers)
        .await
        .with_context(|| format!("cannot open database {}", redact_url(&db.url)))?;
    store.migrate().await.context("cannot apply migrations")?;
    Ok(store)
}

/// Starts an in-process simulator and points the settings at it: upstream, key and public URL
/// (the service's own address, so callbacks come straight back).
pub async fn simulate(
    settings: &mut Settings,
    service_addr: std::net::SocketAddr,
) -> anyhow::Result<Simulator> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind the simulator")?;
    let cfg = SimConfig {
        profile: settings.cometapi.profile,
        ..SimConfig::default()
    };
    let sim = Simulator::start(cfg.clone(), listener).await?;
    settings.cometapi.base_url = sim.base_url();
    settings.cometapi.api_key = Secret::new(sim.api_key());
    settings.cometapi.access_key = Secret::new(cfg.access_key);
    settings.cometapi.secret_key = Secret::new(cfg.secret_key);
    let mut reachable = service_addr;
    if reachable.ip().is_unspecified() {
        // Listening on every interface: loopback reaches it from the in-process simulator.
        reachable.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    settings.server.public_url = format!("http://{reachable}");
    // The simulator serves its result images over plain http on loopback.
    settings.archive.allow_http = true;
    settings
        .archive
        .allowed_hosts
        .push(std::net::Ipv4Addr::LOCALHOST.to_string());
    // A local trial notifies a receiver on the same machine.
    settings.notifications.loopback_for_simulation = true;
    tracing::warn!(
        simulator = %sim.base_url(),
        "SIMULATION MODE: no request reaches CometAPI; every result is simulated"
    );
    Ok(sim)
}

/// Creates (or reuses) the demo client of `serve --simulate` and prints its key, so the
/// quickstart is one command plus curl.
pub async fn announce_demo_client(settings: &Settings) -> anyhow::Result<()> {
    let store = open_store(settings).await?;
    let (name, key, signing_secret) = crate::service::clients::ensure_demo_client(&store).await?;
    store.close().await;
    println!("demo client `{name}`: export KEY={key}");
    println!("  its notifications are signed with {signing_secret} (see README, \"Clients, keys and notifications\")");
    println!(
        "  curl -H \"authorization: Bearer $KEY\" http://{}/v1/tasks",
        settings.server.listen
    );
    tracing::warn!(client = %name, "demo client ready; its API key is printed on standard output");
    Ok(())
}

/// glibc's malloc raises its mmap threshold as large blocks are freed, after which it keeps
/// them in its heap: four 80 MB submits left 460 MB resident once done. A fixed threshold turns
/// that adaptation off, so every block of 1 MiB or more is its own mapping, given back to the
/// system when freed. Call before the runtime starts threads.
pub fn return_large_blocks_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a tunable of the allocator; called before any other thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1024 * 1024);
    }
}

/// Runs the service on `listener` until `shutdown` fires, then stops the workers at a safe point.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Held until this function returns: one serving instance per SQLite file.
    let _instance =
        Store::lock_single_instance(&settings.database.url).map_err(anyhow::Error::msg)?;
    let store = open_store(&settings).await?;
    // Only latency rides on it: a pool that cannot open every connection now opens them as
    // work needs them, as it always could.
    if let Err(e) = store.warm_up().await {
        tracing::warn!(error = %e, "could not open every database connection at start");
    }
    if settings.server.public_url.is_empty() {
        tracing::warn!(
            "server.public_url is empty: no callback_url is sent upstream, polling carries every task"
        );
    }
    let shutdown_timeout = settings.server.shutdown_timeout;
    let limits = http::server::ConnectionLimits {
        max_connections: settings.server.max_connections,
        header_read_timeout: settings.server.header_read_timeout,
        idle_timeout: settings.server.idle_timeout,
    };
    let relay = Arc::new(Relay::new(store.clone(), Arc::new(settings)).await?);
    let addr = listener.local_addr()?;
    tracing::info!(%addr, database = store.backend(), "kling-relay listening");

    // Workers stop on their own token, after the HTTP side has drained, so requests in flight
    // (a POST waiting for its dispatch) still find them running.
    let workers_stop = CancellationToken::new();
    let mut workers = tokio::task::JoinSet::new();
    workers.spawn(workers::dispatcher::run(
        relay.clone(),
        workers_stop.clone(),
    ));
    workers.spawn(workers::poller::run(relay.clone(), workers_stop.clone()));
    workers.spawn(workers::notifier::run(relay.clone(), workers_stop.clone()));
    workers.spawn(workers::changes::run(relay.clone(), workers_stop.clone()));
    workers.spawn(workers::archiver::run(relay.clone(), workers_stop.clone()));

    crate::telemetry::metrics::handle();
    if !relay.settings.server.metrics_listen.is_empty() {
        let addr = relay.settings.server.metrics_listen.clone();
        let metrics_listener = TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on server.metrics_listen {addr}"))?;
        tracing::info!(%addr, "metrics on their own listener");
        let stop = shutdown.clone();
        let router = http::metrics_router(relay.clone());
        workers.spawn(async move {
            let served = http::server::serve(metrics_listener, router, limits, stop).await;
            if let Err(e) = served {
                tracing::error!(error = %e, "metrics listener failed");
            }
        });
    }
    let relay_stop = relay.shutdown.clone();
    let http_stop = shutdown.clone();
    // In a JoinSet, so that if this future is dropped (aborted) the server goes with it.
    let mut server = tokio::task::JoinSet::new();
    // Live streams and long-polls watch the relay's token: cancelled with the HTTP side's, so
    // they end and let their connections drain.
    workers.spawn(async move {
        http_stop.cancelled().await;
        relay_stop.cancel();
    });
    server.spawn(http::server::serve(
        listener,
        http::router(relay),
        limits,
        shutdown.clone(),
    ));
    let served = tokio::select! {
        r = server.join_next() => r,
        _ = shutdown.cancelled() => None,
    };
    let deadline = tokio::time::Instant::now() + shutdown_timeout;
    let served = match served {
        Some(r) => r,
        None => {
            tracing::info!(timeout = ?shutdown_timeout, "stopping: draining requests in flight");
            match tokio::time::timeout_at(deadline, server.join_next()).await {
                Ok(Some(r)) => r,
                Ok(None) => Ok(Ok(())),
                Err(_) => {
                    tracing::warn!("requests still running at the shutdown deadline; closing them");
                    server.abort_all();
                    Ok(Ok(()))
                }
            }
        }
    };
    workers_stop.cancel();
    if tokio::time::timeout_at(deadline, async {
        while workers.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        // A worker still inside an upstream call: abandoning it leaves at most a dispatch in
        // doubt, which the next start resolves by looking the task up.
        tracing::warn!("workers did not reach a safe point by the shutdown deadline");
        workers.abort_all();
    }
    store.close().await;
    tracing::info!("stopped");
    match served {
        Ok(r) => r.context("HTTP server failed"),
        Err(e) => Err(anyhow::anyhow!("HTTP server task failed: {e}")),
    }
}
