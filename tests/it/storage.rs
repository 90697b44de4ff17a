//! Storage on both databases: every hot query is served by an index (the poller never reads final
//! tasks), compare-and-set commits, and the persisted webhook secret.

use crate::common::*;
use kling_relay::domain::{Change, EventSource, TaskStatus, Transition};
use kling_relay::storage::{sql, Commit, ExplainArg, ListFilter, PendingCaps, Store};

const CAPS: PendingCaps = PendingCaps {
    total: 1000,
    per_client: 1000,
};

/// Asserts the plan reads through `index` (or one of `|`-separated alternatives), never by a
/// full scan.
fn assert_served_by(backend: Backend, plan: &[String], index: &str) {
    let text = plan.join("\n");
    assert!(
        index.split('|').any(|i| text.contains(i)),
        "plan does not use {index}:\n{text}"
    );
    match backend {
        // `SCAN t USING INDEX i` walks an index in order (and stops at LIMIT); a bare
        // `SCAN t` reads the whole table (`SCAN CONSTANT ROW` is the one-row SELECT around
        // an EXISTS, no table at all; `SCAN (subquery-N)` and `SCAN x` of a `CO-ROUTINE x`
        // read a subquery's rows, already found through its own plan; `SCAN j VIRTUAL TABLE`
        // walks a table-valued function, such as `json_each` over a statement's argument).
        Backend::Sqlite => {
            let subqueries: Vec<&str> = plan
                .iter()
                .filter_map(|l| l.strip_prefix("CO-ROUTINE "))
                .collect();
            assert!(
                !plan.iter().any(|l| {
                    let Some(scanned) = l.strip_prefix("SCAN ") else {
                        return false;
                    };
                    !l.contains("USING")
                        && scanned != "CONSTANT ROW"
                        && !scanned.starts_with("(subquery")
                        && !scanned.contains(" VIRTUAL TABLE")
                        && !subqueries.contains(&scanned)
                }),
                "full scan:\n{text}"
            )
        }
        Backend::Postgres => assert!(!text.contains("Seq Scan"), "sequential scan:\n{text}"),
    }
}

/// Asserts the keyset cursor is part of the index range (not a filter over every newer row), so
/// a page 10,000 pages deep costs what the first page costs.
fn assert_cursor_in_index_range(backend: Backend, plan: &[String]) {
    let text = plan.join("\n");
    let ranged = match backend {
        Backend::Sqlite => plan
            .iter()
            .any(|l| l.starts_with("SEARCH") && l.contains("created_at")),
        Backend::Postgres => plan
            .iter()
            .any(|l| l.contains("Index Cond") && l.contains("created_at")),
    };
    assert!(ranged, "the cursor is not in the index range:\n{text}");
}

