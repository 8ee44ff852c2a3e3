//! A client of etcd v3 through its JSON gateway.
//!
//! Every etcd member serves, beside gRPC, a gateway that takes the same calls as JSON
//! over HTTP: `POST /v3/kv/range` with `{"key":"…"}` and so on. Speaking it needs no
//! generated code and no gRPC stack, only an HTTP/1.1 client. What the gateway's JSON
//! looks like is described in the `wire` module: 64-bit integers are strings, keys and
//! values are base64, and fields equal to their default are left out.
//!
//! # Endpoints
//!
//! A [`Client`] is given the `http://host:port` URLs of one cluster's members. A call
//! goes to the member that answered last; when a member cannot be connected to (refused,
//! unreachable, or no connection within [`Client::with_connect_timeout`]'s limit), the
//! next is tried, and the call fails with [`Error::Unreachable`] only once every member
//! failed. A call that failed after it was sent (a timeout, a broken connection) is not
//! sent again, since etcd may have carried it out, but the next call starts at the next
//! member.
//!
//! # Timeouts
//!
//! A unary call (everything but [`Client::watch`]) has [`Client::with_request_timeout`]
//! to be answered in whole once connected; a watch has it to be answered at all, and is
//! then open for as long as the caller reads it.
//!
//! # Watches over HTTP/1.1
//!
//! The gateway starts a watch only once the request body is complete: a request body
//! left open for more watch requests (as a gRPC client would use its stream) is never
//! answered. Each [`Watch`] is therefore one HTTP request with one fixed-length
//! `create_request` body, on a connection of its own, and its answer is a body that
//! never ends by itself: one JSON object per watch response, which [`Watch::next`] cuts
//! out of the bytes whatever their chunking.

mod stream;
mod wire;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::task::AbortOnDrop;
use stream::JsonObjects;

/// gRPC's `NOT_FOUND`: for lease calls, and for a put under a lease, the lease does not
/// exist (it expired, was revoked, or etcd lost its data).
const GRPC_NOT_FOUND: i32 = 5;
/// gRPC's `OUT_OF_RANGE`: the revision asked for has been compacted.
const GRPC_OUT_OF_RANGE: i32 = 11;

/// A client of one etcd cluster's JSON gateway. Cheap to clone; clones share the
/// knowledge of which member answered last.
#[derive(Clone, Debug)]
pub struct Client {
    members: Arc<Members>,
    request_timeout: Duration,
    connect_timeout: Duration,
}

/// The id etcd gave a lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

/// A granted lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// Its id, to put keys under and to keep alive.
    pub id: LeaseId,
    /// The time to live etcd granted, which can be longer than the one asked for (etcd
    /// has a minimum).
    pub ttl: Duration,
}

/// The header of every etcd response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResponseHeader {
    /// The cluster that answered.
    pub cluster_id: u64,
    /// The member that answered.
    pub member_id: u64,
    /// The store's revision when the call was carried out.
    pub revision: i64,
    /// The member's Raft term.
    pub raft_term: u64,
}

/// A key and its value, as etcd stores them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyValue {
    /// The key's bytes.
    pub key: Vec<u8>,
    /// The value's bytes (empty in a delete event).
    pub value: Vec<u8>,
    /// The revision of the key's creation.
    pub create_revision: i64,
    /// The revision of the key's last change.
    pub mod_revision: i64,
    /// How many times the key was written since its creation.
    pub version: i64,
    /// The lease the key is attached to, 0 for none.
    pub lease: i64,
}

/// What `range` found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeResponse {
    /// The revision the range was read at.
    pub header: ResponseHeader,
    /// The keys found, in key order.
    pub kvs: Vec<KeyValue>,
    /// How many keys matched.
    pub count: i64,
}

/// What `delete_range` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeleteResponse {
    /// The revision after the deletion.
    pub header: ResponseHeader,
    /// How many keys were deleted.
    pub deleted: i64,
}

