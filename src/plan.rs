//! `concord plan`: what a configuration will do, shown before it does it. The system
//! inventory (who is connected, how, which fields each owns) and, per entity, where
//! every canonical field comes from and where it goes, as aligned text or as a Mermaid
//! flowchart for documentation.
//!
//! Rendering is a pure function of the configuration: it reads no schema files and
//! contacts no system, so it works on a configuration that does not validate yet (links
//! to unknown systems or entities are left out rather than guessed at).
//!
//! A link captures when its system's direction reads and it has a `capture` schedule;
//! it writes when its system's direction writes and its write mode is not `read_only`.
//! These are the same rules the engine applies.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use crate::config::{
    Config, ConnectorConfig, DefaultPolicy, Direction, EntityConfig, FieldMapConfig, LinkConfig, MapDirection,
    OneOrMany, SystemConfig, Transform, WriteMode,
};

/// Placeholder for an empty cell.
const NONE: &str = "—";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanFormat {
    /// Aligned text tables, for a terminal.
    Table,
    /// A Mermaid `flowchart LR`, for documentation.
    Mermaid,
}

impl std::str::FromStr for PlanFormat {
    type Err = UnknownFormat;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "table" => Ok(PlanFormat::Table),
            "mermaid" => Ok(PlanFormat::Mermaid),
            other => Err(UnknownFormat(other.to_string())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown plan format {0:?} (expected table or mermaid)")]
pub struct UnknownFormat(String);

/// Renders the plan of `config` in `format`.
pub fn render(config: &Config, format: PlanFormat) -> String {
    let plan = Plan::new(config);
    match format {
        PlanFormat::Table => plan.table(),
        PlanFormat::Mermaid => plan.mermaid(),
    }
}

/// A link whose system and entity both exist, with what it effectively does.
struct Flow<'a> {
    link: &'a LinkConfig,
    captures: bool,
    writes: bool,
}

impl Flow<'_> {
    /// Canonical fields this link produces from captured changes, in rule order.
    fn captured_fields(&self) -> Vec<&str> {
        if !self.captures {
            return Vec::new();
        }
        unique(self.link.map.iter().filter(|r| inbound(r)).flat_map(canonical_fields))
    }

    /// Canonical fields this link writes to its system, in rule order.
    fn written_fields(&self) -> Vec<&str> {
        if !self.writes {
            return Vec::new();
        }
        unique(self.link.map.iter().filter(|r| outbound(r)).flat_map(canonical_fields))
    }

    /// How writes through this link are held back, if they are: "dry run", a rollout.
    fn write_notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if self.link.dry_run {
            notes.push("dry run".to_string());
        }
        if let Some(rollout) = &self.link.rollout {
            let mut parts = Vec::new();
            if let Some(percent) = rollout.percent {
                parts.push(format!("{percent}%"));
            }
            if !rollout.allow.is_empty() {
                parts.push(format!("{} listed", rollout.allow.len()));
            }
            notes.push(format!("rollout {}", parts.join(" + ")));
        }
        notes
    }
}

struct Plan<'a> {
    config: &'a Config,
    flows: Vec<Flow<'a>>,
}

impl<'a> Plan<'a> {
    fn new(config: &'a Config) -> Self {
        let flows = config
            .links
            .iter()
            .filter(|link| config.entities.contains_key(&link.entity))
            .filter_map(|link| {
                let system = config.systems.get(&link.system)?;
                Some(Flow {
                    link,
                    captures: system.direction.reads() && link.capture.is_some(),
                    writes: system.direction.writes() && link.write_mode() != WriteMode::ReadOnly,
                })
            })
            .collect();
        Self { config, flows }
    }

