//! Builds the wasm plugins under `plugins/` for `wasm32-wasip2` and tells
//! the host crate where they are (`REPLICATOR_WASM_<NAME>`), in the style
//! of wasmtime's test-programs artifacts: a nested `cargo build` into its
//! own target directory, so `cargo build` at the root needs no extra step.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";
const PLUGINS: &[&str] = &[
    "storage-memory",
    "storage-file",
    "storage-s3",
    "metadata-file",
    "metadata-etcd",
    "test-hostile",
    "test-wrong-version",
];

fn main() {
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest
        .parent()
        .expect("host/ lives inside the workspace")
        .to_path_buf();
    for p in ["plugins", "wit", "Cargo.lock", "Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");

    check_target_installed();

    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target_dir = plugin_target_dir(&out_dir);
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args([
            "build",
            "--locked",
            "--profile",
            "plugin",
            "--target",
            TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    for p in PLUGINS {
        cmd.args(["-p", p]);
    }
    // Flags meant for the host build (coverage, clippy's wrapper, target
    // CPU tuning) must not leak into the wasm build.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    let output = cmd
        .output()
        .expect("failed to run cargo for the wasm plugins");
    if !output.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        panic!("building the wasm plugins for {TARGET} failed (output above)");
    }
    for p in PLUGINS {
        let file = p.replace('-', "_");
        let built = target_dir
            .join(TARGET)
            .join("plugin")
            .join(format!("{file}.wasm"));
        let dest = out_dir.join(format!("{p}.wasm"));
        std::fs::copy(&built, &dest)
            .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", built.display(), dest.display()));
        let var = format!("REPLICATOR_WASM_{}", file.to_uppercase());
        println!("cargo:rustc-env={var}={}", dest.display());
    }
}

/// One clear error, naming the fix, when the wasm target is missing.
fn check_target_installed() {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let libdir = Command::new(&rustc)
        .args(["--print", "target-libdir", "--target", TARGET])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let installed = libdir.as_deref().is_some_and(has_std);
    if !installed {
        // Exit rather than panic: one message, no backtrace.
        eprintln!(
            "\n\nThe Rust target `{TARGET}` is not installed; Replicator's storage plugins are built for it.\n\
             Fix: `rustup target add {TARGET}` (or run ./scripts/setup), then build again.\n"
        );
        std::process::exit(1);
    }
}

fn has_std(libdir: &Path) -> bool {
    std::fs::read_dir(libdir)
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("libstd-"))
        })
        .unwrap_or(false)
}

/// A stable directory for the nested build, so it stays incremental: next
/// to the host's own target directory when it can be found.
fn plugin_target_dir(out_dir: &Path) -> PathBuf {
    if let Ok(dir) = env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(dir).join("wasm-plugins");
    }
    // OUT_DIR is <target>/[<triple>/]<profile>/build/<pkg>-<hash>/out.
    out_dir
        .ancestors()
        .find(|a| a.join("CACHEDIR.TAG").exists())
        .map(|t| t.join("wasm-plugins"))
        .unwrap_or_else(|| out_dir.join("wasm-plugins"))
}
