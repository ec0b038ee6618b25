//! One client connection on the fast path: read a request, serve it if it is a
//! plain request for a name in the snapshot, else hand the connection over.
//!
//! The fast path takes HTTP/1.1 `POST /openai/v1/...` or `/v1/...` (not
//! `models`) with a `Content-Length` body within the limit, a JSON object whose
//! `model` the snapshot has, and a key that opens it (or none needed). The
//! request goes to a replica chosen as the Python gateway chooses (least
//! requests, or CHWBL on the prefix key); a connection failure or a 503 (for an
//! adapter also a 404) before any byte reached the client is tried on another
//! replica, up to `max_attempts`. The answer passes through as it arrives: a
//! chunked one re-framed read by read, a sized one byte for byte; while the
//! client's socket is full nothing more is read from the replica, and a client
//! that reads nothing for `write_timeout` is cut. A client that goes away (or
//! half-closes) closes the replica's connection, which stops its generation.
//!
//! Anything else (another method or route, HTTP/1.0, chunked or oversized
//! requests, `Expect`, upgrades, unparsable heads or bodies, unknown names, a
//! missing or wrong key, a prompt whose prefix key needs Python's conversions)
//! is handed to the Python gateway with the bytes read so far: it answers by its
//! own rules, errors in their shapes included.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::balance;
use crate::prefix;
use crate::snapshot::Model;
use crate::upstream::InFlight;
use crate::State;

const HOP_BY_HOP: [&str; 12] = ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
                                 "upgrade", "proxy-authenticate", "proxy-authorization", "content-length", "host",
                                 "expect"];
const MAX_HEADERS: usize = 128;
const MAX_UPSTREAM_HEAD: usize = 64 * 1024;
const MAX_KEPT_ANSWER: usize = 1024 * 1024; // a 503 kept aside while another replica is tried
const READ_SIZE: usize = 16 * 1024;

/// A request head, owned.
struct Head {
    method: String,
    target: Vec<u8>,
    version: u8,
    headers: Vec<(String, Vec<u8>)>, // names lower-case
    len: usize,
}

impl Head {
    fn get(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
    }
    fn count(&self, name: &str) -> usize {
        self.headers.iter().filter(|(k, _)| k == name).count()
    }
    fn path(&self) -> &[u8] {
        let end = self.target.iter().position(|b| *b == b'?').unwrap_or(self.target.len());
        &self.target[..end]
    }
}

enum Parsed {
    Head(Head),
    Partial,
    Invalid,
}

fn parse_head(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => Parsed::Head(Head {
            method: req.method.unwrap_or("").to_string(),
            target: req.path.unwrap_or("").as_bytes().to_vec(),
            version: req.version.unwrap_or(0),
            headers: req.headers.iter().map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec())).collect(),
            len,
        }),
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(_) => Parsed::Invalid,
    }
}

fn tokens(value: &[u8]) -> impl Iterator<Item = String> + '_ {
    value.split(|b| *b == b',').map(|t| String::from_utf8_lossy(t).trim().to_ascii_lowercase())
}

/// The names not forwarded: the fixed ones, and those a `Connection` header lists.
fn dropped(headers: &[(String, Vec<u8>)]) -> Vec<String> {
    let mut out: Vec<String> = HOP_BY_HOP.iter().map(|s| s.to_string()).collect();
    for (k, v) in headers {
        if k == "connection" {
            out.extend(tokens(v));
        }
    }
    out
}

/// The caller's key (`Authorization: Bearer`, else `x-api-key`), as the Python side reads it.
/// Err: a form only the Python side reads the same (several headers, bytes beyond printable ASCII).
fn presented_key(head: &Head) -> Result<Option<&[u8]>, ()> {
    if head.count("authorization") > 1 || head.count("x-api-key") > 1 {
        return Err(());
    }
    let printable = |t: &[u8]| t.iter().all(|b| (0x21..0x7f).contains(b));
    if let Some(auth) = head.get("authorization") {
        if let Some(space) = auth.iter().position(|b| *b == b' ') {
            if auth[..space].eq_ignore_ascii_case(b"bearer") {
                let token = trim(&auth[space + 1..]);
                if !token.is_empty() {
                    return if printable(token) { Ok(Some(token)) } else { Err(()) };
                }
            }
        }
        if !auth.is_ascii() {
            return Err(());
        }
    }
    if let Some(key) = head.get("x-api-key") {
        let token = trim(key);
        if !token.is_empty() {
            return if printable(token) { Ok(Some(token)) } else { Err(()) };
        }
    }
    Ok(None)
}

