//! A simulated CRM with the Salesforce REST API's conventions, for the `Contact` object.
//!
//! Protocol facts it keeps (see the Salesforce REST API developer guide):
//! - Base path `/services/data/v60.0`; `Authorization: Bearer <token>`, else 401
//!   `INVALID_SESSION_ID`. Errors are a JSON array of `{message, errorCode}`.
//! - `LastModifiedDate` has second precision, rendered `2026-11-27T18:09:45.000+0000`;
//!   every update bumps it, even one that changes no value, so many records share one
//!   second and a writer sees its own write come back.
//! - `GET /query?q=<SOQL>` answers pages of at most the batch size
//!   (`Sforce-Query-Options: batchSize=N`, 200 to 2000, default 2000) with a
//!   `nextRecordsUrl` while more remain. The locator is evaluated lazily page by page
//!   (by offset into the current result), so a record modified during a walk moves to
//!   the end and the records behind it shift: a walk can miss one unless the client
//!   polls again from its cursor. `query` leaves deleted records out, `queryAll`
//!   includes them with `IsDeleted: true`.
//! - The SOQL subset: `SELECT <fields> FROM Contact [WHERE LastModifiedDate (>=|>|<|<=|=)
//!   <datetime>] [ORDER BY LastModifiedDate|Id [ASC|DESC][, ...]] [LIMIT n]`, keywords
//!   and field names case-insensitive, datetimes unquoted. Anything else is answered
//!   400 `MALFORMED_QUERY`; an unknown field 400 `INVALID_FIELD`.
//! - `GET /sobjects/Contact/deleted/?start=&end=` lists deletions in the window.
//! - Writes: `POST /sobjects/Contact` (201 `{id, success, errors}`), `PATCH
//!   /sobjects/Contact/{Id}` (204; `If-Match` mismatch 412), upsert `PATCH
//!   /sobjects/Contact/Email/{value}` (201 created / 200 updated, 300 when several
//!   match), `DELETE` (204, then 404 `ENTITY_IS_DELETED`). `LastName` is required on
//!   create; unknown fields are 400 `INVALID_FIELD`, read-only ones 400
//!   `INVALID_FIELD_FOR_INSERT_UPDATE`. Phone is free text, as in Salesforce.
//! - Besides the standard fields, `Certified__c` is a custom checkbox field (custom
//!   fields end in `__c`; a checkbox is never null and defaults to false).
//! - Every response carries `Sforce-Limit-Info: api-usage=<used>/<limit>` and the
//!   `X-RateLimit-*` headers.

// Validation helpers return the refusal as the finished HTTP answer; one per request,
// so its size does not matter.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, SubsecRound, Utc};
use serde_json::{Map, Value, json};

use super::{Common, Dialect, Server, common_handle, json, lock, parse_time};

/// The API version in every path.
pub const API_PATH: &str = "/services/data/v60.0";
/// Page size when the client asks for none; Salesforce's default.
pub const DEFAULT_BATCH: usize = 2000;
/// The smallest batch size Salesforce honours.
pub const MIN_BATCH: usize = 200;
/// Open query locators kept; the oldest is dropped beyond this (Salesforce keeps a
/// bounded number of open cursors per user too).
const MAX_LOCATORS: usize = 1000;

/// How the CRM simulator starts.
#[derive(Debug, Clone)]
pub struct CrmOptions {
    /// 0 for any free port.
    pub port: u16,
    /// The bearer token requests must carry.
    pub token: String,
    /// Requests admitted per second; `None` for unlimited.
    pub rate_limit: Option<u32>,
    /// The daily API allowance shown in `Sforce-Limit-Info`.
    pub daily_limit: u64,
}

impl Default for CrmOptions {
    fn default() -> CrmOptions {
        CrmOptions {
            port: 0,
            token: "00Dsim!demo-session".into(),
            rate_limit: None,
            daily_limit: 100_000,
        }
    }
}

/// One contact as the CRM holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contact {
    pub id: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub title: Option<String>,
    /// The custom checkbox `Certified__c`.
    pub certified: bool,
    /// Second precision.
    pub last_modified: DateTime<Utc>,
    pub is_deleted: bool,
    pub deleted_date: Option<DateTime<Utc>>,
    /// Bumped by every write; the ETag is derived from it.
    pub version: u64,
}

/// Field values for a contact a user creates.
#[derive(Debug, Clone, Default)]
pub struct NewContact {
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub title: Option<String>,
    pub certified: bool,
}

/// The fields of `Contact` in the subset the simulator knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Id,
    FirstName,
    LastName,
    Email,
    Phone,
    Title,
    Certified,
    LastModifiedDate,
    IsDeleted,
}

