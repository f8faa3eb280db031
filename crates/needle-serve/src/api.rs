//! Decoding and validating an OpenAI request body into a [`Request`]. The body is read as a
//! JSON value and each field checked by hand, so that every refusal names its field
//! ([`ApiError::param`]); fields needle does not know are ignored, as OpenAI's clients send many.

use needle_model::SamplingConfig;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Most tokens a request may ask for, whatever the model's context.
pub const MAX_TOKENS_CAP: usize = 1 << 20;
/// OpenAI allows up to four stop sequences.
const MAX_STOPS: usize = 4;

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Its text.
    pub content: String,
}

/// What the model is asked.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Chat messages, rendered by the model's template.
    Chat(Vec<ChatMessage>),
    /// Plain text (`/v1/completions`).
    Text(String),
    /// Token ids (`/v1/completions` with an array of integers).
    Tokens(Vec<u32>),
}

/// A validated request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Where it came.
    pub endpoint: Endpoint,
    /// The model it names, if any.
    pub model: Option<String>,
    /// The prompt.
    pub input: Input,
    /// Most new tokens (`max_tokens` or `max_completion_tokens`); the server's default if none.
    pub max_tokens: Option<usize>,
    /// temperature, top_p, top_k (an extension), seed.
    pub sampling: SamplingConfig,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// Server-sent events instead of one JSON answer.
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the usage.
    pub include_usage: bool,
    /// `needle.selector` or a top-level `selector`: the attention selector for this request.
    pub selector: Option<String>,
}

/// Decodes `body` sent to `endpoint`; never panics, whatever the bytes.
pub fn parse_request(endpoint: Endpoint, body: &[u8]) -> Result<Request, ApiError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::malformed(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(o) = value else {
        return Err(ApiError::malformed("the body must be a JSON object"));
    };
    let input = match endpoint {
        Endpoint::Chat => Input::Chat(messages(&o)?),
        Endpoint::Completion => prompt(&o)?,
    };
    let max_tokens = match (opt_uint(&o, "max_tokens")?, opt_uint(&o, "max_completion_tokens")?) {
        (Some(a), _) | (None, Some(a)) => Some(a),
        (None, None) => None,
    };
    if let Some(m) = max_tokens
        && !(1..=MAX_TOKENS_CAP).contains(&m)
    {
        let name = if o.contains_key("max_tokens") { "max_tokens" } else { "max_completion_tokens" };
        return Err(ApiError::invalid(name, format!("{m} is not in 1..={MAX_TOKENS_CAP}")));
    }
    if let Some(n) = opt_uint(&o, "n")?
        && n != 1
    {
        return Err(ApiError::invalid("n", format!("only n = 1 is served, not {n}")));
    }
    if opt_bool(&o, "logprobs")? == Some(true) || o.get("logprobs").is_some_and(Value::is_number) {
        return Err(ApiError::invalid("logprobs", "logprobs are not served"));
    }
    let temperature = opt_num(&o, "temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid("temperature", format!("{temperature} is not in [0, 2]")));
    }
    let top_p = opt_num(&o, "top_p")?;
    if let Some(p) = top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(ApiError::invalid("top_p", format!("{p} is not in (0, 1]")));
    }
    let top_k = opt_uint(&o, "top_k")?;
    if top_k == Some(0) {
        return Err(ApiError::invalid("top_k", "must be at least 1"));
    }
    let seed = match o.get("seed") {
        None | Some(Value::Null) => 0,
        Some(v) => match (v.as_u64(), v.as_i64()) {
            (Some(s), _) => s,
            (None, Some(s)) => s as u64,
            _ => return Err(ApiError::invalid("seed", "must be an integer")),
        },
    };
    let sampling = SamplingConfig { temperature: temperature as f32, top_k, top_p: top_p.map(|p| p as f32), seed };
    let stream = opt_bool(&o, "stream")?.unwrap_or(false);
    let include_usage = match o.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(so)) => opt_bool(so, "include_usage")
            .map_err(|_| ApiError::invalid("stream_options.include_usage", "must be a boolean"))?
            .unwrap_or(false),
        Some(_) => return Err(ApiError::invalid("stream_options", "must be an object")),
    };
    let selector = match (o.get("needle"), opt_str(&o, "selector")?) {
        (Some(Value::Object(n)), top) => match n.get("selector") {
            Some(Value::String(s)) => Some(s.clone()),
            None | Some(Value::Null) => top,
            Some(_) => return Err(ApiError::invalid("needle.selector", "must be a string")),
        },
        (None | Some(Value::Null), top) => top,
        (Some(_), _) => return Err(ApiError::invalid("needle", "must be an object")),
    };
    Ok(Request {
        endpoint,
        model: opt_str(&o, "model")?,
        input,
        max_tokens,
        sampling,
        stop: stops(&o)?,
        stream,
        include_usage,
        selector,
    })
}

