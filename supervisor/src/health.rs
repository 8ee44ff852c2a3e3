//! Readiness and liveness checks.
//!
//! # Usage
//!
//! The supervisor expands a service's `[health]` table for one replica into a [`Probe`]
//! and a [`Schedule`], then calls [`spawn_checker`] right after spawning the process and
//! feeds the [`HealthEvent`]s it receives into the replica's state machine. Without a
//! `[health]` table it uses [`CheckerKind::PortOpen`] instead; with `port = "none"` and no
//! `[health]` there is nothing to check and no checker is started.
//!
//! # Theory of operation
//!
//! A checker is one task that runs one probe at a time (never overlapping ones), sleeps on
//! `tokio::time` timers between them, and sends only *edges* of the readiness state, so
//! the consumer never has to de-duplicate. All timing uses `tokio::time`, so tests drive
//! the schedule with `tokio::time::pause()`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::header::{CONNECTION, HOST, USER_AGENT};
use hyper::{Request, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};
use tracing::Instrument;

use crate::config::model::{Health, Protocol};
use crate::process::{self, ExitReport, Output, SpawnSpec};

/// How often checks run until the first pass (SPEC §3 "Readiness").
pub const FAST_INTERVAL: Duration = Duration::from_millis(250);

/// How often the default readiness check (no `[health]`) tries to connect.
pub const PORT_OPEN_INTERVAL: Duration = Duration::from_millis(100);

/// Bound on a single connect attempt of the default readiness check. A loopback connect
/// either succeeds or is refused at once; this only guards against a wedged kernel queue.
const PORT_OPEN_TIMEOUT: Duration = Duration::from_secs(1);

/// The `User-Agent` of HTTP checks (SPEC §4 "The first minute"), so applications can
/// leave them out of their logs: `mesh-health/<version>`.
pub const HEALTH_USER_AGENT: &str = concat!("mesh-health/", env!("CARGO_PKG_VERSION"));

/// The result of a checker's last check, shared with whoever explains why a replica is
/// not ready: `None` after a pass (or before the first check), else why it failed, e.g.
/// `connection refused on 127.0.0.1:4000` or `GET /healthz -> 500 after 3 ms`.
pub type LastCheck = std::sync::Arc<parking_lot::Mutex<Option<String>>>;

/// One already-expanded check against one replica.
#[derive(Clone, Debug)]
pub enum Probe {
    /// GET `path` from `127.0.0.1:port`; a status 200–399 passes.
    Http {
        port: u16,
        /// Origin-form request target (`/healthz`, `/status?full=1`).
        path: String,
        /// Use HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1, for grpc services.
        h2c: bool,
    },
    /// A TCP connect to `127.0.0.1:port` passes.
    Tcp { port: u16 },
    /// Run this process (output discarded); exit code 0 passes.
    Exec(SpawnSpec),
}

/// When a configured check runs and how its results are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Time between checks once the replica has passed once.
    pub interval: Duration,
    /// Bound on one check.
    pub timeout: Duration,
    /// Consecutive counted failures that make the replica unready (0 is treated as 1).
    pub failures: u32,
    /// Failures within this time from the checker's start do not count.
    pub start_period: Duration,
}

/// What a checker task checks.
#[derive(Clone, Debug)]
pub enum CheckerKind {
    /// The default readiness of a service without `[health]`: try a TCP connect to
    /// `127.0.0.1:port` every [`PORT_OPEN_INTERVAL`]; on the first success send one
    /// [`HealthEvent::Ready`] and stop, because afterwards only passive health applies.
    PortOpen { port: u16 },
    /// A configured `[health]` check, run for as long as the task lives.
    Check { probe: Probe, schedule: Schedule },
}

/// A readiness edge reported by a checker.
///
/// A checker starts in an *unknown* state (neither ready nor unready) and reports only
/// changes:
/// - [`HealthEvent::Ready`] on a pass while not ready (unknown or unready);
/// - [`HealthEvent::Unready`] when the counted consecutive failures reach
///   [`Schedule::failures`] while not unready (unknown or ready).
///
/// So a replica that never passes gets one `Unready` (and can be restarted when
/// `restart_on_unhealthy`), and the two events strictly alternate after that.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthEvent {
    Ready,
    Unready {
        /// Why the last check failed, e.g. "status 503" or "connect refused".
        reason: String,
    },
}

