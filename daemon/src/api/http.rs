//! A minimal HTTP/1.1 client over any byte stream (TCP to the engine and Ollama, a unix
//! socket to the daemon): one request per connection, whole body in memory, bounded time.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Could not connect.
    #[error("cannot connect to {target}: {err}")]
    Connect { target: String, err: std::io::Error },
    /// The exchange failed after connecting.
    #[error("HTTP to {target}: {message}")]
    Protocol { target: String, message: String },
    /// No complete response in time.
    #[error("HTTP to {target}: no response within {timeout:?}")]
    Timeout { target: String, timeout: Duration },
}

/// A response: status code and body.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    /// The body as (lossy) UTF-8 text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request on `io` and reads the whole response. `host` goes into the Host
/// header; `target` only into error messages.
#[allow(clippy::too_many_arguments)] // the request's parts, each one plain data
pub async fn request<S>(
    io: S,
    target: &str,
    host: &str,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    bearer: Option<&str>,
    timeout: Duration,
) -> Result<Response, HttpError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let proto = |message: String| HttpError::Protocol {
        target: target.to_string(),
        message,
    };
    let exchange = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| proto(e.to_string()))?;
        // The connection task ends when `sender` is dropped or the peer closes.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, host);
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        if let Some(key) = bearer {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| proto(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| proto(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| proto(e.to_string()))?
            .to_bytes()
            .to_vec();
        Ok(Response { status, body })
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(HttpError::Timeout {
            target: target.to_string(),
            timeout,
        }),
    }
}

/// One request to `host:port` over TCP.
pub async fn tcp_request(
    host: &str,
    port: u16,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    bearer: Option<&str>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    let target = format!("{host}:{port}");
    let connect = tokio::net::TcpStream::connect((host, port));
    let stream = match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(err)) => return Err(HttpError::Connect { target, err }),
        Err(_) => return Err(HttpError::Timeout { target, timeout }),
    };
    let host_header = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        target.clone()
    };
    request(
        stream,
        &target,
        &host_header,
        method,
        path,
        body,
        bearer,
        timeout,
    )
    .await
}

/// One request to a unix socket.
pub async fn unix_request(
    socket: &std::path::Path,
    method: &str,
    path: &str,
    timeout: Duration,
) -> Result<Response, HttpError> {
    let target = socket.display().to_string();
    let stream = match tokio::net::UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(err) => return Err(HttpError::Connect { target, err }),
    };
    request(
        stream,
        &target,
        "localhost",
        method,
        path,
        None,
        None,
        timeout,
    )
    .await
}
