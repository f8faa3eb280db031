//! # needle-prefill
//!
//! Sparse prefill patterns: implementations of [`needle_core::prefill::PrefillPattern`], the
//! plug-in point that decides, per layer and KV head, which key blocks each query block of a
//! prefill chunk attends to (the engine then runs block-sparse causal attention over them).
//!
//! | spec | idea |
//! |---|---|
//! | `dense` | no pattern: dense causal prefill |
//! | `vertical-slash[:block=64,last_q=64,vertical=512,slash=512,local=2]` | MInference: the top vertical keys and slash offsets of the last queries' attention ([`VerticalSlash`]) |
//! | `flex[:gamma=0.9,tau=0.1,block=64,local=2]` | FlexPrefill: per head query-aware (pooled blocks) or vertical-slash by Jensen–Shannon divergence, cumulative attention budget `gamma` ([`Flex`]) |
//! | `anchor[:theta=8,stride=32,block=64,local=2]` | AnchorAttention: key blocks holding a stripe within `theta` of the anchor (best score over the sinks and the diagonal block) ([`Anchor`]) |
//! | `sale[:tau=0.005,stride=16,group=32,block=64,local=2]` | SALE: 4-bit estimate of `Q·Kᵀ` (every `stride`-th query, a scale per `group` values); key blocks whose estimated mass reaches `tau` of the sinks-and-window mass for a scored query ([`Sale`]) |
//!
//! Whatever the pattern, the first block (sinks), the local window (`local` blocks: the diagonal
//! one and the one before it by default, so that the first queries of a block keep their
//! context) and the prompt's last block's worth of queries are attended ([`needle_core::prefill::plan_chunk`]).
//!
//! Specs follow the one grammar of [`needle_core::spec`]: repeated or unknown keys are errors.
//! The built-ins are registered through [`register_pattern`], the function another crate calls
//! to add its own pattern by name; [`pattern_names`] lists them all.
//!
//! ```
//! let spec = needle_prefill::parse("flex:gamma=0.95")?;
//! assert_eq!(spec.describe(), "flex:gamma=0.95,tau=0.1,block=64,local=2");
//! assert!(needle_prefill::parse("dense")?.pattern().is_none());
//! # Ok::<(), needle_core::Error>(())
//! ```
#![warn(missing_docs)]
#![doc(test(attr(deny(warnings))))]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use needle_core::prefill::{PrefillPattern, PrefillSpec};
use needle_core::spec::Registry;
use needle_core::{Error, Result, SpecOptions};

mod anchor;
pub mod estimate;
mod flex;
mod sale;
mod vertical_slash;

pub use anchor::Anchor;
pub use flex::Flex;
pub use sale::Sale;
pub use vertical_slash::VerticalSlash;

/// Makes a pattern from the options of a spec naming a registered pattern.
pub type PatternBuilder = dyn Fn(&SpecOptions) -> Result<Box<dyn PrefillPattern>> + Send + Sync;

/// Every pattern by name; `dense` (no pattern) is reserved.
static PATTERNS: Registry<PatternBuilder> =
    Registry::new("prefill pattern", &[("dense", "dense causal prefill (no pattern)")], builtins);

/// Makes a prefill pattern available by name to [`parse`] (and so to `needle ... --prefill
/// NAME:...` in a binary that registered it). `about` is its one-line description. The builder
/// reads its options from [`SpecOptions`]; a key it neither reads nor allows is an error
/// listing the valid ones, and a pattern with `block` or `local_blocks` 0 is refused.
///
/// Errors when the name is empty, holds whitespace, `:`, `,` or `=`, or is taken (built in,
/// `dense`, or registered before).
pub fn register_pattern(
    name: &str,
    about: &str,
    build: impl Fn(&SpecOptions) -> Result<Box<dyn PrefillPattern>> + Send + Sync + 'static,
) -> Result<()> {
    PATTERNS.register(name, about, Arc::new(build))
}

/// Every pattern name [`parse`] accepts (`dense` first, then the built-ins, then plugins), with
/// a line on each.
pub fn pattern_names() -> Vec<(String, String)> {
    PATTERNS.names()
}

fn vertical_slash(o: &SpecOptions) -> Result<Box<dyn PrefillPattern>> {
    let d = VerticalSlash::default();
    Ok(Box::new(VerticalSlash {
        block: o.usize("block", d.block)?,
        last_q: o.usize("last_q", d.last_q)?,
        vertical: o.usize("vertical", d.vertical)?,
        slash: o.usize("slash", d.slash)?,
        local: o.usize("local", d.local)?,
    }))
}

