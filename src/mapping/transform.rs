//! Value transforms, compiled once per link so that a bad date format or a table that
//! cannot be inverted is a configuration error rather than a failure on every record.
//!
//! Inbound a transform turns a system value into the canonical form. Outbound it is
//! undone where the canonical form lost something the system needs (date formats, value
//! tables) and is the identity otherwise: a trimmed, lower-cased or E.164 value is
//! already acceptable to the system that gave the untidy one.
//!
//! Null passes through every transform in both directions: a cleared field stays
//! cleared.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

use chrono::format::{Fixed, Item, Numeric, StrftimeItems};
use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime};
use serde_json::{Number, Value};

use super::phone::{self, PhoneProblem};
use crate::config::{MapDirection, ParseType, Transform};

/// Why a value could not be transformed. Never carries the value: values are customer
/// data and end up in logs and dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueProblem {
    /// A transform that works on text got a value of another JSON type.
    NotText {
        found: &'static str,
    },
    Phone(PhoneProblem),
    /// The text does not match the date format it should be in.
    Date {
        format: String,
        reason: String,
    },
    /// A parsed date lacks a part the target format prints.
    DateOutput {
        format: String,
    },
    NotInMap,
    NotInInverseMap,
    Parse(ParseType),
}

impl fmt::Display for ValueProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueProblem::NotText { found } => write!(f, "expected text, found {found}"),
            ValueProblem::Phone(problem) => write!(f, "not a phone number ({problem})"),
            ValueProblem::Date { format, reason } => {
                write!(f, "not a date in format {format} ({reason})")
            }
            ValueProblem::DateOutput { format } => {
                write!(f, "date cannot be written in format {format}")
            }
            ValueProblem::NotInMap => f.write_str("value is not in the map"),
            ValueProblem::NotInInverseMap => f.write_str("value has no entry in the map to write back"),
            ValueProblem::Parse(ParseType::Bool) => f.write_str("cannot parse as boolean"),
            ValueProblem::Parse(ParseType::Integer) => f.write_str("cannot parse as integer"),
            ValueProblem::Parse(ParseType::Number) => f.write_str("cannot parse as number"),
        }
    }
}

/// The JSON type of a value, for messages that must not show the value.
pub fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "text",
        Value::Array(_) => "list",
        Value::Object(_) => "object",
    }
}

/// Text of a string (borrowed) or number; other types are not text.
pub fn as_text(value: &Value) -> Result<Cow<'_, str>, ValueProblem> {
    match value {
        Value::String(s) => Ok(Cow::Borrowed(s)),
        Value::Number(n) => Ok(Cow::Owned(n.to_string())),
        other => Err(ValueProblem::NotText {
            found: type_name(other),
        }),
    }
}

/// Applies a text step: a string that `unchanged` says the step leaves as it is is
/// passed on, not copied; other text (numbers included) goes through `map`.
fn retext(value: Value, unchanged: fn(&str) -> bool, map: fn(&str) -> String) -> Result<Value, ValueProblem> {
    match value {
        Value::String(s) if unchanged(&s) => Ok(Value::String(s)),
        other => Ok(Value::String(map(&as_text(&other)?))),
    }
}

/// A transform ready to run.
#[derive(Debug, Clone)]
pub enum Step {
    Trim,
    Lower,
    Upper,
    /// `country_code` holds the digits of the link's default country code.
    E164 {
        country_code: Option<String>,
    },
    Date(DateStep),
    Map(MapStep),
    Parse(ParseType),
    EmptyAsNull,
}

