//! The status API: HTTP/JSON on a unix socket (mode 0660), and its client.
//!
//! Routes: `GET /status` (the document in [`wire`]), `GET /metrics` (Prometheus text),
//! `GET /health` (200 "ok" while the daemon runs). Requests read the latest state from
//! `watch` channels and do no other I/O. When a reload applies a config with another
//! `socket`, [`serve`] binds the new path, serves it and removes the old one; if the new
//! path cannot be bound it keeps the old one and says why in `daemon.socket_error`.
//!
//! Invariants: only this module (in [`wire`]) derives `Serialize` for daemon state.

pub mod http;
pub mod wire;

use std::convert::Infallible;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tokio::sync::watch;

use crate::supervisor::Status;
use crate::supervisor::stats::EngineMetrics;

/// Status connections served at once (more are closed when accepted).
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Another daemon answers on the socket.
    #[error("another expertd is running: {0} answers")]
    InUse(PathBuf),
    /// The socket could not be made.
    #[error("cannot create status socket {path}: {err}")]
    Bind { path: PathBuf, err: std::io::Error },
}

/// Makes `dir` (and its missing parents) and checks that nobody else controls it: it and
/// its parent must be real directories owned by this user or root, and not writable by
/// everyone unless sticky (like /tmp). Otherwise whoever does could replace what the
/// daemon keeps there (a status socket that answers with made-up state, a probe cache
/// that steers the plan): `/tmp/expertd-UID`, the fallback when no runtime or state
/// directory is known, could have been made by another user first.
pub fn trusted_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    std::fs::create_dir_all(dir)?;
    let me = rustix::process::geteuid().as_raw();
    for d in [Some(dir), dir.parent()].into_iter().flatten() {
        if d.as_os_str().is_empty() {
            continue;
        }
        let meta = std::fs::symlink_metadata(d)?;
        let why = if !meta.is_dir() {
            Some("is not a directory (a symlink is not followed)".to_string())
        } else if meta.uid() != me && meta.uid() != 0 {
            Some(format!(
                "belongs to uid {}, not this user ({me}) or root",
                meta.uid()
            ))
        } else if meta.mode() & 0o002 != 0 && meta.mode() & 0o1000 == 0 {
            Some("is writable by every user (and not sticky)".to_string())
        } else {
            None
        };
        if let Some(why) = why {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{} {why}: another user could replace what expertd keeps there",
                    d.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Binds the status socket: makes its directory (which must be [`trusted_dir`]), replaces
/// a stale socket (one nobody answers on), and sets mode 0660.
pub async fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    let err = |err| ApiError::Bind {
        path: path.to_path_buf(),
        err,
    };
    if let Some(dir) = path.parent() {
        trusted_dir(dir).map_err(err)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            )));
        }
        match tokio::net::UnixStream::connect(path).await {
            Ok(_) => return Err(ApiError::InUse(path.to_path_buf())),
            // Nobody listens: a socket a crashed daemon left.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            // Anything else (a full accept queue, no permission) does not say that nobody
            // listens: removing it could orphan a running daemon's socket.
            Err(e) => {
                return Err(err(std::io::Error::new(
                    e.kind(),
                    format!("exists, and whether a daemon listens on it is unknown ({e})"),
                )));
            }
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    Ok(listener)
}

/// What a request handler reads.
#[derive(Clone)]
pub struct Sources {
    pub status: watch::Receiver<Status>,
    pub metrics: watch::Receiver<EngineMetrics>,
    /// The socket being served.
    pub socket: PathBuf,
    /// Why the socket the applied config names is not the one being served, if it is not.
    pub socket_error: Option<String>,
}

