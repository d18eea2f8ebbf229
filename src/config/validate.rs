//! Semantic checks of a parsed configuration: references between systems, entities and
//! links, canonical field names against the entity schemas, mapping rule shapes, and
//! numeric ranges. Parsing has already checked syntax and types; this reports every
//! remaining problem at once, each with the key path an operator has to edit.
//!
//! Entity schemas are read here (relative to `Config::base_dir`) only to learn their
//! top-level `properties`; compiling and applying them belongs to `mapping`.
//!
//! A secret file that does not exist is not a problem here: systemd may provide it only
//! when the service starts (`LoadCredential=`). Its reference must still be well formed.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;

use super::secret::SecretRef;
use super::{
    AuthConfig, Config, ConnectorConfig, Direction, EntityConfig, FieldMapConfig, LinkConfig, MapDirection, OnDelete,
    OneOrMany, SystemConfig, Transform, WriteMode,
};

/// Longest pause between polls of a postgres link: well inside the server's default
/// `wal_sender_timeout` of 60 s.
const MAX_POSTGRES_CAPTURE_INTERVAL_SECS: u64 = 10;

/// One problem, with the key path it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found, each with its path; empty when the configuration is valid.
/// Sorted by path (indices in numeric order), without duplicates.
pub fn validate(config: &Config) -> Vec<Problem> {
    let mut check = Checker::new(config);
    check.admin_state_engine();
    for (name, system) in &config.systems {
        check.system(name, system);
    }
    for (name, entity) in &config.entities {
        check.entity(name, entity);
    }
    for (index, link) in config.links.iter().enumerate() {
        check.link(index, link);
    }
    let mut problems = check.problems;
    problems.sort_by(|a, b| natural_cmp(&a.path, &b.path).then_with(|| a.message.cmp(&b.message)));
    problems.dedup();
    problems
}

/// What an entity's schema file declares, or why it could not be read. A schema that
/// cannot be read is reported once, at `entities.<name>.schema`, and the field-name
/// checks that depend on it are skipped rather than repeated for every field.
enum SchemaFields {
    Properties(BTreeSet<String>),
    Unreadable,
}

struct Checker<'a> {
    config: &'a Config,
    problems: Vec<Problem>,
    schemas: BTreeMap<&'a str, SchemaFields>,
}

impl<'a> Checker<'a> {
    fn new(config: &'a Config) -> Self {
        let mut problems = Vec::new();
        let mut schemas = BTreeMap::new();
        for (name, entity) in &config.entities {
            let fields = match read_schema_properties(&config.base_dir, &entity.schema) {
                Ok(properties) => SchemaFields::Properties(properties),
                Err(message) => {
                    problems.push(Problem {
                        path: format!("entities.{name}.schema"),
                        message,
                    });
                    SchemaFields::Unreadable
                }
            };
            schemas.insert(name.as_str(), fields);
        }
        Self {
            config,
            problems,
            schemas,
        }
    }

