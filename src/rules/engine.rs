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

/// Where the engine's calendar comes from, so it can be read again when its file changes: a
/// year's State Council notice added to `rules.calendar_file` takes effect without a restart.
pub struct CalendarSource {
    pub path: std::path::PathBuf,
    /// Reads and checks the calendar (the file with the configured overrides).
    pub load: Box<dyn Fn() -> Result<Calendar, String> + Send + Sync>,
}

/// The calendar file as last seen: modification time and size.
type FileStamp = Option<(std::time::SystemTime, u64)>;

pub struct RulesEngine {
    store: Arc<dyn Store>,
    profiles: Profiles,
    calendar: std::sync::RwLock<Arc<Calendar>>,
    calendar_source: Option<(CalendarSource, std::sync::Mutex<FileStamp>)>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    clock: Arc<dyn Clock>,
    rules: IngestRules,
    keys: Arc<PiiKeys>,
    /// The year last warned about (`warn_of_a_missing_year`).
    warned_for: std::sync::atomic::AtomicI64,
}

const PAGE: u32 = 500;

fn file_stamp(path: &std::path::Path) -> FileStamp {
    std::fs::metadata(path)
        .ok()
        .and_then(|m| Some((m.modified().ok()?, m.len())))
}

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
            calendar: std::sync::RwLock::new(Arc::new(calendar)),
            calendar_source: None,
            metrics: None,
            clock,
            rules,
            keys,
            warned_for: std::sync::atomic::AtomicI64::new(0),
        }
    }

    pub fn profiles(&self) -> &Profiles {
        &self.profiles
    }

    /// The calendar in force (a reload replaces it; a caller keeps the one it took).
    pub fn calendar(&self) -> Arc<Calendar> {
        self.calendar
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Counts ticks, invitations, default ratings and calendar gaps in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// With `rules.calendar_file` set, reads it again whenever it changes (the shipped
    /// calendar changes only with the binary).
    pub fn with_calendar_source_of(self, rules: &crate::config::RulesConfig) -> Self {
        if rules.calendar_file.is_empty() {
            return self;
        }
        let config = rules.clone();
        self.with_calendar_source(CalendarSource {
            path: rules.calendar_file.clone().into(),
            load: Box::new(move || config.calendar().map_err(|e| e.to_string())),
        })
    }

    /// Reads the calendar again from `source` whenever its file changes (checked at each
    /// tick).
    pub fn with_calendar_source(mut self, source: CalendarSource) -> Self {
        let stamp = file_stamp(&source.path);
        self.calendar_source = Some((source, std::sync::Mutex::new(stamp)));
        self
    }

    /// Reads the calendar file again if it changed since it was last read. A file that does
    /// not load keeps the calendar in force (said in the log, once per change of the file).
    /// When a new calendar is taken, every bad-rating case whose deadlines it moves gets a
    /// DEADLINES_RECOUNTED step in its history saying which and how. Returns how many cases
    /// got one, or `None` when nothing was reloaded.
    pub async fn reload_calendar(&self) -> Result<Option<u64>, StoreError> {
        let Some((source, seen)) = &self.calendar_source else {
            return Ok(None);
        };
        let stamp = file_stamp(&source.path);
        let before = {
            let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
            if *seen == stamp {
                return Ok(None);
            }
            std::mem::replace(&mut *seen, stamp)
        };
        let new = match (source.load)() {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!(file = %source.path.display(), error = %e, "The changed calendar file does not load; the calendar in force is kept.");
                return Ok(None);
            }
        };
        let old = std::mem::replace(
            &mut *self.calendar.write().unwrap_or_else(|p| p.into_inner()),
            new.clone(),
        );
        let official: Vec<String> = new
            .years()
            .filter(|(y, _)| !old.is_official(*y))
            .map(|(y, src)| format!("{y} ({src})"))
            .collect();
        tracing::info!(file = %source.path.display(), new_official_years = %official.join(", "), "Calendar reloaded.");
        match self.recount_deadlines(&old, &new, &official).await {
            Ok(n) => {
                if let Some(m) = &self.metrics {
                    m.deadlines_recounted.inc_by(n);
                }
                Ok(Some(n))
            }
            Err(e) => {
                // Not finished: the old calendar and stamp back, so the next tick loads the
                // file again and records what this pass did not (steps already written are
                // not written twice).
                *self.calendar.write().unwrap_or_else(|p| p.into_inner()) = old;
                *seen.lock().unwrap_or_else(|p| p.into_inner()) = before;
                Err(e)
            }
        }
    }

    /// Appends a DEADLINES_RECOUNTED step to each case not archived whose deadlines differ
    /// between `old` and `new` (once per calendar: a step with the same note is not added
    /// again, by this instance or another).
    async fn recount_deadlines(
        &self,
        old: &Calendar,
        new: &Calendar,
        official: &[String],
    ) -> Result<u64, StoreError> {
        use crate::pb::v1::{CaseAction, CaseStatus};
        let now = self.clock.now_micros();
        // Deadlines are ends of days: "2027-01-19 24:00", not the next day's 00:00.
        let fmt = |d: Option<i64>| {
            d.map_or("none".to_owned(), |d| {
                format!("{} 24:00", Date::of_instant(d.saturating_sub(1)))
            })
        };
        let mut recorded = 0;
        let mut after = 0;
        loop {
            let cases = self.store.list_bad_cases(None, after, PAGE).await?;
            let Some(last) = cases.last() else { break };
            after = last.id;
            for mut case in cases {
                for _attempt in 0..3 {
                    let (_, profile) = self.profiles.for_region(&case.region_code);
                    let was = super::bad_case::view(&case, profile, old, now);
                    let is = super::bad_case::view(&case, profile, new, now);
                    if is.status == CaseStatus::Archived {
                        break;
                    }
                    let mut moved = Vec::new();
                    for (name, a, b) in [
                        ("contact", was.contact_deadline, is.contact_deadline),
                        ("rectification", was.rectify_deadline, is.rectify_deadline),
                        ("appeal", was.appeal_deadline, is.appeal_deadline),
                        ("declaration", was.declare_by, is.declare_by),
                    ] {
                        if a != b {
                            moved.push(format!("{name} deadline {} → {}", fmt(a), fmt(b)));
                        }
                    }
                    if moved.is_empty() && was.deadline_provisional == is.deadline_provisional {
                        break;
                    }
                    if moved.is_empty() {
                        moved.push("deadlines unchanged".to_owned());
                    }
                    let note = format!(
                        "calendar reloaded{}: {}{}",
                        if official.is_empty() {
                            String::new()
                        } else {
                            format!(
                                " with the State Council's notice for {}",
                                official.join(", ")
                            )
                        },
                        moved.join("; "),
                        if is.deadline_provisional {
                            " (still provisional)"
                        } else {
                            ""
                        }
                    );
                    if case.entries.iter().any(|e| {
                        e.action == CaseAction::DeadlinesRecounted as i32 && e.note == note
                    }) {
                        break;
                    }
                    let written = self
                        .store
                        .relay_write(RelayWrite::CaseEntry {
                            case_id: case.id,
                            expected_entries: case.entries.len() as u64,
                            entry: crate::store::CaseEntryRecord {
                                action: CaseAction::DeadlinesRecounted as i32,
                                actor: HUB_SOURCE.to_owned(),
                                at_micros: 0,
                                note,
                                evidence_refs: Vec::new(),
                                new_deadline_micros: is.rectify_deadline,
                                ..Default::default()
                            },
                            exclude: None,
                        })
                        .await?;
                    if written > 0 {
                        recorded += 1;
                        break;
                    }
                    // Someone recorded a step meanwhile: read the case again and recount.
                    match self.store.get_bad_case(case.id).await? {
                        Some(c) => case = c,
                        None => break,
                    }
                }
            }
        }
        if recorded > 0 {
            tracing::info!(
                cases = recorded,
                "Deadlines counted again on the reloaded calendar."
            );
        }
        Ok(recorded)
    }

    /// From 1 October, warns (once a year per process) when next year has no State Council
    /// calendar: deadlines that run into it are provisional until its notice is loaded.
    fn warn_of_a_missing_year(&self, now: i64) {
        let (year, month, _) = Date::of_instant(now).ymd();
        // This year without its notice, or from October the next one.
        let calendar = self.calendar();
        if let Some(m) = &self.metrics {
            let missing_years = i64::from(!calendar.is_official(year))
                + i64::from(month >= 10 && !calendar.is_official(year + 1));
            m.calendar_missing_years.set(missing_years);
        }
        let missing = if !calendar.is_official(year) {
            year
        } else if month >= 10 && !calendar.is_official(year + 1) {
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
        // A reload that could not finish is tried again next tick; it does not hold up the
        // reminders and default ratings of this one (the calendar in force stays).
        if let Err(e) = self.reload_calendar().await
            && let Some(held) = crate::telemetry::throttle("rules.calendar_reload")
        {
            tracing::error!(error = %e, held, "Cannot record the recounted deadlines; will try again.");
        }
        let now = self.clock.now_micros();
        self.warn_of_a_missing_year(now);
        let calendar = self.calendar();
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
                    DayUnit::WorkingDays => calendar
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
        if let Some(m) = &self.metrics {
            m.rules_ticks.inc();
            m.invitations.inc_by(report.invitations);
            m.default_ratings.inc_by(report.default_ratings);
            m.calendar_gaps.set(report.calendar_gaps as i64);
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
