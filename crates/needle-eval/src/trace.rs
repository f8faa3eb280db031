//! The `needle trace` file: post-RoPE keys and prefill/decode queries of chosen layers of a real
//! model, for index benchmarks and the sweep. One reader and one writer for every consumer.
//!
//! The file is safetensors: per traced layer `L`, `layer.L.keys` `[n_kv_heads, n_tokens, head_dim]`
//! (post-RoPE, prompt and generated positions), `layer.L.prefill_queries`
//! `[n_prompt, n_q_heads, head_dim]` and `layer.L.decode_queries` `[n_generated, n_q_heads, head_dim]`,
//! all f32, plus a string metadata map (see [`Trace::metadata`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use needle_core::RowSource;
use needle_model::{KvCache, Llama, NeedleBackend, argmax, compose};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::error::{Context, Error, Result};

/// Vectors of one traced layer, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceLayer {
    /// Layer index in the model.
    pub layer: usize,
    /// `n_kv_heads × n_tokens × head_dim`.
    pub keys: Vec<f32>,
    /// `n_prompt × n_q_heads × head_dim`.
    pub prefill_queries: Vec<f32>,
    /// `n_generated × n_q_heads × head_dim`.
    pub decode_queries: Vec<f32>,
}

/// A recorded trace: shapes, layers, and free-form provenance.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    /// Query heads.
    pub n_q_heads: usize,
    /// KV heads (divides `n_q_heads`).
    pub n_kv_heads: usize,
    /// Floats per vector.
    pub head_dim: usize,
    /// Prompt tokens (prefill queries per head).
    pub n_prompt: usize,
    /// Generated tokens (decode queries per head).
    pub n_generated: usize,
    /// Traced layers, ascending.
    pub layers: Vec<TraceLayer>,
    /// Provenance (model path, source file, version, ...), written as metadata.
    pub info: BTreeMap<String, String>,
}

const SHAPE_KEYS: [&str; 6] = ["layers", "n_q_heads", "n_kv_heads", "head_dim", "prompt_tokens", "generated_tokens"];

impl Trace {
    /// Keys held per head: prompt plus generated tokens.
    pub fn n_tokens(&self) -> usize {
        self.n_prompt + self.n_generated
    }

    /// Query heads sharing one KV head.
    pub fn group(&self) -> usize {
        self.n_q_heads / self.n_kv_heads.max(1)
    }

    /// The traced layer `layer`, or an error naming the file's layers.
    pub fn layer(&self, layer: usize) -> Result<&TraceLayer> {
        self.layers.iter().find(|l| l.layer == layer).ok_or_else(|| {
            let have: Vec<String> = self.layers.iter().map(|l| l.layer.to_string()).collect();
            Error::invalid("layers", format!("layer {layer} is not in the trace (traced layers: {})", have.join(",")))
        })
    }

