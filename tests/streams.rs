//! Bodies pass whole (SPEC §1): a long response made of hundreds of thousands of tiny
//! writes reaches the caller byte for byte through an ingress and through an outbound,
//! over h2c and gRPC; a reader that pauses gets everything afterwards while mesh's memory
//! stays bounded; a paused stream does not slow another stream of the same connection.
//! All against the real binary and the real test app.

mod support;

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;

const T: Duration = Duration::from_secs(30);

/// Frames the app writes: each `chunk N\n` (8 to 14 bytes) is its own DATA frame.
const FRAMES: u64 = 400_000;

/// The mesh's HTTP/2 stream window between sidecars (proxy/src/http/server.rs).
const STREAM_WINDOW: u64 = 1024 * 1024;

type Body = BoxBody<Bytes, Infallible>;

/// The two tests run one after the other: the memory figure is about one paused stream,
/// not about a machine busy with four others at full speed.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `api` (http) and `rpc` (grpc), both the test app and both exposed, and a caller that
/// has both as upstreams and prints their URLs.
fn project() -> Project {
    Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
expose = "127.0.0.1:0"

[services.rpc]
command = [{app:?}]
protocol = "grpc"
expose = "127.0.0.1:0"

[services.caller]
command = ["sh", "-c", "echo api=$API_URL; echo rpc=$RPC_URL; exec sleep 1000"]
port = "none"
upstreams = ["api", "rpc"]
"#,
        app = test_app()
    ))
}

fn expected(n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        out.extend_from_slice(format!("chunk {i}\n").as_bytes());
    }
    out
}

/// An h2c connection to `addr` with a small stream window (so a paused stream cannot
/// take much of the connection) and a large connection window.
async fn h2c(addr: &str) -> http2::SendRequest<Body> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let (send, conn) = http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(256 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024)
        .handshake(TokioIo::new(tcp))
        .await
        .expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

async fn stream(send: &mut http2::SendRequest<Body>, addr: &str, n: u64) -> Response<Incoming> {
    let req = Request::get(format!("http://{addr}/stream?n={n}&ms=0"))
        .body(Empty::new().boxed())
        .expect("request");
    let r = tokio::time::timeout(patience(T), send.send_request(req))
        .await
        .expect("response head in time")
        .expect("response head");
    assert_eq!(r.status(), 200, "{addr}");
    r
}

/// Read `r`'s whole body within the deadline; panics naming `how` with the bytes that
/// arrived when the stream is cut.
async fn read_all(r: Response<Incoming>, how: &str) -> Vec<u8> {
    let mut body = r.into_body();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + patience(Duration::from_secs(120));
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => panic!("{how}: not whole in time ({} bytes arrived)", got.len()),
            Ok(None) => return got,
            Ok(Some(Err(error))) => {
                panic!("{how}: cut after {} bytes: {error:?}", got.len())
            }
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    got.extend_from_slice(&data);
                }
            }
        }
    }
}

fn addr_of(mesh: &MeshProc, caller_key: &str) -> String {
    let line = mesh.wait_line(&format!("caller.0 | {caller_key}="), T);
    field_of(&line, caller_key)
        .trim_start_matches("http://")
        .to_string()
}

fn rss_bytes(pid: i32) -> u64 {
    status_kib(pid, "VmRSS:") * 1024
}

/// The highest RSS the process had so far.
fn peak_rss_bytes(pid: i32) -> u64 {
    status_kib(pid, "VmHWM:") * 1024
}

