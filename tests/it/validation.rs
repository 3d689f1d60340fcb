//! One test per validation rule: each asserts the violation names the field, that the
//! description does not echo personal data, and that nothing was stored.

use rating_hub::pb::v1 as pb;

use crate::ingest::count;
use crate::utils::*;

/// Submits `r` to a fresh hub and returns the violations, asserting it was refused and
/// nothing was stored.
async fn refused(r: pb::Rating) -> Vec<pb::FieldViolation> {
    refused_with(&[], r).await
}

async fn refused_with(overrides: &[(&str, &str, &str)], r: pb::Rating) -> Vec<pb::FieldViolation> {
    // The rater's personal data as sent: no violation may echo it (every test here).
    let pii: Vec<String> = r
        .rater
        .iter()
        .flat_map(|p| [p.name.clone(), p.id_number.clone(), p.phone.clone()])
        .filter(|v| v.chars().count() >= 2)
        .collect();
    let hub = TestHub::start_with(overrides).await;
    let mut ingest = hub.ingest().await;
    let result = submit_one(&mut ingest, r).await;
    assert_eq!(outcome(&result), pb::Outcome::Invalid, "{result:?}");
    assert_eq!(count(&hub).await, 0, "nothing rejected is stored");
    hub.stop().await;
    for v in &result.violations {
        for value in &pii {
            assert!(
                !v.description.contains(value.as_str()) && !v.field.contains(value.as_str()),
                "a violation echoes the rater's {value:?}: {v:?}"
            );
        }
    }
    result.violations
}

fn assert_names(violations: &[pb::FieldViolation], field: &str) {
    assert!(
        violations.iter().any(|v| v.field == field),
        "expected a violation of {field}, got {violations:?}"
    );
}

#[tokio::test]
async fn source_key_is_required() {
    let mut r = rating("x");
    r.source_key = "  ".into();
    assert_names(&refused(r).await, "source_key");
}

#[tokio::test]
async fn source_key_is_bounded() {
    let r = rating(&"k".repeat(129));
    assert_names(&refused(r).await, "source_key");
}

#[tokio::test]
async fn level_is_required() {
    let mut r = rating("x");
    r.level = pb::Level::Unspecified as i32;
    assert_names(&refused(r).await, "level");
}

#[tokio::test]
async fn level_must_be_a_known_value() {
    let mut r = rating("x");
    r.level = 9;
    assert_names(&refused(r).await, "level");
}

#[tokio::test]
async fn channel_is_required() {
    let mut r = rating("x");
    r.channel = 0;
    assert_names(&refused(r).await, "channel");
}

#[tokio::test]
async fn target_kind_is_required() {
    let mut r = rating("x");
    r.target_kind = 0;
    assert_names(&refused(r).await, "target_kind");
}

#[tokio::test]
async fn item_rating_needs_a_case_number() {
    let mut r = rating("x");
    r.case_number.clear();
    assert_names(&refused(r).await, "case_number");
}

#[tokio::test]
async fn item_rating_needs_an_item_code() {
    let mut r = rating("x");
    r.item_code.clear();
    assert_names(&refused(r).await, "item_code");
}

#[tokio::test]
async fn staff_rating_needs_a_staff_id() {
    let mut r = rating("x");
    r.target_kind = pb::TargetKind::Staff as i32;
    r.staff_id.clear();
    assert_names(&refused(r).await, "staff_id");
}

#[tokio::test]
async fn org_credit_code_check_character_is_verified() {
    let mut r = rating("x");
    let mut code = org(1).into_bytes();
    code[17] = if code[17] == b'0' { b'1' } else { b'0' };
    r.org_credit_code = String::from_utf8(code).unwrap();
    let v = refused(r).await;
    assert_names(&v, "org_credit_code");
    assert!(v[0].description.contains("GB 32100"), "{v:?}");
}

#[tokio::test]
async fn org_credit_code_is_required() {
    let mut r = rating("x");
    r.org_credit_code.clear();
    assert_names(&refused(r).await, "org_credit_code");
}

#[tokio::test]
async fn region_code_must_be_6_9_or_12_digits_of_a_province() {
    let mut r = rating("x");
    r.region_code = "5301".into();
    assert_names(&refused(r).await, "region_code");
    let mut r = rating("y");
    r.region_code = "990102".into();
    assert_names(&refused(r).await, "region_code");
}

#[tokio::test]
async fn rater_id_number_check_digit_is_verified_and_never_echoed() {
    let mut r = rating("x");
    let mut id = id_number().into_bytes();
    id[17] = if id[17] == b'0' { b'1' } else { b'0' };
    let id = String::from_utf8(id).unwrap();
    r.rater.as_mut().unwrap().id_number = id.clone();
    let v = refused(r).await;
    assert_names(&v, "rater.id_number");
    assert!(
        v.iter().all(|x| !x.description.contains(&id[6..14])),
        "{v:?}"
    );
}

