//! Selector specs: `name[:key=value,...]`, e.g. `retrieval:index=graph,k=100`, parsed into a
//! factory plus the budget and model settings that go with it, by the one grammar and registry
//! of [`needle_core::spec`]. Every built-in is registered through [`register_selector`], as a
//! plugin is.

use std::sync::Arc;

use needle_core::spec::Registry;
use needle_core::{Budget, Error, FullSelector, Result, SelectorSpec, SpecOptions};

use crate::block::BlockFactory;
use crate::hip::HipFactory;
use crate::oracle::OracleFactory;
use crate::policy::{HeadPolicy, PolicyFactory};
use crate::quest::QuestFactory;
use crate::retrieval::{GroupCombine, RetrievalFactory};
use crate::streaming::StreamingFactory;
use crate::tokenselect::TokenSelectFactory;

/// Keys every selecting spec accepts.
const COMMON: &[&str] = SpecOptions::COMMON;

/// The index of `retrieval` when the spec names none: RoarGraph walked over 8-bit codes, one
/// walk per GQA group (`RoarGraph32q8`, combined with `max`). Contexts saved with the former
/// default name `index=graph` in their spec and keep loading as such.
pub const DEFAULT_INDEX: &str = "qgraph";

/// Context length from which the spec `auto` means `retrieval`: below it the dynamic part
/// (beyond 128 sinks + 512 window) is too small for an index to pay, so `auto` means `full`.
pub const AUTO_RETRIEVAL_FROM: usize = 2048;

/// Resolves `auto` (the CLI's default selector) for a context of `context_len` tokens:
/// `retrieval` from [`AUTO_RETRIEVAL_FROM`] tokens on, `full` below. Any other spec is returned
/// as it is.
pub fn resolve_auto(spec: &str, context_len: usize) -> String {
    if !spec.trim().eq_ignore_ascii_case("auto") {
        return spec.to_string();
    }
    if context_len >= AUTO_RETRIEVAL_FROM { "retrieval" } else { "full" }.to_string()
}

#[cfg(feature = "lsh")]
fn lsh_sample(o: &SpecOptions) -> Result<SelectorSpec> {
    use crate::lsh_sample::{DEFAULT_BITS, DEFAULT_MIN_COLLISIONS, DEFAULT_TABLES, LshSampleFactory};
    o.only(&with(&["bits", "tables", "min_collisions", "seed"]))?;
    let f = o.static_part()?;
    let seed = o.usize("seed", needle_index_lsh::DEFAULT_SEED as usize)? as u64;
    let factory = LshSampleFactory::new(
        f.sinks,
        f.window,
        o.usize("bits", DEFAULT_BITS)?,
        o.usize("tables", DEFAULT_TABLES)?,
        o.usize("min_collisions", DEFAULT_MIN_COLLISIONS)?,
        seed,
    )?;
    o.spec(Box::new(factory), o.budget()?)
}

#[cfg(not(feature = "lsh"))]
fn lsh_sample(_o: &SpecOptions) -> Result<SelectorSpec> {
    Err(Error::invalid(
        "selector",
        "`lsh-sample` needs the `lsh` feature of needle-select, which this build was compiled without",
    ))
}

/// Builds a [`SelectorSpec`] from the options of a spec naming a registered selector.
pub type SelectorBuilder = dyn Fn(&SpecOptions) -> Result<SelectorSpec> + Send + Sync;

/// Every selector by name; `auto` is reserved for [`resolve_auto`].
static SELECTORS: Registry<SelectorBuilder> = Registry::new(
    "selector",
    &[("auto", "retrieval from 2048 context tokens on, full below (resolve_auto)")],
    builtins,
);

/// Makes a selector available by name to [`parse`] — and so to
/// `needle generate --selector NAME:...` in a binary that registered it before parsing.
/// `about` is its one-line description for help text. The builder reads its options from
/// [`SpecOptions`]; a key it neither reads nor allows ([`SpecOptions::only`]) is an error
/// listing the valid ones.
///
/// Errors when the name is empty, holds whitespace, `:`, `,` or `=`, or is already taken
/// (built in or registered).
pub fn register_selector(
    name: &str,
    about: &str,
    build: impl Fn(&SpecOptions) -> Result<SelectorSpec> + Send + Sync + 'static,
) -> Result<()> {
    SELECTORS.register(name, about, Arc::new(build))
}

