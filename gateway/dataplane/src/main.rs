//! `modelendpoint-gateway-dataplane`: the compiled data plane of modelendpoint-gateway.
//!
//! The Python gateway (the control plane: discovery, keys, holds and wakes,
//! `/models`, every error) starts this process with `MEP_GATEWAY_DATA_PLANE=compiled`
//! and hands it three descriptors: the API port's listening socket, a control
//! socket, and a handoff socket. On the control socket it pushes routing
//! snapshots (newline-delimited JSON) and asks for metrics; this process
//! accepts every connection on the API port, serves the fast path (a plain
//! request for a ready model with a valid key; see proxy.rs), and hands every
//! other connection to the Python gateway (handoff.rs). The settings come from
//! the Python side as one JSON argument, built from its validated settings
//! (the one source of them). It stops when the control socket closes (the
//! Python gateway is gone) or, on a `drain` message, once its connections
//! have finished or the drain timeout has passed.

mod balance;
mod handoff;
mod logline;
mod metrics;
mod prefix;
mod proxy;
mod snapshot;
mod upstream;
#[cfg(test)]
mod vectors;

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[derive(Deserialize)]
pub struct Config {
    pub listen_fd: i32,
    pub control_fd: i32,
    pub handoff_fd: i32,
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
    pub client_idle_seconds: f64,
    pub client_write_timeout_seconds: f64,
    pub connect_timeout_seconds: f64,
    pub upstream_idle_seconds: f64,
    pub max_idle_per_replica: usize,
    pub max_attempts: u32,
    pub drain_timeout_seconds: f64,
    pub access_log: bool,
    pub replica_header: bool,
    pub threads: usize,
}

impl Config {
    pub fn client_idle(&self) -> Duration {
        Duration::from_secs_f64(self.client_idle_seconds)
    }
    pub fn write_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.client_write_timeout_seconds)
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.connect_timeout_seconds)
    }
    pub fn upstream_idle(&self) -> Duration {
        Duration::from_secs_f64(self.upstream_idle_seconds)
    }
}

pub struct State {
    pub config: Config,
    pub metrics: metrics::Metrics,
    snapshot: RwLock<Arc<snapshot::Snapshot>>,
    registry: Mutex<upstream::Registry>,
    handoff: Mutex<handoff::Sender>,
    draining: AtomicBool,
    drain_tx: tokio::sync::watch::Sender<bool>,
    connections: AtomicUsize,
}

impl State {
    pub fn snapshot(&self) -> Arc<snapshot::Snapshot> {
        self.snapshot.read().unwrap().clone()
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn drain_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.drain_tx.subscribe()
    }

    /// The connection is the Python gateway's from here on, with the bytes read so far.
    pub fn hand_over(&self, client: tokio::net::TcpStream, bytes: Vec<u8>) {
        match client.into_std() {
            Ok(std_stream) => {
                let fd: OwnedFd = std_stream.into();
                let _ = self.handoff.lock().unwrap().send((fd, bytes));
            }
            Err(_) => {} // already broken: nothing to hand over
        }
    }
}

