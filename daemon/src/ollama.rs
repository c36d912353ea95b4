//! Ollama: resolving `ollama:NAME[:TAG]` to the GGUF blob in Ollama's model store, and a
//! small client of Ollama's HTTP API (`/api/version`, `/api/show`, `/api/tags`,
//! `/api/create`).
//!
//! Store layout (Ollama 0.30+, see DESIGN.md §6):
//! `$OLLAMA_MODELS/manifests/<host>/<namespace>/<model>/<tag>` is a JSON manifest whose
//! layer with media type `application/vnd.ollama.image.model` names the GGUF blob
//! `$OLLAMA_MODELS/blobs/sha256-<hex>`.
//!
//! Invariants: nothing here writes to the store or changes a user's model; applying a plan
//! to Ollama only ever creates a *derived* model under a new name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::api::http::{self, HttpError};

/// Media type of the layer that holds the GGUF weights.
pub const MODEL_MEDIA_TYPE: &str = "application/vnd.ollama.image.model";
const DEFAULT_REGISTRY: &str = "registry.ollama.ai";
const DEFAULT_NAMESPACE: &str = "library";
const DEFAULT_TAG: &str = "latest";
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an Ollama model could not be resolved or an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum OllamaError {
    /// The name is not an Ollama model name.
    #[error("bad Ollama model name {name:?}: {reason}")]
    BadName { name: String, reason: String },
    /// The manifest is missing from the store.
    #[error(
        "Ollama model {name} not in the store: no manifest at {path} (is ollama.models_dir right? `ollama pull {name}` first)"
    )]
    NoManifest { name: String, path: PathBuf },
    /// The manifest could not be read or parsed.
    #[error("Ollama manifest {path}: {reason}")]
    BadManifest { path: PathBuf, reason: String },
    /// The manifest's model blob is missing or has the wrong size.
    #[error("Ollama blob {path}: {reason}")]
    BadBlob { path: PathBuf, reason: String },
    /// The server answered, but not with what was asked.
    #[error("Ollama API {url}{endpoint}: {reason}")]
    Api {
        url: String,
        endpoint: &'static str,
        reason: String,
    },
    /// `ollama.url` is not an http URL.
    #[error("bad Ollama URL: {0}")]
    BadUrl(String),
    /// The server could not be reached.
    #[error("Ollama API: {0}")]
    Http(HttpError),
}

impl From<HttpError> for OllamaError {
    fn from(e: HttpError) -> Self {
        OllamaError::Http(e)
    }
}

/// A parsed model reference `[host/][namespace/]model[:tag]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelRef {
    pub host: String,
    pub namespace: String,
    pub model: String,
    pub tag: String,
}

impl ModelRef {
    /// Parses a name the way Ollama does: defaults `registry.ollama.ai`, `library`, `latest`.
    pub fn parse(name: &str) -> Result<ModelRef, String> {
        let name = name.trim();
        if name.is_empty() {
            return Err("empty Ollama model name (expected \"ollama:NAME[:TAG]\")".into());
        }
        // The tag is after the last ':' that follows the last '/' (a host may have a port).
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (path, tag) = match name[last_slash..].rfind(':') {
            Some(i) => (&name[..last_slash + i], &name[last_slash + i + 1..]),
            None => (name, DEFAULT_TAG),
        };
        let parts: Vec<&str> = path.split('/').collect();
        let (host, namespace, model) = match parts.as_slice() {
            [m] => (DEFAULT_REGISTRY, DEFAULT_NAMESPACE, *m),
            [ns, m] => (DEFAULT_REGISTRY, *ns, *m),
            [h, ns, m] => (*h, *ns, *m),
            _ => return Err(format!("too many '/' in Ollama model name {name:?}")),
        };
        let ok = |s: &str, extra: &str| {
            !s.is_empty()
                && !s.starts_with('.')
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c) || extra.contains(c))
        };
        if !ok(host, ":") || !ok(namespace, "") || !ok(model, "") || !ok(tag, "") {
            return Err(format!(
                "bad Ollama model name {name:?} (expected [host/][namespace/]model[:tag] of letters, digits, '.', '_', '-')"
            ));
        }
        Ok(ModelRef {
            host: host.into(),
            namespace: namespace.into(),
            model: model.into(),
            tag: tag.into(),
        })
    }

    /// The same reference in lower case: Ollama treats names that differ only in case
    /// as one model.
    pub fn lowercase(&self) -> ModelRef {
        ModelRef {
            host: self.host.to_ascii_lowercase(),
            namespace: self.namespace.to_ascii_lowercase(),
            model: self.model.to_ascii_lowercase(),
            tag: self.tag.to_ascii_lowercase(),
        }
    }

    /// The manifest's path in a store.
    pub fn manifest_path(&self, store: &Path) -> PathBuf {
        store
            .join("manifests")
            .join(&self.host)
            .join(&self.namespace)
            .join(&self.model)
            .join(&self.tag)
    }

    /// The short name Ollama shows (`model:tag` for the default registry and namespace).
    pub fn short_name(&self) -> String {
        if self.host == DEFAULT_REGISTRY && self.namespace == DEFAULT_NAMESPACE {
            format!("{}:{}", self.model, self.tag)
        } else if self.host == DEFAULT_REGISTRY {
            format!("{}/{}:{}", self.namespace, self.model, self.tag)
        } else {
            format!(
                "{}/{}/{}:{}",
                self.host, self.namespace, self.model, self.tag
            )
        }
    }
}

