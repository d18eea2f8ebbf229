//! Canonical entity schemas: every mapped change is checked against its entity's JSON
//! Schema (draft 2020-12) before it reaches the merge, so a system that sends a bad
//! email or a number where text belongs is stopped at its own link.
//!
//! Formats (`email`, `date`, `date-time`) are asserted, not just annotated, and `e164`
//! is registered as a format so a schema can name phone fields as such (the match-key
//! normaliser reads it). Messages are built here from the instance path and the kind
//! of failure: the validator's own messages quote the offending value, which is
//! customer data.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::{Draft, ValidationError, Validator};
use serde_json::Value;

use super::phone;
use crate::model::Fields;

/// The `$schema` of JSON Schema draft 2020-12, the only draft accepted.
const DRAFT_2020_12: &str = "https://json-schema.org/draft/2020-12/schema";

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("cannot read schema {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("schema {path} is not JSON")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("schema {origin}: {problem}")]
    Shape { origin: String, problem: &'static str },
    #[error("schema {origin} is not a valid JSON Schema 2020-12")]
    Compile {
        origin: String,
        #[source]
        source: Box<ValidationError<'static>>,
    },
}

/// One entity's compiled schema.
#[derive(Debug)]
pub struct EntitySchema {
    schema: Value,
    validator: Validator,
}

impl EntitySchema {
    /// Reads and compiles the schema file at `path`.
    pub fn load(path: &Path) -> Result<EntitySchema, SchemaError> {
        let text = std::fs::read_to_string(path).map_err(|source| SchemaError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let schema: Value = serde_json::from_str(&text).map_err(|source| SchemaError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        compile(schema, path.display().to_string())
    }

    /// Compiles a schema given as a JSON value.
    pub fn from_value(schema: Value) -> Result<EntitySchema, SchemaError> {
        compile(schema, "(inline)".to_string())
    }

    /// Checks a record's canonical fields. Each problem is `path: kind of problem`,
    /// with the JSON Pointer of the field (`record` for the whole object) and never the
    /// value.
    ///
    /// The validator reads a JSON value: the fields (a JSON object's map) are moved
    /// into one for the check and back out after it, so `fields` is unchanged on
    /// return and nothing is copied.
    pub fn validate(&self, fields: &mut Fields) -> Result<(), Vec<String>> {
        let instance = Value::Object(std::mem::take(fields));
        let result = self.check(&instance);
        if let Value::Object(map) = instance {
            *fields = map;
        }
        result
    }

    fn check(&self, instance: &Value) -> Result<(), Vec<String>> {
        // The common case, a valid record, takes the validator's fast path that builds
        // no error values.
        if self.validator.is_valid(instance) {
            return Ok(());
        }
        let mut problems = Vec::new();
        for error in self.validator.iter_errors(instance) {
            describe(&error, &mut problems);
        }
        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }

    /// Names of the top-level properties.
    pub fn properties(&self) -> BTreeSet<String> {
        self.schema
            .get("properties")
            .and_then(Value::as_object)
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The `format` of a top-level property (`email`, `date`, `e164`), if it has one.
    pub fn property_format(&self, name: &str) -> Option<String> {
        self.schema
            .get("properties")?
            .get(name)?
            .get("format")?
            .as_str()
            .map(str::to_string)
    }

    /// Properties every record must carry.
    pub fn required(&self) -> Vec<String> {
        self.schema
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).map(str::to_string).collect())
            .unwrap_or_default()
    }
}

fn compile(schema: Value, origin: String) -> Result<EntitySchema, SchemaError> {
    let shape = |problem| SchemaError::Shape {
        origin: origin.clone(),
        problem,
    };
    let Some(object) = schema.as_object() else {
        return Err(shape("must be a JSON object"));
    };
    match object.get("$schema") {
        None => {}
        Some(Value::String(s)) if s.trim_end_matches('#') == DRAFT_2020_12 => {}
        Some(_) => return Err(shape("$schema must be JSON Schema draft 2020-12")),
    }
    if object.get("type").and_then(Value::as_str) != Some("object") {
        return Err(shape("top-level type must be \"object\""));
    }
    if !object.get("properties").is_some_and(Value::is_object) {
        return Err(shape("must list the entity's fields under \"properties\""));
    }
    let validator = jsonschema::options()
        .with_draft(Draft::Draft202012)
        .should_validate_formats(true)
        .should_ignore_unknown_formats(false)
        .with_format("e164", |s: &str| phone::normalise_e164(s, None).is_ok_and(|n| n == s))
        .build(&schema)
        .map_err(|source| SchemaError::Compile {
            origin: origin.clone(),
            source: Box::new(source),
        })?;
    Ok(EntitySchema { schema, validator })
}

/// Appends the message(s) for one validation error.
fn describe(error: &ValidationError<'_>, out: &mut Vec<String>) {
    let path = error.instance_path().to_string();
    let at = if path.is_empty() {
        "record".to_string()
    } else {
        path.clone()
    };
    let problem = match error.kind() {
        ValidationErrorKind::AdditionalProperties { unexpected }
        | ValidationErrorKind::UnevaluatedProperties { unexpected } => {
            for name in unexpected {
                out.push(format!("{path}/{}: not a field of this entity", escape_pointer(name)));
            }
            return;
        }
        ValidationErrorKind::Required { property } => match property.as_str() {
            Some(name) => format!("required field \"{name}\" is missing"),
            None => "a required field is missing".to_string(),
        },
        ValidationErrorKind::Type { kind } => format!("wrong type, expected {}", types(kind)),
        ValidationErrorKind::Format { format } => format!("not a valid {format}"),
        ValidationErrorKind::Pattern { pattern } => {
            format!("does not match the pattern {pattern}")
        }
        ValidationErrorKind::Enum { options } => format!("not one of {options}"),
        ValidationErrorKind::Constant { expected_value } => {
            format!("must be {expected_value}")
        }
        ValidationErrorKind::Minimum { limit } => format!("less than the minimum {limit}"),
        ValidationErrorKind::Maximum { limit } => format!("more than the maximum {limit}"),
        ValidationErrorKind::ExclusiveMinimum { limit } => format!("not more than {limit}"),
        ValidationErrorKind::ExclusiveMaximum { limit } => format!("not less than {limit}"),
        ValidationErrorKind::MinLength { limit } => {
            format!("shorter than {limit} characters")
        }
        ValidationErrorKind::MaxLength { limit } => format!("longer than {limit} characters"),
        ValidationErrorKind::MinItems { limit } => format!("fewer than {limit} items"),
        ValidationErrorKind::MaxItems { limit } => format!("more than {limit} items"),
        ValidationErrorKind::AnyOf { .. }
        | ValidationErrorKind::OneOfNotValid { .. }
        | ValidationErrorKind::OneOfMultipleValid { .. } => {
            "does not match exactly the allowed alternatives".to_string()
        }
        other => format!("fails the {} rule", other.keyword()),
    };
    out.push(format!("{at}: {problem}"));
}

fn types(kind: &TypeKind) -> String {
    match kind {
        TypeKind::Single(t) => t.to_string(),
        TypeKind::Multiple(set) => set.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" or "),
    }
}

/// A property name as one JSON Pointer segment (RFC 6901 §4).
fn escape_pointer(name: &str) -> String {
    name.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(value: Value) -> Fields {
        serde_json::from_value(value).expect("test record is an object")
    }

    fn schema_file(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas").join(name)
    }

    fn contact() -> EntitySchema {
        EntitySchema::load(&schema_file("contact.schema.json")).expect("contact schema loads")
    }

    #[test]
    fn shipped_schemas_accept_valid_samples() {
        let samples = [
            (
                "contact.schema.json",
                json!({
                    "email": "ada@example.com",
                    "first_name": "Ada",
                    "last_name": "Lovelace",
                    "full_name": "Ada Lovelace",
                    "phone": "+447700900123",
                    "title": "Analyst",
                    "company": "Analytical Engines Ltd",
                    "certified": true,
                    "certified_at": "2024-07-04",
                    "active": true,
                    "updated_at": "2024-07-04T13:05:00Z"
                }),
            ),
            (
                "employee.schema.json",
                json!({
                    "employee_id": "E-0042",
                    "email": "ada@example.com",
                    "first_name": "Ada",
                    "last_name": "Lovelace",
                    "full_name": "Ada Lovelace",
                    "job_title": "Analyst",
                    "department": "Research",
                    "manager_email": "charles@example.com",
                    "phone": "+447700900123",
                    "start_date": "2021-09-01",
                    "active": true
                }),
            ),
            (
                "enrollment.schema.json",
                json!({
                    "learner_email": "ada@example.com",
                    "course_id": "SAFETY-101",
                    "status": "completed",
                    "progress_percent": 100,
                    "completed_at": "2024-07-04T13:05:00+02:00",
                    "certified": true
                }),
            ),
        ];
        for (file, sample) in samples {
            let schema = EntitySchema::load(&schema_file(file)).expect("schema loads");
            assert_eq!(schema.validate(&mut fields(sample)), Ok(()), "{file}");
            for required in schema.required() {
                assert!(schema.properties().contains(&required), "{file}: {required}");
            }
        }
    }

    #[test]
    fn shipped_schemas_describe_their_match_keys() {
        let contact = contact();
        assert_eq!(contact.required(), vec!["email"]);
        assert_eq!(contact.property_format("email").as_deref(), Some("email"));
        assert_eq!(contact.property_format("phone").as_deref(), Some("e164"));
        assert_eq!(contact.property_format("first_name"), None);
        assert_eq!(contact.property_format("nope"), None);
        assert!(contact.properties().contains("certified_at"));
        let employee = EntitySchema::load(&schema_file("employee.schema.json")).expect("employee loads");
        assert_eq!(employee.required(), vec!["employee_id", "email"]);
        let enrollment = EntitySchema::load(&schema_file("enrollment.schema.json")).expect("loads");
        assert_eq!(enrollment.required(), vec!["learner_email", "course_id"]);
    }

    #[test]
    fn nullable_fields_may_be_cleared() {
        let mut record = fields(json!({
            "email": "ada@example.com",
            "phone": null,
            "certified": null,
            "certified_at": null,
            "updated_at": null,
            "title": null
        }));
        let before = record.clone();
        assert_eq!(contact().validate(&mut record), Ok(()));
        assert_eq!(record, before, "validation hands the fields back as they were");
        let mut cleared_email = fields(json!({ "email": null }));
        assert_eq!(
            contact().validate(&mut cleared_email),
            Err(vec!["/email: wrong type, expected string".to_string()])
        );
        assert_eq!(
            cleared_email,
            fields(json!({ "email": null })),
            "a failed check hands them back too"
        );
    }

    #[test]
    fn bad_records_are_explained_without_their_values() {
        let cases: Vec<(Value, &str, Vec<&str>)> = vec![
            (
                json!({ "email": "ada-at-example.com" }),
                "ada-at-example.com",
                vec!["/email: not a valid email"],
            ),
            (
                json!({ "email": "ada@example.com", "phone": "+44 7700 900123" }),
                "7700",
                vec![
                    "/phone: not a valid e164",
                    "/phone: does not match the pattern ^\\+[1-9][0-9]{7,14}$",
                ],
            ),
            (
                json!({ "email": "ada@example.com", "certified": "yes-ish" }),
                "yes-ish",
                vec!["/certified: wrong type, expected null or boolean"],
            ),
            (
                json!({ "email": "ada@example.com", "shoe_size": "44-secret" }),
                "44-secret",
                vec!["/shoe_size: not a field of this entity"],
            ),
            (
                json!({ "email": "ada@example.com", "certified_at": "04/07/2024" }),
                "04/07",
                vec!["/certified_at: not a valid date"],
            ),
            (
                json!({ "first_name": "Ada" }),
                "Ada",
                vec!["record: required field \"email\" is missing"],
            ),
        ];
        for (record, secret, expected) in cases {
            let got = contact().validate(&mut fields(record)).expect_err("record is invalid");
            let mut got_sorted = got.clone();
            got_sorted.sort();
            let mut expected: Vec<String> = expected.into_iter().map(String::from).collect();
            expected.sort();
            assert_eq!(got_sorted, expected);
            for message in &got {
                assert!(!message.contains(secret), "message leaks the value: {message}");
            }
        }
    }

    #[test]
    fn enrollment_ranges_and_enums() {
        let schema = EntitySchema::load(&schema_file("enrollment.schema.json")).expect("loads");
        let base = json!({ "learner_email": "ada@example.com", "course_id": "C1" });
        let with = |extra: Value| {
            let mut record = fields(base.clone());
            record.extend(fields(extra));
            record
        };
        assert_eq!(schema.validate(&mut with(json!({ "completed_at": null }))), Ok(()));
        assert_eq!(
            schema.validate(&mut with(json!({ "progress_percent": 140 }))),
            Err(vec!["/progress_percent: more than the maximum 100".to_string()])
        );
        assert_eq!(
            schema.validate(&mut with(json!({ "status": "lost" }))),
            Err(vec![
                "/status: not one of [\"enrolled\",\"in_progress\",\"completed\",\"withdrawn\"]".to_string()
            ])
        );
        assert_eq!(
            schema.validate(&mut with(json!({ "completed_at": "2024-07-04" }))),
            Err(vec!["/completed_at: not a valid date-time".to_string()])
        );
    }

    #[test]
    fn malformed_schemas_are_refused() {
        let shape = |v: Value| match EntitySchema::from_value(v) {
            Err(SchemaError::Shape { problem, .. }) => problem,
            other => panic!("expected a shape error, got {other:?}"),
        };
        assert_eq!(shape(json!([])), "must be a JSON object");
        assert_eq!(
            shape(json!({ "$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "properties": {} })),
            "$schema must be JSON Schema draft 2020-12"
        );
        assert_eq!(shape(json!({ "type": "string" })), "top-level type must be \"object\"");
        assert_eq!(
            shape(json!({ "type": "object" })),
            "must list the entity's fields under \"properties\""
        );
        let compile = EntitySchema::from_value(json!({
            "type": "object",
            "properties": { "a": { "type": "text" } }
        }));
        assert!(matches!(compile, Err(SchemaError::Compile { .. })), "{compile:?}");
        let unknown_format = EntitySchema::from_value(json!({
            "type": "object",
            "properties": { "a": { "type": "string", "format": "shoe-size" } }
        }));
        assert!(
            matches!(unknown_format, Err(SchemaError::Compile { .. })),
            "{unknown_format:?}"
        );
    }

    #[test]
    fn load_reports_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("missing.json");
        assert!(matches!(EntitySchema::load(&missing), Err(SchemaError::Read { .. })));
        let broken = dir.path().join("broken.json");
        std::fs::write(&broken, "{ not json").expect("write");
        let err = EntitySchema::load(&broken).expect_err("not JSON");
        assert!(matches!(err, SchemaError::Json { .. }));
        assert!(err.to_string().contains("broken.json"), "{err}");
    }

    #[test]
    fn schema_errors_cross_threads() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<SchemaError>();
        send_sync::<EntitySchema>();
    }
}
