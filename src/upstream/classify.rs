//! Every upstream answer classified once, by Kling's published error table (service code first,
//! HTTP status second, message text for gateways that replace the code), so dispatch, polls and
//! recovery all act on the same reading:
//!
//! | class | codes | HTTP | what the relay does |
//! |---|---|---|---|
//! | authentication | 1000-1004 | 401, 403 | halt all dispatch, probe with a query |
//! | account | 1100-1102 | 429, 402 | halt all dispatch, probe with one create |
//! | ip_whitelist | 1304 | 429 | halt all dispatch, probe with a query |
//! | busy | 1303 (or its message), 1302 | 429 | adaptive pause of dispatch |
//! | parameter | 1200-1299, 1300, 1301 | 400, 404 | fail that task with upstream's code |
//! | server | 5000-5002 | 5xx | retry; in doubt when the create may have landed |
//! | route | none | 404 | halt (the create path does not exist) |
//! | unknown | any other | any | retry `cometapi.unknown_code_attempts` times, then fail |

use super::wire::{code_of, data_of, message_of, parse_task_data};
use super::{Lookup, UpstreamError};
use crate::domain::halt::HaltReason;
use crate::domain::{UpstreamReport, UpstreamStatus};
use serde_json::Value;
use std::time::Duration;

/// Upstream's text for "account concurrency is full", whatever code or status carries it.
pub const CONCURRENCY_FULL_MESSAGE: &str = "parallel task over resource pack limit";
pub const CODE_CONCURRENCY_FULL: i64 = 1303;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    Halt(HaltReason),
    Busy,
    Parameter,
    Server,
    Unknown,
}

fn mentions(m: &str, words: &[&str]) -> bool {
    words.iter().any(|w| m.contains(w))
}

/// Reads an error answer: `code` (number or text, or none), `message`, and the HTTP status.
pub fn classify_error(status: u16, code: Option<&str>, message: &str) -> ErrorClass {
    let m = message.to_ascii_lowercase();
    if code == Some("1303") || m.contains(CONCURRENCY_FULL_MESSAGE) {
        return ErrorClass::Busy;
    }
    // Codes below 1000 are gateways echoing the HTTP status, not Kling's service codes.
    if let Some(n) = code
        .and_then(|c| c.parse::<i64>().ok())
        .filter(|n| *n >= 1000)
    {
        return match n {
            1000..=1004 => ErrorClass::Halt(HaltReason::Authentication),
            1100..=1102 => ErrorClass::Halt(HaltReason::Account),
            1302 => ErrorClass::Busy,
            1304 => ErrorClass::Halt(HaltReason::IpWhitelist),
            1200..=1301 => ErrorClass::Parameter,
            5000..=5002 => ErrorClass::Server,
            // An HTTP status that Kling uses only for one class still says it.
            _ if status == 401 => ErrorClass::Halt(HaltReason::Authentication),
            _ if status >= 500 => ErrorClass::Server,
            _ => ErrorClass::Unknown,
        };
    }
    // No service code (or a gateway's word in its place): the message, then the HTTP status.
    if mentions(
        &m,
        &[
            "resource pack",
            "arrears",
            "insufficient balance",
            "insufficient quota",
            "quota exceeded",
            "out of credit",
        ],
    ) && !m.contains("concurren")
    {
        return ErrorClass::Halt(HaltReason::Account);
    }
    if mentions(&m, &["whitelist", "allow-list", "allowlist"]) {
        return ErrorClass::Halt(HaltReason::IpWhitelist);
    }
    if mentions(
        &m,
        &[
            "authorization",
            "unauthorized",
            "invalid token",
            "invalid api key",
            "api key",
            "authentication",
        ],
    ) {
        return ErrorClass::Halt(HaltReason::Authentication);
    }
    match status {
        401 | 403 => ErrorClass::Halt(HaltReason::Authentication),
        402 => ErrorClass::Halt(HaltReason::Account),
        429 => ErrorClass::Busy,
        404 => ErrorClass::Halt(HaltReason::Route),
        400 | 422 => ErrorClass::Parameter,
        s if s >= 500 => ErrorClass::Server,
        _ => ErrorClass::Unknown,
    }
}

/// Upstream's "no such task", in `code` or `message`, whatever the HTTP status.
pub(crate) fn is_task_not_exist(body: &Value) -> bool {
    let hit = |s: String| s.to_ascii_lowercase().contains("task_not_exist");
    code_of(body).is_some_and(hit) || hit(message_of(body))
}

fn is_duplicate_external_id(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("external_task_id") && (m.contains("exist") || m.contains("duplicate"))
}

fn is_success(status: u16, body: &Value) -> bool {
    (200..300).contains(&status) && code_of(body).is_some_and(|c| c == "0")
}

