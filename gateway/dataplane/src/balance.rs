//! Choosing a replica: least outstanding requests, or CHWBL on the prompt's start.
//!
//! The port of `modelendpoint_gateway/balancer.py`, point for point: the same
//! 64-bit hash (BLAKE2b with an 8-byte digest, big-endian), the same ring
//! (`replication` points per replica id, sorted by hash then id), the same
//! bound. Shared test vectors (tests/unit/vectors/balancer.json, written from
//! the Python side) keep the two in step, so both data planes of every gateway
//! replica send a prefix to the same pod.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use blake2::digest::consts::U8;
use blake2::{Blake2b, Digest};

use crate::upstream::Replica;

/// A stable 64-bit hash of `text` (the Python side's `hash64`).
pub fn hash64(text: &str) -> u64 {
    let mut h = Blake2b::<U8>::new();
    h.update(text.as_bytes());
    u64::from_be_bytes(h.finalize().into())
}

/// The consistent-hash ring of a replica set.
pub struct Ring {
    hashes: Vec<u64>,
    ids: Vec<usize>, // indexes into the model's replicas
    size: usize,
}

impl Ring {
    pub fn new(ids: &[&str], replication: usize) -> Ring {
        let mut points: Vec<(u64, &str, usize)> = Vec::with_capacity(ids.len() * replication);
        for (index, id) in ids.iter().enumerate() {
            for i in 0..replication {
                points.push((hash64(&format!("{id}#{i}")), id, index));
            }
        }
        // Python sorts (hash, id) tuples: ties on the hash go by id.
        points.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        let distinct: HashSet<&str> = ids.iter().copied().collect();
        Ring { hashes: points.iter().map(|p| p.0).collect(), ids: points.iter().map(|p| p.2).collect(),
               size: distinct.len() }
    }

    /// Distinct replica indexes clockwise from `point`, each once.
    pub fn walk(&self, point: u64) -> Vec<usize> {
        let n = self.ids.len();
        let mut out = Vec::with_capacity(self.size);
        if n == 0 {
            return out;
        }
        let start = self.hashes.partition_point(|h| *h < point) % n;
        for step in 0..n {
            let index = self.ids[(start + step) % n];
            if !out.contains(&index) {
                out.push(index);
                if out.len() == self.size {
                    break;
                }
            }
        }
        out
    }
}

/// The most requests (this one included) a replica may have to take a prefix.
pub fn load_bound(total_in_flight: usize, replicas: usize, mean_load_percentage: u32) -> usize {
    let num = mean_load_percentage as u128 * (total_in_flight as u128 + 1);
    let den = 100u128 * replicas as u128;
    std::cmp::max(1, num.div_ceil(den) as usize)
}

fn load(r: &Replica) -> usize {
    r.in_flight.load(Ordering::Relaxed)
}

/// The replica with the fewest requests in flight, not in `exclude`; ties go to the first from `start`.
pub fn least_requests(replicas: &[Arc<Replica>], exclude: &[usize], start: usize) -> Option<usize> {
    let n = replicas.len();
    let mut best: Option<(usize, usize)> = None;
    for i in 0..n {
        let index = (start + i) % n;
        if exclude.contains(&index) {
            continue;
        }
        let l = load(&replicas[index]);
        if best.is_none_or(|(_, b)| l < b) {
            best = Some((index, l));
        }
    }
    best.map(|(i, _)| i)
}

/// The replica for prefix `key` under the bound; None only when every replica is excluded.
pub fn chwbl(ring: &Ring, replicas: &[Arc<Replica>], key: &str, mean_load_percentage: u32,
             exclude: &[usize]) -> Option<usize> {
    if replicas.is_empty() {
        return None;
    }
    let total: usize = replicas.iter().map(|r| load(r)).sum();
    let bound = load_bound(total, replicas.len(), mean_load_percentage);
    let mut fallback: Option<(usize, usize)> = None;
    for index in ring.walk(hash64(key)) {
        if exclude.contains(&index) {
            continue;
        }
        let l = load(&replicas[index]);
        if l + 1 <= bound {
            return Some(index);
        }
        if fallback.is_none_or(|(_, b)| l < b) {
            fallback = Some((index, l));
        }
    }
    fallback.map(|(i, _)| i)
}

/// Round-robin start for least_requests' ties.
pub struct Rotation(AtomicUsize);

impl Rotation {
    pub fn new() -> Rotation {
        Rotation(AtomicUsize::new(0))
    }
    pub fn next(&self) -> usize {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }
}
