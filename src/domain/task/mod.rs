//! Tasks: their statuses, the one status machine that every source of news goes through, the
//! stored record and its input images, one file each.

mod inputs;
mod machine;
mod record;
mod status;

pub use inputs::*;
pub use machine::*;
pub use record::*;
pub use status::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_input_summary_keeps_what_the_images_were_without_them() {
        use base64::Engine;
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        png.extend_from_slice(&1024u32.to_be_bytes());
        png.extend_from_slice(&768u32.to_be_bytes());
        png.resize(3_000_000, 7);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
        let inputs = TaskInputs {
            subject_images: vec!["https://example.com/a.png".into(), b64.clone()],
            scene_image: None,
            style_image: Some("bm90IGFuIGltYWdl".into()),
            negative_prompt: None,
            watermark_info: None,
        };
        let s = inputs.summary();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].url.as_deref(), Some("https://example.com/a.png"));
        assert_eq!(s[0].base64_bytes, None);
        assert_eq!(s[1].base64_bytes, Some(3_000_000));
        assert_eq!(
            (s[1].format.as_deref(), s[1].width, s[1].height),
            (Some("png"), Some(1024), Some(768))
        );
        assert_eq!(
            (s[2].role.as_str(), s[2].format.as_deref()),
            ("style", None)
        );
        assert_eq!(base64_len(&s), b64.len() + 16);
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.len() < 300, "{text}");
    }

    fn state(status: TaskStatus, upstream: Option<&str>, updated: Option<i64>) -> TaskState {
        TaskState {
            status,
            upstream_task_id: upstream.map(str::to_owned),
            external_task_id: "ext-1".into(),
            upstream_updated_at_ms: updated,
            dispatch_started: false,
        }
    }

    fn report(status: UpstreamStatus, task_id: &str, updated: i64) -> UpstreamReport {
        UpstreamReport {
            task_id: Some(task_id.into()),
            external_task_id: Some("ext-1".into()),
            status,
            status_msg: None,
            updated_at_ms: Some(updated),
            images: vec![],
            final_unit_deduction: None,
            raw: None,
        }
    }

    #[test]
    fn moves_forward_and_binds_the_upstream_id() {
        let s = state(TaskStatus::Pending, None, None);
        let t = apply_report(&s, &report(UpstreamStatus::Processing, "u1", 10)).unwrap();
        let Transition::Apply(c) = t else {
            panic!("expected a change")
        };
        assert_eq!(c.status, TaskStatus::Processing);
        assert_eq!(c.bind_upstream_task_id.as_deref(), Some("u1"));
        assert_eq!(c.upstream_updated_at_ms, Some(10));
    }

    #[test]
    fn never_moves_backwards_or_out_of_a_final_status() {
        let s = state(TaskStatus::Processing, Some("u1"), Some(20));
        assert_eq!(
            apply_report(&s, &report(UpstreamStatus::Submitted, "u1", 30)).unwrap(),
            Transition::Ignore(IgnoreReason::Stale)
        );
        let done = state(TaskStatus::Succeeded, Some("u1"), Some(20));
        assert_eq!(
            apply_report(&done, &report(UpstreamStatus::Failed, "u1", 40)).unwrap(),
            Transition::Ignore(IgnoreReason::AlreadyFinal)
        );
    }

    #[test]
    fn same_status_is_a_duplicate_and_older_same_status_is_stale() {
        let s = state(TaskStatus::Processing, Some("u1"), Some(20));
        assert_eq!(
            apply_report(&s, &report(UpstreamStatus::Processing, "u1", 20)).unwrap(),
            Transition::Ignore(IgnoreReason::Duplicate)
        );
        assert_eq!(
            apply_report(&s, &report(UpstreamStatus::Processing, "u1", 5)).unwrap(),
            Transition::Ignore(IgnoreReason::Stale)
        );
    }

    #[test]
    fn refuses_a_report_for_another_task() {
        let s = state(TaskStatus::Submitted, Some("u1"), None);
        assert!(matches!(
            apply_report(&s, &report(UpstreamStatus::Succeed, "u2", 1)),
            Err(ReportMismatch::TaskId { .. })
        ));
        let mut r = report(UpstreamStatus::Succeed, "u1", 1);
        r.external_task_id = Some("ext-other".into());
        assert!(matches!(
            apply_report(&s, &r),
            Err(ReportMismatch::ExternalTaskId { .. })
        ));
    }

    #[test]
    fn success_sorts_images_and_failure_carries_the_reason() {
        let s = state(TaskStatus::Processing, Some("u1"), None);
        let mut r = report(UpstreamStatus::Succeed, "u1", 1);
        r.images = vec![
            ResultImage {
                index: 1,
                url: "b".into(),
            },
            ResultImage {
                index: 0,
                url: "a".into(),
            },
        ];
        let Transition::Apply(c) = apply_report(&s, &r).unwrap() else {
            panic!("expected a change")
        };
        let idx: Vec<u32> = c.images.unwrap().iter().map(|i| i.index).collect();
        assert_eq!(idx, vec![0, 1]);

        let mut f = report(UpstreamStatus::Failed, "u1", 2);
        f.status_msg = Some("content moderation".into());
        let Transition::Apply(c) = apply_report(&s, &f).unwrap() else {
            panic!("expected a change")
        };
        assert_eq!(c.status, TaskStatus::Failed);
        assert_eq!(c.error.unwrap().message, "content moderation");
    }

    #[test]
    fn finishing_a_final_task_changes_nothing() {
        let s = state(TaskStatus::Failed, None, None);
        assert_eq!(
            finish_with_error(&s, TaskStatus::TimedOut, TaskError::new("timed_out", "x")),
            Transition::Ignore(IgnoreReason::AlreadyFinal)
        );
    }

    #[test]
    fn cancel_only_before_dispatch() {
        let mut s = state(TaskStatus::Pending, None, None);
        assert!(matches!(cancel(&s), Ok(Transition::Apply(c)) if c.status == TaskStatus::Canceled));
        s.dispatch_started = true;
        assert_eq!(cancel(&s), Err(CancelRefused::AlreadySent));
        let sent = state(TaskStatus::Submitted, Some("u"), None);
        assert_eq!(cancel(&sent), Err(CancelRefused::AlreadySent));
        let done = state(TaskStatus::Succeeded, Some("u"), None);
        assert_eq!(
            cancel(&done),
            Err(CancelRefused::AlreadyFinal(TaskStatus::Succeeded))
        );
        let canceled = state(TaskStatus::Canceled, None, None);
        assert_eq!(
            cancel(&canceled),
            Ok(Transition::Ignore(IgnoreReason::AlreadyFinal))
        );
    }

    #[test]
    fn statuses_round_trip_through_their_names() {
        for s in TaskStatus::ALL {
            assert_eq!(s.as_str().parse::<TaskStatus>().unwrap(), s);
        }
        assert!("succeed".parse::<TaskStatus>().is_err());
    }
}
