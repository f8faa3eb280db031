//! A request's prompt as two token runs: the **prefix** (the document), prefilled and built
//! once and kept in the context cache, and the **rest** (the question), extended after it.
//!
//! The cut depends on the prompt alone, never on what is cached, so a request computes the same
//! thing whether its prefix is prefilled now, taken from the cache or loaded from disk:
//! - chat: in the last user message, at its last blank line (`\n\n`): the text before it is the
//!   document, the rest (with the template's closing turn) the question, as `needle generate
//!   --document … --question Q --chat` asks; a last user message without a blank line is all
//!   question, and the prefix is the conversation up to it;
//! - text: at the last blank line; a prompt without one is all prefix;
//! - token ids: all prefix.
//!
//! Each part is tokenized alone (the prefix with the model's special tokens, the rest without),
//! as `needle prefill` and `needle generate --context` do.

use needle_loader::{Message, Tokenizer};

use crate::api::{ChatMessage, Input};
use crate::error::ApiError;

/// Stands where the cut is while the chat template renders; never in a tokenized text.
const CUT: char = '\u{1}';

/// A prompt cut for the context cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// Prefilled (and cached) tokens: never empty.
    pub prefix: Vec<u32>,
    /// Tokens extended after the prefix (may be empty).
    pub rest: Vec<u32>,
}

impl Prompt {
    /// All tokens.
    pub fn len(&self) -> usize {
        self.prefix.len() + self.rest.len()
    }

    /// Never true for a cut prompt (the prefix is not empty); for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Prefix then rest.
    pub fn ids(&self) -> Vec<u32> {
        [&self.prefix[..], &self.rest].concat()
    }
}

/// Cuts and tokenizes `input`.
pub fn cut(tok: &Tokenizer, input: &Input) -> Result<Prompt, ApiError> {
    let enc = |text: &str, special: bool| {
        tok.encode(text, special).map_err(|e| ApiError::invalid("prompt", format!("tokenizing: {e}")))
    };
    let (prefix, rest) = match input {
        Input::Tokens(ids) => (ids.clone(), Vec::new()),
        Input::Text(text) => match text.rfind("\n\n") {
            Some(at) if at > 0 => (enc(&text[..at], false)?, enc(&text[at..], false)?),
            _ => (enc(text, false)?, Vec::new()),
        },
        Input::Chat(messages) => {
            if messages.iter().any(|m| m.content.contains(CUT)) {
                return Err(ApiError::invalid("messages", "a message contains the control character U+0001"));
            }
            let last_user = messages.iter().rposition(|m| m.role == "user");
            let marked: Vec<Message> = messages
                .iter()
                .enumerate()
                .map(|(i, m)| Message::new(&m.role, &mark(m, Some(i) == last_user)))
                .collect();
            let text = tok
                .render_chat(&marked, true)
                .map_err(|e| ApiError::invalid("messages", format!("the model's chat template: {e}")))?;
            match text.split_once(CUT) {
                Some((head, tail)) => (enc(head, true)?, enc(tail, false)?),
                None => (enc(&text, true)?, Vec::new()),
            }
        }
    };
    let p = if prefix.is_empty() { Prompt { prefix: rest, rest: Vec::new() } } else { Prompt { prefix, rest } };
    if p.prefix.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt is empty after tokenization"));
    }
    Ok(p)
}

/// The message's content with the cut marked: before its last blank line (the question keeps
/// the blank line), or before it all.
fn mark(m: &ChatMessage, last_user: bool) -> String {
    if !last_user {
        return m.content.clone();
    }
    match m.content.rfind("\n\n") {
        Some(at) if at > 0 => format!("{}{CUT}{}", &m.content[..at], &m.content[at..]),
        _ => format!("{CUT}{}", m.content),
    }
}
