//! The storage plugin written in JavaScript (examples/storage-js, built
//! with componentize-js by scripts/build-examples): the whole storage
//! conformance suite, persistence included, with and without its write
//! buffer, and a 3-node cluster on it.

mod support;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// `<target>/examples/storage-js.wasm` (see `support::examples`).
fn js_wasm() -> &'static Path {
    static WASM: OnceLock<PathBuf> = OnceLock::new();
    WASM.get_or_init(|| {
        support::examples::built(
            "storage-js",
            &[
                "app.js",
                "build.sh",
                "package-lock.json",
                "wit-js/storage-js.wit",
            ],
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_plugin_conforms_persistently() {
    support::examples::conforms("storage-js", js_wasm(), &[]).await;
}

/// The write buffer on (small, so it fills and is written out in the
/// middle of sequences) and compaction at nearly every prefix delete:
/// reads that span the file and the buffer, cuts of buffered bytes, and
/// reopening after a compaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_plugin_conforms_buffered_and_compacting_eagerly() {
    support::examples::conforms(
        "storage-js",
        js_wasm(),
        &[
            ("write.buffer.bytes", "1000"),
            ("compact.bytes", "0"),
            ("fsync", "never"),
        ],
    )
    .await;
}

#[test]
fn three_nodes_replicate_on_the_js_plugin() {
    support::examples::three_nodes_replicate_on(js_wasm(), "js");
}
