//! Tokenizers: Hugging Face `tokenizer.json`, or a byte-level BPE rebuilt from a GGUF's
//! `tokenizer.ggml.*` metadata so it tokenises like llama.cpp does.

use std::path::Path;

use serde_json::{Value as Json, json};

use crate::gguf::{GgufFile, Value};
use crate::{ChatTemplate, Error, Message, Result};

/// A tokenizer with the model's special ids, its chat template and streaming decode.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Same vocabulary, but special tokens in the text are encoded as plain text (llama.cpp's
    /// `parse_special = false`).
    plain: tokenizers::Tokenizer,
    bos: Option<u32>,
    /// Prepend `bos` ourselves when asked for special tokens (GGUF has no post-processor).
    manual_bos: bool,
    eos: Vec<u32>,
    source: String,
    chat: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("chat_template", &self.chat.is_some())
            .finish()
    }
}

/// Special tokens llama.cpp also treats as end of generation.
const EOG_NAMES: [&str; 6] =
    ["<|eot_id|>", "<|im_end|>", "<|end|>", "<|endoftext|>", "<end_of_turn>", "<|end_of_text|>"];

/// llama.cpp's byte-level pre-tokenizers by `tokenizer.ggml.pre`, as HF pre-tokenizer JSON.
fn pre_tokenizer(pre: &str) -> Option<Json> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    Some(match pre {
        "gpt2" | "gpt-2" | "default" => byte_level(true),
        // Digits one by one, then the GPT-2 regex (SmolLM2's and StarCoder's tokenizer.json).
        "smollm" | "starcoder" | "refact" | "codeshell" => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]
        }),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" => json!({
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"},
                    "behavior": "Isolated",
                    "invert": false
                },
                byte_level(false)
            ]
        }),
        // As llama-bpe with digits one at a time (llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2).
        "qwen2" | "deepseek-r1-qwen" => json!({
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"},
                    "behavior": "Isolated",
                    "invert": false
                },
                byte_level(false)
            ]
        }),
        _ => return None,
    })
}

