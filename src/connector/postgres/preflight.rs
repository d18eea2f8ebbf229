//! Preflight of a `postgres` system: what `concord check` verifies before the daemon
//! runs, so that a setup problem is a clear message with its fix instead of a link that
//! stops at three in the morning.
//!
//! For a system whose links capture:
//! - `wal_level` is `logical` (pgoutput needs it; changing it needs a restart);
//! - the role has `REPLICATION` (or is a superuser, which works but is warned about);
//! - the publication exists and holds each captured table, publishes inserts, updates
//!   and deletes, and publishes a partitioned table under its root's name
//!   (`publish_via_partition_root`), or `create_publication` is on and the role may create it or
//!   add the tables (`CREATE` on the database and ownership of the tables, ownership of
//!   the publication to add to it);
//! - each link's slot (`<slot>_<entity>`) exists as a logical `pgoutput` slot of this
//!   database that was not invalidated, or `create_slot` is on and
//!   `max_replication_slots` leaves room for it; `max_wal_senders` has room for one
//!   stream per capturing link;
//! - each captured table's replica identity lets updates and deletes through: `NOTHING`
//!   does not, `DEFAULT` does only with a primary key, `USING INDEX` only while the index
//!   exists; the fixes are `REPLICA IDENTITY FULL` or `USING INDEX`. A partitioned table
//!   is checked partition by partition (changes are decoded per partition).
//!
//! For every linked table: it exists, the role may use its schema, it has the grants the
//! links need (`SELECT` to capture; `SELECT, INSERT, UPDATE, DELETE` to write; `SELECT`
//! is needed for `RETURNING` and the key lookups), and no more (a warning with the
//! `REVOKE`); a written table's `id_field` has a primary key or unique index of its own
//! (the upsert's `ON CONFLICT` needs one) and the `version_field` exists.
//!
//! Every finding carries the SQL that fixes it. Errors make `concord check` exit 2;
//! warnings are printed and do not.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use tokio_postgres::Client;

use super::config::{PostgresSystemConfig, TableName, quote_ident, quote_literal};
use super::error::classify;
use super::{ConnectError, connect};
use crate::config::ConnectorConfig;
use crate::engine::runtime::Runtime;

/// How long the checks of one system may take, connection included: long enough for a
/// slow network, short enough that `concord check` does not hang on a dead host.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The daemon would fail or lose changes: `concord check` exits 2.
    Error,
    /// Works, but is not what production should run.
    Warning,
}

/// One problem, with the configuration path it concerns and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// `systems.app`, or `links[2].object` for a table's problem.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.severity {
            Severity::Error => write!(f, "{}: {}", self.path, self.message),
            Severity::Warning => write!(f, "warning: {}: {}", self.path, self.message),
        }
    }
}

/// How the links of a system use one table.
#[derive(Debug, Clone)]
pub struct TableUse {
    /// Configuration path of the link's object, for findings: `links[2].object`.
    pub path: String,
    pub object: String,
    pub entity: String,
    pub id_field: String,
    pub version_field: Option<String>,
    pub captures: bool,
    pub writes: bool,
}

/// Checks every `postgres` system of a compiled configuration.
pub async fn check_all(rt: &Runtime) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (name, system) in &rt.config.systems {
        let ConnectorConfig::Postgres(cfg) = &system.connector else {
            continue;
        };
        let uses: Vec<TableUse> = rt
            .links
            .iter()
            .filter(|l| &l.config.system == name && (l.captures || l.writes))
            .map(|l| TableUse {
                path: format!("links[{}].object", l.index),
                object: l.config.object.clone(),
                entity: l.config.entity.clone(),
                id_field: l.config.id_field.clone(),
                version_field: l.config.version_field.clone(),
                captures: l.captures,
                writes: l.writes,
            })
            .collect();
        findings.extend(check_system(name, cfg, &rt.config.base_dir, &uses).await);
    }
    findings
}

