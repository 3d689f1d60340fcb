//! Field templates: how one upstream field is made from the canonical record.
//!
//! A record is first turned into its *view*: a JSON object with every canonical field
//! present (enums by their contract names, times as microseconds, lists as arrays), so a
//! profile's paths are checked once at start against the view of an empty record. A
//! template then takes a path, a constant or a concatenation, and applies transforms in
//! order: code tables, remaps, padding, prefixes, substrings, splits, regex replacements,
//! time formats, joins. A value a template cannot express (a code missing from its table, a
//! required field left empty) is an error naming the field: the record is dead-lettered,
//! never sent with a guess.

use std::collections::BTreeMap;

use regex::Regex;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::pb::v1 as pb;
use crate::rules::date::civil_from_days;

/// One transform step, written in a profile as a one-key table: `{ table = "levels" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Transform {
    /// Looks the value up in a code table; a value with no entry is an error.
    Table(String),
    /// Looks the value up in a code table; a value with no entry passes unchanged.
    Remap(String),
    /// Pads on the left to [width, "character"].
    PadLeft((usize, String)),
    /// Pads on the right to [width, "character"].
    PadRight((usize, String)),
    Prefix(String),
    Suffix(String),
    /// Characters [start, end) (end past the value's length is its length).
    Substring((usize, usize)),
    /// Splits on [separator, index] and keeps that part ("" when there is none).
    Split((String, usize)),
    /// Replaces every match of [regex, replacement] ($1 refers to a group).
    Replace((String, String)),
    /// Formats a time (microseconds): "yyyy-MM-dd HH:mm:ss" style patterns in China
    /// Standard Time (yyyy MM dd HH mm ss SSS), "rfc3339", "unix-seconds", "unix-millis".
    Time(String),
    /// Joins a list with the separator.
    Join(String),
    /// Used when the value is empty.
    Default(String),
    /// "upper" or "lower".
    Case(String),
}

/// How a field's value is written into the record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutType {
    /// A JSON string (the default; lists are joined with ",").
    #[default]
    String,
    /// A JSON number (the text must be one).
    Number,
    /// The view's own JSON value (a list stays a list).
    Raw,
}

/// A field template as written: a bare string is a path.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default, rename = "const")]
    pub constant: Option<String>,
    /// Templates whose texts are joined (no separator).
    #[serde(default)]
    pub concat: Option<Vec<toml::Value>>,
    #[serde(default)]
    pub transforms: Vec<Transform>,
    /// An empty result makes the record inexpressible (dead-lettered naming the field).
    #[serde(default)]
    pub required: bool,
    /// An empty result leaves the field out of the record.
    #[serde(default)]
    pub omit_empty: bool,
    #[serde(default, rename = "as")]
    pub out: OutType,
}

/// A checked, ready template.
#[derive(Debug, Clone)]
pub struct Template {
    source: Source,
    steps: Vec<Step>,
    required: bool,
    omit_empty: bool,
    out: OutType,
}

#[derive(Debug, Clone)]
enum Source {
    Path(Vec<String>),
    Const(String),
    Concat(Vec<Template>),
}

#[derive(Debug, Clone)]
enum Step {
    Table(String, bool),
    PadLeft(usize, char),
    PadRight(usize, char),
    Prefix(String),
    Suffix(String),
    Substring(usize, usize),
    Split(String, usize),
    Replace(Regex, String),
    Time(TimeFormat),
    Join(String),
    Default(String),
    Upper(bool),
}

#[derive(Debug, Clone)]
pub enum TimeFormat {
    Pattern(String),
    Rfc3339,
    UnixSeconds,
    UnixMillis,
}