#[tokio::test]
async fn rater_phone_must_be_a_mobile_or_landline_number() {
    let mut r = rating("x");
    r.rater.as_mut().unwrap().phone = "12345".into();
    let v = refused(r).await;
    assert_names(&v, "rater.phone");
    assert!(v.iter().all(|x| !x.description.contains("12345")));
}

#[tokio::test]
async fn organisation_raters_use_credit_code_not_id_number() {
    let mut r = rating("x");
    r.rater.as_mut().unwrap().kind = pb::RaterKind::EnterpriseLegalPerson as i32;
    assert_names(&refused(r).await, "rater.id_number");
}

#[tokio::test]
async fn rated_at_is_required() {
    let mut r = rating("x");
    r.rated_at = None;
    assert_names(&refused(r).await, "rated_at");
}

#[tokio::test]
async fn rated_at_may_not_be_in_the_future_beyond_the_skew() {
    let mut r = rating("x");
    r.rated_at = Some(ts(now().seconds + 3600));
    let v = refused(r).await;
    assert_names(&v, "rated_at");
    assert!(v[0].description.contains("future"));
}

#[tokio::test]
async fn rated_at_within_the_skew_is_accepted() {
    let hub = TestHub::start().await;
    let mut r = rating("x");
    r.rated_at = Some(ts(now().seconds + 60));
    let result = submit_one(&mut hub.ingest().await, r).await;
    assert_eq!(outcome(&result), pb::Outcome::Accepted);
    hub.stop().await;
}

#[tokio::test]
async fn rated_at_before_2000_is_refused() {
    let mut r = rating("x");
    r.rated_at = Some(ts(900_000_000));
    assert_names(&refused(r).await, "rated_at");
}

#[tokio::test]
async fn service_completed_at_may_not_be_in_the_future() {
    let mut r = rating("x");
    r.service_completed_at = Some(ts(now().seconds + 3600));
    assert_names(&refused(r).await, "service_completed_at");
}

#[tokio::test]
async fn rating_before_case_completion_is_accepted_and_flagged() {
    let hub = TestHub::start().await;
    let mut r = rating("early");
    let t = now().seconds;
    r.rated_at = Some(ts(t - 3600));
    r.service_completed_at = Some(ts(t - 60));
    let result = submit_one(&mut hub.ingest().await, r).await;
    assert_eq!(outcome(&result), pb::Outcome::Accepted);
    let flag = pb::QualityFlag::RatedBeforeCompletion as i32;
    assert_eq!(result.quality_flags, [flag]);
    let stored = hub
        .query()
        .await
        .get_rating(pb::GetRatingRequest {
            hub_id: result.hub_id,
        })
        .await
        .unwrap()
        .into_inner()
        .rating
        .unwrap();
    assert_eq!(
        stored.quality_flags,
        [flag],
        "the flag is visible in queries"
    );
    hub.stop().await;
}

/// None of the five policy texts requires a reason for a 差评, and hall devices and SMS or
/// IVR key presses send only a level: accepted by default, and its case opens (the reason
/// is collected when the case is verified).
#[tokio::test]
async fn bad_rating_without_detail_codes_or_text_is_accepted_by_default_and_opens_its_case() {
    let hub = TestHub::start().await;
    let mut r = rating("x");
    r.level = pb::Level::Dissatisfied as i32;
    let result = submit_one(&mut hub.ingest().await, r).await;
    assert_eq!(outcome(&result), pb::Outcome::Accepted, "{result:?}");
    let cases = pb::rectification_service_client::RectificationServiceClient::new(
        hub.channel_as("tester").await,
    )
    .list_cases(pb::ListCasesRequest::default())
    .await
    .unwrap()
    .into_inner()
    .cases;
    assert_eq!(
        cases.iter().map(|c| c.hub_id.clone()).collect::<Vec<_>>(),
        [result.hub_id]
    );
    hub.stop().await;
}

#[tokio::test]
async fn bad_rating_without_a_reason_is_refused_where_configured() {
    let hub = TestHub::start_with(&[("validation", "require_reason_for_bad", "true")]).await;
    let mut r = rating("x");
    r.level = pb::Level::Dissatisfied as i32;
    let result = submit_one(&mut hub.ingest().await, r).await;
    assert_eq!(outcome(&result), pb::Outcome::Invalid);
    assert_eq!(result.violations[0].field, "detail_codes");
    hub.stop().await;
}

