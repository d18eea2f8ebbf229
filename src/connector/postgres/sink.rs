//! The PostgreSQL sink: each call to [`PostgresSink::apply`] writes a batch of upserts
//! and deletes in one transaction.
//!
//! Statements, one per write, all parameterised, every identifier quoted:
//! - create: `INSERT INTO "s"."t" AS t ("id", "a", …) VALUES ($1::text::<type>, …)
//!   ON CONFLICT ("id") DO UPDATE SET "a" = EXCLUDED."a", … RETURNING "id"::text`, keyed
//!   by the id column's value in the write's fields, so a create repeated after a lost
//!   confirmation changes nothing. A create without that value lets the table generate
//!   the key (`INSERT … RETURNING`, no `ON CONFLICT`); such a repeat adds a second row,
//!   so map the key column when creates must be idempotent. When such a create runs into
//!   a row holding the same value of another unique key (the person was created outside
//!   concord, or captured from this table after the create was planned), the sink reads
//!   that row and hands it to the engine ([`PostgresSink::take_rereads`]), which merges
//!   it under field authority rather than dead-lettering the create.
//! - update: `UPDATE "s"."t" AS t SET "a" = $2::text::<type>, … WHERE t."id" = $1::…
//!   RETURNING "id"::text`, keyed by the local id the write carries. An update holds only
//!   the changed fields, so it cannot be an `INSERT … ON CONFLICT`: PostgreSQL checks
//!   `NOT NULL` on the proposed row before it looks for the conflict. An update of a row
//!   that is gone fails permanently (`not_found`) rather than recreating a row someone
//!   deleted.
//! - delete: `DELETE FROM "s"."t" AS t WHERE t."id" = $1::… RETURNING "id"::text`;
//!   deleting a row that is already gone succeeds.
//!
//! Runs of consecutive writes with the same statement (same table, operation and
//! columns, no version guard, no key twice) go to the server as one statement over
//! arrays, one `text[]` per parameter, unnested `WITH ORDINALITY`: `INSERT … SELECT …
//! FROM unnest(…) ORDER BY u.n`, `UPDATE … FROM unnest(…)`, `DELETE … USING unnest(…)`.
//! The server then parses, plans and executes once per run instead of once per row,
//! which is most of what a small write costs it. Updates and deletes return the
//! ordinality of each row they touched (a delete of a row not there succeeds, as
//! alone); an insert returns its rows in the order the `ORDER BY` feeds them. When a
//! statement over arrays fails for a row's data, or an update over arrays misses a row,
//! the transaction is rolled back and the batch runs again one statement per row
//! (below), which finds that row and gives it its own answer. The batch's
//! order is kept: a run never reorders writes of different records, so unique-key
//! changes between records happen in the order they were merged.
//!
//! Values travel as text and are cast to the column's type (`$n::text::numeric`), the
//! types being read once per table from the catalog: the text is what
//! [`values::to_pg_text`] makes of the canonical value, the inverse of what capture
//! reads, so numeric, timestamptz, uuid, bytea, json and arrays round-trip exactly.
//! The cast names the type without its modifier (`numeric`, not `numeric(10,2)`), so
//! the column's own assignment rules apply: a too long `varchar` value is refused
//! rather than cut (explicit casts cut, assignment does not).
//!
//! Optimistic concurrency: when the link has a `version_field` and the write carries
//! the version concord last saw, the update and the delete add `AND t."ver" =
//! $n::text::<type>` (compared as the column's type, so any text form of the same
//! timestamp matches). A stale version changes nothing and the write fails with
//! kind `version_conflict`, transient: the row's newer change is on its way through
//! capture, and the retry is planned against the shadow it updates. An integer version
//! column that the write does not set is incremented by every update concord makes, so
//! other optimistic writers see concord's writes too; other version types (a timestamp
//! set by a trigger) are left to the table. The acknowledgement carries the new version.
//!
//! Failures of single rows do not lose the batch: all statements are pipelined in one
//! transaction; when a row fails with a permanent error (a data or integrity error,
//! SQLSTATE classes 22 and 23, or an unknown column), the transaction is rolled back,
//! that row gets its
//! error, and the remaining rows run again in a new transaction with a savepoint around
//! each, so further failing rows are rolled back alone. Savepoints are not the first
//! choice because each written row under one takes a subtransaction id, and more than
//! 64 of them in one transaction slow every snapshot on the server. Any other error
//! (connection lost, serialization failure, missing privilege) fails the whole batch
//! with its class; see [`super::error`]. A batch that takes longer than
//! [`BATCH_TIMEOUT`] drops its connection (the server rolls the transaction back) and
//! fails transiently; the next batch connects again.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement, Transaction};

use super::config::{PostgresSystemConfig, TableName, quote_ident};
use super::error::classify;
use super::values::{self, Kind};
use super::{ConnectError, connect};
use crate::connector::rest::Reread;
use crate::connector::{ConnectorError, ErrorClass};
use crate::model::{ChangeKind, SourceRecord, Write, WriteAck, WriteOp};

/// Prepared statements kept per connection; past this the cache starts over, so a
/// stream of ever-new column sets cannot grow it without bound.
const MAX_STATEMENTS: usize = 512;
/// Longest a batch may take before the connection is dropped (the server then rolls the
/// transaction back) and the batch is retried: far above any healthy batch, short enough
/// that a half-open connection does not stall the applier for the TCP keepalive's hours.
pub const BATCH_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Savepoint name used around each row once a row of the batch has failed.
const SAVEPOINT: &str = "concord_row";

/// The table a link writes: its `object`, key column and optional version column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkTable {
    pub object: String,
    pub id_field: String,
    pub version_field: Option<String>,
}