impl TimeFormat {
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "rfc3339" => TimeFormat::Rfc3339,
            "unix-seconds" => TimeFormat::UnixSeconds,
            "unix-millis" => TimeFormat::UnixMillis,
            p if p.contains("yyyy") || p.contains("HH") => TimeFormat::Pattern(p.to_owned()),
            other => {
                return Err(format!(
                    "time format {other:?} is not a pattern (yyyy MM dd HH mm ss SSS), \"rfc3339\", \"unix-seconds\" or \"unix-millis\""
                ));
            }
        })
    }

    /// `micros` since the epoch in this format.
    pub fn format(&self, micros: i64) -> String {
        match self {
            TimeFormat::UnixSeconds => micros.div_euclid(1_000_000).to_string(),
            TimeFormat::UnixMillis => micros.div_euclid(1_000).to_string(),
            TimeFormat::Rfc3339 => {
                let secs = micros.div_euclid(1_000_000);
                let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
                let s = secs.rem_euclid(86_400);
                format!(
                    "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
                    s / 3600,
                    s / 60 % 60,
                    s % 60
                )
            }
            TimeFormat::Pattern(p) => {
                let local = micros.div_euclid(1_000_000) + 8 * 3600;
                let (y, m, d) = civil_from_days(local.div_euclid(86_400));
                let s = local.rem_euclid(86_400);
                let millis = micros.rem_euclid(1_000_000) / 1_000;
                p.replace("yyyy", &format!("{y:04}"))
                    .replace("MM", &format!("{m:02}"))
                    .replace("dd", &format!("{d:02}"))
                    .replace("HH", &format!("{:02}", s / 3600))
                    .replace("mm", &format!("{:02}", s / 60 % 60))
                    .replace("ss", &format!("{:02}", s % 60))
                    .replace("SSS", &format!("{millis:03}"))
            }
        }
    }
}

/// `yyyy-MM-dd HH:mm:ss` in China Standard Time (UTC+8), from seconds.
pub fn format_cst(seconds: i64) -> String {
    TimeFormat::Pattern("yyyy-MM-dd HH:mm:ss".into()).format(seconds.saturating_mul(1_000_000))
}

/// The widest a pad may make a field.
const MAX_WIDTH: usize = 4096;

fn one_char(s: &str, what: &str) -> Result<char, String> {
    let mut chars = s.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) => Ok(c),
        _ => Err(format!(
            "{what} needs a single padding character, not {s:?}"
        )),
    }
}

