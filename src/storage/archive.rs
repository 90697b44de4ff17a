//! The image archive's rows (`task_images`): queued with a task's success, claimed by the
//! archiver with a lease like all background work, and read into the task resource.

use super::{Pool, Result, StorageError, Store};
pub use crate::domain::archive::{ArchiveSetback, StoredImage};
use crate::domain::archive::{ArchiveState, ArchivedImage};
use crate::domain::ResultImage;

/// Queues the images of a task that just succeeded; part of that change's transaction.
pub(super) const ENQUEUE: &str = "INSERT INTO task_images \
    (task_id, idx, url, state, attempts, next_attempt_at, updated_at) \
    VALUES ($1, $2, $3, 'pending', 0, $4, $4) ON CONFLICT (task_id, idx) DO NOTHING";

const COLUMNS: &str = "task_id, idx, url, state, attempts, object_key, content_type, \
    size_bytes, sha256, error, stored_at, deleted_at";

#[derive(sqlx::FromRow)]
struct ImageRow {
    task_id: String,
    idx: i64,
    url: String,
    state: String,
    attempts: i64,
    object_key: Option<String>,
    content_type: Option<String>,
    size_bytes: Option<i64>,
    sha256: Option<String>,
    error: Option<String>,
    stored_at: Option<i64>,
    deleted_at: Option<i64>,
}

impl TryFrom<ImageRow> for ArchivedImage {
    type Error = StorageError;
    fn try_from(r: ImageRow) -> Result<ArchivedImage> {
        Ok(ArchivedImage {
            index: u32::try_from(r.idx)
                .map_err(|_| StorageError::Corrupt(format!("image index {}", r.idx)))?,
            state: r.state.parse().map_err(StorageError::Corrupt)?,
            task_id: r.task_id,
            url: r.url,
            attempts: r.attempts,
            object_key: r.object_key,
            content_type: r.content_type,
            size_bytes: r.size_bytes,
            sha256: r.sha256,
            error: r.error,
            stored_at_ms: r.stored_at,
            deleted_at_ms: r.deleted_at,
        })
    }
}

fn convert(rows: Vec<ImageRow>) -> Result<Vec<ArchivedImage>> {
    rows.into_iter().map(ArchivedImage::try_from).collect()
}

impl Store {
    /// Claims up to `limit` images due for a fetch; each is due again at `lease_until_ms` unless
    /// its outcome is recorded first (see `storage::claims`).
    pub async fn claim_due_images(
        &self,
        now_ms: i64,
        limit: i64,
        lease_until_ms: i64,
    ) -> Result<Vec<ArchivedImage>> {
        let _writer = self.writer().await;
        let skip = self.skip_locked();
        let sql = format!(
            "UPDATE task_images SET next_attempt_at = $3, attempts = attempts + 1 \
            WHERE (task_id, idx) IN (SELECT task_id, idx FROM task_images \
            WHERE next_attempt_at IS NOT NULL AND next_attempt_at <= $1 \
            ORDER BY next_attempt_at LIMIT $2{skip}) RETURNING {COLUMNS}"
        );
        let rows: Vec<ImageRow> = on_pool!(self, p => {
            sqlx::query_as(&sql)
                .bind(now_ms)
                .bind(limit)
                .bind(lease_until_ms)
                .fetch_all(p)
                .await?
        });
        convert(rows)
    }

    /// Records a stored copy. Only a pending image moves: a late duplicate of the same work
    /// changes nothing.
    pub async fn image_stored(
        &self,
        task_id: &str,
        index: u32,
        s: &StoredImage<'_>,
        now_ms: i64,
    ) -> Result<bool> {
        let _writer = self.writer().await;
        const SQL: &str = "UPDATE task_images SET state = 'stored', next_attempt_at = NULL, \
            object_key = $3, content_type = $4, size_bytes = $5, sha256 = $6, error = NULL, \
            stored_at = $7, updated_at = $7 \
            WHERE task_id = $1 AND idx = $2 AND state = 'pending'";
        on_pool!(self, p => {
            Ok(sqlx::query(SQL)
                .bind(task_id)
                .bind(i64::from(index))
                .bind(s.object_key)
                .bind(s.content_type)
                .bind(s.size_bytes)
                .bind(s.sha256)
                .bind(now_ms)
                .execute(p)
                .await?
                .rows_affected() == 1)
        })
    }

    /// Records a fetch that did not store the image: retried later, or given up (`failed`).
    pub async fn image_setback(
        &self,
        task_id: &str,
        index: u32,
        error: &str,
        then: ArchiveSetback,
        now_ms: i64,
    ) -> Result<()> {
        let _writer = self.writer().await;
        let (state, next) = match then {
            ArchiveSetback::RetryAt(at) => (ArchiveState::Pending, Some(at)),
            ArchiveSetback::GiveUp => (ArchiveState::Failed, None),
        };
        const SQL: &str = "UPDATE task_images SET state = $3, next_attempt_at = $4, error = $5, \
            updated_at = $6 WHERE task_id = $1 AND idx = $2 AND state = 'pending'";
        on_pool!(self, p => {
            sqlx::query(SQL)
                .bind(task_id)
                .bind(i64::from(index))
                .bind(state.as_str())
                .bind(next)
                .bind(error)
                .bind(now_ms)
                .execute(p)
                .await?;
            Ok(())
        })
    }