/// Writes batches to one PostgreSQL system; see the module doc.
pub struct PostgresSink {
    system: String,
    config: PostgresSystemConfig,
    /// Directory secret file paths are relative to.
    base_dir: PathBuf,
    /// Link tables by `object`.
    links: HashMap<String, SinkTable>,
    /// Connected on first use and again after the connection was lost.
    client: Option<Client>,
    /// Column types by `object`, read once from the catalog; cleared when a statement
    /// fails in a way a schema change explains.
    tables: HashMap<String, Arc<Table>>,
    /// Prepared statements by SQL text, valid on `client` only.
    statements: HashMap<String, Statement>,
    /// The statement texts of each row shape ([`Shape::key`]): the row statement and
    /// the statement for a run of such rows (`None`: each runs alone). Built once per
    /// shape, not per row; cleared with the catalog.
    shapes: HashMap<String, (String, Option<String>)>,
    /// Rows read again after creates refused because the row already exists, for the
    /// engine to merge before it plans the write again; see [`PostgresSink::take_rereads`].
    rereads: Vec<Reread>,
}

/// A table as the catalog describes it.
#[derive(Debug)]
struct Table {
    /// `schema.table` as configured, for messages.
    label: String,
    /// `"schema"."table"`.
    quoted: String,
    id: String,
    version: Option<String>,
    columns: HashMap<String, Column>,
}

#[derive(Debug)]
struct Column {
    /// The type to cast the text to: `format_type` with modifier -1, which names the
    /// unconstrained type (`bpchar` and `"bit"`, where the bare `character` and `bit`
    /// would mean length 1).
    cast: String,
    /// How canonical values map to this column's text.
    kind: Kind,
}

/// One write turned into a statement.
struct Planned {
    /// The statement text, also its cache key.
    sql: String,
    /// The statement writing a run of rows of this shape at once, when there is one.
    group_sql: Option<String>,
    /// Which parameter is the row's key, when it has one.
    key_param: Option<usize>,
    params: Vec<Option<String>>,
    table: Arc<Table>,
    op: WriteOp,
    /// What the statement does, for error reasons: `upsert into public.people`.
    doing: String,
    /// For an update or delete guarded by a version: a statement telling whether the
    /// row exists, run when the guarded statement touched nothing (present → conflict).
    exists_sql: Option<String>,
    local_id: Option<String>,
}

/// How one row's statement ended inside the transaction.
enum RowDone {
    Written(Option<Returned>),
    Failed(ConnectorError),
}

/// Which placeholders a statement takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// One row: `$n::text::<type>`.
    Row,
    /// Many rows of one shape: `$n` is a `text[]` holding the n-th value of every row,
    /// unnested with its ordinality into `u(p1, …, n)`.
    Arrays,
}

/// What a write's statement depends on.
struct Shape<'a> {
    table: &'a Table,
    op: WriteOp,
    /// The columns written, without the key for an update.
    fields: &'a [(&'a String, &'a Value, &'a Column)],
    /// The key of an update or delete.
    local_id: Option<&'a str>,
    /// The version column and the version the write expects there.
    guard: Option<(&'a String, &'a String)>,
    /// An integer version column to increment.
    bump: Option<&'a String>,
}

impl Shape<'_> {
    /// What the statement text depends on: the table, the operation, the columns
    /// written, whether a version guards the write or is bumped. Not the values.
    fn key(&self) -> String {
        let mut key = String::with_capacity(64);
        key.push_str(&self.table.label);
        key.push('\0');
        key.push_str(self.op.as_str());
        key.push(if self.guard.is_some() { 'g' } else { '-' });
        key.push(if self.bump.is_some() { 'b' } else { '-' });
        for (name, _, _) in self.fields {
            key.push('\0');
            key.push_str(name);
        }
        key
    }

    /// The statement text; its parameters are [`Shape::params`], the same in both
    /// forms. The `Arrays` form returns the ordinality first for updates and deletes
    /// (they may skip rows) and follows it for creates (every row is inserted, in
    /// order).
    fn statement(&self, form: Form) -> String {
        let table = self.table;
        let mut count = 0;
        let mut param = |column: &Column| {
            count += 1;
            match form {
                Form::Row => format!("${count}::text::{}", column.cast),
                Form::Arrays => format!("u.p{count}::{}", column.cast),
            }
        };
        let id = quote_ident(&table.id);
        let id_column = &table.columns[&table.id];
        let bump = self.bump.map(|column| {
            let v = quote_ident(column);
            format!("{v} = COALESCE(t.{v}, 0) + 1")
        });
        let (mut sql, guard_check) = match self.op {
            WriteOp::Create => {
                let names: Vec<String> = self.fields.iter().map(|(name, _, _)| quote_ident(name)).collect();
                let exprs: Vec<String> = self.fields.iter().map(|(_, _, column)| param(column)).collect();
                let mut sql = match form {
                    _ if self.fields.is_empty() => format!("INSERT INTO {} AS t DEFAULT VALUES", table.quoted),
                    Form::Row => format!(
                        "INSERT INTO {} AS t ({}) VALUES ({})",
                        table.quoted,
                        names.join(", "),
                        exprs.join(", ")
                    ),
                    Form::Arrays => format!(
                        "INSERT INTO {} AS t ({}) SELECT {} FROM {} ORDER BY u.n",
                        table.quoted,
                        names.join(", "),
                        exprs.join(", "),
                        unnest(exprs.len())
                    ),
                };
                if self.fields.iter().any(|(name, _, _)| **name == table.id) {
                    let mut sets: Vec<String> = self
                        .fields
                        .iter()
                        .filter(|(name, _, _)| **name != table.id)
                        .map(|(name, _, _)| format!("{0} = EXCLUDED.{0}", quote_ident(name)))
                        .collect();
                    sets.extend(bump.clone());
                    if sets.is_empty() {
                        sets.push(format!("{id} = EXCLUDED.{id}"));
                    }
                    sql.push_str(&format!(" ON CONFLICT ({id}) DO UPDATE SET {}", sets.join(", ")));
                }
                (sql, None)
            }
            WriteOp::Update => {
                let key = param(id_column);
                let mut sets: Vec<String> = self
                    .fields
                    .iter()
                    .map(|(name, _, column)| format!("{} = {}", quote_ident(name), param(column)))
                    .collect();
                sets.extend(bump.clone());
                if sets.is_empty() {
                    sets.push(format!("{id} = t.{id}"));
                }
                let from = match form {
                    Form::Row => String::new(),
                    Form::Arrays => format!(" FROM {}", unnest(1 + self.fields.len())),
                };
                (
                    format!(
                        "UPDATE {} AS t SET {}{from} WHERE t.{id} = {key}",
                        table.quoted,
                        sets.join(", ")
                    ),
                    self.guard,
                )
            }
            WriteOp::Delete => {
                let key = param(id_column);
                let using = match form {
                    Form::Row => String::new(),
                    Form::Arrays => format!(" USING {}", unnest(1)),
                };
                (
                    format!("DELETE FROM {} AS t{using} WHERE t.{id} = {key}", table.quoted),
                    self.guard,
                )
            }
        };
        if let Some((column, _)) = guard_check {
            let check = param(&table.columns[column]);
            sql.push_str(&format!(" AND t.{} = {check}", quote_ident(column)));
        }
        let ordinality = match (form, self.op) {
            (Form::Arrays, WriteOp::Update | WriteOp::Delete) => "u.n, ",
            _ => "",
        };
        match &table.version {
            Some(column) => sql.push_str(&format!(
                " RETURNING {ordinality}t.{id}::text, t.{}::text",
                quote_ident(column)
            )),
            None => sql.push_str(&format!(" RETURNING {ordinality}t.{id}::text")),
        }
        sql
    }

    /// The values of [`Shape::statement`]'s parameters as PostgreSQL text, in its
    /// order: the key of an update or delete, the columns written by a create or an
    /// update, the expected version of a guarded update or delete.
    fn params(&self) -> Vec<Option<String>> {
        let table = self.table;
        let text = |column: &Column, value: &str| values::to_pg_text(&column.kind, &Value::String(value.to_string()));
        let mut params = Vec::with_capacity(self.fields.len() + 2);
        if self.op != WriteOp::Create {
            params.push(text(&table.columns[&table.id], self.local_id.unwrap_or_default()));
        }
        if self.op != WriteOp::Delete {
            params.extend(
                self.fields
                    .iter()
                    .map(|(_, value, column)| values::to_pg_text(&column.kind, value)),
            );
        }
        if let Some((column, expected)) = self.guard.filter(|_| self.op != WriteOp::Create) {
            params.push(text(&table.columns[column], expected));
        }
        params
    }
}