impl Template {
    /// Checks a template against the view of an empty record (`shape`) and the code tables.
    pub fn build(
        spec: &toml::Value,
        shape: &Value,
        tables: &BTreeMap<String, BTreeMap<String, String>>,
    ) -> Result<Self, String> {
        let spec: FieldSpec = match spec {
            toml::Value::String(path) => FieldSpec {
                path: Some(path.clone()),
                constant: None,
                concat: None,
                transforms: Vec::new(),
                required: false,
                omit_empty: false,
                out: OutType::String,
            },
            other => other.clone().try_into().map_err(|e: toml::de::Error| {
                e.message().trim_end_matches('\n').replace('\n', " ")
            })?,
        };
        let source = match (&spec.path, &spec.constant, &spec.concat) {
            (Some(path), None, None) => {
                let parts: Vec<String> = path.split('.').map(str::to_owned).collect();
                check_path(shape, &parts).map_err(|e| format!("path {path:?}: {e}"))?;
                Source::Path(parts)
            }
            (None, Some(c), None) => Source::Const(c.clone()),
            (None, None, Some(parts)) => {
                if parts.is_empty() {
                    return Err("concat needs at least one part".into());
                }
                Source::Concat(
                    parts
                        .iter()
                        .enumerate()
                        .map(|(i, p)| {
                            Template::build(p, shape, tables)
                                .map_err(|e| format!("concat[{i}]: {e}"))
                        })
                        .collect::<Result<_, _>>()?,
                )
            }
            _ => return Err("needs exactly one of path, const or concat".into()),
        };
        let mut steps = Vec::new();
        for t in &spec.transforms {
            steps.push(match t {
                Transform::Table(name) | Transform::Remap(name) => {
                    if !tables.contains_key(name) {
                        return Err(format!("code table {name:?} is not defined in [tables]"));
                    }
                    Step::Table(name.clone(), matches!(t, Transform::Table(_)))
                }
                Transform::PadLeft((w, _)) | Transform::PadRight((w, _)) if *w > MAX_WIDTH => {
                    return Err(format!("a pad width is at most {MAX_WIDTH}, not {w}"));
                }
                Transform::PadLeft((w, c)) => Step::PadLeft(*w, one_char(c, "pad_left")?),
                Transform::PadRight((w, c)) => Step::PadRight(*w, one_char(c, "pad_right")?),
                Transform::Prefix(p) => Step::Prefix(p.clone()),
                Transform::Suffix(p) => Step::Suffix(p.clone()),
                Transform::Substring((a, b)) => {
                    if a > b {
                        return Err(format!("substring [{a}, {b}] ends before it starts"));
                    }
                    Step::Substring(*a, *b)
                }
                Transform::Split((sep, i)) => {
                    if sep.is_empty() {
                        return Err("split needs a separator".into());
                    }
                    Step::Split(sep.clone(), *i)
                }
                Transform::Replace((re, with)) => Step::Replace(
                    Regex::new(re).map_err(|e| format!("replace: {re:?} is not a regex: {e}"))?,
                    with.clone(),
                ),
                Transform::Time(f) => Step::Time(TimeFormat::parse(f)?),
                Transform::Join(sep) => Step::Join(sep.clone()),
                Transform::Default(d) => Step::Default(d.clone()),
                Transform::Case(c) => match c.as_str() {
                    "upper" => Step::Upper(true),
                    "lower" => Step::Upper(false),
                    other => {
                        return Err(format!(
                            "case must be \"upper\" or \"lower\", not {other:?}"
                        ));
                    }
                },
            });
        }
        let template = Template {
            source,
            steps,
            required: spec.required,
            omit_empty: spec.omit_empty,
            out: spec.out,
        };
        if template.required && template.never_produces_a_value() {
            return Err("is required but its template can only produce an empty value".into());
        }
        Ok(template)
    }

    /// A required field whose template is a constant "" (with nothing that could fill it).
    fn never_produces_a_value(&self) -> bool {
        let fills = self.steps.iter().any(|s| {
            matches!(s, Step::Default(d) | Step::Prefix(d) | Step::Suffix(d) if !d.is_empty())
                || matches!(s, Step::PadLeft(w, _) | Step::PadRight(w, _) if *w > 0)
        });
        match &self.source {
            Source::Const(c) => c.is_empty() && !fills,
            Source::Concat(parts) => parts.iter().all(Template::never_produces_a_value) && !fills,
            Source::Path(_) => false,
        }
    }

