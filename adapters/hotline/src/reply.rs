//! Reading what people send back. SMS replies are messy — "1", "１", "1满意", "非常满意！！",
//! "不满意", free text — and IVR results are single keys. Both map through the configured
//! scale (3, 4 or 5 levels). Replay (0) and no key are never ratings.

use rating_hub::pb::v1::Level;

/// A survey's answer scale: how many levels its keys 1..=n stand for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// 1 满意, 2 一般, 3 不满意.
    Three,
    /// 1 非常满意, 2 满意, 3 基本满意, 4 不满意.
    Four,
    /// 1 非常满意 … 5 非常不满意 (the hotline prompt's orientation).
    Five,
}

impl Scale {
    pub fn from_levels(n: u32) -> Option<Self> {
        match n {
            3 => Some(Self::Three),
            4 => Some(Self::Four),
            5 => Some(Self::Five),
            _ => None,
        }
    }

    pub fn keys(self) -> u32 {
        match self {
            Self::Three => 3,
            Self::Four => 4,
            Self::Five => 5,
        }
    }

    /// The level a key (1..=n) stands for.
    pub fn level(self, key: u32) -> Option<Level> {
        use Level::*;
        let table: &[Level] = match self {
            Self::Three => &[Satisfied, BasicallySatisfied, Dissatisfied],
            Self::Four => &[VerySatisfied, Satisfied, BasicallySatisfied, Dissatisfied],
            Self::Five => &[
                VerySatisfied,
                Satisfied,
                BasicallySatisfied,
                Dissatisfied,
                VeryDissatisfied,
            ],
        };
        table.get((key as usize).checked_sub(1)?).copied()
    }
}

/// What a reply means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A rating at this level.
    Rating(Level),
    /// 0: "say it again" — not a rating.
    Replay,
    /// Nothing pressed / empty message — not a rating.
    NoKey,
    /// Not understood; the reason is kept with the reply.
    Unrecognized(String),
}

/// Full-width digits and letters (０-９, Ａ-Ｚ) and the ideographic space become ASCII.
fn normalize(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
            '\u{3000}' => ' ',
            c => c,
        })
        .collect()
}

/// Keywords, longest first so "非常不满意" is not read as "满意".
const KEYWORDS: &[(&str, Level)] = &[
    ("非常不满意", Level::VeryDissatisfied),
    ("非常满意", Level::VerySatisfied),
    ("基本满意", Level::BasicallySatisfied),
    ("比较满意", Level::Satisfied),
    ("不满意", Level::Dissatisfied),
    ("很不满意", Level::VeryDissatisfied),
    ("满意", Level::Satisfied),
    ("很差", Level::VeryDissatisfied),
    ("很好", Level::VerySatisfied),
    ("一般", Level::BasicallySatisfied),
    ("差评", Level::Dissatisfied),
    ("好评", Level::Satisfied),
    ("差", Level::Dissatisfied),
    ("好", Level::Satisfied),
];

/// Reads an SMS reply under `scale`.
pub fn parse_sms(text: &str, scale: Scale) -> Reply {
    let t = normalize(text);
    let t = t.trim();
    if t.is_empty() {
        return Reply::NoKey;
    }
    // A leading key wins: "1满意", "1。", "1 谢谢".
    let digits: String = t.chars().take_while(|c| c.is_ascii_digit()).collect();
    if !digits.is_empty() {
        return key(&digits, scale);
    }
    // Keywords: the earliest match in the text, longest keyword at a position first.
    let mut best: Option<(usize, usize, Level)> = None;
    for (word, level) in KEYWORDS {
        if let Some(pos) = t.find(word) {
            let better = match best {
                None => true,
                Some((p, len, _)) => pos < p || (pos == p && word.len() > len),
            };
            if better {
                best = Some((pos, word.len(), *level));
            }
        }
    }
    match best {
        // "一般" is 3-level's middle; on a 3-level scale "满意" is its top, also Satisfied.
        Some((_, _, level)) => Reply::Rating(level),
        None => Reply::Unrecognized("no key and no known keyword".into()),
    }
}

fn key(digits: &str, scale: Scale) -> Reply {
    if digits.len() > 1 {
        return Reply::Unrecognized(format!(
            "{} digits where one key was expected",
            digits.len()
        ));
    }
    let k: u32 = digits.parse().unwrap_or(u32::MAX);
    if k == 0 {
        return Reply::Replay;
    }
    match scale.level(k) {
        Some(level) => Reply::Rating(level),
        None => Reply::Unrecognized(format!(
            "key {k} is not on the {}-level scale",
            scale.keys()
        )),
    }
}

