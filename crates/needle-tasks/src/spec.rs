//! Task specs: `name[:key=value,...]`, e.g. `passkey` or `niah_multikey:keys=4`.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Task names with their options and defaults, as listed in error messages.
pub const TASKS: &[(&str, &str)] = &[
    ("passkey", "no options"),
    ("niah_single", "no options"),
    ("niah_multikey", "keys=4"),
    ("niah_multivalue", "values=4"),
    ("niah_multiquery", "queries=4"),
    ("variable_tracking", "chains=1,hops=4"),
];

/// Most needles (keys, values, queries, chains × variables) one instance may hold.
const MAX_NEEDLES: usize = 64;

/// A synthetic long-context task and its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(tag = "task", rename_all = "snake_case")]
pub enum TaskSpec {
    /// Landmark Attention's passkey retrieval: one 5-digit number in filler.
    Passkey,
    /// RULER `niah_single`: one key with one 7-digit value.
    NiahSingle,
    /// RULER `niah_multikey`: `keys` keys with one value each; one is asked, the rest distract.
    NiahMultikey {
        /// Keys in the haystack (≥ 2), the asked one included.
        keys: usize,
    },
    /// RULER `niah_multivalue`: one key with `values` values; all must be returned.
    NiahMultivalue {
        /// Values of the key (≥ 2).
        values: usize,
    },
    /// RULER `niah_multiquery`: `queries` keys, all asked; every value must be returned.
    NiahMultiquery {
        /// Keys asked (≥ 2).
        queries: usize,
    },
    /// RULER variable tracking: chains `VAR A = 12345. VAR B = VAR A. ...`; return every
    /// variable of the asked chain.
    VariableTracking {
        /// Chains in the haystack (≥ 1), the asked one included; the others distract.
        chains: usize,
        /// Assignments after the first in each chain (≥ 1): a chain has `hops + 1` variables.
        hops: usize,
    },
}

/// How a generation is scored against an instance's expected answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Metric {
    /// 1 when the first number in the generation equals the answer, else 0.
    ExactFirstNumber,
    /// The share of expected answers that appear in the generation as whole words
    /// (RULER's "string match all").
    RecallAll,
}

impl TaskSpec {
    /// The task's name, as in a spec.
    pub fn name(&self) -> &'static str {
        match self {
            TaskSpec::Passkey => "passkey",
            TaskSpec::NiahSingle => "niah_single",
            TaskSpec::NiahMultikey { .. } => "niah_multikey",
            TaskSpec::NiahMultivalue { .. } => "niah_multivalue",
            TaskSpec::NiahMultiquery { .. } => "niah_multiquery",
            TaskSpec::VariableTracking { .. } => "variable_tracking",
        }
    }

    /// How the task is scored.
    pub fn metric(&self) -> Metric {
        match self {
            TaskSpec::Passkey | TaskSpec::NiahSingle | TaskSpec::NiahMultikey { .. } => Metric::ExactFirstNumber,
            TaskSpec::NiahMultivalue { .. } | TaskSpec::NiahMultiquery { .. } | TaskSpec::VariableTracking { .. } => {
                Metric::RecallAll
            }
        }
    }

    /// Every task with its default options.
    pub fn all() -> Vec<TaskSpec> {
        TASKS.iter().filter_map(|(n, _)| n.parse().ok()).collect()
    }

    /// Rejects option values outside their ranges.
    pub fn validate(&self) -> Result<()> {
        let check = |key: &str, v: usize, min: usize| -> Result<()> {
            if v < min || v > MAX_NEEDLES {
                return Err(Error::InvalidSpec {
                    spec: self.to_string(),
                    reason: format!("{key}={v} is not in {min}..={MAX_NEEDLES}"),
                });
            }
            Ok(())
        };
        match *self {
            TaskSpec::Passkey | TaskSpec::NiahSingle => Ok(()),
            TaskSpec::NiahMultikey { keys } => check("keys", keys, 2),
            TaskSpec::NiahMultivalue { values } => check("values", values, 2),
            TaskSpec::NiahMultiquery { queries } => check("queries", queries, 2),
            TaskSpec::VariableTracking { chains, hops } => {
                check("chains", chains, 1)?;
                check("hops", hops, 1)?;
                check("chains*(hops+1)", chains * (hops + 1), 2)
            }
        }
    }
}

impl fmt::Display for TaskSpec {
    /// The canonical spec, with every option written out (parses back to `self`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())?;
        match *self {
            TaskSpec::Passkey | TaskSpec::NiahSingle => Ok(()),
            TaskSpec::NiahMultikey { keys } => write!(f, ":keys={keys}"),
            TaskSpec::NiahMultivalue { values } => write!(f, ":values={values}"),
            TaskSpec::NiahMultiquery { queries } => write!(f, ":queries={queries}"),
            TaskSpec::VariableTracking { chains, hops } => write!(f, ":chains={chains},hops={hops}"),
        }
    }
}

