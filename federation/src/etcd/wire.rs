//! The gateway's JSON forms of etcd's protobuf messages.
//!
//! The gateway marshals with proto3's JSON mapping: 64-bit integers are JSON strings
//! (`"revision":"42"`), `bytes` fields are standard base64 with padding, and a field equal
//! to its default is left out (no `kvs` when nothing matched, no `TTL` when the lease is
//! gone, no `type` for a PUT event). Every response field here is therefore optional with
//! its default, and integers are read from strings or numbers alike.

use std::fmt::Display;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

// === Requests ===

#[derive(Serialize)]
pub(super) struct RangeRequest {
    pub(super) key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) range_end: Option<String>,
}

#[derive(Serialize)]
pub(super) struct PutRequest {
    pub(super) key: String,
    pub(super) value: String,
    #[serde(skip_serializing_if = "is_zero", serialize_with = "int_as_string")]
    pub(super) lease: i64,
}

#[derive(Serialize)]
pub(super) struct DeleteRangeRequest {
    pub(super) key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) range_end: Option<String>,
}

#[derive(Serialize)]
pub(super) struct LeaseGrantRequest {
    #[serde(rename = "TTL", serialize_with = "int_as_string")]
    pub(super) ttl: i64,
}

#[derive(Serialize)]
pub(super) struct LeaseIdRequest {
    #[serde(rename = "ID", serialize_with = "int_as_string")]
    pub(super) id: i64,
}

#[derive(Serialize)]
pub(super) struct CompactionRequest {
    #[serde(serialize_with = "int_as_string")]
    pub(super) revision: i64,
    pub(super) physical: bool,
}

#[derive(Serialize)]
pub(super) struct WatchRequest {
    pub(super) create_request: WatchCreateRequest,
}

#[derive(Serialize)]
pub(super) struct WatchCreateRequest {
    pub(super) key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) range_end: Option<String>,
    #[serde(skip_serializing_if = "is_zero", serialize_with = "int_as_string")]
    pub(super) start_revision: i64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(super) prev_kv: bool,
}

