//! Column values in PostgreSQL's text format → canonical JSON values, and back.
//!
//! Both the replication stream (pgoutput sends text) and the snapshot (columns selected
//! as `::text`) deliver text, under the session settings of
//! [`super::SESSION_SETTINGS`] (ISO dates, UTC, ISO 8601 intervals, hex bytea, shortest
//! exact floats), so one conversion serves both and a row reads the same either way.
//!
//! | PostgreSQL | canonical JSON |
//! |---|---|
//! | `bool` | `true` / `false` |
//! | `int2`, `int4`, `int8`, `oid` | number (exact: i64) |
//! | `float4`, `float8` | number (the shortest text that reads back to the same float); `"NaN"`, `"Infinity"`, `"-Infinity"` as strings |
//! | `numeric` | **string** with the exact decimal text, scale kept (`"12.50"`); `"NaN"`, `"Infinity"` likewise. A string because JSON numbers go through f64 in most readers, which would round |
//! | `timestamptz` | RFC 3339 string with its offset, microseconds kept: `"2026-01-02T03:04:05.123456+00:00"` |
//! | `timestamp` | RFC 3339 without offset: `"2026-01-02T03:04:05.123456"` |
//! | `date`, `time`, `timetz` | string as PostgreSQL writes it in ISO style |
//! | `interval` | ISO 8601 duration string: `"P1Y2M3DT4H5M6S"` |
//! | `bytea` | string, standard base64 with padding |
//! | `json`, `jsonb` | the JSON value itself (numbers inside it that an f64 cannot hold exactly are rounded: serde_json's limit) |
//! | `uuid`, `text`, `varchar`, enums, `inet`, everything else | string, as PostgreSQL writes it |
//! | arrays of any of these | JSON arrays (nested for more dimensions), elements converted by their type, `NULL` → null |
//!
//! `infinity`, `-infinity` and BC timestamps and dates stay PostgreSQL's text. A value
//! that does not parse as its type says it would (which the server never sends) is kept
//! as its text rather than dropped.
//!
//! [`to_pg_text`] is the inverse, for writing: the text a `$1::text::<type>` cast turns
//! back into the same value.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::Value;

/// How a column's text is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Bool,
    Int,
    Float,
    Numeric,
    Bytea,
    Json,
    Timestamp,
    TimestampTz,
    /// Everything kept as PostgreSQL's own text.
    Text,
    Array(Box<Kind>),
}

/// The kind of a built-in type OID; unknown OIDs (enums, domains, extension types) are
/// text. Arrays of non-built-in types are resolved by the caller from the catalog with
/// [`Kind::Array`] of [`Kind::Text`].
pub fn kind_of(oid: u32) -> Kind {
    match oid {
        16 => Kind::Bool,
        20 | 21 | 23 | 26 => Kind::Int,
        700 | 701 => Kind::Float,
        1700 => Kind::Numeric,
        17 => Kind::Bytea,
        114 | 3802 => Kind::Json,
        1114 => Kind::Timestamp,
        1184 => Kind::TimestampTz,
        1000 => Kind::Array(Box::new(Kind::Bool)),
        1001 => Kind::Array(Box::new(Kind::Bytea)),
        1005 | 1007 | 1016 | 1028 => Kind::Array(Box::new(Kind::Int)),
        1021 | 1022 => Kind::Array(Box::new(Kind::Float)),
        1231 => Kind::Array(Box::new(Kind::Numeric)),
        199 | 3807 => Kind::Array(Box::new(Kind::Json)),
        1115 => Kind::Array(Box::new(Kind::Timestamp)),
        1185 => Kind::Array(Box::new(Kind::TimestampTz)),
        // text, varchar, bpchar, name, char, uuid, date, time, timetz, interval, inet,
        // cidr, macaddr, money, bit, varbit, xml arrays.
        1002 | 1003 | 1009 | 1014 | 1015 | 2951 | 1182 | 1183 | 1270 | 1187 | 1041 | 651 | 1040 | 791 | 1561 | 1563
        | 143 => Kind::Array(Box::new(Kind::Text)),
        _ => Kind::Text,
    }
}

/// Converts one value's text to its canonical JSON value.
pub fn to_json(kind: &Kind, text: &str) -> Value {
    match kind {
        Kind::Bool => match text {
            "t" | "true" => Value::Bool(true),
            "f" | "false" => Value::Bool(false),
            _ => Value::String(text.to_string()),
        },
        Kind::Int => text
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(text.to_string())),
        Kind::Float => text
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(text.to_string())),
        Kind::Numeric | Kind::Text => Value::String(text.to_string()),
        Kind::Bytea => match text.strip_prefix("\\x").and_then(|h| hex::decode(h).ok()) {
            Some(bytes) => Value::String(BASE64.encode(bytes)),
            None => Value::String(text.to_string()),
        },
        Kind::Json => serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string())),
        Kind::Timestamp => Value::String(timestamp(text, false)),
        Kind::TimestampTz => Value::String(timestamp(text, true)),
        Kind::Array(element) => match parse_array(text, element) {
            Some(value) => value,
            None => Value::String(text.to_string()),
        },
    }
}

