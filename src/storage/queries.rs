//! The read queries behind history and background work, public so tests can check their plans.
//! (`storage::sql` is this module.)

/// Recent succeeded tasks' durations (upstream's clock when known), newest first.
pub const RECENT_DURATIONS: &str = "SELECT model_name, n, \
            CASE WHEN upstream_started_at IS NOT NULL AND upstream_updated_at IS NOT NULL \
                 THEN upstream_updated_at - upstream_started_at \
                 ELSE completed_at - submitted_at END \
            FROM tasks WHERE status = 'succeeded' AND submitted_at IS NOT NULL \
            ORDER BY created_at DESC LIMIT $1";
/// Running tasks: their polls are scheduled.
pub const RUNNING_TASKS: &str = "SELECT id, model_name, n, submitted_at, poll_due_at FROM tasks \
        WHERE poll_due_at IS NOT NULL AND submitted_at IS NOT NULL";
/// Whether a pending task is due for dispatch.
pub const DISPATCH_BACKLOG: &str = "SELECT EXISTS (SELECT 1 FROM tasks \
    WHERE next_dispatch_at IS NOT NULL AND next_dispatch_at <= $1 AND status = 'pending')";
/// The earliest scheduled poll.
pub const NEXT_POLL_DUE: &str = "SELECT MIN(poll_due_at) FROM tasks WHERE poll_due_at IS NOT NULL";
/// A task's timeline, oldest first.
pub const EVENTS: &str = "SELECT at, source, status, upstream_status, detail, upstream_payload \
        FROM task_events \
        WHERE task_id = $1 ORDER BY id";
/// A client's waiting tasks in dispatch order: priority, then due time, then id. On Postgres
/// the priority's rank is also an expression of `tasks_dispatch_by_client` (migration 0017),
/// which `DUE_DISPATCHES_PG` reads only as long as the two say the same.
macro_rules! dispatch_order {
    () => {
        "CASE priority WHEN 'high' THEN 0 WHEN 'normal' THEN 1 ELSE 2 END, next_dispatch_at, id"
    };
}
/// Pending tasks whose dispatch is due, most overdue first.
pub const DUE_DISPATCHES: &str = concat!(
    "SELECT id, n, created_at, dispatch_started_at, client, \
        priority FROM (SELECT id, n, created_at, dispatch_started_at, \
        COALESCE(client, '') AS client, priority, ROW_NUMBER() OVER (PARTITION BY client \
        ORDER BY ",
    dispatch_order!(),
    ") AS place FROM tasks WHERE next_dispatch_at IS NOT NULL \
        AND next_dispatch_at <= $1) AS due WHERE place <= $2"
);
/// Postgres: [`DUE_DISPATCHES`] without reading the whole backlog. The clients with due work are
/// found by skipping through `tasks_dispatch_by_client` (one index probe per client), then each
/// client's first `$2` in dispatch order are that index's first entries for it. The window query
/// read and sorted every due task on every pass: with thousands waiting, the dispatcher spent
/// its time sorting them (SQLite keeps it; its passes run in-process).
pub const DUE_DISPATCHES_PG: &str = concat!(
    "WITH RECURSIVE due_clients (client) AS (\
        (SELECT COALESCE(client, '') FROM tasks \
        WHERE next_dispatch_at IS NOT NULL AND next_dispatch_at <= $1 \
        ORDER BY COALESCE(client, '') LIMIT 1) \
        UNION ALL SELECT (SELECT COALESCE(t.client, '') FROM tasks t \
        WHERE t.next_dispatch_at IS NOT NULL AND t.next_dispatch_at <= $1 \
        AND COALESCE(t.client, '') > d.client ORDER BY COALESCE(t.client, '') LIMIT 1) \
        FROM due_clients d WHERE d.client IS NOT NULL) \
    SELECT t.id, t.n, t.created_at, t.dispatch_started_at, d.client, t.priority \
    FROM due_clients d CROSS JOIN LATERAL (SELECT id, n, created_at, dispatch_started_at, \
        priority FROM tasks WHERE COALESCE(client, '') = d.client \
        AND next_dispatch_at IS NOT NULL AND next_dispatch_at <= $1 \
        ORDER BY ",
    dispatch_order!(),
    " LIMIT $2) AS t WHERE d.client IS NOT NULL"
);
/// The `held` rows of [`ACCOUNT_SHARES`]: tasks holding units upstream, in flight or possibly
/// in flight. One statement, so no task is missed or counted twice when another replica's
/// commit moves it between the two kinds.
macro_rules! holding_units {
    () => {
        "SELECT 'held' AS kind, COALESCE(client, '') AS name, n AS a, \
        COALESCE(submitted_at, created_at) AS b, CAST(NULL AS BIGINT) AS c, \
        CAST(NULL AS BIGINT) AS d, CAST(NULL AS BIGINT) AS e, CAST(NULL AS BIGINT) AS f, \
        id AS task FROM tasks WHERE status IN ('submitted', 'processing') \
        UNION ALL SELECT 'held', COALESCE(client, ''), n, dispatch_started_at, \
        NULL, NULL, NULL, NULL, id FROM tasks \
        WHERE dispatch_started_at IS NOT NULL AND status = 'pending'"
    };
}
/// The part of [`ACCOUNT_SHARES`] that reads tasks (the rest reads tables of a row per client).
pub const HOLDING_UNITS: &str = holding_units!();
/// Everything the dispatch claim reads about the account, as rows of one statement (a round
/// trip each cost a tenth of a claim), `kind` first:
/// - `held`: a task holding units upstream (`name` its client, `a` its `n`, `b` when its
///   dispatch began, `task` its id), see [`HOLDING_UNITS`];
/// - `client`: `name`, `a` weight, `b` cap in units;
/// - `pass`: fair share's pass of client `name` in `a`; `clock`: the virtual time in `a`;
/// - `state`: what admission has learnt, `a` to `f` as in `admission_state`.
pub const ACCOUNT_SHARES: &str = concat!(
    holding_units!(),
    " UNION ALL SELECT 'client', name, weight, max_units, NULL, NULL, NULL, NULL, NULL \
    FROM clients \
    UNION ALL SELECT 'pass', client, pass, NULL, NULL, NULL, NULL, NULL, NULL FROM fair_passes \
    UNION ALL SELECT 'clock', '', virtual_time, NULL, NULL, NULL, NULL, NULL, NULL \
    FROM fair_clock WHERE id = 1 \
    UNION ALL SELECT 'state', '', working_limit, paused_until, busy_streak, finished_units, \
    refused_at, last_refused_at, NULL FROM admission_state WHERE account = 'default'"
);
/// Tasks upstream holds whose next poll is due. Only rows with `poll_due_at` set (submitted or
/// processing) are in `tasks_poll_due`, so final tasks are never read.
pub const DUE_POLLS: &str =
    "SELECT id, upstream_task_id, external_task_id, created_at, poll_count \
        FROM tasks WHERE poll_due_at IS NOT NULL AND poll_due_at <= $1 \
        ORDER BY poll_due_at LIMIT $2";
