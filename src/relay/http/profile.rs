//! An upstream's protocol as data: the profile file (record kinds, their fields, envelopes
//! and replies, code tables, computed values), checked whole at start; and the older inline
//! `[upstreams.<name>.http]` mapping, which is read as a profile of the same engine.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::crypto::{Key, Keyring, load_secret};
use super::envelope::{ComputedSpec, Envelope};
use super::reply::{Condition, Judge, ReplySpec};
use super::template::{Template, rating_view};
use crate::pb::v1 as pb;

/// A profile file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileFile {
    /// What the profile speaks, for messages.
    #[serde(default)]
    pub name: String,
    /// Code tables: table → (contract name or canonical value → upstream code).
    #[serde(default)]
    pub tables: BTreeMap<String, BTreeMap<String, String>>,
    /// Values computed for each request, in order (times, keys, ciphertexts, signatures).
    #[serde(default)]
    pub computed: Vec<ComputedSpec>,
    /// Record kinds: "rating" (required), "case" (办件 records, each before its ratings) and
    /// "rating_update" (appeal outcomes, each after its rating).
    pub records: BTreeMap<String, RecordSpec>,
}

/// One record kind: where it goes and how it is written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordSpec {
    /// Appended to the upstream's endpoint ("" sends to the endpoint itself).
    #[serde(default)]
    pub path: String,
    /// One record per request: `"{records}"` in the body is then the record itself.
    #[serde(default)]
    pub single: bool,
    /// Only records whose view matches all of these are sent (e.g. only 办结 events: a
    /// platform that keys its service records by case number would answer a second event
    /// of the same case "already exists"). The others are passed over, not dead-lettered.
    #[serde(default)]
    pub send_if: Vec<ViewCondition>,
    /// The body: JSON whose string values may name values (`"{records}"`, `"{sign}"`).
    #[serde(default = "d_body")]
    pub body: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Upstream field → template (a path, or a table with path/const/concat and transforms).
    pub fields: toml::Table,
    pub reply: ReplySpec,
}

fn d_body() -> String {
    "\"{records}\"".into()
}

/// `{ path = "event", equals = ["CASE_EVENT_COMPLETED"] }`: the view's value at `path`, as
/// text, is one of `equals`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewCondition {
    pub path: String,
    pub equals: Vec<String>,
}

impl ViewCondition {
    pub fn holds(&self, view: &Value) -> bool {
        let mut v = view;
        for p in self.path.split('.') {
            match v.get(p) {
                Some(next) => v = next,
                None => return false,
            }
        }
        self.equals.contains(&super::template::text_of(v))
    }
}

/// A checked record kind.
#[derive(Debug, Clone)]
pub struct RecordKind {
    pub path: String,
    pub single: bool,
    pub send_if: Vec<ViewCondition>,
    pub fields: Vec<(String, Template)>,
    pub envelope: Envelope,
    pub reply: ReplySpec,
}

/// A checked profile.
#[derive(Debug, Clone)]
pub struct Profile {
    pub tables: BTreeMap<String, BTreeMap<String, String>>,
    pub rating: RecordKind,
    pub case: Option<RecordKind>,
    pub update: Option<RecordKind>,
}

/// The view of an empty record of a kind: what paths a template may name.
fn shape(kind: &str) -> Option<Value> {
    match kind {
        "rating" => Some(rating_view(&pb::Rating::default(), true)),
        "rating_update" => Some(super::template::update_view(
            &pb::Rating::default(),
            0,
            0,
            0,
            true,
        )),
        "case" => Some(super::template::case_view(
            &pb::ServiceCase::default(),
            "",
            0,
            true,
        )),
        _ => None,
    }
}

