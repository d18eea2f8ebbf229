//! The Grafana dashboards and Prometheus alert rules in `dashboards/` held to what concord
//! exports: every metric they name is declared in `concord::metrics::ALL`, promtool accepts
//! and unit-tests the rules, and a real Prometheus scraping running concord daemons answers
//! every dashboard query with data: the bundled file example, and the demo (simulated REST
//! CRM and LMS) with a PostgreSQL system capturing from a throwaway cluster.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;
use support::pg::{PgCluster, SUPERUSER, SUPERUSER_PASSWORD};
use support::*;

const DASHBOARDS: &[&str] = &["concord-overview.json", "concord-system.json"];
/// Systems of the scraped daemons, sorted. The bundled example: `hr` and `lms` are
/// captured, `directory` is written. The demo: `crm` and `lms` are REST systems (HTTP
/// requests, rate-limit headroom from the CRM's headers), `hr` a file export; `app` is a
/// PostgreSQL database captured through a replication slot.
const SYSTEMS: &[&str] = &["app", "crm", "directory", "hr", "lms"];
/// Metrics a scraped daemon must export with data before the dashboard queries run, and
/// the system that sets them.
const EXPECTED_SERIES: &[(&str, &str)] = &[
    ("concord_http_requests_total", "crm"),
    ("concord_http_request_duration_seconds_count", "crm"),
    ("concord_rate_limit_headroom_ratio", "crm"),
    ("concord_postgres_slot_retained_wal_bytes", "app"),
    ("concord_postgres_slot_confirmed_lag_bytes", "app"),
];

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards")
}

fn dashboard(name: &str) -> Value {
    let path = dashboards_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name} is not JSON: {e}"))
}

/// Every `expr` string anywhere in a dashboard (panels, rows, nested panels).
fn panel_exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    _ => panel_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| panel_exprs(v, out)),
        _ => {}
    }
}

/// The query strings of a dashboard's template variables (not PromQL: `label_values(…)`).
fn variable_queries(dash: &Value) -> Vec<String> {
    let vars = dash["templating"]["list"]
        .as_array()
        .expect("dashboard has templating.list");
    vars.iter()
        .filter(|v| v["type"] == "query")
        .flat_map(|v| {
            [&v["definition"], &v["query"], &v["query"]["query"]]
                .into_iter()
                .filter_map(|q| q.as_str().map(str::to_string))
        })
        .collect()
}

/// Every `expr:` of a Prometheus rule file, single-line or a `|`/`>` block scalar.
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        i += 1;
        let Some(rest) = trimmed.strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest.starts_with('|') || rest.starts_with('>') {
            let indent = line.len() - trimmed.len();
            let mut block = String::new();
            while i < lines.len() {
                let next = lines[i];
                let next_indent = next.len() - next.trim_start().len();
                if !next.trim().is_empty() && next_indent <= indent {
                    break;
                }
                block.push_str(next.trim());
                block.push('\n');
                i += 1;
            }
            out.push(block);
        } else {
            out.push(rest.trim_matches(|c| c == '\'' || c == '"').to_string());
        }
    }
    out
}

/// Names matching `concord_[a-z0-9_]+`, with histogram series suffixes stripped.
fn concord_names(expr: &str) -> BTreeSet<String> {
    let bytes = expr.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("concord_") {
        let start = i + pos;
        let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start + "concord_".len();
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase() || bytes[end].is_ascii_digit() || bytes[end] == b'_')
        {
            end += 1;
        }
        if boundary {
            let name = &expr[start..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|b| concord::metrics::HISTOGRAMS.contains(b))
                })
                .unwrap_or(name);
            names.insert(base.to_string());
        }
        i = end;
    }
    names
}

/// Removes every `open … close` span (nesting-aware) from `text`.
fn strip_spans(text: &str, open: char, close: char) -> String {
    let mut out = String::new();
    let mut depth = 0usize;
    for c in text.chars() {
        if c == open {
            depth += 1;
        } else if c == close && depth > 0 {
            depth -= 1;
        } else if depth == 0 {
            out.push(c);
        }
    }
    out
}

