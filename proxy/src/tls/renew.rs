//! Renewal of a sidecar's leaf at half its lifetime (SPEC §8).

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Identity, Leaf, TlsError};

/// The longest wait before another try after a failed renewal.
const MAX_RETRY: Duration = Duration::from_secs(60);

/// Renew `identity` every half `lifetime` with the leaf `issue` makes, until `shutdown`.
///
/// `renewed` is told of each new leaf (for metrics and reports) before it is presented.
/// A failed renewal is logged as a warning and tried again after a tenth of the lifetime
/// (at most a minute): the current leaf stays in use meanwhile, and connections made
/// with it are never closed by a renewal.
pub async fn renew<I, R>(
    identity: Arc<Identity>,
    lifetime: Duration,
    mut issue: I,
    mut renewed: R,
    shutdown: CancellationToken,
) where
    I: FnMut() -> Result<Leaf, TlsError>,
    R: FnMut(&Leaf),
{
    let retry = (lifetime / 10).min(MAX_RETRY);
    let mut wait = lifetime / 2;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        match issue() {
            Ok(leaf) => {
                renewed(&leaf);
                tracing::info!(identity = %leaf.identity, serial = %leaf.serial, "certificate renewed");
                identity.replace(leaf);
                wait = lifetime / 2;
            }
            Err(error) => {
                let mut message = error.to_string();
                let mut cause = error.source();
                while let Some(c) = cause {
                    message.push_str(": ");
                    message.push_str(&c.to_string());
                    cause = c.source();
                }
                let (serial, _) = identity.current();
                tracing::warn!(
                    identity = %identity.identity(),
                    %serial,
                    "certificate renewal failed, the current certificate stays in use: {message}"
                );
                wait = retry;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a failing test panics")]

    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::super::{Ca, DEFAULT_LEAF_LIFETIME};
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn renews_at_half_life_and_keeps_the_old_leaf_when_issuing_fails() {
        let ca = Ca::generate("m").unwrap();
        let first = ca.issue("m", "api", DEFAULT_LEAF_LIFETIME).unwrap();
        let first_serial = first.serial.clone();
        let identity = Arc::new(Identity::new(first));
        let lifetime = Duration::from_secs(100);
        let calls = Arc::new(AtomicUsize::new(0));
        let renewed = Arc::new(AtomicUsize::new(0));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(renew(
            Arc::clone(&identity),
            lifetime,
            {
                let calls = Arc::clone(&calls);
                move || {
                    // The first try fails, the next ones succeed.
                    if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                        Err(TlsError::NoPeerIdentity)
                    } else {
                        ca.issue("m", "api", lifetime)
                    }
                }
            },
            {
                let renewed = Arc::clone(&renewed);
                move |_: &Leaf| {
                    renewed.fetch_add(1, Ordering::SeqCst);
                }
            },
            shutdown.clone(),
        ));

        tokio::time::sleep(Duration::from_secs(49)).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "not before half the lifetime"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(identity.current().0, first_serial, "the old leaf stays");
        // Retried after a tenth of the lifetime.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(renewed.load(Ordering::SeqCst), 1);
        let second = identity.current().0;
        assert_ne!(second, first_serial);
        // Then every half lifetime again.
        tokio::time::sleep(Duration::from_secs(51)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_ne!(identity.current().0, second);

        shutdown.cancel();
        task.await.unwrap();
    }
}
