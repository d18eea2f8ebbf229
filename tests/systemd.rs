//! concord under a service manager: the sd_notify messages it sends to a fake
//! NOTIFY_SOCKET (readiness, status, watchdog, stopping, reloads), and the unit file as
//! `systemd-analyze` judges it.

mod support;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// A fake service manager: the datagram socket concord notifies.
struct Manager {
    socket: UnixDatagram,
    path: std::path::PathBuf,
}

impl Manager {
    fn new(dir: &Path) -> Manager {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        Manager { socket, path }
    }

    /// The next message, or `None` when none arrives within `wait`.
    fn next(&self, wait: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Reads messages until one satisfies `want`, failing after `secs` seconds.
    fn until(&self, what: &str, secs: u64, mut want: impl FnMut(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if let Some(msg) = self.next(Duration::from_millis(200)) {
                if want(&msg) {
                    return msg;
                }
            }
        }
        panic!("timed out waiting for {what}");
    }

    /// Every message that arrives during `span`.
    fn collect(&self, span: Duration) -> Vec<String> {
        let end = Instant::now() + span;
        let mut out = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            if left.is_zero() {
                break;
            }
            if let Some(msg) = self.next(left) {
                out.push(msg);
            }
        }
        out
    }
}

fn start_notified(config: &Path, manager: &Manager, envs: &[(&str, &str)]) -> Child {
    let log = std::fs::File::create(config.with_file_name("stderr.log")).unwrap();
    let mut cmd = concord(&["run", "--config"]);
    cmd.arg(config)
        .env("CONCORD_LOG", "info")
        .env("NOTIFY_SOCKET", &manager.path)
        .env_remove("WATCHDOG_PID")
        .env_remove("WATCHDOG_USEC");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::null()).stderr(log).spawn().expect("concord starts")
}

fn wait_exit(child: &mut Child, secs: u64) -> std::process::ExitStatus {
    wait_for("the process to exit", secs, || child.try_wait().unwrap())
}

fn stderr_of(config: &Path) -> String {
    std::fs::read_to_string(config.with_file_name("stderr.log")).unwrap_or_default()
}

fn records(port: u16) -> Option<u64> {
    request(port, "GET", "/api/v1/status")?.json()["records"].as_u64()
}

#[test]
fn ready_after_readyz_status_lines_and_stopping_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = example_copy(dir.path(), port);
    let manager = Manager::new(dir.path());
    let mut child = start_notified(&config, &manager, &[]);

    let first = manager.next(Duration::from_secs(60)).expect("a first message");
    assert_ne!(first, "READY=1", "READY=1 must not be the first thing said");
    manager.until("READY=1", 60, |m| {
        m != "READY=1" || {
            // The admin API already says ready when READY=1 arrives.
            assert_eq!(get(port, "/readyz").status, 200, "READY=1 before /readyz is ready");
            true
        }
    });
    let status = manager.until("a status summary", 30, |m| {
        m.starts_with("STATUS=") && m.contains("links:")
    });
    assert!(status.contains("records;"), "{status}");
    assert!(status.contains("hr "), "{status}");
    assert!(status.contains("lms "), "{status}");
    // Without WATCHDOG_USEC there are no pings.
    assert!(
        manager
            .collect(Duration::from_secs(2))
            .iter()
            .all(|m| m != "WATCHDOG=1")
    );

    signal(&child, libc::SIGTERM);
    manager.until("STOPPING=1", 30, |m| m == "STOPPING=1");
    let exit = wait_exit(&mut child, 60);
    assert!(exit.success(), "exit {exit:?}: {}", stderr_of(&config));
}

#[test]
fn watchdog_pings_at_half_the_interval_and_stop_when_the_engine_stalls() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = example_copy(dir.path(), port);
    let manager = Manager::new(dir.path());
    let mut child = start_notified(
        &config,
        &manager,
        &[("WATCHDOG_USEC", "1000000"), ("CONCORD_TEST_STALL_AFTER_MS", "10000")],
    );
    manager.until("READY=1", 60, |m| m == "READY=1");
    // Readiness takes far less than the stall delay; 1 s interval → a ping every 0.5 s.
    let pings = manager
        .collect(Duration::from_secs(2))
        .into_iter()
        .filter(|m| m == "WATCHDOG=1")
        .count();
    assert!((2..=8).contains(&pings), "{pings} pings in 2 s");

    // After the stall the heartbeat ages past the interval and the pings stop.
    wait_for("the stall", 60, || {
        let quiet = manager.collect(Duration::from_secs(2));
        quiet.iter().all(|m| m != "WATCHDOG=1").then_some(())
    });
    assert!(stderr_of(&config).contains("no longer pinging the watchdog"));
    // Stalled is not dead: the admin API still answers.
    assert_eq!(get(port, "/healthz").status, 200);
    signal(&child, libc::SIGTERM);
    assert!(wait_exit(&mut child, 60).success());
}

