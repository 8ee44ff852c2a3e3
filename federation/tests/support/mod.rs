//! A real etcd for the tests: a child process with a private data directory on free
//! loopback ports, killed (and proven gone) at the end.
#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test file uses a different subset"
)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use mesh_federation::{Backoff, Client, Endpoint, Protocol, RemoteEndpoints};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// A deadline scaled by `MESH_TEST_PATIENCE` (a factor, default 1), as in the root tests.
pub fn patience(d: Duration) -> Duration {
    let factor: f64 = std::env::var("MESH_TEST_PATIENCE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    d.mul_f64(factor)
}

/// Run `f` within `limit` (scaled), or panic naming `what`.
pub async fn within<T>(what: &str, limit: Duration, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(patience(limit), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: not done within {:?}", patience(limit)),
    }
}

/// Wait until the table satisfies `pred`, or panic with the last table.
pub async fn wait_table(
    rx: &mut watch::Receiver<Arc<RemoteEndpoints>>,
    what: &str,
    limit: Duration,
    pred: impl FnMut(&Arc<RemoteEndpoints>) -> bool,
) -> Arc<RemoteEndpoints> {
    let found = match tokio::time::timeout(patience(limit), rx.wait_for(pred)).await {
        Ok(Ok(table)) => Some(table.clone()),
        Ok(Err(_)) => panic!("{what}: the discovery stopped"),
        Err(_) => None,
    };
    found.unwrap_or_else(|| {
        panic!(
            "{what}: not within {:?}; the table is {:#?}",
            patience(limit),
            rx.borrow()
        )
    })
}

/// Short retry delays, so that recoveries are seen quickly.
pub fn test_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(50), Duration::from_millis(500)).expect("valid bounds")
}

/// An endpoint of `service` on 127.0.0.1:`port`.
pub fn endpoint(service: &str, replica: u32, port: u16) -> Endpoint {
    Endpoint {
        service: service.to_string(),
        replica,
        address: SocketAddr::from(([127, 0, 0, 1], port)),
        identity: format!("spiffe://test/{service}"),
        protocol: Protocol::Http,
    }
}

/// Which data directory a restart uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Data {
    /// The same: etcd keeps its keys, revisions and leases.
    Same,
    /// A new, empty one: etcd has lost everything.
    Fresh,
}

/// A running etcd.
pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    data: PathBuf,
    generation: u32,
    client_port: u16,
    peer_port: u16,
}

impl Etcd {
    /// Start etcd on free ports and wait until it answers.
    pub async fn start() -> Etcd {
        let mut last_log = String::new();
        // A free port can be taken by someone else before etcd binds it: try again.
        for _ in 0..3 {
            let dir = tempfile::tempdir().expect("temp dir");
            let data = dir.path().join("data-0");
            let mut etcd = Etcd {
                child: None,
                data,
                generation: 0,
                client_port: free_port(),
                peer_port: free_port(),
                dir,
            };
            match etcd.launch().await {
                Ok(()) => return etcd,
                Err(log) if log.contains("address already in use") => last_log = log,
                Err(log) => panic!("etcd did not start; its output:\n{log}"),
            }
        }
        panic!("etcd did not start (ports taken); its output:\n{last_log}")
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The client address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    /// A client of this etcd with test timeouts.
    pub fn client(&self) -> Client {
        client(&self.url())
    }

    /// SIGKILL etcd, reap it, and check that it is gone.
    pub async fn kill(&mut self) {
        let mut child = self.child.take().expect("etcd is running");
        let pid = child.id().expect("a running child has a pid");
        child.kill().await.expect("kill etcd");
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "etcd (pid {pid}) is still there after being killed and reaped"
        );
    }

    /// Start etcd again on the same ports, with its data or without.
    pub async fn restart(&mut self, data: Data) {
        assert!(self.child.is_none(), "kill etcd before restarting it");
        if data == Data::Fresh {
            self.data = self
                .dir
                .path()
                .join(format!("data-{}", self.generation + 1));
        }
        if let Err(log) = self.launch().await {
            panic!("etcd did not restart; its output:\n{log}");
        }
    }

