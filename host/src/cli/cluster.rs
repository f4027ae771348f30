//! `replicator cluster init` (certificates and per-node configs in one
//! directory), `replicator cluster cert` (another certificate from the
//! kept CA key) and `replicator node` (run one node from its config).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use replicator::core::Config as ReplicationConfig;
use replicator::metadata::MetadataError;
use replicator::node::config::{MetadataSection, NodeAddress, PluginSection};
use replicator::node::{self, ClientConfig, NodeConfig};
use replicator::plugin::{
    ConfigCheck, MetadataPlugin, PluginRuntime, PluginSource, StoragePlugin, default_cache_dir,
};
use replicator::transport::tls::GeneratedCa;
use replicator::transport::{Identity, TlsMaterial, TlsPaths};

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Create a cluster's config directory: a CA, one certificate and
    /// `node-<id>.toml` per node, and a client certificate with
    /// `client.toml`. Start each node with `replicator node --config
    /// DIR/node-<id>.toml`; point client commands at `DIR/client.toml`.
    Init(InitArgs),
    /// Issue a certificate from the cluster's CA, whose key `cluster init
    /// --ca-key-out` kept: a node's (to replace one that expires or
    /// leaked, or for a node added by hand) or the client's. Writes
    /// `node-<id>.pem` and `node-<id>-key.pem` (or `client.pem` and
    /// `client-key.pem`) into the cluster directory. A node uses its new
    /// certificate from its next start: restart the nodes one at a time
    /// (each hands its partitions over first, and nothing is lost).
    Cert(CertArgs),
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("whose").required(true).args(["node", "client"])))]
pub struct CertArgs {
    /// The cluster's config directory (holding `ca.pem`).
    #[arg(long)]
    pub dir: PathBuf,
    /// The CA's private key, as `cluster init --ca-key-out` kept it.
    #[arg(long)]
    pub ca_key: PathBuf,
    /// Issue node N's certificate.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub node: Option<u32>,
    /// Issue the client certificate.
    #[arg(long)]
    pub client: bool,
    /// Valid for this many days from now (default: until the year 4096,
    /// as `cluster init` issues them). A node warns 30 days, 7 days, 1
    /// day and 1 hour ahead of its certificate's expiry, and stops 30 s
    /// before it (peers and clients refuse an expired certificate).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=365_000))]
    pub days: Option<u32>,
    /// Overwrite the certificate and key files that exist (without it they
    /// are kept and nothing is written). A running node goes on with the
    /// ones it loaded until it restarts.
    #[arg(long)]
    pub replace: bool,
}

#[derive(Args)]
pub struct InitArgs {
    /// Directory to write (created; must not already hold a cluster).
    #[arg(long)]
    pub dir: PathBuf,
    /// Number of nodes (ids 1..=N).
    #[arg(long, default_value_t = 3)]
    pub nodes: u32,
    /// Node i listens for QUIC (UDP) on base-port + i - 1.
    #[arg(long, default_value_t = 7101)]
    pub base_port: u16,
    /// Node i serves Prometheus metrics (TCP) on metrics-base-port + i - 1;
    /// 0 disables /metrics.
    #[arg(long, default_value_t = 9101)]
    pub metrics_base_port: u16,
    /// Address the nodes bind and advertise.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Storage backend: built-in `file`, `memory` or `s3`, or a .wasm path.
    /// For `s3` give `--storage-config endpoint=http://host:port` and
    /// `--storage-config bucket=NAME`; credentials come from
    /// `access_key_id`/`secret_access_key` settings or the nodes'
    /// AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY. Each node writes under its
    /// own key prefix, `<prefix>node-<id>/`.
    #[arg(long, default_value = "file")]
    pub storage: String,
    /// Metadata backend: built-in `file` or `etcd`, or a .wasm path.
    #[arg(long, default_value = "file")]
    pub metadata: String,
    /// Endpoint of the metadata store, `http://host:port` (repeatable),
    /// e.g. etcd's client URLs; required for `--metadata etcd`. The
    /// metadata plugin may send HTTP requests to these and nowhere else.
    #[arg(long = "metadata-endpoint")]
    pub metadata_endpoint: Vec<String>,
    /// Metadata plugin setting as key=value (repeatable), e.g.
    /// `--metadata-config prefix=/orders-cluster/` for etcd.
    #[arg(long = "metadata-config", value_parser = super::parse_kv)]
    pub metadata_config: Vec<(String, String)>,
    /// min.insync.replicas for acks=all (default: 2 with 3 or more nodes,
    /// else 1).
    #[arg(long)]
    pub min_insync: Option<u32>,
    /// Keep at least this many MiB of each partition's log on every node
    /// and delete older, committed batches (`[replication]
    /// retention_bytes`, Kafka's `retention.bytes`). Unset keeps
    /// everything: with the memory plugin the nodes' memory then grows
    /// with every byte written.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1 << 40))]
    pub retention_mb: Option<u64>,
    /// Storage plugin setting as key=value (repeatable), e.g.
    /// `--storage-config fsync=always` (file) or
    /// `--storage-config endpoint=http://127.0.0.1:9000` (s3).
    #[arg(long = "storage-config", value_parser = super::parse_kv)]
    pub storage_config: Vec<(String, String)>,
    /// Keep the CA's private key in this file (needed only to issue more
    /// certificates later). Keep it away from the nodes: whoever holds it
    /// can mint a certificate for any node. By default it is discarded.
    #[arg(long)]
    pub ca_key_out: Option<PathBuf>,
}

