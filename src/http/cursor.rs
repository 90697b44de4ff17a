//! The list cursor: an opaque token for "after this task" in newest-first history, the keyset
//! `(created_at, id)` of the last task already seen, base64url so it travels in a query string.

use base64::Engine;

pub(super) fn encode_cursor(created_at_ms: i64, id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{created_at_ms}:{id}"))
}

/// The keyset of a cursor this service issued; None for anything else.
pub(super) fn decode_cursor(s: &str) -> Option<(i64, String)> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (at, id) = text.split_once(':')?;
    let id = uuid::Uuid::parse_str(id).ok()?;
    Some((at.parse().ok()?, id.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let id = uuid::Uuid::now_v7().to_string();
        let c = encode_cursor(1234, &id);
        assert_eq!(decode_cursor(&c), Some((1234, id)));
        assert!(decode_cursor("nope").is_none());
        assert!(decode_cursor(&encode_cursor(1, "not-a-uuid")).is_none());
    }
}