    fn report(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    fn not_empty(&mut self, path: impl Into<String>, value: &str) {
        if value.trim().is_empty() {
            self.report(path, "must not be empty");
        }
    }

    /// `Some(true)` when `field` is a property of `entity`'s schema, `Some(false)` when
    /// it is not, `None` when that cannot be told (unknown entity, unreadable schema).
    fn is_property(&self, entity: &str, field: &str) -> Option<bool> {
        match self.schemas.get(entity)? {
            SchemaFields::Properties(properties) => Some(properties.contains(field)),
            SchemaFields::Unreadable => None,
        }
    }

    /// Index and config of the first link of `system` for `entity`.
    fn link_for(&self, system: &str, entity: &str) -> Option<(usize, &'a LinkConfig)> {
        self.config
            .links
            .iter()
            .enumerate()
            .find(|(_, l)| l.system == system && l.entity == entity)
    }

    fn admin_state_engine(&mut self) {
        let config = self.config;
        match config.admin.listen.parse::<SocketAddr>() {
            Err(_) => self.report(
                "admin.listen",
                format!("{:?} is not a socket address (ip:port)", config.admin.listen),
            ),
            Ok(addr) if !addr.ip().is_loopback() => {
                if config.admin.tokens.is_empty() {
                    self.report("admin.listen", "a non-loopback listener needs admin.tokens");
                }
                if !config.admin.allow_public {
                    self.report(
                        "admin.listen",
                        "a non-loopback listener needs admin.allow_public = true",
                    );
                }
            }
            Ok(_) => {}
        }
        let mut token_names = BTreeSet::new();
        for (i, token) in config.admin.tokens.iter().enumerate() {
            let path = format!("admin.tokens[{i}].name");
            if token.name.trim().is_empty() {
                self.report(path, "must not be empty");
            } else if !token_names.insert(token.name.as_str()) {
                self.report(path, format!("{:?} is used by another token", token.name));
            }
            self.secret(&format!("admin.tokens[{i}].secret"), &token.secret);
        }
        if let Some(tls) = &config.admin.tls {
            if tls.cert.as_os_str().is_empty() {
                self.report("admin.tls.cert", "must not be empty");
            }
            if tls.key.as_os_str().is_empty() {
                self.report("admin.tls.key", "must not be empty");
            }
        }
        if config.state.dir.as_os_str().is_empty() {
            self.report("state.dir", "must not be empty");
        }
        if config.state.cache_mb == 0 {
            self.report("state.cache_mb", "must be > 0");
        }
        if config.state.durable_interval_ms > super::MAX_DURABLE_INTERVAL_MS {
            self.report(
                "state.durable_interval_ms",
                format!("must be at most {}", super::MAX_DURABLE_INTERVAL_MS),
            );
        }
        let engine = &config.engine;
        if engine.batch_size == 0 {
            self.report("engine.batch_size", "must be > 0");
        }
        if engine.max_attempts == 0 {
            self.report("engine.max_attempts", "must be > 0");
        }
        if engine.backoff_min_ms == 0 {
            self.report("engine.backoff_min_ms", "must be > 0");
        }
        if engine.backoff_min_ms > engine.backoff_max_ms {
            self.report(
                "engine.backoff_min_ms",
                format!("must be <= backoff_max_ms ({})", engine.backoff_max_ms),
            );
        }
    }

    fn system(&mut self, name: &str, system: &SystemConfig) {
        let path = format!("systems.{name}");
        if !is_plain_name(name) {
            self.report(&path, "name must be letters, digits, '_' or '-'");
        }
        if system.write_batch_size == Some(0) {
            self.report(format!("{path}.write_batch_size"), "must be > 0");
        }
        if let Some(rate) = &system.rate_limit {
            if rate.per_second.is_nan() || rate.per_second <= 0.0 {
                self.report(format!("{path}.rate_limit.per_second"), "must be > 0");
            } else if rate.per_second.is_infinite() {
                self.report(format!("{path}.rate_limit.per_second"), "must be finite");
            }
            if rate.burst == 0 {
                self.report(format!("{path}.rate_limit.burst"), "must be > 0");
            }
        }
        if let Some(auth) = &system.auth {
            self.auth(&format!("{path}.auth"), auth);
        }
        match &system.connector {
            ConnectorConfig::File(file) => {
                let optional_dirs = [
                    ("inbox", &file.inbox),
                    ("processed_dir", &file.processed_dir),
                    ("failed_dir", &file.failed_dir),
                    ("export_dir", &file.export_dir),
                ];
                for (key, dir) in optional_dirs {
                    if dir.as_ref().is_some_and(|d| d.as_os_str().is_empty()) {
                        self.report(format!("{path}.{key}"), "must not be empty");
                    }
                }
                if file.max_file_bytes == 0 {
                    self.report(format!("{path}.max_file_bytes"), "must be > 0");
                }
                if file.max_record_bytes == 0 {
                    self.report(format!("{path}.max_record_bytes"), "must be > 0");
                }
                let (capturing, writing) = self.links_of(name, system.direction);
                if file.inbox.is_none() && !capturing.is_empty() {
                    let verb = if capturing.len() == 1 { "captures" } else { "capture" };
                    self.report(
                        format!("{path}.inbox"),
                        format!("must be set: {} {verb} from this system", capturing.join(", ")),
                    );
                }
                if file.export_dir.is_none() && !writing.is_empty() {
                    let verb = if writing.len() == 1 { "writes" } else { "write" };
                    self.report(
                        format!("{path}.export_dir"),
                        format!("must be set: {} {verb} to this system", writing.join(", ")),
                    );
                }
            }
            ConnectorConfig::Rest(rest) => self.rest(name, &path, system.direction, rest),
            ConnectorConfig::Postgres(pg) => self.postgres(&path, name, system, pg),
        }
    }

    fn rest(&mut self, name: &str, path: &str, direction: Direction, rest: &crate::connector::rest::RestSystemConfig) {
        use crate::connector::rest::{Concurrency, DeleteDetection, Pagination};
        match reqwest::Url::parse(&rest.base_url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {
                if url.query().is_some() || url.fragment().is_some() {
                    self.report(format!("{path}.base_url"), "must not have a query or fragment");
                }
            }
            Ok(_) => self.report(format!("{path}.base_url"), "must be an http or https url with a host"),
            Err(_) => self.report(format!("{path}.base_url"), "not a valid url"),
        }
        if rest.timeout_ms == 0 {
            self.report(format!("{path}.timeout_ms"), "must be > 0");
        }
        if rest.max_body_bytes == 0 {
            self.report(format!("{path}.max_body_bytes"), "must be > 0");
        }
        if rest.max_concurrency == 0 {
            self.report(format!("{path}.max_concurrency"), "must be > 0");
        }
        for (header, value) in &rest.headers {
            if reqwest::header::HeaderName::from_bytes(header.as_bytes()).is_err()
                || reqwest::header::HeaderValue::from_str(value).is_err()
            {
                self.report(format!("{path}.headers.{header}"), "not a valid header name and value");
            }
        }
        for (object_name, object) in &rest.objects {
            let opath = format!("{path}.objects.{object_name}");
            self.http_path(format!("{opath}.list.path"), &object.list.path, None);
            self.pointer(format!("{opath}.records"), &object.records);
            if let Some(fields) = &object.fields {
                self.pointer(format!("{opath}.fields"), fields);
            }
            match &object.pagination {
                Pagination::Page { size, .. } | Pagination::Offset { limit: size, .. } if *size == 0 => {
                    self.report(format!("{opath}.pagination"), "page size must be > 0");
                }
                Pagination::Token { pointer, param } => {
                    self.pointer(format!("{opath}.pagination.pointer"), pointer);
                    self.not_empty(format!("{opath}.pagination.param"), param);
                }
                Pagination::NextUrl { pointer } => self.pointer(format!("{opath}.pagination.pointer"), pointer),
                _ => {}
            }
            if let Some(cursor) = &object.cursor {
                self.not_empty(format!("{opath}.cursor.field"), &cursor.field);
                self.not_empty(format!("{opath}.cursor.param"), &cursor.param);
                if !cursor.template.contains("{cursor}") {
                    self.report(format!("{opath}.cursor.template"), "must contain {cursor}");
                }
            }
            if let Some(write) = &object.write {
                if let Some(create) = &write.create_path {
                    self.http_path(format!("{opath}.write.create_path"), create, None);
                }
                self.http_path(format!("{opath}.write.item_path"), &write.item_path, Some("{id}"));
                if let Some(upsert) = &write.upsert {
                    self.http_path(format!("{opath}.write.upsert.path"), &upsert.path, Some("{key}"));
                    self.not_empty(format!("{opath}.write.upsert.field"), &upsert.field);
                }
                if write.create_path.is_none() && write.upsert.is_none() {
                    let creating = self.config.links.iter().any(|l| {
                        l.system == name
                            && &l.object == object_name
                            && direction.writes()
                            && l.write_mode().may_create()
                    });
                    if creating {
                        self.report(
                            format!("{opath}.write"),
                            "set create_path or upsert: a link creates records of this object",
                        );
                    }
                }
                if write.created_id != "location" {
                    self.pointer(format!("{opath}.write.created_id"), &write.created_id);
                }
            }
            if let Concurrency::VersionField { field } = &object.concurrency {
                self.not_empty(format!("{opath}.concurrency.field"), field);
            }
            match &object.deletes {
                DeleteDetection::None => {}
                DeleteDetection::Flag { field, .. } => self.not_empty(format!("{opath}.deletes.field"), field),
                DeleteDetection::Tombstone {
                    path: tpath,
                    records,
                    id,
                    time,
                    interval_secs,
                    start_param,
                    ..
                } => {
                    self.http_path(format!("{opath}.deletes.path"), tpath, None);
                    self.pointer(format!("{opath}.deletes.records"), records);
                    self.pointer(format!("{opath}.deletes.id"), id);
                    if let Some(time) = time {
                        self.pointer(format!("{opath}.deletes.time"), time);
                    }
                    self.not_empty(format!("{opath}.deletes.start_param"), start_param);
                    if *interval_secs == 0 {
                        self.report(format!("{opath}.deletes.interval_secs"), "must be > 0");
                    }
                }
                DeleteDetection::FullScan { interval_secs } => {
                    if *interval_secs == 0 {
                        self.report(format!("{opath}.deletes.interval_secs"), "must be > 0");
                    }
                }
            }
        }
        for (index, link) in self.config.links.iter().enumerate() {
            if link.system != name {
                continue;
            }
            match rest.objects.get(&link.object) {
                None => self.report(
                    format!("links[{index}].object"),
                    format!("{:?} is not an object of {path}.objects", link.object),
                ),
                Some(object) => {
                    let writes = direction.writes() && link.write_mode() != WriteMode::ReadOnly;
                    if writes && object.write.is_none() {
                        self.report(
                            format!("{path}.objects.{}.write", link.object),
                            format!("must be set: links[{index}] writes to this object"),
                        );
                    }
                }
            }
        }
    }

    fn postgres(
        &mut self,
        path: &str,
        name: &str,
        system: &SystemConfig,
        pg: &crate::connector::postgres::PostgresSystemConfig,
    ) {
        use crate::connector::postgres::{TableName, TlsMode};
        self.not_empty(format!("{path}.host"), &pg.host);
        self.not_empty(format!("{path}.database"), &pg.database);
        self.not_empty(format!("{path}.user"), &pg.user);
        if pg.port == 0 {
            self.report(format!("{path}.port"), "must be > 0");
        }
        if let Some(password) = &pg.password {
            self.secret(&format!("{path}.password"), password);
        }
        if system.auth.is_some() {
            self.report(
                format!("{path}.auth"),
                "a postgres system takes its password from `password = { ... }`, not `auth`",
            );
        }
        if pg.tls_ca_file.as_ref().is_some_and(|f| f.as_os_str().is_empty()) {
            self.report(format!("{path}.tls_ca_file"), "must not be empty");
        }
        if pg.tls_ca_file.is_some() && pg.tls == TlsMode::Disable {
            self.report(format!("{path}.tls_ca_file"), "is set but tls is \"disable\"");
        }
        for (key, value) in [("slot", &pg.slot), ("publication", &pg.publication)] {
            if value.is_empty() {
                self.report(format!("{path}.{key}"), "must not be empty");
            } else if value.len() > 40 {
                self.report(format!("{path}.{key}"), "must be at most 40 bytes");
            }
        }
        if !pg
            .slot
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            self.report(format!("{path}.slot"), "must be lowercase letters, digits or '_'");
        }
        if pg.snapshot_chunk_rows == 0 {
            self.report(format!("{path}.snapshot_chunk_rows"), "must be > 0");
        }
        if pg.status_interval_secs == 0 {
            self.report(format!("{path}.status_interval_secs"), "must be > 0");
        }
        for (index, link) in self.config.links.iter().enumerate() {
            if link.system != name {
                continue;
            }
            if TableName::parse(&link.object).is_none() {
                self.problems.push(Problem {
                    path: format!("links[{index}].object"),
                    message: "must be \"schema.table\" or \"table\"".into(),
                });
            }
            // The replication connection is read only while the link polls; the server
            // drops a client silent for wal_sender_timeout (60 s by default).
            if let Some(capture) = &link.capture
                && capture.interval_secs > MAX_POSTGRES_CAPTURE_INTERVAL_SECS
            {
                self.problems.push(Problem {
                    path: format!("links[{index}].capture.interval_secs"),
                    message: format!("must be <= {MAX_POSTGRES_CAPTURE_INTERVAL_SECS} for a postgres system"),
                });
            }
        }
    }

