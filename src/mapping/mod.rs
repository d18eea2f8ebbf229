//! Field mapping: how one system's fields become canonical fields and back.
//!
//! Each link's `map` rules are compiled once into a [`LinkMapping`] so that nonsense
//! (both sides lists, an invalid date format, a value table that cannot be written
//! back, two rules producing the same field) is a configuration error, not a failure
//! on every record. Inbound maps a captured system record to canonical fields; outbound
//! maps agreed canonical values to the system fields to write.
//!
//! Invariants:
//! - A system field missing from a record leaves its canonical field(s) absent, never
//!   null: partial records (webhooks, sparse exports) must not erase agreed values. An
//!   explicit JSON null is a cleared field and stays null.
//! - Errors name the field and the kind of problem, never the value: values are
//!   customer data and errors end up in logs and dead letters.
//!
//! Also here: canonical schema validation ([`EntitySchema`]), match-key normalisation
//! and rollout selection ([`normalise_key`], [`in_rollout`]).

mod key;
mod phone;
mod schema;
mod transform;

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use crate::config::{FieldMapConfig, LinkConfig, MapDirection, OneOrMany, Transform};
use crate::model::Fields;

pub use key::{in_rollout, normalise_key};
pub use phone::{PhoneProblem, normalise_e164};
pub use schema::{EntitySchema, SchemaError};
pub use transform::ValueProblem;

use transform::{Step, as_text};

#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    /// The link's `default_country_code` is not a calling code.
    #[error("link {link}: default_country_code must be + and 1 to 3 digits not starting with 0")]
    CountryCode { link: String },
    /// A rule makes no sense; `rule` is its position in the link's `map` list.
    #[error("link {link}: map[{rule}] ({fields}): {reason}")]
    Rule {
        link: String,
        rule: usize,
        fields: String,
        reason: String,
    },
    /// A value could not be mapped. `field` is the canonical field (or fields, joined
    /// with `+`), `system` the system field(s).
    #[error("field \"{field}\" (system field \"{system}\"): {problem}")]
    Value {
        field: String,
        system: String,
        problem: ValueProblem,
    },
}

/// One compiled rule.
#[derive(Debug, Clone)]
struct Rule {
    kind: RuleKind,
    /// Applied in order inbound, undone in reverse order outbound.
    steps: Vec<Step>,
    direction: MapDirection,
    separator: String,
}

#[derive(Debug, Clone)]
enum RuleKind {
    /// One system field to one canonical field.
    Rename { canonical: String, system: String },
    /// Several system fields joined into one canonical field; split on the way out.
    Join { canonical: String, system: Vec<String> },
    /// One system field split into several canonical fields; joined on the way out.
    Split { canonical: Vec<String>, system: String },
    /// The canonical field takes a constant on every inbound record. `system` names
    /// the field the constant stands for; it is never read.
    CanonicalConstant {
        canonical: String,
        system: String,
        value: Value,
    },
    /// The system field is set to a constant on every write.
    SystemConstant { system: String, value: Value },
}

impl Rule {
    fn inbound(&self) -> bool {
        matches!(self.direction, MapDirection::Both | MapDirection::In)
    }

    fn outbound(&self) -> bool {
        matches!(self.direction, MapDirection::Both | MapDirection::Out)
    }

    fn canonical(&self) -> &[String] {
        match &self.kind {
            RuleKind::Rename { canonical, .. }
            | RuleKind::Join { canonical, .. }
            | RuleKind::CanonicalConstant { canonical, .. } => std::slice::from_ref(canonical),
            RuleKind::Split { canonical, .. } => canonical,
            RuleKind::SystemConstant { .. } => &[],
        }
    }

    fn system(&self) -> &[String] {
        match &self.kind {
            RuleKind::Rename { system, .. }
            | RuleKind::Split { system, .. }
            | RuleKind::CanonicalConstant { system, .. }
            | RuleKind::SystemConstant { system, .. } => std::slice::from_ref(system),
            RuleKind::Join { system, .. } => system,
        }
    }

