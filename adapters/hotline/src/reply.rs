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

/// Words that say a level, longest first within each family so "非常不满意" is never read as
/// "满意". Negated and hedged forms are listed as what they mean: "不太满意" is 不满意, "不好"
/// is 不满意, "不错" is praise. (How people answer these SMS: a key, the invitation's own
/// wording, a word of praise or complaint, often with a negation or a hedge.)
const PHRASES: &[(&str, Level)] = &[
    // Very dissatisfied.
    ("非常不满意", Level::VeryDissatisfied),
    ("很不满意", Level::VeryDissatisfied),
    ("特别不满意", Level::VeryDissatisfied),
    ("十分不满意", Level::VeryDissatisfied),
    ("极不满意", Level::VeryDissatisfied),
    ("非常差", Level::VeryDissatisfied),
    ("很差", Level::VeryDissatisfied),
    ("极差", Level::VeryDissatisfied),
    ("非常不好", Level::VeryDissatisfied),
    ("很不好", Level::VeryDissatisfied),
    ("太烂", Level::VeryDissatisfied),
    ("糟糕", Level::VeryDissatisfied),
    // Dissatisfied, hedged negations of praise first.
    ("不太满意", Level::Dissatisfied),
    ("不是很满意", Level::Dissatisfied),
    ("不怎么满意", Level::Dissatisfied),
    ("不大满意", Level::Dissatisfied),
    ("不够满意", Level::Dissatisfied),
    ("不很满意", Level::Dissatisfied),
    ("不算满意", Level::Dissatisfied),
    ("不太好", Level::Dissatisfied),
    ("不是很好", Level::Dissatisfied),
    ("不怎么样", Level::Dissatisfied),
    ("不满意", Level::Dissatisfied),
    ("没满意", Level::Dissatisfied),
    ("不满", Level::Dissatisfied),
    ("不好", Level::Dissatisfied),
    ("不行", Level::Dissatisfied),
    ("差评", Level::Dissatisfied),
    ("太差", Level::Dissatisfied),
    ("差劲", Level::Dissatisfied),
    ("很烂", Level::Dissatisfied),
    // Basically satisfied.
    ("基本满意", Level::BasicallySatisfied),
    ("还算满意", Level::BasicallySatisfied),
    ("一般", Level::BasicallySatisfied),
    ("还行", Level::BasicallySatisfied),
    ("还可以", Level::BasicallySatisfied),
    ("凑合", Level::BasicallySatisfied),
    ("马马虎虎", Level::BasicallySatisfied),
    ("中评", Level::BasicallySatisfied),
    ("不算差", Level::BasicallySatisfied),
    // Very satisfied.
    ("非常满意", Level::VerySatisfied),
    ("很满意", Level::VerySatisfied),
    ("十分满意", Level::VerySatisfied),
    ("特别满意", Level::VerySatisfied),
    ("非常好", Level::VerySatisfied),
    ("很好", Level::VerySatisfied),
    ("非常棒", Level::VerySatisfied),
    ("很棒", Level::VerySatisfied),
    // Satisfied.
    ("比较满意", Level::Satisfied),
    ("挺满意", Level::Satisfied),
    ("满意", Level::Satisfied),
    ("好评", Level::Satisfied),
    ("不错", Level::Satisfied),
    ("挺好", Level::Satisfied),
    ("点赞", Level::Satisfied),
];

/// Replies that acknowledge the message and rate nothing ("好的" is not 好评).
const ACKNOWLEDGEMENTS: &[&str] = &[
    "好",
    "好的",
    "好滴",
    "嗯",
    "嗯嗯",
    "哦",
    "ok",
    "okay",
    "收到",
    "已收到",
    "知道了",
    "谢谢",
    "谢谢你",
    "多谢",
    "好的谢谢",
    "好的,谢谢",
    "行",
    "可以",
    "是",
    "是的",
];

/// Good, medium or bad: what must agree when a reply says a level twice.
fn class(l: Level) -> i32 {
    match l {
        Level::VerySatisfied | Level::Satisfied => 0,
        Level::BasicallySatisfied => 1,
        _ => 2,
    }
}

/// Text that looks like a level word and is not one ("不好意思" is an apology, "满意度" a noun).
const NOT_LEVELS: &[&str] = &["不好意思", "满意度", "好不好", "满不满意"];

/// Negations that turn the praise after them into a complaint ("没有很满意", "谈不上满意"),
/// and a complaint after them into nothing certain ("不是差评", "没有不满意").
const NEGATORS: &[&str] = &[
    "谈不上",
    "说不上",
    "没有",
    "不是",
    "不算",
    "很难",
    "不",
    "没",
    "难",
];

