//! `needle eval`: selectors against full attention on the same model and prompts.
//!
//! - **fidelity**: one long prompt is prefilled once; full attention then decodes greedily and
//!   every selector decodes the same tokens (teacher forcing) from a fork of the same prefill.
//!   Per step: KL of the next-token distribution against full attention, agreement of the
//!   greedy token, and — on chosen layers, per query head — recall of the true top-k keys of
//!   the dynamic part, attention mass captured, relative error of the attention output.
//!   Cost: keys touched, bytes read, time split into selection, attention and the rest.
//! - **passkey** and **RULER-style** tasks (`needle-tasks`): each prompt is prefilled once and
//!   every selector answers from a fork; exact-match or recall-of-all scoring.
//!
//! Prefill is dense for every selector (sparse prefill is not implemented), so the selectors
//! differ only in decode attention.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use needle_core::attention::{Partial, dense, scores, top_k};
use needle_core::metrics::{attention_mass, kl_divergence, recall, relative_error};
use needle_core::{RowSource, attend_selected};
use needle_model::{Cpu, KvCache, Llama, argmax, selector_from_spec};
use needle_tasks::{Filler, GridPoint, TaskSpec};
use serde::Serialize;

use crate::common::{Loaded, ModelArgs, load, progress_bar, write_new};

/// One default spec per built-in selector (what `--selectors all` runs).
pub const ALL: &[&str] = &[
    "full",
    "streaming",
    "oracle",
    "retrieval:index=graph",
    "retrieval:index=hnsw",
    "retrieval:index=ivfpq",
    "retrieval:index=lsh",
    "quest",
    "block",
    "lsh-sample",
    "tokenselect",
];

/// Arguments of `needle eval`.
#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Selector specs separated by `;` (specs contain commas), or `all`.
    #[arg(long, default_value = "full;streaming;oracle;retrieval")]
    pub selectors: String,
    /// Run the fidelity comparison.
    #[arg(long)]
    pub fidelity: bool,
    /// Run passkey retrieval.
    #[arg(long)]
    pub passkey: bool,
    /// Run the RULER-style tasks.
    #[arg(long)]
    pub ruler: bool,
    /// Run the context-length sweep of decode attention time (no model needed).
    #[arg(long)]
    pub sweep: bool,
    /// Long text for the fidelity prompt.
    #[arg(long, default_value = "../shared/data/pride-and-prejudice.txt")]
    pub text: PathBuf,
    /// Fidelity prompt length in tokens.
    #[arg(long, default_value_t = 4096)]
    pub context_tokens: usize,
    /// Decode steps compared.
    #[arg(long, default_value_t = 64)]
    pub steps: usize,
    /// Layers whose attention is compared key by key (comma-separated; default every 4th).
    #[arg(long, value_delimiter = ',')]
    pub attn_layers: Vec<usize>,
    /// Passkey prompt lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "1024,2048,4096,8192")]
    pub lengths: Vec<usize>,
    /// Passkey depths (0 = start, 1 = end).
    #[arg(long, value_delimiter = ',', default_value = "0,0.25,0.5,0.75,1")]
    pub depths: Vec<f64>,
    /// Seeds per grid cell.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub seeds: Vec<u64>,
    /// RULER-style task specs separated by `;`.
    #[arg(
        long,
        default_value = "niah_multikey:keys=4;niah_multivalue:values=4;niah_multiquery:queries=4;variable_tracking"
    )]
    pub tasks: String,
    /// RULER-style prompt lengths.
    #[arg(long, value_delimiter = ',', default_value = "2048,4096")]
    pub ruler_lengths: Vec<usize>,
    /// RULER-style needle depths.
    #[arg(long, value_delimiter = ',', default_value = "0.25,0.75")]
    pub ruler_depths: Vec<f64>,
    /// Most tokens generated per task answer.
    #[arg(long, default_value_t = 16)]
    pub answer_tokens: usize,
    /// Prefill chunk size.
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Write all results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write plots (PNG) into this folder.
    #[arg(long)]
    pub plot_dir: Option<PathBuf>,
    /// Sweep: context lengths (`K` = 1024).
    #[arg(long, value_delimiter = ',', value_parser = crate::sweep::parse_tokens, default_value = "4K,8K,16K,32K,64K,128K")]
    pub sweep_contexts: Vec<usize>,
    /// Sweep: keys and queries of one layer from a `needle trace` file instead of synthetic data.
    #[arg(long)]
    pub sweep_trace: Option<PathBuf>,
    /// Sweep: decode steps timed per context and selector.
    #[arg(long, default_value_t = 32)]
    pub sweep_steps: usize,
}

