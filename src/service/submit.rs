//! Submitting a task: the client's submit budget, the request-body budget, validation, and the
//! durable insert (idempotency, queue and budget checks) before anything is acknowledged.

use super::*;

impl Relay {
    /// One submit from `client`'s `limits.client_submits_per_minute`. On Postgres the budget is
    /// a rate in the database, shared by every replica (a minute's worth at most at once, as
    /// here); SQLite has a single instance, whose memory is the whole truth.
    async fn take_submit_budget(&self, client: &str) -> Result<(), ServiceError> {
        let per_minute = self.settings.limits.client_submits_per_minute;
        if self.store.backend() == "postgres" {
            const MINUTE_US: i64 = 60_000_000;
            // A second's worth is taken from the shared cell at a time and spent here, so
            // a busy client costs the database one row lock per batch, not per submit; what a
            // batch leaves unspent lapses after a second.
            // Held across the refill, so concurrent submits do not each take a batch (and burn
            // the client's minute between them).
            let mut stash = self.submit_stash.lock().await;
            let now = now_ms();
            if let Some((left, taken_at)) = stash.get_mut(client) {
                if *left > 0 && now - *taken_at < 1000 {
                    *left -= 1;
                    return Ok(());
                }
            }
            let every = MINUTE_US / i64::from(per_minute.max(1));
            let batch = i64::from(per_minute / 60).clamp(1, 50);
            let (granted, wait_us) = self
                .store
                .take_from_rate(&format!("submits:{client}"), now, batch, every, MINUTE_US)
                .await?;
            if granted == 0 {
                let secs = u64::try_from((wait_us + 999_999) / 1_000_000).unwrap_or(1);
                return Err(ServiceError::RateLimited(secs.max(1)));
            }
            stash.insert(client.to_owned(), (granted - 1, now));
            return Ok(());
        }
        let mut budgets = self
            .submit_budgets
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let budget = budgets
            .entry(client.to_owned())
            .or_insert_with(|| SubmitBudget::new(per_minute));
        budget
            .take(now_ms())
            .map_err(|wait| ServiceError::RateLimited(wait.as_secs().max(1)))
    }

    /// Refuses a notify URL whose host is an address the policy forbids (names are checked
    /// when the notification is sent, against what they resolve to).
    fn check_destination_literal(&self, url: &str) -> Result<(), String> {
        let Ok(u) = url::Url::parse(url) else {
            return Err("must be an absolute http or https URL".into());
        };
        self.network_policy.check_url_host(&u)
    }

    /// The byte-budget share of dispatching a stored task: its Base64 inputs are read back and
    /// written into the create call, which costs memory like a submit of them.
    pub async fn reserve_dispatch_bytes(
        &self,
        id: &str,
    ) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, ServiceError> {
        let Some(summary) = self.store.input_summary(id).await? else {
            return Ok(None);
        };
        Ok(self
            .reserve_body_bytes(crate::domain::base64_len(&summary))
            .await)
    }

    /// Waits until a request body of `bytes` fits the budget of large bodies in memory at once;
    /// the budget is taken back when the returned permit drops. A Base64 image costs memory a
    /// few times over while it is parsed, checked and stored, so large submits take turns.
    pub async fn reserve_body_bytes(
        &self,
        bytes: usize,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if bytes <= SMALL_BODY_BYTES {
            return None;
        }
        let most = self.settings.server.max_concurrent_body_bytes;
        let n = u32::try_from(bytes.min(most)).unwrap_or(u32::MAX);
        self.body_budget.clone().acquire_many_owned(n).await.ok()
    }

