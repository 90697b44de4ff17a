//! The image archive's bookkeeping, for the archiver worker and `archive backfill`: which images
//! are due for a fetch, what became of each, what the retention sweep removes, and which earlier
//! successes still have no archive records. The fetching and writing is the worker's.

use super::{Relay, ServiceError};
use crate::domain::archive::ArchivedImage;
use crate::domain::ResultImage;
use crate::storage::{ArchiveSetback, StoredImage};

impl Relay {
    /// Claims up to `limit` images due for a fetch, under a lease until `lease_until_ms`.
    pub async fn claim_images_to_archive(
        &self,
        now_ms: i64,
        limit: i64,
        lease_until_ms: i64,
    ) -> Result<Vec<ArchivedImage>, ServiceError> {
        Ok(self
            .store
            .claim_due_images(now_ms, limit, lease_until_ms)
            .await?)
    }

    /// Records a stored copy (a late duplicate of the same work changes nothing).
    pub async fn image_kept(
        &self,
        task_id: &str,
        index: u32,
        stored: &StoredImage<'_>,
        now_ms: i64,
    ) -> Result<bool, ServiceError> {
        Ok(self
            .store
            .image_stored(task_id, index, stored, now_ms)
            .await?)
    }

    /// Records a fetch that did not store the image: retried later, or given up.
    pub async fn image_setback(
        &self,
        task_id: &str,
        index: u32,
        error: &str,
        then: ArchiveSetback,
        now_ms: i64,
    ) -> Result<(), ServiceError> {
        Ok(self
            .store
            .image_setback(task_id, index, error, then, now_ms)
            .await?)
    }

    /// Stored copies older than `cutoff_ms`, oldest first (the retention sweep's work).
    pub async fn images_past_retention(
        &self,
        cutoff_ms: i64,
        limit: i64,
    ) -> Result<Vec<ArchivedImage>, ServiceError> {
        Ok(self.store.images_stored_before(cutoff_ms, limit).await?)
    }

    /// Records that the retention sweep removed an image's copy.
    pub async fn image_removed(
        &self,
        task_id: &str,
        index: u32,
        now_ms: i64,
    ) -> Result<bool, ServiceError> {
        Ok(self.store.image_deleted(task_id, index, now_ms).await?)
    }

    /// How many succeeded tasks have images but no archive records yet.
    pub async fn unarchived_count(&self) -> Result<i64, ServiceError> {
        Ok(self.store.unarchived_count().await?)
    }

    /// Succeeded tasks after `after_id` with images but no archive records, by id.
    pub async fn unarchived_tasks(
        &self,
        after_id: &str,
        limit: i64,
    ) -> Result<Vec<(String, Vec<ResultImage>)>, ServiceError> {
        Ok(self.store.unarchived_tasks(after_id, limit).await?)
    }

    /// Queues a task's images for the archiver.
    pub async fn queue_images(
        &self,
        task_id: &str,
        images: &[ResultImage],
        now_ms: i64,
    ) -> Result<(), ServiceError> {
        Ok(self.store.enqueue_images(task_id, images, now_ms).await?)
    }

    /// The archive records of several tasks.
    pub async fn images_of_tasks(
        &self,
        task_ids: &[String],
    ) -> Result<Vec<ArchivedImage>, ServiceError> {
        Ok(self.store.images_of_tasks(task_ids).await?)
    }
}
