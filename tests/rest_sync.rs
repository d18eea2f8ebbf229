//! The REST connector against the simulated CRM and LMS over real HTTP on loopback,
//! with the engine running in-process on a real redb state file: initial sync, steady
//! changes both ways, many records in one cursor second, a page boundary that moves
//! during a walk, 429 storms, 500s and timeouts, a 412 on a concurrent edit, deletes per
//! delete policy, and an echo of our own write that causes no further write.
//!
//! Authority in these tests: the CRM owns `title` and `phone`, the LMS owns
//! `certified`, names follow the last writer; only the CRM's deletes end a record.
//! Every test waits on a condition with a deadline, never on a fixed sleep.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use concord::engine::runtime::Runtime;
use concord::engine::status::Status;
use concord::engine::{Engine, RunMode};
use concord::sim::crm::{Contact, CrmOptions, CrmSim, NewContact};
use concord::sim::lms::{Learner, LmsOptions, LmsSim, NewLearner};
use concord::sim::{Fault, FaultScope};
use concord::state::StateStore;

/// Far longer than any convergence takes; a hang fails the test instead of the suite.
const DEADLINE: Duration = Duration::from_secs(90);

/// What a test varies in the configuration.
struct Setup {
    /// `on_delete` of the LMS link.
    lms_on_delete: &'static str,
    /// Request timeout toward both systems.
    timeout_ms: u64,
    /// The CRM's page size (`Sforce-Query-Options: batchSize=N`).
    crm_batch: usize,
    /// The CRM system's `rate_limit`, if any.
    crm_rate_limit: Option<&'static str>,
    /// Both systems' objects have an upsert-by-email endpoint configured (without it a
    /// create is a plain POST, which only the identity map keeps from duplicating).
    upsert: bool,
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            lms_on_delete: "\"propagate\"",
            timeout_ms: 2000,
            crm_batch: 200,
            crm_rate_limit: None,
            upsert: true,
        }
    }
}

