//! Generated inputs to every parser of what enters the hub: protobuf decoding of every RPC's
//! request (the wire guard first, as the server runs it), the rating and 办件 validation, the
//! code parsers (统一社会信用代码, 居民身份证号码, 行政区划代码, phone), the timestamp
//! conversion and the configuration loader. None may panic, whatever the input; what they
//! accept must hold their own invariants.
//!
//! The inputs are shaped where random bytes rarely go: long digit runs, extreme timestamps and
//! nanos, control characters, full-width forms, fields repeated far past their limits,
//! truncated and grouped wire data.
//!
//! CI runs `PROPTEST_CASES` (default 256) cases per property. The long run (docs/reliability.md)
//! is `PROPTEST_CASES=125000 cargo test --release --test fuzz` — over 1 M cases in all.

use proptest::prelude::*;
use prost::Message;
use rating_hub::codec::guard;
use rating_hub::domain::{
    CreditCode, IdNumber, IngestRules, Phone, RegionCode, parse_case, parse_rating,
};
use rating_hub::pb::v1 as pb;

/// Text in the shapes that break parsers: digits (long runs), ASCII, CJK, full-width forms,
/// control characters (NUL, line breaks, escape), and anything.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{0,40}",
        "[0-9X-]{15,20}",
        "[ -~]{0,40}",
        "[\u{4e00}-\u{4e50}]{0,20}",
        "[０-９Ａ-Ｚ]{0,20}",
        "[\u{0}-\u{1f}]{0,5}",
        "\\PC{0,30}",
        any::<String>(),
    ]
}

fn timestamp() -> impl Strategy<Value = Option<prost_types::Timestamp>> {
    prop_oneof![
        Just(None),
        (any::<i64>(), any::<i32>())
            .prop_map(|(seconds, nanos)| Some(prost_types::Timestamp { seconds, nanos })),
        (946_684_800i64..4_102_444_800, 0i32..1_000_000_000)
            .prop_map(|(seconds, nanos)| Some(prost_types::Timestamp { seconds, nanos })),
    ]
}

fn enum_value() -> impl Strategy<Value = i32> {
    prop_oneof![0i32..8, any::<i32>()]
}

fn rater() -> impl Strategy<Value = Option<pb::Rater>> {
    proptest::option::of(
        (
            enum_value(),
            text(),
            text(),
            enum_value(),
            text(),
            text(),
            any::<bool>(),
        )
            .prop_map(
                |(kind, name, id_number, id_type, credit_code, phone, real_name)| pb::Rater {
                    kind,
                    name,
                    id_number,
                    id_type,
                    credit_code,
                    phone,
                    real_name,
                },
            ),
    )
}

prop_compose! {
    fn rating()(
        source_key in text(),
        channel in enum_value(),
        level in enum_value(),
        target_kind in enum_value(),
        case_number in text(),
        item_code in text(),
        region_code in text(),
        org_credit_code in text(),
        staff_id in text(),
        text_ in text(),
        detail_codes in proptest::collection::vec(text(), 0..40),
        indicators in proptest::collection::vec((text(), enum_value(), text()), 0..40),
        attributes in proptest::collection::btree_map(text(), text(), 0..40),
        rated_at in timestamp(),
        completed_at in timestamp(),
        rater in rater(),
        follow_up_of in text(),
        batch_id in text(),
        is_default in any::<bool>(),
        hub_id in text(),
    ) -> pb::Rating {
        pb::Rating {
            source_key,
            channel,
            level,
            target_kind,
            case_number,
            item_code,
            region_code,
            org_credit_code,
            staff_id,
            text: text_,
            detail_codes,
            indicator_answers: indicators
                .into_iter()
                .map(|(code, level, text)| pb::IndicatorAnswer { code, level, text, ..Default::default() })
                .collect(),
            attributes,
            rated_at,
            service_completed_at: completed_at,
            rater,
            follow_up_of,
            batch_id,
            is_default,
            hub_id,
            ..Default::default()
        }
    }
}

prop_compose! {
    fn case()(
        case_number in text(),
        event in enum_value(),
        occurred_at in timestamp(),
        item_code in text(),
        region_code in text(),
        org_credit_code in text(),
        channel in enum_value(),
        applicant in rater(),
        attributes in proptest::collection::btree_map(text(), text(), 0..40),
    ) -> pb::ServiceCase {
        pb::ServiceCase {
            case_number,
            event,
            occurred_at,
            item_code,
            region_code,
            org_credit_code,
            channel,
            applicant,
            attributes,
            ..Default::default()
        }
    }
}