/// Units our tasks may hold upstream: those upstream has (`submitted`, `processing`) plus
/// pending tasks whose create may have landed. One statement, so both sums come from one
/// snapshot: read apart, a task moving from in doubt to submitted between them (another
/// replica's commit) would be counted in neither, and the budget overspent.
pub const UNITS_IN_FLIGHT: &str = "SELECT \
    (SELECT CAST(COALESCE(SUM(n), 0) AS BIGINT) FROM tasks \
        WHERE status IN ('submitted', 'processing')) + \
    (SELECT CAST(COALESCE(SUM(n), 0) AS BIGINT) FROM tasks \
        WHERE dispatch_started_at IS NOT NULL AND status = 'pending')";
/// Notifications whose next attempt is due, oldest first.
pub const DUE_DELIVERIES: &str = "SELECT id, task_id, client, url, payload, attempts \
    FROM deliveries WHERE next_attempt_at IS NOT NULL AND next_attempt_at <= $1 \
    ORDER BY next_attempt_at LIMIT $2";
/// Open tasks per status (for metrics); final tasks are not read.
pub const OPEN_BY_STATUS: &str = "SELECT status, COUNT(*) FROM tasks \
    WHERE status IN ('pending', 'submitted', 'processing') GROUP BY status";
/// Tasks waiting for dispatch (the backpressure cap).
pub const PENDING_COUNT: &str = "SELECT COUNT(*) FROM tasks WHERE status = 'pending'";
/// Open tasks older than a cutoff. The predicate repeats the partial index's so both
/// planners use `tasks_open_by_age`.
pub const EXPIRED_OPEN: &str = "SELECT id FROM tasks \
        WHERE status IN ('pending', 'submitted', 'processing') AND created_at < $1 \
        ORDER BY created_at LIMIT $2";