impl Field {
    const ALL: [Field; 9] = [
        Field::Id,
        Field::FirstName,
        Field::LastName,
        Field::Email,
        Field::Phone,
        Field::Title,
        Field::Certified,
        Field::LastModifiedDate,
        Field::IsDeleted,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Field::Id => "Id",
            Field::FirstName => "FirstName",
            Field::LastName => "LastName",
            Field::Email => "Email",
            Field::Phone => "Phone",
            Field::Title => "Title",
            Field::Certified => "Certified__c",
            Field::LastModifiedDate => "LastModifiedDate",
            Field::IsDeleted => "IsDeleted",
        }
    }

    /// Field names are case-insensitive, in SOQL and in JSON bodies alike.
    pub fn parse(name: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|f| f.name().eq_ignore_ascii_case(name))
    }

    /// Maximum length of a writable text field, as in Salesforce's Contact.
    fn max_len(self) -> Option<usize> {
        match self {
            Field::FirstName => Some(40),
            Field::LastName => Some(80),
            Field::Email => Some(80),
            Field::Phone => Some(40),
            Field::Title => Some(128),
            _ => None,
        }
    }

    fn writable(self) -> bool {
        self.max_len().is_some() || self == Field::Certified
    }
}

impl Contact {
    fn text(&self, field: Field) -> Option<&String> {
        match field {
            Field::FirstName => self.first_name.as_ref(),
            Field::LastName => self.last_name.as_ref(),
            Field::Email => self.email.as_ref(),
            Field::Phone => self.phone.as_ref(),
            Field::Title => self.title.as_ref(),
            _ => None,
        }
    }

    fn set(&mut self, field: Field, value: Option<String>) {
        match field {
            Field::FirstName => self.first_name = value,
            Field::LastName => self.last_name = value,
            Field::Email => self.email = value,
            Field::Phone => self.phone = value,
            Field::Title => self.title = value,
            _ => {}
        }
    }

    fn set_value(&mut self, field: Field, value: FieldValue) {
        match value {
            FieldValue::Text(v) => self.set(field, v),
            FieldValue::Flag(b) => {
                if field == Field::Certified {
                    self.certified = b;
                }
            }
        }
    }

    fn value(&self, field: Field) -> Value {
        match field {
            Field::Id => Value::String(self.id.clone()),
            Field::LastModifiedDate => Value::String(render_time(self.last_modified)),
            Field::IsDeleted => Value::Bool(self.is_deleted),
            Field::Certified => Value::Bool(self.certified),
            other => self.text(other).map_or(Value::Null, |v| Value::String(v.clone())),
        }
    }

    /// The ETag of the current version.
    pub fn etag(&self) -> String {
        format!("\"{}-{}\"", &self.id[self.id.len().saturating_sub(6)..], self.version)
    }

    fn json(&self, fields: &[Field]) -> Value {
        let mut object = Map::new();
        object.insert(
            "attributes".into(),
            json!({"type": "Contact", "url": format!("{API_PATH}/sobjects/Contact/{}", self.id)}),
        );
        for field in fields {
            object.insert(field.name().into(), self.value(*field));
        }
        Value::Object(object)
    }
}

/// `2026-11-27T18:09:45.000+0000`.
pub fn render_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3f+0000").to_string()
}

// ---------------------------------------------------------------------------------
// SOQL subset

/// A parsed query of the supported subset.
#[derive(Debug, Clone, PartialEq)]
pub struct Soql {
    pub fields: Vec<Field>,
    pub filter: Option<(Comparison, DateTime<Utc>)>,
    /// (field, descending); `Id` ascending when empty.
    pub order: Vec<(Field, bool)>,
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Ge,
    Gt,
    Le,
    Lt,
    Eq,
}

impl Comparison {
    fn holds(self, left: DateTime<Utc>, right: DateTime<Utc>) -> bool {
        match self {
            Comparison::Ge => left >= right,
            Comparison::Gt => left > right,
            Comparison::Le => left <= right,
            Comparison::Lt => left < right,
            Comparison::Eq => left == right,
        }
    }
}

/// Why a query is refused: the `errorCode` and message Salesforce answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SoqlError {
    pub code: &'static str,
    pub message: String,
}

fn malformed(message: impl Into<String>) -> SoqlError {
    SoqlError {
        code: "MALFORMED_QUERY",
        message: message.into(),
    }
}

/// Splits a query into words (names, numbers, datetimes), commas and operators.
fn tokenize(q: &str) -> Result<Vec<String>, SoqlError> {
    let mut tokens = Vec::new();
    let mut chars = q.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == ',' {
            chars.next();
            tokens.push(",".into());
        } else if matches!(c, '<' | '>' | '=' | '!') {
            let mut op = String::new();
            while let Some(&c) = chars.peek() {
                if !matches!(c, '<' | '>' | '=' | '!') {
                    break;
                }
                op.push(c);
                chars.next();
            }
            tokens.push(op);
        } else if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '+' | '-') {
            let mut word = String::new();
            while let Some(&c) = chars.peek() {
                if !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '+' | '-')) {
                    break;
                }
                word.push(c);
                chars.next();
            }
            tokens.push(word);
        } else {
            return Err(malformed(format!("unexpected character '{c}'")));
        }
    }
    Ok(tokens)
}

