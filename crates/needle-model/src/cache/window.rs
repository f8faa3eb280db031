//! Per-layer attention kinds. A sliding-window layer (Gemma 3's local layers) keeps only its
//! last `window` keys and values, in a ring — constant memory, nothing to index, no selector —
//! and every query attends densely to the window ending at itself. Global layers keep their
//! pages and selectors as before.

use super::*;

/// What one layer of a [`KvCache`] attends to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LayerKind {
    /// Every earlier position: pages, selectors, tiers (the default).
    #[default]
    Global,
    /// The last `n` positions, the query's own included, kept in a ring of `n` rows.
    Window(usize),
}

/// A windowed layer's rows, all KV heads: position `p` sits in slot `p % window`
/// (`n_kv_heads × dim` floats of keys, the same of values), f32 whatever the pages' precision.
#[derive(Debug, Clone)]
pub(super) struct Ring {
    window: usize,
    /// Positions appended so far.
    len: usize,
    /// Floats per slot.
    row: usize,
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl Ring {
    fn new(window: usize, row: usize) -> Self {
        Self { window, len: 0, row, keys: Vec::new(), values: Vec::new() }
    }

    /// Keys and values of `pos` (one of the last `window` positions), all KV heads.
    fn slot(&self, pos: usize) -> (&[f32], &[f32]) {
        let s = (pos % self.window) * self.row;
        (&self.keys[s..s + self.row], &self.values[s..s + self.row])
    }

    /// Appends whole rows (`t × row`), overwriting the oldest slots once the ring is full.
    fn push(&mut self, keys: &[f32], values: &[f32]) {
        for (k, v) in keys.chunks_exact(self.row).zip(values.chunks_exact(self.row)) {
            if self.len < self.window {
                self.keys.extend_from_slice(k);
                self.values.extend_from_slice(v);
            } else {
                let s = (self.len % self.window) * self.row;
                self.keys[s..s + self.row].copy_from_slice(k);
                self.values[s..s + self.row].copy_from_slice(v);
            }
            self.len += 1;
        }
    }

    fn bytes(&self) -> usize {
        (self.keys.len() + self.values.len()) * 4
    }

    /// Slots filled: the last `min(len, window)` positions.
    fn held(&self) -> usize {
        self.len.min(self.window)
    }
}

impl<M> KvCache<M> {
    /// What each layer attends to.
    pub fn layer_kinds(&self) -> Vec<LayerKind> {
        (0..self.heads.len()).map(|l| self.layer_kind(l)).collect()
    }

    /// What `layer` attends to ([`LayerKind::Global`] for a layer that does not exist).
    pub fn layer_kind(&self, layer: usize) -> LayerKind {
        match self.rings.get(layer) {
            Some(Some(r)) => LayerKind::Window(r.window),
            _ => LayerKind::Global,
        }
    }

    /// Sets what each layer attends to, on an empty cache only (a model with sliding-window
    /// layers does it on its first forward pass when the cache has none yet; the same kinds
    /// again are a no-op). A windowed layer drops its selectors: full attention stands in,
    /// never asked. A cache (or saved context) holding tokens under other kinds is an error.
    pub fn set_layer_kinds(&mut self, kinds: &[LayerKind]) -> Result<()> {
        if kinds.len() != self.heads.len() {
            return Err(Error::invalid(
                "layer kinds",
                format!("{} kinds for a cache of {} layers", kinds.len(), self.heads.len()),
            ));
        }
        if self.layer_kinds() == kinds {
            return Ok(());
        }
        if (0..self.heads.len()).any(|l| self.layer_len(l).is_ok_and(|n| n > 0)) || self.built {
            return Err(Error::State(format!(
                "this cache holds {} tokens with layer kinds {:?}, but the model's are {:?}: it was \
                 made for another model; prefill a new one",
                self.len(),
                self.layer_kinds(),
                kinds
            )));
        }
        if kinds.contains(&LayerKind::Window(0)) {
            return Err(Error::invalid("layer kinds", "a window of 0 positions"));
        }
        let row = self.gqa.n_kv_heads * self.head_dim;
        self.rings = kinds
            .iter()
            .map(|k| match k {
                LayerKind::Global => None,
                LayerKind::Window(w) => Some(Ring::new(*w, row)),
            })
            .collect();
        for (l, row) in self.heads.iter_mut().enumerate() {
            if self.rings[l].is_some() {
                row.iter_mut().for_each(|h| h.selector = Box::new(FullSelector));
            }
        }
        Ok(())
    }

