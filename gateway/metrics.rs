//! Every Prometheus handle in one struct. Label values come from config (agent ids) or from
//! fixed sets (status codes, bucket kinds), never from raw request input.

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// The agent label for a call that never reached a known agent.
pub const NO_AGENT: &str = "-";

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: Histogram,
    pub upstream_duration: Histogram,
    pub tokens: IntCounterVec,
    pub cost: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub insufficient_balance: IntCounterVec,
    pub store_errors: IntCounterVec,
    pub store_duration: HistogramVec,
    pub fail_open_admissions: IntCounter,
    pub settlements_queued: IntGauge,
    pub settlements_dropped: IntCounter,
    pub store_state_lost: IntCounter,
    pub config_reloads: IntCounterVec,
    pub usage_rejected: IntCounterVec,
    pub invalid_usage: IntCounterVec,
    pub inflight: IntGauge,
    pub config_generation: IntGauge,
    pub config_last_success: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let vec = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(vec.clone()))
                .expect("registered once");
            vec
        };
        let histogram = |name: &str, help: &str| {
            let buckets = exponential_buckets(0.0005, 2.0, 18).expect("valid buckets");
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("registered once");
            h
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("registered once");
            g
        };
        Self {
            requests: counter(
                "turnpike_requests_total",
                "Calls answered, by agent and status",
                &["agent", "status"],
            ),
            request_duration: histogram(
                "turnpike_request_duration_seconds",
                "Time from request to the end of the response",
            ),
            upstream_duration: histogram(
                "turnpike_upstream_duration_seconds",
                "Time from choosing a worker to the end of its answer",
            ),
            tokens: counter(
                "turnpike_tokens_total",
                "Usage tokens metered",
                &["agent", "kind"],
            ),
            cost: counter(
                "turnpike_cost_total",
                "Cost debited, in the operator's unit",
                &["agent"],
            ),
            rate_limited: counter(
                "turnpike_rate_limited_total",
                "Calls a rate limit refused (shadow=true: would have refused)",
                &["agent", "bucket", "scope", "shadow"],
            ),
            auth_failures: counter(
                "turnpike_auth_failures_total",
                "Refused credentials",
                &["reason"],
            ),
            insufficient_balance: counter(
                "turnpike_insufficient_balance_total",
                "Calls refused for balance",
                &["agent"],
            ),
            store_errors: counter(
                "turnpike_store_errors_total",
                "Failed store operations",
                &["op"],
            ),
            store_duration: {
                let opts = HistogramOpts::new(
                    "turnpike_store_duration_seconds",
                    "Time a store operation took, by operation",
                )
                .buckets(exponential_buckets(0.0001, 2.0, 14).expect("valid buckets"));
                let h = HistogramVec::new(opts, &["op"]).expect("valid metric");
                registry
                    .register(Box::new(h.clone()))
                    .expect("registered once");
                h
            },
            fail_open_admissions: counter(
                "turnpike_store_fail_open_admissions_total",
                "Calls admitted on local buckets, without a balance check, while the store was down",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            settlements_queued: gauge(
                "turnpike_store_settlements_queued",
                "Settlements waiting for the store to come back",
            ),
            settlements_dropped: counter(
                "turnpike_store_settlements_dropped_total",
                "Settlements lost: the queue was full, or Redis refused a held one for good",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            store_state_lost: counter(
                "turnpike_store_state_lost_total",
                "Times Redis was found to have lost its state (an empty restart) and was seeded again",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            config_reloads: counter("turnpike_config_reloads_total", "Config loads", &["result"]),
            usage_rejected: counter(
                "turnpike_usage_rejected_total",
                "2xx answers whose usage was not credited",
                &["agent", "reason"],
            ),
            invalid_usage: counter(
                "turnpike_invalid_usage_total",
                "2xx answers whose usage was present but invalid, by what the gateway did \
                 (action=rejected: 502 upstream_invalid_usage; charged_reserve: passed, reservation charged)",
                &["agent", "action"],
            ),
            inflight: gauge("turnpike_inflight_requests", "Calls being processed now"),
            config_generation: gauge(
                "turnpike_config_generation",
                "Configurations put in force since start",
            ),
            config_last_success: gauge(
                "turnpike_config_last_success_timestamp_seconds",
                "Unix time of the last configuration put in force",
            ),
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