/// Parses the supported SOQL subset. Never panics, whatever the input.
pub fn parse_soql(q: &str) -> Result<Soql, SoqlError> {
    let tokens = tokenize(q)?;
    let mut at = 0;
    let next = |at: &mut usize| -> Option<&str> {
        let t = tokens.get(*at).map(String::as_str);
        if t.is_some() {
            *at += 1;
        }
        t
    };
    let keyword = |t: Option<&str>, k: &str| t.is_some_and(|t| t.eq_ignore_ascii_case(k));

    if !keyword(next(&mut at), "SELECT") {
        return Err(malformed("expecting SELECT"));
    }
    let mut fields = Vec::new();
    loop {
        let Some(name) = next(&mut at) else {
            return Err(malformed("unexpected end of query: expecting a field"));
        };
        if name == "," || (name.eq_ignore_ascii_case("FROM") && fields.is_empty()) {
            return Err(malformed(format!("unexpected token: '{name}'")));
        }
        fields.push(field(name)?);
        match next(&mut at) {
            Some(",") => continue,
            Some(t) if t.eq_ignore_ascii_case("FROM") => break,
            Some(t) => return Err(malformed(format!("unexpected token: '{t}'"))),
            None => return Err(malformed("unexpected end of query: expecting FROM")),
        }
    }
    match next(&mut at) {
        Some(object) if object.eq_ignore_ascii_case("Contact") => {}
        Some(object) => {
            return Err(SoqlError {
                code: "INVALID_TYPE",
                message: format!("sObject type '{object}' is not supported"),
            });
        }
        None => return Err(malformed("unexpected end of query: expecting an object")),
    }
    let mut soql = Soql {
        fields,
        filter: None,
        order: Vec::new(),
        limit: None,
    };
    let mut token = next(&mut at);
    if keyword(token, "WHERE") {
        let name = next(&mut at).ok_or_else(|| malformed("unexpected end of query: expecting a condition"))?;
        if field(name)? != Field::LastModifiedDate {
            return Err(malformed(format!("unsupported condition on '{name}'")));
        }
        let comparison = match next(&mut at) {
            Some(">=") => Comparison::Ge,
            Some(">") => Comparison::Gt,
            Some("<=") => Comparison::Le,
            Some("<") => Comparison::Lt,
            Some("=") => Comparison::Eq,
            Some(t) => return Err(malformed(format!("unexpected token: '{t}'"))),
            None => return Err(malformed("unexpected end of query: expecting an operator")),
        };
        let literal = next(&mut at).ok_or_else(|| malformed("unexpected end of query: expecting a datetime"))?;
        let Some(t) = parse_time(literal) else {
            return Err(SoqlError {
                code: "INVALID_QUERY_FILTER_OPERATOR",
                message: format!(
                    "value of filter criterion for field 'LastModifiedDate' must be of type dateTime: '{literal}'"
                ),
            });
        };
        soql.filter = Some((comparison, t));
        token = next(&mut at);
    }
    if keyword(token, "ORDER") {
        if !keyword(next(&mut at), "BY") {
            return Err(malformed("expecting BY after ORDER"));
        }
        loop {
            let name = next(&mut at).ok_or_else(|| malformed("unexpected end of query: expecting a field"))?;
            let f = field(name)?;
            if !matches!(f, Field::LastModifiedDate | Field::Id) {
                return Err(malformed(format!("unsupported ORDER BY field '{name}'")));
            }
            let mut descending = false;
            token = next(&mut at);
            if keyword(token, "ASC") || keyword(token, "DESC") {
                descending = keyword(token, "DESC");
                token = next(&mut at);
            }
            soql.order.push((f, descending));
            if token == Some(",") {
                continue;
            }
            break;
        }
    }
    if keyword(token, "LIMIT") {
        let n = next(&mut at).ok_or_else(|| malformed("unexpected end of query: expecting a number"))?;
        let n: usize = n.parse().map_err(|_| malformed(format!("invalid LIMIT '{n}'")))?;
        soql.limit = Some(n);
        token = next(&mut at);
    }
    if let Some(t) = token {
        return Err(malformed(format!("unexpected token: '{t}'")));
    }
    Ok(soql)
}

fn field(name: &str) -> Result<Field, SoqlError> {
    Field::parse(name).ok_or_else(|| SoqlError {
        code: "INVALID_FIELD",
        message: format!("No such column '{name}' on entity 'Contact'"),
    })
}

// ---------------------------------------------------------------------------------
// Store and server

/// A query walk in progress.
#[derive(Debug, Clone)]
struct Locator {
    soql: Soql,
    include_deleted: bool,
    batch: usize,
}

#[derive(Debug, Default)]
struct Store {
    contacts: BTreeMap<String, Contact>,
    next_id: u64,
    locators: HashMap<u64, Locator>,
    locator_order: VecDeque<u64>,
    next_locator: u64,
    /// Edits a user makes just before the next write to that record is served.
    interference: Vec<(String, Field, Option<String>)>,
    /// Edits a user makes right after the next page that has a successor is served,
    /// while the client is between two pages of a walk.
    between_pages: Vec<(String, Field, Option<String>)>,
}

