//! Chat templates: the model's own Jinja template (GGUF `tokenizer.chat_template`, or a
//! Hugging Face folder's `tokenizer_config.json` / `chat_template.jinja`), rendered with
//! minijinja and its Python-compatibility methods (`.strip()`, `.startswith()`, ... that HF
//! templates use). Models without one (our own checkpoints) get a plain "role: content" form.

use crate::data::Tokenizer;
use crate::{Error, Result};
use minijinja::{context, Environment};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// For models that carry no template: one "role: content" line per message.
pub const PLAIN_TEMPLATE: &str = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}\
{% if add_generation_prompt %}assistant:{% endif %}";

/// End-of-turn markers that templates use; a chat reply stops at the first of them the
/// template contains (as a single token of the tokenizer).
const END_OF_TURN: &[&str] = &["<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>", "<|endoftext|>"];

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where it came from, for `itt serve`'s start-up line.
    pub origin: String,
    pub bos: String,
    pub eos: String,
    /// Token ids that end a reply.
    pub stop_ids: Vec<u32>,
    /// Text that ends a reply (for tokenizers without single-token markers).
    pub stop_text: Vec<String>,
}

impl ChatTemplate {
    /// The template of the model at `model_path` (a GGUF file or a model folder), `override_file`
    /// when given, else the plain one.
    pub fn find(model_path: &Path, override_file: Option<&Path>, tok: &Tokenizer) -> Result<Self> {
        let (source, origin) = match override_file {
            Some(f) => {
                (std::fs::read_to_string(f).map_err(|e| Error::input(f, e.to_string()))?, f.display().to_string())
            }
            None => match stored_template(model_path)? {
                Some((t, o)) => (t, o),
                None => {
                    (PLAIN_TEMPLATE.to_string(), "plain role: content lines (the model has no chat template)".into())
                }
            },
        };
        Self::new(&source, origin, tok)
    }

    pub fn new(source: &str, origin: String, tok: &Tokenizer) -> Result<Self> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::usage(format!("the chat template ({origin}) does not parse: {}", one_line(&e))))?;
        let eos = tok.token_text(tok.eot_id());
        let mut stop_ids = vec![];
        let mut stop_text = vec![];
        for m in END_OF_TURN {
            if source.contains(m) {
                match tok.hf().and_then(|h| h.token_to_id(m)) {
                    Some(id) => stop_ids.push(id),
                    None => stop_text.push(m.to_string()),
                }
            }
        }
        if source == PLAIN_TEMPLATE {
            // The next turn's "user:" ends the reply.
            stop_text.push("\nuser:".into());
        }
        let bos = tok.hf().and_then(|h| h.id_to_token(1)).filter(|t| t.starts_with('<')).unwrap_or_default();
        Ok(ChatTemplate { env, origin, bos, eos, stop_ids, stop_text })
    }

    /// The prompt for `messages`, ending where the assistant's reply begins.
    pub fn render(&self, messages: &[Message]) -> Result<String> {
        let t = self.env.get_template("chat").map_err(|e| Error::usage(one_line(&e)))?;
        t.render(context! { messages => messages, add_generation_prompt => true, bos_token => self.bos, eos_token => self.eos })
            .map_err(|e| Error::usage(format!("the chat template failed on these messages: {}", one_line(&e))))
    }
}

fn one_line(e: &minijinja::Error) -> String {
    e.to_string().lines().next().unwrap_or("").to_string()
}

/// The chat template stored with a model, and where it was found.
fn stored_template(path: &Path) -> Result<Option<(String, String)>> {
    if path.is_file() {
        let mut f = std::fs::File::open(path).map_err(|e| Error::input(path, e.to_string()))?;
        let Ok(content) = candle_core::quantized::gguf_file::Content::read(&mut f) else { return Ok(None) };
        return Ok(content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok().cloned())
            .map(|t| (t, format!("{} (tokenizer.chat_template)", path.display()))));
    }
    let jinja = path.join("chat_template.jinja");
    if jinja.is_file() {
        let t = std::fs::read_to_string(&jinja).map_err(|e| Error::input(&jinja, e.to_string()))?;
        return Ok(Some((t, jinja.display().to_string())));
    }
    let cfg = path.join("tokenizer_config.json");
    if let Ok(text) = std::fs::read_to_string(&cfg) {
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::input(&cfg, e.to_string()))?;
        let t = match v.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(String::from)),
            _ => None,
        };
        return Ok(t.map(|t| (t, format!("{} (chat_template)", cfg.display()))));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_hf_style_templates_and_finds_the_end_of_turn() {
        let tok = Tokenizer::char_from_text("abc");
        let smol = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}\
{{ '<|im_start|>system\\nYou are helpful<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + \
message['content'].strip() + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}\
{{ '<|im_start|>assistant\\n' }}{% endif %}";
        let t = ChatTemplate::new(smol, "test".into(), &tok).unwrap();
        let msgs = vec![Message { role: "user".into(), content: " Hi \n".into() }];
        assert_eq!(
            t.render(&msgs).unwrap(),
            "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        // The char tokenizer has no <|im_end|> token: the reply stops at the text.
        assert_eq!(t.stop_text, vec!["<|im_end|>".to_string()]);
        let plain = ChatTemplate::new(PLAIN_TEMPLATE, "plain".into(), &tok).unwrap();
        assert_eq!(plain.render(&msgs).unwrap(), "user:  Hi \n\nassistant:");
        let raising = "{{ raise_exception('only user and assistant roles') }}";
        let e = ChatTemplate::new(raising, "r".into(), &tok).unwrap().render(&msgs).unwrap_err().to_string();
        assert!(e.contains("only user and assistant roles") && !e.contains('\n'), "{e}");
        assert!(ChatTemplate::new("{% for %}", "bad".into(), &tok).is_err());
    }
}
