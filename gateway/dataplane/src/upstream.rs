//! Replicas and their pooled keep-alive connections.
//!
//! A replica's in-flight count and idle connections outlive routing snapshots
//! (the registry hands the same `Replica` to every snapshot that lists the same
//! pod at the same address), as the Python side's `Model.update` keeps its
//! `Replica` objects. Idle connections are reused most recently used first and
//! dropped after `idle`, below the runtime's own keep-alive timeout, so the
//! replica rarely closes one we are about to use; one that turns out closed
//! before any byte of an answer is retried once on a fresh one by the caller.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

pub struct Replica {
    pub id: String,     // "<namespace>/<pod>"
    pub netloc: String, // host:port, IPv6 in brackets: the Host header, the connect address and the log form
    pub in_flight: AtomicUsize,
    idle: Mutex<Vec<(TcpStream, Instant)>>,
}

impl Replica {
    pub fn new(id: &str, host: &str, port: u16) -> Replica {
        let netloc = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        Replica { id: id.to_string(), netloc, in_flight: AtomicUsize::new(0), idle: Mutex::new(Vec::new()) }
    }

    /// A connection: the most recently pooled live one (reused = true), else a new one.
    pub async fn connect(&self, timeout: Duration, idle_limit: Duration) -> std::io::Result<(TcpStream, bool)> {
        loop {
            let pooled = self.idle.lock().unwrap().pop();
            match pooled {
                Some((conn, since)) if since.elapsed() < idle_limit => return Ok((conn, true)),
                Some(_) => continue, // too old: dropped (closed)
                None => break,
            }
        }
        let conn = tokio::time::timeout(timeout, TcpStream::connect(&self.netloc)).await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
        conn.set_nodelay(true)?;
        Ok((conn, false))
    }

    pub fn put(&self, conn: TcpStream, max_idle: usize) {
        let mut idle = self.idle.lock().unwrap();
        if idle.len() < max_idle {
            idle.push((conn, Instant::now()));
        }
    }
}

/// Counts a request in flight on a replica while it lives.
pub struct InFlight(pub Arc<Replica>);

impl InFlight {
    pub fn new(r: Arc<Replica>) -> InFlight {
        r.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(r)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The replicas of every snapshot so far, by (id, netloc): what carries over between snapshots.
#[derive(Default)]
pub struct Registry {
    replicas: HashMap<(String, String), Arc<Replica>>,
}

impl Registry {
    pub fn get(&mut self, id: &str, host: &str, port: u16) -> Arc<Replica> {
        let fresh = Replica::new(id, host, port);
        self.replicas.entry((fresh.id.clone(), fresh.netloc.clone())).or_insert_with(|| Arc::new(fresh)).clone()
    }

    /// Forget the replicas no snapshot lists any more (their pooled connections close).
    pub fn retain(&mut self, live: &[Arc<Replica>]) {
        let live: HashSet<*const Replica> = live.iter().map(Arc::as_ptr).collect();
        self.replicas.retain(|_, r| live.contains(&Arc::as_ptr(r)));
    }
}
