//! Turning what a source sent into a rating the hub can trust (parse, don't validate).
//!
//! `parse_rating` either returns a [`ValidRating`] — normalised, hashed, flagged — or every
//! rule the input broke, each naming its field. Nothing past this point re-checks input.

use prost::Message;
use prost_types::Timestamp;
use sha2::{Digest, Sha256};

use super::codes::{CreditCode, DocumentType, Phone, RegionCode, parse_document};
use crate::pb::v1 as pb;
use pb::{Channel, Level, QualityFlag, RaterKind, TargetKind};

/// One broken rule: the field path (relative to the item) and a description that never
/// contains the offending value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub field: String,
    pub description: String,
}

/// Rules that depend on configuration.
#[derive(Debug, Clone)]
pub struct IngestRules {
    /// How far in the future a timestamp may be (clocks of hall devices drift).
    pub clock_skew_secs: i64,
    /// Refuse a 差评 that carries neither detail codes nor text.
    pub require_reason_for_bad: bool,
}

impl Default for IngestRules {
    fn default() -> Self {
        Self {
            clock_skew_secs: 300,
            // docs/decisions/0006-ratings-the-rules-must-not-lose.md
            require_reason_for_bad: false,
        }
    }
}

/// Size limits, in characters (items: entries). Documented in the proto.
pub mod limits {
    pub const SOURCE_KEY: usize = 128;
    pub const CODE: usize = 64;
    pub const NAME: usize = 200;
    pub const PERSON_NAME: usize = 100;
    pub const DETAIL_CODES: usize = 32;
    pub const DETAIL_CODE: usize = 32;
    pub const INDICATORS: usize = 32;
    pub const INDICATOR_CODE: usize = 32;
    pub const INDICATOR_TEXT: usize = 500;
    pub const TEXT: usize = 2000;
    pub const ATTRIBUTES: usize = 32;
    pub const ATTRIBUTE_KEY: usize = 64;
    pub const ATTRIBUTE_VALUE: usize = 1000;
}

/// Earliest instant accepted anywhere: 2000-01-01T00:00:00Z. Anything earlier is a broken clock.
const EARLIEST_SECS: i64 = 946_684_800;

/// A rating that passed every rule. `body` is the normalised canonical message (output-only
/// fields cleared except `quality_flags`), `content_hash` identifies its content for
/// idempotency.
#[derive(Debug, Clone)]
pub struct ValidRating {
    pub source_key: String,
    pub level: Level,
    pub channel: Channel,
    pub target_kind: TargetKind,
    pub org_credit_code: CreditCode,
    pub region_code: RegionCode,
    pub item_code: String,
    pub staff_id: String,
    pub case_number: String,
    pub rated_at_micros: i64,
    pub is_default: bool,
    pub quality_flags: Vec<QualityFlag>,
    pub content_hash: [u8; 32],
    pub body: pb::Rating,
    /// For a rating relayed by another hub: the hub id it already has, kept network-wide.
    pub relayed_hub_id: Option<uuid::Uuid>,
}

/// Collects violations while normalising fields.
pub(crate) struct Checker {
    pub violations: Vec<Violation>,
    now_secs: i64,
    skew_secs: i64,
}

impl Checker {
    pub fn new(now_micros: i64, rules: &IngestRules) -> Self {
        Self {
            violations: Vec::new(),
            now_secs: now_micros.div_euclid(1_000_000),
            skew_secs: rules.clock_skew_secs,
        }
    }

    pub fn fail(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.violations.push(Violation {
            field: field.into(),
            description: description.into(),
        });
    }

    /// A single-line text: trimmed, bounded, no control characters.
    pub fn line(&mut self, field: &str, value: &str, max: usize, required: bool) -> String {
        let v = value.trim();
        if required && v.is_empty() {
            self.fail(field, "is required");
        } else if v.chars().count() > max {
            self.fail(field, format!("is longer than {max} characters"));
        } else if v.chars().any(char::is_control) {
            self.fail(field, "contains control characters");
        }
        v.to_owned()
    }