/// `unnest($1::text[], …, $k::text[]) WITH ORDINALITY AS u(p1, …, pk, n)`.
fn unnest(k: usize) -> String {
    let arrays: Vec<String> = (1..=k).map(|i| format!("${i}::text[]")).collect();
    let names: Vec<String> = (1..=k).map(|i| format!("p{i}")).collect();
    format!(
        "unnest({}) WITH ORDINALITY AS u({}, n)",
        arrays.join(", "),
        names.join(", ")
    )
}

impl PostgresSink {
    /// A sink for `system` writing the given link tables; connects on first use.
    pub fn open(
        system: &str,
        config: &PostgresSystemConfig,
        base_dir: &Path,
        tables: Vec<SinkTable>,
    ) -> Result<PostgresSink, ConnectorError> {
        let mut links = HashMap::new();
        for table in tables {
            if TableName::parse(&table.object).is_none() {
                return Err(ConnectorError::fatal(
                    "config",
                    format!("object {:?} is not \"schema.table\" or \"table\"", table.object),
                ));
            }
            links.insert(table.object.clone(), table);
        }
        Ok(PostgresSink {
            system: system.to_string(),
            config: config.clone(),
            base_dir: base_dir.to_path_buf(),
            links,
            client: None,
            tables: HashMap::new(),
            statements: HashMap::new(),
            shapes: HashMap::new(),
            rereads: Vec::new(),
        })
    }

    /// Writes `writes` in one transaction; one result per write, in order.
    pub async fn apply(&mut self, writes: Vec<Write>) -> Vec<Result<WriteAck, ConnectorError>> {
        if writes.is_empty() {
            return Vec::new();
        }
        let connected = match tokio::time::timeout(CONNECT_TIMEOUT, self.ensure_connected()).await {
            Ok(result) => result,
            Err(_) => Err(ConnectorError::transient(
                "timeout",
                format!("connect: no answer within {} s", CONNECT_TIMEOUT.as_secs()),
            )),
        };
        if let Err(error) = connected {
            tracing::warn!(system = %self.system, error = %error, class = error.class.as_str(), "cannot connect");
            return writes.iter().map(|_| Err(error.clone())).collect();
        }
        let mut results: Vec<Option<Result<WriteAck, ConnectorError>>> = Vec::with_capacity(writes.len());
        let mut planned = Vec::new();
        let mut slots = Vec::new();
        for write in &writes {
            match self.plan(write).await {
                Ok(p) => {
                    slots.push(results.len());
                    results.push(None);
                    planned.push(p);
                }
                Err(error) => results.push(Some(Err(error))),
            }
        }
        if !planned.is_empty() {
            let outcome = match tokio::time::timeout(BATCH_TIMEOUT, self.run(&planned)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(ConnectorError::transient(
                    "connection",
                    format!(
                        "batch not done within {} s; the connection is dropped",
                        BATCH_TIMEOUT.as_secs()
                    ),
                )),
            };
            let outcome = match outcome {
                Ok(rows) => rows,
                Err(error) => {
                    tracing::warn!(system = %self.system, error = %error, class = error.class.as_str(), "batch not written");
                    self.forget_after(&error);
                    planned.iter().map(|_| Err(error.clone())).collect()
                }
            };
            for (slot, result) in slots.into_iter().zip(outcome) {
                if let Err(error) = &result {
                    self.forget_after(error);
                }
                results[slot] = Some(result);
            }
        }
        let results: Vec<Result<WriteAck, ConnectorError>> = results
            .into_iter()
            .map(|r| r.expect("every write has a result: planned or refused"))
            .collect();
        for (write, result) in writes.iter().zip(&results) {
            // Only a create without a key: one that carries its key is an upsert on it,
            // and a conflict on another unique key is with a different row.
            if write.op == WriteOp::Create
                && self
                    .links
                    .get(&write.object)
                    .is_some_and(|l| !write.fields.contains_key(&l.id_field))
                && let Err(error) = result
                && error.kind == "integrity"
            {
                match self.reread(write).await {
                    Ok(Some(record)) => self.rereads.push(Reread {
                        seq: write.seq,
                        entity: write.entity.clone(),
                        refused: write.op,
                        record,
                    }),
                    Ok(None) => {}
                    Err(error) => {
                        tracing::warn!(system = %self.system, error = %error, "cannot read the row a create ran into");
                    }
                }
            }
        }
        results
    }