impl Store {
    fn new_id(&mut self) -> String {
        self.next_id += 1;
        format!("003SM{:013}", self.next_id)
    }

    /// The matching records in query order, evaluated now.
    fn evaluate(&self, soql: &Soql, include_deleted: bool) -> Vec<&Contact> {
        let mut rows: Vec<&Contact> = self
            .contacts
            .values()
            .filter(|c| include_deleted || !c.is_deleted)
            .filter(|c| soql.filter.is_none_or(|(cmp, t)| cmp.holds(c.last_modified, t)))
            .collect();
        rows.sort_by(|a, b| {
            for (field, descending) in &soql.order {
                let ordering = match field {
                    Field::LastModifiedDate => a.last_modified.cmp(&b.last_modified),
                    _ => a.id.cmp(&b.id),
                };
                let ordering = if *descending { ordering.reverse() } else { ordering };
                if ordering.is_ne() {
                    return ordering;
                }
            }
            a.id.cmp(&b.id)
        });
        if let Some(limit) = soql.limit {
            rows.truncate(limit);
        }
        rows
    }

    fn live_by_email(&self, email: &str) -> Vec<String> {
        self.contacts
            .values()
            .filter(|c| !c.is_deleted && c.email.as_deref().is_some_and(|e| e.eq_ignore_ascii_case(email)))
            .map(|c| c.id.clone())
            .collect()
    }
}

pub(crate) struct CrmState {
    pub(crate) common: Common,
    token: String,
    daily_limit: u64,
    store: Mutex<Store>,
}

impl CrmState {
    /// Seconds-precision now.
    fn now(&self) -> DateTime<Utc> {
        self.common.now().trunc_subsecs(0)
    }

    /// Applies the user edits queued for this record, as if made just before a write.
    fn interfere(&self, store: &mut Store, id: &str) {
        let now = self.now();
        let edits: Vec<_> = {
            let (mine, rest): (Vec<_>, Vec<_>) = store.interference.drain(..).partition(|(i, _, _)| i == id);
            store.interference = rest;
            mine
        };
        for (_, field, value) in edits {
            if let Some(c) = store.contacts.get_mut(id) {
                c.set(field, value);
                c.last_modified = now;
                c.version += 1;
            }
        }
    }
}

impl Dialect for CrmState {
    fn common(&self) -> &Common {
        &self.common
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| t == self.token)
    }

    fn unauthorized(&self) -> Response {
        errors(
            StatusCode::UNAUTHORIZED,
            "INVALID_SESSION_ID",
            "Session expired or invalid",
        )
    }

    fn error_body(&self, status: StatusCode) -> Response {
        match status {
            StatusCode::TOO_MANY_REQUESTS => errors(status, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded."),
            StatusCode::SERVICE_UNAVAILABLE => errors(status, "SERVER_UNAVAILABLE", "Server unavailable"),
            _ => errors(
                status,
                "UNKNOWN_EXCEPTION",
                "An unexpected error occurred. Please include this ErrorId if you contact support",
            ),
        }
    }

    fn decorate(&self, headers: &mut HeaderMap) {
        let used = self.common.api_usage.load(Ordering::Relaxed);
        if let Ok(v) = HeaderValue::from_str(&format!("api-usage={used}/{}", self.daily_limit)) {
            headers.insert("sforce-limit-info", v);
        }
    }
}

/// A Salesforce error answer: a JSON array with one error.
fn errors(status: StatusCode, code: &str, message: &str) -> Response {
    json(status, json!([{"message": message, "errorCode": code}]))
}

/// A running simulated CRM. Cloning shares it; the server stops when the last clone is
/// dropped or [`CrmSim::stop`] is called.
#[derive(Clone)]
pub struct CrmSim {
    pub(crate) state: Arc<CrmState>,
    server: Arc<Server>,
}

impl std::fmt::Debug for CrmSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrmSim")
            .field("addr", &self.server.addr)
            .finish_non_exhaustive()
    }
}

impl CrmSim {
    pub async fn start(options: CrmOptions) -> std::io::Result<CrmSim> {
        let state = Arc::new(CrmState {
            common: Common::new(options.rate_limit),
            token: options.token,
            daily_limit: options.daily_limit,
            store: Mutex::default(),
        });
        let pipeline_state = state.clone();
        let api = Router::new()
            .route("/query", get(query))
            .route("/query/", get(query))
            .route("/queryAll", get(query_all))
            .route("/queryAll/", get(query_all))
            .route("/query/{locator}", get(query_more))
            .route("/queryAll/{locator}", get(query_more))
            .route("/sobjects/Contact", axum::routing::post(create))
            .route("/sobjects/Contact/deleted", get(deleted))
            .route("/sobjects/Contact/deleted/", get(deleted))
            .route("/sobjects/Contact/{id}", get(read_one).patch(update).delete(delete))
            .route("/sobjects/Contact/Email/{value}", axum::routing::patch(upsert));
        let router = Router::new()
            .nest(API_PATH, api)
            .fallback(|| async {
                errors(
                    StatusCode::NOT_FOUND,
                    "NOT_FOUND",
                    "The requested resource does not exist",
                )
            })
            .layer(axum::middleware::from_fn(move |request, next| {
                super::pipeline(pipeline_state.clone(), request, next)
            }))
            .with_state(state.clone());
        let server = Server::start(options.port, router, state.common.shutdown.clone()).await?;
        Ok(CrmSim {
            state,
            server: Arc::new(server),
        })
    }

