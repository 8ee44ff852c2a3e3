//! Failures the mesh produces itself (SPEC §1 "Failures the mesh produces itself"), and
//! the typed errors of forwarding one try, which carry their retryability as data.
//!
//! A [`MeshError`] is never anonymous: it names its [`ErrorKind`], the service, the
//! endpoints tried and the number of tries, and renders as
//! `mesh: <kind>: service=<svc> tried=<svc.i,…|none> attempts=<n>: <detail>`, either as a
//! `text/plain` body (http) or as a gRPC trailers-only response (grpc).

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::http::BoxError;

use crate::Protocol;

/// Response header naming the kind of a mesh-produced failure.
pub const HDR_ERROR: HeaderName = HeaderName::from_static("x-mesh-error");

/// Internal response header from an inbound to the caller's outbound: why the app did not
/// answer (the detail of the inbound's error line), which the outbound's own error line
/// repeats. Removed by the outbound.
pub const HDR_DETAIL: HeaderName = HeaderName::from_static("x-mesh-detail");

/// The kind of a failure the mesh produced itself, with its HTTP status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// No ready endpoint within `queue_timeout` (503).
    NoEndpoints,
    /// The next hop refused the connection, or its handshake failed (502).
    ConnectFailed,
    /// The app closed the connection before response headers (502).
    Reset,
    /// `timeout` fired before response headers (504).
    Timeout,
    /// Every endpoint is ejected by the circuit breaker (503).
    CircuitOpen,
    /// `max_concurrent` reached and the queue wait ran out (503).
    Overloaded,
    /// The rate limit refused the request (429, `Retry-After` in whole seconds).
    RateLimited {
        /// When to try again, in seconds (at least 1).
        retry_after_secs: u64,
    },
    /// The caller is not admitted to the service (403).
    Unauthorized,
    /// An injected fault aborted the request with the configured status.
    Fault {
        /// The configured abort status.
        status: StatusCode,
    },
}

impl ErrorKind {
    /// The name used in `x-mesh-error` and in the message.
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorKind::NoEndpoints => "no-endpoints",
            ErrorKind::ConnectFailed => "connect-failed",
            ErrorKind::Reset => "reset",
            ErrorKind::Timeout => "timeout",
            ErrorKind::CircuitOpen => "circuit-open",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::RateLimited { .. } => "rate-limited",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Fault { .. } => "fault",
        }
    }

    /// The HTTP status of the http form.
    pub fn status(&self) -> StatusCode {
        match self {
            ErrorKind::NoEndpoints | ErrorKind::CircuitOpen | ErrorKind::Overloaded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorKind::ConnectFailed | ErrorKind::Reset => StatusCode::BAD_GATEWAY,
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Unauthorized => StatusCode::FORBIDDEN,
            ErrorKind::Fault { status } => *status,
        }
    }

    /// The `grpc-status` of the grpc form: DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED,
    /// PERMISSION_DENIED, else UNAVAILABLE.
    pub fn grpc_status(&self) -> u32 {
        match self {
            ErrorKind::Timeout => 4,
            ErrorKind::RateLimited { .. } => 8,
            ErrorKind::Unauthorized => 7,
            _ => 14,
        }
    }

    /// The kinds a next hop reports without extra data, parsed from `x-mesh-error`
    /// (`None` for kinds that carry data, and for unknown names).
    pub fn parse_simple(name: &str) -> Option<ErrorKind> {
        Some(match name {
            "no-endpoints" => ErrorKind::NoEndpoints,
            "connect-failed" => ErrorKind::ConnectFailed,
            "reset" => ErrorKind::Reset,
            "timeout" => ErrorKind::Timeout,
            "circuit-open" => ErrorKind::CircuitOpen,
            "overloaded" => ErrorKind::Overloaded,
            "unauthorized" => ErrorKind::Unauthorized,
            _ => return None,
        })
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure the mesh produced itself, answered to the caller in place of a response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshError {
    /// What went wrong.
    pub kind: ErrorKind,
    /// The called service.
    pub service: String,
    /// The endpoints tried, in order (`service.replica`).
    pub tried: Vec<Arc<str>>,
    /// The number of tries made.
    pub attempts: u32,
    /// A human-readable detail (one line).
    pub detail: String,
}

impl fmt::Display for MeshError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "mesh: {}: service={} tried=",
            self.kind.as_str(),
            self.service
        )?;
        if self.tried.is_empty() {
            f.write_str("none")?;
        } else {
            for (i, id) in self.tried.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                f.write_str(id)?;
            }
        }
        // The detail may come from an io error or a peer: keep the message one line.
        let detail = self.detail.replace(['\r', '\n'], " ");
        write!(f, " attempts={}: {}", self.attempts, detail)
    }
}

impl std::error::Error for MeshError {}