/// Checks one system; see the module doc.
pub async fn check_system(name: &str, cfg: &PostgresSystemConfig, base_dir: &Path, uses: &[TableUse]) -> Vec<Finding> {
    let path = format!("systems.{name}");
    let mut report = Report {
        path: path.clone(),
        findings: Vec::new(),
    };
    let checks = async {
        let client = match connect(cfg, base_dir).await {
            Ok(client) => client,
            Err(error) => {
                let reason = match &error {
                    ConnectError::Postgres(e) => classify("connect", e).reason,
                    other => other.to_string(),
                };
                report.error(&path, format!("cannot connect as {:?}: {reason}", cfg.user));
                return;
            }
        };
        if let Err(e) = run_checks(&client, cfg, uses, &mut report).await {
            report.error(
                &path,
                format!("cannot read the catalog: {}", classify("preflight", &e).reason),
            );
        }
    };
    if tokio::time::timeout(CHECK_TIMEOUT, checks).await.is_err() {
        report.findings.push(Finding {
            severity: Severity::Error,
            path,
            message: format!(
                "no answer from {}:{} within {} s",
                cfg.host,
                cfg.port,
                CHECK_TIMEOUT.as_secs()
            ),
        });
    }
    report.findings
}

/// Findings of one system.
struct Report {
    /// `systems.<name>`.
    path: String,
    findings: Vec<Finding>,
}

impl Report {
    fn error(&mut self, path: &str, message: String) {
        self.findings.push(Finding {
            severity: Severity::Error,
            path: path.to_string(),
            message,
        });
    }
    fn warning(&mut self, path: &str, message: String) {
        self.findings.push(Finding {
            severity: Severity::Warning,
            path: path.to_string(),
            message,
        });
    }
}

/// What the server says about the role and its settings.
struct Server {
    role: String,
    superuser: bool,
    replication: bool,
    may_create_in_database: bool,
    wal_level: String,
    max_replication_slots: i64,
    used_replication_slots: i64,
    max_wal_senders: i64,
}

const SERVER_SQL: &str = "
SELECT current_user::text,
       r.rolsuper,
       r.rolreplication,
       has_database_privilege(current_database(), 'CREATE'),
       current_setting('wal_level'),
       current_setting('max_replication_slots')::int8,
       (SELECT count(*) FROM pg_catalog.pg_replication_slots),
       current_setting('max_wal_senders')::int8
FROM pg_catalog.pg_roles r
WHERE r.rolname = current_user";

/// One table as the catalog describes it.
struct TableFacts {
    oid: u32,
    /// `r` table, `p` partitioned table.
    kind: char,
    /// `relreplident`: `d` default, `n` nothing, `f` full, `i` index.
    identity: char,
    has_primary_key: bool,
    identity_index_ok: bool,
    owned: bool,
    schema_usage: bool,
    privileges: BTreeSet<&'static str>,
    columns: BTreeSet<String>,
    id_unique: bool,
}

const PRIVILEGES: [&str; 7] = [
    "SELECT",
    "INSERT",
    "UPDATE",
    "DELETE",
    "TRUNCATE",
    "REFERENCES",
    "TRIGGER",
];

const TABLE_SQL: &str = "
SELECT c.relkind::text,
       c.relreplident::text,
       EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
       EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisreplident),
       pg_catalog.pg_has_role(c.relowner, 'USAGE'),
       has_schema_privilege(n.oid, 'USAGE'),
       has_table_privilege(c.oid, 'SELECT'),
       has_table_privilege(c.oid, 'INSERT'),
       has_table_privilege(c.oid, 'UPDATE'),
       has_table_privilege(c.oid, 'DELETE'),
       has_table_privilege(c.oid, 'TRUNCATE'),
       has_table_privilege(c.oid, 'REFERENCES'),
       has_table_privilege(c.oid, 'TRIGGER'),
       ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
       EXISTS (SELECT 1 FROM pg_catalog.pg_index i
               JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
               WHERE i.indrelid = c.oid AND i.indisunique AND i.indnkeyatts = 1
                 AND i.indpred IS NULL AND i.indexprs IS NULL AND a.attname = $3),
       c.oid
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')";

/// Leaf partitions of a partitioned table whose replica identity lets no update or
/// delete through.
const PARTITIONS_SQL: &str = "
SELECT c.oid::regclass::text, c.relreplident::text,
       EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
       EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisreplident)
