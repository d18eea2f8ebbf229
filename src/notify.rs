//! Tells the service manager how the daemon is doing, over the `sd_notify` protocol,
//! so systemd knows when concord is ready, what it is doing, and when it has hung.
//!
//! Protocol facts (see [sd_notify(3)](https://www.freedesktop.org/software/systemd/man/latest/sd_notify.html)):
//! - The manager passes the path of a `SOCK_DGRAM` Unix socket in `NOTIFY_SOCKET`; a
//!   leading `@` names a socket in the abstract namespace (the `@` stands for a NUL byte).
//! - Each datagram holds newline-separated `KEY=VALUE` assignments: `READY=1`,
//!   `STATUS=<one line>`, `WATCHDOG=1`, `STOPPING=1`, `RELOADING=1`.
//! - With `Type=notify-reload` (systemd 253+), `RELOADING=1` must carry
//!   `MONOTONIC_USEC=` (CLOCK_MONOTONIC in microseconds) and the reload ends at the next
//!   `READY=1`; with `Type=notify` the extra field is ignored.
//! - `WATCHDOG_USEC` is the watchdog interval in microseconds; `WATCHDOG_PID`, when set,
//!   names the process it is meant for. The service pings `WATCHDOG=1` more often than
//!   the interval; half of it is the usual choice.
//!
//! Sending is best effort: a failure is logged once and never stops the daemon.

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    path: String,
    failed: AtomicBool,
}

impl Notifier {
    /// The notifier named by `NOTIFY_SOCKET`; `None` when it is unset or empty (not run
    /// by a service manager) or when no socket can be made.
    pub fn from_env() -> Option<Notifier> {
        let path = std::env::var("NOTIFY_SOCKET").ok().filter(|p| !p.is_empty())?;
        match UnixDatagram::unbound() {
            Ok(socket) => Some(Notifier {
                socket,
                path,
                failed: AtomicBool::new(false),
            }),
            Err(error) => {
                tracing::warn!(error = %error, "cannot create the notification socket; systemd is not told about readiness");
                None
            }
        }
    }

    /// Sends one datagram of `KEY=VALUE` lines.
    pub fn send(&self, message: &str) {
        if let Err(error) = self.send_to(message.as_bytes()) {
            if !self.failed.swap(true, Ordering::Relaxed) {
                tracing::warn!(socket = %self.path, error = %error, "cannot notify the service manager");
            }
        }
    }

    fn send_to(&self, message: &[u8]) -> std::io::Result<usize> {
        if let Some(name) = self.path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            self.socket.send_to_addr(message, &addr)
        } else {
            self.socket.send_to(message, &self.path)
        }
    }

    /// Startup is complete (or a reload has finished).
    pub fn ready(&self) {
        self.send("READY=1");
    }

    /// A one-line description of what the daemon is doing; line breaks become spaces.
    pub fn status(&self, line: &str) {
        self.send(&format!("STATUS={}", line.replace(['\n', '\r'], " ")));
    }

    /// The daemon is alive and making progress.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    /// Shutdown has begun.
    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// A configuration reload has begun; `READY=1` ends it.
    pub fn reloading(&self) {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    }
}

/// The watchdog interval the service manager expects pings within, from
/// `WATCHDOG_USEC`; `None` when unset, invalid, zero, or meant for another process.
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(own_pid) {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// CLOCK_MONOTONIC in microseconds, as `MONOTONIC_USEC=` wants it.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000)
        .saturating_add(ts.tv_nsec as u64 / 1_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_interval_reads_usec_and_checks_the_pid() {
        assert_eq!(
            watchdog_interval_from(Some("30000000"), None, 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_interval_from(Some("1000000"), Some("7"), 7),
            Some(Duration::from_secs(1))
        );
        assert_eq!(watchdog_interval_from(Some("1000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval_from(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval_from(None, None, 7), None);
    }

    fn receive(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a datagram arrives");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    fn notifier(path: &str) -> Notifier {
        Notifier {
            socket: UnixDatagram::unbound().expect("an unbound datagram socket"),
            path: path.to_string(),
            failed: AtomicBool::new(false),
        }
    }

    #[test]
    fn sends_each_message_to_a_path_socket() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("binding the fake manager socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        let n = notifier(path.to_str().expect("utf-8 temp path"));
        n.ready();
        assert_eq!(receive(&socket), "READY=1");
        n.status("6 records\n0 pending");
        assert_eq!(receive(&socket), "STATUS=6 records 0 pending");
        n.watchdog();
        assert_eq!(receive(&socket), "WATCHDOG=1");
        n.stopping();
        assert_eq!(receive(&socket), "STOPPING=1");
        n.reloading();
        let reloading = receive(&socket);
        let (first, second) = reloading.split_once('\n').expect("two lines");
        assert_eq!(first, "RELOADING=1");
        let usec: u64 = second
            .strip_prefix("MONOTONIC_USEC=")
            .expect("MONOTONIC_USEC")
            .parse()
            .expect("a number");
        assert!(usec > 0);
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("concord-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract address");
        let socket = UnixDatagram::bind_addr(&addr).expect("binding an abstract socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        notifier(&format!("@{name}")).ready();
        assert_eq!(receive(&socket), "READY=1");
    }

    #[test]
    fn a_missing_socket_is_not_fatal() {
        let n = notifier("/nonexistent/concord/notify.sock");
        n.ready();
        n.watchdog();
        assert!(n.failed.load(Ordering::Relaxed));
    }
}
