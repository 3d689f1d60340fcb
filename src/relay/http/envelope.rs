//! Envelopes: the request around the records. A body template (JSON whose string values may
//! name values: `"{records}"` is the record list, `"{sign}"` a computed value), headers, and
//! the values computed for each request in order — times, nonces, random SM4 data keys, the
//! records encrypted with SM4 or SM2, signatures and HMACs over text built from the time,
//! the app id and secret. Authentication is one more computed value: a token, signature or
//! HMAC placed in a header or the body.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::crypto::{Encoding, Keyring};
use super::template::TimeFormat;
use crate::gm::{self, Sm2Order, Sm4Mode};

/// A text with `{name}` placeholders (`{{` and `}}` for braces).
#[derive(Debug, Clone)]
pub struct Text(Vec<Seg>);

#[derive(Debug, Clone)]
enum Seg {
    Lit(String),
    Var(String),
}

impl Text {
    pub fn parse(s: &str, known: &dyn Fn(&str) -> bool) -> Result<Self, String> {
        let mut segs = Vec::new();
        let mut lit = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    let mut closed = false;
                    for c in chars.by_ref() {
                        if c == '}' {
                            closed = true;
                            break;
                        }
                        name.push(c);
                    }
                    if !closed {
                        return Err(format!(
                            "{{{name} is never closed (write {{{{ for a literal brace)"
                        ));
                    }
                    if !known(&name) {
                        return Err(format!("{{{name}}} names no value defined before it"));
                    }
                    if !lit.is_empty() {
                        segs.push(Seg::Lit(std::mem::take(&mut lit)));
                    }
                    segs.push(Seg::Var(name));
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            segs.push(Seg::Lit(lit));
        }
        Ok(Self(segs))
    }

    /// The one value this text is exactly, if it is a lone placeholder.
    fn sole_var(&self) -> Option<&str> {
        match self.0.as_slice() {
            [Seg::Var(n)] => Some(n),
            _ => None,
        }
    }

    pub fn render(&self, values: &Values) -> String {
        let mut out = String::new();
        for s in &self.0 {
            match s {
                Seg::Lit(l) => out.push_str(l),
                Seg::Var(n) => out.push_str(&values.text(n)),
            }
        }
        out
    }
}

/// A value computed for one request: its text, and its bytes (for keys and ciphertexts).
/// `Debug` shows neither (a data key or a secret may be among them).
#[derive(Clone)]
pub struct Val {
    pub text: String,
    pub bytes: Vec<u8>,
    /// The JSON to put where a body names it alone (`"{records}"`: the list itself).
    pub json: Option<Value>,
}

impl std::fmt::Debug for Val {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Val({} bytes)", self.bytes.len())
    }
}

/// The values of one request, by name.
#[derive(Debug, Default)]
pub struct Values(BTreeMap<String, Val>);

impl Values {
    pub fn set_text(&mut self, name: &str, text: String) {
        let bytes = text.as_bytes().to_vec();
        self.0.insert(
            name.to_owned(),
            Val {
                text,
                bytes,
                json: None,
            },
        );
    }

    pub fn set(&mut self, name: &str, v: Val) {
        self.0.insert(name.to_owned(), v);
    }

    pub fn text(&self, name: &str) -> String {
        self.0.get(name).map(|v| v.text.clone()).unwrap_or_default()
    }

    fn bytes(&self, name: &str) -> &[u8] {
        self.0.get(name).map_or(&[], |v| v.bytes.as_slice())
    }

    fn json(&self, name: &str) -> Value {
        match self.0.get(name) {
            Some(Val { json: Some(j), .. }) => j.clone(),
            Some(v) => Value::String(v.text.clone()),
            None => Value::Null,
        }
    }
}

fn d_signer() -> String {
    gm::DEFAULT_SIGNER_ID.to_owned()
}

