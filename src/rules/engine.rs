//! The rules engine: for every completed case that nobody has rated, issue the profile's
//! reminder (an invitation an adapter or upstream can act on) when it is due, and record the
//! profile's default rating when its deadline passed. Default ratings use a reserved source
//! and a key derived from the case, so the store's idempotency makes them once-only — across
//! ticks, restarts and hub instances.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::calendar::Calendar;
use super::date::Date;
use super::profile::{DayUnit, Profiles};
use crate::clock::Clock;
use crate::domain::{IngestRules, parse_rating, rating_for_case};
use crate::pb::v1 as pb;
use crate::privacy::PiiKeys;
use crate::store::{IngestChecks, InsertOutcome, NewRating, RelayWrite, Store, StoreError};

/// The source system of ratings the hub records itself (default ratings). Reserved: no
/// principal may be called this.
pub const HUB_SOURCE: &str = "rating-hub";

/// What one tick did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TickReport {
    pub open_cases: u64,
    pub invitations: u64,
    pub default_ratings: u64,
    /// Cases whose deadline needs a calendar year that has no data (fail closed: nothing done).
    pub calendar_gaps: u64,
}

pub struct RulesEngine {
    store: Arc<dyn Store>,
    profiles: Profiles,
    calendar: Calendar,
    clock: Arc<dyn Clock>,
    rules: IngestRules,
    keys: Arc<PiiKeys>,
    /// The year last warned about (`warn_of_a_missing_year`).
    warned_for: std::sync::atomic::AtomicI64,
}

const PAGE: u32 = 500;

impl RulesEngine {
    pub fn new(
        store: Arc<dyn Store>,
        profiles: Profiles,
        calendar: Calendar,
        clock: Arc<dyn Clock>,
        rules: IngestRules,
        keys: Arc<PiiKeys>,
    ) -> Self {
        Self {
            store,
            profiles,
            calendar,
            clock,
            rules,
            keys,
            warned_for: std::sync::atomic::AtomicI64::new(0),
        }
    }

    pub fn profiles(&self) -> &Profiles {
        &self.profiles
    }

    pub fn calendar(&self) -> &Calendar {
        &self.calendar
    }

    /// From 1 October, warns (once a year per process) when next year has no State Council
    /// calendar: deadlines that run into it are provisional until its notice is loaded.
    fn warn_of_a_missing_year(&self, now: i64) {
        let (year, month, _) = Date::of_instant(now).ymd();
        // This year without its notice, or from October the next one.
        let missing = if !self.calendar.is_official(year) {
            year
        } else if month >= 10 && !self.calendar.is_official(year + 1) {
            year + 1
        } else {
            return;
        };
        if self
            .warned_for
            .swap(missing, std::sync::atomic::Ordering::Relaxed)
            != missing
        {
            tracing::warn!(
                year = missing,
                "No State Council holiday calendar for this year is loaded: deadlines in it are \
                 counted on a provisional calendar (statutory holidays, no 调休), and default \
                 ratings that fall in it wait for the notice. Add it to rules.calendar_file."
            );
        }
    }

