//! The prefix key of a request, for PrefixHash balancing: the port of
//! `modelendpoint_gateway/prefix.py`.
//!
//! Both data planes must give a body the same key (they share a ring). Where
//! Python's rules lean on its own conversions (`str()` of a non-string role, a
//! float among token ids, a bool taken for an int), this side does not guess:
//! it returns `Err(Defer)` and the request goes to the Python gateway, which
//! answers it by its own rules. Shared test vectors keep the two in step.

use serde_json::{Map, Value};

/// The Python gateway decides this request (its key would need Python's conversions).
#[derive(Debug, PartialEq, Eq)]
pub struct Defer;

const ROLE_SEP: char = '\u{1f}';
const MSG_SEP: char = '\u{1e}';

/// Python's truth value of a JSON value.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// The first `limit` characters (code points, as Python slices) of `s`.
fn cut(s: &str, limit: usize) -> &str {
    match s.char_indices().nth(limit) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn char_len(s: &str) -> usize {
    s.chars().count()
}

/// Python's `a or b or c`: the first truthy value, else the last.
fn first_truthy<'a>(o: &'a Map<String, Value>, keys: &[&str]) -> Option<&'a Value> {
    let mut last = None;
    for k in keys {
        last = o.get(*k);
        if let Some(v) = last {
            if truthy(v) {
                return Some(v);
            }
        }
    }
    last
}

fn text(content: Option<&Value>, out: &mut String) {
    match content {
        Some(Value::String(s)) => out.push_str(s),
        Some(Value::Array(parts)) => {
            for part in parts {
                match part {
                    Value::String(s) => out.push_str(s),
                    Value::Object(p) => {
                        if let Some(Value::String(t)) = p.get("text") {
                            out.push_str(t);
                            continue;
                        }
                        for k in ["image_url", "input_audio", "file", "source"] {
                            let mut r = p.get(k);
                            if let Some(Value::Object(inner)) = r {
                                r = first_truthy(inner, &["url", "file_id", "data"]);
                            }
                            if let Some(Value::String(s)) = r {
                                out.push_str(cut(s, 256));
                                break;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

fn role(v: Option<&Value>) -> Result<&str, Defer> {
    match v {
        Some(Value::String(s)) => Ok(s),
        Some(other) if truthy(other) => Err(Defer), // Python's str() of it
        _ => Ok(""),
    }
}

fn messages_key(messages: &[Value], limit: usize, system: Option<&Value>) -> Result<String, Defer> {
    let mut out = String::new();
    let mut size = 0;
    if let Some(s) = system.filter(|s| !s.is_null()) {
        let start = out.len();
        out.push_str("system");
        out.push(ROLE_SEP);
        text(Some(s), &mut out);
        out.push(MSG_SEP);
        size += char_len(&out[start..]);
    }
    for m in messages {
        if size >= limit {
            break;
        }
        let start = out.len();
        if let Value::Object(o) = m {
            out.push_str(role(o.get("role"))?);
            out.push(ROLE_SEP);
            text(o.get("content"), &mut out);
        } else {
            text(Some(m), &mut out);
        }
        out.push(MSG_SEP);
        size += char_len(&out[start..]);
    }
    Ok(cut(&out, limit).to_string())
}

fn token_text(t: &Value) -> Result<String, Defer> {
    match t {
        Value::Number(n) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        _ => Err(Defer),
    }
}

fn is_token(t: &Value) -> Result<bool, Defer> {
    match t {
        Value::Bool(_) => Err(Defer), // an int to Python
        Value::Number(n) => if n.is_i64() || n.is_u64() { Ok(true) } else { Err(Defer) },
        _ => Ok(false),
    }
}

fn join_tokens(tokens: &[Value], limit: usize) -> Result<String, Defer> {
    let parts = tokens.iter().take(limit).map(token_text).collect::<Result<Vec<_>, _>>()?;
    Ok(cut(&parts.join(","), limit).to_string())
}

fn prompt_key(prompt: Option<&Value>, limit: usize) -> Result<Option<String>, Defer> {
    let mut prompt = prompt;
    if let Some(Value::Array(list)) = prompt {
        if !list.is_empty() {
            let mut all_tokens = true;
            for t in list.iter().take(limit) {
                if !is_token(t)? {
                    all_tokens = false;
                }
            }
            if all_tokens {
                return Ok(Some(join_tokens(list, limit)?));
            }
            prompt = list.first();
            if let Some(Value::Array(inner)) = prompt {
                return Ok(Some(join_tokens(inner, limit)?));
            }
        }
    }
    match prompt {
        Some(Value::String(s)) => Ok(Some(cut(s, limit).to_string())),
        _ => Ok(None),
    }
}

/// The prefix key of a request body, or None when it carries no prompt.
pub fn prefix_key(body: &Map<String, Value>, limit: usize) -> Result<Option<String>, Defer> {
    if let Some(Value::Array(messages)) = body.get("messages") {
        if !messages.is_empty() {
            return messages_key(messages, limit, body.get("system")).map(Some);
        }
    }
    let inp = body.get("input");
    if let Some(Value::Array(items)) = inp {
        if matches!(items.first(), Some(Value::Object(_))) {
            return messages_key(items, limit, body.get("instructions")).map(Some);
        }
    }
    if let Some(Value::String(s)) = inp {
        if body.get("instructions").is_some_and(|v| !v.is_null()) {
            let msg = serde_json::json!({"role": "user", "content": s});
            return messages_key(std::slice::from_ref(&msg), limit, body.get("instructions")).map(Some);
        }
    }
    for field in ["prompt", "input"] {
        if let Some(key) = prompt_key(body.get(field), limit)? {
            if !key.is_empty() {
                return Ok(Some(key));
            }
        }
    }
    Ok(None)
}