/// One computed value as a profile writes it (`[[computed]]`, evaluated in order).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ComputedSpec {
    /// The request's time in a format (as for templates).
    Time { name: String, format: String },
    /// A random UUID (e.g. a request or nonce id).
    Uuid { name: String },
    /// `bytes` random bytes (an SM4 data key: 16); as text, lower-case hex.
    Random { name: String, bytes: usize },
    /// A text built from other values.
    Text { name: String, input: String },
    /// SM3 of the input text.
    Sm3 {
        name: String,
        input: String,
        #[serde(default)]
        encoding: Encoding,
    },
    /// HMAC-SM3 of the input text under a secret.
    HmacSm3 {
        name: String,
        input: String,
        secret: String,
        #[serde(default)]
        encoding: Encoding,
    },
    /// SM2 signature (SM3, signer id) of the input text with a private key: r‖s, or DER.
    Sm2Sign {
        name: String,
        input: String,
        key: String,
        #[serde(default = "d_signer")]
        signer_id: String,
        #[serde(default)]
        der: bool,
        #[serde(default)]
        encoding: Encoding,
    },
    /// SM2 encryption to a public key, of the input text or of another value's bytes (a
    /// data key).
    Sm2Encrypt {
        name: String,
        #[serde(default)]
        input: Option<String>,
        #[serde(default)]
        input_value: Option<String>,
        key: String,
        /// "c1c3c2" (default) or "c1c2c3".
        #[serde(default)]
        order: Option<String>,
        /// Leave out the 04 that starts the C1 point.
        #[serde(default)]
        no_point_prefix: bool,
        #[serde(default)]
        encoding: Encoding,
    },
    /// SM4 (PKCS#7) of the input text, under a random value's bytes or a hex secret.
    Sm4Encrypt {
        name: String,
        input: String,
        key_value: String,
        /// "ecb" (default) or "cbc" (with `iv_value`, 16 bytes).
        #[serde(default)]
        mode: Option<String>,
        #[serde(default)]
        iv_value: Option<String>,
        #[serde(default)]
        encoding: Encoding,
    },
}

impl ComputedSpec {
    pub fn name(&self) -> &str {
        match self {
            ComputedSpec::Time { name, .. }
            | ComputedSpec::Uuid { name }
            | ComputedSpec::Random { name, .. }
            | ComputedSpec::Text { name, .. }
            | ComputedSpec::Sm3 { name, .. }
            | ComputedSpec::HmacSm3 { name, .. }
            | ComputedSpec::Sm2Sign { name, .. }
            | ComputedSpec::Sm2Encrypt { name, .. }
            | ComputedSpec::Sm4Encrypt { name, .. } => name,
        }
    }
}

#[derive(Debug, Clone)]
enum Step {
    Time(TimeFormat),
    Uuid,
    Random(usize),
    Text(Text),
    Sm3(Text, Encoding),
    HmacSm3(Text, String, Encoding),
    Sm2Sign {
        input: Text,
        key: String,
        signer_id: String,
        der: bool,
        encoding: Encoding,
    },
    Sm2Encrypt {
        input: Result<Text, String>,
        key: String,
        order: Sm2Order,
        prefix: bool,
        encoding: Encoding,
    },
    Sm4Encrypt {
        input: Text,
        key: KeySource,
        mode: Option<String>,
        encoding: Encoding,
    },
}

#[derive(Clone)]
enum KeySource {
    /// A random value computed for the request.
    Value(String),
    /// A secret's hex digits, decoded at start.
    Fixed([u8; 16]),
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Value(v) => write!(f, "Value({v})"),
            KeySource::Fixed(_) => f.write_str("Fixed(..)"),
        }
    }
}

/// The request around the records.
#[derive(Debug, Clone)]
pub struct Envelope {
    steps: Vec<(String, Step)>,
    body: Value,
    headers: Vec<(String, Text)>,
}

/// The values every request has before the computed ones.
pub const BUILTINS: [&str; 3] = ["records", "records_json", "count"];