fn respond(status: u16, content_type: &str, body: String) -> hyper::Response<Full<Bytes>> {
    let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Answers one request.
pub fn handle(method: &hyper::Method, path: &str, src: &Sources) -> hyper::Response<Full<Bytes>> {
    if method != hyper::Method::GET {
        return respond(405, "text/plain", "only GET\n".into());
    }
    match path {
        "/status" => {
            let doc = {
                let s = src.status.borrow();
                let m = src.metrics.borrow();
                wire::status_doc(&s, &m, &src.socket, src.socket_error.as_deref())
            };
            match serde_json::to_string_pretty(&doc) {
                Ok(mut body) => {
                    body.push('\n');
                    respond(200, "application/json", body)
                }
                Err(e) => respond(500, "text/plain", format!("{e}\n")),
            }
        }
        "/metrics" => {
            let body = {
                let s = src.status.borrow();
                let m = src.metrics.borrow();
                wire::metrics_text(&s, &m)
            };
            respond(200, "text/plain; version=0.0.4", body)
        }
        "/health" => respond(200, "text/plain", "ok\n".into()),
        _ => respond(
            404,
            "text/plain",
            "not found: try /status, /metrics, /health\n".into(),
        ),
    }
}

/// Serves requests until `shutdown` resolves, moving to the socket the status names
/// ([`Status::socket`]) when it changes. Returns the socket served last (for its removal).
pub async fn serve(
    mut listener: UnixListener,
    mut src: Sources,
    shutdown: impl std::future::Future<Output = ()>,
) -> PathBuf {
    tokio::pin!(shutdown);
    let mut status = src.status.clone();
    // False once the supervisor is gone (no more changes can come).
    let mut status_open = true;
    // A socket that could not be bound; tried again after the config names another or
    // on the next reload (its cause may have been fixed).
    let mut failed: Option<PathBuf> = None;
    let mut reloads = status.borrow().reloads;
    // Connections served at once: more are closed at once, so that clients that open
    // many and never finish a request cannot use up the daemon's file descriptors (the
    // engine's health checks need some).
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return src.socket,
            r = status.changed(), if status_open => {
                if r.is_err() {
                    status_open = false;
                    continue;
                }
                let (wanted, now) = {
                    let st = status.borrow_and_update();
                    (st.socket.clone(), st.reloads)
                };
                if now != reloads {
                    reloads = now;
                    failed = None;
                }
                if let Some(l) = move_socket(&wanted, &mut src, &mut failed).await {
                    listener = l;
                }
                continue;
            }
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("status socket accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!("status socket: {MAX_CONNECTIONS} connections open, one closed");
            continue;
        };
        let src = src.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let resp = handle(req.method(), req.uri().path(), &src);
                    async move { Ok::<_, Infallible>(resp) }
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = tokio::time::timeout(Duration::from_secs(30), conn).await {
                tracing::debug!("status connection: {e}");
            }
        });
    }
}

/// Binds `wanted` if it is not the socket being served and did not fail already (`failed`);
/// on success removes the old socket and returns the new listener.
async fn move_socket(
    wanted: &Path,
    src: &mut Sources,
    failed: &mut Option<PathBuf>,
) -> Option<UnixListener> {
    if wanted == src.socket {
        *failed = None;
        src.socket_error = None;
        return None;
    }
    if failed.as_deref() == Some(wanted) {
        return None;
    }
    match bind(wanted).await {
        Ok(l) => {
            tracing::info!(
                "status socket moved from {} to {}",
                src.socket.display(),
                wanted.display()
            );
            let old = std::mem::replace(&mut src.socket, wanted.to_path_buf());
            let _ = std::fs::remove_file(&old);
            *failed = None;
            src.socket_error = None;
            Some(l)
        }
        Err(e) => {
            let msg = format!(
                "socket {} not applied, still serving {}: {e}",
                wanted.display(),
                src.socket.display()
            );
            tracing::error!("{msg}");
            *failed = Some(wanted.to_path_buf());
            src.socket_error = Some(msg);
            None
        }
    }
}

/// Why a client got no status.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No daemon answered on any of the sockets.
    #[error("no expertd answers on {}: {last}", tried.join(", "))]
    Unreachable { tried: Vec<String>, last: String },
    /// A socket exists but this user may not connect to it (not in the socket's group).
    #[error(
        "{socket}: permission denied: expertd's status socket is readable by its owner and group (mode 0660); run as a member of its group, or as root"
    )]
    Denied { socket: String },
    /// The daemon answered with an error.
    #[error("expertd answered HTTP {status}: {body}")]
    Status { status: u16, body: String },
}

