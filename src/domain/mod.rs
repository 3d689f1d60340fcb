//! Pure types and rules of 政务服务“好差评”: no I/O here. Everything that crosses the API
//! edge is parsed into these types first, so the rest of the hub never sees unchecked input.

pub mod case;
pub mod codes;
pub mod evidence;
pub mod rating;

pub use case::{ValidCase, parse_case, rating_for_case};
pub use codes::{CreditCode, IdNumber, Phone, RegionCode};
pub use rating::{IngestRules, ValidRating, Violation, parse_rating};