    /// A path appended to a base URL: starts with `/`; `placeholder` must appear in it.
    fn http_path(&mut self, path: String, value: &str, placeholder: Option<&str>) {
        if !value.starts_with('/') {
            self.report(path, "must start with /");
        } else if let Some(p) = placeholder.filter(|p| !value.contains(*p)) {
            self.report(path, format!("must contain {p}"));
        }
    }

    /// A JSON pointer (RFC 6901): empty, or starting with `/`.
    fn pointer(&mut self, path: String, value: &str) {
        if !value.is_empty() && !value.starts_with('/') {
            self.report(path, "must be a JSON pointer: empty or starting with /");
        }
    }

    /// Paths (`links[i]`) of the links of `system` that capture, and of those that write.
    fn links_of(&self, system: &str, direction: Direction) -> (Vec<String>, Vec<String>) {
        let mut capturing = Vec::new();
        let mut writing = Vec::new();
        for (index, link) in self.config.links.iter().enumerate() {
            if link.system != system {
                continue;
            }
            if direction.reads() && link.capture.is_some() {
                capturing.push(format!("links[{index}]"));
            }
            if direction.writes() && link.write_mode() != WriteMode::ReadOnly {
                writing.push(format!("links[{index}]"));
            }
        }
        (capturing, writing)
    }

    fn auth(&mut self, path: &str, auth: &AuthConfig) {
        match auth {
            AuthConfig::ApiKey { key, header, query } => {
                self.secret(&format!("{path}.key"), key);
                if header.is_some() && query.is_some() {
                    self.report(path, "set header or query, not both");
                }
                if let Some(header) = header {
                    self.not_empty(format!("{path}.header"), header);
                }
                if let Some(query) = query {
                    self.not_empty(format!("{path}.query"), query);
                }
            }
            AuthConfig::Bearer { token } => self.secret(&format!("{path}.token"), token),
            AuthConfig::Basic { username, password } => {
                self.not_empty(format!("{path}.username"), username);
                self.secret(&format!("{path}.password"), password);
            }
        }
    }

