//! Endpoints and how they are written in etcd: the key layout and the value.
//!
//! An endpoint is one ready replica's inbound sidecar, as other hosts reach it:
//!
//! ```text
//! <prefix>/endpoints/<service>/<host>/<replica>
//!     {"address":"10.0.0.5:41234","identity":"spiffe://shop/api","protocol":"http"}
//! ```

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// What an endpoint speaks, as the service's `protocol` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 or HTTP/2.
    Http,
    /// gRPC over HTTP/2.
    Grpc,
    /// Opaque TCP.
    Tcp,
}

/// One of this host's endpoints, to register.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The service (a key segment: no `/`).
    pub service: String,
    /// The replica's index.
    pub replica: u32,
    /// Where other hosts connect: the replica's inbound listener on the address this
    /// host advertises.
    pub address: SocketAddr,
    /// The SPIFFE identity the inbound presents (`spiffe://<mesh>/<service>`).
    pub identity: String,
    /// What the inbound speaks.
    pub protocol: Protocol,
}

/// Another host's endpoint, as discovery found it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RemoteEndpoint {
    /// The host that registered it.
    pub host: String,
    /// The replica's index on that host.
    pub replica: u32,
    /// Where to connect.
    pub address: SocketAddr,
    /// The SPIFFE identity the inbound presents.
    pub identity: String,
    /// What the inbound speaks.
    pub protocol: Protocol,
}

/// A service or host name that cannot be a key segment.
#[derive(Debug, thiserror::Error)]
#[error("{what} name `{name}` cannot be part of an etcd key: {reason}")]
pub struct NameError {
    /// `service` or `host`.
    pub what: &'static str,
    /// The name.
    pub name: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// The value written under an endpoint's key. Unknown fields are ignored, so that a host
/// running a newer mesh can add some.
#[derive(Serialize, Deserialize)]
pub(crate) struct Value {
    pub(crate) address: SocketAddr,
    pub(crate) identity: String,
    pub(crate) protocol: Protocol,
}

/// The keys under one prefix.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    /// `<prefix>/endpoints/`.
    endpoints: String,
}

/// What an endpoint key names.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct KeyParts {
    pub(crate) service: String,
    pub(crate) host: String,
    pub(crate) replica: u32,
}

/// Check that `name` can be one segment of a key.
pub(crate) fn check_name(what: &'static str, name: &str) -> Result<(), NameError> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.contains('/') {
        "it contains `/`"
    } else if name.chars().any(char::is_control) {
        "it contains a control character"
    } else {
        return Ok(());
    };
    Err(NameError {
        what,
        name: name.to_string(),
        reason,
    })
}

// === impl Layout ===

impl Layout {
    /// The layout under `prefix` (trailing `/` ignored: `/mesh/shop/` is `/mesh/shop`).
    pub(crate) fn new(prefix: &str) -> Layout {
        Layout {
            endpoints: format!("{}/endpoints/", prefix.trim_end_matches('/')),
        }
    }

    /// The prefix of every endpoint key.
    pub(crate) fn endpoints_prefix(&self) -> &str {
        &self.endpoints
    }

    /// The key of `host`'s replica `replica` of `service`.
    pub(crate) fn key(&self, service: &str, host: &str, replica: u32) -> String {
        format!("{}{service}/{host}/{replica}", self.endpoints)
    }

    /// What `key` names, if it is an endpoint key of this layout.
    pub(crate) fn parse(&self, key: &[u8]) -> Option<KeyParts> {
        let rest = key.strip_prefix(self.endpoints.as_bytes())?;
        let rest = std::str::from_utf8(rest).ok()?;
        let mut segments = rest.split('/');
        let (service, host, replica) = (segments.next()?, segments.next()?, segments.next()?);
        if segments.next().is_some() || service.is_empty() || host.is_empty() {
            return None;
        }
        // `u32::from_str` takes a leading `+`; a key is written without one.
        if !replica.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(KeyParts {
            service: service.to_string(),
            host: host.to_string(),
            replica: replica.parse().ok()?,
        })
    }
}

// === impl Endpoint ===

impl Endpoint {
    /// The JSON value of this endpoint's key.
    pub(crate) fn value(&self) -> Vec<u8> {
        let value = Value {
            address: self.address,
            identity: self.identity.clone(),
            protocol: self.protocol,
        };
        // A struct of a socket address, a string and an enum always serialises.
        serde_json::to_vec(&value).unwrap_or_default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing test panics")]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_strangers_are_refused() {
        let layout = Layout::new("/mesh/shop/");
        let key = layout.key("api", "edge-1", 3);
        assert_eq!(key, "/mesh/shop/endpoints/api/edge-1/3");
        assert_eq!(
            layout.parse(key.as_bytes()),
            Some(KeyParts {
                service: "api".into(),
                host: "edge-1".into(),
                replica: 3
            })
        );
        for stranger in [
            "/mesh/shop/endpoints/api/edge-1",
            "/mesh/shop/endpoints/api/edge-1/3/x",
            "/mesh/shop/endpoints/api/edge-1/+3",
            "/mesh/shop/endpoints/api/edge-1/three",
            "/mesh/shop/endpoints//edge-1/3",
            "/mesh/other/endpoints/api/edge-1/3",
        ] {
            assert_eq!(layout.parse(stranger.as_bytes()), None, "{stranger}");
        }
        assert_eq!(layout.parse(b"/mesh/shop/endpoints/api/\xff/3"), None);
    }

    #[test]
    fn the_value_is_the_documented_json() {
        let endpoint = Endpoint {
            service: "api".into(),
            replica: 0,
            address: "10.0.0.5:41234".parse().unwrap(),
            identity: "spiffe://shop/api".into(),
            protocol: Protocol::Grpc,
        };
        assert_eq!(
            String::from_utf8(endpoint.value()).unwrap(),
            r#"{"address":"10.0.0.5:41234","identity":"spiffe://shop/api","protocol":"grpc"}"#
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("service", "api").is_ok());
        for bad in ["", "a/b", "a\nb"] {
            let e = check_name("host", bad).unwrap_err();
            assert!(e.to_string().starts_with("host name"), "{e}");
        }
    }
}