/// Fidelity and cost of one selector against full attention.
#[derive(Debug, Clone, Serialize)]
pub struct FidelityRow {
    /// Selector spec.
    pub selector: String,
    /// Steps compared.
    pub steps: usize,
    /// Mean KL(full ‖ selector) of the next-token distribution.
    pub mean_kl: f64,
    /// Largest per-step KL.
    pub max_kl: f64,
    /// Share of steps whose greedy token equals full attention's.
    pub agreement: f64,
    /// Mean recall of the true top-k dynamic keys (None when there is no dynamic part).
    pub recall: Option<f64>,
    /// Mean share of attention mass on the attended keys.
    pub mass: f64,
    /// Mean relative L2 error of the attention output.
    pub output_error: f64,
    /// Share of context keys whose full vectors were read per step.
    pub keys_touched: f64,
    /// Bytes of keys, values and index data read per decode step (all layers).
    pub bytes_per_step: f64,
    /// Milliseconds per step choosing keys.
    pub select_ms: f64,
    /// Milliseconds per step in decode attention.
    pub attend_ms: f64,
    /// Milliseconds per step in the rest of the model.
    pub other_ms: f64,
    /// Seconds building the selectors after prefill.
    pub build_s: f64,
}

/// One task answer of one selector.
#[derive(Debug, Clone, Serialize)]
pub struct TaskRow {
    /// Selector spec.
    pub selector: String,
    /// Task spec.
    pub task: String,
    /// Prompt length in tokens.
    pub tokens: usize,
    /// Requested length.
    pub length: usize,
    /// Needle depth.
    pub depth: f64,
    /// Seed.
    pub seed: u64,
    /// Score in [0, 1].
    pub score: f64,
    /// What the model wrote.
    pub generated: String,
    /// The expected answer.
    pub answer: String,
}

#[derive(Serialize, Default)]
struct Report {
    selectors: Vec<String>,
    context_tokens: usize,
    fidelity: Vec<FidelityRow>,
    passkey: Vec<TaskRow>,
    ruler: Vec<TaskRow>,
    sweep: Option<crate::sweep::SweepReport>,
}

fn selector_list(s: &str) -> Result<Vec<String>> {
    let list: Vec<String> = if s.trim() == "all" {
        ALL.iter().map(|s| s.to_string()).collect()
    } else {
        s.split(';').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
    };
    if list.is_empty() {
        bail!("--selectors is empty: give specs separated by `;`, or `all`");
    }
    for spec in &list {
        selector_from_spec(spec).with_context(|| format!("--selectors: `{spec}`"))?;
    }
    Ok(list)
}