impl Tokenizer {
    fn new(
        inner: tokenizers::Tokenizer,
        bos: Option<u32>,
        manual_bos: bool,
        mut eos: Vec<u32>,
        source: String,
    ) -> Self {
        // Like llama.cpp, also stop on end-of-turn special tokens the config does not list.
        for name in EOG_NAMES {
            if let Some(id) = inner.token_to_id(name)
                && inner.get_added_vocabulary().is_special_token(name)
                && !eos.contains(&id)
            {
                eos.push(id);
            }
        }
        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);
        Self { inner, plain, bos, manual_bos, eos, source, chat: None }
    }

    /// Loads a Hugging Face `tokenizer.json`. `bos`/`eos` come from the model config.
    pub fn from_file(path: &Path, bos: Option<u32>, eos: Vec<u32>) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer.json not found")));
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer { source_desc: path.display().to_string(), reason: e.to_string() })?;
        Ok(Self::new(inner, bos, false, eos, path.display().to_string()))
    }

    /// Rebuilds the GGUF's embedded tokenizer: byte-level BPE (`tokenizer.ggml.model = "gpt2"`,
    /// with its `tokenizer.ggml.pre` pre-tokenizer) or SentencePiece (`"llama"`: Llama 2,
    /// Mistral), so it tokenises as llama.cpp does.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let source = format!("{} (embedded)", g.path().display());
        let fail = |reason: String| Error::Tokenizer { source_desc: source.clone(), reason };
        let model = g.get("tokenizer.ggml.model").and_then(Value::as_str).unwrap_or("");
        if model != "gpt2" && model != "llama" {
            return Err(Error::Unsupported {
                path: g.path().into(),
                what: "tokenizer.ggml.model".into(),
                reason: format!("{model:?} (supported: \"gpt2\" byte-level BPE, \"llama\" SentencePiece)"),
            });
        }
        let strings = |key: &str| -> Result<Vec<&str>> {
            let arr = g
                .get(key)
                .and_then(Value::as_array)
                .ok_or_else(|| Error::MissingMetadata { path: g.path().into(), key: key.into() })?;
            arr.iter()
                .map(|v| {
                    v.as_str().ok_or_else(|| Error::BadMetadata {
                        path: g.path().into(),
                        key: key.into(),
                        reason: "array element is not a string".into(),
                    })
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let types: Vec<i64> = match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
            Some(a) => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };

        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        let mut added = Vec::new();
        for (id, tok) in tokens.iter().enumerate() {
            if vocab.insert((*tok).to_string(), json!(id)).is_some() {
                tracing::warn!(token = tok, id, "duplicate token in GGUF vocabulary; later id wins");
            }
            // 3 = control, 4 = user-defined: matched whole in the input, never split by BPE.
            let ty = types.get(id).copied().unwrap_or(1);
            if ty == 3 || ty == 4 {
                added.push(json!({
                    "id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                    "normalized": false, "special": ty == 3
                }));
            }
        }
        let (pre_name, spec) = if model == "gpt2" {
            let pre_name = g.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
            let pre = pre_tokenizer(pre_name).ok_or_else(|| Error::Unsupported {
                path: g.path().into(),
                what: "tokenizer.ggml.pre".into(),
                reason: format!(
                    "{pre_name:?} (known: gpt2, smollm, starcoder, refact, codeshell, llama3, llama-bpe, qwen2)"
                ),
            })?;
            let merges: Vec<Json> = strings("tokenizer.ggml.merges")?
                .iter()
                .map(|m| {
                    m.split_once(' ')
                        .map(|(a, b)| json!([a, b]))
                        .ok_or_else(|| fail(format!("merge {m:?} has no space")))
                })
                .collect::<Result<_>>()?;
            let spec = json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                "normalizer": null,
                "pre_tokenizer": pre,
                "post_processor": null,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {
                    "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                    "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                    "vocab": vocab, "merges": merges
                }
            });
            (pre_name, spec)
        } else {
            ("spm", spm_spec(g, &tokens, &types, vocab, added)?)
        };
        let text = serde_json::to_string(&spec).map_err(|e| fail(e.to_string()))?;
        let inner: tokenizers::Tokenizer = text.parse().map_err(|e: tokenizers::Error| fail(e.to_string()))?;
        let add_bos = g.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(model == "llama");
        let cfg = g.config();
        tracing::debug!(pre = pre_name, vocab = tokens.len(), add_bos, "built tokenizer from GGUF");
        let tok = Self::new(inner, cfg.bos_token_id, add_bos, cfg.eos_token_ids.clone(), source);
        let mut chat = gguf_chat_template(g)?;
        if chat.is_none() && cfg.architecture == crate::Architecture::Gemma3 {
            // Gemma's GGUFs converted from a base model carry no template; llama.cpp then uses
            // its built-in `gemma` format, which this is.
            let text = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize)).copied().unwrap_or_default();
            let eos = text(cfg.eos_token_ids.first().copied());
            chat = Some(ChatTemplate::new(GEMMA_TEMPLATE, text(cfg.bos_token_id), eos, "built-in gemma template")?);
        }
        Ok(tok.with_chat_template(chat))
    }

    /// The same tokenizer with `chat` as its chat template (`None`: ChatML).
    pub fn with_chat_template(mut self, chat: Option<ChatTemplate>) -> Self {
        self.chat = chat;
        self
    }

    /// The model's chat template, if its checkpoint has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat.as_ref()
    }

    fn err(&self, e: tokenizers::Error) -> Error {
        Error::Tokenizer { source_desc: self.source.clone(), reason: e.to_string() }
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) become their
    /// single ids. `add_special` adds what the tokenizer adds around a sequence (BOS when the
    /// model wants one).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        self.encode_with(text, add_special, true)
    }

    /// Like [`encode`](Self::encode); with `parse_special = false` special-token text is
    /// tokenised as ordinary text, as llama.cpp does with `parse_special = false`.
    pub fn encode_with(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>> {
        let tok = if parse_special { &self.inner } else { &self.plain };
        let enc = tok.encode(text, add_special && !self.manual_bos).map_err(|e| self.err(e))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        // A chat template prints the BOS itself: never add a second one.
        if add_special
            && self.manual_bos
            && let Some(b) = self.bos
            && enc.get_ids().first() != Some(&b)
        {
            ids.push(b);
        }
        ids.extend_from_slice(enc.get_ids());
        // The same when the tokenizer's own post-processor added it (tokenizer.json).
        if add_special
            && let Some(b) = self.bos
            && ids.len() >= 2
            && ids[..2] == [b, b]
        {
            ids.remove(0);
        }
        Ok(ids)
    }

    /// The first `n` token ids of `text` (all of them when it has fewer), as
    /// [`encode`](Self::encode) without added specials would give, without tokenizing a long
    /// document whole: prefixes cut at whitespace and growing fourfold are encoded until one
    /// yields more than `n` tokens plus a margin, so the tokens before the cut are final.
    pub fn encode_prefix(&self, text: &str, n: usize) -> Result<Vec<u32>> {
        // About four bytes per token in English text; the margin covers a pre-token split at the cut.
        const MARGIN: usize = 64;
        let mut len = (n + MARGIN).saturating_mul(8);
        loop {
            if len >= text.len() {
                let mut ids = self.encode(text, false)?;
                ids.truncate(n);
                return Ok(ids);
            }
            let end = (0..=len).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
            let cut = text[..end].rfind(char::is_whitespace).filter(|&c| c > 0).unwrap_or(end);
            let mut ids = self.encode(&text[..cut], false)?;
            if ids.len() > n + MARGIN {
                ids.truncate(n);
                return Ok(ids);
            }
            len = len.saturating_mul(4);
        }
    }

    /// Text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| self.err(e))
    }

    /// Id of a token string (special tokens included).
    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }

    /// Token string of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Beginning-of-sequence id.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Ids that end generation: the config's eos ids, then special end-of-turn tokens
    /// (`<|im_end|>`, `<|endoftext|>`, `<|eot_id|>`, …) the config does not list, as llama.cpp does.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// The wrapped Hugging Face tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The prompt for one question, ending where the assistant's answer starts, in the model's
    /// own chat template. Without one (or when the template fails, logged as a warning) it is
    /// ChatML: `<|im_start|>system\n…<|im_end|>\n<|im_start|>user\n…<|im_end|>\n<|im_start|>assistant\n`.
    /// [`Tokenizer::render_chat`] reports a failing template as an error instead.
    pub fn chat_prompt(&self, system: Option<&str>, user: &str) -> String {
        let mut messages: Vec<Message> = system.map(|s| Message::new("system", s)).into_iter().collect();
        messages.push(Message::new("user", user));
        match self.render_chat(&messages, true) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "the model's chat template failed; using ChatML");
                chatml(&messages)
            }
        }
    }

    /// `messages` in the model's chat template (ChatML when it has none); with
    /// `add_generation_prompt` the text ends where the assistant's answer starts.
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        match &self.chat {
            Some(t) => t.render(messages, add_generation_prompt),
            None => {
                let mut s = chatml(messages);
                if !add_generation_prompt {
                    s.truncate(s.len() - "<|im_start|>assistant\n".len());
                }
                Ok(s)
            }
        }
    }

    /// An incremental detokenizer for generated ids.
    pub fn decode_stream(&self) -> DecodeStream<'_> {
        DecodeStream { tok: self, ids: Vec::new(), prefix_offset: 0, read_offset: 0 }
    }
}