fn flex(o: &SpecOptions) -> Result<Box<dyn PrefillPattern>> {
    let d = Flex::default();
    let f = Flex {
        gamma: o.get("gamma", d.gamma, "a number")?,
        tau: o.get("tau", d.tau, "a number")?,
        block: o.usize("block", d.block)?,
        local: o.usize("local", d.local)?,
    };
    if !(f.gamma > 0.0 && f.gamma <= 1.0) {
        return Err(Error::invalid("flex option `gamma`", format!("{} is not in (0, 1]", f.gamma)));
    }
    if f.tau.is_nan() || f.tau < 0.0 {
        return Err(Error::invalid("flex option `tau`", format!("{} is not ≥ 0", f.tau)));
    }
    Ok(Box::new(f))
}

fn anchor(o: &SpecOptions) -> Result<Box<dyn PrefillPattern>> {
    let d = Anchor::default();
    let a = Anchor {
        theta: o.get("theta", d.theta, "a number")?,
        stride: o.usize("stride", d.stride)?,
        block: o.usize("block", d.block)?,
        local: o.usize("local", d.local)?,
    };
    if a.theta.is_nan() || a.theta < 0.0 || a.stride == 0 {
        return Err(Error::invalid("anchor option `theta`/`stride`", "theta must be ≥ 0 and stride ≥ 1"));
    }
    Ok(Box::new(a))
}

fn sale(o: &SpecOptions) -> Result<Box<dyn PrefillPattern>> {
    let d = Sale::default();
    let s = Sale {
        tau: o.get("tau", d.tau, "a number")?,
        stride: o.usize("stride", d.stride)?,
        group: o.usize("group", d.group)?,
        block: o.usize("block", d.block)?,
        local: o.usize("local", d.local)?,
    };
    if !(s.tau >= 0.0 && s.tau.is_finite()) {
        return Err(Error::invalid("sale option `tau`", format!("{} is not a finite number ≥ 0", s.tau)));
    }
    for (key, v) in [("stride", s.stride), ("group", s.group)] {
        if v == 0 {
            return Err(Error::invalid(format!("sale option `{key}`"), "must be at least 1"));
        }
    }
    Ok(Box::new(s))
}

/// The built-in patterns, registered on first use like any plugin. Each reads every option it
/// takes, so any other key is an error listing them.
fn builtins() {
    type Build = fn(&SpecOptions) -> Result<Box<dyn PrefillPattern>>;
    let all: [(&str, &str, Build); 4] = [
        (
            "vertical-slash",
            "MInference: vertical keys and slash offsets from the last queries (block, last_q, vertical, slash)",
            vertical_slash,
        ),
        ("flex", "FlexPrefill: query-aware or vertical-slash per head by JS divergence (gamma, tau, block)", flex),
        (
            "anchor",
            "AnchorAttention: blocks with a stripe within theta of the sink/diagonal anchor (theta, stride, block)",
            anchor,
        ),
        (
            "sale",
            "SALE: 4-bit Q·K estimate, blocks whose mass reaches tau of the sink/window mass (tau, stride, group, block)",
            sale,
        ),
    ];
    for (name, about, build) in all {
        let registered = register_pattern(name, about, build);
        debug_assert!(registered.is_ok(), "built-in pattern {name}: {registered:?}");
    }
}

/// Parses a prefill spec `name[:key=value,...]` (see the crate docs) into the `Copy` handle a
/// `SelectionConfig` holds. Unknown names, unknown keys and repeated keys are errors naming
/// them and listing the valid ones. The same spec always yields the same pattern object: each
/// distinct pattern is allocated once for the life of the process.
pub fn parse(spec: &str) -> Result<PrefillSpec> {
    let o = SpecOptions::split(spec)?;
    if o.name() == "dense" {
        o.only(&[])?;
        return Ok(PrefillSpec::DENSE);
    }
    let pattern = PATTERNS.parse(spec, |build, o| build(o))?;
    if pattern.block() == 0 {
        return Err(Error::invalid(format!("{} option `block`", o.name()), "must be at least 1"));
    }
    if pattern.local_blocks() == 0 {
        return Err(Error::invalid(format!("{} option `local`", o.name()), "must be at least 1 (the diagonal block)"));
    }
    Ok(PrefillSpec::new(intern(pattern)))
}