/// Node `id`'s storage section. With an object store (an `endpoint`
/// setting) every node gets its own key prefix: replicas of one partition
/// must not share objects (the plugin would fence one of them).
fn node_storage(args: &InitArgs, id: u32) -> PluginSection {
    storage_section(&args.storage, &args.storage_config, id)
}

fn storage_section(storage: &str, settings: &[(String, String)], id: u32) -> PluginSection {
    let mut config: std::collections::BTreeMap<String, String> = settings.iter().cloned().collect();
    if config.contains_key("endpoint") {
        let base = config.get("prefix").cloned().unwrap_or_default();
        let base = if base.is_empty() || base.ends_with('/') {
            base
        } else {
            format!("{base}/")
        };
        config.insert("prefix".into(), format!("{base}node-{id}/"));
    }
    PluginSection {
        plugin: plugin_for_config(storage),
        config,
        thread_per_partition: None,
        write_behind_ms: None,
    }
}

/// A plugin as the node configs should name it: a relative `.wasm` path is
/// made absolute here, since the configs resolve relative paths against
/// their own directory, not the one `cluster init` ran in.
fn plugin_for_config(plugin: &str) -> String {
    match plugin.parse::<PluginSource>() {
        Ok(PluginSource::Path(p)) if p.is_relative() => std::path::absolute(&p)
            .map(|abs| abs.display().to_string())
            .unwrap_or_else(|_| plugin.to_string()),
        _ => plugin.to_string(),
    }
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    o.mode(0o600);
    let mut f = o
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn write_new(path: &Path, contents: &str) -> anyhow::Result<()> {
    if path.exists() {
        bail!("{} already exists; refusing to overwrite", path.display());
    }
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

/// Refuse, before anything is written, a storage plugin that does not
/// load or settings it refuses: the check each node makes at startup (see
/// `replicator::plugin::ConfigCheck`), in a temporary directory, so an
/// operator hears of a typo here and not from three node logs.
pub async fn check_storage(storage: &str, settings: &[(String, String)]) -> anyhow::Result<()> {
    let section = storage_section(storage, settings, 1);
    if section.plugin == node::storage::NATIVE {
        return Ok(());
    }
    // A runtime of its own, dropped on return: the shared one would keep
    // its epoch thread ticking in this process (the bench's client).
    let runtime = PluginRuntime::new(default_cache_dir()).map_err(|e| anyhow!("{e}"))?;
    let plugin =
        StoragePlugin::load_with(runtime, &section.source(Path::new(".")), section.sandbox())
            .map_err(|e| anyhow!("--storage {storage}: {e}"))?;
    let scratch = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            // The nodes check again, in their own data directories.
            eprintln!("warning: storage settings not checked here: a temporary directory: {e}");
            return Ok(());
        }
    };
    match plugin.check_config(section.pairs(), scratch.path()).await {
        ConfigCheck::Refused(why) => bail!(
            "--storage-config: storage plugin `{}` refuses these settings: {why}",
            plugin.name()
        ),
        ConfigCheck::Accepted | ConfigCheck::Skipped(_) | ConfigCheck::Unchecked(_) => Ok(()),
    }
}

