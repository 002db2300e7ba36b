//! The worker's answer on its way back: its `usage` read and judged, and its `session_id`
//! filled in when the worker left it out.

use bytes::Bytes;
use pingora::http::ResponseHeader;

use turnpike_core::usage::{read_answer, with_session_id, Usage};

use crate::metrics::Metrics;
use crate::upstream::{AnswerBody, WorkerAnswer};

/// A worker's answer as the client will get it, and the usage it is charged for.
pub struct MeteredAnswer {
    pub header: Box<ResponseHeader>,
    pub body: Bytes,
    /// A complete 2xx answer's valid usage; `None` charges nothing.
    pub usage: Option<Usage>,
}

impl MeteredAnswer {
    pub fn status(&self) -> u16 {
        self.header.status.as_u16()
    }
}

/// Reads the usage of a 2xx answer (counting why it was not credited, when it is not) and
/// makes sure the client's body names the session.
pub fn meter(
    metrics: &Metrics,
    agent_id: &str,
    session_id: &str,
    answer: WorkerAnswer,
) -> MeteredAnswer {
    let AnswerBody::Buffered(body) = answer.body;
    let header = answer.header;
    if !header.status.is_success() {
        return MeteredAnswer {
            header,
            body,
            usage: None,
        };
    }
    let reading = read_answer(&body);
    let usage = match reading.usage {
        Ok(usage) => Some(usage),
        Err(problem) => {
            metrics
                .usage_rejected
                .with_label_values(&[agent_id, problem.label()])
                .inc();
            None
        }
    };
    let body = if reading.is_object && !reading.has_session_id {
        Bytes::from(with_session_id(&body, session_id))
    } else {
        body
    };
    MeteredAnswer {
        header,
        body,
        usage,
    }
}
