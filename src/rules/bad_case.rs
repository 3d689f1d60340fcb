//! The 差评工单 life: where a case stands, its deadlines, and which step may come next —
//! derived from its appended history, never stored as mutable state.

use super::calendar::Calendar;
use super::profile::Profile;
use crate::pb::v1::{AppealOutcome, CaseAction, CaseStatus};
use crate::store::{CaseEntryRecord, StoredBadCase};

/// A case as of now.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseView {
    pub status: CaseStatus,
    pub contact_deadline: Option<i64>,
    pub rectify_deadline: Option<i64>,
    pub appeal_deadline: Option<i64>,
    pub overdue: bool,
    pub overdue_reason: String,
    pub appeal_outcome: AppealOutcome,
    pub appeal_pending: bool,
    pub spot_check_selected: bool,
    pub spot_checked: bool,
    /// Extensions recorded so far.
    pub extensions: u32,
    /// A deadline was counted on a provisional calendar (a year not yet published).
    pub deadline_provisional: bool,
    /// The rectification deadline, or the appeal deadline, was counted on a provisional
    /// calendar: each refuses nothing on its own account while it is.
    pub rectify_provisional: bool,
    pub appeal_provisional: bool,
    /// The profile has the unit declare its rectification deadline (DECLARE_DEADLINE).
    pub declared_mode: bool,
    /// … and the unit has declared it.
    pub declared: bool,
    /// … and, while it has not, when it must have declared (or rectified) by.
    pub declare_by: Option<i64>,
    pub declare_by_provisional: bool,
    /// The appeal pending or decided was raised by the rater.
    pub appeal_by_rater: bool,
}

fn action(e: &CaseEntryRecord) -> CaseAction {
    CaseAction::try_from(e.action).unwrap_or_default()
}

/// Whether the authority must spot-check a case that is the `rank`-th (from 0) of its
/// organisation's cases opened in its month: of the first n cases of an organisation and
/// month, ceil(n × share) are selected — never fewer than the share, for every organisation
/// and month (Ordos 「抽查率不低于50%」), and the same answer every time it is asked.
pub fn spot_check_selected(rank: u64, share: f64) -> bool {
    // The tiny margin keeps an exact product (10 × 0.1) from rounding up past itself.
    let upto = |n: u64| (n as f64 * share - 1e-9).ceil().max(0.0) as u64;
    upto(rank + 1) > upto(rank)
}