fn messages(o: &Map<String, Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let Some(Value::Array(list)) = o.get("messages") else {
        return Err(ApiError::invalid("messages", "must be a non-empty array of messages"));
    };
    if list.is_empty() {
        return Err(ApiError::invalid("messages", "must be a non-empty array of messages"));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let field = |f: &str| format!("messages[{i}].{f}");
            let Value::Object(m) = m else {
                return Err(ApiError::invalid(&format!("messages[{i}]"), "must be an object"));
            };
            let role = match m.get("role") {
                Some(Value::String(r)) if ["system", "user", "assistant", "developer"].contains(&r.as_str()) => {
                    // `developer` is OpenAI's newer name for `system`.
                    if r == "developer" { "system".to_string() } else { r.clone() }
                }
                Some(Value::String(r)) => {
                    return Err(ApiError::invalid(
                        &field("role"),
                        format!("`{r}` is not one of system, developer, user, assistant"),
                    ));
                }
                _ => return Err(ApiError::invalid(&field("role"), "must be a string")),
            };
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None if role == "assistant" => String::new(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => {
                                return Err(ApiError::invalid(
                                    &format!("messages[{i}].content[{j}]"),
                                    "only text parts ({\"type\": \"text\", \"text\": …}) are served",
                                ));
                            }
                        }
                    }
                    text
                }
                _ => return Err(ApiError::invalid(&field("content"), "must be a string or an array of text parts")),
            };
            Ok(ChatMessage { role, content })
        })
        .collect()
}

fn prompt(o: &Map<String, Value>) -> Result<Input, ApiError> {
    let bad = || ApiError::invalid("prompt", "must be a string, an array of one string, or an array of token ids");
    match o.get("prompt") {
        Some(Value::String(s)) => Ok(Input::Text(s.clone())),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            Ok(Input::Text(a[0].as_str().unwrap_or_default().into()))
        }
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_u64) => a
            .iter()
            .map(|v| v.as_u64().and_then(|t| u32::try_from(t).ok()).ok_or_else(bad))
            .collect::<Result<_, _>>()
            .map(Input::Tokens),
        _ => Err(bad()),
    }
}

fn stops(o: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    let list = match o.get("stop") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::invalid("stop", "must be a string or an array of strings"))?,
        Some(_) => return Err(ApiError::invalid("stop", "must be a string or an array of strings")),
    };
    if list.len() > MAX_STOPS || list.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", format!("at most {MAX_STOPS} non-empty sequences")));
    }
    Ok(list)
}

fn opt_str(o: &Map<String, Value>, name: &str) -> Result<Option<String>, ApiError> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::invalid(name, "must be a string")),
    }
}

fn opt_bool(o: &Map<String, Value>, name: &str) -> Result<Option<bool>, ApiError> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::Number(_)) if name == "logprobs" => Ok(None),
        Some(_) => Err(ApiError::invalid(name, "must be a boolean")),
    }
}

fn opt_num(o: &Map<String, Value>, name: &str) -> Result<Option<f64>, ApiError> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_f64().map(Some).ok_or_else(|| ApiError::invalid(name, "must be a number")),
        Some(_) => Err(ApiError::invalid(name, "must be a number")),
    }
}

