//! The retry rules of SPEC §3 "Retries": the default rule (without a `retries` table), a
//! configured [`RetryPolicy`] with its conditions and [`Budget`], and the request body kept
//! for replays.

use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Body as _, Frame, Incoming};
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::http::{Body, BoxError, boxed, empty, full};

/// `traffic.retries`.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Total tries, the first included (at least 1).
    pub attempts: u32,
    /// The bound on one try, until its response headers; `None`: only `timeout` bounds it.
    pub per_try_timeout: Option<Duration>,
    /// The response conditions that cause a retry.
    pub on: Vec<RetryOn>,
    /// Retries in the last 10 s stay under `budget` × the original requests in that window
    /// (plus [`MIN_RETRIES_PER_SEC`] per second).
    pub budget: f64,
}

/// One `traffic.retries.on` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryOn {
    /// `gateway-error`: 502, 503, 504.
    GatewayError,
    /// `5xx`: any status 500–599.
    ServerError,
    /// `reset`: the app closed the connection before response headers.
    Reset,
    /// `timeout`: the per-try timeout fired.
    Timeout,
    /// A status code.
    Status(u16),
    /// `grpc:<code-name>`: this `grpc-status` in the response headers (a trailers-only
    /// response).
    Grpc(u32),
}

/// Retries always allowed per second on top of the ratio, so that a quiet outbound can
/// still retry.
pub const MIN_RETRIES_PER_SEC: u32 = 10;

/// The retry budget's window.
const WINDOW_SECS: usize = 10;

/// Tries per request: the first and at most 2 retries.
pub(super) const TRIES: u32 = 3;

/// The largest body buffered so that it can be sent again.
const MAX_REPLAY: u64 = 64 * 1024;

/// Whether `method` is safe to repeat after it may have reached the app.
pub(super) fn is_safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// A request body as the retry loop sees it.
pub(super) enum ReqBody {
    /// No body: every try sends an empty one.
    Empty,
    /// A small body (declared `Content-Length` ≤ 64 KiB), read before the first try so
    /// that any try can send it again, trailers included.
    Buffered(Bytes, Option<HeaderMap>),
    /// A large or length-less body, streamed through (never buffered). A try takes it;
    /// it comes back only when the request was never handed to a connection.
    Streaming(Option<Body>),
}

impl ReqBody {
    /// Classify (and for small bodies, read) the request body.
    pub(super) async fn new(body: Incoming) -> Result<Self, hyper::Error> {
        if body.is_end_stream() {
            return Ok(ReqBody::Empty);
        }
        match body.size_hint().exact() {
            Some(len) if len <= MAX_REPLAY => {
                let collected = body.collect().await?;
                let trailers = collected.trailers().cloned();
                let bytes = collected.to_bytes();
                if bytes.is_empty() && trailers.is_none() {
                    Ok(ReqBody::Empty)
                } else {
                    Ok(ReqBody::Buffered(bytes, trailers))
                }
            }
            _ => Ok(ReqBody::Streaming(Some(boxed(body)))),
        }
    }

    /// Whether the request has no body (a condition of retrying after a reset or 5xx).
    pub(super) fn is_empty(&self) -> bool {
        matches!(self, ReqBody::Empty)
    }

    /// The body for the next try; `None` once a streaming body went out.
    pub(super) fn take(&mut self) -> Option<Body> {
        match self {
            ReqBody::Empty => Some(empty()),
            ReqBody::Buffered(bytes, None) => Some(full(bytes.clone())),
            ReqBody::Buffered(bytes, Some(trailers)) => {
                let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
                    Ok(Frame::data(bytes.clone())),
                    Ok(Frame::trailers(trailers.clone())),
                ];
                Some(boxed(StreamBody::new(stream::iter(frames))))
            }
            ReqBody::Streaming(body) => body.take(),
        }
    }

    /// Give back the body of a request that was never sent.
    pub(super) fn put_back(&mut self, body: Body) {
        if let ReqBody::Streaming(slot) = self {
            *slot = Some(body);
        }
    }

    /// Whether another try can be given a body.
    pub(super) fn available(&self) -> bool {
        match self {
            ReqBody::Empty | ReqBody::Buffered(..) => true,
            ReqBody::Streaming(body) => body.is_some(),
        }
    }

    /// Whether the body can be sent again after a try consumed it.
    pub(super) fn replayable(&self) -> bool {
        !matches!(self, ReqBody::Streaming(_))
    }
}

// === impl RetryPolicy ===

impl RetryPolicy {
    /// Whether `response` (from an app, or an inbound's report of a reset) meets one of
    /// the `on` conditions. 429s never do.
    pub(super) fn matches<B>(&self, response: &Response<B>, reset: bool) -> bool {
        let status = response.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            return false;
        }
        let grpc = grpc_status(response);
        self.on.iter().any(|condition| match *condition {
            RetryOn::GatewayError => matches!(status.as_u16(), 502..=504),
            RetryOn::ServerError => status.is_server_error(),
            RetryOn::Reset => reset,
            RetryOn::Timeout => false,
            RetryOn::Status(code) => status.as_u16() == code,
            RetryOn::Grpc(code) => grpc == Some(code),
        })
    }

    /// Whether `condition` is listed.
    pub(super) fn on(&self, condition: RetryOn) -> bool {
        self.on.contains(&condition)
    }
}

