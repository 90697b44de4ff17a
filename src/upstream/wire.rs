//! The upstream's JSON, read tolerantly: envelopes whose `code` is a number or a string, `data`
//! as an object or a one-element list, ids and counts as strings or numbers, unknown fields
//! ignored, and a create answer with a `task_id` but no `task_status` taken as `submitted`.

use crate::domain::{ResultImage, UpstreamReport, UpstreamStatus};
use serde_json::Value;

/// `code` as text: Kling sends numbers, gateways strings; OpenAI-style gateways nest it in
/// `error`.
pub fn code_of(body: &Value) -> Option<String> {
    let v = body
        .get("code")
        .or_else(|| body.get("error").and_then(|e| e.get("code")))?;
    text_or_number(Some(v))
}

/// The human message, wherever the answer puts it.
pub fn message_of(body: &Value) -> String {
    let direct = body.get("message").and_then(Value::as_str);
    let nested = || {
        body.get("error").and_then(|e| match e {
            Value::String(s) => Some(s.as_str()),
            other => other.get("message").and_then(Value::as_str),
        })
    };
    clean(direct.or_else(nested).unwrap_or(""))
}

/// The task object of an envelope: `data` itself, or its only element when it is a list.
pub fn data_of(body: &Value) -> Option<&Value> {
    match body.get("data")? {
        Value::Array(list) if list.len() == 1 => list.first(),
        v @ Value::Object(_) => Some(v),
        _ => None,
    }
}

/// Upstream text without NUL characters, which Postgres text cannot hold: a callback carrying
/// one must still land, on either backend.
pub fn clean(s: &str) -> String {
    s.replace('\0', "")
}

pub fn text_or_number(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(clean(s).trim().to_owned()).filter(|t| !t.is_empty()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn millis(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Reads upstream's task object (`data` of a create or query answer, or a callback body).
/// `missing_status`: what a task object without `task_status` means (only a create answer has
/// a meaning for it: the task was accepted, so it is `submitted`).
pub fn parse_task_data(
    data: &Value,
    missing_status: Option<UpstreamStatus>,
) -> Option<UpstreamReport> {
    let status = match data.get("task_status") {
        None | Some(Value::Null) => missing_status?,
        Some(v) => v.as_str()?.trim().parse().ok()?,
    };
    let task_id = text_or_number(data.get("task_id"));
    if missing_status.is_some() && data.get("task_status").is_none() && task_id.is_none() {
        // Neither a status nor an id: nothing says a task exists.
        return None;
    }
    let images = data
        .get("task_result")
        .and_then(|r| r.get("images"))
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .enumerate()
                .filter_map(|(i, img)| {
                    let url = clean(img.get("url")?.as_str()?);
                    let index = millis(img.get("index"))
                        .and_then(|x| u32::try_from(x).ok())
                        .unwrap_or(i as u32);
                    Some(ResultImage { index, url })
                })
                .collect()
        })
        .unwrap_or_default();
    Some(UpstreamReport {
        task_id,
        external_task_id: data
            .get("task_info")
            .and_then(|i| text_or_number(i.get("external_task_id"))),
        status,
        status_msg: data
            .get("task_status_msg")
            .and_then(Value::as_str)
            .map(clean),
        updated_at_ms: millis(data.get("updated_at")),
        images,
        final_unit_deduction: text_or_number(data.get("final_unit_deduction")),
        raw: Some(data.clone()),
    })
}

/// Reads a callback: the bare task object, or the same object inside a `{code, message, data}`
/// envelope. None when it is neither. An envelope whose `code` is not 0 is not a report.
pub fn parse_callback(body: &Value) -> Option<UpstreamReport> {
    if body.get("task_status").is_none() && body.get("data").is_some() {
        if code_of(body).is_some_and(|c| c != "0") {
            return None;
        }
        return parse_task_data(data_of(body)?, None);
    }
    parse_task_data(body, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_every_documented_and_reshaped_form() {
        // Numbers where strings are usual, data as a one-element list, unknown fields.
        let body = json!({"code": "0", "data": [{"task_id": 878106242831892487u64,
            "task_status": "succeed", "updated_at": "17", "final_unit_deduction": 2,
            "task_result": {"images": [{"index": "1", "url": "u1"}]}, "surprise": true}]});
        let r = parse_task_data(data_of(&body).unwrap(), None).unwrap();
        assert_eq!(r.task_id.as_deref(), Some("878106242831892487"));
        assert_eq!(r.updated_at_ms, Some(17));
        assert_eq!(r.final_unit_deduction.as_deref(), Some("2"));
        assert_eq!(r.images[0].index, 1);

        // CometAPI's create example: an id, no status.
        let created = json!({"task_id": "9"});
        assert!(parse_task_data(&created, None).is_none());
        let r = parse_task_data(&created, Some(UpstreamStatus::Submitted)).unwrap();
        assert_eq!(r.status, UpstreamStatus::Submitted);
        assert!(parse_task_data(&json!({}), Some(UpstreamStatus::Submitted)).is_none());
    }

    #[test]
    fn callbacks_are_read_bare_or_enveloped_and_failed_envelopes_are_not_reports() {
        let bare = json!({"task_id": "7", "task_status": "succeed", "updated_at": "5",
            "task_info": {"external_task_id": "e"},
            "task_result": {"images": [{"index": 1, "url": "u1"}, {"index": 0, "url": "u0"}]}});
        let r = parse_callback(&bare).unwrap();
        assert_eq!(r.updated_at_ms, Some(5));
        assert_eq!(r.images.len(), 2);
        let wrapped = json!({"code": 0, "message": "SUCCEED", "data": bare});
        assert_eq!(parse_callback(&wrapped), Some(r));
        let failed = json!({"code": 1201, "message": "nope", "data": bare});
        assert!(parse_callback(&failed).is_none());
        assert!(parse_callback(&json!({"task_status": "weird"})).is_none());
    }

    #[test]
    fn nul_characters_from_upstream_are_dropped() {
        let r = parse_callback(&json!({"task_id": "7\u{0}", "task_status": "failed",
            "task_status_msg": "bad\u{0} input"}))
        .unwrap();
        assert_eq!(r.task_id.as_deref(), Some("7"));
        assert_eq!(r.status_msg.as_deref(), Some("bad input"));
        assert_eq!(message_of(&json!({"message": "x\u{0}y"})), "xy");
    }

    #[test]
    fn messages_and_codes_are_found_in_openai_style_errors_too() {
        let e = json!({"error": {"code": "invalid_api_key", "message": "Invalid token"}});
        assert_eq!(code_of(&e).as_deref(), Some("invalid_api_key"));
        assert_eq!(message_of(&e), "Invalid token");
    }
}