/// A default rating stands in for a rater who did not rate; a "default" 差评 would open
/// no case. Refused, with the field named.
#[tokio::test]
async fn a_default_rating_is_never_a_bad_rating() {
    let mut r = rating("x");
    r.level = pb::Level::VeryDissatisfied as i32;
    r.is_default = true;
    assert_names(&refused(r).await, "is_default");
}

#[tokio::test]
async fn bad_rating_with_text_or_codes_is_accepted() {
    let hub = TestHub::start().await;
    let mut ingest = hub.ingest().await;
    let mut with_text = rating("t");
    with_text.level = pb::Level::VeryDissatisfied as i32;
    with_text.text = "排队太久".into();
    let mut with_codes = rating("c");
    with_codes.level = pb::Level::Dissatisfied as i32;
    with_codes.detail_codes = vec!["501".into(), "502".into()];
    for r in submit(&mut ingest, vec![with_text, with_codes]).await {
        assert_eq!(outcome(&r), pb::Outcome::Accepted);
    }
    hub.stop().await;
}

#[tokio::test]
async fn text_is_bounded() {
    let mut r = rating("x");
    r.text = "好".repeat(2001);
    assert_names(&refused(r).await, "text");
}

#[tokio::test]
async fn detail_codes_are_bounded_in_number() {
    let mut r = rating("x");
    r.detail_codes = (0..33).map(|i| i.to_string()).collect();
    assert_names(&refused(r).await, "detail_codes");
}

#[tokio::test]
async fn detail_codes_may_not_be_empty_strings() {
    let mut r = rating("x");
    r.detail_codes = vec!["501".into(), "".into()];
    assert_names(&refused(r).await, "detail_codes[1]");
}

#[tokio::test]
async fn attributes_are_bounded() {
    let mut r = rating("x");
    r.attributes = (0..33).map(|i| (format!("k{i}"), "v".into())).collect();
    assert_names(&refused(r).await, "attributes");
}

#[tokio::test]
async fn control_characters_are_refused_in_attribute_keys_and_values() {
    let mut r = rating("x");
    r.attributes = [("device".to_string(), "A\u{0}B".to_string())].into();
    assert_names(&refused(r).await, "attributes[device]");
    let mut r = rating("x");
    r.attributes = [("dev\nice".to_string(), "A".to_string())].into();
    assert_names(&refused(r).await, "attributes");
}

#[tokio::test]
async fn names_are_bounded() {
    let mut r = rating("x");
    r.org_name = "局".repeat(201);
    assert_names(&refused(r).await, "org_name");
}

#[tokio::test]
async fn control_characters_are_refused_in_codes() {
    let mut r = rating("x");
    r.item_code = "A\u{0}B".into();
    assert_names(&refused(r).await, "item_code");
}

#[tokio::test]
async fn indicator_answers_need_a_code() {
    let mut r = rating("x");
    r.indicator_answers = vec![pb::IndicatorAnswer {
        name: "办事效率".into(),
        level: pb::Level::Satisfied as i32,
        ..Default::default()
    }];
    assert_names(&refused(r).await, "indicator_answers[0].code");
}

#[tokio::test]
async fn follow_up_cannot_name_itself() {
    let mut r = rating("x");
    r.follow_up_of = "x".into();
    assert_names(&refused(r).await, "follow_up_of");
}

#[tokio::test]
async fn every_violation_of_an_item_is_reported_at_once() {
    let mut r = rating("x");
    r.level = 0;
    r.channel = 0;
    r.region_code = "1".into();
    let v = refused(r).await;
    for field in ["level", "channel", "region_code"] {
        assert_names(&v, field);
    }
}

#[tokio::test]
async fn stream_item_without_a_rating_is_answered_invalid() {
    use tokio_stream::StreamExt;
    let hub = TestHub::start().await;
    let mut ingest = hub.ingest().await;
    let outbound = tokio_stream::iter(vec![
        pb::StreamRatingsRequest { rating: None },
        pb::StreamRatingsRequest {
            rating: Some(rating("ok")),
        },
    ]);
    let acks: Vec<_> = ingest
        .stream_ratings(outbound)
        .await
        .unwrap()
        .into_inner()
        .map(|a| a.unwrap().result.unwrap())
        .collect()
        .await;
    assert_eq!(outcome(&acks[0]), pb::Outcome::Invalid);
    assert_eq!(acks[0].violations[0].field, "rating");
    assert_eq!(outcome(&acks[1]), pb::Outcome::Accepted);
    assert_eq!(acks[1].index, 1);
    hub.stop().await;
}

