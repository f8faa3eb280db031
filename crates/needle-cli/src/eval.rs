//! `needle eval`: selectors against full attention (fidelity, passkey, RULER-style tasks) and
//! the context-length sweep; with `--prefill PATTERNS`, sparse prefill patterns against dense
//! prefill instead (fidelity, tasks, `--prefill-times`). The work is in `needle_eval`, this
//! module parses and prints.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use needle_eval::eval::{FidelityConfig, FidelityRow, TaskConfig, TaskRow, mean_score, parse_selectors};
use needle_eval::prefill::{PrefillRow, PrefillTime, parse_patterns};
use needle_eval::sweep::{SweepConfig, SweepReport, parse_tokens};
use needle_tasks::TaskSpec;
use serde::Serialize;

use crate::common::{Loaded, ModelArgs, context_question, load, model_digest, progress_bar, write_new};

/// Arguments of `needle eval`.
#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Selector specs separated by `;` (specs contain commas), or `all` [default:
    /// full;streaming;oracle;retrieval; with `--context`, none besides the context's own].
    #[arg(long)]
    pub selectors: Option<String>,
    /// A context saved by `needle prefill --save`: `--fidelity` compares its selector as saved
    /// (its index not rebuilt) and any `--selectors` against full attention over its pages,
    /// without prefilling again.
    #[arg(long, conflicts_with_all = ["text", "passkey", "ruler", "sweep", "prefill_times"])]
    pub context: Option<PathBuf>,
    /// With `--context`: a question asked of the context before the compared steps.
    #[arg(long, requires = "context")]
    pub question: Option<String>,
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
    /// Long text for the fidelity prompt (default: needle's default document, the King James
    /// Bible, fetched into the cache if absent).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Fidelity prompt length in tokens.
    #[arg(long, default_value_t = 4096)]
    pub context_tokens: usize,
    /// Decode steps compared.
    #[arg(long, default_value_t = 64)]
    pub steps: usize,
    /// Layers whose attention is compared key by key (comma-separated; default every 4th, or
    /// every global layer of a model with sliding-window layers).
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
    #[arg(long, value_delimiter = ',', value_parser = parse_tokens, default_value = "4K,8K,16K,32K,64K,128K")]
    pub sweep_contexts: Vec<usize>,
    /// Sweep: keys and queries of one layer from a `needle trace` file instead of synthetic data.
    #[arg(long)]
    pub sweep_trace: Option<PathBuf>,
    /// Sweep: the trace's layer (also the layer id the selectors are built for).
    #[arg(long, default_value_t = 15)]
    pub sweep_layer: usize,
    /// Sweep: decode steps timed per context and selector.
    #[arg(long, default_value_t = 32)]
    pub sweep_steps: usize,
    /// Sweep: MiB read between timed steps for cold caches (0 = warm).
    #[arg(long, default_value_t = 64)]
    pub sweep_flush_mb: usize,
    /// Sweep: seed of synthetic data, resampling and values.
    #[arg(long, default_value_t = 0)]
    pub sweep_seed: u64,
    /// Sweep: check every decode output against the exact f64 reference (slow).
    #[arg(long)]
    pub sweep_verify: bool,
    /// With `--prefill`: prefill wall time of each pattern and of dense prefill (alternating) at
    /// these prompt lengths of the text (`K` = 1024).
    #[arg(long, value_delimiter = ',', value_parser = parse_tokens)]
    pub prefill_times: Vec<usize>,
}

#[derive(Serialize, Default)]
struct Report {
    selectors: Vec<String>,
    context_tokens: usize,
    fidelity: Vec<FidelityRow>,
    passkey: Vec<TaskRow>,
    ruler: Vec<TaskRow>,
    sweep: Option<SweepReport>,
    prefill: Vec<PrefillRow>,
    prefill_times: Vec<PrefillTime>,
}

