//! Identifiers that arrive as strings and must be checked before anything trusts them:
//! 统一社会信用代码 (GB 32100), 居民身份证号码 (GB 11643), 行政区划代码 (GB/T 2260) and phone
//! numbers. Each type can only be built by `parse`, so holding one means it is valid.
//!
//! Error texts never echo the value: an ID number or phone must not reach a log or a client
//! error message.

use std::fmt;

/// Why a code was refused. The text is safe to show to a client (it never contains the value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CodeError(pub &'static str);

const CREDIT_CHARSET: &[u8; 31] = b"0123456789ABCDEFGHJKLMNPQRTUWXY";
const CREDIT_WEIGHTS: [u32; 17] = [
    1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28,
];

/// 统一社会信用代码: 18 characters from GB 32100's 31-character set, the last a check
/// character (weighted sum modulo 31).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CreditCode(String);

impl CreditCode {
    pub fn parse(raw: &str) -> Result<Self, CodeError> {
        let s = raw.trim().to_ascii_uppercase();
        if s.len() != 18 || !s.is_ascii() {
            return Err(CodeError("must be 18 characters (GB 32100)"));
        }
        let mut values = [0u32; 18];
        for (i, b) in s.bytes().enumerate() {
            match CREDIT_CHARSET.iter().position(|&c| c == b) {
                Some(v) => values[i] = v as u32,
                None => {
                    return Err(CodeError(
                        "contains a character outside the GB 32100 set (digits and A-Y without I, O, S, V, Z)",
                    ));
                }
            }
        }
        if values[17] != credit_check_value(&values[..17]) {
            return Err(CodeError("check character does not match (GB 32100)"));
        }
        Ok(Self(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn credit_check_value(first17: &[u32]) -> u32 {
    let sum: u32 = first17.iter().zip(CREDIT_WEIGHTS).map(|(v, w)| v * w).sum();
    (31 - sum % 31) % 31
}

/// Completes 17 characters with their GB 32100 check character. For tests and tools.
pub fn credit_code_with_check(first17: &str) -> Option<String> {
    let bytes = first17.as_bytes();
    if bytes.len() != 17 {
        return None;
    }
    let mut values = [0u32; 17];
    for (i, b) in bytes.iter().enumerate() {
        values[i] = CREDIT_CHARSET.iter().position(|c| c == b)? as u32;
    }
    let check = CREDIT_CHARSET[credit_check_value(&values) as usize] as char;
    Some(format!("{first17}{check}"))
}

impl fmt::Debug for CreditCode {
    // Organisation codes are public registry data, not personal information.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CreditCode").field(&self.0).finish()
    }
}

const ID_WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
const ID_CHECK: &[u8; 11] = b"10X98765432";

/// 居民身份证号码: 18 characters, a region prefix, a valid birth date and an ISO 7064
/// MOD 11-2 check digit (GB 11643). Personal information: Debug prints it masked.
#[derive(Clone, PartialEq, Eq)]
pub struct IdNumber(String);

/// The GB 11643 shape every 18-character identity number shares (居民身份证, 港澳台居民居住证,
/// the 18-digit 外国人永久居留身份证): 17 digits and a digit or X, a birth date at positions
/// 7–14, and the ISO 7064 MOD 11-2 check digit. `s` is already upper-case.
fn gb11643_shape(s: &str) -> Result<(), CodeError> {
    let b = s.as_bytes();
    if b.len() != 18 {
        return Err(CodeError("must be 18 characters (GB 11643)"));
    }
    if !b[..17].iter().all(u8::is_ascii_digit) || !(b[17].is_ascii_digit() || b[17] == b'X') {
        return Err(CodeError(
            "must be 17 digits followed by a digit or X (GB 11643)",
        ));
    }
    let digit = |i: usize| u32::from(b[i] - b'0');
    let year = (6..10).fold(0, |acc, i| acc * 10 + digit(i));
    let month = digit(10) * 10 + digit(11);
    let day = digit(12) * 10 + digit(13);
    if !(1900..=2100).contains(&year) || !valid_date(year, month, day) {
        return Err(CodeError("birth date is not a valid date (GB 11643)"));
    }
    let sum: u32 = (0..17).map(|i| digit(i) * ID_WEIGHTS[i]).sum();
    if b[17] != ID_CHECK[(sum % 11) as usize] {
        return Err(CodeError("check digit does not match (GB 11643)"));
    }
    Ok(())
}

impl IdNumber {
    pub fn parse(raw: &str) -> Result<Self, CodeError> {
        let s = raw.trim().to_ascii_uppercase();
        gb11643_shape(&s)?;
        if !province_prefix_valid(&s[..2]) {
            return Err(CodeError("region prefix is not a province code (GB 11643)"));
        }
        Ok(Self(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// 110105********1234: region prefix and last four kept.
    pub fn masked(&self) -> String {
        mask_id_number(&self.0)
    }
}

/// 证件类型 (the contract's `IdDocumentType`), as the validator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocumentType {
    /// 居民身份证 (also what an unset type means).
    ResidentIdCard,
    /// 港澳台居民居住证.
    HmtResidencePermit,
    /// 外国人永久居留身份证.
    ForeignPermanentResident,
    /// 港澳居民来往内地通行证.
    HkMacaoTravelPermit,
    /// 台湾居民来往大陆通行证.
    TaiwanTravelPermit,
    /// 护照.
    Passport,
    /// 其他证件.
    Other,
}

/// A document number checked by its type's rule and normalised (trimmed, upper-case), or
/// why not. The error never contains the number.
pub fn parse_document(kind: DocumentType, raw: &str) -> Result<String, CodeError> {
    let s = raw.trim().to_ascii_uppercase();
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    match kind {
        DocumentType::ResidentIdCard => IdNumber::parse(&s).map(|id| id.0),
        DocumentType::HmtResidencePermit => {
            gb11643_shape(&s)?;
            if !matches!(&s[..2], "81" | "82" | "83") {
                return Err(CodeError(
                    "a 港澳台居民居住证 number starts with 81, 82 or 83 (GB 11643)",
                ));
            }
            Ok(s)
        }
        DocumentType::ForeignPermanentResident => match s.len() {
            18 => {
                gb11643_shape(&s)?;
                if !s.starts_with('9') || !province_prefix_valid(&s[1..3]) {
                    return Err(CodeError(
                        "an 18-digit 外国人永久居留身份证 number starts with 9 and a province code",
                    ));
                }
                Ok(s)
            }
            15 if s.is_ascii() => {
                let (nation, rest) = s.split_at(3);
                let b = rest.as_bytes();
                if !nation.bytes().all(|c| c.is_ascii_uppercase()) || !digits(rest) {
                    return Err(CodeError(
                        "a 15-character 外国人永久居留身份证 number is three letters and 12 digits",
                    ));
                }
                if !province_prefix_valid(&rest[..2]) {
                    return Err(CodeError(
                        "a 15-character 外国人永久居留身份证 number has a province code after its letters",
                    ));
                }
                let two = |i: usize| u32::from(b[i] - b'0') * 10 + u32::from(b[i + 1] - b'0');
                // YYMMDD: the century is not written; any leap year check uses 2000 + YY or
                // 1900 + YY, whichever makes the date valid.
                let (yy, mm, dd) = (two(2), two(4), two(6));
                if !valid_date(1900 + yy, mm, dd) && !valid_date(2000 + yy, mm, dd) {
                    return Err(CodeError(
                        "birth date of a 15-character 外国人永久居留身份证 number is not a valid date",
                    ));
                }
                Ok(s)
            }
            _ => Err(CodeError(
                "a 外国人永久居留身份证 number has 18 digits, or 15 characters (older cards)",
            )),
        },
        DocumentType::HkMacaoTravelPermit => {
            // Cards since 2013: H or M and 8 (or 10) digits; older cards: H or M, a letter and
            // 6 or 7 digits.
            let b = s.as_bytes();
            let ok = matches!(b.first(), Some(b'H' | b'M'))
                && ((matches!(s.len(), 9 | 11) && digits(&s[1..]))
                    || (matches!(s.len(), 8 | 9) && b[1].is_ascii_uppercase() && digits(&s[2..])));
            if ok {
                Ok(s)
            } else {
                Err(CodeError(
                    "a 港澳居民来往内地通行证 number is H or M followed by 8 or 10 digits (or a letter and 6 or 7 digits on older cards)",
                ))
            }
        }
        DocumentType::TaiwanTravelPermit => {
            if matches!(s.len(), 8 | 10) && digits(&s) {
                Ok(s)
            } else {
                Err(CodeError(
                    "a 台湾居民来往大陆通行证 number has 8 digits (10 on older cards)",
                ))
            }
        }
        DocumentType::Passport => {
            if (5..=20).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric()) {
                Ok(s)
            } else {
                Err(CodeError(
                    "a passport number has 5 to 20 letters and digits",
                ))
            }
        }
        DocumentType::Other => {
            let n = s.chars().count();
            if (1..=32).contains(&n) && !s.chars().any(char::is_control) {
                Ok(s)
            } else {
                Err(CodeError(
                    "an identity document number has 1 to 32 printable characters",
                ))
            }
        }
    }
}

/// How a document number is shown to callers without the read-pii privilege: the
/// 18-character numbers keep their region prefix and last four, the others their first
/// character and last two.
pub fn mask_document(kind: DocumentType, id: &str) -> String {
    match kind {
        // An 18-character 其他证件 or passport number is not a region-prefixed one.
        DocumentType::Other | DocumentType::Passport if id.chars().count() == 18 => {
            mask_middle(id, 1, 2)
        }
        _ => mask_id_number(id),
    }
}

/// Completes 17 digits with their GB 11643 check digit. For tests and tools.
pub fn id_number_with_check(first17: &str) -> Option<String> {
    let b = first17.as_bytes();
    if b.len() != 17 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let sum: u32 = (0..17)
        .map(|i| u32::from(b[i] - b'0') * ID_WEIGHTS[i])
        .sum();
    Some(format!(
        "{first17}{}",
        ID_CHECK[(sum % 11) as usize] as char
    ))
}

impl fmt::Debug for IdNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("IdNumber").field(&self.masked()).finish()
    }
}

fn valid_date(year: u32, month: u32, day: u32) -> bool {
    let leap = (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400);
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1..=days).contains(&day)
}

/// GB/T 2260 province-level codes (including 71 Taiwan, 81 Hong Kong, 82 Macao).
fn province_prefix_valid(two: &str) -> bool {
    matches!(
        two,
        "11" | "12"
            | "13"
            | "14"
            | "15"
            | "21"
            | "22"
            | "23"
            | "31"
            | "32"
            | "33"
            | "34"
            | "35"
            | "36"
            | "37"
            | "41"
            | "42"
            | "43"
            | "44"
            | "45"
            | "46"
            | "50"
            | "51"
            | "52"
            | "53"
            | "54"
            | "61"
            | "62"
            | "63"
            | "64"
            | "65"
            | "71"
            | "81"
            | "82"
    )
}

/// 行政区划代码: 6 digits (GB/T 2260), or 9/12 digits for township and village, with a valid
/// province prefix.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct RegionCode(String);

impl RegionCode {
    pub fn parse(raw: &str) -> Result<Self, CodeError> {
        let s = raw.trim();
        if !matches!(s.len(), 6 | 9 | 12) || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CodeError("must be 6, 9 or 12 digits (GB/T 2260)"));
        }
        if !province_prefix_valid(&s[..2]) {
            return Err(CodeError("does not start with a province code (GB/T 2260)"));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A contact phone: an 11-digit mainland mobile number (1[3-9]…), optionally written with
/// +86, or a landline with its area code (0871-63123456). Stored without separators.
/// Personal information: Debug prints it masked.
#[derive(Clone, PartialEq, Eq)]
pub struct Phone(String);

impl Phone {
    pub fn parse(raw: &str) -> Result<Self, CodeError> {
        let compact: String = raw
            .trim()
            .chars()
            .filter(|c| !matches!(c, ' ' | '-'))
            .collect();
        let digits = compact
            .strip_prefix("+86")
            .or_else(|| compact.strip_prefix("0086"))
            .unwrap_or(&compact);
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CodeError(
                "must be a mobile number (11 digits starting with 1) or a landline with area code",
            ));
        }
        let mobile = digits.len() == 11 && digits.starts_with('1') && digits.as_bytes()[1] >= b'3';
        let landline = digits.starts_with('0') && (10..=12).contains(&digits.len());
        if !(mobile || landline) {
            return Err(CodeError(
                "must be a mobile number (11 digits starting with 1) or a landline with area code",
            ));
        }
        Ok(Self(digits.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// 138****5678 for mobiles; landlines keep area code and last four.
    pub fn masked(&self) -> String {
        mask_phone(&self.0)
    }
}

impl fmt::Debug for Phone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Phone").field(&self.masked()).finish()
    }
}

/// 张三 → 张*, 欧阳娜娜 → 欧***.
pub fn mask_name(name: &str) -> String {
    match name.chars().next() {
        None => String::new(),
        Some(first) => std::iter::once(first)
            .chain(std::iter::repeat_n('*', name.chars().count() - 1))
            .collect(),
    }
}

/// 110105********1234: an 18-character number keeps its region prefix and last four; any
/// other document number (a passport, a travel permit) its first character and last two.
pub fn mask_id_number(id: &str) -> String {
    match id.chars().count() {
        0 => String::new(),
        18 => mask_middle(id, 6, 4),
        n if n < 8 => mask_middle(id, 1, 0),
        _ => mask_middle(id, 1, 2),
    }
}

/// 138****5678 for mobiles; landlines keep the area code and the last four.
pub fn mask_phone(phone: &str) -> String {
    match phone.len() {
        0 => String::new(),
        11 if phone.starts_with('1') => mask_middle(phone, 3, 4),
        _ => mask_middle(phone, 4, 4),
    }
}

/// The character a digit-like character stands for when numbers are looked for: ASCII digits,
/// full-width digits and Chinese numerals ("一三八…", "幺") are digits.
fn digit_of(c: char) -> Option<char> {
    let c = match c {
        '\u{FF10}'..='\u{FF19}' => char::from_u32(c as u32 - 0xFF10 + '0' as u32)?,
        '〇' | '零' => '0',
        '一' | '幺' => '1',
        '二' | '两' => '2',
        '三' => '3',
        '四' => '4',
        '五' => '5',
        '六' => '6',
        '七' => '7',
        '八' => '8',
        '九' => '9',
        c => c,
    };
    c.is_ascii_digit().then_some(c)
}

/// What may sit between the digits of one number as people write them.
fn separator(c: char) -> bool {
    matches!(
        c,
        ' ' | '\u{3000}'
            | '-'
            | '－'
            | '.'
            | '．'
            | '/'
            | '／'
            | ','
            | '，'
            | '、'
            | '·'
            | '_'
            | '('
            | ')'
            | '（'
            | '）'
    )
}

/// Every number of seven or more digits in `text` — phone and ID numbers, with an ID's
/// trailing X — written in ASCII, full-width or Chinese digits, with up to two spaces, dashes,
/// dots, slashes or commas between its digits ("138 0013 8000", "１３８…", "一三八…"), replaced
/// by `marker`.
pub fn mask_numbers(text: &str, marker: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if digit_of(chars[i]).is_none() {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let mut j = i;
        let mut end = i;
        let mut digits = 0;
        while j < chars.len() {
            if digit_of(chars[j]).is_some()
                || (matches!(chars[j], 'X' | 'x' | 'Ｘ' | 'ｘ') && digits >= 14)
            {
                digits += 1;
                j += 1;
                end = j;
            } else if separator(chars[j]) {
                let gap = chars[j..]
                    .iter()
                    .take(3)
                    .take_while(|&&c| separator(c))
                    .count();
                if gap <= 2 && chars.get(j + gap).is_some_and(|&c| digit_of(c).is_some()) {
                    j += gap;
                } else {
                    break;
                }
            } else {
                break;
            }
        }
        if digits >= 7 && !is_date(&chars[i..end]) {
            out.push_str(marker);
        } else {
            out.extend(&chars[i..end]);
        }
        i = end;
    }
    out
}

/// A date as people write it — a year of 19xx or 20xx, then month and day, split by dashes,
/// slashes or dots ("2025-03-24", "2025/3/24") — is no phone or ID number.
fn is_date(number: &[char]) -> bool {
    let groups: Vec<String> = number
        .split(|c| matches!(c, '-' | '/' | '.' | '－' | '／' | '．'))
        .map(|g| g.iter().collect())
        .collect();
    groups.len() == 3
        && groups[0].len() == 4
        && (groups[0].starts_with("19") || groups[0].starts_with("20"))
        && groups[0].chars().all(|c| c.is_ascii_digit())
        && groups[1..]
            .iter()
            .all(|g| (1..=2).contains(&g.len()) && g.chars().all(|c| c.is_ascii_digit()))
}

/// Foreign or typed text (an upstream's error message, a statement taken down for a rater, a
/// file name) may carry a rater's phone or ID number: every number (see [`mask_numbers`])
/// becomes `<number>` before such text is logged or stored.
pub fn redact_numbers(text: &str) -> String {
    mask_numbers(text, "<number>")
}

/// Keeps `head` leading and `tail` trailing characters, stars in between.
pub fn mask_middle(s: &str, head: usize, tail: usize) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() <= head + tail {
        return "*".repeat(chars.len());
    }
    let mut out = String::with_capacity(s.len());
    out.extend(&chars[..head]);
    out.extend(std::iter::repeat_n('*', chars.len() - head - tail));
    out.extend(&chars[chars.len() - tail..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every type's rule on inputs of mixed character widths (15 bytes that are not 15
    /// characters, full-width digits, CJK): refused, never a panic.
    #[test]
    fn document_rules_never_panic_on_mixed_width_input() {
        let kinds = [
            DocumentType::ResidentIdCard,
            DocumentType::HmtResidencePermit,
            DocumentType::ForeignPermanentResident,
            DocumentType::HkMacaoTravelPermit,
            DocumentType::TaiwanTravelPermit,
            DocumentType::Passport,
            DocumentType::Other,
        ];
        let inputs = [
            "A一12345678901",
            "一23456789012",
            "USA１１8001010010",
            "H一2345678",
            "HＡ123456",
            "9一184019800101001",
            "８１０００",
            "é12345678901234",
        ];
        for k in kinds {
            for i in inputs {
                let _ = parse_document(k, i);
                let _ = mask_document(k, i);
            }
        }
        assert!(parse_document(DocumentType::ForeignPermanentResident, "A一12345678901").is_err());
    }

    #[test]
    fn credit_code_known_valid_and_corrupted() {
        // A published example code.
        assert!(CreditCode::parse("91350100M000100Y43").is_ok());
        assert!(CreditCode::parse("91350100m000100y43").is_ok());
        assert_eq!(
            CreditCode::parse("91350100M000100Y44").unwrap_err().0,
            "check character does not match (GB 32100)"
        );
        assert!(CreditCode::parse("91350100M000100I43").is_err());
        assert!(CreditCode::parse("9135010").is_err());
    }

    #[test]
    fn credit_code_generator_round_trips() {
        let code = credit_code_with_check("11530100MB0000000").unwrap();
        assert!(CreditCode::parse(&code).is_ok());
    }

    #[test]
    fn id_number_check_digit_date_and_prefix() {
        let good = id_number_with_check("11010519491231002").unwrap();
        assert_eq!(good, "11010519491231002X");
        assert!(IdNumber::parse(&good).is_ok());
        assert!(IdNumber::parse(&good.to_lowercase()).is_ok());
        assert!(IdNumber::parse("110105194912310021").is_err());
        let bad_date = id_number_with_check("11010519490231002").unwrap();
        assert!(IdNumber::parse(&bad_date).is_err());
        let bad_prefix = id_number_with_check("99010519491231002").unwrap();
        assert!(IdNumber::parse(&bad_prefix).is_err());
    }

    #[test]
    fn id_number_debug_and_mask_hide_the_middle() {
        let id = IdNumber::parse(&id_number_with_check("11010519491231002").unwrap()).unwrap();
        assert_eq!(id.masked(), "110105********002X");
        assert!(!format!("{id:?}").contains("19491231"));
    }

    #[test]
    fn region_codes() {
        assert!(RegionCode::parse("530102").is_ok());
        assert!(RegionCode::parse("530102001").is_ok());
        assert!(RegionCode::parse("530102001001").is_ok());
        assert!(RegionCode::parse("5301020").is_err());
        assert!(RegionCode::parse("990102").is_err());
        assert!(RegionCode::parse("53010a").is_err());
    }

    #[test]
    fn numbers_in_foreign_text_are_redacted() {
        assert_eq!(
            redact_numbers("bad mobile 13812345678, certKey 11010519491231002X, code 400"),
            "bad mobile <number>, certKey <number>, code 400"
        );
        assert_eq!(redact_numbers("已存在该条服务信息"), "已存在该条服务信息");
        // Phones and IDs however written; dates stay as they are.
        for secret in [
            "138 0013 8000",
            "138-0013-8000",
            "１３８００１３８０００",
            "一三八〇〇一三八〇〇〇",
        ] {
            assert_eq!(
                redact_numbers(&format!("电话{secret}错误")),
                "电话<number>错误",
                "{secret}"
            );
        }
        assert_eq!(
            redact_numbers("整改于 2025-03-24 完成"),
            "整改于 2025-03-24 完成"
        );
        assert_eq!(redact_numbers("2025/3/24"), "2025/3/24");
    }

    #[test]
    fn phones() {
        assert_eq!(
            Phone::parse("138 0013 8000").unwrap().as_str(),
            "13800138000"
        );
        assert_eq!(
            Phone::parse("+8613800138000").unwrap().as_str(),
            "13800138000"
        );
        assert_eq!(
            Phone::parse("0871-63123456").unwrap().as_str(),
            "087163123456"
        );
        assert!(Phone::parse("12800138000").is_err());
        assert!(Phone::parse("1380013800").is_err());
        assert!(Phone::parse("abc").is_err());
        assert_eq!(Phone::parse("13800138000").unwrap().masked(), "138****8000");
    }
}
