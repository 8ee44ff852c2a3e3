//! A future raced against a [`CancellationToken`] that looks at the token only when the
//! token woke it.
//!
//! `tokio::select!` polls every branch on every wake-up, and a pending
//! `WaitForCancellationFuture` takes the token's waiter lock on each poll. A connection
//! task is woken several times per request and raced against two tokens (the listener's
//! shutdown and the drain deadline), so that polling was measurable on the data path.
//! [`or_cancelled`] gives the token its own waker and polls it only after that waker
//! fired (and once at the start).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;
use pin_project_lite::pin_project;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

pin_project! {
    /// See [`or_cancelled`].
    pub(crate) struct OrCancelled<F> {
        #[pin]
        future: F,
        cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
        signal: Arc<Signal>,
    }
}

/// The waker given to the token: it records that the token fired, then wakes the task.
struct Signal {
    fired: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// `future`'s output, or `None` if `token` is cancelled first (checked before each poll of
/// `future` in which the token may have changed).
pub(crate) fn or_cancelled<F: Future>(future: F, token: CancellationToken) -> OrCancelled<F> {
    OrCancelled {
        future,
        cancelled: Box::pin(token.cancelled_owned()),
        signal: Arc::new(Signal {
            // The token is polled on the first poll, which registers its waker.
            fired: AtomicBool::new(true),
            task: AtomicWaker::new(),
        }),
    }
}

impl<F: Future> Future for OrCancelled<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        this.signal.task.register(cx.waker());
        if this.signal.fired.swap(false, Ordering::AcqRel) {
            let waker = Waker::from(Arc::clone(this.signal));
            let mut token_cx = Context::from_waker(&waker);
            if this.cancelled.as_mut().poll(&mut token_cx).is_ready() {
                return Poll::Ready(None);
            }
        }
        this.future.poll(cx).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn the_future_wins_when_it_ends_first() {
        let token = CancellationToken::new();
        assert_eq!(or_cancelled(async { 7 }, token).await, Some(7));
    }

    #[tokio::test]
    async fn a_token_cancelled_before_the_start_wins() {
        let token = CancellationToken::new();
        token.cancel();
        assert_eq!(or_cancelled(async { 7 }, token).await, None);
    }

    #[tokio::test]
    async fn a_cancellation_wakes_a_pending_future() {
        let token = CancellationToken::new();
        let raced = tokio::spawn(or_cancelled(std::future::pending::<()>(), token.clone()));
        // The spawned task is pending on both; only the token's waker can end it.
        tokio::task::yield_now().await;
        token.cancel();
        let outcome = tokio::time::timeout(Duration::from_secs(5), raced)
            .await
            .expect("the cancellation woke the task")
            .expect("the task did not panic");
        assert_eq!(outcome, None);
    }
}
