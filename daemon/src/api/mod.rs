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

/// Binds the status socket: makes its directory, replaces a stale socket (one nobody
/// answers on), and sets mode 0660.
pub async fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    let err = |err| ApiError::Bind {
        path: path.to_path_buf(),
        err,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            )));
        }
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ApiError::InUse(path.to_path_buf()));
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
    // A socket that could not be bound; tried again only after the config names another.
    let mut failed: Option<PathBuf> = None;
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return src.socket,
            r = status.changed(), if status_open => {
                if r.is_err() {
                    status_open = false;
                    continue;
                }
                let wanted = status.borrow_and_update().socket.clone();
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
        let src = src.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let resp = handle(req.method(), req.uri().path(), &src);
                    async move { Ok::<_, Infallible>(resp) }
                });
            let conn = hyper::server::conn::http1::Builder::new()
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
        timeout: Duration,
    ) -> Result<Response, HttpError> {
        runtime().block_on(super::http::tcp_request(
            host, port, method, path, body, timeout,
        ))
    }
}
