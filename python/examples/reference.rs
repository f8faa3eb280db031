//! The Rust side of the Python package's reference tests: reads `keys`, `train_queries` and
//! `queries` (float32, 2-D) from a safetensors file, runs needle's index and selector on them
//! straight through the Rust API (no Python), and writes what they return to another file, for
//! pytest to compare with what the package returns on the same arrays.
//!
//! `reference IN OUT INDEX_SPEC K SELECTOR_SPEC`: `OUT` gets `index_ids` (i64, queries × K),
//! `index_scores` (f32) and `selector_ids` (i64, the selection of all `queries` as one group).
#![allow(clippy::print_stderr)]

use std::collections::HashMap;

use anyhow::{Context, Result, bail};
use needle_core::{BuildContext, HeadId, NO_LABEL, Rows, SearchParams, Selection};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

fn matrix(st: &SafeTensors<'_>, name: &str) -> Result<(Vec<f32>, usize)> {
    let t = st.tensor(name).with_context(|| format!("tensor {name}"))?;
    if t.dtype() != Dtype::F32 || t.shape().len() != 2 {
        bail!("{name}: expected a 2-D float32 tensor, got {:?} {:?}", t.dtype(), t.shape());
    }
    let data = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Ok((data, t.shape()[1]))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output, index_spec, k, selector_spec] = args.as_slice() else {
        bail!("usage: reference IN OUT INDEX_SPEC K SELECTOR_SPEC");
    };
    let k: usize = k.parse().context("K")?;
    let bytes = std::fs::read(input).with_context(|| format!("reading {input}"))?;
    let st = SafeTensors::deserialize(&bytes)?;
    let (keys, dim) = matrix(&st, "keys")?;
    let (train, _) = matrix(&st, "train_queries")?;
    let (queries, _) = matrix(&st, "queries")?;

    let mut index = needle_select::index_factory(dim, index_spec)?;
    index.build(&keys, Some(&train))?;
    let found = index.search(&queries, k, &SearchParams::default())?;
    let ids: Vec<i64> = found.labels.iter().map(|&l| if l == NO_LABEL { -1 } else { i64::from(l) }).collect();

    let spec = needle_select::parse(selector_spec)?;
    let head = HeadId { layer: 0, kv_head: 0 };
    let rows = Rows::new("keys", &keys, dim)?;
    let mut sel = spec.factory.create(head, dim)?;
    sel.build(&BuildContext { head, keys: &rows, train_queries: &train, scale: 1.0 / (dim as f32).sqrt() })?;
    let mut picked = Selection::default();
    sel.select(&queries, &rows, &spec.budget, &mut picked)?;
    let sel_ids: Vec<i64> = picked.ids.iter().map(|&i| i64::from(i)).collect();

    let n = queries.len() / dim;
    let le = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (ids_b, sel_b) = (le(&ids), le(&sel_ids));
    let scores_b: Vec<u8> = found.scores.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut out = HashMap::new();
    out.insert("index_ids".to_string(), TensorView::new(Dtype::I64, vec![n, k], &ids_b)?);
    out.insert("index_scores".to_string(), TensorView::new(Dtype::F32, vec![n, k], &scores_b)?);
    out.insert("selector_ids".to_string(), TensorView::new(Dtype::I64, vec![sel_ids.len()], &sel_b)?);
    safetensors::serialize_to_file(&out, None, std::path::Path::new(output))?;
    eprintln!(
        "reference: {} over {} keys, {n} queries; {} over them: {} ids",
        index.describe(),
        keys.len() / dim,
        sel.describe(),
        sel_ids.len()
    );
    Ok(())
}