fn opens(model: &Model, head: &Head) -> bool {
    match &model.keys {
        None => true,
        Some(keys) => match presented_key(head) {
            Ok(Some(token)) => keys.contains(&<[u8; 32]>::from(Sha256::digest(token))),
            _ => false,
        },
    }
}

fn trim(t: &[u8]) -> &[u8] {
    let start = t.iter().position(|b| !b" \t".contains(b)).unwrap_or(t.len());
    let end = t.iter().rposition(|b| !b" \t".contains(b)).map_or(start, |e| e + 1);
    &t[start..end.max(start)]
}

/// What the fast path needs of a request it takes.
struct Job {
    model: Arc<Model>,
    name: String,
    adapter: bool,
    key: Option<String>,
    stream: bool,
    anthropic: bool,
}

/// The fast path's decision: Some(job), or None (hand the connection over).
fn decide(state: &State, head: &Head, body: &[u8]) -> Option<Job> {
    let path = std::str::from_utf8(head.path()).ok()?;
    let rest = path.strip_prefix("/openai/v1/").or_else(|| path.strip_prefix("/v1/"))?;
    if rest == "models" || rest.starts_with("models/") {
        return None;
    }
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(body) else { return None };
    let Some(Value::String(name)) = obj.get("model") else { return None };
    let snapshot = state.snapshot();
    let model = snapshot.names.get(name.as_str())?.clone();
    if !opens(&model, head) {
        return None;
    }
    let adapter = model.adapters.contains(name.as_str());
    let key = match &model.prefix_hash {
        Some(p) => match prefix::prefix_key(&obj, p.prefix_char_length) {
            Ok(Some(k)) if adapter => Some(format!("{name}\u{0}{k}")),
            Ok(k) => k,
            Err(prefix::Defer) => return None,
        },
        None => None,
    };
    Some(Job { model, name: name.clone(), adapter, key, stream: obj.get("stream") == Some(&Value::Bool(true)),
               anthropic: snapshot.anthropic(path) })
}

fn is_plain(head: &Head, max_body: usize) -> Option<usize> {
    if head.method != "POST" || head.version != 1 {
        return None;
    }
    for name in ["transfer-encoding", "expect", "upgrade"] {
        if head.get(name).is_some() {
            return None;
        }
    }
    if head.count("content-length") != 1 {
        return None;
    }
    let cl = head.get("content-length")?;
    if cl.is_empty() || !cl.iter().all(u8::is_ascii_digit) || cl.len() > 12 {
        return None;
    }
    let n: usize = std::str::from_utf8(cl).ok()?.parse().ok()?;
    (n <= max_body).then_some(n)
}

enum Next {
    Continue,
    Close,
}