async fn every_hot_query_is_served_by_an_index(b: Backend) {
    let db = TestDb::new(b).await;
    let s = open_store(&db).await;
    for i in 0..50 {
        s.insert_task(task_record(i), None, CAPS).await.unwrap();
    }
    let int = ExplainArg::Int;
    let text = |v: &str| ExplainArg::Text(v.to_owned());

    let plan = s.explain(sql::DUE_POLLS, &[int(1), int(10)]).await.unwrap();
    assert_served_by(b, &plan, "tasks_poll_due");
    // Each client's next dispatches: SQLite windows over the due index; Postgres skips from
    // client to client through its own index and reads each one's first few.
    let (due, index) = match b {
        Backend::Sqlite => (sql::DUE_DISPATCHES, "tasks_dispatch_due"),
        Backend::Postgres => (sql::DUE_DISPATCHES_PG, "tasks_dispatch_by_client"),
    };
    let plan = s.explain(due, &[int(1), int(10)]).await.unwrap();
    assert_served_by(b, &plan, index);
    if b == Backend::Postgres {
        let text = plan.join("\n");
        assert!(
            !text.contains("WindowAgg") && text.contains("Limit"),
            "each client's first few, not every due task:\n{text}"
        );
    }
    // Admission's count of what holds the account: open tasks only, by status (the in-doubt half
    // reads pending tasks, at most `dispatch.max_pending`, or the partial in-flight index).
    let plan = s.explain(sql::HOLDING_UNITS, &[]).await.unwrap();
    assert_served_by(
        b,
        &plan,
        "tasks_status_created|tasks_open_by_age|tasks_dispatch_in_flight",
    );
    // Either index reads only open tasks: the partial one holds nothing else, and the status
    // index is searched by the three open statuses.
    let plan = s
        .explain(sql::EXPIRED_OPEN, &[int(1), int(10)])
        .await
        .unwrap();
    assert_served_by(b, &plan, "tasks_open_by_age|tasks_status_created (status=?");
    let plan = s.explain(sql::EVENTS, &[text("x")]).await.unwrap();
    assert_served_by(b, &plan, "task_events_task");
    // The poller's timing reads: every pass while work waits.
    let plan = s.explain(sql::RUNNING_TASKS, &[]).await.unwrap();
    assert_served_by(b, &plan, "tasks_poll_due");
    let plan = s.explain(sql::NEXT_POLL_DUE, &[]).await.unwrap();
    assert_served_by(b, &plan, "tasks_poll_due");
    // Either index: the partial one holds only tasks with a dispatch due, the status one only
    // pending tasks, and the first due one ends the search.
    let plan = s.explain(sql::DISPATCH_BACKLOG, &[int(1)]).await.unwrap();
    assert_served_by(b, &plan, "tasks_dispatch_due|tasks_status_created");
    let plan = s.explain(sql::RECENT_DURATIONS, &[int(500)]).await.unwrap();
    assert_served_by(b, &plan, "tasks_status_created");
    // A submit batch's idempotency keys reach their rows by the primary key, never by a walk
    // through every stored key.
    let keys = text(r#"[{"s": "c1", "k": "k", "e": 5}]"#);
    let (expire, read, pkey) = match b {
        Backend::Sqlite => (
            sql::EXPIRE_KEYS,
            sql::READ_KEYS,
            "sqlite_autoindex_idempotency_keys_1",
        ),
        Backend::Postgres => (
            sql::EXPIRE_KEYS_PG,
            sql::READ_KEYS_PG,
            "idempotency_keys_pkey",
        ),
    };
    for statement in [expire, read] {
        let plan = s
            .explain(statement, std::slice::from_ref(&keys))
            .await
            .unwrap();
        assert_served_by(b, &plan, pkey);
    }

    let plain = ListFilter {
        limit: 50,
        ..ListFilter::default()
    };
    let plan = s.explain(&sql::list(&plain), &[int(50)]).await.unwrap();
    assert_served_by(b, &plan, "tasks_created");
    let paged = ListFilter {
        before: Some((5, "x".into())),
        created_after_ms: Some(1),
        ..plain.clone()
    };
    let plan = s
        .explain(&sql::list(&paged), &[int(1), int(5), text("x"), int(50)])
        .await
        .unwrap();
    assert_served_by(b, &plan, "tasks_created");
    assert_cursor_in_index_range(b, &plan);
    let by_status = ListFilter {
        statuses: vec![TaskStatus::Failed],
        before: Some((5, "x".into())),
        ..plain
    };
    let plan = s
        .explain(
            &sql::list(&by_status),
            &[text("failed"), int(5), text("x"), int(50)],
        )
        .await
        .unwrap();
    assert_served_by(b, &plan, "tasks_status_created");
    assert_cursor_in_index_range(b, &plan);

    // A client's history, with and without a status filter.
    let mine = ListFilter {
        client: Some("c1".into()),
        limit: 50,
        ..ListFilter::default()
    };
    let plan = s
        .explain(&sql::list(&mine), &[text("c1"), int(50)])
        .await
        .unwrap();
    assert_served_by(b, &plan, "tasks_client_created");
    let mine_failed = ListFilter {
        statuses: vec![TaskStatus::Failed],
        before: Some((5, "x".into())),
        ..mine
    };
    let plan = s
        .explain(
            &sql::list(&mine_failed),
            &[text("c1"), text("failed"), int(5), text("x"), int(50)],
        )
        .await
        .unwrap();
    assert_served_by(b, &plan, "tasks_client_status_created");
    assert_cursor_in_index_range(b, &plan);
    let mine_deep = ListFilter {
        client: Some("c1".into()),
        before: Some((5, "x".into())),
        limit: 50,
        ..ListFilter::default()
    };
    let plan = s
        .explain(
            &sql::list(&mine_deep),
            &[text("c1"), int(5), text("x"), int(50)],
        )
        .await
        .unwrap();
    assert_served_by(b, &plan, "tasks_client_created");
    assert_cursor_in_index_range(b, &plan);
    let plan = s
        .explain(sql::DUE_DELIVERIES, &[int(1), int(10)])
        .await
        .unwrap();
    assert_served_by(b, &plan, "deliveries_due");
    s.close().await;
}

/// The tasks due for dispatch, read through a claim that takes none of them.
async fn due_dispatches(s: &Store) -> Vec<kling_relay::storage::DispatchCandidate> {
    let mut seen = Vec::new();
    let claimed = s
        .claim_dispatches(i64::MAX, 10, i64::MAX, false, |_, _, due| {
            seen = due;
            Vec::new()
        })
        .await
        .unwrap();
    assert!(claimed.is_empty());
    seen
}

async fn final_tasks_leave_the_work_indexes(b: Backend) {
    let db = TestDb::new(b).await;
    let s = open_store(&db).await;
    let r = task_record(1);
    s.insert_task(r.clone(), None, CAPS).await.unwrap();
    let due = due_dispatches(&s).await;
    assert_eq!(due.len(), 1);
    assert_eq!(
        (due[0].id.as_str(), due[0].n, due[0].in_doubt),
        (r.id.as_str(), 1, false)
    );
    let submitted = Change {
        status: TaskStatus::Submitted,
        upstream_status: None,
        bind_upstream_task_id: Some("u-1".into()),
        upstream_updated_at_ms: None,
        images: None,
        error: None,
        detail: None,
        final_unit_deduction: None,
    };
    assert!(s
        .commit_change(&Commit {
            poll_due_at_ms: Some(20),
            ..commit(&r.id, 0, &submitted, EventSource::Dispatch, 10)
        })
        .await
        .unwrap());
    assert!(due_dispatches(&s).await.is_empty());
    assert_eq!(s.due_polls(20, 10).await.unwrap().len(), 1);
    assert!(s.due_polls(19, 10).await.unwrap().is_empty(), "not due yet");

    // A change decided on a stale version does not commit.
    let done = Change {
        status: TaskStatus::Succeeded,
        ..submitted.clone()
    };
    assert!(!s
        .commit_change(&commit(&r.id, 0, &done, EventSource::Webhook, 30))
        .await
        .unwrap());
    assert!(s
        .commit_change(&commit(&r.id, 1, &done, EventSource::Webhook, 30))
        .await
        .unwrap());
    assert!(s.due_polls(i64::MAX, 10).await.unwrap().is_empty());
    assert!(s.expired_open_tasks(i64::MAX, 10).await.unwrap().is_empty());
    let t = s.get_task(&r.id).await.unwrap().unwrap();
    assert_eq!(t.status, TaskStatus::Succeeded);
    assert_eq!(t.upstream_task_id.as_deref(), Some("u-1"));
    assert_eq!(t.completed_at_ms, Some(30));
    assert_eq!(
        t.client.as_deref(),
        Some("c1"),
        "owner stored with the task"
    );
    assert_eq!(s.events(&r.id).await.unwrap().len(), 3);
    s.close().await;
}

async fn a_claim_defeats_a_cancel_decided_before_it(b: Backend) {
    let db = TestDb::new(b).await;
    let s = open_store(&db).await;
    let r = task_record(7);
    s.insert_task(r.clone(), None, CAPS).await.unwrap();
    let before = s.get_task(&r.id).await.unwrap().unwrap();
    // The dispatcher claims the task (its create call may now reach upstream)...
    let claimed = s
        .claim_dispatches(i64::MAX / 2, 10, i64::MAX / 2 + 1, false, |_, _, due| {
            due.into_iter().map(|c| c.id).collect()
        })
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    // ...so a cancel decided on the version read before the claim must not commit.
    let Transition::Apply(cancel) = kling_relay::domain::cancel(&before.state()).unwrap() else {
        panic!("cancel applies to a waiting task")
    };
    let committed = s
        .commit_change(&commit(&r.id, before.version, &cancel, EventSource::Api, 1))
        .await
        .unwrap();
    assert!(!committed, "a claimed task was canceled");
    assert_eq!(
        s.get_task(&r.id).await.unwrap().unwrap().status,
        TaskStatus::Pending
    );
    s.close().await;
}

async fn the_generated_webhook_secret_is_kept(b: Backend) {
    let db = TestDb::new(b).await;
    let s = open_store(&db).await;
    assert_eq!(s.ensure_secret("k", "first").await.unwrap(), "first");
    assert_eq!(s.ensure_secret("k", "second").await.unwrap(), "first");
    s.close().await;
    let again = open_store(&db).await;
    assert_eq!(again.ensure_secret("k", "third").await.unwrap(), "first");
    again.close().await;
}

/// What the poller reads to time its polls: durations learned from the commits that take a task
/// out of pending and finish it (upstream's clock when it gave both ends), the running tasks,
/// whether work waits, and polls brought forward only where that makes them sooner. The input
/// images go with the commit that leaves pending.
async fn the_poller_learns_durations_and_brings_polls_forward(b: Backend) {
    let db = TestDb::new(b).await;
    let s = open_store(&db).await;
    let t0 = 1_700_000_000_000;
    let r = task_record(1);
    s.insert_task(r.clone(), None, CAPS).await.unwrap();
    assert!(
        s.dispatch_backlog(t0 + 10).await.unwrap(),
        "a due pending task waits"
    );
    assert!(!s.dispatch_backlog(t0 - 10).await.unwrap(), "not due yet");
    let submitted = Change {
        status: TaskStatus::Submitted,
        upstream_status: None,
        bind_upstream_task_id: Some("u-1".into()),
        upstream_updated_at_ms: Some(500_000),
        images: None,
        error: None,
        detail: None,
        final_unit_deduction: None,
    };
    let commit = |change, version, now, due, leaves| Commit {
        poll_due_at_ms: due,
        leaves_pending: leaves,
        ..commit(&r.id, version, change, EventSource::Poll, now)
    };
    assert!(s
        .commit_change(&commit(&submitted, 0, t0 + 1_000, Some(t0 + 100_000), true))
        .await
        .unwrap());
    assert!(!s.dispatch_backlog(t0 + 10).await.unwrap());
    let images_kept = db
        .count("SELECT COUNT(*) FROM task_inputs WHERE subject_images <> '[]'")
        .await;
    assert_eq!(images_kept, 0, "the images left with the task");
    let running = s.running_tasks().await.unwrap();
    assert_eq!(running.len(), 1);
    assert_eq!(
        (
            running[0].submitted_at_ms,
            running[0].poll_due_at_ms,
            running[0].n
        ),
        (t0 + 1_000, t0 + 100_000, 1)
    );
    let ids = vec![r.id.clone()];
    assert_eq!(s.bring_polls_forward(&ids, t0 + 5_000).await.unwrap(), 1);
    assert_eq!(
        s.bring_polls_forward(&ids, t0 + 9_000).await.unwrap(),
        0,
        "only sooner"
    );
    assert_eq!(s.next_poll_due().await.unwrap(), Some(t0 + 5_000));

    let done = Change {
        status: TaskStatus::Succeeded,
        upstream_updated_at_ms: Some(501_500),
        ..submitted.clone()
    };
    assert!(s
        .commit_change(&commit(&done, 1, t0 + 9_000, None, false))
        .await
        .unwrap());
    let learned = s.recent_durations(10).await.unwrap();
    assert_eq!(learned.len(), 1);
    assert_eq!(
        (learned[0].model.as_str(), learned[0].n, learned[0].ms),
        ("kling-v2", 1, 1_500),
        "upstream's own clock, not the 8 s we took to notice"
    );
    assert_eq!(s.next_poll_due().await.unwrap(), None);
}

/// The upstream query rate is one for every replica on the database: what one takes, another
/// cannot, and what one gives back, another can use.
async fn the_query_rate_is_shared_by_every_replica(b: Backend) {
    let db = TestDb::new(b).await;
    let (a, other) = (open_store(&db).await, open_store(&db).await);
    let now = 1_700_000_000_000;
    // 20 per second (50 ms apart), a quarter second's worth at once: 5.
    let take = |s: &'static str| {
        move |st: &kling_relay::storage::Store, at: i64| {
            let st = st.clone();
            async move {
                st.take_from_rate(s, at, 100, 50_000, 250_000)
                    .await
                    .unwrap()
                    .0
            }
        }
    };
    let q = take("q");
    assert_eq!(q(&a, now).await, 5);
    assert_eq!(q(&other, now).await, 0);
    assert_eq!(q(&other, now + 100).await, 2);
    a.give_back_to_rate("q", 1, 50_000).await.unwrap();
    assert_eq!(q(&other, now + 100).await, 1);
    assert_eq!(q(&a, now + 100).await, 0);
    // Another rate is another cell.
    assert_eq!(
        a.take_from_rate("r", now, 3, 50_000, 250_000)
            .await
            .unwrap()
            .0,
        3
    );
}