/// Fetches `path` from the first socket that answers.
pub async fn get(sockets: &[PathBuf], path: &str) -> Result<String, ClientError> {
    let mut last = String::from("no socket configured");
    for s in sockets {
        match http::unix_request(s, "GET", path, Duration::from_secs(5)).await {
            Ok(r) if r.status == 200 => return Ok(r.text()),
            Ok(r) => {
                return Err(ClientError::Status {
                    status: r.status,
                    body: r.text(),
                });
            }
            Err(http::HttpError::Connect { err, .. })
                if err.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                return Err(ClientError::Denied {
                    socket: s.display().to_string(),
                });
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(ClientError::Unreachable {
        tried: sockets.iter().map(|p| p.display().to_string()).collect(),
        last,
    })
}

/// Blocking forms of the clients, for callers without an async runtime (tests, scripts).
pub mod blocking {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::ClientError;
    use super::http::{HttpError, Response};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread tokio runtime")
    }

    /// [`super::get`], blocking.
    pub fn get(sockets: &[PathBuf], path: &str) -> Result<String, ClientError> {
        runtime().block_on(super::get(sockets, path))
    }

    /// [`super::http::tcp_request`], blocking.
    pub fn tcp_request(
        host: &str,
        port: u16,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        bearer: Option<&str>,
        timeout: Duration,
    ) -> Result<Response, HttpError> {
        runtime().block_on(super::http::tcp_request(
            host, port, method, path, body, bearer, timeout,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::AsyncReadExt;

    fn sources(socket: &Path) -> (Sources, watch::Sender<Status>) {
        let config = crate::config::Config::parse(
            "model = \"/srv/m.gguf\"",
            Path::new("/etc/expertd/expertd.toml"),
            &crate::config::ConfigEnv::default(),
        )
        .unwrap();
        let (tx, status) = watch::channel(crate::supervisor::Supervisor::initial_status(&config));
        let (_mtx, metrics) = watch::channel(EngineMetrics::default());
        let src = Sources {
            status,
            metrics,
            socket: socket.to_path_buf(),
            socket_error: None,
        };
        (src, tx)
    }

    /// Clients that open connections and never send a request cannot hold more than
    /// MAX_CONNECTIONS of the daemon's descriptors, and each one only for the header
    /// timeout; the status answers again once they are gone.
    #[tokio::test]
    async fn idle_connections_are_capped_and_timed_out() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let listener = bind(&sock).await.unwrap();
        let (src, _tx) = sources(&sock);
        let server = tokio::spawn(serve(listener, src, std::future::pending()));
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(tokio::net::UnixStream::connect(&sock).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        // One more is closed at once: it reads end-of-file, not a hang.
        let mut extra = tokio::net::UnixStream::connect(&sock).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut buf))
            .await
            .expect("a connection over the cap is closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
        // The idle ones are closed after the header timeout.
        let mut first = idle.remove(0);
        let n = tokio::time::timeout(HEADER_TIMEOUT * 2, first.read(&mut buf))
            .await
            .expect("an idle connection is closed after the header timeout")
            .unwrap_or(0);
        assert_eq!(n, 0);
        drop(idle);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = http::unix_request(&sock, "GET", "/health", Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        server.abort();
    }

    /// A socket nobody listens on (a crashed daemon's) is replaced; one a daemon listens
    /// on is not.
    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        assert!(sock.exists());
        let live = bind(&sock).await.expect("a stale socket is replaced");
        match bind(&sock).await {
            Err(ApiError::InUse(p)) => assert_eq!(p, sock),
            other => panic!("a live socket was not reported in use: {other:?}"),
        }
        drop(live);
    }

    /// A directory another user could write to or own is refused for the socket and the
    /// state; one of this user's is made and taken.
    #[tokio::test]
    async fn a_directory_others_control_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = trusted_dir(&open).unwrap_err();
        assert!(e.to_string().contains("writable by every user"), "{e}");
        let e = bind(&open.join("status.sock")).await.unwrap_err();
        assert!(e.to_string().contains("writable by every user"), "{e}");
        // Its subdirectory is refused too: the open parent could swap it.
        let e = trusted_dir(&open.join("state")).unwrap_err();
        assert!(e.to_string().contains("writable by every user"), "{e}");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        let e = trusted_dir(&link).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        if rustix::process::geteuid().is_root() {
            let theirs = dir.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
            let e = trusted_dir(&theirs).unwrap_err();
            assert!(e.to_string().contains("belongs to uid 65534"), "{e}");
        }
        let mine = dir.path().join("a/b");
        trusted_dir(&mine).unwrap();
        assert!(mine.is_dir());
    }
}