/// The code to record for an error: upstream's own, or `http_<status>` when it sent none.
fn code_label(status: u16, body: Option<&Value>) -> String {
    body.and_then(code_of)
        .filter(|c| c != "0")
        .unwrap_or_else(|| format!("http_{status}"))
}

fn error_from(
    class: ErrorClass,
    status: u16,
    retry_after: Option<Duration>,
    body: Option<&Value>,
    // Whether a 5xx may mean the call landed (a create) or not (a query changes nothing).
    maybe_sent_on_server_error: bool,
) -> UpstreamError {
    let code = code_label(status, body);
    let message = body.map(message_of).unwrap_or_default();
    let message = if message.is_empty() {
        format!("upstream answered HTTP {status}")
    } else {
        message
    };
    match class {
        ErrorClass::Busy => UpstreamError::Retryable {
            reason: format!("{code}: {message}"),
            retry_after,
            maybe_sent: false,
            busy: true,
        },
        ErrorClass::Halt(reason) => UpstreamError::Halt {
            reason,
            code,
            message,
        },
        ErrorClass::Parameter => UpstreamError::Rejected { code, message },
        ErrorClass::Server => UpstreamError::Retryable {
            reason: format!("{code}: {message}"),
            retry_after,
            maybe_sent: maybe_sent_on_server_error,
            busy: false,
        },
        ErrorClass::Unknown => UpstreamError::Unknown { code, message },
    }
}

pub fn classify_create(
    status: u16,
    retry_after: Option<Duration>,
    body: &Option<Value>,
) -> Result<UpstreamReport, UpstreamError> {
    let Some(body) = body else {
        if (200..300).contains(&status) {
            return Err(UpstreamError::Retryable {
                reason: format!("HTTP {status} with an unreadable body"),
                retry_after,
                maybe_sent: true,
                busy: false,
            });
        }
        let class = classify_error(status, None, "");
        return Err(error_from(class, status, retry_after, None, true));
    };
    if is_success(status, body) {
        return data_of(body)
            .and_then(|d| parse_task_data(d, Some(UpstreamStatus::Submitted)))
            .ok_or_else(|| UpstreamError::Retryable {
                reason: "accepted, but the answer has no readable task".into(),
                retry_after,
                maybe_sent: true,
                busy: false,
            });
    }
    let message = message_of(body);
    if is_duplicate_external_id(&message) {
        return Err(UpstreamError::DuplicateExternalId { message });
    }
    let code = code_of(body);
    if (200..300).contains(&status) && code.is_none() {
        // A 2xx that is neither success nor an error: the call may have landed.
        return Err(UpstreamError::Retryable {
            reason: format!("HTTP {status} without a code"),
            retry_after,
            maybe_sent: true,
            busy: false,
        });
    }
    let class = classify_error(status, code.as_deref(), &message);
    Err(error_from(class, status, retry_after, Some(body), true))
}