    /// Kill etcd at the end of a test, proving it is gone.
    pub async fn stop(mut self) {
        if self.child.is_some() {
            self.kill().await;
        }
    }

    /// Spawn etcd and wait until it answers a range; on failure, its output.
    async fn launch(&mut self) -> Result<(), String> {
        self.generation += 1;
        let log_path = self
            .dir
            .path()
            .join(format!("etcd-{}.log", self.generation));
        let log = std::fs::File::create(&log_path).expect("etcd log file");
        let client_url = self.url();
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let spawned = Command::new("etcd")
            .arg("--name=test")
            .arg(format!("--data-dir={}", self.data.display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            .arg("--initial-cluster-state=new")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "`etcd` is not installed: these tests run a real etcd; install the Debian package `etcd-server` (apt-get install etcd-server)"
            ),
            Err(e) => panic!("cannot run etcd: {e}"),
        };
        self.child = Some(child);
        let client = self.client();
        let deadline = Instant::now() + patience(Duration::from_secs(30));
        loop {
            let child = self.child.as_mut().expect("just spawned");
            if let Some(status) = child.try_wait().expect("etcd status") {
                self.child = None;
                let output = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!("(exited with {status})\n{output}"));
            }
            if client.range(b"/ready", None).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let output = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!(
                    "(not answering after {:?})\n{output}",
                    patience(Duration::from_secs(30))
                ));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// A client of `url` with test timeouts.
pub fn client(url: &str) -> Client {
    Client::new([url])
        .expect("valid URL")
        .with_request_timeout(Duration::from_secs(2))
        .with_connect_timeout(Duration::from_secs(1))
}

/// A loopback port nobody listens on (as long as nobody else takes it).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// A raw gateway call over HTTP/1.0, for what the client's own decoding would hide.
pub async fn raw_post(addr: SocketAddr, path: &str, body: &serde_json::Value) -> serde_json::Value {
    let body = body.to_string();
    let mut tcp = TcpStream::connect(addr).await.expect("connect to etcd");
    let request = format!(
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await.expect("read");
    let response = String::from_utf8(response).expect("UTF-8 answer");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    serde_json::from_str(body).expect("a JSON body")
}

/// A TCP relay to etcd that holds every watch request until opened: what a watch that
/// starts late looks like to etcd, on demand.
pub struct WatchGate {
    addr: SocketAddr,
    held: watch::Receiver<usize>,
    open: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl WatchGate {
    /// A closed gate in front of `target`.
    pub async fn start(target: SocketAddr) -> WatchGate {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind gate");
        let addr = listener.local_addr().expect("gate addr");
        let (held_tx, held) = watch::channel(0usize);
        let (open, open_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((downstream, _)) = listener.accept().await else {
                    return;
                };
                let held_tx = held_tx.clone();
                let mut open_rx = open_rx.clone();
                connections.spawn(async move {
                    relay(downstream, target, &held_tx, &mut open_rx).await;
                });
            }
        });
        WatchGate {
            addr,
            held,
            open,
            task,
        }
    }

    /// The URL to give clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Wait until `n` watch requests arrived.
    pub async fn wait_watches(&mut self, n: usize) {
        within(
            &format!("{n} watch requests at the gate"),
            Duration::from_secs(20),
            self.held.wait_for(|held| *held >= n),
        )
        .await
        .expect("gate running");
    }

    /// Let held and future watches through.
    pub fn open(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for WatchGate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    mut downstream: TcpStream,
    target: SocketAddr,
    held: &watch::Sender<usize>,
    open: &mut watch::Receiver<bool>,
) {
    const WATCH: &[u8] = b"POST /v3/watch ";
    let mut start = Vec::new();
    let mut chunk = [0u8; 4096];
    while start.len() < WATCH.len() {
        match downstream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => start.extend_from_slice(&chunk[..n]),
        }
    }
    if start.starts_with(WATCH) {
        held.send_modify(|n| *n += 1);
        if open.wait_for(|open| *open).await.is_err() {
            return;
        }
    }
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        return;
    };
    if upstream.write_all(&start).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
}