/// Now, in the hub's microseconds: a fixed moment, so a failure replays.
const NOW: i64 = 1_764_460_800_000_000;

/// Decodes as the server does: the guard, then prost.
fn decode<M: Message + Default + 'static>(bytes: &[u8]) -> Option<M> {
    guard::<M>(bytes).ok()?;
    M::decode(bytes).ok()
}

/// Wire data in the shapes that break decoders: a valid message cut short, with bytes
/// flipped, with a group or garbage appended, or random bytes.
fn mangled(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let n = valid.len();
    prop_oneof![
        Just(valid.clone()),
        (0..=n).prop_map({
            let v = valid.clone();
            move |cut| v[..cut].to_vec()
        }),
        (proptest::collection::vec((0..n.max(1), any::<u8>()), 1..8)).prop_map({
            let v = valid.clone();
            move |flips| {
                let mut v = v.clone();
                for (i, b) in flips {
                    if let Some(x) = v.get_mut(i) {
                        *x = b;
                    }
                }
                v
            }
        }),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map({
            let v = valid.clone();
            move |tail| [v.clone(), vec![0xa3, 0x01], tail].concat()
        }),
        proptest::collection::vec(any::<u8>(), 0..512),
    ]
}

mod properties {
    use super::*;

    proptest! {
        fn check_rating_validation_never_panics_and_what_it_accepts_is_bounded(r in rating(), relay in any::<bool>()) {
            let rules = IngestRules::default();
            if let Ok(v) = parse_rating(&r, NOW, &rules, relay) {
                let body = &v.body;
                prop_assert!(body.detail_codes.len() <= 32);
                prop_assert!(body.indicator_answers.len() <= 32);
                prop_assert!(body.attributes.len() <= 32);
                prop_assert!(!body.text.chars().any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t')));
                prop_assert!(body.attributes.iter().all(|(k, v)| !k.chars().any(char::is_control) && !v.chars().any(char::is_control)));
                prop_assert!(matches!(body.region_code.len(), 6 | 9 | 12));
                prop_assert!(!(body.is_default && rating_hub::domain::rating::is_bad(v.level)));
            }
        }

        fn check_case_validation_never_panics(c in case()) {
            let _ = parse_case(&c, NOW, &IngestRules::default());
        }

        fn check_code_parsers_never_panic_and_accept_only_their_shapes(s in text()) {
            if let Ok(c) = CreditCode::parse(&s) {
                prop_assert_eq!(c.as_str().chars().count(), 18);
            }
            let _ = IdNumber::parse(&s);
            if let Ok(r) = RegionCode::parse(&s) {
                prop_assert!(r.as_str().bytes().all(|b| b.is_ascii_digit()));
            }
            let _ = Phone::parse(&s);
            let _ = rating_hub::domain::codes::redact_numbers(&s);
            let _ = rating_hub::domain::codes::mask_name(&s);
            let _ = rating_hub::domain::codes::mask_phone(&s);
            let _ = rating_hub::domain::codes::mask_id_number(&s);
        }

        fn check_timestamps_convert_without_overflow(ts in timestamp()) {
            if let Some(ts) = ts && let Some(m) = rating_hub::time::micros_from_timestamp(&ts) {
                let back = rating_hub::time::timestamp_from_micros(m);
                prop_assert_eq!(back.seconds, ts.seconds);
            }
        }

        fn check_ingest_requests_decode_or_are_refused_never_panic(
            (bytes, _) in proptest::collection::vec(rating(), 0..6)
                .prop_flat_map(|ratings| {
                    let valid = pb::SubmitRatingsRequest { ratings }.encode_to_vec();
                    (mangled(valid), Just(()))
                })
        ) {
            if let Some(req) = decode::<pb::SubmitRatingsRequest>(&bytes) {
                let rules = IngestRules::default();
                for r in &req.ratings {
                    let _ = parse_rating(r, NOW, &rules, false);
                }
            }
            let _ = decode::<pb::StreamRatingsRequest>(&bytes);
            let _ = decode::<pb::ReportServiceCasesRequest>(&bytes);
        }

        fn check_a_request_within_the_limits_passes_the_guard(ratings in proptest::collection::vec(rating(), 0..6)) {
            let within: Vec<pb::Rating> = ratings
                .into_iter()
                .map(|mut r| {
                    r.detail_codes.truncate(32);
                    r.indicator_answers.truncate(32);
                    while r.attributes.len() > 32 {
                        let k = r.attributes.keys().next().cloned().unwrap();
                        r.attributes.remove(&k);
                    }
                    r
                })
                .collect();
            let bytes = pb::SubmitRatingsRequest { ratings: within.clone() }.encode_to_vec();
            prop_assert!(guard::<pb::SubmitRatingsRequest>(&bytes).is_ok());
            let decoded = decode::<pb::SubmitRatingsRequest>(&bytes).expect("decodes");
            prop_assert_eq!(decoded.ratings, within);
        }

        fn check_every_other_request_decodes_or_fails_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<pb::ListRatingsRequest>(&bytes);
            let _ = decode::<pb::GetRatingRequest>(&bytes);
            let _ = decode::<pb::GetStatsRequest>(&bytes);
            let _ = decode::<pb::ExportReportRequest>(&bytes);
            let _ = decode::<pb::PullRequest>(&bytes);
            let _ = decode::<pb::SubscribeRequest>(&bytes);
            let _ = decode::<pb::ReconcileRequest>(&bytes);
            let _ = decode::<pb::ListInvitationsRequest>(&bytes);
            let _ = decode::<pb::ListUpstreamsRequest>(&bytes);
            let _ = decode::<pb::ListDeadLettersRequest>(&bytes);
            let _ = decode::<pb::ReplayDeadLettersRequest>(&bytes);
            let _ = decode::<pb::ListPiiAccessRequest>(&bytes);
            let _ = decode::<pb::RecordActionRequest>(&bytes);
            let _ = decode::<pb::FileAppealRequest>(&bytes);
            let _ = decode::<pb::DecideAppealRequest>(&bytes);
            let _ = decode::<pb::ListCasesRequest>(&bytes);
            let _ = decode::<pb::WatchCasesRequest>(&bytes);
            let _ = decode::<pb::GetCaseRequest>(&bytes);
            let _ = decode::<pb::PauseUpstreamRequest>(&bytes);
            let _ = decode::<pb::ResumeUpstreamRequest>(&bytes);
        }

        fn check_the_configuration_loader_never_panics(
            section in "(server|storage|tls|limits|rules|log|validation|quality|upstreams\\.x|principals\\.p)",
            key in "[a-z_]{1,20}",
            value in prop_oneof![text(), "-?[0-9]{1,25}", Just("[1, 2]".to_owned()), Just("{ a = 1 }".to_owned())],
            env in any::<bool>(),
        ) {
            if env {
                let var = format!("RATING_HUB__{}__{}", section.replace('.', "__").to_uppercase(), key.to_uppercase());
                let _ = rating_hub::config::Config::from_layers(None, std::iter::once((var, value)));
            } else {
                let toml = format!("[{section}]\n{key} = {value:?}\n");
                let _ = rating_hub::config::Config::from_layers(Some(("fuzz.toml", &toml)), std::iter::empty());
            }
        }
    }

