//! Selector specs: `name[:key=value,...]`, e.g. `retrieval:index=graph,k=100`, parsed into a
//! factory plus the budget and model settings that go with it.

use needle_core::{Budget, Error, FullSelector, Result, SelectorFactory};

use crate::block::BlockFactory;
use crate::common::Frame;
use crate::hip::HipFactory;
use crate::oracle::OracleFactory;
use crate::policy::{HeadPolicy, PolicyFactory};
use crate::quest::QuestFactory;
use crate::retrieval::{GroupCombine, RetrievalFactory};
use crate::streaming::StreamingFactory;
use crate::tokenselect::TokenSelectFactory;

/// Selector names with a one-line description, for help text.
pub const SELECTORS: &[(&str, &str)] = &[
    ("full", "dense attention over every token"),
    ("dense", "alias of full"),
    ("streaming", "StreamingLLM: attention sinks + recent window, nothing selected"),
    ("oracle", "exact top-k (or mass target) over the dynamic part: the upper bound of any index"),
    ("retrieval", "RetrievalAttention: sinks + window + top-k from a vector index (index=graph|hnsw|ivfpq|lsh|flat)"),
    ("quest", "Quest: pages of `page` keys with min/max bounds; top pages by upper bound"),
    ("block", "InfLLM: blocks of `block` tokens with `reps` representative keys; top blocks"),
    ("hip", "HiP: hierarchical pruning, halved spans scored by their middle key down to `block` keys"),
    ("lsh-sample", "MagicPIG: SimHash sampling with importance weights (needs the `lsh` feature)"),
    ("tokenselect", "TokenSelect: per-head Q·K soft voting across the group, selection cache"),
    ("policy", "per-head selectors from a JSON file (file=heads.json), DuoAttention-style"),
];

/// Keys every selecting spec accepts.
const COMMON: &[&str] = &["k", "mass", "sinks", "window", "dense_layers", "train_positions"];

/// Default `k` of a spec.
pub const DEFAULT_K: usize = 100;
/// Default number of prefill positions whose queries train the selectors.
pub const DEFAULT_TRAIN_POSITIONS: usize = 4096;

/// A parsed spec: the factory and the settings the model runs it with.
pub struct SelectorSpec {
    /// Makes one selector per layer and KV head.
    pub factory: Box<dyn SelectorFactory>,
    /// Dynamic-part budget of every selector (`k`, or `mass` with `k` as cap).
    pub budget: Budget,
    /// The first `dense_layers` layers attend to everything.
    pub dense_layers: usize,
    /// At most this many prefill positions contribute training queries.
    pub train_positions: usize,
}

impl std::fmt::Debug for SelectorSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelectorSpec")
            .field("factory", &self.factory.describe())
            .field("budget", &self.budget)
            .field("dense_layers", &self.dense_layers)
            .field("train_positions", &self.train_positions)
            .finish()
    }
}

/// The options of one spec (`name:key=value,...`), read by name: what a selector's builder
/// gets, whether built in or registered by another crate ([`register_selector`]).
pub struct SpecOptions {
    name: String,
    opts: Vec<(String, String)>,
}

