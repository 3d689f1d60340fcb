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
    /// With a per-record result list: any that holds refuses every record of a request
    /// answered without one (a refusal of the records themselves, e.g. a malformed batch).
    /// Any other such answer (a signature, clock or app-secret fault) is retried: a fault
    /// of the hub's set-up never dead-letters citizens' ratings.
    #[serde(default)]
    pub refuse_when: Vec<Condition>,
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

/// What of an upstream's code or message goes into a dead letter, the attempt log or a log
/// line: its first 300 characters.
fn cut(text: &str) -> String {
    match text.char_indices().nth(300) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
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
        for c in &self.refuse_when {
            check_pointer(&c.pointer, "reply.refuse_when")?;
        }
        if self.already_exists.iter().any(String::is_empty) {
            return Err(
                "reply.already_exists: an empty marker would take every refusal for success".into(),
            );
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
            Delivery::Rejected(format!("upstream code {}: {}", cut(&code), cut(&msg)))
        }
    }

    /// What became of each of `n` records, from a 2xx answer. `Ok(None)`: the answer says
    /// "already exists" of a request of several records, which does not tell which.
    pub fn read(&self, answer: &Value, n: usize) -> Result<Option<Vec<Delivery>>, SendError> {
        let (code, full) = self.judge.said(answer);
        let (code, msg) = (cut(&code), cut(&full));
        if self.retry_when.iter().any(|c| c.holds(answer)) {
            return Err(SendError::Retryable(format!(
                "upstream busy, code {code}: {msg}"
            )));
        }
        if let (Some(pointer), Some(per)) = (&self.results, &self.per_record) {
            let Some(items) = answer.pointer(pointer).and_then(Value::as_array) else {
                if self.judge.ok(answer) {
                    // "Success", but not a word on any record: never taken for delivered.
                    return Err(SendError::Malformed(format!(
                        "answer has no result list at {pointer:?} (upstream code {code}: {msg})"
                    )));
                }
                if self.refuse_when.iter().any(|c| c.holds(answer)) {
                    return Ok(Some(vec![
                        Delivery::Rejected(format!(
                            "upstream code {code}: {msg}"
                        ));
                        n
                    ]));
                }
                return Err(SendError::Retryable(format!(
                    "the platform refused the request as a whole, code {code}: {msg}"
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
        if n > 1 && self.exists(&full) {
            return Ok(None);
        }
        Ok(Some(vec![self.judge_one(&self.judge, answer); n]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn nested() -> ReplySpec {
        toml::from_str(
            r#"
success = [{ pointer = "/status/code", equals = ["200"] }, { pointer = "/custom/code", equals = ["1"] }]
code = "/custom/code"
message = "/custom/text"
already_exists = ["本次服务已存在评价"]
results = "/custom/results"
per_record = { success = [{ pointer = "/code", equals = ["1"] }], code = "/code", message = "/text" }
refuse_when = [{ pointer = "/custom/code", equals = ["40001"] }]
"#,
        )
        .unwrap()
    }

    #[test]
    fn per_record_results_decide_each_record() {
        let r = nested();
        let answer = json!({"status": {"code": 200}, "custom": {"code": 1, "results": [
            {"code": 1}, {"code": 0, "text": "本次服务已存在评价"}, {"code": 0, "text": "evalDetail 不合法"}]}});
        let d = r.read(&answer, 3).unwrap().unwrap();
        assert_eq!(d[0], Delivery::Delivered);
        assert_eq!(d[1], Delivery::Delivered, "already exists is success");
        assert!(matches!(&d[2], Delivery::Rejected(e) if e.contains("evalDetail")));
        assert!(matches!(r.read(&answer, 2), Err(SendError::Malformed(_))));
    }

    /// A refusal of the whole request (a bad signature, a skewed clock, an expired secret)
    /// is the hub's fault, not the records': retried, never dead-lettered — unless the
    /// profile says such an answer refuses the records themselves.
    #[test]
    fn a_request_refused_as_a_whole_is_retried_unless_the_profile_says_otherwise() {
        let r = nested();
        let bad_sign = json!({"status": {"code": 401}, "custom": {"code": 0, "text": "验签失败"}});
        assert!(
            matches!(r.read(&bad_sign, 5), Err(SendError::Retryable(e)) if e.contains("验签失败"))
        );
        let refused =
            json!({"status": {"code": 200}, "custom": {"code": 40001, "text": "批次格式错误"}});
        let d = r.read(&refused, 2).unwrap().unwrap();
        assert!(
            d.iter()
                .all(|d| matches!(d, Delivery::Rejected(e) if e.contains("批次格式错误")))
        );
        let no_list = json!({"status": {"code": 200}, "custom": {"code": 1}});
        assert!(matches!(r.read(&no_list, 2), Err(SendError::Malformed(_))));
    }

    /// A platform that echoes a whole batch into its message: what is kept of it is short,
    /// however many records the refusal is about.
    #[test]
    fn a_long_message_is_cut_before_it_is_copied_to_every_record() {
        let r = nested();
        let echo = "x".repeat(1 << 20);
        let refused = json!({"status": {"code": 200}, "custom": {"code": 40001, "text": echo}});
        let d = r.read(&refused, 500).unwrap().unwrap();
        assert_eq!(d.len(), 500);
        for x in &d {
            let Delivery::Rejected(e) = x else {
                panic!("{x:?}")
            };
            assert!(e.chars().count() < 400, "{}", e.len());
        }
    }

    #[test]
    fn an_empty_already_exists_marker_is_refused() {
        let mut r = nested();
        r.already_exists.push(String::new());
        assert!(r.check().unwrap_err().contains("empty marker"));
    }
}