    /// Whether any layer is windowed.
    pub fn has_windows(&self) -> bool {
        self.rings.iter().any(Option::is_some)
    }

    /// Positions a windowed layer has seen (`None` for a global layer).
    pub(super) fn window_len(&self, layer: usize) -> Option<usize> {
        self.rings.get(layer).and_then(|r| r.as_ref()).map(|r| r.len)
    }

    /// Bytes the windowed layers' rings hold.
    pub(super) fn ring_bytes(&self) -> usize {
        self.rings.iter().flatten().map(Ring::bytes).sum()
    }

    /// A windowed layer's ring as a context file keeps it: the keys, then the values, of its
    /// filled slots in slot order (`None` for a global layer).
    pub(super) fn ring_floats(&self, layer: usize) -> Option<Vec<f32>> {
        let r = self.rings.get(layer)?.as_ref()?;
        Some(r.keys.iter().chain(&r.values).copied().collect())
    }

    /// Restores a windowed layer's ring from [`KvCache::ring_floats`]' layout after `len`
    /// positions; the error says what does not fit.
    pub(super) fn restore_ring(
        &mut self,
        layer: usize,
        floats: Vec<f32>,
        len: usize,
    ) -> std::result::Result<(), String> {
        let Some(Some(r)) = self.rings.get_mut(layer) else {
            return Err(format!("layer {layer} is not a sliding-window layer"));
        };
        let want = 2 * len.min(r.window) * r.row;
        if floats.len() != want {
            return Err(format!(
                "{} floats for the ring of a {}-position window after {len} positions ({want} expected)",
                floats.len(),
                r.window
            ));
        }
        let mut keys = floats;
        let values = keys.split_off(want / 2);
        (r.keys, r.values, r.len) = (keys, values, len);
        debug_assert_eq!(r.keys.len(), r.held() * r.row);
        Ok(())
    }

    /// Appends to a windowed layer's ring; `false` for a global layer (nothing done).
    pub(super) fn push_window(&mut self, layer: usize, keys: &[f32], values: &[f32]) -> bool {
        match self.rings.get_mut(layer) {
            Some(Some(r)) => {
                r.push(keys, values);
                true
            }
            _ => false,
        }
    }

