//! Prometheus metrics of the compiled data plane, by the Python gateway's names.
//!
//! The Python gateway's `/metrics` asks for this text over the control socket
//! and merges it with its own, each sample labelled with the data plane that
//! counted it; the families, label names and buckets are the Python side's
//! (gateway/modelendpoint_gateway/metrics.py), so a dashboard sums them as one.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

const LATENCY_BUCKETS: [f64; 19] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                                    10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS.iter().copied())
}

pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    ttfb: Family<Labels, Histogram, fn() -> Histogram>,
    duration: Family<Labels, Histogram, fn() -> Histogram>,
    in_flight: Family<Labels, Gauge>,
    retries: Family<Labels, Counter>,
    pub upstream_connections: Counter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<Labels, Counter>::default();
        let ttfb = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let duration = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let in_flight = Family::<Labels, Gauge>::default();
        let retries = Family::<Labels, Counter>::default();
        let upstream_connections = Counter::default();
        registry.register("modelendpoint_gateway_requests", "Requests answered, by model and HTTP status.",
                          requests.clone());
        registry.register("modelendpoint_gateway_time_to_first_byte_seconds",
                          "From the request's arrival to the first byte of the replica's answer sent to the client.",
                          ttfb.clone());
        registry.register("modelendpoint_gateway_request_duration_seconds",
                          "From the request's arrival to the answer's last byte.", duration.clone());
        registry.register("modelendpoint_gateway_requests_in_flight", "Requests being forwarded to a replica.",
                          in_flight.clone());
        registry.register("modelendpoint_gateway_retries",
                          "Requests sent again to another replica before any byte reached the client.",
                          retries.clone());
        registry.register("modelendpoint_gateway_upstream_connections_opened",
                          "Connections opened to replicas.", upstream_connections.clone());
        Metrics { registry, requests, ttfb, duration, in_flight, retries, upstream_connections }
    }

    pub fn request(&self, model: &str, status: u16, duration_s: f64, ttfb_s: Option<f64>) {
        let m = vec![("model", model.to_string())];
        self.requests.get_or_create(&vec![("model", model.to_string()), ("code", status.to_string())]).inc();
        self.duration.get_or_create(&m).observe(duration_s);
        if let Some(t) = ttfb_s {
            self.ttfb.get_or_create(&m).observe(t);
        }
    }

    pub fn in_flight(&self, model: &str, delta: i64) {
        self.in_flight.get_or_create(&vec![("model", model.to_string())]).inc_by(delta);
    }

    pub fn retry(&self, model: &str, reason: &str) {
        self.retries.get_or_create(&vec![("model", model.to_string()), ("reason", reason.to_string())]).inc();
    }

    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}