/// Derives where a case stands at `now` under `profile`.
pub fn view(case: &StoredBadCase, profile: &Profile, calendar: &Calendar, now: i64) -> CaseView {
    let mut status = CaseStatus::Open;
    let mut extended: Option<i64> = None;
    let mut appeal_pending = false;
    let mut appeal_filed_at = None;
    let mut appeal_outcome = AppealOutcome::Unspecified;
    let mut spot_checked = false;
    let mut extensions = 0;
    let mut declared: Option<i64> = None;
    let mut appeal_by_rater = false;
    for e in &case.entries {
        match action(e) {
            CaseAction::Contact if status == CaseStatus::Open => status = CaseStatus::Contacted,
            CaseAction::Rectify | CaseAction::Explain => status = CaseStatus::Resolved,
            CaseAction::Extend => {
                extended = e.new_deadline_micros.or(extended);
                extensions += 1;
            }
            CaseAction::FeedBack => status = CaseStatus::FedBack,
            CaseAction::Callback => status = CaseStatus::CalledBack,
            CaseAction::Archive => status = CaseStatus::Archived,
            CaseAction::SpotCheck => spot_checked = true,
            CaseAction::DeclareDeadline => declared = e.new_deadline_micros.or(declared),
            CaseAction::Appeal => {
                appeal_pending = true;
                appeal_filed_at = Some(e.at_micros);
                appeal_by_rater = e.by_rater;
            }
            CaseAction::AppealDecision => {
                appeal_pending = false;
                appeal_outcome = AppealOutcome::try_from(e.appeal_outcome).unwrap_or_default();
            }
            _ => {}
        }
    }
    let mut gaps = Vec::new();
    // Each deadline with whether it was counted on a provisional calendar.
    let mut deadline = |from: i64, days: Option<u32>| {
        days.and_then(|n| match calendar.deadline(from, n) {
            Ok(d) => Some((d.at, d.provisional)),
            Err(e) => {
                gaps.push(e.to_string());
                None
            }
        })
    };
    let contact = deadline(case.opened_at_micros, profile.contact_working_days);
    let declared_mode = profile.rectify_deadline_declared;
    // A declared deadline is a moment the unit named, not counted on any calendar.
    let rectify = match profile.rectify_days() {
        Some(days) => deadline(case.opened_at_micros, Some(days)),
        None => declared.map(|at| (at, false)),
    };
    let appeal = deadline(case.opened_at_micros, profile.appeal_window_working_days);
    // Where the unit sets its deadline, it sets it (or rectifies) in time: a unit that never
    // declares is overdue, not exempt.
    let declare_by = if declared_mode && declared.is_none() {
        deadline(
            case.opened_at_micros,
            Some(profile.declare_within_working_days.unwrap_or(15)),
        )
    } else {
        None
    };
    let contact_deadline = contact.map(|(at, _)| at);
    // An extension never shortens: checked against a provisional deadline, it may fall
    // before the deadline the State Council's notice gives once loaded.
    let (rectify_deadline, rectify_provisional) = match (extended, rectify) {
        (Some(x), Some((at, p))) if at > x => (Some(at), p),
        (Some(x), _) => (Some(x), false),
        (None, r) => (r.map(|(at, _)| at), r.is_some_and(|(_, p)| p)),
    };
    let appeal_deadline = appeal.map(|(at, _)| at);
    let appeal_provisional = appeal.is_some_and(|(_, p)| p);
    let declare_by_provisional = declare_by.is_some_and(|(_, p)| p);
    let provisional = contact.is_some_and(|(_, p)| p)
        || rectify_provisional
        || appeal_provisional
        || declare_by_provisional;
    // An appeal that found the rating invalid or malicious closes the case's obligations.
    let void = matches!(
        appeal_outcome,
        AppealOutcome::Invalid | AppealOutcome::Malicious
    );
    let review_deadline = match (
        appeal_pending,
        appeal_filed_at,
        profile.appeal_review_working_days,
    ) {
        (true, Some(filed), Some(days)) => deadline(filed, Some(days)).map(|(at, _)| at),
        _ => None,
    };
    let (overdue, overdue_reason) = match (contact_deadline, rectify_deadline) {
        _ if void => (false, String::new()),
        _ if review_deadline.is_some_and(|d| now > d) => (
            true,
            "the appeal was not decided within the review deadline".to_owned(),
        ),
        (Some(c), _) if status == CaseStatus::Open && now > c => {
            (true, "not contacted within the contact deadline".to_owned())
        }
        (_, Some(r)) if matches!(status, CaseStatus::Open | CaseStatus::Contacted) && now > r => (
            true,
            "not rectified or explained within the rectification deadline".to_owned(),
        ),
        _ if matches!(status, CaseStatus::Open | CaseStatus::Contacted)
            && declare_by.is_some_and(|(d, _)| now > d) =>
        {
            (
                true,
                format!(
                    "no rectification deadline declared (DECLARE_DEADLINE), nor rectified, \
                     within {} working days",
                    profile.declare_within_working_days.unwrap_or(15)
                ),
            )
        }
        _ if !gaps.is_empty() => (false, format!("deadline unknown: {}", gaps.join("; "))),
        _ => (false, String::new()),
    };
    CaseView {
        status,
        contact_deadline,
        rectify_deadline,
        appeal_deadline,
        overdue,
        overdue_reason,
        appeal_outcome,
        appeal_pending,
        spot_check_selected: spot_check_selected(case.org_month_rank, profile.spot_check_share),
        spot_checked,
        extensions,
        deadline_provisional: provisional,
        rectify_provisional,
        appeal_provisional,
        declared_mode,
        declared: declared.is_some(),
        declare_by: declare_by.map(|(at, _)| at),
        declare_by_provisional,
        appeal_by_rater,
    }
}