    fn secret(&mut self, path: &str, secret: &SecretRef) {
        match secret {
            SecretRef::File(file) => {
                if file.as_os_str().is_empty() {
                    self.report(format!("{path}.file"), "must not be empty");
                }
            }
            SecretRef::Env(name) => {
                if name.is_empty() {
                    self.report(format!("{path}.env"), "must not be empty");
                } else if name.contains(['=', '\0']) {
                    self.report(format!("{path}.env"), "not a valid environment variable name");
                }
            }
            SecretRef::Credential(name) => {
                if name.is_empty() {
                    self.report(format!("{path}.credential"), "must not be empty");
                } else if name.contains(['/', '\0']) || name == "." || name == ".." {
                    self.report(format!("{path}.credential"), "must be a credential name, not a path");
                }
            }
        }
    }

    fn entity(&mut self, name: &str, entity: &EntityConfig) {
        let path = format!("entities.{name}");
        if !is_plain_name(name) {
            self.report(&path, "name must be letters, digits, '_' or '-'");
        }
        let mut seen = BTreeSet::new();
        for (i, key) in entity.match_keys.iter().enumerate() {
            let key_path = format!("{path}.match_keys[{i}]");
            if !seen.insert(key.as_str()) {
                self.report(&key_path, format!("{key:?} is listed twice"));
            } else if self.is_property(name, key) == Some(false) {
                self.report(&key_path, format!("{key:?} is not a property of the schema"));
            }
        }

        for (field, authority) in &entity.fields {
            let field_path = format!("{path}.fields.{field}");
            if self.is_property(name, field) == Some(false) {
                self.report(&field_path, "not a property of the schema");
            }
            let mut seen = BTreeSet::new();
            for (i, owner) in authority.owners.iter().enumerate() {
                let owner_path = format!("{field_path}.owners[{i}]");
                if !seen.insert(owner.as_str()) {
                    self.report(&owner_path, format!("{owner:?} is listed twice"));
                    continue;
                }
                if !self.config.systems.contains_key(owner) {
                    self.report(&owner_path, format!("unknown system {owner:?}"));
                    continue;
                }
                match self.link_for(owner, name) {
                    None => self.report(&owner_path, format!("system {owner:?} has no link for entity {name:?}")),
                    Some((index, link)) => {
                        if !link.map.iter().any(|rule| produces(rule, field)) {
                            self.report(
                                &owner_path,
                                format!("system {owner:?} does not map this field inbound (links[{index}])"),
                            );
                        }
                    }
                }
            }
        }

        let share = entity.delete.max_share;
        if !(0.0..=1.0).contains(&share) {
            self.report(format!("{path}.delete.max_share"), "must be between 0 and 1");
        }
        for (i, system) in entity.delete.allowed_from.iter().enumerate() {
            let system_path = format!("{path}.delete.allowed_from[{i}]");
            if !self.config.systems.contains_key(system) {
                self.report(&system_path, format!("unknown system {system:?}"));
            } else if self.link_for(system, name).is_none() {
                self.report(
                    &system_path,
                    format!("system {system:?} has no link for entity {name:?}"),
                );
            }
        }
    }