/// 证件类型: every document type is accepted with a number of its own format (a Hong Kong
/// resident's travel permit, a foreigner's passport are never refused for not being a
/// mainland ID), refused naming `rater.id_number` when the number does not fit the type,
/// and shown masked to callers without the read-pii privilege.
#[tokio::test]
async fn every_identity_document_type_is_checked_by_its_own_rule() {
    use pb::IdDocumentType as T;
    use rating_hub::domain::codes::id_number_with_check;
    let check = |first17: &str| id_number_with_check(first17).unwrap();
    let valid = [
        (T::Unspecified, check("11010519491231002")),
        (T::ResidentIdCard, check("11010519491231002")),
        (T::HmtResidencePermit, check("81000019800101001")),
        (T::HmtResidencePermit, check("83000019800101001")),
        (T::ForeignPermanentResident, check("91184019800101001")),
        (T::ForeignPermanentResident, "USA118001010010".to_owned()),
        (T::HkMacaoTravelPermit, "H12345678".to_owned()),
        (T::HkMacaoTravelPermit, "m1234567890".to_owned()),
        (T::HkMacaoTravelPermit, "HA1234567".to_owned()),
        (T::TaiwanTravelPermit, "12345678".to_owned()),
        (T::Passport, "E12345678".to_owned()),
        (T::Other, "军官证字第0001号".to_owned()),
    ];
    let mut bad_check = check("11010519491231002");
    bad_check.replace_range(17.., if bad_check.ends_with('0') { "1" } else { "0" });
    let invalid = [
        (T::Unspecified, bad_check.clone()),
        (T::ResidentIdCard, "H12345678".to_owned()),
        // A mainland number is not a residence permit, nor a permanent resident's.
        (T::HmtResidencePermit, check("11010519491231002")),
        (T::ForeignPermanentResident, check("11010519491231002")),
        (T::ForeignPermanentResident, "USA119913010010".to_owned()),
        (T::ForeignPermanentResident, "US1118001010010".to_owned()),
        (T::HkMacaoTravelPermit, "X12345678".to_owned()),
        (T::HkMacaoTravelPermit, "H1234567".to_owned()),
        (T::TaiwanTravelPermit, "1234567".to_owned()),
        (T::Passport, "E1".to_owned()),
        (T::Passport, "E1234-5678".to_owned()),
        (T::Other, "x".repeat(40)),
    ];
    let hub = HubBuilder::new()
        .principal("reader", &["read"], TestScope::National)
        .start()
        .await;
    let mut ingest = hub.ingest().await;
    let mut query = QueryServiceClient::new(hub.channel_as("reader").await);
    for (i, (kind, number)) in valid.iter().enumerate() {
        let mut r = rating(&format!("ok-{i}"));
        let rater = r.rater.as_mut().unwrap();
        rater.id_type = *kind as i32;
        rater.id_number = number.clone();
        let result = submit_one(&mut ingest, r).await;
        assert_eq!(
            outcome(&result),
            pb::Outcome::Accepted,
            "{kind:?}: {result:?}"
        );
        let got = query
            .get_rating(pb::GetRatingRequest {
                hub_id: result.hub_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .rating
            .unwrap();
        let rater = got.rater.unwrap();
        assert_eq!(rater.id_type, *kind as i32, "the type is kept");
        assert!(
            rater.id_number.contains('*') && rater.id_number != number.to_uppercase(),
            "{kind:?}: masked for a caller without read-pii, got {:?}",
            rater.id_number
        );
    }
    for (i, (kind, number)) in invalid.iter().enumerate() {
        let mut r = rating(&format!("bad-{i}"));
        let rater = r.rater.as_mut().unwrap();
        rater.id_type = *kind as i32;
        rater.id_number = number.clone();
        let result = submit_one(&mut ingest, r).await;
        assert_eq!(outcome(&result), pb::Outcome::Invalid, "{kind:?} {number}");
        assert_names(&result.violations, "rater.id_number");
        for v in &result.violations {
            assert!(
                !v.description.contains(number.as_str()),
                "{v:?} echoes the number"
            );
        }
    }
    // A type without a number (a source column's default) is dropped, never a refusal.
    let mut r = rating("type-only");
    let rater = r.rater.as_mut().unwrap();
    rater.id_type = T::Passport as i32;
    rater.id_number.clear();
    let result = submit_one(&mut ingest, r).await;
    assert_eq!(outcome(&result), pb::Outcome::Accepted, "{result:?}");
    let got = query
        .get_rating(pb::GetRatingRequest {
            hub_id: result.hub_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .rating
        .unwrap();
    assert_eq!(
        got.rater.unwrap().id_type,
        0,
        "the type without a number is dropped"
    );
    assert_eq!(
        crate::ingest::count(&hub).await,
        valid.len() as u64 + 1,
        "only the valid ones are stored"
    );
    hub.stop().await;
}
