//! Per-head policies (the DuoAttention idea, Xiao et al., arXiv 2410.10819): a few "retrieval
//! heads" need the whole context, the others do with sinks + window. A [`HeadPolicy`] names a
//! selector spec per (layer, KV head), with a default for the rest.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use needle_core::{
    AttentionSelector, Budget, BuildContext, BuildStats, Error, HeadId, Result, RowSource, Selection, SelectorFactory,
    StaticPart,
};

use crate::spec::parse;

/// One head's selector.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HeadRule {
    /// Layer, from 0.
    pub layer: usize,
    /// KV head within the layer, from 0.
    pub kv_head: usize,
    /// Selector spec of this head, e.g. `retrieval:k=100`.
    pub spec: String,
}

/// A selector spec per head, as stored in a JSON policy file:
/// `{"default": "streaming", "heads": [{"layer": 3, "kv_head": 1, "spec": "retrieval:k=100"}]}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HeadPolicy {
    /// Spec of every head without a rule.
    pub default: String,
    /// Heads with their own spec.
    #[serde(default)]
    pub heads: Vec<HeadRule>,
}

impl HeadPolicy {
    /// Reads a policy from JSON.
    pub fn from_json(json: &str) -> Result<Self> {
        serde_json::from_str(json).map_err(|e| Error::invalid("policy", format!("bad policy JSON: {e}")))
    }

    /// The policy as pretty JSON.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| Error::invalid("policy", format!("cannot write JSON: {e}")))
    }

    /// Reads a policy file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::invalid("policy file", format!("cannot read {}: {e}", path.display())))?;
        Self::from_json(&text)
    }

    /// Writes the policy as JSON to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_json()?)
            .map_err(|e| Error::invalid("policy file", format!("cannot write {}: {e}", path.display())))
    }
}

/// Assigns a selector per head from a [`HeadPolicy`].
///
/// Each head's selector runs with the budget of its own spec (`k`, `mass`), clamped to the
/// dynamic part, whatever budget the model passes; the model-level settings (`dense_layers`,
/// `train_positions`, the budget the model validates) come from the `policy:` spec itself.
pub struct PolicyFactory {
    policy: HeadPolicy,
    default: (Box<dyn SelectorFactory>, Budget),
    heads: HashMap<HeadId, (Box<dyn SelectorFactory>, Budget)>,
}

impl std::fmt::Debug for PolicyFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyFactory").field("policy", &self.policy).finish()
    }
}

fn head_spec(spec: &str) -> Result<(Box<dyn SelectorFactory>, Budget)> {
    if spec.trim().to_ascii_lowercase().starts_with("policy") {
        return Err(Error::invalid("policy spec", format!("`{spec}`: policies do not nest")));
    }
    let s = parse(spec)?;
    Ok((s.factory, s.budget))
}

impl PolicyFactory {
    /// Parses every spec of the policy; errors name the first bad one.
    pub fn new(policy: HeadPolicy) -> Result<Self> {
        let default = head_spec(&policy.default)?;
        let mut heads = HashMap::new();
        for r in &policy.heads {
            let head = HeadId { layer: r.layer, kv_head: r.kv_head };
            if heads.insert(head, head_spec(&r.spec)?).is_some() {
                return Err(Error::invalid(
                    "policy heads",
                    format!("layer {} KV head {} has more than one rule", r.layer, r.kv_head),
                ));
            }
        }
        Ok(Self { policy, default, heads })
    }

    /// The policy served.
    pub fn policy(&self) -> &HeadPolicy {
        &self.policy
    }
}

impl SelectorFactory for PolicyFactory {
    fn describe(&self) -> String {
        format!("policy:default={},heads={}", self.policy.default, self.policy.heads.len())
    }
    fn create(&self, head: HeadId, dim: usize) -> Result<Box<dyn AttentionSelector>> {
        let (factory, budget) = self.heads.get(&head).unwrap_or(&self.default);
        Ok(Box::new(WithBudget { inner: factory.create(head, dim)?, budget: *budget }))
    }
}

/// A selector run with its own budget.
struct WithBudget {
    inner: Box<dyn AttentionSelector>,
    budget: Budget,
}

impl AttentionSelector for WithBudget {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn static_part(&self) -> StaticPart {
        self.inner.static_part()
    }
    fn build(&mut self, ctx: &BuildContext<'_>) -> Result<BuildStats> {
        self.inner.build(ctx)
    }
    fn insert(&mut self, keys: &dyn RowSource, positions: Range<u32>) -> Result<()> {
        self.inner.insert(keys, positions)
    }
    fn select(&mut self, queries: &[f32], keys: &dyn RowSource, _budget: &Budget, out: &mut Selection) -> Result<()> {
        // This head's own budget replaces the spec-wide one; the inner selector clamps it.
        self.inner.select(queries, keys, &self.budget, out)
    }
    fn memory_bytes(&self) -> usize {
        self.inner.memory_bytes()
    }
    // The budget comes from the policy, not the build: the state is the inner selector's.
    fn save_state(&self, out: &mut Vec<u8>) -> Result<()> {
        self.inner.save_state(out)
    }
    fn load_state(&mut self, state: &[u8], keys: &dyn RowSource) -> Result<()> {
        self.inner.load_state(state, keys)
    }
}