impl Step {
    /// Compiles one configured transform for a rule that runs in `direction`, which
    /// decides whether a value table must be invertible and which way date formats
    /// must be convertible.
    pub fn compile(transform: &Transform, country_code: Option<&str>, direction: MapDirection) -> Result<Step, String> {
        let inbound = matches!(direction, MapDirection::Both | MapDirection::In);
        let outbound = matches!(direction, MapDirection::Both | MapDirection::Out);
        Ok(match transform {
            Transform::Trim => Step::Trim,
            Transform::Lower => Step::Lower,
            Transform::Upper => Step::Upper,
            Transform::E164 => Step::E164 {
                country_code: country_code.map(str::to_string),
            },
            Transform::Date { system, canonical } => {
                Step::Date(DateStep::compile(system, canonical, inbound, outbound)?)
            }
            Transform::Map(table) => Step::Map(MapStep::compile(table, outbound)?),
            Transform::Parse(kind) => Step::Parse(*kind),
            Transform::EmptyAsNull => Step::EmptyAsNull,
        })
    }

    /// Whether the step can only yield text (or null) from text, so that it fits a
    /// rule that joins or splits text.
    pub fn keeps_text(&self) -> bool {
        match self {
            Step::Parse(_) => false,
            Step::Map(map) => map.forward.values().all(|v| v.is_string() || v.is_null()),
            _ => true,
        }
    }

    /// System value to canonical value.
    pub fn inbound(&self, value: Value) -> Result<Value, ValueProblem> {
        if value.is_null() {
            return Ok(value);
        }
        match self {
            // Case is checked on ASCII text only; other text always takes the full
            // mapping (title-case letters, for one, change without being upper case).
            Step::Trim => retext(value, |s| s.trim().len() == s.len(), |s| s.trim().to_string()),
            Step::Lower => retext(
                value,
                |s| s.is_ascii() && !s.bytes().any(|b| b.is_ascii_uppercase()),
                str::to_lowercase,
            ),
            Step::Upper => retext(
                value,
                |s| s.is_ascii() && !s.bytes().any(|b| b.is_ascii_lowercase()),
                str::to_uppercase,
            ),
            Step::E164 { country_code } => {
                let text = as_text(&value)?;
                phone::normalise_e164(&text, country_code.as_deref())
                    .map(Value::String)
                    .map_err(ValueProblem::Phone)
            }
            Step::Date(date) => {
                let text = as_text(&value)?;
                date.convert(&text, Way::In).map(Value::String)
            }
            Step::Map(map) => map.lookup(&value),
            Step::Parse(kind) => parse(&value, *kind),
            Step::EmptyAsNull => Ok(match value {
                Value::String(s) if s.is_empty() => Value::Null,
                other => other,
            }),
        }
    }

    /// Canonical value to system value.
    pub fn outbound(&self, value: Value) -> Result<Value, ValueProblem> {
        if value.is_null() {
            return Ok(value);
        }
        match self {
            Step::Date(date) => {
                let text = as_text(&value)?;
                date.convert(&text, Way::Out).map(Value::String)
            }
            Step::Map(map) => map.reverse(&value),
            Step::Trim | Step::Lower | Step::Upper | Step::E164 { .. } | Step::Parse(_) | Step::EmptyAsNull => {
                Ok(value)
            }
        }
    }