FROM pg_catalog.pg_partition_tree($1::oid) t
JOIN pg_catalog.pg_class c ON c.oid = t.relid
WHERE t.isleaf";

async fn run_checks(
    client: &Client,
    cfg: &PostgresSystemConfig,
    uses: &[TableUse],
    report: &mut Report,
) -> Result<(), tokio_postgres::Error> {
    let system_path = report.path.clone();
    let row = client.query_one(SERVER_SQL, &[]).await?;
    let server = Server {
        role: row.get(0),
        superuser: row.get(1),
        replication: row.get(2),
        may_create_in_database: row.get(3),
        wal_level: row.get(4),
        max_replication_slots: row.get(5),
        used_replication_slots: row.get(6),
        max_wal_senders: row.get(7),
    };
    let role = quote_ident(&server.role);
    let capturing: Vec<&TableUse> = uses.iter().filter(|u| u.captures).collect();

    if server.superuser {
        report.warning(
            &system_path,
            format!(
                "role {:?} is a superuser; concord needs only REPLICATION and the table grants in the README: \
                 create a dedicated role (CREATE ROLE concord LOGIN REPLICATION PASSWORD '…';)",
                server.role
            ),
        );
    }
    if !capturing.is_empty() {
        if server.wal_level != "logical" {
            report.error(
                &system_path,
                format!(
                    "wal_level is {:?}, logical replication needs \"logical\": ALTER SYSTEM SET wal_level = logical; \
                     and restart the server",
                    server.wal_level
                ),
            );
        }
        if !server.replication && !server.superuser {
            report.error(
                &system_path,
                format!(
                    "role {:?} lacks REPLICATION, which capture needs: ALTER ROLE {role} WITH REPLICATION;",
                    server.role
                ),
            );
        }
        if server.max_wal_senders < capturing.len() as i64 {
            report.error(
                &system_path,
                format!(
                    "max_wal_senders is {}, fewer than the {} capturing links (one stream each): \
                     ALTER SYSTEM SET max_wal_senders = {}; and restart the server",
                    server.max_wal_senders,
                    capturing.len(),
                    server.max_wal_senders + capturing.len() as i64
                ),
            );
        }
    }

    // Tables: existence, schema usage, grants, keys, replica identity.
    let mut facts: Vec<(&TableUse, TableName, Option<TableFacts>)> = Vec::new();
    for table_use in uses {
        let Some(name) = TableName::parse(&table_use.object) else {
            continue;
        };
        let found = table_facts(client, &name, &table_use.id_field).await?;
        match &found {
            None => report.error(
                &table_use.path,
                format!("table {name} does not exist (or is not a table)"),
            ),
            Some(f) => check_table(client, table_use, &name, f, &server, &role, report).await?,
        }
        facts.push((table_use, name, found));
    }

    if capturing.is_empty() {
        return Ok(());
    }
    check_publication(client, cfg, &facts, &server, report).await?;
    check_slots(client, cfg, &capturing, &server, report).await?;
    Ok(())
}

async fn table_facts(
    client: &Client,
    name: &TableName,
    id_field: &str,
) -> Result<Option<TableFacts>, tokio_postgres::Error> {
    let Some(row) = client
        .query_opt(TABLE_SQL, &[&name.schema, &name.table, &id_field])
        .await?
    else {
        return Ok(None);
    };
    let first_char = |i: usize| row.get::<_, String>(i).chars().next().unwrap_or(' ');
    let mut privileges = BTreeSet::new();
    for (offset, privilege) in PRIVILEGES.iter().enumerate() {
        if row.get::<_, bool>(6 + offset) {
            privileges.insert(*privilege);
        }
    }
    Ok(Some(TableFacts {
        oid: row.get(15),
        kind: first_char(0),
        identity: first_char(1),
        has_primary_key: row.get(2),
        identity_index_ok: row.get(3),
        owned: row.get(4),
        schema_usage: row.get(5),
        privileges,
        columns: row.get::<_, Vec<String>>(13).into_iter().collect(),
        id_unique: row.get(14),
    }))
}