/// What to watch: `key`, or the keys from `key` to `range_end` (excluded).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchRequest {
    /// The key, or the first key of the range.
    pub key: Vec<u8>,
    /// The end of the range (excluded); `None` watches `key` alone.
    pub range_end: Option<Vec<u8>>,
    /// The first revision to report; 0 means from the next change on.
    pub start_revision: i64,
    /// Whether events carry the key's previous value.
    pub prev_kv: bool,
}

/// One message of a watch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchResponse {
    /// The store's revision when the message was sent.
    pub header: ResponseHeader,
    /// The first message of a watch says it was created.
    pub created: bool,
    /// The watch ended: no message follows.
    pub canceled: bool,
    /// Set when the watch was canceled because `start_revision` (or the next revision
    /// it had to report) was compacted: the oldest revision still available. Whoever
    /// needs the whole history must read the current state again (list) instead.
    pub compact_revision: i64,
    /// Why the watch was canceled, when etcd said.
    pub cancel_reason: String,
    /// The changes, in revision order. Changes made by one transaction (a lease's
    /// revocation deleting all its keys, for one) share a revision and come in one
    /// message.
    pub events: Vec<Event>,
}

/// One change of a watched key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Whether the key was written or deleted.
    pub kind: EventKind,
    /// The key after the change (for a delete: the key and the revision of the delete).
    pub kv: KeyValue,
    /// The key before the change, if the watch asked for it and there was one.
    pub prev_kv: Option<KeyValue>,
}

/// Whether an event wrote or deleted its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The key was created or changed.
    Put,
    /// The key was deleted (or its lease ended).
    Delete,
}

/// An open watch: the messages etcd sends, as they come.
#[derive(Debug)]
pub struct Watch {
    endpoint: Arc<str>,
    body: Incoming,
    objects: JsonObjects,
    /// The connection's task, which ends with the watch.
    _connection: AbortOnDrop,
}

/// An etcd call that failed. Each variant names the call and the member.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A client was made without any endpoint.
    #[error("no etcd endpoint given")]
    NoEndpoints,
    /// An endpoint is not an `http://host:port` URL.
    #[error("etcd endpoint `{endpoint}` is not an http://host:port URL: {reason}")]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No member could be connected to.
    #[error("{call}: no etcd endpoint reachable: {failures}")]
    Unreachable {
        /// The call.
        call: &'static str,
        /// Each member tried and why it could not be connected to.
        failures: ConnectFailures,
    },
    /// The member took longer than the request timeout.
    #[error("{call} to etcd at {endpoint}: no answer within {timeout:?}")]
    Timeout {
        /// The call.
        call: &'static str,
        /// The member.
        endpoint: Arc<str>,
        /// The timeout.
        timeout: Duration,
    },
    /// The HTTP exchange broke (the connection closed, the answer is not HTTP).
    #[error("{call} to etcd at {endpoint} failed")]
    Http {
        /// The call.
        call: &'static str,
        /// The member.
        endpoint: Arc<str>,
        /// What hyper saw.
        #[source]
        source: hyper::Error,
    },
    /// etcd refused the call.
    #[error("{call} to etcd at {endpoint}: {message} (HTTP {status}, gRPC code {code})")]
    Status {
        /// The call.
        call: &'static str,
        /// The member.
        endpoint: Arc<str>,
        /// The HTTP status.
        status: u16,
        /// The gRPC status code the gateway reported (5 not found, 11 out of range, 14
        /// unavailable, …; 0 when it gave none).
        code: i32,
        /// etcd's message.
        message: String,
    },
    /// The answer is not what the gateway sends.
    #[error("{call} to etcd at {endpoint}: unreadable answer: {reason}")]
    Decode {
        /// The call.
        call: &'static str,
        /// The member.
        endpoint: Arc<str>,
        /// What could not be read.
        reason: String,
    },
    /// A watch's answer ended (the member stopped, the connection was cut).
    #[error("watch on etcd at {endpoint} ended")]
    WatchEnded {
        /// The member.
        endpoint: Arc<str>,
    },
    /// etcd canceled a watch for another reason than compaction.
    #[error("watch on etcd at {endpoint} canceled: {reason}")]
    WatchCanceled {
        /// The member.
        endpoint: Arc<str>,
        /// Why, as etcd said (possibly empty).
        reason: String,
    },
}

