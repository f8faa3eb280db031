//! A decode step of one layer on the host: one select step (validation, the KV heads' selectors in parallel, the accounting) and the attention that follows it, over the static part and the selection, or the selection alone for a split (hybrid) step.

use super::*;

/// What [`KvCache::decode_dynamic`] returns for one layer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DynamicPart {
    /// Per KV head, the rows its selector picked (all in the dynamic part).
    pub ids: Vec<Vec<u32>>,
    /// Per KV head, additive log-weights parallel to `ids` (empty when the selector weights none).
    pub log_weights: Vec<Vec<f32>>,
    /// When the host attended: outputs `[n_q_heads × dim]` over the picked rows alone and their
    /// log-sum-exp `[n_q_heads]` (`-inf` and zeros where nothing was picked).
    pub host: Option<(Vec<f32>, Vec<f32>)>,
}

/// How a backend with a device ([`NeedleBackend::KvMirror`](crate::NeedleBackend::KvMirror)
/// not `()`: the CubeCL arm) runs a decode step's attention; host backends always attend on the
/// host and ignore it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DecodeMode {
    /// Static part on the device, the selected rows on the host at the same time, one merge.
    #[default]
    Hybrid,
    /// Static part and selected rows in one gathered device pass (the host only selects).
    Device,
}

/// Below this many cached rows in a layer (all KV heads), decode attention runs on one thread.
/// The pool's workers are still spinning from the q/k/v products just before, so a loop starts
/// without a wake-up: a few hundred rows already pay for the second thread.
const PAR_MIN_ROWS: usize = 768;

impl<M> KvCache<M> {
    /// Decode attention of one layer: for each KV head, its selector picks dynamic-part ids
    /// for the group's queries, then each query head attends to static part + selection,
    /// merged by log-sum-exp. `q` is `n_q_heads × dim`; returns the same shape.
    pub fn attend_decode(&mut self, layer: usize, q: &[f32], scale: f32) -> Result<Vec<f32>> {
        let outs = self.select_step(layer, q, scale, |h, qg| {
            let sp = h.selector.static_part();
            Ok(attend_group(qg, &h.keys, &h.values, sp, &h.selection, scale, &mut h.scratch)?.to_vec())
        })?;
        Ok(outs.concat())
    }

    /// The host's half of a split decode step: every KV head's selector picks from its dynamic
    /// part for the query group in `q` (`[n_q_heads × dim]`), and with `attend` the host also
    /// attends to the picked rows alone, giving a partial (output and log-sum-exp) that an exact
    /// merge combines with the static part's, attended elsewhere (the CubeCL arm's device).
    pub fn decode_dynamic(&mut self, layer: usize, q: &[f32], scale: f32, attend: bool) -> Result<DynamicPart> {
        let outs = self.select_step(layer, q, scale, |h, qg| {
            if attend { attend_selection(qg, h, scale) } else { Ok((Vec::new(), Vec::new())) }
        })?;
        let selections = self.heads[layer].iter().map(|h| (h.selection.ids.clone(), h.selection.log_weights.clone()));
        let (ids, log_weights) = selections.unzip();
        let host = attend.then(|| {
            let (o, l): (Vec<_>, Vec<_>) = outs.into_iter().unzip();
            (o.concat(), l.concat())
        });
        Ok(DynamicPart { ids, log_weights, host })
    }

