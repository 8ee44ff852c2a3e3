//! Load generation: hyper 1 HTTP/1.1 clients on keep-alive connections, `GET /`.
//!
//! * Open loop at a fixed rate: request `i` is scheduled at `start + i / rate`; a pool of
//!   connections takes the requests in order, a request waiting for a free connection
//!   when its time comes. Latency counts from the scheduled time whenever the request
//!   could not be sent on time (no connection free), so a slow server is not hidden by a
//!   generator that slows down with it (no coordinated omission). When a connection was
//!   free early and slept until the scheduled time, latency counts from the moment it
//!   woke: tokio's timer has a 1 ms granularity, and that lateness is the generator's,
//!   not the system's.
//! * Closed loop at full speed: every connection sends its next request as soon as the
//!   previous answer is read, for the duration.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HOST, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until, timeout};

/// A request that takes longer than this counts as an error (and its connection is
/// replaced).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

type Sender = SendRequest<Empty<Bytes>>;

/// Where the load goes.
pub(crate) struct Target {
    addr: SocketAddr,
    host: HeaderValue,
}

impl Target {
    pub(crate) fn new(addr: SocketAddr) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            addr,
            host: HeaderValue::from_str(&addr.to_string())?,
        }))
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// The result of one phase.
#[derive(Default)]
pub(crate) struct Outcome {
    /// Latency of every successful request, in nanoseconds.
    pub(crate) latencies: Vec<u64>,
    /// Requests that failed: transport error, timeout, or a status other than 200.
    pub(crate) errors: u64,
    /// From the start of the phase to the last answer.
    pub(crate) elapsed: Duration,
    /// Requests (open loop) that found no free connection at their scheduled time.
    pub(crate) queued: u64,
}

impl Outcome {
    fn merge(&mut self, other: Self) {
        self.latencies.extend(other.latencies);
        self.errors += other.errors;
        self.queued += other.queued;
        self.elapsed = self.elapsed.max(other.elapsed);
    }

    pub(crate) fn throughput(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

async fn connect(target: &Target) -> anyhow::Result<Sender> {
    let stream = TcpStream::connect(target.addr)
        .await
        .with_context(|| format!("connecting to {}", target.addr))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// One `GET /` on `sender`, body read to the end.
async fn get(sender: &mut Sender, target: &Target) -> anyhow::Result<StatusCode> {
    let exchange = async {
        sender.ready().await?;
        let req = Request::get("/")
            .header(HOST, target.host.clone())
            .body(Empty::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        resp.into_body().collect().await?;
        anyhow::Ok(status)
    };
    match timeout(REQUEST_TIMEOUT, exchange).await {
        Ok(r) => r,
        Err(_) => bail!("no answer within {REQUEST_TIMEOUT:?}"),
    }
}

/// Waits until `GET /` answers 200 (a fresh connection per try), or `within` passes.
pub(crate) async fn wait_ok(target: &Target, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    let mut last = String::from("no attempt");
    while Instant::now() < deadline {
        match connect(target).await {
            Ok(mut s) => match get(&mut s, target).await {
                Ok(StatusCode::OK) => return Ok(()),
                Ok(other) => last = format!("status {other}"),
                Err(e) => last = format!("{e:#}"),
            },
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "GET http://{}/ did not answer 200 within {within:?} (last: {last})",
        target.addr
    )
}

/// Opens `n` connections at once.
async fn pool(target: &Arc<Target>, n: usize) -> anyhow::Result<Vec<Sender>> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let t = Arc::clone(target);
        set.spawn(async move { connect(&t).await });
    }
    let mut senders = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        senders.push(r??);
    }
    Ok(senders)
}

/// Sends one request, replacing the connection after a transport error. Returns whether
/// it got a 200.
async fn send_one(sender: &mut Option<Sender>, target: &Target) -> bool {
    if sender.is_none() {
        *sender = connect(target).await.ok();
    }
    let Some(s) = sender.as_mut() else {
        return false;
    };
    match get(s, target).await {
        Ok(status) => status == StatusCode::OK,
        Err(_) => {
            *sender = None;
            false
        }
    }
}

/// Full speed: `connections` closed loops for `duration`.
pub(crate) async fn closed_loop(
    target: &Arc<Target>,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<Outcome> {
    let senders = pool(target, connections).await?;
    let start = Instant::now() + Duration::from_millis(5);
    let end = start + duration;
    let mut set = tokio::task::JoinSet::new();
    for s in senders {
        let t = Arc::clone(target);
        set.spawn(async move {
            let mut out = Outcome {
                latencies: Vec::with_capacity(1 << 14),
                ..Outcome::default()
            };
            let mut sender = Some(s);
            sleep_until(start).await;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let ok = send_one(&mut sender, &t).await;
                let done = Instant::now();
                if ok {
                    out.latencies.push(nanos(done - t0));
                } else {
                    out.errors += 1;
                }
                out.elapsed = done - start;
            }
            out
        });
    }
    collect(set).await
}

/// Fixed rate: `rate` requests per second for `duration`, open loop over a pool of
/// `connections`.
pub(crate) async fn open_loop(
    target: &Arc<Target>,
    connections: usize,
    rate: u32,
    duration: Duration,
) -> anyhow::Result<Outcome> {
    let total = (f64::from(rate) * duration.as_secs_f64()).round() as u64;
    let senders = pool(target, connections).await?;
    let start = Instant::now() + Duration::from_millis(5);
    let next = Arc::new(AtomicU64::new(0));
    let mut set = tokio::task::JoinSet::new();
    for s in senders {
        let t = Arc::clone(target);
        let next = Arc::clone(&next);
        set.spawn(async move {
            let mut out = Outcome::default();
            let mut sender = Some(s);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let scheduled = start
                    + Duration::from_nanos(nanos_u128(
                        u128::from(i) * 1_000_000_000 / u128::from(rate),
                    ));
                let t0 = if Instant::now() < scheduled {
                    sleep_until(scheduled).await;
                    Instant::now()
                } else {
                    if Instant::now() > scheduled + Duration::from_millis(1) {
                        out.queued += 1;
                    }
                    scheduled
                };
                let ok = send_one(&mut sender, &t).await;
                let done = Instant::now();
                if ok {
                    out.latencies.push(nanos(done - t0));
                } else {
                    out.errors += 1;
                }
                out.elapsed = out.elapsed.max(done - start);
            }
            out
        });
    }
    collect(set).await
}

async fn collect(mut set: tokio::task::JoinSet<Outcome>) -> anyhow::Result<Outcome> {
    let mut all = Outcome::default();
    while let Some(r) = set.join_next().await {
        all.merge(r.context("a load task panicked")?);
    }
    all.latencies.sort_unstable();
    Ok(all)
}

fn nanos(d: Duration) -> u64 {
    nanos_u128(d.as_nanos())
}

fn nanos_u128(n: u128) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// The `p`-quantile (0..=1) of sorted nanoseconds, nearest rank, in microseconds.
pub(crate) fn quantile_us(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<u64> = (1..=100).map(|i| i * 1_000).collect();
        assert_eq!(quantile_us(&v, 0.5), 50.0);
        assert_eq!(quantile_us(&v, 0.99), 99.0);
        assert_eq!(quantile_us(&v, 1.0), 100.0);
        assert_eq!(quantile_us(&[7_000], 0.5), 7.0);
    }
}