    /// The archive records of one task's images, by index.
    pub async fn task_images(&self, task_id: &str) -> Result<Vec<ArchivedImage>> {
        let sql = format!("SELECT {COLUMNS} FROM task_images WHERE task_id = $1 ORDER BY idx");
        let rows: Vec<ImageRow> = on_pool!(self, p => {
            sqlx::query_as(&sql).bind(task_id).fetch_all(p).await?
        });
        convert(rows)
    }

    /// The archive records of several tasks (a history page), in one query.
    pub async fn images_of_tasks(&self, task_ids: &[String]) -> Result<Vec<ArchivedImage>> {
        if task_ids.is_empty() {
            return Ok(Vec::new());
        }
        let marks: Vec<String> = (1..=task_ids.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT {COLUMNS} FROM task_images WHERE task_id IN ({}) ORDER BY task_id, idx",
            marks.join(", ")
        );
        let rows: Vec<ImageRow> = on_pool!(self, p => {
            let mut q = sqlx::query_as(&sql);
            for id in task_ids {
                q = q.bind(id);
            }
            q.fetch_all(p).await?
        });
        convert(rows)
    }

    /// Stored images archived before `cutoff_ms`, oldest first (the retention sweep's work).
    pub async fn images_stored_before(
        &self,
        cutoff_ms: i64,
        limit: i64,
    ) -> Result<Vec<ArchivedImage>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM task_images WHERE state = 'stored' AND stored_at < $1 \
            ORDER BY stored_at LIMIT $2"
        );
        let rows: Vec<ImageRow> = on_pool!(self, p => {
            sqlx::query_as(&sql).bind(cutoff_ms).bind(limit).fetch_all(p).await?
        });
        convert(rows)
    }

    /// Records that the retention sweep removed an image's copy.
    pub async fn image_deleted(&self, task_id: &str, index: u32, now_ms: i64) -> Result<bool> {
        let _writer = self.writer().await;
        const SQL: &str = "UPDATE task_images SET state = 'deleted', deleted_at = $3, \
            updated_at = $3 WHERE task_id = $1 AND idx = $2 AND state = 'stored'";
        on_pool!(self, p => {
            Ok(sqlx::query(SQL)
                .bind(task_id)
                .bind(i64::from(index))
                .bind(now_ms)
                .execute(p)
                .await?
                .rows_affected() == 1)
        })
    }

    /// Succeeded tasks with images and no archive records, after `after_id` in id order: what
    /// `archive backfill` has left to queue. Queued tasks drop out, so a stopped backfill resumes.
    pub async fn unarchived_tasks(
        &self,
        after_id: &str,
        limit: i64,
    ) -> Result<Vec<(String, Vec<ResultImage>)>> {
        const SQL: &str = "SELECT id, images FROM tasks t WHERE status = 'succeeded' \
            AND images IS NOT NULL AND images <> '[]' AND id > $1 \
            AND NOT EXISTS (SELECT 1 FROM task_images i WHERE i.task_id = t.id) \
            ORDER BY id LIMIT $2";
        let rows: Vec<(String, String)> = on_pool!(self, p => {
            sqlx::query_as(SQL).bind(after_id).bind(limit).fetch_all(p).await?
        });
        rows.into_iter()
            .map(|(id, images)| {
                let images = serde_json::from_str(&images)
                    .map_err(|e| StorageError::Corrupt(format!("task {id}: images: {e}")))?;
                Ok((id, images))
            })
            .collect()
    }

    /// How many succeeded tasks have images but no archive records.
    pub async fn unarchived_count(&self) -> Result<i64> {
        const SQL: &str = "SELECT COUNT(*) FROM tasks t WHERE status = 'succeeded' \
            AND images IS NOT NULL AND images <> '[]' \
            AND NOT EXISTS (SELECT 1 FROM task_images i WHERE i.task_id = t.id)";
        on_pool!(self, p => {
            Ok(sqlx::query_scalar(SQL).fetch_one(p).await?)
        })
    }

    /// Queues a task's images for the archiver (backfill).
    pub async fn enqueue_images(
        &self,
        task_id: &str,
        images: &[ResultImage],
        now_ms: i64,
    ) -> Result<()> {
        let _writer = self.writer().await;
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            for img in images {
                sqlx::query(ENQUEUE)
                    .bind(task_id)
                    .bind(i64::from(img.index))
                    .bind(&img.url)
                    .bind(now_ms)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }
}