/// What the words of a reply say.
enum Worded {
    Level(Level),
    Nothing,
    /// A negated complaint, or levels that disagree: not a rating.
    Unclear(&'static str),
}

/// The level phrases in `t`, each span used once (longest phrase first), read with the
/// negation before them.
fn phrases(t: &str) -> Worded {
    let mut t = t.to_owned();
    for n in NOT_LEVELS {
        t = t.replace(n, "·");
    }
    let mut taken = vec![false; t.len()];
    let mut found: Vec<(usize, Level)> = Vec::new();
    let mut ordered: Vec<&(&str, Level)> = PHRASES.iter().collect();
    ordered.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    for (phrase, level) in ordered {
        let mut from = 0;
        while let Some(pos) = t[from..].find(phrase) {
            let at = from + pos;
            let end = at + phrase.len();
            if taken[at..end].iter().all(|x| !x) {
                taken[at..end].iter_mut().for_each(|x| *x = true);
                found.push((at, *level));
            }
            from = end;
        }
    }
    found.sort_by_key(|(at, _)| *at);
    let mut levels = Vec::new();
    for (at, level) in found {
        let negated = NEGATORS.iter().any(|n| t[..at].ends_with(n));
        match (negated, class(level)) {
            (false, _) => levels.push(level),
            // "没有很满意", "谈不上满意", "不是很好": a complaint.
            (true, 0 | 1) => levels.push(Level::Dissatisfied),
            // "不是差评", "没有不满意": no level one can be sure of.
            (true, _) => return Worded::Unclear("a negated complaint says no level for sure"),
        }
    }
    match levels.first() {
        None => Worded::Nothing,
        Some(first) if levels.iter().any(|l| class(*l) != class(*first)) => {
            Worded::Unclear("the words say different levels (the invitation's menu echoed back?)")
        }
        Some(first) => Worded::Level(*first),
    }
}

/// Words around a bare key that say nothing more ("回复2", "我选3号", "1。谢谢").
const KEY_WRAPPERS: &[&str] = &[
    "回复", "我选", "选择", "选", "按键", "按", "第", "号", "键", "谢谢", "了", "吧", "啊", "哈",
    ",", "，", "、",
];

/// The wrappers that come before a key, longest first where one starts another.
const LEADING_WRAPPERS: &[&str] = &["回复", "我选", "选择", "选", "按键", "按", "第"];

/// Reads an SMS reply under `scale`:
/// - a key: alone, full-width, leading ("1满意", "5非常不满意"), or wrapped ("回复2", "我选3号");
/// - the words of a level, negations and hedges read as what they say ("服务不好" and
///   "没有很满意" are complaints, "还行" is 基本满意); numbers inside such a reply (a phone,
///   "等了2个小时", a date) are not keys;
/// - both, when they agree.
///
/// Not a rating: an empty reply, 0 (replay), an acknowledgement ("好的", "收到"), a score
/// ("5分", "5星": scores run the other way from the keys), several levels (the invitation's
/// menu echoed back), a negated complaint ("不是差评"), a key and words that disagree, a key
/// off the scale, or a number and no words.
pub fn parse_sms(text: &str, scale: Scale) -> Reply {
    let t = normalize(text).to_lowercase();
    let compact: String = t
        .chars()
        .filter(|c| !c.is_whitespace() && !matches!(c, '。' | '.' | '!' | '！' | '~' | '～' | '…'))
        .collect();
    if compact.is_empty() {
        return Reply::NoKey;
    }
    let whole = compact.trim_end_matches([',', '，']);
    if ACKNOWLEDGEMENTS.contains(&whole) {
        return Reply::Unrecognized("an acknowledgement, not a rating".into());
    }
    // "差" is no level inside words (出差, 差不多, 时差), but a reply of that word alone is
    // a complaint.
    if whole == "差" {
        return Reply::Rating(Level::Dissatisfied);
    }
    let chars: Vec<char> = compact.chars().collect();
    if chars
        .windows(2)
        .any(|w| w[0].is_ascii_digit() && matches!(w[1], '分' | '星' | '颗'))
    {
        return Reply::Unrecognized(
            "a score (N分, N星), not a key: scores run the other way from the keys".into(),
        );
    }
    // A leading key: the reply starts with it, after a wrapper at most.
    let mut rest = compact.as_str();
    for w in LEADING_WRAPPERS {
        if let Some(r) = rest.strip_prefix(w) {
            rest = r;
            break;
        }
    }
    let leading: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let words = phrases(&compact);
    if let Worded::Unclear(why) = words {
        return Reply::Unrecognized(why.into());
    }
    let keyed = if leading.is_empty() {
        // A bare key wrapped in words that say nothing else ("1。谢谢" is leading; "谢谢，2"
        // is not, and counts only if nothing but wrappers surround it).
        let mut bare = compact.clone();
        for w in KEY_WRAPPERS {
            bare = bare.replace(w, "");
        }
        (bare.len() == 1 && bare.as_bytes()[0].is_ascii_digit()).then_some(bare)
    } else {
        Some(leading)
    };
    let keyed = match keyed {
        None => None,
        Some(k) => match key(&k, scale) {
            Reply::Rating(l) => Some((k, l)),
            // A longer number or a key off the scale: without words it is not a rating;
            // with words, the words are the rating.
            other if matches!(words, Worded::Nothing) => return other,
            _ => None,
        },
    };
    match (keyed, words) {
        (Some((k, l)), Worded::Level(w)) if class(l) != class(w) => Reply::Unrecognized(format!(
            "key {k} ({}) and the words ({}) disagree",
            l.as_str_name(),
            w.as_str_name()
        )),
        // The key is exact on its scale; the words only confirm its class.
        (Some((_, l)), _) => Reply::Rating(l),
        (None, Worded::Level(w)) => Reply::Rating(w),
        (None, _) if compact.chars().any(|c| c.is_ascii_digit()) => {
            Reply::Unrecognized("a number that is not a key, and no known level".into())
        }
        (None, _) => Reply::Unrecognized("no key and no known level".into()),
    }
}

/// A reply's text as it may be kept or forwarded: full-width forms made ASCII, control
/// characters dropped, at most 2,000 characters, and numbers long enough to be a phone or an
/// ID masked even when written with spaces or hyphens ("138 1234-5678").
pub fn masked(content: &str) -> String {
    // Full-width digits and hyphens and the ideographic space become ASCII (so a number is
    // masked however written); the rater's other characters stay as written; control
    // characters become spaces.
    let chars: Vec<char> = content
        .chars()
        .map(|c| match c {
            '０'..='９' | '－' => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
            '\u{3000}' => ' ',
            c if c.is_control() => ' ',
            c => c,
        })
        .take(2000)
        .collect();
    // A span of digit groups split by short runs of separators ("138 1234-5678",
    // "138 - 1234 - 5678", "138—1234—5678") with 7 digits or more in all is one number, and
    // masked whole; a shorter one ("1 - 2 小时") is kept as written.
    let is_sep = |c: char| matches!(c, ' ' | '-' | '—' | '–');
    let mut out = String::with_capacity(content.len());
    let mut i = 0;
    while i < chars.len() {
        if !chars[i].is_ascii_digit() {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let (mut digits, mut j) = (0, i);
        let mut end = loop {
            while j < chars.len() && chars[j].is_ascii_digit() {
                j += 1;
                digits += 1;
            }
            let end = j;
            let mut k = j;
            while k < chars.len() && k - j < 3 && is_sep(chars[k]) {
                k += 1;
            }
            if k > j && chars.get(k).is_some_and(char::is_ascii_digit) {
                j = k;
            } else {
                break end;
            }
        };
        if digits >= 7 {
            if chars.get(end).is_some_and(|c| matches!(c, 'X' | 'x')) {
                end += 1;
            }
            out.push_str("<number>");
        } else {
            out.extend(&chars[i..end]);
        }
        i = end;
    }
    rating_hub::domain::codes::redact_numbers(out.trim())
}

/// The words of a reply worth forwarding as the rating's text: empty when the reply is only a
/// key or a level (the level says it all, and ten identical "不满意" a day would look like a
/// template), else the masked reply.
pub fn reply_text(content: &str) -> String {
    let text = masked(content);
    let mut rest = text.to_lowercase();
    for p in PHRASES
        .iter()
        .map(|(p, _)| *p)
        .chain(KEY_WRAPPERS.iter().copied())
    {
        rest = rest.replace(p, "");
    }
    let substance = rest
        .chars()
        .filter(|c| !c.is_ascii_digit() && !c.is_whitespace() && !c.is_ascii_punctuation())
        .filter(|c| !matches!(c, '。' | '，' | '！' | '？' | '、' | '～' | '…'))
        .count();
    if substance < 2 { String::new() } else { text }
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
                Reply::Unrecognized("no key and no known level".into()),
            ),
            (
                "TD",
                Reply::Unrecognized("no key and no known level".into()),
            ),
        ];
        for (text, want) in corpus {
            assert_eq!(&parse_sms(text, Scale::Five), want, "reply {text:?}");
        }
    }

    /// Negations and hedges are read as what they say: before, "服务不好" matched 好 and
    /// "不太满意" matched 满意, so a 差评 became 满意 and no case opened.
    #[test]
    fn negations_and_hedges_are_complaints_not_praise() {
        for (text, want) in [
            ("服务不好", Dissatisfied),
            ("不好", Dissatisfied),
            ("不太满意", Dissatisfied),
            ("不是很满意", Dissatisfied),
            ("不怎么满意，等太久", Dissatisfied),
            ("不怎么样", Dissatisfied),
            ("很不好", VeryDissatisfied),
            ("很不满意!", VeryDissatisfied),
            ("还不错", Satisfied),
            ("不错", Satisfied),
            ("还行吧", BasicallySatisfied),
        ] {
            assert_eq!(
                parse_sms(text, Scale::Five),
                Reply::Rating(want),
                "{text:?}"
            );
        }
    }

    /// Acknowledgements and the invitation's menu echoed back rate nothing; keys inside words
    /// and full-width keys are read; a key and words that disagree are not guessed at.
    #[test]
    fn acknowledgements_echoes_and_disagreements_are_not_ratings() {
        for text in ["好的", "好", "收到", "好的，谢谢", "OK", "嗯嗯"] {
            assert_eq!(
                parse_sms(text, Scale::Five),
                Reply::Unrecognized("an acknowledgement, not a rating".into()),
                "{text:?}"
            );
        }
        for text in [
            "1非常满意 2满意 3基本满意 4不满意 5非常不满意",
            "满意 不满意",
            "1 不满意",
        ] {
            assert!(
                matches!(parse_sms(text, Scale::Five), Reply::Unrecognized(_)),
                "{text:?}"
            );
        }
        assert_eq!(parse_sms("回复2", Scale::Five), Reply::Rating(Satisfied));
        assert_eq!(
            parse_sms("我选3号", Scale::Five),
            Reply::Rating(BasicallySatisfied)
        );
        assert_eq!(parse_sms("４", Scale::Five), Reply::Rating(Dissatisfied));
        assert_eq!(
            parse_sms("5 非常不满意", Scale::Five),
            Reply::Rating(VeryDissatisfied)
        );
        assert_eq!(
            parse_sms("3 不满意", Scale::Three),
            Reply::Rating(Dissatisfied)
        );
    }

    /// Numbers in a reply are keys only where a key stands: a phone, a date, "等了2个小时" or a
    /// score ("5分": full marks, which the 5-level keys would read as 非常不满意) are not.
    /// Apologies and nouns that contain level words are not levels, and a negation before
    /// praise is a complaint.
    #[test]
    fn numbers_in_words_scores_and_negated_praise_are_read_as_meant() {
        for (text, want) in [
            ("等了2个小时，很差", VeryDissatisfied),
            ("跑了3趟，不满意", Dissatisfied),
            ("不满意，请回电13812345678", Dissatisfied),
            ("10月9日办的，很差", VeryDissatisfied),
            ("没有很满意", Dissatisfied),
            ("没有满意", Dissatisfied),
            ("谈不上满意", Dissatisfied),
            ("很难满意", Dissatisfied),
            ("不是好评", Dissatisfied),
        ] {
            assert_eq!(
                parse_sms(text, Scale::Five),
                Reply::Rating(want),
                "{text:?}"
            );
        }
        for text in [
            "5分",
            "5星",
            "1分",
            "等了2个小时",
            "不好意思，忘了",
            "不是差评",
            "满意度很低",
        ] {
            assert!(
                matches!(parse_sms(text, Scale::Five), Reply::Unrecognized(_)),
                "{text:?}: {:?}",
                parse_sms(text, Scale::Five)
            );
        }
    }

    #[test]
    fn a_reply_forwards_its_words_masked_and_no_text_for_a_bare_key_or_level() {
        assert_eq!(reply_text("5"), "");
        assert_eq!(reply_text("不满意"), "");
        assert_eq!(reply_text("５ 非常不满意！"), "");
        assert_eq!(reply_text("服务不好，排队太久"), "服务不好，排队太久");
        for phone in [
            "１３８１２３４５６７８",
            "138 1234 5678",
            "138-1234-5678",
            "138 - 1234 - 5678",
            "138  1234  5678",
            "138－1234－5678",
            "138\u{3000}1234\u{3000}5678",
            "138—1234—5678",
            "5301 0219 8001 0112 3X",
        ] {
            let t = reply_text(&format!("不满意，请回电{phone}"));
            assert!(
                t.contains("<number>")
                    && !t.contains("5678")
                    && !t.contains("123")
                    && !t.contains('X'),
                "{phone}: {t}"
            );
        }
        // A short number split by a separator is kept as written.
        assert_eq!(reply_text("等了1 - 2小时，不满意"), "等了1 - 2小时，不满意");
    }

    #[test]
    fn a_bare_cha_is_a_complaint_and_cha_inside_words_is_not() {
        assert_eq!(parse_sms("差", Scale::Five), Reply::Rating(Dissatisfied));
        assert_eq!(parse_sms("差。", Scale::Five), Reply::Rating(Dissatisfied));
        assert!(matches!(
            parse_sms("出差了", Scale::Five),
            Reply::Unrecognized(_)
        ));
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
