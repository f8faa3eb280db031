//! Index backends by name or factory string, shared by `retrieval` and the CLI's `bench index`.
//!
//! An index value (`retrieval:index=VALUE`) is a registered name (`graph`, `ivfpq`, ...) or a
//! FAISS-style factory string that starts with one and goes on with a digit (`IVF256,PQ16`,
//! `HNSW16`, `RoarGraph32r16p50`, `LSH8x64`): the builder registered under the longest such
//! name gets the string as given. The built-ins are registered through [`register_index`]
//! like any plugin.

use std::sync::Arc;

use needle_core::spec::Registry;
use needle_core::{Error, FlatIndex, Result, VectorIndex};

/// Makes an empty index for `dim`-float vectors from the value it was asked by (its name, or a
/// factory string starting with it).
pub type IndexBuilder = dyn Fn(usize, &str) -> Result<Box<dyn VectorIndex>> + Send + Sync;

static INDEXES: Registry<IndexBuilder> = Registry::new("index", &[], builtins);

/// Makes an index available by name to [`index_factory`], and so to `retrieval:index=NAME`
/// (or `NAME<digits>...`, a factory string) and `needle bench index --indexes NAME`. The
/// builder gets the dimension and the value as given. `about` is a one-line description.
///
/// Errors when the name is empty, holds whitespace, `:`, `,` or `=`, or is taken (built in or
/// registered before).
pub fn register_index(
    name: &str,
    about: &str,
    build: impl Fn(usize, &str) -> Result<Box<dyn VectorIndex>> + Send + Sync + 'static,
) -> Result<()> {
    INDEXES.register(name, about, Arc::new(build))
}

/// Every index name [`index_factory`] accepts, built in first, with its description.
pub fn index_names() -> Vec<(String, String)> {
    INDEXES.names()
}

fn missing(name: &str, feature: &str) -> Error {
    Error::invalid(
        "index",
        format!("index `{name}` needs the `{feature}` feature of needle-select, which this build was compiled without"),
    )
}

/// Built-in names whose crate is behind a feature of this crate that is off in this build.
fn not_compiled(name: &str) -> Option<&'static str> {
    let feature = match name {
        "graph" | "qgraph" | "roargraph" | "hnsw" => "graph",
        "ivfpq" | "ivf" | "pq" => "ivfpq",
        "lsh" => "lsh",
        _ => return None,
    };
    let on = match feature {
        "graph" => cfg!(feature = "graph"),
        "ivfpq" => cfg!(feature = "ivfpq"),
        _ => cfg!(feature = "lsh"),
    };
    (!on).then_some(feature)
}

/// The built-in indexes: each family under its factory prefix, with a short name for its
/// default configuration.
fn builtins() {
    // (name, description, factory string the bare name stands for, crate's factory)
    type Factory = fn(usize, &str) -> Result<Box<dyn VectorIndex>>;
    let flat: Factory = |dim, _| Ok(Box::new(FlatIndex::new(dim)));
    #[cfg(feature = "graph")]
    let graph: Option<Factory> = Some(needle_index_graph::from_factory);
    #[cfg(not(feature = "graph"))]
    let graph: Option<Factory> = None;
    #[cfg(feature = "ivfpq")]
    let ivfpq: Option<Factory> = Some(needle_index_ivfpq::from_factory);
    #[cfg(not(feature = "ivfpq"))]
    let ivfpq: Option<Factory> = None;
    #[cfg(feature = "lsh")]
    let lsh: Option<Factory> = Some(needle_index_lsh::from_factory);
    #[cfg(not(feature = "lsh"))]
    let lsh: Option<Factory> = None;
    let all: [(&str, &str, &str, Option<Factory>); 9] = [
        ("flat", "exact scan (Flat)", "Flat", Some(flat)),
        ("graph", "RoarGraph, degree 32 (RoarGraph32)", "RoarGraph32", graph),
        (
            "qgraph",
            "RoarGraph walked over 8-bit key codes, no copy of the keys, one walk per GQA group (RoarGraph32q8)",
            "RoarGraph32q8",
            graph,
        ),
        (
            "roargraph",
            "RoarGraph<m>[r<dims>[p<percent>][f]]: query-aware graph, optional projected walk",
            "RoarGraph32",
            graph,
        ),
        ("hnsw", "HNSW<m>: hierarchical navigable small world (hnsw = HNSW32)", "HNSW32", graph),
        ("ivfpq", "IVF-PQ, 256 lists, 16 sub-quantisers (IVF256,PQ16)", "IVF256,PQ16", ivfpq),
        ("ivf", "IVF<nlist>,PQ<m>[x<nbits>]: inverted lists of product-quantised codes", "IVF256,PQ16", ivfpq),
        ("pq", "PQ<m>[x<nbits>]: product quantisation, one list", "PQ16", ivfpq),
        ("lsh", "LSH[<K>x<L>]: SimHash tables, K bits × L tables (lsh = LSH8x64)", "LSH8x64", lsh),
    ];
    for (name, about, bare, factory) in all {
        let registered = register_index(name, about, move |dim, value| {
            let Some(factory) = factory else {
                return Err(missing(value, not_compiled(name).unwrap_or(name)));
            };
            factory(dim, if value.trim().eq_ignore_ascii_case(name) { bare } else { value.trim() })
        });
        debug_assert!(registered.is_ok(), "built-in index {name}: {registered:?}");
    }
}