/// The history query for a filter; parameters are bound in the order client, statuses, created_after,
/// created_before, cursor (created_at, id), limit.
pub fn list(f: &super::ListFilter) -> String {
    let mut sql = format!("SELECT {} FROM tasks WHERE 1 = 1", super::TASK_COLUMNS);
    let mut n = 0;
    let mut next = || {
        n += 1;
        format!("${n}")
    };
    if f.client.is_some() {
        sql.push_str(&format!(" AND client = {}", next()));
    }
    if !f.statuses.is_empty() {
        let marks: Vec<String> = f.statuses.iter().map(|_| next()).collect();
        sql.push_str(&format!(" AND status IN ({})", marks.join(", ")));
    }
    if f.created_after_ms.is_some() {
        sql.push_str(&format!(" AND created_at >= {}", next()));
    }
    if f.created_before_ms.is_some() {
        sql.push_str(&format!(" AND created_at < {}", next()));
    }
    if f.text.is_some() {
        let p = next();
        sql.push_str(&format!(
            " AND (LOWER(COALESCE(prompt, '')) LIKE {p} ESCAPE '\\' \
             OR LOWER(COALESCE(metadata, '')) LIKE {p} ESCAPE '\\')"
        ));
    }
    if f.before.is_some() {
        // A row-value comparison, not `a < x OR (a = x AND b < y)`: both planners turn it
        // into a range on the (…, created_at, id) index, so a deep page costs what the
        // first page costs instead of walking every newer row.
        let (a, b) = (next(), next());
        sql.push_str(&format!(" AND (created_at, id) < ({a}, {b})"));
    }
    sql.push_str(&format!(
        " ORDER BY created_at DESC, id DESC LIMIT {}",
        next()
    ));
    sql
}

/// A submit batch's idempotency keys (`intake/keys.rs`), given as one JSON array (`$1`) of
/// `{"s": scope, "k": key, …}`. Each drives from the array into the primary key: a statement
/// that scanned the keys (24 hours of every client's submits) per batch cost more than the
/// statement per key it replaced. SQLite's `CROSS JOIN` keeps the array the outer loop.
pub const EXPIRE_KEYS: &str = "DELETE FROM idempotency_keys WHERE (scope, key) IN \
    (SELECT k.scope, k.key FROM json_each($1) j CROSS JOIN idempotency_keys k \
    ON k.scope = j.value ->> 's' AND k.key = j.value ->> 'k' WHERE k.created_at < j.value ->> 'e')";
pub const READ_KEYS: &str = "SELECT k.scope, k.key, k.request_hash, k.task_id \
    FROM json_each($1) j CROSS JOIN idempotency_keys k \
    ON k.scope = j.value ->> 's' AND k.key = j.value ->> 'k'";
/// `WHERE true`: without it SQLite reads `ON CONFLICT` as a join constraint. `RETURNING`: the
/// backends share no way to count the rows a generic statement affected.
pub const CLAIM_KEYS: &str = "INSERT INTO idempotency_keys \
    (scope, key, request_hash, task_id, created_at) \
    SELECT j.value ->> 's', j.value ->> 'k', j.value ->> 'h', j.value ->> 't', j.value ->> 'c' \
    FROM json_each($1) j WHERE true ON CONFLICT (scope, key) DO NOTHING RETURNING key";
pub const EXPIRE_KEYS_PG: &str = "DELETE FROM idempotency_keys k \
    USING json_to_recordset($1::json) AS x(s text, k text, e int8) \
    WHERE k.scope = x.s AND k.key = x.k AND k.created_at < x.e";
pub const READ_KEYS_PG: &str = "SELECT k.scope, k.key, k.request_hash, k.task_id \
    FROM json_to_recordset($1::json) AS x(s text, k text) \
    JOIN idempotency_keys k ON k.scope = x.s AND k.key = x.k";
pub const CLAIM_KEYS_PG: &str = "INSERT INTO idempotency_keys \
    (scope, key, request_hash, task_id, created_at) SELECT x.s, x.k, x.h, x.t, x.c \
    FROM json_to_recordset($1::json) AS x(s text, k text, h text, t text, c int8) \
    ON CONFLICT (scope, key) DO NOTHING RETURNING key";