    fn link(&mut self, index: usize, link: &LinkConfig) {
        let path = format!("links[{index}]");
        let system = self.config.systems.get(&link.system);
        let entity = self.config.entities.get(&link.entity);
        if system.is_none() {
            self.report(format!("{path}.system"), format!("unknown system {:?}", link.system));
        }
        if entity.is_none() {
            self.report(format!("{path}.entity"), format!("unknown entity {:?}", link.entity));
        }
        let first = self.link_for(&link.system, &link.entity).map(|(first, _)| first);
        if let Some(first) = first.filter(|&first| first != index) {
            self.report(
                &path,
                format!(
                    "another link for system {:?} and entity {:?}: links[{first}]",
                    link.system, link.entity
                ),
            );
        }
        self.not_empty(format!("{path}.object"), &link.object);
        self.not_empty(format!("{path}.id_field"), &link.id_field);
        if let Some(version_field) = &link.version_field {
            self.not_empty(format!("{path}.version_field"), version_field);
        }

        if let Some(system) = system {
            if system.direction == Direction::Write && link.capture.is_some() {
                self.report(
                    format!("{path}.capture"),
                    format!("system {:?} is write-only (direction = \"write\")", link.system),
                );
            }
            if system.direction == Direction::Read && link.write.is_some_and(|w| w != WriteMode::ReadOnly) {
                self.report(
                    format!("{path}.write"),
                    format!("system {:?} is read-only (direction = \"read\")", link.system),
                );
            }
        }
        if link.capture.as_ref().is_some_and(|c| c.interval_secs == 0) {
            self.report(format!("{path}.capture.interval_secs"), "must be > 0");
        }

        if let Some(rollout) = &link.rollout {
            if rollout.percent.is_some_and(|percent| !(0.0..=100.0).contains(&percent)) {
                self.report(format!("{path}.rollout.percent"), "must be between 0 and 100");
            }
            if rollout.percent.is_none() && rollout.allow.is_empty() {
                self.report(format!("{path}.rollout"), "set percent, allow, or both");
            }
            if entity.is_some_and(|e| e.match_keys.is_empty()) {
                self.report(
                    format!("{path}.rollout"),
                    format!("entity {:?} has no match_keys to select records by", link.entity),
                );
            }
        }

        if let OnDelete::SoftDelete { field, .. } = &link.on_delete {
            self.not_empty(format!("{path}.on_delete.soft_delete.field"), field);
        }
        if link
            .default_country_code
            .as_deref()
            .is_some_and(|code| !is_country_code(code))
        {
            self.report(
                format!("{path}.default_country_code"),
                "must be \"+\" and 1 to 3 digits, like \"+44\"",
            );
        }

        let schema_name = entity.map(|e| e.schema.display().to_string());
        let mut produced: BTreeMap<&str, usize> = BTreeMap::new();
        let mut written: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, rule) in link.map.iter().enumerate() {
            let rule_path = format!("{path}.map[{i}]");
            self.map_rule(&rule_path, rule);
            if let (Some(canonical), Some(schema_name)) = (&rule.canonical, &schema_name) {
                for (j, field) in canonical.as_slice().iter().enumerate() {
                    if self.is_property(&link.entity, field) == Some(false) {
                        let field_path = match canonical {
                            OneOrMany::One(_) => format!("{rule_path}.canonical"),
                            OneOrMany::Many(_) => format!("{rule_path}.canonical[{j}]"),
                        };
                        self.report(
                            field_path,
                            format!("{field:?} is not a property of schema {schema_name}"),
                        );
                    }
                }
            }
            let inbound_fields = rule.canonical.as_ref().filter(|_| inbound(rule));
            for field in inbound_fields.map(OneOrMany::as_slice).unwrap_or_default() {
                if let Some(other) = produced.insert(field, i) {
                    self.report(
                        format!("{rule_path}.canonical"),
                        format!("{field:?} is also produced by map[{other}]"),
                    );
                }
            }
            if outbound(rule) {
                for field in rule.system.as_slice() {
                    if let Some(other) = written.insert(field, i) {
                        self.report(
                            format!("{rule_path}.system"),
                            format!("{field:?} is also written by map[{other}]"),
                        );
                    }
                }
            }
        }
    }

    fn map_rule(&mut self, path: &str, rule: &FieldMapConfig) {
        let canonical_many = matches!(rule.canonical, Some(OneOrMany::Many(_)));
        let system_many = matches!(rule.system, OneOrMany::Many(_));
        if canonical_many && system_many {
            self.report(path, "canonical and system cannot both be lists");
        }
        for (key, list) in [("canonical", rule.canonical.as_ref()), ("system", Some(&rule.system))] {
            let Some(list) = list else { continue };
            if matches!(list, OneOrMany::Many(fields) if fields.len() < 2) {
                self.report(format!("{path}.{key}"), "a list needs at least two fields");
            }
            for (j, field) in list.as_slice().iter().enumerate() {
                let field_path = match list {
                    OneOrMany::One(_) => format!("{path}.{key}"),
                    OneOrMany::Many(_) => format!("{path}.{key}[{j}]"),
                };
                self.not_empty(field_path, field);
            }
        }
        if (canonical_many || system_many) && rule.separator.is_empty() {
            self.report(format!("{path}.separator"), "must not be empty for a join or split");
        }
        match (&rule.canonical, &rule.constant) {
            (None, None) => self.report(path, "needs canonical or constant"),
            (None, Some(_)) if rule.direction == MapDirection::In => self.report(
                format!("{path}.direction"),
                "a constant without canonical is only written, it cannot apply inbound",
            ),
            _ => {}
        }
        if rule.constant.is_some() && (canonical_many || system_many) {
            self.report(format!("{path}.constant"), "cannot be used with a list of fields");
        }
        for (k, transform) in rule.transforms.iter().enumerate() {
            if let Transform::Date { system, canonical } = transform {
                for (key, format) in [("system", system), ("canonical", canonical)] {
                    if !is_strftime(format) {
                        self.report(
                            format!("{path}.transforms[{k}].date.{key}"),
                            format!("{format:?} is not a valid strftime format"),
                        );
                    }
                }
            }
        }
    }
}

/// Reads the top-level `properties` names of a JSON Schema file; the error is the
/// problem message, naming the path as written in the configuration.
fn read_schema_properties(base_dir: &Path, schema: &Path) -> Result<BTreeSet<String>, String> {
    let shown = schema.display();
    let text =
        std::fs::read_to_string(base_dir.join(schema)).map_err(|error| format!("cannot read {shown} ({error})"))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|error| format!("{shown} is not valid JSON ({error})"))?;
    match value.get("properties").and_then(|p| p.as_object()) {
        Some(properties) if value.is_object() => Ok(properties.keys().cloned().collect()),
        _ => Err(format!("{shown} is not a JSON Schema object with \"properties\"")),
    }
}

/// Whether `rule` sets canonical `field` when a change comes in.
fn produces(rule: &FieldMapConfig, field: &str) -> bool {
    inbound(rule)
        && rule
            .canonical
            .as_ref()
            .is_some_and(|c| c.as_slice().iter().any(|f| f == field))
}

fn inbound(rule: &FieldMapConfig) -> bool {
    matches!(rule.direction, MapDirection::Both | MapDirection::In)
}

fn outbound(rule: &FieldMapConfig) -> bool {
    matches!(rule.direction, MapDirection::Both | MapDirection::Out)
}

/// Names become metric labels, link names (`system.entity`) and path segments, so they
/// hold no dots, spaces or quotes.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// ITU-T E.164 country calling codes are one to three digits.
fn is_country_code(code: &str) -> bool {
    code.strip_prefix('+')
        .is_some_and(|digits| (1..=3).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()))
}

fn is_strftime(format: &str) -> bool {
    use chrono::format::{Item, StrftimeItems};
    !format.is_empty() && !StrftimeItems::new(format).any(|item| matches!(item, Item::Error))
}

