//! `mesh.toml` loading: the error corpus in `tests/config_errors/` and the shipped files.
//!
//! Each `tests/config_errors/NAME.toml` holds one mistake (or, for `multiple_errors`,
//! several) and `NAME.expected` the exact diagnostics, with the directory stripped from
//! the path. Adding a case is adding those two files; run with `MESH_BLESS=1` to write
//! the `.expected` files from the current output, then review them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mesh_supervisor::config;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The environment the corpus is checked against: deliberately empty, so that
/// `${NAME}` cases do not depend on the machine running the tests.
fn corpus_env() -> BTreeMap<String, String> {
    BTreeMap::new()
}

#[test]
fn error_corpus() {
    let dir = root().join("tests/config_errors");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("read tests/config_errors")
        .map(|entry| entry.expect("read a directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    cases.sort();
    assert!(!cases.is_empty(), "no cases in {}", dir.display());

    let prefix = format!("{}/", dir.display());
    let mut failures = Vec::new();
    for case in &cases {
        let name = case
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let expected_path = case.with_extension("expected");
        let actual = match config::load(case, &corpus_env()) {
            Ok(_) => "(no errors)".to_owned(),
            Err(errors) => errors.to_string().replace(&prefix, ""),
        };
        if std::env::var_os("MESH_BLESS").is_some() {
            std::fs::write(&expected_path, format!("{actual}\n")).expect("write .expected");
            continue;
        }
        let Ok(expected) = std::fs::read_to_string(&expected_path) else {
            failures.push(format!("{name}: missing {}", expected_path.display()));
            continue;
        };
        if actual.trim_end() != expected.trim_end() {
            failures.push(format!(
                "{name}:\n--- expected\n{}\n--- actual\n{}\n",
                expected.trim_end(),
                actual.trim_end()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// `mesh.toml` at the repository root and every `examples/**/*.toml` must load (but the
/// manifests of example crates, `Cargo.toml`, and whatever their builds leave under
/// `target/`).
#[test]
fn shipped_configs_are_valid() {
    let mut files = Vec::new();
    let root_file = root().join("mesh.toml");
    if root_file.is_file() {
        files.push(root_file);
    }
    collect_toml(&root().join("examples"), &mut files);
    files.retain(|f| {
        f.file_name().is_none_or(|n| n != "Cargo.toml")
            && !f.components().any(|c| c.as_os_str() == "target")
    });
    let mut failures = Vec::new();
    for file in &files {
        if let Err(errors) = config::load(file, &BTreeMap::new()) {
            failures.push(errors.to_string());
        }
    }
    assert!(
        failures.is_empty(),
        "invalid shipped configs:\n{}",
        failures.join("\n")
    );
}

fn collect_toml(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        if path.is_dir() {
            collect_toml(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "toml") {
            out.push(path);
        }
    }
}