fn config_text(setup: &Setup, crm: &CrmSim, lms: &LmsSim) -> String {
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/contact.schema.json");
    format!(
        r#"
[state]
dir = "state"

[engine]
backoff_min_ms = 20
backoff_max_ms = 500
max_attempts = 50

[systems.crm]
type = "rest"
base_url = "{crm_url}"
auth = {{ method = "bearer", token = {{ file = "secrets/crm-token" }} }}
timeout_ms = {timeout}
{crm_rate}
headers = {{ "Sforce-Query-Options" = "batchSize={batch}" }}
rate_limit_headers = {{ usage = "Sforce-Limit-Info" }}

[systems.crm.objects.Contact]
list = {{ path = "/services/data/v60.0/query" }}
records = "/records"
ignore_fields = ["attributes"]
pagination = {{ style = "next_url", pointer = "/nextRecordsUrl" }}
cursor = {{ field = "LastModifiedDate", param = "q", format = "rfc3339", lookback_secs = 2, template = "SELECT Id, FirstName, LastName, Email, Phone, Title, Certified__c, LastModifiedDate FROM Contact WHERE LastModifiedDate >= {{cursor}} ORDER BY LastModifiedDate, Id" }}
write = {{ create_path = "/services/data/v60.0/sobjects/Contact", item_path = "/services/data/v60.0/sobjects/Contact/{{id}}", update_method = "patch", created_id = "/id"{crm_upsert} }}
concurrency = {{ mode = "etag", fetch_when_unknown = true }}
deletes = {{ mode = "tombstone", path = "/services/data/v60.0/sobjects/Contact/deleted/", records = "/deletedRecords", id = "/id", time = "/deletedDate", start_param = "start", end_param = "end", interval_secs = 1 }}

[systems.lms]
type = "rest"
base_url = "{lms_url}"
auth = {{ method = "api_key", header = "X-Api-Key", key = {{ file = "secrets/lms-api-key" }} }}
timeout_ms = {timeout}

[systems.lms.objects.learners]
list = {{ path = "/api/v1/learners", query = {{ per_page = "100", include_deleted = "true" }} }}
records = ""
pagination = {{ style = "link_header" }}
cursor = {{ field = "updated_at", param = "updated_since", format = "rfc3339_millis", lookback_secs = 2 }}
write = {{ create_path = "/api/v1/learners", item_path = "/api/v1/learners/{{id}}", update_method = "patch", created_id = "/id"{lms_upsert} }}
concurrency = {{ mode = "etag", fetch_when_unknown = true }}
deletes = {{ mode = "flag", field = "deleted_at" }}

[entities.contact]
schema = "{schema}"
match_keys = ["email"]
delete = {{ allowed_from = ["crm"], max_share = 1.0 }}

[entities.contact.fields.title]
owners = ["crm"]

[entities.contact.fields.phone]
owners = ["crm"]

[entities.contact.fields.certified]
owners = ["lms"]

[[links]]
system = "crm"
entity = "contact"
object = "Contact"
id_field = "Id"
version_field = "LastModifiedDate"
capture = {{ interval_secs = 1 }}
default_country_code = "+1"
map = [
  {{ canonical = "email", system = "Email", transforms = ["trim", "lower"] }},
  {{ canonical = "first_name", system = "FirstName" }},
  {{ canonical = "last_name", system = "LastName" }},
  {{ canonical = "title", system = "Title" }},
  {{ canonical = "phone", system = "Phone", transforms = ["empty_as_null", "e164"] }},
  {{ canonical = "certified", system = "Certified__c" }},
]

[[links]]
system = "lms"
entity = "contact"
object = "learners"
id_field = "id"
version_field = "updated_at"
capture = {{ interval_secs = 1 }}
on_delete = {on_delete}
map = [
  {{ canonical = "email", system = "email", transforms = ["trim", "lower"] }},
  {{ canonical = ["first_name", "last_name"], system = "full_name" }},
  {{ canonical = "certified", system = "certified" }},
]
"#,
        crm_url = crm.base_url(),
        lms_url = lms.base_url(),
        timeout = setup.timeout_ms,
        batch = setup.crm_batch,
        schema = schema.display(),
        on_delete = setup.lms_on_delete,
        crm_upsert = if setup.upsert {
            r#", upsert = { path = "/services/data/v60.0/sobjects/Contact/Email/{key}", field = "Email" }"#
        } else {
            ""
        },
        lms_upsert = if setup.upsert {
            r#", upsert = { path = "/api/v1/learners/by_email/{key}", field = "email" }"#
        } else {
            ""
        },
        crm_rate = setup
            .crm_rate_limit
            .map(|r| format!("rate_limit = {r}"))
            .unwrap_or_default(),
    )
}

