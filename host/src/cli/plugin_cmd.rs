//! `replicator plugin ...`: list the built-in plugins, show what a component
//! targets, run the storage or metadata conformance suite against one.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use replicator::conformance::metadata::{
    self as meta_conformance, MetadataOptions, MetadataSubject,
};
use replicator::conformance::{self, Options, Report, Subject};
use replicator::node::config::{PluginSection, endpoint_authority};
use replicator::plugin::{
    Inspection, MetadataPlugin, PluginRuntime, PluginSource, Sandbox, StoragePlugin, WIT_PACKAGE,
    WIT_VERSION, builtin,
};

#[derive(Subcommand)]
pub enum PluginCommand {
    /// List the storage and metadata plugins built into this binary.
    List,
    /// Run the storage conformance suite against a plugin: round trips,
    /// offsets, truncation, prefix deletes, checkpoints, reopen, torn-tail
    /// recovery, the error variant of every bad input, and random operation
    /// sequences compared with a reference model. With `--metadata`, run
    /// the metadata suite instead: not-found, create, stale versions,
    /// compare-and-set races between connections, listings, broker epochs
    /// (also under concurrent registration) and invalid input.
    Check(CheckArgs),
    /// Show what a component targets: its world (storage-plugin,
    /// metadata-plugin or neither), every import and export by full name,
    /// the replicator:plugin WIT version it was built against, its size,
    /// and whether this host accepts it (it is linked as a node would link
    /// it; the error is shown if that fails). Exits 1 if not accepted.
    Inspect(InspectArgs),
}

#[derive(Args)]
pub struct InspectArgs {
    /// A path to a .wasm component, or a built-in name (`memory`, `file`,
    /// `s3`, `etcd`; `file` is the storage one unless --metadata is given).
    plugin: PluginSource,
    /// Look the built-in name up among the metadata plugins.
    #[arg(long)]
    metadata: bool,
    /// Print one JSON object instead of the human report.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct CheckArgs {
    /// A built-in storage plugin name (`memory`, `file`, `s3`) or a path to
    /// a .wasm component. For s3, give `--config endpoint=http://host:port
    /// --config bucket=NAME` and credentials (`access_key_id`,
    /// `secret_access_key`, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in
    /// the environment); the sandbox allows HTTP to that endpoint only, and
    /// unless `--config prefix=...` is given the suite writes under a fresh
    /// prefix `replicator-check/<time>/`.
    #[arg(required_unless_present = "metadata", conflicts_with = "metadata")]
    plugin: Option<PluginSource>,
    /// Check a metadata plugin instead: a built-in name (`file`, `etcd`)
    /// or a path to a .wasm component. For etcd, give
    /// `--config endpoints=http://127.0.0.1:2379`; the sandbox allows HTTP
    /// to those endpoints only. Unless `--config prefix=...` is given, the
    /// suite writes under a fresh prefix `/replicator-check/<time>/`, away
    /// from any cluster's keys. Never give a prefix a cluster uses or will
    /// use: one case claims the store's cluster id, which stays, and a
    /// cluster's nodes refuse a store that names another cluster.
    #[arg(long, value_name = "PLUGIN")]
    metadata: Option<PluginSource>,
    /// Plugin setting passed to every `open` (or metadata `connect`), as
    /// key=value (repeatable), e.g. `--config segment.bytes=8192` for the
    /// file plugin.
    #[arg(long = "config", value_parser = super::parse_kv)]
    config: Vec<(String, String)>,
    /// Rounds of the metadata suite's races (compare-and-set, broker
    /// registration).
    #[arg(long, default_value_t = 20)]
    rounds: u32,
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
                println!("{name:<8} storage   {:>7} KiB", wasm.len() / 1024);
            }
            for (name, wasm) in builtin::METADATA {
                println!("{name:<8} metadata  {:>7} KiB", wasm.len() / 1024);
            }
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Check(args) => check(args).await,
        PluginCommand::Inspect(args) => inspect(args),
    }
}