    /// The one select step of every decode path: checks the layer, the queries and the
    /// lifecycle; each KV head's selector picks for its query group and `attend` runs on the
    /// head, the heads in one parallel region (serial when small: waking a thread costs more
    /// than a few hundred keys); then the step's accounting. Returns `attend`'s result per KV
    /// head.
    fn select_step<T: Send>(
        &mut self,
        layer: usize,
        q: &[f32],
        scale: f32,
        attend: impl Fn(&mut HeadCache, &[f32]) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        self.check_layer(layer)?;
        let (d, gqa, budget) = (self.head_dim, self.gqa, self.config.budget);
        if q.len() != gqa.n_q_heads * d {
            return Err(Error::invalid(
                "q",
                format!("{} floats; decode attention takes n_q_heads × dim = {}", q.len(), gqa.n_q_heads * d),
            ));
        }
        if !self.built {
            return Err(Error::State("decode attention before the selectors were built (prefill first)".into()));
        }
        if !scale.is_finite() {
            return Err(Error::invalid("scale", format!("{scale} is not finite")));
        }
        let group = |j: usize| &q[gqa.group(j).start * d..gqa.group(j).end * d];
        let select = |j: usize, h: &mut HeadCache| -> Result<Duration> {
            let t0 = Instant::now();
            h.selector.select(group(j), &h.keys, &budget, &mut h.selection)?;
            Ok(t0.elapsed())
        };
        let attend_head = |j: usize, h: &mut HeadCache| -> Result<(T, Duration)> {
            let t0 = Instant::now();
            let out = attend(h, group(j))?;
            Ok((out, t0.elapsed()))
        };
        let wall = Instant::now();
        let heads = &mut self.heads[layer];
        let rows: usize = heads.iter().map(|h| h.keys.len()).sum();
        let outs: Vec<(T, Duration, Duration)> = if rows < PAR_MIN_ROWS {
            let step = |(j, h): (usize, &mut HeadCache)| -> Result<(T, Duration, Duration)> {
                let sel = select(j, h)?;
                let (out, att) = attend_head(j, h)?;
                Ok((out, sel, att))
            };
            heads.iter_mut().enumerate().map(step).collect::<Result<_>>()?
        } else {
            staged(heads, select, attend_head)?
        };
        let (sel, att): (Duration, Duration) = outs.iter().fold(Default::default(), |(a, b), o| (a + o.1, b + o.2));
        self.account_step(layer, wall.elapsed(), sel, att);
        Ok(outs.into_iter().map(|o| o.0).collect())
    }

    /// The select half of [`Self::attend_decode`] (checks, every KV head's selector, the
    /// step's accounting): the attention is [`Self::attend_decode_many`]'s, for several
    /// sequences at once.
    pub(crate) fn select_decode(&mut self, layer: usize, q: &[f32], scale: f32) -> Result<()> {
        self.select_step(layer, q, scale, |_, _| Ok(())).map(drop)
    }

    /// Decode attention of one layer for several sequences whose selectors have picked
    /// ([`Self::select_decode`]): row `i` of `q` (`n_q_heads × dim` each) through `caches[i]`,
    /// every KV head of every sequence in one parallel region where chunks that are the same
    /// rows in several sequences are read once ([`attend_groups`](crate::decode::attend_groups));
    /// each sequence gets the bits [`Self::attend_decode`] gives it alone. The region's time is
    /// shared among the sequences' attention times.
    pub(crate) fn attend_decode_many(
        caches: &mut [&mut KvCache<M>],
        layer: usize,
        q: &[f32],
        scale: f32,
    ) -> Result<Vec<f32>>
    where
        M: Send,
    {
        let t0 = Instant::now();
        let mut groups = Vec::new();
        let mut qn = 0;
        for (i, c) in caches.iter().enumerate() {
            c.check_layer(layer)?;
            let (d, gqa) = (c.head_dim, c.gqa);
            qn = gqa.n_q_heads * d;
            let qi = q.get(i * qn..(i + 1) * qn).ok_or_else(|| {
                Error::invalid("q", format!("{} floats for {} sequences of {qn}", q.len(), caches.len()))
            })?;
            for (j, h) in c.heads[layer].iter().enumerate() {
                let r = gqa.group(j);
                groups.push(crate::decode::GroupIn {
                    q: &qi[r.start * d..r.end * d],
                    keys: &h.keys,
                    values: &h.values,
                    static_part: h.selector.static_part(),
                    selection: &h.selection,
                });
            }
        }
        let outs = crate::decode::attend_groups(&groups, scale)?;
        let mut out = Vec::with_capacity(caches.len() * qn);
        outs.iter().for_each(|o| out.extend_from_slice(o));
        let share = t0.elapsed() / caches.len().max(1) as u32;
        for c in caches.iter_mut() {
            c.stats.attend_time += share;
        }
        Ok(out)
    }