/// The registered name `value` resolves to: itself, or the longest name it starts with that a
/// digit follows (a factory string). Errors name the value and list the valid forms.
pub(crate) fn resolve(value: &str) -> Result<String> {
    let v = value.trim().to_ascii_lowercase();
    let names = INDEXES.names();
    let name = names.iter().map(|(n, _)| n).find(|n| **n == v).or_else(|| {
        names
            .iter()
            .map(|(n, _)| n)
            .filter(|n| v.strip_prefix(n.as_str()).is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit())))
            .max_by_key(|n| n.len())
    });
    let Some(name) = name else {
        return Err(Error::invalid(
            "index",
            format!(
                "unknown index `{}`; valid: {}, or a factory string starting with one of them such as \
                 \"RoarGraph32\", \"HNSW16\", \"IVF256,PQ16\", \"PQ16x8\", \"LSH8x64\"",
                value.trim(),
                INDEXES.names_joined()
            ),
        ));
    };
    if let Some(feature) = not_compiled(name) {
        return Err(missing(value.trim(), feature));
    }
    Ok(name.clone())
}

/// An empty index for `dim`-float vectors from a registered name (`flat`, `graph`, `hnsw`,
/// `ivfpq`, `lsh`, or one added with [`register_index`]; see [`index_names`]) or a factory
/// string starting with one (`RoarGraph32`, `HNSW16`, `IVF256,PQ16`, `LSH8x64`, ...).
///
/// Errors name the parameter (`index`) and list the valid forms; an index whose crate is not
/// compiled in names the Cargo feature that enables it.
pub fn index_factory(dim: usize, value: &str) -> Result<Box<dyn VectorIndex>> {
    if dim == 0 {
        return Err(Error::invalid("dim", "must be at least 1"));
    }
    let build = INDEXES.get(&resolve(value)?)?;
    build(dim, value.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_factory_strings_resolve() {
        for (name, spec, feature) in [
            ("graph", "RoarGraph32", "graph"),
            ("qgraph", "RoarGraph32q8", "graph"),
            ("hnsw", "HNSW32", "graph"),
            ("roargraph", "RoarGraph32", "graph"),
            ("ivfpq", "IVF256,PQ16", "ivfpq"),
            ("pq", "PQ16", "ivfpq"),
            ("lsh", "LSH8x64", "lsh"),
            ("flat", "Flat", "always"),
        ] {
            if let Err(e) = resolve(name) {
                assert!(e.to_string().contains(&format!("`{feature}` feature")), "{e}");
                assert!(index_factory(8, spec).err().unwrap().to_string().contains(feature));
                continue;
            }
            let idx = index_factory(64, name).unwrap();
            assert_eq!(idx.dim(), 64);
            let again = index_factory(64, spec).unwrap();
            assert_eq!(idx.describe().to_ascii_lowercase(), again.describe().to_ascii_lowercase(), "{name}");
            // What an index describes itself as resolves back to it.
            assert_eq!(index_factory(64, &idx.describe()).unwrap().describe(), idx.describe(), "{name}");
        }
        assert_eq!(index_factory(8, "HNSW16").is_ok(), cfg!(feature = "graph"));
        assert_eq!(resolve(" IVF64,PQ16 ").ok().as_deref(), cfg!(feature = "ivfpq").then_some("ivf"));
        let e = index_factory(8, "annoy").err().unwrap().to_string();
        assert!(e.contains("graph") && e.contains("ivfpq") && e.contains("flat") && e.contains("`annoy`"), "{e}");
        // A name must be followed by a digit to start a factory string.
        assert!(index_factory(8, "flatter").is_err());
        assert!(index_factory(0, "flat").is_err());
    }

    #[test]
    fn bad_factory_strings_name_the_string_and_the_valid_forms() {
        for (value, form, feature) in
            [("IVF256", "IVF1024,PQ32x8", cfg!(feature = "ivfpq")), ("HNSW16x", "HNSW<m>", cfg!(feature = "graph"))]
        {
            if !feature {
                continue;
            }
            let e = index_factory(64, value).err().unwrap().to_string();
            assert!(e.contains(value) && e.contains(form), "{e}");
        }
        if cfg!(feature = "lsh") {
            let e = index_factory(64, "LSH8").err().unwrap().to_string();
            assert!(e.contains("LSH8") && e.contains("LSH10x64"), "{e}");
        }
    }

    #[test]
    fn registered_indexes_resolve_by_name_and_prefix() {
        register_index("test-exact", "a flat scan under another name", |dim, spec| {
            assert!(spec.eq_ignore_ascii_case("test-exact") || spec == "test-exact7", "{spec}");
            Ok(Box::new(FlatIndex::new(dim)))
        })
        .unwrap();
        assert_eq!(index_factory(16, "Test-Exact").unwrap().dim(), 16);
        assert_eq!(index_factory(16, "test-exact7").unwrap().dim(), 16);
        assert!(index_names().iter().any(|(n, _)| n == "test-exact"));
        assert!(index_factory(8, "annoy").err().unwrap().to_string().contains("test-exact"));
        assert!(register_index("test-exact", "again", |_, _| unreachable!()).is_err());
        assert!(register_index("graph", "shadowing a built-in", |_, _| unreachable!()).is_err());
    }
}