/// The one shared copy of a pattern, by its description.
fn intern(pattern: Box<dyn PrefillPattern>) -> &'static dyn PrefillPattern {
    static SEEN: OnceLock<Mutex<HashMap<String, &'static dyn PrefillPattern>>> = OnceLock::new();
    let mut seen = SEEN.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    *seen.entry(pattern.describe()).or_insert_with(|| Box::leak(pattern))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn specs_parse_with_defaults_and_options() {
        assert_eq!(parse("dense").unwrap(), PrefillSpec::DENSE);
        assert_eq!(
            parse("vertical-slash").unwrap().describe(),
            "vertical-slash:block=64,last_q=64,vertical=512,slash=512,local=2"
        );
        assert_eq!(
            parse("Vertical-Slash:slash=100, block=128").unwrap().describe(),
            "vertical-slash:block=128,last_q=64,vertical=512,slash=100,local=2"
        );
        assert_eq!(parse("flex:gamma=0.95,tau=0.2").unwrap().describe(), "flex:gamma=0.95,tau=0.2,block=64,local=2");
        assert_eq!(parse("anchor:theta=4").unwrap().describe(), "anchor:theta=4,stride=32,block=64,local=2");
        assert_eq!(parse("sale").unwrap().describe(), "sale:tau=0.005,stride=16,group=32,block=64,local=2");
        assert_eq!(
            parse("SALE:group=64, tau=0.02,local=3").unwrap().describe(),
            "sale:tau=0.02,stride=16,group=64,block=64,local=3"
        );
        let (a, b) = (parse("flex").unwrap().pattern().unwrap(), parse("flex:gamma=0.9").unwrap().pattern().unwrap());
        assert!(std::ptr::addr_eq(a, b), "one object per distinct pattern");
    }

    #[test]
    fn descriptions_parse_back_to_the_same_pattern() {
        for spec in [
            "vertical-slash:slash=100",
            "flex:gamma=0.95",
            "anchor:theta=2.5,local=1",
            "sale",
            "sale:tau=0.0125,stride=8,group=16,block=128,local=1",
            "sale:tau=0",
        ] {
            let p = parse(spec).unwrap();
            let again = parse(&p.describe()).unwrap();
            assert_eq!(again.describe(), p.describe(), "{spec}");
            assert!(std::ptr::addr_eq(p.pattern().unwrap(), again.pattern().unwrap()), "{spec}");
        }
        let names: Vec<String> = pattern_names().into_iter().map(|p| p.0).collect();
        assert_eq!(names[..5], ["dense", "vertical-slash", "flex", "anchor", "sale"]);
        assert!(parse("nope").unwrap_err().to_string().contains("sale"), "the error lists sale");
    }

    #[test]
    fn plugins_parse_by_name_and_are_checked_like_built_ins() {
        register_pattern("test-local", "only the local window", |o| {
            Ok(Box::new(VerticalSlash { vertical: 0, slash: 0, local: o.usize("local", 2)?, ..Default::default() }))
        })
        .unwrap();
        assert!(pattern_names().iter().any(|(n, _)| n == "test-local"));
        assert_eq!(parse("Test-Local:local=3").unwrap().pattern().unwrap().local_blocks(), 3);
        let e = parse("test-local:block=3").unwrap_err().to_string();
        assert!(e.contains("`block`") && e.contains("local"), "{e}");
        assert!(parse("test-local:local=0").unwrap_err().to_string().contains("local"));
        assert!(parse("nope").unwrap_err().to_string().contains("test-local"));
        for taken in ["test-local", "flex", "dense"] {
            assert!(register_pattern(taken, "again", |_| unreachable!()).is_err(), "{taken}");
        }
    }

    #[test]
    fn bad_specs_name_what_is_wrong() {
        for (spec, names) in [
            ("sparse", "prefill pattern"),
            ("flex:gamma=2", "flex option `gamma`"),
            ("flex:tau=-1", "flex option `tau`"),
            ("anchor:stride=0", "anchor option `theta`/`stride`"),
            ("flex:tau=NaN", "flex option `tau`"),
            ("flex:gamma=x", "flex option `gamma`"),
            ("flex:k=3", "flex option `k`"),
            ("vertical-slash:block=0", "vertical-slash option `block`"),
            ("dense:block=64", "dense option `block`"),
            ("flex:local=0", "flex option `local`"),
            ("flex:gamma", "flex option `gamma`"),
            ("flex:gamma=0.5,gamma=0.6", "flex option `gamma`"),
            ("anchor:theta=x", "anchor option `theta`"),
            ("sale:tau=-0.1", "sale option `tau`"),
            ("sale:tau=inf", "sale option `tau`"),
            ("sale:tau=NaN", "sale option `tau`"),
            ("sale:stride=0", "sale option `stride`"),
            ("sale:group=0", "sale option `group`"),
            ("sale:group=-1", "sale option `group`"),
            ("sale:bits=4", "sale option `bits`"),
            ("sale:block=0", "sale option `block`"),
            ("sale:local=0", "sale option `local`"),
        ] {
            let e = parse(spec).unwrap_err();
            assert!(matches!(&e, Error::InvalidParameter { name, .. } if name == names), "{spec}: {e}");
        }
    }
}
