//! 办件 events (accepted, completed) as reported by sources.

use prost::Message;
use sha2::{Digest, Sha256};

use super::codes::{CreditCode, RegionCode};
use super::rating::{Checker, IngestRules, Violation, limits};
use crate::pb::v1 as pb;
use pb::{CaseEvent, Channel};

/// A case event that passed every rule.
#[derive(Debug, Clone)]
pub struct ValidCase {
    pub case_number: String,
    pub event: CaseEvent,
    pub occurred_at_micros: i64,
    pub item_code: String,
    pub region_code: RegionCode,
    pub org_credit_code: CreditCode,
    pub content_hash: [u8; 32],
    pub body: pb::ServiceCase,
}

pub fn parse_case(
    raw: &pb::ServiceCase,
    now_micros: i64,
    rules: &IngestRules,
) -> Result<ValidCase, Vec<Violation>> {
    use limits::*;
    let mut c = Checker::new(now_micros, rules);
    let case_number = c.line("case_number", &raw.case_number, CODE, true);
    let event: Option<CaseEvent> = c.enum_value("event", raw.event, true);
    let occurred = c.time("occurred_at", raw.occurred_at.as_ref(), true);
    let item_code = c.line("item_code", &raw.item_code, CODE, true);
    let item_name = c.line("item_name", &raw.item_name, NAME, false);
    let region = c.region("region_code", &raw.region_code);
    let org = c.credit_code("org_credit_code", &raw.org_credit_code, true);
    let org_name = c.line("org_name", &raw.org_name, NAME, false);
    let channel: Channel = c
        .enum_value("channel", raw.channel, false)
        .unwrap_or_default();
    let hall_id = c.line("hall_id", &raw.hall_id, CODE, false);
    let window_id = c.line("window_id", &raw.window_id, CODE, false);
    let staff_id = c.line("staff_id", &raw.staff_id, CODE, false);
    let applicant = raw.applicant.as_ref().map(|a| c.rater("applicant", a));
    let batch_id = c.line("batch_id", &raw.batch_id, CODE, false);
    let theme_id = c.line("theme_id", &raw.theme_id, CODE, false);
    let attributes = c.attributes("attributes", &raw.attributes);
    let status: pb::ServiceStatus = c
        .enum_value("status", raw.status, false)
        .unwrap_or_default();
    let project_name = c.line("project_name", &raw.project_name, NAME, false);
    let service_number = c.line("service_number", &raw.service_number, CODE, false);
    let service_name = c.line("service_name", &raw.service_name, NAME, false);
    let promised_limit = c.time_limit("promised_limit", raw.promised_limit.as_ref());
    let legal_limit = c.time_limit("legal_limit", raw.legal_limit.as_ref());
    let commitment: pb::Commitment = c
        .enum_value("commitment", raw.commitment, false)
        .unwrap_or_default();
    let handling_channel: pb::HandlingChannel = c
        .enum_value("handling_channel", raw.handling_channel, false)
        .unwrap_or_default();
    let item_type: pb::ItemType = c
        .enum_value("item_type", raw.item_type, false)
        .unwrap_or_default();
    let staff_name = c.line("staff_name", &raw.staff_name, PERSON_NAME, false);
    let agent = c.agent("agent", raw.agent.as_ref());
    c.time("accepted_at", raw.accepted_at.as_ref(), false);
    let sub_matter = c.line("sub_matter", &raw.sub_matter, NAME, false);
    let task_handle_item = c.line("task_handle_item", &raw.task_handle_item, CODE, false);

    let (Some(event), Some(occurred_at_micros), Some(region_code), Some(org_credit_code)) =
        (event, occurred, region, org)
    else {
        return Err(c.violations);
    };
    if !c.violations.is_empty() {
        return Err(c.violations);
    }
    let body = pb::ServiceCase {
        case_number: case_number.clone(),
        event: event as i32,
        occurred_at: raw.occurred_at,
        item_code: item_code.clone(),
        item_name,
        region_code: region_code.as_str().to_owned(),
        org_credit_code: org_credit_code.as_str().to_owned(),
        org_name,
        channel: channel as i32,
        hall_id,
        window_id,
        staff_id,
        applicant,
        batch_id,
        theme_id,
        attributes,
        status: status as i32,
        project_name,
        service_number,
        service_name,
        promised_limit,
        legal_limit,
        commitment: commitment as i32,
        handling_channel: handling_channel as i32,
        item_type: item_type as i32,
        staff_name,
        agent,
        accepted_at: raw.accepted_at,
        sub_matter,
        task_handle_item,
    };
    let content_hash: [u8; 32] = Sha256::digest(body.encode_to_vec()).into();
    Ok(ValidCase {
        case_number,
        event,
        occurred_at_micros,
        item_code,
        region_code,
        org_credit_code,
        content_hash,
        body,
    })
}

/// A rating of `case`'s item, with every field the case determines (item, organisation,
/// region, hall, window, staff, batch, theme, completion time) filled in; the caller sets the
/// rest (key, channel, level, time, rater).
pub fn rating_for_case(case: &pb::ServiceCase) -> pb::Rating {
    pb::Rating {
        target_kind: pb::TargetKind::Item as i32,
        case_number: case.case_number.clone(),
        item_code: case.item_code.clone(),
        item_name: case.item_name.clone(),
        region_code: case.region_code.clone(),
        org_credit_code: case.org_credit_code.clone(),
        org_name: case.org_name.clone(),
        hall_id: case.hall_id.clone(),
        window_id: case.window_id.clone(),
        staff_id: case.staff_id.clone(),
        batch_id: case.batch_id.clone(),
        theme_id: case.theme_id.clone(),
        service_completed_at: case.occurred_at,
        staff_name: case.staff_name.clone(),
        sub_matter: case.sub_matter.clone(),
        task_handle_item: case.task_handle_item.clone(),
        service_number: case.service_number.clone(),
        accepted_at: case.accepted_at,
        commitment: case.commitment,
        ..Default::default()
    }
}