/// The members a call could not connect to, each with its reason.
#[derive(Debug, Default)]
pub struct ConnectFailures(pub Vec<ConnectFailure>);

/// A member a call could not connect to.
#[derive(Debug)]
pub struct ConnectFailure {
    /// The member.
    pub endpoint: Arc<str>,
    /// Why (a timeout is `ErrorKind::TimedOut`).
    pub error: std::io::Error,
}

/// The end of the range of every key that starts with `prefix`: `prefix` with its last
/// byte below 0xff incremented and what follows dropped (`[0]`, all keys, if every byte
/// is 0xff), as etcd's `--prefix` computes it.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

// === impl Client ===

impl Client {
    /// The default time for a unary call to be answered once connected.
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
    /// The default time to connect to one member.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

    /// A client of the cluster whose members' gateways answer at `endpoints`
    /// (`http://host:port`, port 2379 if left out). Nothing is connected yet.
    pub fn new<I>(endpoints: I) -> Result<Client, Error>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let members = endpoints
            .into_iter()
            .map(|e| Member::parse(e.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        if members.is_empty() {
            return Err(Error::NoEndpoints);
        }
        Ok(Client {
            members: Arc::new(Members {
                list: members,
                preferred: AtomicUsize::new(0),
            }),
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
        })
    }

    /// This client with another limit on a unary call's answer.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Client {
        self.request_timeout = timeout;
        self
    }

