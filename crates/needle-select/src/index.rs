//! Index backends by name or factory string, shared by `retrieval` and the CLI's `bench index`.

use needle_core::{Error, FlatIndex, Result, VectorIndex};

/// Index names [`index_factory`] accepts, with the factory string each stands for and the
/// Cargo feature of this crate that compiles it in.
pub const INDEXES: &[(&str, &str, &str)] = &[
    ("graph", "RoarGraph32", "graph"),
    ("hnsw", "HNSW32", "graph"),
    ("ivfpq", "IVF256,PQ16", "ivfpq"),
    ("lsh", "LSH8x64", "lsh"),
    ("flat", "Flat", "always"),
];

/// Which crate builds an index, and from which factory string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Backend {
    Flat,
    Graph(String),
    IvfPq(String),
    Lsh(String),
}

fn valid_forms() -> String {
    let names: Vec<String> = INDEXES.iter().map(|(n, f, _)| format!("{n} ({f})")).collect();
    format!(
        "valid: {}; or a factory string \"RoarGraph<m>\", \"HNSW<m>\", \"IVF<nlist>,PQ<m>\", \"LSH<K>x<L>\"",
        names.join(", ")
    )
}

/// Resolves a short name or factory string to its backend, without building anything.
pub(crate) fn resolve(name_or_spec: &str) -> Result<Backend> {
    let s = name_or_spec.trim();
    let b = match s.to_ascii_lowercase().as_str() {
        "flat" => Backend::Flat,
        "graph" | "roargraph" => Backend::Graph("RoarGraph32".into()),
        "hnsw" => Backend::Graph("HNSW32".into()),
        "ivfpq" => Backend::IvfPq("IVF256,PQ16".into()),
        "lsh" => Backend::Lsh("LSH8x64".into()),
        _ if s.starts_with("RoarGraph") || s.starts_with("HNSW") => Backend::Graph(s.into()),
        _ if s.starts_with("IVF") || s.starts_with("PQ") => Backend::IvfPq(s.into()),
        _ if s.starts_with("LSH") => Backend::Lsh(s.into()),
        _ => return Err(Error::invalid("index", format!("unknown index `{s}`; {}", valid_forms()))),
    };
    check_compiled(&b, s)?;
    Ok(b)
}

fn missing(s: &str, feature: &str) -> Error {
    Error::invalid(
        "index",
        format!("index `{s}` needs the `{feature}` feature of needle-select, which this build was compiled without"),
    )
}

#[allow(unused_variables)] // `s` is unused when every feature is on.
fn check_compiled(b: &Backend, s: &str) -> Result<()> {
    match b {
        Backend::Flat => Ok(()),
        #[cfg(not(feature = "graph"))]
        Backend::Graph(_) => Err(missing(s, "graph")),
        #[cfg(not(feature = "ivfpq"))]
        Backend::IvfPq(_) => Err(missing(s, "ivfpq")),
        #[cfg(not(feature = "lsh"))]
        Backend::Lsh(_) => Err(missing(s, "lsh")),
        #[allow(unreachable_patterns)]
        _ => Ok(()),
    }
}

/// An empty index for `dim`-float vectors from a short name (`flat`, `graph`, `hnsw`, `ivfpq`,
/// `lsh`; see [`INDEXES`]) or a factory string of one of the index crates (`RoarGraph32`,
/// `HNSW16`, `IVF256,PQ16`, `LSH8x64`, ...), delegating to that crate's `from_factory`.
///
/// Errors name the parameter (`index`) and list the valid forms; an index whose crate is not
/// compiled in names the Cargo feature that enables it.
pub fn index_factory(dim: usize, name_or_spec: &str) -> Result<Box<dyn VectorIndex>> {
    if dim == 0 {
        return Err(Error::invalid("dim", "must be at least 1"));
    }
    match resolve(name_or_spec)? {
        Backend::Flat => Ok(Box::new(FlatIndex::new(dim))),
        #[cfg(feature = "graph")]
        Backend::Graph(s) => needle_index_graph::from_factory(dim, &s),
        #[cfg(feature = "ivfpq")]
        Backend::IvfPq(s) => needle_index_ivfpq::from_factory(dim, &s),
        #[cfg(feature = "lsh")]
        Backend::Lsh(s) => needle_index_lsh::from_factory(dim, &s),
        #[allow(unreachable_patterns)]
        other => Err(missing(name_or_spec, &format!("{other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_factory_strings_resolve() {
        for (name, spec, feature) in INDEXES {
            if let Err(e) = resolve(name) {
                assert!(e.to_string().contains(&format!("`{feature}` feature")), "{e}");
                continue;
            }
            let idx = index_factory(64, name).unwrap();
            assert_eq!(idx.dim(), 64);
            let again = index_factory(64, spec).unwrap();
            assert_eq!(idx.describe().to_ascii_lowercase(), again.describe().to_ascii_lowercase(), "{name}");
        }
        assert_eq!(index_factory(8, "HNSW16").is_ok(), cfg!(feature = "graph"));
        let e = index_factory(8, "annoy").err().unwrap().to_string();
        assert!(e.contains("graph") && e.contains("ivfpq") && e.contains("flat"), "{e}");
        assert!(index_factory(0, "flat").is_err());
    }
}