/// The `grpc-status` in a response's headers (a trailers-only response), if any.
pub(super) fn grpc_status<B>(response: &Response<B>) -> Option<u32> {
    grpc_status_in(response.headers())
}

/// Whether a `grpc-status` counts as a failure for the circuit breaker (SPEC §3): 2
/// (unknown), 4 (deadline-exceeded), 13 (internal), 14 (unavailable).
pub(super) fn is_failing_grpc_status(code: u32) -> bool {
    matches!(code, 2 | 4 | 13 | 14)
}

/// The `grpc-status` in a header map (response headers or trailers), if any.
pub(super) fn grpc_status_in(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// The retry budget of one outbound: originals and retries counted in one-second buckets
/// over the last 10 s.
#[derive(Debug)]
pub(super) struct Budget {
    ratio: f64,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    /// The second (since `start`) the newest bucket counts.
    current: u64,
    /// (original requests, retries) per second, indexed by second modulo the window.
    buckets: [(u64, u64); WINDOW_SECS],
}

impl Budget {
    pub(super) fn new(ratio: f64) -> Self {
        Budget {
            ratio,
            window: Mutex::new(Window {
                start: Instant::now(),
                current: 0,
                buckets: [(0, 0); WINDOW_SECS],
            }),
        }
    }

    /// Count an original request.
    pub(super) fn deposit(&self) {
        let mut window = self.window.lock();
        let i = window.advance(Instant::now());
        window.buckets[i].0 += 1;
    }

    /// Take one retry out of the budget; `false` when it is spent.
    pub(super) fn withdraw(&self) -> bool {
        let mut window = self.window.lock();
        let i = window.advance(Instant::now());
        let (originals, retries) = window
            .buckets
            .iter()
            .fold((0u64, 0u64), |(o, r), b| (o + b.0, r + b.1));
        let allowed =
            self.ratio * originals as f64 + f64::from(MIN_RETRIES_PER_SEC) * WINDOW_SECS as f64;
        if (retries + 1) as f64 <= allowed {
            window.buckets[i].1 += 1;
            true
        } else {
            false
        }
    }
}

impl Window {
    /// Move the window to `now`, clearing the seconds that left it; the bucket of `now`.
    fn advance(&mut self, now: Instant) -> usize {
        let second = now.saturating_duration_since(self.start).as_secs();
        if second > self.current {
            let stale = (second - self.current).min(WINDOW_SECS as u64);
            for k in 1..=stale {
                let index = ((self.current + k) % WINDOW_SECS as u64) as usize;
                self.buckets[index] = (0, 0);
            }
            self.current = second;
        }
        (self.current % WINDOW_SECS as u64) as usize
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing test panics")]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_budget_allows_the_ratio_plus_ten_per_second_over_ten_seconds() {
        let budget = Budget::new(0.2);
        for _ in 0..1000 {
            budget.deposit();
        }
        // 0.2 × 1000 + 10 × 10.
        let granted = (0..1000).filter(|_| budget.withdraw()).count();
        assert_eq!(granted, 300);
        // Ten seconds later the window has forgotten all of it.
        tokio::time::advance(Duration::from_secs(11)).await;
        let granted = (0..1000).filter(|_| budget.withdraw()).count();
        assert_eq!(granted, 100);
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_slides_by_the_second() {
        let budget = Budget::new(1.0);
        for _ in 0..100 {
            budget.deposit();
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        for _ in 0..100 {
            budget.deposit();
        }
        assert_eq!((0..1000).filter(|_| budget.withdraw()).count(), 300);
        // The first hundred originals leave the window; the retries made at 5 s stay.
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!((0..1000).filter(|_| budget.withdraw()).count(), 0);
    }

    #[test]
    fn conditions_match_statuses_and_grpc_codes_but_never_429() {
        let policy = RetryPolicy {
            attempts: 3,
            per_try_timeout: None,
            on: vec![
                RetryOn::GatewayError,
                RetryOn::Status(409),
                RetryOn::Grpc(14),
            ],
            budget: 0.2,
        };
        let response = |status: u16, grpc: Option<&str>| {
            let mut r = Response::new(());
            *r.status_mut() = StatusCode::from_u16(status).unwrap();
            if let Some(g) = grpc {
                r.headers_mut().insert("grpc-status", g.parse().unwrap());
            }
            r
        };
        assert!(policy.matches(&response(503, None), false));
        assert!(policy.matches(&response(409, None), false));
        assert!(policy.matches(&response(200, Some("14")), false));
        assert!(!policy.matches(&response(200, Some("13")), false));
        assert!(!policy.matches(&response(500, None), false));
        assert!(!policy.matches(&response(404, None), false));
        let all = RetryPolicy {
            on: vec![RetryOn::ServerError, RetryOn::Status(429)],
            ..policy
        };
        assert!(all.matches(&response(500, None), false));
        assert!(!all.matches(&response(429, None), false));
    }
}
