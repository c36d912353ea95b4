//! `expertd plan`: probe this host and the model, and print the plan with its reasons,
//! without starting anything.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::config::{Config, ConfigEnv};

/// Arguments of `expertd plan`.
#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// Print the plan as JSON (the `plan` object of the status document).
    #[arg(long)]
    pub json: bool,
    /// Config file. Default: $EXPERTD_CONFIG, else /etc/expertd/expertd.toml.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Print the probe snapshot (JSON) instead of the plan: what the planner sees.
    #[arg(long, conflicts_with = "from_snapshot")]
    pub snapshot: bool,
    /// Plan from a recorded snapshot instead of probing (the config is optional then).
    #[arg(long, value_name = "FILE")]
    pub from_snapshot: Option<PathBuf>,
}

pub fn run(args: PlanArgs) -> anyhow::Result<ExitCode> {
    let loc = crate::config::locate(
        args.config.as_deref(),
        std::env::var(crate::config::CONFIG_ENV).ok().as_deref(),
    );
    let (config, snapshot) = match &args.from_snapshot {
        Some(file) => {
            let text = std::fs::read(file)
                .with_context(|| format!("reading snapshot {}", file.display()))?;
            let snap: crate::probe::Snapshot = serde_json::from_slice(&text)
                .with_context(|| format!("{} is not a probe snapshot", file.display()))?;
            let config = if loc.path.exists() || args.config.is_some() {
                Config::load(&loc.path)?
            } else {
                let model = toml::Value::String(snap.model.path.display().to_string());
                Config::parse(
                    &format!("model = {model}\n"),
                    &loc.path,
                    &ConfigEnv::from_process(),
                )?
            };
            (config, snap)
        }
        None => {
            let config =
                Config::load(&loc.path).with_context(|| format!("config from {}", loc.source))?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let model = rt.block_on(crate::probe::resolve_model(&config))?;
            if let Some(o) = &model.ollama
                && let Some(n) = &o.note
            {
                eprintln!("expertd: note: {n}");
            }
            let snap = crate::probe::snapshot(&model.path, &config.state_dir)?;
            (config, snap)
        }
    };
    if args.snapshot {
        println!("{}", serde_json::to_string_pretty(&snapshot)?);
        return Ok(ExitCode::SUCCESS);
    }
    let plan = crate::plan::plan(&snapshot, &config);
    if args.json {
        let doc = crate::api::wire::PlanDoc::from(&plan);
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{plan}");
        println!(
            "engine args: {}",
            crate::plan::shown_args(&plan.args).join(" ")
        );
    }
    Ok(ExitCode::SUCCESS)
}