impl SpecOptions {
    /// Keys every selecting spec accepts: `k`, `mass`, `sinks`, `window`, `dense_layers`,
    /// `train_positions`.
    pub const COMMON: &'static [&'static str] = COMMON;

    /// Splits `name[:k=v,...]`; names are case-insensitive, keys are not.
    pub fn split(spec: &str) -> Result<Self> {
        let (name, rest) = spec.split_once(':').unwrap_or((spec, ""));
        let name = name.trim().to_ascii_lowercase();
        if name.is_empty() {
            return Err(Error::invalid("selector", format!("empty selector name in `{spec}`; valid: {}", names())));
        }
        let mut opts: Vec<(String, String)> = Vec::new();
        for kv in rest.split(',').map(str::trim).filter(|kv| !kv.is_empty()) {
            let Some((k, v)) = kv.split_once('=') else {
                // A piece without `=` continues the previous value: factory strings such as
                // `index=IVF256,PQ16` hold commas.
                match opts.last_mut() {
                    Some((_, prev)) => {
                        prev.push(',');
                        prev.push_str(kv);
                        continue;
                    }
                    None => return Err(Error::invalid(format!("{name} option `{kv}`"), "options are key=value")),
                }
            };
            let k = k.trim().to_string();
            if opts.iter().any(|(o, _)| *o == k) {
                return Err(Error::invalid(format!("{name} option `{k}`"), "given twice"));
            }
            opts.push((k, v.trim().to_string()));
        }
        Ok(Self { name, opts })
    }

    /// The selector name, lower case.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Errors on any key outside `allowed`, listing the valid ones.
    pub fn only(&self, allowed: &[&str]) -> Result<()> {
        match self.opts.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            None => Ok(()),
            Some((k, _)) => Err(Error::invalid(
                format!("{} option `{k}`", self.name),
                format!(
                    "unknown; valid options: {}",
                    if allowed.is_empty() { "none".into() } else { allowed.join(", ") }
                ),
            )),
        }
    }

    /// The raw value of `key`, if given.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.opts.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// `key` as a whole number, `default` when absent.
    pub fn usize(&self, key: &str, default: usize) -> Result<usize> {
        match self.str(key) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| {
                Error::invalid(format!("{} option `{key}`", self.name), format!("`{v}` is not a whole number"))
            }),
        }
    }

    /// `key` as a finite number, if given.
    pub fn f32(&self, key: &str) -> Result<Option<f32>> {
        match self.str(key) {
            None => Ok(None),
            Some(v) => match v.parse::<f32>() {
                Ok(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(Error::invalid(format!("{} option `{key}`", self.name), format!("`{v}` is not a number"))),
            },
        }
    }

    pub(crate) fn frame(&self) -> Result<Frame> {
        let d = Frame::default();
        Ok(Frame { sinks: self.usize("sinks", d.sinks)?, window: self.usize("window", d.window)? })
    }

    /// `sinks` and `window` (defaults 128 and 512, as every built-in selector).
    pub fn static_part(&self) -> Result<needle_core::StaticPart> {
        Ok(self.frame()?.static_part())
    }

    /// `k` (default 100), or `mass` in `(0, 1]` with `k` as the cap.
    pub fn budget(&self) -> Result<Budget> {
        let k = self.usize("k", DEFAULT_K)?;
        if k == 0 {
            return Err(Error::invalid(format!("{} option `k`", self.name), "must be at least 1"));
        }
        match self.f32("mass")? {
            None => Ok(Budget::TopK(k)),
            Some(t) if t > 0.0 && t <= 1.0 => Ok(Budget::Mass { target: t, max: k }),
            Some(t) => Err(Error::invalid(format!("{} option `mass`", self.name), format!("{t} is not in (0, 1]"))),
        }
    }

    /// The parsed spec: `factory` with `budget` and the common model settings
    /// (`dense_layers`, `train_positions`).
    pub fn spec(&self, factory: Box<dyn SelectorFactory>, budget: Budget) -> Result<SelectorSpec> {
        self.spec_training(factory, budget, DEFAULT_TRAIN_POSITIONS)
    }

    /// [`spec`](Self::spec) with another default for `train_positions` (0 for selectors that
    /// learn nothing from prefill queries, so none are kept).
    pub fn spec_training(
        &self,
        factory: Box<dyn SelectorFactory>,
        budget: Budget,
        train_positions: usize,
    ) -> Result<SelectorSpec> {
        Ok(SelectorSpec {
            factory,
            budget,
            dense_layers: self.usize("dense_layers", 0)?,
            train_positions: self.usize("train_positions", train_positions)?,
        })
    }
}