    /// Human text for `concord plan`.
    pub fn describe(&self) -> String {
        match self {
            Step::Trim => "trim".to_string(),
            Step::Lower => "lower".to_string(),
            Step::Upper => "upper".to_string(),
            Step::E164 { country_code: None } => "e164".to_string(),
            Step::E164 {
                country_code: Some(code),
            } => format!("e164 (default +{code})"),
            Step::Date(date) => format!("date {} -> {}", date.system, date.canonical),
            Step::Map(map) => {
                let n = map.forward.len();
                format!("map ({n} {})", if n == 1 { "value" } else { "values" })
            }
            Step::Parse(ParseType::Bool) => "parse bool".to_string(),
            Step::Parse(ParseType::Integer) => "parse integer".to_string(),
            Step::Parse(ParseType::Number) => "parse number".to_string(),
            Step::EmptyAsNull => "empty as null".to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Way {
    In,
    Out,
}

/// Which parts of a point in time a strftime format carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Parts {
    date: bool,
    time: bool,
    zone: bool,
}

impl Parts {
    fn covers(self, other: Parts) -> bool {
        (self.date || !other.date) && (self.time || !other.time) && (self.zone || !other.zone)
    }

    fn missing(self, other: Parts) -> &'static str {
        if other.date && !self.date {
            "a date"
        } else if other.time && !self.time {
            "a time"
        } else {
            "a time zone"
        }
    }
}

/// What parsing a format yields, and what formatting with it needs. They differ for
/// `%Z`: chrono skips a zone name when parsing but prints the offset's name.
#[derive(Debug, Clone, Copy)]
struct FormatShape {
    provides: Parts,
    needs: Parts,
}

fn shape_of(format: &str) -> Result<FormatShape, String> {
    let items = StrftimeItems::new(format)
        .parse()
        .map_err(|_| format!("date format {format} is not a valid strftime format"))?;
    // `%#z` is a parse-only permissive offset; chrono does not name its item publicly.
    let permissive_offset = StrftimeItems::new("%#z").next();
    let date = Parts {
        date: true,
        ..Parts::default()
    };
    let time = Parts {
        time: true,
        ..Parts::default()
    };
    let zone = Parts {
        zone: true,
        ..Parts::default()
    };
    let all = Parts {
        date: true,
        time: true,
        zone: true,
    };
    let mut shape = FormatShape {
        provides: Parts::default(),
        needs: Parts::default(),
    };
    for item in &items {
        let (provides, needs) = match item {
            Item::Numeric(Numeric::Timestamp, _) => (
                all,
                Parts {
                    date: true,
                    time: true,
                    zone: false,
                },
            ),
            Item::Numeric(
                Numeric::Hour | Numeric::Hour12 | Numeric::Minute | Numeric::Second | Numeric::Nanosecond,
                _,
            ) => (time, time),
            Item::Numeric(_, _) => (date, date),
            Item::Fixed(
                Fixed::ShortMonthName | Fixed::LongMonthName | Fixed::ShortWeekdayName | Fixed::LongWeekdayName,
            ) => (date, date),
            Item::Fixed(Fixed::TimezoneName) => (Parts::default(), zone),
            Item::Fixed(
                Fixed::TimezoneOffset
                | Fixed::TimezoneOffsetZ
                | Fixed::TimezoneOffsetColon
                | Fixed::TimezoneOffsetColonZ
                | Fixed::TimezoneOffsetDoubleColon
                | Fixed::TimezoneOffsetTripleColon,
            ) => (zone, zone),
            Item::Fixed(Fixed::RFC2822 | Fixed::RFC3339) => (all, all),
            item @ Item::Fixed(_) if Some(item) == permissive_offset.as_ref() => (zone, Parts::default()),
            // Am/pm markers and fractional seconds, including chrono's internal
            // no-dot fractions.
            Item::Fixed(_) => (time, time),
            _ => (Parts::default(), Parts::default()),
        };
        shape.provides = union(shape.provides, provides);
        shape.needs = union(shape.needs, needs);
    }
    if !shape.provides.date && !shape.provides.time {
        return Err(format!("date format {format} has no date or time fields"));
    }
    if shape.provides.zone && !(shape.provides.date && shape.provides.time) {
        return Err(format!("date format {format} has a time zone without a date and time"));
    }
    Ok(shape)
}

fn union(a: Parts, b: Parts) -> Parts {
    Parts {
        date: a.date || b.date,
        time: a.time || b.time,
        zone: a.zone || b.zone,
    }
}

/// Reformats dates and times between the system's and the canonical strftime formats.
#[derive(Debug, Clone)]
pub struct DateStep {
    system: String,
    canonical: String,
    system_shape: FormatShape,
    canonical_shape: FormatShape,
}

impl DateStep {
    fn compile(system: &str, canonical: &str, inbound: bool, outbound: bool) -> Result<DateStep, String> {
        let system_shape = shape_of(system)?;
        let canonical_shape = shape_of(canonical)?;
        // Formatting fails for every value when the target prints a part the source
        // never gives, so that is a configuration error for each direction that runs.
        if inbound && !system_shape.provides.covers(canonical_shape.needs) {
            return Err(format!(
                "date format {canonical} needs {} that format {system} does not give",
                system_shape.provides.missing(canonical_shape.needs)
            ));
        }
        if outbound && !canonical_shape.provides.covers(system_shape.needs) {
            return Err(format!(
                "date format {system} needs {} that format {canonical} does not give",
                canonical_shape.provides.missing(system_shape.needs)
            ));
        }
        Ok(DateStep {
            system: system.to_string(),
            canonical: canonical.to_string(),
            system_shape,
            canonical_shape,
        })
    }

