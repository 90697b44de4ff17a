//! The workers' passes driven one at a time, with no loops running: each `step` is called by the
//! test, so what a pass does (and what it must not do) is asserted without sleeping for a loop to
//! come round (one test runs the dispatcher's loop itself, for what only the loop does). The relay
//! here has no HTTP side and no callback URL: upstream is only ever queried.

use crate::common::*;
use kling_relay::domain::client::Caller;
use kling_relay::domain::TaskStatus;
use kling_relay::service::{poll, Relay};
use kling_relay::simulator::{Faults, SimConfig, Simulator};
use kling_relay::workers::dispatcher;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

struct Stepped {
    relay: Arc<Relay>,
    sim: Simulator,
    caller: Caller,
    _db: TestDb,
}

impl Stepped {
    async fn new(
        b: Backend,
        sim: SimConfig,
        tune: impl FnOnce(&mut kling_relay::config::Settings),
    ) -> Stepped {
        let db = TestDb::new(b).await;
        let (sim, mut settings) = simulated_upstream(&db, sim).await;
        // No callbacks: the poller is the only way a change arrives.
        settings.server.public_url = String::new();
        tune(&mut settings);
        let client = create_client(&db, "stepper").await;
        let store = open_store(&db).await;
        let relay = Relay::new(store, Arc::new(settings)).await.expect("relay");
        Stepped {
            relay: Arc::new(relay),
            sim,
            caller: Caller::Client(client.name),
            _db: db,
        }
    }

    /// Stores a task; no dispatcher runs, so it stays `pending` until a step sends it.
    async fn submit(&self) -> String {
        let submitted = self
            .relay
            .submit(
                &self.caller,
                valid_body(),
                None,
                None,
                Some(Duration::ZERO),
                None,
            )
            .await
            .expect("submit");
        assert_eq!(submitted.task.status, TaskStatus::Pending);
        submitted.task.id
    }

    async fn status(&self, id: &str) -> TaskStatus {
        self.relay.get_any(id).await.expect("task").status
    }

    /// The upstream id of a task a pass has sent.
    async fn upstream_id(&self, id: &str) -> String {
        let task = self.relay.get_any(id).await.expect("task");
        task.upstream_task_id.expect("sent")
    }
}

/// A pass sends every waiting task once and nothing canceled; the next pass has nothing to send.
async fn a_dispatch_step_sends_each_waiting_task_once(b: Backend) {
    let t = Stepped::new(b, stalled_sim(), |_| {}).await;
    let ids = [t.submit().await, t.submit().await, t.submit().await];
    t.relay.cancel(&t.caller, &ids[2]).await.expect("cancel");
    assert_eq!(
        t.sim.stats().create_calls,
        0,
        "nothing is sent before a pass"
    );

    assert_eq!(dispatcher::step(&t.relay).await.expect("pass"), 2);
    assert_eq!(t.sim.stats().tasks_created, 2);
    for id in &ids[..2] {
        assert_eq!(t.status(id).await, TaskStatus::Submitted);
    }
    assert_eq!(t.status(&ids[2]).await, TaskStatus::Canceled);

    assert_eq!(dispatcher::step(&t.relay).await.expect("pass"), 0);
    assert_eq!(
        t.sim.stats().create_calls,
        2,
        "a second pass sends nothing again"
    );
    assert_eq!(t.status(&ids[2]).await, TaskStatus::Canceled);
}

/// With `max_concurrency` units (2: one task of `n` = 2), a pass sends only what fits; a finished
/// task's units let the next pass send the one that waited.
async fn a_dispatch_step_sends_only_what_the_units_allow(b: Backend) {
    let t = Stepped::new(
        b,
        SimConfig {
            processing_after: Duration::from_millis(50),
            finish_after: Duration::from_millis(50),
            ..fast_sim()
        },
        |s| {
            s.cometapi.max_concurrency = 2;
            s.poller.first_poll_after = Duration::ZERO;
        },
    )
    .await;
    let first = t.submit().await;
    let second = t.submit().await;
    assert!(!t.relay.work_waiting(), "no pass yet");
    assert_eq!(dispatcher::step(&t.relay).await.expect("pass"), 1);
    assert!(
        t.relay.work_waiting(),
        "the pass left a task waiting for units: a change freeing units commits at once"
    );
    assert_eq!(
        dispatcher::step(&t.relay).await.expect("pass"),
        0,
        "both units in use"
    );
    assert_eq!(t.status(&second).await, TaskStatus::Pending);
    assert!(t.relay.work_waiting());

    // Upstream finishes the first; a poll pass hears it, and the unit is free again.
    let upstream_id = t.upstream_id(&first).await;
    wait_until(Duration::from_secs(10), || async {
        t.sim.task_status(&upstream_id) == Some("succeed")
    })
    .await;
    let (polled, timed_out) = poll::step(&t.relay).await.expect("poll pass");
    assert_eq!((polled, timed_out), (1, 0));
    assert_eq!(t.status(&first).await, TaskStatus::Succeeded);
    assert_eq!(dispatcher::step(&t.relay).await.expect("pass"), 1);
    assert_eq!(t.status(&second).await, TaskStatus::Submitted);
    assert!(!t.relay.work_waiting(), "nothing left waiting");
    assert_eq!(
        t.sim.stats().peak_units_in_use,
        2,
        "never both tasks at once"
    );
}

