//! The built engines on a synthetic model: stock and patched llama-server load it and
//! answer; greedy output is the same across runs and across identical models; the
//! patched engine reports the expert pool version it got through the C ABI.

use std::path::{Path, PathBuf};

use expertd::engine::Flavor;
use expertd::synth::{Preset, SynthConfig, write_model};
use expertd_tests::{Server, engine_binary};

const PROMPT: &str = "The quick brown fox jumps over the lazy dog. Ünïcödé → bytes.";

fn tiny_model(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let mut config = SynthConfig::preset(Preset::Tiny);
    config.seed = seed;
    let path = dir.join(name);
    write_model(&config, &path, 2).expect("writing the tiny model");
    path
}

#[test]
fn stock_and_patched_serve_the_requested_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "tiny.gguf", 7);
    for flavor in [Flavor::Stock, Flavor::Patched] {
        let server = Server::start(&engine_binary(flavor, "llama-server"), &model, &[]).unwrap();
        let (tokens, answer) = server.greedy(PROMPT, 24).unwrap();
        assert_eq!(tokens.len(), 24, "{flavor:?}: {answer}");
        assert_eq!(answer["tokens_predicted"], 24, "{flavor:?}: {answer}");
        assert!(
            answer["tokens_evaluated"].as_u64().unwrap() > 10,
            "{answer}"
        );
    }
}

#[test]
fn greedy_output_is_deterministic_for_a_seed() {
    let dir = tempfile::tempdir().unwrap();
    let a = tiny_model(dir.path(), "a.gguf", 11);
    let b = tiny_model(dir.path(), "b.gguf", 11);
    let other = tiny_model(dir.path(), "other.gguf", 12);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());

    let server = engine_binary(Flavor::Stock, "llama-server");
    let run = |model: &Path| {
        let s = Server::start(&server, model, &[]).unwrap();
        let first = s.greedy(PROMPT, 32).unwrap().0;
        let again = s.greedy(PROMPT, 32).unwrap().0;
        assert_eq!(first, again, "two requests on one server differ");
        first
    };
    let ta = run(&a);
    assert_eq!(ta, run(&b), "identical models gave different greedy output");
    assert_ne!(ta, run(&other), "a different seed gave the same output");
    // Not degenerate: a random model that repeats one token says little.
    let distinct: std::collections::BTreeSet<_> = ta.iter().collect();
    assert!(distinct.len() > 3, "output is degenerate: {ta:?}");
}

#[test]
fn patched_engine_reports_the_pool_version_and_stock_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "tiny.gguf", 3);
    let line = format!("expertd expert pool {}", expert_pool::VERSION);

    let patched =
        Server::start(&engine_binary(Flavor::Patched, "llama-server"), &model, &[]).unwrap();
    assert!(
        patched.log_text().contains(&line),
        "patched log:\n{}",
        patched.log_text()
    );
    let stock = Server::start(&engine_binary(Flavor::Stock, "llama-server"), &model, &[]).unwrap();
    assert!(
        !stock.log_text().contains("expertd expert pool"),
        "stock log:\n{}",
        stock.log_text()
    );
}