/// Runs `needle eval`.
pub fn run(a: EvalArgs) -> Result<()> {
    let selectors = selector_list(&a.selectors)?;
    let any = a.fidelity || a.passkey || a.ruler || a.sweep;
    let (fidelity, passkey) = if any { (a.fidelity, a.passkey) } else { (true, true) };
    let mut report = Report { selectors: selectors.clone(), context_tokens: a.context_tokens, ..Default::default() };
    if fidelity || passkey || a.ruler {
        let loaded = load(&a.model.model)?;
        if fidelity {
            report.fidelity = run_fidelity(&a, &loaded, &selectors)?;
            print_fidelity(&report.fidelity, a.context_tokens);
        }
        if passkey {
            let spec: TaskSpec = "passkey".parse()?;
            report.passkey = run_tasks(&a, &loaded, &selectors, &[spec], &a.lengths, &a.depths)?;
            print_tasks("passkey retrieval", &report.passkey, &selectors);
        }
        if a.ruler {
            let specs = a
                .tasks
                .split(';')
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().parse())
                .collect::<Result<Vec<TaskSpec>, _>>()?;
            report.ruler = run_tasks(&a, &loaded, &selectors, &specs, &a.ruler_lengths, &a.ruler_depths)?;
            print_tasks("RULER-style tasks", &report.ruler, &selectors);
        }
    }
    if a.sweep {
        let args = crate::sweep::SweepArgs {
            contexts: a.sweep_contexts.clone(),
            selectors: selectors.clone(),
            trace: a.sweep_trace.clone(),
            steps: a.sweep_steps,
            plot: a.plot_dir.as_ref().map(|d| d.join("sweep.png")),
            ..Default::default()
        };
        if let Some(dir) = &a.plot_dir {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let sweep = crate::sweep::run(&args)?;
        crate::sweep::finish(&args, &sweep)?;
        report.sweep = Some(sweep);
    }
    if let Some(dir) = &a.plot_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        if !report.passkey.is_empty() {
            plot_tasks(&report.passkey, &selectors, "passkey accuracy by context length", &dir.join("passkey.png"))?;
        }
        if !report.ruler.is_empty() {
            plot_tasks(&report.ruler, &selectors, "RULER-style score by context length", &dir.join("ruler.png"))?;
        }
    }
    if let Some(path) = &a.json {
        write_new(path, &serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

/// Prefills `tokens` densely once, keeping what forks need.
fn prefill_base(model: &Llama<Cpu>, tokens: &[u32], chunk: usize, label: &str) -> Result<(KvCache, Vec<f32>)> {
    let mut base = crate::common::new_cache(model, "full")?;
    base.retain_training_queries();
    let pb = progress_bar(tokens.len(), label);
    let logits = model.prefill(tokens, &mut base, chunk, &[tokens.len() - 1], &mut |d, _| pb.set_position(d as u64))?;
    pb.finish_and_clear();
    Ok((base, logits))
}

fn fork(model: &Llama<Cpu>, base: &KvCache, spec: &str) -> Result<KvCache> {
    let (factory, config) = selector_from_spec(spec)?;
    base.fork(factory.as_ref(), config, model.scale()).with_context(|| format!("building selector `{spec}`"))
}

fn text_tokens(loaded: &Loaded, path: &Path, n: usize) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading --text {}", path.display()))?;
    let start = text.find("Chapter 1").or_else(|| text.find("CHAPTER I")).unwrap_or(0);
    // Tokenize a prefix comfortably longer than needed (about 4 bytes per token in English).
    let end = text.len().min(start + n * 8);
    let end = (end..text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(text.len());
    let ids = loaded.tokenizer.encode(&text[start..end], false)?;
    if ids.len() < n {
        bail!("--text {} has only {} tokens after its start; --context-tokens is {n}", path.display(), ids.len());
    }
    Ok(ids[..n].to_vec())
}

/// What a run of decode steps produced.
struct Decoded {
    /// Tokens fed, one per step.
    tokens: Vec<u32>,
    /// Next-token logits after each step.
    logits: Vec<Vec<f32>>,
    /// Per step and compared query head: recall, mass, output error.
    metrics: Vec<[f64; 3]>,
    /// Wall time of the decode calls.
    wall: Duration,
}

/// Decodes `steps` tokens: the teacher's tokens when given (teacher forcing), else greedy.
/// Returns per-step logits and the per-step attention metrics on `layers`.
fn decode_steps(
    model: &Llama<Cpu>,
    cache: &mut KvCache,
    first_logits: &[f32],
    steps: usize,
    teacher: Option<&[u32]>,
    layers: &[usize],
) -> Result<Decoded> {
    cache.trace_queries(layers.to_vec())?;
    let (mut tokens, mut logits, mut metrics) = (Vec::new(), Vec::new(), Vec::new());
    let mut next = argmax(first_logits).context("empty logits")?;
    let mut wall = Duration::ZERO;
    for step in 0..steps {
        let feed = teacher.map_or(next, |t| t[step]);
        tokens.push(feed);
        let t = Instant::now();
        let l = model.decode(feed, cache)?;
        wall += t.elapsed();
        next = argmax(&l).context("empty logits")?;
        metrics.extend(attention_metrics(model, cache, step)?);
        logits.push(l);
    }
    Ok(Decoded { tokens, logits, metrics, wall })
}

/// Recall of the true top-k dynamic keys, attention mass captured and output error, per query
/// head of the traced layers at decode step `step` (NaN recall where there is no dynamic part).
fn attention_metrics(model: &Llama<Cpu>, cache: &KvCache, step: usize) -> Result<Vec<[f64; 3]>> {
    let Some(trace) = cache.query_trace() else { return Ok(Vec::new()) };
    let gqa = model.gqa();
    let d = model.config().head_dim;
    let scale = model.scale();
    let row = gqa.n_q_heads * d;
    let budget = cache.config().budget.max_ids();
    let mut out = Vec::new();
    for (slot, &layer) in trace.layers.iter().enumerate() {
        let q_all = &trace.decode[slot][step * row..(step + 1) * row];
        for j in 0..gqa.n_kv_heads {
            let (keys, values) = (cache.keys(layer, j), cache.values(layer, j));
            let sp = cache.static_part(layer, j);
            let sel = cache.last_selection(layer, j);
            let dynamic = sp.dynamic_range(keys.len());
            let mut attended: Vec<u32> = sp.static_ids(keys.len()).collect();
            attended.extend_from_slice(&sel.ids);
            for h in gqa.group(j) {
                let q = &q_all[h * d..(h + 1) * d];
                let s = scores(q, keys, scale)?;
                let rec = if dynamic.is_empty() {
                    f64::NAN
                } else {
                    let ds = &s[dynamic.start as usize..dynamic.end as usize];
                    let truth: Vec<u32> =
                        top_k(ds, budget.min(ds.len()))?.iter().map(|(i, _)| i + dynamic.start).collect();
                    recall(&sel.ids, &truth)
                };
                let mass = attention_mass(&s, &attended)?;
                let full: Partial<f64> = dense(q, keys, values, scale)?;
                let got: Partial<f64> = attend_selected(q, keys, values, sp, sel, scale)?;
                let a: Vec<f32> = got.out.iter().map(|&x| x as f32).collect();
                let e: Vec<f32> = full.out.iter().map(|&x| x as f32).collect();
                out.push([rec, mass, relative_error(&a, &e)?]);
            }
        }
    }
    Ok(out)
}

fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = xs.filter(|x| x.is_finite()).collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn run_fidelity(a: &EvalArgs, loaded: &Loaded, selectors: &[String]) -> Result<Vec<FidelityRow>> {
    let model = &loaded.model;
    let n_layers = model.config().num_hidden_layers;
    let layers: Vec<usize> =
        if a.attn_layers.is_empty() { (0..n_layers).step_by(4).collect() } else { a.attn_layers.clone() };
    let tokens = text_tokens(loaded, &a.text, a.context_tokens)?;
    let (base, first) = prefill_base(model, &tokens, a.chunk, "prefill")?;
    tracing::info!(
        "fidelity: {} prompt tokens, {} steps, attention compared on layers {layers:?}",
        tokens.len(),
        a.steps
    );
    // Full attention first: its greedy tokens drive every selector.
    let mut full = fork(model, &base, "full")?;
    let teacher = decode_steps(model, &mut full, &first, a.steps, None, &[])?;
    tracing::info!("full attention: {:.1} ms per step", teacher.wall.as_secs_f64() * 1e3 / a.steps.max(1) as f64);
    let d = model.config().head_dim as f64;
    let mut rows = Vec::new();
    let pb = progress_bar(selectors.len(), "selectors");
    for spec in selectors {
        let t = Instant::now();
        let mut c = fork(model, &base, spec)?;
        let build_s = t.elapsed().as_secs_f64();
        let Decoded { logits, metrics, wall, .. } =
            decode_steps(model, &mut c, &first, a.steps, Some(&teacher.tokens), &layers)?;
        let kls =
            logits.iter().zip(&teacher.logits).map(|(q, p)| kl_divergence(p, q)).collect::<Result<Vec<_>, _>>()?;
        let agree = logits.iter().zip(&teacher.logits).filter(|(q, p)| argmax(q) == argmax(p)).count();
        let s = &c.stats;
        let steps = s.steps.max(1) as f64;
        let ms = |x: Duration| x.as_secs_f64() * 1e3 / steps;
        let bytes = s.select.bytes_read as f64 + s.keys_attended as f64 * d * 4.0 * 2.0;
        let wall_ms = wall.as_secs_f64() * 1e3 / steps;
        rows.push(FidelityRow {
            selector: spec.clone(),
            steps: a.steps,
            mean_kl: mean(kls.iter().copied()).unwrap_or(0.0),
            max_kl: kls.iter().copied().fold(0.0, f64::max),
            agreement: agree as f64 / a.steps.max(1) as f64,
            recall: mean(metrics.iter().map(|m| m[0])),
            mass: mean(metrics.iter().map(|m| m[1])).unwrap_or(f64::NAN),
            output_error: mean(metrics.iter().map(|m| m[2])).unwrap_or(f64::NAN),
            keys_touched: s.share_touched(),
            bytes_per_step: bytes / steps,
            select_ms: ms(s.select_time),
            attend_ms: ms(s.attend_time),
            other_ms: wall_ms - ms(s.select_time) - ms(s.attend_time),
            build_s,
        });
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(rows)
}

fn print_fidelity(rows: &[FidelityRow], context: usize) {
    println!("\nFidelity against full attention ({context}-token prompt, teacher-forced greedy decode)");
    println!(
        "{:<34} {:>9} {:>9} {:>7} {:>7} {:>7} {:>8} {:>8} {:>9} {:>8} {:>8} {:>8} {:>7}",
        "selector",
        "mean KL",
        "max KL",
        "agree",
        "recall",
        "mass",
        "out err",
        "touched",
        "MB/step",
        "sel ms",
        "attn ms",
        "rest ms",
        "build s"
    );
    for r in rows {
        println!(
            "{:<34} {:>9.2e} {:>9.2e} {:>6.1}% {:>7} {:>6.1}% {:>8.2e} {:>7.2}% {:>9.1} {:>8.2} {:>8.2} {:>8.1} {:>7.2}",
            r.selector,
            r.mean_kl,
            r.max_kl,
            100.0 * r.agreement,
            r.recall.map_or("-".into(), |x| format!("{x:.3}")),
            100.0 * r.mass,
            r.output_error,
            100.0 * r.keys_touched,
            r.bytes_per_step / 1e6,
            r.select_ms,
            r.attend_ms,
            r.other_ms,
            r.build_s
        );
    }
}

fn run_tasks(
    a: &EvalArgs,
    loaded: &Loaded,
    selectors: &[String],
    specs: &[TaskSpec],
    lengths: &[usize],
    depths: &[f64],
) -> Result<Vec<TaskRow>> {
    let model = &loaded.model;
    let tok = &loaded.tokenizer;
    let count = |s: &str| tok.encode(s, false).map_or(0, |t| t.len());
    let points = needle_tasks::grid(lengths, depths, &a.seeds);
    let mut rows = Vec::new();
    for spec in specs {
        for &p in &points {
            let inst = spec.instance(GridPoint { ..p }, &Filler::Landmark, &count)?;
            let tokens = tok.encode(&inst.prompt, false)?;
            let (base, first) = prefill_base(model, &tokens, a.chunk, &format!("{} {}", spec, p.length))?;
            for sel in selectors {
                let mut c = fork(model, &base, sel)?;
                let generated = answer(model, tok, &mut c, &first, a.answer_tokens)?;
                let score = needle_tasks::score(spec, &generated, &inst);
                tracing::info!("{} {sel}: {:.2} ({:?} vs {})", inst.id, score, generated.trim(), inst.answer);
                rows.push(TaskRow {
                    selector: sel.clone(),
                    task: spec.to_string(),
                    tokens: tokens.len(),
                    length: p.length,
                    depth: p.depth,
                    seed: p.seed,
                    score,
                    generated,
                    answer: inst.answer.clone(),
                });
            }
        }
    }
    Ok(rows)
}

/// Greedy answer: up to `max` tokens, stopping at EOS or a newline after some text.
fn answer(
    model: &Llama<Cpu>,
    tok: &needle_loader::Tokenizer,
    cache: &mut KvCache,
    first: &[f32],
    max: usize,
) -> Result<String> {
    let mut ids = Vec::new();
    let mut next = argmax(first).context("empty logits")?;
    for _ in 0..max {
        if tok.eos_ids().contains(&next) {
            break;
        }
        ids.push(next);
        let text = tok.decode(&ids)?;
        if text.trim_start().contains('\n') {
            break;
        }
        next = argmax(&model.decode(next, cache)?).context("empty logits")?;
    }
    Ok(tok.decode(&ids)?)
}

fn print_tasks(title: &str, rows: &[TaskRow], selectors: &[String]) {
    let mut tasks: Vec<&str> = rows.iter().map(|r| r.task.as_str()).collect();
    tasks.dedup();
    let mut lengths: Vec<usize> = rows.iter().map(|r| r.length).collect();
    lengths.sort_unstable();
    lengths.dedup();
    println!("\n{title}: mean score per prompt length (all depths and seeds)");
    for task in tasks {
        print!("{:<34}", task);
        for l in &lengths {
            print!(" {:>8}", format!("{l}"));
        }
        println!(" {:>8}", "all");
        for sel in selectors {
            print!("  {:<32}", sel);
            for l in &lengths {
                let v = mean(
                    rows.iter().filter(|r| r.task == task && &r.selector == sel && r.length == *l).map(|r| r.score),
                );
                print!(" {:>8}", v.map_or("-".into(), |v| format!("{:.2}", v)));
            }
            let v = mean(rows.iter().filter(|r| r.task == task && &r.selector == sel).map(|r| r.score));
            println!(" {:>8}", v.map_or("-".into(), |v| format!("{:.2}", v)));
        }
    }
}

fn plot_tasks(rows: &[TaskRow], selectors: &[String], title: &str, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let mut lengths: Vec<usize> = rows.iter().map(|r| r.length).collect();
    lengths.sort_unstable();
    lengths.dedup();
    let (lo, hi) = (*lengths.first().unwrap_or(&1) as f64, *lengths.last().unwrap_or(&2) as f64);
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((lo * 0.9..hi * 1.1).log_scale(), -0.02f64..1.05)?;
    chart.configure_mesh().x_desc("prompt tokens").y_desc("mean score").draw()?;
    for (i, sel) in selectors.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = lengths
            .iter()
            .filter_map(|&l| {
                mean(rows.iter().filter(|r| &r.selector == sel && r.length == l).map(|r| r.score))
                    .map(|v| (l as f64, v))
            })
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(sel.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_lists_parse_and_reject_bad_specs() {
        assert_eq!(selector_list("full; retrieval:index=flat,k=10").unwrap().len(), 2);
        assert_eq!(selector_list("all").unwrap().len(), ALL.len());
        assert!(selector_list("full;nope").is_err());
        assert!(selector_list(" ; ").is_err());
    }

    #[test]
    fn results_are_never_overwritten() {
        use crate::common::write_new;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        write_new(&p, "a").unwrap();
        assert!(write_new(&p, "b").is_err());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "a");
    }
}