async fn check_table(
    client: &Client,
    table_use: &TableUse,
    name: &TableName,
    f: &TableFacts,
    server: &Server,
    role: &str,
    report: &mut Report,
) -> Result<(), tokio_postgres::Error> {
    let path = &table_use.path;
    let quoted = name.quoted();
    if !f.schema_usage {
        report.error(
            path,
            format!(
                "role {:?} may not use schema {:?}: GRANT USAGE ON SCHEMA {} TO {role};",
                server.role,
                name.schema,
                quote_ident(&name.schema)
            ),
        );
    }
    let mut needed: BTreeSet<&'static str> = BTreeSet::new();
    if table_use.captures || table_use.writes {
        needed.insert("SELECT");
    }
    if table_use.writes {
        needed.extend(["INSERT", "UPDATE", "DELETE"]);
    }
    let missing: Vec<&str> = PRIVILEGES
        .iter()
        .copied()
        .filter(|p| needed.contains(p) && !f.privileges.contains(p))
        .collect();
    if !missing.is_empty() {
        report.error(
            path,
            format!(
                "role {:?} lacks {} on {name}: GRANT {} ON {quoted} TO {role};",
                server.role,
                missing.join(", "),
                missing.join(", ")
            ),
        );
    }
    if !server.superuser && !f.owned {
        let extra: Vec<&str> = PRIVILEGES
            .iter()
            .copied()
            .filter(|p| !needed.contains(p) && f.privileges.contains(p))
            .collect();
        if !extra.is_empty() {
            report.warning(
                path,
                format!(
                    "role {:?} holds {} on {name}, which concord does not need: REVOKE {} ON {quoted} FROM {role};",
                    server.role,
                    extra.join(", "),
                    extra.join(", ")
                ),
            );
        }
    }
    for (key, column) in [
        ("id_field", Some(&table_use.id_field)),
        ("version_field", table_use.version_field.as_ref()),
    ] {
        if let Some(column) = column
            && !f.columns.contains(column)
        {
            report.error(path, format!("{key} {column:?} is not a column of {name}"));
        }
    }
    if table_use.writes && f.columns.contains(&table_use.id_field) && !f.id_unique {
        report.error(
            path,
            format!(
                "id_field {:?} of {name} has no primary key or unique index of its own, which the upsert needs: \
                 ALTER TABLE {quoted} ADD PRIMARY KEY ({});",
                table_use.id_field,
                quote_ident(&table_use.id_field)
            ),
        );
    }
    if table_use.captures {
        if f.kind == 'p' {
            for row in client.query(PARTITIONS_SQL, &[&f.oid]).await? {
                let partition: String = row.get(0);
                let identity = row.get::<_, String>(1).chars().next().unwrap_or(' ');
                if let Some(problem) = identity_problem(identity, row.get(2), row.get(3)) {
                    report.error(
                        path,
                        format!("partition {partition} of {name}: {problem}{}", identity_fix(&partition)),
                    );
                }
            }
        } else if let Some(problem) = identity_problem(f.identity, f.has_primary_key, f.identity_index_ok) {
            report.error(path, format!("table {name}: {problem}{}", identity_fix(&quoted)));
        }
    }
    Ok(())
}

/// Why a replica identity lets updates or deletes through without the row's key, if it
/// does.
fn identity_problem(identity: char, has_primary_key: bool, identity_index_ok: bool) -> Option<&'static str> {
    match identity {
        'n' => Some("replica identity is NOTHING, so updates and deletes are not captured"),
        'd' if !has_primary_key => Some(
            "replica identity is DEFAULT but the table has no primary key, so updates and deletes are not captured",
        ),
        'i' if !identity_index_ok => {
            Some("replica identity is USING INDEX but that index is gone, so updates and deletes are not captured")
        }
        _ => None,
    }
}

fn identity_fix(quoted: &str) -> String {
    format!(
        ": ALTER TABLE {quoted} REPLICA IDENTITY FULL; (or add a primary key, or REPLICA IDENTITY USING INDEX \
         <a unique index on NOT NULL columns>)"
    )
}

