//! Command-line front end: argument parsing and the subcommands. Errors are
//! `anyhow` here, at the edge; the library below uses typed errors.

mod bench;
mod client_cmds;
mod cluster;
mod demo;
mod plugin_cmd;
mod procs;
mod storage_demo;

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
    /// Start a 3-node cluster on this machine, produce with acks=all, check
    /// every replica, stop it, and print the throughput.
    Demo(demo::DemoArgs),
    /// Benchmark a 3-node cluster on this machine (RF 3, acks=all): four
    /// produce workloads per storage backend, failover time, and raw quinn
    /// and native storage as baselines measured in the same run.
    Bench(bench::BenchArgs),
    /// The receiving end of the benchmark's raw-quinn baseline (started by
    /// `bench`).
    #[command(hide = true)]
    BenchSink(bench::raw_quinn::SinkArgs),
    /// Set up a cluster's config directory (certificates, node configs).
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Run one node.
    Node(cluster::NodeArgs),
    /// Manage topics.
    #[command(subcommand)]
    Topic(client_cmds::TopicCommand),
    /// Operate on one partition (an unclean election when nothing else
    /// can make it available).
    #[command(subcommand)]
    Partition(client_cmds::PartitionCommand),
    /// Send messages: one per stdin line, or --count generated ones. Prints
    /// `<partition> <offset>` per acknowledged message.
    Produce(client_cmds::ProduceArgs),
    /// Print committed messages as `<offset> <value>` lines.
    Consume(client_cmds::ConsumeArgs),
    /// Per partition (of every topic, or `--topic`'s): leader, epoch,
    /// replicas, ISR, ELR, HW, each replica's log end and lag.
    Status(client_cmds::StatusArgs),
    /// Write, recover and read back one partition through a storage plugin
    /// in this process, verifying every message (no cluster).
    StorageDemo(storage_demo::DemoArgs),
    /// Inspect and check storage plugins.
    #[command(subcommand)]
    Plugin(plugin_cmd::PluginCommand),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Status(_)
            | Command::Consume(_)
            | Command::Cluster(_)
            | Command::Topic(
                client_cmds::TopicCommand::List(_) | client_cmds::TopicCommand::Describe(_)
            )
    ) {
        // Commands that only print what they read end quietly when the
        // reader goes (`status | head`), as Unix tools do: Rust ignores
        // SIGPIPE, and `println!` then panicked on the broken pipe. Not
        // for commands that change something or clean up after
        // themselves (`produce` must report what it sent, `plugin check`
        // removes its scratch directory). `cluster init` prints only once
        // every file is written.
        #[cfg(unix)]
        // SAFETY: before any other thread exists; SIG_DFL is a valid
        // disposition for SIGPIPE.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    // A node reports what it does; one-shot commands only warn.
    init_tracing(if matches!(cli.command, Command::Node(_)) {
        "info"
    } else {
        "warn"
    });
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = runtime_workers(&cli.command) {
        builder.worker_threads(usize::from(n));
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::BenchSink(args) => bench::raw_quinn::sink(args).await,
            Command::Cluster(cluster::ClusterCommand::Init(args)) => cluster::run_init(args).await,
            Command::Cluster(cluster::ClusterCommand::Cert(args)) => cluster::run_cert(args),
            Command::Node(args) => cluster::run_node(args).await,
            Command::Topic(cmd) => client_cmds::topic(cmd).await,
            Command::Partition(cmd) => client_cmds::partition(cmd).await,
            Command::Produce(args) => client_cmds::produce(args).await,
            Command::Consume(args) => client_cmds::consume(args).await,
            Command::Status(args) => client_cmds::status(args).await,
            Command::StorageDemo(args) => storage_demo::run(args).await,
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

/// Worker threads for the command's runtime, where it sets them (the
/// runtime's default is one per core).
fn runtime_workers(command: &Command) -> Option<u16> {
    match command {
        Command::Node(cluster::NodeArgs { worker_threads, .. }) => *worker_threads,
        Command::BenchSink(args) => args.worker_threads,
        // The producers and the raw-quinn sender run here: on a node's
        // worker threads, like every other process `bench` measures.
        Command::Bench(_) => u16::try_from(procs::worker_threads()).ok(),
        _ => None,
    }
}

fn init_tracing(default: &str) {
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| default.to_string());
    // wasmtime-wasi-http warns of every failed connect of a plugin's HTTP
    // request: thousands of lines a minute while etcd is down, where the
    // plugin reports the error and the node logs the outage once. Its
    // errors stay, and `RUST_LOG` naming it decides for itself.
    let spec = if spec.contains("wasmtime_wasi_http") {
        spec
    } else {
        format!("{spec},wasmtime_wasi_http=error")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&spec).unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{default},wasmtime_wasi_http=error"))
    });
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour for a terminal only: `demo` and `bench` send each node's
        // stderr to a log file, which should read as plain text.
        .with_ansi(std::io::stderr().is_terminal())
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

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::{Cli, runtime_workers};

    /// The raw-quinn baseline is only fair if both of its ends run on as
    /// many worker threads as a node: `bench` (the sender) and
    /// `bench-sink` take a node's count, a node its flag.
    #[test]
    fn bench_and_its_sink_run_on_a_nodes_worker_threads() {
        let workers = |args: &[&str]| {
            let cli = Cli::try_parse_from(args).expect("parses");
            runtime_workers(&cli.command)
        };
        let node_share = u16::try_from(super::procs::worker_threads()).ok();
        assert!(node_share.is_some_and(|n| n >= 1));
        assert_eq!(workers(&["replicator", "bench"]), node_share);
        assert_eq!(
            workers(&[
                "replicator",
                "bench-sink",
                "--config",
                "n.toml",
                "--worker-threads",
                "1"
            ]),
            Some(1)
        );
        assert_eq!(
            workers(&[
                "replicator",
                "node",
                "--config",
                "n.toml",
                "--worker-threads",
                "3"
            ]),
            Some(3)
        );
        assert_eq!(workers(&["replicator", "node", "--config", "n.toml"]), None);
        assert!(
            Cli::try_parse_from([
                "replicator",
                "bench-sink",
                "--config",
                "n.toml",
                "--worker-threads",
                "0"
            ])
            .is_err()
        );
    }

    /// Every command and argument explains itself in `--help`, once: clap's
    /// own consistency checks, then no visible command or argument without
    /// help, and no sentence said twice in one help text (a doc comment
    /// pasted twice once showed up that way).
    #[test]
    fn every_command_and_argument_has_help_without_repeats() {
        let mut cli = Cli::command();
        cli.build();
        cli.clone().debug_assert();
        let mut problems = Vec::new();
        let mut stack = vec![(String::from("replicator"), cli)];
        while let Some((path, cmd)) = stack.pop() {
            let about = cmd
                .get_long_about()
                .or(cmd.get_about())
                .map(|s| s.to_string());
            if !cmd.is_hide_set() && path != "replicator" {
                check(&path, about.as_deref(), &mut problems);
            }
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.is_hide_set() || matches!(id, "help" | "version") {
                    continue;
                }
                let help = arg
                    .get_long_help()
                    .or(arg.get_help())
                    .map(|s| s.to_string());
                check(&format!("{path} --{id}"), help.as_deref(), &mut problems);
            }
            for sub in cmd.get_subcommands() {
                if sub.get_name() != "help" {
                    stack.push((format!("{path} {}", sub.get_name()), sub.clone()));
                }
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    fn check(what: &str, help: Option<&str>, problems: &mut Vec<String>) {
        let Some(help) = help.filter(|h| !h.trim().is_empty()) else {
            problems.push(format!("{what}: no help"));
            return;
        };
        let mut seen = std::collections::HashSet::new();
        for sentence in help.split(". ").map(str::trim).filter(|s| s.len() > 12) {
            if !seen.insert(sentence.trim_end_matches('.')) {
                problems.push(format!("{what}: says `{sentence}` twice"));
            }
        }
    }
}