/// SentencePiece as llama.cpp runs it (`llm_tokenizer_spm`), in HF `tokenizers` terms: a space
/// before the text and `▁` for every space, then BPE whose merges are every split of a piece
/// into two pieces, best piece score first (how `transformers` converts a SentencePiece model),
/// with unknown characters as `<0xXX>` byte tokens. One difference: llama.cpp can merge two
/// characters that are not pieces themselves into a piece; here they stay bytes. In a trained
/// SentencePiece vocabulary every character of a piece is a piece.
fn spm_spec(
    g: &GgufFile,
    tokens: &[&str],
    types: &[i64],
    vocab: serde_json::Map<String, Json>,
    added: Vec<Json>,
) -> Result<Json> {
    let scores: Vec<f64> = match g.get("tokenizer.ggml.scores").and_then(Value::as_array) {
        Some(a) => a.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect(),
        None => {
            return Err(Error::MissingMetadata { path: g.path().into(), key: "tokenizer.ggml.scores".into() });
        }
    };
    let add_prefix = g.get("tokenizer.ggml.add_space_prefix").and_then(Value::as_bool).unwrap_or(true);
    let ids: std::collections::HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    // Only normal pieces (type 1) merge; control, byte and unknown tokens never come out of BPE.
    let normal = |id: usize| types.get(id).copied().unwrap_or(1) == 1;
    let mut merges: Vec<(f64, usize, &str, &str)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate().filter(|(id, _)| normal(*id)) {
        for (cut, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(cut);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r))
                && normal(li)
                && normal(ri)
            {
                merges.push((scores.get(id).copied().unwrap_or(0.0), id, l, r));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let merges: Vec<Json> = merges.iter().map(|(_, _, l, r)| json!([l, r])).collect();
    let unk = types.iter().position(|&t| t == 2).and_then(|i| tokens.get(i)).map(|s| s.to_string());
    let mut normalizers = vec![json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"})];
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_prefix {
        normalizers.insert(0, json!({"type": "Prepend", "prepend": "\u{2581}"}));
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    }))
}

