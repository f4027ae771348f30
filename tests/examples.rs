//! The example plugins under `examples/` build with their `build.sh` and
//! pass the conformance suite.

use std::path::Path;
use std::process::Command;

use replicator::conformance::{self, Options, Subject};
use replicator::plugin::{PluginRuntime, Sandbox, StoragePlugin, inspect};

/// Run `examples/<name>/build.sh OUT_DIR` and return the component's bytes.
fn build_example(name: &str, out: &Path) -> Vec<u8> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ lives in the repository");
    let script = root.join("examples").join(name).join("build.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script).arg(out);
    // Flags of this (host) build must not reach the wasm build.
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "RUSTC_WRAPPER"] {
        cmd.env_remove(var);
    }
    let output = cmd.output().expect("run build.sh");
    assert!(
        output.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::read(out.join(format!("{name}.wasm"))).expect("build.sh wrote OUT_DIR/<name>.wasm")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_storage_example_builds_and_conforms() {
    let out = tempfile::tempdir().expect("tempdir");
    let wasm = build_example("storage-rust", out.path());
    let runtime = PluginRuntime::new(None).expect("runtime");

    let report = inspect(&runtime, "storage-rust", &wasm).expect("a component");
    assert_eq!(report.kind.map(|k| k.world()), Some("storage-plugin"));
    assert_eq!(report.accepted, Ok(()));

    let plugin = StoragePlugin::from_bytes(runtime, "storage-rust", &wasm, Sandbox::default())
        .expect("the example loads");
    let scratch = tempfile::tempdir().expect("tempdir");
    let options = Options {
        proptest_cases: 32,
        filter: None,
    };
    let report = conformance::run(
        &Subject::new(plugin, vec![]),
        scratch.path(),
        &options,
        |_| {},
    )
    .await;
    println!("{report}");
    assert_eq!(
        report.failed(),
        0,
        "the example fails conformance:\n{report}"
    );
    assert!(report.passed() >= 9, "too few cases ran:\n{report}");
}

/// The plugin SDK builds when copied next to a plugin author's crate, as
/// the example's Cargo.toml suggests: it inherited its version, edition
/// and dependency from this repository's workspace, and a copy failed with
/// "failed to find a workspace root" (exploratory plugin-author run).
#[test]
fn the_sdk_builds_when_copied_out_of_the_repository() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ lives in the repository");
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("sdk");
    let copied = Command::new("cp")
        .arg("-r")
        .arg(root.join("plugins/sdk"))
        .arg(&copy)
        .status()
        .expect("cp");
    assert!(copied.success());
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["check", "--offline", "--quiet"])
        .current_dir(&copy)
        .env("CARGO_TARGET_DIR", dir.path().join("target"));
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "RUSTC_WRAPPER"] {
        cmd.env_remove(var);
    }
    let out = cmd.output().expect("cargo check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