    /// Rows read again since the last call: each belongs to a create without a key that
    /// the table refused because a row with the same unique key is already there (created outside concord,
    /// or captured from this system after the create was planned, as when two systems
    /// first meet and both hold the person). The engine merges the row as a change from
    /// this system, under field authority, instead of dead-lettering the create, and
    /// plans from that merge whatever update the row still needs.
    pub fn take_rereads(&mut self) -> Vec<Reread> {
        std::mem::take(&mut self.rereads)
    }

    /// The row a refused create ran into: the first row matching, on every column of a
    /// unique index of the table (without predicate or expressions), the values the
    /// create carries. `None` when the create carries no complete unique key or no row
    /// matches (the refusal had another cause).
    async fn reread(&mut self, write: &Write) -> Result<Option<SourceRecord>, ConnectorError> {
        let table = self.table(&write.object).await?;
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| ConnectorError::transient("connection", "the connection was lost before reading the row"))?;
        let keys = client
            .query(UNIQUE_KEYS_SQL, &[&table.quoted])
            .await
            .map_err(|e| classify(&format!("read the unique keys of {}", table.label), &e))?;
        let names: Vec<&String> = table.columns.keys().collect();
        let select: Vec<String> = names.iter().map(|n| format!("{}::text", quote_ident(n))).collect();
        for key in keys {
            let columns: Vec<String> = key.get(0);
            let Some(values) = columns
                .iter()
                .map(|c| Some((c, table.columns.get(c)?, write.fields.get(c).filter(|v| !v.is_null())?)))
                .collect::<Option<Vec<_>>>()
            else {
                continue;
            };
            let mut params: Vec<Option<String>> = Vec::new();
            let mut conditions = Vec::new();
            for (name, column, value) in values {
                params.push(values::to_pg_text(&column.kind, value));
                conditions.push(format!(
                    "t.{} = ${}::text::{}",
                    quote_ident(name),
                    params.len(),
                    column.cast
                ));
            }
            let sql = format!(
                "SELECT {} FROM {} AS t WHERE {} LIMIT 1",
                select.join(", "),
                table.quoted,
                conditions.join(" AND ")
            );
            let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
            let row = client
                .query_opt(&sql, &refs)
                .await
                .map_err(|e| classify(&format!("read a row of {}", table.label), &e))?;
            let Some(row) = row else { continue };
            let mut fields = serde_json::Map::new();
            for (i, name) in names.iter().enumerate() {
                let text: Option<&str> = row.get(i);
                let value = text.map_or(Value::Null, |t| values::to_json(&table.columns[*name].kind, t));
                fields.insert((*name).clone(), value);
            }
            let as_id = |value: &Value| match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let Some(local_id) = fields.get(&table.id).filter(|v| !v.is_null()).map(as_id) else {
                continue;
            };
            let version = table
                .version
                .as_ref()
                .and_then(|v| fields.get(v))
                .filter(|v| !v.is_null())
                .map(as_id);
            return Ok(Some(SourceRecord {
                local_id,
                kind: ChangeKind::Upsert,
                fields,
                version,
                source_time_ms: None,
            }));
        }
        Ok(None)
    }

    async fn ensure_connected(&mut self) -> Result<(), ConnectorError> {
        if self.client.as_ref().is_some_and(|c| !c.is_closed()) {
            return Ok(());
        }
        self.client = None;
        self.statements.clear();
        let client = connect(&self.config, &self.base_dir).await.map_err(|e| match e {
            ConnectError::Secret(_) => ConnectorError::fatal("secret", "cannot read the database password"),
            ConnectError::Tls(reason) => ConnectorError::fatal("tls", format!("tls setup: {reason}")),
            ConnectError::Postgres(e) => classify("connect", &e),
        })?;
        self.client = Some(client);
        Ok(())
    }

    /// Drops what an error makes doubtful: the connection after a connection error, the
    /// catalog and statements after an error a schema change explains.
    fn forget_after(&mut self, error: &ConnectorError) {
        match error.kind {
            // After 57P01 the server closes the session; the client may not have seen
            // the close yet.
            "connection" | "shutdown" => {
                self.client = None;
                self.statements.clear();
            }
            "schema" | "undefined_object" | "postgres" => {
                self.tables.clear();
                self.shapes.clear();
                self.statements.clear();
            }
            _ => {}
        }
    }

    /// The catalog description of a link's table, read once.
    async fn table(&mut self, object: &str) -> Result<Arc<Table>, ConnectorError> {
        if let Some(table) = self.tables.get(object) {
            return Ok(table.clone());
        }
        let link = self
            .links
            .get(object)
            .ok_or_else(|| ConnectorError::fatal("config", format!("no link of this system writes {object:?}")))?;
        let name = TableName::parse(object)
            .ok_or_else(|| ConnectorError::fatal("config", format!("object {object:?} is not a table name")))?;
        let client = self.client.as_ref().expect("connected before planning");
        let rows = client
            .query(COLUMNS_SQL, &[&name.schema, &name.table])
            .await
            .map_err(|e| classify(&format!("read the columns of {name}"), &e))?;
        if rows.is_empty() {
            return Err(ConnectorError::fatal(
                "undefined_object",
                format!("table {name} does not exist or the role cannot see it"),
            ));
        }
        let mut columns = HashMap::new();
        for row in rows {
            let column: String = row.get(0);
            let cast: String = row.get(1);
            let base_oid: u32 = row.get(2);
            let category: i8 = row.get(3);
            let element_oid: u32 = row.get(4);
            let mut kind = values::kind_of(base_oid);
            if kind == Kind::Text && category == b'A' as i8 {
                kind = Kind::Array(Box::new(values::kind_of(element_oid)));
            }
            columns.insert(column, Column { cast, kind });
        }
        for (what, column) in [
            ("id_field", Some(&link.id_field)),
            ("version_field", link.version_field.as_ref()),
        ] {
            if let Some(column) = column
                && !columns.contains_key(column)
            {
                return Err(ConnectorError::fatal(
                    "undefined_object",
                    format!("{what} {column:?} is not a column of {name}"),
                ));
            }
        }
        let table = Arc::new(Table {
            label: name.to_string(),
            quoted: name.quoted(),
            id: link.id_field.clone(),
            version: link.version_field.clone(),
            columns,
        });
        self.tables.insert(object.to_string(), table.clone());
        Ok(table)
    }

    /// Turns a write into its statement; errors here concern this write alone.
    async fn plan(&mut self, write: &Write) -> Result<Planned, ConnectorError> {
        let table = self.table(&write.object).await?;
        let guard = match (&table.version, &write.expected_version) {
            (Some(column), Some(expected)) => Some((column, expected)),
            _ => None,
        };
        // The key is always the first parameter of an update or delete, so the
        // existence check of a guarded one can reuse it.
        let exists_sql = guard.map(|_| {
            format!(
                "SELECT 1 FROM {} WHERE {} = $1::text::{}",
                table.quoted,
                quote_ident(&table.id),
                table.columns[&table.id].cast
            )
        });
        let fields: Vec<(&String, &Value, &Column)> = write
            .fields
            .iter()
            .filter(|(name, _)| write.op != WriteOp::Update || **name != table.id)
            .map(|(name, value)| match table.columns.get(name) {
                Some(column) => Ok((name, value, column)),
                None => Err(ConnectorError::permanent(
                    "schema",
                    format!(
                        "field {name:?} is not a column of {}: fix the link's field names or add the column",
                        table.label
                    ),
                )),
            })
            .collect::<Result<_, _>>()?;
        let local_id = match write.op {
            WriteOp::Create => None,
            WriteOp::Update | WriteOp::Delete => Some(write.local_id.clone().ok_or_else(|| {
                ConnectorError::permanent("missing_id", format!("{} without a local id", write.op.as_str()))
            })?),
        };
        let shape = Shape {
            table: &table,
            op: write.op,
            fields: &fields,
            local_id: local_id.as_deref(),
            guard,
            // An integer version column the write does not set counts concord's updates.
            bump: table.version.as_ref().filter(|column| {
                table.columns[*column].kind == Kind::Int && !write.fields.contains_key(column.as_str())
            }),
        };
        let key = shape.key();
        let (sql, group_sql) = match self.shapes.get(&key) {
            Some((sql, group)) => (sql.clone(), group.clone()),
            None => {
                let sql = shape.statement(Form::Row);
                // One statement over arrays can write a run of rows of this shape; a
                // guarded write needs its own existence check, and a create of defaults
                // has no arrays.
                let groupable = guard.is_none() && !(write.op == WriteOp::Create && fields.is_empty());
                let group = groupable.then(|| shape.statement(Form::Arrays));
                if self.shapes.len() > MAX_STATEMENTS {
                    self.shapes.clear();
                }
                self.shapes.insert(key, (sql.clone(), group.clone()));
                (sql, group)
            }
        };
        let params = shape.params();
        // Two rows with the same key in one statement would touch one row twice.
        let key_param = match write.op {
            WriteOp::Update | WriteOp::Delete => Some(0),
            WriteOp::Create => fields.iter().position(|(name, _, _)| **name == table.id),
        };
        let doing = match write.op {
            WriteOp::Create => format!("upsert into {}", table.label),
            WriteOp::Update => format!("update of {}", table.label),
            WriteOp::Delete => format!("delete from {}", table.label),
        };
        Ok(Planned {
            sql,
            group_sql,
            key_param,
            params,
            doing,
            op: write.op,
            exists_sql,
            local_id: write.local_id.clone(),
            table,
        })
    }

    /// Runs the planned statements in one transaction (more when a row fails); `Err`
    /// fails every row.
    async fn run(&mut self, planned: &[Planned]) -> Result<Vec<Result<WriteAck, ConnectorError>>, ConnectorError> {
        if self.statements.len() > MAX_STATEMENTS {
            self.statements.clear();
        }
        let grouped = runs(planned);
        let mut mode = if grouped.iter().any(|r| r.len() > 1) {
            Mode::Grouped
        } else {
            Mode::Plain
        };
        let client = self.client.as_mut().expect("connected before running");
        // New statements are prepared together, pipelined like the rows.
        let mut missing: Vec<(&str, &str)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for p in planned {
            for sql in std::iter::once(&p.sql).chain(&p.exists_sql) {
                if !self.statements.contains_key(sql) && seen.insert(sql.as_str()) {
                    missing.push((sql, &p.doing));
                }
            }
        }
        if mode == Mode::Grouped {
            for run in grouped.iter().filter(|r| r.len() > 1) {
                let p = &planned[run.start];
                let sql = p
                    .group_sql
                    .as_ref()
                    .expect("a run of several rows has a group statement");
                if !self.statements.contains_key(sql) && seen.insert(sql.as_str()) {
                    missing.push((sql, &p.doing));
                }
            }
        }
        let client_ref = &*client;
        let prepared = futures_util::future::join_all(missing.iter().map(|(sql, _)| client_ref.prepare(sql))).await;
        for ((sql, doing), statement) in missing.into_iter().zip(prepared) {
            let statement = statement.map_err(|e| classify(doing, &e))?;
            self.statements.insert(sql.to_string(), statement);
        }
        let statements = &self.statements;
        let mut failed: Vec<Option<ConnectorError>> = planned.iter().map(|_| None).collect();
        let written = loop {
            let pending: Vec<usize> = (0..planned.len()).filter(|i| failed[*i].is_none()).collect();
            let txn = client
                .transaction()
                .await
                .map_err(|e| classify("begin a transaction", &e))?;
            let done = match mode {
                Mode::Grouped => match run_grouped(&txn, statements, planned, &grouped).await? {
                    Some(done) => done,
                    None => {
                        // A row failed inside a statement of several: find it row by row.
                        let _ = txn.rollback().await;
                        mode = Mode::Plain;
                        continue;
                    }
                },
                Mode::Plain => run_plain(&txn, statements, planned, &pending).await?,
                Mode::Savepoints => run_with_savepoints(&txn, statements, planned, &pending).await?,
            };
            if let Some((index, error)) = done.iter().zip(&pending).find_map(|(d, i)| match d {
                RowDone::Failed(error) if mode == Mode::Plain => Some((*i, error.clone())),
                _ => None,
            }) {
                let _ = txn.rollback().await;
                failed[index] = Some(error);
                mode = Mode::Savepoints;
                continue;
            }
            let mut outcome: Vec<(usize, Result<WriteAck, ConnectorError>)> = Vec::with_capacity(pending.len());
            for (done, index) in done.into_iter().zip(pending) {
                let p = &planned[index];
                let result = match done {
                    RowDone::Failed(error) => Err(error),
                    RowDone::Written(row) => settle(&txn, statements, p, row).await?,
                };
                outcome.push((index, result));
            }
            txn.commit().await.map_err(|e| classify("commit", &e))?;
            break outcome;
        };
        let mut results: Vec<Option<Result<WriteAck, ConnectorError>>> =
            failed.into_iter().map(|f| f.map(Err)).collect();
        for (index, result) in written {
            results[index] = Some(result);
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every row either failed alone or ran in the committed transaction"))
            .collect())
    }
}