/// Serve one client connection until it closes or is handed over.
pub async fn serve(state: Arc<State>, mut client: TcpStream, peer: SocketAddr) {
    let _ = client.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut drain = state.drain_signal();
    loop {
        // --- a request head ---
        let deadline = tokio::time::Instant::now() + state.config.client_idle();
        let head = loop {
            if !buf.is_empty() {
                match parse_head(&buf) {
                    Parsed::Head(h) if h.len <= state.config.max_header_bytes => break Some(h),
                    Parsed::Partial if buf.len() <= state.config.max_header_bytes => {}
                    _ => break None, // the Python side answers it (400, 431)
                }
            }
            buf.reserve(4096);
            tokio::select! {
                read = tokio::time::timeout_at(deadline, client.read_buf(&mut buf)) => match read {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return, // closed, broken, or idle / trickled too long
                    Ok(Ok(_)) => {}
                },
                _ = drain.changed(), if buf.is_empty() => return, // draining: idle keep-alive connections close
            }
        };
        let Some(head) = head else { return state.hand_over(client, buf) };
        let Some(length) = is_plain(&head, state.config.max_body_bytes) else { return state.hand_over(client, buf) };
        buf.reserve(head.len + length - buf.len().min(head.len + length));
        while buf.len() < head.len + length {
            match tokio::time::timeout(state.config.client_idle(), client.read_buf(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return, // an incomplete request: no answer
                Ok(Ok(_)) => {}
            }
        }
        let received = Instant::now();
        let body = buf[head.len..head.len + length].to_vec();
        let Some(job) = decide(&state, &head, &body) else { return state.hand_over(client, buf) };
        buf.drain(..head.len + length);
        match forward(&state, &mut client, &mut buf, peer, &head, body, job, received).await {
            Next::Continue if !state.draining() && !wants_close(&head) => {}
            _ => return,
        }
    }
}

fn wants_close(head: &Head) -> bool {
    head.headers.iter().any(|(k, v)| k == "connection" && tokens(v).any(|t| t == "close"))
}

fn upstream_head(head: &Head, replica_netloc: &str, peer: &SocketAddr, body_len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(&head.target);
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(replica_netloc.as_bytes());
    out.extend_from_slice(b"\r\n");
    let drop = dropped(&head.headers);
    let mut forwarded_for = Vec::new();
    for (k, v) in &head.headers {
        if drop.iter().any(|d| d == k) {
            continue;
        }
        if k == "x-forwarded-for" {
            forwarded_for.extend_from_slice(v);
            forwarded_for.extend_from_slice(b", ");
            continue;
        }
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    out.extend_from_slice(&forwarded_for);
    out.extend_from_slice(peer.ip().to_string().as_bytes());
    out.extend_from_slice(format!("\r\ncontent-length: {body_len}\r\n\r\n").as_bytes());
    out
}

/// How one try on one replica ended.
enum Outcome {
    /// Answered (completely, or cut after it started: never retried). keep: the client connection lives on.
    Done { status: u16, keep: bool, first_byte: Option<Instant>, error_code: Option<&'static str> },
    /// An answer with a status to try elsewhere, kept aside (status line and headers, body).
    Retry { status: u16, head: Vec<u8>, body: Vec<u8> },
    /// The connection failed before any byte of an answer.
    Failed { reused: bool },
    /// The client went away (or stopped reading): the replica's connection is closed.
    ClientGone { status: u16, first_byte: Option<Instant> },
}

#[allow(clippy::too_many_arguments)]
async fn forward(state: &State, client: &mut TcpStream, buf: &mut Vec<u8>, peer: SocketAddr, head: &Head,
                 body: Vec<u8>, job: Job, received: Instant) -> Next {
    let cfg = &state.config;
    let model = &job.model;
    let retry_on: &[u16] = if job.adapter { &[503, 404] } else { &[503] };
    let mut tried: Vec<usize> = Vec::new();
    let mut attempts: u32 = 0;
    let mut stale_retry = true;
    let mut skipped: Option<(u16, Vec<u8>, Vec<u8>)> = None;
    let mut replica_id: Option<String> = None;
    let route = String::from_utf8_lossy(head.path()).into_owned();
    let close = wants_close(head); // the client's Connection: close: our answer says so, then we close
    let finish = |status: u16, replica: Option<&str>, first: Option<Instant>, attempts: u32, code: Option<&str>| {
        let now = Instant::now();
        let ttfb = first.map(|f| f.duration_since(received).as_secs_f64());
        state.metrics.request(&model.served_name, status, now.duration_since(received).as_secs_f64(), ttfb);
        if cfg.access_log {
            crate::logline::request(&head.method, &route, status, now.duration_since(received).as_secs_f64(),
                                    &job.name, replica, ttfb, attempts, job.stream, code);
        }
    };
    loop {
        let choice = match &model.prefix_hash {
            Some(p) if job.key.is_some() => balance::chwbl(&p.ring, &model.replicas, job.key.as_deref().unwrap(),
                                                           p.mean_load_percentage, &tried),
            _ => balance::least_requests(&model.replicas, &tried, model.rotation.next()),
        };
        let Some(index) = choice else { break };
        if attempts >= cfg.max_attempts {
            break;
        }
        attempts += 1;
        let replica = model.replicas[index].clone();
        replica_id = Some(replica.id.clone());
        let _counted = InFlight::new(replica.clone());
        state.metrics.in_flight(&model.served_name, 1);
        let result = async {
            let (conn, reused) = match replica.connect(cfg.connect_timeout(), cfg.upstream_idle()).await {
                Ok(c) => c,
                Err(_) => return None,
            };
            if !reused {
                state.metrics.upstream_connections.inc();
            }
            let can_retry = attempts < cfg.max_attempts
                && (0..model.replicas.len()).any(|i| i != index && !tried.contains(&i));
            let retry_now: &[u16] = if can_retry { retry_on } else { &[] };
            let request = upstream_head(head, &replica.netloc, &peer, body.len());
            Some(exchange(state, client, buf, conn, reused, &request, &body, &replica, retry_now,
                          job.anthropic, close).await)
        }.await;
        state.metrics.in_flight(&model.served_name, -1);
        match result {
            None => {
                tried.push(index);
                state.metrics.retry(&model.served_name, "connect");
                crate::logline::event("warning", "replica unreachable", &[
                    ("model", model.served_name.clone()), ("replica", replica.id.clone())]);
            }
            Some(Outcome::Failed { reused }) if reused && stale_retry => {
                stale_retry = false;
                attempts -= 1; // the pool's stale connection, not the replica's failure
            }
            Some(Outcome::Failed { .. }) => {
                tried.push(index);
                state.metrics.retry(&model.served_name, "connection");
                crate::logline::event("warning", "replica connection failed before the answer", &[
                    ("model", model.served_name.clone()), ("replica", replica.id.clone())]);
            }
            Some(Outcome::Retry { status, head: h, body: b }) => {
                tried.push(index);
                state.metrics.retry(&model.served_name, &status.to_string());
                skipped = Some((status, h, b));
            }
            Some(Outcome::Done { status, keep, first_byte, error_code }) => {
                finish(status, replica_id.as_deref(), first_byte, attempts, error_code);
                return if keep { Next::Continue } else { Next::Close };
            }
            Some(Outcome::ClientGone { status, first_byte }) => {
                let status = if status == 0 { 499 } else { status };
                finish(status, replica_id.as_deref(), first_byte, attempts, Some("client_closed_request"));
                return Next::Close;
            }
        }
    }
    // Every ready replica was tried: the last kept answer passes on unchanged, else a 502.
    let (status, mut out, code) = match skipped {
        Some((status, mut h, b)) => {
            h.extend_from_slice(&b);
            (status, h, None)
        }
        None => {
            let r = &model.unreachable;
            let bodies = if job.anthropic { &r.anthropic } else { &r.openai };
            let text = bodies.get(attempts.saturating_sub(1) as usize).or(bodies.last()).cloned().unwrap_or_default();
            let mut h = format!("HTTP/1.1 {} Bad Gateway\r\ncontent-type: application/json\r\n", r.status);
            for (k, v) in &r.headers {
                h.push_str(&format!("{}: {v}\r\n", k.to_ascii_lowercase()));
            }
            h.push_str(&format!("content-length: {}\r\n\r\n", text.len()));
            let mut out = h.into_bytes();
            out.extend_from_slice(text.as_bytes());
            (r.status, out, Some("upstream_unreachable"))
        }
    };
    if close || state.draining() {
        out = with_close(out);
    }
    let ok = matches!(tokio::time::timeout(cfg.write_timeout(), client.write_all(&out)).await, Ok(Ok(())));
    finish(status, replica_id.as_deref(), None, attempts, code);
    if ok && !close && !state.draining() { Next::Continue } else { Next::Close }
}

/// A whole answer with `connection: close` added to its head.
fn with_close(answer: Vec<u8>) -> Vec<u8> {
    match answer.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(end) => [&answer[..end + 2], b"connection: close\r\n".as_slice(), &answer[end + 2..]].concat(),
        None => answer,
    }
}

/// An upstream answer's head, owned.
struct Answer {
    status: u16,
    reason: String,
    headers: Vec<(String, Vec<u8>)>,
    len: usize,
}

fn parse_answer(buf: &[u8]) -> Result<Option<Answer>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => Ok(Some(Answer {
            status: resp.code.unwrap_or(0),
            reason: resp.reason.unwrap_or("").to_string(),
            headers: resp.headers.iter().map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec())).collect(),
            len,
        })),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(()),
    }
}