/// Orders paths so that `links[2]` comes before `links[10]`: runs of digits compare as
/// numbers, everything else as text.
fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a, b);
    loop {
        match (a.chars().next(), b.chars().next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let a_len = a.find(|c: char| !c.is_ascii_digit()).unwrap_or(a.len());
                let b_len = b.find(|c: char| !c.is_ascii_digit()).unwrap_or(b.len());
                let (a_digits, b_digits) = (a[..a_len].trim_start_matches('0'), b[..b_len].trim_start_matches('0'));
                let order = a_digits.len().cmp(&b_digits.len()).then_with(|| a_digits.cmp(b_digits));
                if order != Ordering::Equal {
                    return order;
                }
                a = &a[a_len..];
                b = &b[b_len..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(&y);
                }
                a = &a[x.len_utf8()..];
                b = &b[y.len_utf8()..];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTACT_SCHEMA: &str = r#"{
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {
            "email": { "type": "string" },
            "phone": { "type": "string" },
            "full_name": { "type": "string" },
            "title": { "type": "string" }
        }
    }"#;

    /// Parses `toml` as a configuration whose relative paths resolve in a fresh
    /// directory holding `files`.
    fn config_with(toml: &str, files: &[(&str, &str)]) -> (tempfile::TempDir, Config) {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write fixture");
        }
        let mut config = crate::config::parse(toml).expect("fixture parses");
        config.base_dir = dir.path().to_path_buf();
        (dir, config)
    }

    fn problems(config: &Config) -> Vec<String> {
        validate(config).iter().map(Problem::to_string).collect()
    }

    const VALID: &str = r#"
        [state]
        dir = "state"

        [systems.hr]
        type = "file"
        direction = "read"
        inbox = "hr/inbox"
        after = "keep"

        [systems.crm]
        type = "file"
        inbox = "crm/inbox"
        export_dir = "crm/out"
        auth = { method = "bearer", token = { credential = "crm_token" } }
        rate_limit = { per_second = 5, burst = 10 }

        [systems.directory]
        type = "file"
        direction = "write"
        export_dir = "directory/out"

        [entities.contact]
        schema = "contact.schema.json"
        match_keys = ["email"]

        [entities.contact.fields.full_name]
        owners = ["hr"]

        [entities.contact.fields.phone]
        owners = ["crm", "hr"]
        non_owner = "flag"

        [[links]]
        system = "hr"
        entity = "contact"
        object = "people.csv"
        id_field = "emp_no"
        write = "read_only"
        capture = { interval_secs = 60 }
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
        default_country_code = "+44"
        map = [
            { canonical = "email", system = "Email" },
            { canonical = "full_name", system = "Name" },
            { canonical = "phone", system = "Phone", transforms = ["trim", "e164"] },
            { system = "Source", constant = "concord" },
        ]

        [[links]]
        system = "directory"
        entity = "contact"
        object = "directory.csv"
        id_field = "id"
        dry_run = true
        rollout = { percent = 10 }
        map = [
            { canonical = "full_name", system = "display_name" },
            { canonical = "title", system = "title", direction = "out" },
            { canonical = "phone", system = "phone", transforms = [{ date = { system = "%d/%m/%Y", canonical = "%Y-%m-%d" } }] },
        ]
    "#;

    #[test]
    fn admin_access_rules_are_checked() {
        let base = "[state]\ndir = \"s\"\n[systems]\n[entities]\n";
        let cases = [
            (
                "[admin]\nlisten = \"0.0.0.0:9464\"\n",
                vec![
                    "admin.listen: a non-loopback listener needs admin.tokens",
                    "admin.listen: a non-loopback listener needs admin.allow_public = true",
                ],
            ),
            (
                "[admin]\nlisten = \"0.0.0.0:9464\"\nallow_public = true\ntokens = [{ name = \"ops\", secret = { env = \"T\" } }]\n",
                vec![],
            ),
            ("[admin]\nlisten = \"[::1]:9464\"\n", vec![]),
            (
                "[admin]\ntokens = [{ name = \"ops\", secret = { env = \"A\" } }, { name = \"ops\", secret = { env = \"B\" } }, { name = \" \", secret = { env = \"C\" } }]\ntls = { cert = \"\", key = \"k.pem\" }\n",
                vec![
                    "admin.tls.cert: must not be empty",
                    "admin.tokens[1].name: \"ops\" is used by another token",
                    "admin.tokens[2].name: must not be empty",
                ],
            ),
        ];
        for (admin, expected) in cases {
            let (_dir, config) = config_with(&format!("{base}{admin}"), &[]);
            let mut found = problems(&config);
            found.sort();
            let mut expected: Vec<String> = expected.into_iter().map(String::from).collect();
            expected.sort();
            assert_eq!(found, expected, "{admin}");
        }
    }

    #[test]
    fn valid_configuration_has_no_problems() {
        let (_dir, config) = config_with(VALID, &[("contact.schema.json", CONTACT_SCHEMA)]);
        assert_eq!(problems(&config), Vec::<String>::new());
    }

    #[test]
    fn every_mistake_is_reported_with_its_path() {
        let toml = r#"
            [state]
            dir = "state"
            cache_mb = 0

            [admin]
            listen = "localhost"

            [engine]
            batch_size = 0
            max_attempts = 0
            backoff_min_ms = 5000
            backoff_max_ms = 100

            [systems.hr]
            type = "file"
            direction = "read"
            rate_limit = { per_second = 0, burst = 0 }
            write_batch_size = 0
            auth = { method = "bearer", token = { env = "" } }

            [systems.crm]
            type = "file"
            inbox = "crm/inbox"
            auth = { method = "basic", username = "", password = { credential = "../x" } }

            [systems.out]
            type = "file"
            direction = "write"
            export_dir = ""

            [systems.lms]
            type = "file"
            max_file_bytes = 0
            auth = { method = "api_key", key = { file = "" }, header = "X-Key", query = "key" }

            [systems."bad name"]
            type = "file"

            [entities.contact]
            schema = "contact.schema.json"
            match_keys = ["emial", "email", "email"]
            delete = { max_share = 1.5, allowed_from = ["crn", "lms"] }

            [entities.contact.fields.phone]
            owners = ["crn", "crm", "crm", "lms"]

            [entities.contact.fields.x]

            [entities.broken]
            schema = "missing.json"

            [entities.notjson]
            schema = "bad.json"

            [entities.noprops]
            schema = "noprops.json"

            [[links]]
            system = "hr"
            entity = "contact"
            object = ""
            id_field = ""
            version_field = ""
            write = "upsert"
            capture = { interval_secs = 0 }
            rollout = { percent = 150 }
            default_country_code = "44"
            map = [
                { canonical = ["a", "b"], system = ["c", "d"] },
                { canonical = "email", system = ["first"] },
                { system = "x" },
                { canonical = "phnoe", system = "tel" },
                { system = ["s1", "s2"], constant = "k" },
                { canonical = "email", system = "mail2" },
                { canonical = "title", system = "d", direction = "out", transforms = [{ date = { system = "%Q", canonical = "%Y" } }] },
                { system = "k", constant = 1, direction = "in" },
            ]

            [[links]]
            system = "crm"
            entity = "contact"
            object = "contacts"
            id_field = "Id"
            capture = {}
            on_delete = { soft_delete = { field = "", value = true } }
            map = [{ canonical = "email", system = "Email" }]

            [[links]]
            system = "out"
            entity = "contcat"
            object = "o"
            id_field = "id"
            capture = {}

            [[links]]
            system = "crn"
            entity = "contact"
            object = "o"
            id_field = "id"

            [[links]]
            system = "crm"
            entity = "contact"
            object = "again"
            id_field = "Id"
            rollout = {}

            [[links]]
            system = "out"
            entity = "noprops"
            object = "o"
            id_field = "id"
            rollout = { allow = ["a@example.com"] }
        "#;
        let (_dir, config) = config_with(
            toml,
            &[
                ("contact.schema.json", CONTACT_SCHEMA),
                ("bad.json", "{ not json"),
                ("noprops.json", r#"{ "type": "object" }"#),
            ],
        );
        let expected = [
            r#"admin.listen: "localhost" is not a socket address (ip:port)"#,
            r#"engine.backoff_min_ms: must be <= backoff_max_ms (100)"#,
            r#"engine.batch_size: must be > 0"#,
            r#"engine.max_attempts: must be > 0"#,
            r#"entities.broken.schema: cannot read missing.json (No such file or directory (os error 2))"#,
            r#"entities.contact.delete.allowed_from[0]: unknown system "crn""#,
            r#"entities.contact.delete.allowed_from[1]: system "lms" has no link for entity "contact""#,
            r#"entities.contact.delete.max_share: must be between 0 and 1"#,
            r#"entities.contact.fields.phone.owners[0]: unknown system "crn""#,
            r#"entities.contact.fields.phone.owners[1]: system "crm" does not map this field inbound (links[1])"#,
            r#"entities.contact.fields.phone.owners[2]: "crm" is listed twice"#,
            r#"entities.contact.fields.phone.owners[3]: system "lms" has no link for entity "contact""#,
            r#"entities.contact.fields.x: not a property of the schema"#,
            r#"entities.contact.match_keys[0]: "emial" is not a property of the schema"#,
            r#"entities.contact.match_keys[2]: "email" is listed twice"#,
            r#"entities.noprops.schema: noprops.json is not a JSON Schema object with "properties""#,
            r#"entities.notjson.schema: bad.json is not valid JSON (key must be a string at line 1 column 3)"#,
            r#"links[0].capture.interval_secs: must be > 0"#,
            r#"links[0].default_country_code: must be "+" and 1 to 3 digits, like "+44""#,
            r#"links[0].id_field: must not be empty"#,
            r#"links[0].map[0]: canonical and system cannot both be lists"#,
            r#"links[0].map[0].canonical[0]: "a" is not a property of schema contact.schema.json"#,
            r#"links[0].map[0].canonical[1]: "b" is not a property of schema contact.schema.json"#,
            r#"links[0].map[1].system: a list needs at least two fields"#,
            r#"links[0].map[2]: needs canonical or constant"#,
            r#"links[0].map[3].canonical: "phnoe" is not a property of schema contact.schema.json"#,
            r#"links[0].map[4].constant: cannot be used with a list of fields"#,
            r#"links[0].map[5].canonical: "email" is also produced by map[1]"#,
            r#"links[0].map[6].system: "d" is also written by map[0]"#,
            r#"links[0].map[6].transforms[0].date.system: "%Q" is not a valid strftime format"#,
            r#"links[0].map[7].direction: a constant without canonical is only written, it cannot apply inbound"#,
            r#"links[0].object: must not be empty"#,
            r#"links[0].rollout.percent: must be between 0 and 100"#,
            r#"links[0].version_field: must not be empty"#,
            r#"links[0].write: system "hr" is read-only (direction = "read")"#,
            r#"links[1].on_delete.soft_delete.field: must not be empty"#,
            r#"links[2].capture: system "out" is write-only (direction = "write")"#,
            r#"links[2].entity: unknown entity "contcat""#,
            r#"links[3].system: unknown system "crn""#,
            r#"links[4]: another link for system "crm" and entity "contact": links[1]"#,
            r#"links[4].rollout: set percent, allow, or both"#,
            r#"links[5].rollout: entity "noprops" has no match_keys to select records by"#,
            r#"state.cache_mb: must be > 0"#,
            r#"systems.bad name: name must be letters, digits, '_' or '-'"#,
            r#"systems.crm.auth.password.credential: must be a credential name, not a path"#,
            r#"systems.crm.auth.username: must not be empty"#,
            r#"systems.crm.export_dir: must be set: links[1], links[4] write to this system"#,
            r#"systems.hr.auth.token.env: must not be empty"#,
            r#"systems.hr.inbox: must be set: links[0] captures from this system"#,
            r#"systems.hr.rate_limit.burst: must be > 0"#,
            r#"systems.hr.rate_limit.per_second: must be > 0"#,
            r#"systems.hr.write_batch_size: must be > 0"#,
            r#"systems.lms.auth: set header or query, not both"#,
            r#"systems.lms.auth.key.file: must not be empty"#,
            r#"systems.lms.max_file_bytes: must be > 0"#,
            r#"systems.out.export_dir: must not be empty"#,
        ];
        let found = problems(&config);
        let missing: Vec<&&str> = expected.iter().filter(|e| !found.iter().any(|f| f == *e)).collect();
        let unexpected: Vec<&String> = found.iter().filter(|f| !expected.contains(&f.as_str())).collect();
        assert!(
            missing.is_empty() && unexpected.is_empty(),
            "missing: {missing:#?}\nunexpected: {unexpected:#?}"
        );
        assert_eq!(found, expected, "problems come sorted by path");
    }

    #[test]
    fn postgres_systems_are_checked() {
        let toml = r#"
            [state]
            dir = "state"
            [systems.app]
            type = "postgres"
            host = ""
            port = 0
            database = "app"
            user = "concord"
            password = { env = "" }
            tls = "disable"
            tls_ca_file = "ca.pem"
            slot = "Bad-Slot"
            snapshot_chunk_rows = 0
            status_interval_secs = 0
            auth = { method = "bearer", token = { env = "T" } }
            [entities.contact]
            schema = "contact.schema.json"
            [[links]]
            system = "app"
            entity = "contact"
            object = "a.b.c"
            id_field = "id"
            capture = { interval_secs = 60 }
        "#;
        let (_dir, config) = config_with(toml, &[("contact.schema.json", CONTACT_SCHEMA)]);
        assert_eq!(
            problems(&config),
            vec![
                "links[0].capture.interval_secs: must be <= 10 for a postgres system",
                r#"links[0].object: must be "schema.table" or "table""#,
                "systems.app.auth: a postgres system takes its password from `password = { ... }`, not `auth`",
                "systems.app.host: must not be empty",
                "systems.app.password.env: must not be empty",
                "systems.app.port: must be > 0",
                "systems.app.slot: must be lowercase letters, digits or '_'",
                "systems.app.snapshot_chunk_rows: must be > 0",
                "systems.app.status_interval_secs: must be > 0",
                r#"systems.app.tls_ca_file: is set but tls is "disable""#,
            ]
        );
    }

    #[test]
    fn problems_sort_indices_as_numbers_and_do_not_repeat() {
        let mut links = String::new();
        for _ in 0..12 {
            links.push_str("[[links]]\nsystem = \"nope\"\nentity = \"contact\"\nobject = \"o\"\nid_field = \"id\"\n");
        }
        let toml =
            format!("[state]\ndir = \"s\"\n[systems]\n[entities.contact]\nschema = \"contact.schema.json\"\n{links}");
        let (_dir, config) = config_with(&toml, &[("contact.schema.json", CONTACT_SCHEMA)]);
        let paths: Vec<String> = validate(&config).into_iter().map(|p| p.path).collect();
        let unknown: Vec<&str> = paths
            .iter()
            .map(String::as_str)
            .filter(|p| p.ends_with(".system"))
            .collect();
        let expected: Vec<String> = (0..12).map(|i| format!("links[{i}].system")).collect();
        assert_eq!(unknown, expected);
        // Every later link repeats links[0]'s (system, entity): one problem each.
        let duplicates = paths.iter().filter(|p| !p.contains('.')).count();
        assert_eq!(duplicates, 11, "{paths:#?}");
    }

    #[test]
    fn a_missing_secret_file_is_not_a_problem_but_an_empty_env_name_is() {
        let toml = r#"
            [state]
            dir = "s"
            [systems.a]
            type = "file"
            auth = { method = "bearer", token = { file = "/nonexistent/run/credentials/token" } }
            [systems.b]
            type = "file"
            auth = { method = "bearer", token = { env = "" } }
            [entities]
        "#;
        let (_dir, config) = config_with(toml, &[]);
        assert_eq!(problems(&config), ["systems.b.auth.token.env: must not be empty"]);
    }

    #[test]
    fn natural_order_compares_digit_runs_as_numbers() {
        assert_eq!(natural_cmp("links[2].x", "links[10].x"), Ordering::Less);
        assert_eq!(natural_cmp("links[10]", "links[9]"), Ordering::Greater);
        assert_eq!(natural_cmp("a.b", "a.c"), Ordering::Less);
        assert_eq!(natural_cmp("links[1]", "links[1].system"), Ordering::Less);
    }
}