    /// Canonical fields the rule produces inbound.
    fn produces(&self) -> &[String] {
        if self.inbound() { self.canonical() } else { &[] }
    }

    /// Canonical fields the rule reads outbound.
    fn reads(&self) -> &[String] {
        match self.kind {
            RuleKind::CanonicalConstant { .. } => &[],
            _ if self.outbound() => self.canonical(),
            _ => &[],
        }
    }

    /// System fields the rule writes outbound.
    fn writes(&self) -> &[String] {
        match self.kind {
            RuleKind::CanonicalConstant { .. } => &[],
            _ if self.outbound() => self.system(),
            _ => &[],
        }
    }

    fn value_error(&self, problem: ValueProblem) -> MappingError {
        MappingError::Value {
            field: self.canonical().join("+"),
            system: self.system().join("+"),
            problem,
        }
    }

    fn apply_in(&self, value: Value) -> Result<Value, MappingError> {
        self.steps
            .iter()
            .try_fold(value, |v, step| step.inbound(v))
            .map_err(|p| self.value_error(p))
    }

    fn apply_out(&self, value: Value) -> Result<Value, MappingError> {
        self.steps
            .iter()
            .rev()
            .try_fold(value, |v, step| step.outbound(v))
            .map_err(|p| self.value_error(p))
    }
}

/// Splits `text` into `n` parts on `separator`: the first parts take one piece each,
/// the last takes the rest, missing parts are null.
fn split_into(text: &str, separator: &str, n: usize) -> Vec<Value> {
    let mut pieces: Vec<Value> = text
        .splitn(n, separator)
        .map(|p| Value::String(p.to_string()))
        .collect();
    pieces.resize(n, Value::Null);
    pieces
}

/// Joins the non-empty text parts with `separator`; null when every part is null.
/// Numbers count as text; other types are an error naming their type.
fn join_parts<'a>(parts: impl IntoIterator<Item = &'a Value>, separator: &str) -> Result<Value, ValueProblem> {
    let mut texts = Vec::new();
    let mut any_value = false;
    for part in parts {
        if part.is_null() {
            continue;
        }
        any_value = true;
        let text = as_text(part)?;
        if !text.is_empty() {
            texts.push(text);
        }
    }
    Ok(if any_value {
        Value::String(texts.join(separator))
    } else {
        Value::Null
    })
}

/// A link's mapping rules, compiled.
#[derive(Debug, Clone)]
pub struct LinkMapping {
    rules: Vec<Rule>,
}

impl LinkMapping {
    /// Compiles the `map` rules of `link`, with its `default_country_code`.
    pub fn compile(link: &LinkConfig) -> Result<LinkMapping, MappingError> {
        let link_name = link.name();
        let country_code = match &link.default_country_code {
            None => None,
            Some(code) => Some(
                phone::parse_country_code(code).ok_or_else(|| MappingError::CountryCode {
                    link: link_name.clone(),
                })?,
            ),
        };
        let mut rules = Vec::with_capacity(link.map.len());
        for (index, config) in link.map.iter().enumerate() {
            let rule_error = |reason: String| MappingError::Rule {
                link: link_name.clone(),
                rule: index,
                fields: rule_fields(config),
                reason,
            };
            rules.push(compile_rule(config, country_code.as_deref()).map_err(rule_error)?);
        }
        check_overlaps(&link_name, &link.map, &rules)?;
        Ok(LinkMapping { rules })
    }