/// Group commit: one transaction, each change its own compare-and-set (two changes decided on
/// the same version: the first wins, the second loses and is not stored); a database error in
/// any change of the batch stores none of them.
async fn a_batch_of_changes_is_one_transaction_of_compare_and_sets(b: Backend) {
    let db = TestDb::new(b).await;
    let s = open_store(&db).await;
    let caps = PendingCaps {
        total: 100,
        per_client: 100,
    };
    let (a, c) = (task_record(1), task_record(2));
    s.insert_task(a.clone(), None, caps).await.unwrap();
    s.insert_task(c.clone(), None, caps).await.unwrap();
    let to = |status, upstream: &str| Change {
        status,
        upstream_status: None,
        bind_upstream_task_id: Some(upstream.into()),
        upstream_updated_at_ms: None,
        images: None,
        error: None,
        detail: None,
        final_unit_deduction: None,
    };
    let (sub_a, proc_a, sub_c) = (
        to(TaskStatus::Submitted, "u-a"),
        to(TaskStatus::Processing, "u-a2"),
        to(TaskStatus::Submitted, "u-c"),
    );
    let commit = |id: &'static str, change, outbox| Commit {
        outbox,
        leaves_pending: true,
        ..commit(id, 0, change, EventSource::Webhook, 10)
    };
    let (ida, idc): (&'static str, &'static str) = (
        Box::leak(a.id.clone().into_boxed_str()),
        Box::leak(c.id.clone().into_boxed_str()),
    );
    let won = s
        .commit_changes(&[
            commit(ida, &sub_a, None),
            commit(ida, &proc_a, None),
            commit(idc, &sub_c, None),
        ])
        .await
        .unwrap();
    assert_eq!(won, vec![true, false, true]);
    let ta = s.get_task(ida).await.unwrap().unwrap();
    assert_eq!((ta.status, ta.version), (TaskStatus::Submitted, 1));
    assert_eq!(ta.upstream_task_id.as_deref(), Some("u-a"));
    assert_eq!(s.events(ida).await.unwrap().len(), 2, "accepted, submitted");

    // The same notification id twice breaks the batch: neither change is stored.
    let note = kling_relay::storage::OutboxEntry {
        id: "msg_same".into(),
        client: "c1".into(),
        url: "http://127.0.0.1:9/hook".into(),
        payload: "{}".into(),
    };
    let done = to(TaskStatus::Succeeded, "u-a");
    let mut first = commit(ida, &done, Some(&note));
    first.expected_version = 1;
    let mut second = commit(idc, &done, Some(&note));
    second.expected_version = 1;
    assert!(s.commit_changes(&[first, second]).await.is_err());
    for id in [ida, idc] {
        let t = s.get_task(id).await.unwrap().unwrap();
        assert_eq!(
            t.status,
            TaskStatus::Submitted,
            "nothing of the batch stored"
        );
    }
    assert_eq!(db.count("SELECT COUNT(*) FROM deliveries").await, 0);
}