impl crate::connector::Sink for PostgresSink {
    fn apply(&mut self, writes: Vec<Write>) -> impl Future<Output = Vec<Result<WriteAck, ConnectorError>>> + Send {
        PostgresSink::apply(self, writes)
    }
}

/// The column lists of a table's unique indexes that hold plain columns and no
/// predicate, primary key first.
const UNIQUE_KEYS_SQL: &str = "SELECT array_agg(a.attname::text ORDER BY k.ord) \
     FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
     WHERE i.indrelid = $1::text::regclass AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL \
     GROUP BY i.indexrelid, i.indisprimary ORDER BY i.indisprimary DESC, i.indexrelid";

/// Columns of a table with the cast type, the base type (through domains), its
/// category and its element type (for arrays).
const COLUMNS_SQL: &str = "
SELECT a.attname::text,
       format_type(a.atttypid, -1),
       b.oid,
       b.typcategory,
       b.typelem
FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
JOIN pg_catalog.pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum";

type RowFuture<'a> = Pin<Box<dyn Future<Output = Result<Option<Row>, tokio_postgres::Error>> + Send + 'a>>;

fn params_of(p: &Planned) -> Vec<&(dyn ToSql + Sync)> {
    p.params.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

/// Whether an error concerns the row alone (the rest of the batch can still commit).
fn row_error(error: &ConnectorError) -> bool {
    error.class == ErrorClass::Permanent
}

/// How [`PostgresSink::run`] sends a batch's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Runs of consecutive rows of one shape as one statement each.
    Grouped,
    /// One statement per row.
    Plain,
    /// One statement per row, each under a savepoint.
    Savepoints,
}

