//! What a component targets: its imports and exports by full name, the
//! world and `replicator:plugin` version they imply, and whether this host
//! accepts it. Used at load (the versioned check before linking) and by
//! `replicator plugin inspect`.

use wasmtime::Engine;
use wasmtime::component::Component;

use super::bindings::StoragePluginPre;
use super::bindings::metadata::MetadataPluginPre;
use super::{LoadError, PluginRuntime, WIT_PACKAGE, WIT_VERSION};

/// Which contract a component implements, by what it exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    Storage,
    Metadata,
}

impl PluginKind {
    /// The world of `wit/worlds.wit`.
    pub fn world(self) -> &'static str {
        match self {
            PluginKind::Storage => "storage-plugin",
            PluginKind::Metadata => "metadata-plugin",
        }
    }

    fn described(self) -> &'static str {
        match self {
            PluginKind::Storage => "storage plugin",
            PluginKind::Metadata => "metadata plugin",
        }
    }
}

/// What `replicator plugin inspect` reports about a component.
#[derive(Debug, Clone)]
pub struct Inspection {
    /// Display name: a built-in's name or the file stem.
    pub name: String,
    /// Size of the component in bytes.
    pub size: usize,
    /// `None`: it exports neither the storage nor the metadata interface.
    pub kind: Option<PluginKind>,
    /// The `replicator:plugin` version its imports and exports name (the
    /// first one seen if they disagree); `None` if it names none.
    pub wit_version: Option<String>,
    /// Full names, e.g. `wasi:filesystem/types@0.2.6`.
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    /// `Ok` if it links against this host's linker for its world, else the
    /// load error a node would report.
    pub accepted: Result<(), String>,
}

/// Compile `wasm` with `runtime` and report what it targets, trying to
/// link it as a node would. Errors only if it is not a component at all.
pub fn inspect(runtime: &PluginRuntime, name: &str, wasm: &[u8]) -> Result<Inspection, LoadError> {
    let component = runtime.compile(name, wasm)?;
    let targets = Targets::of(runtime.engine(), &component);
    let kind = targets.kind();
    let accepted = match kind {
        Some(PluginKind::Storage) => super::link(
            runtime,
            name,
            &component,
            PluginKind::Storage.world(),
            runtime.storage_linker(),
            StoragePluginPre::new,
        )
        .map(drop),
        Some(PluginKind::Metadata) => super::link(
            runtime,
            name,
            &component,
            PluginKind::Metadata.world(),
            runtime.metadata_linker(),
            MetadataPluginPre::new,
        )
        .map(drop),
        // Reports the version mismatch if there is one, else "not a plugin".
        None => targets.check(name, PluginKind::Storage.world()),
    };
    Ok(Inspection {
        name: name.to_string(),
        size: wasm.len(),
        kind,
        wit_version: targets.versions().into_iter().next(),
        imports: targets.imports,
        exports: targets.exports,
        accepted: accepted.map_err(|e| e.to_string()),
    })
}

/// The full names a component imports and exports.
pub(crate) struct Targets {
    imports: Vec<String>,
    exports: Vec<String>,
}

impl Targets {
    pub(crate) fn of(engine: &Engine, component: &Component) -> Self {
        let ty = component.component_type();
        Targets {
            imports: ty.imports(engine).map(|(n, _)| n.to_string()).collect(),
            exports: ty.exports(engine).map(|(n, _)| n.to_string()).collect(),
        }
    }

    fn kind(&self) -> Option<PluginKind> {
        let exports = |iface: &str| {
            self.exports
                .iter()
                .any(|e| replicator_interface(e).is_some_and(|(i, _)| i == iface))
        };
        if exports("storage") {
            Some(PluginKind::Storage)
        } else if exports("metadata") {
            Some(PluginKind::Metadata)
        } else {
            None
        }
    }

    /// The distinct `replicator:plugin` versions named, exports first;
    /// [`UNVERSIONED`] for a name without one.
    fn versions(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for name in self.exports.iter().chain(&self.imports) {
            if let Some((_, v)) = replicator_interface(name) {
                let v = v.unwrap_or(UNVERSIONED);
                if !out.iter().any(|o| o == v) {
                    out.push(v.to_string());
                }
            }
        }
        out
    }

    /// Before linking: the component must name only `replicator:plugin`
    /// versions this host can serve, and export the interface of `world`.
    pub(crate) fn check(&self, name: &str, world: &'static str) -> Result<(), LoadError> {
        if let Some(v) = self.versions().into_iter().find(|v| !compatible(v)) {
            return Err(LoadError::Version {
                plugin: name.to_string(),
                built_for: v,
            });
        }
        let expected = if world == PluginKind::Metadata.world() {
            PluginKind::Metadata
        } else {
            PluginKind::Storage
        };
        match self.kind() {
            None => Err(LoadError::NotAPlugin {
                plugin: name.to_string(),
                exports: if self.exports.is_empty() {
                    "nothing".to_string()
                } else {
                    self.exports.join(", ")
                },
            }),
            Some(found) if found != expected => Err(LoadError::WrongKind {
                plugin: name.to_string(),
                expected: expected.described(),
                found: found.described(),
            }),
            Some(_) => Ok(()),
        }
    }
}

/// `replicator:plugin/storage@0.1.0` -> `("storage", Some("0.1.0"))`.
fn replicator_interface(name: &str) -> Option<(&str, Option<&str>)> {
    let rest = name.strip_prefix(WIT_PACKAGE)?.strip_prefix('/')?;
    Some(match rest.split_once('@') {
        Some((iface, v)) => (iface, Some(v)),
        None => (rest, None),
    })
}

/// How a `replicator:plugin` name without a version shows in reports.
const UNVERSIONED: &str = "(no version)";

/// Whether `version` can be served by this host: the same version, or one
/// the component model treats as compatible, which wasmtime's linker then
/// matches: same major (>= 1), or same minor while the major is 0 (minor
/// >= 1). Pre-releases and 0.0.x match only exactly, as in wasmtime.
fn compatible(version: &str) -> bool {
    version == WIT_VERSION
        || semver_track(version).is_some_and(|t| Some(t) == semver_track(WIT_VERSION))
}

fn semver_track(version: &str) -> Option<(u64, Option<u64>)> {
    if version.contains('-') {
        return None;
    }
    let core = version.split('+').next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    let major = parts.next()??;
    let minor = parts.next()??;
    match (major, minor) {
        (0, 0) => None,
        (0, m) => Some((0, Some(m))),
        (m, _) => Some((m, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_names() {
        assert!(compatible("0.1.0"));
        assert!(compatible("0.1.3"));
        assert!(!compatible("0.2.0"));
        assert!(!compatible("1.0.0"));
        assert!(!compatible("garbage"));
        assert!(!compatible("0.1.0-rc1"), "pre-releases match only exactly");
        assert!(!compatible(UNVERSIONED));
        let t = Targets {
            imports: vec!["replicator:plugin/host".into()],
            exports: vec!["replicator:plugin/storage".into()],
        };
        assert!(
            matches!(t.check("x", "storage-plugin"), Err(LoadError::Version { built_for, .. }) if built_for == UNVERSIONED),
            "an unversioned contract is refused by version"
        );
        assert_eq!(
            replicator_interface("replicator:plugin/storage@0.1.0"),
            Some(("storage", Some("0.1.0")))
        );
        assert_eq!(replicator_interface("wasi:io/streams@0.2.0"), None);
        assert_eq!(replicator_interface("replicator:pluginx/storage"), None);
    }
}
