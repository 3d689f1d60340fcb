//! The 差评工单 life: where a case stands, its deadlines, and which step may come next —
//! derived from its appended history, never stored as mutable state.

use sha2::{Digest, Sha256};

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
}

fn action(e: &CaseEntryRecord) -> CaseAction {
    CaseAction::try_from(e.action).unwrap_or_default()
}

/// Whether the authority must spot-check this case: a stable sample of `share` of all cases.
pub fn spot_check_selected(hub_id: &uuid::Uuid, share: f64) -> bool {
    let h = Sha256::digest(hub_id.as_bytes());
    let x = u64::from_be_bytes(h[..8].try_into().expect("8 bytes"));
    (x as f64) < share * (u64::MAX as f64)
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
            CaseAction::Appeal => {
                appeal_pending = true;
                appeal_filed_at = Some(e.at_micros);
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
    let rectify = deadline(case.opened_at_micros, Some(profile.rectify_working_days));
    let appeal = deadline(case.opened_at_micros, profile.appeal_window_working_days);
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
    let provisional = contact.is_some_and(|(_, p)| p) || rectify_provisional || appeal_provisional;
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
        spot_check_selected: spot_check_selected(&case.hub_id, profile.spot_check_share),
        spot_checked,
        extensions,
        deadline_provisional: provisional,
        rectify_provisional,
        appeal_provisional,
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
        CaseAction::Extend if !matches!(s, S::Open | S::Contacted) => {
            Some("only an unresolved case can be extended".into())
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
            note: String::new(),
            evidence_refs: Vec::new(),
            new_deadline_micros: None,
            appeal_outcome: 0,
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

    #[test]
    fn spot_check_sampling_follows_the_share() {
        let picked = (0..10_000u128)
            .filter(|i| spot_check_selected(&uuid::Uuid::from_u128(*i), 0.5))
            .count();
        assert!((4_700..5_300).contains(&picked), "{picked}");
        assert!(!spot_check_selected(&uuid::Uuid::from_u128(1), 0.0));
    }
}