#[cfg(test)]
mod rest_tests {
    use super::*;

    #[test]
    fn rest_systems_are_checked_with_paths() {
        let text = r#"
            [state]
            dir = "s"

            [systems.api]
            type = "rest"
            base_url = "ftp://example.com"
            timeout_ms = 0
            max_concurrency = 0
            headers = { "Bad Header" = "x" }

            [systems.api.objects.items]
            list = { path = "items" }
            records = "data"
            pagination = { style = "page", size = 0 }
            cursor = { field = "", param = "since", template = "updated > now" }
            write = { item_path = "/items", created_id = "id" }
            deletes = { mode = "full_scan", interval_secs = 0 }

            [entities.contact]
            schema = "contact.schema.json"

            [[links]]
            system = "api"
            entity = "contact"
            object = "items"
            id_field = "id"
            map = [{ canonical = "email", system = "email" }]

            [[links]]
            system = "api"
            entity = "contact"
            object = "others"
            id_field = "id"
            map = [{ canonical = "email", system = "email" }]
        "#;
        let config: Config = crate::config::parse(text).expect("parses");
        let got: Vec<String> = validate(&config)
            .iter()
            .map(Problem::to_string)
            .filter(|p| p.starts_with("systems.api") || p.starts_with("links[1].object"))
            .collect();
        for want in [
            "systems.api.base_url: must be an http or https url with a host",
            "systems.api.timeout_ms: must be > 0",
            "systems.api.max_concurrency: must be > 0",
            "systems.api.headers.Bad Header: not a valid header name and value",
            "systems.api.objects.items.list.path: must start with /",
            "systems.api.objects.items.records: must be a JSON pointer: empty or starting with /",
            "systems.api.objects.items.pagination: page size must be > 0",
            "systems.api.objects.items.cursor.field: must not be empty",
            "systems.api.objects.items.cursor.template: must contain {cursor}",
            "systems.api.objects.items.write.item_path: must contain {id}",
            "systems.api.objects.items.write: set create_path or upsert: a link creates records of this object",
            "systems.api.objects.items.write.created_id: must be a JSON pointer: empty or starting with /",
            "systems.api.objects.items.deletes.interval_secs: must be > 0",
            "links[1].object: \"others\" is not an object of systems.api.objects",
        ] {
            assert!(got.iter().any(|p| p == want), "missing {want:?} in {got:#?}");
        }
    }

    #[test]
    fn the_documented_crm_and_lms_systems_are_valid() {
        let doc = include_str!("../connector/rest/config.rs");
        let mut systems = String::new();
        let mut inside = false;
        for line in doc.lines() {
            match line.trim_start() {
                "//! ```toml" => inside = true,
                "//! ```" => inside = false,
                l if inside => {
                    systems.push_str(l.strip_prefix("//!").unwrap_or(l).strip_prefix(' ').unwrap_or(""));
                    systems.push('\n');
                }
                _ => {}
            }
        }
        let text = format!("[state]\ndir = \"s\"\n[entities]\n{systems}");
        let config: Config = crate::config::parse(&text).expect("the examples parse");
        let problems: Vec<String> = validate(&config)
            .iter()
            .map(Problem::to_string)
            .filter(|p| !p.contains(".auth."))
            .collect();
        assert!(problems.is_empty(), "{problems:#?}");
        assert_eq!(config.systems.len(), 2);
    }
}