/// Through the group-commit writer: a change the database refuses fails only its own caller,
/// whether or not it shared a batch with others (they are then committed one by one).
async fn a_refused_change_fails_only_its_caller(b: Backend) {
    use kling_relay::service::group_commit::{GroupCommit, OwnedCommit};
    let db = TestDb::new(b).await;
    let s = open_store(&db).await;
    let caps = PendingCaps {
        total: 100,
        per_client: 100,
    };
    let writer = std::sync::Arc::new(GroupCommit::start(
        s.clone(),
        1,
        256,
        std::time::Duration::from_millis(50),
    ));
    let mut jobs = Vec::new();
    for i in 0..3 {
        let r = task_record(i);
        s.insert_task(r.clone(), None, caps).await.unwrap();
        // The first two carry the same notification id: one of them must be refused.
        let outbox = kling_relay::storage::OutboxEntry {
            id: if i < 2 {
                "msg_dup".into()
            } else {
                "msg_other".into()
            },
            client: "c1".into(),
            url: "http://127.0.0.1:9/hook".into(),
            payload: "{}".into(),
        };
        let commit = OwnedCommit {
            id: r.id.clone(),
            expected_version: 0,
            change: Change {
                status: TaskStatus::Submitted,
                upstream_status: None,
                bind_upstream_task_id: Some(format!("u-{i}")),
                upstream_updated_at_ms: None,
                images: None,
                error: None,
                detail: None,
                final_unit_deduction: None,
            },
            source: EventSource::Webhook,
            now_ms: 10,
            poll_due_at_ms: None,
            outbox: Some(outbox),
            archive: false,
            upstream_payload: None,
            leaves_pending: true,
            urgent: false,
            decided_on: None,
        };
        let w = writer.clone();
        jobs.push(tokio::spawn(async move { w.commit(commit).await }));
    }
    let mut outcomes = Vec::new();
    for j in jobs {
        outcomes.push(j.await.unwrap());
    }
    let refused = outcomes.iter().filter(|o| o.is_err()).count();
    let won = outcomes.iter().filter(|o| matches!(o, Ok(true))).count();
    assert_eq!((won, refused), (2, 1), "{outcomes:?}");
    assert_eq!(db.count("SELECT COUNT(*) FROM deliveries").await, 2);
    assert_eq!(
        db.count("SELECT COUNT(*) FROM tasks WHERE status = 'submitted'")
            .await,
        2
    );
}

