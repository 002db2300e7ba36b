//! The worker's answer on its way back: its `usage` read and judged, and its `session_id`
//! filled in when the worker left it out.

use bytes::Bytes;
use pingora::http::ResponseHeader;

use turnpike_core::usage::{client_body, read_answer};

use super::open_call::Bill;
use crate::config::InvalidUsageRule;
use crate::error::GatewayError;
use crate::metrics::Metrics;

/// A worker's answer as the client will get it, and what the call is charged for.
pub struct MeteredAnswer {
    pub header: Box<ResponseHeader>,
    pub body: Bytes,
    pub bill: Bill,
}

impl MeteredAnswer {
    pub fn status(&self) -> u16 {
        self.header.status.as_u16()
    }
}

/// Reads the usage of a 2xx answer (counting why it was not credited, when it is not) and
/// makes sure the client's body names the session. A usage that is there but wrong is never
/// a free call: `rule` refuses the answer (502, nothing charged) or charges the reservation.
pub fn meter(
    metrics: &Metrics,
    agent_id: &str,
    session_id: &str,
    rule: InvalidUsageRule,
    header: Box<ResponseHeader>,
    body: Bytes,
) -> Result<MeteredAnswer, GatewayError> {
    if !header.status.is_success() {
        return Ok(MeteredAnswer {
            header,
            body,
            bill: Bill::Nothing,
        });
    }
    let reading = read_answer(&body);
    let bill = match reading.usage {
        Ok(usage) => Bill::Usage(usage),
        Err(problem) => {
            metrics
                .usage_rejected
                .with_label_values(&[agent_id, problem.label()])
                .inc();
            if problem.is_invalid() {
                let (action, outcome) = match rule {
                    InvalidUsageRule::Reject => {
                        ("rejected", Err(GatewayError::UpstreamInvalidUsage))
                    }
                    InvalidUsageRule::ChargeReserve => ("charged_reserve", Ok(Bill::Reserve)),
                };
                metrics
                    .invalid_usage
                    .with_label_values(&[agent_id, action])
                    .inc();
                outcome?
            } else {
                Bill::Nothing
            }
        }
    };
    let body = client_body(&body, &reading, session_id).map_or(body, Bytes::from);
    Ok(MeteredAnswer { header, body, bill })
}