/// What a written row's `RETURNING` gave: its key and version as text.
struct Returned {
    id: Option<String>,
    version: Option<String>,
}

impl Returned {
    /// The key at column `at` and the version after it, when the statement returns one.
    fn of(row: &Row, at: usize) -> Returned {
        Returned {
            id: row.try_get(at).ok().flatten(),
            version: row.try_get(at + 1).ok().flatten(),
        }
    }
}

/// Splits the batch into runs of consecutive rows that one statement can write: the
/// same group statement and no key twice. Rows without a group statement run alone.
/// Keeping the batch's order keeps the order of unique-key changes between records.
fn runs(planned: &[Planned]) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let mut start = 0;
    let mut keys = std::collections::HashSet::new();
    for (at, p) in planned.iter().enumerate() {
        let key = p.key_param.and_then(|k| p.params[k].as_deref());
        let joins = at > start
            && p.group_sql.is_some()
            && p.group_sql == planned[start].group_sql
            && key.is_none_or(|k| !keys.contains(k));
        if !joins {
            if at > start {
                runs.push(start..at);
            }
            start = at;
            keys.clear();
        }
        if let Some(key) = key {
            keys.insert(key);
        }
    }
    if start < planned.len() {
        runs.push(start..planned.len());
    }
    runs
}

/// Every run pipelined as one statement (rows alone as their own statement); `None`
/// when a row failed, which the caller then finds row by row.
async fn run_grouped(
    txn: &Transaction<'_>,
    statements: &HashMap<String, Statement>,
    planned: &[Planned],
    runs: &[std::ops::Range<usize>],
) -> Result<Option<Vec<RowDone>>, ConnectorError> {
    // The n-th array of a run holds the n-th parameter of each of its rows, borrowed.
    let arrays: Vec<Vec<Vec<Option<&str>>>> = runs
        .iter()
        .map(|run| {
            if run.len() == 1 {
                return Vec::new();
            }
            let width = planned[run.start].params.len();
            (0..width)
                .map(|n| planned[run.clone()].iter().map(|p| p.params[n].as_deref()).collect())
                .collect()
        })
        .collect();
    let params: Vec<Vec<&(dyn ToSql + Sync)>> = runs
        .iter()
        .zip(&arrays)
        .map(|(run, arrays)| match run.len() {
            1 => params_of(&planned[run.start]),
            _ => arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect(),
        })
        .collect();
    type RunFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<Row>, tokio_postgres::Error>> + Send + 'a>>;
    let futures: Vec<RunFuture<'_>> = runs
        .iter()
        .zip(&params)
        .map(|(run, params)| {
            let p = &planned[run.start];
            let sql = match run.len() {
                1 => &p.sql,
                _ => p
                    .group_sql
                    .as_ref()
                    .expect("a run of several rows has a group statement"),
            };
            Box::pin(txn.query(&statements[sql], params)) as RunFuture<'_>
        })
        .collect();
    let mut done = Vec::with_capacity(planned.len());
    for (result, run) in futures_util::future::join_all(futures).await.into_iter().zip(runs) {
        let p = &planned[run.start];
        let rows = match result {
            Ok(rows) => rows,
            Err(e) => {
                // Two rows of one key that the text of their keys did not tell apart
                // (`1` and `01`) make an upsert touch a row twice (21000).
                if e.code() == Some(&tokio_postgres::error::SqlState::CARDINALITY_VIOLATION) {
                    return Ok(None);
                }
                let error = classify(&p.doing, &e);
                if row_error(&error) {
                    return Ok(None);
                }
                return Err(error);
            }
        };
        let mut returned: Vec<Option<Returned>> = run.clone().map(|_| None).collect();
        match (run.len(), p.op) {
            (1, _) => returned[0] = rows.first().map(|row| Returned::of(row, 0)),
            (_, WriteOp::Create) => {
                // Every row is inserted, in the order of the arrays.
                if rows.len() != run.len() {
                    return Ok(None);
                }
                for (slot, row) in returned.iter_mut().zip(&rows) {
                    *slot = Some(Returned::of(row, 0));
                }
            }
            (_, WriteOp::Update | WriteOp::Delete) => {
                for row in &rows {
                    let n: i64 = row.try_get(0).map_err(|e| classify(&p.doing, &e))?;
                    let Some(slot) = usize::try_from(n - 1).ok().and_then(|i| returned.get_mut(i)) else {
                        return Err(ConnectorError::transient(
                            "postgres",
                            format!("{}: the statement returned row {n} of {}", p.doing, run.len()),
                        ));
                    };
                    *slot = Some(Returned::of(row, 1));
                }
                // An update that found no row fails permanently; row by row tells a
                // missing row from one matched by two keys of the run (`1` and `01`).
                if p.op == WriteOp::Update && returned.iter().any(Option::is_none) {
                    return Ok(None);
                }
            }
        }
        done.extend(returned.into_iter().map(RowDone::Written));
    }
    Ok(Some(done))
}