    /// The field's JSON value for `view`; `Ok(None)` when it is empty and omitted.
    pub fn eval(
        &self,
        view: &Value,
        tables: &BTreeMap<String, BTreeMap<String, String>>,
    ) -> Result<Option<Value>, String> {
        let mut v = match &self.source {
            Source::Path(parts) => lookup(view, parts).cloned().unwrap_or(Value::Null),
            Source::Const(c) => Value::String(c.clone()),
            Source::Concat(parts) => {
                let mut text = String::new();
                for p in parts {
                    if let Some(v) = p.eval(view, tables)? {
                        text.push_str(&text_of(&v));
                    }
                }
                Value::String(text)
            }
        };
        for step in &self.steps {
            v = match step {
                Step::Table(name, strict) => {
                    let key = text_of(&v);
                    if key.is_empty() {
                        v
                    } else {
                        match tables.get(name).and_then(|t| t.get(&key)) {
                            Some(code) => Value::String(code.clone()),
                            None if *strict => {
                                return Err(format!(
                                    "no code for {key} in table {name:?}; add it to the profile"
                                ));
                            }
                            None => v,
                        }
                    }
                }
                Step::Time(f) => match &v {
                    Value::Number(n) => Value::String(f.format(n.as_i64().unwrap_or(0))),
                    Value::Null => v,
                    other => {
                        return Err(format!("time format applied to a non-time value {other}"));
                    }
                },
                Step::Join(sep) => match &v {
                    Value::Array(items) => {
                        Value::String(items.iter().map(text_of).collect::<Vec<_>>().join(sep))
                    }
                    _ => v,
                },
                step => {
                    let s = text_of(&v);
                    Value::String(match step {
                        Step::PadLeft(w, c) => {
                            let n = s.chars().count();
                            std::iter::repeat_n(*c, w.saturating_sub(n))
                                .chain(s.chars())
                                .collect()
                        }
                        Step::PadRight(w, c) => {
                            let n = s.chars().count();
                            s.chars()
                                .chain(std::iter::repeat_n(*c, w.saturating_sub(n)))
                                .collect()
                        }
                        Step::Prefix(p) if !s.is_empty() => format!("{p}{s}"),
                        Step::Suffix(p) if !s.is_empty() => format!("{s}{p}"),
                        Step::Prefix(_) | Step::Suffix(_) => s,
                        Step::Substring(a, b) => s.chars().skip(*a).take(b - a).collect(),
                        Step::Split(sep, i) => {
                            s.split(sep.as_str()).nth(*i).unwrap_or("").to_owned()
                        }
                        Step::Replace(re, with) => re.replace_all(&s, with.as_str()).into_owned(),
                        Step::Default(d) if s.is_empty() => d.clone(),
                        Step::Default(_) => s,
                        Step::Upper(true) => s.to_uppercase(),
                        Step::Upper(false) => s.to_lowercase(),
                        Step::Table(..) | Step::Time(_) | Step::Join(_) => unreachable!(),
                    })
                }
            };
        }
        let empty = match &v {
            Value::Null => true,
            Value::String(s) => s.is_empty(),
            Value::Array(a) => a.is_empty(),
            _ => false,
        };
        if empty {
            if self.required {
                return Err("is required but empty".into());
            }
            if self.omit_empty {
                return Ok(None);
            }
        }
        Ok(Some(match self.out {
            OutType::Raw => v,
            OutType::String => Value::String(text_of(&v)),
            OutType::Number => {
                let t = text_of(&v);
                if t.is_empty() {
                    Value::Null
                } else {
                    Value::Number(
                        t.parse::<serde_json::Number>()
                            .map_err(|_| format!("{t:?} is not a number"))?,
                    )
                }
            }
        }))
    }
}

