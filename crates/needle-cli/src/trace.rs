//! `needle trace`: record vectors of the real model for index benchmarks.
//!
//! The file is safetensors: per traced layer `L`, `layer.L.keys` `[n_kv_heads, n_tokens, head_dim]`
//! (post-RoPE, prompt and generated positions), `layer.L.prefill_queries`
//! `[n_prompt, n_q_heads, head_dim]` and `layer.L.decode_queries` `[n_generated, n_q_heads, head_dim]`,
//! all f32, plus a string metadata map (see [`Trace::metadata`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use needle_core::RowSource;
use needle_model::argmax;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::common::{Loaded, ModelArgs, PromptArgs, load, model_path, new_cache, progress_bar, prompt_tokens};

/// Arguments of `needle trace`.
#[derive(Args)]
pub struct TraceArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Greedy-decoded tokens after the prompt (their queries are the test queries).
    #[arg(long, default_value_t = 64)]
    pub generate: usize,
    /// Layers to record, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "5,15,25")]
    pub layers: Vec<usize>,
    /// Output safetensors file.
    #[arg(long)]
    pub out: PathBuf,
    /// Overwrite `--out` if it exists.
    #[arg(long)]
    pub force: bool,
    /// Prefill chunk size in tokens.
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
}

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
        self.layers.iter().find(|l| l.layer == layer).with_context(|| {
            let have: Vec<String> = self.layers.iter().map(|l| l.layer.to_string()).collect();
            format!("layer {layer} is not in the trace (traced layers: {})", have.join(","))
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
        let (d, g) = (self.head_dim, self.group());
        let stride = self.n_q_heads * d;
        let mut out = Vec::with_capacity(rows.len() / self.n_kv_heads.max(1));
        for pos in rows.chunks_exact(stride) {
            out.extend_from_slice(&pos[kv_head * g * d..(kv_head + 1) * g * d]);
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

    /// Checks that every tensor has the shape the header promises.
    fn check(&self) -> Result<()> {
        ensure!(self.head_dim > 0 && self.n_kv_heads > 0, "trace has head_dim or n_kv_heads of 0");
        ensure!(
            self.n_q_heads.is_multiple_of(self.n_kv_heads),
            "n_q_heads {} is not a multiple of n_kv_heads {}",
            self.n_q_heads,
            self.n_kv_heads
        );
        for l in &self.layers {
            let want = [
                ("keys", l.keys.len(), self.n_kv_heads * self.n_tokens() * self.head_dim),
                ("prefill_queries", l.prefill_queries.len(), self.n_prompt * self.n_q_heads * self.head_dim),
                ("decode_queries", l.decode_queries.len(), self.n_generated * self.n_q_heads * self.head_dim),
            ];
            for (what, got, expected) in want {
                ensure!(got == expected, "layer.{}.{what}: {got} floats, expected {expected}", l.layer);
            }
        }
        Ok(())
    }

    /// Writes the trace to `path`; refuses to replace an existing file unless `force`.
    /// Writes to a sibling `.partial` file first so that a failed write leaves no torn trace.
    pub fn write(&self, path: &Path, force: bool) -> Result<()> {
        if path.exists() && !force {
            bail!("{} exists; pass --force to overwrite it", path.display());
        }
        self.check()?;
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = self
            .layers
            .iter()
            .flat_map(|l| {
                let (kv, q, d) = (self.n_kv_heads, self.n_q_heads, self.head_dim);
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
            .map(|(name, b, shape)| Ok((name.as_str(), TensorView::new(Dtype::F32, shape.clone(), b)?)))
            .collect::<Result<Vec<_>>>()?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".partial");
        let tmp = PathBuf::from(tmp);
        safetensors::serialize_to_file(views, Some(self.metadata()), &tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(())
    }

    /// Reads a trace written by [`Trace::write`] (or any file with the same names and shapes).
    pub fn read(path: &Path) -> Result<Self> {
        let buf = std::fs::read(path).with_context(|| format!("reading trace {}", path.display()))?;
        let ctx = || format!("trace {}", path.display());
        let st =
            SafeTensors::deserialize(&buf).with_context(|| format!("{} is not a safetensors file", path.display()))?;
        let (_, header) = SafeTensors::read_metadata(&buf).with_context(ctx)?;
        let meta = header.metadata().clone().unwrap_or_default();
        let num = |k: &str| -> Result<usize> {
            let v = meta.get(k).with_context(|| format!("{}: metadata has no `{k}`", path.display()))?;
            v.parse().with_context(|| format!("{}: metadata `{k}` = {v:?} is not a number", path.display()))
        };
        let mut layer_ids: Vec<usize> = Vec::new();
        for name in st.names() {
            if let Some(rest) = name.strip_prefix("layer.")
                && let Some((l, _)) = rest.split_once('.')
            {
                let l: usize = l.parse().with_context(|| format!("{}: bad tensor name {name}", path.display()))?;
                layer_ids.push(l);
            }
        }
        layer_ids.sort_unstable();
        layer_ids.dedup();
        ensure!(!layer_ids.is_empty(), "{}: no `layer.L.*` tensors", path.display());
        let get = |name: String| -> Result<Vec<f32>> {
            let t = st.tensor(&name).with_context(|| format!("{}: missing tensor {name}", path.display()))?;
            ensure!(t.dtype() == Dtype::F32, "{}: {name} is {:?}, expected F32", path.display(), t.dtype());
            Ok(t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
        };
        let layers = layer_ids
            .into_iter()
            .map(|l| {
                Ok(TraceLayer {
                    layer: l,
                    keys: get(format!("layer.{l}.keys"))?,
                    prefill_queries: get(format!("layer.{l}.prefill_queries"))?,
                    decode_queries: get(format!("layer.{l}.decode_queries"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        const SHAPE_KEYS: [&str; 6] =
            ["layers", "n_q_heads", "n_kv_heads", "head_dim", "prompt_tokens", "generated_tokens"];
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
        t.check().with_context(ctx)?;
        Ok(t)
    }
}

fn le_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Runs `needle trace`.
pub fn run(a: TraceArgs) -> Result<()> {
    if a.out.exists() && !a.force {
        bail!("{} exists; pass --force to overwrite it", a.out.display());
    }
    ensure!(!a.layers.is_empty(), "--layers: give at least one layer");
    let Loaded { model, tokenizer } = load(&a.model.model)?;
    let prompt = prompt_tokens(&a.prompt, &tokenizer)?;
    let cfg = model.config().clone();
    let gqa = model.gqa();
    if prompt.len() > model.max_positions() {
        tracing::warn!(
            "prompt of {} tokens is past the model's trained length of {} (RoPE extrapolates)",
            prompt.len(),
            model.max_positions()
        );
    }
    let mut cache = new_cache(&model, "full")?;
    cache.trace_queries(a.layers.clone()).context("--layers")?;

    let pb = progress_bar(prompt.len(), "prefill");
    let t = Instant::now();
    let logits = model
        .prefill(&prompt, &mut cache, a.chunk, &[prompt.len() - 1], &mut |done, _| pb.set_position(done as u64))?;
    pb.finish_and_clear();
    let prefill_secs = t.elapsed().as_secs_f64();
    tracing::info!(
        "prefilled {} tokens in {prefill_secs:.1}s ({:.0} tok/s)",
        prompt.len(),
        prompt.len() as f64 / prefill_secs
    );

    // Greedy decoding: each fed token adds one key and one decode query per traced layer.
    let pb = progress_bar(a.generate, "decode");
    let t = Instant::now();
    let mut next = argmax(&logits).context("empty logits after prefill")?;
    let mut generated = Vec::with_capacity(a.generate);
    for _ in 0..a.generate {
        generated.push(next);
        let l = model.decode(next, &mut cache)?;
        next = argmax(&l).context("empty logits in decode")?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    let decode_secs = t.elapsed().as_secs_f64();

    let qt = cache.query_trace().context("the cache lost its query trace")?;
    let (d, n_tokens) = (cfg.head_dim, cache.len());
    let mut layers = Vec::with_capacity(qt.layers.len());
    for (i, &layer) in qt.layers.iter().enumerate() {
        let mut keys = Vec::with_capacity(gqa.n_kv_heads * n_tokens * d);
        for h in 0..gqa.n_kv_heads {
            let rows = cache.keys(layer, h);
            for r in 0..rows.len() {
                keys.extend_from_slice(rows.row(r));
            }
        }
        layers.push(TraceLayer {
            layer,
            keys,
            prefill_queries: qt.prefill[i].clone(),
            decode_queries: qt.decode[i].clone(),
        });
    }
    let mut info = BTreeMap::new();
    info.insert("model".into(), model_path(&a.model.model)?.display().to_string());
    info.insert("model_spec".into(), a.model.model.clone());
    let source = a.prompt.prompt_file.as_ref().map_or_else(|| "--prompt".into(), |p| p.display().to_string());
    info.insert("source".into(), source);
    info.insert("context_tokens".into(), a.prompt.context_tokens.map_or("all".into(), |n| n.to_string()));
    info.insert("prefill_seconds".into(), format!("{prefill_secs:.3}"));
    info.insert("decode_seconds".into(), format!("{decode_secs:.3}"));
    info.insert("prefill_chunk".into(), a.chunk.to_string());
    info.insert("generated_text".into(), tokenizer.decode(&generated).unwrap_or_default());
    info.insert("needle_version".into(), env!("CARGO_PKG_VERSION").into());
    let trace = Trace {
        n_q_heads: gqa.n_q_heads,
        n_kv_heads: gqa.n_kv_heads,
        head_dim: d,
        n_prompt: prompt.len(),
        n_generated: generated.len(),
        layers,
        info,
    };
    trace.write(&a.out, a.force)?;
    tracing::info!(
        "wrote {} ({} prompt + {} generated tokens, layers {:?}, prefill {prefill_secs:.1}s, decode {decode_secs:.1}s)",
        a.out.display(),
        trace.n_prompt,
        trace.n_generated,
        qt.layers
    );
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tiny trace with distinct values everywhere, so a misplaced float shows.
    pub(crate) fn synthetic(layers: &[usize], n_prompt: usize, n_generated: usize) -> Trace {
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

    #[test]
    fn write_read_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let t = synthetic(&[3, 1], 5, 2);
        t.write(&p, false).unwrap();
        let back = Trace::read(&p).unwrap();
        let mut sorted = t.clone();
        sorted.layers.sort_by_key(|l| l.layer);
        assert_eq!(back, sorted);
        assert_eq!(back.metadata()["layers"], "1,3");
        assert!(!dir.path().join("t.safetensors.partial").exists());
    }

    #[test]
    fn refuses_to_overwrite_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        std::fs::write(&p, b"precious").unwrap();
        let t = synthetic(&[0], 3, 1);
        let e = t.write(&p, false).unwrap_err().to_string();
        assert!(e.contains("--force") && e.contains("t.safetensors"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"precious");
        t.write(&p, true).unwrap();
        assert_eq!(Trace::read(&p).unwrap(), t);
    }

    #[test]
    fn group_queries_pick_the_gqa_group() {
        let t = synthetic(&[0], 2, 1);
        let l = &t.layers[0];
        let g = t.group_queries(&l.prefill_queries, 1);
        // Position 0, query heads 3..6, then position 1, query heads 3..6.
        let d = t.head_dim;
        let row = t.n_q_heads * d;
        assert_eq!(g.len(), 2 * 3 * d);
        assert_eq!(&g[..3 * d], &l.prefill_queries[3 * d..6 * d]);
        assert_eq!(&g[3 * d..], &l.prefill_queries[row + 3 * d..row + 6 * d]);
        assert_eq!(t.keys(l, 1), &l.keys[(t.n_tokens() * d)..]);
    }

    #[test]
    fn bad_files_give_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.safetensors");
        let e = format!("{:#}", Trace::read(&missing).unwrap_err());
        assert!(e.contains("nope.safetensors"), "{e}");
        let junk = dir.path().join("junk.safetensors");
        std::fs::write(&junk, b"not a trace").unwrap();
        let e = format!("{:#}", Trace::read(&junk).unwrap_err());
        assert!(e.contains("junk.safetensors"), "{e}");
        let t = synthetic(&[5, 15], 2, 1);
        let e = t.layer(25).unwrap_err().to_string();
        assert!(e.contains("25") && e.contains("5,15"), "{e}");
    }
}
