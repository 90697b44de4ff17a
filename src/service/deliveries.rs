//! Notifications as the caller sees them: a task's deliveries, the ones in trouble across tasks,
//! and sending them again (one, or every dead one).

use super::{now_ms, Relay, ServiceError};
use crate::domain::client::Caller;
use crate::storage::Delivery;

impl Relay {
    /// A task's notifications.
    pub async fn deliveries(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<Vec<Delivery>, ServiceError> {
        self.get(caller, id).await?;
        Ok(self.store.list_deliveries(id).await?)
    }

    /// The caller's notifications in trouble (dead, disabled or failing), newest first.
    pub async fn troubled_deliveries(
        &self,
        caller: &Caller,
        limit: i64,
    ) -> Result<Vec<Delivery>, ServiceError> {
        Ok(self
            .store
            .troubled_deliveries(caller.scope(), limit)
            .await?)
    }

    /// Sends every dead notification of the caller again; how many.
    pub async fn retry_dead_deliveries(&self, caller: &Caller) -> Result<u64, ServiceError> {
        let n = self
            .store
            .retry_dead_deliveries(caller.scope(), now_ms())
            .await?;
        if n > 0 {
            self.notify_wake.notify_one();
        }
        Ok(n)
    }

    /// Sends one notification again, with its original `webhook-id`.
    pub async fn retry_delivery(
        &self,
        caller: &Caller,
        id: &str,
        delivery_id: &str,
    ) -> Result<Delivery, ServiceError> {
        self.get(caller, id).await?;
        if !self.store.retry_delivery(id, delivery_id, now_ms()).await? {
            return Err(ServiceError::DeliveryNotFound);
        }
        self.notify_wake.notify_one();
        self.store
            .list_deliveries(id)
            .await?
            .into_iter()
            .find(|d| d.id == delivery_id)
            .ok_or(ServiceError::DeliveryNotFound)
    }

    /// Records one delivery attempt and what comes next for it.
    pub async fn record_delivery_attempt(
        &self,
        d: &crate::storage::DueDelivery,
        record: &crate::storage::AttemptRecord,
    ) -> Result<(), ServiceError> {
        Ok(self.store.record_attempt(d, record).await?)
    }

    /// The client a notification is signed for (its current signing secrets).
    pub async fn notified_client(
        &self,
        name: &str,
    ) -> Result<Option<crate::domain::client::Client>, ServiceError> {
        Ok(self.store.get_client(name).await?)
    }

    /// Claims up to `limit` due notifications under a lease until `lease_until_ms`; `take`
    /// decides for each whether it can start now (and holds what it needs to).
    pub async fn claim_deliveries<T, F>(
        &self,
        now_ms: i64,
        limit: i64,
        lease_until_ms: i64,
        take: F,
    ) -> Result<Vec<(crate::storage::DueDelivery, T)>, ServiceError>
    where
        F: FnMut(&crate::storage::DueDelivery) -> Option<T>,
    {
        Ok(self
            .store
            .claim_deliveries(now_ms, limit, lease_until_ms, take)
            .await?)
    }
}