/// Runs `needle eval`.
pub fn run(a: EvalArgs) -> Result<()> {
    if let Some(path) = a.context.clone() {
        return run_context(a, &path);
    }
    if a.model.prefill.trim() != "dense" || !a.prefill_times.is_empty() {
        return run_prefill(a);
    }
    let selectors = parse_selectors(a.selectors.as_deref().unwrap_or(DEFAULT_SELECTORS)).context("--selectors")?;
    let any = a.fidelity || a.passkey || a.ruler || a.sweep;
    let (fidelity, passkey) = if any { (a.fidelity, a.passkey) } else { (true, true) };
    let mut report = Report { selectors: selectors.clone(), context_tokens: a.context_tokens, ..Default::default() };
    if let Some(dir) = &a.plot_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if fidelity || passkey || a.ruler {
        let Loaded { model, tokenizer } = load(&a.model)?;
        if fidelity {
            let text = match &a.text {
                Some(p) => std::fs::read_to_string(p).with_context(|| format!("--text {}", p.display()))?,
                None => crate::common::read_document("default")?,
            };
            let tokens = needle_eval::eval::text_tokens(&tokenizer, &text, a.context_tokens)
                .context("--text / --context-tokens")?;
            let (steps, chunk, kv) = (a.steps, a.chunk, a.model.kv_dtype());
            let cfg = FidelityConfig { steps, attn_layers: a.attn_layers.clone(), chunk, kv };
            let (pp, ps) = (progress_bar(tokens.len(), "prefill"), progress_bar(selectors.len(), "selectors"));
            report.fidelity = needle_eval::eval::fidelity(
                &model,
                &tokens,
                &selectors,
                &cfg,
                &mut |d, _| pp.set_position(d as u64),
                &mut |d, _| ps.set_position(d as u64),
            )?;
            pp.finish_and_clear();
            ps.finish_and_clear();
            print_fidelity(&report.fidelity, a.context_tokens);
        }
        let tasks = |specs: &[TaskSpec], lengths: &[usize], depths: &[f64]| -> Result<Vec<TaskRow>> {
            let cfg = task_config(&a, lengths, depths);
            let pb = progress_bar(0, "prompts");
            let rows = needle_eval::eval::run_tasks(&model, &tokenizer, &selectors, specs, &cfg, &mut |d, t| {
                pb.set_length(t as u64);
                pb.set_position(d as u64);
            })?;
            pb.finish_and_clear();
            Ok(rows)
        };
        if passkey {
            report.passkey = tasks(&["passkey".parse()?], &a.lengths, &a.depths)?;
            print_tasks("passkey retrieval", &report.passkey, &selectors);
        }
        if a.ruler {
            let specs = ruler_tasks(&a)?;
            report.ruler = tasks(&specs, &a.ruler_lengths, &a.ruler_depths)?;
            print_tasks("RULER-style tasks", &report.ruler, &selectors);
        }
    }
    if a.sweep {
        let cfg = SweepConfig {
            contexts: a.sweep_contexts.clone(),
            selectors: selectors.clone(),
            trace: a.sweep_trace.clone(),
            layer: a.sweep_layer,
            steps: a.sweep_steps,
            flush_mb: a.sweep_flush_mb,
            seed: a.sweep_seed,
            verify: a.sweep_verify,
            ..Default::default()
        };
        let pb = progress_bar(0, "sweep");
        let sweep = needle_eval::sweep::run(&cfg, &mut |d, t| {
            pb.set_length(t as u64);
            pb.set_position(d as u64);
        })
        .context("--sweep")?;
        pb.finish_and_clear();
        print_sweep(&sweep);
        report.sweep = Some(sweep);
    }
    if let Some(dir) = &a.plot_dir {
        use needle_eval::plot;
        if let Some(s) = &report.sweep {
            plot::sweep(s, &dir.join("sweep.png"))?;
        }
        if !report.passkey.is_empty() {
            plot::tasks(&report.passkey, &selectors, "passkey accuracy by context length", &dir.join("passkey.png"))?;
        }
        if !report.ruler.is_empty() {
            plot::tasks(&report.ruler, &selectors, "RULER-style score by context length", &dir.join("ruler.png"))?;
        }
    }
    if let Some(path) = &a.json {
        write_new(path, &serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

/// The selectors `needle eval` compares when `--selectors` is not given.
const DEFAULT_SELECTORS: &str = "full;streaming;oracle;retrieval";

/// `needle eval --context FILE --fidelity`: the saved context's selector (and `--selectors`)
/// against full attention over the context's pages.
fn run_context(a: EvalArgs, path: &std::path::Path) -> Result<()> {
    if a.model.prefill.trim() != "dense" {
        anyhow::bail!("--prefill: a saved context is already prefilled; compare patterns on a text instead");
    }
    if !a.fidelity {
        anyhow::bail!("--context: only --fidelity can run on a saved context (tasks need prompts of their own)");
    }
    let selectors = match &a.selectors {
        Some(s) => parse_selectors(s).context("--selectors")?,
        None => Vec::new(),
    };
    let Loaded { model, tokenizer } = load(&a.model)?;
    let saved = needle_model::context::load(
        path,
        &model,
        &model_digest(&a.model.model)?,
        a.model.weights.name(),
        &needle_select::parse,
    )
    .with_context(|| format!("--context {}", path.display()))?;
    let question = context_question(&tokenizer, a.question.as_deref(), &saved.info)?;
    let context_tokens = saved.tokens.len();
    let kv = a.model.kv.unwrap_or(saved.info.kv);
    let cfg = FidelityConfig { steps: a.steps, attn_layers: a.attn_layers.clone(), chunk: a.chunk, kv };
    let pb = progress_bar(selectors.len() + 1, "selectors");
    let rows = needle_eval::eval::fidelity_of_context(&model, saved, &question, &selectors, &cfg, &mut |d, _| {
        pb.set_position(d as u64)
    })?;
    pb.finish_and_clear();
    print_fidelity(&rows, context_tokens);
    let names = rows.iter().map(|r| r.selector.clone()).collect();
    let report = Report { selectors: names, context_tokens, fidelity: rows, ..Default::default() };
    if let Some(path) = &a.json {
        write_new(path, &serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

/// `needle eval --prefill PATTERNS`: each pattern against dense prefill, decoding with full
/// attention (`--selectors` is not used).
fn run_prefill(a: EvalArgs) -> Result<()> {
    let patterns = parse_patterns(&a.model.prefill).context("--prefill")?;
    let names: Vec<String> = patterns.iter().map(|p| p.0.clone()).collect();
    let any = a.fidelity || a.passkey || a.ruler || !a.prefill_times.is_empty();
    let (fidelity, passkey) = if any { (a.fidelity, a.passkey) } else { (true, true) };
    let mut report = Report { selectors: names.clone(), context_tokens: a.context_tokens, ..Default::default() };
    let Loaded { model, tokenizer } = load(&a.model)?;
    let text = || -> Result<String> {
        match &a.text {
            Some(p) => std::fs::read_to_string(p).with_context(|| format!("--text {}", p.display())),
            None => crate::common::read_document("default"),
        }
    };
    if fidelity {
        let tokens = needle_eval::eval::text_tokens(&tokenizer, &text()?, a.context_tokens)
            .context("--text / --context-tokens")?;
        let pb = progress_bar(patterns.len(), "patterns");
        report.prefill =
            needle_eval::prefill::prefill_fidelity(&model, &tokens, &patterns, a.steps, a.chunk, &mut |d, _| {
                pb.set_position(d as u64)
            })?;
        pb.finish_and_clear();
        print_prefill(&report.prefill, a.context_tokens, a.steps);
    }
    if !a.prefill_times.is_empty() {
        let longest = a.prefill_times.iter().copied().max().unwrap_or(0);
        let tokens =
            needle_eval::eval::text_tokens(&tokenizer, &text()?, longest).context("--text / --prefill-times")?;
        let pb = progress_bar(a.prefill_times.len() * patterns.len(), "prefills");
        report.prefill_times =
            needle_eval::prefill::prefill_times(&model, &tokens, &a.prefill_times, &patterns, a.chunk, &mut |d, _| {
                pb.set_position(d as u64)
            })?;
        pb.finish_and_clear();
        print_prefill_times(&report.prefill_times);
    }
    let tasks = |specs: &[TaskSpec], lengths: &[usize], depths: &[f64]| -> Result<Vec<TaskRow>> {
        let cfg = task_config(&a, lengths, depths);
        let pb = progress_bar(0, "prompts");
        let rows = needle_eval::prefill::prefill_tasks(&model, &tokenizer, &patterns, specs, &cfg, &mut |d, t| {
            pb.set_length(t as u64);
            pb.set_position(d as u64);
        })?;
        pb.finish_and_clear();
        Ok(rows)
    };
    if passkey {
        report.passkey = tasks(&["passkey".parse()?], &a.lengths, &a.depths)?;
        print_tasks("passkey retrieval by prefill pattern", &report.passkey, &names);
    }
    if a.ruler {
        let specs = ruler_tasks(&a)?;
        report.ruler = tasks(&specs, &a.ruler_lengths, &a.ruler_depths)?;
        print_tasks("RULER-style tasks by prefill pattern", &report.ruler, &names);
    }
    if let Some(path) = &a.json {
        write_new(path, &serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

fn print_prefill(rows: &[PrefillRow], context: usize, steps: usize) {
    println!(
        "\nSparse prefill against dense prefill ({context}-token prompt; KL of the next token and of {steps} teacher-forced steps, full-attention decode)"
    );
    println!(
        "{:<52} {:>9} {:>9} {:>9} {:>7} {:>8} {:>9} {:>9} {:>8}",
        "pattern", "next KL", "mean KL", "max KL", "agree", "blocks", "prefill s", "dense s", "speedup"
    );
    for r in rows {
        println!(
            "{:<52} {:>9.2e} {:>9.2e} {:>9.2e} {:>6.1}% {:>7.1}% {:>9.2} {:>9.2} {:>7.2}×",
            r.pattern,
            r.first_kl,
            r.mean_kl,
            r.max_kl,
            100.0 * r.agreement,
            100.0 * r.density,
            r.prefill_s,
            r.dense_s,
            r.dense_s / r.prefill_s.max(1e-9)
        );
    }
}

fn print_prefill_times(rows: &[PrefillTime]) {
    println!("\nPrefill time (dense and pattern alternating)");
    println!("{:<52} {:>8} {:>9} {:>9} {:>8} {:>8}", "pattern", "tokens", "prefill s", "dense s", "speedup", "blocks");
    for r in rows {
        println!(
            "{:<52} {:>8} {:>9.2} {:>9.2} {:>7.2}× {:>7.1}%",
            r.pattern,
            r.tokens,
            r.prefill_s,
            r.dense_s,
            r.dense_s / r.prefill_s.max(1e-9),
            100.0 * r.density
        );
    }
}

fn print_sweep(report: &SweepReport) {
    println!("data: {}", report.data);
    for n in &report.notes {
        println!("note: {n}");
    }
    println!("{}", needle_eval::sweep::table(report));
    if let Some(s) = needle_eval::sweep::speedup_summary(report) {
        println!("{s}");
    }
}

fn print_fidelity(rows: &[FidelityRow], context: usize) {
    println!("\nFidelity against full attention ({context}-token prompt, teacher-forced greedy decode)");
    println!(
        "{:<34} {:>9} {:>9} {:>7} {:>7} {:>7} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8} {:>8} {:>7}",
        "selector",
        "mean KL",
        "max KL",
        "agree",
        "recall",
        "mass",
        "out err",
        "touched",
        "global",
        "MB/step",
        "sel ms",
        "attn ms",
        "rest ms",
        "build s"
    );
    for r in rows {
        println!(
            "{:<34} {:>9.2e} {:>9.2e} {:>6.1}% {:>7} {:>6.1}% {:>8.2e} {:>7.2}% {:>7.2}% {:>9.1} {:>8.2} {:>8.2} {:>8.1} {:>7.2}",
            r.selector,
            r.mean_kl,
            r.max_kl,
            100.0 * r.agreement,
            r.recall.map_or("-".into(), |x| format!("{x:.3}")),
            100.0 * r.mass,
            r.output_error,
            100.0 * r.keys_touched,
            100.0 * r.keys_touched_global,
            r.bytes_per_step / 1e6,
            r.select_ms,
            r.attend_ms,
            r.other_ms,
            r.build_s
        );
    }
}

fn print_tasks(title: &str, rows: &[TaskRow], selectors: &[String]) {
    let mut tasks: Vec<&str> = rows.iter().map(|r| r.task.as_str()).collect();
    tasks.dedup();
    let mut lengths: Vec<usize> = rows.iter().map(|r| r.length).collect();
    lengths.sort_unstable();
    lengths.dedup();
    let cell = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
    println!("\n{title}: mean score per prompt length (all depths and seeds)");
    for task in tasks {
        let head: Vec<String> = lengths.iter().map(|l| format!("{l:>8}")).collect();
        println!("{task:<34} {} {:>8}", head.join(" "), "all");
        for sel in selectors {
            let cells: Vec<String> =
                lengths.iter().map(|&l| format!("{:>8}", cell(mean_score(rows, Some(task), sel, Some(l))))).collect();
            println!("  {sel:<32} {} {:>8}", cells.join(" "), cell(mean_score(rows, Some(task), sel, None)));
        }
    }
    println!("\nper prompt (keys touched per decode step: all layers, global layers)");
    println!(
        "{:<34} {:<28} {:>7} {:>6} {:>5} {:>8} {:>8}  answer",
        "selector", "task", "tokens", "depth", "score", "touched", "global"
    );
    for r in rows {
        println!(
            "{:<34} {:<28} {:>7} {:>6.2} {:>5.2} {:>7.2}% {:>7.2}%  {:?}",
            r.selector,
            r.task,
            r.tokens,
            r.depth,
            r.score,
            100.0 * r.keys_touched,
            100.0 * r.keys_touched_global,
            r.generated.trim()
        );
    }
}

/// The task settings of `a` for one grid of `lengths` × `depths`.
fn task_config(a: &EvalArgs, lengths: &[usize], depths: &[f64]) -> TaskConfig {
    TaskConfig {
        lengths: lengths.to_vec(),
        depths: depths.to_vec(),
        seeds: a.seeds.clone(),
        answer_tokens: a.answer_tokens,
        chunk: a.chunk,
        kv: a.model.kv_dtype(),
    }
}

/// The `--tasks` list (`;`-separated task specs).
fn ruler_tasks(a: &EvalArgs) -> Result<Vec<TaskSpec>> {
    a.tasks
        .split(';')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()
        .context("--tasks")
}

#[cfg(test)]
mod tests {
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
