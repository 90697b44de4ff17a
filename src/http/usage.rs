//! `GET /v1/usage`: what the calling client's tasks cost, in UTC buckets.

use super::error::ApiError;
use super::AppState;
use crate::domain::client::Caller;
use crate::domain::usage::{milli_to_units, Granularity};
use crate::domain::FieldError;
use crate::resource::rfc3339;
use crate::service::now_ms;
use crate::service::usage::{UsageQuery, UsageReport};
use axum::extract::{RawQuery, State};
use axum::{Extension, Json};
use serde::Serialize;
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// Usage over a range, in buckets.
#[derive(Serialize, ToSchema)]
pub struct UsageView {
    /// Start of the first bucket (RFC 3339, UTC).
    #[schema(example = "2026-11-25T00:00:00Z")]
    from: String,
    /// End of the range, as asked (default: the end of the current UTC day).
    #[schema(example = "2026-11-26T00:00:00Z")]
    to: String,
    #[schema(example = "day")]
    granularity: String,
    /// The client's units held or waiting now: `n` of its pending and in-flight tasks.
    #[schema(example = 6)]
    units_reserved: i64,
    buckets: Vec<UsageBucketView>,
}

/// Tasks that ended in one bucket.
#[derive(Serialize, ToSchema)]
pub struct UsageBucketView {
    start: String,
    end: String,
    /// Tasks that ended in the bucket, by final status.
    #[schema(value_type = Object, example = json!({"succeeded": 9, "failed": 1, "timed_out": 0, "canceled": 0}))]
    tasks: BTreeMap<&'static str, i64>,
    /// Units upstream deducted for them (its `final_unit_deduction`).
    #[schema(example = 9.0)]
    units_deducted: f64,
    /// Median upstream time of the tasks that reached upstream, seconds (within 5 %); null with
    /// none.
    duration_p50_s: Option<f64>,
    duration_p95_s: Option<f64>,
}

impl From<UsageReport> for UsageView {
    fn from(r: UsageReport) -> Self {
        UsageView {
            from: rfc3339(r.query.from_ms),
            to: rfc3339(r.query.to_ms),
            granularity: r.query.granularity.as_str().to_owned(),
            units_reserved: r.units_reserved,
            buckets: r
                .buckets
                .into_iter()
                .map(|b| UsageBucketView {
                    start: rfc3339(b.start_ms),
                    end: rfc3339(b.end_ms),
                    tasks: b.tasks,
                    units_deducted: milli_to_units(b.units_deducted_milli),
                    duration_p50_s: b.duration_p50_s,
                    duration_p95_s: b.duration_p95_s,
                })
                .collect(),
        }
    }
}

/// What the calling client's tasks cost: tasks by final status, units deducted and durations,
/// per UTC hour, day or month. Tasks count in the bucket in which they ended.
#[utoipa::path(get, path = "/v1/usage", tag = "usage",
    params(
        ("from" = Option<String>, Query, description = "RFC 3339 start (rounded down to the bucket); default: the start of the current UTC day"),
        ("to" = Option<String>, Query, description = "RFC 3339 end, exclusive; default: the end of the current UTC day"),
        ("granularity" = Option<String>, Query, description = "`hour`, `day` (default) or `month`"),
    ),
    responses(
        (status = 200, description = "Usage in buckets", body = UsageView),
        (status = 400, description = "Bad query parameters", body = crate::resource::Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn usage(
    State(relay): State<AppState>,
    Extension(caller): Extension<Caller>,
    RawQuery(query): RawQuery,
) -> Result<Json<UsageView>, ApiError> {
    let q = parse_usage_query(query.as_deref().unwrap_or(""), now_ms())?;
    Ok(Json(relay.usage(&caller, q).await?.into()))
}

fn parse_usage_query(query: &str, now_ms: i64) -> Result<UsageQuery, ApiError> {
    let (mut from, mut to, mut granularity) = (None, None, None);
    let mut errors = Vec::new();
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "from" => match super::tasks::parse_time("from", &value) {
                Ok(v) => from = Some(v),
                Err(e) => errors.push(e),
            },
            "to" => match super::tasks::parse_time("to", &value) {
                Ok(v) => to = Some(v),
                Err(e) => errors.push(e),
            },
            "granularity" => match Granularity::parse(&value) {
                Some(g) => granularity = Some(g),
                None => errors.push(FieldError {
                    field: "granularity".into(),
                    message: "must be hour, day or month".into(),
                }),
            },
            other => errors.push(FieldError {
                field: other.to_owned(),
                message: "unknown query parameter".into(),
            }),
        }
    }
    if errors.is_empty() {
        match UsageQuery::new(from, to, granularity, now_ms) {
            Ok(q) => return Ok(q),
            Err(e) => errors = e,
        }
    }
    Err(ApiError::BadRequest {
        detail: "invalid query parameters".into(),
        errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_to_the_current_utc_day_and_refuses_bad_ranges() {
        // 2026-11-25T10:00:00Z
        let now = 1_795_600_800_000;
        let q = parse_usage_query("", now).unwrap();
        assert_eq!(q.granularity, Granularity::Day);
        assert_eq!(rfc3339(q.from_ms), "2026-11-25T00:00:00Z");
        assert_eq!(rfc3339(q.to_ms), "2026-11-26T00:00:00Z");
        for bad in [
            "from=yesterday",
            "granularity=week",
            "from=2026-11-25T00:00:00Z&to=2026-11-24T00:00:00Z",
            "from=2020-01-01T00:00:00Z&to=2026-01-01T00:00:00Z&granularity=hour",
            "colour=blue",
        ] {
            assert!(parse_usage_query(bad, now).is_err(), "{bad}");
        }
        let q = parse_usage_query(
            "from=2026-10-01T00:00:00Z&to=2026-12-01T00:00:00Z&granularity=month",
            now,
        )
        .unwrap();
        assert_eq!(q.granularity, Granularity::Month);
    }
}