    /// Where the first key row of `layer`'s first KV head lies (`None` before any row): two
    /// caches that read one context's pages have the same.
    pub(crate) fn first_row_addr(&self, layer: usize) -> Option<usize> {
        let keys = &self.heads.get(layer)?.first()?.keys;
        (!keys.is_empty()).then(|| match keys.row(0) {
            needle_core::Row::F32(r) => r.as_ptr() as usize,
            needle_core::Row::F16(r) => r.as_ptr() as usize,
            needle_core::Row::Q8(r) => r.as_ptr() as usize,
        })
    }

    /// Adds one layer's decode step to the stats (`wall` split between selection and attention
    /// as the per-head times `sel` and `att` are) and marks the pages it read.
    fn account_step(&mut self, layer: usize, wall: Duration, sel: Duration, att: Duration) {
        let s = &mut self.stats;
        let share = sel.as_secs_f64() / (sel + att).as_secs_f64().max(f64::MIN_POSITIVE);
        s.select_time += wall.mul_f64(share);
        s.attend_time += wall.mul_f64(1.0 - share);
        for h in &self.heads[layer] {
            let n = h.keys.len();
            let dynamic = h.selector.static_part().dynamic_range(n).len();
            s.keys_total += n as u64;
            s.keys_dynamic += dynamic as u64;
            s.keys_attended += (n - dynamic + h.selection.ids.len()) as u64;
            s.keys_selected += h.selection.ids.len() as u64;
            s.select += h.selection.stats;
        }
        self.note_reads(layer);
    }

    /// Marks the end of a decode step (for per-step averages).
    pub fn finish_step(&mut self) {
        self.stats.steps += 1;
    }

    /// The static part of the selector serving a head.
    pub fn static_part(&self, layer: usize, kv_head: usize) -> needle_core::StaticPart {
        self.heads[layer][kv_head].selector.static_part()
    }

    /// The selection a head made at the last decode step (for fidelity measurements).
    pub fn last_selection(&self, layer: usize, kv_head: usize) -> &Selection {
        &self.heads[layer][kv_head].selection
    }
}

/// The heads' selections, then their attentions, as one loop of `2 × heads` tasks on the
/// linears' pool (its workers spin between loops; a second pool's threads would compete with
/// them for the cores). Tasks are claimed in order, so every selection starts before any
/// attention, and an attention waits only for its own head's selection: with more heads than
/// threads, the heads selected first attend while the last ones still walk (three heads on two
/// threads, say, instead of two rounds of select-then-attend). Returns per head the output and
/// the selection and attention times.
fn staged<T: Send>(
    heads: &mut [HeadCache],
    select: impl Fn(usize, &mut HeadCache) -> Result<Duration> + Sync,
    attend: impl Fn(usize, &mut HeadCache) -> Result<(T, Duration)> + Sync,
) -> Result<Vec<(T, Duration, Duration)>> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    /// Marks a head selected when its task ends, even by a panic (re-raised by the pool), so no
    /// attention task waits forever.
    struct Done<'a>(&'a AtomicBool);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    fn lock<X>(m: &Mutex<X>) -> std::sync::MutexGuard<'_, X> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }
    let n = heads.len();
    // One lock per head, never contended: a head's attention starts after its selection ended.
    let cells: Vec<Mutex<&mut HeadCache>> = heads.iter_mut().map(Mutex::new).collect();
    let selected: Vec<AtomicBool> = (0..n).map(|_| AtomicBool::new(false)).collect();
    /// A task's result, written once by the task that ran it.
    type Slot<R> = Mutex<Option<Result<R>>>;
    let sel: Vec<Slot<Duration>> = (0..n).map(|_| Mutex::new(None)).collect();
    let att: Vec<Slot<(T, Duration)>> = (0..n).map(|_| Mutex::new(None)).collect();
    needle_kernels_cpu::Pool::global().run(2 * n, &|i| {
        if i < n {
            let _done = Done(&selected[i]);
            let r = select(i, &mut lock(&cells[i]));
            *lock(&sel[i]) = Some(r);
            return;
        }
        let j = i - n;
        let mut spins = 0u32;
        while !selected[j].load(Ordering::Acquire) {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        if matches!(*lock(&sel[j]), Some(Ok(_))) {
            let r = attend(j, &mut lock(&cells[j]));
            *lock(&att[j]) = Some(r);
        }
    });
    let mut outs = Vec::with_capacity(n);
    for (s, a) in sel.into_iter().zip(att) {
        let s = s.into_inner().unwrap_or_else(|e| e.into_inner());
        let a = a.into_inner().unwrap_or_else(|e| e.into_inner());
        match (s, a) {
            (Some(Ok(s)), Some(Ok((out, a)))) => outs.push((out, s, a)),
            (Some(Err(e)), _) | (_, Some(Err(e))) => return Err(e),
            _ => return Err(Error::State("a decode task of a KV head did not run".into())),
        }
    }
    Ok(outs)
}

