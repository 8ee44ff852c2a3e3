//! `--dashboard`: a reader of a mesh's live dashboard stream, `GET /api/events` on its
//! admin address (server-sent events), for the whole run, as an open dashboard page
//! would keep it. It stands for the page: the mesh then computes and sends what a page
//! gets (a snapshot, a tick with the windowed figures every second, the new calls),
//! which is what the path `mesh-dashboard` costs more than `mesh`.
//!
//! One std thread per stream, a plain HTTP/1.1 request on a `TcpStream`: the events are
//! read and thrown away, only counted (an event is a block of lines ended by a blank
//! line that has an `event:` or `data:` field; `:` comment lines are the keep-alives).
//! The socket has a short read timeout, so the thread sees the stop flag within
//! [`POLL`] even when no byte comes; [`EventsClient::stop`] (and its `Drop`) sets the
//! flag and joins the thread. A stream that ends while the bench runs is opened again,
//! at most [`MAX_RECONNECTS`] times, each with a note. A 404 (a mesh without
//! `/api/events`) is not retried.

use std::collections::BTreeMap;
use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Streams opened again after one ended, at most.
pub(crate) const MAX_RECONNECTS: u32 = 3;
/// Wait before opening the stream again.
const RECONNECT_DELAY: Duration = Duration::from_millis(500);
/// How long connecting, or waiting for the answer's head, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The socket's read timeout: how soon the thread sees the stop flag.
const POLL: Duration = Duration::from_millis(100);
/// The answer's head, at most.
const MAX_HEAD: usize = 64 * 1024;
/// The bytes of a line kept to classify it (a `data:` line of a snapshot is long).
const LINE_PREFIX: usize = 64;

/// How the first answer went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum First {
    /// 200 with a stream.
    Streaming,
    /// 404: this mesh has no `/api/events`.
    NotFound,
    /// Another status (with the first line of its body, if it came).
    Status(u16, String),
    /// No answer: the connection failed or the head could not be read.
    Failed(String),
}

/// What the reader has seen so far.
#[derive(Clone, Debug, Default)]
pub(crate) struct Progress {
    /// How the first answer went; `None` until it came.
    pub(crate) first: Option<First>,
    /// Events read, over every stream.
    pub(crate) events: u64,
    /// Events by name (`message` when the block had no `event:` line).
    pub(crate) by_name: BTreeMap<String, u64>,
    /// Comment lines (`: keep-alive`).
    pub(crate) comments: u64,
    /// Bytes of event stream read (after the HTTP framing).
    pub(crate) bytes: u64,
    /// Streams that answered 200.
    pub(crate) streams: u32,
    /// Times the stream was opened again after it ended.
    pub(crate) reconnects: u32,
    /// What went wrong, in order: streams that ended, answers other than 200.
    pub(crate) notes: Vec<String>,
}

impl Progress {
    /// `95 (4 calls, 1 snapshot, 90 tick), 6 keep-alive comments, 1.2 MiB, over 1 stream`.
    pub(crate) fn events_text(&self) -> String {
        let names: Vec<String> = self
            .by_name
            .iter()
            .map(|(name, n)| format!("{n} {name}"))
            .collect();
        let mut s = self.events.to_string();
        if !names.is_empty() {
            s.push_str(&format!(" ({})", names.join(", ")));
        }
        s.push_str(&format!(
            ", {} keep-alive comment{}, {:.1} MiB, over {} stream{}",
            self.comments,
            if self.comments == 1 { "" } else { "s" },
            self.bytes as f64 / (1024.0 * 1024.0),
            self.streams,
            if self.streams == 1 { "" } else { "s" }
        ));
        s
    }
}

/// A reader of `/api/events` on a thread of its own; stops and joins when dropped.
pub(crate) struct EventsClient {
    url: String,
    stop: Arc<AtomicBool>,
    progress: Arc<Mutex<Progress>>,
    thread: Option<JoinHandle<()>>,
}