#[cfg(feature = "lsh")]
fn lsh_sample(o: &SpecOptions) -> Result<SelectorSpec> {
    use crate::lsh_sample::{DEFAULT_BITS, DEFAULT_MIN_COLLISIONS, DEFAULT_TABLES, LshSampleFactory};
    let f = o.frame()?;
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

fn names() -> String {
    selector_names().into_iter().map(|(n, _)| n).collect::<Vec<_>>().join(", ")
}

/// Builds a [`SelectorSpec`] from the options of a spec naming a registered selector.
pub type SelectorBuilder = dyn Fn(&SpecOptions) -> Result<SelectorSpec> + Send + Sync;

type SelectorRegistry = std::sync::RwLock<Vec<(String, String, std::sync::Arc<SelectorBuilder>)>>;

/// Selectors registered by other crates, by lower-case name.
static REGISTERED: std::sync::LazyLock<SelectorRegistry> = std::sync::LazyLock::new(Default::default);

/// Makes a selector from another crate available by name to [`parse`] — and so to
/// `needle generate --selector NAME:...` in a binary that registered it before parsing.
/// `about` is its one-line description for help text. The builder reads its options from
/// [`SpecOptions`] (call [`SpecOptions::only`] first so that unknown keys are errors).
///
/// Errors when the name is empty, holds `:`, `,` or `=`, or is already taken (built in or
/// registered).
pub fn register_selector(
    name: &str,
    about: &str,
    build: impl Fn(&SpecOptions) -> Result<SelectorSpec> + Send + Sync + 'static,
) -> Result<()> {
    let name = name.trim().to_ascii_lowercase();
    if name.is_empty() || name.contains([':', ',', '=']) {
        return Err(Error::invalid("selector name", format!("`{name}` must be non-empty without `:`, `,` or `=`")));
    }
    let mut reg = REGISTERED.write().map_err(|_| Error::invalid("selector registry", "poisoned by a panic"))?;
    if SELECTORS.iter().any(|(n, _)| *n == name) || reg.iter().any(|(n, _, _)| *n == name) {
        return Err(Error::invalid("selector name", format!("`{name}` is already registered")));
    }
    reg.push((name, about.to_string(), std::sync::Arc::new(build)));
    Ok(())
}

/// Every selector name [`parse`] accepts, built in first, with its description.
pub fn selector_names() -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = SELECTORS.iter().map(|(n, a)| (n.to_string(), a.to_string())).collect();
    if let Ok(reg) = REGISTERED.read() {
        v.extend(reg.iter().map(|(n, a, _)| (n.clone(), a.clone())));
    }
    v
}

fn registered(name: &str) -> Option<std::sync::Arc<SelectorBuilder>> {
    REGISTERED.read().ok()?.iter().find(|(n, _, _)| n == name).map(|(_, _, b)| b.clone())
}