    common_handle!();

    /// The bearer token requests must carry.
    pub fn token(&self) -> &str {
        &self.state.token
    }

    /// Creates a contact as a user would; returns its Id.
    pub fn create(&self, new: NewContact) -> String {
        let now = self.state.now();
        let mut store = lock(&self.state.store);
        let id = store.new_id();
        store.contacts.insert(
            id.clone(),
            Contact {
                id: id.clone(),
                first_name: new.first_name,
                last_name: new.last_name,
                email: new.email,
                phone: new.phone,
                title: new.title,
                certified: new.certified,
                last_modified: now,
                is_deleted: false,
                deleted_date: None,
                version: 1,
            },
        );
        id
    }

    /// Ticks or clears the `Certified__c` checkbox as a user would.
    pub fn set_certified(&self, id: &str, certified: bool) -> bool {
        let now = self.state.now();
        let mut store = lock(&self.state.store);
        match store.contacts.get_mut(id) {
            Some(c) if !c.is_deleted => {
                c.certified = certified;
                c.last_modified = now;
                c.version += 1;
                true
            }
            _ => false,
        }
    }

    /// Sets one writable text field (`"Title"`, `"Phone"`, ...) as a user would; false
    /// when the contact does not exist, is deleted or the field is not a text field.
    pub fn edit(&self, id: &str, field: &str, value: Option<&str>) -> bool {
        let Some(field) = Field::parse(field).filter(|f| f.max_len().is_some()) else {
            return false;
        };
        let now = self.state.now();
        let mut store = lock(&self.state.store);
        match store.contacts.get_mut(id) {
            Some(c) if !c.is_deleted => {
                c.set(field, value.map(str::to_string));
                c.last_modified = now;
                c.version += 1;
                true
            }
            _ => false,
        }
    }

    /// Deletes a contact as a user would (it goes to the recycle bin).
    pub fn delete(&self, id: &str) -> bool {
        let now = self.state.now();
        let mut store = lock(&self.state.store);
        match store.contacts.get_mut(id) {
            Some(c) if !c.is_deleted => {
                c.is_deleted = true;
                c.deleted_date = Some(now);
                c.last_modified = now;
                c.version += 1;
                true
            }
            _ => false,
        }
    }

    /// Every contact, deleted ones included, by Id.
    pub fn contacts(&self) -> Vec<Contact> {
        lock(&self.state.store).contacts.values().cloned().collect()
    }

    /// Contacts not deleted.
    pub fn live(&self) -> Vec<Contact> {
        lock(&self.state.store)
            .contacts
            .values()
            .filter(|c| !c.is_deleted)
            .cloned()
            .collect()
    }

    pub fn contact(&self, id: &str) -> Option<Contact> {
        lock(&self.state.store).contacts.get(id).cloned()
    }

    /// The live contact with this email (case-insensitive), if exactly one.
    pub fn find_by_email(&self, email: &str) -> Option<Contact> {
        let store = lock(&self.state.store);
        match store.live_by_email(email).as_slice() {
            [id] => store.contacts.get(id).cloned(),
            _ => None,
        }
    }

    /// Right after the next query page that has a successor is served, a user sets
    /// `field` to `value` on `id`: the record moves within the result while the client
    /// walks it.
    pub fn edit_between_pages(&self, id: &str, field: &str, value: Option<&str>) -> bool {
        let Some(field) = Field::parse(field).filter(|f| f.max_len().is_some()) else {
            return false;
        };
        lock(&self.state.store)
            .between_pages
            .push((id.to_string(), field, value.map(str::to_string)));
        true
    }

    /// Just before the next write to `id` is served, a user sets `field` to `value`:
    /// a write carrying the ETag it read before then meets a 412.
    pub fn interfere_on_next_write(&self, id: &str, field: &str, value: Option<&str>) -> bool {
        let Some(field) = Field::parse(field).filter(|f| f.max_len().is_some()) else {
            return false;
        };
        lock(&self.state.store)
            .interference
            .push((id.to_string(), field, value.map(str::to_string)));
        true
    }
}

// ---------------------------------------------------------------------------------
// Handlers

#[derive(serde::Deserialize)]
struct QueryParams {
    q: Option<String>,
}

async fn query(State(state): State<Arc<CrmState>>, headers: HeaderMap, Query(p): Query<QueryParams>) -> Response {
    start_query(&state, &headers, p.q, false)
}

