//! Background tasks tied to the value that owns them.

use std::future::Future;

use tokio::task::JoinHandle;

/// A spawned task that is aborted when this handle is dropped: a registry's lease keeper,
/// a discovery loop, a connection. Dropping the owner is enough to stop its work.
#[derive(Debug)]
pub(crate) struct AbortOnDrop(JoinHandle<()>);

impl AbortOnDrop {
    /// Spawn `future` on the current Tokio runtime.
    pub(crate) fn spawn<F>(future: F) -> AbortOnDrop
    where
        F: Future<Output = ()> + Send + 'static,
    {
        AbortOnDrop(tokio::spawn(future))
    }

    /// Abort the task and wait until it is gone, so that nothing it was doing can still
    /// happen afterwards.
    pub(crate) async fn stop(mut self, name: &'static str) {
        self.0.abort();
        if let Err(e) = (&mut self.0).await {
            if e.is_panic() {
                tracing::error!(task = name, error = %e, "task panicked");
            }
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
