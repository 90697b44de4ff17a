//! A new task as an insert batch takes it: its record, what it is checked against, and its
//! JSON columns made once before it is queued.

use crate::storage::{json_text, IdempotencyClaim, NewTaskRecord, PendingCaps, Result};

/// A new task with what its insert is checked against. Its images become their JSON column
/// inside the insert, one task at a time (a Base64 submit is tens of MB, and converting several
/// at once would hold each twice), and stay converted, so a batch that fails can be retried
/// task by task without converting or copying them again.
#[derive(Debug)]
pub struct NewTask {
    pub(super) record: NewTaskRecord,
    pub(super) idempotency: Option<IdempotencyClaim>,
    pub(super) caps: PendingCaps,
    pub(super) metadata: Option<String>,
    pub(super) summary: String,
    /// The subject images as JSON, once converted (then `record`'s list is empty).
    pub(super) subjects: Option<String>,
    pub(super) watermark: Option<String>,
}

impl NewTask {
    pub fn new(
        record: NewTaskRecord,
        idempotency: Option<IdempotencyClaim>,
        caps: PendingCaps,
    ) -> Result<NewTask> {
        let metadata = record.metadata.as_ref().map(json_text).transpose()?;
        let summary = json_text(&record.inputs.summary())?;
        let watermark = record
            .inputs
            .watermark_info
            .as_ref()
            .map(json_text)
            .transpose()?;
        Ok(NewTask {
            record,
            idempotency,
            caps,
            metadata,
            summary,
            subjects: None,
            watermark,
        })
    }

    pub fn id(&self) -> &str {
        &self.record.id
    }

    /// Whether its images are large enough to be stored alone (`GroupInsert` gives such a
    /// task a batch of its own, so no batch holds several of them).
    pub fn is_large(&self) -> bool {
        let i = &self.record.inputs;
        let bytes = self.subjects.as_ref().map_or(0, String::len)
            + i.subject_images.iter().map(String::len).sum::<usize>()
            + i.scene_image.as_ref().map_or(0, String::len)
            + i.style_image.as_ref().map_or(0, String::len);
        bytes > LARGE_INPUTS_BYTES
    }

    /// Converts the subject images to their JSON column, moving them (not copying).
    pub(super) fn prepare(&mut self) -> Result<()> {
        if self.subjects.is_none() {
            let list = std::mem::take(&mut self.record.inputs.subject_images);
            self.subjects = Some(json_text(&list)?);
        }
        Ok(())
    }
}

/// Inputs larger than this are stored in a batch of their own.
const LARGE_INPUTS_BYTES: usize = 256 * 1024;