/// `2026-01-02 03:04:05.5+00` → `2026-01-02T03:04:05.5+00:00`. Values that are not a
/// plain AD timestamp (infinity, BC) are returned unchanged.
fn timestamp(text: &str, with_zone: bool) -> String {
    let bytes = text.as_bytes();
    let plain = bytes.len() >= 19
        && bytes[4] == b'-'
        && bytes[10] == b' '
        && bytes[..4].iter().all(u8::is_ascii_digit)
        && !text.ends_with(" BC");
    if !plain {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 3);
    out.push_str(&text[..10]);
    out.push('T');
    out.push_str(&text[11..]);
    if with_zone {
        // The offset is `+HH`, `+HH:MM` or `+HH:MM:SS`; RFC 3339 needs `+HH:MM`.
        let sign = out.get(19..).and_then(|tail| tail.rfind(['+', '-'])).map(|i| i + 19);
        if sign.is_some_and(|sign| out.len() - sign == 3) {
            out.push_str(":00");
        }
    }
    out
}

/// Parses an array literal (`{1,2,NULL}`, `{{"a b",c},{d,e}}`, `[0:1]={x,y}`).
fn parse_array(text: &str, element: &Kind) -> Option<Value> {
    let mut rest = text;
    if rest.starts_with('[') {
        rest = &rest[rest.find('=')? + 1..];
    }
    let mut chars = rest.char_indices().peekable();
    let value = parse_level(rest, &mut chars, element)?;
    if chars.next().is_some() {
        return None;
    }
    Some(value)
}

fn parse_level(
    text: &str,
    chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>,
    element: &Kind,
) -> Option<Value> {
    if chars.next()?.1 != '{' {
        return None;
    }
    let mut items = Vec::new();
    if chars.peek()?.1 == '}' {
        chars.next();
        return Some(Value::Array(items));
    }
    loop {
        let (start, c) = *chars.peek()?;
        let item = match c {
            '{' => parse_level(text, chars, element)?,
            '"' => {
                chars.next();
                let mut s = String::new();
                loop {
                    let (_, c) = chars.next()?;
                    match c {
                        '\\' => s.push(chars.next()?.1),
                        '"' => break,
                        c => s.push(c),
                    }
                }
                to_json(element, &s)
            }
            _ => {
                let mut end = start;
                while let Some(&(i, c)) = chars.peek() {
                    if c == ',' || c == '}' {
                        break;
                    }
                    end = i + c.len_utf8();
                    chars.next();
                }
                let raw = text.get(start..end)?.trim();
                if raw.eq_ignore_ascii_case("NULL") {
                    Value::Null
                } else {
                    to_json(element, raw)
                }
            }
        };
        items.push(item);
        match chars.next()?.1 {
            ',' => continue,
            '}' => return Some(Value::Array(items)),
            _ => return None,
        }
    }
}