    /// This client with another limit on connecting to one member.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Client {
        self.connect_timeout = timeout;
        self
    }

    /// The limit on a unary call's answer.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// The endpoints, as URLs.
    pub fn endpoints(&self) -> impl Iterator<Item = &str> {
        self.members.list.iter().map(|m| &*m.url)
    }

    /// The key `key`, or the keys from `key` to `range_end` (excluded).
    pub async fn range(
        &self,
        key: &[u8],
        range_end: Option<&[u8]>,
    ) -> Result<RangeResponse, Error> {
        const CALL: &str = "range";
        let request = wire::RangeRequest {
            key: wire::encode(key),
            range_end: range_end.map(wire::encode),
        };
        let (endpoint, response): (_, wire::RangeResponse) =
            self.unary(CALL, "/v3/kv/range", &request).await?;
        Ok(RangeResponse {
            header: header(&response.header),
            kvs: response
                .kvs
                .iter()
                .map(key_value)
                .collect::<Result<_, _>>()
                .map_err(|reason| decode_error(CALL, &endpoint, reason))?,
            count: response.count,
        })
    }

    /// Every key that starts with `prefix`.
    pub async fn range_prefix(&self, prefix: &[u8]) -> Result<RangeResponse, Error> {
        self.range(prefix, Some(&prefix_end(prefix))).await
    }

    /// Write `value` under `key`, attached to `lease` if given. Returns the header, whose
    /// revision is the write's.
    pub async fn put(
        &self,
        key: &[u8],
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<ResponseHeader, Error> {
        let request = wire::PutRequest {
            key: wire::encode(key),
            value: wire::encode(value),
            lease: lease.map_or(0, |l| l.0),
        };
        let (_, response): (_, wire::HeaderOnly) =
            self.unary("put", "/v3/kv/put", &request).await?;
        Ok(header(&response.header))
    }

    /// Delete `key`, or the keys from `key` to `range_end` (excluded).
    pub async fn delete_range(
        &self,
        key: &[u8],
        range_end: Option<&[u8]>,
    ) -> Result<DeleteResponse, Error> {
        let request = wire::DeleteRangeRequest {
            key: wire::encode(key),
            range_end: range_end.map(wire::encode),
        };
        let (_, response): (_, wire::DeleteRangeResponse) = self
            .unary("delete range", "/v3/kv/deleterange", &request)
            .await?;
        Ok(DeleteResponse {
            header: header(&response.header),
            deleted: response.deleted,
        })
    }

    /// A new lease of `ttl` (whole seconds, at least one; etcd may grant more).
    pub async fn lease_grant(&self, ttl: Duration) -> Result<Lease, Error> {
        const CALL: &str = "lease grant";
        let request = wire::LeaseGrantRequest {
            ttl: i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX),
        };
        let (endpoint, response): (_, wire::LeaseGrantResponse) =
            self.unary(CALL, "/v3/lease/grant", &request).await?;
        if !response.error.is_empty() {
            return Err(Error::Status {
                call: CALL,
                endpoint,
                status: StatusCode::OK.as_u16(),
                code: 0,
                message: response.error,
            });
        }
        Ok(Lease {
            id: LeaseId(response.id),
            ttl: Duration::from_secs(u64::try_from(response.ttl).unwrap_or_default()),
        })
    }

    /// Renew `lease` once. `Ok(Some(ttl))`: renewed for `ttl`; `Ok(None)`: the lease
    /// does not exist any more (it expired, was revoked, or etcd lost it), which etcd
    /// tells by a time to live of 0.
    pub async fn lease_keepalive(&self, lease: LeaseId) -> Result<Option<Duration>, Error> {
        const CALL: &str = "lease keep-alive";
        // A streaming call; with the request body complete, the gateway sends one answer
        // and ends the stream.
        let request = wire::LeaseIdRequest { id: lease.0 };
        let (endpoint, message): (_, wire::StreamMessage<wire::LeaseKeepAliveResponse>) =
            self.unary(CALL, "/v3/lease/keepalive", &request).await?;
        let response = stream_result(CALL, &endpoint, message)?;
        Ok(u64::try_from(response.ttl)
            .ok()
            .filter(|ttl| *ttl > 0)
            .map(Duration::from_secs))
    }

    /// End `lease` now: every key attached to it is deleted, all in one revision.
    pub async fn lease_revoke(&self, lease: LeaseId) -> Result<ResponseHeader, Error> {
        let request = wire::LeaseIdRequest { id: lease.0 };
        let (_, response): (_, wire::HeaderOnly) = self
            .unary("lease revoke", "/v3/lease/revoke", &request)
            .await?;
        Ok(header(&response.header))
    }

    /// Drop the history before `revision` (physically, before answering). Watches that
    /// still had to report older revisions are canceled with `compact_revision`.
    pub async fn compact(&self, revision: i64) -> Result<ResponseHeader, Error> {
        let request = wire::CompactionRequest {
            revision,
            physical: true,
        };
        let (_, response): (_, wire::HeaderOnly) = self
            .unary("compaction", "/v3/kv/compaction", &request)
            .await?;
        Ok(header(&response.header))
    }

    /// Open a watch. Returns once etcd answered (its first message, normally `created`,
    /// is then the first [`Watch::next`] gives).
    pub async fn watch(&self, request: WatchRequest) -> Result<Watch, Error> {
        const CALL: &str = "watch";
        let body = serde_json::to_vec(&wire::WatchRequest {
            create_request: wire::WatchCreateRequest {
                key: wire::encode(&request.key),
                range_end: request.range_end.as_deref().map(wire::encode),
                start_revision: request.start_revision,
                prev_kv: request.prev_kv,
            },
        })
        .map_err(|e| internal_encode_error(CALL, &e))?;
        let (index, member, mut sender, connection) = self.connect(CALL).await?;
        let endpoint = member.url.clone();
        let exchange = async {
            let response = sender
                .send_request(member.request("/v3/watch", body))
                .await
                .map_err(|source| http_error(CALL, &endpoint, source))?;
            let status = response.status();
            if status == StatusCode::OK {
                return Ok(response.into_body());
            }
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|source| http_error(CALL, &endpoint, source))?
                .to_bytes();
            Err(status_error(CALL, &endpoint, status, &bytes))
        };
        let body = match tokio::time::timeout(self.request_timeout, exchange).await {
            Ok(Ok(body)) => body,
            Ok(Err(e)) => {
                self.members.failed(index);
                return Err(e);
            }
            Err(_) => {
                self.members.failed(index);
                return Err(Error::Timeout {
                    call: CALL,
                    endpoint,
                    timeout: self.request_timeout,
                });
            }
        };
        Ok(Watch {
            endpoint,
            body,
            objects: JsonObjects::default(),
            _connection: connection,
        })
    }

    /// Send one unary call and read its whole answer as `T`. Returns the member that
    /// answered beside the answer.
    async fn unary<Q: Serialize, T: DeserializeOwned>(
        &self,
        call: &'static str,
        path: &'static str,
        request: &Q,
    ) -> Result<(Arc<str>, T), Error> {
        let body = serde_json::to_vec(request).map_err(|e| internal_encode_error(call, &e))?;
        let (index, member, mut sender, _connection) = self.connect(call).await?;
        let endpoint = member.url.clone();
        let exchange = async {
            let response = sender
                .send_request(member.request(path, body))
                .await
                .map_err(|source| http_error(call, &endpoint, source))?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|source| http_error(call, &endpoint, source))?
                .to_bytes();
            Ok::<_, Error>((status, bytes))
        };
        let (status, bytes) = match tokio::time::timeout(self.request_timeout, exchange).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                self.members.failed(index);
                return Err(e);
            }
            Err(_) => {
                self.members.failed(index);
                return Err(Error::Timeout {
                    call,
                    endpoint,
                    timeout: self.request_timeout,
                });
            }
        };
        if status != StatusCode::OK {
            return Err(status_error(call, &endpoint, status, &bytes));
        }
        match serde_json::from_slice(&bytes) {
            Ok(answer) => Ok((endpoint, answer)),
            Err(e) => Err(decode_error(call, &endpoint, e.to_string())),
        }
    }

    /// A connection to the first member that accepts one, starting with the one that
    /// answered last.
    async fn connect(
        &self,
        call: &'static str,
    ) -> Result<(usize, &Member, http1::SendRequest<Full<Bytes>>, AbortOnDrop), Error> {
        let members = &self.members.list;
        let first = self.members.preferred.load(Ordering::Relaxed);
        let mut failures = Vec::new();
        for offset in 0..members.len() {
            let index = (first + offset) % members.len();
            let member = &members[index];
            let tcp = match tokio::time::timeout(
                self.connect_timeout,
                TcpStream::connect(&member.authority),
            )
            .await
            {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(error)) => {
                    failures.push(ConnectFailure {
                        endpoint: member.url.clone(),
                        error,
                    });
                    continue;
                }
                Err(_) => {
                    failures.push(ConnectFailure {
                        endpoint: member.url.clone(),
                        error: std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no connection within {:?}", self.connect_timeout),
                        ),
                    });
                    continue;
                }
            };
            // Requests are small and sent whole; do not let Nagle hold their last segment.
            let _ = tcp.set_nodelay(true);
            let (sender, connection) = http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(|source| http_error(call, &member.url, source))?;
            let connection = AbortOnDrop::spawn(
                async move {
                    // Its errors reach the request's caller through the request.
                    let _ = connection.await;
                }
                .in_current_span(),
            );
            self.members.preferred.store(index, Ordering::Relaxed);
            return Ok((index, member, sender, connection));
        }
        Err(Error::Unreachable {
            call,
            failures: ConnectFailures(failures),
        })
    }
}

