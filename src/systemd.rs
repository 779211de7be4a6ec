//! The systemd notification protocol (`sd_notify`): `READY=1`, `STATUS=…`, `WATCHDOG=1`,
//! `RELOADING=1` and `STOPPING=1` sent as datagrams to `$NOTIFY_SOCKET`, and the watchdog interval
//! from `$WATCHDOG_USEC`. Everything is a no-op when the daemon does not run under systemd.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Where notifications go: a path, or a name in Linux's abstract socket namespace (`@name`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Address {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

/// Sends notifications to systemd. Cheap to clone; a clone shares the socket.
#[derive(Clone, Default)]
pub struct Notifier {
    inner: Option<Arc<Inner>>,
    watchdog: Option<Duration>,
}

struct Inner {
    socket: UnixDatagram,
    address: Address,
}

impl Notifier {
    /// From the environment systemd gives a `Type=notify` service; a no-op notifier without
    /// `$NOTIFY_SOCKET`. A socket that cannot be created is logged and notifications are skipped.
    pub fn from_env() -> Notifier {
        let watchdog = watchdog_interval(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        let Some(address) = std::env::var_os("NOTIFY_SOCKET").and_then(|v| parse_address(&v))
        else {
            return Notifier {
                inner: None,
                watchdog,
            };
        };
        match UnixDatagram::unbound() {
            Ok(socket) => Notifier {
                inner: Some(Arc::new(Inner { socket, address })),
                watchdog,
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot create the systemd notification socket; not notifying");
                Notifier {
                    inner: None,
                    watchdog,
                }
            }
        }
    }

    /// Whether notifications go anywhere.
    pub fn is_active(&self) -> bool {
        self.inner.is_some()
    }

    /// How often systemd expects `WATCHDOG=1` (`WatchdogSec=`), if it does.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// The service is up: the journal is open and recovery has run.
    pub fn ready(&self) {
        self.send("READY=1");
    }

    /// A one-line summary shown by `systemctl status`.
    pub fn status(&self, status: &str) {
        // One line: a newline would start another assignment.
        let line = status.replace('\n', " ");
        self.send(&format!("STATUS={line}"));
    }

    /// The work loops are alive.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    /// A configuration reload started; [`Notifier::ready`] ends it.
    pub fn reloading(&self) {
        let monotonic = monotonic_usec();
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={monotonic}"));
    }

    /// The service is shutting down.
    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    fn send(&self, message: &str) {
        let Some(inner) = &self.inner else { return };
        let sent = match &inner.address {
            Address::Path(path) => inner.socket.send_to(message.as_bytes(), path),
            Address::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name)
                    .and_then(|addr| inner.socket.send_to_addr(message.as_bytes(), &addr))
            }
        };
        if let Err(e) = sent {
            tracing::debug!(error = %e, message, "systemd notification not delivered");
        }
    }
}

/// `$NOTIFY_SOCKET`: an absolute path or `@abstract-name`; anything else (e.g. `vsock:`) is not
/// supported and ignored.
fn parse_address(value: &std::ffi::OsStr) -> Option<Address> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = value.as_bytes();
    match bytes.first()? {
        b'/' => Some(Address::Path(PathBuf::from(value))),
        b'@' => Some(Address::Abstract(bytes[1..].to_vec())),
        _ => None,
    }
}

/// `$WATCHDOG_USEC`, when `$WATCHDOG_PID` is unset or names this process.
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(own_pid)
    {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// `CLOCK_MONOTONIC` in microseconds: the clock `RELOADING=1`'s `MONOTONIC_USEC=` is read on.
fn monotonic_usec() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64) * 1_000_000 + (t.tv_nsec as u64) / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn addresses() {
        assert_eq!(
            parse_address(OsStr::new("/run/systemd/notify")),
            Some(Address::Path("/run/systemd/notify".into()))
        );
        assert_eq!(
            parse_address(OsStr::new("@sd-notify")),
            Some(Address::Abstract(b"sd-notify".to_vec()))
        );
        assert_eq!(parse_address(OsStr::new("vsock:2:1234")), None);
        assert_eq!(parse_address(OsStr::new("")), None);
    }

    #[test]
    fn watchdog_only_for_this_process() {
        assert_eq!(
            watchdog_interval(Some("30000000"), None, 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_interval(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(watchdog_interval(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
    }

    #[test]
    fn messages_reach_a_socket_and_status_stays_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier {
            inner: Some(Arc::new(Inner {
                socket: UnixDatagram::unbound().unwrap(),
                address: Address::Path(path),
            })),
            watchdog: None,
        };
        notifier.ready();
        notifier.status("main: 3 unsettled\nsecond line");
        notifier.reloading();
        let mut buf = [0u8; 256];
        let mut next = || {
            let n = listener.recv(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };
        assert_eq!(next(), "READY=1");
        assert_eq!(next(), "STATUS=main: 3 unsettled second line");
        let reloading = next();
        assert!(
            reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
            "{reloading}"
        );
        // Without a socket nothing happens.
        Notifier::default().ready();
    }
}
