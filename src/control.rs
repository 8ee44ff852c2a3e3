//! The control socket (SPEC §4): `state_dir/mesh.sock`, through which `mesh ps`,
//! `mesh down`, `mesh certs`, `mesh exec` (`env`), `mesh up -d` / `--wait` (`ps`) and
//! the commands that act talk to the running mesh.
//!
//! Protocol: the client sends one line, a JSON object `{"cmd": NAME, "args": …}` (`args`
//! optional, e.g. `{"services": ["api"]}`); the mesh answers one line, `{"ok": true,
//! "data": …}` or `{"ok": false, "error": "…"}`, and closes. Commands that act (`down`,
//! `start`, `stop`, `restart`, `reload`) answer once the action is done. The socket lives
//! inside `state_dir` (mode 0700), so only its owner can reach it.
//!
//! # Theory of operation
//!
//! Each connection is a task of its own, so clients are served side by side and one
//! that misbehaves holds only its own task. The request line is read through a cap of
//! [`MAX_REQUEST`] bytes: a longer line is answered with an error after that many bytes
//! (the rest is never read), so no client makes the mesh buffer without bound. A client
//! has [`IO_TIMEOUT`] to send its line and again to take the answer (once an acting
//! command is done, which may take a rollout's time); one that connects and stays silent
//! is answered with an error and dropped then. A line that is not a JSON request gets an
//! error answer; a client gone half way gets nothing (its answer fails to write, which
//! is only a debug event). None of these touch the mesh itself.
//!
//! The socket file is removed when the [`SocketFile`] returned by [`bind`] is dropped,
//! on every way out of `mesh up`. A file left by a mesh that was SIGKILLed is replaced
//! by the next `mesh up`, which holds the state directory's lock and so knows no mesh
//! is using it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

/// The socket's file name inside `state_dir`.
pub(crate) const SOCKET: &str = "mesh.sock";

/// The longest request line accepted, newline included.
const MAX_REQUEST: usize = 4096;

/// How long a client has to send its request line, and to take the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the control socket asks of the running mesh.
#[derive(Debug)]
pub(crate) enum Request {
    /// Stop the mesh, as SIGTERM does.
    Down,
    /// A command that acts on the running mesh (`start`, `stop`, `restart`, `reload`),
    /// with its arguments; the answer goes back on `reply` once the action is done.
    Act {
        cmd: String,
        args: serde_json::Value,
        reply: tokio::sync::oneshot::Sender<Result<serde_json::Value, String>>,
    },
}

/// The commands that act, carried out by the mesh's main loop.
const ACTING: &[&str] = &["start", "stop", "restart", "reload"];

/// Answers the commands that only read.
pub(crate) trait Answer: Send + Sync + 'static {
    /// The `data` of a reading command (with its `args`, `Null` when none), or an error
    /// message.
    fn answer(&self, cmd: &str, args: &serde_json::Value) -> Result<serde_json::Value, String>;
}

/// The socket path for `state_dir`.
pub(crate) fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET)
}

/// Bind the control socket. The caller holds the state directory's lock, so a file left
/// at the path belongs to a mesh that is gone (SIGKILLed) and is replaced. The socket
/// file is removed when the returned [`SocketFile`] is dropped.
pub(crate) fn bind(state_dir: &Path) -> io::Result<(UnixListener, SocketFile)> {
    let path = socket_path(state_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(&path)?;
    Ok((listener, SocketFile(path)))
}

/// The control socket's file, removed on drop: a mesh that stops, or fails to start
/// after binding it, leaves no socket behind for clients to find.
#[derive(Debug)]
pub(crate) struct SocketFile(PathBuf);

/// Serve the socket until the task is dropped; requests that act are sent on `requests`.
pub(crate) async fn serve(
    listener: UnixListener,
    answer: Arc<dyn Answer>,
    requests: mpsc::UnboundedSender<Request>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "control socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let answer = Arc::clone(&answer);
        let requests = requests.clone();
        tokio::spawn(async move {
            if let Err(error) = connection(stream, &*answer, &requests).await {
                tracing::debug!(%error, "control connection failed");
            }
        });
    }
}

async fn connection(
    stream: UnixStream,
    answer: &dyn Answer,
    requests: &mpsc::UnboundedSender<Request>,
) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let reply = match tokio::time::timeout(IO_TIMEOUT, read_request(read)).await {
        Ok(Ok(Some(line))) => handle(&line, answer, requests).await,
        // Connected and closed without a byte: nobody to answer.
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(format!(
            "no request line within {}",
            humantime::format_duration(IO_TIMEOUT)
        )),
    };
    let reply = match reply {
        Ok(data) => serde_json::json!({ "ok": true, "data": data }),
        Err(error) => serde_json::json!({ "ok": false, "error": error }),
    };
    let mut text = reply.to_string();
    text.push('\n');
    let send = async {
        write.write_all(text.as_bytes()).await?;
        write.shutdown().await
    };
    match tokio::time::timeout(IO_TIMEOUT, send).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client did not take its answer",
        )),
    }
}

