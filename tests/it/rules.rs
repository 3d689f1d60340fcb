//! The rules end to end with a controllable clock: cases completed → reminder → default
//! rating after the deadline (once, across restarts); stats under Kunming's and Guangdong's
//! profiles.

use std::sync::Arc;

use rating_hub::clock::{Clock, ManualClock};
use rating_hub::pb::v1 as pb;
use rating_hub::rules::Date;

use crate::relay::SyncServiceClient;
use crate::utils::*;

pub(crate) fn cst(date: &str, hour: i64) -> i64 {
    Date::parse(date).unwrap().start_micros() + hour * 3_600_000_000
}

pub(crate) fn completed(case: &str, region: &str, at_micros: i64) -> pb::ServiceCase {
    pb::ServiceCase {
        case_number: case.into(),
        event: pb::CaseEvent::Completed as i32,
        occurred_at: Some(rating_hub::time::timestamp_from_micros(at_micros)),
        item_code: "530100-ITEM-001".into(),
        item_name: "企业设立登记".into(),
        region_code: region.into(),
        org_credit_code: org(1),
        channel: pb::Channel::HallDevice as i32,
        applicant: Some(pb::Rater {
            name: "王五".into(),
            phone: "13700001111".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub(crate) async fn report(hub: &TestHub, cases: Vec<pb::ServiceCase>) {
    let results = hub
        .ingest()
        .await
        .report_service_cases(pb::ReportServiceCasesRequest { cases })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(
        results.iter().all(|r| outcome(r) == pb::Outcome::Accepted),
        "{results:?}"
    );
}

pub(crate) async fn defaults(hub: &TestHub) -> Vec<pb::Rating> {
    hub.query()
        .await
        .list_ratings(pb::ListRatingsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .ratings
        .into_iter()
        .filter(|r| r.is_default)
        .collect()
}

pub(crate) async fn invitations(hub: &TestHub) -> Vec<pb::Invitation> {
    SyncServiceClient::new(hub.channel_as("tester").await)
        .list_invitations(pb::ListInvitationsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .invitations
}

#[tokio::test]
async fn completed_cases_get_reminders_then_default_ratings_once() {
    // Completed on Tuesday 2025-09-30, 10:00 CST, just before the National Day week.
    let t0 = cst("2025-09-30", 10);
    let clock = Arc::new(ManualClock::at(t0 + 60_000_000));
    let hub = HubBuilder::new().clock(clock.clone()).start().await;
    report(
        &hub,
        vec![
            completed("KM-1", "530102", t0),
            completed("KM-2", "530102", t0),
            completed("GD-1", "440103", t0),
        ],
    )
    .await;
    // KM-2 is rated by its applicant in time: it never gets a default.
    let mut r = rating("km-2-rating");
    r.case_number = "KM-2".into();
    r.rated_at = Some(rating_hub::time::timestamp_from_micros(clock.now_micros()));
    assert_eq!(
        outcome(&submit_one(&mut hub.ingest().await, r).await),
        pb::Outcome::Accepted
    );

    let engine = hub.hub.rules();
    let report0 = engine.tick().await.unwrap();
    assert_eq!((report0.invitations, report0.default_ratings), (0, 0));

    // Guangdong: an SMS invitation 24 hours after completion.
    clock.set(t0 + 24 * 3_600_000_000 + 1);
    assert_eq!(engine.tick().await.unwrap().invitations, 1);
    let inv = invitations(&hub).await;
    assert_eq!(inv.len(), 1);
    let case = inv[0].service_case.as_ref().unwrap();
    assert_eq!(case.case_number, "GD-1");
    assert_eq!(
        case.applicant.as_ref().unwrap().phone,
        "13700001111",
        "tester holds read-pii"
    );
    assert_eq!(
        engine.tick().await.unwrap().invitations,
        0,
        "one invitation per case"
    );

    // Kunming: 基本满意 after 5 working days — the Golden Week does not count, the make-up
    // Saturday 10-11 does: the deadline is the end of Tuesday 2025-10-14.
    clock.set(cst("2025-10-14", 23));
    assert_eq!(
        engine.tick().await.unwrap().default_ratings,
        0,
        "not before the deadline"
    );
    assert!(defaults(&hub).await.is_empty());
    clock.set(cst("2025-10-15", 0) + 1);
    let tick = engine.tick().await.unwrap();
    assert_eq!(tick.default_ratings, 1);
    let d = defaults(&hub).await;
    assert_eq!(d.len(), 1);
    let d = &d[0];
    assert_eq!(d.case_number, "KM-1");
    assert_eq!(d.level, pb::Level::BasicallySatisfied as i32);
    assert_eq!(d.channel, pb::Channel::SystemDefault as i32);
    assert_eq!(d.source_system, "rating-hub");
    assert_eq!(
        rating_hub::time::micros_from_timestamp(&d.rated_at.unwrap()),
        Some(cst("2025-10-15", 0) - 1),
        "rated at the last moment of the period: 2025-10-14 23:59:59.999999 CST"
    );
    // Guangdong has no default rating.
    assert_eq!(
        engine.tick().await.unwrap().default_ratings,
        0,
        "never twice"
    );

    // A restart on the same database records nothing new.
    let stopped = hub.stop().await;
    let hub = stopped.restart().await;
    let again = hub.hub.rules().tick().await.unwrap();
    assert_eq!(again.default_ratings, 0);
    assert_eq!(defaults(&hub).await.len(), 1);

    // Kunming stats: 2 completed cases, both rated (one by default), under Kunming's profile.
    let g = hub
        .query()
        .await
        .get_stats(pb::GetStatsRequest {
            filter: Some(pb::RatingFilter {
                region_code_prefix: "5301".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .groups
        .remove(0);
    assert_eq!(g.profile, "kunming");
    assert_eq!(
        (g.completed_cases, g.rated_cases, g.actively_rated_cases),
        (2, 2, 1)
    );
    assert_eq!(
        (g.rating_rate, g.active_rating_rate, g.unrated_rate),
        (1.0, 0.5, 0.0)
    );
    assert_eq!(g.average_score, Some((10.0 + 6.0) / 2.0));
    // 接受评价率 is what the raters rated themselves: 50 % → 0 (the default is no rating
    // accepted; counted, every department would get the 3 points); average 8.0 → 5.
    assert_eq!(g.final_score, Some(5.0));
    assert_eq!(g.final_score_note, "");
    hub.stop().await;
}

/// Kunming stats over region 5301.
async fn kunming_group(hub: &TestHub) -> pb::StatsGroup {
    hub.query()
        .await
        .get_stats(pb::GetStatsRequest {
            filter: Some(pb::RatingFilter {
                region_code_prefix: "5301".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .groups
        .remove(0)
}

/// A rater's own rating, of case `case` in Kunming, made at `at`.
fn rated(key: &str, case: &str, level: pb::Level, at: i64) -> pb::Rating {
    let mut r = rating(key);
    r.case_number = case.into();
    r.level = level as i32;
    r.rated_at = Some(rating_hub::time::timestamp_from_micros(at));
    r
}

/// A rating made in time but entered after the hub rated the case by default (an offline
/// hall device, a paper form typed in later; Ordos: "线下评价为差评的，整改后由整改单位及时将
/// 有关信息录入") replaces the default: the citizen's 差评 is stored and opens its case, and
/// the default leaves the counts. So does a 差评 made after the default's deadline: a
/// complaint is never lost behind a default (before, it was refused, and the case kept its
/// 基本满意). Praise made after the deadline cannot replace the default (一事一评), and says
/// why.
#[tokio::test]
async fn a_rating_made_in_time_but_entered_after_the_default_replaces_it() {
    // Kunming: 基本满意 after 5 working days; deadline the end of Tuesday 2025-10-14.
    let t0 = cst("2025-09-30", 10);
    let clock = Arc::new(ManualClock::at(t0 + 60_000_000));
    let hub = HubBuilder::new().clock(clock.clone()).start().await;
    report(
        &hub,
        vec![
            completed("KM-PAPER", "530102", t0),
            completed("KM-LATE", "530102", t0),
            completed("KM-PRAISE", "530102", t0),
        ],
    )
    .await;
    clock.set(cst("2025-10-20", 9));
    assert_eq!(hub.hub.rules().tick().await.unwrap().default_ratings, 3);

    let mut ingest = hub.ingest().await;
    // Rated on paper on 2025-10-09, typed in on 2025-10-20.
    let paper = rated(
        "paper",
        "KM-PAPER",
        pb::Level::VeryDissatisfied,
        cst("2025-10-09", 15),
    );
    let stored = submit_one(&mut ingest, paper.clone()).await;
    assert_eq!(outcome(&stored), pb::Outcome::Accepted, "{stored:?}");
    // A 差评 made after the deadline: it replaces the default all the same.
    let late = submit_one(
        &mut ingest,
        rated(
            "late",
            "KM-LATE",
            pb::Level::Dissatisfied,
            cst("2025-10-16", 9),
        ),
    )
    .await;
    assert_eq!(outcome(&late), pb::Outcome::Accepted, "{late:?}");
    // Praise made after the deadline: the default stands.
    let praise = submit_one(
        &mut ingest,
        rated(
            "praise",
            "KM-PRAISE",
            pb::Level::Satisfied,
            cst("2025-10-16", 9),
        ),
    )
    .await;
    assert_eq!(outcome(&praise), pb::Outcome::Invalid, "{praise:?}");
    assert_eq!(praise.violations[0].field, "rated_at");
    assert!(
        praise.violations[0]
            .description
            .contains("rated by default"),
        "{praise:?}"
    );
    // One rating per case still: a second rating of the replaced case is refused.
    let again = submit_one(
        &mut ingest,
        rated(
            "paper-2",
            "KM-PAPER",
            pb::Level::Satisfied,
            cst("2025-10-09", 16),
        ),
    )
    .await;
    assert_eq!(outcome(&again), pb::Outcome::Invalid, "{again:?}");
    assert_eq!(again.violations[0].field, "case_number");

    // The 差评 opened its case.
    let cases = pb::rectification_service_client::RectificationServiceClient::new(
        hub.channel_as("tester").await,
    )
    .list_cases(pb::ListCasesRequest::default())
    .await
    .unwrap()
    .into_inner()
    .cases;
    let mut case_ids: Vec<&str> = cases.iter().map(|c| c.hub_id.as_str()).collect();
    case_ids.sort();
    let mut want = [stored.hub_id.as_str(), late.hub_id.as_str()];
    want.sort();
    assert_eq!(case_ids, want, "both 差评 opened their cases");
    // Counted: KM-PAPER's and KM-LATE's 差评 (not their defaults), KM-PRAISE's default.
    let g = kunming_group(&hub).await;
    assert_eq!(
        (
            g.total,
            g.very_dissatisfied,
            g.dissatisfied,
            g.basically_satisfied,
            g.default_ratings
        ),
        (3, 1, 1, 1, 1),
        "{g:?}"
    );
    assert_eq!(
        (g.completed_cases, g.rated_cases, g.actively_rated_cases),
        (3, 3, 2)
    );
    // The defaults stay stored (append-only), and a restart changes nothing.
    assert_eq!(defaults(&hub).await.len(), 3);
    let hub = hub.stop().await.restart().await;
    assert_eq!(hub.hub.rules().tick().await.unwrap().default_ratings, 0);
    // (The engine's own tick at the start may have run first: count what is stored.)
    assert_eq!(defaults(&hub).await.len(), 3);
    let again = submit_one(&mut hub.ingest().await, paper).await;
    assert_eq!(outcome(&again), pb::Outcome::Duplicate);
    hub.stop().await;
}

/// A batch (批量业务) gets one default rating, recorded on one of its cases; a rater's rating
/// of another case of the batch, made in time, replaces it (before, the batch rule refused
/// it behind the default).
#[tokio::test]
async fn a_rating_made_in_time_replaces_its_batchs_default() {
    let t0 = cst("2025-09-30", 10);
    let clock = Arc::new(ManualClock::at(t0 + 60_000_000));
    let hub = HubBuilder::new().clock(clock.clone()).start().await;
    let in_batch = |case: &str| pb::ServiceCase {
        batch_id: "KM-BATCH".into(),
        ..completed(case, "530102", t0)
    };
    report(&hub, vec![in_batch("KM-B1"), in_batch("KM-B2")]).await;
    clock.set(cst("2025-10-20", 9));
    assert_eq!(hub.hub.rules().tick().await.unwrap().default_ratings, 1);
    let mut paper = rated(
        "paper-b2",
        "KM-B2",
        pb::Level::Dissatisfied,
        cst("2025-10-10", 11),
    );
    paper.batch_id = "KM-BATCH".into();
    let stored = submit_one(&mut hub.ingest().await, paper).await;
    assert_eq!(outcome(&stored), pb::Outcome::Accepted, "{stored:?}");
    let g = kunming_group(&hub).await;
    assert_eq!(
        (g.total, g.dissatisfied, g.default_ratings),
        (1, 1, 0),
        "the batch's default left the counts: {g:?}"
    );
    assert_eq!(
        (g.completed_cases, g.rated_cases, g.actively_rated_cases),
        (2, 2, 2),
        "one rating covers every case of its batch"
    );
    hub.stop().await;
}

/// A case reported completed by two sources gets one default rating, not one per source:
/// defaults go through the same 一事一评 check, under the writer, as every rating (so a
/// rating committed after the engine read its page also stops the default).
#[tokio::test]
async fn a_case_reported_by_two_sources_gets_one_default_rating() {
    let t0 = cst("2025-09-30", 10);
    let clock = Arc::new(ManualClock::at(t0 + 60_000_000));
    let hub = HubBuilder::new()
        .clock(clock.clone())
        .principal("other-system", &["submit"], TestScope::National)
        .start()
        .await;
    report(&hub, vec![completed("KM-TWICE", "530102", t0)]).await;
    let results =
        pb::ingest_service_client::IngestServiceClient::new(hub.channel_as("other-system").await)
            .report_service_cases(pb::ReportServiceCasesRequest {
                cases: vec![completed("KM-TWICE", "530102", t0)],
            })
            .await
            .unwrap()
            .into_inner()
            .results;
    assert_eq!(outcome(&results[0]), pb::Outcome::Accepted);
    clock.set(cst("2025-10-20", 9));
    assert_eq!(hub.hub.rules().tick().await.unwrap().default_ratings, 1);
    assert_eq!(hub.hub.rules().tick().await.unwrap().default_ratings, 0);
    assert_eq!(defaults(&hub).await.len(), 1);
    hub.stop().await;
}

/// One rating covers every case of its batch (批量业务): the batch's other cases get no
/// reminder and no default. A staff rating rates the staff member, not the case: its case
/// still gets its default (statistics count only item ratings as rating a case).
#[tokio::test]
async fn batch_ratings_cover_their_cases_and_staff_ratings_do_not() {
    let t0 = cst("2025-09-30", 10);
    let clock = Arc::new(ManualClock::at(t0 + 60_000_000));
    let hub = HubBuilder::new().clock(clock.clone()).start().await;
    let in_batch = |case: &str| pb::ServiceCase {
        batch_id: "BATCH-7".into(),
        ..completed(case, "440103", t0)
    };
    report(
        &hub,
        vec![
            in_batch("GD-B1"),
            in_batch("GD-B2"),
            completed("KM-S", "530102", t0),
        ],
    )
    .await;
    let mut ingest = hub.ingest().await;
    let mut batch = rated("b", "GD-B1", pb::Level::Satisfied, t0 + 120_000_000);
    batch.region_code = "440103".into();
    batch.batch_id = "BATCH-7".into();
    let mut staff = rated("s", "KM-S", pb::Level::Satisfied, t0 + 120_000_000);
    staff.target_kind = pb::TargetKind::Staff as i32;
    staff.staff_id = "S-001".into();
    for r in submit(&mut ingest, vec![batch, staff]).await {
        assert_eq!(outcome(&r), pb::Outcome::Accepted, "{r:?}");
    }
    // Guangdong's reminder comes after 24 hours: none for the batch's cases.
    clock.set(cst("2025-10-20", 9));
    let tick = hub.hub.rules().tick().await.unwrap();
    assert_eq!(
        (tick.invitations, tick.default_ratings),
        (0, 1),
        "no reminder for the rated batch; a default for the staff-rated case: {tick:?}"
    );
    let d = defaults(&hub).await;
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].case_number, "KM-S");
    hub.stop().await;
}

/// Ordos: "服务对象接受服务后7个自然日内未进行评价的，默认为“满意”" — the 7th natural day after
/// the service counts whole, to 24:00 (before: completion + 168 hours, hours too early). The
/// default is rated at the period's last moment, so a service of 24 March is defaulted in
/// March, in the first quarter (before: at 00:00 of 1 April, in the second).
#[tokio::test]
async fn ordos_defaults_after_the_whole_seventh_natural_day_within_its_quarter() {
    let t0 = cst("2025-03-24", 15);
    let clock = Arc::new(ManualClock::at(t0 + 60_000_000));
    let hub = HubBuilder::new().clock(clock.clone()).start().await;
    report(&hub, vec![completed("ORDOS-1", "150602", t0)]).await;
    let engine = hub.hub.rules();
    // 168 hours later, the 7th day is not over.
    clock.set(cst("2025-03-31", 20));
    assert_eq!(engine.tick().await.unwrap().default_ratings, 0);
    clock.set(cst("2025-04-01", 0) + 1);
    assert_eq!(engine.tick().await.unwrap().default_ratings, 1);
    let d = defaults(&hub).await.remove(0);
    assert_eq!(
        d.level,
        pb::Level::Satisfied as i32,
        "Ordos defaults to 满意"
    );
    assert_eq!(
        rating_hub::time::micros_from_timestamp(&d.rated_at.unwrap()),
        Some(cst("2025-04-01", 0) - 1)
    );
    let q1 = hub
        .query()
        .await
        .get_stats(pb::GetStatsRequest {
            filter: Some(pb::RatingFilter {
                region_code_prefix: "1506".into(),
                rated_from: Some(ts(cst("2025-01-01", 0) / 1_000_000)),
                rated_until: Some(ts(cst("2025-04-01", 0) / 1_000_000)),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .groups;
    assert_eq!(
        q1.iter().map(|g| g.default_ratings).sum::<u64>(),
        1,
        "the default is in the first quarter"
    );
    hub.stop().await;
}

/// Ordos: "实行实名制评价". An anonymous rating there is accepted (every rating counts) and
/// flagged, so the centre can follow it up; a real-name one is not flagged, and elsewhere an
/// anonymous rating is not flagged either (before, nothing told them apart).
#[tokio::test]
async fn ordos_flags_anonymous_ratings_and_accepts_them() {
    let hub = TestHub::start().await;
    let mut ingest = hub.ingest().await;
    let in_ordos = |key: &str, rater: Option<pb::Rater>| {
        let mut r = rating(key);
        r.region_code = "150602".into();
        r.rater = rater;
        r
    };
    let anonymous = in_ordos("anon", None);
    let claimed_only = in_ordos(
        "claimed",
        Some(pb::Rater {
            kind: pb::RaterKind::NaturalPerson as i32,
            real_name: true,
            ..Default::default()
        }),
    );
    let real = in_ordos("real", rating("x").rater);
    let mut kunming_anonymous = rating("km-anon");
    kunming_anonymous.rater = None;
    let results = submit(
        &mut ingest,
        vec![anonymous, claimed_only, real, kunming_anonymous],
    )
    .await;
    assert!(
        results.iter().all(|r| outcome(r) == pb::Outcome::Accepted),
        "{results:?}"
    );
    let flagged: Vec<bool> = results
        .iter()
        .map(|r| {
            r.quality_flags
                .contains(&(pb::QualityFlag::NotRealName as i32))
        })
        .collect();
    assert_eq!(flagged, [true, true, false, false]);
    hub.stop().await;
}

/// The year-end cliff (issue #18): cases completed or rated at the end of 2026 have deadlines
/// in 2027, whose State Council notice is not in the data. A 差评 case's deadlines are counted
/// on the provisional calendar (statutory holidays, no 调休), which skips 元旦 and the weekend,
/// and the case says they are provisional (before, they were never set). A default rating is
/// for good, so it waits for the notice instead of falling on a provisional deadline its 调休
/// could move later: it is reported as a calendar gap, and recorded once the notice is there.
#[tokio::test]
async fn deadlines_in_an_unpublished_year_are_counted_on_the_provisional_calendar() {
    use pb::rectification_service_client::RectificationServiceClient;
    let t0 = cst("2026-12-28", 10);
    let clock = Arc::new(ManualClock::at(t0 + 1));
    // The deployment's calendar file: the shipped years, 2027 not yet published.
    let calendar = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        calendar.path(),
        rating_hub::rules::calendar::DEFAULT_CALENDAR_TOML,
    )
    .unwrap();
    let hub = HubBuilder::new()
        .clock(clock.clone())
        .set(
            "rules.calendar_file",
            &format!("{:?}", calendar.path().display().to_string()),
        )
        .start()
        .await;
    report(&hub, vec![completed("KM-LATE", "530102", t0)]).await;
    let mut bad = rated("late-bad", "KM-OTHER", pb::Level::Dissatisfied, t0 + 1);
    bad.text = "窗口人员态度差".into();
    let bad_id = submit_one(&mut hub.ingest().await, bad).await.hub_id;

    // Kunming: 基本满意 after 5 working days — provisionally the end of 5 January 2027. The
    // default waits for 2027's notice.
    clock.set(cst("2027-01-07", 9));
    let tick = hub.hub.rules().tick().await.unwrap();
    assert_eq!((tick.calendar_gaps, tick.default_ratings), (1, 0));
    assert!(defaults(&hub).await.is_empty());

    // The 差评's case: 15 working days from Monday 28 December, provisional.
    let case = RectificationServiceClient::new(hub.channel_as("tester").await)
        .list_cases(pb::ListCasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .cases
        .into_iter()
        .find(|c| c.hub_id == bad_id)
        .unwrap();
    assert!(case.deadline_provisional, "{case:?}");
    assert_eq!(
        case.rectify_deadline.unwrap().seconds * 1_000_000,
        Date::parse("2027-01-19").unwrap().end_micros()
    );

    // A calendar file that does not load (an operator's typo) keeps the calendar in force.
    std::fs::write(calendar.path(), "[years.2027\nsource = ").unwrap();
    let tick = hub.hub.rules().tick().await.unwrap();
    assert_eq!(tick.calendar_gaps, 1, "still the calendar in force");

    // 2027's notice is published (here with 4 January off as well) and added to the file,
    // without a restart: at the next tick the case's deadline moves a day and is no longer
    // provisional, its history says so, and the default is recorded at the notice's
    // deadline, the end of 6 January.
    let with_2027 = format!(
        "{}\n[years.2027]\nsource = \"a test notice\"\nholidays = [\"2027-01-01..2027-01-04\"]\n",
        rating_hub::rules::calendar::DEFAULT_CALENDAR_TOML
    );
    std::fs::write(calendar.path(), with_2027).unwrap();
    let tick = hub.hub.rules().tick().await.unwrap();
    assert_eq!(tick.calendar_gaps, 0);
    let mut all = defaults(&hub).await;
    assert_eq!(all.len(), 1, "{all:?}");
    let d = all.remove(0);
    assert_eq!(
        rating_hub::time::micros_from_timestamp(&d.rated_at.unwrap()),
        Some(cst("2027-01-07", 0) - 1)
    );
    let case = RectificationServiceClient::new(hub.channel_as("tester").await)
        .get_case(pb::GetCaseRequest { id: case.id })
        .await
        .unwrap()
        .into_inner()
        .bad_rating_case
        .unwrap();
    assert!(!case.deadline_provisional, "{case:?}");
    assert_eq!(
        case.rectify_deadline.unwrap().seconds * 1_000_000,
        Date::parse("2027-01-20").unwrap().end_micros()
    );
    let recounted: Vec<&pb::CaseEntry> = case
        .history
        .iter()
        .filter(|e| e.action == pb::CaseAction::DeadlinesRecounted as i32)
        .collect();
    assert_eq!(recounted.len(), 1, "{:?}", case.history);
    assert_eq!(recounted[0].actor, "rating-hub");
    assert!(
        recounted[0].note.contains("2027 (a test notice)")
            && recounted[0]
                .note
                .contains("rectification deadline 2027-01-19 24:00 → 2027-01-20 24:00"),
        "{}",
        recounted[0].note
    );
    // Once: the next tick (the file unchanged) adds nothing.
    hub.hub.rules().tick().await.unwrap();
    let again = RectificationServiceClient::new(hub.channel_as("tester").await)
        .get_case(pb::GetCaseRequest { id: case.id })
        .await
        .unwrap()
        .into_inner()
        .bad_rating_case
        .unwrap();
    assert_eq!(again.history.len(), case.history.len());
    hub.stop().await;
}

#[tokio::test]
async fn guangdong_and_kunming_score_the_same_ratings_as_their_tables_say() {
    let hub = TestHub::start().await;
    let mut ingest = hub.ingest().await;
    // One rating per level, plus one more 不满意.
    let levels = [1, 2, 3, 4, 5, 4];
    let batch = levels
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let mut r = rating(&format!("lv{i}"));
            r.level = *l;
            r.text = "原因".into();
            r
        })
        .collect();
    submit(&mut ingest, batch).await;
    let stats = |profile: &'static str| {
        let hub = &hub;
        async move {
            hub.query()
                .await
                .get_stats(pb::GetStatsRequest {
                    profile: profile.into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .groups
                .remove(0)
        }
    };
    let km = stats("kunming").await;
    let gd = stats("guangdong").await;
    // Kunming 10/8/6/2/0, Guangdong 10/8/6/3/0: they differ by 1 point per 不满意 (two here).
    assert_eq!(
        km.average_score,
        Some((10.0 + 8.0 + 6.0 + 2.0 + 0.0 + 2.0) / 6.0)
    );
    assert_eq!(
        gd.average_score,
        Some((10.0 + 8.0 + 6.0 + 3.0 + 0.0 + 3.0) / 6.0)
    );
    assert!((gd.average_score.unwrap() - km.average_score.unwrap() - 2.0 / 6.0).abs() < 1e-12);
    assert_eq!((km.good, km.medium, km.bad), (2, 1, 3));
    assert_eq!(km.good_rate, 2.0 / 6.0);
    assert_eq!(km.bad_rate, 0.5);
    assert!(
        gd.final_score.is_none() && gd.final_score_note.is_empty(),
        "only Kunming defines a final score"
    );
    // No 办结 events reported: 接受评价率 is unknown, so is the final score, and it says so
    // (before, a silent 0 for the rate part).
    assert_eq!(km.final_score, None);
    assert!(km.final_score_note.contains("no 办结 events"), "{km:?}");
    // Yunnan defines no score table: no average rather than an invented one.
    assert_eq!(stats("yunnan").await.average_score, None);
    let err = hub
        .query()
        .await
        .get_stats(pb::GetStatsRequest {
            profile: "atlantis".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_request_fields(&err), ["profile"]);
    hub.stop().await;
}

mod bad_rating_cases {
    use super::*;
    use pb::rectification_service_client::RectificationServiceClient;
    use tonic::Code;

    fn bad(key: &str, level: pb::Level, clock: &ManualClock) -> pb::Rating {
        let mut r = rating(key);
        r.level = level as i32;
        r.text = "窗口人员态度差".into();
        r.rated_at = Some(rating_hub::time::timestamp_from_micros(clock.now_micros()));
        r
    }

    async fn kunming_stats(hub: &TestHub) -> pb::StatsGroup {
        hub.query()
            .await
            .get_stats(pb::GetStatsRequest {
                filter: Some(pb::RatingFilter {
                    region_code_prefix: "5301".into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .groups
            .remove(0)
    }

    /// A NUL or another control character in a case note, an appeal's reason or an
    /// evidence reference is refused with the field named (PostgreSQL cannot store a NUL in
    /// text: it failed the whole writer group, every rating submitted alongside included).
    #[tokio::test]
    async fn control_characters_in_case_steps_are_refused_with_the_field_named() {
        let clock = Arc::new(ManualClock::at(cst("2025-03-03", 9)));
        let hub = HubBuilder::new().clock(clock.clone()).start().await;
        let id = submit_one(
            &mut hub.ingest().await,
            bad("a", pb::Level::VeryDissatisfied, &clock),
        )
        .await
        .hub_id;
        let mut rect = RectificationServiceClient::new(hub.channel_as("tester").await);
        let case = rect
            .list_cases(pb::ListCasesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .cases
            .into_iter()
            .find(|c| c.hub_id == id)
            .unwrap();
        let step = |note: &str, refs: &[&str]| pb::RecordActionRequest {
            id: case.id,
            action: pb::CaseAction::Contact as i32,
            note: note.into(),
            evidence_refs: refs.iter().map(|s| s.to_string()).collect(),
            new_deadline: None,
            ..Default::default()
        };
        let err = rect
            .record_action(step("电话回访\u{0}", &[]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert_eq!(bad_request_fields(&err), ["note"]);
        let err = rect
            .record_action(step("电话回访", &["doc\u{1b}[31m"]))
            .await
            .unwrap_err();
        assert_eq!(bad_request_fields(&err), ["evidence_refs"]);
        // Line breaks in a note are text, not control: accepted.
        rect.record_action(step("电话回访\n核实属实", &[]))
            .await
            .unwrap();
        hub.stop().await;
    }

    /// 延期: the rated organisation declares its new deadline once, before the current one
    /// passed; a further extension is the authority's to grant; an overdue case cannot be
    /// extended (before, any number of extensions, even after the deadline, erased
    /// "overdue").
    #[tokio::test]
    async fn an_extension_comes_once_before_the_deadline_and_more_only_from_the_authority() {
        let orgs = [org(1)];
        let clock = Arc::new(ManualClock::at(cst("2025-03-03", 9)));
        let hub = HubBuilder::new()
            .clock(clock.clone())
            .principal("km-dept", &["rectify"], TestScope::Orgs(&orgs))
            .principal("authority", &["admin"], TestScope::National)
            .start()
            .await;
        let mut ingest = hub.ingest().await;
        for key in ["x", "y"] {
            submit_one(&mut ingest, bad(key, pb::Level::Dissatisfied, &clock)).await;
        }
        let mut dept = RectificationServiceClient::new(hub.channel_as("km-dept").await);
        let mut authority = RectificationServiceClient::new(hub.channel_as("authority").await);
        let cases = dept
            .list_cases(pb::ListCasesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .cases;
        let (x, y) = (cases[0].id, cases[1].id);
        let extend = |id: u64, day: &str| pb::RecordActionRequest {
            id,
            action: pb::CaseAction::Extend as i32,
            note: "需协调系统改造".into(),
            evidence_refs: vec![],
            new_deadline: Some(ts(Date::parse(day).unwrap().end_micros() / 1_000_000)),
            ..Default::default()
        };
        // The deadline is the end of 2025-03-24; the organisation sets its own, once.
        dept.record_action(extend(x, "2025-04-30")).await.unwrap();
        let err = dept
            .record_action(extend(x, "2025-05-30"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("authority"), "{err:?}");
        let granted = authority
            .record_action(extend(x, "2025-05-30"))
            .await
            .unwrap()
            .into_inner()
            .bad_rating_case
            .unwrap();
        assert_eq!(
            granted.rectify_deadline.unwrap().seconds * 1_000_000,
            Date::parse("2025-05-30").unwrap().end_micros()
        );

        // Past its deadline, case y is overdue, and stays so.
        clock.set(cst("2025-03-25", 9));
        let err = dept
            .record_action(extend(y, "2025-04-30"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("passed"), "{err:?}");
        let y_case = dept
            .get_case(pb::GetCaseRequest { id: y })
            .await
            .unwrap()
            .into_inner()
            .bad_rating_case
            .unwrap();
        assert!(y_case.overdue, "{y_case:?}");
        hub.stop().await;
    }

    /// 实名差评回访整改率 (Yunnan, Kunming, Changchun: "要达到100%"): real-name cases both
    /// rectified and called back, over the real-name cases only (before, only rates over all
    /// 差评 existed); and the closed cases per group (Changchun: "差评”问题办结情况").
    #[tokio::test]
    async fn the_real_name_callback_and_rectification_rate_counts_real_name_cases_only() {
        let clock = Arc::new(ManualClock::at(cst("2025-03-03", 9)));
        let hub = HubBuilder::new().clock(clock.clone()).start().await;
        let mut ingest = hub.ingest().await;
        let mut anonymous = bad("anon", pb::Level::Dissatisfied, &clock);
        anonymous.rater = None;
        let results = submit(
            &mut ingest,
            vec![
                bad("named-1", pb::Level::VeryDissatisfied, &clock),
                bad("named-2", pb::Level::Dissatisfied, &clock),
                anonymous,
            ],
        )
        .await;
        let mut rect = RectificationServiceClient::new(hub.channel_as("tester").await);
        let cases = rect
            .list_cases(pb::ListCasesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .cases;
        let id_of = |hub_id: &str| cases.iter().find(|c| c.hub_id == hub_id).unwrap().id;
        let step = |id: u64, action: pb::CaseAction, refs: &[&str]| pb::RecordActionRequest {
            id,
            action: action as i32,
            note: "已处理".into(),
            evidence_refs: refs.iter().map(|s| s.to_string()).collect(),
            new_deadline: None,
            ..Default::default()
        };
        // named-1: the whole life, archived; named-2: rectified, not called back.
        let named_1 = id_of(&results[0].hub_id);
        for (action, refs) in [
            (pb::CaseAction::Contact, &[][..]),
            (pb::CaseAction::Rectify, &["台账-1"][..]),
            (pb::CaseAction::FeedBack, &[][..]),
            (pb::CaseAction::Callback, &[][..]),
            (pb::CaseAction::Archive, &[][..]),
        ] {
            rect.record_action(step(named_1, action, refs))
                .await
                .unwrap();
        }
        let named_2 = id_of(&results[1].hub_id);
        for (action, refs) in [
            (pb::CaseAction::Contact, &[][..]),
            (pb::CaseAction::Rectify, &["台账-2"][..]),
        ] {
            rect.record_action(step(named_2, action, refs))
                .await
                .unwrap();
        }
        // The anonymous one goes the whole way too: a rate that counted it (over all cases,
        // or in its numerator) would not be 1 of 2.
        let anon = id_of(&results[2].hub_id);
        for (action, refs) in [
            (pb::CaseAction::Contact, &[][..]),
            (pb::CaseAction::Rectify, &["台账-3"][..]),
            (pb::CaseAction::FeedBack, &[][..]),
            (pb::CaseAction::Callback, &[][..]),
            (pb::CaseAction::Archive, &[][..]),
        ] {
            rect.record_action(step(anon, action, refs)).await.unwrap();
        }
        let g = kunming_stats(&hub).await;
        assert_eq!(
            (
                g.bad_rating_cases,
                g.real_name_bad_rating_cases,
                g.archived_cases
            ),
            (3, 2, 2),
            "{g:?}"
        );
        assert_eq!(g.real_name_callback_rectification_rate, 0.5);
        hub.stop().await;
    }

    #[tokio::test]
    async fn a_bad_rating_walks_the_whole_case_life_and_a_malicious_appeal_leaves_the_scores() {
        let orgs = [org(1)];
        let others = [org(2)];
        let clock = Arc::new(ManualClock::at(cst("2025-03-03", 9)));
        let hub = HubBuilder::new()
            .clock(clock.clone())
            .principal("km-dept", &["rectify"], TestScope::Orgs(&orgs))
            .principal("other-dept", &["rectify"], TestScope::Orgs(&others))
            .principal("authority", &["admin"], TestScope::National)
            .start()
            .await;
        let mut ingest = hub.ingest().await;
        let mut good = rating("good");
        good.rated_at = Some(rating_hub::time::timestamp_from_micros(clock.now_micros()));
        let results = submit(
            &mut ingest,
            vec![
                bad("a", pb::Level::VeryDissatisfied, &clock),
                bad("b", pb::Level::Dissatisfied, &clock),
                good,
                bad("d", pb::Level::VeryDissatisfied, &clock),
            ],
        )
        .await;
        assert!(results.iter().all(|r| outcome(r) == pb::Outcome::Accepted));
        let (a_id, b_id) = (results[0].hub_id.clone(), results[1].hub_id.clone());

        let mut dept = RectificationServiceClient::new(hub.channel_as("km-dept").await);
        // Pushed: the organisation's watch receives its cases as they open.
        let mut watch = dept
            .watch_cases(pb::WatchCasesRequest { after_id: 0 })
            .await
            .unwrap()
            .into_inner();
        let mut pushed = Vec::new();
        while pushed.len() < 3 {
            let c = watch
                .message()
                .await
                .unwrap()
                .unwrap()
                .bad_rating_case
                .unwrap();
            pushed.push(c.hub_id);
        }
        assert_eq!(
            pushed,
            [
                results[0].hub_id.clone(),
                results[1].hub_id.clone(),
                results[3].hub_id.clone()
            ]
        );
        let mut late = bad("late", pb::Level::Dissatisfied, &clock);
        late.org_credit_code = org(1);
        let late_id = submit_one(&mut ingest, late).await.hub_id;
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), watch.message())
            .await
            .expect("a new case is pushed at once")
            .unwrap()
            .unwrap()
            .bad_rating_case
            .unwrap();
        assert_eq!(next.hub_id, late_id);
        drop(watch);
        let cases = dept
            .list_cases(pb::ListCasesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .cases;
        assert_eq!(
            cases.len(),
            4,
            "one case per 差评, none for the good rating"
        );
        let case_of = |hub_id: &str| cases.iter().find(|c| c.hub_id == hub_id).unwrap().clone();
        let a = case_of(&a_id);
        assert_eq!(a.status, pb::CaseStatus::Open as i32);
        assert_eq!(a.profile, "kunming");
        assert!(a.real_name);
        // 15 working days after Monday 2025-03-03: the end of Monday 2025-03-24.
        assert_eq!(
            a.rectify_deadline.unwrap().seconds * 1_000_000,
            Date::parse("2025-03-24").unwrap().end_micros()
        );

        let step =
            |id: u64, action: pb::CaseAction, note: &str, refs: &[&str]| pb::RecordActionRequest {
                id,
                action: action as i32,
                note: note.into(),
                evidence_refs: refs.iter().map(|s| s.to_string()).collect(),
                new_deadline: None,
                ..Default::default()
            };
        // Out of order: the error names what must come first.
        let err = dept
            .record_action(step(a.id, pb::CaseAction::Rectify, "", &["doc-1"]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("CONTACT"), "{}", err.message());

        dept.record_action(step(
            a.id,
            pb::CaseAction::Contact,
            "电话回访，核实属实",
            &[],
        ))
        .await
        .unwrap();
        let mut extend = step(a.id, pb::CaseAction::Extend, "需协调系统改造", &[]);
        extend.new_deadline = Some(ts(
            Date::parse("2025-04-30").unwrap().end_micros() / 1_000_000
        ));
        let extended = dept
            .record_action(extend)
            .await
            .unwrap()
            .into_inner()
            .bad_rating_case
            .unwrap();
        assert_eq!(
            extended.rectify_deadline.unwrap().seconds * 1_000_000,
            Date::parse("2025-04-30").unwrap().end_micros()
        );
        let err = dept
            .record_action(step(a.id, pb::CaseAction::Rectify, "改进", &[]))
            .await
            .unwrap_err();
        assert_eq!(bad_request_fields(&err), ["evidence_refs"]);
        dept.record_action(step(
            a.id,
            pb::CaseAction::Rectify,
            "增设引导岗",
            &["整改台账-2025-031"],
        ))
        .await
        .unwrap();
        dept.record_action(step(
            a.id,
            pb::CaseAction::FeedBack,
            "短信反馈整改结果",
            &[],
        ))
        .await
        .unwrap();
        let err = dept
            .record_action(step(a.id, pb::CaseAction::Archive, "", &[]))
            .await
            .unwrap_err();
        assert!(
            err.message().contains("CALLBACK"),
            "a real-name 差评 needs its callback: {}",
            err.message()
        );
        dept.record_action(step(a.id, pb::CaseAction::Callback, "回访满意", &[]))
            .await
            .unwrap();
        dept.record_action(step(a.id, pb::CaseAction::Archive, "归档", &["档案-88"]))
            .await
            .unwrap();
        let full = dept
            .get_case(pb::GetCaseRequest { id: a.id })
            .await
            .unwrap()
            .into_inner();
        let case = full.bad_rating_case.unwrap();
        assert_eq!(case.status, pb::CaseStatus::Archived as i32);
        let actions: Vec<i32> = case.history.iter().map(|e| e.action).collect();
        use pb::CaseAction as A;
        assert_eq!(
            actions,
            [
                A::Contact,
                A::Extend,
                A::Rectify,
                A::FeedBack,
                A::Callback,
                A::Archive
            ]
            .map(|a| a as i32)
        );
        assert!(
            case.history
                .iter()
                .all(|e| e.actor == "km-dept" && e.at.is_some())
        );
        assert_eq!(case.history[2].evidence_refs, ["整改台账-2025-031"]);
        assert_eq!(full.rating.unwrap().hub_id, a_id);
        let err = dept
            .record_action(step(a.id, pb::CaseAction::Contact, "", &[]))
            .await
            .unwrap_err();
        assert!(err.message().contains("archived"));

        // Another organisation's principal sees none of it.
        let err = RectificationServiceClient::new(hub.channel_as("other-dept").await)
            .get_case(pb::GetCaseRequest { id: a.id })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);

        // Case B: appealed in time, found malicious: it leaves the scores.
        let before = kunming_stats(&hub).await;
        assert_eq!((before.total, before.bad), (5, 4));
        let b = case_of(&b_id);
        dept.file_appeal(pb::FileAppealRequest {
            id: b.id,
            reason: "评价人与办件无关，系恶意差评".into(),
            evidence_refs: vec!["监控录像-0303".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        let err = dept
            .decide_appeal(pb::DecideAppealRequest {
                id: b.id,
                outcome: 3,
                note: "x".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::PermissionDenied,
            "only the authority decides"
        );
        let decided = RectificationServiceClient::new(hub.channel_as("authority").await)
            .decide_appeal(pb::DecideAppealRequest {
                id: b.id,
                outcome: pb::AppealOutcome::Malicious as i32,
                note: "经核实属恶意差评".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .bad_rating_case
            .unwrap();
        assert_eq!(decided.appeal_outcome, pb::AppealOutcome::Malicious as i32);
        let after = kunming_stats(&hub).await;
        assert_eq!(
            (after.total, after.bad),
            (4, 3),
            "the malicious rating left the counts"
        );
        // 整改率 and 回访率 over the remaining cases: A (rectified, called back), D and late.
        assert_eq!(after.bad_rating_cases, 3);
        assert_eq!((after.rectified_cases, after.called_back_cases), (1, 1));
        assert_eq!(
            (after.rectification_rate, after.callback_rate),
            (1.0 / 3.0, 1.0 / 3.0)
        );
        // Kunming scores: before 0 + 2 + 10 + 0 + 2 over 5; after 0 + 10 + 0 + 2 over 4.
        assert_eq!(before.average_score, Some(14.0 / 5.0));
        assert_eq!(after.average_score, Some(3.0));
        // The rating itself stays stored.
        let still = hub
            .query()
            .await
            .get_rating(pb::GetRatingRequest { hub_id: b_id })
            .await
            .unwrap()
            .into_inner()
            .rating
            .unwrap();
        assert_eq!(still.level, pb::Level::Dissatisfied as i32);

        // Case D: nobody acted; after the deadline it is overdue, and too late to appeal.
        clock.set(cst("2025-03-25", 9));
        let overdue = dept
            .list_cases(pb::ListCasesRequest {
                overdue_only: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .cases;
        assert_eq!(overdue.len(), 2, "D and the late one");
        assert_eq!(overdue[0].hub_id, results[3].hub_id);
        assert!(
            overdue[0].overdue_reason.contains("rectif"),
            "{}",
            overdue[0].overdue_reason
        );
        let err = dept
            .file_appeal(pb::FileAppealRequest {
                id: overdue[0].id,
                reason: "迟到的申诉".into(),
                evidence_refs: vec![],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(
            err.message().contains("appeal window closed"),
            "{}",
            err.message()
        );
        hub.stop().await;
    }
}

/// The rules of a 差评 case that a profile adds: the unit declares its own rectification
/// deadline where the text sets no number of days (Guangdong, Changchun, Ordos); and Ordos'
/// rules on who contacts the rater, what an appeal needs, who raises an invalid rating and
/// how many closed cases the authority spot-checks.
mod profile_case_rules {
    use super::*;
    use pb::rectification_service_client::RectificationServiceClient;
    use tonic::Code;
    use tonic::transport::Channel;

    const ORDOS: &str = "150602";

    fn bad_in(key: &str, region: &str, clock: &ManualClock) -> pb::Rating {
        let mut r = rating(key);
        r.region_code = region.into();
        r.level = pb::Level::Dissatisfied as i32;
        r.rated_at = Some(rating_hub::time::timestamp_from_micros(clock.now_micros()));
        r
    }

    fn step(id: u64, action: pb::CaseAction) -> pb::RecordActionRequest {
        pb::RecordActionRequest {
            id,
            action: action as i32,
            note: "已电话联系评价人".into(),
            ..Default::default()
        }
    }

    fn declare(id: u64, day: &str) -> pb::RecordActionRequest {
        pb::RecordActionRequest {
            note: "整改措施：调整窗口排班".into(),
            new_deadline: Some(ts(Date::parse(day).unwrap().end_micros() / 1_000_000)),
            ..step(id, pb::CaseAction::DeclareDeadline)
        }
    }

    async fn case_of(
        rect: &mut RectificationServiceClient<Channel>,
        hub_id: &str,
    ) -> pb::BadRatingCase {
        let id = rect
            .list_cases(pb::ListCasesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .cases
            .into_iter()
            .find(|c| c.hub_id == hub_id)
            .expect("the 差评 opened a case")
            .id;
        rect.get_case(pb::GetCaseRequest { id })
            .await
            .unwrap()
            .into_inner()
            .bad_rating_case
            .unwrap()
    }

    /// Ordos 第二十条(二)「不能及时整改的应明确整改措施和完成时限」, Guangdong 第十五条
    /// 「限期进行整改」, Changchun 四(一)「承诺整改时限」: no 15-working-day deadline is
    /// invented; the unit declares its own (DECLARE_DEADLINE), once, in the future, and overdue
    /// is measured against it. Kunming counts its 15 days and has nothing to declare. And Ordos
    /// 第二十条(一)「不得由被评价人与评价人直接沟通」: CONTACT names who spoke with the rater,
    /// never the rated staff member.
    #[tokio::test]
    async fn the_unit_declares_its_rectification_deadline_and_the_rated_staff_member_does_not_contact_the_rater()
     {
        let clock = Arc::new(ManualClock::at(cst("2025-03-03", 9)));
        let hub = HubBuilder::new()
            .clock(clock.clone())
            .principal("unit", &["rectify"], TestScope::National)
            .start()
            .await;
        let mut ingest = hub.ingest().await;
        let results = submit(
            &mut ingest,
            vec![
                bad_in("ordos", ORDOS, &clock),
                bad_in("guangdong", "440104", &clock),
                bad_in("changchun", "220102", &clock),
                bad_in("kunming", "530102", &clock),
            ],
        )
        .await;
        assert!(
            results.iter().all(|r| outcome(r) == pb::Outcome::Accepted),
            "{results:?}"
        );
        // The rated unit records its steps; "tester" holds admin: the authority.
        let mut rect = RectificationServiceClient::new(hub.channel_as("unit").await);
        let mut authority = RectificationServiceClient::new(hub.channel_as("tester").await);
        let mut cases = Vec::new();
        for r in &results {
            cases.push(case_of(&mut rect, &r.hub_id).await);
        }
        for c in &cases[..3] {
            assert!(
                c.rectify_deadline.is_none() && c.rectify_deadline_undeclared,
                "{c:?}"
            );
        }
        assert!(cases[3].rectify_deadline.is_some() && !cases[3].rectify_deadline_undeclared);
        let ordos = cases[0].id;

        // Who spoke with the rater: required in Ordos, and never the rated staff member.
        let err = rect
            .record_action(step(ordos, pb::CaseAction::Contact))
            .await
            .unwrap_err();
        assert_eq!(bad_request_fields(&err), ["contacted_by"]);
        let by = |who: &str| pb::RecordActionRequest {
            contacted_by: who.into(),
            ..step(ordos, pb::CaseAction::Contact)
        };
        for rated in ["S007", " s007 ", "Ｓ００７"] {
            let err = rect.record_action(by(rated)).await.unwrap_err();
            assert_eq!(err.code(), Code::FailedPrecondition, "{rated}: {err:?}");
            assert!(err.message().contains("直接沟通"), "{err:?}");
        }
        let contacted = rect.record_action(by("S100")).await.unwrap().into_inner();
        let last = contacted.bad_rating_case.unwrap().history.pop().unwrap();
        assert_eq!(last.contacted_by, "S100");
        // Guangdong has no such rule: CONTACT alone is enough; contacted_by only with CONTACT.
        rect.record_action(step(cases[1].id, pb::CaseAction::Contact))
            .await
            .unwrap();
        let err = rect
            .record_action(pb::RecordActionRequest {
                contacted_by: "S100".into(),
                ..declare(ordos, "2025-06-20")
            })
            .await
            .unwrap_err();
        assert_eq!(bad_request_fields(&err), ["contacted_by"]);

        // Undeclared, while the unit still has time to declare (15 working days from
        // 2025-03-03: the end of 2025-03-24): no deadline, not overdue.
        clock.set(cst("2025-03-20", 9));
        let c = case_of(&mut rect, &results[0].hub_id).await;
        assert!(!c.overdue && c.rectify_deadline_undeclared, "{c:?}");
        // An extension needs a deadline to move; a declared one is in the future, says
        // what will be done, and is at most 60 working days out for the unit.
        let err = rect
            .record_action(pb::RecordActionRequest {
                new_deadline: Some(ts(
                    Date::parse("2025-07-01").unwrap().end_micros() / 1_000_000
                )),
                ..step(ordos, pb::CaseAction::Extend)
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("DECLARE_DEADLINE"), "{err:?}");
        for (day, why) in [("2025-03-19", "future"), ("2025-12-31", "60 working days")] {
            let err = rect.record_action(declare(ordos, day)).await.unwrap_err();
            assert_eq!(bad_request_fields(&err), ["new_deadline"]);
            assert!(err.message().contains(why), "{err:?}");
        }
        let err = rect
            .record_action(pb::RecordActionRequest {
                note: String::new(),
                ..declare(ordos, "2025-04-30")
            })
            .await
            .unwrap_err();
        assert_eq!(bad_request_fields(&err), ["note"]);
        // Declared as a moment in the day, it runs to the day's end (24:00 CST).
        let declared = rect
            .record_action(pb::RecordActionRequest {
                new_deadline: Some(ts(cst("2025-04-30", 10) / 1_000_000)),
                ..declare(ordos, "2025-04-30")
            })
            .await
            .unwrap()
            .into_inner()
            .bad_rating_case
            .unwrap();
        assert_eq!(
            declared.rectify_deadline.unwrap().seconds * 1_000_000,
            Date::parse("2025-04-30").unwrap().end_micros()
        );
        assert!(!declared.rectify_deadline_undeclared && !declared.overdue);
        let err = rect
            .record_action(declare(ordos, "2025-05-25"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("already declared"), "{err:?}");
        // The unit's one extension stays within the same 60 working days.
        let err = rect
            .record_action(pb::RecordActionRequest {
                action: pb::CaseAction::Extend as i32,
                ..declare(ordos, "2025-12-31")
            })
            .await
            .unwrap_err();
        assert_eq!(bad_request_fields(&err), ["new_deadline"]);
        assert!(err.message().contains("60 working days"), "{err:?}");
        // Past the declared day, unrectified: overdue.
        clock.set(cst("2025-05-06", 9));
        let c = case_of(&mut rect, &results[0].hub_id).await;
        assert!(c.overdue, "{c:?}");
        assert!(c.overdue_reason.contains("rectification deadline"), "{c:?}");
        // The Guangdong unit never declared: overdue for that, and it cannot declare its way
        // out; the authority can still set a deadline.
        let g = case_of(&mut rect, &results[1].hub_id).await;
        assert!(g.overdue && g.overdue_reason.contains("declared"), "{g:?}");
        let err = rect
            .record_action(declare(cases[1].id, "2025-05-30"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("overdue"), "{err:?}");
        authority
            .record_action(declare(cases[1].id, "2025-05-30"))
            .await
            .unwrap();
        // Kunming's deadline is the profile's.
        let err = rect
            .record_action(declare(cases[3].id, "2025-07-20"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        hub.stop().await;
    }

    /// Ordos 第十七条「需在5个工作日内申诉并提供举证材料」: the unit's appeal needs evidence
    /// (references, or files attached to the case). Ordos 第十六条「无效评价…须由评价主体提出，
    /// 各级政务服务管理机构进行界定，并在“好差评”系统中登记」: only the rater raises an invalid
    /// rating, registered by the authority (not the unit, and with no appeal window); the
    /// unit's own appeal cannot end INVALID.
    #[tokio::test]
    async fn ordos_appeals_need_evidence_and_only_the_rater_raises_an_invalid_rating() {
        let orgs = [org(1)];
        let clock = Arc::new(ManualClock::at(cst("2025-03-03", 9)));
        let hub = HubBuilder::new()
            .clock(clock.clone())
            .principal("ordos-dept", &["rectify"], TestScope::Orgs(&orgs))
            .principal("authority", &["admin"], TestScope::National)
            .start()
            .await;
        let mut ingest = hub.ingest().await;
        let results = submit(
            &mut ingest,
            vec![bad_in("o1", ORDOS, &clock), bad_in("o2", ORDOS, &clock)],
        )
        .await;
        let mut dept = RectificationServiceClient::new(hub.channel_as("ordos-dept").await);
        let mut authority = RectificationServiceClient::new(hub.channel_as("authority").await);
        let o1 = case_of(&mut dept, &results[0].hub_id).await.id;
        let o2 = case_of(&mut dept, &results[1].hub_id).await.id;
        let appeal = |id: u64, refs: &[&str]| pb::FileAppealRequest {
            id,
            reason: "评价人所述与监控记录不符".into(),
            evidence_refs: refs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let err = dept.file_appeal(appeal(o1, &[])).await.unwrap_err();
        assert_eq!(bad_request_fields(&err), ["evidence_refs"]);
        dept.file_appeal(appeal(o1, &["监控截图-0303"]))
            .await
            .unwrap();
        // A file attached to the case is evidence too.
        let upload =
            crate::evidence::upload_messages(o2, "监控截图.pdf", &crate::evidence::pdf(4096));
        dept.upload_evidence(tokio_stream::iter(upload))
            .await
            .unwrap();
        dept.file_appeal(appeal(o2, &[])).await.unwrap();

        let decide = |id: u64, outcome: pb::AppealOutcome| pb::DecideAppealRequest {
            id,
            outcome: outcome as i32,
            note: "经核查".into(),
        };
        let err = authority
            .decide_appeal(decide(o1, pb::AppealOutcome::Invalid))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("须由评价主体提出"), "{err:?}");
        authority
            .decide_appeal(decide(o1, pb::AppealOutcome::Upheld))
            .await
            .unwrap();

        // Weeks later, past the unit's window, the rater says the rating was not theirs.
        clock.set(cst("2025-03-24", 9));
        let by_rater = pb::FileAppealRequest {
            raised_by_rater: true,
            reason: "评价人来电（13812345678）：评价系窗口人员代为点击，非本人意愿".into(),
            ..appeal(o1, &[])
        };
        let err = dept.file_appeal(by_rater.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        let filed = authority
            .file_appeal(by_rater)
            .await
            .unwrap()
            .into_inner()
            .bad_rating_case
            .unwrap();
        assert!(
            filed.appeal_pending && filed.appeal_raised_by_rater,
            "{filed:?}"
        );
        let claim = filed.history.last().unwrap();
        assert!(claim.raised_by_rater);
        // The rater's number, typed into the claim, is not shown to the rated unit.
        assert!(!claim.note.contains("13812345678"), "{claim:?}");
        // A rater's own claim is not decided MALICIOUS: their rating was theirs or it was not.
        let err = authority
            .decide_appeal(decide(o1, pb::AppealOutcome::Malicious))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        let decided = authority
            .decide_appeal(decide(o1, pb::AppealOutcome::Invalid))
            .await
            .unwrap()
            .into_inner()
            .bad_rating_case
            .unwrap();
        assert_eq!(decided.appeal_outcome, pb::AppealOutcome::Invalid as i32);
        // The invalid 差评 leaves the counts; the other stays.
        let g = hub
            .query()
            .await
            .get_stats(pb::GetStatsRequest {
                filter: Some(pb::RatingFilter {
                    region_code_prefix: "1506".into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .groups
            .remove(0);
        assert_eq!(g.bad_rating_cases, 1, "{g:?}");
        hub.stop().await;
    }

    async fn ordos_stats(hub: &TestHub) -> pb::StatsGroup {
        hub.query()
            .await
            .get_stats(pb::GetStatsRequest {
                filter: Some(pb::RatingFilter {
                    region_code_prefix: "1506".into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .groups
            .remove(0)
    }

    /// Ordos 第十六条「无效评价是违背评价主体真实意愿的评价，须由评价主体提出，各级政务服务管理机构
    /// 进行界定，并在“好差评”系统中登记」: a 好评 clicked for the rater has no case; the authority
    /// registers the rater's claim on the rating itself (AdminService.RegisterInvalidRating),
    /// and it leaves the scores — once; the rated unit cannot; a 差评 goes through its case.
    #[tokio::test]
    async fn ordos_a_rating_not_the_raters_will_is_registered_invalid_by_the_authority() {
        use pb::admin_service_client::AdminServiceClient;
        let orgs = [org(1)];
        let clock = Arc::new(ManualClock::at(cst("2025-03-03", 9)));
        let hub = HubBuilder::new()
            .clock(clock.clone())
            .principal("ordos-dept", &["rectify", "read"], TestScope::Orgs(&orgs))
            .start()
            .await;
        let mut ingest = hub.ingest().await;
        let mut praise = bad_in("forced", ORDOS, &clock);
        praise.level = pb::Level::VerySatisfied as i32;
        let results = submit(
            &mut ingest,
            vec![praise, bad_in("complaint", ORDOS, &clock)],
        )
        .await;
        assert_eq!(ordos_stats(&hub).await.total, 2);
        let register = |hub_id: &str| pb::RegisterInvalidRatingRequest {
            hub_id: hub_id.into(),
            rater_statement: "评价人张三来电（13812345678，留存号码13800138000）：非本人点击"
                .into(),
            decision_note: "调取监控属实，张三所述无误".into(),
        };
        let err = AdminServiceClient::new(hub.channel_as("ordos-dept").await)
            .register_invalid_rating(register(&results[0].hub_id))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        let mut admin = AdminServiceClient::new(hub.channel_as("tester").await);
        let err = admin
            .register_invalid_rating(pb::RegisterInvalidRatingRequest {
                decision_note: String::new(),
                ..register("not-a-uuid")
            })
            .await
            .unwrap_err();
        assert_eq!(bad_request_fields(&err), ["hub_id", "decision_note"]);
        admin
            .register_invalid_rating(register(&results[0].hub_id))
            .await
            .unwrap();
        assert_eq!(
            ordos_stats(&hub).await.total,
            1,
            "the invalid 好评 left the scores"
        );
        // What is kept of the statement and the finding names neither the rater nor a number.
        let notes = crate::pg::query_on_hub(hub.dir.path(), "SELECT note FROM rating_exclusions");
        assert_eq!(notes.len(), 1, "{notes:?}");
        for secret in ["张三", "13812345678", "13800138000"] {
            assert!(!notes[0].contains(secret), "{secret} kept in {notes:?}");
        }
        assert!(notes[0].contains("非本人点击"), "{notes:?}");
        let err = admin
            .register_invalid_rating(register(&results[0].hub_id))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
        let err = admin
            .register_invalid_rating(register(&results[1].hub_id))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("raised_by_rater"), "{err:?}");
        hub.stop().await;
    }

    /// Ordos 第二十条(四)「抽查率不低于50%」: the sample is drawn for each organisation and
    /// month, so every unit has at least half of each month's cases selected — a unit with
    /// one case that month has it selected (a hash sample of half of all cases left units
    /// below the floor). Kunming sets no share: none selected.
    #[tokio::test]
    async fn ordos_spot_checks_select_at_least_half_of_each_units_cases_every_month() {
        let clock = Arc::new(ManualClock::at(cst("2025-03-03", 9)));
        let hub = HubBuilder::new().clock(clock.clone()).start().await;
        let mut ingest = hub.ingest().await;
        let of = |key: &str, org_n: u32, region: &str| {
            let mut r = bad_in(key, region, &clock);
            r.org_credit_code = org(org_n);
            r
        };
        let mut march = submit(
            &mut ingest,
            vec![
                of("a1", 1, ORDOS),
                of("a2", 1, ORDOS),
                of("b1", 2, ORDOS),
                of("a3", 1, ORDOS),
                of("k1", 3, "530102"),
            ],
        )
        .await;
        clock.set(cst("2025-04-01", 9));
        let april = submit(&mut ingest, vec![bad_in("a4", ORDOS, &clock)]).await;
        march.extend(april);
        let mut rect = RectificationServiceClient::new(hub.channel_as("tester").await);
        let mut selected = Vec::new();
        for r in &march {
            selected.push(case_of(&mut rect, &r.hub_id).await.spot_check_selected);
        }
        // org 1 in March: 1st and 3rd of 3 (2 ≥ 1.5); org 2: its only one; Kunming: none;
        // org 1 in April: its first.
        assert_eq!(selected, [true, false, true, true, false, true]);
        // The first case turns out invalid (the rater's own claim): it will never be
        // archived, so the others take its place and half of what can be checked is chosen.
        let first = case_of(&mut rect, &march[0].hub_id).await.id;
        rect.file_appeal(pb::FileAppealRequest {
            id: first,
            reason: "评价人称非本人评价".into(),
            raised_by_rater: true,
            ..Default::default()
        })
        .await
        .unwrap();
        rect.decide_appeal(pb::DecideAppealRequest {
            id: first,
            outcome: pb::AppealOutcome::Invalid as i32,
            note: "经核实属实".into(),
        })
        .await
        .unwrap();
        let mut selected = Vec::new();
        for r in &march[1..4] {
            selected.push(case_of(&mut rect, &r.hub_id).await.spot_check_selected);
        }
        assert_eq!(selected, [true, true, false], "a2 first, b1, a3 second");
        hub.stop().await;
    }
}

mod counting_and_quality {
    use super::*;

    fn invalid_field(r: &pb::ItemResult) -> String {
        assert_eq!(outcome(r), pb::Outcome::Invalid, "{r:?}");
        r.violations[0].field.clone()
    }

    #[tokio::test]
    async fn one_item_rating_per_case_and_one_follow_up() {
        let hub = TestHub::start().await;
        let mut ingest = hub.ingest().await;
        let first = rating("first");
        assert_eq!(
            outcome(&submit_one(&mut ingest, first.clone()).await),
            pb::Outcome::Accepted
        );
        // Another item rating for the same case: 一事一评.
        let mut second = rating("second");
        second.case_number = first.case_number.clone();
        let r = submit_one(&mut ingest, second).await;
        assert_eq!(invalid_field(&r), "case_number");
        assert!(r.violations[0].description.contains("一事一评"));
        // A follow-up (追加评价) is allowed once (Kunming: default profile limit 1).
        let mut follow = rating("follow-1");
        follow.case_number = first.case_number.clone();
        follow.follow_up_of = "first".into();
        assert_eq!(
            outcome(&submit_one(&mut ingest, follow.clone()).await),
            pb::Outcome::Accepted
        );
        // Re-sending it is a duplicate, not a rule violation.
        assert_eq!(
            outcome(&submit_one(&mut ingest, follow).await),
            pb::Outcome::Duplicate
        );
        let mut again = rating("follow-2");
        again.case_number = first.case_number.clone();
        again.follow_up_of = "first".into();
        assert_eq!(
            invalid_field(&submit_one(&mut ingest, again).await),
            "follow_up_of"
        );
        let mut orphan = rating("orphan");
        orphan.follow_up_of = "nobody".into();
        assert_eq!(
            invalid_field(&submit_one(&mut ingest, orphan).await),
            "follow_up_of"
        );
        hub.stop().await;
    }

    /// 追加评价 follows the original rating, once: a follow-up of a follow-up is refused
    /// (before, chaining them gave one service any number of ratings).
    #[tokio::test]
    async fn a_follow_up_cannot_be_followed_up() {
        let hub = TestHub::start().await;
        let mut ingest = hub.ingest().await;
        let first = rating("first");
        submit_one(&mut ingest, first.clone()).await;
        let mut follow = rating("follow-1");
        follow.case_number = first.case_number.clone();
        follow.follow_up_of = "first".into();
        assert_eq!(
            outcome(&submit_one(&mut ingest, follow).await),
            pb::Outcome::Accepted
        );
        let mut chained = rating("follow-of-follow");
        chained.case_number = first.case_number.clone();
        chained.follow_up_of = "follow-1".into();
        let r = submit_one(&mut ingest, chained).await;
        assert_eq!(invalid_field(&r), "follow_up_of");
        assert!(
            r.violations[0].description.contains("itself a follow-up"),
            "{r:?}"
        );
        hub.stop().await;
    }

    #[tokio::test]
    async fn one_staff_rating_per_visit() {
        let hub = TestHub::start().await;
        let mut ingest = hub.ingest().await;
        let staff = |key: &str| {
            let mut r = rating(key);
            r.target_kind = pb::TargetKind::Staff as i32;
            r.case_number = "VISIT-1".into();
            r.staff_id = "S007".into();
            r
        };
        assert_eq!(
            outcome(&submit_one(&mut ingest, staff("s1")).await),
            pb::Outcome::Accepted
        );
        assert_eq!(
            invalid_field(&submit_one(&mut ingest, staff("s2")).await),
            "staff_id"
        );
        let mut other_staff = staff("s3");
        other_staff.staff_id = "S008".into();
        assert_eq!(
            outcome(&submit_one(&mut ingest, other_staff).await),
            pb::Outcome::Accepted
        );
        hub.stop().await;
    }

    /// Guangdong 第十四条「评价人每次到窗口办理后均可对服务人员进行1次评价」: each window
    /// visit of one case may rate the staff member once; the source names the visit
    /// (visit_id). A second rating for the same visit is still 一次一评, and the refusal
    /// names the visit. In one call and across calls.
    #[tokio::test]
    async fn staff_may_be_rated_once_after_every_window_visit() {
        let hub = TestHub::start().await;
        let mut ingest = hub.ingest().await;
        let staff = |key: &str, visit: &str| {
            let mut r = rating(key);
            r.target_kind = pb::TargetKind::Staff as i32;
            r.case_number = "GD-CASE-1".into();
            r.region_code = "440104".into();
            r.staff_id = "S007".into();
            r.visit_id = visit.into();
            r
        };
        // The first and second visits in one call; the same visit twice in one call.
        let results = submit(
            &mut ingest,
            vec![
                staff("v1", "Q-0001"),
                staff("v2", "Q-0107"),
                staff("v2-again", "Q-0107"),
            ],
        )
        .await;
        assert_eq!(outcome(&results[0]), pb::Outcome::Accepted, "{results:?}");
        assert_eq!(outcome(&results[1]), pb::Outcome::Accepted, "{results:?}");
        assert_eq!(invalid_field(&results[2]), "staff_id");
        assert!(
            results[2].violations[0].description.contains("Q-0107"),
            "{results:?}"
        );
        // A later call: the first visit again is refused, a third visit accepted.
        assert_eq!(
            invalid_field(&submit_one(&mut ingest, staff("v1-again", "Q-0001")).await),
            "staff_id"
        );
        assert_eq!(
            outcome(&submit_one(&mut ingest, staff("v3", "Q-0230")).await),
            pb::Outcome::Accepted
        );
        // The visit is kept with the rating.
        let listed = hub
            .query()
            .await
            .list_ratings(pb::ListRatingsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .ratings;
        let mut visits: Vec<&str> = listed
            .iter()
            .filter(|r| r.case_number == "GD-CASE-1")
            .map(|r| r.visit_id.as_str())
            .collect();
        visits.sort();
        assert_eq!(visits, ["Q-0001", "Q-0107", "Q-0230"]);
        // Elsewhere a case is one visit: Kunming counts one staff rating per case, whatever
        // visit the source names.
        let mut kunming = staff("km-1", "Q-0001");
        kunming.region_code = "530102".into();
        kunming.case_number = "KM-CASE-1".into();
        assert_eq!(
            outcome(&submit_one(&mut ingest, kunming.clone()).await),
            pb::Outcome::Accepted
        );
        kunming.source_key = "km-2".into();
        kunming.visit_id = "Q-0002".into();
        assert_eq!(
            invalid_field(&submit_one(&mut ingest, kunming).await),
            "staff_id"
        );
        // In Guangdong, a rating that names no visit cannot be told from a named one.
        let mut unnamed = staff("unnamed", "");
        unnamed.case_number = "GD-CASE-2".into();
        assert_eq!(
            outcome(&submit_one(&mut ingest, unnamed.clone()).await),
            pb::Outcome::Accepted
        );
        let mut named = staff("named", "Q-0300");
        named.case_number = "GD-CASE-2".into();
        assert_eq!(
            invalid_field(&submit_one(&mut ingest, named).await),
            "staff_id"
        );
        // A visit id is a code: a control character is refused with the field named.
        let r = submit_one(&mut ingest, staff("bad-visit", "Q\u{0}1")).await;
        assert_eq!(invalid_field(&r), "visit_id");
        hub.stop().await;
    }

    #[tokio::test]
    async fn a_batch_rating_covers_every_case_of_the_batch() {
        let t0 = cst("2025-06-10", 9);
        let clock = Arc::new(ManualClock::at(t0 + 3_600_000_000));
        let hub = HubBuilder::new().clock(clock.clone()).start().await;
        let mut cases: Vec<pb::ServiceCase> = (1..=3)
            .map(|i| {
                let mut c = completed(&format!("B-{i}"), "530102", t0);
                c.batch_id = "VISIT-42".into();
                c
            })
            .collect();
        cases.push(completed("SOLO", "530102", t0));
        report(&hub, cases).await;
        let mut ingest = hub.ingest().await;
        let at = Some(rating_hub::time::timestamp_from_micros(clock.now_micros()));
        let mut batch_rating = rating("batch");
        batch_rating.case_number = "B-1".into();
        batch_rating.batch_id = "VISIT-42".into();
        batch_rating.rated_at = at;
        assert_eq!(
            outcome(&submit_one(&mut ingest, batch_rating).await),
            pb::Outcome::Accepted
        );
        let mut second = rating("batch-2");
        second.case_number = "B-2".into();
        second.batch_id = "VISIT-42".into();
        second.rated_at = at;
        assert_eq!(
            invalid_field(&submit_one(&mut ingest, second).await),
            "batch_id"
        );
        let g = hub
            .query()
            .await
            .get_stats(pb::GetStatsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .groups
            .remove(0);
        assert_eq!(
            (g.completed_cases, g.rated_cases),
            (4, 3),
            "one rating covers the three batch cases"
        );
        assert_eq!(g.rating_rate, 0.75);
        assert_eq!(g.unrated_rate, 0.25);
        hub.stop().await;
    }

    #[tokio::test]
    async fn templated_ratings_and_device_and_phone_bursts_are_flagged_not_dropped() {
        let hub = HubBuilder::new()
            .set("quality.template_min", "5")
            .set("quality.device_burst", "4")
            .set("quality.phone_burst", "3")
            .start()
            .await;
        let mut ingest = hub.ingest().await;
        let batch: Vec<_> = (0..6)
            .map(|i| {
                let mut r = rating(&format!("tpl{i}"));
                r.text = "服务很好，非常满意！".into();
                r.rater = None;
                r
            })
            .collect();
        let results = submit(&mut ingest, batch).await;
        let templated = pb::QualityFlag::Templated as i32;
        let flagged: Vec<bool> = results
            .iter()
            .map(|r| r.quality_flags.contains(&templated))
            .collect();
        assert_eq!(
            flagged,
            [false, false, false, false, true, true],
            "from the fifth identical text on"
        );
        assert!(results.iter().all(|r| outcome(r) == pb::Outcome::Accepted));
        let stored = hub
            .query()
            .await
            .get_rating(pb::GetRatingRequest {
                hub_id: results[5].hub_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .rating
            .unwrap();
        assert!(
            stored.quality_flags.contains(&templated),
            "visible in queries"
        );

        let burst: Vec<_> = (0..5)
            .map(|i| {
                let mut r = rating(&format!("dev{i}"));
                r.device_id = "HALL-PAD-3".into();
                r.rater = None;
                r
            })
            .collect();
        let results = submit(&mut ingest, burst).await;
        let device = pb::QualityFlag::DeviceBurst as i32;
        let flagged: Vec<bool> = results
            .iter()
            .map(|r| r.quality_flags.contains(&device))
            .collect();
        assert_eq!(flagged, [false, false, false, true, true]);

        // "Bursts … from one phone number are flagged": the same phone rating again and
        // again within the window (each with its own case), from the third on.
        let phone: Vec<_> = (0..4)
            .map(|i| {
                let mut r = rating(&format!("ph{i}"));
                r.rater.as_mut().unwrap().phone = "13911112222".into();
                r
            })
            .collect();
        let results = submit(&mut ingest, phone).await;
        let burst = pb::QualityFlag::PhoneBurst as i32;
        let flagged: Vec<bool> = results
            .iter()
            .map(|r| r.quality_flags.contains(&burst))
            .collect();
        assert_eq!(flagged, [false, false, true, true]);
        assert!(results.iter().all(|r| outcome(r) == pb::Outcome::Accepted));

        // "flagged" in the statistics counts the ratings with any flag (2 templated, 2 device
        // bursts, 2 phone bursts), none of them left out of the totals.
        let g = kunming_group(&hub).await;
        assert_eq!((g.total, g.flagged), (15, 6), "{g:?}");
        hub.stop().await;
    }
}

#[tokio::test]
async fn quarterly_report_ranks_organisations_and_exports_csv_and_json() {
    let clock = Arc::new(ManualClock::at(cst("2025-08-15", 10)));
    let hub = HubBuilder::new().clock(clock.clone()).start().await;
    let mut ingest = hub.ingest().await;
    let at = |micros: i64| Some(rating_hub::time::timestamp_from_micros(micros));
    let mk = |key: &str, org_n: u32, level: pb::Level, when: i64| {
        let mut r = rating(key);
        r.org_credit_code = org(org_n);
        r.level = level as i32;
        r.text = "说明".into();
        r.rated_at = at(when);
        r
    };
    let q3 = clock.now_micros();
    let q2 = cst("2025-05-06", 10);
    let batch = vec![
        mk("a1", 1, pb::Level::VerySatisfied, q3),
        mk("a2", 1, pb::Level::VerySatisfied, q3),
        mk("b1", 2, pb::Level::BasicallySatisfied, q3),
        mk("b2", 2, pb::Level::Dissatisfied, q3),
        mk("c1", 3, pb::Level::Satisfied, q3),
        mk("c-q2", 3, pb::Level::VeryDissatisfied, q2),
    ];
    for r in submit(&mut ingest, batch).await {
        assert_eq!(outcome(&r), pb::Outcome::Accepted);
    }
    let mut query = hub.query().await;
    let csv = query
        .export_report(pb::ExportReportRequest {
            year: 2025,
            quarter: 3,
            region_code_prefix: "5301".into(),
            format: pb::ReportFormat::Csv as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(csv.filename, "rating-report-2025-Q3-kunming.csv");
    assert_eq!(csv.content_type, "text/csv; charset=utf-8");
    let text = String::from_utf8(csv.content).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("rank,organization,total,"),
        "{}",
        lines[0]
    );
    // Kunming averages: org 1 → 10, org 3 → 8 (its Q2 rating is outside the quarter), org 2 → 4.
    let ranked: Vec<(String, String, String)> = lines[1..]
        .iter()
        .map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            (c[0].to_owned(), c[1].to_owned(), c[10].to_owned())
        })
        .collect();
    assert_eq!(
        ranked,
        [
            ("1".into(), org(1), "10.0000".into()),
            ("2".into(), org(3), "8.0000".into()),
            ("3".into(), org(2), "4.0000".into()),
        ]
    );
    let json = query
        .export_report(pb::ExportReportRequest {
            year: 2025,
            quarter: 3,
            region_code_prefix: "5301".into(),
            format: pb::ReportFormat::Json as i32,
            rank_by: pb::RankBy::BadRate as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let v: serde_json::Value = serde_json::from_slice(&json.content).unwrap();
    assert_eq!(v["period"], "2025-Q3");
    assert_eq!(v["profile"], "kunming");
    let groups = v["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 3);
    // Lowest 差评率 first: orgs 1 and 3 tie at 0 and share rank 1; org 2 (50 %) is third.
    let ranks: Vec<u64> = groups.iter().map(|g| g["rank"].as_u64().unwrap()).collect();
    assert_eq!(ranks, [1, 1, 3]);
    assert_eq!(groups[2]["key"][0], org(2).as_str());
    // "quarterly (or annual)": quarter 0 is the whole year — org 3's Q2 差评 counts now, so
    // its average falls to (8 + 0) / 2 and it drops below org 2.
    let year = query
        .export_report(pb::ExportReportRequest {
            year: 2025,
            quarter: 0,
            region_code_prefix: "5301".into(),
            format: pb::ReportFormat::Json as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(year.filename, "rating-report-2025-kunming.json");
    let v: serde_json::Value = serde_json::from_slice(&year.content).unwrap();
    assert_eq!(v["period"], "2025");
    let order: Vec<&str> = v["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["key"][0].as_str().unwrap())
        .collect();
    assert_eq!(order, [org(1).as_str(), org(2).as_str(), org(3).as_str()]);
    // Ordos 第二十二条「月度、季度、年度考核」: a month's report holds that month only.
    let may = query
        .export_report(pb::ExportReportRequest {
            year: 2025,
            month: 5,
            region_code_prefix: "5301".into(),
            format: pb::ReportFormat::Json as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(may.filename, "rating-report-2025-05-kunming.json");
    let v: serde_json::Value = serde_json::from_slice(&may.content).unwrap();
    assert_eq!(v["period"], "2025-05");
    let keys: Vec<&str> = v["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["key"][0].as_str().unwrap())
        .collect();
    assert_eq!(keys, [org(3).as_str()], "{v}");
    let err = query
        .export_report(pb::ExportReportRequest {
            year: 2025,
            quarter: 5,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_request_fields(&err), ["quarter", "format"]);
    let err = query
        .export_report(pb::ExportReportRequest {
            year: 2025,
            quarter: 2,
            month: 5,
            format: pb::ReportFormat::Csv as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_request_fields(&err), ["month"]);
    hub.stop().await;
}
