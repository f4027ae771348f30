//! `replicator plugin ...`: list the built-in plugins, run the conformance
//! suite against one.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use replicator::conformance::{self, Options, Subject};
use replicator::plugin::{PluginSource, Sandbox, StoragePlugin, builtin};

#[derive(Subcommand)]
pub enum PluginCommand {
    /// List the storage plugins built into this binary.
    List,
    /// Run the storage conformance suite against a plugin: round trips,
    /// offsets, truncation, prefix deletes, checkpoints, reopen, torn-tail
    /// recovery, the error variant of every bad input, and random operation
    /// sequences compared with a reference model.
    Check(CheckArgs),
}

#[derive(Args)]
pub struct CheckArgs {
    /// A built-in plugin name (`memory`, `file`) or a path to a .wasm component.
    plugin: PluginSource,
    /// Plugin setting passed to every `open`, as key=value (repeatable),
    /// e.g. `--config segment.bytes=8192` for the file plugin.
    #[arg(long = "config", value_parser = super::parse_kv)]
    config: Vec<(String, String)>,
    /// Random operation sequences for the model-based case.
    #[arg(long, default_value_t = 64)]
    cases: u32,
    /// The plugin must keep its data across instances: a log that comes
    /// back empty after reopening fails instead of skipping those cases.
    #[arg(long)]
    persistent: bool,
    /// Run only the cases whose name contains this.
    #[arg(long)]
    filter: Option<String>,
    /// Directory for the logs the suite writes (default: a temporary one,
    /// removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
}

pub async fn run(cmd: PluginCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PluginCommand::List => {
            for (name, wasm) in builtin::STORAGE {
                println!("{name:<8} storage  {:>7} KiB", wasm.len() / 1024);
            }
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Check(args) => check(args).await,
    }
}

async fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let plugin = StoragePlugin::load(&args.plugin, Sandbox::default())
        .with_context(|| format!("loading plugin `{}`", args.plugin))?;
    let (scratch, _guard) = super::work_dir(&args.dir)?;
    let options = Options {
        proptest_cases: args.cases,
        filter: args.filter,
    };
    println!(
        "checking storage plugin `{}` ({} model cases)",
        plugin.name(),
        options.proptest_cases
    );
    let mut subject = Subject::new(plugin, args.config);
    if args.persistent {
        subject = subject.persistent(true);
    }
    let report = conformance::run(&subject, &scratch, &options, |name| {
        eprint!("  running {name}...\r");
    })
    .await;
    eprint!("{:60}\r", "");
    println!("{report}");
    if report.cases.is_empty() {
        anyhow::bail!("no case matched the filter");
    }
    Ok(if report.failed() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
