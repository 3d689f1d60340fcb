//! The rules of 好差评: working-day calendar, per-jurisdiction policy profiles, and the
//! engine that turns completed cases into reminders and default ratings.

pub mod bad_case;
pub mod calendar;
pub mod date;
pub mod engine;
pub mod profile;

pub use calendar::{Calendar, CalendarError, CalendarOverrides};
pub use date::Date;
pub use profile::{Class, DayUnit, Profile, Profiles, kunming_final_score};