impl EventsClient {
    /// Starts reading `http://<admin>/api/events`, with `Host: <admin>` (the admin
    /// server refuses other hosts).
    pub(crate) fn start(admin: SocketAddr) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Mutex::new(Progress::default()));
        let thread = std::thread::Builder::new()
            .name("dashboard-events".to_owned())
            .spawn({
                let (stop, progress) = (Arc::clone(&stop), Arc::clone(&progress));
                move || read_streams(admin, &stop, &progress)
            })?;
        Ok(Self {
            url: format!("http://{admin}/api/events"),
            stop,
            progress,
            thread: Some(thread),
        })
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// How the first answer went, waiting for it until `timeout`; `None` if it has not
    /// come by then.
    pub(crate) fn wait_first(&self, timeout: Duration) -> Option<First> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(first) = lock(&self.progress).first.clone() {
                return Some(first);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What it has read so far.
    pub(crate) fn progress(&self) -> Progress {
        lock(&self.progress).clone()
    }

    /// Stops reading and joins the thread; what it read.
    pub(crate) fn stop(&mut self) -> Progress {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                lock(&self.progress)
                    .notes
                    .push("the reader thread panicked".to_owned());
            }
        }
        lock(&self.progress).clone()
    }
}

impl Drop for EventsClient {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The progress, even if a panicking thread poisoned it.
fn lock(progress: &Mutex<Progress>) -> MutexGuard<'_, Progress> {
    progress.lock().unwrap_or_else(|e| e.into_inner())
}

/// How one stream ended.
enum End {
    /// The bench asked it to stop.
    Stopped,
    /// The server closed it (or its body ended).
    Closed,
    /// It answered something other than 200.
    Status(u16, String),
}

/// The thread: one stream after the other until stopped, a 404, or too many reconnects.
fn read_streams(admin: SocketAddr, stop: &AtomicBool, progress: &Mutex<Progress>) {
    let mut reconnects = 0;
    loop {
        let started = Instant::now();
        let ended = read_stream(admin, stop, progress);
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let note = match ended {
            Ok(End::Stopped) => return,
            Ok(End::Status(404, _)) => {
                let mut p = lock(progress);
                p.first.get_or_insert(First::NotFound);
                return;
            }
            Ok(End::Status(code, text)) => {
                lock(progress)
                    .first
                    .get_or_insert(First::Status(code, text.clone()));
                format!("answered {code} ({text})")
            }
            Ok(End::Closed) => format!(
                "the stream ended after {:.1} s",
                started.elapsed().as_secs_f64()
            ),
            Err(e) => {
                lock(progress)
                    .first
                    .get_or_insert(First::Failed(e.to_string()));
                format!(
                    "the stream failed after {:.1} s: {e}",
                    started.elapsed().as_secs_f64()
                )
            }
        };
        let mut p = lock(progress);
        if reconnects == MAX_RECONNECTS {
            p.notes.push(format!(
                "{note}; gave up after {MAX_RECONNECTS} reconnects: no stream for the rest of the run"
            ));
            return;
        }
        reconnects += 1;
        p.reconnects = reconnects;
        p.notes.push(format!("{note}; opened again"));
        drop(p);
        let until = Instant::now() + RECONNECT_DELAY;
        while Instant::now() < until {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(POLL.min(until.saturating_duration_since(Instant::now())));
        }
    }
}

/// One stream: the request, the answer's head, then its events until it ends or the
/// bench stops it.
fn read_stream(
    admin: SocketAddr,
    stop: &AtomicBool,
    progress: &Mutex<Progress>,
) -> io::Result<End> {
    let stream = TcpStream::connect_timeout(&admin, CONNECT_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(POLL))?;
    let mut conn = Conn {
        stream,
        buf: Vec::with_capacity(16 * 1024),
        stop,
    };
    let request = format!(
        "GET /api/events HTTP/1.1\r\nHost: {admin}\r\nAccept: text/event-stream\r\n\
         Cache-Control: no-cache\r\nUser-Agent: mesh-bench\r\n\r\n"
    );
    conn.stream.write_all(request.as_bytes())?;

    // The head, within CONNECT_TIMEOUT.
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let head_end = loop {
        if let Some(i) = find(&conn.buf, b"\r\n\r\n") {
            break i + 4;
        }
        if conn.buf.len() > MAX_HEAD {
            return Err(io::Error::other("the answer's head is too long"));
        }
        if Instant::now() >= deadline {
            return Err(io::Error::other(
                "no answer within 5 s of the request".to_owned(),
            ));
        }
        match conn.fill()? {
            Fill::Data => {}
            Fill::Eof => return Err(io::Error::other("closed before answering")),
            Fill::Stopped => return Ok(End::Stopped),
            Fill::Idle => {}
        }
    };
    let head = String::from_utf8_lossy(&conn.buf[..head_end]).into_owned();
    conn.buf.drain(..head_end);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
    let mut chunked = false;
    let mut content_type = String::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match name.as_str() {
            "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
            "content-type" => value.clone_into(&mut content_type),
            _ => {}
        }
    }
    if code != 200 {
        // What came of the body (the admin answers errors in one short text line).
        let text = String::from_utf8_lossy(&conn.buf);
        let text = text.lines().next().unwrap_or_default().trim();
        let text: String = text.chars().take(200).collect();
        return Ok(End::Status(code, text));
    }
    {
        let mut p = lock(progress);
        p.first.get_or_insert(First::Streaming);
        p.streams += 1;
        if !content_type.starts_with("text/event-stream") {
            p.notes.push(format!(
                "the stream's content-type is {content_type:?}, not text/event-stream"
            ));
        }
    }

    let mut events = Events::default();
    if chunked {
        read_chunked(&mut conn, &mut events, progress)
    } else {
        // Until the server closes (an event stream has no length).
        loop {
            events.feed(&conn.buf, progress);
            conn.buf.clear();
            match conn.fill()? {
                Fill::Data | Fill::Idle => {}
                Fill::Eof => return Ok(End::Closed),
                Fill::Stopped => return Ok(End::Stopped),
            }
        }
    }
}