/// All rows pipelined, no savepoints; stops at the first failure (every later
/// statement then fails as part of an aborted transaction).
async fn run_plain(
    txn: &Transaction<'_>,
    statements: &HashMap<String, Statement>,
    planned: &[Planned],
    pending: &[usize],
) -> Result<Vec<RowDone>, ConnectorError> {
    let params: Vec<Vec<&(dyn ToSql + Sync)>> = pending.iter().map(|i| params_of(&planned[*i])).collect();
    // Each future sends its request when first polled, and join_all polls them in
    // order: the statements reach the server in batch order, one round trip in all.
    let futures: Vec<RowFuture<'_>> = pending
        .iter()
        .zip(&params)
        .map(|(i, params)| {
            let statement = &statements[&planned[*i].sql];
            Box::pin(txn.query_opt(statement, params)) as RowFuture<'_>
        })
        .collect();
    let mut done = Vec::with_capacity(pending.len());
    for (result, index) in futures_util::future::join_all(futures).await.into_iter().zip(pending) {
        match result {
            Ok(row) => done.push(RowDone::Written(row.map(|row| Returned::of(&row, 0)))),
            Err(e) => {
                let error = classify(&planned[*index].doing, &e);
                if !row_error(&error) {
                    return Err(error);
                }
                done.push(RowDone::Failed(error));
                break;
            }
        }
    }
    Ok(done)
}

/// Rows pipelined with a savepoint around each; a failing row is rolled back to its
/// savepoint and the rows after it are sent again.
async fn run_with_savepoints(
    txn: &Transaction<'_>,
    statements: &HashMap<String, Statement>,
    planned: &[Planned],
    pending: &[usize],
) -> Result<Vec<RowDone>, ConnectorError> {
    let mut done: Vec<RowDone> = Vec::with_capacity(pending.len());
    while done.len() < pending.len() {
        let rest = &pending[done.len()..];
        let params: Vec<Vec<&(dyn ToSql + Sync)>> = rest.iter().map(|i| params_of(&planned[*i])).collect();
        let mut futures: Vec<RowFuture<'_>> = Vec::with_capacity(rest.len() * 3);
        for (i, params) in rest.iter().zip(&params) {
            let statement = &statements[&planned[*i].sql];
            futures.push(Box::pin(async move {
                txn.batch_execute(&format!("SAVEPOINT {SAVEPOINT}")).await.map(|_| None)
            }));
            futures.push(Box::pin(txn.query_opt(statement, params)));
            futures.push(Box::pin(async move {
                txn.batch_execute(&format!("RELEASE SAVEPOINT {SAVEPOINT}"))
                    .await
                    .map(|_| None)
            }));
        }
        let mut results = futures_util::future::join_all(futures).await.into_iter();
        for index in rest {
            let doing = &planned[*index].doing;
            let (Some(savepoint), Some(statement), Some(release)) = (results.next(), results.next(), results.next())
            else {
                return Err(ConnectorError::transient(
                    "postgres",
                    format!("{doing}: missing statement result"),
                ));
            };
            if let Err(e) = savepoint {
                return Err(classify(doing, &e));
            }
            match statement {
                Ok(row) => {
                    if let Err(e) = release {
                        return Err(classify(doing, &e));
                    }
                    done.push(RowDone::Written(row.map(|row| Returned::of(&row, 0))));
                }
                Err(e) => {
                    let error = classify(doing, &e);
                    if !row_error(&error) {
                        return Err(error);
                    }
                    txn.batch_execute(&format!(
                        "ROLLBACK TO SAVEPOINT {SAVEPOINT}; RELEASE SAVEPOINT {SAVEPOINT}"
                    ))
                    .await
                    .map_err(|e| classify("roll back to a savepoint", &e))?;
                    done.push(RowDone::Failed(error));
                    // Every later statement of this round failed with the aborted
                    // transaction: send them again.
                    break;
                }
            }
        }
    }
    Ok(done)
}

