//! `/api/events`: one server-sent-events stream per open page (SPEC §5 "it updates live").
//!
//! # Theory of operation
//!
//! A [`Hub`] holds the open streams, each a bounded queue of encoded events
//! ([`CLIENT_BUFFER`]) that its response body takes from. Whoever produces an event (the
//! admin server's one event task: a replica's status changed, the 1 s tick, new calls,
//! the keep-alive) encodes it once and offers the same bytes to every stream with
//! `try_send`: it never waits for a reader. A stream whose queue is full has a reader
//! that does not keep up: it is cut (its connection closed through the token it was
//! opened with), and the page's `EventSource` opens a new one, which starts with a full
//! snapshot, so nothing is lost but time. So a slow or stalled page costs at most its
//! queue, and never slows the mesh or another page.
//!
//! At most [`MAX_CLIENTS`] streams are open at once; one more is answered 503. A stream
//! counts until its body is dropped (the connection closed), so a closed tab frees its
//! place at once.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::api::Period;

/// Streams open at once at most; one more gets 503.
pub(crate) const MAX_CLIENTS: usize = 16;
/// Events queued for one stream at most; a stream whose queue is full is cut.
pub(crate) const CLIENT_BUFFER: usize = 32;
/// The windowed figures are sent this often.
pub(crate) const TICK: Duration = Duration::from_secs(1);
/// A comment line is sent this often, so that proxies and the browser keep the stream.
pub(crate) const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The open streams.
#[derive(Default)]
pub(crate) struct Hub {
    clients: Mutex<Vec<Client>>,
    /// Streams whose body is alive (a full queue cuts a client out of `clients` at
    /// once, but its place is free only once its connection is gone).
    open: Arc<AtomicUsize>,
}

/// One stream, as the hub sees it.
struct Client {
    queue: mpsc::Sender<Bytes>,
    period: Period,
    /// Closes the stream's connection.
    cut: CancellationToken,
}

/// The body of an `/api/events` response: the events of its queue as they come.
pub(crate) struct EventBody {
    queue: mpsc::Receiver<Bytes>,
    _place: Place,
}

/// A stream's place among [`MAX_CLIENTS`], given back when dropped.
struct Place(Arc<AtomicUsize>);

/// Where an event goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum To {
    All,
    /// The streams opened with this period.
    Period(Period),
}

// === impl Hub ===

impl Hub {
    /// Open a stream whose first event is `first()`, computed under the hub's lock so
    /// that no event sent after it reaches the stream before it. `cut` closes the
    /// stream's connection. `None` when [`MAX_CLIENTS`] streams are open.
    pub(crate) fn open(
        &self,
        period: Period,
        cut: CancellationToken,
        first: impl FnOnce() -> Bytes,
    ) -> Option<EventBody> {
        self.open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_CLIENTS).then_some(n + 1)
            })
            .ok()?;
        let place = Place(Arc::clone(&self.open));
        let (queue, rx) = mpsc::channel(CLIENT_BUFFER);
        let mut clients = self.clients.lock();
        // A fresh queue has room for one event.
        let _ = queue.try_send(first());
        clients.push(Client { queue, period, cut });
        Some(EventBody {
            queue: rx,
            _place: place,
        })
    }

    /// The periods of the open streams: the figures to compute.
    pub(crate) fn periods(&self) -> BTreeSet<Period> {
        self.clients.lock().iter().map(|c| c.period).collect()
    }

    /// Whether any stream is open.
    pub(crate) fn is_empty(&self) -> bool {
        self.clients.lock().is_empty()
    }

    /// Offer `event` to the streams `to` names; cut those whose queue is full, forget
    /// those whose reader is gone.
    pub(crate) fn send(&self, to: To, event: &Bytes) {
        self.clients.lock().retain(|c| {
            if to != To::All && to != To::Period(c.period) {
                return !c.queue.is_closed();
            }
            match c.queue.try_send(event.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::debug!("a dashboard stream fell behind: closed");
                    c.cut.cancel();
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    /// Streams whose body is alive.
    #[cfg(test)]
    pub(crate) fn open_count(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

// === impl EventBody ===

impl Body for EventBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.queue
            .poll_recv(cx)
            .map(|event| event.map(|bytes| Ok(Frame::data(bytes))))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

// === events ===

/// One event: `event: NAME` and its JSON on one `data:` line (serde_json's compact form
/// has no newline).
pub(crate) fn event(name: &str, data: &impl Serialize) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    if serde_json::to_writer(&mut out, data).is_err() {
        out.extend_from_slice(b"null");
    }
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// The keep-alive comment.
pub(crate) fn keep_alive() -> Bytes {
    Bytes::from_static(b": keep-alive\n\n")
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;

    use super::*;

    fn first() -> Bytes {
        Bytes::from_static(b"event: snapshot\ndata: {}\n\n")
    }

    #[tokio::test]
    async fn a_stream_starts_with_its_snapshot_then_gets_what_is_sent() {
        let hub = Hub::default();
        let mut body = hub
            .open(Period::OneMinute, CancellationToken::new(), first)
            .expect("a place");
        hub.send(To::All, &event("tick", &serde_json::json!({"n": 1})));
        hub.send(To::Period(Period::TenSeconds), &event("tick", &1));
        hub.send(To::Period(Period::OneMinute), &keep_alive());
        let mut got = Vec::new();
        for _ in 0..3 {
            let frame = body.frame().await.expect("frame").expect("ok");
            got.push(frame.into_data().expect("data"));
        }
        assert_eq!(got[0], first());
        assert_eq!(
            got[1],
            Bytes::from_static(b"event: tick\ndata: {\"n\":1}\n\n")
        );
        assert_eq!(got[2], keep_alive());
        assert_eq!(hub.periods(), BTreeSet::from([Period::OneMinute]));
    }

    /// A reader that never reads: its queue fills, the stream is cut (its connection
    /// token cancelled) and forgotten, and the sender never waited; another stream
    /// goes on.
    #[tokio::test]
    async fn a_stalled_reader_is_cut_and_never_blocks() {
        let hub = Hub::default();
        let stalled_cut = CancellationToken::new();
        let _stalled = hub
            .open(Period::TenSeconds, stalled_cut.clone(), first)
            .expect("a place");
        let mut live = hub
            .open(Period::TenSeconds, CancellationToken::new(), first)
            .expect("a place");
        let started = std::time::Instant::now();
        for i in 0..(CLIENT_BUFFER * 4) {
            hub.send(To::All, &event("tick", &i));
            // The live reader keeps up.
            let _ = live.frame().await;
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(stalled_cut.is_cancelled());
        assert_eq!(hub.clients.lock().len(), 1);
    }

    #[tokio::test]
    async fn places_are_bounded_and_given_back() {
        let hub = Hub::default();
        let bodies: Vec<EventBody> = (0..MAX_CLIENTS)
            .map(|_| {
                hub.open(Period::TenSeconds, CancellationToken::new(), first)
                    .expect("a place")
            })
            .collect();
        assert!(
            hub.open(Period::TenSeconds, CancellationToken::new(), first)
                .is_none()
        );
        assert_eq!(hub.open_count(), MAX_CLIENTS);
        drop(bodies);
        assert_eq!(hub.open_count(), 0);
        // Closed readers are forgotten at the next event.
        hub.send(To::All, &keep_alive());
        assert!(hub.is_empty());
        assert!(
            hub.open(Period::TenSeconds, CancellationToken::new(), first)
                .is_some()
        );
    }
}