async fn query_all(State(state): State<Arc<CrmState>>, headers: HeaderMap, Query(p): Query<QueryParams>) -> Response {
    start_query(&state, &headers, p.q, true)
}

/// The batch size asked for in `Sforce-Query-Options`, clamped as Salesforce does.
fn batch_size(headers: &HeaderMap) -> usize {
    headers
        .get("sforce-query-options")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split(',')
                .filter_map(|part| part.trim().strip_prefix("batchSize="))
                .find_map(|n| n.trim().parse::<usize>().ok())
        })
        .map_or(DEFAULT_BATCH, |n| n.clamp(MIN_BATCH, DEFAULT_BATCH))
}

fn start_query(state: &CrmState, headers: &HeaderMap, q: Option<String>, include_deleted: bool) -> Response {
    state.common.count(|s| s.list_pages += 1);
    let Some(q) = q else {
        return errors(
            StatusCode::BAD_REQUEST,
            "MALFORMED_QUERY",
            "A query string has to be specified",
        );
    };
    let soql = match parse_soql(&q) {
        Ok(soql) => soql,
        Err(e) => return errors(StatusCode::BAD_REQUEST, e.code, &e.message),
    };
    let locator = Locator {
        soql,
        include_deleted,
        batch: batch_size(headers),
    };
    let now = state.now();
    let mut store = lock(&state.store);
    page(&mut store, None, locator, 0, include_deleted, now)
}

async fn query_more(State(state): State<Arc<CrmState>>, Path(locator): Path<String>) -> Response {
    let invalid = || {
        errors(
            StatusCode::BAD_REQUEST,
            "INVALID_QUERY_LOCATOR",
            "invalid query locator",
        )
    };
    let Some((id, offset)) = locator.strip_prefix("01gSIM").and_then(|rest| rest.split_once('-')) else {
        return invalid();
    };
    let (Ok(id), Ok(offset)) = (id.parse::<u64>(), offset.parse::<usize>()) else {
        return invalid();
    };
    state.common.count(|s| s.list_pages += 1);
    let mut store = lock(&state.store);
    let Some(found) = store.locators.get(&id).cloned() else {
        return invalid();
    };
    let include_deleted = found.include_deleted;
    let now = state.now();
    page(&mut store, Some(id), found, offset, include_deleted, now)
}

/// Answers one page of a walk, evaluating the query now (no snapshot), and registers
/// the locator for the next page when more remain.
fn page(
    store: &mut Store,
    id: Option<u64>,
    locator: Locator,
    offset: usize,
    include_deleted: bool,
    now: DateTime<Utc>,
) -> Response {
    let rows = store.evaluate(&locator.soql, include_deleted);
    let total = rows.len();
    let end = offset.saturating_add(locator.batch).min(total);
    let records: Vec<Value> = rows
        .get(offset.min(total)..end)
        .unwrap_or_default()
        .iter()
        .map(|c| c.json(&locator.soql.fields))
        .collect();
    let path = if include_deleted { "queryAll" } else { "query" };
    if end < total && !store.between_pages.is_empty() {
        for (id, field, value) in std::mem::take(&mut store.between_pages) {
            if let Some(c) = store.contacts.get_mut(&id) {
                c.set(field, value);
                c.last_modified = now;
                c.version += 1;
            }
        }
    }
    let mut body = json!({"totalSize": total, "done": end >= total, "records": records});
    if end < total {
        let id = id.unwrap_or_else(|| {
            store.next_locator += 1;
            let id = store.next_locator;
            store.locators.insert(id, locator);
            store.locator_order.push_back(id);
            while store.locator_order.len() > MAX_LOCATORS {
                if let Some(old) = store.locator_order.pop_front() {
                    store.locators.remove(&old);
                }
            }
            id
        });
        body["nextRecordsUrl"] = Value::String(format!("{API_PATH}/{path}/01gSIM{id:012}-{end}"));
    }
    json(StatusCode::OK, body)
}

#[derive(serde::Deserialize)]
struct DeletedParams {
    start: Option<String>,
    end: Option<String>,
}

async fn deleted(State(state): State<Arc<CrmState>>, Query(p): Query<DeletedParams>) -> Response {
    let (Some(start), Some(end)) = (
        p.start.as_deref().and_then(parse_time),
        p.end.as_deref().and_then(parse_time),
    ) else {
        return errors(
            StatusCode::BAD_REQUEST,
            "INVALID_REPLICATION_DATE",
            "start and end must be valid dateTime values",
        );
    };
    if end < start {
        return errors(
            StatusCode::BAD_REQUEST,
            "INVALID_REPLICATION_DATE",
            "end is before start",
        );
    }
    let now = state.now();
    let store = lock(&state.store);
    let mut found: Vec<&Contact> = store
        .contacts
        .values()
        .filter(|c| c.deleted_date.is_some_and(|d| d >= start && d <= end))
        .collect();
    found.sort_by_key(|c| (c.deleted_date, c.id.clone()));
    let earliest = store
        .contacts
        .values()
        .filter_map(|c| c.deleted_date)
        .min()
        .unwrap_or(start);
    let records: Vec<Value> = found
        .iter()
        .map(|c| json!({"id": c.id, "deletedDate": c.deleted_date.map(render_time)}))
        .collect();
    json(
        StatusCode::OK,
        json!({
            "deletedRecords": records,
            "earliestDateAvailable": render_time(earliest),
            "latestDateCovered": render_time(end.min(now)),
        }),
    )
}