/// Whether the dispatcher was woken since the last look (a stored permit), taking the wake.
async fn woken(relay: &Relay) -> bool {
    tokio::time::timeout(Duration::from_millis(50), relay.dispatch_wake.notified())
        .await
        .is_ok()
}

/// A submit wakes the dispatcher only while a unit may be free: with every unit held (2, by one
/// task of `n` = 2) a new task cannot go, and the pass it would wake reads the account for
/// nothing. A finished task wakes it itself, and a pass that finds nothing due forgets that
/// the units were full.
async fn a_submit_wakes_the_dispatcher_only_while_units_may_be_free(b: Backend) {
    let t = Stepped::new(
        b,
        SimConfig {
            processing_after: Duration::from_millis(50),
            finish_after: Duration::from_millis(50),
            ..fast_sim()
        },
        |s| {
            s.cometapi.max_concurrency = 2;
            s.poller.first_poll_after = Duration::ZERO;
        },
    )
    .await;
    let first = t.submit().await;
    assert!(woken(&t.relay).await, "no pass yet: a submit wakes it");
    assert_eq!(dispatcher::step(&t.relay).await.expect("pass"), 1);
    assert!(
        t.relay.units_full(),
        "the pass sent a task holding both units"
    );
    let second = t.submit().await;
    assert!(
        !woken(&t.relay).await,
        "every unit is held: the submit does not wake it"
    );
    assert_eq!(t.status(&second).await, TaskStatus::Pending);

    // Upstream finishes the first; the poll pass that hears it wakes the dispatcher.
    let upstream_id = t.upstream_id(&first).await;
    wait_until(Duration::from_secs(10), || async {
        t.sim.task_status(&upstream_id) == Some("succeed")
    })
    .await;
    assert_eq!(poll::step(&t.relay).await.expect("poll pass"), (1, 0));
    assert!(
        woken(&t.relay).await,
        "a finished task frees units and wakes it"
    );
    assert_eq!(dispatcher::step(&t.relay).await.expect("pass"), 1);
    assert_eq!(t.status(&second).await, TaskStatus::Submitted);
    assert!(t.relay.units_full());

    let upstream_id = t.upstream_id(&second).await;
    wait_until(Duration::from_secs(10), || async {
        t.sim.task_status(&upstream_id) == Some("succeed")
    })
    .await;
    assert_eq!(poll::step(&t.relay).await.expect("poll pass"), (1, 0));
    assert!(woken(&t.relay).await);
    assert_eq!(
        dispatcher::step(&t.relay).await.expect("pass"),
        0,
        "nothing due"
    );
    assert!(
        !t.relay.units_full(),
        "a pass with nothing due leaves it unset"
    );
    let third = t.submit().await;
    assert!(woken(&t.relay).await, "units are free: the submit wakes it");
    assert_eq!(dispatcher::step(&t.relay).await.expect("pass"), 1);
    assert_eq!(t.status(&third).await, TaskStatus::Submitted);
}

/// A poll pass queries only what is due: a task upstream still runs is asked once, then not again
/// until its next poll time, and a task past `give_up_after` is timed out by the pass.
async fn a_poll_step_queries_only_what_is_due(b: Backend) {
    let t = Stepped::new(b, stalled_sim(), |s| {
        s.poller.first_poll_after = Duration::ZERO;
        s.poller.interval = Duration::from_secs(3600);
        s.poller.max_interval = Duration::from_secs(3600);
    })
    .await;
    let id = t.submit().await;
    assert_eq!(
        poll::step(&t.relay).await.expect("poll pass"),
        (0, 0),
        "nothing sent, nothing to poll"
    );
    assert_eq!(dispatcher::step(&t.relay).await.expect("pass"), 1);
    let queries = t.sim.stats().query_calls;
    assert_eq!(poll::step(&t.relay).await.expect("poll pass"), (1, 0));
    assert_eq!(t.sim.stats().query_calls, queries + 1);
    assert_eq!(
        t.status(&id).await,
        TaskStatus::Submitted,
        "upstream has not started it"
    );
    assert_eq!(
        poll::step(&t.relay).await.expect("poll pass"),
        (0, 0),
        "next poll is an hour away"
    );
    assert_eq!(t.sim.stats().query_calls, queries + 1);
}

async fn a_poll_step_times_out_what_upstream_never_finishes(b: Backend) {
    let t = Stepped::new(b, stalled_sim(), |s| {
        s.poller.give_up_after = Duration::from_millis(1);
    })
    .await;
    let id = t.submit().await;
    assert_eq!(dispatcher::step(&t.relay).await.expect("pass"), 1);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (_, timed_out) = poll::step(&t.relay).await.expect("poll pass");
    assert_eq!(timed_out, 1);
    assert_eq!(t.status(&id).await, TaskStatus::TimedOut);
    assert_eq!(poll::step(&t.relay).await.expect("poll pass").1, 0, "once");
}

