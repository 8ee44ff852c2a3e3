//! How a forwarded response body ended, and an error at its end that does not swallow the
//! bytes before it.
//!
//! When an app (or the next sidecar) breaks a response mid-body, the caller must still get
//! the status and the bytes that came, then see the break (HTTP/1.1: the connection
//! closes; HTTP/2: the stream is reset). hyper's servers tear the connection or stream
//! down as soon as a body yields an error, dropping what they had not written yet; so
//! [`Finish`] holds the error back for one turn (reporting `Pending` and waking itself at
//! once), which lets the server flush the bytes first, and then yields it. It also tells
//! its owner how the body ended, for the metrics and the log.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::BoxError;

/// How a response body ended.
#[derive(Debug)]
pub enum End {
    /// Every byte passed.
    Whole,
    /// The sender broke it after `bytes` bytes.
    Cut {
        /// Bytes that passed before the break.
        bytes: u64,
        /// Why, as one line.
        error: String,
    },
    /// The receiver went away first.
    Abandoned,
}

pin_project_lite::pin_project! {
    /// A body that reports its [`End`] once to `on_end`; see the module docs.
    pub struct Finish<B, F: FnOnce(End)> {
        #[pin]
        body: B,
        bytes: u64,
        held: Option<BoxError>,
        on_end: Option<F>,
    }

    impl<B, F: FnOnce(End)> PinnedDrop for Finish<B, F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(on_end) = this.on_end.take() {
                on_end(End::Abandoned);
            }
        }
    }
}

impl<B, F: FnOnce(End)> Finish<B, F> {
    /// `body`, reporting its end to `on_end`.
    pub fn new(body: B, on_end: F) -> Self {
        Finish {
            body,
            bytes: 0,
            held: None,
            on_end: Some(on_end),
        }
    }
}

impl<B, F> Body for Finish<B, F>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
    F: FnOnce(End),
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if let Some(error) = this.held.take() {
            return Poll::Ready(Some(Err(error)));
        }
        let ended = |on_end: &mut Option<F>, end: End| {
            if let Some(on_end) = on_end.take() {
                on_end(end);
            }
        };
        match this.body.as_mut().poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                ended(this.on_end, End::Whole);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.bytes += data.len() as u64;
                }
                // The server may not poll again after the last frame.
                if this.body.is_end_stream() {
                    ended(this.on_end, End::Whole);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                let error: BoxError = error.into();
                let end = End::Cut {
                    bytes: *this.bytes,
                    error: chain(&*error),
                };
                ended(this.on_end, end);
                if *this.bytes == 0 {
                    return Poll::Ready(Some(Err(error)));
                }
                // Let the server write what it has before it sees the error.
                *this.held = Some(error);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// An error and its causes on one line.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cause = e.source();
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing test panics")]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use std::sync::Arc;

    #[tokio::test]
    async fn a_cut_body_yields_its_bytes_then_the_error_and_reports_the_cut() {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"0123456789"))),
            Err("connection closed before message completed".into()),
        ];
        let seen = Arc::new(parking_lot::Mutex::new(None));
        let record = Arc::clone(&seen);
        let mut body = Finish::new(
            StreamBody::new(futures_util::stream::iter(frames)),
            move |end| *record.lock() = Some(end),
        );
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "0123456789");
        assert!(body.frame().await.unwrap().is_err());
        match seen.lock().take() {
            Some(End::Cut { bytes, error }) => {
                assert_eq!(bytes, 10);
                assert!(error.contains("before message completed"), "{error}");
            }
            other => panic!("not reported as cut: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_whole_body_and_an_abandoned_one_are_told_apart() {
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        let body = Finish::new(http_body_util::Full::new(Bytes::from_static(b"hi")), {
            move |end| record.lock().push(format!("{end:?}"))
        });
        body.collect().await.unwrap();
        let record = Arc::clone(&seen);
        drop(Finish::new(
            http_body_util::Full::new(Bytes::from_static(b"hi")),
            move |end| record.lock().push(format!("{end:?}")),
        ));
        assert_eq!(*seen.lock(), vec!["Whole", "Abandoned"]);
    }
}