/// The text PostgreSQL reads back into the value `value` of a column of `kind`
/// (`$n::text::<type>`); `None` for null.
pub fn to_pg_text(kind: &Kind, value: &Value) -> Option<String> {
    match (kind, value) {
        (_, Value::Null) => None,
        (Kind::Bytea, Value::String(s)) => match BASE64.decode(s) {
            Ok(bytes) => Some(format!("\\x{}", hex::encode(bytes))),
            Err(_) => Some(s.clone()),
        },
        (Kind::Array(element), Value::Array(items)) => {
            let mut out = String::from("{");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                match item {
                    // A JSON array inside a json[] is one element, not a dimension.
                    Value::Array(_) if **element != Kind::Json => {
                        out.push_str(&to_pg_text(kind, item).unwrap_or_default())
                    }
                    _ => match to_pg_text(element, item) {
                        None => out.push_str("NULL"),
                        Some(text) => {
                            out.push('"');
                            for c in text.chars() {
                                if c == '"' || c == '\\' {
                                    out.push('\\');
                                }
                                out.push(c);
                            }
                            out.push('"');
                        }
                    },
                }
            }
            out.push('}');
            Some(out)
        }
        (Kind::Json, v) => Some(v.to_string()),
        (_, Value::String(s)) => Some(s.clone()),
        (_, Value::Bool(b)) => Some(if *b { "true" } else { "false" }.to_string()),
        (_, v) => Some(v.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// One row per type: OID, the text PostgreSQL sends, the canonical value.
    #[test]
    fn every_common_type() {
        let cases: &[(u32, &str, Value)] = &[
            (16, "t", json!(true)),
            (16, "f", json!(false)),
            (21, "-32768", json!(-32768)),
            (23, "42", json!(42)),
            (20, "9223372036854775807", json!(9_223_372_036_854_775_807i64)),
            (701, "0.1", json!(0.1)),
            (700, "1.5", json!(1.5)),
            (701, "NaN", json!("NaN")),
            (701, "-Infinity", json!("-Infinity")),
            (
                1700,
                "123456789012345678901234567890.000000000000000000001",
                json!("123456789012345678901234567890.000000000000000000001"),
            ),
            (1700, "12.50", json!("12.50")),
            (
                1184,
                "2026-01-02 03:04:05.123456+00",
                json!("2026-01-02T03:04:05.123456+00:00"),
            ),
            (1184, "2026-01-02 03:04:05+05:30", json!("2026-01-02T03:04:05+05:30")),
            (1184, "infinity", json!("infinity")),
            (1184, "0044-03-15 12:00:00+00 BC", json!("0044-03-15 12:00:00+00 BC")),
            (1114, "2026-01-02 03:04:05", json!("2026-01-02T03:04:05")),
            (1082, "2026-01-02", json!("2026-01-02")),
            (1186, "P1Y2M3DT4H5M6.5S", json!("P1Y2M3DT4H5M6.5S")),
            (17, "\\x00ff10", json!("AP8Q")),
            (3802, r#"{"a": [1, "x"], "b": null}"#, json!({"a": [1, "x"], "b": null})),
            (114, "[1,2]", json!([1, 2])),
            (
                2950,
                "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
                json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            ),
            (25, "plain text", json!("plain text")),
            (99999, "happy", json!("happy")),
            (1007, "{1,2,NULL}", json!([1, 2, null])),
            (1009, r#"{"a b","c\"d",e,"NULL"}"#, json!(["a b", "c\"d", "e", "NULL"])),
            (1007, "{{1,2},{3,4}}", json!([[1, 2], [3, 4]])),
            (1007, "[0:1]={7,8}", json!([7, 8])),
            (1007, "{}", json!([])),
            (1231, "{1.10,NaN}", json!(["1.10", "NaN"])),
            (
                1185,
                r#"{"2026-01-02 03:04:05+00"}"#,
                json!(["2026-01-02T03:04:05+00:00"]),
            ),
        ];
        for (oid, text, expected) in cases {
            assert_eq!(&to_json(&kind_of(*oid), text), expected, "oid {oid} text {text:?}");
        }
    }

    #[test]
    fn malformed_text_is_kept_not_dropped() {
        assert_eq!(to_json(&Kind::Int, "12x"), json!("12x"));
        assert_eq!(to_json(&kind_of(1007), "{1,2"), json!("{1,2"));
        assert_eq!(to_json(&Kind::Bytea, "\\xzz"), json!("\\xzz"));
        assert_eq!(to_json(&Kind::Json, "{"), json!("{"));
    }

    #[test]
    fn writing_back_gives_the_text_postgresql_reads() {
        assert_eq!(to_pg_text(&Kind::Bytea, &json!("AP8Q")).as_deref(), Some("\\x00ff10"));
        assert_eq!(to_pg_text(&Kind::Numeric, &json!("12.50")).as_deref(), Some("12.50"));
        assert_eq!(to_pg_text(&Kind::Int, &json!(7)).as_deref(), Some("7"));
        assert_eq!(to_pg_text(&Kind::Bool, &json!(true)).as_deref(), Some("true"));
        assert_eq!(to_pg_text(&Kind::Json, &json!({"a": 1})).as_deref(), Some("{\"a\":1}"));
        assert_eq!(to_pg_text(&Kind::Text, &Value::Null), None);
        let array = kind_of(1009);
        let text = to_pg_text(&array, &json!(["a \"b\"", null, "c\\d"])).expect("array text");
        assert_eq!(text, r#"{"a \"b\"",NULL,"c\\d"}"#);
        assert_eq!(to_json(&array, &text), json!(["a \"b\"", null, "c\\d"]));
        // json[] and jsonb[]: each element is one JSON document, quoted as an array
        // element, whether it is an object, an array, a string or a number.
        for oid in [199, 3807] {
            let kind = kind_of(oid);
            let value = json!([[1, [2]], {"a": [1, "x,y"]}, "s \"q\"", 7, [], {}]);
            let text = to_pg_text(&kind, &value).expect("array text");
            assert_eq!(
                text,
                r#"{"[1,[2]]","{\"a\":[1,\"x,y\"]}","\"s \\\"q\\\"\"","7","[]","{}"}"#
            );
            assert_eq!(to_json(&kind, &text), value, "oid {oid}");
        }
        let nested = kind_of(1007);
        assert_eq!(
            to_pg_text(&nested, &json!([[1, 2], [3, 4]])).as_deref(),
            Some(r#"{{"1","2"},{"3","4"}}"#)
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,64}", oid in proptest::sample::select(vec![16u32, 20, 701, 1700, 17, 3802, 1114, 1184, 1007, 1009, 1231])) {
            let _ = to_json(&kind_of(oid), &text);
        }

        #[test]
        fn timestamp_like_text_never_panics(tail in ".{0,24}") {
            let _ = to_json(&Kind::TimestampTz, &format!("2026-01-02 0{tail}"));
        }
    }
}
