//! Status changes: deciding a change on a snapshot and committing it (through the group
//! commit) as a compare-and-set with its notification; reports, polls, finishes, refusals,
//! cancels; and telling local waiters.

use super::*;

impl Relay {
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.changes.subscribe()
    }

    pub fn publish(&self, task_id: &str) {
        // No receivers is fine: nobody is waiting.
        let _ = self.changes.send(task_id.to_owned());
    }

    /// Wakes every waiter to re-read: changes may have been missed.
    pub fn publish_all(&self) {
        self.publish(EVERY_TASK);
    }

    /// Cancels a task that has not been sent upstream.
    pub async fn cancel(&self, caller: &Caller, id: &str) -> Result<Task, ServiceError> {
        self.get(caller, id).await?;
        self.decide_and_commit(id, EventSource::Api, None, |task| {
            cancel(&task.state()).map_err(ServiceError::CannotCancel)
        })
        .await?;
        self.get(caller, id).await
    }

    /// The notification a change produces: the task as it will be, to the task's own
    /// `notify_url` or else its client's default.
    async fn notification_for(
        &self,
        task: &Task,
        change: &crate::domain::Change,
        source: EventSource,
        now: i64,
    ) -> Result<Option<OutboxEntry>, ServiceError> {
        let Some(client) = &task.client else {
            return Ok(None);
        };
        let url = match &task.notify_url {
            Some(u) => u.clone(),
            None => match self.client_default_url(client, now).await? {
                Some(u) => u,
                None => return Ok(None),
            },
        };
        Ok(Some(OutboxEntry {
            id: format!("msg_{}", uuid::Uuid::now_v7().simple()),
            client: client.clone(),
            url,
            payload: crate::resource::task_json(task.after(change, source, now))
                .map_err(|e| StorageError::Corrupt(format!("task {} as JSON: {e}", task.id)))?,
        }))
    }

    pub(super) async fn client_default_url(
        &self,
        client: &str,
        now: i64,
    ) -> Result<Option<String>, ServiceError> {
        let cached = self
            .client_urls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(client)
            .filter(|(_, at)| now - at < ms(CLIENT_URL_TTL))
            .map(|(url, _)| url.clone());
        if let Some(url) = cached {
            return Ok(url);
        }
        let url = self
            .store
            .get_client(client)
            .await?
            .and_then(|c| c.notify_url);
        self.client_urls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(client.to_owned(), (url.clone(), now));
        Ok(url)
    }

    /// When a task that just moved to `status` should first be polled.
    fn poll_due_after_change(&self, status: TaskStatus, now: i64) -> Option<i64> {
        matches!(status, TaskStatus::Submitted | TaskStatus::Processing)
            .then(|| now + ms(self.settings.poller.first_poll_after))
    }

    /// Applies what upstream says about a task, whichever way it arrived.
    pub async fn apply_report(
        &self,
        id: &str,
        source: EventSource,
        report: &UpstreamReport,
    ) -> Result<ApplyOutcome, ServiceError> {
        self.decide_and_commit(id, source, report.raw.as_ref(), |task| {
            Ok(apply_report(&task.state(), report)?)
        })
        .await
    }

    /// A callback with a valid token whose upstream ids do not match the task: someone between
    /// upstream and us renamed something. Nothing is applied from it; the task is polled at
    /// once, so the truth comes from the query, and the timeline says why.
    pub async fn poll_after_mismatch(
        &self,
        id: &str,
        source: EventSource,
        mismatch: &ReportMismatch,
        raw: Option<&serde_json::Value>,
    ) -> Result<(), ServiceError> {
        let detail = format!("{mismatch}; polling upstream to settle the task");
        let payload = raw.map(capped_payload);
        self.store
            .note_and_poll_now(id, now_ms(), source, &detail, payload.as_deref())
            .await?;
        self.poll_wake.notify_one();
        self.publish(id);
        Ok(())
    }

    /// Ends a task with an error unless it is already final.
    pub async fn finish(
        &self,
        id: &str,
        source: EventSource,
        status: TaskStatus,
        error: TaskError,
    ) -> Result<ApplyOutcome, ServiceError> {
        self.decide_and_commit(id, source, None, |task| {
            Ok(finish_with_error(&task.state(), status, error.clone()))
        })
        .await
    }

    /// Ends a task upstream never took (its create was refused, or it could not be sent):
    /// failed, and recorded as costing nothing, since no upstream task was created to charge.
    pub async fn refuse(&self, id: &str, error: TaskError) -> Result<ApplyOutcome, ServiceError> {
        self.decide_and_commit(id, EventSource::Dispatch, None, |task| {
            Ok(
                match finish_with_error(&task.state(), TaskStatus::Failed, error.clone()) {
                    Transition::Apply(mut change) => {
                        change.final_unit_deduction = Some("0".into());
                        Transition::Apply(change)
                    }
                    ignore => ignore,
                },
            )
        })
        .await
    }

    async fn decide_and_commit(
        &self,
        id: &str,
        source: EventSource,
        upstream_payload: Option<&serde_json::Value>,
        decide: impl Fn(&Task) -> Result<Transition, ServiceError>,
    ) -> Result<ApplyOutcome, ServiceError> {
        // Written only with a change: most reports (duplicates, unchanged polls) are ignored.
        let mut payload_text: Option<String> = None;
        for _ in 0..MAX_CHANGE_ATTEMPTS {
            let task = self
                .group_read
                .get(id)
                .await?
                .ok_or(ServiceError::NotFound)?;
            let change = match decide(&task)? {
                Transition::Ignore(reason) => return Ok(ApplyOutcome::Ignored(reason)),
                Transition::Apply(change) => change,
            };
            if payload_text.is_none() {
                payload_text = upstream_payload.map(capped_payload);
            }
            let now = now_ms();
            let poll_due = self.poll_due_after_change(change.status, now);
            let outbox = self.notification_for(&task, &change, source, now).await?;
            let notifies = outbox.is_some();
            let frees_units = task.status.holds_upstream_units() && change.status.is_final();
            let urgent = frees_units && self.work_waiting();
            // Upstream freed the units when it reported the end: work waiting may take them
            // while this commit is still under way (the dispatch claim counts them free).
            let _finishing = urgent.then(|| {
                let mark = self.finishing(id);
                self.dispatch_wake.notify_one();
                mark
            });
            if self
                .group_commit
                .commit(OwnedCommit {
                    id: id.to_owned(),
                    expected_version: task.version,
                    change: change.clone(),
                    source,
                    now_ms: now,
                    poll_due_at_ms: poll_due,
                    outbox,
                    archive: self.settings.archive.enabled,
                    upstream_payload: payload_text.clone(),
                    leaves_pending: task.status == TaskStatus::Pending
                        && change.status != TaskStatus::Pending,
                    urgent,
                    decided_on: Some(DecidedOn::of(&task)),
                })
                .await?
            {
                if self.settings.archive.enabled && change.status == TaskStatus::Succeeded {
                    self.archive_wake.notify_one();
                }
                if frees_units && !urgent {
                    // Pending work may fit now: wake dispatch before the bookkeeping below (a
                    // budget read, a regrowth step), which the next pass does not need. An
                    // urgent change woke it before its commit.
                    self.dispatch_wake.notify_one();
                }
                tracing::info!(task_id = %id, source = source.as_str(), status = %change.status, "task status changed");
                metrics::counter!("klr_task_status_changes_total", "status" => change.status.as_str(), "source" => source.as_str()).increment(1);
                if change.status.is_final() {
                    self.on_task_ended(&task, &change).await;
                }
                if frees_units
                    && matches!(change.status, TaskStatus::Succeeded | TaskStatus::Failed)
                    && self.admission_finished(task.n).await
                {
                    // The working limit grew: the pass woken above may have missed it.
                    self.dispatch_wake.notify_one();
                }
                if notifies {
                    self.notify_wake.notify_one();
                }
                self.publish(id);
                return Ok(ApplyOutcome::Applied(change.status));
            }
        }
        Err(ServiceError::Contended)
    }
}
