//! Match keys and rollout selection.
//!
//! A match key recognises the same record in systems that spell it differently
//! (`Ada@Example.com ` and `ada@example.com`), so keys are compared in a normal form.
//! The rollout picks records by that same normal form, so a record is in or out of a
//! gradual rollout in every system at once, and stays so across restarts, upgrades and
//! machines: the percentage uses FNV-1a, a fixed public hash, never a seeded or
//! platform-dependent one such as the standard library's `DefaultHasher`.

use serde_json::Value;

use crate::config::RolloutConfig;

/// The normal form of a match-key value, or `None` when the value cannot recognise a
/// record (null, empty, a list or an object).
///
/// `format` is the canonical property's JSON Schema format: `email` is trimmed and
/// lower-cased; `e164` or `phone` keeps only the digits, behind a `+`; anything else is
/// trimmed, has internal whitespace collapsed to one space, and is lower-cased.
pub fn normalise_key(value: &Value, format: Option<&str>) -> Option<String> {
    let number;
    let text: &str = match value {
        Value::String(s) => s,
        Value::Number(n) => {
            number = n.to_string();
            &number
        }
        Value::Bool(b) => {
            if *b {
                "true"
            } else {
                "false"
            }
        }
        Value::Null | Value::Array(_) | Value::Object(_) => return None,
    };
    let key = match format {
        Some("email") => lowercase(text.trim().to_string()),
        Some("e164" | "phone") => {
            let mut key = String::with_capacity(text.len() + 1);
            key.push('+');
            key.extend(text.chars().filter(char::is_ascii_digit));
            if key.len() == 1 {
                return None;
            }
            key
        }
        _ if text.is_ascii() => collapse_ascii(text),
        _ => collapse_words(text),
    };
    (!key.is_empty()).then_some(key)
}

/// Trims, collapses each run of whitespace inside to one space, and lower-cases, by
/// Unicode's rules: the general form of a key without a format.
fn collapse_words(text: &str) -> String {
    let mut key = String::with_capacity(text.len());
    for word in text.split_whitespace() {
        if !key.is_empty() {
            key.push(' ');
        }
        key.push_str(word);
    }
    lowercase(key)
}

/// [`collapse_words`] for ASCII text, which most keys are, on its bytes without
/// decoding characters. The result is the same: Unicode's whitespace within ASCII is
/// tab, line feed, vertical tab, form feed, carriage return and space, and its lower
/// case of an ASCII letter is the ASCII one.
fn collapse_ascii(text: &str) -> String {
    let mut key = Vec::with_capacity(text.len());
    for word in text
        .as_bytes()
        .split(|byte| matches!(byte, b'\t'..=b'\r' | b' '))
        .filter(|word| !word.is_empty())
    {
        if !key.is_empty() {
            key.push(b' ');
        }
        key.extend_from_slice(word);
    }
    key.make_ascii_lowercase();
    String::from_utf8(key).expect("ASCII bytes stay UTF-8")
}

/// Lower-cases in place when the text is ASCII (the common case, and the same result),
/// by Unicode's rules otherwise.
fn lowercase(mut text: String) -> String {
    if text.is_ascii() {
        text.make_ascii_lowercase();
        text
    } else {
        text.to_lowercase()
    }
}

/// Whether the record with normalised match key `key` is in `rollout`.
///
/// In when the key is on the allow list (each entry normalised as a key without a
/// format: trimmed, whitespace collapsed, lower-cased; so phone entries must be written
/// as `+` and digits), or when the FNV-1a 64-bit hash of the key's UTF-8 bytes, modulo 10,000,
/// is below `percent × 100`. A record without a key is never in a configured rollout.
pub fn in_rollout(rollout: &RolloutConfig, key: Option<&str>) -> bool {
    let Some(key) = key else {
        return false;
    };
    let allowed = rollout
        .allow
        .iter()
        .any(|entry| normalise_key(&Value::String(entry.clone()), None).as_deref() == Some(key));
    if allowed {
        return true;
    }
    match rollout.percent {
        // A NaN percent compares false: nobody is in.
        Some(percent) => ((fnv1a_64(key.as_bytes()) % 10_000) as f64) < percent * 100.0,
        None => false,
    }
}