/// A chunked body (`<hex size>[;ext]\r\n<data>\r\n` …, `0\r\n\r\n` at the end), its data
/// to `events`.
fn read_chunked(
    conn: &mut Conn<'_>,
    events: &mut Events,
    progress: &Mutex<Progress>,
) -> io::Result<End> {
    // Data bytes left in the current chunk.
    let mut left = 0usize;
    loop {
        if left > 0 {
            if !conn.buf.is_empty() {
                let n = left.min(conn.buf.len());
                events.feed(&conn.buf[..n], progress);
                conn.buf.drain(..n);
                left -= n;
                continue;
            }
        } else if let Some(i) = find(&conn.buf, b"\r\n") {
            // A size line (the empty line after a chunk's data is skipped).
            let line = String::from_utf8_lossy(&conn.buf[..i]).into_owned();
            conn.buf.drain(..i + 2);
            let size = line.split(';').next().unwrap_or_default().trim();
            if size.is_empty() {
                continue;
            }
            left = usize::from_str_radix(size, 16)
                .map_err(|_| io::Error::other(format!("bad chunk size {size:?}")))?;
            if left == 0 {
                return Ok(End::Closed);
            }
            continue;
        } else if conn.buf.len() > MAX_HEAD {
            return Err(io::Error::other("a chunk size line is too long"));
        }
        match conn.fill()? {
            Fill::Data | Fill::Idle => {}
            Fill::Eof => return Ok(End::Closed),
            Fill::Stopped => return Ok(End::Stopped),
        }
    }
}

/// The socket and what was read of it and not used yet.
struct Conn<'a> {
    stream: TcpStream,
    buf: Vec<u8>,
    stop: &'a AtomicBool,
}

enum Fill {
    /// Bytes were added to the buffer.
    Data,
    /// Nothing came within [`POLL`].
    Idle,
    Eof,
    Stopped,
}

impl Conn<'_> {
    fn fill(&mut self) -> io::Result<Fill> {
        if self.stop.load(Ordering::SeqCst) {
            return Ok(Fill::Stopped);
        }
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => Ok(Fill::Eof),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(Fill::Data)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(Fill::Idle)
            }
            Err(e) => Err(e),
        }
    }
}

/// The event-stream parser: counts events and comments, keeps only the start of the
/// current line.
#[derive(Default)]
struct Events {
    /// The first [`LINE_PREFIX`] bytes of the line being read.
    line: Vec<u8>,
    /// The current block's `event:` name, if any.
    name: Option<String>,
    /// Whether the current block has an `event:` or `data:` field.
    has_field: bool,
}

