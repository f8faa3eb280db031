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
//! ```
//! let spec = needle_prefill::parse("flex:gamma=0.95")?;
//! assert_eq!(spec.describe(), "flex:gamma=0.95,tau=0.1,block=64,local=2");
//! assert!(needle_prefill::parse("dense")?.pattern().is_none());
//! # Ok::<(), needle_core::Error>(())
//! ```
#![warn(missing_docs)]
#![doc(test(attr(deny(warnings))))]

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use needle_core::prefill::{PrefillPattern, PrefillSpec};
use needle_core::{Error, Result};

mod anchor;
pub mod estimate;
mod flex;
mod sale;
mod vertical_slash;

pub use anchor::Anchor;
pub use flex::Flex;
pub use sale::Sale;
pub use vertical_slash::VerticalSlash;

/// The pattern names [`parse`] knows, with a line on each.
pub const PATTERNS: &[(&str, &str)] = &[
    ("dense", "dense causal prefill (no pattern)"),
    (
        "vertical-slash",
        "MInference: vertical keys and slash offsets from the last queries (block, last_q, vertical, slash)",
    ),
    ("flex", "FlexPrefill: query-aware or vertical-slash per head by JS divergence (gamma, tau, block)"),
    ("anchor", "AnchorAttention: blocks with a stripe within theta of the sink/diagonal anchor (theta, stride, block)"),
    (
        "sale",
        "SALE: 4-bit Q·K estimate, blocks whose mass reaches tau of the sink/window mass (tau, stride, group, block)",
    ),
];

/// `name[:key=value,...]` split, options in order.
fn split(spec: &str) -> Result<(String, Vec<(String, String)>)> {
    let (name, rest) = spec.split_once(':').unwrap_or((spec, ""));
    let mut opts = Vec::new();
    for kv in rest.split(',').map(str::trim).filter(|kv| !kv.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| Error::invalid(format!("prefill option `{kv}`"), "options are key=value"))?;
        opts.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok((name.trim().to_ascii_lowercase(), opts))
}

/// Reads option `key` of pattern `name` as a `T`, `default` when absent.
fn opt<T: std::str::FromStr>(name: &str, opts: &[(String, String)], key: &str, default: T) -> Result<T> {
    match opts.iter().rev().find(|(k, _)| k == key) {
        None => Ok(default),
        Some((_, v)) => {
            v.parse().map_err(|_| Error::invalid(format!("{name} option `{key}`"), format!("`{v}` is not valid")))
        }
    }
}

/// Parses a prefill spec (see the crate docs) into the `Copy` handle a
/// `SelectionConfig` holds. The same spec always yields the same pattern object: each distinct
/// pattern is allocated once for the life of the process.
pub fn parse(spec: &str) -> Result<PrefillSpec> {
    let (name, opts) = split(spec)?;
    let allowed: &[&str] = match name.as_str() {
        "dense" => &[],
        "vertical-slash" => &["block", "last_q", "vertical", "slash", "local"],
        "flex" => &["gamma", "tau", "block", "local"],
        "anchor" => &["theta", "stride", "block", "local"],
        "sale" => &["tau", "stride", "group", "block", "local"],
        _ => {
            let names: Vec<&str> = PATTERNS.iter().map(|p| p.0).collect();
            return Err(Error::invalid("prefill", format!("unknown pattern `{name}`; valid: {}", names.join(", "))));
        }
    };
    if let Some((k, _)) = opts.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
        return Err(Error::invalid(format!("{name} option `{k}`"), format!("unknown; valid: {}", allowed.join(", "))));
    }
    let pattern: Box<dyn PrefillPattern> = match name.as_str() {
        "dense" => return Ok(PrefillSpec::DENSE),
        "vertical-slash" => {
            let d = VerticalSlash::default();
            Box::new(VerticalSlash {
                block: opt(&name, &opts, "block", d.block)?,
                last_q: opt(&name, &opts, "last_q", d.last_q)?,
                vertical: opt(&name, &opts, "vertical", d.vertical)?,
                slash: opt(&name, &opts, "slash", d.slash)?,
                local: opt(&name, &opts, "local", d.local)?,
            })
        }
        "anchor" => {
            let d = Anchor::default();
            let a = Anchor {
                theta: opt(&name, &opts, "theta", d.theta)?,
                stride: opt(&name, &opts, "stride", d.stride)?,
                block: opt(&name, &opts, "block", d.block)?,
                local: opt(&name, &opts, "local", d.local)?,
            };
            if a.theta.is_nan() || a.theta < 0.0 || a.stride == 0 {
                return Err(Error::invalid("anchor option `theta`/`stride`", "theta must be ≥ 0 and stride ≥ 1"));
            }
            Box::new(a)
        }
        "sale" => {
            let d = Sale::default();
            let s = Sale {
                tau: opt(&name, &opts, "tau", d.tau)?,
                stride: opt(&name, &opts, "stride", d.stride)?,
                group: opt(&name, &opts, "group", d.group)?,
                block: opt(&name, &opts, "block", d.block)?,
                local: opt(&name, &opts, "local", d.local)?,
            };
            if !(s.tau >= 0.0 && s.tau.is_finite()) {
                return Err(Error::invalid("sale option `tau`", format!("{} is not a finite number ≥ 0", s.tau)));
            }
            for (key, v) in [("stride", s.stride), ("group", s.group)] {
                if v == 0 {
                    return Err(Error::invalid(format!("sale option `{key}`"), "must be at least 1"));
                }
            }
            Box::new(s)
        }
        _ => {
            let d = Flex::default();
            let f = Flex {
                gamma: opt(&name, &opts, "gamma", d.gamma)?,
                tau: opt(&name, &opts, "tau", d.tau)?,
                block: opt(&name, &opts, "block", d.block)?,
                local: opt(&name, &opts, "local", d.local)?,
            };
            if !(f.gamma > 0.0 && f.gamma <= 1.0) {
                return Err(Error::invalid("flex option `gamma`", format!("{} is not in (0, 1]", f.gamma)));
            }
            if f.tau.is_nan() || f.tau < 0.0 {
                return Err(Error::invalid("flex option `tau`", format!("{} is not ≥ 0", f.tau)));
            }
            Box::new(f)
        }
    };
    if pattern.block() == 0 {
        return Err(Error::invalid(format!("{name} option `block`"), "must be at least 1"));
    }
    if pattern.local_blocks() == 0 {
        return Err(Error::invalid(format!("{name} option `local`"), "must be at least 1 (the diagonal block)"));
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
        let names: Vec<&str> = PATTERNS.iter().map(|p| p.0).collect();
        assert_eq!(names, ["dense", "vertical-slash", "flex", "anchor", "sale"]);
        assert!(parse("nope").unwrap_err().to_string().contains("sale"), "the error lists sale");
    }

    #[test]
    fn bad_specs_name_what_is_wrong() {
        for (spec, names) in [
            ("sparse", "prefill"),
            ("flex:gamma=2", "flex option `gamma`"),
            ("flex:tau=-1", "flex option `tau`"),
            ("anchor:stride=0", "anchor option `theta`/`stride`"),
            ("flex:tau=NaN", "flex option `tau`"),
            ("flex:gamma=x", "flex option `gamma`"),
            ("flex:k=3", "flex option `k`"),
            ("vertical-slash:block=0", "vertical-slash option `block`"),
            ("dense:block=64", "dense option `block`"),
            ("flex:local=0", "flex option `local`"),
            ("flex:gamma", "prefill option `gamma`"),
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