    #[test]
    fn rating_validation_never_panics_and_what_it_accepts_is_bounded() {
        on_a_large_stack(check_rating_validation_never_panics_and_what_it_accepts_is_bounded);
    }

    #[test]
    fn case_validation_never_panics() {
        on_a_large_stack(check_case_validation_never_panics);
    }

    #[test]
    fn code_parsers_never_panic_and_accept_only_their_shapes() {
        on_a_large_stack(check_code_parsers_never_panic_and_accept_only_their_shapes);
    }

    #[test]
    fn timestamps_convert_without_overflow() {
        on_a_large_stack(check_timestamps_convert_without_overflow);
    }

    #[test]
    fn ingest_requests_decode_or_are_refused_never_panic() {
        on_a_large_stack(check_ingest_requests_decode_or_are_refused_never_panic);
    }

    #[test]
    fn a_request_within_the_limits_passes_the_guard() {
        on_a_large_stack(check_a_request_within_the_limits_passes_the_guard);
    }

    #[test]
    fn every_other_request_decodes_or_fails_cleanly() {
        on_a_large_stack(check_every_other_request_decodes_or_fails_cleanly);
    }

    #[test]
    fn the_configuration_loader_never_panics() {
        on_a_large_stack(check_the_configuration_loader_never_panics);
    }
}

/// Runs a property on a thread with a large stack: the rating strategy's value trees are deep,
/// and an unoptimised test build's frames overflow the test harness's 2 MiB threads.
fn on_a_large_stack(property: fn()) {
    let run = std::thread::Builder::new()
        .stack_size(256 << 20)
        .spawn(property)
        .expect("thread");
    if let Err(panic) = run.join() {
        std::panic::resume_unwind(panic);
    }
}
