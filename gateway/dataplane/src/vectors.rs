//! The shared test vectors (tests/unit/vectors/gateway_dataplane.json, written by
//! hack/gateway_vectors.py from the Python gateway's functions): this side's hash,
//! ring, bound, CHWBL choice and prefix keys must give the same answers.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::Value;

use crate::balance::{chwbl, hash64, load_bound, Ring};
use crate::prefix::{prefix_key, Defer};
use crate::upstream::Replica;

fn vectors() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/unit/vectors/gateway_dataplane.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("the vectors file")).expect("JSON")
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

#[test]
fn hash64_matches() {
    for case in vectors()["hash64"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(format!("{:016x}", hash64(text)), case["hash"].as_str().unwrap(), "{text:?}");
    }
}

#[test]
fn ring_walks_match() {
    for case in vectors()["rings"].as_array().unwrap() {
        let ids = strs(&case["ids"]);
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let ring = Ring::new(&refs, case["replication"].as_u64().unwrap() as usize);
        let walk: Vec<String> = ring.walk(hash64(case["key"].as_str().unwrap())).iter().map(|i| ids[*i].clone())
            .collect();
        assert_eq!(walk, strs(&case["walk"]), "{case}");
    }
}

#[test]
fn load_bounds_match() {
    for case in vectors()["load_bound"].as_array().unwrap() {
        let got = load_bound(case["total"].as_u64().unwrap() as usize, case["replicas"].as_u64().unwrap() as usize,
                             case["pct"].as_u64().unwrap() as u32);
        assert_eq!(got as u64, case["bound"].as_u64().unwrap(), "{case}");
    }
}

#[test]
fn chwbl_choices_match() {
    for case in vectors()["chwbl"].as_array().unwrap() {
        let ids = strs(&case["ids"]);
        let replicas: Vec<Arc<Replica>> = ids.iter().zip(case["loads"].as_array().unwrap()).map(|(id, load)| {
            let r = Replica::new(id, "127.0.0.1", 1);
            r.in_flight.store(load.as_u64().unwrap() as usize, Ordering::Relaxed);
            Arc::new(r)
        }).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let ring = Ring::new(&refs, case["replication"].as_u64().unwrap() as usize);
        let chosen = chwbl(&ring, &replicas, case["key"].as_str().unwrap(),
                           case["mean_load_percentage"].as_u64().unwrap() as u32, &[]);
        assert_eq!(chosen.map(|i| ids[i].clone()), case["chosen"].as_str().map(String::from), "{case}");
    }
}

#[test]
fn prefix_keys_match_or_defer_only_when_exotic() {
    let mut deferred = 0;
    for case in vectors()["prefix_key"].as_array().unwrap() {
        let body = case["body"].as_object().unwrap();
        let limit = case["limit"].as_u64().unwrap() as usize;
        match prefix_key(body, limit) {
            Ok(key) => assert_eq!(key.as_deref(), case["key"].as_str(), "{case}"),
            Err(Defer) => {
                assert!(case["exotic"].as_bool().unwrap(), "deferred a plain body: {case}");
                deferred += 1;
            }
        }
    }
    assert!(deferred > 0, "the exotic cases are deferred to the Python side");
}