impl MeshError {
    /// The response the caller gets: `text/plain` one-line body for http, trailers-only
    /// gRPC response (HTTP 200) for grpc; `x-mesh-error` in both.
    pub fn to_response(&self, protocol: Protocol) -> Response<Full<Bytes>> {
        let line = self.to_string();
        let kind = HeaderValue::from_static(self.kind.as_str());
        let mut response = if protocol == Protocol::Grpc {
            let mut response = Response::new(Full::new(Bytes::new()));
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            headers.insert("grpc-status", HeaderValue::from(self.kind.grpc_status()));
            // Percent-encoding leaves only visible ASCII, always a valid header value.
            if let Ok(message) = HeaderValue::from_str(&grpc_percent_encode(&line)) {
                headers.insert("grpc-message", message);
            }
            response
        } else {
            let mut response = Response::new(Full::new(Bytes::from(format!("{line}\n"))));
            *response.status_mut() = self.kind.status();
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            response
        };
        let headers = response.headers_mut();
        headers.insert(HDR_ERROR, kind);
        if let ErrorKind::RateLimited { retry_after_secs } = self.kind {
            headers.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs.max(1)));
        }
        response
    }
}

/// Percent-encode a `grpc-message` value as the gRPC HTTP/2 protocol requires: every
/// byte outside printable ASCII (0x20–0x7E), and `%` itself, becomes `%XX`.
pub fn grpc_percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Whether a failed try may be tried again, decided by where it failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retryable {
    /// Nothing of the request left this sidecar: retry with the same request.
    Unsent,
    /// The request certainly never reached an app (connect failure after the body was
    /// handed over, REFUSED_STREAM, a stream above a GOAWAY's last id): retry if the
    /// body can be replayed.
    NotProcessed,
    /// The request may have reached the app: retry only a safe method without a body.
    MaybeProcessed,
}

/// Why one try to a next hop (an inbound, or the app) failed before response headers.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The TCP connect failed.
    #[error("connect to {addr} failed")]
    Connect {
        /// The address connected to.
        addr: SocketAddr,
        /// The connect error.
        #[source]
        source: io::Error,
    },
    /// The HTTP handshake over a fresh connection failed.
    #[error("handshake with {addr} failed")]
    Handshake {
        /// The address connected to.
        addr: SocketAddr,
        /// The handshake error.
        #[source]
        source: BoxError,
    },
    /// The TLS handshake with the next hop (an inbound) failed: another CA, another
    /// identity than the service's, an expired certificate, or not TLS at all.
    #[error("tls handshake with {addr} failed")]
    Tls {
        /// The address connected to.
        addr: SocketAddr,
        /// The handshake error.
        #[source]
        source: crate::tls::TlsError,
    },
    /// The request was not sent (the pooled connection closed before it was taken).
    #[error("connection to {addr} closed before the request was sent")]
    NotSent {
        /// The peer address.
        addr: SocketAddr,
        /// The error the HTTP stack gave.
        #[source]
        source: BoxError,
    },
    /// The peer refused the stream before processing it (REFUSED_STREAM or GOAWAY).
    #[error("{addr} refused the stream before processing it")]
    Refused {
        /// The peer address.
        addr: SocketAddr,
        /// The error the HTTP stack gave.
        #[source]
        source: BoxError,
    },
    /// The next hop answered bytes that are not HTTP (or broke the HTTP/2 protocol).
    #[error("protocol error: {addr} answered with something that is not a valid HTTP response")]
    Protocol {
        /// The peer address.
        addr: SocketAddr,
        /// The error the HTTP stack gave.
        #[source]
        source: BoxError,
    },
    /// The connection or stream broke before response headers.
    #[error("{addr} closed the connection before response headers")]
    Reset {
        /// The peer address.
        addr: SocketAddr,
        /// The error the HTTP stack gave.
        #[source]
        source: BoxError,
    },
}

impl ForwardError {
    /// Classify a hyper error of a request that was handed to the connection.
    pub fn from_send(addr: SocketAddr, source: hyper::Error) -> Self {
        if source.is_parse() || source.is_parse_status() {
            return ForwardError::Protocol {
                addr,
                source: source.into(),
            };
        }
        Self::classify(addr, source.into())
    }

    /// Classify an h2 error of a request that was handed to the connection.
    pub fn from_h2(addr: SocketAddr, source: h2::Error) -> Self {
        Self::classify(addr, source.into())
    }

    fn classify(addr: SocketAddr, source: BoxError) -> Self {
        if is_refused(&*source) {
            ForwardError::Refused { addr, source }
        } else if is_protocol(&*source) {
            ForwardError::Protocol { addr, source }
        } else {
            ForwardError::Reset { addr, source }
        }
    }

    /// How far the request got.
    pub fn retryable(&self) -> Retryable {
        match self {
            ForwardError::Connect { .. }
            | ForwardError::Handshake { .. }
            | ForwardError::Tls { .. }
            | ForwardError::NotSent { .. } => Retryable::Unsent,
            ForwardError::Refused { .. } => Retryable::NotProcessed,
            ForwardError::Reset { .. } | ForwardError::Protocol { .. } => Retryable::MaybeProcessed,
        }
    }

