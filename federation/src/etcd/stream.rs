//! Splitting a byte stream into the JSON objects the gateway writes one after another.
//!
//! The gateway writes each message of a streaming call (`/v3/watch`,
//! `/v3/lease/keepalive`) as one JSON object, usually followed by a newline, but HTTP
//! chunks do not follow message boundaries: one chunk can hold half an object or three.
//! Bytes are therefore accumulated and only complete objects are taken off the front.

use bytes::{Buf, BytesMut};
use serde::de::DeserializeOwned;

/// The largest message accepted. etcd's own default request limit is 1.5 MiB, and a
/// watch response batches events of at most a few requests; anything near this size is
/// not an etcd gateway talking.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Why the stream cannot be read further.
#[derive(Debug)]
pub(crate) enum SplitError {
    /// Bytes that are not JSON, or not the expected object.
    Json(serde_json::Error),
    /// An incomplete object already larger than [`MAX_MESSAGE`].
    TooLarge(usize),
}

/// Bytes received so far and not yet taken as whole objects.
#[derive(Debug, Default)]
pub(crate) struct JsonObjects {
    buffer: BytesMut,
    /// Whether parsing is worth trying: an object that was incomplete can only have been
    /// completed by newer bytes holding its closing brace, so without one, the last
    /// attempt's answer stands. This keeps a large message arriving in many small chunks
    /// from being parsed again from its start for each chunk.
    ready: bool,
}

impl JsonObjects {
    /// Append received bytes.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.ready |= bytes.contains(&b'}');
        self.buffer.extend_from_slice(bytes);
    }

    /// Take the next complete object off the front, or `None` if more bytes are needed.
    pub(crate) fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, SplitError> {
        if !self.ready {
            return self.incomplete();
        }
        let mut objects = serde_json::Deserializer::from_slice(&self.buffer).into_iter::<T>();
        match objects.next() {
            Some(Ok(object)) => {
                let consumed = objects.byte_offset();
                self.buffer.advance(consumed);
                Ok(Some(object))
            }
            Some(Err(e)) if e.is_eof() => {
                self.ready = false;
                self.incomplete()
            }
            Some(Err(e)) => Err(SplitError::Json(e)),
            None => {
                // Only whitespace is left.
                self.buffer.clear();
                self.ready = false;
                Ok(None)
            }
        }
    }

    /// Whether bytes of an incomplete object are waiting (other than whitespace).
    pub(crate) fn has_partial(&self) -> bool {
        self.buffer.iter().any(|b| !b.is_ascii_whitespace())
    }

    fn incomplete<T>(&self) -> Result<Option<T>, SplitError> {
        if self.buffer.len() > MAX_MESSAGE {
            Err(SplitError::TooLarge(self.buffer.len()))
        } else {
            Ok(None)
        }
    }
}

impl std::fmt::Display for SplitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SplitError::Json(e) => write!(f, "not a JSON message: {e}"),
            SplitError::TooLarge(n) => write!(f, "a message longer than {n} bytes"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing test panics")]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn drain(objects: &mut JsonObjects) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(v) = objects.next::<Value>().unwrap() {
            out.push(v);
        }
        out
    }

    #[test]
    fn objects_split_across_chunks_come_out_whole() {
        let text = br#"{"result":{"header":{"revision":"7"},"events":[{"kv":{"key":"YQ=="}}]}}"#;
        let mut objects = JsonObjects::default();
        let mut seen = Vec::new();
        // One byte at a time: every split point, braces inside strings included.
        for byte in text.iter() {
            objects.push(std::slice::from_ref(byte));
            seen.extend(drain(&mut objects));
        }
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0]["result"]["header"]["revision"], json!("7"));
        assert!(!objects.has_partial());
    }

    #[test]
    fn several_objects_in_one_chunk_with_or_without_newlines() {
        let mut objects = JsonObjects::default();
        objects.push(b"{\"a\":1}\n{\"b\":\"}\"}{\"c\":3}\r\n  {\"d\":");
        assert_eq!(
            drain(&mut objects),
            vec![json!({"a":1}), json!({"b":"}"}), json!({"c":3})]
        );
        assert!(objects.has_partial());
        objects.push(b"4}\n");
        assert_eq!(drain(&mut objects), vec![json!({"d":4})]);
        assert!(!objects.has_partial());
    }

    #[test]
    fn garbage_is_an_error_not_a_wait() {
        let mut objects = JsonObjects::default();
        objects.push(b"<html>}");
        assert!(matches!(objects.next::<Value>(), Err(SplitError::Json(_))));
    }
}