/// Gemma's chat format (its `tokenizer_config.json` template, without the image parts): a system
/// message is prepended to the first user turn, the assistant is `model`.
const GEMMA_TEMPLATE: &str = "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}\
{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}\
{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}\
{%- for message in loop_messages -%}{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}\
{%- else -%}{%- set role = message['role'] -%}{%- endif -%}\
{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}\
{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}";

/// ChatML with the generation prompt.
fn chatml(messages: &[Message]) -> String {
    let mut s = String::new();
    for m in messages {
        s.push_str(&format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content));
    }
    s.push_str("<|im_start|>assistant\n");
    s
}

/// `tokenizer.chat_template` of a GGUF with the texts of its BOS and EOS tokens.
fn gguf_chat_template(g: &GgufFile) -> Result<Option<ChatTemplate>> {
    let Some(source) = g.get("tokenizer.chat_template").and_then(Value::as_str) else { return Ok(None) };
    let tokens = g.get("tokenizer.ggml.tokens").and_then(Value::as_array).unwrap_or(&[]);
    let text = |key: &str| -> Result<String> {
        Ok(match g.meta_u32(key)? {
            Some(id) => tokens.get(id as usize).and_then(Value::as_str).unwrap_or_default().to_string(),
            None => String::new(),
        })
    };
    let origin = format!("{} tokenizer.chat_template", g.path().display());
    ChatTemplate::new(source, &text("tokenizer.ggml.bos_token_id")?, &text("tokenizer.ggml.eos_token_id")?, &origin)
        .map(Some)
}

/// Turns ids into text as they are generated, emitting only complete UTF-8 text: a character
/// split over several byte tokens comes out once its last byte arrives.
#[derive(Debug)]
pub struct DecodeStream<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    /// `ids[prefix_offset..read_offset]` is context already emitted; it is decoded again so
    /// decoders that depend on neighbours (spaces, prefixes) see the same text.
    prefix_offset: usize,
    read_offset: usize,
}

/// Give up waiting for a character to complete after this many ids (invalid byte sequences).
const MAX_PENDING: usize = 8;

impl DecodeStream<'_> {
    /// Adds one id; returns the newly completed text, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = self.tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = self.tok.decode(&self.ids[self.prefix_offset..])?;
        let pending = self.ids.len() - self.read_offset;
        if full.ends_with('\u{FFFD}') && pending < MAX_PENDING {
            return Ok(None);
        }
        let new = match full.strip_prefix(prefix.as_str()) {
            Some(rest) => rest.to_string(),
            // Decoding with more context changed earlier text; emit what is past its length.
            None => full.get(prefix.len()..).unwrap_or("").to_string(),
        };
        // Keep only the ids still needed as context.
        let drop = self.read_offset.min(self.ids.len());
        self.prefix_offset = self.read_offset - drop;
        self.ids.drain(..drop);
        self.read_offset = self.ids.len();
        Ok(if new.is_empty() { None } else { Some(new) })
    }
}
