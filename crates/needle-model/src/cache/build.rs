//! Building a cache's selectors: after the prefill, or layer by layer on the background builder while later layers compute; forking a built cache with other selectors.

use super::*;

/// A layer's heads handed to the background builder.
pub(super) type EarlyBuild = (usize, Vec<HeadCache>);

/// What the background builder gives back: the layer's heads (always, built or not), its build
/// and the time it took.
pub(super) type EarlyBuilt = (usize, Vec<HeadCache>, Result<BuildStats>, Duration);

/// Builds one head's selector over its keys and training queries, dropping the queries unless
/// `retain`.
fn build_head(layer: usize, kv_head: usize, h: &mut HeadCache, scale: f32, retain: bool) -> Result<BuildStats> {
    let ctx = BuildContext { head: HeadId { layer, kv_head }, keys: &h.keys, train_queries: &h.train_queries, scale };
    let stats = h.selector.build(&ctx)?;
    if !retain {
        h.train_queries = Vec::new();
    }
    Ok(stats)
}

impl<M> KvCache<M> {
    /// Whether a layer's selectors start building on a background thread as soon as the
    /// planned prompt ([`KvCache::plan_training`]) has passed that layer, while later layers
    /// compute (on by default), or all after the prefill. The built selectors are the same
    /// either way. Not under a host budget ([`KvCache::set_kv_budget`]): the budget needs every
    /// layer's pages at hand.
    pub fn set_build_during_prefill(&mut self, on: bool) {
        self.early_build = on;
    }

    /// Called once a forward pass has attended `layer` (by [`crate::cached_attention`]): when
    /// that pass ended the planned prompt, the layer's keys and training queries are final and
    /// its heads go to the background builder until [`KvCache::build`]. The last layer stays:
    /// nothing computes after it for a build to overlap.
    pub(crate) fn layer_prefilled(&mut self, layer: usize, scale: f32) -> Result<()> {
        if self.built
            || !self.early_build
            || self.tiers.is_some()
            || layer + 1 >= self.heads.len()
            || self.heads[layer].is_empty()
            || self.prompt_end != Some(self.heads[layer][0].keys.len())
        {
            return Ok(());
        }
        if self.builder.is_none() {
            let retain = self.retain_training;
            let run = move |(layer, mut row): EarlyBuild| -> EarlyBuilt {
                let t0 = Instant::now();
                let stats = row.iter_mut().enumerate().try_fold(BuildStats::default(), |mut acc, (j, h)| {
                    acc += build_head(layer, j, h, scale, retain)?;
                    Ok(acc)
                });
                (layer, row, stats, t0.elapsed())
            };
            let worker = Worker::spawn("needle-build", run)
                .map_err(|e| Error::State(format!("starting the background index builder: {e}")))?;
            self.builder = Some(worker);
        }
        let row = std::mem::take(&mut self.heads[layer]);
        if let Some(b) = &self.builder {
            b.submit((layer, row));
        }
        Ok(())
    }

    /// Keeps the training queries after the build, so that [`KvCache::fork`] can build other
    /// selectors over the same prefill. Call before prefill.
    pub fn retain_training_queries(&mut self) {
        self.retain_training = true;
    }

    /// A copy of this prefilled cache with fresh selectors from `factory`, built over the same
    /// keys and training queries: compares selectors without prefilling again. Pages are
    /// converted to `config.kv` when it differs (the prefill itself ran at this cache's
    /// precision). Needs
    /// [`KvCache::retain_training_queries`] before the prefill (else the selectors train on no queries).
    pub fn fork(&self, factory: &dyn SelectorFactory, config: SelectionConfig, scale: f32) -> Result<Self>
    where
        M: Default,
    {
        if !self.built {
            return Err(Error::State("fork needs a prefilled cache".into()));
        }
        if !self.retain_training {
            tracing::warn!("forking a cache that did not retain training queries: selectors train on keys only");
        }
        let mut heads = make_heads(self.heads.len(), self.gqa.n_kv_heads, self.head_dim, factory, &config, |l, j| {
            let h = &self.heads[l][j];
            Ok((h.keys.to_dtype(config.kv)?, h.values.to_dtype(config.kv)?, h.train_queries.clone()))
        })?;
        // Sliding-window layers have no selectors (LayerKind::Window).
        for (row, ring) in heads.iter_mut().zip(&self.rings) {
            if ring.is_some() {
                row.iter_mut().for_each(|h| h.selector = Box::new(FullSelector));
            }
        }
        let mut c = KvCache {
            heads,
            gqa: self.gqa,
            head_dim: self.head_dim,
            config,
            built: false,
            train_stride: self.train_stride,
            prompt_end: self.prompt_end,
            retain_training: self.retain_training,
            trace: self.trace.as_ref().map(|t| QueryTrace {
                layers: t.layers.clone(),
                prefill: t.prefill.clone(),
                decode: vec![Vec::new(); t.layers.len()],
            }),
            tiers: None,
            device_budget: self.device_budget,
            early_build: self.early_build,
            builder: None,
            rings: self.rings.clone(),
            mirror: M::default(),
            decode_mode: self.decode_mode,
            stats: DecodeStats::default(),
            last_weights_time: std::time::Duration::ZERO,
        };
        c.build(scale)?;
        Ok(c)
    }

    /// Builds every selector from the prefilled keys and sampled queries (parallel over heads).
    /// Layers the background builder took during prefill come back built; those it had not
    /// started are built here with the rest.
    pub fn build(&mut self, scale: f32) -> Result<()> {
        let start = Instant::now();
        let mut early = BuildStats::default();
        let mut first_err = None;
        // Layers the background builder finished; the pass below builds the rest.
        let mut ready = vec![false; self.heads.len()];
        if let Some(builder) = self.builder.take() {
            let (left, done) = builder.finish().ok_or_else(|| {
                Error::State("the background index builder panicked; this cache's selectors are lost".into())
            })?;
            for (layer, row, stats, took) in done {
                self.heads[layer] = row;
                ready[layer] = true;
                self.stats.build_background_time += took;
                match stats {
                    Ok(s) => early += s,
                    Err(e) => first_err = first_err.or(Some(e)),
                }
            }
            for (layer, row) in left {
                self.heads[layer] = row;
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        let budget = self.config.budget;
        budget.validate(self.len())?;
        let (retain, ready) = (self.retain_training, &ready);
        let per_head: Vec<BuildStats> = self
            .heads
            .par_iter_mut()
            .enumerate()
            .filter(|(layer, _)| !ready[*layer])
            .flat_map(|(layer, row)| {
                row.par_iter_mut().enumerate().map(move |(kv_head, h)| build_head(layer, kv_head, h, scale, retain))
            })
            .collect::<Result<_>>()?;
        for s in per_head {
            self.stats.build += s;
        }
        self.stats.build += early;
        self.built = true;
        self.stats.build_time += start.elapsed();
        Ok(())
    }
}