/// Identifiers of a PromQL expression used as metric names: string literals, label
/// matchers, ranges, grouping label lists and Grafana variables removed; identifiers
/// followed by `(` are functions or aggregations.
fn metric_identifiers(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset"];
    const GROUPING: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
    // Aggregations may put their grouping before the parenthesis: `sum by (l) (…)`.
    const AGGREGATIONS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    // String literals first: they may hold braces and parentheses.
    let mut text = String::new();
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in expr.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
            }
            None if c == '"' || c == '\'' || c == '`' => quote = Some(c),
            None => text.push(c),
        }
    }
    let text = strip_spans(&strip_spans(&text, '{', '}'), '[', ']');
    let chars: Vec<char> = text.chars().collect();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '$' {
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            continue;
        }
        if c.is_ascii_digit() {
            // A number or a duration such as 5m.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            continue;
        }
        if !(c.is_ascii_alphabetic() || c == '_' || c == ':') {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        let mut next = i;
        while next < chars.len() && chars[next].is_whitespace() {
            next += 1;
        }
        let called = next < chars.len() && chars[next] == '(';
        if GROUPING.contains(&word.as_str()) && called {
            // Skip the label list.
            while next < chars.len() && chars[next] != ')' {
                next += 1;
            }
            i = next + 1;
            continue;
        }
        if called || KEYWORDS.contains(&word.as_str()) || AGGREGATIONS.contains(&word.as_str()) {
            continue;
        }
        out.insert(word);
    }
    out
}

/// What is wrong with the metric names of one PromQL expression: concord names that
/// `concord::metrics::ALL` does not declare, and metric names outside concord (`up` is
/// Prometheus's own scrape health).
fn undeclared(expr: &str) -> Vec<String> {
    let mut bad: Vec<String> = concord_names(expr)
        .into_iter()
        .filter(|n| !concord::metrics::ALL.contains(&n.as_str()))
        .collect();
    for ident in metric_identifiers(expr) {
        if ident == "up" || ident.starts_with("concord_") {
            continue;
        }
        bad.push(ident);
    }
    bad
}