    fn flows_of_entity(&self, entity: &str) -> impl Iterator<Item = &Flow<'a>> {
        self.flows.iter().filter(move |f| f.link.entity == entity)
    }

    fn table(&self) -> String {
        let mut out = String::from("systems\n");
        out.push_str(&self.inventory());
        for (name, entity) in &self.config.entities {
            let _ = writeln!(out, "\nentity {name} ({})", entity.schema.display());
            out.push_str(&self.entity_table(name, entity));
        }
        out
    }

    fn inventory(&self) -> String {
        let mut rows = Vec::new();
        for (name, system) in &self.config.systems {
            let flows: Vec<&Flow> = self.flows.iter().filter(|f| &f.link.system == name).collect();
            let entities = unique(flows.iter().map(|f| f.link.entity.as_str()));
            let mut owns = Vec::new();
            for (entity_name, entity) in &self.config.entities {
                for (field, authority) in &entity.fields {
                    if authority.owners.contains(name) {
                        owns.push(format!("{entity_name}.{field}"));
                    }
                }
            }
            rows.push(vec![
                name.clone(),
                system.connector.type_name().to_string(),
                direction_name(system.direction).to_string(),
                capture_summary(system, &flows),
                system.auth.as_ref().map_or("none", |a| a.method_name()).to_string(),
                list_or_none(&entities),
                list_or_none(&owns),
                system.description.clone().unwrap_or_else(|| NONE.to_string()),
            ]);
        }
        let headers = [
            "system",
            "type",
            "direction",
            "capture",
            "auth",
            "entities",
            "owns",
            "description",
        ];
        table(&headers, rows)
    }

    fn entity_table(&self, name: &str, entity: &EntityConfig) -> String {
        let fields = unique(
            self.flows_of_entity(name)
                .flat_map(|f| f.link.map.iter().flat_map(canonical_fields)),
        );
        let mut fields = fields;
        fields.sort_unstable();
        if fields.is_empty() {
            return "(no mapped fields)\n".to_string();
        }
        let mut rows = Vec::new();
        for field in fields {
            let authority = entity.fields.get(field).filter(|a| !a.owners.is_empty());
            let owners = match authority {
                Some(a) => a.owners.join(if a.owners_equal { " = " } else { " > " }),
                None => format!("default: {}", default_policy_name(entity.default_policy)),
            };
            let non_owner = authority.map_or(NONE, |a| a.non_owner.as_str());

            let mut read_from = Vec::new();
            let mut written_to = Vec::new();
            let mut transforms = Vec::new();
            for flow in self.flows_of_entity(name) {
                let system = &flow.link.system;
                let rules: Vec<&FieldMapConfig> = flow
                    .link
                    .map
                    .iter()
                    .filter(|r| canonical_fields(r).any(|f| f == field))
                    .collect();
                if rules.is_empty() {
                    continue;
                }
                if flow.captures && rules.iter().any(|r| inbound(r)) {
                    let constant = rules.iter().filter(|r| inbound(r)).all(|r| r.constant.is_some());
                    read_from.push(if constant {
                        format!("{system} (constant)")
                    } else {
                        system.clone()
                    });
                }
                if flow.writes && rules.iter().any(|r| outbound(r)) {
                    let notes = flow.write_notes();
                    written_to.push(if notes.is_empty() {
                        system.clone()
                    } else {
                        format!("{system} ({})", notes.join(", "))
                    });
                }
                let steps = unique_owned(rules.iter().flat_map(|r| rule_steps(r)));
                if !steps.is_empty() {
                    transforms.push(format!("{system}: {}", steps.join(", ")));
                }
            }
            rows.push(vec![
                field.to_string(),
                owners,
                non_owner.to_string(),
                list_or_none(&read_from),
                list_or_none(&written_to),
                if transforms.is_empty() {
                    NONE.to_string()
                } else {
                    transforms.join("; ")
                },
            ]);
        }
        table(
            &["field", "owners", "non-owner", "read from", "written to", "transforms"],
            rows,
        )
    }

    fn mermaid(&self) -> String {
        let mut out = String::from("flowchart LR\n");
        for (name, system) in &self.config.systems {
            let label = format!(
                "{name} ({}, {})",
                system.connector.type_name(),
                direction_name(system.direction)
            );
            let _ = writeln!(out, "    {}[\"{}\"]", node_id("s", name), escape_label(&label));
        }
        for name in self.config.entities.keys() {
            let _ = writeln!(out, "    {}([\"{}\"])", node_id("e", name), escape_label(name));
        }
        for flow in &self.flows {
            let system_node = node_id("s", &flow.link.system);
            let entity_node = node_id("e", &flow.link.entity);
            let entity = &self.config.entities[&flow.link.entity];
            let owned = |field: &str| {
                let owns = entity
                    .fields
                    .get(field)
                    .is_some_and(|a| a.owners.contains(&flow.link.system));
                if owns { format!("{field}*") } else { field.to_string() }
            };
            let captured = flow.captured_fields();
            if !captured.is_empty() {
                let label: Vec<String> = captured.iter().map(|f| owned(f)).collect();
                let _ = writeln!(
                    out,
                    "    {system_node} -->|\"{}\"| {entity_node}",
                    escape_label(&label.join(", "))
                );
            }
            let written = flow.written_fields();
            if !written.is_empty() {
                let mut label = written.iter().map(|f| owned(f)).collect::<Vec<_>>().join(", ");
                let notes = flow.write_notes();
                if !notes.is_empty() {
                    let _ = write!(label, " ({})", notes.join(", "));
                }
                let arrow = if flow.link.dry_run { "-.->" } else { "-->" };
                let _ = writeln!(
                    out,
                    "    {entity_node} {arrow}|\"{}\"| {system_node}",
                    escape_label(&label)
                );
            }
        }
        out.push_str("    %% field* = owned by the system on that edge; dotted = dry run\n");
        out
    }
}