    fn convert(&self, text: &str, way: Way) -> Result<String, ValueProblem> {
        let (from, from_shape, to) = match way {
            Way::In => (&self.system, self.system_shape, &self.canonical),
            Way::Out => (&self.canonical, self.canonical_shape, &self.system),
        };
        let bad = |e: chrono::ParseError| ValueProblem::Date {
            format: from.clone(),
            reason: e.to_string(),
        };
        let text = text.trim();
        let parts = from_shape.provides;
        // The richest type the source format can fill, so that a zone is kept and a
        // time is never dropped.
        let rendered = if parts.zone {
            render(
                DateTime::<FixedOffset>::parse_from_str(text, from)
                    .map_err(bad)?
                    .format(to),
            )
        } else if parts.date && parts.time {
            render(NaiveDateTime::parse_from_str(text, from).map_err(bad)?.format(to))
        } else if parts.date {
            render(NaiveDate::parse_from_str(text, from).map_err(bad)?.format(to))
        } else {
            render(NaiveTime::parse_from_str(text, from).map_err(bad)?.format(to))
        };
        rendered.ok_or_else(|| ValueProblem::DateOutput { format: to.clone() })
    }
}

/// Formats into a string; `None` when chrono lacks a part the format prints (calling
/// `to_string` would panic instead).
fn render(display: impl fmt::Display) -> Option<String> {
    let mut out = String::new();
    write!(out, "{display}").ok()?;
    Some(out)
}

/// A value table and, for rules that write back, its inverse.
#[derive(Debug, Clone)]
pub struct MapStep {
    forward: BTreeMap<String, Value>,
    /// Canonical value to system key. Linear search: tables are a handful of entries
    /// and JSON values have no total order to key a map by.
    inverse: Vec<(Value, String)>,
}

impl MapStep {
    fn compile(table: &BTreeMap<String, Value>, outbound: bool) -> Result<MapStep, String> {
        if table.is_empty() {
            return Err("map transform has no entries".to_string());
        }
        let mut inverse: Vec<(Value, String)> = Vec::with_capacity(table.len());
        for (key, value) in table {
            // Null never reaches the inverse lookup (null passes through), so two keys
            // that both clear the field do not make the table ambiguous.
            if value.is_null() {
                continue;
            }
            if inverse.iter().any(|(v, _)| v == value) {
                if outbound {
                    return Err("map transform cannot be undone on the way out: two keys give the same \
                         value (restrict the rule to direction = \"in\")"
                        .to_string());
                }
                continue;
            }
            inverse.push((value.clone(), key.clone()));
        }
        Ok(MapStep {
            forward: table.clone(),
            inverse,
        })
    }

    fn lookup(&self, value: &Value) -> Result<Value, ValueProblem> {
        let key = match value {
            Value::Bool(b) => Cow::Owned(b.to_string()),
            other => as_text(other)?,
        };
        self.forward.get(key.as_ref()).cloned().ok_or(ValueProblem::NotInMap)
    }

