//! The routing snapshot the Python gateway pushes: which names the fast path
//! may serve, where, and the error bodies it answers with.
//!
//! Only what the fast path serves is in it: a name whose ModelEndpoint has a
//! ready replica and whose keys (if any) are fresh. Everything else (unknown
//! names, holds and wakes, switched-off or failed models, stale keys, a keyless
//! model withheld from a public gateway) is absent, so such a request goes to
//! the Python gateway, which answers it by its rules. Error bodies are rendered
//! by the Python side's errors module, the one source of their shape.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::Deserialize;

use crate::balance::{Ring, Rotation};
use crate::upstream::{Registry, Replica};

#[derive(Deserialize)]
pub struct ReplicaMsg {
    pub id: String,
    pub host: String,
    pub port: u16,
}

#[derive(Deserialize)]
pub struct Rendered {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The body by dialect (index: attempts - 1, for the messages that count them).
    pub openai: Vec<String>,
    pub anthropic: Vec<String>,
}

#[derive(Deserialize)]
pub struct ModelMsg {
    pub served_name: String,
    pub names: Vec<String>,
    pub adapters: Vec<String>,
    pub replicas: Vec<ReplicaMsg>,
    pub prefix_hash: Option<PrefixHashMsg>,
    /// Hex SHA-256 digests of the keys that open the model; None: open.
    pub keys: Option<Vec<String>>,
    pub unreachable: Rendered,
}

#[derive(Deserialize)]
pub struct PrefixHashMsg {
    pub replication: usize,
    pub mean_load_percentage: u32,
    pub prefix_char_length: usize,
}

#[derive(Deserialize)]
pub struct SnapshotMsg {
    pub models: Vec<ModelMsg>,
    pub upstream_broken_event: HashMap<String, String>,
    pub anthropic_suffixes: Vec<String>,
}

pub struct PrefixHash {
    pub ring: Ring,
    pub mean_load_percentage: u32,
    pub prefix_char_length: usize,
}

pub struct Model {
    pub served_name: String,
    pub adapters: HashSet<String>,
    pub replicas: Vec<Arc<Replica>>,
    pub prefix_hash: Option<PrefixHash>,
    pub keys: Option<HashSet<[u8; 32]>>,
    pub unreachable: Rendered,
    pub rotation: Rotation,
}

pub struct Snapshot {
    pub names: HashMap<String, Arc<Model>>,
    pub broken_openai: Vec<u8>,
    pub broken_anthropic: Vec<u8>,
    pub anthropic_suffixes: Vec<String>,
}

impl Snapshot {
    pub fn empty() -> Snapshot {
        Snapshot { names: HashMap::new(), broken_openai: Vec::new(), broken_anthropic: Vec::new(),
                   anthropic_suffixes: Vec::new() }
    }

    pub fn anthropic(&self, path: &str) -> bool {
        let p = path.trim_end_matches('/');
        self.anthropic_suffixes.iter().any(|s| p.ends_with(s.as_str()))
    }
}

fn digest_of(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

pub fn build(msg: SnapshotMsg, registry: &mut Registry) -> Snapshot {
    let mut names = HashMap::new();
    let mut live = Vec::new();
    for m in msg.models {
        let replicas: Vec<Arc<Replica>> = m.replicas.iter().map(|r| registry.get(&r.id, &r.host, r.port)).collect();
        live.extend(replicas.iter().cloned());
        let prefix_hash = m.prefix_hash.map(|p| {
            let ids: Vec<&str> = replicas.iter().map(|r| r.id.as_str()).collect();
            PrefixHash { ring: Ring::new(&ids, p.replication), mean_load_percentage: p.mean_load_percentage,
                         prefix_char_length: p.prefix_char_length }
        });
        let keys = m.keys.map(|ks| ks.iter().filter_map(|k| digest_of(k)).collect());
        let model = Arc::new(Model { served_name: m.served_name, adapters: m.adapters.into_iter().collect(), replicas,
                                     prefix_hash, keys, unreachable: m.unreachable, rotation: Rotation::new() });
        for name in m.names {
            names.insert(name, model.clone());
        }
    }
    registry.retain(&live);
    let event = |d: &str| msg.upstream_broken_event.get(d).cloned().unwrap_or_default().into_bytes();
    Snapshot { names, broken_openai: event("openai"), broken_anthropic: event("anthropic"),
               anthropic_suffixes: msg.anthropic_suffixes }
}