/// FNV-1a, 64 bits (Fowler, Noll, Vo; IETF draft-eastlake-fnv). Its constants are
/// part of the rollout's contract: changing them would move records in and out.
fn fnv1a_64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET_BASIS, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn normalise_key_cases() {
        let cases: &[(Value, Option<&str>, Option<&str>)] = &[
            (
                json!("  Ada.Lovelace@Example.COM "),
                Some("email"),
                Some("ada.lovelace@example.com"),
            ),
            (json!("+44 7700-900 123"), Some("e164"), Some("+447700900123")),
            (json!("+44 (0)7700 900123"), Some("phone"), Some("+4407700900123")),
            (json!("n/a"), Some("phone"), None),
            (json!("  EMP   0042\tX "), None, Some("emp 0042 x")),
            // Vertical tab is whitespace to Unicode (not to `u8::is_ascii_whitespace`).
            (json!("\u{b}A\u{b}\u{c}B\r\n"), None, Some("a b")),
            (json!("E-17"), Some("date"), Some("e-17")),
            // Beyond ASCII, Unicode's lower case.
            (json!(" ÉLODIE@Exämple.org"), Some("email"), Some("élodie@exämple.org")),
            (json!("  Straße  ÖL "), None, Some("straße öl")),
            (json!("ΣΟΦΙΑ"), None, Some("σοφια")),
            (json!(42), None, Some("42")),
            (json!(4.5), None, Some("4.5")),
            (json!(17), Some("email"), Some("17")),
            (json!(true), None, Some("true")),
            (Value::Null, Some("email"), None),
            (Value::Null, None, None),
            (json!(""), None, None),
            (json!("   "), Some("email"), None),
            (json!("   "), None, None),
            (json!(["a"]), None, None),
            (json!({"a": 1}), None, None),
        ];
        for (value, format, expected) in cases {
            assert_eq!(
                normalise_key(value, *format).as_deref(),
                *expected,
                "value {value} format {format:?}"
            );
        }
    }

    proptest::proptest! {
        /// The byte form of ASCII keys gives what the general form gives, on text of
        /// any ASCII characters, half of them whitespace.
        #[test]
        fn ascii_keys_collapse_as_the_general_form_does(text in "([ \\t\\n\\x0b\\x0c\\r]|[\\x00-\\x7f]){0,40}") {
            proptest::prop_assert_eq!(collapse_ascii(&text), collapse_words(&text));
        }
    }

    #[test]
    fn fnv1a_reference_vectors() {
        // From the FNV reference test suite.
        assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    fn rollout(percent: Option<f64>, allow: &[&str]) -> RolloutConfig {
        RolloutConfig {
            percent,
            allow: allow.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn known_keys_give_known_answers() {
        // FNV-1a buckets (hash % 10,000): "ada@example.com" is 3778, "bob@example.com"
        // is 1321. Fixed here so that any change to the hash or the bucket rule, which
        // would move records in or out of running rollouts, fails the test.
        assert_eq!(fnv1a_64(b"ada@example.com") % 10_000, 3778);
        assert_eq!(fnv1a_64(b"bob@example.com") % 10_000, 1321);
        let twenty = rollout(Some(20.0), &[]);
        assert!(!in_rollout(&twenty, Some("ada@example.com")));
        assert!(in_rollout(&twenty, Some("bob@example.com")));
        // The boundary: bucket 3778 is in at 37.79 percent and out at 37.78.
        assert!(in_rollout(&rollout(Some(37.79), &[]), Some("ada@example.com")));
        assert!(!in_rollout(&rollout(Some(37.78), &[]), Some("ada@example.com")));
    }

    #[test]
    fn percent_selects_about_that_share() {
        for percent in [0.0, 1.0, 10.0, 33.3, 50.0, 100.0] {
            let r = rollout(Some(percent), &[]);
            let selected = (0..10_000)
                .filter(|i| in_rollout(&r, Some(&format!("user{i}@example.com"))))
                .count();
            let expected = percent * 100.0;
            // Binomial standard deviation for n = 10,000 is at most 50; allow 4 sigma.
            assert!(
                (selected as f64 - expected).abs() <= 200.0,
                "percent {percent}: selected {selected}"
            );
            if percent == 0.0 {
                assert_eq!(selected, 0);
            }
            if percent == 100.0 {
                assert_eq!(selected, 10_000);
            }
        }
    }

    #[test]
    fn allow_list_and_missing_keys() {
        let r = rollout(None, &[" Ada@Example.com ", "emp-7"]);
        assert!(in_rollout(&r, Some("ada@example.com")));
        assert!(in_rollout(&r, Some("emp-7")));
        assert!(!in_rollout(&r, Some("bob@example.com")));
        assert!(!in_rollout(&r, None));
        assert!(!in_rollout(&rollout(Some(100.0), &[]), None));
        assert!(!in_rollout(&rollout(Some(f64::NAN), &[]), Some("ada@example.com")));
        // Allow list adds to the percentage.
        let zero = rollout(Some(0.0), &["bob@example.com"]);
        assert!(in_rollout(&zero, Some("bob@example.com")));
        assert!(!in_rollout(&zero, Some("ada@example.com")));
    }
}
