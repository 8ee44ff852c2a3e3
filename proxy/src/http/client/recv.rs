//! The body of a response received over one of the sidecars' HTTP/2 client connections,
//! drained eagerly and released lazily.
//!
//! h2 keeps every DATA frame it received but nobody has read yet as a separate event, and
//! charges each small one against a per-connection budget: a producer of many tiny frames
//! (gRPC server streaming of small messages, server-sent events) whose reader is slower
//! than itself would make h2 hold hundreds of thousands of frames, and h2 would then cut
//! the connection with ENHANCE_YOUR_CALM although the peer did nothing wrong. hyper's own
//! body cannot avoid it: it gives the peer flow-control credit back the moment a frame is
//! read, so reading eagerly would buffer without bound.
//!
//! So a [`RecvBody`] takes every frame out of h2 as soon as it arrives (a pump task for
//! streams that are still open), appends small frames to one contiguous buffer, and gives
//! the credit back to the peer only when the consumer takes the bytes. Flow control then
//! bounds what a stream holds to one stream window of contiguous bytes, whatever the
//! framing; h2's own buffer of small frames stays near empty; and a slow reader slows the
//! writer end to end.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use h2::RecvStream;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};
use parking_lot::Mutex;

/// Frames shorter than this are copied into the contiguous tail; longer ones are kept as
/// they are (no copy), one entry each.
const SMALL: usize = 4 * 1024;

/// Beyond this many bytes held (the reader is slower than the sender), every frame is
/// copied: a large frame is a slice of h2's read buffer and keeps the whole buffer
/// allocated, so holding a window of them could pin many times the bytes held. While the
/// reader keeps up, large frames pass without a copy.
const COPY_ABOVE: usize = 64 * 1024;

/// The size of each coalescing buffer, and the most handed out per poll: one HTTP/2
/// frame's worth, so that the next hop's send buffer never takes much more than its
/// window, and memory follows the bytes held (no buffer doubling past a window).
const CHUNK: usize = 16 * 1024;

/// A response body from an HTTP/2 peer; see the module docs.
pub struct RecvBody {
    shared: Arc<Mutex<Shared>>,
    /// Gives the peer credit back as bytes are taken.
    flow: h2::FlowControl,
    /// Cancels the request's stream (its body pipe) when this body is dropped.
    _cancel: Option<tokio_util::sync::DropGuard>,
}

/// What the pump (or the first synchronous drain) and the consumer share.
#[derive(Default)]
struct Shared {
    /// Received bytes not yet taken, in order: large frames as they came, then `tail`.
    chunks: VecDeque<Bytes>,
    /// Small frames received after the last entry of `chunks`, concatenated.
    tail: BytesMut,
    /// Bytes held in `chunks` and `tail`.
    held: usize,
    /// The end of the stream, once the pump saw it.
    end: End,
    /// The consumer waiting for bytes or the end.
    consumer: Option<Waker>,
    /// Set when the consumer is dropped: the pump stops and the stream is cancelled.
    abandoned: bool,
    /// The pump, woken when the consumer goes away.
    pump: Option<Waker>,
}

#[derive(Default)]
enum End {
    #[default]
    Open,
    /// Every DATA frame arrived; the trailers (if any) have not been taken yet.
    Done(Option<HeaderMap>),
    /// The trailers were taken, or there were none.
    Finished,
    Failed(h2::Error),
}

impl RecvBody {
    /// Start draining `recv`: at once what is already there, and with a pump task for
    /// the rest while the stream is open.
    pub(crate) fn new(mut recv: RecvStream) -> Self {
        let flow = recv.flow_control().clone();
        let shared = Arc::new(Mutex::new(Shared::default()));
        // Most responses arrive whole with their headers: drain synchronously first, and
        // spawn a pump only for a stream that is still open. The no-op waker is replaced
        // by the pump's own on its first poll.
        let ended = {
            let mut cx = Context::from_waker(Waker::noop());
            shared.lock().drain(&mut recv, &mut cx).is_ready()
        };
        if !ended {
            let pump = Arc::clone(&shared);
            tokio::spawn(async move {
                std::future::poll_fn(|cx| {
                    let mut shared = pump.lock();
                    if shared.abandoned {
                        // Dropping `recv` (with the consumer's flow-control handle)
                        // cancels the stream and returns its unread credit.
                        return Poll::Ready(());
                    }
                    shared.pump = Some(cx.waker().clone());
                    shared.drain(&mut recv, cx)
                })
                .await;
            });
        }
        RecvBody {
            shared,
            flow,
            _cancel: None,
        }
    }