/// Reads an IVR key result: "" / "timeout" / "none" are no key; "0" (or "*") is replay.
pub fn parse_ivr(raw: &str, scale: Scale) -> Reply {
    let t = normalize(raw);
    let t = t.trim();
    match t.to_ascii_lowercase().as_str() {
        "" | "timeout" | "none" | "-1" => Reply::NoKey,
        "*" => Reply::Replay,
        k if k.chars().all(|c| c.is_ascii_digit()) => key(k, scale),
        _ => Reply::Unrecognized("not a key".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Level::*;

    /// A corpus of replies seen in practice, with what each must mean.
    #[test]
    fn messy_sms_corpus() {
        let corpus: &[(&str, Reply)] = &[
            ("1", Reply::Rating(VerySatisfied)),
            ("１", Reply::Rating(VerySatisfied)),
            (" 2 ", Reply::Rating(Satisfied)),
            ("３", Reply::Rating(BasicallySatisfied)),
            ("4", Reply::Rating(Dissatisfied)),
            ("5", Reply::Rating(VeryDissatisfied)),
            ("1满意", Reply::Rating(VerySatisfied)),
            ("5非常不满意", Reply::Rating(VeryDissatisfied)),
            ("1。谢谢", Reply::Rating(VerySatisfied)),
            ("非常满意", Reply::Rating(VerySatisfied)),
            ("非常满意！！", Reply::Rating(VerySatisfied)),
            ("满意", Reply::Rating(Satisfied)),
            ("不满意!!", Reply::Rating(Dissatisfied)),
            ("非常不满意，排队太久", Reply::Rating(VeryDissatisfied)),
            ("基本满意吧", Reply::Rating(BasicallySatisfied)),
            ("服务很好", Reply::Rating(VerySatisfied)),
            ("太差了", Reply::Rating(Dissatisfied)),
            ("一般般", Reply::Rating(BasicallySatisfied)),
            ("0", Reply::Replay),
            ("０", Reply::Replay),
            ("", Reply::NoKey),
            ("   ", Reply::NoKey),
            (
                "6",
                Reply::Unrecognized("key 6 is not on the 5-level scale".into()),
            ),
            (
                "12",
                Reply::Unrecognized("2 digits where one key was expected".into()),
            ),
            (
                "请问什么时候能拿证",
                Reply::Unrecognized("no key and no known keyword".into()),
            ),
            (
                "TD",
                Reply::Unrecognized("no key and no known keyword".into()),
            ),
        ];
        for (text, want) in corpus {
            assert_eq!(&parse_sms(text, Scale::Five), want, "reply {text:?}");
        }
    }

    #[test]
    fn scales_map_keys_explicitly() {
        assert_eq!(parse_sms("1", Scale::Three), Reply::Rating(Satisfied));
        assert_eq!(
            parse_sms("2", Scale::Three),
            Reply::Rating(BasicallySatisfied)
        );
        assert_eq!(parse_sms("3", Scale::Three), Reply::Rating(Dissatisfied));
        assert!(matches!(
            parse_sms("4", Scale::Three),
            Reply::Unrecognized(_)
        ));
        assert_eq!(parse_sms("4", Scale::Four), Reply::Rating(Dissatisfied));
    }

    #[test]
    fn ivr_keys() {
        assert_eq!(parse_ivr("1", Scale::Five), Reply::Rating(VerySatisfied));
        assert_eq!(parse_ivr("0", Scale::Five), Reply::Replay);
        assert_eq!(parse_ivr("", Scale::Five), Reply::NoKey);
        assert_eq!(parse_ivr("timeout", Scale::Five), Reply::NoKey);
        assert!(matches!(
            parse_ivr("#", Scale::Five),
            Reply::Unrecognized(_)
        ));
    }

    proptest::proptest! {
        #[test]
        fn no_reply_text_panics(s in "\\PC*") {
            let _ = parse_sms(&s, Scale::Five);
            let _ = parse_sms(&s, Scale::Three);
            let _ = parse_ivr(&s, Scale::Four);
        }

        #[test]
        fn arbitrary_unicode_never_panics(s in proptest::collection::vec(proptest::char::any(), 0..64)) {
            let s: String = s.into_iter().collect();
            let _ = parse_sms(&s, Scale::Five);
            let _ = parse_ivr(&s, Scale::Five);
        }
    }
}