/// Every selector name [`parse`] accepts, built in first, with its description.
pub fn selector_names() -> Vec<(String, String)> {
    SELECTORS.names()
}

fn with(extra: &[&'static str]) -> Vec<&'static str> {
    COMMON.iter().chain(extra).copied().collect()
}

/// The built-in selectors, registered on first use of the registry like any plugin.
fn builtins() {
    fn full(o: &SpecOptions) -> Result<SelectorSpec> {
        o.only(&["dense_layers", "train_positions"])?;
        o.spec_training(Box::new(FullSelector), Budget::TopK(1), 0)
    }
    type Build = fn(&SpecOptions) -> Result<SelectorSpec>;
    let all: [(&str, &str, Build); 11] = [
        ("full", "dense attention over every token", full),
        ("dense", "alias of full", full),
        ("streaming", "StreamingLLM: attention sinks + recent window, nothing selected", |o| {
            o.only(&["sinks", "window", "dense_layers", "train_positions"])?;
            let f = o.static_part()?;
            o.spec_training(Box::new(StreamingFactory::new(f.sinks, f.window)), Budget::TopK(1), 0)
        }),
        ("oracle", "exact top-k (or mass target) over the dynamic part: the upper bound of any index", |o| {
            o.only(COMMON)?;
            let f = o.static_part()?;
            o.spec(Box::new(OracleFactory::new(f.sinks, f.window)), o.budget()?)
        }),
        (
            "retrieval",
            "RetrievalAttention: sinks + window + top-k from a vector index (index=qgraph|graph|hnsw|ivfpq|lsh|flat or a factory string)",
            |o| {
                o.only(&with(&["index", "effort", "combine", "min_index", "tail"]))?;
                let f = o.static_part()?;
                let effort = match o.str("effort") {
                    None => None,
                    Some(_) => Some(o.usize("effort", 0)?).filter(|&e| e > 0),
                };
                let index = o.str("index").unwrap_or(DEFAULT_INDEX);
                let combine = match o.str("combine") {
                    Some(c) => GroupCombine::parse(c)?,
                    None => GroupCombine::for_index(index),
                };
                let factory = RetrievalFactory::new(index)?
                    .with_static(f.sinks, f.window)
                    .with_effort(effort)
                    .with_combine(combine)
                    .with_min_index(o.usize("min_index", crate::retrieval::DEFAULT_MIN_INDEX)?)
                    .with_tail(o.usize("tail", crate::retrieval::DEFAULT_TAIL)?);
                o.spec(Box::new(factory), o.budget()?)
            },
        ),
        ("quest", "Quest: pages of `page` keys with min/max bounds; top pages by upper bound", |o| {
            o.only(&with(&["page"]))?;
            let f = o.static_part()?;
            let q = QuestFactory::new(f.sinks, f.window, o.usize("page", crate::quest::DEFAULT_PAGE)?)?;
            o.spec(Box::new(q), o.budget()?)
        }),
        ("block", "InfLLM: blocks of `block` tokens with `reps` representative keys; top blocks", |o| {
            o.only(&with(&["block", "reps"]))?;
            let f = o.static_part()?;
            let b = o.usize("block", crate::block::DEFAULT_BLOCK)?;
            let r = o.usize("reps", crate::block::DEFAULT_REPS)?;
            o.spec(Box::new(BlockFactory::new(f.sinks, f.window, b, r)?), o.budget()?)
        }),
        ("hip", "HiP: hierarchical pruning, halved spans scored by their middle key down to `block` keys", |o| {
            o.only(&with(&["block", "width"]))?;
            let f = o.static_part()?;
            let b = o.usize("block", crate::hip::DEFAULT_HIP_BLOCK)?;
            let w = o.usize("width", crate::hip::DEFAULT_HIP_WIDTH)?;
            o.spec(Box::new(HipFactory::new(f.sinks, f.window, b, w)?), o.budget()?)
        }),
        ("lsh-sample", "MagicPIG: SimHash sampling with importance weights (needs the `lsh` feature)", lsh_sample),
        ("tokenselect", "TokenSelect: per-head Q·K soft voting across the group, selection cache", |o| {
            o.only(&with(&["threshold"]))?;
            let f = o.static_part()?;
            let t = o.f32("threshold")?.unwrap_or(crate::tokenselect::DEFAULT_THRESHOLD);
            o.spec(Box::new(TokenSelectFactory::new(f.sinks, f.window, t)?), o.budget()?)
        }),
        ("policy", "per-head selectors from a JSON file (file=heads.json), DuoAttention-style", |o| {
            o.only(&["file", "k", "mass", "dense_layers", "train_positions"])?;
            let file = o.str("file").ok_or_else(|| {
                Error::invalid("policy option `file`", "required: a JSON policy file (file=heads.json)")
            })?;
            let policy = HeadPolicy::load(std::path::Path::new(file))?;
            o.spec(Box::new(PolicyFactory::new(policy)?), o.budget()?)
        }),
    ];
    for (name, about, build) in all {
        let registered = register_selector(name, about, build);
        debug_assert!(registered.is_ok(), "built-in selector {name}: {registered:?}");
    }
}

/// Parses a selector spec `name[:key=value,...]` into the factory and settings it names.
///
/// Common keys: `k` (top-k budget, default 100), `mass` (share of attention mass to capture,
/// with `k` as the cap), `sinks`, `window`, `dense_layers`, `train_positions`. Each selector
/// adds its own (see the crate docs). Unknown names, unknown keys and repeated keys give
/// [`Error::InvalidParameter`] naming them and listing the valid ones. `auto` must be resolved
/// first ([`resolve_auto`]): it depends on the context length.
///
/// ```
/// let s = needle_select::parse("retrieval:index=flat,k=50,sinks=4,window=64")?;
/// assert_eq!(s.budget, needle_core::Budget::TopK(50));
/// assert!(needle_select::parse("retrieval:nope=1").is_err());
/// # Ok::<(), needle_core::Error>(())
/// ```
pub fn parse(spec: &str) -> Result<SelectorSpec> {
    if spec.split(':').next().is_some_and(|n| n.trim().eq_ignore_ascii_case("auto")) {
        return Err(Error::invalid(
            "selector",
            "`auto` depends on the context length: resolve it first (needle_select::resolve_auto)",
        ));
    }
    SELECTORS.parse(spec, |build, o| build(o))
}

#[cfg(test)]
mod tests {
    use needle_core::spec::{DEFAULT_K, DEFAULT_TRAIN_POSITIONS};

    use super::*;

    fn names() -> Vec<String> {
        selector_names().into_iter().map(|(n, _)| n).filter(|n| n != "auto").collect()
    }

    #[test]
    fn every_name_parses_with_defaults_and_describe_round_trips() {
        let names = names();
        for name in ["full", "dense", "streaming", "oracle", "retrieval", "quest", "block", "hip", "tokenselect"] {
            assert!(names.iter().any(|n| n == name), "{name} is built in");
        }
        for name in &names {
            if name == "policy" || name.starts_with("test-") {
                continue;
            }
            let s = match parse(name) {
                Err(e) if e.to_string().contains("feature") => continue, // not compiled in
                r => r.unwrap(),
            };
            assert_eq!(s.dense_layers, 0);
            // Selectors that learn nothing from prefill queries keep none.
            let trains = !matches!(name.as_str(), "full" | "dense" | "streaming");
            assert_eq!(s.train_positions, if trains { DEFAULT_TRAIN_POSITIONS } else { 0 }, "{name}");
            let d = s.factory.describe();
            assert_eq!(parse(&d).unwrap().factory.describe(), d, "{name}");
        }
        assert_eq!(parse("oracle").unwrap().budget, Budget::TopK(DEFAULT_K));
        let s = parse("retrieval:index=flat,k=100,sinks=128,window=512,dense_layers=2").unwrap();
        assert_eq!((s.budget, s.dense_layers), (Budget::TopK(100), 2));
        let s = parse(" Oracle : mass=0.9, k=300 , train_positions=64").unwrap();
        assert_eq!((s.budget, s.train_positions), (Budget::Mass { target: 0.9, max: 300 }, 64));
        assert!(parse("streaming:sinks=4,window=512").unwrap().factory.describe().contains("sinks=4"));
        if cfg!(feature = "graph") {
            // The default index is the compact walk with one group walk; other indexes keep
            // `mean-rerank`, and an explicit `combine` wins.
            let d = parse("retrieval").unwrap().factory.describe();
            assert!(d.contains("index=qgraph,combine=max"), "{d}");
            let d = parse("retrieval:index=RoarGraph24q8").unwrap().factory.describe();
            assert!(d.contains("combine=max"), "{d}");
            let d = parse("retrieval:index=graph").unwrap().factory.describe();
            assert!(d.contains("index=graph,combine=mean-rerank"), "{d}");
            let d = parse("retrieval:combine=rerank").unwrap().factory.describe();
            assert!(d.contains("index=qgraph,combine=rerank"), "{d}");
        }
        if cfg!(feature = "ivfpq") {
            let d = parse("retrieval:index=IVF64,PQ16,k=10").unwrap().factory.describe();
            assert!(d.contains("index=IVF64,PQ16"), "{d}");
            assert_eq!(parse(&d).unwrap().factory.describe(), d);
        }
    }

    #[test]
    fn registered_selectors_parse_by_name_and_names_stay_unique() {
        register_selector("test-streaming-twin", "streaming under another name", |o| {
            o.only(&["sinks", "window"])?;
            let sp = o.static_part()?;
            o.spec(Box::new(StreamingFactory::new(sp.sinks, sp.window)), Budget::TopK(1))
        })
        .unwrap();
        let s = parse("Test-Streaming-Twin:sinks=3").unwrap();
        assert!(s.factory.describe().contains("sinks=3"), "{}", s.factory.describe());
        assert!(parse("test-streaming-twin:k=3").unwrap_err().to_string().contains("sinks"));
        assert!(selector_names().iter().any(|(n, _)| n == "test-streaming-twin"));
        assert!(parse("nope").unwrap_err().to_string().contains("test-streaming-twin"));
        assert!(register_selector("test-streaming-twin", "again", |_| unreachable!()).is_err());
        assert!(register_selector("oracle", "shadowing a built-in", |_| unreachable!()).is_err());
        assert!(register_selector("a:b", "bad name", |_| unreachable!()).is_err());
        assert!(register_selector("auto", "the reserved name", |_| unreachable!()).is_err());
    }

    #[test]
    fn bad_names_and_keys_list_the_valid_ones() {
        let e = parse("nope").unwrap_err();
        assert!(matches!(e, Error::InvalidParameter { .. }));
        assert!(names().iter().all(|n| e.to_string().contains(n.as_str())), "{e}");
        let e = parse("retrieval:ef=3").unwrap_err().to_string();
        assert!(e.contains("ef") && e.contains("index") && e.contains("effort") && e.contains("sinks"), "{e}");
        assert!(parse("full:k=3").is_err());
        assert!(parse("oracle:k=0").is_err());
        assert!(parse("oracle:k=ten").is_err());
        assert!(parse("oracle:mass=1.5").is_err());
        assert!(parse("oracle:k=1,k=2").is_err());
        assert!(parse("oracle:k").is_err());
        assert!(parse("oracle:k=3,x").is_err()); // `3,x` is not a number
        assert!(parse("retrieval:index=annoy").unwrap_err().to_string().contains("ivfpq"));
        assert!(parse("retrieval:combine=vote").unwrap_err().to_string().contains("rerank"));
        assert!(parse("").is_err());
        assert!(parse("oracle:k=3,k=4").unwrap_err().to_string().contains("given twice"));
        assert!(parse("Auto").unwrap_err().to_string().contains("resolve_auto"));
    }

    #[test]
    fn auto_picks_retrieval_for_long_contexts_only() {
        assert_eq!(resolve_auto("auto", AUTO_RETRIEVAL_FROM - 1), "full");
        assert_eq!(resolve_auto(" Auto", AUTO_RETRIEVAL_FROM), "retrieval");
        assert_eq!(resolve_auto("quest:k=64", 10), "quest:k=64");
        let about = selector_names().into_iter().find(|(n, _)| n == "auto").unwrap().1;
        assert!(about.contains(&AUTO_RETRIEVAL_FROM.to_string()), "{about}");
    }

    /// A plugin whose builder forgets `only` still rejects a key it never reads.
    #[test]
    fn keys_a_builder_never_reads_are_errors() {
        register_selector("test-careless", "reads sinks and window only", |o| {
            let sp = o.static_part()?;
            o.spec_training(Box::new(StreamingFactory::new(sp.sinks, sp.window)), Budget::TopK(1), 0)
        })
        .unwrap();
        assert!(parse("test-careless:sinks=2").is_ok());
        let e = parse("test-careless:sinks=2,k=9").unwrap_err().to_string();
        assert!(e.contains("`k`") && e.contains("sinks, window"), "{e}");
    }
}
