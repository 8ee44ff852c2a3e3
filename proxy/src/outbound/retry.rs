//! The default retry rule (SPEC §3 "Retries", without a `retries` table) and the request
//! body kept for replays.

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, Method};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Body as _, Frame, Incoming};

use crate::http::{Body, BoxError, boxed, empty, full};

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
