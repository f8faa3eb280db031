//! The HTTP side: routes, request handling, OpenAI's response and chunk formats.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request as HttpRequest, State};
use axum::http::{StatusCode, header};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt as _;
use futures_util::stream::{self, Stream};
use needle_loader::Tokenizer;
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::api::{Endpoint, Request, parse_request};
use crate::engine::{Event, Job};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::prompt;

/// What every handler shares.
pub struct AppState {
    /// The engine's queue.
    pub jobs: SyncSender<Job>,
    /// Its capacity (for the overload message).
    pub queue: usize,
    /// For cutting prompts.
    pub tokenizer: Arc<Tokenizer>,
    /// The model's name in requests and `/v1/models`.
    pub model_id: String,
    /// Most tokens (prompt + generated) one sequence may hold.
    pub max_context: usize,
    /// `max_tokens` when a request gives none (capped by what is left of the context).
    pub default_max_tokens: usize,
    /// The selector when a request names none.
    pub default_selector: String,
    /// Token ids the model knows.
    pub vocab: usize,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Ids of responses.
    pub next_id: AtomicU64,
}

/// The routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::invalid("path", "no such endpoint").with_status(StatusCode::NOT_FOUND).with_code("not_found")
        })
        .layer(from_fn_with_state(state.clone(), count_status))
        .layer(DefaultBodyLimit::max(64 << 20))
        .with_state(state)
}

async fn count_status(State(s): State<Arc<AppState>>, req: HttpRequest, next: Next) -> Response {
    let resp = next.run(req).await;
    s.metrics.count_status(resp.status().as_u16());
    resp
}

async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": s.model_id, "object": "model", "created": 0, "owned_by": "needle"}]
    }))
}

async fn metrics(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render())
}

async fn chat(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    answer(s, Endpoint::Chat, body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    answer(s, Endpoint::Completion, body).await.unwrap_or_else(IntoResponse::into_response)
}

/// A request checked, queued, and answered as one JSON object or a stream of chunks.
async fn answer(s: Arc<AppState>, endpoint: Endpoint, body: Bytes) -> Result<Response, ApiError> {
    let req = parse_request(endpoint, &body)?;
    if let Some(m) = &req.model
        && m != &s.model_id
        && m != "default"
    {
        return Err(ApiError::invalid(
            "model",
            format!("the model `{m}` does not exist; this server has `{}`", s.model_id),
        )
        .with_status(StatusCode::NOT_FOUND)
        .with_code("model_not_found"));
    }
    let selector = req.selector.clone().unwrap_or_else(|| s.default_selector.clone());
    if selector != "auto" {
        needle_select::parse(&selector)
            .map_err(|e| ApiError::invalid("selector", format!("`{selector}`: {e}")).with_code("unknown_selector"))?;
    }
    let tok = s.tokenizer.clone();
    let input = req.input.clone();
    let prompt = tokio::task::spawn_blocking(move || prompt::cut(&tok, &input))
        .await
        .map_err(|e| ApiError::internal(format!("tokenizing: {e}")))??;
    let vocab = s.vocab;
    if let Some(bad) = prompt.prefix.iter().chain(&prompt.rest).find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid("prompt", format!("token id {bad} is outside the vocabulary of {vocab}")));
    }
    let n = prompt.len();
    if n >= s.max_context {
        return Err(ApiError::invalid(
            if endpoint == Endpoint::Chat { "messages" } else { "prompt" },
            format!("the prompt is {n} tokens; this model's context is {} tokens", s.max_context),
        )
        .with_code("context_length_exceeded"));
    }
    let left = s.max_context - n;
    let max_tokens = match req.max_tokens {
        Some(m) if m > left => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!("{n} prompt tokens + max_tokens {m} is past this model's context of {} tokens", s.max_context),
            )
            .with_code("context_length_exceeded"));
        }
        Some(m) => m,
        None => s.default_max_tokens.min(left),
    };
    let (tx, mut rx) = unbounded_channel();
    let job = Job { prompt, selector, max_tokens, sampling: req.sampling, stop: req.stop.clone(), events: tx };
    s.metrics.queue_depth.fetch_add(1, Relaxed);
    match s.jobs.try_send(job) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            s.metrics.queue_depth.fetch_sub(1, Relaxed);
            Metrics::add(&s.metrics.rejected, 1);
            return Err(ApiError::overloaded(s.queue));
        }
        Err(TrySendError::Disconnected(_)) => {
            s.metrics.queue_depth.fetch_sub(1, Relaxed);
            return Err(ApiError::internal("the engine has stopped").with_status(StatusCode::SERVICE_UNAVAILABLE));
        }
    }
    // Wait for the prompt to be in, so that a failure there is answered with its status.
    let (prompt_tokens, cached_tokens) = match rx.recv().await {
        Some(Event::Started { prompt_tokens, cached_tokens }) => (prompt_tokens, cached_tokens),
        Some(Event::Failed(e)) => return Err(e),
        _ => return Err(ApiError::internal("the engine dropped the request")),
    };
    let id = s.next_id.fetch_add(1, Relaxed);
    let meta = Meta {
        id: match endpoint {
            Endpoint::Chat => format!("chatcmpl-{id}"),
            Endpoint::Completion => format!("cmpl-{id}"),
        },
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        model: s.model_id.clone(),
        endpoint,
        prompt_tokens,
        cached_tokens,
    };
    if req.stream {
        return Ok(stream_response(meta, req, rx).into_response());
    }
    let (mut text, mut finish) = (String::new(), None);
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Finished { reason, completion_tokens, token_ids, selector } => {
                finish = Some((reason, completion_tokens, token_ids, selector));
                break;
            }
            Event::Failed(e) => return Err(e),
            Event::Started { .. } => {}
        }
    }
    let Some((reason, completion_tokens, token_ids, selector)) = finish else {
        return Err(ApiError::internal("the engine dropped the request"));
    };
    let choice = match endpoint {
        Endpoint::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": reason.as_str(),
        }),
        Endpoint::Completion => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": reason.as_str()}),
    };
    let mut body = meta.envelope(false);
    body["choices"] = json!([choice]);
    body["usage"] = meta.usage(completion_tokens);
    // needle's own: the generated ids and the selector that ran (`auto` resolved).
    body["needle"] = json!({"token_ids": token_ids, "selector": selector});
    Ok(Json(body).into_response())
}