pub fn classify_query(
    status: u16,
    retry_after: Option<Duration>,
    body: &Option<Value>,
) -> Result<Lookup, UpstreamError> {
    if let Some(b) = body {
        if is_task_not_exist(b) {
            return Ok(Lookup::NotExist);
        }
        if is_success(status, b) {
            if let Some(report) = data_of(b).and_then(|d| parse_task_data(d, None)) {
                return Ok(Lookup::Found(report));
            }
        }
    }
    let code = body.as_ref().and_then(code_of);
    let message = body.as_ref().map(message_of).unwrap_or_default();
    let class = if (200..300).contains(&status) {
        // A 2xx we cannot read: ask again later.
        ErrorClass::Server
    } else {
        match classify_error(status, code.as_deref(), &message) {
            // A query path that is missing is not the create path: doctor reports it; polls
            // keep trying rather than halting dispatch.
            ErrorClass::Halt(HaltReason::Route) | ErrorClass::Parameter | ErrorClass::Unknown => {
                ErrorClass::Server
            }
            other => other,
        }
    };
    Err(
        match error_from(class, status, retry_after, body.as_ref(), false) {
            UpstreamError::Retryable {
                reason,
                retry_after,
                busy,
                ..
            } => UpstreamError::Retryable {
                reason: format!("query answered HTTP {status} ({reason})"),
                retry_after,
                maybe_sent: false,
                busy,
            },
            other => other,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn class(status: u16, body: Value) -> ErrorClass {
        classify_error(status, code_of(&body).as_deref(), &message_of(&body))
    }

    #[test]
    fn the_published_table() {
        use ErrorClass::*;
        use HaltReason::*;
        for (status, code, want) in [
            (401, 1000, Halt(Authentication)),
            (401, 1004, Halt(Authentication)),
            (429, 1100, Halt(Account)),
            (429, 1101, Halt(Account)),
            (429, 1102, Halt(Account)),
            (400, 1200, Parameter),
            (400, 1201, Parameter),
            (404, 1203, Parameter),
            (400, 1301, Parameter),
            (429, 1302, Busy),
            (429, 1303, Busy),
            (429, 1304, Halt(IpWhitelist)),
            (500, 5000, Server),
            (503, 5001, Server),
            (504, 5002, Server),
            (400, 1999, Unknown),
            (200, 7777, Unknown),
        ] {
            let body = json!({"code": code, "message": "x"});
            assert_eq!(class(status, body), want, "{status}/{code}");
        }
    }

    #[test]
    fn gateways_that_replace_the_code_are_read_by_message_then_status() {
        let relay = |m: &str| json!({"code": "task_failed", "message": m});
        assert_eq!(
            class(400, relay("parallel task over resource pack limit")),
            ErrorClass::Busy
        );
        assert_eq!(
            class(400, relay("Resource pack depleted or expired")),
            ErrorClass::Halt(HaltReason::Account)
        );
        assert_eq!(
            class(400, relay("Authorization is invalid")),
            ErrorClass::Halt(HaltReason::Authentication)
        );
        assert_eq!(
            class(400, relay("prompt is too long")),
            ErrorClass::Parameter
        );
        assert_eq!(
            class(403, json!({"error": {"message": "forbidden"}})),
            ErrorClass::Halt(HaltReason::Authentication)
        );
        assert_eq!(
            class(404, json!({"message": "Not Found"})),
            ErrorClass::Halt(HaltReason::Route)
        );
        assert_eq!(
            class(404, json!({"code": 404, "message": "no such route"})),
            ErrorClass::Halt(HaltReason::Route)
        );
        assert_eq!(class(502, json!({})), ErrorClass::Server);
    }

    #[test]
    fn create_answers() {
        let ok = json!({"code": 0, "message": "SUCCEED", "data": {"task_id": 878106242831892487u64,
            "task_status": "submitted", "created_at": 1, "updated_at": 2}});
        let r = classify_create(200, None, &Some(ok)).unwrap();
        assert_eq!(r.task_id.as_deref(), Some("878106242831892487"));
        // CometAPI's current example: no task_status.
        let bare = json!({"code": 0, "data": {"task_id": "5"}});
        assert_eq!(
            classify_create(200, None, &Some(bare)).unwrap().status,
            UpstreamStatus::Submitted
        );

        let full = json!({"code": 1303, "message": "parallel task over resource pack limit"});
        assert!(matches!(
            classify_create(200, None, &Some(full)),
            Err(UpstreamError::Retryable {
                maybe_sent: false,
                busy: true,
                ..
            })
        ));
        assert!(matches!(
            classify_create(502, None, &None),
            Err(UpstreamError::Retryable {
                maybe_sent: true,
                ..
            })
        ));
        assert_eq!(
            classify_create(
                200,
                None,
                &Some(json!({"code": 1201, "message": "invalid prompt"}))
            ),
            Err(UpstreamError::Rejected {
                code: "1201".into(),
                message: "invalid prompt".into()
            })
        );
        let dup = json!({"code": 1201, "message": "external_task_id already exists"});
        assert!(matches!(
            classify_create(400, None, &Some(dup)),
            Err(UpstreamError::DuplicateExternalId { .. })
        ));
        assert!(matches!(
            classify_create(
                401,
                None,
                &Some(json!({"code": 1002, "message": "Authorization is invalid"}))
            ),
            Err(UpstreamError::Halt {
                reason: HaltReason::Authentication,
                ..
            })
        ));
        assert!(matches!(
            classify_create(200, None, &Some(json!({"code": 4242, "message": "new"}))),
            Err(UpstreamError::Unknown { .. })
        ));
    }

    #[test]
    fn query_answers() {
        let a = json!({"code": "task_not_exist", "message": "task_not_exist", "data": null});
        assert_eq!(classify_query(400, None, &Some(a)), Ok(Lookup::NotExist));
        let b = json!({"code": 1203, "message": "task_not_exist"});
        assert_eq!(classify_query(200, None, &Some(b)), Ok(Lookup::NotExist));
        assert!(matches!(
            classify_query(
                401,
                None,
                &Some(json!({"code": 1000, "message": "Authentication failed"}))
            ),
            Err(UpstreamError::Halt {
                reason: HaltReason::Authentication,
                ..
            })
        ));
        assert!(matches!(
            classify_query(404, None, &None),
            Err(UpstreamError::Retryable {
                maybe_sent: false,
                ..
            })
        ));
    }
}