async fn read_one(State(state): State<Arc<CrmState>>, Path(id): Path<String>) -> Response {
    let store = lock(&state.store);
    match store.contacts.get(&id) {
        Some(c) if !c.is_deleted => {
            let mut response = json(StatusCode::OK, c.json(&Field::ALL));
            if let Ok(v) = HeaderValue::from_str(&c.etag()) {
                response.headers_mut().insert("etag", v);
            }
            response
        }
        Some(_) => errors(StatusCode::NOT_FOUND, "ENTITY_IS_DELETED", "entity is deleted"),
        None => errors(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The requested resource does not exist",
        ),
    }
}

/// A value in a write body: text (or null) for text fields, a boolean for checkboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FieldValue {
    Text(Option<String>),
    Flag(bool),
}

/// A validated write body: (field, value) pairs.
type Changes = Vec<(Field, FieldValue)>;

/// Parses and validates a JSON body of fields.
fn changes(body: &[u8]) -> Result<Changes, Response> {
    let value: Value = serde_json::from_slice(body).map_err(|_| {
        errors(
            StatusCode::BAD_REQUEST,
            "JSON_PARSER_ERROR",
            "The request body is not valid JSON",
        )
    })?;
    let Value::Object(object) = value else {
        return Err(errors(
            StatusCode::BAD_REQUEST,
            "JSON_PARSER_ERROR",
            "Cannot deserialize the request body: expecting an object",
        ));
    };
    let mut out = Vec::new();
    for (name, value) in object {
        if name == "attributes" {
            continue;
        }
        let Some(field) = Field::parse(&name) else {
            return Err(errors(
                StatusCode::BAD_REQUEST,
                "INVALID_FIELD",
                &format!("No such column '{name}' on sobject of type Contact"),
            ));
        };
        if !field.writable() {
            return Err(errors(
                StatusCode::BAD_REQUEST,
                "INVALID_FIELD_FOR_INSERT_UPDATE",
                &format!(
                    "Unable to create/update fields: {}. Please check the security settings of this field and verify that it is read/write for your profile or permission set.",
                    field.name()
                ),
            ));
        }
        if field == Field::Certified {
            let flag = match value {
                Value::Bool(b) => b,
                Value::Null => false,
                _ => {
                    return Err(errors(
                        StatusCode::BAD_REQUEST,
                        "JSON_PARSER_ERROR",
                        "Cannot deserialize instance of boolean for field Certified__c",
                    ));
                }
            };
            out.push((field, FieldValue::Flag(flag)));
            continue;
        }
        let value = match value {
            Value::Null => None,
            Value::String(s) if s.is_empty() => None,
            Value::String(s) => Some(s),
            _ => {
                return Err(errors(
                    StatusCode::BAD_REQUEST,
                    "JSON_PARSER_ERROR",
                    &format!("Cannot deserialize instance of string for field {}", field.name()),
                ));
            }
        };
        if let (Some(v), Some(max)) = (&value, field.max_len())
            && v.chars().count() > max
        {
            return Err(errors(
                StatusCode::BAD_REQUEST,
                "STRING_TOO_LONG",
                &format!("{}: data value too large (max length={max})", field.name()),
            ));
        }
        if field == Field::Email
            && let Some(v) = &value
            && !plausible_email(v)
        {
            return Err(errors(
                StatusCode::BAD_REQUEST,
                "INVALID_EMAIL_ADDRESS",
                "Email: invalid email address",
            ));
        }
        out.push((field, FieldValue::Text(value)));
    }
    Ok(out)
}

fn plausible_email(v: &str) -> bool {
    v.split_once('@')
        .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.') && !v.contains(char::is_whitespace))
}

fn require_last_name(contact: &Contact) -> Result<(), Response> {
    if contact.last_name.is_none() {
        return Err(json(
            StatusCode::BAD_REQUEST,
            json!([{"message": "Required fields are missing: [LastName]", "errorCode": "REQUIRED_FIELD_MISSING", "fields": ["LastName"]}]),
        ));
    }
    Ok(())
}

fn insert_new(state: &CrmState, store: &mut Store, changes: Changes) -> Result<String, Response> {
    let mut contact = Contact {
        id: String::new(),
        first_name: None,
        last_name: None,
        email: None,
        phone: None,
        title: None,
        certified: false,
        last_modified: state.now(),
        is_deleted: false,
        deleted_date: None,
        version: 1,
    };
    for (field, value) in changes {
        contact.set_value(field, value);
    }
    require_last_name(&contact)?;
    contact.id = store.new_id();
    let id = contact.id.clone();
    store.contacts.insert(id.clone(), contact);
    Ok(id)
}