    /// Attention of a windowed layer for `t` new tokens, before they are appended: `q` is
    /// `t × n_q_heads × dim`, `keys`/`values` the new rows `t × n_kv_heads × dim`; query `i`
    /// (position `len + i`) attends to the positions `len + i + 1 - window ..= len + i` of the
    /// ring and the new rows. Returns `t × n_q_heads × dim`. Decode steps count the window's
    /// keys in [`DecodeStats`] as attended (and as the dense cost).
    pub(crate) fn attend_window(
        &mut self,
        layer: usize,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        scale: f32,
    ) -> Result<Vec<f32>> {
        let ring = match self.rings.get(layer) {
            Some(Some(r)) => r,
            _ => return Err(Error::State(format!("layer {layer} is not a sliding-window layer"))),
        };
        let (d, gqa) = (self.head_dim, self.gqa);
        let (row, qrow) = (gqa.n_kv_heads * d, gqa.n_q_heads * d);
        let t = keys.len() / row;
        if keys.len() != t * row || values.len() != keys.len() || q.len() != t * qrow {
            return Err(Error::invalid(
                "q/keys/values",
                format!(
                    "{} queries, {} keys, {} values are not {t} rows of {qrow}/{row}",
                    q.len(),
                    keys.len(),
                    values.len()
                ),
            ));
        }
        let (pos0, w) = (ring.len, ring.window);
        let attend = |i: usize, scores: &mut Vec<f32>, out: &mut [f32]| -> Result<()> {
            let p = pos0 + i;
            let first = (p + 1).saturating_sub(w);
            let (mut ks, mut vs) = (Vec::with_capacity(p + 1 - first), Vec::with_capacity(p + 1 - first));
            for j in 0..gqa.n_kv_heads {
                ks.clear();
                vs.clear();
                for pos in first..=p {
                    let (k, v) = if pos < pos0 {
                        ring.slot(pos)
                    } else {
                        let s = (pos - pos0) * row;
                        (&keys[s..s + row], &values[s..s + row])
                    };
                    ks.push(&k[j * d..(j + 1) * d]);
                    vs.push(&v[j * d..(j + 1) * d]);
                }
                let g = gqa.group(j);
                let qg = &q[i * qrow + g.start * d..i * qrow + g.end * d];
                needle_kernels_cpu::attend_rows(qg, &ks, &vs, None, scale, scores, &mut out[g.start * d..g.end * d])
                    .map_err(|e| Error::kernel(format!("window attention of layer {layer}"), e))?;
            }
            Ok(())
        };
        let mut out = vec![0f32; t * qrow];
        if t == 1 {
            attend(0, &mut Vec::new(), &mut out)?;
        } else {
            out.par_chunks_mut(qrow).enumerate().try_for_each_init(Vec::new, |s, (i, o)| attend(i, s, o))?;
        }
        if self.built && t == 1 {
            let rows = ((pos0 + 1).min(w) * gqa.n_kv_heads) as u64;
            self.stats.keys_attended += rows;
            self.stats.keys_total += rows;
            self.stats.window_keys += rows;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A ring of 3 over positions 0..7 returns exactly the rows of the last 3 positions, and
    /// windowed attention equals the dense reference over those rows.
    #[test]
    fn ring_keeps_the_window_and_attention_matches_the_reference() {
        let (gqa, d, w) = (GqaLayout::new(4, 2).unwrap(), 8, 3);
        let mut cache: KvCache = KvCache::new(2, gqa, d, &FullSelector, SelectionConfig::default()).unwrap();
        cache.set_layer_kinds(&[LayerKind::Window(w), LayerKind::Global]).unwrap();
        let row = gqa.n_kv_heads * d;
        let val = |n: usize, seed: f32| -> Vec<f32> { (0..n).map(|i| ((i as f32 + seed) * 0.37).sin()).collect() };
        let (all_k, all_v, all_q) = (val(7 * row, 1.0), val(7 * row, 2.0), val(7 * gqa.n_q_heads * d, 3.0));
        // Two chunks (4 tokens, then 3), each attended before it is appended.
        let mut got = Vec::new();
        for r in [0..4, 4..7] {
            let (k, v) = (&all_k[r.start * row..r.end * row], &all_v[r.start * row..r.end * row]);
            let q = &all_q[r.start * gqa.n_q_heads * d..r.end * gqa.n_q_heads * d];
            got.extend(cache.attend_window(0, q, k, v, 0.3).unwrap());
            cache.append(0, k, v).unwrap();
        }
        assert_eq!(cache.layer_len(0).unwrap(), 7);
        assert_eq!(cache.ring_bytes(), 2 * w * row * 4, "the ring holds the window only");
        for p in 0..7usize {
            for h in 0..gqa.n_q_heads {
                let j = h / gqa.group_size();
                let first = (p + 1).saturating_sub(w);
                let q = &all_q[(p * gqa.n_q_heads + h) * d..][..d];
                let s: Vec<f64> = (first..=p)
                    .map(|r| 0.3 * (0..d).map(|x| (q[x] * all_k[r * row + j * d + x]) as f64).sum::<f64>())
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for x in 0..d {
                    let want: f64 =
                        (first..=p).zip(&s).map(|(r, sc)| (sc - m).exp() / z * all_v[r * row + j * d + x] as f64).sum();
                    let g = got[(p * gqa.n_q_heads + h) * d + x] as f64;
                    assert!((g - want).abs() < 1e-4, "pos {p} head {h} dim {x}: {g} vs {want}");
                }
            }
        }
        // Kinds are fixed once tokens are in.
        assert!(cache.set_layer_kinds(&[LayerKind::Global, LayerKind::Global]).is_err());
        assert!(cache.set_layer_kinds(&[LayerKind::Window(w), LayerKind::Global]).is_ok());
    }

    /// The global share leaves the windows out of both counts, and equals the overall share
    /// without window layers.
    #[test]
    fn global_share_leaves_the_windows_out() {
        let global =
            DecodeStats { keys_attended: 3 * 740, keys_selected: 300, keys_total: 3 * 16384, ..Default::default() };
        assert_eq!(global.share_touched_global(), global.share_touched());
        let with_windows = DecodeStats {
            keys_attended: global.keys_attended + 7680,
            keys_total: global.keys_total + 7680,
            window_keys: 7680,
            ..global
        };
        assert_eq!(with_windows.share_touched_global(), (3 * 640 + 300) as f64 / (3 * 16384) as f64);
        assert!(with_windows.share_touched() > 3.0 * with_windows.share_touched_global());
    }
}