    fn reverse(&self, value: &Value) -> Result<Value, ValueProblem> {
        self.inverse
            .iter()
            .find(|(v, _)| v == value)
            .map(|(_, key)| Value::String(key.clone()))
            .ok_or(ValueProblem::NotInInverseMap)
    }
}

fn parse(value: &Value, kind: ParseType) -> Result<Value, ValueProblem> {
    let fail = ValueProblem::Parse(kind);
    match kind {
        ParseType::Bool => match value {
            Value::Bool(_) => Ok(value.clone()),
            Value::Number(n) => match n.as_u64() {
                Some(1) => Ok(Value::Bool(true)),
                Some(0) => Ok(Value::Bool(false)),
                _ => Err(fail),
            },
            Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "yes" | "y" | "1" => Ok(Value::Bool(true)),
                "false" | "no" | "n" | "0" => Ok(Value::Bool(false)),
                _ => Err(fail),
            },
            _ => Err(fail),
        },
        ParseType::Integer => match value {
            Value::Number(n) if n.is_i64() || n.is_u64() => Ok(value.clone()),
            Value::Number(n) => n.as_f64().and_then(whole).ok_or(fail),
            Value::String(s) => {
                let s = s.trim();
                if let Ok(i) = s.parse::<i64>() {
                    Ok(Value::from(i))
                } else if let Ok(u) = s.parse::<u64>() {
                    Ok(Value::from(u))
                } else {
                    s.parse::<f64>().ok().and_then(whole).ok_or(fail)
                }
            }
            _ => Err(fail),
        },
        ParseType::Number => match value {
            Value::Number(_) => Ok(value.clone()),
            Value::String(s) => {
                let s = s.trim();
                if let Ok(i) = s.parse::<i64>() {
                    Ok(Value::from(i))
                } else {
                    s.parse::<f64>()
                        .ok()
                        .and_then(Number::from_f64)
                        .map(Value::Number)
                        .ok_or(fail)
                }
            }
            _ => Err(fail),
        },
    }
}