/// Capture of a system, from its capturing links: "file inbox, every 10s".
fn capture_summary(system: &SystemConfig, flows: &[&Flow]) -> String {
    let mut intervals: Vec<u64> = flows
        .iter()
        .filter(|f| f.captures)
        .filter_map(|f| f.link.capture.as_ref().map(|c| c.interval_secs))
        .collect();
    if intervals.is_empty() {
        return NONE.to_string();
    }
    intervals.sort_unstable();
    intervals.dedup();
    let every: Vec<String> = intervals.into_iter().map(duration_text).collect();
    let how = match &system.connector {
        ConnectorConfig::File(_) => "file inbox",
        ConnectorConfig::Rest(_) => "rest poll",
        ConnectorConfig::Postgres(_) => "logical replication",
    };
    format!("{how}, every {}", every.join("/"))
}

fn duration_text(secs: u64) -> String {
    if secs >= 3600 && secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs >= 60 && secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

/// What a rule does to a value besides renaming it: join, split, constant, transforms.
fn rule_steps(rule: &FieldMapConfig) -> Vec<String> {
    let mut steps = Vec::new();
    match (&rule.canonical, &rule.system) {
        (_, OneOrMany::Many(system)) => steps.push(format!("join {}", system.join("+"))),
        (Some(OneOrMany::Many(_)), OneOrMany::One(system)) => steps.push(format!("split {system}")),
        _ => {}
    }
    if rule.constant.is_some() {
        steps.push("constant".to_string());
    }
    steps.extend(rule.transforms.iter().map(transform_name));
    steps
}

fn transform_name(transform: &Transform) -> String {
    match transform {
        Transform::Trim => "trim".into(),
        Transform::Lower => "lower".into(),
        Transform::Upper => "upper".into(),
        Transform::E164 => "e164".into(),
        Transform::Date { system, canonical } => format!("date {system} → {canonical}"),
        Transform::Map(table) => format!("map ({} values)", table.len()),
        Transform::Parse(kind) => {
            let kind = match kind {
                crate::config::ParseType::Bool => "bool",
                crate::config::ParseType::Integer => "integer",
                crate::config::ParseType::Number => "number",
            };
            format!("parse {kind}")
        }
        Transform::EmptyAsNull => "empty_as_null".into(),
    }
}

fn canonical_fields(rule: &FieldMapConfig) -> impl Iterator<Item = &str> {
    rule.canonical
        .iter()
        .flat_map(|c| c.as_slice().iter().map(String::as_str))
}

fn inbound(rule: &FieldMapConfig) -> bool {
    matches!(rule.direction, MapDirection::Both | MapDirection::In)
}

fn outbound(rule: &FieldMapConfig) -> bool {
    matches!(rule.direction, MapDirection::Both | MapDirection::Out)
}

fn direction_name(direction: Direction) -> &'static str {
    match direction {
        Direction::Read => "read",
        Direction::Write => "write",
        Direction::Both => "both",
    }
}

fn default_policy_name(policy: DefaultPolicy) -> &'static str {
    match policy {
        DefaultPolicy::LastWriterWins => "last_writer_wins",
        DefaultPolicy::FirstWriterWins => "first_writer_wins",
    }
}

