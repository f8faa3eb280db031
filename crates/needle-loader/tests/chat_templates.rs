//! Chat templates rendered by minijinja against jinja2's renders (what `transformers` runs),
//! stored in tests/fixtures/families/<family>.json by tests/reference/make_family_fixtures.py.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use needle_loader::{ChatTemplate, Message, open};
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/families")
}

fn cases(family: &str) -> Vec<(Vec<Message>, String)> {
    let p = dir().join(format!("{family}.json"));
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    fx["chat"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let msgs = c["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
                .collect();
            (msgs, c["rendered"].as_str().unwrap().to_string())
        })
        .collect()
}

#[test]
fn templates_render_as_jinja2_does() {
    for family in ["llama3", "qwen2", "qwen3", "mistral"] {
        let t = ChatTemplate::from_tokenizer_config(&dir().join(format!("{family}-hf/tokenizer_config.json")))
            .unwrap()
            .unwrap();
        for (msgs, want) in cases(family) {
            assert_eq!(t.render(&msgs, true).unwrap(), want, "{family} (tokenizer_config.json)");
        }
    }
}

#[test]
fn gguf_tokenizers_use_their_template() {
    for family in ["llama3", "qwen2", "qwen3", "mistral"] {
        let tok = open(&dir().join(format!("{family}.gguf"))).unwrap().tokenizer().unwrap();
        let t = tok.chat_template().unwrap();
        for (msgs, want) in cases(family) {
            assert_eq!(t.render(&msgs, true).unwrap(), want, "{family} (GGUF)");
        }
        // The one-question prompt the CLI's --chat builds is the template's.
        let (msgs, want) = cases(family).pop().unwrap();
        if family == "mistral" {
            continue; // its template takes the system text into the first [INST] (checked above)
        }
        assert_eq!(tok.chat_prompt(Some(&msgs[0].content), &msgs[1].content), want, "{family}");
    }
    // Llama 3's template prints <|begin_of_text|>: encoding with specials adds no second BOS.
    let tok = open(&dir().join("llama3.gguf")).unwrap().tokenizer().unwrap();
    let bos = tok.bos_id().unwrap();
    let ids = tok.encode(&tok.chat_prompt(None, "hi"), true).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == bos).count(), 1, "{ids:?}");
    assert_eq!(tok.encode("hi", true).unwrap()[0], bos);
}

#[test]
fn mistral_template_refuses_non_alternating_roles() {
    let t = ChatTemplate::from_tokenizer_config(&dir().join("mistral-hf/tokenizer_config.json")).unwrap().unwrap();
    let e = t.render(&[Message::new("user", "a"), Message::new("user", "b")], true).unwrap_err();
    assert!(e.to_string().contains("alternate"), "{e}");
}

#[test]
fn no_template_is_chatml() {
    let dir = tempfile::tempdir().unwrap();
    assert!(ChatTemplate::from_tokenizer_config(&dir.path().join("tokenizer_config.json")).unwrap().is_none());
    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"eos_token": "</s>"}"#).unwrap();
    assert!(ChatTemplate::from_tokenizer_config(&dir.path().join("tokenizer_config.json")).unwrap().is_none());
}