/// An integer-valued float as a JSON integer; `None` for fractions and out-of-range.
fn whole(f: f64) -> Option<Value> {
    // i64::MAX is not exactly representable; the bound excludes it.
    let in_range = f >= i64::MIN as f64 && f < i64::MAX as f64;
    (f.is_finite() && f.fract() == 0.0 && in_range).then(|| Value::from(f as i64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn step(t: Transform) -> Step {
        Step::compile(&t, Some("44"), MapDirection::Both).expect("test transform compiles")
    }

    fn date(system: &str, canonical: &str) -> Step {
        step(Transform::Date {
            system: system.into(),
            canonical: canonical.into(),
        })
    }

    #[test]
    fn inbound_table() {
        use ValueProblem as P;
        let map = step(Transform::Map(BTreeMap::from([
            ("A".to_string(), json!("active")),
            ("I".to_string(), json!("inactive")),
            ("1".to_string(), json!(true)),
            ("true".to_string(), json!("yes")),
        ])));
        let cases: Vec<(Step, Value, Result<Value, ValueProblem>)> = vec![
            (step(Transform::Trim), json!("  Ada  "), Ok(json!("Ada"))),
            (step(Transform::Trim), json!(42), Ok(json!("42"))),
            (step(Transform::Trim), json!(true), Err(P::NotText { found: "boolean" })),
            (
                step(Transform::Lower),
                json!("Ada@Example.COM"),
                Ok(json!("ada@example.com")),
            ),
            (step(Transform::Upper), json!("gb"), Ok(json!("GB"))),
            (step(Transform::Trim), json!("Ada"), Ok(json!("Ada"))),
            (
                step(Transform::Lower),
                json!("ada@example.com"),
                Ok(json!("ada@example.com")),
            ),
            (step(Transform::Lower), json!("ÉCOLE"), Ok(json!("école"))),
            (step(Transform::Lower), json!("ǅemal"), Ok(json!("ǆemal"))),
            (step(Transform::Upper), json!("GB"), Ok(json!("GB"))),
            (step(Transform::Upper), json!("straße"), Ok(json!("STRASSE"))),
            (step(Transform::Upper), json!(1.5), Ok(json!("1.5"))),
            (step(Transform::Lower), json!(["a"]), Err(P::NotText { found: "list" })),
            (step(Transform::E164), json!("07700 900123"), Ok(json!("+447700900123"))),
            (
                step(Transform::E164),
                json!(447700900123u64),
                Ok(json!("+44447700900123")),
            ),
            (
                step(Transform::E164),
                json!("+1234567"),
                Err(P::Phone(PhoneProblem::Digits(7))),
            ),
            (
                step(Transform::E164),
                json!("call me"),
                Err(P::Phone(PhoneProblem::Letters)),
            ),
            (map.clone(), json!("A"), Ok(json!("active"))),
            (map.clone(), json!(1), Ok(json!(true))),
            (map.clone(), json!(true), Ok(json!("yes"))),
            (map.clone(), json!("X"), Err(P::NotInMap)),
            (step(Transform::Parse(ParseType::Bool)), json!("Yes"), Ok(json!(true))),
            (step(Transform::Parse(ParseType::Bool)), json!(" N "), Ok(json!(false))),
            (step(Transform::Parse(ParseType::Bool)), json!("TRUE"), Ok(json!(true))),
            (step(Transform::Parse(ParseType::Bool)), json!("0"), Ok(json!(false))),
            (step(Transform::Parse(ParseType::Bool)), json!(1), Ok(json!(true))),
            (step(Transform::Parse(ParseType::Bool)), json!(false), Ok(json!(false))),
            (
                step(Transform::Parse(ParseType::Bool)),
                json!("maybe"),
                Err(P::Parse(ParseType::Bool)),
            ),
            (
                step(Transform::Parse(ParseType::Bool)),
                json!(2),
                Err(P::Parse(ParseType::Bool)),
            ),
            (
                step(Transform::Parse(ParseType::Bool)),
                json!(""),
                Err(P::Parse(ParseType::Bool)),
            ),
            (step(Transform::Parse(ParseType::Integer)), json!(" 42 "), Ok(json!(42))),
            (step(Transform::Parse(ParseType::Integer)), json!("-7"), Ok(json!(-7))),
            (step(Transform::Parse(ParseType::Integer)), json!("3.0"), Ok(json!(3))),
            (step(Transform::Parse(ParseType::Integer)), json!(5.0), Ok(json!(5))),
            (step(Transform::Parse(ParseType::Integer)), json!(9), Ok(json!(9))),
            (
                step(Transform::Parse(ParseType::Integer)),
                json!("3.5"),
                Err(P::Parse(ParseType::Integer)),
            ),
            (
                step(Transform::Parse(ParseType::Integer)),
                json!("forty"),
                Err(P::Parse(ParseType::Integer)),
            ),
            (step(Transform::Parse(ParseType::Number)), json!("2.5"), Ok(json!(2.5))),
            (step(Transform::Parse(ParseType::Number)), json!("12"), Ok(json!(12))),
            (step(Transform::Parse(ParseType::Number)), json!(0.25), Ok(json!(0.25))),
            (
                step(Transform::Parse(ParseType::Number)),
                json!("NaN"),
                Err(P::Parse(ParseType::Number)),
            ),
            (
                step(Transform::Parse(ParseType::Number)),
                json!("inf"),
                Err(P::Parse(ParseType::Number)),
            ),
            (
                step(Transform::Parse(ParseType::Number)),
                json!(true),
                Err(P::Parse(ParseType::Number)),
            ),
            (step(Transform::EmptyAsNull), json!(""), Ok(Value::Null)),
            (step(Transform::EmptyAsNull), json!(" "), Ok(json!(" "))),
            (step(Transform::EmptyAsNull), json!(0), Ok(json!(0))),
            (
                date("%m/%d/%Y", "%Y-%m-%d"),
                json!("07/04/2024"),
                Ok(json!("2024-07-04")),
            ),
            (
                date("%d.%m.%Y %H:%M", "%Y-%m-%dT%H:%M:%S"),
                json!("04.07.2024 13:05"),
                Ok(json!("2024-07-04T13:05:00")),
            ),
            (
                date("%d/%m/%Y %H:%M %z", "%Y-%m-%dT%H:%M:%S%:z"),
                json!("04/07/2024 13:05 +0200"),
                Ok(json!("2024-07-04T13:05:00+02:00")),
            ),
            (
                date("%s", "%Y-%m-%dT%H:%M:%S%:z"),
                json!(0),
                Ok(json!("1970-01-01T00:00:00+00:00")),
            ),
            (date("%H%M", "%H:%M"), json!("0930"), Ok(json!("09:30"))),
        ];
        for (i, (step, input, expected)) in cases.into_iter().enumerate() {
            assert_eq!(step.inbound(input), expected, "case {i}: {}", step.describe());
        }
    }

    #[test]
    fn null_passes_every_transform_both_ways() {
        let all = [
            Transform::Trim,
            Transform::Lower,
            Transform::Upper,
            Transform::E164,
            Transform::Date {
                system: "%m/%d/%Y".into(),
                canonical: "%Y-%m-%d".into(),
            },
            Transform::Map(BTreeMap::from([("a".to_string(), json!("b"))])),
            Transform::Parse(ParseType::Bool),
            Transform::Parse(ParseType::Integer),
            Transform::Parse(ParseType::Number),
            Transform::EmptyAsNull,
        ];
        for t in all {
            let s = step(t);
            assert_eq!(s.inbound(Value::Null), Ok(Value::Null), "{}", s.describe());
            assert_eq!(s.outbound(Value::Null), Ok(Value::Null), "{}", s.describe());
        }
    }

    #[test]
    fn bad_dates_are_rejected_without_the_value() {
        let d = date("%m/%d/%Y", "%Y-%m-%d");
        let err = d.inbound(json!("31/12/2024")).expect_err("month 31 is out of range");
        let text = err.to_string();
        assert!(text.starts_with("not a date in format %m/%d/%Y"), "{text}");
        assert!(!text.contains("31/12"), "{text}");
        assert!(d.inbound(json!("yesterday")).is_err());
        assert_eq!(d.inbound(json!(true)), Err(ValueProblem::NotText { found: "boolean" }));
        // Outbound parses the canonical format.
        assert!(d.outbound(json!("07/04/2024")).is_err());
    }

    #[test]
    fn outbound_table() {
        let map = step(Transform::Map(BTreeMap::from([
            ("A".to_string(), json!("active")),
            ("1".to_string(), json!(true)),
            ("n/a".to_string(), Value::Null),
            ("none".to_string(), Value::Null),
        ])));
        let cases: Vec<(Step, Value, Result<Value, ValueProblem>)> = vec![
            (
                date("%m/%d/%Y", "%Y-%m-%d"),
                json!("2024-07-04"),
                Ok(json!("07/04/2024")),
            ),
            (
                date("%d/%m/%Y %H:%M %z", "%Y-%m-%dT%H:%M:%S%:z"),
                json!("2024-07-04T13:05:00-05:00"),
                Ok(json!("04/07/2024 13:05 -0500")),
            ),
            (map.clone(), json!("active"), Ok(json!("A"))),
            (map.clone(), json!(true), Ok(json!("1"))),
            (map.clone(), json!("archived"), Err(ValueProblem::NotInInverseMap)),
            (step(Transform::Trim), json!(" x "), Ok(json!(" x "))),
            (step(Transform::Lower), json!("Ada"), Ok(json!("Ada"))),
            (step(Transform::Upper), json!("gb"), Ok(json!("gb"))),
            (
                step(Transform::E164),
                json!("+447700900123"),
                Ok(json!("+447700900123")),
            ),
            (step(Transform::Parse(ParseType::Bool)), json!(true), Ok(json!(true))),
            (step(Transform::Parse(ParseType::Integer)), json!(4), Ok(json!(4))),
            (step(Transform::Parse(ParseType::Number)), json!(4.5), Ok(json!(4.5))),
            (step(Transform::EmptyAsNull), json!("x"), Ok(json!("x"))),
        ];
        for (i, (step, input, expected)) in cases.into_iter().enumerate() {
            assert_eq!(step.outbound(input), expected, "case {i}: {}", step.describe());
        }
    }

    #[test]
    fn date_round_trip_keeps_the_zone() {
        let d = date("%Y-%m-%d %H:%M:%S %z", "%+");
        let system = json!("2024-03-31 01:30:00 +0530");
        let canonical = d.inbound(system.clone()).expect("parses");
        assert_eq!(canonical, json!("2024-03-31T01:30:00+05:30"));
        assert_eq!(d.outbound(canonical), Ok(system));
    }

    #[test]
    fn date_formats_checked_at_compile() {
        let compile = |s: &str, c: &str, direction: MapDirection| {
            Step::compile(
                &Transform::Date {
                    system: s.into(),
                    canonical: c.into(),
                },
                None,
                direction,
            )
        };
        let (both, inbound, outbound) = (MapDirection::Both, MapDirection::In, MapDirection::Out);
        assert!(compile("%m/%d/%Y", "%Y-%m-%d", both).is_ok());
        let bad = compile("%m/%d/%Q", "%Y-%m-%d", both).expect_err("%Q is not strftime");
        assert!(bad.contains("not a valid strftime format"), "{bad}");
        assert!(compile("%Y-%m-%d", "%Y-%m-%d %", both).is_err());
        let no_fields = compile("literal", "%Y-%m-%d", both).expect_err("no fields");
        assert!(no_fields.contains("no date or time fields"), "{no_fields}");
        // Canonical needs a time the system never gives.
        let err = compile("%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", inbound).expect_err("needs a time");
        assert!(err.contains("needs a time"), "{err}");
        // Writing a date-only canonical value into a date-only field is fine outbound.
        assert!(compile("%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", outbound).is_ok());
        // Dropping the time inbound is fine; writing it back is not.
        assert!(compile("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d", inbound).is_ok());
        let err = compile("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d", both).expect_err("lossy both ways");
        assert!(err.contains("needs a time"), "{err}");
        let err = compile("%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M%:z", both).expect_err("no zone");
        assert!(err.contains("needs a time zone"), "{err}");
        let err = compile("%Y-%m-%d %z", "%Y-%m-%d", both).expect_err("zone without time");
        assert!(err.contains("time zone without a date and time"), "{err}");
    }

    #[test]
    fn map_inverse_must_be_unambiguous_when_written_back() {
        let table = BTreeMap::from([("Y".to_string(), json!(true)), ("Yes".to_string(), json!(true))]);
        let err =
            Step::compile(&Transform::Map(table.clone()), None, MapDirection::Both).expect_err("two keys give true");
        assert!(err.contains("cannot be undone"), "{err}");
        let inbound_only = Step::compile(&Transform::Map(table), None, MapDirection::In).expect("in only");
        assert_eq!(inbound_only.inbound(json!("Yes")), Ok(json!(true)));
        assert!(Step::compile(&Transform::Map(BTreeMap::new()), None, MapDirection::In).is_err());
    }

    #[test]
    fn describe_texts() {
        assert_eq!(step(Transform::Trim).describe(), "trim");
        assert_eq!(step(Transform::E164).describe(), "e164 (default +44)");
        assert_eq!(
            Step::compile(&Transform::E164, None, MapDirection::Both)
                .expect("compiles")
                .describe(),
            "e164"
        );
        assert_eq!(date("%m/%d/%Y", "%Y-%m-%d").describe(), "date %m/%d/%Y -> %Y-%m-%d");
        assert_eq!(step(Transform::Parse(ParseType::Bool)).describe(), "parse bool");
        assert_eq!(step(Transform::EmptyAsNull).describe(), "empty as null");
    }

    proptest::proptest! {
        /// Passing unchanged strings on is only a shortcut: trim and case steps give
        /// what the standard library's mappings give, for any text.
        #[test]
        fn case_and_trim_steps_equal_the_standard_mappings(
            text in proptest::prop_oneof!["\\PC{0,12}", "[ a-zA-Z0-9@.ǅßÉé]{0,12}"]
        ) {
            let run = |t: Transform| step(t).inbound(Value::String(text.clone())).expect("text");
            proptest::prop_assert_eq!(run(Transform::Trim), Value::String(text.trim().to_string()));
            proptest::prop_assert_eq!(run(Transform::Lower), Value::String(text.to_lowercase()));
            proptest::prop_assert_eq!(run(Transform::Upper), Value::String(text.to_uppercase()));
        }
    }
}