    /// Free text: bounded; line breaks and tabs allowed, other control characters not.
    pub fn text(&mut self, field: &str, value: &str, max: usize) -> String {
        let v = value.trim();
        if v.chars().count() > max {
            self.fail(field, format!("is longer than {max} characters"));
        } else if v
            .chars()
            .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
        {
            self.fail(field, "contains control characters");
        }
        v.to_owned()
    }

    pub fn enum_value<E: TryFrom<i32>>(
        &mut self,
        field: &str,
        raw: i32,
        required: bool,
    ) -> Option<E> {
        match E::try_from(raw) {
            Ok(e) if raw != 0 => Some(e),
            Ok(e) => {
                if required {
                    self.fail(
                        field,
                        "is required (the *_UNSPECIFIED value is not allowed)",
                    );
                    None
                } else {
                    Some(e)
                }
            }
            Err(_) => {
                self.fail(field, format!("{raw} is not a known value"));
                None
            }
        }
    }

    /// A timestamp as microseconds since the epoch, not before 2000 and not in the future
    /// beyond the allowed clock skew.
    pub fn time(&mut self, field: &str, ts: Option<&Timestamp>, required: bool) -> Option<i64> {
        let Some(ts) = ts else {
            if required {
                self.fail(field, "is required");
            }
            return None;
        };
        if !(0..1_000_000_000).contains(&ts.nanos) {
            self.fail(field, "nanos must be within 0..999999999");
            return None;
        }
        if ts.seconds < EARLIEST_SECS {
            self.fail(field, "is before 2000-01-01");
            return None;
        }
        if ts.seconds > self.now_secs + self.skew_secs {
            self.fail(
                field,
                format!(
                    "is in the future (more than {} s ahead of the hub's clock)",
                    self.skew_secs
                ),
            );
            return None;
        }
        Some(ts.seconds * 1_000_000 + i64::from(ts.nanos / 1_000))
    }

    /// 承诺时限 / 法定时限: at most ten years of units, with a unit whenever there is a value.
    pub fn time_limit(
        &mut self,
        field: &str,
        raw: Option<&pb::TimeLimit>,
    ) -> Option<pb::TimeLimit> {
        let raw = raw?;
        let unit: pb::TimeUnit = self
            .enum_value(&format!("{field}.unit"), raw.unit, false)
            .unwrap_or_default();
        if raw.value > 3650 {
            self.fail(format!("{field}.value"), "is more than 3650");
        }
        if raw.value > 0 && unit == pb::TimeUnit::Unspecified {
            self.fail(format!("{field}.unit"), "is required with a value");
        }
        Some(pb::TimeLimit {
            value: raw.value,
            unit: unit as i32,
        })
    }

    /// A 代办人 (a person, or an intermediary organisation with its credit code), checked as
    /// a rater is.
    pub fn agent(&mut self, field: &str, raw: Option<&pb::Rater>) -> Option<pb::Rater> {
        raw.map(|a| self.rater(field, a))
    }

    pub fn region(&mut self, field: &str, raw: &str) -> Option<RegionCode> {
        if raw.trim().is_empty() {
            self.fail(field, "is required");
            return None;
        }
        RegionCode::parse(raw)
            .map_err(|e| self.fail(field, e.0))
            .ok()
    }

    pub fn credit_code(&mut self, field: &str, raw: &str, required: bool) -> Option<CreditCode> {
        if raw.trim().is_empty() {
            if required {
                self.fail(field, "is required");
            }
            return None;
        }
        CreditCode::parse(raw)
            .map_err(|e| self.fail(field, e.0))
            .ok()
    }

