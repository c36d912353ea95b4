//! `ollama:NAME[:TAG]` resolution against a model store laid out exactly as Ollama lays it
//! out on disk, and the API client against a tiny HTTP server that answers `/api/version`,
//! `/api/show`, `/api/tags` and `/api/create` in Ollama's documented format.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use expertd::ollama::{self, Client, DerivedParams, OllamaError};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};

/// Writes a blob and returns its digest "sha256:<hex>".
fn blob(store: &Path, content: &[u8]) -> String {
    let hex: String = Sha256::digest(content)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::create_dir_all(store.join("blobs")).unwrap();
    std::fs::write(store.join("blobs").join(format!("sha256-{hex}")), content).unwrap();
    format!("sha256:{hex}")
}

/// Lays out one model as `ollama pull` does: GGUF, template and params blobs, a config
/// blob, and the manifest naming them. Returns the GGUF blob's path.
fn pull(store: &Path, ns: &str, model: &str, tag: &str, gguf: &[u8]) -> PathBuf {
    let model_digest = blob(store, gguf);
    let template = b"{{ .Prompt }}";
    let params = br#"{"stop":["<|im_end|>"]}"#;
    let config = br#"{"model_format":"gguf","model_family":"qwen3moe","file_type":"Q4_K_M"}"#;
    let t = blob(store, template);
    let p = blob(store, params);
    let c = blob(store, config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": c, "size": config.len()},
        "layers": [
            {"mediaType": "application/vnd.ollama.image.model", "digest": model_digest, "size": gguf.len()},
            {"mediaType": "application/vnd.ollama.image.template", "digest": t, "size": template.len()},
            {"mediaType": "application/vnd.ollama.image.params", "digest": p, "size": params.len()}
        ]
    });
    let dir = store
        .join("manifests/registry.ollama.ai")
        .join(ns)
        .join(model);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(tag), serde_json::to_vec(&manifest).unwrap()).unwrap();
    let hex = model_digest.strip_prefix("sha256:").unwrap();
    store.join("blobs").join(format!("sha256-{hex}"))
}

/// What the fake server saw.
#[derive(Default)]
struct Seen {
    requests: Vec<(String, String, serde_json::Value)>,
}

