//! The control socket (SPEC §4): `state_dir/mesh.sock`, through which `mesh ps`,
//! `mesh down` and `mesh certs` talk to the running mesh.
//!
//! Protocol: the client sends one line, a JSON object `{"cmd": NAME, "args": …}` (`args`
//! optional, e.g. `{"services": ["api"]}`); the mesh answers one line, `{"ok": true,
//! "data": …}` or `{"ok": false, "error": "…"}`, and closes. Commands that act (`down`,
//! `start`, `stop`, `restart`, `reload`) answer once the action is done. The socket lives
//! inside `state_dir` (mode 0700), so only its owner can reach it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

/// The socket's file name inside `state_dir`.
pub(crate) const SOCKET: &str = "mesh.sock";

/// The longest request line accepted.
const MAX_REQUEST: usize = 4096;

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
/// at the path belongs to a mesh that is gone and is replaced.
pub(crate) fn bind(state_dir: &Path) -> io::Result<UnixListener> {
    let path = socket_path(state_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(&path)
}

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
    let mut line = String::new();
    let mut reader = BufReader::new(read).take(MAX_REQUEST as u64);
    reader.read_line(&mut line).await?;
    let reply = match serde_json::from_str::<serde_json::Value>(&line) {
        Ok(request) => {
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
        Err(error) => Err(format!("malformed request: {error}")),
    };
    let reply = match reply {
        Ok(data) => serde_json::json!({ "ok": true, "data": data }),
        Err(error) => serde_json::json!({ "ok": false, "error": error }),
    };
    let mut text = reply.to_string();
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    write.shutdown().await
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
