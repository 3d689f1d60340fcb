//! Reading an upstream's answer: conditions on JSON pointers (RFC 6901) say whether the
//! request succeeded, should be retried, or was refused; an optional per-record result list
//! says what became of each record; messages containing an "already exists" marker are
//! success (upstreams are idempotent upserts by record id). An answer the profile cannot
//! read is never taken for a success.

use serde::Deserialize;
use serde_json::Value;

use super::template::text_of;
use crate::relay::sink::{Delivery, SendError};

/// `{ pointer = "/status/code", equals = ["200"] }`: the value at the pointer, as text
/// (numbers as written), is one of `equals`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    pub pointer: String,
    pub equals: Vec<String>,
}

impl Condition {
    fn holds(&self, v: &Value) -> bool {
        v.pointer(&self.pointer)
            .is_some_and(|x| self.equals.contains(&text_of(x)))
    }
}

/// How to judge one answer, or one per-record result in it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Judge {
    /// All must hold for success.
    #[serde(default)]
    pub success: Vec<Condition>,
    /// Pointers to the code and message shown in dead letters and attempt logs.
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

/// `[reply]` of a record kind.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplySpec {
    #[serde(flatten)]
    pub judge: Judge,
    /// Any that holds makes the whole request one to retry (the platform is busy).
    #[serde(default)]
    pub retry_when: Vec<Condition>,
    /// A message containing one of these means the record already exists: success.
    #[serde(default)]
    pub already_exists: Vec<String>,
    /// A pointer to a list with one result per record, in order.
    #[serde(default)]
    pub results: Option<String>,
    /// How to judge each of those results.
    #[serde(default)]
    pub per_record: Option<Judge>,
}

fn check_pointer(p: &str, what: &str) -> Result<(), String> {
    if p.is_empty() || p.starts_with('/') {
        Ok(())
    } else {
        Err(format!(
            "{what}: {p:?} is not a JSON pointer (write \"/a/b\" as in RFC 6901)"
        ))
    }
}

impl Judge {
    fn check(&self, what: &str) -> Result<(), String> {
        for c in &self.success {
            check_pointer(&c.pointer, what)?;
        }
        if let Some(p) = &self.code {
            check_pointer(p, what)?;
        }
        if let Some(p) = &self.message {
            check_pointer(p, what)?;
        }
        Ok(())
    }

    fn ok(&self, v: &Value) -> bool {
        self.success.iter().all(|c| c.holds(v))
    }

    fn said(&self, v: &Value) -> (String, String) {
        let at = |p: &Option<String>| {
            p.as_deref()
                .and_then(|p| v.pointer(p))
                .map(text_of)
                .unwrap_or_default()
        };
        (at(&self.code), at(&self.message))
    }
}

impl ReplySpec {
    pub fn check(&self) -> Result<(), String> {
        if self.judge.success.is_empty() {
            return Err("reply: needs at least one success condition".into());
        }
        self.judge.check("reply")?;
        for c in &self.retry_when {
            check_pointer(&c.pointer, "reply.retry_when")?;
        }
        match (&self.results, &self.per_record) {
            (Some(p), Some(j)) => {
                check_pointer(p, "reply.results")?;
                j.check("reply.per_record")?;
                if j.success.is_empty() {
                    return Err("reply.per_record: needs at least one success condition".into());
                }
            }
            (None, None) => {}
            _ => return Err("reply: results and per_record go together".into()),
        }
        Ok(())
    }

    fn exists(&self, msg: &str) -> bool {
        self.already_exists.iter().any(|m| msg.contains(m.as_str()))
    }

    fn judge_one(&self, judge: &Judge, v: &Value) -> Delivery {
        let (code, msg) = judge.said(v);
        if judge.ok(v) || self.exists(&msg) {
            Delivery::Delivered
        } else {
            Delivery::Rejected(format!("upstream code {code}: {msg}"))
        }
    }

    /// What became of each of `n` records, from a 2xx answer. `Ok(None)`: the answer says
    /// "already exists" of a request of several records, which does not tell which.
    pub fn read(&self, answer: &Value, n: usize) -> Result<Option<Vec<Delivery>>, SendError> {
        let (code, msg) = self.judge.said(answer);
        if self.retry_when.iter().any(|c| c.holds(answer)) {
            return Err(SendError::Retryable(format!(
                "upstream busy, code {code}: {msg}"
            )));
        }
        if let (Some(pointer), Some(per)) = (&self.results, &self.per_record) {
            let Some(items) = answer.pointer(pointer).and_then(Value::as_array) else {
                return Err(SendError::Malformed(format!(
                    "answer has no result list at {pointer:?} (upstream code {code}: {msg})"
                )));
            };
            if items.len() != n {
                return Err(SendError::Malformed(format!(
                    "answer's {pointer:?} has {} results for {n} records",
                    items.len()
                )));
            }
            return Ok(Some(items.iter().map(|v| self.judge_one(per, v)).collect()));
        }
        if self.judge.ok(answer) {
            return Ok(Some(vec![Delivery::Delivered; n]));
        }
        if n > 1 && self.exists(&msg) {
            return Ok(None);
        }
        Ok(Some(vec![self.judge_one(&self.judge, answer); n]))
    }
}