    /// Maps a system record to canonical fields, with the rules that apply inbound.
    pub fn inbound(&self, record: &Map<String, Value>) -> Result<Fields, MappingError> {
        let mut out = Fields::new();
        for rule in self.rules.iter().filter(|r| r.inbound()) {
            match &rule.kind {
                RuleKind::Rename { canonical, system } => {
                    if let Some(value) = record.get(system) {
                        out.insert(canonical.clone(), rule.apply_in(value.clone())?);
                    }
                }
                RuleKind::Join { canonical, system } => {
                    // A join needs every part: joining only the parts a partial record
                    // carries would overwrite the whole value with a fragment.
                    let parts: Option<Vec<&Value>> = system.iter().map(|field| record.get(field)).collect();
                    let Some(parts) = parts else { continue };
                    let joined = join_parts(parts, &rule.separator).map_err(|p| rule.value_error(p))?;
                    out.insert(canonical.clone(), rule.apply_in(joined)?);
                }
                RuleKind::Split { canonical, system } => {
                    let Some(value) = record.get(system) else {
                        continue;
                    };
                    let parts = match rule.apply_in(value.clone())? {
                        Value::Null => vec![Value::Null; canonical.len()],
                        other => {
                            let text = as_text(&other).map_err(|p| rule.value_error(p))?;
                            split_into(&text, &rule.separator, canonical.len())
                        }
                    };
                    out.extend(canonical.iter().cloned().zip(parts));
                }
                RuleKind::CanonicalConstant { canonical, value, .. } => {
                    out.insert(canonical.clone(), value.clone());
                }
                RuleKind::SystemConstant { .. } => {}
            }
        }
        Ok(out)
    }

    /// Maps canonical values to the system fields to write, with the rules that apply
    /// outbound. `values` is the full agreed record; with `only`, just the rules that
    /// involve at least one of those canonical fields are emitted (a rule joining
    /// several canonical fields still takes the other parts from `values`). Constant
    /// system fields are emitted on every call.
    pub fn outbound(
        &self,
        values: &Fields,
        only: Option<&BTreeSet<String>>,
    ) -> Result<Map<String, Value>, MappingError> {
        let wanted = |fields: &[String]| match only {
            None => true,
            Some(only) => fields.iter().any(|f| only.contains(f)),
        };
        let mut out = Map::new();
        for rule in self.rules.iter().filter(|r| r.outbound()) {
            match &rule.kind {
                RuleKind::SystemConstant { system, value } => {
                    out.insert(system.clone(), value.clone());
                }
                RuleKind::CanonicalConstant { .. } => {}
                RuleKind::Rename { canonical, system } => {
                    if !wanted(rule.canonical()) {
                        continue;
                    }
                    if let Some(value) = values.get(canonical) {
                        out.insert(system.clone(), rule.apply_out(value.clone())?);
                    }
                }
                RuleKind::Join { canonical, system } => {
                    if !wanted(rule.canonical()) {
                        continue;
                    }
                    let Some(value) = values.get(canonical) else {
                        continue;
                    };
                    let parts = match rule.apply_out(value.clone())? {
                        Value::Null => vec![Value::Null; system.len()],
                        other => {
                            let text = as_text(&other).map_err(|p| rule.value_error(p))?;
                            split_into(&text, &rule.separator, system.len())
                        }
                    };
                    out.extend(system.iter().cloned().zip(parts));
                }
                RuleKind::Split { canonical, system } => {
                    if !wanted(canonical) || !canonical.iter().any(|f| values.contains_key(f)) {
                        continue;
                    }
                    let parts = canonical.iter().map(|f| values.get(f).unwrap_or(&Value::Null));
                    let joined = join_parts(parts, &rule.separator).map_err(|p| rule.value_error(p))?;
                    out.insert(system.clone(), rule.apply_out(joined)?);
                }
            }
        }
        Ok(out)
    }

    /// Canonical fields this link can produce from a system record.
    pub fn inbound_fields(&self) -> BTreeSet<String> {
        self.rules.iter().flat_map(|r| r.produces()).cloned().collect()
    }

    /// Canonical fields this link writes to its system.
    pub fn outbound_fields(&self) -> BTreeSet<String> {
        self.rules.iter().flat_map(|r| r.reads()).cloned().collect()
    }