/// The acknowledgement of a row that ran: its id and new version, or a version conflict.
async fn settle(
    txn: &Transaction<'_>,
    statements: &HashMap<String, Statement>,
    p: &Planned,
    row: Option<Returned>,
) -> Result<Result<WriteAck, ConnectorError>, ConnectorError> {
    let conflict = || {
        ConnectorError::transient(
            "version_conflict",
            format!(
                "{}: the row's version changed since concord last read it; the write waits for that change",
                p.doing
            ),
        )
    };
    let Some(row) = row else {
        let present = match &p.exists_sql {
            Some(exists_sql) => {
                let params: Vec<&(dyn ToSql + Sync)> = vec![&p.params[0]];
                txn.query_opt(&statements[exists_sql], &params)
                    .await
                    .map_err(|e| classify(&p.doing, &e))?
                    .is_some()
            }
            None => false,
        };
        return Ok(match (p.op, present) {
            (_, true) => Err(conflict()),
            (WriteOp::Delete, false) => Ok(WriteAck {
                local_id: p.local_id.clone().expect("a delete has a local id"),
                version: None,
            }),
            (WriteOp::Update, false) => Err(ConnectorError::permanent(
                "not_found",
                format!(
                    "{}: the row is not in the table (deleted outside concord?); an update does not recreate it",
                    p.doing
                ),
            )),
            (WriteOp::Create, false) => Err(ConnectorError::transient(
                "no_row",
                format!("{}: the statement returned no row", p.doing),
            )),
        });
    };
    let text = |text: Option<String>, column: &str| -> Option<String> {
        let kind = &p.table.columns[column].kind;
        text.map(|t| match values::to_json(kind, &t) {
            Value::String(s) => s,
            other => other.to_string(),
        })
    };
    let Some(local_id) = text(row.id, &p.table.id) else {
        return Ok(Err(ConnectorError::permanent(
            "no_id",
            format!("{}: the row's id column is null", p.doing),
        )));
    };
    let version = match (&p.table.version, p.op) {
        (Some(column), WriteOp::Create | WriteOp::Update) => text(row.version, column),
        _ => None,
    };
    Ok(Ok(WriteAck { local_id, version }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        let column = |cast: &str, kind: Kind| Column {
            cast: cast.into(),
            kind,
        };
        Table {
            label: "public.people".into(),
            quoted: "\"public\".\"people\"".into(),
            id: "id".into(),
            version: Some("ver".into()),
            columns: [
                ("id".to_string(), column("bigint", Kind::Int)),
                ("name".to_string(), column("text", Kind::Text)),
                ("ver".to_string(), column("bigint", Kind::Int)),
            ]
            .into(),
        }
    }

    /// Every statement shape takes exactly the parameters `params` gives, in order:
    /// the key first for an update or delete, the expected version last when guarded.
    #[test]
    fn statement_placeholders_match_the_parameters_of_every_shape() {
        let table = table();
        let (id, name, ver) = (String::from("id"), String::from("name"), String::from("ver"));
        let (one, ada, seven) = (Value::from(1), Value::from("Ada"), String::from("7"));
        let all = [(&id, &one, &table.columns["id"]), (&name, &ada, &table.columns["name"])];
        let mut keys = std::collections::HashSet::new();
        for op in [WriteOp::Create, WriteOp::Update, WriteOp::Delete] {
            for fields in [&all[..0], &all[1..], &all[..]] {
                for guard in [None, Some((&ver, &seven))] {
                    for bump in [None, Some(&ver)] {
                        let shape = Shape {
                            table: &table,
                            op,
                            fields,
                            local_id: (op != WriteOp::Create).then_some("42"),
                            guard,
                            bump,
                        };
                        assert!(keys.insert(shape.key()), "two shapes share a key");
                        let params = shape.params();
                        let row = shape.statement(Form::Row);
                        let what = format!(
                            "{op:?} {} fields guard {} bump {}: {row}",
                            fields.len(),
                            guard.is_some(),
                            bump.is_some()
                        );
                        for n in 1..=params.len() {
                            assert_eq!(row.matches(&format!("${n}::text::")).count(), 1, "{what}");
                        }
                        assert!(!row.contains(&format!("${}::", params.len() + 1)), "{what}");
                        if op != WriteOp::Create {
                            assert_eq!(params[0].as_deref(), Some("42"), "{what}");
                            assert!(row.contains("WHERE t.\"id\" = $1::text::bigint"), "{what}");
                        }
                        if op == WriteOp::Create || op == WriteOp::Update {
                            let skip = usize::from(op == WriteOp::Update);
                            let written: Vec<Option<String>> =
                                fields.iter().map(|f| values::to_pg_text(&f.2.kind, f.1)).collect();
                            assert_eq!(params[skip..skip + fields.len()], written[..], "{what}");
                        }
                        if guard.is_some() && op != WriteOp::Create {
                            let n = params.len();
                            assert_eq!(params[n - 1].as_deref(), Some("7"), "{what}");
                            assert!(row.contains(&format!("AND t.\"ver\" = ${n}::text::bigint")), "{what}");
                        }
                        let arrays = shape.statement(Form::Arrays);
                        for n in 1..=params.len() {
                            assert_eq!(arrays.matches(&format!("u.p{n}::")).count(), 1, "{what}: {arrays}");
                        }
                    }
                }
            }
        }
    }

    /// The engine drives sinks from spawned tasks; this fails to compile otherwise.
    #[allow(dead_code)]
    fn apply_is_send(sink: &mut PostgresSink) {
        fn send<T: Send>(_: T) {}
        send(sink.apply(Vec::new()));
    }
}