fn fail(message: &str) -> ! {
    eprintln!("modelendpoint-gateway-dataplane: {message}");
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 || args[1] != "--config" {
        fail("usage: modelendpoint-gateway-dataplane --config '<JSON>' (started by modelendpoint-gateway)");
    }
    let config: Config = serde_json::from_str(&args[2]).unwrap_or_else(|e| fail(&format!("bad --config: {e}")));
    // The Python gateway owns the lifecycle: it drains this process with a control message, and
    // its end closes the control socket. A SIGTERM or SIGINT to the whole process group (a
    // terminal's Ctrl-C, `kill -- -<pgid>`) must not cut the streams in flight before that.
    // SAFETY: setting a signal's disposition to ignore, before any thread starts.
    unsafe {
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
    let threads = config.threads.max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
        .unwrap_or_else(|e| fail(&format!("runtime: {e}")));
    std::process::exit(runtime.block_on(run(config)));
}

async fn run(config: Config) -> i32 {
    // SAFETY: the Python gateway passed these descriptors for this process to own.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(config.listen_fd) };
    let control = unsafe { std::os::unix::net::UnixStream::from_raw_fd(config.control_fd) };
    let handoff_sock = unsafe { std::os::unix::net::UnixStream::from_raw_fd(config.handoff_fd) };
    listener.set_nonblocking(true).unwrap_or_else(|e| fail(&format!("listen socket: {e}")));
    control.set_nonblocking(true).unwrap_or_else(|e| fail(&format!("control socket: {e}")));
    let listener = tokio::net::TcpListener::from_std(listener).unwrap_or_else(|e| fail(&format!("listen: {e}")));
    let control = tokio::net::UnixStream::from_std(control).unwrap_or_else(|e| fail(&format!("control: {e}")));
    let (drain_tx, _) = tokio::sync::watch::channel(false);
    let drain_timeout = Duration::from_secs_f64(config.drain_timeout_seconds);
    let state = Arc::new(State {
        config,
        metrics: metrics::Metrics::new(),
        snapshot: RwLock::new(Arc::new(snapshot::Snapshot::empty())),
        registry: Mutex::new(upstream::Registry::default()),
        handoff: Mutex::new(handoff::start(handoff_sock)),
        draining: AtomicBool::new(false),
        drain_tx,
        connections: AtomicUsize::new(0),
    });

    let (read_half, mut write_half) = control.into_split();
    let mut lines = BufReader::new(read_half).lines();
    let mut drain = state.drain_signal();
    loop {
        tokio::select! {
            accepted = listener.accept(), if !state.draining() => {
                if let Ok((stream, peer)) = accepted {
                    let s = state.clone();
                    s.connections.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(async move {
                        proxy::serve(s.clone(), stream, peer).await;
                        s.connections.fetch_sub(1, Ordering::Relaxed);
                    });
                }
            }
            line = lines.next_line() => match line {
                Ok(Some(line)) => {
                    if let Some(reply) = control_message(&state, &line) {
                        if write_half.write_all(reply.as_bytes()).await.is_err() {
                            return 1;
                        }
                    }
                }
                _ => {
                    logline::event("error", "the control socket closed (the Python gateway is gone); stopping", &[]);
                    return 1;
                }
            },
            _ = drain.changed() => break,
        }
    }
    // Draining: no new connections; idle ones closed (proxy.rs); busy ones finish, within the timeout.
    drop(listener);
    let deadline = tokio::time::Instant::now() + drain_timeout;
    while state.connections.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            line = lines.next_line() => match line {
                Ok(Some(line)) => {
                    if let Some(reply) = control_message(&state, &line) {
                        let _ = write_half.write_all(reply.as_bytes()).await;
                    }
                }
                _ => return 1,
            },
        }
    }
    logline::event("info", "data plane stopped", &[
        ("drained", (state.connections.load(Ordering::Relaxed) == 0).to_string())]);
    0
}

#[derive(Deserialize)]
struct ControlMsg {
    op: String,
    #[serde(default)]
    id: u64,
    #[serde(default)]
    snapshot: Option<snapshot::SnapshotMsg>,
}

/// Apply one control message; the line to answer, if any.
fn control_message(state: &State, line: &str) -> Option<String> {
    let msg: ControlMsg = match serde_json::from_str(line) {
        Ok(m) => m,
        Err(e) => {
            logline::event("error", "bad control message", &[("error", e.to_string())]);
            return None;
        }
    };
    match msg.op.as_str() {
        "snapshot" => {
            let built = snapshot::build(msg.snapshot?, &mut state.registry.lock().unwrap());
            *state.snapshot.write().unwrap() = Arc::new(built);
            None
        }
        "metrics" => Some(serde_json::json!({"id": msg.id, "metrics": state.metrics.text()}).to_string() + "\n"),
        "drain" => {
            state.draining.store(true, Ordering::Relaxed);
            let _ = state.drain_tx.send(true);
            None
        }
        _ => None,
    }
}