impl Profile {
    /// Checks a profile whole; every error names where (record kind, field) and why.
    pub fn build(
        file: &ProfileFile,
        table_overrides: &BTreeMap<String, BTreeMap<String, String>>,
        keys: &Keyring,
    ) -> Result<Self, String> {
        let mut tables = file.tables.clone();
        for (name, entries) in table_overrides {
            tables
                .entry(name.clone())
                .or_default()
                .extend(entries.clone());
        }
        let mut kinds = BTreeMap::new();
        for (kind, spec) in &file.records {
            let shape = shape(kind).ok_or_else(|| {
                format!(
                    "records.{kind}: unknown record kind (\"rating\", \"case\" or \"rating_update\")"
                )
            })?;
            let mut fields = Vec::new();
            for (field, t) in &spec.fields {
                let template = Template::build(t, &shape, &tables)
                    .map_err(|e| format!("records.{kind}.fields.{field}: {e}"))?;
                fields.push((field.clone(), template));
            }
            for c in &spec.send_if {
                let probe = toml::Value::String(c.path.clone());
                Template::build(&probe, &shape, &tables)
                    .map_err(|e| format!("records.{kind}.send_if: {e}"))?;
            }
            let envelope = Envelope::build(&file.computed, &spec.body, &spec.headers, keys)
                .map_err(|e| format!("records.{kind}: {e}"))?;
            spec.reply
                .check()
                .map_err(|e| format!("records.{kind}.{e}"))?;
            if !spec.path.is_empty() && !spec.path.starts_with('/') {
                return Err(format!("records.{kind}.path: must start with /"));
            }
            kinds.insert(
                kind.clone(),
                RecordKind {
                    path: spec.path.clone(),
                    single: spec.single,
                    send_if: spec.send_if.clone(),
                    fields,
                    envelope,
                    reply: spec.reply.clone(),
                },
            );
        }
        let rating = kinds
            .remove("rating")
            .ok_or("records.rating: a profile must say how ratings are sent")?;
        Ok(Self {
            tables,
            case: kinds.remove("case"),
            update: kinds.remove("rating_update"),
            rating,
        })
    }
}

/// Reads and checks an upstream's secrets and keys.
pub fn load_keyring(
    secrets: &BTreeMap<String, String>,
    keys: &BTreeMap<String, String>,
) -> Result<Keyring, String> {
    let mut ring = Keyring::default();
    for (name, reference) in secrets {
        ring.secrets
            .insert(name.clone(), load_secret(name, reference)?);
    }
    for (name, path) in keys {
        ring.keys.insert(name.clone(), Key::load(name, path)?);
    }
    Ok(ring)
}

/// `[upstreams.<name>.http]`: the older inline mapping (flat records, static headers, one
/// code field). Read as a profile of the same engine.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpJsonConfig {
    /// The request body: "array" (`[{…}, …]`) or "wrapped" (`{"<wrapper_key>": [{…}, …]}`).
    #[serde(default = "d_array")]
    pub body: String,
    #[serde(default = "d_wrapper")]
    pub wrapper_key: String,
    /// Upstream field → canonical field. Replaces the default (national) mapping when set.
    /// Canonical fields: hub_id, source_key, case_number, item_code, item_name, org_credit_code,
    /// org_name, region_code, hall_id, window_id, staff_id, staff_name, visit_id, batch_id,
    /// theme_id, channel, level, detail_codes (comma-joined), text, rated_at,
    /// service_completed_at, assess_number (1 first, 2 follow-up), is_default (1/0),
    /// rater.kind, rater.name, rater.id_number (or the organisation's code), rater.id_type,
    /// rater.credit_code, rater.phone, attributes.<key>.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// Fixed values added to every record, e.g. dataSource = "101".
    #[serde(default)]
    pub constants: BTreeMap<String, String>,
    /// LEVEL_* name → upstream code. Entries override the national defaults.
    #[serde(default)]
    pub level_codes: BTreeMap<String, String>,
    /// CHANNEL_* name → upstream code (`pf`). Entries override the national defaults.
    #[serde(default)]
    pub channel_codes: BTreeMap<String, String>,
    /// RATER_KIND_* name → upstream code (`userProp`). Entries override the defaults.
    #[serde(default)]
    pub rater_kind_codes: BTreeMap<String, String>,
    /// "yyyy-MM-dd HH:mm:ss" (UTC+8, default), "rfc3339" or "unix-millis".
    #[serde(default = "d_time_format")]
    pub time_format: String,
    /// JSON field of the answer holding the result code, and the codes meaning success.
    #[serde(default = "d_code_field")]
    pub code_field: String,
    #[serde(default = "d_success")]
    pub success_codes: Vec<String>,
    /// JSON field of the answer holding the message.
    #[serde(default = "d_message_field")]
    pub message_field: String,
    /// Optional JSON field of the answer with one {code, msg} per record, in order.
    #[serde(default)]
    pub results_field: String,
    /// A message containing one of these means the record already exists: success.
    #[serde(default = "d_exists")]
    pub already_exists_markers: Vec<String>,
    /// Extra request headers (e.g. an API key the platform issued).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn d_array() -> String {
    "array".into()
}
fn d_wrapper() -> String {
    "data".into()
}
fn d_time_format() -> String {
    "yyyy-MM-dd HH:mm:ss".into()
}
fn d_code_field() -> String {
    "code".into()
}
fn d_success() -> Vec<String> {
    vec!["0".into(), "200".into()]
}
fn d_message_field() -> String {
    "msg".into()
}
fn d_exists() -> Vec<String> {
    vec!["已存在该条服务信息".into(), "已存在".into()]
}