fn opt_uint(o: &Map<String, Value>, name: &str) -> Result<Option<usize>, ApiError> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
            None => Err(ApiError::invalid(name, "must be a non-negative integer")),
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;

    fn err(endpoint: Endpoint, body: &str) -> ApiError {
        parse_request(endpoint, body.as_bytes()).unwrap_err()
    }

    #[test]
    fn a_chat_request_decodes_with_openai_names() {
        let r = parse_request(
            Endpoint::Chat,
            br#"{"model":"m","messages":[{"role":"system","content":"S"},{"role":"user","content":[{"type":"text","text":"Q"}]}],
                "temperature":0,"top_p":0.5,"max_tokens":7,"seed":3,"stop":["\n"],"stream":true,
                "stream_options":{"include_usage":true},"needle":{"selector":"full"},"frequency_penalty":0}"#,
        )
        .unwrap();
        assert_eq!(r.model.as_deref(), Some("m"));
        assert_eq!(
            r.input,
            Input::Chat(vec![
                ChatMessage { role: "system".into(), content: "S".into() },
                ChatMessage { role: "user".into(), content: "Q".into() }
            ])
        );
        assert_eq!(
            (r.max_tokens, r.sampling.temperature, r.sampling.top_p, r.sampling.seed),
            (Some(7), 0.0, Some(0.5), 3)
        );
        assert_eq!(
            (r.stop, r.stream, r.include_usage, r.selector.as_deref()),
            (vec!["\n".into()], true, true, Some("full"))
        );
        let r = parse_request(Endpoint::Completion, br#"{"prompt":[1,2,3],"selector":"quest"}"#).unwrap();
        assert_eq!((r.input, r.selector.as_deref()), (Input::Tokens(vec![1, 2, 3]), Some("quest")));
    }

    #[test]
    fn each_refusal_names_its_field() {
        use Endpoint::*;
        for (ep, body, param) in [
            (Chat, r#"{"messages":[]}"#, "messages"),
            (Chat, r#"{"messages":[{"role":"wizard","content":"x"}]}"#, "messages[0].role"),
            (Chat, r#"{"messages":[{"role":"user","content":5}]}"#, "messages[0].content"),
            (Chat, r#"{"messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#, "temperature"),
            (Chat, r#"{"messages":[{"role":"user","content":"x"}],"temperature":9}"#, "temperature"),
            (Chat, r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":0}"#, "max_tokens"),
            (Chat, r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":1e30}"#, "max_tokens"),
            (Chat, r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":99999999999}"#, "max_tokens"),
            (Chat, r#"{"messages":[{"role":"user","content":"x"}],"top_p":0}"#, "top_p"),
            (Chat, r#"{"messages":[{"role":"user","content":"x"}],"n":2}"#, "n"),
            (Chat, r#"{"messages":[{"role":"user","content":"x"}],"stop":[1]}"#, "stop"),
            (Chat, r#"{"messages":[{"role":"user","content":"x"}],"stream":"yes"}"#, "stream"),
            (Chat, r#"{"messages":[{"role":"user","content":"x"}],"needle":{"selector":3}}"#, "needle.selector"),
            (Completion, r#"{"prompt":{"a":1}}"#, "prompt"),
            (Completion, r#"{"prompt":[-1]}"#, "prompt"),
            (Completion, r#"{"prompt":"x","model":7}"#, "model"),
        ] {
            let e = err(ep, body);
            assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, Some(param)), "{body}: {e:?}");
        }
        for body in ["", "{", "[1]", "null", "\"x\""] {
            assert_eq!(err(Chat, body).code, Some("invalid_json"), "{body}");
        }
    }

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "[a-z \\n]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            let keys = prop_oneof![
                Just("messages".to_string()),
                Just("role".to_string()),
                Just("content".to_string()),
                Just("prompt".to_string()),
                Just("max_tokens".to_string()),
                Just("temperature".to_string()),
                Just("top_p".to_string()),
                Just("stop".to_string()),
                Just("seed".to_string()),
                Just("stream".to_string()),
                Just("stream_options".to_string()),
                Just("needle".to_string()),
                Just("selector".to_string()),
                Just("type".to_string()),
                Just("text".to_string()),
                "[a-z]{1,5}",
            ];
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(keys, inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Any JSON value, or any bytes, decodes to a request or to a 400 naming why; never a panic.
        #[test]
        fn decoding_never_panics(v in json(), bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            for ep in [Endpoint::Chat, Endpoint::Completion] {
                if let Err(e) = parse_request(ep, v.to_string().as_bytes()) {
                    prop_assert_eq!(e.status.as_u16(), 400);
                }
                if let Err(e) = parse_request(ep, &bytes) {
                    prop_assert_eq!(e.status.as_u16(), 400);
                }
            }
        }
    }
}
