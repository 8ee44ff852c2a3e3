#![allow(clippy::unwrap_used, reason = "a failing test panics")]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

use super::*;

/// A loopback port whose listener the test opens and closes, so that TCP probes pass or
/// are refused at will. Binding without listening reserves the port: connects to it are
/// refused until `open`.
struct Gate {
    port: u16,
    socket: Option<TcpSocket>,
    accept: Option<JoinHandle<()>>,
}

impl Gate {
    fn new() -> Self {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let port = socket.local_addr().unwrap().port();
        Gate {
            port,
            socket: Some(socket),
            accept: None,
        }
    }

    fn open(&mut self) {
        let socket = match self.socket.take() {
            Some(s) => s,
            None => {
                let s = TcpSocket::new_v4().unwrap();
                s.set_reuseaddr(true).unwrap();
                s.bind(SocketAddr::from(([127, 0, 0, 1], self.port)))
                    .unwrap();
                s
            }
        };
        let listener = socket.listen(128).unwrap();
        self.accept = Some(tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                drop(conn);
            }
        }));
    }

    fn close(&mut self) {
        if let Some(task) = self.accept.take() {
            task.abort();
        }
        self.socket = None;
    }
}

fn schedule(interval_ms: u64, failures: u32, start_period_ms: u64) -> Schedule {
    Schedule {
        interval: Duration::from_millis(interval_ms),
        timeout: Duration::from_secs(1),
        failures,
        start_period: Duration::from_millis(start_period_ms),
    }
}

fn refused(port: u16) -> String {
    format!("connection refused on 127.0.0.1:{port}")
}

fn unready(reason: &str) -> HealthEvent {
    HealthEvent::Unready {
        reason: reason.to_owned(),
    }
}

async fn next_at(rx: &mut mpsc::Receiver<HealthEvent>, start: Instant) -> (HealthEvent, u128) {
    let event = rx.recv().await.unwrap();
    (event, start.elapsed().as_millis())
}