/// A batch stores, for each change that wins, everything it carries, as a change alone would:
/// its event (detail and upstream payload), its notification (not to a URL the client
/// disabled), the input images of a task leaving `pending` (dropped), archive rows and usage
/// for a success, the upstream id; a task's second change in the batch is decided again.
/// Postgres runs one statement per round of rows and SQLite one per row, so both are checked.
async fn a_batch_stores_what_each_change_carries(b: Backend) {
    stores_what_each_change_carries(b, false).await;
}

/// The same batch, less the task's second change (so one round), with every change carrying
/// the row it was decided on: Postgres commits it as one statement (`commits::whole`), which
/// works out archive rows, usage and feed beforehand and must keep only the won changes'.
async fn a_batch_decided_on_read_rows_stores_the_same(b: Backend) {
    stores_what_each_change_carries(b, true).await;
}

async fn stores_what_each_change_carries(b: Backend, decided: bool) {
    use kling_relay::domain::{ResultImage, UpstreamStatus};
    use kling_relay::storage::DecidedOn;
    let db = TestDb::new(b).await;
    let s = open_store(&db).await;
    let records: Vec<_> = (0..4).map(task_record).collect();
    for r in &records {
        s.insert_task(r.clone(), None, CAPS).await.unwrap();
    }
    let ids: Vec<&'static str> = records
        .iter()
        .map(|r| &*Box::leak(r.id.clone().into_boxed_str()))
        .collect();
    db.exec("INSERT INTO disabled_urls (client, url, disabled_at) VALUES ('c1', 'http://127.0.0.1:9/off', 1)")
        .await;
    let note = |id: &str, url: &str| kling_relay::storage::OutboxEntry {
        id: format!("msg_{id}"),
        client: "c1".into(),
        url: url.into(),
        payload: format!("{{\"task\":\"{id}\"}}"),
    };
    let (on, off) = (
        note("a", "http://127.0.0.1:9/on"),
        note("b", "http://127.0.0.1:9/off"),
    );
    let submitted = Change {
        status: TaskStatus::Submitted,
        upstream_status: Some(UpstreamStatus::Submitted),
        bind_upstream_task_id: Some("u-0".into()),
        upstream_updated_at_ms: Some(5),
        images: None,
        error: None,
        detail: Some("sent".into()),
        final_unit_deduction: None,
    };
    let succeeded = Change {
        status: TaskStatus::Succeeded,
        upstream_status: Some(UpstreamStatus::Succeed),
        bind_upstream_task_id: Some("u-1".into()),
        upstream_updated_at_ms: Some(9),
        images: Some(vec![
            ResultImage {
                index: 0,
                url: "https://cdn.example/0.png".into(),
            },
            ResultImage {
                index: 1,
                url: "https://cdn.example/1.png".into(),
            },
        ]),
        error: None,
        detail: None,
        final_unit_deduction: Some("2".into()),
    };
    let failed = Change {
        status: TaskStatus::Failed,
        error: Some(kling_relay::domain::TaskError::new("upstream_failed", "no")),
        images: None,
        final_unit_deduction: None,
        bind_upstream_task_id: Some("u-2".into()),
        ..succeeded.clone()
    };
    let mut read = Vec::new();
    for id in &ids {
        read.push(DecidedOn::of(&s.get_task(id).await.unwrap().unwrap()));
    }
    let batch = [
        Commit {
            outbox: Some(&on),
            leaves_pending: true,
            upstream_payload: Some("{\"task_status\":\"submitted\"}"),
            poll_due_at_ms: Some(1_000),
            ..commit(ids[0], 0, &submitted, EventSource::Dispatch, 100)
        },
        Commit {
            outbox: Some(&off),
            archive: true,
            leaves_pending: true,
            ..commit(ids[1], 0, &succeeded, EventSource::Webhook, 100)
        },
        // Decided on the same version as the change before it: loses.
        commit(ids[1], 0, &failed, EventSource::Poll, 100),
        Commit {
            leaves_pending: true,
            ..commit(ids[2], 0, &failed, EventSource::Poll, 100)
        },
        // A stale version: loses, stores nothing.
        Commit {
            archive: true,
            ..commit(ids[3], 7, &succeeded, EventSource::Dispatch, 100)
        },
    ];
    let won = if decided {
        let task_of = [0, 1, 1, 2, 3];
        let one_round: Vec<Commit> = batch
            .iter()
            .enumerate()
            .filter(|(k, _)| *k != 2)
            .map(|(k, c)| Commit {
                decided_on: Some(&read[task_of[k]]),
                ..*c
            })
            .collect();
        let won = s.commit_changes(&one_round).await.unwrap();
        assert_eq!(won, vec![true, true, true, false]);
        won
    } else {
        let won = s.commit_changes(&batch).await.unwrap();
        assert_eq!(won, vec![true, true, false, true, false]);
        won
    };
    assert!(!won.is_empty());

    let t0 = s.get_task(ids[0]).await.unwrap().unwrap();
    assert_eq!((t0.status, t0.version), (TaskStatus::Submitted, 1));
    assert_eq!(t0.upstream_task_id.as_deref(), Some("u-0"));
    let e0 = s.events(ids[0]).await.unwrap();
    let last = e0.last().unwrap();
    assert_eq!(
        (last.status.as_str(), last.detail.as_deref()),
        ("submitted", Some("sent"))
    );
    assert_eq!(
        last.upstream_payload.as_deref(),
        Some("{\"task_status\":\"submitted\"}")
    );
    let t1 = s.get_task(ids[1]).await.unwrap().unwrap();
    assert_eq!(t1.status, TaskStatus::Succeeded);
    assert_eq!(t1.images.len(), 2);
    assert_eq!(t1.final_unit_deduction.as_deref(), Some("2"));
    assert_eq!(
        s.events(ids[1]).await.unwrap().len(),
        2,
        "accepted, succeeded"
    );
    let t2 = s.get_task(ids[2]).await.unwrap().unwrap();
    assert_eq!(t2.status, TaskStatus::Failed);
    assert_eq!(
        t2.error.as_ref().map(|e| e.code.as_str()),
        Some("upstream_failed")
    );
    let t3 = s.get_task(ids[3]).await.unwrap().unwrap();
    assert_eq!((t3.status, t3.version), (TaskStatus::Pending, 0));
    assert_eq!(s.events(ids[3]).await.unwrap().len(), 1, "only accepted");

    // The notification to the disabled URL is not written; the other is.
    assert_eq!(db.count("SELECT COUNT(*) FROM deliveries").await, 1);
    assert_eq!(db.count("SELECT COUNT(*) FROM deliveries WHERE id = 'msg_a' AND event_status = 'submitted' AND state = 'pending'").await, 1);
    // The three tasks that left pending lost their input images; the stale one kept them.
    assert_eq!(
        db.count("SELECT COUNT(*) FROM task_inputs WHERE subject_images <> '[]'")
            .await,
        1
    );
    assert!(s
        .get_inputs(ids[3])
        .await
        .unwrap()
        .is_some_and(|i| i.subject_images.len() == 2));
    // The success's two images wait for the archive.
    assert_eq!(
        db.count("SELECT COUNT(*) FROM task_images WHERE state = 'pending'")
            .await,
        2
    );
    // Usage: one success of 2 units and one failure, each counted once.
    assert_eq!(
        db.count("SELECT CAST(COALESCE(SUM(tasks), 0) AS BIGINT) FROM usage_hourly")
            .await,
        2
    );
    assert_eq!(db.count("SELECT CAST(COALESCE(SUM(units_milli), 0) AS BIGINT) FROM usage_hourly WHERE status = 'succeeded'").await, 2000);
    assert_eq!(
        db.count("SELECT CAST(COALESCE(SUM(tasks), 0) AS BIGINT) FROM usage_durations")
            .await,
        2,
        "both ends reached upstream: their durations are counted"
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM usage_hourly WHERE status = 'failed' AND units_milli = 0")
            .await,
        1
    );
}