/// A value as text: strings as they are, lists joined with ",", null as "".
pub fn text_of(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "1" } else { "0" }.to_owned(),
        Value::Array(items) => items.iter().map(text_of).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn lookup<'a>(view: &'a Value, parts: &[String]) -> Option<&'a Value> {
    let mut v = view;
    for p in parts {
        v = match v {
            Value::Object(m) => m.get(p)?,
            Value::Array(a) => a.get(p.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

/// A path must name a field of the view. Under a map (`attributes`) any key is allowed, and
/// under a list any index.
fn check_path(shape: &Value, parts: &[String]) -> Result<(), String> {
    let mut v = shape;
    for (i, p) in parts.iter().enumerate() {
        match v {
            Value::Object(m) if m.get("*").is_some() => return Ok(()),
            Value::Object(m) => match m.get(p) {
                Some(next) => v = next,
                None => {
                    let known: Vec<&str> = m.keys().map(String::as_str).collect();
                    return Err(format!("no field {p:?} here; known: {}", known.join(", ")));
                }
            },
            Value::Array(items) => {
                if p.parse::<usize>().is_err() {
                    return Err(format!("{p:?} is not a list index"));
                }
                match items.first() {
                    Some(first) => v = first,
                    None => return Ok(()),
                }
            }
            _ => {
                return Err(format!("{} is not an object", parts[..i].join(".")));
            }
        }
    }
    Ok(())
}

fn name_of<E: TryFrom<i32>>(raw: i32, name: impl Fn(E) -> &'static str) -> Value {
    match E::try_from(raw) {
        Ok(e) if raw != 0 => Value::String(name(e).to_owned()),
        _ => Value::String(String::new()),
    }
}

fn micros(ts: &Option<prost_types::Timestamp>) -> Value {
    ts.as_ref()
        .and_then(crate::time::micros_from_timestamp)
        .map_or(Value::Null, Value::from)
}

fn s(v: &str) -> Value {
    Value::String(v.to_owned())
}

/// The map of a `map<string,string>` field; the shape marks it as open ("*").
fn map_view(m: &BTreeMap<String, String>, shape: bool) -> Value {
    if shape {
        return serde_json::json!({ "*": "" });
    }
    Value::Object(m.iter().map(|(k, v)| (k.clone(), s(v))).collect())
}

fn rater_view(r: &pb::Rater) -> Value {
    let mut m = Map::new();
    m.insert(
        "kind".into(),
        name_of(r.kind, |k: pb::RaterKind| k.as_str_name()),
    );
    m.insert("real_name".into(), Value::Bool(r.real_name));
    m.insert("name".into(), s(&r.name));
    m.insert("id_number".into(), s(&r.id_number));
    // 证件类型: with a number and no type, a 居民身份证 (the contract's rule).
    let id_type = if r.id_type == 0 && !r.id_number.is_empty() {
        s(pb::IdDocumentType::ResidentIdCard.as_str_name())
    } else {
        name_of(r.id_type, |k: pb::IdDocumentType| k.as_str_name())
    };
    m.insert("id_type".into(), id_type);
    m.insert("credit_code".into(), s(&r.credit_code));
    m.insert("phone".into(), s(&r.phone));
    // The document an upstream's `certKey` wants: the ID number, or an organisation's code.
    m.insert(
        "cert_key".into(),
        s(if r.id_number.is_empty() {
            &r.credit_code
        } else {
            &r.id_number
        }),
    );
    Value::Object(m)
}

/// The canonical view of a rating (with `shape`, the view of an empty one, open maps marked).
pub fn rating_view(r: &pb::Rating, shape: bool) -> Value {
    let mut m = Map::new();
    m.insert("hub_id".into(), s(&r.hub_id));
    m.insert("source_system".into(), s(&r.source_system));
    m.insert("source_key".into(), s(&r.source_key));
    m.insert(
        "channel".into(),
        name_of(r.channel, |c: pb::Channel| c.as_str_name()),
    );
    m.insert(
        "level".into(),
        name_of(r.level, |l: pb::Level| l.as_str_name()),
    );
    m.insert(
        "target_kind".into(),
        name_of(r.target_kind, |t: pb::TargetKind| t.as_str_name()),
    );
    for (k, v) in [
        ("case_number", &r.case_number),
        ("item_code", &r.item_code),
        ("item_name", &r.item_name),
        ("region_code", &r.region_code),
        ("org_credit_code", &r.org_credit_code),
        ("org_name", &r.org_name),
        ("hall_id", &r.hall_id),
        ("window_id", &r.window_id),
        ("staff_id", &r.staff_id),
        ("staff_name", &r.staff_name),
        ("text", &r.text),
        ("follow_up_of", &r.follow_up_of),
        ("batch_id", &r.batch_id),
        ("theme_id", &r.theme_id),
        ("visit_id", &r.visit_id),
        ("device_id", &r.device_id),
        ("origin_source_system", &r.origin_source_system),
        ("origin_source_key", &r.origin_source_key),
        ("sub_matter", &r.sub_matter),
        ("task_handle_item", &r.task_handle_item),
        ("service_number", &r.service_number),
        ("handling_department", &r.handling_department),
    ] {
        m.insert(k.into(), s(v));
    }
    m.insert("accepted_at".into(), micros(&r.accepted_at));
    m.insert(
        "service_status".into(),
        name_of(r.service_status, |e: pb::ServiceStatus| e.as_str_name()),
    );
    m.insert(
        "commitment".into(),
        name_of(r.commitment, |e: pb::Commitment| e.as_str_name()),
    );
    m.insert(
        "agent".into(),
        rater_view(&r.agent.clone().unwrap_or_default()),
    );
    m.insert(
        "detail_codes".into(),
        Value::Array(r.detail_codes.iter().map(|c| s(c)).collect()),
    );
    let answers: Vec<Value> = if shape {
        vec![serde_json::json!({"code": "", "name": "", "level": "", "text": ""})]
    } else {
        r.indicator_answers
            .iter()
            .map(|a| {
                serde_json::json!({
                    "code": a.code,
                    "name": a.name,
                    "level": name_of(a.level, |l: pb::Level| l.as_str_name()),
                    "text": a.text,
                })
            })
            .collect()
    };
    m.insert("indicator_answers".into(), Value::Array(answers));
    m.insert(
        "rater".into(),
        rater_view(&r.rater.clone().unwrap_or_default()),
    );
    m.insert("rated_at".into(), micros(&r.rated_at));
    m.insert(
        "service_completed_at".into(),
        micros(&r.service_completed_at),
    );
    m.insert("received_at".into(), micros(&r.received_at));
    m.insert("feed_sequence".into(), Value::from(r.feed_sequence));
    m.insert("is_default".into(), Value::Bool(r.is_default));
    // The national `assessNumber`: 1 a first rating, 2 a follow-up.
    m.insert(
        "assess_number".into(),
        s(if r.follow_up_of.is_empty() { "1" } else { "2" }),
    );
    m.insert(
        "quality_flags".into(),
        Value::Array(
            r.quality_flags
                .iter()
                .map(|f| name_of(*f, |q: pb::QualityFlag| q.as_str_name()))
                .collect(),
        ),
    );
    m.insert("attributes".into(), map_view(&r.attributes, shape));
    Value::Object(m)
}

/// The view of a rating update: the rating's view, and `update` (why it left the scores:
/// `reason` APPEAL_OUTCOME_INVALID, APPEAL_OUTCOME_MALICIOUS or SUPERSEDED_DEFAULT; when,
/// as microseconds; and the update's sequence).
pub fn update_view(
    rating: &pb::Rating,
    reason: i32,
    at_micros: i64,
    seq: u64,
    shape: bool,
) -> Value {
    let mut v = rating_view(rating, shape);
    let reason = if reason == crate::store::SUPERSEDED_DEFAULT {
        "SUPERSEDED_DEFAULT".to_owned()
    } else {
        pb::AppealOutcome::try_from(reason)
            .map(|o| o.as_str_name().to_owned())
            .unwrap_or_else(|_| reason.to_string())
    };
    v["update"] = serde_json::json!({
        "reason": reason,
        "decided_at": if shape { Value::Null } else { Value::from(at_micros) },
        "seq": seq,
    });
    v
}

/// The canonical view of a 办件 event (`source_system` and `event_id` are the hub's: who
/// reported it, and its position among the hub's case events).
pub fn case_view(c: &pb::ServiceCase, source_system: &str, event_id: u64, shape: bool) -> Value {
    let mut m = Map::new();
    m.insert("source_system".into(), s(source_system));
    m.insert("event_id".into(), Value::from(event_id));
    m.insert(
        "event".into(),
        name_of(c.event, |e: pb::CaseEvent| e.as_str_name()),
    );
    m.insert(
        "channel".into(),
        name_of(c.channel, |e: pb::Channel| e.as_str_name()),
    );
    for (k, v) in [
        ("case_number", &c.case_number),
        ("item_code", &c.item_code),
        ("item_name", &c.item_name),
        ("region_code", &c.region_code),
        ("org_credit_code", &c.org_credit_code),
        ("org_name", &c.org_name),
        ("hall_id", &c.hall_id),
        ("window_id", &c.window_id),
        ("staff_id", &c.staff_id),
        ("batch_id", &c.batch_id),
        ("theme_id", &c.theme_id),
        ("project_name", &c.project_name),
        ("service_number", &c.service_number),
        ("service_name", &c.service_name),
        ("staff_name", &c.staff_name),
        ("sub_matter", &c.sub_matter),
        ("task_handle_item", &c.task_handle_item),
    ] {
        m.insert(k.into(), s(v));
    }
    m.insert("occurred_at".into(), micros(&c.occurred_at));
    // 受理时间: given, or the acceptance event's own time.
    let accepted = match (&c.accepted_at, pb::CaseEvent::try_from(c.event)) {
        (Some(_), _) => micros(&c.accepted_at),
        (None, Ok(pb::CaseEvent::Accepted)) => micros(&c.occurred_at),
        _ => Value::Null,
    };
    m.insert("accepted_at".into(), accepted);
    // 办结时间: a completion event's time.
    m.insert(
        "completed_at".into(),
        match pb::CaseEvent::try_from(c.event) {
            Ok(pb::CaseEvent::Completed) => micros(&c.occurred_at),
            _ => Value::Null,
        },
    );
    // 办件状态: given, or what the event says.
    let status = match (
        pb::ServiceStatus::try_from(c.status),
        pb::CaseEvent::try_from(c.event),
    ) {
        (Ok(st), _) if st != pb::ServiceStatus::Unspecified => st,
        (_, Ok(pb::CaseEvent::Accepted)) => pb::ServiceStatus::Accepted,
        (_, Ok(pb::CaseEvent::Completed)) => pb::ServiceStatus::Completed,
        _ => pb::ServiceStatus::Unspecified,
    };
    m.insert(
        "status".into(),
        name_of(status as i32, |e: pb::ServiceStatus| e.as_str_name()),
    );
    for (k, limit) in [
        ("promised_limit", &c.promised_limit),
        ("legal_limit", &c.legal_limit),
    ] {
        let l = (*limit).unwrap_or_default();
        m.insert(
            k.into(),
            serde_json::json!({
                "value": if limit.is_some() { Value::from(l.value) } else { Value::Null },
                "unit": name_of(l.unit, |u: pb::TimeUnit| u.as_str_name()),
            }),
        );
    }
    m.insert(
        "commitment".into(),
        name_of(c.commitment, |e: pb::Commitment| e.as_str_name()),
    );
    m.insert(
        "handling_channel".into(),
        name_of(c.handling_channel, |e: pb::HandlingChannel| e.as_str_name()),
    );
    m.insert(
        "item_type".into(),
        name_of(c.item_type, |e: pb::ItemType| e.as_str_name()),
    );
    m.insert(
        "agent".into(),
        rater_view(&c.agent.clone().unwrap_or_default()),
    );
    m.insert(
        "applicant".into(),
        rater_view(&c.applicant.clone().unwrap_or_default()),
    );
    m.insert("attributes".into(), map_view(&c.attributes, shape));
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables() -> BTreeMap<String, BTreeMap<String, String>> {
        let mut t = BTreeMap::new();
        t.insert(
            "levels".to_owned(),
            [("LEVEL_VERY_SATISFIED".to_owned(), "5".to_owned())].into(),
        );
        t.insert(
            "regions".to_owned(),
            [("530102".to_owned(), "530100".to_owned())].into(),
        );
        t
    }

    fn build(spec: &str) -> Result<Template, String> {
        let v: toml::Value = toml::from_str::<toml::Table>(&format!("f = {spec}"))
            .unwrap()
            .remove("f")
            .unwrap();
        Template::build(&v, &rating_view(&pb::Rating::default(), true), &tables())
    }

    fn eval(spec: &str, r: &pb::Rating) -> Result<Option<Value>, String> {
        build(spec)?.eval(&rating_view(r, false), &tables())
    }

    #[test]
    fn transforms_shape_values_as_the_platforms_want() {
        let mut r = pb::Rating {
            item_code: "1153010000000000000000000000001AB".into(),
            region_code: "530102".into(),
            case_number: "C1".into(),
            level: pb::Level::VerySatisfied as i32,
            detail_codes: vec!["501".into(), "502".into()],
            rated_at: Some(prost_types::Timestamp {
                seconds: 1_772_379_000,
                nanos: 0,
            }),
            ..Default::default()
        };
        r.attributes.insert("dataSource".into(), "101".into());
        let text = |spec: &str| text_of(&eval(spec, &r).unwrap().unwrap());
        // The 33-character task code: 31 characters and the handle item.
        assert_eq!(
            text("{ path = \"item_code\", transforms = [{ substring = [0, 31] }] }").len(),
            31
        );
        assert_eq!(
            text("{ path = \"item_code\", transforms = [{ substring = [31, 33] }] }"),
            "AB"
        );
        assert_eq!(
            text(
                "{ path = \"region_code\", transforms = [{ remap = \"regions\" }, { pad_right = [12, \"0\"] }] }"
            ),
            "530100000000"
        );
        assert_eq!(
            text("{ path = \"case_number\", transforms = [{ prefix = \"53\" }] }"),
            "53C1"
        );
        assert_eq!(
            text("{ path = \"level\", transforms = [{ table = \"levels\" }] }"),
            "5"
        );
        assert_eq!(
            text("{ path = \"rated_at\", transforms = [{ time = \"yyyy-MM-dd HH:mm:ss\" }] }"),
            "2026-03-01 23:30:00"
        );
        assert_eq!(
            text("{ path = \"detail_codes\", transforms = [{ join = \"|\" }] }"),
            "501|502"
        );
        assert_eq!(text("\"attributes.dataSource\""), "101");
        assert_eq!(
            text("{ concat = [\"region_code\", { const = \"-\" }, \"case_number\"] }"),
            "530102-C1"
        );
        assert_eq!(
            text("{ path = \"case_number\", transforms = [{ replace = [\"^C\", \"CASE-\"] }] }"),
            "CASE-1"
        );
        assert_eq!(
            eval("{ path = \"feed_sequence\", as = \"number\" }", &r).unwrap(),
            Some(Value::from(0))
        );
        assert_eq!(
            eval("{ path = \"staff_id\", omit_empty = true }", &r).unwrap(),
            None
        );
        // A level with no code is never sent as a guess.
        r.level = pb::Level::Dissatisfied as i32;
        let e = eval(
            "{ path = \"level\", transforms = [{ table = \"levels\" }] }",
            &r,
        )
        .unwrap_err();
        assert!(e.contains("LEVEL_DISSATISFIED"), "{e}");
        assert!(eval("{ path = \"staff_id\", required = true }", &r).is_err());
    }

    #[test]
    fn bad_templates_are_refused_at_start_saying_why() {
        for (spec, says) in [
            ("\"rater.nam\"", "no field \"nam\""),
            (
                "{ path = \"level\", transforms = [{ tabel = \"levels\" }] }",
                "tabel",
            ),
            (
                "{ path = \"level\", transforms = [{ table = \"nope\" }] }",
                "not defined",
            ),
            (
                "{ const = \"\", required = true }",
                "can only produce an empty value",
            ),
            ("{ path = \"a\", const = \"b\" }", "exactly one"),
            (
                "{ path = \"case_number\", transforms = [{ replace = [\"(\", \"\"] }] }",
                "not a regex",
            ),
            (
                "{ path = \"rated_at\", transforms = [{ time = \"dd/mm\" }] }",
                "not a pattern",
            ),
        ] {
            let e = build(spec).unwrap_err();
            assert!(e.contains(says), "{spec}: {e}");
        }
        assert!(build("\"attributes.anything\"").is_ok());
        assert!(build("\"indicator_answers.0.level\"").is_ok());
    }
}