fn table(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// The national-style field mapping of the inline form.
pub fn national_fields() -> BTreeMap<String, String> {
    table(&[
        ("hubId", "hub_id"),
        ("projectNo", "case_number"),
        ("taskCode", "item_code"),
        ("taskName", "item_name"),
        ("deptCode", "org_credit_code"),
        ("deptName", "org_name"),
        ("areaCode", "region_code"),
        ("pf", "channel"),
        ("satisfaction", "level"),
        ("evalDetail", "detail_codes"),
        ("writingEvaluation", "text"),
        ("assessTime", "rated_at"),
        ("assessNumber", "assess_number"),
        ("userName", "rater.name"),
        ("userProp", "rater.kind"),
        ("certKey", "rater.id_number"),
        ("mobile", "rater.phone"),
    ])
}

/// `satisfaction`: 1 非常不满意 … 5 非常满意.
pub fn national_levels() -> BTreeMap<String, String> {
    table(&[
        ("LEVEL_VERY_DISSATISFIED", "1"),
        ("LEVEL_DISSATISFIED", "2"),
        ("LEVEL_BASICALLY_SATISFIED", "3"),
        ("LEVEL_SATISFIED", "4"),
        ("LEVEL_VERY_SATISFIED", "5"),
    ])
}

/// `pf`: 1 PC, 2 移动端, 3 二维码, 4 政务大厅平板电脑, 5 大厅其他终端/自助终端, 6 电话, 7 短信.
/// Paper forms and system defaults have no national code: configure them per upstream.
pub fn national_channels() -> BTreeMap<String, String> {
    table(&[
        ("CHANNEL_PC_WEB", "1"),
        ("CHANNEL_MOBILE_APP", "2"),
        ("CHANNEL_MINI_PROGRAM", "2"),
        ("CHANNEL_QR_CODE", "3"),
        ("CHANNEL_HALL_DEVICE", "4"),
        ("CHANNEL_SELF_SERVICE_TERMINAL", "5"),
        ("CHANNEL_HOTLINE_VOICE", "6"),
        ("CHANNEL_SMS", "7"),
    ])
}

/// `userProp` of the older two-valued interface: 1 个人, 2 法人.
pub fn national_rater_kinds() -> BTreeMap<String, String> {
    table(&[
        ("RATER_KIND_NATURAL_PERSON", "1"),
        ("RATER_KIND_ENTERPRISE_LEGAL_PERSON", "2"),
        ("RATER_KIND_PUBLIC_INSTITUTION_LEGAL_PERSON", "2"),
        ("RATER_KIND_SOCIAL_ORGANIZATION_LEGAL_PERSON", "2"),
        ("RATER_KIND_ADMINISTRATIVE_ORGAN", "2"),
        ("RATER_KIND_OTHER_ORGANIZATION", "2"),
        ("RATER_KIND_LEGAL_PERSON", "2"),
        ("RATER_KIND_UNINCORPORATED_ENTERPRISE", "2"),
    ])
}

/// RFC 6901: a JSON field name as a pointer.
fn pointer(field: &str) -> String {
    format!("/{}", field.replace('~', "~0").replace('/', "~1"))
}

/// `{` and `}` are placeholders in envelope texts: a literal header value escapes them.
fn literal(s: &str) -> String {
    s.replace('{', "{{").replace('}', "}}")
}

impl HttpJsonConfig {
    /// The same mapping as a profile.
    pub fn to_profile(&self) -> Result<ProfileFile, String> {
        if !matches!(self.body.as_str(), "array" | "wrapped") {
            return Err("http.body must be \"array\" or \"wrapped\"".into());
        }
        if !matches!(
            self.time_format.as_str(),
            "yyyy-MM-dd HH:mm:ss" | "rfc3339" | "unix-millis"
        ) {
            return Err(
                "http.time_format must be \"yyyy-MM-dd HH:mm:ss\", \"rfc3339\" or \"unix-millis\""
                    .into(),
            );
        }
        let mut tables = BTreeMap::new();
        let merged = |mut base: BTreeMap<String, String>, over: &BTreeMap<String, String>| {
            base.extend(over.clone());
            base
        };
        tables.insert(
            "levels".into(),
            merged(national_levels(), &self.level_codes),
        );
        tables.insert(
            "channels".into(),
            merged(national_channels(), &self.channel_codes),
        );
        tables.insert(
            "rater_kinds".into(),
            merged(national_rater_kinds(), &self.rater_kind_codes),
        );
        let fields_in = if self.fields.is_empty() {
            national_fields()
        } else {
            self.fields.clone()
        };
        let mut fields = toml::Table::new();
        for (target, source) in &fields_in {
            let mut t = toml::Table::new();
            let path = match source.as_str() {
                "rater.id_number" => "rater.cert_key",
                other => other,
            };
            t.insert("path".into(), path.into());
            let transform = |k: &str, v: &str| {
                let mut m = toml::Table::new();
                m.insert(k.into(), v.into());
                toml::Value::Table(m)
            };
            let transforms = match source.as_str() {
                "level" => vec![transform("table", "levels")],
                "channel" => vec![transform("table", "channels")],
                "rater.kind" => vec![transform("table", "rater_kinds")],
                "rated_at" | "service_completed_at" => vec![transform("time", &self.time_format)],
                _ => Vec::new(),
            };
            if source == "rater.kind" || source.starts_with("attributes.") {
                // Left out of the record (JSON null) when there is none, as before.
                t.insert("as".into(), "raw".into());
            }
            t.insert("transforms".into(), toml::Value::Array(transforms));
            fields.insert(target.clone(), toml::Value::Table(t));
        }
        for (k, v) in &self.constants {
            let mut t = toml::Table::new();
            t.insert("const".into(), v.as_str().into());
            fields.insert(k.clone(), toml::Value::Table(t));
        }
        let judge = Judge {
            success: vec![Condition {
                pointer: pointer(&self.code_field),
                equals: self.success_codes.clone(),
            }],
            code: Some(pointer(&self.code_field)),
            message: Some(pointer(&self.message_field)),
        };
        let reply = ReplySpec {
            judge: judge.clone(),
            retry_when: Vec::new(),
            refuse_when: Vec::new(),
            already_exists: self.already_exists_markers.clone(),
            results: (!self.results_field.is_empty()).then(|| pointer(&self.results_field)),
            per_record: (!self.results_field.is_empty()).then_some(judge),
        };
        let body = match self.body.as_str() {
            "wrapped" => serde_json::json!({ self.wrapper_key.clone(): "{records}" }).to_string(),
            _ => d_body(),
        };
        let mut records = BTreeMap::new();
        records.insert(
            "rating".to_owned(),
            RecordSpec {
                path: String::new(),
                single: false,
                send_if: Vec::new(),
                body,
                headers: self
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), literal(v)))
                    .collect(),
                fields,
                reply,
            },
        );
        Ok(ProfileFile {
            name: "inline http mapping".into(),
            tables,
            computed: Vec::new(),
            records,
        })
    }
}
