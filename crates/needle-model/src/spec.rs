//! Selectors named by spec strings, e.g. `full` or `retrieval:index=graph,k=100`.
//!
//! A spec is `name[:key=value,...]`. Unknown names or keys are errors that list the valid ones;
//! a selector whose crate is not compiled in names the Cargo feature that enables it.

use needle_core::{Budget, FullSelector, SelectorFactory};

use crate::cache::SelectionConfig;
use crate::error::{Error, Result};

/// Selector names this build knows, with the feature that provides each.
pub const SELECTORS: &[(&str, &str)] = &[("full", "always"), ("dense", "always (alias of full)")];

/// A parsed spec: the name and its `key=value` options in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// Selector name.
    pub name: String,
    /// Options as written.
    pub options: Vec<(String, String)>,
}

impl Spec {
    /// Parses `name[:k=v,k=v]`.
    pub fn parse(s: &str) -> Result<Self> {
        let (name, rest) = s.split_once(':').unwrap_or((s, ""));
        let name = name.trim().to_ascii_lowercase();
        if name.is_empty() {
            return Err(Error::invalid("selector", "empty selector spec"));
        }
        let mut options = Vec::new();
        for kv in rest.split(',').map(str::trim).filter(|kv| !kv.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| Error::invalid("selector", format!("option `{kv}` in `{s}` is not key=value")))?;
            options.push((k.trim().to_string(), v.trim().to_string()));
        }
        Ok(Self { name, options })
    }

    /// Errors on any option not in `allowed`.
    pub fn check_keys(&self, allowed: &[&str]) -> Result<()> {
        match self.options.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            None => Ok(()),
            Some((k, _)) => Err(Error::invalid(
                format!("selector {} option `{k}`", self.name),
                format!("valid options: {}", if allowed.is_empty() { "none".into() } else { allowed.join(", ") }),
            )),
        }
    }
}

/// Builds the selector factory and selection configuration a spec describes.
pub fn selector_from_spec(spec: &str) -> Result<(Box<dyn SelectorFactory>, SelectionConfig)> {
    let s = Spec::parse(spec)?;
    match s.name.as_str() {
        "full" | "dense" => {
            s.check_keys(&[])?;
            Ok((Box::new(FullSelector), SelectionConfig { budget: Budget::TopK(1), ..Default::default() }))
        }
        other => Err(Error::invalid(
            "selector",
            format!(
                "unknown selector `{other}`; this build knows: {}",
                SELECTORS.iter().map(|(n, f)| format!("{n} ({f})")).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_errors_list_valid_names() {
        let s = Spec::parse("Retrieval: index=graph, k=100").unwrap();
        assert_eq!(s.name, "retrieval");
        assert_eq!(s.options, vec![("index".into(), "graph".into()), ("k".into(), "100".into())]);
        assert!(Spec::parse("x:k").is_err());
        assert!(selector_from_spec("full").is_ok());
        let e = selector_from_spec("nope").err().unwrap().to_string();
        assert!(e.contains("full"), "{e}");
        assert!(selector_from_spec("full:k=3").is_err());
    }
}