/// Refuse, before anything is written, a metadata plugin that does not
/// load or settings it refuses: it connects once, to a temporary
/// directory. Plugins check their settings when they connect (the file
/// and etcd plugins reach no server then); a store it cannot reach now is
/// no reason to refuse, since it may be started later.
pub async fn check_metadata(section: &MetadataSection) -> anyhow::Result<()> {
    let runtime = PluginRuntime::new(default_cache_dir()).map_err(|e| anyhow!("{e}"))?;
    let source = section.source(Path::new("."));
    let plugin = MetadataPlugin::load_with(runtime, &source, section.sandbox())
        .map_err(|e| anyhow!("--metadata {}: {e}", section.plugin))?;
    let Ok(scratch) = tempfile::tempdir() else {
        return Ok(()); // the nodes check again when they connect
    };
    let connected = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        plugin.connect(scratch.path(), section.plugin_config()),
    )
    .await;
    match connected {
        Ok(Ok(store)) => {
            store.close().await;
            Ok(())
        }
        Ok(Err(MetadataError::InvalidInput(why))) => bail!(
            "--metadata-config: metadata plugin `{}` refuses these settings: {why}",
            plugin.name()
        ),
        // It trapped or broke the contract while connecting: as good as
        // not loading.
        Ok(Err(MetadataError::Fault(why))) => bail!("--metadata {}: {why}", section.plugin),
        Ok(Err(_)) | Err(_) => Ok(()),
    }
}

/// What `init` derives from its arguments, checked before anything is
/// written, so a refusal leaves no half-made cluster behind.
struct Plan {
    metadata: MetadataSection,
    replication: ReplicationConfig,
}

fn plan(args: &InitArgs) -> anyhow::Result<Plan> {
    if args.nodes == 0 || args.nodes > 1000 {
        bail!("--nodes must be 1..=1000");
    }
    if args.base_port == 0 {
        bail!("--base-port 0 is not a port a node can listen on (use 1..=65535)");
    }
    let last_port = u32::from(args.base_port) + args.nodes - 1;
    if last_port > 65535 {
        bail!(
            "--base-port {} leaves no room for {} nodes",
            args.base_port,
            args.nodes
        );
    }
    if args.metrics_base_port != 0 && u32::from(args.metrics_base_port) + args.nodes - 1 > 65535 {
        bail!(
            "--metrics-base-port {} leaves no room for {} nodes",
            args.metrics_base_port,
            args.nodes
        );
    }
    if args.host.is_unspecified() {
        bail!(
            "--host {} is not an address nodes and clients can dial; give the machine's address (the nodes bind and advertise it)",
            args.host
        );
    }
    let metadata = MetadataSection {
        plugin: plugin_for_config(&args.metadata),
        dir: "metadata".into(),
        endpoints: args.metadata_endpoint.clone(),
        config: args.metadata_config.iter().cloned().collect(),
        start_wait_ms: replicator::node::config::default_start_wait_ms(),
    };
    if let Err(e) = metadata.validate() {
        bail!("{e} (give them with --metadata-endpoint http://host:port)");
    }
    if metadata.plugin == "file" && !metadata.endpoints.is_empty() {
        // Every node would refuse its `endpoints` setting at start.
        bail!(
            "--metadata-endpoint is for a networked store; the `file` metadata plugin keeps the cluster's metadata in a directory and takes none (use --metadata etcd)"
        );
    }
    let dir = &args.dir;
    if dir.join("ca.pem").exists() {
        bail!(
            "{} already holds a cluster (ca.pem exists); choose another --dir",
            dir.display()
        );
    }
    if let Some(key) = &args.ca_key_out {
        if key.exists() {
            bail!(
                "--ca-key-out {} already exists; refusing to overwrite a key",
                key.display()
            );
        }
        // Relative to where init runs, as the key is written.
        let parent = key.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(parent) = parent
            && !parent.is_dir()
        {
            bail!(
                "--ca-key-out {}: directory {} does not exist",
                key.display(),
                parent.display()
            );
        }
    }
    let min_insync = args
        .min_insync
        .unwrap_or(if args.nodes >= 3 { 2 } else { 1 });
    if min_insync == 0 || min_insync > args.nodes {
        bail!("--min-insync must be 1..={}", args.nodes);
    }
    let replication = ReplicationConfig {
        min_insync_replicas: min_insync,
        // Faster than Kafka's 1 s: a restarted leader is found sooner.
        fetch_backoff_ms: 100,
        // Kafka's 500 ms long poll delays a partition that starts
        // following a leader (after a failover) behind the fetch already
        // waiting there for the other partitions; new data ends a long
        // poll at once anyway, so a shorter one costs little.
        fetch_max_wait_ms: 100,
        retention_bytes: args.retention_mb.map(|mb| mb << 20),
        ..ReplicationConfig::default()
    };
    replication
        .validate()
        .map_err(|e| anyhow::anyhow!("--retention-mb: {e}"))?;
    Ok(Plan {
        metadata,
        replication,
    })
}

