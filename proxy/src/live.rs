//! Settings the runtime replaces while the sidecars run (a reload, a rolling
//! replacement), read by the sidecars per request or per connection.

use std::fmt;
use std::sync::Arc;

use parking_lot::RwLock;

/// A value shared between the runtime, which may replace it at any time, and the
/// sidecars, which read the current one. Cheap to clone: clones share the value. A read
/// is a lock taken for an `Arc` clone; a replacement never waits for readers to finish
/// with the old value.
pub struct Live<T>(Arc<RwLock<Arc<T>>>);

impl<T> Live<T> {
    /// A live value, `value` for now.
    pub fn new(value: T) -> Self {
        Live(Arc::new(RwLock::new(Arc::new(value))))
    }

    /// The current value.
    pub fn get(&self) -> Arc<T> {
        Arc::clone(&self.0.read())
    }

    /// `f` of the current value, without taking a reference to it (for a check on the
    /// hot path).
    pub fn read<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        f(&self.0.read())
    }

    /// Replace the value; readers see `value` from their next read.
    pub fn set(&self, value: T) {
        *self.0.write() = Arc::new(value);
    }
}

impl<T> Clone for Live<T> {
    fn clone(&self) -> Self {
        Live(Arc::clone(&self.0))
    }
}

impl<T: Default> Default for Live<T> {
    fn default() -> Self {
        Live::new(T::default())
    }
}

impl<T> From<T> for Live<T> {
    fn from(value: T) -> Self {
        Live::new(value)
    }
}

impl<T: fmt::Debug> fmt::Debug for Live<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Live").field(&*self.get()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_see_a_replacement_and_old_readers_keep_theirs() {
        let live = Live::new(1);
        let other = live.clone();
        let before = live.get();
        other.set(2);
        assert_eq!(*live.get(), 2);
        assert_eq!(*before, 1);
    }
}