    pub fn attributes(
        &mut self,
        field: &str,
        raw: &std::collections::BTreeMap<String, String>,
    ) -> std::collections::BTreeMap<String, String> {
        use limits::*;
        if raw.len() > ATTRIBUTES {
            self.fail(field, format!("has more than {ATTRIBUTES} entries"));
        }
        let mut out = std::collections::BTreeMap::new();
        for (k, v) in raw {
            let key = k.trim();
            if key.is_empty() || key.chars().count() > ATTRIBUTE_KEY {
                self.fail(
                    field,
                    format!("keys must be 1 to {ATTRIBUTE_KEY} characters"),
                );
            } else if key.chars().any(char::is_control) {
                self.fail(field, "keys must not contain control characters");
            }
            if v.chars().count() > ATTRIBUTE_VALUE {
                self.fail(
                    format!("{field}[{key}]"),
                    format!("is longer than {ATTRIBUTE_VALUE} characters"),
                );
            } else if v.chars().any(char::is_control) {
                // A NUL cannot be stored in PostgreSQL text; line breaks forge log and CSV
                // lines.
                self.fail(format!("{field}[{key}]"), "contains control characters");
            }
            out.insert(key.to_owned(), v.clone());
        }
        out
    }

    /// Rater / applicant: kind, name, ID number, organisation code, phone. PII is validated
    /// but never echoed.
    pub fn rater(&mut self, prefix: &str, raw: &pb::Rater) -> pb::Rater {
        let kind: RaterKind = self
            .enum_value(&format!("{prefix}.kind"), raw.kind, false)
            .unwrap_or_default();
        let name = self.line(
            &format!("{prefix}.name"),
            &raw.name,
            limits::PERSON_NAME,
            false,
        );
        let id_type: pb::IdDocumentType = self
            .enum_value(&format!("{prefix}.id_type"), raw.id_type, false)
            .unwrap_or_default();
        let mut id_number = String::new();
        if !raw.id_number.trim().is_empty() {
            let field = format!("{prefix}.id_number");
            if !matches!(kind, RaterKind::NaturalPerson | RaterKind::Unspecified) {
                self.fail(
                    field,
                    "is only for natural persons; organisations use credit_code",
                );
            } else {
                match parse_document(document_type(id_type), &raw.id_number) {
                    Ok(id) => id_number = id,
                    Err(e) => self.fail(field, e.0),
                }
            }
        }
        // A type without a number says nothing (a source column with a default type for
        // every row, anonymous raters included): dropped, never a reason to refuse.
        let id_type = if id_number.is_empty() {
            pb::IdDocumentType::Unspecified
        } else {
            id_type
        };
        let credit_code = self
            .credit_code(&format!("{prefix}.credit_code"), &raw.credit_code, false)
            .map(|c| c.as_str().to_owned())
            .unwrap_or_default();
        let mut phone = String::new();
        if !raw.phone.trim().is_empty() {
            match Phone::parse(&raw.phone) {
                Ok(p) => phone = p.as_str().to_owned(),
                Err(e) => self.fail(format!("{prefix}.phone"), e.0),
            }
        }
        pb::Rater {
            kind: kind as i32,
            real_name: raw.real_name,
            name,
            id_number,
            id_type: id_type as i32,
            credit_code,
            phone,
        }
    }
}

/// The validator's view of the contract's 证件类型 (unset reads as 居民身份证).
pub fn document_type(t: pb::IdDocumentType) -> DocumentType {
    match t {
        pb::IdDocumentType::Unspecified | pb::IdDocumentType::ResidentIdCard => {
            DocumentType::ResidentIdCard
        }
        pb::IdDocumentType::HmtResidencePermit => DocumentType::HmtResidencePermit,
        pb::IdDocumentType::ForeignPermanentResident => DocumentType::ForeignPermanentResident,
        pb::IdDocumentType::HkMacaoTravelPermit => DocumentType::HkMacaoTravelPermit,
        pb::IdDocumentType::TaiwanTravelPermit => DocumentType::TaiwanTravelPermit,
        pb::IdDocumentType::Passport => DocumentType::Passport,
        pb::IdDocumentType::Other => DocumentType::Other,
    }
}

pub fn is_bad(level: Level) -> bool {
    matches!(level, Level::Dissatisfied | Level::VeryDissatisfied)
}