    /// System fields that hold `canonical`, in rule order, for the inventory.
    pub fn system_fields_for(&self, canonical: &str) -> Vec<String> {
        let mut fields: Vec<String> = Vec::new();
        for rule in self
            .rules
            .iter()
            .filter(|r| r.canonical().iter().any(|c| c == canonical))
        {
            for field in rule.system() {
                if !fields.contains(field) {
                    fields.push(field.clone());
                }
            }
        }
        fields
    }

    /// Human descriptions of what happens to `canonical` on this link, rule by rule:
    /// direction limits, joins and splits, constants, then each transform in order.
    pub fn describe_transforms(&self, canonical: &str) -> Vec<String> {
        let mut out = Vec::new();
        for rule in self
            .rules
            .iter()
            .filter(|r| r.canonical().iter().any(|c| c == canonical))
        {
            match rule.direction {
                MapDirection::Both => {}
                MapDirection::In => out.push("in only".to_string()),
                MapDirection::Out => out.push("out only".to_string()),
            }
            let separator = if rule.separator == " " {
                String::new()
            } else {
                format!(" on {:?}", rule.separator)
            };
            match &rule.kind {
                RuleKind::Join { system, .. } => {
                    out.push(format!("join {}{separator}", system.join("+")));
                }
                RuleKind::Split { canonical, system } => {
                    out.push(format!("split {system} into {}{separator}", canonical.join("+")));
                }
                RuleKind::CanonicalConstant { value, .. } => {
                    out.push(format!("constant {value}"));
                }
                RuleKind::Rename { .. } | RuleKind::SystemConstant { .. } => {}
            }
            out.extend(rule.steps.iter().map(Step::describe));
        }
        out
    }

    /// System fields set to a constant on every write, with their values.
    pub fn system_constants(&self) -> BTreeMap<String, Value> {
        self.rules
            .iter()
            .filter_map(|r| match &r.kind {
                RuleKind::SystemConstant { system, value } => Some((system.clone(), value.clone())),
                _ => None,
            })
            .collect()
    }
}

/// The rule's fields as written, for error messages.
fn rule_fields(config: &FieldMapConfig) -> String {
    let side = |s: &OneOrMany| s.as_slice().join("+");
    match &config.canonical {
        Some(canonical) => format!("{} <-> {}", side(canonical), side(&config.system)),
        None => format!("constant -> {}", side(&config.system)),
    }
}

