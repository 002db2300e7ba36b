//! Every Prometheus handle in one struct. Label values come from config (agent ids, pool
//! endpoints) or from fixed sets (status codes, bucket kinds, store operations), never from
//! raw request input. Counters over those sets are exported at zero from the start (and for
//! an agent or endpoint as soon as a config names it), so dashboards show 0 rather than "no
//! data" and `rate()` sees the first event.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use std::sync::OnceLock;
use turnpike_core::admission::Scope;
use turnpike_core::limits::BucketKind;
use turnpike_core::usage::UsageProblem;

/// The agent label for a call that never reached a known agent.
pub const NO_AGENT: &str = "-";

/// How a streamed answer ended: the `end` label of `turnpike_streams_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// The worker ended it, with usage.
    Done,
    /// The worker ended it without usage: nothing charged.
    NoUsage,
    /// Its running usage exhausted the balance or the key's token bucket.
    Cut,
    ClientGone,
    /// The worker broke off, sent an event too large, or a usage that is refused.
    WorkerGone,
    /// `stream_idle_timeout`, `max_stream`, or the drain's `shutdown_grace`.
    Timeout,
}

impl StreamEnd {
    pub const ALL: [StreamEnd; 6] = [
        StreamEnd::Done,
        StreamEnd::NoUsage,
        StreamEnd::Cut,
        StreamEnd::ClientGone,
        StreamEnd::WorkerGone,
        StreamEnd::Timeout,
    ];

    pub fn label(self) -> &'static str {
        match self {
            StreamEnd::Done => "done",
            StreamEnd::NoUsage => "no_usage",
            StreamEnd::Cut => "cut",
            StreamEnd::ClientGone => "client_gone",
            StreamEnd::WorkerGone => "worker_gone",
            StreamEnd::Timeout => "timeout",
        }
    }
}

/// Seconds, for a gateway: 100 µs (an answer from the edge) to 2 min (the longest agent
/// call a pool's `timeout` usually allows).
const DURATION_BUCKETS: [f64; 19] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Seconds, for one store round trip: 50 µs to 5 s.
const STORE_BUCKETS: [f64; 15] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    5.0,
];