/// First occurrences, in order.
fn unique<'s>(items: impl IntoIterator<Item = &'s str>) -> Vec<&'s str> {
    let mut seen = BTreeSet::new();
    items.into_iter().filter(|item| seen.insert(*item)).collect()
}

fn unique_owned(items: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut seen = BTreeSet::new();
    items.into_iter().filter(|item| seen.insert(item.clone())).collect()
}

fn list_or_none<S: AsRef<str>>(items: &[S]) -> String {
    if items.is_empty() {
        NONE.to_string()
    } else {
        items.iter().map(AsRef::as_ref).collect::<Vec<_>>().join(", ")
    }
}

/// Left-aligned columns two spaces apart, a dashed rule under the headers, no trailing
/// spaces. Widths count characters, which is right for the names and symbols used here.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    let mut out = String::new();
    for row in std::iter::once(&header).chain(std::iter::once(&rule)).chain(&rows) {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            let pad = width.saturating_sub(cell.chars().count());
            line.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A Mermaid node id: a kind prefix keeps a system and an entity of the same name apart
/// and keeps ids clear of Mermaid keywords such as `end`.
fn node_id(kind: &str, name: &str) -> String {
    let safe: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' })
        .collect();
    format!("{kind}_{safe}")
}

/// Text inside a quoted Mermaid label; `"` would end the label.
fn escape_label(text: &str) -> String {
    text.replace('"', "#quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
        [state]
        dir = "state"

        [systems.hr]
        type = "file"
        direction = "read"
        inbox = "hr/inbox"
        description = "nightly HR export"

        [systems.crm]
        type = "file"
        inbox = "crm/inbox"
        export_dir = "crm/out"
        auth = { method = "bearer", token = { credential = "crm_token" } }

        [systems.directory]
        type = "file"
        direction = "write"
        export_dir = "directory/out"

        [entities.contact]
        schema = "schemas/contact.schema.json"
        match_keys = ["email"]

        [entities.contact.fields.full_name]
        owners = ["hr"]

        [entities.contact.fields.phone]
        owners = ["crm", "hr"]
        non_owner = "flag"

        [entities.contact.fields.title]
        owners = ["hr", "crm"]
        owners_equal = true
        non_owner = "ignore"

        [[links]]
        system = "hr"
        entity = "contact"
        object = "people.csv"
        id_field = "emp_no"
        write = "read_only"
        capture = { interval_secs = 300 }
        map = [
            { canonical = "email", system = "mail", transforms = ["trim", "lower"] },
            { canonical = "full_name", system = ["first", "last"] },
            { canonical = "phone", system = "tel", transforms = ["e164"] },
            { canonical = "title", system = "job_title" },
        ]

        [[links]]
        system = "crm"
        entity = "contact"
        object = "contacts"
        id_field = "Id"
        capture = {}
        map = [
            { canonical = "email", system = "Email" },
            { canonical = "full_name", system = "Name", direction = "out" },
            { canonical = "phone", system = "Phone", transforms = ["trim", "e164"] },
            { system = "Source", constant = "concord" },
        ]

        [[links]]
        system = "directory"
        entity = "contact"
        object = "directory.csv"
        id_field = "id"
        dry_run = true
        map = [
            { canonical = "full_name", system = "display_name" },
            { canonical = "title", system = "title" },
        ]
    "#;

    fn config() -> Config {
        crate::config::parse(CONFIG).expect("fixture parses")
    }

    /// The line of `text` whose first column is `first`, with runs of spaces collapsed
    /// to one so that the assertion does not depend on column widths.
    fn row(text: &str, first: &str) -> String {
        let line = text
            .lines()
            .find(|l| l.split("  ").next() == Some(first))
            .unwrap_or_else(|| panic!("no row {first:?} in\n{text}"));
        line.split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect::<Vec<_>>()
            .join(" | ")
    }

    #[test]
    fn table_lists_the_inventory_and_every_field_flow() {
        let text = render(&config(), PlanFormat::Table);
        let expected_rows = [
            (
                "crm",
                "crm | file | both | file inbox, every 10s | bearer | contact | contact.phone, contact.title | —",
            ),
            ("directory", "directory | file | write | — | none | contact | — | —"),
            (
                "hr",
                "hr | file | read | file inbox, every 5m | none | contact | contact.full_name, contact.phone, contact.title | nightly HR export",
            ),
            (
                "email",
                "email | default: last_writer_wins | — | hr, crm | crm | hr: trim, lower",
            ),
            (
                "full_name",
                "full_name | hr | revert | hr | crm, directory (dry run) | hr: join first+last",
            ),
            (
                "phone",
                "phone | crm > hr | flag | hr, crm | crm | hr: e164; crm: trim, e164",
            ),
            ("title", "title | hr = crm | ignore | hr | directory (dry run) | —"),
        ];
        for (first, expected) in expected_rows {
            assert_eq!(row(&text, first), expected, "in\n{text}");
        }
        assert!(
            text.contains("\nentity contact (schemas/contact.schema.json)\n"),
            "{text}"
        );
        assert!(text.lines().all(|l| !l.ends_with(' ')), "trailing spaces in\n{text}");

        // Columns line up: every cell of the owners column starts at the same character.
        let column = |line_start: &str, cell: &str| {
            let line = text.lines().find(|l| l.starts_with(line_start)).expect("line present");
            let byte = line.find(cell).expect("cell present");
            line[..byte].chars().count()
        };
        let owners = column("field ", "owners");
        assert_eq!(column("email ", "default: last_writer_wins"), owners);
        assert_eq!(column("phone ", "crm > hr"), owners);
        let read_from = column("field ", "read from");
        assert_eq!(column("title ", "hr = crm"), owners);
        assert_eq!(column("email ", "hr, crm"), read_from, "after a cell holding '—'");
    }

    #[test]
    fn mermaid_has_a_node_per_system_and_entity_and_an_edge_per_flow() {
        let text = render(&config(), PlanFormat::Mermaid);
        assert_eq!(text.lines().next(), Some("flowchart LR"));
        for line in [
            r#"    s_crm["crm (file, both)"]"#,
            r#"    s_directory["directory (file, write)"]"#,
            r#"    s_hr["hr (file, read)"]"#,
            r#"    e_contact(["contact"])"#,
            r#"    s_hr -->|"email, full_name*, phone*, title*"| e_contact"#,
            r#"    s_crm -->|"email, phone*"| e_contact"#,
            r#"    e_contact -->|"email, full_name, phone*"| s_crm"#,
            r#"    e_contact -.->|"full_name, title (dry run)"| s_directory"#,
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
        }
        // hr is read-only and directory write-only: no edge goes the other way.
        assert!(!text.contains("-->|\"email, full_name, phone, title\"| s_hr"), "{text}");
        assert!(!text.lines().any(|l| l.starts_with("    s_directory -")), "{text}");
        assert!(!text.lines().any(|l| l.contains("| s_hr")), "{text}");
    }

    #[test]
    fn links_to_unknown_systems_are_left_out_and_rollouts_are_shown() {
        let mut config = config();
        let mut ghost = config.links[1].clone();
        ghost.system = "ghost".into();
        config.links.push(ghost);
        config.links[1].rollout = Some(crate::config::RolloutConfig {
            percent: Some(25.0),
            allow: vec!["a".into()],
        });
        let table = render(&config, PlanFormat::Table);
        assert!(!table.contains("ghost"), "{table}");
        assert_eq!(
            row(&table, "phone"),
            "phone | crm > hr | flag | hr, crm | crm (rollout 25% + 1 listed) | hr: e164; crm: trim, e164"
        );
        let mermaid = render(&config, PlanFormat::Mermaid);
        assert!(!mermaid.contains("ghost"), "{mermaid}");
        assert!(
            mermaid.contains(r#"e_contact -->|"email, full_name, phone* (rollout 25% + 1 listed)"| s_crm"#),
            "{mermaid}"
        );
    }

    #[test]
    fn format_names_parse() {
        assert_eq!("table".parse::<PlanFormat>().ok(), Some(PlanFormat::Table));
        assert_eq!("mermaid".parse::<PlanFormat>().ok(), Some(PlanFormat::Mermaid));
        assert!("dot".parse::<PlanFormat>().is_err());
    }
}