// === impl Watch ===

impl Watch {
    /// The next message. Waits as long as etcd sends nothing (a watch of keys that do
    /// not change is silent). An error ends the watch.
    pub async fn next(&mut self) -> Result<WatchResponse, Error> {
        const CALL: &str = "watch";
        loop {
            let message = self
                .objects
                .next::<wire::StreamMessage<wire::WatchResponse>>()
                .map_err(|e| decode_error(CALL, &self.endpoint, e.to_string()))?;
            if let Some(message) = message {
                let response = stream_result(CALL, &self.endpoint, message)?;
                return watch_response(&response)
                    .map_err(|reason| decode_error(CALL, &self.endpoint, reason));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        self.objects.push(data);
                    }
                }
                Some(Err(source)) => return Err(http_error(CALL, &self.endpoint, source)),
                None if self.objects.has_partial() => {
                    return Err(decode_error(
                        CALL,
                        &self.endpoint,
                        "the answer ended inside a message".to_string(),
                    ));
                }
                None => {
                    return Err(Error::WatchEnded {
                        endpoint: self.endpoint.clone(),
                    });
                }
            }
        }
    }

    /// The member this watch is open on.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

// === impl Error ===

impl Error {
    /// Whether etcd said the thing does not exist; for lease calls and for a put under
    /// a lease: the lease is gone.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Status { code, .. } if *code == GRPC_NOT_FOUND)
    }

    /// Whether etcd said the revision asked for has been compacted.
    pub fn is_compacted(&self) -> bool {
        matches!(self, Error::Status { code, .. } if *code == GRPC_OUT_OF_RANGE)
    }

    /// The member that failed, when one answered or was being talked to.
    pub fn endpoint(&self) -> Option<&str> {
        match self {
            Error::Timeout { endpoint, .. }
            | Error::Http { endpoint, .. }
            | Error::Status { endpoint, .. }
            | Error::Decode { endpoint, .. }
            | Error::WatchEnded { endpoint }
            | Error::WatchCanceled { endpoint, .. } => Some(endpoint),
            Error::NoEndpoints | Error::InvalidEndpoint { .. } | Error::Unreachable { .. } => None,
        }
    }
}