// === Responses ===

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct Header {
    #[serde(deserialize_with = "int")]
    pub(super) cluster_id: u64,
    #[serde(deserialize_with = "int")]
    pub(super) member_id: u64,
    #[serde(deserialize_with = "int")]
    pub(super) revision: i64,
    #[serde(deserialize_with = "int")]
    pub(super) raft_term: u64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct KeyValue {
    pub(super) key: String,
    pub(super) value: String,
    #[serde(deserialize_with = "int")]
    pub(super) create_revision: i64,
    #[serde(deserialize_with = "int")]
    pub(super) mod_revision: i64,
    #[serde(deserialize_with = "int")]
    pub(super) version: i64,
    #[serde(deserialize_with = "int")]
    pub(super) lease: i64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct RangeResponse {
    pub(super) header: Header,
    pub(super) kvs: Vec<KeyValue>,
    pub(super) more: bool,
    #[serde(deserialize_with = "int")]
    pub(super) count: i64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct HeaderOnly {
    pub(super) header: Header,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct DeleteRangeResponse {
    pub(super) header: Header,
    #[serde(deserialize_with = "int")]
    pub(super) deleted: i64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct LeaseGrantResponse {
    pub(super) header: Header,
    #[serde(rename = "ID", deserialize_with = "int")]
    pub(super) id: i64,
    #[serde(rename = "TTL", deserialize_with = "int")]
    pub(super) ttl: i64,
    pub(super) error: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct LeaseKeepAliveResponse {
    #[serde(rename = "TTL", deserialize_with = "int")]
    pub(super) ttl: i64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct WatchResponse {
    pub(super) header: Header,
    pub(super) created: bool,
    pub(super) canceled: bool,
    #[serde(deserialize_with = "int")]
    pub(super) compact_revision: i64,
    pub(super) cancel_reason: String,
    pub(super) events: Vec<Event>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct Event {
    /// `"PUT"` (left out, being the default) or `"DELETE"`; a number in gateways that
    /// write enums as numbers.
    #[serde(rename = "type")]
    pub(super) kind: Option<serde_json::Value>,
    pub(super) kv: KeyValue,
    pub(super) prev_kv: Option<KeyValue>,
}

impl Event {
    pub(super) fn is_delete(&self) -> bool {
        match &self.kind {
            Some(serde_json::Value::String(s)) => s == "DELETE",
            Some(serde_json::Value::Number(n)) => n.as_i64() == Some(1),
            _ => false,
        }
    }
}

/// One message of a streaming call: `{"result":{…}}` or `{"error":{…}}`.
#[derive(Deserialize)]
pub(super) struct StreamMessage<T> {
    pub(super) result: Option<T>,
    pub(super) error: Option<serde_json::Value>,
}

/// The body of a failed call: `{"error":"…","message":"…","code":5}` for a unary call,
/// `{"error":{"grpc_code":5,"http_code":404,"message":"…"}}` inside a stream.
pub(super) struct GatewayError {
    pub(super) code: i32,
    pub(super) http_code: Option<u16>,
    pub(super) message: String,
}

impl GatewayError {
    /// Read an error body, whichever of the two forms it has. `None` if it has neither.
    pub(super) fn from_body(body: &serde_json::Value) -> Option<GatewayError> {
        match body.get("error")? {
            serde_json::Value::Object(inner) => Some(GatewayError {
                code: inner
                    .get("grpc_code")
                    .or_else(|| inner.get("code"))
                    .and_then(serde_json::Value::as_i64)
                    .and_then(|c| i32::try_from(c).ok())
                    .unwrap_or_default(),
                http_code: inner
                    .get("http_code")
                    .and_then(serde_json::Value::as_u64)
                    .and_then(|c| u16::try_from(c).ok()),
                message: text(inner.get("message")),
            }),
            error => Some(GatewayError {
                code: body
                    .get("code")
                    .and_then(serde_json::Value::as_i64)
                    .and_then(|c| i32::try_from(c).ok())
                    .unwrap_or_default(),
                http_code: None,
                message: match body.get("message") {
                    Some(serde_json::Value::String(m)) if !m.is_empty() => m.clone(),
                    _ => text(Some(error)),
                },
            }),
        }
    }
}

fn text(value: Option<&serde_json::Value>) -> String {
    match value {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

// === Encodings ===

pub(super) fn encode(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

pub(super) fn decode(field: &str, text: &str) -> Result<Vec<u8>, String> {
    BASE64
        .decode(text)
        .map_err(|e| format!("`{field}` is not base64: {e}"))
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

fn int_as_string<S: Serializer>(n: &i64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(n)
}

/// An integer written as a JSON string, as proto3 writes 64-bit integers, or as a number.
fn int<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr + Deserialize<'de>,
    T::Err: Display,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int<T> {
        Number(T),
        Text(String),
    }
    match Int::<T>::deserialize(deserializer)? {
        Int::Number(n) => Ok(n),
        Int::Text(s) => s.parse().map_err(D::Error::custom),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing test panics")]
mod tests {
    use super::*;

    #[test]
    fn defaults_left_out_read_as_defaults() {
        let r: RangeResponse = serde_json::from_str(
            r#"{"header":{"cluster_id":"15118495548433857066","revision":"3"}}"#,
        )
        .unwrap();
        assert_eq!(r.header.revision, 3);
        assert_eq!(r.header.cluster_id, 15_118_495_548_433_857_066);
        assert!(r.kvs.is_empty());
        assert_eq!(r.count, 0);
        assert!(!r.more);
    }

    #[test]
    fn requests_write_int64_as_strings_and_leave_defaults_out() {
        let put = PutRequest {
            key: encode(b"k"),
            value: encode(b""),
            lease: 7_587_869_580_023_849_991,
        };
        assert_eq!(
            serde_json::to_string(&put).unwrap(),
            r#"{"key":"aw==","value":"","lease":"7587869580023849991"}"#
        );
        let put = PutRequest {
            key: encode(b"k"),
            value: encode(b"v"),
            lease: 0,
        };
        assert_eq!(
            serde_json::to_string(&put).unwrap(),
            r#"{"key":"aw==","value":"dg=="}"#
        );
    }

    #[test]
    fn both_error_forms_are_read() {
        let unary: serde_json::Value = serde_json::from_str(
            r#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#,
        )
        .unwrap();
        let e = GatewayError::from_body(&unary).unwrap();
        assert_eq!(
            (e.code, e.message.as_str()),
            (5, "etcdserver: requested lease not found")
        );

        let stream: serde_json::Value = serde_json::from_str(
            r#"{"error":{"grpc_code":14,"http_code":503,"message":"unavailable","http_status":"Service Unavailable"}}"#,
        )
        .unwrap();
        let e = GatewayError::from_body(&stream).unwrap();
        assert_eq!(
            (e.code, e.http_code, e.message.as_str()),
            (14, Some(503), "unavailable")
        );
    }

    #[test]
    fn delete_events_are_told_from_puts() {
        let w: WatchResponse = serde_json::from_str(
            r#"{"header":{"revision":"6"},"events":[{"kv":{"key":"YTE=","value":"eA=="}},{"type":"DELETE","kv":{"key":"YTE=","mod_revision":"6"}}]}"#,
        )
        .unwrap();
        assert!(!w.events[0].is_delete());
        assert!(w.events[1].is_delete());
        assert_eq!(w.events[1].kv.mod_revision, 6);
    }
}