fn status_kib(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn wait_serving(addr: &str) {
    eventually("the app to answer through the mesh", T, || {
        get(addr, "/whoami").ok().filter(|r| r.status == 200)
    });
}

fn app_pids(mesh: &MeshProc) -> Vec<i32> {
    let mut pids = pids_of(mesh, test_app(), "api", 0);
    pids.extend(pids_of(mesh, test_app(), "rpc", 0));
    pids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_of_tiny_writes_pass_whole_via_ingress_and_outbound_over_h2c_and_grpc() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let p = project();
    let mesh = p.up(&[]);
    let paths = [
        ("ingress of api (h2c)", ingress(&mesh, "api")),
        ("ingress of rpc (grpc)", ingress(&mesh, "rpc")),
        ("outbound to api (h2c)", addr_of(&mesh, "api")),
        ("outbound to rpc (grpc)", addr_of(&mesh, "rpc")),
    ];
    for (_, addr) in &paths {
        wait_serving(addr);
    }
    let want = expected(FRAMES);
    for (how, addr) in &paths {
        let mut send = h2c(addr).await;
        let started = Instant::now();
        let got = read_all(stream(&mut send, addr, FRAMES).await, how).await;
        println!(
            "{how}: {} bytes in {FRAMES} frames in {:?}",
            got.len(),
            started.elapsed()
        );
        assert!(
            got == want,
            "{how}: {} bytes, not the app's {}",
            got.len(),
            want.len()
        );
    }
    let pids = app_pids(&mesh);
    stop_mesh(mesh, &pids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_reader_gets_everything_with_bounded_memory_and_slows_no_other_stream() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let p = project();
    // The allocator keeps what it freed (no purge back to the system), so that RSS
    // moves with the memory in use and not with when mimalloc returns pages.
    let mesh = p.up_with_env(&[], &[("MIMALLOC_PURGE_DELAY", "-1")]);
    let addr = ingress(&mesh, "api");
    wait_serving(&addr);
    // Warm up the path (connections, buffers, the allocator's pools) with the same
    // work as below, read at full speed, before the baseline.
    let mut send = h2c(&addr).await;
    let mut other = send.clone();
    let (a, b) = tokio::join!(
        stream(&mut other, &addr, FRAMES),
        stream(&mut send, &addr, 50_000)
    );
    tokio::join!(read_all(a, "warm-up"), read_all(b, "warm-up"));
    // The highest RSS of the warm-up: what full-speed streams cost, whenever the
    // allocator happened to take it.
    let before = peak_rss_bytes(mesh.pid());

    let paused = stream(&mut send, &addr, FRAMES).await;
    // While the first stream is not read, another stream on the same connection (and
    // on the mesh's shared connection to the inbound) goes through whole.
    let other = read_all(stream(&mut send, &addr, 50_000).await, "the other stream").await;
    assert!(
        other == expected(50_000),
        "the other stream: {} bytes",
        other.len()
    );

    // The reader pauses 5 s: that is the behaviour under test, not a wait for something.
    let mut peak = 0;
    let mut after_1s = 0;
    let paused_at = Instant::now();
    let pause_end = paused_at + Duration::from_secs(5);
    while Instant::now() < pause_end {
        let now = rss_bytes(mesh.pid());
        peak = peak.max(now);
        if after_1s == 0 && paused_at.elapsed() >= Duration::from_secs(1) {
            after_1s = now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let growth = peak.saturating_sub(before);
    let later = peak.saturating_sub(after_1s);
    println!(
        "mesh RSS {before} bytes before, {after_1s} after 1 s of the pause, {peak} at most \
         during it: +{growth} bytes in all, +{later} after the first second \
         (bound: 3 x the {STREAM_WINDOW}-byte stream window)"
    );
    // One window in the caller's receive buffer (the socket path; the local path holds
    // only the app's 64 KiB), up to one more in h2's receive storage before frames are
    // taken out (it keeps its high-water mark), and the path's other buffers.
    assert!(
        growth < 3 * STREAM_WINDOW,
        "mesh grew by {growth} bytes while a reader paused"
    );
    // Backpressure: once the stream stalled, the app is held and nothing more is taken.
    assert!(
        later < 1024 * 1024,
        "mesh kept growing while the reader paused: +{later} bytes after the first second"
    );
    let got = read_all(paused, "the paused stream").await;
    assert!(
        got == expected(FRAMES),
        "the paused stream: {} bytes",
        got.len()
    );

    let pids = app_pids(&mesh);
    stop_mesh(mesh, &pids);
}