/// Read one request line of at most [`MAX_REQUEST`] bytes: `None` when the client closed
/// without sending anything, `Err` with the answer to give when the line is too long.
/// A client that closes its side after a partial line gets that part parsed (a request
/// without its newline is still a request; anything else is malformed).
async fn read_request(read: tokio::net::unix::OwnedReadHalf) -> Result<Option<Vec<u8>>, String> {
    let mut line = Vec::new();
    let mut reader = BufReader::new(read).take(MAX_REQUEST as u64);
    reader
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| format!("cannot read the request: {e}"))?;
    if line.is_empty() {
        return Ok(None);
    }
    if line.len() >= MAX_REQUEST && !line.ends_with(b"\n") {
        return Err(format!("request longer than {MAX_REQUEST} bytes"));
    }
    Ok(Some(line))
}

/// The answer to one request line.
async fn handle(
    line: &[u8],
    answer: &dyn Answer,
    requests: &mpsc::UnboundedSender<Request>,
) -> Result<serde_json::Value, String> {
    let request = serde_json::from_slice::<serde_json::Value>(line)
        .map_err(|error| format!("malformed request: {error}"))?;
    let args = request
        .get("args")
        .cloned()
        .unwrap_or(serde_json::Value::Null);
    match request.get("cmd").and_then(|c| c.as_str()) {
        Some("down") => {
            let _ = requests.send(Request::Down);
            Ok(serde_json::Value::Null)
        }
        Some(cmd) if ACTING.contains(&cmd) => {
            let (reply, answer) = tokio::sync::oneshot::channel();
            let request = Request::Act {
                cmd: cmd.to_string(),
                args,
                reply,
            };
            match requests.send(request) {
                Ok(()) => answer
                    .await
                    .unwrap_or_else(|_| Err("the mesh is stopping".to_string())),
                Err(_) => Err("the mesh is stopping".to_string()),
            }
        }
        Some(cmd) => answer.answer(cmd, &args),
        None => Err("a request needs `cmd`".to_string()),
    }
}

/// Why a control command failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    #[error("no running mesh")]
    NotRunning,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Mesh(String),
}

/// Send `cmd` to the mesh running on `state_dir` and return its `data`.
pub(crate) fn call(state_dir: &Path, cmd: &str) -> Result<serde_json::Value, ClientError> {
    call_with(state_dir, cmd, serde_json::Value::Null)
}

/// [`call`] with arguments.
pub(crate) fn call_with(
    state_dir: &Path,
    cmd: &str,
    args: serde_json::Value,
) -> Result<serde_json::Value, ClientError> {
    request(state_dir, cmd, args, None)
}

/// [`call_with`], giving up with an [`io::ErrorKind::TimedOut`] (or `WouldBlock`) error
/// when the mesh takes longer than `limit` to answer: for polling a mesh that may still
/// be starting (its socket is bound before it serves it).
pub(crate) fn call_within(
    state_dir: &Path,
    cmd: &str,
    args: serde_json::Value,
    limit: Duration,
) -> Result<serde_json::Value, ClientError> {
    request(state_dir, cmd, args, Some(limit))
}

fn request(
    state_dir: &Path,
    cmd: &str,
    args: serde_json::Value,
    limit: Option<Duration>,
) -> Result<serde_json::Value, ClientError> {
    use std::io::{BufRead as _, Write as _};
    let path = socket_path(state_dir);
    let mut stream = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ClientError::NotRunning);
        }
        Err(e) => return Err(e.into()),
    };
    stream.set_read_timeout(limit)?;
    stream.set_write_timeout(limit)?;
    let request = serde_json::json!({ "cmd": cmd, "args": args });
    writeln!(stream, "{request}")?;
    let mut line = String::new();
    std::io::BufReader::new(&stream).read_line(&mut line)?;
    let reply: serde_json::Value = serde_json::from_str(&line)
        .map_err(|e| ClientError::Mesh(format!("malformed answer from the mesh: {e}: {line:?}")))?;
    if reply.get("ok").and_then(|v| v.as_bool()) == Some(true) {
        Ok(reply
            .get("data")
            .cloned()
            .unwrap_or(serde_json::Value::Null))
    } else {
        let error = reply
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("unknown error");
        Err(ClientError::Mesh(error.to_string()))
    }
}

// === impl SocketFile ===

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