#[tokio::test(start_paused = true)]
async fn schedule_is_fast_until_first_pass_then_interval() {
    let mut gate = Gate::new();
    let (tx, mut rx) = mpsc::channel(8);
    let start = Instant::now();
    let kind = CheckerKind::Check {
        probe: Probe::Tcp { port: gate.port },
        schedule: schedule(2000, 3, 0),
    };
    let task = spawn_checker(kind, tx);

    // Never passed: checks every 250 ms, but failures count once per interval
    // (at 0, 2 s, 4 s), so the third counted failure lands at 4 s.
    assert_eq!(
        next_at(&mut rx, start).await,
        (unready(&refused(gate.port)), 4000)
    );

    // Opening between two fast checks is seen at the next 250 ms tick.
    sleep_until(start + Duration::from_millis(5100)).await;
    gate.open();
    assert_eq!(next_at(&mut rx, start).await, (HealthEvent::Ready, 5250));

    // After the first pass checks run every interval: 7.25 s, 9.25 s, 11.25 s.
    sleep_until(start + Duration::from_millis(6000)).await;
    gate.close();
    assert_eq!(
        next_at(&mut rx, start).await,
        (unready(&refused(gate.port)), 11250)
    );

    gate.open();
    assert_eq!(next_at(&mut rx, start).await, (HealthEvent::Ready, 13250));

    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn failures_during_start_period_do_not_count() {
    let gate = Gate::new();
    let (tx, mut rx) = mpsc::channel(8);
    let start = Instant::now();
    let kind = CheckerKind::Check {
        probe: Probe::Tcp { port: gate.port },
        schedule: schedule(1000, 2, 3000),
    };
    let _task = spawn_checker(kind, tx);
    // Counted failures at 3 s and 4 s only.
    assert_eq!(
        next_at(&mut rx, start).await,
        (unready(&refused(gate.port)), 4000)
    );
}

#[tokio::test(start_paused = true)]
async fn a_pass_ends_the_start_period() {
    let mut gate = Gate::new();
    gate.open();
    let (tx, mut rx) = mpsc::channel(8);
    let start = Instant::now();
    let kind = CheckerKind::Check {
        probe: Probe::Tcp { port: gate.port },
        schedule: schedule(1000, 2, 60_000),
    };
    let _task = spawn_checker(kind, tx);
    assert_eq!(next_at(&mut rx, start).await, (HealthEvent::Ready, 0));
    sleep_until(start + Duration::from_millis(500)).await;
    gate.close();
    assert_eq!(
        next_at(&mut rx, start).await,
        (unready(&refused(gate.port)), 2000)
    );
}

#[tokio::test(start_paused = true)]
async fn failures_threshold_needs_consecutive_failures() {
    let mut gate = Gate::new();
    gate.open();
    let (tx, mut rx) = mpsc::channel(8);
    let start = Instant::now();
    let kind = CheckerKind::Check {
        probe: Probe::Tcp { port: gate.port },
        schedule: schedule(1000, 3, 0),
    };
    let _task = spawn_checker(kind, tx);
    assert_eq!(next_at(&mut rx, start).await, (HealthEvent::Ready, 0));

    // Fail at 1 s and 2 s, pass at 3 s: the count resets without an event.
    sleep_until(start + Duration::from_millis(500)).await;
    gate.close();
    sleep_until(start + Duration::from_millis(2500)).await;
    gate.open();
    // Fail at 4 s, 5 s, 6 s: unready at the third.
    sleep_until(start + Duration::from_millis(3500)).await;
    gate.close();
    assert_eq!(
        next_at(&mut rx, start).await,
        (unready(&refused(gate.port)), 6000)
    );
}

#[tokio::test(start_paused = true)]
async fn port_open_polls_every_100ms_then_stops() {
    let mut gate = Gate::new();
    let (tx, mut rx) = mpsc::channel(8);
    let start = Instant::now();
    let task = spawn_checker(CheckerKind::PortOpen { port: gate.port }, tx);
    sleep_until(start + Duration::from_millis(350)).await;
    gate.open();
    assert_eq!(next_at(&mut rx, start).await, (HealthEvent::Ready, 400));
    // The task ends after its one event, which closes the channel.
    assert_eq!(rx.recv().await, None);
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn checker_stops_when_receiver_is_dropped() {
    let gate = Gate::new();
    let (tx, rx) = mpsc::channel(8);
    let kind = CheckerKind::Check {
        probe: Probe::Tcp { port: gate.port },
        schedule: schedule(1000, 1000, 0),
    };
    let task = spawn_checker(kind, tx);
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(rx);
    tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn tcp_probe() {
    let mut gate = Gate::new();
    let probe = Probe::Tcp { port: gate.port };
    let timeout = Duration::from_secs(1);
    assert_eq!(probe_once(&probe, timeout).await, Err(refused(gate.port)));
    gate.open();
    assert_eq!(probe_once(&probe, timeout).await, Ok(()));
}

/// Serves `/status/NNN` with status NNN and `/slow` after 10 s, on HTTP/1.1 or h2c, and
/// reports each request's `Host` and `User-Agent` headers.
async fn http_server(h2c: bool) -> (u16, mpsc::UnboundedReceiver<(String, String)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let seen = seen_tx.clone();
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let seen = seen.clone();
                async move {
                    let header = |name| {
                        req.headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    let host = req
                        .uri()
                        .authority()
                        .map(|a| a.to_string())
                        .unwrap_or_else(|| header(HOST));
                    let _ = seen.send((host, header(USER_AGENT)));
                    let path = req.uri().path();
                    if path == "/slow" {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                    }
                    let code = path
                        .strip_prefix("/status/")
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(404);
                    let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
                    *resp.status_mut() = StatusCode::from_u16(code).unwrap();
                    Ok::<_, Infallible>(resp)
                }
            });
            let io = TokioIo::new(conn);
            tokio::spawn(async move {
                let _ = if h2c {
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await
                } else {
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await
                };
            });
        }
    });
    (port, seen_rx)
}

async fn check_http_statuses(h2c: bool) {
    let (port, mut seen) = http_server(h2c).await;
    let timeout = Duration::from_secs(5);
    let probe = |path: &str| Probe::Http {
        port,
        path: path.to_owned(),
        h2c,
    };
    assert_eq!(probe_once(&probe("/status/200"), timeout).await, Ok(()));
    assert_eq!(
        seen.recv().await.unwrap(),
        (format!("127.0.0.1:{port}"), HEALTH_USER_AGENT.to_owned())
    );
    assert_eq!(probe_once(&probe("/status/302"), timeout).await, Ok(()));
    assert_eq!(probe_once(&probe("status/399"), timeout).await, Ok(()));
    let failed = probe_once(&probe("/status/503"), timeout)
        .await
        .unwrap_err();
    assert!(
        failed.starts_with("GET /status/503 -> 503 after "),
        "{failed}"
    );
    assert!(failed.ends_with(" ms"), "{failed}");
    let failed = probe_once(&probe("/status/404"), timeout)
        .await
        .unwrap_err();
    assert!(
        failed.starts_with("GET /status/404 -> 404 after "),
        "{failed}"
    );
    assert_eq!(
        probe_once(&probe("/slow"), Duration::from_millis(200)).await,
        Err("GET /slow: timed out after 200ms".into())
    );
}

#[tokio::test]
async fn http1_probe_passes_on_200_to_399() {
    check_http_statuses(false).await;
}

#[tokio::test]
async fn h2c_probe_passes_on_200_to_399() {
    check_http_statuses(true).await;
}

#[tokio::test]
async fn http_probe_reports_refused_connect() {
    let gate = Gate::new();
    let probe = Probe::http(gate.port, "/healthz", Protocol::Http);
    assert_eq!(
        probe_once(&probe, Duration::from_secs(1)).await,
        Err(format!("GET /healthz: {}", refused(gate.port)))
    );
}
