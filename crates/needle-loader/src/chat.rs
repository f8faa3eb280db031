//! A model's own chat template (Jinja, from GGUF `tokenizer.chat_template` or
//! `tokenizer_config.json`), rendered with minijinja as `transformers` renders it.

use std::path::Path;

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value, context};
use serde::Serialize;

use crate::{Error, Result};

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message of `role` saying `content`.
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// A chat template with the special-token texts it may print (`bos_token`, `eos_token`).
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    source: String,
    bos: String,
    eos: String,
    /// Where the template came from, for errors.
    origin: String,
}

impl ChatTemplate {
    /// A template from its Jinja `source`; `bos`/`eos` are the texts of those tokens (empty when
    /// the model has none). The template is compiled here, so a syntax error shows at load.
    pub fn new(source: &str, bos: &str, eos: &str, origin: &str) -> Result<Self> {
        let t = Self { source: source.into(), bos: bos.into(), eos: eos.into(), origin: origin.into() };
        t.env().template_from_str(&t.source).map_err(|e| t.err(&e))?;
        Ok(t)
    }

    /// The template of a `tokenizer_config.json` (`chat_template` as a string, or a list of
    /// `{name, template}` of which `default` is taken), with its `bos_token`/`eos_token`
    /// (strings or `{"content": …}` objects). `Ok(None)` when the file or the key is absent.
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<Self>> {
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Json { path: path.into(), source: e })?;
        let source = match &json["chat_template"] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(list) => {
                let named = |n: &str| list.iter().find(|t| t["name"] == n).and_then(|t| t["template"].as_str());
                match named("default") {
                    Some(s) => s.to_string(),
                    None => return Ok(None),
                }
            }
            _ => return Ok(None),
        };
        let token = |key: &str| match &json[key] {
            serde_json::Value::String(s) => s.clone(),
            v => v["content"].as_str().unwrap_or_default().to_string(),
        };
        Self::new(&source, &token("bos_token"), &token("eos_token"), &path.display().to_string()).map(Some)
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    fn err(&self, e: &JinjaError) -> Error {
        Error::ChatTemplate { origin: self.origin.clone(), reason: format!("{e:#}") }
    }

    /// `transformers`' settings: blocks trimmed and left-stripped, Python string methods
    /// (`strip`, `split`, `startswith`, …), `raise_exception` and `strftime_now`.
    fn env(&self) -> Environment<'static> {
        let mut env = Environment::new();
        // Only custom delimiters can fail to build; these are the defaults.
        if let Ok(syntax) = SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build() {
            env.set_syntax(syntax);
        }
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| strftime_now(&fmt));
        env
    }

    /// The prompt for `messages`; with `add_generation_prompt` it ends where the assistant's
    /// answer starts. A template that raises (a role it does not allow) is an error naming it.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let env = self.env();
        let tpl = env.template_from_str(&self.source).map_err(|e| self.err(&e))?;
        tpl.render(context! {
            messages => Value::from(
                messages.iter().map(|m| context! { role => m.role.as_str(), content => m.content.as_str() }).collect::<Vec<_>>()
            ),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.as_str(),
            eos_token => self.eos.as_str(),
        })
        .map_err(|e| self.err(&e))
    }
}

/// Today's date (UTC) in the few `strftime` codes chat templates use (`%d %b %Y`, `%B`, `%m`,
/// `%y`, `%%`).
fn strftime_now(fmt: &str) -> std::result::Result<String, JinjaError> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('b') => out.push_str(&month[..3]),
            Some('B') => out.push_str(month),
            Some('%') => out.push('%'),
            other => {
                return Err(JinjaError::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported code %{}", other.map(String::from).unwrap_or_default()),
                ));
            }
        }
    }
    Ok(out)
}

/// (year, month 1..=12, day) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_783), (2024, 3, 1));
        assert_eq!(civil_from_days(20_788), (2026, 12, 1));
    }

    #[test]
    fn python_methods_raise_and_errors() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}{{ m.content.strip().upper() }}|{% endfor %}\
             {% if add_generation_prompt %}>{% endif %}",
            "<s>",
            "</s>",
            "test",
        )
        .unwrap();
        let msgs = [Message::new("user", "  hi  "), Message::new("assistant", "ok")];
        assert_eq!(t.render(&msgs, true).unwrap(), "<s>HI|OK|>");
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}", "", "", "test").unwrap();
        let e = t.render(&msgs, true).unwrap_err();
        assert!(matches!(e, Error::ChatTemplate { .. }) && e.to_string().contains("no system role"), "{e}");
        assert!(matches!(ChatTemplate::new("{% if %}", "", "", "bad"), Err(Error::ChatTemplate { .. })));
        let date = strftime_now("%d %b %Y").unwrap();
        assert_eq!(date.len(), 11, "{date}");
        assert!(strftime_now("%Q").is_err());
    }
}