impl FromStr for TaskSpec {
    type Err = Error;

    /// Parses `name[:key=value,...]`; names are case-insensitive, `-` may stand for `_`.
    fn from_str(s: &str) -> Result<Self> {
        let (name, rest) = s.split_once(':').unwrap_or((s, ""));
        let name = name.trim().to_ascii_lowercase().replace('-', "_");
        let mut opts = Vec::new();
        for kv in rest.split(',').map(str::trim).filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(|| Error::InvalidSpec {
                spec: s.to_string(),
                reason: format!("option `{kv}` is not key=value"),
            })?;
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            let n: usize = v.parse().map_err(|_| Error::InvalidSpec {
                spec: s.to_string(),
                reason: format!("option `{k}` needs a whole number, got `{v}`"),
            })?;
            opts.push((k, n));
        }
        let take = |allowed: &[(&str, usize)]| -> Result<Vec<usize>> {
            let mut vals: Vec<usize> = allowed.iter().map(|&(_, d)| d).collect();
            for (k, v) in &opts {
                match allowed.iter().position(|&(a, _)| a == k) {
                    Some(i) => vals[i] = *v,
                    None => {
                        return Err(Error::UnknownOption {
                            task: name.clone(),
                            key: k.clone(),
                            valid: if allowed.is_empty() {
                                "none".into()
                            } else {
                                allowed.iter().map(|(a, _)| *a).collect::<Vec<_>>().join(", ")
                            },
                        });
                    }
                }
            }
            Ok(vals)
        };
        let spec = match name.as_str() {
            "passkey" => take(&[]).map(|_| TaskSpec::Passkey)?,
            "niah_single" => take(&[]).map(|_| TaskSpec::NiahSingle)?,
            "niah_multikey" => TaskSpec::NiahMultikey { keys: take(&[("keys", 4)])?[0] },
            "niah_multivalue" => TaskSpec::NiahMultivalue { values: take(&[("values", 4)])?[0] },
            "niah_multiquery" => TaskSpec::NiahMultiquery { queries: take(&[("queries", 4)])?[0] },
            "variable_tracking" => {
                let v = take(&[("chains", 1), ("hops", 4)])?;
                TaskSpec::VariableTracking { chains: v[0], hops: v[1] }
            }
            _ => {
                return Err(Error::UnknownTask {
                    name: name.clone(),
                    valid: TASKS.iter().map(|(n, o)| format!("{n} ({o})")).collect::<Vec<_>>().join(", "),
                });
            }
        };
        spec.validate()?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_defaults_and_round_trip() {
        assert_eq!("passkey".parse::<TaskSpec>().unwrap(), TaskSpec::Passkey);
        assert_eq!("NIAH-multikey".parse::<TaskSpec>().unwrap(), TaskSpec::NiahMultikey { keys: 4 });
        assert_eq!("niah_multikey: keys = 8".parse::<TaskSpec>().unwrap(), TaskSpec::NiahMultikey { keys: 8 });
        assert_eq!(
            "variable_tracking:hops=2".parse::<TaskSpec>().unwrap(),
            TaskSpec::VariableTracking { chains: 1, hops: 2 }
        );
        for t in TaskSpec::all() {
            assert_eq!(t.to_string().parse::<TaskSpec>().unwrap(), t);
        }
        assert_eq!(TaskSpec::all().len(), TASKS.len());
    }

    #[test]
    fn bad_specs_error_and_name_what_is_valid() {
        let e = "passkee".parse::<TaskSpec>().unwrap_err();
        assert!(matches!(e, Error::UnknownTask { .. }));
        let msg = e.to_string();
        for (n, _) in TASKS {
            assert!(msg.contains(n), "{msg}");
        }
        let e = "passkey:keys=3".parse::<TaskSpec>().unwrap_err().to_string();
        assert!(e.contains("keys") && e.contains("none"), "{e}");
        let e = "niah_multikey:values=3".parse::<TaskSpec>().unwrap_err().to_string();
        assert!(e.contains("valid options: keys"), "{e}");
        assert!("niah_multikey:keys".parse::<TaskSpec>().is_err());
        assert!("niah_multikey:keys=four".parse::<TaskSpec>().is_err());
        assert!("niah_multikey:keys=1".parse::<TaskSpec>().unwrap_err().to_string().contains("keys=1"));
        assert!("niah_multivalue:values=1000".parse::<TaskSpec>().is_err());
        assert!("variable_tracking:hops=0".parse::<TaskSpec>().is_err());
        assert!("".parse::<TaskSpec>().is_err());
    }
}