/// A fake Ollama that knows the models in `known`; returns its URL.
async fn fake_ollama(known: Vec<&'static str>, seen: Arc<Mutex<Seen>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let known = Arc::new(known);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let known = known.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let known = known.clone();
                        let seen = seen.clone();
                        async move {
                            let method = req.method().to_string();
                            let path = req.uri().path().to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let json: serde_json::Value =
                                serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                            seen.lock().unwrap().requests.push((
                                method.clone(),
                                path.clone(),
                                json.clone(),
                            ));
                            let (status, reply) = answer(&method, &path, &json, &known);
                            let mut r =
                                hyper::Response::new(Full::new(Bytes::from(reply.to_string())));
                            *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            Ok::<_, Infallible>(r)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    url
}

fn answer(
    method: &str,
    path: &str,
    body: &serde_json::Value,
    known: &[&str],
) -> (u16, serde_json::Value) {
    let details = serde_json::json!({
        "parent_model": "", "format": "gguf", "family": "qwen3moe", "families": ["qwen3moe"],
        "parameter_size": "30.5B", "quantization_level": "Q4_K_M"
    });
    match (method, path) {
        ("GET", "/api/version") => (200, serde_json::json!({"version": "0.30.2"})),
        ("GET", "/api/tags") => (
            200,
            serde_json::json!({"models": known.iter().map(|n| serde_json::json!({
                "name": n, "model": n, "modified_at": "2026-10-01T12:00:00Z",
                "size": 18556688736u64,
                "digest": "0c8f5e0f2f0ea8a0fd2e7eb8b5e4bd6fd2a2e1c0f5f1d3e0b9c1a2d3e4f5a6b7",
                "details": details
            })).collect::<Vec<_>>()}),
        ),
        ("POST", "/api/show") => {
            let name = body["model"].as_str().unwrap_or("");
            if known.contains(&name) {
                (
                    200,
                    serde_json::json!({
                        "license": "Apache-2.0",
                        "modelfile": "# Modelfile generated by \"ollama show\"\nFROM /blobs/sha256-x\n",
                        "parameters": "stop \"<|im_end|>\"",
                        "template": "{{ .Prompt }}",
                        "details": details,
                        "model_info": {
                            "general.architecture": "qwen3moe",
                            "general.parameter_count": 30532122624u64,
                            "qwen3moe.block_count": 48,
                            "qwen3moe.context_length": 40960,
                            "qwen3moe.embedding_length": 2048,
                            "qwen3moe.expert_count": 128,
                            "qwen3moe.expert_used_count": 8,
                            "tokenizer.ggml.tokens": null
                        },
                        "tensors": [{"name": "blk.0.ffn_gate_exps.weight", "type": "Q4_K", "shape": [2048, 768, 128]}],
                        "capabilities": ["completion", "tools"],
                        "modified_at": "2026-10-01T12:00:00Z"
                    }),
                )
            } else {
                (
                    404,
                    serde_json::json!({"error": format!("model '{name}' not found")}),
                )
            }
        }
        ("POST", "/api/create") => (200, serde_json::json!({"status": "success"})),
        _ => (404, serde_json::json!({"error": "not found"})),
    }
}

#[test]
fn store_resolution_follows_the_manifest() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path();
    let gguf = pull(store, "library", "qwen3", "30b", b"GGUF fake model bytes");
    pull(store, "me", "custom", "q4", b"GGUF another");
    let r = ollama::resolve_in_store("qwen3:30b", store).unwrap();
    assert_eq!(r.gguf, gguf);
    assert_eq!(r.size, 21);
    assert!(r.digest.starts_with("sha256:"));
    assert_eq!(r.reference.short_name(), "qwen3:30b");
    let r = ollama::resolve_in_store("me/custom:q4", store).unwrap();
    assert!(r.gguf.starts_with(store.join("blobs")));

    // Missing tag: names the manifest path it looked for and how to fix it.
    let e = ollama::resolve_in_store("qwen3", store).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, OllamaError::NoManifest { .. }), "{msg}");
    assert!(
        msg.contains("manifests/registry.ollama.ai/library/qwen3/latest"),
        "{msg}"
    );
    assert!(msg.contains("ollama pull"), "{msg}");

    // A blob cut short (interrupted pull) is refused.
    std::fs::write(&gguf, b"GGUF").unwrap();
    let e = ollama::resolve_in_store("qwen3:30b", store).unwrap_err();
    assert!(e.to_string().contains("incomplete pull"), "{e}");

    // A manifest without a model layer.
    let m = store.join("manifests/registry.ollama.ai/library/broken/latest");
    std::fs::create_dir_all(m.parent().unwrap()).unwrap();
    std::fs::write(&m, br#"{"schemaVersion":2,"layers":[{"mediaType":"application/vnd.ollama.image.template","digest":"sha256:00","size":1}]}"#).unwrap();
    let e = ollama::resolve_in_store("broken", store).unwrap_err();
    assert!(
        e.to_string()
            .contains("no layer of media type application/vnd.ollama.image.model"),
        "{e}"
    );
    std::fs::write(&m, b"not json").unwrap();
    assert!(matches!(
        ollama::resolve_in_store("broken", store),
        Err(OllamaError::BadManifest { .. })
    ));
}

