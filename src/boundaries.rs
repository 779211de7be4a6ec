//! The crate's module boundaries, enforced: a unit test reads the sources and fails on an import
//! that ARCHITECTURE.md says cannot exist (rust-analyzer's "boundaries the code enforces").
//!
//! It checks the top-level modules only (`src/<module>.rs` or `src/<module>/`); inside a module
//! the module's own test guards its layering (`bitrix::layering`, `journal::boundary`). An edge is
//! a `crate::<module>` path on a line that is not a comment, tests included: a test that needs a
//! forbidden module belongs beside the code that may use it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Imports the architecture forbids, each with the reason a reader needs when the test fails.
const FORBIDDEN: &[(&str, &str, &str)] = &[
    (
        "pipeline",
        "admin",
        "the data path knows nothing of the admin endpoint; the daemon wires them",
    ),
    (
        "pipeline",
        "alerts",
        "the data path knows nothing of alerts; the daemon wires them",
    ),
    (
        "pipeline",
        "daemon",
        "the daemon starts the pipeline, not the other way",
    ),
    ("admin", "daemon", "the daemon starts the admin endpoint"),
    ("alerts", "daemon", "the daemon starts the alerts"),
    (
        "sinks",
        "config",
        "a sink reads its keys through `options`, the leaf, never through `config`",
    ),
    (
        "options",
        "config",
        "`options` is the leaf `config` and `sinks` build on",
    ),
    (
        "bitrix",
        "config",
        "the client takes `ClientSettings`; it does not read the daemon's config",
    ),
    (
        "bitrix",
        "journal",
        "the client stores tokens through the `TokenStore` trait",
    ),
    (
        "journal",
        "pipeline",
        "the journal applies the settle lattice it owns",
    ),
    ("redact", "config", "the scrubber is a leaf"),
];

/// Modules that may depend on nothing else in the crate.
const LEAVES: &[&str] = &["redact", "json_depth", "envelope", "shutdown", "age", "pg"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Top-level module → the top-level modules its code (not its comments) names.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let uses = graph.entry(module.clone()).or_default();
        for line in text.lines() {
            let line = line.trim_start();
            if line.starts_with("//") {
                continue;
            }
            for (at, _) in line.match_indices("crate::") {
                let rest = &line[at + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
                    .collect();
                // `b24eventd_simulator::` and the like end in `crate::` only by accident
                let before = &line[..at];
                if before.ends_with(|c: char| c.is_alphanumeric() || c == '_') {
                    continue;
                }
                if !name.is_empty() && name != module {
                    uses.insert(name);
                }
            }
        }
    }
    graph
}

#[test]
fn the_forbidden_imports_are_absent() {
    let graph = module_graph();
    let mut broken = Vec::new();
    for (from, to, why) in FORBIDDEN {
        assert!(
            graph.contains_key(*from),
            "no module `{from}`: update FORBIDDEN"
        );
        if graph[*from].contains(*to) {
            broken.push(format!("`{from}` uses `crate::{to}`: {why}"));
        }
    }
    for leaf in LEAVES {
        let uses = &graph[*leaf];
        if !uses.is_empty() {
            broken.push(format!("`{leaf}` is a leaf but uses {uses:?}"));
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// The modules left after peeling, again and again, every module whose imports are all peeled
/// (Kahn's algorithm): empty when there is no cycle, else the modules on or behind one.
fn modules_on_a_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> BTreeSet<String> {
    let mut left: BTreeMap<&str, BTreeSet<&str>> = graph
        .iter()
        .map(|(m, uses)| {
            let uses = uses
                .iter()
                .map(String::as_str)
                .filter(|u| graph.contains_key(*u))
                .collect();
            (m.as_str(), uses)
        })
        .collect();
    loop {
        let done: Vec<&str> = left
            .iter()
            .filter(|(_, uses)| uses.is_empty())
            .map(|(m, _)| *m)
            .collect();
        if done.is_empty() {
            break;
        }
        for m in &done {
            left.remove(m);
        }
        for uses in left.values_mut() {
            for m in &done {
                uses.remove(m);
            }
        }
    }
    left.keys().map(|m| m.to_string()).collect()
}

#[test]
fn the_top_level_modules_form_no_cycle() {
    let on_a_cycle = modules_on_a_cycle(&module_graph());
    assert!(
        on_a_cycle.is_empty(),
        "modules that import each other around a cycle: {on_a_cycle:?}"
    );
}

#[test]
fn the_checker_finds_a_cycle_and_real_edges() {
    let made_up = |edges: &[(&str, &str)]| {
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (from, to) in edges {
            graph
                .entry(from.to_string())
                .or_default()
                .insert(to.to_string());
            graph.entry(to.to_string()).or_default();
        }
        graph
    };
    let cycle = made_up(&[("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")]);
    assert_eq!(
        modules_on_a_cycle(&cycle),
        ["a", "b", "c", "d"].map(String::from).into_iter().collect()
    );
    assert!(modules_on_a_cycle(&made_up(&[("a", "b"), ("b", "c")])).is_empty());
    // The graph read from the sources holds the edges the code has, so the tests above are not
    // vacuous.
    let graph = module_graph();
    assert!(graph["daemon"].contains("pipeline"));
    assert!(graph["pipeline"].contains("journal"));
    assert!(graph["sinks"].contains("options"));
}