impl Envelope {
    /// Checks the computed values, the body template and the headers against the keyring.
    pub fn build(
        computed: &[ComputedSpec],
        body: &str,
        headers: &BTreeMap<String, String>,
        keys: &Keyring,
    ) -> Result<Self, String> {
        let mut known: Vec<String> = BUILTINS.iter().map(|s| s.to_string()).collect();
        known.extend(keys.secrets.keys().cloned());
        let mut random = BTreeMap::new();
        let mut steps = Vec::new();
        for c in computed {
            let name = c.name().to_owned();
            let fail = |m: String| format!("computed {name:?}: {m}");
            if known.contains(&name) {
                return Err(fail("the name is already taken".into()));
            }
            let is_known = |n: &str| known.iter().any(|k| k == n);
            let text = |s: &str| Text::parse(s, &is_known).map_err(fail);
            let step = match c {
                ComputedSpec::Time { format, .. } => {
                    Step::Time(TimeFormat::parse(format).map_err(fail)?)
                }
                ComputedSpec::Uuid { .. } => Step::Uuid,
                ComputedSpec::Random { bytes, .. } => {
                    if !(1..=64).contains(bytes) {
                        return Err(fail("bytes must be 1 to 64".into()));
                    }
                    random.insert(name.clone(), *bytes);
                    Step::Random(*bytes)
                }
                ComputedSpec::Text { input, .. } => Step::Text(text(input)?),
                ComputedSpec::Sm3 {
                    input, encoding, ..
                } => Step::Sm3(text(input)?, *encoding),
                ComputedSpec::HmacSm3 {
                    input,
                    secret,
                    encoding,
                    ..
                } => {
                    if !keys.secrets.contains_key(secret) {
                        return Err(fail(format!(
                            "secret {secret:?} is not configured for this upstream"
                        )));
                    }
                    Step::HmacSm3(text(input)?, secret.clone(), *encoding)
                }
                ComputedSpec::Sm2Sign {
                    input,
                    key,
                    signer_id,
                    der,
                    encoding,
                    ..
                } => {
                    // ENTL, the id's length in bits, is two bytes.
                    if signer_id.is_empty() || signer_id.len() > 1024 {
                        return Err(fail("signer_id must be 1 to 1024 bytes".into()));
                    }
                    match keys.keys.get(key) {
                        Some(k) if k.private().is_some() => {}
                        Some(_) => {
                            return Err(fail(format!(
                                "key {key:?} is a public key; signing needs the private key"
                            )));
                        }
                        None => {
                            return Err(fail(format!(
                                "key {key:?} is not configured for this upstream"
                            )));
                        }
                    }
                    Step::Sm2Sign {
                        input: text(input)?,
                        key: key.clone(),
                        signer_id: signer_id.clone(),
                        der: *der,
                        encoding: *encoding,
                    }
                }
                ComputedSpec::Sm2Encrypt {
                    input,
                    input_value,
                    key,
                    order,
                    no_point_prefix,
                    encoding,
                    ..
                } => {
                    if !keys.keys.contains_key(key) {
                        return Err(fail(format!(
                            "key {key:?} is not configured for this upstream"
                        )));
                    }
                    let input = match (input, input_value) {
                        (Some(t), None) => Ok(text(t)?),
                        (None, Some(v)) if is_known(v) => Err(v.clone()),
                        (None, Some(v)) => {
                            return Err(fail(format!(
                                "input_value {v:?} names no value defined before it"
                            )));
                        }
                        _ => return Err(fail("needs exactly one of input or input_value".into())),
                    };
                    let order = match order.as_deref() {
                        None | Some("c1c3c2") => Sm2Order::C1C3C2,
                        Some("c1c2c3") => Sm2Order::C1C2C3,
                        Some(o) => {
                            return Err(fail(format!(
                                "order {o:?} is not \"c1c3c2\" or \"c1c2c3\""
                            )));
                        }
                    };
                    Step::Sm2Encrypt {
                        input,
                        key: key.clone(),
                        order,
                        prefix: !no_point_prefix,
                        encoding: *encoding,
                    }
                }
                ComputedSpec::Sm4Encrypt {
                    input,
                    key_value,
                    mode,
                    iv_value,
                    encoding,
                    ..
                } => {
                    let key = match (random.get(key_value), keys.secrets.get(key_value)) {
                        (Some(16), _) => KeySource::Value(key_value.clone()),
                        (Some(n), _) => {
                            return Err(fail(format!(
                                "key_value {key_value:?} has {n} bytes; SM4 keys have 16"
                            )));
                        }
                        (None, Some(secret)) => {
                            let bytes = hex::decode(secret.0.trim())
                                .ok()
                                .and_then(|b| <[u8; 16]>::try_from(b).ok());
                            KeySource::Fixed(bytes.ok_or_else(|| {
                                fail(format!(
                                    "secret {key_value:?} is not 32 hex digits (an SM4 key)"
                                ))
                            })?)
                        }
                        (None, None) => {
                            return Err(fail(format!(
                                "key_value {key_value:?} is neither a random value of 16 bytes nor a secret"
                            )));
                        }
                    };
                    let mode = match (mode.as_deref(), iv_value) {
                        (None | Some("ecb"), None) => None,
                        (Some("cbc"), Some(iv)) if random.get(iv) == Some(&16) => Some(iv.clone()),
                        (Some("cbc"), _) => {
                            return Err(fail(
                                "cbc needs iv_value naming a random value of 16 bytes".into(),
                            ));
                        }
                        (m, _) => {
                            return Err(fail(format!(
                                "mode {m:?} is not \"ecb\" or \"cbc\" (an IV goes with cbc only)"
                            )));
                        }
                    };
                    Step::Sm4Encrypt {
                        input: text(input)?,
                        key,
                        mode,
                        encoding: *encoding,
                    }
                }
            };
            known.push(name.clone());
            steps.push((name, step));
        }
        let is_known = |n: &str| known.iter().any(|k| k == n);
        let body: Value =
            serde_json::from_str(body).map_err(|e| format!("body is not JSON: {e}"))?;
        check_body(&body, &is_known)?;
        let headers = headers
            .iter()
            .map(|(k, v)| {
                reqwest::header::HeaderName::from_bytes(k.as_bytes())
                    .map_err(|_| format!("header {k:?}: not a valid header name"))?;
                if v.chars().any(char::is_control) {
                    return Err(format!("header {k:?}: the value has control characters"));
                }
                Text::parse(v, &is_known)
                    .map(|t| (k.clone(), t))
                    .map_err(|e| format!("header {k:?}: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            steps,
            body,
            headers,
        })
    }

    /// The body and headers of one request carrying `records` (a JSON list, or one record).
    pub fn render(
        &self,
        records: Value,
        count: usize,
        keys: &Keyring,
        now_micros: i64,
    ) -> Result<(String, Vec<(String, String)>), String> {
        let mut values = Values::default();
        let records_json = records.to_string();
        values.set(
            "records",
            Val {
                text: records_json.clone(),
                bytes: records_json.clone().into_bytes(),
                json: Some(records),
            },
        );
        values.set_text("records_json", records_json);
        values.set_text("count", count.to_string());
        for (name, secret) in &keys.secrets {
            values.set_text(name, secret.0.clone());
        }
        for (name, step) in &self.steps {
            let bytes_val = |bytes: Vec<u8>, encoding: Encoding| Val {
                text: encoding.encode(&bytes),
                bytes,
                json: None,
            };
            let v = match step {
                Step::Time(f) => {
                    let t = f.format(now_micros);
                    Val {
                        bytes: t.clone().into_bytes(),
                        text: t,
                        json: None,
                    }
                }
                Step::Uuid => {
                    let t = uuid::Uuid::now_v7().to_string();
                    Val {
                        bytes: t.clone().into_bytes(),
                        text: t,
                        json: None,
                    }
                }
                Step::Random(n) => bytes_val(gm::random_bytes(*n), Encoding::Hex),
                Step::Text(t) => {
                    let t = t.render(&values);
                    Val {
                        bytes: t.clone().into_bytes(),
                        text: t,
                        json: None,
                    }
                }
                Step::Sm3(t, enc) => {
                    bytes_val(gm::sm3(t.render(&values).as_bytes()).to_vec(), *enc)
                }
                Step::HmacSm3(t, secret, enc) => bytes_val(
                    gm::hmac_sm3(values.text(secret).as_bytes(), t.render(&values).as_bytes())
                        .to_vec(),
                    *enc,
                ),
                Step::Sm2Sign {
                    input,
                    key,
                    signer_id,
                    der,
                    encoding,
                } => {
                    let k = keys.keys[key].private().expect("checked at start");
                    let sig = k
                        .sign(signer_id, input.render(&values).as_bytes(), *der)
                        .map_err(|e| format!("computed {name:?}: {e}"))?;
                    bytes_val(sig, *encoding)
                }
                Step::Sm2Encrypt {
                    input,
                    key,
                    order,
                    prefix,
                    encoding,
                } => {
                    let plain = match input {
                        Ok(t) => t.render(&values).into_bytes(),
                        Err(value) => values.bytes(value).to_vec(),
                    };
                    let mut ct = keys.keys[key]
                        .public()
                        .encrypt(*order, &plain)
                        .map_err(|e| format!("computed {name:?}: {e}"))?;
                    if !prefix {
                        ct.remove(0);
                    }
                    bytes_val(ct, *encoding)
                }
                Step::Sm4Encrypt {
                    input,
                    key,
                    mode,
                    encoding,
                } => {
                    let key: [u8; 16] = match key {
                        KeySource::Fixed(k) => *k,
                        KeySource::Value(v) => values
                            .bytes(v)
                            .try_into()
                            .expect("16 bytes, checked at start"),
                    };
                    let mode = match mode {
                        None => Sm4Mode::Ecb,
                        Some(iv) => Sm4Mode::Cbc(
                            values
                                .bytes(iv)
                                .try_into()
                                .expect("16 bytes, checked at start"),
                        ),
                    };
                    bytes_val(
                        gm::sm4_encrypt(&key, mode, input.render(&values).as_bytes()),
                        *encoding,
                    )
                }
            };
            values.set(name, v);
        }
        let body = fill(&self.body, &values);
        let headers = self
            .headers
            .iter()
            .map(|(k, t)| (k.clone(), t.render(&values)))
            .collect();
        Ok((body.to_string(), headers))
    }
}

fn check_body(v: &Value, known: &dyn Fn(&str) -> bool) -> Result<(), String> {
    match v {
        Value::String(s) => Text::parse(s, known)
            .map(|_| ())
            .map_err(|e| format!("body: {e}")),
        Value::Array(items) => items.iter().try_for_each(|i| check_body(i, known)),
        Value::Object(m) => m.values().try_for_each(|i| check_body(i, known)),
        _ => Ok(()),
    }
}

fn fill(v: &Value, values: &Values) -> Value {
    match v {
        Value::String(s) => {
            let t = Text::parse(s, &|_| true).expect("checked at start");
            match t.sole_var() {
                Some(name) => values.json(name),
                None => Value::String(t.render(values)),
            }
        }
        Value::Array(items) => Value::Array(items.iter().map(|i| fill(i, values)).collect()),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, i)| (k.clone(), fill(i, values)))
                .collect(),
        ),
        other => other.clone(),
    }
}
