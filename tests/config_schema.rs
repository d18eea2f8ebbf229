//! The configuration's JSON Schema (`schemas/concord.config.schema.json`) is generated
//! from the config types. These tests keep the committed file equal to the generated
//! one, and check that the schema and the loader agree: every shipped example passes
//! both (and validates without problems), and typical mistakes fail both.

use std::path::{Path, PathBuf};

use serde_json::Value;

const SCHEMA_FILE: &str = "schemas/concord.config.schema.json";
const UPDATE_VAR: &str = "CONCORD_UPDATE_SCHEMA";

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn generated_text() -> String {
    let schema = concord::config::json_schema();
    let mut text = serde_json::to_string_pretty(&schema).expect("a JSON value serialises");
    text.push('\n');
    text
}

fn validator() -> jsonschema::Validator {
    jsonschema::validator_for(&concord::config::json_schema()).expect("the generated schema is a valid JSON Schema")
}

/// TOML text as the JSON value the schema describes.
fn toml_to_json(text: &str) -> Result<Value, toml::de::Error> {
    let table: toml::Table = toml::from_str(text)?;
    Ok(serde_json::to_value(table).expect("a TOML table converts to JSON"))
}

fn schema_errors(validator: &jsonschema::Validator, instance: &Value) -> Vec<String> {
    validator
        .iter_errors(instance)
        .map(|e| format!("{}: {}", e.instance_path(), e))
        .collect()
}

#[test]
fn committed_schema_matches_the_config_types() {
    let path = manifest_dir().join(SCHEMA_FILE);
    let generated = generated_text();
    if std::env::var_os(UPDATE_VAR).is_some_and(|v| v == "1") {
        std::fs::write(&path, &generated).expect("write the schema file");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{SCHEMA_FILE} is out of date with the config types; regenerate it with \
         `{UPDATE_VAR}=1 cargo test --test config_schema` and commit the result"
    );
}

fn toml_files(dir: &Path, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.expect("read examples directory entry").path();
        if path.is_dir() {
            toml_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "toml") {
            found.push(path);
        }
    }
}

#[test]
fn every_example_passes_the_schema_the_loader_and_validation() {
    let mut examples = Vec::new();
    toml_files(&manifest_dir().join("examples"), &mut examples);
    examples.sort();
    assert!(!examples.is_empty(), "no *.toml under examples/");
    let validator = validator();
    for path in &examples {
        let text = std::fs::read_to_string(path).expect("read example");
        let instance = toml_to_json(&text).unwrap_or_else(|e| panic!("{} is not TOML: {e}", path.display()));
        let errors = schema_errors(&validator, &instance);
        assert!(
            errors.is_empty(),
            "{} fails the JSON Schema: {errors:#?}",
            path.display()
        );
        let config = concord::config::load(path).unwrap_or_else(|e| panic!("{} does not load: {e}", path.display()));
        let problems: Vec<String> = concord::config::validate(&config)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(problems.is_empty(), "{} has problems: {problems:#?}", path.display());
    }
}

/// A small configuration both the schema and the loader accept; each invalid case
/// below changes one thing in it.
const BASE: &str = r#"
[state]
dir = "state"

[systems.crm]
type = "file"
inbox = "in"
export_dir = "out"
auth = { method = "bearer", token = { env = "CRM_TOKEN" } }

[entities.contact]
schema = "contact.schema.json"

[[links]]
system = "crm"
entity = "contact"
object = "contacts"
id_field = "Id"
capture = { interval_secs = 30 }
map = [{ canonical = "email", system = "Email" }]
"#;

#[test]
fn the_base_case_is_accepted_by_both() {
    let instance = toml_to_json(BASE).expect("base is TOML");
    assert_eq!(schema_errors(&validator(), &instance), Vec::<String>::new());
    concord::config::parse(BASE).expect("base parses");
}

#[test]
fn mistakes_are_rejected_by_the_schema_and_by_the_loader() {
    let cases = [
        (
            "unknown top-level key",
            BASE.replace("[state]", "colour = \"blue\"\n[state]"),
            "colour",
        ),
        (
            "unknown key in a system",
            BASE.replace("inbox = \"in\"", "inbox = \"in\"\ninboxx = \"x\""),
            "systems.crm",
        ),
        (
            "unknown key in a link",
            BASE.replace("object = \"contacts\"", "object = \"contacts\"\nobjekt = \"x\""),
            "links[0].objekt",
        ),
        (
            "unknown key in a map rule",
            BASE.replace("system = \"Email\" }", "system = \"Email\", canonicle = \"x\" }"),
            "links[0].map[0].canonicle",
        ),
        (
            "literal secret",
            BASE.replace("token = { env = \"CRM_TOKEN\" }", "token = \"s3cr3t\""),
            "systems.crm.auth",
        ),
        (
            "two secret sources",
            BASE.replace("{ env = \"CRM_TOKEN\" }", "{ env = \"CRM_TOKEN\", file = \"t\" }"),
            "systems.crm.auth",
        ),
        (
            "unknown connector type",
            BASE.replace("type = \"file\"", "type = \"ftp\""),
            "systems.crm",
        ),
        (
            "missing connector type",
            BASE.replace("type = \"file\"\n", ""),
            "systems.crm",
        ),
        ("missing id_field", BASE.replace("id_field = \"Id\"\n", ""), "links[0]"),
        (
            "wrong value type",
            BASE.replace("interval_secs = 30", "interval_secs = \"30\""),
            "links[0].capture.interval_secs",
        ),
    ];
    let validator = validator();
    let mut failures = Vec::new();
    for (name, text, path) in cases {
        assert_ne!(text, BASE, "case {name:?} changes nothing");
        let instance = toml_to_json(&text).expect("case is TOML");
        if validator.is_valid(&instance) {
            failures.push(format!("{name}: the JSON Schema accepts it"));
        }
        match concord::config::parse(&text) {
            Ok(_) => failures.push(format!("{name}: the loader accepts it")),
            Err(concord::config::LoadError::Parse { path: found, message }) => {
                if found != path {
                    failures.push(format!("{name}: loader error at {found} ({message}), not {path}"));
                }
            }
            Err(other) => failures.push(format!("{name}: unexpected error {other:?}")),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn a_literal_secret_is_not_echoed_in_the_load_error() {
    let text = BASE.replace("token = { env = \"CRM_TOKEN\" }", "token = \"s3cr3t-canary\"");
    let error = concord::config::parse(&text).expect_err("literal secret rejected");
    assert!(!error.to_string().contains("s3cr3t-canary"), "{error}");
}