/// Run one check, bounded by `timeout` as a whole.
///
/// `Err` says why it failed in a short lowercase phrase: "connect refused",
/// "status 503", "timed out after 1s", "exit code 3".
pub async fn probe_once(probe: &Probe, timeout: Duration) -> Result<(), String> {
    match probe {
        // An exec check handles its own timeout, because on expiry it must kill the
        // process group rather than merely stop waiting for it.
        Probe::Exec(spec) => probe_exec(spec, timeout).await,
        Probe::Tcp { port } => bounded(timeout, probe_tcp(*port)).await,
        Probe::Http { port, path, h2c } => {
            let started = Instant::now();
            match tokio::time::timeout(timeout, probe_http(*port, path, *h2c)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(HttpFailure::Status(status))) => Err(format!(
                    "GET {} -> {status} after {} ms",
                    target(path),
                    started.elapsed().as_millis()
                )),
                Ok(Err(HttpFailure::Other(why))) => Err(format!("GET {}: {why}", target(path))),
                Err(_) => Err(format!("GET {}: {}", target(path), timed_out(timeout))),
            }
        }
    }
}

/// Why an HTTP check failed.
enum HttpFailure {
    /// The app answered this status (not 200–399).
    Status(u16),
    /// No answer: connect refused, not HTTP, …
    Other(String),
}

/// The request target of an HTTP check's `path`.
fn target(path: &str) -> String {
    if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    }
}

/// Start a checker task that sends readiness edges to `events`.
///
/// Start it right after spawning the replica: the first check runs at once, and
/// `start_period` is measured from this call. The task stops when `events` is closed
/// (the receiver dropped), when it is aborted, and for [`CheckerKind::PortOpen`] after
/// its one `Ready`. Aborting or closing it mid-check cancels that check (an exec check's
/// process group is killed when its [`process::Child`] is dropped).
///
/// The task runs in the caller's current tracing span, which should name the replica.
pub fn spawn_checker(kind: CheckerKind, events: mpsc::Sender<HealthEvent>) -> JoinHandle<()> {
    spawn_checker_with(kind, events, LastCheck::default())
}

/// [`spawn_checker`], recording each check's result in `last`.
pub fn spawn_checker_with(
    kind: CheckerKind,
    events: mpsc::Sender<HealthEvent>,
    last: LastCheck,
) -> JoinHandle<()> {
    let task = async move {
        match kind {
            CheckerKind::PortOpen { port } => run_port_open(port, events, last).await,
            CheckerKind::Check { probe, schedule } => {
                run_check(probe, schedule, events, last).await
            }
        }
    };
    tokio::spawn(task.in_current_span())
}

// === impl Probe ===

impl Probe {
    /// An HTTP check for a service of `protocol`: h2c for grpc, HTTP/1.1 otherwise.
    pub fn http(port: u16, path: impl Into<String>, protocol: Protocol) -> Self {
        Probe::Http {
            port,
            path: path.into(),
            h2c: protocol == Protocol::Grpc,
        }
    }
}

// === impl Schedule ===

impl From<&Health> for Schedule {
    fn from(health: &Health) -> Self {
        Schedule {
            interval: health.interval,
            timeout: health.timeout,
            failures: health.failures,
            start_period: health.start_period,
        }
    }
}

// === checker loops ===

async fn run_port_open(port: u16, events: mpsc::Sender<HealthEvent>, last: LastCheck) {
    loop {
        let tick = Instant::now();
        let probe = bounded(PORT_OPEN_TIMEOUT, probe_tcp(port));
        let result = tokio::select! {
            r = probe => r,
            _ = events.closed() => return,
        };
        let passed = result.is_ok();
        *last.lock() = result.err();
        if passed {
            // A closed receiver means nobody cares any more: stopping is all there is to do.
            let _ = events.send(HealthEvent::Ready).await;
            return;
        }
        tokio::select! {
            _ = sleep_until(tick + PORT_OPEN_INTERVAL) => {}
            _ = events.closed() => return,
        }
    }
}

