//! Helpers shared by the integration tests: a running `concord` process on a copy of a
//! configuration, and a minimal HTTP/1.1 client for its admin listener.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Copies a directory tree.
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A free loopback port (bound, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The bundled example, copied into `dir` with its schema path made absolute and the
/// admin listener moved to `port`. Returns the configuration path.
pub fn example_copy(dir: &Path, port: u16) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    copy_tree(&root.join("examples/hr-sync/inbox"), &dir.join("inbox"));
    let config = std::fs::read_to_string(root.join("examples/hr-sync/concord.toml"))
        .unwrap()
        .replace("../../schemas/", &format!("{}/schemas/", root.display()))
        .replace("127.0.0.1:9464", &format!("127.0.0.1:{port}"));
    let path = dir.join("concord.toml");
    std::fs::write(&path, config).unwrap();
    path
}

pub fn concord(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_concord"));
    cmd.args(args).env("CONCORD_LOG", "warn");
    cmd
}

/// Starts `concord run` on a configuration; stderr is kept in `dir/stderr.log`.
pub fn start(config: &Path, once: bool) -> Child {
    let log = std::fs::File::create(config.with_file_name("stderr.log")).unwrap();
    let mut cmd = concord(&["run", "--config"]);
    cmd.arg(config);
    if once {
        cmd.arg("--once");
    }
    cmd.stdout(Stdio::null()).stderr(log).spawn().expect("concord starts")
}

/// Starts `concord run` on a configuration, logging at debug level to `log`.
pub fn start_debug_logged(config: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    concord(&["run", "--config"])
        .arg(config)
        .env("CONCORD_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("concord starts")
}

/// A response: status code and body.
pub struct Response {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request with `Connection: close`; `None` when nothing listens.
pub fn request(port: u16, method: &str, path: &str) -> Option<Response> {
    request_with(port, method, path, &[])
}

/// One HTTP/1.1 request with extra headers (`("Authorization", "Bearer …")`).
pub fn request_with(port: u16, method: &str, path: &str, headers: &[(&str, &str)]) -> Option<Response> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{extra}Content-Length: 0\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    Some(Response {
        status,
        headers: head.to_string(),
        body,
    })
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

pub fn get(port: u16, path: &str) -> Response {
    request(port, "GET", path).unwrap_or_else(|| panic!("GET {path}: no answer"))
}

/// Polls `check` until it returns `Some`, failing after `secs` seconds.
pub fn wait_for<T>(what: &str, secs: u64, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends a signal to a child process.
pub fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) with a pid we spawned and a valid signal number.
    let rc = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(rc, 0, "kill failed");
}

/// The bundled example is synced: both capture links idle after capturing, the
/// directory's outbox empty, six records. Returns the status document.
pub fn example_synced(port: u16) -> Option<serde_json::Value> {
    let status = request(port, "GET", "/api/v1/status")?.json();
    let links = status["links"].as_object()?;
    let all_idle = links.len() == 2
        && links
            .values()
            .all(|l| l["state"] == "idle" && l["captured"].as_u64() > Some(0));
    let outbox = status["systems"]["directory"]["outbox_depth"].as_u64();
    (all_idle && outbox == Some(0) && status["records"].as_u64() == Some(6)).then_some(status)
}
pub mod pg;