    /// One pass over the open completed cases.
    pub async fn tick(&self) -> Result<TickReport, StoreError> {
        let now = self.clock.now_micros();
        self.warn_of_a_missing_year(now);
        let mut report = TickReport::default();
        let mut after = 0;
        loop {
            let cases = self.store.open_completed_cases(after, PAGE).await?;
            let Some(last) = cases.last() else { break };
            after = last.event_id;
            let mut defaults = Vec::new();
            for open in cases {
                report.open_cases += 1;
                let case = &open.case;
                let (profile_name, profile) = self.profiles.for_region(&case.region_code);
                if let Some(hours) = profile.reminder_after_hours {
                    let due = open.completed_at_micros + i64::from(hours) * 3_600_000_000;
                    if !open.has_invitation && now >= due {
                        report.invitations += self
                            .store
                            .relay_write(RelayWrite::Invite {
                                event_id: open.event_id,
                                source_system: open.source_system.clone(),
                                case_number: case.case_number.clone(),
                                org_credit_code: case.org_credit_code.clone(),
                                region_code: case.region_code.clone(),
                                due_at_micros: due,
                            })
                            .await?;
                    }
                }
                let (Some(rule), Some(level)) = (&profile.default_rating, profile.default_level())
                else {
                    continue;
                };
                let deadline = match rule.unit {
                    // "接受服务后7个自然日内未进行评价的" (Ordos): the whole of the 7th natural
                    // day after the service's day, to 24:00 CST — as working days count.
                    DayUnit::NaturalDays => Ok(Date::of_instant(open.completed_at_micros)
                        .add_days(i64::from(rule.after))
                        .end_micros()),
                    // A default is for good (a rating made later cannot replace it): it waits
                    // for the State Council's notice rather than fall on a provisional
                    // deadline that its 调休 may move later.
                    DayUnit::WorkingDays => self
                        .calendar
                        .deadline(open.completed_at_micros, rule.after)
                        .and_then(|d| {
                            if d.provisional {
                                Err(super::calendar::CalendarError::Provisional(
                                    Date::of_instant(d.at).year(),
                                ))
                            } else {
                                Ok(d.at)
                            }
                        }),
                };
                let deadline = match deadline {
                    Ok(d) => d,
                    Err(e) => {
                        report.calendar_gaps += 1;
                        if let Some(suppressed) = crate::telemetry::throttle("rules.calendar_gap") {
                            tracing::warn!(profile = profile_name, error = %e, suppressed, "A default-rating deadline needs a year without the State Council's notice; no default recorded until it is loaded.");
                        }
                        continue;
                    }
                };
                if now < deadline {
                    continue;
                }
                match self.default_rating(
                    &open.source_system,
                    case,
                    level,
                    deadline,
                    open.completed_at_micros,
                    now,
                ) {
                    Ok(r) => defaults.push(r),
                    Err(e) => {
                        tracing::error!(case = %case.case_number, error = %e, "Default rating does not validate; not recorded.")
                    }
                }
            }
            if !defaults.is_empty() {
                let outcomes = self.store.insert_ratings(defaults).await?;
                let accepted = outcomes
                    .iter()
                    .filter(|o| matches!(o, InsertOutcome::Accepted { .. }))
                    .count() as u64;
                report.default_ratings += accepted;
            }
        }
        if report.invitations > 0 || report.default_ratings > 0 {
            tracing::info!(
                invitations = report.invitations,
                default_ratings = report.default_ratings,
                "Rules applied."
            );
        }
        Ok(report)
    }

    fn default_rating(
        &self,
        source: &str,
        case: &pb::ServiceCase,
        level: pb::Level,
        deadline: i64,
        completed: i64,
        now: i64,
    ) -> Result<NewRating, String> {
        let raw = pb::Rating {
            source_key: format!("default:{source}:{}", case.case_number),
            channel: pb::Channel::SystemDefault as i32,
            level: level as i32,
            // The last moment of the rating period (23:59:59.999999 of its last day), so the
            // default falls in that day's month and quarter, not the next one's.
            rated_at: Some(crate::time::timestamp_from_micros(deadline - 1)),
            service_completed_at: Some(crate::time::timestamp_from_micros(completed)),
            is_default: true,
            ..rating_for_case(case)
        };
        let valid = parse_rating(&raw, now, &self.rules, false).map_err(|v| {
            v.iter()
                .map(|x| format!("{}: {}", x.field, x.description))
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        // The counting rules apply under the writer, as to any rating: the case may have
        // been rated (or rated by default through another source's report of it) since the
        // engine read its page; then the default is refused and nothing is recorded.
        let checks = IngestChecks::default();
        Ok(NewRating::new(
            Uuid::now_v7(),
            HUB_SOURCE.into(),
            valid,
            &self.keys,
            checks,
        ))
    }

    /// Ticks every `interval` until `stop`.
    pub fn spawn(
        self: Arc<Self>,
        interval: Duration,
        mut stop: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                if let Err(e) = self.tick().await {
                    tracing::error!(error = %e, "Rules tick failed.");
                }
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = stop.changed() => return,
                }
            }
        })
    }
}