/// The framing of an answer's body.
enum Framing {
    None,
    Sized(u64),
    Chunked(Dechunk),
    UntilClose,
}

/// A chunked body decoder: payload bytes out, framing (sizes, extensions, trailers) dropped.
struct Dechunk {
    state: ChunkState,
}

enum ChunkState {
    Size { n: u64, digits: u32, in_ext: bool },
    Data(u64),
    DataEnd,
    Trailer { line: usize },
    Done,
}

impl Dechunk {
    fn new() -> Dechunk {
        Dechunk { state: ChunkState::Size { n: 0, digits: 0, in_ext: false } }
    }

    /// Decode `input` into `out`; Ok(consumed) (all of it, or up to the end of the body), Err on bad framing.
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, ()> {
        let mut i = 0;
        while i < input.len() {
            match &mut self.state {
                ChunkState::Size { n, digits, in_ext } => {
                    let b = input[i];
                    i += 1;
                    match b {
                        b'\n' => {
                            if *digits == 0 {
                                return Err(());
                            }
                            self.state = if *n == 0 { ChunkState::Trailer { line: 0 } } else { ChunkState::Data(*n) };
                        }
                        b'\r' => {}
                        _ if *in_ext => {}
                        b';' | b' ' | b'\t' => *in_ext = true,
                        _ => {
                            let d = (b as char).to_digit(16).ok_or(())? as u64;
                            if *digits >= 15 {
                                return Err(());
                            }
                            *n = *n * 16 + d;
                            *digits += 1;
                        }
                    }
                }
                ChunkState::Data(rem) => {
                    let take = (*rem).min((input.len() - i) as u64) as usize;
                    out.extend_from_slice(&input[i..i + take]);
                    i += take;
                    *rem -= take as u64;
                    if *rem == 0 {
                        self.state = ChunkState::DataEnd;
                    }
                }
                ChunkState::DataEnd => {
                    let b = input[i];
                    i += 1;
                    match b {
                        b'\r' => {}
                        b'\n' => self.state = ChunkState::Size { n: 0, digits: 0, in_ext: false },
                        _ => return Err(()),
                    }
                }
                ChunkState::Trailer { line } => {
                    let b = input[i];
                    i += 1;
                    match b {
                        b'\n' if *line == 0 => {
                            self.state = ChunkState::Done;
                            return Ok(i);
                        }
                        b'\n' => *line = 0,
                        b'\r' => {}
                        _ => *line += 1,
                    }
                }
                ChunkState::Done => return Ok(i),
            }
        }
        Ok(i)
    }

