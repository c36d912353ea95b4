//! systemd's notify protocol: datagrams like `READY=1` to `$NOTIFY_SOCKET`, and the
//! watchdog interval from `$WATCHDOG_USEC`. Without `$NOTIFY_SOCKET` (not run by systemd,
//! or not `Type=notify`) every call is a no-op.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where notifications go, if anywhere.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier {
            target: None,
            watchdog: None,
        }
    }

    /// A notifier that sends to the datagram socket at `path` and expects `WATCHDOG=1`
    /// within `watchdog` (as `$WATCHDOG_USEC` says), for tests and embedders.
    pub fn to_socket(
        path: &std::path::Path,
        watchdog: Option<Duration>,
    ) -> std::io::Result<Notifier> {
        let addr = SocketAddr::from_pathname(path)?;
        let sock = UnixDatagram::unbound()?;
        Ok(Notifier {
            target: Some((sock, addr)),
            watchdog,
        })
    }

    /// Reads `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID` of this process.
    pub fn from_env() -> Notifier {
        let target = std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|s| !s.is_empty())
            .and_then(|path| {
                let addr = if let Some(name) = path.strip_prefix('@') {
                    use std::os::linux::net::SocketAddrExt;
                    SocketAddr::from_abstract_name(name.as_bytes()).ok()?
                } else {
                    SocketAddr::from_pathname(&path).ok()?
                };
                let sock = UnixDatagram::unbound().ok()?;
                Some((sock, addr))
            });
        let pid_ok = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|p| p == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|u| *u > 0 && pid_ok)
            .map(Duration::from_micros);
        Notifier { target, watchdog }
    }

    /// Whether a notify socket is set.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one notification (e.g. "READY=1\nSTATUS=serving"); errors are logged, not
    /// returned: a lost notification must not stop the daemon.
    pub fn notify(&self, message: &str) {
        if let Some((sock, addr)) = &self.target
            && let Err(e) = sock.send_to_addr(message.as_bytes(), addr)
        {
            tracing::warn!("sd_notify {message:?}: {e}");
        }
    }

    /// How often to send `WATCHDOG=1`: half the interval systemd expects, if it expects any.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.target.as_ref()?;
        self.watchdog.map(|w| w / 2)
    }
}