/// Reads of several tasks in one query: each found task once, unknown ids left out.
async fn tasks_are_read_together(b: Backend) {
    let db = TestDb::new(b).await;
    let s = open_store(&db).await;
    let (a, c) = (task_record(1), task_record(2));
    s.insert_task(a.clone(), None, CAPS).await.unwrap();
    s.insert_task(c.clone(), None, CAPS).await.unwrap();
    let mut got: Vec<String> = s
        .get_tasks(&[a.id.as_str(), "no-such-task", c.id.as_str()])
        .await
        .unwrap()
        .into_iter()
        .map(|(id, t)| {
            assert_eq!(t.unwrap().id, id);
            id
        })
        .collect();
    got.sort();
    let mut want = vec![a.id.clone(), c.id.clone()];
    want.sort();
    assert_eq!(got, want);
    assert!(s.get_tasks(&[]).await.unwrap().is_empty());
}

/// New tasks in one transaction (group commit for submits), each answered as it would be
/// alone, counting the tasks before it in the batch: a key taken twice goes to the first
/// (same request or not), the per-client and total pending caps and a client's daily budget
/// fill up mid-batch; only admitted tasks are stored, with their inputs and first event.
async fn a_batch_of_new_tasks_is_checked_task_by_task(b: Backend) {
    use kling_relay::storage::{IdempotencyClaim, InsertOutcome, NewTask};
    let db = TestDb::new(b).await;
    let s = open_store(&db).await;
    db.exec(
        "INSERT INTO clients (name, api_key_hash, api_key_prefix, signing_secret, created_at, \
         units_per_day) VALUES ('c2', 'hash', 'klr_x', 'secret', 1, 3)",
    )
    .await;
    let rec = |i: i64, client: &str, n: i64| {
        let mut r = task_record(i);
        r.client = Some(client.into());
        r.n = n;
        r
    };
    let key = |hash: &str| IdempotencyClaim {
        scope: "c1".into(),
        key: "k".into(),
        request_hash: hash.into(),
        expired_before_ms: 0,
    };
    let caps = PendingCaps {
        total: 5,
        per_client: 3,
    };
    let first = rec(1, "c1", 1);
    let mut tasks: Vec<NewTask> = [
        (first.clone(), Some(key("h1"))),
        (rec(2, "c1", 1), Some(key("h1"))),
        (rec(3, "c1", 1), Some(key("h2"))),
        (rec(4, "c1", 1), None),
        (rec(5, "c1", 1), None),
        (rec(6, "c1", 1), None),
        (rec(7, "c2", 2), None),
        (rec(8, "c2", 2), None),
        (rec(9, "c2", 1), None),
        (rec(10, "c3", 1), None),
    ]
    .into_iter()
    .map(|(r, k)| NewTask::new(r, k, caps).unwrap())
    .collect();
    let outcomes = s.insert_tasks(&mut tasks).await.unwrap();
    let existing = |same_request| InsertOutcome::Existing {
        task_id: first.id.clone(),
        same_request,
    };
    assert_eq!(
        outcomes[..7],
        [
            InsertOutcome::Inserted,
            existing(true),
            existing(false),
            InsertOutcome::Inserted,
            InsertOutcome::Inserted,
            InsertOutcome::QueueFull,
            InsertOutcome::Inserted,
        ]
    );
    assert!(
        matches!(&outcomes[7], InsertOutcome::OverBudget(st) if st.reserved_units == 2 && st.limit_units == 3),
        "{:?}",
        outcomes[7]
    );
    assert_eq!(
        outcomes[8..],
        [InsertOutcome::Inserted, InsertOutcome::QueueFull]
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM tasks WHERE status = 'pending'")
            .await,
        5
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM task_inputs").await, 5);
    assert_eq!(db.count("SELECT COUNT(*) FROM task_events").await, 5);
    assert_eq!(db.count("SELECT COUNT(*) FROM idempotency_keys").await, 1);
    let stored = s.get_inputs(tasks[0].id()).await.unwrap().unwrap();
    assert_eq!(
        stored.subject_images.len(),
        2,
        "the images are stored as sent"
    );
    // The key stays taken for later batches.
    let again = s
        .insert_task(rec(11, "c1", 1), Some(&key("h1")), caps)
        .await
        .unwrap();
    assert_eq!(again, existing(true));
}

/// A batch reads its idempotency keys and claims them with a statement for all of them: an
/// expired key is taken again, a live one answers with its task, a key is per scope, a key
/// twice in the batch goes to the first, and keys that need escaping in the statements' JSON
/// come back as they went in.
async fn a_batch_reads_and_claims_its_keys_together(b: Backend) {
    use kling_relay::storage::{IdempotencyClaim, InsertOutcome, NewTask};
    let db = TestDb::new(b).await;
    let s = open_store(&db).await;
    let caps = PendingCaps {
        total: 100,
        per_client: 100,
    };
    let key = |scope: &str, key: &str, hash: &str, expired_before_ms: i64| IdempotencyClaim {
        scope: scope.into(),
        key: key.into(),
        request_hash: hash.into(),
        expired_before_ms,
    };
    let t0 = 1_700_000_000_000;
    // Stored before: "old" at t0 + 1, "live" at t0 + 2.
    let (old, live) = (task_record(1), task_record(2));
    for (r, k) in [(&old, "old"), (&live, "live")] {
        let got = s
            .insert_task(r.clone(), Some(&key("c1", k, "h", 0)), caps)
            .await
            .unwrap();
        assert_eq!(got, InsertOutcome::Inserted);
    }
    // Keys taken before t0 + 2 have expired.
    let odd = "q\"uo'te\\ \u{e9}\n{\"s\":1}";
    let records: Vec<_> = (10..16).map(task_record).collect();
    let carried = [
        key("c1", "old", "h", t0 + 2),
        key("c1", "live", "other", t0 + 2),
        key("c2", "live", "h", t0 + 2),
        key("c1", "new", "h", t0 + 2),
        key("c1", "new", "h", t0 + 2),
        key("c1", odd, "h", t0 + 2),
    ];
    let mut tasks: Vec<NewTask> = records
        .iter()
        .zip(carried)
        .map(|(r, k)| NewTask::new(r.clone(), Some(k), caps).unwrap())
        .collect();
    let outcomes = s.insert_tasks(&mut tasks).await.unwrap();
    assert_eq!(
        outcomes,
        [
            InsertOutcome::Inserted,
            InsertOutcome::Existing {
                task_id: live.id.clone(),
                same_request: false
            },
            InsertOutcome::Inserted,
            InsertOutcome::Inserted,
            InsertOutcome::Existing {
                task_id: records[3].id.clone(),
                same_request: true
            },
            InsertOutcome::Inserted,
        ]
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM idempotency_keys").await,
        5,
        "old (taken again), live, c2's live, new, the odd one"
    );
    // Each key names its task in the next batch, the odd one included.
    for (k, task) in [
        ("old", &records[0]),
        (odd, &records[5]),
        ("new", &records[3]),
    ] {
        let again = s
            .insert_tasks(&mut [NewTask::new(
                task_record(20),
                Some(key("c1", k, "h", t0 + 2)),
                caps,
            )
            .unwrap()])
            .await
            .unwrap();
        assert_eq!(
            again,
            [InsertOutcome::Existing {
                task_id: task.id.clone(),
                same_request: true
            }],
            "{k}"
        );
    }
}

/// The pending caps are counted only when a batch could reach them. Between counts, the last
/// count plus what intake admitted since, on every replica (`intake_counts`), bounds the
/// waiting tasks; a task is still refused exactly at a cap, whichever replica admitted the
/// tasks that fill it, and a task that left `pending` frees its place.
async fn the_pending_caps_hold_between_counts_on_every_replica(b: Backend) {
    use kling_relay::storage::InsertOutcome::{Inserted, QueueFull};
    let db = TestDb::new(b).await;
    let here = open_store(&db).await;
    let other = open_store(&db).await;
    let caps = PendingCaps {
        total: 10,
        per_client: 8,
    };
    let rec = |i: i64, client: &str| {
        let mut r = task_record(i);
        r.client = Some(client.into());
        r
    };
    let insert = |s: &Store, i: i64, client: &'static str| {
        let s = s.clone();
        let r = rec(i, client);
        async move { s.insert_task(r, None, caps).await.expect("insert") }
    };
    for i in 0..4 {
        assert_eq!(insert(&here, i, "c1").await, Inserted);
    }
    assert_eq!(
        here.pending_counts_taken(),
        1,
        "after the first count, the bound stands in for it"
    );
    for i in 4..8 {
        assert_eq!(insert(&other, i, "c1").await, Inserted);
    }
    assert_eq!(
        insert(&here, 8, "c1").await,
        QueueFull,
        "c1's 8 waiting tasks fill its cap, 4 of them admitted by another replica"
    );
    assert_eq!(insert(&here, 9, "c2").await, Inserted);
    assert_eq!(insert(&here, 10, "c2").await, Inserted);
    assert_eq!(
        insert(&here, 11, "c2").await,
        QueueFull,
        "10 waiting fill the total"
    );
    db.exec("UPDATE tasks SET status = 'canceled' WHERE prompt = 'task 0'")
        .await;
    assert_eq!(insert(&here, 12, "c2").await, Inserted, "a place came free");
    assert_eq!(
        db.count("SELECT COUNT(*) FROM tasks WHERE status = 'pending'")
            .await,
        10
    );
    // Counted: the first, then c1 at its cap, c2's first, the total at its cap, and after it.
    assert_eq!(here.pending_counts_taken(), 5);
}

