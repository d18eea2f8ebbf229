//! Link mapping tests. Links are written as the TOML an operator would write, so each
//! case reads as configuration plus the records it maps.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use super::*;

fn link(extra: &str) -> LinkConfig {
    let text = format!("system = \"crm\"\nentity = \"contact\"\nobject = \"Contact\"\nid_field = \"Id\"\n{extra}");
    toml::from_str(&text).expect("test link parses")
}

fn mapping(extra: &str) -> LinkMapping {
    LinkMapping::compile(&link(extra)).expect("test mapping compiles")
}

fn record(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("test record must be an object, got {other}"),
    }
}

fn fields(value: Value) -> Fields {
    serde_json::from_value(value).expect("test fields are an object")
}

fn only(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

const CONTACT: &str = r#"
default_country_code = "+44"

[[map]]
canonical = "email"
system = "Email"
transforms = ["trim", "lower"]

[[map]]
canonical = ["first_name", "last_name"]
system = "Name"

[[map]]
canonical = "phone"
system = "Phone"
transforms = ["empty_as_null", "e164"]

[[map]]
canonical = "certified"
system = "Certified"
transforms = [{ parse = "bool" }]

[[map]]
canonical = "certified_at"
system = "CertDate"
transforms = [{ date = { system = "%m/%d/%Y", canonical = "%Y-%m-%d" } }]

[[map]]
canonical = "active"
system = "Status"
transforms = [{ map = { A = true, I = false } }]

[[map]]
system = "Source"
constant = "concord"

[[map]]
canonical = "company"
system = "Account"
direction = "in"

[[map]]
canonical = "title"
system = "JobTitle"
direction = "out"
"#;

#[test]
fn inbound_maps_a_full_record() {
    let m = mapping(CONTACT);
    let got = m
        .inbound(&record(json!({
            "Id": "003A",
            "Email": "  Ada@Example.COM ",
            "Name": "Ada King Lovelace",
            "Phone": "07700 900123",
            "Certified": "Yes",
            "CertDate": "07/04/2024",
            "Status": "A",
            "Source": "ignored inbound",
            "Account": "Analytical Engines",
            "JobTitle": "ignored inbound",
            "Unmapped": "ignored"
        })))
        .expect("maps");
    assert_eq!(
        got,
        fields(json!({
            "email": "ada@example.com",
            "first_name": "Ada",
            "last_name": "King Lovelace",
            "phone": "+447700900123",
            "certified": true,
            "certified_at": "2024-07-04",
            "active": true,
            "company": "Analytical Engines"
        }))
    );
}

#[test]
fn missing_fields_stay_absent_and_null_stays_null() {
    let m = mapping(CONTACT);
    // A partial record, as a webhook sends it: only what changed.
    let got = m
        .inbound(&record(json!({ "Phone": null, "Certified": "no" })))
        .expect("maps");
    assert_eq!(got, fields(json!({ "phone": null, "certified": false })));
    // Null through a split clears every part.
    let got = m.inbound(&record(json!({ "Name": null }))).expect("maps");
    assert_eq!(got, fields(json!({ "first_name": null, "last_name": null })));
    // Empty becomes null before the phone check.
    let got = m.inbound(&record(json!({ "Phone": "" }))).expect("maps");
    assert_eq!(got, fields(json!({ "phone": null })));
    assert_eq!(m.inbound(&Map::new()).expect("maps"), Fields::new());
}

#[test]
fn outbound_undoes_transforms_and_sets_constants() {
    let m = mapping(CONTACT);
    let agreed = fields(json!({
        "email": "ada@example.com",
        "first_name": "Ada",
        "last_name": "Lovelace",
        "phone": "+447700900123",
        "certified": true,
        "certified_at": "2024-07-04",
        "active": false,
        "company": "Analytical Engines",
        "title": "Analyst"
    }));
    let got = m.outbound(&agreed, None).expect("maps");
    assert_eq!(
        Value::Object(got),
        json!({
            "Email": "ada@example.com",
            "Name": "Ada Lovelace",
            "Phone": "+447700900123",
            "Certified": true,
            "CertDate": "07/04/2024",
            "Status": "I",
            "Source": "concord",
            "JobTitle": "Analyst"
        })
    );
}

#[test]
fn outbound_only_emits_rules_touching_the_changed_fields() {
    let m = mapping(CONTACT);
    let agreed = fields(json!({
        "email": "ada@example.com",
        "first_name": "Ada",
        "last_name": "Byron",
        "phone": "+447700900123",
        "title": "Analyst"
    }));
    let cases: Vec<(BTreeSet<String>, Value)> = vec![
        // The split rule takes first_name from the agreed record.
        (
            only(&["last_name"]),
            json!({ "Name": "Ada Byron", "Source": "concord" }),
        ),
        (
            only(&["phone"]),
            json!({ "Phone": "+447700900123", "Source": "concord" }),
        ),
        (
            only(&["email", "title"]),
            json!({ "Email": "ada@example.com", "JobTitle": "Analyst", "Source": "concord" }),
        ),
        // An inbound-only field is never written.
        (only(&["company"]), json!({ "Source": "concord" })),
        // Constants go out on every write, even when nothing else does.
        (only(&[]), json!({ "Source": "concord" })),
        // A changed field the agreed record does not hold is skipped, not nulled.
        (only(&["certified"]), json!({ "Source": "concord" })),
    ];
    for (only, expected) in cases {
        let got = m.outbound(&agreed, Some(&only)).expect("maps");
        assert_eq!(Value::Object(got), expected, "only {only:?}");
    }
}

#[test]
fn split_and_join_round_trip() {
    let m = mapping(
        r#"
[[map]]
canonical = ["first_name", "last_name"]
system = "Name"

[[map]]
canonical = "full_name"
system = ["GivenName", "FamilyName"]

[[map]]
canonical = "address"
system = ["Street", "City", "Postcode"]
separator = ", "
"#,
    );
    let system = record(json!({
        "Name": "Ada King Lovelace",
        "GivenName": "Ada",
        "FamilyName": "King Lovelace",
        "Street": "12 St James's Square",
        "City": "London",
        "Postcode": "SW1Y 4JH"
    }));
    let canonical = m.inbound(&system).expect("maps in");
    assert_eq!(
        canonical,
        fields(json!({
            "first_name": "Ada",
            "last_name": "King Lovelace",
            "full_name": "Ada King Lovelace",
            "address": "12 St James's Square, London, SW1Y 4JH"
        }))
    );
    let back = m.outbound(&canonical, None).expect("maps out");
    assert_eq!(back, system);
}

#[test]
fn split_and_join_edges() {
    let m = mapping(
        r#"
[[map]]
canonical = ["first_name", "middle_name", "last_name"]
system = "Name"

[[map]]
canonical = "full_name"
system = ["GivenName", "FamilyName"]
"#,
    );
    // Missing parts of a split are null.
    let got = m.inbound(&record(json!({ "Name": "Ada" }))).expect("maps");
    assert_eq!(
        got,
        fields(json!({ "first_name": "Ada", "middle_name": null, "last_name": null }))
    );
    // A join skips empty and null parts, and is null only when every part is null.
    let cases = [
        (
            json!({ "GivenName": "Ada", "FamilyName": "" }),
            json!({ "full_name": "Ada" }),
        ),
        (
            json!({ "GivenName": null, "FamilyName": "Lovelace" }),
            json!({ "full_name": "Lovelace" }),
        ),
        (
            json!({ "GivenName": null, "FamilyName": null }),
            json!({ "full_name": null }),
        ),
        (
            json!({ "GivenName": 7, "FamilyName": "Lovelace" }),
            json!({ "full_name": "7 Lovelace" }),
        ),
        // A partial record lacking a part leaves the joined field alone.
        (json!({ "GivenName": "Ada" }), json!({})),
    ];
    for (input, expected) in cases {
        assert_eq!(
            m.inbound(&record(input.clone())).expect("maps"),
            fields(expected),
            "{input}"
        );
    }
    let err = m
        .inbound(&record(json!({ "GivenName": true, "FamilyName": "x" })))
        .expect_err("a boolean is not text");
    assert_eq!(
        err.to_string(),
        "field \"full_name\" (system field \"GivenName+FamilyName\"): expected text, found boolean"
    );
    // Outbound: the split side gets nulls for a cleared value; the join side skips
    // absent parts and is null when all are null.
    let out = m.outbound(&fields(json!({ "full_name": null })), None).expect("maps");
    assert_eq!(Value::Object(out), json!({ "GivenName": null, "FamilyName": null }));
    let out = m
        .outbound(&fields(json!({ "first_name": "Ada", "last_name": "Lovelace" })), None)
        .expect("maps");
    assert_eq!(Value::Object(out), json!({ "Name": "Ada Lovelace" }));
    let out = m
        .outbound(&fields(json!({ "first_name": null, "middle_name": null })), None)
        .expect("maps");
    assert_eq!(Value::Object(out), json!({ "Name": null }));
    assert!(m.outbound(&Fields::new(), None).expect("maps").is_empty());
}

#[test]
fn canonical_constants_apply_inbound_only() {
    let m = mapping(
        r#"
[[map]]
canonical = "certified"
system = "CertifiedFlag"
constant = true

[[map]]
canonical = "email"
system = "Email"
"#,
    );
    let got = m.inbound(&record(json!({ "Email": "ada@example.com" }))).expect("maps");
    assert_eq!(got, fields(json!({ "certified": true, "email": "ada@example.com" })));
    assert_eq!(
        m.inbound(&Map::new()).expect("maps"),
        fields(json!({ "certified": true }))
    );
    let out = m.outbound(&fields(json!({ "certified": false, "email": "a@b.co" })), None);
    assert_eq!(Value::Object(out.expect("maps")), json!({ "Email": "a@b.co" }));
    assert_eq!(m.inbound_fields(), only(&["certified", "email"]));
    assert_eq!(m.outbound_fields(), only(&["email"]));
    assert_eq!(m.describe_transforms("certified"), vec!["constant true"]);
}

#[test]
fn date_round_trip_with_zone() {
    let m = mapping(
        r#"
[[map]]
canonical = "updated_at"
system = "Modified"
transforms = [{ date = { system = "%d/%m/%Y %H:%M:%S %z", canonical = "%Y-%m-%dT%H:%M:%S%:z" } }]
"#,
    );
    let system = record(json!({ "Modified": "31/03/2024 01:30:00 -0700" }));
    let canonical = m.inbound(&system).expect("maps in");
    assert_eq!(canonical, fields(json!({ "updated_at": "2024-03-31T01:30:00-07:00" })));
    assert_eq!(m.outbound(&canonical, None).expect("maps out"), system);
}

#[test]
fn map_inverse_round_trip() {
    let m = mapping(
        r#"
[[map]]
canonical = "status"
system = "State"
transforms = ["upper", { map = { E = "enrolled", P = "in_progress", C = "completed", W = "withdrawn" } }]
"#,
    );
    for (code, status) in [("e", "enrolled"), ("P", "in_progress"), ("C", "completed")] {
        let canonical = m.inbound(&record(json!({ "State": code }))).expect("maps in");
        assert_eq!(canonical, fields(json!({ "status": status })));
        let back = m.outbound(&canonical, None).expect("maps out");
        assert_eq!(Value::Object(back), json!({ "State": code.to_uppercase() }));
    }
    let err = m
        .outbound(&fields(json!({ "status": "lost" })), None)
        .expect_err("not in map");
    assert_eq!(
        err.to_string(),
        "field \"status\" (system field \"State\"): value has no entry in the map to write back"
    );
    let err = m.inbound(&record(json!({ "State": "Z" }))).expect_err("not in map");
    assert_eq!(
        err.to_string(),
        "field \"status\" (system field \"State\"): value is not in the map"
    );
}

#[test]
fn value_errors_name_the_field_not_the_value() {
    let m = mapping(
        r#"
[[map]]
canonical = "phone"
system = "Phone"
transforms = ["e164"]

[[map]]
canonical = "certified"
system = "Certified"
transforms = [{ parse = "bool" }]
"#,
    );
    let cases = [
        (
            json!({ "Phone": "+123" }),
            "+123",
            "field \"phone\" (system field \"Phone\"): not a phone number (3 digits, E.164 needs 8 to 15)",
        ),
        (
            json!({ "Phone": "07700 900123" }),
            "07700",
            "field \"phone\" (system field \"Phone\"): not a phone number (no country code, and \
             the link has no default_country_code)",
        ),
        (
            json!({ "Certified": "sometimes" }),
            "sometimes",
            "field \"certified\" (system field \"Certified\"): cannot parse as boolean",
        ),
    ];
    for (input, secret, expected) in cases {
        let err = m.inbound(&record(input)).expect_err("bad value");
        let text = err.to_string();
        assert_eq!(text, expected);
        assert!(!text.contains(secret));
    }
}

#[test]
fn inventory_helpers() {
    let m = mapping(CONTACT);
    assert_eq!(
        m.inbound_fields(),
        only(&[
            "active",
            "certified",
            "certified_at",
            "company",
            "email",
            "first_name",
            "last_name",
            "phone"
        ])
    );
    assert_eq!(
        m.outbound_fields(),
        only(&[
            "active",
            "certified",
            "certified_at",
            "email",
            "first_name",
            "last_name",
            "phone",
            "title"
        ])
    );
    assert_eq!(m.system_fields_for("last_name"), vec!["Name"]);
    assert_eq!(m.system_fields_for("email"), vec!["Email"]);
    assert!(m.system_fields_for("nope").is_empty());
    assert_eq!(m.describe_transforms("email"), vec!["trim", "lower"]);
    assert_eq!(
        m.describe_transforms("phone"),
        vec!["empty as null", "e164 (default +44)"]
    );
    assert_eq!(m.describe_transforms("certified_at"), vec!["date %m/%d/%Y -> %Y-%m-%d"]);
    assert_eq!(m.describe_transforms("active"), vec!["map (2 values)"]);
    assert_eq!(
        m.describe_transforms("first_name"),
        vec!["split Name into first_name+last_name"]
    );
    assert_eq!(m.describe_transforms("company"), vec!["in only"]);
    assert_eq!(m.describe_transforms("title"), vec!["out only"]);
    assert_eq!(
        m.system_constants(),
        BTreeMap::from([("Source".to_string(), json!("concord"))])
    );

    let joined = mapping(
        r#"
[[map]]
canonical = "full_name"
system = ["first", "last"]
transforms = ["trim"]

[[map]]
canonical = "address"
system = ["street", "city"]
separator = ", "
"#,
    );
    assert_eq!(joined.describe_transforms("full_name"), vec!["join first+last", "trim"]);
    assert_eq!(
        joined.describe_transforms("address"),
        vec!["join street+city on \", \""]
    );
    assert_eq!(joined.system_fields_for("full_name"), vec!["first", "last"]);
}

#[test]
fn nonsense_rules_are_rejected() {
    let cases: &[(&str, &str)] = &[
        (
            "[[map]]\ncanonical = [\"a\", \"b\"]\nsystem = [\"A\", \"B\"]",
            "canonical and system cannot both be lists",
        ),
        (
            "[[map]]\ncanonical = \"d\"\nsystem = \"D\"\ntransforms = [{ date = { system = \"%m/%d/%Q\", canonical = \"%Y-%m-%d\" } }]",
            "date format %m/%d/%Q is not a valid strftime format",
        ),
        (
            "[[map]]\ncanonical = \"d\"\nsystem = \"D\"\ntransforms = [{ date = { system = \"%Y-%m-%d\", canonical = \"%Y-%m-%dT%H:%M:%S\" } }]",
            "date format %Y-%m-%dT%H:%M:%S needs a time that format %Y-%m-%d does not give",
        ),
        (
            "[[map]]\ncanonical = \"n\"\nsystem = [\"A\", \"B\"]\ntransforms = [{ parse = \"integer\" }]",
            "transform parse does not apply to a join or split: the joined value must stay text",
        ),
        (
            "[[map]]\ncanonical = [\"a\", \"b\"]\nsystem = \"AB\"\ntransforms = [{ map = { x = 1 } }]",
            "transform map does not apply to a join or split: the joined value must stay text",
        ),
        (
            "[[map]]\ncanonical = [\"a\", \"b\"]\nsystem = \"AB\"\nseparator = \"\"",
            "an empty separator cannot split text",
        ),
        (
            "[[map]]\ncanonical = \"ab\"\nsystem = [\"A\", \"B\"]\nseparator = \"\"",
            "an empty separator cannot split text",
        ),
        (
            "[[map]]\ncanonical = \"v\"\nsystem = \"V\"\ntransforms = [{ map = { Y = true, Yes = true } }]",
            "map transform cannot be undone on the way out: two keys give the same value \
             (restrict the rule to direction = \"in\")",
        ),
        (
            "[[map]]\nsystem = \"Source\"\nconstant = \"x\"\ntransforms = [\"trim\"]",
            "transforms do not apply to a constant",
        ),
        (
            "[[map]]\nsystem = \"Source\"\nconstant = \"x\"\ndirection = \"in\"",
            "a constant without canonical only applies outbound, and direction = \"in\" leaves \
             it nothing to do",
        ),
        (
            "[[map]]\ncanonical = \"c\"\nsystem = \"C\"\nconstant = 1\ndirection = \"out\"",
            "a constant with canonical only applies inbound, and direction = \"out\" leaves it \
             nothing to do",
        ),
        (
            "[[map]]\ncanonical = [\"a\", \"b\"]\nsystem = \"C\"\nconstant = 1",
            "a constant rule sets one canonical field",
        ),
        ("[[map]]\nsystem = \"C\"", "a rule needs canonical, constant or both"),
        ("[[map]]\ncanonical = []\nsystem = \"C\"", "canonical lists no fields"),
        (
            "[[map]]\ncanonical = \"c\"\nsystem = \" \"",
            "system has an empty field name",
        ),
        (
            "[[map]]\ncanonical = \"c\"\nsystem = [\"A\", \"A\"]",
            "system names a field twice",
        ),
        (
            "[[map]]\ncanonical = \"email\"\nsystem = \"Email\"\n\n[[map]]\ncanonical = \"email\"\nsystem = \"Login\"",
            "canonical field \"email\" is already mapped by map[0]",
        ),
        (
            "[[map]]\ncanonical = \"email\"\nsystem = \"Email\"\n\n[[map]]\ncanonical = \"login\"\nsystem = \"Email\"",
            "system field \"Email\" is already mapped by map[0]",
        ),
    ];
    for (toml_rules, reason) in cases {
        match LinkMapping::compile(&link(toml_rules)) {
            Err(MappingError::Rule { reason: got, link, .. }) => {
                assert_eq!(got, *reason, "rules:\n{toml_rules}");
                assert_eq!(link, "crm.contact");
            }
            other => panic!("expected a rule error for:\n{toml_rules}\ngot {other:?}"),
        }
    }
}

#[test]
fn rule_errors_say_where() {
    let err = LinkMapping::compile(&link(
        "[[map]]\ncanonical = \"email\"\nsystem = \"Email\"\n\n[[map]]\ncanonical = [\"a\", \"b\"]\nsystem = [\"A\", \"B\"]",
    ))
    .expect_err("both lists");
    assert_eq!(
        err.to_string(),
        "link crm.contact: map[1] (a+b <-> A+B): canonical and system cannot both be lists"
    );
}

#[test]
fn allowed_overlaps_and_directions() {
    // The same canonical field read in from one system field and written out to two is
    // fine; so are an inbound and an outbound rule for one field.
    let m = mapping(
        r#"
[[map]]
canonical = "email"
system = "Email"

[[map]]
canonical = "email"
system = "Login"
direction = "out"

[[map]]
canonical = "phone"
system = "MobileRaw"
direction = "in"
transforms = ["e164"]

[[map]]
canonical = "phone"
system = "Mobile"
direction = "out"

[[map]]
canonical = "v"
system = "V"
direction = "in"
transforms = [{ map = { Y = true, Yes = true } }]
"#,
    );
    let canonical = m
        .inbound(&record(
            json!({ "Email": "a@b.co", "Login": "x", "MobileRaw": "+44 7700 900123", "Mobile": "y" }),
        ))
        .expect("maps");
    assert_eq!(
        canonical,
        fields(json!({ "email": "a@b.co", "phone": "+447700900123" }))
    );
    let out = m.outbound(&canonical, None).expect("maps");
    assert_eq!(
        Value::Object(out),
        json!({ "Email": "a@b.co", "Login": "a@b.co", "Mobile": "+447700900123" })
    );
    assert_eq!(m.system_fields_for("email"), vec!["Email", "Login"]);
}

#[test]
fn default_country_code_is_checked() {
    for bad in ["44x", "+0", "+1234", ""] {
        let l = link(&format!("default_country_code = {bad:?}"));
        assert!(
            matches!(LinkMapping::compile(&l), Err(MappingError::CountryCode { .. })),
            "{bad:?}"
        );
    }
    for good in ["+1", "44", "+353"] {
        let l = link(&format!("default_country_code = {good:?}"));
        assert!(LinkMapping::compile(&l).is_ok(), "{good:?}");
    }
}

#[test]
fn mapped_contact_passes_the_contact_schema() {
    let schema =
        EntitySchema::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/contact.schema.json"))
            .expect("contact schema loads");
    let m = mapping(CONTACT);
    let mut canonical = m
        .inbound(&record(json!({
            "Email": " Ada@Example.com",
            "Name": "Ada Lovelace",
            "Phone": "(0)7700-900-123",
            "Certified": "y",
            "CertDate": "12/10/2023",
            "Status": "I"
        })))
        .expect("maps");
    assert_eq!(schema.validate(&mut canonical), Ok(()));
    for (field, format) in [("email", Some("email")), ("phone", Some("e164"))] {
        assert_eq!(schema.property_format(field).as_deref(), format);
    }
    let key = normalise_key(&canonical["email"], schema.property_format("email").as_deref());
    assert_eq!(key.as_deref(), Some("ada@example.com"));
}