async fn check_publication(
    client: &Client,
    cfg: &PostgresSystemConfig,
    facts: &[(&TableUse, TableName, Option<TableFacts>)],
    server: &Server,
    report: &mut Report,
) -> Result<(), tokio_postgres::Error> {
    let path = format!("{}.publication", report.path);
    let publication = &cfg.publication;
    let quoted_publication = quote_ident(publication);
    let captured: Vec<(&TableUse, &TableName, &TableFacts)> = facts
        .iter()
        .filter(|(u, _, _)| u.captures)
        .filter_map(|(u, n, f)| f.as_ref().map(|f| (*u, n, f)))
        .collect();
    let row = client
        .query_opt(
            "SELECT pubinsert, pubupdate, pubdelete, puballtables, pg_catalog.pg_has_role(pubowner, 'USAGE'), \
             pubviaroot FROM pg_catalog.pg_publication WHERE pubname = $1",
            &[publication],
        )
        .await?;
    let Some(row) = row else {
        let tables: Vec<String> = captured.iter().map(|(_, n, _)| n.quoted()).collect();
        // publish_via_partition_root: changes of a partitioned table then carry the
        // root's name, the table the link names; it changes nothing for plain tables.
        let create = format!(
            "CREATE PUBLICATION {quoted_publication} FOR TABLE {} WITH (publish_via_partition_root = true);",
            tables.join(", ")
        );
        if !cfg.create_publication {
            report.error(
                &path,
                format!("publication {publication:?} does not exist and create_publication is false: {create}"),
            );
            return Ok(());
        }
        let owns_all = captured.iter().all(|(_, _, f)| f.owned);
        let may_create = server.superuser || (server.may_create_in_database && owns_all);
        if !may_create {
            report.error(
                &path,
                format!(
                    "publication {publication:?} does not exist and role {:?} may not create it (that needs CREATE \
                     on the database and ownership of the tables): have the tables' owner run {create}",
                    server.role
                ),
            );
        }
        return Ok(());
    };
    let (inserts, updates, deletes, all_tables, owned): (bool, bool, bool, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    if !(inserts && updates && deletes) {
        report.error(
            &path,
            format!(
                "publication {publication:?} does not publish every insert, update and delete: ALTER PUBLICATION \
                 {quoted_publication} SET (publish = 'insert, update, delete, truncate');"
            ),
        );
    }
    let via_root: bool = row.get(5);
    if !via_root && let Some((table_use, name, _)) = captured.iter().find(|(_, _, f)| f.kind == 'p') {
        report.error(
            &table_use.path,
            format!(
                "table {name} is partitioned and publication {publication:?} publishes its changes under the \
                 partitions' names: ALTER PUBLICATION {quoted_publication} SET (publish_via_partition_root = true);"
            ),
        );
    }
    if all_tables {
        return Ok(());
    }
    for (table_use, name, f) in captured {
        let member: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_publication_tables \
                                WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)
                     OR EXISTS (SELECT 1 FROM pg_catalog.pg_publication p
                                JOIN pg_catalog.pg_publication_rel r ON r.prpubid = p.oid
                                JOIN pg_catalog.pg_class c ON c.oid = r.prrelid
                                JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                                WHERE p.pubname = $1 AND n.nspname = $2 AND c.relname = $3)",
                &[publication, &name.schema, &name.table],
            )
            .await?
            .get(0);
        if member {
            continue;
        }
        let add = format!("ALTER PUBLICATION {quoted_publication} ADD TABLE {};", name.quoted());
        if !cfg.create_publication {
            report.error(
                &table_use.path,
                format!("table {name} is not in publication {publication:?} and create_publication is false: {add}"),
            );
        } else if !(server.superuser || (owned && f.owned)) {
            report.error(
                &table_use.path,
                format!(
                    "table {name} is not in publication {publication:?} and role {:?} may not add it (that needs \
                     ownership of the publication and the table): have the owner run {add}",
                    server.role
                ),
            );
        }
    }
    Ok(())
}