/// A DuoAttention-style policy from per-head measurements: `outside_mass` holds, per head, the
/// share of attention mass that falls outside sinks + window (measured on calibration
/// prompts). The `retrieval_share` of heads with the most such mass (rounded, at least one
/// when the share is positive) get `retrieval_spec`; the others fall to `streaming_spec`.
/// Ties go to the lower (layer, KV head).
pub fn rank_heads(
    outside_mass: &[(HeadId, f64)],
    retrieval_share: f64,
    retrieval_spec: &str,
    streaming_spec: &str,
) -> Result<HeadPolicy> {
    if !(0.0..=1.0).contains(&retrieval_share) {
        return Err(Error::invalid("retrieval_share", format!("{retrieval_share} is not in [0, 1]")));
    }
    if let Some((h, m)) = outside_mass.iter().find(|(_, m)| !m.is_finite()) {
        return Err(Error::invalid(
            "outside_mass",
            format!("layer {} KV head {}: {m} is not finite", h.layer, h.kv_head),
        ));
    }
    // Both specs must parse, so a policy that is returned can be served.
    head_spec(retrieval_spec)?;
    head_spec(streaming_spec)?;
    let mut ranked: Vec<&(HeadId, f64)> = outside_mass.iter().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let n = ranked.len();
    let mut take = (retrieval_share * n as f64).round() as usize;
    if retrieval_share > 0.0 && n > 0 {
        take = take.max(1);
    }
    let mut heads: Vec<HeadRule> = ranked[..take.min(n)]
        .iter()
        .map(|(h, _)| HeadRule { layer: h.layer, kv_head: h.kv_head, spec: retrieval_spec.to_string() })
        .collect();
    heads.sort_by_key(|r| (r.layer, r.kv_head));
    Ok(HeadPolicy { default: streaming_spec.to_string(), heads })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{HEAD, built, select, uniform};

    #[test]
    fn policy_json_round_trips_and_assigns_per_head() {
        let p = HeadPolicy {
            default: "streaming:sinks=4,window=16".into(),
            heads: vec![HeadRule { layer: 0, kv_head: 0, spec: "oracle:k=7,sinks=4,window=16".into() }],
        };
        let json = p.to_json().unwrap();
        assert_eq!(HeadPolicy::from_json(&json).unwrap(), p);
        let dir = std::env::temp_dir().join(format!("needle-select-policy-{}.json", std::process::id()));
        p.save(&dir).unwrap();
        let spec = parse(&format!("policy:file={},k=50", dir.display())).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(spec.budget, Budget::TopK(50));
        let data = uniform(200, 3, 8, 51);
        // Head (0, 0) is an oracle with its own k = 7, whatever the model passes.
        let mut sel = built(spec.factory.as_ref(), &data);
        assert!(sel.describe().starts_with("oracle"));
        assert_eq!(select(sel.as_mut(), &data, &data.queries, Budget::TopK(100)).ids.len(), 7);
        let other = spec.factory.create(HeadId { layer: 1, kv_head: 0 }, 8).unwrap();
        assert!(other.describe().starts_with("streaming"));
        let _ = HEAD;
    }

    #[test]
    fn bad_policies_are_named() {
        assert!(HeadPolicy::from_json("{").is_err());
        let bad = HeadPolicy { default: "nope".into(), heads: vec![] };
        assert!(PolicyFactory::new(bad).is_err());
        let nested = HeadPolicy { default: "policy:file=x.json".into(), heads: vec![] };
        assert!(PolicyFactory::new(nested).is_err());
        let rule = HeadRule { layer: 0, kv_head: 0, spec: "full".into() };
        let twice = HeadPolicy { default: "full".into(), heads: vec![rule.clone(), rule] };
        assert!(PolicyFactory::new(twice).is_err());
        assert!(parse("policy:file=/nonexistent/heads.json").is_err());
        assert!(parse("policy").is_err());
    }

    #[test]
    fn rank_heads_picks_the_heads_with_most_mass_outside_the_window() {
        let m: Vec<(HeadId, f64)> = (0..8)
            .map(|i| (HeadId { layer: i / 2, kv_head: i % 2 }, [0.1, 0.5, 0.05, 0.7, 0.2, 0.0, 0.3, 0.6][i]))
            .collect();
        let p = rank_heads(&m, 0.25, "retrieval:index=flat,k=64", "streaming").unwrap();
        let got: Vec<(usize, usize)> = p.heads.iter().map(|r| (r.layer, r.kv_head)).collect();
        assert_eq!(got, vec![(1, 1), (3, 1)]);
        assert_eq!(p.default, "streaming");
        assert!(PolicyFactory::new(p).is_ok());
        assert!(rank_heads(&m, 1.5, "oracle", "streaming").is_err());
        assert!(rank_heads(&m, 0.5, "nope", "streaming").is_err());
        assert!(rank_heads(&m, 0.0, "oracle", "streaming").unwrap().heads.is_empty());
    }
}