    /// This body, cancelling the request's stream (through `guard`) when dropped.
    pub(crate) fn guarded(mut self, guard: tokio_util::sync::DropGuard) -> Self {
        self._cancel = Some(guard);
        self
    }
}

impl Shared {
    /// Take every frame h2 has for this stream, then the trailers; `Ready` once the
    /// stream ended (whole or failed), `Pending` with `cx` registered otherwise.
    fn drain(&mut self, recv: &mut RecvStream, cx: &mut Context<'_>) -> Poll<()> {
        if !matches!(self.end, End::Open) {
            return Poll::Ready(());
        }
        let mut woke = false;
        let result = loop {
            match recv.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    self.push(data);
                    woke = true;
                }
                Poll::Ready(Some(Err(error))) => break Poll::Ready(End::Failed(error)),
                Poll::Ready(None) => match recv.poll_trailers(cx) {
                    Poll::Ready(Ok(trailers)) => break Poll::Ready(End::Done(trailers)),
                    Poll::Ready(Err(error)) => break Poll::Ready(End::Failed(error)),
                    Poll::Pending => break Poll::Pending,
                },
                Poll::Pending => break Poll::Pending,
            }
        };
        if let Poll::Ready(end) = result {
            self.end = end;
            woke = true;
        }
        if woke {
            if let Some(consumer) = self.consumer.take() {
                consumer.wake();
            }
        }
        if matches!(self.end, End::Open) {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }

    fn push(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        self.held += data.len();
        if data.len() < SMALL || self.held > COPY_ABOVE {
            if self.tail.capacity() - self.tail.len() < data.len() {
                if !self.tail.is_empty() {
                    self.chunks.push_back(self.tail.split().freeze());
                }
                self.tail = BytesMut::with_capacity(CHUNK.max(data.len()));
            }
            self.tail.extend_from_slice(&data);
        } else {
            if !self.tail.is_empty() {
                self.chunks.push_back(self.tail.split().freeze());
            }
            self.chunks.push_back(data);
        }
    }

    fn pop(&mut self) -> Option<Bytes> {
        let chunk = self.take()?;
        self.held -= chunk.len();
        Some(chunk)
    }

    fn take(&mut self) -> Option<Bytes> {
        if let Some(chunk) = self.chunks.front_mut() {
            if chunk.len() <= CHUNK {
                return self.chunks.pop_front();
            }
            return Some(chunk.split_to(CHUNK));
        }
        (!self.tail.is_empty()).then(|| self.tail.split().freeze())
    }

    fn is_empty(&self) -> bool {
        self.chunks.is_empty() && self.tail.is_empty()
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        let mut shared = this.shared.lock();
        if let Some(chunk) = shared.pop() {
            drop(shared);
            // The peer may send as much again. An error here means the stream is gone,
            // which the next poll reports.
            let _ = this.flow.release_capacity(chunk.len());
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        match std::mem::replace(&mut shared.end, End::Finished) {
            End::Open => {
                shared.end = End::Open;
                shared.consumer = Some(cx.waker().clone());
                Poll::Pending
            }
            End::Done(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            End::Done(None) | End::Finished => Poll::Ready(None),
            End::Failed(error) => Poll::Ready(Some(Err(error))),
        }
    }

    fn is_end_stream(&self) -> bool {
        let shared = self.shared.lock();
        shared.is_empty() && matches!(shared.end, End::Finished | End::Done(None))
    }

    fn size_hint(&self) -> SizeHint {
        let shared = self.shared.lock();
        if matches!(shared.end, End::Done(_) | End::Finished) {
            let len = shared.chunks.iter().map(Bytes::len).sum::<usize>() + shared.tail.len();
            SizeHint::with_exact(len as u64)
        } else {
            SizeHint::default()
        }
    }
}

impl Drop for RecvBody {
    fn drop(&mut self) {
        let mut shared = self.shared.lock();
        shared.abandoned = true;
        if let Some(pump) = shared.pump.take() {
            pump.wake();
        }
    }
}

impl std::fmt::Debug for RecvBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBody").finish_non_exhaustive()
    }
}