async fn check_slots(
    client: &Client,
    cfg: &PostgresSystemConfig,
    capturing: &[&TableUse],
    server: &Server,
    report: &mut Report,
) -> Result<(), tokio_postgres::Error> {
    let mut to_create = Vec::new();
    let mut seen = BTreeSet::new();
    for table_use in capturing {
        let slot = cfg.slot_name(&table_use.entity);
        if !seen.insert(slot.clone()) {
            continue;
        }
        let path = format!("{}.slot", report.path);
        let row = client
            .query_opt(
                "SELECT slot_type, plugin::text, database::text = current_database(), wal_status \
                 FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?;
        let Some(row) = row else {
            if !cfg.create_slot {
                report.error(
                    &path,
                    format!(
                        "replication slot {slot:?} does not exist and create_slot is false: set create_slot = true \
                         (concord creates it with the snapshot it copies), or SELECT \
                         pg_create_logical_replication_slot({}, 'pgoutput');",
                        quote_literal(&slot)
                    ),
                );
            }
            to_create.push(slot);
            continue;
        };
        let slot_type: String = row.get(0);
        let plugin: Option<String> = row.get(1);
        let same_database: Option<bool> = row.get(2);
        let wal_status: Option<String> = row.get(3);
        let drop = format!("SELECT pg_drop_replication_slot({});", quote_literal(&slot));
        if slot_type != "logical" || plugin.as_deref() != Some("pgoutput") {
            report.error(
                &path,
                format!(
                    "replication slot {slot:?} is not a logical pgoutput slot ({slot_type}, {}): drop it ({drop}) or \
                     choose another slot name",
                    plugin.as_deref().unwrap_or("no plugin")
                ),
            );
        } else if same_database != Some(true) {
            report.error(
                &path,
                format!("replication slot {slot:?} belongs to another database: choose another slot name"),
            );
        } else if wal_status.as_deref() == Some("lost") {
            // Dropping the slot alone does not help a link with a checkpoint: a missing
            // slot stops it too. The re-snapshot is the fix either way.
            let what = format!(
                "replication slot {slot:?} was invalidated (the server removed WAL it needed, see \
                 max_slot_wal_keep_size): the changes since concord's checkpoint are lost"
            );
            if cfg.resnapshot_on_slot_loss {
                report.warning(
                    &path,
                    format!(
                        "{what}; resnapshot_on_slot_loss is on, so the link drops it, creates a new slot and \
                         reads the table again at its start"
                    ),
                );
            } else {
                report.error(
                    &path,
                    format!(
                        "{what}: re-snapshot the link: set resnapshot_on_slot_loss = true on {} and start concord \
                         (it drops the slot, creates a new one and reads the table again; rows deleted in the gap \
                         stay in concord), or, for a link that never ran, drop it ({drop})",
                        report.path
                    ),
                );
            }
        }
    }
    let free = server.max_replication_slots - server.used_replication_slots;
    if cfg.create_slot && to_create.len() as i64 > free {
        report.error(
            &format!("{}.slot", report.path),
            format!(
                "{} replication slot(s) to create but only {free} of max_replication_slots = {} free: \
                 ALTER SYSTEM SET max_replication_slots = {}; and restart the server",
                to_create.len(),
                server.max_replication_slots,
                server.used_replication_slots + to_create.len() as i64
            ),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_identities_that_hide_updates_and_deletes() {
        // (relreplident, has primary key, replica identity index present, acceptable)
        let cases = [
            ('d', true, false, true),
            ('d', false, false, false),
            ('f', false, false, true),
            ('i', false, true, true),
            ('i', true, false, false),
            ('n', true, false, false),
        ];
        for (identity, pk, index, fine) in cases {
            assert_eq!(
                identity_problem(identity, pk, index).is_none(),
                fine,
                "{identity} {pk} {index}"
            );
        }
    }

    #[test]
    fn findings_print_with_their_path() {
        let error = Finding {
            severity: Severity::Error,
            path: "systems.app".into(),
            message: "wal_level is \"replica\"".into(),
        };
        assert_eq!(error.to_string(), "systems.app: wal_level is \"replica\"");
        let warning = Finding {
            severity: Severity::Warning,
            ..error
        };
        assert_eq!(warning.to_string(), "warning: systems.app: wal_level is \"replica\"");
    }
}
