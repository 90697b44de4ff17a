//! One round's changes as columns: what `set` and `whole` bind as arrays and unnest.

use super::super::*;

/// One round's changes as columns, bound as arrays and unnested in `COMMIT_SET` and
/// `COMMIT_WHOLE`.
#[derive(Default)]
pub(super) struct SetInput<'a> {
    slot: Vec<i64>,
    id: Vec<&'a str>,
    expected_version: Vec<i64>,
    status: Vec<&'static str>,
    upstream_status: Vec<Option<&'static str>>,
    bind_upstream_task_id: Vec<Option<&'a str>>,
    upstream_updated_at: Vec<Option<i64>>,
    images: Vec<Option<String>>,
    error_code: Vec<Option<&'a str>>,
    error_message: Vec<Option<&'a str>>,
    now_ms: Vec<i64>,
    completed_at: Vec<Option<i64>>,
    poll_due_at: Vec<Option<i64>>,
    final_unit_deduction: Vec<Option<&'a str>>,
    submitted_at: Vec<Option<i64>>,
    upstream_started_at: Vec<Option<i64>>,
    source: Vec<&'static str>,
    detail: Vec<Option<&'a str>>,
    upstream_payload: Vec<Option<&'a str>>,
    leaves_pending: Vec<bool>,
    outbox_id: Vec<Option<&'a str>>,
    outbox_client: Vec<Option<&'a str>>,
    outbox_url: Vec<Option<&'a str>>,
    outbox_payload: Vec<Option<&'a str>>,
}

impl<'a> SetInput<'a> {
    /// Which of a round's statements the round needs: (some change leaves `pending`) * 2 +
    /// (some change writes a notification).
    pub(super) fn variant(&self) -> usize {
        let drops = self.leaves_pending.iter().any(|l| *l);
        let notifies = self.outbox_id.iter().any(Option::is_some);
        usize::from(drops) * 2 + usize::from(notifies)
    }

    pub(super) fn of(batch: &'a [Commit<'a>], round: &[usize]) -> Result<SetInput<'a>> {
        let mut s = SetInput::default();
        for &slot in round {
            let c = &batch[slot];
            let change = c.change;
            s.slot.push(slot as i64);
            s.id.push(c.id);
            s.expected_version.push(c.expected_version);
            s.status.push(change.status.as_str());
            s.upstream_status
                .push(change.upstream_status.map(|u| u.as_str()));
            s.bind_upstream_task_id
                .push(change.bind_upstream_task_id.as_deref());
            s.upstream_updated_at.push(change.upstream_updated_at_ms);
            s.images
                .push(change.images.as_ref().map(json_text).transpose()?);
            s.error_code
                .push(change.error.as_ref().map(|e| e.code.as_str()));
            s.error_message
                .push(change.error.as_ref().map(|e| e.message.as_str()));
            s.now_ms.push(c.now_ms);
            s.completed_at
                .push(change.status.is_final().then_some(c.now_ms));
            s.poll_due_at.push(c.poll_due_at_ms);
            s.final_unit_deduction
                .push(change.final_unit_deduction.as_deref());
            s.submitted_at.push(c.leaves_pending.then_some(c.now_ms));
            s.upstream_started_at.push(if c.leaves_pending {
                change.upstream_updated_at_ms
            } else {
                None
            });
            s.source.push(c.source.as_str());
            s.detail.push(change.detail.as_deref());
            s.upstream_payload.push(c.upstream_payload);
            s.leaves_pending.push(c.leaves_pending);
            s.outbox_id.push(c.outbox.map(|o| o.id.as_str()));
            s.outbox_client.push(c.outbox.map(|o| o.client.as_str()));
            s.outbox_url.push(c.outbox.map(|o| o.url.as_str()));
            s.outbox_payload.push(c.outbox.map(|o| o.payload.as_str()));
        }
        Ok(s)
    }

    pub(super) fn bind<'q, O>(
        &'q self,
        q: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        q.bind(&self.slot)
            .bind(&self.id)
            .bind(&self.expected_version)
            .bind(&self.status)
            .bind(&self.upstream_status)
            .bind(&self.bind_upstream_task_id)
            .bind(&self.upstream_updated_at)
            .bind(&self.images)
            .bind(&self.error_code)
            .bind(&self.error_message)
            .bind(&self.now_ms)
            .bind(&self.completed_at)
            .bind(&self.poll_due_at)
            .bind(&self.final_unit_deduction)
            .bind(&self.submitted_at)
            .bind(&self.upstream_started_at)
            .bind(&self.source)
            .bind(&self.detail)
            .bind(&self.upstream_payload)
            .bind(&self.leaves_pending)
            .bind(&self.outbox_id)
            .bind(&self.outbox_client)
            .bind(&self.outbox_url)
            .bind(&self.outbox_payload)
    }
}