    /// Keys of one KV head, `n_tokens × head_dim`.
    pub fn keys<'a>(&self, l: &'a TraceLayer, kv_head: usize) -> &'a [f32] {
        let n = self.n_tokens() * self.head_dim;
        &l.keys[kv_head * n..(kv_head + 1) * n]
    }

    /// Queries of KV head `kv_head`'s GQA group (query heads `g·j .. g·(j+1)`) taken from
    /// `rows` (`positions × n_q_heads × head_dim`), gathered as `(positions·g) × head_dim`.
    pub fn group_queries(&self, rows: &[f32], kv_head: usize) -> Vec<f32> {
        self.group_rows(rows, kv_head, 0..rows.len() / (self.n_q_heads * self.head_dim).max(1))
    }

    /// Like [`Trace::group_queries`], for the positions `positions` of `rows` only.
    pub fn group_rows(&self, rows: &[f32], kv_head: usize, positions: impl Iterator<Item = usize>) -> Vec<f32> {
        let (d, g) = (self.head_dim, self.group());
        let stride = self.n_q_heads * d;
        let mut out = Vec::new();
        for p in positions {
            out.extend_from_slice(&rows[p * stride + kv_head * g * d..p * stride + (kv_head + 1) * g * d]);
        }
        out
    }

    /// The metadata map written to the file: shapes, layers and provenance.
    pub fn metadata(&self) -> HashMap<String, String> {
        let mut m: HashMap<String, String> = self.info.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let layers: Vec<String> = self.layers.iter().map(|l| l.layer.to_string()).collect();
        m.insert("layers".into(), layers.join(","));
        m.insert("n_q_heads".into(), self.n_q_heads.to_string());
        m.insert("n_kv_heads".into(), self.n_kv_heads.to_string());
        m.insert("head_dim".into(), self.head_dim.to_string());
        m.insert("prompt_tokens".into(), self.n_prompt.to_string());
        m.insert("generated_tokens".into(), self.n_generated.to_string());
        m.entry("needle_version".into()).or_insert_with(|| env!("CARGO_PKG_VERSION").into());
        m
    }

    /// Checks that every tensor has the shape the header promises and holds finite numbers.
    pub fn check(&self) -> Result<()> {
        let bad = |reason: String| Error::trace("", reason);
        if self.head_dim == 0 || self.n_kv_heads == 0 {
            return Err(bad("head_dim or n_kv_heads is 0".into()));
        }
        if !self.n_q_heads.is_multiple_of(self.n_kv_heads) {
            return Err(bad(format!(
                "n_q_heads {} is not a multiple of n_kv_heads {}",
                self.n_q_heads, self.n_kv_heads
            )));
        }
        for l in &self.layers {
            let want = [
                ("keys", &l.keys, self.n_kv_heads * self.n_tokens() * self.head_dim),
                ("prefill_queries", &l.prefill_queries, self.n_prompt * self.n_q_heads * self.head_dim),
                ("decode_queries", &l.decode_queries, self.n_generated * self.n_q_heads * self.head_dim),
            ];
            for (what, xs, expected) in want {
                if xs.len() != expected {
                    return Err(bad(format!("layer.{}.{what}: {} floats, expected {expected}", l.layer, xs.len())));
                }
                if let Some(i) = xs.iter().position(|x| !x.is_finite()) {
                    return Err(bad(format!("layer.{}.{what}: non-finite value at index {i}", l.layer)));
                }
            }
        }
        Ok(())
    }

    /// Writes the trace to `path`; refuses to replace an existing file unless `force`.
    /// Writes to a sibling `.partial` file first so that a failed write leaves no torn trace.
    pub fn write(&self, path: &Path, force: bool) -> Result<()> {
        if path.exists() && !force {
            return Err(Error::trace(path, "exists; refusing to overwrite it without force (--force)"));
        }
        self.check().map_err(|e| Error::trace(path, e.to_string()))?;
        let (kv, q, d) = (self.n_kv_heads, self.n_q_heads, self.head_dim);
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = self
            .layers
            .iter()
            .flat_map(|l| {
                [
                    (format!("layer.{}.keys", l.layer), le_bytes(&l.keys), vec![kv, self.n_tokens(), d]),
                    (
                        format!("layer.{}.prefill_queries", l.layer),
                        le_bytes(&l.prefill_queries),
                        vec![self.n_prompt, q, d],
                    ),
                    (
                        format!("layer.{}.decode_queries", l.layer),
                        le_bytes(&l.decode_queries),
                        vec![self.n_generated, q, d],
                    ),
                ]
            })
            .collect();
        let views = bytes
            .iter()
            .map(|(name, b, shape)| {
                TensorView::new(Dtype::F32, shape.clone(), b)
                    .map(|v| (name.as_str(), v))
                    .map_err(|e| Error::trace(path, format!("{name}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".partial");
        let tmp = PathBuf::from(tmp);
        safetensors::serialize_to_file(views, Some(self.metadata()), &tmp)
            .map_err(|e| Error::trace(&tmp, format!("writing: {e}")))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        Ok(())
    }

    /// Reads a trace written by [`Trace::write`] (or any file with the same names and shapes).
    pub fn read(path: &Path) -> Result<Self> {
        Self::read_layers(path, None)
    }

    /// Reads only the layers `only` (all when `None`); a layer the file lacks is an error
    /// naming the traced layers.
    pub fn read_layers(path: &Path, only: Option<&[usize]>) -> Result<Self> {
        let buf = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |reason: String| Error::trace(path, reason);
        let st = SafeTensors::deserialize(&buf).map_err(|e| bad(format!("not a safetensors file ({e})")))?;
        let (_, header) = SafeTensors::read_metadata(&buf).map_err(|e| bad(e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let num = |k: &str| -> Result<usize> {
            let v = meta.get(k).ok_or_else(|| bad(format!("metadata has no `{k}`")))?;
            v.parse().map_err(|_| bad(format!("metadata `{k}` = {v:?} is not a number")))
        };
        let mut layer_ids: Vec<usize> = Vec::new();
        for name in st.names() {
            if let Some(rest) = name.strip_prefix("layer.")
                && let Some((l, _)) = rest.split_once('.')
            {
                layer_ids.push(l.parse().map_err(|_| bad(format!("bad tensor name {name}")))?);
            }
        }
        layer_ids.sort_unstable();
        layer_ids.dedup();
        if layer_ids.is_empty() {
            return Err(bad("no `layer.L.*` tensors".into()));
        }
        if let Some(only) = only
            && let Some(missing) = only.iter().find(|l| !layer_ids.contains(l))
        {
            let have: Vec<String> = layer_ids.iter().map(ToString::to_string).collect();
            return Err(bad(format!("layer {missing} is not in the trace (traced layers: {})", have.join(","))));
        }
        let get = |name: String| -> Result<Vec<f32>> {
            let t = st.tensor(&name).map_err(|_| bad(format!("missing tensor {name}")))?;
            if t.dtype() != Dtype::F32 {
                return Err(bad(format!("{name} is {:?}, expected F32", t.dtype())));
            }
            Ok(t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
        };
        let layers = layer_ids
            .into_iter()
            .filter(|l| only.is_none_or(|o| o.contains(l)))
            .map(|l| {
                Ok(TraceLayer {
                    layer: l,
                    keys: get(format!("layer.{l}.keys"))?,
                    prefill_queries: get(format!("layer.{l}.prefill_queries"))?,
                    decode_queries: get(format!("layer.{l}.decode_queries"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let info = meta.iter().filter(|(k, _)| !SHAPE_KEYS.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone()));
        let t = Trace {
            n_q_heads: num("n_q_heads")?,
            n_kv_heads: num("n_kv_heads")?,
            head_dim: num("head_dim")?,
            n_prompt: num("prompt_tokens")?,
            n_generated: num("generated_tokens")?,
            layers,
            info: info.collect(),
        };
        t.check().map_err(|e| match e {
            Error::Trace { reason, .. } => bad(reason),
            e => e,
        })?;
        Ok(t)
    }

    /// A tiny trace with distinct values everywhere (6 query heads, 2 KV heads, dim 4), so a
    /// misplaced float shows: for tests of trace consumers.
    pub fn synthetic(layers: &[usize], n_prompt: usize, n_generated: usize) -> Trace {
        let (q, kv, d) = (6, 2, 4);
        let mut x = 0.0f32;
        let mut next = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    x += 1.0;
                    (x * 0.37).sin()
                })
                .collect()
        };
        let layers = layers
            .iter()
            .map(|&layer| TraceLayer {
                layer,
                keys: next(kv * (n_prompt + n_generated) * d),
                prefill_queries: next(n_prompt * q * d),
                decode_queries: next(n_generated * q * d),
            })
            .collect();
        let mut info = BTreeMap::new();
        info.insert("source".into(), "synthetic".into());
        info.insert("needle_version".into(), env!("CARGO_PKG_VERSION").into());
        Trace { n_q_heads: q, n_kv_heads: kv, head_dim: d, n_prompt, n_generated, layers, info }
    }
}

fn le_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// What [`record`] measured besides the trace.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// The trace (provenance holds timings and the generated text's ids are in `generated`).
    pub trace: Trace,
    /// Greedy tokens generated after the prompt.
    pub generated: Vec<u32>,
    /// Prefill wall time in seconds.
    pub prefill_secs: f64,
    /// Decode wall time in seconds.
    pub decode_secs: f64,
}

/// Prefills `prompt` densely (chunks of `chunk`), decodes `generate` greedy tokens and records
/// the keys and queries of `layers`. `prefill(done, total)` reports prefill tokens, `decode(done,
/// total)` decode steps.
pub fn record<B: NeedleBackend>(
    model: &Llama<B>,
    prompt: &[u32],
    layers: &[usize],
    generate: usize,
    chunk: usize,
    prefill: &mut dyn FnMut(usize, usize),
    decode: &mut dyn FnMut(usize, usize),
) -> Result<Recorded> {
    if layers.is_empty() {
        return Err(Error::invalid("layers", "give at least one layer"));
    }
    let (factory, sel) = compose(needle_select::parse("full").during(|| "selector `full`".into())?);
    let (cfg, gqa) = (model.config().clone(), model.gqa());
    let mut cache = KvCache::new(cfg.num_hidden_layers, gqa, cfg.head_dim, factory.as_ref(), sel)?;
    cache.trace_queries(layers.to_vec()).during(|| "layers".into())?;
    let t = std::time::Instant::now();
    let logits = model.prefill(prompt, &mut cache, chunk, &[prompt.len().saturating_sub(1)], prefill)?;
    let prefill_secs = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let empty = || Error::invalid("model", "returned empty logits");
    let mut next = argmax(&logits).ok_or_else(empty)?;
    let mut generated = Vec::with_capacity(generate);
    for i in 0..generate {
        generated.push(next);
        next = argmax(&model.decode(next, &mut cache)?).ok_or_else(empty)?;
        decode(i + 1, generate);
    }
    let decode_secs = t.elapsed().as_secs_f64();
    if let Some(&l) = layers.iter().find(|&&l| cache.layer_kind(l) != needle_model::LayerKind::Global) {
        return Err(Error::invalid(
            "layers",
            format!("layer {l} is a sliding-window layer: it keeps only its window, no keys to trace"),
        ));
    }
    let qt = cache.query_trace().ok_or_else(|| Error::invalid("cache", "lost its query trace"))?;
    let (d, n_tokens) = (cfg.head_dim, cache.len());
    let mut out = Vec::with_capacity(qt.layers.len());
    for (i, &layer) in qt.layers.iter().enumerate() {
        let mut keys = Vec::with_capacity(gqa.n_kv_heads * n_tokens * d);
        for h in 0..gqa.n_kv_heads {
            let rows = cache.keys(layer, h);
            for r in 0..rows.len() {
                rows.row(r).extend_into(&mut keys);
            }
        }
        out.push(TraceLayer {
            layer,
            keys,
            prefill_queries: qt.prefill[i].clone(),
            decode_queries: qt.decode[i].clone(),
        });
    }
    let mut info = BTreeMap::new();
    info.insert("prefill_seconds".into(), format!("{prefill_secs:.3}"));
    info.insert("decode_seconds".into(), format!("{decode_secs:.3}"));
    info.insert("prefill_chunk".into(), chunk.to_string());
    info.insert("needle_version".into(), env!("CARGO_PKG_VERSION").into());
    let trace = Trace {
        n_q_heads: gqa.n_q_heads,
        n_kv_heads: gqa.n_kv_heads,
        head_dim: d,
        n_prompt: prompt.len(),
        n_generated: generated.len(),
        layers: out,
        info,
    };
    Ok(Recorded { trace, generated, prefill_secs, decode_secs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let t = Trace::synthetic(&[3, 1], 5, 2);
        t.write(&p, false).unwrap();
        let back = Trace::read(&p).unwrap();
        let mut sorted = t.clone();
        sorted.layers.sort_by_key(|l| l.layer);
        assert_eq!(back, sorted);
        assert_eq!(back.metadata()["layers"], "1,3");
        assert!(!dir.path().join("t.safetensors.partial").exists());
        let one = Trace::read_layers(&p, Some(&[3])).unwrap();
        assert_eq!(one.layers, vec![t.layers[0].clone()]);
        let e = Trace::read_layers(&p, Some(&[9])).unwrap_err().to_string();
        assert!(e.contains("layer 9") && e.contains("traced layers: 1,3") && e.contains("t.safetensors"), "{e}");
    }

    #[test]
    fn refuses_to_overwrite_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        std::fs::write(&p, b"precious").unwrap();
        let t = Trace::synthetic(&[0], 3, 1);
        let e = t.write(&p, false).unwrap_err().to_string();
        assert!(e.contains("force") && e.contains("t.safetensors"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"precious");
        t.write(&p, true).unwrap();
        assert_eq!(Trace::read(&p).unwrap(), t);
    }

    #[test]
    fn group_queries_pick_the_gqa_group() {
        let t = Trace::synthetic(&[0], 2, 1);
        let l = &t.layers[0];
        let g = t.group_queries(&l.prefill_queries, 1);
        // Position 0, query heads 3..6, then position 1, query heads 3..6.
        let d = t.head_dim;
        let row = t.n_q_heads * d;
        assert_eq!(g.len(), 2 * 3 * d);
        assert_eq!(&g[..3 * d], &l.prefill_queries[3 * d..6 * d]);
        assert_eq!(&g[3 * d..], &l.prefill_queries[row + 3 * d..row + 6 * d]);
        assert_eq!(t.group_rows(&l.prefill_queries, 1, [1].into_iter()), &g[3 * d..]);
        assert_eq!(t.keys(l, 1), &l.keys[(t.n_tokens() * d)..]);
    }

    #[test]
    fn bad_files_give_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.safetensors");
        let e = Trace::read(&missing).unwrap_err().to_string();
        assert!(e.contains("nope.safetensors"), "{e}");
        let junk = dir.path().join("junk.safetensors");
        std::fs::write(&junk, b"not a trace").unwrap();
        let e = Trace::read(&junk).unwrap_err().to_string();
        assert!(e.contains("junk.safetensors"), "{e}");
        let t = Trace::synthetic(&[5, 15], 2, 1);
        let e = t.layer(25).unwrap_err().to_string();
        assert!(e.contains("25") && e.contains("5,15"), "{e}");
        let mut nan = t.clone();
        nan.layers[0].keys[3] = f32::NAN;
        let e = nan.write(&dir.path().join("nan.safetensors"), false).unwrap_err().to_string();
        assert!(e.contains("layer.5.keys") && e.contains("non-finite"), "{e}");
    }
}