/// The query group `qg` of one KV head attending to its selected rows alone (weighted by the
/// selection's log-weights), with each query head's log-sum-exp
/// ([`attend_selection`](crate::decode::attend_selection)): the host half of a split step,
/// merged exactly with the static part's elsewhere. `-inf` and zeros where nothing was picked.
fn attend_selection(qg: &[f32], h: &mut HeadCache, scale: f32) -> Result<(Vec<f32>, Vec<f32>)> {
    let mut lse = vec![0f32; qg.len() / h.keys.dim().max(1)];
    let sp = h.selector.static_part();
    let out =
        crate::decode::attend_selection(qg, &h.keys, &h.values, sp, &h.selection, scale, &mut h.scratch, &mut lse)?;
    Ok((out.to_vec(), lse))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The host half of a split step (`attend_rows_lse` over the selection) against the scalar
    /// f64 reference over the same picks, at every KV precision, plain and weighted selections.
    #[test]
    fn the_split_steps_host_half_matches_the_reference_over_the_selection() {
        let (gqa, d, n) = (GqaLayout::new(6, 2).unwrap(), 16, 300);
        let mut rand = crate::testutil::uniform(0x2545_f491u32);
        let (k, v, q) = (rand(n * 2 * d), rand(n * 2 * d), rand(6 * d));
        for spec in ["oracle:k=12,sinks=4,window=16", "lsh-sample:sinks=4,window=16"] {
            for kv in [KvDtype::F32, KvDtype::F16, KvDtype::Q8] {
                let (f, mut config) = crate::compose(needle_select::parse(spec).unwrap());
                config.kv = kv;
                let mut c: KvCache = KvCache::new(1, gqa, d, f.as_ref(), config).unwrap();
                c.append(0, &k, &v).unwrap();
                c.build(0.25).unwrap();
                let part = c.decode_dynamic(0, &q, 0.25, true).unwrap();
                let (out, lse) = part.host.unwrap();
                assert!(part.ids.iter().any(|ids| !ids.is_empty()), "{spec}: nothing selected");
                for h in 0..6 {
                    let j = gqa.kv_head_of(h);
                    let w = &part.log_weights[j];
                    let ids = part.ids[j].iter().enumerate().map(|(i, &id)| (id, w.get(i).copied().unwrap_or(0.0)));
                    let want = needle_core::attention::attend_weighted::<f64>(
                        &q[h * d..(h + 1) * d],
                        c.keys(0, j),
                        c.values(0, j),
                        ids,
                        0.25,
                    )
                    .unwrap();
                    assert!((f64::from(lse[h]) - want.lse).abs() < 1e-4, "{spec} {kv} head {h}: lse");
                    for (a, b) in out[h * d..(h + 1) * d].iter().zip(&want.out) {
                        assert!((f64::from(*a) - b).abs() < 1e-4, "{spec} {kv} head {h}: {a} vs {b}");
                    }
                }
            }
        }
    }
}