async fn create(State(state): State<Arc<CrmState>>, body: Bytes) -> Response {
    let changes = match changes(&body) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let mut store = lock(&state.store);
    match insert_new(&state, &mut store, changes) {
        Ok(id) => json(StatusCode::CREATED, json!({"id": id, "success": true, "errors": []})),
        Err(r) => r,
    }
}

/// Whether an `If-Match` header (absent, `*`, or a list of tags) admits `etag`.
fn if_match(headers: &HeaderMap, etag: &str) -> bool {
    let Some(value) = headers.get("if-match").and_then(|v| v.to_str().ok()) else {
        return headers.get("if-match").is_none();
    };
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_string();
    value.trim() == "*" || value.split(',').any(|t| bare(t) == bare(etag))
}

fn precondition_failed() -> Response {
    errors(
        StatusCode::PRECONDITION_FAILED,
        "PRECONDITION_FAILED",
        "The ETag provided does not match the record's current version",
    )
}

/// Applies changes to an existing live contact; bumps the modification time even when
/// nothing changes, as Salesforce does.
fn apply(state: &CrmState, contact: &mut Contact, changes: Changes) -> Result<(), Response> {
    let mut next = contact.clone();
    for (field, value) in changes {
        next.set_value(field, value);
    }
    require_last_name(&next)?;
    next.last_modified = state.now();
    next.version += 1;
    *contact = next;
    Ok(())
}

async fn update(
    State(state): State<Arc<CrmState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let changes = match changes(&body) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let mut store = lock(&state.store);
    state.interfere(&mut store, &id);
    match store.contacts.get_mut(&id) {
        Some(c) if !c.is_deleted => {
            if !if_match(&headers, &c.etag()) {
                return precondition_failed();
            }
            match apply(&state, c, changes) {
                Ok(()) => StatusCode::NO_CONTENT.into_response(),
                Err(r) => r,
            }
        }
        Some(_) => errors(StatusCode::NOT_FOUND, "ENTITY_IS_DELETED", "entity is deleted"),
        None => errors(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The requested resource does not exist",
        ),
    }
}

async fn upsert(
    State(state): State<Arc<CrmState>>,
    Path(email): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut changes = match changes(&body) {
        Ok(c) => c,
        Err(r) => return r,
    };
    if changes
        .iter()
        .any(|(f, v)| *f == Field::Email && !matches!(v, FieldValue::Text(Some(v)) if v.eq_ignore_ascii_case(&email)))
    {
        return errors(
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD",
            "The external id field in the body does not match the one in the URL",
        );
    }
    if !plausible_email(&email) {
        return errors(
            StatusCode::BAD_REQUEST,
            "INVALID_EMAIL_ADDRESS",
            "Email: invalid email address",
        );
    }
    let mut store = lock(&state.store);
    let matches = store.live_by_email(&email);
    match matches.as_slice() {
        [] => {
            changes.retain(|(f, _)| *f != Field::Email);
            changes.push((Field::Email, FieldValue::Text(Some(email))));
            match insert_new(&state, &mut store, changes) {
                Ok(id) => json(
                    StatusCode::CREATED,
                    json!({"id": id, "success": true, "errors": [], "created": true}),
                ),
                Err(r) => r,
            }
        }
        [id] => {
            let id = id.clone();
            state.interfere(&mut store, &id);
            let Some(c) = store.contacts.get_mut(&id) else {
                return errors(
                    StatusCode::NOT_FOUND,
                    "NOT_FOUND",
                    "The requested resource does not exist",
                );
            };
            if !if_match(&headers, &c.etag()) {
                return precondition_failed();
            }
            match apply(&state, c, changes) {
                Ok(()) => json(
                    StatusCode::OK,
                    json!({"id": id, "success": true, "errors": [], "created": false}),
                ),
                Err(r) => r,
            }
        }
        many => {
            let urls: Vec<String> = many
                .iter()
                .map(|id| format!("{API_PATH}/sobjects/Contact/{id}"))
                .collect();
            json(StatusCode::MULTIPLE_CHOICES, json!(urls))
        }
    }
}

async fn delete(State(state): State<Arc<CrmState>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let now = state.now();
    let mut store = lock(&state.store);
    state.interfere(&mut store, &id);
    match store.contacts.get_mut(&id) {
        Some(c) if !c.is_deleted => {
            if !if_match(&headers, &c.etag()) {
                return precondition_failed();
            }
            c.is_deleted = true;
            c.deleted_date = Some(now);
            c.last_modified = now;
            c.version += 1;
            StatusCode::NO_CONTENT.into_response()
        }
        Some(_) => errors(StatusCode::NOT_FOUND, "ENTITY_IS_DELETED", "entity is deleted"),
        None => errors(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The requested resource does not exist",
        ),
    }
}
