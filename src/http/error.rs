//! The one place where errors become HTTP answers: RFC 9457 `application/problem+json`.

use crate::domain::FieldError;
use crate::service::ServiceError;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{detail}")]
    BadRequest {
        detail: String,
        errors: Vec<FieldError>,
    },
    #[error("the request body failed validation")]
    Validation(Vec<FieldError>),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{detail}")]
    TooManyRequests {
        detail: String,
        retry_after_secs: u64,
    },
    /// A client's budget would be overrun: 429 with the budget's standing as extension members.
    #[error("{detail}")]
    BudgetExceeded {
        detail: String,
        extensions: serde_json::Value,
        retry_after_secs: u64,
    },
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    RequestTimeout(String),
    #[error("this method is not allowed on this route")]
    MethodNotAllowed,
    #[error("internal error")]
    Internal,
}

impl ApiError {
    pub fn bad_request(detail: impl Into<String>) -> Self {
        ApiError::BadRequest {
            detail: detail.into(),
            errors: Vec::new(),
        }
    }

    /// The problem's `type`: stable per kind of error, so clients can branch on it (README,
    /// "Errors"). A URI reference, relative to the service's own address.
    pub fn problem_type(&self) -> &'static str {
        match self {
            ApiError::BadRequest { .. } => "/problems/bad-request",
            ApiError::Validation(_) => "/problems/validation",
            ApiError::NotFound(_) => "/problems/not-found",
            ApiError::Unauthorized(_) => "/problems/unauthorized",
            ApiError::Conflict(_) => "/problems/conflict",
            ApiError::UnsupportedMediaType(_) => "/problems/unsupported-media-type",
            ApiError::Unavailable(_) => "/problems/unavailable",
            ApiError::TooManyRequests { .. } => "/problems/rate-limited",
            ApiError::BudgetExceeded { .. } => "/problems/budget-exceeded",
            ApiError::PayloadTooLarge(_) => "/problems/payload-too-large",
            ApiError::RequestTimeout(_) => "/problems/request-timeout",
            ApiError::MethodNotAllowed => "/problems/method-not-allowed",
            ApiError::Internal => "/problems/internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooManyRequests { .. } | ApiError::BudgetExceeded { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Invalid(errors) => ApiError::Validation(errors),
            ServiceError::NotFound => ApiError::NotFound("no task with this id".into()),
            ServiceError::DeliveryNotFound => {
                ApiError::NotFound("this task has no notification with this id".into())
            }
            ServiceError::Mismatch(m) => ApiError::Conflict(m.to_string()),
            ServiceError::Contended => ApiError::Unavailable(e.to_string()),
            ServiceError::IdempotencyConflict => ApiError::Validation(vec![FieldError {
                field: "Idempotency-Key".into(),
                message: e.to_string(),
            }]),
            ServiceError::QueueFull => ApiError::TooManyRequests {
                detail: e.to_string(),
                retry_after_secs: 5,
            },
            ServiceError::CannotCancel(_) => ApiError::Conflict(e.to_string()),
            ServiceError::RateLimited(secs) => ApiError::TooManyRequests {
                detail: e.to_string(),
                retry_after_secs: secs,
            },
            ServiceError::BudgetExceeded {
                standing,
                requested,
            } => {
                let now = crate::service::now_ms();
                let wait_ms = (standing.resets_at_ms - now).max(1000);
                ApiError::BudgetExceeded {
                    detail: e.to_string(),
                    extensions: json!({
                        "period": standing.period.as_str(),
                        "budget_units": standing.limit_units,
                        "spent_units": crate::domain::usage::milli_to_units(standing.spent_milli),
                        "reserved_units": standing.reserved_units,
                        "requested_units": requested,
                        "resets_at": crate::resource::rfc3339(standing.resets_at_ms),
                    }),
                    retry_after_secs: u64::try_from(wait_ms.div_euclid(1000)).unwrap_or(1),
                }
            }
            ServiceError::Unauthorized => ApiError::Unauthorized(e.to_string()),
            ServiceError::ImageUnavailable(detail) => ApiError::NotFound(detail),
            ServiceError::Archive(err) => {
                tracing::error!(error = %err, "archive failure");
                ApiError::Unavailable("the image archive is unavailable; retry later".into())
            }
            // By what a retry would do: a corrupt row or a constraint the request breaks answers
            // the same every time (500, 409, 422), so only an outage is a 503 worth retrying.
            // Details stay in the log, beside the request id of the span.
            ServiceError::Corrupt(err) => {
                tracing::error!(error = %err, "stored data is corrupt");
                ApiError::Internal
            }
            ServiceError::StoredConflict(err) => {
                tracing::warn!(error = %err, "the request conflicts with stored data");
                ApiError::Conflict("the request conflicts with data already stored".into())
            }
            ServiceError::Unstorable(err) => {
                tracing::warn!(error = %err, "the database cannot store the request's data");
                ApiError::Validation(vec![FieldError {
                    field: String::new(),
                    message: "the request holds data the database cannot store".into(),
                }])
            }
            ServiceError::Storage(err) => {
                tracing::error!(error = %err, "storage failure");
                ApiError::Unavailable("the database is unavailable; retry later".into())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut body = json!({
            "type": self.problem_type(),
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "detail": self.to_string(),
        });
        match &self {
            ApiError::Validation(errors) | ApiError::BadRequest { errors, .. }
                if !errors.is_empty() =>
            {
                body["errors"] = json!(errors);
            }
            ApiError::BudgetExceeded { extensions, .. } => {
                if let (Some(body), Some(ext)) = (body.as_object_mut(), extensions.as_object()) {
                    body.extend(ext.clone());
                }
            }
            _ => {}
        }
        let mut resp = (status, body.to_string()).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/problem+json"),
        );
        let retry_after = match &self {
            ApiError::Unavailable(_) => Some(1),
            ApiError::TooManyRequests {
                retry_after_secs, ..
            }
            | ApiError::BudgetExceeded {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ => None,
        };
        if matches!(self, ApiError::Unauthorized(_)) {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        if let Some(secs) = retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
        }
        resp
    }
}