    /// Whether the next hop could not be connected to at all (the endpoint is down).
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            ForwardError::Connect { .. }
                | ForwardError::Handshake { .. }
                | ForwardError::Tls { .. }
        )
    }

    /// Whether the peer reset the stream with `PROTOCOL_ERROR` (an HTTP/2 server that
    /// does not support what was sent, such as extended CONNECT without
    /// SETTINGS_ENABLE_CONNECT_PROTOCOL).
    pub fn is_protocol_error(&self) -> bool {
        matches!(self, ForwardError::Protocol { .. })
    }

    /// The kind a caller sees when this is the last try.
    pub fn kind(&self) -> ErrorKind {
        if self.retryable() == Retryable::Unsent {
            ErrorKind::ConnectFailed
        } else {
            ErrorKind::Reset
        }
    }

    /// This error and its causes on one line, for a [`MeshError`] detail or a log.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut cause = self.source();
        while let Some(err) = cause {
            out.push_str(": ");
            out.push_str(&err.to_string());
            cause = err.source();
        }
        out
    }
}

/// Whether `err` says the HTTP/2 peer did not process the stream: REFUSED_STREAM, or a
/// GOAWAY (a stream failed by a GOAWAY is above its last stream id, hence unprocessed).
fn is_refused(err: &(dyn StdError + 'static)) -> bool {
    h2_cause(err).is_some_and(|h2| {
        h2.reason() == Some(h2::Reason::REFUSED_STREAM) || (h2.is_go_away() && h2.is_remote())
    })
}

/// Whether `err` says the HTTP/2 peer broke the protocol or found us to (a stream or
/// connection error with PROTOCOL_ERROR, such as an HTTP/2 server that does not support
/// extended CONNECT, or a peer that does not speak HTTP/2 at all).
fn is_protocol(err: &(dyn StdError + 'static)) -> bool {
    h2_cause(err).is_some_and(|h2| h2.reason() == Some(h2::Reason::PROTOCOL_ERROR))
}

/// The first h2 error in `err`'s chain, `err` included.
fn h2_cause<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a h2::Error> {
    let mut cause: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cause {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return Some(h2);
        }
        cause = e.source();
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing test panics")]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn error(kind: ErrorKind, tried: &[&str]) -> MeshError {
        MeshError {
            kind,
            service: "api".into(),
            tried: tried.iter().map(|s| Arc::from(*s)).collect(),
            attempts: tried.len() as u32,
            detail: "boom".into(),
        }
    }

    #[tokio::test]
    async fn http_form() {
        let response = error(ErrorKind::Reset, &["api.0", "api.1"]).to_response(Protocol::Http);
        assert_eq!(response.status(), 502);
        assert_eq!(response.headers()[HDR_ERROR], "reset");
        assert_eq!(response.headers()[CONTENT_TYPE], "text/plain");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            body,
            "mesh: reset: service=api tried=api.0,api.1 attempts=2: boom\n"
        );
    }

    #[test]
    fn statuses_and_tried_none() {
        let e = error(ErrorKind::NoEndpoints, &[]);
        assert_eq!(
            e.to_string(),
            "mesh: no-endpoints: service=api tried=none attempts=0: boom"
        );
        let r = error(
            ErrorKind::RateLimited {
                retry_after_secs: 0,
            },
            &[],
        )
        .to_response(Protocol::Http);
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()[RETRY_AFTER], "1");
        let r = error(
            ErrorKind::Fault {
                status: StatusCode::IM_A_TEAPOT,
            },
            &[],
        )
        .to_response(Protocol::Http);
        assert_eq!(r.status(), 418);
        assert_eq!(r.headers()[HDR_ERROR], "fault");
        for (kind, status) in [
            (ErrorKind::ConnectFailed, 502),
            (ErrorKind::Timeout, 504),
            (ErrorKind::CircuitOpen, 503),
            (ErrorKind::Overloaded, 503),
            (ErrorKind::Unauthorized, 403),
        ] {
            assert_eq!(kind.status(), status);
            assert_eq!(ErrorKind::parse_simple(kind.as_str()), Some(kind));
        }
    }

    #[test]
    fn grpc_form() {
        let mut e = error(ErrorKind::Timeout, &["api.0"]);
        e.detail = "100% gone\né".into();
        let r = e.to_response(Protocol::Grpc);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()[CONTENT_TYPE], "application/grpc");
        assert_eq!(r.headers()["grpc-status"], "4");
        assert_eq!(r.headers()[HDR_ERROR], "timeout");
        assert_eq!(
            r.headers()["grpc-message"],
            "mesh: timeout: service=api tried=api.0 attempts=1: 100%25 gone %C3%A9"
        );
        assert!(hyper::body::Body::is_end_stream(r.body()));
        assert_eq!(
            error(ErrorKind::Unauthorized, &[])
                .to_response(Protocol::Grpc)
                .headers()["grpc-status"],
            "7"
        );
        assert_eq!(
            error(
                ErrorKind::RateLimited {
                    retry_after_secs: 2
                },
                &[]
            )
            .to_response(Protocol::Grpc)
            .headers()["grpc-status"],
            "8"
        );
        assert_eq!(
            error(ErrorKind::NoEndpoints, &[])
                .to_response(Protocol::Grpc)
                .headers()["grpc-status"],
            "14"
        );
    }
}