#[derive(Debug, Deserialize)]
struct Manifest {
    layers: Vec<Layer>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Layer {
    media_type: String,
    digest: String,
    size: u64,
}

/// An `ollama:` model resolved to its GGUF blob.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    pub reference: ModelRef,
    /// The GGUF blob.
    pub gguf: PathBuf,
    /// `sha256:<hex>` of the blob.
    pub digest: String,
    pub size: u64,
    /// Ollama's version, when the API answered.
    pub server_version: Option<String>,
    /// `general.architecture` from `/api/show`, when the API answered.
    pub architecture: Option<String>,
    /// Why the API was not consulted, when it was not.
    pub note: Option<String>,
}

/// Finds the model's GGUF blob in `store` from its manifest (no network).
pub fn resolve_in_store(name: &str, store: &Path) -> Result<Resolved, OllamaError> {
    let reference = ModelRef::parse(name).map_err(|reason| OllamaError::BadName {
        name: name.into(),
        reason,
    })?;
    let manifest_path = reference.manifest_path(store);
    let text = match std::fs::read(&manifest_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(OllamaError::NoManifest {
                name: reference.short_name(),
                path: manifest_path,
            });
        }
        Err(e) => {
            return Err(OllamaError::BadManifest {
                path: manifest_path,
                reason: e.to_string(),
            });
        }
    };
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|e| OllamaError::BadManifest {
            path: manifest_path.clone(),
            reason: format!("not a manifest: {e}"),
        })?;
    let layer = manifest
        .layers
        .iter()
        .find(|l| l.media_type == MODEL_MEDIA_TYPE)
        .ok_or_else(|| OllamaError::BadManifest {
            path: manifest_path.clone(),
            reason: format!("no layer of media type {MODEL_MEDIA_TYPE}"),
        })?;
    let hex = layer
        .digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()))
        .ok_or_else(|| OllamaError::BadManifest {
            path: manifest_path.clone(),
            reason: format!(
                "model layer digest {:?} is not sha256:<64 hex>",
                layer.digest
            ),
        })?;
    let blob = store.join("blobs").join(format!("sha256-{hex}"));
    let meta = std::fs::metadata(&blob).map_err(|e| OllamaError::BadBlob {
        path: blob.clone(),
        reason: e.to_string(),
    })?;
    if meta.len() != layer.size {
        return Err(OllamaError::BadBlob {
            path: blob,
            reason: format!(
                "size {} but the manifest says {} (incomplete pull?)",
                meta.len(),
                layer.size
            ),
        });
    }
    Ok(Resolved {
        reference,
        gguf: blob,
        digest: layer.digest.clone(),
        size: layer.size,
        server_version: None,
        architecture: None,
        note: None,
    })
}

/// Resolves through the store and checks with the server: the server must know the model
/// (`/api/show`). When the server cannot be reached the store's answer stands, with a note
/// (the daemon runs its own engine on the blob; Ollama need not be running).
pub async fn resolve(name: &str, store: &Path, client: &Client) -> Result<Resolved, OllamaError> {
    let mut r = resolve_in_store(name, store)?;
    let version = match client.version().await {
        Ok(v) => v,
        Err(OllamaError::Http(e)) => {
            r.note = Some(format!(
                "Ollama API not reachable ({e}); resolved from the store only"
            ));
            return Ok(r);
        }
        Err(e) => return Err(e),
    };
    r.server_version = Some(version);
    let show = client.show(&r.reference.short_name()).await?;
    r.architecture = show
        .model_info
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .map(String::from);
    Ok(r)
}