fn compile_rule(config: &FieldMapConfig, country_code: Option<&str>) -> Result<Rule, String> {
    let system = field_list(&config.system, "system")?;
    let canonical = match &config.canonical {
        Some(c) => Some(field_list(c, "canonical")?),
        None => None,
    };
    let direction = config.direction;
    let kind = match (canonical, &config.constant) {
        (Some(canonical), Some(value)) => {
            let [canonical] = <[String; 1]>::try_from(canonical)
                .map_err(|_| "a constant rule sets one canonical field".to_string())?;
            let [system] =
                <[String; 1]>::try_from(system).map_err(|_| "a constant rule names one system field".to_string())?;
            if direction == MapDirection::Out {
                return Err("a constant with canonical only applies inbound, and direction = \
                            \"out\" leaves it nothing to do"
                    .to_string());
            }
            RuleKind::CanonicalConstant {
                canonical,
                system,
                value: value.clone(),
            }
        }
        (None, Some(value)) => {
            let [system] =
                <[String; 1]>::try_from(system).map_err(|_| "a constant rule sets one system field".to_string())?;
            if direction == MapDirection::In {
                return Err("a constant without canonical only applies outbound, and \
                            direction = \"in\" leaves it nothing to do"
                    .to_string());
            }
            RuleKind::SystemConstant {
                system,
                value: value.clone(),
            }
        }
        (None, None) => return Err("a rule needs canonical, constant or both".to_string()),
        (Some(mut canonical), None) => match (canonical.len(), system.len()) {
            (1, 1) => RuleKind::Rename {
                canonical: canonical.remove(0),
                system: system.into_iter().next().expect("length checked as 1"),
            },
            (1, _) => RuleKind::Join {
                canonical: canonical.remove(0),
                system,
            },
            (_, 1) => RuleKind::Split {
                canonical,
                system: system.into_iter().next().expect("length checked as 1"),
            },
            _ => return Err("canonical and system cannot both be lists".to_string()),
        },
    };

    let is_constant = matches!(
        kind,
        RuleKind::CanonicalConstant { .. } | RuleKind::SystemConstant { .. }
    );
    if is_constant && !config.transforms.is_empty() {
        return Err("transforms do not apply to a constant".to_string());
    }
    let inbound = matches!(direction, MapDirection::Both | MapDirection::In);
    let outbound = matches!(direction, MapDirection::Both | MapDirection::Out);
    let splits_text = match kind {
        RuleKind::Split { .. } => inbound,
        RuleKind::Join { .. } => outbound,
        _ => false,
    };
    if splits_text && config.separator.is_empty() {
        return Err("an empty separator cannot split text".to_string());
    }

    let steps = config
        .transforms
        .iter()
        .map(|t| Step::compile(t, country_code, direction))
        .collect::<Result<Vec<_>, _>>()?;
    if matches!(kind, RuleKind::Join { .. } | RuleKind::Split { .. }) {
        if let Some((t, _)) = config
            .transforms
            .iter()
            .zip(&steps)
            .find(|(_, step)| !step.keeps_text())
        {
            return Err(format!(
                "transform {} does not apply to a join or split: the joined value must stay \
                 text",
                transform_name(t)
            ));
        }
    }
    Ok(Rule {
        kind,
        steps,
        direction,
        separator: config.separator.clone(),
    })
}

fn transform_name(t: &Transform) -> &'static str {
    match t {
        Transform::Trim => "trim",
        Transform::Lower => "lower",
        Transform::Upper => "upper",
        Transform::E164 => "e164",
        Transform::Date { .. } => "date",
        Transform::Map(_) => "map",
        Transform::Parse(_) => "parse",
        Transform::EmptyAsNull => "empty_as_null",
    }
}

/// The names on one side of a rule: not empty, no blank names, no repeats.
fn field_list(side: &OneOrMany, which: &str) -> Result<Vec<String>, String> {
    let names = side.as_slice();
    if names.is_empty() {
        return Err(format!("{which} lists no fields"));
    }
    if names.iter().any(|n| n.trim().is_empty()) {
        return Err(format!("{which} has an empty field name"));
    }
    let unique: BTreeSet<&String> = names.iter().collect();
    if unique.len() != names.len() {
        return Err(format!("{which} names a field twice"));
    }
    Ok(names.to_vec())
}

/// Two rules producing the same canonical field inbound, or writing the same system
/// field outbound, would make the result depend on rule order.
fn check_overlaps(link: &str, configs: &[FieldMapConfig], rules: &[Rule]) -> Result<(), MappingError> {
    let mut produced: BTreeMap<&str, usize> = BTreeMap::new();
    let mut written: BTreeMap<&str, usize> = BTreeMap::new();
    for (index, rule) in rules.iter().enumerate() {
        let clash = |what: &str, field: &str, first: usize| MappingError::Rule {
            link: link.to_string(),
            rule: index,
            fields: rule_fields(&configs[index]),
            reason: format!("{what} field \"{field}\" is already mapped by map[{first}]"),
        };
        for field in rule.produces() {
            if let Some(first) = produced.insert(field, index) {
                return Err(clash("canonical", field, first));
            }
        }
        for field in rule.writes() {
            if let Some(first) = written.insert(field, index) {
                return Err(clash("system", field, first));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