    /// Validates and durably stores a task, then gives the dispatcher up to `dispatch.wait` to
    /// send it upstream, so the usual answer already says `submitted`. With an idempotency key
    /// (scoped to the caller), a repeat of the same request returns the first task instead.
    pub async fn submit(
        &self,
        caller: &Caller,
        body: serde_json::Value,
        idempotency_key: Option<&str>,
        request_id: Option<&str>,
        max_wait: Option<Duration>,
        body_budget: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Result<Submitted, ServiceError> {
        let wire = self.upstream.wire();
        let rules = Rules::api(wire.subject_images, &wire.default_model, &wire.models);
        let req = validate_new_task(&body, rules).map_err(ServiceError::Invalid)?;
        // serde_json orders object keys, so equal JSON hashes equal; hashed as it is written out,
        // so an 80 MB body is not copied into a string for it.
        let request_hash = idempotency_key.map(|_| json_sha256(&body));
        drop(body);
        if let Some(url) = &req.notify_url {
            self.check_destination_literal(url).map_err(|m| {
                ServiceError::Invalid(vec![FieldError {
                    field: "notify_url".into(),
                    message: m,
                }])
            })?;
        }
        if let Caller::Client(name) = caller {
            self.take_submit_budget(name).await?;
        }
        let id = uuid::Uuid::now_v7().to_string();
        let now = now_ms();
        let record = NewTaskRecord {
            external_task_id: format!("klr-{id}"),
            id: id.clone(),
            model_name: req.model_name,
            prompt: req.prompt,
            n: i64::from(req.n),
            aspect_ratio: req.aspect_ratio,
            priority: req.priority,
            metadata: req.metadata.map(serde_json::Value::Object),
            inputs: TaskInputs {
                subject_images: req.subject_images,
                scene_image: req.scene_image,
                style_image: req.style_image,
                negative_prompt: req.negative_prompt,
                watermark_info: req.watermark_info,
            },
            created_at_ms: now,
            client: caller.scope().map(str::to_owned),
            notify_url: req.notify_url,
            request_id: request_id.map(str::to_owned),
        };
        let claim = idempotency_key
            .zip(request_hash)
            .map(|(key, request_hash)| IdempotencyClaim {
                // Keys are the caller's own: two clients may use the same key.
                scope: caller.scope().unwrap_or("").to_owned(),
                key: key.to_owned(),
                request_hash,
                expired_before_ms: now - ms(IDEMPOTENCY_TTL),
            });
        let mut changes = self.subscribe();
        let caps = PendingCaps {
            total: self.settings.dispatch.max_pending,
            per_client: self.settings.limits.client_max_pending,
        };
        let record_n = record.n;
        let wait = max_wait.map_or(self.settings.dispatch.wait, |w| {
            w.min(self.settings.dispatch.wait)
        });
        // Answering without waiting, the task is as the commit stored it: no read needed.
        let as_stored = wait.is_zero().then(|| accepted_task(&record));
        let inserted = self
            .group_insert
            .insert(crate::storage::NewTask::new(record, claim, caps)?)
            .await?;
        drop(body_budget);
        match inserted {
            InsertOutcome::Inserted => {}
            InsertOutcome::QueueFull => return Err(ServiceError::QueueFull),
            InsertOutcome::OverBudget(standing) => {
                return Err(ServiceError::BudgetExceeded {
                    standing,
                    requested: record_n,
                })
            }
            InsertOutcome::Existing {
                task_id,
                same_request: true,
            } => {
                return Ok(Submitted {
                    task: self.get(caller, &task_id).await?,
                    created: false,
                })
            }
            InsertOutcome::Existing { .. } => return Err(ServiceError::IdempotencyConflict),
        }
        if !self.units_full() {
            self.dispatch_wake.notify_one();
        }
        if let Some(task) = as_stored {
            return Ok(Submitted {
                task,
                created: true,
            });
        }
        // The caller may ask to wait less (`Prefer: respond-async` or `wait=`): the task is
        // stored either way, and the answer then shows it as it is.
        let _ = tokio::time::timeout(wait, async {
            loop {
                match changes.recv().await {
                    Ok(changed) if changed == id => return,
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        })
        .await;
        Ok(Submitted {
            task: self.get(caller, &id).await?,
            created: true,
        })
    }
}

/// A new task as its insert stores it: `pending`, version 0, nothing learnt yet (the columns'
/// defaults in the migrations).
fn accepted_task(r: &NewTaskRecord) -> Task {
    Task {
        id: r.id.clone(),
        external_task_id: r.external_task_id.clone(),
        upstream_task_id: None,
        status: TaskStatus::Pending,
        upstream_status: None,
        model_name: r.model_name.clone(),
        prompt: r.prompt.clone(),
        n: r.n,
        aspect_ratio: r.aspect_ratio.clone(),
        priority: r.priority,
        metadata: r.metadata.clone(),
        images: Vec::new(),
        error: None,
        created_at_ms: r.created_at_ms,
        updated_at_ms: r.created_at_ms,
        completed_at_ms: None,
        upstream_updated_at_ms: None,
        version: 0,
        dispatch_attempts: 0,
        dispatch_started_at_ms: None,
        poll_count: 0,
        client: r.client.clone(),
        notify_url: r.notify_url.clone(),
        request_id: r.request_id.clone(),
        final_unit_deduction: None,
        cost_source: None,
        submitted_at_ms: None,
    }
}