fn inspect(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let (name, origin, wasm) = match &args.plugin {
        PluginSource::Builtin(name) => {
            let (kind, found) = if args.metadata {
                ("metadata", builtin::metadata(name))
            } else {
                builtin::storage(name)
                    .map(|w| ("storage", Some(w)))
                    .unwrap_or(("metadata", builtin::metadata(name)))
            };
            let Some(wasm) = found else {
                let mut known: Vec<&str> = Vec::new();
                for (n, _) in builtin::STORAGE.iter().chain(builtin::METADATA) {
                    if !known.contains(n) {
                        known.push(n);
                    }
                }
                anyhow::bail!(
                    "unknown built-in plugin `{name}`; built-ins: {}; or give a path to a .wasm component",
                    known.join(", ")
                );
            };
            (
                name.clone(),
                format!("built-in {kind} plugin"),
                wasm.to_vec(),
            )
        }
        PluginSource::Path(path) => {
            let wasm = std::fs::read(path)
                .with_context(|| format!("cannot read plugin {}", path.display()))?;
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.display().to_string());
            (name, path.display().to_string(), wasm)
        }
    };
    let runtime = PluginRuntime::global()?;
    let report = replicator::plugin::inspect(&runtime, &name, &wasm)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&inspection_json(&report, &origin))?
        );
    } else {
        print_inspection(&report, &origin);
    }
    Ok(if report.accepted.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn inspection_json(r: &Inspection, origin: &str) -> serde_json::Value {
    serde_json::json!({
        "name": r.name,
        "source": origin,
        "size_bytes": r.size,
        "world": r.kind.map(|k| k.world()),
        "wit_package": WIT_PACKAGE,
        "wit_version": r.wit_version,
        "host_wit_version": WIT_VERSION,
        "imports": r.imports,
        "exports": r.exports,
        "accepted": r.accepted.is_ok(),
        "error": r.accepted.as_ref().err(),
    })
}

fn print_inspection(r: &Inspection, origin: &str) {
    println!("plugin    {} ({origin})", r.name);
    println!("size      {} bytes ({} KiB)", r.size, r.size.div_ceil(1024));
    println!(
        "world     {}",
        r.kind
            .map(|k| k.world())
            .unwrap_or("neither storage-plugin nor metadata-plugin")
    );
    println!(
        "wit       {} (this host: {WIT_PACKAGE}@{WIT_VERSION})",
        r.wit_version
            .as_ref()
            .map(|v| format!("{WIT_PACKAGE}@{v}"))
            .unwrap_or_else(|| format!("names no {WIT_PACKAGE} interface"))
    );
    match &r.accepted {
        Ok(()) => println!("accepted  yes"),
        Err(e) => println!("accepted  no: {e}"),
    }
    for (what, names) in [("imports", &r.imports), ("exports", &r.exports)] {
        println!("{what} ({})", names.len());
        for n in names {
            println!("  {n}");
        }
    }
}

async fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    if args.metadata.is_some() {
        return check_metadata(args).await;
    }
    let Some(source) = args.plugin.clone() else {
        anyhow::bail!("name a storage plugin, or a metadata one with --metadata");
    };
    let mut config = args.config;
    // As in a node: HTTP only to the `endpoint` setting (object stores),
    // which also lets the plugin see the AWS_* credential variables.
    let section = PluginSection {
        plugin: source.to_string(),
        config: config.iter().cloned().collect(),
        thread_per_partition: None,
        write_behind_ms: None,
    };
    section.validate().map_err(anyhow::Error::msg)?;
    let sandbox = section.sandbox();
    if !sandbox.http_allow.is_empty() && !config.iter().any(|(k, _)| k == "prefix") {
        config.push((
            "prefix".into(),
            format!("replicator-check/{}/", unique_suffix()),
        ));
    }
    let plugin = StoragePlugin::load(&source, sandbox)
        .with_context(|| format!("loading plugin `{source}`"))?;
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
    let mut subject = Subject::new(plugin, config);
    if args.persistent {
        subject = subject.persistent(true);
    }
    let report = conformance::run(&subject, &scratch, &options, |name| {
        eprint!("  running {name}...\r");
    })
    .await;
    finish(report)
}

/// Nanoseconds since the Unix epoch: a fresh key prefix per check run, away
/// from any cluster's data and from earlier runs.
fn unique_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn finish(report: Report) -> anyhow::Result<ExitCode> {
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

async fn check_metadata(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let source = args
        .metadata
        .clone()
        .context("--metadata names the plugin")?;
    let mut config = args.config;
    // The endpoints the plugin is told about are the only ones its sandbox
    // lets it reach, as in a node's `[metadata] endpoints`.
    let mut allow = Vec::new();
    for (k, v) in &config {
        if k == "endpoints" {
            for e in v.split(',').filter(|e| !e.trim().is_empty()) {
                allow.push(endpoint_authority(e).map_err(anyhow::Error::msg)?);
            }
        }
    }
    // Without endpoints every case failed alike (11 FAIL lines of one
    // connect error): say it once.
    if allow.is_empty() && matches!(&source, PluginSource::Builtin(n) if n == "etcd") {
        anyhow::bail!(
            "the etcd plugin needs the store's address: add --config endpoints=http://HOST:PORT (comma-separated for several)"
        );
    }
    let own_prefix = config.iter().any(|(k, _)| k == "prefix");
    if !own_prefix && !allow.is_empty() {
        config.push((
            "prefix".into(),
            format!("/replicator-check/{}/", unique_suffix()),
        ));
    }
    let plugin = MetadataPlugin::load(&source, Sandbox::default().allow_http(allow))
        .with_context(|| format!("loading metadata plugin `{source}`"))?;
    let (scratch, _guard) = super::work_dir(&args.dir)?;
    // A prefix or a directory given may hold a cluster id already.
    let fresh_store = !own_prefix && args.dir.is_none();
    let options = MetadataOptions {
        race_rounds: args.rounds.max(1),
        filter: args.filter,
        fresh_store,
        ..MetadataOptions::default()
    };
    let shown: Vec<String> = config.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "checking metadata plugin `{}` ({} race rounds; config: {})",
        plugin.name(),
        options.race_rounds,
        if shown.is_empty() {
            "none".to_string()
        } else {
            shown.join(" ")
        }
    );
    let subject = MetadataSubject::new(plugin, config);
    let report = meta_conformance::run(&subject, &scratch, &options, |name| {
        eprint!("  running {name}...\r");
    })
    .await;
    finish(report)
}
