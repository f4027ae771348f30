//! The storage conformance suite: what every storage plugin must do, run
//! against a real instance (the metadata suite is in [`metadata`]; both
//! report through [`Report`]). Tests run it for each plugin under `plugins/`
//! and users run it as `replicator plugin check <name|path.wasm>`.
//!
//! Every case opens a fresh log in its own directory. Cases that need
//! persistence (reopen, torn tail) are skipped for plugins that keep
//! nothing across instances, and say so.

/// `ensure!(cond, "why {x}")`: fail the case with that message unless
/// `cond` holds (every case of both suites).
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

mod cases;
pub mod metadata;
mod model;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::time::{Duration, Instant};

use crate::plugin::{PluginLog, StoragePlugin};
use crate::storage::StorageResult;

/// The plugin under test and the settings it is opened with.
#[derive(Clone)]
pub struct Subject {
    pub plugin: StoragePlugin,
    pub config: Vec<(String, String)>,
    /// Whether the plugin must keep data across instances. `None`: find
    /// out, and skip the persistence cases if it keeps nothing; `Some(true)`:
    /// a plugin that comes back empty fails them.
    pub persistent: Option<bool>,
}

impl Subject {
    pub fn new(plugin: StoragePlugin, config: Vec<(String, String)>) -> Self {
        Subject {
            plugin,
            config,
            persistent: None,
        }
    }

    pub fn persistent(mut self, persistent: bool) -> Self {
        self.persistent = Some(persistent);
        self
    }

    /// The verdict for a reopened log that came back empty: a skip if the
    /// plugin may keep nothing, a failure if it must keep its data.
    pub(crate) fn came_back_empty(&self) -> CaseResult {
        match self.persistent {
            Some(true) => Err(
                "the log came back empty after reopening; this plugin must keep its data".into(),
            ),
            _ => Ok(Some("the plugin keeps nothing across instances".into())),
        }
    }

    /// Open the log kept in `dir`. The topic is named after the directory
    /// too, so a plugin that stores elsewhere (an object store) keeps each
    /// case's logs apart as well.
    pub async fn open(&self, dir: &Path) -> StorageResult<PluginLog> {
        self.plugin
            .open(&topic_for(dir), 0, self.config.clone(), Some(dir))
            .await
    }
}

/// `conformance.<parent>.<dir>` from the last two components of `dir`,
/// characters other than `[A-Za-z0-9._-]` replaced by `_`.
fn topic_for(dir: &Path) -> String {
    let mut parts: Vec<String> = dir
        .components()
        .rev()
        .take(2)
        .map(|c| {
            c.as_os_str()
                .to_string_lossy()
                .chars()
                .map(|ch| {
                    if ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-') {
                        ch
                    } else {
                        '_'
                    }
                })
                .collect()
        })
        .collect();
    parts.push("conformance".into());
    parts.reverse();
    parts.join(".")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Failed(String),
    Skipped(String),
}

#[derive(Debug, Clone)]
pub struct CaseReport {
    pub name: &'static str,
    pub outcome: Outcome,
    pub elapsed: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub cases: Vec<CaseReport>,
}

impl Report {
    pub fn failed(&self) -> usize {
        self.cases
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Failed(_)))
            .count()
    }
    pub fn passed(&self) -> usize {
        self.cases
            .iter()
            .filter(|c| c.outcome == Outcome::Passed)
            .count()
    }
    pub fn skipped(&self) -> usize {
        self.cases
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Skipped(_)))
            .count()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in &self.cases {
            let (mark, note) = match &c.outcome {
                Outcome::Passed => ("ok  ", String::new()),
                Outcome::Failed(m) => ("FAIL", format!(": {m}")),
                Outcome::Skipped(m) => ("skip", format!(": {m}")),
            };
            writeln!(f, "{mark} {:<28} {:>8.1?}{note}", c.name, c.elapsed)?;
        }
        write!(
            f,
            "{} passed, {} failed, {} skipped",
            self.passed(),
            self.failed(),
            self.skipped()
        )
    }
}

/// What a case returns: `Ok(None)` passed, `Ok(Some(why))` skipped.
pub type CaseResult = Result<Option<String>, String>;
type CaseFn = for<'a> fn(
    &'a Subject,
    &'a Path,
    &'a Options,
) -> Pin<Box<dyn Future<Output = CaseResult> + Send + 'a>>;

/// Options of a run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Random operation sequences the model-based case tries.
    pub proptest_cases: u32,
    /// Only run cases whose name contains this.
    pub filter: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            proptest_cases: 64,
            filter: None,
        }
    }
}

/// Run every case against `subject`, each in a fresh directory under
/// `scratch`; `progress` is told each case's name before it runs.
pub async fn run(
    subject: &Subject,
    scratch: &Path,
    options: &Options,
    mut progress: impl FnMut(&str),
) -> Report {
    let mut report = Report::default();
    for (name, case) in cases::ALL {
        if options.filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        progress(name);
        let dir = scratch.join(name);
        report
            .cases
            .push(run_case(name, &dir, case(subject, &dir, options)).await);
    }
    report
}

/// Run one case (not started yet) in `dir`, created first, and time it.
async fn run_case(
    name: &'static str,
    dir: &Path,
    case: impl Future<Output = CaseResult>,
) -> CaseReport {
    let started = Instant::now();
    let outcome = if let Err(e) = std::fs::create_dir_all(dir) {
        Outcome::Failed(format!("cannot create {}: {e}", dir.display()))
    } else {
        match case.await {
            Ok(None) => Outcome::Passed,
            Ok(Some(why)) => Outcome::Skipped(why),
            Err(why) => Outcome::Failed(why),
        }
    };
    CaseReport {
        name,
        outcome,
        elapsed: started.elapsed(),
    }
}
