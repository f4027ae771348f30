//! Command-line front end: argument parsing and the subcommands. Errors are
//! `anyhow` here, at the edge; the library below uses typed errors.

mod demo;
mod plugin_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Replicator: Kafka-style replicated partition logs with WebAssembly
/// storage and metadata backends.
#[derive(Parser)]
#[command(name = "replicator", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write, recover and read back a partition through a storage plugin,
    /// verifying every message and reporting throughput.
    Demo(demo::DemoArgs),
    /// Inspect and check storage plugins.
    #[command(subcommand)]
    Plugin(plugin_cmd::PluginCommand),
}

pub fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Plugin(cmd) => plugin_cmd::run(cmd).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Parse `key=value` for `--config`.
pub(crate) fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("`{s}` is not key=value")),
    }
}

/// `dir` if given, else a fresh temporary directory that lives as long as
/// the returned guard.
pub(crate) fn work_dir(
    dir: &Option<std::path::PathBuf>,
) -> anyhow::Result<(std::path::PathBuf, Option<tempfile::TempDir>)> {
    use anyhow::Context;
    match dir {
        Some(d) => Ok((d.clone(), None)),
        None => {
            let tmp = tempfile::tempdir().context("creating a temporary directory")?;
            Ok((tmp.path().to_path_buf(), Some(tmp)))
        }
    }
}