/// A fresh cluster id: 128 random bits in hex, so two clusters never
/// share one by chance (Kafka's cluster ids are random UUIDs too).
fn new_cluster_id() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).map_err(|e| anyhow!("no randomness for a cluster id: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Write the cluster directory; returns the client config path and the
/// cluster id. Callers run [`check_storage`] first.
pub fn init(args: &InitArgs) -> anyhow::Result<(PathBuf, String)> {
    let Plan {
        metadata,
        replication,
    } = plan(args)?;
    let dir = &args.dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cluster_id = new_cluster_id()?;
    let ca = GeneratedCa::new(&dir.display().to_string())?;
    // The key first: if it cannot be written, no ca.pem marks the
    // directory as a cluster that a second try would refuse.
    if let Some(p) = &args.ca_key_out {
        write_private(p, &ca.key_pem)?;
    }
    write_new(&dir.join("ca.pem"), &ca.cert_pem)?;
    let mut nodes = Vec::new();
    for id in 1..=args.nodes {
        let (cert, key) = ca.issue(Identity::Node(id))?;
        write_new(&dir.join(format!("node-{id}.pem")), &cert)?;
        write_private(&dir.join(format!("node-{id}-key.pem")), &key)?;
        let port = args.base_port + (id - 1) as u16;
        let listen = SocketAddr::new(args.host, port);
        nodes.push(NodeAddress {
            id,
            address: listen,
        });
        let cfg = NodeConfig {
            node_id: id,
            cluster_id: Some(cluster_id.clone()),
            listen,
            advertise: None,
            metrics_listen: (args.metrics_base_port != 0)
                .then(|| SocketAddr::new(args.host, args.metrics_base_port + (id - 1) as u16)),
            data_dir: PathBuf::from(format!("node-{id}")),
            metadata_poll_ms: 200,
            tls: TlsPaths {
                ca: "ca.pem".into(),
                cert: format!("node-{id}.pem").into(),
                key: format!("node-{id}-key.pem").into(),
            },
            storage: node_storage(args, id),
            metadata: metadata.clone(),
            replication: replication.clone(),
            failover: Default::default(),
        };
        let text = toml::to_string(&cfg).context("encoding a node config")?;
        write_new(
            &dir.join(format!("node-{id}.toml")),
            &format!(
                "# Node {id}. Start it with: replicator node --config node-{id}.toml\n\
                 # Relative paths are relative to this file's directory.\n{text}"
            ),
        )?;
    }
    let (cert, key) = ca.issue(Identity::Client)?;
    write_new(&dir.join("client.pem"), &cert)?;
    write_private(&dir.join("client-key.pem"), &key)?;
    let client = ClientConfig {
        tls: TlsPaths {
            ca: "ca.pem".into(),
            cert: "client.pem".into(),
            key: "client-key.pem".into(),
        },
        nodes,
    };
    let client_path = dir.join("client.toml");
    write_new(
        &client_path,
        &format!(
            "# Client settings for replicator topic/produce/consume/status --config client.toml\n{}",
            toml::to_string(&client).context("encoding the client config")?
        ),
    )?;
    std::fs::create_dir_all(dir.join("metadata"))?;
    Ok((client_path, cluster_id))
}

pub async fn run_init(args: InitArgs) -> anyhow::Result<ExitCode> {
    // The cheap checks first, then the plugin's (it loads a component).
    let planned = plan(&args)?;
    check_storage(&args.storage, &args.storage_config).await?;
    check_metadata(&planned.metadata).await?;
    let (client, cluster_id) = init(&args)?;
    println!(
        "cluster {cluster_id} of {} nodes written to {}",
        args.nodes,
        args.dir.display()
    );
    for id in 1..=args.nodes {
        println!(
            "  start node {id}: replicator node --config {}",
            args.dir.join(format!("node-{id}.toml")).display()
        );
    }
    println!("  clients:      --config {}", client.display());
    let last = |base: u16| base.saturating_add((args.nodes - 1) as u16);
    let mut ranges = vec![args.base_port..=last(args.base_port)];
    if args.metrics_base_port != 0 {
        ranges.push(args.metrics_base_port..=last(args.metrics_base_port));
    }
    for r in ranges {
        if let Some(w) = replicator::ports::ephemeral_warning(r) {
            eprintln!("warning: {w}");
        }
    }
    match &args.ca_key_out {
        Some(p) => println!("  CA key kept in {} (keep it off the nodes)", p.display()),
        None => println!(
            "  the CA key was discarded: no one can issue more certificates for this cluster"
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// Where the config `DIR/<name>.toml` keeps its TLS files (resolved
/// against its directory), and whether there is one; `cluster init`'s
/// names when there is none (a node added by hand). An operator who moved
/// a node's files got a certificate written where the node never looks,
/// and was told the node would use it (operator run).
fn tls_paths_of(dir: &Path, name: &str) -> anyhow::Result<(TlsPaths, bool)> {
    #[derive(serde::Deserialize)]
    struct WithTls {
        tls: TlsPaths,
    }
    let config = dir.join(format!("{name}.toml"));
    match std::fs::read_to_string(&config) {
        Ok(text) => {
            let parsed: WithTls = toml::from_str(&text)
                .with_context(|| format!("reading [tls] from {}", config.display()))?;
            Ok((parsed.tls.resolved(dir), true))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((
            TlsPaths {
                ca: dir.join("ca.pem"),
                cert: dir.join(format!("{name}.pem")),
                key: dir.join(format!("{name}-key.pem")),
            },
            false,
        )),
        Err(e) => Err(e).with_context(|| format!("reading {}", config.display())),
    }
}

/// A file to replace: where its content goes (a symbolic link's target:
/// a link from a secret store keeps pointing at the new content), and the
/// mode and owner it has, which the new one keeps.
struct Replaced {
    path: PathBuf,
    #[cfg(unix)]
    kept: Option<(u32, u32, u32)>,
}

impl Replaced {
    fn at(path: &Path) -> anyhow::Result<Replaced> {
        let link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
        let path = match std::fs::canonicalize(path) {
            Ok(p) => p,
            // Replaced by a plain file, the link to the secret store
            // would be cut.
            Err(e) if link => bail!(
                "{} is a symbolic link to a file that cannot be reached ({e}): restore its target, or remove the link",
                path.display()
            ),
            Err(_) => path.to_path_buf(),
        };
        #[cfg(unix)]
        let kept = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&path)
                .ok()
                .map(|m| (m.mode() & 0o777, m.uid(), m.gid()))
        };
        Ok(Replaced {
            path,
            #[cfg(unix)]
            kept,
        })
    }

    /// `contents` staged next to the file under a name of its own (two
    /// runs at once do not clobber each other's), owner-only until
    /// [`Replaced::settle`]; removed on any failure (the drop).
    fn stage(&self, contents: &str) -> anyhow::Result<tempfile::NamedTempFile> {
        use std::io::Write;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let mut f = tempfile::Builder::new()
            .prefix(".replicator-cert-")
            .suffix(".new")
            .tempfile_in(dir)
            .with_context(|| format!("creating a file in {}", dir.display()))?;
        f.write_all(contents.as_bytes())
            .with_context(|| format!("writing {}", f.path().display()))?;
        Ok(f)
    }

    /// Give the staged `f` the old file's owner and mode (else `mode`),
    /// then sync it. A key whose owner cannot be kept (not run as root)
    /// keeps no group or other bits: they would go to this user's group.
    fn settle(&self, f: &tempfile::NamedTempFile, mode: u32, key: bool) -> anyhow::Result<()> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mut mode = self.kept.map_or(mode, |(m, _, _)| m);
            if let Some((_, uid, gid)) = self.kept
                && let Err(e) = std::os::unix::fs::chown(f.path(), Some(uid), Some(gid))
            {
                eprintln!(
                    "warning: cannot give the new {} to user {uid}, group {gid} as the old one was ({e}): a node running as that user may not read it; chown it",
                    self.path.display()
                );
                if key {
                    mode &= 0o700;
                }
            }
            f.as_file()
                .set_permissions(std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("setting the mode of {}", self.path.display()))?;
        }
        #[cfg(not(unix))]
        let _ = (mode, key);
        f.as_file()
            .sync_all()
            .with_context(|| format!("syncing the new {}", self.path.display()))
    }
}

/// `cluster cert`: issue, check as a node would at start, then move into
/// place (the key first: a crash between the two renames leaves a pair
/// the node refuses at start, "the private key does not belong", and the
/// command can be run again). One run at a time per directory.
pub fn run_cert(args: CertArgs) -> anyhow::Result<ExitCode> {
    let (identity, name) = match args.node {
        Some(id) => (Identity::Node(id), format!("node-{id}")),
        None => (Identity::Client, "client".to_string()),
    };
    if !args.dir.join("ca.pem").exists() && !args.dir.join(format!("{name}.toml")).exists() {
        bail!(
            "{} holds neither ca.pem nor {name}.toml: is --dir the directory `cluster init` wrote?",
            args.dir.display()
        );
    }
    // Two runs at once replaced the certificate of one and the key of the
    // other (operator run): the second waits for nothing and says so. A
    // file of its own (a directory cannot be locked everywhere: NFS).
    let lock_path = args.dir.join(".replicator-cert.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "another `cluster cert` is running in {}: wait for it, then run this again",
            args.dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => eprintln!(
            "warning: cannot lock {} ({e}): make sure no other `cluster cert` runs on these files",
            lock_path.display()
        ),
    }
    let (paths, configured) = tls_paths_of(&args.dir, &name)?;
    let ca_pem = std::fs::read_to_string(&paths.ca)
        .with_context(|| format!("reading the CA certificate {}", paths.ca.display()))?;
    if let Some(w) = replicator::transport::tls::exposed_key_warning(&args.ca_key) {
        eprintln!("warning: {w}");
    }
    let ca_key = std::fs::read_to_string(&args.ca_key)
        .with_context(|| format!("reading the CA key {}", args.ca_key.display()))?;
    let ca = GeneratedCa::from_pem(&ca_pem, &ca_key)
        .with_context(|| format!("{} with {}", paths.ca.display(), args.ca_key.display()))?;
    if !args.replace
        && let Some(p) = [&paths.cert, &paths.key].into_iter().find(|p| p.exists())
    {
        bail!(
            "{} already exists: add --replace to overwrite it (a running node goes on with the old certificate until it restarts)",
            p.display()
        );
    }
    let not_after = args
        .days
        .map(|d| std::time::SystemTime::now() + Duration::from_secs(u64::from(d) * 86_400));
    let (cert, key) = ca.issue_until(identity, not_after)?;
    let (key_file, cert_file) = (Replaced::at(&paths.key)?, Replaced::at(&paths.cert)?);
    let ca_file = Replaced::at(&paths.ca)?.path;
    if ca_file == cert_file.path || ca_file == key_file.path {
        bail!(
            "the config's `ca` is the same file as its `cert` or `key` ({}): give the CA certificate a file of its own",
            paths.ca.display()
        );
    }
    // One file for both (a node reads its certificate and its key from a
    // combined PEM): written once. Two renames onto one path left the
    // certificate alone, and the key was lost (review).
    let combined = key_file.path == cert_file.path;
    let staged_key = key_file.stage(&if combined {
        format!("{cert}{key}")
    } else {
        key.clone()
    })?;
    let staged_cert = if combined {
        None
    } else {
        Some(cert_file.stage(&cert)?)
    };
    // What a node checks at start: the identity, the chain to its `ca`,
    // the key's match, the validity.
    let staged_cert_path = staged_cert
        .as_ref()
        .map_or(staged_key.path(), |c| c.path())
        .to_path_buf();
    let checked = TlsMaterial::load(&TlsPaths {
        ca: paths.ca.clone(),
        cert: staged_cert_path,
        key: staged_key.path().to_path_buf(),
    })
    .and_then(|m| {
        m.check_own_identity(identity)?;
        m.not_after()
    });
    let until = checked.context(
        "the new certificate failed the checks a node makes at start; nothing was replaced",
    )?;
    key_file.settle(&staged_key, 0o600, true)?;
    if let Some(c) = &staged_cert {
        cert_file.settle(c, 0o644, false)?;
    }
    let mut moves = vec![(staged_key, &key_file.path)];
    moves.extend(staged_cert.map(|c| (c, &cert_file.path)));
    for (n, (staged, to)) in moves.into_iter().enumerate() {
        staged.persist(to).with_context(|| {
            if n == 0 {
                format!("moving the new file to {}; nothing was replaced", to.display())
            } else {
                format!(
                    "moving the new certificate to {}: the key {} is the new one already and does not match the old certificate; run this again with --replace before the node (or client) restarts",
                    to.display(),
                    key_file.path.display()
                )
            }
        })?;
        // The rename itself survives a crash.
        let dir = to.parent().unwrap_or(Path::new("."));
        if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
            eprintln!("warning: cannot sync {}: {e}", dir.display());
        }
    }
    let whose = args
        .node
        .map_or("the client's".to_string(), |id| format!("node {id}'s"));
    println!(
        "issued {whose} certificate, valid until {}: {} and {}",
        replicator::transport::tls::rfc3339(until),
        paths.cert.display(),
        paths.key.display()
    );
    let config = args.dir.join(format!("{name}.toml"));
    match args.node {
        Some(id) if configured => println!(
            "  node {id} uses it from its next start: stop it (SIGTERM: it hands its partitions over first) and start it again with `replicator node --config {}`",
            config.display()
        ),
        Some(id) => println!(
            "  {} does not exist: for a node added by hand, copy a node config and give it `node_id = {id}`, its own ports and `data_dir`, and these two files under [tls]",
            config.display()
        ),
        None if configured => println!("  client commands use it from now on"),
        None => println!(
            "  {} does not exist: point a client config's [tls] `cert` and `key` at these files",
            config.display()
        ),
    }
    drop(lock);
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct NodeArgs {
    /// The node's config file (from `replicator cluster init`).
    #[arg(long)]
    pub config: PathBuf,
    /// Threads running the node's tasks (QUIC, partitions, fetching,
    /// storage plugins); file I/O that waits for the disk runs on a pool of
    /// its own. Default: one per core.
    /// Lower it when several nodes share a machine (`demo` and `bench`
    /// give each of their three nodes a third of the cores): fewer threads
    /// handing work to each other means fewer wake-ups per commit.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
}

pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

pub async fn run_node(args: NodeArgs) -> anyhow::Result<ExitCode> {
    let config = NodeConfig::load(&args.config)?;
    // Where the store is: its endpoints (etcd), else its directory.
    let store = if config.metadata.endpoints.is_empty() {
        format!("in {}", config.metadata.dir.display())
    } else {
        format!("at {}", config.metadata.endpoints.join(", "))
    };
    eprintln!(
        "node {} starting: QUIC {}, data {}, storage `{}`, metadata `{}` {store}",
        config.node_id,
        config.listen,
        config.data_dir.display(),
        config.storage.plugin,
        config.metadata.plugin,
    );
    node::run(config, shutdown_signal(), None).await?;
    Ok(ExitCode::SUCCESS)
}
