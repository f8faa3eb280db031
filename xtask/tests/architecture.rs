//! docs/architecture.md's crate table against the Cargo manifests: every crate of the project
//! (workspace members, `kernels-cubecl/`, `python/` and the downstream crates under `examples/`) has a row,
//! every row names a crate, and the project's crates a row says it depends on (written in
//! backticks in its last column) are exactly the project's crates its manifest lists under
//! `[dependencies]`. The doc is the design as built: this keeps it so.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Package name and every crate under `[dependencies]` of one manifest.
fn manifest(path: &Path) -> (String, BTreeSet<String>) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (mut section, mut name, mut deps) = (String::new(), None, BTreeSet::new());
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line.trim_matches(|c| c == '[' || c == ']').to_string();
            continue;
        }
        let Some((key, value)) = line.split_once('=') else { continue };
        let key = key.trim();
        if section == "package" && key == "name" {
            name = Some(value.trim().trim_matches('"').to_string());
        }
        // `name = …` or `name.workspace = true`.
        if section == "dependencies" {
            deps.insert(key.split('.').next().unwrap_or(key).to_string());
        }
    }
    (name.unwrap_or_else(|| panic!("{}: no [package] name", path.display())), deps)
}

/// Every crate of the project (`crates/*`, `kernels-cubecl`, `python`, `xtask`, `examples/*`) and the
/// project's crates it depends on.
fn manifests() -> BTreeMap<String, BTreeSet<String>> {
    let root = root();
    let mut paths =
        vec![root.join("kernels-cubecl/Cargo.toml"), root.join("python/Cargo.toml"), root.join("xtask/Cargo.toml")];
    for dir in ["crates", "examples"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let p = entry.unwrap().path().join("Cargo.toml");
            if p.is_file() {
                paths.push(p);
            }
        }
    }
    let all: BTreeMap<String, BTreeSet<String>> = paths.iter().map(|p| manifest(p)).collect();
    let ours: BTreeSet<String> = all.keys().cloned().collect();
    all.into_iter().map(|(name, deps)| (name, deps.intersection(&ours).cloned().collect())).collect()
}

/// The rows of the table under `## Crates`: crate name → the names in backticks in its last
/// column that are among `crates` (the others are outside crates or code).
fn table(doc: &str, crates: &BTreeSet<String>) -> BTreeMap<String, BTreeSet<String>> {
    let start = doc.find("\n## Crates").expect("docs/architecture.md has a `## Crates` section");
    let mut rows = BTreeMap::new();
    for line in doc[start..].lines().skip(1).skip_while(|l| !l.starts_with('|')).take_while(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').map(str::trim).collect();
        let Some(name) = cells.first().and_then(|c| c.strip_prefix('`')).and_then(|c| c.strip_suffix('`')) else {
            continue; // the header and its rule
        };
        let deps = cells.last().unwrap().split('`').skip(1).step_by(2);
        let deps = deps.filter(|d| crates.contains(*d)).map(str::to_string).collect();
        assert!(rows.insert(name.to_string(), deps).is_none(), "`{name}` has two rows");
    }
    rows
}

#[test]
fn the_crate_table_matches_the_manifests() {
    let doc = std::fs::read_to_string(root().join("docs/architecture.md")).unwrap();
    let manifests = manifests();
    let table = table(&doc, &manifests.keys().cloned().collect());
    let mut wrong = Vec::new();
    for (name, deps) in &manifests {
        match table.get(name) {
            None => wrong.push(format!("`{name}` has no row")),
            Some(row) if row != deps => {
                wrong.push(format!("`{name}`: the table says it depends on {row:?}, its manifest on {deps:?}"))
            }
            Some(_) => {}
        }
    }
    wrong.extend(table.keys().filter(|n| !manifests.contains_key(*n)).map(|n| format!("row `{n}` names no crate")));
    assert!(wrong.is_empty(), "docs/architecture.md's crate table disagrees with the manifests:\n{}", wrong.join("\n"));
}

#[test]
fn the_readers_find_rows_and_dependencies() {
    let doc = "# x\n\n## Crates\n| crate | job | depends on |\n|---|---|---|\n| `needle-a` | a | `needle-b`, `rayon` |\n\nafter\n";
    let crates = BTreeSet::from(["needle-a".to_string(), "needle-b".to_string()]);
    let t = table(doc, &crates);
    assert_eq!(t.len(), 1);
    assert_eq!(t["needle-a"], BTreeSet::from(["needle-b".to_string()]));
    let m = manifests();
    assert!(m["needle-kv"].contains("needle-core") && m["xtask"].contains("needle-fetch"), "{m:?}");
}
