//! Saving a built cache's heads into a context file and loading them back.

use super::*;

/// Name of one head's section of `kind` (`k`, `v`, `sel`, `train`) in a context file.
fn section(kind: &str, layer: usize, kv_head: usize) -> String {
    format!("{kind}/{layer}/{kv_head}")
}

/// Name of a sliding-window layer's ring section (all its KV heads) in a context file.
fn ring_section(layer: usize) -> String {
    format!("ring/{layer}")
}

/// Writes the stored rows of `rows` page by page (the last page only as far as it is filled).
fn write_rows(w: &mut ContextWriter, name: &str, rows: &PagedRows) -> Result<()> {
    let (n, stride, ps) = (rows.len(), rows.stride(), rows.page_size());
    let page_bytes = rows.page_bytes();
    let filled = |i: usize| (n - i * ps).min(ps) * stride;
    match rows.pages() {
        Pages::F32(p) => w.paged_section(
            name,
            page_bytes,
            p.iter().enumerate().map(|(i, pg)| bytemuck::cast_slice(&pg[..filled(i)])),
        )?,
        Pages::F16(p) => w.paged_section(
            name,
            page_bytes,
            p.iter().enumerate().map(|(i, pg)| bytemuck::cast_slice(&pg[..filled(i)])),
        )?,
        Pages::Q8(p) => w.paged_section(name, page_bytes, p.iter().enumerate().map(|(i, pg)| &pg[..filled(i)]))?,
    }
    Ok(())
}

/// The `len` rows a section holds, in `rows`' own precision and page size, read in place
/// from the file's map (every page checked first); `rows` must be empty.
fn read_rows(r: &ContextReader, name: &str, rows: &mut PagedRows, len: usize) -> Result<()> {
    let (dim, ps) = (rows.dim(), rows.page_size());
    let pages = match rows.dtype() {
        KvDtype::F32 => Pages::F32(r.mapped_pages(name)?),
        KvDtype::F16 => Pages::F16(r.mapped_pages(name)?),
        KvDtype::Q8 => Pages::Q8(r.mapped_pages(name)?),
    };
    *rows = PagedRows::from_pages(dim, ps, pages, len).map_err(|e| corrupt(r, name, e.to_string()))?;
    Ok(())
}

/// The little-endian `f32`s of a section.
fn read_f32s(r: &ContextReader, name: &str, bytes: &[u8]) -> Result<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return Err(corrupt(r, name, format!("{} bytes is not a whole number of f32s", bytes.len())));
    }
    Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

fn corrupt(r: &ContextReader, section: &str, reason: String) -> Error {
    needle_kv::Error::Corrupt { path: r.path().to_path_buf(), section: section.into(), reason }.into()
}

impl<M> KvCache<M> {
    /// Writes every head's keys, values and selector state into a context file. A selector
    /// that cannot save its state ([`needle_core::Error::Unsupported`]) has its training
    /// queries written instead and is rebuilt from them at load. A sliding-window layer writes
    /// its ring instead (the window's rows, f32, with no selector).
    pub(crate) fn save_heads(&self, w: &mut ContextWriter, progress: &mut dyn FnMut(usize, usize)) -> Result<()> {
        if !self.built {
            return Err(Error::State("saving needs a prefilled cache (its selectors built)".into()));
        }
        let mut state = Vec::new();
        for (layer, row) in self.heads.iter().enumerate() {
            if let Some(ring) = self.ring_floats(layer) {
                w.section(&ring_section(layer), bytemuck::cast_slice(&ring))?;
                progress(layer + 1, self.heads.len());
                continue;
            }
            for (j, h) in row.iter().enumerate() {
                write_rows(w, &section("k", layer, j), &h.keys)?;
                write_rows(w, &section("v", layer, j), &h.values)?;
                state.clear();
                match h.selector.save_state(&mut state) {
                    Ok(()) => w.section(&section("sel", layer, j), &state)?,
                    Err(needle_core::Error::Unsupported { .. }) => {
                        if h.train_queries.is_empty() && self.config.train_positions > 0 {
                            tracing::warn!(
                                "layer {layer} head {j}: `{}` cannot save its state and no training queries were retained: it will be rebuilt from keys alone",
                                h.selector.describe()
                            );
                        }
                        w.section(&section("train", layer, j), bytemuck::cast_slice(&h.train_queries))?;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            // Writing read this layer's spilled pages through their maps: let them go.
            if let Some(tiers) = &self.tiers {
                tiers.spill.release();
            }
            progress(layer + 1, self.heads.len());
        }
        Ok(())
    }

    /// A built cache from the heads [`KvCache::save_heads`] wrote (`len` tokens, pages stored
    /// as `config.kv`, layers of the given `kinds`), with selectors from `factory` restored from
    /// their saved state, or rebuilt from saved training queries; sliding-window layers get
    /// their rings back. Heads load in parallel.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn load_heads(
        r: &ContextReader,
        kinds: &[LayerKind],
        gqa: GqaLayout,
        head_dim: usize,
        factory: &dyn SelectorFactory,
        config: SelectionConfig,
        len: usize,
        scale: f32,
    ) -> Result<Self>
    where
        M: Default,
    {
        let mut cache = Self::new(kinds.len(), gqa, head_dim, factory, config)?;
        cache.set_layer_kinds(kinds)?;
        for (layer, _) in kinds.iter().enumerate().filter(|(_, k)| matches!(k, LayerKind::Window(_))) {
            let name = ring_section(layer);
            let floats = read_f32s(r, &name, r.section(&name)?)?;
            cache.restore_ring(layer, floats, len).map_err(|e| corrupt(r, &name, e))?;
        }
        let per_head: Vec<BuildStats> = cache
            .heads
            .par_iter_mut()
            .enumerate()
            .filter(|(layer, _)| kinds[*layer] == LayerKind::Global)
            .flat_map(|(layer, row)| {
                row.par_iter_mut().enumerate().map(move |(j, h)| -> Result<BuildStats> {
                    read_rows(r, &section("k", layer, j), &mut h.keys, len)?;
                    read_rows(r, &section("v", layer, j), &mut h.values, len)?;
                    let sel = section("sel", layer, j);
                    if r.has(&sel) {
                        h.selector.load_state(r.section(&sel)?, &h.keys)?;
                        return Ok(BuildStats::default());
                    }
                    let train = r.section(&section("train", layer, j))?;
                    let floats = read_f32s(r, &section("train", layer, j), train)?;
                    let ctx = BuildContext {
                        head: HeadId { layer, kv_head: j },
                        keys: &h.keys,
                        train_queries: &floats,
                        scale,
                    };
                    Ok(h.selector.build(&ctx)?)
                })
            })
            .collect::<Result<_>>()?;
        for s in per_head {
            cache.stats.build += s;
        }
        cache.built = true;
        Ok(cache)
    }
}