/// The dispatcher's loop claims again while creates are under way (a claim counts its tasks'
/// units at once), so a task that can go does not wait for a slow create of an earlier pass; and
/// never more than `dispatch.concurrency` creates are under way.
async fn the_dispatcher_sends_beside_slow_creates_within_its_concurrency(b: Backend) {
    let t = Stepped::new(b, stalled_sim(), |s| s.dispatch.concurrency = 3).await;
    t.sim.set_faults(Faults {
        create_delay_ms: 3_000,
        ..Faults::default()
    });
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(dispatcher::run(t.relay.clone(), shutdown.clone()));
    let under_way = || async { t.sim.stats().creates_under_way };
    t.submit().await;
    wait_until(Duration::from_secs(2), || async { under_way().await == 1 }).await;
    // The first create answers after 3 s; the second task goes beside it.
    t.submit().await;
    wait_until(Duration::from_secs(2), || async { under_way().await == 2 }).await;
    for _ in 0..3 {
        t.submit().await;
    }
    wait_until(Duration::from_secs(20), || async {
        let s = t.sim.stats();
        s.tasks_created == 5 && s.creates_under_way == 0
    })
    .await;
    assert_eq!(
        t.sim.stats().peak_creates_under_way,
        3,
        "at most dispatch.concurrency creates at once, and that many when work waits"
    );
    shutdown.cancel();
    running.await.expect("the dispatcher stops");
    assert_eq!(t.sim.stats().create_calls, 5, "each task sent once");
}

/// While a task's final report is being committed, its units are free to the dispatch claim:
/// upstream freed them when it reported. Postgres, whose claim runs beside the commit: the
/// task's row is locked from outside, so the report's commit cannot land; the waiting task must
/// still be created upstream meanwhile.
async fn a_finishing_tasks_units_are_free_before_its_commit_lands(b: Backend) {
    use kling_relay::domain::{EventSource, ResultImage, UpstreamReport, UpstreamStatus};
    use sqlx::Connection;
    let t = Stepped::new(b, stalled_sim(), |s| s.cometapi.max_concurrency = 2).await;
    let first = t.submit().await;
    let second = t.submit().await;
    assert_eq!(dispatcher::step(&t.relay).await.expect("pass"), 1);
    assert!(
        t.relay.work_waiting(),
        "the second waits for the first's units"
    );
    let upstream_id = t.upstream_id(&first).await;

    let mut lock = sqlx::PgConnection::connect(&t._db.url)
        .await
        .expect("connect");
    sqlx::query("BEGIN")
        .execute(&mut lock)
        .await
        .expect("begin");
    sqlx::query("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE")
        .bind(&first)
        .execute(&mut lock)
        .await
        .expect("lock the first task's row");
    let report = UpstreamReport {
        task_id: Some(upstream_id),
        external_task_id: None,
        status: UpstreamStatus::Succeed,
        status_msg: None,
        updated_at_ms: Some(1),
        images: vec![ResultImage {
            index: 0,
            url: "https://cdn.example/0.png".into(),
        }],
        final_unit_deduction: Some("1".into()),
        raw: None,
    };
    let (relay, id) = (t.relay.clone(), first.clone());
    let reporting = tokio::spawn(async move {
        relay
            .apply_report(&id, EventSource::Webhook, &report)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    let relay = t.relay.clone();
    let dispatching = tokio::spawn(async move {
        // Passes until one sends (a pass before the report is decided finds no room); that
        // pass ends with the second's own commit, which may queue behind the locked one.
        loop {
            match dispatcher::step(&relay).await {
                Ok(0) => tokio::time::sleep(Duration::from_millis(10)).await,
                other => return other.map_err(|e| e.to_string()),
            }
        }
    });
    wait_until(Duration::from_secs(20), || async {
        t.sim.stats().tasks_created == 2
    })
    .await;
    assert_eq!(
        t.status(&first).await,
        TaskStatus::Submitted,
        "the first's report has not landed: its row is still locked"
    );
    sqlx::query("ROLLBACK")
        .execute(&mut lock)
        .await
        .expect("unlock");
    reporting.await.expect("join").expect("the report lands");
    dispatching.await.expect("join").expect("the pass ends");
    assert_eq!(t.status(&first).await, TaskStatus::Succeeded);
    assert_eq!(t.status(&second).await, TaskStatus::Submitted);
}

on_both_backends!(
    the_dispatcher_sends_beside_slow_creates_within_its_concurrency,
    a_dispatch_step_sends_each_waiting_task_once,
    a_dispatch_step_sends_only_what_the_units_allow,
    a_submit_wakes_the_dispatcher_only_while_units_may_be_free,
    a_poll_step_queries_only_what_is_due,
    a_poll_step_times_out_what_upstream_never_finishes,
);

on_postgres!(
    postgres_only;
    a_finishing_tasks_units_are_free_before_its_commit_lands,
);