/// What every response and chunk of one request repeats.
struct Meta {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
    prompt_tokens: usize,
    cached_tokens: usize,
}

impl Meta {
    fn envelope(&self, chunk: bool) -> Value {
        let object = match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "system_fingerprint": null})
    }

    fn usage(&self, completion_tokens: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        })
    }

    /// One chunk: `text` as a delta (chat) or text (completions), with a finish reason or not.
    fn chunk(&self, text: Option<&str>, finish: Option<&str>, first: bool) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let mut delta = json!({});
                if first {
                    delta["role"] = json!("assistant");
                }
                if let Some(t) = text {
                    delta["content"] = json!(t);
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Endpoint::Completion => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        };
        let mut c = self.envelope(true);
        c["choices"] = json!([choice]);
        c
    }
}

/// OpenAI's stream: chunks as server-sent events, then `data: [DONE]`. Dropping it (the client
/// went away) drops the receiver, and the engine cancels the sequence before its next step.
fn stream_response(meta: Meta, req: Request, rx: UnboundedReceiver<Event>) -> impl IntoResponse {
    enum St {
        Open(UnboundedReceiver<Event>, bool),
        Done,
    }
    let meta = Arc::new(meta);
    let include_usage = req.include_usage;
    let data = |v: Value| Sse::default().data(v.to_string());
    let events = stream::unfold(St::Open(rx, true), move |st| {
        let meta = meta.clone();
        async move {
            let St::Open(mut rx, first) = st else { return None };
            let out: Vec<Sse> = match rx.recv().await {
                Some(Event::Text(t)) => vec![data(meta.chunk(Some(&t), None, first))],
                Some(Event::Finished { reason, completion_tokens, .. }) => {
                    let mut v =
                        vec![data(meta.chunk(if first { Some("") } else { None }, Some(reason.as_str()), first))];
                    if include_usage {
                        let mut u = meta.envelope(true);
                        u["choices"] = json!([]);
                        u["usage"] = meta.usage(completion_tokens);
                        v.push(data(u));
                    }
                    v.push(Sse::default().data("[DONE]"));
                    return Some((v, St::Done));
                }
                Some(Event::Failed(e)) => return Some((vec![data(e.body()), Sse::default().data("[DONE]")], St::Done)),
                Some(Event::Started { .. }) => Vec::new(),
                None => {
                    let e = ApiError::internal("the engine dropped the request");
                    return Some((vec![data(e.body())], St::Done));
                }
            };
            let first = first && out.is_empty();
            Some((out, St::Open(rx, first)))
        }
    });
    let flat = events.flat_map(|v| stream::iter(v.into_iter().map(Ok::<_, Infallible>)));
    sse(flat)
}

fn sse<S: Stream<Item = Result<Sse, Infallible>> + Send + 'static>(s: S) -> impl IntoResponse {
    axum::response::Sse::new(s).keep_alive(KeepAlive::default())
}