/// `POST /api/show` answer (the parts expertd uses).
#[derive(Clone, Debug, Deserialize)]
pub struct ShowResponse {
    /// Raw GGUF metadata keys (`general.architecture`, `<arch>.block_count`, ...).
    #[serde(default)]
    pub model_info: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub details: serde_json::Value,
    #[serde(default)]
    pub modelfile: String,
}

/// One entry of `GET /api/tags`.
#[derive(Clone, Debug, Deserialize)]
pub struct TagModel {
    pub name: String,
    #[serde(default)]
    pub model: String,
    pub size: u64,
    pub digest: String,
    #[serde(default)]
    pub details: serde_json::Value,
}

#[derive(Debug, Deserialize)]
struct TagsResponse {
    models: Vec<TagModel>,
}

#[derive(Debug, Deserialize)]
struct VersionResponse {
    version: String,
}

/// Parameters of a derived model (`/api/create` `parameters`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DerivedParams {
    pub num_ctx: Option<u32>,
    pub num_gpu: Option<u32>,
    pub num_thread: Option<u32>,
    pub num_batch: Option<u32>,
}

/// Splits `http://host:port[/base]` into (host, port, base path without trailing '/').
pub fn parse_http_url(url: &str) -> Result<(String, u16, String), String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        format!("expected an http:// URL (https is not supported for a local API), got {url:?}")
    })?;
    let (authority, base) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    let (host, port) = if let Some(h) = authority.strip_prefix('[') {
        let end = h
            .find(']')
            .ok_or_else(|| format!("bad IPv6 address in {url:?}"))?;
        let port = h[end + 1..].strip_prefix(':');
        (&h[..end], port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("no host in {url:?}"));
    }
    let port = match port {
        None => 80,
        Some(p) => p.parse().map_err(|_| format!("bad port in {url:?}"))?,
    };
    Ok((host.to_string(), port, base.to_string()))
}

/// A client of one Ollama server.
#[derive(Clone, Debug)]
pub struct Client {
    url: String,
    host: String,
    port: u16,
    base: String,
}

impl Client {
    /// A client for `url` (e.g. "http://127.0.0.1:11434").
    pub fn new(url: &str) -> Result<Client, OllamaError> {
        let (host, port, base) = parse_http_url(url).map_err(OllamaError::BadUrl)?;
        Ok(Client {
            url: url.trim_end_matches('/').to_string(),
            host,
            port,
            base,
        })
    }

