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
    let mut names: Vec<String> = INDEXES.iter().map(|(n, f, _)| format!("{n} ({f})")).collect();
    names.extend(registered_indexes().into_iter().map(|(n, _)| n));
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

/// Makes an empty index for `dim`-float vectors from the spec string it was asked by.
pub type IndexBuilder = dyn Fn(usize, &str) -> Result<Box<dyn VectorIndex>> + Send + Sync;

type IndexRegistry = std::sync::RwLock<Vec<(String, String, std::sync::Arc<IndexBuilder>)>>;

/// Indexes registered by other crates, by lower-case name.
static REGISTERED: std::sync::LazyLock<IndexRegistry> = std::sync::LazyLock::new(Default::default);

/// Makes an index from another crate available by name to [`index_factory`], and so to
/// `retrieval:index=NAME` and `needle bench index --indexes NAME`. The builder gets the
/// dimension and the spec string as given. `about` is a one-line description.
///
/// Errors when the name is empty, holds `,` or `=`, or is taken (a built-in name or a
/// registered one).
pub fn register_index(
    name: &str,
    about: &str,
    build: impl Fn(usize, &str) -> Result<Box<dyn VectorIndex>> + Send + Sync + 'static,
) -> Result<()> {
    let name = name.trim().to_ascii_lowercase();
    if name.is_empty() || name.contains([',', '=']) {
        return Err(Error::invalid("index name", format!("`{name}` must be non-empty without `,` or `=`")));
    }
    let mut reg = REGISTERED.write().map_err(|_| Error::invalid("index registry", "poisoned by a panic"))?;
    if INDEXES.iter().any(|(n, _, _)| *n == name) || reg.iter().any(|(n, _, _)| *n == name) {
        return Err(Error::invalid("index name", format!("`{name}` is already registered")));
    }
    reg.push((name, about.to_string(), std::sync::Arc::new(build)));
    Ok(())
}

/// Index names registered with [`register_index`], with their descriptions.
pub fn registered_indexes() -> Vec<(String, String)> {
    REGISTERED.read().map(|r| r.iter().map(|(n, a, _)| (n.clone(), a.clone())).collect()).unwrap_or_default()
}

fn registered(name: &str) -> Option<std::sync::Arc<IndexBuilder>> {
    let name = name.trim().to_ascii_lowercase();
    REGISTERED.read().ok()?.iter().find(|(n, _, _)| *n == name).map(|(_, _, b)| b.clone())
}

/// An empty index for `dim`-float vectors from a short name (`flat`, `graph`, `hnsw`, `ivfpq`,
/// `lsh`; see [`INDEXES`]), a name registered with [`register_index`], or a factory string of one of the index crates (`RoarGraph32`,
/// `HNSW16`, `IVF256,PQ16`, `LSH8x64`, ...), delegating to that crate's `from_factory`.
///
/// Errors name the parameter (`index`) and list the valid forms; an index whose crate is not
/// compiled in names the Cargo feature that enables it.
pub fn index_factory(dim: usize, name_or_spec: &str) -> Result<Box<dyn VectorIndex>> {
    if dim == 0 {
        return Err(Error::invalid("dim", "must be at least 1"));
    }
    if let Some(build) = registered(name_or_spec) {
        return build(dim, name_or_spec);
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

    #[test]
    fn registered_indexes_resolve_by_name() {
        register_index("test-exact", "a flat scan under another name", |dim, spec| {
            assert_eq!(spec, "Test-Exact");
            Ok(Box::new(FlatIndex::new(dim)))
        })
        .unwrap();
        assert_eq!(index_factory(16, "Test-Exact").unwrap().dim(), 16);
        assert!(index_factory(8, "annoy").err().unwrap().to_string().contains("test-exact"));
        assert!(register_index("test-exact", "again", |_, _| unreachable!()).is_err());
        assert!(register_index("graph", "shadowing a built-in", |_, _| unreachable!()).is_err());
    }
}