    fn done(&self) -> bool {
        matches!(self.state, ChunkState::Done)
    }
}

fn header<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
}

fn framing_of(answer: &Answer) -> Result<Framing, ()> {
    if answer.status == 204 || answer.status == 304 || answer.status < 200 {
        return Ok(Framing::None);
    }
    if let Some(te) = header(&answer.headers, "transfer-encoding") {
        return if tokens(te).any(|t| t == "chunked") { Ok(Framing::Chunked(Dechunk::new())) }
               else { Ok(Framing::UntilClose) };
    }
    match header(&answer.headers, "content-length") {
        Some(v) => std::str::from_utf8(v).ok().and_then(|s| s.trim().parse().ok()).map(Framing::Sized).ok_or(()),
        None => Ok(Framing::UntilClose),
    }
}

/// The answer's head for the client: status line, the replica's end-to-end headers, our framing.
fn client_head(state: &State, answer: &Answer, replica_id: &str, sized: Option<u64>, chunked: bool,
               close: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    let reason = if answer.reason.is_empty() { "Unknown" } else { answer.reason.as_str() };
    out.extend_from_slice(format!("HTTP/1.1 {} {}\r\n", answer.status, reason).as_bytes());
    let drop = dropped(&answer.headers);
    for (k, v) in &answer.headers {
        if drop.iter().any(|d| d == k) {
            continue;
        }
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    if state.config.replica_header {
        out.extend_from_slice(format!("x-modelendpoint-replica: {replica_id}\r\n").as_bytes());
    }
    if let Some(n) = sized {
        out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
    } else if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if close || state.draining() {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn chunk_into(out: &mut Vec<u8>, payload: &[u8]) {
    if !payload.is_empty() {
        out.extend_from_slice(format!("{:x}\r\n", payload.len()).as_bytes());
        out.extend_from_slice(payload);
        out.extend_from_slice(b"\r\n");
    }
}

enum Read {
    Upstream(usize),
    UpstreamFailed,
    ClientGone,
}

/// Read from the replica, watching the client: its EOF (or a reset) means it is gone; bytes it sends
/// meanwhile (a pipelined request) are kept for later, up to a bound.
async fn read_upstream(conn: &mut TcpStream, into: &mut [u8], client: &mut TcpStream, pending: &mut Vec<u8>,
                       limit: usize) -> Read {
    loop {
        tokio::select! {
            r = conn.read(into) => return match r {
                Ok(n) => Read::Upstream(n),
                Err(_) => Read::UpstreamFailed,
            },
            r = client.read_buf(pending), if pending.len() < limit => match r {
                Ok(0) | Err(_) => return Read::ClientGone,
                Ok(_) => {}
            },
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn exchange(state: &State, client: &mut TcpStream, pending: &mut Vec<u8>, mut conn: TcpStream, reused: bool,
                  request: &[u8], body: &[u8], replica: &crate::upstream::Replica, retry_on: &[u16],
                  anthropic: bool, close: bool) -> Outcome {
    let cfg = &state.config;
    let limit = cfg.max_header_bytes + cfg.max_body_bytes;
    if conn.write_all(&[request, body].concat()).await.is_err() {
        return Outcome::Failed { reused };
    }
    // --- the answer's head (interim 1xx answers skipped) ---
    let mut ubuf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; READ_SIZE];
    let answer = loop {
        match parse_answer(&ubuf) {
            Ok(Some(a)) if a.status >= 100 && a.status < 200 && a.status != 101 => {
                ubuf.drain(..a.len);
                continue;
            }
            Ok(Some(a)) if a.status == 101 => return Outcome::Failed { reused: false },
            Ok(Some(a)) => break a,
            Ok(None) if ubuf.len() <= MAX_UPSTREAM_HEAD => {}
            _ => return Outcome::Failed { reused: false },
        }
        match read_upstream(&mut conn, &mut chunk, client, pending, limit).await {
            Read::Upstream(0) | Read::UpstreamFailed => return Outcome::Failed { reused: reused && ubuf.is_empty() },
            Read::Upstream(n) => ubuf.extend_from_slice(&chunk[..n]),
            Read::ClientGone => return Outcome::ClientGone { status: 0, first_byte: None },
        }
    };
    let Ok(mut framing) = framing_of(&answer) else { return Outcome::Failed { reused: false } };
    let mut upstream_keep =
        !header(&answer.headers, "connection").is_some_and(|v| tokens(v).any(|t| t == "close"));
    let mut rest: Vec<u8> = ubuf.split_off(answer.len);

    // --- kept aside, to try another replica ---
    if retry_on.contains(&answer.status) {
        let mut kept = Vec::new();
        let complete = loop {
            let done = match &mut framing {
                Framing::None => true,
                Framing::Sized(n) => {
                    let take = (*n as usize).min(rest.len());
                    kept.extend_from_slice(&rest[..take]);
                    *n -= take as u64;
                    *n == 0
                }
                Framing::Chunked(d) => match d.feed(&rest, &mut kept) {
                    Ok(_) => d.done(),
                    Err(()) => break false,
                },
                Framing::UntilClose => {
                    kept.extend_from_slice(&rest);
                    false
                }
            };
            if done {
                break true;
            }
            if kept.len() > MAX_KEPT_ANSWER {
                break false;
            }
            match read_upstream(&mut conn, &mut chunk, client, pending, limit).await {
                Read::Upstream(0) => break matches!(framing, Framing::UntilClose),
                Read::Upstream(n) => rest = chunk[..n].to_vec(),
                Read::UpstreamFailed => break false,
                Read::ClientGone => return Outcome::ClientGone { status: 0, first_byte: None },
            }
        };
        if !complete {
            return Outcome::Failed { reused: false };
        }
        if upstream_keep && !matches!(framing, Framing::UntilClose) {
            replica.put(conn, cfg.max_idle_per_replica);
        }
        let head = client_head(state, &answer, &replica.id, Some(kept.len() as u64), false, close);
        return Outcome::Retry { status: answer.status, head, body: kept };
    }

    // --- the answer passes on ---
    let (sized, chunked) = match &framing {
        Framing::None => (None, false),
        Framing::Sized(n) => (Some(*n), false),
        Framing::Chunked(_) | Framing::UntilClose => (None, true),
    };
    let is_sse = header(&answer.headers, "content-type")
        .is_some_and(|v| String::from_utf8_lossy(v).to_ascii_lowercase().contains("text/event-stream"));
    let status = answer.status;
    let mut out = client_head(state, &answer, &replica.id, sized, chunked, close);
    let mut first_byte: Option<Instant> = None;
    let mut payload = Vec::new();
    let mut broken = false;
    loop {
        payload.clear();
        let finished = match &mut framing {
            Framing::None => {
                // Bytes after a bodiless answer: the replica is out of step; its connection is not reused.
                upstream_keep &= rest.is_empty();
                true
            }
            Framing::Sized(n) => {
                let take = (*n as usize).min(rest.len());
                out.extend_from_slice(&rest[..take]);
                if take > 0 {
                    first_byte.get_or_insert_with(Instant::now);
                }
                *n -= take as u64;
                upstream_keep &= take == rest.len();
                *n == 0
            }
            Framing::Chunked(d) => match d.feed(&rest, &mut payload) {
                Ok(used) => {
                    upstream_keep &= used == rest.len();
                    d.done()
                }
                Err(()) => {
                    broken = true;
                    true
                }
            },
            Framing::UntilClose => {
                payload.extend_from_slice(&rest);
                false
            }
        };
        if !payload.is_empty() {
            first_byte.get_or_insert_with(Instant::now);
            chunk_into(&mut out, &payload);
        }
        if finished && !broken && chunked {
            out.extend_from_slice(b"0\r\n\r\n");
        }
        if !out.is_empty() {
            match tokio::time::timeout(cfg.write_timeout(), client.write_all(&out)).await {
                Ok(Ok(())) => out.clear(),
                Ok(Err(_)) => return Outcome::ClientGone { status, first_byte },
                Err(_) => {
                    crate::logline::event("info", "client stopped reading: connection cut", &[]);
                    return Outcome::ClientGone { status, first_byte };
                }
            }
        }
        if finished && !broken {
            if upstream_keep {
                replica.put(conn, cfg.max_idle_per_replica);
            }
            return Outcome::Done { status, keep: true, first_byte, error_code: None };
        }
        if !broken {
            match read_upstream(&mut conn, &mut chunk, client, pending, limit).await {
                Read::Upstream(0) if matches!(framing, Framing::UntilClose) => {
                    // the end of a close-delimited body: our chunked one ends here
                    let _ = tokio::time::timeout(cfg.write_timeout(), client.write_all(b"0\r\n\r\n")).await;
                    return Outcome::Done { status, keep: true, first_byte, error_code: None };
                }
                Read::Upstream(0) | Read::UpstreamFailed => {}
                Read::Upstream(n) => {
                    rest.clear();
                    rest.extend_from_slice(&chunk[..n]);
                    continue;
                }
                Read::ClientGone => return Outcome::ClientGone { status, first_byte },
            }
        }
        // The answer had started: no retry. An SSE stream ends with an error event (as the runtime
        // ends its own failed streams); anything else is cut, so the client sees it broken.
        drop(conn);
        if is_sse && chunked {
            let snapshot = state.snapshot();
            let event = if anthropic { &snapshot.broken_anthropic } else { &snapshot.broken_openai };
            let mut end = Vec::new();
            chunk_into(&mut end, event);
            end.extend_from_slice(b"0\r\n\r\n");
            let _ = tokio::time::timeout(cfg.write_timeout(), client.write_all(&end)).await;
            return Outcome::Done { status, keep: true, first_byte, error_code: Some("upstream_broken") };
        }
        return Outcome::Done { status, keep: false, first_byte, error_code: Some("upstream_broken") };
    }
}