#[test]
fn a_watchdog_pid_for_another_process_means_no_pings() {
    let dir = tempfile::tempdir().unwrap();
    let config = example_copy(dir.path(), free_port());
    let manager = Manager::new(dir.path());
    let mut child = start_notified(
        &config,
        &manager,
        &[("WATCHDOG_USEC", "1000000"), ("WATCHDOG_PID", "1")],
    );
    manager.until("READY=1", 60, |m| m == "READY=1");
    assert!(
        manager
            .collect(Duration::from_secs(2))
            .iter()
            .all(|m| m != "WATCHDOG=1")
    );
    signal(&child, libc::SIGTERM);
    assert!(wait_exit(&mut child, 60).success());
}

#[test]
fn sighup_reloads_a_valid_config_and_keeps_the_old_one_when_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = example_copy(dir.path(), port);
    let manager = Manager::new(dir.path());
    let mut child = start_notified(&config, &manager, &[]);
    manager.until("READY=1", 60, |m| m == "READY=1");
    wait_for("the first sync", 60, || (records(port) == Some(6)).then_some(()));

    // A valid change: the HR link captures every second instead of every five.
    let original = std::fs::read_to_string(&config).unwrap();
    let faster = original.replacen("capture = { interval_secs = 5 }", "capture = { interval_secs = 1 }", 1);
    assert_ne!(faster, original);
    std::fs::write(&config, &faster).unwrap();
    signal(&child, libc::SIGHUP);
    let reloading = manager.until("RELOADING=1", 30, |m| m.starts_with("RELOADING=1"));
    assert!(reloading.contains("\nMONOTONIC_USEC="), "{reloading}");
    manager.until("READY=1 after the reload", 60, |m| m == "READY=1");
    assert_eq!(get(port, "/readyz").status, 200);
    let status = get(port, "/api/v1/status").json();
    assert_eq!(status["ready"], true);
    assert_eq!(status["links"].as_object().map(|l| l.len()), Some(2), "{status}");
    assert_eq!(status["last_reload"]["ok"], true, "{status}");

    // The reloaded engine keeps syncing from its checkpoints: a new employee is merged,
    // the old ones are not captured twice.
    std::fs::write(
        dir.path().join("inbox/hr/employees-2026-11-27.csv"),
        "employee_id,first,last,email,job_title,phone\n1950,Frances,Allen,frances.allen@example.com,Compiler Researcher,(212) 555-0199\n",
    )
    .unwrap();
    wait_for("the new employee", 60, || (records(port) == Some(7)).then_some(()));

    // An invalid change: the daemon keeps running on the previous configuration.
    std::fs::write(&config, faster.replace("[state]", "[state]\nno_such_key = 1")).unwrap();
    signal(&child, libc::SIGHUP);
    let failed = manager.until("a status naming the failed reload", 30, |m| {
        m.starts_with("STATUS=") && m.contains("reload failed")
    });
    assert!(failed.contains("running the previous configuration"), "{failed}");
    assert!(
        child.try_wait().unwrap().is_none(),
        "the daemon died on an invalid config"
    );
    assert_eq!(get(port, "/readyz").status, 200);
    assert_eq!(records(port), Some(7));
    let status = get(port, "/api/v1/status").json();
    assert_eq!(status["last_reload"]["ok"], false, "{status}");
    assert_eq!(status["last_reload"]["detail"], "configuration unreadable", "{status}");

    signal(&child, libc::SIGTERM);
    manager.until("STOPPING=1", 30, |m| m == "STOPPING=1");
    assert!(wait_exit(&mut child, 60).success(), "{}", stderr_of(&config));
}

/// The unit with ExecStart pointing at the built binary, in a fresh directory.
fn unit_copy(dir: &Path) -> std::path::PathBuf {
    let unit = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/concord.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/concord "));
    let unit = unit.replace("/usr/local/bin/concord", env!("CARGO_BIN_EXE_concord"));
    let path = dir.join("concord.service");
    std::fs::write(&path, unit).unwrap();
    path
}

#[test]
fn unit_file_verifies_and_scores_at_most_1_5() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(dir.path());
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze runs");
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );

    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze runs");
    let out = String::from_utf8_lossy(&security.stdout);
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level: {out}{}", String::from_utf8_lossy(&security.stderr)));
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable exposure line: {line}"));
    assert!(score <= 1.5, "exposure {score} > 1.5:\n{out}");
}

#[test]
fn example_service_config_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = std::fs::read_to_string(root.join("systemd/concord.toml.example")).unwrap();
    assert!(example.contains("[state]\ndir = \"/var/lib/concord\""));
    let local = example
        .replace(
            "/usr/local/share/concord/schemas",
            &root.join("schemas").display().to_string(),
        )
        .replace("/var/lib/concord", &dir.path().display().to_string());
    let path = dir.path().join("concord.toml");
    std::fs::write(&path, local).unwrap();
    let out = concord(&["check", "--config"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