/// Validates and normalises one submitted rating. `now_micros` is the hub's clock. `relay`:
/// the caller is a relaying hub, whose `hub_id` and origin fields are kept (for everyone else
/// they are output only and ignored).
pub fn parse_rating(
    raw: &pb::Rating,
    now_micros: i64,
    rules: &IngestRules,
    relay: bool,
) -> Result<ValidRating, Vec<Violation>> {
    use limits::*;
    let mut c = Checker::new(now_micros, rules);
    let mut relayed_hub_id = None;
    let (mut origin_source_system, mut origin_source_key) = (String::new(), String::new());
    if relay {
        match uuid::Uuid::parse_str(raw.hub_id.trim()) {
            Ok(id) => relayed_hub_id = Some(id),
            Err(_) => c.fail("hub_id", "a relayed rating must carry its hub id (a UUID)"),
        }
        origin_source_system = c.line(
            "origin_source_system",
            &raw.origin_source_system,
            CODE,
            true,
        );
        origin_source_key = c.line(
            "origin_source_key",
            &raw.origin_source_key,
            SOURCE_KEY,
            true,
        );
    }

    let source_key = c.line("source_key", &raw.source_key, SOURCE_KEY, true);
    let channel: Option<Channel> = c.enum_value("channel", raw.channel, true);
    let level: Option<Level> = c.enum_value("level", raw.level, true);
    let target_kind: Option<TargetKind> = c.enum_value("target_kind", raw.target_kind, true);

    let item_required = target_kind == Some(TargetKind::Item);
    let case_number = c.line("case_number", &raw.case_number, CODE, item_required);
    let item_code = c.line("item_code", &raw.item_code, CODE, item_required);
    let item_name = c.line("item_name", &raw.item_name, NAME, false);
    let region_code = c.region("region_code", &raw.region_code);
    let org_credit_code = c.credit_code("org_credit_code", &raw.org_credit_code, true);
    let org_name = c.line("org_name", &raw.org_name, NAME, false);
    let hall_id = c.line("hall_id", &raw.hall_id, CODE, false);
    let window_id = c.line("window_id", &raw.window_id, CODE, false);
    let staff_required = target_kind == Some(TargetKind::Staff);
    let staff_id = c.line("staff_id", &raw.staff_id, CODE, staff_required);
    let staff_name = c.line("staff_name", &raw.staff_name, PERSON_NAME, false);
    let visit_id = c.line("visit_id", &raw.visit_id, CODE, false);

    if raw.detail_codes.len() > DETAIL_CODES {
        c.fail(
            "detail_codes",
            format!("has more than {DETAIL_CODES} codes"),
        );
    }
    let detail_codes: Vec<String> = raw
        .detail_codes
        .iter()
        .enumerate()
        .map(|(i, d)| c.line(&format!("detail_codes[{i}]"), d, DETAIL_CODE, true))
        .collect();

    if raw.indicator_answers.len() > INDICATORS {
        c.fail(
            "indicator_answers",
            format!("has more than {INDICATORS} answers"),
        );
    }
    let indicator_answers = raw
        .indicator_answers
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let p = format!("indicator_answers[{i}]");
            let level: Level = c
                .enum_value(&format!("{p}.level"), a.level, false)
                .unwrap_or_default();
            pb::IndicatorAnswer {
                code: c.line(&format!("{p}.code"), &a.code, INDICATOR_CODE, true),
                name: c.line(&format!("{p}.name"), &a.name, PERSON_NAME, false),
                level: level as i32,
                text: c.text(&format!("{p}.text"), &a.text, INDICATOR_TEXT),
            }
        })
        .collect();

    let text = c.text("text", &raw.text, TEXT);
    let rater = raw.rater.as_ref().map(|r| c.rater("rater", r));

    let rated_at = c.time("rated_at", raw.rated_at.as_ref(), true);
    let completed_at = c.time(
        "service_completed_at",
        raw.service_completed_at.as_ref(),
        false,
    );

    let follow_up_of = c.line("follow_up_of", &raw.follow_up_of, SOURCE_KEY, false);
    if !follow_up_of.is_empty() && follow_up_of == source_key {
        c.fail("follow_up_of", "cannot name the rating itself");
    }
    let batch_id = c.line("batch_id", &raw.batch_id, CODE, false);
    let theme_id = c.line("theme_id", &raw.theme_id, CODE, false);
    let device_id = c.line("device_id", &raw.device_id, CODE, false);
    let attributes = c.attributes("attributes", &raw.attributes);
    let sub_matter = c.line("sub_matter", &raw.sub_matter, NAME, false);
    let task_handle_item = c.line("task_handle_item", &raw.task_handle_item, CODE, false);
    let service_number = c.line("service_number", &raw.service_number, CODE, false);
    c.time("accepted_at", raw.accepted_at.as_ref(), false);
    let service_status: pb::ServiceStatus = c
        .enum_value("service_status", raw.service_status, false)
        .unwrap_or_default();
    let handling_department = c.line("handling_department", &raw.handling_department, NAME, false);
    let agent = c.agent("agent", raw.agent.as_ref());
    let commitment: pb::Commitment = c
        .enum_value("commitment", raw.commitment, false)
        .unwrap_or_default();

    if let Some(level) = level
        && raw.is_default
        && is_bad(level)
    {
        // A default rating stands in for a rater who did not rate: the profiles' defaults
        // are 满意 or 基本满意. A "default" 差评 would open no case (docs/decisions/0004).
        c.fail(
            "is_default",
            "a default rating is never a 差评; send the rater's 差评 with is_default false",
        );
    }
    if let Some(level) = level
        && rules.require_reason_for_bad
        && is_bad(level)
        && detail_codes.is_empty()
        && text.is_empty()
    {
        c.fail(
            "detail_codes",
            "a 差评 (dissatisfied or very dissatisfied) needs detail_codes or text",
        );
    }

    if !c.violations.is_empty() {
        return Err(c.violations);
    }
    // Every Option below is Some: a None always recorded a violation.
    let (
        Some(channel),
        Some(level),
        Some(target_kind),
        Some(region_code),
        Some(org_credit_code),
        Some(rated_at_micros),
    ) = (
        channel,
        level,
        target_kind,
        region_code,
        org_credit_code,
        rated_at,
    )
    else {
        return Err(vec![Violation {
            field: "rating".into(),
            description: "is incomplete".into(),
        }]);
    };

    let mut quality_flags = Vec::new();
    if let Some(done) = completed_at
        && rated_at_micros < done
    {
        quality_flags.push(QualityFlag::RatedBeforeCompletion);
    }

    let mut body = pb::Rating {
        hub_id: String::new(),
        source_system: String::new(),
        source_key: source_key.clone(),
        channel: channel as i32,
        level: level as i32,
        target_kind: target_kind as i32,
        case_number: case_number.clone(),
        item_code: item_code.clone(),
        item_name,
        region_code: region_code.as_str().to_owned(),
        org_credit_code: org_credit_code.as_str().to_owned(),
        org_name,
        hall_id,
        window_id,
        staff_id: staff_id.clone(),
        staff_name,
        detail_codes,
        indicator_answers,
        text,
        rater,
        rated_at: raw.rated_at,
        service_completed_at: raw.service_completed_at,
        follow_up_of,
        batch_id,
        theme_id,
        is_default: raw.is_default,
        device_id,
        attributes,
        quality_flags: Vec::new(),
        received_at: None,
        feed_sequence: 0,
        origin_source_system,
        origin_source_key,
        visit_id,
        sub_matter,
        task_handle_item,
        service_number,
        accepted_at: raw.accepted_at,
        service_status: service_status as i32,
        handling_department,
        agent,
        commitment: commitment as i32,
    };
    let content_hash: [u8; 32] = Sha256::digest(body.encode_to_vec()).into();
    body.quality_flags = quality_flags.iter().map(|f| *f as i32).collect();

    Ok(ValidRating {
        source_key,
        level,
        channel,
        target_kind,
        org_credit_code,
        region_code,
        item_code,
        staff_id,
        case_number,
        rated_at_micros,
        is_default: raw.is_default,
        quality_flags,
        content_hash,
        body,
        relayed_hub_id,
    })
}
