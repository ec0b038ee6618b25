//! Log lines in the Python gateway's JSON shape (gateway/modelendpoint_gateway/logs.py):
//! `ts`, `level`, `logger`, `msg`, then the fields; one request line per request
//! with the same fields, never a prompt, a header or a key.

use std::io::Write;
use std::time::SystemTime;

use serde::Serialize;
use serde_json::{Map, Value};

fn timestamp() -> String {
    let now = time::OffsetDateTime::from(SystemTime::now());
    format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z", now.year(), u8::from(now.month()), now.day(), now.hour(),
            now.minute(), now.second(), now.millisecond())
}

fn write_line(value: &impl Serialize) {
    if let Ok(mut line) = serde_json::to_vec(value) {
        line.push(b'\n');
        let _ = std::io::stdout().lock().write_all(&line);
    }
}

#[derive(Serialize)]
struct Head<'a> {
    ts: String,
    level: &'a str,
    logger: &'a str,
    msg: &'a str,
}

/// A notable event (not a request).
pub fn event(level: &str, msg: &str, fields: &[(&str, String)]) {
    let mut line = Map::new();
    let head = Head { ts: timestamp(), level, logger: "modelendpoint_gateway.dataplane", msg };
    if let Ok(Value::Object(h)) = serde_json::to_value(head) {
        line.extend(h);
    }
    for (k, v) in fields {
        line.insert(k.to_string(), Value::String(v.clone()));
    }
    write_line(&line);
}

fn ms(seconds: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (seconds * 1000.0 * scale).round() / scale
}

#[derive(Serialize)]
pub struct Request<'a> {
    ts: String,
    level: &'static str,
    logger: &'static str,
    msg: &'static str,
    method: &'a str,
    route: &'a str,
    status: u16,
    latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replica: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttfb_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_code: Option<&'a str>,
}

fn cut(s: &str, limit: usize) -> &str {
    match s.char_indices().nth(limit) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[allow(clippy::too_many_arguments)]
pub fn request(method: &str, route: &str, status: u16, latency_s: f64, model: &str, replica: Option<&str>,
               ttfb_s: Option<f64>, attempts: u32, stream: bool, error_code: Option<&str>) {
    write_line(&Request {
        ts: timestamp(), level: "info", logger: "modelendpoint_gateway.access", msg: "request",
        method: cut(method, 20), route: cut(route, 200), status, latency_ms: ms(latency_s, 2),
        model: Some(cut(model, 200)), replica, ttfb_ms: ttfb_s.map(|t| ms(t, 2)),
        attempts: if attempts > 0 { Some(attempts) } else { None }, stream: Some(stream), error_code,
    });
}