    async fn call(
        &self,
        method: &str,
        endpoint: &'static str,
        body: Option<serde_json::Value>,
    ) -> Result<Vec<u8>, OllamaError> {
        let body = body.map(|b| b.to_string().into_bytes());
        let path = format!("{}{}", self.base, endpoint);
        let resp = http::tcp_request(
            &self.host,
            self.port,
            method,
            &path,
            body,
            None,
            API_TIMEOUT,
        )
        .await?;
        if resp.status != 200 {
            let msg = serde_json::from_slice::<serde_json::Value>(&resp.body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
                .unwrap_or_else(|| resp.text());
            return Err(OllamaError::Api {
                url: self.url.clone(),
                endpoint,
                reason: format!("HTTP {}: {}", resp.status, msg.trim()),
            });
        }
        Ok(resp.body)
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        endpoint: &'static str,
        body: &[u8],
    ) -> Result<T, OllamaError> {
        serde_json::from_slice(body).map_err(|e| OllamaError::Api {
            url: self.url.clone(),
            endpoint,
            reason: format!("unexpected answer: {e}"),
        })
    }

    /// `GET /api/version`.
    pub async fn version(&self) -> Result<String, OllamaError> {
        let body = self.call("GET", "/api/version", None).await?;
        Ok(self
            .decode::<VersionResponse>("/api/version", &body)?
            .version)
    }

    /// `POST /api/show {model}`.
    pub async fn show(&self, model: &str) -> Result<ShowResponse, OllamaError> {
        let body = self
            .call(
                "POST",
                "/api/show",
                Some(serde_json::json!({ "model": model })),
            )
            .await?;
        self.decode("/api/show", &body)
    }

    /// `GET /api/tags`: the models the server has.
    pub async fn tags(&self) -> Result<Vec<TagModel>, OllamaError> {
        let body = self.call("GET", "/api/tags", None).await?;
        Ok(self.decode::<TagsResponse>("/api/tags", &body)?.models)
    }

    /// `POST /api/create {model: new, from, parameters, stream: false}`: a derived model
    /// that carries the plan; the user's model `from` is not changed.
    pub async fn create_derived(
        &self,
        new: &str,
        from: &str,
        params: &DerivedParams,
    ) -> Result<(), OllamaError> {
        let parse = |n: &str| {
            ModelRef::parse(n).map_err(|reason| OllamaError::BadName {
                name: n.into(),
                reason,
            })
        };
        // Ollama matches names case-insensitively (`qwen3:30b` and `Qwen3:30B` are one
        // model), so "the same name" does too.
        if parse(new)?.lowercase() == parse(from)?.lowercase() {
            return Err(OllamaError::BadName {
                name: new.into(),
                reason: "a derived model must have a new name (never overwrite the user's model)"
                    .into(),
            });
        }
        let mut p = serde_json::Map::new();
        let mut put = |k: &str, v: Option<u32>| {
            if let Some(v) = v {
                p.insert(k.into(), v.into());
            }
        };
        put("num_ctx", params.num_ctx);
        put("num_gpu", params.num_gpu);
        put("num_thread", params.num_thread);
        put("num_batch", params.num_batch);
        let req = serde_json::json!({
            "model": new,
            "from": from,
            "parameters": p,
            "stream": false,
        });
        let body = self.call("POST", "/api/create", Some(req)).await?;
        let v: serde_json::Value = self.decode("/api/create", &body)?;
        match v.get("status").and_then(|s| s.as_str()) {
            Some("success") => Ok(()),
            _ => Err(OllamaError::Api {
                url: self.url.clone(),
                endpoint: "/api/create",
                reason: format!("expected status \"success\", got {v}"),
            }),
        }
    }
}

/// Whether this Ollama version runs upstream llama-server and passes `LLAMA_ARG_*`
/// through (0.30 and later, DESIGN.md §6).
pub fn passes_llama_args(version: &str) -> bool {
    let mut it = version
        .trim_start_matches('v')
        .split(|c: char| !c.is_ascii_digit())
        .map(|s| s.parse::<u64>().unwrap_or(0));
    let major = it.next().unwrap_or(0);
    let minor = it.next().unwrap_or(0);
    (major, minor) >= (0, 30)
}

/// A systemd drop-in for `ollama.service` that hands the plan's placement to every model
/// Ollama loads (`LLAMA_ARG_*` reach its llama-server child in 0.30+).
pub fn render_dropin(env: &[(String, String)]) -> String {
    let mut s = String::from(
        "# Written by expertd: the plan's engine settings for Ollama's llama-server.\n\
         # Install as /etc/systemd/system/ollama.service.d/expertd.conf, then\n\
         # `systemctl daemon-reload && systemctl restart ollama`.\n[Service]\n",
    );
    for (k, v) in env {
        s.push_str(&format!("Environment=\"{k}={v}\"\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let r = ModelRef::parse("qwen3:30b").unwrap();
        assert_eq!(
            (
                r.host.as_str(),
                r.namespace.as_str(),
                r.model.as_str(),
                r.tag.as_str()
            ),
            ("registry.ollama.ai", "library", "qwen3", "30b")
        );
        assert_eq!(ModelRef::parse("gpt-oss").unwrap().tag, "latest");
        let r = ModelRef::parse("localhost:5000/me/m:q4").unwrap();
        assert_eq!((r.host.as_str(), r.tag.as_str()), ("localhost:5000", "q4"));
        assert!(ModelRef::parse("a/b/c/d").is_err());
        assert!(ModelRef::parse("../x").is_err());
        assert!(ModelRef::parse("").is_err());
    }

    #[test]
    fn urls_and_versions() {
        assert_eq!(
            parse_http_url("http://127.0.0.1:11434").unwrap(),
            ("127.0.0.1".into(), 11434, "".into())
        );
        assert_eq!(
            parse_http_url("http://[::1]:1/x/").unwrap(),
            ("::1".into(), 1, "/x".into())
        );
        assert!(parse_http_url("https://a").is_err());
        assert!(passes_llama_args("0.30.1"));
        assert!(passes_llama_args("1.0.0"));
        assert!(!passes_llama_args("0.12.6"));
    }
}