/// Statuses a call to a configured agent is answered with most: exported at zero per agent.
const AGENT_STATUSES: [&str; 10] = [
    "200", "400", "402", "429", "502", "503", "504", "2xx", "4xx", "5xx",
];
/// The `status` label of a status code: the statuses the gateway answers itself (SPEC §1's
/// error table), 200 and 0 (nothing sent) as themselves; any other status a worker answers
/// as its class (`2xx`), so the series stay bounded whatever workers send.
// The codes counted as themselves come first; the classes catch the rest.
#[allow(clippy::match_overlapping_arm)]
pub fn status_label(status: u16) -> &'static str {
    match status {
        0 => "0",
        200 => "200",
        400 => "400",
        401 => "401",
        402 => "402",
        404 => "404",
        405 => "405",
        408 => "408",
        413 => "413",
        415 => "415",
        429 => "429",
        431 => "431",
        502 => "502",
        503 => "503",
        504 => "504",
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Statuses the gateway answers before a call has an agent (`agent="-"`).
const NO_AGENT_STATUSES: [&str; 9] = [
    "400", "401", "404", "405", "408", "413", "415", "431", "503",
];
/// `turnpike_auth_failures_total`'s reasons (`GatewayError::auth_failure_reason`).
pub const AUTH_FAILURE_REASONS: [&str; 3] = ["missing", "invalid", "admin"];
/// `turnpike_store_*{op}`: the Redis store's operations (the embedded store never fails).
pub const STORE_OPS: [&str; 7] = [
    "key",
    "admit",
    "settle",
    "extend",
    "slice",
    "admin",
    "admin_once",
];
/// `turnpike_upstream_attempts_total`'s outcomes (`exchange`).
pub const ATTEMPT_OUTCOMES: [&str; 5] = [
    "answered",
    "connect_failed",
    "broken",
    "timed_out",
    "too_large",
];
/// Above this many configured agents, per-agent series appear on first use instead, to keep
/// `/metrics` small (about 25 series per agent).
pub const ZERO_AGENTS_MAX: usize = 1000;

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: Histogram,
    pub upstream_duration: Histogram,
    pub stream_first_byte: Histogram,
    pub streams: IntCounterVec,
    pub tokens: IntCounterVec,
    pub cost: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub insufficient_balance: IntCounterVec,
    pub store_errors: IntCounterVec,
    pub store_duration: HistogramVec,
    pub store_batch_calls: Histogram,
    pub fail_open_admissions: IntCounter,
    pub settlements_queued: IntGauge,
    pub settlements_dropped: IntCounter,
    pub store_state_lost: IntCounter,
    pub config_reloads: IntCounterVec,
    pub usage_rejected: IntCounterVec,
    pub invalid_usage: IntCounterVec,
    pub upstream_attempts: IntCounterVec,
    /// Only with `metrics.per_key`.
    pub key_requests: IntCounterVec,
    pub key_tokens: IntCounterVec,
    pub upstream_endpoint_up: IntGaugeVec,
    pub inflight: IntGauge,
    pub open_connections: IntGauge,
    pub draining: IntGauge,
    pub config_generation: IntGauge,
    pub config_last_success: IntGauge,
    /// Certificate files loaded by a TLS listener (`public`, `admin`) after a change on disk.
    pub tls_cert_reloads: IntCounterVec,
    pub tls_cert_expiry: IntGaugeVec,
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
            let opts = HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec());
            let h = Histogram::with_opts(opts).expect("valid metric");
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
        let metrics = Self {
            requests: counter(
                "turnpike_requests_total",
                "Requests answered, by agent (\"-\" before one is known) and HTTP status (0: the client was gone)",
                &["agent", "status"],
            ),
            request_duration: histogram(
                "turnpike_request_duration_seconds",
                "Seconds from a request's head to the end of its answer",
            ),
            upstream_duration: histogram(
                "turnpike_upstream_duration_seconds",
                "Seconds from choosing a worker to the end of its answer",
            ),
            stream_first_byte: histogram(
                "turnpike_stream_first_byte_seconds",
                "Seconds from a streamed call's start to the first byte the client was sent",
            ),
            streams: counter(
                "turnpike_streams_total",
                "Streamed answers, by agent and how they ended (done, no_usage, cut, client_gone, worker_gone, timeout)",
                &["agent", "end"],
            ),
            tokens: counter(
                "turnpike_tokens_total",
                "Usage tokens metered from workers' answers, by agent and kind (input, output)",
                &["agent", "kind"],
            ),
            cost: counter(
                "turnpike_cost_total",
                "Cost debited from balances, in the operator's balance unit, by agent",
                &["agent"],
            ),
            rate_limited: counter(
                "turnpike_rate_limited_total",
                "Calls a rate limit refused (shadow=\"true\": would have refused), by agent, bucket and scope",
                &["agent", "bucket", "scope", "shadow"],
            ),
            auth_failures: counter(
                "turnpike_auth_failures_total",
                "Refused credentials, by reason (missing, invalid, admin)",
                &["reason"],
            ),
            insufficient_balance: counter(
                "turnpike_insufficient_balance_total",
                "Calls refused with 402 for balance, by agent",
                &["agent"],
            ),
            store_errors: counter(
                "turnpike_store_errors_total",
                "Store operations that failed (timed out, refused, unreachable), by operation",
                &["op"],
            ),
            store_duration: {
                let opts = HistogramOpts::new(
                    "turnpike_store_duration_seconds",
                    "Seconds a store operation took, by operation (on Redis, from joining a group commit to its answer)",
                )
                .buckets(STORE_BUCKETS.to_vec());
                let h = HistogramVec::new(opts, &["op"]).expect("valid metric");
                registry
                    .register(Box::new(h.clone()))
                    .expect("registered once");
                h
            },
            store_batch_calls: {
                let opts = HistogramOpts::new(
                    "turnpike_store_batch_calls",
                    "Admissions and settlements one Redis script run carried (the group commit)",
                )
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]);
                let h = Histogram::with_opts(opts).expect("valid metric");
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
                "Settlements held until the store takes them",
            ),
            settlements_dropped: counter(
                "turnpike_store_settlements_dropped_total",
                "Settlements lost: the queue was full, Redis refused a held one for good, or the process exited holding one without a journal",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            store_state_lost: counter(
                "turnpike_store_state_lost_total",
                "Times Redis was found to have lost its state (an empty restart) and was seeded again",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            config_reloads: counter(
                "turnpike_config_reloads_total",
                "Config loads, by result (success, error: refused, the old config stays)",
                &["result"],
            ),
            usage_rejected: counter(
                "turnpike_usage_rejected_total",
                "2xx answers whose usage was not credited, by agent and reason",
                &["agent", "reason"],
            ),
            invalid_usage: counter(
                "turnpike_invalid_usage_total",
                "2xx answers whose usage was present but invalid, by what the gateway did \
                 (action=rejected: 502 upstream_invalid_usage; charged_reserve: passed, reservation charged)",
                &["agent", "action"],
            ),
            upstream_attempts: counter(
                "turnpike_upstream_attempts_total",
                "Attempts to reach a worker, by pool, endpoint and outcome (answered, connect_failed, broken, timed_out, too_large)",
                &["pool", "endpoint", "outcome"],
            ),
            key_requests: counter(
                "turnpike_key_requests_total",
                "Requests answered, by key id and HTTP status (only with metrics.per_key)",
                &["key", "status"],
            ),
            key_tokens: counter(
                "turnpike_key_tokens_total",
                "Usage tokens metered, by key id and kind (only with metrics.per_key)",
                &["key", "kind"],
            ),
            upstream_endpoint_up: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "turnpike_upstream_endpoint_up",
                        "Whether the endpoint's last attempt reached it (1) or its connect failed (0); 1 until tried",
                    ),
                    &["pool", "endpoint"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("registered once");
                g
            },
            inflight: gauge(
                "turnpike_inflight_requests",
                "Requests from their first byte to the end of their answer",
            ),
            open_connections: gauge(
                "turnpike_open_connections",
                "Client connections open on the public listener, idle or not",
            ),
            draining: gauge(
                "turnpike_draining",
                "1 from a stop signal on: /readyz fails and calls in flight are finishing",
            ),
            config_generation: gauge(
                "turnpike_config_generation",
                "Configurations put in force since start",
            ),
            config_last_success: gauge(
                "turnpike_config_last_success_timestamp_seconds",
                "Unix time of the last configuration put in force",
            ),
            tls_cert_reloads: counter(
                "turnpike_tls_certificate_reloads_total",
                "Certificate files a TLS listener (public, admin) loaded again after they changed: success, or error (the previous pair kept serving)",
                &["listener", "result"],
            ),
            tls_cert_expiry: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "turnpike_tls_certificate_expiry_timestamp_seconds",
                        "Unix time at which the certificate a TLS listener serves expires",
                    ),
                    &["listener"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("registered once");
                g
            },
            registry,
        };
        metrics.register_process_metrics();
        metrics.zero_fixed_sets();
        metrics
    }

    /// The process's CPU seconds, resident memory, open file descriptors and start time
    /// (`process_*`), read from `/proc` at each scrape.
    fn register_process_metrics(&self) {
        #[cfg(target_os = "linux")]
        {
            let collector = prometheus::process_collector::ProcessCollector::for_self();
            let _ = self.registry.register(Box::new(collector));
        }
    }

    /// The series whose labels are fixed sets, at zero.
    fn zero_fixed_sets(&self) {
        for status in NO_AGENT_STATUSES {
            self.requests.with_label_values(&[NO_AGENT, status]);
        }
        for reason in AUTH_FAILURE_REASONS {
            self.auth_failures.with_label_values(&[reason]);
        }
        for op in STORE_OPS {
            self.store_errors.with_label_values(&[op]);
        }
        for result in ["success", "error"] {
            self.config_reloads.with_label_values(&[result]);
        }
    }

    /// An agent a config names: its series at zero. `invalid_usage_action` is what its
    /// pool does with invalid usage (`rejected` or `charged_reserve`).
    pub fn zero_agent(&self, agent: &str, invalid_usage_action: &str) {
        for status in AGENT_STATUSES {
            self.requests.with_label_values(&[agent, status]);
        }
        for kind in ["input", "output"] {
            self.tokens.with_label_values(&[agent, kind]);
        }
        self.cost.with_label_values(&[agent]);
        for end in StreamEnd::ALL {
            self.streams.with_label_values(&[agent, end.label()]);
        }
        self.insufficient_balance.with_label_values(&[agent]);
        for bucket in BucketKind::ALL {
            for scope in Scope::ALL {
                self.rate_limited.with_label_values(&[
                    agent,
                    bucket.label(),
                    scope.label(),
                    "false",
                ]);
            }
        }
        for problem in UsageProblem::ALL {
            self.usage_rejected
                .with_label_values(&[agent, problem.label()]);
        }
        self.invalid_usage
            .with_label_values(&[agent, invalid_usage_action]);
    }

    /// A pool endpoint's series: every outcome at zero, and up until an attempt says not.
    /// Returns the handles a call uses, so none is looked up per call.
    pub fn endpoint(&self, pool: &str, endpoint: &str) -> EndpointMetrics {
        let attempt = |outcome: &str| {
            self.upstream_attempts
                .with_label_values(&[pool, endpoint, outcome])
        };
        let up = self
            .upstream_endpoint_up
            .with_label_values(&[pool, endpoint]);
        // A gauge already known keeps its value across a reload.
        if attempt("answered").get() == 0 && attempt("connect_failed").get() == 0 {
            up.set(1);
        }
        EndpointMetrics {
            answered: attempt("answered"),
            connect_failed: attempt("connect_failed"),
            broken: attempt("broken"),
            timed_out: attempt("timed_out"),
            too_large: attempt("too_large"),
            up,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Metrics {
    /// An endpoint a reload removed: its series go, so a stale "down" cannot alert for ever.
    pub fn forget_endpoint(&self, pool: &str, endpoint: &str) {
        let _ = self
            .upstream_endpoint_up
            .remove_label_values(&[pool, endpoint]);
        for outcome in ATTEMPT_OUTCOMES {
            let _ = self
                .upstream_attempts
                .remove_label_values(&[pool, endpoint, outcome]);
        }
    }
}

/// An agent's per-call counters, resolved on its first call under a config and kept with
/// its route, so later calls look no label up (`with_label_values` hashes the labels and
/// takes the vector's lock each time).
#[derive(Default)]
pub struct AgentSeries(OnceLock<AgentCounters>);

pub struct AgentCounters {
    /// `turnpike_requests_total` for each of `AGENT_STATUSES`.
    requests: [IntCounter; AGENT_STATUSES.len()],
    pub input_tokens: IntCounter,
    pub output_tokens: IntCounter,
    pub cost: IntCounter,
}

impl AgentSeries {
    pub fn get(&self, metrics: &Metrics, agent: &str) -> &AgentCounters {
        self.0.get_or_init(|| AgentCounters {
            requests: AGENT_STATUSES
                .map(|status| metrics.requests.with_label_values(&[agent, status])),
            input_tokens: metrics.tokens.with_label_values(&[agent, "input"]),
            output_tokens: metrics.tokens.with_label_values(&[agent, "output"]),
            cost: metrics.cost.with_label_values(&[agent]),
        })
    }
}

impl AgentCounters {
    /// Counts a call answered with `status` (a `status_label`); a status an agent's calls
    /// rarely end with is looked up.
    pub fn count_request(&self, metrics: &Metrics, agent: &str, status: &str) {
        match AGENT_STATUSES.iter().position(|s| *s == status) {
            Some(i) => self.requests[i].inc(),
            None => metrics.requests.with_label_values(&[agent, status]).inc(),
        }
    }
}

/// One endpoint's handles, resolved when its pool is built.
#[derive(Clone)]
pub struct EndpointMetrics {
    pub answered: IntCounter,
    pub connect_failed: IntCounter,
    pub broken: IntCounter,
    pub timed_out: IntCounter,
    pub too_large: IntCounter,
    /// Passive health: 1 after an answer, 0 after a failed connect.
    pub up: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