/// Why `next` may not be recorded now, if it may not.
pub fn refuse(case: &StoredBadCase, v: &CaseView, next: CaseAction, now: i64) -> Option<String> {
    use CaseStatus as S;
    let s = v.status;
    if s == S::Archived && next != CaseAction::SpotCheck {
        return Some("the case is archived; only a spot check can follow".into());
    }
    match next {
        CaseAction::Contact if s != S::Open => Some("the rater was already contacted".into()),
        CaseAction::Rectify | CaseAction::Explain if s != S::Contacted => Some(match s {
            S::Open => "contact and verify with the rater first (CONTACT)".into(),
            _ => "the case is already rectified or explained".into(),
        }),
        CaseAction::DeclareDeadline if !v.declared_mode => {
            Some("the profile counts the rectification deadline itself; to move it, EXTEND".into())
        }
        CaseAction::DeclareDeadline if v.declared => {
            Some("the deadline was already declared; a later one is an extension (EXTEND)".into())
        }
        CaseAction::DeclareDeadline if !matches!(s, S::Open | S::Contacted) => {
            Some("the case is already rectified or explained".into())
        }
        // As for an extension: once the time to act passed, the case is overdue, and that
        // record stands.
        CaseAction::DeclareDeadline
            if !v.rectify_provisional && v.rectify_deadline.is_some_and(|d| now > d) =>
        {
            Some(format!(
                "the rectification deadline passed at {}; an overdue case cannot declare another",
                crate::time::format_cst_micros(v.rectify_deadline.unwrap_or_default())
            ))
        }
        CaseAction::DeclareDeadline
            if !v.declare_by_provisional && v.declare_by.is_some_and(|d| now > d) =>
        {
            Some(format!(
                "a deadline was to be declared by {}; the case is overdue, and that record stands \
                 (the authority may still declare one)",
                crate::time::format_cst_micros(v.declare_by.unwrap_or_default())
            ))
        }
        CaseAction::Extend if !matches!(s, S::Open | S::Contacted) => {
            Some("only an unresolved case can be extended".into())
        }
        CaseAction::Extend if v.declared_mode && !v.declared => {
            Some("the unit declares its rectification deadline first (DECLARE_DEADLINE)".into())
        }
        // An extension moves a deadline that has not passed yet: once it passed, the case
        // is overdue, and that record stands.
        // A provisional deadline may still move later: it refuses nothing.
        CaseAction::Extend
            if !v.rectify_provisional && v.rectify_deadline.is_some_and(|d| now > d) =>
        {
            Some(format!(
                "the rectification deadline passed at {}; an overdue case cannot be extended",
                crate::time::format_cst_micros(v.rectify_deadline.unwrap_or_default())
            ))
        }
        CaseAction::FeedBack if s != S::Resolved => {
            Some("rectify or explain first (RECTIFY or EXPLAIN), then feed back".into())
        }
        CaseAction::Callback if s != S::FedBack => {
            Some("feed the result back to the rater first (FEED_BACK)".into())
        }
        CaseAction::Archive if !(s == S::CalledBack || (s == S::FedBack && !case.real_name)) => {
            Some(if case.real_name {
                "a real-name 差评 needs its callback (CALLBACK) before archiving".into()
            } else {
                "feed the result back first (FEED_BACK)".into()
            })
        }
        CaseAction::SpotCheck if s != S::Archived => {
            Some("only archived cases are spot-checked".into())
        }
        CaseAction::SpotCheck if v.spot_checked => Some("the case was already spot-checked".into()),
        CaseAction::Appeal if v.appeal_pending => Some("an appeal is already pending".into()),
        CaseAction::Appeal if v.appeal_outcome != AppealOutcome::Unspecified => {
            Some("the appeal was already decided".into())
        }
        CaseAction::Appeal
            if !v.appeal_provisional && v.appeal_deadline.is_some_and(|d| now > d) =>
        {
            Some(format!(
                "the appeal window closed at {}",
                crate::time::format_cst_micros(v.appeal_deadline.unwrap_or_default())
            ))
        }
        CaseAction::AppealDecision if !v.appeal_pending => Some("no appeal is pending".into()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{Date, Profiles};

    fn entry(action: CaseAction, at: i64) -> CaseEntryRecord {
        CaseEntryRecord {
            action: action as i32,
            actor: "dept".into(),
            at_micros: at,
            ..Default::default()
        }
    }

    fn case(entries: Vec<CaseEntryRecord>) -> StoredBadCase {
        StoredBadCase {
            id: 1,
            hub_id: uuid::Uuid::from_u128(7),
            org_credit_code: "ORG".into(),
            region_code: "530102".into(),
            opened_at_micros: Date::parse("2025-03-03").unwrap().start_micros() + 3_600_000_000,
            real_name: true,
            org_month_rank: 0,
            entries,
        }
    }

    /// A case opened on Monday 14 December 2026 under Kunming's profile: its 3-day appeal
    /// window ends in 2026 (official), its 15-day rectification deadline in 2027 (provisional
    /// while 2027's notice is not loaded). The provisional one must not reopen the other.
    #[test]
    fn each_deadline_is_provisional_on_its_own_account() {
        let p = Profiles::shipped();
        let km = p.get("kunming").unwrap();
        let cal = Calendar::national();
        let mut c = case(vec![]);
        c.opened_at_micros = Date::parse("2026-12-14").unwrap().start_micros() + 3_600_000_000;
        let now = Date::parse("2026-12-28").unwrap().start_micros();
        let v = view(&c, km, &cal, now);
        assert!(v.rectify_provisional && v.deadline_provisional, "{v:?}");
        assert!(!v.appeal_provisional, "{v:?}");
        let refused = refuse(&c, &v, CaseAction::Appeal, now).expect("the window closed");
        assert!(refused.contains("appeal window closed"), "{refused}");

        // An extension to a day before the calendar's deadline (as one checked against a
        // provisional deadline may be, once the notice moves it later) never shortens it.
        let calendar_deadline = v.rectify_deadline.unwrap();
        let mut extend = entry(CaseAction::Extend, now);
        extend.new_deadline_micros = Some(calendar_deadline - 86_400_000_000);
        c.entries.push(extend);
        let v = view(&c, km, &cal, now);
        assert_eq!(v.rectify_deadline, Some(calendar_deadline));
        assert!(v.rectify_provisional);
        // An extension beyond it stands, and is no calendar's.
        c.entries[0].new_deadline_micros = Some(calendar_deadline + 86_400_000_000);
        let v = view(&c, km, &cal, now);
        assert_eq!(v.rectify_deadline, Some(calendar_deadline + 86_400_000_000));
        assert!(!v.rectify_provisional);
    }

    #[test]
    fn an_appeal_left_undecided_past_the_review_deadline_is_overdue() {
        let p = Profiles::shipped();
        let km = p.get("kunming").unwrap();
        let cal = Calendar::national();
        let filed = Date::parse("2025-03-04").unwrap().start_micros();
        let c = case(vec![
            entry(CaseAction::Contact, filed),
            entry(CaseAction::Appeal, filed),
        ]);
        // Ten working days after 2025-03-04 end with 2025-03-18.
        let v = view(
            &c,
            km,
            &cal,
            Date::parse("2025-03-18").unwrap().start_micros(),
        );
        assert!(!v.overdue && v.appeal_pending);
        let v = view(
            &c,
            km,
            &cal,
            Date::parse("2025-03-19").unwrap().start_micros() + 1,
        );
        assert!(v.overdue);
        assert!(
            v.overdue_reason.contains("review deadline"),
            "{}",
            v.overdue_reason
        );
    }

    #[test]
    fn anonymous_cases_archive_after_feedback_real_name_ones_need_a_callback() {
        let cal = Calendar::national();
        let p = Profiles::shipped();
        let km = p.get("kunming").unwrap();
        let t = Date::parse("2025-03-04").unwrap().start_micros();
        let steps = vec![
            entry(CaseAction::Contact, t),
            entry(CaseAction::Rectify, t),
            entry(CaseAction::FeedBack, t),
        ];
        let mut anonymous = case(steps.clone());
        anonymous.real_name = false;
        let v = view(&anonymous, km, &cal, t);
        assert_eq!(refuse(&anonymous, &v, CaseAction::Archive, t), None);
        let named = case(steps);
        let v = view(&named, km, &cal, t);
        assert!(
            refuse(&named, &v, CaseAction::Archive, t)
                .unwrap()
                .contains("CALLBACK")
        );
    }

    /// Ordos 第二十条(四)「抽查率不低于50%」: for every organisation and month, however
    /// many cases it has, at least the share of them is selected (here every count from 1
    /// to 200, and shares that do not divide evenly).
    #[test]
    fn spot_check_selection_never_falls_below_the_share_for_any_count() {
        for share in [0.5, 0.1, 0.3, 1.0 / 3.0, 0.75, 1.0] {
            let mut picked = 0u64;
            for n in 1..=200u64 {
                picked += u64::from(spot_check_selected(n - 1, share));
                assert!(
                    picked as f64 >= n as f64 * share - 1e-6,
                    "share {share}: {picked} of {n}"
                );
                assert!(
                    (picked as f64) < n as f64 * share + 1.0,
                    "share {share}: {picked} of {n} is more than needed"
                );
            }
        }
        // One case in a month under 50 %: it is checked (not 0 of 1).
        assert!(spot_check_selected(0, 0.5));
        assert!(!spot_check_selected(1, 0.5));
        assert!((0..100).all(|r| !spot_check_selected(r, 0.0)));
    }

    /// Ordos 第二十条(二)「不能及时整改的应明确整改措施和完成时限」: no invented deadline;
    /// the unit's declared one is what overdue is measured against.
    #[test]
    fn a_declared_deadline_is_the_only_rectification_deadline() {
        let p = Profiles::shipped();
        let ordos = p.get("ordos").unwrap();
        let cal = Calendar::national();
        let t = Date::parse("2025-03-04").unwrap().start_micros();
        let mut c = case(vec![entry(CaseAction::Contact, t)]);
        // Undeclared: no rectification deadline, and not overdue while the unit still has
        // time to declare (15 working days from Monday 2025-03-03: the end of 2025-03-24).
        let soon = Date::parse("2025-03-24").unwrap().start_micros();
        let v = view(&c, ordos, &cal, soon);
        assert_eq!(v.rectify_deadline, None);
        assert!(v.declared_mode && !v.declared && !v.overdue, "{v:?}");
        assert_eq!(
            v.declare_by,
            Some(Date::parse("2025-03-24").unwrap().end_micros())
        );
        assert!(
            refuse(&c, &v, CaseAction::Extend, soon)
                .unwrap()
                .contains("DECLARE_DEADLINE")
        );
        // A unit that never declares is overdue, not exempt; and it cannot declare its way
        // out of that.
        let later = Date::parse("2025-06-30").unwrap().start_micros();
        let v = view(&c, ordos, &cal, later);
        assert!(v.overdue && v.overdue_reason.contains("declared"), "{v:?}");
        assert!(
            refuse(&c, &v, CaseAction::DeclareDeadline, later)
                .unwrap()
                .contains("overdue")
        );
        let mut declare = entry(CaseAction::DeclareDeadline, t);
        declare.new_deadline_micros = Some(Date::parse("2025-04-30").unwrap().end_micros());
        c.entries.push(declare);
        let v = view(&c, ordos, &cal, later);
        assert_eq!(
            v.rectify_deadline,
            Some(Date::parse("2025-04-30").unwrap().end_micros())
        );
        assert!(
            v.overdue && v.overdue_reason.contains("rectification deadline"),
            "{v:?}"
        );
        assert!(
            refuse(&c, &v, CaseAction::DeclareDeadline, t)
                .unwrap()
                .contains("already declared")
        );
        // Kunming counts its 15 days and has nothing to declare.
        let km = p.get("kunming").unwrap();
        let v = view(&case(vec![]), km, &cal, t);
        assert!(v.rectify_deadline.is_some());
        assert!(
            refuse(&case(vec![]), &v, CaseAction::DeclareDeadline, t)
                .unwrap()
                .contains("counts the rectification deadline itself")
        );
    }
}
