//! Phone numbers to E.164, the one form every system can be compared and written in:
//! `+`, a country calling code that does not start with 0, and at most 15 digits in all
//! (ITU-T E.164 §6). Shorter than 8 digits is not a real subscriber number anywhere, so
//! it is rejected as a typo rather than carried around.
//!
//! What is accepted: spaces, dashes, dots and parentheses as separators; an international
//! prefix written as `+` or `00`; the British-style `(0)` trunk hint after a country code
//! (`+44 (0)20 …`); and a national number when the link names a default country code, in
//! which case one leading national trunk `0` is dropped.

use std::fmt;

/// Fewest digits (country code included) accepted as a phone number.
pub const MIN_DIGITS: usize = 8;
/// Most digits E.164 allows, country code included.
pub const MAX_DIGITS: usize = 15;

/// Why a text is not a phone number. Never carries the text itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhoneProblem {
    Letters,
    OtherCharacter,
    MisplacedPlus,
    NoCountryCode,
    CountryCodeZero,
    Digits(usize),
}

impl fmt::Display for PhoneProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PhoneProblem::Letters => f.write_str("contains letters"),
            PhoneProblem::OtherCharacter => f.write_str("contains characters other than digits and separators"),
            PhoneProblem::MisplacedPlus => f.write_str("+ is only allowed at the start"),
            PhoneProblem::NoCountryCode => f.write_str("no country code, and the link has no default_country_code"),
            PhoneProblem::CountryCodeZero => f.write_str("country code cannot start with 0"),
            PhoneProblem::Digits(n) => {
                write!(f, "{n} digits, E.164 needs {MIN_DIGITS} to {MAX_DIGITS}")
            }
        }
    }
}

/// Reads a country calling code as written in configuration (`"+44"` or `"44"`) and
/// returns its digits. Calling codes are 1 to 3 digits and never start with 0.
pub fn parse_country_code(text: &str) -> Option<String> {
    let digits = text.trim();
    let digits = digits.strip_prefix('+').unwrap_or(digits);
    let valid =
        (1..=3).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0');
    valid.then(|| digits.to_string())
}

/// Normalises `input` to E.164. `default_country_code` is the digits of the code
/// assumed for national numbers (see [`parse_country_code`]).
pub fn normalise_e164(input: &str, default_country_code: Option<&str>) -> Result<String, PhoneProblem> {
    let text = input.trim();
    let (plus, body) = match text.strip_prefix('+') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let international = plus || body.trim_start().starts_with("00");
    // The `(0)` hint is a trunk prefix that is dialled only from inside the country;
    // after an international prefix it is never part of the number.
    let body = if international {
        body.replace("(0)", "")
    } else {
        body.to_string()
    };

    let mut digits = String::with_capacity(body.len());
    for c in body.chars() {
        match c {
            '0'..='9' => digits.push(c),
            '-' | '.' | '(' | ')' => {}
            c if c.is_whitespace() => {}
            '+' => return Err(PhoneProblem::MisplacedPlus),
            c if c.is_alphabetic() => return Err(PhoneProblem::Letters),
            _ => return Err(PhoneProblem::OtherCharacter),
        }
    }

    let number = if plus {
        digits
    } else if let Some(rest) = digits.strip_prefix("00") {
        rest.to_string()
    } else if digits.is_empty() {
        return Err(PhoneProblem::Digits(0));
    } else {
        let code = default_country_code.ok_or(PhoneProblem::NoCountryCode)?;
        let national = digits.strip_prefix('0').unwrap_or(&digits);
        format!("{code}{national}")
    };

    if number.starts_with('0') {
        return Err(PhoneProblem::CountryCodeZero);
    }
    if !(MIN_DIGITS..=MAX_DIGITS).contains(&number.len()) {
        return Err(PhoneProblem::Digits(number.len()));
    }
    Ok(format!("+{number}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_and_rejects() {
        use PhoneProblem::*;
        let uk = Some("44");
        let cases: &[(&str, Option<&str>, Result<&str, PhoneProblem>)] = &[
            ("+44 7700 900123", None, Ok("+447700900123")),
            ("+1 (415) 555-0100", None, Ok("+14155550100")),
            ("+33.1.23.45.67.89", None, Ok("+33123456789")),
            ("0044 7700 900123", None, Ok("+447700900123")),
            ("00 44 (0)20 7946 0958", None, Ok("+442079460958")),
            ("+44 (0)20 7946 0958", None, Ok("+442079460958")),
            ("07700 900123", uk, Ok("+447700900123")),
            ("7700 900123", uk, Ok("+447700900123")),
            ("  +447700900123  ", uk, Ok("+447700900123")),
            ("07700 900123", None, Err(NoCountryCode)),
            // 7 and 16 digits after normalisation: outside E.164.
            ("+1234567", None, Err(Digits(7))),
            ("+1234567890123456", None, Err(Digits(16))),
            ("+12345678", None, Ok("+12345678")),
            ("+123456789012345", None, Ok("+123456789012345")),
            ("123", uk, Err(Digits(5))),
            ("+44 7700 CALLME", None, Err(Letters)),
            ("+44 7700 900123 ext 5", None, Err(Letters)),
            ("+44 7700 900123#", None, Err(OtherCharacter)),
            ("44+7700900123", None, Err(MisplacedPlus)),
            ("+0447700900123", None, Err(CountryCodeZero)),
            ("000447700900123", None, Err(CountryCodeZero)),
            ("", uk, Err(Digits(0))),
            ("+", None, Err(Digits(0))),
        ];
        for (input, code, expected) in cases {
            let got = normalise_e164(input, *code);
            assert_eq!(got.as_deref().map_err(|e| *e), *expected, "input {input:?}");
        }
    }

    #[test]
    fn problem_text_counts_digits() {
        assert_eq!(PhoneProblem::Digits(3).to_string(), "3 digits, E.164 needs 8 to 15");
    }

    #[test]
    fn country_codes() {
        assert_eq!(parse_country_code("+44").as_deref(), Some("44"));
        assert_eq!(parse_country_code("1").as_deref(), Some("1"));
        assert_eq!(parse_country_code("+353").as_deref(), Some("353"));
        assert_eq!(parse_country_code("+4444"), None);
        assert_eq!(parse_country_code("+0"), None);
        assert_eq!(parse_country_code("+4a"), None);
        assert_eq!(parse_country_code(""), None);
        assert_eq!(parse_country_code("+"), None);
    }
}