/// The largest batch the submit writer forms (`MAX_TASKS_PER_BATCH`, whatever
/// `database.group_commit_max_batch` says) fits each backend's limit on bound values, so it is
/// stored in one transaction rather than refused whole and retried task by task.
async fn the_largest_insert_batch_is_stored_at_once(b: Backend) {
    use kling_relay::service::group_commit::MAX_TASKS_PER_BATCH;
    use kling_relay::storage::{InsertOutcome, NewTask};
    let db = TestDb::new(b).await;
    let s = open_store(&db).await;
    let caps = PendingCaps {
        total: 100_000,
        per_client: 100_000,
    };
    let mut tasks: Vec<NewTask> = (0..MAX_TASKS_PER_BATCH as i64)
        .map(|i| NewTask::new(task_record(i), None, caps).expect("task"))
        .collect();
    let outcomes = s.insert_tasks(&mut tasks).await.expect("one batch");
    assert!(outcomes.iter().all(|o| *o == InsertOutcome::Inserted));
    assert_eq!(
        db.count("SELECT COUNT(*) FROM tasks").await,
        MAX_TASKS_PER_BATCH as i64
    );
}

/// A warmed pool holds every connection it may (open_store's pool: 4; on Postgres also the
/// keyed pool's one commit writer + 2 readers), and they stay open once given back, so the
/// first burst after a start does not wait for them.
async fn a_warmed_pool_holds_every_connection(b: Backend) {
    let db = TestDb::new(b).await;
    let s = open_store(&db).await;
    assert!(s.connections() < 4, "a pool connects as work needs it");
    s.warm_up().await.expect("warm up");
    let keyed = match b {
        Backend::Sqlite => 0,
        Backend::Postgres => 3,
    };
    assert_eq!(s.connections(), 4 + keyed);
}