#[test]
fn the_name_check_catches_undeclared_and_foreign_names() {
    assert_eq!(
        undeclared(r#"sum by (system) (rate(concord_writes_total{system=~"$system"}[$__rate_interval]))"#),
        Vec::<String>::new()
    );
    assert_eq!(
        undeclared("histogram_quantile(0.99, sum by (le) (rate(concord_end_to_end_latency_seconds_bucket[5m])))"),
        Vec::<String>::new()
    );
    assert_eq!(undeclared("rate(concord_writes_totl[1m])"), vec!["concord_writes_totl"]);
    assert_eq!(undeclared("concord_records_bucket"), vec!["concord_records_bucket"]);
    assert_eq!(
        undeclared(r#"node_load1{instance="x"} / on (instance) up"#),
        vec!["node_load1"]
    );
    let names = concord_names(r#"label_values({__name__=~"concord_records|concord_nope"}, system)"#);
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        vec!["concord_nope", "concord_records"]
    );
}

/// Declared metrics no dashboard panel shows, and why.
const NOT_ON_DASHBOARDS: &[&str] = &[
    // Constant 1 with the version label: for `group by (version)` queries, not a panel.
    "concord_build_info",
    // Export files by outcome: the file connector's detail, visible in captures and errors.
    "concord_files_total",
];

#[test]
fn dashboards_and_alerts_use_only_declared_metrics() {
    let mut checked = 0;
    let mut problems = Vec::new();
    let mut on_dashboards = BTreeSet::new();
    for name in DASHBOARDS {
        let dash = dashboard(name);
        let mut exprs = Vec::new();
        panel_exprs(&dash["panels"], &mut exprs);
        assert!(exprs.len() >= 10, "{name} has only {} panel queries", exprs.len());
        for expr in exprs {
            checked += 1;
            on_dashboards.extend(concord_names(&expr));
            for bad in undeclared(&expr) {
                problems.push(format!("{name}: {bad} in {expr}"));
            }
        }
        let vars = variable_queries(&dash);
        assert!(!vars.is_empty(), "{name} has no system variable query");
        for query in vars {
            // Not PromQL (`label_values(selector, label)`): only the concord names count.
            let names = concord_names(&query);
            assert!(!names.is_empty(), "{name}: variable query names no metric: {query}");
            for bad in names.iter().filter(|n| !concord::metrics::ALL.contains(&n.as_str())) {
                problems.push(format!("{name} variable: {bad} in {query}"));
            }
        }
    }
    // Every declared metric is on a dashboard, unless listed with a reason.
    for metric in concord::metrics::ALL {
        assert!(
            on_dashboards.contains(*metric) != NOT_ON_DASHBOARDS.contains(metric),
            "{metric}: on a dashboard and in NOT_ON_DASHBOARDS, or in neither"
        );
    }
    let rules = std::fs::read_to_string(dashboards_dir().join("alerts.yml")).unwrap();
    let exprs = rule_exprs(&rules);
    let alerts = rules.lines().filter(|l| l.trim_start().starts_with("- alert:")).count();
    assert_eq!(exprs.len(), alerts, "one expr per alert: {exprs:?}");
    let mut in_alerts = BTreeSet::new();
    for expr in &exprs {
        in_alerts.extend(concord_names(expr));
    }
    // The issue's alerts on rate limits and replication slots, and on failing HTTP requests.
    for metric in [
        concord::metrics::RATE_LIMIT_HEADROOM,
        concord::metrics::PG_SLOT_RETAINED_WAL,
        concord::metrics::PG_SLOT_CONFIRMED_LAG,
        concord::metrics::HTTP_REQUESTS,
    ] {
        assert!(in_alerts.contains(metric), "no alert uses {metric}");
    }
    for expr in exprs {
        checked += 1;
        assert!(!concord_names(&expr).is_empty() || expr.contains("up{"), "{expr}");
        for bad in undeclared(&expr) {
            problems.push(format!("alerts.yml: {bad} in {expr}"));
        }
    }
    assert!(problems.is_empty(), "undeclared metric names:\n{}", problems.join("\n"));
    assert!(checked > 30, "only {checked} expressions checked");
}

/// Alert rules in `alerts.yml`.
fn alert_count() -> usize {
    let rules = std::fs::read_to_string(dashboards_dir().join("alerts.yml")).unwrap();
    rules.lines().filter(|l| l.trim_start().starts_with("- alert:")).count()
}

fn promtool(args: &[&str]) -> std::process::Output {
    Command::new("promtool")
        .args(args)
        .current_dir(dashboards_dir())
        .output()
        .expect("promtool is installed (Debian package prometheus; .ci/run installs it)")
}

#[test]
fn promtool_checks_and_unit_tests_the_rules() {
    let check = promtool(&["check", "rules", "alerts.yml"]);
    assert!(
        check.status.success(),
        "promtool check rules:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let test = promtool(&["test", "rules", "alerts_test.yml"]);
    assert!(
        test.status.success(),
        "promtool test rules:\n{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
    // Every alert has a firing and a not-firing case.
    let rules = std::fs::read_to_string(dashboards_dir().join("alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(dashboards_dir().join("alerts_test.yml")).unwrap();
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    for alert in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(str::trim)
    {
        let cases: Vec<bool> = lines
            .windows(2)
            .filter(|w| w[0] == format!("alertname: {alert}"))
            .map(|w| w[1] != "exp_alerts: []")
            .collect();
        assert!(cases.contains(&true), "{alert} has no firing case");
        assert!(cases.contains(&false), "{alert} has no not-firing case");
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A dashboard query as Grafana would send it, with `system` set to `system`.
fn substitute(expr: &str, system: &str) -> String {
    expr.replace("${system}", system)
        .replace("$system", system)
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "5m")
}

/// Writes an export file the way a well-behaved exporter does: a temporary name outside
/// the link's pattern, then a rename into place.
fn drop_file(dir: &Path, name: &str, content: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// A process killed when dropped, so a failing test leaves nothing running.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The result of an instant query: `Err` with the reason when the status is not success.
fn query(port: u16, promql: &str) -> Result<Vec<Value>, String> {
    let response = request(port, "GET", &format!("/api/v1/query?query={}", encode(promql)))
        .ok_or_else(|| "no answer".to_string())?;
    let body = response.json();
    if response.status != 200 || body["status"] != "success" {
        return Err(format!("HTTP {}: {}", response.status, response.body));
    }
    Ok(body["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// A fresh database on the shared test cluster with a `people` table of three rows;
/// returns its name.
fn people_database() -> String {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let db = PgCluster::shared().fresh_db().await;
        db.execute(
            "CREATE TABLE people (id int PRIMARY KEY, email text, first_name text);
             INSERT INTO people VALUES (1, 'ann@example.com', 'Ann'), (2, 'bo@example.com', 'Bo'),
                                       (3, 'cy@example.com', 'Cy');",
        )
        .await;
        db.name.clone()
    })
}

/// The demo's configuration with a PostgreSQL system `app` added: its `people` table is
/// captured into a `person` entity of its own through a replication slot, beside the
/// demo's CRM, LMS and HR systems. Paths are absolute: the demo resolves relative ones in
/// its own directory.
fn demo_with_postgres(dir: &Path, database: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let schemas = format!("{}/schemas/", root.display());
    let password = dir.join("pgpass");
    std::fs::write(&password, SUPERUSER_PASSWORD).unwrap();
    let mut config = std::fs::read_to_string(root.join("examples/demo/concord.toml"))
        .unwrap()
        .replace("../../schemas/", &schemas);
    config.push_str(&format!(
        r#"
[systems.app]
type = "postgres"
direction = "read"
host = "127.0.0.1"
port = {port}
database = "{database}"
user = "{SUPERUSER}"
password = {{ file = "{password}" }}
tls = "disable"
slot = "{database}"
publication = "pub_{database}"
status_interval_secs = 1
heartbeat_interval_secs = 1

[entities.person]
schema = "{schemas}contact.schema.json"
match_keys = ["email"]

[[links]]
system = "app"
entity = "person"
object = "people"
id_field = "id"
capture = {{ interval_secs = 1 }}
map = [{{ canonical = "email", system = "email" }}, {{ canonical = "first_name", system = "first_name" }}]
"#,
        port = PgCluster::shared().port(),
        password = password.display(),
    ));
    let path = dir.join("demo-postgres.toml");
    std::fs::write(&path, config).unwrap();
    path
}

#[test]
fn a_real_prometheus_answers_every_dashboard_query() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = example_copy(dir.path(), port);
    let mut concord = Reaped(start(&config, false));
    let synced_status = wait_for("the sync to finish", 60, || example_synced(port));

    // The second daemon: the demo's simulated REST systems and a PostgreSQL system.
    let database = people_database();
    let demo_config = demo_with_postgres(dir.path(), &database);
    let demo_port = free_port();
    let demo_log = std::fs::File::create(dir.path().join("demo.log")).unwrap();
    let demo = support::concord(&["demo", "--listen", &format!("127.0.0.1:{demo_port}"), "--config"])
        .arg(&demo_config)
        .arg("--dir")
        .arg(dir.path().join("demo"))
        .stdout(Stdio::null())
        .stderr(demo_log)
        .spawn()
        .expect("concord demo starts");
    let mut demo = Reaped(demo);
    let demo_log = || std::fs::read_to_string(dir.path().join("demo.log")).unwrap_or_default();
    wait_for("the demo's PostgreSQL link to capture the table", 60, || {
        if let Some(code) = demo.0.try_wait().unwrap() {
            panic!("the demo exited with {code}:\n{}", demo_log());
        }
        let status = request(demo_port, "GET", "/api/v1/status")?.json();
        (status["links"]["app.person"]["captured"].as_u64() >= Some(3)).then_some(())
    });

    let prom_port = free_port();
    let prom_config = dir.path().join("prometheus.yml");
    std::fs::write(
        &prom_config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: concord\n    static_configs:\n      - targets: ['127.0.0.1:{port}', '127.0.0.1:{demo_port}']\n",
            rules = dashboards_dir().join("alerts.yml").display()
        ),
    )
    .unwrap();
    let prom_log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let prometheus = Command::new("/usr/bin/prometheus")
        .arg(format!("--config.file={}", prom_config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .arg("--web.enable-lifecycle")
        .stdout(Stdio::null())
        .stderr(prom_log)
        .spawn()
        .expect("prometheus is installed (Debian package prometheus; .ci/run installs it)");
    let mut prometheus = Reaped(prometheus);
    let log = || std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();

    wait_for("prometheus ready", 30, || {
        if let Some(code) = prometheus.0.try_wait().unwrap() {
            panic!("prometheus exited with {code}:\n{}", log());
        }
        request(prom_port, "GET", "/-/ready").filter(|r| r.status == 200)
    });
    wait_for("a successful scrape of both daemons", 30, || {
        let up = query(prom_port, r#"up{job="concord"}"#).ok()?;
        (up.len() == 2 && up.iter().all(|u| u["value"][1] == "1")).then_some(())
    });
    // The REST and PostgreSQL metrics arrive, labelled with the system that sets them.
    for (metric, system) in EXPECTED_SERIES {
        wait_for(&format!("{metric} for {system}"), 60, || {
            if let Some(code) = demo.0.try_wait().unwrap() {
                panic!("the demo exited with {code}:\n{}", demo_log());
            }
            let found = query(prom_port, &format!(r#"{metric}{{system="{system}"}}"#)).ok()?;
            (!found.is_empty()).then_some(())
        });
    }

    // Fresh activity for the rates: a new HR export changes Ada's title (a capture, a
    // write to the directory, a latency observation); a new LMS export respells Alan's
    // name, which HR owns (a field rejection). Once both are captured, the LMS inbox
    // disappears (its link retries with transient errors).
    let captured = |status: &Value| -> Vec<u64> {
        let links = status["links"].as_object().expect("status lists links");
        links.values().map(|l| l["captured"].as_u64().unwrap_or(0)).collect()
    };
    let before = captured(&synced_status);
    drop_file(
        &dir.path().join("inbox/hr"),
        "employees-2026-11-27.csv",
        "employee_id,first,last,email,job_title,phone\n\
         1001,Ada,Lovelace,ada.lovelace@example.com,Chief Engineer,(212) 555-0101\n",
    );
    drop_file(
        &dir.path().join("inbox/lms"),
        "learners-2026-11-27.jsonl",
        "{\"id\": 503, \"email\": \"alan.turing@example.com\", \"full_name\": \"Alan Mathison Turing\", \"certified\": true}\n",
    );
    wait_for("both new exports captured", 30, || {
        let now = captured(&request(port, "GET", "/api/v1/status")?.json());
        (now.len() == before.len() && now.iter().zip(&before).all(|(n, b)| n > b)).then_some(())
    });
    std::fs::rename(dir.path().join("inbox/lms"), dir.path().join("lms-away")).unwrap();

    let mut queries: Vec<(String, String)> = Vec::new();
    for name in DASHBOARDS {
        let mut exprs = Vec::new();
        panel_exprs(&dashboard(name)["panels"], &mut exprs);
        for expr in exprs {
            queries.push((name.to_string(), expr));
        }
    }
    // The overview runs with "All" (`.*`); the drill-down with each example system, and
    // each of its queries must have data for at least one of them (a source has no write
    // latency, a target no source lag).
    let missing = |final_try: bool| -> Vec<String> {
        let mut missing = Vec::new();
        for (name, expr) in &queries {
            let systems: &[&str] = if name == "concord-overview.json" {
                &[".*"]
            } else {
                SYSTEMS
            };
            let mut any = false;
            for system in systems {
                let promql = substitute(expr, system);
                match query(prom_port, &promql) {
                    Ok(result) => any |= !result.is_empty(),
                    Err(e) => panic!("{name}: query failed: {promql}: {e}"),
                }
            }
            if !any {
                missing.push(format!("{name}: {expr}"));
            }
            if !final_try && !missing.is_empty() {
                break;
            }
        }
        missing
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    loop {
        if missing(false).is_empty() {
            break;
        }
        if std::time::Instant::now() > deadline {
            panic!("dashboard queries without data:\n{}", missing(true).join("\n"));
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }

    // The system variable lists every system of the example.
    let dash = dashboard("concord-overview.json");
    let selector = variable_queries(&dash)[0]
        .strip_prefix("label_values(")
        .and_then(|q| q.rsplit_once(','))
        .map(|(selector, _)| selector.to_string())
        .expect("the system variable is label_values(selector, system)");
    let values = get(
        prom_port,
        &format!("/api/v1/label/system/values?match[]={}", encode(&selector)),
    )
    .json();
    let systems: Vec<&str> = values["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(systems, SYSTEMS, "{values}");

    // The alert rules load and evaluate against real series.
    let rules = wait_for("every alert rule evaluated", 30, || {
        let body = get(prom_port, "/api/v1/rules").json();
        let rules: Vec<Value> = body["data"]["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        (rules.len() == alert_count() && rules.iter().all(|r| r["lastEvaluation"] != "0001-01-01T00:00:00Z"))
            .then_some(rules)
    });
    for rule in &rules {
        assert_eq!(rule["health"], "ok", "{rule}");
    }

    let _ = request(prom_port, "POST", "/-/quit");
    wait_for("prometheus to exit", 30, || prometheus.0.try_wait().unwrap());
    signal(&concord.0, libc::SIGTERM);
    signal(&demo.0, libc::SIGTERM);
    let code = wait_for("concord to exit after SIGTERM", 30, || concord.0.try_wait().unwrap());
    assert!(code.success(), "concord exit status {code}");
    let code = wait_for("the demo to exit after SIGTERM", 60, || demo.0.try_wait().unwrap());
    assert!(code.success(), "demo exit status {code}:\n{}", demo_log());
}
