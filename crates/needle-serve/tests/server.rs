//! The server on a loopback port, driven by an HTTP client as a user's would: answers in
//! OpenAI's formats, streaming and not; a cached prefix (in memory or loaded from disk after a
//! restart) gives the greedy tokens a fresh prefill gives; concurrent requests each get their
//! own answer; bad requests are answered with OpenAI's errors and never stop the server.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use needle_serve::{ServeConfig, Server};
use serde_json::{Value, json};

fn config() -> ServeConfig {
    let model = needle_fetch::ensure_default_model().expect("the default model (cargo xtask fetch-model)");
    let mut c = ServeConfig::new(model);
    c.model_id = Some("smollm2".into());
    c.cache_min_tokens = 256;
    c
}

async fn start(cfg: ServeConfig) -> (Server, String) {
    let s = Server::start(cfg, SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    let base = format!("http://{}", s.addr());
    (s, base)
}

/// A document of about `n` tokens from the default document, ending in a blank line's cut.
fn document(words: usize) -> String {
    let text = std::fs::read_to_string(needle_fetch::ensure_default_document().unwrap()).unwrap();
    let start = text.find("In the beginning").unwrap_or(0);
    text[start..].split_whitespace().take(words).collect::<Vec<_>>().join(" ")
}

async fn post(base: &str, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(format!("{base}{path}")).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn ask(doc: &str, q: &str) -> Value {
    json!({"model": "smollm2", "messages": [{"role": "user", "content": format!("{doc}\n\n{q}")}],
           "temperature": 0, "max_tokens": 12})
}

fn ids(v: &Value) -> Vec<u64> {
    v["needle"]["token_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

async fn metric(base: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap();
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or(f64::NAN)
}

/// The SSE `data:` payloads of a streamed answer.
async fn stream(base: &str, path: &str, body: Value) -> Vec<String> {
    let r = reqwest::Client::new().post(format!("{base}{path}")).json(&body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().await.unwrap();
    text.lines().filter_map(|l| l.strip_prefix("data: ").map(String::from)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_in_openai_formats_streaming_and_not() {
    let (server, base) = start(config()).await;
    let health: Value = reqwest::get(format!("{base}/health")).await.unwrap().json().await.unwrap();
    assert_eq!(health["status"], "ok");
    let models: Value = reqwest::get(format!("{base}/v1/models")).await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "smollm2");

    let body = json!({"model": "smollm2", "messages": [{"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the capital of France?"}], "temperature": 0, "max_tokens": 10});
    let (status, v) = post(&base, "/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(!answer.is_empty());
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let u = &v["usage"];
    assert_eq!(u["total_tokens"], u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap());
    assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 0);

    let mut s = body.clone();
    s["stream"] = json!(true);
    s["stream_options"] = json!({"include_usage": true});
    let chunks = stream(&base, "/v1/chat/completions", s).await;
    assert_eq!(chunks.last().map(String::as_str), Some("[DONE]"));
    let parsed: Vec<Value> = chunks[..chunks.len() - 1].iter().map(|c| serde_json::from_str(c).unwrap()).collect();
    assert!(parsed.iter().all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(parsed[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String =
        parsed.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<Vec<_>>().concat();
    assert_eq!(streamed, answer, "the stream's deltas are the answer");
    let finish = parsed.iter().filter_map(|c| c["choices"][0]["finish_reason"].as_str()).collect::<Vec<_>>();
    assert_eq!(finish.len(), 1);
    assert_eq!(parsed.last().unwrap()["usage"], v["usage"], "the usage chunk comes last");

    let (status, v) = post(
        &base,
        "/v1/completions",
        json!({"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0}),
    )
    .await;
    assert_eq!((status, v["object"].as_str()), (200, Some("text_completion")), "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    let chunks = stream(
        &base,
        "/v1/completions",
        json!({"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0, "stream": true}),
    )
    .await;
    let streamed: String = chunks[..chunks.len() - 1]
        .iter()
        .map(|c| serde_json::from_str::<Value>(c).unwrap()["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(streamed, text);
    // A stop string cuts the answer before it.
    let (_, v) = post(
        &base,
        "/v1/completions",
        json!({"prompt": "1, 2, 3, 4,", "max_tokens": 20, "temperature": 0, "stop": [" 7"]}),
    )
    .await;
    let t = v["choices"][0]["text"].as_str().unwrap();
    assert!(!t.contains(" 7") && v["choices"][0]["finish_reason"] == "stop", "{v}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_prefix_answers_as_a_fresh_prefill_does_in_memory_and_after_a_restart() {
    let doc = document(1200);
    let dir = tempfile::tempdir().unwrap();
    // Fresh: nothing cached, the prefix prefilled in the request.
    let mut fresh_cfg = config();
    fresh_cfg.cache_bytes = 0;
    let (fresh, base) = start(fresh_cfg).await;
    let (_, want) = post(&base, "/v1/chat/completions", ask(&doc, "Who made the heaven and the earth?")).await;
    assert_eq!(want["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    fresh.shutdown().await.unwrap();

    let mut cfg = config();
    cfg.context_dir = Some(dir.path().to_path_buf());
    let (server, base) = start(cfg.clone()).await;
    let (_, first) = post(&base, "/v1/chat/completions", ask(&doc, "What did God divide?")).await;
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let (_, second) = post(&base, "/v1/chat/completions", ask(&doc, "Who made the heaven and the earth?")).await;
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(cached > 1000 && cached < second["usage"]["prompt_tokens"].as_u64().unwrap(), "{second}");
    assert_eq!(ids(&second), ids(&want), "from the cache: the fresh prefill's greedy tokens");
    assert_eq!(metric(&base, "needle_cache_hits_total").await, 1.0);
    server.shutdown().await.unwrap();

    // A restart reads the context directory back (each file checked) and answers from it.
    let (server, base) = start(cfg).await;
    let (_, again) = post(&base, "/v1/chat/completions", ask(&doc, "Who made the heaven and the earth?")).await;
    assert_eq!(again["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(), Some(cached));
    assert_eq!(ids(&again), ids(&want), "loaded from disk: the fresh prefill's greedy tokens");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_each_get_the_answer_they_get_alone() {
    let (server, base) = start(config()).await;
    let prompts: Vec<String> =
        ["The capital of France is", "Water boils at", "The first book of the Bible is", "One, two,"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let body = |p: &str| json!({"prompt": p, "max_tokens": 16, "temperature": 0});
    let mut alone = Vec::new();
    for p in &prompts {
        alone.push(ids(&post(&base, "/v1/completions", body(p)).await.1));
    }
    let together =
        futures_util::future::join_all(prompts.iter().map(|p| post(&base, "/v1/completions", body(p)))).await;
    for (i, (status, v)) in together.iter().enumerate() {
        assert_eq!(*status, 200);
        assert_eq!(ids(v), alone[i], "prompt {i} in a batch");
    }
    assert!(metric(&base, "needle_decode_steps_total").await < metric(&base, "needle_decode_tokens_total").await);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_and_the_server_lives_on() {
    let spill = tempfile::tempdir().unwrap();
    let mut cfg = config();
    cfg.max_context = Some(300);
    cfg.parallel = 1;
    cfg.queue = 1;
    cfg.spill_dir = spill.path().to_path_buf();
    cfg.kv_budget = Some("host=1MiB".parse().unwrap());
    let (server, base) = start(cfg).await;
    let client = reqwest::Client::new();
    let chat = format!("{base}/v1/chat/completions");
    let raw = |body: &'static str| client.post(&chat).header("content-type", "application/json").body(body).send();
    let r = raw("{not json").await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["error"]["type"].as_str(), v["error"]["code"].as_str()),
        (Some("invalid_request_error"), Some("invalid_json"))
    );
    let user = json!([{"role": "user", "content": "hi"}]);
    for (body, status, param, code) in [
        (json!({"messages": user, "temperature": "warm"}), 400, Some("temperature"), None),
        (json!({"messages": user, "model": "gpt-9"}), 404, Some("model"), Some("model_not_found")),
        (json!({"messages": user, "needle": {"selector": "psychic"}}), 400, Some("selector"), Some("unknown_selector")),
        (json!({"messages": user, "selector": "retrieval:k=oops"}), 400, Some("selector"), Some("unknown_selector")),
        (json!({"messages": user, "max_tokens": 1_000_000_000u64}), 400, Some("max_tokens"), None),
        (json!({"messages": user, "max_tokens": 290}), 400, Some("max_tokens"), Some("context_length_exceeded")),
        (
            json!({"messages": [{"role": "user", "content": "word ".repeat(400)}]}),
            400,
            Some("messages"),
            Some("context_length_exceeded"),
        ),
    ] {
        let (s, v) = post(&base, "/v1/chat/completions", body.clone()).await;
        assert_eq!(s, status, "{body} → {v}");
        assert_eq!((v["error"]["param"].as_str(), v["error"]["code"].as_str()), (param, code), "{body} → {v}");
        assert!(v["error"]["message"].as_str().unwrap().len() > 5);
    }
    let (s, v) = post(&base, "/v1/nothing", json!({})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("not_found")));

    // A client that goes away mid-stream: its sequence is cancelled and its memory freed.
    let long = json!({"prompt": "Count: 1, 2, 3,", "max_tokens": 250, "temperature": 0, "stream": true});
    let mut r = client.post(format!("{base}/v1/completions")).json(&long).send().await.unwrap();
    assert!(r.chunk().await.unwrap().is_some());
    drop(r);
    let t = Instant::now();
    while metric(&base, "needle_cancelled_total").await < 1.0 {
        assert!(t.elapsed() < Duration::from_secs(60), "the sequence was not cancelled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(&base, "needle_running_sequences").await, 0.0);

    // One sequence runs, one waits, the next is refused at once.
    let mut running = client.post(format!("{base}/v1/completions")).json(&long).send().await.unwrap();
    assert!(running.chunk().await.unwrap().is_some());
    let b = base.clone();
    let waiting =
        tokio::spawn(async move { post(&b, "/v1/completions", json!({"prompt": "Hi", "max_tokens": 2})).await });
    let t = Instant::now();
    while metric(&base, "needle_queue_depth").await < 1.0 {
        assert!(t.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (s, v) = post(&base, "/v1/completions", json!({"prompt": "Hi", "max_tokens": 2})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (503, Some("queue_full")), "{v}");
    drop(running);
    let (s, _) = waiting.await.unwrap();
    assert_eq!(s, 200, "the waiting request is answered once the first is gone");
    let (s, v) = post(&base, "/v1/completions", json!({"prompt": "Still alive?", "max_tokens": 3})).await;
    assert_eq!(s, 200, "{v}");
    let text = reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap();
    for line in [
        "needle_requests_total{status=\"400\"}",
        "needle_requests_total{status=\"503\"}",
        "needle_kv_bytes{tier=\"host\"}",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
    server.shutdown().await.unwrap();
    assert_eq!(std::fs::read_dir(spill.path()).unwrap().count(), 0, "nothing is left in the spill directory");
}
