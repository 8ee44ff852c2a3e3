//! An HTTP/2 stream used as a byte tunnel (an extended CONNECT after its 2xx), so that it
//! can be spliced with the caller's side like any upgraded connection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::SendStream;
use hyper::body::Body as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::DropGuard;

use super::recv::RecvBody;

/// Both halves of a tunnelled HTTP/2 stream. Reads take the DATA the peer sends (drained
/// eagerly like any response body, credit given back as read); writes send DATA as the
/// peer gives credit; shutdown ends the sending half (END_STREAM). Dropping it cancels the
/// stream.
pub struct H2Tunnel {
    send: SendStream<Bytes>,
    recv: RecvBody,
    /// Bytes of the last DATA not yet read.
    pending: Bytes,
    /// The peer ended its half.
    eof: bool,
    /// This side ended its half.
    shut: bool,
    _cancel: DropGuard,
}

impl H2Tunnel {
    pub(super) fn new(send: SendStream<Bytes>, recv: RecvBody, cancel: DropGuard) -> Self {
        H2Tunnel {
            send,
            recv,
            pending: Bytes::new(),
            eof: false,
            shut: false,
            _cancel: cancel,
        }
    }
}

impl AsyncRead for H2Tunnel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.pending.is_empty() && !this.eof {
            match ready!(Pin::new(&mut this.recv).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        this.pending = data;
                    }
                }
                Some(Err(error)) => {
                    // The peer closing its half with NO_ERROR is an ordinary end.
                    if error.reason() == Some(h2::Reason::NO_ERROR) {
                        this.eof = true;
                    } else {
                        return Poll::Ready(Err(io::Error::other(error)));
                    }
                }
                None => this.eof = true,
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Tunnel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        this.send.reserve_capacity(buf.len());
        loop {
            let capacity = this.send.capacity();
            if capacity > 0 {
                let n = capacity.min(buf.len());
                this.send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(io::Error::other)?;
                return Poll::Ready(Ok(n));
            }
            if let Poll::Ready(reason) = this.send.poll_reset(cx) {
                let error = match reason {
                    Ok(reason) => h2::Error::from(reason),
                    Err(error) => error,
                };
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, error)));
            }
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(error)) => return Poll::Ready(Err(io::Error::other(error))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the tunnel's stream closed",
                    )));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 writes what it was given as the connection task runs.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.shut {
            return Poll::Ready(Ok(()));
        }
        this.shut = true;
        this.send.reserve_capacity(0);
        this.send
            .send_data(Bytes::new(), true)
            .map_err(io::Error::other)?;
        Poll::Ready(Ok(()))
    }
}

impl std::fmt::Debug for H2Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Tunnel").finish_non_exhaustive()
    }
}