impl Events {
    fn feed(&mut self, bytes: &[u8], progress: &Mutex<Progress>) {
        if bytes.is_empty() {
            return;
        }
        lock(progress).bytes += bytes.len() as u64;
        let mut rest = bytes;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            self.push(&rest[..i]);
            self.end_line(progress);
            rest = &rest[i + 1..];
        }
        self.push(rest);
    }

    fn push(&mut self, bytes: &[u8]) {
        let room = LINE_PREFIX.saturating_sub(self.line.len());
        self.line.extend_from_slice(&bytes[..room.min(bytes.len())]);
    }

    fn end_line(&mut self, progress: &Mutex<Progress>) {
        let mut line = std::mem::take(&mut self.line);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.is_empty() {
            if self.has_field {
                let name = self.name.take().unwrap_or_else(|| "message".to_owned());
                let mut p = lock(progress);
                p.events += 1;
                *p.by_name.entry(name).or_default() += 1;
            }
            self.name = None;
            self.has_field = false;
        } else if line.starts_with(b":") {
            lock(progress).comments += 1;
        } else if let Some(name) = line.strip_prefix(b"event:") {
            let name = String::from_utf8_lossy(name).trim().to_owned();
            self.name = Some(name);
            self.has_field = true;
        } else if line.starts_with(b"data:") || line == b"data" {
            self.has_field = true;
        }
        self.line = line;
        self.line.clear();
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(chunks: &[&[u8]]) -> Progress {
        let progress = Mutex::new(Progress::default());
        let mut events = Events::default();
        for c in chunks {
            events.feed(c, &progress);
        }
        progress.into_inner().expect("not poisoned")
    }

    #[test]
    fn events_and_comments_are_counted_across_reads() {
        let p = count(&[
            b"event: snapshot\ndata: {\"a\":1}\n\n: keep-alive\n\n",
            b"event: ti",
            b"ck\r\ndata: {}\r\n",
            b"\r\ndata: x\n\n",
        ]);
        assert_eq!(p.events, 3);
        assert_eq!(p.comments, 1);
        let names: Vec<(&str, u64)> = p.by_name.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(names, [("message", 1), ("snapshot", 1), ("tick", 1)]);
    }

    #[test]
    fn a_long_data_line_keeps_only_its_prefix() {
        let long = vec![b'x'; 100_000];
        let mut data = b"event: snapshot\ndata: ".to_vec();
        data.extend_from_slice(&long);
        data.extend_from_slice(b"\n\n");
        let progress = Mutex::new(Progress::default());
        let mut events = Events::default();
        for piece in data.chunks(1000) {
            events.feed(piece, &progress);
            assert!(events.line.len() <= LINE_PREFIX);
        }
        assert_eq!(lock(&progress).events, 1);
    }

    /// A server on a thread: answers one request with `answer`, then keeps the
    /// connection open until `hold` has passed.
    fn serve(answer: Vec<u8>, hold: Duration) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            let mut head = Vec::new();
            let mut b = [0u8; 1024];
            while find(&head, b"\r\n\r\n").is_none() {
                match s.read(&mut b) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&b[..n]),
                }
            }
            let _ = s.write_all(&answer);
            std::thread::sleep(hold);
        });
        addr
    }

    #[test]
    fn a_chunked_stream_is_read_until_stopped() {
        let body = b"event: snapshot\ndata: {}\n\n";
        let mut answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..3 {
            answer.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
            answer.extend_from_slice(body);
            answer.extend_from_slice(b"\r\n");
        }
        let addr = serve(answer, Duration::from_secs(10));
        let mut client = EventsClient::start(addr).expect("thread");
        assert_eq!(
            client.wait_first(Duration::from_secs(5)),
            Some(First::Streaming)
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while lock(&client.progress).events < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let started = Instant::now();
        let p = client.stop();
        assert!(started.elapsed() < Duration::from_secs(1), "stops promptly");
        assert_eq!(p.events, 3);
        assert_eq!(p.streams, 1);
        assert!(p.notes.is_empty(), "{:?}", p.notes);
    }

    #[test]
    fn a_404_is_not_retried() {
        let answer = b"HTTP/1.1 404 Not Found\r\ncontent-length: 10\r\n\r\nnot found\n".to_vec();
        let addr = serve(answer, Duration::ZERO);
        let mut client = EventsClient::start(addr).expect("thread");
        assert_eq!(
            client.wait_first(Duration::from_secs(5)),
            Some(First::NotFound)
        );
        let p = client.stop();
        assert_eq!(p.reconnects, 0);
        assert_eq!(p.events, 0);
    }

    #[test]
    fn a_closed_stream_is_opened_again_a_bounded_number_of_times() {
        // Nothing listens after the first answer: every reconnect fails at once.
        let answer =
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: 1\n\n".to_vec();
        let addr = serve(answer, Duration::ZERO);
        let mut client = EventsClient::start(addr).expect("thread");
        let deadline = Instant::now() + Duration::from_secs(10);
        while client.thread.as_ref().is_some_and(|t| !t.is_finished()) && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let p = client.stop();
        assert_eq!(p.first, Some(First::Streaming));
        assert_eq!(p.events, 1);
        assert_eq!(p.reconnects, MAX_RECONNECTS);
        assert_eq!(p.notes.len(), MAX_RECONNECTS as usize + 1, "{:?}", p.notes);
        assert!(p.notes.last().is_some_and(|n| n.contains("gave up")));
    }
}