impl fmt::Display for ConnectFailures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, failure) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", failure.endpoint, failure.error)?;
        }
        Ok(())
    }
}

// === Members ===

#[derive(Debug)]
struct Members {
    list: Vec<Member>,
    /// The member to try first: the one that last accepted a connection.
    preferred: AtomicUsize,
}

impl Members {
    /// A call to member `index` failed after connecting: start the next call at the
    /// next member (unless another call moved on already).
    fn failed(&self, index: usize) {
        let next = (index + 1) % self.list.len();
        let _ = self
            .preferred
            .compare_exchange(index, next, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// One member's gateway.
#[derive(Debug)]
struct Member {
    /// The URL as given, for messages.
    url: Arc<str>,
    /// `host:port`, to connect to.
    authority: String,
    /// The `Host` header.
    host: HeaderValue,
}

impl Member {
    fn parse(endpoint: &str) -> Result<Member, Error> {
        let invalid = |reason| Error::InvalidEndpoint {
            endpoint: endpoint.to_string(),
            reason,
        };
        let uri: Uri = endpoint.parse().map_err(|_| invalid("not a URL"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => return Err(invalid("TLS to etcd is not supported yet")),
            _ => return Err(invalid("the scheme must be http")),
        }
        let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid("user information is not supported"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(invalid("a path or query is not supported"));
        }
        let host = authority.host();
        if host.is_empty() {
            return Err(invalid("no host"));
        }
        let authority = format!("{host}:{}", authority.port_u16().unwrap_or(2379));
        let header = HeaderValue::from_str(&authority).map_err(|_| invalid("not a valid host"))?;
        Ok(Member {
            url: Arc::from(endpoint.trim_end_matches('/')),
            // `[::1]:2379` as `Uri` gives the host with brackets, as connect wants it.
            authority,
            host: header,
        })
    }

    fn request(&self, path: &'static str, body: Vec<u8>) -> Request<Full<Bytes>> {
        // A body of known length: the gateway answers a watch only once it is complete.
        let mut request = Request::new(Full::new(Bytes::from(body)));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = Uri::from_static(path);
        request.headers_mut().insert(HOST, self.host.clone());
        request
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        request
    }
}

// === Conversions ===

fn header(h: &wire::Header) -> ResponseHeader {
    ResponseHeader {
        cluster_id: h.cluster_id,
        member_id: h.member_id,
        revision: h.revision,
        raft_term: h.raft_term,
    }
}

fn key_value(kv: &wire::KeyValue) -> Result<KeyValue, String> {
    Ok(KeyValue {
        key: wire::decode("key", &kv.key)?,
        value: wire::decode("value", &kv.value)?,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        lease: kv.lease,
    })
}

fn watch_response(response: &wire::WatchResponse) -> Result<WatchResponse, String> {
    Ok(WatchResponse {
        header: header(&response.header),
        created: response.created,
        canceled: response.canceled,
        compact_revision: response.compact_revision,
        cancel_reason: response.cancel_reason.clone(),
        events: response
            .events
            .iter()
            .map(|event| {
                Ok(Event {
                    kind: if event.is_delete() {
                        EventKind::Delete
                    } else {
                        EventKind::Put
                    },
                    kv: key_value(&event.kv)?,
                    prev_kv: event.prev_kv.as_ref().map(key_value).transpose()?,
                })
            })
            .collect::<Result<_, String>>()?,
    })
}

/// The `result` of a streaming call's message, or its `error` as an error.
fn stream_result<T>(
    call: &'static str,
    endpoint: &Arc<str>,
    message: wire::StreamMessage<T>,
) -> Result<T, Error> {
    if let Some(error) = message.error {
        let body = serde_json::json!({ "error": error });
        return Err(match wire::GatewayError::from_body(&body) {
            Some(e) => Error::Status {
                call,
                endpoint: endpoint.clone(),
                status: e.http_code.unwrap_or(StatusCode::OK.as_u16()),
                code: e.code,
                message: e.message,
            },
            None => decode_error(
                call,
                endpoint,
                format!("an error without a message: {body}"),
            ),
        });
    }
    message
        .result
        .ok_or_else(|| decode_error(call, endpoint, "neither `result` nor `error`".to_string()))
}

fn status_error(call: &'static str, endpoint: &Arc<str>, status: StatusCode, body: &[u8]) -> Error {
    let parsed = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|body| wire::GatewayError::from_body(&body));
    let (code, message) = match parsed {
        Some(e) => (e.code, e.message),
        None => (
            0,
            String::from_utf8_lossy(&body[..body.len().min(200)])
                .trim()
                .to_string(),
        ),
    };
    Error::Status {
        call,
        endpoint: endpoint.clone(),
        status: status.as_u16(),
        code,
        message,
    }
}

fn http_error(call: &'static str, endpoint: &Arc<str>, source: hyper::Error) -> Error {
    Error::Http {
        call,
        endpoint: endpoint.clone(),
        source,
    }
}

fn decode_error(call: &'static str, endpoint: &Arc<str>, reason: String) -> Error {
    Error::Decode {
        call,
        endpoint: endpoint.clone(),
        reason,
    }
}

/// Serialising our own request types cannot fail (strings, integers and booleans
/// only); should it, the call fails like an unreadable exchange rather than panicking.
fn internal_encode_error(call: &'static str, e: &serde_json::Error) -> Error {
    Error::Decode {
        call,
        endpoint: Arc::from("(not sent)"),
        reason: format!("the request could not be written: {e}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing test panics")]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_etcds() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn endpoints_are_http_urls() {
        let m = Member::parse("http://127.0.0.1:2379").unwrap();
        assert_eq!(m.authority, "127.0.0.1:2379");
        assert_eq!(
            Member::parse("http://etcd/").unwrap().authority,
            "etcd:2379"
        );
        assert_eq!(
            Member::parse("http://[::1]:1").unwrap().authority,
            "[::1]:1"
        );
        for bad in [
            "https://e:1",
            "e:1",
            "http://e:1/v3",
            "ftp://e",
            "http://u@e:1",
        ] {
            let e = Member::parse(bad).unwrap_err();
            assert!(
                e.to_string().contains(bad),
                "{bad}: the error names the endpoint: {e}"
            );
        }
        assert!(matches!(
            Client::new(Vec::<String>::new()),
            Err(Error::NoEndpoints)
        ));
    }
}