/// The engine syncing a CRM and an LMS simulator.
struct Sync {
    crm: CrmSim,
    lms: LmsSim,
    engine: Engine,
    run: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Sync {
    async fn start(setup: Setup, crm: CrmSim, lms: LmsSim) -> Sync {
        if let Ok(filter) = std::env::var("CONCORD_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("secrets")).expect("secrets dir");
        std::fs::write(dir.path().join("secrets/crm-token"), crm.token()).expect("token file");
        std::fs::write(dir.path().join("secrets/lms-api-key"), lms.api_key()).expect("key file");
        let mut config = concord::config::parse(&config_text(&setup, &crm, &lms)).expect("configuration parses");
        config.base_dir = dir.path().to_path_buf();
        let problems = concord::config::validate(&config);
        assert!(problems.is_empty(), "configuration problems: {problems:?}");
        let store = StateStore::open(&dir.path().join("state"), config.state.cache_mb).expect("state store");
        let rt = Arc::new(Runtime::compile(config).expect("configuration compiles"));
        let connectors = concord::connector::open_all(&rt, &store).expect("connectors open");
        let engine = Engine::new(rt, store);
        let run = {
            let engine = engine.clone();
            tokio::spawn(async move { engine.run(connectors, RunMode::Forever).await })
        };
        Sync {
            crm,
            lms,
            engine,
            run,
            _dir: dir,
        }
    }

    fn status(&self) -> Status {
        self.engine.status().snapshot()
    }

    async fn stop(self) {
        self.engine.shutdown_token().cancel();
        tokio::time::timeout(DEADLINE, self.run)
            .await
            .expect("the engine stops within the deadline")
            .expect("the engine task does not panic");
    }

    /// Waits until `done` holds; on the deadline fails with `what` and the last
    /// difference `done` reported.
    async fn until(&self, what: &str, mut done: impl FnMut(&Sync) -> Result<(), String>) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let last = match done(self) {
                Ok(()) => return,
                Err(why) => why,
            };
            assert!(
                Instant::now() < deadline,
                "{what}: not reached within {DEADLINE:?}: {last}\nstatus: {:#?}",
                self.status()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until both systems hold the same people with the same agreed values.
    async fn agreed(&self) {
        self.until("the CRM and the LMS agree", |s| agreement(&s.crm, &s.lms))
            .await;
    }

    /// Waits until both systems have answered `pages` more list pages than now, every
    /// link is idle and nothing is pending: whatever either system held when this was
    /// called has been captured and merged, and what that caused has been written.
    async fn quiet(&self, pages: u64) {
        let (crm0, lms0) = (self.crm.stats().list_pages, self.lms.stats().list_pages);
        self.until("both systems polled again, every link idle, nothing pending", |s| {
            let (crm, lms) = (s.crm.stats().list_pages - crm0, s.lms.stats().list_pages - lms0);
            let status = s.status();
            let busy: Vec<_> = status
                .links
                .values()
                .filter(|l| l.state != "idle")
                .map(|l| l.link.clone())
                .collect();
            let pending: u64 = status.systems.values().map(|s| s.outbox_depth).sum();
            if crm >= pages && lms >= pages && busy.is_empty() && pending == 0 {
                Ok(())
            } else {
                Err(format!(
                    "list pages since: crm {crm}, lms {lms}; busy links {busy:?}; pending writes {pending}"
                ))
            }
        })
        .await;
    }
}

async fn crm_sim(options: CrmOptions) -> CrmSim {
    CrmSim::start(options).await.expect("the CRM simulator starts")
}

async fn lms_sim() -> LmsSim {
    LmsSim::start(LmsOptions::default())
        .await
        .expect("the LMS simulator starts")
}

fn contact(n: usize) -> NewContact {
    NewContact {
        first_name: Some(format!("First{n}")),
        last_name: Some(format!("Last{n}")),
        email: Some(format!("p{n}@example.com")),
        phone: Some(format!("+1 415 555 {:04}", n)),
        title: Some(format!("Title {n}")),
        certified: false,
    }
}

fn learner(n: usize, certified: bool) -> NewLearner {
    NewLearner {
        full_name: format!("First{n} Last{n}"),
        email: format!("p{n}@example.com"),
        certified,
        completed_at: None,
    }
}

/// Waits until the wall clock has left the second of the contact's LastModifiedDate.
async fn next_second(crm: &CrmSim, id: &str) {
    let deadline = Instant::now() + DEADLINE;
    let last = crm.contact(id).expect("contact").last_modified.timestamp();
    while chrono::Utc::now().timestamp() <= last {
        assert!(Instant::now() < deadline, "the clock does not move");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn name_of(c: &Contact) -> String {
    format!(
        "{} {}",
        c.first_name.as_deref().unwrap_or(""),
        c.last_name.as_deref().unwrap_or("")
    )
}

/// The CRM and the LMS hold the same live people, by email, with the same name and
/// certification.
fn agreement(crm: &CrmSim, lms: &LmsSim) -> Result<(), String> {
    let contacts = crm.live();
    let learners = lms.live();
    let by_email = |email: &str| learners.iter().find(|l| l.email.eq_ignore_ascii_case(email));
    for c in &contacts {
        let email = c.email.clone().unwrap_or_default();
        let Some(l) = by_email(&email) else {
            return Err(format!("{email} is in the CRM, not in the LMS"));
        };
        if l.full_name != name_of(c) {
            return Err(format!(
                "{email}: CRM name {:?}, LMS name {:?}",
                name_of(c),
                l.full_name
            ));
        }
        if l.certified != c.certified {
            return Err(format!("{email}: CRM certified {}, LMS {}", c.certified, l.certified));
        }
    }
    if learners.len() != contacts.len() {
        return Err(format!("{} learners, {} contacts", learners.len(), contacts.len()));
    }
    Ok(())
}

fn learner_by_email(lms: &LmsSim, email: &str) -> Result<Learner, String> {
    lms.find_by_email(email)
        .ok_or_else(|| format!("no live learner {email}"))
}

fn contact_by_email(crm: &CrmSim, email: &str) -> Result<Contact, String> {
    crm.find_by_email(email)
        .ok_or_else(|| format!("no live contact {email}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sync_then_steady_changes_both_ways() {
    let crm = crm_sim(CrmOptions::default()).await;
    let lms = lms_sim().await;
    // 60 CRM contacts, 40 learners: 20 known to both, 20 only to the LMS.
    for n in 0..60 {
        crm.create(contact(n));
    }
    for n in 40..80 {
        lms.create(learner(n, n % 2 == 0));
    }
    let sync = Sync::start(Setup::default(), crm, lms).await;
    sync.agreed().await;
    assert_eq!((sync.crm.live().len(), sync.lms.live().len()), (80, 80));
    // The LMS owns certification: the CRM took it for the people both knew.
    assert!(
        contact_by_email(&sync.crm, "p42@example.com")
            .expect("contact")
            .certified
    );
    assert!(
        !contact_by_email(&sync.crm, "p43@example.com")
            .expect("contact")
            .certified
    );
    // A learner created from the CRM is known by the id the LMS gave it, and one created
    // from the LMS by the CRM's.
    let created = contact_by_email(&sync.crm, "p70@example.com").expect("created in the CRM");
    assert_eq!((created.id.len(), &created.id[..3]), (18, "003"));

    for round in 0..5 {
        let n = round * 11;
        let c = contact_by_email(&sync.crm, &format!("p{n}@example.com")).expect("contact");
        // The user's edit lands in a later second than the contact's last change, so
        // its LastModifiedDate differs (see `an_edit_in_the_same_second_as_our_write_is_captured`).
        next_second(&sync.crm, &c.id).await;
        assert!(sync.crm.edit(&c.id, "FirstName", Some(&format!("Renamed{round}"))));
        let m = 40 + round * 7;
        let l = learner_by_email(&sync.lms, &format!("p{m}@example.com")).expect("learner");
        assert!(sync.lms.edit(l.id, json!({"certified": !l.certified})));
        let expect_name = format!("Renamed{round} Last{n}");
        let expect_certified = !l.certified;
        sync.until("a CRM rename reaches the LMS and a certification the CRM", |s| {
            let l = learner_by_email(&s.lms, &format!("p{n}@example.com"))?;
            if l.full_name != expect_name {
                return Err(format!("LMS still has {:?}", l.full_name));
            }
            let c = contact_by_email(&s.crm, &format!("p{m}@example.com"))?;
            if c.certified != expect_certified {
                return Err("CRM certification not updated".into());
            }
            Ok(())
        })
        .await;
    }
    sync.agreed().await;
    sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_records_sharing_one_cursor_second_are_all_captured() {
    let crm = crm_sim(CrmOptions::default()).await;
    let lms = lms_sim().await;
    let t = chrono::Utc::now() - chrono::Duration::minutes(10);
    crm.freeze_clock(Some(t));
    for n in 0..450 {
        crm.create(contact(n));
    }
    let sync = Sync::start(Setup::default(), crm, lms).await;
    sync.until("450 contacts of one second reach the LMS", |s| {
        let n = s.lms.live().len();
        if n == 450 { Ok(()) } else { Err(format!("{n} learners")) }
    })
    .await;
    // More records in the very second the cursor stands on.
    for n in 450..480 {
        sync.crm.create(contact(n));
    }
    sync.until("records added in the cursor's second are captured too", |s| {
        let n = s.lms.live().len();
        if n == 480 { Ok(()) } else { Err(format!("{n} learners")) }
    })
    .await;
    sync.crm.freeze_clock(None);
    sync.agreed().await;
    sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_boundary_moving_during_a_poll_loses_nothing() {
    let crm = crm_sim(CrmOptions::default()).await;
    let lms = lms_sim().await;
    let t = chrono::Utc::now() - chrono::Duration::minutes(10);
    crm.freeze_clock(Some(t));
    let ids: Vec<String> = (0..500).map(|n| crm.create(contact(n))).collect();
    // During the first walk, after its first page, a user renames the first record:
    // it moves to the end of the result and every record behind it shifts one place
    // toward the start, so the walk as served skips one record at the boundary.
    crm.freeze_clock(Some(t + chrono::Duration::seconds(1)));
    assert!(crm.edit_between_pages(&ids[0], "FirstName", Some("Moved")));
    let sync = Sync::start(Setup::default(), crm, lms).await;
    sync.until("every record, and the rename, reach the LMS", |s| {
        let n = s.lms.live().len();
        if n != 500 {
            return Err(format!("{n} learners"));
        }
        let l = learner_by_email(&s.lms, "p0@example.com")?;
        if l.full_name != "Moved Last0" {
            return Err(format!("p0 is {:?}", l.full_name));
        }
        Ok(())
    })
    .await;
    sync.crm.freeze_clock(None);
    sync.agreed().await;
    sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_delays_but_loses_nothing() {
    let crm = crm_sim(CrmOptions::default()).await;
    let lms = lms_sim().await;
    for n in 0..30 {
        crm.create(contact(n));
    }
    for n in 20..40 {
        lms.create(learner(n, true));
    }
    crm.fail_next(15, Fault::TooManyRequests { retry_after_secs: 0 }, FaultScope::Any);
    crm.fail_next(2, Fault::TooManyRequests { retry_after_secs: 1 }, FaultScope::Any);
    lms.fail_next(15, Fault::TooManyRequests { retry_after_secs: 0 }, FaultScope::Writes);
    let sync = Sync::start(Setup::default(), crm, lms).await;
    sync.agreed().await;
    assert_eq!(sync.crm.live().len(), 40);
    assert_eq!(sync.crm.stats().throttled, 17, "every injected 429 was met");
    assert_eq!(sync.lms.stats().throttled, 15, "every injected 429 was met");
    let dead: u64 = sync.status().systems.values().map(|s| s.dlq_depth).sum();
    assert_eq!(dead, 0);
    sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_and_timeouts_are_retried_until_everything_is_applied() {
    let crm = crm_sim(CrmOptions::default()).await;
    let lms = lms_sim().await;
    for n in 0..20 {
        crm.create(contact(n));
    }
    let setup = Setup {
        timeout_ms: 300,
        ..Setup::default()
    };
    crm.fail_next(3, Fault::ServerError, FaultScope::Reads);
    crm.fail_next(2, Fault::StallBefore(Duration::from_secs(2)), FaultScope::Reads);
    lms.fail_next(4, Fault::ServerError, FaultScope::Writes);
    lms.fail_next(2, Fault::Unavailable { retry_after_secs: 1 }, FaultScope::Writes);
    lms.fail_next(2, Fault::StallBefore(Duration::from_secs(2)), FaultScope::Writes);
    let sync = Sync::start(setup, crm, lms).await;
    sync.agreed().await;
    assert_eq!(sync.lms.live().len(), 20);
    // Updates whose answer is lost after they were applied: retried, applied again
    // (idempotent), and nothing else changes.
    sync.lms
        .fail_next(2, Fault::StallAfter(Duration::from_secs(2)), FaultScope::Writes);
    for n in 0..4 {
        let c = contact_by_email(&sync.crm, &format!("p{n}@example.com")).expect("contact");
        assert!(sync.crm.edit(&c.id, "LastName", Some(&format!("After{n}"))));
    }
    sync.until("the renames reach the LMS", |s| {
        for n in 0..4 {
            let l = learner_by_email(&s.lms, &format!("p{n}@example.com"))?;
            if l.full_name != format!("First{n} After{n}") {
                return Err(format!("p{n} is {:?}", l.full_name));
            }
        }
        Ok(())
    })
    .await;
    sync.agreed().await;
    assert_eq!(sync.lms.live().len(), 20, "no learner created twice");
    let stats = (sync.crm.stats(), sync.lms.stats());
    assert!(stats.0.server_errors >= 3 && stats.1.server_errors >= 6, "{stats:?}");
    let dead: u64 = sync.status().systems.values().map(|s| s.dlq_depth).sum();
    assert_eq!(dead, 0);
    sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_edit_meets_a_412_and_both_changes_survive() {
    let crm = crm_sim(CrmOptions::default()).await;
    let lms = lms_sim().await;
    for n in 0..5 {
        crm.create(contact(n));
    }
    let sync = Sync::start(Setup::default(), crm, lms).await;
    sync.agreed().await;
    let c = contact_by_email(&sync.crm, "p3@example.com").expect("contact");
    // A user changes the phone just before concord's write of the certification
    // lands: the write carries the ETag concord read, meets a 412, and is made again
    // on the record as it now is.
    assert!(
        sync.crm
            .interfere_on_next_write(&c.id, "Phone", Some("+1 415 555 0199"))
    );
    let l = learner_by_email(&sync.lms, "p3@example.com").expect("learner");
    assert!(sync.lms.edit(l.id, json!({"certified": true})));
    sync.until("the certification reaches the CRM", |s| {
        let c = contact_by_email(&s.crm, "p3@example.com")?;
        if c.certified {
            Ok(())
        } else {
            Err("not certified yet".into())
        }
    })
    .await;
    let c = contact_by_email(&sync.crm, "p3@example.com").expect("contact");
    assert_eq!(
        c.phone.as_deref(),
        Some("+1 415 555 0199"),
        "the user's edit was not overwritten"
    );
    assert!(sync.crm.stats().precondition_failed >= 1, "{:?}", sync.crm.stats());
    sync.agreed().await;
    sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_propagate_by_the_link_policy() {
    for (policy, propagates) in [("\"propagate\"", true), ("\"ignore\"", false)] {
        let crm = crm_sim(CrmOptions::default()).await;
        let lms = lms_sim().await;
        for n in 0..25 {
            crm.create(contact(n));
        }
        let setup = Setup {
            lms_on_delete: policy,
            ..Setup::default()
        };
        let sync = Sync::start(setup, crm, lms).await;
        sync.agreed().await;
        let c = contact_by_email(&sync.crm, "p1@example.com").expect("contact");
        assert!(sync.crm.delete(&c.id));
        // The LMS may not end a record: its delete only marks its own copy gone.
        let l = learner_by_email(&sync.lms, "p2@example.com").expect("learner");
        assert!(sync.lms.delete(l.id));
        if propagates {
            sync.until("the CRM's delete reaches the LMS", |s| {
                match s.lms.find_by_email("p1@example.com") {
                    None => Ok(()),
                    Some(_) => Err("p1 is still a live learner".into()),
                }
            })
            .await;
            let gone = sync.lms.learners().into_iter().find(|l| l.email == "p1@example.com");
            assert!(gone.expect("kept, soft-deleted").deleted_at.is_some());
        } else {
            sync.quiet(3).await;
            assert!(
                sync.lms.find_by_email("p1@example.com").is_some(),
                "ignored: the learner stays"
            );
        }
        sync.quiet(3).await;
        assert!(
            sync.crm.find_by_email("p2@example.com").is_some(),
            "an LMS delete does not delete in the CRM"
        );
        sync.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_echo_of_our_own_write_causes_no_further_write() {
    let crm = crm_sim(CrmOptions::default()).await;
    let lms = lms_sim().await;
    for n in 0..10 {
        crm.create(contact(n));
    }
    let sync = Sync::start(Setup::default(), crm, lms).await;
    sync.agreed().await;
    sync.quiet(2).await;
    let (crm_before, lms_before) = (sync.crm.stats().writes, sync.lms.stats().writes);
    let c = contact_by_email(&sync.crm, "p4@example.com").expect("contact");
    next_second(&sync.crm, &c.id).await;
    assert!(sync.crm.edit(&c.id, "FirstName", Some("Echo")));
    sync.until("the rename reaches the LMS", |s| {
        let l = learner_by_email(&s.lms, "p4@example.com")?;
        if l.full_name == "Echo Last4" {
            Ok(())
        } else {
            Err(format!("{:?}", l.full_name))
        }
    })
    .await;
    // The LMS now shows our write as its own change; two more polls of every link
    // capture and merge it.
    sync.quiet(3).await;
    assert_eq!(sync.crm.stats().writes, crm_before, "nothing written back to the CRM");
    let lms_writes = sync.lms.stats().writes - lms_before;
    assert_eq!(lms_writes, 1, "one write to the LMS, no more");
    sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crm_rate_limit_is_honoured() {
    // Without a budget of its own, concord meets the CRM's limit and honours its
    // Retry-After; with a budget below the limit it causes no 429 at all.
    for (budget, limit) in [(None, 4), (Some("{ per_second = 5, burst = 1 }"), 8)] {
        let crm = crm_sim(CrmOptions {
            rate_limit: Some(limit),
            ..CrmOptions::default()
        })
        .await;
        let lms = lms_sim().await;
        for n in 0..25 {
            lms.create(learner(n, n % 3 == 0));
        }
        let setup = Setup {
            crm_rate_limit: budget,
            ..Setup::default()
        };
        let sync = Sync::start(setup, crm, lms).await;
        sync.agreed().await;
        assert_eq!(sync.crm.live().len(), 25);
        let dead: u64 = sync.status().systems.values().map(|s| s.dlq_depth).sum();
        assert_eq!(dead, 0);
        if budget.is_some() {
            assert_eq!(sync.crm.stats().rate_limited, 0, "{:?}", sync.crm.stats());
        }
        sync.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_in_the_same_second_as_our_write_is_captured() {
    let crm = crm_sim(CrmOptions::default()).await;
    let lms = lms_sim().await;
    // The CRM's clock stands still ahead of the LMS's, so under last-writer-wins the
    // CRM's rename is the latest change of the name (a clock behind would make it stale).
    let t = chrono::Utc::now() + chrono::Duration::minutes(10);
    crm.freeze_clock(Some(t));
    for n in 0..3 {
        crm.create(contact(n));
    }
    for n in 0..3 {
        lms.create(learner(n, n == 1));
    }
    // Everything happens in one second of the CRM's clock: concord's write of the
    // certification, its echo, and then a user's rename.
    let sync = Sync::start(Setup::default(), crm, lms).await;
    sync.agreed().await;
    sync.quiet(2).await;
    let c = contact_by_email(&sync.crm, "p1@example.com").expect("contact");
    assert!(c.certified);
    assert!(sync.crm.edit(&c.id, "FirstName", Some("SameSecond")));
    sync.until("the same-second rename reaches the LMS", |s| {
        let l = learner_by_email(&s.lms, "p1@example.com")?;
        if l.full_name == "SameSecond Last1" {
            Ok(())
        } else {
            Err(format!("{:?}", l.full_name))
        }
    })
    .await;
    sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_in_both_systems_at_start_are_matched_not_created_again() {
    let crm = crm_sim(CrmOptions::default()).await;
    let lms = lms_sim().await;
    for n in 0..50 {
        crm.create(contact(n));
        lms.create(learner(n, n % 2 == 0));
    }
    // The CRM's first list page is slow: the LMS's records are read and merged well
    // before the CRM's are, so a create toward the CRM planned from them would race
    // the CRM's own first read. With plain POST creates (no upsert by email), only
    // holding writes until that first read is over keeps the CRM free of duplicates.
    crm.fail_next(1, Fault::StallBefore(Duration::from_millis(1500)), FaultScope::Reads);
    let sync = Sync::start(
        Setup {
            upsert: false,
            ..Setup::default()
        },
        crm,
        lms,
    )
    .await;
    sync.agreed().await;
    sync.quiet(2).await;
    assert_eq!(sync.crm.live().len(), 50, "no contact was created twice");
    assert_eq!(sync.lms.live().len(), 50, "no learner was created twice");
    let dead: u64 = sync.status().systems.values().map(|s| s.dlq_depth).sum();
    assert_eq!(dead, 0, "no write was refused");
    let c = contact_by_email(&sync.crm, "p2@example.com").expect("contact");
    assert!(c.certified, "the LMS's certification reached the CRM's own record");
    sync.stop().await;
}