async fn run_check(
    probe: Probe,
    schedule: Schedule,
    events: mpsc::Sender<HealthEvent>,
    last: LastCheck,
) {
    let mut counter = FailureCounter::new(Instant::now(), schedule);
    let mut state = State::Unknown;
    loop {
        let tick = Instant::now();
        let result = tokio::select! {
            r = probe_once(&probe, schedule.timeout) => r,
            _ = events.closed() => return,
        };
        *last.lock() = result.clone().err();
        let event = match result {
            Ok(()) => {
                counter.pass(tick);
                (state != State::Ready).then(|| {
                    state = State::Ready;
                    HealthEvent::Ready
                })
            }
            Err(reason) => {
                tracing::debug!(%reason, "health check failed");
                let over = counter.fail(tick);
                (over && state != State::Unready).then(|| {
                    state = State::Unready;
                    HealthEvent::Unready { reason }
                })
            }
        };
        if let Some(event) = event {
            if events.send(event).await.is_err() {
                return;
            }
        }
        tokio::select! {
            _ = sleep_until(tick + counter.period()) => {}
            _ = events.closed() => return,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Unknown,
    Ready,
    Unready,
}

/// Counts consecutive failures under the rules of SPEC §3 "Readiness".
///
/// Before the first pass checks run every [`FAST_INTERVAL`] so that readiness is seen
/// quickly, but failures still count at most once per `interval`: otherwise a slow
/// starter with `failures = 3` would be declared unready (and restarted, with
/// `restart_on_unhealthy`) after 750 ms whatever its `interval`. This matches what a
/// docker compose user expects: unready after about `start_period + failures × interval`.
///
/// As in docker, the first pass ends `start_period` early: from then on every failure
/// counts.
#[derive(Debug)]
struct FailureCounter {
    schedule: Schedule,
    /// Failures of checks started before this instant are not counted.
    count_from: Instant,
    consecutive: u32,
    passed_once: bool,
}

impl FailureCounter {
    fn new(start: Instant, schedule: Schedule) -> Self {
        FailureCounter {
            schedule,
            count_from: start + schedule.start_period,
            consecutive: 0,
            passed_once: false,
        }
    }

    fn pass(&mut self, tick: Instant) {
        self.consecutive = 0;
        self.passed_once = true;
        self.count_from = self.count_from.min(tick);
    }

    /// Record a failure of the check started at `tick`; true when the threshold is met.
    fn fail(&mut self, tick: Instant) -> bool {
        if tick >= self.count_from {
            self.consecutive = self.consecutive.saturating_add(1);
            self.count_from = tick + self.schedule.interval;
        }
        self.consecutive >= self.schedule.failures.max(1)
    }

    /// Time from the start of one check to the start of the next.
    fn period(&self) -> Duration {
        if self.passed_once {
            self.schedule.interval
        } else {
            FAST_INTERVAL
        }
    }
}

// === probes ===

async fn bounded<F>(timeout: Duration, probe: F) -> Result<(), String>
where
    F: Future<Output = Result<(), String>>,
{
    match tokio::time::timeout(timeout, probe).await {
        Ok(result) => result,
        Err(_) => Err(timed_out(timeout)),
    }
}

fn timed_out(timeout: Duration) -> String {
    format!("timed out after {}", humantime::format_duration(timeout))
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Connect to the app; the error is already phrased for a probe failure.
async fn connect(port: u16) -> Result<TcpStream, String> {
    let addr = loopback(port);
    TcpStream::connect(addr).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::ConnectionRefused => format!("connection refused on {addr}"),
        _ => format!("connect to {addr} failed: {e}"),
    })
}

async fn probe_tcp(port: u16) -> Result<(), String> {
    connect(port).await.map(drop)
}

/// Read a probe's response body (up to [`MAX_PROBE_BODY`]). Dropping a connection with
/// unread bytes makes the kernel reset it, which many servers log as an error (Python's
/// http.server prints a traceback) on every check.
async fn drain(mut body: hyper::body::Incoming) {
    use http_body_util::BodyExt;
    let mut seen = 0usize;
    while let Some(Ok(frame)) = body.frame().await {
        seen += frame.data_ref().map_or(0, |d| d.len());
        if seen > MAX_PROBE_BODY {
            break;
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How much of a health response body is read before the connection is dropped anyway.
const MAX_PROBE_BODY: usize = 64 * 1024;

async fn probe_http(port: u16, path: &str, h2c: bool) -> Result<(), HttpFailure> {
    probe_http_inner(port, path, h2c).await
}

async fn probe_http_inner(port: u16, path: &str, h2c: bool) -> Result<(), HttpFailure> {
    let authority = format!("127.0.0.1:{port}");
    let target = target(path);
    // HTTP/2 needs `:scheme` and `:authority`, so it gets an absolute URI; HTTP/1.1 gets
    // the origin form with a `Host` header, as a browser would send it.
    let uri: Uri = if h2c {
        format!("http://{authority}{target}").parse()
    } else {
        target.parse()
    }
    .map_err(|_| HttpFailure::Other(format!("invalid path {path:?}")))?;
    let mut request = Request::get(uri).header(USER_AGENT, HEALTH_USER_AGENT);
    if !h2c {
        // One request per connection, said up front, so the app closes it in an orderly
        // way instead of waiting for a next request that never comes.
        request = request.header(HOST, &authority).header(CONNECTION, "close");
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| HttpFailure::Other(format!("invalid request: {e}")))?;

    let io = TokioIo::new(connect(port).await.map_err(HttpFailure::Other)?);
    // The connection is driven by a task of its own (aborted when this probe ends), so a
    // server that answers and closes at once cannot race the response.
    let (_conn, response) = if h2c {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(http_error)?;
        let conn = AbortOnDrop(tokio::spawn(async move {
            let _ = conn.await;
        }));
        (
            conn,
            sender.send_request(request).await.map_err(http_error)?,
        )
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(http_error)?;
        let conn = AbortOnDrop(tokio::spawn(async move {
            let _ = conn.await;
        }));
        (
            conn,
            sender.send_request(request).await.map_err(http_error)?,
        )
    };
    let status = response.status();
    drain(response.into_body()).await;
    verdict(status)
}

fn verdict(status: hyper::StatusCode) -> Result<(), HttpFailure> {
    if (200..400).contains(&status.as_u16()) {
        Ok(())
    } else {
        Err(HttpFailure::Status(status.as_u16()))
    }
}

fn http_error(e: hyper::Error) -> HttpFailure {
    HttpFailure::Other(format!("http error: {e}"))
}

async fn probe_exec(spec: &SpawnSpec, timeout: Duration) -> Result<(), String> {
    let mut child = process::spawn(spec, Output::Piped)
        .await
        .map_err(|e| format!("exec check could not start: {e}"))?;
    // Its output is read (and stdout thrown away) so that it never blocks on a full
    // pipe; the last line of stderr says why it failed.
    let stderr = child.take_stderr().map(|err| tokio::spawn(last_line(err)));
    let stdout = child.take_stdout().map(|out| tokio::spawn(last_line(out)));
    let why = |stderr: Option<JoinHandle<String>>| async move {
        match stderr {
            Some(task) => task.await.unwrap_or_default(),
            None => String::new(),
        }
    };
    let waited = tokio::time::timeout(timeout, child.wait()).await;
    if let Some(task) = stdout {
        task.abort();
    }
    match waited {
        Ok(ExitReport::Code(0)) => Ok(()),
        Ok(ExitReport::Code(code)) => {
            let line = why(stderr).await;
            Err(if line.is_empty() {
                format!("exec check exited {code}")
            } else {
                format!("exec check exited {code}: {line}")
            })
        }
        Ok(ExitReport::Signal(sig)) => Err(format!("exec check killed by signal {sig}")),
        Ok(ExitReport::SpawnFailed(why)) => Err(format!("exec check could not start: {why}")),
        Err(_) => {
            // The check may have started children of its own: kill the whole group.
            child.kill_group();
            Err(timed_out(timeout))
        }
    }
}

/// The last non-empty line a pipe carried (at most 64 KiB of it are kept), once it closes.
async fn last_line<R: tokio::io::AsyncRead + Unpin>(mut reader: R) -> String {
    use tokio::io::AsyncReadExt;
    let mut tail: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > MAX_PROBE_BODY {
                    tail.drain(..tail.len() - MAX_PROBE_BODY);
                }
            }
        }
    }
    String::from_utf8_lossy(&tail)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests;