#[tokio::test]
async fn resolution_checks_with_the_server() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path();
    let gguf = pull(store, "library", "qwen3", "30b", b"GGUF fake model bytes");
    pull(store, "library", "stale", "latest", b"GGUF stale");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let url = fake_ollama(vec!["qwen3:30b"], seen.clone()).await;
    let client = Client::new(&url).unwrap();

    let r = ollama::resolve("qwen3:30b", store, &client).await.unwrap();
    assert_eq!(r.gguf, gguf);
    assert_eq!(r.server_version.as_deref(), Some("0.30.2"));
    assert_eq!(r.architecture.as_deref(), Some("qwen3moe"));
    assert!(r.note.is_none());
    assert!(ollama::passes_llama_args(
        r.server_version.as_deref().unwrap()
    ));
    {
        let s = seen.lock().unwrap();
        let show = s
            .requests
            .iter()
            .find(|(_, p, _)| p == "/api/show")
            .unwrap();
        assert_eq!(show.0, "POST");
        assert_eq!(show.2["model"], "qwen3:30b");
    }

    // In the store but unknown to the server: the store is not the server's.
    let e = ollama::resolve("stale", store, &client).await.unwrap_err();
    assert!(
        e.to_string().contains("HTTP 404") && e.to_string().contains("not found"),
        "{e}"
    );

    let tags = client.tags().await.unwrap();
    assert_eq!(tags.len(), 1);
    assert_eq!(tags[0].name, "qwen3:30b");
    assert_eq!(tags[0].size, 18556688736);
}

#[tokio::test]
async fn unreachable_server_falls_back_to_the_store_with_a_note() {
    let t = tempfile::tempdir().unwrap();
    let gguf = pull(t.path(), "library", "qwen3", "30b", b"GGUF x");
    // A port nobody listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = Client::new(&format!("http://127.0.0.1:{port}")).unwrap();
    let r = ollama::resolve("qwen3:30b", t.path(), &client)
        .await
        .unwrap();
    assert_eq!(r.gguf, gguf);
    assert!(r.server_version.is_none());
    assert!(r.note.as_deref().unwrap().contains("not reachable"));
}

#[tokio::test]
async fn config_ollama_model_resolves_to_the_blob() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("models");
    let gguf = pull(&store, "library", "qwen3", "30b", b"GGUF fake");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let url = fake_ollama(vec!["qwen3:30b"], seen).await;
    let cfg_path = t.path().join("expertd.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "model = \"ollama:qwen3:30b\"\n[ollama]\nurl = \"{url}\"\nmodels_dir = \"{}\"\n",
            store.display()
        ),
    )
    .unwrap();
    let config = expertd::config::Config::load(&cfg_path).unwrap();
    let m = expertd::probe::resolve_model(&config).await.unwrap();
    assert_eq!(m.path, gguf);
    assert_eq!(m.ollama.unwrap().server_version.as_deref(), Some("0.30.2"));
}

#[tokio::test]
async fn derived_models_carry_the_plan_and_never_overwrite() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let url = fake_ollama(vec!["qwen3:30b"], seen.clone()).await;
    let client = Client::new(&url).unwrap();
    let params = DerivedParams {
        num_ctx: Some(16384),
        num_gpu: Some(49),
        num_thread: Some(8),
        num_batch: None,
    };
    client
        .create_derived("qwen3:30b-expertd", "qwen3:30b", &params)
        .await
        .unwrap();
    {
        let s = seen.lock().unwrap();
        let (_, _, body) = s
            .requests
            .iter()
            .find(|(_, p, _)| p == "/api/create")
            .unwrap();
        assert_eq!(body["model"], "qwen3:30b-expertd");
        assert_eq!(body["from"], "qwen3:30b");
        assert_eq!(body["stream"], false);
        assert_eq!(body["parameters"]["num_ctx"], 16384);
        assert_eq!(body["parameters"]["num_gpu"], 49);
        assert!(body["parameters"].get("num_batch").is_none());
    }
    // Same name as the source (even spelled differently): refused before any request.
    let before = seen.lock().unwrap().requests.len();
    let e = client
        .create_derived("library/qwen3:30b", "qwen3:30b", &params)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("never overwrite"), "{e}");
    // Ollama's names are case-insensitive: another spelling is still the user's model.
    let e = client
        .create_derived("Qwen3:30B", "qwen3:30b", &params)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("never overwrite"), "{e}");
    assert_eq!(seen.lock().unwrap().requests.len(), before);

    let dropin = ollama::render_dropin(&[("LLAMA_ARG_N_CPU_MOE".into(), "25".into())]);
    assert!(dropin.contains("[Service]\nEnvironment=\"LLAMA_ARG_N_CPU_MOE=25\"\n"));
}