fn with(extra: &[&'static str]) -> Vec<&'static str> {
    COMMON.iter().chain(extra).copied().collect()
}

/// Parses a selector spec `name[:key=value,...]`.
///
/// Names registered with [`register_selector`] are looked up after the built-ins.
///
/// Common keys: `k` (top-k budget, default 100), `mass` (share of attention mass to capture,
/// with `k` as the cap), `sinks`, `window`, `dense_layers`, `train_positions`. Each selector
/// adds its own (see the crate docs). Unknown names or keys give
/// [`Error::InvalidParameter`] listing the valid ones.
///
/// ```
/// let s = needle_select::parse("retrieval:index=flat,k=50,sinks=4,window=64")?;
/// assert_eq!(s.budget, needle_core::Budget::TopK(50));
/// assert!(needle_select::parse("retrieval:nope=1").is_err());
/// # Ok::<(), needle_core::Error>(())
/// ```
pub fn parse(spec: &str) -> Result<SelectorSpec> {
    let o = SpecOptions::split(spec)?;
    match o.name.as_str() {
        "full" | "dense" => {
            o.only(&["dense_layers", "train_positions"])?;
            o.spec_training(Box::new(FullSelector), Budget::TopK(1), 0)
        }
        "streaming" => {
            o.only(&["sinks", "window", "dense_layers", "train_positions"])?;
            let f = o.frame()?;
            o.spec_training(Box::new(StreamingFactory::new(f.sinks, f.window)), Budget::TopK(1), 0)
        }
        "oracle" => {
            o.only(COMMON)?;
            let f = o.frame()?;
            o.spec(Box::new(OracleFactory::new(f.sinks, f.window)), o.budget()?)
        }
        "retrieval" => {
            o.only(&with(&["index", "effort", "combine", "min_index", "tail"]))?;
            let f = o.frame()?;
            let effort = match o.str("effort") {
                None => None,
                Some(_) => Some(o.usize("effort", 0)?).filter(|&e| e > 0),
            };
            let combine = o.str("combine").map(GroupCombine::parse).transpose()?.unwrap_or_default();
            let factory = RetrievalFactory::new(o.str("index").unwrap_or("graph"))?
                .with_static(f.sinks, f.window)
                .with_effort(effort)
                .with_combine(combine)
                .with_min_index(o.usize("min_index", crate::retrieval::DEFAULT_MIN_INDEX)?)
                .with_tail(o.usize("tail", crate::retrieval::DEFAULT_TAIL)?);
            o.spec(Box::new(factory), o.budget()?)
        }
        "quest" => {
            o.only(&with(&["page"]))?;
            let f = o.frame()?;
            let q = QuestFactory::new(f.sinks, f.window, o.usize("page", crate::quest::DEFAULT_PAGE)?)?;
            o.spec(Box::new(q), o.budget()?)
        }
        "block" => {
            o.only(&with(&["block", "reps"]))?;
            let f = o.frame()?;
            let b = o.usize("block", crate::block::DEFAULT_BLOCK)?;
            let r = o.usize("reps", crate::block::DEFAULT_REPS)?;
            o.spec(Box::new(BlockFactory::new(f.sinks, f.window, b, r)?), o.budget()?)
        }
        "hip" => {
            o.only(&with(&["block", "width"]))?;
            let f = o.frame()?;
            let b = o.usize("block", crate::hip::DEFAULT_HIP_BLOCK)?;
            let w = o.usize("width", crate::hip::DEFAULT_HIP_WIDTH)?;
            o.spec(Box::new(HipFactory::new(f.sinks, f.window, b, w)?), o.budget()?)
        }
        "lsh-sample" => {
            o.only(&with(&["bits", "tables", "min_collisions", "seed"]))?;
            lsh_sample(&o)
        }
        "tokenselect" => {
            o.only(&with(&["threshold"]))?;
            let f = o.frame()?;
            let t = o.f32("threshold")?.unwrap_or(crate::tokenselect::DEFAULT_THRESHOLD);
            o.spec(Box::new(TokenSelectFactory::new(f.sinks, f.window, t)?), o.budget()?)
        }
        "policy" => {
            o.only(&["file", "k", "mass", "dense_layers", "train_positions"])?;
            let file = o.str("file").ok_or_else(|| {
                Error::invalid("policy option `file`", "required: a JSON policy file (file=heads.json)")
            })?;
            let policy = HeadPolicy::load(std::path::Path::new(file))?;
            o.spec(Box::new(PolicyFactory::new(policy)?), o.budget()?)
        }
        other => match registered(other) {
            Some(build) => build(&o),
            None => Err(Error::invalid("selector", format!("unknown selector `{other}`; valid: {}", names()))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_parses_with_defaults_and_describe_round_trips() {
        for (name, _) in SELECTORS {
            if *name == "policy" {
                continue;
            }
            let s = match parse(name) {
                Err(e) if e.to_string().contains("feature") => continue, // not compiled in
                r => r.unwrap(),
            };
            assert_eq!(s.dense_layers, 0);
            // Selectors that learn nothing from prefill queries keep none.
            let trains = !matches!(*name, "full" | "dense" | "streaming");
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
    }

    #[test]
    fn bad_names_and_keys_list_the_valid_ones() {
        let e = parse("nope").unwrap_err();
        assert!(matches!(e, Error::InvalidParameter { .. }));
        assert!(SELECTORS.iter().all(|(n, _)| e.to_string().contains(n)), "{e}");
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
    }
}
