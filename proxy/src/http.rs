//! HTTP plumbing shared by the outbound and inbound sidecars: the server side (accept
//! loop, limits against hostile clients, graceful drain), the client side (one shared
//! HTTP/2 connection per peer, a keep-alive HTTP/1.1 pool, upgrade forwarding), and header
//! rewriting between HTTP versions.

pub(crate) mod cancel;
pub mod client;
pub mod finish;
pub mod headers;
pub mod server;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

pub use server::Limits;

/// Any error a body can fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type every proxied request and response is converted to: streaming bodies
/// from hyper, buffered bodies for replays, and mesh error bodies all fit in it.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Box any body into [`Body`]; a [`Body`] comes back as it is (boxing it again would
/// cost an allocation and an indirection on every frame).
pub fn boxed<B>(body: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut body = Some(body);
    if let Some(already) = (&mut body as &mut dyn std::any::Any).downcast_mut::<Option<Body>>() {
        if let Some(already) = already.take() {
            return already;
        }
    }
    match body {
        Some(body) => body.map_err(Into::into).boxed_unsync(),
        None => empty_unboxed(),
    }
}

/// Unreachable in practice (the body is taken only when it is a [`Body`]); an empty body
/// rather than a panic.
fn empty_unboxed() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body of the given bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    boxed(Full::new(bytes.into()))
}

/// An empty body (ends the stream at once: HEADERS with END_STREAM on HTTP/2).
pub fn empty() -> Body {
    boxed(Empty::<Bytes>::new())
}
