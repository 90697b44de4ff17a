//! Reads: tasks, lists, timelines, archived images, dispatch status, readiness.

use super::*;

impl Relay {
    /// Whether `kling-relay doctor` left this nonce for the service to serve.
    pub async fn doctor_nonce_valid(&self, nonce: &str) -> Result<bool, ServiceError> {
        // A nonce is a UUID: anything else is not worth a database read.
        if uuid::Uuid::parse_str(nonce).is_err() {
            return Ok(false);
        }
        Ok(self.store.doctor_nonce_valid(nonce, now_ms()).await?)
    }

    /// Why the service is not ready, if it is not: the database (answering, migrations current),
    /// a halted dispatch, or an archive folder it cannot write.
    pub async fn readiness(&self) -> Result<(), String> {
        self.store.readiness().await?;
        if let Some(h) = self.halted() {
            return Err(format!(
                "dispatch halted ({}): {}",
                h.reason.as_str(),
                h.reason.advice()
            ));
        }
        let a = &self.settings.archive;
        if a.enabled && a.backend == crate::config::ArchiveBackend::Local {
            let probe = std::path::Path::new(&a.path)
                .join(format!(".readyz-{}", uuid::Uuid::new_v4().simple()));
            let written = tokio::fs::write(&probe, b"ok").await;
            let _ = tokio::fs::remove_file(&probe).await;
            // The folder is named by its setting, not its absolute path.
            written
                .map_err(|e| format!("the archive folder (archive.path) cannot be written: {e}"))?;
        }
        Ok(())
    }

    /// The archive records of these tasks' images (only succeeded tasks have any).
    pub async fn archive_records(
        &self,
        tasks: &[Task],
    ) -> Result<Vec<crate::domain::archive::ArchivedImage>, ServiceError> {
        let ids: Vec<String> = tasks
            .iter()
            .filter(|t| t.status == TaskStatus::Succeeded && !t.images.is_empty())
            .map(|t| t.id.clone())
            .collect();
        Ok(self.store.images_of_tasks(&ids).await?)
    }

    /// Image `index` of one of the caller's tasks, from the archive: its record and its bytes.
    pub async fn archived_image(
        &self,
        caller: &Caller,
        id: &str,
        index: u32,
    ) -> Result<
        (
            crate::domain::archive::ArchivedImage,
            crate::archive::Object,
        ),
        ServiceError,
    > {
        self.get(caller, id).await?;
        let records = self.store.task_images(id).await?;
        let Some(record) = records.into_iter().find(|r| r.index == index) else {
            return Err(ServiceError::ImageUnavailable(format!(
                "task {id} has no archived image {index}"
            )));
        };
        let key = match (&record.state, &record.object_key) {
            (crate::domain::archive::ArchiveState::Stored, Some(key)) => key.clone(),
            (state, _) => {
                return Err(ServiceError::ImageUnavailable(format!(
                    "image {index} of task {id} is not in the archive (state {state})"
                )))
            }
        };
        let object = self.archive.get(&key).await.map_err(|e| match e {
            crate::archive::ArchiveError::NotFound => ServiceError::ImageUnavailable(format!(
                "image {index} of task {id} is missing from the archive"
            )),
            other => ServiceError::Archive(other),
        })?;
        Ok((record, object))
    }

    pub async fn dispatch_status(&self) -> Result<DispatchStatus, ServiceError> {
        let admission = self.admission_snapshot().await?;
        Ok(DispatchStatus {
            admission,
            units_in_flight: self.store.units_in_flight().await?,
            pending: self.store.pending_count().await?,
            halted: self.halted(),
        })
    }

    /// How the account's units are shared: per client, units held and tasks waiting now, and
    /// unit-time over the last hour.
    pub async fn client_usage(&self) -> Result<Vec<crate::storage::ClientUsage>, ServiceError> {
        const HOUR_MS: i64 = 3600 * 1000;
        let now = now_ms();
        // Tasks that started more than an hour before the window are left out of it.
        Ok(self.store.client_usage(now, now - HOUR_MS, HOUR_MS).await?)
    }

    /// A task the caller owns. Another client's task is "not found", never "forbidden".
    pub async fn get(&self, caller: &Caller, id: &str) -> Result<Task, ServiceError> {
        match self.store.get_task(id).await? {
            Some(t) if caller.owns(t.client.as_deref()) => Ok(t),
            _ => Err(ServiceError::NotFound),
        }
    }

    /// A task whoever owns it (workers and webhooks).
    pub async fn get_any(&self, id: &str) -> Result<Task, ServiceError> {
        self.store.get_task(id).await?.ok_or(ServiceError::NotFound)
    }

    pub async fn list(
        &self,
        caller: &Caller,
        filter: &crate::domain::TaskQuery,
    ) -> Result<Vec<Task>, ServiceError> {
        let mut filter = filter.clone();
        filter.client = caller.scope().map(str::to_owned);
        Ok(self.store.list_tasks(&filter).await?)
    }

    pub async fn events(&self, caller: &Caller, id: &str) -> Result<Vec<TaskEvent>, ServiceError> {
        self.get(caller, id).await?;
        Ok(self.store.events(id).await?)
    }

    /// The gauges `/metrics` reports, read now. A figure that cannot be read is left out (the
    /// endpoint still answers with the rest).
    pub async fn gauges(&self) -> Gauges {
        Gauges {
            dispatch: self.dispatch_status().await.ok(),
            open_tasks: self.store.open_tasks_by_status().await.ok(),
            clients: self.client_usage().await.ok(),
            usage: self.usage_gauges().await.ok(),
            notification_backlog: self.store.pending_deliveries().await.ok(),
        }
    }
}

/// What `/metrics` reports as gauges (see `Relay::gauges`).
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    pub dispatch: Option<DispatchStatus>,
    /// (status, tasks) of the open statuses.
    pub open_tasks: Option<Vec<(String, i64)>>,
    pub clients: Option<Vec<crate::storage::ClientUsage>>,
    pub usage: Option<crate::service::usage::UsageGauges>,
    pub notification_backlog: Option<i64>,
}