on_both_backends!(
    the_largest_insert_batch_is_stored_at_once,
    the_pending_caps_hold_between_counts_on_every_replica,
    a_warmed_pool_holds_every_connection,
    a_batch_of_new_tasks_is_checked_task_by_task,
    a_batch_stores_what_each_change_carries,
    a_batch_decided_on_read_rows_stores_the_same,
    a_batch_reads_and_claims_its_keys_together,
    tasks_are_read_together,
    a_refused_change_fails_only_its_caller,
    a_batch_of_changes_is_one_transaction_of_compare_and_sets,
    the_query_rate_is_shared_by_every_replica,
    the_poller_learns_durations_and_brings_polls_forward,
    a_claim_defeats_a_cancel_decided_before_it,
    every_hot_query_is_served_by_an_index,
    final_tasks_leave_the_work_indexes,
    the_generated_webhook_secret_is_kept,
);

/// The keyed pool's statements are planned once per session, on the tables as they are then:
/// planned on a new, empty database, every one still reaches its rows through an index, so
/// none scans a whole table once it has grown (its statistics stale until autovacuum).
async fn the_keyed_statements_reach_rows_by_index_even_planned_on_empty_tables(b: Backend) {
    let db = TestDb::new(b).await;
    let s = open_store(&db).await;
    let plans = s.keyed_plans().await.expect("plans");
    assert_eq!(
        plans.len(),
        25,
        "the read, four rounds, four after-statements, sixteen whole batches"
    );
    let read = plans[0].1.join("\n");
    assert!(
        read.contains("ANY ($1)"),
        "one plan for any ids (a generic plan), not one for the ids at hand:\n{read}"
    );
    for (name, plan) in &plans {
        let text = plan.join("\n");
        assert!(!text.contains("Seq Scan"), "{name} scans a table:\n{text}");
    }
}

/// A burst of submits refreshes the planner's statistics of `tasks` once the first few are in
/// and again at every doubling, rather than waiting a minute for autovacuum, in which the
/// dispatch claim read every pending task.
async fn a_growing_intake_refreshes_the_planners_statistics(b: Backend) {
    use kling_relay::service::group_commit::GroupInsert;
    use kling_relay::storage::NewTask;
    let db = TestDb::new(b).await;
    let s = open_store(&db).await;
    let writer = std::sync::Arc::new(GroupInsert::start_refreshing_statistics_after(
        s.clone(),
        256,
        std::time::Duration::ZERO,
        4,
    ));
    let caps = PendingCaps {
        total: 1000,
        per_client: 1000,
    };
    let analyses =
        || db.count("SELECT analyze_count FROM pg_stat_user_tables WHERE relname = 'tasks'");
    let insert = |from: i64, to: i64| {
        let writer = writer.clone();
        async move {
            for i in from..to {
                let task = NewTask::new(task_record(i), None, caps).unwrap();
                writer.insert(task).await.unwrap();
            }
        }
    };
    insert(0, 3).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(analyses().await, 0, "refreshed before the first 4 submits");
    insert(3, 4).await;
    let wait_for = |n: i64| async move {
        for _ in 0..100 {
            if analyses().await >= n {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("no {n}th refresh of the statistics");
    };
    wait_for(1).await;
    insert(4, 7).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        analyses().await,
        1,
        "refreshed again before the count doubled"
    );
    insert(7, 8).await;
    wait_for(2).await;
}

on_postgres!(
    postgres_only;
    the_keyed_statements_reach_rows_by_index_even_planned_on_empty_tables,
    a_growing_intake_refreshes_the_planners_statistics,
);
